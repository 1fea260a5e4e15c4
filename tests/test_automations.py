"""Automations: the API (as Prefect 2.20 and 3.x serve it), trigger evaluation over stored events, the
automation's own events, the actions and the template renderer.

Real servers on free loopback ports over real SQLite and PostgreSQL; local fake receivers
(tests/fake_receivers.py) stand in for Slack and webhooks. No sleeps: every wait polls with a deadline.
"""

import contextlib
import json
import os
import uuid

import pytest

from fake_receivers import HTTPReceiver
from helpers import Client, event, unique, wait_until

import prefectlite


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("PREFECT"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/automations.db"
    return request.getfixturevalue("postgres_url")


@contextlib.contextmanager
def running(database, **settings):
    options = {
        "PREFECT_NOTIFICATIONS_RETRY_SECONDS": 0.2,
        "PREFECT_API_SERVICES_TRIGGERS_LOOP_SECONDS": 0.5,
        **settings,
    }
    with prefectlite.serve(database=database, port=0, **options) as api:
        yield Client(api)


def reactive(expect, **fields):
    return {"type": "event", "posture": "Reactive", "expect": list(expect), "threshold": 1, "within": 0, **fields}


def automation_body(name=None, trigger=None, actions=None, **fields):
    return {
        "name": name or unique("auto"),
        "description": "",
        "enabled": True,
        "trigger": trigger or reactive(["test.thing.happened"]),
        "actions": actions if actions is not None else [{"type": "do-nothing"}],
        **fields,
    }


def events_named(client, name, resource_id=None):
    flt = {"event": {"name": [name]}}
    if resource_id:
        flt["resource"] = {"id": [resource_id]}
    return client.ok("POST", "/events/filter", {"filter": flt, "limit": 50})["events"]


def test_create_read_update_patch_delete_round_trip(database):
    with running(database) as client:
        body = automation_body(
            name="hello",
            description="world",
            tags=["ops"],
            trigger=reactive(
                ["surely.this", "but.also.this"],
                match={"prefect.resource.name": "howdy!"},
                match_related={"prefect.resource.role": "something-cool"},
                after=["this.one"],
                for_each=["prefect.resource.name"],
                threshold=42,
                within="PT30S",
            ),
        )
        created = client.ok("POST", "/automations/", body, expect=(201,))
        assert created["name"] == "hello" and created["description"] == "world" and created["tags"] == ["ops"]
        trigger = created["trigger"]
        assert trigger["match"] == {"prefect.resource.name": "howdy!"}
        assert trigger["expect"] == ["but.also.this", "surely.this"] and trigger["after"] == ["this.one"]
        assert trigger["within"] == 30.0 and trigger["threshold"] == 42 and trigger["posture"] == "Reactive"
        assert created["actions"] == [{"type": "do-nothing"}]
        read = client.ok("GET", f"/automations/{created['id']}")
        assert read == created

        client.ok("PUT", f"/automations/{created['id']}", {**body, "name": "goodbye"}, expect=(204,))
        assert client.ok("GET", f"/automations/{created['id']}")["name"] == "goodbye"
        client.ok("PATCH", f"/automations/{created['id']}", {"enabled": False}, expect=(204,))
        assert client.ok("GET", f"/automations/{created['id']}")["enabled"] is False

        other = client.ok("POST", "/automations/", automation_body(name="another"), expect=(201,))
        assert client.ok("POST", "/automations/count") == 2
        by_name = client.ok("POST", "/automations/filter", {"automations": {"name": {"any_": ["goodbye"]}}})
        assert [a["id"] for a in by_name] == [created["id"]]
        names = [a["name"] for a in client.ok("POST", "/automations/filter", {"sort": "NAME_DESC"})]
        assert names == ["goodbye", "another"]
        assert len(client.ok("POST", "/automations/filter", {"limit": 1, "offset": 1})) == 1

        client.ok("DELETE", f"/automations/{created['id']}", expect=(204,))
        assert client.get(f"/automations/{created['id']}")[0] == 404
        assert client.delete(f"/automations/{created['id']}")[0] == 404
        assert client.request("PUT", f"/automations/{uuid.uuid4()}", automation_body())[0] == 404
        assert [a["id"] for a in client.ok("POST", "/automations/filter")] == [other["id"]]


def test_owned_and_related_automations(tmp_path):
    with running(f"sqlite:///{tmp_path}/a.db") as client:
        owner = f"prefect.deployment.{uuid.uuid4()}"
        owned = client.ok("POST", "/automations/", automation_body(owner_resource=owner), expect=(201,))
        client.ok("POST", "/automations/", automation_body(), expect=(201,))
        assert [a["id"] for a in client.ok("GET", f"/automations/related-to/{owner}")] == [owned["id"]]
        assert client.request("DELETE", f"/automations/owned-by/{owner}")[0] == 202
        assert client.ok("GET", f"/automations/related-to/{owner}") == []
        assert client.ok("POST", "/automations/count") == 1


# templates the parser once crashed on (RecursionError, ValueError, UnicodeDecodeError): now TemplateErrors
BAD_TEMPLATES = [
    "{{ " + "(" * 1200 + "1" + ")" * 1200 + " }}",
    "{{ " + "not " * 1200 + "x }}",
    "{% if x %}" * 1200 + "{% endif %}" * 1200,
    "{{ " + "9" * 5000 + " }}",
    "{{ '\\x' }}",
    "{{ '\\N' }}",
    "{{ x" + " | upper" * 1200 + " }}",
    "{{ x" + ".y" * 1200 + " }}",
]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"name": None}, ["body", "name"]),
        ({"trigger": {"type": "event", "posture": "Sideways"}}, ["body", "trigger", "posture"]),
        ({"trigger": {"type": "event", "posture": "Proactive", "within": 5}}, ["body", "trigger", "within"]),
        ({"trigger": {"type": "event", "posture": "Reactive", "within": -1}}, ["body", "trigger", "within"]),
        ({"trigger": {"type": "metric", "posture": "Metric"}}, ["body", "trigger", "type"]),
        (
            {"trigger": {"type": "compound", "require": 3, "triggers": [reactive(["a"])]}},
            ["body", "trigger", "require"],
        ),
        ({"actions": [{"type": "launch-rocket"}]}, ["body", "actions", 0, "type"]),
        ({"actions": [{"type": "run-deployment", "source": "selected"}]}, ["body", "actions", 0, "deployment_id"]),
        (
            {"actions": [{"type": "pause-work-pool", "source": "inferred", "work_pool_id": str(uuid.uuid4())}]},
            ["body", "actions", 0, "work_pool_id"],
        ),
        (
            {"actions": [{"type": "send-notification", "block_document_id": str(uuid.uuid4()), "body": "{{ oops"}]},
            ["body", "actions", 0, "body"],
        ),
        (
            {"actions": [{"type": "send-notification", "block_document_id": "not-a-uuid", "body": "hi"}]},
            ["body", "actions", 0, "block_document_id"],
        ),
        ({"colour": "red"}, ["body", "colour"]),
        # windows so long that storing an event the trigger counts would overflow its dates
        ({"trigger": reactive(["a"], within=1e300)}, ["body", "trigger", "within"]),
        ({"trigger": reactive(["a"], within="P99999999D")}, ["body", "trigger", "within"]),
        ({"trigger": {"type": "event", "posture": "Proactive", "within": 1e300}}, ["body", "trigger", "within"]),
        (
            {"trigger": {"type": "compound", "require": "any", "within": 1e300, "triggers": [reactive(["a"])]}},
            ["body", "trigger", "within"],
        ),
        (
            {"trigger": {"type": "sequence", "triggers": [reactive(["a"], within=400 * 86400)]}},
            ["body", "trigger", "triggers", 0, "within"],
        ),
        ({"actions": [{"type": ["x"]}]}, ["body", "actions", 0, "type"]),
        *[
            (
                {"actions": [{"type": "send-notification", "block_document_id": str(uuid.uuid4()), "body": template}]},
                ["body", "actions", 0, "body"],
            )
            for template in BAD_TEMPLATES
        ],
    ],
)
def test_bad_bodies_are_422s_naming_the_field(tmp_path, change, field):
    with running(f"sqlite:///{tmp_path}/a.db") as client:
        body = {k: v for k, v in {**automation_body(), **change}.items() if v is not None}
        status, payload = client.post("/automations/", body)
        assert status == 422, payload
        assert field in [e["loc"] for e in payload["exception_detail"]], payload


