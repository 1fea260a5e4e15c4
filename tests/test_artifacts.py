"""Artifacts through the HTTP API of a real server.

The SDK posts {key, type, description, data, flow_run_id, task_run_id} (g_artifacts trace). Artifacts that
share a key form a collection whose latest member is `GET /artifacts/{key}/latest`; `/artifacts/latest/filter`
and `/artifacts/latest/count` see one entry per key. The latest must stay right when the latest artifact is
deleted and when many clients write the same key at once.
"""

import datetime as dt
import threading
import uuid

import pytest

import prefectlite
from helpers import Client, new_flow_run


# --- helpers -----------------------------------------------------------------------------------


def unique_key(prefix="report"):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def new_task_run(client, flow_run_id):
    return client.ok(
        "POST", "/task_runs/", {"flow_run_id": flow_run_id, "task_key": f"t-{uuid.uuid4().hex[:8]}", "dynamic_key": "0"}
    )


def new_artifact(client, **fields):
    status, art = client.post("/artifacts/", fields)
    assert status == 201, (status, art)
    return art


def parse(text):
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def latest(client, key):
    return client.ok("GET", f"/artifacts/{key}/latest")


def ids(items):
    return sorted(item["id"] for item in items)


# --- create and read ---------------------------------------------------------------------------


def test_markdown_artifact_as_the_sdk_creates_it(client):
    run = new_flow_run(client)
    body = {
        "key": "report",
        "type": "markdown",
        "description": None,
        "data": "# Hello\n\n*world*",
        "flow_run_id": run["id"],
        "task_run_id": None,
    }
    art = new_artifact(client, **body)
    for field, value in body.items():
        assert art[field] == value, field
    assert art["metadata_"] is None
    assert {"id", "created", "updated"} <= set(art)
    assert client.ok("GET", f"/artifacts/{art['id']}") == art


@pytest.mark.parametrize(
    "type_, data",
    [
        ("table", '[{"a": 1, "b": 2}, {"a": 3, "b": 4}]'),
        ("table", {"a": [1, 3], "b": [2, 4]}),
        ("markdown", "[Prefect](https://www.prefect.io)"),  # what create_link_artifact sends
        ("link", "https://example.com/dashboard"),
        ("progress", 42.5),
        ("result", {"type": "reference", "storage_key": "/tmp/results/abc", "serializer_type": "pickle"}),
        ("image", "https://example.com/chart.png"),
    ],
)
def test_artifact_types_keep_their_data(client, type_, data):
    run = new_flow_run(client)
    task = new_task_run(client, run["id"])
    art = new_artifact(
        client,
        key=unique_key(type_),
        type=type_,
        description=f"a {type_} artifact",
        data=data,
        flow_run_id=run["id"],
        task_run_id=task["id"],
    )
    read = client.ok("GET", f"/artifacts/{art['id']}")
    assert (read["type"], read["data"], read["description"]) == (type_, data, f"a {type_} artifact")
    assert (read["flow_run_id"], read["task_run_id"]) == (run["id"], task["id"])


def test_artifact_without_key(client):
    art = new_artifact(client, type="result", data={"storage_key": "x"})
    assert art["key"] is None
    assert client.ok("GET", f"/artifacts/{art['id']}")["key"] is None
    # keyless artifacts are not collections
    assert client.ok("POST", "/artifacts/latest/count", {}) == 0


def test_artifact_metadata_maps_names_to_strings_as_in_prefect(client):
    """Prefect's artifact `metadata_` is a dict of str to str: its server answers 422 to another value (its SDK
    reads an artifact holding one as invalid). We stored {"k": null} and {"k": {}} (a 201, a 204 on update)."""
    art = client.ok("POST", "/artifacts/", {"key": "meta", "data": 1, "metadata_": {"k": "v"}})
    for bad in (None, {}, [], 1):
        status, body = client.post("/artifacts/", {"key": "meta", "data": 2, "metadata_": {"k": bad}})
        assert status == 422, (bad, body)
        assert [e["loc"] for e in body["exception_detail"]] == [["body", "metadata_", "k"]]
        status, body = client.patch(f"/artifacts/{art['id']}", {"metadata_": {"k": bad}})
        assert status == 422, (bad, body)
    assert [a["id"] for a in client.ok("POST", "/artifacts/filter", {})] == [art["id"]]
    assert client.ok("GET", f"/artifacts/{art['id']}")["metadata_"] == {"k": "v"}


def test_artifact_metadata_round_trips(client):
    art = new_artifact(client, key=unique_key(), type="markdown", data="x", metadata_={"rows": "10", "source": "s3"})
    assert client.ok("GET", f"/artifacts/{art['id']}")["metadata_"] == {"rows": "10", "source": "s3"}


