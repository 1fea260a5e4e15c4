"""Test helpers shared by every test module (imported as `helpers`; fixtures live in conftest.py).

A uniquely named module: several conftest.py files exist below tests/, and `from conftest import ...`
would pick whichever pytest loaded last.
"""

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
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
        req = urllib.request.Request(self.api_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **self.headers, **(headers or {})})
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

    def ok(self, method, path, body=None, expect=(200, 201, 204)):
        status, payload = self.request(method, path, body)
        assert status in expect, (method, path, status, payload)
        return payload


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _postgres_admin_connect():
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed"
    try:
        return psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3), None
    except Exception as exc:  # noqa: BLE001
        return None, f"PostgreSQL unreachable at {POSTGRES_URL}: {exc}"


def run_cli(*args, env=None, input_text=None, timeout=60):
    """Run `python prefectlite.py ARGS` in a subprocess; returns CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "prefectlite.py"), *args], env=full_env, input=input_text,
                          capture_output=True, text=True, timeout=timeout)


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

    def __init__(self, tmp_path, env, *extra_args, port=None, command=("start",), extra=()):
        self.port = port or free_port()
        self.out_path = tmp_path / f"server-{self.port}.out"
        self.err_path = tmp_path / f"server-{self.port}.err"
        self._out = open(self.out_path, "w")
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "prefectlite.py"), *command, "--host", "127.0.0.1", "--port", str(self.port),
             *extra_args, *extra],
            env=clean_env(**env), stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL,
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
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                      "AND pid <> pg_backend_pid()", (dbname,))
        yield
    finally:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        admin.close()


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
