"""Deployments through real HTTP, in the Prefect 2.20 shapes: create-or-update by (flow, name), read by id
and by name, filter, count, patch, delete; creating flow runs from a deployment (parameters, tags,
idempotency, work queues); get_scheduled_flow_runs; the `schedules` list next to the older `schedule` +
`is_schedule_active` fields; pause / resume; parameter schemas and their enforcement; schedule validation."""

import datetime as dt
import json
import uuid

import pytest

import prefectlite
from helpers import Client, iso, migrated_sqlite_url, new_flow, now, parse, unique, wait_for_passes, wait_until


# --- helpers -----------------------------------------------------------------------------------


def new_deployment(client, flow_id=None, name=None, headers=None, **fields):
    flow_id = flow_id or new_flow(client)["id"]
    return client.ok(
        "POST", "/deployments/", {"name": name or unique("dep"), "flow_id": flow_id, **fields}, headers=headers
    )


def run_from(client, dep_id, expect=(200, 201), **body):
    return client.ok("POST", f"/deployments/{dep_id}/create_flow_run", body, expect=expect)


def runs_of(client, dep_id, **flow_run_filter):
    runs = client.ok(
        "POST",
        "/flow_runs/filter",
        {
            "deployments": {"id": {"any_": [dep_id]}},
            "flow_runs": flow_run_filter or None,
            "sort": "EXPECTED_START_TIME_ASC",
        },
    )
    assert all(r["deployment_id"] == dep_id for r in runs), runs
    return runs


def locs(payload):
    """The `loc` tuples of a 422 answer (Prefect 2's shape: {"exception_message", "exception_detail":
    [{"loc", "msg", "type"}, ...], "request_body"})."""
    detail = payload.get("exception_detail") if isinstance(payload, dict) else None
    assert isinstance(detail, list) and detail, payload
    return [tuple(error["loc"]) for error in detail]


DEPLOYMENT_FIELDS = {
    "id",
    "created",
    "updated",
    "name",
    "version",
    "description",
    "flow_id",
    "schedule",
    "is_schedule_active",
    "paused",
    "schedules",
    "parameters",
    "tags",
    "work_queue_name",
    "last_polled",
    "parameter_openapi_schema",
    "path",
    "pull_steps",
    "entrypoint",
    "manifest_path",
    "storage_document_id",
    "infrastructure_document_id",
    "created_by",
    "updated_by",
    "work_pool_name",
    "status",
    "enforce_parameter_schema",
    "infra_overrides",
}

PARAM_SCHEMA = {
    "title": "Parameters",
    "type": "object",
    "properties": {
        "x": {"title": "x", "position": 0, "type": "integer"},
        "label": {"title": "label", "position": 1, "type": "string", "default": "hi"},
    },
    "required": ["x"],
}


@pytest.fixture
def quiet_client(tmp_path):
    """A server whose scheduler is off: only the runs a test creates exist."""
    with prefectlite.serve(
        database=f"sqlite:///{tmp_path}/quiet.db", port=0, PREFECT_API_SERVICES_SCHEDULER_ENABLED=False
    ) as api_url:
        yield Client(api_url)


@pytest.fixture
def fast_client(tmp_path):
    """A server whose scheduler passes every 0.2 s."""
    with prefectlite.serve(
        database=migrated_sqlite_url(tmp_path / "fast.db"),
        port=0,
        PREFECT_SERVER_METRICS_ENABLED=True,  # its passes are counted: wait_for_passes
        PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS=0.2,
    ) as api_url:
        yield Client(api_url)


# --- create, read, update, delete --------------------------------------------------------------


def test_create_returns_the_2_20_shape(client):
    flow = new_flow(client)
    status, dep = client.post(
        "/deployments/",
        {
            "name": "nightly",
            "flow_id": flow["id"],
            "version": "v1",
            "description": "the nightly run",
            "parameters": {"x": 1},
            "tags": ["etl", "prod"],
            "path": "/srv/flows",
            "entrypoint": "etl.py:main",
            "schedules": [],
            "enforce_parameter_schema": False,
            "infra_overrides": {},
        },
    )
    assert status == 201, dep
    assert DEPLOYMENT_FIELDS <= set(dep), DEPLOYMENT_FIELDS - set(dep)
    uuid.UUID(dep["id"])
    assert (dep["name"], dep["flow_id"], dep["version"], dep["description"]) == (
        "nightly",
        flow["id"],
        "v1",
        "the nightly run",
    )
    assert dep["parameters"] == {"x": 1}
    assert sorted(dep["tags"]) == ["etl", "prod"]
    assert (dep["path"], dep["entrypoint"]) == ("/srv/flows", "etl.py:main")
    assert dep["schedules"] == [] and dep["schedule"] is None
    assert dep["paused"] is False and dep["is_schedule_active"] is True
    assert dep["work_pool_name"] is None
    assert dep["status"] in ("NOT_READY", "READY")


PREFECT3_AGENT = {"User-Agent": "prefect/3.9.1 (API 0.8.4)"}  # what the 3.9 SDK's PrefectClient sends


def test_patching_a_deployment_with_labels_or_another_unknown_field_is_a_422(client):
    """Prefect's DeploymentUpdate (3.9's and 2.20's servers, observed) has no `labels` (they are set on create
    only) and forbids fields it does not define: PATCH /deployments/{id} with `labels` answers 422 and changes
    nothing. It drops the pool names older clients sent (worker_pool_name...), and 3.9 takes version_info:
    those still answer 204. We answered 204 to everything."""
    dep = new_deployment(client, headers=PREFECT3_AGENT, tags=["old"])
    for headers in (PREFECT3_AGENT, None):
        body = {"tags": ["new"], "labels": {"a": "b"}, "zz": 2}
        status, answer = client.patch(f"/deployments/{dep['id']}", body, headers=headers)
        assert status == 422, answer
        assert answer["exception_detail"] == [
            {"loc": ["body", key], "msg": "extra fields not permitted", "type": "value_error.extra"}
            for key in ("labels", "zz")
        ]
    read = client.ok("GET", f"/deployments/{dep['id']}", headers=PREFECT3_AGENT)
    assert (read["tags"], read["labels"]) == (["old"], dep["labels"])
    for body in ({"worker_pool_name": "x"}, {"version_info": {"type": "git", "version": "1"}}):
        assert client.patch(f"/deployments/{dep['id']}", body, headers=PREFECT3_AGENT)[0] == 204


def test_a_2x_client_patching_a_deployments_version_info_gets_2_20s_422(client):
    """Prefect 2.20's DeploymentUpdate has no version_info: PATCH /deployments/{id} with it answers 422 naming it
    as an extra field, beside any other (observed), and changes nothing; 3.9's takes it. We answered 204 to
    2.x clients too."""
    dep = new_deployment(client, tags=["old"])
    info = {"type": "git", "version": "1"}
    extra = {"msg": "extra fields not permitted", "type": "value_error.extra"}
    for headers in (None, {"User-Agent": "prefect/2.20.25 (API 0.8.4)"}):
        status, answer = client.patch(
            f"/deployments/{dep['id']}", {"tags": ["new"], "version_info": info}, headers=headers
        )
        assert (status, answer["exception_detail"]) == (422, [{"loc": ["body", "version_info"], **extra}]), answer
    status, answer = client.patch(f"/deployments/{dep['id']}", {"labels": {"a": "b"}, "version_info": info})
    assert (status, answer["exception_detail"]) == (
        422,
        [{"loc": ["body", "labels"], **extra}, {"loc": ["body", "version_info"], **extra}],
    )
    assert client.ok("GET", f"/deployments/{dep['id']}")["tags"] == ["old"]
    body = {"tags": ["new"], "version_info": info}
    assert client.patch(f"/deployments/{dep['id']}", body, headers=PREFECT3_AGENT) == (204, None)
    assert client.ok("GET", f"/deployments/{dep['id']}")["tags"] == ["new"]


def test_null_is_no_value_of_a_deployments_flags_and_schedules(client):
    """Prefect's servers (3.9 and 2.20, observed) answer 422 to a null `paused`, `schedules` or
    `enforce_parameter_schema` (and `is_schedule_active`), on create and on update, and to a null
    `job_variables` on create only; we took each (a 201 or a 204), so no SDK sends one."""
    flow = new_flow(client)
    dep = new_deployment(client, flow_id=flow["id"])
    for field in ("paused", "schedules", "enforce_parameter_schema", "is_schedule_active", "job_variables"):
        status, body = client.post("/deployments/", {"name": unique("dep"), "flow_id": flow["id"], field: None})
        assert status == 422, (field, body)
        assert [e["loc"] for e in body["exception_detail"]] == [["body", field]]
        status, body = client.patch(f"/deployments/{dep['id']}", {field: None})
        assert status == (204 if field == "job_variables" else 422), (field, body)
    assert [d["id"] for d in client.ok("POST", "/deployments/filter", {})] == [dep["id"]]


