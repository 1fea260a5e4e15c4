"""Read a flow run's task-run events back with the SDK's own client, following next_page links."""

import json
import sys

from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventOrder, EventRelatedFilter

if __name__ == "__main__":
    flow_run_id = sys.argv[1]
    flt = EventFilter(
        event=EventNameFilter(prefix=["prefect.task-run."]),
        related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
        order=EventOrder.ASC,
    )
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=flt, limit=2)
        names, total, pages = [e.event for e in page.events], page.total, 1
        while page.next_page:
            page = client.read_events_page(page.next_page)
            names += [e.event for e in page.events]
            pages += 1
        try:  # the client's default limit, 100, is more than a page: Prefect's own server answers 422
            default_limit_count = len(client.read_events(filter=flt).events)
        except Exception as exc:  # noqa: BLE001
            default_limit_count = repr(exc)[:300]
    print(
        "COMPAT_RESULT "
        + json.dumps({"names": names, "total": total, "pages": pages, "default_limit_count": default_limit_count})
    )
