"""A pytest plugin that points Prefect's own test suite (2.20 or 3.x) at an external server (tests/conformance).

Loaded with `-p prefect_suite_plugin` into the pytest of the Prefect test venv (never into ours), by run.py.
It needs that venv's `prefect` and `pytest`; the rest is the standard library.

What it changes in Prefect's suite, and why:
- After Prefect's `pytest_sessionstart` has entered its test profile (which sets `PREFECT_API_URL` to None, so
  every client would talk to an in-process app), it sets `PREFECT_API_URL` to the server under test: every
  client, flow, task and CLI call of the suite then goes over HTTP to that server.
- It replaces four of the suite's fixtures by registering, after Prefect's `tests/conftest.py`, a second
  fixture module under a conftest name in the same directory (pytest lets the last one registered for a
  directory win): `clear_db` empties the server through its REST API before each test, `hosted_api_server`
  answers the server's URL instead of starting Prefect's, `safety_check_settings` no longer insists that
  no API URL is set, and `setup_db`/`database_engine` no longer build Prefect's local database.
- It skips the tests that need Prefect's own database session or in-process app (they would read or write
  a database our server never sees): those using the fixtures `session`, `client`, `app` (directly or through
  the ORM-built object fixtures such as `flow_run` or `deployment`, which all take `session`), or `db`.
- It writes each test's outcome, one JSON object a line, to $PREFECTLITE_CONFORMANCE_RESULTS.
- Under Prefect 3 (whose SDK reports task runs only as events): the suite's `events_pipeline` fixtures record
  events in memory and feed them to Prefect's in-process task-run recorder; the overrides forward them over
  the WebSocket /api/events/in of the server under test instead, then wait (with a deadline) until the server
  shows each task run in the state of its latest event, as the in-process recorder would have on return.

- It deselects the tests named in $PREFECTLITE_CONFORMANCE_DONE (one node id a line): run.py resumes a run
  that died or hung that way, without the tests already run.

Environment: PREFECTLITE_CONFORMANCE_API_URL (http://127.0.0.1:PORT/api; under pytest-xdist one per worker,
comma-separated), PREFECTLITE_CONFORMANCE_RESULTS,
PREFECTLITE_CONFORMANCE_DONE (optional).
"""

from __future__ import annotations

import json
import os
import re
import sys
import types
from pathlib import Path

import pytest

API_URL_VAR = "PREFECTLITE_CONFORMANCE_API_URL"
RESULTS_VAR = "PREFECTLITE_CONFORMANCE_RESULTS"
DONE_VAR = "PREFECTLITE_CONFORMANCE_DONE"

# Fixtures that hand a test Prefect's own database or in-process app. `client` is the suite's ASGI client
# of an in-process app (`prefect_client` is the SDK's client and goes over HTTP).
IN_PROCESS_FIXTURES = frozenset(
    {
        "session",
        "app",
        "client",
        "client_with_unprotected_block_api",
        "client_without_exceptions",
        "get_server_session",
        "print_query",
    }
)
# The suite's autouse session fixtures that build Prefect's (unused, local) database: every test has them
# and `db` in its closure, harmlessly; any other fixture or a test itself taking `db` uses that database.
DB_SETUP_FIXTURES = frozenset({"db", "database_engine", "setup_db", "clear_db"})

# Some tests are parametrized with the API URL, so their node ids hold the server's port: the results name
# it 127.0.0.1:PORT, for ids that stay the same from run to run. Others are parametrized with a path inside the
# suite's scratch copy (2.20's runner/test_webserver.py): the results name the copy's root ROOTDIR.
_LOOPBACK_PORT = re.compile(r"127\.0\.0\.1:\d+")
ROOTDIR_TOKEN = "ROOTDIR"
_ROOTDIR = [os.path.realpath(os.getcwd())]  # the copy run.py starts pytest in; pytest_configure says for sure


def stable_id(nodeid: str) -> str:
    return _LOOPBACK_PORT.sub("127.0.0.1:PORT", nodeid).replace(_ROOTDIR[0], ROOTDIR_TOKEN)


_SETTINGS_CONTEXT = None  # kept referenced: the context manager must outlive pytest_sessionstart


def api_url() -> str:
    """The server under test; with pytest-xdist, one server per worker (the variable lists them, comma-separated):
    a test emptying its server then cannot empty another worker's under a running test."""
    urls = [url.strip().rstrip("/") for url in os.environ.get(API_URL_VAR, "").split(",") if url.strip()]
    if not urls:
        raise pytest.UsageError(f"{API_URL_VAR} must name the server under test (http://127.0.0.1:PORT/api)")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    return urls[int(worker[2:]) % len(urls)] if worker[2:].isdigit() else urls[0]


