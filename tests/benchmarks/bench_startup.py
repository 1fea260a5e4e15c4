#!/usr/bin/env python3
"""Startup time: from launching the server to the first 200 on GET /api/health.

(a) command mode: launch a command template (default `{python} {prefectlite} start --port {port}`) with a
    fresh PREFECT_HOME (so a new SQLite file) each time, poll /api/health every 2 ms, stop the server, repeat
    --repeat times (default 5); min/median/max. Any template with {port} works, e.g. the reference server:
        --command '/tmp/benchvenv/bin/prefect server start --host 127.0.0.1 --port {port}'
    Placeholders: {port}, {home} (the fresh PREFECT_HOME), {db} ({home}/prefect.db), {python}, {prefectlite},
    {repo} (the folder holding prefectlite.py).
(b) in-process mode: in a fresh interpreter, `import prefectlite` then, --repeat times,
        with prefectlite.serve(database="sqlite:///:memory:", port=0) as url: ...
    timing the entry into the context (the server is then ready) and the first 200 on {url}/health.

Targets: (a) < 0.3 s, (b) < 0.05 s.

    python tests/benchmarks/bench_startup.py --url http://127.0.0.1:4200/api
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as B  # noqa: E402


def mmm(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {
        "min": round(min(vals), 4),
        "median": round(statistics.median(vals), 4),
        "max": round(max(vals), 4),
        "n": len(vals),
    }


def command_mode(args, target: B.Target) -> dict:
    port = target.port
    runs, failures = [], []
    for i in range(args.repeat):
        if B.port_in_use(target.host, port):
            if not B.wait_port_free(target.host, port, 15):
                sys.exit(f"port {port} is in use on {target.host}: pick another with --url")
        home = B.fresh_home()
        cmd = B.build_command(args.command, port, home, args.prefectlite)
        logf = os.path.join(home, "server.log")
        t0 = time.perf_counter()
        proc = B.start_server(cmd, home, logf)
        t_ok = B.wait_health(target.host, port, target.base, args.timeout, proc)
        entry = {"run": i + 1, "command": cmd}
        if t_ok is None:
            entry["error"] = (
                ("server exited with code %s" % proc.returncode)
                if proc.poll() is not None
                else f"no 200 on /health within {args.timeout}s"
            )
            try:
                with open(logf, "rb") as f:
                    entry["log_tail"] = f.read()[-1500:].decode(errors="replace")
            except OSError:
                pass
            failures.append(entry)
        else:
            entry["to_health_s"] = round(t_ok - t0, 4)
            # CPU the server used until it was ready: less sensitive than wall time to a busy machine
            entry["cpu_s"] = round(B.tree_cpu_seconds(proc.pid), 3)
            entry["db_files"] = sorted(f for f in os.listdir(home) if f.endswith(".db"))
        entry["stop_s"] = round(B.stop_server(proc), 3)
        runs.append(entry)
        B.log(
            f"  run {i + 1}: " + (f"{entry['to_health_s'] * 1000:.1f} ms" if "to_health_s" in entry else entry["error"])
        )
        if not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)
        B.wait_port_free(target.host, port, 15)
    return {
        "mode": "command",
        "template": args.command,
        "runs": runs,
        "to_health_s": mmm([r.get("to_health_s") for r in runs]),
        "cpu_s": mmm([r.get("cpu_s") for r in runs]),
        "stop_s": mmm([r.get("stop_s") for r in runs]),
        "failures": len(failures),
        "load_avg_1m": os.getloadavg()[0],
    }


INPROC_WORKER = r"""
import json, sys, time, http.client
from urllib.parse import urlsplit
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import prefectlite
t_import = time.perf_counter() - t0
repeat, database = int(sys.argv[2]), sys.argv[3]
runs = []
for i in range(repeat):
    rec = {}
    try:
        t0 = time.perf_counter()
        cm = prefectlite.serve(database=database, port=0)
        url = cm.__enter__()
        t_enter = time.perf_counter()
        rec["enter_s"] = t_enter - t0
        try:
            u = urlsplit(str(url))
            if u.hostname not in ("127.0.0.1", "localhost", "::1"):
                raise SystemExit("serve() returned a non-loopback URL: %r" % (url,))
            deadline = time.perf_counter() + 10
            status = None
            while time.perf_counter() < deadline:
                try:
                    c = http.client.HTTPConnection(u.hostname, u.port, timeout=2)
                    c.request("GET", u.path.rstrip("/") + "/health")
                    r = c.getresponse(); r.read(); c.close()
                    status = r.status
                    if status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.001)
            rec["health_status"] = status
            rec["to_health_s"] = (time.perf_counter() - t0) if status == 200 else None
            rec["url"] = str(url)
        finally:
            t1 = time.perf_counter()
            cm.__exit__(None, None, None)
            rec["exit_s"] = time.perf_counter() - t1
    except Exception as exc:
        rec["error"] = "%s: %s" % (type(exc).__name__, exc)
    runs.append(rec)
