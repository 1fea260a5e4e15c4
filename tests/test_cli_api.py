"""The CLI commands that act on a running server through its API (`python prefectlite.py ...` in a
subprocess against a real server): deployment ls / run, flow-run ls / cancel, work-pool ls, and the
one-line errors for bad input and an unreachable server."""

import re
import uuid

import pytest
from helpers import run_cli

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cli(server, tmp_path):
    """cli(*args) -> CompletedProcess of `prefectlite ARGS` pointed at the test server."""
    env = {"PREFECT_API_URL": server, "PREFECT_HOME": str(tmp_path / "home")}

    def run(*args, expect_ok=True, **extra_env):
        proc = run_cli(*args, env={**env, **extra_env}, timeout=60)
        if expect_ok:
            assert proc.returncode == 0, (args, proc.returncode, proc.stdout, proc.stderr)
            assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    return run


def assert_one_line_error(proc):
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {proc.stderr!r}"
    return lines[0]


def new_deployment(client, flow_name=None, name=None, **fields):
    flow = client.ok("POST", "/flows/", {"name": flow_name or unique("flow")})
    return flow, client.ok("POST", "/deployments/", {"name": name or unique("dep"), "flow_id": flow["id"], **fields})


def set_state(client, run_id, state_type, name=None):
    state = {"type": state_type}
    if name:
        state["name"] = name
    client.ok("POST", f"/flow_runs/{run_id}/set_state", {"state": state, "force": True})


# --- deployment ls / run -----------------------------------------------------------------------


def test_deployment_ls(cli, client):
    empty = cli("deployment", "ls")
    assert "No deployments" in empty.stdout
    pool = unique("pool")
    client.ok("POST", "/work_pools/", {"name": pool, "type": "process"})
    flow, dep = new_deployment(
        client,
        flow_name="etl",
        name="nightly",
        schedules=[
            {"schedule": {"cron": "0 4 * * *"}, "active": True},
            {"schedule": {"interval": 3600}, "active": False},
        ],
        work_pool_name=pool,
    )
    _, other = new_deployment(client, flow_name="reports", name="weekly")
    client.ok("POST", f"/deployments/{other['id']}/pause_deployment")
    out = cli("deployment", "ls").stdout
    lines = out.splitlines()
    row = next(line for line in lines if "etl/nightly" in line)
    assert dep["id"] in row and pool in row and "0 4 * * *" in row and "active" in row
    assert "inactive" in row  # the second schedule
    paused_row = next(line for line in lines if "reports/weekly" in line)
    assert other["id"] in paused_row and "paused" in paused_row


