"""Run Prefect's own test suite (2.20.25, or 3.x with the 3.9.1 SDK) against a server and compare with the tests
that pass on Prefect's own.

Usage:
    python tests/conformance/run.py               # against prefectlite: lists what passes on Prefect's
                                                  # server but not on ours (minus known-differences.txt)
    python tests/conformance/run.py --reference   # against Prefect's own server (`prefect server start`):
                                                  # rewrites prefect-2.20-passing.txt
    python tests/conformance/run.py -k FILES...   # only these files of the selection (e.g. tests/test_states.py)
    python tests/conformance/run.py --reference --merge -k FILES...
                                                  # files just added to the selection: their tests that pass
                                                  # on Prefect's server join the baseline (and its counts)
    python tests/conformance/run.py --suite 3.x [--reference] [-k FILES...]
                                                  # the same with Prefect's 3.x suite (3.8.4.dev6) and 3.9.1
                                                  # (prefect-3.x-passing.txt, known-differences-3.x.txt)

The suites (../shared/reference/prefect-tests/2.20.25 and 3.8.4.dev6, Apache-2.0) are test input: one is copied
to a scratch directory and run there by its Prefect test venv (prefect_tests_venv.py, prefect3_tests_venv.py)
with prefect_suite_plugin.py loaded, which points it at the server started here (see that plugin for what it
changes). Each Prefect test run is a subprocess under `nice -n 19`, never an import into this process; only the
standard library is used here.

Exit status: 0 when every test of the baseline passes or is a known difference, 1 otherwise, 2 on a harness
error (no suite, a server that does not start, a run that produced no results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
# Where Prefect's suites are (../shared/reference/prefect-tests beside the repository, or another copy).
REFERENCE_TESTS = Path(
    os.environ.get("PREFECTLITE_PREFECT_TESTS_DIR") or REPO_ROOT.parent / "shared" / "reference" / "prefect-tests"
)
SUITE = REFERENCE_TESTS / "2.20.25"
BASELINE = HERE / "prefect-2.20-passing.txt"
KNOWN_DIFFERENCES = HERE / "known-differences.txt"

sys.path.insert(0, str(HERE))
import prefect3_tests_venv  # noqa: E402
import prefect_tests_venv  # noqa: E402

# The README's files (reference/prefect-tests/README.md): the SDK's client, flows, tasks and the API-using
# CLI commands, every one of which talks to a server.
README_FILES = (
    "tests/client/test_prefect_client.py",
    "tests/test_flows.py",
    "tests/test_tasks.py",
    "tests/test_states.py",
    "tests/test_variables.py",
    "tests/test_artifacts.py",
    "tests/test_automations.py",
    "tests/test_deployments.py",
    "tests/test_flow_runs.py",
    "tests/test_logging.py",
    "tests/client/api/test_flow_runs.py",
    "tests/blocks/test_core.py",
    "tests/concurrency",
    "tests/input/test_run_input.py",
    "tests/runner/test_runner.py",
    "tests/workers/test_base_worker.py",
    "tests/cli/test_variable.py",
    "tests/cli/test_artifact.py",
    "tests/cli/test_block.py",
    "tests/cli/test_flow_run.py",
    "tests/cli/test_work_pool.py",
    "tests/cli/test_work_queues.py",
    "tests/cli/test_global_concurrency_limit.py",
)
# Beyond the README's files: the rest of the suite's client-facing files, whose tests run flows, tasks,
# deployments, workers, agents or CLI commands through the API (files testing only client-side code, or
# only Prefect's server, are left out). The agent, deployment-build and webserver files cost little (2026-12-06:
# 519 tests, 142 passing on Prefect's server and the same 142 here, in 50 s: most need Prefect's database and skip).
EXTENSION = (
    "tests/test_engine.py",
    "tests/test_new_flow_engine.py",
    "tests/test_new_task_engine.py",
    "tests/test_background_tasks.py",
    "tests/test_task_server.py",
    "tests/test_futures.py",
    "tests/test_context.py",
    "tests/test_log_prints.py",
    "tests/blocks/test_system.py",
    "tests/cli/test_flow.py",
    "tests/cli/test_worker.py",
    "tests/cli/test_events.py",
    "tests/runtime",
    "tests/results",
    "tests/infrastructure/test_process.py",
    "tests/runner/test_submit.py",
    "tests/workers/test_process_worker.py",
    "tests/workers/test_block_worker.py",
    "tests/input/test_actions.py",
    "tests/public",
    "tests/agent",
    "tests/cli/deployment",
    "tests/cli/test_deploy.py",
    "tests/cli/test_agent.py",
    "tests/cli/test_start_agent.py",
    "tests/deployment/test_steps.py",
    "tests/runner/test_webserver.py",
)
SELECTION = README_FILES + EXTENSION
# Logs cannot be deleted through the API, so a file asserting on the whole log table gets a fresh server.
FRESH_SERVER_FILES = ("tests/test_logging.py",)

# --------------------------------------------------------------------------- Prefect's 3.x suite

# The README's files (reference/prefect-tests/README.md, the 3.x part): both engines, flows, tasks, the client,
# the events client, blocks, concurrency, input, the runner, variables, artifacts, automations, and the CLI
# commands that talk to the API.
README_FILES_3 = (
    "tests/test_flows.py",
    "tests/test_tasks.py",
    "tests/test_flow_engine.py",
    "tests/test_task_engine.py",
    "tests/client/test_prefect_client.py",
    "tests/events/client",
    "tests/blocks/test_core.py",
    "tests/concurrency",
    "tests/input",
    "tests/runner",
    "tests/test_variables.py",
    "tests/test_artifacts.py",
    "tests/test_automations.py",
    "tests/cli/test_variable.py",
    "tests/cli/test_artifact.py",
    "tests/cli/test_block.py",
    "tests/cli/test_flow_run.py",
    "tests/cli/test_task_run.py",
    "tests/cli/test_work_pool.py",
    "tests/cli/test_work_queues.py",
    "tests/cli/test_global_concurrency_limit.py",
    "tests/cli/deployment",
)
# Beyond the README's files: every other client-facing file whose tests run flows, tasks, deployments, workers or
# CLI commands through the API and can run against an external server (files testing only client-side code, or only
# Prefect's server, are left out). tests/workers and the `prefect deploy` files cost little: ~1.5 min each under
# -n 2 against prefectlite (tests/benchmarks/README.md), since most of their tests need Prefect's database and skip.
# The 19 client-facing paths from tests/test_logging.py on (issue 23) were left out for CI's time until the Prefect
# suites got a CI step of their own: 1,008 tests, ~6 more minutes under -n 2 (tests/benchmarks/README.md).
EXTENSION_3 = (
    "tests/test_flow_runs.py",
    "tests/test_task_runs.py",
    "tests/test_states.py",
    "tests/test_futures.py",
    "tests/test_background_tasks.py",
    "tests/test_task_worker.py",
    "tests/test_context.py",
    "tests/test_log_prints.py",
    "tests/test_waiters.py",
    "tests/cli/test_events.py",
    "tests/cli/test_flow.py",
    "tests/workers",
    "tests/cli/test_deploy.py",
    "tests/cli/deploy",
    "tests/test_logging.py",
    "tests/deployment/test_flow_runs.py",
    "tests/deployment/test_steps.py",
    "tests/results",
    "tests/runtime",
    "tests/public",
    "tests/client/api/test_flow_runs.py",
    "tests/client/test_events_client.py",
    "tests/client/test_subscriptions.py",
    "tests/cli/test_worker.py",
    "tests/cli/test_flow_run_watching.py",
    "tests/cli/test_task.py",
    "tests/test_task_runners.py",
    "tests/test_transactions.py",
    "tests/test_assets.py",
    "tests/test_infrastructure_bound_flow.py",
    "tests/experimental/test_sla.py",
    "tests/engine/reliability",
    "tests/test_subprocess_logging.py",
)
SELECTION_3 = README_FILES_3 + EXTENSION_3
# Two pytest-xdist workers (Prefect's own CI runs this suite under xdist): one after the other, ~3,900 of the
# selection's ~5,400 tests took about an hour here, past CI's budget (tests/benchmarks/README.md has the figures).
WORKERS_3 = int(os.environ.get("PREFECTLITE_CONFORMANCE_WORKERS", "2"))
# Like 2.20's: logs cannot be deleted through the API. And the automations file leaves 25 automations behind that
# each match every event (one per action type; no API call deletes them between tests), which on Prefect's own
# server set off automations without end for the rest of a run (tests/benchmarks/README.md, "automation storm").
FRESH_SERVER_FILES_3 = ("tests/test_logging.py", "tests/events/client/test_automations_server_compatibility.py")

PER_TEST_TIMEOUT = 60  # seconds (pytest-timeout): one hung test must not stall CI
# pytest-timeout's signal cannot interrupt every hang (one test of test_engine.py outlived it by minutes):
# a run whose results file has not grown for this long is stopped, and resumed after the hung test.
STALL_TIMEOUT = PER_TEST_TIMEOUT + 60
RUN_TIMEOUT = 40 * 60  # seconds for one pytest run of Prefect's suite
MAX_RESUMES = 10
EXIT_GRACE = 30  # seconds a pytest that has finished its session gets to exit before it is stopped
SERVER_START_TIMEOUT = 30.0
REFERENCE_START_TIMEOUT = 120.0
SERVER_STOP_TIMEOUT = 10.0
PASSED = "passed"


class HarnessError(RuntimeError):
    """The harness could not run the suite (as opposed to tests failing)."""


@dataclasses.dataclass(frozen=True)
class Suite:
    """One of Prefect's suites: where it is, what of it runs, with which venv, compared with which lists."""

    name: str  # the --suite value
    version: str  # Prefect's release (or snapshot) the tests are from
    sdk: str  # the Prefect release that runs them (and whose server is the baseline)
    selection: tuple
    fresh_files: tuple
    baseline: Path
    known_differences: Path
    ensure_venv: object  # () -> the venv's python
    venv_error: type
    copied: tuple  # what of the suite's directory the scratch copy needs
    reference_env: tuple  # (name, value): how Prefect's server is configured as the suite's test profile does
    workers: int = 1  # pytest-xdist workers, each with a server of its own (the selection's first run only)

    @property
    def path(self) -> Path:
        return REFERENCE_TESTS / self.version


