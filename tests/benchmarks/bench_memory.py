#!/usr/bin/env python3
"""Resident memory of the server process tree: idle, and after a load of runs, task runs and logs.

Starts the server command template (default `{python} {prefectlite} start --port {port}`; the port comes from
--url) with a fresh PREFECT_HOME, waits for GET /api/health, then sums VmRSS over the process and all its
descendants from /proc:
  idle   : --settle seconds after the first 200 on /health
  during : the highest sum seen while loading (sampled every 0.25 s)
  after  : --settle seconds after loading --runs flow runs (default 10,000), each with --tasks task runs
           (default 3: 30,000) and one POST /logs/ of --log-lines lines (default 10: 100,000 lines), sent by
           --clients parallel keep-alive clients with the SDK's call sequence:
           POST /flow_runs/ (PENDING), set_state RUNNING, per task (POST /task_runs/, set_state RUNNING,
           set_state COMPLETED), POST /logs/, set_state COMPLETED.
Also reports the sum of VmHWM (each process's own peak). Use --pid to measure a server that is already
running instead of starting one. Targets: < 40 MB idle, < 80 MB after.

    python tests/benchmarks/bench_memory.py --url http://127.0.0.1:4200/api
    python tests/benchmarks/bench_memory.py --url http://127.0.0.1:4401/api --runs 600 \\
        --command '/tmp/benchvenv/bin/prefect server start --host 127.0.0.1 --port {port}'
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import threading
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as B  # noqa: E402


def load(target: B.Target, args, sampler) -> dict:
    status, body = B.get_json(target, "POST", "/flows/", {"name": "bench-memory", "tags": []})
    if status not in (200, 201):
        sys.exit(f"POST /flows/ -> {status}: {body!r}")
    flow_id = body["id"]
    counter = itertools.count()
    stats = [B.Stats(max_samples=args.error_samples) for _ in range(args.clients)]
    done = [[0, 0, 0] for _ in range(args.clients)]  # runs, task runs, log lines answered 2xx
    deadline = time.perf_counter() + args.load_timeout
    tasks = [(f"task{k}", f"task{k}-{k:08x}") for k in range(args.tasks)]

    def worker(idx):
        st = stats[idx]
        cli = B.Client(target, timeout=args.timeout)

        def call(op, path, body):
            status, data, secs = cli.request("POST", path, body)
            return st.add(op, status, secs, "POST", path, data, body), data

        while time.perf_counter() < deadline:
            if next(counter) >= args.runs:
                break
            ok, data = call("flow_run_create", "/flow_runs/", B.flow_run_create_body(flow_id))
            fr = B.parse_id(data) if ok else None
            if fr is None:
                cli.backoff()
                continue
            ok, _ = call("flow_run_set_state", f"/flow_runs/{fr}/set_state", B.flow_run_set_state_body(fr, "RUNNING"))
            if not ok:
                continue
            tids, prev, failed = [], None, False
            for name, key in tasks:
                inputs = {"xs": [{"input_type": "task_run", "id": prev}]} if prev else {}
                ok, data = call(
                    "task_run_create", "/task_runs/", B.task_run_create_body(fr, f"{name}-0", key, "0", inputs)
                )
                tr = B.parse_id(data) if ok else None
                if tr is None:
                    failed = True
                    break
                done[idx][1] += 1
                tids.append(tr)
                for stype in ("RUNNING", "COMPLETED"):
                    ok, _ = call(
                        "task_run_set_state", f"/task_runs/{tr}/set_state", B.task_run_set_state_body(tr, stype)
                    )
                    failed = failed or not ok
                prev = tr
            if failed:
                continue
            if args.log_lines:
                ok, _ = call("logs", "/logs/", B.logs_body(fr, tids, args.log_lines))
                if ok:
                    done[idx][2] += args.log_lines
            ok, _ = call(
                "flow_run_set_state",
                f"/flow_runs/{fr}/set_state",
                B.flow_run_set_state_body(fr, "COMPLETED", data=B.result_data("int")),
            )
            if ok:
                done[idx][0] += 1
        cli.close()

    ths = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.clients)]
    t0 = time.perf_counter()
    for t in ths:
        t.start()
    last_log = t0
    while any(t.is_alive() for t in ths):
        sampler()
        time.sleep(0.25)
        if time.perf_counter() - last_log >= 5:
            last_log = time.perf_counter()
            runs = sum(d[0] for d in done)
            B.log(f"  loaded {runs:,}/{args.runs:,} runs ({runs / (last_log - t0):,.0f} runs/s)")
    for t in ths:
        t.join()
    elapsed = time.perf_counter() - t0
    total = B.Stats(max_samples=args.error_samples)
    for s in stats:
        total.merge(s)
    lat = total.all_latencies()
    return {
        "runs_completed": sum(d[0] for d in done),
        "task_runs_created": sum(d[1] for d in done),
        "log_lines_accepted": sum(d[2] for d in done),
        "elapsed_s": round(elapsed, 1),
        "requests": total.count,
        "req_per_s": round(total.count / elapsed, 1) if elapsed else 0,
        **B.summarize(lat),
        "errors": dict(total.errors),
        "error_samples": total.samples,
        "timed_out": time.perf_counter() >= deadline,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=B.DEFAULT_URL, help="where the server listens (default %(default)s)")
    ap.add_argument("--command", default=B.DEFAULT_COMMAND, help="server command template with {port}")
    ap.add_argument("--prefectlite", default=B.DEFAULT_PREFECTLITE, help="path to prefectlite.py")
    ap.add_argument("--pid", type=int, default=None, help="measure this already-running server instead")
    ap.add_argument("--runs", type=int, default=10_000, help="flow runs to load (default 10,000)")
    ap.add_argument("--tasks", type=int, default=3, help="task runs per flow run (default 3)")
    ap.add_argument("--log-lines", type=int, default=10, help="log lines per flow run (default 10)")
    ap.add_argument("--clients", type=int, default=8, help="parallel loading clients (default 8)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait before each reading")
    ap.add_argument("--start-timeout", type=float, default=60.0)
    ap.add_argument("--load-timeout", type=float, default=1800.0, help="stop loading after this many s")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout")
    ap.add_argument("--error-samples", type=int, default=5)
    ap.add_argument("--keep-home", action="store_true")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = ap.parse_args(argv)
    target = B.Target(args.url)

    proc = None
    home = None
    command = None
    try:
        if args.pid:
            root = args.pid
            if B.health_once(target.host, target.port, target.base) != 200:
                sys.exit(f"no 200 on {args.url}/health")
        else:
            if B.port_in_use(target.host, target.port):
                sys.exit(f"port {target.port} already in use: choose a free one with --url")
            home = B.fresh_home("prefectlite-mem-")
            command = B.build_command(args.command, target.port, home, args.prefectlite)
            B.log(f"starting: {command}")
            t0 = time.perf_counter()
            proc = B.start_server(command, home, os.path.join(home, "server.log"))
            t_ok = B.wait_health(target.host, target.port, target.base, args.start_timeout, proc)
            if t_ok is None:
                with open(os.path.join(home, "server.log"), "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                sys.exit(f"server did not become healthy:\n{tail}")
            B.log(f"  healthy after {t_ok - t0:.2f} s")
            root = proc.pid

        time.sleep(args.settle)
        idle = B.tree_memory(root)
        B.log(f"idle: {idle['rss_mb']} MB over {len(idle['processes'])} process(es)")

        peak = {"rss_mb": 0.0}

        def sampler():
            m = B.tree_memory(root)
            if m["rss_mb"] > peak["rss_mb"]:
                peak.update(m)

        B.log(
            f"loading {args.runs:,} runs x {args.tasks} tasks, {args.log_lines} log lines each, "
            f"{args.clients} clients ..."
        )
        loaded = load(target, args, sampler)
        time.sleep(args.settle)
        after = B.tree_memory(root)
        _, fr_count = B.get_json(target, "POST", "/flow_runs/count", {})
        _, tr_count = B.get_json(target, "POST", "/task_runs/count", {})
    finally:
        if proc is not None:
            B.stop_server(proc)
        if home and not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)

    out = {
        "benchmark": "memory",
        "url": args.url,
        "command": command,
        "pid": args.pid,
        "idle": idle,
        "during_load_peak": peak,
        "after": after,
        "load": loaded,
        "server_counts": {"flow_runs": fr_count, "task_runs": tr_count},
        "argv": " ".join(sys.argv),
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"memory of the server process tree ({command or 'pid %s' % args.pid})")
    print(
        f"load: {loaded['runs_completed']:,} flow runs, {loaded['task_runs_created']:,} task runs, "
        f"{loaded['log_lines_accepted']:,} log lines in {loaded['elapsed_s']} s "
        f"({loaded['req_per_s']} req/s, p99 {loaded['p99_ms']} ms, errors {B.fmt_errors(Counter(loaded['errors']))}); "
        f"server counts: {fr_count} flow runs, {tr_count} task runs"
    )
    B.print_table(
        ["reading", "RSS MB (sum)", "processes", "sum VmHWM MB", "target"],
        [
            ["idle", idle["rss_mb"], len(idle["processes"]), idle["hwm_mb"], "< 40 MB"],
            [
                "during load (peak sample)",
                peak.get("rss_mb"),
                len(peak.get("processes", [])),
                peak.get("hwm_mb", ""),
                "",
            ],
            ["after load", after["rss_mb"], len(after["processes"]), after["hwm_mb"], "< 80 MB"],
        ],
    )
    print("\nprocesses after load:")
    for p in after["processes"]:
        print(f"  {p['pid']:>7}  {p['rss_mb']:>7} MB  {p['cmd']}")
    if loaded["error_samples"]:
        print("\nfirst errors:")
        for s in loaded["error_samples"]:
            print(
                f"  {s.get('method', '')} {s.get('path', '')} [{s.get('op')}] -> {s.get('status')}: {s.get('response')}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
