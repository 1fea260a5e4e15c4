"""WebSockets (section 23): RFC 6455 handshake and framing, checked with a raw socket client written
here (masking, fragmentation, ping/pong, close codes, the size limit), then the Prefect 3 event
endpoints' in-band auth, /events/in storing and /events/out streaming, and shutdown with sockets open."""

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
import urllib.parse
import uuid

import pytest

from helpers import Client, RawWebSocket, event, migrated_sqlite_url, wait_subscribed, wait_until

import prefectlite

RFC_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def wait_for_events(client, count, flt=None, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        page = client.ok("POST", "/events/filter", {"filter": flt or {}})
        if page["total"] >= count or time.monotonic() > deadline:
            return page
        time.sleep(0.05)


@pytest.fixture
def small_server(tmp_path):
    with prefectlite.serve(
        database=f"sqlite:///{tmp_path}/ws.db", PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES=4096
    ) as api:
        yield api


# ---------------------------------------------------------------------------------------------
# the handshake


def test_accept_key_is_the_rfc_example():
    assert prefectlite.websocket_accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_handshake_answers_101_with_accept_key_and_subprotocol(server):
    ws = RawWebSocket(server)
    try:
        assert ws.status == 101
        assert ws.headers["upgrade"].lower() == "websocket"
        assert "upgrade" in ws.headers["connection"].lower()
        expected = base64.b64encode(hashlib.sha1((ws.key + RFC_GUID).encode()).digest()).decode()
        assert ws.headers["sec-websocket-accept"] == expected
        assert ws.headers["sec-websocket-protocol"] == "prefect"
    finally:
        ws.close()


def test_handshake_without_subprotocol_is_accepted_without_one_when_auth_is_off(server):
    ws = RawWebSocket(server, protocols=())
    try:
        assert ws.status == 101 and "sec-websocket-protocol" not in ws.headers
        ws.send_json(event())  # legacy mode: no auth message, events straight away
        assert wait_for_events(Client(server), 1)["total"] == 1
    finally:
        ws.close()


@pytest.mark.parametrize(
    "change, status",
    [
        ({"Sec-WebSocket-Version": "8"}, 426),
        ({"Sec-WebSocket-Key": "too-short"}, 400),
        ({"Connection": "keep-alive"}, 400),
    ],
)
def test_bad_handshakes_get_an_http_error(server, change, status):
    parts = urllib.parse.urlsplit(server)
    headers = {
        "Host": "x",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        **change,
    }
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            (
                f"GET {parts.path}/events/in HTTP/1.1\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                + "\r\n"
            ).encode()
        )
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(4096)
    assert reply.split()[1] == str(status).encode()
    if status == 426:
        assert b"Sec-WebSocket-Version: 13" in reply


def test_other_paths_are_not_websockets(server):
    ws = RawWebSocket(server, path="/health")
    assert ws.status == 200 and ws.body is True  # an ordinary request, the Upgrade header ignored
    ws.close()


# ---------------------------------------------------------------------------------------------
# framing


def test_masked_text_frames_carry_the_auth_exchange_and_events(server):
    ws = RawWebSocket(server)
    try:
        ws.authenticate()
        sent = event(name="test.masked")
        ws.send_json(sent)
        page = wait_for_events(Client(server), 1)
        assert [e["id"] for e in page["events"]] == [sent["id"]]
        assert page["events"][0]["event"] == "test.masked"
    finally:
        ws.close()


def test_fragmented_message_with_a_ping_in_between(server):
    ws = RawWebSocket(server)
    try:
        ws.authenticate()
        text = json.dumps(event(name="test.fragmented", payload={"blob": "x" * 300}))
        third = len(text) // 3
        ws.send_frame(0x1, text[:third], fin=False)
        ws.send_frame(0x9, b"mid")  # control frames may come between fragments
        assert ws.recv_frame() == (True, 0xA, b"mid")
        ws.send_frame(0x0, text[third : 2 * third], fin=False)
        ws.send_frame(0x0, text[2 * third :], fin=True)
        page = wait_for_events(Client(server), 1)
        assert page["events"][0]["event"] == "test.fragmented"
        assert page["events"][0]["payload"] == {"blob": "x" * 300}
    finally:
        ws.close()


def test_ping_gets_a_pong_with_the_same_payload(server):
    ws = RawWebSocket(server)
    try:
        ws.send_frame(0x9, b"are you there?")
        assert ws.recv_frame() == (True, 0xA, b"are you there?")
    finally:
        ws.close()


