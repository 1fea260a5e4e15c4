"""A flow with retries=1 whose first attempt fails."""

import json

from prefect import flow, get_run_logger

attempts = {"n": 0}


@flow(name="compat-flow-retries", retries=1, retry_delay_seconds=0)
def flaky_flow():
    attempts["n"] += 1
    get_run_logger().info("flow attempt %d", attempts["n"])
    if attempts["n"] == 1:
        raise RuntimeError("first attempt fails")
    return "recovered"


if __name__ == "__main__":
    state = flaky_flow(return_state=True)
    assert state.is_completed(), state
    assert state.result() == "recovered"
    assert attempts["n"] == 2, attempts
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
