"""Shared fixtures: a real server on a free loopback port, a small JSON client, PostgreSQL databases."""

import contextlib
import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import prefectlite  # noqa: E402
from helpers import (  # noqa: E402,F401 - re-exported for tests that import them from conftest
    POSTGRES_URL,
    ROOT,
    T0,
    Client,
    Clock,
    RefusingPort,
    _postgres_admin_connect,
    free_port,
    migrated_sqlite_url,
    run_cli,
    wait_for_health,
)

collect_ignore = ["benchmarks"]  # benchmark scripts are run by hand, never collected


def pytest_collection_modifyitems(items):
    """Tests of an `xdist_group` first, in their order: one worker runs a group whole (test_ui.py: minutes in one
    chain), so under `-n 4 --dist loadgroup`, which hands work out in collection order, a group collected last
    would start late and finish alone after the rest. Started first, it runs beside everything else."""
    items[:] = sorted(items, key=lambda item: item.get_closest_marker("xdist_group") is None)


@pytest.fixture
def server(tmp_path):
    """A real server on a free port over a real SQLite file (migrated already: a template's copy); yields
    its API URL."""
    with prefectlite.serve(database=migrated_sqlite_url(tmp_path / "test.db"), port=0) as api_url:
        yield api_url


@pytest.fixture
def clock():
    """A Clock at helpers.T0: the time of the Apps `make_app` makes; a test moves it (clock.moment = ...)."""
    return Clock(T0)


@pytest.fixture
def make_app(tmp_path, clock):
    """make_app(**settings): an App on a migrated SQLite file, its clock `clock`, whose services are built but
    never started (no threads): a test runs their passes itself (service.run_once(moment)) and asks it with
    helpers.answer(app, ...)."""
    apps = []

    def make(**settings):
        url = migrated_sqlite_url(tmp_path / f"app-{len(apps)}.db")
        overrides = {**settings, "PREFECT_API_DATABASE_CONNECTION_URL": url}
        app = prefectlite.create_app(prefectlite.load_settings(overrides=overrides), clock=clock)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def app(make_app):
    """make_app() with the default settings."""
    return make_app()


@pytest.fixture
def refusing_port():
    """A RefusingPort, held for the test (or until it releases it)."""
    port = RefusingPort()
    yield port
    port.release()


@pytest.fixture
def client(server):
    return Client(server)


def _admin_or_skip():
    conn, why = _postgres_admin_connect()
    if conn is None:
        if os.environ.get("PREFECTLITE_TEST_POSTGRES_URL"):
            pytest.fail(why)
        pytest.skip(why)
    return conn


@contextlib.contextmanager
def _throwaway_postgres(template=None):
    """A PostgreSQL database created for one test (a copy of `template`, if given) and dropped after it."""
    conn = _admin_or_skip()
    name = f"prefectlite_test_{uuid.uuid4().hex[:12]}"
    conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        yield f"{POSTGRES_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture(scope="session")
def _migrated_postgres_template():
    """A PostgreSQL database migrated once per test process, with the built-in block types, never served:
    the template `postgres_url` copies (CREATE DATABASE ... TEMPLATE, ~0.1-0.3 s, against ~0.6-1 s to
    migrate a new database)."""
    with _throwaway_postgres() as url:
        db = prefectlite.open_database(url)
        try:
            prefectlite.migrate(db)
            with db.write() as tx:
                prefectlite.install_builtin_block_types(tx)
        finally:
            db.close()  # a template may have no connections while it is copied
        yield url.rsplit("/", 1)[1]


@pytest.fixture
def postgres_url(_migrated_postgres_template):
    """A throwaway PostgreSQL database with every migration applied, as a server's first start leaves it."""
    with _throwaway_postgres(template=_migrated_postgres_template) as url:
        yield url


@pytest.fixture(scope="module")
def module_postgres_url(_migrated_postgres_template):
    """postgres_url shared by a module's tests: for tests that only read what the module's fixture wrote."""
    with _throwaway_postgres(template=_migrated_postgres_template) as url:
        yield url


@pytest.fixture
def empty_postgres_url():
    """A throwaway PostgreSQL database with nothing in it: for tests of migrating and of a first start."""
    with _throwaway_postgres() as url:
        yield url
