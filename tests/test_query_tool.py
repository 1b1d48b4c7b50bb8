"""The MCP query tool from a real MCP client: tools, caps, time cap, write corpus, stdio, close."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from chia_prefect.query_tool import QueryTool

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


def client_for(target) -> Client:
    """An MCP client for a running tool (over HTTP, with its bearer token) or stdio params."""
    if isinstance(target, QueryTool):
        http = create_mcp_http_client(headers=target.headers)
        return Client(streamable_http_client(target.url, http_client=http))
    return Client(target)


def call(target, tool: str, **arguments) -> str:
    async def go() -> str:
        async with client_for(target) as client:
            result = await client.call_tool(tool, arguments)
            return result.content[0].text

    return asyncio.run(go())


def tool_names(target) -> set[str]:
    async def go() -> set[str]:
        async with client_for(target) as client:
            return {t.name for t in (await client.list_tools()).tools}

    return asyncio.run(go())


SEED = ("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL); CREATE INDEX ix_t_v ON t (v); "
        "INSERT INTO t (id, v) VALUES (1, 'a'), (2, 'b');")

SQLITE_CORPUS = [
    "INSERT INTO t (id, v) VALUES (3, 'x')", "UPDATE t SET v = 'z'", "DELETE FROM t", "REPLACE INTO t VALUES (1, 'r')",
    "INSERT OR IGNORE INTO t VALUES (9, 'i')", "INSERT INTO t DEFAULT VALUES", "INSERT INTO t VALUES (5, 'q') RETURNING id",
    "WITH x AS (SELECT 7, 'w') INSERT INTO t SELECT * FROM x", "CREATE TABLE u (a)", "CREATE TEMP TABLE tt (a)",
    "CREATE INDEX ix ON t (v)", "CREATE VIEW vw AS SELECT 1", "CREATE TRIGGER tr AFTER INSERT ON t BEGIN DELETE FROM t; END",
    "DROP TABLE t", "ALTER TABLE t ADD COLUMN c INTEGER", "ALTER TABLE t RENAME TO t2",
    "COMMIT; INSERT INTO t VALUES (4, 'c')", "BEGIN; DELETE FROM t; COMMIT;", "BEGIN IMMEDIATE", "COMMIT",
    "SAVEPOINT s", "PRAGMA query_only = 0", "PRAGMA query_only = 0; INSERT INTO t VALUES (6, 'p')",
    "PRAGMA journal_mode = DELETE", "PRAGMA user_version = 5", "PRAGMA writable_schema = 1", "PRAGMA foreign_keys = OFF",
    "ATTACH DATABASE '{tmp}/evil.db' AS evil", "ATTACH 'file:{tmp}/evil2.db?mode=rwc' AS e2",
    "VACUUM INTO '{tmp}/copy.db'", "VACUUM", "REINDEX", "ANALYZE", "SELECT load_extension('mod_evil')",
    "SELECT 1; DROP TABLE t",
]

POSTGRES_CORPUS = [
    "INSERT INTO t (id, v) VALUES (3, 'x')", "UPDATE t SET v = 'z'", "DELETE FROM t", "TRUNCATE t",
    "INSERT INTO t VALUES (5, 'q') RETURNING id", "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    "MERGE INTO t USING (SELECT 1 AS id) s ON t.id = s.id WHEN MATCHED THEN DELETE",
    "CREATE TABLE u (a int)", "CREATE TEMP TABLE tt (a int)", "CREATE INDEX ix ON t (v)", "CREATE VIEW vw AS SELECT 1",
    "CREATE SCHEMA evil", "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", "DROP TABLE t",
    "ALTER TABLE t ADD COLUMN c int", "COMMENT ON TABLE t IS 'x'", "GRANT ALL ON t TO PUBLIC",
    "COMMIT; INSERT INTO t VALUES (4, 'c')", "BEGIN; DELETE FROM t; COMMIT;",
    "SET default_transaction_read_only = off; INSERT INTO t VALUES (6, 'p')",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; DELETE FROM t",
    "START TRANSACTION READ WRITE; DELETE FROM t", "SELECT nextval('t_seq')", "SELECT setval('t_seq', 100)",
    "DO $$ BEGIN DELETE FROM t; END $$", "PREPARE p AS DELETE FROM t", "VACUUM t", "ANALYZE t", "REINDEX TABLE t",
    "CLUSTER t USING t_pkey", "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
    "SELECT set_config('default_transaction_read_only', 'off', false); DELETE FROM t",
    "COPY t FROM STDIN", "SELECT 1; DROP TABLE t",
]


def privileged_ok(engine: str) -> dict:
    """The test server's role is a superuser; these tests are about caps, not roles."""
    return {"allow_privileged_role": True} if engine == "postgres" else {}


