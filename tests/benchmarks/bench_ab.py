#!/usr/bin/env python3
"""Interleaved A/B of the write load: two (or more) builds of prefectlite, run alternately.

On a shared or noisy machine the same build can measure 10-20% apart from one run to the next, so a
change is judged by alternating the builds (A, B, A, B, ...) with a fresh server and database each time
and comparing the means. Each build is a folder holding prefectlite.py (e.g. a `git worktree` of the
commit before the change, and the working tree):

    git worktree add /tmp/before HEAD~1
    python tests/benchmarks/bench_ab.py --builds /tmp/before,. --clients 8 --duration 6 --rounds 4

A build may carry arguments for `start` after `::`, e.g. one process against two of the same build:
`--builds '.,.::--processes 2'`.

Every run starts `python -m prefectlite start` from the build's folder on a free loopback port with a fresh
PREFECT_HOME, runs bench_write_load.py against it, and stops it. Besides req/s and p99 it prints the
server's CPU time per request (from /proc), which varies less than throughput on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as B  # noqa: E402


def one_run(build: str, clients: int, duration: float) -> dict:
    port = B.free_port()
    home = B.fresh_home()
    folder, _, extra = build.partition("::")
    command = (
        f"cd {shlex.quote(os.path.abspath(folder))} && exec {sys.executable} -m prefectlite start --port {port} {extra}"
    )
    proc = B.start_server(command, home, log_path=os.path.join(home, "server.log"))
    try:
        if not B.wait_health("127.0.0.1", port, "/api", 30.0, proc):
            raise SystemExit(f"{build}: the server did not answer; see {home}/server.log")
        cpu_before = B.tree_cpu_seconds(proc.pid)
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
        cpu = B.tree_cpu_seconds(proc.pid) - cpu_before
        level = json.loads(out.stdout)["levels"][0]
        return {
            "req_per_s": level["req_per_s"],
            "p99_ms": level["p99_ms"],
            "errors": sum(level["errors"].values()),
            "server_cpu_us_per_req": round(cpu / max(level["requests"], 1) * 1e6),
        }
    finally:
        B.stop_server(proc)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--builds", required=True, help="comma-separated folders that hold prefectlite.py, each optionally ::START_ARGS"
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    builds = [b for b in args.builds.split(",") if b]
    results: dict[str, list[dict]] = {b: [] for b in builds}
    for round_no in range(1, args.rounds + 1):
        for build in builds:
            B.log(f"round {round_no}: {build}")
            results[build].append(one_run(build, args.clients, args.duration))
    if args.json:
        print(json.dumps({"clients": args.clients, "duration": args.duration, "results": results}, indent=2))
        return 0
    rows = []
    for build, runs in results.items():
        rows.append(
            [
                build,
                f"{statistics.mean(r['req_per_s'] for r in runs):.0f}",
                " ".join(f"{r['req_per_s']:.0f}" for r in runs),
                " ".join(f"{r['p99_ms']:.1f}" for r in runs),
                f"{statistics.mean(r['server_cpu_us_per_req'] for r in runs):.0f}",
                " ".join(str(r["server_cpu_us_per_req"]) for r in runs),
                sum(r["errors"] for r in runs),
            ]
        )
    print(f"write load, {args.clients} clients, {args.duration:g} s per run, {args.rounds} rounds, builds alternated")
    B.print_table(
        ["build", "mean req/s", "req/s per run", "p99 ms per run", "server CPU µs/req", "per run", "errors"], rows
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
