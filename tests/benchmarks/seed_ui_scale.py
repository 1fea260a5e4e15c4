"""Seed a SQLite database with many runs for the UI's time-to-data benchmark (bench_ui_pages.py).

    python tests/benchmarks/seed_ui_scale.py /tmp/scale.db --flow-runs 1000000 --task-runs 3000000 --logs 10000000

The schema comes from prefectlite's own migrations; the rows are written with direct SQL inserts in large
transactions (minutes, not the hours the API would take). Runs spread over the past 90 days, with a few per
cent scheduled for the coming week; states as a busy server has them (completed, failed, crashed, Late,
cancelled, running); task runs and log lines are shared out over the flow runs. Every size is a parameter:
seeding 10 million log lines takes a while and some GB on a small machine.
"""

import argparse
import json
import random
import sqlite3
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import prefectlite  # noqa: E402

BATCH = 20_000
STATES = [
    ("COMPLETED", "Completed", 0.84),
    ("FAILED", "Failed", 0.07),
    ("CRASHED", "Crashed", 0.02),
    ("SCHEDULED", "Late", 0.02),
    ("CANCELLED", "Cancelled", 0.02),
    ("RUNNING", "Running", 0.01),
    ("COMPLETED", "Cached", 0.02),
]
LEVELS = [(20, 0.8), (10, 0.1), (30, 0.07), (40, 0.03)]


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def state_json(state_id, state_type, name, at, run_id, task_run_id=None):
    details = {
        "flow_run_id": run_id,
        "task_run_id": task_run_id,
        "scheduled_time": None,
        "cache_key": None,
        "cache_expiration": None,
    }
    return json.dumps(
        {
            "id": state_id,
            "type": state_type,
            "name": name,
            "timestamp": at,
            "message": None,
            "data": None,
            "state_details": details,
        },
        separators=(",", ":"),
    )


def pick(weighted, rnd):
    x = rnd.random()
    for item in weighted:
        x -= item[-1]
        if x <= 0:
            return item
    return weighted[0]


