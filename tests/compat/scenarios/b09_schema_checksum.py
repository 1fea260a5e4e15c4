"""The SDK registers a block type with a secret and a nested block, then looks each schema up by the
checksum it computes itself (Block._calculate_schema_checksum); runs under the 2.20 and the 3.9 SDK.
The lookups were 404s: the server hashed the fields another way."""

import asyncio
import json

import prefect
from prefect import get_client
from prefect.blocks.core import Block

if prefect.__version__.startswith("2."):  # 2.20 keeps its models on pydantic.v1
    from pydantic.v1 import SecretStr
else:
    from pydantic import SecretStr


class CompatChecksumInner(Block):
    _block_type_name = "Compat Checksum Inner"
    token: SecretStr


class CompatChecksumStore(Block):
    _block_type_name = "Compat Checksum Store"
    url: str
    password: SecretStr
    inner: CompatChecksumInner


async def lookups():
    found = {}
    async with get_client() as client:
        for cls in (CompatChecksumInner, CompatChecksumStore):
            checksum = cls._calculate_schema_checksum()
            try:
                schema = await client.read_block_schema_by_checksum(checksum)
                found[cls.__name__] = {"sdk": checksum, "server": schema.checksum, "id": str(schema.id)}
            except Exception as exc:  # noqa: BLE001 - the test shows what went wrong
                found[cls.__name__] = {"sdk": checksum, "error": repr(exc)[:500]}
    return found


if __name__ == "__main__":
    CompatChecksumStore.register_type_and_schema()
    print("COMPAT_RESULT " + json.dumps(asyncio.run(lookups())))
