"""Members inside flows on RayTaskRunner: the seed's example, subclasses, no replay, no cache."""

from __future__ import annotations

import os

import pytest
from nodes import AlignmentDBNode, ProbeSQLiteNode
from prefect import flow, task
from prefect.blocks.core import Block
from prefect.settings import PREFECT_RESULTS_PERSIST_BY_DEFAULT, temporary_settings
from prefect_ray import RayTaskRunner

from chia_prefect import DatabaseNode, FastRayTaskRunner
from chia_prefect.members import Batch

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

ITERATIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS iterations (
    entry_id TEXT PRIMARY KEY, iteration INTEGER NOT NULL, score REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS benchmark_results (
    entry_id TEXT NOT NULL, bench TEXT NOT NULL, value REAL NOT NULL
);
"""

UPSERT = {
    "qmark": "INSERT OR REPLACE INTO iterations (entry_id, iteration, score) VALUES (?, ?, ?)",
    "format": "INSERT INTO iterations (entry_id, iteration, score) VALUES (%s, %s, %s) "
    "ON CONFLICT (entry_id) DO UPDATE SET iteration = EXCLUDED.iteration, score = EXCLUDED.score",
}


def render(db: DatabaseNode, sql: str) -> str:
    return sql.replace("?", "%s") if db.paramstyle == "format" else sql


@flow(task_runner=RayTaskRunner())
def alignment_flow(block_ref: str) -> dict:
    """The seed's AlignmentDB example, engine-blind, on Ray."""
    db: DatabaseNode = Block.load(block_ref)
    out: dict = {}
    out["empty_max"] = db.query_value("SELECT MAX(iteration) FROM iterations", default=-1)
    out["added"] = [db.add_column_if_missing("iterations", "base_rev", "TEXT") for _ in range(2)]
    rows = [("e1", f"bench{i}", float(i)) for i in range(50)]
    ins = render(db, "INSERT INTO benchmark_results (entry_id, bench, value) VALUES (?, ?, ?)")
    db.executemany(ins, [("e1", "stale", 0.0)])
    out["tx"] = [r.rowcount for r in db.transaction([
        (UPSERT[db.paramstyle], ("e1", 3, 0.9)),
        (render(db, "DELETE FROM benchmark_results WHERE entry_id = ?"), ("e1",)),
        (ins, rows),
    ])]
    out["max"] = db.query_value("SELECT MAX(iteration) FROM iterations", default=-1)
    out["count"] = db.query_value("SELECT COUNT(*) FROM benchmark_results")
    out["stale"] = db.query_value(render(db, "SELECT COUNT(*) FROM benchmark_results WHERE bench = ?"), ("stale",))
    if db.paramstyle == "format":
        out["returning"] = db.execute(
            "INSERT INTO iterations (entry_id, iteration, score) VALUES (%s, %s, %s) RETURNING entry_id",
            ("e2", 1, 0.1),
        ).rows
    return out


def _check_alignment(out: dict) -> None:
    assert out["empty_max"] is None  # aggregate over nothing: NULL row, not the default
    assert out["added"] == [True, False]
    assert out["tx"] == [1, 1, 50]
    assert (out["max"], out["count"], out["stale"]) == (3, 50, 0)


def test_alignment_example_sqlite(sqlite_db):
    sqlite_db.init_schema(ITERATIONS_SCHEMA)
    sqlite_db.save("align-sqlite", overwrite=True)
    _check_alignment(alignment_flow("sqlite-node/align-sqlite"))


@pytest.mark.postgres
def test_alignment_example_postgres(postgres_db):
    postgres_db.init_schema(ITERATIONS_SCHEMA)
    postgres_db.save("align-postgres", overwrite=True)
    out = alignment_flow("postgres-node/align-postgres")
    _check_alignment(out)
    assert out["returning"] == [{"entry_id": "e2"}]


@flow(task_runner=RayTaskRunner())
def domain_flow(db: AlignmentDBNode) -> dict:
    db.init_schema(ITERATIONS_SCHEMA)
    db.transaction([
        ("INSERT OR REPLACE INTO iterations VALUES (?, ?, ?)", ("e1", 1, 0.5)),
        ("INSERT INTO benchmark_results VALUES (?, ?, ?)", [("e1", "a", 1.0), ("e1", "b", 2.0)]),
    ])
    bumped = db.bump.submit("e1").result()
    return {"entry": db.load_entry("e1"), "missing": db.load_entry("nope"), "bumped": bumped}


def test_domain_subclass_member_on_ray(sqlite_path):
    with AlignmentDBNode(db_path=sqlite_path) as db:
        assert db.load_entry.name == "sqlite.load_entry" and db.load_entry.kind == "read"
        assert db.bump.kind == "write" and db.bump.retries == 0
        out = domain_flow(db)
    assert out["entry"] == {"entry_id": "e1", "iteration": 1, "score": 1.5, "benchmarks": {"a": 1.0, "b": 2.0}}
    assert out["missing"] is None and out["bumped"] == 1


@flow(task_runner=RayTaskRunner())
def insert_twice(db: DatabaseNode) -> int:
    sql = render(db, "INSERT INTO items (name) VALUES (?)")
    db.execute(sql, ("same",))
    db.execute(sql, ("same",))
    futures = [db.execute.submit(sql, ("same",)) for _ in range(2)]
    [f.result() for f in futures]
    return db.query_value("SELECT COUNT(*) FROM items")


@pytest.mark.parametrize("persist", [False, True])
def test_identical_inserts_all_land(any_db, persist):
    any_db.init_schema("CREATE TABLE items (name TEXT)")
    with temporary_settings({PREFECT_RESULTS_PERSIST_BY_DEFAULT: persist}):
        assert insert_twice(any_db) == 4
        assert insert_twice(any_db) == 8  # a second flow run: nothing cached either


@flow(task_runner=RayTaskRunner())
def bulk_flow(db: DatabaseNode, n: int) -> list[int]:
    rows = [(i, f"name-{i}") for i in range(n)]
    ins = "INSERT INTO bulk (id, name) VALUES (?, ?)"
    a = db.executemany(ins, rows).rowcount
    b = db.transaction([(ins, [(n + i, "t") for i in range(n)]), ("DELETE FROM bulk WHERE id < ?", (10,))])
    return [a, b[0].rowcount, b[1].rowcount, db.query_value("SELECT COUNT(*) FROM bulk")]


def test_large_batch_reaches_worker_boxed(sqlite_db):
    args, kwargs = sqlite_db.executemany._bind_args(("SQL", [(1,)] * 5), {})
    assert isinstance(args[2], Batch) and args[2].value == [(1,)] * 5
    sqlite_db.init_schema("CREATE TABLE bulk (id INTEGER PRIMARY KEY, name TEXT)")
    assert bulk_flow(sqlite_db, 100_000) == [100_000, 100_000, 10, 199_990]


@flow(task_runner=FastRayTaskRunner())
def keyed_bulk_flow(db: DatabaseNode, n: int, key: str) -> dict:
    rows = [(i, f"name-{i}") for i in range(n)]
    from chia_prefect.members.binding import _flat_width

    result = db.executemany(db.render("INSERT INTO bulk (id, name) VALUES (?, ?)"), rows, idempotency_key=key)
    return {"flat": _flat_width(rows) == 2, "rowcount": result.rowcount}


def test_a_keyed_flat_batch_has_the_digest_of_its_rows(any_db):
    """A large batch of tuples reaches the worker flat (`FlatRows`); a key's digest is taken
    over the same rows, so a key first used in-process is recognised on Ray."""
    any_db.init_schema("CREATE TABLE bulk (id INTEGER PRIMARY KEY, name TEXT)")
    rows = [(i, f"name-{i}") for i in range(2_000)]
    assert any_db.executemany(any_db.render("INSERT INTO bulk (id, name) VALUES (?, ?)"), rows,
                              idempotency_key="flat-key").rowcount == 2_000
    assert keyed_bulk_flow(any_db, 2_000, "flat-key") == {"flat": True, "rowcount": 2_000}
    assert any_db.query_value("SELECT COUNT(*) FROM bulk") == 2_000  # not written twice
    any_db.execute("DELETE FROM bulk")
    assert keyed_bulk_flow(any_db, 3_000, "flat-key-2") == {"flat": True, "rowcount": 3_000}  # a new key writes them
    assert any_db.query("SELECT id, name FROM bulk WHERE id IN (0, 2999) ORDER BY id") == [
        {"id": 0, "name": "name-0"}, {"id": 2999, "name": "name-2999"}]


@flow
def thread_runner_flow(db: ProbeSQLiteNode) -> dict:
    db.init_schema("CREATE TABLE t (x INTEGER)")
    db.execute("INSERT INTO t VALUES (1)")
    return {"plain": db.where(), "submitted": db.where.submit().result(), "n": db.query_value("SELECT COUNT(*) FROM t")}


def test_default_runner_runs_in_process(sqlite_path):
    with ProbeSQLiteNode(db_path=sqlite_path) as db:
        out = thread_runner_flow(db)
        assert db.reserved_placement_group is None  # placement applies on Ray only
    assert out["plain"]["pid"] == os.getpid() == out["submitted"]["pid"] and out["n"] == 1


def test_outside_a_flow(sqlite_path):
    with ProbeSQLiteNode(db_path=sqlite_path) as db:
        db.init_schema("CREATE TABLE t (x INTEGER)")
        assert db.where()["pid"] == os.getpid()


@flow(task_runner=RayTaskRunner())
def mapped_flow(db: DatabaseNode) -> int:
    db.init_schema("CREATE TABLE m (x INTEGER)")
    futures = db.execute.map("INSERT INTO m VALUES (?)", [(i,) for i in range(4)])
    futures.wait()
    return db.query_value("SELECT SUM(x) FROM m")


def test_map_binds_node_unmapped(sqlite_db):
    assert mapped_flow(sqlite_db) == 6


def test_write_policy_and_with_options(sqlite_db):
    from prefect.cache_policies import NO_CACHE

    for member in (sqlite_db.execute, sqlite_db.transaction, sqlite_db.query):
        assert member.retries == 0 and member.cache_policy is NO_CACHE
    opted = sqlite_db.execute.with_options(retries=3)
    assert type(opted) is type(sqlite_db.execute) and opted.retries == 3
    assert opted.node is sqlite_db and opted.name == "sqlite.execute"


# --- results on FastRayTaskRunner: what leaves a worker is what the member returned -----

@task
def query_inside_a_task(db: DatabaseNode, sql: str) -> dict:
    """A member called inside a task on a Ray worker runs in that process: a plain list."""
    rows = db.query(sql)
    return {"type": type(rows).__name__, "rows": rows}


@flow(task_runner=FastRayTaskRunner())
def results_on_fast_runner(db: DatabaseNode, sql: str, insert: str) -> dict:
    future = db.query.submit(sql)
    return {
        "called": db.query(sql),
        "submitted": future.result(),
        "state": future.state.result(),
        "one_row": db.query(sql, limit=1),
        "nested": query_inside_a_task.submit(db, sql).result(),
        "transaction": db.transaction([(insert, (1_000_001,)), (insert, (1_000_002,))]),
        "arrow": db.query_arrow(sql),
    }


def test_results_leave_the_worker_as_the_member_returned_them(any_db):
    # Values marshal cannot carry on Postgres (Decimal, datetime) take the pickle path.
    if any_db.engine == "sqlite":
        any_db.init_schema("CREATE TABLE v (id INTEGER PRIMARY KEY, n INTEGER, x REAL, s TEXT, b BLOB, z TEXT)")
        any_db.executemany("INSERT INTO v (n, x, s, b, z) VALUES (?, ?, ?, ?, ?)",
                           [(i, i / 3, f"s{i}", bytes([i % 256]), None) for i in range(3000)])
        insert = "INSERT INTO v (n) VALUES (?)"
    else:
        any_db.init_schema("CREATE TABLE v (id SERIAL PRIMARY KEY, n INTEGER, x NUMERIC(10, 3), "
                           "s TEXT, b TIMESTAMPTZ, z TEXT)")
        any_db.executescript("INSERT INTO v (n, x, s, b, z) SELECT i, i / 3.0, 's' || i, "
                             "TIMESTAMPTZ '2026-01-01' + i * INTERVAL '1 minute', NULL FROM generate_series(0, 2999) i")
        insert = "INSERT INTO v (n) VALUES (%s)"
    sql = "SELECT id, n, x, s, b, z FROM v ORDER BY id"
    expected = any_db.query(sql)  # in-process, outside a flow
    out = results_on_fast_runner(any_db, sql, insert)
    from chia_prefect import runner

    assert not runner._driver_flow_contexts  # the flow run's cached context went with its runner
    for key in ("called", "submitted", "state"):
        assert type(out[key]) is list and all(type(row) is dict for row in out[key]), key
        assert out[key] == expected, key
        assert [type(v) for v in out[key][5].values()] == [type(v) for v in expected[5].values()], key
    assert out["one_row"] == expected[:1]
    assert [r.rowcount for r in out["transaction"]] == [1, 1] and type(out["transaction"]) is list
    assert out["nested"] == {"type": "list", "rows": expected}
    # query_arrow's table came back through Ray as a pyarrow Table with the same rows.
    assert type(out["arrow"]).__name__ == "Table" and out["arrow"].column_names == list(expected[0])
    assert out["arrow"].to_pylist()[:3000] == expected


def test_the_gate_actor_starts_without_importing_prefect():
    """Each driver job gets a gate actor (members.scheduling); it is shipped by value, so its
    process imports Ray alone: with chia_prefect and Prefect it took 1.7 s of CPU to start."""
    import ray

    from chia_prefect.members.scheduling import driver_gate

    def loaded(_actor: object) -> list[str]:
        import sys

        return sorted(name for name in sys.modules if name.split(".")[0] in ("prefect", "chia_prefect"))

    assert ray.get(driver_gate().__ray_call__.remote(loaded), timeout=60) == []


def _given_up(gate) -> str:
    """A new task run id the gate has abandoned (as the driver does after the timeout)."""
    import uuid

    import ray

    run_id = uuid.uuid4().hex
    assert ray.get(gate.abandon.remote(run_id, f"shape-{run_id}", 0.0), timeout=60) == "abandoned"
    return run_id


def _body_call(node: DatabaseNode, member: str, run_id: str, args: tuple, key: str | None = None) -> tuple:
    """What `remote._run_body` takes for a write member of `node` in task run `run_id`."""
    return (node, member, "write", run_id, f"{node.engine}.{member}", args, {}, key)


def test_a_write_its_driver_abandoned_commits_nothing_and_its_answer_overlaps_its_work(sqlite_db, tmp_path):
    """A write's body asks the gate as it starts. An `atomic_only` write (execute,
    executemany, transaction, copy_rows) runs its statements while the answer comes and
    waits for it before COMMIT: given up on, it rolls back. Any other write waits before its
    body starts: given up on, it runs nothing. One not given up on commits."""
    import uuid

    import ray
    from nodes import RemoteProbeNode

    from chia_prefect import SchedulingTimeoutError
    from chia_prefect.members import remote
    from chia_prefect.members.scheduling import driver_gate

    sqlite_db.init_schema("CREATE TABLE bulk (id INTEGER PRIMARY KEY, name TEXT)")
    probe = RemoteProbeNode(db_path=sqlite_db.db_path)
    gate = driver_gate()
    body = ray.remote(remote._run_body).options(max_retries=0)
    rows = [(i, f"name-{i}") for i in range(2_000)]

    rolled_back = "gave up waiting for this write .* its transaction was rolled back; nothing was written"
    many = ("INSERT INTO bulk (id, name) VALUES (?, ?)", Batch(rows, flat=True))
    with pytest.raises(SchedulingTimeoutError, match=rolled_back):
        ray.get(body.remote(_body_call(sqlite_db, "executemany", _given_up(gate), many)), timeout=60)
    note = tmp_path / "note"
    with pytest.raises(SchedulingTimeoutError, match=rolled_back):
        ray.get(body.remote(_body_call(probe, "insert_noted", _given_up(gate), (str(note),))), timeout=60)
    assert note.read_text() == "ran"  # its body ran while the answer came
    key = f"given-up-{uuid.uuid4().hex}"
    with pytest.raises(SchedulingTimeoutError, match=rolled_back):
        keyed = _body_call(sqlite_db, "execute", _given_up(gate), ("INSERT INTO bulk (name) VALUES ('k')", ()), key)
        ray.get(body.remote(keyed), timeout=60)
    assert sqlite_db.query_value("SELECT COUNT(*) FROM bulk") == 0
    assert sqlite_db.write_outcome(key).committed is False
    touched = tmp_path / "touched"
    with pytest.raises(SchedulingTimeoutError, match="gave up waiting for this write .*; nothing was executed"):
        ray.get(body.remote(_body_call(probe, "touch", _given_up(gate), (str(touched),))), timeout=60)
    assert not touched.exists()  # a write not declared atomic_only never started

    assert ray.get(body.remote(_body_call(sqlite_db, "executemany", uuid.uuid4().hex, many)), timeout=60).rowcount == 2_000
    assert ray.get(body.remote(_body_call(probe, "insert_noted", uuid.uuid4().hex, (str(note),))), timeout=60) == 1
    ray.get(body.remote(_body_call(probe, "touch", uuid.uuid4().hex, (str(touched),))), timeout=60)
    assert touched.read_text() == "touched"
    assert sqlite_db.query_value("SELECT COUNT(*) FROM bulk") == 2_001


def test_a_postgres_write_its_driver_abandoned_rolls_back(postgres_db):
    """On Postgres too, an abandoned `copy_rows` and a keyed `transaction` run their
    statements while the gate's answer comes and roll back on it: no row, no recorded key."""
    import uuid

    import ray

    from chia_prefect import SchedulingTimeoutError
    from chia_prefect.members import remote
    from chia_prefect.members.scheduling import driver_gate

    table = f"abandoned_{uuid.uuid4().hex[:8]}"
    postgres_db.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT)")
    gate = driver_gate()
    body = ray.remote(remote._run_body).options(max_retries=0)

    rows = [(i, f"name-{i}") for i in range(20_000)]  # streamed: over 10,000 rows
    copy = (table, ["id", "name"], Batch(rows, stream=True))
    with pytest.raises(SchedulingTimeoutError, match="its transaction was rolled back; nothing was written"):
        ray.get(body.remote(_body_call(postgres_db, "copy_rows", _given_up(gate), copy)), timeout=60)
    key = f"given-up-{uuid.uuid4().hex}"
    ops = (Batch([(f"INSERT INTO {table} (id, name) VALUES (%s, %s)", (-i, "op")) for i in range(1, 4)]),)
    with pytest.raises(SchedulingTimeoutError, match="its transaction was rolled back; nothing was written"):
        ray.get(body.remote(_body_call(postgres_db, "transaction", _given_up(gate), ops, key)), timeout=60)
    assert postgres_db.query_value(f"SELECT COUNT(*) FROM {table}") == 0
    assert postgres_db.write_outcome(key).committed is False
    done = _body_call(postgres_db, "copy_rows", uuid.uuid4().hex, copy)
    assert ray.get(body.remote(done), timeout=60).rowcount == 20_000
