"""The web UI in static/, driven in a real headless Chromium against a real prefectlite server.

Data is seeded through the HTTP API; the tests read what a person sees (rows, state names, log lines,
rendered markdown) and check the API after each action taken in the browser. A failing test leaves a
screenshot in tests/ui_artifacts/<test>.png.

Needs chromium and chromedriver (Debian: apt-get install -y chromium chromium-driver). Without them the
tests are skipped, unless PREFECTLITE_REQUIRE_BROWSER=1 (as in CI), where they fail.
"""

import contextlib
import datetime
import http.server
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import prefectlite  # noqa: E402
from helpers import wait_until  # noqa: E402
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
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
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
        self.b.get(f"{self.base}/{route}")
        if ready:
            self.wait_ready()

    def wait_ready(self, timeout=15):
        self.b.wait(
            lambda: self.b.execute(
                "return !!document.querySelector('main .page > *') && !document.querySelector('main .loading,"
                " main [aria-busy=true]')"
            ),
            timeout,
            "the page to finish loading",
        )

    def texts(self, css):
        """innerText of the visible elements matching css."""
        return self.b.execute(
            "return [...document.querySelectorAll(arguments[0])].filter(e => e.getClientRects().length)"
            ".map(e => e.innerText.trim())",
            css,
        )

    def text(self, css="main"):
        return "\n".join(self.texts(css))

    def wait_text(self, css, needle, timeout=10):
        return self.b.wait(
            lambda: any(needle in t for t in self.texts(css)) and self.texts(css), timeout, f"{needle!r} in {css}"
        )

    def wait_gone(self, css, needle, timeout=10):
        self.b.wait(lambda: not any(needle in t for t in self.texts(css)), timeout, f"{needle!r} to leave {css}")

    def el(self, css, text=None, timeout=10, visible=True):
        """The first visible element matching css (whose trimmed text equals `text`, when given)."""

        def find():
            found = self.b.execute(
                "const [css, text, visible] = arguments;"
                "return [...document.querySelectorAll(css)].find(e => (!visible || e.getClientRects().length) &&"
                " (text === null || (e.innerText || e.textContent).trim() === text ||"
                " e.getAttribute('aria-label') === text)) || null;",
                css,
                text,
                visible,
            )
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
        self.b.wait(
            lambda: (
                self.b.execute(
                    "const s = document.querySelector(arguments[0]);"
                    "return s.options[s.selectedIndex].textContent.trim()",
                    select_css,
                )
                == label
            ),
            5,
            f"{label!r} to be selected",
        )

    def confirm(self, label):
        self.click("dialog[open] button", label)
        self.b.wait(
            lambda: not self.b.execute("return !!document.querySelector('dialog[open]')"), 5, "the dialog to close"
        )

    def rows(self, css="main tbody tr"):
        return self.b.execute(
            "return [...document.querySelectorAll(arguments[0])].filter(e => e.getClientRects().length)"
            ".map(r => [...r.cells].map(c => c.innerText.trim()))",
            css,
        )

    def route(self):
        """The page's route: its path below the UI's root and its query, decoded."""
        return self.b.execute(
            "const root = new URL(document.baseURI).pathname;"
            "return decodeURIComponent(location.pathname.slice(root.length) + location.search)"
        )


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
def ui_db(tmp_path_factory):
    return tmp_path_factory.mktemp("uiserver") / "ui.db"


@pytest.fixture(scope="module")
def server(ui_db):
    # No late-runs service: the runs stay as the fixtures made them. A run scheduled for now (act-scheduled) would
    # turn Late 15 s later, on a busy machine in the middle of the test that counts the timeline's 3 Late runs.
    with prefectlite.serve(database=f"sqlite:///{ui_db}", port=0, PREFECT_API_SERVICES_LATE_RUNS_ENABLED=False) as url:
        yield url


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

    def run(
        name,
        flow="daily-etl",
        path=("RUNNING", "COMPLETED"),
        tags=(),
        params=None,
        parent=None,
        message=None,
        first="PENDING",
    ):
        r = api.post(
            "/flow_runs/",
            {
                "flow_id": flows[flow]["id"],
                "name": name,
                "tags": list(tags),
                "parameters": params or {},
                "parent_task_run_id": parent,
                "state": {"type": first},
            },
        )
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
    main = run(
        "etl-running", path=("RUNNING",), tags=["nightly", "prod"], params={"date": "2024-02-01", "batch_size": 500}
    )
    tasks = {}
    for key, final in (("extract", "COMPLETED"), ("transform", "FAILED"), ("load", None)):
        t = api.post(
            "/task_runs/",
            {
                "flow_run_id": main["id"],
                "task_key": key,
                "dynamic_key": "0",
                "name": f"{key}-0",
                "state": {"type": "PENDING"},
            },
        )
        api.post(f"/task_runs/{t['id']}/set_state", {"state": {"type": "RUNNING"}})
        if final:
            time.sleep(0.05)  # by design: a run time the page shows as more than zero
            api.post(f"/task_runs/{t['id']}/set_state", {"state": {"type": final}, "force": True})
        tasks[key] = t
    run("child-report", flow="reporter", parent=tasks["extract"]["id"])
    base = now_utc()
    levels = [
        (10, "debug detail"),
        (20, "starting extract"),
        (20, "extracted 1,234 rows"),
        (30, "slow query warning"),
        (40, "row 42 rejected"),
        (50, "critical disk failure"),
    ]
    api.post(
        "/logs/",
        [
            {
                "name": "prefect.flow_runs",
                "level": lvl,
                "message": f"log line {i}: {msg}",
                "timestamp": (base + datetime.timedelta(milliseconds=10 * i)).isoformat(),
                "flow_run_id": main["id"],
                "task_run_id": tasks["extract"]["id"] if i == 2 else None,
            }
            for i, (lvl, msg) in enumerate(levels)
        ],
    )
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
    due = {"after_": since, "before_": now_utc().isoformat()}
    total = count_runs(api, expected_start_time=due)
    failed = count_runs(api, expected_start_time=due, state={"type": {"any_": ["FAILED"]}})
    assert total >= 42 and failed >= 2
    cards = dict(
        ui.b.execute(
            "return [...document.querySelectorAll('#run-counts .stat')]"
            ".map(c => [c.dataset.state, c.querySelector('.stat-value').innerText])"
        )
    )
    assert cards["ALL"] == f"{total:,}"
    assert cards["FAILED"] == f"{failed:,}"
    assert cards["RUNNING"] == f"{count_runs(api, expected_start_time=due, state={'type': {'any_': ['RUNNING']}}):,}"
    # the chart: stacked bars coloured by state whose counts add up to the runs of the window
    bars = ui.b.execute(
        "return [...document.querySelectorAll('#run-chart svg rect.bar')].map(r => [r.dataset.state, +r.dataset.count])"
    )
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
    assert "window=1h" in ui.route()
    ui.wait_text(".card-head h2", "Past hour")


# ---------------------------------------------------------------- flow runs list


def test_flow_runs_list_paginates_and_filters(ui, api, data):
    total = count_runs(api, expected_start_time={"before_": now_utc().isoformat()})
    ui.open("flow-runs")
    ui.wait_text(".pager-info", f"of {total}")
    page1 = [r[0] for r in ui.rows("main tr.run-row")]
    assert len(page1) == 25
    assert ui.texts(".pager-info") == [f"1–25 of {total}"]
    newest = api.post(
        "/flow_runs/filter",
        {
            "flow_runs": {"expected_start_time": {"before_": now_utc().isoformat()}},
            "sort": "EXPECTED_START_TIME_DESC",
            "limit": 25,
        },
    )
    assert page1 == [r["name"] for r in newest]
    ui.click("main .pager button", "Next ›")
    ui.wait_text(".pager-info", f"26–{min(50, total)} of {total}")
    page2 = [r[0] for r in ui.rows("main tr.run-row")]
    assert page2 and not set(page2) & set(page1)
    assert "page=2" in ui.route()

    # state filter from the dropdown
    ui.click("summary[aria-label='Filter by state']")
    ui.click(".dropdown-body input[value=FAILED]")
    ui.wait_text(".pager-info", "of 2")
    rows = ui.rows("main tr.run-row")
    assert sorted(r[0] for r in rows) == ["act-failed", "etl-failed-1"]
    assert all("Failed" in r[3] for r in rows)
    assert "state=FAILED" in ui.route()

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
    assert f"flow={data['flows']['reporter']['id']}" in ui.route()

    # time range: nothing ran in the year 2000
    ui.open("flow-runs?range=custom&from=2000-01-01T00:00:00.000Z&to=2000-01-02T00:00:00.000Z")
    ui.wait_text("main .empty-state", "No matching flow runs")
    assert ui.rows("main tr.run-row") == []
    ui.open("flow-runs?range=1h&q=bulk-")
    ui.wait_text(".pager-info", "of 30")


@pytest.fixture(scope="module")
def timeline(api, data):
    """The future and the overdue: a deployment with 30 runs scheduled from tomorrow on, and 3 Late runs."""
    flow = api.post("/flows/", {"name": "scheduled-report"})
    dep = api.post("/deployments/", {"name": "nightly-report", "flow_id": flow["id"]})
    start = now_utc() + datetime.timedelta(days=1)
    future = [
        api.post(
            "/flow_runs/",
            {
                "flow_id": flow["id"],
                "deployment_id": dep["id"],
                "name": f"future-{i:02d}",
                "state": {
                    "type": "SCHEDULED",
                    "name": "Scheduled",
                    "state_details": {"scheduled_time": (start + datetime.timedelta(hours=i)).isoformat()},
                },
            },
        )
        for i in range(30)
    ]
    late = []
    for i in range(3):
        r = api.post(
            "/flow_runs/",
            {
                "flow_id": flow["id"],
                "deployment_id": dep["id"],
                "name": f"overdue-{i}",
                "state": {
                    "type": "SCHEDULED",
                    "name": "Scheduled",
                    "state_details": {"scheduled_time": (now_utc() - datetime.timedelta(minutes=30 + i)).isoformat()},
                },
            },
        )
        set_state(
            api,
            r["id"],
            "SCHEDULED",
            force=True,
            name="Late",
            state_details={"scheduled_time": (now_utc() - datetime.timedelta(minutes=30 + i)).isoformat()},
        )
        late.append(api.get(f"/flow_runs/{r['id']}"))
    assert all(r["state_name"] == "Late" for r in late)
    return {"deployment": dep, "future": future, "late": late}


def test_the_present_is_not_buried_under_the_future(ui, api, data, timeline):
    now = now_utc().isoformat()
    due = count_runs(api, expected_start_time={"before_": now})
    assert count_runs(api) == due + 30
    ui.open("flow-runs")
    ui.wait_text(".pager-info", f"of {due}")
    names = [r[0] for r in ui.rows("main tr.run-row")]
    assert not any(n.startswith("future-") for n in names)
    # Upcoming: the deployment's next five runs, soonest first, and how many there are
    ui.click("main .segmented a", "Upcoming")
    ui.b.wait(lambda: ui.route() == "flow-runs/upcoming", 10, "the upcoming view")
    ui.wait_text("main .upcoming", "nightly-report")
    card = f"main .upcoming[data-deployment='{timeline['deployment']['id']}']"
    assert ui.texts(f"{card} .upcoming-run .run-link") == [f"future-{i:02d}" for i in range(5)]
    assert ui.texts(f"{card} .upcoming-count") == ["30 upcoming"]
    # the deployment's page: its past and its future apart
    ui.open(f"deployments/deployment/{timeline['deployment']['id']}")
    ui.wait_text("#deployment-upcoming", "future-00")
    assert [r[0] for r in ui.rows("#deployment-upcoming tr.run-row")] == [f"future-{i:02d}" for i in range(5)]
    ui.wait_text("#deployment-runs", "overdue-0")
    assert not any(r[0].startswith("future-") for r in ui.rows("#deployment-runs tr.run-row"))


