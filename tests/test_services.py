"""The background services: one pass at a time the test chooses (the App's clock, no thread, no HTTP),
and a real server's services observed through its API: the scheduler (Prefect's defaults: at least 3
runs, up to 100, within 100 days, at least an hour ahead), late runs, pause expirations, cancellation
clean-up, two servers sharing one PostgreSQL database, and a clean stop."""

import contextlib
import datetime as dt
import threading

import pytest

import prefectlite
from helpers import T0, TICK, Client, answer, iso, new_flow, now, parse, unique, wait_until

FAST = {
    "PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS": 0.2,
    "PREFECT_API_SERVICES_LATE_RUNS_LOOP_SECONDS": 0.2,
    "PREFECT_API_SERVICES_LATE_RUNS_AFTER_SECONDS": 1,
    "PREFECT_API_SERVICES_PAUSE_EXPIRATIONS_LOOP_SECONDS": 0.2,
    "PREFECT_API_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS": 0.2,
}


# --- helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def running_server(database, **settings):
    """A real server (prefectlite.start_server) whose services a test can watch pass by."""
    overrides = {**FAST, **settings, "PREFECT_API_DATABASE_CONNECTION_URL": database}
    server = prefectlite.start_server(prefectlite.load_settings(overrides=overrides), "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.stop()


def service(server_or_app, cls):
    app = getattr(server_or_app, "app", server_or_app)
    (found,) = [s for s in app.services if isinstance(s, cls)]
    return found


def wait_passes(server, cls, n=3, timeout=20.0):
    """Wait until the service has finished `n` more passes than now."""
    svc = service(server, cls)
    target = svc.passes + n + 1  # +1: the pass under way may have read the database before our change
    svc.wake()
    wait_until(lambda: svc.passes >= target, timeout, f"{n} passes of the {svc.name} service", interval=0.02)
    assert svc.last_error is None, f"the {svc.name} service failed: {svc.last_error}"


@pytest.fixture
def srv(tmp_path):
    with running_server(f"sqlite:///{tmp_path}/services.db") as server:
        yield server


@pytest.fixture
def api(srv):
    return Client(srv.api_url)


def new_deployment(api, schedules, flow_id=None, **fields):
    flow_id = flow_id or new_flow(api)["id"]
    return api.ok(
        "POST", "/deployments/", {"name": unique("dep"), "flow_id": flow_id, "schedules": schedules, **fields}
    )


def runs_of(api, dep_id, state_types=None):
    body = {"deployments": {"id": {"any_": [dep_id]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200}
    if state_types:
        body["flow_runs"] = {"state": {"type": {"any_": state_types}}}
    runs = api.ok("POST", "/flow_runs/filter", body)
    assert all(r["deployment_id"] == dep_id for r in runs)
    return runs


def auto_runs(api, dep_id):
    return [r for r in runs_of(api, dep_id, ["SCHEDULED"]) if r["auto_scheduled"]]


def starts(runs):
    return [parse(r["expected_start_time"]) for r in runs]


def assert_no_duplicates(runs):
    times = [r["expected_start_time"] for r in runs]
    assert len(set(times)) == len(times), f"duplicate scheduled runs: {sorted(times)}"


def set_state(api, run_id, state_type, **details):
    return api.ok(
        "POST",
        f"/flow_runs/{run_id}/set_state",
        {"state": {"type": state_type, "state_details": details}, "force": True},
    )


def get_run(api, run_id):
    return api.ok("GET", f"/flow_runs/{run_id}")


# --- one pass at a chosen time: the App's clock ------------------------------------------------

# The fixtures `clock` (at helpers.T0), `make_app` and `app` (conftest.py): an App whose services never start;
# a test runs one pass at the moment it names (service.run_once(moment)) and asks the App with helpers.answer.


def scheduled_run(app, moment):
    flow = answer(app, "POST", "/flows/", {"name": unique("flow")})
    return answer(
        app,
        "POST",
        "/flow_runs/",
        {
            "flow_id": flow["id"],
            "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": prefectlite.iso(moment)}},
        },
    )


def deployment(app, schedules, **fields):
    flow = answer(app, "POST", "/flows/", {"name": unique("flow")})
    return answer(
        app, "POST", "/deployments/", {"name": unique("dep"), "flow_id": flow["id"], "schedules": schedules, **fields}
    )


def deployment_runs(app, dep_id):
    body = {"deployments": {"id": {"any_": [dep_id]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200}
    return answer(app, "POST", "/flow_runs/filter", body)


def test_a_run_becomes_late_exactly_when_its_time_and_the_setting_have_passed(make_app):
    """Prefect's late-runs service marks a run whose next scheduled start is at or before now - the setting."""
    app = make_app(PREFECT_API_SERVICES_LATE_RUNS_AFTER_SECONDS=600)
    late_runs = service(app, prefectlite.LateRuns)
    due = T0 - dt.timedelta(minutes=10)
    run = scheduled_run(app, due)
    late_runs.run_once(T0 - TICK)
    assert answer(app, "GET", f"/flow_runs/{run['id']}")["state_name"] == "Scheduled", "Late before its time"
    late_runs.run_once(T0)
    late = answer(app, "GET", f"/flow_runs/{run['id']}")
    assert (late["state_type"], late["state_name"]) == ("SCHEDULED", "Late")
    assert parse(late["state"]["timestamp"]) == T0, "the Late state is stamped with the pass's time"
    assert parse(late["state"]["state_details"]["scheduled_time"]) == due
    late_runs.run_once(T0 + dt.timedelta(hours=1))
    history = answer(app, "GET", f"/flow_run_states/?flow_run_id={run['id']}")
    assert [s["name"] for s in history].count("Late") == 1, "a Late run is not marked again"


def test_a_deployment_turns_not_ready_when_its_last_poll_is_older_than_the_setting(app, clock):
    """Readiness is derived from last_polled at the App's clock's time (Prefect's foreman's setting)."""
    timeout = dt.timedelta(seconds=app.settings["PREFECT_API_SERVICES_FOREMAN_DEPLOYMENT_LAST_POLLED_TIMEOUT_SECONDS"])
    dep = deployment(app, [])

    def status():
        (listed,) = answer(app, "POST", "/deployments/filter", {"deployments": {"id": {"any_": [dep["id"]]}}})
        read = answer(app, "GET", f"/deployments/{dep['id']}")
        assert listed["status"] == read["status"]
        return read["status"]

    assert status() == "NOT_READY", "never polled"
    answer(app, "POST", "/deployments/get_scheduled_flow_runs", {"deployment_ids": [dep["id"]]})  # a runner polls
    assert parse(answer(app, "GET", f"/deployments/{dep['id']}")["last_polled"]) == T0
    assert status() == "READY"
    clock.moment = T0 + timeout
    assert status() == "READY"
    clock.moment = T0 + timeout + TICK
    assert status() == "NOT_READY"
    answer(app, "POST", "/deployments/get_scheduled_flow_runs", {"deployment_ids": [dep["id"]]})
    assert status() == "READY", "a poll makes it ready again"


def test_an_expired_pause_fails_the_run_only_after_its_timeout(app):
    pauses = service(app, prefectlite.PauseExpirations)
    flow = answer(app, "POST", "/flows/", {"name": unique("flow")})
    run = answer(app, "POST", "/flow_runs/", {"flow_id": flow["id"]})
    for state_type, details in (("RUNNING", {}), ("PAUSED", {"pause_timeout": prefectlite.iso(T0), "pause_key": "p"})):
        answer(
            app,
            "POST",
            f"/flow_runs/{run['id']}/set_state",
            {"state": {"type": state_type, "state_details": details}, "force": True},
        )
    pauses.run_once(T0)
    assert answer(app, "GET", f"/flow_runs/{run['id']}")["state_type"] == "PAUSED", "failed at its timeout"
    pauses.run_once(T0 + TICK)
    failed = answer(app, "GET", f"/flow_runs/{run['id']}")
    assert failed["state_type"] == "FAILED" and parse(failed["state"]["timestamp"]) == T0 + TICK


def test_a_services_loop_hands_each_pass_the_apps_clock(app, clock):
    """The thread asks the App's clock, not the machine's: a run due in 2030 is Late once the clock says
    it is past then."""
    late_runs = service(app, prefectlite.LateRuns)
    run = scheduled_run(app, T0)
    clock.moment = T0 + dt.timedelta(hours=1)
    late_runs.start()
    try:
        wait_until(
            lambda: answer(app, "GET", f"/flow_runs/{run['id']}")["state_name"] == "Late",
            what="the late-runs thread's pass",
        )
    finally:
        late_runs.stop()


# --- the scheduler -----------------------------------------------------------------------------


def test_the_scheduler_fills_the_days_after_its_now(make_app):
    """From the pass's time: every fire time within the minimum scheduled time (here 5 days) ahead."""
    app = make_app(PREFECT_API_SERVICES_SCHEDULER_MIN_SCHEDULED_TIME=5 * 86400)
    scheduler = service(app, prefectlite.Scheduler)
    dep = deployment(app, [{"schedule": {"cron": "0 4 * * *", "timezone": "UTC"}}], parameters={"x": 1})
    scheduler.run_once(T0)
    days = [T0.replace(hour=4, minute=0) + dt.timedelta(days=d) for d in range(1, 6)]  # 06-02 ... 06-06 04:00
    runs = deployment_runs(app, dep["id"])
    assert starts(runs) == days
    assert all(r["auto_scheduled"] and r["parameters"] == {"x": 1} and r["state_name"] == "Scheduled" for r in runs)
    assert scheduler.created == 5
    scheduler.run_once(T0)
    assert scheduler.created == 0, "a second pass at the same time makes nothing"
    scheduler.run_once(T0 + dt.timedelta(days=1))  # a day later: the sixth day is within reach
    assert starts(deployment_runs(app, dep["id"])) == [*days, days[-1] + dt.timedelta(days=1)]
    assert scheduler.created == 1


def test_an_interval_schedule_is_filled_exactly_an_hour_ahead(app):
    """Prefect's defaults: at least 3 runs and at least an hour ahead; 10-minute runs on the grid anchored
    at 2020-01-01: from 12:05, 12:10 through 13:00 (13:05 is past the hour), six runs."""
    scheduler = service(app, prefectlite.Scheduler)
    dep = deployment(app, [{"schedule": {"interval": 600}}], parameters={"x": 1}, tags=["nightly"])
    scheduler.run_once(T0)
    runs = deployment_runs(app, dep["id"])
    assert starts(runs) == [T0.replace(minute=10) + dt.timedelta(minutes=10 * i) for i in range(6)]
    for run in runs:
        assert run["state_type"] == "SCHEDULED" and run["state_name"] == "Scheduled"
        assert run["flow_id"] == dep["flow_id"]
        assert run["parameters"] == {"x": 1}
        assert "nightly" in run["tags"]
        assert run["auto_scheduled"] is True
        assert parse(run["state"]["state_details"]["scheduled_time"]) == parse(run["expected_start_time"])
        assert parse(run["next_scheduled_start_time"]) == parse(run["expected_start_time"])


def test_a_daily_cron_gets_three_runs(app):
    scheduler = service(app, prefectlite.Scheduler)
    dep = deployment(app, [{"schedule": {"cron": "0 4 * * *", "timezone": "UTC"}}])
    scheduler.run_once(T0)
    assert starts(deployment_runs(app, dep["id"])) == [
        T0.replace(hour=4, minute=0) + dt.timedelta(days=d) for d in (1, 2, 3)
    ]


def test_an_rrule_with_count_two_gets_two_runs(app):
    scheduler = service(app, prefectlite.Scheduler)
    start = T0 + dt.timedelta(days=1)
    dep = deployment(
        app, [{"schedule": {"rrule": f"DTSTART:{start.strftime('%Y%m%dT%H%M%SZ')}\nRRULE:FREQ=DAILY;COUNT=2"}}]
    )
    scheduler.run_once(T0)
    assert starts(deployment_runs(app, dep["id"])) == [start, start + dt.timedelta(days=1)]


def test_a_schedule_starting_beyond_100_days_gets_no_runs(app):
    scheduler = service(app, prefectlite.Scheduler)
    far = T0 + dt.timedelta(days=100, seconds=1)
    dep = deployment(app, [{"schedule": {"rrule": f"DTSTART:{far.strftime('%Y%m%dT%H%M%SZ')}\nRRULE:FREQ=DAILY"}}])
    scheduler.run_once(T0)
    assert deployment_runs(app, dep["id"]) == []
    scheduler.run_once(T0 + dt.timedelta(seconds=2))  # less than 100 days ahead now: in reach
    assert starts(deployment_runs(app, dep["id"])) == [far]


def test_the_scheduler_is_idempotent(app):
    scheduler = service(app, prefectlite.Scheduler)
    flow = answer(app, "POST", "/flows/", {"name": unique("flow")})
    deps = [
        answer(
            app,
            "POST",
            "/deployments/",
            {
                "name": unique("dep"),
                "flow_id": flow["id"],
                "schedules": [{"schedule": {"interval": 600}}, {"schedule": {"cron": "5 4 * * *"}}],
            },
        )
        for _ in range(3)
    ]
    scheduler.run_once(T0)
    first = {d["id"]: deployment_runs(app, d["id"]) for d in deps}
    assert all(len(runs) == 6 + 3 for runs in first.values())  # the interval's hour, the daily cron's 3
    for _ in range(2):
        scheduler.run_once(T0)
        assert scheduler.created == 0
    assert {d["id"]: deployment_runs(app, d["id"]) for d in deps} == first


def test_coinciding_schedules_make_one_run_per_moment(app):
    """Prefect keys a scheduled run by deployment and moment, so two schedules firing at the same time
    make one run, not two."""
    scheduler = service(app, prefectlite.Scheduler)
    dep = deployment(app, [{"schedule": {"interval": 600}}, {"schedule": {"cron": "0,30 * * * *"}}])
    scheduler.run_once(T0)
    # 12:10 ... 13:00 every 10 minutes; the cron's 12:30, 13:00 coincide; its third, 13:30, is its own
    expected = [T0.replace(minute=10) + dt.timedelta(minutes=10 * i) for i in range(6)]
    assert starts(deployment_runs(app, dep["id"])) == [*expected, T0.replace(hour=13, minute=30)]


def test_an_inactive_schedule_and_a_paused_deployment_create_nothing(app):
    scheduler = service(app, prefectlite.Scheduler)
    inactive = deployment(app, [{"schedule": {"interval": 600}, "active": False}])
    paused = deployment(app, [{"schedule": {"interval": 600}, "active": True}], paused=True)
    mixed = deployment(
        app, [{"schedule": {"interval": 600}, "active": False}, {"schedule": {"cron": "0 4 * * *"}, "active": True}]
    )
    scheduler.run_once(T0)
    assert deployment_runs(app, inactive["id"]) == []
    assert deployment_runs(app, paused["id"]) == []
    assert starts(deployment_runs(app, mixed["id"])) == [
        T0.replace(hour=4, minute=0) + dt.timedelta(days=d) for d in (1, 2, 3)
    ]


def test_the_scheduler_keeps_at_most_100_runs_and_max_scheduled_runs(app):
    scheduler = service(app, prefectlite.Scheduler)
    every_10s = deployment(app, [{"schedule": {"interval": 10}}])  # an hour of it would be 360 runs
    capped = deployment(app, [{"schedule": {"interval": 600}, "max_scheduled_runs": 4}])  # below the hour's 6
    scheduler.run_once(T0)
    runs = starts(deployment_runs(app, every_10s["id"]))
    assert runs == [T0 + dt.timedelta(seconds=10 * i) for i in range(100)]
    assert len(deployment_runs(app, capped["id"])) == 4


def test_schedule_change_replaces_the_runs_not_yet_started(srv, api):
    dep = new_deployment(api, [{"schedule": {"interval": 600}}])
    wait_until(lambda: len(auto_runs(api, dep["id"])) >= 6, what="runs of the 10-minute schedule")
    first = auto_runs(api, dep["id"])
    # One auto-scheduled run has started, one run was made by hand.
    started = first[0]
    set_state(api, started["id"], "PENDING")
    manual = api.ok(
        "POST",
        f"/deployments/{dep['id']}/create_flow_run",
        {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": iso(now() + dt.timedelta(minutes=7))}}},
    )

    status, body = api.patch(f"/deployments/{dep['id']}", {"schedules": [{"schedule": {"interval": 1800}}]})
    assert status == 204, body

    # One run per deployment and moment (Prefect's idempotency key): when the started run sits on the new
    # grid, it stands for that moment and the scheduler does not make a second run there.
    started_at = parse(started["expected_start_time"])
    on_grid = {started_at} if started_at.minute in (0, 30) and started_at.second == 0 else set()

    def covered(runs):
        return sorted(set(starts(runs)) | on_grid)

    def on_new_grid():
        runs = auto_runs(api, dep["id"])
        times = starts(runs)
        return runs if len(covered(runs)) >= 3 and all(t.minute in (0, 30) for t in times) else None

    wait_until(on_new_grid, what="the 30-minute schedule's runs")
    wait_passes(srv, prefectlite.Scheduler)
    runs = auto_runs(api, dep["id"])
    times = starts(runs)
    assert all(t.minute in (0, 30) and t.second == 0 for t in times), f"runs the new schedule does not want: {times}"
    grid = covered(runs)
    assert all(b - a == dt.timedelta(minutes=30) for a, b in zip(grid, grid[1:])), grid
    assert len(grid) == 3, grid
    assert_no_duplicates(runs)
    old_ids = {r["id"] for r in first[1:]}
    assert not old_ids & {r["id"] for r in runs_of(api, dep["id"])}, "old not-started runs were kept"
    # The started run and the hand-made run are untouched.
    assert get_run(api, started["id"])["state_type"] == "PENDING"
    assert get_run(api, manual["id"])["state_type"] == "SCHEDULED"


def test_deployment_change_regenerates_future_runs(srv, api):
    """Prefect deletes a deployment's auto-scheduled runs on any update, so they carry its new values."""
    dep = new_deployment(api, [{"schedule": {"interval": 600}}], parameters={"x": 1})
    wait_until(lambda: len(auto_runs(api, dep["id"])) >= 6, what="scheduled runs")
    api.ok("PATCH", f"/deployments/{dep['id']}", {"parameters": {"x": 2}})

    def refreshed():
        runs = auto_runs(api, dep["id"])
        return len(runs) >= 6 and all(r["parameters"] == {"x": 2} for r in runs)

    wait_until(refreshed, timeout=10, what="future runs with the deployment's new parameters")


def test_removing_every_schedule_removes_the_future_runs(srv, api):
    dep = new_deployment(api, [{"schedule": {"interval": 600}}])
    wait_until(lambda: auto_runs(api, dep["id"]), what="scheduled runs")
    (schedule,) = api.ok("GET", f"/deployments/{dep['id']}/schedules")
    api.ok("DELETE", f"/deployments/{dep['id']}/schedules/{schedule['id']}")
    wait_passes(srv, prefectlite.Scheduler)
    assert auto_runs(api, dep["id"]) == []


# --- late runs ---------------------------------------------------------------------------------


def test_overdue_scheduled_runs_become_late(srv, api):
    flow = new_flow(api)
    overdue_at = now() - dt.timedelta(seconds=30)
    overdue = api.ok(
        "POST",
        "/flow_runs/",
        {"flow_id": flow["id"], "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": iso(overdue_at)}}},
    )
    future = api.ok(
        "POST",
        "/flow_runs/",
        {
            "flow_id": flow["id"],
            "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": iso(now() + dt.timedelta(hours=1))}},
        },
    )
    pending = api.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "state": {"type": "PENDING"}})

    late = wait_until(
        lambda: (lambda r: r if r["state_name"] == "Late" else None)(get_run(api, overdue["id"])),
        what="the overdue run to be Late",
    )
    assert late["state_type"] == "SCHEDULED", "Late is a SCHEDULED state"
    assert parse(late["state"]["state_details"]["scheduled_time"]) == overdue_at
    assert parse(late["expected_start_time"]) == overdue_at
    wait_passes(srv, prefectlite.LateRuns)
    assert get_run(api, future["id"])["state_name"] == "Scheduled"
    assert get_run(api, pending["id"])["state_type"] == "PENDING"
    history = api.ok("GET", f"/flow_run_states/?flow_run_id={overdue['id']}")
    assert [s["name"] for s in sorted(history, key=lambda s: s["timestamp"])] == ["Scheduled", "Late"]
    # A Late run can still start.
    result = api.ok("POST", f"/flow_runs/{overdue['id']}/set_state", {"state": {"type": "PENDING"}})
    assert result["status"] == "ACCEPT", result