@pytest.mark.parametrize("key", ["Upper", "under_score", "has space", "x" * 256])
def test_artifact_key_is_validated(client, key):
    status, body = client.post("/artifacts/", {"key": key, "type": "markdown", "data": "x"})
    assert status == 422, body
    assert any(tuple(e["loc"]) == ("body", "key") for e in body["exception_detail"]), body


def test_unknown_artifact_is_404(client):
    assert client.get(f"/artifacts/{uuid.uuid4()}")[0] == 404
    assert client.get("/artifacts/no-such-key/latest")[0] == 404
    assert client.patch(f"/artifacts/{uuid.uuid4()}", {"description": "x"})[0] == 404
    assert client.delete(f"/artifacts/{uuid.uuid4()}")[0] == 404


# --- filter and count --------------------------------------------------------------------------


@pytest.fixture
def artifact_set(client):
    """Two flow runs (one tagged nightly), artifacts of a few keys and types."""
    nightly = new_flow_run(client, tags=["nightly"])
    adhoc = new_flow_run(client)
    task = new_task_run(client, nightly["id"])
    made = {
        "sales-1": new_artifact(
            client, key="sales", type="table", data="[]", flow_run_id=nightly["id"], task_run_id=task["id"]
        ),
        "sales-2": new_artifact(client, key="sales", type="table", data="[1]", flow_run_id=adhoc["id"]),
        "summary": new_artifact(client, key="summary", type="markdown", data="# s", flow_run_id=nightly["id"]),
        "progress": new_artifact(client, key="load-progress", type="progress", data=10.0, flow_run_id=adhoc["id"]),
        "nokey": new_artifact(client, type="result", data={"x": 1}, flow_run_id=nightly["id"]),
    }
    return {"nightly": nightly, "adhoc": adhoc, "task": task, "a": made}


def test_artifact_filter_all_and_count(client, artifact_set):
    a = artifact_set["a"]
    assert ids(client.ok("POST", "/artifacts/filter", {})) == ids(a.values())
    assert client.ok("POST", "/artifacts/count", {}) == 5


def test_artifact_filter_by_key_type_and_flow_run(client, artifact_set):
    a, nightly = artifact_set["a"], artifact_set["nightly"]

    def found(body):
        return ids(client.ok("POST", "/artifacts/filter", body))

    assert found({"artifacts": {"key": {"any_": ["sales"]}}}) == ids([a["sales-1"], a["sales-2"]])
    assert found({"artifacts": {"type": {"any_": ["markdown", "progress"]}}}) == ids([a["summary"], a["progress"]])
    assert found({"artifacts": {"type": {"not_any_": ["table", "result"]}}}) == ids([a["summary"], a["progress"]])
    assert found({"artifacts": {"flow_run_id": {"any_": [nightly["id"]]}}}) == ids(
        [a["sales-1"], a["summary"], a["nokey"]]
    )
    assert found({"artifacts": {"task_run_id": {"any_": [artifact_set["task"]["id"]]}}}) == ids([a["sales-1"]])
    assert found({"artifacts": {"id": {"any_": [a["summary"]["id"]]}}}) == ids([a["summary"]])
    assert found({"artifacts": {"key": {"any_": ["sales"]}, "flow_run_id": {"any_": [nightly["id"]]}}}) == ids(
        [a["sales-1"]]
    )
    assert client.ok("POST", "/artifacts/count", {"artifacts": {"key": {"any_": ["sales"]}}}) == 2
    assert client.ok("POST", "/artifacts/count", {"artifacts": {"type": {"any_": ["result"]}}}) == 1


def test_artifact_filter_across_flow_runs_and_task_runs(client, artifact_set):
    a = artifact_set["a"]
    body = {"flow_runs": {"tags": {"all_": ["nightly"]}}}
    assert ids(client.ok("POST", "/artifacts/filter", body)) == ids([a["sales-1"], a["summary"], a["nokey"]])
    assert client.ok("POST", "/artifacts/count", body) == 3
    body = {"flow_runs": {"id": {"any_": [artifact_set["adhoc"]["id"]]}}, "artifacts": {"type": {"any_": ["table"]}}}
    assert ids(client.ok("POST", "/artifacts/filter", body)) == ids([a["sales-2"]])
    body = {"task_runs": {"id": {"any_": [artifact_set["task"]["id"]]}}}
    assert ids(client.ok("POST", "/artifacts/filter", body)) == ids([a["sales-1"]])


