"""The command line (section 27), run for real in subprocesses: start / server start and signals,
config, profile, database, version, and every kind of bad input (one line on stderr, non-zero exit,
no traceback, nothing changed). Every subprocess gets its own PREFECT_HOME under tmp_path."""

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request

import pytest

from helpers import Client, LockHolder, ROOT, ServerProcess, clean_env, free_port, run_cli, wait_for_health, wait_until

import prefectlite

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"


def home_env(tmp_path, **extra):
    return {"PREFECT_HOME": str(tmp_path / "home"), **extra}


def assert_one_line_error(proc):
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def revision_ids():
    return [r.id for r in prefectlite.list_revisions()]


def current(env):
    proc = run_cli("database", "current", env=env, input_text="")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _db_dump(path):
    """A SQLite file's logical content (schema and rows); WAL checkpoints change bytes, not this."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def snapshot(path):
    """Everything under `path` (names and contents), to prove that nothing changed."""
    if not os.path.lexists(path):
        return None
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            return fh.read()
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if name.endswith(("-wal", "-shm")):
                continue  # SQLite's sidecar files come and go with connections
            if name.endswith(".db"):
                out[os.path.relpath(full, path)] = _db_dump(full)
                continue
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


@pytest.fixture
def started(tmp_path):
    servers = []

    def start(env, **kw):
        server = ServerProcess(tmp_path, env, **kw)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.kill()


# ---------------------------------------------------------------------------------------------
# start


@pytest.mark.parametrize("command", [("start",), ("server", "start")])
def test_start_prints_urls_and_answers_health(tmp_path, started, command):
    server = started(home_env(tmp_path), command=command)
    assert Client(server.api_url).get("/health") == (200, True)
    out = server.stdout()
    assert f"http://127.0.0.1:{server.port}/" in out  # the UI
    assert f"http://127.0.0.1:{server.port}/api" in out  # the API
    assert server.stop() == 0


def test_start_uses_the_port_setting(tmp_path):
    port = free_port()
    env = home_env(tmp_path, PREFECT_SERVER_API_PORT=str(port))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "prefectlite.py"), "start"],
        env=clean_env(**env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert wait_for_health(f"http://127.0.0.1:{port}/api", timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_start_on_postgres(tmp_path, started, postgres_url):
    server = started(home_env(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL=postgres_url))
    client = Client(server.api_url)
    assert client.get("/health") == (200, True)
    client.ok("POST", "/flows/", {"name": "on-postgres"})
    assert server.stop() == 0
    assert current(home_env(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL=postgres_url)) == revision_ids()[-1]


@contextlib.contextmanager
def _a_write_in_flight(tmp_path, started, name):
    """A server with one flow ("before") and a write of flow `name` waiting inside it for the database,
    whose write lock another process holds until the block ends. Yields (server, db path, {"reply": ...})."""
    db_path = tmp_path / "home" / "prefectlite.db"
    server = started(home_env(tmp_path, PREFECT_API_DATABASE_TIMEOUT="60"))
    client = Client(server.api_url)
    client.ok("POST", "/flows/", {"name": "before"})
    holder = LockHolder(db_path)
    result = {}

    def write():
        try:
            result["reply"] = client.post("/flows/", {"name": name})
        except Exception as exc:  # noqa: BLE001 - e.g. the connection cut when the server stops at once
            result["reply"] = exc

    writer = threading.Thread(target=write, daemon=True)
    try:
        writer.start()
        # a later connection served means the earlier one was accepted; then give the worker a moment
        assert wait_for_health(server.api_url)
        time.sleep(0.5)  # by design: nothing may happen in this window (no event says "blocked on the lock")
        assert "reply" not in result, f"the write did not wait for the lock: {result}"
        yield server, db_path, result
    finally:
        holder.release()
        writer.join(60)
        assert not writer.is_alive()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_in_flight_request_closes_database_and_exits_0(tmp_path, started, signum):
    with _a_write_in_flight(tmp_path, started, "in-flight") as (server, db_path, result):
        server.proc.send_signal(signum)
        # the shutdown has begun (it says so) while the request is still waiting
        wait_until(lambda: "stopping" in server.stdout(), 10, "the server to begin stopping")
    reply = result.get("reply")
    assert isinstance(reply, tuple) and reply[0] in (200, 201), reply
    assert server.proc.wait(30) == 0, server.stderr()
    assert "Traceback" not in server.stderr()
    # the write is durable and the database was closed cleanly (the last close checkpoints the WAL)
    wal = db_path.with_name(db_path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "the server exited without closing its database"
    assert sorted(_flows(db_path)) == ["before", "in-flight"]


def test_a_second_signal_stops_at_once(tmp_path, started):
    """The first signal waits for the requests in flight; someone who will not wait signals again and
    the process ends at once (128 + the signal). Committed writes stay; the dropped one rolled back."""
    with _a_write_in_flight(tmp_path, started, "dropped") as (server, db_path, _result):
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping" in server.stdout(), 10, "the server to begin stopping")
        assert "Ctrl+C again" in server.stdout()
        assert server.proc.poll() is None, "the first signal must wait for the request in flight"
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(10) == 128 + signal.SIGINT  # not 0: it did not wait for the write
    assert "stopped at once" in server.stderr()
    assert "Traceback" not in server.stderr()
    assert _flows(db_path) == ["before"]
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_on_an_idle_server_exits_0_and_stops_listening(tmp_path, started, signum):
    server = started(home_env(tmp_path))
    # an idle keep-alive connection must not keep the server alive
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    conn.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200" in conn.recv(4096).split(b"\r\n", 1)[0]
    try:
        assert server.stop(signum) == 0, server.stderr()
    finally:
        conn.close()
    assert "Traceback" not in server.stderr()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.api_url + "/health", timeout=5)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_as_soon_as_the_server_answers_exits_0(tmp_path, signum):
    """A supervisor may stop the server the moment it is healthy: still a clean exit 0, no traceback."""
    server = ServerProcess(tmp_path, home_env(tmp_path))
    try:
        assert wait_for_health(server.api_url, timeout=30), server.stderr()
        code = server.stop(signum)
    finally:
        server.kill()
    assert code == 0, (code, server.stderr())
    assert "Traceback" not in server.stderr()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_server_whose_parent_blocks_the_stop_signals_still_stops_on_them(tmp_path, signum):
    """A signal mask is inherited across fork and exec: a supervisor (or a test runner's worker) that
    blocks SIGTERM while it starts the server must not make a server that never hears it."""
    server = ServerProcess(tmp_path, home_env(tmp_path), blocked_signals={signal.SIGINT, signal.SIGTERM})
    try:
        server.wait_ready()
        code = server.stop(signum)
    finally:
        server.kill()
    assert code == 0, (code, server.stderr())


def _blocked_signals(pid, tid):
    """The signals a thread of process `pid` blocks, from Linux's /proc (SigBlk is a hex bit mask)."""
    status = open(f"/proc/{pid}/task/{tid}/status").read()
    mask = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return {signum for signum in (signal.SIGINT, signal.SIGTERM) if mask & (1 << (signum - 1))}


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread signal masks from Linux's /proc")
@pytest.mark.parametrize("launch", ["script", "module"])
def test_stop_signals_reach_the_main_thread_only(tmp_path, launch):
    """The kernel gives a process's SIGTERM to any thread that does not block it, but Python runs the
    handler in the main thread only, once that wakes. A script's main thread sleeps with no time limit
    (cmd_start), so a signal taken by a worker thread left the server running: every other thread must
    block SIGINT and SIGTERM, including worker threads started later, under load (and, run as a script, the
    main thread too: see cmd_start)."""
    port = free_port()
    if launch == "script":
        argv = [sys.executable, str(ROOT / "prefectlite.py")]
    else:
        argv = [sys.executable, "-m", "prefectlite"]
    env = clean_env(**home_env(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [*argv, "start", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        api_url = f"http://127.0.0.1:{port}/api"
        assert wait_for_health(api_url, timeout=30)
        threads = [
            threading.Thread(
                target=lambda: [Client(api_url).ok("POST", "/flows/", {"name": f"f{i}"}) for i in range(5)]
            )
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        tids = sorted(int(tid) for tid in os.listdir(f"/proc/{proc.pid}/task"))
        assert len(tids) > 3, tids  # the accept thread, services, workers started by the load
        # A script's main thread waits in the interpreter's wait for non-daemon threads, where a signal that
        # came just before the wait began was never handled: there every thread blocks the signals and one
        # thread takes them with sigwait(). Imported (-m), the main thread polls, and takes them itself.
        # (Linux unblocks the waited-for signals of a thread while it is in sigwait(): that thread shows none.)
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        others = {tid: _blocked_signals(proc.pid, tid) for tid in tids if tid != proc.pid}
        if launch == "script":
            assert _blocked_signals(proc.pid, proc.pid) == stop_signals
            assert sorted(map(sorted, others.values())) == [[]] + [sorted(stop_signals)] * (len(others) - 1), others
        else:
            assert _blocked_signals(proc.pid, proc.pid) == set()
            assert others == {tid: stop_signals for tid in others}
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and out.rstrip().endswith("stopped"), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def test_port_already_in_use_is_one_line_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        proc = run_cli(
            "start", "--host", "127.0.0.1", "--port", str(port), env=home_env(tmp_path), input_text="", timeout=60
        )
    line = assert_one_line_error(proc)
    assert str(port) in line


def test_lock_files_that_cannot_be_opened_are_a_one_line_error(tmp_path):
    home = tmp_path / "home"
    (home / "prefectlite.db.write-lock").mkdir(parents=True)
    proc = run_cli("start", "--port", "0", env=home_env(tmp_path), input_text="", timeout=60)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot open the lock files" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# config


def _view(env, *flags):
    proc = run_cli("config", "view", *flags, env=env, input_text="")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _line(output, key):
    found = [line for line in output.splitlines() if line.startswith(key + "=") or line.startswith(key + " ")]
    return found[0] if found else None


def test_config_set_writes_profiles_toml_and_view_shows_it(tmp_path):
    env = home_env(tmp_path)
    proc = run_cli("config", "set", "PREFECT_SERVER_API_PORT=4321", "PREFECT_UI_ENABLED=false", env=env, input_text="")
    assert proc.returncode == 0, proc.stderr
    data = tomllib.loads((tmp_path / "home" / "profiles.toml").read_text())
    values = data["profiles"][data["active"]]
    assert str(values["PREFECT_SERVER_API_PORT"]) == "4321"
    assert str(values["PREFECT_UI_ENABLED"]).lower() == "false"
    out = _view(env)
    assert "4321" in _line(out, "PREFECT_SERVER_API_PORT")
    assert "false" in _line(out, "PREFECT_UI_ENABLED").lower()
    assert _line(out, "PREFECT_SERVER_WORKERS") is None  # a default, hidden without --show-defaults


def test_config_view_show_sources_names_env_profile_default(tmp_path):
    env = home_env(tmp_path)
    assert (
        run_cli(
            "config", "set", "PREFECT_SERVER_API_PORT=4321", "PREFECT_API_DEFAULT_LIMIT=77", env=env, input_text=""
        ).returncode
        == 0
    )
    out = _view({**env, "PREFECT_API_DEFAULT_LIMIT": "88"}, "--show-sources", "--show-defaults")
    port = _line(out, "PREFECT_SERVER_API_PORT")
    assert "4321" in port and "profile" in port
    limit = _line(out, "PREFECT_API_DEFAULT_LIMIT")
    assert "88" in limit and "env" in limit and "77" not in limit
    workers = _line(out, "PREFECT_SERVER_WORKERS")
    assert workers is not None and "64" in workers and "default" in workers
    plain = _view(env)
    assert "(from" not in plain and "profile)" not in plain


def test_config_view_show_defaults(tmp_path):
    out = _view(home_env(tmp_path), "--show-defaults")
    for name in prefectlite.SETTINGS:
        assert _line(out, name) is not None, name


def test_config_unset(tmp_path):
    env = home_env(tmp_path)
    assert (
        run_cli(
            "config", "set", "PREFECT_SERVER_API_PORT=4321", "PREFECT_API_DEFAULT_LIMIT=77", env=env, input_text=""
        ).returncode
        == 0
    )
    proc = run_cli("config", "unset", "PREFECT_SERVER_API_PORT", env=env, input_text="")
    assert proc.returncode == 0, proc.stderr
    data = tomllib.loads((tmp_path / "home" / "profiles.toml").read_text())
    values = data["profiles"][data["active"]]
    assert "PREFECT_SERVER_API_PORT" not in values
    assert str(values["PREFECT_API_DEFAULT_LIMIT"]) == "77"
    out = _view(env, "--show-sources", "--show-defaults")
    assert "4200" in _line(out, "PREFECT_SERVER_API_PORT") and "default" in _line(out, "PREFECT_SERVER_API_PORT")


def test_config_set_database_url_is_used_by_database_commands(tmp_path):
    env = home_env(tmp_path)
    target = tmp_path / "elsewhere" / "custom.db"
    assert (
        run_cli(
            "config", "set", f"PREFECT_API_DATABASE_CONNECTION_URL=sqlite:///{target}", env=env, input_text=""
        ).returncode
        == 0
    )
    proc = run_cli("database", "upgrade", "-y", env=env, input_text="")
    assert proc.returncode == 0, proc.stderr
    assert target.is_file()
    assert not (tmp_path / "home" / "prefectlite.db").exists()


# ---------------------------------------------------------------------------------------------
# profile


def _profiles(env):
    proc = run_cli("profile", "ls", env=env, input_text="")
    assert proc.returncode == 0, proc.stderr
    names, active = [], None
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        name = line.strip().lstrip("*").strip()
        names.append(name)
        if line.lstrip().startswith("*"):
            active = name
    return names, active


def test_profile_lifecycle(tmp_path):
    env = home_env(tmp_path)
    toml_path = tmp_path / "home" / "profiles.toml"
    assert _profiles(env) == (["default"], "default")

    assert run_cli("profile", "create", "dev", env=env, input_text="").returncode == 0
    assert "dev" in tomllib.loads(toml_path.read_text())["profiles"]
    names, active = _profiles(env)
    assert sorted(names) == ["default", "dev"] and active == "default"

    proc = run_cli("profile", "use", "dev", env=env, input_text="")
    assert proc.returncode == 0, proc.stderr
    assert tomllib.loads(toml_path.read_text())["active"] == "dev"
    assert _profiles(env)[1] == "dev"

    assert run_cli("config", "set", "PREFECT_SERVER_API_PORT=4555", env=env, input_text="").returncode == 0
    data = tomllib.loads(toml_path.read_text())
    assert str(data["profiles"]["dev"]["PREFECT_SERVER_API_PORT"]) == "4555"
    assert "PREFECT_SERVER_API_PORT" not in data["profiles"].get("default", {})

    inspect_dev = run_cli("profile", "inspect", "dev", env=env, input_text="")
    assert (
        inspect_dev.returncode == 0 and "PREFECT_SERVER_API_PORT" in inspect_dev.stdout and "4555" in inspect_dev.stdout
    )
    inspect_active = run_cli("profile", "inspect", env=env, input_text="")
    assert inspect_active.returncode == 0 and "4555" in inspect_active.stdout
    inspect_default = run_cli("profile", "inspect", "default", env=env, input_text="")
    assert inspect_default.returncode == 0 and "4555" not in inspect_default.stdout

    assert_one_line_error(run_cli("profile", "delete", "dev", env=env, input_text=""))  # the active one
    assert "dev" in tomllib.loads(toml_path.read_text())["profiles"]

    assert run_cli("profile", "use", "default", env=env, input_text="").returncode == 0
    proc = run_cli("profile", "delete", "dev", env=env, input_text="")
    assert proc.returncode == 0, proc.stderr
    assert "dev" not in tomllib.loads(toml_path.read_text())["profiles"]
    assert _profiles(env) == (["default"], "default")


def test_profile_settings_follow_the_active_profile(tmp_path):
    env = home_env(tmp_path)
    assert run_cli("profile", "create", "dev", env=env, input_text="").returncode == 0
    assert run_cli("profile", "use", "dev", env=env, input_text="").returncode == 0
    assert run_cli("config", "set", "PREFECT_API_DEFAULT_LIMIT=5", env=env, input_text="").returncode == 0
    assert "5" in _line(_view(env, "--show-sources"), "PREFECT_API_DEFAULT_LIMIT")
    assert run_cli("profile", "use", "default", env=env, input_text="").returncode == 0
    assert _line(_view(env), "PREFECT_API_DEFAULT_LIMIT") is None


@pytest.mark.parametrize(
    "args",
    [
        ("profile", "use", "nope"),
        ("profile", "delete", "nope"),
        ("profile", "inspect", "nope"),
        ("profile", "create", "default"),
        ("profile", "create"),
        ("profile", "frobnicate"),
    ],
)
def test_profile_bad_input(tmp_path, args):
    env = home_env(tmp_path)
    assert run_cli("profile", "create", "keep", env=env, input_text="").returncode == 0
    before = snapshot(tmp_path / "home")
    assert_one_line_error(run_cli(*args, env=env, input_text=""))
    assert snapshot(tmp_path / "home") == before


# ---------------------------------------------------------------------------------------------
# database commands and their confirmation


def _seed(env, tmp_path):
    """Upgrade and store one flow through SQL; returns the database path."""
    assert run_cli("database", "upgrade", "-y", env=env, input_text="").returncode == 0
    path = tmp_path / "home" / "prefectlite.db"
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute("INSERT INTO flow (id, created, updated, name) VALUES ('f1', 't', 't', 'keep-me')")
    finally:
        conn.close()
    return path


def _flows(path):
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT name FROM flow")]
    finally:
        conn.close()


@pytest.mark.parametrize("answer", ["n\n", "", "no\n", "maybe\n"], ids=["n", "EOF", "no", "other"])
@pytest.mark.parametrize("action", ["reset", "downgrade", "upgrade"])
def test_database_commands_ask_and_change_nothing_without_yes(tmp_path, action, answer):
    env = home_env(tmp_path)
    path = _seed(env, tmp_path)
    if action == "upgrade":
        assert run_cli("database", "downgrade", "-y", env=env, input_text="").returncode == 0
    before = current(env)
    proc = run_cli("database", action, env=env, input_text=answer)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    assert current(env) == before
    assert _flows(path) == ["keep-me"]


@pytest.mark.parametrize("action", ["reset", "downgrade", "upgrade"])
def test_database_commands_proceed_when_the_answer_is_yes(tmp_path, action):
    env = home_env(tmp_path)
    path = _seed(env, tmp_path)
    ids = revision_ids()
    if action == "upgrade":
        assert run_cli("database", "downgrade", "-y", env=env, input_text="").returncode == 0
    proc = run_cli("database", action, env=env, input_text="y\n")
    assert proc.returncode == 0, proc.stderr
    if action == "reset":
        assert current(env) == ids[-1]
        assert _flows(path) == []
    elif action == "downgrade":
        assert current(env) == ids[-2]
    else:
        assert current(env) == ids[-1]
        assert _flows(path) == ["keep-me"]


def test_database_reset_y_empties_and_stays_at_head(tmp_path):
    env = home_env(tmp_path)
    path = _seed(env, tmp_path)
    proc = run_cli("database", "reset", "-y", env=env, input_text="")
    assert proc.returncode == 0, proc.stderr
    assert _flows(path) == []
    assert current(env) == revision_ids()[-1]


def test_database_upgrade_to_a_revision_and_history(tmp_path):
    env = home_env(tmp_path)
    ids = revision_ids()
    assert "no database file" in assert_one_line_error(run_cli("database", "current", env=env))
    assert run_cli("database", "upgrade", "-y", "-r", ids[0], env=env, input_text="").returncode == 0
    assert current(env) == ids[0]
    history = run_cli("database", "history", env=env, input_text="")
    assert history.returncode == 0
    for rev in prefectlite.list_revisions():
        assert rev.id in history.stdout and rev.name in history.stdout
    assert re.search(rf"^{ids[0]}\b.*current", history.stdout, re.M), history.stdout
    assert run_cli("database", "upgrade", "-y", env=env, input_text="").returncode == 0
    assert current(env) == ids[-1]
    assert run_cli("database", "downgrade", "-y", "-r", "base", env=env, input_text="").returncode == 0
    assert "no prefectlite schema" in assert_one_line_error(run_cli("database", "current", env=env))


# ---------------------------------------------------------------------------------------------
# version


def test_version_sqlite(tmp_path):
    proc = run_cli("version", env=home_env(tmp_path), input_text="")
    assert proc.returncode == 0, proc.stderr
    assert prefectlite.__version__ in proc.stdout
    assert "0.8.4" in proc.stdout
    assert "sqlite" in proc.stdout.lower()
    assert sqlite3.sqlite_version in proc.stdout
    assert "no database file" in proc.stdout
    assert not (tmp_path / "home" / "prefectlite.db").exists()  # not created to tell a version


def test_version_postgres(tmp_path, postgres_url):
    import psycopg

    with psycopg.connect(postgres_url) as conn:
        server_version = conn.execute("SHOW server_version").fetchone()[0]
    proc = run_cli("version", env=home_env(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL=postgres_url), input_text="")
    assert proc.returncode == 0, proc.stderr
    assert prefectlite.__version__ in proc.stdout and "0.8.4" in proc.stdout
    assert "postgresql" in proc.stdout.lower()
    assert server_version in proc.stdout


# ---------------------------------------------------------------------------------------------
# bad input: one line on stderr, non-zero exit, no traceback, nothing changed


@pytest.fixture
def seeded_home(tmp_path):
    """A PREFECT_HOME with a profile value and an upgraded database holding one flow."""
    env = home_env(tmp_path)
    assert run_cli("config", "set", "PREFECT_API_DEFAULT_LIMIT=42", env=env, input_text="").returncode == 0
    _seed(env, tmp_path)
    return env


@pytest.mark.parametrize(
    "args",
    [
        ("config", "set", "PREFECT_API_DATABASE_CONECTION_URL=sqlite:///x.db"),
        ("config", "set", "PREFECT_SERVER_API_PRT=1"),
        ("config", "set", "PREFECT_API_DEFAULT_LIMIT=1", "NOT_A_SETTING=2"),
        ("config", "unset", "PREFECT_SERVER_API_PRT"),
        ("config", "set", "PREFECT_SERVER_API_PORT=abc"),
        ("config", "set", "PREFECT_API_DATABASE_ECHO=maybe"),
        ("config", "set", "NO_EQUALS_SIGN"),
        ("config", "set", "PREFECT_API_DATABASE_CONNECTION_URL=not-a-url"),
        ("config", "set", "PREFECT_API_DATABASE_CONNECTION_URL=mysql://u@h/db"),
        ("config", "set", "PREFECT_API_DATABASE_CONNECTION_URL=postgresql://host-without-db"),
        ("config", "unset", "PREFECT_SERVER_API_PORT"),  # not set in the profile
        ("database", "upgrade", "-y", "-r", "9999"),
        ("database", "downgrade", "-y", "-r", "9999"),
        ("database", "downgrade", "-y", "-r", "-99"),
        ("database", "frobnicate"),
        ("frobnicate",),
        (),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, seeded_home, args):
    before = snapshot(tmp_path / "home")
    revision = current(seeded_home)
    line = assert_one_line_error(run_cli(*args, env=seeded_home, input_text=""))
    if "PRT" in " ".join(args):
        assert "PREFECT_SERVER_API_PORT" in line
    if "CONECTION" in " ".join(args):
        assert "PREFECT_API_DATABASE_CONNECTION_URL" in line
    assert snapshot(tmp_path / "home") == before
    assert current(seeded_home) == revision
    assert _flows(tmp_path / "home" / "prefectlite.db") == ["keep-me"]


@pytest.mark.parametrize(
    "url", ["not-a-url", "sqlite://relative.db", "mysql://u@h/db", "postgresql://u@h:port/db", UNREACHABLE]
)
@pytest.mark.parametrize(
    "args",
    [
        ("database", "upgrade", "-y"),
        ("database", "downgrade", "-y"),
        ("database", "reset", "-y"),
        ("database", "current"),
        ("start", "--host", "127.0.0.1", "--port", "0"),
    ],
)
def test_bad_or_unreachable_database_url_is_one_line(tmp_path, seeded_home, url, args):
    before = snapshot(tmp_path / "home")
    proc = run_cli(*args, env={**seeded_home, "PREFECT_API_DATABASE_CONNECTION_URL": url}, input_text="", timeout=60)
    assert_one_line_error(proc)
    assert snapshot(tmp_path / "home") == before


def test_downgrade_below_base_on_an_empty_database(tmp_path):
    env = home_env(tmp_path)
    assert_one_line_error(run_cli("database", "downgrade", "-y", env=env, input_text=""))
    assert not (tmp_path / "home" / "prefectlite.db").exists()


# Database commands never guess: with a PREFECT_HOME exported for a Prefect installation, `current` said
# "base" and created an empty prefectlite.db there, `backup` copied that, `prune` ended in a traceback.

_ON_AN_EXISTING_DATABASE = [
    ("current",),
    ("backup", "{tmp}/copy.db"),
    ("prune", "--older-than", "30d", "--dry-run"),
    ("vacuum",),
    ("restore", "{tmp}/copy.db", "-y"),
    ("downgrade", "-y"),
]


def _prefect_installation(tmp_path):
    """A PREFECT_HOME as Prefect itself leaves it: its profiles and its own database, no prefectlite.db."""
    home = tmp_path / "dot-prefect"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "ephemeral"\n\n[profiles.ephemeral]\nPREFECT_API_URL = "http://127.0.0.1:4200/api"\n'
    )
    conn = sqlite3.connect(home / "prefect.db")
    conn.execute("CREATE TABLE flow_run (id TEXT PRIMARY KEY)")
    conn.commit()
    conn.close()
    return home


@pytest.mark.parametrize("args", _ON_AN_EXISTING_DATABASE, ids=lambda a: a[0])
def test_database_commands_refuse_a_missing_file_naming_it_and_prefect_home_from_the_environment(tmp_path, args):
    home = _prefect_installation(tmp_path)
    (tmp_path / "copy.db").write_bytes(b"")  # restore's source: the refusal comes before it is read
    before = sorted(p.name for p in home.iterdir())
    proc = run_cli("database", *(a.format(tmp=tmp_path) for a in args), env={"PREFECT_HOME": str(home)}, input_text="")
    line = assert_one_line_error(proc)
    assert proc.returncode == 1
    assert str(home / "prefectlite.db") in line, line
    assert f"PREFECT_HOME={home} from the environment" in line, line
    assert sorted(p.name for p in home.iterdir()) == before  # no file created
    assert (tmp_path / "copy.db").read_bytes() == b""


@pytest.mark.parametrize("args", _ON_AN_EXISTING_DATABASE, ids=lambda a: a[0])
def test_database_commands_refuse_a_file_without_our_schema_and_change_nothing(tmp_path, args):
    home = _prefect_installation(tmp_path)
    url = f"sqlite:///{home / 'prefect.db'}"  # Prefect's own database, named by the environment
    before = (home / "prefect.db").read_bytes()
    proc = run_cli(
        "database",
        *(a.format(tmp=tmp_path) for a in args),
        env={"PREFECT_HOME": str(home), "PREFECT_API_DATABASE_CONNECTION_URL": url},
        input_text="",
    )
    line = assert_one_line_error(proc)
    assert str(home / "prefect.db") in line and "no prefectlite schema" in line, line
    assert "PREFECT_API_DATABASE_CONNECTION_URL from the environment" in line, line
    assert (home / "prefect.db").read_bytes() == before
    assert not (tmp_path / "copy.db").exists()


def test_a_missing_database_named_by_a_profile_says_which_profile(tmp_path):
    env = home_env(tmp_path)
    target = tmp_path / "elsewhere" / "x.db"
    assert run_cli("config", "set", f"PREFECT_API_DATABASE_CONNECTION_URL=sqlite:///{target}", env=env).returncode == 0
    line = assert_one_line_error(run_cli("database", "current", env=env))
    assert str(target) in line and "PREFECT_API_DATABASE_CONNECTION_URL from profile 'default'" in line, line
    assert not target.parent.exists()
    # the default URL under the default PREFECT_HOME: said so
    env = {"HOME": str(tmp_path / "user")}
    line = assert_one_line_error(run_cli("database", "current", env=env))
    assert str(tmp_path / "user" / ".prefectlite" / "prefectlite.db") in line
    assert "the default PREFECT_API_DATABASE_CONNECTION_URL" in line and "from the default" in line, line


def test_upgrade_and_reset_still_create_the_database(tmp_path):
    for action in ("upgrade", "reset"):
        env = home_env(tmp_path / action)
        proc = run_cli("database", action, "-y", env=env)
        assert proc.returncode == 0, proc.stderr
        assert current(env) == revision_ids()[-1]


def test_config_view_show_sources_says_where_prefect_home_came_from(tmp_path):
    exported = _view({"PREFECT_HOME": str(tmp_path / "h")}, "--show-sources")
    assert _line(exported, "PREFECT_HOME") == f"PREFECT_HOME={str(tmp_path / 'h')!r} (from env)"
    default = _view({"HOME": str(tmp_path / "user")}, "--show-sources")
    assert _line(default, "PREFECT_HOME") == f"PREFECT_HOME={str(tmp_path / 'user' / '.prefectlite')!r} (from default)"
    assert _line(_view({"HOME": str(tmp_path / "user")}), "PREFECT_HOME") is None  # without --show-sources, as before


def test_corrupt_profiles_toml_is_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "profiles.toml").write_text("this is [not toml\n")
    before = snapshot(home)
    for args in (
        ("config", "view"),
        ("config", "set", "PREFECT_API_DEFAULT_LIMIT=1"),
        ("profile", "ls"),
        ("database", "upgrade", "-y"),
    ):
        assert_one_line_error(run_cli(*args, env=home_env(tmp_path), input_text=""))
    assert snapshot(home) == before


UNWRITABLE_COMMANDS = [
    ("config", "set", "PREFECT_API_DEFAULT_LIMIT=1"),
    ("profile", "create", "dev"),
    ("profile", "use", "default"),
    ("database", "upgrade", "-y"),
    ("database", "reset", "-y"),
    ("start", "--host", "127.0.0.1", "--port", "0"),
]


@pytest.mark.parametrize("args", UNWRITABLE_COMMANDS)
def test_prefect_home_under_a_regular_file_is_one_line(tmp_path, args):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    proc = run_cli(*args, env={"PREFECT_HOME": str(blocker / "home")}, input_text="", timeout=60)
    assert_one_line_error(proc)
    assert blocker.read_text() == "not a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("args", UNWRITABLE_COMMANDS)
def test_prefect_home_that_is_a_file_is_one_line(tmp_path, args):
    home = tmp_path / "home-file"
    home.write_text("I am a file\n")
    proc = run_cli(*args, env={"PREFECT_HOME": str(home)}, input_text="", timeout=60)
    assert_one_line_error(proc)
    assert home.read_text() == "I am a file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home-file"]