def test_late_runs_have_their_own_count_colour_and_filter(ui, api, data, timeline):
    ui.open("dashboard")
    ui.wait_text("#run-counts", "Late")
    cards = dict(
        ui.b.execute(
            "return [...document.querySelectorAll('#run-counts .stat')]"
            ".map(c => [c.dataset.state, c.querySelector('.stat-value').innerText])"
        )
    )
    since = (now_utc() - datetime.timedelta(hours=24)).isoformat()
    due = {"after_": since, "before_": now_utc().isoformat()}
    assert cards["LATE"] == "3"
    scheduled = count_runs(api, expected_start_time=due, state={"type": {"any_": ["SCHEDULED"]}})
    assert cards["SCHEDULED"] == f"{scheduled - 3:,}"
    assert cards["UPCOMING"] == "30"
    assert cards["ALL"] == f"{count_runs(api, expected_start_time=due):,}"
    late_bars = ui.b.execute(
        "return [...document.querySelectorAll('#run-chart rect.bar[data-state=LATE]')].map(r => +r.dataset.count)"
    )
    assert sum(late_bars) == 3
    assert "Late" in ui.text("#run-chart .legend")
    # a Late run is drawn in a colour of its own
    ui.click("#run-counts .stat[data-state=LATE]")
    ui.b.wait(lambda: ui.route() == "flow-runs?range=24h&state=Late", 10, "the Late runs")
    ui.wait_text(".pager-info", "of 3")
    assert sorted(r[0] for r in ui.rows("main tr.run-row")) == ["overdue-0", "overdue-1", "overdue-2"]
    colours = ui.b.execute(
        "return [...document.querySelectorAll('main tr.run-row .state-badge')].map(b =>"
        " getComputedStyle(b).getPropertyValue('--state'))"
    )
    ui.open("flow-runs?state=SCHEDULED&q=act-")
    scheduled_colour = ui.b.execute(
        "return getComputedStyle(document.querySelector('main tr.run-row .state-badge')).getPropertyValue('--state')"
    )
    assert set(colours) != {scheduled_colour} and len(set(colours)) == 1
    # state names and types in the URL, in any case; names and types together mean either
    ui.open("flow-runs?state=late")
    ui.wait_text(".pager-info", "of 3")
    ui.open("flow-runs?state=Failed")
    failed = count_runs(
        api, state={"type": {"any_": ["FAILED"]}}, expected_start_time={"before_": now_utc().isoformat()}
    )
    ui.wait_text(".pager-info", f"of {failed}")
    assert all("Failed" in r[3] for r in ui.rows("main tr.run-row"))
    assert ui.b.execute("return document.querySelector('.dropdown-body input[value=FAILED]').checked") is True
    ui.open("flow-runs?state=failed,LATE")
    ui.wait_text(".pager-info", f"of {failed + 3}")
    assert ui.b.execute("return document.querySelector('.dropdown-body input[value=Late]').checked") is True
    # the dropdown offers the names
    ui.open("flow-runs")
    ui.click("summary[aria-label='Filter by state']")
    ui.click(".dropdown-body input[value=Late]")
    ui.wait_text(".pager-info", "of 3")
    assert "state=Late" in ui.route()


def test_flow_runs_list_asks_for_one_page_only(ui, api, data):
    """The list never fetches all runs: every run query carries a page-sized limit and an offset."""
    ui.open("flow-runs")
    ui.wait_text(".pager-info", "of")
    ui.b.execute(
        "window.__calls = []; const f = window.fetch;"
        "window.fetch = (url, init) => { window.__calls.push([String(url), init && init.body]); return f(url, init); };"
    )
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
    ui.open(f"flow-runs/flow-run/{main['id']}")
    assert ui.texts(".page-header h1") == ["etl-running"]
    assert "Running" in ui.text(".page-header .state-badge")
    summary = ui.text("main .kv")
    assert "daily-etl" in summary and "nightly" in summary and "prod" in summary and main["id"] in summary
    # logs (default tab), in order, with level names
    ui.wait_text("#panel-logs .log-line", "log line 5: critical disk failure")
    lines = ui.texts("#panel-logs .log-line .log-msg")
    assert lines == [
        f"log line {i}: {m}"
        for i, m in enumerate(
            [
                "debug detail",
                "starting extract",
                "extracted 1,234 rows",
                "slow query warning",
                "row 42 rejected",
                "critical disk failure",
            ]
        )
    ]
    assert ui.texts("#panel-logs .log-line .log-level") == ["DEBUG", "INFO", "INFO", "WARNING", "ERROR", "CRITICAL"]
    assert "extract-0" in ui.texts("#panel-logs .log-line")[2]  # the task run that wrote it
    ui.choose("#log-level", "Error and above")
    ui.b.wait(lambda: ui.texts("#panel-logs .log-line .log-level") == ["ERROR", "CRITICAL"], 10, "only error logs")
    assert "level=40" in ui.route()
    # task runs: table and timeline
    # task runs: extract-0 stands for the subflow child-report (its parent task run), so it is no task of this run
    ui.click("button[role=tab]", "Task runs (2)")
    rows = ui.rows("#panel-task-runs tr.task-row")
    assert [(r[0], r[1]) for r in rows] == [("transform-0", "Failed"), ("load-0", "Running")]
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
    ui.open(f"flow-runs/flow-run/{data['runs']['child-report']['id']}")
    ui.wait_text("main .kv", "etl-running")


def test_task_run_page_and_links_both_ways(ui, api, data):
    extract = data["tasks"]["extract"]
    main = api.post(
        "/flow_runs/",
        {"flow_id": data["flows"]["daily-etl"]["id"], "name": "task-page-run", "state": {"type": "RUNNING"}},
    )
    expires = (now_utc() + datetime.timedelta(days=2)).isoformat()
    t = api.post(
        "/task_runs/",
        {
            "flow_run_id": main["id"],
            "task_key": "publish",
            "dynamic_key": "0",
            "name": "publish-0",
            "tags": ["outbound"],
            "cache_key": "publish-2024-02-01",
            "cache_expiration": expires,
            "empirical_policy": {"retries": 3, "retry_delay": 10},
            "task_inputs": {
                "rows": [{"input_type": "task_run", "id": extract["id"]}],
                "batch": [{"input_type": "parameter", "name": "batch_size"}],
            },
            "state": {"type": "PENDING"},
        },
    )
    api.post(f"/task_runs/{t['id']}/set_state", {"state": {"type": "RUNNING"}})
    api.post(f"/task_runs/{t['id']}/set_state", {"state": {"type": "COMPLETED", "message": "published"}, "force": True})
    api.post(
        "/logs/",
        [
            {
                "name": "prefect.task_runs",
                "level": 20,
                "message": "publishing 500 rows",
                "timestamp": now_utc().isoformat(),
                "flow_run_id": main["id"],
                "task_run_id": t["id"],
            }
        ],
    )
    api.post(
        "/artifacts/",
        {
            "key": "publish-report",
            "type": "markdown",
            "data": "**done**",
            "flow_run_id": main["id"],
            "task_run_id": t["id"],
        },
    )
    # from the flow run's task list to the task run's page
    ui.open(f"flow-runs/flow-run/{main['id']}?tab=task-runs")
    ui.click("#panel-task-runs a.task-name", "publish-0")
    ui.b.wait(lambda: ui.route() == f"runs/task-run/{t['id']}", 10, "the task run page")
    ui.wait_ready()
    assert ui.texts(".page-header h1") == ["publish-0"]
    assert "Completed" in ui.text(".page-header .state-badge")
    assert ui.texts("main .cache-key") == ["publish-2024-02-01"]
    assert "in 2 d" in ui.text("main .cache-expiration")
    assert ui.texts("main .task-retries") == ["Up to 3 retries, waiting 10s"]
    assert "outbound" in ui.text("main .kv")
    ui.wait_text("#panel-logs .log-line .log-msg", "publishing 500 rows")
    assert ui.texts("#panel-logs .log-line .log-msg") == ["publishing 500 rows"]
    ui.click("button[role=tab]", "Inputs")
    ui.wait_text("#panel-inputs", "extract-0")
    inputs = dict((r[0], r[1]) for r in ui.rows("#panel-inputs tr.input-row"))
    assert inputs["rows"].startswith("result of extract-0") and inputs["batch"] == "flow parameter batch_size"
    assert ui.texts("#panel-inputs .upstream-list a") == ["extract-0"]
    ui.click("button[role=tab]", "State history")
    ui.wait_text("#panel-state-history", "Completed")
    assert ui.texts("#panel-state-history .timeline-item .state-badge") == ["Pending", "Running", "Completed"]
    ui.click("button[role=tab]", "Artifacts (1)")
    ui.wait_text("#panel-artifacts .markdown strong", "done")
    # an upstream task run is one click away, and so is the flow run
    ui.click("main .kv a.flow-run-link", "task-page-run")
    ui.b.wait(lambda: ui.route() == f"flow-runs/flow-run/{main['id']}", 10, "back on the flow run")
    ui.wait_ready()
    # the subflow's parent task run names its subflow
    ui.open(f"runs/task-run/{extract['id']}")
    ui.wait_text("main .kv", "child-report")


def test_logs_read_to_the_millisecond_search_and_download(ui, api, data):
    main = data["main"]
    ui.open(f"flow-runs/flow-run/{main['id']}")
    ui.wait_text("#panel-logs .log-line", "critical disk failure")
    times = ui.texts("#panel-logs .log-line .log-time")
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}", t) for t in times), times
    assert len(set(times)) == len(times)  # 10 ms apart, told apart
    assert ui.texts("#panel-logs .log-line .log-source")[0] == "prefect.flow_runs"  # the logger's whole name
    every = len(ui.texts("#panel-logs .log-line"))
    ui.type("#log-search", "ROW 4")
    ui.b.wait(
        lambda: ui.texts("#panel-logs .log-line .log-msg") == ["log line 4: row 42 rejected"],
        10,
        "only the line with 'row 4'",
    )
    ui.type("#log-search", "")
    ui.b.wait(lambda: len(ui.texts("#panel-logs .log-line")) == every, 10, "every line again")
    # the download holds every line, built from the API in bounded pages
    ui.b.execute(
        "window.__blobs = []; const c = URL.createObjectURL;"
        "URL.createObjectURL = (b) => { window.__blobs.push(b); return c(b); };"
    )
    ui.click("#panel-logs button", "Download")
    ui.b.wait(lambda: ui.b.execute("return window.__blobs.length"), 10, "the download")
    text = ui.b.execute_async("const done = arguments[arguments.length - 1]; window.__blobs[0].text().then(done);")
    assert text.count("\n") == every and "CRITICAL" in text and "critical disk failure" in text


def test_old_hash_links_lead_to_their_pages(ui, api, data):
    main = data["main"]
    for old, route in (
        (f"#/flow-runs/{main['id']}", f"flow-runs/flow-run/{main['id']}"),
        ("#/flow-runs?state=FAILED", "flow-runs?state=FAILED"),
        (f"#/flows/{data['flows']['reporter']['id']}", f"flows/flow/{data['flows']['reporter']['id']}"),
        ("#/blocks?tab=catalog", "blocks/catalog"),
        ("#/dashboard", "dashboard"),
    ):
        ui.b.get("about:blank")
        ui.b.get(f"{ui.base}/{old}")
        ui.b.wait(lambda: ui.route() == route, 10, f"{old} to lead to {route}")
        ui.wait_ready()
        assert ui.b.execute("return location.hash") == ""
        assert "Page not found" not in ui.text(".page-header")
    # and the short paths of those links too
    ui.open(f"flow-runs/{main['id']}")
    ui.b.wait(lambda: ui.route() == f"flow-runs/flow-run/{main['id']}", 10, "the canonical path")
    assert ui.texts(".page-header h1") == ["etl-running"]
    # links change the page without loading it again; Back goes back
    ui.b.execute("window.__same_document = true")
    ui.click("main .kv a", "daily-etl")
    ui.b.wait(lambda: ui.route().startswith("flows/flow/"), 10, "the flow page")
    assert ui.b.execute("return window.__same_document") is True
    ui.b.execute("history.back()")
    ui.b.wait(lambda: ui.route() == f"flow-runs/flow-run/{main['id']}", 10, "back on the run")
    ui.wait_text(".page-header h1", "etl-running")


def make_task(api, db, run_id, name, start, seconds, *, inputs=None, retry_at=None):
    """A completed task run that ran from `start` for `seconds` (with retry_at: failed once at retry_at[0] and ran
    again from retry_at[1]). The server stamps states with its own clock, so the times are then moved back in
    the database: a run of minutes without waiting minutes."""
    t = api.post(
        "/task_runs/",
        {
            "flow_run_id": run_id,
            "task_key": name.split("-")[0],
            "dynamic_key": name,
            "name": name,
            "task_inputs": inputs or {},
            "state": {"type": "PENDING"},
        },
    )
    path = [("RUNNING", None, start)]
    if retry_at:
        path += [("SCHEDULED", "AwaitingRetry", retry_at[0]), ("RUNNING", "Retrying", retry_at[1])]
    end = start + datetime.timedelta(seconds=seconds)
    path.append(("COMPLETED", None, end))
    for state_type, state_name, _ in path:
        state = {"type": state_type, **({"name": state_name} if state_name else {})}
        api.post(f"/task_runs/{t['id']}/set_state", {"state": state, "force": True})
    ran = (retry_at[0] - start + end - retry_at[1]).total_seconds() if retry_at else seconds
    with sqlite3.connect(db) as c:
        c.execute(
            "UPDATE task_run SET expected_start_time = ?, start_time = ?, end_time = ?, total_run_time = ?"
            " WHERE id = ?",
            ((start - datetime.timedelta(seconds=1)).isoformat(), start.isoformat(), end.isoformat(), ran, t["id"]),
        )
        ids = [
            r[0]
            for r in c.execute("SELECT id FROM task_run_state WHERE task_run_id = ? ORDER BY timestamp", (t["id"],))
        ]
        stamps = [start - datetime.timedelta(seconds=1)] + [at for _, _, at in path]
        for state_id, at in zip(ids, stamps):
            c.execute("UPDATE task_run_state SET timestamp = ? WHERE id = ?", (at.isoformat(), state_id))
    return api.get(f"/task_runs/{t['id']}")


