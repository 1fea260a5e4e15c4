"""Conformance: deployments, schedules, work pools and workers with the real prefect 2.20 SDK.

Each test drives the unmodified SDK (flow.serve, `prefect work-pool create`, `prefect worker start`,
flow.from_source(...).deploy, `prefect flow-run cancel`) in subprocesses against the server, and
checks through the REST API what happened. Every background process (serve, worker, server) is
ended by the fixtures; every wait is bounded.

Run: pytest tests/compat/test_prefect2_deployments.py   (see conftest.py for the environment variables)
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from helpers import wait_until

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
PREFECTLITE = REPO_ROOT / "prefectlite.py"

pytestmark = pytest.mark.compat

TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# --------------------------------------------------------------------------- helpers


class _Api:
    """api(method, path, body=None) -> (status, json); api.ok(...) fails the test on an unexpected status."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")

    def __call__(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, (json.loads(raw) if raw else None)
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def ok(self, method, path, body=None, expect=(200, 201, 204)):
        status, payload = self(method, path, body)
        if status not in expect:
            pytest.fail(
                f"{method} {path} answered {status}, expected {expect}\n"
                f"request body: {json.dumps(body)[:2000]}\nresponse: {str(payload)[:2000]}"
            )
        return payload


def token() -> str:
    return uuid.uuid4().hex[:8]


def alive(script, what):
    """Fail (showing its output) if a background SDK process has exited."""
    if script.proc.poll() is not None:
        out, err = script.output()
        pytest.fail(
            f"{what} exited with code {script.proc.returncode}\n--- stdout ---\n{out[-3000:]}\n"
            f"--- stderr ---\n{err[-6000:]}"
        )


def script_output(script) -> str:
    out, err = script.output()
    return f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-6000:]}"


def prefect_cli(*args, env=None) -> str:
    """Source of a script that runs the `prefect` CLI (its own typer app) with extra settings set first."""
    return (
        "import os, sys\n"
        f"os.environ.update({json.dumps(env or {})})\n"
        f"sys.argv = ['prefect', *{json.dumps([str(a) for a in args])}]\n"
        "from prefect.cli import app\n"
        "app()\n"
    )


def prefectlite_cli(api_url, home, *args, timeout=60):
    """Our own CLI (`python prefectlite.py ARGS`) pointed at the server under test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT")}
    env.update({"PREFECT_API_URL": api_url, "PREFECT_HOME": str(home)})
    return subprocess.run(
        [sys.executable, str(PREFECTLITE), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def script_result(proc) -> dict:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("COMPAT_RESULT "):
            return json.loads(line[len("COMPAT_RESULT ") :])
    pytest.fail(
        f"the script printed no COMPAT_RESULT line\n--- stdout ---\n{proc.stdout[-4000:]}\n"
        f"--- stderr ---\n{proc.stderr[-4000:]}"
    )


def get_run(api, run_id) -> dict:
    run = api.ok("GET", f"/flow_runs/{run_id}", expect=(200,))
    assert run["id"] == run_id
    return run


def wait_for_deployment(api, flow_name, dep_name, script, timeout=90):
    def found():
        alive(script, "the serving script")
        status, body = api("GET", f"/deployments/name/{flow_name}/{dep_name}")
        return body if status == 200 else None

    return wait_until(found, timeout, what=f"deployment {flow_name}/{dep_name}")


def wait_for_state(api, run_id, types, timeout, watch=(), what=None):
    def reached():
        for script, label in watch:
            alive(script, label)
        run = get_run(api, run_id)
        return run if run["state_type"] in types else None

    return wait_until(reached, timeout, what=what or f"flow run {run_id} to reach {types}")


def log_messages(api, run_id) -> list:
    logs = api.ok("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}, expect=(200,))
    return [log["message"] for log in logs]


def wait_for_log(api, run_id, message, timeout=30):
    return wait_until(
        lambda: message in log_messages(api, run_id), timeout, what=f"log line {message!r} of flow run {run_id}"
    )


def state_names(api, run_id) -> list:
    states = api.ok("GET", f"/flow_run_states/?flow_run_id={run_id}", expect=(200,))
    return [(s["type"], s["name"]) for s in sorted(states, key=lambda s: s["timestamp"])]


def assert_completed(run):
    state = run.get("state") or {}
    assert (run["state_type"], run["state_name"]) == ("COMPLETED", "Completed"), (
        f"flow run {run['name']} is {run['state_type']}/{run['state_name']}: {state.get('message')}"
    )


# --------------------------------------------------------------------------- flow.serve + our CLI


SERVED_FLOW = """
import os
os.environ["PREFECT_RUNNER_POLL_FREQUENCY"] = "1"
from prefect import flow, get_run_logger


