"""Member semantics on both engines, called outside a flow (in-process, through Prefect)."""

from __future__ import annotations

import sqlite3

import pytest
from helpers import id_column, sql_for

from chia_prefect import (
    ConfigurationError,
    DatabaseNotFoundError,
    ExecResult,
    InvalidIdentifierError,
    InvalidOperationError,
    SQLiteNode,
    TransactionControlError,
    TransactionOpError,
)


def make_table(db) -> None:
    db.init_schema(f"CREATE TABLE items (id {id_column(db)}, name TEXT UNIQUE, qty INTEGER)")


def rows(db) -> list[dict]:
    return db.query("SELECT id, name, qty FROM items ORDER BY id")


def test_execute_commits_and_reports(any_db):
    make_table(any_db)
    res = any_db.execute(sql_for(any_db, "INSERT INTO items (name, qty) VALUES (?, ?)"), ("a", 1))
    assert isinstance(res, ExecResult) and res.rowcount == 1
    assert res.lastrowid == (1 if any_db.engine == "sqlite" else None)
    assert rows(any_db) == [{"id": 1, "name": "a", "qty": 1}]
    upd = any_db.execute("UPDATE items SET qty = qty + 1")
    assert (upd.rowcount, upd.lastrowid) == (1, None)


def test_named_params(any_db):
    make_table(any_db)
    named = ":n, :q" if any_db.paramstyle == "qmark" else "%(n)s, %(q)s"
    any_db.execute(f"INSERT INTO items (name, qty) VALUES ({named})", {"n": "x", "q": 7})
    assert any_db.query_value("SELECT qty FROM items") == 7


def test_returning_rows_attached(any_db):
    make_table(any_db)
    res = any_db.execute(sql_for(any_db, "INSERT INTO items (name, qty) VALUES (?, ?) RETURNING id"), ("r", 2))
    assert res.rows == [{"id": 1}]


def test_executemany_rowcount_is_total(any_db):
    make_table(any_db)
    res = any_db.executemany(
        sql_for(any_db, "INSERT INTO items (name, qty) VALUES (?, ?)"), [(f"n{i}", i) for i in range(250)]
    )
    assert res.rowcount == 250
    assert any_db.query_value("SELECT SUM(qty) FROM items") == sum(range(250))


def test_query_limit_one_value(any_db):
    make_table(any_db)
    any_db.executemany(sql_for(any_db, "INSERT INTO items (name, qty) VALUES (?, ?)"), [("a", 1), ("b", 2), ("c", 3)])
    assert len(any_db.query("SELECT * FROM items", limit=2)) == 2
    assert any_db.query("SELECT * FROM items", limit=0) == []
    assert any_db.query_one("SELECT name FROM items ORDER BY id DESC") == {"name": "c"}
    assert any_db.query_one("SELECT name FROM items WHERE qty > 99") is None


def test_query_arrow_gives_a_typed_table(any_db):
    import pyarrow as pa

    make_table(any_db)
    any_db.executemany(sql_for(any_db, "INSERT INTO items (name, qty) VALUES (?, ?)"),
                       [("a", 1), ("b", None), ("c", 3)])
    table = any_db.query_arrow("SELECT id, name, qty FROM items ORDER BY id")
    assert isinstance(table, pa.Table) and table.column_names == ["id", "name", "qty"]
    assert table.schema.field("qty").type == pa.int64() and table.schema.field("name").type == pa.string()
    assert table.to_pylist() == rows(any_db)
    assert any_db.query_arrow("SELECT id, name FROM items ORDER BY id", limit=2).num_rows == 2
    empty = any_db.query_arrow("SELECT id, name FROM items WHERE id < 0")
    assert (empty.num_rows, empty.column_names) == (0, ["id", "name"])
    if any_db.engine == "sqlite":  # a column of mixed kinds, which SQLite allows, is refused by name
        any_db.execute("INSERT INTO items (name, qty) VALUES ('d', 'many')")
        with pytest.raises(InvalidOperationError, match="column 'qty'.*query\\(\\)"):
            any_db.query_arrow("SELECT qty FROM items")


