"""Property-based fuzz of every operation in the server's own /api/openapi.json, with a small seeded
generator (no third-party fuzzing library): schema-shaped bodies, then mutated ones (wrong types, huge
numbers, NaN, nested junk, unicode, lone surrogates, NUL, missing and unknown fields) and odd path
parameters and query strings.

Properties, on SQLite and on PostgreSQL:
  * no answer is a 5xx, every error answer is JSON, no request hangs (each has a timeout);
  * the server still answers /api/health and /api/ready afterwards;
  * seed rows (a flow, a run with its task run, states and logs, a block, a variable, a deployment, a
    work pool, an artifact, a concurrency limit, a policy, a saved search) are unchanged: the fuzz only
    ever names random ids and names that match none of them.

PREFECTLITE_FUZZ_SEED and PREFECTLITE_FUZZ_PER_OPERATION change the seed and the request count.
"""

import http.client
import json
import os
import random
import string
import urllib.parse
import uuid

import pytest

import prefectlite

SEED = int(os.environ.get("PREFECTLITE_FUZZ_SEED", "20240517"))
PER_OPERATION = int(os.environ.get("PREFECTLITE_FUZZ_PER_OPERATION", "20"))
TIMEOUT = 20.0


# --- the generator -------------------------------------------------------------------------------

UNICODE = [
    "ünïcødé",
    "名前",
    "🦄💥",
    "עברית",
    "\u202eevil",
    "a\u0301",
    "\u0000",
    "\ud800",
    "\udfff",
    "\ufeff",
    "\n\r\t",
    "' OR 1=1 --",
    '"; DROP TABLE flow; --',
    "%s%s%n",
    "{0}{name}",
    "${HOME}",
    "../../etc/passwd",
    "<script>alert(1)</script>",
    "\\",
    "NULL",
    "null",
    "true",
    "",
    " ",
    "*",
    "%",
    "_",
    "?",
    "$1",
]
HUGE_INTS = [2**31, 2**31 - 1, -(2**31), 2**63, 2**63 - 1, -(2**63), -(2**63) - 1, 2**64, 10**30, -(10**30), 10**400]
FLOATS = [0.5, -0.0, 1e308, -1e308, 1e-320, 3.141592653589793, float("nan"), float("inf"), float("-inf")]
DATES = [
    "2030-01-01T00:00:00Z",
    "2030-01-01T00:00:00+00:00",
    "1970-01-01T00:00:00Z",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999Z",
    "2030-02-30T00:00:00Z",
    "2030-01-01",
    "2030-01-01T25:61:61Z",
    "yesterday",
    "2030-01-01T00:00:00+14:00",
    "2030-01-01T00:00:00-12:00",
    "20300101T000000Z",
    "",
    "1e10",
]
FILTER_FIELDS = [
    "id",
    "name",
    "tags",
    "state",
    "type",
    "flow_id",
    "flow_run_id",
    "task_run_id",
    "deployment_id",
    "start_time",
    "end_time",
    "expected_start_time",
    "next_scheduled_start_time",
    "work_queue_name",
    "parent_task_run_id",
    "parent_flow_run_id",
    "subflow_runs",
    "level",
    "timestamp",
    "key",
    "slug",
    "is_active",
    "is_anonymous",
    "block_type_id",
    "block_capabilities",
    "version",
    "value",
    "paused",
    "deployment",
    "idempotency_key",
    "flow_version",
    "operator",
    "unknown_field",
]
FILTER_OPS = [
    "any_",
    "all_",
    "not_any_",
    "like_",
    "before_",
    "after_",
    "is_null_",
    "exists_",
    "ge_",
    "le_",
    "startswith_",
    "eq_",
    "operator",
    "type",
    "name",
    "bogus_",
]
QUERY_KEYS = [
    "include_secrets",
    "limit",
    "offset",
    "status",
    "flow_run_id",
    "task_run_id",
    "client",
    "version",
    "sort",
    "name",
]


