#!/usr/bin/env python3
"""One round of the task-run dispatcher (background task runs for task workers), timed in-process.

Imports prefectlite.py from `--build` (a folder; default this checkout), opens a fresh database (a SQLite file
in a temporary folder, or `--database postgresql://...`, whose public schema is dropped first: give it a
throwaway database), migrates it and seeds `--runs` (2,000) scheduled background task runs (3.x: deferred)
spread over `--keys` (20,000) task keys, `--other-runs` (20,000) scheduled runs of keys nobody
subscribes to (other workers' keys, not connected now) and `--flow-task-runs` (50,000) completed task runs of
flow runs (10 a flow run), as a server holds besides. `--subscribers` (32) task workers subscribe, each to
every key. Then `--rounds` (5) times each:

- deliver: every worker ready, no delivery claimed: the round hands one run to each worker (32 claims);
  the claims are then dropped again for the next round;
- idle: every worker ready, every scheduled run already claimed (delivered, not yet running): the round
  finds nothing to send.

Prints min / median / max seconds of each. The workers are the server's TaskRunSubscriber objects subscribed
through their own message parser, on a stand-in connection that counts what it is sent (no sockets: the
round's own cost, not the network's), and the dispatcher's round is called directly (its thread is not run).

    python tests/benchmarks/bench_task_dispatch.py --build /tmp/before && python tests/benchmarks/bench_task_dispatch.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid


class Connection:
    """Stands in for a worker's WebSocket: counts the runs it is sent."""

    subprotocol = None

    def __init__(self):
        self.sent = 0

    def send_json(self, message):
        self.sent += 1

    def close(self, code, reason):
        raise AssertionError(f"the subscriber closed: {code} {reason}")


class App:
    """What TaskRunSubscriber asks of the App: the dispatcher to subscribe to."""

    def __init__(self, dispatcher):
        self.task_dispatcher = dispatcher


class Subscribing:
    def __init__(self):
        self.subscribed = []

    def subscribe(self, subscriber):
        self.subscribed.append(subscriber)


