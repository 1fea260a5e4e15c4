#!/usr/bin/env python3
"""Why section 25's loop is `select.epoll` with one-shot registrations and not asyncio: the two designs
side by side, stripped to what differs.

Both servers read requests in one loop thread and hand each whole request to a pool of worker threads
(where prefectlite does its database work), as issue 18 asks. They differ in how a finished request
gives its connection back:
  epoll    the worker sends the answer and re-arms the connection itself (one epoll_ctl, from any thread);
  asyncio  the worker's result comes back through run_in_executor's future: call_soon_threadsafe, a
           wake-up of the loop, then the loop writes the answer.
Measured: requests a second and server CPU per request for N keep-alive clients doing request/answer
round trips (a trivial handler), and the memory of M idle connections.

    python tests/benchmarks/bench_loop_choice.py --clients 8 --duration 5 --idle 5000
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as B  # noqa: E402

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Type: application/json\r\n\r\ntrue"


def handle(request: bytes) -> bytes:
    return ANSWER  # the work a worker would do: here nothing, so that only the hand-overs differ


def serve_epoll(listening: socket.socket, workers: int, stop: threading.Event):
    epoll = select.epoll()
    epoll.register(listening.fileno(), select.EPOLLIN)
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    conns: dict[int, tuple[socket.socket, bytearray]] = {}

    def work(sock, request):
        sock.send(handle(request))
        epoll.modify(sock.fileno(), select.EPOLLIN | select.EPOLLONESHOT)  # the worker re-arms it

    while not stop.is_set():
        for fd, _events in epoll.poll(0.2):
            if fd == listening.fileno():
                with_socket, _ = listening.accept()
                with_socket.setblocking(False)
                with_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[with_socket.fileno()] = (with_socket, bytearray())
                epoll.register(with_socket.fileno(), select.EPOLLIN | select.EPOLLONESHOT)
                continue
            sock, buffer = conns[fd]
            data = sock.recv(65536)
            if not data:
                epoll.unregister(fd)
                sock.close()
                del conns[fd]
                continue
            buffer += data
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                epoll.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)
                continue
            request = bytes(buffer[: end + 4])
            del buffer[: end + 4]
            pool.submit(work, sock, request)
    pool.shutdown()
    for sock, _ in conns.values():
        sock.close()


def serve_asyncio(listening: socket.socket, workers: int, stop: threading.Event):
    pool = concurrent.futures.ThreadPoolExecutor(workers)

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buffer = bytearray()
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data):
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                request = bytes(self.buffer[: end + 4])
                del self.buffer[: end + 4]
                self.transport.pause_reading()  # one request at a time per connection, as prefectlite
                future = asyncio.get_running_loop().run_in_executor(pool, handle, request)
                future.add_done_callback(self.answered)

        def answered(self, future):
            self.transport.write(future.result())
            self.transport.resume_reading()

    async def main():
        server = await asyncio.get_running_loop().create_server(Protocol, sock=listening)
        while not stop.is_set():
            await asyncio.sleep(0.2)
        server.close()

    asyncio.run(main())
    pool.shutdown()


def round_trips(port: int, clients: int, duration: float) -> int:
    counts = [0] * clients
    deadline = time.perf_counter() + duration

    def client(i):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
            while time.perf_counter() < deadline:
                sock.sendall(request)
                got = b""
                while len(got) < len(ANSWER):
                    got += sock.recv(4096)
                counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + 30)
    return sum(counts)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(design, args) -> dict:
    """In a process of its own (run by main): idle connections first, on a fresh heap, then round trips."""
    listening = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = listening.getsockname()[1]
    stop = threading.Event()
    server = threading.Thread(target=design, args=(listening, 64, stop), daemon=True)
    server.start()
    round_trips(port, 1, 0.2)  # the server is up, and its pool has a thread
    before = rss_mb()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.idle)]
    round_trips(port, 1, 0.2)  # answered after all of them were accepted
    grown = rss_mb() - before  # this process holds the client ends too: the same for both designs
    cpu0, started = time.process_time(), time.perf_counter()
    done = round_trips(port, args.clients, args.duration)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu0
    for sock in idle:
        sock.close()
    stop.set()
    server.join(10)
    listening.close()
    # the clients run in this process too: CPU per request is both sides', the same for both designs
    return {
        "req_per_s": round(done / elapsed),
        "cpu_us_per_req": round(cpu / max(done, 1) * 1e6),
        "idle_kb_each": round(grown * 1024 / max(args.idle, 1), 2),
    }


DESIGNS = {"epoll": serve_epoll, "asyncio": serve_asyncio}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", choices=DESIGNS, help=argparse.SUPPRESS)  # a run, in a process of its own
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.one:
        print(json.dumps(measure(DESIGNS[args.one], args)))
        return 0
    results = {name: [] for name in DESIGNS}
    for _ in range(args.rounds):  # interleaved, as bench_ab.py does
        for name in DESIGNS:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    name,
                    "--clients",
                    str(args.clients),
                    "--duration",
                    str(args.duration),
                    "--idle",
                    str(args.idle),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[name].append(json.loads(out.stdout))
    rows = [
        [
            name,
            " ".join(str(r["req_per_s"]) for r in runs),
            " ".join(str(r["cpu_us_per_req"]) for r in runs),
            " ".join(str(r["idle_kb_each"]) for r in runs),
        ]
        for name, runs in results.items()
    ]
    print(
        f"{args.clients} keep-alive clients, {args.duration:g} s a run; {args.idle} idle connections; "
        f"{args.rounds} rounds interleaved"
    )
    B.print_table(["design", "req/s per run", "CPU us/req (server + clients)", "KB per idle connection"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
