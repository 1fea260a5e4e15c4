"""A subflow's returned state passed into a task (runs under the 2.20 and the 3.9 SDK).

The SDK records the task's input as the subflow's parent task run, read from the subflow state's
state_details.task_run_id; with it null, the SDK asked for GET /task_runs/None and the flow crashed.
"""

import json

from prefect import flow, task


@flow(name="compat-doubling-child")
def child(x: int):
    return x * 2


@task
def add_one(x):
    return x + 1


@flow(name="compat-subflow-into-task")
def parent():
    doubled = child(20, return_state=True)
    return add_one(doubled), str(doubled.state_details.task_run_id), str(doubled.state_details.flow_run_id)


if __name__ == "__main__":
    state = parent(return_state=True)
    assert state.is_completed(), state
    value, task_run_id, child_run_id = state.result()
    print(
        "COMPAT_RESULT "
        + json.dumps(
            {
                "flow_run_id": str(state.state_details.flow_run_id),
                "value": value,
                "child_task_run_id": task_run_id,
                "child_flow_run_id": child_run_id,
            }
        )
    )
