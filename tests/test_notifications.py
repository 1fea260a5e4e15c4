"""Flow run notifications: policies, destinations (block documents), the queue and its sender.

Everything runs for real: servers on free loopback ports, real HTTP, and local fake receivers
(tests/fake_receivers.py) standing in for Slack, Teams, Opsgenie, PagerDuty, Twilio, a custom
webhook and an SMTP server. Every server and receiver is stopped at the end of its test.
"""

import base64
import contextlib
import datetime as dt
import email
import email.policy
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from helpers import ROOT, Client, free_port, run_cli, wait_for_health, wait_until
from fake_receivers import HTTPReceiver, SMTPReceiver

import prefectlite

MASK = prefectlite.SECRET_MASK  # Prefect 2.20's "********"
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

ALL_SLUGS = (
    "slack-webhook",
    "ms-teams-webhook",
    "opsgenie-webhook",
    "pager-duty-webhook",
    "twilio-sms",
    "custom-webhook",
    "email-smtp",
)


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path, monkeypatch):
    """No profile or PREFECT_* variable of the machine running the tests leaks into our servers."""
    for name in list(os.environ):
        if name.startswith("PREFECT"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))


@contextlib.contextmanager
def running(tmp_path, database=None, **settings):
    """A real in-process server on a free port; yields (Client, api_url). Quick retries by default."""
    options = {
        "PREFECT_NOTIFICATIONS_RETRY_SECONDS": 0.2,
        "PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_LOOP_SECONDS": 0.5,
        **settings,
    }
    with prefectlite.serve(database=database or f"sqlite:///{tmp_path}/notifications.db", port=0, **options) as api:
        yield Client(api), api


def server_root(api_url):
    return api_url.rstrip("/")[: -len("/api")]


# --- helpers speaking the API ------------------------------------------------------------------------


def new_block(client, slug, data, name=None):
    block_type = client.ok("GET", f"/block_types/slug/{slug}")
    schemas = client.ok(
        "POST", "/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}}
    )
    assert schemas, f"no block schema for {slug}"
    return client.ok(
        "POST",
        "/block_documents/",
        {
            "name": name or f"{slug}-{uuid.uuid4().hex[:8]}",
            "block_type_id": block_type["id"],
            "block_schema_id": schemas[0]["id"],
            "data": data,
        },
    )


def new_policy(client, block_id, states=("Failed",), tags=(), **fields):
    return client.ok(
        "POST",
        "/flow_run_notification_policies/",
        {"state_names": list(states), "tags": list(tags), "block_document_id": block_id, **fields},
    )


def new_run(client, flow_name="daily-etl", run_name=None, tags=(), parameters=None):
    flow = client.ok("POST", "/flows/", {"name": flow_name}, expect=(200, 201))
    return client.ok(
        "POST",
        "/flow_runs/",
        {
            "flow_id": flow["id"],
            "name": run_name or f"run-{uuid.uuid4().hex[:8]}",
            "tags": list(tags),
            "parameters": parameters or {},
        },
    )


def set_state(client, run_id, state_type, name=None, message=None):
    state = {"type": state_type}
    if name:
        state["name"] = name
    if message is not None:
        state["message"] = message
    result = client.ok("POST", f"/flow_runs/{run_id}/set_state", {"state": state, "force": True})
    assert result["status"] == "ACCEPT", result
    return result["state"]


def fail_run(client, message="Flow run encountered an exception: boom", **run_fields):
    run = new_run(client, **run_fields)
    return run, set_state(client, run["id"], "FAILED", message=message)


def queue(client, status=None):
    return client.ok("GET", "/flow_run_notification_queue/" + (f"?status={status}" if status else ""))


def wait_queue_empty(client, timeout=30.0):
    wait_until(lambda: queue(client) == [], timeout, "the notification queue to drain")


def sentence(run, state, flow_name="daily-etl"):
    """The first sentence of the default message, e.g. 'The fuzzy-leopard run of the daily-etl flow entered
    a Failed state at 26-11-26 16:21:37 UTC.'"""
    moment = dt.datetime.fromisoformat(state["timestamp"].replace("Z", "+00:00")).astimezone(dt.timezone.utc)
    return (
        f"The {run['name']} run of the {flow_name} flow entered a {state['name']} state at "
        f"{moment.strftime('%y-%m-%d %H:%M:%S')} UTC."
    )


def assert_default_message(text, api_url, run, state):
    assert sentence(run, state) in text, text
    assert f"{server_root(api_url)}/flow-runs/flow-run/{run['id']}" in text, text
    assert state["message"] in text, text


# --- block types and policies ------------------------------------------------------------------------


def test_notification_block_types_are_registered_protected_with_schemas(tmp_path):
    expected_secrets = {
        "slack-webhook": {"url"},
        "ms-teams-webhook": {"url"},
        "opsgenie-webhook": {"apikey"},
        "pager-duty-webhook": {"integration_key", "api_key"},
        "twilio-sms": {"auth_token"},
        "custom-webhook": {"secrets.*"},
        "email-smtp": {"password"},
    }
    expected_fields = {
        "slack-webhook": {"url"},
        "ms-teams-webhook": {"url"},
        "opsgenie-webhook": {
            "apikey",
            "target_user",
            "target_team",
            "target_schedule",
            "target_escalation",
            "region_name",
            "tags",
            "priority",
            "alias",
            "entity",
            "details",
        },
        "pager-duty-webhook": {
            "integration_key",
            "api_key",
            "source",
            "component",
            "group",
            "class_id",
            "region_name",
            "clickable_url",
            "custom_details",
        },
        "twilio-sms": {"account_sid", "auth_token", "from_phone_number", "to_phone_numbers"},
        "custom-webhook": {
            "name",
            "url",
            "method",
            "params",
            "json_data",
            "form_data",
            "headers",
            "cookies",
            "timeout",
            "secrets",
        },
        "email-smtp": {"host", "port", "security", "username", "password", "from_address", "to_addresses"},
    }
    with running(tmp_path) as (client, _api):
        for slug in ALL_SLUGS:
            block_type = client.ok("GET", f"/block_types/slug/{slug}")
            assert block_type["is_protected"] is True, slug
            schemas = client.ok(
                "POST", "/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}}
            )
            assert len(schemas) == 1, (slug, schemas)
            fields = schemas[0]["fields"]
            assert expected_fields[slug] <= set(fields["properties"]), (slug, sorted(fields["properties"]))
            assert set(fields["secret_fields"]) == expected_secrets[slug], slug
            assert "notify" in schemas[0]["capabilities"], slug
            # protected: nobody deletes them
            assert client.delete(f"/block_types/{block_type['id']}")[0] in (403, 409, 422), slug
        assert "notify" in client.ok("GET", "/block_capabilities/")