def test_job_variables_are_one_value_in_each_majors_shape(client):
    """The 2.20 SDK sends job variables as `infra_overrides` and refuses an answer where `job_variables`
    is set and differs (read_deployment, `prefect deployment ls` and workers broke); Prefect 2.20
    answers them as `infra_overrides` beside `"job_variables": null`. A 3.x SDK reads `job_variables`."""
    dep = new_deployment(client, infra_overrides={"image": "etl:2"})
    assert (dep["infra_overrides"], dep["job_variables"]) == ({"image": "etl:2"}, None)
    as_3x = client.request("GET", f"/deployments/{dep['id']}", headers=PREFECT3_AGENT)[1]
    assert as_3x["job_variables"] == {"image": "etl:2"} and "infra_overrides" not in as_3x
    from_3x = client.request(
        "POST",
        "/deployments/",
        {"name": unique("dep"), "flow_id": dep["flow_id"], "job_variables": {"cpu": 2}},
        headers=PREFECT3_AGENT,
    )[1]
    assert from_3x["job_variables"] == {"cpu": 2}
    listed = client.ok("POST", "/deployments/filter", {"deployments": {"id": {"any_": [from_3x["id"]]}}})
    assert [(d["infra_overrides"], d["job_variables"]) for d in listed] == [({"cpu": 2}, None)]
    client.ok("PATCH", f"/deployments/{dep['id']}", {"infra_overrides": {"image": "etl:3"}})
    assert client.ok("GET", f"/deployments/{dep['id']}")["infra_overrides"] == {"image": "etl:3"}


def test_answers_hold_only_the_fields_of_the_callers_major(client):
    """With PREFECT_TEST_MODE=1 the 2.20 SDK refuses a field its schema lacks (`concurrency_limit`
    broke users' test suites): 2.x callers get exactly the 2.20 contract's fields."""
    dep = new_deployment(client)
    flow_name = client.ok("GET", f"/flows/{dep['flow_id']}")["name"]
    by_name = client.ok("GET", f"/deployments/name/{flow_name}/{dep['name']}")
    expected = DEPLOYMENT_FIELDS | {"job_variables"}  # the 2.20 contract's DeploymentResponse
    for answer in (dep, client.ok("GET", f"/deployments/{dep['id']}"), by_name):
        assert set(answer) == expected, set(answer) ^ expected
    as_3x = client.request("GET", f"/deployments/{dep['id']}", headers=PREFECT3_AGENT)[1]
    assert {"concurrency_limit", "work_queue_id"} <= set(as_3x)
    assert not {"infra_overrides", "schedule", "is_schedule_active", "manifest_path"} & set(as_3x)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_deployments_labels_are_prefects_and_shown_to_3x_clients(dialect, tmp_path, request):
    """Prefect 3.9's server gives a deployment, on each create or upsert (whoever sends it), its flow's labels,
    then prefect.flow.id, then the labels sent (none sent: none kept); a run of it gets the deployment's
    labels, prefect.flow.id and prefect.deployment.id, then its own. 3.x callers read them; 2.20's
    DeploymentResponse has no such field (its SDK refuses unknown fields in test mode)."""
    url = f"sqlite:///{tmp_path}/labels.db" if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url, PREFECT_API_SERVICES_SCHEDULER_ENABLED=False) as api_url:
        client = Client(api_url)
        flow = client.ok("POST", "/flows/", {"name": "labelled", "labels": {"team": "data", "n": 1}})
        own = {"prefect.flow.id": flow["id"]}
        body = {"name": "d", "flow_id": flow["id"], "labels": {"dl": "v", "team": "over"}}
        dep = client.ok("POST", "/deployments/", body, headers=PREFECT3_AGENT)
        assert dep["labels"] == {"team": "over", "n": 1, **own, "dl": "v"}
        upserted = client.ok("POST", "/deployments/", {**body, "labels": {"z": 1}}, headers=PREFECT3_AGENT)
        assert (upserted["id"], upserted["labels"]) == (dep["id"], {"team": "data", "n": 1, **own, "z": 1})
        from_2x = client.ok("POST", "/deployments/", {"name": "d", "flow_id": flow["id"]})
        assert from_2x["id"] == dep["id"] and "labels" not in from_2x
        labels = {"team": "data", "n": 1, **own}
        assert client.ok("GET", f"/deployments/{dep['id']}", headers=PREFECT3_AGENT)["labels"] == labels
        by_name = client.ok("GET", "/deployments/name/labelled/d", headers=PREFECT3_AGENT)
        assert by_name["labels"] == labels
        plain = client.ok("POST", "/flows/", {"name": "plain"})
        other = new_deployment(client, plain["id"], name="e")
        listed = client.ok("POST", "/deployments/filter", {"sort": "NAME_ASC"}, headers=PREFECT3_AGENT)
        assert [d["labels"] for d in listed] == [labels, {"prefect.flow.id": plain["id"]}]
        as_2x = [
            other,
            client.ok("GET", f"/deployments/{dep['id']}"),
            client.ok("GET", "/deployments/name/labelled/d"),
            *client.ok("POST", "/deployments/filter", {}),
        ]
        assert [("labels" in d) for d in as_2x] == [False] * 5
        run = client.ok(
            "POST", f"/deployments/{dep['id']}/create_flow_run", {"labels": {"u": 1}}, headers=PREFECT3_AGENT
        )
        assert run["labels"] == {**labels, "prefect.deployment.id": dep["id"], "u": 1}


def test_a_deployment_concurrency_limit_is_a_global_limit_named_after_it(client):
    """Prefect 3 (`serve()`/`deploy(concurrency_limit=3)`) keeps a deployment's limit as the global
    concurrency limit `deployment:{id}` and answers it in full as `global_concurrency_limit` (it was
    dropped here); null removes it, as does deleting the deployment."""
    dep = new_deployment(
        client, headers=PREFECT3_AGENT, concurrency_limit=3, concurrency_options={"collision_strategy": "CANCEL_NEW"}
    )
    limit = dep["global_concurrency_limit"]
    assert (limit["name"], limit["limit"], limit["active"], limit["active_slots"]) == (
        f"deployment:{dep['id']}",
        3,
        True,
        0,
    )
    assert dep["concurrency_limit"] is None  # Prefect 3 answers null there
    assert dep["concurrency_options"] == {"collision_strategy": "CANCEL_NEW", "grace_period_seconds": None}
    assert client.ok("GET", f"/v2/concurrency_limits/deployment:{dep['id']}")["id"] == limit["id"]
    assert "global_concurrency_limit" not in client.ok("GET", f"/deployments/{dep['id']}")  # not a 2.20 field

    client.ok("PATCH", f"/deployments/{dep['id']}", {"concurrency_limit": 5}, headers=PREFECT3_AGENT)
    again = client.ok("GET", f"/deployments/{dep['id']}", headers=PREFECT3_AGENT)["global_concurrency_limit"]
    assert (again["id"], again["limit"]) == (limit["id"], 5)
    client.ok("PATCH", f"/deployments/{dep['id']}", {"concurrency_limit": None}, headers=PREFECT3_AGENT)
    assert client.ok("GET", f"/deployments/{dep['id']}", headers=PREFECT3_AGENT)["global_concurrency_limit"] is None
    assert client.get(f"/v2/concurrency_limits/deployment:{dep['id']}")[0] == 404

    shared = client.ok("POST", "/v2/concurrency_limits/", {"name": unique("shared"), "limit": 2})
    linked = new_deployment(client, headers=PREFECT3_AGENT, global_concurrency_limit_id=shared["id"])
    assert linked["global_concurrency_limit"]["id"] == shared["id"]
    owned = new_deployment(client, concurrency_limit=1)
    client.ok("DELETE", f"/deployments/{owned['id']}")
    assert client.get(f"/v2/concurrency_limits/deployment:{owned['id']}")[0] == 404

    flow_id = dep["flow_id"]
    for body, field in (
        ({"concurrency_limit": 0}, ["body", "concurrency_limit"]),
        (
            {"concurrency_options": {"collision_strategy": "WAIT"}},
            ["body", "concurrency_options", "collision_strategy"],
        ),
        (
            {"concurrency_options": {"collision_strategy": "ENQUEUE", "grace_period_seconds": 5}},
            ["body", "concurrency_options", "grace_period_seconds"],
        ),
        (
            {"concurrency_limit": 1, "global_concurrency_limit_id": shared["id"]},
            ["body", "global_concurrency_limit_id"],
        ),
    ):
        status, answer = client.post("/deployments/", {"name": unique("dep"), "flow_id": flow_id, **body})
        assert status == 422 and field in [e["loc"] for e in answer["exception_detail"]], answer


