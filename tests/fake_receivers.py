"""Local stand-ins for the services notifications go to: an HTTP receiver and a tiny SMTP server.

Both listen on a loopback port, record everything they are sent, and are stopped with `close()`
(or by leaving their `with` block). Nothing here talks to the network beyond 127.0.0.1.
"""

import base64
import dataclasses
import json
import socketserver
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclasses.dataclass
class Hit:
    method: str
    path: str  # with the query string
    headers: dict  # lower-cased names
    body: bytes
    status: int = 0  # what the receiver answered
    at: float = dataclasses.field(default_factory=time.time)  # when it arrived (wall clock, seconds)

    @property
    def route(self) -> str:
        return urllib.parse.urlsplit(self.path).path

    @property
    def query(self) -> dict:
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)

    def json(self):
        return json.loads(self.body)

    def form(self) -> dict:
        return urllib.parse.parse_qs(self.body.decode(), keep_blank_values=True)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class HTTPReceiver:
    """Records every request; answers with the statuses in `script` first (one each), then `status`.

    `hold()` makes each request wait (up to `hold_timeout` seconds) until `release()` before it is
    answered; `holding` says whether a request is being held right now.
    """

    def __init__(self, port: int = 0, status: int = 200, script=(), delay: float = 0.0):
        self.status = status
        self.script = list(script)
        self.delay = delay
        self.hits: list[Hit] = []
        self._cond = threading.Condition()
        self._hold = False
        self._release = threading.Event()
        self.hold_timeout = 5.0
        self.entered = threading.Event()
        self.holding = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                hit = Hit(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with receiver._cond:
                    status = receiver.script.pop(0) if receiver.script else receiver.status
                    hit.status = status
                    receiver.hits.append(hit)
                    hold = receiver._hold
                    if hold:
                        receiver.holding += 1
                    receiver._cond.notify_all()
                if hold:
                    receiver.entered.set()
                    try:
                        receiver._release.wait(receiver.hold_timeout)
                    finally:
                        with receiver._cond:
                            receiver.holding -= 1
                if receiver.delay:
                    time.sleep(receiver.delay)
                payload = b'{"ok": true}' if status < 400 else b'{"error": "fake failure"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload)
                self.close_connection = True

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, *args):
                pass

        self._server = _HTTPServer(("127.0.0.1", port), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def hold(self):
        self._release.clear()
        self._hold = True

    def release(self):
        self._hold = False
        self._release.set()

    def wait_for(self, count: int, timeout: float = 30.0, accepted: bool = False) -> list[Hit]:
        """Wait until `count` requests (or `count` answered < 400 when accepted=True) arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [h for h in self.hits if not accepted or h.status < 400]
                if len(hits) >= count:
                    return list(self.hits)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"expected {count} {'accepted ' if accepted else ''}requests, "
                        f"got {len(hits)}: {[(h.method, h.path, h.status) for h in self.hits]}"
                    )
                self._cond.wait(min(left, 0.2))

    def accepted(self) -> list[Hit]:
        with self._cond:
            return [h for h in self.hits if h.status < 400]

    def close(self):
        self.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclasses.dataclass
class Mail:
    helo: str
    mail_from: str
    rcpt_tos: list
    data: bytes


class _SMTPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class SMTPReceiver:
    """Just enough SMTP (EHLO/HELO, AUTH PLAIN/LOGIN, MAIL FROM, RCPT TO, DATA, RSET, NOOP, QUIT) to receive mail."""

    def __init__(self, port: int = 0):
        self.messages: list[Mail] = []
        self.commands: list[str] = []
        self.logins: list[tuple] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 30

            def reply(self, line: str):
                self.wfile.write(line.encode() + b"\r\n")
                self.wfile.flush()

            def handle(self):
                helo, mail_from, rcpts = "", None, []
                self.reply("220 fake.smtp.local ESMTP ready")
                while True:
                    raw = self.rfile.readline()
                    if not raw:
                        return
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    verb = line.split(" ", 1)[0].upper()
                    with receiver._cond:
                        receiver.commands.append(line)
                    if verb == "EHLO":
                        helo = line[5:].strip()
                        self.reply("250-fake.smtp.local")
                        self.reply("250-AUTH PLAIN LOGIN")
                        self.reply("250 HELP")
                    elif verb == "HELO":
                        helo = line[5:].strip()
                        self.reply("250 fake.smtp.local")
                    elif verb == "MAIL":
                        mail_from = _address(line)
                        rcpts = []
                        self.reply("250 OK")
                    elif verb == "RCPT":
                        if mail_from is None:
                            self.reply("503 need MAIL first")
                            continue
                        rcpts.append(_address(line))
                        self.reply("250 OK")
                    elif verb == "DATA":
                        if not rcpts:
                            self.reply("503 need RCPT first")
                            continue
                        self.reply("354 End data with <CR><LF>.<CR><LF>")
                        lines = []
                        while True:
                            chunk = self.rfile.readline()
                            if not chunk or chunk in (b".\r\n", b".\n"):
                                break
                            lines.append(chunk[1:] if chunk.startswith(b"..") else chunk)
                        with receiver._cond:
                            receiver.messages.append(Mail(helo, mail_from, list(rcpts), b"".join(lines)))
                            receiver._cond.notify_all()
                        mail_from, rcpts = None, []
                        self.reply("250 OK queued")
                    elif verb == "AUTH":
                        parts = line.split()
                        mechanism = parts[1].upper() if len(parts) > 1 else ""
                        if mechanism == "PLAIN":
                            if len(parts) > 2:
                                token = parts[2]
                            else:
                                self.reply("334 ")
                                token = self.rfile.readline().decode().strip()
                            _authzid, user, password = base64.b64decode(token).decode().split("\0")
                        elif mechanism == "LOGIN":
                            if len(parts) > 2:
                                user = base64.b64decode(parts[2]).decode()
                            else:
                                self.reply("334 VXNlcm5hbWU6")
                                user = base64.b64decode(self.rfile.readline().strip()).decode()
                            self.reply("334 UGFzc3dvcmQ6")
                            password = base64.b64decode(self.rfile.readline().strip()).decode()
                        else:
                            self.reply("504 mechanism not supported")
                            continue
                        with receiver._cond:
                            receiver.logins.append((user, password))
                        self.reply("235 Authentication successful")
                    elif verb in ("RSET",):
                        mail_from, rcpts = None, []
                        self.reply("250 OK")
                    elif verb == "NOOP":
                        self.reply("250 OK")
                    elif verb == "QUIT":
                        self.reply("221 Bye")
                        return
                    else:
                        self.reply("502 Command not implemented")

        self._server = _SMTPServer(("127.0.0.1", port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Mail]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} messages, got {len(self.messages)}: {self.commands}")
                self._cond.wait(min(left, 0.2))
            return list(self.messages)

    def close(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _address(line: str) -> str:
    """The address in `MAIL FROM:<a@b> SIZE=1` or `RCPT TO:<a@b>`."""
    rest = line.split(":", 1)[1].strip() if ":" in line else ""
    if rest.startswith("<"):
        return rest[1 : rest.index(">")] if ">" in rest else rest[1:]
    return rest.split(" ", 1)[0]