def test_policy_create_read_update_filter_delete(tmp_path):
    with running(tmp_path) as (client, _api), HTTPReceiver() as hook:
        block = new_block(client, "slack-webhook", {"url": hook.url + "/services/T/B/x"})
        status, policy = client.post(
            "/flow_run_notification_policies/",
            {"state_names": ["Failed", "Crashed"], "tags": ["daily-etl"], "block_document_id": block["id"]},
        )
        assert status == 201, policy
        assert UUID_RE.fullmatch(policy["id"])
        assert policy["is_active"] is True  # the default
        assert policy["state_names"] == ["Failed", "Crashed"]
        assert policy["tags"] == ["daily-etl"]
        assert policy["block_document_id"] == block["id"]
        assert policy.get("message_template") is None
        assert client.ok("GET", f"/flow_run_notification_policies/{policy['id']}") == policy

        template = "{flow_name} is {flow_run_state_name}"
        status, _ = client.patch(
            f"/flow_run_notification_policies/{policy['id']}",
            {"is_active": False, "message_template": template, "tags": []},
        )
        assert status == 204
        updated = client.ok("GET", f"/flow_run_notification_policies/{policy['id']}")
        assert updated["is_active"] is False and updated["message_template"] == template and updated["tags"] == []
        assert updated["state_names"] == ["Failed", "Crashed"]  # untouched

        other = new_policy(client, block["id"], states=["Completed"])
        listed = client.ok("POST", "/flow_run_notification_policies/filter", {})
        assert {p["id"] for p in listed} == {policy["id"], other["id"]}
        # the Prefect client and UI filter with `flow_run_notification_policy_filter`
        active = client.ok(
            "POST",
            "/flow_run_notification_policies/filter",
            {"flow_run_notification_policy_filter": {"is_active": {"eq_": True}}},
        )
        assert [p["id"] for p in active] == [other["id"]]
        paused = client.ok(
            "POST",
            "/flow_run_notification_policies/filter",
            {"flow_run_notification_policy_filter": {"is_active": {"eq_": False}}},
        )
        assert [p["id"] for p in paused] == [policy["id"]]
        assert len(client.ok("POST", "/flow_run_notification_policies/filter", {"limit": 1})) == 1

        assert client.delete(f"/flow_run_notification_policies/{policy['id']}")[0] == 204
        assert client.get(f"/flow_run_notification_policies/{policy['id']}")[0] == 404
        assert client.delete(f"/flow_run_notification_policies/{policy['id']}")[0] == 404
        assert client.patch(f"/flow_run_notification_policies/{policy['id']}", {"is_active": True})[0] == 404
        assert [p["id"] for p in client.ok("POST", "/flow_run_notification_policies/filter", {})] == [other["id"]]


def test_unknown_template_placeholder_is_422_naming_it(tmp_path):
    with running(tmp_path) as (client, _api), HTTPReceiver() as hook:
        block = new_block(client, "slack-webhook", {"url": hook.url + "/hook"})
        status, body = client.post(
            "/flow_run_notification_policies/",
            {
                "state_names": ["Failed"],
                "tags": [],
                "block_document_id": block["id"],
                "message_template": "{flow_name} failed; see {flow_run_link}",
            },
        )
        assert status == 422, body
        assert "flow_run_link" in json.dumps(body)
        assert client.ok("POST", "/flow_run_notification_policies/filter", {}) == []

        good = (
            "{flow_name} {flow_run_name} {flow_run_id} {flow_id} {flow_run_state_name} {flow_run_state_type} "
            "{flow_run_state_timestamp} {flow_run_state_message} {flow_run_url} {flow_run_parameters} "
            "{flow_run_notification_policy_id}"
        )
        policy = new_policy(client, block["id"], message_template=good)
        status, body = client.patch(
            f"/flow_run_notification_policies/{policy['id']}", {"message_template": "{flow_name} {nonsense_field}"}
        )
        assert status == 422, body
        assert "nonsense_field" in json.dumps(body)
        assert client.ok("GET", f"/flow_run_notification_policies/{policy['id']}")["message_template"] == good


@pytest.mark.parametrize(
    "template", ["{flow_run_name:d}", "{flow_run_name:>2000000000}", "{flow_name!r}", "{flow_name:{flow_run_name}}"]
)
def test_a_placeholder_with_a_format_spec_or_conversion_is_422(tmp_path, template):
    """Prefect fills the template with str.format; a format spec ("{flow_run_name:d}") made rendering raise in
    the sender, which retried the row in a tight loop. Placeholders are bare names."""
    with running(tmp_path) as (client, _api), HTTPReceiver() as hook:
        block = new_block(client, "slack-webhook", {"url": hook.url + "/hook"})
        status, body = client.post(
            "/flow_run_notification_policies/",
            {"state_names": ["Failed"], "tags": [], "block_document_id": block["id"], "message_template": template},
        )
        assert status == 422, body
        assert "message_template" in json.dumps(body)
        policy = new_policy(client, block["id"], message_template="{flow_name}")
        status, body = client.patch(f"/flow_run_notification_policies/{policy['id']}", {"message_template": template})
        assert status == 422, body
        assert "message_template" in json.dumps(body)
        assert client.ok("GET", f"/flow_run_notification_policies/{policy['id']}")["message_template"] == "{flow_name}"


def test_a_stored_template_that_cannot_render_fails_its_row_once(tmp_path):
    """A template stored before templates were checked this strictly: its row is given up (FAILED, with the
    reason) at the first attempt, not rolled back and retried in a loop that blocks every other notification."""
    with HTTPReceiver() as hook, running(tmp_path, PREFECT_NOTIFICATIONS_MAX_ATTEMPTS=5) as (client, _api):
        block = new_block(client, "slack-webhook", {"url": hook.url + "/hook"})
        broken = new_policy(client, block["id"], message_template="{flow_name}")
        with contextlib.closing(sqlite3.connect(tmp_path / "notifications.db")) as db, db:
            db.execute(
                "UPDATE flow_run_notification_policy SET message_template = ? WHERE id = ?",
                ("{flow_run_name:d}", broken["id"]),
            )
        new_policy(client, block["id"], message_template="fine: {flow_run_name}")
        run, _state = fail_run(client)
        [hit] = hook.wait_for(1, accepted=True)
        assert hit.json()["text"].endswith(f"fine: {run['name']}")
        [row] = wait_until(lambda: queue(client, "FAILED"), timeout=20, what="the unrenderable row FAILED")
        assert row["flow_run_notification_policy_id"] == broken["id"]
        assert row["attempts"] == 1
        assert "template" in row["last_error"]
        wait_until(lambda: len(queue(client)) == 1, timeout=20, what="only the FAILED row left")
        status, body = client.post(f"/flow_run_notification_policies/{broken['id']}/test")
        assert status == 502 and "template" in json.dumps(body), body


# --- one test per channel: the exact request each service expects -------------------------------------


def test_slack_webhook_request(tmp_path):
    with HTTPReceiver() as slack, running(tmp_path) as (client, api):
        block = new_block(client, "slack-webhook", {"url": slack.url + "/services/T000/B000/XXXXXXXX"})
        new_policy(client, block["id"])
        run, state = fail_run(client, run_name="fuzzy-leopard", message="Flow run encountered an exception: boom")
        [hit] = slack.wait_for(1)
        assert hit.method == "POST"
        assert hit.path == "/services/T000/B000/XXXXXXXX"
        assert hit.headers["content-type"].startswith("application/json")
        payload = hit.json()
        assert isinstance(payload["text"], str)
        assert_default_message(payload["text"], api, run, state)
        wait_queue_empty(client)
        assert len(slack.hits) == 1


