"""Events and what Prefect 3 clients need besides (section 11): storing events, the EventFilter language
of /events/filter, paging, /events/count-by, the task-run recorder (order and idempotency), flow-run
events, the version check, /admin/storage and concurrency leases. Over HTTP, on SQLite and PostgreSQL."""

import base64
import datetime as dt
import json
import urllib.request
import uuid

import pytest

from helpers import Client, new_flow_run

import prefectlite


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/events.db"
    else:
        url = request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url, port=0) as api_url:
        yield Client(api_url)


def at(seconds_ago: float) -> str:
    return prefectlite.iso(prefectlite.utcnow() - dt.timedelta(seconds=seconds_ago))


def event(name, resource_id, occurred=None, related=(), payload=None, **labels):
    return {
        "id": str(uuid.uuid4()),
        "occurred": occurred or at(0),
        "event": name,
        "resource": {"prefect.resource.id": resource_id, **labels},
        "related": list(related),
        "payload": payload or {},
    }


def related(resource_id, role, **labels):
    return {"prefect.resource.id": resource_id, "prefect.resource.role": role, **labels}


def post(api, *events):
    status, body = api.post("/events", list(events))
    assert status == 204, body
    return events


def ids(page):
    return [e["id"] for e in page["events"]]


def find(api, flt=None, limit=None):
    body = {"filter": flt or {}}
    if limit is not None:
        body["limit"] = limit
    return api.ok("POST", "/events/filter", body)


# ---------------------------------------------------------------------------------------------
# storing and reading


def test_events_round_trip_as_received_events(api):
    [sent] = post(
        api,
        event(
            "test.one",
            "test.thing.1",
            related=[related("test.other.1", "friend", color="red")],
            payload={"a": [1, 2]},
            **{"prefect.resource.name": "one"},
        ),
    )
    page = find(api)
    assert page["total"] == 1 and page["next_page"] is None
    [got] = page["events"]
    assert {k: got[k] for k in sent} == {**sent, "occurred": prefectlite.parse_datetime(sent["occurred"])}
    assert got["follows"] is None and got["received"]


def test_invalid_events_are_422(api):
    for bad in (
        {"id": "x"},
        {**event("e", "r"), "resource": {"no": "id"}},
        {**event("e", "r"), "related": [{"prefect.resource.id": "x"}]},
        {**event("e", "r"), "resource": {"prefect.resource.id": "r", "n": 1}},
    ):
        status, body = api.post("/events", [bad])
        assert status == 422, (bad, body)
    assert find(api)["total"] == 0


def test_default_order_is_newest_first_and_asc_is_available(api):
    old, new = post(api, event("test.a", "r.1", occurred=at(60)), event("test.b", "r.2", occurred=at(1)))
    assert ids(find(api)) == [new["id"], old["id"]]
    assert ids(find(api, {"order": "ASC"})) == [old["id"], new["id"]]


def test_occurred_window(api):
    old, new = post(api, event("test.a", "r.1", occurred=at(3600)), event("test.b", "r.2", occurred=at(10)))
    assert ids(find(api, {"occurred": {"since": at(600)}})) == [new["id"]]
    assert ids(find(api, {"occurred": {"since": at(7200), "until": at(1800)}})) == [old["id"]]
    # without since, the window starts 180 days before today
    ancient = post(api, event("test.c", "r.3", occurred=at(200 * 86400)))[0]
    assert ancient["id"] not in ids(find(api))


def test_event_name_filters(api):
    a, b, c = post(
        api,
        event("prefect.flow-run.Completed", "r.1"),
        event("prefect.task-run.Running", "r.2"),
        event("other.x_y", "r.3"),
    )
    assert set(ids(find(api, {"event": {"prefix": ["prefect."]}}))) == {a["id"], b["id"]}
    assert set(ids(find(api, {"event": {"exclude_prefix": ["prefect.task-run."]}}))) == {a["id"], c["id"]}
    assert ids(find(api, {"event": {"name": ["other.x_y"]}})) == [c["id"]]
    assert set(ids(find(api, {"event": {"exclude_name": ["other.x_y"]}}))) == {a["id"], b["id"]}
    assert ids(find(api, {"event": {"prefix": ["other.x%"]}})) == []  # LIKE wildcards are literal


