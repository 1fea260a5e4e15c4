#!/usr/bin/env python3
"""A Prefect user's test suite on prefectlite's harness against Prefect's own `prefect_test_harness` (issue 21).

The suite: `--tests` (20) tests, each running a one-task flow, with a session harness. Ours is the pytest
plugin (`-p prefectlite`: the prefect_server session fixture, and prefect_clean_db emptying the database
before every test); theirs is `prefect.testing.utilities.prefect_test_harness` in a session fixture, as
Prefect's documentation writes it. Both run the same SDK, in its cached venv (tests/compat), in a fresh
`pytest` process each: we measure the whole process's wall time, and how long after the last test ended
the process was gone. Runs are interleaved (ours, theirs, ours, ...) for `--rounds` per SDK.

Targets: ours >= 3x faster (median wall time) on 2.20 and on 3.9; exit within 1 s of the last test.
`--heartbeats` adds a third variant on 3.x: ours with the SDK's flow-run heartbeats left on
(prefect_test_harness(flow_heartbeats=True)), which Prefect's harness keeps.

Usage: python tests/benchmarks/bench_test_harness.py [--sdks 2.20,3.9] [--rounds 3] [--tests 20] [--json]
Standard library only; pytest is lent to the venvs (tests/compat/harness_suites.py). Loopback only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "compat"))
import harness_suites  # noqa: E402
import prefect3_venv  # noqa: E402
import prefect_venv  # noqa: E402

VENVS = {"2.20": prefect_venv.ensure_prefect_venv, "3.9": prefect3_venv.ensure_prefect3_venv}
SUITE_TIMEOUT = 600.0

# Ours, with the SDK's flow-run heartbeats as Prefect's harness leaves them (3.x only; one session harness).
CONFTEST_OURS_HEARTBEATS = (
    harness_suites.CONFTEST_COMMON
    + """
import prefectlite

@pytest.fixture(autouse=True, scope="session")
def _harness():
    with prefectlite.prefect_test_harness(flow_heartbeats=True):
        yield
"""
)


def variants(sdk: str, heartbeats: bool) -> dict[str, tuple[str, list[str]]]:
    """name -> (conftest, extra pytest arguments)."""
    chosen = {
        "ours": (harness_suites.CONFTEST_OURS, ["-p", "prefectlite"]),
        "theirs": (harness_suites.CONFTEST_THEIRS, []),
    }
    if heartbeats and not sdk.startswith("2."):
        chosen["ours+heartbeats"] = (CONFTEST_OURS_HEARTBEATS, [])
    return chosen


def bench_sdk(sdk: str, rounds: int, tests: int, heartbeats: bool, work: Path) -> dict:
    python = VENVS[sdk]()
    lent = harness_suites.lend_pytest(work / "lent-pytest")
    flows = harness_suites.FLOW_TESTS.replace("{count}", str(tests))
    suites = {
        name: (harness_suites.write_suite(work / f"{sdk}-{name}", conftest, {"test_flows.py": flows}), args)
        for name, (conftest, args) in variants(sdk, heartbeats).items()
    }
    runs: dict[str, list] = {name: [] for name in suites}
    for round_number in range(rounds):
        for name, (suite, args) in suites.items():  # interleaved: the machine's noise is shared alike
            env = harness_suites.venv_env(lent, work / f"home-{sdk}-{name}-{round_number}")
            run = harness_suites.run_suite(python, suite, env, args, SUITE_TIMEOUT)
            passed = run.returncode == 0 and f"{tests} passed" in run.output
            print(
                f"[{sdk} round {round_number + 1}] {name}: {run.wall:.2f} s, exit "
                f"{run.exit_after_last_test or float('nan'):.2f} s after the last test"
                f"{'' if passed else ' FAILED'}",
                file=sys.stderr,
                flush=True,
            )
            if not passed:
                print(run.output[-4000:], file=sys.stderr)
            runs[name].append(
                {
                    "wall": run.wall,
                    "exit_after_last_test": run.exit_after_last_test,
                    "passed": passed,
                    "connection_failures": "All connection attempts failed" in run.output,
                }
            )
    return summarize(runs)


def summarize(runs: dict[str, list]) -> dict:
    summary = {}
    for name, results in runs.items():
        walls = [r["wall"] for r in results]
        exits = [r["exit_after_last_test"] for r in results if r["exit_after_last_test"] is not None]
        summary[name] = {
            "median_wall": statistics.median(walls),
            "min_wall": min(walls),
            "max_wall": max(walls),
            "median_exit": statistics.median(exits) if exits else None,
            "max_exit": max(exits) if exits else None,
            "all_passed": all(r["passed"] for r in results),
            "connection_failures": sum(r["connection_failures"] for r in results),
            "runs": results,
        }
    if "ours" in summary and "theirs" in summary:
        summary["speedup"] = summary["theirs"]["median_wall"] / summary["ours"]["median_wall"]
    return summary


def print_table(results: dict) -> None:
    print(f"{'sdk':5} {'harness':16} {'median s':>9} {'min s':>7} {'max s':>7} {'exit med':>9} {'exit max':>9} ok")
    for sdk, summary in results.items():
        for name, row in summary.items():
            if name == "speedup":
                continue
            print(
                f"{sdk:5} {name:16} {row['median_wall']:9.2f} {row['min_wall']:7.2f} {row['max_wall']:7.2f} "
                f"{row['median_exit'] or float('nan'):9.2f} {row['max_exit'] or float('nan'):9.2f} "
                f"{'yes' if row['all_passed'] and not row['connection_failures'] else 'NO'}"
            )
        if "speedup" in summary:
            print(f"{sdk:5} {'speedup':16} {summary['speedup']:9.2f}x (theirs / ours, medians)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdks", default="2.20,3.9")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tests", type=int, default=20)
    parser.add_argument("--heartbeats", action="store_true", help="3.x: also ours with flow-run heartbeats on")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-test-harness-") as work:
        results = {
            sdk: bench_sdk(sdk, args.rounds, args.tests, args.heartbeats, Path(work)) for sdk in args.sdks.split(",")
        }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