@pytest.mark.parametrize(
    "flt, field",
    [
        ({"name": "x"}, ["body", "automations", "name"]),
        ({"created": "x"}, ["body", "automations", "created"]),
        ({"tags": {"all_": 5}}, ["body", "automations", "tags", "all_"]),
        ({"id": []}, ["body", "automations", "id"]),
    ],
)
def test_bad_automation_filters_are_422s_naming_the_field(tmp_path, flt, field):
    with running(f"sqlite:///{tmp_path}/a.db") as client:
        status, payload = client.post("/automations/filter", {"automations": flt})
        assert status == 422, payload
        assert field in [e["loc"] for e in payload["exception_detail"]], payload


def store_directly(url, table, row_id, values):
    """Change a stored row as no API call can now: data stored before a check that now refuses it."""
    db = prefectlite.open_database(url)
    try:
        with db.write() as tx:
            prefectlite.update_row(tx, table, row_id, values)
    finally:
        db.close()


def test_a_bad_stored_automation_never_breaks_event_storage(database):
    with running(database) as client:
        bad = client.ok(
            "POST",
            "/automations/",
            automation_body(trigger=reactive(["go.now", "prefect.flow-run.*"], within=30)),
            expect=(201,),
        )
        good = client.ok("POST", "/automations/", automation_body(trigger=reactive(["go.now"])), expect=(201,))
        store_directly(database, "automation", bad["id"], {"trigger": {**bad["trigger"], "within": 1e300}})
        client.ok("POST", "/events", [event("go.now")])
        client.ok("POST", "/events", [event("go.now")])
        fired = wait_until(
            lambda: (
                len(events_named(client, "prefect.automation.triggered", f"prefect.automation.{good['id']}")) == 2
                or None
            ),
            what="the good automation fired twice",
        )
        assert fired
        assert events_named(client, "prefect.automation.triggered", f"prefect.automation.{bad['id']}") == []
        flow = client.ok("POST", "/flows/", {"name": unique("flow")})
        run = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})
        status, payload = client.post(f"/flow_runs/{run['id']}/set_state", {"state": {"type": "RUNNING"}})
        assert status in (200, 201) and payload["status"] == "ACCEPT", payload


