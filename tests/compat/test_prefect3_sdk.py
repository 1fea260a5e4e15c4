"""Conformance: the real prefect 3.9 SDK against the server, checked through the REST API.

Prefect 3 clients create flow runs over REST but orchestrate task runs themselves and report each
task run state only as an event over the /api/events/in WebSocket; the server's task-run recorder
turns those events into task runs and state histories. Each test runs an unmodified 3.x SDK script
(scenarios3/) in a subprocess with the 3.9 venv's python, then reads back through the API what the
server recorded: task runs with their states, logs, artifacts, variables, blocks, limits, events.

The server under test is the one tests/compat/conftest.py starts (shared with the 2.20 suite, so
one server answers both SDKs); the venv is built by prefect3_venv.py. Environment as in conftest.py:
PREFECTLITE_REQUIRE_COMPAT=1 fails instead of skipping when the venv cannot be built.

Run: pytest tests/compat/test_prefect3_sdk.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

import prefectlite
from helpers import (
    UI_ONLY_ROUTES,
    Client,
    assert_core_blocks_loaded,
    migrated_sqlite_url,
    wait_for_input_schema,
    wait_for_pause,
    wait_until,
)

HERE = Path(__file__).resolve().parent
SCENARIOS_DIR = HERE / "scenarios3"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # tests/: fake_receivers
import prefect3_venv  # noqa: E402
from fake_receivers import HTTPReceiver  # noqa: E402

pytestmark = pytest.mark.compat

INFO, WARNING, ERROR = 20, 30, 40
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


# --------------------------------------------------------------------------- the 3.9 venv


@pytest.fixture(scope="session")
def prefect3_python() -> str:
    """Path of the python of the cached venv that has prefect 3.9 installed."""
    try:
        return prefect3_venv.ensure_prefect3_venv()
    except Exception as exc:  # noqa: BLE001 - any failure to build means: no SDK to test with
        msg = f"cannot build the prefect 3.9 venv: {exc}"
        if os.environ.get("PREFECTLITE_REQUIRE_COMPAT") == "1":
            pytest.fail(msg + "\n(PREFECTLITE_REQUIRE_COMPAT=1: failing instead of skipping)")
        pytest.skip(msg)


@pytest.fixture(scope="session")
def prefect_python(prefect3_python) -> str:
    """In this module conftest.py's start_script / run_flow_script run the 3.9 SDK."""
    return prefect3_python


@pytest.fixture(scope="session")
def compat_server(compat_server_handle) -> str:
    """The API URL the 3.x SDK is given. Under PREFECTLITE_COMPAT_TRACE that is the server itself, not
    the tracing proxy: the proxy forwards plain HTTP only, and 3.x clients need WebSockets."""
    proxy = compat_server_handle.proxy
    if proxy is None:
        return compat_server_handle.api_url
    return f"http://{proxy.up_host}:{proxy.up_port}/api"


def prefect3_cli(prefect3_python) -> str:
    return str(Path(prefect3_python).parent / "prefect")


# --------------------------------------------------------------------------- helpers


def script_result(proc) -> dict:
    """The JSON a scenario script prints after 'COMPAT_RESULT '."""
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("COMPAT_RESULT "):
            return json.loads(line[len("COMPAT_RESULT ") :])
    pytest.fail(
        f"the script printed no COMPAT_RESULT line\n--- stdout ---\n{proc.stdout[-4000:]}\n"
        f"--- stderr ---\n{proc.stderr[-6000:]}"
    )


def scenario(name) -> Path:
    return SCENARIOS_DIR / name


def assert_no_lost_events(proc):
    """The SDK warns when it cannot stream events (and so task runs) to the server."""
    for marker in ("may be lost", "Unable to connect to", "EventsWorker' failed", "incompatible versions"):
        assert marker not in proc.stderr and marker not in proc.stdout, (
            f"the SDK reported {marker!r}:\n{proc.stderr[-6000:]}"
        )


def get_flow_run(api, flow_run_id) -> dict:
    run = api.ok("GET", f"/flow_runs/{flow_run_id}", expect=200)
    assert run["id"] == flow_run_id
    return run


def task_runs_of(api, flow_run_id) -> list:
    runs = api.ok(
        "POST", "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}, expect=200
    )
    for tr in runs:
        assert tr["flow_run_id"] == flow_run_id, tr
    return runs


def settled_task_runs(api, flow_run_id, count, timeout=15.0) -> list:
    """The flow run's task runs once `count` of them are terminal (events are recorded as they arrive;
    a script that exits has flushed them, but allow the server a moment)."""

    def ready():
        runs = task_runs_of(api, flow_run_id)
        done = [tr for tr in runs if tr["state_type"] in TERMINAL]
        return runs if len(done) >= count else None

    return wait_until(ready, timeout, what=f"{count} terminal task runs of flow run {flow_run_id}")


def task_run_states(api, task_run_id) -> list:
    states = api.ok("GET", f"/task_run_states/?task_run_id={task_run_id}", expect=200)
    return sorted(states, key=lambda s: s["timestamp"])


def flow_run_states(api, flow_run_id) -> list:
    states = api.ok("GET", f"/flow_run_states/?flow_run_id={flow_run_id}", expect=200)
    return sorted(states, key=lambda s: s["timestamp"])


def state_seq(states) -> list:
    return [(s["type"], s["name"]) for s in states]


def task_name(tr) -> str:
    """Prefect 3 names task runs <task>-<3 hex digits>; the task's name is what is stable."""
    return tr["name"].rsplit("-", 1)[0]