# Prefect 2.20: the triggers service stays on (the profile leaves it on, and 2.20 serves /automations only with
# it); the event persister is off.
REFERENCE_ENV_2 = (
    ("PREFECT_API_SERVICES_SCHEDULER_ENABLED", "false"),
    ("PREFECT_API_SERVICES_LATE_RUNS_ENABLED", "false"),
    ("PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_ENABLED", "false"),
    ("PREFECT_API_SERVICES_PAUSE_EXPIRATIONS_ENABLED", "false"),
    ("PREFECT_API_SERVICES_CANCELLATION_CLEANUP_ENABLED", "false"),
    ("PREFECT_API_SERVICES_FOREMAN_ENABLED", "false"),
    ("PREFECT_API_SERVICES_EVENT_PERSISTER_ENABLED", "false"),
    ("PREFECT_EXPERIMENTAL_EVENTS", "true"),
)
# Prefect 3.9: the same services off, but the task-run recorder and the event persister on, since the harness
# forwards the suite's task-run events to the server (prefect_suite_plugin.py) instead of to an in-process one.
REFERENCE_ENV_3 = (
    ("PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED", "false"),
    ("PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED", "false"),
    ("PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED", "false"),
    ("PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED", "false"),
    ("PREFECT_SERVER_SERVICES_FOREMAN_ENABLED", "false"),
    ("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED", "true"),
    ("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED", "true"),
)

