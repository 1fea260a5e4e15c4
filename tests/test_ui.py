"""The web UI in static/, driven in a real headless Chromium against a real prefectlite server.

Data is seeded through the HTTP API; the tests read what a person sees (rows, state names, log lines,
rendered markdown) and check the API after each action taken in the browser. A failing test leaves a
screenshot in tests/ui_artifacts/<test>.png.

Needs chromium and chromedriver (Debian: apt-get install -y chromium chromium-driver). Without them the
tests are skipped, unless PREFECTLITE_REQUIRE_BROWSER=1 (as in CI), where they fail.
"""

import datetime
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import prefectlite  # noqa: E402
from webdriver import ELEMENT, Browser, Element  # noqa: E402

ARTIFACTS = HERE / "ui_artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
BROWSER_TZ = "Asia/Kolkata"  # UTC+05:30, no daylight saving time

# One pytest-xdist worker runs this whole file, in order: its tests share a module's browser, server and data.
pytestmark = pytest.mark.xdist_group("ui")


# ---------------------------------------------------------------- helpers

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc)


class Api:
    """JSON over urllib against the server under test."""

    def __init__(self, api_url):
        self.url = api_url.rstrip("/")

    def request(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                text = r.read()
                return r.status, json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text) if text else None
            except ValueError:
                return e.code, text.decode("utf-8", "replace")

    def ok(self, method, path, body=None):
        status, payload = self.request(method, path, body)
        assert status in (200, 201, 204), (method, path, status, payload)
        return payload

    def post(self, path, body=None):
        return self.ok("POST", path, {} if body is None else body)

    def get(self, path):
        return self.ok("GET", path)


class UI:
    """What a person does and sees, on top of the WebDriver client."""

    def __init__(self, browser, base):
        self.b = browser
        self.base = base.rstrip("/")

    def open(self, route, ready=True):
        # A full load every time: proves deep links work and resets the page's resource log.
        self.b.get("about:blank")
        self.b.get(f"{self.base}/#/{route}")
        if ready:
            self.wait_ready()

    def wait_ready(self, timeout=15):
        self.b.wait(lambda: self.b.execute(
            "return !!document.querySelector('main .page > *') && !document.querySelector('main .loading, main [aria-busy=true]')"),
            timeout, "the page to finish loading")

    def texts(self, css):
        """innerText of the visible elements matching css."""
        return self.b.execute(
            "return [...document.querySelectorAll(arguments[0])].filter(e => e.getClientRects().length)"
            ".map(e => e.innerText.trim())", css)

    def text(self, css="main"):
        return "\n".join(self.texts(css))

    def wait_text(self, css, needle, timeout=10):
        return self.b.wait(lambda: any(needle in t for t in self.texts(css)) and self.texts(css), timeout,
                           f"{needle!r} in {css}")

    def wait_gone(self, css, needle, timeout=10):
        self.b.wait(lambda: not any(needle in t for t in self.texts(css)), timeout, f"{needle!r} to leave {css}")

    def el(self, css, text=None, timeout=10, visible=True):
        """The first visible element matching css (whose trimmed text equals `text`, when given)."""
        def find():
            found = self.b.execute(
                "const [css, text, visible] = arguments;"
                "return [...document.querySelectorAll(css)].find(e => (!visible || e.getClientRects().length) &&"
                " (text === null || (e.innerText || e.textContent).trim() === text || e.getAttribute('aria-label') === text)) || null;",
                css, text, visible)
            return Element(self.b, found[ELEMENT]) if found else None
        return self.b.wait(find, timeout, f"a visible {css}" + (f" reading {text!r}" if text else ""))

    def click(self, css, text=None):
        self.el(css, text).click()

    def type(self, css, value, clear=True):
        e = self.el(css)
        if clear:
            e.clear()
        e.send_keys(value)
        return e

    def choose(self, select_css, label):
        self.el(select_css)
        self.el(f"{select_css} option", label, visible=False).click()  # WebDriver selects an option it clicks
        self.b.wait(lambda: self.b.execute("const s = document.querySelector(arguments[0]);"
                                           "return s.options[s.selectedIndex].textContent.trim()", select_css) == label,
                    5, f"{label!r} to be selected")

    def confirm(self, label):
        self.click("dialog[open] button", label)
        self.b.wait(lambda: not self.b.execute("return !!document.querySelector('dialog[open]')"), 5, "the dialog to close")

    def rows(self, css="main tbody tr"):
        return self.b.execute(
            "return [...document.querySelectorAll(arguments[0])].filter(e => e.getClientRects().length)"
            ".map(r => [...r.cells].map(c => c.innerText.trim()))", css)

    def hash(self):
        return self.b.execute("return decodeURIComponent(location.hash)")


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not path]
    if missing:
        why = f"{' and '.join(missing)} not found: apt-get install -y chromium chromium-driver"
        if os.environ.get("PREFECTLITE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"PREFECTLITE_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("chromium")
    port = free_port()
    log = open(tmp / "chromedriver.log", "wb")
    # The browser runs in a time zone other than UTC so that the tests can tell local times are shown.
    env = {**os.environ, "TZ": BROWSER_TZ}
    proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT, env=env)
    driver_url = f"http://127.0.0.1:{port}"
    b = None
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(driver_url + "/status", timeout=2) as r:
                    if json.loads(r.read())["value"].get("ready"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"chromedriver did not start; see {tmp / 'chromedriver.log'}")
            time.sleep(0.1)
        b = Browser(driver_url, binary=CHROMIUM, user_data_dir=str(tmp / "profile"))
        yield b
    finally:
        if b is not None:
            b.quit()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uiserver")
    with prefectlite.serve(database=f"sqlite:///{tmp}/ui.db", port=0) as api_url:
        yield api_url


@pytest.fixture(scope="module")
def api(server):
    return Api(server)


@pytest.fixture(scope="module")
def ui(browser, server):
    browser.set_window_size(1280, 900)
    return UI(browser, server[: -len("/api")])


@pytest.fixture(autouse=True)
def _screenshot_on_failure(request):
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before and "browser" in request.fixturenames:
        try:
            ARTIFACTS.mkdir(exist_ok=True)
            request.getfixturevalue("browser").screenshot(str(ARTIFACTS / f"{request.node.name}.png"))
        except Exception as exc:  # noqa: BLE001 - a screenshot must not hide the real failure
            print(f"could not save a screenshot: {exc}")


def set_state(api, run_id, state_type, message=None, force=False, **extra):
    state = {"type": state_type, **extra}
    if message:
        state["message"] = message
    return api.post(f"/flow_runs/{run_id}/set_state", {"state": state, "force": force})