# --------------------------------------------------------------------------- session set-up


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session):
    """After Prefect's conftest entered its test profile: aim it at the server, replace its fixtures."""
    global _SETTINGS_CONTEXT
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _SETTINGS_CONTEXT = temporary_settings(updates={PREFECT_API_URL: api_url()})
    _SETTINGS_CONTEXT.__enter__()
    _register_fixture_overrides(session.config)


def _register_fixture_overrides(config) -> None:
    """Register the overriding fixtures as if they were a second conftest.py in the suite's tests/ directory.

    pytest scopes a plugin's fixtures by its name when that name ends in "conftest.py"; fixtures of the same
    directory registered later override earlier ones, so these take precedence over Prefect's conftest.py.
    """
    tests_dir = Path(config.rootpath) / "tests"
    module = types.ModuleType("prefectlite_fixture_overrides")
    module.clear_db = _clear_db_fixture()
    module.hosted_api_server = _hosted_api_server_fixture()
    module.safety_check_settings = _safety_check_settings_fixture()
    module.database_engine = _database_engine_fixture()
    module.setup_db = _setup_db_fixture()
    if _prefect_major() >= 3:
        module.events_pipeline = _events_pipeline_fixture()
        module.emitting_events_pipeline = _emitting_events_pipeline_fixture()
    fixture_manager = config.pluginmanager.get_plugin("funcmanage")
    if hasattr(fixture_manager, "_pending_conftests"):
        # pytest >= 9.1 defers a conftest's fixtures until its directory is collected, one conftest per
        # directory: a second one registered for tests/ would replace Prefect's. They are added after it there.
        global _DEFERRED_OVERRIDES
        _DEFERRED_OVERRIDES = (tests_dir, module)
    else:
        config.pluginmanager.register(module, name=str(tests_dir / "prefectlite_overrides_conftest.py"))


_DEFERRED_OVERRIDES = None  # (directory, fixture module) for pytest >= 9.1


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(collector):
    """Outermost wrapper: by the time this resumes, pytest has parsed the directory's conftest (pytest >= 9.1),
    so fixtures parsed now for the same directory come later and take precedence."""
    report = yield
    if _DEFERRED_OVERRIDES is not None and isinstance(collector, pytest.Directory):
        directory, module = _DEFERRED_OVERRIDES
        if collector.path == directory:
            collector.session._fixturemanager.parsefactories(holder=module, node=collector)
    return report


# The fixtures are built by functions so that they exist only in the overriding module (a fixture at this
# plugin's top level would be registered globally under its own name as well).


def _clear_db_fixture():
    @pytest.fixture(autouse=True, name="clear_db")
    def clear_db(request):
        """Empty the server through its REST API before each test marked clear_db, as Prefect's conftest does."""
        if "clear_db" in request.keywords:
            empty_server(api_url())
        yield

    return clear_db


def _hosted_api_server_fixture():
    @pytest.fixture(scope="session", name="hosted_api_server")
    def hosted_api_server():
        return api_url()

    return hosted_api_server


def _safety_check_settings_fixture():
    @pytest.fixture(scope="session", autouse=True, name="safety_check_settings")
    def safety_check_settings():
        """Prefect's asserts that no API URL is set: here one is, on purpose."""
        yield

    return safety_check_settings


def _database_engine_fixture():
    @pytest.fixture(scope="session", autouse=True, name="database_engine")
    def database_engine():
        """No engine on Prefect's local database: the tests that would use it are skipped."""
        yield None

    return database_engine


def _setup_db_fixture():
    @pytest.fixture(scope="session", autouse=True, name="setup_db")
    def setup_db():
        """Prefect's runs its migrations on a local SQLite file (tens of seconds) that no remaining test reads."""
        yield

    return setup_db


def _prefect_major() -> int:
    import prefect

    return int(prefect.__version__.split(".")[0])


# --------------------------------------------------------------------------- Prefect 3: events to the server

TASK_RUN_EVENT = "prefect.task-run."
TASK_RUN_RESOURCE = "prefect.task-run."
RECORD_TIMEOUT = 10.0  # seconds the server gets to show a forwarded task run's state (Prefect's own default)
RECORD_POLL = 0.05


def _events_pipeline_fixture():
    @pytest.fixture(name="events_pipeline")
    async def events_pipeline(asserting_events_worker):
        """Prefect's fixture hands the worker's in-memory events to its in-process recorder: here, to the server."""
        yield _forwarding_pipeline(asserting_events_worker, forward=True)

    return events_pipeline


def _emitting_events_pipeline_fixture():
    @pytest.fixture(name="emitting_events_pipeline")
    async def emitting_events_pipeline(asserting_and_emitting_events_worker):
        """This worker's client has already sent its events to the server: only wait for them to be recorded."""
        yield _forwarding_pipeline(asserting_and_emitting_events_worker, forward=False)

    return emitting_events_pipeline


