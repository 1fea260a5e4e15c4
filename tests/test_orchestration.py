"""The orchestration rules, each through the HTTP API of a real server.

`POST /flow_runs/{id}/set_state` and `POST /task_runs/{id}/set_state` take {"state": {...}, "force": bool}
and answer {"status": ACCEPT|REJECT|WAIT|ABORT, "details": {...}, "state": {...}}: 201 when a state was
written (accepted, or rejected into another state), 200 when nothing was written (WAIT, ABORT, a
rejection that keeps the current state).
"""

import datetime as dt
import time
import urllib.request
import uuid

import pytest

from helpers import new_flow, new_flow_run

import prefectlite

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")


# --- helpers -----------------------------------------------------------------------------------


def now():
    return dt.datetime.now(dt.timezone.utc)


def iso(moment):
    return moment.isoformat()


def parse(text):
    """An API datetime as an aware datetime (naive means UTC)."""
    assert isinstance(text, str), text
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def sleep_until(moment, margin=0.05):
    delay = (moment - now()).total_seconds() + margin
    if delay > 0:
        time.sleep(delay)


def new_task_run(client, flow_run_id, task_key=None, dynamic_key="0", state=None, **fields):
    body = {
        "flow_run_id": flow_run_id,
        "task_key": task_key or f"task-{uuid.uuid4().hex[:8]}",
        "dynamic_key": dynamic_key,
        **fields,
    }
    if state is not None:
        body["state"] = state
    return client.ok("POST", "/task_runs/", body)


def propose(client, kind, run_id, state_type, force=False, name=None, data=None, message=None, **details):
    """Propose a state; returns (http status, orchestration result)."""
    state = {"type": state_type, "state_details": details}
    if name is not None:
        state["name"] = name
    if data is not None:
        state["data"] = data
    if message is not None:
        state["message"] = message
    status, result = client.post(f"/{kind}_runs/{run_id}/set_state", {"state": state, "force": force})
    assert status in (200, 201), (status, result)
    return status, result


def flow_state(client, run_id, state_type, **kw):
    return propose(client, "flow", run_id, state_type, **kw)


def task_state(client, run_id, state_type, **kw):
    return propose(client, "task", run_id, state_type, **kw)


def read(client, kind, run_id):
    return client.ok("GET", f"/{kind}_runs/{run_id}")


def states_of(client, kind, run_id):
    return client.ok("GET", f"/{kind}_run_states/?{kind}_run_id={run_id}")


def running_flow_run(client, **fields):
    run = new_flow_run(client, **fields)
    status, result = flow_state(client, run["id"], "RUNNING")
    assert (status, result["status"]) == (201, "ACCEPT"), result
    return read(client, "flow", run["id"])


def running_task_run(client, flow_run_id, **fields):
    task = new_task_run(client, flow_run_id, **fields)
    status, result = task_state(client, task["id"], "RUNNING")
    assert (status, result["status"]) == (201, "ACCEPT"), result
    return read(client, "task", task["id"])


def assert_accepted(status, result, state_type):
    assert result["status"] == "ACCEPT", result
    assert result["details"]["type"] == "accept_details", result
    assert status == 201, (status, result)
    assert result["state"]["type"] == state_type, result


def assert_aborted(status, result):
    assert result["status"] == "ABORT", result
    assert result["details"]["type"] == "abort_details", result
    assert result["details"].get("reason"), result
    assert status == 200, (status, result)


def assert_waiting(status, result):
    assert result["status"] == "WAIT", result
    assert result["details"]["type"] == "wait_details", result
    assert status == 200, (status, result)
    return result["details"]["delay_seconds"]


def assert_rejected_unchanged(status, result, state_type, reason):
    """A REJECT that keeps the run's current state (nothing written: 200, as Prefect answers)."""
    assert (status, result["status"], result["details"]["reason"]) == (200, "REJECT", reason), (status, result)
    assert result["state"]["type"] == state_type, result


def assert_rejected_into(status, result, state_type, name, reason):
    assert result["status"] == "REJECT", result
    assert result["details"]["type"] == "reject_details", result
    assert result["details"]["reason"] == reason, result
    assert status == 201, (status, result)
    assert result["state"]["type"] == state_type, result
    assert result["state"]["name"] == name, result


# --- accept ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flow", "task"])
def test_accepted_transition_is_stored_as_the_current_state(client, kind):
    flow_run = new_flow_run(client)
    if kind == "task":
        flow_state(client, flow_run["id"], "RUNNING")
        run = new_task_run(client, flow_run["id"])
    else:
        run = flow_run
    assert run["state_type"] == "PENDING" and run["state"]["name"] == "Pending"

    status, result = propose(client, kind, run["id"], "RUNNING", message="off we go")
    assert_accepted(status, result, "RUNNING")
    assert result["state"]["name"] == "Running"
    assert result["state"]["message"] == "off we go"
    assert result["state"]["state_details"][f"{kind}_run_id"] == run["id"]

    after = read(client, kind, run["id"])
    assert after["state_type"] == "RUNNING" and after["state_name"] == "Running"
    assert after["state"]["id"] == result["state"]["id"]
    assert [s["type"] for s in states_of(client, kind, run["id"])] == ["PENDING", "RUNNING"]


def test_accepted_state_keeps_the_proposed_name_and_data(client):
    run = running_flow_run(client)
    data = {"type": "reference", "storage_key": "/tmp/result-1", "serializer_type": "pickle"}
    status, result = flow_state(client, run["id"], "COMPLETED", name="AllDone", data=data)
    assert_accepted(status, result, "COMPLETED")
    assert result["state"]["name"] == "AllDone"
    assert result["state"]["data"] == data
    stored = client.ok("GET", f"/flow_run_states/{result['state']['id']}")
    assert stored["data"] == data and stored["name"] == "AllDone"


def test_a_scheduled_state_without_a_time_is_scheduled_for_its_own_timestamp(client):
    """As in Prefect (its State model fills it in): a SCHEDULED state sent without state_details.scheduled_time
    is scheduled for the state's timestamp. It was left without one, and so was the run's
    next_scheduled_start_time: no worker polling its queue was ever offered it."""
    created = new_flow_run(client, state={"type": "SCHEDULED"})
    assert created["state"]["state_details"]["scheduled_time"] == created["state"]["timestamp"]
    assert created["next_scheduled_start_time"] == created["state"]["timestamp"]
    run = new_flow_run(client)
    status, result = flow_state(client, run["id"], "SCHEDULED")
    assert_accepted(status, result, "SCHEDULED")
    state = result["state"]
    assert state["state_details"]["scheduled_time"] == state["timestamp"]
    assert read(client, "flow", run["id"])["next_scheduled_start_time"] == state["timestamp"]


@pytest.mark.parametrize("kind", ["flow", "task"])
def test_set_state_of_unknown_run_is_404(client, kind):
    status, body = client.post(f"/{kind}_runs/{uuid.uuid4()}/set_state", {"state": {"type": "RUNNING"}})
    assert status == 404, body


# --- no duplicate PENDING ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flow", "task"])
@pytest.mark.parametrize("current", ["PENDING", "RUNNING", "CANCELLING", "CANCELLED"])
def test_pending_is_aborted_from_pending_running_cancelling_and_cancelled(client, kind, current):
    flow_run = running_flow_run(client)
    run = flow_run if kind == "flow" else new_task_run(client, flow_run["id"])
    propose(client, kind, run["id"], current, force=True)
    before = states_of(client, kind, run["id"])

    status, result = propose(client, kind, run["id"], "PENDING")
    assert_aborted(status, result)
    assert read(client, kind, run["id"])["state_type"] == current
    assert len(states_of(client, kind, run["id"])) == len(before)


