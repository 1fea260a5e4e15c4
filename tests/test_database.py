"""Storage (section 2): SQLite WAL + foreign keys, 'database is locked' never reaching a client,
concurrent writers, the shared in-memory database, translate_placeholders, embedding with serve().

Everything runs against real databases: SQLite files in tmp_path, real lock holders in other processes,
and the throwaway PostgreSQL database of the `postgres_url` fixture.
"""

import itertools
import json
import sqlite3
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from helpers import Client, LockHolder, ROOT, WRITERS_TURN_HOLDER, wait_until

import prefectlite
from prefectlite import translate_placeholders


# ---------------------------------------------------------------------------------------------
# helpers


def _load(tmp_path, **env):
    """Settings resolved against a private PREFECT_HOME (never the real home)."""
    return prefectlite.load_settings(env={"PREFECT_HOME": str(tmp_path / "home"), **env})


def _open_migrated(url, tmp_path, **env):
    db = prefectlite.open_database(url, _load(tmp_path, **env))
    prefectlite.migrate(db)
    return db


def _run_writers(client, threads, per_thread, shared_name=None):
    """Many threads POSTing at once; returns every (status, payload) that was not a success."""
    failures, lock = [], threading.Lock()
    barrier = threading.Barrier(threads)

    def work(index):
        barrier.wait()
        for i in range(per_thread):
            name = shared_name or f"flow-{index}-{i}"
            try:
                status, payload = client.post("/flows/", {"name": name, "tags": [f"t{index}"]})
                if status not in (200, 201):
                    with lock:
                        failures.append(("flow", status, payload))
                    continue
                status, run = client.post("/flow_runs/", {"flow_id": payload["id"], "name": f"run-{index}-{i}"})
                if status not in (200, 201):
                    with lock:
                        failures.append(("flow_run", status, run))
                    continue
                status, body = client.post(
                    f"/flow_runs/{run['id']}/set_state", {"state": {"type": "RUNNING"}, "force": True}
                )
                if status not in (200, 201):
                    with lock:
                        failures.append(("set_state", status, body))
            except Exception as exc:  # noqa: BLE001 - a dropped connection is a failure too
                with lock:
                    failures.append(("exception", type(exc).__name__, str(exc)))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert not any(worker.is_alive() for worker in workers), "writer threads hung"
    return failures


# ---------------------------------------------------------------------------------------------
# SQLite: WAL and foreign keys


def test_sqlite_file_is_in_wal_mode_with_foreign_keys_on(tmp_path):
    path = tmp_path / "wal.db"
    db = _open_migrated(f"sqlite:///{path}", tmp_path)
    try:
        with db.read() as tx:
            assert str(tx.scalar("PRAGMA journal_mode")).lower() == "wal"
            assert tx.scalar("PRAGMA foreign_keys") == 1
        with db.write() as tx:
            assert tx.scalar("PRAGMA foreign_keys") == 1
    finally:
        db.close()
    # WAL is a property of the file: any other connection sees it too
    other = sqlite3.connect(path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        other.close()


def test_sqlite_foreign_keys_are_enforced(tmp_path):
    db = _open_migrated(f"sqlite:///{tmp_path}/fk.db", tmp_path)
    try:
        with pytest.raises(prefectlite.IntegrityViolation):
            with db.write() as tx:
                tx.execute(
                    "INSERT INTO flow_run (id, created, updated, name, flow_id) VALUES (?, ?, ?, ?, ?)",
                    (str(uuid.uuid4()), "2024-01-01", "2024-01-01", "orphan", str(uuid.uuid4())),
                )
        with db.read() as tx:
            assert tx.scalar("SELECT COUNT(*) FROM flow_run") == 0
    finally:
        db.close()


def test_sqlite_foreign_key_cascade_through_the_api(client):
    flow = client.ok("POST", "/flows/", {"name": "cascade"})
    run = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "name": "child"})
    client.ok("DELETE", f"/flows/{flow['id']}")
    status, _ = client.get(f"/flow_runs/{run['id']}")
    assert status == 404  # ON DELETE CASCADE ran: foreign keys are on in the server's connections


@pytest.mark.parametrize("setting, level", [(None, 1), ("normal", 1), ("FULL", 2)])
def test_sqlite_synchronous_follows_its_setting_on_every_connection(tmp_path, setting, level):
    """NORMAL (1, the default, as Prefect's): a commit survives kill -9; FULL (2): a power loss too."""
    env = {} if setting is None else {"PREFECT_API_DATABASE_SQLITE_SYNCHRONOUS": setting}
    db = _open_migrated(f"sqlite:///{tmp_path / 'sync.db'}", tmp_path, **env)
    try:
        with db.write() as tx:
            assert tx.scalar("PRAGMA synchronous") == level
        with db.read() as tx:
            assert tx.scalar("PRAGMA synchronous") == level
    finally:
        db.close()


# ---------------------------------------------------------------------------------------------
# "database is locked" never reaches a client


