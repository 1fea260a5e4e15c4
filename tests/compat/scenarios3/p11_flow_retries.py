"""A 3.x flow with retries=1 whose first attempt fails. The 3.9 SDK proposes its Failed state with
state_details.retriable=false; Prefect's server retries the flow all the same (the flag is for tasks)."""

import json

from prefect import flow, get_run_logger

attempts = {"n": 0}


@flow(name="p3-flow-retries", retries=1, retry_delay_seconds=0)
def flaky_flow():
    attempts["n"] += 1
    get_run_logger().info("flow attempt %d", attempts["n"])
    if attempts["n"] == 1:
        raise RuntimeError("first attempt fails")
    return "recovered"


if __name__ == "__main__":
    state = flaky_flow(return_state=True)
    print(
        "COMPAT_RESULT "
        + json.dumps(
            {
                "flow_run_id": str(state.state_details.flow_run_id),
                "completed": state.is_completed(),
                "attempts": attempts["n"],
            }
        )
    )
