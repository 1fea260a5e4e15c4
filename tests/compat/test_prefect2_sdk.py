"""Conformance: the real prefect 2.20 SDK against the server, checked through the REST API.

Each test runs an unmodified SDK script (Prefect's reference scenarios, or ours in
scenarios/) in a subprocess with the venv's python, then reads back through the API
what the server recorded: flow runs, task runs, state histories, logs, artifacts, blocks.

Run: pytest tests/compat   (see conftest.py for the environment variables)
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from helpers import Client, ServerProcess, wait_for_input_schema, wait_for_pause, wait_until

HERE = Path(__file__).resolve().parent
SCENARIOS_DIR = HERE / "scenarios"
# <repo>/../shared/reference/prefect2-scenarios
REFERENCE_SCENARIOS_DIR = HERE.parents[1].parent / "shared" / "reference" / "prefect2-scenarios"

pytestmark = pytest.mark.compat

INFO, WARNING, ERROR = 20, 30, 40


# --------------------------------------------------------------------------- helpers


def script_result(proc) -> dict:
    """The JSON a scenario script prints after 'COMPAT_RESULT '."""
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("COMPAT_RESULT "):
            return json.loads(line[len("COMPAT_RESULT ") :])
    pytest.fail(f"the script printed no COMPAT_RESULT line\n--- stdout ---\n{proc.stdout[-4000:]}")


def get_flow_run(api, flow_run_id) -> dict:
    run = api.ok("GET", f"/flow_runs/{flow_run_id}", expect=200)
    assert run["id"] == flow_run_id
    return run


def get_task_run(api, task_run_id) -> dict:
    run = api.ok("GET", f"/task_runs/{task_run_id}", expect=200)
    assert run["id"] == task_run_id
    return run


def task_runs_of(api, flow_run_id) -> list:
    runs = api.ok(
        "POST", "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}, expect=200
    )
    assert isinstance(runs, list), runs
    for tr in runs:
        assert tr["flow_run_id"] == flow_run_id, (
            f"task_runs/filter by flow_run_id returned a task run of another flow run: {tr}"
        )
    return runs


def by_name(task_runs) -> dict:
    names = [tr["name"] for tr in task_runs]
    assert len(names) == len(set(names)), f"duplicate task run names: {sorted(names)}"
    return {tr["name"]: tr for tr in task_runs}


def flow_run_ids_of(api, flow_name) -> set:
    runs = api.ok(
        "POST",
        "/flow_runs/filter",
        {"flows": {"name": {"any_": [flow_name]}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 200},
        expect=200,
    )
    assert isinstance(runs, list), runs
    return {r["id"] for r in runs}


def flow_run_states(api, flow_run_id) -> list:
    states = api.ok("GET", f"/flow_run_states/?flow_run_id={flow_run_id}", expect=200)
    assert isinstance(states, list), states
    return sorted(states, key=lambda s: s["timestamp"])


def task_run_states(api, task_run_id) -> list:
    states = api.ok("GET", f"/task_run_states/?task_run_id={task_run_id}", expect=200)
    assert isinstance(states, list), states
    return sorted(states, key=lambda s: s["timestamp"])


def logs_of(api, flow_run_id, expect_messages=(), timeout=10.0) -> list:
    """Logs of a flow run; waits (briefly) until every expected message is among them."""
    deadline = time.monotonic() + timeout
    while True:
        logs = api.ok(
            "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}, expect=200
        )
        assert isinstance(logs, list), logs
        messages = [log["message"] for log in logs]
        missing = [m for m in expect_messages if m not in messages]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for log in logs:
        assert log["flow_run_id"] == flow_run_id, f"logs/filter returned a foreign log: {log}"
    assert not missing, f"log messages {missing} not recorded; got {messages}"
    return logs


def the_log(logs, message) -> dict:
    found = [log for log in logs if log["message"] == message]
    assert len(found) == 1, f"expected one log {message!r}, found {len(found)}"
    return found[0]


def state_seq(states) -> list:
    return [(s["type"], s["name"]) for s in states]


def parse_time(value) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def assert_completed(run, what="run"):
    assert (run["state_type"], run["state_name"]) == ("COMPLETED", "Completed"), (
        f"{what} {run.get('name')} is {run['state_type']}/{run['state_name']}: "
        f"{(run.get('state') or {}).get('message')}"
    )
    assert run["state"]["type"] == "COMPLETED"
    assert run["state"]["id"] == run["state_id"]
    assert run["name"], run
    # A run that ran has its times recorded.
    assert run["start_time"] and run["end_time"], (run["start_time"], run["end_time"])
    assert parse_time(run["end_time"]) >= parse_time(run["start_time"])
    assert run["total_run_time"] >= 0


# --------------------------------------------------------------------------- reference scenarios


def _reference_scripts():
    if not REFERENCE_SCENARIOS_DIR.is_dir():
        return [
            pytest.param(
                None,
                id="reference-scenarios-missing",
                marks=pytest.mark.skip(reason=f"reference scenarios folder {REFERENCE_SCENARIOS_DIR} is missing"),
            )
        ]
    return [pytest.param(p, id=p.name) for p in sorted(REFERENCE_SCENARIOS_DIR.glob("*.py"))]


# Flow names each reference scenario creates runs of (new runs are found by before/after diff).
REFERENCE_FLOWS = {
    "a_tasks.py": ["etl"],
    "b_retries.py": ["retrying"],
    "c_cache.py": ["caching"],
    "d_subflow.py": ["parent", "child"],
    "e_map.py": ["mapper"],
    "f_fail.py": ["daily-etl-job"],
    "g_artifacts.py": ["reporter"],
    "h_blocks_vars.py": ["configured"],
}


def _check_a_tasks(api, new):
    (run_id,) = new["etl"]
    run = get_flow_run(api, run_id)
    assert_completed(run, "flow run")
    assert run["parameters"] == {"n": 3}
    trs = by_name(task_runs_of(api, run_id))
    assert set(trs) == {"extract-0", "transform-0", "load-0"}
    for tr in trs.values():
        assert_completed(tr, "task run")
    logs = logs_of(api, run_id, ["transforming 3 items", "loaded [10, 20, 30]", "total 60"])
    log = the_log(logs, "transforming 3 items")
    assert (log["level"], log["task_run_id"]) == (INFO, trs["transform-0"]["id"])
    log = the_log(logs, "loaded [10, 20, 30]")
    assert (log["level"], log["task_run_id"]) == (WARNING, trs["load-0"]["id"])
    log = the_log(logs, "total 60")  # print() with log_prints=True
    assert (log["level"], log["task_run_id"]) == (INFO, None)


def _check_b_retries(api, new):
    (run_id,) = new["retrying"]
    assert_completed(get_flow_run(api, run_id), "flow run")
    (tr,) = task_runs_of(api, run_id)
    assert tr["name"] == "flaky-0"
    assert_completed(tr, "task run")
    assert tr["run_count"] == 3


def _check_c_cache(api, new):
    (run_id,) = new["caching"]
    assert_completed(get_flow_run(api, run_id), "flow run")
    trs = task_runs_of(api, run_id)
    assert sorted(tr["name"] for tr in trs) == ["expensive-0", "expensive-1"]
    assert all(tr["state_type"] == "COMPLETED" for tr in trs), trs
    # The second call is a cache hit (the first one too when re-run within 5 minutes).
    assert "Cached" in [tr["state_name"] for tr in trs]


def _check_d_subflow(api, new):
    (parent_id,) = new["parent"]
    assert_completed(get_flow_run(api, parent_id), "parent flow run")
    parent_task_ids = {tr["id"] for tr in task_runs_of(api, parent_id)}
    assert len(new["child"]) == 2
    for child_id in new["child"]:
        child = get_flow_run(api, child_id)
        assert_completed(child, "child flow run")
        assert child["parent_task_run_id"] in parent_task_ids
        assert [tr["name"] for tr in task_runs_of(api, child_id)] == ["inc-0"]


def _check_e_map(api, new):
    (run_id,) = new["mapper"]
    assert_completed(get_flow_run(api, run_id), "flow run")
    trs = by_name(task_runs_of(api, run_id))
    assert set(trs) == {f"square-{i}" for i in range(10)}
    assert all(tr["state_type"] == "COMPLETED" for tr in trs.values())


def _check_f_fail(api, new):
    (run_id,) = new["daily-etl-job"]
    run = get_flow_run(api, run_id)
    assert (run["state_type"], run["state_name"]) == ("FAILED", "Failed")
    assert "disk full" in run["state"]["message"]
    assert "daily-etl" in run["tags"]
    (tr,) = task_runs_of(api, run_id)
    assert (tr["name"], tr["state_type"]) == ("bad-0", "FAILED")
    assert "disk full" in tr["state"]["message"]


def _check_g_artifacts(api, new):
    (run_id,) = new["reporter"]
    assert_completed(get_flow_run(api, run_id), "flow run")
    arts = api.ok("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}}, expect=200)
    arts = {a["key"]: a for a in arts}
    assert set(arts) == {"report", "table"}
    assert arts["report"]["type"] == "markdown"
    assert arts["report"]["data"] == "# Hello\n\n*world*"
    assert arts["table"]["type"] == "table"
    table = arts["table"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert table == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    latest = api.ok("GET", "/artifacts/report/latest", expect=200)
    assert latest["flow_run_id"] == run_id


def _check_h_blocks_vars(api, new):
    (run_id,) = new["configured"]
    assert_completed(get_flow_run(api, run_id), "flow run")
    doc = api.ok("GET", "/block_types/slug/json/block_documents/name/settings?include_secrets=true", expect=200)
    assert doc["name"] == "settings"
    assert doc["data"] == {"value": {"a": 1}}
    secret = api.ok("GET", "/block_types/slug/secret/block_documents/name/db-password?include_secrets=true", expect=200)
    assert secret["data"] == {"value": "s3cr3t"}
    hidden = api.ok(
        "GET", "/block_types/slug/secret/block_documents/name/db-password?include_secrets=false", expect=200
    )
    assert hidden["data"]["value"] != "s3cr3t", "a secret was returned without include_secrets"
    status, body = api("GET", "/variables/name/region")
    assert status == 404, (status, body)


REFERENCE_CHECKS = {
    "a_tasks.py": _check_a_tasks,
    "b_retries.py": _check_b_retries,
    "c_cache.py": _check_c_cache,
    "d_subflow.py": _check_d_subflow,
    "e_map.py": _check_e_map,
    "f_fail.py": _check_f_fail,
    "g_artifacts.py": _check_g_artifacts,
    "h_blocks_vars.py": _check_h_blocks_vars,
}


@pytest.mark.parametrize("script", _reference_scripts())
def test_reference_scenario(script: Path, run_flow_script, start_script, compat_server, api):
    """Each of Prefect's reference SDK scripts exits 0 against the server, and is recorded."""
    if script.name == "j_serve.py":
        _run_serve_scenario(script, start_script, compat_server, api)
        return
    flows = REFERENCE_FLOWS.get(script.name, [])
    before = {name: flow_run_ids_of(api, name) for name in flows}
    run_flow_script(script, compat_server)
    new = {name: sorted(flow_run_ids_of(api, name) - before[name]) for name in flows}
    check = REFERENCE_CHECKS.get(script.name)
    if check:
        check(api, new)