def test_long_message_lengths_16_and_64_bit(server):
    ws = RawWebSocket(server)
    try:
        ws.authenticate()
        medium = event(name="test.medium", payload={"blob": "m" * 1000})  # 16-bit length
        large = event(name="test.large", payload={"blob": "l" * 70_000})  # 64-bit length
        ws.send_json(medium)
        ws.send_json(large)
        page = wait_for_events(Client(server), 2)
        assert {e["event"] for e in page["events"]} == {"test.medium", "test.large"}
    finally:
        ws.close()


def test_unmasked_client_frame_closes_with_1002(server):
    ws = RawWebSocket(server)
    try:
        ws.send_frame(0x1, "hello", masked=False)
        assert ws.expect_close()[0] == 1002
        assert ws.at_eof()
    finally:
        ws.close()


@pytest.mark.parametrize(
    "frames",
    [
        [(0x0, b"no message started", True)],  # a continuation without a first fragment
        [(0x1, b"first", False), (0x1, b"second", True)],  # a new message inside a fragmented one
        [(0x3, b"reserved opcode", True)],
        [(0x9, b"p" * 126, True)],  # a control frame longer than 125 bytes
        [(0x9, b"fragmented ping", False)],
    ],
)
def test_protocol_errors_close_with_1002(server, frames):
    ws = RawWebSocket(server)
    try:
        for opcode, payload, fin in frames:
            ws.send_frame(opcode, payload, fin=fin)
        assert ws.expect_close()[0] == 1002
    finally:
        ws.close()


def test_reserved_bits_close_with_1002(server):
    ws = RawWebSocket(server)
    try:
        ws.send_frame(0x1, "compressed?", rsv=0x40)
        assert ws.expect_close()[0] == 1002
    finally:
        ws.close()


def test_oversize_message_closes_with_1009(small_server):
    ws = RawWebSocket(small_server)
    try:
        ws.authenticate()
        ws.send_text("x" * 5000)
        assert ws.expect_close()[0] == 1009
    finally:
        ws.close()


def test_oversize_fragmented_message_closes_with_1009(small_server):
    ws = RawWebSocket(small_server)
    try:
        ws.authenticate()
        for _ in range(4):
            ws.send_frame(0x1 if _ == 0 else 0x0, "y" * 1500, fin=False)
        assert ws.expect_close()[0] == 1009
    finally:
        ws.close()


def test_invalid_utf8_closes_with_1007(server):
    ws = RawWebSocket(server)
    try:
        ws.send_frame(0x1, b'{"type": "auth", "token": "\xff\xfe"}')
        assert ws.expect_close()[0] == 1007
    finally:
        ws.close()


def test_clean_close_is_echoed_then_the_connection_ends(server):
    ws = RawWebSocket(server)
    try:
        ws.authenticate()
        ws.send_frame(0x8, struct.pack(">H", 1000) + b"bye")
        assert ws.expect_close()[0] == 1000
        assert ws.at_eof()
    finally:
        ws.close()
    assert Client(server).get("/health") == (200, True)  # the worker is free again


def test_invalid_event_is_skipped_and_the_connection_stays(server):
    ws = RawWebSocket(server)
    try:
        ws.authenticate()
        ws.send_json({"event": "no id, resource or time"})
        ws.send_text("not json at all")
        # a number JSON has not (Python's json would read it): stored, it would break every later read
        ws.send_text(json.dumps(event(name="test.non-finite", payload={"x": float("nan")})))
        good = event(name="test.after-bad-ones")
        ws.send_json(good)
        ws.send_frame(0x9, b"checkpoint")  # the pong comes after the events before it were stored
        assert ws.recv_frame() == (True, 0xA, b"checkpoint")
        page = Client(server).ok("POST", "/events/filter", {})
        assert [e["id"] for e in page["events"]] == [good["id"]]
    finally:
        ws.close()


def test_a_resent_event_is_stored_once(server):
    ws = RawWebSocket(server)
    try:
        ws.authenticate()
        same = event(name="test.resent")
        ws.send_json(same)
        ws.send_json(same)
        ws.send_frame(0x9, b"sync")
        assert ws.recv_frame()[1] == 0xA
        assert Client(server).ok("POST", "/events/filter", {})["total"] == 1
    finally:
        ws.close()


# ---------------------------------------------------------------------------------------------
# in-band auth (the Prefect 3 client's handshake)


