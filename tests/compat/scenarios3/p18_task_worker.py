"""Background tasks under the 3.9 SDK: task.delay() creates deferred task runs, a task worker
(prefect.task_worker.serve) receives them over /api/task_runs/subscriptions/scheduled and runs them.
argv[1] picks the role, argv[2] is a result storage folder the roles share (the parameters of a delayed
run are stored there by the submitter and read by the worker):
- "submit STORAGE N": delay N runs of `double`, print their ids and the task's key;
- "worker STORAGE": serve `double` until killed."""

import json
import os
import sys

os.environ["PREFECT_LOCAL_STORAGE_PATH"] = sys.argv[2]
os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"

from prefect import task  # noqa: E402
from prefect.task_worker import serve  # noqa: E402


@task
def double(x: int) -> int:
    return 2 * x


if __name__ == "__main__":
    if sys.argv[1] == "submit":
        futures = [double.delay(i) for i in range(int(sys.argv[3]))]
        print(
            "COMPAT_RESULT "
            + json.dumps({"task_key": double.task_key, "task_run_ids": [str(f.task_run_id) for f in futures]})
        )
    else:
        print(f"serving {double.task_key}", flush=True)
        serve(double)
