"""Idempotency keys: every write member takes one, and a keyed write applies once.

These run the members as Prefect tasks in this process against a real SQLite file and a real
PostgreSQL server; tests/test_idempotency_kill.py kills Ray workers around keyed writes.
"""

from __future__ import annotations

import pickle
import threading

import pytest
from helpers import sql_for
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prefect import flow, task
from prefect_ray import RayTaskRunner

from chia_prefect import (
    CommitOutcomeUnknownError,
    ConfigurationError,
    ExecResult,
    IdempotencyKeyReusedError,
    InvalidOperationError,
    SQLiteNode,
    TransactionControlError,
    WriteOutcome,
    idempotency,
)
from chia_prefect.idempotency import TABLE

ENTRY = {
    "sqlite": "CREATE TABLE entry (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
    "postgres": "CREATE TABLE entry (id SERIAL PRIMARY KEY, name TEXT NOT NULL)",
}


def all_at_once(n: int, call) -> tuple[list, list]:
    """Run `call` in n threads released together; what they returned, what they raised."""
    results: list = []
    errors: list = []
    start = threading.Barrier(n)

    def one() -> None:
        start.wait()
        try:
            results.append(call())
        except Exception as exc:  # noqa: BLE001 - collected for the caller's assertion
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results, errors


def names(db) -> list[str]:
    return [row["name"] for row in db.query("SELECT name FROM entry ORDER BY id")]


def test_every_write_member_applies_once_per_key(any_db):
    db = any_db
    assert db.init_schema(ENTRY[db.engine], idempotency_key="schema-v1") is None
    assert db.init_schema(ENTRY[db.engine], idempotency_key="schema-v1") is None  # not "table exists"
    ins = sql_for(db, "INSERT INTO entry (name) VALUES (?)")
    first = db.execute(ins, ("a",), idempotency_key="k-execute")
    again = db.execute(ins, ("a",), idempotency_key="k-execute")
    assert first == again and isinstance(again, ExecResult) and again.rowcount == 1
    many = [db.executemany(ins, [("b",), ("c",)], idempotency_key="k-many") for _ in range(2)]
    assert many[0] == many[1] and many[0].rowcount == 2
    ops = [(ins, ("d",)), (sql_for(db, "UPDATE entry SET name = name || ? WHERE name = ?"), ("!", "a"))]
    tx = [db.transaction(ops, idempotency_key="k-tx") for _ in range(2)]
    assert tx[0] == tx[1] and [r.rowcount for r in tx[0]] == [1, 1]
    recorded = db.write_outcome("k-tx").result  # stored as the results' marshalled fields
    assert type(recorded) is list and recorded == tx[0] and all(type(r) is ExecResult for r in recorded)
    for _ in range(2):
        db.executescript("INSERT INTO entry (name) VALUES ('e'); INSERT INTO entry (name) VALUES ('f');",
                         idempotency_key="k-script")
    added = [db.add_column_if_missing("entry", "note", "TEXT", idempotency_key="k-column") for _ in range(2)]
    assert added == [True, True]  # the recorded result, not "already there"
    assert db.add_column_if_missing("entry", "note", "TEXT") is False
    if db.engine == "postgres":
        copied = [db.copy_rows("entry", ["name"], [("g",), ("h",)], idempotency_key="k-copy") for _ in range(2)]
        assert copied[0] == copied[1] == ExecResult(rowcount=2)
    expected = ["a!", "b", "c", "d", "e", "f"] + (["g", "h"] if db.engine == "postgres" else [])
    assert names(db) == expected
    outcome = db.write_outcome("k-execute")
    assert isinstance(outcome, WriteOutcome) and outcome.committed and outcome.result == first
    assert outcome.member == f"{db.engine}.execute" and outcome.recorded_at > 0
    assert db.write_outcome("never-used") == WriteOutcome("never-used", committed=False)


