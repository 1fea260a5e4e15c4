"""The connection loop (section 25): what a slow, busy or hostile client can and cannot do to the others.

Each test here reproduces one way the old front end (a thread per connection on http.server) gave way,
with raw sockets against a real server; the outcome (an answer, a status, a close code) shows the fix,
never a timing bound.
"""

import base64
import contextlib
import datetime as dt
import json
import os
import select
import socket
import threading
import time
import urllib.parse

import pytest

import prefectlite
from helpers import Client, RawWebSocket, event, iso, now, wait_until

AUTH = "admin:pw"


def host_port(api_url):
    parts = urllib.parse.urlsplit(api_url)
    return parts.hostname, parts.port


def connect(api_url, timeout=10.0):
    return socket.create_connection(host_port(api_url), timeout=timeout)


def read_response(sock, timeout=10.0, leftover=None):
    """(status, headers, body) of one response on `sock`, read by its Content-Length. Pass the same
    `leftover` bytearray to read several pipelined answers: what one read took of the next is kept there."""
    sock.settimeout(timeout)
    data = bytes(leftover or b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed after {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("closed inside a body")
        rest += chunk
    if leftover is not None:
        leftover[:] = rest[length:]
    return int(status_line.split()[1]), headers, rest[:length]


def closed_by_server(sock, timeout=10.0) -> bool:
    """Does the server close the connection (rather than wait for more)? Reads and drops what comes."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


@pytest.fixture
def start(tmp_path):
    """start(**settings) -> API URL of a server with those settings, stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start_one(**settings):
            name = f"c{len(stack._exit_callbacks)}.db"
            return stack.enter_context(prefectlite.serve(database=f"sqlite:///{tmp_path}/{name}", **settings))

        yield start_one


def write_flow(api_url, name, timeout=5.0):
    status, flow = Client(api_url, timeout=timeout).post("/flows/", {"name": name})
    assert status == 201, flow
    return flow


# --- one slow client holds up no one ---------------------------------------------------------------


def test_a_bare_lf_request_whose_body_trickles_does_not_stop_other_writes(server):
    """Bare-LF line endings and a body beginning with CRLFCRLF once passed for "arrived whole", and the
    body was then read inside the one-writer section: every other write waited on this client."""
    with connect(server) as slow:
        slow.sendall(
            b"POST /api/flows/ HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: 60\n\n\r\n\r\n{"
        )
        for i in range(5):
            write_flow(server, f"beside-a-bare-lf-trickle-{i}")


def test_the_request_timeout_bounds_the_whole_request_not_each_read(start):
    """A client sending a byte every 0.2 s used to be allowed for ever (the timeout bounded each recv)."""
    api = start(PREFECT_SERVER_REQUEST_TIMEOUT=1.0)
    with connect(api) as slow:
        slow.sendall(b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        answered = threading.Event()
        result = {}

        def read():
            with contextlib.suppress(OSError, EOFError):
                result["response"] = read_response(slow, timeout=30)
            answered.set()

        threading.Thread(target=read, daemon=True).start()
        for _ in range(150):  # 30 s of trickling at most: the server answers long before
            if answered.wait(0.2):
                break
            with contextlib.suppress(OSError):
                slow.send(b" ")
        assert answered.is_set() and result["response"][0] == 408, result


@pytest.mark.parametrize("kind", ["idle keep-alive", "slow request line", "slow headers", "slow body", "websocket"])
def test_more_waiting_connections_than_workers_do_not_stall_the_server(start, kind):
    """With 4 worker threads, 12 connections of one kind used to take every thread: /health and writes
    waited. Waiting connections now hold no thread."""
    api = start(PREFECT_SERVER_WORKERS=4)
    held = []
    try:
        for _ in range(12):
            if kind == "websocket":
                held.append(RawWebSocket(api).authenticate())
                continue
            sock = connect(api)
            held.append(sock)
            if kind == "idle keep-alive":
                sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(sock)[0] == 200
            elif kind == "slow request line":
                sock.sendall(b"GET /api/hea")
            elif kind == "slow headers":
                sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            else:
                sock.sendall(b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{")
        assert Client(api, timeout=5).get("/health") == (200, True)
        write_flow(api, f"beside-{kind.replace(' ', '-')}")
    finally:
        for item in held:
            item.close()


# --- bodies and framing ---------------------------------------------------------------------------


def test_a_negative_chunk_size_is_refused_at_once(start):
    """`-1` was taken by int(line, 16), and the body then read to the end of the stream, past any limit."""
    api = start(PREFECT_SERVER_MAX_BODY_BYTES=1000)
    with connect(api) as sock:
        sock.sendall(b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n" + b"x" * 5000)
        status, headers, body = read_response(sock)
        assert (status, json.loads(body)["detail"], headers["connection"]) == (400, "Malformed chunk size", "close")


def test_a_chunked_body_past_the_limit_is_413_before_it_is_read(start):
    api = start(PREFECT_SERVER_MAX_BODY_BYTES=1000)
    with connect(api) as sock:
        sock.sendall(b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n")
        status, _headers, body = read_response(sock)
        assert status == 413 and "larger than 1000 bytes" in json.loads(body)["detail"]
        assert closed_by_server(sock)


SMUGGLING = {
    "content-length and chunked": b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "a coding other than chunked": b"Transfer-Encoding: gzip\r\n\r\n",
    "chunked after another coding": b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "chunked twice": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "a chunk size with a sign": b"Transfer-Encoding: chunked\r\n\r\n+0\r\n\r\n",
    "a chunk size with 0x": b"Transfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
    "a chunk size with an underscore": b"Transfer-Encoding: chunked\r\n\r\n0_0\r\n\r\n",
    "a chunk longer than its size": b"Transfer-Encoding: chunked\r\n\r\n1\r\n{}\r\n0\r\n\r\n",
    "a content length with a sign": b"Content-Length: +2\r\n\r\n{}",
    "two content lengths in one field": b"Content-Length: 2, 2\r\n\r\n{}",
}


@pytest.mark.parametrize("framing", list(SMUGGLING.values()), ids=list(SMUGGLING))
def test_a_body_that_could_be_read_two_ways_is_400_and_closes(server, framing):
    """RFC 9112, 6.1 and 6.3: a server must not guess; the next request must not be read from the body."""
    smuggled = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\n" + framing + smuggled)
        status, headers, body = read_response(sock)
        assert status == 400 and json.loads(body)["detail"] and headers["connection"] == "close"
        rest = b""
        with contextlib.suppress(OSError):
            sock.settimeout(5)
            while chunk := sock.recv(65536):
                rest += chunk
        assert b"HTTP/1.1" not in rest, "a second answer: the body was read as a request"


def test_a_header_section_without_end_is_refused_without_reading_it_all(server):
    """1,000 folded 64 KB lines once cost 21 s of CPU and hundreds of MB: the head is bounded."""
    with connect(server) as sock:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(OSError):
            for _ in range(40):  # 2.5 MB if it were all taken
                sock.sendall(b"X-Fill: " + b"a" * 64_000 + b"\r\n")
        status, _headers, body = read_response(sock)
        assert status == 431 and json.loads(body)["detail"] in ("Line too long", "Header section too large")


def test_an_unauthenticated_body_is_never_read(start):
    """401 on the head alone: a client that announces 47 MB and sends none of it still gets its answer
    (the body used to be buffered whole first: 20 such clients, 933 MB)."""
    api = start(PREFECT_SERVER_API_AUTH_STRING=AUTH)
    with connect(api) as sock:
        sock.sendall(
            b"POST /api/logs/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 47000000\r\n\r\n["
        )
        status, headers, body = read_response(sock)
        assert (status, headers["connection"], json.loads(body)) == (401, "close", {"detail": "Unauthorized"})
        assert headers["www-authenticate"].startswith("Basic")
        assert closed_by_server(sock)


def test_the_basic_auth_scheme_is_case_insensitive(start):
    """RFC 9110, 11.1: `basic` is `Basic`."""
    api = start(PREFECT_SERVER_API_AUTH_STRING=AUTH)
    token = base64.b64encode(AUTH.encode()).decode()
    for scheme in ("Basic", "basic", "BASIC"):
        status, _ = Client(api, headers={"Authorization": f"{scheme} {token}"}).post("/flows/filter", {})
        assert status == 200, scheme
    assert Client(api, headers={"Authorization": f"Bearer {token}"}).post("/flows/filter", {})[0] == 401


def test_a_long_ui_path_segment_gets_an_answer(server):
    """A segment longer than a file name may be (255 bytes) used to end the connection with no answer."""
    with connect(server) as sock:
        sock.sendall(b"GET /flows/" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _headers, body = read_response(sock)
        assert status == 200 and body.lstrip().lower().startswith(b"<!doctype html")
        sock.sendall(b"GET /" + b"b" * 300 + b".js HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 404


# --- WebSockets --------------------------------------------------------------------------------------


def test_a_websocket_from_a_page_of_another_origin_is_refused(start):
    """With CORS limited to one site, a page of another site opened /events/in and /events/out."""
    api = start(PREFECT_SERVER_CORS_ALLOWED_ORIGINS="https://good.example", PREFECT_SERVER_CSRF_PROTECTION_ENABLED=True)
    for path in ("/events/in", "/events/out"):
        ws = RawWebSocket(api, path=path, headers={"Origin": "https://evil.example"})
        assert (ws.status, ws.body) == (403, {"detail": "WebSocket from an origin this server does not allow"})
        ws.close()
    for origin in ({"Origin": "https://good.example"}, {}):
        ws = RawWebSocket(api, headers=origin)
        assert ws.status == 101
        ws.authenticate()
        ws.close()
    host = "{}:{}".format(*host_port(api))
    same_site = RawWebSocket(api, headers={"Origin": f"http://{host}"})
    assert same_site.status == 101
    same_site.close()


def test_a_websocket_that_does_not_authenticate_is_closed(start):
    api = start(PREFECT_SERVER_API_AUTH_STRING=AUTH)
    ws = RawWebSocket(api, timeout=30)
    assert ws.status == 101
    assert ws.expect_close() == (1008, "Authentication timed out")
    assert ws.at_eof()
    ws.close()


def test_a_message_in_too_many_frames_is_refused(server):
    """Ten million empty continuation frames once made one message: a core busy 13 s, +77 MB."""
    ws = RawWebSocket(server).authenticate()
    try:
        frames = [b"\x01\x80" + b"\x00" * 4] + [b"\x00\x80" + b"\x00" * 4] * 1_200
        with contextlib.suppress(OSError):
            ws.sock.sendall(b"".join(frames))
        code, reason = ws.expect_close()
        assert code == 1009 and "frames" in reason
    finally:
        ws.close()


def test_thousands_of_websockets_wait_without_threads(start):
    """Every running Prefect 3 flow holds a WebSocket on /events/in: 300 of them on 4 workers."""
    api = start(PREFECT_SERVER_WORKERS=4)
    sockets = []
    try:
        for _ in range(300):
            sockets.append(RawWebSocket(api).authenticate())
        sockets[-1].send_json(event("test.last.one"))
        assert Client(api, timeout=5).get("/health") == (200, True)
        client = Client(api, timeout=5)
        wait_until(
            lambda: client.post("/events/filter", {"filter": {"event": {"name": ["test.last.one"]}}})[1]["total"] == 1,
            15,
            "the event from the 300th WebSocket",
        )
        assert len(threading.enumerate()) < 60
    finally:
        for ws in sockets:
            ws.close()


# --- the loop itself -----------------------------------------------------------------------------


def test_the_selectors_loop_serves_the_same(tmp_path):
    """Where there is no epoll (macOS, BSD) the loop runs on `selectors`, with workers handing re-arming
    to the loop: requests, keep-alive, a WebSocket and stop, on that path."""
    settings = prefectlite.load_settings(
        overrides={"PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite:///{tmp_path}/s.db"}
    )
    app = prefectlite.create_app(settings, services=False)
    listening = prefectlite.open_listener("127.0.0.1", 0)
    loop = prefectlite.ConnectionLoop(app, listening, use_epoll=False)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    running = prefectlite.RunningServer(app, loop, thread)
    try:
        client = Client(running.api_url, timeout=5)
        for i in range(20):
            write_flow(running.api_url, f"on-selectors-{i}")
        assert client.post("/flows/count", {}) == (200, 20)
        with connect(running.api_url) as sock:
            for _ in range(3):
                sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(sock)[0] == 200
        ws = RawWebSocket(running.api_url).authenticate()
        ws.send_frame(0x9, b"hi")
        assert ws.recv_frame() == (True, 0xA, b"hi")
    finally:
        running.stop()
    assert not thread.is_alive()
    assert ws.expect_close()[0] == 1001
    ws.close()


def test_the_open_files_limit_is_raised_to_the_hard_limit():
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        prefectlite.raise_open_files_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- found by attacking the loop (a second pair of eyes) ---------------------------------------------


def test_pipelined_requests_from_many_clients_never_wedge_the_loop(server):
    """A worker's wake-up of the loop could be lost for good (the flag was cleared before the wake socket
    was drained): from then on pipelined requests and closes waited for ever. 8 clients, 2,400 rounds."""
    failures = []

    def client():
        for _ in range(300):
            with connect(server, timeout=10) as sock:
                sock.sendall(b"GET /api/hello HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
                leftover = bytearray()
                try:
                    assert [read_response(sock, leftover=leftover)[0] for _ in range(2)] == [200, 200]
                except (OSError, EOFError, AssertionError) as exc:
                    failures.append(repr(exc))
                    return

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures[:3]
    assert Client(server, timeout=5).get("/health") == (200, True)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET http://[/ HTTP/1.1\r\nHost: x\r\n\r\n",  # urlsplit refuses it: once an exception that ended the loop
        b"GET\xa0/api/health\xa0HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/health  HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/health HTTP/1.1\r\n\r\n",
        b"GET /api/health HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Bell: a\x07b\r\n\r\n",
        b"\r\n" * 40 + b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=[
        "unparseable target",
        "nbsp separators",
        "two spaces",
        "no host",
        "two hosts",
        "control character",
        "a flood of empty lines",
    ],
)
def test_what_could_be_read_two_ways_is_400(server, raw):
    with connect(server) as sock:
        sock.sendall(raw)
        status, headers, body = read_response(sock)
        assert (status, headers["connection"]) == (400, "close") and json.loads(body)["detail"]
    assert Client(server, timeout=5).get("/health") == (200, True)


def test_an_unknown_expectation_is_417_and_connection_tokens_are_read_as_a_list(server):
    with connect(server) as sock:
        sock.sendall(b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nExpect: the-unexpected\r\nContent-Length: 2\r\n\r\n{}")
        assert read_response(sock)[0] == 417
    with connect(server) as sock:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close, te\r\nTE: trailers\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert (status, headers["connection"]) == (200, "close") and closed_by_server(sock)


def test_a_preflight_with_a_body_is_not_exempt_from_auth(start):
    """OPTIONS (and health, ready) pass without credentials, but only without a body: 10 preflights with
    45 MB bodies once made the server read 450 MB before answering 204."""
    api = start(PREFECT_SERVER_API_AUTH_STRING=AUTH)
    with connect(api) as sock:
        sock.sendall(b"OPTIONS /api/flows/ HTTP/1.1\r\nHost: x\r\nContent-Length: 45000000\r\n\r\n{")
        assert read_response(sock)[0] == 401
    with connect(api) as sock:
        sock.sendall(
            b"OPTIONS /api/flows/ HTTP/1.1\r\nHost: x\r\nOrigin: http://a.example\r\n"
            b"Access-Control-Request-Method: POST\r\n\r\n"
        )
        assert read_response(sock)[0] == 204


def test_a_websocket_upgrade_with_a_body_is_refused(server):
    key = base64.b64encode(os.urandom(16)).decode()
    with connect(server) as sock:
        sock.sendall(
            f"GET /api/events/in HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nContent-Length: 6\r\n\r\n".encode()
            + b"\x89\x80\x00\x00\x00\x00"
        )
        assert read_response(sock)[0] == 400


def test_a_slow_reader_gets_its_whole_answer(start):
    """The keep-alive clock once started when an answer was queued, not when it had left: a client
    reading a 12 MB answer slowly got part of it and then the end of the connection."""
    api = start(PREFECT_SERVER_KEEPALIVE_TIMEOUT=0.5)
    client = Client(api)
    flow = client.ok("POST", "/flows/", {"name": "slow-reader"})
    deployment = client.ok(
        "POST", "/deployments/", {"name": "big", "flow_id": flow["id"], "parameters": {"blob": "x" * 12_000_000}}
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(host_port(api))
    with sock:
        sock.sendall(f"GET /api/deployments/{deployment['id']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sock.settimeout(10)
        received, started = b"", time.monotonic()
        while time.monotonic() - started < 1.5:  # the client's pace: about 1.5 s for the first part
            received += sock.recv(16384)
            time.sleep(0.01)
        status, _headers, body = read_response(_Prefixed(sock, received), timeout=30)
        assert status == 200 and len(json.loads(body)["parameters"]["blob"]) == 12_000_000


class _Prefixed:
    """A socket whose first bytes were read already."""

    def __init__(self, sock, head):
        self.sock, self.head = sock, head

    def settimeout(self, timeout):
        self.sock.settimeout(timeout)

    def recv(self, n):
        if self.head:
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.sock.recv(n)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident size from /proc")
def test_a_client_that_reads_no_pongs_stops_being_read(server):
    """Pongs queued for a client that never reads once grew the server by hundreds of MB: past a limit
    the connection is not read until its answers leave. (The server runs in this process: its growth is
    ours.) 4 s of pings as fast as the server takes them."""
    ws = RawWebSocket(server).authenticate()
    ping = b"\x89\xfd\x00\x00\x00\x00" + b"p" * 125  # a masked ping (all-zero mask) of 125 bytes
    burst = ping * 512
    before, sent = rss_mb(), 0
    ws.sock.setblocking(False)
    deadline = time.monotonic() + 4
    try:
        pending = memoryview(burst)
        while time.monotonic() < deadline and sent < 400_000_000:
            try:
                taken = ws.sock.send(pending)
            except BlockingIOError:
                select.select([], [ws.sock], [], 0.05)
                continue
            sent += taken
            pending = pending[taken:] or memoryview(burst)  # whole frames only: never a cut one restarted
        grown = rss_mb() - before
    finally:
        ws.close()
    assert sent > 1_000_000, f"only {sent} bytes of pings taken: the test shows nothing"
    assert grown < 40, f"the server grew {grown:.0f} MB for {sent / 1e6:.0f} MB of pings it did not answer"
    assert Client(server, timeout=5).get("/health") == (200, True)


def test_a_websocket_message_must_arrive_whole_within_the_request_timeout(start):
    """A message begun and never finished, kept alive by pings, once held its buffer for ever."""
    api = start(PREFECT_SERVER_REQUEST_TIMEOUT=1.0)
    ws = RawWebSocket(api, timeout=10).authenticate()
    stop = threading.Event()

    def keep_pinging():  # every 0.1 s for at most 5 s: the server ends it long before
        for _ in range(50):
            if stop.wait(0.1):
                return
            try:
                ws.send_frame(0x9, b"alive")
            except OSError:
                return

    pinger = threading.Thread(target=keep_pinging, daemon=True)
    try:
        ws.send_frame(0x1, b'{"partial": ', fin=False)
        pinger.start()
        assert ws.expect_close() == (1008, "message not sent whole in time")
    finally:
        stop.set()
        pinger.join(10)
        ws.close()


def test_a_subscriber_is_sent_the_newest_thousand_events_of_the_window(server):
    """The backfill once read every event of the last 15 minutes, page by page, even for a subscriber
    already gone: the newest EVENTS_OUT_BACKFILL_MAX, oldest first, in one query."""
    sender = RawWebSocket(server).authenticate()
    base = now() - dt.timedelta(seconds=60)
    names = [f"test.backfill.{i:04d}" for i in range(1_050)]
    for i, name in enumerate(names):
        sender.send_json(event(name, occurred=iso(base + dt.timedelta(milliseconds=10 * i))))
    client = Client(server)
    wait_until(
        lambda: (
            client.post("/events/filter", {"filter": {"event": {"prefix": ["test.backfill."]}}})[1]["total"] == 1_050
        ),
        30,
        "the events to be stored",
    )
    sender.close()
    sub = RawWebSocket(server, path="/events/out").authenticate()
    try:
        sub.send_json({"type": "filter", "filter": {"event": {"prefix": ["test.backfill."]}}})
        got = [sub.recv_json()["event"]["event"] for _ in range(prefectlite.EVENTS_OUT_BACKFILL_MAX)]
        assert got == names[-prefectlite.EVENTS_OUT_BACKFILL_MAX :]
    finally:
        sub.close()
