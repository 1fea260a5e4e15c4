"""Packaging: prefectlite.py imports only the standard library at module level, and `pip install .`
gives a working `prefectlite` command that finds its migrations/ and static/ folders.

NOTE: test_pip_install_gives_a_working_command builds and installs the package into a fresh virtual
environment (pip fetches the build backend, hatchling, from the package index). It takes about 30-60 s.
It is skipped only when a virtual environment cannot be created at all (no venv/ensurepip); any other
problem is a failure.
"""

import ast
import re
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import prefectlite
from helpers import ROOT, free_port, wait_for_health

MODULE = ROOT / "prefectlite.py"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def _module_level_imports(tree):
    """Top-level module names imported outside any function (class bodies and if/try blocks count)."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True)
                continue
            if not in_function:
                if isinstance(child, ast.Import):
                    found.extend((alias.name.split(".")[0], child.lineno) for alias in child.names)
                elif isinstance(child, ast.ImportFrom):
                    if child.level:  # relative import: there is no package to be relative to
                        found.append(("." * child.level + (child.module or ""), child.lineno))
                    else:
                        found.append((child.module.split(".")[0], child.lineno))
            visit(child, in_function)

    visit(tree, False)
    return found


def _dynamic_imports(tree):
    """__import__('x') / importlib.import_module('x') calls outside functions."""
    calls = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True)
                continue
            if not in_function and isinstance(child, ast.Call):
                func = child.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name in ("__import__", "import_module"):
                    calls.append(child.lineno)
            visit(child, in_function)

    visit(tree, False)
    return calls


def test_module_level_imports_are_stdlib_only():
    tree = ast.parse(MODULE.read_text(encoding="utf-8"), filename=str(MODULE))
    imports = _module_level_imports(tree)
    assert imports, "found no imports at all; is the parser looking at the right file?"
    offenders = [(name, line) for name, line in imports if name not in STDLIB]
    assert offenders == [], f"non-stdlib imports at module level: {offenders}"
    assert _dynamic_imports(tree) == [], "dynamic imports at module level"


def test_import_works_without_site_packages(tmp_path):
    """Importing the module with site-packages disabled (-S -I) works: no third-party module is needed."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import prefectlite; "
        "std = set(sys.stdlib_module_names) | {'__main__', 'prefectlite'}; "
        "extra = sorted({m.split('.')[0] for m in sys.modules} - std); "
        "print(','.join(extra))"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-I", "-c", code, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PREFECT_HOME": str(tmp_path / "home"), "PATH": os.environ.get("PATH", "")},
    )
    assert proc.returncode == 0, proc.stderr
    extra = [m for m in proc.stdout.strip().split(",") if m and not m.startswith("_")]
    assert extra == [], f"importing prefectlite loaded non-stdlib modules: {extra}"


def test_sqlite_server_runs_without_site_packages(tmp_path):
    """The whole SQLite path (migrate + version) works with only the standard library available."""
    env = {"PREFECT_HOME": str(tmp_path / "home"), "PATH": os.environ.get("PATH", "")}
    for args in (["database", "upgrade", "-y"], ["version"]):
        proc = subprocess.run(
            [sys.executable, "-S", "-I", str(MODULE), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "home" / "prefectlite.db").is_file()


# ---------------------------------------------------------------------------------------------
# pip install .


def _make_venv(path):
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"cannot create a virtual environment here: {exc}")
    proc = subprocess.run([sys.executable, "-m", "venv", str(path)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("ensurepip" in proc.stderr + proc.stdout):
        pytest.skip(f"cannot create a virtual environment here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    bindir = path / ("Scripts" if os.name == "nt" else "bin")
    return bindir


def _venv_env(bindir, home, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT") and k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = str(bindir) + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(bindir.parent)
    env["PREFECT_HOME"] = str(home)
    env.update(extra)
    return env


def test_pip_install_gives_a_working_command(tmp_path):
    venv_dir = tmp_path / "venv"
    bindir = _make_venv(venv_dir)
    python = bindir / "python"

    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=_venv_env(bindir, tmp_path / "pip-home"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    command = bindir / "prefectlite"
    assert command.is_file(), "pip install did not create the prefectlite command"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    home = tmp_path / "fresh-home"
    env = _venv_env(bindir, home)

    # the installed copy, not the checkout, is what runs
    where = subprocess.run(
        [str(python), "-c", "import prefectlite, sys; print(prefectlite.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=elsewhere,
        env=env,
    )
    assert where.returncode == 0, where.stderr
    installed = Path(where.stdout.strip()).resolve()
    assert "site-packages" in installed.parts and venv_dir.resolve() in installed.parents, installed
    assert ROOT not in installed.parents

    site_packages = installed.parent
    assert (site_packages / "prefectlite_data" / "migrations").is_dir()
    assert (site_packages / "prefectlite_data" / "static").is_dir()
    assert sorted(
        p.name for p in (site_packages / "prefectlite_data" / "migrations").iterdir() if p.suffix == ".sql"
    ) == sorted(p.name for p in (ROOT / "migrations").iterdir() if p.suffix == ".sql")
    assert (site_packages / "prefectlite_data" / "static" / "index.html").is_file()

    upgrade = subprocess.run(
        [str(command), "database", "upgrade", "-y"], capture_output=True, text=True, timeout=120, cwd=elsewhere, env=env
    )
    assert upgrade.returncode == 0, upgrade.stderr
    assert (home / "prefectlite.db").is_file()

    version = subprocess.run(
        [str(command), "version"], capture_output=True, text=True, timeout=120, cwd=elsewhere, env=env
    )
    assert version.returncode == 0, version.stderr
    import prefectlite

    assert prefectlite.__version__ in version.stdout and "0.8.4" in version.stdout
    assert "sqlite" in version.stdout.lower()

    current = subprocess.run(
        [str(command), "database", "current"], capture_output=True, text=True, timeout=120, cwd=elsewhere, env=env
    )
    assert current.returncode == 0, current.stderr
    assert current.stdout.strip() == prefectlite.list_revisions()[-1].id

    # a started installed server serves the UI at / and the API
    port = free_port()
    log_path = tmp_path / "installed-server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [str(command), "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=elsewhere,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            assert wait_for_health(f"http://127.0.0.1:{port}/api", timeout=60), log_path.read_text()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=10) as resp:
                assert resp.status == 200 and resp.read().strip() == b"true"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
                assert resp.status == 200
                body = resp.read()
            assert body == (site_packages / "prefectlite_data" / "static" / "index.html").read_bytes()
            server.send_signal(signal.SIGTERM)
            assert server.wait(30) == 0, log_path.read_text()
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(30)


def test_readme_lists_every_setting():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [name for name in prefectlite.SETTINGS if f"`{name}`" not in readme]
    assert not missing, f"settings missing from README.md's table: {missing}"


def test_ci_runs_exactly_the_readme_test_command():
    """The README's test command is its pytest lines (the project's tests, then Prefect's suites): .ci/run runs
    each of them as written, in that order."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"^(python3 -m pytest [^#\n]*?)\s*(?:#.*)?$", readme, re.M)  # each up to its comment
    assert len(commands) == 2, f"README.md gives {commands} as its test command"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert all(command in ci_lines for command in commands), (commands, ci_lines[-3:])
    assert ci_lines.index(commands[0]) < ci_lines.index(commands[1])
    assert "tests/conformance" in commands[1] and "--ignore=tests/conformance" in commands[0]
