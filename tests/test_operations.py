"""Operations: readiness (/api/ready), retention (the service and `database prune`), `database vacuum`,
`database backup` / `database restore`, Prometheus metrics (/api/metrics) and JSON server logs.

Everything is real: servers on free ports (in-process through prefectlite.serve / start_server, or
`python prefectlite.py start` subprocesses), SQLite files under tmp_path, the throwaway PostgreSQL
database of the `postgres_url` fixture, the CLI run in subprocesses. Old data is made by creating it
through the API and then moving its end_time back with SQL, exactly as time would.
"""

import contextlib
import datetime as dt
import io
import json
import logging
import math
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid

import pytest

import helpers
from helpers import POSTGRES_URL, ROOT, Client, free_port, new_flow, new_flow_run, run_cli, wait_for_health

import prefectlite

WAIT = 60.0  # generous upper bound for "eventually" conditions (a hang guard, not a performance threshold)


# ---------------------------------------------------------------------------------------------
# helpers


def utcnow():
    return dt.datetime.now(dt.timezone.utc)


def db_iso(moment):
    """The timestamp format the server stores (so SQL backdating looks exactly like an old run)."""
    return prefectlite.iso(moment)


def wait_until(predicate, what, timeout=WAIT, interval=0.05):
    """helpers.wait_until, with this module's argument order and timeout."""
    return helpers.wait_until(predicate, timeout, what, interval)


def home_env(tmp_path, url, **extra):
    return {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_DATABASE_CONNECTION_URL": url, **extra}


def assert_one_line_error(proc):
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def settings_for(tmp_path, url, **overrides):
    return prefectlite.load_settings(
        env={"PREFECT_HOME": str(tmp_path / "home")},
        overrides={"PREFECT_API_DATABASE_CONNECTION_URL": url, **overrides},
    )


@contextlib.contextmanager
def running_server(tmp_path, url, **overrides):
    """An in-process server whose App we can look at (serve() only yields the URL)."""
    running = prefectlite.start_server(settings_for(tmp_path, url, **overrides), "127.0.0.1", 0)
    try:
        yield running
    finally:
        running.stop()


@contextlib.contextmanager
def opened(url):
    db = prefectlite.open_database(url)
    try:
        yield db
    finally:
        db.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/prefect.db"
    return request.getfixturevalue("postgres_url")


def sqlite_path(url):
    assert url.startswith("sqlite:///")
    return url[len("sqlite:///") :]


@pytest.fixture
def captured_log():
    """Route the "prefectlite" logger into a StringIO at INFO through configure_logging; restore after."""
    logger = logging.getLogger("prefectlite")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    stream = io.StringIO()
    settings = prefectlite.load_settings(env={}, overrides={"PREFECT_LOGGING_SERVER_LEVEL": "INFO"})
    prefectlite.configure_logging(settings, stream=stream)
    try:
        yield stream
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])  # setLevel, not .level =: it also clears the logging module's level cache
        logger.propagate = saved[2]


# --- API data ---------------------------------------------------------------------------------


def set_state(client, kind, run_id, state_type):
    result = client.ok("POST", f"/{kind}_runs/{run_id}/set_state", {"state": {"type": state_type}, "force": True})
    assert result["status"] == "ACCEPT", result
    return result


def new_task_run(client, flow_run_id):
    return client.ok(
        "POST",
        "/task_runs/",
        {"flow_run_id": flow_run_id, "task_key": f"task-{uuid.uuid4().hex[:8]}", "dynamic_key": "0"},
    )


def post_logs(client, flow_run_id, count, task_run_id=None, size=20):
    entries = [
        {
            "name": "prefect.flow_runs",
            "level": 20,
            "message": f"line {i} " + "x" * size,
            "timestamp": db_iso(utcnow()),
            "flow_run_id": flow_run_id,
            "task_run_id": task_run_id,
        }
        for i in range(count)
    ]
    status, body = client.post("/logs/", entries)
    assert status == 201, body


def new_artifact(client, flow_run_id=None, task_run_id=None, key=None):
    body = {
        "type": "markdown",
        "data": f"# report {uuid.uuid4().hex[:6]}",
        "flow_run_id": flow_run_id,
        "task_run_id": task_run_id,
    }
    if key:
        body["key"] = key
    return client.ok("POST", "/artifacts/", body)


def build_history(client):
    """Flow runs of every kind that matters to retention, with task runs, states, logs and artifacts.

    'old' runs get an end_time 40 days back later (backdate()); 'recent' ones 20 days back or now.
    Only the old terminal runs may go. Returns the ids by role."""
    flow = new_flow(client)
    runs = {}

    def run(role, final, tasks=(), logs=2, artifact_keys=()):
        fr = new_flow_run(client, flow["id"])
        if final != "PENDING":
            set_state(client, "flow", fr["id"], "RUNNING")
        task_ids = []
        for task_final in tasks:
            tr = new_task_run(client, fr["id"])
            set_state(client, "task", tr["id"], "RUNNING")
            if task_final != "RUNNING":
                set_state(client, "task", tr["id"], task_final)
            post_logs(client, fr["id"], 1, task_run_id=tr["id"])
            new_artifact(client, fr["id"], task_run_id=tr["id"])
            task_ids.append(tr["id"])
        if final not in ("PENDING", "RUNNING"):
            set_state(client, "flow", fr["id"], final)
        post_logs(client, fr["id"], logs)
        artifacts = [new_artifact(client, fr["id"], key=key)["id"] for key in artifact_keys]
        runs[role] = {"id": fr["id"], "tasks": task_ids, "artifacts": artifacts}
        return fr

    # recent first, so that the old run's artifact is the newest of the shared key
    run("recent_completed", "COMPLETED", tasks=("COMPLETED",), artifact_keys=("shared-key",))
    run("recent_failed", "FAILED", logs=1)
    run(
        "old_completed",
        "COMPLETED",
        tasks=("COMPLETED", "FAILED"),
        logs=3,
        artifact_keys=("shared-key", "old-only-key", None),
    )
    run("old_failed", "FAILED", tasks=("FAILED",))
    run("old_cancelled", "CANCELLED", logs=1)
    run("old_crashed", "CRASHED", logs=1)
    run("old_running", "RUNNING", tasks=("RUNNING",), artifact_keys=("running-key",))
    run("old_paused", "PAUSED", logs=1)
    run("old_cancelling", "CANCELLING", logs=1)
    run("old_pending", "PENDING", logs=1)
    # a log and an artifact that belong to no flow run at all
    status, body = client.post(
        "/logs/",
        [
            {
                "name": "prefect.server",
                "level": 30,
                "message": "no run",
                "timestamp": db_iso(utcnow()),
                "flow_run_id": None,
            }
        ],
    )
    assert status == 201, body
    new_artifact(client, key="free-key")
    return runs


OLD_TERMINAL = ("old_completed", "old_failed", "old_cancelled", "old_crashed")
OLD_OTHER = ("old_running", "old_paused", "old_cancelling", "old_pending")
RECENT = ("recent_completed", "recent_failed")


def backdate(url, runs):
    """One transaction: old runs ended 40 days ago (non-terminal ones too: only their state saves them),
    recent_completed 20 days ago; recent_failed keeps its real end_time (now)."""
    old, recent = db_iso(utcnow() - dt.timedelta(days=40)), db_iso(utcnow() - dt.timedelta(days=20))
    with opened(url) as db, db.write() as tx:
        for role in OLD_TERMINAL + OLD_OTHER:
            tx.execute(
                "UPDATE flow_run SET end_time = ?, start_time = ?, created = ? WHERE id = ?",
                (old, old, old, runs[role]["id"]),
            )
        tx.execute("UPDATE flow_run SET end_time = ? WHERE id = ?", (recent, runs["recent_completed"]["id"]))


def table_rows(url):
    """{table: {key: row}} for every table of the database (key: the id, or the whole row)."""
    out = {}
    with opened(url) as db, db.read() as tx:
        for table in db.table_names(tx):
            rows = tx.query(f'SELECT * FROM "{table}"')
            out[table] = {(row["id"] if "id" in row else repr(sorted(row.items()))): row for row in rows}
    return out