@pytest.mark.parametrize("terminal", ["COMPLETED", "FAILED", "CRASHED"])
@pytest.mark.parametrize("proposed", ["RUNNING", "PENDING", "COMPLETED", "FAILED"])
def test_a_terminal_flow_run_may_be_run_again(client, terminal, proposed):
    """As Prefect's HandleFlowTerminalStateTransitions lets it (a parent flow's retry runs its finished subflows
    again: the 3.x SDK proposes RUNNING for them, which was aborted as "already terminated"); leaving for a
    non-final state forgets the run's pauses."""
    flow_run = running_flow_run(client)
    propose(client, "flow", flow_run["id"], terminal, force=True)
    status, result = flow_state(client, flow_run["id"], proposed)
    assert_accepted(status, result, proposed)
    if proposed in ("RUNNING", "PENDING"):
        policy = read(client, "flow", flow_run["id"])["empirical_policy"]
        assert (policy["resuming"], policy["pause_keys"], policy["retry_type"]) == (False, [], None)


@pytest.mark.parametrize(
    "terminal, proposed",
    [
        (terminal, proposed)
        for terminal in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
        for proposed in ("RUNNING", "PENDING", "COMPLETED", "FAILED")
        if (terminal, proposed)
        != ("CANCELLED", "PENDING")  # see test_pending_is_aborted_from_pending_running_cancelling_and_cancelled
    ],
)
def test_a_terminal_task_run_may_be_run_again(client, terminal, proposed):
    """As Prefect's HandleTaskTerminalStateTransitions lets it (2.20 and 3.x): a flow's retry runs its finished
    tasks again, and a 2.20 task called inside a background task completes the outer task's run first (without
    a result), then the outer task's own Completed follows. Leaving for a non-final state resets the retries."""
    flow_run = running_flow_run(client)
    task = running_task_run(client, flow_run["id"])
    propose(client, "task", task["id"], terminal, force=True)
    status, result = task_state(client, task["id"], proposed)
    assert_accepted(status, result, proposed)
    expected_count = {"RUNNING": 1, "PENDING": 0}.get(proposed, 1)
    assert read(client, "task", task["id"])["run_count"] == expected_count


def test_a_completed_task_run_with_a_persisted_result_stays_completed(client):
    flow_run = running_flow_run(client)
    task = running_task_run(client, flow_run["id"])
    persisted = {"type": "reference", "serializer_type": "json", "storage_block_id": None, "storage_key": "k"}
    propose(client, "task", task["id"], "COMPLETED", data=persisted, force=True)
    status, result = task_state(client, task["id"], "RUNNING")
    assert result["status"] == "REJECT" and result["state"]["type"] == "COMPLETED", result
    assert result["details"]["reason"] == "This run is already completed."
    assert read(client, "task", task["id"])["state_type"] == "COMPLETED"


def test_a_completed_flow_run_with_a_persisted_result_stays_completed(client):
    flow_run = running_flow_run(client)
    persisted = {"type": "reference", "serializer_type": "json", "storage_block_id": None, "storage_key": "k"}
    propose(client, "flow", flow_run["id"], "COMPLETED", data=persisted, force=True)
    status, result = flow_state(client, flow_run["id"], "RUNNING")
    assert result["status"] == "REJECT" and result["state"]["type"] == "COMPLETED", result
    assert result["details"]["reason"] == "Run is already COMPLETED."
    assert read(client, "flow", flow_run["id"])["state_type"] == "COMPLETED"
    unpersisted = {"type": "unpersisted"}
    assert flow_state(client, flow_run["id"], "COMPLETED", data=unpersisted)[1]["status"] == "REJECT"


@pytest.mark.parametrize("terminal", TERMINAL)
def test_a_terminal_flow_run_without_a_deployment_cannot_be_rescheduled(client, terminal):
    flow_run = running_flow_run(client)
    propose(client, "flow", flow_run["id"], terminal, force=True)
    status, result = flow_state(client, flow_run["id"], "SCHEDULED", scheduled_time=iso(now()))
    assert_aborted(status, result)
    assert result["details"]["reason"] == "Cannot reschedule a run without an associated deployment."


def test_pending_is_accepted_from_scheduled(client):
    run = new_flow_run(client, state={"type": "SCHEDULED", "state_details": {"scheduled_time": iso(now())}})
    status, result = flow_state(client, run["id"], "PENDING")
    assert_accepted(status, result, "PENDING")


# --- terminal states ---------------------------------------------------------------------------

# A run may leave a terminal state for another (test_a_terminal_flow_run_may_be_run_again,
# test_a_terminal_task_run_may_be_run_again), not for these.
LEAVING_TERMINAL = [(kind, proposed) for kind in ("flow", "task") for proposed in ("PAUSED", "CANCELLING", "CRASHED")]


@pytest.mark.parametrize("kind, proposed", LEAVING_TERMINAL)
@pytest.mark.parametrize("terminal", TERMINAL)
def test_terminal_states_cannot_be_left(client, kind, terminal, proposed):
    flow_run = running_flow_run(client)
    run = flow_run if kind == "flow" else running_task_run(client, flow_run["id"])
    propose(client, kind, run["id"], terminal, force=True)
    before = states_of(client, kind, run["id"])

    status, result = propose(client, kind, run["id"], proposed)
    assert_aborted(status, result)
    after = read(client, kind, run["id"])
    assert after["state_type"] == terminal
    assert len(states_of(client, kind, run["id"])) == len(before)


@pytest.mark.parametrize("kind", ["flow", "task"])
@pytest.mark.parametrize("terminal", TERMINAL)
def test_terminal_state_may_go_back_to_scheduled_for_a_retry(client, kind, terminal):
    """(A flow run only with a deployment: test_a_terminal_flow_run_without_a_deployment_cannot_be_rescheduled.)"""
    flow = new_flow(client)
    deployment = client.ok("POST", "/deployments/", {"name": f"dep-{uuid.uuid4().hex[:8]}", "flow_id": flow["id"]})
    flow_run = running_flow_run(client, flow_id=flow["id"], deployment_id=deployment["id"])
    run = flow_run if kind == "flow" else running_task_run(client, flow_run["id"])
    propose(client, kind, run["id"], terminal, force=True)

    status, result = propose(client, kind, run["id"], "SCHEDULED", name="AwaitingRetry", scheduled_time=iso(now()))
    assert_accepted(status, result, "SCHEDULED")
    after = read(client, kind, run["id"])
    assert after["state_type"] == "SCHEDULED"
    assert after["end_time"] is None  # no longer finished


@pytest.mark.parametrize("kind", ["flow", "task"])
@pytest.mark.parametrize("terminal", TERMINAL)
def test_force_leaves_a_terminal_state(client, kind, terminal):
    flow_run = running_flow_run(client)
    run = flow_run if kind == "flow" else running_task_run(client, flow_run["id"])
    propose(client, kind, run["id"], terminal, force=True)

    status, result = propose(client, kind, run["id"], "RUNNING", force=True)
    assert_accepted(status, result, "RUNNING")
    assert read(client, kind, run["id"])["state_type"] == "RUNNING"


def test_force_skips_every_rule(client):
    # pausing a PENDING flow run is refused without force and accepted with it
    run = new_flow_run(client)
    status, result = flow_state(client, run["id"], "PAUSED")
    assert result["status"] == "REJECT" and result["state"]["type"] == "PENDING", result
    status, result = flow_state(client, run["id"], "PAUSED", force=True)
    assert_accepted(status, result, "PAUSED")


# --- duplicate transition ids ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flow", "task"])
def test_a_repeated_transition_id_is_rejected(client, kind):
    flow_run = running_flow_run(client)
    run = flow_run if kind == "flow" else running_task_run(client, flow_run["id"])
    transition = str(uuid.uuid4())

    status, first = propose(client, kind, run["id"], "COMPLETED", transition_id=transition, force=False)
    assert_accepted(status, first, "COMPLETED")
    count = len(states_of(client, kind, run["id"]))

    status, again = propose(client, kind, run["id"], "COMPLETED", transition_id=transition)
    assert again["status"] == "REJECT", again
    assert again["details"]["type"] == "reject_details"
    assert "already" in again["details"]["reason"]
    assert status == 200, (status, again)  # nothing new was written
    assert again["state"]["id"] == first["state"]["id"]
    assert len(states_of(client, kind, run["id"])) == count


