"""Two concurrently submitted tasks each holding a slot of the global limit "db" (limit 1,
created by the test) around a critical section; prints each section's start/end times."""

import json
import sys
import time

from prefect import flow, task
from prefect.concurrency.sync import concurrency

LIMIT = sys.argv[1] if len(sys.argv) > 1 else "db"


@task
def critical(i):
    with concurrency(LIMIT, occupy=1):
        start = time.time()
        time.sleep(1.5)
        end = time.time()
    print(f"COMPAT_SECTION {json.dumps({'i': i, 'start': start, 'end': end})}", flush=True)
    return i


@flow(name="compat-global-concurrency")
def gcl_flow():
    futures = [critical.submit(i) for i in range(2)]
    return [f.result() for f in futures]


if __name__ == "__main__":
    state = gcl_flow(return_state=True)
    assert state.result() == [0, 1], state.result()
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
