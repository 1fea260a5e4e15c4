"""The request bodies' schemas (section 6, Schemas) against Prefect's own: every field that Prefect's server
takes in a body we also define is one we know, or one listed here with why we drop it. A field we do not know is
silently dropped (or a 422 where the schema forbids extra fields), so a missing one is a lost feature:
TaskRunCreate's `id` was.

Prefect's server models are read from each SDK's venv (`prefect.server.schemas.actions`), in one subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
import prefectlite  # noqa: E402

# Prints {model name: [field names]} of the server's action models (pydantic 2's model_fields, or 2.20's v1 fields).
READ_MODELS = """
import inspect, json
import prefect.server.schemas.actions as actions
models = {}
for name, cls in vars(actions).items():
    if inspect.isclass(cls) and cls.__module__ == actions.__name__:
        fields = getattr(cls, "model_fields", None) or getattr(cls, "__fields__", None)
        if fields is not None:
            models[name] = sorted(fields)
print(json.dumps(models))
"""

# (SDK, model, field): why we take the body without it.
DROPPED = {
    ("2.20", "StateCreate", "id"): "Prefect's own model marks it ignored",
    ("2.20", "WorkQueueUpdate", "filter"): "deprecated in 2.x; no SDK call sends it",
    ("3.9", "WorkQueueUpdate", "filter"): "deprecated in 2.x; no SDK call sends it",
    ("3.9", "DeploymentCreate", "version_info"): "Prefect's open-source server drops it too (models/deployments.py)",
}


def prefect_models(python: str) -> dict:
    done = subprocess.run([python, "-c", READ_MODELS], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_every_field_prefects_server_takes_in_a_body_we_define_is_known_or_dropped_on_purpose(sdk_python, request):
    sdk = request.node.callspec.params["sdk_python"]
    theirs = prefect_models(sdk_python)
    ours = prefectlite.Schema.registry
    shared = sorted(set(theirs) & set(ours))
    assert {"FlowCreate", "FlowRunCreate", "TaskRunCreate", "DeploymentCreate", "WorkPoolCreate"} <= set(shared)
    unknown = [
        (sdk, model, field)
        for model in shared
        for field in theirs[model]
        if field not in ours[model].fields and field not in ours[model].tolerated
    ]
    assert [key for key in unknown if key not in DROPPED] == []
    assert [key for key in DROPPED if key[0] == sdk and key not in unknown] == [], "listed but known now"
