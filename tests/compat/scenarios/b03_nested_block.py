"""A custom Block with a nested custom Block field and SecretStr fields.

argv[1]: "save" or "load"; argv[2]: a token used in the document names and values.
Both invocations define the same classes, so they agree on the block schemas. The nested
block is saved first under its own name: the SDK then stores the outer document's field as
a reference ({"$ref": {"block_document_id": ...}}) instead of inlining its data.
"""

import json
import sys

from prefect._internal.pydantic import HAS_PYDANTIC_V2
from prefect.blocks.core import Block

if HAS_PYDANTIC_V2:
    from pydantic.v1 import SecretStr
else:
    from pydantic import SecretStr


class CompatDatabase(Block):
    _block_type_name = "Compat Database"
    host: str
    port: int = 5432
    token: SecretStr


class CompatService(Block):
    _block_type_name = "Compat Service"
    label: str
    password: SecretStr
    database: CompatDatabase


mode, token = sys.argv[1], sys.argv[2]
name = f"compat-service-{token}"

if mode == "save":
    database = CompatDatabase(host="db.internal", port=6543, token=SecretStr(f"inner-tok-{token}"))
    database_id = database.save(f"compat-database-{token}", overwrite=True)
    service = CompatService(label=f"svc-{token}", password=SecretStr(f"outer-pw-{token}"), database=database)
    doc_id = service.save(name, overwrite=True)
    print("COMPAT_RESULT " + json.dumps({"id": str(doc_id), "database_id": str(database_id)}))
else:
    service = CompatService.load(name)
    assert isinstance(service.database, CompatDatabase), type(service.database)
    print(
        "COMPAT_RESULT "
        + json.dumps(
            {
                "label": service.label,
                "password": service.password.get_secret_value(),
                "host": service.database.host,
                "port": service.database.port,
                "token": service.database.token.get_secret_value(),
            }
        )
    )
