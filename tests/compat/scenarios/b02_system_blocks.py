"""Secret, JSON and String blocks: `save` in one process, `load` in another.

argv[1]: "save" or "load"; argv[2]: a token used in the block names and values.
"""

import json
import sys

from prefect.blocks.system import JSON, Secret, String

mode, token = sys.argv[1], sys.argv[2]
names = {"secret": f"compat-secret-{token}", "json": f"compat-json-{token}", "string": f"compat-string-{token}"}

if mode == "save":
    ids = {
        "secret": Secret(value=f"s3cr3t-{token}").save(names["secret"], overwrite=True),
        "json": JSON(value={"token": token, "n": [1, 2, 3], "nested": {"ok": True}}).save(
            names["json"], overwrite=True
        ),
        "string": String(value=f"plain-{token}").save(names["string"], overwrite=True),
    }
    # Saving again with overwrite=True replaces the value (and keeps the document).
    ids["secret_again"] = Secret(value=f"rotated-{token}").save(names["secret"], overwrite=True)
    print("COMPAT_RESULT " + json.dumps({k: str(v) for k, v in ids.items()}))
else:
    secret = Secret.load(names["secret"])
    print(
        "COMPAT_RESULT "
        + json.dumps(
            {
                "secret": secret.get(),
                "secret_repr_hides_value": f"rotated-{token}" not in repr(secret),
                "json": JSON.load(names["json"]).value,
                "string": String.load(names["string"]).value,
            }
        )
    )
