"""The engine layer alone: SQLiteEngine and PostgresEngine against a real file and a real
server, called directly, with no Prefect task, flow or Ray in between."""

from __future__ import annotations

import ast
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from chia_prefect import (
    ConfigurationError,
    ConnectionLostError,
    DatabaseNotFoundError,
    NodeConnectionError,
    TransactionControlError,
)
from chia_prefect.engines import (
    POSTGRES,
    SQLITE,
    PostgresConnectOptions,
    PostgresEngine,
    PostgresTarget,
    SQLiteConnectOptions,
    SQLiteEngine,
)

PACKAGE = Path(__file__).resolve().parent.parent / "chia_prefect"
# What the engine layer may import of the package: the layer below it.
BELOW = {"chia_prefect._sql", "chia_prefect._ui", "chia_prefect.errors"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", ["engines/__init__.py", "engines/dialect.py", "engines/sqlite.py",
                                    "engines/postgres.py", "engines/lint.py", "_sql.py", "errors.py", "_ui.py",
                                    "idempotency.py"])
def test_the_engine_layer_imports_no_prefect_no_ray_and_nothing_above_it(module):
    names = _imports(PACKAGE / module)
    assert not {n for n in names if n.split(".")[0] in ("prefect", "prefect_ray", "ray")}
    ours = {n for n in names if n.startswith("chia_prefect")}
    assert ours <= BELOW | {n for n in ours if n.startswith("chia_prefect.engines")}, ours