def test_a_key_reused_for_another_write_is_refused_and_runs_nothing(any_db):
    db = any_db
    db.init_schema(ENTRY[db.engine])
    ins = sql_for(db, "INSERT INTO entry (name) VALUES (?)")
    db.execute(ins, ("a",), idempotency_key="order-17")
    with pytest.raises(IdempotencyKeyReusedError) as info:
        db.execute(ins, ("b",), idempotency_key="order-17")
    assert "'order-17'" in str(info.value) and "other arguments" in str(info.value)
    assert (info.value.key, info.value.member) == ("order-17", f"{db.engine}.execute")
    with pytest.raises(IdempotencyKeyReusedError, match=f"recorded for {db.engine}.execute"):
        db.executemany(ins, [("c",)], idempotency_key="order-17")
    assert names(db) == ["a"]
    # A key that failed is not recorded: the write was rolled back with it.
    with pytest.raises(Exception, match="(?i)no such table|does not exist"):
        db.execute(sql_for(db, "INSERT INTO nope (name) VALUES (?)"), ("x",), idempotency_key="fails")
    assert not db.write_outcome("fails").committed
    db.execute(ins, ("x",), idempotency_key="fails")  # the same key is free to succeed later
    assert names(db) == ["a", "x"]


def test_keys_are_checked_before_anything_runs(sqlite_db):
    sqlite_db.init_schema(ENTRY["sqlite"])
    for bad in ("", "   ", 17, "k" * 513):
        with pytest.raises(InvalidOperationError, match="idempotency_key must be a non-empty str"):
            sqlite_db.execute("INSERT INTO entry (name) VALUES ('x')", idempotency_key=bad)
    with pytest.raises(TypeError, match="idempotency_key"):
        sqlite_db.query("SELECT 1", idempotency_key="reads take no key")
    with pytest.raises(TransactionControlError, match="idempotency key"):
        sqlite_db.executescript("BEGIN; INSERT INTO entry (name) VALUES ('x'); COMMIT;", idempotency_key="s")
    with pytest.raises(InvalidOperationError, match='"auto"'):
        sqlite_db.write_outcome("auto")
    assert names(sqlite_db) == []


def test_auto_keys_follow_the_task_run(sqlite_path):
    from nodes import KeyedSQLiteNode

    db = KeyedSQLiteNode(db_path=sqlite_path)
    db.init_schema(ENTRY["sqlite"])

    @flow
    def twice() -> list:
        # Two task runs: two auto keys, two writes.
        return [db.add_entries(["a", "b"], idempotency_key="auto"), db.add_entries(["a", "b"], idempotency_key="auto")]

    assert twice() == [[1, 2], [3, 4]]
    keys = [row["key"] for row in db.query(f"SELECT key FROM {TABLE} ORDER BY created_at")]
    assert len(keys) == 2 and all(k.startswith("auto:") and k.endswith(":sqlite.add_entries") for k in keys)


def test_a_retried_task_that_calls_a_keyed_write_again_applies_it_once(sqlite_path):
    """The first attempt commits its write and key, then its task fails; the retry finds the key."""
    from nodes import KeyedSQLiteNode

    db = KeyedSQLiteNode(db_path=sqlite_path)
    db.init_schema(ENTRY["sqlite"])
    attempts = []

    @task(retries=2, retry_delay_seconds=0)
    def keyed_then_flaky() -> list:
        ids = db.add_entries(["only-once"], idempotency_key="order-1")
        attempts.append(ids)
        if len(attempts) == 1:
            raise RuntimeError("the caller failed after the write committed")
        return ids

    @flow
    def run() -> list:
        return keyed_then_flaky()

    assert run() == [1]
    assert attempts == [[1], [1]] and names(db) == ["only-once"]


def test_domain_write_through_connect_is_refused_under_a_key(sqlite_path):
    from nodes import KeyedSQLiteNode

    db = KeyedSQLiteNode(db_path=sqlite_path)
    db.init_schema(ENTRY["sqlite"])
    with pytest.raises(ConfigurationError, match=r"self\.atomic\(connect_opts\)"):
        db.add_entry_by_connect("x", idempotency_key="k")
    db.add_entry_by_connect("y")  # without a key, as before
    assert names(db) == ["y"]


def test_concurrent_calls_with_one_key_apply_once(any_db):
    """16 threads, one key: one row, sixteen equal results, no raw unique violation."""
    db = any_db
    db.init_schema(ENTRY[db.engine])
    ins = sql_for(db, "INSERT INTO entry (name) VALUES (?)" + (" RETURNING id" if db.engine == "postgres" else ""))
    results, errors = all_at_once(16, lambda: db.execute(ins, ("once",), idempotency_key="burst"))
    assert errors == [] and len(results) == 16
    assert all(result == results[0] for result in results)
    assert names(db) == ["once"]


