"""Every filter the UI and the SDK use is served by an index: SQLite's query plans, checked.

The queries are built by the same functions the routes use (prefectlite.filtered_query / count_query),
on a database with real rows and ANALYZE statistics, so the planner chooses as it will in production.
"""

import datetime as dt

import pytest

import prefectlite

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.timezone.utc)
DAY_AGO = (NOW - dt.timedelta(days=1)).isoformat()


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "plans.db"
    db = prefectlite.open_database(f"sqlite:///{path}")
    prefectlite.migrate(db)
    with db.write() as tx:  # many flows and deployments, as on a real server, so the statistics are realistic
        flows = [prefectlite.create_flow(tx, {"name": f"f{i}", "tags": []})[0] for i in range(40)]
        deployments = [str(prefectlite.uuid.uuid4()) for _ in range(40)]
        for i in range(1200):
            state = ["COMPLETED", "FAILED", "RUNNING", "SCHEDULED"][i % 4]
            run, _ = prefectlite.create_flow_run(
                tx,
                {
                    "flow_id": flows[i % 40]["id"],
                    "tags": ["a"] if i % 2 else [],
                    "state": {"type": state, "state_details": {}},
                },
                {"deployment_id": deployments[i % 40]},
            )
            prefectlite.create_task_run(tx, {"flow_run_id": run["id"], "task_key": "t", "dynamic_key": "0"})
            prefectlite.create_logs(
                tx,
                [
                    {
                        "name": "x",
                        "level": 20,
                        "message": "m",
                        "flow_run_id": run["id"],
                        "timestamp": prefectlite.now_iso(),
                    }
                ],
            )
        tx.execute("ANALYZE")
    yield db
    db.close()


def plan(db, sql, params):
    with db.read() as tx:
        return [row["detail"] for row in tx.query("EXPLAIN QUERY PLAN " + sql, params)]


def assert_indexed(lines, table, search=False):
    """No full scan of `table` without an index. A scan in index order reads only a page's worth when the
    filter is not selective; a selective filter (search=True) must be an index SEARCH."""
    for line in lines:
        words = line.split()
        if table in words and words[0] == "SCAN" and ("INDEX" not in line or search):
            raise AssertionError(f"full table scan of {table}: {lines}")
    assert any(table in line.split() for line in lines), lines


ONE = "00000000-0000-0000-0000-000000000001"
NEWEST = "EXPECTED_START_TIME_DESC"
# (body, selective): a selective filter must SEARCH an index; the others may walk the sort's index
FLOW_RUN_FILTERS = {
    "newest first (the runs page)": ({"sort": NEWEST, "limit": 50}, False),
    "by state": ({"flow_runs": {"state": {"type": {"any_": ["FAILED", "CRASHED"]}}}, "sort": NEWEST}, False),
    "by tags": ({"flow_runs": {"tags": {"all_": ["a"]}}, "sort": NEWEST}, False),
    "by name": ({"flow_runs": {"name": {"like_": "fox"}}, "sort": NEWEST}, False),
    "by time window": ({"flow_runs": {"expected_start_time": {"after_": DAY_AGO}}, "sort": NEWEST}, True),
    "by flow id": ({"flow_runs": {"flow_id": {"any_": [ONE]}}, "sort": NEWEST}, True),
    "by deployment": ({"flow_runs": {"deployment_id": {"any_": [ONE]}}, "sort": NEWEST}, True),
    "scheduled, for workers": (
        {
            "flow_runs": {
                "state": {"type": {"any_": ["SCHEDULED"]}},
                "next_scheduled_start_time": {"before_": NOW.isoformat()},
            },
            "sort": "NEXT_SCHEDULED_START_TIME_ASC",
        },
        True,
    ),
}


@pytest.mark.parametrize("name", FLOW_RUN_FILTERS)
def test_flow_run_filters_use_an_index(db, name):
    settings = prefectlite.load_settings(env={})
    body, selective = FLOW_RUN_FILTERS[name]
    with db.read() as tx:
        sql, params = prefectlite.filtered_query(tx, "flow_run", body, settings)
    assert_indexed(plan(db, sql, params), "flow_run", search=selective)


def test_the_json_page_the_route_runs_uses_the_same_index(db):
    # the route wraps the page query: the database writes each run's JSON and the page as one text
    settings = prefectlite.load_settings(env={})
    body = {"flow_runs": {"state": {"type": {"any_": ["FAILED", "CRASHED"]}}}, "sort": NEWEST, "limit": 8}
    with db.read() as tx:
        select = prefectlite.run_json_select(tx, "flow_run", prefectlite.now_iso())
        sql, params = prefectlite.json_page_query(tx, "flow_run", body, settings, select)
        plain_sql, plain_params = prefectlite.filtered_query(tx, "flow_run", body, settings)
    lines = plan(db, sql, params)
    assert_indexed(lines, "flow_run")
    uses = lambda ls: sorted(w for line in ls for w in line.split() if w.startswith("ix_"))  # noqa: E731
    assert uses(lines) == uses(plan(db, plain_sql, plain_params)), lines


def test_the_dashboard_history_reads_only_its_covering_index(db):
    body = {"flow_runs": {}}
    with db.read() as tx:
        starts = [(NOW - dt.timedelta(hours=h)).isoformat(timespec="microseconds") for h in range(24, 0, -1)]
        sql, params = prefectlite.history_query(tx, "flow_run", body, starts, NOW.isoformat(timespec="microseconds"))
    lines = plan(db, sql, params)
    assert any("COVERING INDEX ix_flow_run__expected_start_time_history" in line for line in lines), lines