PREFECT_2 = Suite(
    "2.20",
    "2.20.25",
    "2.20.25",
    SELECTION,
    FRESH_SERVER_FILES,
    HERE / "prefect-2.20-passing.txt",
    HERE / "known-differences.txt",
    prefect_tests_venv.ensure_prefect_tests_venv,
    prefect_tests_venv.VenvError,
    ("tests", "flows", "setup.cfg"),
    REFERENCE_ENV_2,
)
PREFECT_3 = Suite(
    "3.x",
    "3.8.4.dev6",
    "3.9.1",
    SELECTION_3,
    FRESH_SERVER_FILES_3,
    HERE / "prefect-3.x-passing.txt",
    HERE / "known-differences-3.x.txt",
    prefect3_tests_venv.ensure_prefect3_tests_venv,
    prefect3_tests_venv.VenvError,
    ("tests", "pyproject.toml"),
    REFERENCE_ENV_3,
    workers=WORKERS_3,
)
SUITES = {suite.name: suite for suite in (PREFECT_2, PREFECT_3)}


# --------------------------------------------------------------------------- servers


@dataclasses.dataclass
class Server:
    api_url: str
    proc: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        stop_process_group(self.proc, SERVER_STOP_TIMEOUT)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(server: Server, timeout: float) -> None:
    """Poll GET /health until it answers 200, the process dies, or the deadline passes."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise HarnessError(
                f"the server exited ({server.proc.returncode}) before it was healthy:\n{tail(server.log_path)}"
            )
        try:
            with urllib.request.urlopen(server.api_url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"status {resp.status}"
        except (OSError, ValueError) as exc:
            last = repr(exc)
        time.sleep(0.1)  # a poll interval, bounded by the deadline above
    server.stop()
    raise HarnessError(f"GET {server.api_url}/health not 200 within {timeout:.0f}s ({last}):\n{tail(server.log_path)}")


def env_without_prefect() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PREFECTLITE_"))}
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def launch(cmd: list, env: dict, home: Path, port: int, name: str) -> Server:
    log_path = home / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["nice", "-n", "19", *cmd],
            env=env,
            cwd=str(home),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Server(f"http://127.0.0.1:{port}/api", proc, log_path)


def start_prefectlite(workdir: Path) -> Server:
    """`python prefectlite.py start` with a fresh PREFECT_HOME and the services Prefect's tests turn off, off."""
    home = Path(tempfile.mkdtemp(prefix="prefectlite-", dir=workdir))
    port = free_port()
    env = env_without_prefect()
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_SERVICES_SCHEDULER_ENABLED": "false",
            "PREFECT_API_SERVICES_LATE_RUNS_ENABLED": "false",
            "PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    cmd = [sys.executable, str(REPO_ROOT / "prefectlite.py"), "start", "--host", "127.0.0.1", "--port", str(port)]
    server = launch(cmd, env, home, port, "prefectlite")
    wait_healthy(server, SERVER_START_TIMEOUT)
    return server


