"""A 3.x flow called with a parameter that fails validation: the run goes Pending -> Failed without
running. Prefect's server gives it a start_time equal to its end_time."""

import json

from prefect import flow
from prefect.flow_engine import run_flow
from prefect.utilities.callables import get_call_parameters


@flow(name="p3-param-validation")
def typed(x: int):
    return x


if __name__ == "__main__":
    state = run_flow(typed, parameters=get_call_parameters(typed.fn, (), {"x": "FAIL!"}), return_type="state")
    print(
        "COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "type": state.type.value})
    )
