"""Migrations (section 5), on SQLite and PostgreSQL: every revision goes up, down and up again; the
schema after `downgrade base` + `upgrade` equals a fresh one; data survives an upgrade; bad targets
are a one-line CLI error that changes nothing."""

import re
import uuid

import pytest

from helpers import Client, run_cli

import prefectlite


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/migrations.db"
    return request.getfixturevalue("empty_postgres_url")  # migrating is what these tests do


@pytest.fixture
def settings(tmp_path):
    return prefectlite.load_settings(env={"PREFECT_HOME": str(tmp_path / "home")})


@pytest.fixture
def db(db_url, settings):
    database = prefectlite.open_database(db_url, settings)
    yield database
    database.close()


def revision_ids():
    return [r.id for r in prefectlite.list_revisions()]


def cli_env(tmp_path, db_url):
    return {"PREFECT_HOME": str(tmp_path / "cli-home"), "PREFECT_API_DATABASE_CONNECTION_URL": db_url}


def assert_one_line_error(proc):
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# the migration files themselves


def test_every_revision_has_up_and_down_scripts_for_both_dialects():
    revisions = prefectlite.list_revisions()
    assert revisions, "no migrations found"
    ids = [r.id for r in revisions]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for revision in revisions:
        for dialect in ("sqlite", "postgresql"):
            for direction in ("up", "down"):
                script = revision.scripts.get((dialect, direction))
                assert script is not None and script.is_file(), (revision.id, dialect, direction)
                assert prefectlite.split_sql_script(script.read_text(encoding="utf-8")), (
                    revision.id,
                    dialect,
                    direction,
                )


def test_revision_ids_are_consecutive():
    ids = revision_ids()
    assert ids == [f"{i:04d}" for i in range(1, len(ids) + 1)]


# ---------------------------------------------------------------------------------------------
# up, down, up again


DATA_ONLY_REVISIONS = {"0011", "0012"}  # they change rows, not the schema (each has a test of its own below)


def test_every_revision_goes_up_down_and_up_again(db):
    ids = revision_ids()
    assert prefectlite.current_revision(db) is None
    for i, rev in enumerate(ids):
        before_up = db.schema_signature() if i else None
        assert prefectlite.migrate(db, rev) == [rev]
        assert prefectlite.current_revision(db) == rev
        after_up = db.schema_signature()
        assert prefectlite.downgrade(db, "-1") == [rev]
        previous = ids[i - 1] if i else None
        assert prefectlite.current_revision(db) == previous
        if rev in DATA_ONLY_REVISIONS:
            assert after_up == before_up == db.schema_signature(), f"{rev} is not data only"
        elif i:
            assert db.schema_signature() != after_up, f"downgrading {rev} changed nothing"
        assert prefectlite.migrate(db, rev) == [rev]
        assert prefectlite.current_revision(db) == rev
        assert db.schema_signature() == after_up, f"{rev} up-down-up gives a different schema"
    assert prefectlite.schema_is_current(db)


def test_downgrade_base_then_upgrade_equals_a_fresh_upgrade(db):
    prefectlite.migrate(db)
    fresh = db.schema_signature()
    assert fresh
    undone = prefectlite.downgrade(db, "base")
    assert undone == list(reversed(revision_ids()))
    assert prefectlite.current_revision(db) is None
    with db.read() as tx:
        assert db.table_names(tx) == [], "downgrade base left tables behind"
    assert db.schema_signature() == []
    assert prefectlite.migrate(db) == revision_ids()
    assert db.schema_signature() == fresh


def test_schema_equals_a_second_fresh_database_sqlite(tmp_path, settings):
    """A SQLite database taken down to base and up again matches one that was only ever upgraded."""
    db = prefectlite.open_database(f"sqlite:///{tmp_path}/cycled.db", settings)
    other = prefectlite.open_database(f"sqlite:///{tmp_path}/other.db", settings)
    try:
        prefectlite.migrate(other)
        prefectlite.migrate(db)
        prefectlite.downgrade(db, "base")
        prefectlite.migrate(db)
        assert db.schema_signature() == other.schema_signature()
    finally:
        db.close()
        other.close()


def test_upgrade_is_idempotent(db):
    assert prefectlite.migrate(db) == revision_ids()
    before = db.schema_signature()
    assert prefectlite.migrate(db) == []
    assert db.schema_signature() == before


def test_downgrade_to_a_named_revision(db):
    ids = revision_ids()
    prefectlite.migrate(db)
    prefectlite.downgrade(db, ids[0])
    assert prefectlite.current_revision(db) == ids[0]
    prefectlite.migrate(db)
    assert prefectlite.current_revision(db) == ids[-1]