def start_prefect_server(workdir: Path, python: str, suite: Suite = PREFECT_2) -> Server:
    """`prefect server start` from the test venv, configured as the suite's test profile configures it."""
    home = Path(tempfile.mkdtemp(prefix="prefect-server-", dir=workdir))
    port = free_port()
    env = env_without_prefect()
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
            "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "false",
            **dict(suite.reference_env),
        }
    )
    cmd = [str(Path(python).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = launch(cmd, env, home, port, "prefect-server")
    wait_healthy(server, REFERENCE_START_TIMEOUT)
    return server


def stop_process_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the group the process leads (uvicorn children, flow subprocesses), then SIGKILL after grace."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    signal_group(proc, signal.SIGKILL)  # whatever of the group is left
    proc.wait(timeout=30)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the process was started with start_new_session: it leads its group
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-limit:]
    except OSError:
        return ""


# --------------------------------------------------------------------------- running Prefect's suite


def suite_available(suite: Suite = PREFECT_2) -> bool:
    return (suite.path / "tests" / "conftest.py").is_file()


def scratch_copy(workdir: Path, suite: Suite = PREFECT_2) -> Path:
    """Copy the suite to a scratch directory: its tests write files beside themselves and a .pytest_cache."""
    dest = workdir / f"prefect-{suite.version}"
    dest.mkdir()
    for name in suite.copied:
        source = suite.path / name
        if source.is_dir():
            shutil.copytree(source, dest / name, symlinks=True)
        elif source.is_file():
            shutil.copy2(source, dest / name)
    return dest


def pytest_command(python: str, files: list, workers: int = 1) -> list:
    return [
        "nice",
        "-n",
        "19",
        python,
        "-m",
        "pytest",
        "-p",
        "prefect_suite_plugin",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "-q",
        "--no-header",
        "-rN",
        # Python's own traceback format: pytest's parses test sources and crashed the whole run once
        # ("AST constructor recursion depth mismatch") on a failing test of test_new_flow_engine.py.
        "--tb=native",
        "--continue-on-collection-errors",  # one file that fails to import must not cancel the others
        f"--timeout={PER_TEST_TIMEOUT}",
        *(("-n", str(workers)) if workers > 1 else ()),
        *files,
    ]


def run_pytest(
    python: str, suite_copy: Path, api_url: str, files: list, results: Path, log_path: Path, workers: int = 1
) -> int:
    """Run pytest on the files; its exit status, or -1 if it ran past RUN_TIMEOUT or stalled and was stopped."""
    env = env_without_prefect()
    env.update(
        {
            "PATH": f"{Path(python).parent}{os.pathsep}{env.get('PATH', '')}",  # the suite's CLI tests run `prefect`
            "PYTHONPATH": str(HERE),  # for -p prefect_suite_plugin
            "PYTHONDONTWRITEBYTECODE": "1",
            "PREFECTLITE_CONFORMANCE_API_URL": api_url,
            "PREFECTLITE_CONFORMANCE_RESULTS": str(results),
            "PREFECTLITE_CONFORMANCE_DONE": str(done_path(results)),
        }
    )
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            pytest_command(python, files, workers),
            env=env,
            cwd=str(suite_copy),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return watch(proc, results, log)
        finally:
            stop_process_group(proc, 5)


def watch(proc: subprocess.Popen, results: Path, log) -> int:
    """Wait for pytest; stop it when it runs past RUN_TIMEOUT, its results stop growing for STALL_TIMEOUT, or it
    does not exit within EXIT_GRACE of finishing its session (then its session's exit status counts)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    last_size, last_growth = -1, time.monotonic()
    while True:
        try:
            return proc.wait(timeout=5)  # the poll interval of the watch, not a guess at how long pytest takes
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        size = results.stat().st_size if results.exists() else 0
        if size != last_size:
            last_size, last_growth = size, now
        finished = session_exit_status(results)
        if finished is not None and now - last_growth > EXIT_GRACE:
            log.write(f"\n[conformance] pytest finished but did not exit within {EXIT_GRACE}s: stopped\n".encode())
            return finished
        if now > deadline or now - last_growth > STALL_TIMEOUT:
            why = "ran past its deadline" if now > deadline else f"made no progress for {STALL_TIMEOUT}s"
            log.write(f"\n[conformance] pytest {why}: stopped\n".encode())
            return -1


def session_exit_status(results: Path) -> int | None:
    """The exit status pytest's session ended with, if the last line of the results says it has ended."""
    try:
        with open(results, "rb") as f:
            f.seek(max(0, results.stat().st_size - 200))
            last = f.read().decode("utf-8", "replace").strip().splitlines()[-1]
        entry = json.loads(last)
    except (OSError, IndexError, ValueError):
        return None
    return entry.get("exitstatus") if entry.get("session_finished") else None


def done_path(results: Path) -> Path:
    return results.with_name(results.name + ".done")


def batches(files: list, fresh_files=FRESH_SERVER_FILES) -> list:
    """Files that need a fresh server run alone, each on its own; the rest together, on one server, which is told
    to leave out the fresh files that lie in a folder it runs."""
    fresh = [f for f in fresh_files if any(in_path(f, path) for path in files)]
    shared = [f for f in files if f not in fresh]
    ignored = [f"--ignore={f}" for f in fresh if any(in_path(f, path) for path in shared)]
    return ([shared + ignored] if shared else []) + [[f] for f in fresh]


def run_selection(
    python: str,
    start_server,
    files: list,
    workdir: Path,
    log_path: Path,
    fresh_files=FRESH_SERVER_FILES,
    suite: Suite = PREFECT_2,
    workers: int = 1,
) -> dict:
    """Run the files (or node ids) against servers from start_server(workdir); answer {nodeid: result entry}."""
    suite_copy = scratch_copy(workdir, suite)
    results_path = workdir / "results.jsonl"
    for batch in batches(files, fresh_files):
        servers = []
        try:
            for _ in range(workers):
                servers.append(start_server(workdir))
            api_urls = ",".join(server.api_url for server in servers)
            run_batch(python, suite_copy, api_urls, batch, results_path, log_path, workers)
        finally:
            for server in servers:
                server.stop()
    results = read_results(results_path)
    if not results:
        raise HarnessError(f"the suite produced no results; log tail:\n{tail(log_path)}")
    return results


def run_batch(
    python: str, suite_copy: Path, api_url: str, batch: list, results_path: Path, log_path: Path, workers: int = 1
) -> None:
    """Run the batch; if pytest dies or hangs (not: tests fail), record the test it was in as an error and
    run the rest of the batch again without the tests already done."""
    for _ in range(MAX_RESUMES + 1):
        code = run_pytest(python, suite_copy, api_url, batch, results_path, log_path, workers)
        if code in (0, 1, 5):  # 1: some tests failed; 5: none collected
            return
        culprit = unfinished_test(results_path)
        print(f"[conformance] pytest exited {code} in {culprit}; log: {log_path}", file=sys.stderr)
        if culprit is None:  # died before or between tests: resuming would do the same again
            return
        record_error(results_path, culprit, f"the run died or hung in this test (pytest exit {code}); resumed after it")
        done_path(results_path).write_text("".join(f"{n}\n" for n in read_results(results_path)), encoding="utf-8")


def unfinished_test(path: Path) -> str | None:
    """The test the results file says started last and has no outcome."""
    last_started = None
    finished = set()
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else ():
        entry = json.loads(line)
        if entry.get("started"):
            last_started = entry["nodeid"]
        elif "outcome" in entry:
            finished.add(entry["nodeid"])
    return last_started if last_started not in finished else None


def record_error(path: Path, nodeid: str, message: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"nodeid": nodeid, "outcome": "error", "message": message}) + "\n")


