"""A flow whose task raises: the task and the flow end Failed."""

import json

from prefect import flow, tags, task


@task
def bad():
    raise ValueError("disk full")


@flow(name="p3-failing")
def failing():
    bad()


if __name__ == "__main__":
    with tags("p3-nightly"):
        state = failing(return_state=True)
    assert state.is_failed(), state
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
