"""Faults, with real server processes: kill -9 under write load, a PostgreSQL database that goes away
and comes back, a full disk and a read-only database file, a notification receiver that hangs, and
two servers sharing one PostgreSQL database.

Every server here is a `python prefectlite.py start` process on a free loopback port, stopped (or
killed) at the end of its test; every client request has a timeout, so a hang fails instead of
blocking the suite. The only fakes are local receivers (tests/fake_receivers.py).
"""

import collections
import contextlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

import pytest

from helpers import ROOT, Client, database_outage, free_port, wait_for_health, wait_for_passes, wait_until
from fake_receivers import HTTPReceiver

REQUEST_TIMEOUT = 20.0  # seconds any single client request may take before the test calls it a hang


# --- server processes --------------------------------------------------------------------------


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class ServerProcess:
    """`python prefectlite.py start` on a free loopback port; output goes to files for later reading."""

    def __init__(self, tmp_path, database, name="server", **settings):
        self.port = free_port()
        self.name = name
        home = tmp_path / f"home-{name}"
        home.mkdir(exist_ok=True)
        self.out_path = tmp_path / f"{name}-{self.port}.out"
        self.err_path = tmp_path / f"{name}-{self.port}.err"
        env = clean_env(PREFECT_HOME=home, PREFECT_API_DATABASE_CONNECTION_URL=database, **settings)
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "prefectlite.py"),
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                env=env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.client = Client(self.api_url)

    def wait_ready(self, timeout=60.0):
        if not wait_for_health(self.api_url, timeout=timeout):
            self.kill()
            raise AssertionError(f"{self.name} did not become healthy; stderr:\n{self.stderr()[-3000:]}")
        return self

    def alive(self):
        return self.proc.poll() is None

    def stderr(self):
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def kill(self, signum=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self):
        self.kill(signal.SIGTERM)


@pytest.fixture
def servers(tmp_path):
    """Start servers with servers(database, **settings); every one is stopped at the end of the test."""
    started = []

    def start(database, name=None, wait=True, **settings):
        server = ServerProcess(tmp_path, database, name or f"server{len(started)}", **settings)
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in started:
        server.stop()


# --- a small HTTP client with a hard timeout -----------------------------------------------------


