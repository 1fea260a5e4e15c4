"""flow.serve(): a deployment served by this process, run by `prefect deployment run`."""

from prefect import flow, get_run_logger, task


@task
def shout(x):
    get_run_logger().info("shouting %s", x)
    return f"{x}!"


@flow(name="p3-served")
def served(x: int = 1):
    get_run_logger().info("served run x=%s", x)
    return shout(x)


if __name__ == "__main__":
    served.serve(name="p3-served-deployment")
