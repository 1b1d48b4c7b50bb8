"""A write whose Ray worker is SIGKILLed mid-statement runs once, never again; its future raises.

The flow finds the worker by its process title (Ray names it `ray::<task name>` while it
runs the task), waits until the statement is visibly in progress, and kills it.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from prefect import flow
from prefect_ray import RayTaskRunner

from chia_prefect import DatabaseNode

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

SQLITE_SLOW_INSERT = (
    "INSERT INTO t (x) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
    "WHERE x < 6000000) SELECT x FROM c"
)
POSTGRES_SLOW_INSERT = "INSERT INTO t (x) SELECT 1 FROM pg_sleep(4)"


def workers_running(task_name: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith(f"ray::{task_name}"):
            found.append(proc)
    return found


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")


def sqlite_statement_in_progress(db: DatabaseNode) -> bool:
    wal = db.db_path + "-wal"
    return os.path.exists(wal) and os.path.getsize(wal) > 1_000_000


def postgres_statement_in_progress(db: DatabaseNode) -> bool:
    import psycopg

    with psycopg.connect(db.dsn.get_secret_value(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'INSERT INTO t%%'"
        ).fetchone()
    return row[0] > 0


@flow(task_runner=RayTaskRunner())
def kill_mid_write(db: DatabaseNode, sql: str, retries: int) -> dict:
    member = db.execute.with_options(retries=retries) if retries else db.execute
    future = member.submit(sql)
    name = f"{db.engine}.execute"
    victim = wait_until(lambda: workers_running(name))[0]
    in_progress = sqlite_statement_in_progress if db.engine == "sqlite" else postgres_statement_in_progress
    wait_until(lambda: in_progress(db))
    victim.send_signal(signal.SIGKILL)
    seen = {"victim": victim.pid, "task_run_id": str(future.task_run_id)}
    try:
        result = future.result(timeout=120)
        return {**seen, "raised": None, "rowcount": result.rowcount}
    except Exception as exc:  # noqa: BLE001 - the type is the observation
        return {**seen, "raised": type(exc).__name__}


def task_run_state(task_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_task_run(task_run_id).state.type.value


def _count(db: DatabaseNode) -> int:
    return db.query_value("SELECT COUNT(*) FROM t")


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_killed_write_is_not_replayed(request, engine):
    db = request.getfixturevalue(f"{engine}_db")
    db.init_schema("CREATE TABLE t (x INTEGER)")
    out = kill_mid_write(db, SQLITE_SLOW_INSERT if engine == "sqlite" else POSTGRES_SLOW_INSERT, 0)
    assert out["raised"] == "WorkerCrashedError", out  # the future raises
    assert task_run_state(out["task_run_id"]) == "CRASHED"  # not left Running on the server
    assert not psutil.pid_exists(out["victim"]) or psutil.Process(out["victim"]).status() == "zombie"
    # Long enough for a replay to start and finish; none may.
    time.sleep(6)
    assert workers_running(f"{engine}.execute") == []
    assert _count(db) == 0


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_explicit_retries_opt_in_reaches_ray(request, engine):
    """Control: with_options(retries=1) lets Ray replay the killed write, so it lands."""
    db = request.getfixturevalue(f"{engine}_db")
    db.init_schema("CREATE TABLE t (x INTEGER)")
    out = kill_mid_write(db, SQLITE_SLOW_INSERT if engine == "sqlite" else POSTGRES_SLOW_INSERT, 1)
    assert _count(db) == (6_000_000 if engine == "sqlite" else 1), out
    assert out["raised"] is None and task_run_state(out["task_run_id"]) == "COMPLETED"


@flow(task_runner=RayTaskRunner())
def kill_after_commit(db: DatabaseNode, trials: int, marker_dir: str) -> list[dict]:
    outcomes = []
    for trial in range(trials):
        marker = os.path.join(marker_dir, f"committed-{trial}")
        future = db.insert_then_hang.submit(trial, marker)
        pid = int(wait_until(lambda: os.path.exists(marker) and open(marker).read()))
        os.kill(pid, signal.SIGKILL)
        try:
            future.result(timeout=120)
            outcomes.append({"raised": None})
        except Exception as exc:  # noqa: BLE001 - the type is the observation
            outcomes.append({"raised": type(exc).__name__, "task_run_id": str(future.task_run_id)})
    return outcomes


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_killed_after_commit_is_applied_exactly_once(request, engine, tmp_path):
    from nodes import CommitThenHangPostgresNode, CommitThenHangSQLiteNode

    if engine == "sqlite":
        db = CommitThenHangSQLiteNode(db_path=request.getfixturevalue("sqlite_path"))
    else:
        db = CommitThenHangPostgresNode(dsn=request.getfixturevalue("postgres_dsn"))
    trials = 3
    with db:
        db.init_schema("CREATE TABLE t (x INTEGER)")
        outcomes = kill_after_commit(db, trials, str(tmp_path))
        assert [o["raised"] for o in outcomes] == ["WorkerCrashedError"] * trials
        assert {task_run_state(o["task_run_id"]) for o in outcomes} == {"CRASHED"}
        time.sleep(3)  # a replay would insert again
        rows = db.query("SELECT x, COUNT(*) AS n FROM t GROUP BY x ORDER BY x")
    assert rows == [{"x": trial, "n": 1} for trial in range(trials)]  # committed once, never replayed
