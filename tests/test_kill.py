"""Workers SIGKILLed mid-write and right after COMMIT: never replayed, never applied twice.

Each case runs TRIALS kills (20 by default, `CHIA_KILL_TRIALS` to change) in one flow run.
The flow finds the worker by its process title (Ray names it `ray::<task name>` while it
runs the task), waits until the statement is visibly in progress, and kills it. Every
killed task's future raises and its run is recorded CRASHED in Prefect.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time

import psutil
import pytest
from helpers import FINAL_STATES, SHARED, session_ray_processes, wait_until
from prefect import flow
from prefect_ray import RayTaskRunner

from chia_prefect import DatabaseNode

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.reliability, pytest.mark.usefixtures("ray_cluster")]

TRIALS = int(os.environ.get("CHIA_KILL_TRIALS", "20"))
BATCH = 4  # kills at once where trials are independent
SQLITE_SLOW_INSERT = (
    "INSERT INTO t (x) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
    "WHERE x < 6000000) SELECT ? FROM c"
)
# 100k rows written, then a long sleep inside the same statement: a batch's first worker is
# still mid-write when its last one starts, however slowly workers come up.
POSTGRES_SLOW_INSERT = (
    "INSERT INTO t (x) SELECT p.v FROM (SELECT %s::int AS v) p, LATERAL "
    "(SELECT 1 FROM generate_series(1, 100000) UNION ALL SELECT 1 FROM pg_sleep(60)) s"
)
# The control is one trial, killed as soon as it runs; a replay must finish in reasonable time.
POSTGRES_CONTROL_INSERT = "INSERT INTO t (x) SELECT %s FROM generate_series(1, 3000000)"


def workers_running(task_name: str) -> list[psutil.Process]:
    """This session's Ray workers running `task_name` (not another pytest worker's)."""
    found = []
    for pid, name in session_ray_processes().items():
        if name.startswith(f"ray::{task_name}"):
            try:
                found.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
    return found


def sqlite_reset_wal(db: DatabaseNode) -> None:
    """Empty the WAL, so that its growth shows the next statement writing."""
    conn = sqlite3.connect(db.db_path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def sqlite_statement_in_progress(db: DatabaseNode) -> bool:
    # The WAL can vanish between two looks: the last connection to close (a
    # write's connection closes in a thread after its commit) checkpoints and
    # deletes it.
    try:
        return os.path.getsize(db.db_path + "-wal") > 1_000_000
    except FileNotFoundError:
        return False


def postgres_active_inserts(db: DatabaseNode) -> int:
    import psycopg

    with psycopg.connect(db.dsn.get_secret_value(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'INSERT INTO t%%' "
            "AND state <> 'idle' AND pid <> pg_backend_pid()"
        ).fetchone()
    return row[0]


def postgres_statements_in_progress(db: DatabaseNode, n: int) -> bool:
    return postgres_active_inserts(db) >= n


def postgres_notice_dead_clients(db: DatabaseNode) -> None:
    """Have backends of killed clients stop at once instead of finishing their statement."""
    import psycopg

    with psycopg.connect(db.dsn.get_secret_value(), autocommit=True) as conn:
        name = conn.info.dbname
        conn.execute(f'ALTER DATABASE "{name}" SET client_connection_check_interval = 100')


def batches(trials: int, size: int) -> list[range]:
    return [range(start, min(start + size, trials)) for start in range(0, trials, size)]


def kill_all(victims: list[psutil.Process]) -> None:
    time.sleep(random.uniform(0, 0.3))  # somewhere in the statement, not always its start
    for victim in victims:
        victim.send_signal(signal.SIGKILL)


def outcome(future, victim_pids: list[int]) -> dict:
    seen = {"victims": victim_pids, "task_run_id": str(future.task_run_id)}
    try:
        result = future.result(timeout=120)
        return {**seen, "raised": None, "result": result}
    except Exception as exc:  # noqa: BLE001 - the type is the observation
        return {**seen, "raised": type(exc).__name__}


@flow(task_runner=RayTaskRunner())
def kill_mid_write(db: DatabaseNode, sql: str, trials: int, retries: int) -> list[dict]:
    """SIGKILL the worker of each write while its statement runs.

    PostgreSQL trials run BATCH at a time (independent rows); SQLite has one writer at a
    time, so its trials run one by one.
    """
    member = db.execute.with_options(retries=retries) if retries else db.execute
    name = f"{db.engine}.execute"
    sqlite = db.engine == "sqlite"
    outcomes = []
    for batch in batches(trials, 1 if sqlite else BATCH):
        if sqlite:
            sqlite_reset_wal(db)
        else:  # the last batch's server backends must have noticed their clients are gone
            wait_until(lambda: postgres_active_inserts(db) == 0)
        futures = [member.submit(sql, (trial,)) for trial in batch]
        n = len(batch)
        victims = wait_until(lambda n=n: len(found := workers_running(name)) >= n and found)
        if sqlite:
            wait_until(lambda: sqlite_statement_in_progress(db))
        else:
            wait_until(lambda n=n: postgres_statements_in_progress(db, n))
        kill_all(victims)
        outcomes += [outcome(future, [v.pid for v in victims]) for future in futures]
    return outcomes


def task_run_state(task_run_id: str, timeout: float = 30.0) -> str:
    """The task run's state once it is final. A worker reports its states as events, which
    the server records a moment later: a read right after the call returned can still see
    RUNNING, or no state at all (once in CI: the run's row was there, its state not yet).
    After `timeout`, the last state read (so a run stuck in RUNNING, or without a state,
    fails the test)."""
    from prefect.client.orchestration import get_client

    def read() -> str:
        with get_client(sync_client=True) as client:
            state = client.read_task_run(task_run_id).state
        return "NO STATE" if state is None else state.type.value

    deadline = time.monotonic() + timeout
    while (state := read()) not in FINAL_STATES and time.monotonic() < deadline:
        time.sleep(0.25)
    return state


def _count(db: DatabaseNode) -> int:
    return db.query_value("SELECT COUNT(*) FROM t")


def slow_insert(engine: str) -> str:
    return SQLITE_SLOW_INSERT if engine == "sqlite" else POSTGRES_SLOW_INSERT


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_killed_write_is_not_replayed(request, engine):
    db = request.getfixturevalue(f"{engine}_db")
    db.init_schema("CREATE TABLE t (x INTEGER)")
    if engine == "postgres":
        postgres_notice_dead_clients(db)
    outcomes = kill_mid_write(db, slow_insert(engine), TRIALS, 0)
    assert [o["raised"] for o in outcomes] == ["WorkerCrashedError"] * TRIALS, outcomes  # each future raises
    # Not left Running on the server: the driver records the crash.
    assert [task_run_state(o["task_run_id"]) for o in outcomes] == ["CRASHED"] * TRIALS
    for pid in {pid for out in outcomes for pid in out["victims"]}:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    # Long enough for a replay of the last kill to start and finish; none may.
    time.sleep(6)
    assert workers_running(f"{engine}.execute") == []
    if engine == "postgres":
        wait_until(lambda: postgres_active_inserts(db) == 0)
    assert _count(db) == 0  # no killed statement left a row behind


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_explicit_retries_opt_in_reaches_ray(request, engine):
    """Control: with_options(retries=1) lets Ray replay the killed write, so it lands."""
    db = request.getfixturevalue(f"{engine}_db")
    db.init_schema("CREATE TABLE t (x INTEGER)")
    [out] = kill_mid_write(db, SQLITE_SLOW_INSERT if engine == "sqlite" else POSTGRES_CONTROL_INSERT, 1, 1)
    assert _count(db) == (6_000_000 if engine == "sqlite" else 3_000_000), out
    assert out["raised"] is None and task_run_state(out["task_run_id"]) == "COMPLETED"


def read_marker(path: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


def kill_when_marked(futures: list, markers: list[str]) -> list[dict]:
    """SIGKILL each worker once it wrote its pid to its marker (after COMMIT); the outcomes."""
    pids = [int(wait_until(lambda m=m: read_marker(m))) for m in markers]
    kill_all([psutil.Process(pid) for pid in pids])
    return [outcome(future, pids) for future in futures]


@flow(task_runner=RayTaskRunner())
def kill_after_commit(db: DatabaseNode, trials: int, marker_dir: str) -> list[dict]:
    """SIGKILL each write's worker after its COMMIT, before it returns; BATCH at a time.

    Batches go through `.map`, so crashes of mapped futures are recorded too.
    """
    outcomes = []
    for batch in batches(trials, BATCH):
        markers = [os.path.join(marker_dir, f"committed-{trial}") for trial in batch]
        outcomes += kill_when_marked(db.insert_then_hang.map(list(batch), markers), markers)
    return outcomes


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_killed_after_commit_is_applied_exactly_once(request, engine, tmp_path):
    from nodes import CommitThenHangPostgresNode, CommitThenHangSQLiteNode

    if engine == "sqlite":
        db = CommitThenHangSQLiteNode(db_path=request.getfixturevalue("sqlite_path"))
    else:
        db = CommitThenHangPostgresNode(dsn=request.getfixturevalue("postgres_dsn"))
    with db:
        db.init_schema("CREATE TABLE t (x INTEGER)")
        outcomes = kill_after_commit(db, TRIALS, str(tmp_path))
        assert [o["raised"] for o in outcomes] == ["WorkerCrashedError"] * TRIALS, outcomes
        assert [task_run_state(o["task_run_id"]) for o in outcomes] == ["CRASHED"] * TRIALS
        time.sleep(3)  # a replay would insert again
        rows = db.query("SELECT x, COUNT(*) AS n FROM t GROUP BY x ORDER BY x")
    assert rows == [{"x": trial, "n": 1} for trial in range(TRIALS)]  # committed once, never replayed


# --- keyed writes: retried, applied once ---------------------------------------------

# Slow enough to be killed mid-statement, quick enough to replay 20 times.
SQLITE_KEYED_INSERT = (
    "INSERT INTO t (x) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
    "WHERE x < 1000000) SELECT ? FROM c"
)
SQLITE_KEYED_ROWS = 1_000_000
# 100k rows, then a 60 s sleep on the first attempt of a trial only: `tries_<trial>` is a
# sequence, which a rollback does not undo, so the replay skips the sleep.
POSTGRES_KEYED_INSERT = (
    "INSERT INTO t (x) SELECT p.v FROM (SELECT %s::int AS v) p, LATERAL "
    "(SELECT 1 FROM generate_series(1, 100000) UNION ALL SELECT 1 FROM "
    "pg_sleep(CASE WHEN nextval(('tries_' || %s)::regclass) = 1 THEN 60 ELSE 0 END)) s"
)
POSTGRES_KEYED_ROWS = 100_001


@flow(task_runner=RayTaskRunner())
def kill_keyed_mid_write(db: DatabaseNode, trials: int) -> list[dict]:
    """SIGKILL the worker of each keyed write (`retries=2`, key "auto") while its statement
    runs; Ray replays it. SQLite trials one by one, PostgreSQL BATCH at a time."""
    member = db.execute.with_options(retries=2)
    sqlite = db.engine == "sqlite"
    name = f"{db.engine}.execute"
    outcomes = []
    for batch in batches(trials, 1 if sqlite else BATCH):
        if sqlite:
            sqlite_reset_wal(db)
        else:
            wait_until(lambda: postgres_active_inserts(db) == 0)
        futures = [member.submit(SQLITE_KEYED_INSERT, (trial,), idempotency_key="auto") if sqlite
                   else member.submit(POSTGRES_KEYED_INSERT, (trial, trial), idempotency_key="auto")
                   for trial in batch]
        n = len(batch)
        victims = wait_until(lambda n=n: len(found := workers_running(name)) >= n and found)
        if sqlite:
            wait_until(lambda: sqlite_statement_in_progress(db))
        else:
            wait_until(lambda n=n: postgres_statements_in_progress(db, n))
        kill_all(victims)
        outcomes += [outcome(future, [v.pid for v in victims]) for future in futures]
    return outcomes


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_keyed_write_killed_mid_statement_lands_once_after_the_retry(request, engine):
    db = request.getfixturevalue(f"{engine}_db")
    db.init_schema("CREATE TABLE t (x INTEGER)")
    if engine == "postgres":
        postgres_notice_dead_clients(db)
        db.executescript(";".join(f"CREATE SEQUENCE tries_{trial}" for trial in range(TRIALS)))
    outcomes = kill_keyed_mid_write(db, TRIALS)
    assert [o["raised"] for o in outcomes] == [None] * TRIALS, outcomes  # each call returned
    assert [task_run_state(o["task_run_id"]) for o in outcomes] == ["COMPLETED"] * TRIALS
    rows = SQLITE_KEYED_ROWS if engine == "sqlite" else POSTGRES_KEYED_ROWS
    assert [o["result"].rowcount for o in outcomes] == [rows] * TRIALS
    counts = db.query("SELECT x, COUNT(*) AS n FROM t GROUP BY x ORDER BY x")
    assert counts == [{"x": trial, "n": rows} for trial in range(TRIALS)]  # each trial exactly once


@flow(task_runner=RayTaskRunner())
def kill_keyed_after_commit(db: DatabaseNode, trials: int, marker_dir: str) -> list[dict]:
    """SIGKILL each keyed write's worker (`retries=2`, key "auto") after the key, the row
    and the result committed, before the call returned; BATCH at a time."""
    member = db.execute.with_options(retries=2)
    sql = "INSERT INTO t (x) VALUES (?)" if db.engine == "sqlite" else "INSERT INTO t (x) VALUES (%s)"
    outcomes = []
    for batch in batches(trials, BATCH):
        futures = [member.submit(sql, (trial,), idempotency_key="auto") for trial in batch]
        markers = [os.path.join(marker_dir, f"auto_{future.task_run_id}_{db.engine}.execute") for future in futures]
        outcomes += kill_when_marked(futures, markers)
    return outcomes


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_keyed_write_killed_after_commit_returns_the_recorded_result(request, engine, tmp_path):
    from nodes import HangAfterKeyedCommitPostgresNode, HangAfterKeyedCommitSQLiteNode

    if engine == "sqlite":
        db = HangAfterKeyedCommitSQLiteNode(db_path=request.getfixturevalue("sqlite_path"), marker_dir=str(tmp_path))
    else:
        db = HangAfterKeyedCommitPostgresNode(dsn=request.getfixturevalue("postgres_dsn"), marker_dir=str(tmp_path))
    with db:
        db.init_schema("CREATE TABLE t (x INTEGER)")
        outcomes = kill_keyed_after_commit(db, TRIALS, str(tmp_path))
        assert [o["raised"] for o in outcomes] == [None] * TRIALS, outcomes  # the replay returned
        assert [task_run_state(o["task_run_id"]) for o in outcomes] == ["COMPLETED"] * TRIALS
        for o in outcomes:  # what the first, killed attempt recorded
            recorded = db.write_outcome(f"auto:{o['task_run_id']}:{engine}.execute")
            assert recorded.committed and recorded.result == o["result"] and o["result"].rowcount == 1
        rows = db.query("SELECT x, COUNT(*) AS n FROM t GROUP BY x ORDER BY x")
    assert rows == [{"x": trial, "n": 1} for trial in range(TRIALS)]  # committed once, replayed without effect


@flow(task_runner=RayTaskRunner())
def one_key_sixteen_calls(db: DatabaseNode, sql: str) -> list:
    futures = [db.execute.submit(sql, ("once",), idempotency_key="sixteen") for _ in range(16)]
    return [future.result(timeout=120) for future in futures]


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_sixteen_calls_with_one_key_on_ray_apply_once(request, engine):
    db = request.getfixturevalue(f"{engine}_db")
    db.init_schema("CREATE TABLE entry (name TEXT)")
    sql = "INSERT INTO entry (name) VALUES (?)" if engine == "sqlite" else "INSERT INTO entry (name) VALUES (%s)"
    results = one_key_sixteen_calls(db, sql)
    assert len(results) == 16 and all(result == results[0] for result in results)
    assert db.query("SELECT name FROM entry") == [{"name": "once"}]


@flow(task_runner=RayTaskRunner())
def keyed_write_on_a_preempted_node(db: DatabaseNode, key: str, marker: str) -> dict:
    """A keyed write (`retries=2`) commits on the doomed node and hangs there; the node is
    drained (preemption, as an autoscaler announces it through the GCS), a replacement
    joins, and the doomed node is removed at its deadline."""
    import helpers
    import ray
    from ray.core.generated import autoscaler_pb2

    cluster, doomed = helpers.SHARED["cluster"], helpers.SHARED["doomed"]
    future = db.execute.with_options(retries=2).submit("INSERT INTO t (x) VALUES (%s)", (1,), idempotency_key=key)
    pid = int(wait_until(lambda: read_marker(marker), timeout=120))
    accepted, why = ray._raylet.GcsClient(address=cluster.address).drain_node(
        doomed.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "test: preempted", int(time.time() * 1000) + 1000)
    helpers.SHARED["added"].append(cluster.add_node(num_cpus=1, resources={"drainable": 1}))
    time.sleep(1)  # the deadline: the machine is gone
    cluster.remove_node(doomed, allow_graceful=False)
    removed_at = time.monotonic()
    out = outcome(future, [pid])
    return {**out, "drain_accepted": accepted, "why": why, "seconds_after_removal": time.monotonic() - removed_at}


@pytest.mark.postgres
def test_a_keyed_write_on_a_drained_node_applies_once(ray_cluster, postgres_dsn, tmp_path):
    """Ray replays the write on the replacement node, and it applies once."""
    from nodes import HangAfterKeyedCommitPostgresNode

    from chia_prefect import Placement

    cluster = ray_cluster["cluster"]
    doomed = cluster.add_node(num_cpus=1, resources={"drainable": 1})
    cluster.wait_for_nodes()
    SHARED.update(cluster=cluster, doomed=doomed, added=[])
    db = HangAfterKeyedCommitPostgresNode(
        dsn=postgres_dsn, marker_dir=str(tmp_path),
        placement=Placement(require_colocated=True, reserve_bundle={"CPU": 0.5, "drainable": 0.5}))
    try:
        with db:
            db.init_schema("CREATE TABLE t (x INTEGER)")
            out = keyed_write_on_a_preempted_node(db, "drained", str(tmp_path / "drained"))
            assert out["drain_accepted"], out["why"]
            assert out["raised"] is None, out
            # Not the hung first attempt finishing (it sleeps 120 s): a replay, elsewhere.
            assert out["seconds_after_removal"] < 90 and not psutil.pid_exists(out["victims"][0]), out
            assert out["result"] == db.write_outcome("drained").result and out["result"].rowcount == 1
            assert db.query("SELECT x FROM t") == [{"x": 1}]  # committed on the drained node, not again
            assert task_run_state(out["task_run_id"]) == "COMPLETED"
    finally:
        for node in SHARED.pop("added", []):
            cluster.remove_node(node)
        if doomed in cluster.worker_nodes:
            cluster.remove_node(doomed)
        SHARED.clear()