def test_paused_on_create_makes_the_schedule_inactive(client):
    """2.20 semantics: `is_schedule_active` is the opposite of `paused`, whichever of the two was sent."""
    dep = new_deployment(client, paused=True)
    assert (dep["paused"], dep["is_schedule_active"]) == (True, False)
    again = new_deployment(client, flow_id=dep["flow_id"], name=dep["name"], paused=False)
    assert (again["paused"], again["is_schedule_active"]) == (False, True)


def test_an_empty_schedules_list_gives_way_to_the_older_schedule_field(quiet_client):
    """The 2.20 SDK's create_deployment(schedule=...) sends `"schedules": []` beside `"schedule": {...}`:
    Prefect builds the deployment's schedule from `schedule` (it was dropped here)."""
    dep = new_deployment(quiet_client, schedules=[], schedule={"interval": 600})
    assert [s["schedule"]["interval"] for s in dep["schedules"]] == [600]
    assert dep["schedule"]["interval"] == 600 and dep["schedules"][0]["active"] is True
    none = new_deployment(quiet_client, schedules=[], schedule=None)
    assert none["schedules"] == [] and none["schedule"] is None


def test_create_twice_is_create_or_update_by_flow_and_name(client):
    flow = new_flow(client)
    status, first = client.post("/deployments/", {"name": "same", "flow_id": flow["id"], "description": "one"})
    assert status == 201, first
    status, second = client.post(
        "/deployments/", {"name": "same", "flow_id": flow["id"], "description": "two", "tags": ["b"]}
    )
    assert status == 200, second  # as Prefect's servers answer an update: 201 only when created
    assert second["id"] == first["id"]
    assert second["description"] == "two" and second["tags"] == ["b"]
    assert client.ok("POST", "/deployments/count", {"deployments": {"id": {"any_": [first["id"]]}}}) == 1
    # The same name under another flow is another deployment.
    other = new_deployment(client, new_flow(client)["id"], name="same")
    assert other["id"] != first["id"]


def test_create_for_unknown_flow_is_404(client):
    status, body = client.post("/deployments/", {"name": "orphan", "flow_id": str(uuid.uuid4())})
    assert status in (404, 409), body  # Prefect 2.20 answers 409 (a foreign key violation)


def test_create_without_name_or_flow_is_422(client):
    flow = new_flow(client)
    status, body = client.post("/deployments/", {"flow_id": flow["id"]})
    assert status == 422 and ("body", "name") in locs(body), body
    status, body = client.post("/deployments/", {"name": "x"})
    assert status == 422 and ("body", "flow_id") in locs(body), body


def test_read_by_id_and_by_name(client):
    flow = new_flow(client, unique("reader"))
    dep = new_deployment(client, flow["id"], name="by-name")
    assert client.ok("GET", f"/deployments/{dep['id']}")["name"] == "by-name"
    found = client.ok("GET", f"/deployments/name/{flow['name']}/by-name")
    assert found["id"] == dep["id"] and found["flow_id"] == flow["id"]
    assert client.get(f"/deployments/name/{flow['name']}/nope")[0] == 404
    assert client.get("/deployments/name/no-such-flow/by-name")[0] == 404
    assert client.get(f"/deployments/{uuid.uuid4()}")[0] == 404
    assert client.get("/deployments/not-a-uuid")[0] in (404, 422)


def test_filter_and_count(client):
    tag = unique("team")
    alpha = new_flow(client, unique("alpha"))
    beta = new_flow(client, unique("beta"))
    a1 = new_deployment(client, alpha["id"], name="a1", tags=[tag])
    a2 = new_deployment(client, alpha["id"], name="a2", tags=[tag, "extra"])
    b1 = new_deployment(client, beta["id"], name="b1", tags=[tag])
    mine = {"deployments": {"tags": {"all_": [tag]}}}
    assert sorted(d["id"] for d in client.ok("POST", "/deployments/filter", mine)) == sorted(
        [a1["id"], a2["id"], b1["id"]]
    )
    assert client.ok("POST", "/deployments/count", mine) == 3
    by_flow = client.ok("POST", "/deployments/filter", {**mine, "flows": {"name": {"any_": [alpha["name"]]}}})
    assert sorted(d["name"] for d in by_flow) == ["a1", "a2"]
    by_name = client.ok(
        "POST", "/deployments/filter", {"deployments": {"name": {"any_": ["b1"]}, "tags": {"all_": [tag]}}}
    )
    assert [d["id"] for d in by_name] == [b1["id"]]
    both_tags = client.ok("POST", "/deployments/filter", {"deployments": {"tags": {"all_": [tag, "extra"]}}})
    assert [d["id"] for d in both_tags] == [a2["id"]]
    assert client.ok("POST", "/deployments/count", {"deployments": {"id": {"any_": [str(uuid.uuid4())]}}}) == 0
    sorted_names = [d["name"] for d in client.ok("POST", "/deployments/filter", {**mine, "sort": "NAME_ASC"})]
    assert sorted_names == ["a1", "a2", "b1"]
    limited = client.ok("POST", "/deployments/filter", {**mine, "sort": "NAME_ASC", "limit": 1, "offset": 1})
    assert [d["name"] for d in limited] == ["a2"]


def test_patch_changes_only_what_was_sent(client):
    dep = new_deployment(client, description="before", tags=["keep"], parameters={"x": 1}, version="1")
    status, body = client.patch(f"/deployments/{dep['id']}", {"description": "after", "parameters": {"x": 2}})
    assert status == 204, body
    read = client.ok("GET", f"/deployments/{dep['id']}")
    assert read["description"] == "after" and read["parameters"] == {"x": 2}
    assert read["tags"] == ["keep"] and read["version"] == "1"
    assert client.patch(f"/deployments/{uuid.uuid4()}", {"description": "x"})[0] == 404
    status, body = client.patch(f"/deployments/{dep['id']}", {"tags": "not-a-list"})
    assert status == 422, body


def test_delete(quiet_client):
    client = quiet_client
    dep = new_deployment(client)
    scheduled = run_from(client, dep["id"])
    finished = run_from(client, dep["id"])
    client.ok("POST", f"/flow_runs/{finished['id']}/set_state", {"state": {"type": "COMPLETED"}, "force": True})
    status, body = client.delete(f"/deployments/{dep['id']}")
    assert status == 204, body
    assert client.get(f"/deployments/{dep['id']}")[0] == 404
    assert client.delete(f"/deployments/{dep['id']}")[0] == 404
    # Prefect deletes the deployment's SCHEDULED runs, auto- and hand-made: no worker may pick up a run of a
    # deployment that is gone. Runs that ran are history and stay.
    assert client.get(f"/flow_runs/{scheduled['id']}")[0] == 404
    assert client.get(f"/flow_runs/{finished['id']}")[0] == 200


def test_bulk_delete_deletes_the_chosen_deployments_as_delete_does(quiet_client):
    """Prefect 3's POST /deployments/bulk_delete: {deployments: filter, limit (1..50, 50)} -> {deleted: ids};
    each goes as DELETE /deployments/{id} takes it, its scheduled runs with it."""
    client = quiet_client
    prefix = unique("bulk")
    deps = [new_deployment(client, name=f"{prefix}-{n}") for n in range(3)]
    other = new_deployment(client)
    scheduled = run_from(client, deps[0]["id"])
    chosen = {"deployments": {"name": {"like_": prefix}}}
    first = client.ok("POST", "/deployments/bulk_delete", {**chosen, "limit": 2})
    assert first == {"deleted": [deps[0]["id"], deps[1]["id"]]}  # the /filter route's order: by name
    assert client.ok("POST", "/deployments/bulk_delete", chosen) == {"deleted": [deps[2]["id"]]}
    assert client.ok("POST", "/deployments/bulk_delete", chosen) == {"deleted": []}
    assert all(client.get(f"/deployments/{dep['id']}")[0] == 404 for dep in deps)
    assert client.get(f"/flow_runs/{scheduled['id']}")[0] == 404
    assert client.get(f"/deployments/{other['id']}")[0] == 200
    for bad in ({"limit": 0}, {"limit": 51}, {"deployments": "x"}):
        status, body = client.post("/deployments/bulk_delete", bad)
        assert status == 422 and [e["loc"][1] for e in body["exception_detail"]] == [next(iter(bad))], body


