"""The REST API of prefectlite through real HTTP: flows, flow runs, task runs, states, logs, the filter
language, the meta routes, CSRF and the OpenAPI document."""

import base64
import bisect
import datetime as dt
import json
import os
import random
import re
import time
import urllib.request
import uuid

import pytest

import prefectlite
from helpers import ROOT, UI_ONLY_ROUTES, Client, iso, migrated_sqlite_url, new_flow, new_flow_run, now, parse

TWO_WORDS = re.compile(r"^[a-z]+-[a-z]+$")


# --- helpers -----------------------------------------------------------------------------------

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


def at(minutes):
    return T0 + dt.timedelta(minutes=minutes)


def new_task_run(client, flow_run_id, task_key=None, dynamic_key="0", scheduled=None, **fields):
    body = {
        "flow_run_id": flow_run_id,
        "task_key": task_key or f"task-{uuid.uuid4().hex[:8]}",
        "dynamic_key": dynamic_key,
        **fields,
    }
    if scheduled is not None:
        body["state"] = {"type": "SCHEDULED", "state_details": {"scheduled_time": iso(scheduled)}}
    return client.ok("POST", "/task_runs/", body)


def set_state(client, kind, run_id, state_type, force=True, **details):
    return client.ok(
        "POST",
        f"/{kind}_runs/{run_id}/set_state",
        {"state": {"type": state_type, "state_details": details}, "force": force},
    )


def ids(items):
    return [item["id"] for item in items]


def filter_ids(client, path, body):
    status, items = client.post(path, body)
    assert status == 200, (path, body, items)
    return ids(items)


def get_raw(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# --- flows -------------------------------------------------------------------------------------


def test_create_flow_is_idempotent_by_name(client):
    status, first = client.post("/flows/", {"name": "etl", "tags": ["a"]})
    assert status == 201, first
    assert first["name"] == "etl" and first["tags"] == ["a"]
    assert uuid.UUID(first["id"])
    status, second = client.post("/flows/", {"name": "etl", "tags": []})
    assert status == 200, second
    assert second["id"] == first["id"]
    assert client.ok("POST", "/flows/count", {}) == 1


def test_read_flow_by_id_and_by_name(client):
    flow = new_flow(client, "my flow with spaces")
    assert client.ok("GET", f"/flows/{flow['id']}")["name"] == "my flow with spaces"
    status, by_name = client.get("/flows/name/" + urllib.request.quote("my flow with spaces", safe=""))
    assert status == 200, by_name
    assert by_name["id"] == flow["id"]
    assert client.get(f"/flows/{uuid.uuid4()}")[0] == 404
    assert client.get("/flows/name/nope")[0] == 404


def test_filter_and_count_flows(client):
    a = new_flow(client, "alpha", ["x"])
    b = new_flow(client, "beta", ["x", "y"])
    new_flow(client, "gamma")
    assert filter_ids(client, "/flows/filter", {"flows": {"name": {"any_": ["alpha", "beta"]}}}) == [a["id"], b["id"]]
    assert client.ok("POST", "/flows/count", {"flows": {"tags": {"all_": ["x"]}}}) == 2
    assert client.ok("POST", "/flows/count", {}) == 3


def test_patch_flow_tags(client):
    flow = new_flow(client, tags=["old"])
    status, body = client.patch(f"/flows/{flow['id']}", {"tags": ["new", "tags"]})
    assert status == 204, body
    assert body is None
    assert client.ok("GET", f"/flows/{flow['id']}")["tags"] == ["new", "tags"]
    assert client.patch(f"/flows/{uuid.uuid4()}", {"tags": []})[0] == 404


def test_patching_a_flow_with_labels_or_another_unknown_field_is_a_422(client):
    """Prefect's FlowUpdate (3.9's and 2.20's servers, observed) has only `tags` and forbids other fields:
    PATCH /flows/{id} with `labels` (or `name`) answers 422, naming each, and changes nothing. We answered 204."""
    flow = new_flow(client, tags=["old"])
    for headers in (PREFECT3_AGENT, None):
        status, body = client.patch(
            f"/flows/{flow['id']}", {"tags": ["new"], "labels": {"a": "b"}, "name": "x"}, headers=headers
        )
        assert status == 422, body
        assert body["exception_detail"] == [
            {"loc": ["body", key], "msg": "extra fields not permitted", "type": "value_error.extra"}
            for key in ("labels", "name")
        ]
    read = client.ok("GET", f"/flows/{flow['id']}", headers=PREFECT3_AGENT)
    assert (read["tags"], read["labels"]) == (["old"], {})


def test_delete_flow(client):
    flow = new_flow(client)
    run = new_flow_run(client, flow["id"])
    status, body = client.delete(f"/flows/{flow['id']}")
    assert status == 204, body
    assert client.get(f"/flows/{flow['id']}")[0] == 404
    assert client.delete(f"/flows/{flow['id']}")[0] == 404
    assert client.get(f"/flow_runs/{run['id']}")[0] == 404  # its runs go with it


# --- flow runs ---------------------------------------------------------------------------------


def test_flow_run_gets_a_two_word_name(client):
    names = {new_flow_run(client)["name"] for _ in range(5)}
    assert all(TWO_WORDS.match(name) for name in names), names
    assert len(names) > 1
    named = new_flow_run(client, name="my-own-name")
    assert named["name"] == "my-own-name"


def test_flow_run_create_returns_the_computed_fields(client):
    flow = new_flow(client)
    status, run = client.post(
        "/flow_runs/",
        {
            "flow_id": flow["id"],
            "name": None,
            "parameters": {"x": 1},
            "tags": ["t"],
            "flow_version": "1.0",
            "context": {"k": "v"},
            "empirical_policy": {"retries": 2},
            "idempotency_key": None,
            "state": {"type": "PENDING", "name": "Pending", "message": None, "state_details": {}, "data": None},
        },
    )
    assert status == 201, run
    assert run["flow_id"] == flow["id"]
    assert run["parameters"] == {"x": 1} and run["tags"] == ["t"] and run["flow_version"] == "1.0"
    assert run["state_type"] == "PENDING" and run["state_name"] == "Pending"
    assert run["run_count"] == 0 and run["total_run_time"] == 0
    assert run["expected_start_time"] and "estimated_start_time_delta" in run
    assert run["empirical_policy"]["retries"] == 2


def test_flow_run_of_unknown_flow_is_404(client):
    status, body = client.post("/flow_runs/", {"flow_id": str(uuid.uuid4())})
    assert status == 404, body


def test_idempotency_key_returns_the_same_flow_run(client):
    flow = new_flow(client)
    status, first = client.post("/flow_runs/", {"flow_id": flow["id"], "idempotency_key": "once"})
    assert status == 201, first
    status, again = client.post("/flow_runs/", {"flow_id": flow["id"], "idempotency_key": "once"})
    assert status == 200, again
    assert again["id"] == first["id"]
    other = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "idempotency_key": "twice"})
    assert other["id"] != first["id"]
    assert client.ok("POST", "/flow_runs/count", {}) == 2


def test_read_patch_delete_flow_run(client):
    run = new_flow_run(client)
    assert client.ok("GET", f"/flow_runs/{run['id']}")["id"] == run["id"]
    status, body = client.patch(f"/flow_runs/{run['id']}", {"name": "renamed", "tags": ["p"], "parameters": {"a": 2}})
    assert status == 204, body
    read = client.ok("GET", f"/flow_runs/{run['id']}")
    assert (read["name"], read["tags"], read["parameters"]) == ("renamed", ["p"], {"a": 2})
    assert client.patch(f"/flow_runs/{uuid.uuid4()}", {"name": "x"})[0] == 404
    status, body = client.delete(f"/flow_runs/{run['id']}")
    assert status == 204, body
    assert client.get(f"/flow_runs/{run['id']}")[0] == 404
    assert client.delete(f"/flow_runs/{run['id']}")[0] == 404