@flow(name="{flow_name}")
def greet(name: str = "nobody", times: int = 1):
    get_run_logger().info("greeting %s x%s", name, times)
    return name * times


if __name__ == "__main__":
    greet.serve(name="{dep_name}", interval=3600, tags=["compat-serve"])
"""


def test_serve_registers_a_deployment_and_runs_a_run_made_by_our_cli(start_script, compat_server, api, tmp_path):
    flow_name, dep_name = f"compat-served-{token()}", "served"
    serve = start_script(SERVED_FLOW.format(flow_name=flow_name, dep_name=dep_name), compat_server, timeout=240)
    dep = wait_for_deployment(api, flow_name, dep_name, serve)
    assert dep["entrypoint"] == "flow_script.py:greet"
    assert dep["paused"] is False and "compat-serve" in dep["tags"]
    assert [s["schedule"]["interval"] for s in dep["schedules"]] == [3600]
    assert dep["schedules"][0]["active"] is True
    props = dep["parameter_openapi_schema"]["properties"]
    assert props["name"]["type"] == "string" and props["times"]["type"] == "integer"

    proc = prefectlite_cli(
        compat_server,
        tmp_path / "home",
        "deployment",
        "run",
        f"{flow_name}/{dep_name}",
        "--param",
        "name=prefectlite",
        "--param",
        "times=3",
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    run_id = UUID_RE.findall(proc.stdout)[0]
    run = get_run(api, run_id)
    assert run["deployment_id"] == dep["id"]
    assert run["parameters"] == {"name": "prefectlite", "times": 3}

    finished = wait_for_state(
        api, run_id, TERMINAL, 120, watch=[(serve, "flow.serve()")], what="the served run to finish"
    )
    assert_completed(finished)
    assert finished["parameters"] == {"name": "prefectlite", "times": 3}
    assert finished["run_count"] == 1
    wait_for_log(api, run_id, "greeting prefectlite x3")
    assert [t for t, _ in state_names(api, run_id)] == ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]
    # The runner polled the deployment: it is READY and has been polled.
    polled = api.ok("GET", f"/deployments/{dep['id']}", expect=(200,))
    assert polled["last_polled"] is not None
    serve.terminate()


# --------------------------------------------------------------------------- process work pool + worker


POOL_FLOW = """
from prefect import flow, get_run_logger


@flow(name="{flow_name}")
def add(a: int = 1, b: int = 2):
    get_run_logger().info("sum is %s", a + b)
    return a + b
"""

DEPLOY_FROM_SOURCE = """
import json
from prefect import flow

if __name__ == "__main__":
    remote = flow.from_source(source={source!r}, entrypoint="pool_flow.py:add")
    dep_id = remote.deploy(name={dep_name!r}, work_pool_name={pool!r}, parameters={{"a": 5}},
                           print_next_steps=False, ignore_warnings=True)
    print("COMPAT_RESULT " + json.dumps({{"deployment_id": str(dep_id)}}))