def test_a_different_transition_id_is_not_a_duplicate(client):
    run = running_flow_run(client)
    status, first = flow_state(client, run["id"], "RUNNING", transition_id=str(uuid.uuid4()))
    assert_accepted(status, first, "RUNNING")
    status, second = flow_state(client, run["id"], "RUNNING", transition_id=str(uuid.uuid4()))
    assert_accepted(status, second, "RUNNING")
    assert second["state"]["id"] != first["state"]["id"]


# --- waiting for the scheduled time ------------------------------------------------------------


def test_running_before_the_scheduled_time_waits(client):
    scheduled = now() + dt.timedelta(seconds=100)
    run = new_flow_run(client, state={"type": "SCHEDULED", "state_details": {"scheduled_time": iso(scheduled)}})
    before = states_of(client, "flow", run["id"])

    status, result = flow_state(client, run["id"], "RUNNING")
    delay = assert_waiting(status, result)
    assert result["details"]["reason"] == "Scheduled time is in the future"
    assert isinstance(delay, (int, float)) and 95 <= delay <= 101, delay
    assert read(client, "flow", run["id"])["state_type"] == "SCHEDULED"
    assert len(states_of(client, "flow", run["id"])) == len(before)


def test_pending_copies_the_scheduled_time_and_running_still_waits(client):
    scheduled = now() + dt.timedelta(seconds=100)
    run = new_flow_run(client, state={"type": "SCHEDULED", "state_details": {"scheduled_time": iso(scheduled)}})
    status, result = flow_state(client, run["id"], "PENDING")
    assert_accepted(status, result, "PENDING")
    assert parse(result["state"]["state_details"]["scheduled_time"]) == scheduled

    status, result = flow_state(client, run["id"], "RUNNING")
    assert 95 <= assert_waiting(status, result) <= 101


def test_running_after_the_scheduled_time_is_accepted(client):
    scheduled = now() - dt.timedelta(seconds=5)
    run = new_flow_run(client, state={"type": "SCHEDULED", "state_details": {"scheduled_time": iso(scheduled)}})
    status, result = flow_state(client, run["id"], "RUNNING")
    assert_accepted(status, result, "RUNNING")


def test_task_run_scheduled_in_the_future_waits(client):
    flow_run = running_flow_run(client)
    scheduled = now() + dt.timedelta(seconds=60)
    task = new_task_run(
        client, flow_run["id"], state={"type": "SCHEDULED", "state_details": {"scheduled_time": iso(scheduled)}}
    )
    status, result = task_state(client, task["id"], "RUNNING")
    assert 55 <= assert_waiting(status, result) <= 61


# --- task retries ------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [1e12, 10**400, [1e15, 5]], ids=["1e12", "10**400", "list"])
def test_a_retry_delay_past_the_calendar_waits_a_century_not_a_500(client, delay):
    """A retry scheduled 1e12 s ahead would fall after the year 9999 (a 500 before): it waits the
    longest delay there is, about a century."""
    flow_delay = max(delay) if isinstance(delay, list) else delay  # a flow run's is one delay (Prefect's int)
    flow_run = running_flow_run(client, empirical_policy={"retries": 2, "retry_delay": flow_delay})
    task = running_task_run(client, flow_run["id"], empirical_policy={"retries": 2, "retry_delay": delay})
    for kind, run_id in (("task", task["id"]), ("flow", flow_run["id"])):
        status, result = propose(client, kind, run_id, "FAILED")
        assert_rejected_into(status, result, "SCHEDULED", "AwaitingRetry", "Retrying")
        retry_at = parse(result["state"]["state_details"]["scheduled_time"])
        wait = (retry_at - parse(result["state"]["timestamp"])).total_seconds()
        assert wait == pytest.approx(prefectlite._LONGEST_RETRY_DELAY, abs=1), wait


def test_task_retries_follow_the_empirical_policy(client):
    flow_run = running_flow_run(client)
    task = new_task_run(client, flow_run["id"], empirical_policy={"retries": 2, "retry_delay": 1})

    for attempt in (1, 2):
        status, result = task_state(client, task["id"], "RUNNING")
        assert_accepted(status, result, "RUNNING")
        assert result["state"]["name"] == ("Running" if attempt == 1 else "Retrying")
        assert read(client, "task", task["id"])["run_count"] == attempt

        status, result = task_state(client, task["id"], "FAILED", message=f"boom {attempt}")
        assert_rejected_into(status, result, "SCHEDULED", "AwaitingRetry", "Retrying")
        retry_at = parse(result["state"]["state_details"]["scheduled_time"])
        offset = (retry_at - parse(result["state"]["timestamp"])).total_seconds()
        assert abs(offset - 1.0) < 0.1, offset  # now + retry_delay
        stored = read(client, "task", task["id"])
        assert (stored["state_type"], stored["state_name"]) == ("SCHEDULED", "AwaitingRetry")

        status, result = task_state(client, task["id"], "RUNNING")  # too early
        assert assert_waiting(status, result) == 1
        assert result["details"]["reason"] == "Scheduled time is in the future"
        assert read(client, "task", task["id"])["state_name"] == "AwaitingRetry"

        sleep_until(retry_at)

    status, result = task_state(client, task["id"], "RUNNING")
    assert_accepted(status, result, "RUNNING")
    assert result["state"]["name"] == "Retrying"
    assert read(client, "task", task["id"])["run_count"] == 3

    status, result = task_state(client, task["id"], "FAILED")  # retries used up
    assert_accepted(status, result, "FAILED")
    final = read(client, "task", task["id"])
    assert final["state_type"] == "FAILED" and final["run_count"] == 3
    assert final["end_time"] is not None
    names = [(s["type"], s["name"]) for s in states_of(client, "task", task["id"])]
    assert names == [
        ("PENDING", "Pending"),
        ("RUNNING", "Running"),
        ("SCHEDULED", "AwaitingRetry"),
        ("RUNNING", "Retrying"),
        ("SCHEDULED", "AwaitingRetry"),
        ("RUNNING", "Retrying"),
        ("FAILED", "Failed"),
    ]


def test_task_without_retries_fails_at_once(client):
    flow_run = running_flow_run(client)
    task = running_task_run(client, flow_run["id"])
    status, result = task_state(client, task["id"], "FAILED")
    assert_accepted(status, result, "FAILED")


def test_task_failure_marked_not_retriable_is_not_retried(client):
    flow_run = running_flow_run(client)
    task = running_task_run(client, flow_run["id"], empirical_policy={"retries": 3, "retry_delay": 0})
    status, result = task_state(client, task["id"], "FAILED", retriable=False)
    assert_accepted(status, result, "FAILED")


def test_retry_keeps_the_message_of_the_failure(client):
    flow_run = running_flow_run(client)
    task = running_task_run(client, flow_run["id"], empirical_policy={"retries": 1, "retry_delay": 0})
    status, result = task_state(client, task["id"], "FAILED", message="division by zero")
    assert_rejected_into(status, result, "SCHEDULED", "AwaitingRetry", "Retrying")
    assert result["state"]["message"] == "division by zero"


# --- flow retries ------------------------------------------------------------------------------


