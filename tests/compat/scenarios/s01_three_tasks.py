"""Three tasks passing data, with get_run_logger logs at several levels."""

import json

from prefect import flow, get_run_logger, task


@task
def fetch(n):
    get_run_logger().info("fetched %d numbers", n)
    return list(range(1, n + 1))


@task
def double(xs):
    get_run_logger().warning("doubling %s", xs)
    return [2 * x for x in xs]


@task
def total(xs):
    get_run_logger().error("total is %d", sum(xs))
    return sum(xs)


@flow(name="compat-three-tasks")
def pipeline(n: int = 4):
    logger = get_run_logger()
    logger.info("pipeline starting with n=%d", n)
    result = total(double(fetch(n)))
    logger.info("pipeline result %d", result)
    return result


if __name__ == "__main__":
    state = pipeline(4, return_state=True)
    assert state.is_completed(), state
    assert state.result() == 20
    print("COMPAT_RESULT " + json.dumps({"flow_run_id": str(state.state_details.flow_run_id)}))
