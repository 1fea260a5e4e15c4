"""Loads blocks of the core types that a person made in our UI, with the schemas our server registers at
start (not the SDK's), by `Block.load("SLUG/NAME")`; runs under the 2.20 and the 3.9 SDK. Argument: a JSON
object of slug -> block name. Prints what each block holds, or why it did not load."""

import json
import sys

from prefect.blocks.core import Block


def held(block) -> dict:
    """What the block holds, with its secrets read back."""
    out = {"class": type(block).__name__}
    for name, value in block:
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        elif hasattr(value, "isoformat"):
            value = value.isoformat()
        out[name] = dict(value) if isinstance(value, dict) else value
    return out


def load_each(names: dict) -> dict:
    found = {}
    for slug, name in names.items():
        try:
            found[slug] = held(Block.load(f"{slug}/{name}"))
        except Exception as exc:  # noqa: BLE001 - the test shows what went wrong
            found[slug] = {"error": repr(exc)[:500]}
    return found


if __name__ == "__main__":
    print("COMPAT_RESULT " + json.dumps(load_each(json.loads(sys.argv[1])), default=str))
