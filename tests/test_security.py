"""Access control and secrets, against real `python prefectlite.py start` processes: basic auth on every
route and the UI, CSRF tokens, CORS settings, the address a server binds by default, the warning for an
open bind without auth, and secrets that must never reach logs, error bodies or /api/admin/settings.

Complements tests/test_http.py (basic auth basics, CORS basics), which is not repeated here.
"""

import base64
import datetime as dt
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
import uuid

import pytest

from helpers import ROOT, database_outage, free_port, run_cli, wait_for_health, wait_until

TIMEOUT = 20.0


# --- helpers -----------------------------------------------------------------------------------


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class ServerProcess:
    """`python prefectlite.py start ARGS` with its output in files; stopped by the `servers` fixture."""

    def __init__(self, tmp_path, args=(), port=None, **settings):
        self.port = port or free_port()
        home = tmp_path / f"home-{self.port}"
        home.mkdir(exist_ok=True)
        settings.setdefault("PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite:///{tmp_path}/sec-{self.port}.db")
        self.out_path = tmp_path / f"server-{self.port}.out"
        self.err_path = tmp_path / f"server-{self.port}.err"
        if "--port" not in args and "PREFECT_SERVER_API_PORT" not in settings:
            args = (*args, "--port", str(self.port))
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "prefectlite.py"), "start", *args],
                env=clean_env(PREFECT_HOME=home, **settings),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        self.url = f"http://127.0.0.1:{self.port}"  # all traffic goes to loopback, whatever the bind address
        self.api_url = self.url + "/api"

    def wait_ready(self):
        if not wait_for_health(self.api_url, timeout=60):
            self.stop()
            raise AssertionError(f"server did not become healthy:\n{self.stderr()[-3000:]}")
        return self

    def stdout(self):
        return self.out_path.read_text(errors="replace")

    def stderr(self):
        return self.err_path.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode


@pytest.fixture
def servers(tmp_path):
    started = []

    def start(*args, port=None, wait=True, **settings):
        server = ServerProcess(tmp_path, args, port, **settings)
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in started:
        server.stop()


def fetch(base_url, method, path, body=None, headers=None):
    """One request on its own connection to the server's root URL; (status, lower-cased headers, bytes)."""
    parts = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def fetch_json(base_url, method, path, body=None, headers=None, expect=(200, 201, 204)):
    status, _, data = fetch(base_url, method, path, body, headers)
    assert status in expect, (method, path, status, data[:300])
    return json.loads(data) if data else None


def basic(user_pw):
    return "Basic " + base64.b64encode(user_pw.encode()).decode()


def every_operation(server_url, headers=None):
    """(method, path pattern) of every operation in the server's own OpenAPI document."""
    doc = fetch_json(server_url, "GET", "/api/openapi.json", headers=headers)
    return [(method.upper(), path) for path, ops in doc["paths"].items() for method in ops]


def concrete(pattern, value=None):
    value = value or str(uuid.uuid4())
    return re.sub(r"\{\w+\}", value, pattern)


# --- basic auth --------------------------------------------------------------------------------

AUTH = "admin:pa55:word-with-colon"
WRONG_CREDENTIALS = {
    "missing": {},
    "wrong password": {"Authorization": basic("admin:pa55")},
    "wrong user": {"Authorization": basic("root:pa55:word-with-colon")},
    "password only": {"Authorization": basic("pa55:word-with-colon")},
    "case changed": {"Authorization": basic("ADMIN:PA55:WORD-WITH-COLON")},
    "trailing junk": {"Authorization": basic(AUTH + "x")},
    "empty basic": {"Authorization": "Basic "},
    "bearer": {"Authorization": "Bearer " + AUTH},
    "raw string": {"Authorization": AUTH},
}