@pytest.fixture
def seeded_sqlite(sqlite_db):
    sqlite_db.init_schema(SEED)
    sqlite_db.wal_checkpoint("TRUNCATE")
    return sqlite_db


@pytest.fixture
def seeded_postgres(postgres_db):
    postgres_db.init_schema(SEED + "CREATE SEQUENCE t_seq;")
    return postgres_db


def postgres_state(db) -> tuple:
    return (db.query("SELECT * FROM t ORDER BY id"), db.schema(),
            db.query_value("SELECT last_value FROM t_seq"), db.query("SELECT nspname FROM pg_namespace ORDER BY 1"))


def test_sqlite_tools_and_read_write_opt_in(seeded_sqlite):
    tool = seeded_sqlite.spawn_query_tool("app_db")
    assert tool_names(tool) == {"query", "schema"}
    assert call(tool, "query", sql="SELECT id, v FROM t ORDER BY id") == "id | v\n1 | a\n2 | b"
    assert "CREATE TABLE t" in call(tool, "schema")
    rw = seeded_sqlite.spawn_query_tool("app_db_rw", read_write=True)
    assert tool_names(rw) == {"query", "schema", "execute"}
    assert call(rw, "execute", sql="INSERT INTO t VALUES (3, 'c')") == "OK: 1 rows changed"
    assert seeded_sqlite.query_value("SELECT COUNT(*) FROM t") == 3


def test_sqlite_corpus_refused_file_unchanged(seeded_sqlite, tmp_path):
    path = Path(seeded_sqlite.db_path)
    before = path.read_bytes()
    tool = seeded_sqlite.spawn_query_tool("app_db")
    answers = {sql: call(tool, "query", sql=sql.format(tmp=tmp_path)) for sql in SQLITE_CORPUS}
    assert len(answers) >= 30
    assert {sql: a for sql, a in answers.items() if not a.startswith("REFUSED: ")} == {}
    assert path.read_bytes() == before  # byte for byte
    wal = Path(str(path) + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]  # nothing attached or vacuumed into


@pytest.mark.postgres
def test_postgres_corpus_refused_database_unchanged(seeded_postgres):
    before = postgres_state(seeded_postgres)
    tool = seeded_postgres.spawn_query_tool("pg_db", allow_privileged_role=True)  # the guard alone
    assert call(tool, "query", sql="SELECT id, v FROM t ORDER BY id") == "id | v\n1 | a\n2 | b"
    answers = {sql: call(tool, "query", sql=sql) for sql in POSTGRES_CORPUS}
    # A session flag turned off in one call does not outlive the call.
    answers["SET then write"] = call(tool, "query", sql="SET default_transaction_read_only = off")
    answers["...next call"] = call(tool, "query", sql="INSERT INTO t VALUES (8, 'late')")
    assert len(answers) >= 30
    assert {sql: a for sql, a in answers.items() if not a.startswith("REFUSED: ")} == {}
    assert postgres_state(seeded_postgres) == before  # row for row