def test_deployment_run_with_parameters(cli, client):
    flow, dep = new_deployment(
        client, flow_name=unique("etl"), name="daily", parameters={"n": 1, "mode": "full", "keep": True}
    )
    proc = cli(
        "deployment",
        "run",
        f"{flow['name']}/daily",
        "--param",
        "n=3",
        "--param",
        "label=hello world",
        "--param",
        "items=[1, 2]",
    )
    ids = UUID_RE.findall(proc.stdout)
    assert ids, proc.stdout
    run = client.ok("GET", f"/flow_runs/{ids[0]}")
    assert run["deployment_id"] == dep["id"]
    # Values are JSON when they parse as JSON, text otherwise; the deployment's defaults fill the rest.
    assert run["parameters"] == {"n": 3, "mode": "full", "keep": True, "label": "hello world", "items": [1, 2]}
    assert run["state_type"] == "SCHEDULED"
    assert run["name"] in proc.stdout
    runs = client.ok("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}})
    assert [r["id"] for r in runs] == [run["id"]]


def test_deployment_run_without_parameters(cli, client):
    flow, dep = new_deployment(client, parameters={"x": 1})
    proc = cli("deployment", "run", f"{flow['name']}/{dep['name']}")
    run = client.ok("GET", f"/flow_runs/{UUID_RE.findall(proc.stdout)[0]}")
    assert run["parameters"] == {"x": 1}


def test_deployment_run_bad_input(cli, client):
    flow, dep = new_deployment(client)
    line = assert_one_line_error(cli("deployment", "run", f"{flow['name']}/no-such-deployment", expect_ok=False))
    assert "not found" in line.lower() or "404" in line
    assert_one_line_error(cli("deployment", "run", "no-slash-here", expect_ok=False))
    assert_one_line_error(
        cli("deployment", "run", f"{flow['name']}/{dep['name']}", "--param", "novalue", expect_ok=False)
    )
    assert client.ok("POST", "/flow_runs/count", {}) == 0, "a failed command created a run"


def test_deployment_run_refused_by_the_parameter_schema(cli, client):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    flow, dep = new_deployment(client, parameter_openapi_schema=schema, enforce_parameter_schema=True)
    line = assert_one_line_error(
        cli("deployment", "run", f"{flow['name']}/{dep['name']}", "--param", "n=abc", expect_ok=False)
    )
    assert "422" in line and "abc" in line, line
    assert client.ok("POST", "/flow_runs/count", {}) == 0


# --- flow-run ls / cancel ----------------------------------------------------------------------


def test_flow_run_ls_and_state_filter(cli, client):
    assert "No flow runs" in cli("flow-run", "ls").stdout
    flow = client.ok("POST", "/flows/", {"name": unique("lister")})
    runs = {}
    for state in ("COMPLETED", "FAILED", "RUNNING"):
        run = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "name": f"run-{state.lower()}"})
        set_state(client, run["id"], "RUNNING")
        if state != "RUNNING":
            set_state(client, run["id"], state)
        runs[state] = run
    late = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "name": "run-late"})
    set_state(client, late["id"], "SCHEDULED", name="Late")

    out = cli("flow-run", "ls").stdout
    for run in [*runs.values(), late]:
        assert run["id"] in out and run["name"] in out
    assert flow["name"] in out

    failed = cli("flow-run", "ls", "--state", "FAILED").stdout
    assert runs["FAILED"]["id"] in failed
    assert not {runs["COMPLETED"]["id"], runs["RUNNING"]["id"], late["id"]} & set(UUID_RE.findall(failed))
    by_name = cli("flow-run", "ls", "--state", "Late").stdout
    assert set(UUID_RE.findall(by_name)) == {late["id"]}
    both = cli("flow-run", "ls", "--state", "completed", "--state", "running").stdout
    assert set(UUID_RE.findall(both)) == {runs["COMPLETED"]["id"], runs["RUNNING"]["id"]}
    limited = cli("flow-run", "ls", "--limit", "2").stdout
    assert len(set(UUID_RE.findall(limited))) == 2


HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\r\u202eevil\x9b"  # retitle, clear, colour, overwrite, reorder


def test_flow_run_ls_escapes_control_characters_from_the_api(cli, client):
    flow = client.ok("POST", "/flows/", {"name": unique("flow") + HOSTILE})
    run = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "name": "run" + HOSTILE})
    set_state(client, run["id"], "RUNNING", name="Running" + HOSTILE)
    out = cli("flow-run", "ls").stdout
    for char in "\x1b\x07\r\u202e\x9b":
        assert char not in out, repr(out)
    escaped = "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mred\\x0d\\u202eevil\\x9b"
    assert "run" + escaped in out and flow["name"].split("\x1b")[0] + escaped in out and "Running" + escaped in out
    cancelled = cli("flow-run", "cancel", run["id"]).stdout
    assert "\x1b" not in cancelled and "\u202e" not in cancelled, repr(cancelled)