def test_resource_filters(api):
    a, b, c = post(
        api,
        event("e", "prefect.flow-run.1", **{"prefect.resource.name": "alpha"}),
        event("e", "prefect.flow-run.2", **{"prefect.resource.name": "beta"}),
        event("e", "prefect.task-run.3", **{"prefect.resource.name": "alphabet"}),
    )
    assert ids(find(api, {"resource": {"id": ["prefect.flow-run.2"]}})) == [b["id"]]
    assert set(ids(find(api, {"resource": {"id_prefix": ["prefect.flow-run."]}}))) == {a["id"], b["id"]}
    assert set(ids(find(api, {"resource": {"labels": {"prefect.resource.name": "alpha*"}}}))) == {a["id"], c["id"]}
    assert ids(find(api, {"resource": {"labels": {"prefect.resource.name": ["!alpha*"]}}})) == [b["id"]]
    assert set(ids(find(api, {"resource": {"labels": {"prefect.resource.id": "prefect.flow-run.*"}}}))) == {
        a["id"],
        b["id"],
    }
    assert ids(find(api, {"resource": {"labels": {"prefect.resource.name": []}}})) == []


def test_resource_distinct_keeps_one_event_per_resource(api):
    first, _second, third = post(
        api, event("e", "r.1", occurred=at(30)), event("e", "r.1", occurred=at(20)), event("e", "r.2", occurred=at(10))
    )
    page = find(api, {"resource": {"distinct": True}, "order": "ASC"})
    assert ids(page) == [first["id"], third["id"]] and page["total"] == 2


def test_related_and_any_resource_filters(api):
    flow_run = related("prefect.flow-run.9", "flow-run", **{"prefect.resource.name": "nine"})
    tag = related("prefect.tag.nightly", "tag")
    a, b, c = post(
        api,
        event("e", "prefect.task-run.1", related=[flow_run, tag]),
        event("e", "prefect.task-run.2", related=[tag]),
        event("e", "prefect.flow-run.9"),
    )
    assert set(ids(find(api, {"related": {"id": ["prefect.flow-run.9"]}}))) == {a["id"]}  # not the primary one
    assert set(ids(find(api, {"related": {"role": ["tag"]}}))) == {a["id"], b["id"]}
    assert (
        ids(
            find(
                api,
                {"related": {"resources_in_roles": [["prefect.tag.nightly", "tag"], ["prefect.flow-run.9", "nope"]]}},
            )
        )
        != []
    )
    assert ids(find(api, {"related": [{"role": ["tag"]}, {"role": ["flow-run"]}]})) == [a["id"]]  # all must match
    assert ids(
        find(api, {"related": {"labels": {"prefect.resource.name": "ni*", "prefect.resource.role": "flow-run"}}})
    ) == [a["id"]]
    assert set(ids(find(api, {"any_resource": {"id": ["prefect.flow-run.9"]}}))) == {a["id"], c["id"]}
    assert set(ids(find(api, {"any_resource": {"id_prefix": ["prefect.tag."]}}))) == {a["id"], b["id"]}
    assert ids(find(api, {"any_resource": [{"id": ["prefect.flow-run.9"]}, {"id": ["prefect.tag.nightly"]}]})) == [
        a["id"]
    ]


def test_id_and_text_filters(api):
    a, b = post(
        api,
        event("test.disk", "r.1", payload={"message": "disk full on /var"}),
        event("test.net", "r.2", payload={"message": "connection timeout"}),
    )
    assert ids(find(api, {"id": {"id": [b["id"]]}})) == [b["id"]]
    assert ids(find(api, {"text": {"query": "DISK"}})) == [a["id"]]
    assert set(ids(find(api, {"text": {"query": "disk connection"}}))) == {a["id"], b["id"]}  # OR
    assert ids(find(api, {"text": {"query": "test -disk"}})) == [b["id"]]
    assert ids(find(api, {"text": {"query": '"connection timeout" +net'}})) == [b["id"]]
    assert prefectlite.parse_text_query('a -b !c +d "e f" - g') == (["a", "e f", "g"], ["b", "c"], ["d"])


