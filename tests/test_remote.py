"""A member in a flow on Ray is Prefect's task engine in the flow's process plus one Ray call
for its body (chia_prefect.members.remote): where each half runs, what the body's lines and
futures become, and that a flow run's thread pool is gone when the run ends."""

from __future__ import annotations

import os
import threading

import pytest
from helpers import final_task_runs, wait_until
from nodes import RemoteProbeNode
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
from prefect.context import FlowRunContext
from prefect_ray import RayTaskRunner

from chia_prefect import FastRayTaskRunner
from chia_prefect.members import remote

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


@task(cache_policy=NO_CACHE)
def plus_one(x: int) -> int:
    return x + 1


@task(cache_policy=NO_CACHE)
def after(_: int) -> str:
    return "after"


@flow(task_runner=RayTaskRunner())
def where_the_halves_run(db: RemoteProbeNode) -> dict:
    ctx = FlowRunContext.get()
    assert ctx is not None and ctx.flow_run is not None
    seen = [db.inside("call"), db.inside.submit("submit").result()]
    seen += [f.result() for f in db.inside.map(["map-1", "map-2"])]
    return {"flow_run_id": str(ctx.flow_run.id), "seen": seen}


def test_a_members_task_engine_runs_here_and_its_body_on_ray(sqlite_path):
    with RemoteProbeNode(db_path=sqlite_path) as db:
        db.init_schema("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
        out = where_the_halves_run(db)
    seen = out["seen"]
    assert [s["tag"] for s in seen] == ["call", "submit", "map-1", "map-2"]
    assert os.getpid() not in {s["pid"] for s in seen}  # every body ran on a Ray worker
    # ... without a task run context there: the engine ran in this process.
    assert [s["task_run_context"] for s in seen] == [False] * 4
    with get_client(sync_client=True) as client:
        runs = final_task_runs(out["flow_run_id"], count=4)
        inside = [r for r in runs if r.name.startswith("sqlite.inside")]
        assert len(inside) == 4 and all(r.state_type.value == "COMPLETED" for r in inside), runs

        # The line each body logged is on its task run, sent by the driver.
        def logged() -> list[str] | None:
            logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[r.id for r in inside])))
            lines = [log.message for log in logs if log.message.startswith("body of ")]
            return lines if len(lines) == 4 else None

        lines = wait_until(logged, timeout=30)
    assert sorted(line.split(" on pid")[0] for line in lines) == [
        "body of call", "body of map-1", "body of map-2", "body of submit"]


@flow(task_runner=FastRayTaskRunner())
def members_whose_worker_dies(db: RemoteProbeNode) -> dict:
    ctx = FlowRunContext.get()
    assert ctx is not None and ctx.flow_run is not None
    out: dict = {"flow_run_id": str(ctx.flow_run.id)}
    try:
        out["called"] = repr(db.exit_worker())
    except Exception as exc:  # noqa: BLE001
        out["called"] = type(exc).__name__
    try:
        out["submitted"] = repr(db.exit_worker.submit().result())
    except Exception as exc:  # noqa: BLE001
        out["submitted"] = type(exc).__name__
    out["state"] = db.exit_worker(return_state=True).type.value
    return out


def test_a_member_whose_worker_dies_raises_when_called_as_when_submitted(sqlite_path):
    """A call raises Ray's error as a future does (it returned the Crashed state as its
    value), and the task run is Crashed either way."""
    with RemoteProbeNode(db_path=sqlite_path) as db:
        db.init_schema("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
        out = members_whose_worker_dies(db)
    assert (out["called"], out["submitted"], out["state"]) == ("WorkerCrashedError", "WorkerCrashedError", "CRASHED")
    runs = final_task_runs(out["flow_run_id"], count=3)
    assert sorted(r.state_type.value for r in runs if r.name.startswith("sqlite.exit_worker")) == ["CRASHED"] * 3


@flow(task_runner=FastRayTaskRunner())
def futures_into_ray_tasks(db: RemoteProbeNode) -> list:
    value = db.query_value.submit("SELECT 41")
    inside = db.inside.submit("upstream")
    return [plus_one.submit(value).result(), after.submit(1, wait_for=[inside]).result()]


def test_a_members_future_passed_to_a_ray_task_is_resolved_first(sqlite_path):
    """A member's future lives in the flow's process: a plain task bound for a Ray worker
    gets its result (as a parameter) or waits for it (wait_for)."""
    with RemoteProbeNode(db_path=sqlite_path) as db:
        db.init_schema("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
        assert futures_into_ray_tasks(db) == [42, "after"]


@flow(task_runner=FastRayTaskRunner())
def many_submits(db: RemoteProbeNode, n: int) -> int:
    futures = db.query_value.map([f"SELECT {i}" for i in range(n)])
    unawaited = db.inside.submit("never waited for")  # the pool still finishes it
    assert unawaited is not None
    return sum(f.result() for f in futures)


def test_each_flow_runs_pool_is_closed_and_its_threads_end(sqlite_path):
    """Run 6 flow runs of 20 members at once each: no pool stays open, and the process
    ends with the threads it had (give or take Prefect's and Ray's own)."""
    with RemoteProbeNode(db_path=sqlite_path) as db:
        db.init_schema("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
        assert many_submits(db, 20) == sum(range(20))  # warm: Prefect's own threads start
        before = threading.active_count()
        for _ in range(6):
            assert many_submits(db, 20) == sum(range(20))
            assert remote.open_pools() == 0
    wait_until(lambda: threading.active_count() <= before + 2 or None, timeout=30)