PREFECT3_AGENT = {"User-Agent": "prefect/3.9.1 (API 0.8.4)"}  # what the 3.9 SDK's PrefectClient sends


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_flow_runs_labels_are_shown_to_3x_clients_with_prefects_defaults(dialect, tmp_path, request):
    """A 3.x flow run's labels carry the OpenTelemetry trace context: run_deployment sends it on
    /deployments/{id}/create_flow_run (the field was dropped) and a subflow's run_deployment reads it back
    from the parent run's labels, which were stored but never shown (2 tests of Prefect's
    deployment/test_flow_runs.py). As Prefect 3.9's server: the flow's labels, prefect.flow.id (and
    prefect.deployment.id), the client's labels over them, PATCH /flow_runs/{id}/labels merged in; a 2.20
    flow run has no labels (the 2.20 SDK refuses unknown fields in test mode)."""
    url = f"sqlite:///{tmp_path}/labels.db" if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url) as api_url:
        client = Client(api_url)
        flow = client.ok("POST", "/flows/", {"name": "labelled", "labels": {"team": "data", "over": "flow"}})
        body = {"flow_id": flow["id"], "labels": {"keep": "me", "over": "old"}}
        created = client.ok("POST", "/flow_runs/", body, headers=PREFECT3_AGENT)
        defaults = {"team": "data", "prefect.flow.id": flow["id"]}
        assert created["labels"] == {**defaults, "keep": "me", "over": "old"}
        status, answer = client.patch(f"/flow_runs/{created['id']}/labels", {"over": "new", "added": 2})
        assert status == 204, answer
        labels = {**defaults, "keep": "me", "over": "new", "added": 2}
        assert client.ok("GET", f"/flow_runs/{created['id']}", headers=PREFECT3_AGENT)["labels"] == labels
        listed = client.ok("POST", "/flow_runs/filter", {}, headers=PREFECT3_AGENT)
        assert [run["labels"] for run in listed] == [labels]
        as_2x = [client.ok("GET", f"/flow_runs/{created['id']}"), *client.ok("POST", "/flow_runs/filter", {})]
        assert [("labels" in run) for run in as_2x] == [False, False]  # after the 3.x answer (read cache)
        assert "labels" not in client.ok("POST", "/flow_runs/", body)

        dep = client.ok("POST", "/deployments/", {"name": "d", "flow_id": flow["id"]}, headers=PREFECT3_AGENT)
        trace = {"__OTEL_TRACEPARENT": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
        from_dep = client.ok(
            "POST", f"/deployments/{dep['id']}/create_flow_run", {"labels": trace}, headers=PREFECT3_AGENT
        )
        assert from_dep["labels"] == {**defaults, "over": "flow", "prefect.deployment.id": dep["id"], **trace}
        read = client.ok("GET", f"/flow_runs/{from_dep['id']}", headers=PREFECT3_AGENT)
        assert read["labels"] == from_dep["labels"]
        assert client.patch(f"/flow_runs/{uuid.uuid4()}/labels", {"a": "b"})[0] == 404
        assert client.patch(f"/flow_runs/{created['id']}/labels", ["not", "a", "dict"])[0] == 422


DETAILS_3 = {"deferred": False, "traceparent": None, "deployment_concurrency_lease_id": None}  # 3.9's defaults


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_states_made_without_3x_details_show_3_9s_defaults_to_3x_clients(dialect, tmp_path, request):
    """Prefect 3.9's server answers every state with the details 3.x added (deferred, traceparent,
    deployment_concurrency_lease_id), its defaults where the state was made without them: the server's
    Pending and Scheduled states, a state proposed without them. Details a state has keep their values (null
    too); 2.x answers stay without them (the 2.20 SDK refuses unknown details in test mode)."""
    url = f"sqlite:///{tmp_path}/states.db" if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url) as api_url:
        client, three = Client(api_url), Client(api_url, headers=PREFECT3_AGENT)
        flow = client.ok("POST", "/flows/", {"name": "stated"})
        dep = client.ok("POST", "/deployments/", {"name": "d", "flow_id": flow["id"], "work_queue_name": "q"})
        scheduled = three.ok("POST", f"/deployments/{dep['id']}/create_flow_run", {})
        pending = three.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})
        task = three.ok("POST", "/task_runs/", {"flow_run_id": pending["id"], "task_key": "t", "dynamic_key": "0"})

        def details_of(state):
            return {key: state["state_details"].get(key, "absent") for key in DETAILS_3}

        assert [details_of(run["state"]) for run in (scheduled, pending, task)] == [DETAILS_3] * 3
        runs = [
            three.ok("GET", f"/flow_runs/{scheduled['id']}"),
            *three.ok("POST", "/flow_runs/filter", {}),
            *three.ok("POST", "/flow_runs/paginate", {})["results"],
            three.ok("GET", f"/task_runs/{task['id']}"),
            *three.ok("POST", "/task_runs/filter", {}),
        ]
        queued = three.ok("POST", f"/work_queues/{scheduled['work_queue_id']}/get_runs", {})
        assert [(run["id"], "labels" in run) for run in queued] == [(scheduled["id"], True)]  # labels too, as 3.9's
        runs += queued
        states = [
            *three.ok("GET", f"/flow_run_states/?flow_run_id={scheduled['id']}"),
            three.ok("GET", f"/flow_run_states/{scheduled['state']['id']}"),
            *three.ok("GET", f"/task_run_states/?task_run_id={task['id']}"),
        ]
        assert [details_of(s) for s in [r["state"] for r in runs] + states] == [DETAILS_3] * (len(runs) + len(states))

        proposed = {"state": {"type": "RUNNING", "state_details": {"deferred": True, "traceparent": None}}}
        answer = three.ok("POST", f"/flow_runs/{pending['id']}/set_state", proposed)
        answer_id, kept = answer["state"]["id"], {**DETAILS_3, "deferred": True}
        assert details_of(answer["state"]) == kept
        assert details_of(three.ok("GET", f"/flow_runs/{pending['id']}")["state"]) == kept
        listed = three.ok("POST", "/flow_runs/filter", {"flow_runs": {"id": {"any_": [pending["id"]]}}})
        assert [details_of(run["state"]) for run in listed] == [kept]
        answer = three.ok("POST", f"/task_runs/{task['id']}/set_state", {"state": {"type": "RUNNING"}})
        assert details_of(answer["state"]) == DETAILS_3

        as_2x = [
            client.ok("GET", f"/flow_runs/{scheduled['id']}")["state"],
            *(run["state"] for run in client.ok("POST", "/flow_runs/filter", {})),
            client.ok("GET", f"/task_runs/{task['id']}")["state"],
            *client.ok("GET", f"/flow_run_states/?flow_run_id={scheduled['id']}"),
            client.ok("POST", f"/flow_runs/{scheduled['id']}/set_state", {"state": {"type": "PENDING"}})["state"],
        ]
        as_2x = [state for state in as_2x if state["id"] != answer_id]  # a 3.x client's, stored as it sent it
        assert [set(DETAILS_3) & set(s["state_details"]) for s in as_2x] == [set()] * len(as_2x)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_stored_state_whose_details_are_not_an_object_reads_as_3_9s_defaults(dialect, tmp_path, request):
    """A state stored with details that are not an object (null, a list, a string: no route stores one, an old
    or hand-edited row may hold one) reads as one without details, with 3.9's defaults for 3.x clients: the
    same in a single read and in a list the database builds, and never a 500."""
    url = f"sqlite:///{tmp_path}/odd.db" if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url) as api_url:
        three = Client(api_url, headers=PREFECT3_AGENT)
        flow = three.ok("POST", "/flows/", {"name": "odd"})
        odd = {"null": None, "list": [1], "string": "x"}
        runs = {name: three.ok("POST", "/flow_runs/", {"flow_id": flow["id"]}) for name in odd}
        db = prefectlite.open_database(url)
        try:
            with db.write() as tx:
                for name, details in odd.items():
                    state = {**runs[name]["state"], "state_details": details}
                    tx.execute("UPDATE flow_run SET state = ? WHERE id = ?", (json.dumps(state), runs[name]["id"]))
        finally:
            db.close()
        for name in odd:
            one = three.ok("GET", f"/flow_runs/{runs[name]['id']}")
            listed = three.ok("POST", "/flow_runs/filter", {"flow_runs": {"id": {"any_": [runs[name]["id"]]}}})
            assert [one["state"]["state_details"], listed[0]["state"]["state_details"]] == [DETAILS_3] * 2, name


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_flows_labels_are_shown_to_3x_clients(dialect, tmp_path, request):
    """Prefect 3.9's server answers a flow with its `labels` (those it was created with, {} by default; a
    second create of the name leaves them) on create, read, read by name and filter; 2.20's Flow has no such
    field and its SDK refuses unknown fields in test mode, so 2.x callers never see it."""
    url = f"sqlite:///{tmp_path}/labels.db" if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url) as api_url:
        client = Client(api_url)
        plain = client.ok("POST", "/flows/", {"name": "plain"}, headers=PREFECT3_AGENT)
        assert plain["labels"] == {}
        labels = {"team": "data", "n": 1, "on": True}
        flow = client.ok("POST", "/flows/", {"name": "labelled", "labels": labels}, headers=PREFECT3_AGENT)
        assert flow["labels"] == labels
        again = client.ok("POST", "/flows/", {"name": "labelled", "labels": {"x": "y"}}, headers=PREFECT3_AGENT)
        assert (again["id"], again["labels"]) == (flow["id"], labels)
        assert client.ok("GET", f"/flows/{flow['id']}", headers=PREFECT3_AGENT)["labels"] == labels
        assert client.ok("GET", "/flows/name/labelled", headers=PREFECT3_AGENT)["labels"] == labels
        listed = client.ok("POST", "/flows/filter", {"sort": "NAME_ASC"}, headers=PREFECT3_AGENT)
        assert [f["labels"] for f in listed] == [labels, {}]
        as_2x = [
            client.ok("POST", "/flows/", {"name": "labelled"}),
            client.ok("GET", f"/flows/{flow['id']}"),
            client.ok("GET", "/flows/name/labelled"),
            *client.ok("POST", "/flows/filter", {"sort": "NAME_ASC"}),
        ]
        assert [("labels" in f) for f in as_2x] == [False] * 5


def test_labels_are_a_dict_of_strings_numbers_and_booleans_as_prefects_key_value_labels(client):
    """Prefect 3.9's KeyValueLabels: string keys and values that are strings, numbers or booleans (null means
    none). Its server answers 422 to a label whose value is a list, an object or a null on every body that
    takes labels, and its SDK reads a run that holds one as invalid. We stored them (a 201), and every 3.x
    client reading that flow, run or deployment then failed."""
    flow = client.ok("POST", "/flows/", {"name": "labelled"}, headers=PREFECT3_AGENT)
    run = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"]}, headers=PREFECT3_AGENT)
    dep = client.ok("POST", "/deployments/", {"name": "d", "flow_id": flow["id"]}, headers=PREFECT3_AGENT)
    creates = [
        ("/flows/", {"name": "other"}),
        ("/flow_runs/", {"flow_id": flow["id"]}),
        ("/task_runs/", {"flow_run_id": run["id"], "task_key": "t", "dynamic_key": "0"}),
        ("/deployments/", {"name": "other", "flow_id": flow["id"]}),
        (f"/deployments/{dep['id']}/create_flow_run", {}),
    ]
    for path, body in creates:
        for bad in ([], {"a": {"b": "c"}}, {"a": None}):
            labels = {"ok": "x", "a": bad} if isinstance(bad, list) else {"ok": "x", **bad}
            status, answer = client.post(path, {**body, "labels": labels}, headers=PREFECT3_AGENT)
            assert status == 422, (path, bad, answer)
            assert [e["loc"] for e in answer["exception_detail"]] == [["body", "labels", "a"]], answer
        for bad in (["a"], "a", 1):
            status, answer = client.post(path, {**body, "labels": bad}, headers=PREFECT3_AGENT)
            assert status == 422, (path, bad, answer)
    status, answer = client.patch(f"/flow_runs/{run['id']}/labels", {"a": ["b"]})
    assert status == 422, answer
    assert [e["loc"] for e in answer["exception_detail"]] == [["body", "a"]]
    status, answer = client.patch(f"/flow_runs/{run['id']}/labels", {"big": 10**300})  # beyond any float: was a 500
    assert status == 422, answer
    assert [e["loc"] for e in answer["exception_detail"]] == [["body", "big"]]
    status, answer = client.patch(f"/flow_runs/{run['id']}", {"labels": {"a": "b"}})  # Prefect's FlowRunUpdate
    assert status == 422, answer  # forbids fields it lacks: we answered 204 and dropped them
    assert [e["loc"] for e in answer["exception_detail"]] == [["body", "labels"]]
    assert [f["name"] for f in client.ok("POST", "/flows/filter", {})] == ["labelled"]
    assert [r["id"] for r in client.ok("POST", "/flow_runs/filter", {})] == [run["id"]]
    assert client.ok("POST", "/task_runs/filter", {}) == []
    assert [d["name"] for d in client.ok("POST", "/deployments/filter", {})] == ["d"]
    assert client.ok("GET", f"/flow_runs/{run['id']}", headers=PREFECT3_AGENT)["labels"] == run["labels"]

    scalars = {"s": "x", "i": 1, "f": 1.5, "b": True}
    made = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "labels": scalars}, headers=PREFECT3_AGENT)
    assert client.ok("GET", f"/flow_runs/{made['id']}", headers=PREFECT3_AGENT)["labels"] == {
        "prefect.flow.id": flow["id"],
        **scalars,
    }
    made = client.ok("POST", "/flows/", {"name": "none", "labels": None}, headers=PREFECT3_AGENT)
    assert made["labels"] == {}


def test_a_states_details_and_a_runs_policy_are_checked_as_prefect_checks_them(client):
    """Prefect's StateDetails, FlowRunPolicy and TaskRunPolicy (3.9's server; 2.20's fields are a subset) give
    each field a kind, and its server answers 422 to a value of another; we stored any object (a 201, a 204 on
    update), and every SDK reading that run then failed. Fields they do not name are kept as sent."""
    flow = new_flow(client)
    run = new_flow_run(client, flow["id"], state={"type": "PENDING"})
    task = {"flow_run_id": run["id"], "task_key": "t", "dynamic_key": "0"}
    bad = [
        ("/flow_runs/", {"empirical_policy": {"retries": "x"}}, ["empirical_policy", "retries"]),
        ("/flow_runs/", {"empirical_policy": {"retry_type": "later"}}, ["empirical_policy", "retry_type"]),
        (
            "/flow_runs/",
            {"empirical_policy": {"retry_delay_seconds": 1.5}},
            ["empirical_policy", "retry_delay_seconds"],
        ),
        ("/flow_runs/", {"empirical_policy": {"pause_keys": "x"}}, ["empirical_policy", "pause_keys"]),
        ("/flow_runs/", {"state": {"type": "PENDING", "state_details": {"flow_run_id": "x"}}}, ["flow_run_id"]),
        (
            "/flow_runs/",
            {"state": {"type": "PENDING", "state_details": {"untrackable_result": None}}},
            ["untrackable_result"],
        ),
        (
            "/flow_runs/",
            {"state": {"type": "PENDING", "state_details": {"run_input_keyset": {"k": 1}}}},
            ["run_input_keyset", "k"],
        ),
        ("/task_runs/", {"empirical_policy": {"retry_delay": [1, "x"]}}, ["empirical_policy", "retry_delay", 1]),
        ("/task_runs/", {"empirical_policy": {"retry_jitter_factor": -1}}, ["empirical_policy", "retry_jitter_factor"]),
        ("/task_runs/", {"state": {"type": "PENDING", "state_details": {"cache_key": 1}}}, ["cache_key"]),
        (
            f"/flow_runs/{run['id']}/set_state",
            {"state": {"type": "RUNNING", "state_details": {"pause_timeout": "x"}}},
            ["pause_timeout"],
        ),
    ]
    for path, fields, where in bad:
        body = {
            **({"flow_id": flow["id"]} if path == "/flow_runs/" else task if path == "/task_runs/" else {}),
            **fields,
        }
        status, answer = client.post(path, body)
        assert status == 422, (path, fields, answer)
        loc = answer["exception_detail"][0]["loc"]
        assert loc[-len(where) :] == where and loc[0] == "body", (path, fields, answer)
    status, answer = client.patch(f"/flow_runs/{run['id']}", {"empirical_policy": {"retries": [1]}})
    assert status == 422, answer
    assert [r["id"] for r in client.ok("POST", "/flow_runs/filter", {})] == [run["id"]]
    assert client.ok("POST", "/task_runs/filter", {}) == []
    read = client.ok("GET", f"/flow_runs/{run['id']}")
    assert (read["state_type"], read["empirical_policy"].get("retries")) == ("PENDING", None)

    policy = {"retries": 2, "retry_delay": 5, "pause_keys": ["a"], "not_prefects": "kept"}
    details = {"cache_key": "k", "not_prefects": [1]}
    body = {"flow_id": flow["id"], "empirical_policy": policy, "state": {"type": "PENDING", "state_details": details}}
    made = client.ok("POST", "/flow_runs/", body)
    read = client.ok("GET", f"/flow_runs/{made['id']}")
    assert policy.items() <= read["empirical_policy"].items()
    assert details.items() <= read["state"]["state_details"].items()