def owned_rows(url, flow_run_ids):
    """Ids of the rows that hang off the given flow runs, per table."""
    marks = ", ".join("?" for _ in flow_run_ids)
    ids = list(flow_run_ids)
    queries = {
        "flow_run": f"SELECT id FROM flow_run WHERE id IN ({marks})",
        "task_run": f"SELECT id FROM task_run WHERE flow_run_id IN ({marks})",
        "flow_run_state": f"SELECT id FROM flow_run_state WHERE flow_run_id IN ({marks})",
        "task_run_state": (
            "SELECT id FROM task_run_state WHERE task_run_id IN "
            f"(SELECT id FROM task_run WHERE flow_run_id IN ({marks}))"
        ),
        "log": f"SELECT id FROM log WHERE flow_run_id IN ({marks})",
        "artifact": f"SELECT id FROM artifact WHERE flow_run_id IN ({marks})",
    }
    with opened(url) as db, db.read() as tx:
        return {table: {r["id"] for r in tx.query(sql, ids)} for table, sql in queries.items()}


COUNT_WORDS = {
    "flow runs": "flow_run",
    "task runs": "task_run",
    "flow run states": "flow_run_state",
    "task run states": "task_run_state",
    "logs": "log",
    "artifacts": "artifact",
}


def parse_counts(text):
    """{table: n} from "4 flow runs, 3 task runs, ..." (as printed by prune and logged by retention)."""
    pairs = re.findall(r"(\d+) (flow runs|task runs|flow run states|task run states|logs|artifacts)\b", text)
    return {COUNT_WORDS[words]: int(n) for n, words in pairs}


def assert_exactly_removed(before, after, removed):
    """Every table is as before, minus exactly `removed` ({table: ids}); artifact_collection may be repointed."""
    assert set(before) == set(after)
    for table in before:
        gone = removed.get(table, set())
        if table == "artifact_collection":
            continue  # checked by the caller: keys are removed or repointed
        expected = {k: v for k, v in before[table].items() if k not in gone}
        assert set(after[table]) == set(expected), (
            f"{table}: unexpectedly removed {sorted(set(expected) - set(after[table]))}, "
            f"unexpectedly kept {sorted(set(after[table]) - set(expected))}"
        )
        for key, row in expected.items():
            assert after[table][key] == row, f"{table} row {key} changed"


def artifact_latest(url, key):
    with opened(url) as db, db.read() as tx:
        return tx.scalar("SELECT latest_id FROM artifact_collection WHERE key = ?", (key,))


# ---------------------------------------------------------------------------------------------
# readiness


def test_ready_when_database_answers_and_schema_is_current(client):
    assert client.get("/ready") == (200, {"status": "ready"})
    assert client.get("/health") == (200, True)


def _assert_not_ready(client, *words):
    status, body = client.get("/ready")
    assert status == 503, body
    assert isinstance(body, dict) and isinstance(body.get("detail"), str) and body["detail"], body
    for word in words:
        assert word in body["detail"].lower(), body
    assert client.get("/health") == (200, True)  # liveness: the process is fine
    return body


def test_ready_is_503_on_a_corrupted_sqlite_file_while_health_stays_200(tmp_path):
    path = tmp_path / "prefect.db"
    with prefectlite.serve(database=f"sqlite:///{path}", port=0) as api_url:
        client = Client(api_url)
        client.ok("POST", "/flows/", {"name": "before-corruption"})
        assert client.get("/ready")[0] == 200
        # garbage over the database, its WAL and its shared-memory index (we run as root: permissions
        # would not stop reads, so the bytes themselves go bad)
        for suffix in ("", "-wal", "-shm"):
            part = f"{path}{suffix}"
            if os.path.exists(part):
                size = os.path.getsize(part)
                with open(part, "r+b") as fh:
                    fh.write(b"\x00" * size if suffix == "-shm" else os.urandom(size))
        body = _assert_not_ready(client, "database")
        assert "Traceback" not in body["detail"]


def test_ready_is_503_while_the_sqlite_schema_is_behind_and_200_after_upgrade(tmp_path):
    url = f"sqlite:///{tmp_path}/prefect.db"
    env = home_env(tmp_path, url)
    with prefectlite.serve(database=url, port=0) as api_url:
        client = Client(api_url)
        assert client.get("/ready")[0] == 200
        proc = run_cli("database", "downgrade", "-r", "-1", "-y", env=env)
        assert proc.returncode == 0, proc.stderr
        _assert_not_ready(client, "schema")
        proc = run_cli("database", "upgrade", "-y", env=env)
        assert proc.returncode == 0, proc.stderr
        assert client.get("/ready") == (200, {"status": "ready"})


def test_probes_need_no_credentials_when_auth_is_on(tmp_path):
    with prefectlite.serve(
        database=f"sqlite:///{tmp_path}/prefect.db", port=0, PREFECT_SERVER_API_AUTH_STRING="admin:pw"
    ) as api_url:
        client = Client(api_url)
        assert client.get("/flows/filter")[0] in (401, 405)
        assert client.post("/flows/filter")[0] == 401
        assert client.get("/ready") == (200, {"status": "ready"})
        assert client.get("/health") == (200, True)


def _pg_admin():
    import psycopg

    return psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)


def test_ready_is_503_when_postgres_is_unreachable_and_recovers(postgres_url):
    name = postgres_url.rsplit("/", 1)[1]
    with prefectlite.serve(database=postgres_url, port=0) as api_url:
        client = Client(api_url)
        client.ok("POST", "/flows/", {"name": "on-postgres"})
        assert client.get("/ready") == (200, {"status": "ready"})
        admin = _pg_admin()
        try:
            # no new connections, and every existing one (the server's pool) is cut
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            body = _assert_not_ready(client, "database")
            assert "Traceback" not in body["detail"]
            # still not ready on a second try (the dead pooled connections are no excuse to say 200)
            _assert_not_ready(client, "database")
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.close()
        wait_until(lambda: client.get("/ready")[0] == 200, "readiness to come back after PostgreSQL did")
        assert client.get("/flows/name/on-postgres")[0] == 200


def test_ready_is_503_when_postgres_database_is_dropped(postgres_url):
    name = postgres_url.rsplit("/", 1)[1]
    with prefectlite.serve(database=postgres_url, port=0) as api_url:
        client = Client(api_url)
        assert client.get("/ready")[0] == 200
        admin = _pg_admin()
        try:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            admin.close()
        _assert_not_ready(client, "database")


def test_ready_is_503_while_the_postgres_schema_is_behind(tmp_path, postgres_url):
    env = home_env(tmp_path, postgres_url)
    with prefectlite.serve(database=postgres_url, port=0) as api_url:
        client = Client(api_url)
        assert client.get("/ready")[0] == 200
        proc = run_cli("database", "downgrade", "-r", "-1", "-y", env=env)
        assert proc.returncode == 0, proc.stderr
        _assert_not_ready(client, "schema")
        proc = run_cli("database", "upgrade", "-y", env=env)
        assert proc.returncode == 0, proc.stderr
        assert client.get("/ready") == (200, {"status": "ready"})


# ---------------------------------------------------------------------------------------------
# retention: the service


def test_retention_is_off_by_default(tmp_path):
    defaults = prefectlite.load_settings(env={"PREFECT_HOME": str(tmp_path / "home")})
    assert defaults["PREFECT_SERVER_SERVICES_RETENTION_ENABLED"] is False
    with running_server(tmp_path, f"sqlite:///{tmp_path}/prefect.db") as running:
        assert running.app.services, "the default services are running"
        assert not [s for s in running.app.services if isinstance(s, prefectlite.Retention)]
    with running_server(
        tmp_path, f"sqlite:///{tmp_path}/prefect.db", PREFECT_SERVER_SERVICES_RETENTION_ENABLED=True
    ) as running:
        assert [s for s in running.app.services if isinstance(s, prefectlite.Retention)]