class Generator:
    def __init__(self, rng, components):
        self.rng = rng
        self.components = components

    # scalars
    def uuid(self):
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def text(self):
        r = self.rng.random()
        if r < 0.35:
            return "fuzz-" + "".join(self.rng.choice(string.ascii_lowercase + string.digits + "-") for _ in range(8))
        if r < 0.7:
            return self.rng.choice(UNICODE) + self.rng.choice(UNICODE)
        if r < 0.8:
            return "x" * self.rng.choice([256, 5001, 70_000])
        if r < 0.9:
            return self.rng.choice(DATES)
        return self.uuid()

    def junk(self, depth=0):
        r = self.rng.random()
        if depth > 3 or r < 0.55:
            return self.rng.choice(
                [
                    None,
                    True,
                    False,
                    0,
                    -1,
                    1.5,
                    "",
                    [],
                    {},
                    self.text(),
                    self.rng.choice(HUGE_INTS),
                    self.rng.choice(FLOATS),
                    self.rng.choice(UNICODE),
                ]
            )
        if r < 0.7:
            return [self.junk(depth + 1) for _ in range(self.rng.randint(0, 4))]
        if r < 0.85:
            return {
                self.rng.choice(FILTER_FIELDS + ["type", "name", "x"]): self.junk(depth + 1)
                for _ in range(self.rng.randint(0, 4))
            }
        nested = self.junk(depth + 1)
        for _ in range(self.rng.choice([20, 60, 120])):
            nested = self.rng.choice([[nested], {"a": nested}])
        return nested

    def filter_object(self):
        """Something shaped like the filter language: {field: {operator: value}}."""
        out = {}
        for _ in range(self.rng.randint(0, 3)):
            field = self.rng.choice(FILTER_FIELDS)
            if self.rng.random() < 0.15:
                out[field] = self.junk()
                continue
            ops = {}
            for _ in range(self.rng.randint(1, 2)):
                op = self.rng.choice(FILTER_OPS)
                ops[op] = self.rng.choice(
                    [
                        [self.uuid() for _ in range(self.rng.randint(0, 3))],
                        [self.text()],
                        self.text(),
                        self.rng.choice(DATES),
                        self.rng.choice([True, False, None]),
                        self.rng.choice(HUGE_INTS),
                        {"any_": [self.rng.choice(["COMPLETED", "FAILED", "BOGUS"])]},
                        self.rng.choice(["and_", "or_", "xor_"]),
                        self.junk(),
                    ]
                )
            out[field] = ops
        return out

    # from the schema
    def resolve(self, schema):
        while isinstance(schema, dict) and "$ref" in schema:
            schema = {
                **self.components[schema["$ref"].rsplit("/", 1)[1]],
                **{k: v for k, v in schema.items() if k != "$ref"},
            }
        return schema or {}

    def instance(self, schema, depth=0):
        schema = self.resolve(schema)
        if schema.get("nullable") and self.rng.random() < 0.1:
            return None
        if "enum" in schema:
            return self.rng.choice(list(schema["enum"]) + ([self.text()] if self.rng.random() < 0.2 else []))
        kind = schema.get("type")
        fmt = schema.get("format")
        if kind == "object":
            props = schema.get("properties")
            if not props:
                if "filter" in schema.get("description", "") or self.rng.random() < 0.4:
                    return self.filter_object()
                return {self.text()[:20]: self.junk() for _ in range(self.rng.randint(0, 3))}
            required = set(schema.get("required", []))
            return {
                name: self.instance(sub, depth + 1)
                for name, sub in props.items()
                if name in required or self.rng.random() < 0.5
            }
        if kind == "array":
            if depth > 4:
                return []
            return [self.instance(schema.get("items", {}), depth + 1) for _ in range(self.rng.randint(0, 3))]
        if kind == "string":
            if fmt == "uuid":
                return self.uuid()
            if fmt == "date-time":
                return self.rng.choice(DATES)
            return self.text()
        if kind == "integer":
            return self.rng.choice([0, 1, 5, 50, -1, self.rng.randint(0, 1000), self.rng.choice(HUGE_INTS)])
        if kind == "number":
            return self.rng.choice([0, 1, 2.5, -3.0, self.rng.choice(FLOATS), self.rng.choice(HUGE_INTS)])
        if kind == "boolean":
            return self.rng.choice([True, False])
        return self.junk(depth)

    def mutate(self, value):
        """One random change to a generated body."""
        r = self.rng.random()
        if isinstance(value, dict) and value and r < 0.5:
            key = self.rng.choice(sorted(value))
            choice = self.rng.random()
            if choice < 0.35:
                del value[key]  # a missing (maybe required) field
            elif choice < 0.85:
                value[key] = self.junk()  # a wrong type, a huge number, junk
            else:
                value[key] = self.mutate(value[key])
            return value
        if isinstance(value, list) and value and r < 0.5:
            value[self.rng.randrange(len(value))] = self.junk()
            return value
        if r < 0.65 and isinstance(value, dict):
            value[self.rng.choice(["unknown_field", "id", "created", "__proto__", self.text()[:30]])] = self.junk()
            return value
        if r < 0.8:
            return [value] if self.rng.random() < 0.5 else {"body": value}
        return self.junk()

    def body(self, schema):
        if schema is None:
            r = self.rng.random()
            return None if r < 0.6 else (self.filter_object() if r < 0.8 else self.junk())
        value = self.instance(schema)
        for _ in range(self.rng.choice([0, 1, 1, 2, 3])):
            value = self.mutate(value)
        return value

    def path_value(self, name):
        r = self.rng.random()
        if r < 0.5:
            value = self.uuid()
        elif r < 0.65:
            value = "fuzz-" + self.uuid()[:8]
        elif r < 0.9:
            value = self.rng.choice(UNICODE + ["..", ".", "-1", "0", str(2**64), "1e400", "x" * 3000, "a/b", "a%2Fb"])
        else:
            value = self.rng.choice([self.uuid().upper(), self.uuid().replace("-", ""), "{" + self.uuid() + "}"])
        return urllib.parse.quote(value.encode("utf-8", "surrogatepass"), safe="")

    def query(self):
        if self.rng.random() < 0.7:
            return ""
        pairs = [
            (
                self.rng.choice(QUERY_KEYS),
                self.rng.choice(["true", "false", "maybe", "-1", "", self.uuid(), "%zz", str(2**64), self.text()[:50]]),
            )
            for _ in range(self.rng.randint(1, 3))
        ]
        return "?" + "&".join(
            f"{k}={urllib.parse.quote(v.encode('utf-8', 'surrogatepass'), safe='%')}" for k, v in pairs
        )


