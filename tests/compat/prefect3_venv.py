"""Build (once, cached) a virtualenv holding the real Prefect 3.9 SDK: prefect_venv.py's builder.

Usage:
    python tests/compat/prefect3_venv.py     # builds if needed, prints the venv's python path
    from prefect3_venv import ensure_prefect3_venv; python = ensure_prefect3_venv()

A venv of its own, so the two SDKs never share one and each suite builds only what it needs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prefect_venv import Sdk, ensure_venv, main  # noqa: E402

# `whenever` (a 3.9 dependency) ships a 3.12-only module that never compiles on 3.11 and is never
# imported here: byte-compile errors are not fatal for this SDK.
PREFECT3 = Sdk("prefect==3.9.*", "3.9.", "venv-prefect-3.9", compile_errors_fatal=False)


def ensure_prefect3_venv() -> str:
    return ensure_venv(PREFECT3)


if __name__ == "__main__":
    sys.exit(main(PREFECT3))