def test_bulk_create_flow_run_makes_each_run_as_create_flow_run_does(quiet_client):
    """Prefect 3's POST /deployments/{id}/create_flow_run/bulk: a list of DeploymentFlowRunCreate ->
    {results: [{flow_run_id, status CREATED or FAILED, error}]}, in order; a run whose parameters the schema
    refuses is FAILED and the others are made."""
    client = quiet_client
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    dep = new_deployment(
        client, parameters={"a": 1}, tags=["dep-tag"], enforce_parameter_schema=True, parameter_openapi_schema=schema
    )
    status, answer = client.post(
        f"/deployments/{dep['id']}/create_flow_run/bulk",
        [{"tags": ["x"]}, {"parameters": {"a": "no"}}, {"name": "named", "state": {"type": "RUNNING"}}],
    )
    assert status == 200, answer
    made, refused, named = answer["results"]
    assert made["status"] == "CREATED" and made["error"] is None
    assert refused["flow_run_id"] is None and refused["status"] == "FAILED"
    assert refused["error"].startswith("Parameter validation failed: Validation failed for field 'a'."), refused
    run = client.ok("GET", f"/flow_runs/{made['flow_run_id']}")
    assert (run["deployment_id"], sorted(run["tags"]), run["parameters"]) == (dep["id"], ["dep-tag", "x"], {"a": 1})
    assert run["state_type"] == "SCHEDULED"
    run = client.ok("GET", f"/flow_runs/{named['flow_run_id']}")
    assert (run["name"], run["state_type"]) == ("named", "RUNNING")
    assert len(runs_of(client, dep["id"])) == 2

    assert client.post(f"/deployments/{dep['id']}/create_flow_run/bulk", []) == (200, {"results": []})
    assert client.post(f"/deployments/{uuid.uuid4()}/create_flow_run/bulk", []) == (
        404,
        {"detail": "Deployment not found"},
    )
    too_many = [{} for _ in range(101)]
    assert client.post(f"/deployments/{dep['id']}/create_flow_run/bulk", too_many) == (
        400,
        {"detail": "Cannot create more than 100 flow runs at once."},
    )
    status, body = client.post(f"/deployments/{dep['id']}/create_flow_run/bulk", {})
    assert status == 422 and locs(body) == [("body",)], body
    status, body = client.post(f"/deployments/{dep['id']}/create_flow_run/bulk", [{}, {"tags": "x"}])
    assert status == 422 and locs(body) == [("body", 1, "tags")], body


# --- flow runs from a deployment ---------------------------------------------------------------


def test_create_flow_run_merges_parameters_and_tags(quiet_client):
    client = quiet_client
    dep = new_deployment(
        client, parameters={"a": 1, "b": 2, "nested": {"k": "v"}}, tags=["dep-tag", "shared"], version="7"
    )
    status, run = client.post(
        f"/deployments/{dep['id']}/create_flow_run",
        {"parameters": {"b": 3, "c": [1, 2]}, "tags": ["run-tag", "shared"]},
    )
    assert status == 201, run
    assert run["deployment_id"] == dep["id"] and run["flow_id"] == dep["flow_id"]
    assert run["parameters"] == {"a": 1, "b": 3, "nested": {"k": "v"}, "c": [1, 2]}
    assert sorted(run["tags"]) == ["dep-tag", "run-tag", "shared"]
    assert run["state_type"] == "SCHEDULED" and run["state_name"] == "Scheduled"
    assert run["state"]["state_details"]["scheduled_time"]
    assert run["auto_scheduled"] is False
    assert run["deployment_version"] == "7"
    assert abs((parse(run["expected_start_time"]) - now()).total_seconds()) < 60
    # No parameters at all: the deployment's defaults.
    plain = run_from(client, dep["id"])
    assert plain["parameters"] == {"a": 1, "b": 2, "nested": {"k": "v"}}
    # The deployment's own parameters are unchanged.
    assert client.ok("GET", f"/deployments/{dep['id']}")["parameters"] == {"a": 1, "b": 2, "nested": {"k": "v"}}


def test_create_flow_run_with_name_and_state(quiet_client):
    client = quiet_client
    dep = new_deployment(client)
    later = now() + dt.timedelta(hours=2)
    run = run_from(
        client,
        dep["id"],
        name="my-named-run",
        state={"type": "SCHEDULED", "state_details": {"scheduled_time": iso(later)}},
    )
    assert run["name"] == "my-named-run"
    assert abs((parse(run["expected_start_time"]) - later).total_seconds()) < 1
    assert abs((parse(run["next_scheduled_start_time"]) - later).total_seconds()) < 1


def test_create_flow_run_idempotency_key(quiet_client):
    client = quiet_client
    dep = new_deployment(client)
    first = run_from(client, dep["id"], idempotency_key="once", parameters={"n": 1})
    second = run_from(client, dep["id"], idempotency_key="once", parameters={"n": 2})
    assert second["id"] == first["id"]
    assert second["parameters"] == {"n": 1}
    third = run_from(client, dep["id"], idempotency_key="twice")
    assert third["id"] != first["id"]
    assert len(runs_of(client, dep["id"])) == 2


def test_create_flow_run_for_unknown_deployment_is_404(client):
    status, body = client.post(f"/deployments/{uuid.uuid4()}/create_flow_run", {})
    assert status == 404, body


def test_create_flow_run_goes_to_the_deployments_work_queue(quiet_client):
    client = quiet_client
    pool = unique("pool")
    client.ok("POST", "/work_pools/", {"name": pool, "type": "process"})
    client.ok("POST", f"/work_pools/{pool}/queues", {"name": "high"})
    dep = new_deployment(client, work_pool_name=pool)
    assert dep["work_pool_name"] == pool and dep["work_queue_name"] == "default"
    run = run_from(client, dep["id"])
    default_queue = client.ok("GET", f"/work_pools/{pool}/queues/default")
    assert run["work_queue_name"] == "default" and run["work_queue_id"] == default_queue["id"]
    # A run may go to another queue of the pool.
    high = client.ok("GET", f"/work_pools/{pool}/queues/high")
    routed = run_from(client, dep["id"], work_queue_name="high")
    assert routed["work_queue_name"] == "high" and routed["work_queue_id"] == high["id"]
    # A deployment pinned to a queue.
    pinned = new_deployment(client, work_pool_name=pool, work_queue_name="high")
    assert (pinned["work_pool_name"], pinned["work_queue_name"]) == (pool, "high")
    assert run_from(client, pinned["id"])["work_queue_id"] == high["id"]
    # The pool's worker sees both.
    offered = client.ok("POST", f"/work_pools/{pool}/get_scheduled_flow_runs", {})
    assert {o["flow_run"]["id"] for o in offered} >= {run["id"], routed["id"]}


def test_a_run_cannot_ask_for_a_work_queue_of_a_deployment_without_a_work_pool(quiet_client):
    """Prefect 3.9 refuses with a 400 (2.20 fails with a 500), and a bulk create fails that run alone, in
    shorter words; an empty queue name asks for none."""
    client = quiet_client
    dep = new_deployment(client)
    assert (dep["work_pool_name"], dep["work_queue_name"]) == (None, None)
    detail = (
        f"Cannot create flow run in work queue elsewhere because deployment {dep['id']} is not associated with a "
        "work pool. Please remove work_pool_name and try again."
    )
    for headers in ({}, PREFECT3_AGENT):
        status, body = client.post(
            f"/deployments/{dep['id']}/create_flow_run", {"work_queue_name": "elsewhere"}, headers=headers
        )
        assert (status, body) == (400, {"detail": detail})
    assert runs_of(client, dep["id"]) == []
    assert client.post("/work_queues/filter", {"work_queues": {"name": {"any_": ["elsewhere"]}}}) == (200, [])
    assert run_from(client, dep["id"], work_queue_name="")["work_queue_id"] is None

    status, answer = client.post(
        f"/deployments/{dep['id']}/create_flow_run/bulk", [{"work_queue_name": "elsewhere"}, {}], headers=PREFECT3_AGENT
    )
    assert status == 200, answer
    refused, made = answer["results"]
    assert refused == {
        "flow_run_id": None,
        "status": "FAILED",
        "error": "Cannot create flow run in work queue elsewhere because deployment is not associated with a work "
        "pool.",
    }
    assert made["status"] == "CREATED"


def test_create_with_unknown_work_pool_is_404(client):
    flow = new_flow(client)
    name = unique("nowhere")
    status, body = client.post(
        "/deployments/", {"name": name, "flow_id": flow["id"], "work_pool_name": unique("no-such-pool")}
    )
    assert status == 404, body
    assert client.get(f"/deployments/name/{flow['name']}/{name}")[0] == 404