def logs_of(api, flow_run_id, expect_messages=(), timeout=15.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        logs = api.ok(
            "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}, expect=200
        )
        messages = [log["message"] for log in logs]
        missing = [m for m in expect_messages if m not in messages]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, f"log messages {missing} not recorded; got {messages}"
    return logs


def the_log(logs, message) -> dict:
    found = [log for log in logs if log["message"] == message]
    assert len(found) == 1, f"expected one log {message!r}, found {len(found)}"
    return found[0]


def parse_time(value) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def assert_completed(run, what="run"):
    assert (run["state_type"], run["state_name"]) == ("COMPLETED", "Completed"), (
        f"{what} {run.get('name')} is {run['state_type']}/{run['state_name']}: "
        f"{(run.get('state') or {}).get('message')}"
    )
    assert run["state"]["type"] == "COMPLETED" and run["state"]["id"] == run["state_id"]
    assert run["start_time"] and run["end_time"], (run["start_time"], run["end_time"])
    assert parse_time(run["end_time"]) >= parse_time(run["start_time"])
    assert run["total_run_time"] >= 0


def assert_task_run_like_2x(api, tr):
    """A recorded task run has every field a 2.x task run has, its state history in order, and the
    current state equal to the newest one in the history."""
    for key in (
        "id",
        "created",
        "updated",
        "name",
        "flow_run_id",
        "task_key",
        "dynamic_key",
        "cache_key",
        "cache_expiration",
        "task_version",
        "empirical_policy",
        "tags",
        "task_inputs",
        "state_type",
        "state_name",
        "run_count",
        "flow_run_run_count",
        "expected_start_time",
        "next_scheduled_start_time",
        "start_time",
        "end_time",
        "total_run_time",
        "estimated_run_time",
        "estimated_start_time_delta",
        "state",
        "state_id",
    ):
        assert key in tr, (key, tr)
    states = task_run_states(api, tr["id"])
    assert states, tr
    assert len({s["id"] for s in states}) == len(states), "a state was recorded twice"
    assert states[-1]["id"] == tr["state_id"] and states[-1]["type"] == tr["state_type"]
    assert states[0]["type"] == "PENDING", state_seq(states)
    for state in states:
        assert state["state_details"]["task_run_id"] == tr["id"]
        assert state["state_details"]["flow_run_id"] == tr["flow_run_id"]
    return states


def events_of(api, resource_id, prefix="prefect.", count=1, timeout=15.0) -> list:
    """Events about a resource, oldest first, once there are `count` (Prefect's own server stores
    events in batches, a moment after they arrive)."""

    def found():
        page = api.ok(
            "POST",
            "/events/filter",
            {
                "filter": {"any_resource": {"id": [resource_id]}, "event": {"prefix": [prefix]}, "order": "ASC"},
                "limit": 50,
            },
            expect=200,
        )
        return page["events"] if len(page["events"]) >= count else None

    return wait_until(found, timeout, what=f"{count} events of {resource_id}")


# --------------------------------------------------------------------------- the version handshake


def test_version_check_answers_each_sdk_with_its_major(api, compat_server):
    if os.environ.get("PREFECTLITE_COMPAT_REFERENCE") == "1":
        pytest.skip("Prefect 3's own server answers every caller with its 3.x version")
    import urllib.request

    def version(headers):
        req = urllib.request.Request(compat_server + "/admin/version", headers=headers)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    assert version({"User-Agent": "prefect/3.9.1 (API 0.8.4)", "X-PREFECT-API-VERSION": "0.8.4"}).startswith("3.")
    assert version({"User-Agent": "python-httpx/0.28.1"}).startswith("3.")  # the 3.x WebSocket clients' check
    prefect2 = version({"User-Agent": "prefect/2.20.27 (API 0.8.4)", "X-PREFECT-API-VERSION": "0.8.4"})
    assert not prefect2.startswith("3.") and version({}) == prefect2


# --------------------------------------------------------------------------- scenarios


def test_tasks_with_logs_are_recorded_from_events(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("p01_tasks_logs.py"), compat_server)
    assert_no_lost_events(proc)
    run_id = script_result(proc)["flow_run_id"]
    run = get_flow_run(api, run_id)
    assert_completed(run, "flow run")
    assert run["parameters"] == {"n": 4}
    assert state_seq(flow_run_states(api, run_id)) == [
        ("PENDING", "Pending"),
        ("RUNNING", "Running"),
        ("COMPLETED", "Completed"),
    ]

    trs = settled_task_runs(api, run_id, 3)
    assert sorted(task_name(tr) for tr in trs) == ["double", "fetch", "total"]
    by_task = {task_name(tr): tr for tr in trs}
    for tr in trs:
        assert_completed(tr, "task run")
        assert tr["run_count"] == 1 and tr["flow_run_run_count"] == 1
        states = assert_task_run_like_2x(api, tr)
        assert state_seq(states) == [("PENDING", "Pending"), ("RUNNING", "Running"), ("COMPLETED", "Completed")]
    assert by_task["total"]["tags"] == ["summing"]
    # as Prefect 3.9's recorder keeps them: the labels the SDK sent ({}), none of the flow run's; for 3.x only
    as_3x = {"User-Agent": "prefect/3.9.1 (API 0.8.4)"}
    assert [api.ok("GET", f"/task_runs/{tr['id']}", headers=as_3x)["labels"] for tr in trs] == [{}] * 3
    assert all("labels" not in tr for tr in trs)
    # data passed between tasks is recorded as their inputs, as the 2.x client records it
    [upstream] = by_task["double"]["task_inputs"]["xs"]
    assert upstream == {"input_type": "task_run", "id": by_task["fetch"]["id"]}
    # the graph the UI draws is built from them
    graph = api.ok("GET", f"/flow_runs/{run_id}/graph", expect=200)
    assert {node["id"] for node in graph} == {tr["id"] for tr in trs}

    logs = logs_of(
        api,
        run_id,
        [
            "fetched 4 numbers",
            "doubling [1, 2, 3, 4]",
            "total is 20",
            "pipeline starting with n=4",
            "pipeline result 20",
        ],
    )
    log = the_log(logs, "doubling [1, 2, 3, 4]")
    assert (log["level"], log["task_run_id"]) == (WARNING, by_task["double"]["id"])
    log = the_log(logs, "total is 20")
    assert (log["level"], log["task_run_id"]) == (ERROR, by_task["total"]["id"])
    log = the_log(logs, "pipeline result 20")  # print() with log_prints=True
    assert (log["level"], log["task_run_id"]) == (INFO, None)

    # the events themselves are readable, as the 3.x UI reads them
    events = events_of(api, f"prefect.task-run.{by_task['fetch']['id']}", "prefect.task-run.", count=3)
    assert [e["event"] for e in events] == [
        "prefect.task-run.Pending",
        "prefect.task-run.Running",
        "prefect.task-run.Completed",
    ]
    related = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in events[0]["related"]}
    assert related["flow-run"] == f"prefect.flow-run.{run_id}"
    counts = api.ok(
        "POST",
        "/events/count-by/event",
        {"filter": {"related": {"id": [f"prefect.flow-run.{run_id}"]}, "event": {"prefix": ["prefect.task-run."]}}},
        expect=200,
    )
    assert {c["value"]: c["count"] for c in counts} == {
        "prefect.task-run.Pending": 3,
        "prefect.task-run.Running": 3,
        "prefect.task-run.Completed": 3,
    }


