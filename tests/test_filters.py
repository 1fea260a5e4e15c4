"""The filter compiler (section 8: build_where, compile_filter) without HTTP: a table of filter bodies,
each compiled and run on a real database holding a few known rows, against the names it must select;
and the 422 details of bad filters, naming the field. Both dialects (SQLite, PostgreSQL): the compiler
writes each one's SQL (tags as JSON, case-insensitive LIKE).

test_api.py checks the same language end to end, through the routes that take it.
"""

import pytest

from helpers import migrated_sqlite_url

import prefectlite

T = "2026-03-01T12:00:00.000000+00:00"

# name: (tags, state_type, state_name, expected_start_time, flow); the flows are "etl" and "report"
RUNS = {
    "alpha": (["a", "b"], "COMPLETED", "Completed", "2026-03-01T10:00:00.000000+00:00", "etl"),
    "Beta": (["b"], "RUNNING", "Running", "2026-03-01T11:00:00.000000+00:00", "etl"),
    "gamma": ([], "SCHEDULED", "Late", "2026-03-01T13:00:00.000000+00:00", "report"),
    "delta_%": (["ü"], None, None, None, "report"),
}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request, tmp_path_factory):
    """One database of each dialect for the module: the tests only read it."""
    if request.param == "sqlite":
        url = migrated_sqlite_url(tmp_path_factory.mktemp("filters") / "filters.db")
    else:
        url = request.getfixturevalue("module_postgres_url")
    database = prefectlite.open_database(url)
    with database.write() as tx:
        flows = {}
        for flow in ("etl", "report"):
            flows[flow] = prefectlite.new_id()
            prefectlite.insert_row(
                tx,
                "flow",
                {
                    "id": flows[flow],
                    "created": T,
                    "updated": T,
                    "name": flow,
                    "tags": ["flow-tag"] if flow == "etl" else [],
                },
            )
        for name, (tags, state_type, state_name, expected, flow) in RUNS.items():
            prefectlite.insert_row(
                tx,
                "flow_run",
                {
                    "id": prefectlite.new_id(),
                    "created": T,
                    "updated": T,
                    "name": name,
                    "flow_id": flows[flow],
                    "tags": tags,
                    "state_type": state_type,
                    "state_name": state_name,
                    "expected_start_time": expected,
                    "run_count": 0,
                    "total_run_time": 0.0,
                    "empirical_policy": {},
                },
            )
    yield database
    database.close()


def selected(db, body, table="flow_run"):
    with db.read() as tx:
        where, params = prefectlite.build_where(tx, table, body)
        return sorted(r["name"] for r in tx.query(f"SELECT {table}.name FROM {table} WHERE {where}", params))


@pytest.mark.parametrize(
    "body, names",
    [
        ({}, ["Beta", "alpha", "delta_%", "gamma"]),
        ({"flow_runs": {"name": {"any_": ["alpha", "gamma", "nobody"]}}}, ["alpha", "gamma"]),
        ({"flow_runs": {"name": {"not_any_": ["alpha"]}}}, ["Beta", "delta_%", "gamma"]),
        ({"flow_runs": {"name": {"any_": []}}}, []),  # any of nothing: nothing
        ({"flow_runs": {"name": {"like_": "ET"}}}, ["Beta"]),  # case-insensitive
        ({"flow_runs": {"name": {"startswith_": "al"}}}, ["alpha"]),
        ({"flow_runs": {"name": {"startswith_": ["al", "ga"]}}}, ["alpha", "gamma"]),  # any of several prefixes
        ({"flow_runs": {"tags": {"all_": ["a", "b"]}}}, ["alpha"]),
        ({"flow_runs": {"tags": {"any_": ["a", "ü"]}}}, ["alpha", "delta_%"]),
        ({"flow_runs": {"tags": {"all_": []}}}, ["Beta", "alpha", "delta_%", "gamma"]),  # all of nothing: everything
        ({"flow_runs": {"tags": {"is_null_": True}}}, ["gamma"]),
        ({"flow_runs": {"state": {"type": {"any_": ["RUNNING", "SCHEDULED"]}}}}, ["Beta", "gamma"]),
        ({"flow_runs": {"state": {"name": {"any_": ["Late"]}}}}, ["gamma"]),
        ({"flow_runs": {"expected_start_time": {"before_": "2026-03-01T11:00:00+00:00"}}}, ["Beta", "alpha"]),
        ({"flow_runs": {"expected_start_time": {"after_": "2026-03-01T11:00:00.000001+00:00"}}}, ["gamma"]),
        ({"flow_runs": {"expected_start_time": {"is_null_": True}}}, ["delta_%"]),
        (
            {"flow_runs": {"operator": "or_", "name": {"any_": ["alpha"]}, "tags": {"any_": ["ü"]}}},
            ["alpha", "delta_%"],
        ),
        ({"flow_runs": {"name": {"operator": "or_", "like_": "amm", "startswith_": "B"}}}, ["Beta", "gamma"]),
        ({"flows": {"name": {"any_": ["etl"]}}}, ["Beta", "alpha"]),  # another table's filter: through the relation
        ({"flows": {"tags": {"all_": ["flow-tag"]}}, "flow_runs": {"tags": {"any_": ["a"]}}}, ["alpha"]),
    ],
)
def test_each_filter_selects_exactly_its_rows(db, body, names):
    assert selected(db, body) == names


def test_flows_are_filtered_by_their_runs(db):
    assert selected(db, {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}, table="flow") == ["report"]


def test_parameters_never_become_sql(db):
    """Every value is a parameter: a quote or a placeholder in a value is only text to match."""
    hostile = "x' OR '1'='1"
    assert selected(db, {"flow_runs": {"name": {"any_": [hostile, "?"]}}}) == []
    assert selected(db, {"flow_runs": {"name": {"like_": hostile}}}) == []


@pytest.mark.parametrize(
    "body, loc, message",
    [
        ({"flow_runs": {"nmae": {"any_": ["x"]}}}, ["body", "flow_runs", "nmae"], "extra fields not permitted"),
        ({"flow_runs": {"name": {"near_": "x"}}}, ["body", "flow_runs", "name", "near_"], "unknown filter operator"),
        ({"flow_runs": {"name": "alpha"}}, ["body", "flow_runs", "name"], "not a valid dict"),
        ({"flow_runs": {"operator": "xor_"}}, ["body", "flow_runs", "operator"], "not a valid enumeration member"),
        (
            {"flow_runs": {"expected_start_time": {"like_": "2026"}}},
            ["body", "flow_runs", "expected_start_time", "like_"],
            "applies to text fields only",
        ),
        ({"flow_runs": {"tags": {"any_": "a"}}}, ["body", "flow_runs", "tags", "any_"], "not a valid list"),
    ],
)
def test_a_bad_filter_is_refused_naming_the_field(db, body, loc, message):
    with db.read() as tx, pytest.raises(prefectlite.ValidationFailed) as refused:
        prefectlite.build_where(tx, "flow_run", body)
    [error] = refused.value.errors
    assert error["loc"] == loc and message in error["msg"], error
