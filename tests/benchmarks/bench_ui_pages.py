"""Time-to-data of every UI page in headless Chromium, on a database seeded by seed_ui_scale.py.

    python tests/benchmarks/bench_ui_pages.py /tmp/scale.db [--rounds 3] [--target-ms 500]

Starts prefectlite on the database (a free loopback port), then opens each page with a full load and measures,
in the page, the milliseconds from navigation start until the page shows its data: the page's content is in
place and nothing in it is still loading (the same condition the UI tests wait for). Prints one line per page
(median and worst of the rounds) and whether each is within the target. Also checks that no API call of any
page asks for more than a page of objects (every filter call carries a limit of at most 200).
Needs chromium and chromedriver (as tests/test_ui.py does).
"""

import argparse
import json
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))
import prefectlite  # noqa: E402
from webdriver import Browser, _call  # noqa: E402

# Resolves with ms since navigation start once the page has its data (checked every animation frame).
READY_SCRIPT = """
const done = arguments[arguments.length - 1];
const ready = () => !!document.querySelector('main .page > *')
  && !document.querySelector('main .loading, main [aria-busy=true]');
const check = () => (ready() ? done(performance.now()) : requestAnimationFrame(check));
check();
"""
# Records every API call's body (installed before the page's own scripts run).
RECORD_FETCH = """
window.__calls = [];
const f = window.fetch;
window.fetch = (url, init) => { window.__calls.push([String(url), init && init.body || null]); return f(url, init); };
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_ids(db_path):
    con = sqlite3.connect(db_path)
    one = lambda sql: (con.execute(sql).fetchone() or [None])[0]  # noqa: E731
    ids = {
        "flow": one("SELECT id FROM flow ORDER BY name LIMIT 1"),
        "deployment": one("SELECT id FROM deployment ORDER BY name LIMIT 1"),
        "flow_run": one("SELECT flow_run_id FROM task_run ORDER BY expected_start_time DESC LIMIT 1"),
        "task_run": one("SELECT task_run_id FROM log WHERE task_run_id IS NOT NULL ORDER BY timestamp DESC LIMIT 1"),
    }
    con.close()
    return ids


def pages(ids):
    return [
        ("dashboard", "dashboard"),
        ("flow runs", "flow-runs"),
        ("failed runs", "flow-runs?state=Failed"),
        ("late runs, 7 days", "flow-runs?range=7d&state=Late"),
        ("upcoming", "flow-runs/upcoming"),
        ("flows", "flows"),
        ("flow", f"flows/flow/{ids['flow']}"),
        ("deployments", "deployments"),
        ("deployment", f"deployments/deployment/{ids['deployment']}"),
        ("flow run", f"flow-runs/flow-run/{ids['flow_run']}"),
        ("flow run, task runs", f"flow-runs/flow-run/{ids['flow_run']}?tab=task-runs"),
        ("task run", f"runs/task-run/{ids['task_run']}"),
        ("work pools", "work-pools"),
        ("blocks", "blocks"),
        ("variables", "variables"),
        ("artifacts", "artifacts"),
        ("concurrency", "concurrency-limits"),
        ("notifications", "notifications"),
        ("automations", "automations"),
        ("events", "events"),
    ]


def start_chromedriver(tmp):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        raise SystemExit("needs chromium and chromedriver")
    port = free_port()
    proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/status", timeout=2) as r:
                if json.loads(r.read())["value"].get("ready"):
                    return proc, Browser(url, binary=chromium, user_data_dir=str(Path(tmp) / "profile"))
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("chromedriver did not start")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("database", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--target-ms", type=float, default=500.0)
    args = parser.parse_args(argv)
    ids = sample_ids(args.database)
    con = sqlite3.connect(args.database)
    tables = ("flow_run", "task_run", "log")
    sizes = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}  # noqa: S608
    con.close()
    print(
        f"database {args.database}: {sizes['flow_run']:,} flow runs, {sizes['task_run']:,} task runs, "
        f"{sizes['log']:,} log lines"
    )
    with (
        tempfile.TemporaryDirectory() as tmp,
        prefectlite.serve(
            database=f"sqlite:///{args.database}", port=0, PREFECT_API_SERVICES_SCHEDULER_ENABLED=False
        ) as api_url,
    ):
        root = api_url[: -len("/api")]
        driver, browser = start_chromedriver(tmp)
        try:
            # every later page records its API calls from its first script on
            _call(
                "POST",
                f"{browser.url}/goog/cdp/execute",
                {"cmd": "Page.addScriptToEvaluateOnNewDocument", "params": {"source": RECORD_FETCH}},
            )
            over = []
            unbounded = []
            for label, route in pages(ids):
                times = []
                for _ in range(args.rounds):
                    browser.get("about:blank")
                    browser.get(f"{root}/{route}")
                    times.append(browser.execute_async(READY_SCRIPT))
                calls = browser.execute("return window.__calls || []") or []
                for url, body in calls:
                    data = json.loads(body) if body else {}
                    if url.endswith("/filter") and not (isinstance(data.get("limit"), int) and data["limit"] <= 200):
                        unbounded.append((route, url, data.get("limit")))
                median, worst = statistics.median(times), max(times)
                ok = median <= args.target_ms
                if not ok:
                    over.append(label)
                print(
                    f"{label:24s} median {median:7.0f} ms   worst {worst:7.0f} ms   "
                    f"{'ok' if ok else 'OVER ' + str(int(args.target_ms))}",
                    flush=True,
                )
            print(f"{len(over)} page(s) over {args.target_ms:.0f} ms" + (f": {', '.join(over)}" if over else ""))
            print(
                "every filter call carries a limit of at most 200" if not unbounded else f"unbounded calls: {unbounded}"
            )
        finally:
            browser.quit()
            driver.terminate()
            driver.wait(10)


if __name__ == "__main__":
    main()