def test_teams_message_card_request(tmp_path):
    with HTTPReceiver() as teams, running(tmp_path) as (client, api):
        block = new_block(client, "ms-teams-webhook", {"url": teams.url + "/webhookb2/abc@def/IncomingWebhook/123"})
        new_policy(client, block["id"])
        run, state = fail_run(client, run_name="brave-otter")
        [hit] = teams.wait_for(1)
        assert hit.method == "POST"
        assert hit.path == "/webhookb2/abc@def/IncomingWebhook/123"
        assert hit.headers["content-type"].startswith("application/json")
        card = hit.json()
        assert card["@type"] == "MessageCard"
        assert "schema.org/extensions" in card["@context"]
        assert card.get("summary")  # Teams requires a summary or a text
        assert sentence(run, state) in card["text"]
        assert f"{server_root(api)}/flow-runs/flow-run/{run['id']}" in card["text"]
        assert state["message"] in card["text"]


def test_opsgenie_alert_request(tmp_path):
    with HTTPReceiver() as opsgenie:
        with running(tmp_path, PREFECT_NOTIFICATIONS_OPSGENIE_URL=opsgenie.url) as (client, api):
            block = new_block(
                client,
                "opsgenie-webhook",
                {
                    "apikey": "0123-genie-key",
                    "target_user": ["ann@example.com"],
                    "target_team": ["ops"],
                    "target_schedule": ["weekend"],
                    "target_escalation": ["managers"],
                    "region_name": "us",
                    "tags": ["prefect", "etl"],
                    "priority": "P1",
                    "alias": "etl-alert",
                    "entity": "warehouse",
                    "details": {"env": "prod"},
                },
            )
            new_policy(client, block["id"])
            run, state = fail_run(client, run_name="calm-heron")
            [hit] = opsgenie.wait_for(1)
    assert hit.method == "POST"
    assert hit.path == "/v2/alerts"
    assert hit.headers["authorization"] == "GenieKey 0123-genie-key"
    assert hit.headers["content-type"].startswith("application/json")
    alert = hit.json()
    assert alert["message"] and len(alert["message"]) <= 130  # Opsgenie's limit
    assert sentence(run, state) in alert["description"]
    assert f"/flow-runs/flow-run/{run['id']}" in alert["description"]
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(alert["responders"], key=key) == sorted(
        [
            {"type": "user", "username": "ann@example.com"},
            {"type": "team", "name": "ops"},
            {"type": "schedule", "name": "weekend"},
            {"type": "escalation", "name": "managers"},
        ],
        key=key,
    )
    assert alert["tags"] == ["prefect", "etl"]
    assert alert["priority"] == "P1"
    assert alert["alias"] == "etl-alert"
    assert alert["entity"] == "warehouse"
    assert alert["details"] == {"env": "prod"}


def test_pagerduty_event_request(tmp_path):
    with HTTPReceiver() as pagerduty:
        with running(tmp_path, PREFECT_NOTIFICATIONS_PAGERDUTY_URL=pagerduty.url) as (client, api):
            block = new_block(
                client,
                "pager-duty-webhook",
                {
                    "integration_key": "R0UTINGKEY0123456789abcdef012345",
                    "api_key": "pd-api-key",
                    "source": "prefect-prod",
                    "component": "etl",
                    "group": "data",
                    "class_id": "batch",
                    "clickable_url": "https://runbooks.example.com/etl",
                    "custom_details": {"team": "data"},
                },
            )
            new_policy(client, block["id"])
            run, state = fail_run(client, run_name="quiet-lynx")
            [hit] = pagerduty.wait_for(1)
    assert hit.method == "POST"
    assert hit.path == "/v2/enqueue"
    assert hit.headers["content-type"].startswith("application/json")
    event = hit.json()
    assert event["routing_key"] == "R0UTINGKEY0123456789abcdef012345"
    assert event["event_action"] == "trigger"
    payload = event["payload"]
    assert payload["summary"] and len(payload["summary"]) <= 1024
    assert payload["source"] == "prefect-prod"
    assert payload["severity"] in ("critical", "error", "warning", "info")
    assert payload["component"] == "etl"
    assert payload["group"] == "data"
    assert payload["class"] == "batch"
    assert payload["custom_details"]["team"] == "data"
    assert sentence(run, state) in json.dumps(payload)
    assert "https://runbooks.example.com/etl" in json.dumps(event)


def test_twilio_sms_request_per_number(tmp_path):
    with HTTPReceiver(status=201) as twilio:
        with running(tmp_path, PREFECT_NOTIFICATIONS_TWILIO_URL=twilio.url) as (client, api):
            block = new_block(
                client,
                "twilio-sms",
                {
                    "account_sid": "AC0123456789abcdef",
                    "auth_token": "tw-auth-token",
                    "from_phone_number": "+15550001111",
                    "to_phone_numbers": ["+15550002222", "+15550003333"],
                },
            )
            new_policy(client, block["id"])
            run, state = fail_run(client, run_name="lucky-crane")
            hits = twilio.wait_for(2)
            wait_queue_empty(client)
    assert len(hits) == 2
    assert sorted(h.form()["To"][0] for h in hits) == ["+15550002222", "+15550003333"]
    for hit in hits:
        assert hit.method == "POST"
        assert hit.path == "/2010-04-01/Accounts/AC0123456789abcdef/Messages.json"
        assert hit.headers["content-type"].startswith("application/x-www-form-urlencoded")
        assert hit.headers["authorization"] == "Basic " + base64.b64encode(b"AC0123456789abcdef:tw-auth-token").decode()
        form = hit.form()
        assert form["From"] == ["+15550001111"]
        assert sentence(run, state) in form["Body"][0]
        assert len(form["Body"][0]) <= 1600  # Twilio's limit


def test_custom_webhook_fills_placeholders(tmp_path):
    with HTTPReceiver() as receiver, running(tmp_path) as (client, api):
        json_block = new_block(
            client,
            "custom-webhook",
            {
                "name": "json-hook",
                "url": receiver.url + "/hooks/{{token}}",
                "method": "POST",
                "params": {"subject": "{{subject}}"},
                "json_data": {
                    "title": "{{subject}}",
                    "message": "{{body}}",
                    "static": 1,
                    "nested": {"list": ["{{body}}"]},
                },
                "headers": {"X-Token": "Bearer {{token}}"},
                "cookies": {"session": "{{token}}"},
                "secrets": {"token": "s3cr3t-t0ken"},
            },
        )
        form_block = new_block(
            client,
            "custom-webhook",
            {
                "name": "form-hook",
                "url": receiver.url + "/form",
                "method": "PUT",
                "form_data": {"text": "{{body}}", "kind": "prefect"},
            },
        )
        new_policy(client, json_block["id"])
        new_policy(client, form_block["id"])
        run, state = fail_run(client, run_name="gentle-moose")
        hits = receiver.wait_for(2)
        wait_queue_empty(client)
    json_hit = next(h for h in hits if h.route.startswith("/hooks/"))
    form_hit = next(h for h in hits if h.route == "/form")

    assert json_hit.method == "POST"
    assert json_hit.route == "/hooks/s3cr3t-t0ken"
    assert json_hit.headers["x-token"] == "Bearer s3cr3t-t0ken"
    assert "session=s3cr3t-t0ken" in json_hit.headers["cookie"]
    assert json_hit.headers["content-type"].startswith("application/json")
    body = json_hit.json()
    subject = body["title"]
    assert subject and "{{" not in subject
    assert json_hit.query["subject"] == [subject]
    assert_default_message(body["message"], api, run, state)
    assert body["static"] == 1
    assert body["nested"] == {"list": [body["message"]]}

    assert form_hit.method == "PUT"
    assert form_hit.headers["content-type"].startswith("application/x-www-form-urlencoded")
    form = form_hit.form()
    assert form["kind"] == ["prefect"]
    assert form["text"] == [body["message"]]