def test_artifact_filter_sort_and_paging(client, artifact_set):
    by_key = client.ok("POST", "/artifacts/filter", {"sort": "KEY_ASC", "artifacts": {"key": {"is_null_": False}}})
    assert [x["key"] for x in by_key] == ["load-progress", "sales", "sales", "summary"]
    by_key = client.ok(
        "POST", "/artifacts/filter", {"sort": "KEY_DESC", "artifacts": {"key": {"is_null_": False}}, "limit": 1}
    )
    assert [x["key"] for x in by_key] == ["summary"]
    newest = client.ok("POST", "/artifacts/filter", {"sort": "CREATED_DESC", "limit": 1})
    assert newest[0]["id"] == artifact_set["a"]["nokey"]["id"]
    first, second = (client.ok("POST", "/artifacts/filter", {"limit": 3, "offset": off}) for off in (0, 3))
    assert len(first) == 3 and len(second) == 2
    assert set(ids(first)) | set(ids(second)) == set(ids(artifact_set["a"].values()))


# --- update and delete -------------------------------------------------------------------------


def test_artifact_update(client):
    art = new_artifact(client, key=unique_key(), type="progress", data=10.0, description="loading")
    status, body = client.patch(f"/artifacts/{art['id']}", {"data": 75.0})
    assert status == 204, body
    after = client.ok("GET", f"/artifacts/{art['id']}")
    assert after["data"] == 75.0
    assert after["description"] == "loading" and after["type"] == "progress" and after["key"] == art["key"]
    status, body = client.patch(f"/artifacts/{art['id']}", {"description": "done", "metadata_": {"k": "v"}})
    assert status == 204, body
    after = client.ok("GET", f"/artifacts/{art['id']}")
    assert (after["data"], after["description"], after["metadata_"]) == (75.0, "done", {"k": "v"})
    # the collection shows the update of its latest artifact
    assert latest(client, art["key"])["data"] == 75.0
    collection = client.ok("POST", "/artifacts/latest/filter", {"artifacts": {"key": {"any_": [art["key"]]}}})
    assert collection[0]["data"] == 75.0 and collection[0]["description"] == "done"


def test_artifact_delete(client):
    keep = new_artifact(client, key=unique_key(), type="markdown", data="keep")
    art = new_artifact(client, type="markdown", data="gone")
    status, body = client.delete(f"/artifacts/{art['id']}")
    assert status == 204, body
    assert client.get(f"/artifacts/{art['id']}")[0] == 404
    assert ids(client.ok("POST", "/artifacts/filter", {})) == [keep["id"]]


# --- latest per key ----------------------------------------------------------------------------


def test_latest_artifact_follows_the_newest_of_a_key(client):
    key = unique_key()
    first = new_artifact(client, key=key, type="markdown", data="v1")
    assert latest(client, key)["id"] == first["id"]
    second = new_artifact(client, key=key, type="markdown", data="v2", description="second")
    got = latest(client, key)
    assert got["id"] == second["id"]
    assert (got["data"], got["description"], got["key"]) == ("v2", "second", key)
    # another key does not disturb it
    new_artifact(client, key=unique_key(), type="markdown", data="other")
    assert latest(client, key)["id"] == second["id"]


