#!/usr/bin/env python3
"""Read load: the UI's flow-run list and dashboard queries against a server holding many flow runs.

1. Seed (skip with --no-seed): N flow runs (default 100,000) through the API from several threads, each
   with its own keep-alive connection. Each run is created with POST /flow_runs/ in state SCHEDULED whose
   state_details.scheduled_time (hence expected_start_time) is spread over the last 7 days, then (for
   ~85% of them) forced with one POST /flow_runs/{id}/set_state {"force": true} into COMPLETED (60%),
   FAILED (15%) or RUNNING (10%); the rest stay SCHEDULED. A few flows and tags are used.
2. Measure, each query for --duration seconds from --clients clients (default 8):
     filter  : POST /flow_runs/filter  {"limit": 50, "sort": "EXPECTED_START_TIME_DESC"}
     count   : POST /flow_runs/count   state type FAILED/CRASHED + expected_start_time.after_ = now - window
     history : POST /flow_runs/history history_start/history_end/history_interval_seconds over the window
   and reports req/s and latencies per query.

    python tests/benchmarks/bench_read_load.py --url http://127.0.0.1:4200/api --seed 100000 --duration 10
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
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as B  # noqa: E402

FLOWS = ["bench-etl", "bench-report", "bench-sync"]
TAGS = ["prod", "dev", "nightly", "team-a", "team-b"]
STATE_MIX = [("COMPLETED", 60), ("FAILED", 15), ("RUNNING", 10), ("SCHEDULED", 15)]


# --------------------------------------------------------------------------- seeding


def seed(target: B.Target, n: int, threads: int, args) -> dict:
    flow_ids = []
    for name in FLOWS:
        status, body = B.get_json(target, "POST", "/flows/", {"name": name, "tags": []})
        if status not in (200, 201) or not isinstance(body, dict):
            sys.exit(f"POST /flows/ {name!r} -> {status}: {body!r}")
        flow_ids.append(body["id"])
    now = datetime.now(timezone.utc)
    span = args.span_days * 86400.0
    counter = itertools.count()
    stats = [B.Stats(max_samples=args.error_samples) for _ in range(threads)]
    created = [0] * threads
    deadline = time.perf_counter() + args.seed_timeout
    weights = []
    for stype, w in STATE_MIX:
        weights += [stype] * w

    def worker(idx):
        st = stats[idx]
        cli = B.Client(target, timeout=args.timeout)
        while time.perf_counter() < deadline:
            i = next(counter)
            if i >= n:
                break
            r = B.rng(args.random_seed * 1_000_003 + i)
            stype = weights[r.randrange(len(weights))]
            when = now - timedelta(seconds=r.random() * span)
            tags = r.sample(TAGS, r.randrange(3))
            flow_id = flow_ids[i % len(flow_ids)]
            body = B.flow_run_create_body(
                flow_id, "SCHEDULED", scheduled_time=when.isoformat(), tags=tags, parameters={"i": i}
            )
            status, data, secs = cli.request("POST", "/flow_runs/", body)
            if not st.add("seed_create", status, secs, "POST", "/flow_runs/", data, body):
                cli.backoff()
                continue
            fr = B.parse_id(data)
            if fr is None:
                st.error("bad-flow-run-body")
                continue
            if stype != "SCHEDULED":
                data_field = B.result_data("int") if stype == "COMPLETED" else None
                body = B.flow_run_set_state_body(fr, stype, force=True, data=data_field)
                path = f"/flow_runs/{fr}/set_state"
                status, data, secs = cli.request("POST", path, body)
                if not st.add("seed_set_state", status, secs, "POST", path, data, body):
                    continue
            created[idx] += 1
        cli.close()

    ths = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ths:
        t.start()
    last = t0
    while any(t.is_alive() for t in ths):
        for t in ths:
            t.join(timeout=0.5)
        if time.perf_counter() - last >= 5:
            last = time.perf_counter()
            done = sum(created)
            B.log(f"  seeded {done:,}/{n:,} ({done / (last - t0):,.0f} runs/s)")
    elapsed = time.perf_counter() - t0
    total = B.Stats(max_samples=args.error_samples)
    for s in stats:
        total.merge(s)
    lat = total.all_latencies()
    return {
        "runs_requested": n,
        "runs_created": sum(created),
        "elapsed_s": round(elapsed, 1),
        "runs_per_s": round(sum(created) / elapsed, 1) if elapsed else 0,
        "requests": total.count,
        "req_per_s": round(total.count / elapsed, 1) if elapsed else 0,
        **B.summarize(lat),
        "errors": dict(total.errors),
        "error_samples": total.samples,
        "timed_out": time.perf_counter() >= deadline,
    }


# --------------------------------------------------------------------------- queries


def query_bodies(window_hours: float, buckets: int) -> dict:
    now = datetime.now(timezone.utc)
    start = now - timedelta(hours=window_hours)
    return {
        "filter": ("/flow_runs/filter", {"limit": 50, "sort": "EXPECTED_START_TIME_DESC"}),
        "count": (
            "/flow_runs/count",
            {
                "flow_runs": {
                    "state": {"type": {"any_": ["FAILED", "CRASHED"]}},
                    "expected_start_time": {"after_": start.isoformat()},
                }
            },
        ),
        "history": (
            "/flow_runs/history",
            {
                "history_start": start.isoformat(),
                "history_end": now.isoformat(),
                "history_interval_seconds": window_hours * 3600.0 / buckets,
            },
        ),
    }


def describe(name: str, data: bytes) -> str:
    try:
        v = json.loads(data)
    except ValueError:
        return "unparseable"
    if name == "filter":
        return f"{len(v)} rows" if isinstance(v, list) else f"? {str(v)[:40]}"
    if name == "count":
        return f"count={v}"
    if name == "history":
        if isinstance(v, list):
            runs = sum(s.get("count_runs", 0) for b in v for s in b.get("states", []))
            return f"{len(v)} buckets, {runs} runs"
        return f"? {str(v)[:40]}"
    return ""


def measure(target: B.Target, name: str, path: str, payload: dict, clients: int, args) -> dict:
    body = json.dumps(payload).encode()
    # one probe request first: what does the answer look like?
    probe = B.Client(target, timeout=args.timeout, gzip_ok=not args.no_gzip)
    pstatus, pdata, psecs = probe.request("POST", path, body)
    probe.close()
    check = describe(name, pdata) if pstatus == 200 else f"HTTP {pstatus}: {pdata[:200].decode(errors='replace')}"
    resp_bytes = len(pdata)

    stats = [B.Stats(max_samples=args.error_samples) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    box = {}

    def worker(idx):
        st = stats[idx]
        cli = B.Client(target, timeout=args.timeout, gzip_ok=not args.no_gzip)
        barrier.wait()
        end = box["end"]
        n = 0
        while time.perf_counter() < end and n < args.max_requests:
            status, data, secs = cli.request("POST", path, body)
            st.add(name, status, secs, "POST", path, data, body)
            cli.backoff()
            n += 1
        cli.close()

    ths = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in ths:
        t.start()
    cpu0 = B.client_cpu_seconds()
    t0 = time.perf_counter()
    box["end"] = t0 + args.duration
    barrier.wait()
    for t in ths:
        t.join(timeout=args.duration + args.timeout + 5)
    elapsed = time.perf_counter() - t0
    cpu = B.client_cpu_seconds() - cpu0
    total = B.Stats(max_samples=args.error_samples)
    for s in stats:
        total.merge(s)
    lat = total.all_latencies()
    return {
        "query": name,
        "path": path,
        "body": payload,
        "clients": clients,
        "elapsed_s": round(elapsed, 2),
        "requests": total.count,
        "req_per_s": round(total.count / elapsed, 1) if elapsed else 0,
        **B.summarize(lat),
        "errors": dict(total.errors),
        "error_samples": total.samples,
        "answer": check,
        "first_answer_ms": round(psecs * 1000, 1),
        "response_bytes": resp_bytes,
        "client_cpu_pct": round(100 * cpu / elapsed) if elapsed else 0,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=B.DEFAULT_URL, help="API base URL (default %(default)s)")
    ap.add_argument("--seed", type=int, default=100_000, help="flow runs to create first (default 100,000)")
    ap.add_argument("--no-seed", action="store_true", help="use the data already on the server")
    ap.add_argument("--seed-threads", type=int, default=8, help="parallel seeding clients (default 8)")
    ap.add_argument("--seed-timeout", type=float, default=1800.0, help="give up seeding after this many s")
    ap.add_argument("--span-days", type=float, default=7.0, help="expected start times spread over N days")
    ap.add_argument("--random-seed", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8, help="concurrent readers (default 8)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per query (default 10)")
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="per-client request cap per query")
    ap.add_argument("--queries", default="filter,count,history", help="which queries, comma-separated")
    ap.add_argument(
        "--window-hours",
        type=float,
        default=24.0,
        help="dashboard time window for count/history (default 24 h, the UI's default)",
    )
    ap.add_argument("--buckets", type=int, default=24, help="history buckets over the window (default 24)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--no-gzip", action="store_true", help="do not send Accept-Encoding: gzip")
    ap.add_argument("--error-samples", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = ap.parse_args(argv)

    target = B.Target(args.url)
    status, body = B.get_json(target, "GET", "/health")
    if status != 200:
        sys.exit(f"server at {args.url} not healthy: GET /health -> {status} {body!r}")
    _, version = B.get_json(target, "GET", "/admin/version")

    seeded = None
    if not args.no_seed and args.seed > 0:
        B.log(f"seeding {args.seed:,} flow runs with {args.seed_threads} threads ...")
        seeded = seed(target, args.seed, args.seed_threads, args)
        B.log(f"  done: {seeded['runs_created']:,} in {seeded['elapsed_s']} s")
    _, total_runs = B.get_json(target, "POST", "/flow_runs/count", {})

    bodies = query_bodies(args.window_hours, args.buckets)
    results = []
    for q in [x.strip() for x in args.queries.split(",") if x.strip()]:
        if q not in bodies:
            ap.error(f"unknown query {q!r}; choose from {', '.join(bodies)}")
        path, payload = bodies[q]
        B.log(f"query {q}: {args.clients} clients, {args.duration:g}s ...")
        results.append(measure(target, q, path, payload, args.clients, args))

    out = {
        "benchmark": "read_load",
        "url": args.url,
        "server_version": version,
        "seed": seeded,
        "flow_runs_on_server": total_runs,
        "queries": results,
        "argv": " ".join(sys.argv),
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"read load against {args.url} (server version {version}); {total_runs} flow runs on the server")
    if seeded:
        print(
            f"seeded {seeded['runs_created']:,}/{seeded['runs_requested']:,} runs in {seeded['elapsed_s']} s "
            f"({seeded['runs_per_s']:,} runs/s, {seeded['req_per_s']:,} req/s, p99 {seeded['p99_ms']} ms, "
            f"errors {B.fmt_errors(Counter(seeded['errors']))})"
        )
    B.print_table(
        [
            "query",
            "clients",
            "requests",
            "req/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "errors",
            "answer",
            "bytes",
            "bench cpu",
        ],
        [
            [
                r["query"],
                r["clients"],
                r["requests"],
                r["req_per_s"],
                r["p50_ms"],
                r["p90_ms"],
                r["p99_ms"],
                r["max_ms"],
                B.fmt_errors(Counter(r["errors"])),
                r["answer"],
                r["response_bytes"],
                f"{r['client_cpu_pct']}%",
            ]
            for r in results
        ],
    )
    samples = (seeded["error_samples"] if seeded else []) + [s for r in results for s in r["error_samples"]]
    if samples:
        print("\nfirst errors:")
        for s in samples[: args.error_samples * 2]:
            print(
                f"  {s.get('method', '')} {s.get('path', '')} [{s.get('op')}] -> {s.get('status')}: {s.get('response')}"
            )
            if s.get("request"):
                print(f"      request body: {s['request'][:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