def read_results(path: Path) -> dict:
    results = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if "outcome" in entry:  # not a test's start marker, nor the session's end
                results[entry["nodeid"]] = entry
    return results


def passing(results: dict) -> set:
    return {nodeid for nodeid, entry in results.items() if entry["outcome"] == PASSED}


def counts(results: dict) -> dict:
    tally = {}
    for entry in results.values():
        tally[entry["outcome"]] = tally.get(entry["outcome"], 0) + 1
    return tally


# --------------------------------------------------------------------------- baseline and known differences


def read_baseline(path: Path = BASELINE) -> set:
    return {
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }


def write_baseline(results: dict, suite: Suite = PREFECT_2) -> None:
    nodeids = passing(results)
    runnable = sum(1 for entry in results.values() if entry["outcome"] != "skipped")
    option = "" if suite is PREFECT_2 else f" --suite {suite.name}"
    header = (
        f"# Tests of Prefect {suite.version}'s own suite (tests/conformance/run.py's selection), run by the\n"
        f"# {suite.sdk} SDK, that pass against Prefect {suite.sdk}'s own server: {len(nodeids)} of {runnable}\n"
        f"# runnable ({len(results)} collected).\n"
        f"# Regenerate: python tests/conformance/run.py{option} --reference\n"
    )
    path = suite.baseline
    path.write_text(header + "".join(f"{n}\n" for n in sorted(nodeids)), encoding="utf-8")


