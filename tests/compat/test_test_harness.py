"""prefectlite.prefect_test_harness() and the pytest plugin (issue 21), with the real 2.20 and 3.9 SDKs.

The SDKs run in their cached venvs (prefect_venv.py, prefect3_venv.py), as subprocesses: a script that
imports prefect, then runs flows inside the harness and reads back through the embedded server's API
what it stored; and a small pytest suite (run with `-p prefectlite`, our pytest lent to the venv by
harness_suites.py) whose tests each see only their own runs. Prefect is never imported here; the tests
without an SDK (the harness without prefect, the clean-up, the plugin staying inert) run in this process
or with this python.

Run: pytest tests/compat/test_test_harness.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
import harness_suites  # noqa: E402
import prefectlite  # noqa: E402

SCRIPT_TIMEOUT = 180.0  # generous: a 2-core machine shared with other work; the outcome is what is asserted
DEAD_API_URL = "http://127.0.0.1:9/api"  # what the SDK is pointed at before the harness: must come back

# A Prefect user's script: prefect imported first (its settings no longer read the environment), then the
# harness; two one-task flows; what the embedded server stored, read through its API before it stops.
HARNESS_SCRIPT = '''
import json, os, sys, time, urllib.request
import prefect
from prefect import flow, task
from prefect.settings import PREFECT_API_URL
import prefectlite

@task
def add_one(n):
    return n + 1

@flow(name="harness-flow")
def one_task_flow(n):
    return add_one(n)

def post(url, path, body):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())

def settled_task_runs(url, count, deadline):
    """3.x SDKs report task runs as events, stored as they arrive: poll until `count` are final."""
    while True:
        runs = post(url, "/task_runs/filter", {})
        if sum(r["state_type"] == "COMPLETED" for r in runs) >= count or time.monotonic() > deadline:
            return runs
        time.sleep(0.05)

def pointed_at():
    return {"setting": PREFECT_API_URL.value(), "env": os.environ.get("PREFECT_API_URL")}

before = pointed_at()
with prefectlite.prefect_test_harness() as url:
    inside = pointed_at()
    results = [one_task_flow(n) for n in range(2)]
    flow_runs = post(url, "/flow_runs/filter", {})
    task_runs = settled_task_runs(url, 2, time.monotonic() + 30)
report = {"url": url, "before": before, "inside": inside, "after": pointed_at(), "results": results,
          "flow_runs": [[r["name"], r["state_type"]] for r in flow_runs],
          "task_runs": [r["state_type"] for r in task_runs]}
print("HARNESS_RESULT " + json.dumps(report), flush=True)
print("HARNESS_LAST " + repr(time.time()), flush=True)
'''

# The plugin's fixtures in a user's suite: each test sees only what it ran itself.
PLUGIN_SUITE = """
import json, time, urllib.request
import pytest
from prefect import flow, task

@task
def add_one(n):
    return n + 1

@flow
def one_task_flow(n):
    return add_one(n)

def post(url, path, body):
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())

def task_runs_once_some(url, deadline):
    while True:
        runs = post(url, "/task_runs/filter", {})
        if runs or time.monotonic() > deadline:
            return runs
        time.sleep(0.05)

@pytest.mark.parametrize("n", range(3))
def test_each_test_sees_only_its_own_runs(prefect_clean_db, n):
    assert one_task_flow(n) == n + 1
    runs = post(prefect_clean_db, "/flow_runs/filter", {})
    assert [r["state_type"] for r in runs] == ["COMPLETED"]
    assert len(task_runs_once_some(prefect_clean_db, time.monotonic() + 30)) == 1
    assert post(prefect_clean_db, "/block_types/filter", {}), "the built-in block types are put back"

def test_the_sdk_points_at_prefect_server(prefect_server):
    from prefect.settings import PREFECT_API_URL
    assert PREFECT_API_URL.value() == prefect_server
