"""Every kind of trigger and action the 3.x client can build, created through the client and read back:
what the client reads must equal what it sent. Prints the mismatches (none expected)."""

import asyncio
import json
from datetime import timedelta
from uuid import uuid4

from prefect.client.orchestration import get_client
from prefect.events.actions import (
    CallWebhook,
    CancelFlowRun,
    ChangeFlowRunState,
    DeleteFlowRun,
    DoNothing,
    PauseAutomation,
    PauseDeployment,
    PauseWorkPool,
    PauseWorkQueue,
    ResumeAutomation,
    ResumeDeployment,
    ResumeFlowRun,
    ResumeWorkPool,
    ResumeWorkQueue,
    RunDeployment,
    SendNotification,
    SuspendFlowRun,
)
from prefect.events.schemas.automations import AutomationCore, CompoundTrigger, EventTrigger, Posture, SequenceTrigger

TRIGGERS = [
    EventTrigger(),
    EventTrigger(posture=Posture.Proactive),
    EventTrigger(
        after={"job.started"},
        expect={"job.done", "job.failed"},
        match={"prefect.resource.id": ["job.*", "task.*"], "owner": "ops"},
        match_related={"prefect.resource.role": "flow"},
        for_each={"prefect.resource.id"},
        threshold=3,
        within=timedelta(minutes=5),
    ),
    EventTrigger(
        expect={"prefect.flow-run.Completed"},
        match_related=[
            {"prefect.resource.role": "work-pool", "prefect.resource.name": "k8s"},
            {"prefect.resource.role": "tag", "prefect.resource.id": "prefect.tag.nightly"},
        ],
    ),
    CompoundTrigger(
        require="all",
        within=timedelta(hours=1),
        triggers=[
            EventTrigger(expect={"a"}),
            SequenceTrigger(triggers=[EventTrigger(expect={"b"}), EventTrigger(expect={"c"})]),
        ],
    ),
    CompoundTrigger(require=1, triggers=[EventTrigger(expect={"a"}), EventTrigger(posture=Posture.Proactive)]),
    SequenceTrigger(triggers=[EventTrigger(expect={"a"}), CompoundTrigger(require="any", triggers=[EventTrigger()])]),
]
ACTIONS = [
    DoNothing(),
    RunDeployment(source="inferred"),
    RunDeployment(source="selected", deployment_id=uuid4(), parameters={"x": "{{ event.id }}"}),
    PauseDeployment(source="inferred"),
    PauseDeployment(source="selected", deployment_id=uuid4()),
    ResumeDeployment(source="selected", deployment_id=uuid4()),
    ResumeFlowRun(),
    ChangeFlowRunState(state="RUNNING", name="Runnin'", message="I'm running!"),
    CancelFlowRun(),
    DeleteFlowRun(),
    SuspendFlowRun(),
    CallWebhook(block_document_id=uuid4(), payload="Hi there!"),
    SendNotification(block_document_id=uuid4(), subject="Hello, world!", body="Hi {{ flow_run.name }}!"),
    PauseWorkPool(source="inferred"),
    ResumeWorkPool(source="selected", work_pool_id=uuid4()),
    PauseWorkQueue(source="selected", work_queue_id=uuid4()),
    ResumeWorkQueue(source="inferred"),
    PauseAutomation(source="inferred"),
    ResumeAutomation(source="selected", automation_id=uuid4()),
]


async def main():
    mismatches, ids = [], []
    async with get_client() as client:
        for i, trigger in enumerate(TRIGGERS):
            automation_id = await client.create_automation(
                AutomationCore(name=f"round-trip-trigger-{i}", trigger=trigger, actions=[DoNothing()], enabled=False)
            )
            ids.append(automation_id)
            back = (await client.read_automation(automation_id)).trigger.model_dump()
            if back != trigger.model_dump():
                mismatches.append(
                    {
                        "trigger": i,
                        "sent": trigger.model_dump(mode="json"),
                        "returned": (await client.read_automation(automation_id)).trigger.model_dump(mode="json"),
                    }
                )
        for i, action in enumerate(ACTIONS):
            automation_id = await client.create_automation(
                AutomationCore(name=f"round-trip-action-{i}", trigger=EventTrigger(), actions=[action], enabled=False)
            )
            ids.append(automation_id)
            back = (await client.read_automation(automation_id)).actions[0].model_dump()
            if back != action.model_dump():
                mismatches.append({"action": i, "sent": action.model_dump(mode="json"), "returned": back})
        for automation_id in ids:
            await client.delete_automation(automation_id)
    print("COMPAT_RESULT " + json.dumps({"mismatches": mismatches, "created": len(ids)}, default=str))


if __name__ == "__main__":
    asyncio.run(main())