def test_get_scheduled_flow_runs_of_deployments(quiet_client):
    client = quiet_client
    flow = new_flow(client)
    dep_a = new_deployment(client, flow["id"])
    dep_b = new_deployment(client, flow["id"])
    dep_c = new_deployment(client, flow["id"])
    past = now() - dt.timedelta(minutes=5)
    due_a = run_from(client, dep_a["id"], state={"type": "SCHEDULED", "state_details": {"scheduled_time": iso(past)}})
    due_b = run_from(client, dep_b["id"])
    future_a = run_from(
        client,
        dep_a["id"],
        state={"type": "SCHEDULED", "state_details": {"scheduled_time": iso(now() + dt.timedelta(hours=1))}},
    )
    pending_a = run_from(client, dep_a["id"], state={"type": "PENDING"})
    assert pending_a["state_type"] == "PENDING"
    run_from(client, dep_c["id"])  # another deployment: not asked for
    body = {"deployment_ids": [dep_a["id"], dep_b["id"]], "scheduled_before": iso(now() + dt.timedelta(seconds=5))}
    runs = client.ok("POST", "/deployments/get_scheduled_flow_runs", body)
    assert [r["id"] for r in runs] == [due_a["id"], due_b["id"]], "only due SCHEDULED runs, soonest first"
    assert all(r["state_type"] == "SCHEDULED" for r in runs)
    later = client.ok(
        "POST", "/deployments/get_scheduled_flow_runs", {**body, "scheduled_before": iso(now() + dt.timedelta(hours=2))}
    )
    assert [r["id"] for r in later] == [due_a["id"], due_b["id"], future_a["id"]]
    limited = client.ok("POST", "/deployments/get_scheduled_flow_runs", {**body, "limit": 1})
    assert [r["id"] for r in limited] == [due_a["id"]]
    assert client.ok("POST", "/deployments/get_scheduled_flow_runs", {"deployment_ids": []}) == []
    # Polling marks the deployment as polled.
    polled = client.ok("GET", f"/deployments/{dep_a['id']}")
    assert polled["last_polled"] is not None
    assert polled["status"] == "READY"


# --- schedules ---------------------------------------------------------------------------------


def test_schedules_list_and_the_older_single_schedule_fields(quiet_client):
    client = quiet_client
    hourly = {"interval": 3600.0, "anchor_date": "2030-01-01T00:00:00+00:00", "timezone": "UTC"}
    daily = {"cron": "0 9 * * *", "timezone": "Europe/Berlin", "day_or": True}
    dep = new_deployment(client, schedules=[{"schedule": hourly, "active": True}, {"schedule": daily, "active": False}])
    # (Prefect lists schedules newest-updated first; the order of schedules written together is not fixed.)
    by_kind = {("interval" if "interval" in s["schedule"] else "cron"): s for s in dep["schedules"]}
    assert len(dep["schedules"]) == 2 and set(by_kind) == {"interval", "cron"}, dep["schedules"]
    assert by_kind["interval"]["schedule"] == hourly and by_kind["cron"]["schedule"] == daily
    assert (by_kind["interval"]["active"], by_kind["cron"]["active"]) == (True, False)
    for s in dep["schedules"]:
        uuid.UUID(s["id"])
        assert s["deployment_id"] == dep["id"]
        assert s["catchup"] is False
    # The older fields stay filled: `schedule` is the first listed schedule, `is_schedule_active` = not paused.
    assert dep["schedule"] == dep["schedules"][0]["schedule"]
    assert dep["is_schedule_active"] is True and dep["paused"] is False
    listed = client.ok("GET", f"/deployments/{dep['id']}/schedules")
    assert [s["id"] for s in listed] == [s["id"] for s in dep["schedules"]]
    assert [s["id"] for s in client.ok("GET", f"/deployments/{dep['id']}")["schedules"]] == [
        s["id"] for s in dep["schedules"]
    ]

    # The older way of writing: `schedule` + `is_schedule_active`.
    old = new_deployment(client, schedule={"interval": 600}, is_schedule_active=False)
    assert len(old["schedules"]) == 1
    assert old["schedules"][0]["schedule"]["interval"] == 600
    assert old["schedule"]["interval"] == 600
    assert old["is_schedule_active"] is False and old["paused"] is True


def test_schedules_added_and_deleted_through_their_routes(quiet_client):
    client = quiet_client
    dep = new_deployment(client, schedules=[{"schedule": {"interval": 3600}}])
    status, added = client.post(
        f"/deployments/{dep['id']}/schedules", [{"schedule": {"cron": "*/5 * * * *"}, "active": False}]
    )
    assert status == 201, added
    schedules = client.ok("GET", f"/deployments/{dep['id']}/schedules")
    assert len(schedules) == 2
    cron = [s for s in schedules if "cron" in s["schedule"]]
    assert len(cron) == 1 and cron[0]["active"] is False
    status, body = client.delete(f"/deployments/{dep['id']}/schedules/{cron[0]['id']}")
    assert status == 204, body
    assert [s["schedule"].get("interval") for s in client.ok("GET", f"/deployments/{dep['id']}/schedules")] == [3600]
    assert client.delete(f"/deployments/{dep['id']}/schedules/{cron[0]['id']}")[0] == 404


def test_adding_schedules_answers_the_new_ones_and_keeps_the_others(quiet_client):
    """Prefect answers POST /deployments/{id}/schedules with the schedules it created; the deployment's
    other schedules stay as they were, ids included (they were re-created under new ids here)."""
    client = quiet_client
    dep = new_deployment(client, schedules=[{"schedule": {"interval": 3600}}])
    kept = dep["schedules"][0]["id"]
    status, added = client.post(
        f"/deployments/{dep['id']}/schedules",
        [{"schedule": {"cron": "0 * * * *"}}, {"schedule": {"interval": 60}, "active": False}],
    )
    assert status == 201, added
    assert [("cron" in s["schedule"], s["active"]) for s in added] == [(True, True), (False, False)]
    listed = {s["id"] for s in client.ok("GET", f"/deployments/{dep['id']}/schedules")}
    assert listed == {kept, *(s["id"] for s in added)}
    status, body = client.post(f"/deployments/{dep['id']}/schedules", [{"schedule": {"interval": -1}}])
    assert status == 422 and body["exception_detail"][0]["loc"][:2] == ["body", 0], body


def test_a_schedule_is_changed_through_its_route_and_its_unstarted_runs_made_again(quiet_client):
    """PATCH /deployments/{id}/schedules/{schedule_id} (the SDK's update_deployment_schedule, e.g.
    `prefect deployment schedule pause`): only what was sent changes; auto-scheduled runs not started
    yet are dropped, for the scheduler to make from the schedule as it now is."""
    client = quiet_client
    # at 09:30, not 09:00: a daily run at the hour would be the hourly schedule's run of that hour (one run a time)
    dep = new_deployment(client, schedules=[{"schedule": {"interval": 3600}}, {"schedule": {"cron": "30 9 * * *"}}])
    hourly, daily = sorted(
        client.ok("GET", f"/deployments/{dep['id']}/schedules"), key=lambda s: "cron" in s["schedule"]
    )
    client.ok("POST", f"/deployments/{dep['id']}/schedule", {"max_runs": 3})
    assert len(runs_of(client, dep["id"])) == 6
    assert client.patch(f"/deployments/{dep['id']}/schedules/{hourly['id']}", {"active": False}) == (204, None)
    after = {s["id"]: s for s in client.ok("GET", f"/deployments/{dep['id']}/schedules")}
    assert after[hourly["id"]]["active"] is False and after[hourly["id"]]["schedule"]["interval"] == 3600
    assert after[daily["id"]] == daily
    assert runs_of(client, dep["id"]) == []
    client.ok("POST", f"/deployments/{dep['id']}/schedule", {"max_runs": 3})
    assert len(runs_of(client, dep["id"])) == 3  # the paused schedule makes none

    status, _ = client.patch(f"/deployments/{dep['id']}/schedules/{daily['id']}", {"schedule": {"interval": 120}})
    assert status == 204
    changed = {s["id"]: s for s in client.ok("GET", f"/deployments/{dep['id']}/schedules")}[daily["id"]]
    assert changed["schedule"]["interval"] == 120 and changed["active"] is True
    status, body = client.patch(f"/deployments/{dep['id']}/schedules/{daily['id']}", {"schedule": {"interval": -1}})
    assert status == 422 and ("body", "schedule", "interval") in locs(body), body
    other = new_deployment(client)
    assert client.patch(f"/deployments/{other['id']}/schedules/{daily['id']}", {"active": False})[0] == 404
    assert client.patch(f"/deployments/{uuid.uuid4()}/schedules/{daily['id']}", {"active": False})[0] == 404


@pytest.fixture(params=["sqlite", "postgres"])
def quiet_any_db(request, tmp_path):
    """A server whose scheduler is off, on SQLite, then on PostgreSQL."""
    url = f"sqlite:///{tmp_path}/quiet.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url, port=0, PREFECT_API_SERVICES_SCHEDULER_ENABLED=False) as api_url:
        yield Client(api_url)


