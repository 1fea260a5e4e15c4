"""A flow that pauses itself; the test resumes it through the API.

argv[1]: a file to which the flow run id is written once the flow runs.
"""

import json
import sys

from prefect import flow, get_run_logger, pause_flow_run, task
from prefect.context import get_run_context


@task
def before():
    return 1


@task
def after(x):
    return x + 1


@flow(name="compat-pause")
def pausing():
    x = before()
    logger = get_run_logger()
    with open(sys.argv[1], "w") as f:
        f.write(str(get_run_context().flow_run.id))
    logger.info("pausing now")
    pause_flow_run(timeout=90, poll_interval=1)
    logger.info("resumed, continuing")
    return after(x)


if __name__ == "__main__":
    state = pausing(return_state=True)
    assert state.is_completed(), state
    assert state.result() == 2
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