def test_write_lock_held_by_another_process_gives_503_with_json_reason(tmp_path):
    path = tmp_path / "locked.db"
    with prefectlite.serve(database=f"sqlite:///{path}", port=0, PREFECT_API_DATABASE_TIMEOUT=1) as api_url:
        client = Client(api_url)
        client.ok("POST", "/flows/", {"name": "before-lock"})
        holder = LockHolder(path)
        try:
            status, payload = client.post("/flows/", {"name": "during-lock"})
            assert status == 503, (status, payload)
            assert isinstance(payload, dict), payload  # JSON, not a text page
            reason = payload.get("reason") or payload.get("detail")
            assert isinstance(reason, str) and reason
            assert "database is locked" not in json.dumps(payload).lower()
            # readers are not blocked by a writer in WAL mode
            status, flows = client.post("/flows/filter", {})
            assert status == 200
            assert [f["name"] for f in flows] == ["before-lock"]
        finally:
            holder.release()
        # once the other process lets go, the same write succeeds
        client.ok("POST", "/flows/", {"name": "during-lock"})
        names = sorted(f["name"] for f in client.ok("POST", "/flows/filter", {}))
        assert names == ["before-lock", "during-lock"]


def test_503_from_lock_carries_retry_after_header(tmp_path):
    path = tmp_path / "locked.db"
    with prefectlite.serve(database=f"sqlite:///{path}", port=0, PREFECT_API_DATABASE_TIMEOUT=1) as api_url:
        holder = LockHolder(path)
        try:
            req = urllib.request.Request(
                api_url + "/flows/",
                data=json.dumps({"name": "x"}).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=30)
            assert info.value.code == 503
            assert info.value.headers.get("Content-Type", "").startswith("application/json")
            body = json.loads(info.value.read())
            assert "database is locked" not in json.dumps(body).lower()
        finally:
            holder.release()


# ---------------------------------------------------------------------------------------------
# SQLite: the WAL checkpointer


def _scratch_sqlite(tmp_path):
    db = prefectlite.open_database(f"sqlite:///{tmp_path / 'scratch.db'}", _load(tmp_path))
    with db.write() as tx:
        tx.execute("CREATE TABLE item (name TEXT PRIMARY KEY, payload BLOB)")
    return db


def test_the_wal_is_copied_back_by_a_checkpointer_thread_and_stays_small(tmp_path, monkeypatch):
    # 1,024 frames (4 MB) instead of 4,096 before the WAL is made to start over: several restarts in this
    # run, and room left under the bound below for a slow disk's fsyncs while this loop writes on
    monkeypatch.setattr(prefectlite._WalCheckpointer, "restart_frames", 1024)
    db = _scratch_sqlite(tmp_path)
    wal = tmp_path / "scratch.db-wal"
    try:
        with db.read() as tx:  # no request's COMMIT stops for a checkpoint
            assert tx.scalar("PRAGMA wal_autocheckpoint") == 0
        payload = b"x" * 8000  # three pages a row: 3,000 commits put ~36 MB through the WAL
        largest = 0
        for i in range(3000):
            with db.write() as tx:
                tx.execute("INSERT INTO item (name, payload) VALUES (?, ?)", (f"r{i}", payload))
            time.sleep(0.0002)  # a server's writers leave gaps (parsing, answering); a tight loop starves the rest
            if i % 100 == 0:
                largest = max(largest, wal.stat().st_size)
        checkpointer = db._checkpointer
        assert checkpointer is not None and checkpointer.thread.is_alive() and checkpointer.runs >= 1
        # The WAL starts over after a complete checkpoint instead of growing by every commit (~37 MB here
        # without one)
        assert checkpointer.restarts >= 1
        assert largest < 24_000_000, largest
    finally:
        db.close()
    assert not checkpointer.thread.is_alive()  # close() stops it
    other = sqlite3.connect(tmp_path / "scratch.db")
    try:
        assert other.execute("SELECT COUNT(*) FROM item").fetchone()[0] == 3000
    finally:
        other.close()


def test_the_wal_stays_bounded_while_reads_overlap_writes_and_is_emptied_when_quiet(tmp_path, monkeypatch):
    """Readers always somewhere in the WAL keep a PASSIVE checkpoint from ever copying all of it, so the
    WAL never started over: it grew by every commit (36 MB here). A checkpoint that waits briefly for
    the readers then starts it over; once nothing is written the file is truncated."""
    monkeypatch.setattr(prefectlite._WalCheckpointer, "restart_frames", 256)  # 1 MB: restarts in this run
    db = _scratch_sqlite(tmp_path)
    wal = tmp_path / "scratch.db-wal"
    stop = threading.Event()
    reads = [0] * 3

    def read(index):
        while not stop.is_set():
            with db.read() as tx:  # overlapping read transactions, as a server's listing requests make
                tx.scalar("SELECT COUNT(*) FROM item")
                tx.query("SELECT name FROM item ORDER BY name DESC LIMIT 20")
            reads[index] += 1

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(3)]
    try:
        for thread in readers:
            thread.start()
        wait_until(lambda: all(reads), 10, "the readers to get going")
        largest = 0
        for i in range(3000):  # three pages a row: ~36 MB through the WAL
            with db.write() as tx:
                tx.execute("INSERT INTO item (name, payload) VALUES (?, ?)", (f"r{i}", b"x" * 8000))
            time.sleep(0.0002)  # a server's writers leave gaps (parsing, answering); a tight loop starves the rest
            if i % 50 == 0:
                largest = max(largest, wal.stat().st_size)
        stop.set()
        for thread in readers:
            thread.join(10)
        assert db._checkpointer.restarts >= 1
        print(f"largest WAL {largest / 1e6:.1f} MB, {db._checkpointer.restarts} restarts")
        assert largest < 20_000_000, largest  # ~36 MB when the WAL never starts over
        # quiet: the checkpointer truncates the WAL file (the next pass after a second without commits)
        wait_until(lambda: wal.stat().st_size == 0, 30, "the WAL file of a quiet database to be emptied")
        with db.read() as tx:
            assert tx.scalar("SELECT COUNT(*) FROM item") == 3000
            assert tx.scalar("PRAGMA journal_size_limit") == prefectlite._WalCheckpointer.file_bytes_kept
    finally:
        stop.set()
        db.close()