def test_query_value_null_row_versus_default(any_db):
    make_table(any_db)
    # An aggregate over nothing is one NULL row: None, not the default.
    assert any_db.query_value("SELECT MAX(qty) FROM items", default=-1) is None
    # No row at all: the default.
    assert any_db.query_value("SELECT qty FROM items", default=-1) == -1


def test_transaction_dispatches_on_params_type(any_db):
    make_table(any_db)
    ins = sql_for(any_db, "INSERT INTO items (name, qty) VALUES (?, ?)")
    results = any_db.transaction([
        (ins, ("one", 1)),  # tuple: execute
        (ins, [("two", 2), ("three", 3)]),  # list: executemany
        ("UPDATE items SET qty = qty * 10", None),  # None: bare execute
        (sql_for(any_db, "DELETE FROM items WHERE name = ?"), ("two",)),
    ])
    assert [r.rowcount for r in results] == [1, 2, 3, 1]
    assert [(r["name"], r["qty"]) for r in rows(any_db)] == [("one", 10), ("three", 30)]


def test_transaction_all_or_nothing(any_db):
    make_table(any_db)
    ins = sql_for(any_db, "INSERT INTO items (name, qty) VALUES (?, ?)")
    any_db.execute(ins, ("keep", 1))
    before = rows(any_db)
    with pytest.raises(Exception) as info:
        any_db.transaction([
            (ins, ("new", 2)),
            (ins, [("bulk1", 3), ("bulk2", 4)]),
            ("UPDATE items SET qty = 0", None),
            (ins, ("keep", 5)),  # violates UNIQUE: the last op fails
        ])
    assert isinstance(info.value, TransactionOpError)
    assert (info.value.op_index, info.value.op_total) == (3, 4)
    assert "transaction op 3 of 4" in str(info.value)
    assert isinstance(info.value, (sqlite3.IntegrityError, _psycopg_integrity()))
    if any_db.engine == "postgres":  # the driver's data came back from the worker with it
        assert info.value.sqlstate == "23505" and info.value.diag.constraint_name
    else:
        assert info.value.sqlite_errorname == "SQLITE_CONSTRAINT_UNIQUE"
    assert rows(any_db) == before


def _psycopg_integrity():
    import psycopg

    return psycopg.errors.IntegrityError


@pytest.mark.parametrize("sql", ["BEGIN", "COMMIT", "  rollback", "END TRANSACTION", "SAVEPOINT s", "/* x */ begin"])
def test_transaction_control_refused_before_running(any_db, sql):
    make_table(any_db)
    ins = sql_for(any_db, "INSERT INTO items (name, qty) VALUES (?, ?)")
    with pytest.raises(TransactionControlError, match="transaction op 1"):
        any_db.transaction([(ins, ("a", 1)), (sql, None)])
    with pytest.raises(TransactionControlError):
        any_db.execute(sql)
    assert rows(any_db) == []


def test_postgres_commit_smuggled_after_semicolon_refused(postgres_db):
    make_table(postgres_db)
    with pytest.raises(TransactionControlError):
        postgres_db.transaction([("INSERT INTO items (name) VALUES ('a'); COMMIT; SELECT 1", None)])
    assert rows(postgres_db) == []


def test_postgres_bodies_holding_begin_and_commit_are_not_transaction_control(postgres_db):
    """PostgreSQL's own parser decides: a `BEGIN ATOMIC` body, dollar quotes and literals
    holding COMMIT are one statement each, and run."""
    postgres_db.execute("CREATE FUNCTION tripled(x integer) RETURNS integer LANGUAGE sql "
                        "BEGIN ATOMIC SELECT x * 3; END")
    postgres_db.transaction([
        ("CREATE FUNCTION note() RETURNS text LANGUAGE plpgsql AS $$ BEGIN RETURN 'COMMIT;'; END $$", None),
        ("COMMENT ON FUNCTION note() IS 'BEGIN; END;'", None)])
    assert postgres_db.query_value("SELECT tripled(2) || note()") == "6COMMIT;"
    with pytest.raises(TransactionControlError, match="START is not allowed"):
        postgres_db.execute("/* BEGIN; */ SELECT 1; -- x\n start transaction")


