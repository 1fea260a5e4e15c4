#!/usr/bin/env python3
"""Many connections: the 8-client write load alone, then again while thousands of other connections wait.

Issue 18's target: 2,000 WebSockets on /api/events/in each sending one event every 5 s (as running
Prefect 3 flows do), 1,000 idle keep-alive clients and 500 slow senders (a request trickled a byte at a
time, started anew when the server ends it), while the 8-client write load runs. Reported: write req/s
and p99 with and without the crowd, /api/health p99 (probed every 50 ms), the server's peak RSS, and the
events the server stored from the crowd.

    python tests/benchmarks/bench_connections.py --duration 20
    python tests/benchmarks/bench_connections.py --websockets 200 --idle 100 --slow 50   # a quick look

It starts `python prefectlite.py start` on a free loopback port with a fresh PREFECT_HOME, and stops it.
The crowd is driven from one thread of this process with non-blocking sockets (no thread per socket).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as B  # noqa: E402


def ws_frame(text: str) -> bytes:
    """A masked text frame (the all-zero mask: valid, and the payload goes as it is)."""
    payload = text.encode()
    n = len(payload)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    return head + b"\x00\x00\x00\x00" + payload


def event_json(i: int) -> str:
    return json.dumps(
        {
            "id": str(uuid.uuid4()),
            "occurred": B.now_iso(),
            "event": "bench.crowd.beat",
            "resource": {"prefect.resource.id": f"bench.crowd.{i}"},
            "related": [],
            "payload": {},
        }
    )


class Crowd:
    """The waiting connections, driven from one thread until stop()."""

    def __init__(self, host: str, port: int, websockets: int, idle: int, slow: int, event_every: float):
        self.host, self.port = host, port
        self.counts = {"websockets": websockets, "idle": idle, "slow": slow}
        self.event_every = event_every
        self.selector = selectors.DefaultSelector()
        self.ws: list[socket.socket] = []
        self.idle: list[socket.socket] = []
        self.slow: list[socket.socket] = []
        self.events_sent = 0
        self.slow_restarts = 0
        self.errors = 0
        self._stop = threading.Event()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=30)
        return sock

    def _read_head(self, sock: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            data += chunk
        return data

    def open(self):
        key = base64.b64encode(os.urandom(16)).decode()
        upgrade = (
            f"GET /api/events/in HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: prefect\r\n\r\n"
        ).encode()
        auth = ws_frame(json.dumps({"type": "auth", "token": None}))
        for _ in range(self.counts["websockets"]):
            sock = self._connect()
            sock.sendall(upgrade)
            head = self._read_head(sock)
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                raise SystemExit(f"WebSocket refused: {head[:200]!r}")
            sock.sendall(auth)
            sock.setblocking(False)
            self.ws.append(sock)
        for _ in range(self.counts["idle"]):
            sock = self._connect()
            sock.sendall(f"GET /api/health HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
            self._read_head(sock)
            sock.setblocking(False)
            self.idle.append(sock)
        for _ in range(self.counts["slow"]):
            self.slow.append(self._start_slow())

    def _start_slow(self) -> socket.socket:
        sock = self._connect()
        sock.sendall(b"POST /api/flows/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        sock.setblocking(False)
        return sock

    def run(self, duration: float):
        """Each WebSocket sends an event every `event_every` s (spread evenly); each slow sender one byte
        a second; everything they are sent is read and dropped."""
        started = time.monotonic()
        n_ws = len(self.ws)
        next_ws = 0
        next_slow_tick = started
        while not self._stop.is_set() and time.monotonic() - started < duration:
            now = time.monotonic()
            due = int((now - started) / self.event_every * n_ws) if n_ws else 0
            while next_ws < due:
                sock = self.ws[next_ws % n_ws]
                try:
                    sock.send(ws_frame(event_json(next_ws % n_ws)))
                    self.events_sent += 1
                except (BlockingIOError, OSError):
                    self.errors += 1
                next_ws += 1
            if now >= next_slow_tick:
                next_slow_tick = now + 1.0
                self._tick_slow()
                self._drain(self.ws + self.idle)
            time.sleep(0.01)

    def _tick_slow(self):
        for i, sock in enumerate(self.slow):
            try:
                sock.send(b" ")
                sock.recv(65536)  # anything (a 408, the end): the server ended this request; start anew
            except BlockingIOError:
                continue  # nothing to read: still waiting for our body, as it should
            except OSError:
                pass
            sock.close()
            self.slow_restarts += 1
            try:
                self.slow[i] = self._start_slow()
            except OSError:
                self.errors += 1

    def _drain(self, socks):
        for sock in socks:
            try:
                while sock.recv(65536):
                    pass
            except (BlockingIOError, OSError):
                pass

    def stop(self):
        self._stop.set()

    def close(self):
        for sock in self.ws + self.idle + self.slow:
            sock.close()


def health_prober(host: str, port: int, stop: threading.Event, latencies: list, failures: list):
    while not stop.is_set():
        started = time.perf_counter()
        status = B.health_once(host, port, "/api", timeout=5.0)
        if status == 200:
            latencies.append((time.perf_counter() - started) * 1000)
        else:
            failures.append(status)
        stop.wait(0.05)


def write_load(port: int, clients: int, duration: float) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(B.HERE, "bench_write_load.py"),
            "--url",
            f"http://127.0.0.1:{port}/api",
            "--clients",
            str(clients),
            "--duration",
            str(duration),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)["levels"][0]


def stored_events(port: int, sent: int, wait: float = 10.0) -> int:
    """How many of the crowd's events the server holds, once the last ones in flight are in (or `wait` s)."""
    target, deadline, count = B.Target(f"http://127.0.0.1:{port}/api"), time.monotonic() + wait, 0
    while True:
        _, rows = B.get_json(
            target, "POST", "/events/count-by/event", {"filter": {"event": {"name": ["bench.crowd.beat"]}}}
        )
        count = sum(row.get("count", 0) for row in rows) if isinstance(rows, list) else 0
        if count >= sent or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def measured_phase(port: int, proc, args, crowd: Crowd | None) -> dict:
    stop = threading.Event()
    latencies: list[float] = []
    failures: list = []
    peak = {"rss_mb": 0.0}

    def watch_memory():
        while not stop.is_set():
            peak["rss_mb"] = max(peak["rss_mb"], B.tree_memory(proc.pid)["rss_mb"])
            stop.wait(0.5)

    threads = [
        threading.Thread(target=health_prober, args=("127.0.0.1", port, stop, latencies, failures)),
        threading.Thread(target=watch_memory),
    ]
    if crowd is not None:
        threads.append(threading.Thread(target=crowd.run, args=(args.duration + 5,)))
    for thread in threads:
        thread.start()
    try:
        level = write_load(port, args.clients, args.duration)
    finally:
        stop.set()
        if crowd is not None:
            crowd.stop()
        for thread in threads:
            thread.join(30)
    latencies.sort()
    return {
        "write_req_per_s": level["req_per_s"],
        "write_p99_ms": level["p99_ms"],
        "write_errors": sum(level["errors"].values()),
        "health_p99_ms": round(B.pct(latencies, 99), 1),
        "health_failures": len(failures),
        "peak_rss_mb": round(peak["rss_mb"], 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--websockets", type=int, default=2000)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--slow", type=int, default=500)
    parser.add_argument("--event-every", type=float, default=5.0, help="seconds between one WebSocket's events")
    parser.add_argument("--clients", type=int, default=8, help="write-load clients")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of write load per phase")
    parser.add_argument("--prefectlite", default=B.DEFAULT_PREFECTLITE)
    args = parser.parse_args(argv)
    if args.websockets + args.idle + args.slow > 20_000:
        parser.error("at most 20,000 connections")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds the crowd's sockets

    port, home = B.free_port(), B.fresh_home()
    proc = B.start_server(
        B.build_command(B.DEFAULT_COMMAND, port, home, args.prefectlite),
        home,
        log_path=os.path.join(home, "server.log"),
        env_extra={"PREFECT_LOGGING_SERVER_LEVEL": "WARNING"},
    )
    crowd = None
    try:
        if not B.wait_health("127.0.0.1", port, "/api", 30.0, proc):
            raise SystemExit(f"the server did not answer; see {home}/server.log")
        B.log(f"phase 1: {args.clients}-client write load alone, {args.duration:g} s")
        alone = measured_phase(port, proc, args, None)
        crowd = Crowd("127.0.0.1", port, args.websockets, args.idle, args.slow, args.event_every)
        B.log(f"opening {args.websockets} WebSockets, {args.idle} idle keep-alive, {args.slow} slow senders")
        opened = time.monotonic()
        crowd.open()
        B.log(f"opened in {time.monotonic() - opened:.1f} s; phase 2: the same load beside them")
        beside = measured_phase(port, proc, args, crowd)
        stored_count = stored_events(port, crowd.events_sent)
    finally:
        if crowd is not None:
            crowd.close()
        B.stop_server(proc)
    print(
        f"{args.clients}-client write load, {args.duration:g} s per phase; crowd: {args.websockets} WebSockets "
        f"(an event each every {args.event_every:g} s), {args.idle} idle keep-alive, {args.slow} slow senders"
    )
    rows = [
        [
            name,
            r["write_req_per_s"],
            r["write_p99_ms"],
            r["write_errors"],
            r["health_p99_ms"],
            r["health_failures"],
            r["peak_rss_mb"],
        ]
        for name, r in (("alone", alone), ("beside the crowd", beside))
    ]
    B.print_table(
        ["phase", "write req/s", "write p99 ms", "errors", "health p99 ms", "health fails", "peak RSS MB"], rows
    )
    ratio = beside["write_req_per_s"] / alone["write_req_per_s"] if alone["write_req_per_s"] else 0
    print(
        f"write throughput beside the crowd: {100 * ratio:.0f}% of alone; crowd events sent "
        f"{crowd.events_sent}, stored {stored_count}; slow senders restarted {crowd.slow_restarts}; "
        f"crowd errors {crowd.errors}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
