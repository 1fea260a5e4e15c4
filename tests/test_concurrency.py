"""Concurrency limits through the HTTP API of a real server.

v1 (tag) limits: `/concurrency_limits/...`, create-or-update by tag, enforced when a task run tagged with
a limited tag proposes RUNNING: it takes a slot (its id in `active_slots`) or is told to WAIT 30 seconds;
a limit of 0 aborts; the slot is given back on any transition out of RUNNING. Prefect 3's
`prefect.concurrency.v1` takes and gives back a task run's tag slots itself (/concurrency_limits/increment and
/decrement): a full limit answers 423 with Retry-After, a limit of 0 a 423 without.

v2 (global) limits: `/v2/concurrency_limits/...`, slots taken and given back with increment/decrement
(mode `concurrency` or `rate_limit`); a full limit answers 423 with Retry-After and counts the denial;
slot decay gives slots back over time.

The pieces most sensitive to locking run on SQLite and on PostgreSQL (the `any_db` fixture).
"""

import json
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

import prefectlite
from helpers import Client, wait_until

WAIT_SECONDS = 30  # what the Prefect 2 server tells a task waiting for a tag's slot


# --- helpers -----------------------------------------------------------------------------------


def unique(prefix="tag"):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def raw_post(api_url, path, body):
    """POST returning (status, headers, json) — for headers such as Retry-After."""
    req = urllib.request.Request(
        api_url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read()
            return resp.status, resp.headers, (json.loads(text) if text else None)
    except urllib.error.HTTPError as exc:
        text = exc.read()
        return exc.code, exc.headers, (json.loads(text) if text else None)


def running_flow_run(client):
    flow = client.ok("POST", "/flows/", {"name": unique("flow")})
    run = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"]})
    status, result = client.post(f"/flow_runs/{run['id']}/set_state", {"state": {"type": "RUNNING"}})
    assert result["status"] == "ACCEPT", (status, result)
    return run


def new_task_run(client, flow_run_id, tags):
    return client.ok(
        "POST",
        "/task_runs/",
        {"flow_run_id": flow_run_id, "task_key": unique("task"), "dynamic_key": "0", "tags": list(tags)},
    )


def propose(client, task_run_id, state_type, force=False, **state):
    status, result = client.post(
        f"/task_runs/{task_run_id}/set_state", {"state": {"type": state_type, **state}, "force": force}
    )
    assert status in (200, 201), (status, result)
    return status, result


def assert_accepted(status, result, state_type="RUNNING"):
    assert (status, result["status"], result["state"]["type"]) == (201, "ACCEPT", state_type), (status, result)


def assert_waits(status, result, delay=WAIT_SECONDS):
    assert (status, result["status"]) == (200, "WAIT"), (status, result)
    assert result["details"]["type"] == "wait_details", result
    assert result["details"]["delay_seconds"] == delay, result
    return result


def tag_limit(client, tag):
    return client.ok("GET", f"/concurrency_limits/tag/{tag}")


def set_tag_limit(client, tag, limit):
    status, body = client.post("/concurrency_limits/", {"tag": tag, "concurrency_limit": limit})
    assert status in (200, 201), (status, body)
    return body


def task_state(client, task_run_id):
    return client.ok("GET", f"/task_runs/{task_run_id}")["state_type"]


def new_global(client, name=None, limit=1, **fields):
    status, body = client.post("/v2/concurrency_limits/", {"name": name or unique("gl"), "limit": limit, **fields})
    assert status == 201, (status, body)
    return body


def increment(client, names, slots=1, mode=None):
    body = {"names": list(names), "slots": slots}
    if mode is not None:
        body["mode"] = mode
    return client.post("/v2/concurrency_limits/increment", body)


def decrement(client, names, slots=1, **extra):
    return client.post("/v2/concurrency_limits/decrement", {"names": list(names), "slots": slots, **extra})


def global_limit(client, id_or_name):
    return client.ok("GET", f"/v2/concurrency_limits/{id_or_name}")


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(request, tmp_path):
    """A real server on SQLite, then on PostgreSQL; yields a Client."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/any.db"
    else:
        url = request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url, port=0) as api_url:
        yield Client(api_url)


def run_threads(count, target):
    errors = []

    def guarded(n):
        try:
            target(n)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "threads did not finish"
    assert errors == [], errors


def statuses_at_once(api_url, count, ask) -> list[int]:
    """`count` threads, each with a client of its own, call ask(client) at the same moment; its first item (the
    HTTP status) from each, sorted."""
    statuses, lock, start = [], threading.Lock(), threading.Barrier(count)

    def go(n):
        local = Client(api_url)
        start.wait()
        status = ask(local)[0]
        with lock:
            statuses.append(status)

    run_threads(count, go)
    return sorted(statuses)


# --- v1: the API -------------------------------------------------------------------------------


def test_tag_limit_create_and_read_by_id_and_tag(client):
    status, limit = client.post("/concurrency_limits/", {"tag": "database", "concurrency_limit": 3})
    assert status in (200, 201), limit
    assert (limit["tag"], limit["concurrency_limit"], limit["active_slots"]) == ("database", 3, [])
    assert {"id", "created", "updated"} <= set(limit)
    assert client.ok("GET", f"/concurrency_limits/{limit['id']}") == limit
    assert client.ok("GET", "/concurrency_limits/tag/database") == limit


def test_tag_limit_create_again_updates_the_same_limit(client):
    first = set_tag_limit(client, "api", 3)
    status, second = client.post("/concurrency_limits/", {"tag": "api", "concurrency_limit": 7})
    assert status == 200, second
    assert second["id"] == first["id"]
    assert second["concurrency_limit"] == 7
    assert tag_limit(client, "api")["concurrency_limit"] == 7
    assert len(client.ok("POST", "/concurrency_limits/filter", {})) == 1


def test_concurrent_creates_of_one_tag_make_one_limit(any_db):
    """Create-or-update by tag: racing creates of one tag all succeed and leave one limit (5 races)."""
    client = any_db
    for race in range(5):
        tag = f"contended-{race}"
        results = []
        start = threading.Barrier(8)

        def go(n):
            local = Client(client.api_url)
            start.wait()
            results.append(local.post("/concurrency_limits/", {"tag": tag, "concurrency_limit": n + 1}))

        run_threads(8, go)
        assert all(status in (200, 201) for status, _ in results), (race, [(s, b) for s, b in results if s >= 300])
        assert len({body["id"] for _, body in results}) == 1
        assert 1 <= tag_limit(client, tag)["concurrency_limit"] <= 8
    assert len(client.ok("POST", "/concurrency_limits/filter", {})) == 5


def test_tag_limit_update_keeps_the_slots_taken(client):
    tag = unique()
    set_tag_limit(client, tag, 1)
    run = running_flow_run(client)
    task = new_task_run(client, run["id"], [tag])
    assert_accepted(*propose(client, task["id"], "RUNNING"))
    set_tag_limit(client, tag, 2)
    assert tag_limit(client, tag)["active_slots"] == [task["id"]]


@pytest.mark.parametrize(
    "body",
    [
        {"tag": "x", "concurrency_limit": -1},
        {"tag": "x"},
        {"concurrency_limit": 1},
        {"tag": "x", "concurrency_limit": "many"},
    ],
)
def test_tag_limit_create_is_validated(client, body):
    status, payload = client.post("/concurrency_limits/", body)
    assert status == 422, payload
    assert client.ok("POST", "/concurrency_limits/filter", {}) == []


def test_tag_limit_unknown_is_404(client):
    assert client.get("/concurrency_limits/tag/nope")[0] == 404
    assert client.get(f"/concurrency_limits/{uuid.uuid4()}")[0] == 404
    assert client.delete("/concurrency_limits/tag/nope")[0] == 404
    assert client.delete(f"/concurrency_limits/{uuid.uuid4()}")[0] == 404
    assert client.post("/concurrency_limits/tag/nope/reset", {})[0] == 404


def test_tag_limit_filter(client):
    for tag, n in (("charlie", 3), ("alpha", 1), ("bravo", 2)):
        set_tag_limit(client, tag, n)
    listed = client.ok("POST", "/concurrency_limits/filter", {})
    assert sorted(x["tag"] for x in listed) == ["alpha", "bravo", "charlie"]
    assert {x["tag"]: x["concurrency_limit"] for x in listed} == {"alpha": 1, "bravo": 2, "charlie": 3}
    first = client.ok("POST", "/concurrency_limits/filter", {"limit": 2})
    rest = client.ok("POST", "/concurrency_limits/filter", {"limit": 2, "offset": 2})
    assert len(first) == 2 and len(rest) == 1
    assert {x["tag"] for x in first + rest} == {"alpha", "bravo", "charlie"}


def test_tag_limit_delete_by_id(client):
    limit = set_tag_limit(client, "doomed", 1)
    keep = set_tag_limit(client, "keep", 1)
    status, body = client.delete(f"/concurrency_limits/{limit['id']}")
    assert status in (200, 204), body
    assert client.get(f"/concurrency_limits/{limit['id']}")[0] == 404
    assert client.get("/concurrency_limits/tag/doomed")[0] == 404
    assert [x["id"] for x in client.ok("POST", "/concurrency_limits/filter", {})] == [keep["id"]]


def test_tag_limit_delete_by_tag(client):
    limit = set_tag_limit(client, "doomed", 1)
    status, body = client.delete("/concurrency_limits/tag/doomed")
    assert status in (200, 204), body
    assert client.get(f"/concurrency_limits/{limit['id']}")[0] == 404
    assert client.delete("/concurrency_limits/tag/doomed")[0] == 404


def test_deleting_a_tag_limit_lifts_the_limit(client):
    tag = unique()
    set_tag_limit(client, tag, 1)
    run = running_flow_run(client)
    first, second = (new_task_run(client, run["id"], [tag]) for _ in range(2))
    assert_accepted(*propose(client, first["id"], "RUNNING"))
    assert_waits(*propose(client, second["id"], "RUNNING"))
    client.ok("DELETE", f"/concurrency_limits/tag/{tag}")
    assert_accepted(*propose(client, second["id"], "RUNNING"))


def test_the_wait_a_task_is_told_is_a_setting(tmp_path):
    """Prefect 2's PREFECT_TASK_RUN_TAG_CONCURRENCY_SLOT_WAIT_SECONDS (30 by default, as every test above
    sees): the SDK sleeps that long before it proposes RUNNING again."""
    with prefectlite.serve(
        database=f"sqlite:///{tmp_path}/wait.db", port=0, PREFECT_TASK_RUN_TAG_CONCURRENCY_SLOT_WAIT_SECONDS=2
    ) as api_url:
        client = Client(api_url)
        tag = unique()
        set_tag_limit(client, tag, 1)
        run = running_flow_run(client)
        first, second = (new_task_run(client, run["id"], [tag]) for _ in range(2))
        assert_accepted(*propose(client, first["id"], "RUNNING"))
        assert_waits(*propose(client, second["id"], "RUNNING"), delay=2)


def test_tag_limit_reset_frees_all_slots(client):
    tag = unique()
    set_tag_limit(client, tag, 2)
    run = running_flow_run(client)
    tasks = [new_task_run(client, run["id"], [tag]) for _ in range(3)]
    for task in tasks[:2]:
        assert_accepted(*propose(client, task["id"], "RUNNING"))
    assert sorted(tag_limit(client, tag)["active_slots"]) == sorted(t["id"] for t in tasks[:2])
    assert_waits(*propose(client, tasks[2]["id"], "RUNNING"))

    status, body = client.post(f"/concurrency_limits/tag/{tag}/reset", {})
    assert status == 200, body
    assert tag_limit(client, tag)["active_slots"] == []
    assert_accepted(*propose(client, tasks[2]["id"], "RUNNING"))
    assert tag_limit(client, tag)["active_slots"] == [tasks[2]["id"]]


def test_tag_limit_reset_with_slot_override(client):
    tag = unique()
    set_tag_limit(client, tag, 2)
    run = running_flow_run(client)
    holder = new_task_run(client, run["id"], [tag])
    assert_accepted(*propose(client, holder["id"], "RUNNING"))
    override = [str(uuid.uuid4()), str(uuid.uuid4())]
    status, body = client.post(f"/concurrency_limits/tag/{tag}/reset", {"slot_override": override})
    assert status == 200, body
    assert sorted(tag_limit(client, tag)["active_slots"]) == sorted(override)
    # both slots are taken by the override now
    newcomer = new_task_run(client, run["id"], [tag])
    assert_waits(*propose(client, newcomer["id"], "RUNNING"))


def test_tag_limit_reset_with_a_bad_slot_override_is_422(client):
    tag = unique()
    set_tag_limit(client, tag, 2)
    status, body = client.post(f"/concurrency_limits/tag/{tag}/reset", {"slot_override": ["not-a-uuid"]})
    assert status == 422, body
    status, body = client.post(f"/concurrency_limits/tag/{tag}/reset", {"slot_override": "nope"})
    assert status == 422, body


# --- v1: enforcement in task-run orchestration -------------------------------------------------


def test_tag_limit_takes_slots_and_makes_others_wait(client):
    tag = unique()
    set_tag_limit(client, tag, 2)
    run = running_flow_run(client)
    tasks = [new_task_run(client, run["id"], [tag, "unlimited"]) for _ in range(3)]
    assert_accepted(*propose(client, tasks[0]["id"], "RUNNING"))
    assert_accepted(*propose(client, tasks[1]["id"], "RUNNING"))
    assert sorted(tag_limit(client, tag)["active_slots"]) == sorted([tasks[0]["id"], tasks[1]["id"]])

    result = assert_waits(*propose(client, tasks[2]["id"], "RUNNING"))
    assert tag in result["details"]["reason"]
    assert task_state(client, tasks[2]["id"]) == "PENDING"
    assert tasks[2]["id"] not in tag_limit(client, tag)["active_slots"]
    # asking again while still full: still waiting, nothing taken
    assert_waits(*propose(client, tasks[2]["id"], "RUNNING"))
    assert len(tag_limit(client, tag)["active_slots"]) == 2

    assert_accepted(*propose(client, tasks[0]["id"], "COMPLETED"), "COMPLETED")
    assert tag_limit(client, tag)["active_slots"] == [tasks[1]["id"]]
    assert_accepted(*propose(client, tasks[2]["id"], "RUNNING"))
    assert sorted(tag_limit(client, tag)["active_slots"]) == sorted([tasks[1]["id"], tasks[2]["id"]])


@pytest.mark.parametrize(
    "leave_to, force",
    [
        ("COMPLETED", False),
        ("FAILED", False),
        ("CRASHED", False),
        ("CANCELLED", False),
        ("CANCELLING", False),
        ("PAUSED", False),
        ("SCHEDULED", True),
        ("PENDING", True),
    ],
)
def test_any_transition_out_of_running_gives_the_slot_back(client, leave_to, force):
    tag = unique()
    set_tag_limit(client, tag, 1)
    run = running_flow_run(client)
    holder = new_task_run(client, run["id"], [tag])
    assert_accepted(*propose(client, holder["id"], "RUNNING"))
    assert tag_limit(client, tag)["active_slots"] == [holder["id"]]

    extra = {"state_details": {"scheduled_time": prefectlite.now_iso()}} if leave_to == "SCHEDULED" else {}
    status, result = propose(client, holder["id"], leave_to, force=force, **extra)
    assert result["status"] == "ACCEPT" and status == 201, result
    assert task_state(client, holder["id"]) == leave_to
    assert tag_limit(client, tag)["active_slots"] == []

    other = new_task_run(client, run["id"], [tag])
    assert_accepted(*propose(client, other["id"], "RUNNING"))


def test_running_again_does_not_take_a_second_slot(client):
    tag = unique()
    set_tag_limit(client, tag, 2)
    run = running_flow_run(client)
    task = new_task_run(client, run["id"], [tag])
    assert_accepted(*propose(client, task["id"], "RUNNING"))
    propose(client, task["id"], "RUNNING", force=True)
    assert tag_limit(client, tag)["active_slots"] == [task["id"]]
    assert_accepted(*propose(client, task["id"], "COMPLETED"), "COMPLETED")
    assert tag_limit(client, tag)["active_slots"] == []


def test_a_task_with_several_limited_tags_needs_a_slot_in_each(client):
    roomy, tight = unique("roomy"), unique("tight")
    set_tag_limit(client, roomy, 5)
    set_tag_limit(client, tight, 1)
    run = running_flow_run(client)
    first = new_task_run(client, run["id"], [roomy, tight])
    assert_accepted(*propose(client, first["id"], "RUNNING"))
    assert tag_limit(client, roomy)["active_slots"] == [first["id"]]
    assert tag_limit(client, tight)["active_slots"] == [first["id"]]

    second = new_task_run(client, run["id"], [roomy, tight])
    assert_waits(*propose(client, second["id"], "RUNNING"))
    # all or nothing: no slot was taken on the tag that had room
    assert tag_limit(client, roomy)["active_slots"] == [first["id"]]

    assert_accepted(*propose(client, first["id"], "FAILED"), "FAILED")
    assert tag_limit(client, roomy)["active_slots"] == []
    assert tag_limit(client, tight)["active_slots"] == []
    assert_accepted(*propose(client, second["id"], "RUNNING"))


def test_a_tag_limit_of_zero_aborts(client):
    tag = unique()
    set_tag_limit(client, tag, 0)
    run = running_flow_run(client)
    task = new_task_run(client, run["id"], [tag])
    status, result = propose(client, task["id"], "RUNNING")
    assert (status, result["status"]) == (200, "ABORT"), result
    assert result["details"]["type"] == "abort_details"
    assert tag in result["details"]["reason"]
    assert task_state(client, task["id"]) == "PENDING"
    assert tag_limit(client, tag)["active_slots"] == []


def test_raising_a_tag_limit_lets_a_waiting_task_in(client):
    tag = unique()
    set_tag_limit(client, tag, 1)
    run = running_flow_run(client)
    first, second = (new_task_run(client, run["id"], [tag]) for _ in range(2))
    assert_accepted(*propose(client, first["id"], "RUNNING"))
    assert_waits(*propose(client, second["id"], "RUNNING"))
    set_tag_limit(client, tag, 2)
    assert_accepted(*propose(client, second["id"], "RUNNING"))


def test_untagged_and_other_tagged_tasks_are_not_limited(client):
    tag = unique()
    set_tag_limit(client, tag, 1)
    run = running_flow_run(client)
    assert_accepted(*propose(client, new_task_run(client, run["id"], [tag])["id"], "RUNNING"))
    for tags in ([], ["other"], ["other", "more"]):
        assert_accepted(*propose(client, new_task_run(client, run["id"], tags)["id"], "RUNNING"))


def test_concurrent_proposals_never_exceed_a_tag_limit(any_db):
    client = any_db
    tag = unique()
    limit = 3
    set_tag_limit(client, tag, limit)
    run = running_flow_run(client)
    tasks = [new_task_run(client, run["id"], [tag]) for _ in range(12)]
    outcomes = {}
    start = threading.Barrier(len(tasks))

    def go(n):
        local = Client(client.api_url)
        start.wait()
        outcomes[tasks[n]["id"]] = propose(local, tasks[n]["id"], "RUNNING")[1]["status"]

    run_threads(len(tasks), go)
    accepted = sorted(t for t, s in outcomes.items() if s == "ACCEPT")
    assert len(accepted) == limit, outcomes
    assert sorted(s for s in outcomes.values() if s != "ACCEPT") == ["WAIT"] * (len(tasks) - limit)
    assert sorted(tag_limit(client, tag)["active_slots"]) == accepted
    running = client.ok(
        "POST", "/task_runs/filter", {"task_runs": {"tags": {"all_": [tag]}, "state": {"type": {"any_": ["RUNNING"]}}}}
    )
    assert sorted(t["id"] for t in running) == accepted


def test_tag_limit_holds_under_churn(any_db):
    """8 workers each run 5 tagged tasks to completion, waiting their turn: never more than `limit` tasks
    RUNNING at once, every slot given back at the end."""
    client = any_db
    tag = unique()
    limit, workers, per_worker = 2, 8, 5
    set_tag_limit(client, tag, limit)
    run = running_flow_run(client)
    tasks = [[new_task_run(client, run["id"], [tag]) for _ in range(per_worker)] for _ in range(workers)]
    lock = threading.Lock()
    state = {"holding": 0, "max": 0, "waits": 0}
    start = threading.Barrier(workers)

    def work(n):
        local = Client(client.api_url)
        start.wait()
        for task in tasks[n]:
            deadline = time.monotonic() + 120
            while True:
                status, result = propose(local, task["id"], "RUNNING")
                if result["status"] == "ACCEPT":
                    break
                assert result["status"] == "WAIT", result
                with lock:
                    state["waits"] += 1
                assert time.monotonic() < deadline, "never got a slot"
                time.sleep(0.005)  # a retry's back-off, as a client's
            with lock:
                state["holding"] += 1
                state["max"] = max(state["max"], state["holding"])
            time.sleep(0.002)  # by design: hold the slot a moment, so that holders overlap
            with lock:  # counted out before giving the slot back, so the count never exceeds the server's
                state["holding"] -= 1
            status, result = propose(local, task["id"], "COMPLETED")
            assert result["status"] == "ACCEPT", result

    run_threads(workers, work)
    assert 1 <= state["max"] <= limit, state
    assert tag_limit(client, tag)["active_slots"] == []
    done = client.ok(
        "POST", "/task_runs/count", {"task_runs": {"tags": {"all_": [tag]}, "state": {"type": {"any_": ["COMPLETED"]}}}}
    )
    assert done == workers * per_worker


# --- v1: the slots Prefect 3's `prefect.concurrency.v1` takes ------------------------------------
# POST /concurrency_limits/increment and /decrement, body {names: tags, task_run_id}: one slot per tag, from
# the tag's global limit `tag:TAG` (a lease held by the task run) when it has one, else from its v1 row.


def take_tags(client, tags, task_run_id):
    body = {"names": list(tags), "task_run_id": task_run_id}
    return raw_post(client.api_url, "/concurrency_limits/increment", body)


def give_back_tags(client, tags, task_run_id, **extra):
    return client.post("/concurrency_limits/decrement", {"names": list(tags), "task_run_id": task_run_id, **extra})


def test_v1_increment_takes_a_slot_per_limited_tag_for_the_task_run(client):
    tag, free = unique(), unique()
    limit = set_tag_limit(client, tag, 2)
    holder = str(uuid.uuid4())
    status, _, body = take_tags(client, [tag, free], holder)
    assert status == 200, body
    assert body == [{"id": limit["id"], "name": tag, "limit": 2}]  # a tag without a limit takes nothing
    assert tag_limit(client, tag)["active_slots"] == [holder]
    assert take_tags(client, [], holder)[::2] == (200, [])


def test_v1_increment_of_a_full_limit_is_423_with_the_tag_wait_and_takes_nothing(client):
    tag, other = unique(), unique()
    set_tag_limit(client, tag, 1)
    set_tag_limit(client, other, 1)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    assert take_tags(client, [tag], first)[0] == 200
    status, headers, body = take_tags(client, [other, tag], second)
    assert status == 423, body
    assert body == {"detail": f"Concurrency limit for the {tag} tag has been reached"}
    assert headers.get("Retry-After") == f"{float(WAIT_SECONDS)}"  # Prefect's: the tag wait as a float
    assert tag_limit(client, other)["active_slots"] == []  # all or nothing
    assert take_tags(client, [tag], first)[0] == 423  # a holder asking again is no exception


def test_v1_increment_of_a_zero_limit_is_423_without_retry_after(client):
    tag = unique()
    set_tag_limit(client, tag, 0)
    status, headers, body = take_tags(client, [tag], str(uuid.uuid4()))
    assert status == 423, body
    assert (
        body["detail"] == f'The concurrency limit on tag "{tag}" is 0 and will deadlock if the task tries to run again.'
    )
    assert headers.get("Retry-After") is None  # the SDK gives up rather than waiting


def test_v1_decrement_gives_the_task_runs_slot_back_and_lists_the_tags_limits(any_db):
    client = any_db
    tag, free = unique(), unique()
    limit = set_tag_limit(client, tag, 1)
    holder, other = str(uuid.uuid4()), str(uuid.uuid4())
    assert take_tags(client, [tag], holder)[0] == 200
    listed = [{"id": limit["id"], "name": f"tag:{tag}", "limit": 1}]  # Prefect 3.9 names them so, held or not
    assert give_back_tags(client, [tag, free], other, occupancy_seconds=1.5) == (200, listed)
    assert tag_limit(client, tag)["active_slots"] == [holder]  # not the other's to give back
    assert give_back_tags(client, [tag, free], holder) == (200, listed)
    assert tag_limit(client, tag)["active_slots"] == []
    assert take_tags(client, [tag], other)[0] == 200


def test_v1_slots_of_a_tag_with_a_global_limit_are_leases_of_the_task_run(any_db):
    client = any_db
    tag = unique()
    limit = new_global(client, name=f"tag:{tag}", limit=1)
    holder, other = str(uuid.uuid4()), str(uuid.uuid4())
    status, _, body = take_tags(client, [tag], holder)
    assert (status, body) == (200, [{"id": limit["id"], "name": tag, "limit": 1}])
    assert global_limit(client, limit["id"])["active_slots"] == 1
    status, headers, body = take_tags(client, [tag], other)
    assert (status, body) == (423, {"detail": f"Concurrency limit for the {tag} tag has been reached"})
    assert headers.get("Retry-After") == f"{float(WAIT_SECONDS)}"

    listed = [{"id": limit["id"], "name": f"tag:{tag}", "limit": 1}]
    assert give_back_tags(client, [tag], other) == (200, listed)
    assert global_limit(client, limit["id"])["active_slots"] == 1  # the other held no lease
    assert give_back_tags(client, [tag], holder) == (200, listed)
    assert global_limit(client, limit["id"])["active_slots"] == 0
    assert take_tags(client, [tag], other)[0] == 200

    inactive = unique()
    new_global(client, name=f"tag:{inactive}", limit=1, active=False)
    assert take_tags(client, [inactive], holder)[::2] == (200, [])  # an inactive limit takes nothing


PREFECT3_AGENT = {"User-Agent": "prefect/3.9.1 (API 0.8.4)"}  # what the 3.9 SDK's PrefectClient sends


def test_a_3x_client_reads_a_tags_limit_from_its_global_limit_first(any_db):
    """Prefect 3.9 answers a tag's limit from the global limit `tag:NAME` when there is one (before a v1 row of
    the tag), its active_slots the task runs holding leases on it; a 2.x client still reads only v1 rows."""
    client = any_db
    three = Client(client.api_url, headers=PREFECT3_AGENT)
    tag = unique()
    limit = new_global(client, name=f"tag:{tag}", limit=3)
    shape = {"id": limit["id"], "created": limit["created"], "updated": limit["updated"], "tag": tag}
    assert three.get(f"/concurrency_limits/tag/{tag}") == (200, {**shape, "concurrency_limit": 3, "active_slots": []})
    assert client.get(f"/concurrency_limits/tag/{tag}")[0] == 404

    task_run, flow_run, other_task_run = (str(uuid.uuid4()) for _ in range(3))
    assert take_tags(client, [tag], task_run)[0] == 200
    for kind, holder in (("flow_run", flow_run), ("task_run", other_task_run)):
        body = {"names": [f"tag:{tag}"], "slots": 1, "mode": "concurrency", "holder": {"type": kind, "id": holder}}
        assert client.post("/v2/concurrency_limits/increment-with-lease", body)[0] == 200
    read = three.ok("GET", f"/concurrency_limits/tag/{tag}")
    assert (read["id"], read["active_slots"]) == (limit["id"], [task_run, other_task_run])  # not the flow run's

    both = unique()
    v1 = set_tag_limit(client, both, 2)
    other = new_global(client, name=f"tag:{both}", limit=7)
    read = three.ok("GET", f"/concurrency_limits/tag/{both}")
    assert (read["id"], read["tag"], read["concurrency_limit"]) == (other["id"], both, 7)
    assert client.ok("GET", f"/concurrency_limits/tag/{both}") == v1


def test_a_3x_clients_tag_limit_routes_all_find_its_global_limit(any_db):
    """Where GET /concurrency_limits/tag/{tag} finds the global limit `tag:NAME` for a 3.x client, Prefect 3.9's
    other tag limit routes find it too: by id, in the list (before the tag limits, a tag shown once), reset
    (its leases given back; slot_override leases a slot to each task run) and deletion. 2.x clients still reach
    only tag limits."""
    client = any_db
    three = Client(client.api_url, headers=PREFECT3_AGENT)
    tag, plain, other = unique(), unique(), unique()
    limit = new_global(client, name=f"tag:{tag}", limit=3)
    new_global(client, name=other, limit=1)  # not a tag's: not listed as one
    v1 = set_tag_limit(client, plain, 2)
    holder = str(uuid.uuid4())
    body = {"names": [f"tag:{tag}"], "slots": 1, "mode": "concurrency", "holder": {"type": "task_run", "id": holder}}
    assert client.post("/v2/concurrency_limits/increment-with-lease", body)[0] == 200

    shown = three.ok("GET", f"/concurrency_limits/tag/{tag}")
    assert shown["active_slots"] == [holder]
    assert three.ok("GET", f"/concurrency_limits/{limit['id']}") == shown
    assert client.get(f"/concurrency_limits/{limit['id']}")[0] == 404
    listed = [(x["tag"], x["id"]) for x in three.ok("POST", "/concurrency_limits/filter", {"limit": 200})]
    assert (tag, limit["id"]) in listed and (plain, v1["id"]) in listed
    assert other not in [listed_tag for listed_tag, _ in listed]
    assert tag not in [x["tag"] for x in client.ok("POST", "/concurrency_limits/filter", {"limit": 200})]

    assert client.post(f"/concurrency_limits/tag/{tag}/reset", {})[0] == 404  # 2.x: no tag limit
    override = str(uuid.uuid4())
    assert three.post(f"/concurrency_limits/tag/{tag}/reset", {"slot_override": [override]})[0] == 200
    assert three.ok("GET", f"/concurrency_limits/tag/{tag}")["active_slots"] == [override]
    assert client.ok("GET", f"/v2/concurrency_limits/{limit['id']}")["active_slots"] == 1  # the holder's given back
    assert three.post(f"/concurrency_limits/tag/{tag}/reset", {})[0] == 200
    assert three.ok("GET", f"/concurrency_limits/tag/{tag}")["active_slots"] == []
    assert client.ok("GET", f"/v2/concurrency_limits/{limit['id']}")["active_slots"] == 0

    assert client.delete(f"/concurrency_limits/tag/{tag}")[0] == 404
    assert three.delete(f"/concurrency_limits/tag/{tag}")[0] == 204
    assert client.get(f"/v2/concurrency_limits/{limit['id']}")[0] == 404
    assert three.get(f"/concurrency_limits/tag/{tag}")[0] == 404
    assert three.delete(f"/concurrency_limits/{v1['id']}")[0] == 204  # a tag limit, as before


def test_a_3x_client_setting_a_tags_limit_sets_its_global_limit(any_db):
    """Prefect 3.9's POST /concurrency_limits/ sets the global limit `tag:NAME` when there is one (a 200, in a
    tag limit's shape), so the limit a 3.x client sets is the one it then reads; without one, and for 2.x
    clients, it is a tag limit as before."""
    client = any_db
    three = Client(client.api_url, headers=PREFECT3_AGENT)
    tag = unique()
    limit = new_global(client, name=f"tag:{tag}", limit=3)
    status, answer = three.post("/concurrency_limits/", {"tag": tag, "concurrency_limit": 5})
    assert status == 200, answer
    shown = {key: answer[key] for key in ("id", "tag", "concurrency_limit", "active_slots")}
    assert shown == {"id": limit["id"], "tag": tag, "concurrency_limit": 5, "active_slots": []}
    assert three.ok("GET", f"/concurrency_limits/tag/{tag}")["concurrency_limit"] == 5
    assert client.ok("GET", f"/v2/concurrency_limits/{limit['id']}")["limit"] == 5
    assert client.get(f"/concurrency_limits/tag/{tag}")[0] == 404  # no tag limit was made

    status, v1 = client.post("/concurrency_limits/", {"tag": tag, "concurrency_limit": 1})  # 2.x: a tag limit
    assert (status, v1["concurrency_limit"]) == (201, 1)
    assert client.ok("GET", f"/v2/concurrency_limits/{limit['id']}")["limit"] == 5
    plain = unique()
    status, made = three.post("/concurrency_limits/", {"tag": plain, "concurrency_limit": 2})
    assert (status, made["tag"]) == (201, plain)


@pytest.mark.parametrize("global_limit_too", [False, True])
def test_concurrent_v1_increments_never_exceed_a_tag_limit(any_db, global_limit_too):
    """16 task runs ask at once for two tags' slots (one tag's limit a v1 row, the other's a v1 row or a global
    limit): five get both, the others get neither."""
    client = any_db
    first, second = unique(), unique()
    set_tag_limit(client, first, 5)
    if global_limit_too:
        new_global(client, name=f"tag:{second}", limit=5)
    else:
        set_tag_limit(client, second, 5)
    statuses = statuses_at_once(client.api_url, 16, lambda local: take_tags(local, [first, second], str(uuid.uuid4())))
    assert statuses == [200] * 5 + [423] * 11
    assert len(tag_limit(client, first)["active_slots"]) == 5
    if global_limit_too:
        assert global_limit(client, f"tag:{second}")["active_slots"] == 5
    else:
        assert len(tag_limit(client, second)["active_slots"]) == 5


@pytest.mark.parametrize("path", ["increment", "decrement"])
@pytest.mark.parametrize(
    "body, field",
    [
        ({"names": ["a"]}, "task_run_id"),
        ({"task_run_id": str(uuid.uuid4())}, "names"),
        ({"names": "a", "task_run_id": str(uuid.uuid4())}, "names"),
        ({"names": ["a"], "task_run_id": "not-a-uuid"}, "task_run_id"),
        ({"names": [1], "task_run_id": str(uuid.uuid4())}, "names"),
    ],
)
def test_v1_increment_and_decrement_are_validated(client, path, body, field):
    status, answer = client.post(f"/concurrency_limits/{path}", body)
    assert status == 422, answer
    assert any(field in err["loc"] for err in answer["exception_detail"]), answer


# --- v2: the API -------------------------------------------------------------------------------


def test_global_limit_create_and_read_by_id_and_name(client):
    limit = new_global(client, name="deploys", limit=4)
    assert (
        limit["name"],
        limit["limit"],
        limit["active"],
        limit["active_slots"],
        limit["denied_slots"],
        limit["slot_decay_per_second"],
    ) == ("deploys", 4, True, 0, 0, 0)
    assert {"id", "created", "updated", "avg_slot_occupancy_seconds"} <= set(limit)
    assert global_limit(client, limit["id"]) == limit
    assert global_limit(client, "deploys") == limit


def test_global_limit_duplicate_name_is_409(client):
    new_global(client, name="only-one")
    status, body = client.post("/v2/concurrency_limits/", {"name": "only-one", "limit": 9})
    assert status == 409, body
    assert global_limit(client, "only-one")["limit"] == 1


@pytest.mark.parametrize(
    "body",
    [
        {"name": "a/b", "limit": 1},
        {"name": "x", "limit": -1},
        {"limit": 1},
        {"name": "x"},
        {"name": "x", "limit": 1, "slot_decay_per_second": -1},
    ],
)
def test_global_limit_create_is_validated(client, body):
    status, payload = client.post("/v2/concurrency_limits/", body)
    assert status == 422, payload


def test_global_limit_unknown_is_404(client):
    assert client.get("/v2/concurrency_limits/nope")[0] == 404
    assert client.get(f"/v2/concurrency_limits/{uuid.uuid4()}")[0] == 404
    assert client.patch("/v2/concurrency_limits/nope", {"limit": 2})[0] == 404
    assert client.delete("/v2/concurrency_limits/nope")[0] == 404


def test_global_limit_update_by_id_and_by_name(client):
    limit = new_global(client, name="upd", limit=1)
    status, body = client.patch(f"/v2/concurrency_limits/{limit['id']}", {"limit": 5, "slot_decay_per_second": 0.5})
    assert status == 204, body
    after = global_limit(client, "upd")
    assert (after["limit"], after["slot_decay_per_second"], after["active"]) == (5, 0.5, True)
    status, body = client.patch("/v2/concurrency_limits/upd", {"active": False, "name": "renamed"})
    assert status == 204, body
    assert client.get("/v2/concurrency_limits/upd")[0] == 404
    after = global_limit(client, limit["id"])
    assert (after["name"], after["active"], after["limit"]) == ("renamed", False, 5)


def test_global_limit_delete_by_id_and_by_name(client):
    a = new_global(client, name="del-a")
    new_global(client, name="del-b")
    keep = new_global(client, name="keep")
    status, body = client.delete(f"/v2/concurrency_limits/{a['id']}")
    assert status == 204, body
    status, body = client.delete("/v2/concurrency_limits/del-b")
    assert status == 204, body
    assert client.get("/v2/concurrency_limits/del-a")[0] == 404
    assert client.get("/v2/concurrency_limits/del-b")[0] == 404
    assert [x["id"] for x in client.ok("POST", "/v2/concurrency_limits/filter", {})] == [keep["id"]]


def test_global_limit_filter(client):
    for name in ("gamma", "alpha", "beta"):
        new_global(client, name=name)
    listed = client.ok("POST", "/v2/concurrency_limits/filter", {})
    assert sorted(x["name"] for x in listed) == ["alpha", "beta", "gamma"]
    first = client.ok("POST", "/v2/concurrency_limits/filter", {"limit": 2})
    rest = client.ok("POST", "/v2/concurrency_limits/filter", {"limit": 2, "offset": 2})
    assert len(first) == 2 and len(rest) == 1
    assert {x["name"] for x in first + rest} == {"alpha", "beta", "gamma"}


# --- v2: increment and decrement ---------------------------------------------------------------


def test_increment_and_decrement_track_active_slots(client):
    limit = new_global(client, name="workers", limit=3)
    status, body = increment(client, ["workers"], slots=2)
    assert status == 200, body
    assert body == [{"id": limit["id"], "name": "workers", "limit": 3}]
    assert global_limit(client, "workers")["active_slots"] == 2
    listed = client.ok("POST", "/v2/concurrency_limits/filter", {})
    assert listed[0]["active_slots"] == 2

    status, body = increment(client, ["workers"], slots=1, mode="concurrency")
    assert status == 200, body
    assert global_limit(client, "workers")["active_slots"] == 3

    status, body = decrement(client, ["workers"], slots=2, occupancy_seconds=1.5)
    assert status == 200, body
    assert [x["name"] for x in body] == ["workers"]
    assert global_limit(client, "workers")["active_slots"] == 1

    status, body = decrement(client, ["workers"], slots=5)
    assert status == 200, body
    assert global_limit(client, "workers")["active_slots"] == 0  # never below zero


def test_a_full_limit_answers_423_with_retry_after_and_counts_denials(client, server):
    new_global(client, name="full", limit=2)
    assert increment(client, ["full"], slots=2)[0] == 200

    status, headers, body = raw_post(server, "/v2/concurrency_limits/increment", {"names": ["full"], "slots": 1})
    assert status == 423, body
    retry_after = headers.get("Retry-After")
    assert retry_after is not None, dict(headers)
    assert float(retry_after) > 0
    assert global_limit(client, "full")["active_slots"] == 2  # nothing taken
    assert global_limit(client, "full")["denied_slots"] == 1

    status, _, _ = raw_post(server, "/v2/concurrency_limits/increment", {"names": ["full"], "slots": 2})
    assert status == 423
    assert global_limit(client, "full")["denied_slots"] == 3

    # room again after a decrement
    assert decrement(client, ["full"], slots=1)[0] == 200
    assert increment(client, ["full"], slots=1)[0] == 200
    assert global_limit(client, "full")["active_slots"] == 2


def test_asking_for_more_than_the_limit_is_denied(client):
    new_global(client, name="small", limit=2)
    status, body = increment(client, ["small"], slots=3)
    assert status == 423, body
    assert global_limit(client, "small")["active_slots"] == 0


def test_increment_of_several_limits_is_all_or_nothing(client):
    new_global(client, name="roomy", limit=10)
    new_global(client, name="tight", limit=1)
    assert increment(client, ["tight"])[0] == 200
    status, body = increment(client, ["roomy", "tight"], slots=1)
    assert status == 423, body
    assert global_limit(client, "roomy")["active_slots"] == 0
    assert global_limit(client, "tight")["active_slots"] == 1
    assert decrement(client, ["tight"])[0] == 200
    status, body = increment(client, ["roomy", "tight"], slots=1)
    assert status == 200, body
    assert sorted(x["name"] for x in body) == ["roomy", "tight"]
    assert (global_limit(client, "roomy")["active_slots"], global_limit(client, "tight")["active_slots"]) == (1, 1)


def test_inactive_limits_are_not_enforced(client):
    limit = new_global(client, name="off", limit=1)
    client.ok("PATCH", f"/v2/concurrency_limits/{limit['id']}", {"active": False})
    for _ in range(3):
        status, body = increment(client, ["off"], slots=1)
        assert status == 200, body
    assert global_limit(client, "off")["active_slots"] == 0


def test_increment_is_validated(client):
    new_global(client, name="v", limit=1)
    assert client.post("/v2/concurrency_limits/increment", {"names": ["v"], "slots": 0})[0] == 422
    assert client.post("/v2/concurrency_limits/increment", {"names": ["v"]})[0] == 422
    assert client.post("/v2/concurrency_limits/increment", {"slots": 1})[0] == 422
    assert client.post("/v2/concurrency_limits/increment", {"names": ["v"], "slots": 1, "mode": "bogus"})[0] == 422
    assert global_limit(client, "v")["active_slots"] == 0


@pytest.mark.parametrize("path", ["/v2/concurrency_limits/increment", "/v2/concurrency_limits/decrement"])
def test_increment_and_decrement_need_at_least_one_name(client, path):
    """`names` has minItems 1 in the contract (Body_bulk_increment_active_slots / ..._decrement_...)."""
    status, body = client.post(path, {"names": [], "slots": 1})
    assert status == 422, body
    assert any(tuple(e["loc"]) == ("body", "names") for e in body["exception_detail"]), body


def test_rate_limit_needs_slot_decay(client):
    new_global(client, name="no-decay", limit=5)
    status, body = increment(client, ["no-decay"], slots=1, mode="rate_limit")
    assert status == 422, body
    assert global_limit(client, "no-decay")["active_slots"] == 0


def test_slot_decay_gives_rate_limited_slots_back(client):
    new_global(client, name="per-second", limit=2, slot_decay_per_second=20.0)
    status, body = increment(client, ["per-second"], slots=2, mode="rate_limit")
    assert status == 200, body
    assert global_limit(client, "per-second")["active_slots"] == 2

    # without decay the limit would stay full forever; with it, the next burst gets in eventually
    deadline = time.monotonic() + 30
    denied = 0
    while True:
        status, body = increment(client, ["per-second"], slots=2, mode="rate_limit")
        if status == 200:
            break
        assert status == 423, body
        denied += 1
        assert time.monotonic() < deadline, "slots never decayed"
        time.sleep(0.02)  # a poll's interval: the loop counts the refusals, so it is not wait_until
    assert global_limit(client, "per-second")["active_slots"] == 2


def test_slot_decay_also_frees_concurrency_slots_nobody_gave_back(client):
    new_global(client, name="leaky", limit=1, slot_decay_per_second=20.0)
    assert increment(client, ["leaky"], slots=1)[0] == 200
    wait_until(lambda: increment(client, ["leaky"], slots=1)[0] == 200, 30, "the slot to decay", interval=0.02)


def test_concurrent_increments_never_exceed_a_global_limit(any_db):
    client = any_db
    new_global(client, name="race", limit=5)
    statuses = statuses_at_once(client.api_url, 16, lambda local: increment(local, ["race"], slots=1))
    assert statuses == [200] * 5 + [423] * 11
    after = global_limit(client, "race")
    assert after["active_slots"] == 5
    assert after["denied_slots"] >= 1


def test_global_limit_holds_under_churn(any_db):
    """8 workers take and give back one slot 15 times each: never more than `limit` holders at once, and no
    lost update leaves slots behind."""
    client = any_db
    limit, workers, rounds = 3, 8, 15
    new_global(client, name="churn", limit=limit)
    lock = threading.Lock()
    state = {"holding": 0, "max": 0}
    start = threading.Barrier(workers)

    def work(n):
        local = Client(client.api_url)
        start.wait()
        for _ in range(rounds):
            deadline = time.monotonic() + 120
            while True:
                status, body = increment(local, ["churn"], slots=1)
                if status == 200:
                    break
                assert status == 423, body
                assert time.monotonic() < deadline, "never got a slot"
                time.sleep(0.002)  # a retry's back-off, as a client's
            with lock:
                state["holding"] += 1
                state["max"] = max(state["max"], state["holding"])
            with lock:  # counted out before giving the slot back, so the count never exceeds the server's
                state["holding"] -= 1
            status, body = decrement(local, ["churn"], slots=1)
            assert status == 200, body

    run_threads(workers, work)
    assert 1 <= state["max"] <= limit, state
    assert global_limit(client, "churn")["active_slots"] == 0
