#!/usr/bin/env python3
"""`prefectlite database backup` of a large SQLite database: idle, and while a server takes steady writes.

Builds a database of about `--size-mb` MB (default 300) once: `database upgrade`, then log rows of 1 KB
inserted directly with sqlite3 (the bulk of a real database is its logs). Then for each build (a folder
holding prefectlite.py; `--builds` as in bench_ab.py) and each write rate of `--rates` (writes a second,
0 = idle): start `python -m prefectlite start` on the database, send POST /logs/ (one line each) at that
rate from one loopback client, run `python -m prefectlite database backup` of the build into a new file
and time it, stop at `--timeout` s (then the backup has not finished: it is killed, and what it left under
the target's name and beside it is reported). Prints per run: seconds, the exit status, the copy's size,
the writes acknowledged during the backup, and leftovers.

    python tests/benchmarks/bench_backup.py --builds /tmp/before,. --rates 0,100 --size-mb 300 --timeout 60
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as B  # noqa: E402


def build_database(folder: str, home: str, size_mb: int) -> str:
    env = B.server_env(home)
    subprocess.run(
        [sys.executable, "-m", "prefectlite", "database", "upgrade", "-y"],
        cwd=folder,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    path = os.path.join(home, "prefectlite.db")
    conn = sqlite3.connect(path)
    message = "x" * 1000
    rows = size_mb * 660  # ~1.5 KB a row with its index entries (900 a MB made 409 MB of 300)
    now = B.now_iso()
    for start in range(0, rows, 10_000):
        conn.executemany(
            "INSERT INTO log (id, created, updated, name, level, message, timestamp) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(str(uuid.uuid4()), now, now, "ballast", 20, message, now) for _ in range(min(10_000, rows - start))],
        )
        conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


def paced_writer(target: B.Target, rate: float, stop: threading.Event, acked: list):
    cli = B.Client(target)
    interval = 1.0 / rate
    next_at = time.perf_counter()
    while not stop.is_set():
        body = json.dumps([{"name": "bench", "level": 20, "message": "paced", "timestamp": B.now_iso()}]).encode()
        status, _data, _secs = cli.request("POST", "/logs/", body)
        if status == 201:
            acked.append(time.perf_counter())
        next_at += interval
        delay = next_at - time.perf_counter()
        if delay > 0:
            stop.wait(delay)
    cli.close()


def one_run(folder: str, home: str, rate: float, timeout: float, round_no: int) -> dict:
    port = B.free_port()
    command = f"cd {shlex.quote(folder)} && exec {sys.executable} -m prefectlite start --port {port}"
    proc = B.start_server(command, home, log_path=os.path.join(home, "server.log"))
    target_file = os.path.join(home, "backups", f"copy-{os.path.basename(folder) or 'build'}-{rate:g}-{round_no}.db")
    os.makedirs(os.path.dirname(target_file), exist_ok=True)
    stop, acked = threading.Event(), []
    writer = None
    try:
        if not B.wait_health("127.0.0.1", port, "/api", 60.0, proc):
            raise SystemExit(f"{folder}: the server did not answer; see {home}/server.log")
        if rate:
            writer = threading.Thread(
                target=paced_writer, args=(B.Target(f"http://127.0.0.1:{port}/api"), rate, stop, acked), daemon=True
            )
            writer.start()
            time.sleep(1.0)  # the writes under way before the backup starts
        started = time.perf_counter()
        backup = subprocess.Popen(
            [sys.executable, "-m", "prefectlite", "database", "backup", target_file],
            cwd=folder,
            env=B.server_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = backup.communicate(timeout=timeout)
            code = backup.returncode
        except subprocess.TimeoutExpired:
            backup.kill()
            out, err = backup.communicate()
            code = "killed"
        seconds = time.perf_counter() - started
        during = sum(1 for t in acked if t >= started)
    finally:
        stop.set()
        if writer is not None:
            writer.join(30)
        B.stop_server(proc)
    folder_files = os.listdir(os.path.dirname(target_file))
    leftovers = [f for f in folder_files if f != os.path.basename(target_file)]
    size = os.path.getsize(target_file) if os.path.exists(target_file) else None
    for name in folder_files:  # the next run starts from an empty folder
        os.remove(os.path.join(os.path.dirname(target_file), name))
    return {
        "build": folder,
        "writes_per_s": rate,
        "seconds": round(seconds, 2),
        "exit": code,
        "copy_mb": None if size is None else round(size / 1e6, 1),
        "writes_during": during,
        "leftovers": ",".join(leftovers) or "-",
        "error": (err or "").strip()[:120] or "-",
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--builds", default=".", help="comma-separated folders that hold prefectlite.py")
    parser.add_argument("--rates", default="0,100", help="writes a second during the backup (0: idle)")
    parser.add_argument("--size-mb", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a backup is given up")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    if not (1 <= args.size_mb <= 4000 and 1 <= args.timeout <= 600 and 1 <= args.rounds <= 5):
        parser.error("--size-mb 1-4000, --timeout 1-600, --rounds 1-5")
    if any(not 0 <= r <= 1000 for r in rates):
        parser.error("--rates: 0-1000 writes a second")
    builds = [os.path.abspath(b) for b in args.builds.split(",")]
    home = B.fresh_home("prefectlite-bench-backup-")
    B.log(f"building a ~{args.size_mb} MB database in {home} ...")
    path = build_database(builds[-1], home, args.size_mb)
    B.log(f"database: {os.path.getsize(path) / 1e6:.0f} MB")
    results = []
    for round_no in range(args.rounds):
        for rate in rates:
            for build in builds:
                B.log(f"round {round_no + 1}: {build} at {rate:g} writes/s ...")
                results.append(one_run(build, home, rate, args.timeout, round_no))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        headers = list(results[0])
        B.print_table(headers, [[r[h] for h in headers] for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
