"""Variables through the HTTP API of a real server.

`variables.get(name)` in the SDK is `GET /variables/name/{name}`, 404 {"detail": "Variable not found."}
when absent (h_blocks_vars trace). Names are lower case letters, digits, underscores and dashes (at most
255); a value is at most 5000 bytes once encoded as JSON.
"""

import threading
import uuid

import pytest

import prefectlite
from helpers import Client


def unique(prefix="var"):
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def new_variable(client, name=None, value="v", tags=None):
    body = {"name": name or unique(), "value": value}
    if tags is not None:
        body["tags"] = tags
    status, var = client.post("/variables/", body)
    assert status == 201, (status, var)
    return var


def error_locs(body):
    return [tuple(err["loc"]) for err in body["exception_detail"]]


# --- create and read ---------------------------------------------------------------------------


def test_variable_create_and_read_by_id_and_name(client):
    var = new_variable(client, name="region", value="eu-west-1", tags=["infra", "aws"])
    assert var["name"] == "region" and var["value"] == "eu-west-1"
    assert var["tags"] == ["infra", "aws"]
    assert {"id", "created", "updated"} <= set(var)
    assert client.ok("GET", f"/variables/{var['id']}") == var
    assert client.ok("GET", "/variables/name/region") == var


def test_variable_tags_default_to_empty(client):
    var = new_variable(client)
    assert var["tags"] == []


def test_missing_variable_is_404_with_prefects_message(client):
    status, body = client.get("/variables/name/missing")
    assert (status, body) == (404, {"detail": "Variable not found."})
    status, body = client.get(f"/variables/{uuid.uuid4()}")
    assert status == 404, body


@pytest.mark.parametrize("value", ["plain text", "", 42, 3.5, True, None, ["a", 1], {"nested": {"x": [1, 2]}}])
def test_variable_value_round_trips(client, value):
    var = new_variable(client, value=value)
    assert var["value"] == value
    assert client.ok("GET", f"/variables/name/{var['name']}")["value"] == value


def test_variable_value_is_required(client):
    status, body = client.post("/variables/", {"name": unique()})
    assert status == 422, body
    assert ("body", "value") in error_locs(body)


def test_duplicate_variable_name_is_409(client):
    var = new_variable(client, value="first")
    status, body = client.post("/variables/", {"name": var["name"], "value": "second"})
    assert status == 409, body
    assert client.ok("GET", f"/variables/name/{var['name']}")["value"] == "first"


@pytest.mark.parametrize("name", ["Upper", "has space", "dots.not.allowed", "slash/no", "", "ümlaut", "x" * 256])
def test_invalid_variable_names_are_422_naming_the_field(client, name):
    status, body = client.post("/variables/", {"name": name, "value": "v"})
    assert status == 422, body
    assert ("body", "name") in error_locs(body)
    count = client.ok("POST", "/variables/count", {})
    assert count == 0


@pytest.mark.parametrize("name", ["lower", "with_underscore", "with-dash", "digits123", "0", "x" * 255])
def test_valid_variable_names(client, name):
    var = new_variable(client, name=name)
    assert client.ok("GET", f"/variables/name/{name}")["id"] == var["id"]


def test_variable_value_size_limit(client):
    # 5000 bytes of JSON: a string of 4998 ASCII characters is exactly 5000 bytes with its quotes
    new_variable(client, name="just_fits", value="a" * 4998)
    status, body = client.post("/variables/", {"name": "too_big", "value": "a" * 4999})
    assert status == 422, body
    assert ("body", "value") in error_locs(body)
    status, body = client.post("/variables/", {"name": "too_big", "value": {"k": "b" * 6000}})
    assert status == 422, body
    assert client.get("/variables/name/too_big")[0] == 404


def test_variable_value_size_counts_bytes_not_characters(client):
    # 2600 two-byte characters: 2602 characters of JSON but 5202 bytes
    status, body = client.post("/variables/", {"name": "wide", "value": "é" * 2600})
    assert status == 422, body
    new_variable(client, name="wide_ok", value="é" * 2000)


# --- filter and count --------------------------------------------------------------------------


@pytest.fixture
def some_variables(client):
    return {
        "db_host": new_variable(client, name="db_host", value="db.internal", tags=["db", "prod"]),
        "db_port": new_variable(client, name="db_port", value=5432, tags=["db"]),
        "api_url": new_variable(client, name="api_url", value="https://api", tags=["prod"]),
        "feature_x": new_variable(client, name="feature_x", value=True),
    }


def _names(client, body):
    return [v["name"] for v in client.ok("POST", "/variables/filter", body)]


def test_variable_filter_default_lists_all_sorted_by_name(client, some_variables):
    assert _names(client, {}) == ["api_url", "db_host", "db_port", "feature_x"]
    assert client.ok("POST", "/variables/count", {}) == 4


def test_variable_filter_by_name(client, some_variables):
    assert sorted(_names(client, {"variables": {"name": {"like_": "db_"}}})) == ["db_host", "db_port"]
    assert sorted(_names(client, {"variables": {"name": {"any_": ["api_url", "feature_x", "nope"]}}})) == [
        "api_url",
        "feature_x",
    ]
    assert client.ok("POST", "/variables/count", {"variables": {"name": {"like_": "db_"}}}) == 2


