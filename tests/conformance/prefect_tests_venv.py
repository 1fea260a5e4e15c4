"""Build (once, cached) the virtualenv that runs Prefect 2.20.25's own test suite against a server.

Usage:
    python tests/conformance/prefect_tests_venv.py   # builds if needed, prints the venv's python path

It is tests/compat/prefect_venv.py's builder (cached under ${PREFECTLITE_CACHE_DIR:-~/.cache/prefectlite},
built aside and renamed into place once verified, serialised by a lock file) with another requirement set:
the exact Prefect release whose tests we run, and the test tools its `tests/conftest.py` and `setup.cfg`
need. Only the standard library is used (this runs before anything is installed).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "compat"))

from prefect_venv import Sdk, VenvError, ensure_venv  # noqa: E402

# The suite is Prefect's repository at tag 2.20.25, so the SDK under test is that very release.
# Its own metadata caps less than 2.20.27's does, so 2.20.27's caps are added where they are tighter
# (pydantic); the test tools are pinned to the versions the suite supports (requirements-dev.txt):
# pytest-asyncio 0.23 cannot override the suite's session event loop; anyio 4.8+ emits warnings the
# suite's `filterwarnings = error` turns into failures; `worker_id` (pytest-xdist) is a fixture the
# suite's conftest requests even without -n; pytest refuses to start without boto3, whose warning class
# setup.cfg's filterwarnings names.
REQUIREMENT = "prefect==2.20.25"
PINS = (
    "pydantic<2.13",
    "anyio<4.8",
    "pytest>=8,<9",
    "pytest-asyncio>=0.21,<0.22",
    "pytest-timeout",
    "pytest-env",
    "pytest-xdist<3.9",
    "respx",
    "boto3",
)
# The venv's name carries a digest of what it holds: changing the pins builds a new venv instead of
# reusing one that verifies (it imports prefect 2.20.25) but lacks a test tool.
_DIGEST = hashlib.sha256("\n".join((REQUIREMENT, *PINS)).encode()).hexdigest()[:8]
PREFECT2_TESTS = Sdk(REQUIREMENT, "2.20.25", f"venv-prefect-2.20.25-tests-{_DIGEST}", extra_pins=PINS)


def ensure_prefect_tests_venv(import_check: bool = False) -> str:
    return ensure_venv(PREFECT2_TESTS, import_check)


def main() -> int:
    try:
        print(ensure_prefect_tests_venv(import_check=True))
    except VenvError as exc:
        print(f"[prefect_tests_venv] cannot build the Prefect 2.20.25 test venv: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
