"""Work pools, work queues and workers through real HTTP: pools with their default queue, queues with
priorities, pauses and concurrency limits, `get_scheduled_flow_runs` as a worker polls it, worker
heartbeats, the READY / NOT_READY / PAUSED statuses, and the older id-based `/work_queues/` routes."""

import datetime as dt
import time
import uuid

import pytest

import prefectlite
from helpers import T0, TICK, Client, answer, iso, now, parse, unique


POOL_FIELDS = {
    "id",
    "created",
    "updated",
    "name",
    "description",
    "type",
    "base_job_template",
    "is_paused",
    "concurrency_limit",
    "default_queue_id",
    "status",
}
QUEUE_FIELDS = {
    "id",
    "created",
    "updated",
    "name",
    "description",
    "is_paused",
    "concurrency_limit",
    "priority",
    "last_polled",
    "work_pool_id",
    "work_pool_name",
    "status",
    "filter",
}


@pytest.fixture
def api(tmp_path):
    """A server whose scheduler is off, so the only runs are the ones a test makes."""
    with prefectlite.serve(
        database=f"sqlite:///{tmp_path}/pools.db", port=0, PREFECT_API_SERVICES_SCHEDULER_ENABLED=False
    ) as api_url:
        yield Client(api_url)


def new_pool(api, name=None, **fields):
    return api.ok("POST", "/work_pools/", {"name": name or unique("pool"), "type": "process", **fields})


def new_queue(api, pool, name=None, **fields):
    return api.ok("POST", f"/work_pools/{pool}/queues", {"name": name or unique("queue"), **fields})


def new_deployment(api, pool, queue=None):
    flow = api.ok("POST", "/flows/", {"name": unique("flow")})
    body = {"name": unique("dep"), "flow_id": flow["id"], "work_pool_name": pool}
    if queue:
        body["work_queue_name"] = queue
    return api.ok("POST", "/deployments/", body)


