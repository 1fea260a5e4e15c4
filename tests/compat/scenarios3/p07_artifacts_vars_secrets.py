"""Artifacts (markdown, table), a variable and a Secret block, from inside a flow."""

import json
import sys

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.blocks.system import Secret
from prefect.variables import Variable


@task
def report():
    create_markdown_artifact(key="p3-report", markdown="# Hello\n\n*world*", description="greeting")
    create_table_artifact(key="p3-table", table=[{"a": 1, "b": 2}, {"a": 3, "b": 4}])


@flow(name="p3-artifacts")
def reporter(suffix: str):
    report()
    Variable.set(f"p3_region_{suffix}", "eu-west-1", overwrite=True)
    region = Variable.get(f"p3_region_{suffix}")
    Secret(value="s3cr3t").save(f"p3-db-password-{suffix}", overwrite=True)
    password = Secret.load(f"p3-db-password-{suffix}").get()
    return region, password


if __name__ == "__main__":
    suffix = sys.argv[1]
    state = reporter(suffix, return_state=True)
    assert state.is_completed(), state
    assert state.result() == ("eu-west-1", "s3cr3t"), state.result()
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