def baseline_header(path: Path) -> tuple:
    """(passing, runnable, collected) as the baseline's header gives them, and its `# Merged` lines."""
    header = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    text = " ".join(line.lstrip("# ") for line in header)
    found = re.search(r"(\d+) of (\d+) runnable \((\d+) collected\)", text)
    if not found:
        raise HarnessError(f"{path.name}: no `N of M runnable (C collected)` in its header")
    return tuple(int(n) for n in found.groups()), [line for line in header if line.startswith("# Merged")]


def merge_baseline(results: dict, files: list, suite: Suite = PREFECT_2) -> None:
    """Add a partial reference run (`--reference --merge -k FILES`) to the baseline: the passing tests of its
    files, and its runnable and collected tests to the header's counts. Only for files the baseline holds no
    test of (files new to the selection): the counts of files already in it are not known, so a file run again
    would be counted twice; regenerate the whole baseline instead."""
    outside = [f for f in files if not any(in_path(f, entry) for entry in suite.selection)]
    if outside:
        raise HarnessError(f"not in the {suite.name} selection (add them first): {', '.join(outside)}")
    baseline = read_baseline(suite.baseline)
    held = sorted({f for f in files for n in baseline if in_path(n, f)})
    if held:
        raise HarnessError(f"{suite.baseline.name} already holds tests of {', '.join(held)}: run the whole --reference")
    (_, runnable, collected), merged = baseline_header(suite.baseline)
    run = {n: entry for n, entry in results.items() if any(in_path(n, f) for f in files)}
    nodeids = baseline | passing(run)
    runnable += sum(1 for entry in run.values() if entry["outcome"] != "skipped")
    collected += len(run)
    option = "" if suite is PREFECT_2 else f" --suite {suite.name}"
    header = (
        f"# Tests of Prefect {suite.version}'s own suite (tests/conformance/run.py's selection), run by the\n"
        f"# {suite.sdk} SDK, that pass against Prefect {suite.sdk}'s own server: {len(nodeids)} of {runnable}\n"
        f"# runnable ({collected} collected).\n"
        f"# Regenerate: python tests/conformance/run.py{option} --reference\n"
        + "".join(f"{line}\n" for line in merged)
        + f"# Merged: python tests/conformance/run.py{option} --reference --merge -k {' '.join(files)}\n"
    )
    suite.baseline.write_text(header + "".join(f"{n}\n" for n in sorted(nodeids)), encoding="utf-8")