def test_basic_auth_guards_every_api_route_and_the_ui(servers):
    server = servers(PREFECT_SERVER_API_AUTH_STRING=AUTH)
    good = {"Authorization": basic(AUTH)}
    operations = every_operation(server.url, good)
    assert len(operations) > 100
    guarded = [(m, p) for m, p in operations if p not in ("/api/health", "/api/ready")]
    ui = [
        ("GET", "/"),
        ("GET", "/ui-settings"),
        ("GET", "/flow-runs/some-id"),
        ("HEAD", "/"),
        ("GET", "/index.html"),
        ("GET", "/favicon.svg"),
    ]
    counts_before = {
        kind: fetch_json(server.url, "POST", f"/api/{kind}/count", {}, good)
        for kind in ("flows", "flow_runs", "deployments", "block_documents", "variables", "work_pools")
    }

    leaks, wrong = [], []
    for method, pattern in guarded + ui:
        path = concrete(pattern)
        for label, headers in WRONG_CREDENTIALS.items():
            status, hdrs, body = fetch(
                server.url, method, path, {"name": "sneaky"} if method != "GET" else None, headers
            )
            if status != 401 or not hdrs.get("www-authenticate", "").lower().startswith("basic"):
                wrong.append((method, pattern, label, status))
            if b"pa55" in body or b"word-with-colon" in body:
                leaks.append((method, pattern, label))
    assert not wrong, (
        f"{len(wrong)} requests without the right credentials were not a 401 with a challenge: {wrong[:20]}"
    )
    assert not leaks, leaks[:10]

    # with the right credentials nothing is a 401
    refused = []
    for method, pattern in guarded + ui:
        status, _, _ = fetch(server.url, method, concrete(pattern), None, good)
        if status == 401:
            refused.append((method, pattern))
    assert not refused, refused[:20]
    status, headers, body = fetch(server.url, "GET", "/", headers=good)
    assert status == 200 and headers["content-type"].startswith("text/html")
    settings = fetch_json(server.url, "GET", "/ui-settings", headers=good)
    assert settings["auth"] == "BASIC"
    assert "pa55" not in json.dumps(settings)

    # health is exempt, so that probes work without credentials
    assert fetch(server.url, "GET", "/api/health")[::2] == (200, b"true")
    # nothing the refused requests asked for happened
    counts_after = {kind: fetch_json(server.url, "POST", f"/api/{kind}/count", {}, good) for kind in counts_before}
    assert counts_after == counts_before


def test_a_refused_request_with_a_large_body_is_still_a_clean_401(servers):
    server = servers(PREFECT_SERVER_API_AUTH_STRING=AUTH)
    body = json.dumps([{"name": "n", "level": 20, "message": "m" * 1000, "timestamp": "2030-01-01T00:00:00Z"}] * 500)
    for _ in range(3):  # the connection's unread body must not spill into the next request
        status, headers, data = fetch(server.url, "POST", "/api/logs/", body.encode())
        assert status == 401, (status, data[:200])
        assert json.loads(data)["detail"]
    assert fetch(server.url, "POST", "/api/logs/filter", {}, {"Authorization": basic(AUTH)})[0] == 200


# --- CSRF ---------------------------------------------------------------------------------------


def csrf_token(server, client_id, headers=None):
    payload = fetch_json(server.url, "GET", f"/api/csrf-token?client={urllib.parse.quote(client_id)}", headers=headers)
    assert payload["client"] == client_id and len(payload["token"]) >= 32, payload
    return payload


def csrf_headers(token, client_id):
    return {"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": client_id}


def assert_403(server, method, path, body, headers):
    status, hdrs, data = fetch(server.url, method, path, body, headers)
    assert status == 403, (method, path, headers, status, data[:200])
    assert hdrs["content-type"].startswith("application/json")
    assert json.loads(data)["detail"]