def test_email_smtp_message(tmp_path):
    with SMTPReceiver() as smtp, running(tmp_path) as (client, api):
        block = new_block(
            client,
            "email-smtp",
            {
                "host": "127.0.0.1",
                "port": smtp.port,
                "security": "none",
                "username": "mailer",
                "password": "smtp-pass",
                "from_address": "prefect@example.com",
                "to_addresses": ["ann@example.com", "bob@example.com"],
            },
        )
        new_policy(client, block["id"])
        run, state = fail_run(client, run_name="sleepy-panda")
        [mail] = smtp.wait_for(1)
        wait_queue_empty(client)
    assert mail.mail_from == "prefect@example.com"
    assert sorted(mail.rcpt_tos) == ["ann@example.com", "bob@example.com"]
    assert smtp.logins == [("mailer", "smtp-pass")]
    message = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert message["From"] == "prefect@example.com"
    assert {a.addr_spec for a in message["To"].addresses} == {"ann@example.com", "bob@example.com"}
    assert message["Subject"] and "daily-etl" in message["Subject"]
    text = message.get_body(("plain",)).get_content()
    assert_default_message(text, api, run, state)


# --- the message -------------------------------------------------------------------------------------


def test_default_message_links_to_the_run_in_our_ui(tmp_path):
    with HTTPReceiver() as hook, running(tmp_path) as (client, api):
        block = new_block(
            client, "custom-webhook", {"name": "raw", "url": hook.url + "/raw", "json_data": {"body": "{{body}}"}}
        )
        new_policy(client, block["id"])
        run, state = fail_run(client, run_name="fuzzy-leopard", message="Task 'load' failed: disk full")
        [hit] = hook.wait_for(1)
        text = hit.json()["body"]
        assert re.search(
            r"The fuzzy-leopard run of the daily-etl flow entered a Failed state at "
            r"\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC\.",
            text,
        ), text
        assert sentence(run, state) in text
        assert "Task 'load' failed: disk full" in text
        links = re.findall(r"https?://\S+/flow-runs/flow-run/" + run["id"], text)
        assert links == [f"{server_root(api)}/flow-runs/flow-run/{run['id']}"], text
        with urllib.request.urlopen(links[0], timeout=10) as resp:  # the UI answers at that address
            assert resp.status == 200
            assert b"<html" in resp.read().lower()


@pytest.mark.parametrize(
    "setting, value, expected_root",
    [
        ("PREFECT_UI_URL", "https://prefect.example.com/ui", "https://prefect.example.com/ui"),
        ("PREFECT_API_URL", "https://orchestrator.example.com:4200/api", "https://orchestrator.example.com:4200"),
    ],
)
def test_link_uses_configured_public_url(tmp_path, setting, value, expected_root):
    with HTTPReceiver() as hook, running(tmp_path, **{setting: value}) as (client, api):
        block = new_block(
            client, "custom-webhook", {"name": "raw", "url": hook.url + "/raw", "json_data": {"body": "{{body}}"}}
        )
        new_policy(client, block["id"])
        run, _state = fail_run(client)
        [hit] = hook.wait_for(1)
        assert f"{expected_root}/flow-runs/flow-run/{run['id']}" in hit.json()["body"]


def test_message_template_placeholders_are_filled(tmp_path):
    template = (
        "{flow_name}|{flow_run_name}|{flow_run_id}|{flow_id}|{flow_run_state_name}|{flow_run_state_type}|"
        "{flow_run_state_timestamp}|{flow_run_state_message}|{flow_run_url}|{flow_run_notification_policy_id}"
        "|{flow_run_parameters}"
    )
    with HTTPReceiver() as hook, running(tmp_path) as (client, api):
        block = new_block(
            client, "custom-webhook", {"name": "raw", "url": hook.url + "/raw", "json_data": {"body": "{{body}}"}}
        )
        policy = new_policy(client, block["id"], message_template=template)
        params = {"day": "2026-11-26", "retries": 3}
        run, state = fail_run(client, run_name="wise-walrus", parameters=params, message="it broke")
        [hit] = hook.wait_for(1)
    parts = hit.json()["body"].split("|", 10)
    moment = dt.datetime.fromisoformat(state["timestamp"].replace("Z", "+00:00")).astimezone(dt.timezone.utc)
    assert parts[:10] == [
        "daily-etl",
        "wise-walrus",
        run["id"],
        run["flow_id"],
        "Failed",
        "FAILED",
        moment.strftime("%y-%m-%d %H:%M:%S") + " UTC",
        "it broke",
        f"{server_root(api)}/flow-runs/flow-run/{run['id']}",
        policy["id"],
    ]
    assert json.loads(parts[10]) == params


# --- which runs notify -------------------------------------------------------------------------------


def test_state_names_select_which_states_notify(tmp_path):
    with HTTPReceiver() as hook, running(tmp_path) as (client, api):
        block = new_block(
            client, "custom-webhook", {"name": "raw", "url": hook.url + "/raw", "json_data": {"run": "{{body}}"}}
        )
        new_policy(client, block["id"], states=["Failed", "Crashed"])
        quiet = new_run(client)
        for state_type in ("PENDING", "RUNNING", "COMPLETED", "CANCELLED"):
            set_state(client, quiet["id"], state_type)
        failed, _ = fail_run(client)
        crashed = new_run(client)
        set_state(client, crashed["id"], "RUNNING")
        set_state(client, crashed["id"], "CRASHED", message="the worker died")
        hits = hook.wait_for(2)
        wait_queue_empty(client)  # a row leaves the queue only after its send was answered: no send is left
        bodies = [h.json()["run"] for h in hook.hits]
    assert len(bodies) == 2, bodies
    assert sum(failed["id"] in b for b in bodies) == 1
    assert sum(crashed["id"] in b and "Crashed" in b for b in bodies) == 1
    assert not any(quiet["id"] in b for b in bodies)
    assert len(hits) == 2


def test_state_names_match_the_state_name_not_its_type(tmp_path):
    """A Late run is SCHEDULED by type but named Late: a policy for "Scheduled" is not about it."""
    with (
        HTTPReceiver() as hook,
        running(tmp_path, PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_ENABLED=False) as (client, _),
    ):
        block = new_block(client, "slack-webhook", {"url": hook.url + "/hook"})
        scheduled_policy = new_policy(client, block["id"], states=["Scheduled"])
        late_policy = new_policy(client, block["id"], states=["Late"])
        run = new_run(client)
        state = set_state(client, run["id"], "SCHEDULED", name="Late")
        rows = queue(client)
    assert state["name"] == "Late"
    assert [r["flow_run_notification_policy_id"] for r in rows] == [late_policy["id"]], (rows, scheduled_policy)