def test_run_graph_at_twenty_tasks_edges_retries_and_durations(ui, api, data, ui_db):
    flow = api.post("/flows/", {"name": "graph-flow"})
    run = api.post("/flow_runs/", {"flow_id": flow["id"], "name": "graph-20", "state": {"type": "RUNNING"}})
    base = now_utc() - datetime.timedelta(minutes=10)
    tasks = [
        make_task(api, ui_db, run["id"], f"map-{i:02d}", base + datetime.timedelta(seconds=5 * i), 3 + i)
        for i in range(18)
    ]
    joined = make_task(
        api,
        ui_db,
        run["id"],
        "join-0",
        base + datetime.timedelta(seconds=130),
        4,
        inputs={"parts": [{"input_type": "task_run", "id": t["id"]} for t in tasks[:3]]},
    )
    retried = make_task(
        api,
        ui_db,
        run["id"],
        "flaky-0",
        base + datetime.timedelta(seconds=140),
        30,
        retry_at=(base + datetime.timedelta(seconds=145), base + datetime.timedelta(seconds=160)),
    )
    set_state(api, run["id"], "COMPLETED", force=True)
    ui.open(f"flow-runs/flow-run/{run['id']}?tab=task-runs")
    ui.b.wait(
        lambda: len(ui.b.execute("return document.querySelectorAll('#panel-task-runs rect.graph-bar')")) == 20,
        10,
        "20 bars",
    )
    # readable: labels at a normal size, the whole name
    sizes = ui.b.execute(
        "return [...document.querySelectorAll('#panel-task-runs .graph-label')].map(e =>"
        " parseFloat(getComputedStyle(e).fontSize))"
    )
    assert len(sizes) == 20 and min(sizes) >= 12
    assert "map-00" in ui.texts("#panel-task-runs .graph-label")
    # edges from task_inputs
    edges = ui.b.execute(
        "return [...document.querySelectorAll('#panel-task-runs path.graph-edge')].map(e => [e.dataset.from,"
        " e.dataset.to])"
    )
    assert sorted(edges) == sorted([t["id"], joined["id"]] for t in tasks[:3])
    # the retried task: two attempts drawn
    attempts = ui.b.execute("return document.querySelectorAll(`#panel-task-runs rect.graph-attempt`).length")
    assert attempts == 2 and api.get(f"/task_runs/{retried['id']}")["run_count"] == 2
    # durations agree with the table
    table = {r[0]: r[3] for r in ui.rows("#panel-task-runs tr.task-row")}
    bars = dict(
        ui.b.execute(
            "return [...document.querySelectorAll('#panel-task-runs rect.graph-bar')].map(r => [r.dataset.id,"
            " r.dataset.duration])"
        )
    )
    names = {t["id"]: t["name"] for t in tasks + [joined, retried]}
    assert {names[i]: d for i, d in bars.items()} == {n: table[n] for n in names.values()}
    # the axis reads clock times, in order
    ticks = ui.b.execute(
        "return [...document.querySelectorAll('#panel-task-runs .graph-tick')].map(t => [+t.dataset.ms, t.textContent])"
    )
    assert len(ticks) >= 3 and [ms for ms, _ in ticks] == sorted(ms for ms, _ in ticks)
    assert all(re.fullmatch(r"\d\d:\d\d(:\d\d)?", text) for _, text in ticks), ticks
    # a bar leads to its task run
    ui.click("#panel-task-runs .graph-label", "join-0")
    ui.b.wait(lambda: ui.route() == f"runs/task-run/{joined['id']}", 10, "the task run page")


def test_run_graph_at_a_thousand_tasks_draws_only_what_is_in_view(ui, api, data):
    flow = api.post("/flows/", {"name": "graph-flow"})
    run = api.post("/flow_runs/", {"flow_id": flow["id"], "name": "graph-1000", "state": {"type": "COMPLETED"}})
    base = now_utc() - datetime.timedelta(hours=1)
    for chunk in range(10):  # the API takes one task run per request: 1,000 requests, bounded
        for i in range(chunk * 100, chunk * 100 + 100):
            start = base + datetime.timedelta(seconds=3 * i)
            api.post(
                "/task_runs/",
                {
                    "flow_run_id": run["id"],
                    "task_key": "item",
                    "dynamic_key": str(i),
                    "name": f"item-{i:04d}",
                    "state": {"type": "COMPLETED", "timestamp": start.isoformat()},
                },
            )
    ui.open(f"flow-runs/flow-run/{run['id']}?tab=task-runs")
    ui.wait_text("#panel-task-runs .graph-count", "1,000 runs")
    drawn = ui.b.execute("return document.querySelectorAll('#panel-task-runs rect.graph-bar').length")
    assert 10 <= drawn <= 40, drawn
    # scrolled to the end, the last rows are drawn (and the first are gone)
    ui.b.execute("const v = document.querySelector('#panel-task-runs .graph-viewport'); v.scrollTop = v.scrollHeight;")
    ui.b.wait(lambda: "item-0999" in ui.texts("#panel-task-runs .graph-label"), 10, "the last row")
    assert "item-0000" not in ui.texts("#panel-task-runs .graph-label")
    # zoom in: the drawing is wider than the view, and still only the visible part is drawn
    before = ui.b.execute("return document.querySelector('#panel-task-runs .graph-spacer').offsetWidth")
    for _ in range(3):
        ui.click("#panel-task-runs button[aria-label='Zoom in']")
    ui.b.wait(
        lambda: (
            ui.b.execute("return document.querySelector('#panel-task-runs .graph-spacer').offsetWidth") >= 7 * before
        ),
        10,
        "an 8x wider drawing",
    )
    assert ui.b.execute("return document.querySelectorAll('#panel-task-runs rect.graph-bar').length") <= 40
    # the page asked for the task runs in bounded pages only
    bodies = ui.b.execute("return performance.getEntriesByType('resource').map(e => e.name)")
    assert bodies  # the page loaded through the API


def test_flow_run_logs_tail_live_until_the_run_ends(ui, api, data):
    run = data["runs"]["live-run"]
    ui.open(f"flow-runs/flow-run/{run['id']}")
    ui.wait_text("#panel-logs", "No logs")
    assert ui.texts("#panel-logs .live") == ["Live: following new logs"]
    api.post(
        "/logs/",
        [
            {
                "name": "test",
                "level": 20,
                "message": "fresh line from the test",
                "timestamp": now_utc().isoformat(),
                "flow_run_id": run["id"],
                "task_run_id": None,
            }
        ],
    )
    ui.wait_text("#panel-logs .log-line", "fresh line from the test", timeout=10)
    set_state(api, run["id"], "COMPLETED", force=True)
    ui.wait_text(".page-header .state-badge", "Completed", timeout=10)
    ui.b.wait(lambda: ui.texts("#panel-logs .live") == [], 5, "the live marker to go away")
    # polling stopped: a later log only shows after a reload
    api.post(
        "/logs/",
        [
            {
                "name": "test",
                "level": 20,
                "message": "written after the end",
                "timestamp": now_utc().isoformat(),
                "flow_run_id": run["id"],
                "task_run_id": None,
            }
        ],
    )
    time.sleep(3)  # by design: nothing may show in this window, several of the page's polls long
    assert "written after the end" not in ui.text("#panel-logs")
    ui.b.refresh()
    ui.wait_ready()
    ui.wait_text("#panel-logs .log-line", "written after the end")


def test_flow_run_actions_cancel_retry_delete(ui, api, data):
    runs = data["runs"]
    # cancelling a running run asks it to stop
    ui.open(f"flow-runs/flow-run/{runs['act-running']['id']}")
    ui.click(".page-header button", "Cancel")
    ui.confirm("Cancel run")
    ui.b.wait(
        lambda: api.get(f"/flow_runs/{runs['act-running']['id']}")["state_type"] == "CANCELLING", 10, "CANCELLING"
    )
    ui.wait_text(".page-header .state-badge", "Cancelling")
    # cancelling a run that is not running cancels it outright
    ui.open(f"flow-runs/flow-run/{runs['act-scheduled']['id']}")
    ui.click(".page-header button", "Cancel")
    ui.confirm("Cancel run")
    ui.b.wait(
        lambda: api.get(f"/flow_runs/{runs['act-scheduled']['id']}")["state_type"] == "CANCELLED", 10, "CANCELLED"
    )
    ui.wait_text(".page-header .state-badge", "Cancelled")
    # retrying a failed run schedules it again
    ui.open(f"flow-runs/flow-run/{runs['act-failed']['id']}")
    assert ui.texts(".page-header button") == ["Retry", "Delete"]
    ui.click(".page-header button", "Retry")
    ui.confirm("Retry")
    ui.b.wait(lambda: api.get(f"/flow_runs/{runs['act-failed']['id']}")["state_type"] == "SCHEDULED", 10, "SCHEDULED")
    # deleting goes back to the list and the run is gone
    ui.open(f"flow-runs/flow-run/{runs['act-delete']['id']}")
    ui.click(".page-header button", "Delete")
    ui.confirm("Delete")
    ui.b.wait(lambda: ui.route() == "flow-runs", 10, "the flow runs list")
    assert api.request("GET", f"/flow_runs/{runs['act-delete']['id']}")[0] == 404
    ui.wait_ready()
    assert "act-delete" not in ui.text("main")


def test_api_errors_are_shown_in_words(ui, api, data):
    missing = str(uuid.uuid4())
    status, body = api.request("GET", f"/flow_runs/{missing}")
    assert status == 404
    ui.open(f"flow-runs/flow-run/{missing}")
    ui.wait_text("main .error-box", "Error 404")
    assert body["detail"] in ui.text("main .error-box")
    ui.open("no-such-page")
    assert ui.texts(".page-header h1") == ["Page not found"]


# ---------------------------------------------------------------- flows


def test_flows_list_and_flow_detail(ui, api, data):
    ui.open("flows")
    names = [r[0] for r in ui.rows() if r[0] not in ("scheduled-report", "graph-flow")]  # other tests' flows, if run
    assert names == ["bulk-flow", "daily-etl", "reporter"]
    # each flow's last run (due up to now) with its state
    last = {r[0]: r[2] for r in ui.rows()}
    for name in ("bulk-flow", "reporter"):
        [newest] = api.post(
            "/flow_runs/filter",
            {
                "flows": {"id": {"any_": [data["flows"][name]["id"]]}},
                "limit": 1,
                "flow_runs": {"expected_start_time": {"before_": now_utc().isoformat()}},
                "sort": "EXPECTED_START_TIME_DESC",
            },
        )
        assert last[name].startswith(newest["name"]) and newest["state_name"] in last[name], (name, last[name])
    ui.type("#flow-search", "reporte")
    ui.b.wait(lambda: [r[0] for r in ui.rows()] == ["reporter"], 10, "the search to narrow the list")
    ui.click("main a", "reporter")
    ui.wait_text(".page-header h1", "reporter")
    ui.wait_ready()
    assert [r[0] for r in ui.rows("#flow-runs tr.run-row")] == ["child-report"]
    ui.open(f"flows/flow/{data['flows']['bulk-flow']['id']}")
    ui.wait_text("#flow-runs .pager-info", "1–15 of 30")


def test_flow_detail_lists_its_deployments(ui, api, data):
    flow = data["flows"]["daily-etl"]
    api.post("/deployments/", {"name": "etl-deploy-a", "flow_id": flow["id"]})
    ui.open(f"flows/flow/{flow['id']}")
    ui.wait_text("#flow-deployments", "etl-deploy-a")


# ---------------------------------------------------------------- deployments