def test_bad_filters_are_422(api):
    for body in (
        {"filter": {"order": "SIDEWAYS"}},
        {"filter": {"occurred": {"since": "yesterday"}}},
        {"filter": {"event": {"prefix": "not-a-list"}}},
        {"limit": -1},
        {"filter": {"text": {"query": "x" * 201}}},
    ):
        status, payload = api.post("/events/filter", body)
        assert status == 422, (body, payload)


def test_pages_follow_next_page_links(api):
    sent = post(api, *[event("test.page", f"r.{i}", occurred=at(100 - i)) for i in range(7)])
    page = find(api, {"order": "ASC"}, limit=3)
    seen = ids(page)
    assert page["total"] == 7
    while page["next_page"]:
        url = page["next_page"]
        assert url.startswith(api.api_url[: -len("/api")] + "/api/events/filter/next?page-token=")
        with urllib.request.urlopen(url, timeout=10) as resp:
            page = json.loads(resp.read())
        seen += ids(page)
        assert page["total"] == 7
    assert seen == [e["id"] for e in sent]
    status, _ = api.get("/events/filter/next?page-token=" + base64.b64encode(b"garbage").decode())
    assert status == 403
    assert len(find(api, limit=100)["events"]) == 7  # more than a page (50) is capped, not refused


def test_count_by_event_and_resource(api):
    post(
        api,
        event("test.a", "r.1", occurred=at(30), **{"prefect.resource.name": "old-name"}),
        event("test.a", "r.1", occurred=at(20), **{"prefect.resource.name": "new-name"}),
        event("test.b", "r.2", occurred=at(10)),
    )
    by_event = api.ok("POST", "/events/count-by/event", {"filter": {}})
    assert [(c["value"], c["label"], c["count"]) for c in by_event] == [
        ("test.a", "test.a", 2),
        ("test.b", "test.b", 1),
    ]
    by_resource = api.ok("POST", "/events/count-by/resource", {"filter": {}})
    assert [(c["value"], c["label"], c["count"]) for c in by_resource] == [("r.1", "new-name", 2), ("r.2", "r.2", 1)]
    assert by_resource[0]["start_time"] < by_resource[0]["end_time"]


def test_count_by_time_fills_every_bucket(api):
    now = prefectlite.utcnow()
    hour = now.replace(minute=0, second=0, microsecond=0)
    post(
        api,
        event("e", "r", occurred=prefectlite.iso(hour - dt.timedelta(minutes=90))),
        event("e", "r", occurred=prefectlite.iso(hour - dt.timedelta(minutes=80))),
        event("e", "r", occurred=prefectlite.iso(hour - dt.timedelta(minutes=10))),
    )
    since = prefectlite.iso(hour - dt.timedelta(hours=3))
    counts = api.ok(
        "POST",
        "/events/count-by/time",
        {"filter": {"occurred": {"since": since}}, "time_unit": "hour", "time_interval": 1},
    )
    assert [c["value"] for c in counts] == [str(i) for i in range(len(counts))]
    starts = [prefectlite.from_iso(c["start_time"]) for c in counts]
    assert starts[0] == hour - dt.timedelta(hours=3)
    assert all(b - a == dt.timedelta(hours=1) for a, b in zip(starts, starts[1:]))
    assert [c["count"] for c in counts][:3] == [0, 2, 1]
    assert sum(c["count"] for c in counts) == 3
    assert prefectlite.from_iso(counts[-1]["end_time"]) >= now  # up to the end of the current hour
    days = api.ok("POST", "/events/count-by/day", {"filter": {"occurred": {"since": since}}})
    assert sum(c["count"] for c in days) == 3


def test_count_by_rejects_bad_parameters(api):
    assert api.post("/events/count-by/colour", {"filter": {}})[0] == 422
    assert api.post("/events/count-by/time", {"filter": {}, "time_interval": 0.001})[0] == 422
    status, body = api.post("/events/count-by/time", {"filter": {}, "time_unit": "second", "time_interval": 1})
    assert status == 422 and "buckets" in json.dumps(body)  # 180 days of seconds


# ---------------------------------------------------------------------------------------------
# the task-run recorder


