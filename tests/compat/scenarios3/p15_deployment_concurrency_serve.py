"""serve(global_limit=1): a served deployment whose runs take a slot of its `deployment:{id}` limit, the
runner renewing the lease while each runs; argv[1]: the deployment's name. The runner polls every second."""

import os
import sys
import time

os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "1")

from prefect import flow  # noqa: E402


@flow(name="p3-one-at-a-time")
def one_at_a_time(seconds: float = 2.0):
    time.sleep(seconds)
    return seconds


if __name__ == "__main__":
    one_at_a_time.serve(name=sys.argv[1], global_limit=1)
