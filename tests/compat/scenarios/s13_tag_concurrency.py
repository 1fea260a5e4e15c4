"""Two submitted tasks sharing a tag whose concurrency limit is 1 (the test creates the limit).

argv[1]: the tag. The server makes the second task wait (WAIT, ~30 s in Prefect 2.20) until
the first one has released its slot.
"""

import json
import sys
import time

from prefect import flow, task

TAG = sys.argv[1]


@task(tags=[TAG])
def work(i):
    time.sleep(1)
    return i


@flow(name="compat-tag-concurrency")
def limited():
    futures = [work.submit(i) for i in range(2)]
    return [f.result() for f in futures]


if __name__ == "__main__":
    state = limited(return_state=True)
    assert state.result() == [0, 1]
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