def test_run_bodies_refuse_what_prefect_refuses_and_take_what_it_takes(client):
    """Observed on Prefect 3.9's and 2.20's servers (a probe of every field of every run body): a state's
    `state_details` may not be null and a task run's `task_inputs` maps each name to a list (a 422 each,
    which we stored: a 201, and the SDK then could not read the run); a null `force` means false, 1 is true
    and true is an integer 1 (pydantic's lax mode, a 201 there), and a flow run's `job_variables` may be set
    to null (a 204), where we answered 422, 422 and 409."""
    run = new_flow_run(client, state={"type": "PENDING"})
    path = f"/flow_runs/{run['id']}/set_state"
    status, answer = client.post(path, {"state": {"type": "RUNNING", "state_details": None}})
    assert status == 422, answer
    assert [e["loc"] for e in answer["exception_detail"]] == [["body", "state", "state_details"]]
    assert client.ok("GET", f"/flow_runs/{run['id']}")["state_type"] == "PENDING"
    assert client.ok("POST", path, {"state": {"type": "RUNNING"}, "force": None})["status"] == "ACCEPT"
    assert client.ok("POST", path, {"state": {"type": "SCHEDULED"}, "force": 1})["status"] == "ACCEPT"
    client.ok("POST", path, {"state": {"type": "COMPLETED"}, "force": True})
    assert client.ok("POST", path, {"state": {"type": "CRASHED"}, "force": None})["status"] == "ABORT"  # not forced

    body = {"flow_run_id": run["id"], "task_key": "t", "dynamic_key": "0"}
    for bad in ({"x": None}, {"x": {"input_type": "parameter", "name": "p"}}, {"x": [1]}):
        status, answer = client.post("/task_runs/", {**body, "task_inputs": bad})
        assert status == 422, (bad, answer)
        assert answer["exception_detail"][0]["loc"][:3] == ["body", "task_inputs", "x"], answer
    assert client.ok("POST", "/task_runs/filter", {}) == []
    inputs = {"x": [{"input_type": "parameter", "name": "p"}]}
    policy = {"retries": 1, "retry_delay": True}  # true is 1 here too
    task_run = client.ok("POST", "/task_runs/", {**body, "task_inputs": inputs, "empirical_policy": policy})
    assert client.ok("GET", f"/task_runs/{task_run['id']}")["task_inputs"] == inputs
    task_path = f"/task_runs/{task_run['id']}/set_state"
    client.ok("POST", task_path, {"state": {"type": "COMPLETED"}, "force": True})
    assert client.ok("POST", task_path, {"state": {"type": "CRASHED"}, "force": None})["status"] == "ABORT"

    assert client.patch(f"/flow_runs/{run['id']}", {"job_variables": {"cpu": 2}}) == (204, None)
    status, answer = client.patch(f"/flow_runs/{run['id']}", {"job_variables": None})
    assert status == 204, answer
    assert client.ok("GET", f"/flow_runs/{run['id']}")["job_variables"] == {}  # null: none
    log = {"name": "n", "level": True, "message": "m", "timestamp": iso(now()), "flow_run_id": run["id"]}
    client.ok("POST", "/logs/", [log])
    assert [entry["level"] for entry in client.ok("POST", "/logs/filter", {})] == [1]


def test_filter_and_count_flow_runs(client):
    flow = new_flow(client)
    runs = [new_flow_run(client, flow["id"], tags=[f"n{i}"]) for i in range(4)]
    assert client.ok("POST", "/flow_runs/count", {}) == 4
    assert client.ok("POST", "/flow_runs/count", {"flow_runs": {"tags": {"all_": ["n1"]}}}) == 1
    assert sorted(filter_ids(client, "/flow_runs/filter", {})) == sorted(ids(runs))


def test_flow_run_history_buckets(client):
    flow = new_flow(client)
    early = [new_flow_run(client, flow["id"], scheduled=at(m)) for m in (10, 20, 30)]
    late = new_flow_run(client, flow["id"], scheduled=at(90))
    new_flow_run(client, flow["id"], scheduled=at(300))  # outside the window
    set_state(client, "flow", early[0]["id"], "COMPLETED")

    status, buckets = client.post(
        "/flow_runs/history", {"history_start": iso(T0), "history_end": iso(at(120)), "history_interval_seconds": 3600}
    )
    assert status == 200, buckets
    assert [parse(b["interval_start"]) for b in buckets] == [T0, at(60)]
    assert [parse(b["interval_end"]) for b in buckets] == [at(60), at(120)]
    first = {(s["state_type"], s["state_name"]): s["count_runs"] for s in buckets[0]["states"]}
    assert first == {("COMPLETED", "Completed"): 1, ("SCHEDULED", "Scheduled"): 2}
    second = {(s["state_type"], s["state_name"]): s["count_runs"] for s in buckets[1]["states"]}
    assert second == {("SCHEDULED", "Scheduled"): 1}
    for bucket in buckets:
        for state in bucket["states"]:
            assert {"sum_estimated_run_time", "sum_estimated_lateness"} <= set(state)

    status, filtered = client.post(
        "/flow_runs/history",
        {
            "history_start": iso(T0),
            "history_end": iso(at(120)),
            "history_interval_seconds": 3600,
            "flow_runs": {"id": {"any_": [late["id"]]}},
        },
    )
    assert status == 200, filtered
    assert filtered[0]["states"] == []
    assert [s["count_runs"] for s in filtered[1]["states"]] == [1]


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_history_buckets_are_exact_at_their_edges_and_sum_the_runs_estimates(dialect, tmp_path, request):
    url = f"sqlite:///{tmp_path}/history.db" if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    start = dt.datetime(2025, 1, 1, 0, 0, tzinfo=dt.timezone.utc)
    micro = dt.timedelta(microseconds=1)
    with prefectlite.serve(database=url) as api_url:
        client = Client(api_url)
        flow = new_flow(client)
        last_of_first = new_flow_run(client, flow["id"], scheduled=start + dt.timedelta(hours=1) - micro)
        first_of_second = new_flow_run(client, flow["id"], scheduled=start + dt.timedelta(hours=1))
        new_flow_run(client, flow["id"], scheduled=start + dt.timedelta(hours=2))  # the end is exclusive
        new_flow_run(client, flow["id"], scheduled=start - micro)  # before the start
        buckets = client.ok(
            "POST",
            "/flow_runs/history",
            {
                "history_start": iso(start),
                "history_end": iso(start + dt.timedelta(hours=2)),
                "history_interval_seconds": 3600,
            },
        )
        assert [[s["count_runs"] for s in b["states"]] for b in buckets] == [[1], [1]]
        # a scheduled run that never started is late by now - expected, as the run itself shows
        for bucket, run in zip(buckets, (last_of_first, first_of_second)):
            shown = client.ok("GET", f"/flow_runs/{run['id']}")["estimated_start_time_delta"]
            assert shown > 3600
            assert bucket["states"][0]["sum_estimated_lateness"] == pytest.approx(shown, abs=30)
            assert bucket["states"][0]["sum_estimated_run_time"] == 0


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_history_puts_every_run_in_the_bucket_its_time_falls_in(dialect, tmp_path, request):
    # odd bucket sizes and counts; runs at edges, a microsecond either side of them, and at random
    url = f"sqlite:///{tmp_path}/buckets.db" if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    start, step, count = dt.datetime(2025, 3, 1, 0, 0, 0, 250000, tzinfo=dt.timezone.utc), 97.3, 37
    end = start + dt.timedelta(seconds=step * count - 5)
    rng = random.Random(11)
    micro = dt.timedelta(microseconds=1)
    with prefectlite.serve(database=url) as api_url:
        client = Client(api_url)
        flow = new_flow(client)
        window = {"history_start": iso(start), "history_end": iso(end), "history_interval_seconds": step}
        edges = [parse(b["interval_start"]) for b in client.ok("POST", "/flow_runs/history", window)]
        assert len(edges) == count
        times = [
            start - micro,
            end,
            end - micro,
            *(rng.choice(edges) + rng.choice([-micro, 0 * micro, micro]) for _ in range(30)),
            *(start + dt.timedelta(seconds=rng.uniform(0, step * count)) for _ in range(30)),
        ]
        for when in times:
            new_flow_run(client, flow["id"], scheduled=when)
        buckets = client.ok("POST", "/flow_runs/history", {**window, "flow_runs": {"flow_id": {"any_": [flow["id"]]}}})
        got = [sum(s["count_runs"] for s in b["states"]) for b in buckets]
        expected = [0] * count
        for when in times:
            if start <= when < end:
                expected[bisect.bisect_right(edges, when) - 1] += 1
        assert got == expected


def test_task_run_history_buckets(client):
    run = new_flow_run(client)
    new_task_run(client, run["id"], scheduled=at(5))
    new_task_run(client, run["id"], scheduled=at(65))
    status, buckets = client.post(
        "/task_runs/history", {"history_start": iso(T0), "history_end": iso(at(120)), "history_interval_seconds": 3600}
    )
    assert status == 200, buckets
    assert [sum(s["count_runs"] for s in b["states"]) for b in buckets] == [1, 1]


def _dag(client):
    run = new_flow_run(client)
    set_state(client, "flow", run["id"], "RUNNING")
    first = new_task_run(client, run["id"], task_key="extract")
    second = new_task_run(
        client,
        run["id"],
        task_key="transform",
        task_inputs={
            "data": [{"input_type": "task_run", "id": first["id"]}],
            "n": [{"input_type": "parameter", "name": "n"}],
        },
    )
    third = new_task_run(
        client,
        run["id"],
        task_key="load",
        task_inputs={
            "rows": [{"input_type": "task_run", "id": second["id"]}],
            "raw": [{"input_type": "task_run", "id": first["id"]}],
        },
    )
    return run, first, second, third


def test_flow_run_graph_links_task_inputs(client):
    run, first, second, third = _dag(client)
    status, graph = client.get(f"/flow_runs/{run['id']}/graph")
    assert status == 200, graph
    nodes = {node["id"]: node for node in graph}
    assert set(nodes) == {first["id"], second["id"], third["id"]}
    upstream = {
        node_id: {d["id"] for d in node["upstream_dependencies"] if d.get("input_type") == "task_run"}
        for node_id, node in nodes.items()
    }
    assert upstream == {first["id"]: set(), second["id"]: {first["id"]}, third["id"]: {first["id"], second["id"]}}
    assert nodes[first["id"]]["state"]["type"] == "PENDING"
    assert client.get(f"/flow_runs/{uuid.uuid4()}/graph")[0] == 404


def test_flow_run_graph_shows_3x_clients_their_state_details(client):
    """The graph's states are states too: Prefect 3.9 answers them with its details (DETAILS_3's defaults);
    a 2.x client gets none of those keys."""
    run, first, second, third = _dag(client)
    for headers, wanted in ((PREFECT3_AGENT, DETAILS_3), (None, {})):
        graph = client.ok("GET", f"/flow_runs/{run['id']}/graph", headers=headers)
        shown = [
            {key: node["state"]["state_details"][key] for key in DETAILS_3 if key in node["state"]["state_details"]}
            for node in graph
        ]
        assert shown == [wanted] * 3, (headers, shown)


def test_flow_run_graph_v2_links_parents_and_children(client):
    run, first, second, third = _dag(client)
    status, graph = client.get(f"/flow_runs/{run['id']}/graph-v2")
    assert status == 200, graph
    assert {"start_time", "end_time", "root_node_ids", "nodes", "artifacts", "states"} <= set(graph)
    nodes = {}
    for pair in graph["nodes"]:
        assert len(pair) == 2 and pair[0] == pair[1]["id"]
        nodes[pair[0]] = pair[1]
    assert set(nodes) == {first["id"], second["id"], third["id"]}
    assert graph["root_node_ids"] == [first["id"]]
    parents = {k: {p["id"] for p in n["parents"]} for k, n in nodes.items()}
    children = {k: {c["id"] for c in n["children"]} for k, n in nodes.items()}
    assert parents == {first["id"]: set(), second["id"]: {first["id"]}, third["id"]: {first["id"], second["id"]}}
    assert children == {first["id"]: {second["id"], third["id"]}, second["id"]: {third["id"]}, third["id"]: set()}
    assert all(n["kind"] == "task-run" for n in nodes.values())
    assert nodes[second["id"]]["label"] == second["name"]
    assert [s["type"] for s in graph["states"]] == ["PENDING", "RUNNING"]
    assert client.get(f"/flow_runs/{uuid.uuid4()}/graph-v2")[0] == 404