def test_csrf_tokens_are_required_for_writes(servers):
    server = servers(PREFECT_SERVER_CSRF_PROTECTION_ENABLED="True")
    assert fetch_json(server.url, "GET", "/ui-settings")["csrf_enabled"] is True
    status, _, data = fetch(server.url, "GET", "/api/csrf-token")
    assert status == 422, data  # a client id is required
    mine = csrf_token(server, "browser-tab-1")
    theirs = csrf_token(server, "browser-tab-2")
    assert mine["token"] != theirs["token"]

    body = {"name": "csrf-flow"}
    for headers in (
        {},
        {"Prefect-Csrf-Token": mine["token"]},
        {"Prefect-Csrf-Client": "browser-tab-1"},
        csrf_headers("0" * 64, "browser-tab-1"),
        csrf_headers(mine["token"], "browser-tab-2"),
        csrf_headers(theirs["token"], "browser-tab-1"),
        csrf_headers(mine["token"].upper(), "browser-tab-1"),
        csrf_headers(mine["token"], ""),
    ):
        assert_403(server, "POST", "/api/flows/", body, headers)

    # reads need no token
    assert fetch(server.url, "GET", "/api/health")[0] == 200
    assert fetch(server.url, "GET", "/api/admin/version")[0] == 200
    assert fetch(server.url, "GET", f"/api/flows/{uuid.uuid4()}")[0] == 404

    # the right pair works for POST, PATCH and DELETE
    good = csrf_headers(mine["token"], "browser-tab-1")
    status, _, data = fetch(server.url, "POST", "/api/flows/", body, good)
    assert status == 201, data
    flow = json.loads(data)
    assert fetch(server.url, "GET", f"/api/flows/{flow['id']}")[0] == 200
    assert fetch(server.url, "PATCH", f"/api/flows/{flow['id']}", {"tags": ["x"]}, good)[0] == 204
    assert_403(server, "DELETE", f"/api/flows/{flow['id']}", None, {})
    assert fetch(server.url, "POST", "/api/flows/count", {}, good)[2] == b"1"  # nothing refused got in
    assert fetch(server.url, "DELETE", f"/api/flows/{flow['id']}", None, good)[0] == 204

    # a new token for the same client replaces the old one
    renewed = csrf_token(server, "browser-tab-1")
    assert_403(server, "POST", "/api/flows/", body, good)
    assert fetch(server.url, "POST", "/api/flows/", body, csrf_headers(renewed["token"], "browser-tab-1"))[0] == 201


def test_every_write_route_checks_the_csrf_token(servers):
    server = servers(PREFECT_SERVER_CSRF_PROTECTION_ENABLED="true")
    writes = [(m, p) for m, p in every_operation(server.url) if m in ("POST", "PUT", "PATCH", "DELETE")]
    assert len(writes) > 60
    unguarded = []
    for method, pattern in writes:
        status, _, data = fetch(server.url, method, concrete(pattern), {})
        if status != 403:
            unguarded.append((method, pattern, status, data[:100]))
    assert not unguarded, f"{len(unguarded)} write routes answered without a CSRF token: {unguarded[:20]}"


def test_an_expired_csrf_token_is_refused(servers):
    server = servers(PREFECT_SERVER_CSRF_PROTECTION_ENABLED="true", PREFECT_SERVER_CSRF_TOKEN_EXPIRATION="4")
    issued = csrf_token(server, "short-lived")
    headers = csrf_headers(issued["token"], "short-lived")
    assert fetch(server.url, "POST", "/api/flows/", {"name": "in-time"}, headers)[0] == 201
    expires = issued["expiration"].replace("Z", "+00:00")
    left = (dt.datetime.fromisoformat(expires) - dt.datetime.now(dt.timezone.utc)).total_seconds()
    wait_until(
        lambda: fetch(server.url, "POST", "/api/flows/", {"name": "too-late"}, headers)[0] == 403,
        max(0.0, left) + 30,
        "the token to expire",
        interval=0.2,
    )
    assert_403(server, "POST", "/api/flows/", {"name": "too-late"}, headers)
    assert (
        fetch(
            server.url,
            "POST",
            "/api/flows/",
            {"name": "fresh"},
            csrf_headers(csrf_token(server, "short-lived")["token"], "short-lived"),
        )[0]
        == 201
    )