def seed(path: Path, flow_runs: int, task_runs: int, logs: int, flows: int, deployments: int, seed_value: int):
    if path.exists():
        raise SystemExit(f"{path} exists: seed a new file")
    db = prefectlite.open_database(f"sqlite:///{path}")
    prefectlite.migrate(db)
    db.close()
    rnd = random.Random(seed_value)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("PRAGMA cache_size=-200000")
    now = datetime.now(timezone.utc)
    started = time.perf_counter()

    flow_ids = [str(uuid.uuid4()) for _ in range(flows)]
    con.executemany(
        "INSERT INTO flow (id, created, updated, name) VALUES (?, ?, ?, ?)",
        [(f, iso(now), iso(now), f"flow-{i:03d}") for i, f in enumerate(flow_ids)],
    )
    dep_rows = [(str(uuid.uuid4()), flow_ids[i % flows], f"deployment-{i:03d}") for i in range(deployments)]
    con.executemany(
        "INSERT INTO deployment (id, created, updated, name, flow_id) VALUES (?, ?, ?, ?, ?)",
        [(d, iso(now), iso(now), name, f) for d, f, name in dep_rows],
    )
    con.commit()

    # flow runs, oldest first; 3 % in the coming week (scheduled), the rest over the past 90 days
    horizon = 90 * 86400
    run_ids = []
    sql = (
        "INSERT INTO flow_run (id, created, updated, name, flow_id, deployment_id, state_id, state_type, state_name,"
        " state_timestamp, state, run_count, expected_start_time, next_scheduled_start_time, start_time, end_time,"
        " total_run_time, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    state_sql = (
        "INSERT INTO flow_run_state (id, created, flow_run_id, type, name, timestamp, state_details)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)"
    )
    batch, states = [], []
    for i in range(flow_runs):
        past = int(flow_runs * 0.97)
        future = i >= past
        offset = (i / max(1, past)) * horizon if not future else horizon + rnd.random() * 7 * 86400
        expected = now - timedelta(seconds=horizon) + timedelta(seconds=offset)
        dep_id, flow_id, _ = dep_rows[i % deployments] if i % 4 else (None, flow_ids[i % flows], None)
        if future:
            state_type, name = "SCHEDULED", "Scheduled"
        else:
            state_type, name, _ = pick(STATES, rnd)
        run_id, state_id = str(uuid.uuid4()), str(uuid.uuid4())
        duration = rnd.uniform(1, 600)
        ran = state_type not in ("SCHEDULED",)
        start = iso(expected + timedelta(seconds=rnd.uniform(0, 5))) if ran else None
        end = iso(expected + timedelta(seconds=duration)) if ran and state_type != "RUNNING" else None
        at = end or start or iso(expected)
        batch.append(
            (
                run_id,
                iso(expected),
                at,
                f"run-{i:07d}",
                flow_id,
                dep_id,
                state_id,
                state_type,
                name,
                at,
                state_json(state_id, state_type, name, at, run_id),
                1 if ran else 0,
                iso(expected),
                iso(expected) if state_type == "SCHEDULED" else None,
                start,
                end,
                duration if end else 0.0,
                '["scale"]' if i % 10 == 0 else "[]",
            )
        )
        states.append((state_id, at, run_id, state_type, name, at, "{}"))
        run_ids.append((run_id, expected, ran))
        if len(batch) >= BATCH:
            con.executemany(sql, batch)
            con.executemany(state_sql, states)
            con.commit()
            batch, states = [], []
    con.executemany(sql, batch)
    con.executemany(state_sql, states)
    con.commit()
    print(f"{flow_runs:,} flow runs in {time.perf_counter() - started:.0f} s", flush=True)

    ran_runs = [r for r in run_ids if r[2]]
    sql = (
        "INSERT INTO task_run (id, created, updated, name, flow_run_id, task_key, dynamic_key, state_id, state_type,"
        " state_name, state_timestamp, state, run_count, flow_run_run_count, expected_start_time, start_time, end_time,"
        " total_run_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    batch = []
    task_ids = []
    per_run = max(1, -(-task_runs // max(1, len(ran_runs))))  # rounded up: exactly task_runs in all
    made = 0
    for run_id, expected, _ in ran_runs:
        for k in range(per_run):
            if made >= task_runs:
                break
            tid, sid = str(uuid.uuid4()), str(uuid.uuid4())
            start = expected + timedelta(seconds=2 + k * 3)
            end = start + timedelta(seconds=rnd.uniform(0.1, 3))
            batch.append(
                (
                    tid,
                    iso(start),
                    iso(end),
                    f"task-{k}-{made % 1000}",
                    run_id,
                    f"task-{k}",
                    str(made),
                    sid,
                    "COMPLETED",
                    "Completed",
                    iso(end),
                    state_json(sid, "COMPLETED", "Completed", iso(end), run_id, tid),
                    1,
                    1,
                    iso(start),
                    iso(start),
                    iso(end),
                    (end - start).total_seconds(),
                )
            )
            if k == 0:
                task_ids.append((tid, run_id, start))
            made += 1
            if len(batch) >= BATCH:
                con.executemany(sql, batch)
                con.commit()
                batch = []
    con.executemany(sql, batch)
    con.commit()
    print(f"{made:,} task runs in {time.perf_counter() - started:.0f} s", flush=True)

    sql = (
        "INSERT INTO log (id, created, updated, name, level, message, timestamp, flow_run_id, task_run_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    batch = []
    per_run = max(1, -(-logs // max(1, len(task_ids))))  # rounded up: exactly logs in all
    made = 0
    for tid, run_id, start in task_ids:
        for k in range(per_run):
            if made >= logs:
                break
            at = iso(start + timedelta(milliseconds=37 * k))
            level = pick(LEVELS, rnd)[0]
            batch.append(
                (
                    str(uuid.uuid4()),
                    at,
                    at,
                    "prefect.task_runs" if k % 2 else "prefect.flow_runs",
                    level,
                    f"log line {k} of {run_id[:8]}: processed {rnd.randint(1, 10_000)} rows",
                    at,
                    run_id,
                    tid if k % 2 else None,
                )
            )
            made += 1
            if len(batch) >= BATCH:
                con.executemany(sql, batch)
                con.commit()
                batch = []
    con.executemany(sql, batch)
    con.commit()
    print(f"{made:,} log lines in {time.perf_counter() - started:.0f} s", flush=True)
    con.execute("ANALYZE")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    print(f"seeded {path} in {time.perf_counter() - started:.0f} s ({path.stat().st_size / 1e9:.2f} GB)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--flow-runs", type=int, default=1_000_000)
    parser.add_argument("--task-runs", type=int, default=3_000_000)
    parser.add_argument("--logs", type=int, default=10_000_000)
    parser.add_argument("--flows", type=int, default=50)
    parser.add_argument("--deployments", type=int, default=100)
    parser.add_argument("--seed", type=int, default=20)
    args = parser.parse_args(argv)
    seed(args.path, args.flow_runs, args.task_runs, args.logs, args.flows, args.deployments, args.seed)


if __name__ == "__main__":
    main()