# ---------------------------------------------------------------------------------------------
# data survives an upgrade


def _insert_via_sql(db):
    flow_id, run_id, log_id = (str(uuid.uuid4()) for _ in range(3))
    stamp = "2024-05-01T12:00:00.000000+00:00"
    with db.write() as tx:
        tx.execute(
            "INSERT INTO flow (id, created, updated, name) VALUES (?, ?, ?, ?)", (flow_id, stamp, stamp, "kept-flow")
        )
        tx.execute(
            "INSERT INTO flow_run (id, created, updated, name, flow_id, parameters) VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, stamp, stamp, "kept-run", flow_id, '{"x": 1}'),
        )
        tx.execute(
            "INSERT INTO log (id, created, updated, name, level, message, timestamp, flow_run_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (log_id, stamp, stamp, "kept.logger", 20, "kept message", stamp, run_id),
        )
    return flow_id, run_id


def test_data_survives_an_upgrade(db, db_url, tmp_path):
    ids = revision_ids()
    if len(ids) < 2:
        pytest.skip("only one revision")
    prefectlite.migrate(db)
    prefectlite.downgrade(db, "-1")
    assert prefectlite.current_revision(db) == ids[-2]
    flow_id, run_id = _insert_via_sql(db)
    assert prefectlite.migrate(db) == [ids[-1]]
    with db.read() as tx:
        assert tx.scalar("SELECT name FROM flow WHERE id = ?", (flow_id,)) == "kept-flow"
        assert tx.scalar("SELECT name FROM flow_run WHERE id = ?", (run_id,)) == "kept-run"
    db.close()
    # and the API reads it after the upgrade
    with prefectlite.serve(database=db_url, port=0) as api_url:
        client = Client(api_url)
        assert client.ok("GET", f"/flows/{flow_id}")["name"] == "kept-flow"
        run = client.ok("GET", f"/flow_runs/{run_id}")
        assert run["name"] == "kept-run" and run["parameters"] == {"x": 1}
        logs = client.ok("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
        assert [entry["message"] for entry in logs] == ["kept message"]


def test_data_written_through_the_api_survives_downgrade_and_upgrade_of_the_last_revision(db_url, tmp_path):
    with prefectlite.serve(database=db_url, port=0) as api_url:
        client = Client(api_url)
        flow = client.ok("POST", "/flows/", {"name": "api-flow", "tags": ["t"]})
        run = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "name": "api-run"})
    env = cli_env(tmp_path, db_url)
    down = run_cli("database", "downgrade", "-y", "-r", "-1", env=env)
    assert down.returncode == 0, down.stderr
    up = run_cli("database", "upgrade", "-y", env=env)
    assert up.returncode == 0, up.stderr
    with prefectlite.serve(database=db_url, port=0) as api_url:
        client = Client(api_url)
        assert client.ok("GET", f"/flows/{flow['id']}")["tags"] == ["t"]
        assert client.ok("GET", f"/flow_runs/{run['id']}")["name"] == "api-run"


def _seed_pool_queue_and_flow(tx, pool_id, queue_id, flow_id, stamp):
    """A work pool "kept-pool" with its queue "default", and a flow "f", written as an older revision's rows."""
    tx.execute(
        "INSERT INTO work_pool (id, created, updated, name, type) VALUES (?, ?, ?, ?, ?)",
        (pool_id, stamp, stamp, "kept-pool", "process"),
    )
    tx.execute(
        "INSERT INTO work_queue (id, created, updated, name, work_pool_id) VALUES (?, ?, ?, ?, ?)",
        (queue_id, stamp, stamp, "default", pool_id),
    )
    tx.execute("INSERT INTO flow (id, created, updated, name) VALUES (?, ?, ?, ?)", (flow_id, stamp, stamp, "f"))


def test_0011_gives_the_runs_made_before_it_their_queues_work_pool(db):
    """A run's work_pool_id and work_pool_name were never set before 0011 (Prefect answers them from the
    run's work queue's pool): the upgrade fills them, leaves a run without a queue alone, and the
    downgrade clears them."""
    prefectlite.migrate(db, "0010")
    pool_id, queue_id, flow_id, queued, loose = (str(uuid.uuid4()) for _ in range(5))
    stamp = "2024-05-01T12:00:00.000000+00:00"
    with db.write() as tx:
        _seed_pool_queue_and_flow(tx, pool_id, queue_id, flow_id, stamp)
        for run_id, queue in ((queued, queue_id), (loose, None)):
            tx.execute(
                "INSERT INTO flow_run (id, created, updated, name, flow_id, work_queue_id) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, stamp, stamp, run_id[:8], flow_id, queue),
            )

    def pools():
        with db.read() as tx:
            rows = tx.query("SELECT id, work_pool_id, work_pool_name FROM flow_run")
            return {row["id"]: (row["work_pool_id"], row["work_pool_name"]) for row in rows}

    assert prefectlite.migrate(db, "0011") == ["0011"]
    assert pools() == {queued: (pool_id, "kept-pool"), loose: (None, None)}
    prefectlite.downgrade(db, "0010")
    assert pools() == {queued: (None, None), loose: (None, None)}