def task_event(flow_run, task_run_id, state_type, name, occurred, run_count=0, **task_fields):
    fields = {
        "name": "work-abc",
        "task_key": "work-1234",
        "dynamic_key": "0",
        "empirical_policy": {"retries": 1},
        "tags": ["t1"],
        "labels": {},
        "task_inputs": {"x": []},
        "run_count": run_count,
        "flow_run_run_count": 1,
        "expected_start_time": occurred,
        "total_run_time": "PT0.5S",
        **task_fields,
    }
    rel = [related(f"prefect.flow-run.{flow_run['id']}", "flow-run"), related("prefect.tag.t1", "tag")]
    return event(
        f"prefect.task-run.{name}",
        f"prefect.task-run.{task_run_id}",
        occurred=occurred,
        related=rel,
        payload={
            "intended": {"from": None, "to": state_type},
            "validated_state": {
                "type": state_type,
                "name": name,
                "message": f"now {name}",
                "state_details": {},
                "data": None,
            },
            "task_run": fields,
        },
        **{"prefect.orchestration": "client", "prefect.resource.name": fields["name"]},
    )


def states_of(api, task_run_id):
    return [(s["type"], s["name"]) for s in api.ok("GET", f"/task_run_states/?task_run_id={task_run_id}")]


def test_task_run_events_become_a_task_run_with_its_history(api):
    run = new_flow_run(api)
    tr_id = str(uuid.uuid4())
    pending = task_event(run, tr_id, "PENDING", "Pending", at(3))
    running = task_event(run, tr_id, "RUNNING", "Running", at(2), run_count=1, start_time=at(2))
    done = task_event(run, tr_id, "COMPLETED", "Completed", at(1), run_count=1, start_time=at(2), end_time=at(1))
    post(api, pending, running, done)
    tr = api.ok("GET", f"/task_runs/{tr_id}")
    assert (tr["flow_run_id"], tr["name"], tr["task_key"], tr["dynamic_key"]) == (
        run["id"],
        "work-abc",
        "work-1234",
        "0",
    )
    assert (tr["state_type"], tr["state_name"], tr["state_id"]) == ("COMPLETED", "Completed", done["id"])
    assert tr["state"]["message"] == "now Completed" and tr["state"]["state_details"]["task_run_id"] == tr_id
    assert tr["state"]["state_details"]["flow_run_id"] == run["id"]
    assert tr["run_count"] == 1 and tr["total_run_time"] == 0.5 and tr["tags"] == ["t1"]
    assert tr["empirical_policy"]["retries"] == 1 and tr["start_time"] and tr["end_time"]
    assert states_of(api, tr_id) == [("PENDING", "Pending"), ("RUNNING", "Running"), ("COMPLETED", "Completed")]
    listed = api.ok("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    assert [t["id"] for t in listed] == [tr_id]


def test_a_task_run_recorded_from_events_has_the_labels_they_carry(api):
    """Prefect 3.9's recorder stores payload.task_run as sent, labels too ({} from its SDK, observed), with
    none of its flow run's; a newer event's labels replace them. 3.x clients read them, 2.x ones do not."""
    run = new_flow_run(api, labels={"team": "data"})
    tr_id = str(uuid.uuid4())
    agent = {"User-Agent": "prefect/3.9.1 (API 0.8.4)"}
    post(api, task_event(run, tr_id, "PENDING", "Pending", at(3), labels={}))
    assert api.ok("GET", f"/task_runs/{tr_id}", headers=agent)["labels"] == {}
    post(api, task_event(run, tr_id, "RUNNING", "Running", at(2), labels={"k": "v"}))
    assert api.ok("GET", f"/task_runs/{tr_id}", headers=agent)["labels"] == {"k": "v"}
    listed = api.ok("POST", "/task_runs/filter", {}, headers=agent)
    assert [t["labels"] for t in listed] == [{"k": "v"}]
    assert "labels" not in api.ok("GET", f"/task_runs/{tr_id}")


def test_recorder_is_idempotent_and_never_goes_back_in_time(api):
    run = new_flow_run(api)
    tr_id = str(uuid.uuid4())
    pending = task_event(run, tr_id, "PENDING", "Pending", at(3))
    running = task_event(run, tr_id, "RUNNING", "Running", at(2), run_count=1)
    done = task_event(run, tr_id, "COMPLETED", "Completed", at(1), run_count=1, end_time=at(1))
    post(api, pending, done)  # Running is late
    post(api, running)
    post(api, done, running)  # both again
    tr = api.ok("GET", f"/task_runs/{tr_id}")
    assert (tr["state_type"], tr["state_id"]) == ("COMPLETED", done["id"])
    assert states_of(api, tr_id) == [("PENDING", "Pending"), ("RUNNING", "Running"), ("COMPLETED", "Completed")]


def test_recorder_itself_ignores_a_state_it_has(tmp_path):
    """Below the event store's own de-duplication: the recorder given the same event twice."""
    db = prefectlite.open_database(f"sqlite:///{tmp_path}/recorder.db")
    try:
        prefectlite.migrate(db)
        with db.write() as tx:
            flow = prefectlite.create_flow(tx, {"name": "f", "tags": []})[0]
            run = prefectlite.create_flow_run(tx, {"flow_id": flow["id"]})[0]
        tr_id = str(uuid.uuid4())
        first = prefectlite.validate_event(task_event(run, tr_id, "RUNNING", "Running", at(2), run_count=1))
        older = prefectlite.validate_event(task_event(run, tr_id, "PENDING", "Pending", at(3)))
        with db.write() as tx:
            prefectlite.record_task_run_event(tx, first)
            prefectlite.record_task_run_event(tx, first)
            prefectlite.record_task_run_event(tx, older)
            prefectlite.record_task_run_event(tx, older)
            rows = tx.query("SELECT type FROM task_run_state WHERE task_run_id = ? ORDER BY timestamp", (tr_id,))
            current = tx.query_one("SELECT state_type, run_count FROM task_run WHERE id = ?", (tr_id,))
        assert [r["type"] for r in rows] == ["PENDING", "RUNNING"]
        assert (current["state_type"], current["run_count"]) == ("RUNNING", 1)
    finally:
        db.close()


def test_recorder_finds_a_task_run_created_over_rest_by_its_natural_key(api):
    run = new_flow_run(api)
    made = api.ok(
        "POST",
        "/task_runs/",
        {"flow_run_id": run["id"], "task_key": "work-1234", "dynamic_key": "0", "name": "work-abc"},
    )
    post(api, task_event(run, str(uuid.uuid4()), "RUNNING", "Running", at(0), run_count=1))
    tr = api.ok("GET", f"/task_runs/{made['id']}")
    assert tr["state_type"] == "RUNNING"
    assert len(api.ok("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})) == 1


def test_events_the_recorder_does_not_take(api):
    run = new_flow_run(api)
    server_side = task_event(run, str(uuid.uuid4()), "RUNNING", "Running", at(0))
    server_side["resource"]["prefect.orchestration"] = "server"
    orphan = task_event({"id": str(uuid.uuid4())}, str(uuid.uuid4()), "RUNNING", "Running", at(0))
    malformed = task_event(run, str(uuid.uuid4()), "RUNNING", "Running", at(0))
    malformed["payload"]["validated_state"]["type"] = "SLEEPING"
    post(api, server_side, orphan, malformed)
    assert api.ok("POST", "/task_runs/count", {}) == 0
    assert find(api, {"event": {"prefix": ["prefect.task-run."]}})["total"] == 3  # stored all the same


# ---------------------------------------------------------------------------------------------
# flow-run events


def test_flow_run_states_are_events(api):
    run = new_flow_run(api, tags=["nightly"])
    api.ok("POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": "RUNNING"}})
    page = find(api, {"resource": {"id": [f"prefect.flow-run.{run['id']}"]}, "order": "ASC"})
    assert [e["event"] for e in page["events"]] == ["prefect.flow-run.Pending", "prefect.flow-run.Running"]
    running = page["events"][1]
    assert running["resource"]["prefect.state-type"] == "RUNNING"
    assert running["payload"]["intended"] == {"from": "PENDING", "to": "RUNNING"}
    roles = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in running["related"]}
    assert roles == {"flow": f"prefect.flow.{run['flow_id']}", "tag": "prefect.tag.nightly"}