def test_a_bad_stored_proactive_automation_does_not_stop_the_others(tmp_path):
    url = f"sqlite:///{tmp_path}/a.db"
    proactive = {"type": "event", "posture": "Proactive", "expect": ["never.happens"], "threshold": 1, "within": 60}
    with running(url) as client:
        bad = client.ok("POST", "/automations/", automation_body(trigger=proactive), expect=(201,))
        good = client.ok("POST", "/automations/", automation_body(trigger=proactive), expect=(201,))
        store_directly(url, "automation", bad["id"], {"trigger": {**bad["trigger"], "within": 1e300}})
        db = prefectlite.open_database(url)
        try:
            with db.write() as tx:  # both windows ended, the bad one first
                for auto, minutes in ((bad, 2), (good, 1)):
                    tx.execute(
                        "UPDATE automation_bucket SET end_time = ? WHERE automation_id = ?",
                        (
                            prefectlite.iso(prefectlite.utcnow() - prefectlite._dt.timedelta(minutes=minutes)),
                            auto["id"],
                        ),
                    )
        finally:
            db.close()
        wait_until(
            lambda: events_named(client, "prefect.automation.triggered", f"prefect.automation.{good['id']}"),
            what="the good automation's window closed and fired",
        )


def test_an_action_that_fails_unexpectedly_is_recorded_as_failed(tmp_path):
    url = f"sqlite:///{tmp_path}/a.db"
    with running(url) as client:
        auto = client.ok("POST", "/automations/", automation_body(trigger=reactive(["go.now"])), expect=(201,))
        store_directly(url, "automation", auto["id"], {"actions": [{"type": "send-notification"}]})  # no block
        client.ok("POST", "/events", [event("go.now")])
        failed = wait_until(lambda: events_named(client, "prefect.automation.action.failed"), what="the failure")
        assert failed[0]["payload"]["reason"] == "the action failed unexpectedly (KeyError)"
        assert [h["status"] for h in client.ok("GET", f"/automations/{auto['id']}/history")] == ["FAILED"]


def test_an_action_claimed_more_than_the_maximum_attempts_fails(tmp_path):
    """A row left RUNNING (its process ended mid-action) is claimed again when its lease ends, not forever."""
    url = f"sqlite:///{tmp_path}/a.db"
    with running(url, PREFECT_NOTIFICATIONS_MAX_ATTEMPTS=3) as client:
        auto = client.ok("POST", "/automations/", automation_body(trigger=reactive(["go.now"])), expect=(201,))
        client.ok("POST", "/events", [event("go.now")])
        [done] = wait_until(lambda: client.ok("GET", f"/automations/{auto['id']}/history"), what="the action run")
        past = prefectlite.iso(prefectlite.utcnow() - prefectlite._dt.timedelta(minutes=5))
        store_directly(
            url, "automation_action_queue", done["id"], {"status": "RUNNING", "attempts": 3, "next_attempt_at": past}
        )
        failed = wait_until(lambda: events_named(client, "prefect.automation.action.failed"), what="the failure")
        assert failed[0]["payload"]["reason"] == "the action did not finish in 3 attempts"
        assert [h["status"] for h in client.ok("GET", f"/automations/{auto['id']}/history")] == ["FAILED"]


def test_job_variables_need_a_deployment_that_exists(tmp_path):
    """Prefect's server looks the deployment up when a run-deployment action has job variables."""
    with running(f"sqlite:///{tmp_path}/a.db") as client:
        action = {"type": "run-deployment", "source": "selected", "deployment_id": str(uuid.uuid4())}
        assert client.post("/automations/", automation_body(actions=[action]))[0] == 201
        status, payload = client.post("/automations/", automation_body(actions=[{**action, "job_variables": {"a": 1}}]))
        assert (status, payload) == (404, {"detail": "Deployment not found."})


def test_run_deployment_loops_are_refused(tmp_path):
    with running(f"sqlite:///{tmp_path}/a.db") as client:
        body = automation_body(
            trigger=reactive(["prefect.flow-run.Running"]), actions=[{"type": "run-deployment", "source": "inferred"}]
        )
        status, payload = client.post("/automations/", body)
        assert status == 422 and "infinite loop" in json.dumps(payload)


