"""The flow the lifecycle soak serves (tests/test_lifecycle.py): saved SQLite nodes, loaded
by block name and used without `close()`, on a long-lived Ray cluster (RAY_ADDRESS).

    python tests/served_flow.py DEPLOYMENT_NAME
"""

from __future__ import annotations

import os
import sys

from prefect import flow

from chia_prefect import FastRayTaskRunner, SQLiteNode


@flow(task_runner=FastRayTaskRunner())  # joins the cluster named by RAY_ADDRESS
def soak_visit(names: list[str]) -> dict:
    import ray

    total = 0
    for name in names:
        db = SQLiteNode.load(name)
        db.execute("INSERT INTO t (x) VALUES (1)")
        total += db.query_value("SELECT COUNT(*) FROM t")
    return {"total": total, "job": ray.get_runtime_context().get_job_id(), "pid": os.getpid()}


if __name__ == "__main__":
    soak_visit.serve(name=sys.argv[1])