def test_a_schedules_slug_and_parameters_are_kept_changed_and_given_to_its_runs(quiet_any_db):
    """Prefect 3 schedules carry a slug and parameter overrides (PATCH with them answered 204 and changed
    nothing); the scheduler merges a schedule's parameters over the deployment's. 2.20 clients, which
    refuse fields their schema lacks, read schedules without them."""
    client = quiet_any_db
    dep = new_deployment(
        client,
        parameters={"x": 1, "y": 2},
        headers=PREFECT3_AGENT,
        schedules=[{"schedule": {"interval": 3600}, "slug": "hourly", "parameters": {"y": 3}}],
    )
    hourly = client.ok("GET", f"/deployments/{dep['id']}/schedules", headers=PREFECT3_AGENT)[0]
    assert (hourly["slug"], hourly["parameters"]) == ("hourly", {"y": 3})
    assert client.patch(
        f"/deployments/{dep['id']}/schedules/{hourly['id']}",
        {"slug": "every-hour", "parameters": {"y": 4}},
        headers=PREFECT3_AGENT,
    ) == (204, None)
    changed = client.ok("GET", f"/deployments/{dep['id']}/schedules", headers=PREFECT3_AGENT)[0]
    assert (changed["slug"], changed["parameters"], changed["active"]) == ("every-hour", {"y": 4}, True)
    client.ok("POST", f"/deployments/{dep['id']}/schedule", {"max_runs": 2})
    runs = runs_of(client, dep["id"])
    assert [r["parameters"] for r in runs] == [{"x": 1, "y": 4}] * 2
    assert runs[0]["created_by"] == {"id": hourly["id"], "type": "SCHEDULE", "display_value": "every-hour"}

    added = client.ok(
        "POST",
        f"/deployments/{dep['id']}/schedules",
        [{"schedule": {"interval": 60}, "slug": "minutely"}],
        headers=PREFECT3_AGENT,
    )
    assert [(s["slug"], s["parameters"]) for s in added] == [("minutely", {})]
    status, body = client.post(
        f"/deployments/{dep['id']}/schedules", [{"schedule": {"interval": 60}, "slug": "minutely"}]
    )
    assert status == 409 and "unique" in body["detail"], body
    status, body = client.patch(f"/deployments/{dep['id']}/schedules/{hourly['id']}", {"slug": "minutely"})
    assert status == 409, body
    status, body = client.patch(f"/deployments/{dep['id']}/schedules/{hourly['id']}", {"parameters": [1]})
    assert status == 422 and ("body", "parameters") in locs(body), body

    as_2x = client.ok("GET", f"/deployments/{dep['id']}")
    assert all(set(s) == SCHEDULE_FIELDS_2 for s in as_2x["schedules"]), as_2x["schedules"]
    assert all(set(s) == SCHEDULE_FIELDS_2 for s in client.ok("GET", f"/deployments/{dep['id']}/schedules"))
    as_3x = client.ok("GET", f"/deployments/{dep['id']}", headers=PREFECT3_AGENT)
    assert sorted(s["slug"] for s in as_3x["schedules"]) == ["every-hour", "minutely"]


def test_an_rrule_whose_dtstart_tzid_is_no_iana_zone_is_accepted(quiet_client):
    """`prefect deployment schedule create --rrule "DTSTART;TZID=US-Eastern:..." --timezone Asia/Seoul`
    (a Prefect CLI test) was a 422 here; Prefect accepts it and the explicit timezone is the schedule's."""
    rule = "DTSTART;TZID=US-Eastern:19970902T090000\nRRULE:FREQ=DAILY;COUNT=10"
    dep = new_deployment(quiet_client)
    [created] = quiet_client.ok(
        "POST", f"/deployments/{dep['id']}/schedules", [{"schedule": {"rrule": rule, "timezone": "Asia/Seoul"}}]
    )
    assert created["schedule"] == {"rrule": rule, "timezone": "Asia/Seoul"}


SCHEDULE_FIELDS_2 = {
    "id",
    "created",
    "updated",
    "deployment_id",
    "schedule",
    "active",
    "max_active_runs",
    "max_scheduled_runs",
    "catchup",
}  # the 2.20 contract's DeploymentSchedule
SCHEDULE_FIELDS_3 = SCHEDULE_FIELDS_2 - {"max_active_runs", "catchup"} | {"parameters", "slug"}  # 3.9's


def test_3x_clients_read_schedules_with_3_9s_fields(quiet_client):
    """Prefect 3.9's DeploymentSchedule (observed) has slug and parameters, and no longer max_active_runs nor
    catchup: a 3.x caller reads exactly its fields, in a deployment, its schedules, and the ones it adds."""
    client = quiet_client
    dep = new_deployment(client, headers=PREFECT3_AGENT, schedules=[{"schedule": {"interval": 3600}}])
    added = client.ok(
        "POST", f"/deployments/{dep['id']}/schedules", [{"schedule": {"interval": 60}}], headers=PREFECT3_AGENT
    )
    read = client.ok("GET", f"/deployments/{dep['id']}", headers=PREFECT3_AGENT)
    listed = client.ok("GET", f"/deployments/{dep['id']}/schedules", headers=PREFECT3_AGENT)
    schedules = [*dep["schedules"], *added, *read["schedules"], *listed]
    assert [set(s) for s in schedules] == [SCHEDULE_FIELDS_3] * 6, schedules


def test_schedule_route_makes_runs_between_start_and_end_a_backfill_in_the_past(quiet_client):
    """POST /deployments/{id}/schedule: the fewest runs from start_time that reach start_time + min_time
    and min_runs, before end_time and at most max_runs; idempotent (the same times make no second run)."""
    client = quiet_client
    dep = new_deployment(client, schedules=[{"schedule": {"interval": 3600, "anchor_date": "2020-01-01T00:00:00Z"}}])
    start = {"start_time": "2020-01-01T00:00:00Z", "max_runs": 100}
    client.ok("POST", f"/deployments/{dep['id']}/schedule", {**start, "min_runs": 2, "min_time": 0})
    assert len(runs_of(client, dep["id"])) == 2
    body = {**start, "end_time": "2020-01-01T05:30:00Z", "min_time": 86400}
    assert client.post(f"/deployments/{dep['id']}/schedule", body) == (200, None)
    times = [r["expected_start_time"][:19] for r in runs_of(client, dep["id"])]
    assert times == [f"2020-01-01T0{h}:00:00" for h in range(6)]  # 00:00 to 05:00, none at or after the end
    assert all(r["state_type"] == "SCHEDULED" and r["auto_scheduled"] for r in runs_of(client, dep["id"]))
    client.post(f"/deployments/{dep['id']}/schedule", body)
    assert len(runs_of(client, dep["id"])) == 6
    client.post(
        f"/deployments/{dep['id']}/schedule",
        {**body, "end_time": "2020-02-01T00:00:00Z", "max_runs": 2, "min_runs": 0, "min_time": 0},
    )
    assert len(runs_of(client, dep["id"])) == 6  # the first two hours: there already
    assert client.post(f"/deployments/{uuid.uuid4()}/schedule", {})[0] == 404
    status, body = client.post(f"/deployments/{dep['id']}/schedule", {"max_runs": -1})
    assert status == 422 and ("body", "max_runs") in locs(body), body


@pytest.mark.parametrize(
    "schedule, field",
    [
        ({"interval": -5}, "interval"),
        ({"interval": 0}, "interval"),
        ({"cron": "not a cron"}, "cron"),
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "0 9 * * *", "timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({"rrule": "FREQ=SOMETIMES"}, "rrule"),
        ({"interval": 60, "anchor_date": "yesterday-ish"}, "anchor_date"),
        ({"interval": 60, "cron": "* * * * *"}, "schedule"),
        ({"every": 60}, "schedule"),
    ],
)
def test_invalid_schedules_are_422_naming_the_field(quiet_client, schedule, field):
    client = quiet_client
    flow = new_flow(client)
    name = unique("bad")
    status, body = client.post(
        "/deployments/", {"name": name, "flow_id": flow["id"], "schedules": [{"schedule": schedule}]}
    )
    assert status == 422, body
    assert any(loc[:2] == ("body", "schedules") and field in loc for loc in locs(body)), body
    # Nothing half-created.
    assert client.get(f"/deployments/name/{flow['name']}/{name}")[0] == 404
    # The older single field is checked too, and PATCH as well.
    status, body = client.post("/deployments/", {"name": name, "flow_id": flow["id"], "schedule": schedule})
    assert status == 422, body
    assert any(field in loc for loc in locs(body)), body
    dep = new_deployment(client, flow["id"])
    status, body = client.patch(f"/deployments/{dep['id']}", {"schedules": [{"schedule": schedule}]})
    assert status == 422, body
    assert any(field in loc for loc in locs(body)), body
    assert client.ok("GET", f"/deployments/{dep['id']}")["schedules"] == []


# --- pause and resume --------------------------------------------------------------------------


def test_pause_and_resume(fast_client):
    client = fast_client
    dep = new_deployment(client, schedules=[{"schedule": {"interval": 600}, "active": True}])
    wait_until(lambda: len(runs_of(client, dep["id"])) >= 6, what="the scheduler to fill the schedule")
    manual = run_from(client, dep["id"])

    status, body = client.post(f"/deployments/{dep['id']}/pause_deployment")
    assert status in (200, 204), body
    paused = client.ok("GET", f"/deployments/{dep['id']}")
    assert paused["paused"] is True and paused["is_schedule_active"] is False
    # Its future auto-scheduled runs are gone; the hand-made run stays.
    remaining = runs_of(client, dep["id"])
    assert [r["id"] for r in remaining] == [manual["id"]], remaining
    wait_for_passes(client.api_url, "scheduler")  # a whole pass since the pause
    assert [r["id"] for r in runs_of(client, dep["id"])] == [manual["id"]], "a paused deployment got new runs"

    status, body = client.post(f"/deployments/{dep['id']}/resume_deployment")
    assert status in (200, 204), body
    resumed = client.ok("GET", f"/deployments/{dep['id']}")
    assert resumed["paused"] is False and resumed["is_schedule_active"] is True
    wait_until(
        lambda: len([r for r in runs_of(client, dep["id"]) if r["auto_scheduled"]]) >= 6, what="runs after resuming"
    )
    assert client.post(f"/deployments/{uuid.uuid4()}/pause_deployment")[0] == 404


