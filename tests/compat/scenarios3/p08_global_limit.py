"""A global concurrency limit held around work in a task (prefect.concurrency); argv: the limit's name and,
optionally, how many seconds to wait for a slot before giving up."""

import json
import sys

from prefect import flow, task
from prefect.concurrency.sync import concurrency


@task
def limited(name, i, timeout):
    with concurrency(name, occupy=1, timeout_seconds=timeout):
        return i * 2


@flow(name="p3-global-limit")
def limiter(name: str, timeout: float | None = None):
    return [limited(name, i, timeout) for i in range(3)]


if __name__ == "__main__":
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else None
    state = limiter(sys.argv[1], timeout, return_state=True)
    if timeout is not None and state.is_failed():
        state.result()  # raises the task's error: the slot never came
    assert state.is_completed(), state
    assert state.result() == [0, 2, 4]
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