def test_flow_retries_reschedule_the_flow_and_its_failed_tasks(client):
    flow_run = running_flow_run(client, empirical_policy={"retries": 1, "retry_delay": 0})
    failed_task = running_task_run(client, flow_run["id"])
    assert_accepted(*task_state(client, failed_task["id"], "FAILED"), "FAILED")
    good_task = running_task_run(client, flow_run["id"])
    assert_accepted(*task_state(client, good_task["id"], "COMPLETED"), "COMPLETED")

    status, result = flow_state(client, flow_run["id"], "FAILED")
    assert_rejected_into(status, result, "SCHEDULED", "AwaitingRetry", "Retrying")
    run = read(client, "flow", flow_run["id"])
    assert (run["state_type"], run["state_name"]) == ("SCHEDULED", "AwaitingRetry")

    retried = read(client, "task", failed_task["id"])
    assert (retried["state_type"], retried["state_name"]) == ("SCHEDULED", "AwaitingRetry")
    untouched = read(client, "task", good_task["id"])
    assert untouched["state_type"] == "COMPLETED"

    status, result = flow_state(client, flow_run["id"], "RUNNING")
    assert_accepted(status, result, "RUNNING")
    assert result["state"]["name"] == "Running"  # Prefect renames retried task runs only
    assert read(client, "flow", flow_run["id"])["run_count"] == 2

    # the failed task runs again, within the second flow run attempt
    status, result = task_state(client, failed_task["id"], "RUNNING")
    assert_accepted(status, result, "RUNNING")
    assert read(client, "task", failed_task["id"])["flow_run_run_count"] == 2

    status, result = flow_state(client, flow_run["id"], "FAILED")  # retries used up
    assert_accepted(status, result, "FAILED")
    final = read(client, "flow", flow_run["id"])
    assert final["state_type"] == "FAILED" and final["run_count"] == 2


def test_a_3x_clients_flow_retry_leaves_its_failed_task_runs_be(client):
    """A 3.x client's flow retry makes new task runs (reported by events): the failed ones of the first attempt
    stay Failed (they were put back to AwaitingRetry, as for 2.x clients, and stayed there for good)."""
    flow_run = running_flow_run(client, empirical_policy={"retries": 1, "retry_delay": 0})
    failed_task = running_task_run(client, flow_run["id"])
    assert_accepted(*task_state(client, failed_task["id"], "FAILED"), "FAILED")
    status, result = client.post(
        f"/flow_runs/{flow_run['id']}/set_state",
        {"state": {"type": "FAILED"}},
        headers={"User-Agent": "prefect/3.9.1 (API 0.8.4)"},
    )
    assert_rejected_into(status, result, "SCHEDULED", "AwaitingRetry", "Retrying")
    assert read(client, "task", failed_task["id"])["state_type"] == "FAILED"


def test_a_task_that_used_up_its_retries_has_them_again_on_the_flows_next_attempt(client):
    """Prefect resets a task run's run count when it leaves a terminal state: on the flow's second
    attempt, a task that exhausted its retries fails into AwaitingRetry again (was: accepted as FAILED,
    so the flow failed where Prefect's succeeds)."""
    flow_run = running_flow_run(client, empirical_policy={"retries": 1, "retry_delay": 0})
    task = new_task_run(client, flow_run["id"], empirical_policy={"retries": 1, "retry_delay": 0})
    for attempt in (1, 2):
        assert_accepted(*task_state(client, task["id"], "RUNNING"), "RUNNING")
        status, result = task_state(client, task["id"], "FAILED")
        if attempt == 1:
            assert_rejected_into(status, result, "SCHEDULED", "AwaitingRetry", "Retrying")
    assert_accepted(status, result, "FAILED")
    assert read(client, "task", task["id"])["run_count"] == 2

    assert_rejected_into(*flow_state(client, flow_run["id"], "FAILED"), "SCHEDULED", "AwaitingRetry", "Retrying")
    assert read(client, "task", task["id"])["run_count"] == 0
    assert_accepted(*flow_state(client, flow_run["id"], "RUNNING"), "RUNNING")
    status, result = task_state(client, task["id"], "RUNNING")
    assert_accepted(status, result, "RUNNING")
    assert read(client, "task", task["id"])["run_count"] == 1
    assert_rejected_into(*task_state(client, task["id"], "FAILED"), "SCHEDULED", "AwaitingRetry", "Retrying")


@pytest.mark.parametrize("terminal", TERMINAL)
def test_a_task_leaving_a_terminal_state_starts_its_run_count_afresh(client, terminal):
    flow_run = running_flow_run(client)
    task = running_task_run(client, flow_run["id"], empirical_policy={"retries": 1, "retry_delay": 0})
    propose(client, "task", task["id"], terminal, force=True)
    assert read(client, "task", task["id"])["run_count"] == 1
    assert_accepted(
        *task_state(client, task["id"], "SCHEDULED", name="AwaitingRetry", scheduled_time=iso(now())), "SCHEDULED"
    )
    assert read(client, "task", task["id"])["run_count"] == 0


def test_a_flow_failure_marked_not_retriable_is_retried_all_the_same(client):
    """The 3.9 SDK sends every failed flow state with retriable=false; Prefect checks that for task runs
    only, so @flow(retries=N) retries (it never did with the 3.9 SDK here)."""
    run = running_flow_run(client, empirical_policy={"retries": 1, "retry_delay": 0})
    status, result = flow_state(client, run["id"], "FAILED", retriable=False)
    assert_rejected_into(status, result, "SCHEDULED", "AwaitingRetry", "Retrying")


# --- subflows ----------------------------------------------------------------------------------


def test_a_subflows_states_name_its_parent_task_run(client):
    """Prefect fills state_details.task_run_id of a subflow run's states with its parent_task_run_id;
    the 2.20 SDK reads a subflow's result through it (it asked for GET /task_runs/None here)."""
    parent = running_flow_run(client)
    stand_in = running_task_run(client, parent["id"])
    child = new_flow_run(client, parent_task_run_id=stand_in["id"])
    assert child["state"]["state_details"]["task_run_id"] == stand_in["id"]
    for state_type in ("RUNNING", "COMPLETED"):
        status, result = flow_state(client, child["id"], state_type)
        assert_accepted(status, result, state_type)
        assert result["state"]["state_details"]["task_run_id"] == stand_in["id"]
        assert result["state"]["state_details"]["flow_run_id"] == child["id"]
    assert {s["state_details"]["task_run_id"] for s in states_of(client, "flow", child["id"])} == {stand_in["id"]}
    assert read(client, "flow", parent["id"])["state"]["state_details"]["task_run_id"] is None
    mirrored = read(client, "task", stand_in["id"])["state"]
    assert (mirrored["type"], mirrored["state_details"]["child_flow_run_id"]) == ("COMPLETED", child["id"])


def test_flow_without_retries_fails_at_once(client):
    run = running_flow_run(client)
    assert_accepted(*flow_state(client, run["id"], "FAILED"), "FAILED")


# --- task caching ------------------------------------------------------------------------------


def completed_with_cache(client, cache_key, expiration, data=None):
    flow_run = running_flow_run(client)
    task = running_task_run(client, flow_run["id"])
    data = data or {"type": "reference", "storage_key": f"/results/{uuid.uuid4().hex}", "serializer_type": "json"}
    status, result = task_state(
        client,
        task["id"],
        "COMPLETED",
        data=data,
        cache_key=cache_key,
        cache_expiration=iso(expiration) if expiration else None,
    )
    assert_accepted(status, result, "COMPLETED")
    return task, data


def test_a_cached_completed_state_is_reused_by_a_later_task_run(client):
    key = f"cache-{uuid.uuid4().hex}"
    expiration = now() + dt.timedelta(hours=1)
    original, data = completed_with_cache(client, key, expiration)

    other_flow_run = running_flow_run(client)  # caching works across flow runs
    task = new_task_run(client, other_flow_run["id"])
    status, result = task_state(client, task["id"], "RUNNING", cache_key=key)
    assert_rejected_into(status, result, "COMPLETED", "Cached", "Retrieved state from cache")
    assert result["state"]["data"] == data
    assert result["state"]["state_details"]["cache_key"] == key
    assert parse(result["state"]["state_details"]["cache_expiration"]) == expiration

    stored = read(client, "task", task["id"])
    assert (stored["state_type"], stored["state_name"]) == ("COMPLETED", "Cached")
    assert stored["state"]["data"] == data
    assert read(client, "task", original["id"])["state_name"] == "Completed"


def test_a_cache_key_without_expiration_never_expires(client):
    key = f"cache-{uuid.uuid4().hex}"
    _, data = completed_with_cache(client, key, None)
    flow_run = running_flow_run(client)
    task = new_task_run(client, flow_run["id"])
    status, result = task_state(client, task["id"], "RUNNING", cache_key=key)
    assert_rejected_into(status, result, "COMPLETED", "Cached", "Retrieved state from cache")
    assert result["state"]["data"] == data


