"""Build (once, cached) a virtualenv holding the real Prefect 3.9 SDK.

The twin of prefect_venv.py (Prefect 2.20), kept separate so the two SDKs never share
a venv and each suite builds only the one it needs.

Usage:
    python tests/compat/prefect3_venv.py     # builds if needed, prints the venv's python path
    from prefect3_venv import ensure_prefect3_venv; python = ensure_prefect3_venv()

The venv lives at ${PREFECTLITE_CACHE_DIR:-~/.cache/prefectlite}/venv-prefect-3.9.
It is built in a temporary sibling directory and renamed into place only once
`python -c "import prefect"` reports a 3.9 version, so a half-built venv is never
taken as ready. A cached venv is verified the same way on every call; a broken one
is moved aside and rebuilt. Concurrent builders are serialised with a lock file.

Only the standard library is used (this runs before anything is installed).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PREFECT_REQUIREMENT = "prefect==3.9.*"
# Extra pins for transitive dependencies, added whenever a newest release breaks
# prefect 3.9 (none needed so far: its own metadata caps what it must).
EXTRA_PINS: list[str] = []

EXPECTED_PREFIX = "3.9."
VENV_NAME = "venv-prefect-3.9"
READY_MARKER = ".prefectlite-venv-ready"
INSTALL_TIMEOUT = 600  # seconds for one pip attempt
VERIFY_TIMEOUT = 120


class VenvError(RuntimeError):
    """The Prefect 3 venv could not be built or verified."""


def cache_dir() -> Path:
    base = os.environ.get("PREFECTLITE_CACHE_DIR")
    if base:
        return Path(base).expanduser()
    return Path("~/.cache/prefectlite").expanduser()


def venv_dir() -> Path:
    return cache_dir() / VENV_NAME


def _python_in(venv: Path) -> Path:
    return venv / "bin" / "python"


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    env.pop("VIRTUAL_ENV", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def verify(python: Path) -> str:
    """Return prefect's version from that python, or raise VenvError."""
    if not python.exists():
        raise VenvError(f"{python} does not exist")
    try:
        proc = subprocess.run(
            [str(python), "-c", "import prefect; print(prefect.__version__)"],
            capture_output=True,
            text=True,
            timeout=VERIFY_TIMEOUT,
            env=_clean_env(),
            cwd=str(python.parent),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VenvError(f"cannot run {python}: {exc}") from exc
    version = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not version.startswith(EXPECTED_PREFIX):
        raise VenvError(
            f"`{python} -c 'import prefect'` failed (exit {proc.returncode}, "
            f"version {version!r}):\n{proc.stderr[-3000:]}"
        )
    return version


def _is_ready(venv: Path) -> bool:
    if not (venv / READY_MARKER).exists():
        return False
    try:
        verify(_python_in(venv))
    except VenvError as exc:
        print(f"[prefect3_venv] cached venv at {venv} is broken: {exc}", file=sys.stderr)
        return False
    return True


def _rewrite_paths(bin_dir: Path, old: str, new: str) -> None:
    """Scripts in bin/ (pip, prefect, activate*) embed the venv's absolute path."""
    for f in bin_dir.iterdir():
        if f.is_symlink() or not f.is_file():
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if old in text:
            mode = f.stat().st_mode
            f.write_text(text.replace(old, new), encoding="utf-8")
            os.chmod(f, mode)


def _run(cmd: list, log, timeout: int, check: bool = True) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    try:
        proc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=_clean_env()
        )
    except subprocess.TimeoutExpired as exc:
        raise VenvError(f"timed out after {timeout}s: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        if not check:
            log.write(f"(exit {proc.returncode} ignored)\n")
            return
        raise VenvError(f"exit {proc.returncode}: {' '.join(cmd)}")


def _build(final: Path) -> None:
    parent = final.parent
    tmp = parent / f"{final.name}.tmp-{os.getpid()}-{int(time.time())}"
    log_path = parent / f"{final.name}.build.log"
    started = time.time()
    print(f"[prefect3_venv] building {final} (log: {log_path})", file=sys.stderr)
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            _run([sys.executable, "-m", "venv", "--prompt", final.name, str(tmp)], log, 300)
            py = str(_python_in(tmp))
            install = [py, "-m", "pip", "install", "--no-compile", "--disable-pip-version-check",
                       PREFECT_REQUIREMENT, *EXTRA_PINS]
            try:
                _run(install, log, INSTALL_TIMEOUT)
            except VenvError as exc:  # a registry hiccup: try once more
                log.write(f"{exc}; retrying once\n")
                time.sleep(5)
                _run(install, log, INSTALL_TIMEOUT)
            _rewrite_paths(tmp / "bin", str(tmp), str(final))
            # Byte-compile now, recording the final path in code objects (tracebacks). Some
            # dependencies ship modules only newer Pythons can compile (whenever's
            # _typing_312.py uses 3.12 syntax) and never import them here: not an error.
            _run(
                [py, "-m", "compileall", "-q", "-j", "0", "-s", str(tmp), "-p", str(final),
                 str(tmp / "lib")],
                log,
                600,
                check=False,
            )
            version = verify(_python_in(tmp))
            log.write(f"verified prefect {version}\n")
            (tmp / READY_MARKER).write_text(
                f"prefect {version}\nbuilt {time.strftime('%Y-%m-%dT%H:%M:%S')}\n",
                encoding="utf-8",
            )
        if final.exists() or final.is_symlink():
            aside = parent / f"{final.name}.broken-{os.getpid()}-{int(time.time())}"
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(tmp, final)  # the commit point: atomic on one filesystem
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, VenvError):
            try:
                tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
            except OSError:
                tail = ""
            raise VenvError(f"{exc}\n--- build log tail ({log_path}) ---\n{tail}") from None
        raise
    print(
        f"[prefect3_venv] built {final} in {time.time() - started:.0f}s", file=sys.stderr
    )


def ensure_prefect3_venv() -> str:
    """Return the path of the venv's python, building the venv first if needed."""
    final = venv_dir()
    if _is_ready(final):
        return str(_python_in(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f"{final.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another builder may be at work: wait for it
        try:
            if not _is_ready(final):
                # Holding the lock, no other builder is at work: any temp dir is a
                # leftover of a killed build.
                for stale in final.parent.glob(f"{final.name}.tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                _build(final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(_python_in(final))


def main() -> int:
    try:
        print(ensure_prefect3_venv())
    except VenvError as exc:
        print(f"[prefect3_venv] cannot build the prefect venv: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