def test_subflow_is_linked_to_its_parent(client):
    parent = new_flow_run(client)
    set_state(client, "flow", parent["id"], "RUNNING")
    stand_in = new_task_run(client, parent["id"], task_key="child-flow")
    child = new_flow_run(client, parent_task_run_id=stand_in["id"])
    unrelated = new_flow_run(client)
    assert child["parent_task_run_id"] == stand_in["id"]

    assert filter_ids(client, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [parent["id"]]}}}) == [
        child["id"]
    ]
    assert filter_ids(
        client, "/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"any_": [stand_in["id"]]}}}
    ) == [child["id"]]
    top_level = filter_ids(client, "/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": True}}})
    assert sorted(top_level) == sorted([parent["id"], unrelated["id"]])

    graph = client.ok("GET", f"/flow_runs/{parent['id']}/graph-v2")
    nodes = dict((k, v) for k, v in graph["nodes"])
    assert nodes[child["id"]]["kind"] == "flow-run"
    assert nodes[child["id"]]["label"] == child["name"]


# --- task runs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_task_runs_labels_are_prefects_and_shown_to_3x_clients(dialect, tmp_path, request):
    """As Prefect 3.9's server (with_system_labels_for_task_run, observed): a task run of a flow run has the
    flow run's labels, prefect.flow-run.id, then the labels its client sent over them; one without a flow run
    has only those sent. They are kept from the create (the same task again keeps the first labels) and
    shown by POST /task_runs/, GET /task_runs/{id} and /task_runs/filter to 3.x clients; 2.20's TaskRun has
    no labels, so 2.x callers never see them."""
    url = f"sqlite:///{tmp_path}/labels.db" if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url) as api_url:
        client = Client(api_url)
        flow = client.ok("POST", "/flows/", {"name": "labelled", "labels": {"team": "data"}})
        run = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "labels": {"over": "run"}})
        inherited = {"team": "data", "prefect.flow.id": flow["id"], "over": "run", "prefect.flow-run.id": run["id"]}
        body = {"flow_run_id": run["id"], "task_key": "t", "dynamic_key": "0"}
        plain = client.ok("POST", "/task_runs/", body, headers=PREFECT3_AGENT, expect=(201,))
        assert plain["labels"] == inherited
        sent = {"over": "task", "prefect.flow-run.id": "mine", "n": 1}
        own = client.ok(
            "POST", "/task_runs/", {**body, "dynamic_key": "1", "labels": sent}, headers=PREFECT3_AGENT, expect=(201,)
        )
        assert own["labels"] == {**inherited, **sent}
        again = client.ok(
            "POST", "/task_runs/", {**body, "dynamic_key": "1", "labels": {"x": "y"}}, headers=PREFECT3_AGENT
        )
        assert (again["id"], again["labels"]) == (own["id"], own["labels"])
        loose = {"task_key": "loose", "dynamic_key": "0"}
        assert client.ok("POST", "/task_runs/", loose, headers=PREFECT3_AGENT)["labels"] == {}
        loose_labelled = {"task_key": "loose", "dynamic_key": "1", "labels": {"a": True}}
        assert client.ok("POST", "/task_runs/", loose_labelled, headers=PREFECT3_AGENT)["labels"] == {"a": True}
        assert client.ok("GET", f"/task_runs/{own['id']}", headers=PREFECT3_AGENT)["labels"] == own["labels"]
        listed = client.ok("POST", "/task_runs/filter", {"sort": "ID_DESC"}, headers=PREFECT3_AGENT)
        by_id = {t["id"]: t["labels"] for t in listed}
        assert (by_id[plain["id"]], by_id[own["id"]]) == (inherited, {**inherited, **sent}) and len(by_id) == 4
        as_2x = [
            client.ok("POST", "/task_runs/", {**body, "dynamic_key": "2", "labels": {"a": "b"}}),
            client.ok("GET", f"/task_runs/{own['id']}"),
            *client.ok("POST", "/task_runs/filter", {}),
        ]
        assert [("labels" in t) for t in as_2x] == [False] * 7
        labels_of_2x = client.ok("GET", f"/task_runs/{as_2x[0]['id']}", headers=PREFECT3_AGENT)["labels"]
        assert labels_of_2x == {**inherited, "a": "b"}


def test_create_task_run_is_idempotent(client):
    run = new_flow_run(client)
    body = {"flow_run_id": run["id"], "task_key": "extract", "dynamic_key": "0", "name": "extract-0"}
    status, first = client.post("/task_runs/", body)
    assert status == 201, first
    assert first["name"] == "extract-0" and first["state_type"] == "PENDING"
    status, again = client.post("/task_runs/", body)
    assert status == 200, again
    assert again["id"] == first["id"]
    status, other = client.post("/task_runs/", {**body, "dynamic_key": "1"})
    assert status == 201 and other["id"] != first["id"]
    other_run = new_flow_run(client)
    status, elsewhere = client.post("/task_runs/", {**body, "flow_run_id": other_run["id"]})
    assert status == 201 and elsewhere["id"] != first["id"]


def test_a_task_run_takes_the_id_its_client_chose(client):
    """PrefectClient.create_task_run(id=...) sends it; Prefect's servers (2.20, 3.9) keep it."""
    run = new_flow_run(client)
    chosen, loose = str(uuid.uuid4()), str(uuid.uuid4())
    body = {"id": chosen, "flow_run_id": run["id"], "task_key": "load", "dynamic_key": "0"}
    assert client.ok("POST", "/task_runs/", body, expect=(201,))["id"] == chosen
    assert client.ok("GET", f"/task_runs/{chosen}")["task_key"] == "load"
    state = client.ok("GET", f"/task_runs/{chosen}")["state"]
    assert state["state_details"]["task_run_id"] == chosen
    # The same task again (any id): the existing run, as without an id.
    assert client.ok("POST", "/task_runs/", {**body, "id": loose}, expect=(200,))["id"] == chosen
    # Without a flow run, too.
    bare = {"id": loose, "task_key": "bare", "dynamic_key": "0"}
    assert client.ok("POST", "/task_runs/", bare, expect=(201,))["id"] == loose
    # An id taken by another task run is a conflict, not a 500 nor the other run.
    status, body = client.post("/task_runs/", {**bare, "task_key": "other"})
    assert status == 409 and "id" in body["detail"], body


def assert_created_as_it_reads_back(client, collection, bodies):
    for body in bodies:
        status, created = client.post(collection, body)
        assert status == 201, created
        read = client.ok("GET", f"{collection}{created['id']}")
        for key in ("estimated_start_time_delta", "estimated_run_time"):  # they follow the clock
            created.pop(key), read.pop(key)
        assert created == read
        assert list(created) == list(read)  # the same fields in the same order


def test_a_created_task_run_is_answered_as_it_reads_back(client):
    """The create answer is built from the run as orchestrated, not read again: it must equal a read."""
    run = new_flow_run(client)
    client.ok("POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": "RUNNING"}})
    bodies = [
        {"flow_run_id": run["id"], "task_key": "plain", "dynamic_key": "0"},
        {
            "flow_run_id": run["id"],
            "task_key": "running",
            "dynamic_key": "0",
            "name": "r",
            "tags": ["a", "b"],
            "task_inputs": {"x": [{"input_type": "parameter", "name": "x"}]},
            "cache_key": "k",
            "empirical_policy": {"retries": 2, "retry_delay": 3},
            "state": {"type": "RUNNING"},
        },
        {
            "task_key": "no-flow-run",
            "dynamic_key": "0",
            "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": "2030-01-01T00:00:00+00:00"}},
        },
    ]
    assert_created_as_it_reads_back(client, "/task_runs/", bodies)


def test_a_created_flow_run_is_answered_as_it_reads_back(client):
    """The create answer is built from the run as orchestrated, not read again: it must equal a read."""
    flow = client.ok("POST", "/flows/", {"name": f"reads-back-{uuid.uuid4().hex[:8]}"})
    parent = new_flow_run(client)
    task = client.ok("POST", "/task_runs/", {"flow_run_id": parent["id"], "task_key": "sub", "dynamic_key": "0"})
    bodies = [
        {"flow_id": flow["id"]},
        {
            "flow_id": flow["id"],
            "name": "n",
            "tags": ["a", "b"],
            "parameters": {"x": [1, {"y": None}]},
            "idempotency_key": "k",
            "empirical_policy": {"retries": 2, "retry_delay": 3},
            "state": {"type": "RUNNING", "message": "go"},
        },
        {"flow_id": flow["id"], "parent_task_run_id": task["id"], "state": {"type": "RUNNING"}},  # a subflow
        {
            "flow_id": flow["id"],
            "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": "2030-01-01T00:00:00+00:00"}},
        },
    ]
    assert_created_as_it_reads_back(client, "/flow_runs/", bodies)


def test_read_filter_count_delete_task_runs(client):
    run = new_flow_run(client)
    tasks = [
        new_task_run(client, run["id"], task_key="map", dynamic_key=str(i), tags=["m"] if i % 2 else [])
        for i in range(4)
    ]
    assert client.ok("GET", f"/task_runs/{tasks[0]['id']}")["dynamic_key"] == "0"
    assert client.get(f"/task_runs/{uuid.uuid4()}")[0] == 404
    assert client.ok("POST", "/task_runs/count", {}) == 4
    assert sorted(filter_ids(client, "/task_runs/filter", {"task_runs": {"tags": {"all_": ["m"]}}})) == sorted(
        [tasks[1]["id"], tasks[3]["id"]]
    )
    status, body = client.delete(f"/task_runs/{tasks[0]['id']}")
    assert status == 204, body
    assert client.get(f"/task_runs/{tasks[0]['id']}")[0] == 404
    assert client.delete(f"/task_runs/{tasks[0]['id']}")[0] == 404
    assert client.ok("POST", "/task_runs/count", {}) == 3


def test_task_run_of_unknown_flow_run_is_404(client):
    status, body = client.post("/task_runs/", {"flow_run_id": str(uuid.uuid4()), "task_key": "k", "dynamic_key": "0"})
    assert status == 404, body


# --- states ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flow", "task"])
def test_read_states_of_a_run(client, kind):
    flow_run = new_flow_run(client)
    if kind == "flow":
        run = flow_run
    else:
        set_state(client, "flow", flow_run["id"], "RUNNING")
        run = new_task_run(client, flow_run["id"])
    results = [set_state(client, kind, run["id"], t, force=False) for t in ("RUNNING", "COMPLETED")]

    status, states = client.get(f"/{kind}_run_states/?{kind}_run_id={run['id']}")
    assert status == 200, states
    assert [s["type"] for s in states] == ["PENDING", "RUNNING", "COMPLETED"]
    assert ids(states)[1:] == [r["state"]["id"] for r in results]
    for state in states:
        assert state["state_details"][f"{kind}_run_id"] == run["id"]
        assert {"id", "type", "name", "timestamp", "message", "data", "state_details"} <= set(state)

    one = client.ok("GET", f"/{kind}_run_states/{states[1]['id']}")
    assert one == states[1]
    assert client.get(f"/{kind}_run_states/{uuid.uuid4()}")[0] == 404
    assert client.get(f"/{kind}_run_states/?{kind}_run_id={uuid.uuid4()}") == (200, [])
    assert client.get(f"/{kind}_run_states/")[0] == 422


# --- logs --------------------------------------------------------------------------------------

LEVELS = (10, 20, 30, 40, 50)


@pytest.fixture
def logs(client):
    """500 log lines in one request: levels cycle 10..50, one second apart, two flow runs, half with a task run."""
    first, second = new_flow_run(client), new_flow_run(client)
    task = new_task_run(client, first["id"])
    entries = [
        {
            "name": "prefect.flow_runs",
            "level": LEVELS[i % 5],
            "message": f"line {i:03d}",
            "timestamp": iso(T0 + dt.timedelta(seconds=i)),
            "flow_run_id": first["id"] if i < 250 else second["id"],
            "task_run_id": task["id"] if i % 2 else None,
        }
        for i in range(500)
    ]
    status, body = client.post("/logs/", entries)
    assert status == 201, body
    assert body is None
    return {"first": first["id"], "second": second["id"], "task": task["id"], "entries": entries}


