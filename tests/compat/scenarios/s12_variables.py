"""Variables: one created by the test through the API, one set by the SDK.

argv[1]: a token; the test created the variable compat_var_<token> = "from-the-api".
"""

import json
import sys

from prefect import flow
from prefect.variables import Variable


@flow(name="compat-variables")
def use_variables(token: str):
    existing = Variable.get(f"compat_var_{token}")
    missing = Variable.get(f"compat_missing_{token}", default="fallback")
    Variable.set(f"compat_set_{token}", "from-the-sdk", tags=["compat"])
    Variable.set(f"compat_set_{token}", "overwritten", overwrite=True)
    again = Variable.get(f"compat_set_{token}")
    return existing.value, missing, again.value


if __name__ == "__main__":
    token = sys.argv[1]
    state = use_variables(token, return_state=True)
    assert state.result() == ("from-the-api", "fallback", "overwritten"), state.result()
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