def encode(body):
    if body is None:
        return None
    # allow_nan: NaN/Infinity tokens are part of the fuzz; lone surrogates are sent as \\ud800 escapes
    return json.dumps(body, allow_nan=True).encode()


# --- HTTP ---------------------------------------------------------------------------------------


class Conn:
    def __init__(self, api_url):
        parts = urllib.parse.urlsplit(api_url)
        self.host, self.port = parts.hostname, parts.port
        self.conn = None

    def request(self, method, path, raw=None):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        try:
            self.conn.request(method, path, body=raw, headers={"Content-Type": "application/json"})
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        headers = {k.lower(): v for k, v in resp.getheaders()}
        if resp.will_close:
            self.close()
        return resp.status, headers, data

    def json(self, method, path, body=None, expect=(200, 201, 204)):
        status, _, data = self.request(method, "/api" + path, encode(body))
        assert status in expect, (method, path, status, data[:300])
        return json.loads(data) if data else None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# --- seed rows and their snapshot ----------------------------------------------------------------


def seed_rows(c):
    flow = c.json("POST", "/flows/", {"name": "seed-flow", "tags": ["seed"]})
    run = c.json(
        "POST", "/flow_runs/", {"flow_id": flow["id"], "name": "seed-run", "tags": ["seed"], "parameters": {"x": 1}}
    )
    task = c.json("POST", "/task_runs/", {"flow_run_id": run["id"], "task_key": "seed-task", "dynamic_key": "0"})
    for target in ("RUNNING", "COMPLETED"):
        c.json("POST", f"/task_runs/{task['id']}/set_state", {"state": {"type": target}})
        c.json("POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": target}})
    c.json(
        "POST",
        "/logs/",
        [
            {
                "name": "seed",
                "level": 20,
                "message": "seed line",
                "timestamp": "2030-01-01T00:00:00Z",
                "flow_run_id": run["id"],
                "task_run_id": task["id"],
            }
        ],
    )
    block_type = c.json("GET", "/block_types/slug/slack-webhook")
    schema = c.json(
        "POST", "/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}}
    )[0]
    block = c.json(
        "POST",
        "/block_documents/",
        {
            "name": "seed-block",
            "block_type_id": block_type["id"],
            "block_schema_id": schema["id"],
            "data": {"url": "http://127.0.0.1:9/seed-secret"},
        },
    )
    variable = c.json("POST", "/variables/", {"name": "seed_variable", "value": {"seed": [1, 2]}, "tags": ["seed"]})
    c.json("POST", "/work_pools/", {"name": "seed-pool", "type": "process"})
    deployment = c.json(
        "POST",
        "/deployments/",
        {"name": "seed-deployment", "flow_id": flow["id"], "work_pool_name": "seed-pool", "parameters": {"x": 2}},
    )
    artifact = c.json(
        "POST", "/artifacts/", {"key": "seed-artifact", "type": "markdown", "data": "# seed", "flow_run_id": run["id"]}
    )
    limit = c.json("POST", "/v2/concurrency_limits/", {"name": "seed-limit", "limit": 3})
    policy = c.json(
        "POST",
        "/flow_run_notification_policies/",
        {"state_names": ["Failed"], "tags": ["seed"], "block_document_id": block["id"], "is_active": False},
    )
    search = c.json("PUT", "/saved_searches/", {"name": "seed-search", "filters": []})
    return [
        ("GET", f"/flows/{flow['id']}", None),
        ("GET", "/flows/name/seed-flow", None),
        ("GET", f"/flow_runs/{run['id']}", None),
        ("GET", f"/flow_run_states/?flow_run_id={run['id']}", None),
        ("GET", f"/task_runs/{task['id']}", None),
        ("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}}),
        ("GET", f"/block_documents/{block['id']}?include_secrets=true", None),
        ("GET", f"/variables/{variable['id']}", None),
        ("GET", "/variables/name/seed_variable", None),
        ("GET", "/work_pools/seed-pool", None),
        ("GET", f"/deployments/{deployment['id']}", None),
        ("GET", f"/artifacts/{artifact['id']}", None),
        ("GET", f"/v2/concurrency_limits/{limit['id']}", None),
        ("GET", f"/flow_run_notification_policies/{policy['id']}", None),
        ("GET", f"/saved_searches/{search['id']}", None),
    ]


def snapshot(c, reads):
    return {f"{method} {path}": c.json(method, path, body, expect=(200,)) for method, path, body in reads}


# --- the fuzz -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def fuzz_server(request, tmp_path):
    if request.param == "sqlite":
        database = f"sqlite:///{tmp_path}/fuzz.db"
    else:
        database = request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=database, port=0, PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS=1) as api_url:
        yield api_url


