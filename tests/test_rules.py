"""The orchestration rules (section 9) as functions, without HTTP: each rule is given a Transition at a
time the test chooses (the rules' clock is `Transition.now`; `orchestrate(..., now=...)` sets it for a
whole proposal), so waits, retries and pause expiry are checked at exact moments, never by sleeping.

The rules that read the database run through `orchestrate` on a real SQLite file; test_orchestration.py
checks the same behaviour end to end through the API and the SDKs.
"""

import datetime as dt
import uuid

import pytest

from helpers import migrated_sqlite_url

import prefectlite
from prefectlite import Transition

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=dt.timezone.utc)


def state(state_type, name=None, **details):
    """A state as stored on a run (what Transition.initial holds)."""
    full = {**prefectlite.STATE_DETAIL_DEFAULTS, **details}
    return {
        "id": str(uuid.uuid4()),
        "type": state_type,
        "name": name or state_type.title(),
        "timestamp": prefectlite.iso(NOW - dt.timedelta(minutes=1)),
        "message": None,
        "data": None,
        "state_details": full,
    }


def proposal(state_type, name=None, **details):
    """A proposed state, as make_state turns a StateCreate into one."""
    body = {"type": state_type, "name": name, "state_details": details}
    return prefectlite.make_state(body, "flow-run-id", None, prefectlite.iso(NOW))


def transition(initial, proposed, kind="flow", now=NOW, **run):
    run = {"id": "run-id", "flow_run_id": "flow-run-id", "run_count": 0, "empirical_policy": {}, **run}
    return Transition(kind, None, run, initial, proposed, now)


def at(seconds):
    return prefectlite.iso(NOW + dt.timedelta(seconds=seconds))


# --- rules that look only at the transition ----------------------------------------------------


@pytest.mark.parametrize(
    "scheduled_in, expected",
    [
        (0.0, None),  # due now: it may run
        (-30.0, None),  # overdue
        (0.25, ("WAIT", 1)),  # a quarter of a second ahead: wait a whole second (the delay is rounded up)
        (90.0, ("WAIT", 90)),
    ],
)
def test_a_run_waits_for_its_scheduled_time(scheduled_in, expected):
    ctx = transition(state("SCHEDULED", scheduled_time=at(scheduled_in)), proposal("RUNNING"))
    outcome = prefectlite.wait_for_scheduled_time(ctx)
    assert (outcome and (outcome.status, outcome.delay_seconds)) == expected


def test_only_a_run_about_to_run_waits_for_its_scheduled_time():
    later = state("SCHEDULED", scheduled_time=at(60))
    assert prefectlite.wait_for_scheduled_time(transition(later, proposal("PENDING"))) is None
    assert prefectlite.wait_for_scheduled_time(transition(later, proposal("CANCELLED"))) is None
    assert prefectlite.wait_for_scheduled_time(transition(state("SCHEDULED"), proposal("RUNNING"))) is None


PERSISTED = {"type": "reference", "serializer_type": "json", "storage_block_id": None, "storage_key": "k"}


@pytest.mark.parametrize(
    "initial, data, proposed, expected",
    [
        ("COMPLETED", None, "RUNNING", None),  # a flow's retry runs its finished task again
        ("COMPLETED", {"type": "unpersisted"}, "COMPLETED", None),  # 2.20: a task called in a background task
        ("COMPLETED", PERSISTED, "RUNNING", "REJECT"),  # its result is kept: it stays as it is
        ("COMPLETED", PERSISTED, "COMPLETED", "REJECT"),
        ("CANCELLED", None, "PENDING", None),
        ("CRASHED", None, "COMPLETED", None),
        ("FAILED", None, "FAILED", None),
        ("COMPLETED", None, "SCHEDULED", None),  # a retry
        ("FAILED", None, "CRASHED", "ABORT"),
        ("COMPLETED", None, "CANCELLING", "ABORT"),
        ("CANCELLED", None, "PAUSED", "ABORT"),
    ],
)
def test_a_task_run_leaves_terminal_states_as_prefect_lets_it(initial, data, proposed, expected):
    """Prefect's HandleTaskTerminalStateTransitions (2.20 and 3.x alike)."""
    left = {**state(initial), "data": data}
    ctx = transition(left, proposal(proposed), kind="task", flow_run_id=None)
    outcome = prefectlite.prevent_leaving_terminal_states(ctx)
    assert (outcome and outcome.status) == expected, outcome
    if expected == "REJECT":
        assert outcome.state is left  # the run stays in its completed state