def test_reactive_trigger_fires_on_a_posted_event_and_records_its_events(database):
    with running(database) as client:
        resource = f"test.resource.{uuid.uuid4()}"
        auto = client.ok(
            "POST",
            "/automations/",
            automation_body(trigger=reactive(["test.thing.happened"], match={"prefect.resource.id": resource})),
            expect=(201,),
        )
        client.ok("POST", "/events", [event(resource_id=f"test.resource.{uuid.uuid4()}")])  # not its resource
        client.ok("POST", "/events", [event(resource_id=resource)])
        auto_resource = f"prefect.automation.{auto['id']}"
        triggered = wait_until(
            lambda: events_named(client, "prefect.automation.triggered", auto_resource),
            what="the automation's triggered event",
        )
        assert len(triggered) == 1
        assert triggered[0]["payload"]["triggering_event"]["resource"]["prefect.resource.id"] == resource
        executed = wait_until(
            lambda: events_named(client, "prefect.automation.action.executed", auto_resource), what="the executed event"
        )
        assert executed[0]["payload"]["action_type"] == "do-nothing"
        assert executed[0]["resource"]["prefect.trigger-type"] == "event"
        [action_triggered] = events_named(client, "prefect.automation.action.triggered", auto_resource)
        assert executed[0]["follows"] == action_triggered["id"]
        roles = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in executed[0]["related"]}
        assert roles == {
            "automation-triggered-event": f"prefect.event.{triggered[0]['id']}",
            "triggering-event": f"prefect.event.{triggered[0]['payload']['triggering_event']['id']}",
        }
        history = client.ok("GET", f"/automations/{auto['id']}/history")
        assert [h["status"] for h in history] == ["COMPLETED"]


def test_threshold_within_and_for_each_count_per_key_and_survive_a_restart(tmp_path):
    db = f"sqlite:///{tmp_path}/a.db"
    trigger = reactive(["test.thing.happened"], threshold=3, within=3600, for_each=["prefect.resource.id"])
    a, b = "test.resource.a", "test.resource.b"
    with running(db) as client:
        auto = client.ok("POST", "/automations/", automation_body(trigger=trigger), expect=(201,))
        client.ok("POST", "/events", [event(resource_id=a), event(resource_id=a), event(resource_id=b)])
    with running(db) as client:  # a restart: the half-counted window is remembered
        client.ok("POST", "/events", [event(resource_id=b)])
        assert events_named(client, "prefect.automation.triggered") == []
        client.ok("POST", "/events", [event(resource_id=a)])
        fired = wait_until(lambda: events_named(client, "prefect.automation.triggered"), what="the firing")
        assert [f["payload"]["triggering_labels"] for f in fired] == [{"prefect.resource.id": a}]
        assert fired[0]["resource"]["prefect.resource.id"] == f"prefect.automation.{auto['id']}"


def test_after_opens_the_window_and_disabled_automations_do_not_fire(tmp_path):
    with running(f"sqlite:///{tmp_path}/a.db") as client:
        trigger = reactive(["job.finished"], after=["job.started"], within=3600)
        auto = client.ok("POST", "/automations/", automation_body(trigger=trigger), expect=(201,))
        client.ok("POST", "/events", [event("job.finished")])  # no window is open yet
        assert events_named(client, "prefect.automation.triggered") == []
        client.ok("PATCH", f"/automations/{auto['id']}", {"enabled": False}, expect=(204,))
        client.ok("POST", "/events", [event("job.started"), event("job.finished")])
        assert events_named(client, "prefect.automation.triggered") == []
        client.ok("PATCH", f"/automations/{auto['id']}", {"enabled": True}, expect=(204,))
        client.ok("POST", "/events", [event("job.started"), event("job.finished")])
        wait_until(lambda: events_named(client, "prefect.automation.triggered"), what="the firing")


def test_compound_and_sequence_triggers(tmp_path):
    with running(f"sqlite:///{tmp_path}/a.db") as client:
        compound = {
            "type": "compound",
            "require": "all",
            "within": 3600,
            "triggers": [reactive(["x.one"]), reactive(["x.two"])],
        }
        sequence = {"type": "sequence", "within": 3600, "triggers": [reactive(["y.one"]), reactive(["y.two"])]}
        both = client.ok("POST", "/automations/", automation_body(trigger=compound), expect=(201,))
        ordered = client.ok("POST", "/automations/", automation_body(trigger=sequence), expect=(201,))

        def fired(auto):
            return events_named(client, "prefect.automation.triggered", f"prefect.automation.{auto['id']}")

        client.ok("POST", "/events", [event("x.two")])
        assert fired(both) == []
        client.ok("POST", "/events", [event("x.one")])
        wait_until(lambda: fired(both), what="the compound trigger")
        client.ok("POST", "/events", [event("y.two")])
        client.ok("POST", "/events", [event("y.one")])
        assert fired(ordered) == []  # out of order
        client.ok("POST", "/events", [event("y.two")])
        wait_until(lambda: fired(ordered), what="the sequence trigger")


def test_proactive_trigger_fires_when_the_window_passes_empty_and_resolves(tmp_path):
    with running(f"sqlite:///{tmp_path}/a.db") as client:
        trigger = {"type": "event", "posture": "Proactive", "expect": ["heart.beat"], "threshold": 1, "within": 10}
        auto = client.ok(
            "POST",
            "/automations/",
            automation_body(trigger=trigger, actions_on_resolve=[{"type": "do-nothing"}]),
            expect=(201,),
        )
        resource = f"prefect.automation.{auto['id']}"
        wait_until(
            lambda: events_named(client, "prefect.automation.triggered", resource),
            timeout=60,
            what="the proactive firing",
        )
        client.ok("POST", "/events", [event("heart.beat")])
        wait_until(lambda: events_named(client, "prefect.automation.resolved", resource), what="the resolution")