"""


@pytest.fixture(scope="module")
def lent_pytest(tmp_path_factory) -> Path:
    return harness_suites.lend_pytest(tmp_path_factory.mktemp("lent-pytest"))


def no_prefect_here():
    if importlib.util.find_spec("prefect") is not None:
        pytest.skip("prefect is installed in this python: these tests never import it here")


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def post_json(url: str, body: dict):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def line_after(output: str, marker: str) -> str:
    for line in output.splitlines():
        if line.startswith(marker + " "):
            return line[len(marker) + 1 :]
    pytest.fail(f"no {marker} line in the output:\n{output[-6000:]}")


# --------------------------------------------------------------------------- without an SDK


def test_harness_without_prefect_yields_the_url_and_restores_the_environment(monkeypatch):
    no_prefect_here()
    monkeypatch.setenv("PREFECT_API_URL", DEAD_API_URL)
    monkeypatch.setenv("PREFECT_API_KEY", "a-cloud-key")
    with prefectlite.prefect_test_harness() as url:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
        assert os.environ["PREFECT_API_URL"] == url
        assert "PREFECT_API_KEY" not in os.environ, "a Cloud key is never sent to the test server"
        assert get_json(url + "/health") is True
    assert os.environ["PREFECT_API_URL"] == DEAD_API_URL
    assert os.environ["PREFECT_API_KEY"] == "a-cloud-key"


def test_fresh_database_empties_every_table_and_puts_the_builtin_rows_back():
    no_prefect_here()
    with prefectlite._harness() as running:
        fresh = prefectlite._FreshDatabase(running)
        builtin = post_json(running.api_url + "/block_types/filter", {})
        flow = post_json(running.api_url + "/flows/", {"name": "cleaned-away"})
        post_json(running.api_url + "/flow_runs/", {"flow_id": flow["id"], "name": "run"})
        post_json(running.api_url + "/variables/", {"name": "some_variable", "value": "x"})
        fresh.restore()
        assert post_json(running.api_url + "/flows/filter", {}) == []
        assert post_json(running.api_url + "/flow_runs/filter", {}) == []
        assert post_json(running.api_url + "/variables/filter", {}) == []
        assert post_json(running.api_url + "/block_types/filter", {}) == builtin
        again = post_json(running.api_url + "/flows/", {"name": "cleaned-away"})  # a new one: not a cached answer
        assert again["id"] != flow["id"]


def write_fake_installation(site: Path) -> None:
    """What installing the package leaves for pytest: a distribution with our pytest11 entry point."""
    info = site / "prefectlite_fake-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: prefectlite-fake\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[pytest11]\nprefectlite = prefectlite\n")


def test_the_entry_point_plugin_does_nothing_unless_asked_for(tmp_path):
    no_prefect_here()
    site = tmp_path / "site"
    write_fake_installation(site)
    suite = harness_suites.write_suite(
        tmp_path / "suite",
        "",
        {
            "test_uses_it.py": (
                "def test_uses_it(prefect_server):\n    assert prefect_server.startswith('http://127.0.0.1:')\n"
            )
        },
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(harness_suites.REPO_ROOT)])

    def pytest_run(*args):
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args, str(suite)],
            cwd=suite,
            env=env,
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT,
        )

    plain = pytest_run()
    assert "prefectlite-fake" in plain.stdout, "the entry point was not loaded: the test proves nothing"
    assert plain.returncode != 0 and "fixture 'prefect_server' not found" in plain.stdout, plain.stdout[-3000:]
    asked = pytest_run("-p", "prefectlite")
    assert asked.returncode == 0, asked.stdout[-3000:] + asked.stderr[-3000:]
    (suite / "pytest.ini").write_text("[pytest]\nprefectlite = true\n")
    by_ini = pytest_run()
    assert by_ini.returncode == 0, by_ini.stdout[-3000:] + by_ini.stderr[-3000:]


# --------------------------------------------------------------------------- with the 2.20 and 3.9 SDKs


def test_flows_run_in_the_harness_reach_the_embedded_server(sdk_python, lent_pytest, tmp_path):
    script = tmp_path / "flows_in_harness.py"
    script.write_text(HARNESS_SCRIPT)
    env = harness_suites.venv_env(lent_pytest, tmp_path / "home")
    env["PREFECT_API_URL"] = DEAD_API_URL  # the SDK's setting before the harness: restored after it
    proc = subprocess.run(
        [sdk_python, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    exited_at = time.time()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    report = json.loads(line_after(proc.stdout, "HARNESS_RESULT"))
    url = report["url"]
    assert report["before"] == {"setting": DEAD_API_URL, "env": DEAD_API_URL}
    assert report["inside"] == {"setting": url, "env": url}
    assert report["after"] == report["before"], "the settings and the environment are restored"
    assert report["results"] == [1, 2]
    assert sorted(state for _, state in report["flow_runs"]) == ["COMPLETED", "COMPLETED"]
    assert report["task_runs"] == ["COMPLETED", "COMPLETED"]
    exit_seconds = exited_at - float(line_after(proc.stdout, "HARNESS_LAST"))
    print(f"exit {exit_seconds:.2f} s after the script's last line")  # shown with -s; no bound asserted
    assert "All connection attempts failed" not in output, output[-6000:]


def test_the_pytest_plugin_in_a_users_suite(sdk_python, lent_pytest, tmp_path):
    conftest = harness_suites.CONFTEST_COMMON
    suite = harness_suites.write_suite(tmp_path / "suite", conftest, {"test_flows.py": PLUGIN_SUITE})
    env = harness_suites.venv_env(lent_pytest, tmp_path / "home")
    run = harness_suites.run_suite(sdk_python, suite, env, ["-p", "prefectlite"], SCRIPT_TIMEOUT)
    assert run.returncode == 0, run.output[-8000:]
    assert "4 passed" in run.output, run.output[-8000:]
    assert "All connection attempts failed" not in run.output, run.output[-8000:]
    print(f"exit {run.exit_after_last_test:.2f} s after the last test")