def all_logs(client, body):
    out, offset = [], 0
    while True:
        page = client.ok("POST", "/logs/filter", {**body, "offset": offset, "limit": 200})
        out += page
        if len(page) < 200:
            return out
        offset += 200


def test_logs_are_stored_as_sent(client, logs):
    stored = all_logs(client, {})
    assert len(stored) == 500
    assert [entry["message"] for entry in stored] == [e["message"] for e in logs["entries"]]
    first = stored[0]
    assert {"id", "created", "updated", "name", "level", "message", "timestamp", "flow_run_id", "task_run_id"} <= set(
        first
    )
    assert parse(first["timestamp"]) == T0 and first["level"] == 10


def test_log_filter_by_level(client, logs):
    assert len(all_logs(client, {"logs": {"level": {"ge_": 40}}})) == 200
    assert len(all_logs(client, {"logs": {"level": {"le_": 10}}})) == 100
    both = all_logs(client, {"logs": {"level": {"ge_": 20, "le_": 30}}})
    assert len(both) == 200 and {e["level"] for e in both} == {20, 30}


def test_log_filter_by_timestamp(client, logs):
    window = all_logs(
        client,
        {
            "logs": {
                "timestamp": {
                    "after_": iso(T0 + dt.timedelta(seconds=100)),
                    "before_": iso(T0 + dt.timedelta(seconds=199)),
                }
            }
        },
    )
    assert [e["message"] for e in window] == [f"line {i:03d}" for i in range(100, 200)]
    assert len(all_logs(client, {"logs": {"timestamp": {"before_": iso(T0 + dt.timedelta(seconds=9))}}})) == 10


def test_log_filter_by_flow_run_and_task_run(client, logs):
    assert len(all_logs(client, {"logs": {"flow_run_id": {"any_": [logs["first"]]}}})) == 250
    assert len(all_logs(client, {"logs": {"flow_run_id": {"any_": [logs["first"], logs["second"]]}}})) == 500
    no_task = all_logs(client, {"logs": {"task_run_id": {"is_null_": True}}})
    assert len(no_task) == 250 and all(e["task_run_id"] is None for e in no_task)
    with_task = all_logs(client, {"logs": {"task_run_id": {"is_null_": False}}})
    assert len(with_task) == 250 and all(e["task_run_id"] == logs["task"] for e in with_task)
    assert len(all_logs(client, {"logs": {"task_run_id": {"any_": [logs["task"]]}}})) == 250
    combined = all_logs(
        client,
        {"logs": {"flow_run_id": {"any_": [logs["second"]]}, "task_run_id": {"is_null_": True}, "level": {"ge_": 50}}},
    )
    assert len(combined) == 25


def test_log_sort_and_paging(client, logs):
    asc = client.ok("POST", "/logs/filter", {"sort": "TIMESTAMP_ASC", "limit": 3})
    assert [e["message"] for e in asc] == ["line 000", "line 001", "line 002"]
    desc = client.ok("POST", "/logs/filter", {"sort": "TIMESTAMP_DESC", "limit": 3})
    assert [e["message"] for e in desc] == ["line 499", "line 498", "line 497"]
    page = client.ok("POST", "/logs/filter", {"sort": "TIMESTAMP_ASC", "limit": 10, "offset": 5})
    assert [e["message"] for e in page] == [f"line {i:03d}" for i in range(5, 15)]
    default = client.ok("POST", "/logs/filter", {})
    assert len(default) == 200 and default[0]["message"] == "line 000"


def test_a_log_page_past_the_limit_is_refused_not_cut_short(client, logs):
    """Prefect answers a `limit` above PREFECT_API_DEFAULT_LIMIT (200) with a 422; a clamped answer made
    the 2.20 CLI's `flow-run logs --num-logs 500` stop at 200 lines."""
    status, body = client.post("/logs/filter", {"limit": 201})
    assert status == 422 and body["exception_detail"][0]["loc"] == ["body", "limit"], body
    assert len(client.ok("POST", "/logs/filter", {"limit": 200})) == 200
    # Prefect 3 answers in its own words, which the 3.9 CLI looks for ("Invalid limit") to page on by itself.
    status, body = client.post("/logs/filter", {"limit": 201}, headers={"User-Agent": "prefect/3.9.1 (API 0.8.4)"})
    assert (status, body) == (422, {"detail": "Invalid limit: must be less than or equal to 200."})


def test_deleting_a_flow_run_deletes_its_logs(client, logs):
    assert client.delete(f"/flow_runs/{logs['first']}")[0] == 204
    assert all_logs(client, {"logs": {"flow_run_id": {"any_": [logs["first"]]}}}) == []
    assert len(all_logs(client, {"logs": {"flow_run_id": {"any_": [logs["second"]]}}})) == 250


def test_logs_batch_validation_names_the_entry(client):
    status, body = client.post(
        "/logs/",
        [
            {"name": "x", "level": 20, "message": "ok", "timestamp": iso(T0)},
            {"name": "x", "level": "loud", "message": "bad", "timestamp": iso(T0)},
        ],
    )
    assert status == 422, body
    assert ["body", 1, "level"] in [d["loc"] for d in body["exception_detail"]]
    assert all_logs(client, {}) == []  # nothing of a refused batch is stored


# --- the filter language -----------------------------------------------------------------------


@pytest.fixture
def runs(client):
    """Three flow runs of two flows: alpha COMPLETED (tags a, b), Beta RUNNING (tag b), gamma SCHEDULED."""
    etl = new_flow(client, "etl-flow")
    report = new_flow(client, "Report-Flow")
    alpha = new_flow_run(client, etl["id"], name="alpha-one", tags=["a", "b"], scheduled=at(-60))
    set_state(client, "flow", alpha["id"], "RUNNING")
    set_state(client, "flow", alpha["id"], "COMPLETED")
    beta = new_flow_run(client, etl["id"], name="Beta-two", tags=["b"])
    set_state(client, "flow", beta["id"], "RUNNING")
    gamma = new_flow_run(client, report["id"], name="gamma-three", scheduled=at(60), idempotency_key="g")
    runs = {
        name: client.ok("GET", f"/flow_runs/{run['id']}")
        for name, run in (("alpha", alpha), ("beta", beta), ("gamma", gamma))
    }
    runs["etl"], runs["report"] = etl, report
    return runs


def names_for(client, runs, body, path="/flow_runs/filter"):
    by_id = {runs[k]["id"]: k for k in ("alpha", "beta", "gamma")}
    return sorted(by_id[i] for i in filter_ids(client, path, body))


def test_filter_any_and_not_any(client, runs):
    assert names_for(client, runs, {"flow_runs": {"id": {"any_": [runs["alpha"]["id"], runs["gamma"]["id"]]}}}) == [
        "alpha",
        "gamma",
    ]
    assert names_for(client, runs, {"flow_runs": {"id": {"not_any_": [runs["alpha"]["id"]]}}}) == ["beta", "gamma"]
    assert names_for(client, runs, {"flow_runs": {"name": {"any_": ["Beta-two"]}}}) == ["beta"]
    assert names_for(client, runs, {"flow_runs": {"id": {"any_": []}}}) == []
    assert names_for(client, runs, {"flow_runs": {"state": {"type": {"any_": ["COMPLETED", "RUNNING"]}}}}) == [
        "alpha",
        "beta",
    ]
    assert names_for(client, runs, {"flow_runs": {"state": {"type": {"not_any_": ["COMPLETED"]}}}}) == ["beta", "gamma"]
    assert names_for(client, runs, {"flow_runs": {"state": {"name": {"any_": ["Scheduled"]}}}}) == ["gamma"]
    assert names_for(client, runs, {"flow_runs": {"idempotency_key": {"any_": ["g"]}}}) == ["gamma"]


def test_filter_like_is_case_insensitive(client, runs):
    assert names_for(client, runs, {"flow_runs": {"name": {"like_": "beta"}}}) == ["beta"]
    assert names_for(client, runs, {"flow_runs": {"name": {"like_": "ALPHA"}}}) == ["alpha"]
    assert names_for(client, runs, {"flow_runs": {"name": {"like_": "-t"}}}) == ["beta", "gamma"]
    flows = filter_ids(client, "/flows/filter", {"flows": {"name": {"like_": "report"}}})
    assert flows == [runs["report"]["id"]]


def test_filter_before_and_after(client, runs):
    alpha, beta = runs["alpha"], runs["beta"]
    started_after = {"flow_runs": {"start_time": {"after_": beta["start_time"]}}}
    assert names_for(client, runs, started_after) == ["beta"]
    started_before = {"flow_runs": {"start_time": {"before_": alpha["start_time"]}}}
    assert names_for(client, runs, started_before) == ["alpha"]
    expected = {"flow_runs": {"expected_start_time": {"after_": iso(at(0))}}}
    assert names_for(client, runs, expected) == ["gamma"]
    expected = {"flow_runs": {"expected_start_time": {"before_": iso(at(0))}}}
    assert names_for(client, runs, expected) == ["alpha", "beta"]  # beta is expected now, years before T0
    window = {"flow_runs": {"expected_start_time": {"after_": iso(at(-60)), "before_": iso(at(60))}}}
    assert names_for(client, runs, window) == ["alpha", "gamma"]  # both ends included
    ended = {"flow_runs": {"end_time": {"after_": "2000-01-01T00:00:00+00:00"}}}
    assert names_for(client, runs, ended) == ["alpha"]


def test_filter_is_null(client, runs):
    assert names_for(client, runs, {"flow_runs": {"start_time": {"is_null_": True}}}) == ["gamma"]
    assert names_for(client, runs, {"flow_runs": {"start_time": {"is_null_": False}}}) == ["alpha", "beta"]
    assert names_for(client, runs, {"flow_runs": {"tags": {"is_null_": True}}}) == ["gamma"]
    assert names_for(client, runs, {"flow_runs": {"tags": {"is_null_": False}}}) == ["alpha", "beta"]
    assert names_for(client, runs, {"flow_runs": {"deployment_id": {"is_null_": True}}}) == ["alpha", "beta", "gamma"]


def test_filter_tags_all_and_any(client, runs):
    assert names_for(client, runs, {"flow_runs": {"tags": {"all_": ["a", "b"]}}}) == ["alpha"]
    assert names_for(client, runs, {"flow_runs": {"tags": {"all_": ["b"]}}}) == ["alpha", "beta"]
    assert names_for(client, runs, {"flow_runs": {"tags": {"all_": ["a", "zzz"]}}}) == []
    assert names_for(client, runs, {"flow_runs": {"tags": {"any_": ["a", "zzz"]}}}) == ["alpha"]
    assert names_for(client, runs, {"flow_runs": {"tags": {"any_": ["a", "b"]}}}) == ["alpha", "beta"]
    assert names_for(client, runs, {"flow_runs": {"tags": {"all_": []}}}) == ["alpha", "beta", "gamma"]
    # any of no tags: none (as Prefect; it matched every run here)
    assert names_for(client, runs, {"flow_runs": {"tags": {"any_": []}}}) == []


def test_filter_tag_values_are_matched_exactly(client):
    flow = new_flow(client)
    runs = {
        "ab": new_flow_run(client, flow["id"], tags=["ab"]),
        "a%": new_flow_run(client, flow["id"], tags=['a"b', "x,y"]),
    }
    assert filter_ids(client, "/flow_runs/filter", {"flow_runs": {"tags": {"all_": ["a"]}}}) == []
    assert filter_ids(client, "/flow_runs/filter", {"flow_runs": {"tags": {"all_": ['a"b']}}}) == [runs["a%"]["id"]]
    assert filter_ids(client, "/flow_runs/filter", {"flow_runs": {"tags": {"all_": ["x,y"]}}}) == [runs["a%"]["id"]]