def test_tags_select_which_runs_notify(tmp_path):
    with HTTPReceiver() as hook, running(tmp_path) as (client, api):
        tagged = new_block(
            client, "custom-webhook", {"name": "tagged", "url": hook.url + "/tagged", "json_data": {"run": "{{body}}"}}
        )
        everyone = new_block(
            client, "custom-webhook", {"name": "all", "url": hook.url + "/all", "json_data": {"run": "{{body}}"}}
        )
        new_policy(client, tagged["id"], tags=["daily-etl", "critical"])
        new_policy(client, everyone["id"], tags=[])
        match, _ = fail_run(client, tags=["daily-etl", "nightly"])
        match_other, _ = fail_run(client, tags=["critical"])
        no_match, _ = fail_run(client, tags=["weekly"])
        untagged, _ = fail_run(client, tags=[])
        hook.wait_for(6)
        wait_queue_empty(client)  # a row leaves the queue only after its send was answered: no send is left
        by_route = {}
        for hit in hook.hits:
            by_route.setdefault(hit.route, []).append(hit.json()["run"])
    tagged_runs = sorted(
        r["id"] for r in (match, match_other, no_match, untagged) if any(r["id"] in b for b in by_route["/tagged"])
    )
    assert tagged_runs == sorted([match["id"], match_other["id"]])
    assert len(by_route["/tagged"]) == 2
    assert len(by_route["/all"]) == 4
    for run in (match, match_other, no_match, untagged):
        assert sum(run["id"] in b for b in by_route["/all"]) == 1


def test_inactive_policies_send_nothing(tmp_path):
    with HTTPReceiver() as hook, running(tmp_path) as (client, api):
        block = new_block(
            client, "custom-webhook", {"name": "raw", "url": hook.url + "/raw", "json_data": {"run": "{{body}}"}}
        )
        created_paused = new_policy(client, block["id"], is_active=False)
        paused_later = new_policy(client, block["id"])
        assert client.patch(f"/flow_run_notification_policies/{paused_later['id']}", {"is_active": False})[0] == 204
        quiet, _ = fail_run(client)
        assert queue(client) == []
        assert client.patch(f"/flow_run_notification_policies/{paused_later['id']}", {"is_active": True})[0] == 204
        loud, _ = fail_run(client)
        [hit] = hook.wait_for(1)
        wait_queue_empty(client)  # a row leaves the queue only after its send was answered: no send is left
        assert len(hook.hits) == 1
        assert loud["id"] in hit.json()["run"] and quiet["id"] not in hit.json()["run"]
        assert client.ok("GET", f"/flow_run_notification_policies/{created_paused['id']}")["is_active"] is False


def test_queue_row_is_written_with_the_state(tmp_path):
    """The row is in the queue as soon as set_state has answered (same transaction), before any sending."""
    with running(tmp_path, PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_ENABLED=False) as (client, _api):
        block = new_block(client, "slack-webhook", {"url": "http://127.0.0.1:9/never"})
        policy = new_policy(client, block["id"])
        _run, state = fail_run(client)
        rows = queue(client)
    assert len(rows) == 1, rows
    assert rows[0]["flow_run_notification_policy_id"] == policy["id"]
    assert rows[0]["flow_run_state_id"] == state["id"]
    assert rows[0]["status"] == "PENDING"


# --- delivery: retries, failures, restarts, slow receivers, replicas ---------------------------------


def test_retried_after_receiver_errors_then_delivered_once(tmp_path):
    with (
        HTTPReceiver(script=[500, 503]) as hook,
        running(tmp_path, PREFECT_NOTIFICATIONS_MAX_ATTEMPTS=5) as (client, api),
    ):
        block = new_block(client, "slack-webhook", {"url": hook.url + "/hook"})
        new_policy(client, block["id"])
        run, state = fail_run(client)
        hook.wait_for(1, accepted=True)
        wait_queue_empty(client)  # a row leaves the queue only after its send was answered: no send is left
        statuses = [h.status for h in hook.hits]
        assert statuses == [500, 503, 200], statuses
        assert all(h.body == hook.hits[0].body for h in hook.hits)  # the same message each time
        assert sentence(run, state) in hook.hits[-1].json()["text"]
        assert queue(client, "FAILED") == []


def test_retries_follow_the_backoff_not_the_polling_interval(tmp_path):
    """The sender is woken by state changes and by its own retry timer, not by a slow poll."""
    with (
        HTTPReceiver(script=[500]) as hook,
        running(
            tmp_path,
            PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_LOOP_SECONDS=3600,
            PREFECT_NOTIFICATIONS_RETRY_SECONDS=0.2,
        ) as (client, api),
    ):
        block = new_block(client, "slack-webhook", {"url": hook.url + "/hook"})
        new_policy(client, block["id"])
        fail_run(client)
        hook.wait_for(1, timeout=20)  # the first attempt: woken by the state change
        hook.wait_for(1, accepted=True, timeout=20)  # the retry, 0.2 s later, not an hour later
        assert [h.status for h in hook.hits] == [500, 200]


def test_kept_as_failed_after_max_attempts(tmp_path):
    with (
        HTTPReceiver(status=500) as hook,
        running(tmp_path, PREFECT_NOTIFICATIONS_MAX_ATTEMPTS=3, PREFECT_NOTIFICATIONS_RETRY_SECONDS=0.1) as (
            client,
            api,
        ),
    ):
        block = new_block(client, "slack-webhook", {"url": hook.url + "/hook"})
        policy = new_policy(client, block["id"])
        _run, state = fail_run(client)
        # kept as FAILED once its last attempt was answered, and never claimed again: no fourth attempt
        rows = wait_until(lambda: queue(client, "FAILED"), what="a FAILED queue row")
        assert len(hook.hits) == 3
        assert len(rows) == 1
        row = rows[0]
        assert row["status"] == "FAILED"
        assert row["attempts"] == 3
        assert "500" in row["last_error"]
        assert row["flow_run_notification_policy_id"] == policy["id"]
        assert row["flow_run_state_id"] == state["id"]
        assert [r["id"] for r in queue(client)] == [row["id"]]
        assert queue(client, "PENDING") == []
        assert client.get("/flow_run_notification_queue/?status=failed")[1][0]["id"] == row["id"]


