#!/usr/bin/env python3
"""The SQLite WAL under reads that overlap writes, and once idle; write latency beside the checkpointer.

For each build (a folder holding prefectlite.py, as in bench_ab.py), alternated for `--rounds`: start
`python -m prefectlite start` from that folder on a free loopback port with a fresh PREFECT_HOME (the read
cache off, so every read reaches the database), then for `--duration` s run `--writers` clients of the
write load (bench_write_load.py's 13 calls per run) beside `--readers` clients that list flow runs (limit
200), count them and read logs (limit 200), one request after another. The WAL file's size is sampled every
0.2 s; then the load stops and the WAL is measured after `--idle` s of quiet. Prints per run: the largest
WAL, the WAL after the idle time, the database file, write req/s and write latency p50/p90/p99/max, read
req/s and p99, errors. Compare a build without the bounded WAL against one with it:

    git show main:prefectlite.py > /tmp/before/prefectlite.py && cp -r migrations /tmp/before/
    python tests/benchmarks/bench_wal.py --builds /tmp/before,. --duration 60 --idle 10
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as B  # noqa: E402
import bench_write_load as W  # noqa: E402

READS = [
    ("flow_runs_filter", "/flow_runs/filter", {"limit": 200, "sort": "EXPECTED_START_TIME_DESC"}),
    ("flow_runs_count", "/flow_runs/count", {}),
    ("logs_filter", "/logs/filter", {"limit": 200, "sort": "TIMESTAMP_DESC"}),
]


def wal_size(home: str) -> int:
    try:
        return os.path.getsize(os.path.join(home, "prefectlite.db-wal"))
    except OSError:
        return 0


def reader(target: B.Target, stats: B.Stats, stop: threading.Event):
    cli = B.Client(target)
    bodies = [(op, path, json.dumps(body).encode()) for op, path, body in READS]
    i = 0
    while not stop.is_set():
        op, path, body = bodies[i % len(bodies)]
        status, data, secs = cli.request("POST", path, body)
        stats.add(op, status, secs, "POST", path, data, body)
        cli.backoff()
        i += 1
    cli.close()


def one_run(build: str, args) -> dict:
    port = B.free_port()
    home = B.fresh_home("prefectlite-bench-wal-")
    command = f"cd {shlex.quote(os.path.abspath(build))} && exec {sys.executable} -m prefectlite start --port {port}"
    proc = B.start_server(
        command,
        home,
        log_path=os.path.join(home, "server.log"),
        env_extra={"PREFECT_SERVER_READ_CACHE_SECONDS": "0", "PREFECT_SERVER_PROCESSES": str(args.processes)},
    )
    try:
        if not B.wait_health("127.0.0.1", port, "/api", 30.0, proc):
            raise SystemExit(f"{build}: the server did not answer; see {home}/server.log")
        target = B.Target(f"http://127.0.0.1:{port}/api")
        stop = threading.Event()
        read_stats = [B.Stats() for _ in range(args.readers)]
        readers = [
            threading.Thread(target=reader, args=(target, read_stats[i], stop), daemon=True)
            for i in range(args.readers)
        ]
        largest = [0]

        def sample():
            while not stop.wait(0.2):
                largest[0] = max(largest[0], wal_size(home))

        sampler = threading.Thread(target=sample, daemon=True)
        load_args = argparse.Namespace(
            duration=args.duration,
            runs=None,
            max_time=args.duration,
            log_lines=5,
            flow_name="bench-wal",
            timeout=60.0,
            no_gzip=False,
            error_samples=3,
        )
        started = time.perf_counter()
        for thread in [sampler, *readers]:
            thread.start()
        writes = W.run_level(target, args.writers, load_args, None)
        stop.set()
        for thread in [sampler, *readers]:
            thread.join(70)
        elapsed = time.perf_counter() - started
        largest[0] = max(largest[0], wal_size(home))
        after_load = wal_size(home)
        time.sleep(args.idle)  # the idle time is what is measured: the WAL's size once the server is quiet
        reads = B.Stats()
        for s in read_stats:
            reads.merge(s)
        read_lat = reads.all_latencies()
        return {
            "build": build,
            "wal_max_mb": round(largest[0] / 1e6, 1),
            "wal_after_load_mb": round(after_load / 1e6, 1),
            "wal_idle_mb": round(wal_size(home) / 1e6, 2),
            "db_mb": round(os.path.getsize(os.path.join(home, "prefectlite.db")) / 1e6, 1),
            "write_req_per_s": writes["req_per_s"],
            "write_p50_ms": writes["p50_ms"],
            "write_p90_ms": writes["p90_ms"],
            "write_p99_ms": writes["p99_ms"],
            "write_max_ms": writes["max_ms"],
            "read_req_per_s": round(reads.count / elapsed, 1),
            "read_p99_ms": B.summarize(read_lat)["p99_ms"],
            "errors": writes["error_count"] + sum(reads.errors.values()),
        }
    finally:
        B.stop_server(proc)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--builds", default=".", help="comma-separated folders that hold prefectlite.py")
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (at most 600)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of quiet before the last measure")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--processes", type=int, default=1, help="the server's processes (start --processes N)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 600 and 0 <= args.idle <= 600 and 1 <= args.rounds <= 10):
        parser.error("--duration 0-600 s, --idle 0-600 s, --rounds 1-10")
    if not (1 <= args.writers <= 64 and 0 <= args.readers <= 64):
        parser.error("--writers 1-64, --readers 0-64")
    if not 1 <= args.processes <= 8:
        parser.error("--processes 1-8")
    results = []
    for round_no in range(args.rounds):
        for build in args.builds.split(","):
            B.log(
                f"round {round_no + 1}: {build}, {args.writers} writers + {args.readers} readers, {args.duration:g} s"
            )
            results.append(one_run(build, args))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    headers = list(results[0])
    B.print_table(headers, [[r[h] for h in headers] for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