def seed(prefectlite, db, keys: list[str], runs: int, other_runs: int, flow_task_runs: int):
    batch = 2000
    specs = []  # (task key, flow run id): the flows' older task runs first, then the scheduled ones
    with db.write() as tx:
        flow = prefectlite.create_flow(tx, {"name": "bench", "tags": []})[0]
    for start in range(0, flow_task_runs, batch):  # what a server holds besides: flows' finished task runs
        with db.write() as tx:
            for i in range(start, min(start + batch, flow_task_runs), 10):
                flow_run, _ = prefectlite.create_flow_run(
                    tx, {"flow_id": flow["id"], "state": {"type": "COMPLETED", "state_details": {}}}, {}
                )
                specs.extend((f"flow-task-{j % 50}", flow_run["id"]) for j in range(i, min(i + 10, flow_task_runs)))
    specs += [(keys[i % len(keys)], None) for i in range(runs)] + [(f"other-{i}", None) for i in range(other_runs)]
    for start in range(0, len(specs), batch):
        with db.write() as tx:
            for key, flow_run_id in specs[start : start + batch]:
                state = {"type": "SCHEDULED", "state_details": {"deferred": True}}
                if flow_run_id is not None:
                    state = {"type": "COMPLETED", "state_details": {}}
                prefectlite.create_task_run(
                    tx,
                    {"task_key": key, "dynamic_key": uuid.uuid4().hex, "flow_run_id": flow_run_id, "state": state},
                )
        print(f"seeded {min(start + batch, len(specs))}/{len(specs)} task runs", file=sys.stderr)
    if db.dialect == "postgresql":  # its autovacuum would have; SQLite's server never runs ANALYZE
        with db.write() as tx:
            tx.execute("ANALYZE")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--build", default=os.path.dirname(os.path.dirname(here)))
    parser.add_argument("--database", default="")
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--subscribers", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2_000)
    parser.add_argument("--other-runs", type=int, default=20_000)
    parser.add_argument("--flow-task-runs", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not (
        1 <= args.keys <= 100_000
        and 1 <= args.subscribers <= 256
        and 0 <= args.runs <= 100_000
        and 0 <= args.other_runs <= 100_000
        and 0 <= args.flow_task_runs <= 500_000
        and 1 <= args.rounds <= 50
    ):
        parser.error("--keys 1-100000, --subscribers 1-256, --runs/--other-runs 0-100000, --rounds 1-50")
    sys.path.insert(0, os.path.abspath(args.build))
    import prefectlite

    folder = tempfile.mkdtemp(prefix="prefectlite-bench-task-dispatch-")
    url = args.database or f"sqlite:///{folder}/x.db"
    db = prefectlite.open_database(url, prefectlite.load_settings(env={"PREFECT_HOME": folder}))
    if db.dialect == "postgresql":  # whatever an earlier run (of any build) left
        with db.write() as tx:
            tx.execute("DROP SCHEMA public CASCADE")
            tx.execute("CREATE SCHEMA public")
        db.forget_columns()
    prefectlite.migrate(db)
    keys = [f"tasks.key_{i:06d}-{uuid.uuid4().hex[:8]}" for i in range(args.keys)]
    seed(prefectlite, db, keys, args.runs, args.other_runs, args.flow_task_runs)

    dispatcher = prefectlite.TaskRunDispatcher(db)
    app = App(Subscribing())
    subscribers = []
    for i in range(args.subscribers):
        subscriber = prefectlite.TaskRunSubscriber(app, Connection())
        subscriber.authenticated = True
        subscriber.receive([json.dumps({"type": "subscribe", "keys": keys, "client_id": f"worker-{i}"})])
        subscribers.append(subscriber)
    assert len(app.task_dispatcher.subscribed) == args.subscribers

    def forget_claims():
        with db.write() as tx:
            tx.execute("DELETE FROM concurrency_lease")
        dispatcher._claims.clear()
        for subscriber in subscribers:
            subscriber.awaiting = None

    def one_round() -> float:
        started = time.perf_counter()
        dispatcher._dispatch([s for s in subscribers if s.awaiting is None])
        return time.perf_counter() - started

    figures = {"deliver": [], "idle": []}
    sent_before = sum(s.ws.sent for s in subscribers)
    for _ in range(args.rounds):
        forget_claims()
        figures["deliver"].append(one_round())
    delivered = sum(s.ws.sent for s in subscribers) - sent_before
    with db.write() as tx:  # every scheduled run claimed: an idle round finds nothing to send
        tx.execute("DELETE FROM concurrency_lease")
        for row in tx.query("SELECT state_id FROM task_run WHERE state_type = 'SCHEDULED'"):
            tx.execute(
                "INSERT INTO concurrency_lease (id, created, expiration, limit_ids, slots, holder) "
                "VALUES (?, ?, ?, '[]', 0, '{}')",
                (row["state_id"], prefectlite.now_iso(), "9999-01-01T00:00:00+00:00"),
            )
    dispatcher._claims.clear()
    for subscriber in subscribers:
        subscriber.awaiting = None
    sent_before = sum(s.ws.sent for s in subscribers)
    for _ in range(args.rounds):
        figures["idle"].append(one_round())
    assert sum(s.ws.sent for s in subscribers) == sent_before, "an idle round sent something"
    db.close()

    summary = {
        "dialect": db.dialect,
        "keys": args.keys,
        "subscribers": args.subscribers,
        "runs": args.runs,
        "other_runs": args.other_runs,
        "delivered_per_round": delivered / args.rounds,
        **{
            name: {"min": min(values), "median": statistics.median(values), "max": max(values)}
            for name, values in figures.items()
        },
    }
    if args.json:
        print(json.dumps(summary))
        return
    print(
        f"{summary['dialect']}: {args.keys} keys, {args.subscribers} subscribers (each to every key), "
        f"{args.runs} runs of theirs + {args.other_runs} of other keys scheduled"
    )
    print(f"{'round':<8} {'min s':>8} {'median s':>9} {'max s':>8}")
    for name in figures:
        f = summary[name]
        print(f"{name:<8} {f['min']:>8.3f} {f['median']:>9.3f} {f['max']:>8.3f}")
    print(f"runs sent per deliver round: {summary['delivered_per_round']:g}")


if __name__ == "__main__":
    main()