# ---------------------------------------------------------------------------------------------
# the version check, /admin/storage, leases


def version(api, headers):
    req = urllib.request.Request(api.api_url + "/admin/version", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_version_check_is_answered_per_client(api):
    """Prefect 3 clients refuse a server of another major version; everyone else gets the 2.x answer."""
    prefect2 = version(api, {})
    assert not prefect2.startswith("3.")
    assert version(api, {"User-Agent": "prefect/2.20.27 (API 0.8.4)", "X-PREFECT-API-VERSION": "0.8.4"}) == prefect2
    assert version(api, {"User-Agent": "prefect/3.9.4 (API 0.8.4)", "X-PREFECT-API-VERSION": "0.8.4"}) == "3.9.4"
    assert version(api, {"User-Agent": "python-httpx/0.28.1"}) == prefectlite.PREFECT3_SERVER_VERSION
    assert version(api, {"User-Agent": "python-httpx/0.28.1", "X-PREFECT-API-VERSION": "0.8.4"}) == prefect2
    assert version(api, {"User-Agent": "prefect/4.0.0 (API 0.9.0)"}) == prefect2


def test_admin_storage(api):
    assert api.ok("GET", "/admin/storage") == {"default_result_storage_block_id": None}
    status, _ = api.request("PUT", "/admin/storage", {"default_result_storage_block_id": str(uuid.uuid4())})
    assert status == 404
    secret_type = api.ok("GET", "/block_types/slug/custom-webhook")
    schema = api.ok(
        "POST", "/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [secret_type["id"]]}}}
    )[0]
    doc = api.ok(
        "POST",
        "/block_documents/",
        {
            "name": "hook",
            "block_type_id": secret_type["id"],
            "block_schema_id": schema["id"],
            "data": {"name": "x", "url": "http://x"},
        },
    )
    status, body = api.request("PUT", "/admin/storage", {"default_result_storage_block_id": doc["id"]})
    assert status == 422, body  # a webhook cannot store results
    block_type = api.ok("GET", "/block_types/slug/local-file-system")  # a core type: the server has it from start
    by_type = {"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}}
    fs_schema = api.ok("POST", "/block_schemas/filter", by_type)[0]
    assert {"read-path", "write-path"} <= set(fs_schema["capabilities"])
    fs = api.ok(
        "POST",
        "/block_documents/",
        {"name": "results", "block_type_id": block_type["id"], "block_schema_id": fs_schema["id"], "data": {}},
    )
    status, body = api.request("PUT", "/admin/storage", {"default_result_storage_block_id": fs["id"]})
    assert (status, body) == (200, {"default_result_storage_block_id": fs["id"]})
    assert api.ok("GET", "/admin/storage") == {"default_result_storage_block_id": fs["id"]}
    assert api.request("DELETE", "/admin/storage")[0] == 204
    assert api.ok("GET", "/admin/storage") == {"default_result_storage_block_id": None}


def test_concurrency_leases(api):
    api.ok("POST", "/v2/concurrency_limits/", {"name": "db", "limit": 2})
    body = {
        "names": ["db", "tag:nothing-limits-this"],
        "slots": 1,
        "lease_duration": 60,
        "holder": {"type": "task_run", "id": str(uuid.uuid4())},
    }
    first = api.ok("POST", "/v2/concurrency_limits/increment-with-lease", body)
    assert [limit["name"] for limit in first["limits"]] == ["db"]
    second = api.ok("POST", "/v2/concurrency_limits/increment-with-lease", body)
    status, _ = api.post("/v2/concurrency_limits/increment-with-lease", body)
    assert status == 423
    assert api.ok("GET", "/v2/concurrency_limits/db")["active_slots"] == 2
    assert (
        api.request("POST", f"/v2/concurrency_limits/leases/{first['lease_id']}/renew", {"lease_duration": 120})[0]
        == 204
    )
    assert api.request("POST", "/v2/concurrency_limits/decrement-with-lease", {"lease_id": first["lease_id"]})[0] == 204
    assert api.request("POST", "/v2/concurrency_limits/decrement-with-lease", {"lease_id": first["lease_id"]})[0] == 204
    assert api.ok("GET", "/v2/concurrency_limits/db")["active_slots"] == 1
    assert api.request("POST", f"/v2/concurrency_limits/leases/{first['lease_id']}/renew", {})[0] == 410
    free = api.ok("POST", "/v2/concurrency_limits/increment-with-lease", {"names": ["tag:x"], "slots": 1})
    assert free["limits"] == [] and free["lease_id"]
    assert api.post("/v2/concurrency_limits/increment-with-lease", {"names": [], "slots": 1})[0] == 422
    assert (
        api.post("/v2/concurrency_limits/increment-with-lease", {"names": ["db"], "slots": 1, "lease_duration": 5})[0]
        == 422
    )
    assert second["lease_id"]


def test_a_tag_limit_limits_prefect3_task_runs_through_leases(api):
    """Cause 11 of issue 23: Prefect 3 tasks take their tags' slots as leases on `tag:NAME` (Prefect 3 keeps a
    tag limit as that global limit): a limit made the v1 way (`prefect concurrency-limit create TAG 1`) holds
    the second task back, lists the task run holding its slot, and frees it with the lease."""
    limit = api.ok("POST", "/concurrency_limits/", {"tag": "db", "concurrency_limit": 1})
    first_run, second_run = str(uuid.uuid4()), str(uuid.uuid4())

    def take(run_id):
        return api.post(
            "/v2/concurrency_limits/increment-with-lease",
            {
                "names": ["tag:db", "tag:unlimited"],
                "slots": 1,
                "lease_duration": 60,
                "holder": {"type": "task_run", "id": run_id},
            },
        )

    status, first = take(first_run)
    assert status == 200, first
    assert first["limits"] == [{"id": limit["id"], "name": "tag:db", "limit": 1}]
    assert api.ok("GET", "/concurrency_limits/tag/db")["active_slots"] == [first_run]
    assert take(second_run)[0] == 423
    assert api.ok("GET", "/concurrency_limits/tag/db")["active_slots"] == [first_run]
    assert api.request("POST", "/v2/concurrency_limits/decrement-with-lease", {"lease_id": first["lease_id"]})[0] == 204
    assert api.ok("GET", "/concurrency_limits/tag/db")["active_slots"] == []
    status, second = take(second_run)
    assert status == 200, second
    assert api.ok("GET", "/concurrency_limits/tag/db")["active_slots"] == [second_run]

    # A global limit named tag:db is the tag's limit where there is one (Prefect 3 has only those).
    api.ok("POST", "/v2/concurrency_limits/", {"name": "tag:db", "limit": 5})
    status, third = take(str(uuid.uuid4()))
    assert status == 200 and [lim["name"] for lim in third["limits"]] == ["tag:db"] and third["limits"][0]["limit"] == 5
    assert api.ok("GET", "/concurrency_limits/tag/db")["active_slots"] == [second_run]


def test_expired_leases_are_repossessed(tmp_path):
    with prefectlite.serve(database=f"sqlite:///{tmp_path}/lease.db") as url:
        api = Client(url)
        api.ok("POST", "/v2/concurrency_limits/", {"name": "db", "limit": 1})
        lease = api.ok("POST", "/v2/concurrency_limits/increment-with-lease", {"names": ["db"], "slots": 1})
        db = prefectlite.open_database(f"sqlite:///{tmp_path}/lease.db")
        try:
            with db.write() as tx:  # as if its holder vanished 10 minutes ago
                tx.execute("UPDATE concurrency_lease SET expiration = ? WHERE id = ?", (at(600), lease["lease_id"]))
            with db.write() as tx:
                assert prefectlite.repossess_expired_leases(tx) == 1
        finally:
            db.close()
        assert api.ok("GET", "/v2/concurrency_limits/db")["active_slots"] == 0


def test_old_events_are_pruned_but_task_runs_stay(tmp_path):
    url = f"sqlite:///{tmp_path}/prune.db"
    with prefectlite.serve(database=url) as api_url:
        api = Client(api_url)
        run = new_flow_run(api)
        tr_id = str(uuid.uuid4())
        post(api, task_event(run, tr_id, "PENDING", "Pending", at(10 * 86400)), event("fresh", "r.1"))
    db = prefectlite.open_database(url)
    try:
        assert prefectlite.prune_events(db, dt.timedelta(days=7)) == 1
        with db.read() as tx:
            assert tx.scalar("SELECT COUNT(*) FROM event_resources WHERE event_id NOT IN (SELECT id FROM events)") == 0
            assert tx.scalar("SELECT COUNT(*) FROM task_run WHERE id = ?", (tr_id,)) == 1
            assert tx.scalar("SELECT COUNT(*) FROM events") == 2  # "fresh" and the flow run's Pending
    finally:
        db.close()