def _restart_wanted(checkpointer) -> bool:
    """The checkpointer found the WAL large and wants it to start over (a drain on; before it: the flag that
    sent the next writers to wait for the readers)."""
    return getattr(checkpointer, "draining", False) or getattr(checkpointer, "restart_due", False)


def test_a_long_reader_never_holds_the_writers_and_the_wal_starts_over_once_it_ends(tmp_path, monkeypatch):
    """A read transaction still in the WAL (a long scan) kept the restart from succeeding, and the restart
    waited for it in the writers' turn, holding them (up to 170 ms, and it failed). Now the waiting is
    the readers': those that begin meanwhile wait, the writers commit on, never running a checkpoint
    that could wait for a reader; the WAL starts over as soon as the long reader ends."""
    monkeypatch.setattr(prefectlite._WalCheckpointer, "restart_frames", 64)
    # the long reader ends the drain below, not the clock
    monkeypatch.setattr(prefectlite._WalCheckpointer, "drain_wait_seconds", 120.0)
    db = _scratch_sqlite(tmp_path)
    phase = ["before"]
    statements = []  # what ran on the writers' connection, and whether the long reader was in the WAL
    db._writer.set_trace_callback(lambda sql: statements.append((phase[0], sql)))
    holding, release = threading.Event(), threading.Event()
    late_reader_saw = []

    def long_read():
        with db.read() as tx:
            tx.scalar("SELECT COUNT(*) FROM item")  # its snapshot: the WAL as it is now
            holding.set()
            release.wait(60)

    def late_read():
        with db.read() as tx:
            late_reader_saw.append((release.is_set(), db._checkpointer.restarts))
            tx.scalar("SELECT COUNT(*) FROM item")

    def write(i):
        with db.write() as tx:
            tx.execute("INSERT INTO item (name, payload) VALUES (?, ?)", (f"r{i}", b"x" * 8000))

    long_reader = threading.Thread(target=long_read, daemon=True)
    late_reader = threading.Thread(target=late_read, daemon=True)
    try:
        write(0)
        long_reader.start()
        assert holding.wait(30)
        phase[0] = "long reader in the WAL"
        for i in range(1, 151):  # ~450 frames, more than one pass's worth of commits
            write(i)
        checkpointer = db._checkpointer
        wait_until(lambda: _restart_wanted(checkpointer), 30, "the checkpointer to find the WAL large")
        for i in range(151, 171):  # the writers go on: each commit completes while the reader holds on
            write(i)
        with db.write(), db.read() as nested:  # a read inside a transaction is never held
            assert nested.scalar("SELECT COUNT(*) FROM item") == 171
        assert holding.is_set() and not release.is_set() and long_reader.is_alive()
        held = [sql for when, sql in statements if when == phase[0] and "wal_checkpoint" in sql]
        assert not held, f"a checkpoint that waits for readers ran in the writers' turn while one read: {held}"
        late_reader.start()  # a read that begins now waits for the restart
        wait_until(lambda: checkpointer.waiting == 1, 30, "the late reader to wait at the door")
        assert checkpointer.restarts == 0 and checkpointer.draining
        phase[0] = "after the long reader"
        release.set()
        long_reader.join(30)
        wait_until(lambda: checkpointer.restarts >= 1, 30, "the WAL to start over once the reader ended")
        late_reader.join(30)
        [(after_the_reader, restarts)] = late_reader_saw
        assert after_the_reader and restarts >= 1  # it got in only after the reader, once the WAL started over
        write(171)  # the first commit after the restart writes at the WAL's start
        with sqlite3.connect(tmp_path / "scratch.db") as other:
            assert other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1] < 64
    finally:
        release.set()
        db._writer.set_trace_callback(None)
        db.close()
    checkpoints = [(when, sql) for when, sql in statements if "wal_checkpoint" in sql]
    assert checkpoints[0][1] == "PRAGMA wal_checkpoint(RESTART)"
    for checkpoint in checkpoints:  # and none waited for a reader: no busy timeout while it ran
        before = statements[statements.index(checkpoint) - 1][1]
        assert before == "PRAGMA busy_timeout = 0", before