def test_the_backoff_stops_doubling_at_a_week(tmp_path):
    """After many failed attempts the doubled delay (0.1 s * 2**80) would pass the calendar's end: the
    sender stopped with an OverflowError and the row stayed SENDING. It waits a week at most."""
    with (
        HTTPReceiver(status=500) as hook,
        running(tmp_path, PREFECT_NOTIFICATIONS_MAX_ATTEMPTS=100, PREFECT_NOTIFICATIONS_RETRY_SECONDS=0.1) as (
            client,
            api,
        ),
    ):
        block = new_block(client, "slack-webhook", {"url": hook.url + "/hook"})
        new_policy(client, block["id"])
        fail_run(client)
        hook.wait_for(1, timeout=20)
        with contextlib.closing(sqlite3.connect(tmp_path / "notifications.db", timeout=30)) as db, db:
            db.execute("UPDATE flow_run_notification_queue SET attempts = 80")  # as after 80 failures
        hits = len(hook.hits)
        hook.wait_for(hits + 1, timeout=20)
        row = wait_until(
            lambda: [r for r in queue(client, "PENDING") if r["attempts"] >= 81], what="attempt 81 recorded"
        )[0]
        wait = (dt.datetime.fromisoformat(row["next_attempt_at"]) - dt.datetime.now(dt.timezone.utc)).total_seconds()
        assert 7 * 86400 - 60 < wait <= 7 * 86400, wait


def test_queue_survives_a_restart(tmp_path, refusing_port):
    db = f"sqlite:///{tmp_path}/restart.db"
    port = refusing_port.port  # nothing listens there until the second server runs
    with running(tmp_path, database=db, PREFECT_NOTIFICATIONS_MAX_ATTEMPTS=50) as (client, first_api):
        block = new_block(client, "slack-webhook", {"url": f"http://127.0.0.1:{port}/hook"})
        new_policy(client, block["id"])
        run, state = fail_run(client, run_name="patient-yak")
        rows = wait_until(
            lambda: [r for r in queue(client) if r["attempts"] >= 1 and r["last_error"]], what="a failed first attempt"
        )
        assert rows[0]["status"] == "PENDING"
    refusing_port.release()
    with HTTPReceiver(port=port) as hook, running(tmp_path, database=db) as (client, second_api):
        [hit] = hook.wait_for(1, accepted=True)
        wait_queue_empty(client)  # a row leaves the queue only after its send was answered: no send is left
        assert len(hook.hits) == 1
    text = hit.json()["text"]
    assert sentence(run, state) in text
    assert f"{server_root(second_api)}/flow-runs/flow-run/{run['id']}" in text  # a link that works now


def test_hanging_receiver_does_not_slow_state_changes(tmp_path):
    with HTTPReceiver() as hook, running(tmp_path) as (client, api):
        block = new_block(client, "slack-webhook", {"url": hook.url + "/hook"})
        new_policy(client, block["id"])
        hook.hold()  # every request waits (5 s at most) until released
        first, _ = fail_run(client)
        assert hook.entered.wait(20), "the sender never called the receiver"
        # the sender is now stuck in the receiver; state changes must not wait for it
        other = new_run(client)
        set_state(client, other["id"], "RUNNING")
        second_run, _ = fail_run(client)
        set_state(client, other["id"], "COMPLETED")
        assert hook.holding == 1, "set_state waited for the stuck notification"
        hook.release()
        hook.wait_for(2, accepted=True)
        wait_queue_empty(client)
        runs = [h.json()["text"] for h in hook.hits]
        assert sum(first["id"] in t for t in runs) == 1
        assert sum(second_run["id"] in t for t in runs) == 1