print("@@RESULT@@" + json.dumps({"import_s": t_import, "runs": runs}))
"""


def inprocess_mode(args) -> dict:
    pl = os.path.abspath(args.prefectlite)
    if not os.path.exists(pl):
        return {"mode": "inprocess", "error": f"{pl} not found"}
    cmd = [sys.executable, "-c", INPROC_WORKER, os.path.dirname(pl), str(args.repeat), args.database]
    home = B.fresh_home()
    t0 = time.perf_counter()
    try:
        cp = subprocess.run(
            cmd,
            capture_output=True,
            timeout=args.timeout + 10 * args.repeat,
            cwd=os.path.dirname(pl),
            env=B.server_env(home),
        )
    except subprocess.TimeoutExpired:
        return {"mode": "inprocess", "error": "timed out"}
    finally:
        if not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)
    wall = time.perf_counter() - t0
    out = cp.stdout.decode(errors="replace")
    if "@@RESULT@@" not in out:
        return {
            "mode": "inprocess",
            "error": f"worker exited {cp.returncode}",
            "stderr_tail": cp.stderr.decode(errors="replace")[-1500:],
        }
    res = json.loads(out.split("@@RESULT@@", 1)[1].strip().splitlines()[0])
    runs = res["runs"]
    for i, r in enumerate(runs):
        B.log(
            f"  serve() {i + 1}: "
            + (
                f"enter {r['enter_s'] * 1000:.1f} ms, health {r['to_health_s'] * 1000:.1f} ms"
                if r.get("to_health_s") is not None
                else r.get("error", str(r))
            )
        )
    return {
        "mode": "inprocess",
        "database": args.database,
        "import_s": round(res["import_s"], 4),
        "enter_s": mmm([r.get("enter_s") for r in runs]),
        "to_health_s": mmm([r.get("to_health_s") for r in runs]),
        "exit_s": mmm([r.get("exit_s") for r in runs]),
        "failures": sum(1 for r in runs if r.get("to_health_s") is None),
        "worker_wall_s": round(wall, 3),
        "runs": runs,
        "stderr_tail": cp.stderr.decode(errors="replace")[-800:] if cp.returncode else "",
    }


def ms(v):
    return "-" if v is None else f"{v * 1000:.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--url",
        default=B.DEFAULT_URL,
        help="where the launched server listens: host and port are taken from it (default %(default)s)",
    )
    ap.add_argument(
        "--mode",
        choices=["command", "inprocess", "both"],
        default=None,
        help="default: both for prefectlite, command only when --command is given",
    )
    ap.add_argument("--command", default=None, help=f"command template (default {B.DEFAULT_COMMAND!r})")
    ap.add_argument("--prefectlite", default=B.DEFAULT_PREFECTLITE, help="path to prefectlite.py")
    ap.add_argument("--repeat", type=int, default=5, help="repetitions (default 5)")
    ap.add_argument("--timeout", type=float, default=60.0, help="give up waiting for health after this many s")
    ap.add_argument("--database", default="sqlite:///:memory:", help="database= for the in-process serve()")
    ap.add_argument("--keep-home", action="store_true", help="keep the temporary PREFECT_HOME directories")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    args = ap.parse_args(argv)
    if not 1 <= args.repeat <= 50:
        ap.error("--repeat must be 1..50")
    mode = args.mode or ("command" if args.command else "both")
    if args.command is None:
        args.command = B.DEFAULT_COMMAND
    if "{port}" not in args.command:
        ap.error("--command must contain {port}")
    target = B.Target(args.url)

    results = []
    if mode in ("command", "both"):
        B.log(f"command mode: {args.command} (port {target.port}), {args.repeat} runs")
        results.append(command_mode(args, target))
    if mode in ("inprocess", "both"):
        B.log(f"in-process mode: prefectlite.serve(database={args.database!r}, port=0), {args.repeat} runs")
        results.append(inprocess_mode(args))

    out = {"benchmark": "startup", "results": results, "argv": " ".join(sys.argv)}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    rows = []
    for r in results:
        if r["mode"] == "command":
            h = r["to_health_s"]
            rows.append(
                [
                    "start -> first 200 /health",
                    h["n"],
                    ms(h["min"]),
                    ms(h["median"]),
                    ms(h["max"]),
                    r["failures"],
                    "< 300",
                ]
            )
            c = r["cpu_s"]
            rows.append(["  server CPU until ready", c["n"], ms(c["min"]), ms(c["median"]), ms(c["max"]), "", ""])
            s = r["stop_s"]
            rows.append(["  stop (SIGTERM -> exit)", s["n"], ms(s["min"]), ms(s["median"]), ms(s["max"]), "", ""])
        elif "error" in r:
            rows.append(["serve(): " + r["error"], 0, "-", "-", "-", "", "< 50"])
        else:
            rows.append(
                ["import prefectlite (once)", 1, ms(r["import_s"]), ms(r["import_s"]), ms(r["import_s"]), "", ""]
            )
            for key, label, tgt in (
                ("enter_s", "serve() context entered", "< 50"),
                ("to_health_s", "serve() -> first 200 /health", "< 50"),
                ("exit_s", "  serve() context exit", ""),
            ):
                v = r[key]
                rows.append(
                    [
                        label,
                        v["n"],
                        ms(v["min"]),
                        ms(v["median"]),
                        ms(v["max"]),
                        r["failures"] if key == "to_health_s" else "",
                        tgt,
                    ]
                )
    for r in results:
        if r["mode"] == "command":
            print(f"command: {r['template']}  (1-min load average {r['load_avg_1m']:.1f} on {os.cpu_count()} CPUs)")
    B.print_table(["measure", "n", "min ms", "median ms", "max ms", "failed", "target ms"], rows)
    for r in results:
        if r["mode"] == "command":
            for run in r["runs"]:
                if "error" in run:
                    print(f"\nrun {run['run']} failed: {run['error']}\n{run.get('log_tail', '')}")
        elif r.get("stderr_tail") or any("error" in x for x in r.get("runs", [])):
            errs = [x["error"] for x in r.get("runs", []) if "error" in x]
            print(f"\nin-process errors: {errs[:3]}\n{r.get('stderr_tail', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
