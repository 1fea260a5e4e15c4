"""Blocks through the HTTP API of a real server: block types, block schemas, block documents.

What the Prefect 2.20 SDK relies on (see the h_blocks_vars and c_cache traces): it looks a type up by
slug and a schema by checksum (+ version), registers either itself when unknown (the server keeps the
checksum it is given), saves documents (409 {"detail": "Block already exists"} on a duplicate name,
after which it PATCHes the existing document) and loads them by type slug and name with
include_secrets=true. Secret fields are masked unless include_secrets=true is asked for.
"""

import threading
import uuid

import pytest

import prefectlite
from helpers import Client, unique

MASK = prefectlite.SECRET_MASK  # Prefect 2.20's "********"


# --- helpers -----------------------------------------------------------------------------------


def new_block_type(client, slug=None, **fields):
    slug = slug or unique("type")
    body = {"name": fields.pop("name", slug.replace("-", " ").title()), "slug": slug, **fields}
    status, bt = client.post("/block_types/", body)
    assert status == 201, (status, bt)
    return bt


def credentials_fields(slug, secret_fields=("password",), extra_properties=None):
    return {
        "title": "Credentials",
        "type": "object",
        "block_type_slug": slug,
        "properties": {
            "username": {"title": "Username", "type": "string"},
            "password": {"title": "Password", "type": "string", "writeOnly": True, "format": "password"},
            "port": {"title": "Port", "type": "integer"},
            **(extra_properties or {}),
        },
        "required": ["username"],
        "secret_fields": list(secret_fields),
        "block_schema_references": {},
    }


def new_block_schema(client, block_type, fields=None, capabilities=(), version=None, checksum=None, expect=201):
    body = {
        "block_type_id": block_type["id"],
        "fields": fields if fields is not None else credentials_fields(block_type["slug"]),
        "capabilities": list(capabilities),
    }
    if version is not None:
        body["version"] = version
    if checksum is not None:
        body["checksum"] = checksum
    status, schema = client.post("/block_schemas/", body)
    assert status == expect, (status, schema)
    return schema


def new_block_kind(client, fields=None, capabilities=(), slug=None):
    """A fresh block type and one schema for it."""
    bt = new_block_type(client, slug=slug)
    schema = new_block_schema(
        client, bt, fields=fields if fields is not None else credentials_fields(bt["slug"]), capabilities=capabilities
    )
    return bt, schema


def new_document(client, bt, schema, name=None, data=None, is_anonymous=False, expect=201):
    body = {
        "name": name,
        "data": data if data is not None else {},
        "block_schema_id": schema["id"],
        "block_type_id": bt["id"],
        "is_anonymous": is_anonymous,
    }
    status, doc = client.post("/block_documents/", body)
    assert status == expect, (status, doc)
    return doc


def read_document(client, doc_id, include_secrets=None):
    query = "" if include_secrets is None else f"?include_secrets={'true' if include_secrets else 'false'}"
    return client.ok("GET", f"/block_documents/{doc_id}{query}")


def names(items):
    return [item["name"] for item in items]


# --- block types -------------------------------------------------------------------------------


def test_block_type_create_read_by_id_and_slug(client):
    bt = new_block_type(
        client,
        slug=unique("warehouse"),
        name="Warehouse",
        description="Where data lives",
        logo_url="https://example.com/logo.png",
        documentation_url="https://example.com/docs",
        code_example="Warehouse.load('x')",
    )
    assert bt["is_protected"] is False
    assert bt["description"] == "Where data lives" and bt["code_example"] == "Warehouse.load('x')"
    assert {"id", "created", "updated", "name", "slug", "logo_url", "documentation_url"} <= set(bt)

    by_id = client.ok("GET", f"/block_types/{bt['id']}")
    by_slug = client.ok("GET", f"/block_types/slug/{bt['slug']}")
    assert by_id == bt
    assert by_slug == bt


def test_block_type_unknown_is_404(client):
    status, body = client.get("/block_types/slug/no-such-type")
    assert status == 404, body
    status, body = client.get(f"/block_types/{uuid.uuid4()}")
    assert status == 404, body


def test_block_type_duplicate_slug_is_409(client):
    bt = new_block_type(client)
    status, body = client.post("/block_types/", {"name": "Other", "slug": bt["slug"]})
    assert status == 409, body


def test_block_type_slug_is_validated(client):
    status, body = client.post("/block_types/", {"name": "Bad", "slug": "Not A Slug"})
    assert status == 422, body
    assert any(err["loc"][-1] == "slug" for err in body["exception_detail"]), body


def test_block_type_urls_are_http_urls(client):
    """A block type's logo_url and documentation_url are URLs (HttpUrl in both SDKs, which read a block type
    holding another as invalid, and send only their blocks' URLs): Prefect 2.20's server answers 422 to "x";
    we stored it (a 201, a 204 on update), and the SDK then could not read the block type."""
    bt = new_block_type(client, logo_url="https://example.com/logo.png")
    for field in ("logo_url", "documentation_url"):
        for bad in ("x", "example.com/logo.png", "ftp://example.com/x"):
            status, body = client.post("/block_types/", {"name": unique("Bad"), "slug": unique("bad"), field: bad})
            assert status == 422, (field, bad, body)
            assert [e["loc"] for e in body["exception_detail"]] == [["body", field]]
            status, body = client.patch(f"/block_types/{bt['id']}", {field: bad})
            assert status == 422, (field, bad, body)
    assert client.ok("GET", f"/block_types/{bt['id']}")["logo_url"] == "https://example.com/logo.png"
    status, body = client.patch(f"/block_types/{bt['id']}", {"documentation_url": "http://docs.example.com/b?x=1"})
    assert status == 204, body


def test_block_type_filter_by_name_and_slug(client):
    a = new_block_type(client, slug=unique("alpha"), name="Zeta Alpha Store")
    b = new_block_type(client, slug=unique("beta"), name="Zeta Beta Store")
    new_block_type(client, slug=unique("gamma"), name="Gamma Store")

    found = client.ok("POST", "/block_types/filter", {"block_types": {"name": {"like_": "zeta"}}})
    assert sorted(names(found)) == ["Zeta Alpha Store", "Zeta Beta Store"]

    found = client.ok("POST", "/block_types/filter", {"block_types": {"slug": {"any_": [b["slug"]]}}})
    assert [t["id"] for t in found] == [b["id"]]

    everything = client.ok("POST", "/block_types/filter", {})
    assert {a["slug"], b["slug"], "slack-webhook"} <= {t["slug"] for t in everything}
    paged = client.ok("POST", "/block_types/filter", {"limit": 2})
    assert len(paged) == 2