@pytest.mark.postgres
def test_first_keyed_writes_racing_to_create_the_key_table_all_succeed(postgres_db):
    """Eight first keyed writers at once on a database without the key table, forty times.

    Concurrent CREATE TABLE IF NOT EXISTS collide in Postgres' catalog: on the table's name,
    on its row type's (42710, 'type "chia_idempotency" already exists'; it failed one CI run),
    or on a catalog index. Every loser must find the table made, not raise."""
    errors: list = []
    for _ in range(40):
        with postgres_db.atomic() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
        errors += all_at_once(8, lambda: idempotency._ensure_table(postgres_db, None, again=True))[1]
    assert errors == []
    assert postgres_db.query_value(f"SELECT COUNT(*) FROM {TABLE}") == 0


def test_maintenance_prunes_old_keys(any_db):
    db = any_db
    assert db.prune_idempotency_keys() == 0  # no key table yet
    db.init_schema(ENTRY[db.engine])
    ins = sql_for(db, "INSERT INTO entry (name) VALUES (?)")
    db.execute(ins, ("old",), idempotency_key="old")
    db.execute(ins, ("new",), idempotency_key="new")
    db.execute(sql_for(db, f"UPDATE {TABLE} SET created_at = created_at - ? WHERE key = ?"), (8 * 86400, "old"))
    assert db.idempotency_retention_days == 7
    assert db.prune_idempotency_keys() == 1
    assert not db.write_outcome("old").committed and db.write_outcome("new").committed
    assert db.prune_idempotency_keys(older_than_days=0) == 1


@pytest.mark.postgres
def test_a_lost_commit_of_a_keyed_write_is_answerable(postgres_dsn):
    from nodes import LosesConnectionAtKeyedCommitPostgresNode

    from chia_prefect import PostgresNode

    db = PostgresNode(dsn=postgres_dsn)
    db.init_schema(ENTRY["postgres"])
    ins = "INSERT INTO entry (name) VALUES (%s) RETURNING id"
    db.execute(ins, ("first",), idempotency_key="first")  # the key table exists: one transaction below
    losing = LosesConnectionAtKeyedCommitPostgresNode(dsn=postgres_dsn)
    with pytest.raises(CommitOutcomeUnknownError) as info:
        losing.execute(ins, ("maybe",), idempotency_key="invoice-9")
    assert info.value.idempotency_key == "invoice-9" and "db.write_outcome('invoice-9')" in str(info.value)
    back = pickle.loads(pickle.dumps(info.value))
    assert back.idempotency_key == "invoice-9"
    assert db.write_outcome("invoice-9").committed is False  # terminated before COMMIT reached the server
    result = db.execute(ins, ("maybe",), idempotency_key="invoice-9")
    assert db.execute(ins, ("maybe",), idempotency_key="invoice-9") == result
    assert db.write_outcome("invoice-9").result == result and names(db) == ["first", "maybe"]


def test_a_keyed_write_whose_result_cannot_be_recorded_commits_nothing(postgres_dsn):
    """On Postgres the result's UPDATE goes to the server with the COMMIT: its error comes
    back with the COMMIT's answer, and the write, the key and the result roll back together."""
    from chia_prefect import PostgresNode

    db = PostgresNode(dsn=postgres_dsn)
    db.init_schema(ENTRY["postgres"])
    ins = "INSERT INTO entry (name) VALUES (%s) RETURNING id"
    db.execute(ins, ("first",), idempotency_key="first")  # the key table exists
    db.init_schema(
        "CREATE FUNCTION refuse_result() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'result refused for %', NEW.key; END $$;"
        f"CREATE TRIGGER refuse_result BEFORE UPDATE ON {TABLE} FOR EACH ROW EXECUTE FUNCTION refuse_result();"
    )
    with pytest.raises(Exception, match="result refused for invoice-10"):
        db.execute(ins, ("refused",), idempotency_key="invoice-10")
    assert names(db) == ["first"] and db.write_outcome("invoice-10").committed is False
    db.init_schema(f"DROP TRIGGER refuse_result ON {TABLE}")
    result = db.execute(ins, ("second",), idempotency_key="invoice-10")
    assert db.execute(ins, ("second",), idempotency_key="invoice-10") == result
    assert names(db) == ["first", "second"] and db.write_outcome("invoice-10").result == result


