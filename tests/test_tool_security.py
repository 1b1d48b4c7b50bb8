"""The query tool is not a way in (issue 15): privileged roles, statement guard, HTTP auth, call log.

Real parts: the session's PostgreSQL (its role is a superuser, as on most development
databases), real Ray actors hosting the tools, the official `mcp` SDK and raw HTTP.
"""

from __future__ import annotations

import logging

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from test_query_tool import call, tool_names

from chia_prefect import PrivilegedRoleError
from chia_prefect.query_tool import Caps, HttpToolServer, SQLiteToolSession, build_server

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


def role_dsn(admin_dsn: str, role: str, grant: str = "") -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO " + role)
        if grant:
            conn.execute(f"GRANT {grant} TO {role}")
    return make_conninfo(**{**conninfo_to_dict(admin_dsn), "user": role})


@pytest.fixture
def seeded(postgres_db):
    postgres_db.init_schema("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'a'); CREATE SEQUENCE s;")
    return postgres_db


# --- 1. privileged roles ----------------------------------------------------------------


@pytest.mark.postgres
def test_superuser_refused_at_spawn_with_the_recipe(seeded):
    with pytest.raises(PrivilegedRoleError) as raised:
        seeded.spawn_query_tool("app_db")
    message = str(raised.value)
    assert "is a superuser" in message and "run programs and read or write files" in message
    assert "CREATE ROLE agent_reader LOGIN" in message and "GRANT SELECT ON ALL TABLES" in message
    assert "allow_privileged_role=True (dangerous" in message
    assert seeded._tools == []  # nothing started


@pytest.mark.postgres
@pytest.mark.parametrize("grant", ["pg_execute_server_program", "pg_write_server_files", "pg_read_server_files"])
def test_server_file_and_program_roles_refused_also_by_dsn(seeded, postgres_dsn, grant):
    dsn = role_dsn(postgres_dsn, "tool_role", grant)
    with pytest.raises(PrivilegedRoleError, match=f"'tool_role' is a member of {grant}"):
        seeded.spawn_query_tool("app_db", dsn=dsn)


@pytest.mark.postgres
def test_select_only_role_serves(seeded, postgres_dsn):
    tool = seeded.spawn_query_tool("app_db", dsn=role_dsn(postgres_dsn, "agent_reader"))
    assert call(tool, "query", sql="SELECT id, v FROM t") == "id | v\n1 | a"
    assert call(tool, "query", sql="SELECT pg_read_file('/etc/hostname')").startswith("REFUSED: ")


SERVER_REACHING = [
    ("COPY (SELECT 1) TO PROGRAM 'touch {tmp}/ran'", "COPY is not allowed"),
    ("COPY t TO '{tmp}/t.csv'", "COPY is not allowed"),
    ("COPY t FROM '/etc/hostname'", "COPY is not allowed"),
    ("COPY (SELECT 1) TO STDOUT", "COPY is not allowed"),
    ("SELECT lo_import('/etc/hostname')", "lo_import() is a large-object function"),
    ("SELECT lo_export(1, '{tmp}/lo.bin')", "lo_export() is a large-object function"),
    ("SELECT lo_from_bytea(0, 'x')", "lo_from_bytea() is a large-object function"),
    ("SELECT pg_read_file('/etc/hostname')", "pg_read_file() is a server file function"),
    ("SELECT pg_catalog.pg_read_binary_file('/etc/hostname')", "pg_catalog.pg_read_binary_file() is a server file"),
    ("SELECT * FROM pg_ls_dir('.')", "pg_ls_dir() is a server file function"),
    ("SELECT pg_stat_file('postgresql.conf')", "pg_stat_file() is a server file function"),
    ("WITH x AS (SELECT pg_read_file('/etc/hostname') AS f) SELECT * FROM x", "pg_read_file() is a server file"),
    ("SELECT query_to_xml('SELECT pg_read_file(''/etc/hostname'')', true, true, '')", "runs SQL given as text"),
    ("SELECT set_config('default_transaction_read_only', 'off', false)", "set_config() is a server control"),
    ("SELECT pg_terminate_backend(1)", "pg_terminate_backend() is a server control"),
    ("SELECT 1; SELECT 2", "exactly one statement"),
]


@pytest.mark.postgres
def test_privileged_role_allowed_still_refused_by_the_parser(seeded, tmp_path):
    before = seeded.query_value("SELECT COUNT(*) FROM pg_largeobject_metadata")
    tool = seeded.spawn_query_tool("app_db", allow_privileged_role=True)
    rw = seeded.spawn_query_tool("app_db_rw", read_write=True, allow_privileged_role=True)
    for sql, reason in SERVER_REACHING:
        statement = sql.format(tmp=tmp_path)
        for target, member in ((tool, "query"), (rw, "execute")):
            answer = call(target, member, sql=statement)
            assert answer.startswith("REFUSED: ") and reason in answer, (member, statement, answer)
            assert "nothing was run" in answer
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no file written by the server
    assert seeded.query_value("SELECT COUNT(*) FROM pg_largeobject_metadata") == before
    # The write tool still writes what it is for, and says so honestly.
    assert call(rw, "execute", sql="INSERT INTO t VALUES (2, 'b')") == "OK: INSERT 0 1 (1 rows changed)"
    assert call(rw, "execute", sql="SET work_mem = '8MB'").startswith("OK: SET")