class Conn:
    """One keep-alive connection, like one SDK client; every request has a timeout."""

    def __init__(self, api_url, timeout=REQUEST_TIMEOUT):
        parts = urllib.parse.urlsplit(api_url)
        self.host, self.port, self.base = parts.hostname, parts.port, parts.path.rstrip("/")
        self.timeout = timeout
        self.conn = None

    def request(self, method, path, body=None):
        """(status, parsed JSON or text, headers); raises OSError/HTTPException on no answer."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        data = None if body is None else json.dumps(body).encode()
        try:
            self.conn.request(method, self.base + path, body=data, headers={"Content-Type": "application/json"})
            resp = self.conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        headers = {k.lower(): v for k, v in resp.getheaders()}
        if resp.will_close:
            self.close()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode("utf-8", "replace")
        return resp.status, payload, headers

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def ts(offset=0.0):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + offset)) + ".000000+00:00"


def state(state_type, **details):
    names = {"PENDING": "Pending", "RUNNING": "Running", "COMPLETED": "Completed", "FAILED": "Failed"}
    return {
        "type": state_type,
        "name": names.get(state_type),
        "message": None,
        "data": None,
        "state_details": {"transition_id": str(uuid.uuid4()), **details},
    }


class WriteLoad:
    """Threads doing the SDK's calls for a flow of three tasks, 13 per run:

    POST /flow_runs/ (PENDING), set_state RUNNING, 3 x (POST /task_runs/, set_state RUNNING, set_state
    COMPLETED), POST /logs/ (5 lines), set_state COMPLETED. `acked` holds every flow run id whose final
    set_state was answered 2xx; `statuses` counts every answer; `bad` keeps answers `allowed` rejects;
    `failures` keeps requests that got no answer at all (refused, reset, timed out).
    """

    def __init__(self, api_urls, threads, runs_per_thread=None, allowed=None, flow_name="fault-load"):
        self.api_urls = list(api_urls)
        self.threads_n = threads
        self.runs_per_thread = runs_per_thread
        self.allowed = allowed or (lambda status, payload: 200 <= status < 300)
        self.flow_name = flow_name
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.acked = []
        self.not_accepted = []
        self.statuses = collections.Counter()
        self.bad = []
        self.failures = []
        self.threads = []

    def start(self):
        for i in range(self.threads_n):
            thread = threading.Thread(target=self._run_thread, args=(i,), daemon=True)
            self.threads.append(thread)
            thread.start()
        return self

    def stop(self, timeout=REQUEST_TIMEOUT * 2):
        """Stop now (threads end after their current request)."""
        self.stop_event.set()
        self._join(timeout)

    def finish(self, timeout):
        """Let each thread do its runs_per_thread, bounded by `timeout` seconds."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.stop_event.set()
        self._join(REQUEST_TIMEOUT * 2)

    def _join(self, timeout):
        for thread in self.threads:
            thread.join(timeout)
        hung = [t for t in self.threads if t.is_alive()]
        assert not hung, f"{len(hung)} load threads still stuck in a request"

    def acked_count(self):
        with self.lock:
            return len(self.acked)

    def _call(self, conn, method, path, body=None):
        try:
            status, payload, _headers = conn.request(method, path, body)
        except (OSError, http.client.HTTPException) as exc:
            with self.lock:
                self.failures.append((method, path, f"{type(exc).__name__}: {exc}"))
            time.sleep(0.05)
            return None, None
        with self.lock:
            self.statuses[status] += 1
            if not self.allowed(status, payload):
                self.bad.append((method, path, status, payload))
        return status, payload

    def _run_thread(self, index):
        conn = Conn(self.api_urls[index % len(self.api_urls)])
        try:
            flow_id = None
            while flow_id is None and not self.stop_event.is_set():
                status, payload = self._call(conn, "POST", "/flows/", {"name": self.flow_name, "tags": []})
                if status in (200, 201):
                    flow_id = payload["id"]
            done = 0
            while not self.stop_event.is_set() and (self.runs_per_thread is None or done < self.runs_per_thread):
                if self._one_run(conn, flow_id):
                    done += 1
        finally:
            conn.close()

    def _one_run(self, conn, flow_id):
        ok = lambda status: status is not None and 200 <= status < 300  # noqa: E731
        status, run = self._call(
            conn,
            "POST",
            "/flow_runs/",
            {
                "flow_id": flow_id,
                "name": None,
                "state": state("PENDING"),
                "parameters": {"n": 3},
                "context": {},
                "empirical_policy": {"retries": 0, "retry_delay": 0},
                "tags": [],
                "idempotency_key": None,
            },
        )
        if not ok(status):
            return False
        run_id = run["id"]
        status, _ = self._call(
            conn,
            "POST",
            f"/flow_runs/{run_id}/set_state",
            {"state": state("RUNNING", flow_run_id=run_id), "force": False},
        )
        if not ok(status):
            return False
        task_ids, previous = [], None
        for name in ("extract", "transform", "load"):
            inputs = {"xs": [{"input_type": "task_run", "id": previous}]} if previous else {}
            status, task = self._call(
                conn,
                "POST",
                "/task_runs/",
                {
                    "flow_run_id": run_id,
                    "task_key": f"{name}-key",
                    "dynamic_key": "0",
                    "name": f"{name}-0",
                    "state": state("PENDING"),
                    "tags": [],
                    "task_inputs": inputs,
                    "empirical_policy": {"retries": 0, "retry_delay_seconds": 0},
                },
            )
            if not ok(status):
                return False
            for target in ("RUNNING", "COMPLETED"):
                status, _ = self._call(
                    conn,
                    "POST",
                    f"/task_runs/{task['id']}/set_state",
                    {"state": state(target, task_run_id=task["id"]), "force": False},
                )
                if not ok(status):
                    return False
            task_ids.append(task["id"])
            previous = task["id"]
        logs = [
            {
                "name": "prefect.flow_runs",
                "level": 20,
                "message": f"line {i}",
                "timestamp": ts(),
                "flow_run_id": run_id,
                "task_run_id": task_ids[i % 3] if i % 2 else None,
            }
            for i in range(5)
        ]
        status, _ = self._call(conn, "POST", "/logs/", logs)
        if not ok(status):
            return False
        status, result = self._call(
            conn,
            "POST",
            f"/flow_runs/{run_id}/set_state",
            {"state": state("COMPLETED", flow_run_id=run_id), "force": False},
        )
        if not ok(status):
            return False
        with self.lock:
            self.acked.append(run_id)
            if not isinstance(result, dict) or result.get("status") != "ACCEPT":
                self.not_accepted.append((run_id, result))
        return True