def test_actions_change_the_world(tmp_path):
    with running(f"sqlite:///{tmp_path}/a.db") as client:
        pool = client.ok("POST", "/work_pools/", {"name": unique("pool"), "type": "process"}, expect=(201,))
        flow = client.ok("POST", "/flows/", {"name": unique("flow")}, expect=(200, 201))
        dep = client.ok(
            "POST",
            "/deployments/",
            {"name": "report", "flow_id": flow["id"], "work_pool_name": pool["name"]},
            expect=(200, 201),
        )
        run = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "state": {"type": "RUNNING"}}, expect=(201,))
        actions = [
            {"type": "pause-work-pool", "source": "selected", "work_pool_id": pool["id"]},
            {"type": "pause-deployment", "source": "selected", "deployment_id": dep["id"]},
            {"type": "cancel-flow-run"},
            {
                "type": "run-deployment",
                "source": "selected",
                "deployment_id": dep["id"],
                "parameters": {"source": {"__prefect_kind": "jinja", "template": "{{ flow_run.name | upper }}"}},
            },
        ]
        client.ok(
            "POST", "/automations/", automation_body(trigger=reactive(["go.now"]), actions=actions), expect=(201,)
        )
        client.ok("POST", "/events", [event("go.now", resource_id=f"prefect.flow-run.{run['id']}")])
        wait_until(
            lambda: client.ok("GET", f"/flow_runs/{run['id']}")["state"]["type"] == "CANCELLING",
            what="the run cancelled",
        )
        assert client.ok("GET", f"/work_pools/{pool['name']}")["is_paused"] is True
        assert client.ok("GET", f"/deployments/{dep['id']}")["paused"] is True
        runs = wait_until(
            lambda: client.ok("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}}),
            what="the deployment's run",
        )
        assert runs[0]["parameters"] == {"source": run["name"].upper()}


def test_failed_action_is_recorded(tmp_path):
    with running(f"sqlite:///{tmp_path}/a.db") as client:
        auto = client.ok(
            "POST",
            "/automations/",
            automation_body(trigger=reactive(["go.now"]), actions=[{"type": "cancel-flow-run"}]),
            expect=(201,),
        )
        client.ok("POST", "/events", [event("go.now")])  # names no flow run
        failed = wait_until(lambda: events_named(client, "prefect.automation.action.failed"), what="the failure")
        assert failed[0]["payload"]["reason"] == "No flow run could be inferred"
        assert client.ok("GET", f"/automations/{auto['id']}/history")[0]["status"] == "FAILED"


def test_an_actions_own_events_trigger_automations_a_bounded_number_of_levels(database):
    # As on Prefect, an automation can react to another's action (here: to its executed event). The one that
    # reacts also matches its own action's events; the depth of the firing travels with the queued action, so
    # that loop stops AUTOMATION_MAX_EVENT_DEPTH levels from the event that started it, not never.
    def executed(automation):
        return events_named(client, "prefect.automation.action.executed", f"prefect.automation.{automation['id']}")

    with running(database) as client:
        first = client.ok("POST", "/automations/", automation_body(trigger=reactive(["go.now"])), expect=(201,))
        echo = client.ok("POST", "/automations/", automation_body(trigger=reactive(["no.such.event"])), expect=(201,))
        echoed = [f"prefect.automation.{first['id']}", f"prefect.automation.{echo['id']}"]
        on_executed = reactive(["prefect.automation.action.executed"], match={"prefect.resource.id": echoed})
        client.ok("PUT", f"/automations/{echo['id']}", automation_body(echo["name"], on_executed), expect=(204,))
        client.ok("POST", "/events", [event("go.now")])
        wait_until(lambda: len(executed(echo)) >= 2, what="the echo's second action")
        # a later action runs after any echo the second one queued: the actor takes the queue in order
        last = client.ok("POST", "/automations/", automation_body(trigger=reactive(["go.later"])), expect=(201,))
        client.ok("POST", "/events", [event("go.later")])
        wait_until(lambda: executed(last), what="the later action")
        assert len(executed(first)) == 1
        assert len(executed(echo)) == prefectlite.AUTOMATION_MAX_EVENT_DEPTH - 1


def test_triggers_for_any_event_leave_the_automations_own_events_alone(database):
    # On Prefect's server a trigger for any event fires on its own automation.triggered event, and on that one's,
    # without end; Prefect's 3.x suite leaves 25 such automations on the server it runs against.
    def named(name, automation):
        return events_named(client, name, f"prefect.automation.{automation['id']}")

    with running(database) as client:
        catch_alls = [
            client.ok("POST", "/automations/", automation_body(trigger=trigger), expect=(201,))
            for trigger in (reactive([]), reactive([]), reactive(["*"]))
        ]
        client.ok("POST", "/events", [event("go.now")])
        for automation in catch_alls:
            wait_until(lambda: named("prefect.automation.action.executed", automation), what="its action")
        # the triggered events of a chain are stored with the event, and an action's own with its executed event
        assert [len(named("prefect.automation.triggered", a)) for a in catch_alls] == [1, 1, 1]


def test_send_notification_and_call_webhook_render_templates(tmp_path):
    with HTTPReceiver() as slack, HTTPReceiver() as hook, running(f"sqlite:///{tmp_path}/a.db") as client:
        slack_block = new_block(client, "slack-webhook", {"url": slack.url + "/services/x"})
        hook_block = new_block(client, "custom-webhook", {"name": "hook", "url": hook.url + "/in"})
        actions = [
            {
                "type": "send-notification",
                "block_document_id": slack_block["id"],
                "subject": "{{ event.event }}",
                "body": "{{ event.resource['prefect.resource.id'] }} said "
                "{{ event.payload.word | default('nothing') }}{% if labels %} ({{ labels | tojson }}){% endif %}",
            },
            {
                "type": "call-webhook",
                "block_document_id": hook_block["id"],
                "payload": '{"resource": "{{ event.resource.id }}"}',
            },
        ]
        client.ok(
            "POST",
            "/automations/",
            automation_body(trigger=reactive(["said.something"]), actions=actions),
            expect=(201,),
        )
        client.ok("POST", "/events", [event("said.something", resource_id="test.parrot", payload={"word": "hi"})])
        hit = slack.wait_for(1)[0]
        assert json.loads(hit.body)["text"] == "*said.something*\ntest.parrot said hi"
        assert json.loads(hook.wait_for(1)[0].body) == {"resource": "test.parrot"}


def new_block(client, slug, data):
    block_type = client.ok("GET", f"/block_types/slug/{slug}")
    schemas = client.ok(
        "POST", "/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}}
    )
    return client.ok(
        "POST",
        "/block_documents/",
        {"name": unique(slug), "block_type_id": block_type["id"], "block_schema_id": schemas[0]["id"], "data": data},
    )


@pytest.mark.parametrize(
    "template, expected",
    [
        ("{{ a.b }}", "1"),
        ("{{ missing }}", ""),
        ("{{ missing | default('x') }}", "x"),
        ("{{ s | upper }}", "HI"),
        ("{% if a.b == 1 %}one{% else %}other{% endif %}", "one"),
        ("{% for x in xs %}[{{ x }}]{% endfor %}", "[1][2]"),
        ("{{ xs | length }}", "2"),
        ("{{ a | tojson }}", '{"b":1}'),
        ("{{ s.__class__ }}", ""),
        ("{# c #}ok", "ok"),
        ("{% if not missing and s in 'hi there' %}yes{% endif %}", "yes"),
        ("{{ xs[1] }}", "2"),
    ],
)
def test_template_renderer(template, expected):
    assert prefectlite.render_template(template, {"a": {"b": 1}, "s": "hi", "xs": [1, 2]}) == expected


@pytest.mark.parametrize(
    "template", ["{{ x", "{% if x %}", "{{ x | system }}", "{% import os %}", "{{ x() }}", *BAD_TEMPLATES]
)
def test_template_renderer_refuses_what_it_does_not_support(template):
    with pytest.raises(prefectlite.TemplateError):
        prefectlite.parse_template(template)


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'a'" + " | replace('a', 'aaaaaaaaaa')" * 8 + " }}",  # 10**8 characters
        "{{ xs | join(big) }}",
        "{% for x in xs %}{{ big }}{% endfor %}",
        "{% for a in xs %}{% for b in xs %}{% for c in xs %}{% endfor %}{% endfor %}{% endfor %}",  # 200**3 loops
    ],
)
def test_rendering_has_a_budget(template):
    with pytest.raises(prefectlite.TemplateError):
        prefectlite.render_template(template, {"xs": list(range(200)), "big": "b" * 1000})