LOGS_SUBSCRIBER = """
import asyncio, json, sys, uuid
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.clients import get_logs_subscriber

async def main():
    flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(sys.argv[1])]))
    async with get_logs_subscriber(filter=flt) as subscriber:
        async for log in subscriber:
            print("COMPAT_RESULT " + json.dumps(log.model_dump(mode="json")), flush=True)
            return

asyncio.run(main())
"""


def test_the_sdks_log_subscriber_receives_a_log_with_the_log_stream_on(start_script, tmp_path):
    """prefect.logging.clients.get_logs_subscriber (what `prefect flow-run watch` reads logs with) against a
    server with PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED and ..._PUBLISHING_ENABLED on: it authenticates, sends
    its LogFilter (with the timestamp window it adds) and gets the run's log, not another run's."""
    settings = {"PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": True, "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": True}
    with prefectlite.serve(database=migrated_sqlite_url(tmp_path / "logs.db"), port=0, **settings) as api_url:
        run_id = str(uuid.uuid4())
        script = start_script(LOGS_SUBSCRIBER, api_url, args=[run_id], timeout=60)
        client = Client(api_url)
        deadline = time.monotonic() + 60
        while script.proc.poll() is None and time.monotonic() < deadline:  # until its filter was read
            now = prefectlite.now_iso()
            client.ok(
                "POST",
                "/logs/",
                [
                    {"name": "t", "level": INFO, "message": "another run's", "timestamp": now,
                     "flow_run_id": str(uuid.uuid4())},
                    {"name": "t", "level": INFO, "message": "hello", "timestamp": now, "flow_run_id": run_id},
                ],
            )  # fmt: skip
            time.sleep(0.3)
        log = script_result(script.wait(check=True))
    assert log["message"] == "hello" and log["flow_run_id"] == run_id and log["level"] == INFO, log


def test_sdk_reads_events_back_page_by_page(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("p01_tasks_logs.py"), compat_server)
    run_id = script_result(proc)["flow_run_id"]
    settled_task_runs(api, run_id, 3)
    events_of(api, f"prefect.flow-run.{run_id}", "prefect.task-run.", count=9)
    result = script_result(run_flow_script(scenario("p10_read_events.py"), compat_server, args=[run_id]))
    assert result["total"] == 9 and result["pages"] == 5
    assert len(result["names"]) == 9
    if os.environ.get("PREFECTLITE_COMPAT_REFERENCE") != "1":  # Prefect's server refuses limit=100 (422)
        assert result["default_limit_count"] == 9, result["default_limit_count"]
    assert result["names"][:3] == ["prefect.task-run.Pending", "prefect.task-run.Running", "prefect.task-run.Completed"]


def test_task_retries(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("p02_retries.py"), compat_server)
    assert_no_lost_events(proc)
    run_id = script_result(proc)["flow_run_id"]
    assert_completed(get_flow_run(api, run_id), "flow run")
    [tr] = settled_task_runs(api, run_id, 1)
    assert task_name(tr) == "flaky"
    assert_completed(tr, "task run")
    assert tr["run_count"] == 3
    assert tr["empirical_policy"]["retries"] == 2
    states = assert_task_run_like_2x(api, tr)
    assert state_seq(states) == [
        ("PENDING", "Pending"),
        ("RUNNING", "Running"),
        ("RUNNING", "Retrying"),
        ("RUNNING", "Retrying"),
        ("COMPLETED", "Completed"),
    ]


def test_cache_hits_within_and_across_flow_runs(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("p03_cache.py"), compat_server, args=[uuid.uuid4().hex])
    assert_no_lost_events(proc)
    first_id, second_id = script_result(proc)["flow_run_ids"]
    first = settled_task_runs(api, first_id, 2)
    second = settled_task_runs(api, second_id, 2)
    names = sorted(tr["state_name"] for tr in first)
    assert names == ["Cached", "Completed"], names
    assert [tr["state_name"] for tr in second] == ["Cached", "Cached"]
    for tr in first + second:
        assert tr["state_type"] == "COMPLETED"
        assert_task_run_like_2x(api, tr)
    # 3.x caches on the client: all four states point at the one persisted result (the cache entry)
    storage_keys = {(tr["state"]["data"] or {}).get("storage_key") for tr in first + second}
    assert len(storage_keys) == 1 and None not in storage_keys, storage_keys


def test_subflows_link_to_their_parent_task_runs(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("p04_subflow.py"), compat_server)
    assert_no_lost_events(proc)
    parent_id = script_result(proc)["flow_run_id"]
    assert_completed(get_flow_run(api, parent_id), "parent flow run")
    children = api.ok(
        "POST", "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}}, expect=200
    )
    assert len(children) == 2
    parent_task_ids = {tr["id"] for tr in task_runs_of(api, parent_id)}
    for child in children:
        assert_completed(child, "child flow run")
        assert child["parent_task_run_id"] in parent_task_ids
        [tr] = settled_task_runs(api, child["id"], 1)
        assert task_name(tr) == "inc"
        assert_completed(tr, "task run")
        assert_task_run_like_2x(api, tr)


def test_a_subflows_state_passed_into_a_task(run_flow_script, compat_server, api):
    """The 2.20 test's script (tests/compat/scenarios/s15_subflow_result_into_task.py) under the 3.9 SDK:
    the subflow's states name the task run standing for it in the parent."""
    proc = run_flow_script(SCENARIOS_DIR.parent / "scenarios" / "s15_subflow_result_into_task.py", compat_server)
    result = script_result(proc)
    assert result["value"] == 41
    child = get_flow_run(api, result["child_flow_run_id"])
    assert result["child_task_run_id"] == child["parent_task_run_id"] != "None"
    assert {s["state_details"]["task_run_id"] for s in flow_run_states(api, child["id"])} == {
        child["parent_task_run_id"]
    }