def assert_complete_runs(client, run_ids):
    """Each run exists, is COMPLETED, has its three COMPLETED task runs and its five log lines."""
    problems = []
    for run_id in run_ids:
        status, run = client.get(f"/flow_runs/{run_id}")
        if status != 200:
            problems.append((run_id, status, run))
            continue
        if run["state_type"] != "COMPLETED":
            problems.append((run_id, run["state_type"]))
        tasks = client.ok("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
        if sorted(t["state_type"] for t in tasks) != ["COMPLETED"] * 3:
            problems.append((run_id, "task runs", [t["state_type"] for t in tasks]))
        logs = client.ok("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
        if len(logs) != 5:
            problems.append((run_id, "log lines", len(logs)))
    assert not problems, f"{len(problems)} of {len(run_ids)} acknowledged runs are not intact: {problems[:10]}"


# --- kill -9 during a write load ---------------------------------------------------------------


def test_kill_9_under_write_load_loses_no_acknowledged_run(tmp_path, servers):
    db_path = tmp_path / "durable.db"
    database = f"sqlite:///{db_path}"
    first = servers(database, name="victim")
    load = WriteLoad([first.api_url], threads=6).start()
    try:
        wait_until(lambda: load.acked_count() >= 100, 120, "100 acknowledged runs before the kill")
        first.kill(signal.SIGKILL)
        assert first.proc.returncode == -signal.SIGKILL
    finally:
        load.stop()
    acked = list(load.acked)
    assert not load.bad, f"answers other than 2xx before the kill: {load.bad[:5]}"

    second = servers(database, name="restarted")
    assert_complete_runs(second.client, acked)
    # the file is sound and the restarted server takes writes again
    check = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        check.close()
    again = WriteLoad([second.api_url], threads=2, runs_per_thread=3).start()
    again.finish(timeout=120)
    assert (again.bad, again.failures) == ([], []), (again.bad[:5], again.failures[:5])
    assert again.acked_count() == 6


# --- PostgreSQL goes away and comes back -------------------------------------------------------


def _is_503_with_reason(status, payload):
    return status == 503 and isinstance(payload, dict) and bool(payload.get("detail")) and bool(payload.get("reason"))


def test_postgres_outage_is_503_with_a_reason_and_recovers_without_restart(servers, postgres_url):
    dbname = postgres_url.rsplit("/", 1)[1]
    server = servers(
        postgres_url,
        PREFECT_API_DATABASE_TIMEOUT=3,
        PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS=1,
        PREFECT_API_SERVICES_LATE_RUNS_LOOP_SECONDS=1,
    )
    pid = server.proc.pid
    conn = Conn(server.api_url)
    flow = conn.request("POST", "/flows/", {"name": "before-the-outage"})[1]
    run = conn.request("POST", "/flow_runs/", {"flow_id": flow["id"]})[1]
    allowed = lambda status, payload: 200 <= status < 300 or _is_503_with_reason(status, payload)  # noqa: E731
    load = WriteLoad([server.api_url], threads=4, allowed=allowed).start()
    try:
        wait_until(lambda: load.acked_count() >= 10, 120, "acknowledged runs before the outage")
        with database_outage(dbname):
            # the server notices by itself: once its pooled connections are gone, every database call is a 503
            wait_until(lambda: conn.request("POST", "/flows/count", {})[0] == 503, 30, "a 503 while PostgreSQL is away")
            down = {
                "create flow": conn.request("POST", "/flows/", {"name": "during-the-outage"}),
                "read run": conn.request("GET", f"/flow_runs/{run['id']}"),
                "filter runs": conn.request("POST", "/flow_runs/filter", {"limit": 5}),
                "set state": conn.request("POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": "RUNNING"}}),
                "write logs": conn.request(
                    "POST",
                    "/logs/",
                    [{"name": "n", "level": 20, "message": "m", "timestamp": ts(), "flow_run_id": run["id"]}],
                ),
                "ready": conn.request("GET", "/ready"),
            }
            for what, (status, payload, headers) in down.items():
                assert status == 503, (what, status, payload)
                assert headers.get("content-type", "").startswith("application/json"), (what, headers)
                assert isinstance(payload, dict) and payload.get("detail"), (what, payload)
                if what != "ready":
                    assert payload.get("reason"), (what, payload)
            wait_until(lambda: load.statuses[503] > 0, 30, "the load to see a 503 too")
            acked_during = load.acked_count()
        # connections allowed again: the same process answers 2xx again, no restart
        wait_until(
            lambda: conn.request("POST", "/flows/", {"name": "after-the-outage"})[0] in (200, 201),
            60,
            "a 2xx after PostgreSQL came back",
        )
        wait_until(lambda: load.acked_count() >= acked_during + 10, 120, "the load to complete runs again")
    finally:
        load.stop()
        conn.close()
    assert server.alive() and server.proc.pid == pid, "the server died or was restarted"
    assert not load.bad, f"answers that were neither 2xx nor a 503 with a reason: {load.bad[:5]}"
    assert not load.failures, f"requests without an answer (hang, reset): {load.failures[:5]}"
    assert 500 not in load.statuses
    assert Client(server.api_url).get("/ready")[0] == 200
    assert_complete_runs(Client(server.api_url), list(load.acked))