def test_an_unknown_cache_key_runs_the_task(client):
    completed_with_cache(client, f"cache-{uuid.uuid4().hex}", now() + dt.timedelta(hours=1))
    flow_run = running_flow_run(client)
    task = new_task_run(client, flow_run["id"])
    status, result = task_state(client, task["id"], "RUNNING", cache_key=f"other-{uuid.uuid4().hex}")
    assert_accepted(status, result, "RUNNING")


def test_an_expired_cache_entry_is_not_used(client):
    key = f"cache-{uuid.uuid4().hex}"
    completed_with_cache(client, key, now() - dt.timedelta(seconds=1))
    flow_run = running_flow_run(client)
    task = new_task_run(client, flow_run["id"])
    status, result = task_state(client, task["id"], "RUNNING", cache_key=key)
    assert_accepted(status, result, "RUNNING")


def test_refresh_cache_runs_the_task_anyway(client):
    key = f"cache-{uuid.uuid4().hex}"
    completed_with_cache(client, key, now() + dt.timedelta(hours=1))
    flow_run = running_flow_run(client)
    task = new_task_run(client, flow_run["id"])
    status, result = task_state(client, task["id"], "RUNNING", cache_key=key, refresh_cache=True)
    assert_accepted(status, result, "RUNNING")


def test_the_newest_cache_entry_wins(client):
    key = f"cache-{uuid.uuid4().hex}"
    completed_with_cache(client, key, now() + dt.timedelta(hours=1), data={"value": "old"})
    completed_with_cache(client, key, now() + dt.timedelta(hours=1), data={"value": "new"})
    flow_run = running_flow_run(client)
    task = new_task_run(client, flow_run["id"])
    status, result = task_state(client, task["id"], "RUNNING", cache_key=key)
    assert result["state"]["data"] == {"value": "new"}, result


# --- tasks inside flows that are not running ---------------------------------------------------


@pytest.mark.parametrize("flow_state_type", ["PENDING", "SCHEDULED", "COMPLETED", "FAILED", "CANCELLED", "CANCELLING"])
def test_a_task_may_not_run_in_a_flow_that_is_not_running(client, flow_state_type):
    flow_run = new_flow_run(client)
    task = new_task_run(client, flow_run["id"])
    if flow_state_type != "PENDING":
        flow_state(
            client,
            flow_run["id"],
            flow_state_type,
            force=True,
            **({"scheduled_time": iso(now())} if flow_state_type == "SCHEDULED" else {}),
        )
    status, result = task_state(client, task["id"], "RUNNING")
    assert_aborted(status, result)
    assert "flow must be running" in result["details"]["reason"]
    assert read(client, "task", task["id"])["state_type"] == "PENDING"


def test_a_task_in_a_paused_flow_is_put_in_paused_not_ready(client):
    flow_run = running_flow_run(client)
    task = new_task_run(client, flow_run["id"])
    assert_accepted(*flow_state(client, flow_run["id"], "PAUSED"), "PAUSED")

    status, result = task_state(client, task["id"], "RUNNING")
    assert_rejected_into(
        status,
        result,
        "PAUSED",
        "NotReady",
        "The flow is paused, new tasks can execute after resuming flow run execution.",
    )
    stored = read(client, "task", task["id"])
    assert (stored["state_type"], stored["state_name"]) == ("PAUSED", "NotReady")


def test_a_task_in_a_flow_paused_for_rescheduling_pauses_the_same_way(client):
    """Its NotReady state carries the flow's pause timeout and reschedule flag: the 2.20 engine ends the
    task's process on a rescheduled pause, and waited for a resume that never came here."""
    flow_run = running_deployment_run(client)
    task = new_task_run(client, flow_run["id"])
    timeout = iso(now() + dt.timedelta(hours=1))
    assert_accepted(
        *flow_state(client, flow_run["id"], "PAUSED", pause_reschedule=True, pause_timeout=timeout), "PAUSED"
    )
    status, result = task_state(client, task["id"], "RUNNING")
    assert_rejected_into(
        status,
        result,
        "PAUSED",
        "NotReady",
        "The flow is paused, new tasks can execute after resuming flow run execution.",
    )
    details = result["state"]["state_details"]
    assert (
        details["pause_reschedule"] is True
        and details["pause_timeout"] == read(client, "flow", flow_run["id"])["state"]["state_details"]["pause_timeout"]
    )


def test_a_task_run_running_again_is_rerunning(client):
    """Prefect's RenameReruns: RUNNING proposed for a task run that has run already (not back from
    AwaitingRetry, nor leaving a terminal state) is named "Rerunning". The 2.20 SDK does that when a task
    called inside a background task reuses the outer task's run."""
    status, task = client.post("/task_runs/", {"task_key": "outer", "dynamic_key": "0"})
    assert status == 201, task
    first = task_state(client, task["id"], "RUNNING")
    assert_accepted(*first, "RUNNING")
    assert first[1]["state"]["name"] == "Running"
    again = task_state(client, task["id"], "RUNNING")
    assert_accepted(*again, "RUNNING")
    assert again[1]["state"]["name"] == "Rerunning"
    assert read(client, "task", task["id"])["state_name"] == "Rerunning"
    assert_accepted(*task_state(client, task["id"], "COMPLETED"), "COMPLETED")
    rerun = task_state(client, task["id"], "RUNNING")  # leaving a terminal state starts the count afresh
    assert_accepted(*rerun, "RUNNING")
    assert rerun[1]["state"]["name"] == "Running"


def test_a_flow_run_running_again_keeps_its_name(client):
    """RenameReruns is a task-run rule only (in Prefect 2.20 and 3.x)."""
    run = running_flow_run(client)
    status, result = flow_state(client, run["id"], "RUNNING")
    assert result["state"]["name"] == "Running", result


def test_a_task_without_a_flow_run_may_run(client):
    status, task = client.post("/task_runs/", {"task_key": "free", "dynamic_key": "0"})
    assert status == 201, task
    status, result = task_state(client, task["id"], "RUNNING")
    assert_accepted(status, result, "RUNNING")


# --- pausing and resuming ----------------------------------------------------------------------


@pytest.mark.parametrize("current", ["PENDING", "SCHEDULED", "PAUSED"])
def test_only_a_running_flow_may_pause(client, current):
    """As Prefect: the pause is rejected and the run keeps its state."""
    run = new_flow_run(client)
    if current == "SCHEDULED":
        flow_state(client, run["id"], "SCHEDULED", force=True, scheduled_time=iso(now()))
    elif current == "PAUSED":
        flow_state(client, run["id"], "RUNNING")
        assert_accepted(*flow_state(client, run["id"], "PAUSED"), "PAUSED")
    before = read(client, "flow", run["id"])["state"]
    status, result = flow_state(client, run["id"], "PAUSED")
    assert_rejected_unchanged(status, result, current, "Cannot pause flows that are not currently running.")
    assert read(client, "flow", run["id"])["state"]["id"] == before["id"]


def test_a_running_flow_pauses(client):
    run = running_flow_run(client)
    status, result = flow_state(client, run["id"], "PAUSED", pause_key="first")
    assert_accepted(status, result, "PAUSED")
    assert read(client, "flow", run["id"])["state_type"] == "PAUSED"


def test_a_pause_key_fires_only_once(client):
    run = running_flow_run(client)
    assert_accepted(*flow_state(client, run["id"], "PAUSED", pause_key="approval"), "PAUSED")
    status, result = client.post(f"/flow_runs/{run['id']}/resume", {})
    assert_accepted(status, result, "RUNNING")

    # Rejected into RUNNING (it was aborted here): the SDK then carries on past the pause, so a resumed
    # flow that passes the same pause_flow_run(key=...) again runs its remaining tasks
    status, result = flow_state(client, run["id"], "PAUSED", pause_key="approval")
    assert_rejected_unchanged(status, result, "RUNNING", "This pause has already fired.")
    assert read(client, "flow", run["id"])["state_type"] == "RUNNING"

    assert_accepted(*flow_state(client, run["id"], "PAUSED", pause_key="another"), "PAUSED")


