"""A SlackWebhook block pointing at the test's fake receiver, a notification policy for
"Failed" made with the SDK client, then a failing flow.

argv[1]: the webhook URL; argv[2]: a token (part of the block name and the error).
"""

import asyncio
import json
import sys

from prefect import flow
from prefect.blocks.notifications import SlackWebhook
from prefect.client.orchestration import get_client

url, token = sys.argv[1], sys.argv[2]
block_id = SlackWebhook(url=url).save("my-hook", overwrite=True)


async def create_policy():
    async with get_client() as client:
        return await client.create_flow_run_notification_policy(
            block_document_id=block_id, is_active=True, tags=[], state_names=["Failed"]
        )


policy_id = asyncio.run(create_policy())
print("COMPAT_POLICY " + json.dumps({"policy_id": str(policy_id), "block_id": str(block_id)}), flush=True)


@flow(name="compat-notified-failure")
def doomed(token: str):
    raise RuntimeError(f"compat notified failure {token}")


if __name__ == "__main__":
    state = doomed(token, return_state=True)
    assert state.is_failed(), state
    print(
        "COMPAT_RESULT "
        + json.dumps(
            {
                "flow_run_id": str(state.state_details.flow_run_id),
                "policy_id": str(policy_id),
                "block_id": str(block_id),
            }
        )
    )
