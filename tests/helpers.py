"""Test helpers shared by every test module (imported as `helpers`; fixtures live in conftest.py).

A uniquely named module: several conftest.py files exist below tests/, and `from conftest import ...`
would pick whichever pytest loaded last.
"""

import atexit
import base64
import contextlib
import datetime as dt
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

POSTGRES_URL = os.environ.get("PREFECTLITE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


class Client:
    """A tiny JSON client over urllib, so tests speak HTTP exactly as any client would."""

    def __init__(self, api_url, headers=None, timeout=30.0):
        self.api_url = api_url.rstrip("/")
        self.headers = headers or {}
        self.timeout = timeout  # seconds for one request; a test that must not hang uses a short one

    def request(self, method, path, body=None, headers=None, raw=None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(
            self.api_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", **self.headers, **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = resp.read()
                return resp.status, (json.loads(text) if text else None)
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                return exc.code, json.loads(text) if text else None
            except ValueError:
                return exc.code, text.decode("utf-8", "replace")

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body if body is not None else {}, **kw)

    def patch(self, path, body=None, **kw):
        return self.request("PATCH", path, body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def ok(self, method, path, body=None, expect=(200, 201, 204), headers=None):
        status, payload = self.request(method, path, body, headers=headers)
        assert status in expect, (method, path, status, payload)
        return payload


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_template_lock = threading.Lock()
_sqlite_template: Path | None = None


def migrated_sqlite_url(path) -> str:
    """A SQLite database at `path` (a new file) with every migration applied and the built-in block types,
    as a server's first start leaves it; its URL. A copy of one template made once per test process: ~1 ms,
    against ~40-50 ms (more on a busy machine) for each server to migrate a new file, and ~20 ms to write
    the block types (a server finds them there and only checks them). For tests of storage, not of migrating."""
    global _sqlite_template
    import prefectlite  # only when a test asks: helpers is imported before ROOT is on sys.path elsewhere

    with _template_lock:
        if _sqlite_template is None:
            folder = Path(tempfile.mkdtemp(prefix="prefectlite-template-"))
            atexit.register(shutil.rmtree, folder, True)
            template = folder / "migrated.db"
            db = prefectlite.open_database(f"sqlite:///{template}")
            try:
                prefectlite.migrate(db)
                with db.write() as tx:
                    prefectlite.install_builtin_block_types(tx)
            finally:
                db.close()  # the last connection folds the WAL in: the one file is the whole database
            _sqlite_template = template
    shutil.copyfile(_sqlite_template, path)
    return f"sqlite:///{path}"


class RefusingPort:
    """A loopback port that refuses connections and that nobody else (another test, another pytest-xdist
    worker) can take while it is held: bound, never listening. free_port()'s port is anyone's to take next,
    so a server retrying a delivery there may reach another test's receiver."""

    def __init__(self):
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]

    def release(self):
        """Let the port go: for a test that listens on it itself now."""
        self._sock.close()


def _postgres_admin_connect():
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed"
    try:
        return psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3), None
    except Exception as exc:  # noqa: BLE001
        return None, f"PostgreSQL unreachable at {POSTGRES_URL}: {exc}"


_compiled_lock = threading.Lock()
_compiled = False

# The installed `prefectlite` command (pyproject's [project.scripts]: prefectlite:main), run from ROOT.
CLI_COMMAND = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import prefectlite; sys.exit(prefectlite.main())"


def _compile_once():
    """Write prefectlite's bytecode once per test process, so that each CLI process imports it instead of
    compiling the whole module (~0.2 s idle, about half of a short command; a script is always compiled,
    and PYTHONDONTWRITEBYTECODE, where set, stops the import from writing it)."""
    global _compiled
    import py_compile  # only when a test runs the CLI

    with _compiled_lock:
        if not _compiled:
            py_compile.compile(str(ROOT / "prefectlite.py"), doraise=True)
            _compiled = True


def run_cli(*args, env=None, input_text=None, timeout=60):
    """Run the `prefectlite ARGS` command in a subprocess, as `pip install .` installs it (the same main()
    as `python prefectlite.py ARGS`, which ServerProcess runs); returns CompletedProcess."""
    _compile_once()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", CLI_COMMAND, *args],
        env=full_env,
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for_health(url, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT")}
    env.update(extra)
    return env


class ServerProcess:
    """`python prefectlite.py [server] start` in a subprocess; output goes to files (no pipe can fill up)."""

    def __init__(self, tmp_path, env, *extra_args, port=None, command=("start",), extra=(), blocked_signals=()):
        self.port = port or free_port()
        self.out_path = tmp_path / f"server-{self.port}.out"
        self.err_path = tmp_path / f"server-{self.port}.err"
        self._out = open(self.out_path, "w")
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "prefectlite.py"),
                *command,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *extra_args,
                *extra,
            ],
            env=clean_env(**env),
            stdout=self._out,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
            # a parent that blocks signals hands its mask down (kept across fork and exec)
            preexec_fn=(lambda: signal.pthread_sigmask(signal.SIG_BLOCK, blocked_signals)) if blocked_signals else None,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api"

    def wait_ready(self):
        if not wait_for_health(self.api_url, timeout=30):
            self.kill()
            raise AssertionError(f"server did not become healthy: {self.stderr()}")
        deadline = time.monotonic() + 30  # the banner is printed right after the port opens
        while "Press Ctrl+C" not in self.stdout() and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)

    def stop(self, signum=signal.SIGTERM):
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(30)
        finally:
            self._close_files()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._close_files()

    def _close_files(self):
        self._out.close()
        self._err.close()

    def stdout(self):
        if not self._out.closed:
            self._out.flush()
        return self.out_path.read_text()

    def stderr(self):
        if not self._err.closed:
            self._err.flush()
        return self.err_path.read_text()


