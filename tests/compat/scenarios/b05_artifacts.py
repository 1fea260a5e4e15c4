"""Markdown, table and link artifacts with keys, created by two flow runs of one flow.

argv[1]: a token (part of the keys). The run number is a flow parameter.
"""

import json
import sys

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact


@flow(name="compat-artifacts")
def report(token: str, run_number: int):
    create_markdown_artifact(
        markdown=f"# Report {run_number}\n\n*token* {token}",
        key=f"md-{token}",
        description=f"markdown run {run_number}",
    )
    create_table_artifact(
        table=[{"run": run_number, "x": 1}, {"run": run_number, "x": 2}],
        key=f"tbl-{token}",
        description=f"table run {run_number}",
    )
    create_link_artifact(
        link=f"https://example.com/{token}/{run_number}",
        link_text=f"result {run_number}",
        key=f"lnk-{token}",
        description=f"link run {run_number}",
    )
    return run_number


if __name__ == "__main__":
    token = sys.argv[1]
    states = [report(token, n, return_state=True) for n in (1, 2)]
    assert [s.result() for s in states] == [1, 2]
    print("COMPAT_RESULT " + json.dumps({"flow_run_ids": [str(s.state_details.flow_run_id) for s in states]}))