def test_scheduled_deployment_runs_go_late_when_nobody_runs_them(make_app):
    """The scheduler's runs, left alone, go Late one by one as the clock passes their times."""
    app = make_app(PREFECT_API_SERVICES_LATE_RUNS_AFTER_SECONDS=15)
    dep = deployment(app, [{"schedule": {"interval": 60}}])
    service(app, prefectlite.Scheduler).run_once(T0)
    runs = deployment_runs(app, dep["id"])
    assert parse(runs[0]["expected_start_time"]) == T0  # a fire time at the pass's time is made too
    service(app, prefectlite.LateRuns).run_once(T0.replace(minute=7, second=15))  # 12:05 ... 12:07 are 15 s late
    late = [r["state_name"] == "Late" for r in deployment_runs(app, dep["id"])]
    assert late == [True] * 3 + [False] * (len(runs) - 3)


# --- pause expirations -------------------------------------------------------------------------


def test_expired_pause_fails_the_run(srv, api):
    flow = new_flow(api)
    expired = api.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})
    waiting = api.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})
    for run in (expired, waiting):
        set_state(api, run["id"], "RUNNING")
    # A pause_timeout that passed 30 s ago, written with another UTC offset, and one an hour away.
    passed = (now() - dt.timedelta(seconds=30)).astimezone(dt.timezone(dt.timedelta(hours=5)))
    set_state(api, expired["id"], "PAUSED", pause_timeout=iso(passed), pause_key="p1")
    set_state(api, waiting["id"], "PAUSED", pause_timeout=iso(now() + dt.timedelta(hours=1)), pause_key="p1")

    failed = wait_until(
        lambda: (lambda r: r if r["state_type"] == "FAILED" else None)(get_run(api, expired["id"])),
        what="the expired pause to fail",
    )
    assert failed["state_name"] == "Failed"
    assert failed["end_time"] is not None
    wait_passes(srv, prefectlite.PauseExpirations)
    assert get_run(api, waiting["id"])["state_type"] == "PAUSED"