def test_a_keyed_write_recreates_a_dropped_key_table(sqlite_path):
    db = SQLiteNode(db_path=sqlite_path)
    db.init_schema(ENTRY["sqlite"])
    db.execute("INSERT INTO entry (name) VALUES (?)", ("a",), idempotency_key="k1")
    db.execute(f"DROP TABLE {TABLE}")
    db.execute("INSERT INTO entry (name) VALUES (?)", ("b",), idempotency_key="k2")
    assert names(db) == ["a", "b"] and db.write_outcome("k2").committed


# --- property: keyed calls, retries and kills never apply a key twice ---------------------

KEYS = 3
ROWS = 20_000
SLOW_INSERT = {
    "sqlite": ("INSERT INTO t (k) WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c "
               f"WHERE n < {ROWS}) SELECT ? FROM c"),
    "postgres": f"INSERT INTO t (k) SELECT %s FROM generate_series(1, {ROWS})",
}


def _keyed_write_in_a_child(db, key: str) -> int:
    """Fork a process that runs one keyed write (no Prefect: the key's transaction itself)."""
    import os

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            sql = SLOW_INSERT[db.engine]
            body = type(db).execute.fn
            db.run_keyed(f"{db.engine}.execute", key, lambda: body(db, sql, (key,)), ((sql, (key,)), {}))
        except BaseException:  # noqa: BLE001 - the exit code tells
            code = 1
        os._exit(code)
    return pid


@pytest.fixture
def keyed_table(any_db):
    any_db.init_schema("CREATE TABLE IF NOT EXISTS t (k TEXT NOT NULL)")
    return any_db


def _rows_per_key(db, prefix: str) -> dict[str, int]:
    rows = db.query(sql_for(db, "SELECT k, COUNT(*) AS n FROM t WHERE k LIKE ? GROUP BY k"), (prefix + "%",))
    return {row["k"]: row["n"] for row in rows}


STEPS = st.lists(st.tuples(st.integers(0, KEYS - 1), st.one_of(st.none(), st.floats(0.0, 0.06))),
                 min_size=1, max_size=8)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS)
def test_keyed_calls_retries_and_kills_never_apply_a_key_twice(keyed_table, steps):
    """Each step calls a key in a fresh process, killed (SIGKILL) after a random delay or left
    to finish; afterwards every key is retried once more. A key's rows are there once or not
    at all after any step, once after a call that finished, and once after the final retries."""
    import os
    import signal
    import time
    import uuid

    db = keyed_table
    prefix = f"p{uuid.uuid4().hex[:8]}-"
    finished: set[str] = set()
    for index, kill_after in steps:
        key = f"{prefix}{index}"
        pid = _keyed_write_in_a_child(db, key)
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            finished.add(key)
        counts = _rows_per_key(db, prefix)
        if kill_after is not None:  # --hypothesis-show-statistics: where the kills landed
            event("killed " + ("after a finish" if os.WIFEXITED(status) else
                               "with the key applied" if counts.get(key) else "before COMMIT"))
        assert set(counts.values()) <= {ROWS}, counts  # never twice, never in part
        assert all(counts.get(k) == ROWS for k in finished), (counts, finished)
    sql = SLOW_INSERT[db.engine]
    keys = {f"{prefix}{index}" for index, _ in steps}
    results = {key: db.execute(sql, (key,), idempotency_key=key) for key in keys}
    assert _rows_per_key(db, prefix) == {key: ROWS for key in keys}
    assert all(result.rowcount == ROWS and db.write_outcome(key).result == result for key, result in results.items())


@flow(task_runner=RayTaskRunner())
def keyed_where_twice(db) -> list:
    return [db.where_write(idempotency_key="where"), db.where_write.submit(idempotency_key="where").result()]


@pytest.mark.ray
@pytest.mark.parametrize("placed", ["pinned", "placement_group"])
def test_keyed_writes_on_ray_pinned_or_in_a_placement_group(ray_cluster, sqlite_path, placed):
    """The second call, wherever it runs, returns what the first recorded: its node and pid."""
    import os

    from nodes import ProbeSQLiteNode

    from chia_prefect import Placement

    placement = Placement(node_id=ray_cluster["second"]) if placed == "pinned" else Placement()
    with ProbeSQLiteNode(db_path=sqlite_path, placement=placement) as db:
        db.init_schema("CREATE TABLE t (x INTEGER)")
        first, again = keyed_where_twice(db)
        assert db.write_outcome("where").result == first
    assert again == first and first["pid"] != os.getpid()
    if placed == "pinned":
        assert first["node"] == ray_cluster["second"] and first["group"] is None
    else:
        assert first["group"] is not None
