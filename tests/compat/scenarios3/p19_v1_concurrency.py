"""A tag's v1 concurrency limit held around work in a task (prefect.concurrency.v1, which calls
/concurrency_limits/increment and /decrement); argv: the tag, then `run` (take the slot, see it held, give it
back) or `timeout SECONDS` (wait that long for a slot, then give up)."""

import json
import sys

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.concurrency.v1.sync import concurrency
from prefect.context import get_run_context


@task
def limited(tag, timeout):
    task_run_id = get_run_context().task_run.id
    with concurrency(tag, task_run_id=task_run_id, timeout_seconds=timeout):
        with get_client(sync_client=True) as client:
            held = client.read_concurrency_limit_by_tag(tag).active_slots
    return {"task_run_id": str(task_run_id), "held": [str(slot) for slot in held]}


@flow(name="p3-v1-limit")
def limiter(tag: str, timeout: float | None = None):
    return limited(tag, timeout)


if __name__ == "__main__":
    timeout = float(sys.argv[3]) if sys.argv[2] == "timeout" else None
    state = limiter(sys.argv[1], timeout, return_state=True)
    if state.is_failed():
        state.result()  # raises the task's error: the slot never came
    print("COMPAT_RESULT " + json.dumps(state.result()))