@pytest.fixture(scope="module")
def data(api):
    """Flows, flow runs in many states, task runs, a subflow and logs, all through the API."""
    flows = {name: api.post("/flows/", {"name": name, "tags": []}) for name in ("daily-etl", "reporter", "bulk-flow")}
    runs = {}

    def run(name, flow="daily-etl", path=("RUNNING", "COMPLETED"), tags=(), params=None, parent=None, message=None, first="PENDING"):
        r = api.post("/flow_runs/", {"flow_id": flows[flow]["id"], "name": name, "tags": list(tags), "parameters": params or {},
                                     "parent_task_run_id": parent, "state": {"type": first}})
        for i, st in enumerate(path):
            set_state(api, r["id"], st, message if i == len(path) - 1 else None, force=st not in ("RUNNING",))
        runs[name] = api.get(f"/flow_runs/{r['id']}")
        return runs[name]

    for i in range(30):
        run(f"bulk-{i:02d}", flow="bulk-flow")
    run("etl-completed-1", tags=["nightly"])
    run("etl-completed-2", tags=["nightly"])
    run("etl-completed-3")
    run("etl-failed-1", path=("RUNNING", "FAILED"), tags=["nightly"], message="ValueError: bad row 42")
    run("etl-crashed-1", path=("RUNNING", "CRASHED"), message="Process exited with code 137")
    main = run("etl-running", path=("RUNNING",), tags=["nightly", "prod"], params={"date": "2024-02-01", "batch_size": 500})
    tasks = {}
    for key, final in (("extract", "COMPLETED"), ("transform", "FAILED"), ("load", None)):
        t = api.post("/task_runs/", {"flow_run_id": main["id"], "task_key": key, "dynamic_key": "0", "name": f"{key}-0",
                                     "state": {"type": "PENDING"}})
        api.post(f"/task_runs/{t['id']}/set_state", {"state": {"type": "RUNNING"}})
        if final:
            time.sleep(0.05)
            api.post(f"/task_runs/{t['id']}/set_state", {"state": {"type": final}, "force": True})
        tasks[key] = t
    run("child-report", flow="reporter", parent=tasks["extract"]["id"])
    base = now_utc()
    levels = [(10, "debug detail"), (20, "starting extract"), (20, "extracted 1,234 rows"), (30, "slow query warning"),
              (40, "row 42 rejected"), (50, "critical disk failure")]
    api.post("/logs/", [{"name": "prefect.flow_runs", "level": lvl, "message": f"log line {i}: {msg}",
                         "timestamp": (base + datetime.timedelta(milliseconds=10 * i)).isoformat(),
                         "flow_run_id": main["id"], "task_run_id": tasks["extract"]["id"] if i == 2 else None}
                        for i, (lvl, msg) in enumerate(levels)])
    run("live-run", path=("RUNNING",))
    run("act-running", path=("RUNNING",))
    run("act-scheduled", path=(), first="SCHEDULED")
    run("act-failed", path=("RUNNING", "FAILED"), message="boom")
    run("act-delete")
    return {"flows": flows, "runs": runs, "tasks": tasks, "main": main}


def count_runs(api, **flow_runs):
    return api.post("/flow_runs/count", {"flow_runs": flow_runs})


# ---------------------------------------------------------------- dashboard

def test_dashboard_counts_chart_and_recent_failures(ui, api, data):
    ui.open("dashboard")
    ui.wait_text("#run-counts", "Total runs")
    since = (now_utc() - datetime.timedelta(hours=24)).isoformat()
    total = count_runs(api, expected_start_time={"after_": since})
    failed = count_runs(api, expected_start_time={"after_": since}, state={"type": {"any_": ["FAILED"]}})
    assert total >= 42 and failed >= 2
    cards = dict(ui.b.execute("return [...document.querySelectorAll('#run-counts .stat')]"
                              ".map(c => [c.dataset.state, c.querySelector('.stat-value').innerText])"))
    assert cards["ALL"] == f"{total:,}"
    assert cards["FAILED"] == f"{failed:,}"
    assert cards["RUNNING"] == f"{count_runs(api, expected_start_time={'after_': since}, state={'type': {'any_': ['RUNNING']}}):,}"
    # the chart: stacked bars coloured by state whose counts add up to the runs of the window
    bars = ui.b.execute("return [...document.querySelectorAll('#run-chart svg rect.bar')].map(r => [r.dataset.state, +r.dataset.count])")
    assert {"COMPLETED", "FAILED", "RUNNING", "CRASHED"} <= {s for s, _ in bars}
    assert sum(c for _, c in bars) == total
    assert sum(c for s, c in bars if s == "FAILED") == failed
    assert "Failed" in ui.text("#run-chart .legend")
    # recent failures with their state messages
    failures = ui.text("#recent-failures")
    assert "etl-failed-1" in failures and "ValueError: bad row 42" in failures
    assert "etl-crashed-1" in failures and "Process exited with code 137" in failures
    assert "etl-completed-1" not in failures
    # the window picker reloads the counts for the past hour
    ui.click("main .segmented button", "Past hour")
    ui.wait_text("#run-counts", "Total runs")
    assert "window=1h" in ui.hash()
    ui.wait_text(".card-head h2", "Past hour")


# ---------------------------------------------------------------- flow runs list

