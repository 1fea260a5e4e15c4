"""Saved searches through the HTTP API of a real server: PUT /saved_searches/ creates or, for a name that
exists, updates; read, filter, delete."""

import threading
import uuid

import pytest

import prefectlite
from helpers import Client

FILTER_A = {"object": "flow_run", "property": "state", "type": "state", "operation": "or", "value": ["FAILED"]}
FILTER_B = {"object": "flow", "property": "name", "type": "string", "operation": "contains", "value": "etl"}


def put_search(client, name, filters, expect=(200, 201)):
    status, body = client.request("PUT", "/saved_searches/", {"name": name, "filters": filters})
    assert status in expect, (status, body)
    return body


def test_saved_search_create_and_read(client):
    search = put_search(client, "failed runs", [FILTER_A])
    assert search["name"] == "failed runs"
    assert search["filters"] == [FILTER_A]
    assert {"id", "created", "updated"} <= set(search)
    assert client.ok("GET", f"/saved_searches/{search['id']}") == search


def test_saved_search_filters_default_to_empty(client):
    status, body = client.request("PUT", "/saved_searches/", {"name": "everything"})
    assert status in (200, 201), body
    assert body["filters"] == []


def test_each_saved_search_filter_has_all_its_parts_as_in_prefect(client):
    """Prefect's SavedSearchFilter requires object, property, type, operation and value: its server answers 422
    to a filter lacking one, and its SDK reads a saved search holding one as invalid. We stored [{}] (a 201)."""
    status, body = client.request("PUT", "/saved_searches/", {"name": "broken", "filters": [{"object": "flow"}]})
    assert status == 422, body
    assert [e["loc"] for e in body["exception_detail"]] == [
        ["body", "filters", 0, part] for part in ("property", "type", "operation", "value")
    ]
    assert client.ok("POST", "/saved_searches/filter", {}) == []
    whole = {"object": "flow", "property": "name", "type": "string", "operation": "equals", "value": None}
    saved = client.ok("PUT", "/saved_searches/", {"name": "whole", "filters": [whole]})
    assert saved["filters"] == [whole]


def test_saved_search_put_with_an_existing_name_updates_it(client):
    first = put_search(client, "my view", [FILTER_A])
    second = put_search(client, "my view", [FILTER_B, FILTER_A])
    assert second["id"] == first["id"]
    assert second["filters"] == [FILTER_B, FILTER_A]
    assert client.ok("GET", f"/saved_searches/{first['id']}")["filters"] == [FILTER_B, FILTER_A]
    listed = client.ok("POST", "/saved_searches/filter", {})
    assert [s["name"] for s in listed] == ["my view"]


def test_saved_search_name_is_required(client):
    status, body = client.request("PUT", "/saved_searches/", {"filters": []})
    assert status == 422, body
    assert any(tuple(e["loc"]) == ("body", "name") for e in body["exception_detail"]), body


def test_saved_search_filter(client):
    a = put_search(client, "alpha", [FILTER_A])
    b = put_search(client, "beta", [])
    c = put_search(client, "gamma", [FILTER_B])
    listed = client.ok("POST", "/saved_searches/filter", {})
    assert sorted(s["id"] for s in listed) == sorted([a["id"], b["id"], c["id"]])
    by_name = client.ok("POST", "/saved_searches/filter", {"saved_searches": {"name": {"any_": ["beta", "gamma"]}}})
    assert sorted(s["name"] for s in by_name) == ["beta", "gamma"]
    by_id = client.ok("POST", "/saved_searches/filter", {"saved_searches": {"id": {"any_": [a["id"]]}}})
    assert [s["name"] for s in by_id] == ["alpha"]
    page = client.ok("POST", "/saved_searches/filter", {"limit": 2})
    assert len(page) == 2
    rest = client.ok("POST", "/saved_searches/filter", {"limit": 2, "offset": 2})
    assert len(rest) == 1
    assert {s["id"] for s in page} | {s["id"] for s in rest} == {a["id"], b["id"], c["id"]}


def test_saved_search_delete(client):
    search = put_search(client, "temporary", [FILTER_A])
    keep = put_search(client, "keeper", [])
    status, body = client.delete(f"/saved_searches/{search['id']}")
    assert status == 204, body
    assert client.get(f"/saved_searches/{search['id']}")[0] == 404
    assert client.delete(f"/saved_searches/{search['id']}")[0] == 404
    assert [s["id"] for s in client.ok("POST", "/saved_searches/filter", {})] == [keep["id"]]
    # the name is free again, with a new id
    again = put_search(client, "temporary", [])
    assert again["id"] != search["id"]


def test_unknown_saved_search_is_404(client):
    status, body = client.get(f"/saved_searches/{uuid.uuid4()}")
    assert status == 404, body


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(request, tmp_path):
    """A real server on SQLite, then on PostgreSQL; yields a Client."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/any.db"
    else:
        url = request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url, port=0) as api_url:
        yield Client(api_url)


def test_concurrent_puts_of_one_name_all_succeed_with_one_search(any_db):
    """PUT is create-or-update: racing PUTs of one name all succeed and leave one saved search (5 races)."""
    client = any_db
    for race in range(5):
        name = f"shared view {race}"
        results, start = [], threading.Barrier(8)

        def go(n):
            local = Client(client.api_url)
            start.wait()
            results.append(
                local.request("PUT", "/saved_searches/", {"name": name, "filters": [{**FILTER_B, "value": f"etl-{n}"}]})
            )

        threads = [threading.Thread(target=go, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(status in (200, 201) for status, _ in results), (race, [(s, b) for s, b in results if s >= 300])
        assert len({body["id"] for _, body in results}) == 1
        listed = client.ok("POST", "/saved_searches/filter", {"saved_searches": {"name": {"any_": [name]}}})
        assert len(listed) == 1
        assert listed[0]["filters"][0]["value"] in {f"etl-{n}" for n in range(8)}