def test_sqlite_engine_connects_writes_reads_and_backs_up(tmp_path):
    engine = SQLiteEngine(str(tmp_path / "sub" / "e.db"), SQLiteConnectOptions(busy_timeout_s=2), "engine e")
    assert engine.dialect is SQLITE and engine.label == "engine e"
    with pytest.raises(DatabaseNotFoundError, match="engine e: the directory"):
        engine.run_script("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    engine.ensure_database()
    engine.run_script("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); CREATE INDEX t_v ON t (v);")
    with engine.atomic() as cur:
        first = engine.run_one(cur, "INSERT INTO t (v) VALUES (?)", ("a",))
        engine.run_one(cur, "INSERT INTO t (v) VALUES (?)", ("b",))
    assert (first.rowcount, first.lastrowid) == (1, 1)
    with pytest.raises(sqlite3.IntegrityError), engine.atomic() as cur:
        engine.run_one(cur, "INSERT INTO t (v) VALUES (?)", ("c",))
        engine.run_one(cur, "INSERT INTO t (id, v) VALUES (?, ?)", (1, "dup"))
    assert engine.fetch("SELECT v FROM t ORDER BY id", (), None) == [{"v": "a"}, {"v": "b"}]  # c rolled back
    assert engine.fetch("SELECT v FROM t ORDER BY id", (), 1) == [{"v": "a"}]
    with pytest.raises(TransactionControlError), engine.atomic() as cur:
        cur.execute("COMMIT")
    with engine.connect(read_only=True) as conn, pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM t")
    assert set(engine.checkpoint("TRUNCATE")) == {"busy", "log", "checkpointed"}
    backups = [engine.backup(str(tmp_path / "backups"), keep=2) for _ in range(3)]
    assert sorted(p.name for p in (tmp_path / "backups").glob("*.db")) == sorted(Path(b).name for b in backups[1:])
    copy = SQLiteEngine(backups[-1])
    assert copy.fetch("SELECT COUNT(*) AS n FROM t", (), None) == [{"n": 2}]


def test_sqlite_write_connections_close_in_threads_that_end(tmp_path):
    """200 committed writes in one process: each connection is closed in a thread of its
    own after COMMIT, and nothing is left of them: no closing thread, no descriptor of the
    file, and the last close checkpointed the WAL (its file is gone)."""
    path = str(tmp_path / "close.db")
    engine = SQLiteEngine(path)
    engine.run_script("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")

    def open_on_file() -> list[str]:
        found = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(path):
                found.append(target)
        return found

    for i in range(200):
        with engine.atomic() as cur:
            engine.run_one(cur, "INSERT INTO t (v) VALUES (?)", (str(i),))
    closing = lambda: [t for t in threading.enumerate() if t.name == "chia-sqlite-close"]  # noqa: E731
    deadline = time.monotonic() + 10
    while closing() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert closing() == [] and open_on_file() == []
    assert not os.path.exists(path + "-wal")
    assert engine.fetch("SELECT COUNT(*) AS n FROM t", (), None) == [{"n": 200}]


RUN_MANY_SCHEMA = """
CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, k INTEGER UNIQUE, v TEXT, w REAL);
CREATE TABLE seen (n INTEGER PRIMARY KEY, k INTEGER, total INTEGER);
CREATE TRIGGER t_seen AFTER INSERT ON t BEGIN
  INSERT INTO seen (k, total) VALUES (NEW.k, (SELECT COUNT(*) FROM t));
END;
"""


def _many_both_ways(tmp_path, sql, rows, name):
    """`run_many` on an engine's transaction, and sqlite3's own `executemany` on a twin
    file: each one's rowcount (or error text), and the tables and trigger records."""
    outcomes = []
    for way in ("engine", "raw"):
        path = tmp_path / f"{name}-{way}.db"
        engine = SQLiteEngine(str(path))
        engine.run_script(RUN_MANY_SCHEMA + "INSERT INTO t (k, v) VALUES (-1, 'before');")
        try:
            with engine.atomic() as cur:
                if way == "engine":
                    done = SQLiteEngine.run_many(cur, sql, rows).rowcount
                else:
                    cur.executemany(sql, rows)
                    done = cur.rowcount
        except Exception as exc:
            done = f"{type(exc).__name__}: {exc}"
        tables = [engine.fetch(f"SELECT * FROM {table} ORDER BY 1", (), None) for table in ("t", "seen")]
        outcomes.append((done, tables))
    return outcomes


@pytest.mark.parametrize("n", [2, 499, 500, 501, 1234])
@pytest.mark.parametrize("sql", [
    "INSERT INTO t (k, v, w) VALUES (?, ?, ?)",
    "insert or ignore into t(k,v,w) values(?,?,?);",
    'REPLACE INTO "t" ([k], `v`, "w") VALUES (?, ?, ?)',
])
def test_sqlite_run_many_of_an_insert_matches_executemany(tmp_path, sql, n):
    """A plain INSERT ... VALUES runs as multi-row INSERTs: the same rows, rowids, rowcount
    and per-row trigger records as `executemany`, duplicates inside the batch included."""
    rows = [(i % (n - 1) if "ignore" in sql or "REPLACE" in sql else i, f"v{i}", i / 3) for i in range(n)]
    engine, raw = _many_both_ways(tmp_path, sql, rows, "same")
    assert engine == raw
    assert isinstance(engine[0], int) and engine[0] > 0


def test_sqlite_run_many_steps_one_statement_per_500_rows(tmp_path):
    """The fast path is taken: SQLite runs 3 INSERTs for 1,234 rows of 3 values, not 1,234."""
    path = tmp_path / "trace.db"
    SQLiteEngine(str(path)).run_script("CREATE TABLE t (k INTEGER, v TEXT, w REAL)")  # no trigger to trace
    conn = sqlite3.connect(path, isolation_level=None)
    traced: list[str] = []
    conn.set_trace_callback(traced.append)
    conn.execute("BEGIN")
    result = SQLiteEngine.run_many(conn.cursor(), "INSERT INTO t (k, v, w) VALUES (?, ?, ?)",
                                   [(i, "v", 1.0) for i in range(1234)])
    conn.execute("COMMIT")
    inserts = [s for s in traced if s.startswith("INSERT INTO t")]
    assert result.rowcount == 1234 and len(inserts) == 3
    assert [s.count("'v', 1.0)") for s in inserts] == [500, 500, 234]  # traced with the values bound
    assert conn.execute("SELECT COUNT(*), MIN(k), MAX(k) FROM t").fetchone() == (1234, 0, 1233)


@pytest.mark.parametrize("case", ["unbindable", "duplicate", "short_row", "dict_rows", "named", "upsert", "rollback"])
def test_sqlite_run_many_fails_and_falls_back_as_executemany_does(tmp_path, case):
    """Rows or statements the multi-row form does not take, and batches that fail in it,
    end as `executemany` ends: the same error text (naming the row's parameter) and nothing
    written, or the same rows."""
    sql = "INSERT INTO t (k, v, w) VALUES (?, ?, ?)"
    rows: list = [(i, f"v{i}", 0.5) for i in range(1200)]
    if case == "unbindable":
        rows[1100] = (1100, {"a": 1}, 0.5)
    elif case == "duplicate":
        rows[1100] = (3, "dup", 0.5)
    elif case == "short_row":
        rows[700] = (700, "short")
        rows[701] = (701, "long", 0.5, 9)  # together as many values as two good rows
    elif case == "dict_rows":
        rows = [{"k": i, "v": "d", "w": 0.5} for i in range(600)]
    elif case == "named":
        sql = "INSERT INTO t (k, v, w) VALUES (:k, :v, :w)"
        rows = [{"k": i, "v": "n", "w": 0.5} for i in range(600)]
    elif case == "upsert":
        sql += " ON CONFLICT (k) DO UPDATE SET v = excluded.v"
        rows += [(i, "again", 0.5) for i in range(600)]
    elif case == "rollback":
        sql = "INSERT OR ROLLBACK INTO t (k, v, w) VALUES (?, ?, ?)"
        rows[1100] = (-1, "dup of before", 0.5)
    engine, raw = _many_both_ways(tmp_path, sql, rows, case)
    assert engine == raw
    if case in ("unbindable", "duplicate", "short_row", "dict_rows", "rollback"):
        assert isinstance(engine[0], str) and len(engine[1][0]) == 1, engine[0]  # only the row from before
    if case == "unbindable":
        assert "parameter 2" in engine[0]  # the row's parameter, as executemany names it


@pytest.mark.postgres
def test_postgres_engine_connects_writes_reads_and_copies(postgres_dsn):
    engine = PostgresEngine(postgres_dsn, PostgresConnectOptions(connect_timeout_s=5), "engine p")
    assert engine.dialect is POSTGRES
    engine.run_script("CREATE TABLE t (id SERIAL PRIMARY KEY, v TEXT UNIQUE); CREATE TABLE u (a INT, b TEXT);")
    with engine.atomic() as cur:
        inserted = engine.run_one(cur, "INSERT INTO t (v) VALUES (%s) RETURNING id", ("a",))
    assert inserted.rows == [{"id": 1}]
    with pytest.raises(Exception, match="unique"), engine.atomic() as cur:
        engine.run_one(cur, "INSERT INTO t (v) VALUES (%s)", ("b",))
        engine.run_one(cur, "INSERT INTO t (v) VALUES (%s)", ("a",))
    assert engine.fetch("SELECT v FROM t ORDER BY id", None, None) == [{"v": "a"}]  # b rolled back
    assert engine.copy_rows("public", "u", ["a", "b"], [(i, f"r{i}") for i in range(500)]) == 500
    assert engine.fetch("SELECT a FROM u ORDER BY a", None, 3) == [{"a": 0}, {"a": 1}, {"a": 2}]
    with engine.connect(read_only=True) as conn, pytest.raises(Exception, match="read-only"):
        conn.execute("DELETE FROM u")


@pytest.mark.postgres
def test_postgres_engine_loses_a_terminated_connection_and_retries_a_refused_one(postgres_dsn):
    from psycopg.conninfo import conninfo_to_dict

    target = conninfo_to_dict(postgres_dsn)
    engine = PostgresEngine(PostgresTarget.from_dsn(postgres_dsn), label="engine p")
    with pytest.raises(ConnectionLostError, match="engine p: the connection to database"), engine.atomic() as cur:
        cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    lines: list[str] = []
    refused = PostgresTarget(host="127.0.0.1", port=1, dbname=target.get("dbname"), user=target.get("user"),
                             password="s3cret-pass")
    gone = PostgresEngine(refused, PostgresConnectOptions(connect_timeout_s=2), "engine q", log=lines.append)
    with pytest.raises(NodeConnectionError) as info, gone.connect():
        pass
    assert "engine q: could not connect" in str(info.value) and "attempts" in str(info.value)
    assert lines and all("the connection was refused" in line for line in lines)
    assert not any("s3cret-pass" in text for text in [str(info.value), *lines])


def test_postgres_target_is_a_dsn_or_its_parts_in_one_model():
    """One model for the DSN-or-parts rule, libpq parameters, secrets and naming."""
    from pydantic import ValidationError

    uri = PostgresTarget.from_dsn("postgresql://app:pw-in-uri@db.example:6543/orders?sslmode=require")
    assert uri.params() == {"user": "app", "password": "pw-in-uri", "host": "db.example", "port": "6543",
                            "dbname": "orders", "sslmode": "require"}
    assert uri.identity() == "app@db.example:6543/orders"
    assert "pw-in-uri" not in repr(uri) and "pw-in-uri" in uri.secrets()
    assert uri.scrub("FATAL: password pw-in-uri rejected") == "FATAL: password *** rejected"
    parts = PostgresTarget(host="/tmp", dbname="orders", user="app", password="pw-part", options="-c search_path=a")
    assert parts.params() == {"host": "/tmp", "dbname": "orders", "user": "app", "password": "pw-part",
                              "options": "-c search_path=a"}
    assert parts.identity() == "app@/tmp:5432/orders" and "pw-part" not in repr(parts)
    assert PostgresTarget.from_dsn("host=h dbname=d").params() == {"host": "h", "dbname": "d"}
    with pytest.raises(ValidationError, match="not both"):
        PostgresTarget(dsn="postgresql://h/db", host="h")
    with pytest.raises(ValidationError, match="give dsn, or host"):
        PostgresTarget()
    bad = PostgresTarget.from_dsn("postgresql://u:pw-bad@[oops/db")
    with pytest.raises(ConfigurationError, match="the DSN is not valid") as info:
        bad.params()
    assert "pw-bad" not in str(info.value) and bad.secrets() == ["postgresql://u:pw-bad@[oops/db"]