@pytest.mark.parametrize(
    "value, expected",
    [
        ({"id": "r1", "__kind__": "flow-run"}, "flow-runs/flow-run/r1"),
        ({"id": "r1"}, "flow-runs/flow-run/r1"),
        ({"id": "t1", "__kind__": "task-run"}, "runs/task-run/t1"),
        ({"id": "f1", "__kind__": "flow"}, "flows/flow/f1"),
        ({"id": "d1", "__kind__": "deployment"}, "deployments/deployment/d1"),
        ({"id": "p1", "name": "my pool", "__kind__": "work-pool"}, "work-pools/work-pool/my%20pool"),
        ({"id": "a1", "trigger": {}}, "automations/automation/a1"),
        ({"id": "q1", "__kind__": "work-queue"}, ""),
    ],
)
def test_the_ui_url_filter_gives_the_page_at_the_path_prefects_ui_uses(value, expected):
    # the paths the UI answers (tests/test_ui.py opens each); never the hash routes the UI only redirects from
    rendered = prefectlite.render_template("{{ x | ui_url }}", {"__ui_url__": "http://ui.example/", "x": value})
    assert rendered == f"http://ui.example/{expected}"


def test_the_int_filter_takes_decimal_digits_only():
    assert (
        prefectlite.render_template(
            "{{ s | int }} {{ d | int }} {{ f | int }} {{ n | int }}",
            {"s": "\u00b2", "d": " 42 ", "f": float("inf"), "n": 7.9},
        )
        == "0 42 0 7"
    )


