"""Prefect 2.20.25's own test suite, run against prefectlite, passes every test it passes on Prefect's own server.

The suite is test input at ../shared/reference/prefect-tests (or $PREFECTLITE_PREFECT_TESTS_DIR; not in a user's
clone: then this skips, unless PREFECTLITE_REQUIRE_CONFORMANCE=1, as in CI, which makes its absence a failure). run.py does the work: it runs
the suite in its own venv as subprocesses (prefect is never imported here) against a prefectlite server it
starts, and compares with prefect-2.20-passing.txt (regenerate: `python tests/conformance/run.py --reference`).
A test that passes there but not here fails this module unless known-differences.txt says why.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REQUIRED = os.environ.get("PREFECTLITE_REQUIRE_CONFORMANCE") == "1"


def _load_harness():
    """run.py under its own module name: `run` is too common a name to put on sys.path."""
    spec = importlib.util.spec_from_file_location("prefectlite_conformance_run", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


harness = _load_harness()


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} (PREFECTLITE_REQUIRE_CONFORMANCE=1: failing instead of skipping)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def prefect_suite_results() -> dict:
    """One run of the whole selection against prefectlite (about ten minutes), shared by this module's tests."""
    if not harness.suite_available():
        unavailable(f"Prefect's test suite is not at {harness.SUITE}")
    try:
        harness.prefect_tests_venv.ensure_prefect_tests_venv()
    except harness.prefect_tests_venv.VenvError as exc:
        unavailable(f"cannot build the Prefect 2.20.25 test venv: {exc}")
    started = time.monotonic()
    try:
        results = harness.run_against("prefectlite", retry_baseline=harness.read_baseline())
    except harness.HarnessError as exc:
        pytest.fail(f"the conformance harness could not run Prefect's suite: {exc}")
    print(f"[conformance] Prefect's 2.20.25 suite against prefectlite: {harness.counts(results)} "
          f"in {time.monotonic() - started:.0f}s")
    return results


def test_known_differences_each_say_why_and_name_a_baseline_test():
    known = harness.read_known_differences()  # raises on a line without a reason
    baseline = harness.read_baseline()
    stale = sorted(n for n in known if n not in baseline)
    assert not stale, "known-differences.txt names tests that do not pass on Prefect's server:\n" + "\n".join(stale)


def test_every_test_passing_on_prefects_server_passes_on_prefectlite(prefect_suite_results):
    known = harness.read_known_differences()
    comparison = harness.compare(harness.read_baseline(), prefect_suite_results, known)
    message = harness.report(comparison, prefect_suite_results, known)
    print(message)
    assert not comparison.missing, message
