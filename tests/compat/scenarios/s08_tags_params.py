"""Tags (from the tags() context and on a task) and parameters recorded on runs.

argv[1]: a token used for a tag unique to this test run.
"""

import json
import sys

from prefect import flow, tags, task


@task(tags=["compat-task-tag"])
def echo(value):
    return value


@flow(name="compat-tags-params")
def tagged(count: int, label: str, options: dict, items: list = [1, 2]):  # noqa: B006 - as users write it
    return echo(f"{label}x{count}")


if __name__ == "__main__":
    token = sys.argv[1]
    with tags("compat-ctx-tag", f"compat-run-{token}"):
        state = tagged(7, "hello", {"a": [1, 2], "b": None}, return_state=True)
    assert state.result() == "hellox7"
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