def test_csrf_and_basic_auth_together(servers):
    server = servers(PREFECT_SERVER_CSRF_PROTECTION_ENABLED="true", PREFECT_SERVER_API_AUTH_STRING=AUTH)
    assert fetch(server.url, "GET", "/api/csrf-token?client=c")[0] == 401  # no token without credentials
    good = {"Authorization": basic(AUTH)}
    token = csrf_token(server, "c", good)["token"]
    assert fetch(server.url, "POST", "/api/flows/", {"name": "x"}, csrf_headers(token, "c"))[0] == 401
    assert_403(server, "POST", "/api/flows/", {"name": "x"}, good)
    assert fetch(server.url, "POST", "/api/flows/", {"name": "x"}, {**good, **csrf_headers(token, "c")})[0] == 201


# --- CORS ---------------------------------------------------------------------------------------


def test_cors_origins_from_the_environment(servers):
    server = servers(PREFECT_SERVER_CORS_ALLOWED_ORIGINS="https://a.example")
    allowed = {"Origin": "https://a.example"}
    for method, path, body in [
        ("GET", "/api/health", None),
        ("POST", "/api/flows/filter", {}),
        ("GET", "/api/no-such-route", None),
        ("POST", "/api/flows/", {"name": 5}),
        ("GET", "/", None),
        ("GET", "/ui-settings", None),
    ]:
        status, headers, _ = fetch(server.url, method, path, body, allowed)
        assert status < 500
        assert headers.get("access-control-allow-origin") == "https://a.example", (method, path, headers)
        assert "origin" in headers.get("vary", "").lower()
    for origin in (
        "https://b.example",
        "https://a.example.evil.test",
        "http://a.example",
        "https://a.example:8443",
        "null",
        "*",
    ):
        status, headers, _ = fetch(server.url, "GET", "/api/health", headers={"Origin": origin})
        assert status == 200
        assert "access-control-allow-origin" not in headers, (origin, headers)

    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    status, headers, _ = fetch(server.url, "OPTIONS", "/api/flows/", headers={**allowed, **preflight})
    assert 200 <= status < 300, status
    assert headers.get("access-control-allow-origin") == "https://a.example"
    assert "POST" in headers.get("access-control-allow-methods", "")
    status, headers, _ = fetch(
        server.url, "OPTIONS", "/api/flows/", headers={"Origin": "https://b.example", **preflight}
    )
    assert status < 500
    assert "access-control-allow-origin" not in headers


def test_cors_methods_and_headers_from_the_environment(servers):
    server = servers(
        PREFECT_SERVER_CORS_ALLOWED_ORIGINS="https://a.example,https://b.example",
        PREFECT_SERVER_CORS_ALLOWED_METHODS="GET,POST",
        PREFECT_SERVER_CORS_ALLOWED_HEADERS="content-type,x-custom-header",
    )
    status, headers, _ = fetch(
        server.url,
        "OPTIONS",
        "/api/flows/filter",
        headers={
            "Origin": "https://b.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-custom-header",
        },
    )
    assert 200 <= status < 300
    assert headers.get("access-control-allow-origin") == "https://b.example"
    methods = {m.strip().upper() for m in headers.get("access-control-allow-methods", "").split(",")}
    assert {"GET", "POST"} <= methods and "DELETE" not in methods, methods
    assert "x-custom-header" in headers.get("access-control-allow-headers", "").lower()


# --- where the server listens --------------------------------------------------------------------


def listening_addresses(port):
    result = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"ss is not usable here: {result.stderr.strip()}")
    return sorted({line.split()[3].rsplit(":", 1)[0] for line in result.stdout.splitlines() if line.strip()})


def non_loopback_addresses():
    result = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=30)
    found = re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", result.stdout)
    return [a for a in found if not a.startswith("127.")]


