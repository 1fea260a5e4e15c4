"""A flow that sends itself inputs, reads them back, then pauses until it is resumed with an answer
(pause_flow_run(wait_for_input=...)): every flow run input route of the API.

argv[1]: a file to which the flow run id is written once the flow runs.
"""

import json
import sys

from prefect import flow, get_run_logger, pause_flow_run
from prefect.context import get_run_context
from prefect.input import RunInput
from prefect.input.run_input import receive_input, send_input


class Approval(RunInput):
    approved: bool
    note: str = ""


@flow(name="compat-wait-for-input")
def waiting():
    logger = get_run_logger()
    me = get_run_context().flow_run.id
    send_input("first message", flow_run_id=me, sender="compat-test")
    send_input("second message", flow_run_id=me)
    received = []
    for message in receive_input(str, flow_run_id=me, timeout=20, poll_interval=0.5, with_metadata=True):
        received.append([message.value, message.metadata.sender])
        if len(received) == 2:
            break
    with open(sys.argv[1], "w") as f:
        f.write(str(me))
    logger.info("waiting for approval")
    approval = pause_flow_run(wait_for_input=Approval, timeout=90, poll_interval=1)
    logger.info("approved=%s", approval.approved)
    return {"received": received, "approved": approval.approved, "note": approval.note}


if __name__ == "__main__":
    state = waiting(return_state=True)
    assert state.is_completed(), state
    print(
        "COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "result": state.result()})
    )
