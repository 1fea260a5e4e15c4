"""Shared helpers for the prefectlite benchmark scripts (stdlib only).

Not a test module: tests/benchmarks/conftest.py keeps pytest from collecting anything here.
Every script talks only to the server URL it is given, which must be on loopback.
"""

from __future__ import annotations

import gzip
import http.client
import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_PREFECTLITE = os.path.join(REPO_ROOT, "prefectlite.py")
DEFAULT_URL = "http://127.0.0.1:4200/api"
DEFAULT_COMMAND = "{python} {prefectlite} start --port {port}"

SDK_HEADERS = {
    "User-Agent": "prefect/2.20.27 (API 0.8.4)",
    "X-PREFECT-API-VERSION": "0.8.4",
    "Accept": "*/*",
}

# --------------------------------------------------------------------------- URL


class Target:
    """host/port/base path of an API URL such as http://127.0.0.1:4200/api."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise SystemExit(f"only plain http:// URLs are supported, got {url!r}")
        self.url = url.rstrip("/")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.base = parts.path.rstrip("/")  # "/api"
        check_loopback(self.host)

    def with_port(self, port: int) -> "Target":
        return Target(f"http://{self.host}:{port}{self.base}")


def check_loopback(host: str) -> None:
    """Refuse to send traffic anywhere but this machine's loopback."""
    if host == "localhost":
        return
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise SystemExit(f"refusing non-loopback host {host!r}: benchmarks only target 127.0.0.0/8 or ::1") from None
    if not ip.is_loopback:
        raise SystemExit(f"refusing non-loopback host {host!r}: benchmarks only target 127.0.0.0/8 or ::1")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


# --------------------------------------------------------------------------- HTTP client


class _Stale(Exception):
    """The server closed the connection before answering (an idle keep-alive connection it timed out)."""


_STALE_ERRORS = (_Stale, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class Client:
    """One keep-alive HTTP/1.1 connection, like one SDK client.

    request() returns (status, body_bytes, seconds); status is None when the request failed with an
    exception, body is then the exception text. A request that fails because the server closed an idle
    keep-alive connection before answering is retried once on a new connection (counted in
    `reconnects`, not as an error).

    HTTP/1.1 is spoken directly on the socket (one sendall per request; Content-Length or chunked
    bodies, gzip): http.client parses every response's headers with the email package, which cost more
    CPU than a small request costs the server and made the load generator, not the server, the limit.
    """

    def __init__(self, target: Target, timeout: float = 60.0, gzip_ok: bool = True):
        self.target = target
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""
        self.reconnects = 0
        self.connects = 0
        self.last_failed = False  # the last request ended in an exception (refused, reset, timeout)
        headers = dict(SDK_HEADERS)
        if gzip_ok:
            headers["Accept-Encoding"] = "gzip"
        headers["Host"] = f"{target.host}:{target.port}"
        self.header_block = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")

    def _connect(self):
        self.sock = socket.create_connection((self.target.host, self.target.port), timeout=self.timeout)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.buf = b""
        self.connects += 1

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except Exception:  # noqa: BLE001 - closing what may be broken already
                pass
            self.sock = None

    def _fill(self, got_nothing_yet: bool = False):
        chunk = self.sock.recv(262144)
        if not chunk:
            if got_nothing_yet:
                raise _Stale("server closed the connection before answering")
            raise ConnectionResetError("server closed the connection mid-response")
        self.buf += chunk

    def _read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 2 :]
                return line
            self._fill()

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _read_response(self, method: str):
        while b"\r\n\r\n" not in self.buf:
            self._fill(got_nothing_yet=not self.buf)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        version, status_text = lines[0].split(" ", 2)[:2]
        status = int(status_text)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status in (100, 101) or (100 <= status < 200):
            return self._read_response(method)  # an interim answer: the real one follows
        if method == "HEAD" or status in (204, 304):
            data = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self._read_line().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self._read_line():  # trailers, up to the empty line
                        pass
                    break
                parts.append(self._read_exact(size))
                self._read_line()
            data = b"".join(parts)
        elif "content-length" in headers:
            data = self._read_exact(int(headers["content-length"]))
        else:  # delimited by the end of the connection
            while True:
                try:
                    self._fill()
                except ConnectionResetError:
                    break
            data, self.buf = self.buf, b""
            headers["connection"] = "close"
        if headers.get("content-encoding", "").lower() == "gzip":
            data = gzip.decompress(data)
        will_close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
        return status, data, will_close

    def request(self, method: str, path: str, body: bytes | None = None):
        head = f"{method} {self.target.base}{path} HTTP/1.1\r\n".encode("latin-1") + self.header_block
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            message = head + body
        else:
            message = head + (b"Content-Length: 0\r\n\r\n" if method in ("POST", "PUT", "PATCH") else b"\r\n")
        t0 = time.perf_counter()
        for attempt in (0, 1):
            fresh = self.sock is None
            try:
                if fresh:
                    self._connect()
                self.sock.sendall(message)
                status, data, will_close = self._read_response(method)
                if will_close:
                    self.close()
                self.last_failed = False
                return status, data, time.perf_counter() - t0
            except _STALE_ERRORS as exc:
                self.close()
                if attempt == 0 and not fresh:
                    # idle keep-alive connection closed by the server: reconnect and retry once
                    self.reconnects += 1
                    t0 = time.perf_counter()
                    continue
                self.last_failed = True
                return None, f"{type(exc).__name__}: {exc}".encode(), time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - timeout, refused, a malformed answer, ...
                self.close()
                self.last_failed = True
                return None, f"{type(exc).__name__}: {exc}".encode(), time.perf_counter() - t0
        raise AssertionError("unreachable")

    def backoff(self, seconds: float = 0.05):
        """After a connection-level failure, pause briefly instead of hammering a dead server."""
        if self.last_failed:
            time.sleep(seconds)