def test_0012_clears_the_work_queue_id_of_runs_and_deployments_whose_queue_was_deleted(db):
    """Deleting a work queue left its runs and deployments naming its id (Prefect's foreign keys are ON DELETE
    SET NULL): 0012 clears those ids, keeps the ones of queues that exist and every work_queue_name."""
    prefectlite.migrate(db, "0011")
    pool_id, queue_id, gone_id, flow_id = (str(uuid.uuid4()) for _ in range(4))
    stamp = "2024-05-01T12:00:00.000000+00:00"
    rows = {}
    with db.write() as tx:
        _seed_pool_queue_and_flow(tx, pool_id, queue_id, flow_id, stamp)
        for queue, queue_name in ((queue_id, "default"), (gone_id, "gone"), (None, None)):
            run_id, dep_id = str(uuid.uuid4()), str(uuid.uuid4())
            tx.execute(
                "INSERT INTO flow_run (id, created, updated, name, flow_id, work_queue_id, work_queue_name) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, stamp, stamp, run_id[:8], flow_id, queue, queue_name),
            )
            tx.execute(
                "INSERT INTO deployment (id, created, updated, name, flow_id, work_queue_id, work_queue_name) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (dep_id, stamp, stamp, dep_id[:8], flow_id, queue, queue_name),
            )
            rows[run_id] = rows[dep_id] = (None if queue == gone_id else queue, queue_name)

    def queues():
        with db.read() as tx:
            found = tx.query("SELECT id, work_queue_id, work_queue_name FROM flow_run")
            found += tx.query("SELECT id, work_queue_id, work_queue_name FROM deployment")
            return {row["id"]: (row["work_queue_id"], row["work_queue_name"]) for row in found}

    assert prefectlite.migrate(db, "0012") == ["0012"]
    assert queues() == rows


def test_0013_gives_the_task_runs_made_before_it_empty_labels(db):
    """0013 adds task_run.labels: the task runs made before keep their rows and have no labels ({}), and the
    downgrade drops the column and keeps the rows."""
    prefectlite.migrate(db, "0012")
    flow_id, run_id, task_run_id = (str(uuid.uuid4()) for _ in range(3))
    stamp = "2024-05-01T12:00:00.000000+00:00"
    with db.write() as tx:
        tx.execute("INSERT INTO flow (id, created, updated, name) VALUES (?, ?, ?, ?)", (flow_id, stamp, stamp, "f"))
        tx.execute(
            "INSERT INTO flow_run (id, created, updated, name, flow_id) VALUES (?, ?, ?, ?, ?)",
            (run_id, stamp, stamp, "r", flow_id),
        )
        tx.execute(
            "INSERT INTO task_run (id, created, updated, name, flow_run_id, task_key, dynamic_key) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (task_run_id, stamp, stamp, "t", run_id, "k", "0"),
        )

    assert prefectlite.migrate(db, "0013") == ["0013"]
    with db.read() as tx:
        rows = tx.query("SELECT id, task_key, labels FROM task_run")
    assert [(r["id"], r["task_key"], prefectlite.stored_labels(r)) for r in rows] == [(task_run_id, "k", {})]
    prefectlite.downgrade(db, "0012")
    with db.read() as tx:
        assert "labels" not in db.column_names(tx, "task_run")
        assert [r["id"] for r in tx.query("SELECT id FROM task_run")] == [task_run_id]


# ---------------------------------------------------------------------------------------------
# bad targets: library level


def test_unknown_revision_raises_and_changes_nothing(db):
    prefectlite.migrate(db, revision_ids()[0])
    before = db.schema_signature()
    with pytest.raises(prefectlite.ConfigurationError):
        prefectlite.migrate(db, "9999")
    with pytest.raises(prefectlite.ConfigurationError):
        prefectlite.downgrade(db, "9999")
    assert prefectlite.current_revision(db) == revision_ids()[0]
    assert db.schema_signature() == before