@pytest.mark.parametrize("parent", [False, True])
def test_only_a_deployments_top_level_run_may_be_suspended(client, parent):
    """suspend_flow_run() proposes Paused "Suspended" with pause_reschedule: nothing could reschedule a run
    without a deployment, nor a subflow (Prefect aborts both; both were accepted here)."""
    flow_run = running_flow_run(client)
    task = new_task_run(client, flow_run["id"]) if parent else None
    run = running_flow_run(client, parent_task_run_id=task["id"]) if parent else flow_run
    status, result = flow_state(client, run["id"], "PAUSED", name="Suspended", pause_reschedule=True)
    assert_aborted(status, result)
    expected = "Cannot suspend subflows." if parent else "Cannot suspend flows without a deployment."
    assert result["details"]["reason"] == expected
    assert read(client, "flow", run["id"])["state_type"] == "RUNNING"


def running_deployment_run(client):
    dep = client.ok("POST", "/deployments/", {"name": "suspendable", "flow_id": new_flow(client)["id"]})
    run = client.ok("POST", f"/deployments/{dep['id']}/create_flow_run", {})
    assert_accepted(*flow_state(client, run["id"], "RUNNING"), "RUNNING")
    return run


def test_a_suspended_deployment_run_is_paused(client):
    run = running_deployment_run(client)
    status, result = flow_state(client, run["id"], "PAUSED", name="Suspended", pause_reschedule=True)
    assert_accepted(status, result, "PAUSED")


def test_a_flow_failed_after_its_pause_timed_out_takes_its_own_failed_state(client):
    """A sync flow blocked in pause_flow_run() polls every 10 s; the pause-expiration service fails the
    run meanwhile, then the flow proposes Failed itself. Prefect accepts it; it was aborted here ("it has
    already terminated") and the SDK raised Abort instead of returning the Failed state."""
    run = running_flow_run(client)
    flow_state(client, run["id"], "FAILED", force=True, message="The flow was paused and never resumed.")
    status, result = flow_state(client, run["id"], "FAILED", message="Flow run was paused and never resumed.")
    assert_accepted(status, result, "FAILED")
    assert read(client, "flow", run["id"])["state"]["message"] == "Flow run was paused and never resumed."


def test_a_flow_whose_pause_timed_out_proposing_failed_gets_a_failed_state_without_its_result(client):
    """A flow blocked in a pause that timed out raises FlowPauseTimeout and proposes its Failed while still
    Paused: Prefect answers with a Failed state of its own (no result), so the SDK raises FailedRun. The
    proposal was accepted here with the exception as its result, which the SDK raised instead."""
    run = running_flow_run(client)
    past = iso(now() - dt.timedelta(seconds=1))
    assert_accepted(*flow_state(client, run["id"], "PAUSED", pause_timeout=past), "PAUSED")
    data = {"type": "unpersisted"}
    status, result = flow_state(client, run["id"], "FAILED", data=data, message="FlowPauseTimeout")
    assert_rejected_into(
        status, result, "FAILED", "Failed", "The flow run pause has timed out and can no longer resume."
    )
    assert result["state"]["message"] == "The flow was failed and never resumed."
    assert result["state"]["data"] is None
    assert read(client, "flow", run["id"])["state"]["message"] == "The flow was failed and never resumed."


def test_resume_of_a_run_that_is_not_paused_aborts(client):
    run = running_flow_run(client)
    status, result = client.post(f"/flow_runs/{run['id']}/resume", {})
    assert_aborted(status, result)
    assert read(client, "flow", run["id"])["state_type"] == "RUNNING"


def test_resume_of_an_unknown_run_is_404(client):
    status, body = client.post(f"/flow_runs/{uuid.uuid4()}/resume", {})
    assert status == 404, body


def test_resume_puts_a_paused_run_back_to_running(client):
    run = running_flow_run(client)
    flow_state(client, run["id"], "PAUSED", pause_timeout=iso(now() + dt.timedelta(hours=1)))
    status, result = client.post(f"/flow_runs/{run['id']}/resume", {})
    assert_accepted(status, result, "RUNNING")
    assert read(client, "flow", run["id"])["state_type"] == "RUNNING"


def test_resume_of_a_run_paused_with_reschedule_schedules_it(client):
    run = running_deployment_run(client)  # only those may be suspended
    flow_state(client, run["id"], "PAUSED", pause_reschedule=True, pause_timeout=iso(now() + dt.timedelta(hours=1)))
    status, result = client.post(f"/flow_runs/{run['id']}/resume", {})
    assert_accepted(status, result, "SCHEDULED")
    assert result["state"]["name"] == "Resuming"
    stored = read(client, "flow", run["id"])
    assert (stored["state_type"], stored["state_name"]) == ("SCHEDULED", "Resuming")


def test_resume_after_the_pause_timed_out_fails_the_run(client):
    run = running_flow_run(client)
    timeout = now() + dt.timedelta(seconds=0.5)
    assert_accepted(*flow_state(client, run["id"], "PAUSED", pause_timeout=iso(timeout)), "PAUSED")
    sleep_until(timeout)
    status, result = client.post(f"/flow_runs/{run['id']}/resume", {})
    assert result["state"]["type"] == "FAILED", result
    assert status == 201, (status, result)
    assert read(client, "flow", run["id"])["state_type"] == "FAILED"


# --- flow run inputs (send_input / receive_input, pause_flow_run(wait_for_input=...)) -----------------


def _paused_for_input(client, schema):
    """A run paused as the SDK pauses for input: its schema stored under the keyset's schema key."""
    run = running_flow_run(client)
    keyset = {"description": "paused-1-description", "response": "paused-1-response", "schema": "paused-1-schema"}
    if schema is not None:
        client.ok("POST", f"/flow_runs/{run['id']}/input", {"key": "paused-1-schema", "value": schema}, expect=(201,))
    flow_state(client, run["id"], "PAUSED", pause_timeout=iso(now() + dt.timedelta(hours=1)), run_input_keyset=keyset)
    return run


def test_flow_run_inputs_are_created_once_filtered_by_exact_prefix_read_as_text_and_deleted(client):
    run = running_flow_run(client)
    base = f"/flow_runs/{run['id']}/input"
    for key, value, sender in (("greeting-1", '"hello"', "me"), ("greeting-2", '"again"', None), ("other", "42", None)):
        assert client.post(base, {"key": key, "value": value, "sender": sender}) == (201, None)
    status, body = client.post(base, {"key": "greeting-1", "value": "x"})
    assert status == 409 and body["detail"] == "A flow run input with this key already exists."
    assert client.post(f"/flow_runs/{uuid.uuid4()}/input", {"key": "k", "value": "x"})[0] == 404
    status, body = client.post(base, {"key": "Not_Allowed", "value": "x"})
    assert status == 422 and body["exception_detail"][0]["loc"] == ["body", "key"], body

    found = client.ok("POST", f"{base}/filter", {"prefix": "greeting-", "limit": 5}, expect=(200,))
    assert [(i["key"], i["value"], i["sender"]) for i in found] == [
        ("greeting-1", '"hello"', "me"),
        ("greeting-2", '"again"', None),
    ]
    assert {"id", "created", "updated", "flow_run_id"} <= set(found[0]) and found[0]["flow_run_id"] == run["id"]
    assert [i["key"] for i in client.ok("POST", f"{base}/filter", {"prefix": "greeting-"}, expect=(200,))] == [
        "greeting-1"
    ]
    assert [
        i["key"]
        for i in client.ok(
            "POST", f"{base}/filter", {"prefix": "greeting-", "limit": 5, "exclude_keys": ["greeting-1"]}, expect=(200,)
        )
    ] == ["greeting-2"]
    for literal in ("GREETING-", "greeting_", "%"):  # exact: neither case-folded nor a LIKE pattern
        assert client.ok("POST", f"{base}/filter", {"prefix": literal, "limit": 5}, expect=(200,)) == []

    with urllib.request.urlopen(client.api_url + f"{base}/greeting-1") as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        assert answer.read() == b'"hello"'  # the stored text itself, not a JSON string of it
    assert client.request("DELETE", f"{base}/greeting-1")[0] == 204
    assert client.get(f"{base}/greeting-1") == (404, {"detail": "Flow run input not found"})
    assert client.request("DELETE", f"{base}/greeting-1")[0] == 404
    assert client.request("DELETE", f"/flow_runs/{run['id']}")[0] == 204  # inputs go with their run
    assert client.ok("POST", f"{base}/filter", {"prefix": "", "limit": 5}, expect=(200,)) == []


