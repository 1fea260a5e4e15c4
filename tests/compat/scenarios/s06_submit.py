"""Tasks submitted with .submit() to the default task runner, one depending on two others."""

import json
import time

from prefect import flow, task
from prefect.context import get_run_context


@task
def slow_inc(x):
    time.sleep(0.2)
    return x + 1


@task
def add(a, b):
    return a + b


@flow(name="compat-submit")
def submitter():
    runner = type(get_run_context().task_runner).__name__
    assert runner == "ConcurrentTaskRunner", runner
    f1 = slow_inc.submit(1)
    f2 = slow_inc.submit(2)
    f3 = add.submit(f1, f2)
    return f3.result()


if __name__ == "__main__":
    state = submitter(return_state=True)
    assert state.result() == 5
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