# --- cancellation clean-up ---------------------------------------------------------------------


def test_cancelling_run_without_deployment_ends_cancelled(srv, api):
    flow = new_flow(api)
    run = api.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})
    set_state(api, run["id"], "RUNNING")
    set_state(api, run["id"], "CANCELLING")
    done = wait_until(
        lambda: (lambda r: r if r["state_type"] == "CANCELLED" else None)(get_run(api, run["id"])),
        what="the CANCELLING run to be CANCELLED",
    )
    assert done["state_name"] == "Cancelled" and done["end_time"] is not None

    # A run of a deployment has infrastructure to stop: a worker or runner finishes its cancellation.
    dep = new_deployment(api, [])
    dep_run = api.ok("POST", f"/deployments/{dep['id']}/create_flow_run", {})
    set_state(api, dep_run["id"], "RUNNING")
    set_state(api, dep_run["id"], "CANCELLING")
    wait_passes(srv, prefectlite.CancellationCleanup)
    assert get_run(api, dep_run["id"])["state_type"] == "CANCELLING"


def _subflow(api, parent_id, deployment=None):
    task = api.ok("POST", "/task_runs/", {"flow_run_id": parent_id, "task_key": unique("subflow"), "dynamic_key": "0"})
    body = {"flow_id": new_flow(api)["id"], "parent_task_run_id": task["id"]}
    if deployment:
        child = api.ok("POST", f"/deployments/{deployment['id']}/create_flow_run", {"parent_task_run_id": task["id"]})
    else:
        child = api.ok("POST", "/flow_runs/", body)
    set_state(api, child["id"], "RUNNING")
    return child


