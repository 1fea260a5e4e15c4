#!/usr/bin/env python3
"""prefectlite: a self-hosted workflow-orchestration server that speaks the Prefect 2 REST API.

One module, Python >= 3.11 standard library only. Point the unmodified ``prefect`` SDK at it with
``PREFECT_API_URL=http://127.0.0.1:4200/api``. Storage is SQLite (file or in-memory) or PostgreSQL.
Prefect 3 SDKs work too: they report task runs as events over a WebSocket (sections 11 and 23).

The module reads top to bottom; ``grep -n '^# --- ' prefectlite.py`` prints this map:

  1. Settings        -- setting names, defaults, profiles.toml, precedence env > profile > default
  2. Database        -- one small interface over sqlite3 / a DB-API PostgreSQL driver: transactions, dialects
                        as data, each database's hooks, one driver-error mapper
  3. SQLite          -- the writer and readers, PRAGMAs, the WAL checkpointer, backups that finish
  4. PostgreSQL      -- the bounded connection pool, the socket watchdog, opening a database from its URL
  5. Migrations      -- versioned hand-written SQL in migrations/, applied up and down
  6. Schemas         -- declarative body schemas: validation, defaults, 422 details, OpenAPI
  7. Calendar        -- interval, cron and RRULE schedules: validation and fire times (uses nothing later)
  8. Records         -- rows <-> API objects, the filter language, sorting
  9. Orchestration   -- states and the rules that accept, reject, delay or abort a proposed state; concurrency
                        slots and leases
 10. Runs            -- flows, flow runs, task runs, inputs, logs, graphs and history, retention
 11. Events          -- Prefect 3 events: storage and queries, the task-run recorder, flow-run state events
 12. Resources       -- configuration, blocks, variables, artifacts, concurrency limits, saved searches,
                        work pools, queues and workers
 13. Deployments     -- deployments, their schedules, the runs the scheduler makes from them
 14. Notifications   -- flow run notification policies, the durable queue, the senders
 15. Templates       -- the safe renderer of the Jinja subset automation actions are written in
 16. Automations     -- automations: tables, validation, API operations, history
 17. Triggers and actions -- triggers evaluated as events are stored; what a firing does
 18. Services        -- background loops: scheduler, late runs, pause expirations, cancellation
                        clean-up, notification sender, retention, event retention, automations; each
                        pass is handed its time by the App's clock (App.clock), so a test picks it
 19. HTTP API        -- Request, bodies, HTTPError, the read cache; the handlers of runs, logs and events
 20. Resource handlers -- the handlers of blocks, variables, artifacts, concurrency limits, saved searches
 21. Deployment and work handlers -- deployments, schedules, work pools, queues, workers, notification
                        policies, automations
 22. Routes          -- metrics, the route table, route matching, the one place that turns errors into
                        HTTP answers, the OpenAPI document
 23. WebSockets      -- RFC 6455 framing; /api/events/in, /api/events/out, /api/logs/out and the task
                        workers' /api/task_runs/subscriptions/scheduled for Prefect 3 clients
 24. Server          -- the App, access control, static UI, answering one parsed request
 25. Connections     -- the event loop that owns every socket: strict HTTP/1.1, deadlines, WebSocket
                        frames, and the bounded pool of worker threads that do the database work
 26. Serving         -- start and stop a server, ``serve()``, several processes on one port,
                        ``prefect_test_harness()`` and the pytest plugin (``-p prefectlite``) for test suites
 27. CLI             -- start, config, profile, database, deployment, flow-run, work-pool, notification
 28. Main
"""

from __future__ import annotations

import argparse
import base64
import bisect
import calendar
import collections
import contextlib
import contextvars
import csv
import dataclasses
import datetime as _dt
import difflib
import email.utils
import errno
import functools
import gzip
import hashlib
import http
import http.client
import io
import itertools
import json
import logging
import math
import mimetypes
import os
import queue
import random
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import string
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zoneinfo
from pathlib import Path

__version__ = "0.1.0"
API_VERSION = "0.8.4"  # the API version Prefect 2.20 clients send in X-PREFECT-API-VERSION
PREFECT_SERVER_VERSION = "2.20.27"  # what /admin/version reports: the Prefect 2 server release we emulate
# What a Prefect 3 client's version check (GET /admin/version) is told when it does not name its own
# version: the 3.x release our conformance suite runs. The check refuses a server of another major.
PREFECT3_SERVER_VERSION = "3.9.1"

__all__ = [
    "serve",
    "main",
    "Settings",
    "load_settings",
    "open_database",
    "migrate",
    "__version__",
    "API_VERSION",
]

log = logging.getLogger("prefectlite")
sql_log = logging.getLogger("prefectlite.sql")  # PREFECT_API_DATABASE_ECHO: every statement, at INFO
REQUEST_ID = contextvars.ContextVar("request_id", default=None)  # the API request a log line belongs to


# --- 1. Settings ---
# Owns every setting's name, default and meaning, the profiles file and precedence. Names are
# Prefect's so that the seed's commands (`config set PREFECT_API_DATABASE_CONNECTION_URL=...`) work.


class ConfigurationError(Exception):
    """A problem a person must fix (bad setting, bad URL, unreachable database): one line, no traceback."""


@dataclasses.dataclass(frozen=True)
class SettingSpec:
    name: str
    default: object
    kind: type  # str, int, float or bool
    help: str
    secret: bool = False
    minimum: float | None = None  # the smallest value that makes sense (a number setting); None: any
    maximum: float | None = None
    choices: tuple[str, ...] | None = None  # the values a text setting may take (in any case); None: any


def _spec(name, default, kind, help, secret=False, minimum=None, maximum=None, choices=None):
    return SettingSpec(name, default, kind, help, secret, minimum, maximum, choices)


_A_DAY, _A_YEAR, _A_CENTURY = 86_400, 31_536_000, 3.2e9  # seconds: the longest times settings may name

# fmt: off
SETTINGS = {
    s.name: s
    for s in [
        _spec("PREFECT_HOME", "~/.prefectlite", str, "where profiles.toml and the default database live"),
        _spec("PREFECT_API_URL", "", str, "the API URL clients use; also our public URL for links when set"),
        _spec("PREFECT_API_DATABASE_CONNECTION_URL", "sqlite:///${PREFECT_HOME}/prefectlite.db", str,
              "sqlite:///path, sqlite:///:memory: or postgresql://user:pw@host:port/db"),
        _spec("PREFECT_API_DATABASE_ECHO", False, bool, "log every SQL statement"),
        _spec("PREFECT_API_DATABASE_MIGRATE_ON_START", True, bool, "apply pending migrations on start"),
        _spec("PREFECT_API_DATABASE_PASSWORD", "", str, "password for a database URL that has none", secret=True),
        _spec("PREFECT_API_DATABASE_TIMEOUT", 10.0, float,
              "seconds to wait for a busy or unreachable database (on PostgreSQL, also for a free connection)",
              minimum=0, maximum=_A_DAY),
        # PostgreSQL: each server process holds at most POOL_SIZE + MAX_OVERFLOW connections, POOL_SIZE when idle
        _spec("PREFECT_API_DATABASE_POOL_SIZE", 5, int,
              "PostgreSQL connections a server process keeps open while idle (per process of --processes)",
              minimum=1, maximum=10_000),
        _spec("PREFECT_API_DATABASE_MAX_OVERFLOW", 10, int,
              "PostgreSQL connections a server process may open beyond POOL_SIZE under load, closed when idle",
              minimum=0, maximum=10_000),
        _spec("PREFECT_API_DATABASE_SQLITE_SYNCHRONOUS", "normal", str,
              "normal: a commit survives a crash of the server (kill -9), not of the machine; full: also a power "
              "loss or OS crash, at about a quarter fewer writes per second", choices=("normal", "full")),
        _spec("PREFECT_SERVER_API_HOST", "127.0.0.1", str, "address to bind"),
        _spec("PREFECT_SERVER_API_PORT", 4200, int, "port to bind (0: any free port)", minimum=0, maximum=65535),
        _spec("PREFECT_SERVER_API_AUTH_STRING", "", str, "user:password for HTTP basic auth", secret=True),
        _spec("PREFECT_SERVER_CSRF_PROTECTION_ENABLED", False, bool, "require CSRF tokens on writes"),
        _spec("PREFECT_SERVER_CSRF_TOKEN_EXPIRATION", 3600.0, float, "seconds a CSRF token lives",
              minimum=1, maximum=_A_CENTURY),
        _spec("PREFECT_SERVER_CORS_ALLOWED_ORIGINS", "*", str, "comma-separated origins allowed by CORS"),
        _spec("PREFECT_SERVER_CORS_ALLOWED_METHODS", "*", str, "comma-separated methods allowed by CORS"),
        _spec("PREFECT_SERVER_CORS_ALLOWED_HEADERS", "*", str, "comma-separated headers allowed by CORS"),
        _spec("PREFECT_SERVER_WORKERS", 64, int, "threads that answer requests (connections that wait hold none)",
              minimum=1, maximum=10_000),
        _spec("PREFECT_SERVER_PROCESSES", 1, int, "processes serving the API on one port (more use more cores; POSIX)",
              minimum=1, maximum=64),
        _spec("PREFECT_SERVER_MAX_BODY_BYTES", 50_000_000, int, "largest request body accepted (413 above)",
              minimum=1, maximum=2 ** 31 - 1),
        _spec("PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES", 1_500_000, int,
              "largest WebSocket message (one event) accepted; a bigger one closes the socket with 1009",
              minimum=1, maximum=2 ** 31 - 1),
        _spec("PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED", False, bool,
              "send /api/logs/out subscribers the matching logs stored from then on (with ..._PUBLISHING_ENABLED)"),
        _spec("PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED", False, bool,
              "hand each log stored to the log stream, which ..._OUT_ENABLED sends on (both off: nothing sent)"),
        _spec("PREFECT_SERVER_EVENTS_RETENTION_DAYS", 7.0, float, "days events are kept (0: forever); task runs stay",
              minimum=0, maximum=36_500),
        _spec("PREFECT_SERVER_REQUEST_TIMEOUT", 30.0, float, "seconds a client may take to send a request",
              minimum=0.01, maximum=_A_DAY),
        _spec("PREFECT_SERVER_KEEPALIVE_TIMEOUT", 15.0, float, "seconds an idle keep-alive connection is kept",
              minimum=0.01, maximum=_A_DAY),
        _spec("PREFECT_API_DEFAULT_LIMIT", 200, int, "default and largest page size of filter routes",
              minimum=1, maximum=100_000),
        _spec("PREFECT_SERVER_READ_CACHE_SECONDS", 2.0, float,
              "seconds an answer of a run listing, count or history may be reused for the same request while this "
              "server wrote nothing (0: off); bounds how stale it is when another replica wrote",
              minimum=0, maximum=_A_DAY),
        _spec("PREFECT_LOGGING_SERVER_LEVEL", "WARNING", str, "server log level",
              choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
        _spec("PREFECT_UI_ENABLED", True, bool, "serve the web UI at /"),
        _spec("PREFECT_UI_API_URL", "", str, "API URL the UI calls (default: /api on the same origin)"),
        _spec("PREFECT_UI_SERVE_BASE", "/", str, "path prefix the UI is served under"),
        _spec("PREFECT_UI_URL", "", str, "public URL of the UI, for links in notifications"),
        _spec("PREFECT_API_SERVICES_SCHEDULER_ENABLED", True, bool, "create runs for deployment schedules"),
        _spec("PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS", 60.0, float, "seconds between scheduler passes",
              minimum=0.01, maximum=_A_YEAR),
        _spec("PREFECT_API_SERVICES_SCHEDULER_MIN_RUNS", 3, int, "runs kept scheduled ahead per schedule, at least",
              minimum=0, maximum=100_000),
        _spec("PREFECT_API_SERVICES_SCHEDULER_MAX_RUNS", 100, int, "runs kept scheduled ahead per schedule, at most",
              minimum=0, maximum=100_000),
        _spec("PREFECT_API_SERVICES_SCHEDULER_MIN_SCHEDULED_TIME", 3600.0, float, "seconds scheduled ahead, at least",
              minimum=0, maximum=_A_CENTURY),
        _spec("PREFECT_API_SERVICES_SCHEDULER_MAX_SCHEDULED_TIME", 8_640_000.0, float,
              "seconds scheduled ahead, at most", minimum=0, maximum=_A_CENTURY),
        _spec("PREFECT_API_SERVICES_LATE_RUNS_ENABLED", True, bool, "mark overdue scheduled runs Late"),
        _spec("PREFECT_API_SERVICES_LATE_RUNS_LOOP_SECONDS", 5.0, float, "seconds between late-run passes",
              minimum=0.01, maximum=_A_YEAR),
        _spec("PREFECT_API_SERVICES_LATE_RUNS_AFTER_SECONDS", 15.0, float,
              "a scheduled run is Late this long after its time", minimum=0, maximum=_A_CENTURY),
        _spec("PREFECT_API_SERVICES_FOREMAN_DEPLOYMENT_LAST_POLLED_TIMEOUT_SECONDS", 60.0, float,
              "a deployment not polled for this long is NOT_READY", minimum=0.01, maximum=_A_CENTURY),
        _spec("PREFECT_API_SERVICES_PAUSE_EXPIRATIONS_LOOP_SECONDS", 5.0, float, "seconds between pause-timeout passes",
              minimum=0.01, maximum=_A_YEAR),
        _spec("PREFECT_API_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS", 20.0, float,
              "seconds between cancellation clean-ups", minimum=0.01, maximum=_A_YEAR),
        _spec("PREFECT_TASK_RUN_TAG_CONCURRENCY_SLOT_WAIT_SECONDS", 30, int,
              "seconds a task run waiting for a tag's concurrency slot is told to wait", minimum=0, maximum=_A_YEAR),
        _spec("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", 30.0, float,
              "seconds a deployment's run that found no concurrency slot is put back (AwaitingConcurrencySlot)",
              minimum=0, maximum=_A_YEAR),
        _spec("PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_ENABLED", True, bool, "send flow run notifications"),
        _spec("PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_LOOP_SECONDS", 2.0, float,
              "seconds between queue checks (the sender is also woken by each state change)",
              minimum=0.01, maximum=_A_YEAR),
        _spec("PREFECT_API_SERVICES_TRIGGERS_ENABLED", True, bool, "run automations' actions and proactive triggers"),
        _spec("PREFECT_API_SERVICES_TRIGGERS_LOOP_SECONDS", 5.0, float,
              "longest sleep of the automations service (woken by each firing and each window's end)",
              minimum=0.01, maximum=_A_YEAR),
        _spec("PREFECT_NOTIFICATIONS_MAX_ATTEMPTS", 5, int, "sending attempts before a notification is kept as FAILED",
              minimum=1, maximum=100),
        _spec("PREFECT_NOTIFICATIONS_RETRY_SECONDS", 2.0, float, "first retry delay; doubles with each attempt",
              minimum=0, maximum=_A_DAY),
        _spec("PREFECT_NOTIFICATIONS_TIMEOUT", 10.0, float, "seconds to wait for a destination to answer",
              minimum=0.01, maximum=3600),
        _spec("PREFECT_NOTIFICATIONS_OPSGENIE_URL", "", str, "Opsgenie API base URL (default by region)"),
        _spec("PREFECT_NOTIFICATIONS_PAGERDUTY_URL", "", str, "PagerDuty Events API base URL (default by region)"),
        _spec("PREFECT_NOTIFICATIONS_TWILIO_URL", "", str, "Twilio API base URL"),
        _spec("PREFECT_SERVER_SERVICES_RETENTION_ENABLED", False, bool, "delete old terminal flow runs"),
        _spec("PREFECT_SERVER_SERVICES_RETENTION_DAYS", 30.0, float, "age (days after they ended) at which runs go",
              minimum=0, maximum=36_500),
        _spec("PREFECT_SERVER_SERVICES_RETENTION_BATCH_SIZE", 200, int, "flow runs deleted per transaction",
              minimum=1, maximum=100_000),
        _spec("PREFECT_SERVER_SERVICES_RETENTION_LOOP_SECONDS", 3600.0, float, "seconds between retention passes",
              minimum=0.01, maximum=_A_YEAR),
        _spec("PREFECT_SERVER_METRICS_ENABLED", False, bool, "serve Prometheus metrics at /api/metrics"),
        _spec("PREFECT_LOGGING_SERVER_FORMAT", "text", str, "server log format: text or json (one object per line)",
              choices=("text", "json")),
    ]
}
# fmt: on

_SETTING_SOURCES = ("env", "profile", "default")


def _prefect_home(env=None) -> Path:
    env = os.environ if env is None else env
    return Path(os.path.expanduser(env.get("PREFECT_HOME") or SETTINGS["PREFECT_HOME"].default))


def _profiles_path(home: Path) -> Path:
    return home / "profiles.toml"


def _parse_bool(name, text):
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ConfigurationError(f"{name}: expected true or false, got {text!r}")


def _plain_number(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def _convert_setting(name, raw):
    spec = SETTINGS[name]
    if spec.kind is bool:
        return raw if isinstance(raw, bool) else _parse_bool(name, raw)
    if spec.choices is not None:
        choice = next((c for c in spec.choices if c.lower() == str(raw).strip().lower()), None)
        if choice is None:
            raise ConfigurationError(f"{name}: must be one of {', '.join(spec.choices)}, got {raw!r}")
        return choice
    try:
        value = spec.kind(raw)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name}: expected {spec.kind.__name__}, got {raw!r}") from None
    if spec.kind is float and not math.isfinite(value):
        raise ConfigurationError(f"{name}: expected a finite number, got {raw!r}")
    if spec.minimum is not None and value < spec.minimum:
        raise ConfigurationError(f"{name}: must be at least {_plain_number(spec.minimum)}, got {raw!r}")
    if spec.maximum is not None and value > spec.maximum:
        raise ConfigurationError(f"{name}: must be at most {_plain_number(spec.maximum)}, got {raw!r}")
    return value


def check_setting_name(name: str) -> None:
    if name not in SETTINGS:
        close = difflib.get_close_matches(name.upper(), SETTINGS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigurationError(f"unknown setting {name!r}{hint}")


def read_profiles(home: Path) -> dict:
    """Return {"active": name, "profiles": {name: {KEY: value}}}; a missing file is one empty 'default'."""
    path = _profiles_path(home)
    if not path.exists():
        return {"active": "default", "profiles": {"default": {}}}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None
    profiles = {name: dict(values) for name, values in (data.get("profiles") or {}).items()}
    profiles.setdefault("default", {})
    return {"active": data.get("active", "default"), "profiles": profiles}


def _toml_string(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_profiles(home: Path, data: dict) -> None:
    lines = [f"active = {_toml_string(data['active'])}", ""]
    for name, values in data["profiles"].items():
        lines.append(f"[profiles.{json.dumps(name)}]")
        lines += [f"{key} = {_toml_string(val)}" for key, val in sorted(values.items())]
        lines.append("")
    path = _profiles_path(home)
    try:
        home.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".toml.tmp")
        tmp.write_text("\n".join(lines), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a crash never leaves half a profiles file
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror or exc}") from None


class Settings:
    """Resolved settings: values plus where each came from (env, profile or default)."""

    def __init__(self, values: dict, sources: dict, profile: str):
        self._values = values
        self.sources = sources
        self.profile = profile

    def __getitem__(self, name):
        return self._values[name]

    def get(self, name, default=None):
        return self._values.get(name, default)

    def items(self):
        return self._values.items()

    def masked(self) -> dict:
        """Every value, secrets replaced, for /admin/settings and `config view`."""
        out = {}
        for name, value in self._values.items():
            if SETTINGS[name].secret and value:
                value = "********"
            elif name == "PREFECT_API_DATABASE_CONNECTION_URL":
                value = mask_url_password(value)
            out[name] = value
        return out


def load_settings(env=None, overrides=None) -> Settings:
    """Resolve every setting: explicit overrides > environment > active profile > default."""
    env = dict(os.environ if env is None else env)
    home = _prefect_home(env)
    profiles = read_profiles(home)
    active = env.get("PREFECT_PROFILE") or profiles["active"]
    profile_values = profiles["profiles"].get(active, {})
    values, sources = {}, {}
    for name, spec in SETTINGS.items():
        if overrides and name in overrides:
            values[name], sources[name] = _convert_setting(name, overrides[name]), "override"
        elif name in env and env[name] != "":
            values[name], sources[name] = _convert_setting(name, env[name]), "env"
        elif name in profile_values:
            values[name], sources[name] = _convert_setting(name, profile_values[name]), "profile"
        else:
            values[name], sources[name] = spec.default, "default"
    values["PREFECT_HOME"] = str(home)
    sources["PREFECT_HOME"] = "env" if env.get("PREFECT_HOME") else "default"  # never a profile: it holds them
    values["PREFECT_API_DATABASE_CONNECTION_URL"] = values["PREFECT_API_DATABASE_CONNECTION_URL"].replace(
        "${PREFECT_HOME}", str(home)
    )
    return Settings(values, sources, active)


def mask_url_password(url: str) -> str:
    """The URL with its password shown as ********. The password is everything between the first ':' of
    the user info and the last '@' (a password may hold '@' and ':', as `postgres:p@ss:w@host/db`); a
    URL without user info (sqlite:///path) or with an empty password is shown as it is."""
    text = str(url)
    scheme, sep, rest = text.partition("://")
    at = rest.rfind("@")
    colon = rest.find(":", 0, max(at, 0))
    if not sep or rest.startswith("/") or at < 0 or colon < 0 or colon + 1 == at:
        return text
    return f"{scheme}://{rest[: colon + 1]}********{rest[at:]}"


# --- 2. Database ---
# Owns what every database has: transactions, the SQL lexer, and the hooks a database's writes call
# (DatabaseHooks: each Database its own); sections 3 and 4 are the two kinds. Dialect differences are data
# (class attributes of SqliteDatabase / PostgresDatabase); driver errors become our own exceptions, in one
# place (Database.driver_errors):
# DatabaseUnavailable (busy, locked, unreachable: the API answers 503 and the SDK retries) and
# IntegrityViolation (a unique or foreign key constraint: the API answers 409).


class DatabaseError(Exception):
    pass


class DatabaseUnavailable(DatabaseError):
    """Transient: the database is busy or unreachable. Never 'database is locked' to a client."""


class IntegrityViolation(DatabaseError):
    pass


class DataRejected(DatabaseError):
    """The database refused a value (too long, out of range, a NUL character): the client's input, a 422."""


def _dict_row(cursor, row):
    return {col[0]: value for col, value in zip(cursor.description, row)}


# What a placeholder, a `%` or a `;` means depends on where it is: the pieces of SQL text that are not plain
# code (quoted text, "identifiers", -- and /* */ comments, $tag$ dollar quotes $tag$, each whole, unterminated
# ones to the end) and the three characters outside them. One lexer, for both uses below.
_SQL_LEXEME = re.compile(
    r"""'(?:[^']+|'')*'?|"(?:[^"]+|"")*"?|--[^\n]*|/\*[\s\S]*?(?:\*/|\Z)"""
    r"""|(\$\w*\$)[\s\S]*?(?:\1|\Z)|[?%;]"""
)


def translate_placeholders(sql: str, style: str = "%s") -> str:
    """Turn qmark `?` placeholders into `style`, skipping quoted text and comments; escape `%`.

    Never a blind replace: '?' inside 'a string', "an identifier", a -- comment, a /* comment */ or a
    $$dollar quote$$ is left alone.
    """

    def translated(lexeme: re.Match) -> str:
        text = lexeme.group()
        return style if text == "?" else text.replace("%", "%%")

    return _SQL_LEXEME.sub(translated, sql)


def split_sql_script(script: str) -> list[str]:
    """Split a migration script into statements at top-level semicolons (quotes and comments respected)."""
    statements, start = [], 0
    for lexeme in _SQL_LEXEME.finditer(script):
        if lexeme.group() == ";":
            statements.append(script[start : lexeme.start()])
            start = lexeme.end()
    statements.append(script[start:])
    return [s.strip() for s in statements if re.sub(r"--[^\n]*", "", s).strip()]


class Transaction:
    """One open transaction: run statements, get rows back as dicts."""

    def __init__(self, db, conn):
        self.db = db
        self.conn = conn
        self.after_commit: list = []  # callables run once the transaction has committed
        self.memo: dict = {}  # rows read in this transaction by code that would otherwise read them twice

    def execute(self, sql, params=()):
        cur = self.db._execute(self.conn, sql, params)
        return cur

    def query(self, sql, params=()) -> list[dict]:
        cur = self.db._execute(self.conn, sql, params)
        return cur.fetchall()

    def query_one(self, sql, params=()):
        cur = self.db._execute(self.conn, sql, params)
        return cur.fetchone()

    def scalar(self, sql, params=()):
        row = self.query_one(sql, params)
        return None if row is None else next(iter(row.values()))

    def executemany(self, sql, rows):
        return self.db._executemany(self.conn, sql, rows)


class DatabaseHooks:
    """What a database's committed writes call beyond the database, owned by that Database (reached as
    tx.db.hooks): two servers in one process each have their own, so neither wakes nor feeds the other.

    state_listeners: functions(tx, kind, run, initial, state), called in the transaction that records a state
    event_sinks: callables(events), given the events a transaction stored once it commits (live feeds)
    log_sinks: callables(logs), given the logs a transaction stored once it commits (the live log stream)
    notification_wakers: callables run once a transaction has queued a notification (wake the sender)
    stored_event_listeners: functions(tx, events), called in the transaction that stores new events
    automation_wakers: callables run once a transaction has queued an automation's action (wake the actor)
    """

    domain_state_listeners: tuple = ()  # what every database calls on a state: set once by the domain
    domain_stored_event_listeners: tuple = ()  # what every database calls on new events: set by automations

    def __init__(self):
        self.state_listeners: list = list(self.domain_state_listeners)
        self.stored_event_listeners: list = list(self.domain_stored_event_listeners)
        self.event_sinks: list = []
        self.log_sinks: list = []
        self.notification_wakers: list = []
        self.automation_wakers: list = []


def _run_after_commit(tx: Transaction):
    for callback in tx.after_commit:
        try:
            callback()
        except Exception:  # noqa: BLE001 - the commit stands; a failed hook is only logged
            log.exception("after-commit hook failed")


class _DriverErrors:
    """A `with` block in which the driver's errors become ours (the database's _map_error). One way to
    chain: `from` the driver's error, so a traceback still shows what the driver said. An error that maps
    to nothing goes up as it is, or as `unmapped` (with its first line) where no driver error may get out.
    A class, not a generator: every statement runs inside one (0.2 µs here against a generator's 0.9)."""

    __slots__ = ("db", "unmapped")

    def __init__(self, db, unmapped: type | None = None):
        self.db = db
        self.unmapped = unmapped

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if exc is None or not isinstance(exc, self.db.driver_error):
            return False
        mapped = self.db._map_error(exc)
        if mapped is None and self.unmapped is not None:
            mapped = self.unmapped(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        if mapped is None:
            return False
        raise mapped from exc


class Database:
    """What every dialect shares. Subclasses set the dialect data and the connection handling."""

    dialect = "?"
    ilike = "LIKE"  # case-insensitive LIKE
    for_update = ""  # row lock on a SELECT inside a write transaction
    skip_locked = ""  # claim rows another transaction holds? skip them
    json_array_contains = ""  # SQL for "JSON array column {col} contains the value ?"
    json_text = ""  # SQL for "the text of one key of JSON object column {col}", the key path being a parameter
    json_label_path = ""  # that parameter for the key {label}
    migration_lock = ""  # statement that serialises migrations across processes
    seconds_between = ""  # SQL for the seconds from timestamp text {b} to {a}
    greatest = ""  # SQL for the larger of two numbers {a} and {b}
    round6 = ""  # SQL for the number {x} rounded to 6 decimal places, as a float
    json_object = ""  # SQL building a JSON object, as text, from {pairs} ('key', value, ...)
    json_value = ""  # SQL for stored JSON text {x} as a value inside json_object (not as a string)
    byte_length = ""  # SQL for the UTF-8 bytes of text {x}
    json_bool = ""  # SQL for a stored boolean {x} as JSON true / false / null inside json_object
    json_array_agg = ""  # SQL aggregating JSON texts {x}, in the order an inner ORDER BY ... LIMIT gave them
    one_writer = False  # writers take turns anyway (SQLite): the HTTP server queues write requests (_Turnstile)

    def __init__(self, url: str, settings: Settings | None = None):
        self.url = url
        self.echo = bool(settings and settings["PREFECT_API_DATABASE_ECHO"])
        self.timeout = float(settings["PREFECT_API_DATABASE_TIMEOUT"]) if settings else 10.0
        # what the orchestration rules (section 9) need of the settings: they are handed a transaction only
        self.tag_slot_wait_seconds = settings["PREFECT_TASK_RUN_TAG_CONCURRENCY_SLOT_WAIT_SECONDS"] if settings else 30
        self.deployment_slot_wait_seconds = (
            settings["PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS"] if settings else 30.0
        )
        self.query_seconds = 0.0  # total time spent in the database, for metrics
        self.query_count = 0
        self.changes = 0  # write transactions this process committed: cached reads older than this are stale
        self._changes_lock = threading.Lock()
        self.process_group = None  # the _ProcessGroup of `start --processes N`: they count writes together
        self._columns: dict[str, tuple[str, ...]] = {}
        self.hooks = DatabaseHooks()
        self._driver_errors = _DriverErrors(self)  # reused: every statement passes through it

    def _count_change(self):
        with self._changes_lock:
            self.changes += 1
            if self.process_group is not None:
                self.process_group.count_changes(self.changes)

    def count_changes_in(self, process_group, changes: int):
        """Count committed writes together with `process_group`'s other processes, going on from `changes`
        (what this process's predecessor had counted): their sum never goes back to a value some cached
        answer was stored under."""
        with self._changes_lock:
            self.changes = changes
            self.process_group = process_group

    def generation(self) -> int:
        """Changes so far: this process's commits, or those of all the server's processes."""
        return self.changes if self.process_group is None else self.process_group.total_changes()

    def column_names(self, tx, table: str) -> tuple[str, ...]:
        """The table's columns in schema order, as the migrations made them (cached until a migration)."""
        names = self._columns.get(table)
        if names is None:
            cursor = tx.execute(f"SELECT * FROM {table} WHERE 1 = 0")
            names = self._columns[table] = tuple(d[0] for d in cursor.description)
        return names

    def forget_columns(self):
        self._columns.clear()

    def json_with_defaults(self, x: str, key: str, defaults: dict) -> tuple[str, tuple]:
        """SQL and its parameters for stored JSON object text {x} as a value inside json_object, the object at
        its `key` given those of the `defaults` it lacks (one it has, null or not, stays as it is); the object at
        `key` taken as empty where it is not an object (as state_for_client takes it)."""
        raise NotImplementedError

    def _log_sql(self, sql, params):
        if self.echo:
            sql_log.info("SQL %s %s", " ".join(sql.split()), "[%d params]" % len(params) if params else "")

    def contains(self, column: str) -> str:
        return self.json_array_contains.format(col=column)

    driver_error: type = Exception  # the driver's base exception class (sqlite3.Error, psycopg.Error)

    def _map_error(self, exc):
        """The exception of ours a driver error means, or None when it means none (each dialect says)."""
        return None

    def driver_errors(self, unmapped: type | None = None) -> _DriverErrors:
        """`with db.driver_errors():` the one place driver errors become ours (see _DriverErrors)."""
        return self._driver_errors if unmapped is None else _DriverErrors(self, unmapped)

    @contextlib.contextmanager
    def unbounded_statements(self):
        """Statements that may take long on purpose (migrations) are not cut off by the deadline."""
        yield

    def close(self):
        pass


# --- 3. SQLite ---
# Owns the SQLite database: one writer connection and pooled readers, its PRAGMAs, the WAL checkpointer that
# keeps the WAL bounded, and backups that publish only a complete, checked copy under the target's name.


class _WalCheckpointer:
    """Copies the WAL back into the database file from a thread of its own, and makes it start over.

    SQLite's automatic checkpoint runs inside the COMMIT of whichever request crosses its threshold:
    that request waits for the copy and two fsyncs (5-10 ms here, every ~70 writes). A PASSIVE
    checkpoint from another connection runs beside the writer instead, with the GIL released.

    A PASSIVE checkpoint alone never bounds the WAL: it cannot copy past the snapshot of a reader, and
    the WAL starts over only when every frame is copied and no reader is in the WAL; and SQLite keeps the
    file as large as it ever grew. Readers that overlap writes (a soak of 2 writers and 4 readers) always
    leave a few frames: 225 MB of WAL in 20 s. Waiting for them in the writers' turn (a RESTART checkpoint
    with a busy timeout) held the writers: read transactions that each scan a table (> 5 ms) were always
    in the WAL, no restart succeeded, the WAL reached 67 MB and a failed try held writers 170 ms.

    So the waiting is done by readers, never by writers. Once the WAL is large, this database drains
    its readers: read transactions that begin wait (at most `drain_wait_seconds`), those in progress
    finish; when none is left, the next writer right after its commit (or this thread, in the writers'
    turn, when no writer comes) runs a RESTART checkpoint that does not wait: it copies the frames written
    since this thread's PASSIVE pass, finds no reader, and the WAL starts over (`journal_size_limit` then
    cuts the file back). Before that, this thread's PASSIVE pass copies what the readers' snapshots held
    back, so the writers are held only for the last frames and two fsyncs. A reader of another process (or
    a backup) still in the WAL makes the restart fail at once; after a few tries the drain is given up and
    none begins for `drain_pause_seconds`. (The other processes of one server are not held at this door:
    there the tries after the first wait a few ms for their readers, as before.) When nothing has been written
    for a pass, this thread takes the writers' turn for a TRUNCATE checkpoint (not waiting either) that empties
    the file.
    """

    every = 100  # commits between checkpoints (~1,400 pages of the write load); and at least once a second
    # WAL frames (pages) above which the WAL is made to start over; below it, the WAL is left to grow.
    # Every restart holds the writers for a few ms (the last frames, two fsyncs): every 100 commits
    # (~1,400 frames) that took 8% of the write load's time; at 4,096 frames it comes a third as often.
    restart_frames = 4096
    file_bytes_kept = 16 * 1024 * 1024  # journal_size_limit: about restart_frames pages of 4 KB
    # How long read transactions that begin during a drain wait for those in the WAL to finish (then the
    # drain is given up and tried again at the next pass): a few of the server's longest reads.
    drain_wait_seconds = 0.25
    # After a drain given up (a reader longer than the wait, or one of another process), the next waits
    # this long: readers are held at most a fifth of the time when something outlasts every drain.
    drain_pause_seconds = 1.0
    writer_tries = 3  # restarts tried (each failing at once) before a drain is given up
    # Readers of the other processes of `start --processes 2` are not held at this door: once one of them
    # made a restart fail, the next tries wait for them this long, as before the door (without it the WAL
    # reached 98.5 MB under 2 writers + 4 readers on 2 processes, against 24.9 MB with it).
    other_process_reader_wait_ms = 5
    quiet_turn_wait_seconds = 0.05  # how long this thread waits for the writers' turn (then tried again)

    def __init__(self, db: SqliteDatabase):
        self.db = db
        self.commits = 0
        self.runs = 0  # checkpoints done
        self.restarts = 0  # times the WAL was made to start over (RESTART or TRUNCATE done)
        self.restart_tries = 0  # restarts tried in the current drain
        self.emptied = False  # the WAL file was truncated and nothing committed since
        self.longest_hold = 0.0  # seconds: the longest a checkpoint in the writers' turn kept writers waiting
        self.gate = threading.Condition()  # guards reading and the drain
        self.reading = 0  # read transactions of this database in progress
        self.waiting = 0  # read transactions held at the door by a drain, now
        self.draining = False  # the WAL is large: read transactions that begin wait until it starts over
        self.drain_deadline = 0.0
        self.copied = False  # this thread's PASSIVE of the drain is done: a restart has only the last frames to copy
        self.next_drain = 0.0  # after a drain given up, none before this (monotonic) time
        self.drains = 0  # drains begun
        self.drains_given_up = 0  # drains ended without a restart (a reader stayed, another process's)
        self.busy_tries = 0  # checkpoints in the writers' turn that found a reader in the WAL
        self.due = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="prefectlite-wal-checkpoint", daemon=True)
        self.thread.start()

    def note_commit(self):
        self.commits += 1
        self.emptied = False
        if self.commits >= self.every:
            self.due.set()

    # Read transactions: counted, and held at the door while a drain is on.

    def reader_enters(self, nested: bool):
        """A read transaction begins. One begun inside another of the same thread (or inside its write)
        is never held: the transaction it is in would wait for itself."""
        with self.gate:
            if self.draining and not nested:
                self.waiting += 1
                try:
                    self._wait_for_the_restart()
                finally:
                    self.waiting -= 1
            self.reading += 1

    def reader_leaves(self):
        with self.gate:
            self.reading -= 1
            if self.draining and not self.reading:
                self.due.set()  # drained: this thread restarts the WAL if no writer does first

    def _wait_for_the_restart(self):
        while self.draining:
            left = self.drain_deadline - time.monotonic()
            if left <= 0:
                self._end_drain(restarted=False)
                return
            self.gate.wait(left)

    def _begin_drain(self):
        with self.gate:
            if self.draining:
                return
            self.draining = True
            self.drain_deadline = time.monotonic() + self.drain_wait_seconds
            self.restart_tries = 0
            self.copied = False
            self.drains += 1
            drained = not self.reading
        if drained:
            self.due.set()

    def _end_drain(self, restarted: bool):
        """With the gate held."""
        if self.draining:
            self.draining = False
            if not restarted:
                self.drains_given_up += 1
                self.next_drain = time.monotonic() + self.drain_pause_seconds
            self.gate.notify_all()

    def drained(self) -> bool:
        return self.draining and not self.reading

    # The checkpoints.

    def _loop(self):
        conn = None
        while not self.stopping:
            self.due.wait(0.01 if self.draining else 1.0)  # a drain holds readers: look again soon
            self.due.clear()
            if self.stopping:
                break
            try:
                conn = conn or self.db._connect()
                if self.draining:
                    self._restart_once_drained(conn)
                    continue
                seen = self.commits
                self.commits -= seen
                if not seen:
                    if not self.emptied:
                        self.emptied = self._in_the_writers_turn("TRUNCATE") or False
                    continue
                self._checkpoint(conn)
            except (sqlite3.Error, ConfigurationError, DatabaseError) as exc:  # a full disk: the WAL keeps the data
                log.debug("WAL checkpoint failed (tried again later): %s", exc)
                with self.gate:
                    self._end_drain(restarted=False)
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _checkpoint(self, conn):
        # The bulk of the copying, beside the writers. It answers with the frames in the WAL ("log").
        frames = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()["log"]
        self.runs += 1
        if frames >= self.restart_frames and time.monotonic() >= self.next_drain:
            self._begin_drain()

    def _restart_once_drained(self, conn):
        """This thread, during a drain: once no reader is left, copy what the last pass could not (the
        readers' snapshots held it back) beside the writers, so that the restart in their turn has only the
        frames written meanwhile to copy; then take the writers' turn (a writer that commits meanwhile
        restarts the WAL itself). Past the deadline, give the drain up."""
        if self.drained():
            if not self.copied:  # (a writer's RESTART now would meet this one and fail: writers wait for it)
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                self.copied = True
            self._in_the_writers_turn("RESTART", only_drained=True)
        elif time.monotonic() >= self.drain_deadline:
            with self.gate:
                self._end_drain(restarted=False)

    def after_commit(self, writer):
        """Called by a writer right after its COMMIT, in its turn, during a drain: once no reader is left,
        make the WAL start over. (This thread waiting for the writers' turn instead could wait long: a busy
        writer takes the lock straight back.)"""
        if self.drained() and self.copied:
            self._restart(writer)
        elif time.monotonic() >= self.drain_deadline:
            with self.gate:
                self._end_drain(restarted=False)

    def _restart(self, writer):
        restarted = False
        wait_ms = self.other_process_reader_wait_ms if self.restart_tries and self.db.process_group else 0
        try:
            restarted = self._checkpoint_in_turn(writer, "RESTART", wait_ms)
        except sqlite3.Error as exc:  # a full disk, say: the WAL keeps the data
            log.debug("WAL restart failed (tried again later): %s", exc)
        finally:
            with self.gate:
                self.restart_tries += 1
                if restarted or self.restart_tries >= self.writer_tries:
                    self._end_drain(restarted)

    def _in_the_writers_turn(self, mode: str, only_drained: bool = False) -> bool | None:
        """Take the writers' turn (waiting briefly) and checkpoint there: TRUNCATE when quiet, RESTART
        once drained. None when the turn was not had."""
        db = self.db
        if not db._write_lock.acquire(timeout=self.quiet_turn_wait_seconds):
            return None
        in_turn = False
        try:
            if db._closed or (only_drained and not self.drained()):  # a writer restarted it meanwhile
                return None
            if db._turn_file is not None:  # the writers of other servers on this file wait too
                db._take_turn_among_servers(time.monotonic() + self.quiet_turn_wait_seconds)
                in_turn = True
            if mode == "RESTART":
                self._restart(db._writer)
                return None
            return self._checkpoint_in_turn(db._writer, mode)
        finally:
            if in_turn:
                db._flock(db._turn_file, db._flock_unlock)
            db._write_lock.release()

    def _checkpoint_in_turn(self, writer, mode: str, wait_ms: int = 0) -> bool:
        """Run a RESTART or TRUNCATE checkpoint on the writer's connection, in the writers' turn, without
        waiting for readers (no busy timeout, but for other_process_reader_wait_ms); True when the WAL
        started over."""
        started = time.perf_counter()
        writer.execute(f"PRAGMA busy_timeout = {wait_ms}")
        try:
            done = writer.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        finally:
            writer.execute(f"PRAGMA busy_timeout = {int(self.db.timeout * 1000)}")
        self.longest_hold = max(self.longest_hold, time.perf_counter() - started)
        self.runs += 1
        self.restarts += not done["busy"]
        self.busy_tries += bool(done["busy"])
        return not done["busy"]

    def stop(self):
        self.stopping = True
        with self.gate:
            self._end_drain(restarted=False)
        self.due.set()
        self.thread.join(timeout=10)


def _partial_file_beside(target: str) -> str:
    """A new empty file beside `target` for a backup being written (`.NAME.XXXX.partial`): a copy that is
    interrupted is never found under the target's name, and a retry does not meet it."""
    folder, name = os.path.split(os.path.abspath(target))
    try:
        handle, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=folder)
    except OSError as exc:
        raise ConfigurationError(f"cannot write a backup in {folder}: {exc.strerror or exc}") from None
    os.close(handle)
    return partial


def _sync_file_and_folder(path: str) -> None:
    """Make a file and its name in its folder durable (fsync both)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    with contextlib.suppress(OSError):  # some systems cannot open a folder for fsync
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _publish_complete_copy(partial: str, target: str) -> None:
    """Give a complete, synced copy the target's name; unlike a rename, a link never replaces a file made
    there meanwhile. (The caller removes `partial`.)"""
    _sync_file_and_folder(partial)
    try:
        os.link(partial, target)
    except FileExistsError:
        raise ConfigurationError(f"{target} already exists; choose a new file") from None
    _sync_file_and_folder(target)


class SqliteDatabase(Database):
    driver_error = sqlite3.Error
    dialect = "sqlite"
    ilike = "LIKE"  # SQLite's LIKE is case-insensitive for ASCII already
    # Exact to the microsecond, for the one timestamp format we store (iso(): "YYYY-MM-DDTHH:MM:SS.ffffff+00:00");
    # julianday() keeps milliseconds only, and a difference of two of its day fractions is off by ~50 µs.
    seconds_between = (
        "((CAST(strftime('%s', substr({a}, 1, 19)) AS INTEGER)"
        " - CAST(strftime('%s', substr({b}, 1, 19)) AS INTEGER)) * 1000000"
        " + CAST(substr({a}, 21, 6) AS INTEGER) - CAST(substr({b}, 21, 6) AS INTEGER)) / 1000000.0"
    )
    greatest = "max({a}, {b})"
    round6 = "round({x}, 6)"
    json_object = "json_object({pairs})"
    json_value = "json({x})"
    json_bool = "CASE WHEN {x} IS NULL THEN NULL WHEN {x} THEN json('true') ELSE json('false') END"
    # A subquery with LIMIT is never flattened nor stripped of its ORDER BY: it feeds the aggregate in order.
    json_array_agg = "'[' || COALESCE(group_concat({x}, ','), '') || ']'"
    json_array_contains = "EXISTS (SELECT 1 FROM json_each({col}) WHERE json_each.value = ?)"
    json_text = "json_extract({col}, ?)"
    json_label_path = '$."{label}"'  # quoted: labels have dots in them (prefect.resource.name)
    byte_length = "LENGTH(CAST({x} AS BLOB))"  # LENGTH of a text counts characters, and stops at a NUL
    min_version = (3, 24, 0)
    one_writer = True

    def json_with_defaults(self, x: str, key: str, defaults: dict) -> tuple[str, tuple]:
        pairs = ", ".join("?, json(?)" for _ in defaults)  # json_insert sets a path only where there is none
        params = tuple(v for name, value in defaults.items() for v in (f'$."{key}"."{name}"', json.dumps(value)))
        path = f'$."{key}"'
        # json() around the CASE: what json_object embeds must carry JSON's subtype, or it is quoted as text;
        # json_insert and json_set read the stored text as it is (a json() in each was one parse more)
        sql = (
            f"json(CASE WHEN json_type({x}, ?) = 'object' THEN json_insert({x}, {pairs}) "
            f"ELSE json_set({x}, ?, json(?)) END)"
        )
        return sql, (path, *params, path, json.dumps(defaults))

    def __init__(self, url, path, settings=None):
        super().__init__(url, settings)
        if sqlite3.sqlite_version_info < self.min_version:
            raise ConfigurationError(f"SQLite {sqlite3.sqlite_version} is too old; prefectlite needs 3.24 or newer")
        self.path = path
        self.memory = path == ":memory:"
        self.synchronous = {"normal": "NORMAL", "full": "FULL"}[
            settings["PREFECT_API_DATABASE_SQLITE_SYNCHRONOUS"] if settings else "normal"
        ]
        # One writer at a time within the process (SQLite has one writer anyway); waiting on this
        # lock instead of on SQLite's busy handler keeps "database is locked" away from clients.
        self._write_lock = threading.RLock() if self.memory else threading.Lock()
        self._checkpointer: _WalCheckpointer | None = None
        # Transactions each thread has open here: a read begun inside one is never held by a drain
        self._open_here = threading.local()
        self._readers = queue.LifoQueue()
        self._all = []
        self._closed = False
        if not self.memory:
            parent = Path(path).parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigurationError(f"cannot create {parent}: {exc.strerror or exc}") from None
        self._writer = self._connect()
        self._turn_file = None  # a server's handle on <db>.write-lock (see _take_turn_among_servers)
        if self.memory:
            self._readers = None

    def _connect(self):
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            conn.row_factory = _dict_row
            conn.execute("PRAGMA foreign_keys = ON")
            if not self.memory:
                conn.execute("PRAGMA journal_mode = WAL")
                # WAL + NORMAL (the default, as Prefect's): a committed transaction survives a crash of this
                # process (kill -9); only an OS crash or power loss may lose the last commits. FULL syncs
                # the WAL at every commit: measured 23-27% fewer write requests a second.
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
                # Checkpoints run in a thread of their own (_WalCheckpointer), not inside some request's COMMIT
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                # Once the WAL has started over, the first commit cuts the file back to this size (SQLite
                # otherwise keeps the file as large as it ever grew, for ever)
                conn.execute(f"PRAGMA journal_size_limit = {_WalCheckpointer.file_bytes_kept}")
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot open SQLite database {self.path}: {exc}") from None
        self._all.append(conn)
        return conn

    def server_version(self) -> str:
        return sqlite3.sqlite_version

    # SQLite's limits that a request's size can reach (a long filter text, thousands of tags): the
    # client's to change, so a 422 that says which, never a 500.
    _limits_a_request_can_reach = (
        ("pattern too complex", "a filter text longer than SQLite's LIKE takes (50,000 bytes)"),
        ("Expression tree is too large", "a filter with more terms than SQLite takes (about 1,000 tags, say)"),
        ("too many SQL variables", "a request with more values than SQLite takes in one query"),
        ("too many terms in compound SELECT", "a filter with more terms than SQLite takes"),
    )

    def _map_error(self, exc):
        text = str(exc)
        if isinstance(exc, sqlite3.IntegrityError):
            return IntegrityViolation(text)
        if isinstance(exc, sqlite3.OperationalError) and (
            "locked" in text
            or "busy" in text
            or "disk I/O" in text
            or "readonly" in text
            or "unable to open" in text
            or "full" in text
        ):
            reason = "the database is busy" if ("locked" in text or "busy" in text) else text
            return DatabaseUnavailable(reason)
        for limit, reason in self._limits_a_request_can_reach:
            if isinstance(exc, sqlite3.OperationalError) and limit in text:
                return DataRejected(reason)
        if isinstance(exc, sqlite3.DatabaseError) and ("malformed" in text or "not a database" in text):
            return DatabaseUnavailable(f"the database file is unreadable: {text}")
        return None

    def _execute(self, conn, sql, params):
        self._log_sql(sql, params)
        started = time.perf_counter()
        try:
            with self.driver_errors():
                return conn.execute(sql, params)
        finally:
            self.query_seconds += time.perf_counter() - started
            self.query_count += 1

    def _executemany(self, conn, sql, rows):
        self._log_sql(sql, ())
        with self.driver_errors():
            return conn.executemany(sql, rows)

    def write(self):
        return self._on_the_writer(writing=True)

    def _take_turn_among_servers(self, deadline: float) -> None:
        """Wait for the writers of other servers on this file (another `prefectlite start`, another serve()).

        Without this they meet in SQLite's busy handler, which sleeps 1, 2, 5, ... up to 100 ms between
        tries: two servers on one file, 4 clients each, measured p99 64-75 ms, max 338 ms; taking turns
        on an flock, p99 23-26 ms, max 35-45 ms, and 14% more requests served. Polled every 50-200 us,
        not blocking, so that the database timeout still holds (a blocking flock cannot be given up);
        measured as fast as blocking. The kernel drops the lock of a process that dies.
        """
        delay = 0.00005
        while True:
            try:
                self._flock(self._turn_file, self._flock_exclusive_now)
                return
            except BlockingIOError:
                pass
            if time.monotonic() >= deadline:
                raise DatabaseUnavailable("the database is busy")
            time.sleep(delay)
            delay = min(delay * 2, 0.0002)

    @contextlib.contextmanager
    def _on_the_writer(self, writing: bool):
        deadline = time.monotonic() + self.timeout
        if not self._write_lock.acquire(timeout=self.timeout):
            raise DatabaseUnavailable("the database is busy")
        turn_file = self._turn_file
        in_turn = False
        try:
            if self._closed:
                raise DatabaseUnavailable("the server is shutting down")
            if turn_file is not None:
                self._take_turn_among_servers(deadline)
                in_turn = True
            conn = self._writer
            self._execute(conn, "BEGIN IMMEDIATE", ())
            tx = Transaction(self, conn)
            here = self._open_here
            here.count = getattr(here, "count", 0) + 1
            try:
                yield tx
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            finally:
                here.count -= 1
            with self.driver_errors():
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
            if writing:
                self._count_change()
            if not self.memory:
                if self._checkpointer is None:
                    self._checkpointer = _WalCheckpointer(self)
                self._checkpointer.note_commit()
                if self._checkpointer.draining:
                    self._checkpointer.after_commit(conn)
        finally:
            if in_turn:
                self._flock(turn_file, self._flock_unlock)
            self._write_lock.release()
        _run_after_commit(tx)

    @contextlib.contextmanager
    def read(self):
        if self.memory:  # one shared connection: readers take the writer's lock
            with self._on_the_writer(writing=False) as tx:
                yield tx
            return
        if self._closed:
            raise DatabaseUnavailable("the server is shutting down")
        checkpointer, here = self._checkpointer, self._open_here
        nested = getattr(here, "count", 0)
        if checkpointer is not None:  # counted; held while the WAL is being made to start over
            checkpointer.reader_enters(nested=bool(nested))
        here.count = nested + 1
        try:
            try:
                conn = self._readers.get_nowait()
            except queue.Empty:
                conn = self._connect()
            try:
                self._execute(conn, "BEGIN", ())
                try:
                    yield Transaction(self, conn)
                finally:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("COMMIT")
            finally:
                self._readers.put(conn)
        finally:
            here.count = nested
            if checkpointer is not None:
                checkpointer.reader_leaves()

    def run_script(self, script: str):
        """Run a migration script in one transaction (SQLite DDL is transactional)."""
        with self.write() as tx:
            for statement in split_sql_script(script):
                tx.execute(statement)

    def table_names(self, tx) -> list[str]:
        rows = tx.query("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        return sorted(r["name"] for r in rows)

    def schema_signature(self) -> list[tuple]:
        """Every table, column, index of ours: used to compare schemas in tests."""
        with self.read() as tx:
            rows = tx.query(
                "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
            )
        return [(r["type"], r["name"], r["tbl_name"], " ".join((r["sql"] or "").split())) for r in rows]

    def size_bytes(self) -> int:
        if self.memory:
            return 0
        return sum(os.path.getsize(p) for p in (self.path, self.path + "-wal") if os.path.exists(p))

    def vacuum(self):
        """Rewrite the file without free pages, then fold the WAL back in (VACUUM cannot run in a transaction)."""
        with self._write_lock, self.driver_errors(unmapped=DatabaseUnavailable):
            self._writer.execute("VACUUM")
            if not self.memory:
                self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def hold_server_lock(self):
        """A running server holds a shared lock on <db>.lock, so `database restore` can tell it is there."""
        if self.memory:
            return
        import fcntl  # POSIX only; imported here so the module still imports elsewhere

        try:
            self._lock_file = open(self.path + ".lock", "a+")  # noqa: SIM115 - held for the server's life
            fcntl.flock(self._lock_file, fcntl.LOCK_SH)
            # Writers of all servers on this file take turns on a lock of their own (_take_turn_among_servers).
            # (Not a byte range of <db>.lock: on the BSDs flock and fcntl locks of one file can meet.)
            self._flock = fcntl.flock
            self._flock_exclusive_now, self._flock_unlock = fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_UN
            self._turn_file = open(self.path + ".write-lock", "a+")  # noqa: SIM115 - held for the server's life
        except OSError as exc:
            raise ConfigurationError(f"cannot open the lock files beside {self.path}: {exc.strerror or exc}") from None

    def restore(self, source: str, known_revisions: list) -> str:
        """Replace the database file with a backup, after checking it (its schema revision among known_revisions:
        Migrations' ids); only while no server uses it."""
        import fcntl  # POSIX only

        if self.memory:
            raise ConfigurationError("an in-memory database cannot be restored into")
        check = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            ok = check.execute("PRAGMA integrity_check").fetchone()[0]
            revision = check.execute("SELECT revision FROM prefectlite_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise ConfigurationError(f"{source} is not a prefectlite SQLite backup: {exc}") from None
        finally:
            check.close()
        if ok != "ok":
            raise ConfigurationError(f"{source} fails SQLite's integrity check: {ok}")
        if revision not in known_revisions:
            raise ConfigurationError(f"{source} is at schema revision {revision}, which this version does not know")
        with open(self.path + ".lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ConfigurationError(f"a server is using {self.path}; stop it before restoring") from None
            self.close()
            staging = self.path + ".restoring"
            shutil.copyfile(source, staging)
            for leftover in (self.path + "-wal", self.path + "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(leftover)
            os.replace(staging, self.path)
        return f"Restored {self.path} from {source} (schema revision {revision})."

    def backup(self, target: str) -> str:
        """A consistent copy while writers go on, that writers cannot starve and that is never left half
        written under the target's name.

        SQLite's online backup copied 256 pages a step and started over whenever another connection wrote
        between steps: under 20 writes/s a 342 MB database never finished. One step copies every page
        inside one read transaction (a snapshot; writers go on beside it in WAL mode). The copy is written
        to a temporary name beside the target, checked (PRAGMA integrity_check), synced, and only then
        linked under the target's name, which is never overwritten."""
        if os.path.exists(target):
            raise ConfigurationError(f"{target} already exists; choose a new file")
        partial = _partial_file_beside(target)
        source = self._writer if self.memory else self._connect()
        try:
            with contextlib.closing(sqlite3.connect(partial)) as dest:
                source.backup(dest, pages=-1)  # -1: all pages in one step, from one snapshot
                verdict = dest.execute("PRAGMA integrity_check").fetchone()[0]
            if verdict != "ok":
                raise ConfigurationError(
                    f"backup to {target} failed: the copy fails SQLite's integrity check: {verdict}"
                )
            _publish_complete_copy(partial, target)
        except sqlite3.Error as exc:
            raise ConfigurationError(f"backup to {target} failed: {exc}") from None
        except OSError as exc:
            raise ConfigurationError(f"backup to {target} failed: {exc.strerror or exc}") from None
        finally:
            for leftover in (partial, partial + "-journal"):
                with contextlib.suppress(OSError):
                    os.remove(leftover)
            if source is not self._writer:
                source.close()
                with contextlib.suppress(ValueError):
                    self._all.remove(source)
        return f"Backed up {self.path} to {target} ({os.path.getsize(target)} bytes, integrity checked)."

    def close(self):
        self._closed = True
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._write_lock:
            for conn in self._all:
                with contextlib.suppress(Exception):
                    conn.close()
            self._all.clear()
            if self._turn_file is not None:
                self._turn_file.close()
                self._turn_file = None
        lock_file = getattr(self, "_lock_file", None)
        if lock_file is not None:  # releases the shared lock: `database restore` may now proceed
            lock_file.close()
            self._lock_file = None


# --- 4. PostgreSQL ---
# Owns the PostgreSQL database: a bounded pool of driver connections (FIFO waiters, a 503 after the timeout),
# the dialect's differences as data, the socket watchdog; and, last, opening either kind from its URL.


class _PoolWaiter:
    """A request waiting for a connection: given one (or leave to open one) by whoever frees it."""

    def __init__(self):
        self.grant = None  # a connection, _OPEN_ONE or _POOL_CLOSED, set under the pool's lock
        self.granted = threading.Event()

    def give(self, grant):
        self.grant = grant
        self.granted.set()


_OPEN_ONE = object()  # a grant: a slot is free, open a connection in it
_POOL_CLOSED = object()  # a grant: the server is shutting down


class _ConnectionPool:
    """At most `size + overflow` connections of one server process, one per transaction.

    A transaction that finds none free waits its turn (first come, first served: a freed connection is
    handed to the longest waiter, never to a newcomer) up to `timeout`, then DatabaseUnavailable (a 503
    with the reason). Connections are opened when first needed; broken ones are closed and free their slot.

    Beyond `size`, connections are closed once idle for `overflow_idle_seconds`, not at once: opening one
    costs ~4 ms (about a whole write request), so under a load just above `size` closing each one given
    back would add that to every request; after a burst the server is back to `size` within seconds.

    A thread that already holds a connection (a read opened inside a transaction) never waits: if the
    pool is exhausted it gets one beyond the limit. Otherwise N such threads holding all N connections
    would each wait for a second one that only they can free, until the timeout.
    """

    overflow_idle_seconds = 2.0

    def __init__(self, connect, close, still_open, size: int, overflow: int, timeout: float):
        self._connect = connect  # opens one connection, or raises DatabaseUnavailable
        self._close_connection = close
        self._still_open = still_open  # False: an idle connection the server has ended meanwhile
        self.size = size
        self.limit = size + overflow
        self.timeout = timeout
        self._lock = threading.Lock()
        self._idle: list = []  # [connection, idle since]: the last given back is the first taken (LIFO)
        self._open = 0  # connections open or being opened, counted before connecting so the limit holds
        self._waiters: collections.deque[_PoolWaiter] = collections.deque()
        self._held = threading.local()  # how many connections the current thread holds
        self._closed = False
        self._reaper: threading.Thread | None = None
        self._reaper_wake = threading.Condition(self._lock)

    def acquire(self):
        held = getattr(self._held, "count", 0)
        with self._lock:
            grant = self._grant_now(nested=held > 0)
            if grant is None:
                waiter = _PoolWaiter()
                self._waiters.append(waiter)
        if grant is None:
            grant = self._wait(waiter)
        conn = self._open_in_slot() if grant is _OPEN_ONE else self._still_open_or_replaced(grant)
        self._held.count = held + 1
        return conn

    def _still_open_or_replaced(self, conn):
        """An idle connection, or a new one in its slot if the server ended it meanwhile (a restart): the
        request would otherwise be a 503 on it."""
        if self._still_open(conn):
            return conn
        self._close_connection(conn)
        return self._open_in_slot()

    def _grant_now(self, nested: bool):
        """Under the lock: an idle connection, a free slot (_OPEN_ONE), or None (wait in line)."""
        if self._closed:
            raise DatabaseUnavailable("the server is shutting down")
        if self._idle and (nested or not self._waiters):
            return self._idle.pop()[0]
        if nested or (self._open < self.limit and not self._waiters):
            self._open += 1
            return _OPEN_ONE
        return None

    def _wait(self, waiter: _PoolWaiter):
        waiter.granted.wait(self.timeout)
        with self._lock:
            if waiter.grant is None:  # nothing was handed over in time (checked under the lock: no race)
                self._waiters.remove(waiter)
                raise DatabaseUnavailable(self._busy_reason())
        if waiter.grant is _POOL_CLOSED:
            raise DatabaseUnavailable("the server is shutting down")
        return waiter.grant

    def _busy_reason(self) -> str:
        which = "the one database connection" if self.limit == 1 else f"all {self.limit} database connections"
        return (
            f"{which} of this server {'is' if self.limit == 1 else 'are'} busy "
            f"(waited {_plain_number(self.timeout)} s for one)"
        )

    def _open_in_slot(self):
        try:
            return self._connect()
        except BaseException:
            self._forget_one()  # the slot is free again: the next in line may try
            raise

    def give_back(self, conn, reusable: bool):
        """Return `conn`; one that is not `reusable` (broken, mid-transaction) is closed, freeing its slot."""
        self._held.count = max(0, getattr(self._held, "count", 0) - 1)
        with self._lock:
            keep = reusable and not self._closed and self._open <= self.limit
            if keep and self._waiters:
                self._waiters.popleft().give(conn)
                return
            if keep:
                self._idle.append([conn, time.monotonic()])
                if self._open > self.size:
                    self._wake_reaper()
                return
        self._close_connection(conn)
        self._forget_one()

    def _forget_one(self):
        """A connection was closed (or never opened): its slot goes to the first in line, if any."""
        with self._lock:
            self._open -= 1
            if self._waiters and self._open < self.limit and not self._closed:
                self._open += 1
                self._waiters.popleft().give(_OPEN_ONE)

    def _wake_reaper(self):
        """Under the lock: make sure the thread that closes idle overflow connections is watching."""
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap, name="prefectlite-db-pool", daemon=True)
            self._reaper.start()
        self._reaper_wake.notify()

    def _reap(self):
        while True:
            with self._lock:
                expired, wait = self._expired_overflow(time.monotonic())
                if not expired:
                    if self._closed:
                        return
                    self._reaper_wake.wait(wait)
                    continue
            for conn in expired:
                self._close_connection(conn)

    def _expired_overflow(self, now: float) -> tuple[list, float | None]:
        """Under the lock: take out the idle connections beyond `size` idle for long enough (the longest
        idle first); return them and how long until the next one expires (None: nothing to watch)."""
        expired = []
        while self._open > self.size and self._idle and self._idle[0][1] + self.overflow_idle_seconds <= now:
            expired.append(self._idle.pop(0)[0])
            self._open -= 1
        if expired or self._open <= self.size or not self._idle:
            return expired, None
        return expired, self._idle[0][1] + self.overflow_idle_seconds - now

    def counts(self) -> dict:
        """Connections open (or being opened) and idle, and transactions waiting for one."""
        with self._lock:
            return {"open": self._open, "idle": len(self._idle), "waiting": len(self._waiters), "limit": self.limit}

    def close(self):
        """Close the idle connections and refuse new requests; those in use are closed as they come back."""
        with self._lock:
            self._closed = True
            idle = [conn for conn, _since in self._idle]
            self._open -= len(idle)
            self._idle.clear()
            while self._waiters:
                self._waiters.popleft().give(_POOL_CLOSED)
            self._reaper_wake.notify()
        for conn in idle:
            self._close_connection(conn)


class PostgresDatabase(Database):
    dialect = "postgresql"
    ilike = "ILIKE"
    seconds_between = "EXTRACT(EPOCH FROM (({a})::timestamptz - ({b})::timestamptz))"
    greatest = "GREATEST({a}, {b})"
    round6 = "ROUND(({x})::numeric, 6)::float8"
    json_object = "json_build_object({pairs})::text"  # at most 50 pairs (100 arguments)
    json_value = "({x})::json"
    json_bool = "{x}"
    json_array_agg = "'[' || COALESCE(string_agg({x}, ','), '') || ']'"  # a sorted subquery, no join: in order
    for_update = " FOR UPDATE"
    skip_locked = " SKIP LOCKED"
    json_array_contains = "jsonb_exists(({col})::jsonb, ?)"  # jsonb_exists: the `?` operator, spelled safely
    json_text = "(({col})::jsonb ->> ?)"
    json_label_path = "{label}"
    byte_length = "OCTET_LENGTH({x})"
    min_server_version = 130000
    migration_lock = "SELECT pg_advisory_xact_lock(7270701)"

    def json_with_defaults(self, x: str, key: str, defaults: dict) -> tuple[str, tuple]:
        # `||` keeps the right-hand (stored) value of a key both have
        # the stored object at `key`, none where it is not an object (strict: a list is not looked into); one
        # path query, as cheap as `->`, where a CASE testing its type parsed {x} once more (a third of the time)
        stored = f"jsonb_path_query_first(({x})::jsonb, CAST(? AS jsonpath), '{{}}', true)"
        merged = f"(?)::jsonb || COALESCE({stored}, '{{}}'::jsonb)"
        path = f'strict $."{key}" ? (@.type() == "object")'
        return f"jsonb_set(({x})::jsonb, ARRAY[CAST(? AS text)], {merged})::json", (key, json.dumps(defaults), path)

    def __init__(self, url, conninfo: dict, settings=None):
        super().__init__(url, settings)
        try:
            import psycopg  # optional driver, imported only for a postgresql:// URL
            from psycopg.rows import dict_row
        except ImportError:
            raise ConfigurationError(
                "PostgreSQL needs the psycopg driver: pip install 'prefectlite[postgres]' "
                "(or pip install 'psycopg[binary]')"
            ) from None
        self._psycopg = psycopg
        self.driver_error = psycopg.Error
        self._dict_row = dict_row
        self.conninfo = conninfo
        self.statement_seconds = self.timeout + 5.0  # longer than any request's transaction should take
        self._watchdog = _SocketWatchdog()
        self._unbounded = threading.local()
        size, overflow = (
            settings[name] if settings else SETTINGS[name].default
            for name in ("PREFECT_API_DATABASE_POOL_SIZE", "PREFECT_API_DATABASE_MAX_OVERFLOW")
        )
        self._pool = _ConnectionPool(
            self._connect, self._close_connection, self._still_open, size, overflow, self.timeout
        )
        conn = self._acquire()
        try:
            version = conn.info.server_version
            if version < self.min_server_version:
                raise ConfigurationError(f"PostgreSQL {version // 10000} is too old; prefectlite needs 13 or newer")
            self._ensure_trgm(conn)
        finally:
            self._release(conn)

    def _connect(self):
        psycopg = self._psycopg
        try:
            # application_name: pg_stat_activity tells which server process holds which connections
            return psycopg.connect(
                **self.conninfo,
                row_factory=self._dict_row,
                connect_timeout=max(1, int(self.timeout)),
                application_name=f"prefectlite[{os.getpid()}]",
            )
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection failed"
            raise DatabaseUnavailable(f"cannot reach PostgreSQL: {first}") from None

    def _ensure_trgm(self, conn):
        try:
            with conn.transaction():
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        except self._psycopg.Error:
            log.warning(
                "the pg_trgm extension is missing and we may not create it; an administrator must run "
                "CREATE EXTENSION pg_trgm (name searches will be slower without it)"
            )

    def _still_open(self, conn) -> bool:
        """Has the server ended this idle connection (a restart, pg_terminate_backend)? Then its last message
        and the end of the stream wait on the socket: read them without waiting (~1 µs when nothing came)."""
        try:
            for _ in range(2):  # the first read takes the server's last message, the second meets the end
                conn.pgconn.consume_input()
        except self._psycopg.OperationalError:
            return False
        return not conn.closed

    @staticmethod
    def _close_connection(conn):
        with contextlib.suppress(Exception):
            conn.close()

    def _release(self, conn):
        # Broken (the watchdog shut it, the server ended it), left mid-transaction or in autocommit (a
        # failed vacuum): closed rather than handed to the next request.
        reusable = not conn.closed and conn.info.transaction_status == 0 and not conn.autocommit  # 0 = IDLE
        self._pool.give_back(conn, reusable)

    def _acquire(self):
        return self._pool.acquire()

    def pool_counts(self) -> dict:
        return self._pool.counts()

    def server_version(self) -> str:
        with self.read() as tx:
            return tx.scalar("SHOW server_version")

    max_parameters = 65535  # the protocol's limit on the values of one statement

    def _check_parameter_count(self, count: int):
        """psycopg refuses more values than the protocol carries before sending anything, as an
        OperationalError that would read as 'unavailable' (503, retried for ever): it is the request's."""
        if count > self.max_parameters:
            raise DataRejected(
                f"a request with more values than PostgreSQL takes in one query ({self.max_parameters:,})"
            )

    def _map_error(self, exc):
        psycopg = self._psycopg
        if isinstance(exc, psycopg.errors.IntegrityError):
            return IntegrityViolation(str(exc).splitlines()[0])
        if (getattr(exc, "sqlstate", None) or "").startswith("54"):  # program limit exceeded: too complex, too big
            return DataRejected(str(exc).strip().splitlines()[0])
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            lines = str(exc).strip().splitlines()
            return DatabaseUnavailable(f"PostgreSQL is unavailable: {lines[0] if lines else type(exc).__name__}")
        if isinstance(exc, psycopg.errors.SerializationFailure) or isinstance(exc, psycopg.errors.DeadlockDetected):
            return DatabaseUnavailable("the database is busy (serialization conflict)")
        if isinstance(exc, psycopg.DataError):
            return DataRejected(str(exc).strip().splitlines()[0])
        return None

    def _execute(self, conn, sql, params):
        self._log_sql(sql, params)
        self._check_parameter_count(len(params or ()))
        started = time.perf_counter()
        try:
            with self.driver_errors():
                return conn.execute(translate_placeholders(sql) if params else sql, params or None)
        finally:
            self.query_seconds += time.perf_counter() - started
            self.query_count += 1

    def _executemany(self, conn, sql, rows):
        self._log_sql(sql, ())
        self._check_parameter_count(max((len(row) for row in rows), default=0))
        with self.driver_errors(), conn.cursor() as cur:
            cur.executemany(translate_placeholders(sql), rows)

    def write(self):
        return self._transaction(writing=True)

    def read(self):  # READ COMMITTED snapshots per statement are fine for our reads
        return self._transaction(writing=False)

    @contextlib.contextmanager
    def _transaction(self, writing: bool):
        conn = self._acquire()
        # A database that stops answering (a cut network, a stuck proxy) must become a 503, not a hang:
        # the watchdog ends a transaction that outlives its deadline (migrations are exempt).
        bounded = not getattr(self._unbounded, "on", False)
        token = self._watchdog.arm(conn, time.perf_counter() + self.statement_seconds) if bounded else None
        try:
            with self.driver_errors():
                with conn.transaction():
                    tx = Transaction(self, conn)
                    yield tx
                if writing:
                    self._count_change()
        finally:
            if token is not None:
                self._watchdog.disarm(token)
            self._release(conn)
        _run_after_commit(tx)

    def run_script(self, script: str):
        with self.write() as tx:
            for statement in split_sql_script(script):
                tx.execute(statement)

    @contextlib.contextmanager
    def unbounded_statements(self):
        self._unbounded.on = True
        try:
            yield
        finally:
            self._unbounded.on = False

    def table_names(self, tx) -> list[str]:
        rows = tx.query("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        return sorted(r["tablename"] for r in rows)

    def schema_signature(self) -> list[tuple]:
        with self.read() as tx:
            cols = tx.query(
                "SELECT table_name, column_name, data_type, is_nullable, column_default "
                "FROM information_schema.columns WHERE table_schema = current_schema() "
                "ORDER BY table_name, column_name"
            )
            idx = tx.query(
                "SELECT tablename, indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = current_schema() ORDER BY tablename, indexname"
            )
        return [tuple(r.values()) for r in cols] + [tuple(r.values()) for r in idx]

    def size_bytes(self) -> int:
        with self.read() as tx:
            return int(tx.scalar("SELECT pg_database_size(current_database())"))

    def vacuum(self):
        conn = self._acquire()  # one of the pool's: a vacuum counts against the limit like any transaction
        try:
            with self.driver_errors(unmapped=DatabaseUnavailable):
                conn.autocommit = True  # VACUUM must run outside a transaction
                conn.execute("VACUUM ANALYZE")
                conn.autocommit = False
        finally:
            self._release(conn)

    def hold_server_lock(self):
        pass  # several servers may share one PostgreSQL database

    def _client_command(self, tool: str, options: str, last: str) -> str:
        """A PostgreSQL client command for this database, the password shown masked (a person runs it)."""
        info = self.conninfo
        secret = "PGPASSWORD=******** " if info.get("password") else ""
        where = (
            f"--host {shlex.quote(info['host'])} --port {info['port']} "
            f"--username {shlex.quote(info.get('user') or 'postgres')} --dbname {shlex.quote(info['dbname'])}"
        )
        return f"{secret}{tool} {options} {where} {last}"

    def restore(self, source: str, known_revisions: list) -> str:
        """Restoring replaces what servers may be using: said, with the command, never done behind a back."""
        raise ConfigurationError(
            "prefectlite does not restore PostgreSQL databases itself; with every server "
            "stopped, run: " + self._client_command("pg_restore", "--clean --if-exists", shlex.quote(source))
        )

    def backup(self, target: str) -> str:
        """PostgreSQL's own tool makes the copy: pg_dump when it is on PATH (the password in its environment,
        never on its command line), to a temporary name linked under the target's once complete. Without
        pg_dump, no pretending: an error that gives the command to run."""
        if os.path.exists(target):
            raise ConfigurationError(f"{target} already exists; choose a new file")
        pg_dump = shutil.which("pg_dump")
        if pg_dump is None:
            raise ConfigurationError(
                "pg_dump is not on PATH, so no backup was made; install PostgreSQL's client "
                "tools and run: " + self._client_command("pg_dump", "--format=custom", f"--file {shlex.quote(target)}")
            )
        info = self.conninfo
        partial = _partial_file_beside(target)
        import subprocess  # only here: no server needs it (and the import costs every start-up)

        env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
        if info.get("password"):
            env["PGPASSWORD"] = info["password"]
        try:
            done = subprocess.run(
                [
                    pg_dump,
                    "--format=custom",
                    "--host",
                    info["host"],
                    "--port",
                    str(info["port"]),
                    "--username",
                    info.get("user") or "postgres",
                    "--dbname",
                    info["dbname"],
                    "--file",
                    partial,
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                said = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
                raise ConfigurationError(f"pg_dump failed, so no backup was made: {said}")
            _publish_complete_copy(partial, target)
        except OSError as exc:
            raise ConfigurationError(f"backup to {target} failed: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):
                os.remove(partial)
        return (
            f"Backed up PostgreSQL database {info['dbname']} to {target} with pg_dump "
            f"({os.path.getsize(target)} bytes).\n"
            f"  restore (every server stopped): "
            + self._client_command("pg_restore", "--clean --if-exists", shlex.quote(target))
        )

    def close(self):
        self._pool.close()


class _SocketWatchdog:
    """Ends the connection of a statement that outlives its deadline (one thread for all connections).

    The driver blocks in a socket read with no timeout of its own; shutting the socket down turns that
    wait into an OperationalError, which becomes a 503 and a fresh connection next time.
    """

    def __init__(self):
        self._lock = threading.Condition()
        self._armed: dict = {}
        self._counter = 0
        self._thread = None

    def arm(self, conn, deadline: float) -> int:
        with self._lock:
            self._counter += 1
            self._armed[self._counter] = (deadline, conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="prefectlite-db-watchdog", daemon=True)
                self._thread.start()
            return self._counter

    def disarm(self, token: int):
        with self._lock:
            self._armed.pop(token, None)

    def _watch(self):
        while True:
            with self._lock:
                now = time.perf_counter()
                expired = [(t, c) for t, (d, c) in self._armed.items() if d <= now]
                for token, _conn in expired:
                    self._armed.pop(token, None)
                soonest = min((d for d, _c in self._armed.values()), default=now + 1.0)
            for _token, conn in expired:
                _shut_socket(conn)
            with self._lock:
                self._lock.wait(max(0.05, min(soonest - time.perf_counter(), 1.0)))


def _shut_socket(conn):
    with contextlib.suppress(Exception):
        dup = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()
        log.warning("a database statement outlived its deadline; its connection was closed")


_MEMORY_SQLITE = re.compile(r"^(?:file:)?:memory:")


def parse_database_url(url: str, password: str = "") -> tuple[str, object]:
    """Return ('sqlite', path) or ('postgresql', conninfo dict); ConfigurationError for anything else."""
    url = (url or "").strip()
    match = re.match(r"^([a-z][a-z0-9]*)(\+[a-z0-9_]+)?://(.*)$", url, re.I)
    if not match:
        raise ConfigurationError(
            f"malformed database URL {mask_url_password(url)!r}; expected sqlite:///path or postgresql://..."
        )
    scheme, rest = match.group(1).lower(), match.group(3)
    if scheme == "sqlite":
        if not rest.startswith("/"):
            raise ConfigurationError(f"malformed SQLite URL {url!r}; expected sqlite:///path")
        path = rest[1:].split("?", 1)[0]
        if not path or _MEMORY_SQLITE.match(path):
            return "sqlite", ":memory:"
        return "sqlite", path
    if scheme in ("postgresql", "postgres"):
        parts = urllib.parse.urlsplit("postgresql://" + rest)
        try:
            port = parts.port or 5432
        except ValueError:
            raise ConfigurationError(f"malformed PostgreSQL URL {mask_url_password(url)!r}: bad port") from None
        dbname = parts.path.lstrip("/")
        if not parts.hostname or not dbname:
            raise ConfigurationError(
                f"malformed PostgreSQL URL {mask_url_password(url)!r}; expected postgresql://user:pw@host:port/db"
            )
        secret = urllib.parse.unquote(parts.password or "")
        if not secret or secret == "${PREFECT_API_DATABASE_PASSWORD}":
            secret = password
        conninfo = {
            "host": parts.hostname,
            "port": port,
            "dbname": dbname,
            "user": urllib.parse.unquote(parts.username or "") or None,
        }
        if secret:
            conninfo["password"] = secret
        return "postgresql", conninfo
    raise ConfigurationError(f"unsupported database URL scheme {scheme!r}; use sqlite:// or postgresql://")


def open_database(url: str, settings: Settings | None = None) -> Database:
    password = settings["PREFECT_API_DATABASE_PASSWORD"] if settings else ""
    kind, target = parse_database_url(url, password)
    if kind == "sqlite":
        return SqliteDatabase(url, target, settings)
    return PostgresDatabase(url, target, settings)


# --- 5. Migrations ---
# Owns the schema's history: migrations/NNNN_name.<dialect>.<up|down>.sql, applied in order, one
# transaction per revision; the database records its revision in prefectlite_version.


def resource_dir(name: str) -> Path:
    """Find migrations/ or static/: beside this file (a checkout) or in the wheel's data package."""
    here = Path(__file__).resolve().parent
    for candidate in (here / name, here / "prefectlite_data" / name):
        if candidate.is_dir():
            return candidate
    raise ConfigurationError(f"cannot find the {name}/ folder next to {here}; is the installation complete?")


@dataclasses.dataclass(frozen=True)
class Revision:
    id: str
    name: str
    description: str
    scripts: dict  # (dialect, "up"|"down") -> Path


_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.(sqlite|postgresql)\.(up|down)\.sql$")


def list_revisions() -> list[Revision]:
    found: dict[str, dict] = {}
    for path in sorted(resource_dir("migrations").iterdir()):
        match = _MIGRATION_FILE.match(path.name)
        if not match:
            continue
        rev, name, dialect, direction = match.groups()
        entry = found.setdefault(rev, {"name": name, "scripts": {}, "description": ""})
        entry["scripts"][(dialect, direction)] = path
        if direction == "up" and not entry["description"]:
            first = path.read_text(encoding="utf-8").splitlines()[:1]
            entry["description"] = first[0].lstrip("- ").split(":", 1)[-1].strip() if first else name
    return [Revision(rev, e["name"], e["description"], e["scripts"]) for rev, e in sorted(found.items())]


def current_revision(db: Database) -> str | None:
    with db.read() as tx:
        if "prefectlite_version" not in db.table_names(tx):
            return None
        return tx.scalar("SELECT revision FROM prefectlite_version")


def _apply(db: Database, revision: Revision, direction: str, expected_before: str | None, new_revision: str | None):
    """Run one revision's script from `expected_before` to `new_revision`; False if the schema was elsewhere."""
    script = revision.scripts.get((db.dialect, direction))
    if script is None:
        raise ConfigurationError(f"migration {revision.id} has no {direction} script for {db.dialect}")
    statements = split_sql_script(script.read_text(encoding="utf-8"))
    with db.unbounded_statements(), db.write() as tx:
        if db.migration_lock:
            tx.execute(db.migration_lock)  # two servers migrating at once: one waits for the other
        tx.execute("CREATE TABLE IF NOT EXISTS prefectlite_version (revision VARCHAR(32) NOT NULL)")
        now_at = tx.scalar("SELECT revision FROM prefectlite_version")
        if now_at != expected_before:
            return False  # somebody else moved the schema meanwhile
        for statement in statements:
            tx.execute(statement)
        db.forget_columns()
        tx.execute("DELETE FROM prefectlite_version")
        if new_revision is None:
            tx.execute("DROP TABLE prefectlite_version")
        else:
            tx.execute("INSERT INTO prefectlite_version (revision) VALUES (?)", (new_revision,))
    return True


def _resolve_revision(target: str, revisions: list[Revision]) -> str:
    for r in revisions:
        if target in (r.id, f"{r.id}_{r.name}"):
            return r.id
    raise ConfigurationError(f"unknown revision {target!r}; known: {', '.join(r.id for r in revisions)}")


def migrate(db: Database, target: str | None = None) -> list[str]:
    """Upgrade to `target` (default: the newest revision). Returns the revisions applied."""
    revisions = list_revisions()
    ids = [r.id for r in revisions]
    goal = ids[-1] if target in (None, "head") else _resolve_revision(target, revisions)
    current = current_revision(db)
    if current is not None and current not in ids:
        raise ConfigurationError(f"the database is at revision {current}, which this version does not know")
    start = 0 if current is None else ids.index(current) + 1
    if current is not None and ids.index(goal) < ids.index(current):
        raise ConfigurationError(f"the database is at {current}, newer than {goal}; use `database downgrade`")
    applied = []
    for i in range(start, ids.index(goal) + 1):  # each from the one before it (listed once, not per step)
        if _apply(db, revisions[i], "up", ids[i - 1] if i > 0 else None, ids[i]):
            applied.append(ids[i])
    return applied


def downgrade(db: Database, target: str) -> list[str]:
    """Downgrade to `target`: '-N' steps back, a revision id, or 'base' (nothing of ours left)."""
    revisions = list_revisions()
    ids = [r.id for r in revisions]
    current = current_revision(db)
    if current is None:
        if target == "base":
            return []
        raise ConfigurationError("the database has no schema of ours; nothing to downgrade")
    here = ids.index(current)
    if target == "base":
        goal = -1
    elif re.fullmatch(r"-\d+", target):
        goal = here - int(target[1:])
        if goal < -1:
            raise ConfigurationError(
                f"cannot go {target[1:]} revisions below {current}: only {here + 1} applied (use -r base)"
            )
    else:
        goal = ids.index(_resolve_revision(target, revisions))
        if goal > here:
            raise ConfigurationError(f"{target} is newer than the current revision {current}; use `database upgrade`")
    undone = []
    for i in range(here, goal, -1):
        if _apply(db, revisions[i], "down", ids[i], ids[i - 1] if i > 0 else None):
            undone.append(ids[i])
    return undone


def reset_database(db: Database) -> None:
    """Drop every object of ours and apply every migration again."""
    if current_revision(db) is not None:
        downgrade(db, "base")
    migrate(db)


def schema_is_current(db: Database) -> bool:
    revisions = list_revisions()
    return current_revision(db) == revisions[-1].id


# --- 6. Schemas ---
# Owns the declarative description of every request body: one Schema drives validation, defaults,
# the 422 details (Prefect's shape: loc / msg / type) and the OpenAPI document, so they cannot drift.


class ValidationFailed(Exception):
    """A request that does not validate; becomes a 422 with Prefect's body."""

    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


def _error(loc, msg, kind):
    return {"loc": list(loc), "msg": msg, "type": kind}


@dataclasses.dataclass(frozen=True)
class ListOf:
    item: object
    max_items: int | None = None
    min_items: int = 0


@dataclasses.dataclass(frozen=True)
class DictOf:
    """A JSON object whose values are all of one kind (its keys are strings, as JSON's are)."""

    value: object


@dataclasses.dataclass(frozen=True)
class Enum:
    name: str
    values: tuple


@dataclasses.dataclass(frozen=True)
class Field:
    kind: object  # "str" "int" "float" "bool" "uuid" "datetime" "object" "label" "any", ListOf, DictOf, Enum, Schema
    required: bool = False
    default: object = None  # a callable is called for a fresh default (lists, dicts)
    nullable: bool = True
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    pattern: str | None = None
    description: str = ""
    check: object = None  # a callable(value, loc) -> value for what a kind cannot say; raises ValidationFailed
    null_is_default: bool = False  # a null sent is taken as the default (as Prefect takes it), not kept as null


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # as str(UUID) writes it
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")


def parse_uuid(text, loc=("path", "id")) -> str:
    if isinstance(text, str) and _CANONICAL_UUID.fullmatch(text):
        return text
    if isinstance(text, str) and _UUID_RE.match(text):
        return str(uuid.UUID(text))
    raise ValidationFailed([_error(loc, "value is not a valid uuid", "type_error.uuid")])


def parse_datetime(value, loc=("body",)) -> str:
    """Accept ISO 8601 (naive means UTC); return our canonical UTC text, which sorts as time does."""
    if isinstance(value, str):
        try:
            moment = _dt.datetime.fromisoformat(
                value.strip().replace(" ", "T", 1) if "T" not in value else value.strip()
            )
        except ValueError:
            moment = None
        if moment is not None:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=_dt.timezone.utc)
            try:
                return iso(moment)
            except (OverflowError, ValueError):
                pass
    raise ValidationFailed([_error(loc, "invalid datetime format", "value_error.datetime")])


def iso(moment: _dt.datetime) -> str:
    # isoformat pads years to four digits (strftime's %Y writes year 1 as "1", which sorts and parses wrong)
    return moment.astimezone(_dt.timezone.utc).isoformat(timespec="microseconds")


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def now_iso() -> str:
    return iso(utcnow())


def from_iso(text: str | None) -> _dt.datetime | None:
    return None if text is None else _dt.datetime.fromisoformat(text)


_MAX_DEPTH = 64  # deeper JSON is refused before it can exhaust the stack
_INT64 = 2**63


def _json_depth_ok(value, depth=0) -> bool:
    if depth > _MAX_DEPTH:
        return False
    if isinstance(value, dict):
        return all(_json_depth_ok(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return all(_json_depth_ok(v, depth + 1) for v in value)
    return True


class Schema:
    """A named object schema: fields with kinds and defaults. Unknown fields are ignored, unless the schema
    forbids them (as Prefect's action bodies do): then each is a 422, bar the `tolerated` ones (fields Prefect
    accepts and we do not keep). A `check_only` schema (an object stored as sent: a state's details, a run's
    policy) checks the fields it names when sent, and answers the object unchanged, unknown fields and all."""

    registry: dict[str, "Schema"] = {}

    def __init__(
        self, name: str, fields: dict, description: str = "", forbid_extra=False, tolerated=(), check_only=False
    ):
        self.name = name
        self.check_only = check_only
        self.fields = fields
        self.description = description
        self.forbid_extra = forbid_extra
        self.tolerated = frozenset(tolerated)
        Schema.registry[name] = self

    def _extra_errors(self, data: dict, loc) -> list[dict]:
        if not self.forbid_extra:
            return []
        unknown = [key for key in data if key not in self.fields and key not in self.tolerated]
        return [_error((*loc, key), "extra fields not permitted", "value_error.extra") for key in unknown]

    def validate(self, data, loc=("body",), partial=False) -> dict:
        if not isinstance(data, dict):
            raise ValidationFailed([_error(loc, "value is not a valid dict", "type_error.dict")])
        partial = partial or self.check_only
        out, errors = {}, []
        for name, field in self.fields.items():
            if name not in data:
                if partial:
                    continue
                if field.required:
                    errors.append(_error((*loc, name), "field required", "value_error.missing"))
                    continue
                out[name] = field.default() if callable(field.default) else field.default
                continue
            try:
                out[name] = _validate_value(field, data[name], (*loc, name))
            except ValidationFailed as exc:
                errors.extend(exc.errors)
        errors += self._extra_errors(data, loc)
        if errors:
            raise ValidationFailed(errors)
        return dict(data) if self.check_only else out

    def openapi(self) -> dict:
        props, required = {}, []
        for name, field in self.fields.items():
            prop = _kind_openapi(field.kind)
            if field.description:
                prop["description"] = field.description
            if field.default is not None and not callable(field.default):
                prop["default"] = field.default
            for key, attr in (
                ("minimum", "minimum"),
                ("maximum", "maximum"),
                ("maxLength", "max_length"),
                ("pattern", "pattern"),
            ):
                if getattr(field, attr) is not None:
                    prop[key] = getattr(field, attr)
            if field.nullable and not field.required:
                prop["nullable"] = True
            props[name] = prop
            if field.required:
                required.append(name)
        doc = {"title": self.name, "type": "object", "properties": props}
        if self.forbid_extra and not self.tolerated:
            doc["additionalProperties"] = False
        if required:
            doc["required"] = required
        if self.description:
            doc["description"] = self.description
        return doc


def _kind_openapi(kind) -> dict:
    simple = {
        "str": {"type": "string"},
        "int": {"type": "integer"},
        "float": {"type": "number"},
        "bool": {"type": "boolean"},
        "uuid": {"type": "string", "format": "uuid"},
        "datetime": {"type": "string", "format": "date-time"},
        "object": {"type": "object"},
        "label": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}]},
        "any": {},
    }
    if isinstance(kind, str):
        return dict(simple[kind])
    if isinstance(kind, ListOf):
        return {"type": "array", "items": _kind_openapi(kind.item)}
    if isinstance(kind, DictOf):
        return {"type": "object", "additionalProperties": _kind_openapi(kind.value)}
    return {"$ref": f"#/components/schemas/{kind.name}"}  # an Enum or a Schema: each is a component


def _validate_value(field: Field, value, loc):
    if value is None:
        if field.null_is_default:
            return field.default() if callable(field.default) else field.default
        if field.nullable:  # required or not: a required nullable field may be sent as null
            return None
        raise ValidationFailed([_error(loc, "none is not an allowed value", "type_error.none.not_allowed")])
    value = _validate_kind(field.kind, value, loc)
    if field.minimum is not None and value < field.minimum:
        raise ValidationFailed(
            [
                _error(
                    loc, f"ensure this value is greater than or equal to {field.minimum:g}", "value_error.number.not_ge"
                )
            ]
        )
    if field.maximum is not None and value > field.maximum:
        raise ValidationFailed(
            [_error(loc, f"ensure this value is less than or equal to {field.maximum:g}", "value_error.number.not_le")]
        )
    if field.max_length is not None and len(value) > field.max_length:
        raise ValidationFailed(
            [
                _error(
                    loc,
                    f"ensure this value has at most {field.max_length} characters",
                    "value_error.any_str.max_length",
                )
            ]
        )
    if field.pattern is not None and not re.fullmatch(field.pattern, value):
        raise ValidationFailed([_error(loc, f'string does not match regex "{field.pattern}"', "value_error.str.regex")])
    return value if field.check is None else field.check(value, loc)


def _validate_kind(kind, value, loc):
    if kind == "any":
        return value
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ValidationFailed([_error(loc, "str type expected", "type_error.str")])
    if kind == "int":
        if isinstance(value, bool):  # Prefect's models (pydantic's lax mode) read true as 1
            return int(value)
        if not isinstance(value, (int, float)) or (
            isinstance(value, float) and not (math.isfinite(value) and value.is_integer())
        ):
            raise ValidationFailed([_error(loc, "value is not a valid integer", "type_error.integer")])
        if not -_INT64 <= value < _INT64:  # what both databases can store
            raise ValidationFailed([_error(loc, "integer out of range (64-bit)", "value_error.number.out_of_range")])
        return int(value)
    if kind == "float":
        try:
            number = float(value) if isinstance(value, (int, float)) else None  # true is 1.0, as in Prefect
        except OverflowError:  # an integer beyond any float
            number = None
        if number is None or not math.isfinite(number):
            raise ValidationFailed([_error(loc, "value is not a valid float", "type_error.float")])
        return number
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):  # as Prefect's models (pydantic's lax mode)
            return bool(value)
        raise ValidationFailed([_error(loc, "value could not be parsed to a boolean", "type_error.bool")])
    if kind == "uuid":
        return parse_uuid(value, loc)
    if kind == "datetime":
        return parse_datetime(value, loc)
    if kind == "label":  # a value of Prefect 3's KeyValueLabels: a string, a number or a boolean
        if isinstance(value, (str, bool)):
            return value
        if isinstance(value, int):
            return _validate_kind("int", value, loc)  # what both databases can store
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise ValidationFailed([_error(loc, "label values must be strings, numbers or booleans", "type_error.label")])
    if kind == "object":
        if isinstance(value, dict):
            return value
        raise ValidationFailed([_error(loc, "value is not a valid dict", "type_error.dict")])
    if isinstance(kind, ListOf):
        if not isinstance(value, list):
            raise ValidationFailed([_error(loc, "value is not a valid list", "type_error.list")])
        if len(value) < kind.min_items:
            raise ValidationFailed(
                [_error(loc, f"ensure this value has at least {kind.min_items} items", "value_error.list.min_items")]
            )
        if kind.max_items is not None and len(value) > kind.max_items:
            raise ValidationFailed(
                [_error(loc, f"ensure this value has at most {kind.max_items} items", "value_error.list.max_items")]
            )
        out, errors = [], []
        for i, item in enumerate(value):
            try:
                out.append(_validate_kind(kind.item, item, (*loc, i)))
            except ValidationFailed as exc:
                errors.extend(exc.errors)
        if errors:
            raise ValidationFailed(errors)
        return out
    if isinstance(kind, DictOf):
        if not isinstance(value, dict):
            raise ValidationFailed([_error(loc, "value is not a valid dict", "type_error.dict")])
        out, errors = {}, []
        for key, item in value.items():
            try:
                out[key] = _validate_kind(kind.value, item, (*loc, key))
            except ValidationFailed as exc:
                errors.extend(exc.errors)
        if errors:
            raise ValidationFailed(errors)
        return out
    if isinstance(kind, Enum):
        if value in kind.values:
            return value
        allowed = ", ".join(repr(v) for v in kind.values)
        raise ValidationFailed(
            [_error(loc, f"value is not a valid enumeration member; permitted: {allowed}", "type_error.enum")]
        )
    if isinstance(kind, Schema):
        return kind.validate(value, loc)
    raise TypeError(kind)


STATE_TYPES = ("SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "CRASHED", "PAUSED", "CANCELLING")
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
StateType = Enum("StateType", STATE_TYPES)
_TAGS = Field(ListOf("str"), default=list, nullable=False)
_NAME = Field("str", required=True, nullable=False, max_length=5000)
# Prefect 3's KeyValueLabels: string keys, scalar values (its SDK reads a run whose labels are anything else as
# invalid); null means none. Prefect 2.20 has no labels (a 422): 3.x's rule holds for both, as 2.20 sends none.
LABELS = DictOf("label")
_LABELS = Field(LABELS, default=dict)

# What Prefect's server models (3.9's; 2.20's are a subset) take in a state's details and a run's policy: a
# value of another kind is a 422 there, and an SDK reading a run that holds one fails. Stored as sent.
StateDetails = Schema(
    "StateDetails",
    {
        **{key: Field("uuid") for key in ("flow_run_id", "task_run_id", "child_flow_run_id", "transition_id")},
        **{key: Field("uuid") for key in ("task_parameters_id", "deployment_concurrency_lease_id")},
        **{key: Field("datetime") for key in ("scheduled_time", "cache_expiration", "pause_timeout")},
        **{key: Field("str") for key in ("cache_key", "pause_key", "traceparent")},
        **{key: Field("bool") for key in ("deferred", "refresh_cache", "retriable")},
        "untrackable_result": Field("bool", nullable=False),
        "pause_reschedule": Field("bool", nullable=False),
        "run_input_keyset": Field(DictOf("str")),
    },
    check_only=True,
)


def _seconds_check(lists: bool, whole: bool):
    """A run policy's delay check: seconds (of any size: the policy is stored as JSON, a delay past the calendar
    waits the longest there is), whole ones only for a flow run (Prefect's FlowRunPolicy has ints: its SDK
    refuses to read a run whose policy has 1.5), or for a task run also a list of them (one per retry)."""

    def check(value, loc):
        for i, item in enumerate(value if lists and isinstance(value, list) else [value]):
            try:
                ok = isinstance(item, (int, float)) and math.isfinite(item)  # true is 1, as in Prefect
            except OverflowError:  # an int beyond any float: a number still
                ok = True
            if ok and whole and isinstance(item, float) and not item.is_integer():
                ok = False
            if not ok:
                where = (*loc, i) if lists and isinstance(value, list) else loc
                expected = "a whole number of seconds" if whole else "a number of seconds"
                raise ValidationFailed([_error(where, f"value is not {expected}", "type_error.number")])
        return value

    return check


_RUN_POLICY = {"max_retries": Field("int", nullable=False), "retries": Field("int")}
FlowRunPolicy = Schema(
    "FlowRunPolicy",
    {
        **_RUN_POLICY,
        "retry_delay_seconds": Field("any", nullable=False, check=_seconds_check(lists=False, whole=True)),
        "retry_delay": Field("any", check=_seconds_check(lists=False, whole=True)),
        "pause_keys": Field(ListOf("str")),
        "resuming": Field("bool"),
        "retry_type": Field(Enum("RetryType", ("in_process", "reschedule"))),
    },
    check_only=True,
)
TaskRunPolicy = Schema(
    "TaskRunPolicy",
    {
        **_RUN_POLICY,
        "retry_delay_seconds": Field("any", nullable=False, check=_seconds_check(lists=False, whole=False)),
        "retry_delay": Field("any", check=_seconds_check(lists=True, whole=False)),
        "retry_jitter_factor": Field("float", minimum=0),
    },
    check_only=True,
)

StateCreate = Schema(
    "StateCreate",
    {
        "type": Field(StateType, required=True, nullable=False),
        "name": Field("str"),
        "message": Field("str"),
        "data": Field("any"),
        "state_details": Field(StateDetails, default=dict, nullable=False),
        "timestamp": Field("datetime"),
    },
    "A proposed state.",
)

SetStateBody = Schema(
    "Body_set_state",
    {
        "state": Field(StateCreate, required=True, nullable=False),
        "force": Field("bool", default=False, null_is_default=True),  # as in Prefect
    },
)

FlowCreate = Schema("FlowCreate", {"name": _NAME, "tags": _TAGS, "labels": _LABELS})
FlowUpdate = Schema("FlowUpdate", {"tags": _TAGS}, forbid_extra=True)  # no labels: 3.9 and 2.20 answer 422

FlowRunCreate = Schema(
    "FlowRunCreate",
    {
        "flow_id": Field("uuid", required=True, nullable=False),
        "name": Field("str", max_length=5000),
        "state": Field(StateCreate),
        "deployment_id": Field("uuid"),
        "flow_version": Field("str"),
        "parameters": Field("object", default=dict, nullable=False),
        "context": Field("object", default=dict, nullable=False),
        "parent_task_run_id": Field("uuid"),
        "infrastructure_document_id": Field("uuid"),
        "empirical_policy": Field(FlowRunPolicy, default=dict, nullable=False),
        "tags": _TAGS,
        "labels": _LABELS,
        "idempotency_key": Field("str", max_length=5000),
        "work_pool_name": Field("str"),
        "work_queue_name": Field("str"),
        "job_variables": Field("object", default=dict),
    },
)

FlowRunUpdate = Schema(
    "FlowRunUpdate",
    {
        "name": Field("str", nullable=False, max_length=5000),
        "flow_version": Field("str"),
        "parameters": Field("object", nullable=False),
        "empirical_policy": Field(FlowRunPolicy, nullable=False),
        "tags": Field(ListOf("str"), nullable=False),
        "infrastructure_pid": Field("str"),
        "job_variables": Field("object", default=dict, null_is_default=True),  # Prefect takes a null: none
    },
    forbid_extra=True,  # as Prefect's (3.9 and 2.20): labels (PATCH /flow_runs/{id}/labels has them) is a 422
)

TaskRunCreate = Schema(
    "TaskRunCreate",
    {
        "id": Field("uuid"),  # the client's choice, kept (PrefectClient.create_task_run(id=...))
        "name": Field("str", max_length=5000),
        "flow_run_id": Field("uuid"),
        "task_key": Field("str", required=True, nullable=False, max_length=2000),
        "dynamic_key": Field("str", required=True, nullable=False, max_length=2000),
        "cache_key": Field("str"),
        "cache_expiration": Field("datetime"),
        "task_version": Field("str"),
        "empirical_policy": Field(TaskRunPolicy, default=dict, nullable=False),
        "tags": _TAGS,
        "task_inputs": Field(DictOf(ListOf("object")), default=dict, nullable=False),  # name -> its inputs
        "state": Field(StateCreate),
        "labels": _LABELS,  # Prefect 3 (see task_run_labels)
    },
)

TaskRunUpdate = Schema("TaskRunUpdate", {"name": Field("str", nullable=False, max_length=5000)})

LogCreate = Schema(
    "LogCreate",
    {
        "name": Field("str", required=True, nullable=False),
        "level": Field("int", required=True, nullable=False),
        "message": Field("str", required=True, nullable=False),
        "timestamp": Field("datetime", required=True, nullable=False),
        "flow_run_id": Field("uuid"),
        "task_run_id": Field("uuid"),
    },
)
LogBatch = ListOf(LogCreate)

# fmt: off
_SORTS = {
    "flow_run": Enum("FlowRunSort", ("ID_DESC", "START_TIME_ASC", "START_TIME_DESC", "EXPECTED_START_TIME_ASC",
                                     "EXPECTED_START_TIME_DESC", "NAME_ASC", "NAME_DESC",
                                     "NEXT_SCHEDULED_START_TIME_ASC", "END_TIME_DESC")),
    "task_run": Enum("TaskRunSort", ("ID_DESC", "EXPECTED_START_TIME_ASC", "EXPECTED_START_TIME_DESC", "NAME_ASC",
                                     "NAME_DESC", "NEXT_SCHEDULED_START_TIME_ASC", "END_TIME_DESC")),
    "flow": Enum("FlowSort", ("CREATED_DESC", "UPDATED_DESC", "NAME_ASC", "NAME_DESC")),
    "log": Enum("LogSort", ("TIMESTAMP_ASC", "TIMESTAMP_DESC")),
    "deployment": Enum("DeploymentSort", ("CREATED_DESC", "UPDATED_DESC", "NAME_ASC", "NAME_DESC")),
    "artifact": Enum("ArtifactSort", ("CREATED_DESC", "UPDATED_DESC", "ID_DESC", "KEY_DESC", "KEY_ASC")),
    "variable": Enum("VariableSort", ("CREATED_DESC", "UPDATED_DESC", "NAME_DESC", "NAME_ASC")),
    "block_document": Enum("BlockDocumentSort", ("NAME_DESC", "NAME_ASC", "BLOCK_TYPE_AND_NAME_ASC")),
}
# fmt: on
_DEFAULT_SORT = {
    "flow_run": "ID_DESC",
    "task_run": "ID_DESC",
    "flow": "NAME_ASC",
    "log": "TIMESTAMP_ASC",
    "deployment": "NAME_ASC",
    "artifact": "ID_DESC",
    "variable": "NAME_ASC",
    "block_document": "NAME_ASC",
}
# fmt: off
_FILTER_KEYS = ("flows", "flow_runs", "task_runs", "deployments", "work_pools", "work_pool_queues",
                "work_queues", "logs", "artifacts", "variables", "block_types", "block_schemas",
                "block_documents", "flow_run_notification_policy_filter", "saved_searches", "concurrency_limits")
# fmt: on


def filter_body_schema(table: str, filters: tuple) -> Schema:
    fields = {
        "offset": Field("int", default=0, minimum=0),  # null means 0, as the SDK sometimes sends it
        "limit": Field("int", minimum=0),
    }
    if table in _SORTS:
        fields["sort"] = Field(_SORTS[table], default=_DEFAULT_SORT[table])
    for key in filters:
        fields[key] = Field("object", description=f"a {key} filter: field -> operator (any_, like_, before_, ...)")
    return Schema(f"Body_filter_{table}_{'_'.join(filters)}", fields)


_JSON_TYPES = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "array": list,
    "object": dict,
    "null": type(None),
}


def validate_parameters(schema: dict, params: dict) -> list[dict]:
    """Check run parameters against the deployment's parameter_openapi_schema (the parts Prefect emits)."""
    errors = []
    props = (schema or {}).get("properties") or {}
    for name in (schema or {}).get("required") or []:
        if name not in params:
            errors.append(
                _error(("body", "parameters", name), f"'{name}' is a required property", "value_error.missing")
            )
    for name, value in params.items():
        spec = props.get(name)
        if not isinstance(spec, dict):
            continue
        types = spec.get("type")
        options = [t for t in ([types] if isinstance(types, str) else (types or [])) if t in _JSON_TYPES]
        for alt in spec.get("anyOf") or []:
            if isinstance(alt, dict) and alt.get("type") in _JSON_TYPES:
                options.append(alt["type"])
        if options and not any(_json_type_ok(value, t) for t in options):
            errors.append(
                _error(
                    ("body", "parameters", name),
                    f"{value!r} is not valid under any of the given schemas ({', '.join(options)})",
                    "value_error.parameter",
                )
            )
        if "enum" in spec and value not in spec["enum"]:
            errors.append(
                _error(("body", "parameters", name), f"{value!r} is not one of {spec['enum']}", "value_error.parameter")
            )
    return errors


def _json_type_ok(value, type_name: str) -> bool:
    if type_name in ("integer", "number") and isinstance(value, bool):
        return False
    if type_name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _JSON_TYPES[type_name])


# --- 7. Calendar ---
# Owns schedules: validation and fire times of interval, cron and RRULE schedules as Prefect
# clients send them, computed with zoneinfo alone. It uses nothing defined after it.

# Schedules: interval, cron and RRULE, written for this server (no croniter, no dateutil).
# Schedule engine: validation and fire times for Prefect 2 schedule objects.
#
# Three shapes, as Prefect 2.20 accepts them:
#   {"interval": seconds, "anchor_date": iso8601, "timezone": name}
#   {"cron": "0 9 * * 1-5", "timezone": name, "day_or": true}
#   {"rrule": "DTSTART:...\\nRRULE:...", "timezone": name}
#
# Every local wall-clock time is turned into an instant by one rule (`_wall_to_instant`):
#   * a time that occurs twice (autumn fold) means its FIRST occurrence, so a
#     schedule never fires twice for one wall-clock time;
#   * a time that does not exist (spring gap) means the first instant after the
#     gap (02:30 on a 02:00->03:00 day fires at 03:00), so a day's run is never
#     lost. This is what ISC/Vixie cron does; several times in one gap collapse
#     into a single fire.
# Intervals shorter than a day count elapsed time (hourly = every real hour);
# intervals of a day or more step the local wall clock, like pendulum's
# add(days=...), so a daily 09:00 stays 09:00 local across DST.


MAX_FIRE_TIMES = 1000  # cap when only `end` is given (Prefect's MAX_ITERATIONS)
MAX_RRULE_LENGTH = 6500  # Prefect rejects longer rrule strings
# a fixed default keeps stored schedules reproducible; Prefect 2.20 itself
# uses the time of validation when anchor_date is missing
DEFAULT_ANCHOR_DATE = _dt.datetime(2020, 1, 1, tzinfo=_dt.timezone.utc)

_UTC = _dt.timezone.utc
_ONE_MICROSECOND = _dt.timedelta(microseconds=1)
_ONE_DAY = _dt.timedelta(days=1)
# The Gregorian calendar repeats every 400 years, so a rule with no match in
# 400 years never matches; this bounds every search for a sparse schedule.
_SCHEDULE_HORIZON_YEARS = 400
_SCHEDULE_LAST_DATE = _dt.date(9999, 12, 28)
_SCHEDULE_END = _dt.datetime(9999, 12, 1, tzinfo=_dt.timezone.utc)


class ScheduleError(ValueError):
    """An invalid or unsupported schedule; `field` names the offending key."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def validate_schedule(schedule):
    """Check a schedule object and return it normalised the way Prefect returns it."""
    normalised, _kind, _compiled = _compile_schedule(schedule)
    return normalised


def next_fire_times(schedule, start, end=None, n=None):
    """Fire times >= start and < end (at most n), ascending, as aware UTC datetimes.

    With only `end` given, at most MAX_FIRE_TIMES times are returned.
    """
    if n is None and end is None:
        raise ValueError("next_fire_times needs n or end")
    start = _schedule_utc(start, "start")
    end = None if end is None else _schedule_utc(end, "end")
    limit = MAX_FIRE_TIMES if n is None else n
    if limit <= 0 or (end is not None and end <= start):
        return []
    _normalised, kind, compiled = _compile_schedule(schedule)
    return _SCHEDULE_FIRE_TIMES[kind](compiled, start, end, limit)


# Schedules, shared helpers.


def _schedule_utc(moment, name):
    if not isinstance(moment, _dt.datetime) or moment.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    return moment.astimezone(_UTC)


def _schedule_quote(text, limit=60):
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


@functools.lru_cache(maxsize=1)
def _schedule_zone_names():
    # "localtime" depends on the machine, so it is no schedule timezone.
    return frozenset(zoneinfo.available_timezones()) - {"localtime"}


def _schedule_zone(name, field="timezone", what="timezone"):
    if not isinstance(name, str) or not name.strip():
        raise ScheduleError(field, f"{what} must be a non-empty IANA timezone name")
    known = _schedule_zone_names()
    if name in known or (not known and name == "UTC"):
        try:
            return zoneinfo.ZoneInfo(name)
        except (LookupError, ValueError, OSError):
            if name == "UTC":  # no tzdata on this machine; UTC needs none
                return _UTC
    raise ScheduleError(
        field,
        f'unknown {what} {_schedule_quote(name)}; use an IANA name such as "America/New_York"',
    )


def _schedule_optional_zone(schedule):
    name = schedule.get("timezone")
    if name is None or name == "":
        return None, _UTC
    return name, _schedule_zone(name)


def _wall_to_instant(naive, tz):
    """The UTC instant of a local wall-clock time (fold -> first, gap -> gap end)."""
    first = naive.replace(tzinfo=tz, fold=0).astimezone(_UTC)
    if first.astimezone(tz).replace(tzinfo=None) == naive:
        return first
    return _wall_gap_end(naive, tz)


def _wall_gap_end(naive, tz):
    # fold=1 reads a missing time with the offset after the jump (an instant
    # before it), fold=0 with the offset before (an instant after it); the jump
    # lies between, on a whole second, so bisect for it.
    before = naive.replace(tzinfo=tz, fold=1).astimezone(_UTC).replace(microsecond=0)
    after = naive.replace(tzinfo=tz, fold=0).astimezone(_UTC)
    new_offset = after.astimezone(tz).utcoffset()
    low, high = 0, math.ceil((after - before).total_seconds())
    while high - low > 1:
        middle = (low + high) // 2
        probe = before + _dt.timedelta(seconds=middle)
        if probe.astimezone(tz).utcoffset() == new_offset:
            high = middle
        else:
            low = middle
    return before + _dt.timedelta(seconds=high)


def _collect_fires(instants, start, end, limit):
    """Take ascending candidate instants into [start, end), dropping repeats."""
    fires = []
    try:
        for instant in instants:
            if instant < start or (fires and instant == fires[-1]):
                continue
            if end is not None and instant >= end:
                break
            fires.append(instant)
            if len(fires) >= limit:
                break
    except OverflowError:
        pass  # ran off the end of the calendar (year 9999)
    return fires


def _wall_clock(moment, tz):
    return moment.astimezone(tz).replace(tzinfo=None)


def _schedule_search_window(start, end, tz, earliest=None):
    """Naive local bounds for a search: just before `start`, and a last date.

    The search begins one microsecond before `start`: a time inside a gap maps
    to the gap's end, which may be `start` itself.
    """
    begin = _wall_clock(start - _ONE_MICROSECOND, tz)
    base = begin if earliest is None else max(begin, earliest)
    last = _schedule_add_years(base.date(), _SCHEDULE_HORIZON_YEARS)
    if end is not None:
        last = min(last, _wall_clock(min(end, _SCHEDULE_END), tz).date() + _dt.timedelta(days=2))
    return begin, last


def _schedule_add_years(day, years):
    year = day.year + years
    if year > _SCHEDULE_LAST_DATE.year:
        return _SCHEDULE_LAST_DATE
    return _dt.date(year, day.month, min(day.day, 28))


def _first_of_next_month(day):
    if day.month == 12:
        return _dt.date(day.year + 1, 1, 1)
    return _dt.date(day.year, day.month + 1, 1)


def _days_in_month(year, month):
    return calendar.monthrange(year, month)[1]


def _naive_at(day, hour=0, minute=0, second=0):
    """A naive datetime on `day` (no `time` import: it would shadow the module)."""
    return _dt.datetime(day.year, day.month, day.day, hour, minute, second)


# Schedules, dispatch.

_SCHEDULE_KEYS = {
    "interval": ("interval", "anchor_date", "timezone"),
    "cron": ("cron", "timezone", "day_or"),
    "rrule": ("rrule", "timezone"),
}


def _compile_schedule(schedule):
    if not isinstance(schedule, dict):
        raise ScheduleError("schedule", "must be an object with one of 'interval', 'cron' or 'rrule'")
    kinds = [kind for kind in _SCHEDULE_KEYS if kind in schedule]
    if len(kinds) != 1:
        found = ", ".join(repr(kind) for kind in kinds) or "none"
        raise ScheduleError(
            "schedule",
            f"must contain exactly one of 'interval', 'cron' or 'rrule' (found {found})",
        )
    kind = kinds[0]
    for key in schedule:
        if key not in _SCHEDULE_KEYS[kind]:
            allowed = ", ".join(_SCHEDULE_KEYS[kind])
            raise ScheduleError(str(key), f"unexpected field for a {kind} schedule (allowed: {allowed})")
    return _SCHEDULE_COMPILERS[kind](schedule)


# Schedules, interval.


def _compile_interval(schedule):
    step = _interval_step(schedule["interval"])
    name, tz = _schedule_optional_zone(schedule)
    anchor = _interval_anchor(schedule.get("anchor_date"), tz)
    normalised = {
        "interval": step.total_seconds(),
        "anchor_date": anchor.isoformat(),
        "timezone": name or "UTC",
    }
    return normalised, "interval", (anchor.astimezone(_UTC), step, tz)


def _interval_step(value):
    seconds = value
    if isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            seconds = None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ScheduleError("interval", f"must be a number of seconds, got {_schedule_quote(value)}")
    if not math.isfinite(seconds):
        raise ScheduleError("interval", f"must be a finite number of seconds, got {value}")
    try:
        step = _dt.timedelta(seconds=seconds)
    except OverflowError:
        raise ScheduleError("interval", f"{value} seconds is too large") from None
    if step <= _dt.timedelta(0):
        raise ScheduleError("interval", f"must be positive (at least one microsecond), got {value}")
    return step


def _interval_anchor(value, tz):
    if value is None:
        return DEFAULT_ANCHOR_DATE
    if isinstance(value, str):
        try:
            value = _dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ScheduleError("anchor_date", f"{_schedule_quote(value)} is not an ISO 8601 date-time") from None
    if not isinstance(value, _dt.datetime):
        raise ScheduleError("anchor_date", "must be an ISO 8601 date-time string")
    if value.utcoffset() is None:
        # a naive anchor is wall-clock time in the schedule's timezone
        value = _wall_to_instant(value, tz).astimezone(tz)
    return value


def _interval_fire_times(compiled, start, end, limit):
    anchor, step, tz = compiled
    if step >= _ONE_DAY:
        instants = _interval_wall_clock_steps(anchor, step, tz, start)
    else:
        instants = _interval_absolute_steps(anchor, step, start)
    return _collect_fires(instants, start, end, limit)


def _interval_first_step(anchor, step, start):
    behind = (start - anchor) // _ONE_MICROSECOND
    return -(-behind // (step // _ONE_MICROSECOND))  # ceiling division


def _interval_absolute_steps(anchor, step, start):
    # Shorter than a day: plain elapsed time, so an hourly schedule fires
    # every real hour, and twice at "01:xx" local on a fall-back night.
    k = _interval_first_step(anchor, step, start)
    while True:
        try:
            yield anchor + step * k
        except OverflowError:
            return
        k += 1


def _interval_wall_clock_steps(anchor, step, tz, start):
    # A day or longer: step the local wall clock (pendulum's add(days=...)),
    # so a daily 09:00 stays at 09:00 local across DST changes.
    local_anchor = _wall_clock(anchor, tz)
    # Wall-clock and elapsed steps differ by at most one offset change (< 2
    # days), so three steps back is early enough; _collect_fires drops the extras.
    k = _interval_first_step(anchor, step, start) - 3
    while True:
        try:
            yield _wall_to_instant(local_anchor + step * k, tz)
        except OverflowError:
            return
        k += 1


# Schedules, cron.

_CRON_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_CRON_MONTH_NAMES = {
    name: number for number, name in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split(), start=1)
}
_CRON_DAY_NAMES = {name: number for number, name in enumerate("SUN MON TUE WED THU FRI SAT".split())}
_CRON_ITEM = re.compile(r"^(?:(\*)|([A-Z0-9]+)(?:-([A-Z0-9]+))?)(?:/([0-9]+))?$")
_CRON_NTH = re.compile(r"^([A-Z0-9]+)#([0-9]+)$")


def _compile_cron(schedule):
    expression = schedule["cron"]
    if not isinstance(expression, str):
        raise ScheduleError("cron", "must be a string such as '0 9 * * 1-5'")
    day_or = schedule.get("day_or", True)
    if day_or is None:
        day_or = True
    if not isinstance(day_or, bool):
        raise ScheduleError("day_or", f"must be true or false, got {_schedule_quote(day_or)}")
    name, tz = _schedule_optional_zone(schedule)
    spec = _parse_cron(expression, day_or)
    spec["tz"] = tz
    # Prefect 2 leaves a missing cron timezone as null (evaluated in UTC)
    normalised = {"cron": expression, "timezone": name, "day_or": day_or}
    return normalised, "cron", spec


def _parse_cron(expression, day_or):
    text = expression.strip()
    if text.startswith("@"):
        if text.lower() not in _CRON_MACROS:
            supported = ", ".join(_CRON_MACROS)
            raise ScheduleError("cron", f"unsupported macro {_schedule_quote(text)} (supported: {supported})")
        text = _CRON_MACROS[text.lower()]
    fields = text.upper().split()
    if len(fields) != 5:
        raise ScheduleError(
            "cron",
            f"{_schedule_quote(expression)} has {len(fields)} fields; expected 5: "
            "minute hour day-of-month month day-of-week",
        )
    minutes, _ = _cron_field(fields[0], "minute", 0, 59)
    hours, _ = _cron_field(fields[1], "hour", 0, 23)
    days, last_day = _cron_field(fields[2], "day-of-month", 1, 31, allow_last=True)
    months, _ = _cron_field(fields[3], "month", 1, 12, names=_CRON_MONTH_NAMES)
    weekdays, nth = _cron_field(fields[4], "day-of-week", 0, 7, names=_CRON_DAY_NAMES, allow_nth=True)
    if 7 in weekdays:  # 7 is another name for Sunday
        weekdays = (weekdays - {7}) | {0}
    nth = frozenset((0 if day == 7 else day, k) for day, k in nth)
    spec = {
        "minutes": tuple(sorted(minutes)),
        "hours": tuple(sorted(hours)),
        "days": frozenset(days),
        "last_day": bool(last_day),
        "months": frozenset(months),
        "weekdays": frozenset(weekdays),
        "nth": nth,
        # croniter semantics: a field is unrestricted when it covers its whole
        # range, so "*/1" is unrestricted but "*/2" is a restriction
        "dom_any": len(days) == 31 and not last_day,
        "dow_any": len(weekdays) == 7 and not nth,
        "day_or": day_or,
    }
    spec["satisfiable"] = _cron_can_fire(spec)
    return spec


def _cron_field(text, name, low, high, names=None, allow_last=False, allow_nth=False):
    """Values of one cron field, plus its specials ('L' flag or '#' pairs)."""
    values, specials = set(), set()
    for item in text.split(","):
        if allow_last and item == "L":
            specials.add(True)
            continue
        nth = _CRON_NTH.match(item) if allow_nth else None
        if nth:
            day = _cron_value(nth.group(1), name, low, high, names)
            k = int(nth.group(2))
            if not 1 <= k <= 5:
                raise ScheduleError("cron", f"{_schedule_quote(item)} in {name}: '#' must be 1 to 5")
            specials.add((day, k))
            continue
        values |= _cron_item(item, name, low, high, names)
    return values, specials


def _cron_item(item, name, low, high, names):
    match = _CRON_ITEM.match(item)
    if not match:
        raise ScheduleError("cron", _cron_item_problem(item, name, names))
    star, first, last, step = match.groups()
    if step is not None:
        step = int(step)
        if step == 0:
            raise ScheduleError("cron", f"{_schedule_quote(item)} in {name}: step must be at least 1")
    if star:
        begin, finish = low, high
    else:
        begin = _cron_value(first, name, low, high, names)
        # "5/15" means 5, 20, 35, 50 (croniter); a lone value is itself
        finish = high if last is None and step else begin
        if last is not None:
            finish = _cron_value(last, name, low, high, names)
        if begin > finish:
            raise ScheduleError("cron", f"{_schedule_quote(item)} in {name}: range start is after its end")
    return set(range(begin, finish + 1, step or 1))


def _cron_value(token, name, low, high, names):
    if token.isdigit():
        value = int(token)
    elif names and token in names:
        value = names[token]
    else:
        raise ScheduleError("cron", _cron_item_problem(token, name, names))
    if not low <= value <= high:
        raise ScheduleError("cron", f"{name} value {value} is out of range {low}-{high}")
    return value


def _cron_item_problem(item, name, names=None):
    # name the unsupported croniter/Quartz extension rather than just "invalid"
    if item == "?":
        return f"'?' in {name} is not supported; use '*'"
    if item.startswith("H"):
        return f"hashed expressions ('H') are not supported: {_schedule_quote(item)} in {name}"
    if item.startswith("R"):
        return f"random expressions ('R') are not supported: {_schedule_quote(item)} in {name}"
    if "W" in item and name == "day-of-month":
        return f"nearest-weekday ('W') is not supported: {_schedule_quote(item)} in {name}"
    if "L" in item:
        return f"'L' is only supported on its own in day-of-month: {_schedule_quote(item)} in {name}"
    if "#" in item:
        return f"'#' is only supported in day-of-week, as DAY#N: {_schedule_quote(item)} in {name}"
    hint = f" (names allowed: {', '.join(names)})" if names else ""
    return f"{_schedule_quote(item)} is not a valid {name} value{hint}"


def _cron_day_matches(spec, day):
    if spec["dom_any"] and spec["dow_any"]:
        return True
    dom = day.day in spec["days"] or (spec["last_day"] and day.day == _days_in_month(day.year, day.month))
    weekday = (day.weekday() + 1) % 7  # cron counts from Sunday = 0
    dow = weekday in spec["weekdays"] or (weekday, (day.day - 1) // 7 + 1) in spec["nth"]
    if spec["dom_any"]:
        return dow
    if spec["dow_any"]:
        return dom
    return (dom or dow) if spec["day_or"] else (dom and dow)


def _cron_can_fire(spec):
    """False when no date can ever match (e.g. '0 0 30 2 *'); cheap static check."""
    if spec["dom_any"]:
        return True
    if spec["day_or"] and not spec["dow_any"]:
        return True  # the weekday alone matches some day every month
    lengths = {_days_in_month(2000, month) for month in spec["months"]}  # 2000: Feb 29
    days = {day for day in spec["days"] if day <= max(lengths)}
    if spec["last_day"]:
        days |= lengths
    if spec["dow_any"] or spec["weekdays"]:
        return bool(days)  # every weekday falls on every day number some year
    # only DAY#N entries: the N-th weekday falls on days 7N-6 .. 7N
    return any((day - 1) // 7 + 1 == n for day in days for _weekday, n in spec["nth"])


def _cron_local_times(spec, begin, last_day):
    """Naive local times matching the spec, from `begin` through `last_day`."""
    day = begin.date()
    while day <= last_day:
        if day.month not in spec["months"]:
            day = _first_of_next_month(day)
            continue
        if _cron_day_matches(spec, day):
            for hour in spec["hours"]:
                for minute in spec["minutes"]:
                    moment = _dt.datetime(day.year, day.month, day.day, hour, minute)
                    if moment >= begin:
                        yield moment
        day += _ONE_DAY


def _cron_fire_times(spec, start, end, limit):
    if not spec["satisfiable"]:
        return []
    tz = spec["tz"]
    begin, last_day = _schedule_search_window(start, end, tz)
    moments = _cron_local_times(spec, begin, last_day)
    instants = (_wall_to_instant(moment, tz) for moment in moments)
    return _collect_fires(instants, start, end, limit)


# Schedules, rrule (RFC 5545 subset).

_RRULE_FREQUENCIES = ("YEARLY", "MONTHLY", "WEEKLY", "DAILY", "HOURLY", "MINUTELY")
_RRULE_WEEKDAYS = {"MO": 0, "TU": 1, "WE": 2, "TH": 3, "FR": 4, "SA": 5, "SU": 6}
_RRULE_UNSUPPORTED_PARTS = ("BYSECOND", "BYWEEKNO", "BYYEARDAY", "BYEASTER")
_RRULE_UNSUPPORTED_LINES = ("EXDATE", "RDATE", "EXRULE")
_RRULE_MOMENT = re.compile(r"^(\d{4})(\d{2})(\d{2})(?:T(\d{2})(\d{2})(\d{2})(Z)?)?$")
_RRULE_BYDAY = re.compile(r"^([+-]?\d{1,2})?(MO|TU|WE|TH|FR|SA|SU)$")
_RRULE_INTEGER = re.compile(r"^[+-]?\d+$")


def _compile_rrule(schedule):
    text = schedule["rrule"]
    if not isinstance(text, str) or not text.strip():
        raise ScheduleError("rrule", "must be a non-empty RRULE string")
    if len(text) > MAX_RRULE_LENGTH:
        raise ScheduleError("rrule", f"is {len(text)} characters long; at most {MAX_RRULE_LENGTH} are allowed")
    name, tz = _schedule_optional_zone(schedule)
    rule = _parse_rrule(text, tz)
    return {"rrule": text, "timezone": name or "UTC"}, "rrule", rule


def _rrule_error(message):
    return ScheduleError("rrule", message)


def _parse_rrule(text, default_tz):
    dtstart_line, rule_line = None, None
    # like dateutil's rrulestr, properties may be separated by any whitespace
    for token in text.split():
        head, colon, value = token.partition(":")
        if not colon:
            head, value = "RRULE", token  # a bare "FREQ=...;..." rule
        prop = head.split(";")[0].upper()
        if prop == "DTSTART":
            if dtstart_line is not None:
                raise _rrule_error("more than one DTSTART is not supported")
            dtstart_line = (head, value)
        elif prop == "RRULE":
            if rule_line is not None:
                raise _rrule_error("more than one RRULE is not supported")
            rule_line = value
        elif prop in _RRULE_UNSUPPORTED_LINES:
            raise _rrule_error(f"{prop} is not supported")
        else:
            raise _rrule_error(f"unknown property {_schedule_quote(prop)}; expected DTSTART or RRULE")
    if rule_line is None:
        raise _rrule_error("no RRULE found (expected e.g. 'RRULE:FREQ=DAILY')")
    tz, dtstart = default_tz, _dt.datetime(2020, 1, 1)
    if dtstart_line is not None:
        tz, dtstart = _rrule_dtstart(*dtstart_line, default_tz)
    rule = _rrule_parts(rule_line, tz, dtstart)
    _rrule_check_reachable(rule)
    rule["satisfiable"] = _rrule_can_fire(rule)
    return rule


def _rrule_dtstart(head, value, default_tz):
    tz = default_tz
    for parameter in head.split(";")[1:]:
        key, _, param_value = parameter.partition("=")
        key = key.upper()
        if key == "TZID":
            tz = _rrule_tzid_zone(param_value, default_tz)
        elif key == "VALUE" and param_value.upper() in ("DATE", "DATE-TIME"):
            continue
        else:
            raise _rrule_error(f"DTSTART parameter {_schedule_quote(parameter)} is not supported")
    moment, is_utc = _rrule_moment(value, "DTSTART")
    if is_utc:
        if ";TZID=" in head.upper():
            raise _rrule_error("DTSTART cannot have both TZID and a trailing 'Z'")
        tz = _UTC
    return tz, moment


def _rrule_tzid_zone(name, default_tz):
    """DTSTART's TZID zone. A name no IANA zone has (old aliases such as "US-Eastern", which Prefect's own
    CLI tests send) is no error: Prefect accepts any TZID and times the rule in the schedule's timezone,
    so that is the zone then."""
    try:
        return _schedule_zone(name, field="rrule", what="DTSTART TZID")
    except ScheduleError:
        return default_tz


def _rrule_moment(value, what):
    match = _RRULE_MOMENT.match(value.upper())
    if not match:
        raise _rrule_error(
            f"{what} {_schedule_quote(value)} must look like 20260101T090000, 20260101T090000Z or 20260101"
        )
    parts = [int(part) for part in match.groups()[:6] if part is not None]
    try:
        return _dt.datetime(*parts), match.group(7) is not None
    except ValueError as exc:
        raise _rrule_error(f"{what} {_schedule_quote(value)} is not a valid date: {exc}") from None


def _rrule_parts(line, tz, dtstart):
    parts = {}
    for part in line.split(";"):
        if not part:
            continue
        key, equals, value = part.partition("=")
        key = key.upper()
        if not equals or not value:
            raise _rrule_error(f"rule part {_schedule_quote(part)} must look like NAME=VALUE")
        if key in parts:
            raise _rrule_error(f"{key} is given more than once")
        parts[key] = value.upper()
    for key in parts:
        if key in _RRULE_UNSUPPORTED_PARTS:
            raise _rrule_error(f"{key} is not supported")
        if key not in _RRULE_READERS:
            raise _rrule_error(f"unknown rule part {_schedule_quote(key)}")
    if "FREQ" not in parts:
        raise _rrule_error("FREQ is required (e.g. FREQ=DAILY)")
    freq = parts["FREQ"]
    if freq == "SECONDLY":
        raise _rrule_error("FREQ=SECONDLY is not supported")
    if freq not in _RRULE_FREQUENCIES:
        choices = ", ".join(_RRULE_FREQUENCIES)
        raise _rrule_error(f"FREQ={freq} is not valid (use one of {choices})")
    if "COUNT" in parts and "UNTIL" in parts:
        raise _rrule_error("COUNT and UNTIL cannot both be given")
    rule = {"tz": tz, "dtstart": dtstart, "freq": freq}
    for key, read in _RRULE_READERS.items():
        if key != "FREQ":
            rule[key.lower()] = read(parts[key], rule) if key in parts else None
    _rrule_defaults(rule)
    return rule


def _rrule_int_list(value, key, low, high, allow_negative=False):
    numbers = []
    for item in value.split(","):
        if not _RRULE_INTEGER.match(item):
            raise _rrule_error(f"{key} value {_schedule_quote(item)} is not an integer")
        number = int(item)
        if not (low <= abs(number) <= high if allow_negative else low <= number <= high):
            bounds = f"±{low}..{high}" if allow_negative else f"{low}..{high}"
            raise _rrule_error(f"{key} value {number} is out of range {bounds}")
        numbers.append(number)
    return numbers


def _rrule_read_positive(key):
    def read(value, _rule):
        number = _rrule_int_list(value, key, 1, 10**9)
        if len(number) != 1:
            raise _rrule_error(f"{key} takes a single integer")
        return number[0]

    return read


def _rrule_read_until(value, rule):
    # inclusive; a bare date means its midnight (dateutil); without 'Z' it is
    # wall-clock time in the rule's timezone, like DTSTART
    moment, is_utc = _rrule_moment(value, "UNTIL")
    if is_utc:
        return moment.replace(tzinfo=_UTC)
    return _wall_to_instant(moment, rule["tz"])


def _rrule_read_byday(value, rule):
    plain, nth = set(), set()
    for item in value.split(","):
        match = _RRULE_BYDAY.match(item)
        if not match:
            raise _rrule_error(f"BYDAY value {_schedule_quote(item)} is not like MO, 1MO or -1FR")
        ordinal, weekday = match.group(1), _RRULE_WEEKDAYS[match.group(2)]
        if ordinal is None:
            plain.add(weekday)
            continue
        if rule["freq"] not in ("MONTHLY", "YEARLY"):
            raise _rrule_error(f"BYDAY ordinal {_schedule_quote(item)} is only supported with FREQ=MONTHLY or YEARLY")
        nth.add((int(ordinal), weekday))
    if plain and nth:
        # RFC 5545 would take the union, but dateutil (so Prefect) requires
        # both; rather than pick one silently, refuse the mix
        raise _rrule_error(f"BYDAY={value} mixes weekdays with and without ordinals; use separate schedules")
    return frozenset(plain), frozenset(nth)


def _rrule_read_wkst(value, _rule):
    if value not in _RRULE_WEEKDAYS:
        raise _rrule_error(f"WKST value {_schedule_quote(value)} is not a weekday code like MO")
    return _RRULE_WEEKDAYS[value]


_RRULE_READERS = {
    "FREQ": None,
    "INTERVAL": _rrule_read_positive("INTERVAL"),
    "COUNT": _rrule_read_positive("COUNT"),
    "UNTIL": _rrule_read_until,
    "BYMONTH": lambda value, _rule: frozenset(_rrule_int_list(value, "BYMONTH", 1, 12)),
    "BYMONTHDAY": lambda value, _rule: frozenset(_rrule_int_list(value, "BYMONTHDAY", 1, 31, allow_negative=True)),
    "BYDAY": _rrule_read_byday,
    "BYHOUR": lambda value, _rule: tuple(sorted(set(_rrule_int_list(value, "BYHOUR", 0, 23)))),
    "BYMINUTE": lambda value, _rule: tuple(sorted(set(_rrule_int_list(value, "BYMINUTE", 0, 59)))),
    "BYSETPOS": lambda value, _rule: tuple(_rrule_int_list(value, "BYSETPOS", 1, 366, allow_negative=True)),
    "WKST": _rrule_read_wkst,
}


def _rrule_defaults(rule):
    # dateutil/RFC 5545: parts the rule leaves out come from DTSTART
    start, freq = rule["dtstart"], rule["freq"]
    rule["interval"] = rule["interval"] or 1
    rule["wkst"] = 0 if rule["wkst"] is None else rule["wkst"]
    if not (rule["bymonthday"] or rule["byday"]):
        if freq == "YEARLY":
            rule["bymonth"] = rule["bymonth"] or frozenset([start.month])
            rule["bymonthday"] = frozenset([start.day])
        elif freq == "MONTHLY":
            rule["bymonthday"] = frozenset([start.day])
        elif freq == "WEEKLY":
            rule["byday"] = (frozenset([start.weekday()]), frozenset())
    # ordinals count within the month, or within the year for a YEARLY rule
    # without BYMONTH ("20MO" = the 20th Monday of the year)
    rule["ordinal_scope"] = "year" if freq == "YEARLY" and not rule["bymonth"] else "month"
    limit = 53 if rule["ordinal_scope"] == "year" else 5
    for ordinal, _weekday in (rule["byday"] or ((), ()))[1]:
        if not 1 <= abs(ordinal) <= limit:
            raise _rrule_error(f"BYDAY ordinal {ordinal} is out of range ±1..{limit} within a {rule['ordinal_scope']}")
    sub_daily = freq in ("HOURLY", "MINUTELY")
    if rule["byhour"] is None and not sub_daily:
        rule["byhour"] = (start.hour,)
    if rule["byminute"] is None and freq != "MINUTELY":
        rule["byminute"] = (start.minute,)


def _rrule_monthday_fits(monthday, month):
    return abs(monthday) <= _days_in_month(2000, month)  # 2000: February has 29


def _rrule_check_reachable(rule):
    # dateutil (so Prefect) rejects an HOURLY/MINUTELY rule whose BYHOUR or
    # BYMINUTE values are never reached from DTSTART at this INTERVAL
    start, step, freq = rule["dtstart"], rule["interval"], rule["freq"]
    if freq == "HOURLY":
        key, values, origin, base = "BYHOUR", rule["byhour"], start.hour, 24
    elif freq == "MINUTELY":
        key, values, origin, base = "BYMINUTE", rule["byminute"], start.minute, 60
    else:
        return
    reach = math.gcd(step, base)
    if values and not any((value - origin) % reach == 0 for value in values):
        raise _rrule_error(
            f"{key} is never reached: FREQ={freq};INTERVAL={step} from DTSTART "
            f"only gives values {origin % reach} + multiples of {reach}"
        )


def _rrule_can_fire(rule):
    """False when the rule can never produce a time (cheap static checks)."""
    start, step, freq = rule["dtstart"], rule["interval"], rule["freq"]
    months = rule["bymonth"] or range(1, 13)
    if rule["bymonthday"] and not any(
        _rrule_monthday_fits(day, month) for month in months for day in rule["bymonthday"]
    ):
        return False  # e.g. February 30th
    if rule["bysetpos"] and min(abs(p) for p in rule["bysetpos"]) > _rrule_largest_period(rule):
        return False  # e.g. BYSETPOS=2 with FREQ=DAILY and one time a day
    if freq == "MONTHLY" and rule["bymonth"]:
        reach = math.gcd(step, 12)  # months reachable from DTSTART's month
        if not any((month - start.month) % reach == 0 for month in rule["bymonth"]):
            return False
    if freq == "DAILY" and rule["byday"] and step % 7 == 0:
        if start.weekday() not in rule["byday"][0]:
            return False
    if freq == "MINUTELY":
        reach = math.gcd(step, 1440)  # minutes of the day reachable
        hours = rule["byhour"] or range(24)
        minutes = rule["byminute"] or range(60)
        origin = start.hour * 60 + start.minute
        if not any((h * 60 + m - origin) % reach == 0 for h in hours for m in minutes):
            return False
    return True


def _rrule_largest_period(rule):
    """Most occurrences one period can hold, for the BYSETPOS check."""
    freq = rule["freq"]
    months = len(rule["bymonth"] or range(12)) if freq == "YEARLY" else 1
    if freq in ("DAILY", "HOURLY", "MINUTELY"):
        days = 1
    elif rule["byday"]:
        plain, nth = rule["byday"]
        if freq == "WEEKLY":
            days = len(plain)
        elif rule["ordinal_scope"] == "year":
            days = 53 * len(plain) + len(nth)
        else:
            days = months * (5 * len(plain) + len(nth))
    else:
        days = {"WEEKLY": 7, "MONTHLY": 31, "YEARLY": 366}[freq]
    if rule["bymonthday"] and freq != "DAILY":
        days = min(days, months * len(rule["bymonthday"]))
    hours = len(rule["byhour"]) if freq not in ("HOURLY", "MINUTELY") else 1
    minutes = len(rule["byminute"]) if freq != "MINUTELY" else 1
    return days * hours * minutes


def _rrule_day_matches(rule, day):
    if rule["bymonth"] and day.month not in rule["bymonth"]:
        return False
    length = _days_in_month(day.year, day.month)
    monthdays = rule["bymonthday"]
    if monthdays and day.day not in monthdays and day.day - length - 1 not in monthdays:
        return False
    if not rule["byday"]:
        return True
    plain, nth = rule["byday"]
    weekday = day.weekday()
    if weekday in plain:
        return True
    if not nth:
        return False
    if rule["ordinal_scope"] == "month":
        position, remaining = day.day, length - day.day
    else:
        position = day.timetuple().tm_yday
        remaining = (366 if calendar.isleap(day.year) else 365) - position
    return ((position - 1) // 7 + 1, weekday) in nth or (-(remaining // 7 + 1), weekday) in nth


# A period is one FREQ unit (a year, month, week, day, hour or minute), numbered
# so that consecutive units differ by one; INTERVAL=n keeps every n-th unit.


def _rrule_unit_of(rule, moment):
    freq = rule["freq"]
    if freq == "YEARLY":
        return moment.year
    if freq == "MONTHLY":
        return moment.year * 12 + moment.month - 1
    ordinal = moment.toordinal()
    if freq == "WEEKLY":
        return (ordinal - 1 - rule["wkst"]) // 7  # ordinal 1 is a Monday
    if freq == "DAILY":
        return ordinal
    if freq == "HOURLY":
        return ordinal * 24 + moment.hour
    return (ordinal * 24 + moment.hour) * 60 + moment.minute


def _rrule_unit_start(rule, unit):
    freq = rule["freq"]
    if freq == "YEARLY":
        return _dt.datetime(unit, 1, 1)
    if freq == "MONTHLY":
        return _dt.datetime(unit // 12, unit % 12 + 1, 1)
    if freq == "WEEKLY":
        return _dt.datetime.fromordinal(unit * 7 + 1 + rule["wkst"])
    if freq == "DAILY":
        return _dt.datetime.fromordinal(unit)
    if freq == "HOURLY":
        return _dt.datetime.fromordinal(unit // 24) + _dt.timedelta(hours=unit % 24)
    return _dt.datetime.fromordinal(unit // 1440) + _dt.timedelta(minutes=unit % 1440)


def _rrule_period_days(rule, begin):
    """Dates of a YEARLY/MONTHLY/WEEKLY/DAILY period that pass the day rules."""
    freq = rule["freq"]
    if freq == "DAILY":
        candidates = [begin.date()]
    elif freq == "WEEKLY":
        # like dateutil, the first week only holds the days from DTSTART on,
        # which matters for BYSETPOS
        first = max(begin.date(), rule["dtstart"].date())
        candidates = [first + _dt.timedelta(days=i) for i in range((begin.date() - first).days + 7)]
    else:
        months = [begin.month] if freq == "MONTHLY" else sorted(rule["bymonth"] or range(1, 13))
        candidates = [day for month in months for day in _rrule_month_candidates(rule, begin.year, month)]
    return [day for day in candidates if _rrule_day_matches(rule, day)]


def _rrule_month_candidates(rule, year, month):
    length = _days_in_month(year, month)
    if rule["bymonthday"]:
        # only the named days, not all ~30 of them (BYDAY then filters them)
        days = {d if d > 0 else length + 1 + d for d in rule["bymonthday"]}
        return [_dt.date(year, month, d) for d in sorted(days) if 1 <= d <= length]
    return [_dt.date(year, month, d) for d in range(1, length + 1)]


def _rrule_period_times(rule, begin):
    """Sorted naive occurrences of the period starting at `begin`, BYSETPOS applied."""
    freq, second = rule["freq"], rule["dtstart"].second
    if freq == "HOURLY":
        if rule["byhour"] and begin.hour not in rule["byhour"]:
            return []
        times = [begin.replace(minute=m, second=second) for m in rule["byminute"]]
    elif freq == "MINUTELY":
        if rule["byminute"] and begin.minute not in rule["byminute"]:
            return []
        times = [begin.replace(second=second)]
    else:
        times = [
            _naive_at(day, hour, minute, second)
            for day in _rrule_period_days(rule, begin)
            for hour in rule["byhour"]
            for minute in rule["byminute"]
        ]
    if rule["bysetpos"] and times:
        count = len(times)
        picked = {times[p - 1 if p > 0 else p] for p in rule["bysetpos"] if abs(p) <= count}
        times = sorted(picked)
    return times


def _rrule_skip_target(rule, begin):
    """For day-or-finer periods, where to jump when `begin` cannot match, else None."""
    if rule["freq"] not in ("DAILY", "HOURLY", "MINUTELY"):
        return None
    day = begin.date()
    if rule["bymonth"] and day.month not in rule["bymonth"]:
        return _naive_at(_first_of_next_month(day))
    if rule["freq"] != "DAILY" and not _rrule_day_matches(rule, day):
        return _naive_at(day + _ONE_DAY)
    if rule["freq"] == "MINUTELY" and rule["byhour"] and begin.hour not in rule["byhour"]:
        return begin.replace(minute=0) + _dt.timedelta(hours=1)
    return None


def _rrule_local_times(rule, begin, last_day):
    """Naive local occurrences (>= DTSTART, COUNT applied) from the period of `begin`."""
    origin, step, count = _rrule_unit_of(rule, rule["dtstart"]), rule["interval"], rule["count"]

    def first_period_from(moment):
        return -(-(_rrule_unit_of(rule, moment) - origin) // step)

    k = 0
    if count is None and begin > rule["dtstart"]:
        # COUNT counts from DTSTART, so only a rule without it may jump ahead
        k = first_period_from(begin)
    emitted = 0
    per_day = {}  # HOURLY/MINUTELY: occurrences in a whole day, by phase
    while True:
        try:
            period = _rrule_unit_start(rule, origin + k * step)
        except (ValueError, OverflowError):
            return  # past year 9999
        if period.date() > last_day:
            return
        target = _rrule_skip_target(rule, period)
        if target is not None:
            k = max(k + 1, first_period_from(target))
            continue
        if count is not None and _rrule_countable_day(rule, period, begin, origin + k * step):
            # a whole day before the search: count it in one step, so a
            # large COUNT with an old DTSTART does not walk every minute
            whole = _rrule_whole_day_count(rule, period, per_day)
            if emitted + whole < count:
                emitted += whole
                k = first_period_from(_naive_at(period.date() + _ONE_DAY))
                continue
        for moment in _rrule_period_times(rule, period):
            if moment < rule["dtstart"]:
                continue
            yield moment
            emitted += 1
            if count is not None and emitted >= count:
                return
        k += 1


def _rrule_countable_day(rule, period, begin, unit):
    """True for the first HOURLY/MINUTELY period of a day wholly between DTSTART and `begin`."""
    if rule["freq"] not in ("HOURLY", "MINUTELY"):
        return False
    day = period.date()
    if not rule["dtstart"].date() < day < begin.date():
        return False
    return unit - rule["interval"] < _rrule_unit_of(rule, _naive_at(day))


def _rrule_whole_day_count(rule, period, cache):
    # within a day that passes the date rules, the occurrences depend only on
    # where the INTERVAL grid starts in the day
    midnight = _naive_at(period.date())
    phase = _rrule_unit_of(rule, period) - _rrule_unit_of(rule, midnight)
    if phase not in cache:
        unit = _dt.timedelta(hours=1) if rule["freq"] == "HOURLY" else _dt.timedelta(minutes=1)
        units_per_day = _ONE_DAY // unit
        total = 0
        for offset in range(phase, units_per_day, rule["interval"]):
            moment = midnight + unit * offset
            if _rrule_skip_target(rule, moment) is None:
                total += len(_rrule_period_times(rule, moment))
        cache[phase] = total
    return cache[phase]


def _rrule_fire_times(rule, start, end, limit):
    if not rule["satisfiable"]:
        return []
    tz, until = rule["tz"], rule["until"]
    begin, last_day = _schedule_search_window(start, end, tz, earliest=rule["dtstart"])
    if until is not None:
        until_day = _wall_clock(min(until, _SCHEDULE_END), tz).date()
        last_day = min(last_day, until_day + _dt.timedelta(days=2))

    def instants():
        for moment in _rrule_local_times(rule, begin, last_day):
            instant = _wall_to_instant(moment, tz)
            if until is not None and instant > until:
                return
            yield instant

    return _collect_fires(instants(), start, end, limit)


_SCHEDULE_COMPILERS = {
    "interval": _compile_interval,
    "cron": _compile_cron,
    "rrule": _compile_rrule,
}
_SCHEDULE_FIRE_TIMES = {
    "interval": _interval_fire_times,
    "cron": _cron_fire_times,
    "rrule": _rrule_fire_times,
}


# --- 8. Records ---
# Owns the mapping between rows and API objects (JSON and boolean columns, computed fields) and the
# filter language of the SDK and UI (any_, not_any_, like_, before_, after_, is_null_, all_, ge_, ...,
# operator and_/or_, nesting, cross-object filters), compiled to parametrised SQL.


class NotFound(Exception):
    def __init__(self, detail="Not found."):
        super().__init__(detail)
        self.detail = detail


class Conflict(Exception):
    def __init__(self, detail):
        super().__init__(detail)
        self.detail = detail


JSON_COLUMNS = {
    "flow": ("tags", "labels"),
    "flow_run": ("parameters", "context", "empirical_policy", "tags", "labels", "state", "created_by", "job_variables"),
    "task_run": ("empirical_policy", "tags", "task_inputs", "labels", "state"),
    "flow_run_state": ("data", "state_details"),
    "task_run_state": ("data", "state_details"),
    "deployment": (
        "parameters",
        "tags",
        "labels",
        "parameter_openapi_schema",
        "pull_steps",
        "job_variables",
        "infra_overrides",
        "created_by",
        "updated_by",
        "concurrency_options",
    ),
    "deployment_schedule": ("schedule", "parameters"),
    "work_pool": ("base_job_template", "storage_configuration"),
    "work_queue": ("filter",),
    "block_schema": ("fields", "capabilities"),
    "block_document": ("data",),
    "variable": ("value", "tags"),
    "artifact": ("data", "metadata_"),
    "concurrency_limit": ("active_slots",),
    "flow_run_notification_policy": ("state_names", "tags"),
    "saved_search": ("filters",),
    "events": ("resource", "related_resource_ids", "related", "payload"),
    "event_resources": ("resource",),
    "configuration": ("value",),
    "concurrency_lease": ("limit_ids", "holder"),
    "automation": ("tags", "trigger", "actions", "actions_on_trigger", "actions_on_resolve"),
    "automation_bucket": ("last_event", "triggering_labels"),
    "automation_action_queue": ("action", "context"),
}
BOOL_COLUMNS = {
    "flow_run": ("auto_scheduled",),
    "deployment": ("paused", "is_schedule_active", "enforce_parameter_schema"),
    "deployment_schedule": ("active", "catchup"),
    "work_pool": ("is_paused",),
    "work_queue": ("is_paused",),
    "block_type": ("is_protected",),
    "block_document": ("is_anonymous",),
    "concurrency_limit_v2": ("active",),
    "flow_run_notification_policy": ("is_active",),
    "automation": ("enabled",),
}
HIDDEN_COLUMNS = {  # stored for our own use, not part of the Prefect 2.20 response shapes
    "flow": ("labels",),
    "flow_run": ("labels", "state_timestamp"),
    "task_run": ("labels", "state_timestamp"),
    "deployment": ("labels",),
}


# One encoder and decoder for the whole module: json.dumps with options builds a new encoder per call.
dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_json_text = json.JSONDecoder().decode  # stored JSON (str) -> value


def _not_a_json_number(text: str):
    raise ValueError(f"{text} is not a JSON number (numbers must be finite)")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e400
        _not_a_json_number(text)
    return number


def loads(text: str | bytes):
    """What a client sent, as JSON (RFC 8259). Python's json also takes NaN, Infinity and numbers too
    large for a float; stored in a JSON column, such a value would make every later read of the row fail
    (SQLite's and PostgreSQL's JSON refuse it), so they are refused here, where the client hears why.
    (A request body is checked after parsing instead, to name the field: Request.json.)"""
    return json.loads(text, parse_constant=_not_a_json_number, parse_float=_finite_float)


def decode_row(table: str, row: dict | None) -> dict | None:
    """A row as the API shows it: JSON columns parsed, booleans as booleans, private columns dropped."""
    if row is None:
        return None
    out = dict(row)
    for col in JSON_COLUMNS.get(table, ()):
        if col in out and isinstance(out[col], str):
            out[col] = _json_text(out[col])
    for col in BOOL_COLUMNS.get(table, ()):
        if col in out and out[col] is not None:
            out[col] = bool(out[col])
    for col in HIDDEN_COLUMNS.get(table, ()):
        out.pop(col, None)
    return out


def encode_values(table: str, values: dict) -> dict:
    json_cols = JSON_COLUMNS.get(table, ())
    return {k: (dumps(v) if k in json_cols and v is not None else v) for k, v in values.items()}


def insert_row(tx: Transaction, table: str, values: dict, on_conflict: str = "") -> int:
    values = encode_values(table, values)
    cols = ", ".join(_quote_column(c) for c in values)
    marks = ", ".join("?" for _ in values)
    cur = tx.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks}) {on_conflict}", tuple(values.values()))
    return cur.rowcount


def update_row(tx: Transaction, table: str, row_id: str, values: dict, key: str = "id") -> int:
    if not values:
        return 0
    values = encode_values(table, values)
    sets = ", ".join(f"{_quote_column(c)} = ?" for c in values)
    cur = tx.execute(f"UPDATE {table} SET {sets} WHERE {key} = ?", (*values.values(), row_id))
    return cur.rowcount


@functools.lru_cache(maxsize=1024)
def _quote_column(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"bad column name {name!r}")  # column names come from our code, never from clients
    return '"limit"' if name == "limit" else name


def read_row(tx: Transaction, table: str, row_id: str, lock: bool = False) -> dict | None:
    suffix = tx.db.for_update if lock else ""
    return tx.query_one(f"SELECT * FROM {table} WHERE id = ?{suffix}", (row_id,))


def require_row(tx, table, row_id, what, lock=False) -> dict:
    row = read_row(tx, table, row_id, lock)
    if row is None:
        raise NotFound(f"{what} not found")
    return row


_RANDOM_POOL = [b"", 0]  # bytes from os.urandom, and how many of them are used
_RANDOM_LOCK = threading.Lock()
os.register_at_fork(after_in_child=lambda: _RANDOM_POOL.__setitem__(slice(None), [b"", 0]))  # never shared


def _random_bytes(n: int) -> bytes:
    """os.urandom(n), fetched 4 KB at a time: one getrandom system call per ~250 ids instead of one
    per id (the write load made 2.4 per request; kernel time was 23% of the server's CPU)."""
    with _RANDOM_LOCK:
        pool, used = _RANDOM_POOL
        if used + n > len(pool):
            pool, used = os.urandom(max(4096, n)), 0
            _RANDOM_POOL[0] = pool
        _RANDOM_POOL[1] = used + n
        return pool[used : used + n]


def new_id() -> str:
    """A random (version 4) UUID as text: what str(uuid.uuid4()) gives, without the UUID object."""
    raw = bytearray(_random_bytes(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# The filter language. FILTERS maps a body key to (table, {field: column | nested spec | function}).
_DATETIME_COLUMNS = {
    "created",
    "updated",
    "start_time",
    "end_time",
    "expected_start_time",
    "next_scheduled_start_time",
    "timestamp",
    "last_heartbeat_time",
    "last_polled",
}
_INT_COLUMNS = {"level", "run_count", "concurrency_limit", "priority"}


def _column_kind(table: str, column: str) -> str:
    if column == "tags":
        return "tags"
    if column in _DATETIME_COLUMNS:
        return "datetime"
    if column in BOOL_COLUMNS.get(table, ()):
        return "bool"
    if column in _INT_COLUMNS:
        return "int"
    if column == "id" or column.endswith("_id"):
        return "uuid"
    return "str"


def _filter_parent_flow_run(tx, table, ops, loc):
    ids = _coerce_list(ops.get("any_"), "uuid", (*loc, "any_"))
    if ids is None:
        return "1=1", []
    marks = ", ".join("?" for _ in ids) or "NULL"
    return (
        f"{table}.parent_task_run_id IN (SELECT task_run.id FROM task_run WHERE task_run.flow_run_id IN ({marks}))",
        ids,
    )


def _filter_subflow_runs(tx, table, ops, loc):
    exists = ops.get("exists_")
    if exists is None:
        return "1=1", []
    if not isinstance(exists, bool):
        raise ValidationFailed([_error((*loc, "exists_"), "value could not be parsed to a boolean", "type_error.bool")])
    sql = f"EXISTS (SELECT 1 FROM flow_run sub WHERE sub.parent_task_run_id = {table}.id)"
    return (sql if exists else f"NOT {sql}"), []


def _filter_flow_deployment(tx, table, ops, loc):
    is_null = ops.get("is_null_")
    if is_null is None:
        return "1=1", []
    sql = f"EXISTS (SELECT 1 FROM deployment d WHERE d.flow_id = {table}.id)"
    return (f"NOT {sql}" if is_null else sql), []


def _filter_block_capabilities(tx, table, ops, loc):
    caps = _coerce_list(ops.get("all_"), "str", (*loc, "all_"))
    if not caps:
        return "1=1", []
    return " AND ".join(tx.db.contains(f"{table}.capabilities") for _ in caps), caps


_STATE_SPEC = {"type": "state_type", "name": "state_name"}
# fmt: off
FILTERS = {
    "flows": ("flow", {"id": "id", "name": "name", "tags": "tags", "deployment": _filter_flow_deployment}),
    "flow_runs": ("flow_run", {
        "id": "id", "name": "name", "tags": "tags", "deployment_id": "deployment_id", "flow_id": "flow_id",
        "work_queue_name": "work_queue_name", "work_queue_id": "work_queue_id", "flow_version": "flow_version",
        "start_time": "start_time", "end_time": "end_time", "expected_start_time": "expected_start_time",
        "next_scheduled_start_time": "next_scheduled_start_time", "parent_task_run_id": "parent_task_run_id",
        "parent_flow_run_id": _filter_parent_flow_run, "idempotency_key": "idempotency_key",
        "state": _STATE_SPEC}),
    "task_runs": ("task_run", {
        "id": "id", "name": "name", "tags": "tags", "flow_run_id": "flow_run_id", "start_time": "start_time",
        "expected_start_time": "expected_start_time", "state": _STATE_SPEC, "subflow_runs": _filter_subflow_runs}),
    "deployments": ("deployment", {
        "id": "id", "name": "name", "tags": "tags", "work_queue_name": "work_queue_name",
        "is_schedule_active": "is_schedule_active", "paused": "paused", "flow_id": "flow_id"}),
    "work_pools": ("work_pool", {"id": "id", "name": "name", "type": "type"}),
    "work_pool_queues": ("work_queue", {"id": "id", "name": "name"}),
    "work_queues": ("work_queue", {"id": "id", "name": "name"}),
    "logs": ("log", {"level": "level", "timestamp": "timestamp", "flow_run_id": "flow_run_id",
                     "task_run_id": "task_run_id"}),
    "artifacts": ("artifact", {"id": "id", "key": "key", "flow_run_id": "flow_run_id", "task_run_id": "task_run_id",
                               "type": "type", "latest_id": "id"}),  # latest_id: the latest routes list artifacts
    "variables": ("variable", {"id": "id", "name": "name", "value": "value", "tags": "tags"}),
    "block_types": ("block_type", {"name": "name", "slug": "slug"}),
    "block_schemas": ("block_schema", {"id": "id", "block_type_id": "block_type_id", "version": "version",
                                       "block_capabilities": _filter_block_capabilities}),
    "block_documents": ("block_document", {"id": "id", "name": "name", "is_anonymous": "is_anonymous",
                                           "block_type_id": "block_type_id"}),
    "flow_run_notification_policy_filter": ("flow_run_notification_policy", {"is_active": "is_active"}),
    "saved_searches": ("saved_search", {"id": "id", "name": "name"}),
    "concurrency_limits": ("concurrency_limit_v2", {"id": "id", "name": "name"}),
}
# fmt: on

# How a filter on table B narrows a query on table A: "{}" is B's condition.
RELATIONS = {
    ("flow_run", "flow"): "flow_run.flow_id IN (SELECT flow.id FROM flow WHERE {})",
    ("flow_run", "task_run"): "flow_run.id IN (SELECT task_run.flow_run_id FROM task_run WHERE {})",
    ("flow_run", "deployment"): "flow_run.deployment_id IN (SELECT deployment.id FROM deployment WHERE {})",
    ("flow_run", "work_queue"): "flow_run.work_queue_id IN (SELECT work_queue.id FROM work_queue WHERE {})",
    ("flow_run", "work_pool"): (
        "flow_run.work_queue_id IN (SELECT work_queue.id FROM work_queue JOIN work_pool "
        "ON work_pool.id = work_queue.work_pool_id WHERE {})"
    ),
    ("task_run", "flow_run"): "task_run.flow_run_id IN (SELECT flow_run.id FROM flow_run WHERE {})",
    ("task_run", "flow"): (
        "task_run.flow_run_id IN (SELECT flow_run.id FROM flow_run JOIN flow ON flow.id = flow_run.flow_id WHERE {})"
    ),
    ("task_run", "deployment"): (
        "task_run.flow_run_id IN (SELECT flow_run.id FROM flow_run JOIN deployment "
        "ON deployment.id = flow_run.deployment_id WHERE {})"
    ),
    ("flow", "flow_run"): "flow.id IN (SELECT flow_run.flow_id FROM flow_run WHERE {})",
    ("flow", "task_run"): (
        "flow.id IN (SELECT flow_run.flow_id FROM flow_run JOIN task_run "
        "ON task_run.flow_run_id = flow_run.id WHERE {})"
    ),
    ("flow", "deployment"): "flow.id IN (SELECT deployment.flow_id FROM deployment WHERE {})",
    ("flow", "work_pool"): (
        "flow.id IN (SELECT deployment.flow_id FROM deployment JOIN work_queue ON "
        "work_queue.id = deployment.work_queue_id JOIN work_pool ON "
        "work_pool.id = work_queue.work_pool_id WHERE {})"
    ),
    ("deployment", "flow"): "deployment.flow_id IN (SELECT flow.id FROM flow WHERE {})",
    ("deployment", "flow_run"): "deployment.id IN (SELECT flow_run.deployment_id FROM flow_run WHERE {})",
    ("deployment", "task_run"): (
        "deployment.id IN (SELECT flow_run.deployment_id FROM flow_run JOIN task_run "
        "ON task_run.flow_run_id = flow_run.id WHERE {})"
    ),
    ("deployment", "work_pool"): (
        "deployment.work_queue_id IN (SELECT work_queue.id FROM work_queue JOIN work_pool "
        "ON work_pool.id = work_queue.work_pool_id WHERE {})"
    ),
    ("deployment", "work_queue"): "deployment.work_queue_id IN (SELECT work_queue.id FROM work_queue WHERE {})",
    ("work_queue", "work_pool"): "work_queue.work_pool_id IN (SELECT work_pool.id FROM work_pool WHERE {})",
    ("artifact", "flow_run"): "artifact.flow_run_id IN (SELECT flow_run.id FROM flow_run WHERE {})",
    ("artifact", "task_run"): "artifact.task_run_id IN (SELECT task_run.id FROM task_run WHERE {})",
    ("block_document", "block_type"): "block_document.block_type_id IN (SELECT block_type.id FROM block_type WHERE {})",
    ("block_document", "block_schema"): (
        "block_document.block_schema_id IN (SELECT block_schema.id FROM block_schema WHERE {})"
    ),
    ("block_schema", "block_type"): "block_schema.block_type_id IN (SELECT block_type.id FROM block_type WHERE {})",
    ("block_type", "block_schema"): "block_type.id IN (SELECT block_schema.block_type_id FROM block_schema WHERE {})",
}


def _coerce(value, kind, loc):
    if kind == "uuid":
        return parse_uuid(value, loc)
    if kind == "datetime":
        return parse_datetime(value, loc)
    if kind == "int":
        return _validate_kind("float", value, loc)
    if kind == "bool":
        return _validate_kind("bool", value, loc)
    return _validate_kind("str", value, loc)


def _coerce_list(values, kind, loc):
    if values is None:
        return None
    if not isinstance(values, list):
        raise ValidationFailed([_error(loc, "value is not a valid list", "type_error.list")])
    return [_coerce(v, kind, (*loc, i)) for i, v in enumerate(values)]


def _compile_ops(tx, table, column, kind, ops, loc):
    """One field's operators, e.g. {"any_": [...], "like_": "x"}: AND of each (or OR, with operator)."""
    if not isinstance(ops, dict):
        raise ValidationFailed([_error(loc, "value is not a valid dict", "type_error.dict")])
    col = f"{table}.{_quote_column(column)}"
    clauses, params = [], []
    for op, value in ops.items():
        here = (*loc, op)
        if op == "operator" or value is None:
            continue
        if kind == "tags" and op in ("all_", "any_"):
            tags = _coerce_list(value, "str", here)
            if not tags:  # as Prefect: having any of no tags matches nothing, having all of them everything
                clauses.append("1=0" if op == "any_" else "1=1")
                continue
            joiner = " AND " if op == "all_" else " OR "
            clauses.append("(" + joiner.join(tx.db.contains(col) for _ in tags) + ")")
            params += tags
        elif kind == "tags" and op == "is_null_":
            _coerce(value, "bool", here)
            clauses.append(f"({col} IS NULL OR {col} = '[]')" if value else f"({col} IS NOT NULL AND {col} != '[]')")
        elif op in ("any_", "not_any_"):
            items = _coerce_list(value, kind, here)
            if not items:
                clauses.append("1=0" if op == "any_" else "1=1")
                continue
            marks = ", ".join("?" for _ in items)
            if kind == "bool":
                items = [bool(i) for i in items]
            clauses.append(f"{col} IN ({marks})" if op == "any_" else f"({col} IS NULL OR {col} NOT IN ({marks}))")
            params += items
        elif op in ("like_", "startswith_") and kind != "str":  # text matching on a number or time
            raise ValidationFailed([_error(here, f"{op} applies to text fields only", "value_error.extra")])
        elif op == "like_":
            clauses.append(f"{col} {tx.db.ilike} ?")
            params.append(f"%{_coerce(value, 'str', here)}%")
        elif op == "startswith_":  # one prefix, or (work queue names) a list of them, any of which may match
            prefixes = _coerce_list(value, "str", here) if isinstance(value, list) else [_coerce(value, "str", here)]
            clauses.append("(" + " OR ".join(f"{col} {tx.db.ilike} ?" for _ in prefixes) + ")" if prefixes else "1=0")
            params += [f"{prefix}%" for prefix in prefixes]
        elif op in ("before_", "after_", "ge_", "le_", "gt_", "lt_", "eq_", "ne_"):
            sym = {
                "before_": "<=",
                "after_": ">=",
                "ge_": ">=",
                "le_": "<=",
                "gt_": ">",
                "lt_": "<",
                "eq_": "=",
                "ne_": "!=",
            }[op]
            clauses.append(f"{col} {sym} ?")
            params.append(_coerce(value, kind if kind != "tags" else "str", here))
        elif op == "is_null_":
            _coerce(value, "bool", here)
            clauses.append(f"{col} IS NULL" if value else f"{col} IS NOT NULL")
        else:
            raise ValidationFailed([_error(here, f"unknown filter operator {op!r}", "value_error.extra")])
    joiner = " OR " if ops.get("operator") == "or_" else " AND "
    return ("(" + joiner.join(clauses) + ")" if clauses else "1=1"), params


def compile_filter(tx, table, spec, flt, loc) -> tuple[str, list]:
    """A filter object for `table` (fields -> operators), with operator and_/or_ and nesting."""
    if flt is None:
        return "1=1", []
    if not isinstance(flt, dict):
        raise ValidationFailed([_error(loc, "value is not a valid dict", "type_error.dict")])
    operator = flt.get("operator", "and_")
    if operator not in ("and_", "or_"):
        raise ValidationFailed(
            [
                _error(
                    (*loc, "operator"),
                    "value is not a valid enumeration member; permitted: 'and_', 'or_'",
                    "type_error.enum",
                )
            ]
        )
    clauses, params = [], []
    for key, value in flt.items():
        if key == "operator" or value is None:
            continue
        field = spec.get(key)
        here = (*loc, key)
        if field is None:
            raise ValidationFailed([_error(here, "extra fields not permitted", "value_error.extra")])
        if callable(field):
            if not isinstance(value, dict):
                raise ValidationFailed([_error(here, "value is not a valid dict", "type_error.dict")])
            sql, args = field(tx, table, value, here)
        elif isinstance(field, dict):  # a nested filter object, e.g. state: {type: {...}, name: {...}}
            sql, args = compile_filter(tx, table, field, value, here)
        else:
            sql, args = _compile_ops(tx, table, field, _column_kind(table, field), value, here)
        clauses.append(sql)
        params += args
    if not clauses:
        return "1=1", []
    joiner = " OR " if operator == "or_" else " AND "
    return "(" + joiner.join(clauses) + ")", params


def build_where(tx, table: str, body: dict, loc=("body",)) -> tuple[str, list]:
    """WHERE clause for a query on `table` from a filter body holding flows/flow_runs/... objects."""
    clauses, params = [], []
    for key in _FILTER_KEYS:
        flt = body.get(key)
        if flt is None or key not in FILTERS:
            continue
        other, spec = FILTERS[key]
        if other == table:
            sql, args = compile_filter(tx, table, spec, flt, (*loc, key))
        else:
            template = RELATIONS.get((table, other))
            if template is None:
                raise ValidationFailed([_error((*loc, key), f"cannot filter {table} by {key}", "value_error.extra")])
            inner, args = compile_filter(tx, other, spec, flt, (*loc, key))
            if inner == "1=1":
                continue
            sql = template.format(inner)
        if sql != "1=1":
            clauses.append(sql)
            params += args
    return (" AND ".join(clauses) or "1=1"), params


_SORT_SQL = {
    "ID_DESC": "{t}.id DESC",
    "START_TIME_ASC": "COALESCE({t}.start_time, {t}.expected_start_time) ASC",
    "START_TIME_DESC": "COALESCE({t}.start_time, {t}.expected_start_time) DESC",
    "EXPECTED_START_TIME_ASC": "{t}.expected_start_time ASC",
    "EXPECTED_START_TIME_DESC": "{t}.expected_start_time DESC",
    "NAME_ASC": "{t}.name ASC",
    "NAME_DESC": "{t}.name DESC",
    "NEXT_SCHEDULED_START_TIME_ASC": "{t}.next_scheduled_start_time ASC",
    "END_TIME_DESC": "{t}.end_time DESC",
    "CREATED_DESC": "{t}.created DESC",
    "UPDATED_DESC": "{t}.updated DESC",
    "TIMESTAMP_ASC": "{t}.timestamp ASC",
    "TIMESTAMP_DESC": "{t}.timestamp DESC",
    "KEY_ASC": "{t}.key ASC",
    "KEY_DESC": "{t}.key DESC",
    "BLOCK_TYPE_AND_NAME_ASC": "{t}.block_type_id ASC, {t}.name ASC",
}


def order_by(table: str, sort: str | None) -> str:
    clause = _SORT_SQL[sort or _DEFAULT_SORT.get(table, "ID_DESC")].format(t=table)
    return f"{clause}, {table}.id" if not clause.startswith(f"{table}.id") else clause


def page_limit(body: dict, settings: Settings) -> int:
    cap = settings["PREFECT_API_DEFAULT_LIMIT"]
    limit = body.get("limit")
    return cap if limit is None else min(limit, cap)


def _where_with(tx, table, body, extra_where, extra_params):
    where, params = build_where(tx, table, body)
    if extra_where:
        where = f"({where}) AND ({extra_where})"
        params = [*params, *extra_params]
    return where, params


def filtered_query(
    tx,
    table: str,
    body: dict,
    settings: Settings,
    extra_where: str = "",
    extra_params=(),
    select: tuple[str, tuple] | None = None,
):
    """The SQL and parameters of a filter route's page (also what the query-plan tests explain).

    `select` is (SQL, parameters) of what to select instead of the table's columns.
    """
    where, params = _where_with(tx, table, body, extra_where, extra_params)
    columns, column_params = select or (f"{table}.*", ())
    sql = f"SELECT {columns} FROM {table} WHERE {where} ORDER BY {order_by(table, body.get('sort'))} LIMIT ? OFFSET ?"
    return sql, (*column_params, *params, page_limit(body, settings), body.get("offset") or 0)


def json_page_query(tx, table: str, body: dict, settings: Settings, json_select: tuple[str, tuple]):
    """A filter route's page as one JSON array text, from a `doc` column of JSON objects (run_json_select)."""
    sql, params = filtered_query(tx, table, body, settings, select=json_select)
    return f"SELECT {tx.db.json_array_agg.format(x='doc')} FROM ({sql}) AS page", params


def count_query(tx, table: str, body: dict, extra_where: str = "", extra_params=()):
    where, params = _where_with(tx, table, body, extra_where, extra_params)
    return f"SELECT COUNT(*) AS n FROM {table} WHERE {where}", params


def query_filtered(tx, table: str, body: dict, settings: Settings, extra_where: str = "", extra_params=()):
    return tx.query(*filtered_query(tx, table, body, settings, extra_where, extra_params))


def count_filtered(tx, table: str, body: dict, extra_where: str = "", extra_params=()) -> int:
    return int(tx.scalar(*count_query(tx, table, body, extra_where, extra_params)))


_PREFECT_CLIENT_AGENT = re.compile(r"^prefect/(\d+)\.(\d+)\.(\d+)")


def client_major(req) -> int:
    """The Prefect major version whose shapes a caller reads: 3 for a 3.x SDK (its User-Agent says so,
    see read_api_version), 2 for everyone else (2.x SDKs, the UI, curl), as the server is a 2.20 one."""
    found = _PREFECT_CLIENT_AGENT.match(req.headers.get("User-Agent") or "")
    return 3 if found and found.group(1) == "3" else 2


# --- 9. Orchestration ---
# Owns states, the rules every proposed state goes through, and the concurrency slots and leases that the rules
# and the concurrency routes take. A rule looks at the transition and either lets it continue (None) or answers
# REJECT (with the state to take instead), WAIT (retry after a delay) or ABORT (with a reason). `force=true`
# skips the rules; the bookkeeping (run counts, times, cache entries, concurrency slots) always runs.

STATE_DETAIL_DEFAULTS = {
    "flow_run_id": None,
    "task_run_id": None,
    "child_flow_run_id": None,
    "scheduled_time": None,
    "cache_key": None,
    "cache_expiration": None,
    "untrackable_result": False,
    "pause_timeout": None,
    "pause_reschedule": False,
    "pause_key": None,
    "run_input_keyset": None,
    "refresh_cache": None,
    "retriable": None,
    "transition_id": None,
    "task_parameters_id": None,
}
LEASE_DETAIL = "deployment_concurrency_lease_id"  # see "Deployment concurrency limits" below
# The details Prefect 3 added: 3.9's server answers every state with them, these where it was made without them
# (the scheduler's states, the rules'). Only 3.x clients read them: 2.20's SDK in test mode refuses a state
# with a detail it does not know.
STATE_DETAIL_DEFAULTS_3 = {"deferred": False, "traceparent": None, LEASE_DETAIL: None}


def state_for_client(state: dict | None, major: int) -> dict | None:
    """A state as a client of `major` (client_major) reads it."""
    if major != 3 or not state:
        return state
    details = state.get("state_details")
    return {**state, "state_details": {**STATE_DETAIL_DEFAULTS_3, **(details if isinstance(details, dict) else {})}}


def default_state_name(state_type: str) -> str:
    return state_type.title()


def make_state(proposed: dict, flow_run_id: str | None, task_run_id: str | None, now: str) -> dict:
    details = dict(STATE_DETAIL_DEFAULTS)
    details.update(proposed.get("state_details") or {})
    for key in ("scheduled_time", "cache_expiration", "pause_timeout"):
        if details.get(key) is not None:
            details[key] = parse_datetime(details[key], ("body", "state", "state_details", key))
    if details.get(LEASE_DETAIL) is not None:  # bound as an id later: text, nothing else
        details[LEASE_DETAIL] = parse_uuid(details[LEASE_DETAIL], ("body", "state", "state_details", LEASE_DETAIL))
    if proposed["type"] == "SCHEDULED" and details.get("scheduled_time") is None:
        details["scheduled_time"] = now  # as Prefect's State model does: scheduled for when it was made
    details["flow_run_id"] = flow_run_id
    if task_run_id is not None:
        details["task_run_id"] = task_run_id
    return {
        "id": new_id(),
        "type": proposed["type"],
        "name": proposed.get("name") or default_state_name(proposed["type"]),
        "timestamp": now,
        "message": proposed.get("message"),
        "data": proposed.get("data"),
        "state_details": details,
    }


@dataclasses.dataclass
class Outcome:
    status: str  # ACCEPT, REJECT, WAIT, ABORT
    state: dict | None = None
    reason: str | None = None
    delay_seconds: int | None = None
    written: bool = False  # a new state row was recorded (the API answers 201 then, 200 otherwise)
    run: dict | None = None  # the run as orchestrated: decoded, with what the new state changed

    def details(self) -> dict:
        if self.status == "ACCEPT":
            return {"type": "accept_details"}
        if self.status == "REJECT":
            return {"type": "reject_details", "reason": self.reason}
        if self.status == "WAIT":
            return {"type": "wait_details", "delay_seconds": self.delay_seconds, "reason": self.reason}
        return {"type": "abort_details", "reason": self.reason}


@dataclasses.dataclass
class Transition:
    kind: str  # "flow" or "task"
    tx: Transaction
    run: dict  # the row, decoded
    initial: dict | None  # the current state object
    proposed: dict  # the state about to be written (rules may rename it)
    now: _dt.datetime
    updates: dict = dataclasses.field(default_factory=dict)  # extra column changes for the run row
    client_major: int = 2  # the Prefect major version of the client proposing the state (see client_major)

    @property
    def initial_type(self):
        return self.initial["type"] if self.initial else None


def _state_task_run_id(kind: str, run: dict) -> str | None:
    """The task run a run's states name: a task run's own id; for a subflow run, the task run standing
    for it in its parent (Prefect's UpdateSubflowStateDetails: the SDK reads a subflow's result through it)."""
    return run["id"] if kind == "task" else run.get("parent_task_run_id")


def _reject(ctx: Transition, state_type: str, name: str, reason: str, **details) -> Outcome:
    proposed = {
        "type": state_type,
        "name": name,
        "message": ctx.proposed.get("message"),
        "data": ctx.proposed.get("data"),
        "state_details": {**ctx.proposed["state_details"], **details},
    }
    flow_run_id = ctx.run["id"] if ctx.kind == "flow" else ctx.run["flow_run_id"]
    state = make_state(proposed, flow_run_id, _state_task_run_id(ctx.kind, ctx.run), iso(ctx.now))
    return Outcome("REJECT", state, reason)


def prevent_duplicate_transition(ctx: Transition):
    transition_id = ctx.proposed["state_details"].get("transition_id")
    if ctx.initial and transition_id and ctx.initial["state_details"].get("transition_id") == transition_id:
        return Outcome("REJECT", ctx.initial, "This run has already made this state transition.")
    return None


def prevent_pending_transitions(ctx: Transition):
    if _is_pending_substate(ctx):
        # Prefect 3 runners move a flow run on through named Pending states (Pending -> Submitting);
        # a second submitter proposing plain "Pending" is still turned away.
        ctx.proposed["state_details"]["scheduled_time"] = ctx.initial["state_details"].get("scheduled_time")
        return None
    if ctx.proposed["type"] == "PENDING" and ctx.initial_type in ("PENDING", "RUNNING", "CANCELLING", "CANCELLED"):
        return Outcome(
            "ABORT", reason=f"This run is in a {ctx.initial_type} state and cannot transition to a PENDING state."
        )
    return None


def _is_pending_substate(ctx: Transition) -> bool:
    return (
        ctx.kind == "flow"
        and ctx.initial_type == "PENDING"
        and ctx.proposed["type"] == "PENDING"
        and ctx.proposed["name"] != "Pending"
        and ctx.proposed["name"] != ctx.initial["name"]
    )


def _persisted_result(data) -> bool:
    return isinstance(data, dict) and bool(data) and data.get("type") != "unpersisted"


def handle_flow_terminal_state_transitions(ctx: Transition):
    """A flow run leaves a terminal state as Prefect's HandleFlowTerminalStateTransitions lets it: a rerun (a
    parent flow's retry runs its subflows again) but not into CANCELLING, PAUSED or CRASHED, not away from a
    Completed state whose result is persisted, not back to SCHEDULED without a deployment. Leaving for a
    non-final state forgets the run's pauses. (A process blocked in a pause that timed out finds its run
    failed by the pause-expiration service: its own Failed is accepted too.)"""
    proposed = ctx.proposed["type"]
    if proposed in ("CANCELLING", "PAUSED", "CRASHED"):
        return Outcome("ABORT", reason=f"Run is already in terminal state {ctx.initial_type}.")
    kept_result = ctx.initial_type == "COMPLETED" and _persisted_result(ctx.initial.get("data"))
    if kept_result and (
        proposed not in TERMINAL_STATES or proposed == "COMPLETED" and not _persisted_result(ctx.proposed.get("data"))
    ):
        return Outcome("REJECT", ctx.initial, "Run is already COMPLETED.")
    if proposed == "SCHEDULED" and not ctx.run.get("deployment_id"):
        return Outcome("ABORT", reason="Cannot reschedule a run without an associated deployment.")
    if proposed not in TERMINAL_STATES:
        policy = ctx.run.get("empirical_policy") or {}
        ctx.updates["empirical_policy"] = {
            **policy,
            "resuming": False,
            "pause_keys": [],
            "retry_type": "reschedule" if proposed == "SCHEDULED" else None,
        }
    return None


def handle_task_terminal_state_transitions(ctx: Transition):
    """A task run leaves a terminal state as Prefect's HandleTaskTerminalStateTransitions lets it (a flow's
    retry runs its finished tasks again; a 2.20 task called inside a background task completes the outer run
    first, without a result, and the outer task's own Completed follows): not into CANCELLING, PAUSED or
    CRASHED, and not away from a Completed state whose result is persisted (the run stays as it is). A rerun
    while the flow run is on a later attempt is named "Retrying"; reset_task_retries starts its retries afresh."""
    proposed = ctx.proposed["type"]
    if proposed in ("CANCELLING", "PAUSED", "CRASHED"):
        return Outcome("ABORT", reason=f"Run is already {ctx.initial_type}.")
    if ctx.initial_type == "COMPLETED" and _persisted_result(ctx.initial.get("data")):
        return Outcome("REJECT", ctx.initial, "This run is already completed.")
    if proposed == "RUNNING" and ctx.run.get("flow_run_id"):
        flow_run = _flow_run_brief(ctx.tx, ctx.run["flow_run_id"])
        if flow_run and (ctx.run.get("flow_run_run_count") or 0) < (flow_run["run_count"] or 0):
            ctx.proposed["name"] = "Retrying"
    return None


def prevent_leaving_terminal_states(ctx: Transition):
    """Leaving a terminal state: handle_flow_terminal_state_transitions and handle_task_terminal_state_transitions."""
    if ctx.initial_type not in TERMINAL_STATES:
        return None
    if ctx.kind == "flow":
        return handle_flow_terminal_state_transitions(ctx)
    return handle_task_terminal_state_transitions(ctx)


def only_cancel_cancelling_runs(ctx: Transition):
    """A cancelling run can only end Cancelled: its runner reporting it crashed or failed is not the outcome."""
    if ctx.kind == "flow" and ctx.initial_type == "CANCELLING" and ctx.proposed["type"] != "CANCELLED":
        return Outcome(
            "REJECT", ctx.initial, "Cannot transition flows that are cancelling to a state other than Cancelled."
        )
    return None


def cancel_runs_without_infrastructure(ctx: Transition):
    """Nothing runs a scheduled run yet (or a paused one waiting to be rescheduled): cancel it right away."""
    if ctx.kind != "flow" or ctx.proposed["type"] != "CANCELLING":
        return None
    waiting = ctx.initial_type == "SCHEDULED" and not ctx.run.get("infrastructure_pid")
    rescheduled_pause = ctx.initial_type == "PAUSED" and ctx.initial["state_details"].get("pause_reschedule")
    if waiting or rescheduled_pause:
        return _reject(ctx, "CANCELLED", "Cancelled", "Scheduled flow run has no infrastructure to terminate.")
    return None


def _flow_run_brief(tx: Transaction, flow_run_id: str) -> dict | None:
    """A task run's flow run: its state type and run count, read once per transaction (a task run
    entering RUNNING needs both, in a rule and in the bookkeeping)."""
    key = ("flow_run_brief", flow_run_id)
    if key not in tx.memo:
        tx.memo[key] = tx.query_one("SELECT state_type, run_count FROM flow_run WHERE id = ?", (flow_run_id,))
    return tx.memo[key]


def prevent_running_tasks_in_stopped_flows(ctx: Transition):
    if ctx.kind != "task" or ctx.proposed["type"] != "RUNNING" or not ctx.run.get("flow_run_id"):
        return None
    flow_run = _flow_run_brief(ctx.tx, ctx.run["flow_run_id"])
    flow_state = flow_run["state_type"] if flow_run else None
    if flow_state == "PAUSED":  # the task pauses as its flow did: a rescheduled pause ends the task's process too
        details = decode_row(
            "flow_run", ctx.tx.query_one("SELECT state FROM flow_run WHERE id = ?", (ctx.run["flow_run_id"],))
        )["state"]["state_details"]
        return _reject(
            ctx,
            "PAUSED",
            "NotReady",
            "The flow is paused, new tasks can execute after resuming flow run execution.",
            pause_timeout=details.get("pause_timeout"),
            pause_reschedule=bool(details.get("pause_reschedule")),
        )
    if flow_state != "RUNNING":
        return Outcome("ABORT", reason="The enclosing flow must be running to begin task execution.")
    return None


def retrieve_cached_state(ctx: Transition):
    details = ctx.proposed["state_details"]
    key = details.get("cache_key")
    if ctx.kind != "task" or ctx.proposed["type"] != "RUNNING" or not key or details.get("refresh_cache"):
        return None
    row = ctx.tx.query_one(
        "SELECT s.* FROM task_run_state_cache c JOIN task_run_state s ON s.id = c.task_run_state_id "
        "WHERE c.cache_key = ? AND (c.cache_expiration IS NULL OR c.cache_expiration > ?) "
        "ORDER BY c.created DESC LIMIT 1",
        (key, iso(ctx.now)),
    )
    if row is None:
        return None
    cached = decode_row("task_run_state", row)
    outcome = _reject(
        ctx,
        "COMPLETED",
        "Cached",
        "Retrieved state from cache",
        cache_key=key,
        cache_expiration=cached["state_details"].get("cache_expiration"),
    )
    outcome.state["data"] = cached["data"]
    outcome.state["message"] = cached.get("message")
    return outcome


def wait_for_scheduled_time(ctx: Transition):
    if ctx.proposed["type"] != "RUNNING" or ctx.initial_type not in ("SCHEDULED", "PENDING"):
        return None
    scheduled = ctx.initial["state_details"].get("scheduled_time")
    if not scheduled:
        return None
    delay = (from_iso(scheduled) - ctx.now).total_seconds()
    if delay > 0:
        return Outcome("WAIT", reason="Scheduled time is in the future", delay_seconds=math.ceil(delay))
    return None


def expire_pauses(ctx: Transition):
    """A paused flow whose pause timed out cannot resume: whatever it proposes (its own Failed too, as a
    process blocked in the pause does when it gives up) becomes a Failed state without a result, so the SDK
    raises a FailedRun. Cancelling still reaches the process (Prefect 3)."""
    if ctx.kind != "flow" or ctx.initial_type != "PAUSED" or ctx.proposed["type"] == "CANCELLING":
        return None
    timeout = ctx.initial["state_details"].get("pause_timeout")
    if not timeout or from_iso(timeout) >= ctx.now:
        return None
    name = (ctx.proposed.get("name") or ctx.proposed["type"]).lower()
    failed = {
        "type": "FAILED",
        "name": "Failed",
        "message": f"The flow was {name} and never resumed.",
        "state_details": {},
    }
    verb = "suspend" if ctx.proposed.get("name") == "Suspended" else "pause"
    return Outcome(
        "REJECT",
        make_state(failed, ctx.run["id"], ctx.run.get("parent_task_run_id"), iso(ctx.now)),
        f"The flow run {verb} has timed out and can no longer resume.",
    )


def handle_pausing_flows(ctx: Transition):
    """As Prefect: a pause that cannot happen leaves the run as it is (REJECT into the current state: the
    SDK carries on past a keyed pause that already fired); only a run that will be rescheduled may be
    suspended, so a subflow or a run without a deployment is aborted."""
    if ctx.kind != "flow" or ctx.proposed["type"] != "PAUSED":
        return None
    verb = "suspend" if ctx.proposed.get("name") == "Suspended" else "pause"
    if ctx.initial is None:
        return Outcome("ABORT", reason=f"Cannot {verb} flows with no state.")
    if ctx.initial_type != "RUNNING":
        return Outcome("REJECT", ctx.initial, f"Cannot {verb} flows that are not currently running.")
    key = ctx.proposed["state_details"].get("pause_key")
    policy = dict(ctx.run.get("empirical_policy") or {})
    keys = list(policy.get("pause_keys") or [])
    if key is not None and key in keys:
        return Outcome("REJECT", ctx.initial, f"This {verb} has already fired.")
    if ctx.proposed["state_details"].get("pause_reschedule"):
        if ctx.run.get("parent_task_run_id"):
            return Outcome("ABORT", reason=f"Cannot {verb} subflows.")
        if not ctx.run.get("deployment_id"):
            return Outcome("ABORT", reason=f"Cannot {verb} flows without a deployment.")
    if key is not None:
        policy["pause_keys"] = [*keys, key]
        ctx.updates["empirical_policy"] = policy
    return None


_LONGEST_RETRY_DELAY = _A_CENTURY  # a retry scheduled later could fall after the year 9999


def _retry_delay(policy: dict, run_count: int) -> float:
    """The seconds to wait before retry `run_count`, from the client's policy (whatever it holds)."""
    delay = policy.get("retry_delay")
    if delay is None:
        delay = policy.get("retry_delay_seconds") or 0
    if isinstance(delay, list):
        delay = delay[min(max(run_count - 1, 0), len(delay) - 1)] if delay else 0
    try:
        seconds = float(delay or 0)
    except (TypeError, ValueError):
        return 0.0
    except OverflowError:  # an integer beyond any float
        seconds = _LONGEST_RETRY_DELAY if delay > 0 else 0.0
    return min(max(seconds, 0.0), _LONGEST_RETRY_DELAY)


def retry_failed_runs(ctx: Transition):
    """A failing run with retries left goes to AwaitingRetry, scheduled after the retry delay."""
    if ctx.proposed["type"] != "FAILED" or ctx.initial_type != "RUNNING":
        return None
    # A task's retry_condition_fn says no with retriable=false. Only tasks: the 3.9 SDK marks every failed
    # flow state retriable=false, and Prefect retries the flow all the same.
    if ctx.kind == "task" and ctx.proposed["state_details"].get("retriable") is False:
        return None
    policy = ctx.run.get("empirical_policy") or {}
    retries = policy.get("retries") or policy.get("max_retries") or 0
    if not isinstance(retries, (int, float)) or ctx.run["run_count"] > retries:
        return None
    scheduled = ctx.now + _dt.timedelta(seconds=_retry_delay(policy, ctx.run["run_count"]))
    if ctx.kind == "flow":
        if ctx.client_major < 3:
            _schedule_failed_tasks_for_retry(ctx)
        ctx.updates["empirical_policy"] = {**policy, "retry_type": "in_process"}
    return _reject(ctx, "SCHEDULED", "AwaitingRetry", "Retrying", scheduled_time=iso(scheduled))


def _schedule_failed_tasks_for_retry(ctx: Transition):
    """A retried flow runs its failed tasks again: they go back to AwaitingRetry. Not a 3.x client's: its
    retry makes new task runs (reported by events), and the failed ones would stay AwaitingRetry for good."""
    rows = ctx.tx.query(
        "SELECT * FROM task_run WHERE flow_run_id = ? AND state_type IN ('FAILED', 'CRASHED', 'CANCELLED')",
        (ctx.run["id"],),
    )
    for row in rows:
        task = decode_row("task_run", row)
        state = make_state(
            {"type": "SCHEDULED", "name": "AwaitingRetry", "state_details": {"scheduled_time": iso(ctx.now)}},
            ctx.run["id"],
            task["id"],
            iso(ctx.now),
        )
        _write_state(ctx.tx, "task", task, task.get("state"), state, {"run_count": 0})  # see reset_task_retries


def reset_task_retries(ctx: Transition):
    """A task run leaving a terminal state for a non-final one starts its retries afresh (Prefect resets
    its run count): on a flow's next attempt a task that used up its retries has them all again. Last of
    the task rules, so only an accepted transition resets it."""
    if ctx.kind == "task" and ctx.initial_type in TERMINAL_STATES and ctx.proposed["type"] not in TERMINAL_STATES:
        ctx.updates["run_count"] = 1 if ctx.proposed["type"] == "RUNNING" else 0  # RUNNING counts this attempt
    return None


def rename_reruns(ctx: Transition):
    """Prefect's RenameReruns, a task-run rule (a retried flow run stays "Running"): a task run back from
    AwaitingRetry runs as "Retrying", and one that has run before otherwise as "Rerunning" (the 2.20 SDK runs
    a task called inside a background task on the outer task's run). A run leaving a terminal state starts
    its count afresh first (reset_task_retries), so it is not renamed."""
    if ctx.kind != "task" or ctx.proposed["type"] != "RUNNING":
        return None
    if ctx.initial_type == "SCHEDULED" and ctx.initial["name"] == "AwaitingRetry":
        ctx.proposed["name"] = "Retrying"
    elif (ctx.run.get("run_count") or 0) > 0 and ctx.initial_type not in TERMINAL_STATES:
        ctx.proposed["name"] = "Rerunning"
    return None


def copy_scheduled_time(ctx: Transition):
    if ctx.proposed["type"] == "PENDING" and ctx.initial_type == "SCHEDULED":
        details = ctx.proposed["state_details"]
        if not details.get("scheduled_time"):
            details["scheduled_time"] = ctx.initial["state_details"].get("scheduled_time")
    return None


# Concurrency slots and leases: global limits (Prefect 3) hand out slots all or nothing; a lease holds them
# until its holder gives them back, or until the LeaseRepossessor takes them once it expires unrenewed (a
# crashed client cannot keep them forever). The rules below and the concurrency routes take them here.


def _decayed_slots(limit: dict, now: _dt.datetime) -> int:
    """Rate limits give slots back over time at slot_decay_per_second."""
    decay = limit["slot_decay_per_second"] or 0.0
    if not decay:
        return limit["active_slots"]
    elapsed = max((now - from_iso(limit["updated"])).total_seconds(), 0.0)
    return max(0, int(limit["active_slots"] - elapsed * decay))


def change_global_slots(
    tx, names: list[str], slots: int, mode: str, increment: bool, occupancy_seconds: float | None = None
) -> list[dict] | None:
    """Take (or give back) `slots` on every named active limit; None when a limit has no room (all or nothing)."""
    if not names:
        return []
    marks = ", ".join("?" for _ in names)
    rows = tx.query(
        f"SELECT * FROM concurrency_limit_v2 WHERE name IN ({marks}) AND active = ? ORDER BY name{tx.db.for_update}",
        (*names, True),
    )
    limits = [decode_row("concurrency_limit_v2", r) for r in rows]
    now = utcnow()
    if increment:
        if mode == "rate_limit" and any(not lim["slot_decay_per_second"] for lim in limits):
            raise ValidationFailed(
                [
                    _error(
                        ("body", "mode"),
                        "Only concurrency limits with slot decay can be used for rate limiting.",
                        "value_error",
                    )
                ]
            )
        full = [lim for lim in limits if _decayed_slots(lim, now) + slots > lim["limit"]]
        if full:
            for lim in full:  # counted here, saturating: in SQL an overflow is a float (SQLite) or an error
                most = max(lim["denied_slots"], 2**31 - 1)  # PostgreSQL's INTEGER, or more already stored
                update_row(
                    tx, "concurrency_limit_v2", lim["id"], {"denied_slots": min(lim["denied_slots"] + slots, most)}
                )
            return None
        for lim in limits:
            update_row(
                tx,
                "concurrency_limit_v2",
                lim["id"],
                {"active_slots": _decayed_slots(lim, now) + slots, "denied_slots": 0, "updated": iso(now)},
            )
    else:
        for lim in limits:
            changes = {"active_slots": max(0, _decayed_slots(lim, now) - slots), "updated": iso(now)}
            if occupancy_seconds is not None:  # a running average of how long slots are held
                changes["avg_slot_occupancy_seconds"] = round(
                    lim["avg_slot_occupancy_seconds"] * 0.8 + (occupancy_seconds / max(slots, 1)) * 0.2, 6
                )
            update_row(tx, "concurrency_limit_v2", lim["id"], changes)
    return [{"id": lim["id"], "name": lim["name"], "limit": lim["limit"]} for lim in limits]


def create_lease(
    tx, limits: list[dict], slots: int, seconds: float, holder: dict | None, tag_limits: tuple = ()
) -> str:
    """A lease on the global limits' slots, and on the tag limits' (their ids listed alike; the holder, or the
    lease when there is none, goes into each tag limit's active_slots)."""
    now = utcnow()
    lease_id = new_id()
    insert_row(
        tx,
        "concurrency_lease",
        {
            "id": lease_id,
            "created": iso(now),
            "expiration": iso(now + _dt.timedelta(seconds=seconds)),
            "limit_ids": [limit["id"] for limit in (*limits, *tag_limits)],
            "slots": slots,
            "holder": holder,
        },
    )
    slot = (holder or {}).get("id") or lease_id
    for limit in tag_limits:
        update_row(
            tx, "concurrency_limit", limit["id"], {"active_slots": [*limit["active_slots"], slot], "updated": iso(now)}
        )
    return lease_id


# Prefect 3 keeps a tag's limit as the global limit `tag:NAME`, and its tasks take their tags' slots from those
# with leases. Here a tag limit is still the v1 row (Prefect 2 clients' tasks are limited by the server's
# orchestration rule): a `tag:NAME` no global limit of that name covers takes its slot from the v1 row.
TAG_LIMIT_PREFIX = "tag:"


def tag_limits_behind(tx, names: list[str]) -> list[dict]:
    """The v1 tag limits (locked, decoded) standing for those of the names no global limit covers."""
    tags = [name[len(TAG_LIMIT_PREFIX) :] for name in names if name.startswith(TAG_LIMIT_PREFIX)]
    if not tags:
        return []
    marks = ", ".join("?" for _ in tags)
    covered = {
        row["name"]
        for row in tx.query(
            f"SELECT name FROM concurrency_limit_v2 WHERE name IN ({marks})",
            tuple(TAG_LIMIT_PREFIX + tag for tag in tags),
        )
    }
    tags = [tag for tag in tags if TAG_LIMIT_PREFIX + tag not in covered]
    if not tags:
        return []
    marks = ", ".join("?" for _ in tags)
    rows = tx.query(
        f"SELECT * FROM concurrency_limit WHERE tag IN ({marks}) ORDER BY tag{tx.db.for_update}", tuple(tags)
    )
    return [decode_row("concurrency_limit", row) for row in rows]


def tag_limits_full(limits: list[dict], slots: int) -> bool:
    return any(len(limit["active_slots"]) + slots > limit["concurrency_limit"] for limit in limits)


def as_global_limit(tag_limit: dict) -> dict:
    """A tag limit as a lease answer lists it (Prefect 3's shape: the global limit it is there)."""
    return {"id": tag_limit["id"], "name": TAG_LIMIT_PREFIX + tag_limit["tag"], "limit": tag_limit["concurrency_limit"]}


def release_tag_slots(tx, limit_ids: list[str], slot: str) -> None:
    marks = ", ".join("?" for _ in limit_ids)
    for row in tx.query(
        f"SELECT * FROM concurrency_limit WHERE id IN ({marks}) ORDER BY tag{tx.db.for_update}", tuple(limit_ids)
    ):
        limit = decode_row("concurrency_limit", row)
        if slot in limit["active_slots"]:
            update_row(
                tx,
                "concurrency_limit",
                limit["id"],
                {"active_slots": [s for s in limit["active_slots"] if s != slot], "updated": now_iso()},
            )


# Prefect 3's v1 `concurrency` context manager (prefect.concurrency.v1) takes one slot per tag for a task run,
# held until it gives them back (POST /concurrency_limits/increment and /decrement). A tag's slot comes from its
# global limit `tag:NAME` when there is one (under a lease held by the task run, good for a century as Prefect's
# is), else from its v1 row (the task run's id in active_slots). A tag without a limit takes none.
V1_TAG_LEASE_SECONDS = 100 * 365 * 86400


def _tag_limits_v2(tx, tags: list[str]) -> dict:
    """The global limits `tag:NAME` of the tags (active or not, locked), by tag."""
    marks = ", ".join("?" for _ in tags)
    rows = tx.query(
        f"SELECT * FROM concurrency_limit_v2 WHERE name IN ({marks}) ORDER BY name{tx.db.for_update}",
        tuple(TAG_LIMIT_PREFIX + tag for tag in tags),
    )
    return {row["name"][len(TAG_LIMIT_PREFIX) :]: decode_row("concurrency_limit_v2", row) for row in rows}


def take_tag_slots(tx, tags: list[str], task_run_id: str, wait_seconds: float):
    """(limits taken, None) or (None, (reason, Retry-After or None)): all or nothing. A limit of 0 refuses
    with no Retry-After (the client then gives up), a full one with one (the client retries after it)."""
    tags = list(dict.fromkeys(tags))
    if not tags:
        return [], None
    # Locks in release_lease's order: v1 rows by tag, then global limits by name
    v1 = {limit["tag"]: limit for limit in tag_limits_behind(tx, [TAG_LIMIT_PREFIX + tag for tag in tags])}
    v2 = _tag_limits_v2(tx, tags)
    for tag in tags:
        if (tag in v2 and v2[tag]["limit"] == 0) or (tag in v1 and v1[tag]["concurrency_limit"] == 0):
            return None, (
                f'The concurrency limit on tag "{tag}" is 0 and will deadlock if the task tries to run again.',
                None,
            )
    full = "Concurrency limit for the {} tag has been reached"
    for tag in tags:
        if tag in v1 and len(v1[tag]["active_slots"]) >= v1[tag]["concurrency_limit"]:
            return None, (full.format(tag), wait_seconds)
    wanted = [tag for tag in tags if tag in v2 and v2[tag]["active"]]
    taken = change_global_slots(tx, [TAG_LIMIT_PREFIX + tag for tag in wanted], 1, "concurrency", increment=True)
    if taken is None:
        return None, (full.format(wanted[0]), wait_seconds)
    if taken:
        create_lease(tx, taken, 1, V1_TAG_LEASE_SECONDS, {"type": "task_run", "id": task_run_id})
    answer = [{"id": v2[tag]["id"], "name": tag, "limit": v2[tag]["limit"]} for tag in wanted]
    now = now_iso()
    for tag in tags:
        if tag in v1:
            limit = v1[tag]
            update_row(
                tx,
                "concurrency_limit",
                limit["id"],
                {"active_slots": [*limit["active_slots"], task_run_id], "updated": now},
            )
            answer.append({"id": limit["id"], "name": tag, "limit": limit["concurrency_limit"]})
    return answer, None


def give_back_tag_slots(tx, tags: list[str], task_run_id: str) -> list[dict]:
    """Release the task run's slots on the tags' limits. Every limit of the tags is listed, held or not, named
    `tag:NAME`, as Prefect 3.9's server answers (its tag limits are all global ones)."""
    tags = list(dict.fromkeys(tags))
    if not tags:
        return []
    v1 = tag_limits_behind(tx, [TAG_LIMIT_PREFIX + tag for tag in tags])
    v2 = _tag_limits_v2(tx, tags)
    ids = {limit["id"] for limit in v2.values()}
    if ids:
        held = tx.query(
            "SELECT id, limit_ids, holder FROM concurrency_lease WHERE holder LIKE ?", (f"%{task_run_id}%",)
        )
        for row in held:
            lease = decode_row("concurrency_lease", row)
            if (lease["holder"] or {}).get("id") == task_run_id and ids & set(lease["limit_ids"]):
                release_lease(tx, lease["id"])
    answer = [{"id": limit["id"], "name": limit["name"], "limit": limit["limit"]} for limit in v2.values()]
    now = now_iso()
    for limit in v1:
        if task_run_id in limit["active_slots"]:
            slots = [slot for slot in limit["active_slots"] if slot != task_run_id]
            update_row(tx, "concurrency_limit", limit["id"], {"active_slots": slots, "updated": now})
        answer.append(as_global_limit(limit))
    return answer


def renew_lease(tx, lease_id: str, seconds: float) -> bool:
    """False when the lease is gone (released, or expired and repossessed)."""
    now = utcnow()
    return bool(
        tx.execute(
            "UPDATE concurrency_lease SET expiration = ? WHERE id = ? AND expiration > ?",
            (iso(now + _dt.timedelta(seconds=seconds)), lease_id, iso(now)),
        ).rowcount
    )


def release_lease(tx, lease_id: str) -> bool:
    """Give the lease's slots back (the time held counts toward the limits' average occupancy)."""
    row = tx.query_one(f"SELECT * FROM concurrency_lease WHERE id = ?{tx.db.for_update}", (lease_id,))
    if row is None:
        return False
    lease = decode_row("concurrency_lease", row)
    tx.execute("DELETE FROM concurrency_lease WHERE id = ?", (lease_id,))
    if lease["limit_ids"]:
        # Locks in the order increment-with-lease takes them (v1 tag limits by tag, then v2 limits by name; both
        # unique): taken the other way round, a release and an increment could deadlock on PostgreSQL.
        release_tag_slots(tx, lease["limit_ids"], (lease["holder"] or {}).get("id") or lease_id)
        marks = ", ".join("?" for _ in lease["limit_ids"])
        names = [
            r["name"]
            for r in tx.query(f"SELECT name FROM concurrency_limit_v2 WHERE id IN ({marks})", tuple(lease["limit_ids"]))
        ]
        held = max((utcnow() - from_iso(lease["created"])).total_seconds(), 0.0)
        change_global_slots(tx, names, lease["slots"], "concurrency", increment=False, occupancy_seconds=held or None)
    return True


def repossess_expired_leases(tx, limit: int = 100, now: _dt.datetime | None = None) -> int:
    expired = tx.query(
        "SELECT id FROM concurrency_lease WHERE expiration <= ? ORDER BY expiration LIMIT ?",
        (iso(now or utcnow()), limit),
    )
    return sum(release_lease(tx, row["id"]) for row in expired)


def secure_task_concurrency_slots(ctx: Transition):
    """Tag-based limits: a task may run only while each of its tags has a free slot."""
    if ctx.kind != "task" or ctx.proposed["type"] != "RUNNING" or not ctx.run.get("tags"):
        return None
    marks = ", ".join("?" for _ in ctx.run["tags"])
    limits = ctx.tx.query(
        f"SELECT * FROM concurrency_limit WHERE tag IN ({marks}) ORDER BY tag{ctx.tx.db.for_update}",
        tuple(ctx.run["tags"]),
    )
    limits = [decode_row("concurrency_limit", row) for row in limits]
    for limit in limits:
        if limit["concurrency_limit"] == 0:
            return Outcome(
                "ABORT",
                reason=f"The concurrency limit on tag {limit['tag']!r} is 0 and will deadlock "
                "if the task tries to run again.",
            )
        slots = limit["active_slots"]
        if ctx.run["id"] not in slots and len(slots) >= limit["concurrency_limit"]:
            return Outcome(
                "WAIT",
                reason=f"Concurrency limit for the {limit['tag']} tag has been reached",
                delay_seconds=ctx.tx.db.tag_slot_wait_seconds,
            )
    for limit in limits:
        if ctx.run["id"] not in limit["active_slots"]:
            update_row(
                ctx.tx,
                "concurrency_limit",
                limit["id"],
                {"active_slots": [*limit["active_slots"], ctx.run["id"]], "updated": iso(ctx.now)},
            )
    return None


# Deployment concurrency limits (Prefect 3): a deployment's limit is the global limit `deployment:{id}`. A run
# takes a slot on its way to PENDING (so a worker provisions nothing without one), under a lease whose id its
# states carry in state_details; the runner renews the lease while the run runs; leaving RUNNING gives it back.
DEPLOYMENT_LEASE_SECONDS = 300  # ...SERVER_CONCURRENCY_INITIAL_DEPLOYMENT_LEASE_DURATION: until the runner renews
HOLDING_STATES = ("PENDING", "RUNNING", "CANCELLING")  # the states a run holds its deployment's slot in


def _deployment_limit_of(tx: Transaction, run: dict) -> tuple[dict, dict] | None:
    """(the run's deployment, its global limit), when the run's deployment has one."""
    if not run.get("deployment_id"):
        return None
    row = tx.query_one(
        "SELECT id, concurrency_limit_id, concurrency_options FROM deployment WHERE id = ?", (run["deployment_id"],)
    )
    if row is None or not row["concurrency_limit_id"]:
        return None
    limit = read_row(tx, "concurrency_limit_v2", row["concurrency_limit_id"])
    if limit is None:
        return None
    return decode_row("deployment", row), decode_row("concurrency_limit_v2", limit)


def _own_lease_id(tx: Transaction, state: dict | None) -> str | None:
    """The lease id a state carries, unless it is not text or names a lease another run holds (a client
    writes state_details: it must not renew or give back another run's slot). A lease that is gone counts as
    the run's own: keep_deployment_lease_at_running then takes a new slot."""
    lease_id = state["state_details"].get(LEASE_DETAIL) if state else None
    if not isinstance(lease_id, str):
        return None
    row = tx.query_one("SELECT * FROM concurrency_lease WHERE id = ?", (lease_id,))
    if row is None:
        return lease_id
    holder = decode_row("concurrency_lease", row)["holder"] or {}
    return lease_id if holder.get("id") == state["state_details"].get("flow_run_id") else None


def _deployment_lease_seconds(dep: dict) -> float:
    return (dep.get("concurrency_options") or {}).get("grace_period_seconds") or DEPLOYMENT_LEASE_SECONDS


def _cancel_for_want_of_a_slot(ctx: Transition, reason: str, message: str) -> Outcome:
    outcome = _reject(ctx, "CANCELLED", "Cancelled", reason, **{LEASE_DETAIL: None})
    outcome.state["message"] = message
    return outcome


def secure_deployment_concurrency_slots(ctx: Transition):
    """A run of a limited deployment goes PENDING only with a slot; without one it waits (ENQUEUE: rescheduled
    as AwaitingConcurrencySlot) or is cancelled (CANCEL_NEW). Last of the flow rules: a slot is taken only for
    a transition that is accepted."""
    if ctx.kind != "flow" or ctx.proposed["type"] != "PENDING" or ctx.initial_type in HOLDING_STATES:
        return None
    found = _deployment_limit_of(ctx.tx, ctx.run)
    if found is None:
        return None
    dep, limit = found
    if limit["limit"] == 0:
        return Outcome(
            "ABORT", reason="The deployment concurrency limit is 0. The flow will deadlock if submitted again."
        )
    taken = change_global_slots(ctx.tx, [limit["name"]], 1, "concurrency", increment=True)
    if taken is not None:
        holder = {"type": "flow_run", "id": ctx.run["id"]}
        ctx.proposed["state_details"][LEASE_DETAIL] = create_lease(
            ctx.tx, taken, 1, _deployment_lease_seconds(dep), holder
        )
        return None
    reason = "Deployment concurrency limit reached."
    if (dep.get("concurrency_options") or {}).get("collision_strategy") == "CANCEL_NEW":
        return _cancel_for_want_of_a_slot(ctx, reason, reason)
    wait_until = ctx.now + _dt.timedelta(seconds=ctx.tx.db.deployment_slot_wait_seconds)
    return _reject(ctx, "SCHEDULED", "AwaitingConcurrencySlot", reason, scheduled_time=iso(wait_until))


def keep_deployment_lease_at_running(ctx: Transition):
    """PENDING → RUNNING carries the lease on and renews it; a lease lost meanwhile (expired while the worker
    provisioned) is taken anew if a slot is free, else the run is cancelled: it cannot wait any more."""
    if ctx.kind != "flow" or ctx.initial_type != "PENDING" or ctx.proposed["type"] != "RUNNING":
        return None
    lease_id = _own_lease_id(ctx.tx, ctx.initial)
    if lease_id or LEASE_DETAIL in ctx.proposed["state_details"]:  # never added to a run without a lease: a 2.x
        ctx.proposed["state_details"][LEASE_DETAIL] = lease_id  # SDK in test mode refuses an unknown detail
    found = _deployment_limit_of(ctx.tx, ctx.run) if lease_id else None
    if found is None:
        return None
    dep, limit = found
    if renew_lease(ctx.tx, lease_id, _deployment_lease_seconds(dep)):
        return None
    taken = change_global_slots(ctx.tx, [limit["name"]], 1, "concurrency", increment=True)
    if taken is not None:
        holder = {"type": "flow_run", "id": ctx.run["id"]}
        ctx.proposed["state_details"][LEASE_DETAIL] = create_lease(
            ctx.tx, taken, 1, _deployment_lease_seconds(dep), holder
        )
        return None
    return _cancel_for_want_of_a_slot(
        ctx,
        "Deployment concurrency limit reached after lease expiry.",
        "Deployment concurrency slot lost during provisioning - no slots available to continue execution",
    )


def carry_deployment_lease(initial: dict | None, state: dict, changes: dict) -> None:
    """A run keeps its lease into the states it holds its slot in, and into a retry the server scheduled in the
    same process (the engine keeps renewing the lease through the retry delay)."""
    lease_id = initial["state_details"].get(LEASE_DETAIL) if initial else None
    if not lease_id or state["state_details"].get(LEASE_DETAIL):
        return
    in_process_retry = (
        state["name"] == "AwaitingRetry" and (changes.get("empirical_policy") or {}).get("retry_type") == "in_process"
    )
    if state["type"] in HOLDING_STATES or in_process_retry:
        state["state_details"][LEASE_DETAIL] = lease_id


def release_deployment_slot(tx: Transaction, initial: dict | None, state: dict) -> None:
    """A state that does not carry the run's lease on gives its slot back (a lease already repossessed, as
    expired, gave it back then)."""
    lease_id = _own_lease_id(tx, initial)
    if lease_id and state["state_details"].get(LEASE_DETAIL) != lease_id:
        release_lease(tx, lease_id)


FLOW_RUN_RULES = (
    prevent_duplicate_transition,
    prevent_pending_transitions,
    prevent_leaving_terminal_states,
    only_cancel_cancelling_runs,
    cancel_runs_without_infrastructure,
    expire_pauses,
    handle_pausing_flows,
    wait_for_scheduled_time,
    retry_failed_runs,
    rename_reruns,
    copy_scheduled_time,
    keep_deployment_lease_at_running,
    secure_deployment_concurrency_slots,
)
TASK_RUN_RULES = (
    prevent_duplicate_transition,
    prevent_pending_transitions,
    prevent_leaving_terminal_states,
    prevent_running_tasks_in_stopped_flows,
    retrieve_cached_state,
    wait_for_scheduled_time,
    retry_failed_runs,
    rename_reruns,
    copy_scheduled_time,
    secure_task_concurrency_slots,
    reset_task_retries,
)


def run_rules(ctx: Transition, rules) -> Outcome:
    for rule in rules:
        outcome = rule(ctx)
        if outcome is not None:
            return outcome
    return Outcome("ACCEPT", ctx.proposed)


def _run_timing(run: dict, initial: dict | None, state: dict) -> dict:
    """Run counts and times that follow from entering `state` (Prefect's global bookkeeping)."""
    changes = {}
    now = state["timestamp"]
    if initial and initial["type"] == "RUNNING" and state["type"] != "RUNNING":
        elapsed = (from_iso(now) - from_iso(initial["timestamp"])).total_seconds()
        changes["total_run_time"] = (run.get("total_run_time") or 0.0) + max(elapsed, 0.0)
    if state["type"] == "RUNNING":
        changes["run_count"] = (run.get("run_count") or 0) + 1
        if not run.get("start_time"):
            changes["start_time"] = now
    if state["type"] in TERMINAL_STATES:
        changes["end_time"] = now
        if not run.get("start_time"):  # a run that ends before it ran (failed parameter validation)
            changes["start_time"] = now  # starts when it ends, as in Prefect 3's SetEndTime
    elif run.get("end_time"):
        changes["end_time"] = None
    scheduled = state["state_details"].get("scheduled_time")
    if state["type"] == "SCHEDULED":
        changes["next_scheduled_start_time"] = scheduled
        if scheduled and not run.get("start_time"):
            changes["expected_start_time"] = scheduled
    elif run.get("next_scheduled_start_time"):
        changes["next_scheduled_start_time"] = None
    return changes


def _state_history_row(table: str, run_id: str, state: dict) -> dict:
    return {
        "id": state["id"],
        "created": state["timestamp"],
        f"{table}_id": run_id,
        "type": state["type"],
        "name": state["name"],
        "timestamp": state["timestamp"],
        "message": state["message"],
        "data": state["data"],
        "state_details": state["state_details"],
    }


def _current_state_columns(state: dict) -> dict:
    return {
        "state_id": state["id"],
        "state_type": state["type"],
        "state_name": state["name"],
        "state_timestamp": state["timestamp"],
        "state": state,
        "updated": state["timestamp"],
    }


def _write_state(tx: Transaction, kind: str, run: dict, initial: dict | None, state: dict, extra: dict):
    """Record `state` as the run's current state: history row, run row, and what follows from it."""
    table = "flow_run" if kind == "flow" else "task_run"
    if kind == "flow":
        carry_deployment_lease(initial, state, extra)
    insert_row(tx, f"{table}_state", _state_history_row(table, run["id"], state))
    changes = _run_timing(run, initial, state)
    changes.update(extra)
    if kind == "task" and state["type"] == "RUNNING" and run.get("flow_run_id"):
        flow_run = _flow_run_brief(tx, run["flow_run_id"])
        changes["flow_run_run_count"] = (flow_run["run_count"] if flow_run else 0) or 0
    changes.update(_current_state_columns(state))
    update_row(tx, table, run["id"], changes)
    _follow_state(tx, kind, run, initial, state)
    run.update(changes)


def _follow_state(tx: Transaction, kind: str, run: dict, initial: dict | None, state: dict):
    """What a recorded state sets off beyond the run's own row."""
    if kind == "task":
        _after_task_state(tx, run, initial, state)
        return
    release_deployment_slot(tx, initial, state)
    if run.get("parent_task_run_id"):
        _mirror_state_on_parent_task(tx, run, state)


def _mirror_state_on_parent_task(tx: Transaction, run: dict, state: dict):
    """A subflow's stand-in task run in the parent follows the subflow's states (with child_flow_run_id)."""
    task = read_row(tx, "task_run", run["parent_task_run_id"])
    if task is None:
        return
    task = decode_row("task_run", task)
    copy = make_state(
        {
            "type": state["type"],
            "name": state["name"],
            "message": state["message"],
            "state_details": {"child_flow_run_id": run["id"]},
        },
        task.get("flow_run_id"),
        task["id"],
        state["timestamp"],
    )
    _write_state(tx, "task", task, task.get("state"), copy, {})


def _after_task_state(tx: Transaction, run: dict, initial: dict | None, state: dict):
    details = state["state_details"]
    if state["type"] == "COMPLETED" and details.get("cache_key") and state["name"] != "Cached":
        insert_row(
            tx,
            "task_run_state_cache",
            {
                "id": new_id(),
                "created": state["timestamp"],
                "cache_key": details["cache_key"],
                "cache_expiration": details.get("cache_expiration"),
                "task_run_state_id": state["id"],
            },
        )
    if initial and initial["type"] == "RUNNING" and state["type"] != "RUNNING" and run.get("tags"):
        release_task_concurrency_slots(tx, run)


def release_task_concurrency_slots(tx: Transaction, run: dict):
    marks = ", ".join("?" for _ in run["tags"])
    for row in tx.query(
        f"SELECT * FROM concurrency_limit WHERE tag IN ({marks}) ORDER BY tag{tx.db.for_update}", tuple(run["tags"])
    ):  # locked in tag order, as every locker of v1 limits: no deadlock
        limit = decode_row("concurrency_limit", row)
        if run["id"] in limit["active_slots"]:
            slots = [s for s in limit["active_slots"] if s != run["id"]]
            update_row(tx, "concurrency_limit", limit["id"], {"active_slots": slots, "updated": now_iso()})


def orchestrate(
    tx: Transaction,
    kind: str,
    run_row: dict,
    proposed: dict,
    force: bool,
    client_major: int = 2,
    now: _dt.datetime | None = None,
) -> Outcome:
    """Propose `proposed` (a validated StateCreate) for a run; write it if accepted or rejected-into.
    `now`: the time the rules judge by and the state is stamped with (the clock's, unless a test says)."""
    run = decode_row("flow_run" if kind == "flow" else "task_run", run_row)
    now = now or utcnow()
    flow_run_id = run["id"] if kind == "flow" else run.get("flow_run_id")
    state = make_state(proposed, flow_run_id, _state_task_run_id(kind, run), iso(now))
    initial = run.get("state")
    ctx = Transition(kind, tx, run, initial, state, now, client_major=client_major)
    outcome = (
        Outcome("ACCEPT", state) if force else run_rules(ctx, FLOW_RUN_RULES if kind == "flow" else TASK_RUN_RULES)
    )
    if outcome.status == "ACCEPT" or (outcome.status == "REJECT" and outcome.state is not initial):
        _write_state(tx, kind, run, initial, outcome.state, ctx.updates)
        for listener in tx.db.hooks.state_listeners:
            listener(tx, kind, run, initial, outcome.state)
        outcome.written = True
    else:
        outcome.written = False
        if outcome.status == "WAIT" and initial is not None:
            outcome.state = {**initial, "data": None}
    outcome.run = run
    return outcome


def insert_run_in_state(tx: Transaction, kind: str, values: dict, proposed: dict) -> dict | None:
    """Insert a new run already in its first state, forced (as Prefect does with a run's first state),
    and return it decoded; None when a run with the same unique key exists (nothing written then).

    One INSERT instead of an INSERT and an UPDATE: the indexes on the state's columns are written
    once, never first with NULLs. `values` must hold what _run_timing reads (run_count, total_run_time)
    and, for a task run, flow_run_run_count.
    """
    table = "flow_run" if kind == "flow" else "task_run"
    flow_run_id = values["id"] if kind == "flow" else values.get("flow_run_id")
    state = make_state(proposed, flow_run_id, _state_task_run_id(kind, values), now_iso())
    values.update(_run_timing(values, None, state))
    values.update(_current_state_columns(state))
    if not insert_row(tx, table, values, on_conflict="ON CONFLICT DO NOTHING"):
        return None
    insert_row(tx, f"{table}_state", _state_history_row(table, values["id"], state))
    run = decode_row(table, read_row(tx, table, values["id"]))  # with the columns' defaults, in their order
    _follow_state(tx, kind, run, None, state)
    for listener in tx.db.hooks.state_listeners:
        listener(tx, kind, run, None, state)
    return run


# --- 10. Runs ---
# Owns what the API does with flows, flow runs, task runs, states and logs: one short transaction per
# operation, idempotent creates, computed run fields. Every function takes an open Transaction.

# fmt: off
_ADJECTIVES = (
    "able", "amber", "ancient", "brave", "bright", "calm", "clever", "cosmic", "crimson", "curious", "daring",
    "dapper", "eager", "electric", "emerald", "fancy", "fearless", "fluffy", "fuzzy", "gentle", "giant",
    "glorious", "golden", "graceful", "happy", "hidden", "humble", "icy", "jolly", "keen", "lively", "lucky",
    "magic", "mellow", "mighty", "misty", "naughty", "nimble", "noble", "olive", "patient", "polite", "proud",
    "quiet", "rapid", "rustic", "sandy", "shiny", "silent", "silver", "smart", "snowy", "spicy", "steady",
    "stellar", "sunny", "swift", "tidy", "tranquil", "vivid", "warm", "wise", "witty", "zealous",
)
# fmt: on
# fmt: off
_ANIMALS = (
    "albatross", "alpaca", "antelope", "badger", "beaver", "bison", "bobcat", "buffalo", "camel", "caribou",
    "cheetah", "cobra", "condor", "coyote", "crane", "dingo", "dolphin", "eagle", "falcon", "ferret", "finch",
    "fox", "gazelle", "gecko", "gibbon", "heron", "hyena", "ibis", "iguana", "jackal", "jaguar", "koala",
    "lemur", "leopard", "lion", "llama", "lynx", "marmot", "mongoose", "moose", "narwhal", "ocelot", "orca",
    "otter", "panda", "panther", "parrot", "pelican", "penguin", "puffin", "quail", "raccoon", "raven",
    "salmon", "seal", "sparrow", "stork", "taipan", "tapir", "tiger", "toucan", "walrus", "wombat", "zebra",
)
# fmt: on


def generate_run_name() -> str:
    return f"{random.choice(_ADJECTIVES)}-{random.choice(_ANIMALS)}"


def _seconds_between(later: str | None, earlier: str | None) -> float:
    if not later or not earlier:
        return 0.0
    return (from_iso(later) - from_iso(earlier)).total_seconds()


def _computed_run_fields(row: dict, now: str | None = None) -> dict:
    """estimated_run_time and estimated_start_time_delta, from the row's plain columns (see run_json_select)."""
    now = now or now_iso()
    running = row.get("state_type") == "RUNNING" and row.get("state_timestamp")
    extra = _seconds_between(now, row["state_timestamp"]) if running else 0.0
    expected = row.get("expected_start_time")
    if row.get("start_time"):
        delta = _seconds_between(row["start_time"], expected)
    elif row.get("state_type") in ("SCHEDULED", "PENDING", "PAUSED") or row.get("state_type") is None:
        delta = _seconds_between(now, expected)
    else:
        delta = 0.0
    return {
        "estimated_run_time": round((row.get("total_run_time") or 0.0) + max(extra, 0.0), 6),
        "estimated_start_time_delta": round(max(delta, 0.0), 6),
    }


def run_out(table: str, row: dict, now: str | None = None) -> dict:
    """A flow or task run as the API shows it, with the fields the server computes on read."""
    run = decode_row(table, row)
    run.update(_computed_run_fields(row, now))
    return run


def run_json_select(tx, table: str, now: str, major: int = 2) -> tuple[str, tuple]:
    """SQL (and its parameters) that has the database write each run as the API shows it: the same
    object as run_out, as JSON text in a column named `doc`.

    Listing runs is the UI's and the workers' hottest read. Profiled with 100,000 runs, a page of 50
    spent 85% of its time turning rows into dicts and dicts into JSON while holding the GIL; the
    database does it in C, outside the GIL, in a third of the time. Aggregated into one row (see
    json_array_agg), the page also costs one step of the driver instead of 50: with 8 clients, each
    step's release and re-acquisition of the GIL had halved the throughput.
    """
    db, t = tx.db, table
    hidden, json_cols, bools = HIDDEN_COLUMNS.get(t, ()), JSON_COLUMNS.get(t, ()), BOOL_COLUMNS.get(t, ())
    if major == 3 and t in ("flow_run", "task_run"):  # as flow_run_out and task_run_out
        hidden = tuple(col for col in hidden if col != "labels")
    pairs, params = [], []
    for col in db.column_names(tx, t):
        if col in hidden:
            continue
        value = f"{t}.{_quote_column(col)}"
        if col == "state" and major == 3:  # as run_for_client
            value, state_params = db.json_with_defaults(value, "state_details", STATE_DETAIL_DEFAULTS_3)
            params.extend(state_params)
        elif col in json_cols:
            value = db.json_value.format(x=value)
        elif col in bools:
            value = db.json_bool.format(x=value)
        pairs.append(f"'{col}', {value}")

    run_time, delta = _run_estimates_sql(db, t)
    estimates = [
        f"'estimated_run_time', {db.round6.format(x=run_time)}",
        f"'estimated_start_time_delta', {db.round6.format(x=delta)}",
    ]
    params.extend((now,) * "".join(estimates).count("?"))  # every placeholder there is `now` (maybe repeated)
    return f"{db.json_object.format(pairs=', '.join(pairs + estimates))} AS doc", tuple(params)


def _run_estimates_sql(db, t: str) -> tuple[str, str]:
    """SQL for a run's estimated_run_time and estimated_start_time_delta, as _computed_run_fields
    computes them; every `?` in them stands for now."""

    def seconds(later, earlier):  # 0 where either time is missing, as _seconds_between
        return f"COALESCE({db.seconds_between.format(a=later, b=earlier)}, 0)"

    running = db.greatest.format(a=seconds("?", f"{t}.state_timestamp"), b="0")
    run_time = (
        f"COALESCE({t}.total_run_time, 0) + CASE WHEN {t}.state_type = 'RUNNING' AND "
        f"{t}.state_timestamp IS NOT NULL THEN {running} ELSE 0 END"
    )
    delta = (
        f"CASE WHEN {t}.start_time IS NOT NULL THEN {seconds(f'{t}.start_time', f'{t}.expected_start_time')} "
        f"WHEN {t}.state_type IS NULL OR {t}.state_type IN ('SCHEDULED', 'PENDING', 'PAUSED') "
        f"THEN {seconds('?', f'{t}.expected_start_time')} ELSE 0 END"
    )
    return run_time, db.greatest.format(a=delta, b="0")


def decoded_run_out(table: str, run: dict) -> dict:
    """run_out for a run already decoded (as orchestrate leaves it): no second read of the row."""
    out = {key: value for key, value in run.items() if key not in HIDDEN_COLUMNS.get(table, ())}
    out.update(_computed_run_fields(run))
    return out


def stored_labels(row: dict) -> dict:
    """A row's `labels` column (JSON text on SQLite, already parsed on PostgreSQL) as a dict."""
    labels = row.get("labels")
    return (_json_text(labels) if isinstance(labels, str) else labels) or {}


def run_for_client(run: dict, labels: dict, major: int) -> dict:
    """A run (as run_out shows it) as a client of `major` (client_major) reads it: Prefect 3 shows its `labels`
    (2.20 has none) and its state's 3.x details (state_for_client)."""
    if major == 3:
        run["labels"] = labels
        run["state"] = state_for_client(run.get("state"), major)
    return run


def flow_run_out(row, major: int = 2):
    return run_for_client(run_out("flow_run", row), stored_labels(row), major)


def task_run_out(row, major: int = 2):
    return run_for_client(run_out("task_run", row), stored_labels(row), major)


def state_out(table: str, row: dict, major: int = 2) -> dict:
    state = decode_row(table, row)
    state.pop("created", None)
    state.pop(f"{table[:-6]}_id", None)
    return state_for_client(state, major)


# Flows


def flow_out(row: dict, major: int = 2) -> dict:
    """A flow as a client of `major` (client_major) reads it: Prefect 3 shows its `labels`, 2.20 has none."""
    flow = decode_row("flow", row)
    if major == 3:
        flow["labels"] = stored_labels(row)
    return flow


def create_flow(tx, data: dict, major: int = 2) -> tuple[dict, bool]:
    """Create a flow, or return the one with the name (its labels unchanged, as in Prefect 3)."""
    now = now_iso()
    inserted = insert_row(
        tx,
        "flow",
        {
            "id": new_id(),
            "created": now,
            "updated": now,
            "name": data["name"],
            "tags": data["tags"],
            "labels": data.get("labels") or {},
        },
        on_conflict="ON CONFLICT DO NOTHING",
    )
    row = tx.query_one("SELECT * FROM flow WHERE name = ?", (data["name"],))
    return flow_out(row, major), bool(inserted)


def read_flow_by_name(tx, name: str, major: int = 2) -> dict:
    row = tx.query_one("SELECT * FROM flow WHERE name = ?", (name,))
    if row is None:
        raise NotFound("Flow not found")
    return flow_out(row, major)


# Flow runs


def flow_run_labels(tx, flow: dict, data: dict) -> dict:
    """A new run's labels, as Prefect 3 stores them: its deployment's labels (which hold its flow's, see
    deployment_labels) or else its flow's, then prefect.flow.id (and prefect.deployment.id), then the
    client's own labels over them."""
    labels = {**stored_labels(flow), "prefect.flow.id": flow["id"]}
    dep = read_row(tx, "deployment", data["deployment_id"]) if data.get("deployment_id") else None
    if dep is not None:
        labels = {**stored_labels(dep), "prefect.flow.id": dep["flow_id"], "prefect.deployment.id": dep["id"]}
    return {**labels, **(data.get("labels") or {})}


def create_flow_run(tx, data: dict, extra: dict | None = None, major: int = 2) -> tuple[dict, bool]:
    """Create a run (or return the one with the same idempotency key), in the shape a client of `major`
    reads (see flow_run_out). Its first state is forced."""
    flow = read_row(tx, "flow", data["flow_id"])
    if flow is None:
        raise NotFound("Flow not found")
    key = data.get("idempotency_key")
    if key is not None:
        row = tx.query_one("SELECT * FROM flow_run WHERE flow_id = ? AND idempotency_key = ?", (data["flow_id"], key))
        if row is not None:
            return flow_run_out(row, major), False
    now = now_iso()
    run_id = new_id()
    values = {
        "id": run_id,
        "created": now,
        "updated": now,
        "name": data.get("name") or generate_run_name(),
        "flow_id": data["flow_id"],
        "deployment_id": data.get("deployment_id"),
        "flow_version": data.get("flow_version"),
        "parameters": data.get("parameters") or {},
        "idempotency_key": key,
        "context": data.get("context") or {},
        "empirical_policy": _flow_run_policy(data.get("empirical_policy")),
        "tags": data.get("tags") or [],
        "labels": flow_run_labels(tx, flow, data),
        "parent_task_run_id": data.get("parent_task_run_id"),
        "infrastructure_document_id": data.get("infrastructure_document_id"),
        "job_variables": data.get("job_variables") or {},
        "work_queue_name": data.get("work_queue_name"),
        "expected_start_time": now,
        "run_count": 0,
        "total_run_time": 0.0,
        "auto_scheduled": False,
    }
    values.update(extra or {})
    values.update(run_work_pool(tx, values.get("work_queue_id")))
    run = insert_run_in_state(tx, "flow", values, data.get("state") or {"type": "PENDING", "state_details": {}})
    if run is None:
        row = tx.query_one("SELECT * FROM flow_run WHERE flow_id = ? AND idempotency_key = ?", (data["flow_id"], key))
        return flow_run_out(row, major), False
    return run_for_client(decoded_run_out("flow_run", run), values["labels"], major), True


def run_work_pool(tx, queue_id: str | None) -> dict:
    """A run's work_pool_id and work_pool_name: its work queue's pool, as Prefect's FlowRunResponse fills them
    (2.20's and 3.x's alike). Kept on the run (a pool keeps its name); cleared when the queue or pool goes
    (detach_from_queues)."""
    found = queue_id and tx.query_one(
        "SELECT wp.id, wp.name FROM work_queue wq JOIN work_pool wp ON wp.id = wq.work_pool_id WHERE wq.id = ?",
        (queue_id,),
    )
    return {"work_pool_id": found["id"], "work_pool_name": found["name"]} if found else {}


def detach_from_queues(tx, where: str, params: tuple):
    """Runs and deployments whose work queue is going (`where` picks them by work_queue_id) lose it, as in
    Prefect (its foreign keys are ON DELETE SET NULL): work_queue_id becomes null, and a run's work pool with
    it; work_queue_name stays, as there."""
    tx.execute(
        f"UPDATE flow_run SET work_queue_id = NULL, work_pool_id = NULL, work_pool_name = NULL WHERE {where}", params
    )
    tx.execute(f"UPDATE deployment SET work_queue_id = NULL WHERE {where}", params)


def _flow_run_policy(policy: dict | None) -> dict:
    out = {
        "max_retries": 0,
        "retry_delay_seconds": 0.0,
        "retries": None,
        "retry_delay": None,
        "pause_keys": [],
        "resuming": False,
        "retry_type": None,
    }
    out.update(policy or {})
    return out


def _task_run_policy(policy: dict | None) -> dict:
    out = {"max_retries": 0, "retry_delay_seconds": 0.0, "retries": 0, "retry_delay": 0, "retry_jitter_factor": None}
    out.update(policy or {})
    return out


def set_run_state(tx, kind: str, run_id: str, proposed: dict, force: bool, client_major: int = 2) -> Outcome:
    table = "flow_run" if kind == "flow" else "task_run"
    row = read_row(tx, table, run_id, lock=True)
    if row is None:
        raise NotFound(f"{'Flow' if kind == 'flow' else 'Task'} run not found")
    return orchestrate(tx, kind, row, proposed, force, client_major)


def resume_flow_run(tx, run_id: str, run_input: dict | None) -> Outcome:
    row = read_row(tx, "flow_run", run_id, lock=True)
    if row is None:
        raise NotFound("Flow run not found")
    run = decode_row("flow_run", row)
    state = run.get("state") or {}
    if state.get("type") != "PAUSED":
        return Outcome("ABORT", None, "Cannot resume a flow run that is not paused.")
    details = state.get("state_details") or {}
    if details.get("pause_timeout") and from_iso(details["pause_timeout"]) < utcnow():
        return orchestrate(
            tx,
            "flow",
            row,
            {"type": "FAILED", "message": "The flow was paused and never resumed.", "state_details": {}},
            force=True,
        )
    keyset = details.get("run_input_keyset")  # {"schema": key, "response": key, ...}: an input is awaited
    if keyset:
        run_input = run_input or {}
        problem = _run_input_problem(tx, run_id, keyset, run_input)
        if problem:
            return Outcome("REJECT", state, problem)
    if details.get("pause_reschedule"):
        proposed = {"type": "SCHEDULED", "name": "Resuming", "state_details": {"scheduled_time": now_iso()}}
    else:
        proposed = {"type": "RUNNING", "state_details": {}}
    outcome = orchestrate(tx, "flow", row, proposed, force=True)
    if keyset and run_input and outcome.status == "ACCEPT":  # the answer the paused flow reads back
        create_flow_run_input(tx, run_id, keyset["response"], dumps(run_input), None)
    return outcome


def _run_input_problem(tx, run_id: str, keyset: dict, run_input: dict) -> str | None:
    """Why `run_input` cannot resume a run paused with wait_for_input (checked against the JSON schema
    the paused flow stored under keyset["schema"]), or None."""
    schema_text = tx.scalar(
        "SELECT value FROM flow_run_input WHERE flow_run_id = ? AND key = ?", (run_id, keyset.get("schema"))
    )
    if schema_text is None:
        return "Run input schema not found."
    try:
        schema = json.loads(schema_text)
    except ValueError:
        return "Run input schema is not valid JSON."
    errors = validate_parameters(schema if isinstance(schema, dict) else {}, run_input)
    return f"Reason: {errors[0]['msg']}" if errors else None


# Flow run inputs: text values sent to a run, keyed (pause_flow_run(wait_for_input=...), send_input and
# receive_input in the SDK). A resume's run_input is stored here too (resume_flow_run).


def create_flow_run_input(tx, run_id: str, key: str, value: str, sender: str | None) -> None:
    require_row(tx, "flow_run", run_id, "Flow run")
    now = now_iso()
    if not insert_row(
        tx,
        "flow_run_input",
        {
            "id": new_id(),
            "created": now,
            "updated": now,
            "flow_run_id": run_id,
            "key": key,
            "value": value,
            "sender": sender,
        },
        on_conflict="ON CONFLICT DO NOTHING",
    ):
        raise Conflict("A flow run input with this key already exists.")


def filter_flow_run_inputs(tx, run_id: str, prefix: str, limit: int, exclude_keys: list[str]) -> list[dict]:
    """The run's inputs whose key starts with `prefix` (exactly: not LIKE, which SQLite folds to lower
    case), but for `exclude_keys`, oldest first."""
    sql = (
        "SELECT id, created, updated, flow_run_id, key, value, sender FROM flow_run_input "
        "WHERE flow_run_id = ? AND substr(key, 1, ?) = ?"
    )
    params = [run_id, len(prefix), prefix]
    if exclude_keys:
        sql += f" AND key NOT IN ({', '.join('?' for _ in exclude_keys)})"
        params += exclude_keys
    return tx.query(sql + " ORDER BY created, id LIMIT ?", (*params, limit))


def read_flow_run_input(tx, run_id: str, key: str) -> str:
    value = tx.scalar("SELECT value FROM flow_run_input WHERE flow_run_id = ? AND key = ?", (run_id, key))
    if value is None:
        raise NotFound("Flow run input not found")
    return value


def delete_flow_run_input(tx, run_id: str, key: str) -> None:
    if not tx.execute("DELETE FROM flow_run_input WHERE flow_run_id = ? AND key = ?", (run_id, key)).rowcount:
        raise NotFound("Flow run input not found")


# Task runs


def task_run_labels(flow_run: dict | None, data: dict) -> dict:
    """A new task run's labels, as Prefect 3 stores them (with_system_labels_for_task_run): its flow run's
    labels and prefect.flow-run.id, then the client's own labels over them; none without a flow run."""
    labels = {**stored_labels(flow_run), "prefect.flow-run.id": flow_run["id"]} if flow_run else {}
    return {**labels, **(data.get("labels") or {})}


def create_task_run(tx, data: dict, major: int = 2) -> tuple[dict, bool]:
    """Create a task run, or answer the one its flow run has with the same task_key and dynamic_key
    (True when created), as a client of `major` reads it (task_run_out)."""
    flow_run_id, flow_run = data.get("flow_run_id"), None
    if flow_run_id is not None:  # (a task run created before is found by the INSERT's unique key below)
        flow_run = tx.query_one("SELECT id, run_count, labels FROM flow_run WHERE id = ?", (flow_run_id,))
        if flow_run is None:
            raise NotFound("Flow run not found")
    now = now_iso()
    values = {
        "id": data.get("id") or new_id(),
        "created": now,
        "updated": now,
        "name": data.get("name") or generate_run_name(),
        "flow_run_id": flow_run_id,
        "task_key": data["task_key"],
        "dynamic_key": data["dynamic_key"],
        "cache_key": data.get("cache_key"),
        "cache_expiration": data.get("cache_expiration"),
        "task_version": data.get("task_version"),
        "empirical_policy": _task_run_policy(data.get("empirical_policy")),
        "tags": data.get("tags") or [],
        "task_inputs": data.get("task_inputs") or {},
        "labels": task_run_labels(flow_run, data),
        "run_count": 0,
        "flow_run_run_count": flow_run["run_count"] if flow_run else 0,
        "expected_start_time": now,
        "total_run_time": 0.0,
    }
    run = insert_run_in_state(tx, "task", values, data.get("state") or {"type": "PENDING", "state_details": {}})
    if run is None:
        row = tx.query_one(
            "SELECT * FROM task_run WHERE flow_run_id = ? AND task_key = ? AND dynamic_key = ?",
            (flow_run_id, data["task_key"], data["dynamic_key"]),
        )
        if row is None:  # what conflicted was the id the client chose
            raise Conflict(f"A task run with id {values['id']} already exists.")
        return task_run_out(row, major), False
    return run_for_client(decoded_run_out("task_run", run), values["labels"], major), True


# Logs


def create_logs(tx, logs: list[dict]) -> int:
    now = now_iso()
    rows = [
        (
            new_id(),
            now,
            now,
            entry["name"],
            entry["level"],
            entry["message"],
            entry["timestamp"],
            entry.get("flow_run_id"),
            entry.get("task_run_id"),
        )
        for entry in logs
    ]
    if rows:
        tx.executemany(
            "INSERT INTO log (id, created, updated, name, level, message, timestamp, flow_run_id, task_run_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        _feed_log_sinks(tx, rows)
    return len(rows)


_LOG_COLUMNS = ("id", "created", "updated", "name", "level", "message", "timestamp", "flow_run_id", "task_run_id")


def streamed_log(row: dict) -> dict:
    """A stored log as Prefect's log stream sends it: the Log it made before its INSERT gave it created and
    updated, which go as null."""
    return {**decode_row("log", row), "created": None, "updated": None}


def _feed_log_sinks(tx, rows: list[tuple]):
    """The stored logs to the live log stream (the log_sinks) once the transaction commits."""
    if tx.db.hooks.log_sinks:
        logs = [streamed_log(dict(zip(_LOG_COLUMNS, row))) for row in rows]
        for sink in tx.db.hooks.log_sinks:
            tx.after_commit.append(functools.partial(sink, logs))


# Graphs and history


def flow_run_graph(tx, run_id: str, major: int = 2) -> list[dict]:
    require_row(tx, "flow_run", run_id, "Flow run")
    rows = tx.query("SELECT * FROM task_run WHERE flow_run_id = ? ORDER BY expected_start_time, id", (run_id,))
    out = []
    for row in rows:
        task = task_run_out(row, major)  # its state as the client reads states (3.9's details for 3.x)
        upstream = [
            ref
            for refs in (task.get("task_inputs") or {}).values()
            for ref in (refs or [])
            if isinstance(ref, dict)
            and ref.get("input_type") in ("task_run", "parameter", "constant")
            and ref.get("id")
        ]
        out.append(
            {
                "id": task["id"],
                "name": task["name"],
                "upstream_dependencies": upstream,
                "state": task["state"],
                "expected_start_time": task["expected_start_time"],
                "start_time": task["start_time"],
                "end_time": task["end_time"],
                "total_run_time": task["total_run_time"],
                "estimated_run_time": task["estimated_run_time"],
                "untrackable_result": False,
            }
        )
    return out


def flow_run_graph_v2(tx, run_id: str) -> dict:
    run = flow_run_out(require_row(tx, "flow_run", run_id, "Flow run"))
    tasks = [
        task_run_out(r)
        for r in tx.query("SELECT * FROM task_run WHERE flow_run_id = ? ORDER BY expected_start_time, id", (run_id,))
    ]
    subflows = {}
    if tasks:
        marks = ", ".join("?" for _ in tasks)
        for row in tx.query(
            f"SELECT * FROM flow_run WHERE parent_task_run_id IN ({marks})", tuple(t["id"] for t in tasks)
        ):
            sub = flow_run_out(row)
            subflows[sub["parent_task_run_id"]] = sub
    nodes, children = {}, {}
    for task in tasks:
        sub = subflows.get(task["id"])
        node_id, kind, label = (sub["id"], "flow-run", sub["name"]) if sub else (task["id"], "task-run", task["name"])
        source = sub or task
        parents = [
            {"kind": "task-run", "id": ref["id"]}
            for refs in (task.get("task_inputs") or {}).values()
            for ref in (refs or [])
            if isinstance(ref, dict) and ref.get("input_type") == "task_run"
        ]
        nodes[node_id] = {
            "kind": kind,
            "id": node_id,
            "label": label,
            "state_type": source["state_type"],
            "start_time": source["start_time"] or source["expected_start_time"],
            "end_time": source["end_time"],
            "parents": parents,
            "children": [],
            "artifacts": [],
        }
        for parent in parents:
            children.setdefault(parent["id"], []).append({"kind": kind, "id": node_id})
    for node_id, node in nodes.items():
        node["children"] = children.get(node_id, [])
    roots = [node_id for node_id, node in nodes.items() if not node["parents"]]
    states = [
        state_out("flow_run_state", r)
        for r in tx.query("SELECT * FROM flow_run_state WHERE flow_run_id = ? ORDER BY timestamp", (run_id,))
    ]
    return {
        "start_time": run["start_time"] or run["expected_start_time"],
        "end_time": run["end_time"],
        "root_node_ids": roots,
        "nodes": [[k, v] for k, v in nodes.items()],
        "artifacts": [],
        "states": [{"id": s["id"], "timestamp": s["timestamp"], "type": s["type"], "name": s["name"]} for s in states],
    }


def history_query(tx, table: str, body: dict, starts: list[str], end: str):
    """SQL and parameters of run_history's counts and sums per (bucket, state), for buckets that begin
    at `starts` (ISO texts, ascending) and end at the next start or `end`."""
    where, params = build_where(tx, table, body)
    db, t = tx.db, table
    # Counted and summed in the database, from one covering index (migration 0005): one row per (bucket,
    # state). A run's bucket is found by comparing its time with the buckets' edges (our timestamps are
    # one fixed-width format, so text order is time order): exact at every edge, and half the cost of
    # time arithmetic on every row. The sums are of the same estimates a run shows (run_json_select).
    bucket, edges = _bucket_sql(f"{t}.expected_start_time", starts[1:])
    run_time, lateness = _run_estimates_sql(db, t)
    sql = (
        f"SELECT {bucket} AS bucket, {t}.state_type AS state_type, {t}.state_name AS state_name, COUNT(*) AS n, "
        f"SUM({run_time}) AS run_time, SUM({lateness}) AS lateness "
        f"FROM {t} WHERE {where} AND {t}.expected_start_time >= ? AND {t}.expected_start_time < ? "
        f"GROUP BY 1, {t}.state_type, {t}.state_name"
    )
    estimates = (now_iso(),) * (run_time.count("?") + lateness.count("?"))
    return sql, (*edges, *estimates, *params, starts[0], end)


def _bucket_sql(column: str, edges: list[str]) -> tuple[str, list[str]]:
    """SQL for the number of `edges` (ascending) at or below `column`: a balanced tree of comparisons."""
    if not edges:
        return "0", []
    middle = len(edges) // 2
    below, below_edges = _bucket_sql(column, edges[:middle])
    above, above_edges = _bucket_sql(column, edges[middle + 1 :])
    above = f"{middle + 1} + {above}" if above != "0" else str(middle + 1)
    return f"CASE WHEN {column} < ? THEN {below} ELSE {above} END", [edges[middle], *below_edges, *above_edges]


_LAST_MOMENT = _dt.datetime.max.replace(tzinfo=_dt.timezone.utc)


def _step_toward(moment: _dt.datetime, seconds: float, end: _dt.datetime) -> _dt.datetime:
    """`seconds` after `moment`, but not past `end` (nor past the calendar's last day, year 9999)."""
    try:
        return min(moment + _dt.timedelta(seconds=seconds), end)
    except OverflowError:
        return end


def run_history(tx, table: str, body: dict) -> list[dict]:
    """Counts of runs by state per time bucket, for the dashboard's bar chart."""
    start, end = from_iso(body["history_start"]), from_iso(body["history_end"])
    step = body["history_interval_seconds"]
    if not 0 < step <= _A_CENTURY:
        raise ValidationFailed(
            [_error(("body", "history_interval_seconds"), "must be positive and at most 3.2e9 seconds", "value_error")]
        )
    if end < start:
        raise ValidationFailed([_error(("body", "history_end"), "must not be before history_start", "value_error")])
    if (end - start).total_seconds() / step > 500:
        raise ValidationFailed(
            [
                _error(
                    ("body", "history_interval_seconds"),
                    "too many buckets (at most 500); use a larger interval",
                    "value_error",
                )
            ]
        )
    starts = []
    moment = start
    while moment < end:
        starts.append(moment)
        moment = _step_toward(moment, step, end)
    buckets = [
        {"interval_start": iso(first), "interval_end": iso(_step_toward(first, step, end)), "states": []}
        for first in starts
    ]
    rows = tx.query(*history_query(tx, table, body, [b["interval_start"] for b in buckets], iso(end))) if starts else []
    for row in rows:
        index = int(row["bucket"])
        if 0 <= index < len(buckets):
            buckets[index]["states"].append(
                {
                    "state_type": row["state_type"],
                    "state_name": row["state_name"],
                    "count_runs": int(row["n"]),
                    "sum_estimated_run_time": float(row["run_time"] or 0.0),
                    "sum_estimated_lateness": float(row["lateness"] or 0.0),
                }
            )
    for bucket in buckets:
        bucket["states"].sort(key=lambda s: (s["state_type"] or "", s["state_name"] or ""))
    return buckets


# Retention: old terminal runs go, with everything that hangs off them, a small batch per transaction.


def prune_flow_runs(
    db: Database,
    older_than: _dt.timedelta,
    batch_size: int = 200,
    dry_run: bool = False,
    stop: threading.Event | None = None,
    now: _dt.datetime | None = None,
) -> dict:
    """Delete terminal flow runs that ended before now - older_than, with their task runs, states, logs
    and artifacts. Each batch is one short write transaction, so the API never waits long."""
    horizon = iso((now or utcnow()) - older_than)
    terminal = ", ".join(f"'{t}'" for t in TERMINAL_STATES)
    select = f"SELECT id FROM flow_run WHERE state_type IN ({terminal}) AND end_time < ?"
    counts = dict.fromkeys(("flow_runs", "task_runs", "flow_run_states", "task_run_states", "logs", "artifacts"), 0)
    counting = {
        "flow_runs": "SELECT COUNT(*) FROM flow_run WHERE id IN ({ids})",
        "task_runs": "SELECT COUNT(*) FROM task_run WHERE flow_run_id IN ({ids})",
        "flow_run_states": "SELECT COUNT(*) FROM flow_run_state WHERE flow_run_id IN ({ids})",
        "task_run_states": (
            "SELECT COUNT(*) FROM task_run_state WHERE task_run_id IN "
            "(SELECT id FROM task_run WHERE flow_run_id IN ({ids}))"
        ),
        "logs": "SELECT COUNT(*) FROM log WHERE flow_run_id IN ({ids})",
        "artifacts": "SELECT COUNT(*) FROM artifact WHERE flow_run_id IN ({ids})",
    }
    if dry_run:
        with db.read() as tx:
            for key, sql in counting.items():
                counts[key] = int(tx.scalar(sql.format(ids=select), (horizon,)))
        return counts
    while not (stop and stop.is_set()):
        with db.write() as tx:
            ids = [r["id"] for r in tx.query(select + " ORDER BY end_time LIMIT ?", (horizon, batch_size))]
            if not ids:
                break
            marks = ", ".join("?" for _ in ids)
            for key, sql in counting.items():
                counts[key] += int(tx.scalar(sql.format(ids=marks), ids))
            tx.execute(f"DELETE FROM log WHERE flow_run_id IN ({marks})", ids)
            keys = [
                r["key"]
                for r in tx.query(
                    f"SELECT DISTINCT key FROM artifact WHERE flow_run_id IN ({marks}) AND key IS NOT NULL", ids
                )
            ]
            tx.execute(f"DELETE FROM artifact WHERE flow_run_id IN ({marks})", ids)
            _repoint_artifact_keys(tx, keys)
            tx.execute(f"DELETE FROM flow_run WHERE id IN ({marks})", ids)  # states and task runs cascade
    return counts


def _repoint_artifact_keys(tx, keys: list[str]):
    for key in keys:
        newest = tx.query_one("SELECT id FROM artifact WHERE key = ? ORDER BY created DESC, id DESC LIMIT 1", (key,))
        if newest is None:
            tx.execute("DELETE FROM artifact_collection WHERE key = ?", (key,))
        else:
            tx.execute("UPDATE artifact_collection SET latest_id = ? WHERE key = ?", (newest["id"], key))


def parse_age(text: str) -> _dt.timedelta:
    """'30d', '12h', '90m', '45s' or '2w' -> timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not match:
        raise ConfigurationError(f"cannot read the age {text!r}; use e.g. 30d, 12h, 90m or 2w")
    value, unit = float(match.group(1)), match.group(2)
    return _dt.timedelta(seconds=value * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit])


# --- 11. Events ---
# Owns Prefect 3 events: storing and querying them, the task-run recorder that turns task-run
# events into task runs, and the flow-run state events the server emits itself.

# Events: what Prefect 3 clients report over /api/events/in (task runs among them), stored with one
# row per involved resource (event_resources) so filters on related resources stay indexable.

EVENT_NAME_MAX_LENGTH = 1024  # Prefect's PREFECT_SERVER_EVENTS_MAXIMUM_EVENT_NAME_LENGTH
EVENT_MAX_RELATED = 500  # Prefect's PREFECT_EVENTS_MAXIMUM_RELATED_RESOURCES
EVENT_MAX_LABELS = 500  # Prefect's maximum labels per resource
EVENT_PAGE_SIZE = 50  # Prefect's INTERACTIVE_PAGE_SIZE: the default and largest page of /events/filter
EVENT_DEFAULT_LOOKBACK_DAYS = 180  # a filter without `occurred.since` starts this many days before today
EVENT_COUNT_MAX_BUCKETS = 1000
# Time buckets of /events/count-by/time are counted from here (Prefect's PIVOT_DATETIME, a Monday).
EVENT_COUNT_PIVOT = _dt.datetime(2024, 4, 1, tzinfo=_dt.timezone.utc)
EVENT_TIME_UNITS = {
    "week": _dt.timedelta(days=7),
    "day": _dt.timedelta(days=1),
    "hour": _dt.timedelta(hours=1),
    "minute": _dt.timedelta(minutes=1),
    "second": _dt.timedelta(seconds=1),
}
EVENT_COUNTABLES = ("day", "time", "event", "resource")

EventCreate = Schema(
    "Event",
    {
        "occurred": Field("datetime", required=True, nullable=False),
        "event": Field("str", required=True, nullable=False, max_length=EVENT_NAME_MAX_LENGTH),
        "resource": Field("object", required=True, nullable=False),
        "related": Field(ListOf("object", max_items=EVENT_MAX_RELATED), default=list, nullable=False),
        "payload": Field("object", default=dict, nullable=False),
        "id": Field("uuid", required=True, nullable=False),
        "follows": Field("uuid"),
    },
)
_STRS = ListOf("str")
EventOccurredFilter = Schema("EventOccurredFilter", {"since": Field("datetime"), "until": Field("datetime")})
EventNameFilter = Schema(
    "EventNameFilter",
    {"prefix": Field(_STRS), "exclude_prefix": Field(_STRS), "name": Field(_STRS), "exclude_name": Field(_STRS)},
)
EventResourceFilter = Schema(
    "EventResourceFilter",
    {
        "id": Field(_STRS),
        "id_prefix": Field(_STRS),
        "labels": Field("object"),
        "distinct": Field("bool", default=False, nullable=False),
    },
)
EventRelatedFilter = Schema(
    "EventRelatedFilter",
    {"id": Field(_STRS), "role": Field(_STRS), "resources_in_roles": Field(ListOf(_STRS)), "labels": Field("object")},
)
EventAnyResourceFilter = Schema(
    "EventAnyResourceFilter", {"id": Field(_STRS), "id_prefix": Field(_STRS), "labels": Field("object")}
)
EventIDFilter = Schema("EventIDFilter", {"id": Field(ListOf("uuid"))})
EventTextFilter = Schema("EventTextFilter", {"query": Field("str", required=True, nullable=False, max_length=200)})
EventFilter = Schema(
    "EventFilter",
    {
        "occurred": Field(EventOccurredFilter, default=dict, nullable=False),
        "event": Field(EventNameFilter),
        "resource": Field(EventResourceFilter),
        "related": Field("any", description="an EventRelatedFilter or a list of them (all must match)"),
        "any_resource": Field("any", description="an EventAnyResourceFilter or a list of them (all must match)"),
        "id": Field(EventIDFilter, default=dict, nullable=False),
        "text": Field(EventTextFilter),
        "order": Field(Enum("EventOrder", ("ASC", "DESC")), default="DESC", nullable=False),
    },
)
EventFilterBody = Schema(
    "Body_read_events",
    {
        "filter": Field(EventFilter),
        # More than a page is capped rather than refused: Prefect 3's client asks for 100 by default.
        "limit": Field("int", default=EVENT_PAGE_SIZE, nullable=False, minimum=0),
    },
)
EventCountBody = Schema(
    "Body_count_events",
    {
        "filter": Field(EventFilter, required=True, nullable=False),
        "time_unit": Field(Enum("TimeUnit", tuple(EVENT_TIME_UNITS)), default="day", nullable=False),
        "time_interval": Field("float", default=1.0, nullable=False, minimum=0.01),
    },
)


def _validate_labels(value, loc) -> dict:
    """A ResourceSpecification: label -> glob pattern or list of them ('!' negates)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationFailed([_error(loc, "value is not a valid dict", "type_error.dict")])
    out = {}
    for label, patterns in value.items():
        patterns = [patterns] if isinstance(patterns, str) else patterns
        out[label] = _validate_kind(_STRS, patterns, (*loc, label))
    return out


def _filter_list(schema: Schema, value, loc) -> list[dict]:
    """`related` and `any_resource` take one filter or a list of them; either way: all must match."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        here = (*loc, i) if isinstance(value, list) else loc
        out.append(schema.validate(item, here))
        out[-1]["labels"] = _validate_labels(out[-1].get("labels"), (*here, "labels"))
    return out


def normalize_event_filter(flt: dict | None, loc=("body", "filter"), until: _dt.timedelta = _dt.timedelta(0)) -> dict:
    """A validated EventFilter with its defaults fixed: the time window is pinned now (so the pages of one
    query and a page token's later pages all see the same window), ending `until` from now by default."""
    flt = EventFilter.validate(flt or {}, loc)
    now = utcnow()
    start_of_today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    occurred = flt["occurred"]
    occurred["since"] = occurred.get("since") or iso(start_of_today - _dt.timedelta(days=EVENT_DEFAULT_LOOKBACK_DAYS))
    occurred["until"] = occurred.get("until") or iso(now + until)
    if flt["resource"]:
        flt["resource"]["labels"] = _validate_labels(flt["resource"].get("labels"), (*loc, "resource", "labels"))
    flt["related"] = _filter_list(EventRelatedFilter, flt["related"], (*loc, "related"))
    flt["any_resource"] = _filter_list(EventAnyResourceFilter, flt["any_resource"], (*loc, "any_resource"))
    for related in flt["related"]:
        if any(len(pair) != 2 for pair in related.get("resources_in_roles") or ()):
            raise ValidationFailed(
                [_error((*loc, "related", "resources_in_roles"), "expected [resource id, role] pairs", "value_error")]
            )
    return flt


def _like_literal(text: str) -> str:
    """Text matched literally by LIKE ... ESCAPE '\\' (event names and id prefixes are not globs)."""
    return text.translate(str.maketrans({"\\": "\\\\", "%": "\\%", "_": "\\_"}))


def _like_pattern(glob: str) -> str:
    """A label glob (* and ?) as a LIKE pattern with backslash escapes."""
    return glob.translate(str.maketrans({"*": "%", "?": "_", "\\": "\\\\", "%": "\\%", "_": "\\_"}))


def _glob_clause(column: str, patterns: list[str], column_params: tuple = ()) -> tuple[str, list]:
    """Any of the patterns matches (a leading '!' negates one): Prefect's label matching. `column` may
    hold placeholders of its own (`column_params`), repeated for each pattern."""
    if not patterns:
        return "1=0", []  # an empty list of values matches nothing
    clauses, params = [], []
    for pattern in patterns:
        negated = pattern.startswith("!")
        clauses.append(f"{column} {'NOT ' if negated else ''}LIKE ? ESCAPE '\\'")
        params += [*column_params, _like_pattern(pattern.removeprefix("!"))]
    return "(" + " OR ".join(clauses) + ")", params


def _label_clauses(tx, alias: str, labels: dict, role_column: bool) -> tuple[list[str], list]:
    """Conditions on one event_resources row from a ResourceSpecification."""
    labels = dict(labels)
    clauses, params = [], []
    ids = labels.pop("prefect.resource.id", None)
    if ids is not None:
        sql, args = _glob_clause(f"{alias}.resource_id", ids)
        clauses.append(sql)
        params += args
    roles = labels.pop("prefect.resource.role", None) if role_column else None
    if roles is not None:
        clauses.append(f"{alias}.resource_role IN ({', '.join('?' for _ in roles) or 'NULL'})")
        params += roles
    for label, patterns in labels.items():
        if '"' in label:  # no label of Prefect's has one, and it would end the JSON path's quoting
            clauses.append("1=0")
            continue
        column = tx.db.json_text.format(col=f"{alias}.resource")
        sql, args = _glob_clause(column, patterns, (tx.db.json_label_path.format(label=label),))
        clauses.append(sql)
        params += args
    return clauses, params


def _resources_exist(clauses: list[str], params: list, since: str, until: str) -> tuple[str, list]:
    where = " AND ".join(["er.event_id = events.id", "er.occurred >= ?", "er.occurred <= ?", *clauses])
    return f"EXISTS (SELECT 1 FROM event_resources er WHERE {where})", [since, until, *params]


def parse_text_query(query: str) -> tuple[list[str], list[str], list[str]]:
    """Prefect's search syntax: words or "quoted phrases"; -word or !word excludes, +word is required."""
    include, exclude, required = [], [], []
    i, n = 0, len(query)
    while i < n:
        if query[i].isspace():
            i += 1
            continue
        prefix = None
        if query[i] in "-!+":
            if i + 1 < n and not query[i + 1].isspace():
                prefix = query[i]
            i += 1
            if prefix is None:
                continue
        if i < n and query[i] == '"':
            end = i + 1
            while end < n and query[end] != '"':
                end += 2 if query[end] == "\\" and end + 1 < n else 1
            term = query[i + 1 : end].replace('\\"', '"').replace("\\\\", "\\")
            i = end + 1
        else:
            end = i
            while end < n and not query[end].isspace() and query[end] != '"':
                end += 1
            term, i = query[i:end], end
        if term.strip():
            (exclude if prefix in ("-", "!") else required if prefix == "+" else include).append(term)
    return include, exclude, required


def compile_event_filter(tx, flt: dict) -> tuple[str, list]:
    """WHERE clause on `events` for a normalized EventFilter."""
    since, until = flt["occurred"]["since"], flt["occurred"]["until"]
    clauses, params = ["events.occurred >= ?", "events.occurred <= ?"], [since, until]

    def add(sql, args=()):
        clauses.append(sql)
        params.extend(args)

    name = flt.get("event") or {}
    if name.get("prefix"):
        add(
            "(" + " OR ".join("events.event LIKE ? ESCAPE '\\'" for _ in name["prefix"]) + ")",
            [_like_literal(p) + "%" for p in name["prefix"]],
        )
    for prefix in name.get("exclude_prefix") or ():
        add("events.event NOT LIKE ? ESCAPE '\\'", [_like_literal(prefix) + "%"])
    if name.get("name"):
        add(f"events.event IN ({', '.join('?' for _ in name['name'])})", name["name"])
    if name.get("exclude_name"):
        add(f"events.event NOT IN ({', '.join('?' for _ in name['exclude_name'])})", name["exclude_name"])
    resource = flt.get("resource") or {}
    if resource.get("id"):
        add(f"events.resource_id IN ({', '.join('?' for _ in resource['id'])})", resource["id"])
    if resource.get("id_prefix"):
        add(
            "(" + " OR ".join("events.resource_id LIKE ? ESCAPE '\\'" for _ in resource["id_prefix"]) + ")",
            [_like_literal(p) + "%" for p in resource["id_prefix"]],
        )
    if resource.get("labels"):
        sql, args = _label_clauses(tx, "er", resource["labels"], role_column=False)
        add(*_resources_exist(["er.resource_role = ''", *sql], args, since, until))
    for related in flt["related"]:
        sql, args = _related_clauses(tx, related)
        if sql:
            add(*_resources_exist(sql, args, since, until))
    for any_resource in flt["any_resource"]:
        sql, args = _any_resource_clauses(tx, any_resource)
        if sql:
            add(*_resources_exist(sql, args, since, until))
    ids = (flt.get("id") or {}).get("id")
    if ids:
        add(f"events.id IN ({', '.join('?' for _ in ids)})", ids)
    text = (flt.get("text") or {}).get("query", "")
    if text.strip():
        sql, args = _text_clauses(tx, text)
        add(sql, args)
    return " AND ".join(clauses), params


def _related_clauses(tx, related: dict) -> tuple[list[str], list]:
    clauses, params = [], []
    if related.get("id"):
        clauses.append(f"er.resource_id IN ({', '.join('?' for _ in related['id'])})")
        params += related["id"]
    if related.get("role"):
        clauses.append(f"er.resource_role IN ({', '.join('?' for _ in related['role'])})")
        params += related["role"]
    if related.get("resources_in_roles"):
        clauses.append(
            "("
            + " OR ".join("(er.resource_id = ? AND er.resource_role = ?)" for _ in related["resources_in_roles"])
            + ")"
        )
        params += [value for pair in related["resources_in_roles"] for value in pair]
    if related.get("labels"):
        sql, args = _label_clauses(tx, "er", related["labels"], role_column=True)
        clauses += sql
        params += args
    if clauses and not related.get("role"):
        clauses.append("er.resource_role != ''")  # a related-resource filter never matches the primary resource
    return clauses, params


def _any_resource_clauses(tx, flt: dict) -> tuple[list[str], list]:
    clauses, params = [], []
    if flt.get("id"):
        clauses.append(f"er.resource_id IN ({', '.join('?' for _ in flt['id'])})")
        params += flt["id"]
    if flt.get("id_prefix"):
        clauses.append("(" + " OR ".join("er.resource_id LIKE ? ESCAPE '\\'" for _ in flt["id_prefix"]) + ")")
        params += [_like_literal(p) + "%" for p in flt["id_prefix"]]
    if flt.get("labels"):
        sql, args = _label_clauses(tx, "er", flt["labels"], role_column=True)
        clauses += sql
        params += args
    return clauses, params


def _text_clauses(tx, query: str) -> tuple[str, list]:
    include, exclude, required = parse_text_query(query)
    text = "LOWER(events.event || ' ' || events.resource || ' ' || events.related || ' ' || events.payload)"
    clauses, params = [], []
    if include:
        clauses.append("(" + " OR ".join(f"{text} LIKE ? ESCAPE '\\'" for _ in include) + ")")
        params += [f"%{_like_literal(t.lower())}%" for t in include]
    for term in exclude:
        clauses.append(f"{text} NOT LIKE ? ESCAPE '\\'")
        params.append(f"%{_like_literal(term.lower())}%")
    for term in required:
        clauses.append(f"{text} LIKE ? ESCAPE '\\'")
        params.append(f"%{_like_literal(term.lower())}%")
    return ("(" + " AND ".join(clauses) + ")" if clauses else "1=1"), params


def validate_event(data, loc=("event",)) -> dict:
    """An incoming Event (the client's view) in our canonical form; ValidationFailed when it is not one."""
    event = EventCreate.validate(data, loc)
    event["resource"] = _validate_resource(event["resource"], (*loc, "resource"), related=False)
    event["related"] = [
        _validate_resource(r, (*loc, "related", i), related=True) for i, r in enumerate(event["related"])
    ]
    return event


def _validate_resource(labels: dict, loc, related: bool) -> dict:
    if len(labels) > EVENT_MAX_LABELS:
        raise ValidationFailed([_error(loc, f"at most {EVENT_MAX_LABELS} labels per resource", "value_error")])
    for key, value in labels.items():
        if not isinstance(value, str):
            raise ValidationFailed([_error((*loc, key), "str type expected", "type_error.str")])
    required = ("prefect.resource.id", "prefect.resource.role") if related else ("prefect.resource.id",)
    for key in required:
        if not labels.get(key):
            raise ValidationFailed([_error(loc, f"resources must have a non-empty {key} label", "value_error")])
    return labels


def event_out(row: dict) -> dict:
    """A stored event as Prefect 3 shows it (a ReceivedEvent)."""
    event = decode_row("events", row)
    return {
        "occurred": event["occurred"],
        "event": event["event"],
        "resource": event["resource"],
        "related": event["related"],
        "payload": event["payload"],
        "id": event["id"],
        "follows": event["follows"],
        "received": event["received"],
    }


def store_events(tx, events: list[dict]) -> list[dict]:
    """Store validated events (an id already stored is a resend: skipped), record the task runs they
    describe, and hand the new ones to live subscribers once the transaction commits."""
    received = now_iso()
    stored = []
    for event in events:
        resources = [("", event["resource"]), *((r["prefect.resource.role"], r) for r in event["related"])]
        inserted = insert_row(
            tx,
            "events",
            {
                "id": event["id"],
                "occurred": event["occurred"],
                "received": received,
                "event": event["event"],
                "resource_id": event["resource"]["prefect.resource.id"],
                "resource": event["resource"],
                "related_resource_ids": [r["prefect.resource.id"] for r in event["related"]],
                "related": event["related"],
                "payload": event["payload"],
                "follows": event.get("follows"),
            },
            on_conflict="ON CONFLICT DO NOTHING",
        )
        if not inserted:
            continue
        tx.executemany(
            "INSERT INTO event_resources (event_id, occurred, resource_id, resource_role, resource) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [
                (
                    event["id"],
                    event["occurred"],
                    labels["prefect.resource.id"],
                    role,
                    dumps(
                        {k: v for k, v in labels.items() if k not in ("prefect.resource.id", "prefect.resource.role")}
                    ),
                )
                for role, labels in resources
            ],
        )
        stored.append({**event, "received": received})
        record_task_run_event(tx, event)
    if stored:
        for listener in tx.db.hooks.stored_event_listeners:
            listener(tx, stored)
        for sink in tx.db.hooks.event_sinks:
            tx.after_commit.append(functools.partial(sink, [dict(e) for e in stored]))
    return stored


def _event_ids_in_order(tx, flt: dict) -> list[dict]:
    where, params = compile_event_filter(tx, flt)
    direction = "ASC" if flt["order"] == "ASC" else "DESC"
    rows = tx.query(
        f"SELECT events.id, events.resource_id FROM events WHERE {where} "
        f"ORDER BY events.occurred {direction}, events.id {direction}",
        params,
    )
    return _distinct_resources(rows) if (flt.get("resource") or {}).get("distinct") else rows


def _distinct_resources(rows: list[dict]) -> list[dict]:
    """`resource.distinct`: only the first event (in the query's order) of each resource."""
    seen, out = set(), []
    for row in rows:
        if row["resource_id"] not in seen:
            seen.add(row["resource_id"])
            out.append(row)
    return out


def read_events_page(tx, flt: dict, limit: int, offset: int = 0) -> tuple[list[dict], int]:
    """One page of matching events and how many match in all."""
    if (flt.get("resource") or {}).get("distinct"):
        ordered = _event_ids_in_order(tx, flt)
        total, ids = len(ordered), [r["id"] for r in ordered[offset : offset + limit]]
        if not ids:
            return [], total
        rows = {r["id"]: r for r in tx.query(f"SELECT * FROM events WHERE id IN ({', '.join('?' for _ in ids)})", ids)}
        return [event_out(rows[i]) for i in ids if i in rows], total
    where, params = compile_event_filter(tx, flt)
    total = int(tx.scalar(f"SELECT COUNT(*) AS n FROM events WHERE {where}", params))
    direction = "ASC" if flt["order"] == "ASC" else "DESC"
    rows = tx.query(
        f"SELECT events.* FROM events WHERE {where} ORDER BY events.occurred {direction}, "
        f"events.id {direction} LIMIT ? OFFSET ?",
        (*params, limit, offset),
    )
    return [event_out(r) for r in rows], total


def matching_event_ids(tx, flt: dict, ids: list[str]) -> set[str]:
    """Which of these (just stored) events a subscriber's filter lets through: the same SQL as queries."""
    if not ids:
        return set()
    where, params = compile_event_filter(tx, flt)
    marks = ", ".join("?" for _ in ids)
    return {
        r["id"]
        for r in tx.query(f"SELECT events.id FROM events WHERE {where} AND events.id IN ({marks})", (*params, *ids))
    }


def event_page_token(flt: dict, total: int, limit: int, offset: int) -> str | None:
    """The opaque token of the page after [offset, offset + limit), or None when that was the last."""
    if offset + limit >= total:
        return None
    state = {"filter": flt, "count": total, "page_size": limit, "offset": offset + limit}
    return base64.urlsafe_b64encode(dumps(state).encode()).decode()


def parse_event_page_token(token: str) -> tuple[dict, int, int]:
    """(filter, limit, offset) from a page token; ValueError for anything we did not make."""
    try:
        state = loads(base64.urlsafe_b64decode(token.encode()))
        flt = normalize_event_filter(state["filter"])
        limit, offset = int(state["page_size"]), int(state["offset"])
    except (ValueError, KeyError, TypeError, ValidationFailed):  # binascii.Error is a ValueError
        raise ValueError("invalid page token") from None
    if not 0 <= limit <= EVENT_PAGE_SIZE or offset < 0:
        raise ValueError("invalid page token")
    return flt, limit, offset


def count_events(tx, flt: dict, countable: str, time_unit: str, interval: float) -> list[dict]:
    """Prefect's /events/count-by/{countable}: counts per event name, per resource, or per time bucket."""
    if countable in ("day", "time"):
        unit, interval = ("day", 1.0) if countable == "day" else (time_unit, interval)
        return _count_events_by_time(tx, flt, unit, interval)
    where, params = compile_event_filter(tx, flt)
    column = "events.event" if countable == "event" else "events.resource_id"
    rows = tx.query(
        f"SELECT {column} AS value, COUNT(*) AS n, MIN(events.occurred) AS start_time, "
        f"MAX(events.occurred) AS end_time FROM events WHERE {where} GROUP BY {column}",
        params,
    )
    counts = []
    for row in rows:
        label = row["value"]
        if countable == "resource":  # the resource's name as of its latest event
            latest = tx.query_one(
                f"SELECT resource FROM events WHERE {where} AND events.resource_id = ? ORDER BY occurred DESC LIMIT 1",
                (*params, row["value"]),
            )
            labels = json.loads(latest["resource"]) if latest else {}
            label = labels.get("prefect.resource.name") or labels.get("prefect.name") or row["value"]
        counts.append(
            {
                "value": row["value"],
                "label": label,
                "count": int(row["n"]),
                "start_time": row["start_time"],
                "end_time": row["end_time"],
            }
        )
    counts.sort(key=lambda c: (-c["count"], c["label"]))
    return counts


def _end_of_period(moment: _dt.datetime, unit: str) -> _dt.datetime:
    last = {
        "second": {"microsecond": 999999},
        "minute": {"second": 59, "microsecond": 999999},
        "hour": {"minute": 59, "second": 59, "microsecond": 999999},
    }.get(unit)
    if last is not None:
        return moment.replace(**last)
    end = moment.replace(hour=23, minute=59, second=59, microsecond=999999)
    return end + _dt.timedelta(days=6 - moment.weekday()) if unit == "week" else end  # weeks end on Sunday


def _count_events_by_time(tx, flt: dict, unit: str, interval: float) -> list[dict]:
    """Every bucket from the one holding `since` to the one holding `until` (or the end of the current
    period), zeros included; buckets are counted from EVENT_COUNT_PIVOT."""
    delta = EVENT_TIME_UNITS[unit] * interval
    since, until = from_iso(flt["occurred"]["since"]), from_iso(flt["occurred"]["until"])
    buckets = math.ceil((until - since) / delta)
    if buckets > EVENT_COUNT_MAX_BUCKETS:
        raise ValidationFailed(
            [
                _error(
                    ("body", "time_interval"),
                    f"The given interval would create {buckets} buckets, which is too many. Please "
                    "increase the interval or reduce the time range to produce "
                    f"{EVENT_COUNT_MAX_BUCKETS} buckets or fewer.",
                    "value_error",
                )
            ]
        )
    now = utcnow()
    end = _end_of_period(now, unit) if until > now else until
    first = math.floor((since - EVENT_COUNT_PIVOT) / delta)
    spans, start = [], EVENT_COUNT_PIVOT + delta * first
    while start < end:
        spans.append([start, start + delta - _ONE_MICROSECOND, 0])
        start += delta
    where, params = compile_event_filter(tx, flt)
    for row in tx.query(f"SELECT events.occurred FROM events WHERE {where}", params):
        index = math.floor((from_iso(row["occurred"]) - EVENT_COUNT_PIVOT) / delta) - first
        if 0 <= index < len(spans):
            spans[index][2] += 1
    return [
        {"value": str(i), "label": begin.isoformat(), "count": n, "start_time": iso(begin), "end_time": iso(finish)}
        for i, (begin, finish, n) in enumerate(spans)
    ]


def prune_events(
    db: Database,
    older_than: _dt.timedelta,
    batch_size: int = 1000,
    stop: threading.Event | None = None,
    now: _dt.datetime | None = None,
) -> int:
    """Delete events that occurred before now - older_than (their resource rows cascade); short batches."""
    horizon = iso((now or utcnow()) - older_than)
    removed = 0
    with db.read() as tx:  # most passes find nothing: no write transaction for them
        if tx.query_one("SELECT id FROM events WHERE occurred < ? LIMIT 1", (horizon,)) is None:
            return 0
    while not (stop and stop.is_set()):
        with db.write() as tx:
            ids = [
                r["id"]
                for r in tx.query(
                    "SELECT id FROM events WHERE occurred < ? ORDER BY occurred LIMIT ?", (horizon, batch_size)
                )
            ]
            if not ids:
                break
            marks = ", ".join("?" for _ in ids)
            tx.execute(f"DELETE FROM event_resources WHERE event_id IN ({marks})", ids)
            tx.execute(f"DELETE FROM events WHERE id IN ({marks})", ids)
            removed += len(ids)
    return removed


# The task-run recorder: Prefect 3 clients orchestrate task runs themselves and only report each state
# as a prefect.task-run.<State> event. Each such event becomes a task_run_state row (its id is the
# event's id, so a resent event adds nothing) and, unless the run already has a newer state, the run's
# current state and fields: events may arrive twice or out of order, the run never goes back in time.

TASK_RUN_EVENT_FIELDS = {  # payload.task_run field -> how we store it
    "name": "str",
    "task_key": "str",
    "dynamic_key": "str",
    "cache_key": "str",
    "cache_expiration": "datetime",
    "task_version": "str",
    "empirical_policy": "object",
    "tags": "list",
    "task_inputs": "object",
    "run_count": "int",
    "flow_run_run_count": "int",
    "expected_start_time": "datetime",
    "next_scheduled_start_time": "datetime",
    "start_time": "datetime",
    "end_time": "datetime",
    "total_run_time": "seconds",
    "labels": "object",  # as sent: Prefect 3's recorder adds no flow run labels (its SDK sends {})
}
_ISO_DURATION = re.compile(
    r"^P(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?$"
)


def _seconds(value) -> float:
    """A duration as seconds: a number, or ISO 8601 text such as PT1.5S (how pydantic writes a timedelta)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _ISO_DURATION.match(value.strip()) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"not a duration: {value!r}")
    days, hours, minutes, seconds = (float(part or 0) for part in match.groups())
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


def _task_run_columns(fields: dict) -> dict:
    """The task_run columns an event's payload.task_run sets (fields it leaves out keep their values)."""
    out = {}
    for name, kind in TASK_RUN_EVENT_FIELDS.items():
        if name not in fields:
            continue
        value = fields[name]
        if value is None:
            out[name] = None
        elif kind == "datetime":
            out[name] = parse_datetime(value, ("payload", "task_run", name))
        elif kind == "seconds":
            out[name] = _seconds(value)
        elif kind == "int":
            out[name] = int(value)
        elif kind == "list":
            out[name] = [str(v) for v in value]
        elif kind == "object":
            out[name] = dict(value)
        else:
            out[name] = str(value)
    if "empirical_policy" in out:
        out["empirical_policy"] = _task_run_policy(out["empirical_policy"])
    if "labels" in out and out["labels"] is None:  # Prefect stores a NULL, read back as null; we keep {}
        out["labels"] = {}
    return out


def _prefect_object_id(resource_id: str | None, kind: str) -> str | None:
    """The UUID in a resource id such as prefect.task-run.<uuid>, or None."""
    prefix = f"{kind}."
    if not resource_id or not resource_id.startswith(prefix):
        return None
    try:
        return parse_uuid(resource_id[len(prefix) :])
    except ValidationFailed:
        return None


def record_task_run_event(tx, event: dict) -> dict | None:
    """Turn a client's prefect.task-run.* event into task run rows; returns the task run, or None when
    the event is not one the recorder takes (or describes a run of a flow run we do not have)."""
    resource = event["resource"]
    if not event["event"].startswith("prefect.task-run.") or resource.get("prefect.orchestration") != "client":
        return None
    task_run_id = _prefect_object_id(resource.get("prefect.resource.id"), "prefect.task-run")
    payload = event["payload"]
    if (
        task_run_id is None
        or not isinstance(payload.get("validated_state"), dict)
        or not isinstance(payload.get("task_run"), dict)
    ):
        log.warning("task run event %s lacks a task run id, validated_state or task_run; not recorded", event["id"])
        return None
    flow_run_resource = next((r for r in event["related"] if r["prefect.resource.role"] == "flow-run"), None)
    flow_run_id = _prefect_object_id(flow_run_resource and flow_run_resource["prefect.resource.id"], "prefect.flow-run")
    if flow_run_id is not None and read_row(tx, "flow_run", flow_run_id) is None:
        log.info(
            "task run event %s belongs to flow run %s, which does not exist; not recorded", event["id"], flow_run_id
        )
        return None
    try:
        columns = _task_run_columns(payload["task_run"])
        state = _event_state(payload["validated_state"], event, flow_run_id)
    except (ValueError, TypeError, AttributeError, ValidationFailed) as exc:
        log.warning("task run event %s has a malformed payload (%s); not recorded", event["id"], exc)
        return None
    run = _find_task_run(tx, task_run_id, flow_run_id, columns)
    created = run is None
    if created:
        run = _insert_event_task_run(tx, task_run_id, flow_run_id, columns, state)
        created = run["state_id"] == state["id"]  # not when another writer created the row meanwhile
    state["state_details"]["task_run_id"] = run["id"]
    if not insert_row(
        tx,
        "task_run_state",
        {
            "id": state["id"],
            "created": now_iso(),
            "task_run_id": run["id"],
            "type": state["type"],
            "name": state["name"],
            "timestamp": state["timestamp"],
            "message": state["message"],
            "data": state["data"],
            "state_details": state["state_details"],
        },
        on_conflict="ON CONFLICT DO NOTHING",
    ):
        return run  # this state is recorded already: the event was sent twice
    newer = created or run["state_timestamp"] is None or run["state_timestamp"] < state["timestamp"]
    initial = None
    if newer and not created:
        initial = decode_row("task_run", {"state": run["state"]})["state"]
        changes = {**columns, **_current_state_columns(state), "updated": now_iso()}
        update_row(tx, "task_run", run["id"], changes)
        run.update(encode_values("task_run", changes))
    if newer:
        for listener in tx.db.hooks.state_listeners:
            listener(tx, "task", decode_row("task_run", run), initial, state)
    return run


def _event_state(validated: dict, event: dict, flow_run_id: str | None) -> dict:
    """The state an event reports, with the event's id and time (as Prefect 3's recorder does)."""
    state_type = validated.get("type")
    if state_type not in STATE_TYPES:
        raise ValueError(f"unknown state type {state_type!r}")
    state = make_state(
        {
            "type": state_type,
            "name": validated.get("name"),
            "message": validated.get("message"),
            "data": validated.get("data"),
            "state_details": dict(validated.get("state_details") or {}),
        },
        flow_run_id,
        None,
        event["occurred"],
    )
    state["id"] = event["id"]
    return state


def _find_task_run(tx, task_run_id: str, flow_run_id: str | None, columns: dict) -> dict | None:
    """The run this event is about: by id, else by its natural key (a run first created over REST)."""
    row = read_row(tx, "task_run", task_run_id, lock=True)
    if (
        row is None
        and flow_run_id is not None
        and columns.get("task_key") is not None
        and columns.get("dynamic_key") is not None
    ):
        row = tx.query_one(
            f"SELECT * FROM task_run WHERE flow_run_id = ? AND task_key = ? AND dynamic_key = ?{tx.db.for_update}",
            (flow_run_id, columns["task_key"], columns["dynamic_key"]),
        )
    return row


def _insert_event_task_run(tx, task_run_id: str, flow_run_id: str | None, columns: dict, state: dict) -> dict:
    now = now_iso()
    values = {
        "id": task_run_id,
        "created": now,
        "updated": now,
        "flow_run_id": flow_run_id,
        "name": columns.get("name") or columns.get("task_key") or "task-run",
        "task_key": columns.get("task_key") or "",
        "dynamic_key": columns.get("dynamic_key") or "",
        "empirical_policy": _task_run_policy(None),
        "tags": [],
        "task_inputs": {},
        "run_count": 0,
        "flow_run_run_count": 0,
        "total_run_time": 0.0,
        "expected_start_time": state["timestamp"],
    }
    values.update({k: v for k, v in columns.items() if v is not None or k not in values})
    values.update(
        {
            "state_id": state["id"],
            "state_type": state["type"],
            "state_name": state["name"],
            "state_timestamp": state["timestamp"],
            "state": state,
        }
    )
    insert_row(tx, "task_run", values, on_conflict="ON CONFLICT DO NOTHING")
    # Another writer may have created it meanwhile (PostgreSQL): then this event updates that row.
    return _find_task_run(tx, task_run_id, flow_run_id, columns)


# Flow-run events: every flow run state we record is also an event (prefect.flow-run.<State>), as the
# Prefect 3 server emits, so subscribers and event queries see flow runs next to their task runs.


def emit_flow_run_state_event(tx, kind: str, run: dict, initial: dict | None, state: dict):
    """A state listener: store a prefect.flow-run.<State name> event for a flow run's new state."""
    if kind != "flow":
        return
    resource = {
        "prefect.resource.id": f"prefect.flow-run.{run['id']}",
        "prefect.resource.name": run.get("name") or "",
        "prefect.run-count": str(run.get("run_count") or 0),
        "prefect.state-message": state.get("message") or "",
        "prefect.state-name": state["name"],
        "prefect.state-timestamp": state["timestamp"],
        "prefect.state-type": state["type"],
    }
    related = []
    flow = tx.query_one("SELECT id, name FROM flow WHERE id = ?", (run["flow_id"],))
    if flow is not None:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow.{flow['id']}",
                "prefect.resource.role": "flow",
                "prefect.resource.name": flow["name"],
            }
        )
    if run.get("deployment_id"):
        deployment = tx.query_one("SELECT id, name FROM deployment WHERE id = ?", (run["deployment_id"],))
        if deployment is not None:
            related.append(
                {
                    "prefect.resource.id": f"prefect.deployment.{deployment['id']}",
                    "prefect.resource.role": "deployment",
                    "prefect.resource.name": deployment["name"],
                }
            )
    related += [
        {"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
        for tag in sorted(run.get("tags") or [])
    ]
    validated = {
        "type": state["type"],
        "name": state["name"],
        "message": state.get("message"),
        "state_details": {
            k: v
            for k, v in (state.get("state_details") or {}).items()
            if v is not None and k not in ("flow_run_id", "task_run_id")
        },
    }
    payload = {
        "intended": {"from": initial["type"] if initial else None, "to": state["type"]},
        "initial_state": (
            {"type": initial["type"], "name": initial["name"], "message": initial.get("message")} if initial else None
        ),
        "validated_state": validated,
    }
    store_events(
        tx,
        [
            {
                "id": new_id(),
                "occurred": state["timestamp"],
                "event": f"prefect.flow-run.{state['name']}",
                "resource": resource,
                "related": related,
                "payload": payload,
                "follows": None,
            }
        ],
    )


# --- 12. Resources ---
# Owns what flows use besides runs: blocks, variables, artifacts, concurrency limits (their slots and leases
# are Orchestration's), saved searches, work pools, queues and workers, and the server's configuration.

# Server configuration (Prefect 3's `configuration` table): for now the default result storage block.

RESULT_STORAGE_KEY = "server-default-result-storage"
ResultStorageUpdate = Schema(
    "ServerDefaultResultStorageUpdate",
    {"default_result_storage_block_id": Field("uuid", required=True, nullable=False)},
)


def read_configuration(tx, key: str):
    row = tx.query_one("SELECT value FROM configuration WHERE key = ?", (key,))
    return None if row is None else json.loads(row["value"])


def write_configuration(tx, key: str, value):
    now = now_iso()
    if not update_row(tx, "configuration", key, {"value": value, "updated": now}, key="key"):
        insert_row(tx, "configuration", {"key": key, "value": value, "created": now, "updated": now})


def set_default_result_storage(tx, block_document_id: str):
    """Only a block that can write results (capability write-path) may be the default result storage."""
    row = tx.query_one(
        "SELECT s.capabilities FROM block_document d JOIN block_schema s ON s.id = d.block_schema_id WHERE d.id = ?",
        (block_document_id,),
    )
    if row is None:
        raise NotFound(f"Block document {block_document_id} not found.")
    if "write-path" not in json.loads(row["capabilities"] or "[]"):
        raise ValidationFailed(
            [
                _error(
                    ("body", "default_result_storage_block_id"),
                    f"Block document {block_document_id} cannot be used for result storage.",
                    "value_error",
                )
            ]
        )
    write_configuration(tx, RESULT_STORAGE_KEY, {"default_result_storage_block_id": block_document_id})


# Blocks: types, schemas, documents. Secret fields (the schema's `secret_fields`) are masked on read.

SECRET_MASK = "********"  # what Prefect 2.20 shows for a secret; clients send it back to mean "unchanged"
_SECRET_MASKS = (SECRET_MASK, "**********")  # an older spelling of ours is understood too

# An http(s) URL, as Prefect's SDK reads these fields (HttpUrl): its 2.20 server refuses another, 3.9's keeps it
# and then no SDK reads the block type. The SDKs send only their blocks' HttpUrls.
_URL = Field("str", pattern=r"https?://[^\s/?#]+[^\s]*")
BlockTypeCreate = Schema(
    "BlockTypeCreate",
    {
        "name": Field("str", required=True, nullable=False, max_length=255),
        "slug": Field("str", required=True, nullable=False, pattern=r"[a-z0-9-]+", max_length=255),
        "logo_url": _URL,
        "documentation_url": _URL,
        "description": Field("str"),
        "code_example": Field("str"),
    },
)
BlockTypeUpdate = Schema(
    "BlockTypeUpdate",
    {
        "logo_url": _URL,
        "documentation_url": _URL,
        "description": Field("str"),
        "code_example": Field("str"),
    },
)
BlockSchemaCreate = Schema(
    "BlockSchemaCreate",
    {
        "fields": Field("object", default=dict, nullable=False),
        "block_type_id": Field("uuid", required=True, nullable=False),
        "capabilities": Field(ListOf("str"), default=list, nullable=False),
        "version": Field("str", default="non-versioned", nullable=False),
        "checksum": Field("str"),
    },
)
BlockDocumentCreate = Schema(
    "BlockDocumentCreate",
    {
        "name": Field("str", max_length=255, pattern=r"[a-z0-9-]+"),
        "data": Field("object", default=dict, nullable=False),
        "block_schema_id": Field("uuid", required=True, nullable=False),
        "block_type_id": Field("uuid", required=True, nullable=False),
        "is_anonymous": Field("bool", default=False, nullable=False),
    },
)
BlockDocumentUpdate = Schema(
    "BlockDocumentUpdate",
    {
        "block_schema_id": Field("uuid"),
        "data": Field("object", default=dict, nullable=False),
        "merge_existing_data": Field("bool", default=True, nullable=False),
    },
)


def block_schema_checksum(fields: dict) -> str:
    """A schema's checksum as the SDK computes it (Block._calculate_schema_checksum, 2.20 and 3.x), which
    it never sends but looks schemas up by: sha256 of `[[fields], {}]` (its hash_objects(fields) payload)
    dumped by json.dumps with sorted keys and default spacing, the fields without any `secret_fields`
    and with only the definitions that are not blocks (none at all rather than an empty dict)."""
    hashed = _without_key(fields, "secret_fields")
    if hashed.get("definitions"):
        definitions = hashed["definitions"] if isinstance(hashed["definitions"], dict) else {}
        kept = _non_block_definitions(hashed, definitions, set())
        if kept:
            hashed["definitions"] = kept
        else:
            hashed.pop("definitions")
    return "sha256:" + hashlib.sha256(json.dumps([[hashed], {}], sort_keys=True).encode()).hexdigest()


def _without_key(value, key: str):
    if not isinstance(value, dict):
        return value
    return {k: _without_key(v, key) for k, v in value.items() if k != key}


def _references(value) -> list[str]:
    """Every "$ref" string anywhere inside `value`."""
    if isinstance(value, dict):
        found = [value["$ref"]] if value.get("$ref") else []
        return found + [ref for v in value.values() for ref in _references(v)]
    if isinstance(value, list):
        return [ref for item in value for ref in _references(item)]
    return []


def _non_block_definitions(schema: dict, definitions: dict, seen: set) -> dict:
    """The definitions `schema` refers to, directly or through them, that are not blocks themselves.
    `seen` stops a definition that refers back to itself (the SDK would recurse forever; we answer)."""
    kept = {}
    for ref in _references(schema):
        key = ref.replace("#/definitions/", "") if isinstance(ref, str) else None
        found = definitions.get(key) if key is not None else None
        if isinstance(found, dict) and found.get("block_type_slug") is None:
            kept[key] = found
            if key not in seen:
                seen.add(key)
                kept.update(_non_block_definitions(found, definitions, seen))
    return kept


def block_type_out(row) -> dict:
    return decode_row("block_type", row)


def block_schema_out(tx, row) -> dict:
    schema = decode_row("block_schema", row)
    schema["block_type"] = block_type_out(require_row(tx, "block_type", schema["block_type_id"], "Block type"))
    return schema


# Block types the server has from its start, as Prefect's servers have theirs: the core ones below (Section 14
# adds the notification destinations). A fresh server's UI can then make a Secret or a JSON block before any SDK
# has saved one. The schemas are ours; an SDK looks its own up by checksum and saves it beside ours the first time
# it saves a block of the type, and loads a block made with ours by the type's slug.


def _field(title, kind="string", secret=False, **extra):
    """One property of a block schema; `kind` None for any JSON value."""
    spec = {"title": title, **({"type": kind} if kind else {}), **extra}
    if secret:
        spec.update({"writeOnly": True, "format": "password"})
    return spec


def _block_fields(title, description, properties, required, secret_fields):
    return {
        "title": title,
        "description": description,
        "type": "object",
        "properties": properties,
        "required": required,
        "secret_fields": secret_fields,
        "block_schema_references": {},
    }


_HTTP_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
_FILE_SYSTEM_CAPABILITIES = ["get-directory", "put-directory", "read-path", "write-path"]
# (slug, name, description, schema fields, capabilities); the slugs, field names and capabilities are Prefect's.
# fmt: off
CORE_BLOCK_TYPES = [
    ("secret", "Secret", "A value to keep secret: a password, a key, a token. Shown masked once saved.",
     _block_fields("Secret", "A secret string.", {"value": _field("Value", secret=True)}, ["value"], ["value"]), []),
    ("json", "JSON", "Any JSON value: an object, a list, a number, a string.",
     _block_fields("JSON", "A JSON value.", {"value": _field("Value", None)}, ["value"], []), []),
    ("string", "String", "A plain string.",
     _block_fields("String", "A string.", {"value": _field("Value")}, ["value"], []), []),
    ("date-time", "Date Time", "A date and time, written as ISO 8601 (2026-12-31T23:59:00+00:00).",
     _block_fields("DateTime", "A date and time.", {"value": _field("Value", format="date-time")}, ["value"], []),
     []),
    ("local-file-system", "Local File System", "Reads and writes files under a folder of the machine it runs on.",
     _block_fields("LocalFileSystem", "A folder.", {"basepath": _field("Base path")}, [], []),
     _FILE_SYSTEM_CAPABILITIES),
    ("remote-file-system", "Remote File System", "Reads and writes files anywhere fsspec reaches (s3://, gcs://, ...).",
     _block_fields("RemoteFileSystem", "An fsspec URL.", {
         "basepath": _field("Base path (with its scheme)"), "settings": _field("Settings for fsspec", "object")},
         ["basepath"], []),
     _FILE_SYSTEM_CAPABILITIES),
    ("smb", "SMB", "Reads and writes files on an SMB (Windows) share.",
     _block_fields("SMB", "An SMB share.", {
         "share_path": _field("Share path"), "smb_username": _field("Username", secret=True),
         "smb_password": _field("Password", secret=True), "smb_host": _field("Host"),
         "smb_port": _field("Port", "integer")},
         ["share_path", "smb_host"], ["smb_username", "smb_password"]),
     _FILE_SYSTEM_CAPABILITIES),
    ("process", "Process", "Runs a flow run as a process on the agent's machine (Prefect 2's infrastructure blocks).",
     _block_fields("Process", "A local process.", {
         "type": _field("Type", enum=["process"], default="process"), "env": _field("Environment", "object"),
         "labels": _field("Labels", "object"), "name": _field("Name"),
         "command": {"title": "Command", "type": "array", "items": {"type": "string"}},
         "stream_output": _field("Stream output", "boolean", default=True), "working_dir": _field("Working directory")},
         [], []),
     ["run-infrastructure"]),
    ("webhook", "Webhook", "Calls an HTTP endpoint with a JSON body.",
     _block_fields("Webhook", "An HTTP endpoint.", {
         "method": _field("Method", enum=_HTTP_METHODS, default="POST"), "url": _field("URL", secret=True),
         "headers": _field("Headers", "object"),
         "allow_private_urls": _field("Allow private URLs", "boolean", default=True)},
         ["url"], ["url", "headers.*"]), []),
]
# fmt: on


def install_block_types(tx, block_types):
    """Register `block_types` (CORE_BLOCK_TYPES' shape) as protected types with a schema each (idempotent)."""
    now = now_iso()
    for slug, name, description, fields, capabilities in block_types:
        insert_row(
            tx,
            "block_type",
            {
                "id": new_id(),
                "created": now,
                "updated": now,
                "name": name,
                "slug": slug,
                "description": description,
                "is_protected": True,
            },
            on_conflict="ON CONFLICT DO NOTHING",
        )
        type_id = tx.scalar("SELECT id FROM block_type WHERE slug = ?", (slug,))
        tx.execute("UPDATE block_type SET is_protected = ? WHERE id = ?", (True, type_id))
        insert_row(
            tx,
            "block_schema",
            {
                "id": new_id(),
                "created": now,
                "updated": now,
                "checksum": block_schema_checksum(fields),
                "fields": fields,
                "block_type_id": type_id,
                "capabilities": capabilities,
                "version": __version__,
            },
            on_conflict="ON CONFLICT DO NOTHING",
        )


def create_block_type(tx, data) -> dict:
    now = now_iso()
    row_id = new_id()
    if not insert_row(
        tx,
        "block_type",
        {"id": row_id, "created": now, "updated": now, "is_protected": False, **data},
        on_conflict="ON CONFLICT DO NOTHING",
    ):
        raise Conflict(f'Block type with slug "{data["slug"]}" already exists.')
    return block_type_out(read_row(tx, "block_type", row_id))


def create_block_schema(tx, data) -> tuple[dict, bool]:
    require_row(tx, "block_type", data["block_type_id"], "Block type")
    checksum = data.get("checksum") or block_schema_checksum(data["fields"])
    existing = tx.query_one(
        "SELECT * FROM block_schema WHERE checksum = ? AND version = ?", (checksum, data["version"])
    )
    if existing is not None:
        return block_schema_out(tx, existing), False
    now = now_iso()
    created = insert_row(
        tx,
        "block_schema",
        {
            "id": new_id(),
            "created": now,
            "updated": now,
            "checksum": checksum,
            "fields": data["fields"],
            "block_type_id": data["block_type_id"],
            "capabilities": data["capabilities"],
            "version": data["version"],
        },
        on_conflict="ON CONFLICT DO NOTHING",
    )
    row = tx.query_one("SELECT * FROM block_schema WHERE checksum = ? AND version = ?", (checksum, data["version"]))
    return block_schema_out(tx, row), bool(created)


def _secret_paths(fields: dict) -> list[list[str]]:
    return [path.split(".") for path in (fields or {}).get("secret_fields") or []]


def _mask_secrets(data, path):
    """Replace the value at a dotted path (with * wildcards) by the mask."""
    if not path or not isinstance(data, dict):
        return
    head, rest = path[0], path[1:]
    keys = list(data) if head == "*" else [head]
    for key in keys:
        if key not in data:
            continue
        if rest:
            _mask_secrets(data[key], rest)
        elif data[key] is not None:
            data[key] = SECRET_MASK


def _restore_masked(new, old):
    """A client that sends the mask back means 'keep the stored secret'."""
    if not isinstance(new, dict) or not isinstance(old, dict):
        return new
    out = {}
    for key, value in new.items():
        if value in _SECRET_MASKS and key in old:
            out[key] = old[key]
        elif isinstance(value, dict):
            out[key] = _restore_masked(value, old.get(key))
        else:
            out[key] = value
    return out


def _split_references(data: dict) -> tuple[dict, dict]:
    """Block fields that are other blocks arrive as {"$ref": {"block_document_id": ...}}."""
    plain, refs = {}, {}
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(value.get("$ref"), dict) and value["$ref"].get("block_document_id"):
            refs[key] = parse_uuid(
                value["$ref"]["block_document_id"], ("body", "data", key, "$ref", "block_document_id")
            )
        else:
            plain[key] = value
    return plain, refs


def _write_references(tx, document_id: str, refs: dict, replace_all: bool = True):
    """Record block fields that are other blocks; a merge replaces only the fields it names."""
    if replace_all:
        tx.execute("DELETE FROM block_document_reference WHERE parent_block_document_id = ?", (document_id,))
    for name in refs if not replace_all else ():
        tx.execute(
            "DELETE FROM block_document_reference WHERE parent_block_document_id = ? AND name = ?", (document_id, name)
        )
    for name, ref_id in refs.items():
        require_row(tx, "block_document", ref_id, "Referenced block document")
        insert_row(
            tx,
            "block_document_reference",
            {
                "id": new_id(),
                "created": now_iso(),
                "name": name,
                "parent_block_document_id": document_id,
                "reference_block_document_id": ref_id,
            },
        )


def block_document_out(tx, row, include_secrets: bool, depth: int = 0) -> dict:
    doc = decode_row("block_document", row)
    schema = block_schema_out(tx, require_row(tx, "block_schema", doc["block_schema_id"], "Block schema"))
    data = doc["data"]
    references = {}
    if depth < 10:  # references form a tree; the bound only guards against a cycle written by hand
        for ref in tx.query("SELECT * FROM block_document_reference WHERE parent_block_document_id = ?", (doc["id"],)):
            child = block_document_out(
                tx,
                require_row(tx, "block_document", ref["reference_block_document_id"], "Block document"),
                include_secrets,
                depth + 1,
            )
            data[ref["name"]] = child["data"]
            references[ref["name"]] = {
                "block_document": {
                    k: child[k] for k in ("id", "name", "block_type", "is_anonymous", "block_document_references")
                }
            }
    if not include_secrets:
        for path in _secret_paths(schema["fields"]):
            _mask_secrets(data, path)
    doc.update(
        {
            "data": data,
            "block_schema": schema,
            "block_type": schema["block_type"],
            "block_type_name": schema["block_type"]["name"],
            "block_document_references": references,
        }
    )
    return doc


def create_block_document(tx, data) -> dict:
    require_row(tx, "block_type", data["block_type_id"], "Block type")
    require_row(tx, "block_schema", data["block_schema_id"], "Block schema")
    name = data.get("name")
    if not name:
        if not data["is_anonymous"]:
            raise ValidationFailed(
                [_error(("body", "name"), "Names must be provided for block documents.", "value_error")]
            )
        name = f"anonymous-{uuid.uuid4()}"
    plain, refs = _split_references(data["data"])
    now = now_iso()
    row_id = new_id()
    if not insert_row(
        tx,
        "block_document",
        {
            "id": row_id,
            "created": now,
            "updated": now,
            "name": name,
            "data": plain,
            "block_schema_id": data["block_schema_id"],
            "block_type_id": data["block_type_id"],
            "is_anonymous": data["is_anonymous"],
        },
        on_conflict="ON CONFLICT DO NOTHING",
    ):
        raise Conflict("Block already exists")
    _write_references(tx, row_id, refs)
    return block_document_out(tx, read_row(tx, "block_document", row_id), include_secrets=False)


def update_block_document(tx, doc_id: str, data: dict, sent: dict):
    row = require_row(tx, "block_document", doc_id, "Block document", lock=True)
    old = decode_row("block_document", row)
    plain, refs = _split_references(data["data"])
    plain = _restore_masked(plain, old["data"])
    merged = {**old["data"], **plain} if data["merge_existing_data"] else plain
    changes = {"data": merged, "updated": now_iso()}
    if data.get("block_schema_id"):
        require_row(tx, "block_schema", data["block_schema_id"], "Block schema")
        changes["block_schema_id"] = data["block_schema_id"]
    update_row(tx, "block_document", doc_id, changes)
    if refs or not data["merge_existing_data"]:
        _write_references(tx, doc_id, refs, replace_all=not data["merge_existing_data"])


# Variables

VARIABLE_NAME = r"[a-z0-9_-]+"
VariableCreate = Schema(
    "VariableCreate",
    {
        "name": Field("str", required=True, nullable=False, max_length=255, pattern=VARIABLE_NAME),
        "value": Field("any", required=True),
        "tags": Field(ListOf("str"), default=list, nullable=False),
    },
)
VariableUpdate = Schema(
    "VariableUpdate",
    {
        "name": Field("str", nullable=False, max_length=255, pattern=VARIABLE_NAME),
        "value": Field("any"),
        "tags": Field(ListOf("str"), nullable=False),
    },
)
MAX_VARIABLE_VALUE_BYTES = 5000  # Prefect's limit on a variable's value


def _check_variable_value(data: dict):
    if "value" in data and len(dumps(data["value"]).encode()) > MAX_VARIABLE_VALUE_BYTES:
        raise ValidationFailed(
            [
                _error(
                    ("body", "value"),
                    f"value must be at most {MAX_VARIABLE_VALUE_BYTES} bytes when encoded as JSON",
                    "value_error.any_str.max_length",
                )
            ]
        )


def create_variable(tx, data) -> dict:
    _check_variable_value(data)
    now = now_iso()
    row_id = new_id()
    if not insert_row(
        tx, "variable", {"id": row_id, "created": now, "updated": now, **data}, on_conflict="ON CONFLICT DO NOTHING"
    ):
        raise Conflict(f'A variable with the name "{data["name"]}" already exists.')
    return decode_row("variable", read_row(tx, "variable", row_id))


# Artifacts: `artifact_collection` keeps the latest artifact per key, updated in the same transaction.

ArtifactCreate = Schema(
    "ArtifactCreate",
    {
        "key": Field("str", max_length=255, pattern=r"[a-z0-9-]+"),
        "type": Field("str"),
        "description": Field("str"),
        "data": Field("any"),
        "metadata_": Field(DictOf("str")),
        "flow_run_id": Field("uuid"),
        "task_run_id": Field("uuid"),
    },
)
ArtifactUpdate = Schema(
    "ArtifactUpdate", {"data": Field("any"), "description": Field("str"), "metadata_": Field(DictOf("str"))}
)


def create_artifact(tx, data) -> dict:
    row_id = new_id()
    key = data.get("key")
    if key:
        # Lock the key's collection row first and stamp the time after, so concurrent writers of one key
        # take turns and the newest artifact is always the one recorded as latest.
        stamp = now_iso()
        insert_row(
            tx,
            "artifact_collection",
            {"id": new_id(), "created": stamp, "updated": stamp, "key": key, "latest_id": row_id},
            on_conflict="ON CONFLICT DO NOTHING",
        )
        tx.query_one(f"SELECT id FROM artifact_collection WHERE key = ?{tx.db.for_update}", (key,))
    now = now_iso()
    insert_row(tx, "artifact", {"id": row_id, "created": now, "updated": now, **data})
    if key:
        tx.execute("UPDATE artifact_collection SET latest_id = ?, updated = ? WHERE key = ?", (row_id, now, key))
    return decode_row("artifact", read_row(tx, "artifact", row_id))


def artifact_collection_out(tx, row) -> dict:
    latest = decode_row("artifact", read_row(tx, "artifact", row["latest_id"]))
    out = {k: latest[k] for k in ("type", "description", "data", "metadata_", "flow_run_id", "task_run_id")}
    out.update(
        {
            "id": row["id"],
            "created": row["created"],
            "updated": row["updated"],
            "key": row["key"],
            "latest_id": row["latest_id"],
        }
    )
    return out


def delete_artifact(tx, artifact_id: str):
    row = require_row(tx, "artifact", artifact_id, "Artifact", lock=True)
    tx.execute("DELETE FROM artifact WHERE id = ?", (artifact_id,))
    if row["key"]:  # the key's latest moves to the newest artifact left, or the key goes away
        newest = tx.query_one(
            "SELECT id FROM artifact WHERE key = ? ORDER BY created DESC, id DESC LIMIT 1", (row["key"],)
        )
        if newest is None:
            tx.execute("DELETE FROM artifact_collection WHERE key = ?", (row["key"],))
        else:
            tx.execute(
                "UPDATE artifact_collection SET latest_id = ?, updated = ? WHERE key = ?",
                (newest["id"], now_iso(), row["key"]),
            )


# Concurrency limits: tag-based (v1, enforced in task orchestration) and global (v2).

ConcurrencyLimitCreate = Schema(
    "ConcurrencyLimitCreate",
    {
        "tag": Field("str", required=True, nullable=False, max_length=255),
        "concurrency_limit": Field("int", required=True, nullable=False, minimum=0),
    },
)
ConcurrencyLimitV2Create = Schema(
    "ConcurrencyLimitV2Create",
    {
        "active": Field("bool", default=True, nullable=False),
        "name": Field("str", required=True, nullable=False, max_length=255, pattern=r"[^/%&><]+"),
        "limit": Field("int", required=True, nullable=False, minimum=0),
        "active_slots": Field("int", default=0, nullable=False, minimum=0),
        "denied_slots": Field("int", default=0, nullable=False, minimum=0),
        "slot_decay_per_second": Field("float", default=0.0, nullable=False, minimum=0),
    },
)
ConcurrencyLimitV2Update = Schema(
    "ConcurrencyLimitV2Update",
    {
        "active": Field("bool", nullable=False),
        "name": Field("str", nullable=False, max_length=255),
        "limit": Field("int", nullable=False, minimum=0),
        "active_slots": Field("int", nullable=False, minimum=0),
        "denied_slots": Field("int", nullable=False, minimum=0),
        "slot_decay_per_second": Field("float", nullable=False, minimum=0),
    },
)
ConcurrencySlotsBody = Schema(
    "Body_concurrency_slots",
    {
        "names": Field(ListOf("str", min_items=1), required=True, nullable=False),
        "slots": Field("int", required=True, nullable=False, minimum=1),
        "mode": Field(
            Enum("ConcurrencyLimitMode", ("concurrency", "rate_limit")), default="concurrency", nullable=False
        ),
        "occupancy_seconds": Field("float", minimum=0),
        "create_if_missing": Field("bool"),
    },
)


def create_tag_limit(tx, data) -> tuple[dict, bool]:
    """Create-or-update by tag, as Prefect does; racing creates of one tag all succeed on one row."""
    now = now_iso()
    created = insert_row(
        tx,
        "concurrency_limit",
        {
            "id": new_id(),
            "created": now,
            "updated": now,
            "tag": data["tag"],
            "concurrency_limit": data["concurrency_limit"],
            "active_slots": [],
        },
        on_conflict="ON CONFLICT DO NOTHING",
    )
    row = tx.query_one(f"SELECT * FROM concurrency_limit WHERE tag = ?{tx.db.for_update}", (data["tag"],))
    if not created:
        update_row(tx, "concurrency_limit", row["id"], {"concurrency_limit": data["concurrency_limit"], "updated": now})
    return decode_row("concurrency_limit", read_row(tx, "concurrency_limit", row["id"])), bool(created)


TagSlotsBody = Schema(
    "Body_increment_concurrency_limits_v1",
    {
        "names": Field(ListOf("str"), required=True, nullable=False),
        "task_run_id": Field("uuid", required=True, nullable=False),
    },
)


# Concurrency leases (Prefect 3): what a request for one may ask; the leases themselves are in Orchestration.

LEASE_MIN_SECONDS, LEASE_MAX_SECONDS = 60, 86400
LeaseHolder = Schema(
    "ConcurrencyLeaseHolder",
    {
        "type": Field(
            Enum("ConcurrencyLeaseHolderType", ("flow_run", "task_run", "deployment")), required=True, nullable=False
        ),
        "id": Field("uuid", required=True, nullable=False),
    },
)
ConcurrencyLeaseBody = Schema(
    "Body_increment_with_lease",
    {
        "names": Field(ListOf("str"), required=True, nullable=False),
        "slots": Field("int", required=True, nullable=False, minimum=1),
        "mode": Field(
            Enum("ConcurrencyLimitMode", ("concurrency", "rate_limit")), default="concurrency", nullable=False
        ),
        "lease_duration": Field(
            "float", default=300.0, nullable=False, minimum=LEASE_MIN_SECONDS, maximum=LEASE_MAX_SECONDS
        ),
        "holder": Field(LeaseHolder),
    },
)
LeaseIdBody = Schema("Body_decrement_with_lease", {"lease_id": Field("uuid", required=True, nullable=False)})
LeaseRenewBody = Schema(
    "Body_renew_lease",
    {
        "lease_duration": Field(
            "float", default=300.0, nullable=False, minimum=LEASE_MIN_SECONDS, maximum=LEASE_MAX_SECONDS
        )
    },
)


# Saved searches

SavedSearchFilter = Schema(  # Prefect's: each part required (its SDK reads a saved search lacking one as invalid)
    "SavedSearchFilter",
    {
        "object": Field("str", required=True, nullable=False),
        "property": Field("str", required=True, nullable=False),
        "type": Field("str", required=True, nullable=False),
        "operation": Field("str", required=True, nullable=False),
        "value": Field("any", required=True),
    },
)
SavedSearchCreate = Schema(
    "SavedSearchCreate",
    {
        "name": Field("str", required=True, nullable=False, max_length=255),
        "filters": Field(ListOf(SavedSearchFilter), default=list, nullable=False),
    },
)


# Work pools, work queues and workers. Status is derived from heartbeats and polls, not stored guesses.

DEFAULT_AGENT_POOL = "default-agent-pool"

WORKER_OFFLINE_AFTER_HEARTBEATS = 3  # a worker is OFFLINE after missing this many heartbeat intervals
DEFAULT_HEARTBEAT_SECONDS = 30
QUEUE_READY_POLL_SECONDS = 60  # a queue polled within this window is READY

_PLACEHOLDER = re.compile(r"{{\s*([\w\.\-\[\]$]+)\s*}}")


def check_base_job_template(template: dict, loc) -> dict:
    """Prefect's rule for a pool's base job template (validate_base_job_template, 3.9 and 2.20 alike): empty, or
    a `job_configuration` and a `variables` schema whose properties name every {{ placeholder }} the former uses."""
    if template == {}:
        return template
    config, variables = template.get("job_configuration"), template.get("variables")
    if not (isinstance(config, dict) and config and isinstance(variables, dict) and variables):
        raise ValidationFailed(
            [_error(loc, "The `base_job_template` must contain both a `job_configuration` key and a `variables` key.",
                    "value_error")]
        )  # fmt: skip
    used = {name for value in config.values() for name in _PLACEHOLDER.findall(json.dumps(value))}
    properties = variables.get("properties")
    missing = sorted(used - set(properties if isinstance(properties, dict) else ()))
    if missing:
        raise ValidationFailed(
            [
                _error(
                    loc,
                    "The variables specified in the job configuration template must be present as properties in the "
                    f"variables schema. Your job configuration uses the following undeclared variable(s): "
                    f"{', '.join(missing)}.",
                    "value_error",
                )
            ]
        )
    return template


WorkPoolCreate = Schema(
    "WorkPoolCreate",
    {
        "name": Field("str", required=True, nullable=False, max_length=255, pattern=r"[^/%&><]+"),
        "description": Field("str"),
        "type": Field("str", default="prefect-agent", nullable=False),
        "base_job_template": Field("object", default=dict, nullable=False, check=check_base_job_template),
        "is_paused": Field("bool", default=False, nullable=False),
        "concurrency_limit": Field("int", minimum=0),
        "storage_configuration": Field("object", default=dict, nullable=False),
    },
)
WorkPoolUpdate = Schema(
    "WorkPoolUpdate",
    {
        "description": Field("str"),
        "is_paused": Field("bool", nullable=False),
        "base_job_template": Field("object", nullable=False, check=check_base_job_template),
        "concurrency_limit": Field("int", minimum=0),
        "storage_configuration": Field("object"),
    },
)
# Prefect 3's WorkPoolStorageConfiguration: where a pool's workers upload and run flow code bundles, and
# its default result storage. Its only fields; Prefect refuses others.
_STORAGE_STEP_KEYS = ("bundle_upload_step", "bundle_execution_step")
STORAGE_CONFIGURATION_KEYS = (*_STORAGE_STEP_KEYS, "default_result_storage_block_id")


def storage_configuration(value: dict) -> dict:
    """A pool's storage configuration with every field, or a 422 naming the field that is wrong."""
    loc = ("body", "storage_configuration")
    errors = [
        _error((*loc, key), "extra fields not permitted", "value_error.extra")
        for key in value
        if key not in STORAGE_CONFIGURATION_KEYS
    ]
    errors += [
        _error((*loc, key), "value is not a valid dict", "type_error.dict")
        for key in _STORAGE_STEP_KEYS
        if value.get(key) is not None and not isinstance(value[key], dict)
    ]
    block_id = value.get("default_result_storage_block_id")
    if block_id is not None:
        try:
            block_id = parse_uuid(block_id, (*loc, "default_result_storage_block_id"))
        except ValidationFailed as exc:
            errors += exc.errors
    if errors:
        raise ValidationFailed(errors)
    return {**{key: value.get(key) for key in _STORAGE_STEP_KEYS}, "default_result_storage_block_id": block_id}


# Far below the column's 32-bit limit: a new queue takes the highest priority + 1, and inserting a queue
# moves those at and below it down by one; neither may overflow.
MAX_QUEUE_PRIORITY = 1_000_000_000

WorkQueueCreate = Schema(
    "WorkQueueCreate",
    {
        "name": Field("str", required=True, nullable=False, max_length=255, pattern=r"[^/%&><]+"),
        "description": Field("str", default=""),  # null is taken as "" (the 2.20 SDK sends null when not given)
        "is_paused": Field("bool", default=False, nullable=False),
        "concurrency_limit": Field("int", minimum=0),
        "priority": Field("int", minimum=1, maximum=MAX_QUEUE_PRIORITY),
        "filter": Field("object"),
        "work_pool_name": Field("str"),
    },
)
WorkQueueUpdate = Schema(
    "WorkQueueUpdate",
    {
        "name": Field("str", nullable=False, max_length=255, pattern=r"[^/%&><]+"),
        "description": Field("str"),
        "is_paused": Field("bool", nullable=False),
        "concurrency_limit": Field("int", minimum=0),
        "priority": Field("int", minimum=1, maximum=MAX_QUEUE_PRIORITY),
        "last_polled": Field("datetime"),
    },
)
WorkerHeartbeat = Schema(
    "Body_worker_heartbeat",
    {
        "name": Field("str", required=True, nullable=False, max_length=255),
        "heartbeat_interval_seconds": Field("int", minimum=1),
    },
)
ScheduledRunsForPool = Schema(
    "Body_get_scheduled_flow_runs_for_pool",
    {
        "work_queue_names": Field(ListOf("str")),
        "scheduled_before": Field("datetime"),
        "scheduled_after": Field("datetime"),
        "limit": Field("int", minimum=0),
    },
)


# Slots (Prefect 3's `prefect work-pool slots`): the flow runs that hold a pool's or a queue's concurrency
# slots, as Prefect counts them. A pool counts its queues' Pending and Running runs (what its limit
# holds back); a queue also counts Cancelling ones, and the runs named after it that no queue id claims.
_POOL_SLOT_HOLDERS = (
    "FROM flow_run fr JOIN work_queue wq ON wq.id = fr.work_queue_id "
    "WHERE wq.work_pool_id = ? AND fr.state_type IN ('PENDING', 'RUNNING')"
)
_QUEUE_SLOT_HOLDERS = (
    "FROM flow_run fr WHERE (fr.work_queue_id = ? OR (fr.work_queue_id IS NULL AND "
    "fr.work_queue_name = ?)) AND fr.state_type IN ('PENDING', 'RUNNING', 'CANCELLING')"
)


def work_pool_out(tx, row) -> dict:
    pool = decode_row("work_pool", row)
    pool["status"] = work_pool_status(tx, pool)
    pool["storage_configuration"] = storage_configuration(pool.get("storage_configuration") or {})
    return pool


def work_pool_for_client(tx, req, pool: dict) -> dict:
    """A 2.20 client in test mode refuses fields its WorkPool lacks: only 3.x clients read the storage and
    `active_slots` (the runs holding the pool's slots; null without a limit, as Prefect 3 answers)."""
    if client_major(req) != 3:
        return {k: v for k, v in pool.items() if k != "storage_configuration"}
    held = None
    if pool["concurrency_limit"] is not None:
        held = int(tx.scalar(f"SELECT COUNT(*) {_POOL_SLOT_HOLDERS}", (pool["id"],)))
    return {**pool, "active_slots": held}


def work_pool_status(tx, pool: dict) -> str:
    if pool["is_paused"]:
        return "PAUSED"
    horizon = iso(utcnow() - _dt.timedelta(seconds=DEFAULT_HEARTBEAT_SECONDS * WORKER_OFFLINE_AFTER_HEARTBEATS))
    online = tx.scalar(
        "SELECT COUNT(*) FROM worker WHERE work_pool_id = ? AND last_heartbeat_time >= ?", (pool["id"], horizon)
    )
    if online:
        return "READY"
    polled = iso(utcnow() - _dt.timedelta(seconds=QUEUE_READY_POLL_SECONDS))
    recent = tx.scalar(
        "SELECT COUNT(*) FROM work_queue WHERE work_pool_id = ? AND last_polled >= ?", (pool["id"], polled)
    )
    return "READY" if recent else "NOT_READY"


# A queue's `active_slots` as Prefect 3.9 counts them: its runs (by queue id alone) in these states; its
# /work_queues routes count Cancelling runs too, its /work_pools/{name}/queues routes do not.
QUEUE_SLOT_STATES = ("PENDING", "RUNNING", "CANCELLING")
POOL_QUEUE_SLOT_STATES = ("PENDING", "RUNNING")


def work_queue_out(tx, row, pool_name: str | None = None, major: int = 2, slot_states=QUEUE_SLOT_STATES) -> dict:
    """A queue as a client of `major` reads it: Prefect 3 adds `active_slots` (its runs in `slot_states`;
    null without a limit), which 2.20's WorkQueue lacks."""
    queue_ = decode_row("work_queue", row)
    if major == 3:
        held = None
        if queue_["concurrency_limit"] is not None:
            marks = ", ".join("?" for _ in slot_states)
            held = int(
                tx.scalar(
                    f"SELECT COUNT(*) FROM flow_run WHERE work_queue_id = ? AND state_type IN ({marks})",
                    (queue_["id"], *slot_states),
                )
            )
        queue_["active_slots"] = held
    if pool_name is None:
        pool_name = tx.scalar("SELECT name FROM work_pool WHERE id = ?", (queue_["work_pool_id"],))
    queue_["work_pool_name"] = pool_name
    pool_paused = tx.scalar("SELECT is_paused FROM work_pool WHERE id = ?", (queue_["work_pool_id"],))
    if queue_["is_paused"] or pool_paused:
        queue_["status"] = "PAUSED"
    else:
        fresh = queue_.get("last_polled") and from_iso(queue_["last_polled"]) >= utcnow() - _dt.timedelta(
            seconds=QUEUE_READY_POLL_SECONDS
        )
        queue_["status"] = "READY" if fresh else "NOT_READY"
    return queue_


def worker_out(row, now: _dt.datetime) -> dict:
    """A worker as the API shows it: ONLINE at `now` (the server's clock's time) unless it missed
    WORKER_OFFLINE_AFTER_HEARTBEATS heartbeats."""
    worker = decode_row("worker", row)
    interval = worker.get("heartbeat_interval_seconds") or DEFAULT_HEARTBEAT_SECONDS
    silent = _dt.timedelta(seconds=interval * WORKER_OFFLINE_AFTER_HEARTBEATS)
    alive = from_iso(worker["last_heartbeat_time"]) >= now - silent
    worker["status"] = "ONLINE" if alive else "OFFLINE"
    return worker


def read_pool_by_name(tx, name: str, lock=False) -> dict:
    row = tx.query_one(f"SELECT * FROM work_pool WHERE name = ?{tx.db.for_update if lock else ''}", (name,))
    if row is None:
        raise NotFound(f'Work pool "{name}" not found.')
    return row


def create_work_pool(tx, data: dict) -> dict:
    now = now_iso()
    pool_id, queue_id = new_id(), new_id()
    if not insert_row(
        tx,
        "work_pool",
        {
            "id": pool_id,
            "created": now,
            "updated": now,
            "name": data["name"],
            "description": data.get("description"),
            "type": data["type"],
            "base_job_template": data["base_job_template"],
            "is_paused": data["is_paused"],
            "concurrency_limit": data.get("concurrency_limit"),
            "default_queue_id": None,
            "storage_configuration": storage_configuration(data.get("storage_configuration") or {}),
        },
        on_conflict="ON CONFLICT DO NOTHING",
    ):
        raise Conflict(f'A work pool named "{data["name"]}" already exists.')
    insert_row(
        tx,
        "work_queue",
        {
            "id": queue_id,
            "created": now,
            "updated": now,
            "name": "default",
            "description": "The work pool's default queue.",
            "is_paused": False,
            "priority": 1,
            "work_pool_id": pool_id,
        },
    )
    update_row(tx, "work_pool", pool_id, {"default_queue_id": queue_id})
    return work_pool_out(tx, read_row(tx, "work_pool", pool_id))


def ensure_work_queue(tx, pool_name: str | None, queue_name: str | None) -> dict | None:
    """The queue a deployment or run goes to, created on first use as Prefect does."""
    if not pool_name and not queue_name:
        return None
    if not pool_name:
        pool_name = DEFAULT_AGENT_POOL
        if tx.query_one("SELECT id FROM work_pool WHERE name = ?", (pool_name,)) is None:
            create_work_pool(
                tx,
                {
                    "name": pool_name,
                    "type": "prefect-agent",
                    "base_job_template": {},
                    "is_paused": False,
                    "description": "Queues without a work pool.",
                },
            )
    pool = read_pool_by_name(tx, pool_name)
    if not queue_name:
        return read_row(tx, "work_queue", pool["default_queue_id"])
    row = tx.query_one("SELECT * FROM work_queue WHERE work_pool_id = ? AND name = ?", (pool["id"], queue_name))
    if row is None:
        row = create_work_queue(tx, pool, {"name": queue_name, "description": "", "is_paused": False})
    return row


def flow_run_pool_queue(tx, pool_name: str | None, queue_name: str | None) -> dict:
    """POST /flow_runs/ with a work pool (a run without a deployment, Prefect 3's `submit_to_work_pool`):
    the run goes to the pool's default queue, or the named one; unlike a deployment's, neither is created.
    Without a pool, a queue name is only kept as the run's work_queue_name. The columns to set on the run."""
    if not pool_name:
        return {}
    pool = read_pool_by_name(tx, pool_name)
    if queue_name:
        row = tx.query_one("SELECT * FROM work_queue WHERE work_pool_id = ? AND name = ?", (pool["id"], queue_name))
    else:
        row = read_row(tx, "work_queue", pool["default_queue_id"])
    if row is None:
        raise NotFound(f"Work pool queue '{pool_name}/{queue_name or 'default'}' not found.")
    return {"work_queue_id": row["id"], "work_queue_name": row["name"]}


def create_work_queue(tx, pool: dict, data: dict) -> dict:
    now = now_iso()
    priority = data.get("priority")
    if priority is None:
        priority = (tx.scalar("SELECT MAX(priority) FROM work_queue WHERE work_pool_id = ?", (pool["id"],)) or 0) + 1
    else:  # priorities stay distinct: the queues at and below this one move down
        tx.execute(
            "UPDATE work_queue SET priority = priority + 1 WHERE work_pool_id = ? AND priority >= ?",
            (pool["id"], priority),
        )
    queue_id = new_id()
    if not insert_row(
        tx,
        "work_queue",
        {
            "id": queue_id,
            "created": now,
            "updated": now,
            "name": data["name"],
            "description": data.get("description") or "",
            "is_paused": data.get("is_paused", False),
            "concurrency_limit": data.get("concurrency_limit"),
            "priority": priority,
            "work_pool_id": pool["id"],
            "filter": data.get("filter"),
        },
        on_conflict="ON CONFLICT DO NOTHING",
    ):
        raise Conflict(f'A work queue named "{data["name"]}" already exists in pool "{pool["name"]}".')
    return read_row(tx, "work_queue", queue_id)


def worker_heartbeat(tx, pool: dict, data: dict, now: _dt.datetime):
    now = iso(now)
    row = tx.query_one("SELECT id FROM worker WHERE work_pool_id = ? AND name = ?", (pool["id"], data["name"]))
    if row is None:
        insert_row(
            tx,
            "worker",
            {
                "id": new_id(),
                "created": now,
                "updated": now,
                "name": data["name"],
                "work_pool_id": pool["id"],
                "last_heartbeat_time": now,
                "heartbeat_interval_seconds": data.get("heartbeat_interval_seconds"),
            },
            on_conflict="ON CONFLICT DO NOTHING",
        )
    else:
        update_row(
            tx,
            "worker",
            row["id"],
            {
                "last_heartbeat_time": now,
                "updated": now,
                "heartbeat_interval_seconds": data.get("heartbeat_interval_seconds"),
            },
        )


def scheduled_runs_for_pool(tx, pool: dict, data: dict, settings: Settings, major: int = 2) -> list[dict]:
    """SCHEDULED runs a worker may start now: queue priority order, honouring pauses and limits."""
    now = now_iso()
    before = data.get("scheduled_before") or now
    limit = page_limit(data, settings)
    queues = [
        decode_row("work_queue", r)
        for r in tx.query("SELECT * FROM work_queue WHERE work_pool_id = ? ORDER BY priority, name", (pool["id"],))
    ]
    if data.get("work_queue_names"):
        queues = [q for q in queues if q["name"] in data["work_queue_names"]]
    for q in queues:
        update_row(tx, "work_queue", q["id"], {"last_polled": now})
    mark_deployments_polled(tx, "work_queue_id", [q["id"] for q in queues], now)
    if pool["is_paused"]:
        return []
    pool_room = None
    if pool["concurrency_limit"] is not None:
        busy = tx.scalar(
            "SELECT COUNT(*) FROM flow_run fr JOIN work_queue wq ON wq.id = fr.work_queue_id "
            "WHERE wq.work_pool_id = ? AND fr.state_type IN ('PENDING', 'RUNNING', 'CANCELLING')",
            (pool["id"],),
        )
        pool_room = max(pool["concurrency_limit"] - busy, 0)
    out = []
    for q in queues:
        if q["is_paused"] or len(out) >= limit or pool_room == 0:
            continue
        room = limit - len(out)
        if q["concurrency_limit"] is not None:
            busy = tx.scalar(
                "SELECT COUNT(*) FROM flow_run WHERE work_queue_id = ? AND state_type IN "
                "('PENDING', 'RUNNING', 'CANCELLING')",
                (q["id"],),
            )
            room = min(room, max(q["concurrency_limit"] - busy, 0))
        if pool_room is not None:
            room = min(room, pool_room)
        if room <= 0:
            continue
        sql = (
            "SELECT * FROM flow_run WHERE work_queue_id = ? AND state_type = 'SCHEDULED' "
            "AND next_scheduled_start_time <= ?"
        )
        params = [q["id"], before]
        if data.get("scheduled_after"):
            sql, params = sql + " AND next_scheduled_start_time >= ?", params + [data["scheduled_after"]]
        rows = tx.query(sql + " ORDER BY next_scheduled_start_time, id LIMIT ?", (*params, room))
        ids = {"work_pool_id": pool["id"], "work_queue_id": q["id"]}
        out += [{**ids, "flow_run": flow_run_out(r, major)} for r in rows]
        if pool_room is not None:
            pool_room -= len(rows)
    return out


def mark_deployments_polled(tx, column: str, values: list, now: str):
    """A runner's poll (by deployment id) or a worker's (by work queue id) says its deployments are served,
    as Prefect's mark_deployments_ready does. Readiness is read from last_polled (deployment_status)."""
    if values:
        marks = ", ".join("?" for _ in values)
        tx.execute(
            f"UPDATE deployment SET last_polled = ?, status = 'READY' WHERE {column} IN ({marks})", (now, *values)
        )


# --- 13. Deployments ---
# Owns deployments, their schedules and the runs the scheduler makes from them.

# Deployments

DeploymentScheduleCreate = Schema(
    "DeploymentScheduleCreate",
    {
        "schedule": Field("object", required=True, nullable=False),
        "active": Field("bool", default=True, nullable=False),
        "max_active_runs": Field("int", minimum=1),
        "max_scheduled_runs": Field("int", minimum=1),
        "catchup": Field("bool", default=False, nullable=False),
        # Prefect 3: parameter overrides for the schedule's runs, and a name unique within the deployment
        # (`replaces`, a deploy-time rename directive, is accepted and not stored, as in Prefect)
        "parameters": Field("object", default=dict, nullable=False),
        "slug": Field("str", max_length=255),
        "replaces": Field("str"),
    },
)
# The fields of a deployment schedule a client reads: 2.20's SDK in test mode refuses any other; 3.9 added slug and
# parameters and dropped max_active_runs and catchup.
_SCHEDULE_FIELDS = ("id", "created", "updated", "deployment_id", "schedule", "active", "max_scheduled_runs")
DEPLOYMENT_SCHEDULE_FIELDS_2 = (*_SCHEDULE_FIELDS, "max_active_runs", "catchup")
DEPLOYMENT_SCHEDULE_FIELDS_3 = (*_SCHEDULE_FIELDS, "parameters", "slug")


def schedule_for_client(major: int, schedule: dict) -> dict:
    """A deployment schedule in the shape of a client major version."""
    fields = DEPLOYMENT_SCHEDULE_FIELDS_3 if major == 3 else DEPLOYMENT_SCHEDULE_FIELDS_2
    return {k: schedule.get(k) for k in fields}


_DEPLOYMENT_FIELDS = {
    "version": Field("str"),
    "description": Field("str"),
    "schedule": Field("object"),
    "is_schedule_active": Field("bool", nullable=False),  # null: a 422 from Prefect (3.9 and 2.20), here too
    "paused": Field("bool", nullable=False),
    "schedules": Field(ListOf(DeploymentScheduleCreate), nullable=False),
    "parameters": Field("object", nullable=False),
    "tags": Field(ListOf("str"), nullable=False),
    "work_queue_name": Field("str"),
    "work_pool_name": Field("str"),
    "path": Field("str"),
    "entrypoint": Field("str"),
    "manifest_path": Field("str"),
    "storage_document_id": Field("uuid"),
    "infrastructure_document_id": Field("uuid"),
    "parameter_openapi_schema": Field("object"),
    "pull_steps": Field(ListOf("object")),
    "enforce_parameter_schema": Field("bool", nullable=False),
    "job_variables": Field("object"),
    "infra_overrides": Field("object"),
    # Prefect 3: how many of the deployment's runs may be active at once (kept as the global concurrency
    # limit `deployment:{id}`), or an existing global limit to use; and what a run finding no slot does
    "concurrency_limit": Field("int", minimum=1),
    "global_concurrency_limit_id": Field("uuid"),
    "concurrency_options": Field("object"),
}
_CONCURRENCY_FIELDS = ("concurrency_limit", "global_concurrency_limit_id", "concurrency_options")
COLLISION_STRATEGIES = ("ENQUEUE", "CANCEL_NEW")
GRACE_PERIOD_RANGE = (60, 86400)  # seconds a submitted run has to start before its slot is taken back
DeploymentCreate = Schema(
    "DeploymentCreate",
    {
        "name": Field("str", required=True, nullable=False, max_length=255, pattern=r"[^/%&><]+"),
        "flow_id": Field("uuid", required=True, nullable=False),
        "labels": _LABELS,  # Prefect 3 (on create only: its DeploymentUpdate has none)
        **_DEPLOYMENT_FIELDS,
        "job_variables": Field("object", nullable=False),  # a null only on update (3.9 and 2.20)
    },
)
# Prefect's DeploymentUpdate (3.9's and 2.20's) forbids other fields, labels among them (a 422), bar the
# names older clients sent for the pool and queue, which it drops, and 3.9's version_info, which we do not keep
_OLD_POOL_NAMES = ("worker_pool_queue_id", "worker_pool_name", "worker_pool_queue_name", "work_pool_queue_name")
DeploymentUpdate = Schema(
    "DeploymentUpdate", dict(_DEPLOYMENT_FIELDS), forbid_extra=True, tolerated=("version_info", *_OLD_POOL_NAMES)
)
# 2.20's has no version_info: a 2.x client sending one gets its 422
DeploymentUpdate2 = Schema(
    "DeploymentUpdate_2_20", dict(_DEPLOYMENT_FIELDS), forbid_extra=True, tolerated=_OLD_POOL_NAMES
)
DeploymentFlowRunCreate = Schema(
    "DeploymentFlowRunCreate",
    {
        "name": Field("str", max_length=5000),
        "parameters": Field("object", default=dict, nullable=False),
        "context": Field("object", default=dict, nullable=False),
        "tags": Field(ListOf("str"), default=list, nullable=False),
        "idempotency_key": Field("str"),
        "parent_task_run_id": Field("uuid"),
        "work_queue_name": Field("str"),
        "job_variables": Field("object"),
        "state": Field(StateCreate),
        "empirical_policy": Field(FlowRunPolicy),
        "infrastructure_document_id": Field("uuid"),
        "enforce_parameter_schema": Field("bool"),
        "labels": _LABELS,
    },
)
ScheduledRunsForDeployments = Schema(
    "Body_get_scheduled_flow_runs_for_deployments",
    {
        "deployment_ids": Field(ListOf("uuid"), required=True, nullable=False),
        "scheduled_before": Field("datetime"),
        "limit": Field("int", minimum=0),
    },
)


def normalise_schedule(schedule: dict, loc) -> dict:
    """A schedule as stored and returned; anything invalid or unsupported is a 422 that says so."""
    try:
        return validate_schedule(schedule)
    except ScheduleError as exc:
        raise ValidationFailed([_error((*loc, exc.field), exc.message, "value_error.schedule")]) from None


def deployment_status(dep: dict, timeout_seconds: float, now: _dt.datetime) -> str:
    """READY while something polled it within the timeout before `now` (Prefect's foreman turns it
    NOT_READY after); derived when read, so no service has to catch up with the clock."""
    polled = dep.get("last_polled")
    fresh = polled and from_iso(polled) >= now - _dt.timedelta(seconds=timeout_seconds)
    return "READY" if fresh else "NOT_READY"


def deployment_out(tx, row, settings: Settings | None = None, now: _dt.datetime | None = None) -> dict:
    """A deployment as the API shows it; its status as at `now` (the server's clock's time)."""
    dep = decode_row("deployment", row)
    dep["labels"] = stored_labels(row)  # for 3.x clients only (deployment_for_client)
    timeout = 60.0  # the setting's default, for callers that only want the other fields
    if settings:
        timeout = settings["PREFECT_API_SERVICES_FOREMAN_DEPLOYMENT_LAST_POLLED_TIMEOUT_SECONDS"]
    dep["status"] = deployment_status(dep, timeout, now or utcnow())
    schedules = [
        decode_row("deployment_schedule", r)
        for r in tx.query(
            "SELECT * FROM deployment_schedule WHERE deployment_id = ? ORDER BY created, id", (dep["id"],)
        )
    ]
    dep["schedules"] = schedules
    dep["schedule"] = schedules[0]["schedule"] if schedules else None
    dep["global_concurrency_limit"] = deployment_global_limit(tx, dep)
    dep["work_pool_name"] = None
    if dep.get("work_queue_id"):
        found = tx.query_one(
            "SELECT wp.name AS pool, wq.name AS queue FROM work_queue wq JOIN work_pool wp "
            "ON wp.id = wq.work_pool_id WHERE wq.id = ?",
            (dep["work_queue_id"],),
        )
        if found:
            dep["work_pool_name"], dep["work_queue_name"] = found["pool"], found["queue"]
    return dep


def _replace_schedules(tx, deployment_id: str, schedules: list[dict]):
    tx.execute("DELETE FROM deployment_schedule WHERE deployment_id = ?", (deployment_id,))
    _add_schedules(tx, deployment_id, schedules, ("body", "schedules"))


SLUG_TAKEN = "Schedule slugs must be unique within a deployment."


def _require_free_slugs(tx, deployment_id: str, slugs: list, except_id: str | None = None):
    """Prefect answers 409 for a slug another schedule of the deployment has (checked before writing:
    on PostgreSQL a violated unique index would end the transaction)."""
    slugs = [slug for slug in slugs if slug is not None]
    if len(set(slugs)) < len(slugs):
        raise Conflict(SLUG_TAKEN)
    for slug in slugs:
        if tx.scalar(
            "SELECT id FROM deployment_schedule WHERE deployment_id = ? AND slug = ? AND id != ?",
            (deployment_id, slug, except_id or ""),
        ):
            raise Conflict(SLUG_TAKEN)


def _add_schedules(tx, deployment_id: str, schedules: list[dict], loc: tuple) -> list[str]:
    """Insert `schedules` beside the deployment's others; returns their new ids."""
    _require_free_slugs(tx, deployment_id, [item.get("slug") for item in schedules])
    now = now_iso()
    ids = []
    for i, item in enumerate(schedules):
        ids.append(new_id())
        insert_row(
            tx,
            "deployment_schedule",
            {
                "id": ids[-1],
                "created": now,
                "updated": now,
                "deployment_id": deployment_id,
                "schedule": normalise_schedule(item["schedule"], (*loc, i, "schedule")),
                "active": item.get("active", True),
                "max_active_runs": item.get("max_active_runs"),
                "max_scheduled_runs": item.get("max_scheduled_runs"),
                "catchup": item.get("catchup", False),
                "parameters": item.get("parameters") or {},
                "slug": item.get("slug"),
            },
        )
    _drop_future_auto_runs(tx, deployment_id)
    return ids


def _drop_future_auto_runs(tx, deployment_id: str):
    """A deployment change removes the auto-scheduled runs that have not started yet; the scheduler refills."""
    tx.execute(
        "DELETE FROM flow_run WHERE deployment_id = ? AND auto_scheduled = ? AND state_type = 'SCHEDULED' "
        "AND start_time IS NULL",
        (deployment_id, True),
    )


def _schedules_from(data: dict, sent: dict) -> list[dict] | None:
    """The deployment's schedules as the body sets them, None when it leaves them alone. The 2.20 SDK's
    create_deployment(schedule=...) sends `"schedules": []` beside the older single `schedule`: as in
    Prefect, an empty list gives way to that schedule."""
    if data.get("schedules"):
        return data["schedules"]
    if data.get("schedule") is not None:
        return [{"schedule": data["schedule"], "active": data.get("is_schedule_active", True) is not False}]
    if "schedules" in sent or "schedule" in sent:
        return []
    return None


def concurrency_options(value: dict | None) -> dict | None:
    """Prefect 3's ConcurrencyOptions, or a 422 naming the field that is wrong."""
    if value is None:
        return None
    loc = ("body", "concurrency_options")
    strategy, grace = value.get("collision_strategy"), value.get("grace_period_seconds")
    errors = [
        _error((*loc, key), "extra fields not permitted", "value_error.extra")
        for key in value
        if key not in ("collision_strategy", "grace_period_seconds")
    ]
    if strategy not in COLLISION_STRATEGIES:
        errors.append(
            _error((*loc, "collision_strategy"), f"value is not one of {list(COLLISION_STRATEGIES)}", "type_error.enum")
        )
    low, high = GRACE_PERIOD_RANGE
    if grace is not None and (type(grace) is not int or not low <= grace <= high):
        errors.append(
            _error(
                (*loc, "grace_period_seconds"),
                f"ensure this value is an integer from {low} to {high}",
                "value_error.number",
            )
        )
    if errors:
        raise ValidationFailed(errors)
    return {"collision_strategy": strategy, "grace_period_seconds": grace}


def set_deployment_concurrency(tx, dep_id: str, data: dict, sent: dict):
    """A deployment's concurrency, as Prefect 3 keeps it: `concurrency_limit` N makes (or changes) the
    global limit `deployment:{id}` and links it, null removes it; `global_concurrency_limit_id` links an
    existing global limit instead."""
    if data.get("concurrency_limit") is not None and data.get("global_concurrency_limit_id") is not None:
        raise ValidationFailed(
            [
                _error(
                    ("body", "global_concurrency_limit_id"),
                    "cannot set both concurrency_limit and global_concurrency_limit_id",
                    "value_error",
                )
            ]
        )
    changes = {}
    if "concurrency_options" in sent:
        changes["concurrency_options"] = concurrency_options(data.get("concurrency_options"))
    if "global_concurrency_limit_id" in sent:
        limit_id = data.get("global_concurrency_limit_id")
        if limit_id is not None:
            require_row(tx, "concurrency_limit_v2", limit_id, "Concurrency limit")
        changes["concurrency_limit_id"] = limit_id
    if "concurrency_limit" in sent:
        changes["concurrency_limit_id"] = _deployment_limit(tx, dep_id, data.get("concurrency_limit"))
        changes["concurrency_limit"] = data.get("concurrency_limit")
    if changes:
        update_row(tx, "deployment", dep_id, changes)


def _deployment_limit(tx, dep_id: str, limit: int | None) -> str | None:
    """The id of the deployment's own global limit set to `limit` (made when missing); None deletes it."""
    name = f"deployment:{dep_id}"
    row = tx.query_one(f"SELECT id FROM concurrency_limit_v2 WHERE name = ?{tx.db.for_update}", (name,))
    if limit is None:
        if row:
            tx.execute("DELETE FROM concurrency_limit_v2 WHERE id = ?", (row["id"],))
        return None
    if row:
        update_row(tx, "concurrency_limit_v2", row["id"], {"limit": limit, "updated": now_iso()})
        return row["id"]
    limit_id, now = new_id(), now_iso()
    insert_row(
        tx,
        "concurrency_limit_v2",
        {"id": limit_id, "created": now, "updated": now, "name": name, "limit": limit, "active": True},
    )
    return limit_id


def deployment_global_limit(tx, dep: dict) -> dict | None:
    """The global limit a deployment's runs take a slot of (Prefect's GlobalConcurrencyLimitResponse)."""
    if not dep.get("concurrency_limit_id"):
        return None
    row = read_row(tx, "concurrency_limit_v2", dep["concurrency_limit_id"])
    if row is None:  # deleted through the limits API
        return None
    limit = decode_row("concurrency_limit_v2", row)
    return {
        k: limit[k]
        for k in ("id", "created", "updated", "active", "name", "limit", "active_slots", "slot_decay_per_second")
    }


def _merge_job_variables(data: dict, sent: dict) -> dict:
    """One value for the job variables, whichever name the client used: 2.20 SDKs send `infra_overrides`,
    3.x ones `job_variables` (Prefect 2.20 renamed the field and reads the old name as the new one).
    Both columns then hold it; returns `sent` with the merged field marked as sent."""
    if data.get("infra_overrides") is not None and not data.get("job_variables"):
        data["job_variables"] = data["infra_overrides"]
    if data.get("job_variables") is not None:
        data["infra_overrides"] = data["job_variables"]
        return {**sent, "job_variables": data["job_variables"], "infra_overrides": data["job_variables"]}
    return sent


def deployment_labels(flow: dict, data: dict) -> dict:
    """A created or upserted deployment's labels, as Prefect 3 sets them each time: its flow's labels, then
    prefect.flow.id, then the labels sent (none sent: none kept)."""
    return {**stored_labels(flow), "prefect.flow.id": flow["id"], **(data.get("labels") or {})}


def upsert_deployment(tx, data: dict, sent: dict) -> tuple[dict, bool]:
    """Create a deployment, or update the one with the same flow and name."""
    flow = require_row(tx, "flow", data["flow_id"], "Flow")
    sent = _merge_job_variables(data, sent)
    queue_row = ensure_work_queue(tx, data.get("work_pool_name"), data.get("work_queue_name"))
    now = now_iso()
    values = {
        k: data[k]
        for k in (
            "version",
            "description",
            "path",
            "entrypoint",
            "manifest_path",
            "storage_document_id",
            "infrastructure_document_id",
            "parameter_openapi_schema",
            "pull_steps",
        )
        if k in sent
    }
    for key, default in (("parameters", {}), ("tags", []), ("job_variables", {}), ("infra_overrides", {})):
        if key in sent:
            values[key] = data[key] if data[key] is not None else default
    for key in ("paused", "enforce_parameter_schema"):
        if data.get(key) is not None:
            values[key] = data[key]
    if data.get("is_schedule_active") is not None:
        values["is_schedule_active"] = data["is_schedule_active"]
        values.setdefault("paused", not data["is_schedule_active"])
    elif data.get("paused") is not None:  # 2.20: a paused deployment's schedule is not active
        values["is_schedule_active"] = not data["paused"]
    values["work_queue_id"] = queue_row["id"] if queue_row else None
    values["work_queue_name"] = queue_row["name"] if queue_row else data.get("work_queue_name")
    values["labels"] = deployment_labels(flow, data)
    existing = tx.query_one(
        f"SELECT * FROM deployment WHERE flow_id = ? AND name = ?{tx.db.for_update}", (data["flow_id"], data["name"])
    )
    if existing is None:
        dep_id = new_id()
        insert_row(
            tx,
            "deployment",
            {"id": dep_id, "created": now, "updated": now, "name": data["name"], "flow_id": data["flow_id"], **values},
        )
    else:
        dep_id = existing["id"]
        update_row(tx, "deployment", dep_id, {**values, "updated": now})
    set_deployment_concurrency(tx, dep_id, data, sent)
    schedules = _schedules_from(data, sent)
    if schedules is not None:
        _replace_schedules(tx, dep_id, schedules)
    return deployment_out(tx, read_row(tx, "deployment", dep_id)), existing is None


def update_deployment(tx, dep_id: str, data: dict, sent: dict):
    row = require_row(tx, "deployment", dep_id, "Deployment", lock=True)
    sent = _merge_job_variables(data, sent)
    changes = {
        k: data[k]
        for k in sent
        if k in data
        and k
        not in (
            "schedule",
            "schedules",
            "work_pool_name",
            "work_queue_name",
            "is_schedule_active",
            *_CONCURRENCY_FIELDS,
        )
    }
    set_deployment_concurrency(tx, dep_id, data, sent)
    if "paused" in changes and changes["paused"] is not None:
        changes["is_schedule_active"] = not changes["paused"]
    if data.get("is_schedule_active") is not None:
        changes["is_schedule_active"] = data["is_schedule_active"]
        changes["paused"] = not data["is_schedule_active"]
    if "work_pool_name" in sent or "work_queue_name" in sent:
        queue_row = ensure_work_queue(
            tx, data.get("work_pool_name"), data.get("work_queue_name") or row["work_queue_name"]
        )
        changes["work_queue_id"] = queue_row["id"] if queue_row else None
        changes["work_queue_name"] = queue_row["name"] if queue_row else None
    changes = {
        k: v
        for k, v in changes.items()
        if not (
            v is None
            and k in ("paused", "enforce_parameter_schema", "parameters", "tags", "job_variables", "infra_overrides")
        )
    }
    update_row(tx, "deployment", dep_id, {**changes, "updated": now_iso()})
    schedules = _schedules_from(data, sent)
    if schedules is not None:
        _replace_schedules(tx, dep_id, schedules)
    else:  # parameters, tags or queue may have changed: future runs are made again from the new values
        _drop_future_auto_runs(tx, dep_id)


class QueueWithoutPool(Exception):
    """A run asked for a work queue of a deployment that has no work pool to find it in: Prefect refuses it
    (3.9 with a 400; 2.20 fails with a 500), and the handlers word the refusal as Prefect does."""

    def __init__(self, queue_name: str):
        super().__init__(queue_name)
        self.queue_name = queue_name


def create_deployment_flow_run(tx, dep_id: str, data: dict, major: int = 2) -> tuple[dict, bool]:
    dep = deployment_out(tx, require_row(tx, "deployment", dep_id, "Deployment"))
    parameters = {**(dep.get("parameters") or {}), **(data.get("parameters") or {})}
    enforce = data.get("enforce_parameter_schema")
    if enforce is None:
        enforce = dep.get("enforce_parameter_schema")
    if enforce and dep.get("parameter_openapi_schema"):
        errors = validate_parameters(dep["parameter_openapi_schema"], parameters)
        if errors:
            raise ValidationFailed(errors)
    if data.get("work_queue_name") and not dep.get("work_pool_name"):
        raise QueueWithoutPool(data["work_queue_name"])
    queue_row = (
        ensure_work_queue(tx, dep["work_pool_name"], data.get("work_queue_name") or dep.get("work_queue_name"))
        if (dep.get("work_pool_name") or data.get("work_queue_name") or dep.get("work_queue_name"))
        else None
    )
    state = data.get("state") or {"type": "SCHEDULED", "state_details": {"scheduled_time": now_iso()}}
    if state["type"] == "SCHEDULED" and not (state.get("state_details") or {}).get("scheduled_time"):
        state = {**state, "state_details": {**(state.get("state_details") or {}), "scheduled_time": now_iso()}}
    run_data = {
        "flow_id": dep["flow_id"],
        "deployment_id": dep["id"],
        "name": data.get("name"),
        "parameters": parameters,
        "context": data.get("context") or {},
        "tags": sorted(set(dep.get("tags") or []) | set(data.get("tags") or [])),
        "idempotency_key": data.get("idempotency_key"),
        "parent_task_run_id": data.get("parent_task_run_id"),
        "empirical_policy": data.get("empirical_policy") or {},
        "state": state,
        "job_variables": data.get("job_variables") or {},
        "infrastructure_document_id": data.get("infrastructure_document_id") or dep.get("infrastructure_document_id"),
        "labels": data.get("labels") or {},
    }
    extra = {
        "deployment_version": dep.get("version"),
        "work_queue_id": queue_row["id"] if queue_row else None,
        "work_queue_name": queue_row["name"] if queue_row else None,
    }
    return create_flow_run(tx, run_data, extra, major)


def scheduled_runs_for_deployments(
    tx, data: dict, settings: Settings, now: _dt.datetime | None = None, major: int = 2
) -> list[dict]:
    """A runner's poll: the deployments' runs due by `now` (the server's clock's time); marks them polled."""
    ids = data["deployment_ids"]
    if not ids:
        return []
    now = iso(now or utcnow())
    marks = ", ".join("?" for _ in ids)
    mark_deployments_polled(tx, "id", ids, now)
    rows = tx.query(
        f"SELECT * FROM flow_run WHERE deployment_id IN ({marks}) AND state_type = 'SCHEDULED' "
        f"AND next_scheduled_start_time <= ? ORDER BY next_scheduled_start_time, id LIMIT ?",
        (*ids, data.get("scheduled_before") or now, page_limit(data, settings)),
    )
    return [flow_run_out(r, major) for r in rows]


# --- 14. Notifications ---
# Owns flow run notification policies, the durable queue of messages they make, and
# the senders that deliver them (standard library only).

# Notifications: destinations are block documents of the types below (registered at start, protected);
# a policy says which states of which runs go where. Rows are queued in the transaction that records
# the state, so a state change and its notification are durable together.


_STR_LIST = {"type": "array", "items": {"type": "string"}}
# fmt: off
NOTIFICATION_BLOCK_TYPES = [
    ("slack-webhook", "Slack Webhook", "Posts a message to a Slack channel through an incoming webhook.",
     _block_fields("SlackWebhook", "Slack incoming webhook.",
                   {"url": _field("Webhook URL", secret=True)}, ["url"], ["url"])),
    ("ms-teams-webhook", "Microsoft Teams Webhook", "Posts a message card to a Microsoft Teams channel.",
     _block_fields("MicrosoftTeamsWebhook", "Microsoft Teams incoming webhook.",
                   {"url": _field("Webhook URL", secret=True)}, ["url"], ["url"])),
    ("opsgenie-webhook", "Opsgenie Webhook", "Creates an Opsgenie alert.",
     _block_fields("OpsgenieWebhook", "Opsgenie alert API.", {
         "apikey": _field("API Key", secret=True), "target_user": {**_STR_LIST, "title": "Target users"},
         "target_team": {**_STR_LIST, "title": "Target teams"},
         "target_schedule": {**_STR_LIST, "title": "Target schedules"},
         "target_escalation": {**_STR_LIST, "title": "Target escalations"},
         "region_name": _field("Region", enum=["us", "eu"], default="us"),
         "tags": {**_STR_LIST, "title": "Tags"},
         "priority": _field("Priority", enum=["P1", "P2", "P3", "P4", "P5"], default="P3"),
         "alias": _field("Alias"), "entity": _field("Entity"), "details": _field("Details", "object")},
         ["apikey"], ["apikey"])),
    ("pager-duty-webhook", "Pager Duty Webhook", "Triggers a PagerDuty event (Events API v2).",
     _block_fields("PagerDutyWebHook", "PagerDuty Events API v2.", {
         "integration_key": _field("Integration Key", secret=True), "api_key": _field("API Key", secret=True),
         "source": _field("Source", default="Prefect"), "component": _field("Component", default="Notification"),
         "group": _field("Group"), "class_id": _field("Class ID"),
         "region_name": _field("Region", enum=["us", "eu"], default="us"),
         "clickable_url": _field("Clickable URL"), "include_image": _field("Include image", "boolean"),
         "custom_details": _field("Custom details", "object")},
         ["integration_key", "api_key"], ["integration_key", "api_key"])),
    ("twilio-sms", "Twilio SMS", "Sends a text message through Twilio.",
     _block_fields("TwilioSMS", "Twilio messaging API.", {
         "account_sid": _field("Account SID"), "auth_token": _field("Auth Token", secret=True),
         "from_phone_number": _field("From phone number"),
         "to_phone_numbers": {**_STR_LIST, "title": "To phone numbers"}},
         ["account_sid", "auth_token", "from_phone_number", "to_phone_numbers"], ["auth_token"])),
    ("custom-webhook", "Custom Webhook", "Calls any HTTP endpoint with {{subject}} and {{body}} filled in.",
     _block_fields("CustomWebhookNotificationBlock", "A webhook of your own.", {
         "name": _field("Name"), "url": _field("URL"),
         "method": _field("Method", enum=["GET", "POST", "PUT", "PATCH", "DELETE"], default="POST"),
         "params": _field("Query parameters", "object"), "json_data": _field("JSON body", "object"),
         "form_data": _field("Form body", "object"), "headers": _field("Headers", "object"),
         "cookies": _field("Cookies", "object"), "timeout": _field("Timeout (seconds)", "number", default=10),
         "secrets": _field("Secrets", "object", writeOnly=True, format="password")},
         ["name", "url"], ["secrets.*"])),
    ("email-smtp", "Email (SMTP)", "Sends an email through an SMTP server.",
     _block_fields("EmailSMTP", "An SMTP server.", {
         "host": _field("Host"), "port": _field("Port", "integer", default=587),
         "security": _field("Security", enum=["none", "starttls", "ssl"], default="starttls"),
         "username": _field("Username"), "password": _field("Password", secret=True),
         "from_address": _field("From address"), "to_addresses": {**_STR_LIST, "title": "To addresses"}},
         ["host", "from_address", "to_addresses"], ["password"])),
]
# fmt: on


# Every block type a server has from its start: the core ones, and the destinations above.
BUILTIN_BLOCK_TYPES = CORE_BLOCK_TYPES + [(*block_type, ["notify"]) for block_type in NOTIFICATION_BLOCK_TYPES]


def install_builtin_block_types(tx):
    install_block_types(tx, BUILTIN_BLOCK_TYPES)


NOTIFICATION_PLACEHOLDERS = (
    "flow_run_notification_policy_id",
    "flow_id",
    "flow_name",
    "flow_run_id",
    "flow_run_name",
    "flow_run_url",
    "flow_run_parameters",
    "flow_run_state_type",
    "flow_run_state_name",
    "flow_run_state_timestamp",
    "flow_run_state_message",
)
DEFAULT_NOTIFICATION_TEMPLATE = (
    "The {flow_run_name} run of the {flow_name} flow entered a {flow_run_state_name} state at "
    "{flow_run_state_timestamp}.\n\nState message: {flow_run_state_message}\nFlow run: {flow_run_url}"
)

NotificationPolicyCreate = Schema(
    "FlowRunNotificationPolicyCreate",
    {
        "is_active": Field("bool", default=True, nullable=False),
        "state_names": Field(ListOf("str"), required=True, nullable=False),
        "tags": Field(ListOf("str"), required=True, nullable=False),
        "block_document_id": Field("uuid", required=True, nullable=False),
        "message_template": Field("str", max_length=10000),
    },
)
NotificationPolicyUpdate = Schema(
    "FlowRunNotificationPolicyUpdate",
    {
        "is_active": Field("bool", nullable=False),
        "state_names": Field(ListOf("str"), nullable=False),
        "tags": Field(ListOf("str"), nullable=False),
        "block_document_id": Field("uuid", nullable=False),
        "message_template": Field("str", max_length=10000),
    },
)


def check_message_template(template: str | None):
    if not template:
        return
    try:
        fields = [
            (field, spec, conv) for _text, field, spec, conv in string.Formatter().parse(template) if field is not None
        ]
    except ValueError as exc:
        raise ValidationFailed(
            [_error(("body", "message_template"), f"invalid template: {exc}", "value_error")]
        ) from None
    # str.format fills the template, so a format spec or conversion ("{flow_run_name:d}") could fail or blow up
    # (":>2000000000") at every send: placeholders are bare names
    for field, spec, conv in fields:
        if spec or conv:
            raise ValidationFailed(
                [
                    _error(
                        ("body", "message_template"),
                        f"placeholder {{{field}}} has a format spec or conversion; use the bare name",
                        "value_error",
                    )
                ]
            )
    names = {field for field, _spec, _conv in fields}
    unknown = sorted(n for n in names if n not in NOTIFICATION_PLACEHOLDERS)
    if unknown:
        raise ValidationFailed(
            [
                _error(
                    ("body", "message_template"),
                    f"unknown placeholder {{{unknown[0]}}}; allowed: {', '.join(NOTIFICATION_PLACEHOLDERS)}",
                    "value_error",
                )
            ]
        )


def _notify_capable(tx, block_document_id: str):
    row = tx.query_one(
        "SELECT s.capabilities FROM block_document d JOIN block_schema s ON s.id = d.block_schema_id WHERE d.id = ?",
        (block_document_id,),
    )
    if row is None:
        raise NotFound("Block document not found")
    if "notify" not in json.loads(row["capabilities"] or "[]"):
        raise ValidationFailed(
            [_error(("body", "block_document_id"), "the block document cannot send notifications", "value_error")]
        )


def enqueue_notifications(tx, kind: str, run: dict, initial: dict | None, state: dict):
    """A state listener: queue a row for each active policy matching the state name and the run's tags."""
    if kind != "flow":
        return
    policies = tx.query("SELECT id, state_names, tags FROM flow_run_notification_policy WHERE is_active = ?", (True,))
    tags = set(run.get("tags") or [])
    queued = 0
    for policy in policies:
        names = json.loads(policy["state_names"])
        wanted_tags = set(json.loads(policy["tags"]))
        if state["name"] not in names:  # names, not types: a "Late" run is not "Scheduled" here
            continue
        if wanted_tags and not wanted_tags & tags:
            continue
        insert_row(
            tx,
            "flow_run_notification_queue",
            {
                "id": new_id(),
                "created": state["timestamp"],
                "updated": state["timestamp"],
                "flow_run_notification_policy_id": policy["id"],
                "flow_run_state_id": state["id"],
                "status": "PENDING",
                "attempts": 0,
                "next_attempt_at": state["timestamp"],
            },
        )
        queued += 1
    if queued:
        tx.after_commit.extend(tx.db.hooks.notification_wakers)


DatabaseHooks.domain_state_listeners = (emit_flow_run_state_event, enqueue_notifications)


def notification_context(tx, policy: dict, state_row: dict, base_url: str) -> dict:
    run = decode_row("flow_run", read_row(tx, "flow_run", state_row["flow_run_id"]) or {})
    flow = decode_row("flow", read_row(tx, "flow", run["flow_id"])) if run else None
    moment = from_iso(state_row["timestamp"])
    return {
        "flow_run_notification_policy_id": policy["id"],
        "flow_id": run.get("flow_id") if run else None,
        "flow_name": flow["name"] if flow else "(deleted)",
        "flow_run_id": state_row["flow_run_id"],
        "flow_run_name": run.get("name") if run else "(deleted)",
        "flow_run_url": ui_page_url(base_url, "flow-run", {"id": state_row["flow_run_id"]}),
        "flow_run_parameters": dumps(run.get("parameters") if run else {}),
        "flow_run_state_type": state_row["type"],
        "flow_run_state_name": state_row["name"],
        "flow_run_state_timestamp": moment.strftime("%y-%m-%d %H:%M:%S %Z"),
        "flow_run_state_message": state_row.get("message") or "",
    }


class NotificationFailed(Exception):
    pass


def render_notification(policy: dict, context: dict) -> tuple[str, str]:
    template = policy.get("message_template") or DEFAULT_NOTIFICATION_TEMPLATE
    try:
        body = template.format(**{k: ("" if v is None else v) for k, v in context.items()})
    except (ValueError, KeyError, IndexError, AttributeError, TypeError, OverflowError, MemoryError) as exc:
        # a template stored before check_message_template refused it: this send can never succeed
        raise NotificationFailed(
            f"the message template cannot be rendered: {type(exc).__name__}: {exc}"[:300]
        ) from None
    subject = (
        f"Prefect flow run notification: {context['flow_name']}/{context['flow_run_name']} "
        f"entered {context['flow_run_state_name']}"
    )
    return subject, body


# Notification senders: the standard library only (urllib, smtplib). Each service's base URL can be
# pointed elsewhere (Opsgenie EU, a company proxy, a local fake in tests) through a setting.


def _http_send(
    method: str,
    url: str,
    timeout: float,
    json_body=None,
    form=None,
    headers=None,
    params=None,
    raw: bytes | None = None,
):
    if params:
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params, doseq=True)
    headers = dict(headers or {})
    data = None
    if json_body is not None:
        data = dumps(json_body).encode()
        headers.setdefault("Content-Type", "application/json")
    elif form is not None:
        data = urllib.parse.urlencode(form, doseq=True).encode()
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    elif raw is not None:
        data = raw
    headers.setdefault("User-Agent", f"prefectlite/{__version__}")
    if not url.lower().startswith(("http://", "https://")):
        raise NotificationFailed("the URL does not start with http:// or https://")  # the URL itself may be secret
    try:
        host = urllib.parse.urlsplit(url).hostname or "the destination"
    except ValueError:
        host = "the destination"
    try:
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        raise NotificationFailed(f"HTTP {exc.code} from {host}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NotificationFailed(f"cannot reach {host}: {reason}") from None
    except (http.client.InvalidURL, ValueError):  # their messages quote the URL, whose path may be the secret
        raise NotificationFailed(f"cannot send to {host}: the URL is not valid") from None
    except http.client.HTTPException as exc:
        raise NotificationFailed(f"bad answer from {host}: {type(exc).__name__}") from None


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def send_slack(data, subject, body, settings, timeout):
    _http_send("POST", data["url"], timeout, json_body={"text": f"*{subject}*\n{body}"})


def send_teams(data, subject, body, settings, timeout):
    _http_send(
        "POST",
        data["url"],
        timeout,
        json_body={
            "@type": "MessageCard",
            "@context": "https://schema.org/extensions",
            "summary": subject,
            "title": subject,
            "text": body.replace("\n", "<br>"),
        },
    )


def send_opsgenie(data, subject, body, settings, timeout):
    base = settings["PREFECT_NOTIFICATIONS_OPSGENIE_URL"] or (
        "https://api.eu.opsgenie.com" if data.get("region_name") == "eu" else "https://api.opsgenie.com"
    )
    responders = (
        [{"type": "user", "username": u} for u in data.get("target_user") or []]
        + [{"type": "team", "name": t} for t in data.get("target_team") or []]
        + [{"type": "schedule", "name": s} for s in data.get("target_schedule") or []]
        + [{"type": "escalation", "name": e} for e in data.get("target_escalation") or []]
    )
    payload = {
        "message": subject[:130],
        "description": body,
        "responders": responders,
        "tags": data.get("tags") or [],
        "priority": data.get("priority") or "P3",
    }
    for key in ("alias", "entity", "details"):
        if data.get(key):
            payload[key] = data[key]
    _http_send(
        "POST",
        base.rstrip("/") + "/v2/alerts",
        timeout,
        json_body=payload,
        headers={"Authorization": f"GenieKey {data['apikey']}"},
    )


def send_pagerduty(data, subject, body, settings, timeout):
    base = settings["PREFECT_NOTIFICATIONS_PAGERDUTY_URL"] or (
        "https://events.eu.pagerduty.com" if data.get("region_name") == "eu" else "https://events.pagerduty.com"
    )
    payload = {
        "summary": subject[:1024],
        "source": data.get("source") or "Prefect",
        "severity": "info",
        "custom_details": {**(data.get("custom_details") or {}), "body": body},
    }
    for src, dst in (("component", "component"), ("group", "group"), ("class_id", "class")):
        if data.get(src):
            payload[dst] = data[src]
    event = {
        "routing_key": data["integration_key"],
        "event_action": "trigger",
        "payload": payload,
        "client": "prefectlite",
    }
    if data.get("clickable_url"):
        event["client_url"] = data["clickable_url"]
    _http_send(
        "POST",
        base.rstrip("/") + "/v2/enqueue",
        timeout,
        json_body=event,
        headers={"Authorization": f"Token token={data['api_key']}"} if data.get("api_key") else None,
    )


def send_twilio(data, subject, body, settings, timeout):
    base = settings["PREFECT_NOTIFICATIONS_TWILIO_URL"] or "https://api.twilio.com"
    url = f"{base.rstrip('/')}/2010-04-01/Accounts/{urllib.parse.quote(data['account_sid'])}/Messages.json"
    for number in data.get("to_phone_numbers") or []:
        _http_send(
            "POST",
            url,
            timeout,
            form={"From": data["from_phone_number"], "To": number, "Body": body[:1600]},
            headers={"Authorization": _basic(data["account_sid"], data["auth_token"])},
        )


def _fill_placeholders(value, mapping: dict):
    if isinstance(value, str):
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: str(mapping.get(m.group(1), m.group(0))), value)
    if isinstance(value, dict):
        return {k: _fill_placeholders(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_placeholders(v, mapping) for v in value]
    return value


def send_custom_webhook(data, subject, body, settings, timeout):
    mapping = {**(data.get("secrets") or {}), "subject": subject, "body": body, "name": data.get("name", "")}
    headers = _fill_placeholders(data.get("headers") or {}, mapping)
    if data.get("cookies"):
        headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in _fill_placeholders(data["cookies"], mapping).items())
    _http_send(
        (data.get("method") or "POST").upper(),
        _fill_placeholders(data["url"], mapping),
        float(data.get("timeout") or timeout),
        json_body=_fill_placeholders(data["json_data"], mapping) if data.get("json_data") is not None else None,
        form=_fill_placeholders(data["form_data"], mapping) if data.get("form_data") is not None else None,
        headers=headers,
        params=_fill_placeholders(data.get("params") or {}, mapping),
    )


def send_email(data, subject, body, settings, timeout):
    import email.message
    import smtplib

    message = email.message.EmailMessage()
    message["Subject"], message["From"] = subject, data["from_address"]
    message["To"] = ", ".join(data.get("to_addresses") or [])
    message.set_content(body)
    security = data.get("security") or "starttls"
    port = int(data.get("port") or (465 if security == "ssl" else 587))
    try:
        smtp_class = smtplib.SMTP_SSL if security == "ssl" else smtplib.SMTP
        with smtp_class(data["host"], port, timeout=timeout) as smtp:
            if security == "starttls":
                smtp.starttls()
            if data.get("username"):
                smtp.login(data["username"], data.get("password") or "")
            smtp.send_message(message)
    except (smtplib.SMTPException, OSError) as exc:
        raise NotificationFailed(f"SMTP {data['host']}:{port}: {type(exc).__name__}: {exc}") from None


SENDERS = {
    "slack-webhook": send_slack,
    "ms-teams-webhook": send_teams,
    "opsgenie-webhook": send_opsgenie,
    "pager-duty-webhook": send_pagerduty,
    "twilio-sms": send_twilio,
    "custom-webhook": send_custom_webhook,
    "email-smtp": send_email,
}


def deliver(settings: Settings, slug: str, data: dict, subject: str, body: str):
    sender = SENDERS.get(slug)
    if sender is None:
        raise NotificationFailed(f"block type {slug!r} cannot send notifications")
    try:
        sender(data, subject, body, settings, settings["PREFECT_NOTIFICATIONS_TIMEOUT"])
    except KeyError as exc:
        raise NotificationFailed(f"the {slug} block has no {exc.args[0]!r}") from None


def public_ui_url(settings: Settings, running_url: str | None) -> str:
    """Where people open the UI: PREFECT_UI_URL, else derived from PREFECT_API_URL, else our address."""
    if settings["PREFECT_UI_URL"]:
        return settings["PREFECT_UI_URL"]
    api = settings["PREFECT_API_URL"]
    if api:
        return re.sub(r"/api/?$", "", api)
    return running_url or f"http://{settings['PREFECT_SERVER_API_HOST']}:{settings['PREFECT_SERVER_API_PORT']}"


# The UI's page of an object, at the path Prefect's UI uses (our UI answers the 2.20 and 3.x shapes alike).
_UI_PAGES = {
    "flow-run": ("flow-runs/flow-run", "id"),
    "task-run": ("runs/task-run", "id"),
    "flow": ("flows/flow", "id"),
    "deployment": ("deployments/deployment", "id"),
    "work-pool": ("work-pools/work-pool", "name"),
    "automation": ("automations/automation", "id"),
    "block-document": ("blocks/block", "id"),
}


def ui_page_url(base_url: str, kind: str, obj: dict) -> str:
    """The UI's page of a flow run, task run, flow, deployment, work pool, automation or block; the UI's root
    for a kind without a page of its own (a work queue)."""
    root = base_url.rstrip("/")
    page, key = _UI_PAGES.get(kind, (None, None))
    if page is None or not obj.get(key):
        return f"{root}/"
    return f"{root}/{page}/{urllib.parse.quote(str(obj[key]), safe='')}"


def prepare_notification(tx, row: dict, settings: Settings, base_url: str):
    """(slug, data, subject, body) for a queued row, or None when its policy or state is gone."""
    policy = tx.query_one(
        "SELECT * FROM flow_run_notification_policy WHERE id = ?", (row["flow_run_notification_policy_id"],)
    )
    state = tx.query_one("SELECT * FROM flow_run_state WHERE id = ?", (row["flow_run_state_id"],))
    if policy is None or state is None:
        return None
    doc = tx.query_one("SELECT * FROM block_document WHERE id = ?", (policy["block_document_id"],))
    if doc is None:
        return None
    full = block_document_out(tx, doc, include_secrets=True)
    subject, body = render_notification(
        decode_row("flow_run_notification_policy", policy), notification_context(tx, policy, state, base_url)
    )
    about = {
        "flow_run_notification_policy_id": policy["id"],
        "flow_run_id": state["flow_run_id"],
        "state_name": state["name"],
        "destination": f"{doc['name']} ({full['block_type']['name']})",
    }
    return full["block_type"]["slug"], full["data"], subject, body, about


NOTIFICATION_DELIVERIES_KEPT = 1000  # per policy: the history stays bounded


def record_delivery(tx, about: dict, attempt: int, status: str, error: str | None = None):
    """One attempt to deliver a notification: SENT, RETRYING (failed, tried again later) or FAILED (given up)."""
    policy_id = about["flow_run_notification_policy_id"]
    insert_row(
        tx,
        "flow_run_notification_delivery",
        {"id": new_id(), "created": now_iso(), **about, "attempt": attempt, "status": status, "error": error},
    )
    tx.execute(
        "DELETE FROM flow_run_notification_delivery WHERE flow_run_notification_policy_id = ? AND id NOT IN "
        "(SELECT id FROM (SELECT id FROM flow_run_notification_delivery "
        "WHERE flow_run_notification_policy_id = ? ORDER BY created DESC LIMIT ?) kept)",
        (policy_id, policy_id, NOTIFICATION_DELIVERIES_KEPT),
    )


# --- 15. Templates ---
# Owns the safe renderer of the Jinja subset automation actions are written in.

# Templates: the Jinja subset Prefect's docs show ({{ flow_run.name }}, {{ event.resource.id }}, filters
# such as default and upper, {% if %} and {% for %}), rendered over plain data only: no attribute of a
# Python object is reachable and nothing is called but the filters below, so a template cannot run code.


class TemplateError(ValueError):
    pass


# A template is data a client sends, so rendering one has a budget: output characters and loop iterations per
# render (replace and join grow text, nested loops multiply), and how deep expressions and tags nest.
TEMPLATE_MAX_OUTPUT = 100_000
TEMPLATE_MAX_LOOPS = 10_000
TEMPLATE_MAX_DEPTH = 50
_TEMPLATE_BUDGET = contextvars.ContextVar("template_budget", default=None)  # [characters, iterations] spent


def _spend_template_budget(characters: int = 0, iterations: int = 0) -> None:
    budget = _TEMPLATE_BUDGET.get()
    if budget is None:
        return
    budget[0] += characters
    budget[1] += iterations
    if budget[0] > TEMPLATE_MAX_OUTPUT:
        raise TemplateError(f"the template renders more than {TEMPLATE_MAX_OUTPUT} characters")
    if budget[1] > TEMPLATE_MAX_LOOPS:
        raise TemplateError(f"the template loops more than {TEMPLATE_MAX_LOOPS} times")


def _capped_text(text: str) -> str:
    if len(text) > TEMPLATE_MAX_OUTPUT:
        raise TemplateError(f"a filter made more than {TEMPLATE_MAX_OUTPUT} characters")
    return text


_TEMPLATE_TAG = re.compile(r"\{\{(.*?)\}\}|\{%-?(.*?)-?%\}|\{#.*?#\}", re.DOTALL)
_TEMPLATE_TOKEN = re.compile(
    r"\s*(?:(\d+\.\d+|\d+)|('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")|"
    r"(==|!=|<=|>=|<|>|\||\.|\(|\)|\[|\]|,)|([A-Za-z_][A-Za-z0-9_]*))"
)


class _Undefined:
    """A missing name or key: renders as nothing, is false, and `default` replaces it."""

    def __str__(self):
        return ""

    def __bool__(self):
        return False


UNDEFINED = _Undefined()


def _tokens(text: str) -> list:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        found = _TEMPLATE_TOKEN.match(text, pos)
        if not found:
            raise TemplateError(f"unexpected {text[pos:].strip()[:20]!r}")
        number, literal, op, name = found.groups()
        if number is not None:
            out.append(("lit", _number_literal(number)))
        elif literal is not None:
            out.append(("lit", _string_literal(literal)))
        elif op is not None:
            out.append(("op", op))
        else:
            out.append(
                ("lit", {"true": True, "false": False, "none": None}[name.lower()])
                if name.lower() in ("true", "false", "none")
                else ("name", name)
            )
        pos = found.end()
    return out


def _number_literal(text: str):
    try:
        return float(text) if "." in text else int(text)
    except ValueError:  # more digits than Python converts
        raise TemplateError(f"the number {text[:20]}... is too long") from None


def _string_literal(text: str) -> str:
    try:
        return text[1:-1].encode().decode("unicode_escape")
    except UnicodeDecodeError as exc:
        raise TemplateError(f"invalid escape in {text[:20]!r}: {exc.reason}") from None


def _tree_depth(node) -> int:
    """How deep an expression tree nests (evaluating it recurses this deep), without recursing."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack += [(child, depth + 1) for child in node[1:] if isinstance(child, tuple)]
        stack += [(arg, depth + 1) for child in node[1:] if isinstance(child, list) for arg in child]
    return deepest


class _Expression:
    """A parsed expression: or / and / not / comparisons / filters / names, keys, indexes and literals."""

    def __init__(self, text: str):
        self.tokens, self.pos, self.depth = _tokens(text), 0, 0
        if not self.tokens:
            raise TemplateError("empty expression")
        self.tree = self._or()
        if self.pos != len(self.tokens):
            raise TemplateError(f"unexpected {self.tokens[self.pos][1]!r}")
        if _tree_depth(self.tree) > 2 * TEMPLATE_MAX_DEPTH:
            raise TemplateError(f"the expression nests more than {2 * TEMPLATE_MAX_DEPTH} deep")

    def _peek(self, *wanted):
        token = self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)
        return token if not wanted or token[1] in wanted else None

    def _take(self, value=None):
        token = self._peek()
        if token[0] is None or (value is not None and token[1] != value):
            raise TemplateError(f"expected {value!r}" if value else "unexpected end of expression")
        self.pos += 1
        return token

    def _or(self):
        node = self._and()
        while self._peek("or"):
            self.pos += 1
            node = ("or", node, self._and())
        return node

    def _and(self):
        node = self._not()
        while self._peek("and"):
            self.pos += 1
            node = ("and", node, self._not())
        return node

    def _not(self):
        # every nesting (not, parentheses, keys, filter arguments) passes here: parsing recurses no deeper
        self.depth += 1
        if self.depth > TEMPLATE_MAX_DEPTH:
            raise TemplateError(f"the expression nests more than {TEMPLATE_MAX_DEPTH} deep")
        try:
            if self._peek("not"):
                self.pos += 1
                return ("not", self._not())
            return self._compare()
        finally:
            self.depth -= 1

    def _compare(self):
        node = self._filtered()
        token = self._peek("==", "!=", "<", ">", "<=", ">=", "in", "not")
        if token:
            self.pos += 1
            op = token[1]
            if op == "not":
                self._take("in")
                op = "not in"
            node = ("cmp", op, node, self._filtered())
        return node

    def _filtered(self):
        node = self._primary()
        while self._peek("|"):
            self.pos += 1
            name = self._take()
            if name[0] != "name" or name[1] not in TEMPLATE_FILTERS:
                raise TemplateError(f"unknown filter {name[1]!r}")
            args = []
            if self._peek("("):
                self.pos += 1
                while not self._peek(")"):
                    args.append(self._or())
                    if not self._peek(")"):
                        self._take(",")
                self._take(")")
            node = ("filter", name[1], node, args)
        return node

    def _primary(self):
        kind, value = self._take()
        if kind == "lit":
            node = ("lit", value)
        elif kind == "name":
            node = ("name", value)
        elif value == "(":
            node = self._or()
            self._take(")")
        else:
            raise TemplateError(f"unexpected {value!r}")
        while self._peek(".", "["):
            if self._take()[1] == ".":
                attr = self._take()
                if attr[0] != "name" and not isinstance(attr[1], int):
                    raise TemplateError("expected a name after '.'")
                node = ("get", node, ("lit", attr[1]))
            else:
                node = ("get", node, self._or())
                self._take("]")
        return node

    def evaluate(self, context: dict):
        return _evaluate(self.tree, context)


_COMPARISONS = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
    "in": lambda a, b: a in b,
    "not in": lambda a, b: a not in b,
}


def _evaluate(node, context):
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "name":
        return context.get(node[1], UNDEFINED)
    if kind == "get":
        return _template_get(_evaluate(node[1], context), _evaluate(node[2], context))
    if kind == "or":
        return _evaluate(node[1], context) or _evaluate(node[2], context)
    if kind == "and":
        return _evaluate(node[1], context) and _evaluate(node[2], context)
    if kind == "not":
        return not _evaluate(node[1], context)
    if kind == "cmp":
        try:
            return _COMPARISONS[node[1]](_evaluate(node[2], context), _evaluate(node[3], context))
        except TypeError:
            return False
    value = _evaluate(node[2], context)
    return TEMPLATE_FILTERS[node[1]](context, value, *(_evaluate(a, context) for a in node[3]))


def _template_get(value, key):
    """Only keys of dicts and indexes of lists: never a Python attribute."""
    if isinstance(value, dict):
        return value.get(key, UNDEFINED)
    if isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value):
        return value[key]
    return UNDEFINED


def _template_str(value) -> str:
    if value is None or value is UNDEFINED:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (dict, list)):
        return dumps(value)
    return str(value)


def _ui_url(context, value, *_):
    """The UI's page for a flow run, deployment, flow, work pool or automation (Prefect's ui_url filter)."""
    if not isinstance(value, dict) or "id" not in value:
        return ""
    kind = value.get("__kind__") or ("automation" if "trigger" in value else "flow-run")
    return ui_page_url(context.get("__ui_url__", ""), kind, value)


def _template_replace(value, old, new) -> str:
    text, old, new = _template_str(value), _template_str(old), _template_str(new)
    grows = (len(new) - len(old)) * (text.count(old) if old else len(text) + 1)
    if len(text) + grows > TEMPLATE_MAX_OUTPUT:  # refused before it is made: replace can grow text a lot
        raise TemplateError(f"replace would make more than {TEMPLATE_MAX_OUTPUT} characters")
    return text.replace(old, new)


def _template_int(value) -> int:
    """Jinja's int filter: a number, or a string of decimal digits; anything else is 0."""
    try:
        if isinstance(value, (int, float)):
            return int(value)
        if isinstance(value, str) and value.strip().isdecimal():
            return int(value.strip())
    except (ValueError, OverflowError):  # inf, nan, more digits than Python converts
        pass
    return 0


TEMPLATE_FILTERS = {
    "default": lambda _c, v, fallback="", boolean=False: fallback if v is UNDEFINED or (boolean and not v) else v,
    "d": lambda _c, v, fallback="", boolean=False: fallback if v is UNDEFINED or (boolean and not v) else v,
    "upper": lambda _c, v: _template_str(v).upper(),
    "lower": lambda _c, v: _template_str(v).lower(),
    "title": lambda _c, v: _template_str(v).title(),
    "capitalize": lambda _c, v: _template_str(v).capitalize(),
    "trim": lambda _c, v: _template_str(v).strip(),
    "string": lambda _c, v: _template_str(v),
    "length": lambda _c, v: len(v) if isinstance(v, (str, list, dict)) else 0,
    "count": lambda _c, v: len(v) if isinstance(v, (str, list, dict)) else 0,
    "tojson": lambda _c, v: dumps(None if v is UNDEFINED else v),
    "replace": lambda _c, v, old, new: _template_replace(v, old, new),
    "join": lambda _c, v, sep="": (
        _capped_text(_template_str(sep).join(_template_str(x) for x in v)) if isinstance(v, list) else ""
    ),
    "first": lambda _c, v: v[0] if isinstance(v, list) and v else UNDEFINED,
    "last": lambda _c, v: v[-1] if isinstance(v, list) and v else UNDEFINED,
    "int": lambda _c, v: _template_int(v),
    "ui_url": _ui_url,
}


def parse_template(text: str) -> list:
    """A template as a tree: text, ("out", expr), ("if", [(expr, body)...], else body), ("for", name, expr, body)."""
    root: list = []
    stack = [("root", root)]
    pos = 0
    for found in _TEMPLATE_TAG.finditer(text):
        if len(stack) > TEMPLATE_MAX_DEPTH:
            raise TemplateError(f"tags nest more than {TEMPLATE_MAX_DEPTH} deep")
        if found.start() > pos:
            stack[-1][1].append(text[pos : found.start()])
        pos = found.end()
        output, statement = found.group(1), found.group(2)
        if output is not None:
            stack[-1][1].append(("out", _Expression(output)))
        elif statement is not None:
            _template_statement(statement.strip(), stack)
    if len(stack) > 1:
        raise TemplateError(f"unclosed {{% {stack[-1][0]} %}}")
    if pos < len(text):
        root.append(text[pos:])
    if any(isinstance(n, str) and ("{{" in n or "{%" in n) for n in _template_texts(root)):
        raise TemplateError("a tag is not closed")
    return root


def _template_texts(nodes: list):
    for node in nodes:
        if isinstance(node, str):
            yield node
        elif node[0] == "if":
            for _expr, body in node[1]:
                yield from _template_texts(body)
            yield from _template_texts(node[2] or [])
        elif node[0] == "for":
            yield from _template_texts(node[3])


def _template_statement(statement: str, stack: list) -> None:
    word, _, rest = statement.partition(" ")
    if word == "if":
        node = ["if", [(_Expression(rest), [])], None]
        stack[-1][1].append(node)
        stack.append(("if", node[1][0][1], node))
    elif word in ("elif", "else"):
        if stack[-1][0] != "if":
            raise TemplateError(f"{{% {word} %}} outside {{% if %}}")
        node = stack.pop()[2]
        body: list = []
        if word == "elif":
            node[1].append((_Expression(rest), body))
        else:
            node[2] = body
        stack.append(("if", body, node))
    elif word == "for":
        found = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s+in\s+(.+)", rest.strip(), re.DOTALL)
        if not found:
            raise TemplateError("expected {% for name in expression %}")
        node = ["for", found.group(1), _Expression(found.group(2)), []]
        stack[-1][1].append(node)
        stack.append(("for", node[3], node))
    elif word in ("endif", "endfor"):
        if stack[-1][0] != word[3:]:
            raise TemplateError(f"unexpected {{% {word} %}}")
        stack.pop()
    else:
        raise TemplateError(f"unsupported statement {{% {word} %}}")


def render_template(text: str, context: dict) -> str:
    token = _TEMPLATE_BUDGET.set([0, 0])
    try:
        return "".join(_render_nodes(parse_template(text), context))
    finally:
        _TEMPLATE_BUDGET.reset(token)


def _render_nodes(nodes: list, context: dict):
    for node in nodes:
        if isinstance(node, str):
            _spend_template_budget(len(node))
            yield node
        elif node[0] == "out":
            text = _template_str(node[1].evaluate(context))
            _spend_template_budget(len(text))
            yield text
        elif node[0] == "if":
            body = next((b for expr, b in node[1] if expr.evaluate(context)), node[2] or [])
            yield from _render_nodes(body, context)
        else:
            items = node[2].evaluate(context)
            for item in items if isinstance(items, list) else list(items) if isinstance(items, dict) else []:
                _spend_template_budget(iterations=1)
                yield from _render_nodes(node[3], {**context, node[1]: item})


def check_template(text: str, loc) -> None:
    try:
        parse_template(text)
    except (TemplateError, ValueError, RecursionError) as exc:  # the parser's own limits are TemplateErrors
        raise ValidationFailed([_error(loc, f"{text[:80]!r} is not a valid template: {exc}", "value_error")]) from None


def _maybe_template(text) -> bool:
    return isinstance(text, str) and ("{{" in text or "{%" in text)


def _jinja_values(value, path=()):
    """(path, template) of each template in run-deployment parameters: `{"__prefect_kind": "jinja", ...}`
    values and plain strings with template syntax (Prefect's "v1" templates)."""
    if isinstance(value, dict):
        if value.get("__prefect_kind") == "jinja" and isinstance(value.get("template"), str):
            yield path, value["template"]
            return
        for key, item in value.items():
            yield from _jinja_values(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _jinja_values(item, (*path, i))
    elif _maybe_template(value):
        yield path, value


_SINGLE_EXPRESSION = re.compile(r"^\s*\{\{(.*)\}\}\s*$", re.DOTALL)


def hydrate(value, context: dict):
    """Prefect's hydration of run-deployment parameters and job variables: a `jinja` value renders to a
    string, a `json` value is parsed, a `none` value is its inner value; a plain string that is one
    {{ expression }} keeps the expression's type, one with text around it renders to a string."""
    if isinstance(value, dict):
        kind = value.get("__prefect_kind")
        if kind is None:
            return {k: hydrate(v, context) for k, v in value.items()}
        if kind == "jinja":
            return render_template(value.get("template") or "", context)
        if kind == "json":
            inner = hydrate(value["value"], context) if isinstance(value.get("value"), dict) else value.get("value")
            if not isinstance(inner, str):
                return inner
            try:
                return loads(inner)
            except ValueError as exc:
                raise TemplateError(f"invalid JSON: {exc}") from None
        if kind == "none":
            return hydrate(value.get("value"), context)
        if kind == "workspace_variable":
            raise TemplateError("workspace variables in parameters are not supported by this server")
        return value.get("value")
    if isinstance(value, list):
        return [hydrate(v, context) for v in value]
    if _maybe_template(value):
        single = _SINGLE_EXPRESSION.match(value)
        if single and value.count("{{") == 1:
            result = _Expression(single.group(1)).evaluate(context)
            return None if result is UNDEFINED else result
        return render_template(value, context)
    return value


# --- 16. Automations ---
# Owns automations: their tables, validation and API operations, their trigger buckets' rows, and their history.

# Automations: rules that watch the event stream (triggers) and act on it (actions), as Prefect 3 and the
# Prefect 2.20 server define them. Owns the automation tables (migration 0008): the automations and the
# resources they relate to, each trigger's durable buckets (a window's count survives a restart and is
# shared by replicas), the child firings of compound and sequence triggers, and the queue of actions a
# firing owes. Triggers are evaluated in the transaction that stores an event; the AutomationActor
# service (section 18) runs the queued actions (one replica claims each) and evaluates proactive triggers.

AUTOMATION_MAX_TRIGGER_DEPTH = 10  # compound triggers nest; deeper bodies are refused
AUTOMATION_MAX_EVENT_DEPTH = 3  # an automation's own events may trigger automations, this many levels deep
AUTOMATION_PROACTIVE_MIN_WITHIN = 10.0  # seconds: Prefect's minimum window for a proactive trigger
AUTOMATION_MAX_WITHIN = 365 * 86400.0  # seconds: a longer window would overflow the dates a bucket stores
AUTOMATION_LOOKBACK = _dt.timedelta(minutes=15)  # a first bucket also counts events this much older (as Prefect)
AUTOMATION_HISTORY_DAYS = 7  # done and failed actions stay this long, for the action history
_AUTOMATION_DEPTH = contextvars.ContextVar("automation_depth", default=0)
TRIGGER_TYPES = ("event", "compound", "sequence")
_ACTION_SOURCE = Field(Enum("ActionSource", ("selected", "inferred")), default="selected", nullable=False)
# fmt: off
ACTION_SCHEMAS = {
    "do-nothing": Schema("DoNothing", {}),
    "run-deployment": Schema("RunDeployment", {
        "source": _ACTION_SOURCE, "deployment_id": Field("uuid"), "parameters": Field("object"),
        "job_variables": Field("object"), "schedule_after": Field("any")}),
    "pause-deployment": Schema("PauseDeployment", {"source": _ACTION_SOURCE, "deployment_id": Field("uuid")}),
    "resume-deployment": Schema("ResumeDeployment", {"source": _ACTION_SOURCE, "deployment_id": Field("uuid")}),
    "cancel-flow-run": Schema("CancelFlowRun", {}),
    "suspend-flow-run": Schema("SuspendFlowRun", {}),
    "resume-flow-run": Schema("ResumeFlowRun", {}),
    "delete-flow-run": Schema("DeleteFlowRun", {}),
    "change-flow-run-state": Schema("ChangeFlowRunState", {
        "name": Field("str"), "state": Field(StateType, required=True, nullable=False), "message": Field("str"),
        "force": Field("bool")}),
    "send-notification": Schema("SendNotification", {
        "block_document_id": Field("uuid", required=True, nullable=False),
        "subject": Field("str", default="Prefect automated notification", nullable=False),
        "body": Field("str", required=True, nullable=False)}),
    "call-webhook": Schema("CallWebhook", {
        "block_document_id": Field("uuid", required=True, nullable=False), "payload": Field("any", default="")}),
    "pause-work-pool": Schema("PauseWorkPool", {"source": _ACTION_SOURCE, "work_pool_id": Field("uuid")}),
    "resume-work-pool": Schema("ResumeWorkPool", {"source": _ACTION_SOURCE, "work_pool_id": Field("uuid")}),
    "pause-work-queue": Schema("PauseWorkQueue", {"source": _ACTION_SOURCE, "work_queue_id": Field("uuid")}),
    "resume-work-queue": Schema("ResumeWorkQueue", {"source": _ACTION_SOURCE, "work_queue_id": Field("uuid")}),
    "pause-automation": Schema("PauseAutomation", {"source": _ACTION_SOURCE, "automation_id": Field("uuid")}),
    "resume-automation": Schema("ResumeAutomation", {"source": _ACTION_SOURCE, "automation_id": Field("uuid")}),
}
# fmt: on
_ACTION_TARGET_FIELDS = ("deployment_id", "work_pool_id", "work_queue_id", "automation_id")
AUTOMATION_FIELDS = {
    "name": Field("str", required=True, nullable=False, max_length=5000),
    "description": Field("str", default="", nullable=False),
    "enabled": Field("bool", default=True, nullable=False),
    "tags": Field(ListOf("str"), default=list, nullable=False),
    "trigger": Field(
        "object", required=True, nullable=False, description="an EventTrigger, CompoundTrigger or SequenceTrigger"
    ),
    "actions": Field(ListOf("object"), required=True, nullable=False),
    "actions_on_trigger": Field(ListOf("object"), default=list, nullable=False),
    "actions_on_resolve": Field(ListOf("object"), default=list, nullable=False),
}
AutomationCreate = Schema("AutomationCreate", {**AUTOMATION_FIELDS, "owner_resource": Field("str")})
AutomationUpdate = Schema("AutomationUpdate", AUTOMATION_FIELDS)
AutomationPartialUpdate = Schema("AutomationPartialUpdate", {"enabled": Field("bool", default=True, nullable=False)})
AutomationFilterBody = Schema(
    "Body_read_automations",
    {
        "sort": Field(
            Enum("AutomationSort", ("CREATED_DESC", "UPDATED_DESC", "NAME_ASC", "NAME_DESC")), default="NAME_ASC"
        ),
        "limit": Field("int", minimum=0),
        "offset": Field("int", default=0, minimum=0),
        "automations": Field("object", description="an AutomationFilter: name.any_, created.before_, tags"),
    },
)


def _no_unknown_fields(data: dict, schema: Schema, loc) -> None:
    """Prefect's automation bodies forbid fields they do not define (a misspelt field is an error)."""
    unknown = [key for key in data if key not in schema.fields]
    if unknown:
        raise ValidationFailed(
            [_error((*loc, key), "extra fields not permitted", "value_error.extra") for key in unknown]
        )


def _seconds_field(value, loc) -> float:
    """A timedelta as clients send it: seconds (Prefect 2) or ISO 8601 (Prefect 3's JSON), never negative."""
    try:
        seconds = _seconds(value) if isinstance(value, str) else _validate_kind("float", value, loc)
    except (ValueError, TypeError, OverflowError):
        raise ValidationFailed([_error(loc, "invalid duration", "type_error.duration")]) from None
    if seconds < 0:
        raise ValidationFailed([_error(loc, "The minimum within is 0 seconds", "value_error")])
    if not seconds <= AUTOMATION_MAX_WITHIN:
        raise ValidationFailed(
            [_error(loc, f"The maximum within is {AUTOMATION_MAX_WITHIN:.0f} seconds (365 days)", "value_error")]
        )
    return seconds


def _resource_spec(value, loc) -> dict:
    """A ResourceSpecification (label -> value or list of values), kept as sent."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationFailed([_error(loc, "value is not a valid dict", "type_error.dict")])
    for label, patterns in value.items():
        if not isinstance(patterns, str):
            _validate_kind(_STRS, patterns, (*loc, label))
    return value


def _label_set(value, loc) -> list[str]:
    return sorted(set(_validate_kind(_STRS, value, loc))) if value is not None else []


def validate_trigger(data, loc=("body", "trigger"), depth: int = 0) -> dict:
    """A trigger in our canonical form, with a fresh id (the server assigns trigger ids, as Prefect's does)."""
    if depth > AUTOMATION_MAX_TRIGGER_DEPTH:
        raise ValidationFailed(
            [_error(loc, f"triggers nest at most {AUTOMATION_MAX_TRIGGER_DEPTH} deep", "value_error")]
        )
    if not isinstance(data, dict):
        raise ValidationFailed([_error(loc, "value is not a valid dict", "type_error.dict")])
    kind = data.get("type", "event")
    if kind not in TRIGGER_TYPES:
        raise ValidationFailed(
            [
                _error(
                    (*loc, "type"),
                    f"unsupported trigger type {kind!r}; this server evaluates {', '.join(TRIGGER_TYPES)} triggers",
                    "value_error.const",
                )
            ]
        )
    if kind == "event":
        return _validate_event_trigger(data, loc)
    triggers = data.get("triggers")
    if not isinstance(triggers, list) or not triggers:
        raise ValidationFailed(
            [
                _error(
                    (*loc, "triggers"),
                    "a non-empty list of triggers is required",
                    "value_error.missing" if triggers is None else "type_error.list",
                )
            ]
        )
    out = {
        "type": kind,
        "id": new_id(),
        "triggers": [validate_trigger(t, (*loc, "triggers", i), depth + 1) for i, t in enumerate(triggers)],
        "within": None if data.get("within") is None else _seconds_field(data["within"], (*loc, "within")),
    }
    if kind == "compound":
        require = data.get("require")
        if require not in ("any", "all") and (isinstance(require, bool) or not isinstance(require, int)):
            raise ValidationFailed(
                [
                    _error(
                        (*loc, "require"),
                        "require must be 'any', 'all' or a number of triggers",
                        "value_error.missing" if require is None else "type_error",
                    )
                ]
            )
        if isinstance(require, int) and not 1 <= require <= len(triggers):
            raise ValidationFailed(
                [
                    _error(
                        (*loc, "require"),
                        "required must be at least 1 and at most the number of triggers",
                        "value_error",
                    )
                ]
            )
        out["require"] = require
    return out


def _validate_event_trigger(data: dict, loc) -> dict:
    posture = data.get("posture")
    if posture not in ("Reactive", "Proactive"):
        raise ValidationFailed(
            [
                _error(
                    (*loc, "posture"),
                    "posture must be 'Reactive' or 'Proactive' (metric triggers are not evaluated by this server)",
                    "value_error.missing" if posture is None else "value_error.const",
                )
            ]
        )
    threshold = _validate_kind("int", data.get("threshold", 1), (*loc, "threshold"))
    within = _seconds_field(data.get("within", 0) or 0, (*loc, "within"))
    if posture == "Proactive":
        if within == 0:
            within = AUTOMATION_PROACTIVE_MIN_WITHIN
        elif within < AUTOMATION_PROACTIVE_MIN_WITHIN:
            raise ValidationFailed(
                [_error((*loc, "within"), "The minimum within for Proactive triggers is 10 seconds", "value_error")]
            )
    match_related = data.get("match_related")
    if isinstance(match_related, list):  # Prefect 3: every one of several related specifications must match
        match_related = [_resource_spec(m, (*loc, "match_related", i)) for i, m in enumerate(match_related)]
    else:
        match_related = _resource_spec(match_related, (*loc, "match_related"))
    return {
        "type": "event",
        "id": new_id(),
        "match": _resource_spec(data.get("match"), (*loc, "match")),
        "match_related": match_related,
        "after": _label_set(data.get("after"), (*loc, "after")),
        "expect": _label_set(data.get("expect"), (*loc, "expect")),
        "for_each": _label_set(data.get("for_each"), (*loc, "for_each")),
        "posture": posture,
        "threshold": threshold,
        "within": within,
    }


def all_triggers(trigger: dict) -> list[dict]:
    """The trigger and every trigger nested in it, parents first."""
    out = [trigger]
    for child in trigger.get("triggers") or ():
        out += all_triggers(child)
    return out


def validate_action(data, loc) -> dict:
    if not isinstance(data, dict):
        raise ValidationFailed([_error(loc, "value is not a valid dict", "type_error.dict")])
    kind = data.get("type")
    schema = ACTION_SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise ValidationFailed(
            [
                _error(
                    (*loc, "type"),
                    f"unknown action type {kind!r}; one of {', '.join(ACTION_SCHEMAS)}",
                    "value_error.const",
                )
            ]
        )
    action = schema.validate(data, loc)
    for target in _ACTION_TARGET_FIELDS:
        if target in schema.fields and (action["source"] == "selected") != bool(action.get(target)):
            problem = "not allowed" if action.get(target) else "required"
            raise ValidationFailed([_error((*loc, target), f"{target} is {problem}", "value_error")])
    if kind == "call-webhook" and not isinstance(action["payload"], str):
        action["payload"] = json.dumps(action["payload"], indent=2)  # older UIs sent {"message": ...}
    for field in ("subject", "body", "payload"):
        if isinstance(action.get(field), str):
            check_template(action[field], (*loc, field))
    for field in ("parameters", "job_variables"):
        for path, template in _jinja_values(action.get(field) or {}):
            check_template(template, (*loc, field, *path))
    return {"type": kind, **{k: v for k, v in action.items() if v is not None}}


def validate_automation(data: dict, sent: dict, schema: Schema) -> dict:
    """The trigger and actions of a create or update body, checked (422s name the field)."""
    _no_unknown_fields(sent, schema, ("body",))
    out = dict(data)
    out["trigger"] = validate_trigger(data["trigger"])
    for key in ("actions", "actions_on_trigger", "actions_on_resolve"):
        out[key] = [validate_action(a, ("body", key, i)) for i, a in enumerate(data[key] or [])]
    _refuse_run_deployment_loops(out)
    return out


_LOOPING_EVENTS = {
    "prefect.flow-run.Scheduled",
    "prefect.flow-run.Pending",
    "prefect.flow-run.Running",
    "prefect.flow-run.*",
}


def _refuse_run_deployment_loops(automation: dict) -> None:
    """Prefect's guard: running a deployment on every flow run's Scheduled/Pending/Running runs forever."""
    trigger = automation["trigger"]
    if not automation["enabled"] or trigger["type"] != "event" or trigger["posture"] != "Reactive":
        return
    if not _LOOPING_EVENTS & set(trigger["expect"]):
        return
    unfiltered = all(
        not spec
        or set(spec) <= {"prefect.resource.id"}
        and all(p in ("prefect.flow-run.*", "*") for p in _patterns(spec.get("prefect.resource.id", "*")))
        for spec in (
            trigger["match"],
            *(trigger["match_related"] if isinstance(trigger["match_related"], list) else [trigger["match_related"]]),
        )
    )
    for i, action in enumerate(automation["actions"]):
        if action["type"] != "run-deployment":
            continue
        if action["source"] == "inferred" or unfiltered:
            raise ValidationFailed(
                [
                    _error(
                        ("body", "actions", i),
                        "Running a deployment from a flow run state change "
                        "event may lead to an infinite loop of flow runs. Choose a specific "
                        "deployment and add filtering labels to the trigger's match or "
                        "match_related.",
                        "value_error",
                    )
                ]
            )


def _patterns(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def automation_out(row: dict) -> dict:
    a = decode_row("automation", row)
    return {
        "id": a["id"],
        "created": a["created"],
        "updated": a["updated"],
        "name": a["name"],
        "description": a["description"],
        "enabled": a["enabled"],
        "tags": a["tags"],
        "trigger": a["trigger"],
        "actions": a["actions"],
        "actions_on_trigger": a["actions_on_trigger"],
        "actions_on_resolve": a["actions_on_resolve"],
    }


def _find_label(event: dict, label: str) -> str:
    """A label of the event's resource, or `related:<role>:<label>` of its first related resource in a role."""
    if label.startswith("related:"):
        _, role, name = (label.split(":", 2) + ["", ""])[:3]
        for related in event["related"]:
            if related.get("prefect.resource.role") == role:
                return related.get(name) or ""
        return ""
    return event["resource"].get(label) or ""


def _bucketing_key(trigger: dict, event: dict | None) -> str:
    return dumps([_find_label(event, label) if event else "" for label in trigger["for_each"]])


def _ensure_bucket(tx, automation, trigger, key, start, end, last_event, count=0) -> dict:
    """The open bucket for a trigger and key, made if there is none; locked, so replicas count in turn.
    (A bucket another replica deleted while this one waited for its lock is made again.)"""
    for _attempt in range(5):
        now = now_iso()
        insert_row(
            tx,
            "automation_bucket",
            {
                "automation_id": automation["id"],
                "trigger_id": trigger["id"],
                "bucketing_key": key,
                "posture": trigger["posture"],
                "created": now,
                "updated": now,
                "start_time": iso(start),
                "end_time": iso(end),
                "count": count,
                "last_event": last_event,
                "triggering_labels": {},
            },
            on_conflict="ON CONFLICT DO NOTHING",
        )
        bucket = _read_bucket(tx, automation["id"], trigger["id"], key)
        if bucket is not None:
            return bucket
    raise DatabaseUnavailable("an automation bucket kept being removed by another server; try again")


def _read_bucket(tx, automation_id: str, trigger_id: str, key: str) -> dict | None:
    row = tx.query_one(
        "SELECT * FROM automation_bucket WHERE automation_id = ? AND trigger_id = ? AND "
        f"bucketing_key = ?{tx.db.for_update}",
        (automation_id, trigger_id, key),
    )
    return decode_row("automation_bucket", row)


def _start_proactive_buckets(tx, automation: dict, now: _dt.datetime) -> None:
    """A proactive trigger without `after` watches from now on (one window per for_each key once events come)."""
    for trigger in all_triggers(automation["trigger"]):
        if (
            trigger["type"] == "event"
            and trigger["posture"] == "Proactive"
            and not trigger["after"]
            and not trigger["for_each"]
        ):
            _ensure_bucket(
                tx,
                automation,
                trigger,
                _bucketing_key(trigger, None),
                now,
                now + _dt.timedelta(seconds=trigger["within"]),
                None,
            )


def create_automation(tx, data: dict, owner_resource: str | None = None) -> dict:
    now, automation_id = now_iso(), new_id()
    insert_row(
        tx,
        "automation",
        {"id": automation_id, "created": now, "updated": now, **{k: data[k] for k in AUTOMATION_FIELDS}},
    )
    if owner_resource:
        insert_row(
            tx,
            "automation_related_resource",
            {
                "id": new_id(),
                "created": now,
                "updated": now,
                "automation_id": automation_id,
                "resource_id": owner_resource,
                "automation_owned_by_resource": True,
            },
        )
    automation = automation_out(read_row(tx, "automation", automation_id))
    _start_proactive_buckets(tx, automation, utcnow())
    return automation


def update_automation(tx, automation_id: str, changes: dict) -> None:
    """Replace or patch an automation; its triggers start counting afresh (their buckets go)."""
    require_row(tx, "automation", automation_id, "Automation", lock=True)
    update_row(tx, "automation", automation_id, {**changes, "updated": now_iso()})
    _forget_trigger_state(tx, automation_id)
    automation = automation_out(read_row(tx, "automation", automation_id))
    if automation["enabled"]:
        _start_proactive_buckets(tx, automation, utcnow())


def _forget_trigger_state(tx, automation_id: str) -> None:
    tx.execute("DELETE FROM automation_bucket WHERE automation_id = ?", (automation_id,))
    tx.execute("DELETE FROM automation_child_firing WHERE automation_id = ?", (automation_id,))


def delete_automation(tx, automation_id: str) -> bool:
    _forget_trigger_state(tx, automation_id)
    tx.execute("DELETE FROM automation_related_resource WHERE automation_id = ?", (automation_id,))
    return bool(tx.execute("DELETE FROM automation WHERE id = ?", (automation_id,)).rowcount)


def read_automations(tx, body: dict) -> list[dict]:
    where, params = _automation_filter(body.get("automations") or {})
    order = {
        "CREATED_DESC": "created DESC",
        "UPDATED_DESC": "updated DESC",
        "NAME_ASC": "name ASC",
        "NAME_DESC": "name DESC",
    }[body.get("sort") or "NAME_ASC"]
    sql = f"SELECT * FROM automation WHERE {where} ORDER BY {order}, id"
    if body.get("limit") is not None:
        sql, params = sql + " LIMIT ?", [*params, body["limit"]]
    elif body.get("offset"):
        sql, params = sql + " LIMIT ?", [*params, 2**62]
    if body.get("offset"):
        sql, params = sql + " OFFSET ?", [*params, body["offset"]]
    return [automation_out(row) for row in tx.query(sql, params)]


def _automation_filter(flt: dict) -> tuple[str, list]:
    if not isinstance(flt, dict):
        raise ValidationFailed([_error(("body", "automations"), "value is not a valid dict", "type_error.dict")])
    clauses, params = [], []
    for key in ("name", "id", "created", "tags"):
        if flt.get(key) is not None and not isinstance(flt[key], dict):
            raise ValidationFailed(
                [_error(("body", "automations", key), "value is not a valid dict", "type_error.dict")]
            )
    names = (flt.get("name") or {}).get("any_")
    if names is not None:
        names = _validate_kind(_STRS, names, ("body", "automations", "name", "any_"))
        clauses.append(f"name IN ({', '.join('?' for _ in names) or 'NULL'})")
        params += names
    ids = (flt.get("id") or {}).get("any_")
    if ids is not None:
        ids = _validate_kind(ListOf("uuid"), ids, ("body", "automations", "id", "any_"))
        clauses.append(f"id IN ({', '.join('?' for _ in ids) or 'NULL'})")
        params += ids
    before = (flt.get("created") or {}).get("before_")
    if before is not None:
        clauses.append("created <= ?")
        params.append(parse_datetime(before, ("body", "automations", "created", "before_")))
    tags = (flt.get("tags") or {}).get("all_")
    for tag in _validate_kind(_STRS, tags, ("body", "automations", "tags", "all_")) if tags is not None else ():
        clauses.append("tags LIKE ? ESCAPE '\\'")
        params.append("%" + _like_literal(dumps(tag)) + "%")
    joiner = " OR " if flt.get("operator") == "or_" else " AND "
    return ("(" + joiner.join(clauses) + ")") if clauses else "1=1", params


def automations_related_to(tx, resource_id: str) -> list[dict]:
    """Automations related to a resource: those it owns, and those whose actions name it."""
    rows = tx.query(
        "SELECT a.* FROM automation a JOIN automation_related_resource r ON r.automation_id = a.id "
        "WHERE r.resource_id = ? ORDER BY a.name, a.id",
        (resource_id,),
    )
    found = {row["id"]: automation_out(row) for row in rows}
    kind, _, object_id = resource_id.rpartition(".")
    field = {
        "prefect.deployment": "deployment_id",
        "prefect.work-pool": "work_pool_id",
        "prefect.work-queue": "work_queue_id",
        "prefect.automation": "automation_id",
    }.get(kind)
    if field and object_id:
        for row in tx.query(
            "SELECT * FROM automation WHERE actions LIKE ? ESCAPE '\\' ORDER BY name, id",
            ("%" + _like_literal(object_id) + "%",),
        ):
            automation = automation_out(row)
            if any(a.get(field) == object_id for a in automation["actions"]):
                found.setdefault(automation["id"], automation)
    return list(found.values())


def delete_automations_owned_by_resource(tx, resource_id: str) -> int:
    ids = [
        r["automation_id"]
        for r in tx.query(
            "SELECT automation_id FROM automation_related_resource "
            "WHERE resource_id = ? AND automation_owned_by_resource = ?",
            (resource_id, True),
        )
    ]
    return sum(delete_automation(tx, automation_id) for automation_id in ids)


# --- 17. Triggers and actions ---
# Owns what automations do: triggers evaluated as events are stored, and the
# actions a firing runs.

# Trigger evaluation, in the transaction that stores the events.


def _event_name_matches(name: str, pattern: str) -> bool:
    """A trailing * matches any rest (event names and label values); otherwise the whole text must match."""
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


def _label_matches(value: str | None, patterns) -> bool:
    """Prefect's label matching: any pattern matches; '*' is a wildcard, a leading '!' negates."""
    value = value or ""
    positive = [p for p in _patterns(patterns) if not p.startswith("!")]
    negative = [p[1:] for p in _patterns(patterns) if p.startswith("!")]
    if any(_event_name_matches(value, p) for p in negative):
        return False
    return not positive or any(_event_name_matches(value, p) for p in positive)


def _spec_matches(spec: dict, resource: dict) -> bool:
    return all(_label_matches(resource.get(label), patterns) for label, patterns in spec.items())


def trigger_covers(trigger: dict, event: dict) -> bool:
    """The event concerns this trigger: its resource matches `match`, a related resource matches each
    `match_related`, and its name is expected or starts the trigger (`after`)."""
    if not _spec_matches(trigger["match"], event["resource"]):
        return False
    related = trigger["match_related"]
    for spec in related if isinstance(related, list) else [related]:
        if spec and not any(_spec_matches(spec, r) for r in event["related"]):
            return False
    return _expects(trigger, event["event"]) or _starts_after(trigger, event["event"])


# Automations' own events (prefect.automation.triggered, .resolved, .action.*) reach only the triggers whose
# expect or after names them (a pattern starting "prefect.automation"), not those expecting any event ("*" or
# no expect). On Prefect's server such a catch-all trigger fires on its own automation.triggered event for good:
# three of them made 1,900 events of one within 30 s there, unbounded (measured); Prefect's 3.x suite leaves 25.
AUTOMATION_OWN_EVENTS = "prefect.automation."


def _takes(pattern: str, name: str) -> bool:
    if name.startswith(AUTOMATION_OWN_EVENTS) and not pattern.startswith("prefect.automation"):
        return False
    return _event_name_matches(name, pattern)


def _expects(trigger: dict, name: str) -> bool:
    if not trigger["expect"]:
        return not name.startswith(AUTOMATION_OWN_EVENTS)
    return any(_takes(p, name) for p in trigger["expect"])


def _starts_after(trigger: dict, name: str) -> bool:
    return any(_takes(p, name) for p in trigger["after"])


def enabled_automations(tx) -> list[dict]:
    # in id order, so replicas evaluating the same event lock buckets in the same order (no deadlock)
    return [automation_out(r) for r in tx.query("SELECT * FROM automation WHERE enabled = ? ORDER BY id", (True,))]


def evaluate_automations(tx, events: list[dict]) -> None:
    """A stored-event listener: count each event in the buckets of the event triggers it concerns, and
    fire those that reach their threshold. An automation's own events are evaluated too, a few levels deep."""
    depth = _AUTOMATION_DEPTH.get()
    if depth >= AUTOMATION_MAX_EVENT_DEPTH:
        return
    automations = enabled_automations(tx)
    if not automations:
        return
    token = _AUTOMATION_DEPTH.set(depth + 1)
    try:
        for event in events:
            for automation in automations:
                _evaluate_automation(tx, automation, event)
    finally:
        _AUTOMATION_DEPTH.reset(token)


def _evaluate_automation(tx, automation: dict, event: dict) -> None:
    """One automation's triggers over one event, in a savepoint: an automation that fails (stored before a
    check that now refuses it) is logged and skipped, and never fails the write that stores the event."""
    try:
        covering = [t for t in all_triggers(automation["trigger"]) if t["type"] == "event" and trigger_covers(t, event)]
    except Exception as exc:  # noqa: BLE001 - nothing written yet: skip the automation
        return _skip_automation(automation, exc)
    if not covering:
        return None
    after_commit = len(tx.after_commit)
    tx.execute("SAVEPOINT automation_evaluation")
    try:
        for trigger in covering:
            _react(tx, automation, trigger, event)
    except DatabaseUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - undo its writes and skip it
        tx.execute("ROLLBACK TO SAVEPOINT automation_evaluation")
        del tx.after_commit[after_commit:]
        tx.memo.clear()
        _skip_automation(automation, exc)
    tx.execute("RELEASE SAVEPOINT automation_evaluation")
    return None


def _skip_automation(automation: dict, exc: Exception) -> None:
    log.error("automation %s could not be evaluated (%s); skipped", automation["id"], type(exc).__name__)


def _react(tx, automation: dict, trigger: dict, event: dict) -> None:
    occurred, within = from_iso(event["occurred"]), _dt.timedelta(seconds=trigger["within"])
    key, name = _bucketing_key(trigger, event), event["event"]
    bucket = None
    if trigger["after"] and _starts_after(trigger, name):
        # an event both starting and expected starts its window at -1, so it does not count itself
        bucket = _ensure_bucket(
            tx, automation, trigger, key, occurred, occurred + within, event, -1 if _expects(trigger, name) else 0
        )
    if bucket is None and not trigger["after"] and _expects(trigger, name):
        bucket = _ensure_bucket(tx, automation, trigger, key, occurred - AUTOMATION_LOOKBACK, occurred + within, event)
    if not _expects(trigger, name):
        return
    if bucket is None:
        bucket = _read_bucket(tx, automation["id"], trigger["id"], key)
        if bucket is None:
            return
    evaluate_bucket(tx, automation, trigger, bucket, occurred, event)


def _remove_bucket(tx, bucket: dict) -> None:
    tx.execute(
        "DELETE FROM automation_bucket WHERE automation_id = ? AND trigger_id = ? AND bucketing_key = ?",
        (bucket["automation_id"], bucket["trigger_id"], bucket["bucketing_key"]),
    )


def _start_new_bucket(tx, bucket: dict, start, end, count: int, triggered_at: str | None) -> None:
    _remove_bucket(tx, bucket)
    now = now_iso()
    insert_row(
        tx,
        "automation_bucket",
        {
            "automation_id": bucket["automation_id"],
            "trigger_id": bucket["trigger_id"],
            "bucketing_key": bucket["bucketing_key"],
            "posture": bucket["posture"],
            "created": now,
            "updated": now,
            "start_time": iso(start),
            "end_time": iso(end),
            "count": count,
            "last_event": None,
            "triggering_labels": {},
            "triggered_at": triggered_at,
        },
    )


def evaluate_bucket(tx, automation: dict, trigger: dict, bucket: dict, now: _dt.datetime, event: dict | None):
    """Prefect's evaluation of one bucket: spend the event's count in the open window, fire a reactive
    trigger as soon as it reaches its threshold and a proactive one when its window closes short of it,
    then open the next window. A proactive trigger that fired resolves when an expected event comes."""
    start, end = from_iso(bucket["start_time"]), from_iso(bucket["end_time"])
    within = _dt.timedelta(seconds=trigger["within"])
    reactive = trigger["posture"] == "Reactive"
    count = 1 if event else 0
    if now < start:
        return  # an older, out-of-order event, or one for a window that already fired
    if event and bucket["triggered_at"] and not reactive:
        _resolve(tx, automation, trigger, bucket, event)
        bucket["triggered_at"] = None
    if count and ((reactive and within.total_seconds() == 0) or start <= now < end):
        bucket["count"] += count
        bucket["last_event"] = event
        tx.execute(
            "UPDATE automation_bucket SET count = ?, last_event = ?, triggered_at = ?, updated = ? "
            "WHERE automation_id = ? AND trigger_id = ? AND bucketing_key = ?",
            (
                bucket["count"],
                dumps(event),
                bucket["triggered_at"],
                now_iso(),
                bucket["automation_id"],
                bucket["trigger_id"],
                bucket["bucketing_key"],
            ),
        )
        count = 0
    meets = bucket["count"] >= trigger["threshold"] if reactive else bucket["count"] < trigger["threshold"]
    fired_at = None
    if (reactive or end <= now) and meets:
        labels = dict(zip(trigger["for_each"], json.loads(bucket["bucketing_key"])))
        fired_at = fire_trigger(
            tx, automation, trigger, {"triggering_labels": labels, "triggering_event": event or bucket["last_event"]}
        )
        _remove_bucket(tx, bucket)
    elif now < end:
        return
    if trigger["after"]:
        _remove_bucket(tx, bucket)
        return
    if within.total_seconds() == 0:
        return
    next_start = max(end, now)
    resolvable = not reactive and trigger["id"] == automation["trigger"]["id"]  # a child's firing is its parent's
    _start_new_bucket(tx, bucket, next_start, next_start + within, count, fired_at if resolvable else None)


def evaluate_proactive_triggers(db: Database, now: _dt.datetime | None = None) -> int:
    """Close the windows of proactive triggers that ended: each fires if too few events came. (A reactive
    window that ended waits for the next event, which opens the next window.) Returns how many were closed."""
    now = now or utcnow()
    with db.read() as tx:
        due = tx.query(
            "SELECT b.automation_id, b.trigger_id, b.bucketing_key FROM automation_bucket b "
            "JOIN automation a ON a.id = b.automation_id WHERE a.enabled = ? AND b.posture = 'Proactive' "
            "AND b.end_time <= ? ORDER BY b.end_time LIMIT 500",
            (True, iso(now)),
        )
    for row in due:
        try:
            _close_proactive_window(db, row, now)
        except DatabaseError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad stored automation must not stop the others' windows
            _skip_automation({"id": row["automation_id"]}, exc)
            with db.write() as tx:  # its window goes, or it would fail first on every pass
                tx.execute(
                    "DELETE FROM automation_bucket WHERE automation_id = ? AND trigger_id = ? AND bucketing_key = ?",
                    (row["automation_id"], row["trigger_id"], row["bucketing_key"]),
                )
    return len(due)


def _close_proactive_window(db: Database, row: dict, now: _dt.datetime) -> None:
    with db.write() as tx:
        automation_row = read_row(tx, "automation", row["automation_id"])
        bucket = _read_bucket(tx, row["automation_id"], row["trigger_id"], row["bucketing_key"])
        if automation_row is None or bucket is None or from_iso(bucket["end_time"]) > now:
            return  # another replica closed it first
        automation = automation_out(automation_row)
        trigger = next((t for t in all_triggers(automation["trigger"]) if t["id"] == row["trigger_id"]), None)
        if trigger is None or trigger["type"] != "event" or trigger["posture"] != "Proactive":
            _remove_bucket(tx, bucket)
            return
        evaluate_bucket(tx, automation, trigger, bucket, now, None)


def _parent_of(trigger: dict, child_id: str) -> dict | None:
    for child in trigger.get("triggers") or ():
        if child["id"] == child_id:
            return trigger
        found = _parent_of(child, child_id)
        if found is not None:
            return found
    return None


def fire_trigger(tx, automation: dict, trigger: dict, firing: dict) -> str:
    """A trigger fired: act when it is the automation's own trigger, else tell its compound or sequence parent."""
    firing = {"id": new_id(), "trigger_id": trigger["id"], "triggered": now_iso(), **firing}
    if trigger["id"] == automation["trigger"]["id"]:
        _act(tx, automation, trigger, firing, "triggered")
        return firing["triggered"]
    parent = _parent_of(automation["trigger"], trigger["id"])
    needed = {"any": 1, "all": len(parent["triggers"])}.get(parent.get("require"), parent.get("require"))
    if parent["type"] == "compound" and needed == 1:
        fire_trigger(tx, automation, parent, _composite_firing([firing]))
        return firing["triggered"]
    if parent.get("within"):
        horizon = iso(from_iso(firing["triggered"]) - _dt.timedelta(seconds=parent["within"]))
        tx.execute(
            "DELETE FROM automation_child_firing WHERE automation_id = ? AND parent_trigger_id = ? AND triggered < ?",
            (automation["id"], parent["id"], horizon),
        )
    tx.execute(
        "DELETE FROM automation_child_firing WHERE automation_id = ? AND parent_trigger_id = ? AND "
        "child_trigger_id = ?",
        (automation["id"], parent["id"], trigger["id"]),
    )
    insert_row(
        tx,
        "automation_child_firing",
        {
            "automation_id": automation["id"],
            "parent_trigger_id": parent["id"],
            "child_trigger_id": trigger["id"],
            "triggered": firing["triggered"],
            "firing": dumps(firing),
        },
    )
    rows = tx.query(
        "SELECT * FROM automation_child_firing WHERE automation_id = ? AND parent_trigger_id = ? "
        "ORDER BY triggered, child_trigger_id",
        (automation["id"], parent["id"]),
    )
    firings = [json.loads(r["firing"]) for r in rows]
    if parent["type"] == "compound":
        ready = len(firings) >= needed
    else:
        order = [f["trigger_id"] for f in firings]
        ready = order == [t["id"] for t in parent["triggers"]]
    if ready:
        tx.execute(
            "DELETE FROM automation_child_firing WHERE automation_id = ? AND parent_trigger_id = ?",
            (automation["id"], parent["id"]),
        )
        fire_trigger(tx, automation, parent, _composite_firing(firings))
    return firing["triggered"]


def _composite_firing(firings: list[dict]) -> dict:
    last = firings[-1]
    return {
        "triggering_labels": last.get("triggering_labels") or {},
        "triggering_event": last.get("triggering_event"),
        "triggering_firings": [f["id"] for f in firings],
    }


def _automation_event(
    tx, automation: dict, name: str, related=(), payload=None, occurred: str | None = None, follows: str | None = None
) -> dict:
    """Store one of an automation's own events (prefect.automation.*) and return it."""
    trigger = automation["trigger"]
    resource = {
        "prefect.resource.id": f"prefect.automation.{automation['id']}",
        "prefect.resource.name": automation["name"],
    }
    if name.startswith("prefect.automation.action."):
        resource["prefect.trigger-type"] = trigger["type"]
    if trigger["type"] == "event":
        resource["prefect.posture"] = trigger["posture"]
    event = {
        "id": new_id(),
        "occurred": occurred or now_iso(),
        "event": name,
        "resource": resource,
        "related": list(related),
        "payload": payload or {},
        "follows": follows,
    }
    store_events(tx, [event])
    return event


def _state_change_event(tx, automation: dict, state: str, firing: dict) -> dict:
    triggering = firing.get("triggering_event")
    related = (
        [{"prefect.resource.id": f"prefect.event.{triggering['id']}", "prefect.resource.role": "triggering-event"}]
        if triggering
        else []
    )
    return _automation_event(
        tx,
        automation,
        f"prefect.automation.{state}",
        related,
        {"triggering_labels": firing.get("triggering_labels") or {}, "triggering_event": triggering},
    )


def _act(tx, automation: dict, trigger: dict, firing: dict, state: str) -> None:
    """Record the trigger's state change as an event and queue the actions it owes (run by AutomationActor)."""
    log.info("automation %s (%r) %s", automation["id"], automation["name"], state)
    change = _state_change_event(tx, automation, state, firing)
    if state == "triggered":
        owed = [(firing.get("triggering_event"), a) for a in automation["actions"]]
        owed += [(change, a) for a in automation["actions_on_trigger"]]
    else:
        owed = [(change, a) for a in automation["actions_on_resolve"]]
    now = now_iso()
    for index, (triggering_event, action) in enumerate(owed):
        context = {
            "triggering_event": triggering_event,
            "triggering_labels": firing.get("triggering_labels") or {},
            "automation_event_id": change["id"],
            "triggered": firing["triggered"],
            "depth": _AUTOMATION_DEPTH.get(),  # the action's own events count on from here (at_action_depth)
        }
        insert_row(
            tx,
            "automation_action_queue",
            {
                "id": new_id(),
                "created": now,
                "updated": now,
                "automation_id": automation["id"],
                "firing_id": f"{firing['id']}:{state}",
                "action_index": index,
                "action": action,
                "context": context,
                "status": "PENDING",
                "attempts": 0,
                "next_attempt_at": now,
            },
            on_conflict="ON CONFLICT DO NOTHING",
        )
    if owed and tx.db.hooks.automation_wakers:
        tx.after_commit.extend(tx.db.hooks.automation_wakers)


def _resolve(tx, automation: dict, trigger: dict, bucket: dict, event: dict) -> None:
    labels = dict(zip(trigger["for_each"], json.loads(bucket["bucketing_key"])))
    firing = {
        "id": new_id(),
        "trigger_id": trigger["id"],
        "triggered": now_iso(),
        "triggering_labels": labels,
        "triggering_event": event,
    }
    _act(tx, automation, trigger, firing, "resolved")


DatabaseHooks.domain_stored_event_listeners = (evaluate_automations,)


# Actions: what a queued firing does. Each takes the action, its context and the database; raises
# ActionFailed with a reason a person can act on; returns details for the executed event's payload.


class ActionFailed(Exception):
    pass


def _first_resource_id(event: dict | None, kind: str) -> str | None:
    """The id of the first resource of a kind (prefect.flow-run, ...) the event names, primary first."""
    if not event:
        return None
    for resource in (event["resource"], *event["related"]):
        found = _prefect_object_id(resource.get("prefect.resource.id"), kind)
        if found:
            return found
    return None


def _target_id(action: dict, field: str, kind: str, context: dict, what: str) -> str:
    if action.get("source", "selected") == "selected" and action.get(field):
        return action[field]
    found = _first_resource_id(context.get("triggering_event"), kind)
    if not found:
        raise ActionFailed(f"No {what} could be inferred")
    return found


def _inferred_flow_run(context: dict) -> str:
    """Flow-run actions always act on the flow run the triggering event names."""
    found = _first_resource_id(context.get("triggering_event"), "prefect.flow-run")
    if not found:
        raise ActionFailed("No flow run could be inferred")
    return found


def template_context(tx, automation: dict, context: dict, ui_url: str) -> dict:
    """What templates see: the event, the automation, the triggering labels and the Prefect objects the
    event names (flow_run, flow, deployment, work_pool, work_queue), as the API shows them."""
    event = context.get("triggering_event")
    values = {
        "event": _event_for_template(event) if event else UNDEFINED,
        "automation": automation,
        "labels": context.get("triggering_labels") or {},
        "firing": context,
        "__ui_url__": ui_url,
    }
    loaders = {
        "flow_run": ("prefect.flow-run", "flow_run", flow_run_out),
        "flow": ("prefect.flow", "flow", lambda r: decode_row("flow", r)),
        "deployment": ("prefect.deployment", "deployment", lambda r: decode_row("deployment", r)),
        "work_pool": ("prefect.work-pool", "work_pool", lambda r: decode_row("work_pool", r)),
        "work_queue": ("prefect.work-queue", "work_queue", lambda r: decode_row("work_queue", r)),
    }
    for name, (kind, table, decode) in loaders.items():
        object_id = _first_resource_id(event, kind)
        row = read_row(tx, table, object_id) if object_id and _UUID_RE.match(object_id) else None
        if row is not None:
            values[name] = {**decode(row), "__kind__": kind.removeprefix("prefect.")}
    return values


def _event_for_template(event: dict) -> dict:
    """An event as Prefect's templates see it: resources also answer .id, .name and .role."""

    def resource(labels):
        short = {
            "id": labels.get("prefect.resource.id"),
            "name": labels.get("prefect.resource.name"),
            "role": labels.get("prefect.resource.role"),
        }
        return {**{k: v for k, v in short.items() if v is not None}, **labels}

    return {**event, "resource": resource(event["resource"]), "related": [resource(r) for r in event["related"]]}


def _run_deployment(tx, action, context, automation, settings, ui_url, action_id):
    dep_id = _target_id(action, "deployment_id", "prefect.deployment", context, "deployment")
    values = template_context(tx, automation, context, ui_url)
    try:
        parameters = hydrate(action.get("parameters") or {}, values)
        job_variables = hydrate(action.get("job_variables") or {}, values)
    except TemplateError as exc:
        raise ActionFailed(f"Unable to render the parameters: {exc}") from None
    try:
        run, _ = create_deployment_flow_run(
            tx,
            dep_id,
            {
                "parameters": parameters,
                "job_variables": job_variables,
                "idempotency_key": f"automation {action_id}",
                "tags": [],
            },
        )
    except NotFound:
        raise ActionFailed(f"Deployment {dep_id} not found") from None
    except ValidationFailed as exc:
        raise ActionFailed(f"The parameters do not fit the deployment: {exc}") from None
    tx.execute(
        "UPDATE flow_run SET created_by = ? WHERE id = ? AND created_by IS NULL",
        (dumps({"id": automation["id"], "type": "AUTOMATION", "display_value": automation["name"]}), run["id"]),
    )
    return {"flow_run_id": run["id"]}, [
        {
            "prefect.resource.id": f"prefect.flow-run.{run['id']}",
            "prefect.resource.role": "flow-run",
            "prefect.resource.name": run["name"],
        }
    ]


def _set_deployment_paused(paused: bool):
    def act(tx, action, context, automation, settings, ui_url, action_id):
        dep_id = _target_id(action, "deployment_id", "prefect.deployment", context, "deployment")
        try:
            update_deployment(tx, dep_id, {"paused": paused}, {"paused": paused})
        except NotFound:
            raise ActionFailed(f"Deployment {dep_id} not found") from None
        return {}, [{"prefect.resource.id": f"prefect.deployment.{dep_id}", "prefect.resource.role": "target"}]

    return act


def _flow_run_state(make_state):
    def act(tx, action, context, automation, settings, ui_url, action_id):
        run_id = _inferred_flow_run(context)
        row = read_row(tx, "flow_run", run_id, lock=True)
        if row is None:
            raise ActionFailed(f"Flow run {run_id} not found")
        proposed, force = make_state(action, automation, row)
        outcome = orchestrate(tx, "flow", row, proposed, force=force)
        if outcome.status != "ACCEPT":
            raise ActionFailed(f"The state change was {outcome.status.lower()}ed: {outcome.details().get('reason')}")
        return {}, [{"prefect.resource.id": f"prefect.flow-run.{run_id}", "prefect.resource.role": "target"}]

    return act


def _cancelling(action, automation, row):
    return {
        "type": "CANCELLING",
        "name": "Cancelling",
        "message": f"Cancelled by Automation {automation['id']}",
        "state_details": {},
    }, True


def _suspended(action, automation, row):
    timeout = iso(utcnow() + _dt.timedelta(hours=1))
    return {
        "type": "PAUSED",
        "name": "Suspended",
        "message": f"Suspended by Automation {automation['id']}",
        "state_details": {"pause_timeout": timeout, "pause_reschedule": True},
    }, True


def _changed_state(action, automation, row):
    return {
        "type": action["state"],
        "name": action.get("name"),
        "message": action.get("message") or f"State changed by Automation {automation['id']}",
        "state_details": {},
    }, bool(action.get("force", True))


def _resume_flow_run(tx, action, context, automation, settings, ui_url, action_id):
    run_id = _inferred_flow_run(context)
    outcome = resume_flow_run(tx, run_id, None)
    if outcome.status != "ACCEPT":
        raise ActionFailed(f"The flow run could not be resumed: {outcome.details().get('reason')}")
    return {}, [{"prefect.resource.id": f"prefect.flow-run.{run_id}", "prefect.resource.role": "target"}]


def _delete_flow_run(tx, action, context, automation, settings, ui_url, action_id):
    run_id = _inferred_flow_run(context)
    if not tx.execute("DELETE FROM flow_run WHERE id = ?", (run_id,)).rowcount:
        raise ActionFailed(f"Flow run {run_id} not found")
    tx.execute("DELETE FROM log WHERE flow_run_id = ?", (run_id,))
    return {}, []


def _set_paused(table: str, field: str, kind: str, column: str, paused: bool):
    def act(tx, action, context, automation, settings, ui_url, action_id):
        target = _target_id(action, field, kind, context, kind.removeprefix("prefect.").replace("-", " "))
        values = {column: not paused if column == "enabled" else paused, "updated": now_iso()}
        if not update_row(tx, table, target, values):
            raise ActionFailed(f"{kind.removeprefix('prefect.').replace('-', ' ').capitalize()} {target} not found")
        if table == "automation":
            _forget_trigger_state(tx, target)
            if not paused:
                _start_proactive_buckets(tx, automation_out(read_row(tx, "automation", target)), utcnow())
        return {}, [{"prefect.resource.id": f"{kind}.{target}", "prefect.resource.role": "target"}]

    return act


def _notification_block(tx, block_document_id: str) -> tuple[str, dict]:
    row = tx.query_one("SELECT * FROM block_document WHERE id = ?", (block_document_id,))
    if row is None:
        raise ActionFailed(f"Block document {block_document_id} not found")
    full = block_document_out(tx, row, include_secrets=True)
    return full["block_type"]["slug"], full["data"]


def _render(template: str, values: dict, what: str) -> str:
    try:
        return render_template(template, values)
    except TemplateError as exc:
        raise ActionFailed(f"Unable to render the {what}: {exc}") from None


def prepare_automation_action(tx, row: dict, settings: Settings, ui_url: str):
    """What an action needs outside the transaction (a notification's or webhook's rendered message and
    destination), or None when it acts inside the database only."""
    action, context = json.loads(row["action"]), json.loads(row["context"])
    automation_row = read_row(tx, "automation", row["automation_id"])
    automation = automation_out(automation_row) if automation_row else {"id": row["automation_id"], "name": ""}
    if action["type"] == "send-notification":
        slug, data = _notification_block(tx, action["block_document_id"])
        values = template_context(tx, automation, context, ui_url)
        return (
            "notify",
            slug,
            data,
            _render(action.get("subject") or "", values, "subject"),
            _render(action["body"], values, "body"),
        )
    if action["type"] == "call-webhook":
        slug, data = _notification_block(tx, action["block_document_id"])
        values = template_context(tx, automation, context, ui_url)
        return ("webhook", slug, data, _render(action.get("payload") or "", values, "payload"))
    return None


def call_webhook(slug: str, data: dict, payload: str, settings: Settings) -> None:
    """POST (or the block's method) the rendered payload: JSON when it parses as JSON, else text."""
    url = data.get("url")
    if not url:
        raise ActionFailed(f"the {slug} block has no url")
    headers = dict(data.get("headers") or {})
    method = (data.get("method") or "POST").upper()
    try:
        body = loads(payload) if payload.strip() else None
    except ValueError:
        headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        try:
            _http_send(method, url, settings["PREFECT_NOTIFICATIONS_TIMEOUT"], raw=payload.encode(), headers=headers)
        except NotificationFailed as exc:
            raise ActionFailed(str(exc)) from None
        return
    try:
        _http_send(method, url, settings["PREFECT_NOTIFICATIONS_TIMEOUT"], json_body=body, headers=headers)
    except NotificationFailed as exc:
        raise ActionFailed(str(exc)) from None


ACTIONS_IN_DATABASE = {  # type -> function(tx, action, context, automation, settings, ui_url, action id)
    "do-nothing": lambda *args: ({}, []),
    "run-deployment": _run_deployment,
    "pause-deployment": _set_deployment_paused(True),
    "resume-deployment": _set_deployment_paused(False),
    "cancel-flow-run": _flow_run_state(_cancelling),
    "suspend-flow-run": _flow_run_state(_suspended),
    "change-flow-run-state": _flow_run_state(_changed_state),
    "resume-flow-run": _resume_flow_run,
    "delete-flow-run": _delete_flow_run,
    "pause-work-pool": _set_paused("work_pool", "work_pool_id", "prefect.work-pool", "is_paused", True),
    "resume-work-pool": _set_paused("work_pool", "work_pool_id", "prefect.work-pool", "is_paused", False),
    "pause-work-queue": _set_paused("work_queue", "work_queue_id", "prefect.work-queue", "is_paused", True),
    "resume-work-queue": _set_paused("work_queue", "work_queue_id", "prefect.work-queue", "is_paused", False),
    "pause-automation": _set_paused("automation", "automation_id", "prefect.automation", "enabled", True),
    "resume-automation": _set_paused("automation", "automation_id", "prefect.automation", "enabled", False),
}


@contextlib.contextmanager
def at_action_depth(row: dict):
    """Run a queued action, and store its events, at the depth of the firing that queued it. The actor's
    transaction would start the count afresh, and automations matching every event would then feed each
    other's actions for good (seen in Prefect's 3.x suite: millions of events). Prefect lets an action's events
    trigger automations, so they still do, AUTOMATION_MAX_EVENT_DEPTH levels deep."""
    token = _AUTOMATION_DEPTH.set(json.loads(row["context"]).get("depth", 0))
    try:
        yield
    finally:
        _AUTOMATION_DEPTH.reset(token)


def act_in_database(tx, row: dict, settings: Settings, ui_url: str) -> tuple[dict, list]:
    action, context = json.loads(row["action"]), json.loads(row["context"])
    automation_row = read_row(tx, "automation", row["automation_id"])
    automation = automation_out(automation_row) if automation_row else {"id": row["automation_id"], "name": ""}
    return ACTIONS_IN_DATABASE[action["type"]](tx, action, context, automation, settings, ui_url, row["id"])


def finish_automation_action(tx, row: dict, error: str | None, details: dict, related: list) -> None:
    """Record the outcome: the queue row becomes the action's history, and the automation's
    prefect.automation.action.executed (or .failed) event is stored."""
    tx.execute(
        "UPDATE automation_action_queue SET status = ?, last_error = ?, updated = ? WHERE id = ?",
        ("FAILED" if error else "COMPLETED", error, now_iso(), row["id"]),
    )
    automation_row = read_row(tx, "automation", row["automation_id"])
    if automation_row is None:
        return
    action, context = json.loads(row["action"]), json.loads(row["context"])
    automation = automation_out(automation_row)
    related = list(related)
    if context.get("automation_event_id"):
        related.append(
            {
                "prefect.resource.id": f"prefect.event.{context['automation_event_id']}",
                "prefect.resource.role": "automation-triggered-event",
            }
        )
    if context.get("triggering_event"):
        related.append(
            {
                "prefect.resource.id": f"prefect.event.{context['triggering_event']['id']}",
                "prefect.resource.role": "triggering-event",
            }
        )
    details_of_action = {"action_index": row["action_index"], "action_type": action["type"], "invocation": row["id"]}
    _record_action_events(tx, automation, related, details_of_action, details, error, context)


def _record_action_events(tx, automation, related, details_of_action, details, error, context) -> None:
    triggered = _automation_event(
        tx,
        automation,
        "prefect.automation.action.triggered",
        related,
        details_of_action,
        occurred=context.get("triggered"),
    )
    payload = {**details_of_action, **details, **({"reason": error} if error else {})}
    _automation_event(
        tx,
        automation,
        "prefect.automation.action.failed" if error else "prefect.automation.action.executed",
        related,
        payload,
        follows=triggered["id"],
    )


def automation_action_history(tx, automation_id: str, limit: int = 50) -> list[dict]:
    rows = tx.query(
        "SELECT * FROM automation_action_queue WHERE automation_id = ? ORDER BY created DESC, action_index LIMIT ?",
        (automation_id, limit),
    )
    return [
        {
            "id": r["id"],
            "created": r["created"],
            "updated": r["updated"],
            "status": r["status"],
            "attempts": r["attempts"],
            "action": json.loads(r["action"]),
            "error": r["last_error"],
        }
        for r in rows
    ]


# --- 18. Services ---
# Owns the background loops: each is a thread with its interval as a setting, woken early when there
# is work, stopping cleanly on shutdown, and safe when several servers share one PostgreSQL database
# (idempotency keys and row locks make a second replica's work a no-op, never a duplicate).


class Service:
    """A loop in a thread: run_once(now) every `interval` seconds, or sooner after wake().

    Each pass is handed its time from the App's clock (app.clock), and judges by it alone: a test runs one
    pass at the moment it chooses (service.run_once(moment)), with no thread and no waiting."""

    name = "service"

    def __init__(self, app, interval: float):
        self.app = app
        self.interval = max(float(interval), 0.01)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = None
        self.passes = 0
        self.last_pass_at: float | None = None  # monotonic time the last pass finished
        self.last_error: str | None = None

    def start(self):
        self._thread = threading.Thread(target=self._loop, name=f"prefectlite-{self.name}", daemon=True)
        self._thread.start()

    def wake(self):
        self._wake.set()

    def stop(self, timeout: float = 10.0):
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.run_once(self.app.clock())
                self.last_error = None
            except DatabaseUnavailable as exc:  # transient: try again next pass
                self.last_error = str(exc)
                log.warning("%s: database unavailable (%s); retrying", self.name, exc)
            except Exception as exc:  # noqa: BLE001 - a bug in one pass must not end the loop
                self.last_error = str(exc)
                log.exception("%s: pass failed", self.name)
            self.passes += 1
            self.last_pass_at = time.monotonic()
            self._wake.wait(self._next_wait())
            self._wake.clear()

    def run_once(self, now: _dt.datetime):
        raise NotImplementedError

    def _next_wait(self) -> float:
        return self.interval


def _schedule_idempotency_key(deployment_id: str, moment: str, schedule: dict) -> str:
    """One run per deployment and moment, even when two of its schedules coincide (Prefect 2.20's key).
    A schedule with parameters of its own makes runs unlike the others': its key names it (as Prefect 3's
    does), so a coinciding schedule does not swallow its run."""
    if schedule.get("parameters"):
        return f"scheduled {deployment_id} {schedule['id']} {moment}"
    return f"scheduled {deployment_id} {moment}"


_SCHEDULE_KIND_NAMES = {"interval": "IntervalSchedule", "cron": "CronSchedule", "rrule": "RRuleSchedule"}


def _made_by_schedule(schedule: dict) -> dict:
    """A scheduled run's `created_by`, as Prefect 3 fills it: the schedule, shown by its slug or its kind."""
    kind = next((name for key, name in _SCHEDULE_KIND_NAMES.items() if key in (schedule["schedule"] or {})), None)
    return {"id": schedule["id"], "type": "SCHEDULE", "display_value": schedule.get("slug") or kind}


def schedule_deployment_runs(
    tx,
    dep: dict,
    settings: Settings,
    now: _dt.datetime,
    start=None,
    end=None,
    min_time: float | None = None,
    min_runs: int | None = None,
    max_runs: int | None = None,
) -> int:
    """Keep each active schedule of a deployment filled ahead; returns how many runs were created.

    From `start` (now) to before `end` (now + the longest time scheduled ahead): at least `min_runs` runs
    and up to `start` + `min_time`, at most `max_runs` (the scheduler's settings where not given)."""
    start = start or now
    min_runs = settings["PREFECT_API_SERVICES_SCHEDULER_MIN_RUNS"] if min_runs is None else min_runs
    max_runs = settings["PREFECT_API_SERVICES_SCHEDULER_MAX_RUNS"] if max_runs is None else max_runs
    if min_time is None:
        min_time = settings["PREFECT_API_SERVICES_SCHEDULER_MIN_SCHEDULED_TIME"]
    max_until = end or _step_toward(now, settings["PREFECT_API_SERVICES_SCHEDULER_MAX_SCHEDULED_TIME"], _LAST_MOMENT)
    min_until = _step_toward(start, min_time, _LAST_MOMENT)
    created = 0
    for schedule in dep["schedules"]:
        if not schedule["active"]:
            continue
        limit = min(schedule.get("max_scheduled_runs") or max_runs, max_runs)
        times = next_fire_times(schedule["schedule"], start, max_until, limit)
        wanted = [t for i, t in enumerate(times) if i < min_runs or t <= min_until]
        parameters = {**(dep.get("parameters") or {}), **(schedule.get("parameters") or {})}
        for moment in wanted:
            when = iso(moment)
            key = _schedule_idempotency_key(dep["id"], when, schedule)
            data = {
                "flow_id": dep["flow_id"],
                "deployment_id": dep["id"],
                "parameters": parameters,
                "tags": list(dep.get("tags") or []),
                "idempotency_key": key,
                "context": {},
                "empirical_policy": {},
                "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": when}},
            }
            extra = {
                "auto_scheduled": True,
                "deployment_version": dep.get("version"),
                "work_queue_id": dep.get("work_queue_id"),
                "work_queue_name": dep.get("work_queue_name"),
                "created_by": _made_by_schedule(schedule),
            }
            _run, was_new = create_flow_run(tx, data, extra)
            created += was_new
    return created


class Scheduler(Service):
    name = "scheduler"

    def run_once(self, now: _dt.datetime):
        with self.app.db.read() as tx:
            ids = [
                r["id"]
                for r in tx.query(
                    "SELECT d.id FROM deployment d WHERE d.paused = ? AND EXISTS (SELECT 1 FROM deployment_schedule s "
                    "WHERE s.deployment_id = d.id AND s.active = ?)",
                    (False, True),
                )
            ]
        self.created = 0
        for dep_id in ids:
            with self.app.db.write() as tx:
                row = read_row(tx, "deployment", dep_id, lock=True)  # replicas take turns per deployment
                if row is None or row["paused"]:  # deleted or paused since the list was read
                    continue
                self.created += schedule_deployment_runs(tx, deployment_out(tx, row), self.app.settings, now)


class LateRuns(Service):
    """A SCHEDULED run whose time passed more than a setting ago becomes Late (still SCHEDULED)."""

    name = "late-runs"

    def run_once(self, now: _dt.datetime):
        horizon = iso(now - _dt.timedelta(seconds=self.app.settings["PREFECT_API_SERVICES_LATE_RUNS_AFTER_SECONDS"]))
        with self.app.db.read() as tx:
            ids = [
                r["id"]
                for r in tx.query(
                    "SELECT id FROM flow_run WHERE state_type = 'SCHEDULED' AND state_name != 'Late' "
                    "AND next_scheduled_start_time <= ? ORDER BY next_scheduled_start_time LIMIT 500",
                    (horizon,),
                )
            ]
        for run_id in ids:
            with self.app.db.write() as tx:
                row = read_row(tx, "flow_run", run_id, lock=True)
                if row is None or row["state_type"] != "SCHEDULED" or row["state_name"] == "Late":
                    continue
                details = json.loads(row["state"])["state_details"]
                orchestrate(
                    tx,
                    "flow",
                    row,
                    {
                        "type": "SCHEDULED",
                        "name": "Late",
                        "state_details": {"scheduled_time": details.get("scheduled_time")},
                    },
                    force=True,
                    now=now,
                )


class PauseExpirations(Service):
    """A paused run whose pause timed out fails, so it does not wait forever."""

    name = "pause-expirations"

    def run_once(self, now: _dt.datetime):
        with self.app.db.read() as tx:
            rows = tx.query("SELECT id, state FROM flow_run WHERE state_type = 'PAUSED'")
        expired = [
            r["id"] for r in rows if (json.loads(r["state"])["state_details"].get("pause_timeout") or "9999") < iso(now)
        ]
        for run_id in expired:
            with self.app.db.write() as tx:
                row = read_row(tx, "flow_run", run_id, lock=True)
                if row is None or row["state_type"] != "PAUSED":
                    continue
                orchestrate(
                    tx,
                    "flow",
                    row,
                    {"type": "FAILED", "message": "The flow was paused and never resumed.", "state_details": {}},
                    force=True,
                    now=now,
                )


class CancellationCleanup(Service):
    """CANCELLING runs with no infrastructure to stop end CANCELLED; the task runs and subflow runs of a
    cancelled run are cancelled too."""

    name = "cancellation-cleanup"

    def run_once(self, now: _dt.datetime):
        with self.app.db.read() as tx:
            orphans = [
                r["id"]
                for r in tx.query(
                    "SELECT id FROM flow_run WHERE state_type = 'CANCELLING' AND deployment_id IS NULL "
                    "AND infrastructure_pid IS NULL"
                )
            ]
            children = [
                r["id"]
                for r in tx.query(
                    "SELECT child.id FROM flow_run child JOIN task_run t ON t.id = child.parent_task_run_id "
                    "JOIN flow_run parent ON parent.id = t.flow_run_id WHERE parent.state_type = 'CANCELLED' "
                    "AND child.state_type NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'CRASHED', 'CANCELLING')"
                )
            ]
            tasks = [
                r["id"]
                for r in tx.query(
                    "SELECT t.id FROM task_run t JOIN flow_run f ON f.id = t.flow_run_id "
                    "WHERE f.state_type = 'CANCELLED' "
                    "AND t.state_type NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'CRASHED')"
                )
            ]
        for task_id in tasks:
            with self.app.db.write() as tx:
                row = read_row(tx, "task_run", task_id, lock=True)
                if row is not None and row["state_type"] not in TERMINAL_STATES:
                    orchestrate(
                        tx,
                        "task",
                        row,
                        {"type": "CANCELLED", "message": "The flow run was cancelled.", "state_details": {}},
                        force=True,
                        now=now,
                    )
        for run_id in orphans + children:
            with self.app.db.write() as tx:
                row = read_row(tx, "flow_run", run_id, lock=True)
                if row is None or row["state_type"] in TERMINAL_STATES:
                    continue
                target = (
                    "CANCELLED" if row["state_type"] == "CANCELLING" or row["deployment_id"] is None else "CANCELLING"
                )
                orchestrate(
                    tx,
                    "flow",
                    row,
                    {
                        "type": target,
                        "message": "The parent flow run was cancelled."
                        if run_id in children
                        else "Cancelled: no infrastructure to stop.",
                        "state_details": {},
                    },
                    force=True,
                    now=now,
                )


def claim_next_queued(tx, table: str, working: str, order: str, now: _dt.datetime, lease_seconds: float):
    """The next due row of a durable queue (flow_run_notification_queue, automation_action_queue), claimed in
    `tx`: status `working`, one more attempt, due again when the lease ends (its holder died). Another
    replica's claim skips it (SKIP LOCKED). `table` and `order` are this module's constants, never input."""
    db = tx.db
    row = tx.query_one(
        f"SELECT * FROM {table} WHERE status IN ('PENDING', ?) AND next_attempt_at <= ? "
        f"ORDER BY {order} LIMIT 1{db.for_update}{db.skip_locked}",
        (working, iso(now)),
    )
    if row is not None:
        tx.execute(
            f"UPDATE {table} SET status = ?, attempts = attempts + 1, next_attempt_at = ?, updated = ? WHERE id = ?",
            (working, iso(now + _dt.timedelta(seconds=lease_seconds)), iso(now), row["id"]),
        )
    return row


class NotificationSender(Service):
    """Drains the notification queue: claim a row, send it, delete it once the destination accepted it.

    Claiming is a compare-and-set in its own short transaction (with SKIP LOCKED on PostgreSQL), so two
    replicas never send the same row; a claim is a lease, so a row claimed by a server that died is sent
    again after the lease expires. Failures are retried with exponential backoff, then kept as FAILED.
    """

    name = "notifications"
    lease_seconds = 120.0

    def _next_wait(self) -> float:
        """Sleep until the next retry is due (or the loop interval), not a fixed poll."""
        try:
            with self.app.db.read() as tx:
                due = tx.scalar(
                    "SELECT MIN(next_attempt_at) FROM flow_run_notification_queue "
                    "WHERE status IN ('PENDING', 'SENDING')"
                )
        except DatabaseError:
            return self.interval
        if due is None:
            return self.interval
        return min(self.interval, max((from_iso(due) - self.app.clock()).total_seconds(), 0.01))

    def run_once(self, now: _dt.datetime):
        while not self._stop.is_set():
            claimed = self._claim(now)
            if claimed is None:
                return
            if claimed is not True:
                self._send(*claimed)
            now = self.app.clock()  # a send takes time: the next claim judges by the clock's time after it

    def _claim(self, now: _dt.datetime):
        with self.app.db.write() as tx:
            row = claim_next_queued(
                tx, "flow_run_notification_queue", "SENDING", "next_attempt_at, id", now, self.lease_seconds
            )
            if row is None:
                return None
            try:
                prepared = prepare_notification(tx, row, self.app.settings, self.app.public_url())
            except NotificationFailed as exc:  # it cannot render: give up now, retrying would fail alike
                log.warning("notification %s cannot be sent; giving up: %s", row["id"], exc)
                tx.execute(
                    "UPDATE flow_run_notification_queue SET status = 'FAILED', last_error = ?, updated = ? "
                    "WHERE id = ?",
                    (str(exc)[:1000], iso(now), row["id"]),
                )
                return True
            if prepared is None:  # the policy, state or destination is gone: nothing to send
                tx.execute("DELETE FROM flow_run_notification_queue WHERE id = ?", (row["id"],))
                return True
        return row, prepared

    def _send(self, row, prepared):
        slug, data, subject, body, about = prepared
        settings = self.app.settings
        attempts = row["attempts"] + 1
        try:
            deliver(settings, slug, data, subject, body)
        except NotificationFailed as exc:
            failed = attempts >= settings["PREFECT_NOTIFICATIONS_MAX_ATTEMPTS"]
            # doubling, but at most a week apart (and never past the calendar's end)
            delay = min(settings["PREFECT_NOTIFICATIONS_RETRY_SECONDS"] * 2 ** (attempts - 1), 7 * _A_DAY)
            log.warning(
                "notification %s via %s failed (attempt %d): %s%s",
                row["id"],
                slug,
                attempts,
                exc,
                "; giving up" if failed else f"; retrying in {delay:g}s",
            )
            now = self.app.clock()  # after the attempt, which took time
            with self.app.db.write() as tx:
                tx.execute(
                    "UPDATE flow_run_notification_queue SET status = ?, next_attempt_at = ?, last_error = ?, "
                    "updated = ? WHERE id = ?",
                    (
                        "FAILED" if failed else "PENDING",
                        iso(now + _dt.timedelta(seconds=delay)),
                        str(exc)[:1000],
                        iso(now),
                        row["id"],
                    ),
                )
                record_delivery(tx, about, attempts, "FAILED" if failed else "RETRYING", str(exc)[:1000])
            self.failures += 1
            return
        with self.app.db.write() as tx:
            tx.execute("DELETE FROM flow_run_notification_queue WHERE id = ?", (row["id"],))
            record_delivery(tx, about, attempts, "SENT")
        self.sent += 1
        log.info("notification %s sent via %s", row["id"], slug)

    sent = 0
    failures = 0


class Retention(Service):
    """Deletes terminal flow runs older than the retention horizon (off unless enabled)."""

    name = "retention"

    def run_once(self, now: _dt.datetime):
        s = self.app.settings
        counts = prune_flow_runs(
            self.app.db,
            _dt.timedelta(days=s["PREFECT_SERVER_SERVICES_RETENTION_DAYS"]),
            s["PREFECT_SERVER_SERVICES_RETENTION_BATCH_SIZE"],
            stop=self._stop,
            now=now,
        )
        if counts["flow_runs"]:
            log.info("retention removed %s", ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))


class LeaseRepossessor(Service):
    """Gives back the slots of concurrency leases that expired unrenewed (their holder is gone)."""

    name = "lease-repossessor"

    def run_once(self, now: _dt.datetime):
        with self.app.db.read() as tx:  # most passes find nothing: no write transaction for them
            if tx.query_one("SELECT id FROM concurrency_lease WHERE expiration <= ? LIMIT 1", (iso(now),)) is None:
                return
        with self.app.db.write() as tx:
            repossessed = repossess_expired_leases(tx, now=now)
        if repossessed:
            log.info("repossessed %d expired concurrency leases", repossessed)


LEASE_REPOSSESSOR_LOOP_SECONDS = 15.0


class EventRetention(Service):
    """Deletes events older than PREFECT_SERVER_EVENTS_RETENTION_DAYS (the task runs they made stay)."""

    name = "event-retention"

    def run_once(self, now: _dt.datetime):
        days = self.app.settings["PREFECT_SERVER_EVENTS_RETENTION_DAYS"]
        if days > 0:
            removed = prune_events(self.app.db, _dt.timedelta(days=days), stop=self._stop, now=now)
            if removed:
                log.info("event retention removed %d events", removed)


EVENT_RETENTION_LOOP_SECONDS = 3600.0


class AutomationActor(Service):
    """Runs the actions automations owe and closes the windows of proactive triggers as they end.

    An action is claimed in its own short transaction (SKIP LOCKED on PostgreSQL) before it runs, so two
    replicas never run the same one; actions on the database then run in one transaction with their
    record, notifications and webhooks are sent outside it and retried with backoff when they fail.
    """

    name = "automations"
    lease_seconds = 120.0
    ran = 0
    failures = 0

    def _next_wait(self) -> float:
        """Sleep until a proactive window ends or a retry is due (or the loop interval), not a fixed poll."""
        try:
            with self.app.db.read() as tx:
                due = [
                    tx.scalar(
                        "SELECT MIN(next_attempt_at) FROM automation_action_queue "
                        "WHERE status IN ('PENDING', 'RUNNING')"
                    ),
                    tx.scalar(
                        "SELECT MIN(b.end_time) FROM automation_bucket b JOIN automation a "
                        "ON a.id = b.automation_id WHERE a.enabled = ? AND b.posture = 'Proactive'",
                        (True,),
                    ),
                ]
        except DatabaseError:
            return self.interval
        now = self.app.clock()
        waits = [(from_iso(d) - now).total_seconds() for d in due if d is not None]
        return min([self.interval, *[max(w, 0.01) for w in waits]])

    def run_once(self, now: _dt.datetime):
        evaluate_proactive_triggers(self.app.db, now)
        horizon = iso(now - _dt.timedelta(days=AUTOMATION_HISTORY_DAYS))
        with self.app.db.read() as tx:  # most passes find nothing: no write transaction for them
            due = tx.query_one(
                "SELECT id FROM automation_action_queue WHERE status IN ('PENDING', 'RUNNING') "
                "AND next_attempt_at <= ? LIMIT 1",
                (iso(now),),
            )
            old = tx.query_one(
                "SELECT id FROM automation_action_queue WHERE status IN ('COMPLETED', 'FAILED') "
                "AND updated < ? LIMIT 1",
                (horizon,),
            )
        while due and not self._stop.is_set():
            row = self._claim()
            if row is None:
                break
            if row["attempts"] > self.app.settings["PREFECT_NOTIFICATIONS_MAX_ATTEMPTS"]:
                # its runs so far never finished it (the process ended mid-action): give up, as for failures
                self._finish(row, f"the action did not finish in {row['attempts'] - 1} attempts")
                continue
            self._run(row)
        if old:
            with self.app.db.write() as tx:
                tx.execute(
                    "DELETE FROM automation_action_queue WHERE status IN ('COMPLETED', 'FAILED') AND updated < ?",
                    (horizon,),
                )

    def _claim(self) -> dict | None:
        now = self.app.clock()  # each claim after the actions before it, which took time
        with self.app.db.write() as tx:
            row = claim_next_queued(
                tx,
                "automation_action_queue",
                "RUNNING",
                "next_attempt_at, created, action_index",
                now,
                self.lease_seconds,
            )
        return None if row is None else {**row, "attempts": row["attempts"] + 1}

    def _run(self, row: dict):
        try:
            self._run_action(row)
        except DatabaseError:
            raise  # the row stays claimed; it is tried again when its lease ends
        except Exception as exc:  # noqa: BLE001 - a bug in one action must not leave it RUNNING forever
            # the type only: an exception's text may hold a webhook URL or other secret
            log.error(
                "automation action %s (%s) failed unexpectedly: %s",
                row["id"],
                json.loads(row["action"]).get("type"),
                type(exc).__name__,
            )
            self._finish(row, f"the action failed unexpectedly ({type(exc).__name__})")

    def _run_action(self, row: dict):
        settings, ui_url = self.app.settings, self.app.public_url()
        try:
            with self.app.db.read() as tx:
                prepared = prepare_automation_action(tx, row, settings, ui_url)
        except ActionFailed as exc:
            return self._finish(row, str(exc))
        if prepared is None:
            return self._act_in_database(row)
        try:
            if prepared[0] == "notify":
                _kind, slug, data, subject, body = prepared
                try:
                    deliver(settings, slug, data, subject, body)
                except NotificationFailed as exc:
                    raise ActionFailed(str(exc)) from None
            else:
                _kind, slug, data, payload = prepared
                call_webhook(slug, data, payload, settings)
        except ActionFailed as exc:
            if row["attempts"] < settings["PREFECT_NOTIFICATIONS_MAX_ATTEMPTS"]:
                return self._retry(row, str(exc))
            return self._finish(row, str(exc))
        self._finish(row, None)

    def _act_in_database(self, row: dict):
        with at_action_depth(row), self.app.db.write() as tx:
            current = tx.query_one(
                f"SELECT status FROM automation_action_queue WHERE id = ?{tx.db.for_update}", (row["id"],)
            )
            if current is None or current["status"] != "RUNNING":
                return
            try:
                details, related = act_in_database(tx, row, self.app.settings, self.app.public_url())
                error = None
            except ActionFailed as exc:
                details, related, error = {}, [], str(exc)
            finish_automation_action(tx, row, error, details, related)
        self._count(row, error)

    def _finish(self, row: dict, error: str | None):
        with at_action_depth(row), self.app.db.write() as tx:
            finish_automation_action(tx, row, error, {}, [])
        self._count(row, error)

    def _count(self, row: dict, error: str | None):
        if error:
            self.failures += 1
            log.warning("automation %s action %d failed: %s", row["automation_id"], row["action_index"], error)
        else:
            self.ran += 1

    def _retry(self, row: dict, error: str):
        delay = min(self.app.settings["PREFECT_NOTIFICATIONS_RETRY_SECONDS"] * 2 ** (row["attempts"] - 1), _A_DAY)
        log.warning(
            "automation %s action %d failed (attempt %d): %s; retrying in %gs",
            row["automation_id"],
            row["action_index"],
            row["attempts"],
            error,
            delay,
        )
        now = self.app.clock()
        with self.app.db.write() as tx:
            tx.execute(
                "UPDATE automation_action_queue SET status = 'PENDING', next_attempt_at = ?, last_error = ?, "
                "updated = ? WHERE id = ?",
                (iso(now + _dt.timedelta(seconds=delay)), error[:1000], iso(now), row["id"]),
            )


def build_services(app) -> list[Service]:
    s = app.settings
    services = []
    if s["PREFECT_API_SERVICES_SCHEDULER_ENABLED"]:
        services.append(Scheduler(app, s["PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS"]))
    if s["PREFECT_API_SERVICES_LATE_RUNS_ENABLED"]:
        services.append(LateRuns(app, s["PREFECT_API_SERVICES_LATE_RUNS_LOOP_SECONDS"]))
    services.append(PauseExpirations(app, s["PREFECT_API_SERVICES_PAUSE_EXPIRATIONS_LOOP_SECONDS"]))
    services.append(CancellationCleanup(app, s["PREFECT_API_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS"]))
    if s["PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_ENABLED"]:
        services.append(NotificationSender(app, s["PREFECT_API_SERVICES_FLOW_RUN_NOTIFICATIONS_LOOP_SECONDS"]))
    if s["PREFECT_API_SERVICES_TRIGGERS_ENABLED"]:
        services.append(AutomationActor(app, s["PREFECT_API_SERVICES_TRIGGERS_LOOP_SECONDS"]))
    if s["PREFECT_SERVER_SERVICES_RETENTION_ENABLED"]:
        services.append(Retention(app, s["PREFECT_SERVER_SERVICES_RETENTION_LOOP_SECONDS"]))
    services.append(LeaseRepossessor(app, LEASE_REPOSSESSOR_LOOP_SECONDS))
    if s["PREFECT_SERVER_EVENTS_RETENTION_DAYS"] > 0:
        services.append(EventRetention(app, EVENT_RETENTION_LOOP_SECONDS))
    return services


# --- 19. HTTP API ---
# Owns what a handler is given and gives back (Request, bodies, HTTPError, the read cache) and the handlers
# of the API's run side: meta, flows, flow runs, task runs, logs, events, the server's configuration.
# Handlers are small: they validate, open one transaction, call the domain, and return (status, payload).


class HTTPError(Exception):
    def __init__(self, status: int, detail, headers=None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


NO_CONTENT = object()  # a handler's payload for "204, no body"


@dataclasses.dataclass
class RawBody:
    """A payload that is already encoded (HTML, metrics text, JSON assembled without a parse)."""

    data: bytes
    content_type: str


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # only bodies with such escapes need the full check
_NON_FINITE_HINT = re.compile(rb"NaN|Infinity|[eE][+]?[0-9]{3}")  # only bodies that may hold one are walked


def _non_finite_at(value, path=()) -> tuple | None:
    """The path to the first number JSON cannot hold (NaN, Infinity, or beyond a float: 1e400), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite_at(item, (*path, key))
        if found is not None:
            return found
    return None


def _encodable(value) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class Request:
    def __init__(self, app, method, path, query, headers, raw_body):
        self.app = app
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.raw_body = raw_body
        self.params = {}
        self.data = None  # the validated body, when the route has a schema
        self._json = ...

    def json(self):
        if self._json is ...:
            if not self.raw_body:
                self._json = None
            else:
                try:
                    self._json = json.loads(self.raw_body)
                except (ValueError, RecursionError) as exc:
                    raise ValidationFailed(
                        [_error(("body",), f"invalid JSON: {exc}", "value_error.jsondecode")]
                    ) from None
                brackets = self.raw_body.count(b"[") + self.raw_body.count(b"{")  # a bound on the depth
                if brackets > _MAX_DEPTH and not _json_depth_ok(self._json):
                    raise ValidationFailed(
                        [_error(("body",), f"JSON nested deeper than {_MAX_DEPTH} levels", "value_error.jsondecode")]
                    )
                where = _non_finite_at(self._json) if _NON_FINITE_HINT.search(self.raw_body) else None
                if where is not None:  # see loads(): never stored; named where it is, as a field's error
                    raise ValidationFailed(
                        [
                            _error(
                                ("body", *where),
                                "value is not a finite number (NaN and Infinity are not JSON)",
                                "value_error.number.not_finite",
                            )
                        ]
                    )
                if _SURROGATE_ESCAPE.search(self.raw_body) and not _encodable(self._json):
                    raise ValidationFailed(
                        [_error(("body",), "string with an unpaired UTF-16 surrogate", "value_error.str")]
                    )
        return self._json

    def body_dict(self) -> dict:
        body = self.json()
        if body is None:
            return {}
        if not isinstance(body, dict):
            raise ValidationFailed([_error(("body",), "value is not a valid dict", "type_error.dict")])
        return body

    def uuid(self, name="id") -> str:
        return parse_uuid(self.params[name], ("path", name))

    def arg(self, name, default=None):
        values = self.query.get(name)
        return values[0] if values else default

    def int_arg(self, name, default: int, minimum: int, maximum: int) -> int:
        value = self.arg(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ValidationFailed(
                [_error(("query", name), "value is not a valid integer", "type_error.integer")]
            ) from None
        if not minimum <= number <= maximum:
            raise ValidationFailed(
                [
                    _error(
                        ("query", name),
                        f"ensure this value is between {minimum} and {maximum}",
                        "value_error.number.not_in_range",
                    )
                ]
            )
        return number

    def bool_arg(self, name, default=False) -> bool:
        value = self.arg(name)
        if value is None:
            return default
        low = value.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValidationFailed([_error(("query", name), "value could not be parsed to a boolean", "type_error.bool")])


def sent_fields(req) -> dict:
    """The validated fields the client actually sent: a PATCH changes those and nothing else."""
    sent = req.body_dict()
    return {k: v for k, v in req.data.items() if k in sent}


class ReadCache:
    """Answers of the run listings and the dashboard's counts and history, for identical requests.

    An answer is reused only while the server has committed no write since it was computed
    (`Database.generation`, counted over all its processes; so a client always reads its own writes)
    and for at most `max_age` seconds, which bounds how stale it can be when another server wrote (a
    second replica on PostgreSQL) and how far the live estimates in it (a running run's run time) may
    lag. Only answers of the latest generation are kept, up to `max_bytes`.
    """

    def __init__(self, max_age: float, max_bytes: int = 8_000_000):
        self.max_age = max_age
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: dict = {}  # key -> (monotonic time stored, RawBody), oldest first
        self._generation = -1
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key, generation: int) -> RawBody | None:
        if self.max_age <= 0:
            return None
        with self._lock:
            entry = self._entries.get(key) if generation == self._generation else None
            if entry is None or time.monotonic() - entry[0] > self.max_age:
                self.misses += 1
                return None
            self.hits += 1
            return entry[1]

    def put(self, key, generation: int, answer: RawBody):
        if self.max_age <= 0 or len(answer.data) > self.max_bytes // 8:
            return
        with self._lock:
            if generation < self._generation:
                return  # computed before a write that a newer answer already reflects
            if generation > self._generation:
                self._entries.clear()
                self._bytes, self._generation = 0, generation
            old = self._entries.pop(key, None)
            self._bytes += len(answer.data) - (len(old[1].data) if old else 0)
            self._entries[key] = (time.monotonic(), answer)
            while self._bytes > self.max_bytes:
                oldest = next(iter(self._entries))
                self._bytes -= len(self._entries.pop(oldest)[1].data)


def _cached(handler):
    """Serve a read handler's 200 answers from app.read_cache (see ReadCache)."""

    @functools.wraps(handler)
    def cached(app, req):
        key, generation = (req.path, req.raw_body, client_major(req)), app.db.generation()
        answer = app.read_cache.get(key, generation)
        if answer is not None:
            return 200, answer
        status, payload = handler(app, req)
        if status == 200:
            if not isinstance(payload, RawBody):
                payload = RawBody(dumps(payload).encode(), "application/json")
            app.read_cache.put(key, generation, payload)
        return status, payload

    return cached


def body(schema, for_2x=None):
    """Mark a handler with the schema of its request body (validation, defaults and OpenAPI); `for_2x`, when
    given, is the one a 2.x client's body meets instead (client_major), where 2.20's differs from 3.9's."""

    def mark(handler):
        handler.body_schema = schema
        handler.body_schema_2 = for_2x
        return handler

    return mark


# Handlers: meta


def read_health(app, req):
    return 200, True


def read_ready(app, req):
    try:
        current = schema_is_current(app.db)
    except DatabaseUnavailable as exc:
        raise HTTPError(503, f"database unavailable: {exc}") from None
    if not current:
        raise HTTPError(503, "database schema is not current; run `prefectlite database upgrade`")
    return 200, {"status": "ready"}


def read_hello(app, req):
    return 200, "👋"


def read_server_version(app, req):
    """GET /version: the REST API's version, as Prefect answers it (not the server release: /admin/version)."""
    return 200, API_VERSION


def read_api_version(app, req):
    """The Prefect server version this server stands in for: a Prefect 3 client refuses a server whose
    answer has another major version than its own. Prefect 2 and 3 clients both send
    X-PREFECT-API-VERSION: 0.8.4, so that header cannot tell them apart; their User-Agent can: a 3.x
    PrefectClient sends "prefect/3.9.1 (API 0.8.4)" and is told its own version, and the 3.x WebSocket
    clients check first with a bare httpx client ("python-httpx/...", no API-version header) and are told
    PREFECT3_SERVER_VERSION. Any other caller gets the Prefect 2 server version."""
    agent = req.headers.get("User-Agent") or ""
    client = _PREFECT_CLIENT_AGENT.match(agent)
    if client and client.group(1) == "3":
        return 200, ".".join(client.groups())
    if agent.startswith("python-httpx/") and req.headers.get("X-PREFECT-API-VERSION") is None:
        return 200, PREFECT3_SERVER_VERSION
    return 200, PREFECT_SERVER_VERSION


def read_admin_settings(app, req):
    return 200, app.settings.masked()


def read_csrf_token(app, req):
    if not app.settings["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"]:
        raise HTTPError(422, "CSRF protection is disabled.")
    client = req.arg("client")
    if not client:
        raise ValidationFailed([_error(("query", "client"), "field required", "value_error.missing")])
    token = secrets.token_hex(32)
    expiration = iso(utcnow() + _dt.timedelta(seconds=app.settings["PREFECT_SERVER_CSRF_TOKEN_EXPIRATION"]))
    with app.db.write() as tx:
        tx.execute("DELETE FROM csrf_token WHERE client = ? OR expiration < ?", (client, now_iso()))
        insert_row(tx, "csrf_token", {"token": token, "client": client, "expiration": expiration})
    return 200, {"token": token, "client": client, "expiration": expiration}


# Handlers: flows


@body(FlowCreate)
def create_flow_handler(app, req):
    with app.db.write() as tx:
        flow, created = create_flow(tx, req.data, client_major(req))
    return (201 if created else 200), flow


def read_flow(app, req):
    with app.db.read() as tx:
        return 200, flow_out(require_row(tx, "flow", req.uuid(), "Flow"), client_major(req))


def read_flow_by_name_handler(app, req):
    with app.db.read() as tx:
        return 200, read_flow_by_name(tx, req.params["name"], client_major(req))


@body(FlowUpdate)
def update_flow(app, req):
    with app.db.write() as tx:
        require_row(tx, "flow", req.uuid(), "Flow")
        update_row(tx, "flow", req.uuid(), {"tags": req.data["tags"], "updated": now_iso()})
    return 204, NO_CONTENT


def remove_flow(tx, flow_id: str) -> bool:
    return bool(tx.execute("DELETE FROM flow WHERE id = ?", (flow_id,)).rowcount)


def delete_flow(app, req):
    with app.db.write() as tx:
        if not remove_flow(tx, req.uuid()):
            raise NotFound("Flow not found")
    return 204, NO_CONTENT


# Prefect 3's bulk routes: at most BULK_LIMIT objects a call (its `limit`, 50 unless smaller), chosen by the
# one filter the route takes, in the /filter route's default order; each is what the single route does to one.
BULK_LIMIT = 50
_BULK_LIMIT_FIELD = Field("int", default=BULK_LIMIT, nullable=False, minimum=1, maximum=BULK_LIMIT)


def bulk_chosen_ids(tx, table: str, key: str, data: dict, settings: Settings) -> list[str]:
    body = {"limit": data["limit"], **({key: data[key]} if data.get(key) is not None else {})}
    return [row["id"] for row in query_filtered(tx, table, body, settings)]


def _bulk_delete_handler(table: str, key: str, remove):
    """POST /<things>/bulk_delete: {<things>: filter, limit} -> {deleted: ids}, in one transaction."""

    @body(Schema(f"Body_bulk_delete_{table}s", {key: Field("object"), "limit": _BULK_LIMIT_FIELD}))
    def bulk_delete(app, req):
        with app.db.write() as tx:
            ids = bulk_chosen_ids(tx, table, key, req.data, app.settings)
            return 200, {"deleted": [row_id for row_id in ids if remove(tx, row_id)]}

    bulk_delete.__name__ = f"bulk_delete_{table}s"
    return bulk_delete


bulk_delete_flows = _bulk_delete_handler("flow", "flows", remove_flow)


def _decoded(table: str):
    """A _filter_handler `out` for a table whose objects are its decoded rows, alike for every client."""
    return lambda row, _major: decode_row(table, row)


def _filter_handler(table, out, filters, json_select=None):
    """POST /<things>/filter and /count for a table, from one description: `out(row, major)` is an object
    as a client of `major` (client_major) reads it.

    With `json_select` (see run_json_select) the database writes each object's JSON itself.
    """
    schema = filter_body_schema(table, filters)

    @body(schema)
    def read_filtered(app, req):
        with app.db.read() as tx:
            if json_select is not None:
                select = json_select(tx, table, now_iso(), client_major(req))
                page = tx.scalar(*json_page_query(tx, table, req.data, app.settings, select))
                return 200, RawBody(page.encode(), "application/json")
            rows = query_filtered(tx, table, req.data, app.settings)
        return 200, [out(row, client_major(req)) for row in rows]

    @body(schema)
    def count(app, req):
        with app.db.read() as tx:
            return 200, count_filtered(tx, table, req.data)

    read_filtered.__name__ = f"read_{table}s_filtered"
    count.__name__ = f"count_{table}s"
    if json_select is not None:  # runs: the UI's run lists and dashboard counts, polled by every open page
        return _cached(read_filtered), _cached(count)
    return read_filtered, count


def _paginate_handler(table, filters, page_json):
    """POST /<things>/paginate (Prefect 3): the /filter route's filters and sort, a 1-based `page` of `limit`
    (no offset), answered as {results, count, limit, pages, page}; a page past the last is empty.
    `page_json(app, req, tx, body)` is the page's JSON array text, as the /filter route writes it."""
    fields = {key: field for key, field in filter_body_schema(table, filters).fields.items() if key != "offset"}
    fields["page"] = Field("int", default=1, minimum=1)  # null means 1, as on Prefect's server
    schema = Schema(f"Body_paginate_{table}", fields)

    @body(schema)
    def paginate(app, req):
        most = app.settings["PREFECT_API_DEFAULT_LIMIT"]
        limit = most if req.data.get("limit") is None else req.data["limit"]
        if limit > most:  # refused, not cut short, in Prefect 3's words (its LimitBody)
            raise HTTPError(422, f"Invalid limit: must be less than or equal to {most}.")
        page = req.data.get("page") or 1
        if (page - 1) * limit >= _INT64:  # an offset neither database can take
            why = "page out of range: its offset is beyond 64-bit"
            raise ValidationFailed([_error(("body", "page"), why, "value_error.number.out_of_range")])
        data = {**req.data, "limit": limit, "offset": (page - 1) * limit}
        with app.db.read() as tx:
            results = page_json(app, req, tx, data)
            count = count_filtered(tx, table, data)
        pages = (count + limit - 1) // limit if limit else 0
        tail = f',"count":{count},"limit":{limit},"pages":{pages},"page":{page}}}'
        return 200, RawBody(b'{"results":' + results.encode() + tail.encode(), "application/json")

    paginate.__name__ = f"paginate_{table}s"
    return paginate


def _rows_page_json(table, out):
    def page_json(app, req, tx, data):
        return dumps([out(row, client_major(req)) for row in query_filtered(tx, table, data, app.settings)])

    return page_json


def _runs_page_json(table):
    def page_json(app, req, tx, data):
        select = run_json_select(tx, table, now_iso(), client_major(req))
        return tx.scalar(*json_page_query(tx, table, data, app.settings, select))

    return page_json


_RUN_FILTERS = ("flows", "flow_runs", "task_runs", "deployments", "work_pools", "work_pool_queues")
read_flows_filtered, count_flows = _filter_handler("flow", flow_out, _RUN_FILTERS)
read_flow_runs_filtered, count_flow_runs = _filter_handler("flow_run", flow_run_out, _RUN_FILTERS, run_json_select)
read_task_runs_filtered, count_task_runs = _filter_handler("task_run", task_run_out, _RUN_FILTERS, run_json_select)
paginate_flows = _paginate_handler("flow", _RUN_FILTERS, _rows_page_json("flow", flow_out))
paginate_flow_runs = _paginate_handler("flow_run", _RUN_FILTERS, _runs_page_json("flow_run"))
paginate_task_runs = _paginate_handler("task_run", _RUN_FILTERS, _runs_page_json("task_run"))
_read_logs_page, _count_logs = _filter_handler("log", _decoded("log"), ("logs",))


@body(_read_logs_page.body_schema)
def read_logs_filtered(app, req):
    """Logs are refused, not cut short, past the page size (Prefect's `le` on `limit`): the 2.20 CLI's
    `flow-run logs --num-logs 500` pages on when told so, and would stop at 200 on a clamped answer. Prefect 3
    refuses it in its own words, which the 3.9 CLI looks for before it pages on by itself."""
    most = app.settings["PREFECT_API_DEFAULT_LIMIT"]
    if req.data.get("limit") is not None and req.data["limit"] > most and client_major(req) == 3:
        raise HTTPError(422, f"Invalid limit: must be less than or equal to {most}.")
    if req.data.get("limit") is not None and req.data["limit"] > most:
        raise ValidationFailed(
            [
                _error(
                    ("body", "limit"), f"ensure this value is less than or equal to {most}", "value_error.number.not_le"
                )
            ]
        )
    return _read_logs_page(app, req)


# Handlers: flow runs


@body(FlowRunCreate)
def create_flow_run_handler(app, req):
    with app.db.write() as tx:
        queue = flow_run_pool_queue(tx, req.data.get("work_pool_name"), req.data.get("work_queue_name"))
        run, created = create_flow_run(tx, req.data, queue, major=client_major(req))
    return (201 if created else 200), run


def read_flow_run(app, req):
    with app.db.read() as tx:
        return 200, flow_run_out(require_row(tx, "flow_run", req.uuid(), "Flow run"), client_major(req))


@body(FlowRunUpdate)
def update_flow_run(app, req):
    changes = sent_fields(req)
    with app.db.write() as tx:
        require_row(tx, "flow_run", req.uuid(), "Flow run", lock=True)
        update_row(tx, "flow_run", req.uuid(), {**changes, "updated": now_iso()})
    return 204, NO_CONTENT


def update_flow_run_labels(app, req):
    """PATCH /flow_runs/{id}/labels (3.x): the body's labels merged into the run's stored ones (the 3.x SDK's
    run_deployment sends the caller's OpenTelemetry trace context this way, and failed on a 404)."""
    labels = _validate_kind(LABELS, req.json(), ("body",))
    with app.db.write() as tx:
        stored = require_row(tx, "flow_run", req.uuid(), "Flow run", lock=True).get("labels")
        merged = {**(_json_text(stored) if isinstance(stored, str) else stored or {}), **labels}
        update_row(tx, "flow_run", req.uuid(), {"labels": merged, "updated": now_iso()})
    return 204, NO_CONTENT


def remove_flow_run(tx, run_id: str) -> bool:
    if not tx.execute("DELETE FROM flow_run WHERE id = ?", (run_id,)).rowcount:
        return False
    tx.execute("DELETE FROM log WHERE flow_run_id = ?", (run_id,))  # as Prefect: its logs go with it
    return True


def delete_flow_run(app, req):
    with app.db.write() as tx:
        if not remove_flow_run(tx, req.uuid()):
            raise NotFound("Flow run not found")
    return 204, NO_CONTENT


bulk_delete_flow_runs = _bulk_delete_handler("flow_run", "flow_runs", remove_flow_run)

BulkSetStateBody = Schema(
    "Body_bulk_set_flow_run_state",
    {
        "flow_runs": Field("object"),
        "state": Field(StateCreate, required=True, nullable=False),
        "force": Field("bool", default=False, nullable=False),
        "limit": _BULK_LIMIT_FIELD,
    },
)


@body(BulkSetStateBody)
def bulk_set_flow_run_state(app, req):
    """The state proposed to each chosen run in turn, each in its own transaction, as /set_state would; a run
    whose proposal fails (say, deleted meanwhile) is an ABORT with the reason, and the others go on."""
    with app.db.read() as tx:
        ids = bulk_chosen_ids(tx, "flow_run", "flow_runs", req.data, app.settings)
    results = []
    for run_id in ids:
        try:
            with app.db.write() as tx:
                outcome = set_run_state(
                    tx, "flow", run_id, json.loads(dumps(req.data["state"])), req.data["force"], client_major(req)
                )
            results.append(
                {
                    "flow_run_id": run_id,
                    "status": outcome.status,
                    "state": state_for_client(outcome.state, client_major(req)),
                    "details": outcome.details(),
                }
            )
        except (NotFound, Conflict, ValidationFailed, HTTPError, IntegrityViolation, DataRejected) as exc:
            reason = getattr(exc, "detail", None) or str(exc)
            results.append(
                {
                    "flow_run_id": run_id,
                    "status": "ABORT",
                    "state": None,
                    "details": {"type": "abort_details", "reason": str(reason)},
                }
            )
    return 200, {"results": results}


# A run's logs are answered in one piece (no streamed responses here): at most this many bytes of them (their
# messages' UTF-8, and LOG_ROW_BYTES a row for the other columns), else a 422 that says so. Prefect
# streams them; an answer held whole in memory must be bounded, however many logs a client wrote.
LOG_DOWNLOAD_MAX_BYTES = 50_000_000
LOG_ROW_BYTES = 120


def _logs_too_large() -> HTTPError:
    return HTTPError(
        422,
        f"The flow run's logs are too large to download at once (more than {LOG_DOWNLOAD_MAX_BYTES} bytes); "
        "read them a page at a time with POST /logs/filter.",
    )


def _csv_time(text: str | None) -> str:
    return "" if text is None else str(from_iso(text).astimezone(_dt.timezone.utc))


def download_flow_run_logs(app, req):
    """All the run's logs, oldest first, as CSV (a header row, then timestamp, level, flow_run_id, task_run_id
    and message), named after the run, as Prefect 3's server sends them."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["timestamp", "level", "flow_run_id", "task_run_id", "message"])
    with app.db.read() as tx:
        run = require_row(tx, "flow_run", req.uuid(), "Flow run")
        length = tx.db.byte_length.format(x="message")
        total = tx.query_one(
            f"SELECT COUNT(*) AS n, COALESCE(SUM({length}), 0) AS size FROM log WHERE flow_run_id = ?", (req.uuid(),)
        )
        if int(total["size"]) + LOG_ROW_BYTES * int(total["n"]) > LOG_DOWNLOAD_MAX_BYTES:
            raise _logs_too_large()
        offset, size = 0, 1000
        while True:
            rows = tx.query(
                f"SELECT * FROM log WHERE flow_run_id = ? ORDER BY {order_by('log', 'TIMESTAMP_ASC')} LIMIT ? OFFSET ?",
                (req.uuid(), size, offset),
            )
            for row in rows:
                writer.writerow(
                    [_csv_time(row["timestamp"]), row["level"], row["flow_run_id"], row["task_run_id"], row["message"]]
                )
            if len(rows) < size:
                break
            if out.tell() > LOG_DOWNLOAD_MAX_BYTES:  # characters, so fewer: logs written since the size was read
                raise _logs_too_large()
            offset += size
    filename = urllib.parse.quote(f"{run['name']}-logs.csv", safe="")
    disposition = f"attachment; filename=\"flow-run-logs.csv\"; filename*=UTF-8''{filename}"
    return 200, RawBody(out.getvalue().encode(), "text/csv; charset=utf-8"), {"Content-Disposition": disposition}


def _orchestration_reply(req, outcome: Outcome):
    payload = {
        "state": state_for_client(outcome.state, client_major(req)),
        "status": outcome.status,
        "details": outcome.details(),
    }
    return (201 if outcome.written else 200), payload


@body(SetStateBody)
def set_flow_run_state(app, req):
    with app.db.write() as tx:
        outcome = set_run_state(tx, "flow", req.uuid(), req.data["state"], req.data["force"], client_major(req))
    return _orchestration_reply(req, outcome)


def resume_flow_run_handler(app, req):
    run_input = req.body_dict().get("run_input")
    if run_input is not None and not isinstance(run_input, dict):
        raise ValidationFailed([_error(("body", "run_input"), "value is not a valid dict", "type_error.dict")])
    with app.db.write() as tx:
        outcome = resume_flow_run(tx, req.uuid(), run_input)
    return _orchestration_reply(req, outcome)


FlowRunInputCreate = Schema(
    "Body_create_flow_run_input_flow_runs__id__input_post",
    {
        "key": Field("str", required=True, nullable=False, pattern=r"[a-z0-9-]*", max_length=255),
        "value": Field("str", required=True, nullable=False),
        "sender": Field("str", max_length=255),
    },
)
FlowRunInputFilter = Schema(
    "Body_filter_flow_run_input_flow_runs__id__input_filter_post",
    {
        "prefix": Field("str", required=True, nullable=False),
        "limit": Field("int", default=1, nullable=False, minimum=0),
        "exclude_keys": Field(ListOf("str"), default=list, nullable=False),
    },
)


@body(FlowRunInputCreate)
def create_flow_run_input_handler(app, req):
    with app.db.write() as tx:
        create_flow_run_input(tx, req.uuid(), req.data["key"], req.data["value"], req.data.get("sender"))
    return 201, None


@body(FlowRunInputFilter)
def filter_flow_run_inputs_handler(app, req):
    with app.db.read() as tx:
        return 200, filter_flow_run_inputs(
            tx, req.uuid(), req.data["prefix"], req.data["limit"], req.data["exclude_keys"]
        )


def read_flow_run_input_handler(app, req):
    """The value as the client stored it: plain text (the SDK stores JSON text and parses it itself)."""
    with app.db.read() as tx:
        value = read_flow_run_input(tx, req.uuid(), req.params["key"])
    return 200, RawBody(value.encode(), "text/plain; charset=utf-8")


def delete_flow_run_input_handler(app, req):
    with app.db.write() as tx:
        delete_flow_run_input(tx, req.uuid(), req.params["key"])
    return 204, NO_CONTENT


def read_flow_run_graph(app, req):
    with app.db.read() as tx:
        return 200, flow_run_graph(tx, req.uuid(), client_major(req))


def read_flow_run_graph_v2(app, req):
    with app.db.read() as tx:
        return 200, flow_run_graph_v2(tx, req.uuid())


HistoryBody = Schema(
    "Body_history",
    {
        "history_start": Field("datetime", required=True, nullable=False),
        "history_end": Field("datetime", required=True, nullable=False),
        "history_interval_seconds": Field("float", required=True, nullable=False),
        **{key: Field("object") for key in _RUN_FILTERS},
    },
)


@_cached
@body(HistoryBody)
def flow_run_history(app, req):
    with app.db.read() as tx:
        return 200, run_history(tx, "flow_run", req.data)


@_cached
@body(HistoryBody)
def task_run_history(app, req):
    with app.db.read() as tx:
        return 200, run_history(tx, "task_run", req.data)


def _read_states(table, run_column):
    def read_states(app, req):
        run_id = req.arg(run_column)
        if run_id is None:
            raise ValidationFailed([_error(("query", run_column), "field required", "value_error.missing")])
        run_id = parse_uuid(run_id, ("query", run_column))
        with app.db.read() as tx:
            rows = tx.query(f"SELECT * FROM {table} WHERE {run_column} = ? ORDER BY timestamp, id", (run_id,))
        return 200, [state_out(table, r, client_major(req)) for r in rows]

    def read_state(app, req):
        with app.db.read() as tx:
            return 200, state_out(table, require_row(tx, table, req.uuid(), "State"), client_major(req))

    read_states.__name__, read_state.__name__ = f"read_{table}s", f"read_{table}"
    return read_states, read_state


read_flow_run_states, read_flow_run_state = _read_states("flow_run_state", "flow_run_id")
read_task_run_states, read_task_run_state = _read_states("task_run_state", "task_run_id")


# Handlers: task runs


@body(TaskRunCreate)
def create_task_run_handler(app, req):
    with app.db.write() as tx:
        run, created = create_task_run(tx, req.data, client_major(req))
    return (201 if created else 200), run


def read_task_run(app, req):
    with app.db.read() as tx:
        return 200, task_run_out(require_row(tx, "task_run", req.uuid(), "Task run"), client_major(req))


@body(TaskRunUpdate)
def update_task_run(app, req):
    changes = sent_fields(req)
    with app.db.write() as tx:
        require_row(tx, "task_run", req.uuid(), "Task run")
        update_row(tx, "task_run", req.uuid(), {**changes, "updated": now_iso()})
    return 204, NO_CONTENT


def delete_task_run(app, req):
    with app.db.write() as tx:
        if not tx.execute("DELETE FROM task_run WHERE id = ?", (req.uuid(),)).rowcount:
            raise NotFound("Task run not found")
    return 204, NO_CONTENT


@body(SetStateBody)
def set_task_run_state(app, req):
    with app.db.write() as tx:
        outcome = set_run_state(tx, "task", req.uuid(), req.data["state"], req.data["force"])
    return _orchestration_reply(req, outcome)


TaskWorkerFilter = Schema("TaskWorkerFilter", {"task_keys": Field(ListOf("str"), required=True, nullable=False)})
TaskWorkerFilterBody = Schema(
    "Body_read_task_workers_task_workers_filter_post", {"task_worker_filter": Field(TaskWorkerFilter)}
)


@body(TaskWorkerFilterBody)
def read_task_workers(app, req):
    """The task workers subscribed to the processes on this database (3.x), those with any of the keys asked for
    (none asked: all of them)."""
    wanted = (req.data["task_worker_filter"] or {}).get("task_keys")
    return 200, app.task_dispatcher.workers(wanted or None, utcnow())


# Handlers: logs


@body(LogBatch)
def create_logs_handler(app, req):
    with app.db.write() as tx:
        create_logs(tx, req.data)
    return 201, None


# Handlers: events (Prefect 3)


def _next_page_url(req: Request, token: str | None) -> str | None:
    if token is None:
        return None
    host = req.headers.get("Host") or "localhost"
    scheme = "https" if (req.headers.get("X-Forwarded-Proto") or "").lower() == "https" else "http"
    return f"{scheme}://{host}/api/events/filter/next?page-token={urllib.parse.quote(token)}"


def _event_page(req: Request, events: list[dict], total: int, token: str | None) -> dict:
    return {"events": events, "total": total, "next_page": _next_page_url(req, token)}


@body(EventFilterBody)
def read_events_handler(app, req):
    flt = normalize_event_filter(req.body_dict().get("filter"))
    limit = min(req.data["limit"], EVENT_PAGE_SIZE)
    with app.db.read() as tx:
        events, total = read_events_page(tx, flt, limit)
    return 200, _event_page(req, events, total, event_page_token(flt, total, limit, 0))


def read_events_next_page(app, req):
    token = req.arg("page-token")
    if not token:
        raise ValidationFailed([_error(("query", "page-token"), "field required", "value_error.missing")])
    try:
        flt, limit, offset = parse_event_page_token(token)
    except ValueError:
        raise HTTPError(403, "Forbidden") from None
    with app.db.read() as tx:
        events, total = read_events_page(tx, flt, limit, offset)
    return 200, _event_page(req, events, total, event_page_token(flt, total, limit, offset))


@body(EventCountBody)
def count_events_handler(app, req):
    countable = req.params["countable"]
    if countable not in EVENT_COUNTABLES:
        allowed = ", ".join(repr(c) for c in EVENT_COUNTABLES)
        raise ValidationFailed(
            [
                _error(
                    ("path", "countable"),
                    f"value is not a valid enumeration member; permitted: {allowed}",
                    "type_error.enum",
                )
            ]
        )
    flt = normalize_event_filter(req.body_dict().get("filter"))
    with app.db.read() as tx:
        return 200, count_events(tx, flt, countable, req.data["time_unit"], req.data["time_interval"])


@body(ListOf(EventCreate))
def create_events_handler(app, req):
    """POST /events: a batch of events over plain HTTP (what Prefect 3's ephemeral clients use)."""
    events = [validate_event(e, ("body", i)) for i, e in enumerate(req.json())]
    with app.db.write() as tx:
        store_events(tx, events)
    return 204, NO_CONTENT


# Handlers: server configuration (Prefect 3)


def read_result_storage(app, req):
    with app.db.read() as tx:
        return 200, read_configuration(tx, RESULT_STORAGE_KEY) or {"default_result_storage_block_id": None}


@body(ResultStorageUpdate)
def update_result_storage(app, req):
    with app.db.write() as tx:
        set_default_result_storage(tx, req.data["default_result_storage_block_id"])
        return 200, read_configuration(tx, RESULT_STORAGE_KEY)


def clear_result_storage(app, req):
    with app.db.write() as tx:
        tx.execute("DELETE FROM configuration WHERE key = ?", (RESULT_STORAGE_KEY,))
    return 204, NO_CONTENT


# --- 20. Resource handlers ---
# Owns the HTTP handlers of blocks, variables, artifacts, concurrency limits and saved searches.

# Handlers: blocks


@body(BlockTypeCreate)
def create_block_type_handler(app, req):
    with app.db.write() as tx:
        return 201, create_block_type(tx, req.data)


def read_block_type(app, req):
    with app.db.read() as tx:
        return 200, block_type_out(require_row(tx, "block_type", req.uuid(), "Block type"))


def _block_type_by_slug(tx, slug):
    row = tx.query_one("SELECT * FROM block_type WHERE slug = ?", (slug,))
    if row is None:
        raise NotFound("Block type not found")
    return row


def read_block_type_by_slug(app, req):
    with app.db.read() as tx:
        return 200, block_type_out(_block_type_by_slug(tx, req.params["slug"]))


@body(BlockTypeUpdate)
def update_block_type(app, req):
    with app.db.write() as tx:
        row = require_row(tx, "block_type", req.uuid(), "Block type", lock=True)
        if row["is_protected"]:
            # Protected types are ours and stay as they are. The SDK PATCHes a type whose description
            # differs from its own before saving a block; refusing would break `.save()`, so the
            # request is acknowledged and nothing changes.
            return 204, NO_CONTENT
        changes = sent_fields(req)
        update_row(tx, "block_type", req.uuid(), {**changes, "updated": now_iso()})
    return 204, NO_CONTENT


def delete_block_type(app, req):
    with app.db.write() as tx:
        row = require_row(tx, "block_type", req.uuid(), "Block type", lock=True)
        if row["is_protected"]:
            raise HTTPError(403, "protected block types cannot be deleted.")
        tx.execute("DELETE FROM block_type WHERE id = ?", (req.uuid(),))
    return 204, NO_CONTENT


BlockTypeFilterBody = filter_body_schema("block_type", ("block_types", "block_schemas"))


@body(BlockTypeFilterBody)
def read_block_types_filtered(app, req):
    with app.db.read() as tx:
        where, params = build_where(tx, "block_type", req.data)
        rows = tx.query(
            f"SELECT block_type.* FROM block_type WHERE {where} ORDER BY name LIMIT ? OFFSET ?",
            (*params, page_limit(req.data, app.settings), req.data["offset"] or 0),
        )
        return 200, [block_type_out(r) for r in rows]


@body(BlockSchemaCreate)
def create_block_schema_handler(app, req):
    with app.db.write() as tx:
        schema, created = create_block_schema(tx, req.data)
    return (201 if created else 200), schema


def read_block_schema(app, req):
    with app.db.read() as tx:
        return 200, block_schema_out(tx, require_row(tx, "block_schema", req.uuid(), "Block schema"))


def read_block_schema_by_checksum(app, req):
    version = req.arg("version")
    with app.db.read() as tx:
        sql, params = "SELECT * FROM block_schema WHERE checksum = ?", [req.params["checksum"]]
        if version:
            sql, params = sql + " AND version = ?", params + [version]
        row = tx.query_one(sql + " ORDER BY created DESC LIMIT 1", params)
        if row is None:
            raise NotFound("Block schema not found")
        return 200, block_schema_out(tx, row)


def delete_block_schema(app, req):
    with app.db.write() as tx:
        row = require_row(tx, "block_schema", req.uuid(), "Block schema")
        if tx.scalar("SELECT is_protected FROM block_type WHERE id = ?", (row["block_type_id"],)):
            raise HTTPError(403, "Block schemas for protected block types cannot be deleted.")
        tx.execute("DELETE FROM block_schema WHERE id = ?", (req.uuid(),))
    return 204, NO_CONTENT


BlockSchemaFilterBody = filter_body_schema("block_schema", ("block_schemas",))


@body(BlockSchemaFilterBody)
def read_block_schemas_filtered(app, req):
    with app.db.read() as tx:
        where, params = build_where(tx, "block_schema", req.data)
        rows = tx.query(
            f"SELECT block_schema.* FROM block_schema WHERE {where} ORDER BY created DESC LIMIT ? OFFSET ?",
            (*params, page_limit(req.data, app.settings), req.data["offset"] or 0),
        )
        return 200, [block_schema_out(tx, r) for r in rows]


def read_block_capabilities(app, req):
    with app.db.read() as tx:
        caps = set()
        for row in tx.query("SELECT capabilities FROM block_schema"):
            caps.update(json.loads(row["capabilities"] or "[]"))
    return 200, sorted(caps)


@body(BlockDocumentCreate)
def create_block_document_handler(app, req):
    with app.db.write() as tx:
        return 201, create_block_document(tx, req.data)


def read_block_document(app, req):
    with app.db.read() as tx:
        row = require_row(tx, "block_document", req.uuid(), "Block document")
        return 200, block_document_out(tx, row, req.bool_arg("include_secrets"))


@body(BlockDocumentUpdate)
def update_block_document_handler(app, req):
    with app.db.write() as tx:
        update_block_document(tx, req.uuid(), req.data, req.body_dict())
    return 204, NO_CONTENT


def delete_block_document(app, req):
    with app.db.write() as tx:
        if not tx.execute("DELETE FROM block_document WHERE id = ?", (req.uuid(),)).rowcount:
            raise NotFound("Block document not found")
    return 204, NO_CONTENT


BlockDocumentFilterBody = Schema(
    "Body_read_block_documents",
    {
        **filter_body_schema("block_document", ("block_documents", "block_types", "block_schemas")).fields,
        "include_secrets": Field("bool", default=False, nullable=False),
    },
)


def _block_documents_where(tx, data):
    body = dict(data)
    flt = dict(body.get("block_documents") or {})
    if "is_anonymous" not in flt:  # anonymous documents are hidden unless asked for (null: either)
        flt["is_anonymous"] = {"eq_": False}
    body["block_documents"] = flt
    return build_where(tx, "block_document", body)


@body(BlockDocumentFilterBody)
def read_block_documents_filtered(app, req):
    with app.db.read() as tx:
        where, params = _block_documents_where(tx, req.data)
        rows = tx.query(
            f"SELECT block_document.* FROM block_document WHERE {where} "
            f"ORDER BY {order_by('block_document', req.data.get('sort'))} LIMIT ? OFFSET ?",
            (*params, page_limit(req.data, app.settings), req.data["offset"] or 0),
        )
        return 200, [block_document_out(tx, r, req.data["include_secrets"]) for r in rows]


@body(BlockDocumentFilterBody)
def count_block_documents(app, req):
    with app.db.read() as tx:
        where, params = _block_documents_where(tx, req.data)
        return 200, int(tx.scalar(f"SELECT COUNT(*) FROM block_document WHERE {where}", params))


def read_block_documents_of_type(app, req):
    with app.db.read() as tx:
        block_type = _block_type_by_slug(tx, req.params["slug"])
        rows = tx.query(
            "SELECT * FROM block_document WHERE block_type_id = ? AND is_anonymous = ? ORDER BY name",
            (block_type["id"], False),
        )
        return 200, [block_document_out(tx, r, req.bool_arg("include_secrets")) for r in rows]


def read_block_document_by_name(app, req):
    with app.db.read() as tx:
        block_type = _block_type_by_slug(tx, req.params["slug"])
        row = tx.query_one(
            "SELECT * FROM block_document WHERE block_type_id = ? AND name = ?",
            (block_type["id"], req.params["block_document_name"]),
        )
        if row is None:
            raise NotFound("Block document not found")
        return 200, block_document_out(tx, row, req.bool_arg("include_secrets"))


# Handlers: variables


@body(VariableCreate)
def create_variable_handler(app, req):
    with app.db.write() as tx:
        return 201, create_variable(tx, req.data)


def _variable_row(tx, req, lock=False):
    if "name" in req.params:
        row = tx.query_one(
            f"SELECT * FROM variable WHERE name = ?{tx.db.for_update if lock else ''}", (req.params["name"],)
        )
    else:
        row = read_row(tx, "variable", req.uuid(), lock)
    if row is None:
        raise NotFound("Variable not found.")
    return row


def read_variable(app, req):
    with app.db.read() as tx:
        return 200, decode_row("variable", _variable_row(tx, req))


@body(VariableUpdate)
def update_variable(app, req):
    changes = sent_fields(req)
    _check_variable_value(changes)
    with app.db.write() as tx:
        row = _variable_row(tx, req, lock=True)
        if "name" in changes and changes["name"] != row["name"]:
            if tx.query_one("SELECT 1 FROM variable WHERE name = ?", (changes["name"],)):
                raise Conflict(f'A variable with the name "{changes["name"]}" already exists.')
        update_row(tx, "variable", row["id"], {**changes, "updated": now_iso()})
    return 204, NO_CONTENT


def delete_variable(app, req):
    with app.db.write() as tx:
        row = _variable_row(tx, req, lock=True)
        tx.execute("DELETE FROM variable WHERE id = ?", (row["id"],))
    return 204, NO_CONTENT


read_variables_filtered, count_variables = _filter_handler("variable", _decoded("variable"), ("variables",))


# Handlers: artifacts


@body(ArtifactCreate)
def create_artifact_handler(app, req):
    with app.db.write() as tx:
        return 201, create_artifact(tx, req.data)


def read_artifact(app, req):
    with app.db.read() as tx:
        return 200, decode_row("artifact", require_row(tx, "artifact", req.uuid(), "Artifact"))


@body(ArtifactUpdate)
def update_artifact(app, req):
    changes = sent_fields(req)
    with app.db.write() as tx:
        require_row(tx, "artifact", req.uuid(), "Artifact", lock=True)
        update_row(tx, "artifact", req.uuid(), {**changes, "updated": now_iso()})
    return 204, NO_CONTENT


def delete_artifact_handler(app, req):
    with app.db.write() as tx:
        delete_artifact(tx, req.uuid())
    return 204, NO_CONTENT


def read_latest_artifact(app, req):
    with app.db.read() as tx:
        row = tx.query_one("SELECT * FROM artifact_collection WHERE key = ?", (req.params["key"],))
        if row is None:
            raise NotFound("Artifact not found.")
        return 200, decode_row("artifact", read_row(tx, "artifact", row["latest_id"]))


_ARTIFACT_FILTERS = ("artifacts", "flow_runs", "task_runs")
read_artifacts_filtered, count_artifacts = _filter_handler("artifact", _decoded("artifact"), _ARTIFACT_FILTERS)
ArtifactFilterBody = filter_body_schema("artifact", _ARTIFACT_FILTERS)
_LATEST_ONLY = "artifact.id IN (SELECT latest_id FROM artifact_collection)"


@body(ArtifactFilterBody)
def read_latest_artifacts_filtered(app, req):
    with app.db.read() as tx:
        rows = query_filtered(tx, "artifact", req.data, app.settings, _LATEST_ONLY)
        out = []
        for row in rows:
            collection = tx.query_one("SELECT * FROM artifact_collection WHERE key = ?", (row["key"],))
            out.append(artifact_collection_out(tx, collection))
        return 200, out


@body(ArtifactFilterBody)
def count_latest_artifacts(app, req):
    with app.db.read() as tx:
        return 200, count_filtered(tx, "artifact", req.data, _LATEST_ONLY)


# Handlers: concurrency limits


@body(ConcurrencyLimitCreate)
def create_tag_limit_handler(app, req):
    with app.db.write() as tx:
        name = TAG_LIMIT_PREFIX + req.data["tag"]
        row = None
        if client_major(req) == 3:  # Prefect 3.9 sets the global limit tag:NAME where there is one: reads show it
            row = tx.query_one(f"SELECT * FROM concurrency_limit_v2 WHERE name = ?{tx.db.for_update}", (name,))
        if row is not None:
            update_row(
                tx, "concurrency_limit_v2", row["id"], {"limit": req.data["concurrency_limit"], "updated": now_iso()}
            )
            return 200, global_tag_limit_as_v1(tx, read_row(tx, "concurrency_limit_v2", row["id"]))
        limit, created = create_tag_limit(tx, req.data)
    return (201 if created else 200), limit


def _tag_limit_row(tx, req, lock=False):
    if "tag" in req.params:
        row = tx.query_one(
            f"SELECT * FROM concurrency_limit WHERE tag = ?{tx.db.for_update if lock else ''}", (req.params["tag"],)
        )
    else:
        row = read_row(tx, "concurrency_limit", req.uuid(), lock)
    if row is None:
        raise NotFound("Concurrency limit not found")
    return row


def _global_tag_limit_row(tx, req, lock=False, any_name=False) -> dict | None:
    """For a 3.x client, the global limit a tag limit route means, or None: Prefect 3.9 looks for `tag:NAME` (by
    tag), or for a global limit by id (a `tag:` one; `any_name` for a deletion, which takes any), before its tag
    limits. 2.x clients have only tag limits, as on 2.20."""
    if client_major(req) != 3:
        return None
    suffix = tx.db.for_update if lock else ""
    if "tag" in req.params:
        name = TAG_LIMIT_PREFIX + req.params["tag"]
        return tx.query_one(f"SELECT * FROM concurrency_limit_v2 WHERE name = ?{suffix}", (name,))
    row = tx.query_one(f"SELECT * FROM concurrency_limit_v2 WHERE id = ?{suffix}", (req.uuid(),))
    return row if row is not None and (any_name or row["name"].startswith(TAG_LIMIT_PREFIX)) else None


def _leases_holding(tx, limit_id: str) -> list[dict]:
    """The unexpired leases on a global limit, oldest first."""
    rows = tx.query(
        "SELECT * FROM concurrency_lease WHERE limit_ids LIKE ? AND expiration > ? ORDER BY created, id",
        (f"%{limit_id}%", now_iso()),
    )
    leases = [decode_row("concurrency_lease", row) for row in rows]
    return [lease for lease in leases if limit_id in lease["limit_ids"]]  # LIKE only narrows


def global_tag_limit_as_v1(tx, row: dict) -> dict:
    """A global limit `tag:NAME` in a tag limit's shape, as Prefect 3.9 shows it to tag limit routes: its
    active_slots are the task runs holding an unexpired lease on it, oldest lease first."""
    limit = decode_row("concurrency_limit_v2", row)
    holders = [lease["holder"] or {} for lease in _leases_holding(tx, limit["id"])]
    return {
        "id": limit["id"],
        "created": limit["created"],
        "updated": limit["updated"],
        "tag": limit["name"][len(TAG_LIMIT_PREFIX) :],
        "concurrency_limit": limit["limit"],
        "active_slots": [holder["id"] for holder in holders if holder.get("type") == "task_run"],
    }


def read_tag_limit(app, req):
    with app.db.read() as tx:
        row = _global_tag_limit_row(tx, req)
        if row is not None:
            return 200, global_tag_limit_as_v1(tx, row)
        return 200, decode_row("concurrency_limit", _tag_limit_row(tx, req))


def delete_tag_limit(app, req):
    with app.db.write() as tx:
        row = _global_tag_limit_row(tx, req, lock=True, any_name=True)
        if row is not None:  # as DELETE /v2/concurrency_limits/{id} does
            tx.execute("DELETE FROM concurrency_limit_v2 WHERE id = ?", (row["id"],))
            return 204, NO_CONTENT
        row = _tag_limit_row(tx, req, lock=True)
        tx.execute("DELETE FROM concurrency_limit WHERE id = ?", (row["id"],))
    return 204, NO_CONTENT


# How long Prefect 3.9 leases a slot that a reset's slot_override gives a task run: for as good as ever
OVERRIDE_LEASE_SECONDS = 100 * 365 * 86400


def reset_tag_limit(app, req):
    override = req.body_dict().get("slot_override")
    slots = _validate_kind(ListOf("uuid"), override, ("body", "slot_override")) if override is not None else []
    with app.db.write() as tx:
        # not locked here: release_lease locks tag limits before global ones, as increment-with-lease does
        row = _global_tag_limit_row(tx, req)
        if row is not None:  # Prefect 3.9 gives back every lease on it, then leases a slot to each override
            for lease in _leases_holding(tx, row["id"]):
                release_lease(tx, lease["id"])
            limit = {"id": row["id"], "name": row["name"], "limit": row["limit"]}
            for task_run_id in slots:
                tx.execute("UPDATE concurrency_limit_v2 SET active_slots = active_slots + 1 WHERE id = ?", (row["id"],))
                create_lease(tx, [limit], 1, OVERRIDE_LEASE_SECONDS, {"type": "task_run", "id": task_run_id})
            return 200, None
        row = _tag_limit_row(tx, req, lock=True)
        update_row(tx, "concurrency_limit", row["id"], {"active_slots": slots, "updated": now_iso()})
    return 200, None


@body(filter_body_schema("concurrency_limit", ()))
def read_tag_limits_filtered(app, req):
    with app.db.read() as tx:
        limit, offset = page_limit(req.data, app.settings), req.data["offset"] or 0
        if client_major(req) == 3:  # Prefect 3.9: the global `tag:` limits first (as tag limits), then the others
            rows = tx.query("SELECT * FROM concurrency_limit_v2 ORDER BY name")
            shown = [global_tag_limit_as_v1(tx, r) for r in rows if r["name"].startswith(TAG_LIMIT_PREFIX)]
            tags = {limit["tag"] for limit in shown}
            rows = tx.query("SELECT * FROM concurrency_limit ORDER BY tag")
            shown += [decode_row("concurrency_limit", r) for r in rows if r["tag"] not in tags]
            return 200, shown[offset : offset + limit]
        rows = tx.query("SELECT * FROM concurrency_limit ORDER BY tag LIMIT ? OFFSET ?", (limit, offset))
        return 200, [decode_row("concurrency_limit", r) for r in rows]


@body(TagSlotsBody)
def increment_tag_limits(app, req):
    with app.db.write() as tx:
        taken, refused = take_tag_slots(
            tx, req.data["names"], req.data["task_run_id"], float(tx.db.tag_slot_wait_seconds)
        )
        if refused:  # raised inside: nothing taken is kept
            reason, wait = refused
            raise HTTPError(423, reason, {} if wait is None else {"Retry-After": str(wait)})
    return 200, taken


@body(TagSlotsBody)
def decrement_tag_limits(app, req):
    with app.db.write() as tx:
        return 200, give_back_tag_slots(tx, req.data["names"], req.data["task_run_id"])


@body(ConcurrencyLimitV2Create)
def create_global_limit(app, req):
    now = now_iso()
    with app.db.write() as tx:
        row_id = new_id()
        if not insert_row(
            tx,
            "concurrency_limit_v2",
            {"id": row_id, "created": now, "updated": now, **req.data},
            on_conflict="ON CONFLICT DO NOTHING",
        ):
            raise Conflict(f'Concurrency limit with name "{req.data["name"]}" already exists.')
        return 201, decode_row("concurrency_limit_v2", read_row(tx, "concurrency_limit_v2", row_id))


def _global_limit_row(tx, key, lock=False):
    suffix = tx.db.for_update if lock else ""
    if _UUID_RE.match(key):
        row = tx.query_one(f"SELECT * FROM concurrency_limit_v2 WHERE id = ?{suffix}", (parse_uuid(key),))
    else:
        row = tx.query_one(f"SELECT * FROM concurrency_limit_v2 WHERE name = ?{suffix}", (key,))
    if row is None:
        raise NotFound("Concurrency Limit not found")
    return row


def read_global_limit(app, req):
    with app.db.read() as tx:
        return 200, decode_row("concurrency_limit_v2", _global_limit_row(tx, req.params["id_or_name"]))


@body(ConcurrencyLimitV2Update)
def update_global_limit(app, req):
    changes = sent_fields(req)
    with app.db.write() as tx:
        row = _global_limit_row(tx, req.params["id_or_name"], lock=True)
        update_row(tx, "concurrency_limit_v2", row["id"], {**changes, "updated": now_iso()})
    return 204, NO_CONTENT


def delete_global_limit(app, req):
    with app.db.write() as tx:
        row = _global_limit_row(tx, req.params["id_or_name"], lock=True)
        tx.execute("DELETE FROM concurrency_limit_v2 WHERE id = ?", (row["id"],))
    return 204, NO_CONTENT


@body(filter_body_schema("concurrency_limit_v2", ()))
def read_global_limits_filtered(app, req):
    with app.db.read() as tx:
        rows = tx.query(
            "SELECT * FROM concurrency_limit_v2 ORDER BY name LIMIT ? OFFSET ?",
            (page_limit(req.data, app.settings), req.data["offset"] or 0),
        )
        return 200, [decode_row("concurrency_limit_v2", r) for r in rows]


@body(ConcurrencySlotsBody)
def increment_global_limits(app, req):
    with app.db.write() as tx:
        taken = change_global_slots(tx, req.data["names"], req.data["slots"], req.data["mode"], increment=True)
        if taken is None:
            marks = ", ".join("?" for _ in req.data["names"])
            wait = (
                tx.scalar(
                    f"SELECT MAX(avg_slot_occupancy_seconds) FROM concurrency_limit_v2 WHERE name IN ({marks})",
                    tuple(req.data["names"]),
                )
                or 1.0
            )
    if taken is None:  # the denial is recorded (denied_slots) once the transaction above commits
        raise HTTPError(423, "Concurrency limit is full; retry later.", {"Retry-After": f"{max(float(wait), 0.1):.2f}"})
    return 200, taken


@body(ConcurrencySlotsBody)
def decrement_global_limits(app, req):
    with app.db.write() as tx:
        return 200, change_global_slots(
            tx,
            req.data["names"],
            req.data["slots"],
            req.data["mode"],
            increment=False,
            occupancy_seconds=req.data.get("occupancy_seconds"),
        )


def _locked_reply(tx, names: list[str]):
    """423 with Prefect's Retry-After: about one average occupancy of the fullest limit."""
    marks = ", ".join("?" for _ in names)
    wait = (
        tx.scalar(
            f"SELECT MAX(avg_slot_occupancy_seconds) FROM concurrency_limit_v2 WHERE name IN ({marks})", tuple(names)
        )
        or 1.0
    )
    return HTTPError(423, "Concurrency limit is full; retry later.", {"Retry-After": f"{max(float(wait), 0.1):.2f}"})


@body(ConcurrencyLeaseBody)
def increment_global_limits_with_lease(app, req):
    """Prefect 3 takes slots with a lease; a name without a limit takes none (a task's "tag:<tag>" takes the
    tag's v1 limit, if it has one: tag_limits_behind)."""
    data = req.data
    if not data["names"]:
        raise ValidationFailed(
            [_error(("body", "names"), "ensure this value has at least 1 items", "value_error.list.min_items")]
        )
    with app.db.write() as tx:
        tag_limits = tag_limits_behind(tx, data["names"])
        full = tag_limits_full(tag_limits, data["slots"])
        taken = None if full else change_global_slots(tx, data["names"], data["slots"], data["mode"], increment=True)
        if taken is None:
            locked = _locked_reply(tx, data["names"])
        else:
            lease_id = create_lease(tx, taken, data["slots"], data["lease_duration"], data.get("holder"), tag_limits)
    if taken is None:  # the denial is recorded (denied_slots) once the transaction above commits
        raise locked
    return 200, {"lease_id": lease_id, "limits": taken + [as_global_limit(limit) for limit in tag_limits]}


@body(LeaseIdBody)
def decrement_global_limits_with_lease(app, req):
    with app.db.write() as tx:
        release_lease(tx, req.data["lease_id"])  # an unknown lease (already given back) is fine
    return 204, NO_CONTENT


@body(LeaseRenewBody)
def renew_concurrency_lease(app, req):
    with app.db.write() as tx:
        renewed = renew_lease(tx, parse_uuid(req.params["lease_id"], ("path", "lease_id")), req.data["lease_duration"])
    if not renewed:
        raise HTTPError(410, "Lease not found - it may have expired or been revoked")
    return 204, NO_CONTENT


# Handlers: saved searches


@body(SavedSearchCreate)
def create_saved_search(app, req):
    now = now_iso()
    with app.db.write() as tx:
        created = insert_row(
            tx,
            "saved_search",
            {"id": new_id(), "created": now, "updated": now, **req.data},
            on_conflict="ON CONFLICT DO NOTHING",
        )
        row = tx.query_one(f"SELECT * FROM saved_search WHERE name = ?{tx.db.for_update}", (req.data["name"],))
        if not created:
            update_row(tx, "saved_search", row["id"], {"filters": req.data["filters"], "updated": now})
        return (201 if created else 200), decode_row("saved_search", read_row(tx, "saved_search", row["id"]))


def read_saved_search(app, req):
    with app.db.read() as tx:
        return 200, decode_row("saved_search", require_row(tx, "saved_search", req.uuid(), "SavedSearch"))


def delete_saved_search(app, req):
    with app.db.write() as tx:
        if not tx.execute("DELETE FROM saved_search WHERE id = ?", (req.uuid(),)).rowcount:
            raise NotFound("SavedSearch not found")
    return 204, NO_CONTENT


read_saved_searches_filtered, _count_saved_searches = _filter_handler(
    "saved_search", _decoded("saved_search"), ("saved_searches",)
)


# --- 21. Deployment and work handlers ---
# Owns the HTTP handlers of deployments and their schedules, work pools, queues and workers, notification
# policies and automations: each validates its body, calls the section that owns the data, and shapes the
# answer for the client's major version.

# Handlers: deployments

# The fields of a deployment answer, per client major version. 2.20 SDKs in test mode (PREFECT_TEST_MODE=1,
# which users' own test suites set) refuse a field their schema lacks, so they get exactly the 2.20
# contract's DeploymentResponse; 3.x SDKs get their DeploymentResponse's (they ignore others).
# fmt: off
DEPLOYMENT_FIELDS_2 = (
    "id", "created", "updated", "name", "version", "description", "flow_id", "schedule", "is_schedule_active",
    "paused", "schedules", "job_variables", "infra_overrides", "parameters", "pull_steps", "tags",
    "work_queue_name", "last_polled", "parameter_openapi_schema", "path", "entrypoint", "manifest_path",
    "storage_document_id", "infrastructure_document_id", "created_by", "updated_by", "enforce_parameter_schema",
    "work_pool_name", "status",
)
# fmt: on
# fmt: off
DEPLOYMENT_FIELDS_3 = (
    "id", "created", "updated", "name", "version", "description", "flow_id", "concurrency_limit", "paused",
    "schedules", "job_variables", "parameters", "pull_steps", "tags", "work_queue_name", "last_polled",
    "parameter_openapi_schema", "path", "entrypoint", "storage_document_id", "infrastructure_document_id",
    "created_by", "updated_by", "work_queue_id", "enforce_parameter_schema", "work_pool_name", "status",
    "global_concurrency_limit", "concurrency_options", "labels",
)
# fmt: on


def deployment_for_client(req, dep: dict) -> dict:
    """A deployment in the shape of the caller's major version. Job variables are one value: a 2.20
    client reads them as `infra_overrides` beside `"job_variables": null` (as Prefect 2.20 answers: its
    SDK refuses both set and different), a 3.x client as `job_variables`."""
    job_variables = dep.get("job_variables") or dep.get("infra_overrides") or {}
    schedules = [schedule_for_client(client_major(req), s) for s in dep.get("schedules") or []]
    if client_major(req) == 3:  # `concurrency_limit` is always null: Prefect 3 answers the limit in full instead
        return {
            **{k: dep.get(k) for k in DEPLOYMENT_FIELDS_3},
            "job_variables": job_variables,
            "schedules": schedules,
            "concurrency_limit": None,
        }
    return {
        **{k: dep.get(k) for k in DEPLOYMENT_FIELDS_2},
        "job_variables": None,
        "infra_overrides": job_variables,
        "schedules": schedules,
    }


@body(DeploymentCreate)
def create_deployment_handler(app, req):
    with app.db.write() as tx:
        dep, created = upsert_deployment(tx, req.data, req.body_dict())
    app.wake("scheduler")
    return (201 if created else 200), deployment_for_client(req, dep)


def read_deployment(app, req):
    with app.db.read() as tx:
        row = require_row(tx, "deployment", req.uuid(), "Deployment")
        return 200, deployment_for_client(req, deployment_out(tx, row, app.settings, app.clock()))


def read_deployment_by_name(app, req):
    with app.db.read() as tx:
        row = tx.query_one(
            "SELECT d.* FROM deployment d JOIN flow f ON f.id = d.flow_id WHERE f.name = ? AND d.name = ?",
            (req.params["flow_name"], req.params["deployment_name"]),
        )
        if row is None:
            raise NotFound("Deployment not found")
        return 200, deployment_for_client(req, deployment_out(tx, row, app.settings, app.clock()))


@body(DeploymentUpdate, for_2x=DeploymentUpdate2)
def update_deployment_handler(app, req):
    with app.db.write() as tx:
        update_deployment(tx, req.uuid(), req.data, req.body_dict())
    app.wake("scheduler")
    return 204, NO_CONTENT


def remove_deployment(tx, dep_id: str) -> bool:
    if tx.query_one(f"SELECT id FROM deployment WHERE id = ?{tx.db.for_update}", (dep_id,)) is None:
        return False
    # its runs that have not started go too: no worker should pick up a run of a deleted deployment
    tx.execute("DELETE FROM flow_run WHERE deployment_id = ? AND state_type = 'SCHEDULED'", (dep_id,))
    tx.execute("DELETE FROM deployment WHERE id = ?", (dep_id,))
    _deployment_limit(tx, dep_id, None)  # its own limit goes with it, as in Prefect
    return True


def delete_deployment(app, req):
    with app.db.write() as tx:
        if not remove_deployment(tx, req.uuid()):
            raise NotFound("Deployment not found")
    return 204, NO_CONTENT


bulk_delete_deployments = _bulk_delete_handler("deployment", "deployments", remove_deployment)
BULK_CREATE_LIMIT = 100


def _creation_error(exc: Exception) -> str:
    """Why a run of a bulk create was not made, in Prefect's words where they are known."""
    if isinstance(exc, QueueWithoutPool):  # shorter than a single create's refusal
        return (
            f"Cannot create flow run in work queue {exc.queue_name} because deployment is not associated "
            "with a work pool."
        )
    if isinstance(exc, ValidationFailed):
        parts = []
        for err in exc.errors:
            loc = err.get("loc") or ()
            if len(loc) >= 3 and loc[1] == "parameters":
                parts.append(f"Validation failed for field {str(loc[2])!r}. Failure reason: {err.get('msg')}")
            else:
                parts.append(str(err.get("msg")))
        parameters = all(len(e.get("loc") or ()) >= 2 and e["loc"][1] == "parameters" for e in exc.errors)
        return ("Parameter validation failed: " if parameters else "") + "; ".join(parts)
    return str(getattr(exc, "detail", None) or exc)


@body(ListOf(DeploymentFlowRunCreate))
def bulk_create_deployment_flow_runs(app, req):
    """Runs of the deployment, each as /create_flow_run makes one, in one transaction; one that cannot be made
    (parameters the schema refuses) is FAILED with the reason and the others are made."""
    if len(req.data) > BULK_CREATE_LIMIT:
        raise HTTPError(400, f"Cannot create more than {BULK_CREATE_LIMIT} flow runs at once.")
    results = []
    with app.db.write() as tx:
        require_row(tx, "deployment", req.uuid(), "Deployment")
        for data in req.data:
            try:
                run, _created = create_deployment_flow_run(tx, req.uuid(), data, client_major(req))
            except (ValidationFailed, NotFound, Conflict, HTTPError, QueueWithoutPool) as exc:  # before any write
                results.append({"flow_run_id": None, "status": "FAILED", "error": _creation_error(exc)})
                continue
            results.append({"flow_run_id": run["id"], "status": "CREATED", "error": None})
    return 200, {"results": results}


def _set_deployment_paused(paused: bool):
    def handler(app, req):
        with app.db.write() as tx:
            require_row(tx, "deployment", req.uuid(), "Deployment", lock=True)
            update_row(
                tx, "deployment", req.uuid(), {"paused": paused, "is_schedule_active": not paused, "updated": now_iso()}
            )
            tx.execute(
                "UPDATE deployment_schedule SET active = ?, updated = ? WHERE deployment_id = ?",
                (not paused, now_iso(), req.uuid()),
            )
            if paused:  # a paused deployment keeps no future auto-scheduled runs
                tx.execute(
                    "DELETE FROM flow_run WHERE deployment_id = ? AND state_type = 'SCHEDULED' AND auto_scheduled = ?",
                    (req.uuid(), True),
                )
        app.wake("scheduler")
        return 200, None

    return handler


pause_deployment = _set_deployment_paused(True)
pause_deployment.__name__ = "pause_deployment"
resume_deployment = _set_deployment_paused(False)
resume_deployment.__name__ = "resume_deployment"


@body(DeploymentFlowRunCreate)
def create_deployment_flow_run_handler(app, req):
    try:
        with app.db.write() as tx:
            run, created = create_deployment_flow_run(tx, req.uuid(), req.data, client_major(req))
    except QueueWithoutPool as exc:  # Prefect 3.9's words, for 2.x clients too (2.20 answers a bare 500)
        raise HTTPError(
            400,
            f"Cannot create flow run in work queue {exc.queue_name} because deployment {req.uuid()} is not "
            "associated with a work pool. Please remove work_pool_name and try again.",
        ) from None
    return (201 if created else 200), run


@body(ScheduledRunsForDeployments)
def read_scheduled_runs_for_deployments(app, req):
    with app.db.write() as tx:
        return 200, scheduled_runs_for_deployments(tx, req.data, app.settings, app.clock(), client_major(req))


@body(filter_body_schema("deployment", _RUN_FILTERS))
def read_deployments_filtered(app, req):
    with app.db.read() as tx:
        rows, now = query_filtered(tx, "deployment", req.data, app.settings), app.clock()
        return 200, [deployment_for_client(req, deployment_out(tx, r, app.settings, now)) for r in rows]


@body(filter_body_schema("deployment", _RUN_FILTERS))
def count_deployments(app, req):
    with app.db.read() as tx:
        return 200, count_filtered(tx, "deployment", req.data)


def _deployments_page_json(app, req, tx, data):
    rows, now = query_filtered(tx, "deployment", data, app.settings), app.clock()
    return dumps([deployment_for_client(req, deployment_out(tx, r, app.settings, now)) for r in rows])


paginate_deployments = _paginate_handler("deployment", _RUN_FILTERS, _deployments_page_json)


def read_deployment_schedules(app, req):
    with app.db.read() as tx:
        require_row(tx, "deployment", req.uuid(), "Deployment")
        rows = tx.query("SELECT * FROM deployment_schedule WHERE deployment_id = ? ORDER BY created, id", (req.uuid(),))
        return 200, [schedule_for_client(client_major(req), decode_row("deployment_schedule", r)) for r in rows]


def read_next_schedule_times(app, req):
    """Each schedule's next fire times from now (prefectlite's own read, for the UI: Prefect's computes them in
    the browser). Inactive schedules too: the UI says they are off."""
    count = req.int_arg("count", 5, 1, 50)
    with app.db.read() as tx:
        require_row(tx, "deployment", req.uuid(), "Deployment")
        rows = tx.query("SELECT * FROM deployment_schedule WHERE deployment_id = ? ORDER BY created, id", (req.uuid(),))
        schedules = [decode_row("deployment_schedule", r) for r in rows]
    start = utcnow()
    return 200, [
        {
            "schedule_id": s["id"],
            "active": s.get("active", True),
            "times": [iso(t) for t in next_fire_times(s["schedule"], start, n=count)],
        }
        for s in schedules
    ]


@body(ListOf(DeploymentScheduleCreate))
def create_deployment_schedules(app, req):
    """Add schedules to a deployment; the answer is the new ones only, and the others keep their ids."""
    with app.db.write() as tx:
        require_row(tx, "deployment", req.uuid(), "Deployment", lock=True)
        ids = _add_schedules(tx, req.uuid(), req.data, ("body",))
        created = [decode_row("deployment_schedule", read_row(tx, "deployment_schedule", i)) for i in ids]
    app.wake("scheduler")
    return 201, [schedule_for_client(client_major(req), schedule) for schedule in created]


DeploymentScheduleUpdate = Schema(
    "DeploymentScheduleUpdate",
    {
        "schedule": Field("object"),
        "active": Field("bool"),
        "max_active_runs": Field("int", minimum=1),
        "max_scheduled_runs": Field("int", minimum=1),
        "catchup": Field("bool"),
        "parameters": Field("object"),
        "slug": Field("str", max_length=255),
        "replaces": Field("str"),
    },
)


@body(DeploymentScheduleUpdate)
def update_deployment_schedule(app, req):
    """Change one schedule (e.g. `prefect deployment schedule pause`); its runs not yet started go, the
    scheduler makes them again from the schedule as it now is."""
    changes = {
        k: v for k, v in sent_fields(req).items() if v is not None or k in ("max_active_runs", "max_scheduled_runs")
    }
    changes.pop("replaces", None)  # a deploy-time directive, never stored
    if changes.get("schedule") is not None:
        changes["schedule"] = normalise_schedule(changes["schedule"], ("body", "schedule"))
    with app.db.write() as tx:
        require_row(tx, "deployment", req.uuid(), "Deployment", lock=True)
        owner = tx.scalar("SELECT deployment_id FROM deployment_schedule WHERE id = ?", (req.uuid("schedule_id"),))
        if owner != req.uuid():
            raise NotFound("Schedule not found")
        _require_free_slugs(tx, req.uuid(), [changes.get("slug")], except_id=req.uuid("schedule_id"))
        update_row(tx, "deployment_schedule", req.uuid("schedule_id"), {**changes, "updated": now_iso()})
        _drop_future_auto_runs(tx, req.uuid())
    app.wake("scheduler")
    return 204, NO_CONTENT


ScheduleDeploymentBody = Schema(
    "Body_schedule_deployment_deployments__id__schedule_post",
    {
        "start_time": Field("datetime"),
        "end_time": Field("datetime"),
        "min_time": Field("float", minimum=0, maximum=_A_CENTURY),
        "min_runs": Field("int", minimum=0, maximum=100_000),
        "max_runs": Field("int", minimum=0, maximum=100_000),
    },
)


@body(ScheduleDeploymentBody)
def schedule_deployment(app, req):
    """Runs for the deployment's active schedules now, between start_time and end_time (a backfill when
    they lie in the past); the scheduler's settings where the body is silent."""
    data = req.data
    with app.db.write() as tx:
        row = require_row(tx, "deployment", req.uuid(), "Deployment", lock=True)
        schedule_deployment_runs(
            tx,
            deployment_out(tx, row),
            app.settings,
            app.clock(),
            start=from_iso(data["start_time"]) if data.get("start_time") else None,
            end=from_iso(data["end_time"]) if data.get("end_time") else None,
            min_time=data.get("min_time"),
            min_runs=data.get("min_runs"),
            max_runs=data.get("max_runs"),
        )
    return 200, None


def delete_deployment_schedule(app, req):
    with app.db.write() as tx:
        if not tx.execute(
            "DELETE FROM deployment_schedule WHERE id = ? AND deployment_id = ?", (req.uuid("schedule_id"), req.uuid())
        ).rowcount:
            raise NotFound("Schedule not found")
        tx.execute(
            "DELETE FROM flow_run WHERE deployment_id = ? AND auto_scheduled = ? AND state_type = 'SCHEDULED' "
            "AND start_time IS NULL",
            (req.uuid(), True),
        )
    return 204, NO_CONTENT


# Handlers: work pools, queues, workers


# The worker types clients may find, by the package that provides each: GET /collections/views/
# aggregate-worker-metadata. Prefect's server fetches this from its collections registry, or when it cannot
# reach it serves a catalogue bundled with it; we serve the same packages and types, offline, with no
# base job templates (a client uses the template of a worker it has installed). `prefect worker start`
# reads the package of a pool's type here, to offer installing it.
WORKER_TYPE_CATALOGUE = {
    "prefect": {"process": "Process", "prefect-agent": "Prefect Agent"},
    "prefect-aws": {"ecs": "AWS Elastic Container Service"},
    "prefect-azure": {"azure-container-instance": "Azure Container Instances"},
    "prefect-docker": {"docker": "Docker"},
    "prefect-gcp": {
        "cloud-run": "Google Cloud Run",
        "cloud-run-v2": "Google Cloud Run V2",
        "vertex-ai": "Google Vertex AI",
    },
    "prefect-kubernetes": {"kubernetes": "Kubernetes"},
}
COLLECTION_VIEWS = ("aggregate-block-metadata", "aggregate-flow-metadata", "aggregate-worker-metadata", "demo-flows")


def worker_type_metadata() -> dict:
    return {
        package: {
            kind: {
                "type": kind,
                "display_name": name,
                "install_command": f"pip install {package}",
                "description": f"Runs flows with the {name} worker of {package}.",
                "documentation_url": "https://docs.prefect.io/",
                "logo_url": None,
                "default_base_job_configuration": {},
            }
            for kind, name in types.items()
        }
        for package, types in WORKER_TYPE_CATALOGUE.items()
    }


def read_collection_view(app, req):
    """Only the worker types are known offline (as on Prefect's server without its registry)."""
    view = req.params["view"]
    if view not in COLLECTION_VIEWS:
        raise HTTPError(404, f"View {view} not found in registry")
    if view != "aggregate-worker-metadata":
        raise HTTPError(404, f"Requested content missing for view {view}")
    return 200, worker_type_metadata()


@body(WorkPoolCreate)
def create_work_pool_handler(app, req):
    with app.db.write() as tx:
        return 201, work_pool_for_client(tx, req, create_work_pool(tx, req.data))


def read_work_pool(app, req):
    with app.db.read() as tx:
        return 200, work_pool_for_client(tx, req, work_pool_out(tx, read_pool_by_name(tx, req.params["name"])))


@body(WorkPoolUpdate)
def update_work_pool(app, req):
    changes = sent_fields(req)
    if changes.get("storage_configuration") is not None:
        changes["storage_configuration"] = storage_configuration(changes["storage_configuration"])
    else:  # null leaves it as it is
        changes.pop("storage_configuration", None)
    with app.db.write() as tx:
        pool = read_pool_by_name(tx, req.params["name"], lock=True)
        update_row(tx, "work_pool", pool["id"], {**changes, "updated": now_iso()})
    return 204, NO_CONTENT


def delete_work_pool(app, req):
    with app.db.write() as tx:
        pool = read_pool_by_name(tx, req.params["name"], lock=True)
        detach_from_queues(tx, "work_queue_id IN (SELECT id FROM work_queue WHERE work_pool_id = ?)", (pool["id"],))
        tx.execute("DELETE FROM work_pool WHERE id = ?", (pool["id"],))
    return 204, NO_CONTENT


@body(filter_body_schema("work_pool", ("work_pools",)))
def read_work_pools_filtered(app, req):
    with app.db.read() as tx:
        where, params = build_where(tx, "work_pool", req.data)
        rows = tx.query(
            f"SELECT work_pool.* FROM work_pool WHERE {where} ORDER BY name LIMIT ? OFFSET ?",
            (*params, page_limit(req.data, app.settings), req.data["offset"] or 0),
        )
        return 200, [work_pool_for_client(tx, req, work_pool_out(tx, r)) for r in rows]


@body(filter_body_schema("work_pool", ("work_pools",)))
def count_work_pools(app, req):
    with app.db.read() as tx:
        return 200, count_filtered(tx, "work_pool", req.data)


@body(ScheduledRunsForPool)
def read_scheduled_runs_for_pool(app, req):
    with app.db.write() as tx:
        pool = decode_row("work_pool", read_pool_by_name(tx, req.params["name"]))
        return 200, scheduled_runs_for_pool(tx, pool, req.data, app.settings, client_major(req))


@body(WorkQueueCreate)
def create_pool_queue(app, req):
    with app.db.write() as tx:
        pool = read_pool_by_name(tx, req.params["work_pool_name"])
        queue_ = create_work_queue(tx, pool, req.data)
        return 201, work_queue_out(tx, queue_, pool["name"], client_major(req), POOL_QUEUE_SLOT_STATES)


def _pool_queue(tx, req, lock=False):
    pool = read_pool_by_name(tx, req.params["work_pool_name"])
    row = tx.query_one(
        f"SELECT * FROM work_queue WHERE work_pool_id = ? AND name = ?{tx.db.for_update if lock else ''}",
        (pool["id"], req.params["name"]),
    )
    if row is None:
        raise NotFound(f'Work queue "{req.params["name"]}" not found in pool "{pool["name"]}".')
    return pool, row


def read_pool_queue(app, req):
    with app.db.read() as tx:
        pool, row = _pool_queue(tx, req)
        return 200, work_queue_out(tx, row, pool["name"], client_major(req), POOL_QUEUE_SLOT_STATES)


@body(WorkQueueUpdate)
def update_pool_queue(app, req):
    changes = sent_fields(req)
    with app.db.write() as tx:
        _pool, row = _pool_queue(tx, req, lock=True)
        update_row(tx, "work_queue", row["id"], {**changes, "updated": now_iso()})
    return 204, NO_CONTENT


def delete_pool_queue(app, req):
    with app.db.write() as tx:
        pool, row = _pool_queue(tx, req, lock=True)
        if row["id"] == pool["default_queue_id"]:
            raise HTTPError(409, "The default queue of a work pool cannot be deleted.")
        detach_from_queues(tx, "work_queue_id = ?", (row["id"],))
        tx.execute("DELETE FROM work_queue WHERE id = ?", (row["id"],))
    return 204, NO_CONTENT


@body(filter_body_schema("work_queue", ("work_queues",)))
def read_pool_queues_filtered(app, req):
    with app.db.read() as tx:
        pool = read_pool_by_name(tx, req.params["work_pool_name"])
        where, params = build_where(tx, "work_queue", req.data)
        rows = tx.query(
            f"SELECT work_queue.* FROM work_queue WHERE work_pool_id = ? AND {where} "
            f"ORDER BY priority, name LIMIT ? OFFSET ?",
            (pool["id"], *params, page_limit(req.data, app.settings), req.data["offset"] or 0),
        )
        return 200, [work_queue_out(tx, r, pool["name"], client_major(req), POOL_QUEUE_SLOT_STATES) for r in rows]


@body(WorkerHeartbeat)
def worker_heartbeat_handler(app, req):
    with app.db.write() as tx:
        worker_heartbeat(tx, read_pool_by_name(tx, req.params["work_pool_name"]), req.data, app.clock())
    return 204, NO_CONTENT


@body(filter_body_schema("worker", ()))
def read_workers_filtered(app, req):
    with app.db.read() as tx:
        pool = read_pool_by_name(tx, req.params["work_pool_name"])
        rows = tx.query(
            "SELECT * FROM worker WHERE work_pool_id = ? ORDER BY last_heartbeat_time DESC LIMIT ? OFFSET ?",
            (pool["id"], page_limit(req.data, app.settings), req.data["offset"] or 0),
        )
        return 200, [worker_out(r, app.clock()) for r in rows]


def delete_worker(app, req):
    with app.db.write() as tx:
        pool = read_pool_by_name(tx, req.params["work_pool_name"])
        if not tx.execute(
            "DELETE FROM worker WHERE work_pool_id = ? AND name = ?", (pool["id"], req.params["name"])
        ).rowcount:
            raise NotFound("Worker not found")
    return 204, NO_CONTENT


@body(WorkQueueCreate)
def create_work_queue_handler(app, req):
    """The older id-based queue API: a queue without a pool lands in the default agent pool."""
    with app.db.write() as tx:
        if not req.data.get("work_pool_name"):
            ensure_work_queue(tx, None, "default")  # makes the default agent pool if it is missing
        pool = read_pool_by_name(tx, req.data.get("work_pool_name") or DEFAULT_AGENT_POOL)
        return 201, work_queue_out(tx, create_work_queue(tx, pool, req.data), pool["name"], client_major(req))


def read_work_queue(app, req):
    with app.db.read() as tx:
        return 200, work_queue_out(tx, require_row(tx, "work_queue", req.uuid(), "Work queue"), major=client_major(req))


ConcurrencyStatusBody = Schema(
    "Body_read_concurrency_status",
    {
        "page": Field("int", default=1, nullable=False, minimum=1),
        "limit": Field("int", minimum=0),
        "flow_run_limit": Field("int", default=10, nullable=False, minimum=0, maximum=200),
    },
)


def _status_page_size(app, data: dict) -> int:
    """The page size: the server's default when not sent, and never past it (Prefect answers 422)."""
    most = app.settings["PREFECT_API_DEFAULT_LIMIT"]
    if data.get("limit") is not None and data["limit"] > most:
        raise ValidationFailed(
            [
                _error(
                    ("body", "limit"), f"ensure this value is less than or equal to {most}", "value_error.number.not_le"
                )
            ]
        )
    return most if data.get("limit") is None else data["limit"]


def _slot_summary(row: dict, now: str) -> dict:
    """A flow run holding a slot (Prefect's FlowRunSlotSummary; the time in its state in seconds)."""
    return {
        "id": row["id"],
        "name": row["name"],
        "state_type": row["state_type"],
        "state_name": row["state_name"],
        "start_time": row["start_time"],
        "state_timestamp": row["state_timestamp"],
        "time_in_current_state": _seconds_between(now, row["state_timestamp"]) if row["state_timestamp"] else None,
    }


def _paged(answer: dict, count: int, limit: int, page: int) -> dict:
    pages = (count + limit - 1) // limit if limit > 0 else 0
    return {**answer, "count": count, "limit": limit, "pages": pages, "page": page}


_SLOT_SUMMARY_COLUMNS = "fr.id, fr.name, fr.state_type, fr.state_name, fr.start_time, fr.state_timestamp"


@body(ConcurrencyStatusBody)
def read_work_pool_concurrency_status(app, req):
    """The pool's slot holders by queue: a page of its queues (by priority), each with up to
    `flow_run_limit` of its runs."""
    limit, page, per_queue = _status_page_size(app, req.data), req.data["page"], req.data["flow_run_limit"]
    now = now_iso()
    with app.db.read() as tx:
        pool = read_pool_by_name(tx, req.params["name"])
        queue_count = tx.scalar("SELECT COUNT(*) FROM work_queue WHERE work_pool_id = ?", (pool["id"],))
        queues = tx.query(
            "SELECT id, name, concurrency_limit FROM work_queue WHERE work_pool_id = ? "
            "ORDER BY priority, id LIMIT ? OFFSET ?",
            (pool["id"], limit, (page - 1) * limit),
        )
        busy = {
            r["work_queue_id"]: r["n"]
            for r in tx.query(
                f"SELECT fr.work_queue_id, COUNT(*) AS n {_POOL_SLOT_HOLDERS} GROUP BY fr.work_queue_id", (pool["id"],)
            )
        }
        details = []
        for queue in queues:
            runs = tx.query(
                f"SELECT {_SLOT_SUMMARY_COLUMNS} FROM flow_run fr WHERE fr.work_queue_id = ? "
                "AND fr.state_type IN ('PENDING', 'RUNNING') ORDER BY fr.id LIMIT ?",
                (queue["id"], per_queue),
            )
            details.append(
                {
                    "queue_id": queue["id"],
                    "queue_name": queue["name"],
                    "active_slots": busy.get(queue["id"], 0),
                    "concurrency_limit": queue["concurrency_limit"],
                    "flow_runs": [_slot_summary(r, now) for r in runs],
                    "flow_run_count": busy.get(queue["id"], 0),
                }
            )
    answer = {"active_slots": sum(busy.values()), "concurrency_limit": pool["concurrency_limit"], "queues": details}
    return 200, _paged(answer, queue_count, limit, page)


@body(ConcurrencyStatusBody)
def read_work_queue_concurrency_status(app, req):
    """The queue's slot holders, a page of them; `active_slots` counts them all."""
    limit, page = _status_page_size(app, req.data), req.data["page"]
    now = now_iso()
    with app.db.read() as tx:
        queue = require_row(tx, "work_queue", req.uuid(), "Work queue")
        params = (queue["id"], queue["name"])
        count = tx.scalar(f"SELECT COUNT(*) {_QUEUE_SLOT_HOLDERS}", params)
        runs = tx.query(
            f"SELECT {_SLOT_SUMMARY_COLUMNS} {_QUEUE_SLOT_HOLDERS} ORDER BY fr.id LIMIT ? OFFSET ?",
            (*params, limit, (page - 1) * limit),
        )
    answer = {
        "active_slots": count,
        "concurrency_limit": queue["concurrency_limit"],
        "flow_runs": [_slot_summary(r, now) for r in runs],
    }
    return 200, _paged(answer, count, limit, page)


def read_work_queue_by_name(app, req):
    with app.db.read() as tx:
        row = tx.query_one(
            "SELECT wq.* FROM work_queue wq JOIN work_pool wp ON wp.id = wq.work_pool_id "
            "WHERE wq.name = ? ORDER BY (wp.name = ?) DESC LIMIT 1",
            (req.params["name"], DEFAULT_AGENT_POOL),
        )
        if row is None:
            raise NotFound("Work queue not found")
        return 200, work_queue_out(tx, row, major=client_major(req))


@body(WorkQueueUpdate)
def update_work_queue(app, req):
    changes = sent_fields(req)
    with app.db.write() as tx:
        require_row(tx, "work_queue", req.uuid(), "Work queue", lock=True)
        update_row(tx, "work_queue", req.uuid(), {**changes, "updated": now_iso()})
    return 204, NO_CONTENT


def delete_work_queue(app, req):
    with app.db.write() as tx:
        detach_from_queues(tx, "work_queue_id = ?", (req.uuid(),))
        if not tx.execute("DELETE FROM work_queue WHERE id = ?", (req.uuid(),)).rowcount:
            raise NotFound("Work queue not found")
    return 204, NO_CONTENT


@body(filter_body_schema("work_queue", ("work_queues",)))
def read_work_queues_filtered(app, req):
    with app.db.read() as tx:
        where, params = build_where(tx, "work_queue", req.data)
        rows = tx.query(
            f"SELECT work_queue.* FROM work_queue WHERE {where} ORDER BY priority, name LIMIT ? OFFSET ?",
            (*params, page_limit(req.data, app.settings), req.data["offset"] or 0),
        )
        return 200, [work_queue_out(tx, r, major=client_major(req)) for r in rows]


def read_work_queue_status(app, req):
    with app.db.read() as tx:
        queue_ = work_queue_out(tx, require_row(tx, "work_queue", req.uuid(), "Work queue"))
        late = int(
            tx.scalar(
                "SELECT COUNT(*) FROM flow_run WHERE work_queue_id = ? AND state_type = 'SCHEDULED' "
                "AND state_name = 'Late'",
                (queue_["id"],),
            )
        )
        return 200, {
            "healthy": queue_["status"] == "READY" and late == 0,
            "late_runs_count": late,
            "last_polled": queue_.get("last_polled"),
            "health_check_policy": {
                "maximum_late_runs": 0,
                "maximum_seconds_since_last_polled": QUEUE_READY_POLL_SECONDS,
            },
        }


@body(Schema("Body_read_work_queue_runs", {"scheduled_before": Field("datetime"), "limit": Field("int", minimum=0)}))
def read_work_queue_runs(app, req):
    with app.db.write() as tx:
        row = require_row(tx, "work_queue", req.uuid(), "Work queue")
        pool = decode_row("work_pool", read_row(tx, "work_pool", row["work_pool_id"]))
        data = {**req.data, "work_queue_names": [row["name"]]}
        runs = scheduled_runs_for_pool(tx, pool, data, app.settings, client_major(req))
        return 200, [item["flow_run"] for item in runs]


# Handlers: notification policies


@body(NotificationPolicyCreate)
def create_notification_policy(app, req):
    check_message_template(req.data.get("message_template"))
    now = now_iso()
    with app.db.write() as tx:
        _notify_capable(tx, req.data["block_document_id"])
        row_id = new_id()
        insert_row(tx, "flow_run_notification_policy", {"id": row_id, "created": now, "updated": now, **req.data})
        return 201, decode_row("flow_run_notification_policy", read_row(tx, "flow_run_notification_policy", row_id))


def read_notification_policy(app, req):
    with app.db.read() as tx:
        return 200, decode_row(
            "flow_run_notification_policy",
            require_row(tx, "flow_run_notification_policy", req.uuid(), "Flow run notification policy"),
        )


@body(NotificationPolicyUpdate)
def update_notification_policy(app, req):
    changes = sent_fields(req)
    check_message_template(changes.get("message_template"))
    with app.db.write() as tx:
        require_row(tx, "flow_run_notification_policy", req.uuid(), "Flow run notification policy", lock=True)
        if changes.get("block_document_id"):
            _notify_capable(tx, changes["block_document_id"])
        update_row(tx, "flow_run_notification_policy", req.uuid(), {**changes, "updated": now_iso()})
    return 204, NO_CONTENT


def delete_notification_policy(app, req):
    with app.db.write() as tx:
        if not tx.execute("DELETE FROM flow_run_notification_policy WHERE id = ?", (req.uuid(),)).rowcount:
            raise NotFound("Flow run notification policy not found")
        tx.execute("DELETE FROM flow_run_notification_queue WHERE flow_run_notification_policy_id = ?", (req.uuid(),))
        tx.execute(
            "DELETE FROM flow_run_notification_delivery WHERE flow_run_notification_policy_id = ?", (req.uuid(),)
        )
    return 204, NO_CONTENT


read_notification_policies_filtered, _count_policies = _filter_handler(
    "flow_run_notification_policy",
    _decoded("flow_run_notification_policy"),
    ("flow_run_notification_policy_filter",),
)


def send_test_notification(app, req):
    """Send a sample message through a policy's destination now; 502 with the reason when it fails."""
    with app.db.read() as tx:
        policy = decode_row(
            "flow_run_notification_policy",
            require_row(tx, "flow_run_notification_policy", req.uuid(), "Flow run notification policy"),
        )
        doc = require_row(tx, "block_document", policy["block_document_id"], "Block document")
        full = block_document_out(tx, doc, include_secrets=True)
    sample = {name: f"<{name}>" for name in NOTIFICATION_PLACEHOLDERS}
    sample.update(
        {
            "flow_name": "example-flow",
            "flow_run_name": "example-run",
            "flow_run_state_name": "Completed",
            "flow_run_state_type": "COMPLETED",
            "flow_run_notification_policy_id": policy["id"],
            "flow_run_state_timestamp": utcnow().strftime("%y-%m-%d %H:%M:%S %Z"),
            "flow_run_state_message": "This is a test notification from prefectlite.",
            "flow_run_url": f"{app.public_url().rstrip('/')}/notifications",
        }
    )
    try:
        subject, body = render_notification(policy, sample)
        deliver(app.settings, full["block_type"]["slug"], full["data"], "[test] " + subject, body)
    except NotificationFailed as exc:
        raise HTTPError(502, f"the destination did not accept the test message: {exc}") from None
    return 200, {"sent": True}


def read_notification_deliveries(app, req):
    """A policy's delivery attempts, newest first (our extension: Prefect keeps none), a page at a time."""
    limit = req.int_arg("limit", 20, 1, 200)
    offset = req.int_arg("offset", 0, 0, NOTIFICATION_DELIVERIES_KEPT)
    with app.db.read() as tx:
        require_row(tx, "flow_run_notification_policy", req.uuid(), "Flow run notification policy")
        rows = tx.query(
            "SELECT * FROM flow_run_notification_delivery WHERE flow_run_notification_policy_id = ? "
            "ORDER BY created DESC, id LIMIT ? OFFSET ?",
            (req.uuid(), limit, offset),
        )
    return 200, rows


def read_notification_queue(app, req):
    """Queued and failed notifications (our extension), newest first; ?status=FAILED for the failures."""
    status = req.arg("status")
    with app.db.read() as tx:
        sql, params = "SELECT * FROM flow_run_notification_queue", []
        if status:
            sql, params = sql + " WHERE status = ?", [status.upper()]
        rows = tx.query(sql + " ORDER BY created DESC LIMIT 200", params)
    return 200, rows


def install_system_block_types(app, req):
    with app.db.write() as tx:
        install_builtin_block_types(tx)
    return 200, None


# Handlers: automations


def _automation_id(req) -> str:
    """Prefect's automation routes take only a UUID (`{id:uuid}`): another path is not found, not a 422."""
    try:
        return req.uuid()
    except ValidationFailed:
        raise NotFound("Not Found") from None


def _require_job_variables_deployment(tx, data: dict, creating: bool) -> None:
    """As Prefect's server: a run-deployment action with job variables names a deployment that exists (404)."""
    for action in data["actions"]:
        if action["type"] != "run-deployment" or not action.get("deployment_id"):
            continue
        if action.get("job_variables") is None or (creating and action["job_variables"] == {}):
            continue
        if read_row(tx, "deployment", action["deployment_id"]) is None:
            raise NotFound("Deployment not found.")


@body(AutomationCreate)
def create_automation_handler(app, req):
    data = validate_automation(req.data, req.body_dict(), AutomationCreate)
    with app.db.write() as tx:
        _require_job_variables_deployment(tx, data, creating=True)
        return 201, create_automation(tx, data, data.get("owner_resource"))


@body(AutomationUpdate)
def update_automation_handler(app, req):
    data = validate_automation(req.data, req.body_dict(), AutomationUpdate)
    with app.db.write() as tx:
        _require_job_variables_deployment(tx, data, creating=False)
        update_automation(tx, _automation_id(req), {k: data[k] for k in AUTOMATION_FIELDS})
    return 204, NO_CONTENT


@body(AutomationPartialUpdate)
def patch_automation(app, req):
    _no_unknown_fields(req.body_dict(), AutomationPartialUpdate, ("body",))
    with app.db.write() as tx:
        update_automation(tx, _automation_id(req), {"enabled": req.data["enabled"]})
    return 204, NO_CONTENT


def read_automation(app, req):
    with app.db.read() as tx:
        return 200, automation_out(require_row(tx, "automation", _automation_id(req), "Automation"))


def delete_automation_handler(app, req):
    with app.db.write() as tx:
        if not delete_automation(tx, _automation_id(req)):
            raise NotFound("Automation not found")
    return 204, NO_CONTENT


@body(AutomationFilterBody)
def read_automations_filtered(app, req):
    with app.db.read() as tx:
        return 200, read_automations(tx, req.data)


def count_automations(app, req):
    with app.db.read() as tx:
        return 200, tx.scalar("SELECT COUNT(*) FROM automation")


def read_automations_related_to(app, req):
    with app.db.read() as tx:
        return 200, automations_related_to(tx, req.params["resource_id"])


def delete_automations_owned_by(app, req):
    with app.db.write() as tx:
        delete_automations_owned_by_resource(tx, req.params["resource_id"])
    return 202, None


def read_automation_history(app, req):
    """The actions an automation ran, newest first, with their outcome (our extension, for the UI)."""
    with app.db.read() as tx:
        require_row(tx, "automation", _automation_id(req), "Automation")
        return 200, automation_action_history(tx, _automation_id(req))


# --- 22. Routes ---
# Owns the route table, route matching, the one place that turns exceptions into HTTP
# errors, metrics, and the OpenAPI document.

# Metrics in the Prometheus text format (GET /api/metrics, off unless PREFECT_SERVER_METRICS_ENABLED).


class Metrics:
    buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict = {}  # (method, route, status) -> count
        self.latency: dict = {}  # (method, route) -> [bucket counts..., sum, count]

    def observe(self, method: str, route: str, status: int, seconds: float):
        # One count in the first bucket that holds the duration; snapshot() makes the counts cumulative
        bucket = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            key = (method, route, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            hist = self.latency.get((method, route))
            if hist is None:
                hist = self.latency[(method, route)] = [0] * (len(self.buckets) + 1) + [0.0, 0]
            hist[bucket] += 1
            hist[-2] += seconds
            hist[-1] += 1

    def snapshot(self):
        """Request counts by (method, route, status text); per (method, route) the cumulative count of each
        bucket (le), then the sum and the count, as the exposition format wants them."""
        with self._lock:
            requests = {(m, r, str(s)): n for (m, r, s), n in self.requests.items()}
            latency = {k: list(itertools.accumulate(v[: len(self.buckets)])) + v[-2:] for k, v in self.latency.items()}
        return requests, latency


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric(lines: list, name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]):
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{text}}} {value:.17g}" if text else f"{name} {value:.17g}")


def resident_memory_bytes() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def render_metrics(app) -> str:
    requests, latency = app.metrics.snapshot()
    lines: list[str] = []
    _metric(
        lines,
        "prefectlite_http_requests_total",
        "counter",
        "API requests by method, route and status.",
        [({"method": m, "route": r, "status": s}, n) for (m, r, s), n in sorted(requests.items())],
    )
    lines.append("# HELP prefectlite_http_request_duration_seconds API request latency by method and route.")
    lines.append("# TYPE prefectlite_http_request_duration_seconds histogram")
    for (method, route), hist in sorted(latency.items()):
        base = f'method="{_label(method)}",route="{_label(route)}"'
        for bound, count in zip(Metrics.buckets, hist):
            lines.append(f'prefectlite_http_request_duration_seconds_bucket{{{base},le="{bound:g}"}} {count}')
        lines.append(f'prefectlite_http_request_duration_seconds_bucket{{{base},le="+Inf"}} {hist[-1]}')
        lines.append(f"prefectlite_http_request_duration_seconds_sum{{{base}}} {hist[-2]:.17g}")
        lines.append(f"prefectlite_http_request_duration_seconds_count{{{base}}} {hist[-1]}")
    with app.db.read() as tx:
        flows = tx.query("SELECT state_type, COUNT(*) AS n FROM flow_run GROUP BY state_type")
        tasks = tx.query("SELECT state_type, COUNT(*) AS n FROM task_run GROUP BY state_type")
        queue_rows = tx.query("SELECT status, COUNT(*) AS n FROM flow_run_notification_queue GROUP BY status")
    _metric(
        lines,
        "prefectlite_flow_runs",
        "gauge",
        "Flow runs by state type.",
        [({"state_type": r["state_type"] or "NONE"}, r["n"]) for r in flows],
    )
    _metric(
        lines,
        "prefectlite_task_runs",
        "gauge",
        "Task runs by state type.",
        [({"state_type": r["state_type"] or "NONE"}, r["n"]) for r in tasks],
    )
    by_status = {r["status"]: r["n"] for r in queue_rows}
    _metric(
        lines,
        "prefectlite_notification_queue_depth",
        "gauge",
        "Notifications waiting to be sent.",
        [({}, by_status.get("PENDING", 0) + by_status.get("SENDING", 0))],
    )
    _metric(
        lines,
        "prefectlite_notifications_failed",
        "gauge",
        "Notifications kept as failed after every attempt.",
        [({}, by_status.get("FAILED", 0))],
    )
    sender = next((s for s in app.services if isinstance(s, NotificationSender)), None)
    _metric(
        lines,
        "prefectlite_notifications_sent_total",
        "counter",
        "Notifications delivered by this process.",
        [({}, sender.sent if sender else 0)],
    )
    _metric(
        lines,
        "prefectlite_service_passes_total",
        "counter",
        "Passes each background service made here.",
        [({"service": s.name}, s.passes) for s in app.services],
    )
    scheduler = next((s for s in app.services if isinstance(s, Scheduler)), None)
    lag = time.monotonic() - scheduler.last_pass_at if scheduler and scheduler.last_pass_at else 0.0
    _metric(
        lines,
        "prefectlite_scheduler_lag_seconds",
        "gauge",
        "Seconds since the scheduler last finished a pass.",
        [({}, round(lag, 3))],
    )
    _metric(
        lines,
        "prefectlite_database_query_seconds_total",
        "counter",
        "Time spent in database statements.",
        [({}, round(app.db.query_seconds, 6))],
    )
    _metric(
        lines, "prefectlite_database_queries_total", "counter", "Database statements run.", [({}, app.db.query_count)]
    )
    _metric(
        lines,
        "prefectlite_read_cache_hits_total",
        "counter",
        "Run listing, count and history requests answered from the read cache.",
        [({}, app.read_cache.hits)],
    )
    _metric(
        lines,
        "prefectlite_read_cache_misses_total",
        "counter",
        "Run listing, count and history requests the read cache could not answer.",
        [({}, app.read_cache.misses)],
    )
    _metric(
        lines,
        "prefectlite_process_resident_memory_bytes",
        "gauge",
        "Resident memory of this process.",
        [({}, resident_memory_bytes())],
    )
    return "\n".join(lines) + "\n"


def read_metrics(app, req):
    if not app.settings["PREFECT_SERVER_METRICS_ENABLED"]:
        raise HTTPError(404, "Metrics are off; set PREFECT_SERVER_METRICS_ENABLED=true.")
    return 200, RawBody(render_metrics(app).encode(), "text/plain; version=0.0.4; charset=utf-8")


# The route table: every API route, in one place. Paths are relative to /api.
ROUTES = [
    ("GET", "/health", read_health),
    ("GET", "/ready", read_ready),
    ("GET", "/hello", read_hello),
    ("GET", "/version", read_server_version),
    ("GET", "/admin/version", read_api_version),
    ("GET", "/admin/settings", read_admin_settings),
    ("POST", "/automations/", create_automation_handler),
    ("POST", "/automations/filter", read_automations_filtered),
    ("POST", "/automations/count", count_automations),
    ("GET", "/automations/related-to/{resource_id}", read_automations_related_to),
    ("DELETE", "/automations/owned-by/{resource_id}", delete_automations_owned_by),
    ("GET", "/automations/{id}", read_automation),
    ("GET", "/automations/{id}/history", read_automation_history),
    ("PUT", "/automations/{id}", update_automation_handler),
    ("PATCH", "/automations/{id}", patch_automation),
    ("DELETE", "/automations/{id}", delete_automation_handler),
    ("GET", "/admin/storage", read_result_storage),
    ("PUT", "/admin/storage", update_result_storage),
    ("DELETE", "/admin/storage", clear_result_storage),
    ("GET", "/csrf-token", read_csrf_token),
    ("POST", "/flows/", create_flow_handler),
    ("POST", "/flows/filter", read_flows_filtered),
    ("POST", "/flows/count", count_flows),
    ("POST", "/flows/paginate", paginate_flows),
    ("POST", "/flows/bulk_delete", bulk_delete_flows),
    ("GET", "/flows/name/{name}", read_flow_by_name_handler),
    ("GET", "/flows/{id}", read_flow),
    ("PATCH", "/flows/{id}", update_flow),
    ("DELETE", "/flows/{id}", delete_flow),
    ("POST", "/flow_runs/", create_flow_run_handler),
    ("POST", "/flow_runs/filter", read_flow_runs_filtered),
    ("POST", "/flow_runs/count", count_flow_runs),
    ("POST", "/flow_runs/paginate", paginate_flow_runs),
    ("POST", "/flow_runs/bulk_delete", bulk_delete_flow_runs),
    ("POST", "/flow_runs/bulk_set_state", bulk_set_flow_run_state),
    ("POST", "/flow_runs/history", flow_run_history),
    ("GET", "/flow_runs/{id}", read_flow_run),
    ("PATCH", "/flow_runs/{id}", update_flow_run),
    ("PATCH", "/flow_runs/{id}/labels", update_flow_run_labels),
    ("DELETE", "/flow_runs/{id}", delete_flow_run),
    ("GET", "/flow_runs/{id}/logs/download", download_flow_run_logs),
    ("POST", "/flow_runs/{id}/set_state", set_flow_run_state),
    ("POST", "/flow_runs/{id}/resume", resume_flow_run_handler),
    ("POST", "/flow_runs/{id}/input", create_flow_run_input_handler),
    ("POST", "/flow_runs/{id}/input/filter", filter_flow_run_inputs_handler),
    ("GET", "/flow_runs/{id}/input/{key}", read_flow_run_input_handler),
    ("DELETE", "/flow_runs/{id}/input/{key}", delete_flow_run_input_handler),
    ("GET", "/flow_runs/{id}/graph", read_flow_run_graph),
    ("GET", "/flow_runs/{id}/graph-v2", read_flow_run_graph_v2),
    ("GET", "/flow_run_states/", read_flow_run_states),
    ("GET", "/flow_run_states/{id}", read_flow_run_state),
    ("POST", "/task_runs/", create_task_run_handler),
    ("POST", "/task_runs/filter", read_task_runs_filtered),
    ("POST", "/task_runs/count", count_task_runs),
    ("POST", "/task_runs/paginate", paginate_task_runs),
    ("POST", "/task_runs/history", task_run_history),
    ("GET", "/task_runs/{id}", read_task_run),
    ("PATCH", "/task_runs/{id}", update_task_run),
    ("DELETE", "/task_runs/{id}", delete_task_run),
    ("POST", "/task_runs/{id}/set_state", set_task_run_state),
    ("GET", "/task_run_states/", read_task_run_states),
    ("POST", "/task_workers/filter", read_task_workers),
    ("GET", "/task_run_states/{id}", read_task_run_state),
    ("POST", "/logs/", create_logs_handler),
    ("POST", "/logs/filter", read_logs_filtered),
    ("POST", "/events", create_events_handler),
    ("POST", "/events/filter", read_events_handler),
    ("GET", "/events/filter/next", read_events_next_page),
    ("POST", "/events/count-by/{countable}", count_events_handler),
    ("POST", "/block_types/", create_block_type_handler),
    ("POST", "/block_types/filter", read_block_types_filtered),
    ("GET", "/block_types/slug/{slug}", read_block_type_by_slug),
    ("GET", "/block_types/slug/{slug}/block_documents", read_block_documents_of_type),
    ("GET", "/block_types/slug/{slug}/block_documents/name/{block_document_name}", read_block_document_by_name),
    ("GET", "/block_types/{id}", read_block_type),
    ("PATCH", "/block_types/{id}", update_block_type),
    ("DELETE", "/block_types/{id}", delete_block_type),
    ("POST", "/block_schemas/", create_block_schema_handler),
    ("POST", "/block_schemas/filter", read_block_schemas_filtered),
    ("GET", "/block_schemas/checksum/{checksum}", read_block_schema_by_checksum),
    ("GET", "/block_schemas/{id}", read_block_schema),
    ("DELETE", "/block_schemas/{id}", delete_block_schema),
    ("GET", "/block_capabilities/", read_block_capabilities),
    ("POST", "/block_documents/", create_block_document_handler),
    ("POST", "/block_documents/filter", read_block_documents_filtered),
    ("POST", "/block_documents/count", count_block_documents),
    ("GET", "/block_documents/{id}", read_block_document),
    ("PATCH", "/block_documents/{id}", update_block_document_handler),
    ("DELETE", "/block_documents/{id}", delete_block_document),
    ("POST", "/variables/", create_variable_handler),
    ("POST", "/variables/filter", read_variables_filtered),
    ("POST", "/variables/count", count_variables),
    ("GET", "/variables/name/{name}", read_variable),
    ("PATCH", "/variables/name/{name}", update_variable),
    ("DELETE", "/variables/name/{name}", delete_variable),
    ("GET", "/variables/{id}", read_variable),
    ("PATCH", "/variables/{id}", update_variable),
    ("DELETE", "/variables/{id}", delete_variable),
    ("POST", "/artifacts/", create_artifact_handler),
    ("POST", "/artifacts/filter", read_artifacts_filtered),
    ("POST", "/artifacts/count", count_artifacts),
    ("POST", "/artifacts/latest/filter", read_latest_artifacts_filtered),
    ("POST", "/artifacts/latest/count", count_latest_artifacts),
    ("GET", "/artifacts/{key}/latest", read_latest_artifact),
    ("GET", "/artifacts/{id}", read_artifact),
    ("PATCH", "/artifacts/{id}", update_artifact),
    ("DELETE", "/artifacts/{id}", delete_artifact_handler),
    ("POST", "/concurrency_limits/", create_tag_limit_handler),
    ("POST", "/concurrency_limits/filter", read_tag_limits_filtered),
    ("POST", "/concurrency_limits/increment", increment_tag_limits),
    ("POST", "/concurrency_limits/decrement", decrement_tag_limits),
    ("GET", "/concurrency_limits/tag/{tag}", read_tag_limit),
    ("DELETE", "/concurrency_limits/tag/{tag}", delete_tag_limit),
    ("POST", "/concurrency_limits/tag/{tag}/reset", reset_tag_limit),
    ("GET", "/concurrency_limits/{id}", read_tag_limit),
    ("DELETE", "/concurrency_limits/{id}", delete_tag_limit),
    ("POST", "/v2/concurrency_limits/", create_global_limit),
    ("POST", "/v2/concurrency_limits/filter", read_global_limits_filtered),
    ("POST", "/v2/concurrency_limits/increment", increment_global_limits),
    ("POST", "/v2/concurrency_limits/decrement", decrement_global_limits),
    ("POST", "/v2/concurrency_limits/increment-with-lease", increment_global_limits_with_lease),
    ("POST", "/v2/concurrency_limits/decrement-with-lease", decrement_global_limits_with_lease),
    ("POST", "/v2/concurrency_limits/leases/{lease_id}/renew", renew_concurrency_lease),
    ("GET", "/v2/concurrency_limits/{id_or_name}", read_global_limit),
    ("PATCH", "/v2/concurrency_limits/{id_or_name}", update_global_limit),
    ("DELETE", "/v2/concurrency_limits/{id_or_name}", delete_global_limit),
    ("PUT", "/saved_searches/", create_saved_search),
    ("POST", "/saved_searches/filter", read_saved_searches_filtered),
    ("GET", "/saved_searches/{id}", read_saved_search),
    ("DELETE", "/saved_searches/{id}", delete_saved_search),
    ("POST", "/deployments/", create_deployment_handler),
    ("POST", "/deployments/filter", read_deployments_filtered),
    ("POST", "/deployments/count", count_deployments),
    ("POST", "/deployments/paginate", paginate_deployments),
    ("POST", "/deployments/bulk_delete", bulk_delete_deployments),
    ("POST", "/deployments/get_scheduled_flow_runs", read_scheduled_runs_for_deployments),
    ("GET", "/deployments/name/{flow_name}/{deployment_name}", read_deployment_by_name),
    ("GET", "/deployments/{id}", read_deployment),
    ("PATCH", "/deployments/{id}", update_deployment_handler),
    ("DELETE", "/deployments/{id}", delete_deployment),
    ("POST", "/deployments/{id}/create_flow_run", create_deployment_flow_run_handler),
    ("POST", "/deployments/{id}/create_flow_run/bulk", bulk_create_deployment_flow_runs),
    ("POST", "/deployments/{id}/pause_deployment", pause_deployment),
    ("POST", "/deployments/{id}/resume_deployment", resume_deployment),
    ("POST", "/deployments/{id}/set_schedule_active", resume_deployment),
    ("POST", "/deployments/{id}/set_schedule_inactive", pause_deployment),
    ("GET", "/deployments/{id}/schedules", read_deployment_schedules),
    ("GET", "/deployments/{id}/next_schedule_times", read_next_schedule_times),
    ("POST", "/deployments/{id}/schedules", create_deployment_schedules),
    ("PATCH", "/deployments/{id}/schedules/{schedule_id}", update_deployment_schedule),
    ("DELETE", "/deployments/{id}/schedules/{schedule_id}", delete_deployment_schedule),
    ("POST", "/deployments/{id}/schedule", schedule_deployment),
    ("GET", "/collections/views/{view}", read_collection_view),
    ("POST", "/work_pools/", create_work_pool_handler),
    ("POST", "/work_pools/filter", read_work_pools_filtered),
    ("POST", "/work_pools/count", count_work_pools),
    ("GET", "/work_pools/{name}", read_work_pool),
    ("POST", "/work_pools/{name}/concurrency_status", read_work_pool_concurrency_status),
    ("PATCH", "/work_pools/{name}", update_work_pool),
    ("DELETE", "/work_pools/{name}", delete_work_pool),
    ("POST", "/work_pools/{name}/get_scheduled_flow_runs", read_scheduled_runs_for_pool),
    ("POST", "/work_pools/{work_pool_name}/queues", create_pool_queue),
    ("POST", "/work_pools/{work_pool_name}/queues/filter", read_pool_queues_filtered),
    ("GET", "/work_pools/{work_pool_name}/queues/{name}", read_pool_queue),
    ("PATCH", "/work_pools/{work_pool_name}/queues/{name}", update_pool_queue),
    ("DELETE", "/work_pools/{work_pool_name}/queues/{name}", delete_pool_queue),
    ("POST", "/work_pools/{work_pool_name}/workers/heartbeat", worker_heartbeat_handler),
    ("POST", "/work_pools/{work_pool_name}/workers/filter", read_workers_filtered),
    ("DELETE", "/work_pools/{work_pool_name}/workers/{name}", delete_worker),
    ("POST", "/work_queues/", create_work_queue_handler),
    ("POST", "/work_queues/filter", read_work_queues_filtered),
    ("GET", "/work_queues/name/{name}", read_work_queue_by_name),
    ("GET", "/work_queues/{id}", read_work_queue),
    ("POST", "/work_queues/{id}/concurrency_status", read_work_queue_concurrency_status),
    ("PATCH", "/work_queues/{id}", update_work_queue),
    ("DELETE", "/work_queues/{id}", delete_work_queue),
    ("POST", "/work_queues/{id}/get_runs", read_work_queue_runs),
    ("GET", "/work_queues/{id}/status", read_work_queue_status),
    ("POST", "/flow_run_notification_policies/", create_notification_policy),
    ("POST", "/flow_run_notification_policies/filter", read_notification_policies_filtered),
    ("GET", "/flow_run_notification_policies/{id}", read_notification_policy),
    ("PATCH", "/flow_run_notification_policies/{id}", update_notification_policy),
    ("DELETE", "/flow_run_notification_policies/{id}", delete_notification_policy),
    ("POST", "/flow_run_notification_policies/{id}/test", send_test_notification),
    ("GET", "/flow_run_notification_queue/", read_notification_queue),
    ("GET", "/flow_run_notification_policies/{id}/deliveries", read_notification_deliveries),
    ("POST", "/block_types/install_system_block_types", install_system_block_types),
]


def _compile_route(pattern: str):
    regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern.rstrip("/") or "/")
    return re.compile(f"^{regex}/?$")


def _route_key(path: str) -> tuple[str, int]:
    segments = path.strip("/").split("/")
    return segments[0], len(segments)


def route_index(routes) -> dict:
    """Routes grouped by first path segment and number of segments (a parameter is one segment), so a
    request is matched against a handful, not all."""
    index: dict = {}
    for route in routes:
        index.setdefault(_route_key(route[3]), []).append(route)
    return index


def match_route(index: dict, method: str, path: str):
    """Return (handler, path parameters, route pattern) or raise 404/405."""
    allowed = []
    for route_method, regex, handler, pattern in index.get(_route_key(path), ()):
        found = regex.match(path)
        if found:
            if route_method == method:
                return handler, {k: urllib.parse.unquote(v) for k, v in found.groupdict().items()}, pattern
            allowed.append(route_method)
    if allowed:
        raise HTTPError(405, "Method Not Allowed", {"Allow": ", ".join(sorted(set(allowed)))})
    raise HTTPError(404, "Not Found")


def validate_body(handler, req):
    schema = getattr(handler, "body_schema", None)
    if schema is None:
        return
    if getattr(handler, "body_schema_2", None) is not None and client_major(req) != 3:
        schema = handler.body_schema_2
    data = req.json()
    if isinstance(schema, Schema):
        req.data = schema.validate({} if data is None else data, ("body",))
    else:
        req.data = _validate_kind(schema, data, ("body",))


def error_reply(exc: Exception, req: Request | None) -> tuple[int, object, dict]:
    """The one place that turns an exception into an HTTP status and a JSON body."""
    if isinstance(exc, ValidationFailed):
        body_text = None
        if req is not None and req.raw_body:
            body_text = req.raw_body[:2000].decode("utf-8", "replace")
            with contextlib.suppress(Exception):
                body_text = loads(body_text)
        return (
            422,
            {
                "exception_message": "Invalid request received.",
                "exception_detail": exc.errors,
                "request_body": body_text,
            },
            {},
        )
    if isinstance(exc, NotFound):
        return 404, {"detail": exc.detail}, {}
    if isinstance(exc, Conflict):
        return 409, {"detail": exc.detail}, {}
    if isinstance(exc, IntegrityViolation):
        return 409, {"detail": "The request conflicts with existing data (a unique or reference constraint)."}, {}
    if isinstance(exc, DataRejected):
        return (
            422,
            {
                "exception_message": "Invalid request received.",
                "exception_detail": [_error(("body",), f"the database refused a value: {exc}", "value_error.database")],
                "request_body": None,
            },
            {},
        )
    if isinstance(exc, DatabaseUnavailable):
        return 503, {"detail": f"Service unavailable: {exc}", "reason": str(exc)}, {"Retry-After": "1"}
    if isinstance(exc, HTTPError):
        return exc.status, {"detail": exc.detail}, exc.headers
    log.exception("unexpected error while handling %s %s", req.method if req else "?", req.path if req else "?")
    return 500, {"detail": "Internal server error"}, {}


def _humanize(name: str) -> str:
    return name.replace("_handler", "").replace("_", " ").strip().capitalize()


def openapi_document(routes) -> dict:
    """Our OpenAPI document, built from the route table and the body schemas."""
    paths = {}
    for method, _regex, handler, pattern in routes:
        op = {
            "operationId": handler.__name__,
            "summary": _humanize(handler.__name__),
            "responses": {"200": {"description": "Successful Response"}, "422": {"description": "Validation Error"}},
        }
        params = re.findall(r"\{(\w+)\}", pattern)
        if params:
            op["parameters"] = [
                {
                    "name": p,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "format": "uuid"} if p == "id" else {"type": "string"},
                }
                for p in params
            ]
        schema = getattr(handler, "body_schema", None)
        if schema is not None:
            ref = _kind_openapi(schema)
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
        paths.setdefault("/api" + pattern, {})[method.lower()] = op
    components = {name: schema.openapi() for name, schema in Schema.registry.items()}
    for schema in list(Schema.registry.values()):
        for field in schema.fields.values():
            kind = field.kind.item if isinstance(field.kind, ListOf) else field.kind
            if isinstance(kind, Enum):
                components[kind.name] = {"title": kind.name, "enum": list(kind.values), "type": "string"}
    return {
        "openapi": "3.0.2",
        "info": {
            "title": "prefectlite",
            "version": __version__,
            "description": f"Prefect 2 REST API (API version {API_VERSION})",
        },
        "paths": paths,
        "components": {"schemas": components},
    }


def read_openapi(app, req):
    return 200, app.openapi


def read_docs(app, req):
    rows = []
    for path, ops in app.openapi["paths"].items():
        for method, op in ops.items():
            body_ref = (
                op.get("requestBody", {})
                .get("content", {})
                .get("application/json", {})
                .get("schema", {})
                .get("$ref", "")
                .rsplit("/", 1)[-1]
            )
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{_html(path)}</code></td>"
                f"<td>{_html(op['summary'])}</td><td>{_html(body_ref)}</td></tr>"
            )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>prefectlite API</title>"
        "<style>body{font:14px system-ui,sans-serif;margin:2em}td{padding:2px 10px;border-bottom:1px solid #eee}"
        "</style></head><body><h1>prefectlite API</h1>"
        f"<p>Prefect 2 REST API, version {API_VERSION}. Machine-readable: <a href='openapi.json'>openapi.json</a>.</p>"
        "<table><tr><th>Method</th><th>Path</th><th>What</th><th>Body</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
    return 200, RawBody(page.encode("utf-8"), "text/html; charset=utf-8")


def _html(text) -> str:
    return (
        str(text)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#39;")
    )


META_ROUTES = [
    ("GET", "/openapi.json", read_openapi),
    ("GET", "/docs", read_docs),
    ("GET", "/metrics", read_metrics),
]


# --- 23. WebSockets ---
# Owns RFC 6455 as the connection loop (section 25) speaks it: the opening handshake's checks, frames
# parsed from a buffer and encoded for sending, whole messages assembled under a size and a frame limit,
# close codes; and the endpoints Prefect clients use, written as message handlers:
# /api/events/in (clients report events, task runs among them), /api/events/out (subscribers send a
# filter, then receive matching events), /api/logs/out (log subscribers: sent matching logs as they are
# stored when the log stream settings are on, nothing by Prefect's defaults) and
# /api/task_runs/subscriptions/scheduled (task workers receive background task runs). The loop reads the
# frames and answers pings and closes itself; whole data messages go to a worker thread, one batch at a
# time per connection, in the order sent.

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3
WS_CONTINUATION, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_CLOSE_NORMAL = 1000
WS_CLOSE_GOING_AWAY = 1001
WS_CLOSE_PROTOCOL_ERROR = 1002
WS_CLOSE_UNSUPPORTED_DATA = 1003
WS_CLOSE_INVALID_DATA = 1007  # e.g. a text message that is not UTF-8
WS_CLOSE_POLICY_VIOLATION = 1008
WS_CLOSE_TOO_BIG = 1009
WS_CLOSE_INTERNAL_ERROR = 1011
WS_CLOSE_TRY_AGAIN_LATER = 1013
_WS_CONTROL_OPCODES = (WS_CLOSE, WS_PING, WS_PONG)
_WS_KNOWN_OPCODES = (WS_CONTINUATION, WS_TEXT, WS_BINARY, *_WS_CONTROL_OPCODES)
WS_MAX_CONTROL_PAYLOAD = 125
# A message in more frames than this is refused (1009): ten million empty continuation frames cost a
# core 13 s and 77 MB before there was a limit. Prefect's client sends each message in one frame.
WS_MAX_FRAMES_PER_MESSAGE = 1_000
# A peer that sends nothing for this long is gone (Prefect's client library pings every 20 s).
WEBSOCKET_IDLE_SECONDS = 120.0
# A client of the "prefect" subprotocol sends its auth message at once; one that has not within this
# long is closed (1008) rather than kept open unauthenticated.
WEBSOCKET_AUTH_SECONDS = 5.0


class WebSocketClosed(Exception):
    """The connection is closed: by the peer, by us after a protocol error, or gone."""


class WebSocketProtocolError(Exception):
    """The peer broke the protocol; we close with `code`."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def websocket_accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii")).digest()).decode("ascii")


def _header_tokens(headers, name: str) -> list[str]:
    values = headers.get_all(name, [])
    return [token.strip().lower() for value in values for token in value.split(",") if token.strip()]


def is_websocket_upgrade(headers) -> bool:
    return "websocket" in _header_tokens(headers, "Upgrade")


def websocket_handshake_problem(method: str, headers) -> tuple[int, str] | None:
    """(status, detail) when an upgrade request is not a valid opening handshake (RFC 6455, 4.2.1)."""
    if method != "GET":
        return 405, "WebSocket upgrades must use GET"
    if "upgrade" not in _header_tokens(headers, "Connection"):
        return 400, "Connection: Upgrade is required"
    if headers.get("Sec-WebSocket-Version", "").strip() != "13":
        return 426, "Unsupported WebSocket version; use 13"
    try:
        key = base64.b64decode(headers.get("Sec-WebSocket-Key", "").strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != 16:
        return 400, "Sec-WebSocket-Key must be 16 base64-encoded bytes"
    return None


def encode_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One frame. Servers never mask; `mask` (4 bytes) is for clients, such as tests."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask is not None else 0
    length = len(payload)
    if length < 126:
        head.append(mask_bit | length)
    elif length < 1 << 16:
        head.append(mask_bit | 126)
        head += length.to_bytes(2, "big")
    else:
        head.append(mask_bit | 127)
        head += length.to_bytes(8, "big")
    if mask is None:
        return bytes(head) + payload
    return bytes(head) + mask + _apply_mask(payload, mask)


def _apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR with the repeating 4-byte key, done on one big integer rather than byte by byte."""
    if not data:
        return b""
    repeated = (mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(data), "big")


def close_payload(code: int, reason: str = "") -> bytes:
    """The code and as much of the reason as fits a control frame, never cut inside a UTF-8 character."""
    text = reason.encode("utf-8")[: WS_MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore")
    return code.to_bytes(2, "big") + text.encode("utf-8")


def _valid_close_code(code: int) -> bool:
    """Codes a peer may send (RFC 6455, 7.4): 1000-1003, 1007-1011, 3000-4999."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1011 or 3000 <= code <= 4999


def parse_close_payload(payload: bytes) -> tuple[int, str]:
    """A peer's close frame: (code, reason); 1005 ("no status") for an empty one."""
    if not payload:
        return 1005, ""
    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 0
    if not _valid_close_code(code):
        raise WebSocketProtocolError(WS_CLOSE_PROTOCOL_ERROR, "invalid close code")
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WebSocketProtocolError(WS_CLOSE_INVALID_DATA, "close reason is not valid UTF-8") from None


def parse_frame(buffer, max_payload: int, require_mask: bool = True) -> tuple[bool, int, bytes, int] | None:
    """The frame at the start of `buffer`: (fin, opcode, unmasked payload, bytes it takes), or None while
    it has not all arrived. WebSocketProtocolError as soon as its header breaks a rule, or announces more
    than `max_payload` bytes: an oversized frame is refused before it is buffered."""
    if len(buffer) < 2:
        return None
    first, second = buffer[0], buffer[1]
    fin, opcode, masked, length = bool(first & 0x80), first & 0x0F, bool(second & 0x80), second & 0x7F
    if first & 0x70:
        raise WebSocketProtocolError(WS_CLOSE_PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
    if opcode not in _WS_KNOWN_OPCODES:
        raise WebSocketProtocolError(WS_CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
    if opcode in _WS_CONTROL_OPCODES and (not fin or length > WS_MAX_CONTROL_PAYLOAD):
        raise WebSocketProtocolError(WS_CLOSE_PROTOCOL_ERROR, "control frames must be whole and at most 125 bytes")
    if require_mask and not masked:
        raise WebSocketProtocolError(WS_CLOSE_PROTOCOL_ERROR, "client frames must be masked")
    at = 2
    if length >= 126:
        width = 2 if length == 126 else 8
        if len(buffer) < 2 + width:
            return None
        length, at = int.from_bytes(buffer[2 : 2 + width], "big"), 2 + width
        if length >> 63:
            raise WebSocketProtocolError(WS_CLOSE_PROTOCOL_ERROR, "frame length has its high bit set")
    if length > max_payload and opcode not in _WS_CONTROL_OPCODES:
        raise WebSocketProtocolError(WS_CLOSE_TOO_BIG, "message too big")
    end = at + (4 if masked else 0) + length
    if len(buffer) < end:
        return None
    payload = bytes(buffer[end - length : end])
    if masked:
        payload = _apply_mask(payload, bytes(buffer[at : at + 4]))
    return fin, opcode, payload, end


class MessageAssembler:
    """Data frames into whole messages, within a size (bytes) and a frame-count limit."""

    __slots__ = ("max_bytes", "opcode", "parts", "size")

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.opcode: int | None = None
        self.parts: list[bytes] = []
        self.size = 0

    def room(self) -> int:
        """How many more payload bytes the message being assembled may take."""
        return self.max_bytes - self.size

    def add(self, fin: bool, opcode: int, payload: bytes) -> str | bytes | None:
        """The whole message once its last frame is added (text decoded), else None."""
        if (opcode == WS_CONTINUATION) == (self.opcode is None):
            reason = (
                "continuation frame without a message" if self.opcode is None else "new message inside a fragmented one"
            )
            raise WebSocketProtocolError(WS_CLOSE_PROTOCOL_ERROR, reason)
        if len(self.parts) >= WS_MAX_FRAMES_PER_MESSAGE:
            raise WebSocketProtocolError(WS_CLOSE_TOO_BIG, f"message in more than {WS_MAX_FRAMES_PER_MESSAGE} frames")
        self.opcode = opcode if self.opcode is None else self.opcode
        self.parts.append(payload)
        self.size += len(payload)
        if self.size > self.max_bytes:
            raise WebSocketProtocolError(WS_CLOSE_TOO_BIG, f"message larger than {self.max_bytes} bytes")
        if not fin:
            return None
        data, opcode = b"".join(self.parts), self.opcode
        self.opcode, self.parts, self.size = None, [], 0
        if opcode == WS_BINARY:
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise WebSocketProtocolError(WS_CLOSE_INVALID_DATA, "text message is not valid UTF-8") from None


def websocket_origin_allowed(settings: Settings, headers) -> bool:
    """A browser names the page that opens a WebSocket in Origin, and nothing else stops a page of any
    site from opening one (the same-origin policy does not cover them): it must be this server's own
    origin or one that CORS allows. Clients that are not browsers send no Origin."""
    origin = headers.get("Origin")
    if not origin:
        return True
    allowed = [o.strip() for o in settings["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"].split(",") if o.strip()]
    if "*" in allowed or origin in allowed:
        return True
    host = (headers.get("Host") or "").strip().lower()
    try:
        return bool(host) and urllib.parse.urlsplit(origin.strip().lower()).netloc == host
    except ValueError:  # e.g. "http://[evil": no origin of ours
        return False


# The event endpoints. Prefect 3 clients ask for the "prefect" subprotocol and then authenticate in
# band: {"type": "auth", "token": <PREFECT_API_AUTH_STRING or null>} -> {"type": "auth_success"}.
# (Its subscriber sends no Authorization header, so these paths are exempt from HTTP basic auth and
# the token is what protects them.) A client without the subprotocol is served without the message
# exchange, but only while the server has no auth string, as Prefect's server does.
#
# An endpoint is made per connection with the server's App and `ws`, the connection as the loop gives it:
# ws.send_json(value), ws.close(code, reason), ws.run_soon(fn) (fn on a worker thread), ws.resume(),
# ws.subprotocol, ws.peer. The loop calls receive(messages) with the whole messages that arrived in a
# row, never two calls at once: on a worker thread, or on the loop itself when the endpoint's
# `runs_on_loop` is true (it must then never wait, nor touch the database). receive returns True when it
# is done with them, or False when it will call ws.resume() later; the loop reads no further frame of
# the connection meanwhile. closed() is called once the connection is over.

EVENTS_OUT_BACKFILL_SECONDS = 15 * 60  # a subscriber's backfill reaches back at most this far (Prefect's default)
EVENTS_OUT_BACKFILL_PAGE = 250
EVENTS_OUT_BACKFILL_MAX = 1_000  # the newest events of the window a subscriber is sent on arrival, at most
EVENT_SUBSCRIBER_BACKLOG = 10_000  # events waiting for one subscriber before it is cut off (it may backfill)
LOG_SUBSCRIBER_BACKLOG = 10_000  # logs waiting for one /logs/out subscriber before it is cut off


def websocket_subprotocol_problem(settings: Settings, headers) -> tuple[str | None, str | None]:
    """(subprotocol to accept, refusal detail): the refusal when auth is on and the client would skip it."""
    offered = _header_tokens(headers, "Sec-WebSocket-Protocol")
    if "prefect" in offered:
        return "prefect", None
    if settings["PREFECT_SERVER_API_AUTH_STRING"]:
        return None, "'prefect' subprotocol required when auth is configured"
    return None, None


def _json_message(ws, message):
    """A message as JSON; one that is not JSON closes the connection (1003) and gives None."""
    try:
        return loads(message)
    except (ValueError, RecursionError):
        ws.close(WS_CLOSE_UNSUPPORTED_DATA, "expected a JSON message")
        return None


def filter_message(ws, message) -> dict | None:
    """A subscriber's `{"type": "filter", ...}` message; anything else closes the connection and gives None."""
    message = _json_message(ws, message)
    if message is None:
        return None
    if not isinstance(message, dict) or message.get("type") != "filter":
        ws.close(WS_CLOSE_PROTOCOL_ERROR, "Expected 'filter' message")
        return None
    return message


def authenticate_websocket(app, ws, message) -> bool:
    """The in-band auth exchange, given the first message; False (after closing with 1008) when it fails."""
    message = _json_message(ws, message)
    if not isinstance(message, dict) or message.get("type") != "auth":
        ws.close(WS_CLOSE_POLICY_VIOLATION, "Expected 'auth' message")
        return False
    expected = app.settings["PREFECT_SERVER_API_AUTH_STRING"]
    if expected:
        token = message.get("token")
        if not isinstance(token, str) or not token:
            ws.close(WS_CLOSE_POLICY_VIOLATION, "Auth required but no token provided")
            return False
        if not secrets.compare_digest(token.encode(), expected.encode()):
            ws.close(WS_CLOSE_POLICY_VIOLATION, "Invalid token")
            return False
    ws.send_json({"type": "auth_success"})
    return True


# How long the event writer waits for more events before it commits. Measured in-process on SQLite: 310 us
# an event in a transaction of its own, 156 in fives, 99 in twenties; 2,000 flows sending an event every
# 5 s make about four per 10 ms. A client's pong (its confirmation) comes that much later.
EVENT_COMMIT_WINDOW_SECONDS = 0.01


def _read_events(messages: list, peer: str) -> list[dict]:
    """The valid events among a connection's messages. An invalid one is dropped, not refused: a client
    would resend it on every reconnect. One log line for a batch, however many were dropped."""
    events, invalid, first = [], 0, ""
    for message in messages:
        try:
            events.append(validate_event(loads(message)))
        except (ValueError, RecursionError, ValidationFailed) as exc:
            invalid, first = invalid + 1, first or str(exc)[:500]
    if invalid:
        log.warning("ignoring %d invalid event(s) from %s, the first: %s", invalid, peer, first)
    return events


class EventIntake:
    """The one writer of /events/in: the messages handed in by every connection are read as events and
    stored in shared transactions (a group commit) by a thread of its own, started when the first comes
    (so a client's big or bad events cost the loop nothing). submit() returns at once; `done(error)` is
    called once the events are committed (error None) or not."""

    def __init__(self, db, write_guard):
        self.db = db
        self.write_guard = write_guard  # () -> context manager: the write turnstile on SQLite
        self._ready = threading.Condition()
        self._pending: list[tuple[list, object, str]] = []  # (messages, done, peer)
        self._writing = False  # a batch has been taken and is being stored
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, messages: list, done, peer: str = "?"):
        """Queue a connection's messages (each one event, as JSON text)."""
        with self._ready:
            if self._closed:
                done(DatabaseUnavailable("the server is shutting down"))
                return
            self._pending.append((messages, done, peer))
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_forever, name="prefectlite-events", daemon=True)
                self._thread.start()
            self._ready.notify()

    def close(self):
        with self._ready:
            self._closed = True
            self._ready.notify()
        if self._thread is not None:
            self._thread.join(10)

    def wait_until_stored(self, timeout: float) -> bool:
        """Wait until every message submitted so far is stored (at once when none waits)."""
        with self._ready:
            if not self._pending and not self._writing:
                return True
        stored = threading.Event()
        self.submit([], lambda _error: stored.set())
        return stored.wait(timeout)

    def _write_forever(self):
        while True:
            with self._ready:
                while not self._pending and not self._closed:
                    self._ready.wait()
                if not self._pending:
                    return
            time.sleep(EVENT_COMMIT_WINDOW_SECONDS)  # let other connections' events join this commit
            with self._ready:
                batch, self._pending = self._pending, []
                self._writing = True
            groups = [_read_events(messages, peer) for messages, _done, peer in batch]
            errors = self._commit(groups)
            with self._ready:
                self._writing = False
            for (_messages, done, _peer), error in zip(batch, errors):
                done(error)

    def _commit(self, groups: list[list[dict]]) -> list[Exception | None]:
        """An error (or None) per group: all in one transaction, or, when the database refuses that, each
        group alone, and in a group that fails alone each event alone (only what is refused is lost)."""
        try:
            self._write(groups)
            return [None] * len(groups)
        except DatabaseUnavailable as exc:
            return [exc] * len(groups)
        except Exception as exc:  # noqa: BLE001 - narrowed down below, or handed to each connection
            if len(groups) == 1 and len(groups[0]) == 1:
                return [exc]
        return [self._commit_alone(events) for events in groups]

    def _commit_alone(self, events: list[dict]) -> Exception | None:
        if len(events) == 1:
            return self._commit([events])[0]
        errors = [self._commit([[event]])[0] for event in events]
        return next((e for e in errors if isinstance(e, DatabaseUnavailable)), None)

    def _write(self, groups: list[list[dict]]):
        with self.write_guard(), self.db.write() as tx:
            for events in groups:
                store_events(tx, events)


class EventsIn:
    """/api/events/in: each message is one event. Storing needs no worker of the connection's: the
    endpoint runs on the loop (the auth exchange only) and hands the messages to the server's
    EventIntake; the loop reads the connection's next frame only once they are stored, so the pong that
    answers a client's checkpoint ping confirms every event sent before it."""

    runs_on_loop = True

    def __init__(self, app, ws):
        self.app, self.ws = app, ws
        self.authenticated = ws.subprotocol != "prefect"

    def receive(self, messages: list) -> bool:
        """True: done; False: the connection goes on once ws.resume() is called (after the commit)."""
        if not self.authenticated:
            self.authenticated = authenticate_websocket(self.app, self.ws, messages[0])
            messages = messages[1:]
            if not self.authenticated or not messages:
                return True
        self.app.event_intake.submit(messages, self._stored, self.ws.peer)
        return False

    def _stored(self, error: Exception | None):
        if isinstance(error, DatabaseUnavailable):
            # Closing unconfirmed makes the client reconnect and resend what it has not had confirmed.
            self.ws.close(WS_CLOSE_TRY_AGAIN_LATER, f"database unavailable: {error}"[:120])
        elif error is not None:
            log.error("storing events from %s failed: %s", self.ws.peer, error)
            self.ws.close(WS_CLOSE_INTERNAL_ERROR, "internal server error")
        self.ws.resume()

    def closed(self):
        pass


class FilterSubscriber:
    """A /events/out or /logs/out socket: it authenticates (Prefect 3's `prefect` subprotocol), then sends one
    filter message, which _subscribe takes; anything it sends after that is ignored."""

    def __init__(self, app, ws):
        self.app, self.ws = app, ws
        self.authenticated = ws.subprotocol != "prefect"
        self.subscribed = False

    def receive(self, messages: list) -> bool:
        for message in messages:
            if not self.authenticated:
                self.authenticated = authenticate_websocket(self.app, self.ws, message)
                if not self.authenticated:
                    break
            elif not self.subscribed:
                message = filter_message(self.ws, message)
                self.subscribed = message is not None and self._subscribe(message)
                if not self.subscribed:
                    break
        return True

    def _subscribe(self, message: dict) -> bool:
        """Take the filter message (a dict of type "filter"); False after closing the socket if it is refused."""
        raise NotImplementedError


class StreamSubscriber(FilterSubscriber):
    """A subscriber sent what is stored from its subscription on (_send_matching says how), oldest first.

    Committed rows reach deliver() on the committing thread; those it wants (_matching) wait here and a
    worker sends them (one flush at a time per subscriber). A subscriber whose backlog grows past
    `backlog` is closed with 1013 (`cut_off_reason`) rather than slow the writers down."""

    backlog = EVENT_SUBSCRIBER_BACKLOG
    cut_off_reason = "subscriber fell too far behind"

    def __init__(self, app, ws):
        super().__init__(app, ws)
        self.filter: dict | None = None  # once subscribed to the hub
        self._lock = threading.Lock()
        self._pending: collections.deque = collections.deque()
        self._flushing = False  # a worker is sending (or the backfill runs): deliver() only queues
        self._over = False

    def _hub(self) -> "SubscriberHub":
        raise NotImplementedError

    def _matching(self, rows: list[dict]) -> list[dict]:
        return rows

    def _send_matching(self, batch: list[dict]):
        raise NotImplementedError

    def deliver(self, rows: list[dict]):
        """On the thread that committed `rows`: queue those wanted, and have a worker send them."""
        rows = self._matching(rows)
        if not rows:
            return
        with self._lock:
            if self._over:
                return
            self._pending.extend(rows)
            if len(self._pending) > self.backlog:
                self._cut_off_locked()
                return
            start = not self._flushing
            self._flushing = True
        if start:
            self.ws.run_soon(self._flush)

    def cut_off(self):
        """Rows meant for this subscriber were lost on the way: it reconnects."""
        with self._lock:
            self._cut_off_locked()

    def _cut_off_locked(self):
        self._over = True
        self._pending.clear()
        self.ws.close(WS_CLOSE_TRY_AGAIN_LATER, self.cut_off_reason)

    def _flush(self):
        while True:
            with self._lock:
                if self._over or not self._pending:
                    self._flushing = False
                    return
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), EVENTS_OUT_BACKFILL_PAGE))]
            self._send_matching(batch)

    def closed(self):
        with self._lock:
            self._over = True
            self._pending.clear()
        if self.filter is not None:
            self._hub().unsubscribe(self)


class EventsOut(StreamSubscriber):
    """/api/events/out: a subscriber sends one filter message and then receives the recent matching
    events (unless backfill is false) and the matching events stored from then on, oldest first.
    One cut off (1013) reconnects and backfills."""

    cut_off_reason = "subscriber fell too far behind; reconnect to backfill"

    def __init__(self, app, ws):
        super().__init__(app, ws)
        self._sent: set = set()  # ids sent by the backfill, which live events may repeat

    runs_on_loop = False  # the backfill reads the database

    def _hub(self) -> "SubscriberHub":
        return self.app.events

    def _subscribe(self, message: dict) -> bool:
        try:
            # A subscription without an end streams on (Prefect's client always sends until = now + 1 year).
            flt = normalize_event_filter(message.get("filter"), loc=("filter",), until=_dt.timedelta(days=365))
        except ValidationFailed as exc:
            self.ws.close(WS_CLOSE_PROTOCOL_ERROR, f"Invalid filter: {exc}"[:120])
            return False
        earliest = iso(utcnow() - _dt.timedelta(seconds=EVENTS_OUT_BACKFILL_SECONDS))
        flt["occurred"]["since"] = max(flt["occurred"]["since"], earliest)
        flt["order"] = "ASC"
        self.filter = flt
        self._flushing = True  # until the backfill is sent: what is stored meanwhile waits in _pending
        self.app.events.subscribe(self)  # before the backfill, so that nothing falls between the two
        if message.get("backfill", True) is not False:
            self._backfill()
        self.ws.run_soon(self._flush)
        return True

    def _backfill(self):
        """The newest EVENTS_OUT_BACKFILL_MAX of the window's events, oldest first, in one query (15 minutes
        of 2,000 busy flows are ~360,000 events: a subscriber wants the recent past, not all of it)."""
        with self.app.db.read() as tx:
            newest, _total = read_events_page(tx, {**self.filter, "order": "DESC"}, EVENTS_OUT_BACKFILL_MAX)
        for event in reversed(newest):
            if self._over:  # the subscriber is gone
                return
            self.ws.send_json({"type": "event", "event": event})
            self._sent.add(event["id"])

    def _send_matching(self, batch: list[dict]):
        events = []
        for event in batch:
            if event["id"] in self._sent:  # stored while we backfilled: sent already
                self._sent.discard(event["id"])
            else:
                events.append(event)
        with self.app.db.read() as tx:
            wanted = matching_event_ids(tx, self.filter, [e["id"] for e in events])
        for event in events:
            if event["id"] in wanted:
                self.ws.send_json({"type": "event", "event": _received_event(event)})


def _log_stream_level(value, loc) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValidationFailed([_error(loc, "value is not a valid integer", "type_error.integer")])
    return int(value)


def _log_stream_ids(ops: dict, loc) -> frozenset | None:
    ids = ops.get("any_")
    if ids is None:
        return None
    if not isinstance(ids, list):
        raise ValidationFailed([_error((*loc, "any_"), "value is not a valid list", "type_error.list")])
    return frozenset(parse_uuid(i, (*loc, "any_", n)) for n, i in enumerate(ids))


def _log_stream_ops(flt: dict, key: str) -> dict:
    ops = flt.get(key)
    if ops is None:
        return {}
    if not isinstance(ops, dict):
        raise ValidationFailed([_error(("filter", key), "value is not a valid dict", "type_error.dict")])
    return {op: value for op, value in ops.items() if value is not None}


def log_stream_filter(flt: dict) -> dict:
    """What Prefect's log stream checks of a /logs/out LogFilter (its log_matches_filter), parsed: level
    ge_/le_, timestamp before_/after_ (both ends included), flow_run_id any_, task_run_id any_ and is_null_,
    all of them (operator, name and text are not looked at there, nor here). ValidationFailed when malformed."""
    level, stamp = _log_stream_ops(flt, "level"), _log_stream_ops(flt, "timestamp")
    flow_runs, task_runs = _log_stream_ops(flt, "flow_run_id"), _log_stream_ops(flt, "task_run_id")
    no_task_run = task_runs.get("is_null_")
    if no_task_run is not None and not isinstance(no_task_run, bool):
        raise ValidationFailed(
            [_error(("filter", "task_run_id", "is_null_"), "value could not be parsed to a boolean", "type_error.bool")]
        )
    return {
        "level_ge": _log_stream_level(level["ge_"], ("filter", "level", "ge_")) if "ge_" in level else None,
        "level_le": _log_stream_level(level["le_"], ("filter", "level", "le_")) if "le_" in level else None,
        "after": parse_datetime(stamp["after_"], ("filter", "timestamp", "after_")) if "after_" in stamp else None,
        "before": parse_datetime(stamp["before_"], ("filter", "timestamp", "before_")) if "before_" in stamp else None,
        "flow_runs": _log_stream_ids(flow_runs, ("filter", "flow_run_id")),
        "task_runs": _log_stream_ids(task_runs, ("filter", "task_run_id")),
        "no_task_run": no_task_run,
    }


def log_matches_stream_filter(log: dict, flt: dict) -> bool:
    """A stored log (timestamps in our canonical text, which sorts as time does) against log_stream_filter's."""
    checks = (
        flt["level_ge"] is None or log["level"] >= flt["level_ge"],
        flt["level_le"] is None or log["level"] <= flt["level_le"],
        flt["after"] is None or log["timestamp"] >= flt["after"],
        flt["before"] is None or log["timestamp"] <= flt["before"],
        flt["flow_runs"] is None or log["flow_run_id"] in flt["flow_runs"],
        flt["task_runs"] is None or log["task_run_id"] in flt["task_runs"],
        flt["no_task_run"] is None or flt["no_task_run"] == (log["task_run_id"] is None),
    )
    return all(checks)


class LogsOut(StreamSubscriber):
    """/api/logs/out: Prefect 3's log subscribers (`prefect flow-run watch` opens one beside /events/out)
    authenticate, send one filter message (a LogFilter), and keep the socket open. As Prefect's server,
    this one sends them `{"type": "log", "log": Log}` for each matching log stored from then on (no backfill)
    only when both of its log stream settings, PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED and
    ..._STREAM_PUBLISHING_ENABLED, are on; they are off by default, and then nothing is sent. A subscriber
    is sent the logs stored by its own server process and by the other processes of `start --processes N`
    (_ProcessGroup), not those stored by another server on the same database (as Prefect's, whose stream
    goes through its in-memory message broker by default). One that falls LOG_SUBSCRIBER_BACKLOG logs
    behind is closed with 1013 (Prefect drops what does not fit); Prefect's client reconnects."""

    runs_on_loop = True  # the auth exchange and the filter's checks only
    backlog = LOG_SUBSCRIBER_BACKLOG

    def _hub(self) -> "SubscriberHub":
        return self.app.logs

    def _subscribe(self, message: dict) -> bool:
        if not isinstance(message.get("filter"), dict):
            self.ws.close(WS_CLOSE_PROTOCOL_ERROR, "Invalid filter: a log filter is an object")
            return False
        try:
            flt = log_stream_filter(message["filter"])
        except ValidationFailed as exc:
            self.ws.close(WS_CLOSE_PROTOCOL_ERROR, f"Invalid filter: {exc}"[:120])
            return False
        if self.app.settings["PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED"]:
            self.filter = flt
            self.app.logs.subscribe(self)
        return True

    def _matching(self, rows: list[dict]) -> list[dict]:
        return [log for log in rows if log_matches_stream_filter(log, self.filter)]

    def _send_matching(self, batch: list[dict]):
        for log in batch:
            self.ws.send_json({"type": "log", "log": log})


def _received_event(event: dict) -> dict:
    return {
        key: event.get(key)
        for key in ("occurred", "event", "resource", "related", "payload", "id", "follows", "received")
    }


class SubscriberHub:
    """Live fan-out of committed rows (events, logs) to the subscribers (StreamSubscriber) of one server
    process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._subscribers: list[StreamSubscriber] = []
        self.on_count = None  # called with the number of subscribers when it changes (_ProcessGroup)

    def subscribe(self, subscriber: StreamSubscriber):
        with self._lock:
            self._subscribers.append(subscriber)
            self._counted()

    def unsubscribe(self, subscriber: StreamSubscriber):
        with self._lock, contextlib.suppress(ValueError):
            self._subscribers.remove(subscriber)
            self._counted()

    def _counted(self):
        if self.on_count is not None:
            self.on_count(len(self._subscribers))

    def cut_off_everyone(self):
        """Rows meant for our subscribers were lost on the way: they reconnect (and backfill, if they can)."""
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.cut_off()

    def publish(self, rows: list[dict]):
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.deliver(rows)


# Background task runs for task workers: /api/task_runs/subscriptions/scheduled. A task worker
# authenticates as on /events/out, sends {"type": "subscribe", "keys": [task keys], "client_id": ...} and is
# then sent, one at a time, a scheduled background task run (no flow run) of one of its keys as a JSON
# TaskRun; it answers each with {"type": "ack"} before it is sent the next ({"type": "quit"} ends it).
# A 3.x client marks the runs meant for task workers with state_details.deferred (also a run delayed inside a
# flow, which has a flow run); a 2.x client (whose states have no such field) gets every scheduled task run
# without a flow run, as Prefect 2.20 did. Each run is delivered once per scheduled state, across every process
# and replica on the database: the delivery is claimed by a row in concurrency_lease whose id is the state's
# id (its INSERT succeeds once; the row goes when the run leaves that state, or expires after
# TASK_DELIVERY_CLAIM_SECONDS: a worker that died holding it). A run whose subscriber hangs up before it acks
# is delivered to the next one. Runs scheduled before anyone subscribed wait in the database meanwhile.
# POST /task_workers/filter lists the workers of every process (their subscriptions are listed in the database).

TASK_SUBSCRIPTION_PROTOCOL_ERROR = 4001  # Prefect's close code for a subscriber that breaks the protocol
# How often the dispatcher looks for scheduled runs it was not told about (written by another process of
# the server, or another server on the same database); runs written here wake it at once.
TASK_DISPATCH_POLL_SECONDS = 2.0
TASK_DISPATCH_PAGE = 100
TASK_DISPATCH_SCAN_PAGES = 10  # at most this many pages of a key chunk's scheduled runs read a round
TASK_DELIVERY_CLAIM_SECONDS = 86_400.0
TASK_SUBSCRIBE_LOG_KEYS = 5  # a subscription's log line names this many of its keys (and counts the rest)
# Every process lists its task workers' subscriptions in the database for /task_workers/filter: a row in
# concurrency_lease each (holder type task_worker), renewed every third of this and gone this long after its
# process stopped renewing it (a process that died; one that stops deletes its own).
TASK_WORKER_LISTING_SECONDS = 60.0
_TASK_WORKER_HOLDER = '{"type":"task_worker",%'  # how dumps() begins such a row's holder


def is_deliverable_task_run(run: dict) -> bool:
    """A scheduled background task run that a task worker should run (see above)."""
    state = run.get("state") or {}
    if state.get("type") != "SCHEDULED":
        return False
    deferred = (state.get("state_details") or {}).get("deferred")
    if deferred is not None:  # a 3.x state says so itself, whether or not a flow delayed it
        return deferred is True
    return run.get("flow_run_id") is None


def task_dispatch_query(key_count: int) -> str:
    """A page of the scheduled runs of `key_count` task keys whose delivery nobody has claimed, oldest first;
    parameters: the keys, the page's size and offset. Served by the partial index of migration 0010 (the
    state_type equality matches its WHERE; SQLite chooses it only with state_type among its columns)."""
    marks = ", ".join("?" * key_count)
    return (
        f"SELECT * FROM task_run t WHERE t.state_type = 'SCHEDULED' AND t.task_key IN ({marks}) "
        "AND NOT EXISTS (SELECT 1 FROM concurrency_lease l WHERE l.id = t.state_id) "
        "ORDER BY t.expected_start_time, t.id LIMIT ? OFFSET ?"
    )


def claim_task_run_delivery(db: Database, row: dict, now: _dt.datetime) -> bool:
    """Claim the delivery of a task run in its current scheduled state, for this process: True once per
    state across every process and replica on the database (the row's id is the state's)."""
    expiration = now + _dt.timedelta(seconds=TASK_DELIVERY_CLAIM_SECONDS)
    holder = {"type": "task_run_delivery", "id": row["id"]}
    try:
        with db.write() as tx:
            tx.execute(
                "INSERT INTO concurrency_lease (id, created, expiration, limit_ids, slots, holder) "
                "VALUES (?, ?, ?, '[]', 0, ?)",
                (row["state_id"], iso(now), iso(expiration), dumps(holder)),
            )
    except IntegrityViolation:
        return False
    return True


def release_task_run_delivery(tx, state_id: str) -> None:
    """Forget a delivery claim: its run left the state, or its worker hung up before acknowledging it."""
    tx.execute("DELETE FROM concurrency_lease WHERE id = ?", (state_id,))


def listed_task_workers(tx, now: _dt.datetime) -> list[dict]:
    """The task-worker subscriptions that the processes on this database list (see above): id, client_id,
    keys, and when its process last renewed it."""
    rows = tx.query(
        "SELECT id, expiration, holder FROM concurrency_lease WHERE holder LIKE ? AND expiration > ?",
        (_TASK_WORKER_HOLDER, iso(now)),
    )
    listed = []
    for row in rows:
        holder = decode_row("concurrency_lease", row)["holder"] or {}
        renewed = from_iso(row["expiration"]) - _dt.timedelta(seconds=TASK_WORKER_LISTING_SECONDS)
        listed.append({"id": row["id"], "client_id": holder.get("client_id"), "keys": holder.get("keys") or []})
        listed[-1]["seen"] = min(renewed, now)
    return listed


class TaskRunSubscriber:
    """/api/task_runs/subscriptions/scheduled: one task worker's connection. It parses what the worker
    sends on the loop (nothing here waits or reads the database); the App's TaskRunDispatcher sends."""

    runs_on_loop = True

    def __init__(self, app, ws):
        self.app, self.ws = app, ws
        self.authenticated = ws.subprotocol != "prefect"
        self.keys: tuple = ()  # as subscribed, in order, each once
        self.key_set: frozenset = frozenset()  # the same, for membership
        self.client_id = None
        self.awaiting: str | None = None  # the run sent and not acknowledged yet (set by the dispatcher)
        self.sent_at: _dt.datetime | None = None  # when that run was sent
        self.listing_id = new_id()  # its row among the listed task workers
        self.over = False

    def receive(self, messages: list) -> bool:
        for message in messages:
            if self.over:
                break
            if not self.authenticated:
                self.authenticated = authenticate_websocket(self.app, self.ws, message)
                if not self.authenticated:
                    break
            elif not self.keys:
                self._subscribe(message)
            else:
                self._acknowledge(message)
        return True

    def _refuse(self, reason: str):
        self.over = True
        self.ws.close(TASK_SUBSCRIPTION_PROTOCOL_ERROR, f"Protocol violation: {reason}")

    def _subscribe(self, message):
        message = _json_message(self.ws, message)
        if not isinstance(message, dict) or message.get("type") != "subscribe":
            self._refuse("expected 'subscribe' message")
            return
        keys = message.get("keys")
        if not isinstance(keys, list) or not keys or not all(isinstance(key, str) for key in keys):
            self._refuse("expected 'keys' in subscribe message")
            return
        if not message.get("client_id"):
            self._refuse("expected 'client_id' in subscribe message")
            return
        self.keys, self.client_id = tuple(dict.fromkeys(keys)), str(message["client_id"])
        self.key_set = frozenset(self.keys)
        shown = ", ".join(repr(key) for key in self.keys[:TASK_SUBSCRIBE_LOG_KEYS])
        rest = len(self.keys) - TASK_SUBSCRIBE_LOG_KEYS
        more = f", and {rest} more" if rest > 0 else ""
        log.info("task worker %r subscribed to %d task keys: %s%s", self.client_id, len(self.keys), shown, more)
        self.app.task_dispatcher.subscribe(self)

    def _acknowledge(self, message):
        message = _json_message(self.ws, message)
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "quit":
            self.over = True
            self.ws.close(WS_CLOSE_NORMAL, "")
        elif kind != "ack":
            self._refuse("expected 'ack' message")
        elif self.awaiting is not None:  # an ack with nothing sent is ignored (it would only wake the dispatcher)
            self.app.task_dispatcher.acknowledged(self)

    def closed(self):
        self.over = True
        if self.keys:
            self.app.task_dispatcher.unsubscribe(self)


class TaskRunDispatcher:
    """Hands scheduled background task runs to the task workers subscribed to this server process, on a
    thread of its own (started by the first subscriber): woken when a run is scheduled here, when a worker
    acknowledges or leaves, and every TASK_DISPATCH_POLL_SECONDS while anyone is subscribed."""

    def __init__(self, db):
        self.db = db
        self._wake = threading.Condition()
        self._subscribers: list[TaskRunSubscriber] = []
        self._claims: dict[str, tuple[str, TaskRunSubscriber]] = {}  # run id -> (its state id, subscriber)
        self._released: list[str] = []  # state ids of claims to give back (the dispatcher's thread writes)
        self._woken = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._to_list: list[TaskRunSubscriber] = []  # subscribed, not listed in the database yet
        self._to_unlist: list[str] = []  # listing ids of subscribers gone
        self._listed: dict[str, TaskRunSubscriber] = {}  # ours in the database, by listing id
        self._renewed = 0.0  # time.monotonic() of the listing's last renewal

    def on_state(self, tx, kind: str, run: dict, initial, state: dict):
        """A state listener (DatabaseHooks): a run scheduled for a task worker wakes us once it commits; a run
        leaving a scheduled state drops that state's delivery claim."""
        if kind != "task":
            return
        if initial and initial.get("type") == "SCHEDULED" and initial.get("id"):
            release_task_run_delivery(tx, initial["id"])
        if state["type"] == "SCHEDULED" and is_deliverable_task_run({**run, "state": state}):
            tx.after_commit.append(self.wake)

    def wake(self):
        with self._wake:
            self._woken = True
            self._wake.notify()

    def subscribe(self, subscriber: TaskRunSubscriber):
        with self._wake:
            if self._closed:
                subscriber.ws.close(WS_CLOSE_GOING_AWAY, "server shutting down")
                return
            self._subscribers.append(subscriber)
            self._to_list.append(subscriber)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._dispatch_forever, name="prefectlite-task-runs", daemon=True
                )
                self._thread.start()
            self._woken = True
            self._wake.notify()

    def acknowledged(self, subscriber: TaskRunSubscriber):
        with self._wake:
            subscriber.awaiting = None
            self._woken = True
            self._wake.notify()

    def unsubscribe(self, subscriber: TaskRunSubscriber):
        """A worker left: the run it had not acknowledged goes to the next one."""
        with self._wake:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(subscriber)
            if subscriber in self._to_list:
                self._to_list.remove(subscriber)
            else:
                self._to_unlist.append(subscriber.listing_id)
            if subscriber.awaiting is not None:
                claim = self._claims.pop(subscriber.awaiting, None)
                if claim is not None:
                    self._released.append(claim[0])
                subscriber.awaiting = None
            self._woken = True
            self._wake.notify()

    def close(self):
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(10)

    def _dispatch_forever(self):
        while True:
            with self._wake:
                if not self._woken and not self._closed:
                    self._wake.wait(TASK_DISPATCH_POLL_SECONDS)
                self._woken = False
                if self._closed:
                    break
                ready = [s for s in self._subscribers if s.awaiting is None and not s.over]
                released, self._released = self._released, []
            try:
                self._give_back(released)
            except DatabaseError as exc:  # kept for the next round
                log.warning("giving back task run deliveries failed: %s", exc)
                with self._wake:
                    self._released.extend(released)
            try:
                self._keep_listing()
            except DatabaseError as exc:  # the next round tries again
                log.warning("listing task workers failed: %s", exc)
            if ready:
                try:
                    self._dispatch(ready)
                except DatabaseError as exc:  # e.g. the database restarting: the next round tries again
                    log.warning("dispatching background task runs failed: %s", exc)
                except Exception:  # noqa: BLE001 - the dispatcher must outlive one bad round
                    log.exception("dispatching background task runs failed")
        with contextlib.suppress(DatabaseError):  # stopping: our workers are not listed any more
            with self._wake:
                listed = list(self._listed)
            self._unlist(listed)

    def _keep_listing(self):
        """List the subscribers that came, unlist those that went, renew the rest's rows when due."""
        with self._wake:
            new = [s for s in self._to_list if not s.over]
            gone, self._to_list, self._to_unlist = self._to_unlist, [], []
        now = utcnow()
        expiration = iso(now + _dt.timedelta(seconds=TASK_WORKER_LISTING_SECONDS))
        try:
            if new:
                with self.db.write() as tx:
                    for subscriber in new:
                        holder = {"type": "task_worker", "client_id": subscriber.client_id, "keys": subscriber.keys}
                        tx.execute(
                            "INSERT INTO concurrency_lease (id, created, expiration, limit_ids, slots, holder) "
                            "VALUES (?, ?, ?, '[]', 0, ?)",
                            (subscriber.listing_id, iso(now), expiration, dumps(holder)),
                        )
                with self._wake:
                    self._listed.update((s.listing_id, s) for s in new)
                new = []
            self._unlist(gone)
            gone = []
            with self._wake:
                ids = list(self._listed)
            if ids and time.monotonic() - self._renewed >= TASK_WORKER_LISTING_SECONDS / 3:
                missing = []
                with self.db.write() as tx:
                    for start in range(0, len(ids), 500):
                        chunk = ids[start : start + 500]
                        marks = ", ".join("?" * len(chunk))
                        sql = f"UPDATE concurrency_lease SET expiration = ? WHERE id IN ({marks})"
                        if tx.execute(sql, (expiration, *chunk)).rowcount < len(chunk):  # expired and removed
                            present = tx.query(f"SELECT id FROM concurrency_lease WHERE id IN ({marks})", chunk)
                            missing += set(chunk) - {row["id"] for row in present}
                self._renewed = time.monotonic()
                with self._wake:  # listed again next round (this process stalled longer than a row lives)
                    self._to_list += [self._listed.pop(i) for i in missing if i in self._listed]
                    self._woken = True
        finally:
            with self._wake:  # what was not written is tried again next round
                self._to_list[:0] = new
                self._to_unlist.extend(gone)

    def _unlist(self, listing_ids: list[str]):
        with self._wake:
            ours = [listing_id for listing_id in listing_ids if listing_id in self._listed]
        if ours:
            with self.db.write() as tx:
                for listing_id in ours:
                    tx.execute("DELETE FROM concurrency_lease WHERE id = ?", (listing_id,))
            with self._wake:
                for listing_id in ours:
                    self._listed.pop(listing_id, None)

    def _give_back(self, state_ids: list[str]):
        if state_ids:
            with self.db.write() as tx:
                for state_id in state_ids:
                    release_task_run_delivery(tx, state_id)

    def workers(self, keys: list[str] | None, now: _dt.datetime) -> list[dict]:
        """/task_workers/filter: the task workers, one per client id (its connections' keys together), those
        with any of `keys` (None: all): ours, and those listed in the database by the other processes. Ours
        are seen `now` while idle, as Prefect's tracker sees an idle worker every second; one running a run
        was last seen when it was sent it. The others' were seen when their process last renewed them."""
        with self.db.read() as tx:
            listed = listed_task_workers(tx, now)
        with self._wake:
            subscribers = [s for s in self._subscribers if not s.over]
            ours = {s.listing_id for s in subscribers} | self._listed.keys()
        connections = [
            (s.client_id, s.keys, now if s.awaiting is None or s.sent_at is None else s.sent_at) for s in subscribers
        ]
        connections += [(row["client_id"], row["keys"], row["seen"]) for row in listed if row["id"] not in ours]
        found: dict[str, dict] = {}
        for client_id, subscribed, seen in connections:
            worker = found.setdefault(client_id, {"keys": {}, "seen": seen})
            worker["keys"].update(dict.fromkeys(subscribed))
            worker["seen"] = max(worker["seen"], seen)
        wanted = None if keys is None else set(keys)
        return [
            {"identifier": client_id, "task_keys": list(worker["keys"]), "timestamp": iso(worker["seen"])}
            for client_id, worker in found.items()
            if wanted is None or not wanted.isdisjoint(worker["keys"])
        ]

    def _dispatch(self, ready: list[TaskRunSubscriber]):
        keys = sorted(frozenset().union(*(subscriber.key_set for subscriber in ready)))
        with self.db.read() as tx:
            self._forget_stale_claims(tx)
            candidates = self._scheduled_runs(tx, keys)
        for run in candidates:
            subscriber = self._claim(run, ready)
            if subscriber is not None:
                subscriber.ws.send_json(task_run_out(run, subscriber.ws.client_major))
                ready.remove(subscriber)
                if not ready:
                    return

    def _scheduled_runs(self, tx, keys: list[str]) -> list[dict]:
        """The oldest deliverable scheduled runs of these keys whose delivery nobody has claimed: up to a page
        of them per chunk of keys, reading past runs that are not for task workers (a flow's retries)."""
        runs = []
        for start in range(0, len(keys), TASK_DISPATCH_PAGE):
            chunk = keys[start : start + TASK_DISPATCH_PAGE]
            sql = task_dispatch_query(len(chunk))
            found = []
            for page in range(TASK_DISPATCH_SCAN_PAGES):
                rows = tx.query(sql, (*chunk, TASK_DISPATCH_PAGE, page * TASK_DISPATCH_PAGE))
                found.extend(row for row in rows if is_deliverable_task_run(decode_row("task_run", row)))
                if len(rows) < TASK_DISPATCH_PAGE or len(found) >= TASK_DISPATCH_PAGE:
                    break
            runs.extend(found)
        runs.sort(key=lambda row: (row["expected_start_time"] or "", row["id"]))
        return runs

    def _claim(self, row: dict, ready: list[TaskRunSubscriber]) -> TaskRunSubscriber | None:
        with self._wake:
            held = self._claims.get(row["id"])
            if held is not None and held[0] == row["state_id"]:
                return None
            subscriber = next(
                (s for s in ready if row["task_key"] in s.key_set and s.awaiting is None and not s.over), None
            )
            if subscriber is None:
                return None
            subscriber.awaiting = row["id"]  # held while the claim is written: no other run goes to it
            subscriber.sent_at = utcnow()
        if not claim_task_run_delivery(self.db, row, utcnow()):  # another process delivered it first
            with self._wake:
                subscriber.awaiting = None
            return None
        with self._wake:
            if subscriber.over:  # it hung up meanwhile: give the claim back for the next one
                subscriber.awaiting = None
                self._released.append(row["state_id"])
                self._woken = True
                return None
            self._claims[row["id"]] = (row["state_id"], subscriber)
        return subscriber

    def _forget_stale_claims(self, tx):
        """Claims on runs that have left the state they were delivered in are not needed any more."""
        with self._wake:
            held = dict(self._claims)
        ids = list(held)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = tx.query(f"SELECT id, state_id FROM task_run WHERE id IN ({', '.join('?' * len(chunk))})", chunk)
            current = {row["id"]: row["state_id"] for row in rows}
            with self._wake:
                for run_id in chunk:
                    claim = self._claims.get(run_id)
                    if claim is not None and claim[1].awaiting != run_id and current.get(run_id) != claim[0]:
                        del self._claims[run_id]


WEBSOCKET_ENDPOINTS = {
    "/api/events/in": EventsIn,
    "/api/events/out": EventsOut,
    "/api/logs/out": LogsOut,
    "/api/task_runs/subscriptions/scheduled": TaskRunSubscriber,
}


# --- 24. Server ---
# Owns the process side: the App (settings + database + services), the HTTP/1.1 keep-alive server
# with a bounded pool of worker threads, access control, static UI files, serve() for embedding, and
# what the processes of `start --processes N` share (_ProcessGroup).

_WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
_AUTH_EXEMPT = ("/api/health", "/api/ready")


class _Turnstile:
    """One thread at a time, in the order they came. (A plain Lock lets a newcomer barge past threads
    asleep on it, and the unlucky ones wait through many turns: a long latency tail.)"""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: collections.deque = collections.deque()
        self._busy = False

    def __enter__(self):
        with self._lock:
            if not self._busy:
                self._busy = True
                return self
            turn = threading.Lock()
            turn.acquire()
            self._waiting.append(turn)
        turn.acquire()  # released by the thread before us: the turn passes straight to us
        return self

    def __exit__(self, *exc):
        with self._lock:
            if self._waiting:
                self._waiting.popleft().release()
            else:
                self._busy = False


class App:
    """Everything one running server needs: settings, database, routes, background services."""

    def __init__(self, settings: Settings, db: Database, services: bool = True, clock=utcnow):
        self.settings = settings
        self.db = db
        # What time it is for the services' passes and the statuses derived from time (a deployment's
        # readiness): a callable returning an aware datetime, the real UTC clock unless a test hands another.
        self.clock = clock
        self.process_group = None  # set in each process of `start --processes N` (_ProcessGroup.join)
        self.routes = [(m, _compile_route(p), h, p) for m, p, h in ROUTES + META_ROUTES]
        self.route_index = route_index(self.routes)
        self.stopping = threading.Event()
        self.metrics = Metrics()
        self.read_cache = ReadCache(settings["PREFECT_SERVER_READ_CACHE_SECONDS"])
        self.events = SubscriberHub()
        self.logs = SubscriberHub()
        self.write_turnstile = _Turnstile()  # SQLite writers take turns in it (see ConnectionLoop._serve_request)
        self.event_intake = EventIntake(db, self.write_guard)
        self.task_dispatcher = TaskRunDispatcher(db)
        db.hooks.state_listeners.append(self.task_dispatcher.on_state)
        self.services = build_services(self) if services else []
        self.running_url: str | None = None
        try:
            self.static_dir = resource_dir("static")
        except ConfigurationError:
            self.static_dir = None

    @functools.cached_property
    def openapi(self) -> dict:
        """The OpenAPI document, made when first asked for: making it is most of an App's construction
        (~6-30 ms, more on a busy machine), and most servers (each test's) never serve it."""
        return openapi_document(self.routes)

    def write_guard(self):
        """What a write holds while it writes: on SQLite (one writer at a time anyway) the turnstile."""
        return self.write_turnstile if self.db.one_writer else contextlib.nullcontext()

    def public_url(self) -> str:
        return public_ui_url(self.settings, self.running_url)

    def wake(self, name: str):
        for service in self.services:
            if service.name == name:
                service.wake()
                return
        if self.process_group is not None:  # the server's first process runs the services
            self.process_group.wake_services(name)

    def start_services(self):
        hooks = self.db.hooks
        hooks.event_sinks.append(self.events.publish)
        if self.settings["PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED"]:
            hooks.log_sinks.append(self.logs.publish)
        for service in self.services:
            service.start()
            if isinstance(service, NotificationSender):
                hooks.notification_wakers.append(service.wake)
            if isinstance(service, AutomationActor):
                hooks.automation_wakers.append(service.wake)

    def stop_services(self):
        hooks = self.db.hooks
        with contextlib.suppress(ValueError):
            hooks.event_sinks.remove(self.events.publish)
        with contextlib.suppress(ValueError):
            hooks.log_sinks.remove(self.logs.publish)
        for service in self.services:
            with contextlib.suppress(ValueError):
                hooks.notification_wakers.remove(service.wake)
            with contextlib.suppress(ValueError):
                hooks.automation_wakers.remove(service.wake)
            service.stop()

    def close(self):
        self.stopping.set()
        self.stop_services()
        self.event_intake.close()
        self.task_dispatcher.close()
        with contextlib.suppress(ValueError):
            self.db.hooks.state_listeners.remove(self.task_dispatcher.on_state)
        self.db.close()


def create_app(settings: Settings, services: bool = True, clock=utcnow) -> App:
    """Open the database, migrate (or refuse when behind and migrations on start are off). `clock`: the
    App's (see App.clock)."""
    db = open_database(settings["PREFECT_API_DATABASE_CONNECTION_URL"], settings)
    try:
        if settings["PREFECT_API_DATABASE_MIGRATE_ON_START"]:
            migrate(db)
        elif not schema_is_current(db):
            raise ConfigurationError(
                f"the database schema is at {current_revision(db) or 'nothing'}, behind {list_revisions()[-1].id}; "
                "run `prefectlite database upgrade -y` (PREFECT_API_DATABASE_MIGRATE_ON_START is false)"
            )
        with db.write() as tx:
            install_builtin_block_types(tx)
    except BaseException:
        db.close()
        raise
    return App(settings, db, services, clock)


def check_basic_auth(settings: Settings, header: str | None) -> bool:
    expected = settings["PREFECT_SERVER_API_AUTH_STRING"]
    if not expected:
        return True
    scheme, _, credentials = (header or "").strip().partition(" ")
    if scheme.lower() != "basic":  # RFC 9110, 11.1: the scheme is case-insensitive
        return False
    try:
        given = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return False
    return secrets.compare_digest(given.encode(), expected.encode())


def check_csrf(app: App, req: Request):
    if not app.settings["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] or req.method not in _WRITE_METHODS:
        return
    token, client = req.headers.get("Prefect-Csrf-Token"), req.headers.get("Prefect-Csrf-Client")
    if not token or not client:
        raise HTTPError(403, "Missing CSRF token.")
    with app.db.read() as tx:
        row = tx.query_one("SELECT expiration FROM csrf_token WHERE token = ? AND client = ?", (token, client))
    if row is None or row["expiration"] < now_iso():
        raise HTTPError(403, "Invalid CSRF token or client identifier.")


def cors_headers(settings: Settings, origin: str | None) -> dict:
    if not origin:
        return {}
    allowed = [o.strip() for o in settings["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"].split(",") if o.strip()]
    if "*" not in allowed and origin not in allowed:
        return {}
    return {
        "Access-Control-Allow-Origin": "*" if "*" in allowed else origin,
        "Access-Control-Allow-Methods": settings["PREFECT_SERVER_CORS_ALLOWED_METHODS"].replace(
            "*", "GET, POST, PUT, PATCH, DELETE, OPTIONS"
        ),
        "Access-Control-Allow-Headers": settings["PREFECT_SERVER_CORS_ALLOWED_HEADERS"],
        "Vary": "Origin",
    }


def handle_api_request(app: App, req: Request) -> tuple[int, object, dict]:
    started = time.perf_counter()
    route = "unmatched"
    try:
        handler, req.params, route = match_route(app.route_index, req.method, req.path)
        check_csrf(app, req)
        validate_body(handler, req)
        status, payload, *more = handler(app, req)  # (status, payload) or (status, payload, headers)
        headers = more[0] if more else {}
    except Exception as exc:  # noqa: BLE001 - the one place exceptions become HTTP errors
        status, payload, headers = error_reply(exc, req)
    app.metrics.observe(req.method, route, status, time.perf_counter() - started)
    return status, payload, headers


def ui_settings(app: App) -> dict:
    api_url = app.settings["PREFECT_UI_API_URL"] or "/api"
    return {
        "api_url": api_url,
        "serve_base": app.settings["PREFECT_UI_SERVE_BASE"],
        "csrf_enabled": app.settings["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"],
        "auth": "BASIC" if app.settings["PREFECT_SERVER_API_AUTH_STRING"] else None,
        "flags": [],
        "server": {
            "name": "prefectlite",
            "version": __version__,
            "api_version": API_VERSION,
            "database": {"dialect": app.db.dialect, "version": _safe_db_version(app.db)},
        },
    }


def _safe_db_version(db: Database) -> str | None:
    try:
        return db.server_version()
    except DatabaseError:
        return None


_PLACEHOLDER_PAGE = (
    b"<!doctype html><html><head><meta charset='utf-8'><title>prefectlite</title></head>"
    b"<body><h1>prefectlite</h1><p>The API is at <a href='api/docs'>api/</a>.</p></body></html>"
)
_CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}


def static_file(app: App, path: str) -> tuple[int, RawBody | None, dict]:
    """A file of the UI, or index.html for any other path (the UI routes on the client)."""
    base = app.settings["PREFECT_UI_SERVE_BASE"].rstrip("/")
    if base and path.startswith(base):
        path = path[len(base) :] or "/"
    if path.rstrip("/") == "/ui-settings":
        return 200, RawBody(dumps(ui_settings(app)).encode(), "application/json"), {"Cache-Control": "no-cache"}
    root = app.static_dir
    if root is None or not (root / "index.html").is_file():
        return 200, RawBody(_PLACEHOLDER_PAGE, "text/html; charset=utf-8"), {"Cache-Control": "no-cache"}
    relative = urllib.parse.unquote(path).lstrip("/")
    if "\x00" in relative:
        return 404, None, {}
    try:
        target = (root / relative).resolve() if relative else root / "index.html"
        is_file = target.is_relative_to(root.resolve()) and target.is_file()
    except (OSError, ValueError):  # e.g. a segment longer than file names may be (255 bytes): no file
        target, is_file = root, False
    if not target.is_relative_to(root.resolve()):
        return 404, None, {}
    if not is_file:
        if _names_an_asset(root, relative):  # a missing asset is a 404, not the index page
            return 404, None, {}
        return _index_page(root, relative)
    data = target.read_bytes()
    ctype = _CONTENT_TYPES.get(target.suffix, mimetypes.guess_type(target.name)[0] or "application/octet-stream")
    stat = target.stat()
    etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
    return 200, RawBody(data, ctype), {"Cache-Control": "no-cache", "ETag": etag}


def _names_an_asset(root: Path, relative: str) -> bool:
    """A path the UI's pages never use: a file name at the top (favicon.ico) or anything in an asset folder
    (js/, css/). Deeper page paths may end in a name with a dot (/work-pools/work-pool/pool.v2)."""
    first, _, rest = relative.partition("/")
    if not rest:
        return "." in first
    try:
        return (root / first).is_dir()
    except (OSError, ValueError):
        return False


_INDEX_BASE = b'<base href="./">'


def _index_page(root: Path, relative: str) -> tuple[int, RawBody, dict]:
    """index.html for a page path (the UI routes on the client), its <base> pointing back at the UI's root
    by a relative path, so that its assets load from any depth, also behind a proxy that adds a prefix."""
    index = root / "index.html"
    depth = relative.count("/")
    data = index.read_bytes().replace(_INDEX_BASE, f'<base href="{"../" * depth or "./"}">'.encode(), 1)
    stat = index.stat()
    etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}-{depth}"'
    return 200, RawBody(data, "text/html; charset=utf-8"), {"Cache-Control": "no-cache", "ETag": etag}


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "::ffff:127.0.0.1")


class RequestHeaders:
    """A request's header fields, with the lookups of email.message.Message that we use (get, get_all,
    [], in; case-insensitive, the first of repeated fields wins), parsed without the email package."""

    def __init__(self, fields: list[tuple[str, str]]):
        self._fields = fields
        self._first: dict[str, str] = {}
        for name, value in fields:
            self._first.setdefault(name.lower(), value)

    def get(self, name: str, default=None):
        return self._first.get(name.lower(), default)

    def get_all(self, name: str, default=None):
        name = name.lower()
        found = [value for key, value in self._fields if key.lower() == name]
        return found or default

    def __getitem__(self, name: str):
        return self._first.get(name.lower())

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name.lower() in self._first

    def items(self) -> list[tuple[str, str]]:
        return list(self._fields)


_REQUEST_ID_FORM = re.compile(r"[\w.-]{1,64}")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,18})[ \t]*(?:\r\n|$)")


def _writes(method: str, handler) -> bool:
    """Does the route change things? Methods that may, except the POST routes that only read (filters,
    counts, pages, histories). Used for scheduling only: a wrong guess costs speed, never correctness."""
    name = handler.__name__
    reads = name.startswith(("read_", "count_", "paginate_")) or name.endswith("_history")
    return method in _WRITE_METHODS and not reads


_DATE_HEADER = (0, "")  # (second, its HTTP date): one formatting per second, not per response


def _http_date() -> str:
    global _DATE_HEADER
    second = int(time.time())
    if _DATE_HEADER[0] != second:
        _DATE_HEADER = (second, email.utils.formatdate(second, usegmt=True))
    return _DATE_HEADER[1]


def _split_target(target: str) -> tuple[str, str]:
    """The path and query of a request target; urlsplit only for what is not a plain /path?query."""
    if target.startswith("/") and "#" not in target:
        path, _, query = target.partition("?")
        return path, query
    split = urllib.parse.urlsplit(target)
    return split.path, split.query


class HttpRequest:
    """One request as the connection loop parsed it (section 25); `body` is filled once it has arrived."""

    __slots__ = ("method", "target", "path", "query", "version", "headers", "body", "keep_alive", "peer")

    def __init__(self, method: str, target: str, version: tuple[int, int], headers: RequestHeaders, peer: str):
        self.method = method
        # "//host/x" would read as a URL without a scheme to some clients: one leading slash only
        self.target = "/" + target.lstrip("/") if target.startswith("//") else target
        self.path, self.query = _split_target(self.target)
        self.version = version
        self.headers = headers
        self.body = b""
        self.peer = peer
        tokens = {token.strip() for token in headers.get("Connection", "").lower().split(",")}
        self.keep_alive = "keep-alive" in tokens if version < (1, 1) else "close" not in tokens


def is_write_request(app: App, method: str, path: str) -> bool:
    """An API call that will write: it is answered in the write turnstile on SQLite."""
    if method not in _WRITE_METHODS or not path.startswith("/api/"):
        return False
    try:
        handler = match_route(app.route_index, method, path[4:])[0]
    except HTTPError:
        return False
    return _writes(method, handler)


def auth_refusal(app: App, req: HttpRequest, has_body: bool, quiet: bool = False) -> bytes | None:
    """The 401 for a request that lacks the server's basic auth, decided from its head alone (its body
    is never read). Preflights, health and readiness pass when they carry no body (and WebSocket upgrades,
    which authenticate in band, never get here). `quiet`: only say whether it would be refused."""
    exempt = (req.method == "OPTIONS" or req.path in _AUTH_EXEMPT) and not has_body  # none needs a body
    if exempt or check_basic_auth(app.settings, req.headers.get("Authorization")):
        return None
    if quiet:
        return b"401"
    req.keep_alive = False
    request_id = request_id_of(req)
    headers = {
        **cors_headers(app.settings, req.headers.get("Origin")),
        "X-Request-ID": request_id,
        "WWW-Authenticate": 'Basic realm="prefectlite"',
    }
    token = REQUEST_ID.set(request_id)
    try:
        log.info("%s %s 401 (no valid credentials)", req.method, req.path)
    finally:
        REQUEST_ID.reset(token)
    return render_response(req, 401, {"detail": "Unauthorized"}, headers)


def request_id_of(req: HttpRequest) -> str:
    """The client's X-Request-ID when it is a sane one, else a new one."""
    given = req.headers.get("X-Request-ID") or ""
    return given if _REQUEST_ID_FORM.fullmatch(given) else _random_bytes(8).hex()


def answer_request(app: App, req: HttpRequest) -> bytes:
    """Answer one whole request: the response's bytes. Every response carries a request id and gets one
    access-log line."""
    started = time.perf_counter()
    request_id = request_id_of(req)
    REQUEST_ID.set(request_id)
    try:
        extra = {**cors_headers(app.settings, req.headers.get("Origin")), "X-Request-ID": request_id}
        status, payload, headers = _respond(app, req)
        if app.stopping.is_set():
            req.keep_alive = False
        data = render_response(req, status, payload, {**extra, **headers})
        log.info("%s %s %d %.1fms", req.method, req.path, status, (time.perf_counter() - started) * 1000)
        if log.isEnabledFor(logging.DEBUG):
            log.debug('%s "%s %s HTTP/%d.%d" %d %d', req.peer, req.method, req.target, *req.version, status, len(data))
        return data
    finally:
        REQUEST_ID.set(None)


def _respond(app: App, req: HttpRequest) -> tuple[int, object, dict]:
    if req.method == "OPTIONS":
        return 204, NO_CONTENT, {}
    path = req.path
    if path == "/api" or path.startswith("/api/"):
        params = urllib.parse.parse_qs(req.query, keep_blank_values=True) if req.query else {}
        api_req = Request(
            app, "GET" if req.method == "HEAD" else req.method, path[4:] or "/", params, req.headers, req.body
        )
        return handle_api_request(app, api_req)
    if req.method not in ("GET", "HEAD"):
        return 405, {"detail": "Method Not Allowed"}, {}
    status, payload, headers = static_file(app, path)
    if payload is None:
        return status, {"detail": "Not Found"}, headers
    if headers.get("ETag") and req.headers.get("If-None-Match") == headers["ETag"]:
        return 304, NO_CONTENT, headers
    return status, payload, headers


SERVER_HEADER = f"prefectlite/{__version__}"
_REASON_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}


def render_response(req: HttpRequest | None, status: int, payload, headers: dict) -> bytes:
    """Status line, headers and body in one piece (one send, no Nagle stall between them). Without a
    request (its head was unreadable) the answer is HTTP/1.1 and closes the connection."""
    if payload is NO_CONTENT or status in (204, 304):
        data, ctype = b"", None
    elif isinstance(payload, RawBody):
        data, ctype = payload.data, payload.content_type
    else:
        data, ctype = dumps(payload).encode("utf-8", "replace"), "application/json"
    if (
        req is not None
        and data
        and len(data) > 4096
        and "gzip" in (req.headers.get("Accept-Encoding") or "")
        and not _is_loopback(req.peer)
    ):  # over loopback compression only costs CPU
        data = gzip.compress(data, compresslevel=1)
        headers = {**headers, "Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
    head = [
        f"HTTP/1.1 {status} {_REASON_PHRASES.get(status, '')}\r\nServer: {SERVER_HEADER}\r\nDate: {_http_date()}\r\n"
    ]
    if ctype:
        head.append(f"Content-Type: {ctype}\r\n")
    if status != 304:
        head.append(f"Content-Length: {len(data)}\r\n")
    for key, value in headers.items():
        head.append(f"{key}: {value}\r\n")
    if req is None or not req.keep_alive:
        head.append("Connection: close\r\n")
    head.append("\r\n")
    if req is not None and req.method == "HEAD" or not data:
        return "".join(head).encode("latin-1", "replace")
    return "".join(head).encode("latin-1", "replace") + data


def websocket_refusal(app: App, req: HttpRequest) -> tuple[int, str, dict] | None:
    """Why an upgrade to a WebSocket is refused (status, detail, headers), or None to accept it."""
    problem = websocket_handshake_problem(req.method, req.headers)
    if problem is not None:
        status, detail = problem
        return status, detail, ({"Sec-WebSocket-Version": "13"} if status == 426 else {})
    if not websocket_origin_allowed(app.settings, req.headers):
        return 403, "WebSocket from an origin this server does not allow", {}
    refusal = websocket_subprotocol_problem(app.settings, req.headers)[1]
    if refusal:
        return 403, refusal, {}
    return None


def websocket_acceptance(req: HttpRequest, subprotocol: str | None, request_id: str) -> bytes:
    """The 101 that opens a WebSocket."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        f"Server: {SERVER_HEADER}",
        f"Date: {_http_date()}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {websocket_accept_key(req.headers['Sec-WebSocket-Key'].strip())}",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    lines.append(f"X-Request-ID: {request_id}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --- 25. Connections ---
# Owns every socket of a running server: one thread runs an event loop that accepts connections, reads
# and parses HTTP/1.1 requests (strictly, RFC 9112), enforces one deadline per request, refuses a
# request that lacks auth before its body is read, and frames WebSocket messages; complete requests and
# whole messages go to a bounded pool of worker threads, which do the database work and send the
# answer. Idle keep-alive connections, slow senders and open WebSockets wait in the loop, holding no
# thread, so thousands of them cost memory only.
#
# Why `select.epoll` and not asyncio: a connection's work runs on a worker thread, which re-arms the
# connection itself when it is done (a one-shot registration, re-armed with one epoll_ctl), so the
# loop is not woken once more per request; asyncio would need call_soon_threadsafe for that, a wake-up
# and a Future per request. Both designs stripped to that difference (tests/benchmarks/bench_loop_choice.py,
# 8 clients): 25,000-29,000 against 12,000-13,000 round trips a second, 41-47 against 80-85 us of CPU each,
# 0.4 against 1.9 KB per idle connection. Elsewhere than Linux the same loop runs on `selectors`, which
# has no one-shot mode: workers hand re-arming to the loop.

_IDLE, _HEAD, _BODY, _BUSY, _WEBSOCKET, _CLOSING = range(6)  # what a connection is doing
_REQUEST_LINE_MAX = 65_536  # bytes: 414 beyond
_HEADER_SECTION_MAX = 65_536  # bytes of header lines after the request line: 431 beyond
_MAX_HEADERS = 100
_CHUNK_LINE_MAX = 4_096
_RECV_BYTES = 65_536
_LINGER_SECONDS = 2.0  # after a closing answer, how long a client may go on sending before we hang up
_LINGER_BYTES = 1 << 20  # ... and how much of it we read and drop (so it gets our answer, not a reset)
_WS_OUTBOX_MAX = 16 << 20  # bytes queued for a WebSocket client that does not read: closed beyond
_SWEEP_SECONDS = 0.25  # how often deadlines are checked
_NEXT_REQUEST_WAIT_MS = 2  # how long a worker waits for a client's next request before handing it back
_WS_FRAMES_PER_TURN = 256  # WebSocket frames parsed for one connection before the others get their turn
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CONTENT_LENGTH_FORM = re.compile(r"[0-9]{1,18}")
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_HTTP_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")
_SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_LEADING_EMPTY_LINES_MAX = 4  # bytes of CR/LF taken before a request line (RFC 9112, 2.2: at least one CRLF)
_READ_PAUSE_BYTES = 1 << 20  # a connection with this much waiting to be sent is not read until it drains


class BadRequest(Exception):
    """A request the loop will not hand on: answered with `status` and closed."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _take_line(buffer: bytearray, limit: int, what: str) -> bytes | None:
    """The first line of `buffer` (LF or CRLF ended), taken off it; None until it has all arrived."""
    end = buffer.find(b"\n", 0, limit + 2)
    if end < 0:
        if len(buffer) > limit + 1:
            raise BadRequest(400, f"{what} too long")
        return None
    line = bytes(buffer[:end])
    del buffer[: end + 1]
    if line.endswith(b"\r"):
        line = line[:-1]
    if b"\r" in line:
        raise BadRequest(400, f"Bare CR in {what.lower()}")
    return line


def _head_end(buffer: bytearray) -> int:
    """Where the request head ends (just past its empty line), or -1 while it has not all arrived."""
    crlf = buffer.find(b"\r\n\r\n")
    if crlf >= 0 and buffer.find(b"\n\n", 0, crlf) < 0 and buffer.find(b"\n\r\n", 0, crlf) < 0:
        return crlf + 4  # the usual case: CRLF throughout
    ends = [i + n for i, n in ((buffer.find(b"\n\n"), 2), (buffer.find(b"\n\r\n"), 3)) if i >= 0]
    return min(ends) if ends else -1


def _head_too_big(buffer: bytearray) -> BadRequest | None:
    """An unfinished head past the limits: the request line, one header line, or all of them."""
    line_end = buffer.find(b"\n")
    if line_end < 0 and len(buffer) > _REQUEST_LINE_MAX:
        return BadRequest(414, "Request-URI Too Long")
    if len(buffer) - max(line_end, 0) > _HEADER_SECTION_MAX:
        longest = max((len(line) for line in bytes(buffer[line_end + 1 :]).split(b"\n")), default=0)
        return BadRequest(431, "Line too long" if longest > 65_536 else "Header section too large")
    return None


def parse_request_head(head: bytes, peer: str) -> HttpRequest:
    """The request line and header fields of one request (its head, up to the empty line)."""
    if b"\r" in head and head.count(b"\r") != head.count(b"\r\n"):
        raise BadRequest(400, "Bare CR in the request head")
    lines = head.decode("iso-8859-1").replace("\r\n", "\n").split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    request_line = lines[0] if lines else ""
    if len(request_line) > _REQUEST_LINE_MAX:
        raise BadRequest(414, "Request-URI Too Long")
    words = request_line.split(" ")
    if len(words) != 3 or not all(words):  # RFC 9112, 3: single spaces; other whitespace would be read two ways
        raise BadRequest(400, f"Bad request syntax ({request_line[:100]!r})")
    method, target, version_text = words
    found = _HTTP_VERSION.fullmatch(version_text)
    if not found:
        raise BadRequest(400, f"Bad request version ({version_text[:20]!r})")
    version = (int(found.group(1)), int(found.group(2)))
    if version >= (2, 0):
        raise BadRequest(505, f"Invalid HTTP version ({version_text[5:][:20]})")
    if method not in _SUPPORTED_METHODS:
        raise BadRequest(501, f"Unsupported method ({method[:20]!r})")
    try:
        _split_target(target)
    except ValueError:
        raise BadRequest(400, "Malformed request target") from None
    if sum(len(line) + 1 for line in lines[1:]) > _HEADER_SECTION_MAX:
        too_long = any(len(line) > 65_536 for line in lines[1:])
        raise BadRequest(431, "Line too long" if too_long else "Header section too large")
    headers = RequestHeaders(_header_fields(lines[1:]))
    hosts = headers.get_all("Host", [])
    if len(hosts) > 1 or (version >= (1, 1) and not hosts):  # RFC 9112, 3.2
        raise BadRequest(400, "An HTTP/1.1 request needs exactly one Host header")
    expectation = headers.get("Expect", "").strip().lower()
    if expectation and expectation != "100-continue":
        raise BadRequest(417, f"Unsupported expectation ({expectation[:40]!r})")
    return HttpRequest(method, target, version, headers, peer)


def _header_fields(lines: list[str]) -> list[tuple[str, str]]:
    if len(lines) > _MAX_HEADERS:
        raise BadRequest(431, "Too many headers")
    fields = []
    for line in lines:
        if len(line) > 65_536:
            raise BadRequest(431, "Line too long")
        if line[:1] in (" ", "\t"):  # RFC 9112, 5.2: a server must refuse obsolete line folding or unfold it
            raise BadRequest(400, "Obsolete line folding (a header continued on the next line) is not accepted")
        name, colon, value = line.partition(":")
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise BadRequest(400, "Malformed header line")
        value = value.strip(" \t")
        if _CONTROL_CHARACTER.search(value):  # RFC 9110, 5.5: no control characters but HTAB
            raise BadRequest(400, "Invalid character in a header value")
        fields.append((name, value))
    return fields


def body_framing(req: HttpRequest, limit: int) -> int | None:
    """How the body is delimited: its length, or None when chunked. RFC 9112, 6: what could be read two
    ways (both framings, a coding other than chunked alone, differing lengths) is refused, never guessed."""
    codings = req.headers.get_all("Transfer-Encoding")
    lengths = req.headers.get_all("Content-Length")
    if codings:
        if lengths:
            raise BadRequest(400, "Content-Length and Transfer-Encoding together")
        if len(codings) != 1 or codings[0].strip().lower() != "chunked":
            raise BadRequest(400, "Unsupported Transfer-Encoding (only chunked alone is accepted)")
        if req.version < (1, 1):
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
        return None
    if not lengths:
        return 0
    values = {value.strip() for value in lengths}
    if len(values) > 1:
        raise BadRequest(400, "Conflicting Content-Length headers")
    value = values.pop()
    if not _CONTENT_LENGTH_FORM.fullmatch(value):
        raise BadRequest(400, "Invalid Content-Length")
    if int(value) > limit:
        raise BadRequest(413, f"Request body larger than {limit} bytes")
    return int(value)


class ChunkedBody:
    """A chunked body, decoded as its bytes arrive (RFC 9112, 7.1); trailer fields are read and dropped."""

    __slots__ = ("limit", "body", "size", "remaining", "phase", "trailer_bytes")

    def __init__(self, limit: int):
        self.limit = limit
        self.body = bytearray()  # one buffer: a list of two-byte chunks cost 20 times the body in memory
        self.size = 0
        self.remaining = 0
        self.phase = "size"
        self.trailer_bytes = 0

    def feed(self, buffer: bytearray) -> bytes | None:
        """Take what it can off `buffer`; the whole body once its last chunk and trailer are in."""
        while True:
            if self.phase == "data":
                take = min(self.remaining, len(buffer))
                if take == 0:
                    return None
                self.body += buffer[:take]
                del buffer[:take]
                self.remaining -= take
                if self.remaining:
                    return None
                self.phase = "data-end"
                continue
            line = _take_line(buffer, _CHUNK_LINE_MAX if self.phase != "trailer" else 65_536, "Chunk line")
            if line is None:
                return None
            if self.phase == "size":
                self._start_chunk(line)
            elif self.phase == "data-end":
                if line:
                    raise BadRequest(400, "Chunk data longer than its size")
                self.phase = "size"
            elif not line:  # the empty line after the trailer
                return bytes(self.body)
            else:
                self.trailer_bytes += len(line)
                if self.trailer_bytes > _HEADER_SECTION_MAX:
                    raise BadRequest(431, "Trailer section too large")

    def _start_chunk(self, line: bytes):
        found = _CHUNK_SIZE_LINE.fullmatch(line)
        if not found:
            raise BadRequest(400, "Malformed chunk size")
        size = int(found.group(1), 16)
        if size == 0:
            self.phase = "trailer"
            return
        self.size += size
        if self.size > self.limit:
            raise BadRequest(413, f"Request body larger than {self.limit} bytes")
        self.remaining, self.phase = size, "data"


class Connection:
    """One client socket and what the loop knows of it. The loop reads it and alone closes it; a worker
    sends on it and re-arms it (under `lock`, which also guards `outbox` and `state`), and while it has
    the connection (_BUSY, when the loop never reads it) may read the client's next request itself."""

    __slots__ = (
        "sock",
        "peer",
        "inbox",
        "outbox",
        "lock",
        "state",
        "deadline",
        "request",
        "expected",
        "chunked",
        "websocket",
        "assembler",
        "last_read",
        "stalled_since",
        "closed",
        "lingered",
        "close_when_sent",
        "partial_since",
        "backlogged",
    )

    def __init__(self, sock: socket.socket, peer: str, now: float, idle_seconds: float):
        self.sock = sock
        self.peer = peer
        self.inbox = bytearray()  # received, not yet parsed
        self.outbox = bytearray()  # to send, what the socket did not take at once
        self.lock = threading.Lock()
        self.state = _IDLE
        self.deadline = now + idle_seconds  # of the state it is in (none while _BUSY)
        self.request: HttpRequest | None = None
        self.expected = 0  # body bytes, for a Content-Length body
        self.chunked: ChunkedBody | None = None
        self.websocket: ServerWebSocket | None = None
        self.assembler: MessageAssembler | None = None
        self.last_read = now
        self.stalled_since: float | None = None  # since when the outbox has not moved
        self.closed = False
        self.lingered = 0  # bytes read and dropped while closing
        self.close_when_sent = False
        self.partial_since: float | None = None  # since when a WebSocket message has been arriving
        self.backlogged = False  # frames wait in the inbox for the loop's next turn: do not read more


class _OneShotPoller:
    """epoll with one-shot registrations: a connection fires once, then stays quiet until re-armed. A
    worker re-arms the connection it finished with by itself (epoll_ctl is safe from any thread)."""

    threadsafe_arm = True

    def __init__(self):
        self._epoll = select.epoll()
        self._targets: dict[int, object] = {}

    def add_listener(self, sock, target):
        """Level-triggered, as every process sharing the port must hear of a connection: EPOLLEXCLUSIVE
        woke one, and the same one, so that another process of `start --processes 2` got none of 100."""
        self._targets[sock.fileno()] = target
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    def remove_listener(self, sock):
        with contextlib.suppress(OSError, ValueError, KeyError):
            self._epoll.unregister(sock.fileno())
            del self._targets[sock.fileno()]

    def add(self, conn: Connection):
        self._targets[conn.sock.fileno()] = conn
        self._epoll.register(conn.sock.fileno(), select.EPOLLIN | select.EPOLLONESHOT)

    def arm(self, conn: Connection, read: bool, write: bool):
        events = (select.EPOLLIN if read else 0) | (select.EPOLLOUT if write else 0)
        if events:
            with contextlib.suppress(OSError):  # closed under us: nothing to arm
                self._epoll.modify(conn.sock.fileno(), events | select.EPOLLONESHOT)

    def remove(self, conn: Connection, fd: int):
        self._targets.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)

    def poll(self, timeout: float) -> list[tuple[object, bool, bool]]:
        ready = []
        for fd, events in self._epoll.poll(timeout):
            target = self._targets.get(fd)
            if target is not None:
                broken = bool(events & (select.EPOLLERR | select.EPOLLHUP))
                ready.append((target, bool(events & select.EPOLLIN) or broken, bool(events & select.EPOLLOUT)))
        return ready

    def close(self):
        self._epoll.close()


class _SelectorPoller:
    """The same one-shot behaviour on `selectors` (no epoll: macOS, BSD): a connection is unregistered
    when it fires and registered again when armed. Only the loop thread may call arm()."""

    threadsafe_arm = False

    def __init__(self):
        import selectors  # only here: Linux uses epoll

        self._selectors = selectors
        self._selector = selectors.DefaultSelector()

    def add_listener(self, sock, target):
        self._selector.register(sock, self._selectors.EVENT_READ, target)

    def remove_listener(self, sock):
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)

    def add(self, conn: Connection):
        self.arm(conn, True, False)

    def arm(self, conn: Connection, read: bool, write: bool):
        events = (self._selectors.EVENT_READ if read else 0) | (self._selectors.EVENT_WRITE if write else 0)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(conn.sock)
        if events:
            with contextlib.suppress(ValueError, OSError):
                self._selector.register(conn.sock, events, conn)

    def remove(self, conn: Connection, fd: int):
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(fd)

    def poll(self, timeout: float) -> list[tuple[object, bool, bool]]:
        ready = []
        for key, events in self._selector.select(timeout):
            if isinstance(key.data, Connection):
                self.arm(key.data, False, False)
            ready.append(
                (key.data, bool(events & self._selectors.EVENT_READ), bool(events & self._selectors.EVENT_WRITE))
            )
        return ready

    def close(self):
        self._selector.close()


class WorkerPool:
    """A bounded pool of threads, started on demand, that run what the loop hands them in order."""

    def __init__(self, size: int, name: str):
        self.size = max(1, size)
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn, *args):
        with self._lock:
            if self._idle == 0 and len(self._threads) < self.size:
                thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            elif self._idle:
                self._idle -= 1
        self._queue.put((fn, args))

    def _work(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - what a task did not catch must not kill its worker
                log.exception("a worker task failed")
            with self._lock:
                self._idle += 1

    def stop(self, deadline: float):
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class ServerWebSocket:
    """A WebSocket connection as an endpoint sees it (section 23): sends and closes from any thread."""

    def __init__(self, loop: ConnectionLoop, conn: Connection, subprotocol: str | None, client_major: int = 2):
        self.loop = loop
        self.conn = conn
        self.subprotocol = subprotocol
        self.client_major = client_major  # whose shapes it reads (client_major of the handshake: 3.9 says so)
        self.peer = conn.peer
        self.endpoint = None
        self.authenticated = subprotocol != "prefect"

    def send_json(self, value):
        self.send_text(dumps(value))

    def send_text(self, text: str):
        if self.conn.state == _CLOSING or self.conn.closed:  # after our close frame, nothing more
            return
        if len(self.conn.outbox) > _WS_OUTBOX_MAX:
            self.close(WS_CLOSE_TRY_AGAIN_LATER, "client too slow to read; reconnect")
            return
        self.loop.send(self.conn, encode_frame(WS_TEXT, text.encode("utf-8")))

    def close(self, code: int = WS_CLOSE_NORMAL, reason: str = ""):
        self.loop.close_websocket(self.conn, code, reason)

    def run_soon(self, fn):
        self.loop.pool.submit(self.loop.run_websocket_task, self.conn, fn)

    def resume(self):
        """The endpoint is done with the messages it was given: read the connection's next frames."""
        self.loop.resume_websocket(self.conn)


class ConnectionLoop:
    """The event loop of one server process: see the section's opening."""

    def __init__(self, app: App, listening: socket.socket, use_epoll: bool | None = None):
        self.app = app
        self.listening = listening
        settings = app.settings
        self.request_seconds = settings["PREFECT_SERVER_REQUEST_TIMEOUT"]
        self.idle_seconds = settings["PREFECT_SERVER_KEEPALIVE_TIMEOUT"]
        self.body_limit = settings["PREFECT_SERVER_MAX_BODY_BYTES"]
        self.pool = WorkerPool(settings["PREFECT_SERVER_WORKERS"], "prefectlite-worker")
        use_epoll = hasattr(select, "epoll") if use_epoll is None else use_epoll
        self.poller = _OneShotPoller() if use_epoll else _SelectorPoller()
        self.connections: dict[int, Connection] = {}  # by file descriptor; the loop thread's alone
        self._calls: collections.deque = collections.deque()  # (fn, args) for the loop thread to run
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self._accept_paused_until = 0.0
        self._stop_deadline: float | None = None
        self._loop_thread: threading.Thread | None = None
        self.server_address = listening.getsockname()
        self.poller.add_listener(listening, "listener")
        self.poller.add_listener(self._wake_r, "wake")

    # --- the loop thread ---

    def run(self):
        self._loop_thread = threading.current_thread()
        next_sweep = time.monotonic() + _SWEEP_SECONDS
        while True:
            for target, readable, writable in self.poller.poll(max(0.0, next_sweep - time.monotonic())):
                self._guarded(target, readable, writable)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + _SWEEP_SECONDS
                self._guarded("sweep", now, False)
            if self._stop_deadline is not None and (not self.connections or now > self._stop_deadline):
                break
        self._close_everything()

    def _guarded(self, target, readable, writable):
        """One step of the loop; a bug met in it costs that connection, never the loop (and every client)."""
        try:
            if target == "listener":
                self._accept()
            elif target == "wake":
                self._run_calls()
            elif target == "sweep":
                self._sweep(readable)
            else:
                self._on_ready(target, readable, writable)
        except Exception:  # noqa: BLE001 - logged; the loop must go on
            log.exception("the connection loop failed on %s", getattr(target, "peer", target))
            if isinstance(target, Connection):
                with contextlib.suppress(Exception):
                    self._close(target)

    def _accept(self):
        for _ in range(64):  # then let the connections we have take their turn
            try:
                sock, address = self.listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept more connections (%s); pausing 100 ms", exc.strerror)
                    self.poller.remove_listener(self.listening)
                    self._accept_paused_until = time.monotonic() + 0.1
                    return
                continue  # e.g. ECONNABORTED: that client gave up already
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(
                sock, str(address[0]) if isinstance(address, tuple) else "local", time.monotonic(), self.idle_seconds
            )
            self.connections[sock.fileno()] = conn
            self.poller.add(conn)

    def _run_calls(self):
        # Drain, then take the flag down, then run: a call queued after the drain either sees the flag up
        # (and is run below) or down (and wakes us again). The other order lost every wake-up for good.
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        self._woken = False
        while self._calls:
            fn, args = self._calls.popleft()
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - as in _guarded: one call's bug, not the loop's end
                log.exception("a call on the connection loop failed")

    def call_soon(self, fn, *args):
        """Have the loop thread run fn(*args) (from any thread)."""
        self._calls.append((fn, args))
        if not self._woken:
            self._woken = True
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    def _on_ready(self, conn: Connection, readable: bool, writable: bool):
        if conn.closed:
            return
        if writable:
            self._flush(conn)
            if conn.state == _IDLE and conn.inbox and not conn.outbox and not conn.closed:
                self.advance(conn)  # a pipelined request waited for the answer before it to leave
        if readable and not conn.closed:
            self._read(conn)
        if not conn.closed:
            self.arm(conn)

    def _read(self, conn: Connection):
        if conn.state == _BUSY:  # armed before a worker took it: the worker re-arms it when it is done
            return
        try:
            data = conn.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if conn.state == _IDLE and conn.inbox and not conn.outbox:
                self.advance(conn)  # requests it sent before it stopped sending are answered first
            elif conn.state in (_HEAD, _BODY):  # the client stopped sending half way: say so before closing
                self._refuse(conn, 400, "Incomplete request: the client stopped sending")
            else:
                self._close(conn)
            return
        conn.last_read = time.monotonic()
        if conn.state == _CLOSING:
            conn.lingered += len(data)
            if conn.lingered > _LINGER_BYTES:
                self._close(conn)
            return
        conn.inbox += data
        self.advance(conn)

    def advance(self, conn: Connection):
        """Parse what has arrived, as far as it goes; hand on what is complete."""
        try:
            if conn.state == _WEBSOCKET:
                self._advance_websocket(conn)
            elif conn.state in (_IDLE, _HEAD):
                self._advance_head(conn)
            elif conn.state == _BODY:
                self._advance_body(conn)
        except BadRequest as exc:
            self._refuse(conn, exc.status, exc.detail)

    def _advance_head(self, conn: Connection):
        if conn.state == _IDLE:
            empty = len(conn.inbox) - len(conn.inbox.lstrip(b"\r\n"))  # empty lines before a request (RFC 9112, 2.2)
            if empty > _LEADING_EMPTY_LINES_MAX:
                raise BadRequest(400, "Empty lines where a request line should be")
            del conn.inbox[:empty]
            if not conn.inbox:
                return
            conn.state, conn.deadline = _HEAD, time.monotonic() + self.request_seconds
        end = _head_end(conn.inbox)
        if end < 0:
            too_big = _head_too_big(conn.inbox)
            if too_big is not None:
                raise too_big
            return
        head = bytes(conn.inbox[:end])
        del conn.inbox[:end]
        req = conn.request = parse_request_head(head, conn.peer)
        framing = body_framing(req, self.body_limit)
        if req.path in WEBSOCKET_ENDPOINTS and is_websocket_upgrade(req.headers):
            if framing != 0:
                raise BadRequest(400, "A WebSocket upgrade has no body")
            self._upgrade(conn, req)
            return
        refusal = auth_refusal(self.app, req, has_body=framing != 0)
        if refusal is not None:
            self._answer_and_close(conn, refusal)
            return
        conn.state = _BODY
        conn.expected, conn.chunked = (0, ChunkedBody(self.body_limit)) if framing is None else (framing, None)
        if (
            req.headers.get("Expect", "").lower() == "100-continue"
            and req.version >= (1, 1)
            and (framing is None or len(conn.inbox) < framing)
        ):
            self.send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        self._advance_body(conn)

    def _advance_body(self, conn: Connection):
        req = conn.request
        if conn.chunked is not None:
            body = conn.chunked.feed(conn.inbox)
            if body is None:
                return
            req.body, conn.chunked = body, None
        elif len(conn.inbox) >= conn.expected:
            req.body = bytes(conn.inbox[: conn.expected])
            del conn.inbox[: conn.expected]
        else:
            return
        conn.state = _BUSY
        if req.path == "/api/health" and req.method in ("GET", "HEAD"):
            self._serve_request(conn, req)  # liveness needs no database: the loop answers it, never queued
        else:
            self.pool.submit(self._serve_request, conn, req)

    def _refuse(self, conn: Connection, status: int, detail: str):
        """A request we will not serve: a JSON error, and the connection closes."""
        self._answer_and_close(conn, render_response(None, status, {"detail": detail}, {}))

    def _answer_and_close(self, conn: Connection, data: bytes):
        conn.inbox.clear()
        with conn.lock:
            conn.state, conn.deadline = _CLOSING, time.monotonic() + _LINGER_SECONDS
            conn.close_when_sent = True
        self.send(conn, data)
        self._flush(conn)  # when it is all sent: half-close at once (a client reading to the end sees it)

    def _upgrade(self, conn: Connection, req: HttpRequest):
        refusal = websocket_refusal(self.app, req)
        if refusal is not None:
            status, detail, headers = refusal
            req.keep_alive = False
            self._answer_and_close(conn, render_response(req, status, {"detail": detail}, headers))
            return
        request_id = request_id_of(req)
        subprotocol = websocket_subprotocol_problem(self.app.settings, req.headers)[0]
        ws = ServerWebSocket(self, conn, subprotocol, client_major(req))
        ws.endpoint = WEBSOCKET_ENDPOINTS[req.path](self.app, ws)
        conn.websocket = ws
        conn.assembler = MessageAssembler(self.app.settings["PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES"])
        conn.state = _WEBSOCKET
        conn.deadline = time.monotonic() + (WEBSOCKET_AUTH_SECONDS if not ws.authenticated else WEBSOCKET_IDLE_SECONDS)
        self.send(conn, websocket_acceptance(req, subprotocol, request_id))
        log.info("WebSocket %s opened by %s", req.path, conn.peer)
        self._advance_websocket(conn)

    def _advance_websocket(self, conn: Connection):
        """Frames in the order sent: control frames answered here, data messages handed on in batches; a
        control frame after data waits until the data before it has been handled. At most
        _WS_FRAMES_PER_TURN frames a turn: a client sending floods of tiny frames waits its turn (and is
        not read meanwhile) rather than keep the loop from everyone else."""
        messages, replies = [], bytearray()  # replies: the turn's pongs, sent in one piece
        budget = _WS_FRAMES_PER_TURN
        while conn.state == _WEBSOCKET and budget:
            budget -= 1
            try:
                frame = parse_frame(conn.inbox, conn.assembler.room())
                if frame is None:
                    break
                fin, opcode, payload, used = frame
                if opcode in _WS_CONTROL_OPCODES and messages:
                    break
                del conn.inbox[:used]
                if opcode == WS_PING:
                    replies += encode_frame(WS_PONG, payload)
                    continue
                if opcode == WS_CLOSE:
                    code = parse_close_payload(payload)[0]
                    self._send_replies(conn, replies)
                    self.close_websocket(conn, WS_CLOSE_NORMAL if code == 1005 else code, "")
                    return
                if opcode == WS_PONG:
                    continue
                message = conn.assembler.add(fin, opcode, payload)
            except WebSocketProtocolError as exc:
                self._send_replies(conn, replies)
                self.close_websocket(conn, exc.code, exc.reason)
                return
            if message is not None:
                messages.append(message)
        self._send_replies(conn, replies)
        partial = conn.inbox or conn.assembler.parts  # a message, or a frame, begun and not finished
        conn.partial_since = (conn.partial_since or time.monotonic()) if partial else None
        if not budget and conn.inbox and conn.state == _WEBSOCKET:
            conn.backlogged = True  # not read until the loop has come back for the rest
            self.call_soon(self._continue_websocket, conn)
        if messages and conn.state == _WEBSOCKET:
            conn.state = _BUSY
            if conn.websocket.endpoint.runs_on_loop:
                self._serve_messages(conn, messages)
            else:
                self.pool.submit(self._serve_messages, conn, messages)

    def _send_replies(self, conn: Connection, replies: bytearray):
        if replies:
            self.send(conn, bytes(replies))

    def _continue_websocket(self, conn: Connection):
        conn.backlogged = False
        self.advance_and_arm(conn)

    def _flush(self, conn: Connection):
        """Send what waits in the outbox; a connection that is closing is shut once it is all sent."""
        with conn.lock:
            if conn.outbox:
                try:
                    sent = conn.sock.send(conn.outbox)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    conn.outbox.clear()
                    sent = -1
                if sent > 0:
                    del conn.outbox[:sent]
                    conn.stalled_since = time.monotonic() if conn.outbox else None
                    if not conn.outbox and conn.state == _IDLE:  # its keep-alive time starts now
                        conn.deadline = time.monotonic() + self.idle_seconds
                if sent < 0:
                    conn.close_when_sent = True
            done = conn.close_when_sent and not conn.outbox
        if done:
            self._shut(conn)

    def _shut(self, conn: Connection):
        """Our side is said: half-close, and linger a moment for the client to read it and hang up."""
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        conn.close_when_sent = False
        conn.state, conn.deadline = _CLOSING, min(conn.deadline, time.monotonic() + _LINGER_SECONDS)

    def _sweep(self, now: float):
        if self._accept_paused_until and now >= self._accept_paused_until and self._stop_deadline is None:
            self._accept_paused_until = 0.0
            self.poller.add_listener(self.listening, "listener")
        for conn in list(self.connections.values()):
            if conn.stalled_since is not None and now - conn.stalled_since > self.request_seconds:
                self._close(conn)  # it reads nothing of what we send
            elif conn.partial_since is not None and now - conn.partial_since > self.request_seconds:
                self.close_websocket(conn, WS_CLOSE_POLICY_VIOLATION, "message not sent whole in time")
                self.arm(conn)
            elif conn.state != _BUSY and not conn.outbox and now > conn.deadline:
                self._expire(conn, now)

    def _expire(self, conn: Connection, now: float):
        if conn.state == _HEAD or conn.state == _BODY:
            self._refuse(conn, 408, "Request timed out")
        elif conn.state == _WEBSOCKET:
            if not conn.websocket.authenticated:
                self.close_websocket(conn, WS_CLOSE_POLICY_VIOLATION, "Authentication timed out")
            elif now - conn.last_read > WEBSOCKET_IDLE_SECONDS:
                self.close_websocket(conn, WS_CLOSE_GOING_AWAY, "idle")
            else:
                conn.deadline = conn.last_read + WEBSOCKET_IDLE_SECONDS
        else:
            self._close(conn)
        if not conn.closed:
            self.arm(conn)

    def _close(self, conn: Connection):
        """Only on the loop thread: forget the connection and close its socket."""
        with conn.lock:
            if conn.closed:
                return
            conn.closed = True
            fd = conn.sock.fileno()
            self.poller.remove(conn, fd)
            self.connections.pop(fd, None)
            conn.sock.close()
        if conn.websocket is not None:
            log.info("WebSocket from %s closed", conn.peer)
            with contextlib.suppress(Exception):
                conn.websocket.endpoint.closed()

    def _close_everything(self):
        for conn in list(self.connections.values()):
            self._close(conn)
        self.poller.close()
        self._wake_r.close()
        self._wake_w.close()

    # --- any thread ---

    def arm(self, conn: Connection):
        """Wait for the connection to be writable while its outbox holds something, and readable unless a
        worker has it or (between requests) until its last answer has left: a client that sends requests
        but reads no answers gets no more of them answered (its answers would pile up in our memory)."""
        if not self.poller.threadsafe_arm and threading.current_thread() is not self._loop_thread:
            self.call_soon(self.arm, conn)
            return
        with conn.lock:
            if not conn.closed:
                read = (
                    conn.state != _BUSY
                    and not (conn.state == _IDLE and conn.outbox)
                    and len(conn.outbox) < _READ_PAUSE_BYTES
                    and not conn.backlogged
                )
                self.poller.arm(conn, read, bool(conn.outbox))

    def send(self, conn: Connection, data: bytes):
        """Send now what the socket takes; the rest waits in the outbox for the loop to send."""
        rearm = False
        with conn.lock:
            if conn.closed:
                return
            if not conn.outbox:
                try:
                    sent = conn.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:  # the peer is gone: the loop sees it on its next read
                    sent = len(data)
                data = data[sent:]
            if data:
                rearm = not conn.outbox
                conn.outbox += data
                conn.stalled_since = conn.stalled_since or time.monotonic()
        if rearm and threading.current_thread() is not self._loop_thread:
            self.arm(conn)

    def _serve_request(self, conn: Connection, req: HttpRequest):
        """On a worker: answer the request, and the ones the client sends right after it (see
        _next_request_here), then give the connection back to the loop."""
        try:
            while req is not None:
                self._answer(conn, req)
                req = self._next_request_here(conn, req)
        finally:
            self._request_done(conn, conn.request.keep_alive if conn.request else False)

    def _answer(self, conn: Connection, req: HttpRequest):
        """Answer one request and send it. On SQLite a write is answered in the write turnstile (see
        _Turnstile), and sent there too when the socket takes it at once (nearly always): a client slow to
        read holds up no other writer."""
        app = self.app
        conn.request = req
        with app.write_guard() if is_write_request(app, req.method, req.path) else contextlib.nullcontext():
            try:
                data = answer_request(app, req)
            except Exception:  # noqa: BLE001 - a bug of ours answers 500 rather than leave the client hanging
                log.exception("answering %s %s failed", req.method, req.path)
                req.keep_alive = False
                data = render_response(req, 500, {"detail": "Internal server error"}, {})
            self.send(conn, data)

    def _next_request_here(self, conn: Connection, req: HttpRequest) -> HttpRequest | None:
        """A busy client sends its next request as soon as it has read an answer: a worker that waits a
        moment for it (out of the turnstile, the GIL released) serves it at once, where handing the
        connection back would wake the loop, queue the request and wake a worker for it (measured: the
        write load's CPU per request at 8 clients, 645 -> N us). Only a plain request that arrives whole
        in that moment; anything else (a body still coming, chunks, an upgrade, bad input) is the loop's."""
        if (
            not req.keep_alive
            or conn.outbox
            or self._stop_deadline is not None
            or conn.closed
            or threading.current_thread() is self._loop_thread
        ):
            return None
        if not conn.inbox:
            poller = select.poll()
            poller.register(conn.sock, select.POLLIN)
            if not poller.poll(_NEXT_REQUEST_WAIT_MS):
                return None
            try:
                data = conn.sock.recv(_RECV_BYTES)
            except OSError:
                return None
            if not data:
                return None  # the end of the stream: the loop sees it again and closes
            conn.inbox += data
            conn.last_read = time.monotonic()
        return self._whole_plain_request(conn)

    def _whole_plain_request(self, conn: Connection) -> HttpRequest | None:
        """The request at the start of the inbox, taken off it, when it is whole, plain and allowed."""
        end = _head_end(conn.inbox)
        if end < 0 or conn.inbox[:1] in (b"\r", b"\n"):
            return None
        try:
            req = parse_request_head(bytes(conn.inbox[:end]), conn.peer)
            length = body_framing(req, self.body_limit)
        except BadRequest:
            return None  # the loop parses it again, and answers the error
        if (
            length is None
            or len(conn.inbox) < end + length
            or req.headers.get("Expect")
            or is_websocket_upgrade(req.headers)
            or auth_refusal(self.app, req, has_body=length != 0, quiet=True)
        ):
            return None
        req.body = bytes(conn.inbox[end : end + length])
        del conn.inbox[: end + length]
        return req

    def _request_done(self, conn: Connection, keep_alive: bool):
        with conn.lock:
            if conn.closed:
                return
            if not keep_alive or self._stop_deadline is not None:
                conn.state, conn.deadline = _CLOSING, time.monotonic() + self.request_seconds
                conn.close_when_sent = True
                pipelined = False
            else:
                conn.state, conn.deadline = _IDLE, time.monotonic() + self.idle_seconds
                pipelined = bool(conn.inbox) and not conn.outbox
                conn.request = None
        if conn.close_when_sent and not conn.outbox:
            self.call_soon(self._shut_if_open, conn)
        elif pipelined:  # the next request is here already: the loop parses it
            self.call_soon(self.advance_and_arm, conn)
        else:
            self.arm(conn)

    def _shut_if_open(self, conn: Connection):
        if not conn.closed:
            self._shut(conn)
            self.arm(conn)

    def advance_and_arm(self, conn: Connection):
        if not conn.closed:
            self.advance(conn)
            if not conn.closed:
                self.arm(conn)

    def _serve_messages(self, conn: Connection, messages: list):
        """A batch of a WebSocket's messages (on a worker, or here); then back to the loop for more frames."""
        done = []
        self.run_websocket_task(conn, lambda: done.append(conn.websocket.endpoint.receive(messages)))
        if done != [False]:  # done with them (or failed): the connection goes on; else resume() comes later
            self.resume_websocket(conn)

    def resume_websocket(self, conn: Connection):
        with conn.lock:
            if conn.closed or conn.state != _BUSY:
                return
            conn.state = _WEBSOCKET
            conn.websocket.authenticated = getattr(conn.websocket.endpoint, "authenticated", True)
            conn.deadline = conn.last_read + (
                WEBSOCKET_IDLE_SECONDS if conn.websocket.authenticated else WEBSOCKET_AUTH_SECONDS
            )
        if conn.inbox:
            self.call_soon(self.advance_and_arm, conn)
        else:
            self.arm(conn)

    def run_websocket_task(self, conn: Connection, fn):
        try:
            fn()
        except DatabaseUnavailable as exc:
            self.close_websocket(conn, WS_CLOSE_TRY_AGAIN_LATER, f"database unavailable: {exc}"[:120])
        except Exception:  # noqa: BLE001 - one broken endpoint call must not take the worker down
            log.exception("WebSocket task for %s failed", conn.peer)
            self.close_websocket(conn, WS_CLOSE_INTERNAL_ERROR, "internal server error")

    def close_websocket(self, conn: Connection, code: int, reason: str):
        """Send our close frame (once) and close once it is sent; from any thread."""
        with conn.lock:
            if conn.closed or conn.state == _CLOSING:
                return
            conn.state, conn.deadline = _CLOSING, time.monotonic() + _LINGER_SECONDS
            conn.close_when_sent = True
        self.send(conn, encode_frame(WS_CLOSE, close_payload(code, reason)))
        if threading.current_thread() is self._loop_thread:
            self._flush_and_arm(conn)
        else:
            self.call_soon(self._flush_and_arm, conn)

    def _flush_and_arm(self, conn: Connection):
        if not conn.closed:
            self._flush(conn)
            if not conn.closed:
                self.arm(conn)

    def stop(self, timeout: float):
        """Stop accepting; idle connections close, WebSockets are told the server is going away (1001),
        requests in flight are answered (with Connection: close); then the loop ends."""
        self.call_soon(self._begin_stop, timeout)

    def _begin_stop(self, timeout: float):
        self._stop_deadline = time.monotonic() + timeout
        self.poller.remove_listener(self.listening)
        for conn in list(self.connections.values()):
            if conn.state in (_IDLE, _HEAD, _BODY):
                self._close(conn)
            elif conn.state == _WEBSOCKET:
                self.close_websocket(conn, WS_CLOSE_GOING_AWAY, "server shutting down")
            elif conn.state == _BUSY and conn.websocket is not None:
                self.close_websocket(conn, WS_CLOSE_GOING_AWAY, "server shutting down")


# --- 26. Serving ---
# Owns a server's life: start_server (the loop on its thread, the services), RunningServer.stop, serve()
# for embedding, the listening socket, the processes of `start --processes N` (_ProcessGroup), and
# prefect_test_harness() with the pytest plugin for a Prefect user's test suite.


class RunningServer:
    """A server serving on its loop thread: its URLs, and stop()."""

    def __init__(self, app: App, loop: ConnectionLoop, thread: threading.Thread):
        self.app = app
        self.loop = loop
        self.thread = thread
        host, port = loop.server_address[:2]
        self.host = host
        self.port = port
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self.api_url = f"{self.url}/api"
        app.running_url = self.url

    def stop(self, timeout: float = 10.0):
        """Stop accepting, answer the requests in flight, close every connection, stop the services."""
        deadline = time.monotonic() + timeout
        self.app.stopping.set()
        self.loop.stop(timeout)
        self.thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        self.loop.pool.stop(deadline)
        self.loop.listening.close()
        self.app.close()


_LISTEN_BACKLOG = 1024  # connections the kernel holds for us between two accepts (capped by somaxconn)


def raise_open_files_limit() -> None:
    """Every connection is a file descriptor: take the soft limit up to the hard one (often 1,024 -> 524,288),
    as a server that holds thousands of connections must. POSIX; a no-op where it is not allowed."""
    try:
        import resource  # only here: POSIX, and only for a server

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open files limit raised from %d to %d", soft, hard)
    except (ImportError, ValueError, OSError):
        pass


def open_listener(host: str, port: int) -> socket.socket:
    """The server's listening socket. Non-blocking: when several processes share it (start --processes),
    the ones that lose the race for a connection must not sit in accept() (stop() could not wake them)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(_LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno in (98, 48, 10048):
            raise ConfigurationError(f"port {port} on {host} is already in use") from None
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def start_server(
    settings: Settings,
    host: str | None = None,
    port: int | None = None,
    *,
    listening: socket.socket | None = None,
    services: bool = True,
    process_group=None,
) -> RunningServer:
    """Serve in background threads. `listening`, `services` and `process_group`: for one process of
    `start --processes N` (the socket they share; only the first runs the services)."""
    host = host or settings["PREFECT_SERVER_API_HOST"]
    port = settings["PREFECT_SERVER_API_PORT"] if port is None else port
    raise_open_files_limit()
    app = create_app(settings, services)
    try:
        listening = listening or open_listener(host, port)
    except ConfigurationError:
        app.close()
        raise
    try:
        app.db.hold_server_lock()
    except ConfigurationError:
        listening.close()
        app.close()
        raise
    if process_group is not None:
        process_group.join(app)
    loop = ConnectionLoop(app, listening)
    thread = threading.Thread(target=loop.run, name="prefectlite-loop", daemon=True)
    thread.start()
    running = RunningServer(app, loop, thread)  # knows our URL before a service renders a link with it
    app.start_services()
    return running


def _release_freed_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc; elsewhere a no-op).

    `python prefectlite.py` compiles this whole file before running it (a script never uses a .pyc): the
    compiler's ~20 MB is freed but stays mapped in the heap, and was half of an idle server's resident size.
    """
    try:
        import ctypes  # only here: the embedding API never needs it

        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass


@contextlib.contextmanager
def serve(database: str | None = None, host: str = "127.0.0.1", port: int = 0, **settings):
    """Run a server in background threads for the `with` block; yields its API URL.

    >>> with serve(database="sqlite:///:memory:") as api_url: ...
    Extra keyword arguments are settings, e.g. PREFECT_SERVER_API_AUTH_STRING="me:secret".
    """
    overrides = dict(settings)
    if database is not None:
        overrides["PREFECT_API_DATABASE_CONNECTION_URL"] = database
    running = start_server(load_settings(overrides=overrides), host, port)
    try:
        yield running.api_url
    finally:
        running.stop()


# Several processes on one port (`start --processes N`). The GIL lets one process use about one core;
# forked processes sharing the listening socket use more. They share the database (SQLite writers take
# turns on <db>.write-lock, see SqliteDatabase), and through a _ProcessGroup what else must look like
# one server: the read cache sees every process's writes, /events/out subscribers get events (and /logs/out
# subscribers logs, with the log stream on) stored by any process, and services (run by the first process
# only) are woken by any.


class _ProcessGroup:
    """What the processes of one `prefectlite start --processes N` share, made before they are forked:
    a little shared memory (per process: writes committed, live event and log subscribers, notes of each
    kind it missed) and a datagram socket per process on which the others leave it notes: ids of events
    and logs they stored, for its subscribers, and names of services to wake (process 0 runs the services)."""

    # the counters of a process, at index * _COUNTERS + counter
    _CHANGES, _SUBSCRIBERS, _MISSED, _LOG_SUBSCRIBERS, _LOGS_MISSED = range(5)
    _COUNTERS = 5
    _IDS_PER_NOTE = 1000  # a note of event ids stays well inside a datagram (36 bytes an id)

    def __init__(self, count: int):
        import mmap  # only here: a one-process server never needs it

        self.count = count
        self.index = 0
        self._memory = mmap.mmap(-1, count * self._COUNTERS * 8)  # anonymous: shared with the processes forked after
        self._counters = memoryview(self._memory).cast("Q")
        self._inboxes = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(count)]
        self._app: App | None = None

    def _at(self, index: int, counter: int) -> int:
        return index * self._COUNTERS + counter

    def join(self, app: App):
        """In process `self.index`, before it serves: connect its app to the others."""
        self._app = app
        app.process_group = self
        app.db.count_changes_in(self, self._counters[self._at(self.index, self._CHANGES)])
        self._counters[self._at(self.index, self._SUBSCRIBERS)] = 0
        self._counters[self._at(self.index, self._LOG_SUBSCRIBERS)] = 0
        app.events.on_count = self._count_subscribers
        app.logs.on_count = self._count_log_subscribers
        app.db.hooks.event_sinks.append(self._relay_events)
        if app.settings["PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED"]:
            app.db.hooks.log_sinks.append(self._relay_logs)
        if not app.services:
            app.db.hooks.notification_wakers.append(functools.partial(self.wake_services, "notifications"))
            app.db.hooks.automation_wakers.append(functools.partial(self.wake_services, "automations"))
        threading.Thread(target=self._read_notes, name="prefectlite-notes", daemon=True).start()

    def count_changes(self, changes: int):
        self._counters[self._at(self.index, self._CHANGES)] = changes

    def total_changes(self) -> int:
        counters = self._counters
        return sum(counters[self._at(i, self._CHANGES)] for i in range(self.count))

    def _count_subscribers(self, subscribers: int):
        self._counters[self._at(self.index, self._SUBSCRIBERS)] = subscribers

    def _count_log_subscribers(self, subscribers: int):
        self._counters[self._at(self.index, self._LOG_SUBSCRIBERS)] = subscribers

    def wake_services(self, name: str):
        if self.index != 0:
            self._send(0, {"wake": name})

    def _relay_events(self, events: list[dict]):
        self._relay("events", self._SUBSCRIBERS, self._MISSED, events)

    def _relay_logs(self, logs: list[dict]):
        self._relay("logs", self._LOG_SUBSCRIBERS, self._LOGS_MISSED, logs)

    def _relay(self, kind: str, subscribers: int, missed: int, rows: list[dict]):
        """After a commit: tell every other process that has subscribers of `kind` which rows were stored."""
        ids = [row["id"] for row in rows]
        for other in range(self.count):
            if other != self.index and self._counters[self._at(other, subscribers)]:
                for start in range(0, len(ids), self._IDS_PER_NOTE):
                    if not self._send(other, {kind: ids[start : start + self._IDS_PER_NOTE]}):
                        self._counters[self._at(other, missed)] += 1

    def _send(self, to: int, note: dict) -> bool:
        try:  # never wait: a process too busy to read its notes must not slow the writer down
            self._inboxes[to][1].send(dumps(note).encode(), socket.MSG_DONTWAIT)
            return True
        except OSError:
            return False

    def _read_notes(self):
        inbox = self._inboxes[self.index][0]
        inbox.settimeout(0.5)
        hubs = {
            self._at(self.index, self._MISSED): self._app.events,
            self._at(self.index, self._LOGS_MISSED): self._app.logs,
        }
        missed = {at: self._counters[at] for at in hubs}
        while not self._app.stopping.is_set():
            for at, hub in hubs.items():
                if self._counters[at] != missed[at]:  # rows for its subscribers were lost on the way
                    missed[at] = self._counters[at]
                    hub.cut_off_everyone()
            try:
                note = json.loads(inbox.recv(65536))
            except (TimeoutError, ValueError):
                continue
            except OSError:
                return
            if "wake" in note:
                self._app.wake(str(note["wake"]))
            elif "events" in note:
                self._publish_stored("events", event_out, self._app.events, [str(i) for i in note["events"]])
            elif "logs" in note:
                self._publish_stored("log", streamed_log, self._app.logs, [str(i) for i in note["logs"]])

    def _publish_stored(self, table: str, out, hub: SubscriberHub, ids: list[str]):
        """Rows another process stored (`table` is "events" or "log", never input), to our subscribers."""
        try:
            with self._app.db.read() as tx:
                rows = tx.query(f"SELECT * FROM {table} WHERE id IN ({', '.join('?' for _ in ids)})", ids)
        except DatabaseError:
            hub.cut_off_everyone()
            return
        stored = {row["id"]: out(row) for row in rows}
        hub.publish([stored[i] for i in ids if i in stored])


@contextlib.contextmanager
def _stop_signals_blocked(signals):
    """Threads started in the block do not take `signals`; the calling thread gets them after the block.

    Python runs a signal handler in the main thread only, once that thread wakes up. The kernel hands a
    process's signal to any thread that does not block it: had a worker taken SIGTERM, a main thread
    asleep without a time limit (a script's, in the interpreter's wait for non-daemon threads, see
    cmd_start) never ran the handler, and the server did not stop. A thread inherits its creator's mask,
    so every thread the server starts, and those they start, leave the signals to the main thread; one
    that arrives inside the block waits for it (no signal is lost).
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks, and no such hand-off either
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _serve_as_one_of_processes(
    settings: Settings, listening: socket.socket, group: _ProcessGroup, index: int, supervisor: int
) -> int:
    """The life of one forked process of `start --processes N`: serve until SIGTERM or SIGINT, or until
    the `supervisor` process is gone."""
    stop = threading.Event()
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    for signum in stop_signals:
        signal.signal(signum, lambda *_: stop.set())
    group.index = index
    try:
        with _stop_signals_blocked(stop_signals):
            running = start_server(settings, listening=listening, services=index == 0, process_group=group)
    except (ConfigurationError, DatabaseError) as exc:
        print(f"prefectlite: error: process {index}: {exc}", file=sys.stderr, flush=True)
        return 1
    _release_freed_memory()
    while not stop.wait(0.5):
        if os.getppid() != supervisor:  # it was killed (-9): do not serve on, holding the port, unsupervised
            print(
                f"prefectlite: process {index}: the supervising process is gone; stopping", file=sys.stderr, flush=True
            )
            break
    running.stop()
    return 0


# Embedding in a Prefect user's test suite: prefect_test_harness() and the pytest plugin.
# `import prefect` reads the environment once: a PREFECT_API_URL set after it is never seen, and every flow
# silently runs on the SDK's own ephemeral server. So the harness points the SDK at us through Prefect's
# own settings context (and the environment, for subprocesses), and drains the SDK's log and event workers
# before the server stops: else they retry a closed port at interpreter exit (3.9: ~74 s, then give up).
# Prefect and pytest are imported only inside these functions: the module imports the standard library.

_HARNESS_DRAIN_SECONDS = 30.0  # the most the SDK's workers get to deliver what they hold to the server
_HARNESS_INTAKE_SECONDS = 10.0  # the most the clean-up waits for the events the server is still storing
_HARNESS_KEPT_TABLES = frozenset({"prefectlite_version"})  # the schema's revision: never emptied
# The SDK's background workers (module, class), drained in the order Prefect's own harness drains them.
_PREFECT_WORKERS = (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker"))


@contextlib.contextmanager
def prefect_test_harness(*, flow_heartbeats: bool = False, **settings):
    """Serve an in-memory database for the `with` block and point the Prefect SDK at it; yields the API URL.

    >>> with prefect_test_harness() as api_url: my_flow()   # the run is stored here, not in Prefect's own
    A drop-in for prefect.testing.utilities.prefect_test_harness, for the 2.20 and 3.x SDKs (imported here
    when installed). Without prefect installed it still serves and yields the URL. Keyword arguments are
    server settings, as for serve(). The 3.x SDK's flow-run heartbeats are off unless `flow_heartbeats`:
    they detect crashed runs, and the end of every flow waits up to 1 s for their thread (its 1 s naps).
    """
    with _harness(flow_heartbeats=flow_heartbeats, **settings) as running:
        yield running.api_url


@contextlib.contextmanager
def _harness(*, flow_heartbeats: bool = False, **settings):
    """prefect_test_harness(), yielding the RunningServer (the pytest plugin cleans its database)."""
    overrides = {"PREFECT_API_DATABASE_CONNECTION_URL": "sqlite:///:memory:", **settings}
    prefect = _prefect_sdk()  # before the environment changes: an SDK imported now must not keep our URL
    running = start_server(load_settings(overrides=overrides), "127.0.0.1", 0)
    try:
        with _environment_pointing_at(running.api_url), _prefect_pointing_at(prefect, running.api_url, flow_heartbeats):
            yield running
    finally:
        running.stop()


def _prefect_sdk():
    """The Prefect SDK, imported, or None when it is not installed."""
    import importlib.util  # only here: the harness is the one user

    if "prefect" not in sys.modules and importlib.util.find_spec("prefect") is None:
        return None
    import prefect.context
    import prefect.settings

    return prefect


@contextlib.contextmanager
def _environment_pointing_at(api_url: str):
    """For subprocesses (a `prefect` CLI, a worker): PREFECT_API_URL is ours, and no Cloud key is sent."""
    saved = {name: os.environ.get(name) for name in ("PREFECT_API_URL", "PREFECT_API_KEY")}
    os.environ["PREFECT_API_URL"] = api_url
    os.environ.pop("PREFECT_API_KEY", None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _prefect_pointing_at(prefect, api_url: str, flow_heartbeats: bool):
    """Prefect's settings context says PREFECT_API_URL is ours (2.20 and 3.x spell it alike); on the way out
    the SDK's workers deliver what they hold while we still serve, then the settings are restored."""
    if prefect is None:
        yield
        return
    settings = prefect.settings
    updates = {settings.PREFECT_API_URL: api_url}
    heartbeats = getattr(settings, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY", None)  # 3.x; 2.20 flows send none
    if heartbeats is not None and not flow_heartbeats:
        updates[heartbeats] = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(settings.temporary_settings(updates=updates, restore_defaults={settings.PREFECT_API_KEY}))
        # 3.x: contexts copied before this one (an IsolatedAsyncioTestCase's, made at collection) fall back
        # to a process-global settings context, which Prefect's own harness replaces too. 2.20 has none.
        global_context = getattr(prefect.context, "_temporary_global_settings_context", None)
        if global_context is not None:
            stack.enter_context(global_context(prefect.context.get_settings_context()))
        try:
            yield
        finally:
            drain_prefect_workers()


def drain_prefect_workers(timeout: float = _HARNESS_DRAIN_SECONDS) -> None:
    """Wait (at most `timeout`) for the Prefect SDK's log and event workers to send what they hold; a no-op
    when the SDK or the workers were never imported. They start afresh when next used."""
    workers = [getattr(sys.modules.get(module), name, None) for module, name in _PREFECT_WORKERS]
    workers = [worker for worker in workers if worker is not None]
    if not workers:
        return
    # In a thread of its own: where an event loop runs (an async test), drain_all() returns an awaitable
    # instead of waiting; a thread has no loop, so it waits in both SDKs.
    thread = threading.Thread(target=_drain_all, args=(workers, timeout), name="prefectlite-drain", daemon=True)
    thread.start()
    thread.join(timeout * len(workers) + 1.0)


def _drain_all(workers, timeout: float) -> None:
    for worker in workers:
        try:
            worker.drain_all(timeout=timeout)
        except Exception:  # noqa: BLE001 - an SDK that cannot deliver must not fail the test suite's exit
            log.warning("draining the Prefect SDK's %s failed", worker.__name__, exc_info=True)


class _FreshDatabase:
    """What a just-started server's database holds (the built-in block types and schemas), to go back to
    between tests in milliseconds: every table emptied and those rows put back, in one transaction, with
    the same server and connection (no migrations, no new server)."""

    def __init__(self, running: RunningServer):
        self.app = app = running.app
        self.api_url = running.api_url
        with app.db.read() as tx:
            self.tables = [t for t in app.db.table_names(tx) if t not in _HARNESS_KEPT_TABLES]
            self.rows = {table: tx.query(f"SELECT * FROM {table}") for table in self.tables}

    def restore(self) -> None:
        self._wait_for_stored_events()
        with self.app.write_guard(), self.app.db.write() as tx:
            tx.execute("PRAGMA defer_foreign_keys = ON")  # checked at COMMIT: no order of tables to keep
            for table in self.tables:
                tx.execute(f"DELETE FROM {table}")
            for table, rows in self.rows.items():
                if rows:
                    columns = list(rows[0])
                    tx.executemany(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
                        [tuple(row[c] for c in columns) for row in rows],
                    )

    def _wait_for_stored_events(self) -> None:
        """Events the SDK sent before it was drained may still wait for the server's group commit: an empty
        batch queued behind them is done once they are stored (else they would land in the next test).
        Usually none wait (a drained SDK closed its WebSocket, and we read a close only after the events
        before it are stored): then this costs nothing, not a commit window (10 ms)."""
        if not self.app.event_intake.wait_until_stored(_HARNESS_INTAKE_SECONDS):
            raise DatabaseUnavailable("the server did not store the events it received in time")


# The pytest plugin. Registered as a `pytest11` entry point, so pytest loads this module for everyone who
# installs the package: it does nothing until asked for, by `-p prefectlite`, by the ini option
# `prefectlite = true`, or by naming it in `pytest_plugins` where the package is not installed. Asked for,
# it gives the fixtures, and freezes the garbage collector once every test is done (a prompt exit).


def pytest_addoption(parser):
    parser.addini(
        "prefectlite",
        type="bool",
        default=False,
        help="prefectlite: the prefect_server and prefect_clean_db fixtures (also: -p prefectlite)",
    )


def pytest_configure(config):
    if _pytest_plugin_asked_for(config):
        config.pluginmanager.register(_pytest_fixtures(), "prefectlite-fixtures")


def _pytest_plugin_asked_for(config) -> bool:
    if config.getini("prefectlite") or "prefectlite" in (config.getoption("plugins", None) or []):
        return True
    this = sys.modules[__name__]
    loaded_by_entry_point = any(plugin is this for plugin, _ in config.pluginmanager.list_plugin_distinfo())
    return not loaded_by_entry_point


def _pytest_fixtures():
    """The plugin's fixtures, made only once asked for: pytest is imported here, never by the module."""
    import pytest

    class PrefectliteFixtures:
        @pytest.fixture(scope="session")
        def prefectlite_fresh_database(self):
            """The harness for the whole session, and what its database held when it started."""
            with _harness() as running:
                yield _FreshDatabase(running)

        @pytest.fixture(scope="session")
        def prefect_server(self, prefectlite_fresh_database):
            """prefect_test_harness() for the session: the Prefect SDK points at it; its API URL."""
            return prefectlite_fresh_database.api_url

        @pytest.fixture
        def prefect_clean_db(self, prefect_server, prefectlite_fresh_database):
            """prefect_server, its database as fresh as when it started (what earlier tests stored is gone)."""
            drain_prefect_workers()  # what an earlier test's flows still hold must not arrive in this one
            prefectlite_fresh_database.restore()
            return prefect_server

        @pytest.hookimpl(trylast=True)
        def pytest_unconfigure(self, config):
            """Every test is done: move what the process holds out of the garbage collector's sight. With
            the SDK loaded, pytest's last full collections and the interpreter's own at exit took 1-2.5 s
            (measured, 2.20 and 3.9); frozen, ~0.1 s. Only cycles left unreachable now go uncollected."""
            import gc  # only here: the one use

            gc.freeze()

    return PrefectliteFixtures()


# --- 27. CLI ---
# Owns the command line: `start` (also `server start`), `config`, `profile`, `database`, `version`.
# Every failure a person can cause is one line on stderr and a non-zero exit, never a traceback.


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigurationError(message)


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise ConfigurationError("aborted (nothing changed); pass -y to skip this question")


def _stop_signal_handler(stop: threading.Event, before_exit=None):
    """The first SIGINT or SIGTERM stops the server gently: requests in flight are finished. A second one
    (someone who will not wait) ends the process at once, with exit status 128 + the signal; what was
    committed stays committed, requests still in flight get no answer and their writes roll back.
    `before_exit`: what must go too (the processes of `start --processes`)."""

    def on_stop_signal(signum, frame):
        if stop.is_set():
            if before_exit is not None:
                before_exit()
            # os.write, not print: the main thread may be inside a print to the same stream
            os.write(2, b"prefectlite: stopped at once (second signal); requests in flight were dropped\n")
            os._exit(128 + signum)
        stop.set()

    return on_stop_signal


def _print_ready(out, host: str, port: int, dialect: str, processes: int = 1):
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    several = f", {processes} processes" if processes > 1 else ""
    print(f"prefectlite {__version__} is ready ({dialect} database{several})", file=out)
    print(f"  UI:  http://{shown}:{port}/", file=out)
    print(f"  API: http://{shown}:{port}/api", file=out)
    print("Press Ctrl+C to stop.", file=out, flush=True)


_QUICK_EXIT_SECONDS = 5.0  # a process that ends sooner than this after it started has "crashed at start"
_QUICK_EXITS_TO_GIVE_UP = 3


def _start_processes(settings: Settings, host: str, port: int, count: int, out) -> int:
    """`start --processes N`: migrate, open the port, fork N serving processes and look after them.

    This process starts no thread (forking one that has threads can leave the child holding locks that
    nobody will release), so it can start a process again whenever one dies: a crashed one is replaced;
    one that keeps ending within seconds of its start stops the server (exit 1).
    """
    if not hasattr(os, "fork"):
        raise ConfigurationError("--processes needs fork() (Linux, macOS); use one process here")
    children: dict[int, int] = {}  # pid -> index

    def kill_all():
        for pid in list(children):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # before anything starts: a signal at any moment stops cleanly
        signal.signal(signum, _stop_signal_handler(stop, before_exit=kill_all))
    app = create_app(settings, services=False)  # migrate once, before any process serves
    dialect, in_memory = app.db.dialect, getattr(app.db, "memory", False)
    app.close()
    if in_memory:
        raise ConfigurationError(
            "--processes needs a database they can share: a SQLite file or PostgreSQL, not an in-memory database"
        )
    listening = open_listener(host, port)
    group = _ProcessGroup(count)
    supervisor = os.getpid()  # (what the processes compare their parent with: they stop when it is gone)
    _release_freed_memory()  # start-up's garbage, before every process inherits the heap
    started_at: dict[int, float] = {}
    quick_exits = collections.Counter()

    def start(index: int):
        pid = os.fork()
        if pid == 0:  # the child: serve, then leave without running the parent's exit handlers
            code = 1
            try:
                code = _serve_as_one_of_processes(settings, listening, group, index, supervisor)
            except BaseException:  # noqa: BLE001 - a bug: say where, as an uncaught exception would
                sys.excepthook(*sys.exc_info())
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        children[pid] = index
        started_at[index] = time.monotonic()

    failed = False
    for index in range(count):
        start(index)
    _print_ready(out, host, listening.getsockname()[1], dialect, count)
    while not stop.wait(0.2) and not failed:
        for index, status in _ended_children(children):
            if stop.is_set():
                break
            code = os.waitstatus_to_exitcode(status)
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            quick = time.monotonic() - started_at[index] < _QUICK_EXIT_SECONDS
            quick_exits[index] = quick_exits[index] + 1 if quick else 0
            if quick_exits[index] >= _QUICK_EXITS_TO_GIVE_UP:
                print(
                    f"prefectlite: error: process {index} ended {quick_exits[index]} times right after starting "
                    f"({how}); stopping the server",
                    file=sys.stderr,
                    flush=True,
                )
                failed = True
                break
            print(f"prefectlite: process {index} ended ({how}); starting it again", file=sys.stderr, flush=True)
            start(index)
    if not failed:
        print("stopping: finishing requests in flight (Ctrl+C again to stop at once)", file=out, flush=True)
    for pid in list(children):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while children and time.monotonic() < deadline:
        _ended_children(children)
        time.sleep(0.05)
    kill_all()
    while children:
        _ended_children(children)
        time.sleep(0.05)
    listening.close()
    print("stopped", file=out, flush=True)
    return 1 if failed else 0


def _ended_children(children: dict[int, int]) -> list[tuple[int, int]]:
    """(index, wait status) of each child that has ended, taken out of `children` (pid -> index)."""
    ended = []
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            break
        if pid == 0:
            break
        if pid in children:
            ended.append((children.pop(pid), status))
    return ended


def _flag_in_range(flag: str, value: int) -> int:
    """A `start` flag that stands for a setting (--port, --processes) holds to the setting's range."""
    spec = SETTINGS[{"--port": "PREFECT_SERVER_API_PORT", "--processes": "PREFECT_SERVER_PROCESSES"}[flag]]
    if not spec.minimum <= value <= spec.maximum:
        raise ConfigurationError(
            f"{flag} must be between {_plain_number(spec.minimum)} and {_plain_number(spec.maximum)}, got {value}"
        )
    return value


def cmd_start(args, out) -> int:
    settings = load_settings()
    host = args.host or settings["PREFECT_SERVER_API_HOST"]
    port = settings["PREFECT_SERVER_API_PORT"] if args.port is None else _flag_in_range("--port", args.port)
    processes = (
        settings["PREFECT_SERVER_PROCESSES"]
        if args.processes is None
        else _flag_in_range("--processes", args.processes)
    )
    if host in ("0.0.0.0", "::", "") and not settings["PREFECT_SERVER_API_AUTH_STRING"]:
        print(
            f"warning: listening on all interfaces ({host}) without PREFECT_SERVER_API_AUTH_STRING: "
            "anyone who can reach this machine can use the API",
            file=sys.stderr,
        )
    if hasattr(signal, "pthread_sigmask"):
        # A signal mask survives fork and exec: a parent that blocked these while it started us (a test
        # runner's worker did) would leave a server that never hears them.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if processes > 1:
        return _start_processes(settings, host, port, processes, out)
    stop = threading.Event()
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    for signum in stop_signals:  # before the port opens: a signal at any moment stops cleanly
        signal.signal(signum, _stop_signal_handler(stop))
    as_script = __name__ == "__main__" and __spec__ is None and hasattr(signal, "sigwait")
    with _stop_signals_blocked(stop_signals):
        running = start_server(settings, host, port)
        _print_ready(out, running.host, running.port, running.app.db.dialect)
        if as_script:
            # Run as a script (`python prefectlite.py start`): CPython keeps the script's syntax tree (~24 MB,
            # most of an idle server) until the script's top level returns. So return now and wait in a
            # non-daemon thread, which the interpreter waits for before it exits. The main thread then sits in
            # that wait, where a signal that came just before it began was never handled (1 hang in 25 under
            # load): so every thread keeps the signals blocked and one thread takes them with sigwait().
            # (`python -m prefectlite` and the installed command import the module: nothing to free there.)
            threading.Thread(target=_serve_until, args=(stop, running, out), name="prefectlite-main").start()
            threading.Thread(
                target=_take_stop_signals,
                args=(stop_signals, _stop_signal_handler(stop)),
                name="prefectlite-signals",
                daemon=True,
            ).start()
    if as_script:
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        return 0
    _serve_until(stop, running, out)
    return 0


def _take_stop_signals(signals, on_signal):
    """Take the stop signals as they come (every thread blocks them) and hand each to `on_signal`."""
    while True:
        on_signal(signal.sigwait(signals), None)


def _serve_until(stop: threading.Event, running, out):
    trimmed = False
    while not stop.wait(0.5):
        if not trimmed:  # once, when start-up's garbage (and a script's syntax tree, see cmd_start) is freed
            _release_freed_memory()
            trimmed = True
    print("stopping: finishing requests in flight (Ctrl+C again to stop at once)", file=out, flush=True)
    running.stop()
    print("stopped", file=out, flush=True)


class _RequestIdFilter(logging.Filter):
    def filter(self, record):
        record.request_id = REQUEST_ID.get() or "-"
        return True


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record):
        entry = {
            "time": iso(_dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return dumps(entry)


def configure_logging(settings: Settings, stream=None):
    level = getattr(logging, str(settings["PREFECT_LOGGING_SERVER_LEVEL"]).upper(), logging.WARNING)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if str(settings["PREFECT_LOGGING_SERVER_FORMAT"]).lower() == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    # echo shows SQL whatever the server's log level
    sql_log.setLevel(logging.INFO if settings["PREFECT_API_DATABASE_ECHO"] else logging.NOTSET)
    return handler


def cmd_config_set(args, out) -> int:
    home = _prefect_home()
    data = read_profiles(home)
    updates = {}
    for item in args.pairs:
        if "=" not in item:
            raise ConfigurationError(f"expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        check_setting_name(key)
        if key == "PREFECT_HOME":
            raise ConfigurationError("PREFECT_HOME cannot be set in a profile; set the environment variable")
        _convert_setting(key, value)
        if key == "PREFECT_API_DATABASE_CONNECTION_URL":
            parse_database_url(value.replace("${PREFECT_HOME}", str(home)))
        updates[key] = value
    profile = data["profiles"].setdefault(data["active"], {})
    profile.update(updates)
    write_profiles(home, data)
    for key, value in updates.items():
        shown = "********" if SETTINGS[key].secret else mask_url_password(value)
        print(f"Set {key!r} to {shown!r}.", file=out)
        if key in os.environ:
            print(f"{key} is also set by an environment variable, which takes precedence.", file=out)
    print(f"Updated profile {data['active']!r}.", file=out)
    return 0


def cmd_config_unset(args, out) -> int:
    home = _prefect_home()
    data = read_profiles(home)
    profile = data["profiles"].setdefault(data["active"], {})
    for key in args.keys:
        check_setting_name(key)
        if key not in profile:
            raise ConfigurationError(f"{key} is not set in profile {data['active']!r}")
    for key in args.keys:
        del profile[key]
        print(f"Unset {key!r}.", file=out)
    write_profiles(home, data)
    print(f"Updated profile {data['active']!r}.", file=out)
    return 0


def cmd_config_view(args, out) -> int:
    settings = load_settings()
    print(f"PREFECT_PROFILE={settings.profile!r}", file=out)
    for name, value in settings.masked().items():
        source = settings.sources[name]
        # with the sources, PREFECT_HOME always: an exported one (Prefect's own) moves the default database
        if source == "default" and not args.show_defaults and not (args.show_sources and name == "PREFECT_HOME"):
            continue
        suffix = f" (from {source})" if args.show_sources else ""
        print(f"{name}={value!r}{suffix}", file=out)
    return 0


def cmd_profile(args, out) -> int:
    home = _prefect_home()
    data = read_profiles(home)
    profiles = data["profiles"]
    if args.action == "ls":
        for name in profiles:
            print(f"* {name}" if name == data["active"] else f"  {name}", file=out)
        return 0
    name = args.name or (data["active"] if args.action == "inspect" else None)
    if not name:
        raise ConfigurationError(f"profile {args.action} needs a NAME")
    if args.action == "create":
        if name in profiles:
            raise ConfigurationError(f"profile {name!r} already exists")
        profiles[name] = {}
        write_profiles(home, data)
        print(f"Created profile {name!r}; switch to it with `prefectlite profile use {name}`.", file=out)
        return 0
    if name not in profiles:
        raise ConfigurationError(f"profile {name!r} not found; existing: {', '.join(profiles)}")
    if args.action == "use":
        data["active"] = name
        write_profiles(home, data)
        print(f"Connected to profile {name!r}.", file=out)
    elif args.action == "delete":
        if name == data["active"]:
            raise ConfigurationError(f"profile {name!r} is active; switch to another one first")
        del profiles[name]
        write_profiles(home, data)
        print(f"Removed profile {name!r}.", file=out)
    else:
        values = profiles[name]
        if not values:
            print(f"Profile {name!r} is empty.", file=out)
        for key, value in values.items():
            shown = "********" if key in SETTINGS and SETTINGS[key].secret else mask_url_password(value)
            print(f"{key}={shown!r}", file=out)
    return 0


@contextlib.contextmanager
def _cli_database(settings: Settings | None = None):
    settings = settings or load_settings()
    db = open_database(settings["PREFECT_API_DATABASE_CONNECTION_URL"], settings)
    try:
        yield db
    finally:
        db.close()


_SOURCE_WORDS = {
    "env": "the environment",
    "profile": "profile {profile!r}",
    "default": "the default",
    "override": "the caller",
}


def _database_origin(settings: Settings) -> str:
    """Where the database URL came from, for a person who did not expect this database."""
    name = "PREFECT_API_DATABASE_CONNECTION_URL"
    said = _SOURCE_WORDS[settings.sources[name]].format(profile=settings.profile)
    if settings.sources[name] != "default":
        return f"{name} from {said}"
    home_said = _SOURCE_WORDS[settings.sources["PREFECT_HOME"]].format(profile=settings.profile)
    return f"the default {name}, under PREFECT_HOME={settings['PREFECT_HOME']} from {home_said}"


def _sqlite_file(settings: Settings) -> str | None:
    """The path of the SQLite database file the settings name (None: PostgreSQL or in memory)."""
    kind, target = parse_database_url(
        settings["PREFECT_API_DATABASE_CONNECTION_URL"], settings["PREFECT_API_DATABASE_PASSWORD"]
    )
    return target if kind == "sqlite" and target != ":memory:" else None


def _sqlite_file_missing(settings: Settings) -> str | None:
    """The path of a SQLite database file the settings name that does not exist (opening it would create it)."""
    path = _sqlite_file(settings)
    return path if path is not None and not os.path.isfile(path) else None


def _has_our_schema_read_only(path: str) -> bool:
    """Looked at without changing a byte (opening it as a database would put it in WAL mode)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            return (
                conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'prefectlite_version'"
                ).fetchone()
                is not None
            )
    except sqlite3.Error:  # not a database at all
        return False


def _existing_database(settings: Settings, action: str) -> Database:
    """The database the settings name, refused (one line, nothing created or changed) when there is no file
    or no schema of ours there: with a PREFECT_HOME exported for Prefect itself, `current` answered "base"
    for a new empty file it had just created, and `backup` copied that."""
    missing = _sqlite_file_missing(settings)
    if missing is not None:
        raise ConfigurationError(
            f"database {action}: there is no database file at {missing} "
            f"({_database_origin(settings)}); nothing was created "
            "(`prefectlite database upgrade` creates one)"
        )
    path = _sqlite_file(settings)
    if path is not None and not _has_our_schema_read_only(path):
        raise ConfigurationError(
            f"database {action}: {path} has no prefectlite schema "
            f"({_database_origin(settings)}); `prefectlite database upgrade` creates it"
        )
    db = open_database(settings["PREFECT_API_DATABASE_CONNECTION_URL"], settings)
    try:
        if current_revision(db) is None:
            raise ConfigurationError(
                f"database {action}: {_where(db)} has no prefectlite schema "
                f"({_database_origin(settings)}); `prefectlite database upgrade` creates it"
            )
    except BaseException:
        db.close()
        raise
    return db


# Commands that act on a database that must already be there: they never create one
_ACTIONS_ON_AN_EXISTING_DATABASE = {"current", "downgrade", "prune", "vacuum", "backup", "restore"}


def _where(db: Database) -> str:
    return mask_url_password(db.url)


def cmd_database(args, out) -> int:
    action = args.action
    settings = load_settings()
    if action == "history":
        current = None
        with contextlib.suppress(ConfigurationError, DatabaseError):
            if _sqlite_file_missing(settings) is None:  # no file: no current revision, and none created
                with _cli_database(settings) as db:
                    current = current_revision(db)
        for rev in list_revisions():
            marker = " (current)" if rev.id == current else ""
            print(f"{rev.id}  {rev.name}: {rev.description}{marker}", file=out)
        return 0
    if action in _ACTIONS_ON_AN_EXISTING_DATABASE:
        opened = contextlib.closing(_existing_database(settings, action))
    else:
        opened = _cli_database(settings)
    with opened as db:
        if action == "current":
            print(current_revision(db), file=out)
        elif action == "upgrade":
            _confirm(f"Upgrade the database at {_where(db)}?", args.yes)
            applied = migrate(db, args.revision)
            print(f"Applied {', '.join(applied)}." if applied else "Already up to date.", file=out)
            print(f"Database is at revision {current_revision(db)}.", file=out)
        elif action == "downgrade":
            target = args.revision or "-1"
            revisions = list_revisions()
            if target not in ("base",) and not re.fullmatch(r"-\d+", target):
                _resolve_revision(target, revisions)
            _confirm(f"Downgrade the database at {_where(db)} to {target}? Data in dropped tables is lost.", args.yes)
            undone = downgrade(db, target)
            print(f"Reverted {', '.join(undone)}." if undone else "Nothing to downgrade.", file=out)
            print(f"Database is at revision {current_revision(db) or 'base'}.", file=out)
        elif action == "reset":
            _confirm(f"Reset the database at {_where(db)}? Every run, log and setting stored there is lost.", args.yes)
            reset_database(db)
            print(f"Reset the database; it is at revision {current_revision(db)}.", file=out)
        elif action == "prune":
            if not args.older_than:
                raise ConfigurationError("database prune needs --older-than, e.g. --older-than 30d")
            age = parse_age(args.older_than)
            if args.batch_size < 1:
                raise ConfigurationError("--batch-size must be at least 1")
            counts = prune_flow_runs(db, age, args.batch_size, dry_run=args.dry_run)
            verb = "Would delete" if args.dry_run else "Deleted"
            print(
                f"{verb} "
                + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items())
                + f" (terminal flow runs that ended more than {args.older_than} ago).",
                file=out,
            )
        elif action == "vacuum":
            before = db.size_bytes()
            db.vacuum()
            print(f"Vacuumed {_where(db)}: {before} bytes before, {db.size_bytes()} bytes after.", file=out)
        elif action == "backup":
            if not args.path:
                raise ConfigurationError("database backup needs a PATH for the copy")
            print(db.backup(args.path), file=out)
        elif action == "restore":
            if not args.path or not os.path.isfile(args.path):
                raise ConfigurationError(f"database restore needs an existing backup file, got {args.path!r}")
            _confirm(f"Replace the database at {_where(db)} with {args.path}?", args.yes)
            print(db.restore(args.path, [r.id for r in list_revisions()]), file=out)
    return 0


def cmd_version(args, out) -> int:
    settings = load_settings()
    print(f"prefectlite: {__version__}", file=out)
    print(f"API version (Prefect 2): {API_VERSION}", file=out)
    print(f"Python: {sys.version.split()[0]}", file=out)
    missing = None
    with contextlib.suppress(ConfigurationError):  # a bad URL: said below
        missing = _sqlite_file_missing(settings)
    if missing is not None:  # not created just to tell its version
        print(f"Database: sqlite {sqlite3.sqlite_version} (no database file at {missing})", file=out)
        return 0
    try:
        with _cli_database(settings) as db:
            print(f"Database: {db.dialect} {db.server_version()}", file=out)
    except (ConfigurationError, DatabaseError) as exc:
        print(
            f"Database: {settings['PREFECT_API_DATABASE_CONNECTION_URL'].split(':', 1)[0]} (unavailable: {exc})",
            file=out,
        )
    return 0


# Commands that act on a running server through its API (as the `prefect` CLI does), so that they
# go through orchestration and work against a remote server too.


def _api_base(settings: Settings) -> str:
    url = settings["PREFECT_API_URL"]
    if url:
        return url.rstrip("/")
    host = settings["PREFECT_SERVER_API_HOST"]
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{settings['PREFECT_SERVER_API_PORT']}/api"


def api_call(method: str, path: str, body=None, settings: Settings | None = None):
    """One JSON request to the server; ConfigurationError (one line) when it fails."""
    settings = settings or load_settings()
    base = _api_base(settings)
    headers = {"Content-Type": "application/json"}
    auth = os.environ.get("PREFECT_API_AUTH_STRING") or settings["PREFECT_SERVER_API_AUTH_STRING"]
    if auth:
        headers["Authorization"] = _basic(*auth.split(":", 1)) if ":" in auth else f"Bearer {auth}"
    data = None if body is None else dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            text = resp.read()
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        try:
            detail = json.loads(text)
            detail = detail.get("detail") or "; ".join(e["msg"] for e in detail.get("exception_detail", [])) or text
        except (ValueError, AttributeError, TypeError):
            detail = text[:200]
        raise ConfigurationError(f"{method} {path}: {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigurationError(f"cannot reach the server at {base}: {getattr(exc, 'reason', exc)}") from None
    return json.loads(text) if text else None


# C0 and C1 control characters, DEL, and the bidi marks, overrides and isolates that reorder what follows
_TERMINAL_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text) -> str:
    """API data as a terminal may show it: control characters written out (\\x1b, \\u202e), so that a flow
    run named with escape sequences cannot retitle, recolour or clear the operator's terminal."""
    return _TERMINAL_CONTROLS.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", str(text)
    )


def local_time(timestamp: str | None) -> str:
    """An API timestamp as this machine's local time to the second (2026-12-06 03:30:48); '' for none."""
    if not timestamp:
        return ""
    try:
        moment = _dt.datetime.fromisoformat(timestamp)
    except (TypeError, ValueError):
        return printable(timestamp)
    if moment.tzinfo is None:  # the API's times are UTC
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _print_table(out, headers: list[str], rows: list[list], empty: str):
    if not rows:
        print(empty, file=out)
        return
    cells = [[printable("" if v is None else v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)


def _schedule_summary(schedule: dict | None) -> str:
    if not schedule:
        return ""
    if "interval" in schedule:
        return f"every {schedule['interval']:g}s"
    if "cron" in schedule:
        return f"cron {schedule['cron']} ({schedule.get('timezone') or 'UTC'})"
    if "rrule" in schedule:
        return "rrule " + schedule["rrule"].replace("\n", " ")
    return dumps(schedule)


def cmd_deployment(args, out) -> int:
    if args.action == "ls":
        deployments = api_call("POST", "/deployments/filter", {"sort": "NAME_ASC"})
        flows = {f["id"]: f["name"] for f in api_call("POST", "/flows/filter", {})}
        rows = [
            [
                f"{flows.get(d['flow_id'], '?')}/{d['name']}",
                d["id"],
                "; ".join(
                    _schedule_summary(s["schedule"]) + ("" if s["active"] else " (inactive)") for s in d["schedules"]
                ),
                "paused" if d["paused"] else "active",
                d.get("work_pool_name") or "",
            ]
            for d in deployments
        ]
        _print_table(out, ["NAME", "ID", "SCHEDULES", "STATUS", "WORK POOL"], rows, "No deployments.")
        return 0
    if not args.name or "/" not in args.name:
        raise ConfigurationError("deployment run needs FLOW_NAME/DEPLOYMENT_NAME")
    flow_name, dep_name = args.name.split("/", 1)
    params = {}
    for item in args.param or []:
        if "=" not in item:
            raise ConfigurationError(f"--param expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            params[key] = loads(raw)
        except ValueError:
            params[key] = raw  # not JSON: a plain string
    dep = api_call("GET", f"/deployments/name/{urllib.parse.quote(flow_name)}/{urllib.parse.quote(dep_name)}")
    run = api_call("POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})
    print(f"Created flow run {run['name']!r} ({run['id']}) of {args.name}, scheduled to start now.", file=out)
    return 0


def cmd_flow_run(args, out) -> int:
    if args.action == "ls":
        body = {"sort": "EXPECTED_START_TIME_DESC", "limit": args.limit}
        if args.state:
            states = [s for s in args.state]
            body["flow_runs"] = {
                "state": {
                    "operator": "or_",
                    "type": {"any_": [s.upper() for s in states]},
                    "name": {"any_": [s.title() for s in states]},
                }
            }
        runs = api_call("POST", "/flow_runs/filter", body)
        flows = {f["id"]: f["name"] for f in api_call("POST", "/flows/filter", {})}
        rows = [
            [
                r["id"],
                flows.get(r["flow_id"], "?"),
                r["name"],
                r["state_name"],
                local_time(r["start_time"] or r["expected_start_time"]),
            ]
            for r in runs
        ]
        _print_table(out, ["ID", "FLOW", "NAME", "STATE", "WHEN"], rows, "No flow runs.")
        return 0
    run_id = parse_uuid_cli(args.id)
    run = api_call("GET", f"/flow_runs/{run_id}")
    if run["state_type"] in TERMINAL_STATES:
        raise ConfigurationError(f"flow run {run['name']!r} is already {run['state_name']}")
    # a running run needs its runner or worker to stop it (CANCELLING); one that never started ends now
    target = "CANCELLING" if run["state_type"] == "RUNNING" else "CANCELLED"
    result = api_call(
        "POST",
        f"/flow_runs/{run_id}/set_state",
        {"state": {"type": target, "message": "Cancelled from the command line."}, "force": True},
    )
    print(f"Flow run {run['name']!r} is {printable(result['state']['name'])}.", file=out)
    return 0


def parse_uuid_cli(text: str) -> str:
    try:
        return parse_uuid(text)
    except ValidationFailed:
        raise ConfigurationError(f"{text!r} is not a flow run id (a UUID)") from None


def cmd_work_pool(args, out) -> int:
    pools = api_call("POST", "/work_pools/filter", {})
    rows = [
        [p["name"], p["type"], p["id"], p["status"], "" if p["concurrency_limit"] is None else p["concurrency_limit"]]
        for p in pools
    ]
    _print_table(out, ["NAME", "TYPE", "ID", "STATUS", "CONCURRENCY LIMIT"], rows, "No work pools.")
    return 0


def _policy_sentence(policy: dict, block_names: dict) -> str:
    tags = ", ".join(policy["tags"])
    runs = f"any flow with {tags} tag{'s' if len(policy['tags']) > 1 else ''}" if tags else "any flow"
    states = " or ".join(s.lower() for s in policy["state_names"]) or "any"
    block_name = block_names.get(policy["block_document_id"], "?")
    return f"If a run of {runs} enters a {states} state, send a notification to {block_name}"


def cmd_notification(args, out) -> int:
    if args.action == "ls":
        policies = api_call("POST", "/flow_run_notification_policies/filter", {})
        docs = api_call("POST", "/block_documents/filter", {})
        names = {d["id"]: f"{d['block_type']['slug']}/{d['name']}" for d in docs}
        rows = [[p["id"], "active" if p["is_active"] else "paused", _policy_sentence(p, names)] for p in policies]
        _print_table(out, ["ID", "STATUS", "POLICY"], rows, "No notification policies.")
        return 0
    if args.action == "create":
        if not args.block or "/" not in args.block:
            raise ConfigurationError("--block must be BLOCK_TYPE_SLUG/BLOCK_NAME, e.g. slack-webhook/my-hook")
        slug, name = args.block.split("/", 1)
        doc = api_call(
            "GET", f"/block_types/slug/{urllib.parse.quote(slug)}/block_documents/name/{urllib.parse.quote(name)}"
        )
        body = {
            "state_names": args.state or [],
            "tags": args.tag or [],
            "block_document_id": doc["id"],
            "is_active": True,
        }
        if args.template:
            body["message_template"] = args.template
        if not body["state_names"]:
            raise ConfigurationError("give at least one --state, e.g. --state Failed")
        policy = api_call("POST", "/flow_run_notification_policies/", body)
        print(f"Created notification policy {policy['id']}.", file=out)
        return 0
    policy_id = parse_uuid_cli(args.id) if args.id else None
    if policy_id is None:
        raise ConfigurationError(f"notification {args.action} needs a policy ID")
    if args.action == "delete":
        api_call("DELETE", f"/flow_run_notification_policies/{policy_id}")
        print(f"Deleted notification policy {policy_id}.", file=out)
    else:
        api_call("PATCH", f"/flow_run_notification_policies/{policy_id}", {"is_active": args.action == "resume"})
        print(f"Notification policy {policy_id} is {'active' if args.action == 'resume' else 'paused'}.", file=out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prefectlite", description="A self-hosted Prefect 2 compatible orchestration server.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)
    start = sub.add_parser("start", help="start the server (API at /api, UI at /)")
    start.add_argument("--host")
    start.add_argument("--port", type=int)
    start.add_argument("--processes", type=int, help="processes serving the port (default 1; more use more cores)")
    start.set_defaults(func=cmd_start)

    config = sub.add_parser("config", help="view and change settings of the active profile")
    config_sub = config.add_subparsers(dest="action", parser_class=_Parser, required=True)
    cset = config_sub.add_parser("set")
    cset.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    cset.set_defaults(func=cmd_config_set)
    cunset = config_sub.add_parser("unset")
    cunset.add_argument("keys", nargs="+", metavar="KEY")
    cunset.set_defaults(func=cmd_config_unset)
    cview = config_sub.add_parser("view")
    cview.add_argument("--show-sources", action="store_true")
    cview.add_argument("--show-defaults", action="store_true")
    cview.set_defaults(func=cmd_config_view)

    profile = sub.add_parser("profile", help="manage profiles in $PREFECT_HOME/profiles.toml")
    profile.add_argument("action", choices=["ls", "create", "use", "delete", "inspect"])
    profile.add_argument("name", nargs="?")
    profile.set_defaults(func=cmd_profile)

    database = sub.add_parser("database", help="migrations: upgrade, downgrade, reset, current, history")
    database.add_argument(
        "action",
        choices=["reset", "upgrade", "downgrade", "current", "history", "prune", "vacuum", "backup", "restore"],
    )
    database.add_argument("path", nargs="?", help="backup / restore: the backup file")
    database.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    database.add_argument("-r", "--revision", help="target revision (upgrade: an id; downgrade: -1, an id or base)")
    database.add_argument("--older-than", help="prune: age of terminal runs to delete, e.g. 30d, 12h")
    database.add_argument("--dry-run", action="store_true", help="prune: only count what would go")
    database.add_argument("--batch-size", type=int, default=500, help="prune: flow runs per transaction")
    database.set_defaults(func=cmd_database)

    deployment = sub.add_parser("deployment", help="list deployments or run one (through the API)")
    deployment.add_argument("action", choices=["ls", "run"])
    deployment.add_argument("name", nargs="?", metavar="FLOW/DEPLOYMENT")
    deployment.add_argument("--param", action="append", metavar="KEY=VALUE", help="a parameter (value as JSON or text)")
    deployment.set_defaults(func=cmd_deployment)

    flow_run = sub.add_parser("flow-run", help="list flow runs or cancel one (through the API)")
    flow_run.add_argument("action", choices=["ls", "cancel"])
    flow_run.add_argument("id", nargs="?")
    flow_run.add_argument("--state", action="append", help="state type or name, e.g. FAILED or Late (repeatable)")
    flow_run.add_argument("--limit", type=int, default=20)
    flow_run.set_defaults(func=cmd_flow_run)

    work_pool = sub.add_parser("work-pool", help="list work pools (through the API)")
    work_pool.add_argument("action", choices=["ls"])
    work_pool.set_defaults(func=cmd_work_pool)

    notification = sub.add_parser("notification", help="flow run notification policies (through the API)")
    notification.add_argument("action", choices=["ls", "create", "pause", "resume", "delete"])
    notification.add_argument("id", nargs="?")
    notification.add_argument(
        "--state", action="append", help="a state name that triggers it, e.g. Failed (repeatable)"
    )
    notification.add_argument("--tag", action="append", help="only runs with this tag (repeatable; none = all runs)")
    notification.add_argument("--block", help="destination: BLOCK_TYPE_SLUG/BLOCK_NAME, e.g. slack-webhook/my-hook")
    notification.add_argument("--template", help="message template with {flow_name}, {flow_run_name}, ...")
    notification.set_defaults(func=cmd_notification)

    version = sub.add_parser("version", help="our version, the API version and the database")
    version.set_defaults(func=cmd_version)
    return parser


def run_cli(argv: list[str], out=None) -> int:
    out = out or sys.stdout
    if argv and argv[0] == "server":  # `prefect server start` / `prefect server database reset` spellings
        argv = argv[1:]
    try:
        # argparse would take `-r -1` for an option; glue the value on
        fixed = []
        for i, arg in enumerate(argv):
            if i and argv[i - 1] in ("-r", "--revision") and arg.startswith("-"):
                fixed[-1] = f"--revision={arg}"
            else:
                fixed.append(arg)
        args = build_parser().parse_args(fixed)
        configure_logging(load_settings())
        return args.func(args, out)
    except (ConfigurationError, DatabaseError) as exc:  # may quote API data (a server's detail): escaped
        print(f"prefectlite: error: {printable(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# --- 28. Main ---


def main(argv: list[str] | None = None) -> int:
    return run_cli(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
