"""`from prefect import variables`: get an existing variable, a missing one, and set one.

argv[1]: a token; the test created compat_bvar_<token> through the API.
"""

import json
import sys
import warnings

from prefect import variables

token = sys.argv[1]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # variables.get is deprecated in 2.20 (still shipped)
    existing = variables.get(f"compat_bvar_{token}", default="not-found")
    missing = variables.get(f"compat_bmissing_{token}", default="the-default")
    missing_none = variables.get(f"compat_bmissing_{token}")

set_first = variables.Variable.set(name=f"compat_bset_{token}", value="first", tags=["compat-b"])
set_again = variables.Variable.set(name=f"compat_bset_{token}", value="second", overwrite=True)
try:
    variables.Variable.set(name=f"compat_bset_{token}", value="third")  # no overwrite: refused
    refused = False
except ValueError:
    refused = True
read_back = variables.Variable.get(f"compat_bset_{token}")

print(
    "COMPAT_RESULT "
    + json.dumps(
        {
            "existing": existing,
            "missing": missing,
            "missing_none": missing_none,
            "set_first": set_first.value,
            "set_again": set_again.value,
            "refused": refused,
            "read_back": read_back.value,
        }
    )
)