"""

WORKER_ENV = {
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
    "PREFECT_WORKER_PREFETCH_SECONDS": "5",
}


@pytest.fixture
def process_pool(run_flow_script, compat_server, api):
    """A process work pool made with `prefect work-pool create NAME --type process`."""
    name = f"compat-pool-{token()}"
    run_flow_script(prefect_cli("work-pool", "create", name, "--type", "process"), compat_server, timeout=120)
    pool = api.ok("GET", f"/work_pools/{name}", expect=(200,))
    assert pool["type"] == "process"
    assert pool["base_job_template"].get("job_configuration"), pool["base_job_template"]
    return name


def test_process_worker_runs_a_deployment(run_flow_script, start_script, compat_server, api, tmp_path, process_pool):
    flow_name, dep_name = f"compat-pool-flow-{token()}", "from-source"
    source = tmp_path / "flows"
    source.mkdir()
    (source / "pool_flow.py").write_text(POOL_FLOW.format(flow_name=flow_name), encoding="utf-8")
    proc = run_flow_script(
        DEPLOY_FROM_SOURCE.format(source=str(source), dep_name=dep_name, pool=process_pool), compat_server, timeout=120
    )
    dep_id = script_result(proc)["deployment_id"]
    dep = api.ok("GET", f"/deployments/{dep_id}", expect=(200,))
    assert (dep["name"], dep["work_pool_name"], dep["entrypoint"]) == (dep_name, process_pool, "pool_flow.py:add")
    assert dep["parameters"] == {"a": 5}
    assert api.ok("GET", f"/deployments/name/{flow_name}/{dep_name}", expect=(200,))["id"] == dep_id

    run = api.ok("POST", f"/deployments/{dep_id}/create_flow_run", {"parameters": {"b": 10}}, expect=(201,))
    assert run["work_queue_name"] == "default"

    worker = start_script(
        prefect_cli("worker", "start", "--pool", process_pool, "--type", "process", env=WORKER_ENV),
        compat_server,
        timeout=300,
    )
    finished = wait_for_state(
        api,
        run["id"],
        TERMINAL,
        180,
        watch=[(worker, "prefect worker start")],
        what="the worker to run the deployment's flow run",
    )
    if finished["state_type"] != "COMPLETED":
        pytest.fail(
            f"the run ended {finished['state_type']}: {finished['state'].get('message')}\n{script_output(worker)}"
        )
    assert_completed(finished)
    assert finished["parameters"] == {"a": 5, "b": 10}
    wait_for_log(api, run["id"], "sum is 15")

    # The worker heartbeats: it is listed ONLINE and the pool is READY.
    workers = api.ok("POST", f"/work_pools/{process_pool}/workers/filter", {}, expect=(200,))
    assert workers and all(w["status"] == "ONLINE" for w in workers), workers
    assert api.ok("GET", f"/work_pools/{process_pool}", expect=(200,))["status"] == "READY"
    assert api.ok("GET", f"/work_pools/{process_pool}/queues/default", expect=(200,))["status"] == "READY"
    worker.terminate()


def test_paused_pool_gets_nothing_run_until_resumed(
    run_flow_script, start_script, compat_server, api, tmp_path, process_pool
):
    flow_name = f"compat-paused-pool-{token()}"
    source = tmp_path / "flows"
    source.mkdir()
    (source / "pool_flow.py").write_text(POOL_FLOW.format(flow_name=flow_name), encoding="utf-8")
    proc = run_flow_script(
        DEPLOY_FROM_SOURCE.format(source=str(source), dep_name="paused", pool=process_pool), compat_server, timeout=120
    )
    dep_id = script_result(proc)["deployment_id"]
    api.ok("PATCH", f"/work_pools/{process_pool}", {"is_paused": True}, expect=(204,))
    run = api.ok("POST", f"/deployments/{dep_id}/create_flow_run", {}, expect=(201,))
    worker = start_script(
        prefect_cli("worker", "start", "--pool", process_pool, "--type", "process", env=WORKER_ENV),
        compat_server,
        timeout=300,
    )
    # The worker polls (it heartbeats), but a paused pool hands nothing out.
    wait_until(
        lambda: (
            alive(worker, "prefect worker start")
            or api.ok("POST", f"/work_pools/{process_pool}/workers/filter", {}, expect=(200,))
        ),
        60,
        what="the worker's heartbeat",
    )
    # Several polls (1 s apart): each one stamps the pool's queues' last_polled, even while it is paused.
    polls = set()

    def polled_three_times():
        for queue in api.ok("POST", f"/work_pools/{process_pool}/queues/filter", {}, expect=(200,)):
            polls.add(queue["last_polled"])
        return len(polls - {None}) >= 3

    wait_until(polled_three_times, 60, interval=0.2, what="three polls of the paused pool")
    assert get_run(api, run["id"])["state_type"] == "SCHEDULED"
    api.ok("PATCH", f"/work_pools/{process_pool}", {"is_paused": False}, expect=(204,))
    finished = wait_for_state(api, run["id"], TERMINAL, 180, watch=[(worker, "prefect worker start")])
    assert_completed(finished)
    worker.terminate()


# --------------------------------------------------------------------------- cancellation


SLEEPY_FLOW = """
import os
os.environ["PREFECT_RUNNER_POLL_FREQUENCY"] = "1"
import time
from prefect import flow, get_run_logger


@flow(name="{flow_name}")
def sleepy(seconds: int = 300):
    get_run_logger().info("going to sleep")
    time.sleep(seconds)
    get_run_logger().info("woke up")


if __name__ == "__main__":
    sleepy.serve(name="{dep_name}")