def test_variable_filter_by_tags(client, some_variables):
    assert sorted(_names(client, {"variables": {"tags": {"all_": ["db"]}}})) == ["db_host", "db_port"]
    assert _names(client, {"variables": {"tags": {"all_": ["db", "prod"]}}}) == ["db_host"]
    assert _names(client, {"variables": {"tags": {"is_null_": True}}}) == ["feature_x"]
    assert client.ok("POST", "/variables/count", {"variables": {"tags": {"all_": ["prod"]}}}) == 2


def test_variable_filter_by_id_sort_and_paging(client, some_variables):
    wanted = some_variables["db_port"]["id"]
    assert _names(client, {"variables": {"id": {"any_": [wanted]}}}) == ["db_port"]
    assert _names(client, {"sort": "NAME_DESC"}) == ["feature_x", "db_port", "db_host", "api_url"]
    assert _names(client, {"sort": "NAME_ASC", "limit": 2, "offset": 1}) == ["db_host", "db_port"]


def test_variable_filter_with_or_operator(client, some_variables):
    body = {"variables": {"operator": "or_", "name": {"any_": ["feature_x"]}, "tags": {"all_": ["db"]}}}
    assert sorted(_names(client, body)) == ["db_host", "db_port", "feature_x"]


# --- update ------------------------------------------------------------------------------------


def test_variable_update_by_id(client):
    var = new_variable(client, name="retries", value=3, tags=["a"])
    status, body = client.patch(f"/variables/{var['id']}", {"value": 5})
    assert status == 204, body
    after = client.ok("GET", f"/variables/{var['id']}")
    assert after["value"] == 5
    assert after["tags"] == ["a"] and after["name"] == "retries"


def test_variable_update_by_name(client):
    var = new_variable(client, name="mode", value="slow")
    status, body = client.patch("/variables/name/mode", {"value": "fast", "tags": ["tuned"]})
    assert status == 204, body
    after = client.ok("GET", "/variables/name/mode")
    assert (after["value"], after["tags"], after["id"]) == ("fast", ["tuned"], var["id"])


def test_variable_rename(client):
    var = new_variable(client, name="old_name")
    status, body = client.patch(f"/variables/{var['id']}", {"name": "new_name"})
    assert status == 204, body
    assert client.get("/variables/name/old_name")[0] == 404
    assert client.ok("GET", "/variables/name/new_name")["id"] == var["id"]


def test_variable_rename_onto_an_existing_name_is_409(client):
    new_variable(client, name="taken", value="keep")
    var = new_variable(client, name="mine")
    status, body = client.patch(f"/variables/{var['id']}", {"name": "taken"})
    assert status == 409, body
    assert client.ok("GET", "/variables/name/taken")["value"] == "keep"
    assert client.ok("GET", "/variables/name/mine")["id"] == var["id"]


def test_variable_update_is_validated(client):
    var = new_variable(client, name="checked", value="v")
    status, body = client.patch(f"/variables/{var['id']}", {"name": "Bad Name"})
    assert status == 422, body
    assert ("body", "name") in error_locs(body)
    status, body = client.patch("/variables/name/checked", {"value": "x" * 6000})
    assert status == 422, body
    assert ("body", "value") in error_locs(body)
    assert client.ok("GET", "/variables/name/checked")["value"] == "v"


def test_variable_update_of_missing_variable_is_404(client):
    status, body = client.patch("/variables/name/missing", {"value": 1})
    assert (status, body) == (404, {"detail": "Variable not found."})
    status, body = client.patch(f"/variables/{uuid.uuid4()}", {"value": 1})
    assert status == 404, body


# --- delete ------------------------------------------------------------------------------------


def test_variable_delete_by_id(client):
    var = new_variable(client)
    status, body = client.delete(f"/variables/{var['id']}")
    assert status == 204, body
    assert client.get(f"/variables/{var['id']}")[0] == 404
    assert client.delete(f"/variables/{var['id']}")[0] == 404


def test_variable_delete_by_name(client):
    var = new_variable(client, name="temp")
    other = new_variable(client, name="stays")
    status, body = client.delete("/variables/name/temp")
    assert status == 204, body
    assert client.get(f"/variables/{var['id']}")[0] == 404
    assert client.get("/variables/name/temp")[0] == 404
    assert client.ok("GET", f"/variables/{other['id']}")["name"] == "stays"
    assert client.delete("/variables/name/temp")[0] == 404
    # the name can be used again
    new_variable(client, name="temp")


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(request, tmp_path):
    """A real server on SQLite, then on PostgreSQL; yields a Client."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/any.db"
    else:
        url = request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url, port=0) as api_url:
        yield Client(api_url)


def test_concurrent_creates_of_one_name_make_one_variable(any_db):
    client = any_db
    results, start = [], threading.Barrier(8)

    def go(n):
        local = Client(client.api_url)
        start.wait()
        results.append(local.post("/variables/", {"name": "contended", "value": n}))

    threads = [threading.Thread(target=go, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(status for status, _ in results) == [201] + [409] * 7, results
    winner = next(body for status, body in results if status == 201)
    assert client.ok("GET", "/variables/name/contended") == winner
    assert client.ok("POST", "/variables/count", {}) == 1