def test_deployments_run_with_overrides_and_pause(ui, api, data):
    flow = data["flows"]["daily-etl"]
    dep = api.post(
        "/deployments/",
        {
            "name": "nightly",
            "flow_id": flow["id"],
            "parameters": {"date": "2024-01-01", "limit": 10},
            "parameter_openapi_schema": {
                "type": "object",
                "title": "Parameters",
                "properties": {
                    "date": {"type": "string", "title": "date"},
                    "limit": {"type": "integer", "title": "limit"},
                },
            },
            "schedules": [{"schedule": {"interval": 3600}, "active": True}],
            "tags": ["prod"],
        },
    )
    ui.open("deployments")
    row = next(r for r in ui.rows() if r[0] == "nightly")
    assert row[1] == "daily-etl" and "Every hour" in row[2] and row[3] == "Not ready"
    ui.click("main a", "nightly")
    ui.wait_text(".page-header h1", "nightly")
    ui.wait_ready()
    assert "Every hour" in ui.text("main .kv")
    ui.click(".page-header button", "Run")
    ui.type("dialog[open] #param-limit", "5")
    ui.type("dialog[open] #run-tags", "manual")
    ui.click("dialog[open] button[type=submit]", "Run")
    ui.b.wait(lambda: ui.route().startswith("flow-runs/flow-run/"), 10, "the new flow run page")
    run_id = ui.route().split("/")[-1]
    run = api.get(f"/flow_runs/{run_id}")
    assert run["deployment_id"] == dep["id"]
    assert run["parameters"] == {"date": "2024-01-01", "limit": 5}
    assert "manual" in run["tags"]
    ui.wait_ready()
    assert "nightly" in ui.text("main .kv")
    # the list for the deployment holds the manual run, due now; the runs the scheduler made ahead for its
    # schedule are upcoming, on the deployment's page and in the Upcoming view
    scheduled = api.post(
        "/flow_runs/count",
        {
            "deployments": {"id": {"any_": [dep["id"]]}},
            "flow_runs": {"expected_start_time": {"after_": now_utc().isoformat()}},
        },
    )
    assert scheduled >= 1, "the scheduler fills the hourly schedule ahead"
    expected = api.post(
        "/flow_runs/count",
        {
            "deployments": {"id": {"any_": [dep["id"]]}},
            "flow_runs": {"expected_start_time": {"before_": now_utc().isoformat()}},
        },
    )
    ui.open(f"flow-runs?deployment={dep['id']}")
    ui.wait_text(".pager-info", f"of {expected}")
    names = [r[0] for r in ui.rows("main tr.run-row")]
    assert run["name"] in names and len(names) == expected
    ui.open(f"deployments/deployment/{dep['id']}")
    ui.b.wait(lambda: len(ui.rows("#deployment-upcoming tr.run-row")) == min(5, scheduled), 10, "the upcoming runs")
    # pause and resume
    ui.open(f"deployments/deployment/{dep['id']}")
    ui.click(".page-header button", "Pause")
    ui.b.wait(lambda: api.get(f"/deployments/{dep['id']}")["paused"] is True, 10, "paused")
    ui.wait_text(".page-header .actions button", "Resume")
    assert "Paused" in ui.text(".page-header")
    ui.click(".page-header button", "Resume")
    ui.b.wait(lambda: api.get(f"/deployments/{dep['id']}")["paused"] is False, 10, "resumed")
    ui.wait_text(".page-header .actions button", "Pause")


RRULE_SENTENCES = [
    ("FREQ=WEEKLY;BYDAY=MO,WE;BYHOUR=9;BYMINUTE=0", "Every Monday and Wednesday at 09:00, UTC"),
    ("RRULE:FREQ=DAILY;INTERVAL=2;COUNT=10", "Every 2 days, 10 times, UTC"),
    (
        "DTSTART;TZID=America/New_York:20250101T090000\nRRULE:FREQ=MONTHLY;BYDAY=-1FR;BYHOUR=17",
        "Every month on the last Friday at 17:00, America/New_York",
    ),
    ("FREQ=YEARLY;BYMONTH=1,7;BYMONTHDAY=1", "Every year on the 1st in January and July, UTC"),
    (
        "FREQ=DAILY;BYDAY=MO,TU,WE,TH,FR;BYHOUR=6,18;UNTIL=20271231T000000Z",
        "Every weekday (Monday to Friday) at 06:00 and 18:00, until 2027-12-31, UTC",
    ),
    ("FREQ=HOURLY;BYMINUTE=15,45", "Every hour at 15 and 45 minutes past, UTC"),
    ("FREQ=WEEKLY;INTERVAL=2;BYDAY=TU", "Every 2 weeks on Tuesday, UTC"),
    ("FREQ=DAILY;BYSETPOS=1", "RRule \u201cFREQ=DAILY;BYSETPOS=1\u201d, UTC"),  # a part it has no words for
]


def test_rrule_schedules_read_as_sentences(ui, api, data):
    """The flow and deployment pages' schedule sentences, for the RRULE shapes people write; the rest as written."""
    ui.open("flows")
    said = ui.b.execute_async(
        "const done = arguments[arguments.length - 1];"
        "import(document.baseURI + 'js/format.js').then((m) => done(arguments[0].map("
        "(r) => m.describeSchedule({rrule: r, timezone: 'UTC'}))));",
        [rule for rule, _ in RRULE_SENTENCES],
    )
    assert said == [sentence for _, sentence in RRULE_SENTENCES]
    dep = api.post(
        "/deployments/",
        {
            "name": "rrule-dep",
            "flow_id": data["flows"]["daily-etl"]["id"],
            "schedules": [{"schedule": {"rrule": RRULE_SENTENCES[0][0]}}],
        },
    )
    ui.open(f"deployments/deployment/{dep['id']}")
    ui.wait_text("#deployment-schedules .schedule-sentence", RRULE_SENTENCES[0][1])


def test_a_dialog_closes_when_the_page_changes(ui, api, data):
    dep = api.post("/deployments/", {"name": "dialog-dep", "flow_id": data["flows"]["daily-etl"]["id"]})
    # Into the deployment by its link, as a person goes (no page load): Back is then a change of route in the
    # page. (Opened by URL, Back loaded the list as a new document, and under load that navigation could abort
    # the script that asked for it: chromedriver's "timeout ... aborted by navigation".)
    ui.open("deployments")
    ui.click("main table a", "dialog-dep")
    ui.b.wait(lambda: ui.route() == f"deployments/deployment/{dep['id']}", 10, "the deployment page")
    ui.wait_ready()
    ui.click(".page-header button", "Run")
    ui.el("dialog[open]")
    ui.b.execute("history.back()")
    ui.b.wait(lambda: ui.route() == "deployments", 10, "the deployments list")
    ui.b.wait(lambda: not ui.b.execute("return !!document.querySelector('dialog[open]')"), 5, "the dialog to close")


def test_deployment_readiness_and_schedules_in_words(ui, api, data):
    """Ready / Not ready as the server derives it from polls; schedules as sentences with their next five times."""
    pool = api.post("/work_pools/", {"name": "ready-pool", "type": "process"})
    dep = api.post(
        "/deployments/",
        {
            "name": "morning",
            "flow_id": data["flows"]["daily-etl"]["id"],
            "work_pool_name": pool["name"],
            "schedules": [{"schedule": {"cron": "0 6 * * *", "timezone": "Europe/Berlin"}, "active": False}],
        },
    )
    ui.open(f"deployments/deployment/{dep['id']}")
    assert ui.texts(".page-header .deployment-status") == ["Not ready"]
    ui.wait_text("#deployment-schedules .schedule-sentence", "Every day at 06:00, Europe/Berlin")
    shown = ui.b.execute(
        "return [...document.querySelectorAll('#deployment-schedules .next-times time')].map(t => t.dateTime)"
    )
    [expected] = api.get(f"/deployments/{dep['id']}/next_schedule_times?count=5")
    assert shown == expected["times"] and len(shown) == 5
    # a worker polls the pool: the deployment is Ready
    api.post(f"/work_pools/{pool['name']}/get_scheduled_flow_runs", {})
    ui.open(f"deployments/deployment/{dep['id']}")
    assert ui.texts(".page-header .deployment-status") == ["Ready"]
    assert "ago" in ui.b.execute(
        "return document.querySelector('.page-header .deployment-status').title"
    ) or "just now" in ui.b.execute("return document.querySelector('.page-header .deployment-status').title")
    ui.open("deployments")
    assert next(r for r in ui.rows() if r[0] == "morning")[3] == "Ready"


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


def test_work_pool_form_offers_types_and_the_process_template(ui, api, data):
    ui.open("work-pools")
    ui.click(".page-header button", "+ Work pool")
    ui.type("dialog[open] #pool-name", "form-pool")
    assert ui.b.execute("return document.querySelector('#pool-type').value") == "process"
    template = json.loads(ui.b.execute("return document.querySelector('#pool-template').value"))
    assert template["job_configuration"]["command"] == "{{ command }}"
    ui.click("dialog[open] button[type=submit]", "Create")
    ui.b.wait(lambda: api.request("GET", "/work_pools/form-pool")[0] == 200, 10, "the pool")
    pool = api.get("/work_pools/form-pool")
    assert pool["type"] == "process" and pool["base_job_template"] == template
    # another type: no template unless one is pasted; a template that is not JSON is refused in words
    ui.click(".page-header button", "+ Work pool")
    ui.type("dialog[open] #pool-name", "form-docker")
    ui.choose("#pool-type", "Docker")
    assert ui.b.execute("return document.querySelector('#pool-template').value") == ""
    ui.type("dialog[open] #pool-template", "{not json")
    ui.click("dialog[open] button[type=submit]", "Create")
    ui.wait_text("dialog[open] .error-box", "not JSON")
    ui.type("dialog[open] #pool-template", "")
    ui.click("dialog[open] button[type=submit]", "Create")
    ui.b.wait(lambda: api.request("GET", "/work_pools/form-docker")[0] == 200, 10, "the docker pool")
    assert api.get("/work_pools/form-docker")["type"] == "docker"


def test_work_pool_and_its_queues_are_edited_in_the_ui(ui, api, data):
    """A pool's limit and its queues are made, changed and deleted on its page; bad values are named."""
    api.post("/work_pools/", {"name": "queue-pool", "type": "process", "concurrency_limit": 4})
    ui.open("work-pools/work-pool/queue-pool")
    ui.wait_text(".page-header h1", "queue-pool")
    ui.click(".page-header button", "Edit")
    ui.type("dialog[open] #pool-edit-limit", "")
    ui.type("dialog[open] #pool-description", "runs the nightly jobs")
    ui.click("dialog[open] button[type=submit]", "Save")
    ui.wait_text("main .card", "Unlimited")
    pool = api.get("/work_pools/queue-pool")
    assert (pool["concurrency_limit"], pool["description"]) == (None, "runs the nightly jobs")
    # a new queue; a name with a character the API refuses is refused before it is sent
    ui.click("#queues button", "+ Work queue")
    ui.type("dialog[open] #queue-name", "high/priority")
    assert ui.b.execute("return document.querySelector('#queue-name').validity.patternMismatch") is True
    ui.type("dialog[open] #queue-name", "urgent")
    ui.type("dialog[open] #queue-limit", "2")
    ui.click("dialog[open] button[type=submit]", "Create")
    ui.wait_text("#queues tr.queue-row", "urgent")
    queues = {q["name"]: q for q in api.post("/work_pools/queue-pool/queues/filter", {})}
    assert queues["urgent"]["concurrency_limit"] == 2 and queues["urgent"]["priority"] == 2
    # edited: renamed, first in line, no limit
    ui.click("#queues button", "Edit urgent")
    assert ui.el("dialog[open] #queue-priority").prop("value") == "2"
    ui.type("dialog[open] #queue-name", "critical")
    ui.type("dialog[open] #queue-priority", "1")
    ui.type("dialog[open] #queue-limit", "")
    ui.click("dialog[open] button[type=submit]", "Save")
    ui.wait_text("#queues tr.queue-row", "critical")
    queues = {q["name"]: q for q in api.post("/work_pools/queue-pool/queues/filter", {})}
    assert "urgent" not in queues and (queues["critical"]["priority"], queues["critical"]["concurrency_limit"]) == (
        1,
        None,
    )
    # the default queue cannot be deleted, so it offers no Delete
    assert ui.b.execute("return !!document.querySelector('#queues button[aria-label=\"Delete default\"]')") is False
    ui.click("#queues button", "Delete critical")
    ui.confirm("Delete")
    ui.wait_gone("#queues", "critical")
    assert [q["name"] for q in api.post("/work_pools/queue-pool/queues/filter", {})] == ["default"]