# Routes that change whatever rows their filter picks (Prefect 3's bulk routes): a fuzzed filter may pick the
# seed rows, so these are fuzzed after the seed rows are compared, for their answers alone.
FILTER_WRITES = ("/bulk_delete", "/bulk_set_state")


def fuzz_operations(c, operations, gen, rng, failures, statuses) -> int:
    """PER_OPERATION fuzzed requests to each operation; what went wrong goes into `failures`; the count sent."""
    sent = 0
    for path, method, op in operations:
        schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        for _ in range(PER_OPERATION):
            concrete = path
            for param in op.get("parameters", []):
                if param["in"] == "path":
                    concrete = concrete.replace("{" + param["name"] + "}", gen.path_value(param["name"]))
            concrete += gen.query()
            body = gen.body(schema) if method != "GET" or rng.random() < 0.1 else None
            raw = encode(body)
            if raw is not None and rng.random() < 0.05:
                raw = raw[: rng.randrange(len(raw) + 1)]  # truncated JSON
            sent += 1
            try:
                status, headers, data = c.request(method, concrete, raw)
            except (OSError, http.client.HTTPException) as exc:
                failures.append((method, concrete[:120], "no answer", repr(exc)[:100], (raw or b"")[:200]))
                continue
            statuses[status] = statuses.get(status, 0) + 1
            problem = None
            if status >= 500:
                problem = f"{status} {data[:150]!r}"
            elif status >= 400:
                try:
                    payload = json.loads(data)
                    if not (isinstance(payload, dict) and (payload.get("detail") or payload.get("exception_detail"))):
                        problem = f"{status} without a JSON reason: {data[:100]!r}"
                except ValueError:
                    problem = f"{status} with a body that is not JSON: {data[:100]!r}"
            if problem:
                failures.append((method, path, concrete[:120], problem, (raw or b"")[:300]))
    return sent