def due_run(api, dep, queue=None, minutes_ago=1.0, minutes_ahead=None):
    when = now() + (
        dt.timedelta(minutes=minutes_ahead) if minutes_ahead is not None else -dt.timedelta(minutes=minutes_ago)
    )
    body = {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": iso(when)}}}
    if queue:
        body["work_queue_name"] = queue
    return api.ok("POST", f"/deployments/{dep['id']}/create_flow_run", body)


def set_state(api, run_id, state_type):
    api.ok("POST", f"/flow_runs/{run_id}/set_state", {"state": {"type": state_type}, "force": True})


def wait_for(read, done, timeout=5.0):
    """read() until done(value), for at most `timeout` seconds; returns the last value read."""
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    return value


def poll(api, pool, **body):
    offered = api.ok("POST", f"/work_pools/{pool}/get_scheduled_flow_runs", body)
    for item in offered:
        assert set(item) >= {"work_pool_id", "work_queue_id", "flow_run"}, item
        assert item["flow_run"]["work_queue_id"] == item["work_queue_id"]
    return offered


def offered_ids(api, pool, **body):
    return [item["flow_run"]["id"] for item in poll(api, pool, **body)]


# --- pools -------------------------------------------------------------------------------------


def test_create_pool_with_its_default_queue(api):
    name = unique("pool")
    template = {
        "job_configuration": {"command": "{{ command }}"},
        "variables": {"type": "object", "properties": {"command": {"type": "string"}}},
    }
    status, pool = api.post(
        "/work_pools/",
        {"name": name, "type": "process", "description": "local processes", "base_job_template": template},
    )
    assert status == 201, pool
    assert POOL_FIELDS <= set(pool), POOL_FIELDS - set(pool)
    assert (pool["name"], pool["type"], pool["description"]) == (name, "process", "local processes")
    assert pool["base_job_template"] == template
    assert pool["is_paused"] is False and pool["concurrency_limit"] is None
    assert pool["status"] == "NOT_READY"
    queues = api.ok("POST", f"/work_pools/{name}/queues/filter", {})
    assert [q["name"] for q in queues] == ["default"]
    default = queues[0]
    assert default["id"] == pool["default_queue_id"]
    assert QUEUE_FIELDS <= set(default), QUEUE_FIELDS - set(default)
    assert default["work_pool_id"] == pool["id"] and default["work_pool_name"] == name
    assert default["priority"] == 1
    assert api.ok("GET", f"/work_pools/{name}/queues/default")["id"] == pool["default_queue_id"]


def test_pool_defaults_and_conflicts(api):
    name = unique("pool")
    status, pool = api.post("/work_pools/", {"name": name})
    assert status == 201, pool
    assert pool["type"] == "prefect-agent" and pool["base_job_template"] == {}
    status, body = api.post("/work_pools/", {"name": name, "type": "process"})
    assert status == 409, body
    status, body = api.post("/work_pools/", {"type": "process"})
    assert status == 422, body
    status, body = api.post("/work_pools/", {"name": "a/b"})
    assert status == 422, body


def test_read_update_delete_pool(api):
    pool = new_pool(api)
    name = pool["name"]
    assert api.ok("GET", f"/work_pools/{name}")["id"] == pool["id"]
    assert api.get(f"/work_pools/{unique('missing')}")[0] == 404
    status, body = api.patch(f"/work_pools/{name}", {"description": "changed", "concurrency_limit": 3})
    assert status == 204, body
    read = api.ok("GET", f"/work_pools/{name}")
    assert (read["description"], read["concurrency_limit"], read["type"]) == ("changed", 3, "process")
    api.ok("PATCH", f"/work_pools/{name}", {"concurrency_limit": None})
    assert api.ok("GET", f"/work_pools/{name}")["concurrency_limit"] is None
    assert api.patch(f"/work_pools/{unique('missing')}", {"description": "x"})[0] == 404
    assert api.patch(f"/work_pools/{name}", {"concurrency_limit": -1})[0] == 422
    status, body = api.delete(f"/work_pools/{name}")
    assert status == 204, body
    assert api.get(f"/work_pools/{name}")[0] == 404
    assert api.delete(f"/work_pools/{name}")[0] == 404
    # Its queues went with it.
    assert api.get(f"/work_queues/{pool['default_queue_id']}")[0] == 404


def test_a_base_job_template_is_checked_as_prefect_checks_it(api):
    """Prefect's validate_base_job_template (3.9 and 2.20): a pool's base job template is empty, or has a
    `job_configuration` and a `variables` schema declaring every {{ placeholder }} the configuration uses; its
    server answers 422 otherwise. We stored any object (a 201, a 204 on update), which no worker could use.
    And a pool's booleans take 0 and 1, as Prefect's (pydantic's lax mode) do: we answered 422."""
    config = {"command": "{{ command }}", "env": {"A": "{{ env_a }}"}}
    good = {"job_configuration": config, "variables": {"properties": {"command": {}, "env_a": {}}}}
    pool = new_pool(api, base_job_template=good, is_paused=1)
    assert (pool["base_job_template"], pool["is_paused"]) == (good, True)
    bad_templates = [
        {"k": []},
        {"job_configuration": config},
        {"job_configuration": config, "variables": {"properties": {"command": {}}}},
    ]
    for bad in bad_templates:
        status, body = api.post("/work_pools/", {"name": unique("bad"), "type": "process", "base_job_template": bad})
        assert status == 422, (bad, body)
        assert [e["loc"] for e in body["exception_detail"]] == [["body", "base_job_template"]]
        status, body = api.patch(f"/work_pools/{pool['name']}", {"base_job_template": bad})
        assert status == 422, (bad, body)
    assert "env_a" in body["exception_detail"][0]["msg"]
    assert api.ok("GET", f"/work_pools/{pool['name']}")["base_job_template"] == good
    assert [p["name"] for p in api.ok("POST", "/work_pools/filter", {})] == [pool["name"]]
    status, body = api.patch(f"/work_pools/{pool['name']}", {"base_job_template": {}, "is_paused": 0})
    assert status == 204, body
    assert api.ok("GET", f"/work_pools/{pool['name']}")["is_paused"] is False


def test_filter_and_count_pools(api):
    a = new_pool(api, unique("alpha"))
    b = new_pool(api, unique("beta"), type="kubernetes")
    c = new_pool(api, unique("gamma"))
    ids = [a["id"], b["id"], c["id"]]
    mine = {"work_pools": {"id": {"any_": ids}}}
    assert sorted(p["id"] for p in api.ok("POST", "/work_pools/filter", mine)) == sorted(ids)
    assert api.ok("POST", "/work_pools/count", mine) == 3
    by_name = api.ok("POST", "/work_pools/filter", {"work_pools": {"name": {"any_": [b["name"]]}}})
    assert [p["id"] for p in by_name] == [b["id"]]
    by_type = api.ok(
        "POST", "/work_pools/filter", {"work_pools": {"id": {"any_": ids}, "type": {"any_": ["kubernetes"]}}}
    )
    assert [p["id"] for p in by_type] == [b["id"]]
    assert api.ok("POST", "/work_pools/count", {"work_pools": {"name": {"any_": [unique("none")]}}}) == 0
    page = api.ok("POST", "/work_pools/filter", {**mine, "limit": 2})
    assert len(page) == 2


# --- queues ------------------------------------------------------------------------------------


def test_queue_create_read_update_delete(api):
    pool = new_pool(api)["name"]
    status, queue = api.post(
        f"/work_pools/{pool}/queues", {"name": "gpu", "description": "big jobs", "concurrency_limit": 2, "priority": 5}
    )
    assert status == 201, queue
    assert QUEUE_FIELDS <= set(queue), QUEUE_FIELDS - set(queue)
    assert (queue["name"], queue["description"], queue["concurrency_limit"], queue["priority"]) == (
        "gpu",
        "big jobs",
        2,
        5,
    )
    assert queue["work_pool_name"] == pool and queue["is_paused"] is False
    assert api.post(f"/work_pools/{pool}/queues", {"name": "gpu"})[0] == 409
    assert api.post(f"/work_pools/{unique('missing')}/queues", {"name": "x"})[0] == 404
    assert api.ok("GET", f"/work_pools/{pool}/queues/gpu")["id"] == queue["id"]
    assert api.get(f"/work_pools/{pool}/queues/{unique('missing')}")[0] == 404

    status, body = api.patch(f"/work_pools/{pool}/queues/gpu", {"description": "bigger jobs", "concurrency_limit": 4})
    assert status == 204, body
    read = api.ok("GET", f"/work_pools/{pool}/queues/gpu")
    assert (read["description"], read["concurrency_limit"]) == ("bigger jobs", 4)
    api.ok("PATCH", f"/work_pools/{pool}/queues/gpu", {"name": "gpu-2"})
    assert api.get(f"/work_pools/{pool}/queues/gpu")[0] == 404
    assert api.ok("GET", f"/work_pools/{pool}/queues/gpu-2")["id"] == queue["id"]

    status, body = api.delete(f"/work_pools/{pool}/queues/gpu-2")
    assert status == 204, body
    assert api.get(f"/work_pools/{pool}/queues/gpu-2")[0] == 404
    # The default queue stays: a pool always has one.
    status, body = api.delete(f"/work_pools/{pool}/queues/default")
    assert status >= 400, body
    assert api.get(f"/work_pools/{pool}/queues/default")[0] == 200


def test_queue_priorities(api):
    pool = new_pool(api)["name"]
    # Without a priority a queue goes last.
    second = new_queue(api, pool, "second")
    third = new_queue(api, pool, "third")
    assert (second["priority"], third["priority"]) == (2, 3)
    # Taking a priority that is in use moves the others down (Prefect keeps priorities distinct).
    urgent = new_queue(api, pool, "urgent", priority=1)
    assert urgent["priority"] == 1
    queues = api.ok("POST", f"/work_pools/{pool}/queues/filter", {})
    assert [q["name"] for q in queues][0] == "urgent", queues
    priorities = [q["priority"] for q in queues]
    assert len(set(priorities)) == len(priorities), f"two queues share a priority: {queues}"
    assert priorities == sorted(priorities)
    assert [q["name"] for q in queues] == ["urgent", "default", "second", "third"]


def test_queue_validation(api):
    pool = new_pool(api)["name"]
    assert api.post(f"/work_pools/{pool}/queues", {"name": "q", "priority": 0})[0] == 422
    assert api.post(f"/work_pools/{pool}/queues", {"name": "q", "concurrency_limit": -1})[0] == 422
    assert api.post(f"/work_pools/{pool}/queues", {"priority": 3})[0] == 422


def test_queue_description_null_is_taken_as_empty(api):
    """The 2.20 SDK's create_work_queue() and `prefect work-queue create NAME` send description null;
    Prefect creates the queue with "" (a 422 here made both fail)."""
    pool = new_pool(api)["name"]
    status, queue = api.post(f"/work_pools/{pool}/queues", {"name": "q", "description": None})
    assert (status, queue["description"]) == (201, ""), queue
    status, legacy = api.post("/work_queues/", {"name": unique("legacy"), "description": None})
    assert (status, legacy["description"]) == (201, ""), legacy
    missing = unique("missing")
    for path, body in (
        (f"/work_pools/{missing}/queues", {"name": "q"}),
        ("/work_queues/", {"name": "q", "work_pool_name": missing}),
    ):
        status, answer = api.post(path, {**body, "description": None})
        assert status == 404 and missing in answer["detail"], (path, status, answer)


# --- handing out runs --------------------------------------------------------------------------


def test_get_scheduled_flow_runs_hands_out_due_runs(api):
    pool = new_pool(api)
    name = pool["name"]
    dep = new_deployment(api, name)
    first = due_run(api, dep, minutes_ago=5)
    second = due_run(api, dep, minutes_ago=1)
    future = due_run(api, dep, minutes_ahead=60)
    running = due_run(api, dep, minutes_ago=10)
    set_state(api, running["id"], "RUNNING")
    other_pool = new_pool(api)["name"]
    due_run(api, new_deployment(api, other_pool))

    offered = poll(api, name, scheduled_before=iso(now()))
    assert [o["flow_run"]["id"] for o in offered] == [first["id"], second["id"]]
    assert all(o["work_pool_id"] == pool["id"] and o["work_queue_id"] == pool["default_queue_id"] for o in offered)
    assert all(o["flow_run"]["state_type"] == "SCHEDULED" for o in offered)
    # Looking further ahead finds the future run too.
    assert offered_ids(api, name, scheduled_before=iso(now() + dt.timedelta(hours=2))) == [
        first["id"],
        second["id"],
        future["id"],
    ]
    assert offered_ids(api, name, scheduled_before=iso(now()), limit=1) == [first["id"]]
    assert offered_ids(
        api, name, scheduled_after=iso(now() - dt.timedelta(minutes=3)), scheduled_before=iso(now())
    ) == [second["id"]]
    assert api.post(f"/work_pools/{unique('missing')}/get_scheduled_flow_runs", {})[0] == 404


def test_priority_order_and_work_queue_names(api):
    name = new_pool(api)["name"]  # its default queue has priority 1
    new_queue(api, name, "low", priority=10)
    new_queue(api, name, "high", priority=2)
    dep = new_deployment(api, name)
    low_early = due_run(api, dep, queue="low", minutes_ago=30)
    high_late = due_run(api, dep, queue="high", minutes_ago=1)
    default_mid = due_run(api, dep, minutes_ago=10)
    # The higher-priority queue is served first when not everything fits.
    assert offered_ids(api, name, scheduled_before=iso(now()), limit=1) == [default_mid["id"]]
    assert offered_ids(api, name, scheduled_before=iso(now()), limit=1, work_queue_names=["low", "high"]) == [
        high_late["id"]
    ]
    everything = offered_ids(api, name, scheduled_before=iso(now()))
    assert sorted(everything) == sorted([low_early["id"], high_late["id"], default_mid["id"]])
    # Only the named queues.
    assert offered_ids(api, name, scheduled_before=iso(now()), work_queue_names=["low"]) == [low_early["id"]]
    assert sorted(offered_ids(api, name, scheduled_before=iso(now()), work_queue_names=["low", "default"])) == sorted(
        [low_early["id"], default_mid["id"]]
    )


def test_queue_concurrency_limit(api):
    name = new_pool(api)["name"]
    new_queue(api, name, "limited", concurrency_limit=1)
    dep = new_deployment(api, name, queue="limited")
    busy = due_run(api, dep, minutes_ago=5)
    waiting = due_run(api, dep, minutes_ago=4)
    other = due_run(api, dep, queue="default", minutes_ago=3)
    assert sorted(offered_ids(api, name, scheduled_before=iso(now()))) == sorted([busy["id"], other["id"]])
    set_state(api, busy["id"], "RUNNING")
    assert offered_ids(api, name, scheduled_before=iso(now())) == [other["id"]], "the queue is full"
    set_state(api, busy["id"], "COMPLETED")
    assert waiting["id"] in offered_ids(api, name, scheduled_before=iso(now()))
    # A limit of 0 hands out nothing from that queue.
    api.ok("PATCH", f"/work_pools/{name}/queues/limited", {"concurrency_limit": 0})
    assert offered_ids(api, name, scheduled_before=iso(now())) == [other["id"]]


def test_pool_concurrency_limit(api):
    name = new_pool(api, concurrency_limit=2)["name"]
    new_queue(api, name, "other")
    dep = new_deployment(api, name)
    a = due_run(api, dep, minutes_ago=5)
    b = due_run(api, dep, queue="other", minutes_ago=4)
    c = due_run(api, dep, minutes_ago=3)
    first = offered_ids(api, name, scheduled_before=iso(now()))
    assert len(first) == 2 and a["id"] in first, first
    set_state(api, a["id"], "RUNNING")
    assert len(offered_ids(api, name, scheduled_before=iso(now()))) == 1
    set_state(api, b["id"], "PENDING")
    assert offered_ids(api, name, scheduled_before=iso(now())) == [], "the pool is full"
    set_state(api, a["id"], "COMPLETED")
    assert offered_ids(api, name, scheduled_before=iso(now())) == [c["id"]]


def test_paused_pool_and_paused_queue_hand_out_nothing(api):
    pool = new_pool(api)
    name = pool["name"]
    new_queue(api, name, "side")
    dep = new_deployment(api, name)
    main = due_run(api, dep, minutes_ago=2)
    side = due_run(api, dep, queue="side", minutes_ago=1)
    api.ok("PATCH", f"/work_pools/{name}/queues/side", {"is_paused": True})
    assert api.ok("GET", f"/work_pools/{name}/queues/side")["status"] == "PAUSED"
    assert offered_ids(api, name, scheduled_before=iso(now())) == [main["id"]]
    api.ok("PATCH", f"/work_pools/{name}", {"is_paused": True})
    paused = api.ok("GET", f"/work_pools/{name}")
    assert paused["is_paused"] is True and paused["status"] == "PAUSED"
    assert offered_ids(api, name, scheduled_before=iso(now())) == []
    api.ok("PATCH", f"/work_pools/{name}", {"is_paused": False})
    api.ok("PATCH", f"/work_pools/{name}/queues/side", {"is_paused": False})
    assert sorted(offered_ids(api, name, scheduled_before=iso(now()))) == sorted([main["id"], side["id"]])


# --- workers and statuses ----------------------------------------------------------------------


def test_worker_heartbeats(api):
    pool = new_pool(api)["name"]
    assert api.ok("POST", f"/work_pools/{pool}/workers/filter", {}) == []
    status, body = api.post(
        f"/work_pools/{pool}/workers/heartbeat", {"name": "worker-1", "heartbeat_interval_seconds": 30}
    )
    assert status == 204, body
    api.ok("POST", f"/work_pools/{pool}/workers/heartbeat", {"name": "worker-1", "heartbeat_interval_seconds": 30})
    api.ok("POST", f"/work_pools/{pool}/workers/heartbeat", {"name": "worker-2"})
    workers = api.ok("POST", f"/work_pools/{pool}/workers/filter", {})
    assert sorted(w["name"] for w in workers) == ["worker-1", "worker-2"], "one row per worker name"
    for worker in workers:
        assert {
            "id",
            "created",
            "updated",
            "name",
            "work_pool_id",
            "last_heartbeat_time",
            "status",
            "heartbeat_interval_seconds",
        } <= set(worker), worker
        assert worker["status"] == "ONLINE"
    assert {w["name"]: w["heartbeat_interval_seconds"] for w in workers}["worker-1"] == 30
    assert api.post(f"/work_pools/{unique('missing')}/workers/heartbeat", {"name": "w"})[0] == 404
    assert api.post(f"/work_pools/{pool}/workers/heartbeat", {})[0] == 422
    status, body = api.delete(f"/work_pools/{pool}/workers/worker-2")
    assert status == 204, body
    assert [w["name"] for w in api.ok("POST", f"/work_pools/{pool}/workers/filter", {})] == ["worker-1"]
    assert api.delete(f"/work_pools/{pool}/workers/worker-2")[0] == 404


def test_workers_filter_by_status_online(api):
    pool = new_pool(api)["name"]
    api.ok("POST", f"/work_pools/{pool}/workers/heartbeat", {"name": "worker-1", "heartbeat_interval_seconds": 30})
    api.ok("POST", f"/work_pools/{pool}/workers/heartbeat", {"name": "worker-2"})
    online = api.ok("POST", f"/work_pools/{pool}/workers/filter", {"workers": {"status": {"any_": ["ONLINE"]}}})
    assert sorted(w["name"] for w in online) == ["worker-1", "worker-2"]
    assert all(w["status"] == "ONLINE" for w in online)
    # (Prefect 2.20 itself ignores the status filter: asking for OFFLINE returns online workers too.)


def test_pool_and_queue_status_follow_heartbeats_and_polls(api):
    pool = new_pool(api)["name"]
    new_queue(api, pool, "never-polled")
    assert api.ok("GET", f"/work_pools/{pool}")["status"] == "NOT_READY"
    assert api.ok("GET", f"/work_pools/{pool}/queues/default")["status"] == "NOT_READY"
    # A worker's heartbeat makes the pool READY.
    api.ok("POST", f"/work_pools/{pool}/workers/heartbeat", {"name": "w1", "heartbeat_interval_seconds": 30})
    assert api.ok("GET", f"/work_pools/{pool}")["status"] == "READY"
    # A poll of one queue makes that queue READY and records when.
    poll(api, pool, work_queue_names=["default"])
    default = wait_for(
        lambda: api.ok("GET", f"/work_pools/{pool}/queues/default"), lambda q: q["status"] == "READY"
    )  # (Prefect records a poll just after answering it)
    assert default["status"] == "READY" and default["last_polled"] is not None
    assert api.ok("GET", f"/work_pools/{pool}/queues/never-polled")["status"] == "NOT_READY"
    # Paused wins over both.
    api.ok("PATCH", f"/work_pools/{pool}/queues/default", {"is_paused": True})
    assert api.ok("GET", f"/work_pools/{pool}/queues/default")["status"] == "PAUSED"
    api.ok("PATCH", f"/work_pools/{pool}", {"is_paused": True})
    assert api.ok("GET", f"/work_pools/{pool}")["status"] == "PAUSED"
    listed = {p["name"]: p for p in api.ok("POST", "/work_pools/filter", {"work_pools": {"name": {"any_": [pool]}}})}
    assert listed[pool]["status"] == "PAUSED"


def test_a_worker_silent_for_three_intervals_is_offline(app, clock):
    """At the App's clock's time (no waiting): ONLINE through three intervals after its heartbeat, then OFFLINE."""
    pool = answer(app, "POST", "/work_pools/", {"name": unique("pool"), "type": "process"})["name"]
    answer(app, "POST", f"/work_pools/{pool}/workers/heartbeat", {"name": "sleepy", "heartbeat_interval_seconds": 10})

    def status():
        (worker,) = answer(app, "POST", f"/work_pools/{pool}/workers/filter", {})
        assert parse(worker["last_heartbeat_time"]) == T0
        return worker["status"]

    assert status() == "ONLINE"
    clock.moment = T0 + dt.timedelta(seconds=30)
    assert status() == "ONLINE"
    clock.moment += TICK
    assert status() == "OFFLINE"


# --- the older id-based queue routes ------------------------------------------------------------


def test_older_work_queue_routes(api):
    name = unique("legacy")
    status, queue = api.post("/work_queues/", {"name": name, "description": "old style", "concurrency_limit": 5})
    assert status == 201, queue
    assert QUEUE_FIELDS <= set(queue), QUEUE_FIELDS - set(queue)
    assert queue["work_pool_name"] == "default-agent-pool"
    assert api.post("/work_queues/", {"name": name})[0] == 409
    assert api.ok("GET", f"/work_queues/{queue['id']}")["name"] == name
    assert api.ok("GET", f"/work_queues/name/{name}")["id"] == queue["id"]
    assert api.get(f"/work_queues/name/{unique('missing')}")[0] == 404
    assert api.get(f"/work_queues/{uuid.uuid4()}")[0] == 404

    status, body = api.patch(f"/work_queues/{queue['id']}", {"description": "still old", "is_paused": True})
    assert status == 204, body
    read = api.ok("GET", f"/work_queues/{queue['id']}")
    assert (read["description"], read["is_paused"], read["status"]) == ("still old", True, "PAUSED")
    api.ok("PATCH", f"/work_queues/{queue['id']}", {"is_paused": False})

    found = api.ok("POST", "/work_queues/filter", {"work_queues": {"name": {"any_": [name]}}})
    assert [q["id"] for q in found] == [queue["id"]]
    # startswith_ takes a list of prefixes for queue names (the SDK's match_work_queues sends one)
    for prefixes, expected in (([name[:6], "no-such-prefix"], [queue["id"]]), (["no-such-prefix"], []), ([], [])):
        found = api.ok(
            "POST",
            "/work_queues/filter",
            {"work_queues": {"name": {"startswith_": prefixes}, "id": {"any_": [queue["id"]]}}},
        )
        assert [q["id"] for q in found] == expected, prefixes

    # Not polled yet: unhealthy. Polled (an agent's get_runs): healthy.
    assert api.ok("GET", f"/work_queues/{queue['id']}/status")["healthy"] is False
    assert api.ok("POST", f"/work_queues/{queue['id']}/get_runs", {"scheduled_before": iso(now())}) == []
    health = api.ok("GET", f"/work_queues/{queue['id']}/status")
    assert health["healthy"] is True and health["last_polled"] is not None
    assert health["late_runs_count"] == 0
    # A deployment on that queue (no pool named): its due runs come out of /work_queues/{id}/get_runs.
    flow = api.ok("POST", "/flows/", {"name": unique("flow")})
    dep = api.ok("POST", "/deployments/", {"name": unique("dep"), "flow_id": flow["id"], "work_queue_name": name})
    assert dep["work_queue_name"] == name
    run = due_run(api, dep, minutes_ago=1)
    assert run["work_queue_id"] == queue["id"]
    runs = api.ok("POST", f"/work_queues/{queue['id']}/get_runs", {"scheduled_before": iso(now())})
    assert [r["id"] for r in runs] == [run["id"]]

    status, body = api.delete(f"/work_queues/{queue['id']}")
    assert status == 204, body
    assert api.get(f"/work_queues/{queue['id']}")[0] == 404
    assert api.delete(f"/work_queues/{queue['id']}")[0] == 404


def test_work_queue_status_counts_late_runs(api):
    pool = new_pool(api)["name"]
    dep = new_deployment(api, pool)
    queue = api.ok("GET", f"/work_pools/{pool}/queues/default")
    run = due_run(api, dep, minutes_ago=5)
    api.ok(
        "POST",
        f"/flow_runs/{run['id']}/set_state",
        {
            "state": {
                "type": "SCHEDULED",
                "name": "Late",
                "state_details": {"scheduled_time": run["expected_start_time"]},
            },
            "force": True,
        },
    )
    poll(api, pool)
    health = api.ok("GET", f"/work_queues/{queue['id']}/status")
    assert health["late_runs_count"] == 1, health
    assert health["healthy"] is False, "a queue with a late run is unhealthy (maximum_late_runs is 0)"
    assert health["health_check_policy"] == {"maximum_late_runs": 0, "maximum_seconds_since_last_polled": 60}


# --- Prefect 3: slots and storage --------------------------------------------------------------

PREFECT3_AGENT = {"User-Agent": "prefect/3.9.1 (API 0.8.4)"}  # what the 3.9 SDK's PrefectClient sends


@pytest.fixture(params=["sqlite", "postgres"])
def any_api(request, tmp_path):
    """As `api`, on SQLite, then on PostgreSQL."""
    url = f"sqlite:///{tmp_path}/pools.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url, port=0, PREFECT_API_SERVICES_SCHEDULER_ENABLED=False) as api_url:
        yield Client(api_url)


def test_pools_and_queues_show_3x_clients_their_active_slots(any_api):
    """Prefect 3's WorkPool and WorkQueue carry `active_slots`: the runs holding their slots (a pool's Pending
    and Running runs; a queue's by its id, also Cancelling ones on the /work_queues routes but not on the
    /work_pools/{name}/queues ones, as Prefect 3.9 counts them), null where there is no limit, 0 on a new limited
    one. A 2.20 client's models lack the field (test mode refuses it), so it is not sent to them."""
    api = any_api
    name = new_pool(api, concurrency_limit=3)["name"]
    fresh = api.ok("POST", "/work_pools/", {"name": unique("pool"), "concurrency_limit": 2}, headers=PREFECT3_AGENT)
    assert fresh["active_slots"] == 0
    free = api.ok("POST", "/work_pools/", {"name": unique("pool")}, headers=PREFECT3_AGENT)
    assert free["active_slots"] is None
    limited = api.ok("POST", f"/work_pools/{name}/queues", {"name": "limited", "concurrency_limit": 5})
    dep = new_deployment(api, name)
    runs = [due_run(api, dep) for _ in range(3)] + [due_run(api, dep, queue="limited") for _ in range(2)]
    for run, state in zip(runs, ("PENDING", "RUNNING", "COMPLETED", "RUNNING", "CANCELLING")):
        set_state(api, run["id"], state)
    named = api.ok("POST", "/flow_runs/", {"flow_id": dep["flow_id"], "work_queue_name": "limited"})
    set_state(api, named["id"], "RUNNING")  # in no queue (its name alone): Prefect counts it nowhere

    def slots(method, path, body=None, headers=PREFECT3_AGENT):
        return api.ok(method, path, body, headers=headers)

    assert slots("GET", f"/work_pools/{name}")["active_slots"] == 3  # 2 in default, 1 Running in limited
    by_pool = {p["name"]: p["active_slots"] for p in slots("POST", "/work_pools/filter", {})}
    assert (by_pool[name], by_pool[free["name"]]) == (3, None)
    assert slots("GET", f"/work_pools/{name}/queues/limited")["active_slots"] == 1  # not the Cancelling run
    assert slots("GET", f"/work_pools/{name}/queues/default")["active_slots"] is None  # no limit
    by_queue = {q["name"]: q["active_slots"] for q in slots("POST", f"/work_pools/{name}/queues/filter", {})}
    assert by_queue == {"default": None, "limited": 1}
    assert slots("GET", f"/work_queues/{limited['id']}")["active_slots"] == 2
    assert slots("GET", "/work_queues/name/limited")["active_slots"] == 2
    assert 2 in [q.get("active_slots") for q in slots("POST", "/work_queues/filter", {})]
    for path in (f"/work_pools/{name}", f"/work_pools/{name}/queues/limited", f"/work_queues/{limited['id']}"):
        assert "active_slots" not in slots("GET", path, headers=None), path


def test_concurrency_status_names_the_runs_holding_a_pools_and_a_queues_slots(any_api):
    """POST /work_pools/{name}/concurrency_status and /work_queues/{id}/concurrency_status (Prefect 3's
    `prefect work-pool slots`; 404s here before): Pending and Running runs hold a pool's slots, a queue's
    also Cancelling ones; queues and runs come a page at a time."""
    api = any_api
    name = new_pool(api, concurrency_limit=3)["name"]
    other = new_queue(api, name, "other", concurrency_limit=1)
    dep = new_deployment(api, name)
    pending, running, cancelling, done = (due_run(api, dep) for _ in range(4))
    elsewhere = due_run(api, dep, queue="other")
    for run, state in (
        (pending, "PENDING"),
        (running, "RUNNING"),
        (cancelling, "CANCELLING"),
        (done, "COMPLETED"),
        (elsewhere, "RUNNING"),
    ):
        set_state(api, run["id"], state)

    pool = api.ok("POST", f"/work_pools/{name}/concurrency_status", {"flow_run_limit": 1})
    assert (pool["active_slots"], pool["concurrency_limit"]) == (3, 3)
    assert (pool["count"], pool["limit"], pool["pages"], pool["page"]) == (2, 200, 1, 1)
    by_name = {q["queue_name"]: q for q in pool["queues"]}
    assert [q["queue_name"] for q in pool["queues"]] == ["default", "other"]  # by priority
    default = by_name["default"]
    assert (default["active_slots"], default["flow_run_count"], default["concurrency_limit"]) == (2, 2, None)
    assert len(default["flow_runs"]) == 1 and default["flow_runs"][0]["id"] in (pending["id"], running["id"])
    held = default["flow_runs"][0]
    assert set(held) == {
        "id",
        "name",
        "state_type",
        "state_name",
        "start_time",
        "state_timestamp",
        "time_in_current_state",
    }
    assert held["time_in_current_state"] >= 0
    assert (by_name["other"]["queue_id"], by_name["other"]["concurrency_limit"]) == (other["id"], 1)
    assert (
        api.ok("POST", f"/work_pools/{name}/concurrency_status", {"limit": 1, "page": 2})["queues"][0]["queue_name"]
        == "other"
    )

    queue = api.ok("POST", f"/work_queues/{default['queue_id']}/concurrency_status", {"limit": 2})
    assert (queue["active_slots"], queue["count"], queue["pages"]) == (3, 3, 2)
    assert {r["id"] for r in queue["flow_runs"]} < {pending["id"], running["id"], cancelling["id"]}
    rest = api.ok("POST", f"/work_queues/{default['queue_id']}/concurrency_status", {"limit": 2, "page": 2})
    assert len(rest["flow_runs"]) == 1

    assert api.post("/work_pools/no-such-pool/concurrency_status", {})[0] == 404
    assert api.post(f"/work_queues/{uuid.uuid4()}/concurrency_status", {})[0] == 404
    for body, field in (({"limit": 201}, "limit"), ({"page": 0}, "page"), ({"flow_run_limit": 201}, "flow_run_limit")):
        status, answer = api.post(f"/work_pools/{name}/concurrency_status", body)
        assert status == 422 and ["body", field] in [e["loc"] for e in answer["exception_detail"]], answer


def test_a_pools_storage_configuration_is_kept(any_api):
    """Prefect 3 pools carry where workers upload and run code bundles (it was dropped here); 2.20
    clients, which refuse fields their WorkPool lacks, do not read it."""
    api = any_api
    upload = {"prefect_aws.experimental.bundles.upload": {"bucket": "flows"}}
    pool = api.ok(
        "POST",
        "/work_pools/",
        {"name": unique("pool"), "type": "process", "storage_configuration": {"bundle_upload_step": upload}},
        headers=PREFECT3_AGENT,
    )
    assert pool["storage_configuration"] == {
        "bundle_upload_step": upload,
        "bundle_execution_step": None,
        "default_result_storage_block_id": None,
    }
    block_id = str(uuid.uuid4())
    api.ok(
        "PATCH", f"/work_pools/{pool['name']}", {"storage_configuration": {"default_result_storage_block_id": block_id}}
    )
    read = api.ok("GET", f"/work_pools/{pool['name']}", headers=PREFECT3_AGENT)
    assert read["storage_configuration"]["default_result_storage_block_id"] == block_id
    assert read["storage_configuration"]["bundle_upload_step"] is None  # the whole value is replaced, as in Prefect
    assert "storage_configuration" not in api.ok("GET", f"/work_pools/{pool['name']}")
    status, body = api.patch(f"/work_pools/{pool['name']}", {"storage_configuration": {"bucket": "x"}})
    assert status == 422 and body["exception_detail"][0]["loc"] == ["body", "storage_configuration", "bucket"], body
    status, body = api.patch(
        f"/work_pools/{pool['name']}", {"storage_configuration": {"default_result_storage_block_id": "nope"}}
    )
    assert status == 422, body


def test_a_flow_run_created_with_a_work_pool_goes_to_its_queue(any_api):
    """POST /flow_runs/ with work_pool_name (Prefect 3's `submit_to_work_pool`, a run without a deployment)
    puts the run in that pool's default queue, or in the named one, so the pool's workers are offered it
    (it was left in no queue, and the worker never saw it); a missing pool or queue is a 404, as in
    Prefect. A queue name without a pool is only kept as the run's work_queue_name."""
    api = any_api
    pool = new_pool(api)
    name = pool["name"]
    other = new_queue(api, name, "other")
    flow = api.ok("POST", "/flows/", {"name": unique("flow")})

    run = api.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "work_pool_name": name, "state": {"type": "PENDING"}})
    assert (run["work_queue_id"], run["work_queue_name"]) == (pool["default_queue_id"], "default")
    assert offered_ids(api, name) == []  # Pending: not offered yet
    scheduled = {"type": "SCHEDULED", "state_details": {"scheduled_time": iso(now())}}
    api.ok("POST", f"/flow_runs/{run['id']}/set_state", {"state": scheduled})  # what the SDK then sends
    assert offered_ids(api, name, scheduled_before=iso(now() + dt.timedelta(seconds=5))) == [run["id"]]

    named = api.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "work_pool_name": name, "work_queue_name": "other"})
    assert (named["work_queue_id"], named["work_queue_name"]) == (other["id"], "other")

    status, body = api.post("/flow_runs/", {"flow_id": flow["id"], "work_pool_name": "no-such-pool"})
    assert (status, body["detail"]) == (404, 'Work pool "no-such-pool" not found.')
    status, body = api.post("/flow_runs/", {"flow_id": flow["id"], "work_pool_name": name, "work_queue_name": "nope"})
    assert (status, body["detail"]) == (404, f"Work pool queue '{name}/nope' not found.")

    loose = api.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "work_queue_name": "other"})
    assert (loose["work_queue_id"], loose["work_queue_name"]) == (None, "other")