def test_flow_runs_list_paginates_and_filters(ui, api, data):
    total = count_runs(api)
    ui.open("flow-runs")
    ui.wait_text(".pager-info", f"of {total}")
    page1 = [r[0] for r in ui.rows("main tr.run-row")]
    assert len(page1) == 25
    assert ui.texts(".pager-info") == [f"1–25 of {total}"]
    newest = api.post("/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC", "limit": 25})
    assert page1 == [r["name"] for r in newest]
    ui.click("main .pager button", "Next ›")
    ui.wait_text(".pager-info", f"26–{min(50, total)} of {total}")
    page2 = [r[0] for r in ui.rows("main tr.run-row")]
    assert page2 and not set(page2) & set(page1)
    assert "page=2" in ui.hash()

    # state filter from the dropdown
    ui.click("summary[aria-label='Filter by state']")
    ui.click(".dropdown-body input[value=FAILED]")
    ui.wait_text(".pager-info", "of 2")
    rows = ui.rows("main tr.run-row")
    assert sorted(r[0] for r in rows) == ["act-failed", "etl-failed-1"]
    assert all("Failed" in r[3] for r in rows)
    assert "state=FAILED" in ui.hash()

    # a deep link with filters reproduces the same view after a reload
    ui.open("flow-runs?state=CRASHED,FAILED")
    ui.wait_text(".pager-info", "of 3")
    assert sorted(r[0] for r in ui.rows("main tr.run-row")) == ["act-failed", "etl-crashed-1", "etl-failed-1"]
    assert ui.b.execute("return document.querySelector('.dropdown-body input[value=CRASHED]').checked") is True

    # name search, tags, flow
    ui.open("flow-runs")
    ui.type("#filter-search", "etl-comp")
    ui.wait_text(".pager-info", "of 3")
    assert sorted(r[0] for r in ui.rows("main tr.run-row")) == ["etl-completed-1", "etl-completed-2", "etl-completed-3"]
    ui.type("#filter-tags", "nightly")
    ui.wait_text(".pager-info", "of 2")
    assert sorted(r[0] for r in ui.rows("main tr.run-row")) == ["etl-completed-1", "etl-completed-2"]
    ui.open("flow-runs")
    ui.choose("#filter-flow", "reporter")
    ui.wait_text(".pager-info", "of 1")
    assert [r[0] for r in ui.rows("main tr.run-row")] == ["child-report"]
    assert f"flow={data['flows']['reporter']['id']}" in ui.hash()

    # time range: nothing ran in the year 2000
    ui.open("flow-runs?range=custom&from=2000-01-01T00:00:00.000Z&to=2000-01-02T00:00:00.000Z")
    ui.wait_text("main .empty-state", "No matching flow runs")
    assert ui.rows("main tr.run-row") == []
    ui.open("flow-runs?range=1h&q=bulk-")
    ui.wait_text(".pager-info", "of 30")


def test_flow_runs_list_asks_for_one_page_only(ui, api, data):
    """The list never fetches all runs: every run query carries a page-sized limit and an offset."""
    ui.open("flow-runs")
    ui.wait_text(".pager-info", "of")
    ui.b.execute("window.__calls = []; const f = window.fetch;"
                 "window.fetch = (url, init) => { window.__calls.push([String(url), init && init.body]); return f(url, init); };")
    ui.click("main .pager button", "Next ›")
    ui.wait_text(".pager-info", "26–")
    ui.type("#filter-search", "bulk")
    ui.wait_text(".pager-info", "of 30")
    calls = ui.b.execute("return window.__calls")
    bodies = [json.loads(body) for url, body in calls if url.endswith("/flow_runs/filter")]
    assert len(bodies) >= 2
    assert all(b["limit"] == 25 and b["sort"] == "EXPECTED_START_TIME_DESC" for b in bodies), bodies
    assert bodies[0]["offset"] == 25 and bodies[-1]["offset"] == 0
    assert any(url.endswith("/flow_runs/count") for url, _ in calls)
    assert len(ui.rows("main tr.run-row")) == 25


# ---------------------------------------------------------------- flow run detail

def test_flow_run_detail_shows_state_tasks_subflows_logs_and_parameters(ui, api, data):
    main = data["main"]
    ui.open(f"flow-runs/{main['id']}")
    assert ui.texts(".page-header h1") == ["etl-running"]
    assert "Running" in ui.text(".page-header .state-badge")
    summary = ui.text("main .kv")
    assert "daily-etl" in summary and "nightly" in summary and "prod" in summary and main["id"] in summary
    # logs (default tab), in order, with level names
    ui.wait_text("#panel-logs .log-line", "log line 5: critical disk failure")
    lines = ui.texts("#panel-logs .log-line .log-msg")
    assert lines == [f"log line {i}: {m}" for i, m in enumerate(
        ["debug detail", "starting extract", "extracted 1,234 rows", "slow query warning", "row 42 rejected", "critical disk failure"])]
    assert ui.texts("#panel-logs .log-line .log-level") == ["DEBUG", "INFO", "INFO", "WARNING", "ERROR", "CRITICAL"]
    assert "extract-0" in ui.texts("#panel-logs .log-line")[2]  # the task run that wrote it
    ui.choose("#log-level", "Error and above")
    ui.b.wait(lambda: ui.texts("#panel-logs .log-line .log-level") == ["ERROR", "CRITICAL"], 10, "only error logs")
    assert "level=40" in ui.hash()
    # task runs: table and timeline
    ui.click("button[role=tab]", "Task runs (3)")
    rows = ui.rows("#panel-task-runs tr.task-row")
    assert [(r[0], r[1]) for r in rows] == [("extract-0", "Completed"), ("transform-0", "Failed"), ("load-0", "Running")]
    bars = ui.b.execute("return [...document.querySelectorAll('#panel-task-runs svg rect.gantt-bar')].map(r => r.dataset.task)")
    assert bars == ["extract-0", "transform-0", "load-0"]
    # subflow runs
    ui.click("button[role=tab]", "Subflow runs (1)")
    assert [r[0] for r in ui.rows("#panel-subflow-runs tr.run-row")] == ["child-report"]
    # parameters
    ui.click("button[role=tab]", "Parameters")
    params = json.loads(ui.text("#panel-parameters pre"))
    assert params == {"date": "2024-02-01", "batch_size": 500}
    # state history from /flow_run_states/
    ui.click("button[role=tab]", "State history")
    history = ui.texts("#panel-state-history .timeline-item .state-badge")
    api_states = api.get(f"/flow_run_states/?flow_run_id={main['id']}")
    assert len(history) == len(api_states) >= 2
    assert history[0] == "Pending" and history[-1] == "Running"
    # the child links back to its parent
    ui.open(f"flow-runs/{data['runs']['child-report']['id']}")
    ui.wait_text("main .kv", "etl-running")


def test_flow_run_logs_tail_live_until_the_run_ends(ui, api, data):
    run = data["runs"]["live-run"]
    ui.open(f"flow-runs/{run['id']}")
    ui.wait_text("#panel-logs", "No logs")
    assert ui.texts("#panel-logs .live") == ["Live: following new logs"]
    api.post("/logs/", [{"name": "test", "level": 20, "message": "fresh line from the test", "timestamp": now_utc().isoformat(),
                         "flow_run_id": run["id"], "task_run_id": None}])
    ui.wait_text("#panel-logs .log-line", "fresh line from the test", timeout=10)
    set_state(api, run["id"], "COMPLETED", force=True)
    ui.wait_text(".page-header .state-badge", "Completed", timeout=10)
    ui.b.wait(lambda: ui.texts("#panel-logs .live") == [], 5, "the live marker to go away")
    # polling stopped: a later log only shows after a reload
    api.post("/logs/", [{"name": "test", "level": 20, "message": "written after the end", "timestamp": now_utc().isoformat(),
                         "flow_run_id": run["id"], "task_run_id": None}])
    time.sleep(3)
    assert "written after the end" not in ui.text("#panel-logs")
    ui.b.refresh()
    ui.wait_ready()
    ui.wait_text("#panel-logs .log-line", "written after the end")