def test_subflows_of_a_cancelled_parent_are_cancelled(srv, api):
    flow = new_flow(api)
    parent = api.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})
    set_state(api, parent["id"], "RUNNING")
    child = _subflow(api, parent["id"])
    dep = new_deployment(api, [])
    deployed_child = _subflow(api, parent["id"], deployment=dep)
    finished_child = _subflow(api, parent["id"])
    set_state(api, finished_child["id"], "COMPLETED")
    other = api.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})
    set_state(api, other["id"], "RUNNING")

    set_state(api, parent["id"], "CANCELLED")
    done = wait_until(
        lambda: (lambda r: r if r["state_type"] == "CANCELLED" else None)(get_run(api, child["id"])),
        what="the subflow to be cancelled",
    )
    assert done["state_name"] == "Cancelled"
    # A subflow with a deployment has its own infrastructure: it is asked to cancel.
    wait_until(
        lambda: get_run(api, deployed_child["id"])["state_type"] in ("CANCELLING", "CANCELLED"),
        what="the deployed subflow to be cancelling",
    )
    wait_passes(srv, prefectlite.CancellationCleanup)
    assert get_run(api, finished_child["id"])["state_type"] == "COMPLETED"
    assert get_run(api, other["id"])["state_type"] == "RUNNING"