class FreezableProxy:
    """A TCP relay to PostgreSQL on loopback that can stop answering, like a network partition.

    While frozen it relays nothing in either direction and holds new connections unanswered; thaw()
    drops every connection that lived through the freeze (as a healed network would reset them) and
    relays normally again.
    """

    def __init__(self, upstream_host, upstream_port):
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.sockets = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _track(self, *socks):
        with self.lock:
            self.sockets.update(socks)

    def _accept(self):
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._track(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        while self.frozen.is_set() and not self.closed.is_set():
            time.sleep(0.05)  # a partition: the connection opens but nothing ever answers
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._track(upstream)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self.frozen.is_set() and not self.closed.is_set():
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def freeze(self):
        self.frozen.set()

    def thaw(self):
        with self.lock:
            stale, self.sockets = list(self.sockets), set()
        for sock in stale:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.frozen.clear()

    def close(self):
        self.closed.set()
        self.listener.close()
        self.thaw()


def test_a_postgres_that_stops_answering_is_503_not_a_hang(servers, postgres_url):
    """A network partition: the database neither answers nor closes. PREFECT_API_DATABASE_TIMEOUT bounds
    the wait; the client's timeout (well above it) only tells a hang from a slow answer."""
    parts = urllib.parse.urlsplit(postgres_url)
    proxy = FreezableProxy(parts.hostname, parts.port or 5432)
    try:
        via_proxy = urllib.parse.urlunsplit(
            parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}")
        )
        server = servers(via_proxy, PREFECT_API_DATABASE_TIMEOUT=2)
        conn = Conn(server.api_url, timeout=30)
        flow = conn.request("POST", "/flows/", {"name": "partitioned"})[1]
        assert conn.request("POST", "/flow_runs/", {"flow_id": flow["id"]})[0] == 201
        proxy.freeze()
        answers = {}
        for what, method, path, body in [
            ("read", "GET", f"/flows/{flow['id']}", None),
            ("write", "POST", "/flows/", {"name": "while-partitioned"}),
            ("count", "POST", "/flow_runs/count", {}),
        ]:
            try:
                answers[what] = conn.request(method, path, body)[:2]
            except (OSError, http.client.HTTPException) as exc:
                answers[what] = f"no answer within 30 s: {type(exc).__name__}"
        proxy.thaw()
        wrong = {
            what: answer
            for what, answer in answers.items()
            if not (isinstance(answer, tuple) and _is_503_with_reason(*answer))
        }
        assert not wrong, f"while PostgreSQL did not answer: {wrong}"
        wait_until(
            lambda: conn.request("POST", "/flows/", {"name": "healed"})[0] in (200, 201),
            60,
            "a 2xx after the partition healed",
        )
        assert server.alive()
        conn.close()
    finally:
        proxy.close()


