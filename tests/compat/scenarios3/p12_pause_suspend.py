"""Pausing and suspending under the 3.9 SDK. argv[1] picks the case:
- "sync-timeout": a sync flow pauses for 0.1 s and nobody resumes it; the SDK sleeps a 10 s poll
  interval, meanwhile the server's pause-expiration service fails the run, then the flow proposes
  its own Failed. The flow must end Failed (the server aborting that proposal raised Abort here).
- "suspend-without-deployment": suspend_flow_run() of a run with no deployment fails with Prefect's
  reason (the server accepted the suspension here).
- "resume-repeated-key": the flow pauses, is resumed, then passes a pause with the same key again,
  which Prefect rejects into Running so the flow runs all five tasks (it stopped after three here)."""

import json
import sys
import threading
import time

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.flow_runs import pause_flow_run, resume_flow_run, suspend_flow_run

DEADLINE_SECONDS = 60
ran = []
run_ids = []  # the flow's run id, for the resumer thread (a flow's parameters are copies)


@task
def step():
    ran.append(1)
    return len(ran)


@flow(name="p3-sync-pause")
def sync_pausing_flow():
    pause_flow_run(timeout=0.1)
    return "resumed"


@flow(name="p3-suspend")
def suspending_flow():
    try:
        suspend_flow_run(timeout=30)
    except RuntimeError as exc:
        return f"refused: {exc}"
    return "suspended"


@flow(name="p3-repeated-pause-key")
def twice_paused_flow():
    run_ids.append(FlowRunContext.get().flow_run.id)
    step()
    step()
    pause_flow_run(timeout=30, poll_interval=1, key="do-not-repeat")
    step()
    pause_flow_run(timeout=30, poll_interval=1, key="do-not-repeat")
    step()
    step()


def resume_when_paused():
    """Resume the flow run once it is paused (polls with a deadline)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if run_ids and client.read_flow_run(run_ids[0]).state.is_paused():
                resume_flow_run(run_ids[0])
                return
            time.sleep(0.2)


def main(case):
    if case == "sync-timeout":
        state = sync_pausing_flow(return_state=True)
        return {"flow_run_id": str(state.state_details.flow_run_id), "type": state.type.value}
    if case == "suspend-without-deployment":
        return {"result": suspending_flow()}
    resumer = threading.Thread(target=resume_when_paused)
    resumer.start()
    state = twice_paused_flow(return_state=True)
    resumer.join()
    return {"flow_run_id": str(run_ids[0]), "type": state.type.value, "tasks_run": len(ran)}


if __name__ == "__main__":
    print("COMPAT_RESULT " + json.dumps(main(sys.argv[1])))
