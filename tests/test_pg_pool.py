"""The bounded PostgreSQL connection pool (section 2, issue 18 item 11): at most POOL_SIZE + MAX_OVERFLOW
connections per server process, a wait of at most PREFECT_API_DATABASE_TIMEOUT for a free one and then a
503 that says why, overflow connections closed when idle, broken ones freeing their slot, and a thread
that already holds a connection never waiting for a second one.

Requests are made slow for real: a lock taken from another session (LOCK TABLE) keeps them waiting
inside PostgreSQL, each holding its connection. Connections are counted in pg_stat_activity.
"""

import contextlib
import threading

import pytest

from helpers import Client, wait_until

import prefectlite


# ---------------------------------------------------------------------------------------------
# helpers


def _settings(tmp_path, url, **values):
    env = {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_DATABASE_CONNECTION_URL": url}
    return prefectlite.load_settings(env=env, overrides={k: str(v) for k, v in values.items()})


def _connect(url):
    import psycopg  # the postgres_url fixture has skipped the test if it is missing

    return psycopg.connect(url, autocommit=True, application_name=TEST_SESSION)


@pytest.fixture
def admin(postgres_url):
    """A session of our own on the test's database, for pg_stat_activity. Autocommit: each query sees
    activity afresh (within a transaction, pg_stat_activity stays what it was at its first read)."""
    conn = _connect(postgres_url)
    yield conn
    conn.close()


@contextlib.contextmanager
def flow_table_locked(url):
    """Every request that reads `flow` waits inside PostgreSQL, holding its connection, until the block ends."""
    with _connect(url) as conn:
        conn.execute("BEGIN")
        conn.execute("LOCK TABLE flow IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.execute("COMMIT")


@pytest.fixture
def start(tmp_path, postgres_url):
    """start(**settings): a migrated server without services (they would take connections of their own)."""
    running = []

    def start_one(**values):
        server = prefectlite.start_server(_settings(tmp_path, postgres_url, **values), "127.0.0.1", 0, services=False)
        running.append(server)
        return server

    yield start_one
    for server in running:
        server.stop()


@pytest.fixture
def open_db(tmp_path, postgres_url):
    """open_db(**settings): a PostgresDatabase on the test's database, closed at the end."""
    opened = []

    def open_one(**values):
        db = prefectlite.open_database(postgres_url, _settings(tmp_path, postgres_url, **values))
        opened.append(db)
        return db

    yield open_one
    for db in opened:
        db.close()


TEST_SESSION = "prefectlite-test"  # the application_name of this module's own sessions


def _server_connections(admin) -> int:
    """Sessions on the test's database but this module's own (counted so on servers that name theirs or not)."""
    return admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name <> %s AND backend_type = 'client backend'",
        (TEST_SESSION,),
    ).fetchone()[0]


def _waiting_on_a_lock(admin) -> int:
    return admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()[0]


def _waiting_for_a_connection(db) -> int:
    counts = getattr(db, "pool_counts", None)  # absent before the pool: then every request has a connection
    return counts()["waiting"] if counts else 0


class Requests:
    """`count` concurrent POST /flows/filter from threads of their own; answers in `answers`."""

    def __init__(self, api_url, count):
        self.answers = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._one, args=(api_url,)) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _one(self, api_url):
        answer = Client(api_url, timeout=120).post("/flows/filter", {})
        with self._lock:
            self.answers.append(answer)

    def join(self):
        for thread in self.threads:
            thread.join(150)
        return self.answers


