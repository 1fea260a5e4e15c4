"""The HTTP layer: keep-alive, framing, JSON errors everywhere, body limits, basic auth, CORS, static
files and malformed requests. Real sockets against a real server; nothing may answer 500."""

import base64
import contextlib
import gzip
import http.client
import json
import re
import socket
import threading
import urllib.parse
import uuid

import pytest

import prefectlite
from helpers import Client, ROOT, wait_until


# --- helpers -----------------------------------------------------------------------------------


def host_port(api_url):
    parts = urllib.parse.urlsplit(api_url)
    return parts.hostname, parts.port


def fetch(api_url, method, path, body=None, headers=None, conn=None):
    """One request over http.client; `path` is absolute (starts with /). Returns (status, headers, bytes)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(*host_port(api_url), timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    payload = resp.read()
    result = resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
    if own:
        conn.close()
    return result


def raw_exchange(api_url, data, timeout=10):
    """Send raw bytes on a fresh socket and read until the server closes or goes quiet."""
    with socket.create_connection(host_port(api_url), timeout=timeout) as sock:
        sock.sendall(data)
        with_half_close(sock)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (socket.timeout, ConnectionResetError):
            pass
    return b"".join(chunks)


def with_half_close(sock):
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def parse_raw_response(data):
    """(status, headers, body) of the first response in `data`; fails the test if there is none."""
    assert data, "the server closed the connection without answering"
    assert data.startswith(b"HTTP/1."), f"no HTTP status line in the answer: {data[:200]!r}"
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("iso-8859-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(rest)))
    return status, headers, rest[:length]


def assert_json_error(status, headers, body, expected_status=None):
    assert status != 500 and status < 600, (status, body[:300])
    if expected_status is not None:
        assert status == expected_status, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:200])
    return json.loads(body)


def assert_422_naming(payload, loc):
    assert payload["exception_message"], payload
    details = payload["exception_detail"]
    assert isinstance(details, list) and details, payload
    for detail in details:
        assert {"loc", "msg", "type"} <= set(detail), detail
        assert isinstance(detail["loc"], list) and isinstance(detail["msg"], str) and isinstance(detail["type"], str)
    locs = [d["loc"] for d in details]
    assert loc in locs, (loc, locs)


def basic(user_pw):
    return "Basic " + base64.b64encode(user_pw.encode()).decode()


@pytest.fixture
def flow_run(client):
    flow = client.ok("POST", "/flows/", {"name": "http-flow"})
    return client.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})


# --- keep-alive and framing --------------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(server):
    conn = http.client.HTTPConnection(*host_port(server), timeout=30)
    try:
        status, _, body = fetch(server, "GET", "/api/health", conn=conn)
        assert (status, body) == (200, b"true")
        sock = conn.sock
        assert sock is not None
        status, _, body = fetch(server, "POST", "/api/flows/", {"name": "kept-alive"}, conn=conn)
        assert status == 201, body
        flow_id = json.loads(body)["id"]
        status, _, body = fetch(server, "GET", f"/api/flows/{flow_id}", conn=conn)
        assert status == 200 and json.loads(body)["name"] == "kept-alive"
        status, _, _ = fetch(server, "GET", "/api/no-such-route", conn=conn)  # errors keep the connection
        assert status == 404
        status, _, _ = fetch(server, "POST", "/api/flows/", {"name": 5}, conn=conn)
        assert status == 422
        status, _, body = fetch(server, "PATCH", f"/api/flows/{flow_id}", {"tags": ["x"]}, conn=conn)
        assert status == 204 and body == b""
        status, _, body = fetch(server, "GET", "/api/admin/version", conn=conn)
        assert (status, body) == (200, b'"2.20.27"')
        assert conn.sock is sock, "the server closed the kept-alive connection"
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(server):
    request = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /api/admin/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = raw_exchange(server, request * 3 + last)
    assert data.count(b"HTTP/1.1 200") == 4, data
    assert data.endswith(b'"2.20.27"'), data[-200:]


def test_content_length_is_exact(server, client):
    for i in range(30):
        client.ok("POST", "/flows/", {"name": f"flow-{i}-ünïcødé-✓"})
    for method, path, body in [
        ("GET", "/api/health", None),
        ("POST", "/api/flows/filter", {}),
        ("GET", "/api/flows/name/" + urllib.parse.quote("flow-1-ünïcødé-✓"), None),
        ("GET", "/api/nope", None),
        ("POST", "/api/flows/", b"{bad"),
        ("GET", "/", None),
    ]:
        status, headers, payload = fetch(server, method, path, body)
        assert status != 500
        assert int(headers["content-length"]) == len(payload), (method, path, headers)
    status, headers, payload = fetch(server, "GET", "/api/health", headers={"Connection": "close"})
    assert int(headers["content-length"]) == len(payload) == 4


def test_gzip_responses_have_the_compressed_length(server, client):
    for i in range(40):
        client.ok("POST", "/flows/", {"name": f"a-rather-long-flow-name-to-make-the-listing-big-{i}"})
    status, headers, payload = fetch(server, "POST", "/api/flows/filter", {}, headers={"Accept-Encoding": "gzip"})
    assert status == 200
    assert int(headers["content-length"]) == len(payload)
    if headers.get("content-encoding") == "gzip":
        payload = gzip.decompress(payload)
    assert len(json.loads(payload)) == 40


def test_head_answers_headers_only_and_keeps_the_connection(server):
    with socket.create_connection(host_port(server), timeout=10) as sock:
        sock.sendall(
            b"HEAD /api/health HTTP/1.1\r\nHost: x\r\n\r\nGET /api/health HTTP/1.1\r\nHost: x\r\n"
            b"Connection: close\r\n\r\n"
        )
        with_half_close(sock)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_part, _, rest = data.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 200"), data
    assert b"Content-Length: 4" in head_part
    assert rest.startswith(b"HTTP/1.1 200"), "a HEAD answer must not carry a body"
    assert rest.endswith(b"\r\n\r\ntrue")


def test_expect_100_continue_is_answered_before_the_body(server):
    body = json.dumps({"name": "expecting"}).encode()
    with socket.create_connection(host_port(server), timeout=5) as sock:
        sock.sendall(
            b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        try:
            interim = sock.recv(1000)
        except socket.timeout:
            pytest.fail("no '100 Continue' while the client waits for it before sending the body")
        assert interim.startswith(b"HTTP/1.1 100"), interim
        sock.sendall(body)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status, _, payload = parse_raw_response(data)
    assert status == 201 and json.loads(payload)["name"] == "expecting"


def test_no_content_answers_have_no_body(server, client):
    flow = client.ok("POST", "/flows/", {"name": "to-delete"})
    status, headers, payload = fetch(server, "DELETE", f"/api/flows/{flow['id']}")
    assert status == 204 and payload == b""
    assert headers.get("content-length", "0") == "0"


# --- JSON errors -------------------------------------------------------------------------------


def test_unknown_route_is_a_json_404(server):
    for path in ("/api/no-such-thing", "/api/flows/a/b/c", "/api/flow_runs/x/unknown_action"):
        payload = assert_json_error(*fetch(server, "GET", path), expected_status=404)
        assert payload["detail"]


def test_wrong_method_is_a_json_405(server):
    status, headers, body = fetch(server, "DELETE", "/api/health")
    payload = assert_json_error(status, headers, body, expected_status=405)
    assert payload["detail"]
    assert "GET" in headers.get("allow", "")
    assert_json_error(*fetch(server, "PUT", "/api/flows/", {"name": "x"}), expected_status=405)
    assert_json_error(*fetch(server, "POST", "/"), expected_status=405)


def test_malformed_json_is_422(server):
    for raw in (b"{bad", b'{"name": "x",}', b"\xff\xfe\x00", b'{"name": "unterminated'):
        payload = assert_json_error(*fetch(server, "POST", "/api/flows/", raw), expected_status=422)
        assert_422_naming(payload, ["body"])


def test_wrong_types_name_the_field(server):
    cases = [
        ("/api/flows/", {"name": 5}, ["body", "name"]),
        ("/api/flows/", {"name": "x", "tags": "not-a-list"}, ["body", "tags"]),
        ("/api/flows/", {"name": "x", "tags": ["ok", 3]}, ["body", "tags", 1]),
        ("/api/flows/", ["a", "list"], ["body"]),
        ("/api/flows/filter", {"limit": "ten"}, ["body", "limit"]),
        ("/api/flows/filter", {"limit": 1.5}, ["body", "limit"]),
        ("/api/flows/filter", {"flows": "everything"}, ["body", "flows"]),
        ("/api/logs/", {"not": "a list"}, ["body"]),
    ]
    for path, body, loc in cases:
        payload = assert_json_error(*fetch(server, "POST", path, body), expected_status=422)
        assert_422_naming(payload, loc)


def test_missing_required_fields_are_named(server, flow_run):
    cases = [
        ("/api/flows/", {}, ["body", "name"]),
        ("/api/flow_runs/", {}, ["body", "flow_id"]),
        ("/api/task_runs/", {"task_key": "k"}, ["body", "dynamic_key"]),
        (f"/api/flow_runs/{flow_run['id']}/set_state", {}, ["body", "state"]),
        (f"/api/flow_runs/{flow_run['id']}/set_state", {"state": {}}, ["body", "state", "type"]),
        ("/api/logs/", [{"name": "n", "level": 10, "message": "m"}], ["body", 0, "timestamp"]),
        ("/api/flow_runs/history", {"history_start": "2030-01-01T00:00:00Z"}, ["body", "history_end"]),
    ]
    for path, body, loc in cases:
        payload = assert_json_error(*fetch(server, "POST", path, body), expected_status=422)
        assert_422_naming(payload, loc)
        assert any(d["type"] == "value_error.missing" for d in payload["exception_detail"]), payload


def test_an_empty_body_where_one_is_required_is_422(server):
    payload = assert_json_error(*fetch(server, "POST", "/api/flows/", b""), expected_status=422)
    assert_422_naming(payload, ["body", "name"])


def test_invalid_uuids_are_named(server):
    for method, path in [
        ("GET", "/api/flows/not-a-uuid"),
        ("GET", "/api/flow_runs/1234"),
        ("DELETE", "/api/task_runs/zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"),
        ("POST", "/api/flow_runs/xyz/set_state"),
    ]:
        body = {"state": {"type": "RUNNING"}} if method == "POST" else None
        payload = assert_json_error(*fetch(server, method, path, body), expected_status=422)
        assert_422_naming(payload, ["path", "id"])
    payload = assert_json_error(*fetch(server, "POST", "/api/flow_runs/", {"flow_id": "nope"}), expected_status=422)
    assert_422_naming(payload, ["body", "flow_id"])
    payload = assert_json_error(*fetch(server, "GET", "/api/flow_run_states/?flow_run_id=nope"), expected_status=422)
    assert_422_naming(payload, ["query", "flow_run_id"])
    payload = assert_json_error(
        *fetch(server, "POST", "/api/flow_runs/filter", {"flow_runs": {"id": {"any_": ["bad-id"]}}}),
        expected_status=422,
    )
    assert ["body", "flow_runs", "id", "any_", 0] in [d["loc"] for d in payload["exception_detail"]]


def test_invalid_dates_are_named(server, flow_run):
    payload = assert_json_error(
        *fetch(server, "POST", "/api/logs/", [{"name": "n", "level": 10, "message": "m", "timestamp": "yesterday"}]),
        expected_status=422,
    )
    assert_422_naming(payload, ["body", 0, "timestamp"])
    payload = assert_json_error(
        *fetch(server, "POST", "/api/flow_runs/filter", {"flow_runs": {"start_time": {"before_": "2030-13-45"}}}),
        expected_status=422,
    )
    assert ["body", "flow_runs", "start_time", "before_"] in [d["loc"] for d in payload["exception_detail"]]
    payload = assert_json_error(
        *fetch(
            server,
            "POST",
            f"/api/flow_runs/{flow_run['id']}/set_state",
            {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": "soon"}}},
        ),
        expected_status=422,
    )
    locs = [d["loc"] for d in payload["exception_detail"]]
    assert any(loc[-1] == "scheduled_time" for loc in locs), locs
    payload = assert_json_error(
        *fetch(
            server,
            "POST",
            "/api/flow_runs/history",
            {"history_start": "not a date", "history_end": "2030-01-01T00:00:00Z", "history_interval_seconds": 60},
        ),
        expected_status=422,
    )
    assert_422_naming(payload, ["body", "history_start"])


def test_unknown_enum_values_are_named(server, flow_run):
    payload = assert_json_error(
        *fetch(server, "POST", f"/api/flow_runs/{flow_run['id']}/set_state", {"state": {"type": "EXPLODED"}}),
        expected_status=422,
    )
    assert_422_naming(payload, ["body", "state", "type"])
    payload = assert_json_error(
        *fetch(server, "POST", "/api/flow_runs/filter", {"sort": "RANDOM"}), expected_status=422
    )
    assert_422_naming(payload, ["body", "sort"])
    payload = assert_json_error(
        *fetch(server, "POST", "/api/flow_runs/filter", {"flow_runs": {"operator": "xor_"}}), expected_status=422
    )
    locs = [d["loc"] for d in payload["exception_detail"]]
    assert ["body", "flow_runs", "operator"] in locs, locs


def test_negative_limits_and_offsets_are_named(server):
    for path in ("/api/flows/filter", "/api/flow_runs/filter", "/api/task_runs/filter", "/api/logs/filter"):
        payload = assert_json_error(*fetch(server, "POST", path, {"limit": -1}), expected_status=422)
        assert_422_naming(payload, ["body", "limit"])
        payload = assert_json_error(*fetch(server, "POST", path, {"offset": -5}), expected_status=422)
        assert_422_naming(payload, ["body", "offset"])


@pytest.mark.parametrize("depth", [100, 10_000, 200_000])
def test_deeply_nested_json_is_422_not_500(server, depth):
    for raw in (
        b"[" * depth + b"]" * depth,
        b'{"name": "x", "tags": ' + b"[" * depth + b"]" * depth + b"}",
        b'{"a":' * depth + b"1" + b"}" * depth,
    ):
        status, headers, body = fetch(server, "POST", "/api/flows/", raw)
        payload = assert_json_error(status, headers, body, expected_status=422)
        assert payload["exception_detail"][0]["loc"][0] == "body"


def test_deep_but_reasonable_parameters_are_accepted(server, flow_run):
    nested = {"level": 1}
    for _ in range(20):
        nested = {"child": nested}
    status, _, body = fetch(
        server, "POST", "/api/flow_runs/", {"flow_id": flow_run["flow_id"], "parameters": {"config": nested}}
    )
    assert status == 201, body


OUT_OF_RANGE = [
    ("/api/flows/filter", b'{"limit": 1e400}', ["body", "limit"]),
    ("/api/flows/filter", b'{"offset": 1e400}', ["body", "offset"]),
    ("/api/flows/filter", b'{"offset": 99999999999999999999999999}', ["body", "offset"]),
    ("/api/flows/filter", b'{"limit": NaN}', ["body", "limit"]),
    (
        "/api/logs/",
        b'[{"name": "n", "level": 1e300, "message": "m", "timestamp": "2030-01-01T00:00:00Z"}]',
        ["body", 0, "level"],
    ),
    (
        "/api/logs/",
        b'[{"name": "n", "level": 99999999999999999999999999, "message": "m", "timestamp": "2030-01-01T00:00:00Z"}]',
        ["body", 0, "level"],
    ),
]


@pytest.mark.parametrize("path, raw, loc", OUT_OF_RANGE, ids=[r[1][:40].decode() for r in OUT_OF_RANGE])
def test_out_of_range_numbers_are_422_not_500(server, path, raw, loc):
    status, headers, body = fetch(server, "POST", path, raw)
    payload = assert_json_error(status, headers, body, expected_status=422)
    assert_422_naming(payload, loc)


@pytest.mark.parametrize("seconds", [0, -60, 1e-9, 1e308])
def test_history_with_absurd_intervals_is_not_500(server, seconds):
    status, headers, body = fetch(
        server,
        "POST",
        "/api/flow_runs/history",
        {
            "history_start": "2030-01-01T00:00:00Z",
            "history_end": "2030-01-02T00:00:00Z",
            "history_interval_seconds": seconds,
        },
    )
    assert status in (200, 422), (seconds, status, body)


@pytest.mark.parametrize(
    "path, raw",
    [
        ("/api/flows/", b'{"name": "\\ud800"}'),
        ("/api/flows/filter", b'{"flows": {"name": {"any_": ["\\udfff"]}}}'),
        ("/api/flow_runs/", b'{"flow_id": "not-a-uuid", "name": "\\ud800"}'),
    ],
    ids=["create", "filter", "invalid-create"],
)
def test_lone_surrogates_in_json_strings_are_not_500(server, path, raw):
    try:
        status, headers, body = fetch(server, "POST", path, raw)
    except (http.client.HTTPException, OSError) as exc:
        pytest.fail(f"the server dropped the connection without an answer: {exc!r}")
    assert status < 500, (path, status, body[:200])
    assert headers.get("content-type", "").startswith("application/json")
    json.loads(body)


# --- body size ---------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413(tmp_path):
    with prefectlite.serve(database=f"sqlite:///{tmp_path}/b.db", PREFECT_SERVER_MAX_BODY_BYTES=1000) as api_url:
        small = {"name": "small", "tags": ["t" * 100]}
        assert fetch(api_url, "POST", "/api/flows/", small)[0] == 201
        big = {"name": "big", "tags": ["t" * 2000]}
        payload = assert_json_error(*fetch(api_url, "POST", "/api/flows/", big), expected_status=413)
        assert payload["detail"]
        logs = [{"name": "n", "level": 20, "message": "m" * 100, "timestamp": "2030-01-01T00:00:00Z"}] * 20
        assert_json_error(*fetch(api_url, "POST", "/api/logs/", logs), expected_status=413)
        # a huge announced length is refused before anything is read
        data = raw_exchange(
            api_url,
            b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000000\r\n\r\n{",
        )
        status, headers, body = parse_raw_response(data)
        assert status == 413, data[:300]
        chunked = (
            b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n" + b"800\r\n" + b"x" * 2048 + b"\r\n0\r\n\r\n"
        )
        status, headers, body = parse_raw_response(raw_exchange(api_url, chunked))
        assert status == 413
        assert Client(api_url).get("/health") == (200, True)


def test_chunked_request_bodies_are_read(server):
    body = json.dumps({"name": "chunky"}).encode()
    request = (
        b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\n\r\n"
        + b"%x\r\n" % 5
        + body[:5]
        + b"\r\n"
        + b"%x\r\n" % (len(body) - 5)
        + body[5:]
        + b"\r\n0\r\n\r\n"
    )
    status, headers, payload = parse_raw_response(raw_exchange(server, request))
    assert status == 201, payload
    assert json.loads(payload)["name"] == "chunky"


# --- basic auth --------------------------------------------------------------------------------


def test_basic_auth(tmp_path):
    with prefectlite.serve(database=f"sqlite:///{tmp_path}/a.db", PREFECT_SERVER_API_AUTH_STRING="me:pw") as api_url:
        for headers in (
            {},
            {"Authorization": basic("me:wrong")},
            {"Authorization": basic("you:pw")},
            {"Authorization": "Basic !!!not-base64!!!"},
            {"Authorization": "Bearer me:pw"},
            {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe").decode()},
        ):
            status, hdrs, body = fetch(api_url, "GET", "/api/flows/count", headers=headers)
            assert status == 401, (headers, status, body)
            assert hdrs.get("www-authenticate", "").lower().startswith("basic"), hdrs
            assert_json_error(status, hdrs, body)
            assert fetch(api_url, "POST", "/api/flows/", {"name": "sneaky"}, headers=headers)[0] == 401
        good = {"Authorization": basic("me:pw")}
        assert fetch(api_url, "POST", "/api/flows/count", {}, headers=good)[:1] == (200,)
        status, _, body = fetch(api_url, "POST", "/api/flows/", {"name": "allowed"}, headers=good)
        assert status == 201, body
        assert json.loads(fetch(api_url, "POST", "/api/flows/count", {}, headers=good)[2]) == 1  # sneaky never got in
        # health is exempt so that probes work without credentials
        status, _, body = fetch(api_url, "GET", "/api/health")
        assert (status, body) == (200, b"true")


def test_no_auth_required_when_no_auth_string_is_set(server):
    assert fetch(server, "POST", "/api/flows/count", {})[0] == 200
    assert fetch(server, "GET", "/api/health")[0] == 200


# --- CORS --------------------------------------------------------------------------------------


def test_cors_headers_for_any_origin_by_default(server):
    status, headers, _ = fetch(server, "GET", "/api/health", headers={"Origin": "http://ui.example"})
    assert status == 200
    assert headers.get("access-control-allow-origin") in ("*", "http://ui.example")
    status, headers, _ = fetch(
        server,
        "OPTIONS",
        "/api/flows/",
        headers={
            "Origin": "http://ui.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert 200 <= status < 300, status
    assert headers.get("access-control-allow-origin") in ("*", "http://ui.example")
    assert "POST" in headers.get("access-control-allow-methods", "")
    allowed_headers = headers.get("access-control-allow-headers", "").lower()
    assert allowed_headers == "*" or "content-type" in allowed_headers


def test_cors_only_for_allowed_origins(tmp_path):
    with prefectlite.serve(
        database=f"sqlite:///{tmp_path}/o.db",
        PREFECT_SERVER_CORS_ALLOWED_ORIGINS="http://good.example,http://also.example",
    ) as api_url:
        status, headers, _ = fetch(api_url, "GET", "/api/health", headers={"Origin": "http://good.example"})
        assert status == 200
        assert headers.get("access-control-allow-origin") == "http://good.example"
        assert "origin" in headers.get("vary", "").lower()
        status, headers, _ = fetch(api_url, "GET", "/api/health", headers={"Origin": "http://also.example"})
        assert headers.get("access-control-allow-origin") == "http://also.example"
        status, headers, _ = fetch(api_url, "GET", "/api/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in headers
        status, headers, _ = fetch(api_url, "GET", "/api/health")
        assert "access-control-allow-origin" not in headers


def test_cors_preflight_needs_no_credentials(tmp_path):
    with prefectlite.serve(database=f"sqlite:///{tmp_path}/p.db", PREFECT_SERVER_API_AUTH_STRING="me:pw") as api_url:
        status, headers, _ = fetch(
            api_url,
            "OPTIONS",
            "/api/flows/filter",
            headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"},
        )
        assert 200 <= status < 300, status
        assert headers.get("access-control-allow-origin")
        status, headers, _ = fetch(api_url, "GET", "/api/flows/count", headers={"Origin": "http://ui.example"})
        assert status in (401, 405)
        assert headers.get("access-control-allow-origin"), "errors carry CORS headers so the browser can read them"


# --- static files ------------------------------------------------------------------------------


def test_root_serves_html(server):
    status, headers, body = fetch(server, "GET", "/")
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert b"<html" in body.lower() or b"<!doctype html" in body.lower()


def test_client_side_routes_serve_the_index(server):
    status, headers, body = fetch(server, "GET", "/flow-runs/some-id")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert body == fetch(server, "GET", "/")[2].replace(b'<base href="./">', b'<base href="../">')


def test_a_missing_asset_is_404(server):
    assert_json_error(*fetch(server, "GET", "/js/does-not-exist.js"), expected_status=404)


def test_ui_settings_is_json(server):
    status, headers, body = fetch(server, "GET", "/ui-settings")
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    settings = json.loads(body)
    assert settings["api_url"]
    assert settings["csrf_enabled"] is False


SECRETS_OUTSIDE_STATIC = (
    b"root:x:0:0",
    b"root:*:0:0",
    b"prefectlite: a self-hosted",
    b"import prefectlite",
    b"CREATE TABLE",
)


@pytest.mark.parametrize(
    "path",
    [
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/static/../prefectlite.py",
        "/../prefectlite.py",
        "/%2e%2e/prefectlite.py",
        "/..%2fprefectlite.py",
        "/%2e%2e%2fprefectlite.py",
        "/js/../../prefectlite.py",
        "/js/%2e%2e/%2e%2e/prefectlite.py",
        "/..%5cprefectlite.py",
        "/%2e%2e/migrations/0001_initial.sqlite.up.sql",
        "/....//....//etc/passwd",
        "//etc/passwd",
        "/%252e%252e/prefectlite.py",
        "/..;/prefectlite.py",
        "/ui-settings/../../prefectlite.py",
        "/%00",
        "/index.html%00.js",
        "/%2e%2e%00/prefectlite.py",
        "/" + "../" * 20 + "etc/passwd",
        "/%c0%ae%c0%ae/prefectlite.py",
    ],
)
def test_path_traversal_never_leaks_files_outside_static(server, path):
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    status, headers, body = parse_raw_response(raw_exchange(server, request))
    assert status != 500 and status < 600, (path, status)
    for secret in SECRETS_OUTSIDE_STATIC:
        assert secret not in body, (path, secret)
    if status == 200:
        index = ROOT / "static" / "index.html"
        if index.is_file():  # nothing but the UI's own page (its <base> written for the path's depth)
            assert re.sub(rb'<base href="(\.\./)*(\./)?">', b'<base href="./">', body) == index.read_bytes(), path


@pytest.mark.parametrize(
    "path, base",
    [
        ("/", "./"),
        ("/flows", "./"),
        ("/flows/", "../"),
        ("/flow-runs/flow-run/0a1b", "../../"),
        ("/runs/task-run/0a1b", "../../"),
        ("/work-pools/work-pool/pool.v2", "../../"),
        ("/blocks/catalog/slack-webhook/create", "../../../"),
    ],
)
def test_page_paths_answer_the_index_with_a_base_back_to_the_root(server, path, base):
    """The UI routes on paths (as Prefect's UI does): each page path gets index.html, whose <base> leads back
    to the root by a relative path, so its assets load from any depth and behind a prefixing proxy."""
    status, headers, body = fetch(server, "GET", path)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert f'<base href="{base}">'.encode() in body
    assert b'href="css/app.css"' in body


@pytest.mark.parametrize("path", ["/js/missing.js", "/css/missing.css", "/favicon.ico", "/js/pages/missing.js"])
def test_missing_assets_are_404_not_the_index(server, path):
    assert_json_error(*fetch(server, "GET", path), expected_status=404)


def test_static_files_are_served_with_their_type(server):
    static = ROOT / "static"
    css = sorted(static.rglob("*.css"))
    if not css:
        pytest.skip("no stylesheet in static/")
    relative = css[0].relative_to(static).as_posix()
    status, headers, body = fetch(server, "GET", "/" + relative)
    assert status == 200
    assert headers["content-type"].startswith("text/css")
    assert body == css[0].read_bytes()


# --- malformed requests on a raw socket --------------------------------------------------------

MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET / FTP/1.0\r\nHost: x\r\n\r\n",
    b"\x00\x01\x02\x03\r\n\r\n",
    b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
    b"GET /api/health HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + b"\r\n",
    b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
    b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nnot-hex\r\n",
    b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n",
    b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n",
    b'POST /api/flows/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"name"',
    b"GET /api/flows/%zz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /api/flows/name/%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /api/health?%zz=%%%&a=\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://other.example/api/health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"BREW /api/health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /api/health HTTP/1.1\r\nHost: x\r\nAuthorization: Basic \xff\xff\r\n\r\n",
    b"GET /api/health HTTP/1.1\r\nHost: x\r\nOrigin: \xff\xfe\r\n\r\n",
    b"GET /api/health HTTP/1.1\r\n Folded: header\r\n\r\n",
    b"GET /api/health HTTP/1.1\r\nNoColonHere\r\n\r\n",
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", MALFORMED, ids=lambda r: repr(r[:40]))
def test_malformed_requests_get_a_proper_answer(server, request_bytes):
    data = raw_exchange(server, request_bytes)
    status, headers, body = parse_raw_response(data)
    assert status != 500 and status < 600, (status, data[:300])
    if status >= 400:
        assert headers.get("content-type", "").startswith("application/json"), data[:300]
        json.loads(body)
    assert Client(server).get("/health") == (200, True)  # and the server is still fine


OBS_FOLD = "Obsolete line folding (a header continued on the next line) is not accepted"  # RFC 9112, 5.2


@pytest.mark.parametrize(
    "request_bytes, status, detail",
    [
        (b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", 431, "Line too long"),
        (
            b"GET /api/health HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n",
            431,
            "Too many headers",
        ),
        (b"GET /api/health HTTP/1.1\r\nNoColonHere\r\n\r\n", 400, "Malformed header line"),
        (b"GET /api/health HTTP/1.1\r\nBad Name: v\r\n\r\n", 400, "Malformed header line"),
        (b"GET /api/health HTTP/1.1\r\n Folded: first\r\n\r\n", 400, OBS_FOLD),
        (b"GET /api/health HTTP/1.1\r\nX-Note: first\r\n\t second\r\n\r\n", 400, OBS_FOLD),
        (
            b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 20\r\n\r\n{}",
            400,
            "Conflicting Content-Length headers",
        ),
        (b"GET /api/health HTTP/2.0\r\nHost: x\r\n\r\n", 505, "Invalid HTTP version (2.0)"),
        (b"GET /api/health\r\n\r\n", 400, "Bad request syntax ('GET /api/health')"),
    ],
)
def test_header_and_request_line_errors_are_named(server, request_bytes, status, detail):
    got, headers, body = parse_raw_response(raw_exchange(server, request_bytes))
    assert (got, json.loads(body)) == (status, {"detail": detail})
    assert headers.get("content-type", "").startswith("application/json")


def test_header_names_are_case_insensitive(server):
    data = raw_exchange(
        server, b"GET /api/health HTTP/1.1\r\nhost: x\r\nx-REQUEST-id: my-id.1\r\nConnection: close\r\n\r\n"
    )
    status, headers, body = parse_raw_response(data)
    assert (status, json.loads(body), headers["x-request-id"]) == (200, True, "my-id.1")
    same = prefectlite.RequestHeaders([("X-Note", "first second"), ("x-note", "again")])
    assert (same.get("x-NOTE"), same["X-Note"], same.get_all("X-NOTE"), "x-note" in same, same.get("nope", 1)) == (
        "first second",
        "first second",
        ["first second", "again"],
        True,
        1,
    )


def test_a_silent_client_does_not_block_others(server):
    with socket.create_connection(host_port(server), timeout=10) as idle:
        idle.sendall(b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        for _ in range(5):
            assert Client(server).get("/health") == (200, True)


def test_a_write_that_trickles_in_does_not_hold_up_other_writes(server):
    with socket.create_connection(host_port(server), timeout=10) as slow:
        slow.sendall(
            b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{"
        )
        writer = Client(server, timeout=5)
        for i in range(5):
            status, flow = writer.post("/flows/", {"name": f"beside-a-slow-writer-{i}"})
            assert status == 201, flow


def test_a_client_that_does_not_read_its_answers_does_not_hold_up_other_writes(server):
    """Small pipelined writes with big answers (runs of a deployment with 1 MB of default parameters) on a
    socket that is never read: the server's sends block, and everyone else's writes must go on (they would
    wait for the 15 s send timeout otherwise)."""
    client = Client(server, timeout=5)
    flow = client.ok("POST", "/flows/", {"name": "unread"})
    deployment = client.ok(
        "POST", "/deployments/", {"name": "big", "flow_id": flow["id"], "parameters": {"blob": "x" * 1_000_000}}
    )
    request = (
        b"POST /api/deployments/%s/create_flow_run HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}" % deployment["id"].encode()
    )
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the answers pile up
    stuck.connect(host_port(server))
    sender = threading.Thread(target=lambda: _send_quietly(stuck, request * 40), daemon=True)
    sender.start()
    try:
        counts = []

        def server_stuck_sending():  # its runs stop growing: the server waits to send it an answer
            status, count = client.post("/flow_runs/count", {"flows": {"id": {"any_": [flow["id"]]}}})
            counts.append(count)
            return status == 200 and count >= 1 and counts[-4:] == [count] * 4

        wait_until(server_stuck_sending, 30, "the server to be stuck on the unread client", interval=0.3)
        assert counts[-1] < 40
        for i in range(5):
            status, other = client.post("/flows/", {"name": f"beside-an-unread-client-{i}"})
            assert status == 201, other
    finally:
        stuck.close()


def _send_quietly(sock, data):
    with contextlib.suppress(OSError):
        sock.sendall(data)


def test_the_write_turnstile_lets_threads_through_in_the_order_they_came():
    turnstile = prefectlite._Turnstile()
    order, threads = [], []
    turnstile.__enter__()
    for i in range(6):
        thread = threading.Thread(target=lambda i=i: (turnstile.__enter__(), order.append(i), turnstile.__exit__()))
        thread.start()
        threads.append(thread)
        wait_until(lambda: len(turnstile._waiting) == i + 1, 10, f"thread {i} to queue")
    turnstile.__exit__()
    for thread in threads:
        thread.join(10)
    assert order == list(range(6))
    with turnstile:  # free again
        assert turnstile._busy


# --- nothing answers 500 -----------------------------------------------------------------------

FUZZ_BODIES = [
    None,
    b"",
    b"{}",
    b"[]",
    b"null",
    b'"text"',
    b"123",
    b"true",
    b"{bad",
    b'{"name": null, "flow_id": null, "state": null, "tags": null, "limit": null, "offset": null}',
    b'{"name": 1, "tags": [1], "state": {"type": "RUNNING", "state_details": []}, "limit": "x"}',
    b'{"state": {"type": "RUNNING", "state_details": {"scheduled_time": 5, "cache_key": []}}}',
    b'{"flows": [], "flow_runs": "x", "task_runs": {"id": {"any_": "x"}}, "sort": 5}',
    b'{"history_start": "2030-01-01", "history_end": "2029-01-01", "history_interval_seconds": 60}',
    b'{"limit": -1, "offset": -1}',
    b'[{"name": "n"}]',
    b'{"value": {"nested": [1, {"x": null}]}}',
    b'{"limit": 1e400, "offset": 1e400, "value": 1e400}',
    b'{"offset": 99999999999999999999999999}',
    b'{"name": "\\ud800", "key": "\\udfff", "tag": "\\ud800"}',
]


def _fill(pattern, value):
    return re.sub(r"\{\w+\}", value, pattern)


def test_no_route_answers_500_to_odd_input(server, client, flow_run):
    task_run = client.ok("POST", "/task_runs/", {"flow_run_id": flow_run["id"], "task_key": "k", "dynamic_key": "0"})
    values = [flow_run["id"], task_run["id"], str(uuid.uuid4()), "not-a-uuid", "%00", "%ff"]
    conn = http.client.HTTPConnection(*host_port(server), timeout=30)
    failures = {}  # (method, route, body) -> what happened
    try:
        for method, pattern, _handler in prefectlite.ROUTES:
            for value in values if "{" in pattern else values[:1]:
                path = "/api" + _fill(pattern, value)
                for body in FUZZ_BODIES:
                    try:
                        status, headers, payload = fetch(server, method, path, body, conn=conn)
                    except (http.client.HTTPException, OSError) as exc:
                        failures.setdefault((method, pattern, body), f"{path}: no answer ({type(exc).__name__})")
                        conn.close()
                        conn = http.client.HTTPConnection(*host_port(server), timeout=30)
                        continue
                    if status >= 500:
                        failures.setdefault((method, pattern, body), f"{path}: {status} {payload[:80]!r}")
                    if headers.get("connection", "").lower() == "close":
                        conn.close()
                        conn = http.client.HTTPConnection(*host_port(server), timeout=30)
    finally:
        conn.close()
    report = [f"{m} {p} body={b!r}: {what}" for (m, p, b), what in sorted(failures.items(), key=str)]
    assert not report, f"{len(report)} route/body pairs fail:\n" + "\n".join(report[:60])


def test_only_non_loopback_peers_get_compressed_responses():
    # over loopback compression costs CPU and saves nothing; remote clients get gzip above 4 KiB
    assert prefectlite._is_loopback("127.0.0.1") and prefectlite._is_loopback("::1")
    assert not prefectlite._is_loopback("10.1.2.3") and not prefectlite._is_loopback("192.168.0.7")
