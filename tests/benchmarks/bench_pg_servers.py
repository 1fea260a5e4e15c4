#!/usr/bin/env python3
"""Several prefectlite servers on one PostgreSQL database, under the write load, within max_connections.

Starts `--servers` (2) `prefectlite start` processes on a fresh database of the PostgreSQL cluster of
`--postgres-url` (created, and dropped at the end), then runs bench_write_load.py's load (the SDK's 13 calls
per flow run) from `--clients` (60) threads against each server at once, for `--duration` seconds.

Counted per server: answers, 503s that carry a JSON `reason` (allowed: the client is told to retry), and any
other error (any other status, a 503 without a reason, a failed connection). While the load runs and after
it, `psql -c 'select 1'` must connect to the cluster (`--psql`); the connections each server holds are
sampled from pg_stat_activity (by application_name `prefectlite[PID]`); once the load is over each idle
server must come down to at most POOL_SIZE connections (overflow ones close after 2 s idle).

    python tests/benchmarks/bench_pg_servers.py --duration 20

Exit status 1 when any of those fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as B  # noqa: E402
import bench_write_load as W  # noqa: E402

REASON_OK = "503 with a reason"


class ReasonStats(B.Stats):
    """Stats that count a 503 whose JSON body gives a `reason` apart from the errors."""

    def add(self, op, status, seconds, method="", path="", body=None, req=None):
        if status == 503 and _reason(body):
            self.count += 1
            self.lat.setdefault(op, []).append(seconds)
            self.errors[f"{REASON_OK}: {_reason(body)}"] += 1
            return False
        return super().add(op, status, seconds, method, path, body, req)


def _reason(body) -> str | None:
    try:
        return json.loads(body).get("reason") or None
    except (ValueError, TypeError, AttributeError):
        return None


class Cluster:
    """The PostgreSQL cluster: a fresh database for the servers, connection counts, psql checks."""

    def __init__(self, url: str, psql: str):
        import psycopg  # the servers need it too

        self.url = url
        self.psql = psql
        self.name = f"prefectlite_bench_{uuid.uuid4().hex[:10]}"
        self.admin = psycopg.connect(url, autocommit=True, application_name="bench_pg_servers")
        self.admin.execute(f'CREATE DATABASE "{self.name}"')
        self.database_url = url.rsplit("/", 1)[0] + "/" + self.name
        self.max_connections = int(self.admin.execute("SHOW max_connections").fetchone()[0])

    def connections(self) -> dict:
        """{application_name: count} of client sessions in the whole cluster."""
        rows = self.admin.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 1"
        ).fetchall()
        return dict(rows)

    def psql_connects(self) -> tuple[bool, str]:
        try:
            done = subprocess.run(shlex.split(self.psql), capture_output=True, text=True, timeout=15)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, str(exc)
        return done.returncode == 0, (done.stderr or done.stdout).strip()[:200]

    def drop(self):
        self.admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.admin.close()


class Watcher:
    """During the load: psql connects every `every` seconds; the most connections each server held."""

    def __init__(self, cluster: Cluster, names: list[str], every: float = 1.0):
        self.cluster, self.names, self.every = cluster, names, every
        self.most = {name: 0 for name in names}
        self.most_in_cluster = 0
        self.psql_ok = self.psql_failed = 0
        self.psql_errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.is_set():
            counts = self.cluster.connections()
            for name in self.names:
                self.most[name] = max(self.most[name], counts.get(name, 0))
            self.most_in_cluster = max(self.most_in_cluster, sum(counts.values()))
            ok, why = self.cluster.psql_connects()
            if ok:
                self.psql_ok += 1
            else:
                self.psql_failed += 1
                self.psql_errors.append(why)
            self._stop.wait(self.every)

    def stop(self):
        self._stop.set()
        self._thread.join(30)


def start_servers(args, cluster: Cluster) -> list[tuple[subprocess.Popen, B.Target, str]]:
    servers = []
    env = {
        "PREFECT_API_DATABASE_CONNECTION_URL": cluster.database_url,
        "PREFECT_API_DATABASE_POOL_SIZE": str(args.pool_size),
        "PREFECT_API_DATABASE_MAX_OVERFLOW": str(args.max_overflow),
    }
    for _ in range(args.servers):  # one after the other: the first one migrates the new database
        port = B.free_port()
        home = B.fresh_home()
        command = B.build_command(B.DEFAULT_COMMAND, port, home, args.prefectlite)
        proc = B.start_server(command, home, os.path.join(home, "server.log"), env)
        if B.wait_health("127.0.0.1", port, "/api", 60, proc) is None:
            raise SystemExit(f"server on port {port} did not become healthy; see {home}/server.log")
        servers.append((proc, B.Target(f"http://127.0.0.1:{port}/api"), f"prefectlite[{proc.pid}]"))
    return servers


def run_load(args, targets: list[B.Target]) -> list[dict]:
    load_args = argparse.Namespace(
        duration=args.duration,
        runs=None,
        max_time=args.duration,
        log_lines=5,
        flow_name="bench-pg",
        timeout=60.0,
        no_gzip=False,
        error_samples=3,
    )
    results: list[dict | None] = [None] * len(targets)

    def one(i):
        results[i] = W.run_level(targets[i], args.clients, load_args, None, stats_class=ReasonStats)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(targets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def settle(cluster: Cluster, names: list[str], pool_size: int, within: float) -> tuple[dict, float]:
    """Poll until every idle server holds at most pool_size connections (or `within` s have passed)."""
    started = time.perf_counter()
    while True:
        counts = cluster.connections()
        held = {name: counts.get(name, 0) for name in names}
        if all(n <= pool_size for n in held.values()) or time.perf_counter() - started > within:
            return held, time.perf_counter() - started
        time.sleep(0.1)


def summary(args, cluster, names, results, watcher, idle, settle_s, psql_after) -> dict:
    servers = []
    for name, r in zip(names, results):
        allowed = sum(n for kind, n in r["errors"].items() if kind.startswith(REASON_OK))
        others = {kind: n for kind, n in r["errors"].items() if not kind.startswith(REASON_OK)}
        servers.append(
            {
                "server": name,
                "requests": r["requests"],
                "req_per_s": r["req_per_s"],
                "runs_per_s": r["runs_per_s"],
                "p50_ms": r["p50_ms"],
                "p99_ms": r["p99_ms"],
                "max_ms": r["max_ms"],
                "answers_503_with_reason": allowed,
                "errors": others,
                "reasons": sorted(kind.split(": ", 1)[1] for kind in r["errors"] if kind.startswith(REASON_OK)),
                "error_samples": r["error_samples"],
                "most_connections": watcher.most[name],
                "idle_connections": idle[name],
            }
        )
    ok = (
        all(not s["errors"] and s["idle_connections"] <= args.pool_size for s in servers)
        and watcher.psql_failed == 0
        and psql_after[0]
    )
    return {
        "benchmark": "pg_servers",
        "servers": servers,
        "clients_per_server": args.clients,
        "duration_s": args.duration,
        "pool_size": args.pool_size,
        "max_overflow": args.max_overflow,
        "max_connections": cluster.max_connections,
        "most_connections_in_cluster": watcher.most_in_cluster,
        "psql_during": {
            "connected": watcher.psql_ok,
            "refused": watcher.psql_failed,
            "first_refusal": watcher.psql_errors[0] if watcher.psql_errors else None,
        },
        "psql_after": {"connected": psql_after[0], "output": psql_after[1]},
        "settled_after_s": round(settle_s, 1),
        "ok": ok,
    }


def print_summary(out: dict):
    print(
        f"{len(out['servers'])} servers × {out['clients_per_server']} clients, write load for "
        f"{out['duration_s']:g} s on one PostgreSQL database (max_connections {out['max_connections']}); "
        f"POOL_SIZE {out['pool_size']}, MAX_OVERFLOW {out['max_overflow']}"
    )
    B.print_table(
        [
            "server",
            "requests",
            "req/s",
            "runs/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "503+reason",
            "errors",
            "most conns",
            "idle conns",
        ],
        [
            [
                s["server"],
                s["requests"],
                s["req_per_s"],
                s["runs_per_s"],
                s["p50_ms"],
                s["p99_ms"],
                s["max_ms"],
                s["answers_503_with_reason"],
                sum(s["errors"].values()),
                s["most_connections"],
                s["idle_connections"],
            ]
            for s in out["servers"]
        ],
    )
    during, after = out["psql_during"], out["psql_after"]
    print(f"most client connections in the cluster during the load: {out['most_connections_in_cluster']}")
    print(
        f"psql during the load: {during['connected']} connected, {during['refused']} refused"
        + (f" ({during['first_refusal']})" if during["first_refusal"] else "")
    )
    print(f"psql after the load: {'connected' if after['connected'] else 'refused: ' + after['output']}")
    print(f"idle servers at POOL_SIZE or below {out['settled_after_s']:.1f} s after the load")
    for s in out["servers"]:
        for reason in s["reasons"]:
            print(f"  {s['server']}: 503 reason: {reason}")
        for kind, n in sorted(s["errors"].items()):
            print(f"  {s['server']}: error {n} × {kind}")
        for sample in s["error_samples"]:
            print(
                f"  {s['server']} first errors: {sample.get('method')} {sample.get('path')} -> "
                f"{sample.get('status')}: {str(sample.get('response'))[:200]}"
            )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--postgres-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="a database of the cluster to use; a fresh one is created beside it (default %(default)s)",
    )
    ap.add_argument(
        "--psql",
        default="psql -h 127.0.0.1 -U postgres -d test -c 'select 1'",
        help="the command that must connect during and after the load",
    )
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=60, help="client threads per server (default 60)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20, at most 30)")
    ap.add_argument("--pool-size", type=int, default=5)
    ap.add_argument("--max-overflow", type=int, default=10)
    ap.add_argument("--prefectlite", default=B.DEFAULT_PREFECTLITE)
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = ap.parse_args(argv)
    if not 0 < args.duration <= 30 or not 1 <= args.clients <= 256 or not 1 <= args.servers <= 8:
        ap.error("--duration must be in (0, 30], --clients in 1..256, --servers in 1..8")

    cluster = Cluster(args.postgres_url, args.psql)
    servers = []
    try:
        servers = start_servers(args, cluster)
        names = [name for _proc, _target, name in servers]
        B.log(f"{len(servers)} servers up ({', '.join(names)}); {args.clients} clients each for {args.duration:g} s")
        watcher = Watcher(cluster, names)
        results = run_load(args, [target for _proc, target, _name in servers])
        watcher.stop()
        idle, settle_s = settle(cluster, names, args.pool_size, within=30)
        psql_after = cluster.psql_connects()
        out = summary(args, cluster, names, results, watcher, idle, settle_s, psql_after)
    finally:
        for proc, _target, _name in servers:
            B.stop_server(proc)
        cluster.drop()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_summary(out)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