class Sampler:
    """Counts the server's connections in pg_stat_activity, over and over, until stopped: the most seen."""

    def __init__(self, url):
        self.most = 0
        self._conn = _connect(url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()

    def _sample(self):
        while not self._stop.is_set():
            self.most = max(self.most, _server_connections(self._conn))
            self._stop.wait(0.01)

    def stop(self):
        self._stop.set()
        self._thread.join()
        self._conn.close()
        return self.most


# ---------------------------------------------------------------------------------------------
# a server under load


def test_many_slow_requests_never_open_more_than_pool_size_plus_overflow(start, admin, postgres_url):
    server = start(
        PREFECT_API_DATABASE_POOL_SIZE=2, PREFECT_API_DATABASE_MAX_OVERFLOW=1, PREFECT_API_DATABASE_TIMEOUT=60
    )
    sampler = Sampler(postgres_url)
    with flow_table_locked(postgres_url):
        requests = Requests(server.api_url, 12)
        # all 12 are in: those holding a connection wait for the lock, the others for a connection
        wait_until(
            lambda: _waiting_on_a_lock(admin) + _waiting_for_a_connection(server.app.db) >= 12,
            60,
            "12 requests waiting in PostgreSQL or for a connection",
        )
        at_the_peak = _server_connections(admin)
    answers = requests.join()
    most = sampler.stop()
    assert [status for status, _ in answers] == [200] * 12, answers
    assert at_the_peak == 3 and most <= 3, f"{at_the_peak} connections at the peak, {most} at most"


def test_the_idle_server_keeps_at_most_pool_size_connections(start, admin, postgres_url):
    server = start(
        PREFECT_API_DATABASE_POOL_SIZE=2, PREFECT_API_DATABASE_MAX_OVERFLOW=3, PREFECT_API_DATABASE_TIMEOUT=60
    )
    with flow_table_locked(postgres_url):
        requests = Requests(server.api_url, 8)
        wait_until(lambda: _waiting_on_a_lock(admin) >= 5, 60, "5 requests holding a connection")
    assert [status for status, _ in requests.join()] == [200] * 8
    # the 3 overflow connections are closed after a short idle time; the 2 of the pool stay for the next load
    wait_until(lambda: _server_connections(admin) == 2, 60, "the idle server down to POOL_SIZE connections")
    assert server.app.db.pool_counts() == {"open": 2, "idle": 2, "waiting": 0, "limit": 5}


def test_a_request_that_gets_no_connection_in_time_is_a_503_that_says_why(start, admin, postgres_url):
    server = start(
        PREFECT_API_DATABASE_POOL_SIZE=1, PREFECT_API_DATABASE_MAX_OVERFLOW=0, PREFECT_API_DATABASE_TIMEOUT=0.5
    )
    with flow_table_locked(postgres_url):
        holder = Requests(server.api_url, 1)  # takes the one connection, then waits for the lock
        wait_until(lambda: _waiting_on_a_lock(admin) == 1, 60, "a request holding the only connection")
        status, body = Client(server.api_url, timeout=60).post("/flows/filter", {})
    reason = "the one database connection of this server is busy (waited 0.5 s for one)"
    assert (status, body) == (503, {"detail": f"Service unavailable: {reason}", "reason": reason})
    assert [status for status, _ in holder.join()] == [200]


def _end_sessions(admin, pids):
    """pg_terminate_backend, waiting (up to 10 s) until each session is gone."""
    for pid in pids:
        assert admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone()[0]


def _server_pids(admin):
    return [
        row[0]
        for row in admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name <> %s "
            "AND backend_type = 'client backend'",
            (TEST_SESSION,),
        ).fetchall()
    ]


def test_an_idle_connection_the_server_ended_is_replaced_before_use(start, admin):
    """PostgreSQL restarted, or an administrator ended the sessions: the next request gets a new connection
    in the dead one's place, not a 503."""
    server = start(
        PREFECT_API_DATABASE_POOL_SIZE=1, PREFECT_API_DATABASE_MAX_OVERFLOW=0, PREFECT_API_DATABASE_TIMEOUT=5
    )
    client = Client(server.api_url, timeout=60)
    assert client.post("/flows/", {"name": "before"})[0] == 201
    before = _server_pids(admin)
    _end_sessions(admin, before)
    assert client.post("/flows/", {"name": "after"})[0] == 201
    after = _server_pids(admin)
    assert len(after) == 1 and after != before and server.app.db.pool_counts()["open"] == 1


def test_a_connection_broken_in_use_is_a_503_and_frees_its_slot(open_db, admin):
    db = open_db(PREFECT_API_DATABASE_POOL_SIZE=1, PREFECT_API_DATABASE_MAX_OVERFLOW=0, PREFECT_API_DATABASE_TIMEOUT=5)
    with pytest.raises(prefectlite.DatabaseUnavailable, match="PostgreSQL is unavailable"):
        with db.read() as tx:
            _end_sessions(admin, [tx.scalar("SELECT pg_backend_pid()")])
            tx.scalar("SELECT 1")
    assert db.pool_counts()["open"] == 0  # closed, its slot free: were it still counted, this would wait 5 s
    with db.read() as tx:  # and then be told the one connection is busy
        assert tx.scalar("SELECT 1") == 1
    assert db.pool_counts()["open"] == 1