def test_a_path_that_is_not_an_id_is_not_found(tmp_path):
    """Prefect routes automations by `{id:uuid}`: 2.20's Automation.enable() relies on a 404 for another path."""
    with running(f"sqlite:///{tmp_path}/a.db") as client:
        assert client.patch("/automations/asd", {"enabled": True})[0] == 404
        assert client.get("/automations/asd")[0] == 404


def test_run_deployment_parameters_hydrate_as_prefect_does():
    context = {"event": {"payload": {"n": 3, "name": "etl"}}}
    parameters = {
        "typed": "{{ event.payload.n }}",
        "text": "run {{ event.payload.name }}",
        "jinja": {"__prefect_kind": "jinja", "template": "{{ event.payload.n }}"},
        "json": {"__prefect_kind": "json", "value": '{"a": [1]}'},
        "nested": {"plain": "as is"},
    }
    assert prefectlite.hydrate(parameters, context) == {
        "typed": 3,
        "text": "run etl",
        "jinja": "3",
        "json": {"a": [1]},
        "nested": {"plain": "as is"},
    }


def test_two_replicas_on_postgresql_fire_each_action_once(postgres_url):
    """Two servers on one database, events posted to both at once: every pair of events fires once, and each
    firing's webhook is called once (replicas count in one bucket and claim each action before acting)."""
    import threading

    with HTTPReceiver() as hook, running(postgres_url) as first, running(postgres_url) as second:
        block_doc = new_block(first, "custom-webhook", {"name": "hook", "url": hook.url + "/in"})
        auto = first.ok(
            "POST",
            "/automations/",
            automation_body(
                trigger=reactive(["replica.ping"], threshold=2),
                actions=[
                    {
                        "type": "call-webhook",
                        "block_document_id": block_doc["id"],
                        "payload": '{"event": "{{ event.id }}"}',
                    }
                ],
            ),
            expect=(201,),
        )
        errors = []

        def post(client):
            try:
                for _ in range(10):
                    client.ok("POST", "/events", [event("replica.ping")])
            except Exception as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=post, args=(c,)) for c in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors
        fired = wait_until(
            lambda: (
                len(events_named(first, "prefect.automation.triggered")) == 10
                and events_named(first, "prefect.automation.triggered")
            ),
            what="ten firings",
        )
        hits = hook.wait_for(10)

        def completed():
            done = [h for h in second.ok("GET", f"/automations/{auto['id']}/history") if h["status"] == "COMPLETED"]
            return len(done) == 10 and done

        history = wait_until(completed, what="ten completed actions")
        assert len(fired) == 10 and len(history) == 10
        assert all(h["attempts"] == 1 for h in history)
        assert len({json.loads(h.body)["event"] for h in hook.hits}) == len(hook.hits) == 10, hits


def test_closing_proactive_windows_leaves_reactive_counts_alone(tmp_path):
    """The service's pass over ended windows once swept a reactive trigger's half-counted bucket."""
    url = f"sqlite:///{tmp_path}/a.db"
    with running(url) as client:
        client.ok(
            "POST", "/automations/", automation_body(trigger=reactive(["half.counted"], threshold=2)), expect=(201,)
        )
        client.ok("POST", "/events", [event("half.counted")])
        db = prefectlite.open_database(url)
        try:
            prefectlite.evaluate_proactive_triggers(db)
        finally:
            db.close()
        client.ok("POST", "/events", [event("half.counted")])
        wait_until(lambda: events_named(client, "prefect.automation.triggered"), what="the firing")


