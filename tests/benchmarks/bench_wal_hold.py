#!/usr/bin/env python3
"""The database layer alone: write latency beside the WAL checkpointer, and how long its restarts hold writers.

Imports prefectlite.py from `--build` (a folder), opens a fresh SQLite file in a temporary folder, and for
`--duration` s (20) runs `--writers` (2) threads inserting 1.5 KB rows one transaction each (with a 1 ms pause
between, as a server's requests leave gaps) beside `--readers` (4) threads reading (the newest 50 rows and a
count, one transaction each). Prints the writes and their p50/p99/max latency, the reads and theirs, the
largest WAL, the WAL after `--idle` s (10) of quiet, and, for a build that records them, the checkpointer's
restarts, longest hold and drains.

    python tests/benchmarks/bench_wal_hold.py --build /tmp/before && python tests/benchmarks/bench_wal_hold.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", default=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 300 and 0 <= args.idle <= 60 and 1 <= args.writers <= 16 and 0 <= args.readers <= 16):
        parser.error("--duration 0-300, --idle 0-60, --writers 1-16, --readers 0-16")
    sys.path.insert(0, os.path.abspath(args.build))
    import prefectlite

    folder = tempfile.mkdtemp(prefix="prefectlite-bench-wal-hold-")
    db = prefectlite.open_database(f"sqlite:///{folder}/x.db", prefectlite.load_settings(env={"PREFECT_HOME": folder}))
    wal = os.path.join(folder, "x.db-wal")
    with db.write() as tx:
        tx.execute("CREATE TABLE item (id INTEGER PRIMARY KEY, k TEXT, payload BLOB)")
    stop = threading.Event()
    latencies: list[float] = []
    read_latencies: list[float] = []
    largest = 0

    def write(n):
        i = 0
        while not stop.is_set():
            started = time.perf_counter()
            with db.write() as tx:
                tx.execute("INSERT INTO item (k, payload) VALUES (?, ?)", (f"{n}-{i}", os.urandom(1500)))
            latencies.append(time.perf_counter() - started)
            i += 1
            time.sleep(0.001)

    def read():
        while not stop.is_set():
            started = time.perf_counter()
            with db.read() as tx:
                tx.query("SELECT id, k FROM item ORDER BY id DESC LIMIT 50")
                tx.scalar("SELECT COUNT(*) FROM item")
            read_latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(args.writers)]
    threads += [threading.Thread(target=read) for _ in range(args.readers)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        time.sleep(0.25)
        largest = max(largest, os.path.getsize(wal) if os.path.exists(wal) else 0)
    stop.set()
    for thread in threads:
        thread.join(60)
    latencies.sort()
    read_latencies = sorted(read_latencies) or [0.0]
    time.sleep(args.idle)  # the quiet time is what is measured
    idle = os.path.getsize(wal) if os.path.exists(wal) else 0
    checkpointer = db._checkpointer
    hold = getattr(checkpointer, "longest_hold", None)
    print(
        f"build {args.build}: {len(latencies)} writes, p50 {latencies[len(latencies) // 2] * 1e3:.2f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.2f} ms, max {latencies[-1] * 1e3:.1f} ms; "
        f"WAL largest {largest / 1e6:.1f} MB, after {args.idle:g} s idle {idle / 1e6:.1f} MB; restarts "
        f"{getattr(checkpointer, 'restarts', '-')}, longest hold {'-' if hold is None else f'{hold * 1e3:.1f} ms'}; "
        f"{len(read_latencies)} reads, p50 {read_latencies[len(read_latencies) // 2] * 1e3:.1f} ms, "
        f"p99 {read_latencies[int(len(read_latencies) * 0.99)] * 1e3:.1f} ms, max {read_latencies[-1] * 1e3:.1f} ms; "
        f"drains {getattr(checkpointer, 'drains', '-')} (given up {getattr(checkpointer, 'drains_given_up', '-')})"
    )
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
