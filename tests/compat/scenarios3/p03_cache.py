"""Caching by input: the second call with the same input (and a second flow run) is a cache hit."""

import json
import sys
from datetime import timedelta

from prefect import flow, task
from prefect.cache_policies import INPUTS

CALLS = {"n": 0}


@task(cache_policy=INPUTS, cache_expiration=timedelta(minutes=10), persist_result=True)
def expensive(x, salt):
    CALLS["n"] += 1
    return x * 10


@flow(name="p3-cache")
def caching(salt: str):
    return [expensive(3, salt), expensive(3, salt)]


if __name__ == "__main__":
    salt = sys.argv[1]
    first = caching(salt, return_state=True)
    second = caching(salt, return_state=True)
    assert first.is_completed() and second.is_completed(), (first, second)
    assert first.result() == [30, 30] and second.result() == [30, 30]
    assert CALLS["n"] == 1, CALLS
    print(
        "COMPAT_RESULT "
        + json.dumps({"flow_run_ids": [str(first.state_details.flow_run_id), str(second.state_details.flow_run_id)]})
    )