def test_retention_service_deletes_only_old_terminal_runs_and_logs_it(tmp_path, db_url, captured_log):
    with running_server(
        tmp_path,
        db_url,
        PREFECT_SERVER_SERVICES_RETENTION_ENABLED=True,
        PREFECT_SERVER_SERVICES_RETENTION_DAYS=30,
        PREFECT_SERVER_SERVICES_RETENTION_BATCH_SIZE=2,
        PREFECT_SERVER_SERVICES_RETENTION_LOOP_SECONDS=0.1,
    ) as running:
        client = Client(running.api_url)
        runs = build_history(client)
        doomed = owned_rows(db_url, [runs[r]["id"] for r in OLD_TERMINAL])
        kept = owned_rows(db_url, [runs[r]["id"] for r in OLD_OTHER + RECENT])
        assert all(doomed.values()) and all(kept.values()), (doomed, kept)
        shared_latest_before = artifact_latest(db_url, "shared-key")
        assert shared_latest_before == runs["old_completed"]["artifacts"][0]

        backdate(db_url, runs)
        wait_until(
            lambda: all(client.get(f"/flow_runs/{runs[r]['id']}")[0] == 404 for r in OLD_TERMINAL),
            "the retention service to delete the old terminal runs",
        )

        after = owned_rows(db_url, [runs[r]["id"] for r in OLD_TERMINAL + OLD_OTHER + RECENT])
        for table in doomed:
            assert not (after[table] & doomed[table]), f"{table}: rows of old terminal runs are left"
            assert kept[table] <= after[table], f"{table}: rows of kept runs were deleted"
        for role in OLD_OTHER + RECENT:
            run = client.ok("GET", f"/flow_runs/{runs[role]['id']}")
            assert run["id"] == runs[role]["id"]
            for task_id in runs[role]["tasks"]:
                assert client.get(f"/task_runs/{task_id}")[0] == 200
            for artifact_id in runs[role]["artifacts"]:
                assert client.get(f"/artifacts/{artifact_id}")[0] == 200
            logs = client.ok("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [runs[role]["id"]]}}})
            assert logs, role
        for task_id in runs["old_completed"]["tasks"] + runs["old_failed"]["tasks"]:
            assert client.get(f"/task_runs/{task_id}")[0] == 404
        # the run-less log and artifact stay; the shared key now points at the artifact that is left
        assert client.ok("POST", "/logs/filter", {"logs": {"level": {"ge_": 30}}})
        assert client.get("/artifacts/free-key/latest")[0] == 200
        assert client.ok("GET", "/artifacts/shared-key/latest")["id"] == runs["recent_completed"]["artifacts"][0]
        assert client.get("/artifacts/old-only-key/latest")[0] == 404
        assert client.get("/artifacts/running-key/latest")[0] == 200

    text = captured_log.getvalue()
    lines = [line for line in text.splitlines() if "retention removed" in line]
    assert lines, text
    totals = {}
    for line in lines:
        for table, n in parse_counts(line).items():
            totals[table] = totals.get(table, 0) + n
    assert totals == {table: len(ids) for table, ids in doomed.items()}, (lines, doomed)


# ---------------------------------------------------------------------------------------------
# retention: `database prune`


def test_database_prune_dry_run_then_prune_removes_exactly_the_old_terminal_runs(tmp_path, db_url):
    with prefectlite.serve(
        database=db_url,
        port=0,
        PREFECT_API_SERVICES_SCHEDULER_ENABLED=False,
        PREFECT_API_SERVICES_LATE_RUNS_ENABLED=False,
    ) as api_url:
        runs = build_history(Client(api_url))
    backdate(db_url, runs)
    env = home_env(tmp_path, db_url)
    doomed = owned_rows(db_url, [runs[r]["id"] for r in OLD_TERMINAL])
    expected = {table: len(ids) for table, ids in doomed.items()}
    assert all(expected.values()), expected
    before = table_rows(db_url)

    proc = run_cli("database", "prune", "--older-than", "30d", "--dry-run", env=env)
    assert proc.returncode == 0, proc.stderr
    assert parse_counts(proc.stdout) == expected, proc.stdout
    assert table_rows(db_url) == before, "a dry run changed the database"

    proc = run_cli("database", "prune", "--older-than", "30d", "--batch-size", "1", env=env)
    assert proc.returncode == 0, proc.stderr
    assert parse_counts(proc.stdout) == expected, proc.stdout
    after = table_rows(db_url)
    assert_exactly_removed(before, after, doomed)
    collections = {row["key"]: row["latest_id"] for row in after["artifact_collection"].values()}
    assert collections == {
        "shared-key": runs["recent_completed"]["artifacts"][0],
        "running-key": runs["old_running"]["artifacts"][0],
        "free-key": next(
            iter(v["latest_id"] for v in before["artifact_collection"].values() if v["key"] == "free-key")
        ),
    }

    # a second prune finds nothing more
    proc = run_cli("database", "prune", "--older-than", "30d", env=env)
    assert proc.returncode == 0, proc.stderr
    assert set(parse_counts(proc.stdout).values()) == {0}, proc.stdout
    assert table_rows(db_url) == after

    # a shorter horizon takes the run that ended 20 days ago too (and still nothing that is not terminal)
    proc = run_cli("database", "prune", "--older-than", "2w", env=env)
    assert proc.returncode == 0, proc.stderr
    assert parse_counts(proc.stdout)["flow_run"] == 1, proc.stdout
    with prefectlite.serve(
        database=db_url,
        port=0,
        PREFECT_API_SERVICES_SCHEDULER_ENABLED=False,
        PREFECT_API_SERVICES_LATE_RUNS_ENABLED=False,
    ) as api_url:
        client = Client(api_url)
        assert client.get(f"/flow_runs/{runs['recent_completed']['id']}")[0] == 404
        for role in OLD_OTHER + ("recent_failed",):
            assert client.get(f"/flow_runs/{runs[role]['id']}")[0] == 200
        assert client.get("/artifacts/shared-key/latest")[0] == 404


@pytest.mark.parametrize(
    "args", [(), ("--older-than", "30x"), ("--older-than", "thirty days"), ("--older-than", "30d", "--batch-size", "0")]
)
def test_database_prune_bad_arguments_are_one_line_errors_and_change_nothing(tmp_path, args):
    url = f"sqlite:///{tmp_path}/prefect.db"
    with prefectlite.serve(database=url, port=0) as api_url:
        runs = build_history(Client(api_url))
    backdate(url, runs)
    before = table_rows(url)
    proc = run_cli("database", "prune", *args, env=home_env(tmp_path, url))
    assert_one_line_error(proc)
    assert table_rows(url) == before


# ---------------------------------------------------------------------------------------------
# vacuum


def _sizes(text):
    match = re.search(r"(\d+) bytes before, (\d+) bytes after", text)
    assert match, text
    return int(match.group(1)), int(match.group(2))


def _file_bytes(path):
    return sum(os.path.getsize(p) for p in (path, f"{path}-wal") if os.path.exists(p))


def test_sqlite_vacuum_reports_sizes_and_shrinks_after_a_prune(tmp_path):
    path = f"{tmp_path}/prefect.db"
    url = f"sqlite:///{path}"
    env = home_env(tmp_path, url)
    with prefectlite.serve(database=url, port=0) as api_url:
        client = Client(api_url)
        flow = new_flow(client)
        big = new_flow_run(client, flow["id"])
        for _ in range(10):
            post_logs(client, big["id"], 100, size=4000)  # ~4 MB of logs
        set_state(client, "flow", big["id"], "COMPLETED")
        small = new_flow_run(client, flow["id"])
        post_logs(client, small["id"], 3)
    with opened(url) as db, db.write() as tx:
        tx.execute(
            "UPDATE flow_run SET end_time = ? WHERE id = ?", (db_iso(utcnow() - dt.timedelta(days=90)), big["id"])
        )
    proc = run_cli("database", "prune", "--older-than", "30d", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(url)

    measured_before = _file_bytes(path)
    proc = run_cli("database", "vacuum", env=env)
    assert proc.returncode == 0, proc.stderr
    before, after = _sizes(proc.stdout)
    assert before == measured_before, proc.stdout
    assert after == _file_bytes(path), proc.stdout
    assert after < before, proc.stdout  # the pruned logs' pages are given back
    assert table_rows(url) == rows  # nothing but free space went
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
    finally:
        conn.close()


def test_postgres_vacuum_reports_sizes(tmp_path, postgres_url):
    name = postgres_url.rsplit("/", 1)[1]
    with prefectlite.serve(database=postgres_url, port=0) as api_url:
        client = Client(api_url)
        flow = new_flow(client)
        run = new_flow_run(client, flow["id"])
        post_logs(client, run["id"], 50)
    rows = table_rows(postgres_url)
    admin = _pg_admin()
    try:
        seen = []
        for _attempt in range(3):  # autovacuum may touch the database meanwhile; a quiet attempt must match
            measured_before = admin.execute("SELECT pg_database_size(%s)", (name,)).fetchone()[0]
            proc = run_cli("database", "vacuum", env=home_env(tmp_path, postgres_url))
            assert proc.returncode == 0, proc.stderr
            before, after = _sizes(proc.stdout)
            measured_after = admin.execute("SELECT pg_database_size(%s)", (name,)).fetchone()[0]
            seen.append((proc.stdout, measured_before, measured_after))
            if (before, after) == (measured_before, measured_after):
                break
        else:
            raise AssertionError(f"the printed sizes never matched pg_database_size: {seen}")
        assert before > 0 and after > 0
    finally:
        admin.close()
    assert table_rows(postgres_url) == rows

    def vacuumed():
        with opened(postgres_url) as db, db.read() as tx:
            return tx.scalar("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'log'")

    wait_until(vacuumed, "pg_stat_user_tables to show the VACUUM of the log table")


# ---------------------------------------------------------------------------------------------
# backup and restore


def _revision():
    return prefectlite.list_revisions()[-1].id


def _snapshot_sqlite(path):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


class WriteLoad:
    """Threads creating flow runs + a RUNNING state + a log through the API, recording what was acknowledged."""

    def __init__(self, client, flow_id, threads=4):
        self.client = client
        self.flow_id = flow_id
        self.acknowledged = []  # run ids whose three writes were all answered 2xx
        self.failures = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]

    def _work(self):
        while not self.stop.is_set():
            try:
                status, run = self.client.post("/flow_runs/", {"flow_id": self.flow_id})
                if status != 201:
                    raise AssertionError(("create", status, run))
                status, body = self.client.post(
                    f"/flow_runs/{run['id']}/set_state", {"state": {"type": "RUNNING"}, "force": True}
                )
                if status not in (200, 201):
                    raise AssertionError(("set_state", status, body))
                status, body = self.client.post(
                    "/logs/",
                    [
                        {
                            "name": "load",
                            "level": 20,
                            "message": f"run {run['id']}",
                            "timestamp": db_iso(utcnow()),
                            "flow_run_id": run["id"],
                        }
                    ],
                )
                if status != 201:
                    raise AssertionError(("logs", status, body))
            except Exception as exc:  # noqa: BLE001 - every failed write is a finding
                with self.lock:
                    self.failures.append(repr(exc))
                continue
            with self.lock:
                self.acknowledged.append(run["id"])

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(WAIT)
        assert not any(t.is_alive() for t in self.threads), "load threads hung"

    def snapshot(self):
        with self.lock:
            return list(self.acknowledged)


def test_sqlite_backup_of_a_live_database_under_write_load_then_restore(tmp_path):
    live = tmp_path / "live" / "prefect.db"
    live_url = f"sqlite:///{live}"
    backup = tmp_path / "backups" / "prefect-backup.db"
    backup.parent.mkdir()
    with prefectlite.serve(database=live_url, port=0) as api_url:
        client = Client(api_url)
        flow = new_flow(client)
        bulk = new_flow_run(client, flow["id"])
        for _ in range(10):
            post_logs(client, bulk["id"], 100, size=2000)  # a few MB: the copy takes many backup steps
        with WriteLoad(client, flow["id"]) as load:
            wait_until(lambda: len(load.snapshot()) >= 30, "the write load to get going")
            acknowledged = load.snapshot()
            proc = run_cli("database", "backup", str(backup), env=home_env(tmp_path, live_url), timeout=300)
            during = len(load.snapshot()) - len(acknowledged)
        assert proc.returncode == 0, proc.stderr
        assert str(backup) in proc.stdout
        assert not load.failures, load.failures[:5]
        assert client.ok("POST", "/flow_runs/count", {}) >= len(acknowledged) + 1
    print(f"{len(acknowledged)} runs acknowledged before the backup, {during} during it")

    conn = sqlite3.connect(f"file:{backup}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT revision FROM prefectlite_version").fetchone()[0] == _revision()
        in_backup = {r[0]: r[1] for r in conn.execute("SELECT id, state_type FROM flow_run")}
        logged = {r[0] for r in conn.execute("SELECT DISTINCT flow_run_id FROM log")}
        running_states = {r[0] for r in conn.execute("SELECT flow_run_id FROM flow_run_state WHERE type = 'RUNNING'")}
        bulk_logs = conn.execute("SELECT COUNT(*) FROM log WHERE flow_run_id = ?", (bulk["id"],)).fetchone()[0]
    finally:
        conn.close()
    missing = [run_id for run_id in acknowledged if run_id not in in_backup]
    assert not missing, f"{len(missing)} acknowledged runs are missing from the backup"
    assert all(in_backup[run_id] == "RUNNING" for run_id in acknowledged)
    assert set(acknowledged) <= logged and set(acknowledged) <= running_states
    assert bulk_logs == 1000

    # restore into another server's location, once that server (a `prefectlite start` process) has stopped
    target = tmp_path / "other" / "prefect.db"
    target_url = f"sqlite:///{target}"
    other = ServerProcess(tmp_path, home_env(tmp_path, target_url))
    try:
        other.wait_ready()
        other_flow = Client(other.api_url).ok("POST", "/flows/", {"name": "only-in-the-other-database"})
    finally:
        assert other.stop() == 0
    proc = run_cli("database", "restore", str(backup), "-y", env=home_env(tmp_path, target_url))
    assert proc.returncode == 0, proc.stderr
    with prefectlite.serve(database=target_url, port=0) as api_url:
        client = Client(api_url)
        assert client.get("/ready")[0] == 200
        for run_id in acknowledged:
            run = client.ok("GET", f"/flow_runs/{run_id}")
            assert run["state_type"] == "RUNNING"
        logs = client.ok("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": acknowledged[:10]}}, "limit": 200})
        assert {entry["flow_run_id"] for entry in logs} == set(acknowledged[:10])
        assert client.get(f"/flows/{other_flow['id']}")[0] == 404  # the old content is gone
        # and the restored database takes writes
        new = new_flow_run(client, flow["id"])
        assert client.get(f"/flow_runs/{new['id']}")[0] == 200