def test_the_server_binds_to_loopback_by_default(servers):
    port = free_port()
    server = servers(port=port, PREFECT_SERVER_API_PORT=port)  # no --host, no PREFECT_SERVER_API_HOST
    assert listening_addresses(port) == ["127.0.0.1"]
    for address in non_loopback_addresses():
        with socket.socket() as sock:
            sock.settimeout(5)
            assert sock.connect_ex((address, port)) != 0, f"reachable on {address}:{port}"
    assert "127.0.0.1" in server.stdout()
    assert "warning" not in server.stderr().lower()


@pytest.mark.parametrize("how", ["--host", "setting"])
def test_an_open_bind_without_auth_warns(servers, how):
    port = free_port()
    if how == "--host":
        server = servers("--host", "0.0.0.0", "--port", str(port), port=port)
    else:
        server = servers(port=port, PREFECT_SERVER_API_HOST="0.0.0.0", PREFECT_SERVER_API_PORT=port)
    assert listening_addresses(port) == ["0.0.0.0"]
    assert server.stop() == 0
    err = server.stderr()
    assert "warning" in err.lower() and "0.0.0.0" in err, err
    assert "PREFECT_SERVER_API_AUTH_STRING" in err


def test_an_open_bind_with_auth_does_not_warn(servers):
    port = free_port()
    server = servers("--host", "0.0.0.0", "--port", str(port), port=port, PREFECT_SERVER_API_AUTH_STRING=AUTH)
    assert fetch(server.url, "GET", "/api/flows/count")[0] == 401
    assert server.stop() == 0
    assert "without PREFECT_SERVER_API_AUTH_STRING" not in server.stderr()
    assert "pa55" not in server.stderr() + server.stdout()


# --- secrets never in logs, error bodies or settings ------------------------------------------


def _with_password(url, password):
    parts = urllib.parse.urlsplit(url)
    user = parts.username or "postgres"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port or 5432}"))


