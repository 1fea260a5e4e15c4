"""A flow retry gives a task that used up its retries all of them again (as on Prefect's server).

The task (retries=1) fails on its first three calls: calls 1 and 2 on the flow's first attempt (the
task fails, so the flow fails and retries), call 3 on the second attempt, which the task retries once
more, so call 4 succeeds and the flow completes.
"""

import json

from prefect import flow, task

calls = {"n": 0}


@task(retries=1, retry_delay_seconds=0)
def flaky():
    calls["n"] += 1
    if calls["n"] <= 3:
        raise ValueError(f"call {calls['n']} fails")
    return calls["n"]


@flow(name="compat-flow-retry-resets-task-retries", retries=1, retry_delay_seconds=0)
def retried():
    return flaky()


if __name__ == "__main__":
    state = retried(return_state=True)
    print(
        "COMPAT_RESULT "
        + json.dumps(
            {
                "flow_run_id": str(state.state_details.flow_run_id),
                "completed": state.is_completed(),
                "calls": calls["n"],
            }
        )
    )