def test_dashboard_counts_use_an_index(db):
    body = {"flow_runs": {"state": {"type": {"any_": ["FAILED"]}}, "expected_start_time": {"after_": DAY_AGO}}}
    with db.read() as tx:
        sql, params = prefectlite.count_query(tx, "flow_run", body)
    lines = plan(db, sql, params)
    assert_indexed(lines, "flow_run", search=True)
    assert any(
        "ix_flow_run__state_type_expected_start_time" in line or "ix_flow_run__expected_start_time" in line
        for line in lines
    ), lines


@pytest.mark.parametrize(
    "table, body",
    [
        ("task_run", {"task_runs": {"flow_run_id": {"any_": [ONE]}}}),
        ("log", {"logs": {"flow_run_id": {"any_": [ONE]}}, "sort": "TIMESTAMP_ASC"}),
        ("artifact", {"artifacts": {"flow_run_id": {"any_": [ONE]}}}),
        ("deployment", {"deployments": {"flow_id": {"any_": [ONE]}}}),
        ("flow_run", {"flow_runs": {"parent_task_run_id": {"any_": [ONE]}}}),
    ],
)
def test_detail_page_queries_use_an_index(db, table, body):
    settings = prefectlite.load_settings(env={})
    with db.read() as tx:
        sql, params = prefectlite.filtered_query(tx, table, body, settings)
    assert_indexed(plan(db, sql, params), table, search=True)


def test_a_filter_without_an_index_would_be_caught(db):
    # the check itself can fail: a filter on an unindexed column scans the table
    with db.read() as tx:
        sql, params = prefectlite.count_query(tx, "flow_run", {"flow_runs": {"flow_version": {"any_": ["x"]}}})
    with pytest.raises(AssertionError, match="full table scan"):
        assert_indexed(plan(db, sql, params), "flow_run", search=True)


def test_a_flow_runs_task_runs_are_found_by_the_unique_index_alone(db):
    # migration 0006 dropped the single-column index on task_run.flow_run_id: the unique
    # (flow_run_id, task_key, dynamic_key) index serves the run graph's lookup, one index fewer to write
    with db.read() as tx:
        indexes = {
            row["name"]
            for row in tx.query("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'task_run'")
        }
    assert "ix_task_run__flow_run_id" not in indexes
    lines = plan(db, "SELECT * FROM task_run WHERE flow_run_id = ? ORDER BY expected_start_time, id", (ONE,))
    assert any("uq_task_run__flow_run_id_task_key_dynamic_key" in line for line in lines), lines


def seed_task_runs(db, scheduled_keys=1000, scheduled_per_key=2, flow_runs=300, tasks_per_flow_run=10):
    """Flows' finished task runs (most of a server's task runs) and scheduled background runs for task
    workers, spread over many keys (a chunk of keys the dispatcher asks for has a few of them). Written in
    transactions of a few hundred runs: PostgreSQL's watchdog ends a transaction that outlives the database
    timeout, and one of 7,000 runs did under a loaded machine (`-n 6`)."""
    with db.write() as tx:
        flow = prefectlite.create_flow(tx, {"name": "f", "tags": []})[0]
    for _ in range(flow_runs):
        with db.write() as tx:
            run, _ = prefectlite.create_flow_run(tx, {"flow_id": flow["id"], "state": {"type": "COMPLETED"}}, {})
            for j in range(tasks_per_flow_run):
                prefectlite.create_task_run(
                    tx,
                    {"flow_run_id": run["id"], "task_key": f"t{j}", "dynamic_key": "0", "state": {"type": "COMPLETED"}},
                )
    scheduled = scheduled_keys * scheduled_per_key
    for start in range(0, scheduled, 500):
        with db.write() as tx:
            for i in range(start, min(start + 500, scheduled)):
                prefectlite.create_task_run(
                    tx,
                    {
                        "task_key": f"background-{i % scheduled_keys}",
                        "dynamic_key": str(i),
                        "state": {"type": "SCHEDULED", "state_details": {"deferred": True}},
                    },
                )


DISPATCH_KEYS = [f"background-{i}" for i in range(100)]  # a chunk of keys, as the dispatcher asks for them


def test_the_task_run_dispatchers_query_searches_its_index_per_key(tmp_path):
    # the server never runs ANALYZE on SQLite: the planner chooses without statistics, as here
    db = prefectlite.open_database(f"sqlite:///{tmp_path}/dispatch.db")
    try:
        prefectlite.migrate(db)
        seed_task_runs(db)
        sql = prefectlite.task_dispatch_query(len(DISPATCH_KEYS))
        lines = plan(db, sql, (*DISPATCH_KEYS, 100, 0))
        assert any(
            "SEARCH t USING INDEX ix_task_run__scheduled_task_key (state_type=? AND task_key=?)" in line
            for line in lines
        ), lines
        assert_indexed(lines, "t", search=True)
    finally:
        db.close()


def test_the_task_run_dispatchers_query_searches_its_index_per_key_on_postgresql(postgres_url):
    # PostgreSQL charges an index descent per key asked for: reading every scheduled run is cheaper while
    # there are few, so the index is chosen once there are thousands (as there were when rounds were slow)
    db = prefectlite.open_database(postgres_url)
    try:
        seed_task_runs(db, scheduled_keys=3000, flow_runs=100)
        with db.write() as tx:
            tx.execute("ANALYZE task_run")  # as autovacuum does
        sql = prefectlite.task_dispatch_query(len(DISPATCH_KEYS))
        with db.read() as tx:
            lines = [next(iter(row.values())) for row in tx.query("EXPLAIN " + sql, (*DISPATCH_KEYS, 100, 0))]
        text = "\n".join(lines)
        assert "ix_task_run__scheduled_task_key" in text and "Index Cond: ((task_key)::text = ANY" in text, text
        assert "Seq Scan on task_run" not in text, text
    finally:
        db.close()