def test_flow_run_ls_shows_local_times_to_the_second(cli, client):
    flow = client.ok("POST", "/flows/", {"name": unique("timed")})
    run = client.ok(
        "POST",
        "/flow_runs/",
        {
            "flow_id": flow["id"],
            "name": "at-a-known-time",
            "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": "2026-12-06T03:30:48.123456+00:00"}},
        },
    )
    assert run["expected_start_time"].startswith("2026-12-06T03:30:48.123456")
    for zone, shown in [
        ("UTC", "2026-12-06 03:30:48"),
        ("Asia/Kolkata", "2026-12-06 09:00:48"),
        ("America/New_York", "2026-12-05 22:30:48"),
    ]:
        line = next(line for line in cli("flow-run", "ls", TZ=zone).stdout.splitlines() if run["id"] in line)
        assert line.rstrip().endswith(shown), (zone, line)
        assert ".123456" not in line and "T03:30" not in line


def test_flow_run_cancel(cli, client):
    _, dep = new_deployment(client)
    running = client.ok("POST", f"/deployments/{dep['id']}/create_flow_run", {})
    set_state(client, running["id"], "PENDING")
    set_state(client, running["id"], "RUNNING")
    scheduled = client.ok("POST", f"/deployments/{dep['id']}/create_flow_run", {})

    proc = cli("flow-run", "cancel", running["id"])
    assert "Cancelling" in proc.stdout, proc.stdout
    after = client.ok("GET", f"/flow_runs/{running['id']}")
    # Its worker or runner has to stop it: CANCELLING until then.
    assert (after["state_type"], after["state_name"]) == ("CANCELLING", "Cancelling")

    proc = cli("flow-run", "cancel", scheduled["id"])
    assert "Cancelled" in proc.stdout, proc.stdout
    after = client.ok("GET", f"/flow_runs/{scheduled['id']}")
    assert (after["state_type"], after["state_name"]) == ("CANCELLED", "Cancelled")

    # Already finished: an error, and the state stays.
    line = assert_one_line_error(cli("flow-run", "cancel", scheduled["id"], expect_ok=False))
    assert "Cancelled" in line
    assert client.ok("GET", f"/flow_runs/{scheduled['id']}")["state_type"] == "CANCELLED"


def test_flow_run_cancel_bad_ids(cli):
    line = assert_one_line_error(cli("flow-run", "cancel", "not-a-uuid", expect_ok=False))
    assert "not-a-uuid" in line
    line = assert_one_line_error(cli("flow-run", "cancel", str(uuid.uuid4()), expect_ok=False))
    assert "404" in line or "not found" in line.lower()
    assert_one_line_error(cli("flow-run", "cancel", expect_ok=False))


# --- work-pool ls ------------------------------------------------------------------------------


def test_work_pool_ls(cli, client):
    assert "No work pools" in cli("work-pool", "ls").stdout
    name = unique("pool")
    pool = client.ok("POST", "/work_pools/", {"name": name, "type": "process", "concurrency_limit": 4})
    paused = client.ok("POST", "/work_pools/", {"name": unique("paused"), "type": "kubernetes", "is_paused": True})
    lines = cli("work-pool", "ls").stdout.splitlines()
    row = next(line for line in lines if name in line)
    assert pool["id"] in row and "process" in row and "NOT_READY" in row and " 4" in row
    paused_row = next(line for line in lines if paused["name"] in line)
    assert "PAUSED" in paused_row and "kubernetes" in paused_row


# --- an unreachable server ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("deployment", "ls"),
        ("deployment", "run", "a/b"),
        ("flow-run", "ls"),
        ("flow-run", "cancel", "00000000-0000-0000-0000-000000000001"),
        ("work-pool", "ls"),
    ],
)
def test_unreachable_server_is_a_one_line_error(args, tmp_path, refusing_port):
    url = f"http://127.0.0.1:{refusing_port.port}/api"
    proc = run_cli(*args, env={"PREFECT_API_URL": url, "PREFECT_HOME": str(tmp_path)}, timeout=60)
    line = assert_one_line_error(proc)
    assert url.rsplit("/api", 1)[0] in line or "reach" in line, line
