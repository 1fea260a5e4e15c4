"""Build (once, cached) the virtualenv that runs Prefect's 3.x test suite (3.8.4.dev6) against a server.

Usage:
    python tests/conformance/prefect3_tests_venv.py   # builds if needed, prints the venv's python path

prefect_tests_venv.py's twin for the 3.x suite: tests/compat/prefect_venv.py's builder (cached, built aside,
verified, locked) with the 3.9.1 SDK and the test tools the 3.x suite's `tests/conftest.py`, its fixtures and
pyproject.toml's pytest settings need. Only the standard library is used (this runs before anything is
installed).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "compat"))

from prefect_venv import Sdk, VenvError, ensure_venv  # noqa: E402

# The suite is the public repository's newest 3.x snapshot (3.8.4.dev6; no 3.9 tag is published); the SDK
# under test is PyPI's 3.9.1, the release our compat suite targets. The test tools are those of the
# snapshot's dev group (pyproject.toml): pytest 9 with pytest-asyncio 1.x (its session loop scope), pytest-env
# (its `env` settings), pytest-timeout, and `worker_id` from pytest-xdist. The conftest imports numpy, and
# its fixtures import docker, respx and OpenTelemetry's test utilities (the `otel` extra) at collection;
# runner/ builds bundles with `uv`.
REQUIREMENT = "prefect[otel]==3.9.1"
PINS = (
    "pytest>=9,<10",
    "pytest-asyncio>=1.1,<1.5",
    "pytest-env>=1.1.5",
    "pytest-timeout>=2.3.1",
    "pytest-xdist>=3.6.1",
    "respx>=0.22.0",
    "numpy",
    "docker",
    "opentelemetry-test-utils>=0.48b0,<1.0.0",
    "uv>=0.5.30",
    "virtualenv",
    "pyyaml",
)
_DIGEST = hashlib.sha256("\n".join((REQUIREMENT, *PINS)).encode()).hexdigest()[:8]
# `whenever` (a 3.9 dependency) ships a 3.12-only module that never compiles on 3.11: not fatal here.
PREFECT3_TESTS = Sdk(
    REQUIREMENT, "3.9.1", f"venv-prefect-3.9.1-tests-{_DIGEST}", extra_pins=PINS, compile_errors_fatal=False
)


def ensure_prefect3_tests_venv(import_check: bool = False) -> str:
    return ensure_venv(PREFECT3_TESTS, import_check)


def main() -> int:
    try:
        print(ensure_prefect3_tests_venv(import_check=True))
    except VenvError as exc:
        print(f"[prefect3_tests_venv] cannot build the Prefect 3.9.1 test venv: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