def get_json(target: Target, method: str, path: str, payload=None, timeout: float = 30.0):
    """One-off request on its own connection; returns (status, parsed-or-raw)."""
    c = Client(target, timeout=timeout)
    body = None if payload is None else json.dumps(payload).encode()
    status, data, _ = c.request(method, path, body)
    c.close()
    try:
        return status, json.loads(data) if data else None
    except ValueError:
        return status, data.decode(errors="replace")


def health_once(host: str, port: int, base: str = "/api", timeout: float = 1.0) -> int | None:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.request("GET", base + "/health", headers=SDK_HEADERS)
        r = conn.getresponse()
        r.read()
        conn.close()
        return r.status
    except Exception:  # noqa: BLE001 - no answer is an answer: the caller counts it
        return None


def wait_health(
    host: str,
    port: int,
    base: str,
    deadline_s: float,
    proc: subprocess.Popen | None = None,
    poll_interval: float = 0.002,
) -> float | None:
    """Poll GET {base}/health until a 200; return perf_counter() at that moment, or None on timeout/exit."""
    end = time.perf_counter() + deadline_s
    while time.perf_counter() < end:
        if health_once(host, port, base, timeout=1.0) == 200:
            return time.perf_counter()
        if proc is not None and proc.poll() is not None:
            return None
        time.sleep(poll_interval)
    return None


# --------------------------------------------------------------------------- statistics