def test_flow_run_actions_cancel_retry_delete(ui, api, data):
    runs = data["runs"]
    # cancelling a running run asks it to stop
    ui.open(f"flow-runs/{runs['act-running']['id']}")
    ui.click(".page-header button", "Cancel")
    ui.confirm("Cancel run")
    ui.b.wait(lambda: api.get(f"/flow_runs/{runs['act-running']['id']}")["state_type"] == "CANCELLING", 10, "CANCELLING")
    ui.wait_text(".page-header .state-badge", "Cancelling")
    # cancelling a run that is not running cancels it outright
    ui.open(f"flow-runs/{runs['act-scheduled']['id']}")
    ui.click(".page-header button", "Cancel")
    ui.confirm("Cancel run")
    ui.b.wait(lambda: api.get(f"/flow_runs/{runs['act-scheduled']['id']}")["state_type"] == "CANCELLED", 10, "CANCELLED")
    ui.wait_text(".page-header .state-badge", "Cancelled")
    # retrying a failed run schedules it again
    ui.open(f"flow-runs/{runs['act-failed']['id']}")
    assert ui.texts(".page-header button") == ["Retry", "Delete"]
    ui.click(".page-header button", "Retry")
    ui.confirm("Retry")
    ui.b.wait(lambda: api.get(f"/flow_runs/{runs['act-failed']['id']}")["state_type"] == "SCHEDULED", 10, "SCHEDULED")
    # deleting goes back to the list and the run is gone
    ui.open(f"flow-runs/{runs['act-delete']['id']}")
    ui.click(".page-header button", "Delete")
    ui.confirm("Delete")
    ui.b.wait(lambda: ui.hash() == "#/flow-runs", 10, "the flow runs list")
    assert api.request("GET", f"/flow_runs/{runs['act-delete']['id']}")[0] == 404
    ui.wait_ready()
    assert "act-delete" not in ui.text("main")


def test_api_errors_are_shown_in_words(ui, api, data):
    missing = str(uuid.uuid4())
    status, body = api.request("GET", f"/flow_runs/{missing}")
    assert status == 404
    ui.open(f"flow-runs/{missing}")
    ui.wait_text("main .error-box", "Error 404")
    assert body["detail"] in ui.text("main .error-box")
    ui.open("no-such-page")
    assert ui.texts(".page-header h1") == ["Page not found"]


# ---------------------------------------------------------------- flows

def test_flows_list_and_flow_detail(ui, api, data):
    ui.open("flows")
    names = [r[0] for r in ui.rows()]
    assert names == ["bulk-flow", "daily-etl", "reporter"]
    ui.type("#flow-search", "rep")
    ui.b.wait(lambda: [r[0] for r in ui.rows()] == ["reporter"], 10, "the search to narrow the list")
    ui.click("main a", "reporter")
    ui.wait_text(".page-header h1", "reporter")
    ui.wait_ready()
    assert [r[0] for r in ui.rows("#flow-runs tr.run-row")] == ["child-report"]
    ui.open(f"flows/{data['flows']['bulk-flow']['id']}")
    ui.wait_text("#flow-runs .pager-info", "1–15 of 30")


def test_flow_detail_lists_its_deployments(ui, api, data):
    flow = data["flows"]["daily-etl"]
    api.post("/deployments/", {"name": "etl-deploy-a", "flow_id": flow["id"]})
    ui.open(f"flows/{flow['id']}")
    ui.wait_text("#flow-deployments", "etl-deploy-a")


# ---------------------------------------------------------------- deployments

def test_deployments_run_with_overrides_and_pause(ui, api, data):
    flow = data["flows"]["daily-etl"]
    dep = api.post("/deployments/", {
        "name": "nightly", "flow_id": flow["id"], "parameters": {"date": "2024-01-01", "limit": 10},
        "parameter_openapi_schema": {"type": "object", "title": "Parameters", "properties": {
            "date": {"type": "string", "title": "date"}, "limit": {"type": "integer", "title": "limit"}}},
        "schedules": [{"schedule": {"interval": 3600}, "active": True}], "tags": ["prod"]})
    ui.open("deployments")
    row = next(r for r in ui.rows() if r[0] == "nightly")
    assert row[1] == "daily-etl" and "Every hour" in row[2] and row[3] == "Active"
    ui.click("main a", "nightly")
    ui.wait_text(".page-header h1", "nightly")
    ui.wait_ready()
    assert "Every hour" in ui.text("main .kv")
    ui.click(".page-header button", "Run")
    ui.type("dialog[open] #param-limit", "5")
    ui.type("dialog[open] #run-tags", "manual")
    ui.click("dialog[open] button[type=submit]", "Run")
    ui.b.wait(lambda: ui.hash().startswith("#/flow-runs/"), 10, "the new flow run page")
    run_id = ui.hash().split("/")[-1]
    run = api.get(f"/flow_runs/{run_id}")
    assert run["deployment_id"] == dep["id"]
    assert run["parameters"] == {"date": "2024-01-01", "limit": 5}
    assert "manual" in run["tags"]
    ui.wait_ready()
    assert "nightly" in ui.text("main .kv")
    # the list for the deployment holds the manual run and the runs the scheduler made for its schedule
    expected = api.post("/flow_runs/count", {"deployments": {"id": {"any_": [dep["id"]]}}})
    assert expected >= 2, "the scheduler fills the hourly schedule ahead"
    ui.open(f"flow-runs?deployment={dep['id']}")
    ui.wait_text(".pager-info", f"of {expected}")
    names = [r[0] for r in ui.rows("main tr.run-row")]
    assert run["name"] in names and len(names) == expected
    # pause and resume
    ui.open(f"deployments/{dep['id']}")
    ui.click(".page-header button", "Pause")
    ui.b.wait(lambda: api.get(f"/deployments/{dep['id']}")["paused"] is True, 10, "paused")
    ui.wait_text(".page-header .actions button", "Resume")
    assert "Paused" in ui.text(".page-header")
    ui.click(".page-header button", "Resume")
    ui.b.wait(lambda: api.get(f"/deployments/{dep['id']}")["paused"] is False, 10, "resumed")
    ui.wait_text(".page-header .actions button", "Pause")


