"""A task that fails twice, then succeeds on its third run (retries=2)."""

import json

from prefect import flow, task

ATTEMPTS = {"n": 0}


@task(retries=2, retry_delay_seconds=0)
def flaky():
    ATTEMPTS["n"] += 1
    if ATTEMPTS["n"] < 3:
        raise RuntimeError(f"attempt {ATTEMPTS['n']} fails")
    return "third time lucky"


@flow(name="p3-retries")
def retrying():
    return flaky()


if __name__ == "__main__":
    state = retrying(return_state=True)
    assert state.is_completed(), state
    assert state.result() == "third time lucky"
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