def test_fuzz_every_operation(fuzz_server):
    api_url = fuzz_server
    c = Conn(api_url)
    try:
        reads = seed_rows(c)
        before = snapshot(c, reads)
        assert snapshot(c, reads) == before, "the snapshot itself is not stable; the comparison would prove nothing"
        doc = c.json("GET", "/openapi.json")
        components = doc["components"]["schemas"]
        operations = sorted(
            (path, method.upper(), op) for path, ops in doc["paths"].items() for method, op in ops.items()
        )
        assert len(operations) > 100
        by_filter = [operation for operation in operations if operation[0].endswith(FILTER_WRITES)]
        assert len(by_filter) == 4, by_filter  # the three bulk deletes and bulk_set_state
        rng = random.Random(SEED)
        gen = Generator(rng, components)
        failures, statuses = [], {}
        others = [operation for operation in operations if operation not in by_filter]
        sent = fuzz_operations(c, others, gen, rng, failures, statuses)
        after = snapshot(c, reads)
        sent += fuzz_operations(c, by_filter, gen, rng, failures, statuses)
        assert sent == len(operations) * PER_OPERATION
        c.close()
        assert c.json("GET", "/health") is True
        assert c.json("GET", "/ready") == {"status": "ready"}
    finally:
        c.close()
    changed = [key for key in before if before[key] != after[key]]
    report = "\n".join(" | ".join(map(str, f)) for f in failures[:40])
    assert not failures and not changed, (
        f"seed rows changed by unrelated requests: {changed}\n"
        f"{len(failures)} of {sent} fuzzed requests failed (seed {SEED}); statuses {statuses}:\n{report}"
    )


# --- what the fuzz found, pinned as plain examples ------------------------------------------------
# Each case is a minimal request the fuzz turned up; none may be a 5xx, on either database.


def _not_5xx(c, method, path, body=None):
    status, headers, data = c.request(method, "/api" + path, encode(body))
    assert status < 500, (method, path, str(body)[:120], status, data[:200])
    if status >= 400:
        assert headers.get("content-type", "").startswith("application/json"), (method, path, headers)
    return status, (json.loads(data) if data else None)


@pytest.fixture
def seeded(fuzz_server):
    c = Conn(fuzz_server)
    flow = c.json("POST", "/flows/", {"name": "found"})
    run = c.json("POST", "/flow_runs/", {"flow_id": flow["id"]})
    limit = c.json("POST", "/v2/concurrency_limits/", {"name": "found-limit", "limit": 3})
    yield c, flow, run, limit
    c.close()