def test_downgrade_below_base_raises_and_changes_nothing(db):
    prefectlite.migrate(db)
    before = db.schema_signature()
    with pytest.raises(prefectlite.ConfigurationError):
        prefectlite.downgrade(db, f"-{len(revision_ids()) + 1}")
    assert prefectlite.current_revision(db) == revision_ids()[-1]
    assert db.schema_signature() == before


# ---------------------------------------------------------------------------------------------
# the CLI on both dialects


def test_cli_upgrade_downgrade_current_history(db_url, tmp_path):
    env = cli_env(tmp_path, db_url)
    ids = revision_ids()

    def current():
        proc = run_cli("database", "current", env=env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    # nothing there yet (no SQLite file; an empty PostgreSQL database): refused, not "base"
    line = assert_one_line_error(run_cli("database", "current", env=env))
    assert "no database file" in line or "no prefectlite schema" in line, line
    proc = run_cli("database", "upgrade", "-y", "-r", ids[0], env=env)
    assert proc.returncode == 0, proc.stderr
    assert current() == ids[0]
    proc = run_cli("database", "upgrade", "-y", env=env)
    assert proc.returncode == 0, proc.stderr
    assert current() == ids[-1]
    history = run_cli("database", "history", env=env)
    assert history.returncode == 0, history.stderr
    for rev in ids:
        assert re.search(rf"^{rev}\b", history.stdout, re.M), history.stdout
    assert re.search(rf"^{ids[-1]}\b.*current", history.stdout, re.M), history.stdout
    proc = run_cli("database", "downgrade", "-y", "-r", "-1", env=env)
    assert proc.returncode == 0, proc.stderr
    assert current() == ids[-2]
    proc = run_cli("database", "downgrade", "-y", "-r", "base", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "no prefectlite schema" in assert_one_line_error(run_cli("database", "current", env=env))
    proc = run_cli("database", "upgrade", "-y", env=env)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("database", "downgrade", "-y", "-r", ids[0], env=env)
    assert proc.returncode == 0, proc.stderr
    assert current() == ids[0]
    proc = run_cli("database", "downgrade", "-y", env=env)  # default: one step
    assert proc.returncode == 0, proc.stderr
    # at base there is no schema left: `current` says so rather than guess it is ours
    assert "no prefectlite schema" in assert_one_line_error(run_cli("database", "current", env=env))


@pytest.mark.parametrize(
    "args",
    [
        ("database", "upgrade", "-y", "-r", "9999"),
        ("database", "upgrade", "-y", "-r", "not-a-revision"),
        ("database", "downgrade", "-y", "-r", "9999"),
        ("database", "downgrade", "-y", "-r", "-99"),
    ],
)
def test_cli_bad_target_is_one_line_error_and_changes_nothing(db_url, tmp_path, settings, args):
    env = cli_env(tmp_path, db_url)
    assert run_cli("database", "upgrade", "-y", env=env).returncode == 0
    db = prefectlite.open_database(db_url, settings)
    try:
        flow_id, _ = _insert_via_sql(db)
        before = db.schema_signature()
    finally:
        db.close()
    proc = run_cli(*args, env=env)
    assert_one_line_error(proc)
    db = prefectlite.open_database(db_url, settings)
    try:
        assert prefectlite.current_revision(db) == revision_ids()[-1]
        assert db.schema_signature() == before
        with db.read() as tx:
            assert tx.scalar("SELECT name FROM flow WHERE id = ?", (flow_id,)) == "kept-flow"
    finally:
        db.close()


def test_cli_downgrade_of_an_empty_database_is_one_line_error(db_url, tmp_path, settings):
    env = cli_env(tmp_path, db_url)
    proc = run_cli("database", "downgrade", "-y", env=env)
    assert_one_line_error(proc)
    db = prefectlite.open_database(db_url, settings)
    try:
        assert prefectlite.current_revision(db) is None
        with db.read() as tx:
            assert db.table_names(tx) == []
    finally:
        db.close()


def test_cli_reset_drops_data_and_ends_at_head(db_url, tmp_path, settings):
    env = cli_env(tmp_path, db_url)
    assert run_cli("database", "upgrade", "-y", env=env).returncode == 0
    db = prefectlite.open_database(db_url, settings)
    try:
        _insert_via_sql(db)
    finally:
        db.close()
    proc = run_cli("database", "reset", "-y", env=env)
    assert proc.returncode == 0, proc.stderr
    db = prefectlite.open_database(db_url, settings)
    try:
        assert prefectlite.current_revision(db) == revision_ids()[-1]
        with db.read() as tx:
            assert tx.scalar("SELECT COUNT(*) FROM flow") == 0
    finally:
        db.close()