def _make_backup(tmp_path, name="backup.db"):
    url = f"sqlite:///{tmp_path}/source/prefect.db"
    with prefectlite.serve(database=url, port=0) as api_url:
        flow = Client(api_url).ok("POST", "/flows/", {"name": "from-the-backup"})
    backup = tmp_path / name
    proc = run_cli("database", "backup", str(backup), env=home_env(tmp_path, url))
    assert proc.returncode == 0, proc.stderr
    return backup, flow


def test_restore_after_an_embedded_server_stopped(tmp_path):
    """serve() is the embedding API: once its `with` block is over the server is stopped, so its
    database may be restored into (the server lock must go with the server, not with the process)."""
    backup, restored_flow = _make_backup(tmp_path)
    url = f"sqlite:///{tmp_path}/target/prefect.db"
    with prefectlite.serve(database=url, port=0) as api_url:
        Client(api_url).ok("POST", "/flows/", {"name": "replaced"})
    proc = run_cli("database", "restore", str(backup), "-y", env=home_env(tmp_path, url))
    assert proc.returncode == 0, proc.stderr
    with prefectlite.serve(database=url, port=0) as api_url:
        client = Client(api_url)
        assert client.ok("GET", "/flows/name/from-the-backup")["id"] == restored_flow["id"]
        assert client.get("/flows/name/replaced")[0] == 404


def test_restore_refuses_while_a_server_runs_on_the_file(tmp_path):
    backup, restored_flow = _make_backup(tmp_path)
    target = tmp_path / "target" / "prefect.db"
    url = f"sqlite:///{target}"
    with prefectlite.serve(database=url, port=0) as api_url:
        client = Client(api_url)
        mine = client.ok("POST", "/flows/", {"name": "served-right-now"})
        proc = run_cli("database", "restore", str(backup), "-y", env=home_env(tmp_path, url))
        line = assert_one_line_error(proc)
        assert "server" in line.lower(), line
        assert client.get(f"/flows/{mine['id']}")[0] == 200
        assert client.get(f"/flows/{restored_flow['id']}")[0] == 404
        client.ok("POST", "/flows/", {"name": "still-writable"})
    assert "from-the-backup" not in _snapshot_sqlite(target)