NUL_CASES = [
    ("GET", "/flows/name/%00", None),
    ("GET", "/variables/name/a%00", None),
    ("GET", "/work_pools/%00", None),
    ("GET", "/block_types/slug/%00", None),
    ("GET", "/deployments/name/%00/x", None),
    ("DELETE", "/concurrency_limits/tag/%00", None),
    ("POST", "/flows/", {"name": "nul\u0000inside"}),
    ("POST", "/flows/filter", {"flows": {"name": {"any_": ["nul\u0000"]}}}),
    ("PUT", "/saved_searches/", {"name": "\u0000"}),
    ("POST", "/block_types/", {"name": "nul\u0000", "slug": "nul-block"}),
]


def test_nul_characters_are_refused_not_500(seeded):
    c, *_ = seeded
    failing = []
    for method, path, body in NUL_CASES:
        status, _, data = c.request(method, "/api" + path, encode(body))
        if status >= 500:
            failing.append((method, path, body, status))
    assert not failing, f"{len(failing)} of {len(NUL_CASES)} requests with a NUL character are a 5xx: {failing}"


def _all_not_5xx(c, cases):
    failing = []
    for method, path, body in cases:
        status, _, data = c.request(method, "/api" + path, encode(body))
        if status >= 500:
            failing.append((method, path, str(body)[:90], status))
    assert not failing, f"{len(failing)} of {len(cases)} requests are a 5xx: {failing}"


def test_strings_longer_than_their_columns_are_not_500(seeded):
    c, flow, run, _ = seeded
    long = "x" * 300
    _all_not_5xx(
        c,
        [
            ("POST", "/flows/", {"name": long}),
            ("POST", "/task_runs/", {"flow_run_id": run["id"], "task_key": long, "dynamic_key": "0"}),
            ("POST", "/artifacts/", {"key": "k", "type": long}),
            ("PATCH", f"/flow_runs/{run['id']}", {"name": "y" * 3000}),
        ],
    )


def test_integers_beyond_the_column_range_are_not_500(seeded):
    c, flow, run, limit = seeded
    _all_not_5xx(
        c,
        [
            ("POST", "/logs/", [{"name": "n", "level": 2**31, "message": "m", "timestamp": "2030-01-01T00:00:00Z"}]),
            ("POST", "/logs/", [{"name": "n", "level": -(2**63), "message": "m", "timestamp": "2030-01-01T00:00:00Z"}]),
            ("POST", "/v2/concurrency_limits/", {"name": "big", "limit": 2**31}),
            ("PATCH", f"/v2/concurrency_limits/{limit['id']}", {"active_slots": 2**63 - 1}),
            ("POST", "/concurrency_limits/", {"tag": "t", "concurrency_limit": 2**31}),
            ("POST", "/work_pools/", {"name": "p", "concurrency_limit": 2**31}),
        ],
    )


def test_a_huge_queue_priority_is_refused_and_never_breaks_the_next_queue(seeded):
    """The fuzz (seed 59, 100 per operation) made a queue with priority 2**63 - 1; the next queue created
    without a priority takes the highest + 1, which no longer fit an integer: a 500 for a good request."""
    c, *_ = seeded
    for priority in (2**63 - 1, 2**31, 1_000_000_001):
        status, payload = _not_5xx(c, "POST", "/work_queues/", {"name": f"q-{priority}", "priority": priority})
        assert status == 422 and payload["exception_detail"][0]["loc"] == ["body", "priority"], payload
    status, top = _not_5xx(c, "POST", "/work_queues/", {"name": "q-top", "priority": 1_000_000_000})
    assert status == 201, top
    status, following = _not_5xx(c, "POST", "/work_queues/", {"name": "q-following"})
    assert status == 201 and following["priority"] == 1_000_000_001, following
    status, payload = _not_5xx(c, "PATCH", f"/work_queues/{top['id']}", {"priority": 2**63 - 1})
    assert status == 422, payload