def _forwarding_pipeline(worker, forward: bool):
    import asyncio

    from prefect._internal.compatibility.async_dispatch import async_dispatch
    from prefect.utilities.asyncutils import run_coro_as_sync

    class ForwardingEventsPipeline:
        """What the suite calls on Prefect's EventsPipeline (process_events), done against the server under test."""

        async def aprocess_events(self, dequeue_events: bool = True, min_events: int = 0, timeout: int = 10):
            if min_events:
                deadline = asyncio.get_running_loop().time() + timeout
                while len(worker._client.events) < min_events:
                    if asyncio.get_running_loop().time() > deadline:
                        raise TimeoutError(
                            f"Timed out waiting for {min_events} events after {timeout} seconds. "
                            f"Only observed {len(worker._client.events)} events."
                        )
                    await asyncio.sleep(0.1)
            else:
                worker.wait_until_empty()
            events = worker._client.pop_events() if dequeue_events else list(worker._client.events)
            if forward:
                await send_events(events)
            await wait_until_recorded(events)

        @async_dispatch(aprocess_events)
        def process_events(self, dequeue_events: bool = True, min_events: int = 0, timeout: int = 10):
            return run_coro_as_sync(
                self.aprocess_events(dequeue_events=dequeue_events, min_events=min_events, timeout=timeout)
            )

    return ForwardingEventsPipeline()


async def send_events(events: list) -> None:
    """Over /api/events/in with Prefect's own client; its checkpoint after the last one confirms receipt."""
    if not events:
        return
    from prefect.events.clients import PrefectEventsClient

    async with PrefectEventsClient(api_url=api_url(), checkpoint_every=len(events)) as client:
        for event in events:
            await client.emit(event)


def latest_task_run_states(events: list) -> dict:
    """{task run id: the state name of its latest (by occurrence) task-run event}."""
    latest = {}
    for event in events:
        resource_id = event.resource.get("prefect.resource.id", "")
        if event.event.startswith(TASK_RUN_EVENT) and resource_id.startswith(TASK_RUN_RESOURCE):
            run_id = resource_id[len(TASK_RUN_RESOURCE) :]
            if run_id not in latest or event.occurred >= latest[run_id][0]:
                latest[run_id] = (event.occurred, event.event[len(TASK_RUN_EVENT) :])
    return {run_id: name for run_id, (_, name) in latest.items()}


async def wait_until_recorded(events: list) -> None:
    """Poll GET /task_runs/{id} until each shows its latest event's state name, or RECORD_TIMEOUT passes (then
    the test goes on and asserts what it asserts)."""
    import asyncio
    import http.client
    import urllib.parse

    pending = latest_task_run_states(events)
    if not pending:
        return
    parts = urllib.parse.urlsplit(api_url())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECORD_TIMEOUT
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        while pending and loop.time() < deadline:
            for run_id, name in list(pending.items()):
                status, run = await loop.run_in_executor(
                    None, _request, conn, "GET", f"{parts.path}/task_runs/{run_id}"
                )
                if status == 200 and isinstance(run, dict) and (run.get("state") or {}).get("name") == name:
                    del pending[run_id]
            if pending:
                await asyncio.sleep(RECORD_POLL)
    finally:
        conn.close()


# --------------------------------------------------------------------------- emptying the server

# (filter path, id path template, id field) in deletion order: runs before flows, pools before their queues,
# documents before schemas before types. Deleting what the server refuses (protected block types, a pool's
# default queue) is ignored, as is a route a server does not serve (404/405).
RESOURCES = (
    ("/deployments/filter", "/deployments/{}", "id"),
    ("/flow_runs/filter", "/flow_runs/{}", "id"),
    ("/task_runs/filter", "/task_runs/{}", "id"),
    ("/flows/filter", "/flows/{}", "id"),
    ("/work_pools/filter", "/work_pools/{}", "name"),
    ("/work_queues/filter", "/work_queues/{}", "id"),
    ("/agents/filter", "/agents/{}", "id"),
    ("/block_documents/filter", "/block_documents/{}", "id"),
    ("/block_schemas/filter", "/block_schemas/{}", "id"),
    ("/block_types/filter", "/block_types/{}", "id"),
    ("/concurrency_limits/filter", "/concurrency_limits/{}", "id"),
    ("/v2/concurrency_limits/filter", "/v2/concurrency_limits/{}", "id"),
    ("/variables/filter", "/variables/{}", "id"),
    ("/artifacts/filter", "/artifacts/{}", "id"),
    ("/automations/filter", "/automations/{}", "id"),
    ("/saved_searches/filter", "/saved_searches/{}", "id"),
    ("/flow_run_notification_policies/filter", "/flow_run_notification_policies/{}", "id"),
)
PAGE = 200
MAX_PASSES = 20  # pages per resource: a server that keeps answering objects it refuses to delete must not loop