def test_resume_with_input_is_checked_against_the_stored_schema_and_the_answer_stored(client):
    schema = '{"type": "object", "properties": {"approved": {"type": "boolean"}}, "required": ["approved"]}'
    run = _paused_for_input(client, schema)
    status, result = client.post(f"/flow_runs/{run['id']}/resume", {"run_input": {"approved": "yes"}})
    assert result["status"] == "REJECT" and result["state"]["type"] == "PAUSED", result
    assert (
        result["details"]["reason"].startswith("Reason: 'yes' is not valid")
        and "boolean" in result["details"]["reason"]
    )
    status, result = client.post(f"/flow_runs/{run['id']}/resume", {})  # awaited input is required
    assert result["details"]["reason"] == "Reason: 'approved' is a required property", result
    assert read(client, "flow", run["id"])["state_type"] == "PAUSED"
    status, result = client.post(f"/flow_runs/{run['id']}/resume", {"run_input": {"approved": True}})
    assert_accepted(status, result, "RUNNING")
    assert client.get(f"/flow_runs/{run['id']}/input/paused-1-response") == (200, {"approved": True})


@pytest.mark.parametrize(
    "schema, reason", [(None, "Run input schema not found."), ("not json", "Run input schema is not valid JSON.")]
)
def test_resume_with_input_needs_a_readable_schema(client, schema, reason):
    run = _paused_for_input(client, schema)
    status, result = client.post(f"/flow_runs/{run['id']}/resume", {"run_input": {"approved": True}})
    assert (result["status"], result["details"]["reason"]) == ("REJECT", reason), result
    assert read(client, "flow", run["id"])["state_type"] == "PAUSED"


def test_resume_of_a_run_not_waiting_for_input_ignores_an_input(client):
    run = running_flow_run(client)
    flow_state(client, run["id"], "PAUSED", pause_timeout=iso(now() + dt.timedelta(hours=1)))
    assert_accepted(*client.post(f"/flow_runs/{run['id']}/resume", {"run_input": {"approved": True}}), "RUNNING")
    assert client.ok("POST", f"/flow_runs/{run['id']}/input/filter", {"prefix": "", "limit": 5}, expect=(200,)) == []


def test_a_timed_out_pause_cannot_be_left_for_running(client):
    run = running_flow_run(client)
    timeout = now() + dt.timedelta(seconds=0.5)
    flow_state(client, run["id"], "PAUSED", pause_timeout=iso(timeout))
    sleep_until(timeout)
    status, result = flow_state(client, run["id"], "RUNNING")
    assert result["status"] == "REJECT", result
    assert result["state"]["type"] == "FAILED", result
    assert read(client, "flow", run["id"])["state_type"] == "FAILED"


# --- cancellation ------------------------------------------------------------------------------


def test_cancelling_then_cancelled_is_accepted(client):
    run = running_flow_run(client)
    assert_accepted(*flow_state(client, run["id"], "CANCELLING"), "CANCELLING")
    assert read(client, "flow", run["id"])["end_time"] is None
    status, result = flow_state(client, run["id"], "CANCELLED")
    assert_accepted(status, result, "CANCELLED")
    stored = read(client, "flow", run["id"])
    assert stored["state_type"] == "CANCELLED"
    assert parse(stored["end_time"]) == parse(result["state"]["timestamp"])


def test_a_cancelling_task_run_is_cancelled(client):
    flow_run = running_flow_run(client)
    task = running_task_run(client, flow_run["id"])
    assert_accepted(*task_state(client, task["id"], "CANCELLING"), "CANCELLING")
    assert_accepted(*task_state(client, task["id"], "CANCELLED"), "CANCELLED")


# --- tag concurrency limits --------------------------------------------------------------------


def _has_route(method, path):
    return any(m == method and p == path for m, p, _ in prefectlite.ROUTES)


def set_tag_limit(client, db_url, tag, limit):
    if _has_route("POST", "/concurrency_limits/"):
        client.ok("POST", "/concurrency_limits/", {"tag": tag, "concurrency_limit": limit})
        return
    db = prefectlite.open_database(db_url)
    try:
        with db.write() as tx:
            stamp = iso(now())
            tx.execute(
                "INSERT INTO concurrency_limit (id, created, updated, tag, concurrency_limit, active_slots) "
                "VALUES (?, ?, ?, ?, ?, '[]')",
                (str(uuid.uuid4()), stamp, stamp, tag, limit),
            )
    finally:
        db.close()


def active_slots(client, db_url, tag):
    if _has_route("GET", "/concurrency_limits/tag/{tag}"):
        return client.ok("GET", f"/concurrency_limits/tag/{tag}")["active_slots"]
    import json

    db = prefectlite.open_database(db_url)
    try:
        with db.read() as tx:
            return json.loads(tx.scalar("SELECT active_slots FROM concurrency_limit WHERE tag = ?", (tag,)))
    finally:
        db.close()


@pytest.fixture
def db_url(server, tmp_path):
    return f"sqlite:///{tmp_path}/test.db"  # the database the `server` fixture serves


def test_a_tag_limit_of_one_makes_the_second_task_wait(client, db_url):
    set_tag_limit(client, db_url, "db", 1)
    flow_run = running_flow_run(client)
    first = new_task_run(client, flow_run["id"], tags=["db", "other"])
    second = new_task_run(client, flow_run["id"], tags=["db"])

    assert_accepted(*task_state(client, first["id"], "RUNNING"), "RUNNING")
    assert active_slots(client, db_url, "db") == [first["id"]]

    status, result = task_state(client, second["id"], "RUNNING")
    assert assert_waiting(status, result) == 30
    assert "db" in result["details"]["reason"]
    assert read(client, "task", second["id"])["state_type"] == "PENDING"

    assert_accepted(*task_state(client, first["id"], "COMPLETED"), "COMPLETED")
    assert active_slots(client, db_url, "db") == []

    assert_accepted(*task_state(client, second["id"], "RUNNING"), "RUNNING")
    assert active_slots(client, db_url, "db") == [second["id"]]


def test_a_failed_task_frees_its_slot_too(client, db_url):
    set_tag_limit(client, db_url, "gpu", 1)
    flow_run = running_flow_run(client)
    first = running_task_run(client, flow_run["id"], tags=["gpu"])
    assert_accepted(*task_state(client, first["id"], "FAILED"), "FAILED")
    second = new_task_run(client, flow_run["id"], tags=["gpu"])
    assert_accepted(*task_state(client, second["id"], "RUNNING"), "RUNNING")


def test_a_task_awaiting_retry_gives_its_slot_back(client, db_url):
    set_tag_limit(client, db_url, "api", 1)
    flow_run = running_flow_run(client)
    flaky = running_task_run(client, flow_run["id"], tags=["api"], empirical_policy={"retries": 1, "retry_delay": 0})
    status, result = task_state(client, flaky["id"], "FAILED")
    assert_rejected_into(status, result, "SCHEDULED", "AwaitingRetry", "Retrying")
    assert active_slots(client, db_url, "api") == []
    other = new_task_run(client, flow_run["id"], tags=["api"])
    assert_accepted(*task_state(client, other["id"], "RUNNING"), "RUNNING")
    status, result = task_state(client, flaky["id"], "RUNNING")
    assert assert_waiting(status, result) == 30


