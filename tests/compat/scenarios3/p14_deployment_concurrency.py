"""A 3.x deployment made with concurrency_limit=3 (as serve()/deploy() make it), read back through the SDK:
Prefect answers its global concurrency limit `deployment:{id}` with the limit."""

import json
import sys

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy


@flow(name="p3-limited")
def limited():
    return 1


if __name__ == "__main__":
    config = ConcurrencyLimitConfig(limit=3, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    deployment_id = limited.to_deployment(name=sys.argv[1], concurrency_limit=config).apply()
    with get_client(sync_client=True) as client:
        read = client.read_deployment(deployment_id)
    limit = read.global_concurrency_limit
    print(
        "COMPAT_RESULT "
        + json.dumps(
            {
                "deployment_id": str(deployment_id),
                "limit": limit.limit if limit else None,
                "name": limit.name if limit else None,
                "strategy": read.concurrency_options.collision_strategy.value if read.concurrency_options else None,
            }
        )
    )
