"""Run a Prefect user's test suite (pytest, in a Prefect venv) against prefect_test_harness: for the tests
of the harness (test_test_harness.py) and its benchmark (tests/benchmarks/bench_test_harness.py).

The venvs hold prefect, not pytest: our own pytest (same Python, 3.11) is lent to them through a
directory of symlinks put first on PYTHONPATH, with the repository (prefectlite.py). The venv keeps its
own `packaging` and `pygments`, which pytest also needs. Nothing of Prefect's is imported here.

Standard library only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import textwrap
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
_LENT = ("pytest", "_pytest", "pluggy", "iniconfig", "py")  # what pytest imports that the venvs lack

# The suite's tests each record when their call ended: the process's exit is measured from the last, so
# it takes in the session's teardown (the harness stopping) and the interpreter's exit.
CONFTEST_COMMON = """
import os, time
import pytest

def pytest_runtest_logreport(report):
    if report.when == "call":
        with open(os.environ["HARNESS_SUITE_TIMES"], "a") as f:
            f.write(f"{time.time()}\\n")
"""

# Ours: the plugin (-p prefectlite) gives the session fixture; every test starts from an empty database.
CONFTEST_OURS = (
    CONFTEST_COMMON
    + """
@pytest.fixture(autouse=True)
def _clean(prefect_clean_db):
    yield
"""
)

# Prefect's own harness, as its documentation has users write it.
CONFTEST_THEIRS = (
    CONFTEST_COMMON
    + """
from prefect.testing.utilities import prefect_test_harness

@pytest.fixture(autouse=True, scope="session")
def _harness():
    with prefect_test_harness():
        yield
"""
)

# N tests, each running a one-task flow.
FLOW_TESTS = """
import pytest
from prefect import flow, task

@task
def add_one(n):
    return n + 1

@flow
def one_task_flow(n):
    return add_one(n)

@pytest.mark.parametrize("n", range({count}))
def test_flow(n):
    assert one_task_flow(n) == n + 1
"""


@dataclasses.dataclass
class SuiteRun:
    returncode: int
    output: str
    wall: float  # seconds, the whole pytest process
    test_ends: list[float]  # time.time() at which each test finished
    exited_at: float  # time.time() once the process was gone

    @property
    def exit_after_last_test(self) -> float | None:
        return self.exited_at - max(self.test_ends) if self.test_ends else None


def lend_pytest(directory: Path) -> Path:
    """A directory of symlinks to our pytest and what it imports, for a venv's PYTHONPATH."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in _LENT:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"{name} is not importable here: cannot lend pytest to a Prefect venv")
        source = Path(spec.origin)
        source = source.parent if source.name == "__init__.py" else source
        link = directory / source.name
        if not link.exists():
            link.symlink_to(source)
    return directory


def write_suite(directory: Path, conftest: str, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "conftest.py").write_text(textwrap.dedent(conftest))
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def venv_env(lent: Path, home: Path) -> dict:
    """The environment a venv's python runs in: no PREFECT_ settings of ours, a PREFECT_HOME of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    for name in ("PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join([str(lent), str(REPO_ROOT)])
    env["PREFECT_HOME"] = str(home)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # Prefect's own server (theirs): no phoning home
    return env


def run_suite(python: str, suite: Path, env: dict, args: list[str], timeout: float) -> SuiteRun:
    """`python -m pytest` on the suite, in its own directory; raises TimeoutExpired past `timeout`."""
    times = suite / "test-ends.txt"
    times.unlink(missing_ok=True)
    env = {**env, "HARNESS_SUITE_TIMES": str(times)}
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, str(suite)]
    started = time.monotonic()
    proc = subprocess.run(
        command, cwd=suite, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    exited_at = time.time()
    wall = time.monotonic() - started
    ends = [float(line) for line in times.read_text().split()] if times.exists() else []
    return SuiteRun(proc.returncode, proc.stdout + proc.stderr, wall, ends, exited_at)
