"""Fixtures for the Prefect 2.20 SDK conformance suite (tests/compat).

The real, unmodified `prefect` 2.20 SDK runs in its own cached venv (see prefect_venv.py)
against our server, started here as a subprocess (or against any server named by
PREFECTLITE_COMPAT_SERVER_URL, e.g. Prefect's own, to prove the tests right).

Environment:
  PREFECTLITE_REQUIRE_COMPAT=1      a venv that cannot be built fails the suite instead of skipping it
  PREFECTLITE_COMPAT_SERVER_URL=U   run against the API at U (".../api") instead of starting prefectlite
  PREFECTLITE_COMPAT_REFERENCE=1    start Prefect's own 2.20 server (`prefect server start`, from the
                                    venv) instead of prefectlite: every test must pass against it
  PREFECTLITE_COMPAT_TRACE=FILE     put a logging proxy in front of the server: every request the SDK
                                    and the tests make is appended to FILE as JSON lines (method, path,
                                    status, request and response bodies), like the reference traces
  PREFECTLITE_CACHE_DIR=DIR         where the venv is cached (default ~/.cache/prefectlite)

Only pytest and the standard library are used here.
"""

from __future__ import annotations

import gzip
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
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

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
SCENARIOS_DIR = HERE / "scenarios"
REFERENCE_SCENARIOS_DIR = REPO_ROOT.parent / "shared" / "reference" / "prefect2-scenarios"

sys.path.insert(0, str(HERE))
from helpers import CORE_BLOCK_DATA  # noqa: E402
import prefect3_venv  # noqa: E402
import prefect_venv  # noqa: E402

SERVER_START_TIMEOUT = 15.0
SERVER_STOP_TIMEOUT = 10.0
REFERENCE_START_TIMEOUT = 90.0
DEFAULT_SCRIPT_TIMEOUT = 120.0


def pytest_configure(config):
    config.addinivalue_line("markers", "compat: runs the real prefect 2.20 SDK against the server (tests/compat)")


# --------------------------------------------------------------------------- venv


@pytest.fixture(scope="session")
def prefect_python() -> str:
    """Path of the python of the cached venv that has prefect 2.20 installed."""
    try:
        return prefect_venv.ensure_prefect_venv()
    except Exception as exc:  # noqa: BLE001 - any failure to build means: no SDK to test with
        msg = f"cannot build the prefect 2.20 venv: {exc}"
        if os.environ.get("PREFECTLITE_REQUIRE_COMPAT") == "1":
            pytest.fail(msg + "\n(PREFECTLITE_REQUIRE_COMPAT=1: failing instead of skipping)")
        pytest.skip(msg)


SDKS = {"2.20": prefect_venv.ensure_prefect_venv, "3.9": prefect3_venv.ensure_prefect3_venv}


@pytest.fixture(scope="module", params=sorted(SDKS))
def sdk_python(request) -> str:
    """The python of a venv with that Prefect SDK (a test that takes it runs once for each)."""
    try:
        return SDKS[request.param]()
    except Exception as exc:  # noqa: BLE001 - any failure to build means: no SDK to test with
        msg = f"cannot build the prefect {request.param} venv: {exc}"
        if os.environ.get("PREFECTLITE_REQUIRE_COMPAT") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


# --------------------------------------------------------------------------- API client


class Api:
    """A tiny JSON client: api(method, path, body=None, headers=None) -> (status, json)."""

    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def __call__(self, method: str, path: str, body=None, headers=None):
        url = self.base_url + (path if path.startswith("/") else "/" + path)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method.upper())
        req.add_header("Accept", "application/json")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        if not raw:
            return status, None
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def ok(self, method: str, path: str, body=None, expect=(200, 201), headers=None):
        """Like __call__, but fails the test unless the status is expected; returns the json."""
        status, payload = self(method, path, body, headers)
        expect = (expect,) if isinstance(expect, int) else tuple(expect)
        if status not in expect:
            pytest.fail(
                f"{method} {path} answered {status}, expected {expect}\n"
                f"request body: {json.dumps(body)[:2000]}\nresponse: {str(payload)[:2000]}"
            )
        return payload


