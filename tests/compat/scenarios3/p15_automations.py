"""Flows for the automation scenarios: `fail TAG` runs a failing flow tagged TAG; `etl TAG` runs a
completing flow tagged TAG. Prints the flow run's id and its state's timestamp."""

import json
import sys

from prefect import flow, tags, task


@task
def load():
    raise ValueError("warehouse unreachable")


@flow(name="p3-auto-failing")
def failing():
    load()


@flow(name="p3-auto-etl")
def etl(rows: int = 7):
    return rows


if __name__ == "__main__":
    mode, tag = sys.argv[1], sys.argv[2]
    with tags(tag):
        state = (failing if mode == "fail" else etl)(return_state=True)
    assert state.is_failed() if mode == "fail" else state.is_completed(), state
    print(
        "COMPAT_RESULT "
        + json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "timestamp": state.timestamp.isoformat()})
    )