def test_block_type_filter_by_schema_capabilities(client):
    store, _ = new_block_kind(client, capabilities=["read-path", "write-path"])
    reader, _ = new_block_kind(client, capabilities=["read-path"])
    found = client.ok(
        "POST", "/block_types/filter", {"block_schemas": {"block_capabilities": {"all_": ["read-path", "write-path"]}}}
    )
    # the core file system types (registered at start) can read and write paths too
    file_systems = ["local-file-system", "remote-file-system", "smb"]
    assert sorted(t["slug"] for t in found) == sorted([store["slug"], *file_systems])
    found = client.ok("POST", "/block_types/filter", {"block_schemas": {"block_capabilities": {"all_": ["read-path"]}}})
    assert sorted(t["slug"] for t in found) == sorted([store["slug"], reader["slug"], *file_systems])


def test_block_type_update_changes_only_the_fields_sent(client):
    bt = new_block_type(client, description="before", code_example="old example")
    status, body = client.patch(
        f"/block_types/{bt['id']}", {"description": "after", "logo_url": "https://example.com/new.png"}
    )
    assert status == 204, body
    after = client.ok("GET", f"/block_types/{bt['id']}")
    assert after["description"] == "after"
    assert after["logo_url"] == "https://example.com/new.png"
    assert after["code_example"] == "old example"
    assert after["name"] == bt["name"] and after["slug"] == bt["slug"]


def test_block_type_update_of_unknown_type_is_404(client):
    status, body = client.patch(f"/block_types/{uuid.uuid4()}", {"description": "x"})
    assert status == 404, body


def test_block_type_delete(client):
    bt, schema = new_block_kind(client)
    doc = new_document(client, bt, schema, name="doomed", data={"username": "u"})
    status, body = client.delete(f"/block_types/{bt['id']}")
    assert status == 204, body
    assert client.get(f"/block_types/{bt['id']}")[0] == 404
    assert client.get(f"/block_types/slug/{bt['slug']}")[0] == 404
    # what belonged to the type goes with it
    assert client.get(f"/block_schemas/{schema['id']}")[0] == 404
    assert client.get(f"/block_documents/{doc['id']}")[0] == 404
    status, body = client.delete(f"/block_types/{bt['id']}")
    assert status == 404, body


def test_builtin_notification_types_are_protected(client):
    slack = client.ok("GET", "/block_types/slug/slack-webhook")
    assert slack["is_protected"] is True
    for slug in ("ms-teams-webhook", "opsgenie-webhook", "custom-webhook", "email-smtp"):
        assert client.ok("GET", f"/block_types/slug/{slug}")["is_protected"] is True