# ---------------------------------------------------------------- work pools

def test_work_pools_show_status_queues_and_workers(ui, api, data):
    api.post("/work_pools/", {"name": "ui-pool", "type": "process"})
    api.post("/work_pools/ui-pool/queues", {"name": "high", "priority": 1})
    api.post("/work_pools/ui-pool/workers/heartbeat", {"name": "worker-1", "heartbeat_interval_seconds": 30})
    ui.open("work-pools")
    row = next(r for r in ui.rows() if r[0] == "ui-pool")
    assert row[1] == "process" and row[3] == "1 online / 1"
    ui.click("main a", "ui-pool")
    ui.wait_text(".page-header h1", "ui-pool")
    ui.wait_ready()
    queues = [r[0] for r in ui.rows("#queues tbody tr")]
    assert "high" in queues and "default" in queues
    workers = ui.rows("#workers tbody tr")
    assert workers[0][0] == "worker-1" and workers[0][1] == "Online"
    assert "ago" in workers[0][2] or "just now" in workers[0][2]
    ui.open("dashboard")
    ui.wait_text("#pool-health", "ui-pool")
    assert "1 of 1 worker online" in ui.text("#pool-health")


# ---------------------------------------------------------------- blocks

def register_block_type(api, slug, name, fields, capabilities=()):
    bt = api.post("/block_types/", {"name": name, "slug": slug})
    schema = api.post("/block_schemas/", {"block_type_id": bt["id"], "fields": fields, "capabilities": list(capabilities)})
    return bt, schema


CREDS_FIELDS = {
    "title": "UiTestCredentials", "type": "object", "block_type_slug": "ui-test-credentials",
    "properties": {
        "username": {"title": "Username", "type": "string"},
        "password": {"title": "Password", "type": "string", "format": "password", "writeOnly": True},
        "port": {"title": "Port", "type": "integer", "default": 5432},
    },
    "required": ["username", "password"], "secret_fields": ["password"], "block_schema_references": {},
}


def test_blocks_create_edit_delete_with_masked_secrets(ui, api, data):
    register_block_type(api, "ui-test-credentials", "UI Test Credentials", CREDS_FIELDS)
    ui.open("blocks?tab=catalog")
    ui.type("#catalog-search", "UI Test")
    ui.click(".catalog-item[data-slug=ui-test-credentials] a", "Create")
    ui.wait_text(".page-header h1", "New UI Test Credentials block")
    ui.wait_ready()
    assert ui.el("#block-password").prop("type") == "password"
    ui.type("#block-name", "warehouse-login")
    ui.type("#block-username", "etl")
    ui.type("#block-password", "hunter2")
    ui.type("#block-port", "6543")
    ui.click("main button[type=submit]", "Create block")
    ui.b.wait(lambda: ui.hash().startswith("#/blocks/") and "new" not in ui.hash(), 10, "the block page")
    block_id = ui.hash().split("/")[-1]
    ui.wait_text(".page-header h1", "warehouse-login")
    ui.wait_ready()
    values = dict(ui.b.execute("return [...document.querySelectorAll('.block-value')].map(e => [e.dataset.field, e.innerText])"))
    assert values == {"username": "etl", "password": "********", "port": "6543"}
    assert "hunter2" not in ui.text("body")
    doc = api.get(f"/block_documents/{block_id}?include_secrets=true")
    assert doc["data"] == {"username": "etl", "password": "hunter2", "port": 6543}
    # edit: the secret stays when its field is left empty
    ui.click(".page-header a", "Edit")
    ui.wait_text(".page-header h1", "Edit warehouse-login")
    ui.wait_ready()
    assert ui.el("#block-password").prop("value") == ""
    ui.type("#block-username", "loader")
    ui.click("main button[type=submit]", "Save")
    ui.wait_text("main .block-value", "loader")
    doc = api.get(f"/block_documents/{block_id}?include_secrets=true")
    assert doc["data"]["username"] == "loader" and doc["data"]["password"] == "hunter2"
    # listed, then deleted
    ui.open("blocks")
    assert ["warehouse-login", "UI Test Credentials"] in [r[:2] for r in ui.rows()]
    ui.open(f"blocks/{block_id}")
    ui.click(".page-header button", "Delete")
    ui.confirm("Delete")
    ui.b.wait(lambda: ui.hash() == "#/blocks", 10, "the blocks list")
    assert api.request("GET", f"/block_documents/{block_id}")[0] == 404


# ---------------------------------------------------------------- variables

def test_variables_crud(ui, api, data):
    ui.open("variables")
    if not api.post("/variables/filter", {}):
        ui.wait_text("main .empty-state", "No variables yet")
    ui.click(".page-header button", "+ Variable")
    ui.type("dialog[open] #var-name", "db_host")
    ui.type("dialog[open] #var-value", "db.internal")
    ui.type("dialog[open] #var-tags", "prod, etl")
    ui.click("dialog[open] button[type=submit]", "Create")
    ui.wait_text("main tr.var-row", "db_host")
    var = api.get("/variables/name/db_host")
    assert var["value"] == "db.internal" and sorted(var["tags"]) == ["etl", "prod"]
    ui.click("main button", "Edit db_host")
    ui.type("dialog[open] #var-value", "db2.internal")
    ui.click("dialog[open] button[type=submit]", "Save")
    ui.wait_text("main tr.var-row", "db2.internal")
    assert api.get("/variables/name/db_host")["value"] == "db2.internal"
    ui.click("main button", "Delete db_host")
    ui.confirm("Delete")
    ui.wait_gone("main", "db2.internal")
    assert api.request("GET", "/variables/name/db_host")[0] == 404


# ---------------------------------------------------------------- artifacts

MARKDOWN = """# Daily report

Processed **1,234** rows in *3 s*, see [the docs](https://docs.example.com/x) or [bad](javascript:alert(1)).

- extract ok
- load ok

| table | rows |
|---|---:|
| users | 10 |

<script>window.__xss = 1</script>
<img src=x onerror="window.__xss = 2">
![remote](https://images.example.com/a.png)
"""