def test_a_task_served_from_cache_takes_no_slot(client, db_url):
    set_tag_limit(client, db_url, "cached", 1)
    key = f"cache-{uuid.uuid4().hex}"
    completed_with_cache(client, key, now() + dt.timedelta(hours=1))
    flow_run = running_flow_run(client)
    task = new_task_run(client, flow_run["id"], tags=["cached"])
    status, result = task_state(client, task["id"], "RUNNING", cache_key=key)
    assert result["status"] == "REJECT" and result["state"]["name"] == "Cached", result
    assert active_slots(client, db_url, "cached") == []


def test_a_tag_limit_of_zero_aborts(client, db_url):
    set_tag_limit(client, db_url, "never", 0)
    flow_run = running_flow_run(client)
    task = new_task_run(client, flow_run["id"], tags=["never"])
    status, result = task_state(client, task["id"], "RUNNING")
    assert_aborted(status, result)
    assert "never" in result["details"]["reason"]


def test_tasks_without_the_limited_tag_are_not_limited(client, db_url):
    set_tag_limit(client, db_url, "db", 1)
    flow_run = running_flow_run(client)
    running_task_run(client, flow_run["id"], tags=["db"])
    for _ in range(3):
        running_task_run(client, flow_run["id"], tags=["web"])


# --- bookkeeping -------------------------------------------------------------------------------


def test_a_new_flow_run_has_not_started(client):
    run = new_flow_run(client)
    assert run["run_count"] == 0
    assert run["start_time"] is None and run["end_time"] is None
    assert run["total_run_time"] == 0
    assert run["estimated_run_time"] == 0
    assert run["expected_start_time"] is not None


@pytest.mark.parametrize("kind", ["flow", "task"])
def test_a_run_that_ends_before_it_ran_starts_when_it_ends(client, kind):
    """A flow whose parameters fail validation goes Pending -> Failed: Prefect 3 sets its start_time to
    its end_time (it stayed null here); a run that did run keeps its first start."""
    flow_run = running_flow_run(client)
    run = new_task_run(client, flow_run["id"]) if kind == "task" else new_flow_run(client)
    propose(client, kind, run["id"], "PENDING")
    assert_accepted(
        *propose(client, kind, run["id"], "FAILED", message="Validation of flow parameters failed"), "FAILED"
    )
    ended = read(client, kind, run["id"])
    assert ended["start_time"] is not None and ended["start_time"] == ended["end_time"], ended
    assert ended["run_count"] == 0
    started = read(client, "flow", flow_run["id"])["start_time"]
    flow_state(client, flow_run["id"], "COMPLETED")
    assert read(client, "flow", flow_run["id"])["start_time"] == started


@pytest.mark.parametrize("kind", ["flow", "task"])
def test_run_count_start_end_and_run_times(client, kind):
    flow_run = new_flow_run(client)
    if kind == "task":
        flow_state(client, flow_run["id"], "RUNNING")
        run = new_task_run(client, flow_run["id"])
    else:
        run = flow_run

    status, running = propose(client, kind, run["id"], "RUNNING")
    started = read(client, kind, run["id"])
    assert started["run_count"] == 1
    assert parse(started["start_time"]) == parse(running["state"]["timestamp"])
    assert started["end_time"] is None

    time.sleep(0.3)  # by design: run time the server's clock measures (test_rules.py checks it at set times)
    midway = read(client, kind, run["id"])
    assert midway["total_run_time"] == 0  # accumulated only when RUNNING ends
    assert midway["estimated_run_time"] >= 0.3  # but estimated while it runs

    status, done = propose(client, kind, run["id"], "COMPLETED")
    finished = read(client, kind, run["id"])
    assert parse(finished["end_time"]) == parse(done["state"]["timestamp"])
    spent = (parse(done["state"]["timestamp"]) - parse(running["state"]["timestamp"])).total_seconds()
    assert spent >= 0.3
    assert finished["total_run_time"] == pytest.approx(spent, abs=1e-3)
    assert finished["estimated_run_time"] == pytest.approx(finished["total_run_time"], abs=1e-3)
    assert finished["run_count"] == 1
    assert parse(finished["start_time"]) == parse(started["start_time"])


def test_total_run_time_adds_up_over_retries_and_start_time_is_the_first(client):
    run = running_flow_run(client, empirical_policy={"retries": 1, "retry_delay": 0})
    first_start = run["start_time"]
    time.sleep(0.2)  # by design, as the three below: spans of the server's clock, RUNNING or not
    status, retry = flow_state(client, run["id"], "FAILED")
    assert retry["status"] == "REJECT"
    after_first = read(client, "flow", run["id"])
    assert after_first["total_run_time"] >= 0.2
    assert after_first["end_time"] is None  # AwaitingRetry is not final
    time.sleep(0.2)  # time spent SCHEDULED does not count
    flow_state(client, run["id"], "RUNNING")
    time.sleep(0.2)
    flow_state(client, run["id"], "COMPLETED")
    final = read(client, "flow", run["id"])
    assert final["run_count"] == 2
    assert final["start_time"] == first_start
    states = states_of(client, "flow", run["id"])
    running_spans = [
        (parse(b["timestamp"]) - parse(a["timestamp"])).total_seconds()
        for a, b in zip(states, states[1:])
        if a["type"] == "RUNNING"
    ]
    assert len(running_spans) == 2
    assert final["total_run_time"] == pytest.approx(sum(running_spans), abs=1e-3)


def test_expected_and_next_scheduled_start_times(client):
    scheduled = (now() + dt.timedelta(days=1)).replace(microsecond=0)
    run = new_flow_run(client, state={"type": "SCHEDULED", "state_details": {"scheduled_time": iso(scheduled)}})
    assert parse(run["expected_start_time"]) == scheduled
    assert parse(run["next_scheduled_start_time"]) == scheduled

    later = scheduled + dt.timedelta(hours=1)
    flow_state(client, run["id"], "SCHEDULED", force=True, scheduled_time=iso(later))
    moved = read(client, "flow", run["id"])
    assert parse(moved["expected_start_time"]) == later
    assert parse(moved["next_scheduled_start_time"]) == later

    flow_state(client, run["id"], "RUNNING", force=True)
    started = read(client, "flow", run["id"])
    assert started["next_scheduled_start_time"] is None
    assert parse(started["expected_start_time"]) == later  # what was expected stays


def test_a_past_scheduled_time_is_the_expected_start_time(client):
    scheduled = (now() - dt.timedelta(minutes=5)).replace(microsecond=0)
    run = new_flow_run(client, state={"type": "SCHEDULED", "state_details": {"scheduled_time": iso(scheduled)}})
    assert parse(run["expected_start_time"]) == scheduled
    flow_state(client, run["id"], "RUNNING")
    started = read(client, "flow", run["id"])
    assert parse(started["expected_start_time"]) == scheduled
    assert started["estimated_start_time_delta"] >= 299  # it started about five minutes late


def test_task_runs_track_their_flow_runs_run_count(client):
    flow_run = running_flow_run(client, empirical_policy={"retries": 1, "retry_delay": 0})
    first = running_task_run(client, flow_run["id"])
    assert first["flow_run_run_count"] == 1

    flow_state(client, flow_run["id"], "FAILED")  # rejected into AwaitingRetry
    flow_state(client, flow_run["id"], "RUNNING")
    assert read(client, "flow", flow_run["id"])["run_count"] == 2
    second = running_task_run(client, flow_run["id"])
    assert second["flow_run_run_count"] == 2


def test_the_state_fields_of_the_run_follow_the_current_state(client):
    run = running_flow_run(client)
    status, result = flow_state(client, run["id"], "COMPLETED", name="Done")
    stored = read(client, "flow", run["id"])
    assert stored["state_id"] == result["state"]["id"]
    assert stored["state_type"] == "COMPLETED" and stored["state_name"] == "Done"
    assert stored["state"]["id"] == result["state"]["id"]
