"""The 2.20 client creates a deployment the older ways and reads it back, in test mode.

With PREFECT_TEST_MODE=1 (as users' own test suites run) the SDK refuses any field its schema lacks;
it also refuses a deployment whose `job_variables` and `infra_overrides` are both set and differ.
argv[1]: a token for the names.
"""

import asyncio
import json
import os
import sys
from datetime import timedelta

os.environ["PREFECT_TEST_MODE"] = "1"

from prefect import get_client  # noqa: E402
from prefect.client.schemas.schedules import IntervalSchedule  # noqa: E402


async def main(token):
    flow_name, name = f"compat-deploy-reads-{token}", f"jobvars-{token}"
    async with get_client() as client:
        flow_id = await client.create_flow_from_name(flow_name)
        dep_id = await client.create_deployment(
            flow_id=flow_id,
            name=name,
            infra_overrides={"image": "etl:2"},
            paused=True,
            schedule=IntervalSchedule(interval=timedelta(hours=1)),
        )
        dep = await client.read_deployment(dep_id)
        by_name = await client.read_deployment_by_name(f"{flow_name}/{name}")
        listed = await client.read_deployments()
    print(
        "COMPAT_RESULT "
        + json.dumps(
            {
                "id": str(dep.id),
                "job_variables": dep.job_variables,
                "infra_overrides": dep.infra_overrides,
                "by_name": str(by_name.id),
                "listed": str(dep_id) in {str(d.id) for d in listed},
                "schedule_intervals": [s.schedule.interval.total_seconds() for s in dep.schedules],
                "paused": dep.paused,
                "is_schedule_active": dep.is_schedule_active,
            }
        )
    )


asyncio.run(main(sys.argv[1]))
