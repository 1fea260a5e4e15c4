"""An async flow awaiting 20 async tasks at once (concurrent requests to the server)."""

import asyncio
import json

from prefect import flow, task


@task
async def fetch_page(page: int):
    await asyncio.sleep(0.1)
    return page * page


@flow(name="compat-async-gather")
async def crawl(pages: int = 20):
    results = await asyncio.gather(*(fetch_page(p) for p in range(pages)))
    return sum(results)


if __name__ == "__main__":
    state = asyncio.run(crawl(20, return_state=True))
    assert state.is_completed(), state
    assert state.result() == sum(p * p for p in range(20))
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