def test_pause_and_resume_flip_a_single_schedules_active_flag(quiet_client):
    """Prefect 2.20 keeps the one schedule of an older-style deployment in step with pause / resume."""
    client = quiet_client
    dep = new_deployment(client, schedule={"interval": 3600})
    client.ok("POST", f"/deployments/{dep['id']}/pause_deployment")
    (schedule,) = client.ok("GET", f"/deployments/{dep['id']}")["schedules"]
    assert schedule["active"] is False
    client.ok("POST", f"/deployments/{dep['id']}/resume_deployment")
    (schedule,) = client.ok("GET", f"/deployments/{dep['id']}")["schedules"]
    assert schedule["active"] is True
    # The legacy spellings do the same.
    client.ok("POST", f"/deployments/{dep['id']}/set_schedule_inactive")
    read = client.ok("GET", f"/deployments/{dep['id']}")
    assert read["paused"] is True and read["is_schedule_active"] is False


def test_pause_through_patch_paused(fast_client):
    client = fast_client
    dep = new_deployment(client, schedules=[{"schedule": {"interval": 600}}])
    wait_until(lambda: runs_of(client, dep["id"]), what="scheduled runs")
    status, body = client.patch(f"/deployments/{dep['id']}", {"paused": True})
    assert status == 204, body
    read = client.ok("GET", f"/deployments/{dep['id']}")
    assert read["paused"] is True and read["is_schedule_active"] is False
    wait_for_passes(client.api_url, "scheduler")  # a whole pass since the pause
    # Created runs before the pause may remain, but no new ones appear: the count is stable.
    count = len(runs_of(client, dep["id"]))
    wait_for_passes(client.api_url, "scheduler")
    assert len(runs_of(client, dep["id"])) == count


# --- parameter schemas -------------------------------------------------------------------------


def test_parameter_openapi_schema_is_stored_and_returned(client):
    dep = new_deployment(client, parameter_openapi_schema=PARAM_SCHEMA)
    assert dep["parameter_openapi_schema"] == PARAM_SCHEMA
    assert client.ok("GET", f"/deployments/{dep['id']}")["parameter_openapi_schema"] == PARAM_SCHEMA
    assert dep["enforce_parameter_schema"] is False
    # Not enforced: anything goes.
    run = run_from(client, dep["id"], parameters={"x": "not an int"})
    assert run["parameters"] == {"x": "not an int"}


def test_enforced_schema_rejects_a_wrong_type(client):
    dep = new_deployment(client, parameter_openapi_schema=PARAM_SCHEMA, enforce_parameter_schema=True)
    assert dep["enforce_parameter_schema"] is True
    status, body = client.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": {"x": "seven"}})
    assert status == 422, body
    assert any(loc[-1] == "x" for loc in locs(body)), body
    status, body = client.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": {"x": 1, "label": 5}})
    assert status == 422, body
    assert any(loc[-1] == "label" for loc in locs(body)), body
    assert not any(loc[-1] == "x" for loc in locs(body)), body
    # A valid run goes through, and no run was left behind by the refusals.
    ok = run_from(client, dep["id"], parameters={"x": 7})
    assert ok["parameters"] == {"x": 7}
    assert [r["id"] for r in runs_of(client, dep["id"]) if not r["auto_scheduled"]] == [ok["id"]]


def test_enforced_schema_rejects_a_missing_required_parameter(client):
    dep = new_deployment(client, parameter_openapi_schema=PARAM_SCHEMA, enforce_parameter_schema=True)
    status, body = client.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": {"label": "x"}})
    assert status == 422, body
    assert any(loc[-1] == "x" for loc in locs(body)), body
    # A default on the deployment satisfies it.
    client.ok("PATCH", f"/deployments/{dep['id']}", {"parameters": {"x": 3}})
    assert run_from(client, dep["id"], parameters={"label": "x"})["parameters"] == {"x": 3, "label": "x"}


def test_enforcement_can_be_switched_off_per_run(client):
    dep = new_deployment(client, parameter_openapi_schema=PARAM_SCHEMA, enforce_parameter_schema=True)
    run = run_from(client, dep["id"], parameters={"x": "free text"}, enforce_parameter_schema=False)
    assert run["parameters"] == {"x": "free text"}


# --- readiness -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def short_poll_timeout(request, tmp_path):
    """A server whose deployments turn NOT_READY 1 s after their last poll (Prefect's foreman timeout; 60 s
    by default), on SQLite, then on PostgreSQL."""
    url = f"sqlite:///{tmp_path}/ready.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    with prefectlite.serve(
        database=url,
        port=0,
        PREFECT_API_SERVICES_SCHEDULER_ENABLED=False,
        PREFECT_API_SERVICES_FOREMAN_DEPLOYMENT_LAST_POLLED_TIMEOUT_SECONDS=1,
    ) as api_url:
        yield Client(api_url)


def test_a_workers_poll_makes_its_deployments_ready_until_polls_stop(short_poll_timeout):
    """As Prefect: a worker polling its pool (or one of its queues) marks the deployments of the polled queues
    as polled; a deployment not polled within the timeout is NOT_READY."""
    client = short_poll_timeout
    pool = unique("pool")
    client.ok("POST", "/work_pools/", {"name": pool, "type": "process"})
    client.ok("POST", f"/work_pools/{pool}/queues/", {"name": "other"})
    served = new_deployment(client, work_pool_name=pool)
    elsewhere = new_deployment(client, work_pool_name=pool, work_queue_name="other")
    assert client.ok("GET", f"/deployments/{served['id']}")["status"] == "NOT_READY"
    assert served["last_polled"] is None
    client.ok("POST", f"/work_pools/{pool}/get_scheduled_flow_runs", {"work_queue_names": ["default"]})
    polled = client.ok("GET", f"/deployments/{served['id']}")
    assert polled["status"] == "READY" and polled["last_polled"] is not None
    assert client.ok("GET", f"/deployments/{elsewhere['id']}")["last_polled"] is None, "its queue was not polled"
    listed = client.ok("POST", "/deployments/filter", {"deployments": {"id": {"any_": [served["id"]]}}})
    assert [d["status"] for d in listed] == ["READY"]
    # the worker stops polling: the deployment turns NOT_READY once the timeout has passed
    wait_until(
        lambda: client.ok("GET", f"/deployments/{served['id']}")["status"] == "NOT_READY",
        timeout=10,
        what="the deployment to turn NOT_READY",
    )
    # the older per-queue poll counts as well
    queue = client.ok("GET", f"/work_pools/{pool}/queues/other")
    client.ok("POST", f"/work_queues/{queue['id']}/get_runs", {})
    assert client.ok("GET", f"/deployments/{elsewhere['id']}")["status"] == "READY"


def test_a_stopped_runners_deployments_turn_not_ready(short_poll_timeout):
    """flow.serve() polls /deployments/get_scheduled_flow_runs for its deployments; once it stops, they turn
    NOT_READY (they stayed READY for good before)."""
    client = short_poll_timeout
    dep = new_deployment(client)
    client.ok("POST", "/deployments/get_scheduled_flow_runs", {"deployment_ids": [dep["id"]]})
    assert client.ok("GET", f"/deployments/{dep['id']}")["status"] == "READY"
    wait_until(
        lambda: client.ok("GET", f"/deployments/{dep['id']}")["status"] == "NOT_READY",
        timeout=10,
        what="the served deployment to turn NOT_READY",
    )


