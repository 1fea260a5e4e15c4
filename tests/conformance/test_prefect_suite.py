"""Prefect's own test suites, run against prefectlite, pass every test they pass on Prefect's own server: 2.20.25's,
and the 3.x one (3.8.4.dev6) run by the 3.9.1 SDK.

The suites are test input at ../shared/reference/prefect-tests (or $PREFECTLITE_PREFECT_TESTS_DIR; not in a user's
clone: then this skips, unless PREFECTLITE_REQUIRE_CONFORMANCE=1, as in CI, which makes its absence a failure).
run.py does the work: it runs a suite in its own venv as subprocesses (prefect is never imported here) against a
prefectlite server it starts, and compares with prefect-2.20-passing.txt or prefect-3.x-passing.txt (regenerate:
`python tests/conformance/run.py [--suite 3.x] --reference`). A test that passes there but not here fails this
module unless known-differences.txt (known-differences-3.x.txt) says why.
"""

from __future__ import annotations

import dataclasses
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


# A group per suite: under `pytest -n 2 --dist loadgroup tests/conformance` (the README's second command) each suite's
# long run gets a worker of its own instead of both landing on one.
@pytest.fixture(
    scope="module",
    params=[
        pytest.param(s, marks=pytest.mark.xdist_group(f"prefect-{s.name}"))
        for s in (harness.PREFECT_2, harness.PREFECT_3)
    ],
    ids=lambda suite: suite.name,
)
def suite(request):
    return request.param


@pytest.fixture(scope="module")
def prefect_suite_results(suite) -> dict:
    """One run of the suite's whole selection against prefectlite (2.20: about twenty minutes in CI; 3.x: see
    tests/benchmarks/README.md), shared by this module's tests."""
    if not harness.suite_available(suite):
        unavailable(f"Prefect's {suite.version} test suite is not at {suite.path}")
    try:
        suite.ensure_venv()
    except suite.venv_error as exc:
        unavailable(f"cannot build the Prefect {suite.sdk} test venv: {exc}")
    started = time.monotonic()
    try:
        results = harness.run_against("prefectlite", retry_baseline=harness.read_baseline(suite.baseline), suite=suite)
    except harness.HarnessError as exc:
        pytest.fail(f"the conformance harness could not run Prefect's suite: {exc}")
    print(
        f"[conformance] Prefect's {suite.version} suite against prefectlite: {harness.counts(results)} "
        f"in {time.monotonic() - started:.0f}s"
    )
    return results


@pytest.mark.parametrize(
    "path, inside, outside",
    [
        ("tests/test_a.py", "tests/test_a.py::T::test_x[1]", "tests/test_ab.py::test_y"),
        ("tests/cli", "tests/cli/test_b.py::test_z", "tests/client/test_c.py::test_z"),
        ("tests/test_a.py::T", "tests/test_a.py::T::test_x", "tests/test_a.py::Tother::test_x"),
        ("tests/test_a.py::test_x", "tests/test_a.py::test_x[2]", "tests/test_a.py::test_xy"),
    ],
)
def test_a_selection_by_file_folder_or_node_id_takes_its_baseline_tests(path, inside, outside):
    """`run.py -k` with node ids compares with their baseline tests only (it called every one "extra")."""
    assert harness.in_path(inside, path) and not harness.in_path(outside, path)


@pytest.mark.parametrize(
    "files, expected",
    [
        (["tests/a.py", "tests/fresh.py"], [["tests/a.py"], ["tests/fresh.py"]]),
        (["tests", "tests/b.py"], [["tests", "tests/b.py", "--ignore=tests/fresh.py"], ["tests/fresh.py"]]),
        (["tests/a.py"], [["tests/a.py"]]),
        (["tests/fresh.py::test_x"], [["tests/fresh.py::test_x"]]),
    ],
)
def test_a_file_that_needs_a_fresh_server_runs_alone_even_when_its_folder_is_selected(files, expected):
    """A fresh-server file inside a selected folder once ran with the folder's batch, on its shared server."""
    assert harness.batches(files, ("tests/fresh.py",)) == expected


def test_known_differences_each_say_why_and_name_a_baseline_test(suite):
    known = harness.read_known_differences(suite.known_differences)  # raises on a line without a reason
    baseline = harness.read_baseline(suite.baseline)
    stale = sorted(n for n in known if n not in baseline)
    assert not stale, f"{suite.known_differences.name} names tests that do not pass on Prefect's server:\n" + "\n".join(
        stale
    )


