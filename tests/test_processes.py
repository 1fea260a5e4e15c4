"""`prefectlite start --processes N` (section 26, "Several processes on one port"): forked processes
share the port and the database and still behave as one server: no errors under concurrent writes,
a client reads its own writes whichever process answers, live event subscribers get events stored
through any process, services (run by the first process) are woken by any, a crashed process is
replaced, and the whole group stops on one signal. Every server is a real `python prefectlite.py
start` on a free loopback port. Where it matters which process answers, a keep-alive connection is
pinned to a chosen process (the server side of its socket is found in /proc)."""

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import threading
import uuid

import pytest

from fake_receivers import HTTPReceiver
from helpers import Client, RawWebSocket, ServerProcess, run_cli, service_passes_in, wait_subscribed, wait_until


def home_env(tmp_path, **extra):
    return {"PREFECT_HOME": str(tmp_path / "home"), **extra}


@pytest.fixture
def processes(tmp_path):
    """Start `prefectlite start --processes N` servers; every one is stopped at the end of the test."""
    servers = []

    def start(count=2, **env):
        server = ServerProcess(tmp_path, home_env(tmp_path, **env), "--processes", str(count))
        servers.append(server)
        server.wait_ready()
        wait_until(lambda: len(children(server.proc.pid)) == count, 30, f"{count} serving processes")
        server.first_pids = children(server.proc.pid)  # still known once the supervisor is gone
        return server

    yield start
    for server in servers:
        for pid in set(children(server.proc.pid) + server.first_pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.kill()


def children(pid):
    """The pids of a process's children (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def socket_owner(server_port, client_port, pids):
    """Which of `pids` holds the server side of the loopback TCP connection from `client_port`."""
    wanted = f":{server_port:04X}", f":{client_port:04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[1].endswith(wanted[0]) and fields[2].endswith(wanted[1]):
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return pid
    return None


class Conn:
    """One keep-alive connection, and so one serving process: JSON requests over http.client."""

    def __init__(self, port):
        self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.http.connect()

    def ok(self, method, path, body=None, expect=(200, 201, 204)):
        data = None if body is None else json.dumps(body).encode()
        self.http.request(method, "/api" + path, body=data, headers={"Content-Type": "application/json"})
        response = self.http.getresponse()
        text = response.read()
        assert response.status in expect, (method, path, response.status, text)
        return json.loads(text) if text else None

    def close(self):
        self.http.close()


def served_by(server, pid, connect):
    """A connection (from `connect()`, with a .sock or an .http.sock) that process `pid` serves."""
    pids = children(server.proc.pid)
    for _ in range(100):
        conn = connect()
        sock = conn.sock if hasattr(conn, "sock") else conn.http.sock
        if socket_owner(server.port, sock.getsockname()[1], pids) == pid:
            return conn
        conn.close()
    raise AssertionError(f"no connection of 100 went to process {pid}")


def new_run(conn, flow):
    return conn.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})["id"]


def notification_passes(server, pid):
    """The passes the notification sender of process `pid` made (its /metrics)."""
    conn = served_by(server, pid, lambda: Conn(server.port))
    try:
        conn.http.request("GET", "/api/metrics")
        response = conn.http.getresponse()
        text = response.read().decode()
        assert response.status == 200, text
    finally:
        conn.close()
    return service_passes_in(text, "notifications")


def _write_from_threads(api_url, threads=8, runs_each=10):
    errors = []

    def write(n):
        client = Client(api_url)
        try:
            flow = client.ok("POST", "/flows/", {"name": f"flow-{n}"}, expect=(200, 201))
            for _ in range(runs_each):
                run = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})
                status, body = client.post(f"/flow_runs/{run['id']}/set_state", {"state": {"type": "RUNNING"}})
                if status != 201 or body["status"] != "ACCEPT":
                    errors.append((status, body))
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    workers = [threading.Thread(target=write, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    return errors


def test_processes_share_the_port_and_the_writes(processes):
    server = processes(2)
    assert "2 processes" in server.stdout()
    assert _write_from_threads(server.api_url) == []
    client = Client(server.api_url)
    assert client.ok("POST", "/flow_runs/count", {"flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}) == 80
    for pid in children(server.proc.pid):  # each process takes connections on the port, and writes
        conn = served_by(server, pid, lambda: Conn(server.port))
        try:
            conn.ok("POST", "/flows/", {"name": f"through-{pid}"})
        finally:
            conn.close()
    assert client.ok("POST", "/flows/count", {}) == 10


def test_processes_on_postgres_take_writes_without_errors(processes, postgres_url):
    server = processes(2, PREFECT_API_DATABASE_CONNECTION_URL=postgres_url)
    assert _write_from_threads(server.api_url, threads=6, runs_each=5) == []
    assert Client(server.api_url).ok("POST", "/flow_runs/count", {}) == 30


def test_a_client_reads_its_own_writes_whichever_process_answers(processes):
    """The read cache of every process sees the writes of all (counted in shared memory): a count
    cached by one process is not served after another process committed a new run."""
    server = processes(2, PREFECT_SERVER_READ_CACHE_SECONDS="60")
    first, second = children(server.proc.pid)
    on_first = served_by(server, first, lambda: Conn(server.port))
    on_second = served_by(server, second, lambda: Conn(server.port))
    try:
        flow = on_first.ok("POST", "/flows/", {"name": "mine"})
        for n in range(1, 6):
            for conn in (on_first, on_second, on_first, on_second):  # both processes cache the count
                assert conn.ok("POST", "/flow_runs/count", {}) == n - 1
            writer, reader = (on_first, on_second) if n % 2 else (on_second, on_first)
            writer.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})
            assert reader.ok("POST", "/flow_runs/count", {}) == n
            assert writer.ok("POST", "/flow_runs/count", {}) == n
    finally:
        on_first.close()
        on_second.close()


def test_live_event_subscribers_get_events_stored_through_any_process(processes):
    server = processes(2)
    first, second = children(server.proc.pid)
    for subscriber_pid, writer_pid in ((first, second), (second, first)):
        sub = served_by(server, subscriber_pid, lambda: RawWebSocket(server.api_url, path="/events/out"))
        writer = served_by(server, writer_pid, lambda: Conn(server.port))
        try:
            sub.authenticate()
            sub.send_json({"type": "filter", "filter": {"event": {"prefix": ["prefect.flow-run."]}}, "backfill": False})
            flow = writer.ok("POST", "/flows/", {"name": "watched"}, expect=(200, 201))
            probes = set()  # runs made until the subscriber got one: proof that its filter was read
            sub.sock.settimeout(15)
            got = wait_subscribed(sub, lambda: probes.add(new_run(writer, flow)))
            runs = {new_run(writer, flow) for _ in range(5)}
            seen = set()
            event = got["event"]
            while True:
                assert event["event"] == "prefect.flow-run.Pending", event
                seen.add(event["resource"]["prefect.resource.id"].rsplit(".", 1)[1])
                if runs <= seen:
                    break
                event = sub.recv_json()["event"]
            assert seen <= runs | probes, "an event of a run written by neither"
        finally:
            sub.close()
            writer.close()


def test_live_log_subscribers_get_logs_stored_through_any_process(processes):
    """With the log stream on (PREFECT_SERVER_LOGS_STREAM_*), a /logs/out subscriber of one process is sent
    the logs another process stored, as the events of /events/out."""
    server = processes(
        2, PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED="true", PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED="true"
    )
    first, second = children(server.proc.pid)
    for subscriber_pid, writer_pid in ((first, second), (second, first)):
        sub = served_by(server, subscriber_pid, lambda: RawWebSocket(server.api_url, path="/logs/out"))
        writer = served_by(server, writer_pid, lambda: Conn(server.port))
        run_id = str(uuid.uuid4())

        def log(message):
            return {
                "name": "t",
                "level": 20,
                "message": message,
                "timestamp": "2026-01-01T00:00:00Z",
                "flow_run_id": run_id,
            }

        try:
            sub.authenticate()
            sub.send_json({"type": "filter", "filter": {"flow_run_id": {"any_": [run_id]}}})
            sub.sock.settimeout(15)
            got = [wait_subscribed(sub, lambda: writer.ok("POST", "/logs/", [log("probe")]))["log"]]
            writer.ok("POST", "/logs/", [log("from the other process"), log("last")])
            while got[-1]["message"] != "last":
                got.append(sub.recv_json()["log"])
            assert [g["message"] for g in got if g["message"] != "probe"] == ["from the other process", "last"]
        finally:
            sub.close()
            writer.close()


def test_a_task_worker_connected_to_one_process_is_listed_by_the_other(processes):
    """POST /task_workers/filter (3.x) answers for the whole server, whichever process serves the request."""
    server = processes(2)
    first, second = children(server.proc.pid)
    worker = served_by(server, first, lambda: RawWebSocket(server.api_url, path="/task_runs/subscriptions/scheduled"))
    asker = served_by(server, second, lambda: Conn(server.port))
    try:
        worker.authenticate()
        worker.send_json({"type": "subscribe", "keys": ["k1", "k2"], "client_id": "w"})
        listed = wait_until(lambda: asker.ok("POST", "/task_workers/filter", {}), what="the worker listed")
        assert [(w["identifier"], w["task_keys"]) for w in listed] == [("w", ["k1", "k2"])], listed
        worker.send_json({"type": "quit"})
        worker.expect_close()
        wait_until(lambda: asker.ok("POST", "/task_workers/filter", {}) == [], what="the worker unlisted")
    finally:
        worker.close()
        asker.close()


def test_services_run_in_one_process_and_any_process_wakes_them(processes):
    """A Failed state set through any process is notified once, long before the sender's own
    60-second loop would have found it: the process that recorded it woke the first process."""
    with HTTPReceiver() as hook:
        server = processes(
            2, PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_LOOP_SECONDS="60", PREFECT_SERVER_METRICS_ENABLED="true"
        )
        client = Client(server.api_url)
        block_type = client.ok("GET", "/block_types/slug/slack-webhook")
        schema = client.ok(
            "POST", "/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}}
        )[0]
        block = client.ok(
            "POST",
            "/block_documents/",
            {
                "name": "hook",
                "block_type_id": block_type["id"],
                "block_schema_id": schema["id"],
                "data": {"url": hook.url + "/services/T/B/x"},
            },
        )
        client.ok(
            "POST",
            "/flow_run_notification_policies/",
            {"state_names": ["Failed"], "tags": [], "block_document_id": block["id"]},
        )
        first, second = children(server.proc.pid)  # process 0 runs the services, process 1 none
        # the sender's first pass (at its start) is over: from now on only a wake-up is prompt
        wait_until(lambda: notification_passes(server, first) >= 1, 30, "the sender's first pass")
        conn = served_by(server, second, lambda: Conn(server.port))
        try:
            flow = conn.ok("POST", "/flows/", {"name": "failing"})
            names = [f"failing-run-{n}" for n in range(6)]
            for name in names:
                run = conn.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "name": name})
                conn.ok("POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": "FAILED"}}, expect=(201,))
        finally:
            conn.close()
        hook.wait_for(6, timeout=30)
        # nothing more comes: a row leaves the queue only after its send was answered
        wait_until(lambda: client.ok("GET", "/flow_run_notification_queue/") == [], 30, "the queue to drain")
        assert len(hook.hits) == 6, [h.body for h in hook.hits]
        for name in names:
            assert sum(name.encode() in h.body for h in hook.hits) == 1, name


def test_a_crashed_process_is_replaced_and_one_signal_stops_them_all(processes):
    server = processes(2)
    first, second = children(server.proc.pid)
    os.kill(second, signal.SIGKILL)
    wait_until(
        lambda: len(children(server.proc.pid)) == 2 and second not in children(server.proc.pid),
        30,
        "a new process in place of the killed one",
    )
    assert re.search(r"process \d ended \(killed by signal 9\); starting it again", server.stderr())
    assert _write_from_threads(server.api_url, threads=4, runs_each=3) == []
    pids = children(server.proc.pid)
    assert server.stop(signal.SIGTERM) == 0
    assert server.stdout().rstrip().endswith("stopped")
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    assert "Traceback" not in server.stderr()


def test_the_processes_stop_when_their_supervisor_is_killed(processes):
    """kill -9 of the supervising process: the serving processes notice and stop (and free the port)
    rather than serve on unsupervised."""
    server = processes(2)
    pids = children(server.proc.pid)
    server.proc.kill()
    server.proc.wait(30)
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), 30, "the orphans to stop")
    with socket.socket() as sock:  # the port is free again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", server.port))
    assert "the supervising process is gone" in server.stderr()


def test_a_second_signal_stops_every_process_at_once(processes):
    server = processes(2)
    pids = children(server.proc.pid)
    server.proc.send_signal(signal.SIGTERM)
    server.proc.send_signal(signal.SIGINT)
    # either handler may run first (pending signals are handled in signal order), or the gentle stop
    # may be over before the second arrives; in every case no process is left behind
    assert server.proc.wait(30) in (0, 128 + signal.SIGINT, 128 + signal.SIGTERM)
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), 30, "no process left")


@pytest.mark.parametrize("value", ["0", "65", "-1", "two"])
def test_a_bad_number_of_processes_is_a_one_line_error(tmp_path, value):
    proc = run_cli("start", "--processes", value, env=home_env(tmp_path), input_text="", timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "processes" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_processes_cannot_share_an_in_memory_database(tmp_path):
    proc = run_cli(
        "start",
        "--processes",
        "2",
        env=home_env(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL="sqlite:///:memory:"),
        input_text="",
        timeout=60,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "in-memory" in lines[0], proc.stderr


def test_a_process_that_keeps_failing_at_start_stops_the_server(tmp_path):
    """Here the processes cannot open <db>.write-lock (a folder stands there): each of the first
    process's starts fails at once, and after three the server gives up (exit 1), leaving nothing."""
    home = tmp_path / "home"
    (home / "prefectlite.db.write-lock").mkdir(parents=True)
    proc = run_cli("start", "--port", "0", "--processes", "2", env=home_env(tmp_path), input_text="", timeout=120)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "cannot open the lock files" in proc.stderr
    assert "times right after starting" in proc.stderr
    assert "Traceback" not in proc.stderr