def test_latest_filter_and_count_see_one_entry_per_key(client):
    run = new_flow_run(client)
    k1, k2 = unique_key("one"), unique_key("two")
    new_artifact(client, key=k1, type="table", data="[1]")
    a1 = new_artifact(client, key=k1, type="table", data="[2]", flow_run_id=run["id"])
    b1 = new_artifact(client, key=k2, type="markdown", data="b1")
    new_artifact(client, type="result", data={"x": 1})  # no key: no collection

    everything = client.ok("POST", "/artifacts/latest/filter", {})
    assert sorted(c["key"] for c in everything) == sorted([k1, k2])
    by_key = {c["key"]: c for c in everything}
    assert by_key[k1]["latest_id"] == a1["id"]
    assert by_key[k1]["data"] == "[2]" and by_key[k1]["type"] == "table"
    assert by_key[k1]["flow_run_id"] == run["id"]
    assert by_key[k2]["latest_id"] == b1["id"]
    assert client.ok("POST", "/artifacts/latest/count", {}) == 2

    only = client.ok("POST", "/artifacts/latest/filter", {"artifacts": {"key": {"any_": [k1]}}})
    assert [c["latest_id"] for c in only] == [a1["id"]]
    assert client.ok("POST", "/artifacts/latest/count", {"artifacts": {"key": {"any_": [k1]}}}) == 1
    assert client.ok("POST", "/artifacts/latest/count", {"artifacts": {"type": {"any_": ["markdown"]}}}) == 1
    # the older artifact of k1 is not a "latest"
    assert (
        client.ok(
            "POST", "/artifacts/latest/count", {"artifacts": {"type": {"any_": ["table"]}, "key": {"any_": [k1]}}}
        )
        == 1
    )
    by_run = client.ok("POST", "/artifacts/latest/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    assert [c["key"] for c in by_run] == [k1]


def test_latest_filter_by_latest_id(client):
    """ArtifactCollectionFilter (the body of /artifacts/latest/filter) has a latest_id field."""
    key = unique_key()
    new_artifact(client, key=key, type="markdown", data="old")
    newest = new_artifact(client, key=key, type="markdown", data="new")
    new_artifact(client, key=unique_key(), type="markdown", data="other")
    found = client.ok("POST", "/artifacts/latest/filter", {"artifacts": {"latest_id": {"any_": [newest["id"]]}}})
    assert [c["key"] for c in found] == [key]


def test_deleting_the_latest_moves_latest_back(client):
    key = unique_key()
    first = new_artifact(client, key=key, type="markdown", data="v1")
    second = new_artifact(client, key=key, type="markdown", data="v2")
    third = new_artifact(client, key=key, type="markdown", data="v3")
    assert latest(client, key)["id"] == third["id"]

    client.ok("DELETE", f"/artifacts/{third['id']}")
    assert latest(client, key)["id"] == second["id"]
    collection = client.ok("POST", "/artifacts/latest/filter", {"artifacts": {"key": {"any_": [key]}}})
    assert [(c["latest_id"], c["data"]) for c in collection] == [(second["id"], "v2")]
    assert client.ok("POST", "/artifacts/latest/count", {"artifacts": {"key": {"any_": [key]}}}) == 1

    # deleting an older one leaves latest alone
    client.ok("DELETE", f"/artifacts/{first['id']}")
    assert latest(client, key)["id"] == second["id"]

    # deleting the last one removes the key
    client.ok("DELETE", f"/artifacts/{second['id']}")
    status, body = client.get(f"/artifacts/{key}/latest")
    assert status == 404, body
    assert client.ok("POST", "/artifacts/latest/count", {"artifacts": {"key": {"any_": [key]}}}) == 0
    assert client.ok("POST", "/artifacts/latest/filter", {"artifacts": {"key": {"any_": [key]}}}) == []

    # and the key starts over
    again = new_artifact(client, key=key, type="markdown", data="v4")
    assert latest(client, key)["id"] == again["id"]


# --- concurrent writers ------------------------------------------------------------------------

THREADS, PER_THREAD = 8, 25


def _write_concurrently(api_url, key):
    """8 threads x 25 artifacts of one key. After each write has been answered (so is committed), the key's
    latest must be at least as new as the artifact just written: anything older means a newer artifact
    was overtaken. Returns (created, errors, overtaken)."""
    created, errors, overtaken = [], [], []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def writer(n):
        client = Client(api_url)
        start.wait()
        for i in range(PER_THREAD):
            status, body = client.post("/artifacts/", {"key": key, "type": "markdown", "data": f"{n}-{i}"})
            with lock:
                (created if status == 201 else errors).append(body if status == 201 else (status, body))
            if status != 201:
                continue
            status, now_latest = client.get(f"/artifacts/{key}/latest")
            if status != 200 or parse(now_latest["created"]) < parse(body["created"]):
                with lock:
                    overtaken.append((body["id"], body["created"], status, now_latest))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "writers did not finish"
    return created, errors, overtaken


def _assert_latest_is_newest(client, key, created):
    assert len(created) == THREADS * PER_THREAD
    stored = client.ok("POST", "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}, "limit": 200})
    assert ids(stored) == ids(created)
    assert client.ok("POST", "/artifacts/count", {"artifacts": {"key": {"any_": [key]}}}) == THREADS * PER_THREAD

    newest_time = max(parse(a["created"]) for a in stored)
    newest_ids = {a["id"] for a in stored if parse(a["created"]) == newest_time}
    got = latest(client, key)
    assert got["id"] in newest_ids, (got["created"], newest_time)

    collections = client.ok("POST", "/artifacts/latest/filter", {"artifacts": {"key": {"any_": [key]}}})
    assert len(collections) == 1
    assert collections[0]["latest_id"] == got["id"]
    assert client.ok("POST", "/artifacts/latest/count", {"artifacts": {"key": {"any_": [key]}}}) == 1

    # deleting the latest moves it to the newest left
    client.ok("DELETE", f"/artifacts/{got['id']}")
    left = [a for a in stored if a["id"] != got["id"]]
    newest_time = max(parse(a["created"]) for a in left)
    newest_ids = {a["id"] for a in left if parse(a["created"]) == newest_time}
    assert latest(client, key)["id"] in newest_ids


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(request, tmp_path):
    """A real server on SQLite, then on PostgreSQL; yields its API URL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/any.db"
    else:
        url = request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url, port=0) as api_url:
        yield api_url


def test_concurrent_writers_of_one_key_leave_latest_right(any_db):
    client = Client(any_db)
    key = unique_key("busy")
    created, errors, overtaken = _write_concurrently(any_db, key)
    assert errors == []
    assert overtaken == [], f"{len(overtaken)} writes were followed by an older latest, e.g. {overtaken[:2]}"
    _assert_latest_is_newest(client, key, created)