def test_more_actions_on_runs_queues_deployments_and_automations(tmp_path):
    with running(f"sqlite:///{tmp_path}/a.db") as client:
        pool = client.ok("POST", "/work_pools/", {"name": unique("pool"), "type": "process"}, expect=(201,))
        queue = client.ok("POST", f"/work_pools/{pool['name']}/queues", {"name": "q2"}, expect=(201,))
        flow = client.ok("POST", "/flows/", {"name": unique("flow")}, expect=(200, 201))
        dep = client.ok(
            "POST", "/deployments/", {"name": "d", "flow_id": flow["id"], "paused": True}, expect=(200, 201)
        )
        target = client.ok("POST", "/automations/", automation_body(name="target"), expect=(201,))

        def run_in(state):
            return client.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "state": {"type": state}}, expect=(201,))

        def when(name, *actions):
            client.ok(
                "POST", "/automations/", automation_body(trigger=reactive([name]), actions=list(actions)), expect=(201,)
            )

        when("set.state", {"type": "change-flow-run-state", "state": "FAILED", "name": "Gave up", "message": "no"})
        when("suspend", {"type": "suspend-flow-run"})
        when("resume", {"type": "resume-flow-run"})
        when("delete", {"type": "delete-flow-run"})
        when(
            "others",
            {"type": "pause-work-queue", "source": "selected", "work_queue_id": queue["id"]},
            {"type": "resume-deployment", "source": "selected", "deployment_id": dep["id"]},
            {"type": "pause-automation", "source": "inferred"},
        )
        changed, suspended, doomed = run_in("RUNNING"), run_in("RUNNING"), run_in("COMPLETED")

        def post(name, resource_id):
            client.ok("POST", "/events", [event(name, resource_id=resource_id)])

        post("set.state", f"prefect.flow-run.{changed['id']}")
        post("suspend", f"prefect.flow-run.{suspended['id']}")
        post("delete", f"prefect.flow-run.{doomed['id']}")
        post("others", f"prefect.automation.{target['id']}")
        state = wait_until(
            lambda: (s := client.ok("GET", f"/flow_runs/{changed['id']}")["state"])["type"] == "FAILED" and s,
            what="the state change",
        )
        assert (state["name"], state["message"]) == ("Gave up", "no")
        wait_until(
            lambda: client.ok("GET", f"/flow_runs/{suspended['id']}")["state"]["name"] == "Suspended",
            what="the suspension",
        )
        post("resume", f"prefect.flow-run.{suspended['id']}")
        wait_until(
            lambda: client.ok("GET", f"/flow_runs/{suspended['id']}")["state"]["type"] == "SCHEDULED",
            what="the resumption",
        )
        wait_until(lambda: client.get(f"/flow_runs/{doomed['id']}")[0] == 404, what="the deletion")
        wait_until(lambda: client.ok("GET", f"/automations/{target['id']}")["enabled"] is False, what="the pause")
        assert client.ok("GET", f"/work_queues/{queue['id']}")["is_paused"] is True
        assert client.ok("GET", f"/deployments/{dep['id']}")["paused"] is False


def test_a_proactive_child_fires_its_compound_parent_but_does_not_resolve_it(tmp_path):
    url = f"sqlite:///{tmp_path}/a.db"
    with running(url, PREFECT_API_SERVICES_TRIGGERS_ENABLED=False) as client:
        child = {"type": "event", "posture": "Proactive", "expect": ["heart.beat"], "threshold": 1, "within": 3600}
        auto = client.ok(
            "POST",
            "/automations/",
            automation_body(
                trigger={"type": "compound", "require": "any", "triggers": [child]},
                actions_on_resolve=[{"type": "do-nothing"}],
            ),
            expect=(201,),
        )
        db = prefectlite.open_database(url)
        try:
            with db.write() as tx:  # the child's hour passes without a heartbeat
                tx.execute("UPDATE automation_bucket SET end_time = ?", (prefectlite.now_iso(),))
            assert prefectlite.evaluate_proactive_triggers(db) == 1
        finally:
            db.close()
        resource = f"prefect.automation.{auto['id']}"
        assert len(events_named(client, "prefect.automation.triggered", resource)) == 1
        client.ok("POST", "/events", [event("heart.beat")])
        assert events_named(client, "prefect.automation.resolved", resource) == []


def test_with_several_processes_a_firing_wakes_the_process_that_runs_the_service(tmp_path):
    """Only the first of `start --processes 2` runs the automations service; an event stored by the other
    wakes it (the service's own loop is an hour here, so only the wake can run the actions)."""
    from helpers import ServerProcess

    server = ServerProcess(
        tmp_path,
        {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_SERVICES_TRIGGERS_LOOP_SECONDS": "3600"},
        "--processes",
        "2",
    )
    try:
        server.wait_ready()
        client = Client(server.api_url)
        client.ok("POST", "/automations/", automation_body(trigger=reactive(["mp.ping"])), expect=(201,))
        for _ in range(6):  # spread over both processes by the kernel
            client.ok("POST", "/events", [event("mp.ping")])
        wait_until(lambda: len(events_named(client, "prefect.automation.action.executed")) == 6, what="six actions run")
    finally:
        server.stop()


def test_action_history_is_kept_a_week(tmp_path):
    url = f"sqlite:///{tmp_path}/a.db"
    with running(url) as client:
        auto = client.ok("POST", "/automations/", automation_body(trigger=reactive(["go.now"])), expect=(201,))
        client.ok("POST", "/events", [event("go.now")])

        def statuses():
            return [h["status"] for h in client.ok("GET", f"/automations/{auto['id']}/history")]

        # Finished first: the actor stamps `updated` when it finishes, which would undo the aging below.
        wait_until(lambda: statuses() == ["COMPLETED"], what="the action done")
        db = prefectlite.open_database(url)
        try:
            with db.write() as tx:  # the action ran eight days ago
                tx.execute(
                    "UPDATE automation_action_queue SET updated = ?",
                    (prefectlite.iso(prefectlite.utcnow() - prefectlite._dt.timedelta(days=8)),),
                )
        finally:
            db.close()
        client.ok("POST", "/events", [event("go.now")])  # a new one, kept

        def only_the_new_one():
            history = client.ok("GET", f"/automations/{auto['id']}/history")
            return [h["status"] for h in history] == ["COMPLETED"] and history

        wait_until(only_the_new_one, what="the old history pruned, the new kept")