def test_task_runs_of_a_cancelled_flow_run_are_cancelled(srv, api):
    """Prefect's clean-up also cancels the unfinished task runs of a cancelled flow run."""
    flow = new_flow(api)
    run = api.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})
    set_state(api, run["id"], "RUNNING")
    task = api.ok("POST", "/task_runs/", {"flow_run_id": run["id"], "task_key": "slow", "dynamic_key": "0"})
    api.ok("POST", f"/task_runs/{task['id']}/set_state", {"state": {"type": "RUNNING"}, "force": True})
    set_state(api, run["id"], "CANCELLED")

    def task_cancelled():
        tr = api.ok("GET", f"/task_runs/{task['id']}")
        return tr if tr["state_type"] == "CANCELLED" else None

    wait_until(task_cancelled, timeout=10, what="the task run of the cancelled flow run to be cancelled")


def test_a_cancelling_run_can_only_end_cancelled(srv, api):
    """Prefect's EnforceCancellingToCancelledTransition: while a runner or worker stops a cancelling run, the
    run's own engine reports CRASHED (killed by a signal); that must not win over the cancellation."""
    dep = new_deployment(api, [])
    run = api.ok("POST", f"/deployments/{dep['id']}/create_flow_run", {})
    set_state(api, run["id"], "PENDING")
    set_state(api, run["id"], "RUNNING")
    set_state(api, run["id"], "CANCELLING")
    for proposed in ("CRASHED", "FAILED", "COMPLETED", "RUNNING"):
        result = api.ok("POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": proposed}})
        assert result["status"] != "ACCEPT", (proposed, result)
        assert get_run(api, run["id"])["state_type"] == "CANCELLING", proposed
    result = api.ok("POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": "CANCELLED"}})
    assert result["status"] == "ACCEPT", result
    assert get_run(api, run["id"])["state_type"] == "CANCELLED"