@pytest.fixture
def auth_server(tmp_path):
    with prefectlite.serve(
        database=f"sqlite:///{tmp_path}/auth.db", PREFECT_SERVER_API_AUTH_STRING="admin:pa55"
    ) as api:
        yield api


def test_auth_token_is_checked(auth_server):
    ws = RawWebSocket(auth_server)  # no Authorization header: the subscriber never sends one
    try:
        assert ws.status == 101
        ws.authenticate("admin:pa55")
    finally:
        ws.close()
    for token, reason in (("admin:wrong", "Invalid token"), (None, "Auth required but no token provided")):
        ws = RawWebSocket(auth_server)
        try:
            ws.send_json({"type": "auth", "token": token})
            assert ws.expect_close() == (1008, reason)
        finally:
            ws.close()


def test_without_the_prefect_subprotocol_auth_cannot_be_skipped(auth_server):
    ws = RawWebSocket(auth_server, protocols=())
    assert ws.status == 403
    ws.close()


def test_first_message_must_be_auth(server):
    ws = RawWebSocket(server)
    try:
        ws.send_json(event())
        assert ws.expect_close() == (1008, "Expected 'auth' message")
    finally:
        ws.close()


# ---------------------------------------------------------------------------------------------
# /events/out


def test_subscriber_gets_backfill_then_live_events_that_match_its_filter(server):
    client = Client(server)
    client.ok("POST", "/events", [event(name="test.sub.before"), event(name="other.before")])
    sub = RawWebSocket(server, path="/events/out").authenticate()
    pub = RawWebSocket(server).authenticate()
    try:
        sub.send_json({"type": "filter", "filter": {"event": {"prefix": ["test.sub."]}}})
        first = sub.recv_json()
        assert first["type"] == "event" and first["event"]["event"] == "test.sub.before"
        pub.send_json(event(name="other.live"))
        pub.send_json(event(name="test.sub.live", payload={"n": 1}))
        live = sub.recv_json()["event"]
        assert live["event"] == "test.sub.live" and live["payload"] == {"n": 1} and live["received"]
        sub.send_frame(0x9, b"still there")  # the pusher and the reader share the socket
        assert sub.recv_frame() == (True, 0xA, b"still there")
    finally:
        pub.close()
        sub.close()


def test_subscriber_without_backfill_sees_only_new_events(server):
    client = Client(server)
    client.ok("POST", "/events", [event(name="test.old")])
    sub = RawWebSocket(server, path="/events/out").authenticate()
    try:
        sub.send_json({"type": "filter", "filter": {}, "backfill": False})
        probe = wait_subscribed(sub, lambda: client.ok("POST", "/events", [event(name="test.probe")]))
        names = [probe["event"]["event"]]
        client.ok("POST", "/events", [event(name="test.new")])
        while names[-1] != "test.new":
            names.append(sub.recv_json()["event"]["event"])
        assert set(names) == {"test.probe", "test.new"}, names  # and never test.old
    finally:
        sub.close()


def test_subscriber_must_send_a_filter(server):
    sub = RawWebSocket(server, path="/events/out").authenticate()
    try:
        sub.send_json({"type": "subscribe"})
        assert sub.expect_close() == (1002, "Expected 'filter' message")
    finally:
        sub.close()


# ---------------------------------------------------------------------------------------------
# /logs/out


def test_log_subscriber_is_served_and_sent_nothing_as_by_prefects_default(server):
    """/logs/out (Prefect 3's log subscribers: `prefect flow-run watch` opens one beside /events/out) was a
    404, so the watch gave up at once and read the run's state early. Prefect's server takes the auth
    exchange and a filter there and keeps the socket open, sending logs only with its log stream settings
    on (off by default): nothing, even for a matching log written meanwhile."""
    client = Client(server)
    run_id = client.ok("POST", "/flow_runs/", {"flow_id": client.ok("POST", "/flows/", {"name": "logs-out"})["id"]})[
        "id"
    ]
    sub = RawWebSocket(server, path="/logs/out")
    try:
        assert sub.status == 101
        sub.authenticate()
        sub.send_json({"type": "filter", "filter": {"flow_run_id": {"any_": [run_id]}}})
        log = {"name": "t", "level": 20, "message": "hello", "timestamp": "2026-01-01T00:00:00Z", "flow_run_id": run_id}
        client.ok("POST", "/logs/", [log])
        sub.send_frame(0x9, b"still open")  # the next frame is the pong: no log came before it
        assert sub.recv_frame() == (True, 0xA, b"still open")
    finally:
        sub.close()
    for message, reason in (({"type": "subscribe"}, "Expected 'filter' message"), ({"type": "filter"}, None)):
        sub = RawWebSocket(server, path="/logs/out").authenticate()
        try:
            sub.send_json(message)
            code, text = sub.expect_close()
            assert code == 1002 and (reason is None or text == reason), (code, text)
        finally:
            sub.close()