def read_known_differences(path: Path = KNOWN_DIFFERENCES) -> dict:
    """{nodeid: why}: lines `NODEID  # why`; a line without a reason is an error (each must say why)."""
    known = {}
    if not path.exists():
        return known
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        nodeid, sep, why = line.partition("  # ")
        if not sep or not why.strip():
            raise HarnessError(f"{path.name}:{number}: no reason given (`NODEID  # why`): {line!r}")
        known[nodeid.strip()] = why.strip()
    return known


@dataclasses.dataclass
class Comparison:
    missing: list  # pass on Prefect's server, not on ours, not known
    known: list  # pass on Prefect's server, not on ours, known (with why)
    fixed: list  # known differences that pass on ours now (the line can go)
    extra: list  # pass on ours, not on Prefect's server


def compare(baseline: set, results: dict, known: dict, files: list | None = None) -> Comparison:
    if files:  # a partial run: compare only the baseline's tests of those files
        baseline = {n for n in baseline if any(in_path(n, f) for f in files)}
    ours = passing(results)
    failing = sorted(baseline - ours)
    return Comparison(
        missing=[n for n in failing if n not in known],
        known=[n for n in failing if n in known],
        fixed=sorted(n for n in known if n in ours),
        extra=sorted(ours - baseline),
    )


def in_path(nodeid: str, path: str) -> bool:
    """Whether a test is in a selection's path: a file, a folder, or a node id (a class, a test, a parameter)."""
    if "::" in path:
        return nodeid == path or nodeid.startswith((path + "::", path + "["))
    return nodeid.split("::")[0] == path or nodeid.startswith(path.rstrip("/") + "/")


def describe_failure(nodeid: str, results: dict) -> str:
    entry = results.get(nodeid)
    if entry is None:
        return f"{nodeid}  (not run: missing from the results)"
    message = entry.get("message", "").strip().splitlines()
    return f"{nodeid}  ({entry['outcome']}: {message[0][:200] if message else ''})"


def report(comparison: Comparison, results: dict, known: dict) -> str:
    flaky = sorted(n for n, entry in results.items() if entry.get("flaky"))
    lines = [f"outcomes on prefectlite: {counts(results)}"]
    if flaky:
        lines.append(f"{len(flaky)} passed only when run again: " + ", ".join(flaky))
    if comparison.missing:
        lines.append(f"{len(comparison.missing)} tests pass on Prefect's server but not on prefectlite:")
        lines += ["  " + describe_failure(n, results) for n in comparison.missing]
    if comparison.known:
        lines.append(f"{len(comparison.known)} known differences (known-differences.txt) still differ")
    if comparison.fixed:
        lines.append(f"{len(comparison.fixed)} known differences pass now (remove their lines):")
        lines += [f"  {n}" for n in comparison.fixed]
    if comparison.extra:
        lines.append(f"{len(comparison.extra)} tests pass on prefectlite but not on Prefect's server")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry points


