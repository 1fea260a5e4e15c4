"""A flow that fails with an exception after one successful task."""

import json

from prefect import flow, task


@task
def validate(x):
    return x > 0


@flow(name="compat-failing")
def failing():
    validate(42)
    raise ValueError("compat failure: bad input 42")


if __name__ == "__main__":
    state = failing(return_state=True)
    assert state.is_failed(), state
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