@pytest.mark.parametrize(
    "initial, proposed, run, expected",
    [
        ("COMPLETED", "RUNNING", {}, None),  # a parent flow's retry runs its finished subflow again
        ("FAILED", "FAILED", {}, None),  # a flow's own Failed after the pause service failed it
        ("COMPLETED", "CANCELLING", {}, "ABORT"),
        ("FAILED", "CRASHED", {}, "ABORT"),
        ("CANCELLED", "PAUSED", {}, "ABORT"),
        ("COMPLETED", "SCHEDULED", {}, "ABORT"),  # no deployment to run it again
        ("COMPLETED", "SCHEDULED", {"deployment_id": "deployment-id"}, None),
    ],
)
def test_a_flow_run_leaves_terminal_states_as_prefect_lets_it(initial, proposed, run, expected):
    outcome = prefectlite.prevent_leaving_terminal_states(transition(state(initial), proposal(proposed), **run))
    assert (outcome and outcome.status) == expected, outcome


def test_a_repeated_transition_id_is_rejected_into_the_current_state():
    initial = state("RUNNING", transition_id="t-1")
    outcome = prefectlite.prevent_duplicate_transition(transition(initial, proposal("RUNNING", transition_id="t-1")))
    assert outcome.status == "REJECT" and outcome.state is initial
    another = transition(initial, proposal("RUNNING", transition_id="t-2"))
    assert prefectlite.prevent_duplicate_transition(another) is None


@pytest.mark.parametrize("initial", ["PENDING", "RUNNING", "CANCELLING", "CANCELLED"])
def test_a_second_submitter_is_turned_away(initial):
    outcome = prefectlite.prevent_pending_transitions(transition(state(initial), proposal("PENDING")))
    assert outcome.status == "ABORT" and initial in outcome.reason


def test_a_named_pending_substate_moves_on_keeping_the_scheduled_time():
    initial = state("PENDING", scheduled_time=at(-5))
    proposed = proposal("PENDING", name="Submitting")
    assert prefectlite.prevent_pending_transitions(transition(initial, proposed)) is None
    assert proposed["state_details"]["scheduled_time"] == at(-5)


@pytest.mark.parametrize("timeout_in, fails", [(-0.001, True), (60.0, False)])
def test_a_pause_that_timed_out_fails_at_exactly_its_timeout(timeout_in, fails):
    paused = state("PAUSED", "Paused", pause_timeout=at(timeout_in))
    outcome = prefectlite.expire_pauses(transition(paused, proposal("RUNNING")))
    assert (outcome is not None) == fails
    if fails:
        assert (outcome.status, outcome.state["type"], outcome.state["timestamp"]) == ("REJECT", "FAILED", at(0))


@pytest.mark.parametrize(
    "policy, run_count, retried_at",
    [
        ({"retries": 2, "retry_delay": 10}, 1, 10.0),
        ({"retries": 2, "retry_delay": [1, 5, 30]}, 2, 5.0),  # a list: one delay per retry
        ({"retries": 2, "retry_delay": 10}, 3, None),  # no retries left
        ({"max_retries": 1, "retry_delay_seconds": 2.5}, 1, 2.5),  # the names of older clients
        ({}, 1, None),
    ],
)
def test_a_failing_task_run_with_retries_left_awaits_its_retry(policy, run_count, retried_at):
    ctx = transition(state("RUNNING"), proposal("FAILED"), kind="task", run_count=run_count, empirical_policy=policy)
    outcome = prefectlite.retry_failed_runs(ctx)
    if retried_at is None:
        assert outcome is None
        return
    assert (outcome.status, outcome.state["type"], outcome.state["name"]) == ("REJECT", "SCHEDULED", "AwaitingRetry")
    assert outcome.state["state_details"]["scheduled_time"] == at(retried_at)  # from the rules' clock


def test_a_task_its_retry_condition_refused_is_not_retried():
    ctx = transition(
        state("RUNNING"), proposal("FAILED", retriable=False), kind="task", run_count=1, empirical_policy={"retries": 3}
    )
    assert prefectlite.retry_failed_runs(ctx) is None


def test_a_task_run_back_from_awaiting_retry_runs_as_retrying():
    proposed = proposal("RUNNING")
    prefectlite.rename_reruns(transition(state("SCHEDULED", "AwaitingRetry"), proposed, kind="task"))
    assert proposed["name"] == "Retrying"


def test_a_cancelling_flow_run_can_only_end_cancelled():
    outcome = prefectlite.only_cancel_cancelling_runs(transition(state("CANCELLING"), proposal("FAILED")))
    assert outcome.status == "REJECT" and outcome.state["type"] == "CANCELLING"
    assert prefectlite.only_cancel_cancelling_runs(transition(state("CANCELLING"), proposal("CANCELLED"))) is None