def test_denied_slots_count_up_to_a_limit_and_stay_an_integer(seeded):
    """Each refused increment adds its slots to denied_slots; that count saturates instead of becoming a
    float (SQLite's overflow in SQL) or an error (PostgreSQL's INTEGER)."""
    c, *_ = seeded
    status, lim = _not_5xx(
        c, "POST", "/v2/concurrency_limits/", {"name": "full", "limit": 1, "denied_slots": 2**31 - 5}
    )
    assert status == 201, lim
    for _ in range(3):
        status, _ = _not_5xx(c, "POST", "/v2/concurrency_limits/increment", {"names": ["full"], "slots": 2**30})
        assert status == 423
    status, after = _not_5xx(c, "GET", f"/v2/concurrency_limits/{lim['id']}")
    assert after["denied_slots"] == 2**31 - 1 and isinstance(after["denied_slots"], int), after


@pytest.mark.parametrize("route", ["increment", "decrement"])
def test_a_huge_occupancy_is_not_500(seeded, route):
    c, *_ = seeded
    _not_5xx(
        c,
        "POST",
        f"/v2/concurrency_limits/{route}",
        {"names": ["found-limit"], "slots": 1, "occupancy_seconds": 10**400},
    )


def test_filter_texts_longer_than_a_like_pattern_may_be_are_not_500(seeded):
    """SQLite refuses a LIKE pattern over 50,000 bytes (the fuzz, seed 22: an event filter's id_prefix)."""
    c, *_ = seeded
    long = "p" * 60_000
    _all_not_5xx(
        c,
        [
            ("POST", "/events/filter", {"filter": {"resource": {"id_prefix": [long]}}}),
            ("POST", "/events/filter", {"filter": {"event": {"prefix": [long]}}}),
            ("POST", "/events/filter", {"filter": {"resource": {"labels": {"x": [long + "*"]}}}}),
            ("POST", "/flows/filter", {"flows": {"name": {"like_": long}}}),
            ("POST", "/flow_runs/filter", {"flow_runs": {"name": {"like_": long}}}),
            ("POST", "/deployments/filter", {"deployments": {"name": {"like_": long}}}),
            ("POST", "/block_documents/filter", {"block_documents": {"name": {"like_": long}}}),
        ],
    )


def test_filters_with_more_values_than_a_query_takes_are_not_5xx(seeded):
    """A thousand tags made SQLite's expression tree too deep (500); 70,000 ids are more values than
    PostgreSQL's protocol carries, which psycopg reported as an OperationalError: a 503 'unavailable',
    which the SDK would retry for ever. Either is the request's size: a 422 that says so (or an answer)."""
    c, *_ = seeded
    tags = [f"tag-{i}" for i in range(2_000)]
    ids = [str(uuid.UUID(int=i)) for i in range(70_000)]
    _all_not_5xx(
        c,
        [
            ("POST", "/flow_runs/filter", {"flow_runs": {"tags": {"any_": tags}}}),
            ("POST", "/flow_runs/filter", {"flow_runs": {"tags": {"all_": tags}}}),
            ("POST", "/flows/filter", {"flows": {"id": {"any_": ids}}}),
            ("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": ids}}}),
            ("POST", "/events/filter", {"filter": {"resource": {"id": ids}}}),
            ("POST", "/v2/concurrency_limits/increment", {"names": ids, "slots": 1}),
        ],
    )


@pytest.mark.parametrize("op", ["like_", "startswith_"])
def test_text_matching_on_a_number_field_is_422_naming_it(seeded, op):
    """The fuzz (seed 88, 150 per operation): startswith_ on the logs' level was a 500 on PostgreSQL
    (no ILIKE for integers); like_ and startswith_ apply to text fields only."""
    c, *_ = seeded
    status, payload = _not_5xx(c, "POST", "/logs/filter", {"logs": {"level": {op: "1"}}})
    assert status == 422 and payload["exception_detail"][0]["loc"] == ["body", "logs", "level", op], payload
    status, _ = _not_5xx(c, "POST", "/flow_runs/filter", {"flow_runs": {"name": {op: "fo"}}})
    assert status == 200