def test_a_drain_that_a_reader_outlasts_is_given_up_and_holds_new_readers_only_briefly(tmp_path, monkeypatch):
    monkeypatch.setattr(prefectlite._WalCheckpointer, "restart_frames", 64)
    monkeypatch.setattr(prefectlite._WalCheckpointer, "drain_wait_seconds", 0.05)
    monkeypatch.setattr(prefectlite._WalCheckpointer, "drain_pause_seconds", 120.0)
    db = _scratch_sqlite(tmp_path)
    holding, release = threading.Event(), threading.Event()
    late_reader_saw = []

    def long_read():
        with db.read() as tx:
            tx.scalar("SELECT COUNT(*) FROM item")
            holding.set()
            release.wait(60)

    long_reader = threading.Thread(target=long_read, daemon=True)
    try:
        with db.write() as tx:
            tx.execute("INSERT INTO item (name, payload) VALUES ('r0', x'00')")
        long_reader.start()
        assert holding.wait(30)
        for i in range(1, 151):
            with db.write() as tx:
                tx.execute("INSERT INTO item (name, payload) VALUES (?, ?)", (f"r{i}", b"x" * 8000))
        checkpointer = db._checkpointer
        wait_until(lambda: checkpointer.drains >= 1, 30, "a drain to begin")
        with db.read() as tx:  # the drain is given up: this read goes in while the long one still reads
            late_reader_saw.append((release.is_set(), tx.scalar("SELECT COUNT(*) FROM item")))
        assert late_reader_saw == [(False, 151)]
        assert checkpointer.drains_given_up == checkpointer.drains == 1 and checkpointer.restarts == 0
        # and the next drain waits drain_pause_seconds: the passes meanwhile find the WAL large and begin none
        runs = checkpointer.runs
        for i in range(151, 301):
            with db.write() as tx:
                tx.execute("INSERT INTO item (name, payload) VALUES (?, ?)", (f"r{i}", b"x" * 8000))
        wait_until(lambda: checkpointer.runs > runs, 30, "a checkpoint pass after the writes")
        assert checkpointer.drains == 1
    finally:
        release.set()
        long_reader.join(30)
        db.close()


class _OtherProcesses:
    """What a database of `start --processes N` is given to count its writes with the others (a stand-in:
    the one thing looked at here is that there is a group)."""

    def count_changes(self, changes):
        pass

    def total_changes(self):
        return 0


@pytest.mark.parametrize("processes", [1, 2])
def test_a_reader_outside_the_door_makes_the_restart_fail_at_once_and_waits_only_with_other_processes(
    tmp_path, monkeypatch, processes
):
    """A reader this database does not hold at its door (another process's) is never waited for by the
    writers of a single-process server; in a server of several processes, whose readers are the others',
    the tries after the first wait a few ms for them (as before the door: without it, 98.5 MB of WAL)."""
    monkeypatch.setattr(prefectlite._WalCheckpointer, "restart_frames", 64)
    monkeypatch.setattr(prefectlite._WalCheckpointer, "drain_wait_seconds", 120.0)
    monkeypatch.setattr(prefectlite._WalCheckpointer, "drain_pause_seconds", 120.0)
    db = _scratch_sqlite(tmp_path)
    if processes > 1:
        db.count_changes_in(_OtherProcesses(), db.changes)
    statements = []
    db._writer.set_trace_callback(statements.append)
    outside = sqlite3.connect(tmp_path / "scratch.db", isolation_level=None)
    try:
        outside.execute("BEGIN")
        outside.execute("SELECT COUNT(*) FROM item").fetchone()  # a snapshot in the WAL, held
        for i in range(150):
            with db.write() as tx:
                tx.execute("INSERT INTO item (name, payload) VALUES (?, ?)", (f"r{i}", b"x" * 8000))
        checkpointer = db._checkpointer
        wait_until(lambda: checkpointer.drains_given_up >= 1, 30, "the drain to be given up")
        assert checkpointer.restarts == 0 and checkpointer.busy_tries >= checkpointer.writer_tries
    finally:
        outside.close()
        db._writer.set_trace_callback(None)
        db.close()
    waits = [statements[i - 1] for i, sql in enumerate(statements) if sql == "PRAGMA wal_checkpoint(RESTART)"]
    other_wait = f"PRAGMA busy_timeout = {prefectlite._WalCheckpointer.other_process_reader_wait_ms}"
    expected = ["PRAGMA busy_timeout = 0"] + [other_wait if processes > 1 else "PRAGMA busy_timeout = 0"] * 2
    assert waits == expected


def test_an_in_memory_database_has_no_checkpointer(tmp_path):
    db = prefectlite.open_database("sqlite:///:memory:", _load(tmp_path))
    try:
        for i in range(150):
            with db.write() as tx:
                tx.execute("CREATE TABLE IF NOT EXISTS item (name TEXT)")
                tx.execute("INSERT INTO item VALUES (?)", (str(i),))
        assert db._checkpointer is None
    finally:
        db.close()


def test_many_concurrent_writer_threads_produce_no_errors_sqlite_file(client):
    failures = _run_writers(client, threads=16, per_thread=10)
    assert failures == []
    assert len(client.ok("POST", "/flows/filter", {})) == 160
    assert client.ok("POST", "/flow_runs/count", {}) == 160


def test_concurrent_upserts_of_one_flow_name_produce_no_errors(client):
    failures = _run_writers(client, threads=16, per_thread=5, shared_name="same-flow")
    assert failures == []
    flows = client.ok("POST", "/flows/filter", {})
    assert [f["name"] for f in flows] == ["same-flow"]
    assert client.ok("POST", "/flow_runs/count", {}) == 80


