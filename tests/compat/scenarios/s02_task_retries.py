"""A task that fails twice, then succeeds on its third run."""

import json

from prefect import flow, task

calls = {"n": 0}


@task(retries=2, retry_delay_seconds=1)
def flaky_fetch():
    calls["n"] += 1
    if calls["n"] < 3:
        raise ValueError(f"transient failure {calls['n']}")
    return calls["n"]


@flow(name="compat-task-retries")
def retrying():
    return flaky_fetch()


if __name__ == "__main__":
    state = retrying(return_state=True)
    assert state.is_completed(), state
    assert state.result() == 3
    assert calls["n"] == 3, calls
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