def test_names_the_api_refuses_are_explained_before_they_are_sent(ui, api, data):
    """Work pool and global limit names may not hold / % & > <: the form says so under the field and the browser
    refuses such a name with those words, where the API's answer quoted its regular expression."""
    ui.b.console_errors()
    for page, opener, name_css in (
        ("work-pools", (".page-header button", "+ Work pool"), "#pool-name"),
        ("concurrency-limits", ("#global-limits button", "+ Global limit"), "#gcl-name"),
    ):
        ui.open(page)
        ui.click(*opener)
        ui.wait_text("dialog[open] .field", "Any characters except / % & > <")
        ui.type(f"dialog[open] {name_css}", "etl/nightly")
        assert ui.b.execute(f"return document.querySelector('{name_css}').validity.patternMismatch") is True
        # the browser's bubble shows the title beside "Please match the requested format"
        assert ui.el(name_css).prop("title") == "Any characters except / % & > <"
        ui.type(f"dialog[open] {name_css}", "etl nightly")
        assert ui.b.execute(f"return document.querySelector('{name_css}').validity.valid") is True
        ui.click("dialog[open] button", "Cancel")
    assert ui.b.console_errors() == []


# ---------------------------------------------------------------- blocks


def register_block_type(api, slug, name, fields, capabilities=()):
    bt = api.post("/block_types/", {"name": name, "slug": slug})
    schema = api.post(
        "/block_schemas/", {"block_type_id": bt["id"], "fields": fields, "capabilities": list(capabilities)}
    )
    return bt, schema


CREDS_FIELDS = {
    "title": "UiTestCredentials",
    "type": "object",
    "block_type_slug": "ui-test-credentials",
    "properties": {
        "username": {"title": "Username", "type": "string"},
        "password": {"title": "Password", "type": "string", "format": "password", "writeOnly": True},
        "port": {"title": "Port", "type": "integer", "default": 5432},
    },
    "required": ["username", "password"],
    "secret_fields": ["password"],
    "block_schema_references": {},
}


def create_block_in_catalogue(ui, search, slug, name, fields, secret_field) -> str:
    """Find the type in the catalogue, fill its form (`secret_field` is a password input) and create the
    block; its id."""
    ui.open("blocks/catalog")
    ui.type("#catalog-search", search)
    type_name = ui.el(f".catalog-item[data-slug={slug}] h3").text
    ui.click(f".catalog-item[data-slug={slug}] a", "Create")
    ui.wait_text(".page-header h1", f"New {type_name} block")
    ui.wait_ready()
    assert ui.el(f"#block-{secret_field}").prop("type") == "password"
    ui.type("#block-name", name)
    for field, value in fields.items():
        ui.type(f"#block-{field}", value)
    ui.click("main button[type=submit]", "Create block")
    ui.b.wait(lambda: ui.route().startswith("blocks/block/"), 10, "the block page")
    return ui.route().split("/")[-1]


def test_blocks_create_edit_delete_with_masked_secrets(ui, api, data):
    register_block_type(api, "ui-test-credentials", "UI Test Credentials", CREDS_FIELDS)
    fields = {"username": "etl", "password": "hunter2", "port": "6543"}
    block_id = create_block_in_catalogue(ui, "UI Test", "ui-test-credentials", "warehouse-login", fields, "password")
    ui.wait_text(".page-header h1", "warehouse-login")
    ui.wait_ready()
    values = dict(
        ui.b.execute("return [...document.querySelectorAll('.block-value')].map(e => [e.dataset.field, e.innerText])")
    )
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
    ui.open(f"blocks/block/{block_id}")
    ui.click(".page-header button", "Delete")
    ui.confirm("Delete")
    ui.b.wait(lambda: ui.route() == "blocks", 10, "the blocks list")
    assert api.request("GET", f"/block_documents/{block_id}")[0] == 404


def test_the_core_block_types_are_in_the_catalogue_and_make_blocks(ui, api, data):
    """Prefect's core block types are there from the start (no SDK has saved one on this server)."""
    ui.open("blocks/catalog")
    ui.wait_ready()
    shown = set(ui.b.execute("return [...document.querySelectorAll('.catalog-item')].map(e => e.dataset.slug)"))
    assert {"secret", "json", "string", "date-time", "local-file-system", "webhook"} <= shown, shown
    secret_id = create_block_in_catalogue(ui, "Secret", "secret", "warehouse-token", {"value": "tok-3141"}, "value")
    ui.wait_text(".page-header h1", "warehouse-token")
    assert "tok-3141" not in ui.text("body")
    secret = api.get(f"/block_documents/{secret_id}?include_secrets=true")
    assert (secret["block_type"]["slug"], secret["data"]) == ("secret", {"value": "tok-3141"})
    # a JSON block: its value is any JSON, typed as JSON
    ui.open("blocks/catalog/json/create")
    ui.wait_text(".page-header h1", "New JSON block")
    ui.wait_ready()
    ui.type("#block-name", "etl-settings")
    ui.type("#block-value", '{"batch": 500, "regions": ["eu", "us"]}')
    ui.click("main button[type=submit]", "Create block")
    ui.b.wait(lambda: ui.route().startswith("blocks/block/"), 10, "the block page")
    settings = api.get(f"/block_documents/{ui.route().split('/')[-1]}")
    assert settings["data"] == {"value": {"batch": 500, "regions": ["eu", "us"]}}


def test_a_block_name_is_checked_by_the_browser_without_console_errors(ui, api, data):
    """The name's pattern is one the browser compiles (its `v` flag refuses a bare dash in a class)."""
    ui.b.console_errors()  # drained: only this page's errors count
    ui.open("blocks/catalog/string/create")
    ui.wait_text(".page-header h1", "New String block")
    ui.type("#block-name", "Bad Name")
    assert ui.b.execute("return document.querySelector('#block-name').validity.patternMismatch") is True
    ui.type("#block-name", "good-name-2")
    assert ui.b.execute("return document.querySelector('#block-name').validity.valid") is True
    assert ui.b.console_errors() == []


def test_a_refused_block_value_is_named_under_its_field(ui, api, data):
    """Bad JSON in a JSON block's value: the words stand under that field, which is marked invalid."""
    ui.open("blocks/catalog/json/create")
    ui.wait_text(".page-header h1", "New JSON block")
    ui.wait_ready()
    ui.type("#block-name", "bad-settings")
    ui.type("#block-value", '{"batch": 500,}')
    ui.click("main button[type=submit]", "Create block")
    ui.wait_text(".field[data-field=value] .field-error", "Value is not valid JSON")
    assert ui.el("#block-value").prop("ariaInvalid") == "true"
    assert ui.route() == "blocks/catalog/json/create"
    assert not api.post("/block_documents/filter", {"block_documents": {"name": {"any_": ["bad-settings"]}}})
    ui.type("#block-value", '{"batch": 500}')
    ui.click("main button[type=submit]", "Create block")
    ui.b.wait(lambda: ui.route().startswith("blocks/block/"), 10, "the block page")
    api.ok("DELETE", f"/block_documents/{ui.route().split('/')[-1]}")


def test_a_date_time_block_shows_the_format_and_refuses_other_text(ui, api, data):
    ui.open("blocks/catalog/date-time/create")
    ui.wait_text(".page-header h1", "New Date Time block")
    ui.wait_ready()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", ui.el("#block-value").prop("placeholder"))
    ui.type("#block-name", "release-cutoff")
    for bad in ("next friday", "2026-02-30T10:00:00Z", "2026-12-31"):
        ui.type("#block-value", bad)
        ui.click("main button[type=submit]", "Create block")
        ui.wait_text(".field[data-field=value] .field-error", "Value must be a date and time in ISO 8601")
        assert ui.route() == "blocks/catalog/date-time/create", bad
    assert not api.post("/block_documents/filter", {"block_documents": {"name": {"any_": ["release-cutoff"]}}})
    ui.type("#block-value", "2026-12-31T23:59:00+01:00")
    ui.click("main button[type=submit]", "Create block")
    ui.b.wait(lambda: ui.route().startswith("blocks/block/"), 10, "the block page")
    doc = api.get(f"/block_documents/{ui.route().split('/')[-1]}")
    assert doc["data"] == {"value": "2026-12-31T23:59:00+01:00"}
    api.ok("DELETE", f"/block_documents/{doc['id']}")