def test_next_schedule_times_of_each_schedule(quiet_client):
    """The UI shows a schedule's next five times (prefectlite's own read; Prefect's UI computes them itself)."""
    client = quiet_client
    daily = {"cron": "0 6 * * *", "timezone": "Europe/Berlin", "day_or": True}
    dep = new_deployment(
        client,
        schedules=[
            {"schedule": daily, "active": True},
            {"schedule": {"interval": 900.0, "anchor_date": "2030-01-01T00:00:00+00:00"}, "active": False},
        ],
    )
    answer = client.ok("GET", f"/deployments/{dep['id']}/next_schedule_times?count=5")
    assert [a["schedule_id"] for a in answer] == [s["id"] for s in dep["schedules"]]
    by_kind = {("cron" if "cron" in s["schedule"] else "interval"): a for s, a in zip(dep["schedules"], answer)}
    assert by_kind["cron"]["active"] is True and by_kind["interval"]["active"] is False
    cron_times = [parse(t) for t in by_kind["cron"]["times"]]
    assert len(cron_times) == 5 and cron_times == sorted(cron_times) and cron_times[0] > now()
    berlin = [t.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Berlin")) for t in cron_times]
    assert all((t.hour, t.minute) == (6, 0) for t in berlin), berlin
    assert [(b - a).days for a, b in zip(berlin, berlin[1:])] == [1, 1, 1, 1]
    interval_times = [parse(t) for t in by_kind["interval"]["times"]]
    assert [(b - a).total_seconds() for a, b in zip(interval_times, interval_times[1:])] == [900.0] * 4
    assert client.request("GET", f"/deployments/{dep['id']}/next_schedule_times?count=x")[0] == 422
    assert client.request("GET", f"/deployments/{dep['id']}/next_schedule_times?count=500")[0] == 422
    assert client.request("GET", f"/deployments/{uuid.uuid4()}/next_schedule_times")[0] == 404


def propose(client, run_id, state_type, name=None, **details):
    state = {"type": state_type, "name": name, "state_details": details}
    return client.ok("POST", f"/flow_runs/{run_id}/set_state", {"state": state}, headers=PREFECT3_AGENT)


def test_a_run_without_a_deployment_limit_never_carries_a_lease_detail(quiet_any_db):
    """A 2.20 SDK in test mode refuses any state detail it does not know: a run of a deployment without a
    concurrency limit goes PENDING and RUNNING without a `deployment_concurrency_lease_id` key (it crashed the
    2.20 runner: "extra fields not permitted")."""
    client = quiet_any_db
    dep = new_deployment(client)
    run = run_from(client, dep["id"])
    for state_type in ("PENDING", "RUNNING", "COMPLETED"):
        answer = client.ok("POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": state_type}})
        assert answer["status"] == "ACCEPT", answer
        assert "deployment_concurrency_lease_id" not in answer["state"]["state_details"], state_type
    assert (
        "deployment_concurrency_lease_id" not in client.ok("GET", f"/flow_runs/{run['id']}")["state"]["state_details"]
    )


def test_how_long_a_run_without_a_slot_is_put_back_is_a_setting(tmp_path):
    """Prefect 3's PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS (30 by default)."""
    with prefectlite.serve(
        database=f"sqlite:///{tmp_path}/wait.db",
        port=0,
        PREFECT_API_SERVICES_SCHEDULER_ENABLED=False,
        PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS=7,
    ) as api_url:
        client = Client(api_url)
        dep = new_deployment(client, headers=PREFECT3_AGENT, concurrency_limit=1)
        first, second = run_from(client, dep["id"]), run_from(client, dep["id"])
        assert propose(client, first["id"], "PENDING")["status"] == "ACCEPT"
        waiting = propose(client, second["id"], "PENDING")["state"]
        assert waiting["name"] == "AwaitingConcurrencySlot", waiting
        put_back = parse(waiting["state_details"]["scheduled_time"]) - parse(waiting["timestamp"])
        assert put_back == dt.timedelta(seconds=7), put_back


def test_a_deployment_concurrency_limit_holds_runs_back_with_leases(quiet_any_db):
    """Cause 14 of issue 23 (enforcement), as Prefect 3.9 does it: a run of a deployment with a concurrency
    limit takes a slot of `deployment:{id}` on its way to PENDING, under a lease (its id in the state's details,
    carried to RUNNING, renewed by the runner); over the limit, ENQUEUE reschedules it as AwaitingConcurrencySlot
    and CANCEL_NEW cancels it; leaving RUNNING gives the slot back."""
    client = quiet_any_db
    dep = new_deployment(client, headers=PREFECT3_AGENT, concurrency_limit=1)
    limit_name = f"deployment:{dep['id']}"
    first, second = run_from(client, dep["id"]), run_from(client, dep["id"])

    pending = propose(client, first["id"], "PENDING")
    assert pending["status"] == "ACCEPT", pending
    lease_id = pending["state"]["state_details"]["deployment_concurrency_lease_id"]
    assert lease_id
    assert client.ok("GET", f"/v2/concurrency_limits/{limit_name}")["active_slots"] == 1
    assert client.request("POST", f"/v2/concurrency_limits/leases/{lease_id}/renew", {"lease_duration": 60})[0] == 204

    waiting = propose(client, second["id"], "PENDING")
    assert waiting["status"] == "REJECT", waiting
    assert (waiting["state"]["type"], waiting["state"]["name"]) == ("SCHEDULED", "AwaitingConcurrencySlot")
    assert parse(waiting["state"]["state_details"]["scheduled_time"]) > now()
    assert client.ok("GET", f"/flow_runs/{second['id']}")["state_name"] == "AwaitingConcurrencySlot"

    running = propose(client, first["id"], "RUNNING")
    assert running["status"] == "ACCEPT", running
    assert running["state"]["state_details"]["deployment_concurrency_lease_id"] == lease_id
    assert propose(client, first["id"], "COMPLETED")["status"] == "ACCEPT"
    assert client.ok("GET", f"/v2/concurrency_limits/{limit_name}")["active_slots"] == 0
    assert client.request("POST", f"/v2/concurrency_limits/leases/{lease_id}/renew", {"lease_duration": 60})[0] == 410

    assert propose(client, second["id"], "PENDING")["status"] == "ACCEPT"
    assert client.ok("GET", f"/v2/concurrency_limits/{limit_name}")["active_slots"] == 1

    client.ok(
        "PATCH",
        f"/deployments/{dep['id']}",
        {"concurrency_options": {"collision_strategy": "CANCEL_NEW"}},
        headers=PREFECT3_AGENT,
        expect=(204,),
    )
    third = run_from(client, dep["id"])
    cancelled = propose(client, third["id"], "PENDING")
    assert cancelled["status"] == "REJECT", cancelled
    assert cancelled["state"]["type"] == "CANCELLED"
    assert cancelled["state"]["message"] == "Deployment concurrency limit reached."
    assert client.ok("GET", f"/v2/concurrency_limits/{limit_name}")["active_slots"] == 1

    # A run that crashes out of PENDING gives its slot back too.
    assert propose(client, second["id"], "CRASHED")["status"] == "ACCEPT"
    assert client.ok("GET", f"/v2/concurrency_limits/{limit_name}")["active_slots"] == 0


@pytest.mark.parametrize("bad", [{"x": 1}, "not-a-lease", 42])
def test_a_deployment_lease_id_that_is_not_a_uuid_is_422(quiet_client, bad):
    """A lease id sent as an object was stored, then every later state change of the run failed binding it (500):
    the run could never leave RUNNING."""
    client = quiet_client
    dep = new_deployment(client, headers=PREFECT3_AGENT)
    run = run_from(client, dep["id"])
    state = {"type": "PENDING", "state_details": {"deployment_concurrency_lease_id": bad}}
    status, body = client.request("POST", f"/flow_runs/{run['id']}/set_state", {"state": state}, headers=PREFECT3_AGENT)
    assert status == 422, body
    assert "deployment_concurrency_lease_id" in json.dumps(body)
    assert propose(client, run["id"], "PENDING")["status"] == "ACCEPT"
    assert propose(client, run["id"], "RUNNING")["status"] == "ACCEPT"
    assert propose(client, run["id"], "COMPLETED")["status"] == "ACCEPT"


def test_a_run_cannot_give_back_another_runs_deployment_slot(quiet_any_db):
    """A run's states name its lease; a run naming another run's lease neither renews nor releases it."""
    client = quiet_any_db
    limited = new_deployment(client, headers=PREFECT3_AGENT, concurrency_limit=1)
    limit_name = f"deployment:{limited['id']}"
    holder = run_from(client, limited["id"])
    lease_id = propose(client, holder["id"], "PENDING")["state"]["state_details"]["deployment_concurrency_lease_id"]
    other = run_from(client, new_deployment(client, headers=PREFECT3_AGENT)["id"])
    assert propose(client, other["id"], "PENDING", deployment_concurrency_lease_id=lease_id)["status"] == "ACCEPT"
    assert propose(client, other["id"], "RUNNING")["status"] == "ACCEPT"
    assert propose(client, other["id"], "CRASHED")["status"] == "ACCEPT"
    assert client.ok("GET", f"/v2/concurrency_limits/{limit_name}")["active_slots"] == 1
    assert client.request("POST", f"/v2/concurrency_limits/leases/{lease_id}/renew", {"lease_duration": 60})[0] == 204
    assert propose(client, holder["id"], "RUNNING")["status"] == "ACCEPT"
    assert propose(client, holder["id"], "COMPLETED")["status"] == "ACCEPT"
    assert client.ok("GET", f"/v2/concurrency_limits/{limit_name}")["active_slots"] == 0
