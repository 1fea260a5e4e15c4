"""Result persistence + caching across flow runs in separate processes.

argv[1]: a token that makes the cache key unique to this test run. Run the script twice:
the first process computes (a fresh uuid4, so the value proves where it came from) and
persists the result; the second process's task run is a cache hit and loads that value from
the persisted result (the local-file-system block the first process registered).
"""

import json
import sys
import uuid
from datetime import timedelta

from prefect import flow, task
from prefect.tasks import task_input_hash

executions = []


@task(persist_result=True, cache_key_fn=task_input_hash, cache_expiration=timedelta(minutes=5))
def produce(token: str):
    executions.append(token)
    return {"token": token, "nonce": uuid.uuid4().hex}


@flow(name="compat-persisted-cache")
def persisted(token: str):
    return produce(token)


if __name__ == "__main__":
    token = sys.argv[1]
    state = persisted(token, return_state=True)
    value = state.result()
    assert value["token"] == token, value
    print(
        "COMPAT_RESULT "
        + json.dumps(
            {
                "flow_run_id": str(state.state_details.flow_run_id),
                "value": value,
                "executed": len(executions),
            }
        )
    )
