"""flow.serve(triggers=[DeploymentEventTrigger(...)]): the trigger becomes an automation owned by the
deployment; an event it expects runs the deployment with templated parameters. argv[1]: the event name."""

import sys

from prefect import flow, get_run_logger
from prefect.events import DeploymentEventTrigger


@flow(name="p3-triggered")
def triggered(who: str = "nobody"):
    get_run_logger().info("triggered by %s", who)
    return who


if __name__ == "__main__":
    event_name = sys.argv[1]
    triggered.serve(
        name="p3-triggered-deployment",
        triggers=[DeploymentEventTrigger(expect={event_name}, parameters={"who": "{{ event.resource.name }}"})],
    )