def test_deleting_a_block_says_what_uses_it(ui, api, data):
    """The server deletes a block's notifications with it, and its automations are left sending to nothing:
    the confirmation says so before anything is deleted."""
    bt = api.get("/block_types/slug/slack-webhook")
    [schema] = api.post("/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [bt["id"]]}}, "limit": 1})
    doc = api.post(
        "/block_documents/",
        {
            "name": "ops-channel",
            "block_type_id": bt["id"],
            "block_schema_id": schema["id"],
            "data": {"url": "https://x.example"},
        },
    )
    policy = api.post(
        "/flow_run_notification_policies/", {"state_names": ["Failed"], "tags": [], "block_document_id": doc["id"]}
    )
    action = {"type": "send-notification", "block_document_id": doc["id"], "subject": "s", "body": "b"}
    trigger = {"type": "event", "posture": "Reactive", "expect": ["prefect.flow-run.Crashed"], "threshold": 1}
    automation = api.post("/automations/", {"name": "ops-page", "trigger": trigger, "actions": [action]})
    ui.open(f"blocks/block/{doc['id']}")
    ui.click(".page-header button", "Delete")
    ui.wait_text("dialog[open]", "1 notification sends to it and will be deleted with it.")
    assert "1 automation sends to it and will fail to." in ui.text("dialog[open]")
    ui.confirm("Cancel")
    assert api.request("GET", f"/block_documents/{doc['id']}")[0] == 200
    api.ok("DELETE", f"/automations/{automation['id']}")
    api.ok("DELETE", f"/flow_run_notification_policies/{policy['id']}")
    ui.open(f"blocks/block/{doc['id']}")
    ui.click(".page-header button", "Delete")
    ui.wait_text("dialog[open]", "Delete the block “ops-channel”?")
    assert "sends to it" not in ui.text("dialog[open]")
    ui.confirm("Delete")
    ui.b.wait(lambda: ui.route() == "blocks", 10, "the blocks list")


def test_a_block_types_description_is_on_its_create_page(ui, api, data):
    """The catalogue cuts a description to one line; the create page says it whole (what the block is for, and
    for a Date Time how to write it)."""
    description = api.get("/block_types/slug/date-time")["description"]
    ui.open("blocks/catalog")
    assert ui.el(".catalog-item[data-slug=date-time] p").prop("title") == description
    ui.open("blocks/catalog/date-time/create")
    ui.wait_text(".page-header .subtitle", description)


def test_a_block_name_taken_is_said_in_words(ui, api, data):
    ui.open("blocks/catalog/string/create")
    ui.wait_text(".page-header h1", "New String block")
    ui.type("#block-name", "region-name")
    ui.type("#block-value", "eu-west")
    ui.click("main button[type=submit]", "Create block")
    ui.b.wait(lambda: ui.route().startswith("blocks/block/"), 10, "the block page")
    first = ui.route().split("/")[-1]
    ui.open("blocks/catalog/string/create")
    ui.wait_text(".page-header h1", "New String block")
    ui.type("#block-name", "region-name")
    ui.type("#block-value", "us-east")
    ui.click("main button[type=submit]", "Create block")
    ui.wait_text("main .error-box", "Block name: a String block named “region-name” already exists")
    assert api.get(f"/block_documents/{first}")["data"] == {"value": "eu-west"}
    api.ok("DELETE", f"/block_documents/{first}")


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


def test_editing_a_json_variable_keeps_its_value_json(ui, api, data):
    """A variable an SDK saved as an object stays an object when only its tags are edited here."""
    api.post("/variables/", {"name": "etl_config", "value": {"batch": 500, "regions": ["eu"]}, "tags": []})
    ui.open("variables")
    ui.click("main button", "Edit etl_config")
    ui.type("dialog[open] #var-tags", "prod")
    ui.click("dialog[open] button[type=submit]", "Save")
    ui.wait_text("main tr.var-row", "prod")
    var = api.get("/variables/name/etl_config")
    assert (var["value"], var["tags"]) == ({"batch": 500, "regions": ["eu"]}, ["prod"])
    # bad JSON is refused in words, and nothing is saved
    ui.click("main button", "Edit etl_config")
    ui.type("dialog[open] #var-value", '{"batch": 5,}')
    ui.click("dialog[open] button[type=submit]", "Save")
    ui.wait_text("dialog[open] .error-box", "Value is not valid JSON")
    ui.click("dialog[open] button", "Cancel")
    assert api.get("/variables/name/etl_config")["value"] == {"batch": 500, "regions": ["eu"]}
    ui.click("main button", "Delete etl_config")
    ui.confirm("Delete")
    ui.wait_gone("main", "etl_config")


def test_an_earlier_error_goes_when_the_browser_refuses_the_form(ui, api, data):
    """The server's 'already exists' from the first try is not left standing when the browser refuses the second
    (a name it finds invalid), where it would read as the answer to that one."""
    api.post("/variables/", {"name": "taken_name", "value": "x", "tags": []})
    ui.open("variables")
    ui.click(".page-header button", "+ Variable")
    ui.type("dialog[open] #var-name", "taken_name")
    ui.click("dialog[open] button[type=submit]", "Create")
    ui.wait_text("dialog[open] .error-box", "already exists")
    ui.type("dialog[open] #var-name", "Taken Name")
    ui.click("dialog[open] button[type=submit]", "Create")
    ui.b.wait(lambda: ui.texts("dialog[open] .error-box") == [], 5, "the earlier error to go")
    assert ui.b.execute("return document.querySelector('#var-name').validity.patternMismatch") is True
    ui.click("dialog[open] button", "Cancel")
    api.ok("DELETE", "/variables/name/taken_name")


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
    api.post(
        "/artifacts/",
        {
            "key": "numbers",
            "type": "table",
            "flow_run_id": main["id"],
            "data": json.dumps([{"a": 1, "b": 2}, {"a": 3, "b": 4}]),
        },
    )
    api.post(
        "/artifacts/",
        {"key": "dash", "type": "link", "flow_run_id": main["id"], "data": "[dashboard](https://dash.example.com/)"},
    )
    ui.open(f"flow-runs/flow-run/{main['id']}?tab=artifacts")
    ui.wait_text("#panel-artifacts h1", "Daily report")
    md = "#panel-artifacts article[data-type=markdown] .markdown"
    assert ui.texts(f"{md} strong") == ["1,234"] and ui.texts(f"{md} em") == ["3 s"]
    assert ui.texts(f"{md} li") == ["extract ok", "load ok"]
    assert ui.rows(f"{md} tbody tr") == [["users", "10"]]
    links = ui.b.execute(
        f"return [...document.querySelectorAll('{md} a')].map(a => [a.innerText, a.getAttribute('href')])"
    )
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
    time.sleep(0.05)  # by design: a later created time, so which one is latest is not a tie
    api.post("/artifacts/", {"key": "summary", "type": "markdown", "data": "**new version**", "flow_run_id": run["id"]})
    ui.open("artifacts")
    ui.wait_text("main .artifact-key", "summary")
    keys = ui.texts("main .artifact-key")
    assert keys.count("summary") == 1
    # open, with the run and its flow named
    ui.wait_text("article[data-key=summary] .markdown strong", "new version")
    head = ui.text("article[data-key=summary] .artifact-head")
    assert "etl-completed-1" in head and "daily-etl" in head
    ui.click("main .segmented button", "All artifacts")
    ui.b.wait(lambda: ui.texts("main .artifact-key").count("summary") == 2, 10, "both versions")
    # the key's own page lists its versions, newest first
    ui.click("article[data-key=summary] a.artifact-key")
    ui.b.wait(lambda: ui.route() == "artifacts/key/summary", 10, "the key's page")
    ui.wait_text(".page-header h1", "summary")
    ui.b.wait(lambda: len(ui.texts("main article.artifact-item")) == 2, 10, "two versions")
    assert "new version" in ui.texts("main article.artifact-item .markdown")[0]


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
    t = api.post(
        "/task_runs/",
        {
            "flow_run_id": data["main"]["id"],
            "task_key": "query",
            "dynamic_key": "0",
            "name": "query-0",
            "tags": ["database"],
            "state": {"type": "PENDING"},
        },
    )
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


def test_a_tag_limit_is_edited_not_overwritten_by_a_second_create(ui, api, data):
    """The API's create of a tag limit replaces one the tag has: the form refuses the tag instead, and Edit
    changes the limit (the slots held stay held)."""
    api.post("/concurrency_limits/", {"tag": "ui-warehouse", "concurrency_limit": 3})
    ui.open("concurrency-limits")
    ui.click("#tag-limits button", "+ Tag limit")
    ui.type("dialog[open] #cl-tag", "ui-warehouse")
    ui.type("dialog[open] #cl-limit", "5")
    ui.click("dialog[open] button[type=submit]", "Create")
    ui.wait_text("dialog[open] .error-box", "Tag “ui-warehouse” already has a limit (3)")
    assert api.get("/concurrency_limits/tag/ui-warehouse")["concurrency_limit"] == 3
    ui.click("dialog[open] button", "Cancel")
    api.post("/concurrency_limits/increment", {"names": ["ui-warehouse"], "task_run_id": str(uuid.uuid4())})
    held = api.get("/concurrency_limits/tag/ui-warehouse")["active_slots"]
    assert len(held) == 1
    ui.click("#tag-limits button", "Edit ui-warehouse")
    assert ui.el("dialog[open] #cl-tag").prop("readOnly") is True
    ui.type("dialog[open] #cl-limit", "7")
    ui.click("dialog[open] button[type=submit]", "Save")
    ui.wait_text("#tag-limits tr.tag-limit-row", "/ 7")
    limit = api.get("/concurrency_limits/tag/ui-warehouse")
    assert (limit["concurrency_limit"], limit["active_slots"]) == (7, held)
    api.ok("DELETE", "/concurrency_limits/tag/ui-warehouse")


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
    return api.post(
        "/block_documents/",
        {
            "name": "my-slack-webhook",
            "block_type_id": bt["id"],
            "block_schema_id": schema["id"],
            "data": {"url": receiver.url + "/hook"},
        },
    )


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
    ui.wait_text(
        "main .policy-sentence",
        "If a run of any flow enters a failed or crashed state, send a notification to my-slack-webhook",
    )
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
    ui.b.wait(
        lambda: ui.b.execute(
            "return !document.querySelector('.new-block .loading') && !!document.querySelector('#newblock-url')"
        ),
        10,
        "the Slack Webhook fields",
    )
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
    p = api.post(
        "/flow_run_notification_policies/", {"state_names": ["Failed"], "tags": [], "block_document_id": webhook["id"]}
    )
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


def automations(api):
    return api.post("/automations/filter", {})


def test_automations_create_fire_pause_edit_delete(ui, api, data, webhook, receiver):
    """The Automations page: a sentence per automation, created with the form; it fires (last fired, the
    action history), pauses, resumes, is edited and deleted, each checked through the API."""
    for a in automations(api):
        api.ok("DELETE", f"/automations/{a['id']}")
    ui.open("automations")
    ui.wait_text("main .empty-state", "No automations yet")
    ui.click(".page-header a", "Create automation")
    ui.b.wait(lambda: ui.route() == "automations/create", 10, "the create page")
    ui.wait_text(".page-header h1", "Create automation")
    ui.type("#auto-name", "page-on-failure")
    ui.type("#auto-tags", "nightly-ui")
    ui.choose("#auto-block", "my-slack-webhook")
    ui.type("#auto-body", "{{ flow_run.name }} is {{ flow_run.state.name }}")
    ui.click("form.automation-form button[type=submit]", "Create automation")
    ui.b.wait(lambda: ui.route() == "automations", 10, "the list again")
    sentence = (
        "When a run of any flow with nightly-ui tag enters a failed state, send a notification to my-slack-webhook"
    )
    ui.wait_text("main .automation-sentence", sentence)
    ui.wait_text("main .automation-last", "Never fired")
    [a] = automations(api)
    assert a["name"] == "page-on-failure" and a["enabled"] is True
    assert a["trigger"]["expect"] == ["prefect.flow-run.Failed"] and a["trigger"]["posture"] == "Reactive"
    assert a["actions"][0]["block_document_id"] == webhook["id"]
    # it fires for a failed run with the tag
    before = len(receiver.messages)
    flow = api.post("/flows/", {"name": "ui-automated"})
    api.post(
        "/flow_runs/",
        {
            "flow_id": flow["id"],
            "name": "ui-failing-run",
            "tags": ["nightly-ui"],
            "state": {"type": "FAILED", "name": "Failed"},
        },
    )
    wait_until(lambda: len(receiver.messages) > before, 15, "the automation's message")
    assert "ui-failing-run is Failed" in receiver.messages[before][1]
    ui.open("automations")
    ui.wait_text("main .automation-last", "Last fired")
    ui.click("main .automation summary", "Action history")
    ui.wait_text("main .automation-history", "completed")
    # pause, resume
    ui.click("main .automation button", "Pause")
    ui.wait_text("main .automation .pill", "Paused")
    assert automations(api)[0]["enabled"] is False
    ui.click("main .automation button", "Resume")
    ui.wait_text("main .automation .pill", "Active")
    assert automations(api)[0]["enabled"] is True
    # edit: crashed runs too, any tag
    ui.click("main .automation a", "Edit")
    ui.b.wait(lambda: ui.route() == f"automations/automation/{a['id']}/edit", 10, "the edit page")
    ui.wait_text(".page-header h1", "Edit automation")
    ui.click("form.automation-form input[value=Crashed]")
    ui.type("#auto-tags", "")
    ui.click("form.automation-form button[type=submit]", "Save automation")
    ui.b.wait(lambda: ui.route() == f"automations/automation/{a['id']}", 10, "the automation's page")
    ui.wait_text(
        "main .automation-sentence",
        "When a run of any flow enters a failed or crashed state, send a notification to my-slack-webhook",
    )
    [a] = automations(api)
    assert a["trigger"]["expect"] == ["prefect.flow-run.Crashed", "prefect.flow-run.Failed"]
    # delete, from its page
    ui.click(".page-header button", "Delete")
    ui.confirm("Delete")
    ui.b.wait(lambda: ui.route() == "automations", 10, "the list after deleting")
    ui.wait_text("main .empty-state", "No automations yet")
    assert automations(api) == []


def page_is_styled(ui):
    """The stylesheet loaded (by its absolute path) and applies."""
    return ui.b.execute(
        "return [...document.styleSheets].some(s => s.href && s.href.endsWith('/css/app.css')"
        " && s.cssRules.length > 0) && getComputedStyle(document.body).margin === '0px'"
    )


def test_an_automation_in_json_is_not_held_back_by_the_hidden_form(ui, api, data):
    """A bad value left in the form part (times: 0) does not stop the JSON part from being saved."""
    ui.open("automations/create")
    ui.wait_text(".page-header h1", "Create automation")
    ui.type("#auto-name", "json-made")
    ui.type("#auto-threshold", "0")
    ui.choose("#auto-mode", "JSON (any trigger and actions)")
    trigger = {"type": "event", "posture": "Reactive", "expect": ["prefect.flow-run.Crashed"], "threshold": 1}
    ui.type("#auto-json", json.dumps({"trigger": trigger, "actions": [{"type": "do-nothing"}]}))
    ui.click("form.automation-form button[type=submit]", "Create automation")
    ui.b.wait(lambda: ui.route() == "automations", 10, "the list again")
    [made] = [a for a in automations(api) if a["name"] == "json-made"]
    assert made["trigger"]["expect"] == ["prefect.flow-run.Crashed"]
    api.ok("DELETE", f"/automations/{made['id']}")


def test_editing_an_automation_whose_block_was_deleted_does_not_pick_another(ui, api, data):
    """Its block gone, the form offers none chosen: saving does not quietly send to the first block listed."""
    bt = api.get("/block_types/slug/slack-webhook")
    [schema] = api.post("/block_schemas/filter", {"block_schemas": {"block_type_id": {"any_": [bt["id"]]}}, "limit": 1})

    def block(name):
        body = {
            "name": name,
            "block_type_id": bt["id"],
            "block_schema_id": schema["id"],
            "data": {"url": "https://x.example"},
        }
        return api.post("/block_documents/", body)

    kept, gone = block("aaa-kept-channel"), block("zzz-gone-channel")
    action = {"type": "send-notification", "block_document_id": gone["id"], "subject": "s", "body": "b"}
    trigger = {"type": "event", "posture": "Reactive", "expect": ["prefect.flow-run.Failed"], "threshold": 1}
    automation = api.post("/automations/", {"name": "orphaned", "trigger": trigger, "actions": [action]})
    api.ok("DELETE", f"/block_documents/{gone['id']}")
    ui.open(f"automations/automation/{automation['id']}/edit")
    ui.wait_text(".page-header h1", "Edit automation")
    assert ui.b.execute("return document.querySelector('#auto-block').value") == ""
    assert "its block was deleted" in ui.b.execute(
        "const s = document.querySelector('#auto-block'); return s.options[s.selectedIndex].textContent"
    )
    ui.type("#auto-name", "orphaned-renamed")
    ui.click("form.automation-form button[type=submit]", "Save automation")
    ui.wait_text("main .error-box", "Send to: pick a block.")
    stored = api.get(f"/automations/{automation['id']}")
    assert (stored["name"], stored["actions"][0]["block_document_id"]) == ("orphaned", gone["id"])
    api.ok("DELETE", f"/automations/{automation['id']}")
    api.ok("DELETE", f"/block_documents/{kept['id']}")


def test_automation_and_event_pages_at_prefects_paths(ui, api, data):
    """Automations and events answer at the paths of Prefect's UI (and of url_for in the 3.x SDK): the list, create,
    an automation and its edit form; the events and one event by its day and id. Each opens styled, showing its
    object; links between them use those paths, and the old hash link of an automation still leads there."""
    auto = api.post(
        "/automations/",
        {
            "name": "paths-automation",
            "description": "",
            "enabled": True,
            "trigger": {
                "type": "event",
                "posture": "Reactive",
                "expect": ["prefect.flow-run.Crashed"],
                "threshold": 1,
                "within": 0,
            },
            "actions": [{"type": "do-nothing"}],
        },
    )
    main = data["main"]
    ev_id = str(uuid.uuid4())
    occurred = now_utc()
    api.ok(
        "POST",
        "/events",
        [
            {
                "id": ev_id,
                "occurred": occurred.isoformat(),
                "event": "ui.paths.happened",
                "resource": {
                    "prefect.resource.id": f"prefect.flow-run.{main['id']}",
                    "prefect.resource.name": main["name"],
                },
                "related": [
                    {
                        "prefect.resource.id": f"prefect.automation.{auto['id']}",
                        "prefect.resource.role": "automation",
                        "prefect.resource.name": "paths-automation",
                    }
                ],
                "payload": {"answer": 42},
            }
        ],
    )
    event_route = f"events/event/{occurred.strftime('%Y-%m-%d')}/{ev_id}"
    try:
        pages = [
            ("automations", "Automations", f"main .automation[data-id='{auto['id']}'] .automation-name a"),
            ("automations/create", "Create automation", "form.automation-form #auto-name"),
            (f"automations/automation/{auto['id']}", "paths-automation", "main .automation-sentence"),
            (f"automations/automation/{auto['id']}/edit", "Edit automation", "form.automation-form #auto-name"),
            ("events", "Events", f"main a.event-link[href$='{ev_id}']"),
            (event_route, "ui.paths.happened", "main .event-resource a"),
        ]
        ui.b.console_errors()
        for route, title, marker in pages:
            ui.open(route)
            ui.b.wait(lambda: ui.texts(".page-header h1") == [title], 10, f"{title!r} as the title of {route}")
            ui.el(marker)
            assert page_is_styled(ui), route
            assert ui.texts("main .error-box") == [], route
            assert ui.texts("#nav a.active") == ["Events" if route.startswith("events") else "Automations"], route
            assert ui.b.console_errors() == [], route
            if route.endswith("/edit"):
                assert ui.b.execute("return document.getElementById('auto-name').value") == "paths-automation"
        # the event's page shows its payload and related automation; its resource links to the flow run
        ui.open(event_route)
        assert '"answer": 42' in ui.text("main")
        ui.click("main tr.related-row a", "paths-automation")
        ui.b.wait(lambda: ui.route() == f"automations/automation/{auto['id']}", 10, "the automation's page")
        # the automation's page lists the event, by Prefect's path
        ui.wait_ready()
        ui.click("main a.event-link", "ui.paths.happened")
        ui.b.wait(lambda: ui.route() == event_route, 10, "the event's page")
        ui.wait_ready()
        ui.click("main .event-resource a", main["name"])
        ui.b.wait(lambda: ui.route() == f"flow-runs/flow-run/{main['id']}", 10, "the event's flow run")
        # from the list: name to page, Edit to the form; the events list to the event
        ui.open("automations")
        ui.click(f"main .automation[data-id='{auto['id']}'] .automation-name a", "paths-automation")
        ui.b.wait(lambda: ui.route() == f"automations/automation/{auto['id']}", 10, "the automation's page")
        ui.open("events")
        ui.click(f"main a.event-link[href$='{ev_id}']")
        ui.b.wait(lambda: ui.route() == event_route, 10, "the event's page from the list")
        # an event that is not there, and a date that is not one, say so
        ui.open(f"events/event/{occurred.strftime('%Y-%m-%d')}/{uuid.uuid4()}")
        assert ui.texts(".page-header h1") == ["Event not found"]
        ui.open(f"events/event/yesterday/{ev_id}")
        assert ui.texts(".page-header h1") == ["Event not found"]
        assert "“yesterday” is not a date" in ui.text("main")
        assert ui.b.console_errors() == []
        # old hash links of the automations page
        for old, route in (
            (f"#/automations/{auto['id']}", f"automations/automation/{auto['id']}"),
            ("#/automations", "automations"),
        ):
            ui.b.get("about:blank")
            ui.b.get(f"{ui.base}/{old}")
            ui.b.wait(lambda: ui.route() == route, 10, f"{old} to lead to {route}")
            ui.wait_ready()
            assert "Page not found" not in ui.text(".page-header")
    finally:
        api.ok("DELETE", f"/automations/{auto['id']}")


def test_notification_delivery_history(ui, api, data, webhook, receiver):
    p = api.post(
        "/flow_run_notification_policies/",
        {"state_names": ["Failed"], "tags": ["history"], "block_document_id": webhook["id"]},
    )
    try:
        run = api.post(
            "/flow_runs/",
            {
                "flow_id": data["flows"]["daily-etl"]["id"],
                "name": "notify-me",
                "tags": ["history"],
                "state": {"type": "RUNNING"},
            },
        )
        set_state(api, run["id"], "FAILED", "it broke", force=True)
        deliveries = lambda: api.get(f"/flow_run_notification_policies/{p['id']}/deliveries")  # noqa: E731
        [sent] = ui.b.wait(deliveries, 20, "the notification to be delivered")
        ui.open("notifications")
        card = f"main .policy[data-id='{p['id']}']"
        ui.wait_text(f"{card} .policy-sentence", "send a notification to my-slack-webhook (Slack Webhook)")
        ui.click(f"{card} details.deliveries summary")
        ui.wait_text(f"{card} tr.delivery-row", "Sent")
        [row] = ui.rows(f"{card} tr.delivery-row")
        assert row[1] == "Failed" and row[2] == "my-slack-webhook (Slack Webhook)" and row[3] == "1"
        ui.click(f"{card} tr.delivery-row a", "Failed")
        ui.b.wait(lambda: ui.route() == f"flow-runs/flow-run/{run['id']}", 10, "the run that was notified about")
        assert sent["status"] == "SENT"
    finally:
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
    ui.open(f"flow-runs/flow-run/{main['id']}?tab=parameters")
    ui.b.refresh()
    ui.wait_ready()
    assert ui.texts(".page-header h1") == ["etl-running"]
    assert json.loads(ui.text("#panel-parameters pre"))["batch_size"] == 500
    titles = {
        "dashboard": "Dashboard",
        "flow-runs": "Flow runs",
        "flows": "Flows",
        "deployments": "Deployments",
        "work-pools": "Work pools",
        "blocks": "Blocks",
        "variables": "Variables",
        "artifacts": "Artifacts",
        "concurrency-limits": "Concurrency limits",
        "notifications": "Notifications",
        "automations": "Automations",
        "events": "Events",
        "about": "About",
    }
    for route, title in titles.items():
        ui.open(route)
        assert ui.texts(".page-header h1") == [title], route
        assert ui.texts("#nav a.active") == [ui.texts(f"#nav a[data-nav='{route}']")[0]]
    ui.b.get(ui.base + "/")
    ui.b.wait(lambda: ui.route() == "dashboard", 10, "the default route")


def all_routes(api, data):
    main = data["main"]
    routes = [
        "dashboard",
        "flow-runs",
        f"flow-runs/flow-run/{main['id']}",
        f"runs/flow-run/{main['id']}?tab=artifacts",
        f"runs/task-run/{data['tasks']['extract']['id']}",
        "flows",
        f"flows/flow/{data['flows']['daily-etl']['id']}",
        "deployments",
        "work-pools",
        "blocks",
        "blocks/catalog",
        "variables",
        "artifacts",
        "concurrency-limits",
        "notifications",
        "automations",
        "automations/create",
        "events",
        "about",
    ]
    for method, path, route_of in (
        ("POST", "/deployments/filter", lambda x: f"deployments/deployment/{x['id']}"),
        ("POST", "/work_pools/filter", lambda x: f"work-pools/work-pool/{x['name']}"),
        ("POST", "/block_documents/filter", lambda x: f"blocks/block/{x['id']}"),
    ):
        status, items = api.request(method, path, {"limit": 1})
        if status == 200 and items:
            routes.append(route_of(items[0]))
    return routes


def test_no_page_requests_anything_outside_the_server(ui, api, data):
    origin = ui.base
    ui.b.console_errors()  # drained: only this test's pages count
    for route in all_routes(api, data):
        ui.open(route)
        time.sleep(0.3)  # by design: requests a page makes late must have had their chance to go out
        urls = ui.b.execute("return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)]")
        outside = [u for u in urls if not u.startswith(origin + "/")]
        assert outside == [], (route, outside)
        assert ui.b.console_errors() == [], route
        assert len(urls) > 4, route  # the page did load its scripts and call the API


def test_narrow_window_layout(ui, api, data):
    try:
        ui.b.set_window_size(400, 850)
        for route in ("dashboard", "flow-runs", f"flow-runs/{data['main']['id']}", "flows"):
            ui.open(route)
            overflow = ui.b.execute(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 1, (route, overflow)
        assert ui.texts("#nav a") == []  # the menu is folded away
        ui.click("button.nav-toggle", "Menu")
        ui.click("#nav a", "Flows")
        ui.b.wait(lambda: ui.route() == "flows", 10, "the flows page")
        ui.wait_ready()
        assert ui.texts(".page-header h1") == ["Flows"]
        assert ui.texts("#nav a") == []
    finally:
        ui.b.set_window_size(1280, 900)


# The open state menu of the flow runs page lies within the screen.
MENU_ON_SCREEN_JS = """
const body = document.querySelector('main details.dropdown[open] .dropdown-body');
return !!body && body.getBoundingClientRect().right <= document.documentElement.clientWidth;
"""

# What a person would call broken on a phone, found by the screenshot review at 390 px: anything drawn past the
# screen's right edge that no scrolling box holds, a tab cut off, a date and time broken over more than two lines.
PHONE_DEFECTS_JS = """
const vw = document.documentElement.clientWidth, out = [];
if (document.documentElement.scrollWidth > window.innerWidth) out.push('page ' + document.documentElement.scrollWidth);
const held = (e) => { for (let p = e.parentElement; p; p = p.parentElement) {
  if (/(auto|scroll|hidden)/.test(getComputedStyle(p).overflowX)
      && p.getBoundingClientRect().right <= vw + 1) return true; }
  return false; };
const name = (e) => e.tagName.toLowerCase()
  + (typeof e.className === 'string' && e.className ? '.' + e.className.trim().split(/ +/).join('.') : '');
for (const e of document.querySelectorAll('main *, dialog *')) {
  const r = e.getBoundingClientRect();
  if (r.width && r.right > vw + 1 && e.checkVisibility() && !held(e)) {
    out.push('past the edge: ' + name(e) + ' ' + Math.round(r.right));
  }
}
for (const t of document.querySelectorAll('.tabs [role=tab]')) {
  const r = t.getBoundingClientRect(), bar = t.parentElement.getBoundingClientRect();
  if (r.width && (r.right > bar.right + 1 || r.left < bar.left - 1)) out.push('tab cut off: ' + t.innerText);
}
for (const t of document.querySelectorAll('main td time')) {
  const lines = Math.round(t.getBoundingClientRect().height / parseFloat(getComputedStyle(t).lineHeight));
  if (lines > 2) { out.push('a time over ' + lines + ' lines: ' + t.innerText.replace(/\\s+/g, ' ')); break; }
}
return out.slice(0, 6);
"""


def test_every_page_fits_a_phone(ui, api, data):
    """At 390x844 (a phone) every page, the run dialog and the open state filter stay on the screen: nothing runs
    past its right edge unless a scrolling box holds it, every tab can be seen, a time breaks only between its date
    and its time."""
    auto = api.post(
        "/automations/",
        {
            "name": "phone-automation",
            "description": "",
            "enabled": True,
            "trigger": {
                "type": "event",
                "posture": "Reactive",
                "expect": ["prefect.flow-run.Failed"],
                "threshold": 1,
                "within": 0,
            },
            "actions": [{"type": "do-nothing"}],
        },
    )
    ev = {
        "id": str(uuid.uuid4()),
        "occurred": now_utc().isoformat(),
        "event": "phone.check",
        "payload": {},
        "resource": {"prefect.resource.id": f"prefect.automation.{auto['id']}", "prefect.resource.name": auto["name"]},
    }
    api.ok("POST", "/events", [ev])
    routes = all_routes(api, data) + [
        f"automations/automation/{auto['id']}",
        f"automations/automation/{auto['id']}/edit",
        f"events/event/{ev['occurred'][:10]}/{ev['id']}",
        f"flow-runs/flow-run/{data['main']['id']}?tab=task-runs",
        "flow-runs?state=Late",
    ]
    try:
        ui.b.set_window_size(390, 844)
        ui.b.wait(lambda: ui.b.execute("return window.innerWidth") == 390, 10, "a 390 px wide viewport")
        found = {}
        for route in routes:
            ui.open(route)
            found[route] = ui.b.execute(PHONE_DEFECTS_JS)
        ui.open("flow-runs")
        ui.click("main details.dropdown summary")
        # The menu moves left to stay on the screen in its `toggle` handler, a task after the click (under load the
        # click's answer came first: the menu was measured unmoved). Measured once it is on, or after 5 s as it is.
        with contextlib.suppress(AssertionError):
            ui.b.wait(lambda: ui.b.execute(MENU_ON_SCREEN_JS), 5, "the open state menu on the screen")
        found["flow-runs, the state filter open"] = ui.b.execute(PHONE_DEFECTS_JS)
        ui.b.execute("document.querySelector('details.dropdown').open = false")
        dep = api.post(
            "/deployments/",
            {
                "name": "phone-dep",
                "flow_id": data["flows"]["daily-etl"]["id"],
                "schedules": [{"schedule": {"cron": "0 6 * * *", "timezone": "Europe/Berlin"}}],
            },
        )
        ui.open(f"deployments/deployment/{dep['id']}")
        ui.click(".page-header button", "Run")
        ui.el("dialog[open]")
        found["the run dialog"] = ui.b.execute(PHONE_DEFECTS_JS)
        assert {route: defects for route, defects in found.items() if defects} == {}
    finally:
        ui.b.set_window_size(1280, 900)
        api.ok("DELETE", f"/automations/{auto['id']}")


def test_times_are_shown_in_the_browser_time_zone(ui, api, data):
    assert ui.b.execute("return new Date().getTimezoneOffset()") == -330  # the browser is at UTC+05:30
    run = data["runs"]["etl-completed-1"]
    ui.open(f"flow-runs/flow-run/{run['id']}")
    shown = ui.b.execute("return document.querySelector('main .kv time').innerText")
    utc = datetime.datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00"))
    local = utc.astimezone(datetime.timezone(datetime.timedelta(hours=5, minutes=30)))
    assert local.strftime(":%M:%S") in shown, (shown, local)
    assert str(int(local.strftime("%I"))) + local.strftime(":%M:%S") in shown or local.strftime("%H:%M:%S") in shown, (
        shown,
        local,
    )


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


@pytest.mark.parametrize(
    "route, text",
    [
        ("deployments", "No deployments yet"),
        ("work-pools", "No work pools"),
        ("blocks", "No blocks yet"),
        ("variables", "No variables yet"),
        ("artifacts", "No artifacts yet"),
        ("concurrency-limits", "No tag limits"),
        ("notifications", "No notifications yet"),
    ],
)
def test_empty_states_of_the_other_lists(browser, empty_server, route, text):
    api = Api(empty_server)
    path = {
        "deployments": "/deployments/filter",
        "work-pools": "/work_pools/filter",
        "blocks": "/block_documents/filter",
        "variables": "/variables/filter",
        "artifacts": "/artifacts/latest/filter",
        "concurrency-limits": "/concurrency_limits/filter",
        "notifications": "/flow_run_notification_policies/filter",
    }[route]
    assert api.ok("POST", path, {}) == []  # the list the page reads is there, and empty
    ui = UI(browser, empty_server[: -len("/api")])
    ui.open(route)
    ui.wait_text("main .empty-state", text)
    assert ui.texts("main .error-box") == []


def test_an_automation_to_run_a_deployment_on_a_server_without_one(browser, empty_server):
    ui = UI(browser, empty_server[: -len("/api")])
    ui.open("automations/create")
    ui.wait_text(".page-header h1", "Create automation")
    ui.type("#auto-name", "rerun")
    ui.choose("#auto-action", "Run a deployment")
    ui.click("form.automation-form button[type=submit]", "Create automation")
    ui.wait_text("main .error-box", "There is no deployment to run yet")
    assert "uuid" not in ui.text("main .error-box")
    assert Api(empty_server).post("/automations/filter", {}) == []


def test_ui_works_with_basic_auth(browser, tmp_path):
    """With PREFECT_SERVER_API_AUTH_STRING the browser asks for a login once and the UI keeps working."""
    with prefectlite.serve(
        database=f"sqlite:///{tmp_path}/auth.db", port=0, PREFECT_SERVER_API_AUTH_STRING="me:s3cret"
    ) as api_url:
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
        ui.open(f"flows/flow/{flow['id']}")
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
            req = urllib.request.Request(
                upstream + self.path[len("/prefix") :],
                data=body,
                method=self.command,
                headers={k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")},
            )
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
        prefixed.open(f"flow-runs/flow-run/{data['main']['id']}")
        assert prefixed.texts(".page-header h1") == ["etl-running"]
        prefixed.open("flow-runs?q=etl-comp")
        prefixed.wait_text(".pager-info", "of 3")
        urls = ui.b.execute("return performance.getEntriesByType('resource').map(e => new URL(e.name).pathname)")
        assert urls and all(u.startswith("/prefix/") for u in urls), urls
    finally:
        proxy.shutdown()
        proxy.server_close()


# ---------------------------------------------------------------- every link the SDKs and the CLI print

SDK_LINKS_SCRIPT = """
import sys

from prefect import flow, task
from prefect.runtime import flow_run as current_flow_run, task_run as current_task_run

suffix = sys.argv[1]


@task
def double(x: int) -> int:
    url = getattr(current_task_run, "ui_url", None)  # 3.x only
    if url:
        print(f"task run link: {url}", flush=True)
    return x * 2


@flow(name=f"linked-flow-{suffix}")
def linked(x: int = 1):
    print(f"flow run link: {current_flow_run.ui_url}", flush=True)
    return double(double(x))


if __name__ == "__main__":
    mode = sys.argv[2]
    if mode == "run":
        linked()
    elif mode == "serve":
        linked.serve(name="linked-dep")
    elif mode == "objects":  # links the 3.x SDK makes (url_for) for objects no command prints
        from prefect.blocks.system import Secret
        from prefect.client.orchestration import get_client
        from prefect.utilities.urls import url_for
        doc_id = Secret(value="not-shown").save(f"linked-secret-{suffix}", overwrite=True)
        print("block link:", url_for("block-document", obj_id=doc_id))
        with get_client(sync_client=True) as client:
            limit_id = client.create_concurrency_limit(tag=f"linked-{suffix}", concurrency_limit=2)
            print("limit link:", url_for("concurrency-limit", obj_id=limit_id))
            queue = client.read_work_queue_by_name("default", work_pool_name=f"linked-pool-{suffix}")
            print("queue link:", url_for("work-queue", obj_id=queue.id))
"""


def sdk_pythons():
    """The Prefect SDK venvs of tests/compat (2.20, 3.9); skipped (failed under PREFECTLITE_REQUIRE_COMPAT=1)
    when one cannot be built."""
    sys.path.insert(0, str(HERE / "compat"))
    import prefect3_venv
    import prefect_venv

    pythons = {}
    for sdk, ensure in (("2.20", prefect_venv.ensure_prefect_venv), ("3.9", prefect3_venv.ensure_prefect3_venv)):
        try:
            pythons[sdk] = ensure()
        except Exception as exc:  # noqa: BLE001 - no SDK, nothing to collect links from
            if os.environ.get("PREFECTLITE_REQUIRE_COMPAT") == "1":
                pytest.fail(f"cannot build the prefect {sdk} venv: {exc}")
            pytest.skip(f"cannot build the prefect {sdk} venv: {exc}")
    return pythons


def collect_printed_links(python, api_url, home, suffix, script):
    """Everything a new user does that makes the SDK or the `prefect` CLI print a UI link; the output."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env.update(PREFECT_API_URL=api_url, PREFECT_HOME=str(home), COLUMNS="400", PYTHONUNBUFFERED="1")
    prefect = str(Path(python).parent / "prefect")
    out = []

    def run(*cmd):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=Path(script).parent)
        assert proc.returncode == 0, (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
        out.append(proc.stdout + proc.stderr)

    run(python, script, suffix, "run")
    run(prefect, "work-pool", "create", f"linked-pool-{suffix}", "--type", "process")
    run(prefect, "block", "create", "slack-webhook")
    # flow.serve prints its deployment's link, then serves until stopped
    serve = subprocess.Popen(
        [python, script, suffix, "serve"],
        env=env,
        cwd=Path(script).parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        served = []
        deadline = time.monotonic() + 120
        for line in serve.stdout:  # ends when the process does
            served.append(line)
            if "/deployments/deployment/" in line or time.monotonic() > deadline:
                break
        out.append("".join(served))
        assert any("/deployments/deployment/" in line for line in served), "".join(served)[-3000:]
    finally:
        serve.terminate()
        try:
            serve.wait(20)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait(5)
    run(prefect, "deployment", "run", f"linked-flow-{suffix}/linked-dep")
    if suffix == "39":
        run(python, script, suffix, "objects")
    return "\n".join(out)


def expected_page(api, route):
    """What the page of a printed link must show (its h1 and a CSS selector of the object), from the API."""
    kind, _, key = route.rpartition("/")
    if kind in ("flow-runs/flow-run", "runs/flow-run"):
        return api.get(f"/flow_runs/{key}")["name"], None
    if kind in ("flow-runs/task-run", "runs/task-run"):
        return api.get(f"/task_runs/{key}")["name"], None
    if kind == "deployments/deployment":
        return api.get(f"/deployments/{key}")["name"], None
    if kind == "work-pools/work-pool":
        return api.get(f"/work_pools/{urllib.parse.quote(key)}")["name"], None
    if kind == "work-queues/work-queue":
        return api.get(f"/work_queues/{key}")["work_pool_name"], None
    if kind == "blocks/block":
        return api.get(f"/block_documents/{key}")["name"], None
    if kind == "concurrency-limits/concurrency-limit":
        return "Concurrency limits", "tr.selected"
    if route.startswith("blocks/catalog/") and route.endswith("/create"):
        return f"New {api.get('/block_types/slug/' + route.split('/')[2])['name']} block", None
    if route == "deployments":
        return "Deployments", None
    raise AssertionError(f"a printed link of an unknown shape: {route}")


def test_every_link_the_sdks_and_cli_print_opens_its_page(browser, tmp_path):
    pythons = sdk_pythons()
    script = tmp_path / "sdk_links.py"
    script.write_text(SDK_LINKS_SCRIPT)
    with prefectlite.serve(database=f"sqlite:///{tmp_path}/links.db", port=0) as api_url:
        root = api_url[: -len("/api")]
        printed = ""
        for sdk, python in pythons.items():
            home = tmp_path / f"home-{sdk}"
            home.mkdir()
            printed += collect_printed_links(python, api_url, home, sdk.replace(".", ""), str(script))
        # the SDKs derive the UI's address from PREFECT_API_URL by dropping /api: this server's root
        links = sorted(set(re.findall(re.escape(root) + r"/[^\s\[\]\"'<>]*[^\s\[\]\"'<>.,)]", printed)))
        routes = [link[len(root) + 1 :] for link in links]
        shapes = {re.sub(r"/[^/]+$", "/*", r) for r in routes}
        assert {
            "flow-runs/flow-run/*",
            "runs/flow-run/*",
            "runs/task-run/*",
            "deployments/deployment/*",
            "work-pools/work-pool/*",
            "blocks/catalog/slack-webhook/*",
            "blocks/block/*",
            "concurrency-limits/concurrency-limit/*",
            "work-queues/work-queue/*",
        } <= shapes, shapes
        api = Api(api_url)
        ui = UI(browser, root)
        for link, route in zip(links, routes):
            title, marker = expected_page(api, route)
            browser.get("about:blank")
            browser.get(link)
            ui.wait_ready()
            ui.b.wait(lambda: ui.texts(".page-header h1") == [title], 10, f"{title!r} as the title of {link}")
            styled = ui.b.execute(
                "return [...document.styleSheets].some(s => s.href && s.href.endsWith('/css/app.css')"
                " && s.cssRules.length > 0) && getComputedStyle(document.body).margin === '0px'"
            )
            assert styled, link
            assert ui.texts("main .error-box") == [], link
            assert browser.console_errors() == [], link
            if marker:
                ui.el(marker)