def test_restore_refuses_while_a_server_process_runs_on_the_file(tmp_path):
    backup, restored_flow = _make_backup(tmp_path)
    url = f"sqlite:///{tmp_path}/target/prefect.db"
    server = ServerProcess(tmp_path, home_env(tmp_path, url))
    try:
        server.wait_ready()
        client = Client(server.api_url)
        mine = client.ok("POST", "/flows/", {"name": "served-by-a-process"})
        proc = run_cli("database", "restore", str(backup), "-y", env=home_env(tmp_path, url))
        assert_one_line_error(proc)
        assert client.get(f"/flows/{mine['id']}")[0] == 200
        assert client.get(f"/flows/{restored_flow['id']}")[0] == 404
    finally:
        server.stop()


def _not_backups(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8192))
    text = tmp_path / "notes.txt"
    text.write_text("this is not a database\n")
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO customers (name) VALUES ('someone')")
    conn.commit()
    conn.close()
    future, _ = _make_backup(tmp_path, "future.db")
    conn = sqlite3.connect(future)
    conn.execute("UPDATE prefectlite_version SET revision = '9999'")
    conn.commit()
    conn.close()
    return {"garbage": garbage, "text": text, "foreign": foreign, "future": future}


def _stopped_server_database(tmp_path, flow_name):
    """A database a `prefectlite start` process served (with one flow) and has stopped serving."""
    target = tmp_path / "target" / "prefect.db"
    url = f"sqlite:///{target}"
    server = ServerProcess(tmp_path, home_env(tmp_path, url))
    try:
        server.wait_ready()
        Client(server.api_url).ok("POST", "/flows/", {"name": flow_name})
    finally:
        assert server.stop() == 0
    return target, url


@pytest.mark.parametrize("kind", ["garbage", "text", "foreign", "future", "missing"])
def test_restore_refuses_a_file_that_is_not_a_prefectlite_backup(tmp_path, kind):
    target, url = _stopped_server_database(tmp_path, "keep-me")
    before = _snapshot_sqlite(target)
    source = tmp_path / "does-not-exist.db" if kind == "missing" else _not_backups(tmp_path)[kind]
    proc = run_cli("database", "restore", str(source), "-y", env=home_env(tmp_path, url))
    line = assert_one_line_error(proc)
    assert str(source) in line, line  # refused because of the file, naming it
    assert _snapshot_sqlite(target) == before
    with prefectlite.serve(database=url, port=0) as api_url:
        assert Client(api_url).get("/flows/name/keep-me")[0] == 200


def test_restore_asks_first_and_no_means_nothing_changes(tmp_path):
    backup, restored_flow = _make_backup(tmp_path)
    target, url = _stopped_server_database(tmp_path, "keep-me")
    before = _snapshot_sqlite(target)
    for answer in ("", "n\n"):
        proc = run_cli("database", "restore", str(backup), env=home_env(tmp_path, url), input_text=answer)
        assert proc.returncode != 0, proc.stdout
        assert "Traceback" not in proc.stderr
        assert _snapshot_sqlite(target) == before
    proc = run_cli("database", "restore", str(backup), env=home_env(tmp_path, url), input_text="y\n")
    assert proc.returncode == 0, proc.stderr
    assert "from-the-backup" in _snapshot_sqlite(target)


def test_backup_refuses_to_overwrite_an_existing_file(tmp_path):
    url = f"sqlite:///{tmp_path}/prefect.db"
    with prefectlite.serve(database=url, port=0):
        pass
    existing = tmp_path / "precious.db"
    existing.write_bytes(b"precious")
    proc = run_cli("database", "backup", str(existing), env=home_env(tmp_path, url))
    assert_one_line_error(proc)
    assert existing.read_bytes() == b"precious"


SECRET = "s3cr3t-Pa55word"


def _postgres_env(tmp_path, postgres_url, how):
    base, name = postgres_url.rsplit("/", 1)
    user_host = base.split("://", 1)[1]
    user, host = user_host.split("@", 1)
    if how == "url":
        url, extra = f"postgresql://{user}:{SECRET}@{host}/{name}", {}
    else:
        url, extra = postgres_url, {"PREFECT_API_DATABASE_PASSWORD": SECRET}
    return home_env(tmp_path, url, **extra)