def test_flow_retries(run_flow_script, compat_server, api):
    """@flow(retries=1): the 3.9 SDK's Failed state says retriable=false, yet the flow is retried."""
    result = script_result(run_flow_script(scenario("p11_flow_retries.py"), compat_server))
    assert (result["completed"], result["attempts"]) == (True, 2), result
    run = get_flow_run(api, result["flow_run_id"])
    assert_completed(run, "flow run")
    assert run["run_count"] == 2
    assert [s["name"] for s in flow_run_states(api, run["id"])][-3:] == ["AwaitingRetry", "Running", "Completed"]


def test_a_sync_flow_whose_pause_timed_out_ends_failed(run_flow_script, compat_server, api):
    """The server's pause-expiration service fails the run while the SDK sleeps; the flow's own Failed
    proposal is then accepted (it was aborted, and the SDK raised Abort)."""
    result = script_result(run_flow_script(scenario("p12_pause_suspend.py"), compat_server, args=["sync-timeout"]))
    assert result["type"] == "FAILED", result
    assert get_flow_run(api, result["flow_run_id"])["state_type"] == "FAILED"


def test_suspending_a_run_without_a_deployment_is_refused(run_flow_script, compat_server):
    result = script_result(
        run_flow_script(scenario("p12_pause_suspend.py"), compat_server, args=["suspend-without-deployment"])
    )
    assert "Cannot suspend flows without a deployment." in result["result"], result


def test_a_resumed_flow_passes_a_pause_whose_key_already_fired(run_flow_script, compat_server, api):
    result = script_result(
        run_flow_script(scenario("p12_pause_suspend.py"), compat_server, args=["resume-repeated-key"])
    )
    assert (result["type"], result["tasks_run"]) == ("COMPLETED", 5), result
    assert_completed(get_flow_run(api, result["flow_run_id"]), "flow run")


def test_task_workers_run_delayed_tasks_each_once(run_flow_script, start_script, compat_server, api, tmp_path):
    """Runs delayed before any worker listens, and after: two task workers share them, each run once."""
    storage = str(tmp_path / "results")
    before = script_result(
        run_flow_script(scenario("p18_task_worker.py"), compat_server, args=["submit", storage, "4"])
    )
    workers = [
        start_script(scenario("p18_task_worker.py"), compat_server, args=["worker", storage], timeout=180)
        for _ in range(2)
    ]
    after = script_result(run_flow_script(scenario("p18_task_worker.py"), compat_server, args=["submit", storage, "3"]))
    ids = before["task_run_ids"] + after["task_run_ids"]

    def all_done():
        runs = api.ok("POST", "/task_runs/filter", {"task_runs": {"id": {"any_": ids}}}, expect=200)
        return runs if len(runs) == len(ids) and all(r["state_type"] in TERMINAL for r in runs) else None

    def both_listed():  # POST /task_workers/filter (3.x): the two workers, by the SDK's client ids, with the key
        body = {"task_worker_filter": {"task_keys": [before["task_key"]]}}
        listed = api.ok("POST", "/task_workers/filter", body, expect=200)
        return listed if len(listed) == 2 else None

    try:
        runs = wait_until(all_done, 90, what=f"{len(ids)} delayed task runs run by the task workers")
        listed = wait_until(both_listed, 30, what="the two task workers listed")
        assert len({w["identifier"] for w in listed}) == 2, listed
        assert all(before["task_key"] in w["task_keys"] for w in listed), listed
    finally:
        for worker in workers:
            worker.terminate()
    for run in runs:
        assert_completed(run, "task run")
        assert run["flow_run_id"] is None and run["task_key"] == before["task_key"]
        states = state_seq(task_run_states(api, run["id"]))
        assert states[0] == ("SCHEDULED", "Scheduled"), states
        assert [s for s in states if s[0] == "RUNNING"] == [("RUNNING", "Running")], states  # delivered once