@pytest.mark.parametrize(
    "ops, message",
    [
        ([], "non-empty list"),
        ("INSERT", "non-empty list"),
        ([("SELECT 1",)], "pair"),
        ([("SELECT 1", 5)], "tuple or dict"),
        ([(5, None)], "SQL must be a str"),
    ],
)
def test_transaction_bad_ops_named(any_db, ops, message):
    with pytest.raises(InvalidOperationError, match=message):
        any_db.transaction(ops)


def test_single_statement_params_must_be_tuple_or_dict(any_db):
    make_table(any_db)
    with pytest.raises(InvalidOperationError, match="a list means several rows"):
        any_db.execute(sql_for(any_db, "INSERT INTO items (name) VALUES (?)"), ["a"])
    assert rows(any_db) == []


@pytest.mark.parametrize(
    "write_sql",
    ["INSERT INTO items (name, qty) VALUES ('w', 1)", "DELETE FROM items", "DROP TABLE items",
     "UPDATE items SET qty = 99", "CREATE TABLE other (x INTEGER)"],
)
def test_reads_refuse_writes(any_db, write_sql):
    make_table(any_db)
    any_db.execute(sql_for(any_db, "INSERT INTO items (name, qty) VALUES (?, ?)"), ("keep", 1))
    before, schema_before = rows(any_db), any_db.schema()
    for read in (any_db.query, any_db.query_one, any_db.query_value):
        with pytest.raises(Exception, match="(?i)read.only|readonly|query_only|attempt to write"):
            read(write_sql)
    assert rows(any_db) == before and any_db.schema() == schema_before


def test_postgres_read_cannot_turn_off_read_only(postgres_db):
    make_table(postgres_db)
    with pytest.raises(Exception, match="multiple commands"):
        postgres_db.query("SET default_transaction_read_only = off; INSERT INTO items (name) VALUES ('x')")
    assert rows(postgres_db) == []


def test_postgres_runs_one_statement_with_or_without_parameters(postgres_db):
    make_table(postgres_db)
    second = "; DELETE FROM items"
    with pytest.raises(Exception, match="multiple commands"):
        postgres_db.execute("INSERT INTO items (name, qty) VALUES (%s, %s)" + second, ("x", 1))
    with pytest.raises(Exception, match="multiple commands"):
        postgres_db.execute("INSERT INTO items (name, qty) VALUES ('y', 2)" + second)
    with pytest.raises(Exception, match="multiple commands"):
        postgres_db.transaction([("INSERT INTO items (name, qty) VALUES (%s, %s)" + second, ("z", 3))])
    with pytest.raises(Exception, match="multiple commands"):
        postgres_db.query("SELECT name FROM items WHERE qty = %s; SELECT 1", (1,))
    for params in ((1,), ()):
        with pytest.raises(Exception, match="multiple commands"):
            postgres_db.query("SELECT name FROM items WHERE qty > 0; SELECT %s" if params else "SELECT 1; SELECT 2",
                              params, limit=0)
    assert rows(postgres_db) == []


def test_add_column_if_missing_true_then_false(any_db):
    make_table(any_db)
    assert any_db.add_column_if_missing("items", "base_rev", "TEXT") is True
    assert any_db.add_column_if_missing("items", "base_rev", "TEXT") is False
    assert any_db.add_column_if_missing("items", "BASE_REV", "TEXT") is False
    assert "base_rev" in any_db.schema()


INJECTIONS = [
    ("items; DROP TABLE items", "c", "TEXT"),
    ('items" ; --', "c", "TEXT"),
    ("items", "c TEXT; DROP TABLE items; --", "TEXT"),
    ("items", "c", "TEXT; DROP TABLE items"),
    ("items", "c", "TEXT DEFAULT 'x'); DROP TABLE items; --"),
    ("items", "c", "TEXT /* */"),
    ("items", "c", "TEXT -- comment"),
    ("items", "1c", "TEXT"),
    ("items", "", "TEXT"),
    ("", "c", "TEXT"),
    ("items", "c", ""),
    ("it ems", "c", "TEXT"),
    ("items", "c\u0000", "TEXT"),
    ("items", "x" * 64, "TEXT"),
]


@pytest.mark.parametrize("table, column, type_decl", INJECTIONS)
def test_add_column_injection_refused_before_sql(any_db, table, column, type_decl):
    make_table(any_db)
    schema_before = any_db.schema()
    with pytest.raises(InvalidIdentifierError, match="nothing was executed"):
        any_db.add_column_if_missing(table, column, type_decl)
    assert any_db.schema() == schema_before


