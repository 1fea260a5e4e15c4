"""The benchmark scripts of tests/benchmarks/ work: run small against a real server, they speak HTTP
correctly (their own client), count what they did and report no errors. No figure is judged here: speed
is measured by running the scripts by hand (tests/benchmarks/README.md)."""

import json
import shutil
import subprocess
import sys

import pytest

import prefectlite
from helpers import ROOT, Client

BENCH = ROOT / "tests" / "benchmarks"


def _run(script, *args, timeout=120):
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--json"], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_write_load_script_makes_the_sdks_calls_without_errors(tmp_path):
    with prefectlite.serve(database=f"sqlite:///{tmp_path}/bench.db") as api_url:
        report = _run("bench_write_load.py", "--url", api_url, "--clients", "1,3", "--runs", "6")
        client = Client(api_url)
        flow_runs = client.ok("POST", "/flow_runs/count", {})
        task_runs = client.ok("POST", "/task_runs/count", {})
        logs = client.ok("POST", "/logs/filter", {"limit": 200})
    levels = report["levels"]
    assert [level["clients"] for level in levels] == [1, 3]
    for level in levels:
        assert level["errors"] == {} and level["requests"] >= 6 * 13
    assert flow_runs == 12 and task_runs == 36 and len(logs) == 12 * 5


def test_read_load_script_seeds_and_queries_without_errors(tmp_path):
    with prefectlite.serve(database=f"sqlite:///{tmp_path}/bench.db") as api_url:
        report = _run("bench_read_load.py", "--url", api_url, "--seed", "60", "--clients", "2", "--duration", "1")
    assert report["seed"]["errors"] == {} and report["seed"]["runs_created"] == 60
    assert report["flow_runs_on_server"] == 60
    queries = report["queries"]
    assert {q["query"] for q in queries} == {"filter", "count", "history"}
    for query in queries:
        assert query["errors"] == {} and query["requests"] > 0


def test_ab_script_compares_builds(tmp_path):
    """Two builds alternated: here the same folder, once as one process and once with --processes 2."""
    two = f"{ROOT}::--processes 2"
    report = _run("bench_ab.py", "--builds", f"{ROOT},{two}", "--clients", "2", "--duration", "1", "--rounds", "1")
    assert set(report["results"]) == {str(ROOT), two}
    for runs in report["results"].values():
        assert len(runs) == 1 and runs[0]["errors"] == 0 and runs[0]["req_per_s"] > 0
        assert runs[0]["server_cpu_us_per_req"] > 0  # the server's processes were found and their CPU read


def test_pg_servers_script_runs_two_servers_on_one_postgres_within_their_pools(postgres_url):
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed")
    psql = f"psql {postgres_url} -c 'select 1'"
    report = _run(
        "bench_pg_servers.py",
        "--postgres-url",
        postgres_url,
        "--psql",
        psql,
        "--clients",
        "3",
        "--duration",
        "1",
        "--pool-size",
        "1",
        "--max-overflow",
        "1",
        timeout=180,
    )
    assert report["ok"] and len(report["servers"]) == 2
    for server in report["servers"]:
        assert server["errors"] == {} and server["requests"] > 0
        assert server["most_connections"] <= 2 and server["idle_connections"] <= 1
    assert report["psql_during"]["refused"] == 0 and report["psql_after"]["connected"]