@contextlib.contextmanager
def database_outage(dbname):
    """Refuse new connections to one database and end the ones it has; undone on leaving the block."""
    admin, why = _postgres_admin_connect()
    if admin is None:
        import pytest  # only tests call this

        pytest.skip(why)
    try:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        yield
    finally:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        admin.close()


# Another process holding a write lock, as a second server on the same SQLite file would

SQLITE_WRITE_HOLDER = r"""
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO flow (id, created, updated, name) VALUES ('held-id', 'x', 'x', 'held-by-other-process')")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
conn.close()
print("released", flush=True)
"""

# The writers' turn of the servers on one SQLite file (<db>.write-lock), taken as another server takes it.
WRITERS_TURN_HOLDER = r"""
import fcntl, sys
lock = open(sys.argv[1], "a+")
fcntl.flock(lock, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
lock.close()
print("released", flush=True)
"""


class LockHolder:
    """Another process holding a write lock on `path` until told to let go (or killed): SQLite's own
    lock in the middle of a write by default, or with `script=WRITERS_TURN_HOLDER` the servers' turn."""

    def __init__(self, path, script=SQLITE_WRITE_HOLDER):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if line.strip() != "locked":
            self.proc.kill()
            raise AssertionError(f"lock holder did not get the lock: {line!r} {self.proc.stderr.read()}")

    def release(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            assert self.proc.stdout.readline().strip() == "released"
        self.proc.wait(30)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


# Times, names and polling, as every test module needs them


def now():
    return dt.datetime.now(dt.timezone.utc)


def iso(moment):
    return moment.isoformat()


def parse(text):
    """An API datetime as an aware datetime (naive means UTC)."""
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# Time as a test sets it, and requests answered without a socket

T0 = dt.datetime(2030, 6, 1, 12, 5, 0, tzinfo=dt.timezone.utc)  # a moment no test runs at: only a Clock says it
TICK = dt.timedelta(microseconds=1)  # the finest step a stored time has


class Clock:
    """What an App asks for the time (App.clock, handed to prefectlite.create_app): the moment a test set."""

    def __init__(self, moment):
        self.moment = moment

    def __call__(self):
        return self.moment


def answer(app, method, path, body=None):
    """One API request answered by `app` in this process (its route table and handlers, no socket, no
    thread): the payload of a 2xx answer, as JSON would carry it."""
    import prefectlite  # only when a test asks: helpers is imported before ROOT is on sys.path elsewhere

    raw = b"" if body is None else json.dumps(body).encode()
    path, _, query = path.partition("?")
    req = prefectlite.Request(app, method, path, urllib.parse.parse_qs(query), prefectlite.RequestHeaders([]), raw)
    status, payload, _headers = prefectlite.handle_api_request(app, req)
    assert status in (200, 201, 204), (method, path, status, payload)
    if isinstance(payload, prefectlite.RawBody):  # JSON a handler wrote itself (a large list of runs)
        return json.loads(payload.data)
    return payload


# Records every test module makes through the API


def new_flow(client, name=None, tags=None):
    """A flow with a unique name (or `name`)."""
    return client.ok("POST", "/flows/", {"name": name or unique("flow"), "tags": list(tags or [])})


def new_flow_run(client, flow_id=None, *, state=None, scheduled=None, **fields):
    """A flow run of `flow_id` (or of a new flow); `scheduled`: a datetime to put it SCHEDULED for."""
    body = {"flow_id": flow_id or new_flow(client)["id"], **fields}
    if scheduled is not None:
        state = {"type": "SCHEDULED", "state_details": {"scheduled_time": iso(scheduled)}}
    if state is not None:
        body["state"] = state
    if "tags" in body:
        body["tags"] = list(body["tags"])
    return client.ok("POST", "/flow_runs/", body)


def wait_until(predicate, timeout=30.0, what="condition", interval=0.1):
    """A bounded poll: the predicate's first truthy value, or a failure after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def service_passes(api_url, service):
    """How many passes a server's background service has made (its /metrics: metrics must be on)."""
    with urllib.request.urlopen(api_url.rstrip("/") + "/metrics", timeout=30) as resp:
        return service_passes_in(resp.read().decode(), service)


def service_passes_in(metrics_text, service):
    """The passes of `service` that a /metrics answer counts."""
    wanted = f'prefectlite_service_passes_total{{service="{service}"}} '
    return next(int(float(line[len(wanted) :])) for line in metrics_text.splitlines() if line.startswith(wanted))


def wait_for_passes(api_url, service, passes=2, timeout=30.0):
    """Wait until `service` has made `passes` more passes: with 2, at least one whole pass began after
    this call (the one under way may have begun before it). What a pass would do, it has done then."""
    start = service_passes(api_url, service)
    wait_until(
        lambda: service_passes(api_url, service) >= start + passes, timeout, f"{passes} {service} passes", interval=0.02
    )


def wait_subscribed(sub, probe, timeout=15.0):
    """Once an /events/out subscriber's filter is read, the first event it gets (a RawWebSocket `sub`).
    The protocol acknowledges no filter, so `probe()` stores an event the filter matches, again until one
    arrives; more probes may follow it."""
    deadline = time.monotonic() + timeout
    while True:
        probe()
        readable, _, _ = select.select([sub.sock], [], [], 0.2)
        if readable or sub.buffer:
            return sub.recv_json()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for the subscriber's first event")


def wait_for_pause(script, id_file, api, timeout):
    """The flow run whose id a compat scenario script writes to `id_file`, once it is PAUSED (read with
    `api`, the compat suite's callable client); fails at once if the script exits before that."""

    def paused():
        if script.proc.poll() is not None:
            script.wait(check=True)
            raise AssertionError(f"the script exited ({script.proc.returncode}) before it paused")
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not run_id:
            return None
        status, run = api("GET", f"/flow_runs/{run_id}")
        assert status == 200, (status, run)
        return run if run["state_type"] == "PAUSED" else None

    return wait_until(paused, timeout, interval=0.3, what="the flow to pause")


def wait_for_input_schema(api, run, timeout=60):
    """The run input schema a flow paused with wait_for_input stores: the SDK stores it only after its
    Paused state was accepted, so a test that saw the pause waits for it (with `api`, as wait_for_pause)."""
    keyset = run["state"]["state_details"]["run_input_keyset"]
    assert keyset and keyset["schema"] and keyset["response"], run["state"]

    def stored():
        status, schema = api("GET", f"/flow_runs/{run['id']}/input/{keyset['schema']}")
        return schema if status == 200 else None

    return wait_until(stored, timeout, interval=0.2, what="the run input schema to be stored")


# A raw WebSocket client: nothing of prefectlite's WebSocket code is used to talk to the server.


class RawWebSocket:
    def __init__(self, api_url, path="/events/in", protocols=("prefect",), headers=None, timeout=10.0):
        parts = urllib.parse.urlsplit(api_url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        self.key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {parts.path}{path} HTTP/1.1",
            f"Host: {parts.hostname}:{parts.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self.key}",
            "Sec-WebSocket-Version: 13",
        ]
        if protocols:
            lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buffer = b""
        head = self._read_until(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines if h)}
        if self.status != 101:  # read the HTTP error body
            length = int(self.headers.get("content-length", "0"))
            self.body = json.loads(self._read_exactly(length)) if length else None

    def _read_until(self, marker):
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _read_exactly(self, n):
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection ended with {len(self.buffer)} of {n} bytes")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send_frame(self, opcode, payload=b"", fin=True, masked=True, rsv=0):
        if isinstance(payload, str):
            payload = payload.encode()
        head = bytes([(0x80 if fin else 0) | rsv | opcode])
        length = len(payload)
        mask_bit = 0x80 if masked else 0
        if length < 126:
            head += bytes([mask_bit | length])
        elif length < 65536:
            head += bytes([mask_bit | 126]) + struct.pack(">H", length)
        else:
            head += bytes([mask_bit | 127]) + struct.pack(">Q", length)
        if masked:
            key = os.urandom(4)
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            head += key
        self.sock.sendall(head + payload)

    def send_text(self, text, **kw):
        self.send_frame(0x1, text, **kw)

    def send_json(self, value):
        self.send_text(json.dumps(value))

    def recv_frame(self):
        first, second = self._read_exactly(2)
        assert second & 0x80 == 0, "server frames must not be masked"
        length = second & 0x7F
        if length == 126:
            length = struct.unpack(">H", self._read_exactly(2))[0]
        elif length == 127:
            length = struct.unpack(">Q", self._read_exactly(8))[0]
        return bool(first & 0x80), first & 0x0F, self._read_exactly(length)

    def recv_json(self):
        fin, opcode, payload = self.recv_frame()
        assert (fin, opcode) == (True, 0x1), (fin, opcode, payload)
        return json.loads(payload)

    def expect_close(self):
        """Read until the server's close frame: (code, reason)."""
        while True:
            _fin, opcode, payload = self.recv_frame()
            if opcode == 0x8:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                return code, payload[2:].decode()

    def at_eof(self, timeout=5.0):
        self.sock.settimeout(timeout)
        try:
            return self.buffer == b"" and self.sock.recv(1) == b""
        except OSError:
            return True

    def authenticate(self, token=None):
        self.send_json({"type": "auth", "token": token})
        assert self.recv_json() == {"type": "auth_success"}
        return self

    def close(self):
        self.sock.close()


