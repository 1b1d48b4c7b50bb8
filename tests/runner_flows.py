"""Flows run on the stock RayTaskRunner and on FastRayTaskRunner, side by side.

Importable by Ray workers (tests/ is on their PYTHONPATH).
"""

from __future__ import annotations

import inspect

from prefect import flow, get_run_logger, tags, task
from prefect.cache_policies import NO_CACHE
from prefect_ray import RayTaskRunner

from chia_prefect import SQLiteNode
from chia_prefect.runner import FastRayTaskRunner

RUNNERS = {"stock": RayTaskRunner, "fast": FastRayTaskRunner}


@task(cache_policy=NO_CACHE)
def add(a: int, b: int) -> int:
    get_run_logger().info("adding %s and %s", a, b)
    return a + b


@task(cache_policy=NO_CACHE)
def double(x: int) -> int:
    return 2 * x


@task(cache_policy=NO_CACHE)
async def async_square(x: int) -> int:
    get_run_logger().warning("squaring %s", x)
    return x * x


@task(cache_policy=NO_CACHE)
def explode(reason: str) -> None:
    raise ValueError(f"exploded: {reason}")


@task(cache_policy=NO_CACHE)
def worker_view() -> dict:
    """What the worker sees: the API it talks to, a setting, and which runner ran it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    frames = {frame.function for frame in inspect.stack()}
    return {
        "api": str(get_client(sync_client=True).api_url),
        "retry_delay": get_current_settings().tasks.default_retry_delay_seconds,
        "fast_path": "_run_prefect_task_fast" in frames,
        "stock_path": "_run_prefect_task" in frames,
    }


def pipeline(db_path: str) -> dict:
    first = add.submit(1, 2)
    second = double.submit(first)
    squared = async_square.submit(4)
    with tags("side-by-side"):
        tagged = add.submit(10, 20)
    failed = explode.submit("on purpose")
    failed.wait()
    with SQLiteNode(db_path=db_path) as db:
        db.init_schema("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
        db.execute("INSERT INTO t (v) VALUES (?)", ("x",))
        rows = db.query("SELECT id, v FROM t")
    return {
        "second": second.result(),
        "squared": squared.result(),
        "tagged": tagged.result(),
        "failed": type(failed.state).__name__ + ":" + failed.state.type.value,
        "failed_message": str(failed.state.message),
        "rows": rows,
    }


@flow(name="side-by-side-stock", task_runner=RayTaskRunner())
def stock_pipeline(db_path: str) -> dict:
    return pipeline(db_path)


@flow(name="side-by-side-fast", task_runner=FastRayTaskRunner())
def fast_pipeline(db_path: str) -> dict:
    return pipeline(db_path)


@flow(task_runner=FastRayTaskRunner())
def fast_views(n: int = 2) -> list[dict]:
    return [worker_view.submit().result() for _ in range(n)]


@flow(task_runner=RayTaskRunner())
def stock_views(n: int = 2) -> list[dict]:
    return [worker_view.submit().result() for _ in range(n)]