def _run_serve_scenario(script, start_script, compat_server, api):
    serve = start_script(script, compat_server, timeout=180)

    def deployment():
        if serve.proc.poll() is not None:
            out, err = serve.output()
            pytest.fail(f"serve() exited with {serve.proc.returncode}\n{out[-3000:]}\n{err[-6000:]}")
        status, body = api("GET", "/deployments/name/served/served-deployment")
        return body if status == 200 else None

    dep = wait_until(deployment, 60, what="deployment served/served-deployment")
    assert dep["name"] == "served-deployment"
    assert dep["entrypoint"] == "j_serve.py:served"
    flow = api.ok("GET", f"/flows/{dep['flow_id']}", expect=200)
    assert flow["name"] == "served"

    run = api.ok("POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": {"x": 5}}, expect=201)
    assert run["deployment_id"] == dep["id"]
    assert run["parameters"] == {"x": 5}
    assert run["state_type"] == "SCHEDULED"

    def finished():
        if serve.proc.poll() is not None:
            out, err = serve.output()
            pytest.fail(f"serve() exited with {serve.proc.returncode}\n{out[-3000:]}\n{err[-6000:]}")
        fr = get_flow_run(api, run["id"])
        return fr if fr["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    fr = wait_until(finished, 90, interval=1, what=f"served flow run {run['id']} to finish")
    assert_completed(fr, "served flow run")
    assert fr["parameters"] == {"x": 5}
    assert fr["run_count"] == 1
    log = the_log(logs_of(api, run["id"], ["served run x=5"]), "served run x=5")
    assert log["level"] == INFO and log["task_run_id"] is None
    serve.terminate()


# --------------------------------------------------------------------------- our scenarios


def scenario(name) -> Path:
    return SCENARIOS_DIR / name


def test_three_tasks_with_logs(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("s01_three_tasks.py"), compat_server)
    run_id = script_result(proc)["flow_run_id"]
    run = get_flow_run(api, run_id)
    assert_completed(run, "flow run")
    assert run["parameters"] == {"n": 4}
    assert run["run_count"] == 1
    flow = api.ok("GET", f"/flows/{run['flow_id']}", expect=200)
    assert flow["name"] == "compat-three-tasks"
    assert [s["type"] for s in flow_run_states(api, run_id)] == ["PENDING", "RUNNING", "COMPLETED"]

    trs = by_name(task_runs_of(api, run_id))
    assert set(trs) == {"fetch-0", "double-0", "total-0"}
    for tr in trs.values():
        assert_completed(tr, "task run")
        assert tr["run_count"] == 1
        assert tr["dynamic_key"] == "0"
        assert [s["type"] for s in task_run_states(api, tr["id"])] == ["PENDING", "RUNNING", "COMPLETED"]
    # Data dependencies are recorded as task_inputs.
    assert trs["double-0"]["task_inputs"]["xs"] == [{"input_type": "task_run", "id": trs["fetch-0"]["id"]}]
    assert trs["total-0"]["task_inputs"]["xs"] == [{"input_type": "task_run", "id": trs["double-0"]["id"]}]
    assert trs["fetch-0"]["task_inputs"] == {"n": []}
    # GET /task_runs/{id} agrees with the filter.
    assert get_task_run(api, trs["total-0"]["id"])["name"] == "total-0"

    expected = {
        "pipeline starting with n=4": (INFO, None),
        "fetched 4 numbers": (INFO, trs["fetch-0"]["id"]),
        "doubling [1, 2, 3, 4]": (WARNING, trs["double-0"]["id"]),
        "total is 20": (ERROR, trs["total-0"]["id"]),
        "pipeline result 20": (INFO, None),
    }
    logs = logs_of(api, run_id, list(expected))
    for message, (level, task_run_id) in expected.items():
        log = the_log(logs, message)
        assert (log["level"], log["task_run_id"]) == (level, task_run_id), log
        assert log["name"] == ("prefect.task_runs" if task_run_id else "prefect.flow_runs")
    # Logs come back in timestamp order.
    messages = [log["message"] for log in logs]
    order = [messages.index(m) for m in expected]
    assert order == sorted(order), messages
    # Filtering logs by task run and by level.
    only_task = api.ok("POST", "/logs/filter", {"logs": {"task_run_id": {"any_": [trs["double-0"]["id"]]}}}, expect=200)
    assert "doubling [1, 2, 3, 4]" in [log["message"] for log in only_task]
    assert {log["task_run_id"] for log in only_task} == {trs["double-0"]["id"]}
    errors = api.ok(
        "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}, "level": {"ge_": ERROR}}}, expect=200
    )
    assert [log["message"] for log in errors] == ["total is 20"]


def test_task_retries(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("s02_task_retries.py"), compat_server)
    run_id = script_result(proc)["flow_run_id"]
    assert_completed(get_flow_run(api, run_id), "flow run")
    (tr,) = task_runs_of(api, run_id)
    assert tr["name"] == "flaky_fetch-0"
    assert_completed(tr, "task run")
    assert tr["run_count"] == 3
    assert tr["empirical_policy"]["retries"] == 2
    assert tr["empirical_policy"]["retry_delay"] == 1
    states = task_run_states(api, tr["id"])
    assert state_seq(states) == [
        ("PENDING", "Pending"),
        ("RUNNING", "Running"),
        ("SCHEDULED", "AwaitingRetry"),
        ("RUNNING", "Retrying"),
        ("SCHEDULED", "AwaitingRetry"),
        ("RUNNING", "Retrying"),
        ("COMPLETED", "Completed"),
    ]
    assert "transient failure 1" in states[2]["message"]
    assert "transient failure 2" in states[4]["message"]
    for awaiting in (states[2], states[4]):  # retry_delay_seconds=1
        delay = (
            parse_time(awaiting["state_details"]["scheduled_time"]) - parse_time(awaiting["timestamp"])
        ).total_seconds()
        assert 0.5 <= delay <= 1.5, (delay, awaiting)
    logs = logs_of(api, run_id)
    errors = [log for log in logs if log["level"] == ERROR and log["task_run_id"] == tr["id"]]
    assert len(errors) == 2 and "transient failure 1" in errors[0]["message"], errors


def test_cache_key_fn_within_and_across_flow_runs(run_flow_script, compat_server, api):
    token = uuid.uuid4().hex[:12]
    proc = run_flow_script(scenario("s03_cache.py"), compat_server, args=[token])
    result = script_result(proc)
    first, second = result["flow_run_ids"]
    key = result["cache_key"]
    assert first != second
    for run_id in (first, second):
        run = get_flow_run(api, run_id)
        assert_completed(run, "flow run")
        assert run["parameters"] == {"token": token}
    trs1 = by_name(task_runs_of(api, first))
    trs2 = by_name(task_runs_of(api, second))
    assert set(trs1) == set(trs2) == {"expensive-0", "expensive-1"}
    # First flow run: computed once, then a cache hit.
    assert (trs1["expensive-0"]["state_type"], trs1["expensive-0"]["state_name"]) == ("COMPLETED", "Completed")
    assert (trs1["expensive-1"]["state_type"], trs1["expensive-1"]["state_name"]) == ("COMPLETED", "Cached")
    # Second flow run: both calls hit the cache written by the first run.
    for name in ("expensive-0", "expensive-1"):
        assert (trs2[name]["state_type"], trs2[name]["state_name"]) == ("COMPLETED", "Cached")
        assert trs2[name]["run_count"] == 0  # never ran
    for tr in [*trs1.values(), *trs2.values()]:
        assert tr["state"]["state_details"]["cache_key"] == key
        assert tr["state"]["state_details"]["cache_expiration"]
    # A cached state carries the original result reference.
    original = trs1["expensive-0"]["state"]["data"]
    assert original and original.get("type") == "reference", original
    for tr in (trs1["expensive-1"], trs2["expensive-0"], trs2["expensive-1"]):
        assert tr["state"]["data"] == original
    # History of a cache hit: proposed RUNNING was answered with the Cached state.
    assert state_seq(task_run_states(api, trs2["expensive-0"]["id"])) == [
        ("PENDING", "Pending"),
        ("COMPLETED", "Cached"),
    ]


def test_subflow_parent_links(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("s04_subflow.py"), compat_server)
    result = script_result(proc)
    parent_id, children = result["flow_run_id"], result["child_flow_run_ids"]
    parent = get_flow_run(api, parent_id)
    assert_completed(parent, "parent flow run")
    assert parent["parent_task_run_id"] is None
    parent_trs = {tr["id"]: tr for tr in task_runs_of(api, parent_id)}
    assert len(parent_trs) == 2, parent_trs  # one task run stands for each child flow run
    seen = set()
    for child_id, x in zip(children, (1, 10)):
        child = get_flow_run(api, child_id)
        assert_completed(child, "child flow run")
        assert child["parameters"] == {"x": x}
        link = child["parent_task_run_id"]
        assert link in parent_trs, f"child's parent_task_run_id {link} is no task run of the parent"
        seen.add(link)
        stand_in = get_task_run(api, link)
        assert stand_in["flow_run_id"] == parent_id
        assert stand_in["state"]["state_details"]["child_flow_run_id"] == child_id
        assert_completed(stand_in, "subflow task run")
        # The server mirrors the child flow run's states onto the task run standing for it.
        mirrored = [(st["type"], st["state_details"]["child_flow_run_id"]) for st in task_run_states(api, link)]
        assert ("RUNNING", child_id) in mirrored and mirrored[-1] == ("COMPLETED", child_id), mirrored
        (inner,) = task_runs_of(api, child_id)
        assert inner["name"] == "add_one-0"
        assert_completed(inner, "child's task run")
        child_flow = api.ok("GET", f"/flows/{child['flow_id']}", expect=200)
        assert child_flow["name"] == "compat-child"
    assert len(seen) == 2
    # The same link through the filter API.
    found = api.ok(
        "POST", "/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"any_": sorted(parent_trs)}}}, expect=200
    )
    assert sorted(r["id"] for r in found) == sorted(children)


def test_a_subflows_state_passed_into_a_task(run_flow_script, compat_server, api):
    """The subflow's states name the task run standing for it in the parent (state_details.task_run_id):
    the SDK records the task's input through it (it crashed asking for GET /task_runs/None)."""
    result = script_result(run_flow_script(scenario("s15_subflow_result_into_task.py"), compat_server))
    assert result["value"] == 41
    child = get_flow_run(api, result["child_flow_run_id"])
    assert result["child_task_run_id"] == child["parent_task_run_id"] != "None"
    assert {s["state_details"]["task_run_id"] for s in flow_run_states(api, child["id"])} == {
        child["parent_task_run_id"]
    }
    assert_completed(get_flow_run(api, result["flow_run_id"]), "parent flow run")


def test_task_map_ten_items(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("s05_map.py"), compat_server)
    run_id = script_result(proc)["flow_run_id"]
    assert_completed(get_flow_run(api, run_id), "flow run")
    trs = task_runs_of(api, run_id)
    assert len(trs) == 10
    assert sorted(tr["name"] for tr in trs) == sorted(f"scale-{i}" for i in range(10))
    assert sorted(tr["dynamic_key"] for tr in trs) == sorted(str(i) for i in range(10))
    assert len({tr["task_key"] for tr in trs}) == 1
    for tr in trs:
        assert_completed(tr, "mapped task run")
        assert tr["name"] == f"scale-{tr['dynamic_key']}"
    count = api.ok("POST", "/task_runs/count", {"task_runs": {"flow_run_id": {"any_": [run_id]}}}, expect=200)
    assert count == 10


def test_submit_default_task_runner(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("s06_submit.py"), compat_server)
    run_id = script_result(proc)["flow_run_id"]
    assert_completed(get_flow_run(api, run_id), "flow run")
    trs = by_name(task_runs_of(api, run_id))
    assert set(trs) == {"slow_inc-0", "slow_inc-1", "add-0"}
    for tr in trs.values():
        assert_completed(tr, "task run")
    inputs = trs["add-0"]["task_inputs"]
    upstream = {inputs["a"][0]["id"], inputs["b"][0]["id"]}
    assert upstream == {trs["slow_inc-0"]["id"], trs["slow_inc-1"]["id"]}
    assert inputs["a"][0]["input_type"] == "task_run"


def test_failing_flow(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("s07_fail.py"), compat_server)
    run_id = script_result(proc)["flow_run_id"]
    run = get_flow_run(api, run_id)
    assert (run["state_type"], run["state_name"]) == ("FAILED", "Failed")
    assert "compat failure: bad input 42" in run["state"]["message"]
    assert "ValueError" in run["state"]["message"]
    assert run["end_time"] is not None
    assert state_seq(flow_run_states(api, run_id)) == [
        ("PENDING", "Pending"),
        ("RUNNING", "Running"),
        ("FAILED", "Failed"),
    ]
    (tr,) = task_runs_of(api, run_id)
    assert tr["name"] == "validate-0"
    assert_completed(tr, "task run")
    failed = api.ok(
        "POST",
        "/flow_runs/filter",
        {"flow_runs": {"id": {"any_": [run_id]}, "state": {"type": {"any_": ["FAILED"]}}}},
        expect=200,
    )
    assert [r["id"] for r in failed] == [run_id]
    logs = logs_of(api, run_id)
    assert any(log["level"] == ERROR and "compat failure: bad input 42" in log["message"] for log in logs), [
        log["message"] for log in logs
    ]


def test_tags_and_parameters(run_flow_script, compat_server, api):
    token = uuid.uuid4().hex[:12]
    proc = run_flow_script(scenario("s08_tags_params.py"), compat_server, args=[token])
    run_id = script_result(proc)["flow_run_id"]
    run = get_flow_run(api, run_id)
    assert_completed(run, "flow run")
    assert sorted(run["tags"]) == sorted(["compat-ctx-tag", f"compat-run-{token}"])
    assert run["parameters"] == {"count": 7, "label": "hello", "options": {"a": [1, 2], "b": None}, "items": [1, 2]}
    (tr,) = task_runs_of(api, run_id)
    assert tr["name"] == "echo-0"
    assert sorted(tr["tags"]) == sorted(["compat-ctx-tag", f"compat-run-{token}", "compat-task-tag"])
    tagged = api.ok("POST", "/flow_runs/filter", {"flow_runs": {"tags": {"all_": [f"compat-run-{token}"]}}}, expect=200)
    assert [r["id"] for r in tagged] == [run_id]
    tagged_tasks = api.ok(
        "POST",
        "/task_runs/filter",
        {"task_runs": {"tags": {"all_": ["compat-task-tag", f"compat-run-{token}"]}}},
        expect=200,
    )
    assert [t["id"] for t in tagged_tasks] == [tr["id"]]


def test_pause_and_resume(start_script, compat_server, api, tmp_path):
    id_file = tmp_path / "flow_run_id.txt"
    script = start_script(scenario("s09_pause.py"), compat_server, args=[id_file])

    def flow_run_id():
        if id_file.exists() and id_file.read_text().strip():
            return id_file.read_text().strip()
        if script.proc.poll() is not None:
            script.wait(check=True)
            pytest.fail(f"the script exited ({script.proc.returncode}) before it paused")
        return None

    run_id = wait_until(flow_run_id, 60, interval=0.2, what="the flow to start")

    def paused():
        if script.proc.poll() is not None:
            script.wait(check=True)
            pytest.fail("the script exited while it should be paused")
        run = get_flow_run(api, run_id)
        return run if run["state_type"] == "PAUSED" else None

    run = wait_until(paused, 30, interval=0.3, what=f"flow run {run_id} to be PAUSED")
    assert run["state_name"] == "Paused"
    assert run["state"]["state_details"]["pause_timeout"], run["state"]
    time.sleep(2)  # by design: the script must not go on in this window
    assert script.proc.poll() is None, "the script did not wait while paused"
    assert get_flow_run(api, run_id)["state_type"] == "PAUSED"

    status, body = api("POST", f"/flow_runs/{run_id}/resume", {})
    assert status in (200, 201), (status, body)
    assert body["status"] == "ACCEPT", body
    assert body["state"]["type"] == "RUNNING", body

    proc = script.wait(check=True)
    assert script_result(proc)["flow_run_id"] == run_id
    run = get_flow_run(api, run_id)
    assert_completed(run, "flow run")
    assert state_seq(flow_run_states(api, run_id)) == [
        ("PENDING", "Pending"),
        ("RUNNING", "Running"),
        ("PAUSED", "Paused"),
        ("RUNNING", "Running"),
        ("COMPLETED", "Completed"),
    ]
    trs = by_name(task_runs_of(api, run_id))
    assert set(trs) == {"before-0", "after-0"}
    logs = logs_of(api, run_id, ["pausing now", "resumed, continuing"])
    messages = [log["message"] for log in logs]
    assert messages.index("pausing now") < messages.index("resumed, continuing")


def test_pause_waiting_for_input_and_send_receive_input(start_script, compat_server, api, tmp_path):
    """send_input/receive_input (POST /flow_runs/{id}/input, .../input/filter, GET .../input/{key}) and
    pause_flow_run(wait_for_input=...): the resume is checked against the schema the flow stored and
    its answer stored under the key the flow reads back."""
    id_file = tmp_path / "flow_run_id.txt"
    script = start_script(scenario("s14_wait_for_input.py"), compat_server, args=[id_file])

    run = wait_for_pause(script, id_file, api, 60)
    run_id = run["id"]
    keyset = run["state"]["state_details"]["run_input_keyset"]
    schema = wait_for_input_schema(api, run)
    assert "approved" in schema["properties"], schema

    # an answer that does not fit the schema is refused and the run stays paused
    status, body = api("POST", f"/flow_runs/{run_id}/resume", {"run_input": {"note": "no verdict"}})
    assert body["status"] == "REJECT", body
    assert body["details"]["reason"] == "Reason: 'approved' is a required property", body
    assert get_flow_run(api, run_id)["state_type"] == "PAUSED"

    status, body = api("POST", f"/flow_runs/{run_id}/resume", {"run_input": {"approved": True, "note": "ship it"}})
    assert status in (200, 201) and body["status"] == "ACCEPT", (status, body)
    proc = script.wait(check=True)
    result = script_result(proc)
    assert result["flow_run_id"] == run_id
    # without a sender, the SDK names the flow run it sends from
    assert result["result"] == {
        "received": [["first message", "compat-test"], ["second message", f"prefect.flow-run.{run_id}"]],
        "approved": True,
        "note": "ship it",
    }
    assert_completed(get_flow_run(api, run_id), "flow run")
    stored = api.ok("POST", f"/flow_runs/{run_id}/input/filter", {"prefix": "", "limit": 10}, expect=200)
    assert keyset["response"] in {i["key"] for i in stored}


def test_flow_retries(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("s10_flow_retries.py"), compat_server)
    run_id = script_result(proc)["flow_run_id"]
    run = get_flow_run(api, run_id)
    assert_completed(run, "flow run")
    assert run["run_count"] == 2
    assert run["empirical_policy"]["retries"] == 1
    states = flow_run_states(api, run_id)
    # Unlike a task retry, the flow's second run keeps the proposed name "Running".
    assert state_seq(states) == [
        ("PENDING", "Pending"),
        ("RUNNING", "Running"),
        ("SCHEDULED", "AwaitingRetry"),
        ("RUNNING", "Running"),
        ("COMPLETED", "Completed"),
    ]
    assert "first attempt fails" in states[2]["message"]
    logs = logs_of(api, run_id, ["flow attempt 1", "flow attempt 2"])
    messages = [log["message"] for log in logs]
    assert messages.index("flow attempt 1") < messages.index("flow attempt 2")


def test_a_flow_retry_gives_a_task_its_retries_again(run_flow_script, compat_server, api):
    """On the flow's second attempt the task that used up its retries is retried again (Prefect resets
    its run count on leaving Failed), so the fourth call succeeds and the flow completes."""
    result = script_result(run_flow_script(scenario("s16_flow_retry_resets_task_retries.py"), compat_server))
    assert (result["completed"], result["calls"]) == (True, 4), result
    run = get_flow_run(api, result["flow_run_id"])
    assert_completed(run, "flow run")
    (task_run,) = task_runs_of(api, run["id"])
    assert_completed(task_run, "task run")
    retries = [s["name"] for s in task_run_states(api, task_run["id"]) if s["name"] == "AwaitingRetry"]
    assert len(retries) == 3, retries  # once per attempt of the task's own, once for the flow's retry


def test_async_flow_gathering_twenty_tasks(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("s11_async_gather.py"), compat_server)
    run_id = script_result(proc)["flow_run_id"]
    run = get_flow_run(api, run_id)
    assert_completed(run, "flow run")
    assert run["parameters"] == {"pages": 20}
    trs = task_runs_of(api, run_id)
    assert sorted(tr["name"] for tr in trs) == sorted(f"fetch_page-{i}" for i in range(20))
    for tr in trs:
        assert_completed(tr, "task run")
    # They ran at the same time: some task started before another one ended.
    starts = sorted(parse_time(tr["start_time"]) for tr in trs)
    ends = sorted(parse_time(tr["end_time"]) for tr in trs)
    assert starts[-1] < ends[-1] and starts[1] < ends[0], "the 20 task runs did not overlap"


def test_variables(run_flow_script, compat_server, api):
    token = uuid.uuid4().hex[:12]
    created = api.ok(
        "POST", "/variables/", {"name": f"compat_var_{token}", "value": "from-the-api", "tags": ["compat"]}, expect=201
    )
    assert created["name"] == f"compat_var_{token}" and created["value"] == "from-the-api"
    proc = run_flow_script(scenario("s12_variables.py"), compat_server, args=[token])
    assert_completed(get_flow_run(api, script_result(proc)["flow_run_id"]), "flow run")
    var = api.ok("GET", f"/variables/name/compat_set_{token}", expect=200)
    assert var["value"] == "overwritten"
    status, body = api("GET", f"/variables/name/compat_missing_{token}")
    assert status == 404, (status, body)
    found = api.ok("POST", "/variables/filter", {"variables": {"name": {"like_": token}}}, expect=200)
    assert sorted(v["name"] for v in found) == sorted([f"compat_set_{token}", f"compat_var_{token}"])


CLIENT_READS = """
import asyncio, json, sys
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId,
    LogFilterLevel)
from prefect.client.schemas.sorting import FlowRunSort

async def main(run_id):
    async with get_client() as client:
        assert await client.api_healthcheck() is None
        assert (await client.hello()).status_code == 200
        run = await client.read_flow_run(run_id)
        flow = await client.read_flow(run.flow_id)
        named = await client.read_flow_by_name("compat-three-tasks")
        recent = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["compat-three-tasks"])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=5)
        tasks = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        warnings = await client.read_logs(LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[run.id]), level=LogFilterLevel(ge_=30)))
        states = await client.read_flow_run_states(run.id)
        task_states = await client.read_task_run_states(tasks[0].id)
    print("COMPAT_RESULT " + json.dumps({
        "flow_name": flow.name,
        "same_flow": named.id == flow.id,
        "newest_run_first": recent[0].id == run.id,
        "state": [run.state.type.value, run.state.name, run.state.is_completed()],
        "parameters": run.parameters,
        "run_count": run.run_count,
        "task_runs": sorted(t.name for t in tasks),
        "task_states": [s.type.value for s in sorted(task_states, key=lambda s: s.timestamp)],
        "log_messages": [l.message for l in logs],
        "warning_messages": [l.message for l in warnings],
        "states": [s.type.value for s in sorted(states, key=lambda s: s.timestamp)],
    }))

asyncio.run(main(sys.argv[1]))
"""


def test_sdk_client_reads_back(run_flow_script, compat_server):
    """The SDK's own client parses our read responses (pydantic models validate every field)."""
    proc = run_flow_script(scenario("s01_three_tasks.py"), compat_server)
    run_id = script_result(proc)["flow_run_id"]
    got = script_result(run_flow_script(CLIENT_READS, compat_server, args=[run_id]))
    assert got["flow_name"] == "compat-three-tasks"
    assert got["same_flow"] is True
    assert got["newest_run_first"] is True
    assert got["state"] == ["COMPLETED", "Completed", True]
    assert got["parameters"] == {"n": 4}
    assert got["run_count"] == 1
    assert got["task_runs"] == ["double-0", "fetch-0", "total-0"]
    assert got["task_states"] == ["PENDING", "RUNNING", "COMPLETED"]
    assert got["states"] == ["PENDING", "RUNNING", "COMPLETED"]
    assert "fetched 4 numbers" in got["log_messages"]
    assert got["warning_messages"] == ["doubling [1, 2, 3, 4]", "total is 20"]


CLI_READS = """
import contextlib, os, sys
os.environ["COLUMNS"] = "250"  # wide rich tables: names are not cut
from prefect.cli import app

run_id = sys.argv[1]
commands = [
    ["flow-run", "inspect", run_id],
    ["flow-run", "logs", run_id],
    ["flow-run", "ls", "--limit", "50"],
    ["flow", "ls", "--limit", "200"],  # the default 15 newest: the shared server holds more flows than that
    ["block", "ls"],
    ["block", "type", "ls"],
    ["variable", "ls"],
    ["artifact", "ls"],
    ["concurrency-limit", "ls"],
    ["work-queue", "ls"],
]
for command in commands:
    print("=== COMMAND " + " ".join(command), flush=True)
    try:
        with contextlib.redirect_stderr(sys.stdout):  # errors land in this command's section
            app(command, prog_name="prefect")
        code = 0
    except SystemExit as exc:
        code = exc.code
    print(f"=== EXIT {code}", flush=True)
"""


def _cli_sections(stdout: str) -> dict:
    sections, current, lines = {}, None, []
    for line in stdout.splitlines():
        if line.startswith("=== COMMAND "):
            current, lines = line[len("=== COMMAND ") :], []
        elif line.startswith("=== EXIT ") and current is not None:
            sections[current] = (line[len("=== EXIT ") :], "\n".join(lines))
            current = None
        elif current is not None:
            lines.append(line)
    return sections


def test_cli_read_commands(run_flow_script, compat_server, api):
    """`prefect flow-run inspect/logs/ls`, `flow ls`, `block ls`, ... work against the server."""
    proc = run_flow_script(scenario("s01_three_tasks.py"), compat_server)
    run_id = script_result(proc)["flow_run_id"]
    run = get_flow_run(api, run_id)
    proc = run_flow_script(CLI_READS, compat_server, args=[run_id])
    sections = _cli_sections(proc.stdout)
    failed = {cmd: out for cmd, (code, out) in sections.items() if code != "0"}
    assert len(sections) == 10, proc.stdout[-3000:]
    assert not failed, "CLI commands failed:\n" + "\n".join(
        f"--- prefect {cmd} ---\n{out[-2500:]}" for cmd, out in failed.items()
    )
    assert run_id in sections[f"flow-run inspect {run_id}"][1]
    assert "COMPLETED" in sections[f"flow-run inspect {run_id}"][1]
    logs_out = sections[f"flow-run logs {run_id}"][1]
    assert "fetched 4 numbers" in logs_out and "total is 20" in logs_out
    assert run["name"] in sections["flow-run ls --limit 50"][1]
    assert "compat-three-tasks" in sections["flow ls --limit 200"][1]


def test_tag_concurrency_limit_serialises_task_runs(run_flow_script, compat_server, api):
    tag = f"compat-limit-{uuid.uuid4().hex[:12]}"
    limit = api.ok("POST", "/concurrency_limits/", {"tag": tag, "concurrency_limit": 1}, expect=(200, 201))
    assert limit["tag"] == tag and limit["concurrency_limit"] == 1
    try:
        proc = run_flow_script(scenario("s13_tag_concurrency.py"), compat_server, args=[tag], timeout=150)
        run_id = script_result(proc)["flow_run_id"]
        assert_completed(get_flow_run(api, run_id), "flow run")
        trs = sorted(task_runs_of(api, run_id), key=lambda tr: tr["start_time"] or "")
        assert sorted(tr["name"] for tr in trs) == ["work-0", "work-1"]
        for tr in trs:
            assert_completed(tr, "task run")
            assert tag in tr["tags"]
        first, second = trs
        assert parse_time(first["end_time"]) <= parse_time(second["start_time"]), (
            "two task runs ran at once under a concurrency limit of 1: "
            f"{first['start_time']}..{first['end_time']} and "
            f"{second['start_time']}..{second['end_time']}"
        )
        after = api.ok("GET", f"/concurrency_limits/tag/{tag}", expect=200)
        assert after["active_slots"] == [], after
    finally:
        api("DELETE", f"/concurrency_limits/tag/{tag}")


# --------------------------------------------------------------------------- several server processes


def test_flows_run_against_a_server_of_two_processes(run_flow_script, tmp_path):
    """`prefectlite start --processes 2` behind the SDK: its connections land on both processes, and
    flows with tasks, retries, a subflow, submitted and cached tasks end as they do against one."""
    server = ServerProcess(tmp_path, {"PREFECT_HOME": str(tmp_path / "home")}, "--processes", "2")
    try:
        server.wait_ready()
        client = Client(server.api_url)
        for name, args in (
            ("s01_three_tasks.py", []),
            ("s02_task_retries.py", []),
            ("s03_cache.py", [uuid.uuid4().hex]),
            ("s04_subflow.py", []),
            ("s06_submit.py", []),
        ):
            result = script_result(run_flow_script(scenario(name), server.api_url, args=args))
            for run_id in result.get("flow_run_ids") or [result["flow_run_id"]]:
                run = client.ok("GET", f"/flow_runs/{run_id}")
                assert run["state_type"] == "COMPLETED", (name, run["state"])
                tasks = client.ok("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
                assert tasks and all(t["state_type"] == "COMPLETED" for t in tasks), (name, tasks)
        assert server.stop() == 0, server.stderr()
        assert "Traceback" not in server.stderr()
    finally:
        server.kill()