def _run_printed(command):
    """Run a command the CLI printed, with the real password in place of the mask."""
    words = shlex.split(command)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        run_env[key] = SECRET if set(value) == {"*"} else value
    return subprocess.run(words, env=run_env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("how", ["url", "setting"])
def test_postgres_backup_runs_pg_dump_and_prints_a_working_restore_command(tmp_path, postgres_url, how):
    env = _postgres_env(tmp_path, postgres_url, how)
    with prefectlite.serve(database=postgres_url, port=0) as api_url:
        kept = Client(api_url).ok("POST", "/flows/", {"name": "in-the-dump"})
    dump = tmp_path / "dumps" / "prefect.dump"
    dump.parent.mkdir()

    proc = run_cli("database", "backup", str(dump), env=env)
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    assert dump.stat().st_size > 0 and "pg_dump" in proc.stdout
    assert sorted(p.name for p in dump.parent.iterdir()) == ["prefect.dump"]  # no temporary file left
    restore_line = next(line for line in proc.stdout.splitlines() if "pg_restore" in line)
    assert "********" in restore_line and str(dump) in restore_line
    again = run_cli("database", "backup", str(dump), env=env)
    assert "already exists" in assert_one_line_error(again)

    # `database restore` does not pretend: it says what to run, the password masked
    proc = run_cli("database", "restore", str(dump), "-y", env=env)
    line = assert_one_line_error(proc)
    assert "pg_restore" in line and SECRET not in line and SECRET not in proc.stdout

    with prefectlite.serve(database=postgres_url, port=0) as api_url:
        Client(api_url).ok("POST", "/flows/", {"name": "after-the-dump"})
    done = _run_printed(restore_line.split(":", 1)[1])
    assert done.returncode == 0, done.stderr
    with prefectlite.serve(database=postgres_url, port=0) as api_url:
        client = Client(api_url)
        assert client.ok("GET", "/flows/name/in-the-dump")["id"] == kept["id"]
        assert client.get("/flows/name/after-the-dump")[0] == 404


def test_postgres_backup_without_pg_dump_says_so_and_gives_the_command(tmp_path, postgres_url):
    env = _postgres_env(tmp_path, postgres_url, "url")
    with prefectlite.serve(database=postgres_url, port=0):  # the schema in place
        pass
    empty_path = tmp_path / "no-tools"
    empty_path.mkdir()
    dump = tmp_path / "prefect.dump"
    proc = run_cli("database", "backup", str(dump), env={**env, "PATH": str(empty_path)})
    line = assert_one_line_error(proc)
    assert "pg_dump is not on PATH" in line and "no backup was made" in line, line
    assert SECRET not in line and "********" in line
    assert not dump.exists()
    done = _run_printed(line.split("run: ", 1)[1])  # the command given works
    assert done.returncode == 0, done.stderr
    assert dump.stat().st_size > 0


def _sqlite_with_ballast(tmp_path, megabytes):
    """A migrated database with `megabytes` MB of log rows: a copy that takes a moment."""
    url = f"sqlite:///{tmp_path}/big/prefect.db"
    with prefectlite.serve(database=url, port=0):
        pass
    conn = sqlite3.connect(tmp_path / "big" / "prefect.db")
    now = db_iso(utcnow())
    for _ in range(megabytes):
        conn.executemany(
            "INSERT INTO log (id, created, updated, name, level, message, timestamp) "
            "VALUES (?, ?, ?, 'ballast', 20, ?, ?)",
            [(str(uuid.uuid4()), now, now, "x" * 1000, now) for _ in range(1000)],
        )
    conn.commit()
    conn.close()
    return url


def test_a_killed_backup_leaves_nothing_under_the_target_name_and_a_retry_works(tmp_path):
    url = _sqlite_with_ballast(tmp_path, 150)
    folder = tmp_path / "backups"
    folder.mkdir()
    target = folder / "copy.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "prefectlite.py"), "database", "backup", str(target)],
        env={**env, **home_env(tmp_path, url)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # stopped the moment its temporary file appears, then killed: the copy is under way
        wait_until(
            lambda: proc.poll() is not None or any(folder.iterdir()), "the backup to start writing", interval=0.001
        )
        proc.send_signal(signal.SIGSTOP)
        assert proc.poll() is None, proc.communicate()
        assert not target.exists() and not (folder / "copy.db-journal").exists()
        # only the temporary file (and its journal while it is written), under a name of its own
        assert all(p.name.startswith(".copy.db.") and ".partial" in p.name for p in folder.iterdir()), list(
            folder.iterdir()
        )
    finally:
        proc.kill()
        proc.communicate()
    assert not target.exists()
    retry = run_cli("database", "backup", str(target), env=home_env(tmp_path, url), timeout=300)
    assert retry.returncode == 0, retry.stderr
    conn = sqlite3.connect(f"file:{target}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT COUNT(*) FROM log WHERE name = 'ballast'").fetchone()[0] == 150_000
    finally:
        conn.close()
    assert "integrity checked" in retry.stdout


# ---------------------------------------------------------------------------------------------
# metrics

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_VALUE = re.compile(r"(?:[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?Inf|NaN)\Z")
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


class ExpositionError(AssertionError):
    pass


def _unescape(text, allowed, where):
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if i + 1 >= len(text) or text[i + 1] not in allowed:
                raise ExpositionError(f"{where}: bad escape in {text!r}")
            out.append({"\\": "\\", "n": "\n", '"': '"'}[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _parse_labels(line, i, where):
    """line[i] == '{'; returns (labels, index after '}')."""
    labels = {}
    i += 1
    while True:
        if i < len(line) and line[i] == "}":
            return labels, i + 1
        match = _LABEL_NAME.match(line, i)
        if not match:
            raise ExpositionError(f"{where}: bad label name")
        name = match.group(0)
        if name.startswith("__"):
            raise ExpositionError(f"{where}: reserved label name {name}")
        if name in labels:
            raise ExpositionError(f"{where}: duplicate label {name}")
        i = match.end()
        if line[i : i + 2] != '="':
            raise ExpositionError(f'{where}: expected =" after label {name}')
        i += 2
        start = i
        while i < len(line) and line[i] != '"':
            i += 2 if line[i] == "\\" else 1
        if i >= len(line):
            raise ExpositionError(f"{where}: unterminated label value")
        labels[name] = _unescape(line[start:i], '\\"n', where)
        i += 1
        if i < len(line) and line[i] == ",":
            i += 1
        elif i < len(line) and line[i] == "}":
            continue
        else:
            raise ExpositionError(f"{where}: expected , or }} after a label")


def parse_prometheus(text):
    """A strict reader of the Prometheus text exposition format (0.0.4).

    Returns {family: {"type", "help", "samples": [(name, labels, value)]}}. Raises ExpositionError on:
    a bad metric or label name, a bad escape, a bad value, a sample whose family has no TYPE before it,
    a family whose samples are not contiguous, a duplicate HELP/TYPE/sample, a negative counter, and a
    histogram whose buckets are not sorted and cumulative, lack +Inf, or whose +Inf differs from _count."""
    if not text.endswith("\n"):
        raise ExpositionError("the exposition must end with a newline")
    families, closed, seen = {}, set(), set()
    current = None

    def switch(name, where):
        nonlocal current
        if name != current:
            if name in closed:
                raise ExpositionError(f"{where}: family {name} is not contiguous")
            if current is not None:
                closed.add(current)
            current = name

    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number} {line!r}"
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[0] == "#" and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not _METRIC_NAME.fullmatch(name):
                    raise ExpositionError(f"{where}: bad metric name")
                family = families.setdefault(name, {"type": None, "help": None, "samples": []})
                switch(name, where)
                if parts[1] == "HELP":
                    if family["help"] is not None:
                        raise ExpositionError(f"{where}: second HELP for {name}")
                    family["help"] = _unescape(parts[3] if len(parts) == 4 else "", "\\n", where)
                else:
                    if len(parts) != 4 or parts[3] not in _TYPES:
                        raise ExpositionError(f"{where}: bad TYPE")
                    if family["type"] is not None:
                        raise ExpositionError(f"{where}: second TYPE for {name}")
                    if family["samples"]:
                        raise ExpositionError(f"{where}: TYPE after samples of {name}")
                    family["type"] = parts[3]
            continue
        match = _METRIC_NAME.match(line)
        if not match:
            raise ExpositionError(f"{where}: bad metric name")
        name, i = match.group(0), match.end()
        labels = {}
        if i < len(line) and line[i] == "{":
            labels, i = _parse_labels(line, i, where)
        rest = line[i:]
        if not rest.startswith(" "):
            raise ExpositionError(f"{where}: expected a space before the value")
        fields = rest[1:].split(" ")
        if not 1 <= len(fields) <= 2 or not _VALUE.match(fields[0]):
            raise ExpositionError(f"{where}: bad value")
        if len(fields) == 2 and not re.fullmatch(r"-?\d+", fields[1]):
            raise ExpositionError(f"{where}: bad timestamp")
        value = float(fields[0].replace("Inf", "inf").replace("NaN", "nan"))
        family_name = None
        if name in families and families[name]["type"] is not None:
            family_name = name
        else:
            for suffix in ("_bucket", "_sum", "_count"):
                base = name[: -len(suffix)]
                if (
                    name.endswith(suffix)
                    and base in families
                    and (
                        families[base]["type"] == "histogram"
                        or (families[base]["type"] == "summary" and suffix != "_bucket")
                    )
                ):
                    family_name = base
        if family_name is None:
            raise ExpositionError(f"{where}: no TYPE declared for the family of {name} before it")
        family = families[family_name]
        if family_name != current:
            raise ExpositionError(f"{where}: sample of {family_name} outside its family's block")
        if family["type"] == "histogram" and name == family_name:
            raise ExpositionError(f"{where}: a histogram sample needs _bucket, _sum or _count")
        key = (name, tuple(sorted(labels.items())))
        if key in seen:
            raise ExpositionError(f"{where}: duplicate sample")
        seen.add(key)
        if family["type"] == "counter" and not value >= 0:
            raise ExpositionError(f"{where}: a counter must be a non-negative number")
        family["samples"].append((name, labels, value))

    for family_name, family in families.items():
        if family["type"] == "histogram":
            _check_histogram(family_name, family["samples"])
    return families


def _check_histogram(name, samples):
    series = {}
    for sample_name, labels, value in samples:
        if sample_name == f"{name}_bucket":
            if "le" not in labels:
                raise ExpositionError(f"{name}: bucket without le")
            le = labels["le"]
            if not _VALUE.match(le):
                raise ExpositionError(f"{name}: bad le {le!r}")
            rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            series.setdefault(rest, {"buckets": []})["buckets"].append((float(le.replace("Inf", "inf")), value))
        else:
            if "le" in labels:
                raise ExpositionError(f"{name}: le on {sample_name}")
            rest = tuple(sorted(labels.items()))
            kind = sample_name[len(name) + 1 :]
            series.setdefault(rest, {"buckets": []})[kind] = value
    for labels, data in series.items():
        buckets = data["buckets"]
        if not buckets or buckets[-1][0] != math.inf:
            raise ExpositionError(f"{name}{labels}: no +Inf bucket (last)")
        bounds = [b for b, _ in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ExpositionError(f"{name}{labels}: buckets not in increasing order of le")
        counts = [c for _, c in buckets]
        if any(b > a for a, b in zip(counts[1:], counts)):
            raise ExpositionError(f"{name}{labels}: bucket counts are not cumulative")
        if "count" not in data or "sum" not in data:
            raise ExpositionError(f"{name}{labels}: _count or _sum missing")
        if counts[-1] != data["count"]:
            raise ExpositionError(f"{name}{labels}: +Inf bucket {counts[-1]} != _count {data['count']}")


def sample(families, name, **labels):
    """The value of the one sample `name` with exactly these labels (None when absent)."""
    for family in families.values():
        for sample_name, sample_labels, value in family["samples"]:
            if sample_name == name and sample_labels == labels:
                return value
    return None


def family_of(families, name, kind):
    assert name in families, f"no metric family {name}; have {sorted(families)}"
    assert families[name]["type"] == kind, families[name]
    assert families[name]["help"], f"{name} has no HELP"
    return families[name]


GOOD_EXPOSITION = """# HELP a_total A counter with \\\\ and \\n in its help.
# TYPE a_total counter
a_total{route="/x/{id}",msg="say \\"hi\\"\\n"} 3
a_total{route="/y"} 1.5e3
# TYPE h histogram
h_bucket{le="0.1"} 1
h_bucket{le="1"} 2
h_bucket{le="+Inf"} 2
h_sum 0.3
h_count 2
# TYPE g gauge
g NaN
g{x="y"} -Inf 1700000000000
"""

BAD_EXPOSITIONS = {
    "no TYPE": "a_total 1\n",
    "TYPE after sample": '# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na{x="1"} 2\n',
    "bad name": "# TYPE 1a gauge\n1a 1\n",
    "bad label escape": '# TYPE a gauge\na{x="\\q"} 1\n',
    "unquoted label": "# TYPE a gauge\na{x=1} 1\n",
    "bad value": "# TYPE a gauge\na one\n",
    "python inf": "# TYPE a gauge\na inf\n",
    "duplicate sample": "# TYPE a gauge\na 1\na 2\n",
    "negative counter": "# TYPE a counter\na -1\n",
    "no newline at end": "# TYPE a gauge\na 1",
    "not cumulative": '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="2"} 1\nh_bucket{le="+Inf"} 2\n'
    "h_sum 1\nh_count 2\n",
    "inf != count": '# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 3\n',
    "no +Inf": '# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n',
    "unsorted le": '# TYPE h histogram\nh_bucket{le="2"} 1\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 1\n'
    "h_sum 1\nh_count 1\n",
    "second TYPE": "# TYPE a gauge\n# TYPE a counter\na 1\n",
}


def test_the_metrics_parser_is_strict():
    families = parse_prometheus(GOOD_EXPOSITION)
    assert sample(families, "a_total", route="/x/{id}", msg='say "hi"\n') == 3
    assert families["a_total"]["help"] == "A counter with \\ and \n in its help."
    assert sample(families, "h_count") == 2
    for why, text in BAD_EXPOSITIONS.items():
        with pytest.raises(ExpositionError):
            parse_prometheus(text)
            pytest.fail(f"accepted: {why}")


def get_text(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode("utf-8", "replace")


def test_metrics_are_404_when_off(server):
    status, headers, body = get_text(server + "/metrics")
    assert status == 404, body
    assert "PREFECT_SERVER_METRICS_ENABLED" in json.loads(body)["detail"]


def _slack_webhook(client, url):
    block_type = client.ok("GET", "/block_types/slug/slack-webhook")
    [schema] = client.ok(
        "POST", "/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}, "limit": 1}
    )
    return client.ok(
        "POST",
        "/block_documents/",
        {
            "name": f"hook-{uuid.uuid4().hex[:6]}",
            "block_type_id": block_type["id"],
            "block_schema_id": schema["id"],
            "data": {"url": url},
        },
    )


def scrape(api_url):
    status, headers, body = get_text(api_url + "/metrics")
    assert status == 200, body
    content_type = {k.lower(): v for k, v in headers.items()}["content-type"]
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type, content_type
    return parse_prometheus(body)


def test_metrics_in_the_prometheus_text_format(tmp_path, refusing_port):
    url = f"sqlite:///{tmp_path}/prefect.db"
    closed_port = refusing_port.port  # nothing listens there: every delivery fails
    with prefectlite.serve(
        database=url,
        port=0,
        PREFECT_SERVER_METRICS_ENABLED=True,
        PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_ENABLED=False,
    ) as api_url:
        client = Client(api_url)
        hook = _slack_webhook(client, f"http://127.0.0.1:{closed_port}/hook")
        client.ok(
            "POST",
            "/flow_run_notification_policies/",
            {"state_names": ["Failed"], "tags": [], "block_document_id": hook["id"]},
        )
        flow = new_flow(client)
        finals = ["COMPLETED", "COMPLETED", "FAILED", "RUNNING"]
        runs = []
        for _ in finals:
            run = new_flow_run(client, flow["id"])
            set_state(client, "flow", run["id"], "RUNNING")
            runs.append(run)
        task_finals = ["COMPLETED", "COMPLETED", "COMPLETED", "FAILED", "RUNNING"]
        for final in task_finals:
            task = new_task_run(client, runs[0]["id"])
            set_state(client, "task", task["id"], "RUNNING")
            if final != "RUNNING":
                set_state(client, "task", task["id"], final)
        for run, final in zip(runs, finals):
            if final != "RUNNING":
                set_state(client, "flow", run["id"], final)
        for _ in range(3):
            client.ok("GET", f"/flows/{flow['id']}")
        assert client.get(f"/flows/{uuid.uuid4()}")[0] == 404
        assert client.post("/flows/", {"tags": "not a list"})[0] == 422
        assert client.get("/no/such/route")[0] == 404

        first = scrape(api_url)
        family_of(first, "prefectlite_http_requests_total", "counter")
        assert sample(first, "prefectlite_http_requests_total", method="GET", route="/flows/{id}", status="200") == 3
        assert sample(first, "prefectlite_http_requests_total", method="GET", route="/flows/{id}", status="404") == 1
        assert sample(first, "prefectlite_http_requests_total", method="POST", route="/flows/", status="422") == 1
        for _, labels, _ in first["prefectlite_http_requests_total"]["samples"]:
            assert set(labels) == {"method", "route", "status"}
            assert flow["id"] not in labels["route"], "routes are labelled by pattern, not by concrete path"
            assert "no/such" not in labels["route"], "unknown paths must not become label values"
        assert sample(first, "prefectlite_http_requests_total", method="GET", route="unmatched", status="404") == 1
        family_of(first, "prefectlite_http_request_duration_seconds", "histogram")
        assert sample(first, "prefectlite_http_request_duration_seconds_count", method="GET", route="/flows/{id}") == 4
        assert (
            sample(
                first, "prefectlite_http_request_duration_seconds_bucket", method="GET", route="/flows/{id}", le="+Inf"
            )
            == 4
        )
        assert sample(first, "prefectlite_http_request_duration_seconds_sum", method="GET", route="/flows/{id}") > 0

        family_of(first, "prefectlite_flow_runs", "gauge")
        assert sample(first, "prefectlite_flow_runs", state_type="COMPLETED") == 2
        assert sample(first, "prefectlite_flow_runs", state_type="FAILED") == 1
        assert sample(first, "prefectlite_flow_runs", state_type="RUNNING") == 1
        family_of(first, "prefectlite_task_runs", "gauge")
        assert sample(first, "prefectlite_task_runs", state_type="COMPLETED") == 3
        assert sample(first, "prefectlite_task_runs", state_type="FAILED") == 1
        assert sample(first, "prefectlite_task_runs", state_type="RUNNING") == 1

        family_of(first, "prefectlite_notification_queue_depth", "gauge")
        assert sample(first, "prefectlite_notification_queue_depth") == 1  # the Failed run's, not sent (sender off)
        family_of(first, "prefectlite_notifications_failed", "gauge")
        assert sample(first, "prefectlite_notifications_failed") == 0

        family_of(first, "prefectlite_service_passes_total", "counter")
        assert sample(first, "prefectlite_service_passes_total", service="scheduler") >= 1
        assert sample(first, "prefectlite_service_passes_total", service="notifications") is None  # turned off
        family_of(first, "prefectlite_scheduler_lag_seconds", "gauge")
        assert sample(first, "prefectlite_scheduler_lag_seconds") >= 0
        family_of(first, "prefectlite_database_query_seconds_total", "counter")
        family_of(first, "prefectlite_database_queries_total", "counter")
        assert sample(first, "prefectlite_database_query_seconds_total") > 0
        queries = sample(first, "prefectlite_database_queries_total")
        assert queries > 0
        family_of(first, "prefectlite_process_resident_memory_bytes", "gauge")
        assert sample(first, "prefectlite_process_resident_memory_bytes") > 1_000_000

        second = scrape(api_url)
        assert sample(second, "prefectlite_database_queries_total") > queries
        # the first scrape is counted as a request by the second
        assert sample(second, "prefectlite_http_requests_total", method="GET", route="/metrics", status="200") == 1
        assert sample(second, "prefectlite_http_request_duration_seconds_count", method="GET", route="/metrics") == 1

    # the same database, now with the sender on: the one delivery fails and is kept as failed
    with prefectlite.serve(
        database=url,
        port=0,
        PREFECT_SERVER_METRICS_ENABLED=True,
        PREFECT_NOTIFICATIONS_MAX_ATTEMPTS=1,
        PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_LOOP_SECONDS=0.1,
    ) as api_url:
        client = Client(api_url)
        wait_until(lambda: client.ok("GET", "/flow_run_notification_queue/?status=FAILED"), "the notification to fail")
        third = scrape(api_url)
        assert sample(third, "prefectlite_notifications_failed") == 1
        assert sample(third, "prefectlite_notification_queue_depth") == 0
        assert sample(third, "prefectlite_flow_runs", state_type="COMPLETED") == 2


def _passes(api_url, service):
    return sample(scrape(api_url), "prefectlite_service_passes_total", service=service)


def test_two_servers_in_one_process_neither_wakes_nor_feeds_the_other(tmp_path):
    """Each database owns its hooks (DatabaseHooks): a state change on one server wakes that server's
    notification sender only, and an event stored by one reaches only that server's live feeds. (With the
    hooks in module-level lists, one server's notification woke every server's sender.)"""
    from fake_receivers import HTTPReceiver
    from helpers import RawWebSocket, event

    asleep = {"PREFECT_SERVER_METRICS_ENABLED": True, "PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_LOOP_SECONDS": 3600}
    with (
        HTTPReceiver() as hook_a,
        HTTPReceiver() as hook_b,
        prefectlite.serve(database=f"sqlite:///{tmp_path}/a.db", **asleep) as api_a,
        prefectlite.serve(database=f"sqlite:///{tmp_path}/b.db", **asleep) as api_b,
    ):
        servers = {api_a: (Client(api_a), hook_a), api_b: (Client(api_b), hook_b)}
        for client, hook in servers.values():
            client.ok(
                "POST",
                "/flow_run_notification_policies/",
                {"state_names": ["Failed"], "tags": [], "block_document_id": _slack_webhook(client, hook.url)["id"]},
            )
        # each sender made its first pass and now sleeps for an hour unless woken
        for api in servers:
            wait_until(lambda: _passes(api, "notifications") >= 1, "the sender's first pass")
        for api, other in ((api_a, api_b), (api_b, api_a)):
            client, hook = servers[api]
            mine, theirs = _passes(api, "notifications"), _passes(other, "notifications")
            run = new_flow_run(client, new_flow(client)["id"])
            set_state(client, "flow", run["id"], "FAILED")
            hook.wait_for(1, accepted=True)  # woken: not an hour later
            wait_until(lambda: _passes(api, "notifications") > mine, "the woken sender's pass to end")
            assert _passes(other, "notifications") == theirs, "the other server's sender was woken too"
        assert len(hook_a.hits) == len(hook_b.hits) == 1

        # live feeds: server B's subscriber, once subscribed (its backfill arrived), gets B's events only
        Client(api_b).ok("POST", "/events", [event(name="test.b.before")])
        feed = RawWebSocket(api_b, path="/events/out").authenticate()
        try:
            feed.send_json({"type": "filter", "filter": {"event": {"prefix": ["test."]}}})
            assert feed.recv_json()["event"]["event"] == "test.b.before"
            Client(api_a).ok("POST", "/events", [event(name="test.a.only")])  # published at once, if at all
            Client(api_b).ok("POST", "/events", [event(name="test.b.after")])
            assert feed.recv_json()["event"]["event"] == "test.b.after"
        finally:
            feed.close()


# ---------------------------------------------------------------------------------------------
# server log format


class ServerProcess:
    """`python prefectlite.py start` in a subprocess; output to files (no pipe can fill up)."""

    def __init__(self, tmp_path, env):
        self.port = free_port()
        self.out_path = tmp_path / f"server-{self.port}.out"
        self.err_path = tmp_path / f"server-{self.port}.err"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT")}
        full_env.update(env)
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
                env=full_env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        self.api_url = f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self):
        if not wait_for_health(self.api_url, timeout=WAIT):
            self.proc.kill()
            self.proc.wait(WAIT)
            raise AssertionError(f"server did not start: {self.err_path.read_text()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        return self.proc.returncode


def _request(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers.get("X-Request-ID")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("X-Request-ID")


def _logged_server(tmp_path, **env):
    url = f"sqlite:///{tmp_path}/prefect.db"
    server = ServerProcess(tmp_path, home_env(tmp_path, url, PREFECT_LOGGING_SERVER_LEVEL="INFO", **env))
    try:
        server.wait_ready()
        status, generated = _request(server.api_url + "/flows/" + str(uuid.uuid4()))
        assert status == 404
        status, given = _request(server.api_url + "/hello", {"X-Request-ID": "ops-check-42"})
        assert status == 200
    finally:
        assert server.stop() == 0
    return server.err_path.read_text(), generated, given


def test_json_server_logs_carry_the_request_id(tmp_path):
    text, generated, given = _logged_server(tmp_path, PREFECT_LOGGING_SERVER_FORMAT="json")
    assert generated and re.fullmatch(r"[\w.-]{1,64}", generated), generated
    assert given == "ops-check-42"
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no server logs at INFO"
    entries = []
    for line in lines:
        entry = json.loads(line)  # every line is one JSON object
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message", "request_id"} <= set(entry), entry
        entries.append(entry)
    mine = [e for e in entries if e["request_id"] == generated]
    assert mine and any("/api/flows/" in e["message"] and "404" in e["message"] for e in mine), entries
    theirs = [e for e in entries if e["request_id"] == given]
    assert theirs and any("/api/hello" in e["message"] for e in theirs), entries
    # a line is one request's: the other request's id is not on it
    assert not any(generated in e["message"] for e in theirs)


def test_every_response_request_id_is_in_the_json_log(tmp_path):
    """The request id exists to find a response's log line: responses the server answers before routing
    (401 without credentials, a CORS preflight, a bad X-Request-ID that is replaced) are logged too."""
    url = f"sqlite:///{tmp_path}/prefect.db"
    server = ServerProcess(
        tmp_path,
        home_env(
            tmp_path,
            url,
            PREFECT_LOGGING_SERVER_LEVEL="INFO",
            PREFECT_LOGGING_SERVER_FORMAT="json",
            PREFECT_SERVER_API_AUTH_STRING="admin:pw",
        ),
    )
    try:
        server.wait_ready()
        status, bad_id_replaced = _request(server.api_url + "/health", {"X-Request-ID": "not a valid id!"})
        assert status == 200
        assert bad_id_replaced and bad_id_replaced != "not a valid id!"
        assert re.fullmatch(r"[\w.-]{1,64}", bad_id_replaced)
        status, unauthorized = _request(server.api_url + "/flows/filter")
        assert status == 401 and unauthorized
        req = urllib.request.Request(
            server.api_url + "/flows/filter",
            method="OPTIONS",
            headers={"Origin": "http://example.test", "Access-Control-Request-Method": "POST"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            preflight = resp.headers.get("X-Request-ID")
        assert preflight
    finally:
        assert server.stop() == 0
    entries = [json.loads(line) for line in server.err_path.read_text().splitlines() if line.strip()]
    logged = {e["request_id"] for e in entries}
    missing = [
        f"{what} ({request_id})"
        for what, request_id in (
            ("GET with a replaced X-Request-ID", bad_id_replaced),
            ("401 without credentials", unauthorized),
            ("OPTIONS preflight", preflight),
        )
        if request_id not in logged
    ]
    assert not missing, f"responses whose X-Request-ID is in no log line: {missing}"


def test_default_server_logs_are_text(tmp_path):
    text, generated, given = _logged_server(tmp_path)
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no server logs at INFO"
    for line in lines:
        with pytest.raises(ValueError):
            json.loads(line)
    assert any(generated in line and "/api/flows/" in line and "INFO" in line for line in lines), text
    assert any(given in line and "/api/hello" in line for line in lines), text


def test_latency_histogram_counts_each_observation_in_every_bucket_it_fits_and_at_its_bound():
    metrics = prefectlite.Metrics()
    for seconds in (0.001, 0.0011, 0.004, 0.05, 20.0):  # 0.001 and 0.05 sit exactly on a bucket's bound
        metrics.observe("POST", "/flow_runs/", 201, seconds)
    requests, latency = metrics.snapshot()
    assert requests == {("POST", "/flow_runs/", "201"): 5}
    cumulative = dict(zip(prefectlite.Metrics.buckets, latency[("POST", "/flow_runs/")]))
    assert cumulative[0.001] == 1 and cumulative[0.0025] == 2 and cumulative[0.005] == 3
    assert cumulative[0.025] == 3 and cumulative[0.05] == 4 and cumulative[10.0] == 4
    assert latency[("POST", "/flow_runs/")][-2:] == [pytest.approx(20.0561), 5]  # sum and count (+Inf)
