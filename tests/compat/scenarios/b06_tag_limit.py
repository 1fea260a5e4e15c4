"""Two submitted tasks tagged `limited` (the test creates a tag concurrency limit of 1 with
`prefect concurrency-limit create limited 1`). The second waits (WAIT: as long as the server's
PREFECT_TASK_RUN_TAG_CONCURRENCY_SLOT_WAIT_SECONDS says, 30 s by default in 2.20)."""

import json
import time

from prefect import flow, task


@task(tags=["limited"])
def guarded(i):
    time.sleep(2)
    return i


@flow(name="compat-tag-limited")
def limited_flow():
    futures = [guarded.submit(i) for i in range(2)]
    return [f.result() for f in futures]


if __name__ == "__main__":
    state = limited_flow(return_state=True)
    assert state.result() == [0, 1], state.result()
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