def test_every_baseline_test_is_in_the_selection_and_counted_in_the_header(suite):
    baseline = harness.read_baseline(suite.baseline)
    (passing, runnable, collected), _ = harness.baseline_header(suite.baseline)
    assert passing == len(baseline) and passing <= runnable <= collected
    outside = sorted(n for n in baseline if not any(harness.in_path(n, entry) for entry in suite.selection))
    assert not outside, f"{suite.baseline.name} holds tests outside the selection:\n" + "\n".join(outside[:20])


def test_a_partial_reference_run_of_files_new_to_the_selection_merges_into_the_baseline(tmp_path):
    """`run.py --reference --merge -k FILES` adds a partial run to the baseline (it could only be discarded)."""
    baseline = tmp_path / "passing.txt"
    baseline.write_text(
        "# Tests of ... that pass against Prefect's own server: 2 of 3\n# runnable (5 collected).\n"
        "# Regenerate: python tests/conformance/run.py --suite 3.x --reference\n"
        "tests/test_a.py::test_one\ntests/test_a.py::test_two\n",
        encoding="utf-8",
    )
    suite = dataclasses.replace(harness.PREFECT_3, selection=("tests/test_a.py", "tests/new"), baseline=baseline)
    results = {
        "tests/new/test_n.py::test_passes": {"outcome": "passed"},
        "tests/new/test_n.py::test_fails": {"outcome": "failed"},
        "tests/new/test_n.py::test_skipped": {"outcome": "skipped"},
        "tests/test_a.py::test_three": {"outcome": "passed"},  # not of the merged files: left out
    }
    harness.merge_baseline(results, ["tests/new"], suite)
    assert harness.read_baseline(baseline) == {
        "tests/test_a.py::test_one",
        "tests/test_a.py::test_two",
        "tests/new/test_n.py::test_passes",
    }
    (passing, runnable, collected), merged = harness.baseline_header(baseline)
    assert (passing, runnable, collected) == (3, 5, 8)
    assert merged == ["# Merged: python tests/conformance/run.py --suite 3.x --reference --merge -k tests/new"]
    with pytest.raises(harness.HarnessError, match="already holds tests of tests/new"):
        harness.merge_baseline(results, ["tests/new"], suite)  # its counts would be added twice
    with pytest.raises(harness.HarnessError, match="not in the 3.x selection"):
        harness.merge_baseline(results, ["tests/other"], suite)
    assert harness.baseline_header(baseline)[0] == (3, 5, 8)


def test_merge_needs_a_partial_reference_run_of_the_selection():
    for argv in (["--merge"], ["--merge", "--reference"], ["--merge", "-k", "tests/workers"]):
        with pytest.raises(SystemExit) as raised:
            harness.main(argv)
        assert raised.value.code == 2


def test_every_test_passing_on_prefects_server_passes_on_prefectlite(suite, prefect_suite_results):
    known = harness.read_known_differences(suite.known_differences)
    comparison = harness.compare(harness.read_baseline(suite.baseline), prefect_suite_results, known)
    message = harness.report(comparison, prefect_suite_results, known)
    print(message)
    assert not comparison.missing, message


def test_node_ids_with_the_servers_port_or_the_suite_copys_path_are_the_same_from_run_to_run():
    """2.20's runner/test_webserver.py is parametrized with a path inside the scratch copy: each run's ids differed
    (two tests "missing" and two "extra" in every comparison), until the results named the copy ROOTDIR."""
    spec = importlib.util.spec_from_file_location("prefectlite_suite_plugin", HERE / "prefect_suite_plugin.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    plugin._ROOTDIR[0] = "/tmp/run-a/prefect-2.20.25"  # a module of its own: what pytest_configure sets
    raw = "tests/runner/test_webserver.py::T::test_x[/tmp/run-a/prefect-2.20.25/tests/runner/test_webserver.py-f]"
    stable = plugin.stable_id(raw)
    assert stable == "tests/runner/test_webserver.py::T::test_x[ROOTDIR/tests/runner/test_webserver.py-f]"
    assert (
        plugin.stable_id("tests/t.py::test_api[http://127.0.0.1:4242/api]")
        == "tests/t.py::test_api[http://127.0.0.1:PORT/api]"
    )
    assert harness.pytest_arg(stable) == "tests/runner/test_webserver.py::T::test_x"
    assert harness.pytest_arg("tests/t.py::test_api[http://127.0.0.1:PORT/api]") == "tests/t.py::test_api"
    assert harness.pytest_arg("tests/t.py::test_x[ROOT]") == "tests/t.py::test_x[ROOT]"
