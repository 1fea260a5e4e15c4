"""cache_key_fn caching within one flow run and across two flow runs.

argv[1]: a token that makes the cache key unique to this test run.
"""

import json
import sys
from datetime import timedelta

from prefect import flow, task

executions = []


def cache_key(context, parameters):
    return f"compat-cache-{parameters['token']}-{parameters['x']}"


@task(cache_key_fn=cache_key, cache_expiration=timedelta(minutes=10))
def expensive(token, x):
    executions.append(x)
    return x * 2


@flow(name="compat-cache")
def cached_flow(token: str):
    return expensive(token, 21), expensive(token, 21)


if __name__ == "__main__":
    token = sys.argv[1]
    first = cached_flow(token, return_state=True)
    second = cached_flow(token, return_state=True)
    assert first.result() == (42, 42) and second.result() == (42, 42)
    assert executions == [21], executions  # the body ran once: every other call hit the cache
    print(
        "COMPAT_RESULT "
        + json.dumps(
            {
                "flow_run_ids": [str(first.state_details.flow_run_id), str(second.state_details.flow_run_id)],
                "cache_key": f"compat-cache-{token}-21",
            }
        )
    )
