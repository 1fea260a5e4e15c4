"""Build (once, cached) a virtualenv holding a real Prefect SDK: 2.20 here, 3.9 in prefect3_venv.py.

Usage:
    python tests/compat/prefect_venv.py      # builds if needed, prints the venv's python path
    from prefect_venv import ensure_prefect_venv; python = ensure_prefect_venv()

The venv lives at ${PREFECTLITE_CACHE_DIR:-~/.cache/prefectlite}/venv-prefect-2.20 (3.9: venv-prefect-3.9).
It is built in a temporary sibling directory and renamed into place only once
`python -c "import prefect"` reports the expected version, so a half-built venv is never
taken as ready. A cached venv is verified the same way when this script runs (as .ci/run does before the
tests); inside the tests, where each pytest worker asks, a cheaper check does (its ready marker, its python and
prefect's installed metadata: an import costs 1-2 s of CPU a worker). A broken one is moved aside and rebuilt.
Concurrent builders are serialised with a lock file.

Only the standard library is used (this runs before anything is installed).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Sdk:
    requirement: str  # what pip installs
    version_prefix: str  # what `prefect.__version__` must start with
    venv_name: str
    # Extra pins for transitive dependencies, added whenever a newest release breaks the SDK.
    extra_pins: tuple = ()
    # Some packages ship files for newer Pythons that never compile here (3.9's `whenever`).
    compile_errors_fatal: bool = True


# None needed as of prefect 2.20.27: its own metadata already caps websockets<14, pydantic<2.13,
# sqlalchemy<2.0.36, typer<0.24, click<8.4, ...; the suite passes with the newest those caps allow.
PREFECT2 = Sdk("prefect==2.20.*", "2.20.", "venv-prefect-2.20")

READY_MARKER = ".prefectlite-venv-ready"
INSTALL_TIMEOUT = 600  # seconds for one pip attempt
VERIFY_TIMEOUT = 120


class VenvError(RuntimeError):
    """The Prefect venv could not be built or verified."""


def cache_dir() -> Path:
    base = os.environ.get("PREFECTLITE_CACHE_DIR")
    if base:
        return Path(base).expanduser()
    return Path("~/.cache/prefectlite").expanduser()


def venv_dir(sdk: Sdk = PREFECT2) -> Path:
    return cache_dir() / sdk.venv_name


def _python_in(venv: Path) -> Path:
    return venv / "bin" / "python"


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    env.pop("VIRTUAL_ENV", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def verify(python: Path, sdk: Sdk = PREFECT2) -> str:
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
    if proc.returncode != 0 or not version.startswith(sdk.version_prefix):
        raise VenvError(
            f"`{python} -c 'import prefect'` failed (exit {proc.returncode}, "
            f"version {version!r}):\n{proc.stderr[-3000:]}"
        )
    return version


def _installed_version(venv: Path) -> str:
    """prefect's version as pip recorded it in the venv (its dist-info directory), or ""."""
    for dist_info in venv.glob("lib/python3*/site-packages/prefect-*.dist-info"):
        if (dist_info / "METADATA").is_file():
            return dist_info.name[len("prefect-") : -len(".dist-info")]
    return ""


def _is_ready(venv: Path, sdk: Sdk, import_check: bool = True) -> bool:
    if not (venv / READY_MARKER).exists():
        return False
    if not import_check:
        return _python_in(venv).exists() and _installed_version(venv).startswith(sdk.version_prefix)
    try:
        verify(_python_in(venv), sdk)
    except VenvError as exc:
        print(f"[prefect_venv] cached venv at {venv} is broken: {exc}", file=sys.stderr)
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
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=_clean_env())
    except subprocess.TimeoutExpired as exc:
        raise VenvError(f"timed out after {timeout}s: {' '.join(cmd)}") from exc
    if proc.returncode != 0 and not check:
        log.write(f"(exit {proc.returncode} ignored)\n")
    elif proc.returncode != 0:
        raise VenvError(f"exit {proc.returncode}: {' '.join(cmd)}")


def _build(final: Path, sdk: Sdk) -> None:
    parent = final.parent
    tmp = parent / f"{final.name}.tmp-{os.getpid()}-{int(time.time())}"
    log_path = parent / f"{final.name}.build.log"
    started = time.time()
    print(f"[prefect_venv] building {final} (log: {log_path})", file=sys.stderr)
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            _run([sys.executable, "-m", "venv", "--prompt", final.name, str(tmp)], log, 300)
            py = str(_python_in(tmp))
            install = [
                py,
                "-m",
                "pip",
                "install",
                "--no-compile",
                "--disable-pip-version-check",
                sdk.requirement,
                *sdk.extra_pins,
            ]
            try:
                _run(install, log, INSTALL_TIMEOUT)
            except VenvError as exc:  # a registry hiccup: try once more
                log.write(f"{exc}; retrying once\n")
                time.sleep(5)
                _run(install, log, INSTALL_TIMEOUT)
            _rewrite_paths(tmp / "bin", str(tmp), str(final))
            # Byte-compile now, recording the final path in code objects (tracebacks).
            _run(
                [py, "-m", "compileall", "-q", "-j", "0", "-s", str(tmp), "-p", str(final), str(tmp / "lib")],
                log,
                600,
                check=sdk.compile_errors_fatal,
            )
            version = verify(_python_in(tmp), sdk)
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
    print(f"[prefect_venv] built {final} in {time.time() - started:.0f}s", file=sys.stderr)


def ensure_venv(sdk: Sdk, import_check: bool = False) -> str:
    """Return the path of the venv's python, building the venv first if needed (import_check: a cached one must
    import prefect too, not only look installed)."""
    final = venv_dir(sdk)
    if _is_ready(final, sdk, import_check):
        return str(_python_in(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f"{final.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another builder may be at work: wait for it
        try:
            if not _is_ready(final, sdk):
                # Holding the lock, no other builder is at work: any temp dir is a
                # leftover of a killed build.
                for stale in final.parent.glob(f"{final.name}.tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                _build(final, sdk)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(_python_in(final))


def ensure_prefect_venv() -> str:
    return ensure_venv(PREFECT2)


def main(sdk: Sdk = PREFECT2) -> int:
    try:
        print(ensure_venv(sdk, import_check=True))
    except VenvError as exc:
        print(f"[prefect_venv] cannot build the {sdk.requirement} venv: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