@pytest.mark.postgres
def test_postgres_select_only_role_is_the_boundary(seeded_postgres, postgres_dsn):
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS reader; CREATE ROLE reader LOGIN; GRANT SELECT ON t TO reader")
    reader = make_conninfo(**{**conninfo_to_dict(postgres_dsn), "user": "reader"})
    tool = seeded_postgres.spawn_query_tool("pg_reader", read_write=True, dsn=reader)
    assert call(tool, "query", sql="SELECT COUNT(*) AS n FROM t") == "n\n2"
    denied = call(tool, "execute", sql="DELETE FROM t")  # even the write tool cannot
    assert denied.startswith("REFUSED: the tool's role lacks the privilege") and "permission denied" in denied
    assert seeded_postgres.query_value("SELECT COUNT(*) FROM t") == 2


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_caps_on_wide_table(request, engine):
    db = request.getfixturevalue(f"{engine}_db")
    db.init_schema("CREATE TABLE wide (id INTEGER PRIMARY KEY, a TEXT, b TEXT)")
    blob = "x" * 5000
    db.executemany(db.render("INSERT INTO wide VALUES (?, ?, ?)"), [(i, blob, "short") for i in range(10_000)])
    tool = db.spawn_query_tool("wide", row_limit=100, cell_char_limit=4096, total_char_limit=32768,
                               **privileged_ok(engine))
    text = call(tool, "query", sql="SELECT * FROM wide ORDER BY id")
    body, note = text.rsplit("\n", 1)
    assert len(body) <= 32768
    assert note.startswith("NOTE:") and "total size limit of 32768" in note and "truncated" in note
    assert "…[+904 chars]" in body
    few = call(tool, "query", sql="SELECT id, b FROM wide ORDER BY id")
    assert few.splitlines()[-1] == "NOTE: row limit reached: showing the first 100 rows; add a WHERE or LIMIT"
    assert len(few.splitlines()) == 102  # header + 100 rows + NOTE


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_time_cap_stops_runaway_query(request, engine):
    db = request.getfixturevalue(f"{engine}_db")
    db.init_schema("CREATE TABLE x (a INTEGER)")
    tool = db.spawn_query_tool("slow", time_limit_s=1, **privileged_ok(engine))
    runaway = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT COUNT(*) FROM c"
    text = call(tool, "query", sql=runaway)
    assert text.startswith("ERROR") and ("time limit" in text or "statement timeout" in text)
    assert call(tool, "query", sql="SELECT 1 AS one") == "one\n1"  # the server lives on


def test_one_signature_and_a_clear_refusal_of_an_option_the_engine_lacks(tmp_path):
    import inspect

    from chia_prefect import ConfigurationError, PostgresNode, SQLiteNode

    assert inspect.signature(SQLiteNode.spawn_query_tool) == inspect.signature(PostgresNode.spawn_query_tool)
    db = SQLiteNode(db_path=str(tmp_path / "app.db"))
    for option in ({"dsn": "postgresql://agent:hunter2@db/app"}, {"schemas": ("public",)},
                   {"allow_privileged_role": True}):
        with pytest.raises(ConfigurationError, match=f"{next(iter(option))}= is not an option of a SQLiteNode") as info:
            db.spawn_query_tool("app_db", **option)
        assert "PostgresNode" in str(info.value) and "hunter2" not in str(info.value)
    assert db._tools == []  # nothing was started


def test_close_stops_the_server(seeded_sqlite):
    tool = seeded_sqlite.spawn_query_tool("closing")
    address = urlparse(tool.url)
    with socket.create_connection((address.hostname, address.port), timeout=5):
        pass
    seeded_sqlite.close()
    with pytest.raises(OSError):
        socket.create_connection((address.hostname, address.port), timeout=5).close()
    seeded_sqlite.close()  # idempotent


def test_stdio_command_serves_a_saved_block(seeded_sqlite):
    seeded_sqlite.save("mcp-stdio", overwrite=True)
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "chia_prefect.cli", "mcp", "--block", "sqlite-node/mcp-stdio"],
        env={**os.environ},
    )
    assert tool_names(params) == {"query", "schema"}
    assert call(params, "query", sql="SELECT v FROM t WHERE id = 2") == "v\nb"
    assert call(params, "query", sql="DELETE FROM t").startswith("REFUSED: ")