def test_flow_run_artifacts_render_markdown_safely(ui, api, data):
    main = data["main"]
    api.post("/artifacts/", {"key": "report", "type": "markdown", "data": MARKDOWN, "flow_run_id": main["id"]})
    api.post("/artifacts/", {"key": "numbers", "type": "table", "flow_run_id": main["id"],
                             "data": json.dumps([{"a": 1, "b": 2}, {"a": 3, "b": 4}])})
    api.post("/artifacts/", {"key": "dash", "type": "link", "flow_run_id": main["id"], "data": "[dashboard](https://dash.example.com/)"})
    ui.open(f"flow-runs/{main['id']}?tab=artifacts")
    ui.wait_text("#panel-artifacts h1", "Daily report")
    md = "#panel-artifacts article[data-type=markdown] .markdown"
    assert ui.texts(f"{md} strong") == ["1,234"] and ui.texts(f"{md} em") == ["3 s"]
    assert ui.texts(f"{md} li") == ["extract ok", "load ok"]
    assert ui.rows(f"{md} tbody tr") == [["users", "10"]]
    links = ui.b.execute(f"return [...document.querySelectorAll('{md} a')].map(a => [a.innerText, a.getAttribute('href')])")
    assert ["the docs", "https://docs.example.com/x"] in links
    assert not any(h.lower().startswith("javascript") for _, h in links)
    # raw HTML is shown as text, never inserted or run
    assert "<script>window.__xss = 1</script>" in ui.text(md)
    assert ui.b.execute(f"return document.querySelectorAll('{md} script, {md} img, {md} [onerror]').length") == 0
    assert ui.b.execute("return window.__xss === undefined") is True
    # tables as tables, links as links
    assert ui.rows("#panel-artifacts article[data-type=table] tbody tr") == [["1", "2"], ["3", "4"]]
    assert ui.texts("#panel-artifacts article[data-type=table] th") == ["a", "b"]
    assert ui.texts("#panel-artifacts article[data-type=link] a") == ["dashboard"]


def test_artifacts_page_shows_latest_per_key(ui, api, data):
    run = data["runs"]["etl-completed-1"]
    api.post("/artifacts/", {"key": "summary", "type": "markdown", "data": "old version", "flow_run_id": run["id"]})
    time.sleep(0.05)
    api.post("/artifacts/", {"key": "summary", "type": "markdown", "data": "**new version**", "flow_run_id": run["id"]})
    ui.open("artifacts")
    ui.wait_text("main .artifact-key", "summary")
    keys = ui.texts("main .artifact-key")
    assert keys.count("summary") == 1
    ui.click("details[data-key=summary] summary")
    ui.wait_text("details[data-key=summary] .markdown strong", "new version")
    assert "etl-completed-1" in ui.text("details[data-key=summary] summary")
    ui.click("main .segmented button", "All artifacts")
    ui.b.wait(lambda: ui.texts("main .artifact-key").count("summary") == 2, 10, "both versions")


# ---------------------------------------------------------------- concurrency limits

def test_concurrency_limits_tag_and_global(ui, api, data):
    ui.open("concurrency-limits")
    ui.click("#tag-limits button", "+ Tag limit")
    ui.type("dialog[open] #cl-tag", "database")
    ui.type("dialog[open] #cl-limit", "3")
    ui.click("dialog[open] button[type=submit]", "Create")
    ui.wait_text("#tag-limits tr.tag-limit-row", "database")
    assert api.get("/concurrency_limits/tag/database")["concurrency_limit"] == 3
    assert "0 / 3" in ui.text("#tag-limits tr.tag-limit-row")
    # a running task run with the tag holds a slot
    t = api.post("/task_runs/", {"flow_run_id": data["main"]["id"], "task_key": "query", "dynamic_key": "0", "name": "query-0",
                                 "tags": ["database"], "state": {"type": "PENDING"}})
    api.post(f"/task_runs/{t['id']}/set_state", {"state": {"type": "RUNNING"}})
    assert api.get("/concurrency_limits/tag/database")["active_slots"] == [t["id"]]
    ui.open("concurrency-limits")
    assert "1 / 3" in ui.text("#tag-limits tr.tag-limit-row")
    ui.click("#tag-limits button", "Reset database")
    ui.wait_text("#tag-limits tr.tag-limit-row", "0 / 3")
    assert api.get("/concurrency_limits/tag/database")["active_slots"] == []
    ui.click("#tag-limits button", "Delete database")
    ui.confirm("Delete")
    ui.wait_text("#tag-limits", "No tag limits")
    assert api.request("GET", "/concurrency_limits/tag/database")[0] == 404

    ui.click("#global-limits button", "+ Global limit")
    ui.type("dialog[open] #gcl-name", "api-calls")
    ui.type("dialog[open] #gcl-limit", "10")
    ui.click("dialog[open] button[type=submit]", "Create")
    ui.wait_text("#global-limits tr.global-limit-row", "api-calls")
    assert api.get("/v2/concurrency_limits/api-calls")["limit"] == 10
    ui.click("#global-limits button", "Edit api-calls")
    ui.type("dialog[open] #gcl-limit", "20")
    ui.click("dialog[open] button[type=submit]", "Save")
    ui.wait_text("#global-limits tr.global-limit-row", "0 / 20")
    assert api.get("/v2/concurrency_limits/api-calls")["limit"] == 20
    ui.click("#global-limits button", "Delete api-calls")
    ui.confirm("Delete")
    ui.wait_text("#global-limits", "No global limits")
    assert api.request("GET", "/v2/concurrency_limits/api-calls")[0] == 404


# ---------------------------------------------------------------- notifications

class Receiver(http.server.ThreadingHTTPServer):
    """A local HTTP endpoint standing in for Slack: it records what it is sent."""

    def __init__(self):
        self.messages = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.messages.append((self.path, body.decode("utf-8", "replace")))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    threading.Thread(target=r.serve_forever, daemon=True).start()
    yield r
    r.shutdown()
    r.server_close()