def test_filter_operator_or_and_nesting(client, runs):
    either = {
        "flow_runs": {"operator": "or_", "name": {"any_": ["alpha-one"]}, "state": {"type": {"any_": ["RUNNING"]}}}
    }
    assert names_for(client, runs, either) == ["alpha", "beta"]
    both = {
        "flow_runs": {"operator": "and_", "name": {"any_": ["alpha-one"]}, "state": {"type": {"any_": ["RUNNING"]}}}
    }
    assert names_for(client, runs, both) == []
    nested = {
        "flow_runs": {
            "tags": {"all_": ["b"]},
            "state": {"operator": "or_", "type": {"any_": ["COMPLETED"]}, "name": {"any_": ["Running"]}},
        }
    }
    assert names_for(client, runs, nested) == ["alpha", "beta"]
    nested_and = {
        "flow_runs": {"state": {"operator": "and_", "type": {"any_": ["COMPLETED"]}, "name": {"any_": ["Running"]}}}
    }
    assert names_for(client, runs, nested_and) == []
    inner_or = {"flow_runs": {"tags": {"operator": "or_", "all_": ["a"], "is_null_": True}}}
    assert names_for(client, runs, inner_or) == ["alpha", "gamma"]


def test_filter_across_objects(client, runs):
    by_flow = {"flows": {"name": {"any_": ["etl-flow"]}}}
    assert names_for(client, runs, by_flow) == ["alpha", "beta"]
    assert client.ok("POST", "/flow_runs/count", by_flow) == 2

    task = new_task_run(client, runs["beta"]["id"])
    new_task_run(client, runs["alpha"]["id"])
    assert filter_ids(client, "/task_runs/filter", {"flow_runs": {"id": {"any_": [runs["beta"]["id"]]}}}) == [
        task["id"]
    ]
    assert client.ok("POST", "/task_runs/count", {"flow_runs": {"id": {"any_": [runs["beta"]["id"]]}}}) == 1
    assert filter_ids(client, "/task_runs/filter", {"flows": {"name": {"any_": ["Report-Flow"]}}}) == []

    completed = filter_ids(client, "/flows/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
    assert completed == [runs["etl"]["id"]]
    scheduled = filter_ids(client, "/flows/filter", {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
    assert scheduled == [runs["report"]["id"]]
    assert client.ok("POST", "/flows/count", {"flow_runs": {"state": {"type": {"any_": ["CRASHED"]}}}}) == 0

    assert names_for(client, runs, {"task_runs": {"id": {"any_": [task["id"]]}}}) == ["beta"]


def test_filter_unknown_field_is_422(client, runs):
    status, body = client.post("/flow_runs/filter", {"flow_runs": {"colour": {"any_": ["red"]}}})
    assert status == 422, body
    assert body["exception_detail"][0]["loc"][:3] == ["body", "flow_runs", "colour"]
    status, body = client.post("/flow_runs/filter", {"flow_runs": {"name": {"sounds_like_": "x"}}})
    assert status == 422, body


# sorting


def _sorted_names(client, path, sort, body=None):
    status, items = client.post(path, {**(body or {}), "sort": sort})
    assert status == 200, (sort, items)
    return [item["name"] for item in items]


def test_every_flow_run_sort(client):
    flow = new_flow(client)
    # expected / next scheduled start times: b-run 10, a-run 20, c-run 30 minutes after T0
    scheduled = {
        "b-run": new_flow_run(client, flow["id"], name="b-run", scheduled=at(10)),
        "a-run": new_flow_run(client, flow["id"], name="a-run", scheduled=at(20)),
        "c-run": new_flow_run(client, flow["id"], name="c-run", scheduled=at(30)),
    }
    only = {"flow_runs": {"id": {"any_": ids(scheduled.values())}}}
    path = "/flow_runs/filter"
    assert _sorted_names(client, path, "NAME_ASC", only) == ["a-run", "b-run", "c-run"]
    assert _sorted_names(client, path, "NAME_DESC", only) == ["c-run", "b-run", "a-run"]
    assert _sorted_names(client, path, "EXPECTED_START_TIME_ASC", only) == ["b-run", "a-run", "c-run"]
    assert _sorted_names(client, path, "EXPECTED_START_TIME_DESC", only) == ["c-run", "a-run", "b-run"]
    assert _sorted_names(client, path, "NEXT_SCHEDULED_START_TIME_ASC", only) == ["b-run", "a-run", "c-run"]
    by_id = sorted(scheduled.values(), key=lambda r: r["id"], reverse=True)
    assert _sorted_names(client, path, "ID_DESC", only) == [r["name"] for r in by_id]

    # start and end times: started e, d, f; ended f, e, d
    started = {n: new_flow_run(client, flow["id"], name=n) for n in ("d-run", "e-run", "f-run")}
    for n in ("e-run", "d-run", "f-run"):
        set_state(client, "flow", started[n]["id"], "RUNNING")
    for n in ("f-run", "e-run", "d-run"):
        set_state(client, "flow", started[n]["id"], "COMPLETED")
    only = {"flow_runs": {"id": {"any_": ids(started.values())}}}
    assert _sorted_names(client, path, "START_TIME_ASC", only) == ["e-run", "d-run", "f-run"]
    assert _sorted_names(client, path, "START_TIME_DESC", only) == ["f-run", "d-run", "e-run"]
    assert _sorted_names(client, path, "END_TIME_DESC", only) == ["d-run", "e-run", "f-run"]


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_pages_of_many_runs_come_in_sort_order_and_match_single_reads(dialect, tmp_path, request):
    # The database writes a whole page of runs as one JSON text (run_json_select + json_array_agg):
    # the aggregate must keep the inner ORDER BY ... LIMIT order, page after page.
    url = f"sqlite:///{tmp_path}/pages.db" if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url) as api_url:
        client = Client(api_url)
        flow = new_flow(client)
        minutes = list(range(130))
        random.Random(7).shuffle(minutes)
        made = [new_flow_run(client, flow["id"], name=f"run-{m:03d}", scheduled=at(m)) for m in minutes]
        only = {"flow_runs": {"id": {"any_": ids(made)}}}
        for sort, expected in (
            ("EXPECTED_START_TIME_DESC", sorted(minutes, reverse=True)),
            ("EXPECTED_START_TIME_ASC", sorted(minutes)),
            ("NAME_DESC", sorted(minutes, reverse=True)),
        ):
            names = []
            for offset in (0, 50, 100):
                page = client.ok("POST", "/flow_runs/filter", {**only, "sort": sort, "limit": 50, "offset": offset})
                names += [run["name"] for run in page]
            assert names == [f"run-{m:03d}" for m in expected], sort
        assert client.ok("POST", "/flow_runs/filter", {**only, "offset": 500}) == []
        listed = {run["id"]: run for run in client.ok("POST", "/flow_runs/filter", {**only, "limit": 5})}
        for run_id, run in listed.items():
            single = client.ok("GET", f"/flow_runs/{run_id}")
            late = single.pop("estimated_start_time_delta"), run.pop("estimated_start_time_delta")
            assert single == run and late[0] >= late[1] >= 0


def test_start_time_sorts_fall_back_to_the_expected_start_time(client):
    # Prefect sorts START_TIME_* by coalesce(start_time, expected_start_time): a run that has not
    # started yet sorts by when it is expected to start.
    flow = new_flow(client)
    future = new_flow_run(client, flow["id"], name="not-started-future", scheduled=now() + dt.timedelta(days=1))
    past = new_flow_run(client, flow["id"], name="not-started-past", scheduled=now() - dt.timedelta(days=1))
    running = new_flow_run(client, flow["id"], name="started-now")
    set_state(client, "flow", running["id"], "RUNNING")
    only = {"flow_runs": {"id": {"any_": [future["id"], past["id"], running["id"]]}}}
    assert _sorted_names(client, "/flow_runs/filter", "START_TIME_ASC", only) == [
        "not-started-past",
        "started-now",
        "not-started-future",
    ]
    assert _sorted_names(client, "/flow_runs/filter", "START_TIME_DESC", only) == [
        "not-started-future",
        "started-now",
        "not-started-past",
    ]


def test_every_task_run_sort(client):
    run = new_flow_run(client)
    set_state(client, "flow", run["id"], "RUNNING")
    tasks = {
        "b-task": new_task_run(client, run["id"], name="b-task", scheduled=at(10)),
        "a-task": new_task_run(client, run["id"], name="a-task", scheduled=at(20)),
        "c-task": new_task_run(client, run["id"], name="c-task", scheduled=at(30)),
    }
    path = "/task_runs/filter"
    assert _sorted_names(client, path, "NAME_ASC") == ["a-task", "b-task", "c-task"]
    assert _sorted_names(client, path, "NAME_DESC") == ["c-task", "b-task", "a-task"]
    assert _sorted_names(client, path, "EXPECTED_START_TIME_ASC") == ["b-task", "a-task", "c-task"]
    assert _sorted_names(client, path, "EXPECTED_START_TIME_DESC") == ["c-task", "a-task", "b-task"]
    assert _sorted_names(client, path, "NEXT_SCHEDULED_START_TIME_ASC") == ["b-task", "a-task", "c-task"]
    by_id = sorted(tasks.values(), key=lambda r: r["id"], reverse=True)
    assert _sorted_names(client, path, "ID_DESC") == [t["name"] for t in by_id]
    for n in ("c-task", "a-task", "b-task"):
        set_state(client, "task", tasks[n]["id"], "COMPLETED")
    assert _sorted_names(client, path, "END_TIME_DESC") == ["b-task", "a-task", "c-task"]


def test_every_flow_sort(client):
    for name in ("m-flow", "z-flow", "a-flow"):
        new_flow(client, name)
    path = "/flows/filter"
    assert _sorted_names(client, path, "NAME_ASC") == ["a-flow", "m-flow", "z-flow"]
    assert _sorted_names(client, path, "NAME_DESC") == ["z-flow", "m-flow", "a-flow"]
    assert _sorted_names(client, path, "CREATED_DESC") == ["a-flow", "z-flow", "m-flow"]
    flow = client.ok("POST", "/flows/filter", {"flows": {"name": {"any_": ["m-flow"]}}})[0]
    client.ok("PATCH", f"/flows/{flow['id']}", {"tags": ["touched"]})
    assert _sorted_names(client, path, "UPDATED_DESC")[0] == "m-flow"
    assert _sorted_names(client, path, None) == ["a-flow", "m-flow", "z-flow"]  # NAME_ASC is the default


def test_default_flow_run_sort_is_id_desc(client):
    flow = new_flow(client)
    runs = [new_flow_run(client, flow["id"]) for _ in range(5)]
    assert filter_ids(client, "/flow_runs/filter", {}) == sorted(ids(runs), reverse=True)


def test_unknown_sort_is_422(client):
    status, body = client.post("/flow_runs/filter", {"sort": "SIDEWAYS"})
    assert status == 422, body
    assert body["exception_detail"][0]["loc"] == ["body", "sort"]


# paging


def test_limit_defaults_to_and_is_capped_at_200_and_offset_pages(client):
    for i in range(205):
        client.ok("POST", "/flows/", {"name": f"flow-{i:03d}"})
    assert client.ok("POST", "/flows/count", {}) == 205
    assert len(client.ok("POST", "/flows/filter", {})) == 200
    assert len(client.ok("POST", "/flows/filter", {"limit": 1000})) == 200
    assert [f["name"] for f in client.ok("POST", "/flows/filter", {"offset": 200})] == [
        f"flow-{i:03d}" for i in range(200, 205)
    ]
    page = client.ok("POST", "/flows/filter", {"limit": 3, "offset": 10})
    assert [f["name"] for f in page] == ["flow-010", "flow-011", "flow-012"]
    assert client.ok("POST", "/flows/filter", {"limit": 0}) == []
    assert client.ok("POST", "/flows/filter", {"offset": 10_000}) == []


# --- the read cache ----------------------------------------------------------------------------


def _cache_counts(api_url):
    status, _, body = get_raw(api_url + "/metrics")
    assert status == 200, body
    text = body.decode()
    return tuple(
        int(re.search(rf"^prefectlite_read_cache_{kind}_total (\d+)", text, re.M).group(1))
        for kind in ("hits", "misses")
    )


def test_read_cache_answers_repeats_and_never_hides_this_servers_writes(tmp_path):
    with prefectlite.serve(
        database=f"sqlite:///{tmp_path}/c.db",
        PREFECT_SERVER_METRICS_ENABLED=True,
        PREFECT_SERVER_READ_CACHE_SECONDS=600,
    ) as api_url:
        client = Client(api_url)
        flow = new_flow(client)
        window = {"history_start": iso(T0), "history_end": iso(at(60)), "history_interval_seconds": 600}
        count = {"flow_runs": {"flow_id": {"any_": [flow["id"]]}}}
        listing = {**count, "sort": "EXPECTED_START_TIME_DESC"}
        assert client.ok("POST", "/flow_runs/count", count) == 0
        assert client.ok("POST", "/flow_runs/filter", listing) == []
        hits, misses = _cache_counts(api_url)
        assert client.ok("POST", "/flow_runs/count", count) == 0
        assert client.ok("POST", "/flow_runs/filter", listing) == []
        assert _cache_counts(api_url) == (hits + 2, misses)
        for minute in (5, 15, 25):  # every write is seen by the very next read
            run = new_flow_run(client, flow["id"], scheduled=at(minute))
            assert client.ok("POST", "/flow_runs/count", count) == (minute + 5) // 10
            assert client.ok("POST", "/flow_runs/filter", listing)[0]["id"] == run["id"]
            buckets = client.ok("POST", "/flow_runs/history", {**window, **count})
            assert sum(s["count_runs"] for b in buckets for s in b["states"]) == (minute + 5) // 10
            set_state(client, "flow", run["id"], "COMPLETED")
            assert client.ok("POST", "/flow_runs/filter", listing)[0]["state_type"] == "COMPLETED"
            assert client.ok("POST", "/task_runs/count", {}) == 0
        # a different body is a different answer; a bad body is never cached
        assert client.ok("POST", "/flow_runs/count", {}) == 3
        for _ in range(2):
            status, body = client.post("/flow_runs/count", {"flow_runs": {"id": {"any_": ["not-a-uuid"]}}})
            assert status == 422, body


def test_read_cache_bounds_how_stale_another_process_writes_can_be(tmp_path):
    url = f"sqlite:///{tmp_path}/shared.db"
    max_age = 3.0
    with (
        prefectlite.serve(database=url, PREFECT_SERVER_READ_CACHE_SECONDS=max_age) as cached_url,
        prefectlite.serve(database=url, PREFECT_SERVER_READ_CACHE_SECONDS=0) as uncached_url,
    ):
        cached, uncached = Client(cached_url), Client(uncached_url)
        flow = new_flow(cached)
        body = {"flow_runs": {"flow_id": {"any_": [flow["id"]]}}}
        assert cached.ok("POST", "/flow_runs/count", body) == 0
        stored = time.monotonic()
        new_flow_run(uncached, flow["id"])  # written by the other server: this one's cache does not know
        assert uncached.ok("POST", "/flow_runs/count", body) == 1  # with the cache off: always fresh
        seen = cached.ok("POST", "/flow_runs/count", body)
        if time.monotonic() - stored < max_age:
            assert seen == 0  # still the cached answer, as documented
        # by design: the bound itself is under test, so the time passes in full (a poll would pass sooner)
        time.sleep(max(0.0, stored + max_age + 0.2 - time.monotonic()))
        assert cached.ok("POST", "/flow_runs/count", body) == 1


def test_read_cache_keeps_the_latest_generation_within_its_byte_budget():
    cache = prefectlite.ReadCache(max_age=60, max_bytes=800)
    answer = lambda n: prefectlite.RawBody(b"x" * n, "application/json")  # noqa: E731
    cache.put("a", 1, answer(90))
    cache.put("b", 1, answer(90))
    assert cache.get("a", 1).data == b"x" * 90 and cache.get("a", 2) is None  # a write happened: stale
    cache.put("c", 0, answer(90))  # computed before the write that generation 1 reflects: dropped
    assert cache.get("c", 0) is None and cache.get("c", 1) is None
    cache.put("too-big", 1, answer(101))  # more than an eighth of the budget: never kept
    assert cache.get("too-big", 1) is None
    for i in range(10):
        cache.put(f"k{i}", 1, answer(100))
    kept = [k for k in ("a", "b", *(f"k{i}" for i in range(10))) if cache.get(k, 1) is not None]
    assert kept == [f"k{i}" for i in range(2, 10)]  # the oldest went first, 800 bytes kept
    cache.put("new", 2, answer(10))
    assert cache.get("k9", 2) is None and cache.get("new", 2).data == b"x" * 10
    off = prefectlite.ReadCache(max_age=0)
    off.put("a", 1, answer(1))
    assert off.get("a", 1) is None


# --- meta routes -------------------------------------------------------------------------------


def test_health_and_versions(client):
    assert client.get("/health") == (200, True)
    assert client.get("/version") == (200, prefectlite.API_VERSION) == (200, "0.8.4")  # the API's, as Prefect
    assert client.get("/admin/version") == (200, prefectlite.PREFECT_SERVER_VERSION)
    assert prefectlite.PREFECT_SERVER_VERSION.startswith("2.")  # the 2.x SDK compares the major version


def test_admin_settings_mask_secrets(tmp_path):
    with prefectlite.serve(
        database=f"sqlite:///{tmp_path}/s.db",
        PREFECT_SERVER_API_AUTH_STRING="admin:s3cr3t-pw",
        PREFECT_API_DATABASE_PASSWORD="db-hunter2",
    ) as api_url:
        token = base64.b64encode(b"admin:s3cr3t-pw").decode()
        client = Client(api_url, headers={"Authorization": f"Basic {token}"})
        status, settings = client.get("/admin/settings")
        assert status == 200, settings
        assert "PREFECT_SERVER_API_AUTH_STRING" in settings
        assert settings["PREFECT_SERVER_API_AUTH_STRING"] not in ("admin:s3cr3t-pw", "", None)
        assert settings["PREFECT_API_DATABASE_PASSWORD"] != "db-hunter2"
        text = repr(settings)
        assert "s3cr3t" not in text and "hunter2" not in text
        assert settings["PREFECT_SERVER_API_PORT"] is not None  # the rest is shown


def test_csrf_token_route_when_protection_is_off(client):
    status, body = client.get(f"/csrf-token?client={uuid.uuid4()}")
    assert (status, body) == (422, {"detail": "CSRF protection is disabled."})
    assert client.post("/flows/", {"name": "no-token-needed"})[0] == 201


def test_csrf_protection(tmp_path):
    with prefectlite.serve(
        database=f"sqlite:///{tmp_path}/c.db", PREFECT_SERVER_CSRF_PROTECTION_ENABLED=True
    ) as api_url:
        client = Client(api_url)
        assert client.get("/health") == (200, True)
        assert client.get("/csrf-token")[0] == 422  # the client id is required
        status, issued = client.get("/csrf-token?client=my-client")
        assert status == 200, issued
        assert issued["client"] == "my-client" and issued["token"]
        assert parse(issued["expiration"]) > now()

        status, body = client.post("/flows/", {"name": "no-token"})
        assert status == 403, body
        assert "detail" in body
        status, body = client.post(
            "/flows/",
            {"name": "wrong-token"},
            headers={"Prefect-Csrf-Token": "nope", "Prefect-Csrf-Client": "my-client"},
        )
        assert status == 403, body
        status, body = client.post(
            "/flows/",
            {"name": "wrong-client"},
            headers={"Prefect-Csrf-Token": issued["token"], "Prefect-Csrf-Client": "other"},
        )
        assert status == 403, body
        good = {"Prefect-Csrf-Token": issued["token"], "Prefect-Csrf-Client": "my-client"}
        status, flow = client.post("/flows/", {"name": "with-token"}, headers=good)
        assert status == 201, flow
        assert client.request("DELETE", f"/flows/{flow['id']}")[0] == 403
        assert client.request("DELETE", f"/flows/{flow['id']}", headers=good)[0] == 204
        assert client.ok("POST", "/flows/count", {}, expect=(403,)) is not None  # reads by POST are writes too

        # a new token for the same client replaces the old one
        status, renewed = client.get("/csrf-token?client=my-client")
        assert status == 200 and renewed["token"] != issued["token"]
        fresh = {"Prefect-Csrf-Token": renewed["token"], "Prefect-Csrf-Client": "my-client"}
        assert client.post("/flows/", {"name": "renewed"}, headers=fresh)[0] == 201


def test_openapi_lists_every_route(client, server):
    status, doc = client.get("/openapi.json")
    assert status == 200, doc
    assert doc["openapi"].startswith("3.")
    missing = [(m, p) for m, p, _handler in prefectlite.ROUTES if m.lower() not in doc["paths"].get("/api" + p, {})]
    assert missing == []
    create = doc["paths"]["/api/flows/"]["post"]
    ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    assert "name" in schema["properties"] and "name" in schema.get("required", [])


# The 2.20 contract's routes we do not serve, as README.md's "What of the Prefect 2.20 and 3.9 APIs is not served"
# says (tests/compat/test_prefect3_sdk.py checks the 3.9 server's).
NOT_SERVED = UI_ONLY_ROUTES | {
    ("POST", "/admin/database/clear"),
    ("POST", "/admin/database/create"),
    ("POST", "/admin/database/drop"),
}


def test_automations_related_to_an_unknown_resource_are_none(client):
    """The 3.x CLI's `prefect deployment inspect` asks for them; a resource no automation names has none."""
    resource = f"prefect.deployment.{uuid.uuid4()}"
    assert client.get(f"/automations/related-to/{resource}") == (200, [])


def test_the_worker_type_catalogue_names_each_types_package(client):
    """`prefect worker start` reads which package provides a pool's worker type, to offer installing it."""
    status, catalogue = client.get("/collections/views/aggregate-worker-metadata")
    assert status == 200
    types = {kind: package for package, kinds in catalogue.items() for kind in kinds}
    assert types["kubernetes"] == "prefect-kubernetes" and types["process"] == "prefect"
    assert types["ecs"] == "prefect-aws" and types["docker"] == "prefect-docker"
    assert catalogue["prefect-kubernetes"]["kubernetes"]["type"] == "kubernetes"
    assert client.get("/collections/views/nope") == (404, {"detail": "View nope not found in registry"})
    assert client.get("/collections/views/demo-flows")[0] == 404  # known, but not kept offline


def test_every_route_of_the_2_20_contract_is_served_but_the_documented_few():
    contract_file = ROOT.parent / "shared" / "reference" / "prefect2-openapi.json"
    if not contract_file.exists():  # CI has ../shared beside the clone (and says so with this variable)
        (pytest.fail if os.environ.get("PREFECTLITE_REQUIRE_COMPAT") else pytest.skip)(f"no {contract_file}")
    contract = json.loads(contract_file.read_text(encoding="utf-8"))
    shape = lambda path: re.sub(r"\{[^}]+\}", "{}", path)  # noqa: E731 - parameter names differ
    served = {(method, shape(path)) for method, path, _handler in prefectlite.ROUTES}
    missing = {
        (method.upper(), path)
        for path, operations in contract["paths"].items()
        for method in operations
        if (method.upper(), shape(path)) not in served
    }
    assert missing == NOT_SERVED
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"served but these {len(NOT_SERVED)}," in readme


def test_api_docs_are_html(server):
    status, headers, body = get_raw(server + "/docs")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"<html" in body.lower() and b"/api/flows/" in body


# --- /paginate (Prefect 3): a /filter route's page by number, with the count and the number of pages ---------

PAGINATE_AGENT = {"User-Agent": "prefect/3.9.1 (API 0.8.4)"}


def _paginate_world(client):
    """Three flows named `<prefix>-a..c`, each with a deployment, a flow run and a task run, all tagged."""
    prefix = f"pg-{uuid.uuid4().hex[:8]}"
    for letter in "abc":
        flow = new_flow(client, name=f"{prefix}-{letter}")
        client.ok(
            "POST", "/deployments/", {"name": f"{prefix}-{letter}", "flow_id": flow["id"]}, headers=PAGINATE_AGENT
        )
        run = new_flow_run(client, flow["id"], tags=[prefix])
        new_task_run(client, run["id"], tags=[prefix])
    return prefix


@pytest.mark.parametrize("things", ["flows", "flow_runs", "task_runs", "deployments"])
def test_paginate_answers_a_filter_page_by_number_with_count_and_pages(client, things):
    prefix = _paginate_world(client)
    if things in ("flows", "deployments"):
        where = {things: {"name": {"like_": prefix}}}
    else:
        where = {things: {"tags": {"all_": [prefix]}}}

    def timeless(items):  # a run not started yet is late by more at each read
        return [{k: v for k, v in item.items() if k != "estimated_start_time_delta"} for item in items]

    def paginate(**body):
        status, answer = client.post(f"/{things}/paginate", {**where, **body}, headers=PAGINATE_AGENT)
        assert status == 200, answer
        return {**answer, "results": timeless(answer["results"])}

    def filtered(**body):
        return timeless(client.ok("POST", f"/{things}/filter", {**where, **body}, headers=PAGINATE_AGENT))

    first = paginate(limit=2)
    assert list(first) == ["results", "count", "limit", "pages", "page"]  # Prefect 3.9's order
    assert (first["count"], first["limit"], first["pages"], first["page"]) == (3, 2, 2, 1)
    assert first["results"] == filtered(limit=2)  # the /filter route's objects and default sort
    second = paginate(limit=2, page=2)
    assert (second["results"], second["page"]) == (filtered(limit=2, offset=2), 2)
    assert paginate(limit=2, page=5) == {"results": [], "count": 3, "limit": 2, "pages": 2, "page": 5}
    assert paginate(limit=0) == {"results": [], "count": 3, "limit": 0, "pages": 0, "page": 1}
    everything = paginate(page=None, offset=2)  # null means page 1; an offset is no field of this route
    assert (everything["limit"], everything["pages"], len(everything["results"])) == (200, 1, 3)
    sort = {"flows": "NAME_DESC", "deployments": "NAME_DESC", "flow_runs": "ID_DESC", "task_runs": "ID_DESC"}[things]
    assert paginate(sort=sort)["results"] == filtered(sort=sort)


@pytest.mark.parametrize("things", ["flows", "flow_runs", "task_runs", "deployments"])
@pytest.mark.parametrize(
    "body, field",
    [({"page": 0}, "page"), ({"page": "x"}, "page"), ({"limit": -1}, "limit"), ({"sort": "NOPE"}, "sort")],
)
def test_paginate_is_validated(client, things, body, field):
    status, answer = client.post(f"/{things}/paginate", body)
    assert status == 422, answer
    assert [err["loc"] for err in answer["exception_detail"]] == [["body", field]]


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_paginate_refuses_a_page_whose_offset_is_beyond_64_bit(dialect, tmp_path, request):
    # (page - 1) * limit is the offset: a page each field allows may still make one no database can take
    url = migrated_sqlite_url(tmp_path / "p.db") if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url) as api_url:
        client = Client(api_url)
        for things in ("flows", "flow_runs", "task_runs", "deployments"):
            for body in ({"page": 10**18}, {"page": 2**62 + 1, "limit": 2}):
                status, answer = client.post(f"/{things}/paginate", body)
                assert status == 422, (things, body, answer)
                assert [err["loc"] for err in answer["exception_detail"]] == [["body", "page"]]
            last = client.ok("POST", f"/{things}/paginate", {"page": 2**63 - 1, "limit": 1})  # the last that fits
            assert (last["results"], last["page"]) == ([], 2**63 - 1)


def test_paginate_is_answered_as_a_read_out_of_the_write_turnstile(app):
    # On SQLite writes take turns; a page only reads, so it waits for no writer and holds none up
    for things in ("flows", "flow_runs", "task_runs", "deployments"):
        assert not prefectlite.is_write_request(app, "POST", f"/api/{things}/paginate")
        assert not prefectlite.is_write_request(app, "POST", f"/api/{things}/filter")
    assert prefectlite.is_write_request(app, "POST", "/api/flow_runs/bulk_delete")


def test_paginate_refuses_a_limit_above_the_default_as_prefect_3_does(client):
    assert client.post("/flows/paginate", {"limit": 201}) == (
        422,
        {"detail": "Invalid limit: must be less than or equal to 200."},
    )


# --- bulk routes (Prefect 3): each object chosen by one filter, treated as the single route treats it -------


def test_flows_bulk_delete_deletes_the_chosen_flows(client):
    prefix = f"bd-{uuid.uuid4().hex[:8]}"
    flows = [new_flow(client, name=f"{prefix}-{n}") for n in range(3)]
    other = new_flow(client)
    run = new_flow_run(client, flows[0]["id"])
    chosen = {"flows": {"name": {"like_": prefix}}}
    assert client.ok("POST", "/flows/bulk_delete", {**chosen, "limit": 2}) == {"deleted": ids(flows[:2])}  # by name
    assert client.ok("POST", "/flows/bulk_delete", chosen) == {"deleted": [flows[2]["id"]]}
    assert client.ok("POST", "/flows/bulk_delete", chosen) == {"deleted": []}
    assert all(client.get(f"/flows/{flow['id']}")[0] == 404 for flow in flows)
    assert client.get(f"/flow_runs/{run['id']}")[0] == 404  # as DELETE /flows/{id}: its runs go with it
    assert client.get(f"/flows/{other['id']}")[0] == 200


def test_flow_runs_bulk_delete_deletes_the_chosen_runs_and_their_logs(client):
    tag = f"bd-{uuid.uuid4().hex[:8]}"
    runs = [new_flow_run(client, tags=[tag]) for _ in range(3)]
    other = new_flow_run(client)
    log = {"name": "x", "level": 20, "message": "m", "timestamp": iso(now()), "flow_run_id": runs[0]["id"]}
    client.ok("POST", "/logs/", [log])
    chosen = {"flow_runs": {"tags": {"all_": [tag]}}}
    newest_first = sorted(ids(runs), reverse=True)  # the /filter route's order: ID_DESC
    assert client.ok("POST", "/flow_runs/bulk_delete", {**chosen, "limit": 1}) == {"deleted": newest_first[:1]}
    assert client.ok("POST", "/flow_runs/bulk_delete", chosen) == {"deleted": newest_first[1:]}
    assert all(client.get(f"/flow_runs/{run['id']}")[0] == 404 for run in runs)
    assert client.ok("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [runs[0]["id"]]}}}) == []
    assert client.get(f"/flow_runs/{other['id']}")[0] == 200


@pytest.mark.parametrize("path", ["/flows/bulk_delete", "/flow_runs/bulk_delete"])
@pytest.mark.parametrize("body, field", [({"limit": 0}, "limit"), ({"limit": 51}, "limit"), ({"limit": None}, "limit")])
def test_bulk_delete_is_validated(client, path, body, field):
    status, answer = client.post(path, body)
    assert status == 422, answer
    assert [err["loc"] for err in answer["exception_detail"]] == [["body", field]]


def test_flow_runs_bulk_set_state_proposes_the_state_to_each_chosen_run(client):
    tag = f"bs-{uuid.uuid4().hex[:8]}"
    pending, running = (new_flow_run(client, tags=[tag]) for _ in range(2))
    set_state(client, "flow", running["id"], "RUNNING")
    done = new_flow_run(client, tags=[tag])
    set_state(client, "flow", done["id"], "COMPLETED")
    status, answer = client.post(
        "/flow_runs/bulk_set_state",
        {
            "flow_runs": {"tags": {"all_": [tag]}, "state": {"type": {"any_": ["SCHEDULED", "PENDING", "RUNNING"]}}},
            "state": {"type": "CANCELLED", "name": "Stopped"},
        },
    )
    assert status == 200, answer
    results = answer["results"]
    assert [r["flow_run_id"] for r in results] == sorted([pending["id"], running["id"]], reverse=True)
    for result in results:
        assert (result["status"], result["state"]["type"], result["state"]["name"]) == (
            "ACCEPT",
            "CANCELLED",
            "Stopped",
        )
        assert result["details"] == {"type": "accept_details"}
        assert client.ok("GET", f"/flow_runs/{result['flow_run_id']}")["state_name"] == "Stopped"
    assert client.ok("GET", f"/flow_runs/{done['id']}")["state_type"] == "COMPLETED"

    # Without force the rules apply as on /set_state: a running run does not go back to PENDING
    busy = new_flow_run(client)
    set_state(client, "flow", busy["id"], "RUNNING")
    one = {"flow_runs": {"id": {"any_": [busy["id"]]}}, "state": {"type": "PENDING"}}
    refused = client.ok("POST", "/flow_runs/bulk_set_state", one)["results"]
    single = client.post(f"/flow_runs/{busy['id']}/set_state", {"state": {"type": "PENDING"}})[1]
    assert single["status"] == "ABORT", single
    assert [(r["status"], r["details"]) for r in refused] == [(single["status"], single["details"])]
    assert client.ok("GET", f"/flow_runs/{busy['id']}")["state_type"] == "RUNNING"
    forced = client.ok("POST", "/flow_runs/bulk_set_state", {**one, "force": True})
    assert forced["results"][0]["status"] == "ACCEPT"
    assert client.ok("GET", f"/flow_runs/{busy['id']}")["state_type"] == "PENDING"
    none = {"flow_runs": {"tags": {"all_": ["no-such-tag"]}}, "state": {"type": "COMPLETED"}}
    assert client.ok("POST", "/flow_runs/bulk_set_state", none) == {"results": []}


@pytest.mark.parametrize(
    "body, field",
    [({}, "state"), ({"state": {"type": "NOPE"}}, "state"), ({"state": {"type": "COMPLETED"}, "limit": 51}, "limit")],
)
def test_flow_runs_bulk_set_state_is_validated(client, body, field):
    status, answer = client.post("/flow_runs/bulk_set_state", body)
    assert status == 422, answer
    assert [err["loc"][1] for err in answer["exception_detail"]] == [field]


def test_a_flow_runs_logs_download_as_csv_named_after_the_run(client, server):
    run = new_flow_run(client, name="my run/é")
    task_run = new_task_run(client, run["id"])
    logs = [
        {
            "name": "x",
            "level": 40,
            "message": "second",
            "timestamp": "2026-01-01T00:00:01.5+00:00",
            "flow_run_id": run["id"],
            "task_run_id": task_run["id"],
        },
        {
            "name": "x",
            "level": 20,
            "message": 'hello, "world"\nline2',
            "timestamp": "2026-01-01T02:00:00+02:00",
            "flow_run_id": run["id"],
        },
    ]
    client.ok("POST", "/logs/", logs)
    client.ok("POST", "/logs/", [{**logs[1], "flow_run_id": new_flow_run(client)["id"]}])  # another run's
    status, headers, body = get_raw(f"{server}/flow_runs/{run['id']}/logs/download")
    assert status == 200, body
    assert headers["Content-Type"] == "text/csv; charset=utf-8"
    assert headers["Content-Disposition"] == (
        "attachment; filename=\"flow-run-logs.csv\"; filename*=UTF-8''my%20run%2F%C3%A9-logs.csv"
    )
    assert body.decode() == (  # oldest first, times in UTC as Python prints them, the csv module's quoting
        "timestamp,level,flow_run_id,task_run_id,message\r\n"
        f'2026-01-01 00:00:00+00:00,20,{run["id"]},,"hello, ""world""\nline2"\r\n'
        f"2026-01-01 00:00:01.500000+00:00,40,{run['id']},{task_run['id']},second\r\n"
    )
    empty = new_flow_run(client)
    assert get_raw(f"{server}/flow_runs/{empty['id']}/logs/download")[2] == (
        b"timestamp,level,flow_run_id,task_run_id,message\r\n"
    )
    status, _, body = get_raw(f"{server}/flow_runs/{uuid.uuid4()}/logs/download")
    assert (status, json.loads(body)) == (404, {"detail": "Flow run not found"})


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_flow_runs_logs_download_is_bounded(dialect, tmp_path, request, monkeypatch):
    # The CSV is answered whole, so held whole in memory: a run with more logs than the bound (here lowered)
    # is refused with the reason, not built however large its logs (a client writes as many as it likes).
    monkeypatch.setattr(prefectlite, "LOG_DOWNLOAD_MAX_BYTES", 3_500, raising=False)
    url = migrated_sqlite_url(tmp_path / "l.db") if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url) as api_url:
        client = Client(api_url)

        def download(run):
            status, headers, body = get_raw(f"{api_url}/flow_runs/{run['id']}/logs/download")
            if status != 200:
                assert (status, headers["Content-Type"]) == (422, "application/json"), body
                assert "too large to download at once" in json.loads(body)["detail"]
            return status, body

        run = new_flow_run(client)
        log = {"name": "x", "level": 20, "message": "é" * 500, "timestamp": iso(now()), "flow_run_id": run["id"]}
        client.ok("POST", "/logs/", [log] * 3)  # 3,000 bytes and three rows: still answered
        status, body = download(run)
        assert (status, body.count("é".encode())) == (200, 1_500)
        client.ok("POST", "/logs/", [log])
        assert download(run)[0] == 422
        if dialect == "sqlite":  # where a text may hold a NUL (PostgreSQL refuses it), which ends its LENGTH
            other = new_flow_run(client)
            client.ok("POST", "/logs/", [{**log, "message": "\x00" + "x" * 999, "flow_run_id": other["id"]}] * 4)
            assert download(other)[0] == 422