def _strict_json(data: bytes):
    """JSON as RFC 8259 has it: NaN and Infinity, which Python's json would read, are an error."""

    def refuse(token):
        raise ValueError(f"{token} in an answer")

    return json.loads(data, parse_constant=refuse)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_a_number_json_has_not_is_refused_and_never_stored(seeded, token):
    """Python's json reads NaN, Infinity and 1e400 (as inf); SQLite's and PostgreSQL's JSON do not. The
    fuzz (seed 13) once stored -Infinity in a task run's task_inputs, and from then on every task run
    listing was a 503: one bad request may not break every later read."""
    c, flow, _, _ = seeded
    cases = [
        (
            "/api/task_runs/",
            '{"task_key": "k", "dynamic_key": "0", "task_inputs": {"x": [{"y": %s}]}}' % token,
            ["body", "task_inputs", "x", 0, "y"],
        ),
        (
            "/api/flow_runs/",
            '{"flow_id": "%s", "parameters": {"p": %s}}' % (flow["id"], token),
            ["body", "parameters", "p"],
        ),
        (
            "/api/artifacts/",
            '{"key": "non-finite", "type": "table", "data": {"cell": %s}}' % token,
            ["body", "data", "cell"],
        ),
    ]
    for path, raw, where in cases:
        status, headers, data = c.request("POST", path, raw.encode())
        assert status == 422, (path, status, data[:300])
        payload = _strict_json(data)  # the echoed request body holds no NaN either
        assert payload["exception_detail"][0]["loc"] == where, payload  # named where it is
        assert "finite" in payload["exception_detail"][0]["msg"], payload
    for listing in ("/api/task_runs/filter", "/api/flow_runs/filter", "/api/artifacts/filter"):
        status, _, data = c.request("POST", listing, b"{}")
        assert status == 200, (listing, status, data[:300])
        assert all(row.get("task_key") != "k" and row.get("key") != "non-finite" for row in _strict_json(data))


EXTREMES = ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"]


@pytest.mark.parametrize("moment", EXTREMES)
def test_history_over_extreme_dates_is_not_500(seeded, moment):
    c, *_ = seeded
    _all_not_5xx(
        c,
        [
            (
                "POST",
                history,
                {
                    "history_start": moment,
                    "history_end": "2030-01-01T00:00:00Z",
                    "history_interval_seconds": 86400 * 365,
                },
            )
            for history in ("/flow_runs/history", "/task_runs/history")
        ],
    )


def test_history_buckets_that_would_end_past_the_year_9999_end_at_the_history_end(seeded):
    """The fuzz (seed 69): 68-year buckets from 2030 to 9999-12-31 stepped past the calendar (a 500)."""
    c, *_ = seeded
    for history in ("/flow_runs/history", "/task_runs/history"):
        status, buckets = _not_5xx(
            c,
            "POST",
            history,
            {
                "history_start": "2030-01-01T00:00:00Z",
                "history_end": "9999-12-31T23:59:59.999999Z",
                "history_interval_seconds": 2**31,
            },
        )
        assert status == 200 and len(buckets) == 118, (status, str(buckets)[:200])
        assert buckets[-1]["interval_end"].startswith("9999-12-31T23:59:59.999999")
        assert all(a["interval_end"] == b["interval_start"] for a, b in zip(buckets, buckets[1:]))


@pytest.mark.parametrize("moment", EXTREMES)
def test_an_extreme_date_once_accepted_never_breaks_later_reads(seeded, moment):
    c, flow, run, _ = seeded
    _not_5xx(
        c,
        "POST",
        f"/flow_runs/{run['id']}/set_state",
        {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": moment}}, "force": True},
    )
    _not_5xx(
        c, "POST", "/logs/", [{"name": "n", "level": 20, "message": "m", "timestamp": moment, "flow_run_id": run["id"]}]
    )
    # whatever was accepted must stay readable: one odd row may not break every listing
    _all_not_5xx(
        c,
        [
            ("GET", f"/flow_runs/{run['id']}", None),
            ("POST", "/flow_runs/filter", {}),
            ("POST", "/logs/filter", {}),
            ("GET", f"/flow_run_states/?flow_run_id={run['id']}", None),
        ],
    )