def test_prefect_work_pool_and_work_queue_slots(prefect3_python, compat_server, api, tmp_path):
    """`prefect work-pool slots` and `prefect work-queue slots` (3.x) read which runs hold the slots
    ("Work pool not found!" here before: the routes were 404s)."""
    pool = f"p3-slots-{uuid.uuid4().hex[:8]}"
    api.ok("POST", "/work_pools/", {"name": pool, "type": "process", "concurrency_limit": 2})
    flow = api.ok("POST", "/flows/", {"name": "p3-slots"})
    dep = api.ok("POST", "/deployments/", {"name": pool, "flow_id": flow["id"], "work_pool_name": pool})
    run = api.ok("POST", f"/deployments/{dep['id']}/create_flow_run", {})
    api.ok("POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": "RUNNING"}, "force": True})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_API_URL": compat_server, "PREFECT_HOME": str(tmp_path / "cli-home")})

    def cli(*args):
        proc = subprocess.run(
            [prefect3_cli(prefect3_python), *args, "-o", "json"], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return json.loads(proc.stdout)

    by_pool = cli("work-pool", "slots", pool)
    assert (by_pool["active_slots"], by_pool["concurrency_limit"]) == (1, 2), by_pool
    [queue] = by_pool["queues"]
    assert [r["id"] for r in queue["flow_runs"]] == [run["id"]] and queue["queue_name"] == "default"
    by_queue = cli("work-queue", "slots", "default", "--pool", pool)
    assert [r["id"] for r in by_queue["flow_runs"]] == [run["id"]], by_queue


def test_a_run_failing_parameter_validation_starts_when_it_ends(run_flow_script, compat_server, api):
    result = script_result(run_flow_script(scenario("p13_param_validation.py"), compat_server))
    assert result["type"] == "FAILED", result
    run = get_flow_run(api, result["flow_run_id"])
    assert run["start_time"] is not None and parse_time(run["start_time"]) == parse_time(run["end_time"]), run


def test_a_deployment_concurrency_limit_reads_back(run_flow_script, compat_server):
    """to_deployment(concurrency_limit=...).apply(), as serve() and deploy() do: the SDK reads back the
    deployment's global limit `deployment:{id}` (it read none here)."""
    name = f"p3-limited-{uuid.uuid4().hex[:8]}"
    result = script_result(run_flow_script(scenario("p14_deployment_concurrency.py"), compat_server, args=[name]))
    assert (result["limit"], result["strategy"]) == (3, "CANCEL_NEW"), result
    assert result["name"] == f"deployment:{result['deployment_id']}"


def test_a_served_deployments_concurrency_limit_runs_its_runs_one_at_a_time(start_script, compat_server, api):
    """Cause 14 of issue 23 (enforcement): serve(global_limit=1) and two runs at once: the second is held
    back (AwaitingConcurrencySlot) until the first has given its slot back, and then runs."""
    name = f"p3-one-{uuid.uuid4().hex[:8]}"
    serve = start_script(scenario("p15_deployment_concurrency_serve.py"), compat_server, args=[name], timeout=240)

    def served(path):
        def found():
            if serve.proc.poll() is not None:
                out, err = serve.output()
                pytest.fail(f"serve() exited with {serve.proc.returncode}\n{out[-3000:]}\n{err[-6000:]}")
            status, body = api("GET", path)
            return body if status == 200 else None

        return found

    dep = wait_until(served(f"/deployments/name/p3-one-at-a-time/{name}"), 60, what=f"deployment {name}")
    runs = [api.ok("POST", f"/deployments/{dep['id']}/create_flow_run", {}, expect=(200, 201)) for _ in range(2)]

    def both_finished():
        served("/health")()
        found = [get_flow_run(api, run["id"]) for run in runs]
        return found if all(run["state_type"] in TERMINAL for run in found) else None

    finished = wait_until(both_finished, 180, interval=1, what="both runs of the limited deployment to finish")
    for run in finished:
        assert_completed(run, "flow run")
    first, second = sorted(finished, key=lambda run: run["start_time"])
    assert parse_time(first["end_time"]) <= parse_time(second["start_time"]), (
        f"two runs ran at once under a limit of 1: {first['start_time']}..{first['end_time']} and "
        f"{second['start_time']}..{second['end_time']}"
    )
    held_back = [name for run in finished for _type, name in state_seq(flow_run_states(api, run["id"]))]
    assert "AwaitingConcurrencySlot" in held_back, held_back
    limit = api.ok("GET", f"/v2/concurrency_limits/deployment:{dep['id']}", expect=200)
    assert limit["active_slots"] == 0, limit
    serve.terminate()


def test_the_sdk_finds_its_block_schemas_by_its_own_checksum(run_flow_script, compat_server):
    """The 2.20 test's script (scenarios/b09_schema_checksum.py) under the 3.9 SDK."""
    found = script_result(run_flow_script(SCENARIOS_DIR.parent / "scenarios" / "b09_schema_checksum.py", compat_server))
    for name in ("CompatChecksumInner", "CompatChecksumStore"):
        assert found[name].get("server") == found[name]["sdk"], found[name]


def test_blocks_of_the_core_types_made_in_the_ui_load_in_the_sdk(run_flow_script, compat_server, make_core_blocks):
    """The 2.20 test's script (scenarios/b10_core_blocks.py) under the 3.9 SDK, for the core types 3.9 has."""
    names = make_core_blocks(["secret", "local-file-system", "remote-file-system", "smb", "webhook"])
    script = SCENARIOS_DIR.parent / "scenarios" / "b10_core_blocks.py"
    assert_core_blocks_loaded(script_result(run_flow_script(script, compat_server, args=[json.dumps(names)])), names)


def test_task_map(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("p05_map.py"), compat_server)
    assert_no_lost_events(proc)
    run_id = script_result(proc)["flow_run_id"]
    assert_completed(get_flow_run(api, run_id), "flow run")
    trs = settled_task_runs(api, run_id, 11)
    squares = [tr for tr in trs if task_name(tr) == "square"]
    [add_up] = [tr for tr in trs if task_name(tr) == "add_up"]
    assert len(squares) == 10
    assert len({tr["dynamic_key"] for tr in squares}) == 10
    for tr in trs:
        assert_completed(tr, "task run")
        assert_task_run_like_2x(api, tr)
    upstream = {ref["id"] for ref in add_up["task_inputs"]["values"]}
    assert upstream == {tr["id"] for tr in squares}


def test_failing_flow(run_flow_script, compat_server, api):
    proc = run_flow_script(scenario("p06_fail.py"), compat_server)
    assert_no_lost_events(proc)
    run_id = script_result(proc)["flow_run_id"]
    run = get_flow_run(api, run_id)
    assert (run["state_type"], run["state_name"]) == ("FAILED", "Failed")
    assert "disk full" in run["state"]["message"]
    assert "p3-nightly" in run["tags"]
    [tr] = settled_task_runs(api, run_id, 1)
    assert (task_name(tr), tr["state_type"], tr["state_name"]) == ("bad", "FAILED", "Failed")
    assert "disk full" in tr["state"]["message"]
    assert tr["end_time"]
    states = assert_task_run_like_2x(api, tr)
    assert state_seq(states) == [("PENDING", "Pending"), ("RUNNING", "Running"), ("FAILED", "Failed")]
    failed = api.ok(
        "POST",
        "/task_runs/filter",
        {"flow_runs": {"id": {"any_": [run_id]}}, "task_runs": {"state": {"type": {"any_": ["FAILED"]}}}},
        expect=200,
    )
    assert [t["id"] for t in failed] == [tr["id"]]


def test_artifacts_variables_and_secret_blocks(run_flow_script, compat_server, api):
    suffix = uuid.uuid4().hex[:8]
    proc = run_flow_script(scenario("p07_artifacts_vars_secrets.py"), compat_server, args=[suffix])
    assert_no_lost_events(proc)
    run_id = script_result(proc)["flow_run_id"]
    assert_completed(get_flow_run(api, run_id), "flow run")
    [tr] = settled_task_runs(api, run_id, 1)
    arts = api.ok("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}}, expect=200)
    arts = {a["key"]: a for a in arts}
    assert set(arts) == {"p3-report", "p3-table"}
    assert arts["p3-report"]["type"] == "markdown"
    assert arts["p3-report"]["data"] == "# Hello\n\n*world*"
    assert arts["p3-report"]["task_run_id"] == tr["id"]
    table = arts["p3-table"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert table == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    assert api.ok("GET", "/artifacts/p3-report/latest", expect=200)["flow_run_id"] == run_id
    variable = api.ok("GET", f"/variables/name/p3_region_{suffix}", expect=200)
    assert variable["value"] == "eu-west-1"
    secret = api.ok(
        "GET", f"/block_types/slug/secret/block_documents/name/p3-db-password-{suffix}?include_secrets=true", expect=200
    )
    assert secret["data"] == {"value": "s3cr3t"}
    hidden = api.ok(
        "GET",
        f"/block_types/slug/secret/block_documents/name/p3-db-password-{suffix}?include_secrets=false",
        expect=200,
    )
    assert hidden["data"]["value"] != "s3cr3t"


def test_global_concurrency_limit(run_flow_script, start_script, compat_server, api):
    name = f"p3-limit-{uuid.uuid4().hex[:8]}"
    created = api.ok("POST", "/v2/concurrency_limits/", {"name": name, "limit": 1}, expect=(200, 201))
    proc = run_flow_script(scenario("p08_global_limit.py"), compat_server, args=[name])
    assert_no_lost_events(proc)
    run_id = script_result(proc)["flow_run_id"]
    assert_completed(get_flow_run(api, run_id), "flow run")
    assert len(settled_task_runs(api, run_id, 3)) == 3
    limit = api.ok("GET", f"/v2/concurrency_limits/{name}", expect=200)
    assert limit["active_slots"] == 0, "every lease was given back"
    if "avg_slot_occupancy_seconds" in limit:  # ours (the 2.x shape) shows it; Prefect 3's server does not
        assert limit["avg_slot_occupancy_seconds"] != created["avg_slot_occupancy_seconds"], "no slot was taken"

    # A full limit holds the task back: with a timeout, it gives up.
    api.ok("PATCH", f"/v2/concurrency_limits/{name}", {"active_slots": 1}, expect=204)
    blocked = start_script(scenario("p08_global_limit.py"), compat_server, args=[name, "3"]).wait(check=False)
    assert blocked.returncode != 0
    assert "TimeoutError" in blocked.stderr or "timed out" in blocked.stderr.lower(), blocked.stderr[-4000:]
    after = api.ok("GET", f"/v2/concurrency_limits/{name}", expect=200)
    assert after["active_slots"] == 1  # nothing taken, nothing given back
    if "denied_slots" in after:  # ours shows the denials; Prefect 3's server does not
        assert after["denied_slots"] > 0


def test_a_tag_concurrency_limit_holds_back_the_second_task(run_flow_script, compat_server, api):
    """Cause 11 of issue 23: a limit made the v1 way (as `prefect concurrency-limit create TAG 1` makes it)
    limits 3.9 tasks, which take their tag's slot as a lease on `tag:TAG`: of two submitted tasks with the tag,
    the second starts once the first has ended (the 2.20 scenario s13, unchanged)."""
    tag = f"p3-limit-{uuid.uuid4().hex[:12]}"
    api.ok("POST", "/concurrency_limits/", {"tag": tag, "concurrency_limit": 1}, expect=(200, 201))
    try:
        proc = run_flow_script(HERE / "scenarios" / "s13_tag_concurrency.py", compat_server, args=[tag], timeout=150)
        assert_no_lost_events(proc)
        run_id = script_result(proc)["flow_run_id"]
        assert_completed(get_flow_run(api, run_id), "flow run")
        first, second = sorted(settled_task_runs(api, run_id, 2), key=lambda tr: tr["start_time"])
        for tr in (first, second):
            assert_completed(tr, "task run")
            assert tag in tr["tags"]
        assert parse_time(first["end_time"]) <= parse_time(second["start_time"]), (
            "two task runs ran at once under a concurrency limit of 1: "
            f"{first['start_time']}..{first['end_time']} and {second['start_time']}..{second['end_time']}"
        )
        assert api.ok("GET", f"/concurrency_limits/tag/{tag}", expect=200)["active_slots"] == []
    finally:
        api("DELETE", f"/concurrency_limits/tag/{tag}")


# The 3.9 server's routes we do not serve, as README.md's "What of the Prefect 2.20 and 3.9 APIs is not served"
# says: those only Prefect's own web UI calls.
NOT_SERVED_3 = UI_ONLY_ROUTES | {
    ("GET", "/ui/task_runs/{id}"),
    ("POST", "/ui/flow_runs/count-task-runs"),
    ("POST", "/ui/flows/count-deployments"),
    ("POST", "/ui/flows/next-runs"),
    ("POST", "/automations/templates/validate"),
    ("GET", "/observed-states"),
}

READ_ROUTES = """
import json
from prefect.server.api.server import create_app
paths = create_app(ephemeral=True).openapi()["paths"]
print(json.dumps({path: sorted(operations) for path, operations in paths.items()}))
"""


def test_every_route_of_the_3_9_server_is_served_but_the_documented_few(prefect3_python, tmp_path):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in ("PYTHONPATH", "PYTHONHOME")
    }
    env.update(PREFECT_HOME=str(tmp_path), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    done = subprocess.run(
        [prefect3_python, "-c", READ_ROUTES], capture_output=True, text=True, timeout=300, check=False, env=env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    shape = lambda path: re.sub(r"\{[^}]+\}", "{}", path)  # noqa: E731 - parameter names differ
    served = {(method, shape(path)) for method, path, _handler in prefectlite.ROUTES}
    missing = set()
    for path, operations in json.loads(done.stdout).items():
        path = path.removeprefix("/api")
        missing |= {(m.upper(), path) for m in operations if (m.upper(), shape(path)) not in served}
    assert missing == NOT_SERVED_3
    readme = (Path(prefectlite.__file__).parent / "README.md").read_text(encoding="utf-8")
    assert f"every one is served but these {len(NOT_SERVED_3)}," in readme


def test_the_v1_concurrency_context_manager_holds_a_tags_slot(run_flow_script, start_script, compat_server, api):
    """prefect.concurrency.v1 takes the tag's slot for the task run (POST /concurrency_limits/increment), which
    holds it inside the block and gives it back after (/decrement); on a full limit it waits, and with a timeout
    gives up; on a limit of 0 it gives up at once (a 423 without Retry-After)."""
    tag = f"p3-v1-{uuid.uuid4().hex[:12]}"
    api.ok("POST", "/concurrency_limits/", {"tag": tag, "concurrency_limit": 1}, expect=(200, 201))
    try:
        result = script_result(run_flow_script(scenario("p19_v1_concurrency.py"), compat_server, args=[tag, "run"]))
        assert result["held"] == [result["task_run_id"]]
        assert api.ok("GET", f"/concurrency_limits/tag/{tag}", expect=200)["active_slots"] == []

        other = str(uuid.uuid4())
        api.ok("POST", f"/concurrency_limits/tag/{tag}/reset", {"slot_override": [other]}, expect=200)
        args = [tag, "timeout", "3"]
        blocked = start_script(scenario("p19_v1_concurrency.py"), compat_server, args=args).wait(check=False)
        assert blocked.returncode != 0
        assert "timed out" in blocked.stderr.lower(), blocked.stderr[-4000:]
        assert api.ok("GET", f"/concurrency_limits/tag/{tag}", expect=200)["active_slots"] == [other]

        api.ok("POST", "/concurrency_limits/", {"tag": tag, "concurrency_limit": 0}, expect=(200, 201))
        refused = start_script(scenario("p19_v1_concurrency.py"), compat_server, args=[tag, "run"]).wait(check=False)
        assert refused.returncode != 0
        assert "will deadlock" in refused.stderr, refused.stderr[-4000:]
    finally:
        api("DELETE", f"/concurrency_limits/tag/{tag}")


def test_serve_and_prefect_deployment_run(start_script, prefect3_python, compat_server, api, tmp_path):

    serve = start_script(scenario("p09_serve.py"), compat_server, timeout=180)

    def deployment():
        if serve.proc.poll() is not None:
            out, err = serve.output()
            pytest.fail(f"serve() exited with {serve.proc.returncode}\n{out[-3000:]}\n{err[-6000:]}")
        status, body = api("GET", "/deployments/name/p3-served/p3-served-deployment")
        return body if status == 200 else None

    dep = wait_until(deployment, 60, what="deployment p3-served/p3-served-deployment")
    assert dep["entrypoint"] == "p09_serve.py:served"

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_API_URL": compat_server, "PREFECT_HOME": str(tmp_path / "cli-home")})
    cli = subprocess.run(
        [prefect3_cli(prefect3_python), "deployment", "run", "p3-served/p3-served-deployment", "--param", "x=5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, f"{cli.stdout[-3000:]}\n{cli.stderr[-3000:]}"
    runs = api.ok("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}}, expect=200)
    [run] = runs
    assert run["parameters"] == {"x": 5}

    def finished():
        if serve.proc.poll() is not None:
            out, err = serve.output()
            pytest.fail(f"serve() exited with {serve.proc.returncode}\n{out[-3000:]}\n{err[-6000:]}")
        fr = get_flow_run(api, run["id"])
        return fr if fr["state_type"] in TERMINAL else None

    fr = wait_until(finished, 90, interval=1, what=f"served flow run {run['id']} to finish")
    assert_completed(fr, "served flow run")
    names = [name for _type, name in state_seq(flow_run_states(api, run["id"]))]
    assert names[0] == "Scheduled" and names[-1] == "Completed" and "Running" in names
    [tr] = settled_task_runs(api, run["id"], 1)
    assert task_name(tr) == "shout"
    assert_completed(tr, "task run")
    assert_task_run_like_2x(api, tr)
    logs = logs_of(api, run["id"], ["served run x=5", "shouting 5"])
    assert the_log(logs, "shouting 5")["task_run_id"] == tr["id"]
    out, err = serve.output()
    assert "may be lost" not in err, err[-4000:]
    serve.terminate()


# --------------------------------------------------------------------------- notifications


def _new_webhook_block(api, url):
    block_type = api.ok("GET", "/block_types/slug/custom-webhook", expect=200)
    schemas = api.ok(
        "POST", "/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}}, expect=200
    )
    return api.ok(
        "POST",
        "/block_documents/",
        {
            "name": f"p3-hook-{uuid.uuid4().hex[:8]}",
            "block_type_id": block_type["id"],
            "block_schema_id": schemas[0]["id"],
            "data": {"name": "p3", "url": url, "json_data": {"text": "{{body}}"}},
        },
        expect=(200, 201),
    )


def test_pause_waiting_for_input_and_send_receive_input(start_script, compat_server, api, tmp_path):
    """The 3.x SDK's send_input/receive_input and pause_flow_run(wait_for_input=...), running the very
    script the 2.20 test runs (tests/compat/scenarios/s14_wait_for_input.py): the same routes serve both."""
    id_file = tmp_path / "flow_run_id.txt"
    script = start_script(SCENARIOS_DIR.parent / "scenarios" / "s14_wait_for_input.py", compat_server, args=[id_file])

    run = wait_for_pause(script, id_file, api, 90)
    run_id = run["id"]
    wait_for_input_schema(api, run)  # else the answer below is refused for want of a schema, not for its fit
    status, body = api("POST", f"/flow_runs/{run_id}/resume", {"run_input": {"note": "no verdict"}})
    assert body["status"] == "REJECT", body
    status, body = api("POST", f"/flow_runs/{run_id}/resume", {"run_input": {"approved": False, "note": "not yet"}})
    assert body["status"] == "ACCEPT", (status, body)
    result = script_result(script.wait(check=True))
    assert result["result"] == {
        "received": [["first message", "compat-test"], ["second message", f"prefect.flow-run.{run_id}"]],
        "approved": False,
        "note": "not yet",
    }


def test_notification_policies_fire_for_prefect3_flow_runs(run_flow_script, compat_server, api):
    if os.environ.get("PREFECTLITE_COMPAT_REFERENCE") == "1":
        pytest.skip("Prefect 3's own server has automations instead of notification policies")
    with HTTPReceiver() as hook:
        block = _new_webhook_block(api, hook.url + "/p3")
        policy = api.ok(
            "POST",
            "/flow_run_notification_policies/",
            {
                "state_names": ["Failed"],
                "tags": ["p3-nightly"],
                "block_document_id": block["id"],
                "message_template": "{flow_name}/{flow_run_name} is {flow_run_state_name}: {flow_run_state_message}",
            },
            expect=(200, 201),
        )
        try:
            proc = run_flow_script(scenario("p06_fail.py"), compat_server)
            run_id = script_result(proc)["flow_run_id"]
            run = get_flow_run(api, run_id)
            hits = hook.wait_for(1, timeout=30)
            texts = [hit.json()["text"] for hit in hits]
            assert f"p3-failing/{run['name']} is Failed: {run['state']['message']}" in texts, texts
        finally:
            api.ok("PATCH", f"/flow_run_notification_policies/{policy['id']}", {"is_active": False}, expect=204)


# --------------------------------------------------------------------------- the 2.20 scenarios under 3.9
# Every 2.20 scenario (scenarios/) whose APIs exist in 3.x runs unchanged under the 3.9 SDK too: each script
# asserts its own outcome (it exits non-zero otherwise) and prints the flow runs it made, which must end as
# the script expects, their task runs recorded and settled. The 2.20 tests check the details of each; the 3.x
# ones above check 3.x's details of the same behaviours. Not here, because 3.x removed their APIs:
SCENARIOS_2_NOT_IN_3 = {
    "b08_notification.py": "flow run notification policies (create_flow_run_notification_policy): Prefect 3 "
    "replaced them with automations",
    "s17_deployment_reads.py": "create_deployment(infra_overrides=..., schedule=...): the 2.x ways of making a "
    "deployment, gone from the 3.x client",
    "b02_system_blocks.py": "the JSON block (prefect.blocks.system.JSON): removed in 3.x",
    "b03_nested_block.py": "prefect._internal.pydantic.HAS_PYDANTIC_V2: a 2.x internal, gone in 3.x",
    "b04_variables.py": "variables.get() and Variable.get() answering a Variable: 3.x's Variable.get answers the value",
    "s12_variables.py": "Variable.get() answering a Variable (.value): 3.x's answers the value",
    "s06_submit.py": "asserts the 2.x ConcurrentTaskRunner (3.x's default is the ThreadPoolTaskRunner); it fails on "
    "Prefect 3.9's own server too",
}
SCENARIOS_2_ELSEWHERE = {  # run under 3.9 by their own tests above
    "b09_schema_checksum.py": "test_the_sdk_finds_its_block_schemas_by_its_own_checksum",
    "b10_core_blocks.py": "test_blocks_of_the_core_types_made_in_the_ui_load_in_the_sdk",
    "s13_tag_concurrency.py": "test_a_tag_concurrency_limit_holds_back_the_second_task",
    "s15_subflow_result_into_task.py": "test_a_subflows_state_passed_into_a_task",
}
SCENARIOS_2 = sorted(
    path.name
    for path in (HERE / "scenarios").glob("[bs][0-9]*.py")
    if path.name not in SCENARIOS_2_NOT_IN_3 and path.name not in SCENARIOS_2_ELSEWHERE
)
FAILING_SCENARIOS_2 = {"s07_fail.py"}  # its flow fails, as it means to


def _prepare_scenario_2(name: str, token: str, api) -> list:
    """What the 2.20 test creates first; the argv lists of the script's invocations, in order."""
    if name == "b04_variables.py":
        api.ok("POST", "/variables/", {"name": f"compat_bvar_{token}", "value": "api-value"}, expect=(200, 201))
    if name == "s12_variables.py":
        api.ok(
            "POST",
            "/variables/",
            {"name": f"compat_var_{token}", "value": "from-the-api", "tags": ["compat"]},
            expect=(200, 201),
        )
    if name == "b06_tag_limit.py":
        api.ok("POST", "/concurrency_limits/", {"tag": "limited", "concurrency_limit": 1}, expect=(200, 201))
    if name == "b07_global_concurrency.py":
        api.ok("POST", "/v2/concurrency_limits/", {"name": f"db-{token}", "limit": 1}, expect=(200, 201))
        return [[f"db-{token}"]]
    if name in ("b02_system_blocks.py", "b03_nested_block.py"):
        return [["save", token], ["load", token]]
    if name == "b01_persisted_cache.py":
        return [[token], [token]]
    if name in ("b04_variables.py", "b05_artifacts.py", "s03_cache.py", "s08_tags_params.py", "s12_variables.py"):
        return [[token]]
    return [[]]


def _resume_when_paused(script, id_file, api, run_input=None) -> None:
    run = wait_for_pause(script, id_file, api, 60)
    if run_input is not None:  # the SDK stores the input's schema after its pause was accepted: the answer waits
        wait_for_input_schema(api, run)
    body = {"run_input": run_input} if run_input is not None else {}
    assert api.ok("POST", f"/flow_runs/{run['id']}/resume", body, expect=(200, 201))["status"] == "ACCEPT"


@pytest.mark.parametrize("name", SCENARIOS_2)
def test_the_2_20_scenario_runs_under_the_3_9_sdk(name, start_script, compat_server, api, tmp_path):
    token = uuid.uuid4().hex[:12]
    results = []
    try:
        for args in _prepare_scenario_2(name, token, api):
            if name in ("s09_pause.py", "s14_wait_for_input.py"):  # the test resumes the flow, as the 2.20 one does
                id_file = tmp_path / "flow_run_id.txt"
                script = start_script(HERE / "scenarios" / name, compat_server, args=[id_file], timeout=150)
                _resume_when_paused(
                    script,
                    id_file,
                    api,
                    {"approved": True, "note": "ship it"} if name == "s14_wait_for_input.py" else None,
                )
                proc = script.wait(check=True)
            else:
                proc = start_script(HERE / "scenarios" / name, compat_server, args=args, timeout=150).wait(check=True)
            assert_no_lost_events(proc)
            results.append(script_result(proc))
    finally:
        if name == "b06_tag_limit.py":
            api("DELETE", "/concurrency_limits/tag/limited")
    run_ids = [
        run_id for result in results for run_id in (result.get("flow_run_ids") or [result.get("flow_run_id")]) if run_id
    ]
    for run_id in run_ids:
        run = get_flow_run(api, run_id)
        expected = "FAILED" if name in FAILING_SCENARIOS_2 else "COMPLETED"
        assert run["state_type"] == expected, (name, run["state"])
        for tr in task_runs_of(api, run_id):
            wait_until(
                lambda: api.ok("GET", f"/task_runs/{tr['id']}", expect=200)["state_type"] in TERMINAL,
                15,
                what=f"task run {tr['id']} to settle",
            )
