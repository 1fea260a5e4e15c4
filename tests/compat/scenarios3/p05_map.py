"""task.map over ten items, then a task that depends on all of them."""

import json

from prefect import flow, task


@task
def square(x):
    return x * x


@task
def add_up(values):
    return sum(values)


@flow(name="p3-map")
def mapper():
    squares = square.map(range(10))
    return add_up(squares)


if __name__ == "__main__":
    state = mapper(return_state=True)
    assert state.is_completed(), state
    assert state.result() == 285
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