def test_protected_block_type_cannot_be_deleted(client):
    slack = client.ok("GET", "/block_types/slug/slack-webhook")
    status, body = client.delete(f"/block_types/{slack['id']}")
    assert status == 403, body
    assert client.ok("GET", f"/block_types/{slack['id']}") == slack
    # its schema stays too
    schemas = client.ok("POST", "/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [slack["id"]]}}})
    assert schemas
    status, body = client.delete(f"/block_schemas/{schemas[0]['id']}")
    assert status == 403, body
    assert client.get(f"/block_schemas/{schemas[0]['id']}")[0] == 200


def test_protected_block_type_patch_is_acknowledged_but_changes_nothing(client):
    slack = client.ok("GET", "/block_types/slug/slack-webhook")
    status, body = client.patch(
        f"/block_types/{slack['id']}",
        {
            "description": "The SDK's own description",
            "logo_url": "https://example.com/other.png",
            "documentation_url": "https://example.com/other",
            "code_example": "SlackWebhook.load('x')",
        },
    )
    assert status == 204, body
    assert client.ok("GET", f"/block_types/{slack['id']}") == slack


def test_core_block_types_are_registered_at_start_protected_with_a_schema_each(client):
    files = ["get-directory", "put-directory", "read-path", "write-path"]
    expected = {  # slug: (name, capabilities, secret fields, the fields a block is made of)
        "secret": ("Secret", [], ["value"], {"value"}),
        "json": ("JSON", [], [], {"value"}),
        "string": ("String", [], [], {"value"}),
        "date-time": ("Date Time", [], [], {"value"}),
        "local-file-system": ("Local File System", files, [], {"basepath"}),
        "remote-file-system": ("Remote File System", files, [], {"basepath", "settings"}),
        "smb": (
            "SMB",
            files,
            ["smb_username", "smb_password"],
            {"share_path", "smb_host", "smb_port", "smb_username", "smb_password"},
        ),
        "process": (
            "Process",
            ["run-infrastructure"],
            [],
            {"type", "env", "labels", "name", "command", "stream_output", "working_dir"},
        ),
        "webhook": ("Webhook", [], ["url", "headers.*"], {"method", "url", "headers", "allow_private_urls"}),
    }
    for slug, (name, capabilities, secret_fields, fields) in expected.items():
        block_type = client.ok("GET", f"/block_types/slug/{slug}")
        assert (block_type["name"], block_type["is_protected"]) == (name, True), block_type
        schema = core_schema(client, slug)
        assert sorted(schema["capabilities"]) == capabilities, schema
        assert schema["fields"]["secret_fields"] == secret_fields
        assert set(schema["fields"]["properties"]) == fields
        assert client.ok("GET", f"/block_schemas/checksum/{schema['checksum']}")["id"] == schema["id"]
        status, _ = client.request("DELETE", f"/block_types/{block_type['id']}")
        assert status == 403


def test_a_secret_made_with_the_core_schema_is_masked_and_read_back_whole_when_asked(client):
    secret = client.ok("GET", "/block_types/slug/secret")
    body = {
        "name": "db-password",
        "block_type_id": secret["id"],
        "block_schema_id": core_schema(client, "secret")["id"],
    }
    made = client.ok("POST", "/block_documents/", {**body, "data": {"value": "hunter2"}})
    assert made["data"] == {"value": "********"}
    assert client.ok("GET", f"/block_documents/{made['id']}?include_secrets=true")["data"] == {"value": "hunter2"}


def test_a_block_type_an_sdk_registered_first_becomes_protected_and_gains_the_core_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    with prefectlite.serve(database=url, port=0) as api_url:
        client = Client(api_url)
        secret = client.ok("GET", "/block_types/slug/secret")
        ours = core_schema(client, "secret")
        sdk_fields = {"title": "Secret", "type": "object", "properties": {"value": {"type": "string"}}}
        sdk = new_block_schema(client, secret, fields=sdk_fields, version="2.20.27")
    # as an older server without the core types left it, where an SDK saved a Secret: its type and schema only
    db = prefectlite.open_database(url)
    try:
        with db.write() as tx:
            tx.execute("DELETE FROM block_schema WHERE id = ?", (ours["id"],))
            tx.execute("UPDATE block_type SET is_protected = ? WHERE id = ?", (False, secret["id"]))
    finally:
        db.close()
    with prefectlite.serve(database=url, port=0) as api_url:
        client = Client(api_url)
        assert client.ok("GET", "/block_types/slug/secret")["is_protected"] is True
        by_type = {"block_schemas": {"block_type_id": {"any_": [secret["id"]]}}}
        schemas = {schema["id"]: schema["checksum"] for schema in client.ok("POST", "/block_schemas/filter", by_type)}
        assert schemas[sdk["id"]] == sdk["checksum"]
        assert ours["checksum"] in schemas.values()


def test_install_system_block_types_is_idempotent(client):
    before = client.ok("POST", "/block_types/filter", {})
    status, body = client.post("/block_types/install_system_block_types")
    assert status == 200, body
    after = client.ok("POST", "/block_types/filter", {})
    assert sorted(t["id"] for t in after) == sorted(t["id"] for t in before)


# --- block schemas -----------------------------------------------------------------------------


def test_block_schema_create_and_read_by_id(client):
    bt = new_block_type(client)
    fields = credentials_fields(bt["slug"])
    schema = new_block_schema(client, bt, fields=fields, capabilities=["authenticate"], version="1.2.3")
    assert schema["fields"] == fields
    assert schema["capabilities"] == ["authenticate"]
    assert schema["version"] == "1.2.3"
    assert schema["block_type_id"] == bt["id"]
    assert schema["block_type"]["slug"] == bt["slug"]
    assert schema["checksum"].startswith("sha256:")
    assert client.ok("GET", f"/block_schemas/{schema['id']}") == schema


def test_block_schema_version_defaults_to_non_versioned(client):
    bt = new_block_type(client)
    schema = new_block_schema(client, bt)
    assert schema["version"] == "non-versioned"


def test_block_schema_checksum_given_by_the_client_is_stored_as_given(client):
    bt = new_block_type(client)
    checksum = "sha256:" + uuid.uuid4().hex * 2
    schema = new_block_schema(client, bt, checksum=checksum, version="2.20.27")
    assert schema["checksum"] == checksum
    assert client.ok("GET", f"/block_schemas/checksum/{checksum}")["id"] == schema["id"]
    assert client.ok("GET", f"/block_schemas/checksum/{checksum}?version=2.20.27")["id"] == schema["id"]


def test_block_schema_create_is_idempotent_by_checksum_and_version(client):
    bt = new_block_type(client)
    checksum = "sha256:" + uuid.uuid4().hex * 2
    first = new_block_schema(client, bt, checksum=checksum, version="1.0", expect=201)
    again = new_block_schema(client, bt, checksum=checksum, version="1.0", expect=200)
    assert again["id"] == first["id"]
    assert again == first
    # same checksum, another version: a second schema
    other = new_block_schema(client, bt, checksum=checksum, version="2.0", expect=201)
    assert other["id"] != first["id"]
    # same fields without a checksum: the server computes one, the same each time
    computed = new_block_schema(client, bt, fields={"title": "X", "properties": {"a": {"type": "string"}}})
    computed_again = new_block_schema(
        client, bt, fields={"title": "X", "properties": {"a": {"type": "string"}}}, expect=200
    )
    assert computed_again["id"] == computed["id"]
    schemas = client.ok("POST", "/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [bt["id"]]}}})
    assert sorted(s["id"] for s in schemas) == sorted([first["id"], other["id"], computed["id"]])


# A schema as the SDK registers it (it sends no checksum) and the checksum the 2.20 and 3.9 SDKs compute for
# it (Block._calculate_schema_checksum, run once on both): secret_fields and the definitions of blocks
# (Creds) or of nothing referred to (Unused) do not count; the text is json.dumps with default spacing.
SDK_SHAPED_FIELDS = {
    "title": "Warehouse",
    "description": "A warehouse connection.",
    "type": "object",
    "properties": {
        "dsn": {"title": "Dsn", "type": "string"},
        "password": {"title": "Password", "type": "string", "writeOnly": True, "format": "password"},
        "options": {"$ref": "#/definitions/Options"},
        "creds": {"$ref": "#/definitions/Creds"},
        "label": {"title": "Label", "type": "string", "default": "café"},
    },
    "required": ["dsn", "password"],
    "block_type_slug": "warehouse",
    "secret_fields": ["password", "creds.token"],
    "block_schema_references": {"creds": {"block_type_slug": "creds", "block_schema_checksum": "sha256:abc"}},
    "definitions": {
        "Options": {"title": "Options", "type": "object", "properties": {"retries": {"type": "integer", "default": 3}}},
        "Creds": {
            "title": "Creds",
            "type": "object",
            "block_type_slug": "creds",
            "secret_fields": ["token"],
            "properties": {"token": {"type": "string"}},
        },
        "Unused": {"title": "Unused", "type": "object"},
    },
}
SDK_CHECKSUM = "sha256:b63ef4594c92f452cd2f0ab9e8a99e49abaf978d68fe5b9cee5857d0aa048b06"
PLAIN_SDK_CHECKSUM = "sha256:ab3630947c264c1e99ed85d995693f0b7c1c3c0c42251a57dc045a8804b82fb7"


def test_block_schema_checksum_is_the_sdks_so_it_finds_the_schema_by_it(client):
    """The SDK registers a schema without a checksum and looks it up by its own: a different checksum
    here (compact JSON, secret_fields hashed) made every lookup a 404 and every registration a new row."""
    bt = new_block_type(client)
    schema = new_block_schema(client, bt, fields=SDK_SHAPED_FIELDS)
    assert schema["checksum"] == SDK_CHECKSUM
    assert client.ok("GET", f"/block_schemas/checksum/{SDK_CHECKSUM}")["id"] == schema["id"]
    plain = {"title": "Plain", "type": "object", "properties": {}, "secret_fields": []}
    assert new_block_schema(client, bt, fields=plain)["checksum"] == PLAIN_SDK_CHECKSUM
    looping = {
        "properties": {"a": {"$ref": "#/definitions/A"}},
        "definitions": {"A": {"properties": {"b": {"$ref": "#/definitions/A"}}}},
    }
    assert new_block_schema(client, bt, fields=looping)["checksum"].startswith("sha256:")  # no 500


def test_block_schema_read_by_checksum_with_and_without_version(client):
    bt = new_block_type(client)
    checksum = "sha256:" + uuid.uuid4().hex * 2
    v1 = new_block_schema(client, bt, checksum=checksum, version="1.0")
    v2 = new_block_schema(client, bt, checksum=checksum, version="2.0")
    assert client.ok("GET", f"/block_schemas/checksum/{checksum}?version=1.0")["id"] == v1["id"]
    assert client.ok("GET", f"/block_schemas/checksum/{checksum}?version=2.0")["id"] == v2["id"]
    assert client.ok("GET", f"/block_schemas/checksum/{checksum}")["id"] in (v1["id"], v2["id"])
    status, body = client.get(f"/block_schemas/checksum/{checksum}?version=3.0")
    assert status == 404, body
    status, body = client.get("/block_schemas/checksum/sha256:" + "0" * 64)
    assert status == 404, body


def test_block_schema_for_unknown_block_type_is_404(client):
    status, body = client.post("/block_schemas/", {"block_type_id": str(uuid.uuid4()), "fields": {}})
    assert status == 404, body


def core_schema(client, slug):
    """The schema the server registered at start for the core block type `slug` (its only one here)."""
    block_type = client.ok("GET", f"/block_types/slug/{slug}")
    (schema,) = client.ok(
        "POST", "/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}}
    )
    return schema


def test_block_schema_filter_by_type_capabilities_and_version(client):
    bt_a = new_block_type(client)
    bt_b = new_block_type(client)
    a_rw = new_block_schema(client, bt_a, fields={"title": "A1"}, capabilities=["read-path", "write-path"], version="1")
    a_r = new_block_schema(client, bt_a, fields={"title": "A2"}, capabilities=["read-path"], version="2")
    b_w = new_block_schema(client, bt_b, fields={"title": "B1"}, capabilities=["write-path"], version="1")

    def ids(body):
        return sorted(s["id"] for s in client.ok("POST", "/block_schemas/filter", body))

    assert ids({"block_schemas": {"block_type_id": {"any_": [bt_a["id"]]}}}) == sorted([a_rw["id"], a_r["id"]])
    assert ids(
        {
            "block_schemas": {
                "block_type_id": {"any_": [bt_a["id"], bt_b["id"]]},
                "block_capabilities": {"all_": ["write-path"]},
            }
        }
    ) == sorted([a_rw["id"], b_w["id"]])
    both = client.ok(
        "POST",
        "/block_schemas/filter",
        {"block_schemas": {"block_capabilities": {"all_": ["read-path", "write-path"]}}},
    )
    assert sorted((s["block_type"]["slug"], s["id"]) for s in both) == sorted(
        [(bt_a["slug"], a_rw["id"])]
        + [(slug, core_schema(client, slug)["id"]) for slug in ("local-file-system", "remote-file-system", "smb")]
    )
    assert ids({"block_schemas": {"block_type_id": {"any_": [bt_a["id"]]}, "version": {"any_": ["2"]}}}) == [a_r["id"]]
    assert ids({"block_schemas": {"id": {"any_": [b_w["id"]]}}}) == [b_w["id"]]
    # the built-in notification schemas answer to their capability
    notify = client.ok("POST", "/block_schemas/filter", {"block_schemas": {"block_capabilities": {"all_": ["notify"]}}})
    assert "slack-webhook" in {s["block_type"]["slug"] for s in notify}


def test_block_schema_delete(client):
    bt = new_block_type(client)
    schema = new_block_schema(client, bt)
    status, body = client.delete(f"/block_schemas/{schema['id']}")
    assert status == 204, body
    assert client.get(f"/block_schemas/{schema['id']}")[0] == 404
    assert client.get(f"/block_schemas/checksum/{schema['checksum']}")[0] == 404
    assert client.delete(f"/block_schemas/{schema['id']}")[0] == 404
    assert client.ok("GET", f"/block_types/{bt['id']}")["id"] == bt["id"]  # the type stays


def test_block_capabilities_lists_every_capability_once(client):
    new_block_kind(client, capabilities=["read-path", "write-path"])
    new_block_kind(client, capabilities=["write-path", "put-directory"])
    caps = client.ok("GET", "/block_capabilities/")
    assert isinstance(caps, list)
    assert {"read-path", "write-path", "put-directory", "notify"} <= set(caps)
    assert len(caps) == len(set(caps))


# --- block documents ---------------------------------------------------------------------------


def test_block_document_create_and_read_by_id(client):
    bt, schema = new_block_kind(client)
    doc = new_document(client, bt, schema, name="warehouse-login", data={"username": "etl", "port": 5432})
    assert doc["name"] == "warehouse-login"
    assert doc["is_anonymous"] is False
    assert doc["data"] == {"username": "etl", "port": 5432}
    assert doc["block_schema_id"] == schema["id"] and doc["block_type_id"] == bt["id"]
    assert doc["block_type_name"] == bt["name"]
    assert doc["block_type"]["slug"] == bt["slug"]
    assert doc["block_schema"]["id"] == schema["id"]
    assert doc["block_document_references"] == {}
    read = read_document(client, doc["id"])
    assert {k: read[k] for k in ("id", "name", "data", "block_type_id", "block_schema_id", "is_anonymous")} == {
        k: doc[k] for k in ("id", "name", "data", "block_type_id", "block_schema_id", "is_anonymous")
    }


def test_block_document_read_by_type_slug_and_name(client):
    bt, schema = new_block_kind(client)
    doc = new_document(client, bt, schema, name="by-name", data={"username": "me"})
    found = client.ok("GET", f"/block_types/slug/{bt['slug']}/block_documents/name/by-name")
    assert found["id"] == doc["id"] and found["data"] == {"username": "me"}
    status, body = client.get(f"/block_types/slug/{bt['slug']}/block_documents/name/missing")
    assert status == 404, body
    status, body = client.get("/block_types/slug/no-such-type/block_documents/name/by-name")
    assert status == 404, body


def test_block_document_unknown_id_is_404(client):
    status, body = client.get(f"/block_documents/{uuid.uuid4()}")
    assert status == 404, body


def test_block_document_duplicate_name_in_a_type_is_409(client):
    bt, schema = new_block_kind(client)
    new_document(client, bt, schema, name="db-password", data={"username": "a"})
    status, body = client.post(
        "/block_documents/",
        {
            "name": "db-password",
            "data": {"username": "b"},
            "block_schema_id": schema["id"],
            "block_type_id": bt["id"],
            "is_anonymous": False,
        },
    )
    assert status == 409, body
    assert body == {"detail": "Block already exists"}
    # the first one is untouched
    assert client.ok("GET", f"/block_types/slug/{bt['slug']}/block_documents/name/db-password")["data"] == {
        "username": "a"
    }
    # the same name in another type is fine
    other_bt, other_schema = new_block_kind(client)
    new_document(client, other_bt, other_schema, name="db-password", data={"username": "c"})


def test_block_document_needs_a_name_unless_anonymous(client):
    bt, schema = new_block_kind(client)
    status, body = client.post(
        "/block_documents/", {"data": {}, "block_schema_id": schema["id"], "block_type_id": bt["id"]}
    )
    assert status == 422, body


def test_block_document_name_is_validated(client):
    bt, schema = new_block_kind(client)
    status, body = client.post(
        "/block_documents/",
        {"name": "Not Valid!", "data": {}, "block_schema_id": schema["id"], "block_type_id": bt["id"]},
    )
    assert status == 422, body
    assert any(err["loc"][-1] == "name" for err in body["exception_detail"]), body


def test_block_document_with_unknown_schema_is_404(client):
    bt, _ = new_block_kind(client)
    status, body = client.post(
        "/block_documents/", {"name": "x", "data": {}, "block_schema_id": str(uuid.uuid4()), "block_type_id": bt["id"]}
    )
    assert status == 404, body


def test_anonymous_block_document_gets_a_generated_name(client):
    bt, schema = new_block_kind(
        client,
        fields={
            "title": "LocalFileSystem",
            "properties": {"basepath": {"title": "Basepath", "type": "string"}},
            "secret_fields": [],
            "block_schema_references": {},
        },
    )
    # as the SDK sends it when persisting results (c_cache trace)
    status, doc = client.post(
        "/block_documents/",
        {
            "name": None,
            "data": {"basepath": "~/.prefect/storage"},
            "block_schema_id": schema["id"],
            "block_type_id": bt["id"],
            "is_anonymous": True,
        },
    )
    assert status == 201, doc
    assert doc["is_anonymous"] is True
    assert doc["name"].startswith("anonymous-") and len(doc["name"]) > len("anonymous-")
    assert read_document(client, doc["id"], include_secrets=True)["data"] == {"basepath": "~/.prefect/storage"}
    second = new_document(client, bt, schema, data={"basepath": "/elsewhere"}, is_anonymous=True)
    assert second["name"] != doc["name"]


def test_anonymous_documents_are_hidden_from_filter_unless_asked(client):
    bt, schema = new_block_kind(client)
    named = new_document(client, bt, schema, name="visible", data={"username": "v"})
    anon = new_document(client, bt, schema, data={"username": "hidden"}, is_anonymous=True)
    by_type = {"block_types": {"slug": {"any_": [bt["slug"]]}}}

    assert [d["id"] for d in client.ok("POST", "/block_documents/filter", by_type)] == [named["id"]]
    assert client.ok("POST", "/block_documents/count", by_type) == 1

    asked = {**by_type, "block_documents": {"is_anonymous": {"eq_": True}}}
    assert [d["id"] for d in client.ok("POST", "/block_documents/filter", asked)] == [anon["id"]]
    assert client.ok("POST", "/block_documents/count", asked) == 1

    either = {**by_type, "block_documents": {"is_anonymous": None}}
    assert sorted(d["id"] for d in client.ok("POST", "/block_documents/filter", either)) == sorted(
        [named["id"], anon["id"]]
    )

    # listing by type slug hides them too
    listed = client.ok("GET", f"/block_types/slug/{bt['slug']}/block_documents")
    assert [d["id"] for d in listed] == [named["id"]]
    # but reading one directly works
    assert read_document(client, anon["id"])["is_anonymous"] is True


def test_block_document_filter_without_is_anonymous_still_hides_anonymous(client):
    """BlockDocumentFilter.is_anonymous defaults to {"eq_": false} (OpenAPI): a block_documents filter that
    does not mention is_anonymous still leaves anonymous documents out."""
    bt, schema = new_block_kind(client)
    named = new_document(client, bt, schema, name="named-one", data={"username": "v"})
    new_document(client, bt, schema, data={"username": "hidden"}, is_anonymous=True)
    body = {"block_documents": {"block_type_id": {"any_": [bt["id"]]}}}
    assert [d["id"] for d in client.ok("POST", "/block_documents/filter", body)] == [named["id"]]
    assert client.ok("POST", "/block_documents/count", body) == 1


def test_block_documents_list_by_type_slug(client):
    bt, schema = new_block_kind(client)
    other_bt, other_schema = new_block_kind(client)
    new_document(client, bt, schema, name="b-doc", data={"username": "b", "password": "pw-b"})
    new_document(client, bt, schema, name="a-doc", data={"username": "a", "password": "pw-a"})
    new_document(client, other_bt, other_schema, name="c-doc", data={"username": "c"})
    listed = client.ok("GET", f"/block_types/slug/{bt['slug']}/block_documents")
    assert sorted(names(listed)) == ["a-doc", "b-doc"]
    assert all(d["data"]["password"] == MASK for d in listed)
    with_secrets = client.ok("GET", f"/block_types/slug/{bt['slug']}/block_documents?include_secrets=true")
    assert {d["name"]: d["data"]["password"] for d in with_secrets} == {"a-doc": "pw-a", "b-doc": "pw-b"}
    assert client.get("/block_types/slug/no-such-type/block_documents")[0] == 404


def test_block_document_filter_and_count(client):
    bt, schema = new_block_kind(client, capabilities=["authenticate"])
    other_bt, other_schema = new_block_kind(client, capabilities=["store"])
    d1 = new_document(client, bt, schema, name="prod-db", data={"username": "p"})
    d2 = new_document(client, bt, schema, name="staging-db", data={"username": "s"})
    d3 = new_document(client, other_bt, other_schema, name="prod-bucket", data={"username": "b"})
    mine = [bt["id"], other_bt["id"]]

    def ids(body):
        return sorted(d["id"] for d in client.ok("POST", "/block_documents/filter", body))

    scope = {"block_documents": {"block_type_id": {"any_": mine}}}
    assert ids(scope) == sorted([d1["id"], d2["id"], d3["id"]])
    assert client.ok("POST", "/block_documents/count", scope) == 3
    assert ids(
        {"block_documents": {"block_type_id": {"any_": mine}, "name": {"any_": ["prod-db", "prod-bucket"]}}}
    ) == sorted([d1["id"], d3["id"]])
    assert ids({"block_documents": {"block_type_id": {"any_": mine}, "name": {"like_": "prod"}}}) == sorted(
        [d1["id"], d3["id"]]
    )
    assert ids({"block_documents": {"id": {"any_": [d2["id"]]}}}) == [d2["id"]]
    assert ids({"block_types": {"slug": {"any_": [other_bt["slug"]]}}}) == [d3["id"]]
    assert ids({"block_schemas": {"block_capabilities": {"all_": ["authenticate"]}}}) == sorted([d1["id"], d2["id"]])
    assert (
        client.ok(
            "POST", "/block_documents/count", {"block_schemas": {"block_capabilities": {"all_": ["authenticate"]}}}
        )
        == 2
    )
    ordered = client.ok("POST", "/block_documents/filter", {**scope, "sort": "NAME_ASC"})
    assert names(ordered) == ["prod-bucket", "prod-db", "staging-db"]
    page = client.ok("POST", "/block_documents/filter", {**scope, "sort": "NAME_ASC", "limit": 1, "offset": 1})
    assert names(page) == ["prod-db"]


def test_block_document_update_merges_by_default(client):
    bt, schema = new_block_kind(client)
    doc = new_document(client, bt, schema, name="merge-me", data={"username": "etl", "port": 5432})
    status, body = client.patch(f"/block_documents/{doc['id']}", {"data": {"port": 6543}})
    assert status == 204, body
    assert read_document(client, doc["id"], True)["data"] == {"username": "etl", "port": 6543}
    status, body = client.patch(
        f"/block_documents/{doc['id']}", {"data": {"password": "pw"}, "merge_existing_data": True}
    )
    assert status == 204, body
    assert read_document(client, doc["id"], True)["data"] == {"username": "etl", "port": 6543, "password": "pw"}


def test_block_document_update_without_merge_replaces(client):
    bt, schema = new_block_kind(client)
    doc = new_document(client, bt, schema, name="replace-me", data={"username": "etl", "port": 5432, "password": "pw"})
    status, body = client.patch(
        f"/block_documents/{doc['id']}", {"data": {"username": "new"}, "merge_existing_data": False}
    )
    assert status == 204, body
    after = read_document(client, doc["id"], True)
    assert after["data"] == {"username": "new"}
    assert after["name"] == "replace-me" and after["block_type_id"] == bt["id"]


def test_block_document_update_as_the_sdk_sends_it(client):
    """h_blocks_vars: after a 409 the SDK PATCHes {"data", "block_schema_id"} (merge by default)."""
    bt, schema = new_block_kind(client)
    doc = new_document(client, bt, schema, name="db-password", data={"username": "u", "password": "s3cr3t"})
    newer = new_block_schema(
        client, bt, fields=credentials_fields(bt["slug"], extra_properties={"host": {"type": "string"}}), version="2"
    )
    status, body = client.patch(
        f"/block_documents/{doc['id']}",
        {"data": {"username": "u", "password": "s3cr3t"}, "block_schema_id": newer["id"]},
    )
    assert status == 204, body
    after = client.ok("GET", f"/block_types/slug/{bt['slug']}/block_documents/name/db-password?include_secrets=true")
    assert after["data"] == {"username": "u", "password": "s3cr3t"}
    assert after["block_schema_id"] == newer["id"]
    assert after["updated"] >= doc["updated"]


def test_block_document_update_of_unknown_document_is_404(client):
    status, body = client.patch(f"/block_documents/{uuid.uuid4()}", {"data": {"a": 1}})
    assert status == 404, body


def test_block_document_delete(client):
    bt, schema = new_block_kind(client)
    doc = new_document(client, bt, schema, name="gone", data={"username": "u"})
    status, body = client.delete(f"/block_documents/{doc['id']}")
    assert status == 204, body
    assert client.get(f"/block_documents/{doc['id']}")[0] == 404
    assert client.get(f"/block_types/slug/{bt['slug']}/block_documents/name/gone")[0] == 404
    assert client.delete(f"/block_documents/{doc['id']}")[0] == 404
    # the name is free again
    new_document(client, bt, schema, name="gone", data={"username": "again"})


# --- secrets -----------------------------------------------------------------------------------


def test_secret_fields_are_masked_on_every_read(client):
    bt, schema = new_block_kind(client)
    doc = new_document(client, bt, schema, name="login", data={"username": "etl", "password": "hunter2"})
    assert doc["data"] == {"username": "etl", "password": MASK}  # the create answer too
    assert read_document(client, doc["id"])["data"]["password"] == MASK
    assert read_document(client, doc["id"], include_secrets=False)["data"]["password"] == MASK
    by_name = client.ok("GET", f"/block_types/slug/{bt['slug']}/block_documents/name/login")
    assert by_name["data"] == {"username": "etl", "password": MASK}
    listed = client.ok("POST", "/block_documents/filter", {"block_types": {"slug": {"any_": [bt["slug"]]}}})
    assert listed[0]["data"]["password"] == MASK
    listed = client.ok("GET", f"/block_types/slug/{bt['slug']}/block_documents")
    assert listed[0]["data"]["password"] == MASK


def test_secret_fields_are_revealed_with_include_secrets(client):
    bt, schema = new_block_kind(client)
    doc = new_document(client, bt, schema, name="login", data={"username": "etl", "password": "hunter2"})
    assert read_document(client, doc["id"], include_secrets=True)["data"] == {"username": "etl", "password": "hunter2"}
    by_name = client.ok("GET", f"/block_types/slug/{bt['slug']}/block_documents/name/login?include_secrets=true")
    assert by_name["data"]["password"] == "hunter2"
    listed = client.ok(
        "POST", "/block_documents/filter", {"block_types": {"slug": {"any_": [bt["slug"]]}}, "include_secrets": True}
    )
    assert listed[0]["data"]["password"] == "hunter2"


def test_unset_secret_field_is_not_invented(client):
    bt, schema = new_block_kind(client)
    doc = new_document(client, bt, schema, name="no-password", data={"username": "etl"})
    assert read_document(client, doc["id"])["data"] == {"username": "etl"}


def test_wildcard_secret_fields_mask_every_nested_value(client):
    bt = new_block_type(client)
    fields = {
        "title": "Hook",
        "type": "object",
        "properties": {"url": {"type": "string"}, "secrets": {"type": "object"}, "headers": {"type": "object"}},
        "secret_fields": ["secrets.*", "headers.Authorization"],
        "block_schema_references": {},
    }
    schema = new_block_schema(client, bt, fields=fields)
    data = {
        "url": "https://example.com",
        "secrets": {"token": "t0k3n", "key": "k3y"},
        "headers": {"Authorization": "Bearer abc", "Accept": "application/json"},
    }
    doc = new_document(client, bt, schema, name="hook", data=data)
    masked = read_document(client, doc["id"])["data"]
    assert masked == {
        "url": "https://example.com",
        "secrets": {"token": MASK, "key": MASK},
        "headers": {"Authorization": MASK, "Accept": "application/json"},
    }
    assert read_document(client, doc["id"], include_secrets=True)["data"] == data


def test_builtin_custom_webhook_masks_its_secrets(client):
    bt = client.ok("GET", "/block_types/slug/custom-webhook")
    schema = client.ok("POST", "/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [bt["id"]]}}})[0]
    assert schema["fields"]["secret_fields"] == ["secrets.*"]
    doc = new_document(
        client,
        bt,
        schema,
        name="my-hook",
        data={"name": "hook", "url": "https://example.com/{{token}}", "secrets": {"token": "s3cr3t"}},
    )
    assert read_document(client, doc["id"])["data"]["secrets"] == {"token": MASK}


def test_sending_the_mask_back_keeps_the_stored_secret(client):
    bt, schema = new_block_kind(client)
    doc = new_document(client, bt, schema, name="login", data={"username": "etl", "password": "hunter2", "port": 1})
    shown = read_document(client, doc["id"])["data"]
    assert shown["password"] == MASK
    # the UI sends back what it was shown, with one field edited
    status, body = client.patch(
        f"/block_documents/{doc['id']}", {"data": {**shown, "username": "loader"}, "merge_existing_data": False}
    )
    assert status == 204, body
    assert read_document(client, doc["id"], True)["data"] == {"username": "loader", "password": "hunter2", "port": 1}
    # Prefect's mask and our older ten-star spelling both mean "unchanged"
    for mask in ("********", "**********"):
        status, body = client.patch(f"/block_documents/{doc['id']}", {"data": {"password": mask}})
        assert status == 204, body
        assert read_document(client, doc["id"], True)["data"]["password"] == "hunter2"
    # a real new value replaces it
    status, body = client.patch(f"/block_documents/{doc['id']}", {"data": {"password": "n3w"}})
    assert status == 204, body
    assert read_document(client, doc["id"], True)["data"]["password"] == "n3w"


def test_sending_the_mask_back_for_a_nested_secret_keeps_it(client):
    bt = new_block_type(client)
    fields = {
        "title": "Hook",
        "type": "object",
        "properties": {"secrets": {"type": "object"}},
        "secret_fields": ["secrets.*"],
        "block_schema_references": {},
    }
    schema = new_block_schema(client, bt, fields=fields)
    doc = new_document(client, bt, schema, name="hook", data={"url": "u", "secrets": {"a": "1", "b": "2"}})
    shown = read_document(client, doc["id"])["data"]
    assert shown["secrets"] == {"a": MASK, "b": MASK}
    shown["secrets"]["b"] = "two"
    status, body = client.patch(f"/block_documents/{doc['id']}", {"data": shown, "merge_existing_data": False})
    assert status == 204, body
    assert read_document(client, doc["id"], True)["data"] == {"url": "u", "secrets": {"a": "1", "b": "two"}}


# --- references between blocks -----------------------------------------------------------------


def _nested_kinds(client):
    """A 'credentials' type and a 'warehouse' type whose `credentials` field is a credentials block."""
    creds_bt, creds_schema = new_block_kind(client)
    wh_bt = new_block_type(client)
    wh_fields = {
        "title": "Warehouse",
        "type": "object",
        "block_type_slug": wh_bt["slug"],
        "properties": {"database": {"type": "string"}, "credentials": {"$ref": "#/definitions/Credentials"}},
        "secret_fields": ["credentials.password"],
        "block_schema_references": {
            "credentials": {"block_type_slug": creds_bt["slug"], "block_schema_checksum": creds_schema["checksum"]}
        },
    }
    wh_schema = new_block_schema(client, wh_bt, fields=wh_fields)
    return creds_bt, creds_schema, wh_bt, wh_schema


def test_block_reference_is_stored_and_resolved_on_read(client):
    creds_bt, creds_schema, wh_bt, wh_schema = _nested_kinds(client)
    creds = new_document(client, creds_bt, creds_schema, name="prod-creds", data={"username": "etl", "password": "pw"})
    wh = new_document(
        client,
        wh_bt,
        wh_schema,
        name="prod-warehouse",
        data={"database": "analytics", "credentials": {"$ref": {"block_document_id": creds["id"]}}},
    )

    read = read_document(client, wh["id"], include_secrets=True)
    assert read["data"] == {"database": "analytics", "credentials": {"username": "etl", "password": "pw"}}
    ref = read["block_document_references"]["credentials"]["block_document"]
    assert ref["id"] == creds["id"] and ref["name"] == "prod-creds"
    assert ref["block_type"]["slug"] == creds_bt["slug"]
    assert ref["is_anonymous"] is False

    # a change to the referenced block shows through: it is a reference, not a copy
    client.ok("PATCH", f"/block_documents/{creds['id']}", {"data": {"username": "loader"}})
    read = read_document(client, wh["id"], include_secrets=True)
    assert read["data"]["credentials"] == {"username": "loader", "password": "pw"}

    by_name = client.ok(
        "GET", f"/block_types/slug/{wh_bt['slug']}/block_documents/name/prod-warehouse?include_secrets=true"
    )
    assert by_name["data"]["credentials"]["username"] == "loader"


def test_nested_block_secrets_are_masked(client):
    creds_bt, creds_schema, wh_bt, wh_schema = _nested_kinds(client)
    creds = new_document(client, creds_bt, creds_schema, name="creds", data={"username": "etl", "password": "pw"})
    wh = new_document(
        client,
        wh_bt,
        wh_schema,
        name="wh",
        data={"database": "analytics", "credentials": {"$ref": {"block_document_id": creds["id"]}}},
    )
    masked = read_document(client, wh["id"])
    assert masked["data"]["credentials"] == {"username": "etl", "password": MASK}
    listed = client.ok("POST", "/block_documents/filter", {"block_types": {"slug": {"any_": [wh_bt["slug"]]}}})
    assert listed[0]["data"]["credentials"]["password"] == MASK


def test_block_reference_to_an_anonymous_block(client):
    creds_bt, creds_schema, wh_bt, wh_schema = _nested_kinds(client)
    anon = new_document(client, creds_bt, creds_schema, data={"username": "anon", "password": "pw"}, is_anonymous=True)
    wh = new_document(
        client,
        wh_bt,
        wh_schema,
        name="wh",
        data={"database": "db", "credentials": {"$ref": {"block_document_id": anon["id"]}}},
    )
    read = read_document(client, wh["id"], include_secrets=True)
    assert read["data"]["credentials"] == {"username": "anon", "password": "pw"}
    assert read["block_document_references"]["credentials"]["block_document"]["is_anonymous"] is True


def test_block_reference_to_an_unknown_document_is_refused(client):
    _, _, wh_bt, wh_schema = _nested_kinds(client)
    status, body = client.post(
        "/block_documents/",
        {
            "name": "wh",
            "data": {"credentials": {"$ref": {"block_document_id": str(uuid.uuid4())}}},
            "block_schema_id": wh_schema["id"],
            "block_type_id": wh_bt["id"],
        },
    )
    assert status in (404, 409, 422), body
    assert client.get(f"/block_types/slug/{wh_bt['slug']}/block_documents/name/wh")[0] == 404


def test_block_reference_can_be_replaced_by_an_update(client):
    creds_bt, creds_schema, wh_bt, wh_schema = _nested_kinds(client)
    first = new_document(client, creds_bt, creds_schema, name="first", data={"username": "one"})
    second = new_document(client, creds_bt, creds_schema, name="second", data={"username": "two"})
    wh = new_document(
        client,
        wh_bt,
        wh_schema,
        name="wh",
        data={"database": "db", "credentials": {"$ref": {"block_document_id": first["id"]}}},
    )
    client.ok(
        "PATCH",
        f"/block_documents/{wh['id']}",
        {"data": {"credentials": {"$ref": {"block_document_id": second["id"]}}}},
    )
    read = read_document(client, wh["id"], include_secrets=True)
    assert read["data"] == {"database": "db", "credentials": {"username": "two"}}
    assert read["block_document_references"]["credentials"]["block_document"]["id"] == second["id"]


def test_merging_one_reference_keeps_the_other_references(client):
    """A merge update that re-points one block field leaves the block's other references alone."""
    creds_bt, creds_schema = new_block_kind(client)
    pipeline_bt = new_block_type(client)
    pipeline_schema = new_block_schema(
        client,
        pipeline_bt,
        fields={
            "title": "Pipeline",
            "type": "object",
            "properties": {"source": {}, "target": {}, "label": {"type": "string"}},
            "secret_fields": [],
            "block_schema_references": {},
        },
    )
    src = new_document(client, creds_bt, creds_schema, name="src", data={"username": "source-user"})
    dst = new_document(client, creds_bt, creds_schema, name="dst", data={"username": "target-user"})
    dst2 = new_document(client, creds_bt, creds_schema, name="dst2", data={"username": "target-user-2"})
    pipe = new_document(
        client,
        pipeline_bt,
        pipeline_schema,
        name="pipe",
        data={
            "label": "nightly",
            "source": {"$ref": {"block_document_id": src["id"]}},
            "target": {"$ref": {"block_document_id": dst["id"]}},
        },
    )
    assert set(read_document(client, pipe["id"])["block_document_references"]) == {"source", "target"}

    client.ok(
        "PATCH",
        f"/block_documents/{pipe['id']}",
        {"data": {"target": {"$ref": {"block_document_id": dst2["id"]}}}, "merge_existing_data": True},
    )
    read = read_document(client, pipe["id"], include_secrets=True)
    assert read["data"] == {
        "label": "nightly",
        "source": {"username": "source-user"},
        "target": {"username": "target-user-2"},
    }
    refs = read["block_document_references"]
    assert refs["source"]["block_document"]["id"] == src["id"]
    assert refs["target"]["block_document"]["id"] == dst2["id"]


def test_merge_update_without_references_keeps_existing_references(client):
    creds_bt, creds_schema, wh_bt, wh_schema = _nested_kinds(client)
    creds = new_document(client, creds_bt, creds_schema, name="creds", data={"username": "etl"})
    wh = new_document(
        client,
        wh_bt,
        wh_schema,
        name="wh",
        data={"database": "a", "credentials": {"$ref": {"block_document_id": creds["id"]}}},
    )
    client.ok("PATCH", f"/block_documents/{wh['id']}", {"data": {"database": "b"}})
    read = read_document(client, wh["id"], include_secrets=True)
    assert read["data"] == {"database": "b", "credentials": {"username": "etl"}}
    assert read["block_document_references"]["credentials"]["block_document"]["id"] == creds["id"]


# --- concurrent registration (as parallel tasks of one flow do it) ------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def any_db(request, tmp_path):
    """A real server on SQLite, then on PostgreSQL; yields a Client."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/any.db"
    else:
        url = request.getfixturevalue("postgres_url")
    with prefectlite.serve(database=url, port=0) as api_url:
        yield Client(api_url)


def _all_at_once(count, fn):
    results, start = [None] * count, threading.Barrier(count)

    def go(n):
        start.wait()
        results[n] = fn(n)

    threads = [threading.Thread(target=go, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return results


def test_concurrent_registration_of_one_schema_yields_one_schema(any_db):
    """Parallel tasks register the same schema at once: one schema, created once (201), found by the rest (200).
    Five races."""
    client = any_db
    bt = new_block_type(client)
    for race in range(5):
        checksum = "sha256:" + uuid.uuid4().hex * 2
        body = {
            "block_type_id": bt["id"],
            "fields": credentials_fields(bt["slug"]),
            "capabilities": [],
            "checksum": checksum,
            "version": "2.20.27",
        }
        results = _all_at_once(8, lambda n: Client(client.api_url).post("/block_schemas/", body))
        assert all(status in (200, 201) for status, _ in results), results
        assert len({schema["id"] for _, schema in results}) == 1
        assert sorted(status for status, _ in results) == [200] * 7 + [201], (race, [s for s, _ in results])
    schemas = client.ok("POST", "/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [bt["id"]]}}})
    assert len(schemas) == 5


def test_concurrent_saves_of_one_block_name_create_it_once(any_db):
    client = any_db
    bt, schema = new_block_kind(client)
    body = {
        "name": "shared",
        "data": {"username": "u"},
        "block_schema_id": schema["id"],
        "block_type_id": bt["id"],
        "is_anonymous": False,
    }
    results = _all_at_once(8, lambda n: Client(client.api_url).post("/block_documents/", body))
    assert sorted(status for status, _ in results) == [201] + [409] * 7, results
    assert all(body == {"detail": "Block already exists"} for status, body in results if status == 409), results