def run_against(
    which: str,
    files: list | None = None,
    workdir: Path | None = None,
    retry_baseline: set | None = None,
    suite: Suite = PREFECT_2,
) -> dict:
    """Run the selection (or some of its files) against prefectlite or Prefect ('reference'); {nodeid: entry}.

    With retry_baseline, the tests of that set that did not pass are run once more on a fresh server, and an
    entry that passes then is kept as passed with "flaky": true: Prefect's suite has timing-dependent tests,
    and two shared cores make them fail now and then on any server.
    """
    if not suite_available(suite):
        raise HarnessError(f"Prefect's {suite.version} suite is not at {suite.path}")
    python = suite.ensure_venv()
    own_workdir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="prefectlite-conformance-")) if own_workdir else workdir
    start = (lambda w: start_prefect_server(w, python, suite)) if which == "reference" else start_prefectlite
    try:
        results = run_selection(
            python,
            start,
            list(files or suite.selection),
            workdir,
            workdir / "pytest.log",
            suite.fresh_files,
            suite,
            suite.workers,
        )
        if retry_baseline:
            retry_failures(python, start, results, retry_baseline, workdir, suite)
        return results
    finally:
        if own_workdir and not os.environ.get("PREFECTLITE_CONFORMANCE_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


MAX_RETRIES = 150  # more failures than this are no flakes: do not spend the time


def pytest_arg(nodeid: str) -> str:
    """A node id pytest can select: one whose parameters held the server's port or the suite copy's path
    (stable_id) runs all of them."""
    varying = "[" in nodeid and ("127.0.0.1:PORT" in nodeid or "ROOTDIR" in nodeid.partition("[")[2])
    return nodeid.split("[")[0] if varying else nodeid


def retry_failures(
    python: str, start_server, results: dict, baseline: set, workdir: Path, suite: Suite = PREFECT_2
) -> None:
    failed = sorted(n for n in baseline if n in results and results[n]["outcome"] != PASSED)
    if not failed or len(failed) > MAX_RETRIES:
        return
    retry_dir = workdir / "retry"
    retry_dir.mkdir()
    retried = run_selection(
        python,
        start_server,
        sorted({pytest_arg(n) for n in failed}),
        retry_dir,
        retry_dir / "pytest.log",
        fresh_files=(),
        suite=suite,
    )
    for nodeid, entry in retried.items():
        if nodeid in results and entry["outcome"] == PASSED:
            results[nodeid] = {**entry, "flaky": True, "first": results[nodeid]}


def exit_on_sigterm() -> None:
    """A SIGTERM (CI's or a user's kill) unwinds like Ctrl-C, so the servers and pytest runs are stopped."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv=None) -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default=PREFECT_2.name, help="which of Prefect's suites")
    parser.add_argument("--reference", action="store_true", help="run against Prefect's server, write the baseline")
    parser.add_argument("-k", "--files", nargs="+", help="only these files or directories of the selection")
    parser.add_argument("--workdir", type=Path, help="keep the scratch copy, logs and results here")
    parser.add_argument("--results", type=Path, help="also write the raw results (JSON) here")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --reference -k: add those files (new to the selection) to the baseline instead of not writing it",
    )
    args = parser.parse_args(argv)
    if args.merge and not (args.reference and args.files):
        parser.error("--merge needs --reference and -k FILES")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    suite = SUITES[args.suite]
    try:
        known = read_known_differences(suite.known_differences)
        baseline = None if args.reference else read_baseline(suite.baseline)
        results = run_against(
            "reference" if args.reference else "prefectlite",
            args.files,
            args.workdir,
            retry_baseline=baseline,
            suite=suite,
        )
    except (HarnessError, suite.venv_error) as exc:
        print(f"[conformance] {exc}", file=sys.stderr)
        return 2
    if args.results:
        args.results.write_text(json.dumps(results, indent=1, sort_keys=True), encoding="utf-8")
    elapsed = time.monotonic() - started
    if args.reference:
        if args.merge:
            try:
                merge_baseline(results, args.files, suite)
            except HarnessError as exc:
                print(f"[conformance] {exc}", file=sys.stderr)
                return 2
        elif args.files:
            print("[conformance] a partial reference run does not rewrite the baseline (see --merge)", file=sys.stderr)
        else:
            write_baseline(results, suite)
        print(f"Prefect's server: {counts(results)} in {elapsed:.0f}s")
        return 0
    comparison = compare(baseline, results, known, args.files)
    print(report(comparison, results, known))
    print(f"wall time {elapsed:.0f}s")
    return 1 if comparison.missing else 0


if __name__ == "__main__":
    sys.exit(main())
