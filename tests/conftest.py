"""Shared fixtures: a real server on a free loopback port, a small JSON client, PostgreSQL databases."""

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import prefectlite  # noqa: E402
from helpers import (  # noqa: E402,F401 - re-exported for tests that import them from conftest
    POSTGRES_URL, ROOT, Client, _postgres_admin_connect, free_port, run_cli, wait_for_health,
)

collect_ignore = ["benchmarks"]  # benchmark scripts are run by hand, never collected


@pytest.fixture
def server(tmp_path):
    """A real server on a free port over a real SQLite file; yields its API URL."""
    with prefectlite.serve(database=f"sqlite:///{tmp_path}/test.db", port=0) as api_url:
        yield api_url


@pytest.fixture
def client(server):
    return Client(server)


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL database, created for the test and dropped after it."""
    conn, why = _postgres_admin_connect()
    if conn is None:
        if os.environ.get("PREFECTLITE_TEST_POSTGRES_URL"):
            pytest.fail(why)
        pytest.skip(why)
    name = f"prefectlite_test_{uuid.uuid4().hex[:12]}"
    conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


