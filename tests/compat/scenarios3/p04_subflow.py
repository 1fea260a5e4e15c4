"""A parent flow calling a child flow twice."""

import json

from prefect import flow, task


@task
def inc(x):
    return x + 1


@flow(name="p3-child")
def child(x: int):
    return inc(x)


@flow(name="p3-parent")
def parent():
    return [child(1), child(10)]


if __name__ == "__main__":
    state = parent(return_state=True)
    assert state.is_completed(), state
    assert state.result() == [2, 11]
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
