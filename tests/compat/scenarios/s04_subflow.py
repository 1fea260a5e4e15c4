"""A parent flow calling a child flow twice."""

import json

from prefect import flow, task

children = []


@task
def add_one(x):
    return x + 1


@flow(name="compat-child")
def child(x: int):
    return add_one(x)


@flow(name="compat-parent")
def parent():
    a = child(1, return_state=True)
    b = child(10, return_state=True)
    children.extend(str(s.state_details.flow_run_id) for s in (a, b))
    return a.result() + b.result()


if __name__ == "__main__":
    state = parent(return_state=True)
    assert state.result() == 13
    print(
        "COMPAT_RESULT "
        + json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "child_flow_run_ids": children})
    )