@pytest.mark.parametrize("password_in", ["url", "setting"])
def test_secrets_never_reach_logs_error_bodies_or_settings(servers, postgres_url, password_in, refusing_port):
    """The test database trusts local connections, so the password is sent but not checked."""
    secrets = {
        "auth": "AUTH-secret-b7e1",
        "db": "DBPASS-secret-4c2d",
        "slack": "SLACK-secret-path-91aa",
        "slack2": "SLACK-secret-updated-5d0e",
        "dead": "DEADHOOK-secret-0f3b",
        "webhook": "WEBHOOK-secret-token-77c9",
        "smtp": "SMTP-secret-password-3e8a",
        "block": "BLOCK-secret-value-a61f",
        "variable": "VARIABLE-secret-value-12cd",
    }
    auth = f"admin:{secrets['auth']}"
    settings = dict(
        PREFECT_SERVER_API_AUTH_STRING=auth,
        PREFECT_LOGGING_SERVER_LEVEL="DEBUG",
        PREFECT_API_DATABASE_ECHO="true",
        PREFECT_SERVER_METRICS_ENABLED="true",
        PREFECT_NOTIFICATIONS_MAX_ATTEMPTS=2,
        PREFECT_NOTIFICATIONS_RETRY_SECONDS=0.1,
        PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_LOOP_SECONDS=0.2,
    )
    if password_in == "url":
        settings["PREFECT_API_DATABASE_CONNECTION_URL"] = _with_password(postgres_url, secrets["db"])
    else:
        settings["PREFECT_API_DATABASE_CONNECTION_URL"] = postgres_url
        settings["PREFECT_API_DATABASE_PASSWORD"] = secrets["db"]
    server = servers(**settings)
    good = {"Authorization": basic(auth)}
    bodies = []  # every response body the API gave

    def call(method, path, body=None, headers=None, expect=None):
        status, hdrs, data = fetch(server.url, method, path, body, {**good, **(headers or {})})
        bodies.append((method, path, status, data))
        if expect is not None:
            assert status in expect, (method, path, status, data[:300])
        return json.loads(data) if data and hdrs.get("content-type", "").startswith("application/json") else data

    def block(slug, data, name=None):
        block_type = call("GET", f"/api/block_types/slug/{slug}", expect=(200,))
        schema = call(
            "POST",
            "/api/block_schemas/filter",
            {"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}},
            expect=(200,),
        )[0]
        return call(
            "POST",
            "/api/block_documents/",
            {
                "name": name or f"{slug}-{uuid.uuid4().hex[:6]}",
                "data": data,
                "block_type_id": block_type["id"],
                "block_schema_id": schema["id"],
            },
            expect=(201,),
        )

    # blocks with secret fields: built-in ones and one a client registers (as the SDK's Secret block does)
    slack = block("slack-webhook", {"url": f"https://hooks.slack.com/services/T0/B0/{secrets['slack']}"}, "slack-hook")
    block(
        "custom-webhook",
        {
            "name": "hook",
            "url": "https://example.invalid/hook",
            "json_data": {"text": "{{body}}", "auth": "{{token}}"},
            "secrets": {"token": secrets["webhook"]},
        },
    )
    block(
        "email-smtp",
        {
            "host": "127.0.0.1",
            "port": 1,
            "security": "none",
            "username": "mailer",
            "password": secrets["smtp"],
            "from_address": "a@b.c",
            "to_addresses": ["d@e.f"],
        },
    )
    own_type = call("POST", "/api/block_types/", {"name": "My Secret", "slug": "my-secret"}, expect=(201,))
    own_schema = call(
        "POST",
        "/api/block_schemas/",
        {
            "block_type_id": own_type["id"],
            "fields": {
                "title": "MySecret",
                "type": "object",
                "secret_fields": ["value"],
                "block_schema_references": {},
                "properties": {"value": {"title": "Value", "type": "string", "writeOnly": True, "format": "password"}},
                "required": ["value"],
            },
        },
        expect=(201,),
    )
    own = call(
        "POST",
        "/api/block_documents/",
        {
            "name": "my-secret",
            "data": {"value": secrets["block"]},
            "block_type_id": own_type["id"],
            "block_schema_id": own_schema["id"],
        },
        expect=(201,),
    )
    assert own["data"]["value"] != secrets["block"]
    # reading them back (without include_secrets), filtering, updating, a conflict, a missing one
    call("GET", f"/api/block_documents/{own['id']}", expect=(200,))
    call("POST", "/api/block_documents/filter", {}, expect=(200,))
    call("GET", "/api/block_types/slug/slack-webhook/block_documents", expect=(200,))
    call("GET", "/api/block_types/slug/slack-webhook/block_documents/name/slack-hook", expect=(200,))
    call(
        "PATCH",
        f"/api/block_documents/{slack['id']}",
        {"data": {"url": f"https://hooks.slack.com/services/T0/B0/{secrets['slack2']}"}},
        expect=(204,),
    )
    call(
        "POST",
        "/api/block_documents/",
        {
            "name": "slack-hook",
            "data": {"url": secrets["slack"]},
            "block_type_id": slack["block_type_id"],
            "block_schema_id": slack["block_schema_id"],
        },
        expect=(409,),
    )
    call("GET", f"/api/block_documents/{uuid.uuid4()}", expect=(404,))
    # a variable
    call("POST", "/api/variables/", {"name": "api_key", "value": secrets["variable"]}, expect=(201,))
    call("POST", "/api/variables/", {"name": "api_key", "value": secrets["variable"]}, expect=(409,))
    call("POST", "/api/variables/filter", {"variables": {"name": {"any_": ["api_key"]}}}, expect=(200,))
    # a notification that cannot be delivered: its failure is logged and kept, the URL must not be
    dead = block("slack-webhook", {"url": f"http://127.0.0.1:{refusing_port.port}/services/{secrets['dead']}"})
    call(
        "POST",
        "/api/flow_run_notification_policies/",
        {"state_names": ["Failed"], "tags": [], "block_document_id": dead["id"]},
        expect=(201,),
    )
    flow = call("POST", "/api/flows/", {"name": "secretive"}, expect=(201,))
    run = call("POST", "/api/flow_runs/", {"flow_id": flow["id"]}, expect=(201,))
    call("POST", f"/api/flow_runs/{run['id']}/set_state", {"state": {"type": "FAILED"}, "force": True}, expect=(201,))
    wait_until(
        lambda: call("GET", "/api/flow_run_notification_queue/?status=FAILED", expect=(200,)),
        60,
        "the undeliverable notification to end FAILED",
        interval=0.2,
    )
    # wrong credentials, and settings, metrics, the UI's settings
    fetch(server.url, "GET", "/api/flows/count", headers={"Authorization": basic("admin:" + secrets["auth"][:-1])})
    settings_view = call("GET", "/api/admin/settings", expect=(200,))
    assert settings_view["PREFECT_SERVER_API_AUTH_STRING"] != auth
    if password_in == "setting":
        assert settings_view["PREFECT_API_DATABASE_PASSWORD"] not in ("", secrets["db"])
    call("GET", "/api/metrics", expect=(200,))
    call("GET", "/ui-settings", expect=(200,))
    call("GET", "/api/ready", expect=(200,))
    # the database goes away: the 503s name a reason but not the password
    with database_outage(postgres_url.rsplit("/", 1)[1]):
        wait_until(
            lambda: call("POST", "/api/flows/count", {}) is None or bodies[-1][2] == 503,
            30,
            "a 503 while the database is away",
            interval=0.2,
        )
        call("POST", "/api/flows/", {"name": "during"}, expect=(503,))
        call("GET", "/api/ready", expect=(503,))
    wait_until(
        lambda: fetch(server.url, "POST", "/api/flows/count", {}, good)[0] == 200,
        60,
        "the server to recover",
        interval=0.2,
    )
    assert server.stop() == 0
    logs = server.stdout() + server.stderr()

    assert "SQL " in logs and " DEBUG " in logs, (
        "the server did not log at DEBUG with SQL echo; the test proves nothing"
    )
    for name, secret in secrets.items():
        assert secret not in logs, f"the {name} secret is in the server's log"
        if name == "variable":
            continue  # a variable's value is what the variables API returns; it only must not be logged
        for method, path, status, data in bodies:
            assert secret.encode() not in data, f"the {name} secret is in the answer to {method} {path} ({status})"


def test_the_command_line_never_prints_a_secret(tmp_path):
    auth, password, setting_pw = "admin:CLI-AUTH-secret-1a", "CLI-DB-secret-2b", "CLI-PW-setting-3c"
    env = {"PREFECT_HOME": str(tmp_path / "home")}
    outputs = []

    def cli(*args, extra=None, ok=True):
        result = run_cli(*args, env={**env, **(extra or {})}, timeout=60)
        outputs.append((args, result.stdout + result.stderr))
        if ok:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        else:
            assert result.returncode != 0 and "Traceback" not in result.stderr, (args, result.stderr)
        return result

    dead_port = free_port()  # nothing listens there
    cli(
        "config",
        "set",
        f"PREFECT_SERVER_API_AUTH_STRING={auth}",
        f"PREFECT_API_DATABASE_CONNECTION_URL=postgresql://postgres:{password}@127.0.0.1:{dead_port}/prefect",
    )
    cli("config", "set", f"PREFECT_API_DATABASE_PASSWORD={setting_pw}")
    cli("config", "view", "--show-sources", "--show-defaults")
    cli("profile", "inspect")
    cli("version")
    cli("start", "--port", str(free_port()), ok=False)  # the database is unreachable: one line, no secret
    cli("database", "current", ok=False)
    cli("database", "upgrade", "-y", ok=False)
    cli(
        "start",
        "--port",
        str(free_port()),
        ok=False,
        extra={"PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql://postgres:{password}@127.0.0.1:notaport/x"},
    )
    for args, text in outputs:
        for secret in (auth.split(":", 1)[1], password, setting_pw):
            assert secret not in text, (args, secret, text[:500])