"""


def test_prefect_flow_run_cancel_stops_a_running_flow(start_script, run_flow_script, compat_server, api):
    flow_name, dep_name = f"compat-sleepy-{token()}", "sleepy"
    serve = start_script(SLEEPY_FLOW.format(flow_name=flow_name, dep_name=dep_name), compat_server, timeout=300)
    dep = wait_for_deployment(api, flow_name, dep_name, serve)
    run = api.ok("POST", f"/deployments/{dep['id']}/create_flow_run", {}, expect=(201,))
    wait_for_state(
        api, run["id"], ("RUNNING",) + TERMINAL, 120, watch=[(serve, "flow.serve()")], what="the sleepy run to start"
    )
    wait_for_log(api, run["id"], "going to sleep")

    proc = run_flow_script(prefect_cli("flow-run", "cancel", run["id"]), compat_server, timeout=120)
    assert "cancel" in proc.stdout.lower(), proc.stdout

    finished = wait_for_state(
        api, run["id"], TERMINAL, 90, watch=[(serve, "flow.serve()")], what="the cancelled run to end"
    )
    assert (finished["state_type"], finished["state_name"]) == ("CANCELLED", "Cancelled"), (
        finished["state_type"],
        finished["state_name"],
        finished["state"].get("message"),
    )
    types = [t for t, _ in state_names(api, run["id"])]
    assert types[-2:] == ["CANCELLING", "CANCELLED"], types
    assert "woke up" not in log_messages(api, run["id"])
    serve.terminate()


def test_prefect_flow_run_cancel_of_a_run_not_started_cancels_it(run_flow_script, compat_server, api, tmp_path):
    """Nothing runs it yet, so there is nothing to stop: the SDK's CANCELLING ends CANCELLED at once."""
    flow = api.ok("POST", "/flows/", {"name": f"compat-never-run-{token()}", "tags": []}, expect=(200, 201))
    dep = api.ok("POST", "/deployments/", {"name": "idle", "flow_id": flow["id"]}, expect=(200, 201))
    run = api.ok(
        "POST",
        f"/deployments/{dep['id']}/create_flow_run",
        {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": "2099-01-01T00:00:00+00:00"}}},
        expect=(201,),
    )
    proc = run_flow_script(prefect_cli("flow-run", "cancel", run["id"]), compat_server, timeout=120)
    assert "cancel" in proc.stdout.lower(), proc.stdout
    after = get_run(api, run["id"])
    assert (after["state_type"], after["state_name"]) == ("CANCELLED", "Cancelled"), (
        after["state_type"],
        after["state_name"],
    )


def test_prefect_deployment_schedule_pause_and_resume(run_flow_script, compat_server, api):
    """`prefect deployment schedule pause|resume` (the SDK's update_deployment_schedule: PATCH
    /deployments/{id}/schedules/{schedule_id}) flips that schedule's active flag and nothing else."""
    flow_name = f"compat-schedules-{token()}"
    flow = api.ok("POST", "/flows/", {"name": flow_name}, expect=(200, 201))
    dep = api.ok(
        "POST",
        "/deployments/",
        {
            "name": "twice",
            "flow_id": flow["id"],
            "schedules": [{"schedule": {"interval": 3600}}, {"schedule": {"cron": "0 9 * * *"}}],
        },
        expect=(200, 201),
    )
    hourly, daily = sorted(
        api.ok("GET", f"/deployments/{dep['id']}/schedules", expect=(200,)), key=lambda s: "cron" in s["schedule"]
    )
    for action, active in (("pause", False), ("resume", True)):
        proc = run_flow_script(
            prefect_cli("deployment", "schedule", action, f"{flow_name}/twice", hourly["id"]),
            compat_server,
            timeout=120,
        )
        assert action in proc.stdout.lower(), proc.stdout
        now = {s["id"]: s for s in api.ok("GET", f"/deployments/{dep['id']}/schedules", expect=(200,))}
        assert now[hourly["id"]]["active"] is active and now[hourly["id"]]["schedule"] == hourly["schedule"]
        assert now[daily["id"]]["active"] is True


# --------------------------------------------------------------------------- scheduler and late runs


FAST_SERVICES = {
    "PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS": "0.5",
    "PREFECT_API_SERVICES_LATE_RUNS_LOOP_SECONDS": "0.5",
    "PREFECT_API_SERVICES_LATE_RUNS_AFTER_SECONDS": "1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(api_url, proc, log_path, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(api_url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    _stop(proc)
    pytest.fail(
        f"the server with fast services did not start (exit {proc.returncode})\n"
        f"{log_path.read_text(errors='replace')[-6000:]}"
    )


def _stop(proc):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # and anything it started (the reference server's uvicorn)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


@pytest.fixture
def fast_services_server(request, tmp_path):
    """A server of its own with fast scheduler and late-run loops (the compat server runs the defaults).

    prefectlite, started as the compat fixture starts it; with PREFECTLITE_COMPAT_REFERENCE=1 Prefect's own
    server, with the same settings (they are Prefect's names), to prove the test right.
    """
    if os.environ.get("PREFECTLITE_COMPAT_SERVER_URL"):
        pytest.skip("an external server's service loops cannot be configured")
    home = tmp_path / "fast-server"
    home.mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(key, None)
    env.update(FAST_SERVICES)
    env.update({"PREFECT_HOME": str(home), "PYTHONUNBUFFERED": "1"})
    if os.environ.get("PREFECTLITE_COMPAT_REFERENCE") == "1":
        python = request.getfixturevalue("prefect_python")
        env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"})
        cmd = [str(Path(python).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        start_timeout = 90
    else:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite:///{home}/fast.db"
        cmd = [sys.executable, str(PREFECTLITE), "start", "--host", "127.0.0.1", "--port", str(port)]
        start_timeout = 15
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=str(home),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(api_url, proc, log_path, start_timeout)
        yield api_url
    finally:
        _stop(proc)


SCHEDULED_DEPLOYMENT = """
import json
from prefect import flow


@flow(name="{flow_name}")
def ticking():
    return "tick"


if __name__ == "__main__":
    dep_id = ticking.to_deployment(name="{dep_name}", interval=5, parameters={{}}).apply()
    print("COMPAT_RESULT " + json.dumps({{"deployment_id": str(dep_id)}}))
"""

READ_LATE_RUNS = """
import json, sys
from prefect import get_client
from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                            FlowRunFilterState, FlowRunFilterStateName)

with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Late"]))),
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[sys.argv[1]])),
    )
    print("COMPAT_RESULT " + json.dumps([[str(r.id), r.state.type.value, r.state.name,
                                          r.state.state_details.scheduled_time.isoformat()] for r in runs]))
"""


def test_scheduled_deployment_runs_are_created_and_go_late(run_flow_script, fast_services_server):
    api = _Api(fast_services_server)
    flow_name, dep_name = f"compat-ticking-{token()}", "every-5s"
    proc = run_flow_script(
        SCHEDULED_DEPLOYMENT.format(flow_name=flow_name, dep_name=dep_name), fast_services_server, timeout=120
    )
    dep_id = script_result(proc)["deployment_id"]
    dep = api.ok("GET", f"/deployments/{dep_id}", expect=(200,))
    assert [s["schedule"]["interval"] for s in dep["schedules"]] == [5]

    def auto_runs():
        runs = api.ok(
            "POST",
            "/flow_runs/filter",
            {"deployments": {"id": {"any_": [dep_id]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200},
            expect=(200,),
        )
        return [r for r in runs if r["auto_scheduled"]]

    runs = wait_until(lambda: len(auto_runs()) >= 3 and auto_runs(), 30, what="the scheduler's runs")
    times = [r["expected_start_time"] for r in runs]
    assert len(set(times)) == len(times), "duplicate scheduled runs"

    def late_runs():
        late = [r for r in auto_runs() if r["state_name"] == "Late"]
        return late or None

    late = wait_until(late_runs, 60, what="a run of the 5-second schedule to go Late")
    assert all(r["state_type"] == "SCHEDULED" for r in late), late
    # The SDK reads them back as Late SCHEDULED runs.
    proc = run_flow_script(READ_LATE_RUNS, fast_services_server, timeout=120, args=[dep_id])
    seen = script_result(proc)
    late_ids = {r["id"] for r in late}
    assert late_ids <= {row[0] for row in seen}, (late_ids, seen)
    assert all(row[1] == "SCHEDULED" and row[2] == "Late" for row in seen), seen


def test_client_reads_deployments_made_the_older_ways_in_test_mode(run_flow_script, compat_server, api):
    """create_deployment(infra_overrides=..., schedule=..., paused=True) and reading it back with
    PREFECT_TEST_MODE=1: the SDK refused the answers (job_variables {} beside infra_overrides, an extra
    concurrency_limit field) and the schedule was dropped (`"schedules": []` won over `schedule`)."""
    scenarios = HERE / "scenarios"
    result = script_result(run_flow_script(scenarios / "s17_deployment_reads.py", compat_server, args=[token()]))
    assert result["job_variables"] == result["infra_overrides"] == {"image": "etl:2"}
    assert result["by_name"] == result["id"] and result["listed"] is True
    assert result["schedule_intervals"] == [3600.0]
    assert (result["paused"], result["is_schedule_active"]) == (True, False)