def _wait_healthy(base_url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"status {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}"
        except (OSError, ValueError) as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise RuntimeError(f"GET {base_url}/health did not answer 200 within {timeout:.0f}s ({last})")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_without_prefect() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(k, None)
    return env


# --------------------------------------------------------------------------- logging proxy


class _TraceProxy:
    """A forwarding HTTP proxy that appends each exchange to a JSON-lines file."""

    def __init__(self, upstream_base: str, trace_file: str):
        up = urllib.parse.urlsplit(upstream_base)
        self.up_host, self.up_port = up.hostname, up.port or 80
        self.lock = threading.Lock()
        self.trace = open(trace_file, "a", encoding="utf-8")
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the terminal quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "connection", "keep-alive", "proxy-connection")
                }
                started = time.monotonic()
                conn = http.client.HTTPConnection(proxy.up_host, proxy.up_port, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
                except OSError as exc:
                    status, reason, resp_headers = 502, "Bad Gateway", []
                    data = json.dumps({"proxy_error": repr(exc)}).encode()
                finally:
                    conn.close()
                ms = (time.monotonic() - started) * 1000
                self.send_response(status, reason)
                for k, v in resp_headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                shown = data
                if any(k.lower() == "content-encoding" and "gzip" in v for k, v in resp_headers):
                    try:
                        shown = gzip.decompress(data)
                    except OSError:
                        pass
                proxy.record(
                    {
                        "method": self.command,
                        "path": self.path,
                        "status": status,
                        "ms": round(ms, 1),
                        "req": body.decode("utf-8", "replace")[:4000],
                        "resp": shown.decode("utf-8", "replace")[:4000],
                    }
                )

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def record(self, entry: dict) -> None:
        with self.lock:
            self.trace.write(json.dumps(entry) + "\n")
            self.trace.flush()

    def mark(self, text: str) -> None:
        self.record({"mark": text})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.trace.close()


# --------------------------------------------------------------------------- server


class CompatServer:
    """What the suite knows about the server under test."""

    def __init__(self, api_url: str, proc=None, stderr_path: Path | None = None, proxy=None):
        self.api_url = api_url
        self.proc = proc
        self.stderr_path = stderr_path
        self.proxy = proxy

    def stderr_offset(self) -> int:
        if self.stderr_path is None:
            return 0
        try:
            return self.stderr_path.stat().st_size
        except OSError:
            return 0

    def stderr_since(self, offset: int, limit: int = 8000) -> str:
        if self.stderr_path is None:
            return ""
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return text[-limit:]


_SERVER: CompatServer | None = None

# Settings both servers (ours and, with PREFECTLITE_COMPAT_REFERENCE=1, Prefect's) run the suite with:
# a task waiting for a tag's concurrency slot retries after 1 s, and a deployment's run that found no slot
# is put back 1 s, not the default 30 (each concurrency-limit test waited that long once, ~30 s of the
# suite's time each; the SDK sleeps what the server says, the runner picks the run up when it is due).
SERVER_SETTINGS = {
    "PREFECT_TASK_RUN_TAG_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
    "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
}


@pytest.fixture(scope="session")
def compat_server_handle(request, tmp_path_factory):
    global _SERVER
    external = os.environ.get("PREFECTLITE_COMPAT_SERVER_URL")
    trace_file = os.environ.get("PREFECTLITE_COMPAT_TRACE")
    proc = None
    stderr_path = None
    if os.environ.get("PREFECTLITE_COMPAT_REFERENCE") == "1" and not external:
        # Prefect's own server from the venv: proves the tests right.
        python = request.getfixturevalue("prefect_python")
        home = tmp_path_factory.mktemp("reference-server")
        port = _free_port()
        env = _env_without_prefect()
        env.update(
            {
                "PREFECT_HOME": str(home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_ENABLED": "false",
                **SERVER_SETTINGS,
            }
        )
        stderr_path = home / "server.stderr"
        cmd = [str(Path(python).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        with open(home / "server.stdout", "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                cmd, env=env, cwd=str(home), stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
            )
        api_url = f"http://127.0.0.1:{port}/api"
        try:
            _wait_healthy(api_url, REFERENCE_START_TIMEOUT, proc)
        except RuntimeError as exc:
            _stop(proc)
            pytest.fail(f"the reference server did not start: {exc}\n{_tail(stderr_path)}")
    elif external:
        api_url = external.rstrip("/")
        try:
            _wait_healthy(api_url, SERVER_START_TIMEOUT)
        except RuntimeError as exc:
            pytest.fail(f"PREFECTLITE_COMPAT_SERVER_URL={external}: {exc}")
    else:
        script = REPO_ROOT / "prefectlite.py"
        if not script.exists():
            pytest.fail(f"{script} does not exist: nothing to test the SDK against")
        home = tmp_path_factory.mktemp("prefectlite-server")
        port = _free_port()
        env = _env_without_prefect()
        env["PREFECT_HOME"] = str(home)
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite:///{home}/compat.db"
        env["PYTHONUNBUFFERED"] = "1"
        env.update(SERVER_SETTINGS)
        stderr_path = home / "server.stderr"
        stdout_path = home / "server.stdout"
        cmd = [sys.executable, str(script), "start", "--host", "127.0.0.1", "--port", str(port)]
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(cmd, env=env, cwd=str(home), stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        api_url = f"http://127.0.0.1:{port}/api"
        try:
            _wait_healthy(api_url, SERVER_START_TIMEOUT, proc)
        except RuntimeError as exc:
            _stop(proc)
            pytest.fail(
                f"prefectlite did not start: {exc}\ncommand: {' '.join(cmd)}\n"
                f"--- server stdout ---\n{_tail(stdout_path)}\n"
                f"--- server stderr ---\n{_tail(stderr_path)}"
            )
    proxy = _TraceProxy(api_url, trace_file) if trace_file else None
    server = CompatServer(proxy.url if proxy else api_url, proc, stderr_path, proxy)
    _SERVER = server
    try:
        yield server
    finally:
        _SERVER = None
        if proxy:
            proxy.close()
        if proc is not None:
            code = _stop(proc)
            if code not in (0, -signal.SIGTERM):
                sys.__stderr__.write(
                    f"\n[compat] the server exited with code {code} on SIGTERM; its stderr:\n"
                    f"{_tail(stderr_path, 20000)}\n"
                )


@pytest.fixture(scope="session")
def compat_server(compat_server_handle) -> str:
    """The API URL (http://127.0.0.1:PORT/api) of the server under test."""
    return compat_server_handle.api_url


@pytest.fixture(scope="session")
def api(compat_server) -> Api:
    return Api(compat_server)


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM, wait up to SERVER_STOP_TIMEOUT, then SIGKILL. Returns the exit code."""
    own_group = _is_group_leader(proc)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if own_group:  # the reference server's uvicorn child lives in the same group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return proc.returncode


def _is_group_leader(proc: subprocess.Popen) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


def _tail(path: Path | None, limit: int = 8000) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-limit:]
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


@pytest.fixture(autouse=True)
def _server_log_marker(request):
    """Remember where the server's stderr was when the test began (shown on failure)."""
    server = None
    if "compat_server_handle" in request.fixturenames:
        server = request.getfixturevalue("compat_server_handle")
    if server is not None:
        if server.proc is not None and server.proc.poll() is not None:
            pytest.fail(
                f"the server under test has died (exit code {server.proc.returncode}); "
                f"its stderr:\n{_tail(server.stderr_path)}"
            )
        request.node._compat_stderr_offset = server.stderr_offset()
        if server.proxy:
            server.proxy.mark(f"test start: {request.node.nodeid}")
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    server = _SERVER
    if report.failed and server is not None and server.stderr_path is not None:
        offset = getattr(item, "_compat_stderr_offset", None)
        if offset is not None:
            text = server.stderr_since(offset)
            if text.strip():
                report.sections.append(("prefectlite stderr during this test", text))


# --------------------------------------------------------------------------- running SDK scripts


class FlowScript:
    """A running SDK script (see start_flow_script)."""

    def __init__(self, proc, workdir: Path, script: Path, timeout: float):
        self.proc = proc
        self.workdir = workdir
        self.script = script
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.timed_out = False  # set by wait() when the script was ended at its deadline

    def output(self) -> tuple[str, str]:
        out = (self.workdir / "stdout.txt").read_text(encoding="utf-8", errors="replace")
        err = (self.workdir / "stderr.txt").read_text(encoding="utf-8", errors="replace")
        return out, err

    def wait(self, check: bool = True) -> subprocess.CompletedProcess:
        """Wait for the script to end (killing it at its deadline)."""
        timed_out = False
        try:
            self.proc.wait(timeout=max(0.1, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = self.timed_out = True
            self.terminate()
        out, err = self.output()
        result = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        if check and (timed_out or self.proc.returncode != 0):
            why = f"timed out after {self.timeout:.0f}s" if timed_out else f"exited with code {self.proc.returncode}"
            pytest.fail(
                f"SDK script {self.script.name} {why} (workdir {self.workdir})\n"
                f"--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-12000:]}",
                pytrace=False,
            )
        return result

    def terminate(self, grace: float = 10.0) -> None:
        """End the script: SIGINT (clean shutdown), then SIGTERM, then SIGKILL; its process group too."""
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        # Children (e.g. flow runs started by serve()) live in the same process group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def script_env(api_url: str, workdir: Path) -> dict:
    """The environment of an SDK script: no inherited PREFECT_* variables, its own PREFECT_HOME."""
    env = _env_without_prefect()
    env["PREFECT_API_URL"] = api_url
    env["PREFECT_HOME"] = str(workdir / "prefect-home")
    env["PREFECT_LOCAL_STORAGE_PATH"] = str(workdir / "prefect-home" / "storage")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_flow_script(
    python: str, path_or_source, api_url: str, base_dir: Path, args=(), timeout: float = DEFAULT_SCRIPT_TIMEOUT
) -> FlowScript:
    """Start an SDK script in the background, in its own temp dir (copied there; cwd = that dir)."""
    base_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=base_dir))
    (workdir / "prefect-home").mkdir()
    if isinstance(path_or_source, Path) or (
        isinstance(path_or_source, str)
        and "\n" not in path_or_source
        and path_or_source.endswith(".py")
        and Path(path_or_source).is_file()
    ):
        src = Path(path_or_source)
        script = workdir / src.name
        shutil.copyfile(src, script)
    else:
        script = workdir / "flow_script.py"
        script.write_text(str(path_or_source), encoding="utf-8")
    with open(workdir / "stdout.txt", "wb") as out, open(workdir / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(
            [python, script.name, *[str(a) for a in args]],
            cwd=str(workdir),
            env=script_env(api_url, workdir),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: terminate() ends its children too
        )
    return FlowScript(proc, workdir, script, timeout)


@pytest.fixture(scope="session")
def _scripts_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sdk-scripts")


@pytest.fixture
def start_script(prefect_python, _scripts_dir):
    """start_script(path_or_source, api_url, args=(), timeout=120) -> FlowScript (background)."""
    started = []

    def start(path_or_source, api_url, args=(), timeout=DEFAULT_SCRIPT_TIMEOUT):
        handle = start_flow_script(prefect_python, path_or_source, api_url, _scripts_dir, args=args, timeout=timeout)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.terminate()


@pytest.fixture
def run_flow_script(start_script):
    """run_flow_script(path_or_source, api_url, timeout=120, args=()) -> CompletedProcess.

    Runs the script with the venv's python; the test fails (showing stdout/stderr) if it
    exits non-zero or times out.
    """

    def run(path_or_source, api_url, timeout=DEFAULT_SCRIPT_TIMEOUT, args=()):
        return start_script(path_or_source, api_url, args=args, timeout=timeout).wait(check=True)

    return run


# --------------------------------------------------------------------------- blocks made in the UI


@pytest.fixture
def make_core_blocks(api):
    """make_core_blocks(slugs) -> {slug: block name}: a block of each core type, made as the UI makes one,
    with the schema the server registered for the type at start (its oldest) and CORE_BLOCK_DATA's data."""

    def make(slugs) -> dict:
        names = {}
        for slug in slugs:
            block_type = api.ok("GET", f"/block_types/slug/{slug}", expect=200)
            by_type = {"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}}
            schemas = api.ok("POST", "/block_schemas/filter", by_type, expect=200)
            first = min(schemas, key=lambda schema: schema["created"])
            names[slug] = f"ui-made-{slug}-{uuid.uuid4().hex[:8]}"
            body = {
                "name": names[slug],
                "block_type_id": block_type["id"],
                "block_schema_id": first["id"],
                "data": CORE_BLOCK_DATA[slug],
            }
            api.ok("POST", "/block_documents/", body, expect=201)
        return names

    return make