def test_postgres_add_column_schema_qualified(postgres_db):
    postgres_db.executescript("CREATE SCHEMA app; CREATE TABLE app.t (id INTEGER)")
    assert postgres_db.add_column_if_missing("app.t", "note", "VARCHAR(20) NOT NULL") is True
    assert postgres_db.add_column_if_missing("app.t", "note", "TEXT") is False
    assert "note" in postgres_db.schema(schemas=("app",))


def test_blobs_round_trip_as_bytes(any_db):
    blob_type = "BLOB" if any_db.engine == "sqlite" else "BYTEA"
    any_db.init_schema(f"CREATE TABLE b (k INTEGER PRIMARY KEY, v {blob_type})")
    data = bytes(range(256)) * 10
    any_db.execute(sql_for(any_db, "INSERT INTO b (k, v) VALUES (?, ?)"), (1, data))
    value = any_db.query_value("SELECT v FROM b")
    assert isinstance(value, bytes) and value == data


def test_connect_opts_per_call_and_unknown_key(any_db):
    make_table(any_db)
    # 5 s either way: a 5 ms statement timeout cancelled `SELECT 1` once on a loaded machine.
    key, value = ("busy_timeout_s", 5) if any_db.engine == "sqlite" else ("statement_timeout_ms", 5000)
    assert any_db.query("SELECT 1 AS one", connect_opts={key: value}) == [{"one": 1}]
    with pytest.raises(ConfigurationError, match="bogus.*Known keys"):
        any_db.query("SELECT 1", connect_opts={"bogus": 1})


def test_postgres_statement_timeout_per_call(postgres_db):
    with pytest.raises(Exception, match="statement timeout"):
        postgres_db.query("SELECT pg_sleep(2)", connect_opts={"statement_timeout_ms": 100})


def test_sqlite_defaults_applied(sqlite_db):
    sqlite_db.init_schema("CREATE TABLE p (id INTEGER PRIMARY KEY); "
                          "CREATE TABLE c (id INTEGER, p INTEGER REFERENCES p(id))")
    assert sqlite_db.query_value("PRAGMA journal_mode") == "wal"
    assert sqlite_db.query_value("PRAGMA foreign_keys") == 1
    assert sqlite_db.query_value("PRAGMA synchronous") == 1  # NORMAL
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        sqlite_db.execute("INSERT INTO c VALUES (1, 42)")


def test_sqlite_wal_checkpoint(sqlite_db):
    sqlite_db.init_schema("CREATE TABLE t (x INTEGER)")
    sqlite_db.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(100)])
    counts = sqlite_db.wal_checkpoint("TRUNCATE")
    assert counts["busy"] == 0 and counts["log"] == 0
    with pytest.raises(ValueError, match="PASSIVE"):
        sqlite_db.wal_checkpoint("NOPE")


def test_sqlite_read_of_missing_file_is_clear(tmp_path):
    db = SQLiteNode(db_path=str(tmp_path / "missing.db"))
    with pytest.raises(DatabaseNotFoundError, match="init_schema"):
        db.query("SELECT 1")
    assert not (tmp_path / "missing.db").exists()


def test_sqlite_schema_lists_tables_and_indexes(sqlite_db):
    sqlite_db.init_schema("CREATE TABLE t (x INTEGER); CREATE INDEX ix_t ON t (x)")
    text = sqlite_db.schema()
    assert "CREATE TABLE t" in text and "CREATE INDEX ix_t" in text


def test_postgres_schema_lists_tables_and_indexes(postgres_db):
    postgres_db.init_schema("CREATE TABLE t (x INTEGER PRIMARY KEY, y TEXT); CREATE INDEX ix_t ON t (y)")
    text = postgres_db.schema()
    assert "TABLE public.t" in text and "x integer NOT NULL" in text and "ix_t" in text


def test_postgres_init_schema_is_one_transaction(postgres_db):
    with pytest.raises(Exception, match="syntax"):
        postgres_db.init_schema("CREATE TABLE a (x INTEGER); CREATE TABLE b (x NOPE TYPE)")
    assert postgres_db.query_value("SELECT count(*) FROM pg_tables WHERE tablename = 'a'") == 0