LOG_STREAM_ON = {"PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": True, "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": True}


@pytest.fixture
def log_stream_server(tmp_path):
    """A server with Prefect's two log stream settings on (both off by default)."""
    with prefectlite.serve(database=migrated_sqlite_url(tmp_path / "logs.db"), port=0, **LOG_STREAM_ON) as api:
        yield api


def a_log(message, run_id, level=20, timestamp=None, task_run_id=None):
    moment = timestamp or prefectlite.now_iso()
    return {"name": "t", "level": level, "message": message, "timestamp": moment, "flow_run_id": run_id,
            "task_run_id": task_run_id}  # fmt: skip


def subscribe_to_logs(api, flt):
    """A /logs/out subscriber of `flt` whose filter the server has read: the first log a probe (a matching
    log, stored again until one arrives) brought is read from it."""
    client = Client(api)
    sub = RawWebSocket(api, path="/logs/out").authenticate()
    sub.send_json({"type": "filter", "filter": flt})
    probe = wait_subscribed(sub, lambda: client.ok("POST", "/logs/", [a_log("probe", flt["flow_run_id"]["any_"][0])]))
    assert probe == {"type": "log", "log": {**probe["log"], "message": "probe"}}, probe
    return sub


def test_log_stream_sends_a_subscriber_the_logs_its_filter_matches_as_they_are_stored(log_stream_server):
    """With PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED and ..._PUBLISHING_ENABLED on, Prefect's server sends a
    /logs/out subscriber {"type": "log", "log": Log} for each log stored after it subscribed that its filter
    matches on level, timestamp, flow_run_id and task_run_id (as the 3.9 SDK's subscriber filters: from a
    minute ago on); created and updated go as null, as there. Before, nothing was ever sent."""
    client = Client(log_stream_server)
    run_id, other_run, task_run = (str(uuid.uuid4()) for _ in range(3))
    now = prefectlite.utcnow()
    flt = {
        "flow_run_id": {"any_": [run_id]},
        "task_run_id": {"is_null_": True},
        "level": {"ge_": 20, "le_": 40},
        "timestamp": {"after_": prefectlite.iso(now - dt.timedelta(minutes=1)),
                      "before_": prefectlite.iso(now + dt.timedelta(days=365))},
    }  # fmt: skip
    sub = subscribe_to_logs(log_stream_server, flt)
    try:
        client.ok(
            "POST",
            "/logs/",
            [
                a_log("wanted", run_id),
                a_log("debug", run_id, level=10),
                a_log("critical", run_id, level=50),
                a_log("another run's", other_run),
                a_log("a task run's", run_id, task_run_id=task_run),
                a_log("old", run_id, timestamp="2020-01-01T00:00:00Z"),
                a_log("wanted too", run_id, level=40),
            ],
        )
        got = [sub.recv_json()]
        while got[-1]["log"]["message"] != "wanted too":
            got.append(sub.recv_json())
        messages = [m["log"]["message"] for m in got]
        assert [m for m in messages if m != "probe"] == ["wanted", "wanted too"], messages
        stored = client.ok("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}, "level": {"ge_": 40}}})
        wanted_too = next(m for m in got if m["log"]["message"] == "wanted too")
        assert wanted_too == {
            "type": "log",
            "log": {**stored[-1], "created": None, "updated": None},
        }, (wanted_too, stored)
        assert set(wanted_too["log"]) == {"id", "created", "updated", "name", "level", "message", "timestamp",
                                          "flow_run_id", "task_run_id"}  # fmt: skip
    finally:
        sub.close()


def test_log_stream_sends_every_subscriber_its_own_logs(log_stream_server):
    client = Client(log_stream_server)
    runs = [str(uuid.uuid4()) for _ in range(2)]
    subs = [subscribe_to_logs(log_stream_server, {"flow_run_id": {"any_": [run]}}) for run in runs]
    try:
        client.ok("POST", "/logs/", [a_log(f"for {run}", run) for run in runs] + [a_log("done", run) for run in runs])
        for sub, run in zip(subs, runs):
            got = [sub.recv_json()["log"]]
            while got[-1]["message"] != "done":
                got.append(sub.recv_json()["log"])
            assert [log["message"] for log in got if log["message"] != "probe"] == [f"for {run}", "done"]
            assert {log["flow_run_id"] for log in got} == {run}
    finally:
        for sub in subs:
            sub.close()


@pytest.mark.parametrize("setting", sorted(LOG_STREAM_ON))
def test_log_stream_needs_both_settings(tmp_path, setting):
    """One of the two alone streams nothing, as on Prefect's server (publishing hands the logs to its message
    broker; the out setting runs the distributor that takes them from there to the subscribers)."""
    with prefectlite.serve(database=migrated_sqlite_url(tmp_path / "one.db"), port=0, **{setting: True}) as api:
        run_id = str(uuid.uuid4())
        sub = RawWebSocket(api, path="/logs/out").authenticate()
        try:
            sub.send_json({"type": "filter", "filter": {}})
            for _ in range(3):  # the filter is read by the time a pong comes back
                Client(api).ok("POST", "/logs/", [a_log("hello", run_id)])
                sub.send_frame(0x9, b"ping")
                assert sub.recv_frame() == (True, 0xA, b"ping")
        finally:
            sub.close()


def test_log_stream_cuts_off_a_subscriber_that_falls_behind(log_stream_server, monkeypatch):
    """One whose backlog passes LOG_SUBSCRIBER_BACKLOG logs is closed with 1013 (the writers never wait for a
    subscriber); Prefect's client reconnects on it."""
    monkeypatch.setattr(prefectlite.LogsOut, "backlog", 3)
    run_id = str(uuid.uuid4())
    sub = subscribe_to_logs(log_stream_server, {"flow_run_id": {"any_": [run_id]}})
    try:
        Client(log_stream_server).ok("POST", "/logs/", [a_log(f"log {n}", run_id) for n in range(10)])
        code = None
        while code is None:  # probes may come first
            fin, opcode, payload = sub.recv_frame()
            if opcode == 0x8:  # (1013 is a code only a server sends: parse_close_payload refuses it)
                code, reason = int.from_bytes(payload[:2], "big"), payload[2:].decode()
        assert (code, reason) == (1013, "subscriber fell too far behind")
    finally:
        sub.close()


@pytest.mark.parametrize(
    "flt", [{"level": {"ge_": "x"}}, {"flow_run_id": {"any_": ["not-a-uuid"]}}, {"timestamp": {"after_": "soon"}}]
)
def test_log_subscriber_with_a_malformed_filter_is_closed(server, flt):
    sub = RawWebSocket(server, path="/logs/out").authenticate()
    try:
        sub.send_json({"type": "filter", "filter": flt})
        code, reason = sub.expect_close()
        assert code == 1002 and reason.startswith("Invalid filter: "), (code, reason)
    finally:
        sub.close()


# ---------------------------------------------------------------------------------------------
# /task_runs/subscriptions/scheduled (task workers)

SUBSCRIPTIONS = "/task_runs/subscriptions/scheduled"


def background_run(client, task_key, deferred=True, flow_run_id=None):
    """A task run as the 3.x SDK's task.delay() creates it: Scheduled, deferred, no flow run."""
    body = {
        "task_key": task_key,
        "dynamic_key": os.urandom(4).hex(),
        "flow_run_id": flow_run_id,
        "state": {"type": "SCHEDULED", "state_details": {"deferred": deferred}},
    }
    return client.ok("POST", "/task_runs/", body)["id"]


def task_worker(server, *keys, client_id="worker", headers=None):
    ws = RawWebSocket(server, path=SUBSCRIPTIONS, headers=headers).authenticate()
    ws.send_json({"type": "subscribe", "keys": list(keys), "client_id": client_id})
    return ws


def test_task_worker_gets_its_keys_scheduled_background_runs_from_before_and_after_it_subscribed(server):
    client = Client(server)
    flow_run = client.ok("POST", "/flow_runs/", {"flow_id": client.ok("POST", "/flows/", {"name": "f"})["id"]})
    background_run(client, "other-key")
    background_run(client, "mine", deferred=False)  # a 3.x run that is not meant for a task worker
    background_run(client, "mine", deferred=False, flow_run_id=flow_run["id"])  # a flow's own task run
    client.ok(  # a 2.x flow's task run awaiting its retry: a 2.x state has no `deferred`
        "POST",
        "/task_runs/",
        {"task_key": "mine", "dynamic_key": "2x", "flow_run_id": flow_run["id"], "state": {"type": "SCHEDULED"}},
    )
    before = background_run(client, "mine")
    ws = task_worker(server, "mine", "also-mine")
    try:
        sent = ws.recv_json()
        assert sent["id"] == before and sent["task_key"] == "mine" and sent["flow_run_id"] is None
        assert sent["state"]["type"] == "SCHEDULED" and sent["state"]["state_details"]["deferred"] is True
        ws.send_json({"type": "ack"})
        after = background_run(client, "also-mine")
        assert ws.recv_json()["id"] == after  # and none of the three that are not its runs came first
        ws.send_json({"type": "ack"})
        ws.send_json({"type": "quit"})
        assert ws.expect_close()[0] == 1000
    finally:
        ws.close()


def test_a_3x_task_worker_gets_the_runs_labels_and_a_2x_one_the_2x_shape(server):
    """The 3.9 SDK's socket says who it is in the handshake's User-Agent, as its HTTP client does: it gets task
    runs as 3.x reads them (with `labels`), as Prefect 3.9 sends them; any other client the 2.20 shape."""
    client = Client(server, headers={"User-Agent": "prefect/3.9.1 (API 0.8.4)"})
    body = {"task_key": "labelled", "dynamic_key": "0", "labels": {"team": "data"}}
    body["state"] = {"type": "SCHEDULED", "state_details": {"deferred": True}}
    run = client.ok("POST", "/task_runs/", body)
    assert run["labels"] == {"team": "data"}
    ws = task_worker(server, "labelled", headers={"User-Agent": "prefect/3.9.1 (API 0.8.4)"})
    try:
        sent = ws.recv_json()
        assert (sent["id"], sent["labels"]) == (run["id"], {"team": "data"})
    finally:
        ws.close()  # unacknowledged: it goes to the next worker
    ws = task_worker(server, "labelled", client_id="another")
    try:
        sent = ws.recv_json()
        assert sent["id"] == run["id"] and "labels" not in sent
    finally:
        ws.close()


def test_a_run_delayed_inside_a_flow_goes_to_a_task_worker(server):
    """3.x: task.delay() inside a flow makes a deferred run that has the flow's run as its flow run; Prefect's
    server queues it for task workers all the same (it was never sent, and the flow waited for good)."""
    client = Client(server)
    flow_run = client.ok("POST", "/flow_runs/", {"flow_id": client.ok("POST", "/flows/", {"name": "f"})["id"]})
    delayed = background_run(client, "in-flow", flow_run_id=flow_run["id"])
    ws = task_worker(server, "in-flow")
    try:
        sent = ws.recv_json()
        assert (sent["id"], sent["flow_run_id"]) == (delayed, flow_run["id"])
    finally:
        ws.close()


def test_two_servers_on_one_database_deliver_each_run_once(tmp_path):
    """Replicas (or `start --processes N`) each look for scheduled runs in the database; a run acknowledged by
    one server's worker is still Scheduled while that worker is busy, and the other server must not send it
    again. Each worker takes runs until its own last run arrives: runs come oldest first, so one sent twice
    would come before it."""
    url = migrated_sqlite_url(tmp_path / "shared.db")
    with prefectlite.serve(database=url, port=0) as one, prefectlite.serve(database=url, port=0) as two:
        workers = {
            "a": task_worker(one, "k", "last-a", client_id="a"),
            "b": task_worker(two, "k", "last-b", client_id="b"),
        }
        received = {"a": [], "b": []}

        def take(name):
            while True:
                run = workers[name].recv_json()
                received[name].append(run["task_key"] if run["task_key"].startswith("last") else run["id"])
                workers[name].send_json({"type": "ack"})
                if run["task_key"] == f"last-{name}":
                    return

        threads = [threading.Thread(target=take, args=(name,), daemon=True) for name in workers]
        try:
            for thread in threads:
                thread.start()
            runs = [background_run(Client(one if i % 2 else two), "k") for i in range(6)]
            wait_until(lambda: len(received["a"]) + len(received["b"]) >= 6, what="six runs delivered")
            background_run(Client(one), "last-b")  # each worker's last run, written through the other server
            background_run(Client(two), "last-a")
            for thread in threads:
                thread.join(30)
            got = [run for name in ("a", "b") for run in received[name] if not run.startswith("last")]
            assert sorted(got) == sorted(runs), received  # each once
        finally:
            for ws in workers.values():
                ws.close()


def test_each_run_goes_to_one_worker_and_an_unacknowledged_one_to_the_next(server):
    one_worker_each_and_unacknowledged_to_the_next(server)


def test_task_workers_are_served_on_postgresql(postgres_url):
    with prefectlite.serve(database=postgres_url, port=0) as api:
        one_worker_each_and_unacknowledged_to_the_next(api)


def one_worker_each_and_unacknowledged_to_the_next(server):
    client = Client(server)
    first = background_run(client, "k")
    a = task_worker(server, "k", client_id="a")
    b = None
    try:
        assert a.recv_json()["id"] == first  # not acknowledged: a holds it
        b = task_worker(server, "k", client_id="b")
        second = background_run(client, "k")
        assert b.recv_json()["id"] == second  # a waits for its ack; the first is a's, not b's
        b.send_json({"type": "ack"})
        a.close()  # gone without acknowledging the first run
        assert b.recv_json()["id"] == first
        b.send_json({"type": "ack"})
        client.ok("POST", f"/task_runs/{first}/set_state", {"state": {"type": "PENDING"}})
        third = background_run(client, "k")
        assert b.recv_json()["id"] == third  # the acknowledged second run was not sent again
    finally:
        a.close()
        if b is not None:
            b.close()


def task_workers(client, body=None):
    return sorted(
        ((w["identifier"], sorted(w["task_keys"])) for w in client.ok("POST", "/task_workers/filter", body)),
    )


def test_task_workers_are_listed_by_client_id_and_filtered_by_task_key(server):
    """3.x: POST /task_workers/filter answers the connected task workers, one per client id with the keys of
    all its connections (Prefect 3.9's tracker does so); `task_keys` keeps those with any of them."""
    client = Client(server)
    assert client.ok("POST", "/task_workers/filter") == []
    before = prefectlite.utcnow()
    a = task_worker(server, "k1", "k2", client_id="A")
    b = task_worker(server, "k2", "k3", client_id="B")
    a_again = task_worker(server, "k4", client_id="A")  # a second connection of the same worker
    try:
        everyone = [("A", ["k1", "k2", "k4"]), ("B", ["k2", "k3"])]
        wait_until(lambda: task_workers(client) == everyone, what="both workers listed")
        listed = client.ok("POST", "/task_workers/filter", {"task_worker_filter": None})
        after = prefectlite.utcnow()
        for worker in listed:  # seen when asked: an idle worker is seen all the time
            assert before <= prefectlite.from_iso(prefectlite.parse_datetime(worker["timestamp"])) <= after, worker
        assert task_workers(client, {"task_worker_filter": {"task_keys": []}}) == everyone
        assert task_workers(client, {"task_worker_filter": {"task_keys": ["k2"]}}) == everyone
        assert task_workers(client, {"task_worker_filter": {"task_keys": ["k3", "nobody's"]}}) == everyone[1:]
        assert task_workers(client, {"task_worker_filter": {"task_keys": ["nobody's"]}}) == []
        a_again.close()  # the worker's keys are those of its connections still open
        wait_until(lambda: task_workers(client) == [("A", ["k1", "k2"]), ("B", ["k2", "k3"])], what="k4 gone")
        b.send_json({"type": "quit"})
        assert b.expect_close()[0] == 1000
        wait_until(lambda: task_workers(client) == [("A", ["k1", "k2"])], what="B gone")
    finally:
        for ws in (a, b, a_again):
            ws.close()
    wait_until(lambda: task_workers(client) == [], what="A gone")


def test_task_workers_of_every_server_on_the_database_are_listed(tmp_path):
    """Replicas (or `start --processes N`): each lists its task workers in the database, so any of them answers
    for all; a worker that hangs up, or whose server stops, is no longer listed."""
    task_workers_of_every_server_are_listed(migrated_sqlite_url(tmp_path / "shared.db"))


def test_task_workers_of_every_server_on_a_postgresql_database_are_listed(postgres_url):
    task_workers_of_every_server_are_listed(postgres_url)


def task_workers_of_every_server_are_listed(url):
    with prefectlite.serve(database=url, port=0) as two:
        with prefectlite.serve(database=url, port=0) as one:
            a = task_worker(one, "k1", client_id="A")
            b = task_worker(two, "k2", client_id="B")
            a_on_two = task_worker(two, "k3", client_id="A")
            c = task_worker(one, "k4", client_id="C")
            try:
                everyone = [("A", ["k1", "k3"]), ("B", ["k2"]), ("C", ["k4"])]
                for api in (one, two):
                    wait_until(lambda api=api: task_workers(Client(api)) == everyone, what=f"all listed by {api}")
                only_b = {"task_worker_filter": {"task_keys": ["k2"]}}
                assert task_workers(Client(one), only_b) == [("B", ["k2"])]
                a.close()
                wait_until(lambda: task_workers(Client(two)) == [("A", ["k3"]), *everyone[1:]], what="a unlisted")
            finally:
                for ws in (a, b, a_on_two):
                    ws.close()
        try:  # `one` stopped with C connected
            wait_until(lambda: task_workers(Client(two)) == [], what="C unlisted when its server stopped")
        finally:
            c.close()


def test_a_listing_removed_from_the_database_is_written_again(tmp_path, monkeypatch):
    """A server's listing of its workers that is gone from the database (`database reset`, the test plugin's
    clean database, or expired while its process stalled) is written again when it renews it."""
    monkeypatch.setattr(prefectlite, "TASK_WORKER_LISTING_SECONDS", 3.0)  # renewed every round (2 s)
    url = migrated_sqlite_url(tmp_path / "shared.db")
    with prefectlite.serve(database=url, port=0) as one, prefectlite.serve(database=url, port=0) as two:
        ws = task_worker(one, "k", client_id="A")
        try:
            wait_until(lambda: task_workers(Client(two)) == [("A", ["k"])], what="listed")
            db = prefectlite.open_database(url)
            try:
                with db.write() as tx:
                    tx.execute("DELETE FROM concurrency_lease")
            finally:
                db.close()
            wait_until(lambda: task_workers(Client(two)) == [("A", ["k"])], what="listed again")
        finally:
            ws.close()


def test_a_task_worker_filter_names_its_keys_in_a_list(server):
    client = Client(server)
    for bad, loc in [
        ({"task_worker_filter": {}}, ["body", "task_worker_filter", "task_keys"]),
        ({"task_worker_filter": {"task_keys": {"any_": ["k"]}}}, ["body", "task_worker_filter", "task_keys"]),
        ({"task_worker_filter": {"task_keys": [1]}}, ["body", "task_worker_filter", "task_keys", 0]),
    ]:
        status, answer = client.request("POST", "/task_workers/filter", bad)
        assert status == 422 and [e["loc"] for e in answer["exception_detail"]] == [loc], (bad, answer)


def test_a_subscription_logs_how_many_keys_and_names_only_the_first_few(server, caplog):
    keys = [f"key-{i}" for i in range(1000)]
    with caplog.at_level(logging.INFO, logger="prefectlite"):
        ws = task_worker(server, *keys, client_id="many")
        try:
            lines = wait_until(
                lambda: [r.getMessage() for r in caplog.records if "'many' subscribed" in r.getMessage()],
                what="the subscription logged",
            )
        finally:
            ws.close()
    assert len(lines) == 1 and "1000 task keys" in lines[0] and "'key-0'" in lines[0], lines
    assert "'key-5'" not in lines[0] and "995 more" in lines[0] and len(lines[0]) < 200, lines


@pytest.mark.parametrize(
    "message, reason",
    [
        ({"type": "filter"}, "Protocol violation: expected 'subscribe' message"),
        (
            {"type": "subscribe", "keys": [], "client_id": "c"},
            "Protocol violation: expected 'keys' in subscribe message",
        ),
        ({"type": "subscribe", "keys": ["k"]}, "Protocol violation: expected 'client_id' in subscribe message"),
    ],
)
def test_task_worker_must_subscribe_with_keys_and_a_client_id(server, message, reason):
    ws = RawWebSocket(server, path=SUBSCRIPTIONS).authenticate()
    try:
        ws.send_json(message)
        assert ws.expect_close() == (4001, reason)
    finally:
        ws.close()


# ---------------------------------------------------------------------------------------------
# shutdown


def test_open_websockets_do_not_block_shutdown(tmp_path):
    context = prefectlite.serve(database=f"sqlite:///{tmp_path}/stop.db")
    api = context.__enter__()
    idle_in = RawWebSocket(api).authenticate()
    idle_out = RawWebSocket(api, path="/events/out").authenticate()
    idle_out.send_json({"type": "filter", "filter": {}})
    stopped = threading.Event()

    def stop():
        context.__exit__(None, None, None)
        stopped.set()

    started = time.monotonic()
    threading.Thread(target=stop, daemon=True).start()
    try:
        assert stopped.wait(8), "server.stop() hung on open WebSockets"
        assert time.monotonic() - started < 8
        for ws in (idle_in, idle_out):
            code, _ = ws.expect_close()
            assert code == 1001
    finally:
        idle_in.close()
        idle_out.close()