class ServerProcess:
    """`python prefectlite.py start` in a subprocess, output to files."""

    def __init__(self, tmp_path, env, name):
        self.port = free_port()
        self.err_path = tmp_path / f"{name}.err"
        self.out_path = tmp_path / f"{name}.out"
        self._err = open(self.err_path, "w")  # noqa: SIM115
        self._out = open(self.out_path, "w")  # noqa: SIM115
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT")}
        full_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "prefectlite.py"), "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=full_env,
            stdout=self._out,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
        )
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        if not wait_for_health(self.api_url, timeout=60):
            self.stop()
            raise AssertionError(f"server {name} did not start: {self.err_path.read_text()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._err.close()
        self._out.close()

    def log(self):
        return self.err_path.read_text() + self.out_path.read_text()


def test_two_servers_on_one_postgres_send_each_notification_once(tmp_path, postgres_url):
    env = {
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres_url,
        "PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_LOOP_SECONDS": "0.05",
        "PREFECT_NOTIFICATIONS_RETRY_SECONDS": "0.2",
    }
    servers = []
    with HTTPReceiver(delay=0.02) as hook:
        try:
            servers.append(ServerProcess(tmp_path, env, "a"))
            servers.append(ServerProcess(tmp_path, env, "b"))
            client = Client(servers[0].api_url)
            block = new_block(
                client, "custom-webhook", {"name": "raw", "url": hook.url + "/raw", "json_data": {"run": "{{body}}"}}
            )
            new_policy(client, block["id"])
            runs = [fail_run(client)[0] for _ in range(40)]
            hook.wait_for(40, timeout=60)
            wait_queue_empty(client, timeout=60)
            wait_queue_empty(Client(servers[1].api_url))
            time.sleep(1.0)  # a duplicate would arrive by now
            bodies = [h.json()["run"] for h in hook.hits]
        finally:
            for server in servers:
                server.stop()
    counts = {run["id"]: sum(run["id"] in b for b in bodies) for run in runs}
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    assert len(bodies) == 40


# --- secrets -----------------------------------------------------------------------------------------


def test_secrets_are_masked_on_read(tmp_path):
    secrets = {
        "slack-webhook": ({"url": "https://hooks.slack.com/services/T0/B0/SLACKSECRET"}, {"url": MASK}),
        "ms-teams-webhook": ({"url": "https://example.webhook.office.com/TEAMSSECRET"}, {"url": MASK}),
        "opsgenie-webhook": ({"apikey": "OPSGENIESECRET", "priority": "P2"}, {"apikey": MASK, "priority": "P2"}),
        "pager-duty-webhook": (
            {"integration_key": "PDROUTINGSECRET", "api_key": "PDAPISECRET", "source": "me"},
            {"integration_key": MASK, "api_key": MASK, "source": "me"},
        ),
        "twilio-sms": (
            {
                "account_sid": "AC1",
                "auth_token": "TWILIOSECRET",
                "from_phone_number": "+1555",
                "to_phone_numbers": ["+1666"],
            },
            {"account_sid": "AC1", "auth_token": MASK, "from_phone_number": "+1555", "to_phone_numbers": ["+1666"]},
        ),
        "custom-webhook": (
            {"name": "x", "url": "https://example.com/{{token}}", "secrets": {"token": "HOOKSECRET"}},
            {"name": "x", "url": "https://example.com/{{token}}", "secrets": {"token": MASK}},
        ),
        "email-smtp": (
            {
                "host": "smtp.example.com",
                "from_address": "a@example.com",
                "to_addresses": ["b@example.com"],
                "password": "SMTPSECRET",
            },
            {
                "host": "smtp.example.com",
                "from_address": "a@example.com",
                "to_addresses": ["b@example.com"],
                "password": MASK,
            },
        ),
    }
    with running(tmp_path) as (client, _api):
        for slug, (data, masked) in secrets.items():
            block = new_block(client, slug, data, name=f"my-{slug}")
            assert block["data"] == masked, slug
            assert client.ok("GET", f"/block_documents/{block['id']}")["data"] == masked, slug
            assert client.ok("GET", f"/block_types/slug/{slug}/block_documents/name/my-{slug}")["data"] == masked
            assert [d["data"] for d in client.ok("GET", f"/block_types/slug/{slug}/block_documents")] == [masked]
            assert client.ok("GET", f"/block_documents/{block['id']}?include_secrets=true")["data"] == data, slug
        everything = client.ok("POST", "/block_documents/filter", {})
        dumped = json.dumps(everything)
        for data, _masked in secrets.values():
            for value in json.dumps(data).split('"'):
                if "SECRET" in value:
                    assert value not in dumped, value
        revealed = json.dumps(client.ok("POST", "/block_documents/filter", {"include_secrets": True}))
        assert "SLACKSECRET" in revealed and "HOOKSECRET" in revealed


def test_masked_values_sent_back_keep_the_stored_secret(tmp_path):
    """The UI edits a block by sending its masked data back: the real secret must still be used."""
    with HTTPReceiver() as hook, running(tmp_path) as (client, _api):
        block = new_block(
            client,
            "custom-webhook",
            {
                "name": "raw",
                "url": hook.url + "/hook",
                "headers": {"X-Token": "{{token}}"},
                "json_data": {"body": "{{body}}"},
                "secrets": {"token": "KEEPME"},
            },
        )
        data = client.ok("GET", f"/block_documents/{block['id']}")["data"]
        assert data["secrets"] == {"token": MASK}
        data["json_data"] = {"text": "{{body}}"}
        assert client.patch(f"/block_documents/{block['id']}", {"data": data})[0] == 204
        policy = new_policy(client, block["id"])
        assert client.ok("POST", f"/flow_run_notification_policies/{policy['id']}/test") is not None
        [hit] = hook.wait_for(1)
    assert hit.headers["x-token"] == "KEEPME"
    assert "text" in hit.json()


def test_secrets_never_appear_in_the_server_log(tmp_path, refusing_port):
    secrets = [
        "SLACKSECRETPATH",
        "TEAMSSECRETPATH",
        "OPSGENIESECRETKEY",
        "PDROUTINGSECRETKEY",
        "PDAPISECRETKEY",
        "TWILIOSECRETTOKEN",
        "WEBHOOKSECRETTOKEN",
        "SMTPSECRETPASSWORD",
    ]
    ok, broken = HTTPReceiver(), HTTPReceiver(status=500)
    smtp = SMTPReceiver()
    dead_port = refusing_port.port
    server = None
    try:
        env = {
            "PREFECT_HOME": str(tmp_path / "home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite:///{tmp_path}/s.db",
            "PREFECT_LOGGING_SERVER_LEVEL": "DEBUG",
            "PREFECT_API_DATABASE_ECHO": "true",
            "PREFECT_NOTIFICATIONS_MAX_ATTEMPTS": "2",
            "PREFECT_NOTIFICATIONS_RETRY_SECONDS": "0.1",
            "PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_LOOP_SECONDS": "0.2",
            "PREFECT_NOTIFICATIONS_OPSGENIE_URL": broken.url,
            "PREFECT_NOTIFICATIONS_PAGERDUTY_URL": ok.url,
            "PREFECT_NOTIFICATIONS_TWILIO_URL": f"http://127.0.0.1:{dead_port}",
        }
        server = ServerProcess(tmp_path, env, "secrets")
        client = Client(server.api_url)
        blocks = [
            new_block(client, "slack-webhook", {"url": ok.url + "/services/SLACKSECRETPATH"}),
            new_block(client, "ms-teams-webhook", {"url": broken.url + "/TEAMSSECRETPATH"}),
            new_block(client, "opsgenie-webhook", {"apikey": "OPSGENIESECRETKEY"}),
            new_block(
                client, "pager-duty-webhook", {"integration_key": "PDROUTINGSECRETKEY", "api_key": "PDAPISECRETKEY"}
            ),
            new_block(
                client,
                "twilio-sms",
                {
                    "account_sid": "AC42",
                    "auth_token": "TWILIOSECRETTOKEN",
                    "from_phone_number": "+15550001111",
                    "to_phone_numbers": ["+15550002222"],
                },
            ),
            new_block(
                client,
                "custom-webhook",
                {
                    "name": "hook",
                    "url": broken.url + "/x/{{token}}",
                    "headers": {"Authorization": "Bearer {{token}}"},
                    "json_data": {"text": "{{body}}"},
                    "secrets": {"token": "WEBHOOKSECRETTOKEN"},
                },
            ),
            new_block(
                client,
                "email-smtp",
                {
                    "host": "127.0.0.1",
                    "port": smtp.port,
                    "security": "none",
                    "username": "mailer",
                    "password": "SMTPSECRETPASSWORD",
                    "from_address": "p@example.com",
                    "to_addresses": ["q@example.com"],
                },
            ),
        ]
        policies = [new_policy(client, b["id"]) for b in blocks]
        for policy in policies:  # the test route too: some succeed, some are refused
            assert client.post(f"/flow_run_notification_policies/{policy['id']}/test")[0] in (200, 502)
        fail_run(client)
        # slack, pagerduty, email deliver; teams, opsgenie, webhook (500) and twilio (unreachable) end FAILED
        wait_until(
            lambda: len(queue(client, "FAILED")) == 4 and len(queue(client)) == 4,
            timeout=60,
            what="four FAILED rows and nothing else queued",
        )
        assert len(ok.accepted()) == 4  # slack and pagerduty: the test message and the real one
        assert len(smtp.wait_for(2)) == 2
        api_text = json.dumps(
            [
                queue(client),
                client.ok("POST", "/block_documents/filter", {}),
                client.ok("POST", "/flow_run_notification_policies/filter", {}),
            ]
        )
    finally:
        if server is not None:
            server.stop()
        ok.close()
        broken.close()
        smtp.close()
    log = server.log()
    assert "notification" in log.lower()  # the log really was written, at DEBUG
    leaked = [s for s in secrets if s in log]
    assert not leaked, f"secrets in the server log: {leaked}"
    leaked = [s for s in secrets if s in api_text]
    assert not leaked, f"secrets in API responses: {leaked}"


def test_a_mistyped_secret_url_is_not_logged(tmp_path):
    """A webhook URL typed without its scheme fails to send; the failure must not reveal the URL (the secret)."""
    server = None
    try:
        env = {
            "PREFECT_HOME": str(tmp_path / "home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite:///{tmp_path}/m.db",
            "PREFECT_LOGGING_SERVER_LEVEL": "DEBUG",
            "PREFECT_NOTIFICATIONS_MAX_ATTEMPTS": "1",
        }
        server = ServerProcess(tmp_path, env, "mistyped")
        client = Client(server.api_url)
        block = new_block(client, "slack-webhook", {"url": "hooks.slack.com/services/T0/B0/MISTYPEDSECRET"})
        new_policy(client, block["id"])
        fail_run(client)
        rows = wait_until(lambda: queue(client, "FAILED"), what="the FAILED row")
    finally:
        if server is not None:
            server.stop()
    assert rows[0]["last_error"]
    assert "MISTYPEDSECRET" not in server.log(), "the secret URL is in the server log"
    assert "MISTYPEDSECRET" not in json.dumps(rows), "the secret URL is readable in the queue's last_error"


def test_a_url_with_a_space_fails_without_logging_its_secret(tmp_path):
    """http.client refuses a URL with a space (InvalidURL, quoting the URL): the send fails like any other,
    naming the host only, and neither the log, the test route's answer nor the queue shows the path."""
    server = None
    try:
        env = {
            "PREFECT_HOME": str(tmp_path / "home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite:///{tmp_path}/u.db",
            "PREFECT_LOGGING_SERVER_LEVEL": "DEBUG",
            "PREFECT_NOTIFICATIONS_MAX_ATTEMPTS": "1",
        }
        server = ServerProcess(tmp_path, env, "spaced")
        client = Client(server.api_url)
        block = new_block(client, "slack-webhook", {"url": "http://127.0.0.1:9/services/T0/B0/SPACEDSECRET TOKEN"})
        policy = new_policy(client, block["id"])
        status, body = client.post(f"/flow_run_notification_policies/{policy['id']}/test")
        assert status == 502, body
        assert "127.0.0.1" in json.dumps(body)
        fail_run(client)
        rows = wait_until(lambda: queue(client, "FAILED"), timeout=20, what="the FAILED row")
    finally:
        if server is not None:
            server.stop()
    assert "127.0.0.1" in rows[0]["last_error"]
    text = json.dumps([body, rows]) + server.log()
    assert "SPACEDSECRET" not in text, "the secret URL leaked"
    assert "Traceback" not in server.log()


# --- the test route ----------------------------------------------------------------------------------


def test_send_a_test_notification(tmp_path, refusing_port):
    with HTTPReceiver() as good, HTTPReceiver(status=500) as bad, running(tmp_path) as (client, api):
        good_block = new_block(client, "slack-webhook", {"url": good.url + "/hook"})
        bad_block = new_block(client, "slack-webhook", {"url": bad.url + "/hook"})
        policy = new_policy(client, good_block["id"])
        status, _body = client.post(f"/flow_run_notification_policies/{policy['id']}/test")
        assert status == 200
        [hit] = good.wait_for(1)
        assert hit.path == "/hook" and hit.json()["text"]

        refused = new_policy(client, bad_block["id"])
        status, body = client.post(f"/flow_run_notification_policies/{refused['id']}/test")
        assert status == 502, body
        assert "500" in json.dumps(body)  # the reason

        dead_block = new_block(client, "slack-webhook", {"url": f"http://127.0.0.1:{refusing_port.port}/hook"})
        dead = new_policy(client, dead_block["id"])
        status, body = client.post(f"/flow_run_notification_policies/{dead['id']}/test")
        assert status == 502, body
        assert json.dumps(body) != "null"

        assert client.post(f"/flow_run_notification_policies/{uuid.uuid4()}/test")[0] == 404
        assert queue(client) == []  # a test message is sent now, not queued


# --- the CLI -----------------------------------------------------------------------------------------


def test_cli_notification_commands(tmp_path):
    with HTTPReceiver() as slack, running(tmp_path) as (client, api):
        new_block(client, "slack-webhook", {"url": slack.url + "/services/cli"}, name="my-hook")
        env = {"PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "cli-home")}

        result = run_cli("notification", "ls", env=env)
        assert result.returncode == 0, result.stderr

        result = run_cli(
            "notification",
            "create",
            "--state",
            "Failed",
            "--tag",
            "daily-etl",
            "--block",
            "slack-webhook/my-hook",
            env=env,
        )
        assert result.returncode == 0, result.stderr
        [policy_id] = UUID_RE.findall(result.stdout)
        policy = client.ok("GET", f"/flow_run_notification_policies/{policy_id}")
        assert policy["state_names"] == ["Failed"] and policy["tags"] == ["daily-etl"] and policy["is_active"] is True

        result = run_cli("notification", "ls", env=env)
        assert result.returncode == 0, result.stderr
        line = next(line for line in result.stdout.splitlines() if policy_id in line)
        assert "daily-etl" in line and "failed" in line.lower() and "slack-webhook/my-hook" in line, result.stdout

        # it works: a failing daily-etl run notifies the block
        run, state = fail_run(client, tags=["daily-etl"])
        [hit] = slack.wait_for(1)
        assert hit.path == "/services/cli" and sentence(run, state) in hit.json()["text"]

        result = run_cli("notification", "pause", policy_id, env=env)
        assert result.returncode == 0, result.stderr
        assert client.ok("GET", f"/flow_run_notification_policies/{policy_id}")["is_active"] is False
        result = run_cli("notification", "resume", policy_id, env=env)
        assert result.returncode == 0, result.stderr
        assert client.ok("GET", f"/flow_run_notification_policies/{policy_id}")["is_active"] is True
        result = run_cli("notification", "delete", policy_id, env=env)
        assert result.returncode == 0, result.stderr
        assert client.get(f"/flow_run_notification_policies/{policy_id}")[0] == 404
        assert policy_id not in run_cli("notification", "ls", env=env).stdout

        result = run_cli("notification", "create", "--state", "Failed", "--block", "slack-webhook/nope", env=env)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr


# --- delivery history ------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_each_delivery_attempt_is_kept_per_policy(tmp_path, request, dialect):
    """Every attempt (time, destination, status or error, attempt number) is kept per policy, newest first:
    an operator sees what was sent where. Prefect keeps none."""
    database = request.getfixturevalue("postgres_url") if dialect == "postgres" else None
    with (
        HTTPReceiver(script=[500]) as hook,
        running(tmp_path, database=database, PREFECT_NOTIFICATIONS_MAX_ATTEMPTS=5) as (client, api),
    ):
        block = new_block(client, "slack-webhook", {"url": hook.url + "/hook"}, name=f"ops-{uuid.uuid4().hex[:6]}")
        policy = new_policy(client, block["id"])
        other = new_policy(client, block["id"], states=("Crashed",))
        run, _state = fail_run(client)
        hook.wait_for(1, accepted=True)
        wait_queue_empty(client)
        history = client.ok("GET", f"/flow_run_notification_policies/{policy['id']}/deliveries")
        assert [(d["attempt"], d["status"]) for d in history] == [(2, "SENT"), (1, "RETRYING")]
        assert "500" in history[1]["error"] and history[0]["error"] is None
        assert all(d["destination"] == f"{block['name']} (Slack Webhook)" for d in history)
        assert all(d["flow_run_id"] == run["id"] and d["state_name"] == "Failed" for d in history)
        assert history[0]["created"] >= history[1]["created"]
        assert client.ok("GET", f"/flow_run_notification_policies/{other['id']}/deliveries") == []
        page = client.ok("GET", f"/flow_run_notification_policies/{policy['id']}/deliveries?limit=1&offset=1")
        assert [d["id"] for d in page] == [history[1]["id"]]
        assert client.get(f"/flow_run_notification_policies/{policy['id']}/deliveries?limit=0")[0] == 422
        assert client.get(f"/flow_run_notification_policies/{uuid.uuid4()}/deliveries")[0] == 404
        client.ok("DELETE", f"/flow_run_notification_policies/{policy['id']}")
