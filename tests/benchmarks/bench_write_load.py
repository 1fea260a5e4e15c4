#!/usr/bin/env python3
"""Write load: the Prefect 2.20 SDK's calls for a flow of three tasks, from N concurrent clients.

Per client (one keep-alive connection): POST /flows/ once (create-or-read by name); then per simulated run
13 calls, bodies shaped as the SDK sends them (see shared/reference/prefect2-traces/a_tasks.jsonl):

    POST /flow_runs/                       state PENDING, flow_id, ...
    POST /flow_runs/{id}/set_state         RUNNING
    3 x ( POST /task_runs/                 flow_run_id, task_key, dynamic_key, name, state PENDING
          POST /task_runs/{id}/set_state   RUNNING
          POST /task_runs/{id}/set_state   COMPLETED )
    POST /logs/                            5 lines
    POST /flow_runs/{id}/set_state         COMPLETED

Any non-2xx answer or exception is an error. A set_state answered 2xx with an orchestration status other
than ACCEPT is reported separately ("not ACCEPT").

    python tests/benchmarks/bench_write_load.py --url http://127.0.0.1:4200/api --clients 1,8,32 --duration 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as B  # noqa: E402

OPS = ["flow_create", "flow_run_create", "flow_run_set_state", "task_run_create", "task_run_set_state", "logs"]


class Level:
    def __init__(
        self, clients: int, duration: float | None, runs: int | None, max_time: float, args, stats_class=B.Stats
    ):
        self.clients = clients
        self.stats_class = stats_class  # how answers are counted (bench_pg_servers tells 503s apart)
        self.deadline = None
        self.duration = duration
        self.runs = runs
        self.max_time = max_time
        self.args = args
        self.run_counter = itertools.count()
        self.stats: list[B.Stats] = []
        self.completed_runs = [0] * clients
        self.abandoned_runs = [0] * clients
        self.not_accepted = [0] * clients
        self.reconnects = [0] * clients
        self.ack_lock = threading.Lock()
        self.start_barrier = threading.Barrier(clients + 1)

    def stop_now(self) -> bool:
        return time.perf_counter() >= self.deadline


def client_thread(level: Level, idx: int, target: B.Target, ack_file):
    args = level.args
    st = level.stats_class(max_samples=args.error_samples)
    level.stats[idx] = st
    cli = B.Client(target, timeout=args.timeout, gzip_ok=not args.no_gzip)
    flow_body = B.flow_create_body(args.flow_name)
    try:
        level.start_barrier.wait()
    except threading.BrokenBarrierError:
        return

    def call(op, method, path, body):
        status, data, secs = cli.request(method, path, body)
        ok = st.add(op, status, secs, method, path, data, body)
        return ok, data

    # POST /flows/ once per client (create-or-read by name); retried until it works or time is up
    flow_id = None
    while flow_id is None and not level.stop_now():
        ok, data = call("flow_create", "POST", "/flows/", flow_body)
        if ok:
            flow_id = B.parse_id(data)
            if flow_id is None:
                st.error("bad-flow-body", {"op": "flow_create", "response": data[:300].decode(errors="replace")})
        else:
            time.sleep(0.05)
    if flow_id is None:
        cli.close()
        return

    n_logs = args.log_lines
    while True:
        if level.stop_now():
            break
        if level.runs is not None and next(level.run_counter) >= level.runs:
            break
        done = run_once(level, idx, cli, st, call, flow_id, n_logs, ack_file)
        if done:
            level.completed_runs[idx] += 1
        else:
            level.abandoned_runs[idx] += 1
            cli.backoff()
    level.reconnects[idx] = cli.reconnects
    cli.close()


def run_once(level, idx, cli, st, call, flow_id, n_logs, ack_file) -> bool:
    """One simulated flow run; returns True when all 13 calls were answered 2xx."""
    # in --duration mode a run that is in flight at the deadline is abandoned (not counted as completed)
    check = level.runs is None

    ok, data = call("flow_run_create", "POST", "/flow_runs/", B.flow_run_create_body(flow_id))
    if not ok:
        return False
    fr = B.parse_id(data)
    if fr is None:
        st.error("bad-flow-run-body", {"op": "flow_run_create", "response": data[:300].decode(errors="replace")})
        return False
    if check and level.stop_now():
        return False
    ok, data = call(
        "flow_run_set_state", "POST", f"/flow_runs/{fr}/set_state", B.flow_run_set_state_body(fr, "RUNNING")
    )
    if not ok:
        return False
    if B.parse_orch_status(data) != "ACCEPT":
        level.not_accepted[idx] += 1
    prev = None
    task_ids = []
    for name, key in B.TASK_DEFS:
        if check and level.stop_now():
            return False
        inputs = {"xs": [{"input_type": "task_run", "id": prev}]} if prev else {}
        ok, data = call(
            "task_run_create", "POST", "/task_runs/", B.task_run_create_body(fr, f"{name}-0", key, "0", inputs)
        )
        if not ok:
            return False
        tr = B.parse_id(data)
        if tr is None:
            st.error("bad-task-run-body", {"op": "task_run_create", "response": data[:300].decode(errors="replace")})
            return False
        task_ids.append(tr)
        for stype in ("RUNNING", "COMPLETED"):
            if check and level.stop_now():
                return False
            ok, data = call(
                "task_run_set_state", "POST", f"/task_runs/{tr}/set_state", B.task_run_set_state_body(tr, stype)
            )
            if not ok:
                return False
            if B.parse_orch_status(data) != "ACCEPT":
                level.not_accepted[idx] += 1
        prev = tr
    if check and level.stop_now():
        return False
    ok, _ = call("logs", "POST", "/logs/", B.logs_body(fr, task_ids, n_logs))
    if not ok:
        return False
    if check and level.stop_now():
        return False
    ok, data = call(
        "flow_run_set_state",
        "POST",
        f"/flow_runs/{fr}/set_state",
        B.flow_run_set_state_body(fr, "COMPLETED", data=B.result_data("int")),
    )
    if not ok:
        return False
    if B.parse_orch_status(data) != "ACCEPT":
        level.not_accepted[idx] += 1
    if ack_file is not None:
        with level.ack_lock:
            ack_file.write(fr + "\n")
            ack_file.flush()
    return True


def run_level(target: B.Target, clients: int, args, ack_file, stats_class=B.Stats) -> dict:
    duration = args.duration if args.runs is None else None
    level = Level(clients, duration, args.runs, args.max_time, args, stats_class)
    level.stats = [stats_class(max_samples=args.error_samples) for _ in range(clients)]
    threads = [
        threading.Thread(target=client_thread, args=(level, i, target, ack_file), daemon=True) for i in range(clients)
    ]
    for t in threads:
        t.start()
    cpu0 = B.client_cpu_seconds()
    t0 = time.perf_counter()
    level.deadline = t0 + (duration if duration is not None else args.max_time)
    level.start_barrier.wait()
    for t in threads:
        # hard bound: deadline + the request timeout
        t.join(timeout=max(0.0, level.deadline - time.perf_counter()) + args.timeout + 5)
    elapsed = time.perf_counter() - t0
    cpu = B.client_cpu_seconds() - cpu0
    total = stats_class(max_samples=args.error_samples)
    for s in level.stats:
        total.merge(s)
    lat = total.all_latencies()
    runs = sum(level.completed_runs)
    res = {
        "clients": clients,
        "elapsed_s": round(elapsed, 2),
        "requests": total.count,
        "requests_ok": total.ok,
        "req_per_s": round(total.count / elapsed, 1) if elapsed else 0,
        "runs_completed": runs,
        "runs_incomplete": sum(level.abandoned_runs),
        "runs_per_s": round(runs / elapsed, 2) if elapsed else 0,
        **B.summarize(lat),
        "errors": dict(total.errors),
        "error_count": sum(total.errors.values()),
        "not_accept": sum(level.not_accepted),
        "reconnects": sum(level.reconnects),
        "client_cpu_pct": round(100 * cpu / elapsed, 0) if elapsed else 0,
        "by_op": {op: {"n": len(v), **B.summarize(sorted(v))} for op, v in total.lat.items()},
        "error_samples": total.samples,
    }
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=B.DEFAULT_URL, help="API base URL (default %(default)s)")
    ap.add_argument("--clients", default="1,8,32", help="comma-separated client counts, one level each")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per level (default 10)")
    ap.add_argument(
        "--runs",
        type=int,
        default=None,
        help="instead of --duration: this many simulated runs per level (shared by the clients)",
    )
    ap.add_argument("--max-time", type=float, default=600.0, help="safety cap per level with --runs (s)")
    ap.add_argument("--log-lines", type=int, default=5, help="lines in the one POST /logs/ per run (default 5)")
    ap.add_argument("--flow-name", default="bench-etl")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between levels")
    ap.add_argument("--no-gzip", action="store_true", help="do not send Accept-Encoding: gzip")
    ap.add_argument(
        "--ack-log", default=None, help="append the id of every flow run whose final set_state was answered 2xx"
    )
    ap.add_argument("--error-samples", type=int, default=5, help="error bodies to keep per level")
    ap.add_argument("--by-op", action="store_true", help="also print latencies per call type")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = ap.parse_args(argv)

    target = B.Target(args.url)
    levels = [int(x) for x in args.clients.split(",") if x.strip()]
    if any(c < 1 or c > 256 for c in levels):
        ap.error("--clients values must be between 1 and 256")
    if args.runs is not None and args.runs < 1:
        ap.error("--runs must be >= 1")

    status, body = B.get_json(target, "GET", "/health")
    if status != 200:
        sys.exit(f"server at {args.url} not healthy: GET /health -> {status} {body!r}")
    _, version = B.get_json(target, "GET", "/admin/version")

    ack_file = open(args.ack_log, "a", buffering=1) if args.ack_log else None
    results = []
    try:
        for i, c in enumerate(levels):
            if i:
                time.sleep(args.pause)
            mode = f"{args.runs} runs" if args.runs is not None else f"{args.duration:g}s"
            B.log(f"level: {c} client(s), {mode} ...")
            results.append(run_level(target, c, args, ack_file))
    finally:
        if ack_file:
            ack_file.close()

    out = {
        "benchmark": "write_load",
        "url": args.url,
        "server_version": version,
        "calls_per_run": 13,
        "log_lines_per_run": args.log_lines,
        "levels": results,
        "argv": " ".join(sys.argv),
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"write load against {args.url} (server version {version}); 13 calls per run, "
        f"{args.log_lines} log lines per run"
    )
    rows = []
    for r in results:
        rows.append(
            [
                r["clients"],
                r["elapsed_s"],
                r["requests"],
                r["req_per_s"],
                r["runs_per_s"],
                r["p50_ms"],
                r["p90_ms"],
                r["p99_ms"],
                r["max_ms"],
                B.fmt_errors(Counter(r["errors"])),
                r["not_accept"],
                r["reconnects"],
                f"{r['client_cpu_pct']:.0f}%",
            ]
        )
    B.print_table(
        [
            "clients",
            "secs",
            "requests",
            "req/s",
            "runs/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "errors",
            "not ACCEPT",
            "reconn",
            "bench cpu",
        ],
        rows,
    )
    if args.by_op:
        for r in results:
            print(f"\n{r['clients']} client(s), latency by call:")
            B.print_table(
                ["call", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"],
                [[op, v["n"], v["p50_ms"], v["p90_ms"], v["p99_ms"], v["max_ms"]] for op, v in r["by_op"].items()],
            )
    for r in results:
        if r["error_samples"]:
            print(f"\nfirst errors at {r['clients']} client(s):")
            for s in r["error_samples"]:
                print(
                    f"  {s.get('method', '')} {s.get('path', '')} [{s.get('op')}] -> {s.get('status')}: "
                    f"{s.get('response')}"
                )
                if s.get("request"):
                    print(f"      request body: {s['request'][:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