def empty_server(base_url: str) -> None:
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        for filter_path, item_path, key in RESOURCES:
            _empty_resource(conn, parts.path, filter_path, item_path, key)
    finally:
        conn.close()


def _empty_resource(conn, prefix: str, filter_path: str, item_path: str, key: str) -> None:
    for _ in range(MAX_PASSES):
        status, items = _request(conn, "POST", prefix + filter_path, {"limit": PAGE, "offset": 0})
        if status != 200 or not isinstance(items, list) or not items:
            return
        deleted = 0
        for item in items:
            status, _body = _request(conn, "DELETE", prefix + item_path.format(item[key]))
            deleted += status in (200, 202, 204, 404)
        if deleted == 0:  # all of them protected: nothing more can go
            return


def _request(conn, method: str, path: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    try:
        return resp.status, json.loads(raw) if raw else None
    except ValueError:
        return resp.status, None


# --------------------------------------------------------------------------- which tests can run


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    deselect_done(config, items)
    for item in items:
        reason = needs_prefects_database(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"prefectlite conformance: {reason}"))


def deselect_done(config, items) -> None:
    path = os.environ.get(DONE_VAR)
    if not path or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        done = {line.strip() for line in f if line.strip()}
    dropped = [item for item in items if stable_id(item.nodeid) in done]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if stable_id(item.nodeid) not in done]


def needs_prefects_database(item) -> str | None:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    closure = set(info.names_closure)
    in_process = sorted(closure & IN_PROCESS_FIXTURES)
    if in_process:
        return f"uses Prefect's own database or app (fixture {in_process[0]})"
    for name in ("db", "database_engine"):
        if name in info.argnames:
            return f"uses Prefect's own database (fixture {name})"
    for name in closure - DB_SETUP_FIXTURES:
        for fixturedef in info.name2fixturedefs.get(name, ())[-1:]:
            if "db" in fixturedef.argnames:
                return f"uses Prefect's own database (fixture {name} takes db)"
    return None


# --------------------------------------------------------------------------- outcomes


class ResultWriter:
    """One JSON object per finished test: node id, outcome (passed, failed, error, skipped, xfailed), seconds."""

    def __init__(self, path: str):
        self.file = open(path, "a", encoding="utf-8")
        self.outcomes = {}
        self.messages = {}
        self.durations = {}

    def started(self, nodeid: str) -> None:
        """A line before each test: if the run dies or hangs in it, run.py knows which test that was."""
        self.file.write(json.dumps({"nodeid": stable_id(nodeid), "started": True}) + "\n")
        self.file.flush()

    def record(self, report) -> None:
        nodeid = report.nodeid
        self.durations[nodeid] = self.durations.get(nodeid, 0.0) + report.duration
        if report.when == "call":
            if hasattr(report, "wasxfail"):
                outcome = "xfailed" if report.skipped else "failed"
            else:
                outcome = report.outcome
            self.outcomes[nodeid] = outcome
        elif report.failed:
            self.outcomes[nodeid] = "error"
        elif report.skipped and nodeid not in self.outcomes:
            self.outcomes[nodeid] = "skipped"
        if report.failed and nodeid not in self.messages:
            self.messages[nodeid] = _first_lines(report)
        if report.when == "teardown":
            self._write(nodeid)

    def _write(self, nodeid: str) -> None:
        entry = {
            "nodeid": stable_id(nodeid),
            "outcome": self.outcomes.pop(nodeid, "error"),
            "seconds": round(self.durations.pop(nodeid, 0.0), 3),
        }
        message = self.messages.pop(nodeid, None)
        if message:
            entry["message"] = message
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()  # a killed run still leaves every finished test's outcome


def _first_lines(report, limit: int = 600) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return text[:limit]


_WRITER = None


def pytest_configure(config):
    global _WRITER
    _ROOTDIR[0] = str(config.rootpath)
    path = os.environ.get(RESULTS_VAR)
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: its controller records every worker's reports
        return
    if path and _WRITER is None:
        _WRITER = ResultWriter(path)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """A last line: pytest has finished. Threads a test left behind can keep the process from exiting for
    good (a run against Prefect's server did, after its summary); run.py stops it then, with this status."""
    if _WRITER is not None:
        _WRITER.file.write(json.dumps({"session_finished": True, "exitstatus": int(exitstatus)}) + "\n")
        _WRITER.file.flush()


def pytest_runtest_logstart(nodeid, location):
    if _WRITER is not None:
        _WRITER.started(nodeid)


def pytest_runtest_logreport(report):
    if _WRITER is not None:
        _WRITER.record(report)


if __name__ == "__main__":
    sys.exit("this is a pytest plugin for Prefect's own test suite: see tests/conformance/run.py")