@pytest.mark.postgres
def test_every_refusal_names_itself(seeded):
    tool = seeded.spawn_query_tool("app_db", allow_privileged_role=True)
    answers = {sql: call(tool, "query", sql=sql) for sql in [
        "INSERT INTO t VALUES (3, 'c')", "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        "SELECT * INTO t2 FROM t", "CREATE TABLE u (a int)", "SELECT nextval('s')", "EXPLAIN ANALYZE DELETE FROM t",
        "SET default_transaction_read_only = off", "DO $$ BEGIN DELETE FROM t; END $$",
    ]}
    assert {sql: a for sql, a in answers.items() if not a.startswith("REFUSED: ")} == {}
    assert "this tool is read-only" in answers["INSERT INTO t VALUES (3, 'c')"]
    assert seeded.query_value("SELECT COUNT(*) FROM t") == 1


# --- 2. authentication and host checks ----------------------------------------------------


INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "probe", "version": "1"}}}
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def post(url: str, **headers: str) -> httpx.Response:
    return httpx.post(url, json=INITIALIZE, headers={**ACCEPT, **headers}, timeout=30)


@pytest.mark.parametrize("engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_http_needs_the_token_and_a_valid_host(request, engine):
    db = request.getfixturevalue(f"{engine}_db")
    db.init_schema("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    tool = db.spawn_query_tool("guarded", **({"allow_privileged_role": True} if engine == "postgres" else {}))
    assert tool.token and tool.headers == {"Authorization": f"Bearer {tool.token}"}
    assert tool.token not in repr(tool)
    assert post(tool.url).status_code == 401
    assert post(tool.url, authorization="Bearer wrong").status_code == 401
    assert post(tool.url, authorization=tool.token).status_code == 401  # not a bearer header
    assert post(tool.url, host="evil.example:80", **tool.headers).status_code == 421
    assert post(tool.url, origin="http://evil.example", **tool.headers).status_code == 403
    assert post(tool.url, **tool.headers).status_code == 200
    assert tool_names(tool) == {"query", "schema"}  # the official SDK, with the header


def test_outside_ray_the_tool_binds_loopback(sqlite_db):
    session = SQLiteToolSession(sqlite_db.db_path, Caps())
    server = HttpToolServer(build_server(session, "local", False), "t0ken")
    try:
        assert server.start().startswith("http://127.0.0.1:")
        assert post(server.url).status_code == 401
        assert post(server.url, authorization="Bearer t0ken").status_code == 200
        assert post(server.url, authorization="Bearer t0ken", host=f"localhost:{server.port}").status_code == 200
    finally:
        server.stop()


# --- 3. accountability ------------------------------------------------------------------


def test_every_call_is_logged(sqlite_db, tmp_path):
    from prefect.logging import get_logger

    from chia_prefect.query_tool import QueryTool

    sqlite_db.init_schema("CREATE TABLE t (id INTEGER PRIMARY KEY); INSERT INTO t VALUES (1), (2);")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = get_logger("chia_prefect.query_tool")
    logger.addHandler(handler)
    server = HttpToolServer(build_server(SQLiteToolSession(sqlite_db.db_path, Caps()), "audited", False), "tok")
    try:
        tool = QueryTool("audited", server.start(), server.stop, "tok")
        call(tool, "query", sql="SELECT id FROM t")
        call(tool, "query", sql="DELETE FROM t")
        call(tool, "schema")
    finally:
        server.stop()
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records]
    assert any("'audited': query 'SELECT id FROM t' -> 2 rows in" in line for line in lines), lines
    assert any("query 'DELETE FROM t' -> REFUSED: this tool is read-only" in line for line in lines), lines
    assert any("'audited': schema -> 1 rows" in line for line in lines), lines
    assert "tok" not in " ".join(lines).replace("audited", "")


@pytest.fixture(scope="session")
def node_mcp_client(tmp_path_factory):
    """A third-party client: the MCP TypeScript SDK from npm, driven by tests/mcp_client.mjs."""
    import json
    import os
    import shutil
    import subprocess
    from pathlib import Path

    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        if os.environ.get("CI"):
            pytest.fail("node and npm are needed for the third-party MCP client test")
        pytest.skip("node and npm are needed for the third-party MCP client test")
    folder = tmp_path_factory.mktemp("node-mcp")
    subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund", "@modelcontextprotocol/sdk@1"],
                   cwd=folder, check=True, timeout=300, capture_output=True)
    shutil.copy(Path(__file__).with_name("mcp_client.mjs"), folder / "mcp_client.mjs")

    def run(url: str, token: str, sql: str) -> dict:
        done = subprocess.run([node, str(folder / "mcp_client.mjs"), url, token, sql],
                              capture_output=True, text=True, timeout=60)
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run


def test_third_party_client_over_http(node_mcp_client, sqlite_db):
    sqlite_db.init_schema("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'a');")
    tool = sqlite_db.spawn_query_tool("node_probe")
    assert "unauthorized" in node_mcp_client(tool.url, "", "SELECT 1")["error"]
    assert "unauthorized" in node_mcp_client(tool.url, "not-the-token", "SELECT 1")["error"]
    answer = node_mcp_client(tool.url, tool.token, "SELECT id, v FROM t")
    assert answer == {"tools": ["query", "schema"], "text": "id | v\n1 | a"}
    assert node_mcp_client(tool.url, tool.token, "DELETE FROM t")["text"].startswith("REFUSED: ")