def event(name="test.thing.happened", resource_id=None, occurred=None, **extra):
    body = {
        "id": str(uuid.uuid4()),
        "occurred": occurred or iso(now()),
        "event": name,
        "resource": {"prefect.resource.id": resource_id or f"test.resource.{uuid.uuid4()}"},
        "related": [],
        "payload": {},
    }
    body.update(extra)
    return body


# The routes of Prefect's API that only Prefect's own web UI calls, in both 2.20's contract and 3.9's server:
# not served (README.md, "What of the Prefect 2.20 and 3.9 APIs is not served"; prefectlite has its own UI).
UI_ONLY_ROUTES = {
    ("POST", "/ui/flow_runs/history"),
    ("POST", "/ui/task_runs/count"),
    ("POST", "/ui/task_runs/dashboard/counts"),
    ("POST", "/ui/schemas/validate"),
    ("POST", "/flow_runs/lateness"),
    ("POST", "/templates/validate"),
    ("GET", "/deployments/{id}/work_queue_check"),
}


# --- blocks of the core types ----------------------------------------------------------------------------------

# What a person types into the UI's forms for each core block type, one block of each.
CORE_BLOCK_DATA = {
    "secret": {"value": "s3cr3t-from-the-ui"},
    "json": {"value": {"rows": [1, 2], "ok": True}},
    "string": {"value": "plain text"},
    "date-time": {"value": "2026-12-31T23:59:00+00:00"},
    "local-file-system": {"basepath": "/srv/compat-core-blocks"},
    "webhook": {"method": "PUT", "url": "https://hooks.example.com/x", "headers": {"X-Token": "t0k"}},
    "remote-file-system": {
        "basepath": "memory://compat-core-blocks/results",
        "settings": {"skip_instance_cache": True},
    },
    "smb": {"share_path": "/results", "smb_host": "files.example.com", "smb_username": "svc", "smb_password": "pw"},
    "process": {"command": ["python", "-m", "prefect.engine"], "env": {"MODE": "batch"}, "stream_output": False},
}


def assert_core_blocks_loaded(loaded: dict, names: dict) -> None:
    """`loaded` (scenarios/b10_core_blocks.py's answer) holds, for each block in `names`, the data it was made
    with, in the SDK's class of its type."""
    classes = {
        "date-time": "DateTime",
        "json": "JSON",
        "local-file-system": "LocalFileSystem",
        "remote-file-system": "RemoteFileSystem",
        "smb": "SMB",
    }
    assert set(loaded) == set(names), loaded
    for slug in names:
        got = loaded[slug]
        assert got.get("class") == classes.get(slug, slug.title()), (slug, got)
        assert {key: got.get(key) for key in CORE_BLOCK_DATA[slug]} == CORE_BLOCK_DATA[slug], (slug, got)