def test_a_flow_runs_work_pool_is_its_queues_pool(any_api):
    """Prefect's FlowRunResponse (2.20's and 3.9's) answers a run's work_pool_id and work_pool_name from its
    work queue's pool (they were always null here): a run made in a pool, one of a deployment's, one the
    scheduler made; none without a queue; null again once the queue or the pool is deleted, as there."""
    api = any_api
    pool = new_pool(api)
    name = pool["name"]
    new_queue(api, name, "other")
    mine = {"work_pool_id": pool["id"], "work_pool_name": name}
    flow = api.ok("POST", "/flows/", {"name": unique("flow")})
    run = api.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "work_pool_name": name}, headers=PREFECT3_AGENT)
    in_other = api.ok(
        "POST", "/flow_runs/", {"flow_id": flow["id"], "work_pool_name": name, "work_queue_name": "other"}
    )
    of_dep = due_run(api, new_deployment(api, name))
    loose = api.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})
    pools = [{key: r[key] for key in mine} for r in (run, in_other, of_dep)]
    assert pools == [mine] * 3 and (loose["work_pool_id"], loose["work_pool_name"]) == (None, None)
    for headers in (PREFECT3_AGENT, None):
        read = api.ok("GET", f"/flow_runs/{run['id']}", headers=headers)
        assert (read["work_pool_id"], read["work_pool_name"]) == (pool["id"], name)
        listed = api.ok("POST", "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC"}, headers=headers)
        assert sorted((r["id"], r["work_pool_name"]) for r in listed) == sorted(
            [(run["id"], name), (in_other["id"], name), (of_dep["id"], name), (loose["id"], None)]
        )

    body = {"name": unique("dep"), "flow_id": flow["id"], "work_pool_name": name}
    dep = api.ok("POST", "/deployments/", {**body, "schedules": [{"schedule": {"interval": 3600}}]})
    api.ok("POST", f"/deployments/{dep['id']}/schedule", {})
    scheduled = api.ok("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [dep["id"]]}}})
    assert scheduled and {(r["work_pool_id"], r["work_pool_name"]) for r in scheduled} == {(pool["id"], name)}

    api.ok("DELETE", f"/work_pools/{name}/queues/other")
    read = api.ok("GET", f"/flow_runs/{in_other['id']}")
    assert (read["work_pool_id"], read["work_pool_name"]) == (None, None)
    assert api.ok("GET", f"/flow_runs/{run['id']}")["work_pool_name"] == name
    api.ok("DELETE", f"/work_pools/{name}")
    read = api.ok("GET", f"/flow_runs/{run['id']}", headers=PREFECT3_AGENT)
    assert (read["work_pool_id"], read["work_pool_name"]) == (None, None)


def test_deleting_a_queue_or_its_pool_nulls_the_work_queue_id_of_its_runs_and_deployments(any_api):
    """Prefect's flow_run.work_queue_id and deployment.work_queue_id are foreign keys ON DELETE SET NULL (3.9's
    and 2.20's servers, observed): deleting a queue (by id or by pool and name) or its pool leaves its runs and
    deployments with no work_queue_id, and so no work pool, while they keep their work_queue_name. Here the
    runs and deployments went on naming the deleted queue's id."""
    api = any_api
    name = new_pool(api)["name"]
    queues = [new_queue(api, name, q) for q in ("by-id", "by-name", "with-pool")]
    deps = [new_deployment(api, name, q["name"]) for q in queues]
    runs = [due_run(api, dep) for dep in deps]
    assert [r["work_queue_id"] for r in runs] == [q["id"] for q in queues]
    api.ok("DELETE", f"/work_queues/{queues[0]['id']}")
    api.ok("DELETE", f"/work_pools/{name}/queues/by-name")
    kept = api.ok("GET", f"/flow_runs/{runs[2]['id']}")
    assert (kept["work_queue_id"], kept["work_pool_name"]) == (queues[2]["id"], name)
    api.ok("DELETE", f"/work_pools/{name}")
    for run, dep, queue in zip(runs, deps, queues):
        for headers in (PREFECT3_AGENT, None):
            read = api.ok("GET", f"/flow_runs/{run['id']}", headers=headers)
            got = [read[k] for k in ("work_queue_id", "work_queue_name", "work_pool_id", "work_pool_name")]
            assert got == [None, queue["name"], None, None]
        read = api.ok("GET", f"/deployments/{dep['id']}", headers=PREFECT3_AGENT)
        assert (read["work_queue_id"], read["work_queue_name"], read["work_pool_name"]) == (None, queue["name"], None)
    gone = {"flow_runs": {"work_queue_id": {"any_": [q["id"] for q in queues]}}}
    assert api.ok("POST", "/flow_runs/filter", gone) == []