def pct(sorted_vals, p: float) -> float:
    """Nearest-rank percentile of an already sorted list (p in 0..100)."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


class Stats:
    """Per-thread collector; merge() them at the end (no lock on the hot path)."""

    def __init__(self, max_samples: int = 5):
        self.lat: dict[str, list[float]] = {}
        self.errors: Counter = Counter()
        self.samples: list[dict] = []
        self.max_samples = max_samples
        self.ok = 0
        self.count = 0

    def add(self, op: str, status, seconds: float, method: str = "", path: str = "", body=None, req=None):
        self.count += 1
        self.lat.setdefault(op, []).append(seconds)
        if status is not None and 200 <= status < 300:
            self.ok += 1
            return True
        key = (
            str(status)
            if status is not None
            else (body.decode(errors="replace").split(":")[0] if body else "exception")
        )
        self.errors[key] += 1
        if len(self.samples) < self.max_samples:
            self.samples.append(
                {
                    "op": op,
                    "method": method,
                    "path": path,
                    "status": status,
                    "request": (req[:600].decode(errors="replace") if isinstance(req, (bytes, bytearray)) else req),
                    "response": (body[:800].decode(errors="replace") if isinstance(body, (bytes, bytearray)) else body),
                }
            )
        return False

    def error(self, key: str, sample: dict | None = None):
        self.errors[key] += 1
        if sample and len(self.samples) < self.max_samples:
            self.samples.append(sample)

    def merge(self, other: "Stats"):
        for op, v in other.lat.items():
            self.lat.setdefault(op, []).extend(v)
        self.errors.update(other.errors)
        for s in other.samples:
            if len(self.samples) < self.max_samples:
                self.samples.append(s)
        self.ok += other.ok
        self.count += other.count

    def all_latencies(self):
        out = []
        for v in self.lat.values():
            out.extend(v)
        out.sort()
        return out


def summarize(lat_sorted) -> dict:
    return {
        "p50_ms": round(pct(lat_sorted, 50) * 1000, 2),
        "p90_ms": round(pct(lat_sorted, 90) * 1000, 2),
        "p99_ms": round(pct(lat_sorted, 99) * 1000, 2),
        "max_ms": round((lat_sorted[-1] if lat_sorted else float("nan")) * 1000, 2),
    }


# --------------------------------------------------------------------------- output


def print_table(headers, rows, out=sys.stdout):
    cols = [str(h) for h in headers]
    srows = [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(cols[i]), *(len(r[i]) for r in srows)) if srows else len(cols[i]) for i in range(len(cols))]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(cols, widths)))
    print(line, file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in srows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))), file=out)


def fmt_errors(errors: Counter) -> str:
    if not errors:
        return "0"
    return ", ".join(f"{k}:{v}" for k, v in errors.most_common())


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def client_cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- SDK-shaped bodies


def now_iso(dt: datetime | None = None) -> str:
    return (dt or datetime.now(timezone.utc)).isoformat()


def state_details(
    flow_run_id=None,
    task_run_id=None,
    scheduled_time=None,
    transition_id=None,
    untrackable_result=False,
    refresh_cache=None,
):
    return {
        "flow_run_id": flow_run_id,
        "task_run_id": task_run_id,
        "child_flow_run_id": None,
        "scheduled_time": scheduled_time,
        "cache_key": None,
        "cache_expiration": None,
        "untrackable_result": untrackable_result,
        "pause_timeout": None,
        "pause_reschedule": False,
        "pause_key": None,
        "run_input_keyset": None,
        "refresh_cache": refresh_cache,
        "retriable": None,
        "transition_id": transition_id,
        "task_parameters_id": None,
    }


STATE_NAMES = {
    "PENDING": "Pending",
    "RUNNING": "Running",
    "COMPLETED": "Completed",
    "FAILED": "Failed",
    "SCHEDULED": "Scheduled",
    "CANCELLED": "Cancelled",
    "CRASHED": "Crashed",
}


def result_data(kind="int"):
    return {
        "type": "unpersisted",
        "artifact_type": "result",
        "artifact_description": f"Unpersisted result of type `{kind}`",
    }


def flow_create_body(name: str) -> bytes:
    return json.dumps({"name": name, "tags": []}, separators=(",", ":")).encode()


def flow_run_create_body(
    flow_id: str,
    state_type="PENDING",
    scheduled_time=None,
    tags=None,
    parameters=None,
    flow_version="13db9ab345c4bb1381ae8249c0a70d68",
) -> bytes:
    st = {
        "type": state_type,
        "name": STATE_NAMES.get(state_type, state_type.title()),
        "message": None,
        "state_details": state_details(scheduled_time=scheduled_time),
        "data": None,
    }
    return json.dumps(
        {
            "state": st,
            "name": None,
            "flow_id": flow_id,
            "deployment_id": None,
            "flow_version": flow_version,
            "parameters": {"n": 3} if parameters is None else parameters,
            "context": {},
            "parent_task_run_id": None,
            "infrastructure_document_id": None,
            "empirical_policy": {
                "max_retries": 0,
                "retry_delay_seconds": 0,
                "retries": 0,
                "retry_delay": 0,
                "pause_keys": [],
                "resuming": False,
                "retry_type": None,
            },
            "tags": tags or [],
            "idempotency_key": None,
        },
        separators=(",", ":"),
    ).encode()


def flow_run_set_state_body(flow_run_id: str, state_type: str, force=False, data=None) -> bytes:
    st = {
        "type": state_type,
        "name": STATE_NAMES.get(state_type, state_type.title()),
        "message": None,
        "state_details": state_details(flow_run_id=flow_run_id, transition_id=str(uuid.uuid4())),
        "data": data,
    }
    return json.dumps({"state": st, "force": force}, separators=(",", ":")).encode()


def task_run_create_body(flow_run_id: str, name: str, task_key: str, dynamic_key="0", task_inputs=None) -> bytes:
    st = {"type": "PENDING", "name": "Pending", "message": None, "state_details": state_details(), "data": None}
    return json.dumps(
        {
            "state": st,
            "name": name,
            "flow_run_id": flow_run_id,
            "task_key": task_key,
            "dynamic_key": dynamic_key,
            "cache_key": None,
            "cache_expiration": None,
            "task_version": None,
            "empirical_policy": {
                "max_retries": 0,
                "retry_delay_seconds": 0,
                "retries": 0,
                "retry_delay": 0,
                "retry_jitter_factor": None,
            },
            "tags": [],
            "task_inputs": task_inputs or {},
        },
        separators=(",", ":"),
    ).encode()


def task_run_set_state_body(task_run_id: str, state_type: str) -> bytes:
    if state_type == "RUNNING":
        sd = state_details(task_run_id=task_run_id, refresh_cache=False)
        data = None
    else:
        sd = state_details(task_run_id=task_run_id, untrackable_result=True)
        data = result_data("list")
    st = {
        "type": state_type,
        "name": STATE_NAMES.get(state_type, state_type.title()),
        "message": None,
        "state_details": sd,
        "data": data,
    }
    return json.dumps({"state": st, "force": False}, separators=(",", ":")).encode()


def logs_body(flow_run_id: str, task_run_ids, n: int, start: datetime | None = None) -> bytes:
    t = start or datetime.now(timezone.utc)
    out = []
    for i in range(n):
        tr = task_run_ids[i % len(task_run_ids)] if task_run_ids and i % 2 == 1 else None
        if tr is None:
            out.append(
                {
                    "name": "prefect.flow_runs",
                    "level": 20,
                    "message": f"Created task run 'task-{i}-0' for task 'task-{i}'",
                    "timestamp": (t + timedelta(microseconds=731 * i)).isoformat(),
                    "flow_run_id": flow_run_id,
                    "task_run_id": None,
                }
            )
        else:
            out.append(
                {
                    "name": "prefect.task_runs",
                    "level": 20 if i % 3 else 30,
                    "message": "Finished in state Completed()" if i % 3 else f"loaded [{i}, {i * 10}, {i * 100}]",
                    "timestamp": (t + timedelta(microseconds=731 * i)).isoformat(),
                    "flow_run_id": flow_run_id,
                    "task_run_id": tr,
                }
            )
    return json.dumps(out, separators=(",", ":")).encode()


TASK_DEFS = [("extract", "extract-e323d082"), ("transform", "transform-e8315c13"), ("load", "load-26645a3e")]


def parse_id(data: bytes):
    try:
        return json.loads(data)["id"]
    except Exception:  # noqa: BLE001 - no answer is an answer: the caller counts it
        return None


def parse_orch_status(data: bytes):
    try:
        return json.loads(data).get("status")
    except Exception:  # noqa: BLE001 - no answer is an answer: the caller counts it
        return None


# --------------------------------------------------------------------------- server processes


def build_command(template: str, port: int, home: str, prefectlite: str = DEFAULT_PREFECTLITE) -> str:
    return template.format(
        port=port,
        home=home,
        python=sys.executable,
        prefectlite=prefectlite,
        repo=os.path.dirname(os.path.abspath(prefectlite)),
        db=os.path.join(home, "prefect.db"),
    )


def server_env(home: str, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PREFECT_HOME"] = home
    # a fresh PREFECT_HOME must mean a fresh database: drop an inherited database URL / profile
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    env.pop("PREFECT_PROFILES_PATH", None)
    env.pop("PREFECT_API_URL", None)
    # the reference server: no telemetry pings, no UI build copy noise
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if extra:
        env.update(extra)
    return env


def start_server(
    command: str, home: str, log_path: str | None = None, env_extra: dict | None = None
) -> subprocess.Popen:
    """Start `command` (shell syntax) in its own session so its whole tree can be stopped."""
    if not any(op in command for op in ("&&", "||", ";", "|", "\n")) and not command.lstrip().startswith("exec "):
        command = "exec " + command  # no intermediate shell: the root pid is the server itself
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            command,
            shell=True,
            env=server_env(home, env_extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        if log_path:
            out.close()


def stop_server(proc: subprocess.Popen, grace: float = 10.0) -> float:
    """SIGTERM the process group we created, SIGKILL after `grace`; return seconds taken."""
    t0 = time.perf_counter()
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    # children that outlived the shell (same process group): wait for them, then make sure they are gone
    end = time.perf_counter() + grace
    while time.perf_counter() < end:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.01)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return time.perf_counter() - t0


def wait_port_free(host: str, port: int, timeout: float = 15.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if not port_in_use(host, port):
            return True
        time.sleep(0.05)
    return False


def fresh_home(prefix="prefectlite-bench-") -> str:
    return tempfile.mkdtemp(prefix=prefix)


# --------------------------------------------------------------------------- /proc memory


def _children_map():
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
            ppid = int(raw[raw.rfind(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def process_tree(root: int) -> list[int]:
    kids = _children_map()
    out, stack = [], [root]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(kids.get(p, []))
    return out


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory(root: int) -> dict:
    """Sum of VmRSS (and VmHWM, the per-process peak) over the process tree rooted at `root`, in MB."""
    pids = process_tree(root)
    procs = []
    rss = hwm = 0
    for p in pids:
        r = _status_kb(p, "VmRSS")
        h = _status_kb(p, "VmHWM")
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:100]
        except OSError:
            cmd = "?"
        procs.append({"pid": p, "rss_mb": round(r / 1024, 1), "cmd": cmd})
        rss += r
        hwm += h
    return {"rss_mb": round(rss / 1024, 1), "hwm_mb": round(hwm / 1024, 1), "processes": procs}


def tree_cpu_seconds(root: int) -> float:
    """user+system CPU seconds consumed so far by the process tree rooted at `root` (from /proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(root):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
            fields = raw[raw.rfind(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            pass
    return total / tick


def rng(seed: int | None = None) -> random.Random:
    return random.Random(seed)