def test_the_first_rule_with_an_answer_decides():
    """run_rules: rules in order, the first answer wins; none: ACCEPT the (possibly renamed) proposal."""
    initial = state("COMPLETED", transition_id="t-1")
    duplicate = transition(initial, proposal("RUNNING", transition_id="t-1"))
    assert prefectlite.run_rules(duplicate, prefectlite.FLOW_RUN_RULES).status == "REJECT"  # before ABORT
    scheduled = transition(state("SCHEDULED", scheduled_time=at(-1)), proposal("PENDING"))
    outcome = prefectlite.run_rules(scheduled, prefectlite.FLOW_RUN_RULES)
    assert outcome.status == "ACCEPT" and outcome.state["state_details"]["scheduled_time"] == at(-1)


# --- the whole proposal, at a chosen time, on a real database ------------------------------------


@pytest.fixture
def db(tmp_path):
    database = prefectlite.open_database(migrated_sqlite_url(tmp_path / "rules.db"))
    yield database
    database.close()


def new_run(db, first_state):
    with db.write() as tx:
        flow_id = prefectlite.new_id()
        prefectlite.insert_row(
            tx,
            "flow",
            {"id": flow_id, "created": at(-600), "updated": at(-600), "name": f"flow-{flow_id[:8]}", "tags": []},
        )
        values = {
            "id": prefectlite.new_id(),
            "created": at(-600),
            "updated": at(-600),
            "flow_id": flow_id,
            "name": "rules",
            "run_count": 0,
            "total_run_time": 0.0,
            "empirical_policy": {},
        }
        return prefectlite.insert_run_in_state(tx, "flow", values, first_state)


def propose(db, run, state_type, now, **details):
    with db.write() as tx:
        row = prefectlite.read_row(tx, "flow_run", run["id"])
        return prefectlite.orchestrate(tx, "flow", row, {"type": state_type, "state_details": details}, False, now=now)


def test_orchestrate_judges_and_stamps_by_the_time_it_is_given(db):
    run = new_run(db, {"type": "SCHEDULED", "state_details": {"scheduled_time": at(30)}})
    early = propose(db, run, "RUNNING", NOW)
    assert (early.status, early.delay_seconds, early.written) == ("WAIT", 30, False)
    on_time = propose(db, run, "RUNNING", NOW + dt.timedelta(seconds=30))
    assert (on_time.status, on_time.written) == ("ACCEPT", True)
    assert on_time.state["timestamp"] == at(30)
    assert on_time.run["start_time"] == at(30)  # the run's times follow the given clock too


def test_a_paused_flow_run_fails_once_its_pause_timed_out(db):
    run = new_run(db, {"type": "RUNNING"})
    assert propose(db, run, "PAUSED", NOW, pause_timeout=at(60)).status == "ACCEPT"
    before = propose(db, run, "RUNNING", NOW + dt.timedelta(seconds=59))
    assert before.status == "ACCEPT"
    assert propose(db, run, "PAUSED", NOW + dt.timedelta(seconds=60), pause_timeout=at(120)).status == "ACCEPT"
    after = propose(db, run, "RUNNING", NOW + dt.timedelta(seconds=121))
    assert (after.status, after.state["type"], after.written) == ("REJECT", "FAILED", True)


def new_task_run(db, flow_run, first_state, **values):
    with db.write() as tx:
        row = {
            "id": prefectlite.new_id(),
            "created": at(-600),
            "updated": at(-600),
            "flow_run_id": flow_run["id"],
            "name": "task",
            "task_key": "task",
            "dynamic_key": prefectlite.new_id(),
            "run_count": 1,
            "flow_run_run_count": 1,
            "total_run_time": 0.0,
            "empirical_policy": {},
            **values,
        }
        return prefectlite.insert_run_in_state(tx, "task", row, first_state)


def test_a_finished_task_runs_again_as_retrying_on_its_flows_next_attempt_with_its_retries_afresh(db):
    """A flow retried: its task that failed on attempt 1 (retries used up) runs on attempt 2 as "Retrying",
    with its run count reset (Prefect's HandleTaskTerminalStateTransitions)."""
    flow_run = new_run(db, {"type": "RUNNING"})
    with db.write() as tx:
        prefectlite.update_row(tx, "flow_run", flow_run["id"], {"run_count": 2})
    task = new_task_run(db, flow_run, {"type": "FAILED"}, run_count=3)
    with db.write() as tx:
        row = prefectlite.read_row(tx, "task_run", task["id"])
        outcome = prefectlite.orchestrate(tx, "task", row, {"type": "RUNNING", "state_details": {}}, False, now=NOW)
    assert (outcome.status, outcome.state["type"], outcome.state["name"]) == ("ACCEPT", "RUNNING", "Retrying")
    with db.read() as tx:
        assert prefectlite.read_row(tx, "task_run", task["id"])["run_count"] == 1  # reset, then this attempt