# --- a full disk and a read-only database file ---------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs, mounted for the test (needs root); unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(directory):
    """Write a file until the disk says no; returns its path."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError:
            pass
    with contextlib.suppress(OSError), open(filler, "ab") as fh:  # the last few bytes, one at a time
        while True:
            fh.write(b"\0")
            fh.flush()
    return filler


def assert_unavailable_not_crashed(server, conn, run_id):
    status, payload, headers = conn.request("POST", "/flows/", {"name": f"refused-{uuid.uuid4().hex[:6]}"})
    assert status == 503, (status, payload)
    assert headers.get("content-type", "").startswith("application/json")
    assert payload.get("detail") and payload.get("reason"), payload
    # reads still work, and the process is alive and healthy
    assert conn.request("GET", f"/flow_runs/{run_id}")[0] == 200
    assert conn.request("GET", "/health")[:2] == (200, True)
    assert server.alive()


def test_a_full_disk_is_503_with_a_reason_and_recovers(servers, small_disk):
    server = servers(f"sqlite:///{small_disk}/prefect.db")
    conn = Conn(server.api_url)
    try:
        flow = conn.request("POST", "/flows/", {"name": "disk"})[1]
        run = conn.request("POST", "/flow_runs/", {"flow_id": flow["id"]})[1]
        filler = fill(small_disk)
        big_line = "x" * 4000
        statuses = []
        for i in range(400):  # the WAL must grow: ~100 KB of log lines per request until the disk refuses
            status, payload, _ = conn.request(
                "POST",
                "/logs/",
                [
                    {
                        "name": "n",
                        "level": 20,
                        "message": f"{i} {j} {big_line}",
                        "timestamp": ts(),
                        "flow_run_id": run["id"],
                    }
                    for j in range(25)
                ],
            )
            statuses.append(status)
            if status == 503:
                assert payload.get("detail") and payload.get("reason"), payload
                break
            assert 200 <= status < 300, (status, payload)
        assert statuses[-1] == 503, f"the disk never filled up: {collections.Counter(statuses)}"
        assert_unavailable_not_crashed(server, conn, run["id"])
        filler.unlink()
        wait_until(
            lambda: conn.request("POST", "/flows/", {"name": "space-again"})[0] in (200, 201),
            30,
            "a 2xx once there is space again",
        )
        assert conn.request("POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": "RUNNING"}})[0] in (
            200,
            201,
        )
        assert server.alive()
    finally:
        conn.close()


def _chattr(flag, *paths):
    return subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, text=True)


def test_a_read_only_database_file_is_503_with_a_reason_and_recovers(tmp_path, servers):
    probe = tmp_path / "probe"
    probe.write_text("x")
    try:
        result = _chattr("+i", probe)
    except FileNotFoundError:
        pytest.skip("chattr is not installed")
    if result.returncode != 0:
        pytest.skip(f"this filesystem has no immutable flag: {result.stderr.strip()}")
    _chattr("-i", probe)
    folder = tmp_path / "ro"
    folder.mkdir()
    db_path = folder / "prefect.db"
    server = servers(f"sqlite:///{db_path}")
    conn = Conn(server.api_url)
    files = [db_path, folder / "prefect.db-wal"]
    try:
        flow = conn.request("POST", "/flows/", {"name": "read-only"})[1]
        run = conn.request("POST", "/flow_runs/", {"flow_id": flow["id"]})[1]
        assert all(p.exists() for p in files), sorted(p.name for p in folder.iterdir())
        result = _chattr("+i", *files)  # nobody, root included, may write these files now
        assert result.returncode == 0, result.stderr
        assert_unavailable_not_crashed(server, conn, run["id"])
        assert conn.request("POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": "RUNNING"}})[0] == 503
        _chattr("-i", *files)
        wait_until(
            lambda: conn.request("POST", "/flows/", {"name": "writable-again"})[0] in (200, 201),
            30,
            "a 2xx once the file is writable again",
        )
        status, payload, _ = conn.request("POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": "RUNNING"}})
        assert status in (200, 201) and payload["status"] == "ACCEPT", (status, payload)
        assert server.alive()
    finally:
        _chattr("-i", *files)
        conn.close()


# --- a notification receiver that hangs ----------------------------------------------------------


def new_block(client, slug, data):
    block_type = client.ok("GET", f"/block_types/slug/{slug}")
    schemas = client.ok(
        "POST", "/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}}
    )
    return client.ok(
        "POST",
        "/block_documents/",
        {
            "name": f"{slug}-{uuid.uuid4().hex[:8]}",
            "block_type_id": block_type["id"],
            "block_schema_id": schemas[0]["id"],
            "data": data,
        },
    )


def test_a_hanging_notification_receiver_does_not_slow_the_api(tmp_path, servers):
    with HTTPReceiver() as hook:
        hook.hold_timeout = 300
        hook.hold()
        server = servers(
            f"sqlite:///{tmp_path}/notify.db",
            PREFECT_NOTIFICATIONS_TIMEOUT=300,
            PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_LOOP_SECONDS=0.5,
        )
        client = server.client
        block = new_block(client, "slack-webhook", {"url": hook.url + "/services/T/B/hang"})
        client.ok(
            "POST",
            "/flow_run_notification_policies/",
            {"state_names": ["Failed"], "tags": [], "block_document_id": block["id"]},
        )
        flow = client.ok("POST", "/flows/", {"name": "hangs"})
        first = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})
        client.ok("POST", f"/flow_runs/{first['id']}/set_state", {"state": {"type": "FAILED"}, "force": True})
        assert hook.entered.wait(30), "the notification never reached the receiver"
        conn = Conn(server.api_url, timeout=REQUEST_TIMEOUT)
        try:
            for i in range(25):  # each of these also queues a notification behind the hanging one
                status, run, _ = conn.request(
                    "POST", "/flow_runs/", {"flow_id": flow["id"], "name": f"while-hanging-{i}"}
                )
                assert status == 201, (status, run)
                for target in ("RUNNING", "FAILED"):
                    status, result, _ = conn.request(
                        "POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": target}}
                    )
                    assert status in (200, 201) and result["status"] == "ACCEPT", (status, result)
            assert conn.request("POST", "/flow_runs/count", {})[:2] == (200, 26)
        finally:
            conn.close()
        assert hook.holding >= 1, "the receiver stopped hanging before the API calls were done"
        assert len(hook.hits) == 1, "one sender may be stuck, but nothing may be sent twice"
        hook.release()
        hits = hook.wait_for(26, timeout=60)
        assert len(hits) == 26
        assert server.alive()


# --- two servers on one PostgreSQL database ------------------------------------------------------


def _scheduler_passed(server):
    conn = Conn(server.api_url)
    try:
        status, text, _ = conn.request("GET", "/metrics")
    finally:
        conn.close()
    if status != 200 or not isinstance(text, str):
        return False
    for line in text.splitlines():
        if line.startswith("prefectlite_scheduler_lag_seconds"):
            return float(line.split()[-1]) > 0
    return False


def test_two_servers_share_one_postgres_database(servers, postgres_url):
    settings = dict(
        PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS=0.5,
        PREFECT_SERVER_METRICS_ENABLED=True,
        PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_LOOP_SECONDS=0.5,
        PREFECT_NOTIFICATIONS_RETRY_SECONDS=0.2,
    )
    # both start at once: they race on the migrations too
    a = servers(postgres_url, name="replica-a", wait=False, **settings)
    b = servers(postgres_url, name="replica-b", wait=False, **settings)
    a.wait_ready()
    b.wait_ready()

    # the SDK's write load, split across both
    load = WriteLoad([a.api_url, b.api_url], threads=6, runs_per_thread=8).start()
    load.finish(timeout=300)
    assert not load.failures, load.failures[:5]
    assert not load.bad, load.bad[:5]
    assert not load.not_accepted, load.not_accepted[:5]
    assert load.acked_count() == 48
    assert a.client.ok("POST", "/flow_runs/count", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}) == 48
    assert b.client.ok("POST", "/task_runs/count", {}) == 48 * 3
    assert_complete_runs(b.client, load.acked[:10])

    # a schedule created through one server, filled by both schedulers: no duplicates
    flow = a.client.ok("POST", "/flows/", {"name": "scheduled"})
    deployment = a.client.ok(
        "POST",
        "/deployments/",
        {"name": "every-minute", "flow_id": flow["id"], "schedules": [{"schedule": {"interval": 60}, "active": True}]},
    )
    wait_until(lambda: _scheduler_passed(a) and _scheduler_passed(b), 30, "both schedulers to run")
    runs_filter = {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}

    def count():
        return b.client.ok("POST", "/flow_runs/count", runs_filter)

    wait_until(lambda: count() >= 3, 30, "scheduled runs")
    seen = []  # stable over several passes of both schedulers
    wait_until(
        lambda: seen.append(count()) or (len(seen) >= 8 and len(set(seen[-8:])) == 1),
        60,
        "the number of scheduled runs to settle",
    )
    runs = a.client.ok("POST", "/flow_runs/filter", {**runs_filter, "limit": 200})
    times = [r["expected_start_time"] for r in runs]
    assert len(runs) == seen[-1]
    assert len(set(times)) == len(times), collections.Counter(times).most_common(3)
    assert all(r["state_type"] == "SCHEDULED" for r in runs)

    # a notification policy: each notification is sent once, whichever server queued it
    with HTTPReceiver() as hook:
        block = new_block(a.client, "slack-webhook", {"url": hook.url + "/services/T/B/once"})
        a.client.ok(
            "POST",
            "/flow_run_notification_policies/",
            {"state_names": ["Failed"], "tags": [], "block_document_id": block["id"]},
        )
        names = []
        for i in range(12):
            server = (a, b)[i % 2]
            run = server.client.ok(
                "POST", "/flow_runs/", {"flow_id": flow["id"], "name": f"fails-{i}-{uuid.uuid4().hex[:6]}"}
            )
            server.client.ok("POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": "FAILED"}, "force": True})
            names.append(run["name"])
        hook.wait_for(12, timeout=60)
        wait_until(lambda: a.client.ok("GET", "/flow_run_notification_queue/") == [], 60, "the queue to drain")
        for server in (a, b):  # a whole pass more of each sender: a duplicate under way has arrived by then
            wait_for_passes(server.api_url, "notifications", timeout=60)
        texts = [hit.json()["text"] for hit in hook.hits]
        assert len(texts) == 12, [t[:80] for t in texts]
        for name in names:
            assert sum(name in t for t in texts) == 1, (name, [t[:80] for t in texts])
    assert a.alive() and b.alive()