@pytest.fixture(scope="module")
def webhook(api, receiver):
    """A Slack webhook block document (the system block type) that posts to the local receiver."""
    bt = api.ok("GET", "/block_types/slug/slack-webhook")
    [schema] = api.post("/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [bt["id"]]}}, "limit": 1})
    return api.post("/block_documents/", {"name": "my-slack-webhook", "block_type_id": bt["id"], "block_schema_id": schema["id"],
                                          "data": {"url": receiver.url + "/hook"}})


def policies(api):
    return api.post("/flow_run_notification_policies/filter", {})


def test_notifications_create_pause_edit_delete(ui, api, data, webhook):
    for p in policies(api):
        api.ok("DELETE", f"/flow_run_notification_policies/{p['id']}")
    ui.open("notifications")
    ui.wait_text("main .empty-state", "No notifications yet")
    ui.click(".page-header button", "Create notification")
    ui.wait_text("main form h2", "Create Notification")
    ui.click("form.notification-form input[value=Crashed]")  # Failed and Crashed start checked
    ui.type("#notif-tags", "daily-etl")
    ui.choose("#notif-block", "my-slack-webhook (Slack Webhook)")
    ui.click("form.notification-form button[type=submit]", "Create notification")
    sentence = "If a run of any flow with daily-etl tag enters a failed state, send a notification to my-slack-webhook"
    ui.wait_text("main .policy-sentence", sentence)
    [p] = policies(api)
    assert p["state_names"] == ["Failed"] and p["tags"] == ["daily-etl"]
    assert p["block_document_id"] == webhook["id"] and p["is_active"] is True
    # pause, resume
    ui.click("main .policy button", "Pause")
    ui.wait_text("main .policy .pill", "Paused")
    assert policies(api)[0]["is_active"] is False
    ui.click("main .policy button", "Resume")
    ui.wait_text("main .policy .pill", "Active")
    assert policies(api)[0]["is_active"] is True
    # edit
    ui.click("main .policy button", "Edit")
    ui.wait_text("main form h2", "Edit Notification")
    assert ui.b.execute("return document.querySelector('form.notification-form input[value=Failed]').checked") is True
    ui.click("form.notification-form input[value=Crashed]")
    ui.type("#notif-tags", "")
    ui.click("form.notification-form button[type=submit]", "Save notification")
    ui.wait_text("main .policy-sentence", "If a run of any flow enters a failed or crashed state, send a notification to my-slack-webhook")
    [p] = policies(api)
    assert sorted(p["state_names"]) == ["Crashed", "Failed"] and p["tags"] == []
    # delete
    ui.click("main .policy button", "Delete")
    ui.confirm("Delete")
    ui.wait_text("main .empty-state", "No notifications yet")
    assert policies(api) == []


def test_notifications_create_with_a_new_block(ui, api, data, webhook, receiver):
    ui.open("notifications")
    ui.click(".page-header button", "Create notification")
    ui.wait_text("main form h2", "Create Notification")
    ui.choose("#notif-block", "Create a new block…")
    ui.choose("#notif-block-type", "Slack Webhook")
    ui.b.wait(lambda: ui.b.execute("return !document.querySelector('.new-block .loading') && !!document.querySelector('#newblock-url')"),
              10, "the Slack Webhook fields")
    ui.type("#newblock-name", "ops-webhook")
    ui.type("#newblock-url", receiver.url + "/ops")
    ui.click("form.notification-form button[type=submit]", "Create notification")
    ui.wait_text("main .policy-sentence", "enters a failed or crashed state, send a notification to ops-webhook")
    docs = api.post("/block_documents/filter", {"block_documents": {"name": {"any_": ["ops-webhook"]}}})
    assert len(docs) == 1
    p = next(p for p in policies(api) if p["block_document_id"] == docs[0]["id"])
    assert sorted(p["state_names"]) == ["Crashed", "Failed"]
    api.ok("DELETE", f"/flow_run_notification_policies/{p['id']}")


def test_notifications_send_test(ui, api, data, webhook, receiver):
    p = api.post("/flow_run_notification_policies/", {"state_names": ["Failed"], "tags": [], "block_document_id": webhook["id"]})
    try:
        ui.open("notifications")
        before = len(receiver.messages)
        ui.click(f"main .policy[data-id='{p['id']}'] button", "Send test")
        ui.wait_text("#toasts", "Test notification sent to my-slack-webhook")
        assert [path for path, _ in receiver.messages[before:]] == ["/hook"]
        # a destination that refuses the message: the error is shown in words
        api.ok("PATCH", f"/block_documents/{webhook['id']}", {"data": {"url": "http://127.0.0.1:9/refused"}})
        ui.click(f"main .policy[data-id='{p['id']}'] button", "Send test")
        ui.wait_text("#toasts .toast-error", "Error 5")
    finally:
        api.ok("PATCH", f"/block_documents/{webhook['id']}", {"data": {"url": receiver.url + "/hook"}})
        api.ok("DELETE", f"/flow_run_notification_policies/{p['id']}")


# ---------------------------------------------------------------- about, routing, layout, requests

def test_about_page_shows_server_versions(ui, api):
    with urllib.request.urlopen(ui.base + "/ui-settings") as r:
        settings = json.loads(r.read())
    ui.open("about")
    assert ui.texts("#about-version") == [settings["server"]["version"]]
    assert ui.texts("#about-api-version") == ["0.8.4"]
    db = settings["server"]["database"]
    assert ui.texts("#about-database") == [f"{db['dialect']} {db['version']}"]


def test_every_route_renders_after_a_reload(ui, api, data):
    main = data["main"]
    ui.open(f"flow-runs/{main['id']}?tab=parameters")
    ui.b.refresh()
    ui.wait_ready()
    assert ui.texts(".page-header h1") == ["etl-running"]
    assert json.loads(ui.text("#panel-parameters pre"))["batch_size"] == 500
    titles = {"dashboard": "Dashboard", "flow-runs": "Flow runs", "flows": "Flows", "deployments": "Deployments",
              "work-pools": "Work pools", "blocks": "Blocks", "variables": "Variables", "artifacts": "Artifacts",
              "concurrency-limits": "Concurrency limits", "notifications": "Notifications", "about": "About"}
    for route, title in titles.items():
        ui.open(route)
        assert ui.texts(".page-header h1") == [title], route
        assert ui.texts("#nav a.active") == [ui.texts(f"#nav a[data-nav='{route}']")[0]]
    ui.b.get(ui.base + "/")
    ui.b.wait(lambda: ui.hash() == "#/dashboard", 10, "the default route")


def all_routes(api, data):
    main = data["main"]
    routes = ["dashboard", "flow-runs", f"flow-runs/{main['id']}", f"flow-runs/{main['id']}?tab=artifacts", "flows",
              f"flows/{data['flows']['daily-etl']['id']}", "deployments", "work-pools", "blocks", "blocks?tab=catalog",
              "variables", "artifacts", "concurrency-limits", "notifications", "about"]
    for method, path, route_of in (("POST", "/deployments/filter", lambda x: f"deployments/{x['id']}"),
                                   ("POST", "/work_pools/filter", lambda x: f"work-pools/{x['name']}"),
                                   ("POST", "/block_documents/filter", lambda x: f"blocks/{x['id']}")):
        status, items = api.request(method, path, {"limit": 1})
        if status == 200 and items:
            routes.append(route_of(items[0]))
    return routes


def test_no_page_requests_anything_outside_the_server(ui, api, data):
    origin = ui.base
    for route in all_routes(api, data):
        ui.open(route)
        time.sleep(0.3)
        urls = ui.b.execute("return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)]")
        outside = [u for u in urls if not u.startswith(origin + "/")]
        assert outside == [], (route, outside)
        assert len(urls) > 4, route  # the page did load its scripts and call the API


def test_narrow_window_layout(ui, api, data):
    try:
        ui.b.set_window_size(400, 850)
        for route in ("dashboard", "flow-runs", f"flow-runs/{data['main']['id']}", "flows"):
            ui.open(route)
            overflow = ui.b.execute("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 1, (route, overflow)
        assert ui.texts("#nav a") == []  # the menu is folded away
        ui.click("button.nav-toggle", "Menu")
        ui.click("#nav a", "Flows")
        ui.b.wait(lambda: ui.hash() == "#/flows", 10, "the flows page")
        ui.wait_ready()
        assert ui.texts(".page-header h1") == ["Flows"]
        assert ui.texts("#nav a") == []
    finally:
        ui.b.set_window_size(1280, 900)


def test_times_are_shown_in_the_browser_time_zone(ui, api, data):
    assert ui.b.execute("return new Date().getTimezoneOffset()") == -330  # the browser is at UTC+05:30
    run = data["runs"]["etl-completed-1"]
    ui.open(f"flow-runs/{run['id']}")
    shown = ui.b.execute("return document.querySelector('main .kv time').innerText")
    utc = datetime.datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00"))
    local = utc.astimezone(datetime.timezone(datetime.timedelta(hours=5, minutes=30)))
    assert local.strftime(":%M:%S") in shown, (shown, local)
    assert str(int(local.strftime("%I"))) + local.strftime(":%M:%S") in shown or local.strftime("%H:%M:%S") in shown, (shown, local)


# ---------------------------------------------------------------- empty server, path prefix

@pytest.fixture(scope="module")
def empty_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uiempty")
    with prefectlite.serve(database=f"sqlite:///{tmp}/empty.db", port=0) as api_url:
        yield api_url


def test_empty_states_on_a_fresh_server(browser, empty_server):
    ui = UI(browser, empty_server[: -len("/api")])
    ui.open("flow-runs")
    ui.wait_text("main .empty-state", "No flow runs yet")
    ui.open("flows")
    ui.wait_text("main .empty-state", "No flows yet")
    ui.open("dashboard")
    ui.wait_text("#recent-failures .empty-state", "No failures")
    assert ui.texts("#run-chart .legend") == ["No runs in this period"]


@pytest.mark.parametrize("route, text", [
    ("deployments", "No deployments yet"), ("work-pools", "No work pools"), ("blocks", "No blocks yet"),
    ("variables", "No variables yet"), ("artifacts", "No artifacts yet"), ("concurrency-limits", "No tag limits"),
    ("notifications", "No notifications yet"),
])
def test_empty_states_of_the_other_lists(browser, empty_server, route, text):
    api = Api(empty_server)
    path = {"deployments": "/deployments/filter", "work-pools": "/work_pools/filter", "blocks": "/block_documents/filter",
            "variables": "/variables/filter", "artifacts": "/artifacts/latest/filter", "concurrency-limits": "/concurrency_limits/filter",
            "notifications": "/flow_run_notification_policies/filter"}[route]
    assert api.ok("POST", path, {}) == []  # the list the page reads is there, and empty
    ui = UI(browser, empty_server[: -len("/api")])
    ui.open(route)
    ui.wait_text("main .empty-state", text)
    assert ui.texts("main .error-box") == []


def test_ui_works_with_basic_auth(browser, tmp_path):
    """With PREFECT_SERVER_API_AUTH_STRING the browser asks for a login once and the UI keeps working."""
    with prefectlite.serve(database=f"sqlite:///{tmp_path}/auth.db", port=0, PREFECT_SERVER_API_AUTH_STRING="me:s3cret") as api_url:
        status, _ = Api(api_url).request("POST", "/flows/filter", {})
        assert status == 401
        ui = UI(browser, api_url[: -len("/api")].replace("http://", "http://me:s3cret@"))
        ui.open("flows")
        ui.wait_text("main .empty-state", "No flows yet")
        assert ui.texts("main .error-box") == []


def test_ui_served_under_a_serve_base(browser, tmp_path):
    """PREFECT_UI_SERVE_BASE=/ui/: the UI lives at /ui/ and still finds the API at /api."""
    with prefectlite.serve(database=f"sqlite:///{tmp_path}/base.db", port=0, PREFECT_UI_SERVE_BASE="/ui/") as api_url:
        api = Api(api_url)
        flow = api.post("/flows/", {"name": "under-ui-base"})
        ui = UI(browser, api_url[: -len("/api")] + "/ui")
        ui.open("flows")
        assert [r[0] for r in ui.rows()] == ["under-ui-base"]
        ui.open(f"flows/{flow['id']}")
        assert ui.texts(".page-header h1") == ["under-ui-base"]


class _PrefixProxy(http.server.ThreadingHTTPServer):
    """A reverse proxy that serves the server under /prefix/ (as nginx would)."""


def _proxy_handler(upstream):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _forward(self):
            if not self.path.startswith("/prefix/"):
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            req = urllib.request.Request(upstream + self.path[len("/prefix"):], data=body, method=self.command,
                                         headers={k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")})
            try:
                resp = urllib.request.urlopen(req, timeout=30)
            except urllib.error.HTTPError as e:
                resp = e
            data = resp.read()
            self.send_response(resp.status if hasattr(resp, "status") else resp.code)
            self.send_header("Content-Type", resp.headers.get("Content-Type", "application/octet-stream"))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward
    return Handler


def test_ui_works_behind_a_path_prefix(ui, api, data):
    proxy = _PrefixProxy(("127.0.0.1", 0), _proxy_handler(ui.base))
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        prefixed = UI(ui.b, f"http://127.0.0.1:{proxy.server_address[1]}/prefix")
        prefixed.open(f"flow-runs/{data['main']['id']}")
        assert prefixed.texts(".page-header h1") == ["etl-running"]
        prefixed.open("flow-runs?q=etl-comp")
        prefixed.wait_text(".pager-info", "of 3")
        urls = ui.b.execute("return performance.getEntriesByType('resource').map(e => new URL(e.name).pathname)")
        assert urls and all(u.startswith("/prefix/") for u in urls), urls
    finally:
        proxy.shutdown()
        proxy.server_close()