# ---------------------------------------------------------------------------------------------
# the pool itself


def test_a_thread_holding_a_connection_never_waits_for_a_second(open_db, admin):
    """Two threads each hold one of the two connections, then each opens a read inside its transaction
    (as a service or a handler may): waiting for a free connection would be waiting for each other."""
    db = open_db(
        PREFECT_API_DATABASE_POOL_SIZE=1, PREFECT_API_DATABASE_MAX_OVERFLOW=1, PREFECT_API_DATABASE_TIMEOUT=2
    )  # a wait for the second would end in a 503 after 2 s
    both_hold = threading.Barrier(2, timeout=60)
    results, errors = [], []

    def nested(n):
        try:
            with db.write() as outer:
                outer.scalar("SELECT 1")
                both_hold.wait()
                with db.read() as inner:
                    results.append(inner.scalar("SELECT ?::int", (n,)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=nested, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and sorted(results) == [1, 2]
    # the two connections opened beyond the limit were closed when given back (a closed session leaves
    # pg_stat_activity a moment after its client closed it)
    assert db.pool_counts()["open"] <= 2
    wait_until(lambda: _server_connections(admin) <= 2, 60, "the sessions beyond the limit to end")


def test_waiters_are_served_first_come_first_served(open_db):
    db = open_db(PREFECT_API_DATABASE_POOL_SIZE=1, PREFECT_API_DATABASE_MAX_OVERFLOW=0, PREFECT_API_DATABASE_TIMEOUT=60)
    served = []

    def wait_in_line(n):
        with db.read() as tx:
            served.append(n)
            tx.scalar("SELECT 1")

    with db.read():
        waiters = []
        for n in range(5):
            waiters.append(threading.Thread(target=wait_in_line, args=(n,)))
            waiters[-1].start()
            wait_until(lambda: db.pool_counts()["waiting"] == n + 1, 60, f"waiter {n} in line")
    for thread in waiters:
        thread.join(60)
    assert served == [0, 1, 2, 3, 4]


def test_connections_are_opened_only_when_needed(open_db, admin):
    db = open_db(PREFECT_API_DATABASE_POOL_SIZE=5, PREFECT_API_DATABASE_MAX_OVERFLOW=10)
    assert db.pool_counts()["open"] == 1 and _server_connections(admin) == 1  # the one that checked the version
    for _ in range(3):
        with db.read() as tx:
            tx.scalar("SELECT 1")
    assert db.pool_counts()["open"] == 1


def test_a_closed_database_turns_its_waiters_away(open_db):
    db = open_db(PREFECT_API_DATABASE_POOL_SIZE=1, PREFECT_API_DATABASE_MAX_OVERFLOW=0, PREFECT_API_DATABASE_TIMEOUT=60)
    errors = []

    def wait_in_line():
        try:
            with db.read():
                pass
        except prefectlite.DatabaseUnavailable as exc:
            errors.append(str(exc))

    with db.read():
        waiter = threading.Thread(target=wait_in_line)
        waiter.start()
        wait_until(lambda: db.pool_counts()["waiting"] == 1, 60, "a waiter in line")
        db.close()
        waiter.join(60)
    assert errors == ["the server is shutting down"]
    assert db.pool_counts()["open"] == 0  # the connection in use was closed when given back


def test_vacuum_uses_a_connection_of_the_pool(open_db, admin):
    db = open_db(PREFECT_API_DATABASE_POOL_SIZE=1, PREFECT_API_DATABASE_MAX_OVERFLOW=0)
    prefectlite.migrate(db)
    with db.read() as tx:
        before = tx.scalar("SELECT pg_backend_pid()")
    db.vacuum()
    with db.read() as tx:  # the vacuum's connection, back in the pool and out of autocommit
        assert tx.scalar("SELECT pg_backend_pid()") == before
        assert not tx.conn.autocommit
    assert db.pool_counts() == {"open": 1, "idle": 1, "waiting": 0, "limit": 1}
    assert _server_connections(admin) == 1
