"""task.map over 10 items, with an unmapped argument."""

import json

from prefect import flow, task, unmapped


@task
def scale(x, factor):
    return x * factor


@flow(name="compat-map")
def mapper():
    futures = scale.map(list(range(10)), factor=unmapped(3))
    return sum(f.result() for f in futures)


if __name__ == "__main__":
    state = mapper(return_state=True)
    assert state.result() == 135
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