def test_concurrent_writers_from_two_servers_on_one_file(tmp_path):
    """Two servers (two connection sets) writing one SQLite file at once: still no errors."""
    url = f"sqlite:///{tmp_path}/shared.db"
    with prefectlite.serve(database=url, port=0) as first, prefectlite.serve(database=url, port=0) as second:
        results = {}

        def run(key, api_url):
            results[key] = _run_writers(Client(api_url), threads=8, per_thread=8)

        threads = [threading.Thread(target=run, args=("a", first)), threading.Thread(target=run, args=("b", second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        assert results == {"a": [], "b": []}
        assert Client(first).ok("POST", "/flow_runs/count", {}) == 128


def test_servers_on_one_file_take_turns_to_write_and_a_wait_ends_in_503(tmp_path):
    """Every server on a SQLite file writes in its turn on <db>.write-lock. A write that cannot get
    its turn within the database timeout is a 503 with a reason (never a hang); reads do not wait."""
    db_path = tmp_path / "shared.db"
    with prefectlite.serve(database=f"sqlite:///{db_path}", port=0, PREFECT_API_DATABASE_TIMEOUT=1) as api_url:
        client = Client(api_url)
        client.ok("POST", "/flows/", {"name": "before"})
        holder = LockHolder(f"{db_path}.write-lock", script=WRITERS_TURN_HOLDER)
        try:
            started = time.monotonic()
            status, body = client.post("/flows/", {"name": "waiting"})
            assert status == 503, (status, body)
            assert "busy" in body["detail"]
            assert time.monotonic() - started >= 0.9  # it waited for its turn until the timeout
            # a read does not wait for the turn (it would be a 503 too: the turn stays taken)
            assert client.ok("POST", "/flows/count", {}) == 1
        finally:
            holder.release()
        client.ok("POST", "/flows/", {"name": "after"})
        assert sorted(f["name"] for f in client.ok("POST", "/flows/filter", {})) == ["after", "before"]


def test_the_writers_turn_of_a_process_killed_mid_write_is_free_again(tmp_path):
    db_path = tmp_path / "shared.db"
    with prefectlite.serve(database=f"sqlite:///{db_path}", port=0, PREFECT_API_DATABASE_TIMEOUT=20) as api_url:
        client = Client(api_url)
        holder = LockHolder(f"{db_path}.write-lock", script=WRITERS_TURN_HOLDER)
        result = {}
        writer = threading.Thread(target=lambda: result.update(reply=client.post("/flows/", {"name": "waited"})))
        writer.start()
        time.sleep(0.5)  # by design: nothing may happen in this window (no event says "waiting for the turn")
        assert "reply" not in result, "the write did not wait for its turn"
        holder.kill()
        writer.join(30)
        assert result["reply"][0] == 201, result
        assert [f["name"] for f in client.ok("POST", "/flows/filter", {})] == ["waited"]


def test_many_concurrent_writer_threads_produce_no_errors_postgres(postgres_url):
    with prefectlite.serve(database=postgres_url, port=0) as api_url:
        client = Client(api_url)
        assert _run_writers(client, threads=16, per_thread=8) == []
        assert _run_writers(client, threads=16, per_thread=3, shared_name="same-flow") == []
        assert client.ok("POST", "/flow_runs/count", {}) == 16 * 8 + 16 * 3
        assert client.ok("POST", "/flows/count", {}) == 16 * 8 + 1


# ---------------------------------------------------------------------------------------------
# the in-memory database is one database for every thread


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///:memory:",
        "sqlite+aiosqlite:///file::memory:?cache=shared&uri=true&check_same_thread=false",
    ],
)
def test_in_memory_database_is_shared_by_all_threads(url):
    with prefectlite.serve(database=url, port=0) as api_url:
        client = Client(api_url)
        flow = client.ok("POST", "/flows/", {"name": "seen-by-all"})
        seen, errors = [], []

        def reader():
            try:
                status, body = client.get(f"/flows/{flow['id']}")
                seen.append((status, body and body.get("name")))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert seen == [(200, "seen-by-all")] * 16
        # writes from many threads land in the same database too
        assert _run_writers(client, threads=8, per_thread=5) == []
        assert client.ok("POST", "/flows/count", {}) == 41


def test_in_memory_database_shared_at_the_database_layer(tmp_path):
    db = _open_migrated("sqlite:///:memory:", tmp_path)
    try:
        with db.write() as tx:
            tx.execute("INSERT INTO flow (id, created, updated, name) VALUES (?, ?, ?, ?)", ("f1", "t", "t", "mem"))
        found = []

        def look():
            with db.read() as tx:
                found.append(tx.scalar("SELECT name FROM flow WHERE id = ?", ("f1",)))

        threads = [threading.Thread(target=look) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert found == ["mem"] * 8
    finally:
        db.close()


# ---------------------------------------------------------------------------------------------
# embedding


def test_serve_in_memory_yields_a_working_api_url():
    with prefectlite.serve(database="sqlite:///:memory:", port=0) as api_url:
        assert api_url.startswith("http://127.0.0.1:") and api_url.endswith("/api")
        client = Client(api_url)
        assert client.get("/health") == (200, True)
        flow = client.ok("POST", "/flows/", {"name": "embedded"})
        run = client.ok("POST", "/flow_runs/", {"flow_id": flow["id"], "name": "r"})
        assert client.ok("GET", f"/flow_runs/{run['id']}")["flow_id"] == flow["id"]
    # after the block the server is gone
    with pytest.raises(OSError):
        urllib.request.urlopen(api_url + "/health", timeout=5)


def test_two_embedded_in_memory_servers_are_independent():
    with (
        prefectlite.serve(database="sqlite:///:memory:", port=0) as a,
        prefectlite.serve(database="sqlite:///:memory:", port=0) as b,
    ):
        assert a != b
        Client(a).ok("POST", "/flows/", {"name": "only-in-a"})
        assert Client(b).ok("POST", "/flows/filter", {}) == []
        assert [f["name"] for f in Client(a).ok("POST", "/flows/filter", {})] == ["only-in-a"]


def test_serve_on_a_file_keeps_data_across_restarts(tmp_path):
    url = f"sqlite:///{tmp_path}/persist.db"
    with prefectlite.serve(database=url, port=0) as api_url:
        flow = Client(api_url).ok("POST", "/flows/", {"name": "persisted"})
    with prefectlite.serve(database=url, port=0) as api_url:
        assert Client(api_url).ok("GET", f"/flows/{flow['id']}")["name"] == "persisted"


# ---------------------------------------------------------------------------------------------
# translate_placeholders


@pytest.mark.parametrize(
    "sql, expected",
    [
        ("SELECT * FROM t WHERE a = ? AND b = ?", "SELECT * FROM t WHERE a = %s AND b = %s"),
        ("SELECT '?' FROM t WHERE a = ?", "SELECT '?' FROM t WHERE a = %s"),
        ("SELECT 'it''s ?' , ?", "SELECT 'it''s ?' , %s"),
        ('SELECT "odd?col" FROM t WHERE x = ?', 'SELECT "odd?col" FROM t WHERE x = %s'),
        ("SELECT 1 -- is it? yes\nWHERE a = ?", "SELECT 1 -- is it? yes\nWHERE a = %s"),
        ("SELECT 1 /* what? why? */ WHERE a = ?", "SELECT 1 /* what? why? */ WHERE a = %s"),
        ("SELECT 1 /* multi\nline ? */, ?", "SELECT 1 /* multi\nline ? */, %s"),
        ("SELECT $$ ? inside $$, ?", "SELECT $$ ? inside $$, %s"),
        ("SELECT $tag$ ? 'x' $$ ? $tag$, ?", "SELECT $tag$ ? 'x' $$ ? $tag$, %s"),
        ("SELECT 'a%b', ?", "SELECT 'a%%b', %s"),
        ("SELECT x % 2 FROM t WHERE y LIKE ?", "SELECT x %% 2 FROM t WHERE y LIKE %s"),
        ("SELECT 1", "SELECT 1"),
        ("", ""),
        ("?", "%s"),
        ("SELECT '?", "SELECT '?"),  # unterminated literal: left alone, no crash
    ],
)
def test_translate_placeholders(sql, expected):
    assert translate_placeholders(sql) == expected


def test_translate_placeholders_custom_style():
    assert translate_placeholders("a = ? AND b = '?'", style=":p") == "a = :p AND b = '?'"


@pytest.mark.parametrize(
    "script, expected",
    [
        ("CREATE TABLE a (x int); CREATE TABLE b (y int);", ["CREATE TABLE a (x int)", "CREATE TABLE b (y int)"]),
        ("INSERT INTO a VALUES ('x;y'); SELECT 1", ["INSERT INTO a VALUES ('x;y')", "SELECT 1"]),
        ('SELECT "odd;col" FROM t; SELECT 2', ['SELECT "odd;col" FROM t', "SELECT 2"]),
        ("SELECT 1; -- a comment; not a statement\n", ["SELECT 1"]),
        ("SELECT 1 /* a; b */; SELECT 2", ["SELECT 1 /* a; b */", "SELECT 2"]),
        ("DO $body$ BEGIN PERFORM 1; END $body$; SELECT 3", ["DO $body$ BEGIN PERFORM 1; END $body$", "SELECT 3"]),
        ("SELECT 'it''s; here'; SELECT 4", ["SELECT 'it''s; here'", "SELECT 4"]),
        ("", []),
    ],
)
def test_split_sql_script_splits_at_top_level_semicolons_only(script, expected):
    """The same lexer as translate_placeholders: quotes, comments and dollar quotes are kept whole."""
    assert prefectlite.split_sql_script(script) == expected


def test_translate_placeholders_counts_match_real_parameters():
    sql = "SELECT '?', \"?\", $$?$$ /* ? */ , ? -- ?\n, ?"
    assert translate_placeholders(sql).count("%s") == 2


def test_placeholders_in_quotes_survive_a_real_postgres_query(postgres_url, tmp_path):
    db = prefectlite.open_database(postgres_url, _load(tmp_path))
    try:
        with db.read() as tx:
            row = tx.query_one(
                "SELECT '?' AS q, 'it''s 100%' AS pct, $$ ? $$ AS dollar, /* ? */ ?::text AS p1, ?::int AS p2 -- ?\n",
                ("first", 2),
            )
        assert row == {"q": "?", "pct": "it's 100%", "dollar": " ? ", "p1": "first", "p2": 2}
    finally:
        db.close()


def test_postgres_json_array_contains_uses_no_bare_question_mark(postgres_url, tmp_path):
    db = _open_migrated(postgres_url, tmp_path)
    try:
        with db.write() as tx:
            tx.execute(
                "INSERT INTO flow (id, created, updated, name, tags) VALUES (?, ?, ?, ?, ?)",
                ("f1", "t", "t", "tagged", json.dumps(["a", "b?"])),
            )
        with db.read() as tx:
            rows = tx.query(f"SELECT name FROM flow WHERE {db.contains('tags')}", ("b?",))
        assert [r["name"] for r in rows] == ["tagged"]
    finally:
        db.close()


# ---------------------------------------------------------------------------------------------
# PostgreSQL basics


def test_postgres_database_opens_and_reports_dialect(postgres_url, tmp_path):
    db = _open_migrated(postgres_url, tmp_path)
    try:
        assert db.dialect == "postgresql"
        assert db.server_version()
        assert prefectlite.schema_is_current(db)
    finally:
        db.close()


def test_postgres_integrity_violation_is_mapped(postgres_url, tmp_path):
    db = _open_migrated(postgres_url, tmp_path)
    try:
        with pytest.raises(prefectlite.IntegrityViolation):
            with db.write() as tx:
                tx.execute(
                    "INSERT INTO flow_run (id, created, updated, name, flow_id) VALUES (?, ?, ?, ?, ?)",
                    (str(uuid.uuid4()), "t", "t", "orphan", str(uuid.uuid4())),
                )
        # the pool is healthy afterwards
        with db.read() as tx:
            assert tx.scalar("SELECT COUNT(*) FROM flow_run") == 0
    finally:
        db.close()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_driver_errors_become_ours_chained_from_the_drivers(dialect, tmp_path, request):
    """One mapper (Database.driver_errors) for statements, batches and commits: a constraint is an
    IntegrityViolation, an error that means none of ours goes up as the driver's, and ours always
    carry the driver's error as their cause."""
    url = f"sqlite:///{tmp_path}/errors.db" if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    db = _open_migrated(url, tmp_path)
    orphan = "INSERT INTO flow_run (id, created, updated, name, flow_id) VALUES (?, ?, ?, ?, ?)"
    try:
        for write in (
            lambda tx: tx.execute(orphan, (str(uuid.uuid4()), "t", "t", "orphan", str(uuid.uuid4()))),
            lambda tx: tx.executemany(orphan, [(str(uuid.uuid4()), "t", "t", "orphan", str(uuid.uuid4()))]),
        ):
            if dialect == "sqlite":  # SQLite checks deferred foreign keys at COMMIT: the commit's error
                write = (lambda w: lambda tx: (tx.execute("PRAGMA defer_foreign_keys = ON"), w(tx)))(write)
            with pytest.raises(prefectlite.IntegrityViolation) as caught:
                with db.write() as tx:
                    write(tx)
            assert isinstance(caught.value.__cause__, db.driver_error), caught.value.__cause__
        with pytest.raises(db.driver_error):  # a mistake of ours in SQL is no client's fault: not mapped
            with db.read() as tx:
                tx.query("SELECT no_such_column FROM flow")
        with db.read() as tx:
            assert tx.scalar("SELECT COUNT(*) FROM flow_run") == 0
    finally:
        db.close()


def test_module_file_is_the_one_under_test():
    assert prefectlite.__file__ == str(ROOT / "prefectlite.py")


# ---------------------------------------------------------------------------------------------
# JSON written by the database (run_json_select) is the object run_out builds in Python

_NOW = "2026-03-01T12:00:00.250000+00:00"


def _run_rows():
    """Runs in every situation the computed fields distinguish, with awkward values in the other columns."""
    base = {"run_count": 1, "total_run_time": 0.0, "empirical_policy": {"retries": 0}, "tags": ["a", "ü"]}
    return [
        {
            "name": "running",
            "state_type": "RUNNING",
            "state_name": "Running",
            "state_timestamp": "2026-03-01T11:58:29.750001+00:00",
            "total_run_time": 12.25,
            "expected_start_time": "2026-03-01T11:58:00.000000+00:00",
            "start_time": "2026-03-01T11:58:29.750001+00:00",
        },
        {
            "name": "running-without-timestamp",
            "state_type": "RUNNING",
            "state_name": "Running",
            "total_run_time": 3.5,
            "expected_start_time": "2026-03-01T11:00:00.000000+00:00",
        },
        {
            "name": "late-scheduled",
            "state_type": "SCHEDULED",
            "state_name": "Late",
            "expected_start_time": "2026-02-28T23:59:59.999999+00:00",
        },
        {
            "name": "future-scheduled",
            "state_type": "SCHEDULED",
            "state_name": "Scheduled",
            "expected_start_time": "2026-03-02T00:00:00.000000+00:00",
        },
        {
            "name": "pending",
            "state_type": "PENDING",
            "state_name": "Pending",
            "expected_start_time": "2026-03-01T11:59:59.000001+00:00",
        },
        {
            "name": "paused",
            "state_type": "PAUSED",
            "state_name": "Suspended",
            "expected_start_time": "2026-03-01T10:00:00.000000+00:00",
        },
        {
            "name": "completed-late",
            "state_type": "COMPLETED",
            "state_name": "Completed",
            "total_run_time": 1.000001,
            "expected_start_time": "2026-03-01T09:00:00.000000+00:00",
            "start_time": "2026-03-01T09:00:07.123456+00:00",
            "end_time": "2026-03-01T09:00:08.123457+00:00",
        },
        {
            "name": "completed-early",
            "state_type": "COMPLETED",
            "state_name": "Completed",
            "expected_start_time": "2026-03-01T09:00:00.000000+00:00",
            "start_time": "2026-03-01T08:59:00.000000+00:00",
        },
        {
            "name": "crashed-never-started",
            "state_type": "CRASHED",
            "state_name": "Crashed",
            "expected_start_time": "2026-03-01T08:00:00.000000+00:00",
        },
        {"name": "no-state", "expected_start_time": "2025-12-31T23:00:00.000000+00:00"},
        {"name": "no-state-no-time"},
        {
            "name": "ancient",
            "state_type": "SCHEDULED",
            "state_name": "Scheduled",
            "expected_start_time": "0001-01-01T00:00:00.000000+00:00",
        },
        {
            "name": 'quote " back\\slash 名前',
            "state_type": "FAILED",
            "state_name": "Failed",
            "expected_start_time": "2026-03-01T07:00:00.000000+00:00",
            "start_time": "2026-03-01T07:00:00.000000+00:00",
        },
    ], base


def _insert_runs(db):
    rows, base = _run_rows()
    flow_id, ids = str(uuid.uuid4()), []
    with db.write() as tx:
        prefectlite.insert_row(tx, "flow", {"id": flow_id, "created": _NOW, "updated": _NOW, "name": "f", "tags": []})
        for i, extra in enumerate(rows):
            run_id = str(uuid.uuid4())
            ids.append(run_id)
            state = {"type": extra["state_type"], "name": extra["state_name"]} if extra.get("state_type") else None
            prefectlite.insert_row(
                tx,
                "flow_run",
                {
                    **base,
                    "id": run_id,
                    "created": _NOW,
                    "updated": _NOW,
                    "flow_id": flow_id,
                    "state": state,
                    "parameters": {"x": [1, 2.5, None, {"deep": "ß"}]},
                    "context": {},
                    "labels": {"k": "v"},
                    "job_variables": {},
                    "auto_scheduled": i % 2 == 0,
                    "created_by": None if i % 3 else {"id": "u"},
                    **extra,
                },
            )
            prefectlite.insert_row(
                tx,
                "task_run",
                {
                    **base,
                    "id": str(uuid.uuid4()),
                    "created": _NOW,
                    "updated": _NOW,
                    "flow_run_id": run_id,
                    "task_key": "k",
                    "dynamic_key": str(i),
                    "task_inputs": {"x": [{"input_type": "parameter", "name": "x"}]},
                    "state": state,
                    **extra,
                },
            )
    return ids


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_run_estimates_in_python_and_in_sql_agree(dialect, tmp_path, request):
    """The estimates exist twice: _computed_run_fields (a run read or written one at a time) and
    _run_estimates_sql (run listings and the history's sums, computed by the database). On every case
    of the table (_run_rows), unrounded as the history sums them, the two give the same seconds."""
    url = f"sqlite:///{tmp_path}/estimates.db" if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    db = _open_migrated(url, tmp_path)
    try:
        _insert_runs(db)
        with db.read() as tx:
            for table in ("flow_run", "task_run"):
                run_time, delta = prefectlite._run_estimates_sql(db, table)
                sql = f"SELECT {table}.*, {run_time} AS sql_run_time, {delta} AS sql_delta FROM {table}"
                rows = tx.query(sql, (_NOW,) * (run_time.count("?") + delta.count("?")))
                assert len(rows) == len(_run_rows()[0])
                for row in rows:
                    python = prefectlite._computed_run_fields(row, _NOW)
                    case = (table, row["name"])
                    assert abs(float(row["sql_run_time"]) - python["estimated_run_time"]) <= 1e-6, case
                    assert abs(float(row["sql_delta"]) - python["estimated_start_time_delta"]) <= 1e-6, case
    finally:
        db.close()


def _same_json(a, b) -> bool:
    """Equal as JSON values; numbers to within 1e-9 (SQLite prints floats with 15 digits)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same_json, a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(a - b) <= 1e-9
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_run_json_written_by_the_database_equals_run_out(dialect, tmp_path, request):
    """For each client major: 3.x's adds labels and 3.9's state details (run_for_client)."""
    url = f"sqlite:///{tmp_path}/json.db" if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    db = _open_migrated(url, tmp_path)
    try:
        _insert_runs(db)
        with db.read() as tx:
            for table, major in itertools.product(("flow_run", "task_run"), (2, 3)):
                select, params = prefectlite.run_json_select(tx, table, _NOW, major)
                docs = {
                    r["id"]: json.loads(r["doc"])
                    for r in tx.query(f"SELECT {table}.id AS id, {select} FROM {table}", params)
                }
                rows = tx.query(f"SELECT * FROM {table}")
                assert len(rows) == len(docs) == len(_run_rows()[0])
                for row in rows:
                    run = prefectlite.run_out(table, row, _NOW)
                    expected = prefectlite.run_for_client(run, prefectlite.stored_labels(row), major)
                    assert _same_json(docs[row["id"]], expected), (major, row["name"], docs[row["id"]], expected)
        # spot checks, so that both sides being wrong the same way would still fail
        with db.read() as tx:
            select, params = prefectlite.run_json_select(tx, "flow_run", _NOW)
            by_name = {
                d["name"]: d for d in (json.loads(r["doc"]) for r in tx.query(f"SELECT {select} FROM flow_run", params))
            }
        assert by_name["running"]["estimated_run_time"] == pytest.approx(12.25 + 90.499999)
        assert by_name["late-scheduled"]["estimated_start_time_delta"] == pytest.approx(43200.250001)
        assert by_name["completed-late"]["estimated_start_time_delta"] == pytest.approx(7.123456)
        assert by_name["completed-early"]["estimated_start_time_delta"] == 0
        assert by_name["crashed-never-started"]["estimated_start_time_delta"] == 0
        assert by_name["future-scheduled"]["estimated_start_time_delta"] == 0
        assert (
            by_name["running"]["auto_scheduled"] is True
            and by_name["running-without-timestamp"]["auto_scheduled"] is False
        )
        assert by_name["running"]["parameters"] == {"x": [1, 2.5, None, {"deep": "ß"}]}
        assert "labels" not in by_name["running"] and "state_timestamp" not in by_name["running"]
    finally:
        db.close()