def test_cancelling_a_scheduled_run_without_infrastructure_cancels_it(srv, api):
    """Prefect's BypassCancellingFlowRunsWithNoInfra: nothing runs it yet, so CANCELLING becomes CANCELLED."""
    dep = new_deployment(api, [])
    run = api.ok("POST", f"/deployments/{dep['id']}/create_flow_run", {})
    assert run["state_type"] == "SCHEDULED"
    result = api.ok("POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": "CANCELLING"}})
    assert result["state"]["type"] == "CANCELLED", result
    assert get_run(api, run["id"])["state_type"] == "CANCELLED"


# --- replicas and shutdown ---------------------------------------------------------------------


def test_two_servers_on_one_postgres_make_no_duplicate_runs(postgres_url):
    fast = {"PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS": 0.05}
    with running_server(postgres_url, **fast) as one, running_server(postgres_url, **fast) as two:
        api_one, api_two = Client(one.api_url), Client(two.api_url)
        flow = new_flow(api_one)
        deps = []
        for i in range(4):
            api = api_one if i % 2 else api_two
            deps.append(
                new_deployment(
                    api, [{"schedule": {"interval": 600}}, {"schedule": {"cron": "5 4 * * *"}}], flow_id=flow["id"]
                )
            )
        wait_until(lambda: all(len(auto_runs(api_two, d["id"])) >= 9 for d in deps), what="every deployment's runs")
        for _ in range(3):
            wait_passes(one, prefectlite.Scheduler, n=2)
            wait_passes(two, prefectlite.Scheduler, n=2)
        for dep in deps:
            runs = auto_runs(api_one, dep["id"])
            assert_no_duplicates(runs)
            assert 9 <= len(runs) <= 10, [r["expected_start_time"] for r in runs]
        # Both servers see the same runs.
        assert sorted(r["id"] for r in auto_runs(api_one, deps[0]["id"])) == sorted(
            r["id"] for r in auto_runs(api_two, deps[0]["id"])
        )


def test_services_stop_cleanly_on_shutdown(tmp_path):
    before = set(threading.enumerate())
    with prefectlite.serve(database=f"sqlite:///{tmp_path}/stop.db", port=0, **FAST) as api_url:
        api = Client(api_url)
        new_deployment(api, [{"schedule": {"interval": 60}}])
        started = [t for t in set(threading.enumerate()) - before if t.name.startswith("prefectlite-")]
        names = {t.name for t in started}
        assert {
            "prefectlite-scheduler",
            "prefectlite-late-runs",
            "prefectlite-pause-expirations",
            "prefectlite-cancellation-cleanup",
        } <= names, names
        wait_until(lambda: api.ok("POST", "/flow_runs/count", {}) > 0, what="the scheduler at work")
    alive = [t.name for t in started if t.is_alive()]
    assert alive == [], f"threads still running after the server stopped: {alive}"
    services_left = [
        t.name for t in threading.enumerate() if t not in before and t.is_alive() and t.name.startswith("prefectlite-")
    ]
    assert services_left == [], services_left
