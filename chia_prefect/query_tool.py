"""Read-only SQL for LLM agents over MCP, served beside the database node.

    tool = db.spawn_query_tool("app_db")        # on Ray: an actor placed like the members
    print(tool.url)                             # http://<node ip>:<port>/mcp (streamable HTTP)
    db.close()                                  # stops the tool, then releases the placement

Tools: `query(sql)` and `schema()`, plus `execute(sql)` only with `read_write=True`.
Results are a pipe-delimited table; rows, cells and the whole are capped while fetching,
and a final `NOTE:` line says which cap fired. Errors come back as text.

The boundary is the engine, not string inspection. SQLite: the file is opened `mode=ro`
with `query_only`, and an authorizer allows only reads (no ATTACH, PRAGMA changes,
transactions, extension loading). Postgres: one fresh read-only session per call, one
statement per call (extended protocol) and `statement_timeout`. That session flag is a
guard, not a wall: give `dsn=` a role granted SELECT only.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from chia_prefect._sql import SQLITE_AUTH, SQLITE_PERM, SQLITE_READONLY
from chia_prefect.errors import SchedulingTimeoutError

if TYPE_CHECKING:
    from chia_prefect.base import DatabaseNode
    from chia_prefect.postgres import PostgresNode


@dataclass(frozen=True)
class Caps:
    """Limits on one tool result."""

    row_limit: int = 100
    cell_char_limit: int = 4096
    total_char_limit: int = 32768
    time_limit_s: float = 10.0


def _cell(value: Any, limit: int) -> tuple[str, bool]:
    if value is None:
        text = "NULL"
    elif isinstance(value, (bytes, bytearray, memoryview)):
        text = f"<{len(bytes(value))} bytes>"
    else:
        text = str(value).replace("\r", " ").replace("\n", " ").replace("|", "\\|")
    if len(text) > limit:
        return text[:limit] + f"…[+{len(text) - limit} chars]", True
    return text, False


def render_table(names: list[str], fetchmany: Any, caps: Caps) -> str:
    """Fetch and render at most `row_limit` rows within the caps; never fetch everything."""
    lines = [" | ".join(names)]
    total, rows, notes, cut_cells = len(lines[0]), 0, [], False
    while True:
        batch = fetchmany(min(100, caps.row_limit + 1 - rows))
        if not batch:
            break
        for row in batch:
            if rows == caps.row_limit:
                notes.append(f"row limit reached: showing the first {caps.row_limit} rows; add a WHERE or LIMIT")
                break
            cells = [_cell(v, caps.cell_char_limit) for v in row]
            cut_cells |= any(cut for _, cut in cells)
            line = " | ".join(text for text, _ in cells)
            if total + 1 + len(line) > caps.total_char_limit:
                notes.append(f"total size limit of {caps.total_char_limit} characters reached after {rows} rows")
                break
            lines.append(line)
            total += 1 + len(line)
            rows += 1
        if notes:
            break
    if rows == 0 and not notes:
        lines.append("(no rows)")
    if cut_cells:
        notes.append(f"cells longer than {caps.cell_char_limit} characters were truncated")
    if notes:
        lines.append("NOTE: " + "; ".join(notes))
    return "\n".join(lines)


def _error(exc: BaseException, scrub: Any = str) -> str:
    return f"ERROR: {type(exc).__name__}: {scrub(str(exc)).strip()}"


# --- SQLite ---------------------------------------------------------------------------

# The authorizer sees a pragma's argument and an assigned value alike: these take a table
# or index name and never write; the others are allowed only without an argument.
_PRAGMAS_READING_AN_OBJECT = frozenset({
    "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo", "foreign_key_list",
})
_PRAGMAS_READING = frozenset({
    "database_list", "collation_list", "function_list", "page_count", "page_size", "user_version",
    "schema_version", "journal_mode", "encoding", "compile_options",
})
_DENIED_FUNCTIONS = frozenset({"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"})


def _sqlite_authorizer(action: int, arg1: Any, arg2: Any, db_name: Any, source: Any) -> int:
    """Allow reading only; everything else is refused by SQLite before it runs."""
    if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE):
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if str(arg2).lower() in _DENIED_FUNCTIONS else sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:  # arg1: pragma name, arg2: its value when assigned
        pragma = str(arg1).lower()
        allowed = pragma in _PRAGMAS_READING_AN_OBJECT or (pragma in _PRAGMAS_READING and arg2 is None)
        return sqlite3.SQLITE_OK if allowed else sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_DENY


# The authorizer's denial, and a write on a read-only connection.
_SQLITE_REFUSALS = frozenset({SQLITE_AUTH, SQLITE_READONLY, SQLITE_PERM})
# Authorizer action codes by name, for saying what was refused.
_SQLITE_ACTIONS = {getattr(sqlite3, f"SQLITE_{name}"): name.replace("_", " ") for name in (
    "ALTER_TABLE", "ANALYZE", "ATTACH", "CREATE_INDEX", "CREATE_TABLE", "CREATE_TEMP_INDEX", "CREATE_TEMP_TABLE",
    "CREATE_TEMP_TRIGGER", "CREATE_TEMP_VIEW", "CREATE_TRIGGER", "CREATE_VIEW", "CREATE_VTABLE", "DELETE", "DETACH",
    "DROP_INDEX", "DROP_TABLE", "DROP_TEMP_INDEX", "DROP_TEMP_TABLE", "DROP_TEMP_TRIGGER", "DROP_TEMP_VIEW",
    "DROP_TRIGGER", "DROP_VIEW", "DROP_VTABLE", "FUNCTION", "INSERT", "PRAGMA", "REINDEX", "SAVEPOINT",
    "TRANSACTION", "UPDATE")}


class SQLiteToolSession:
    """One read-only SQLite connection per tool call."""

    def __init__(self, db_path: str, caps: Caps, busy_timeout_s: float = 5.0):
        self.db_path, self.caps, self.busy_timeout_s = db_path, caps, busy_timeout_s

    def _connect(self, read_only: bool) -> tuple[sqlite3.Connection, dict[str, Any]]:
        mode = "ro" if read_only else "rw"
        conn = sqlite3.connect(f"file:{quote(self.db_path)}?mode={mode}", uri=True,
                               timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
        state: dict[str, Any] = {"timed_out": False}
        deadline = time.monotonic() + self.caps.time_limit_s

        def over_time() -> int:
            state["timed_out"] = time.monotonic() > deadline
            return int(state["timed_out"])

        conn.set_progress_handler(over_time, 10_000)
        if read_only:
            conn.execute("PRAGMA query_only = ON")

            def authorizer(action: int, arg1: Any, arg2: Any, db_name: Any, source: Any) -> int:
                verdict = _sqlite_authorizer(action, arg1, arg2, db_name, source)
                if verdict == sqlite3.SQLITE_DENY:
                    what = _SQLITE_ACTIONS.get(action, str(action))
                    state["denied"] = f"{what} {arg2 if action == sqlite3.SQLITE_FUNCTION else arg1 or ''}".strip()
                return verdict

            conn.set_authorizer(authorizer)
        return conn, state

    def _run(self, sql: str, read_only: bool) -> str:
        try:
            conn, state = self._connect(read_only)
        except sqlite3.Error as exc:
            return _error(exc)
        try:
            cur = conn.execute(sql)
            if cur.description is None:
                return f"OK: {max(cur.rowcount, 0)} rows changed"
            return render_table([d[0] for d in cur.description], cur.fetchmany, self.caps)
        except sqlite3.ProgrammingError as exc:  # raised before anything runs
            return f"REFUSED: send exactly one statement per call ({exc}); nothing was run."
        except sqlite3.Error as exc:
            if state["timed_out"]:
                return f"ERROR: the query ran past the {self.caps.time_limit_s:g} s time limit and was stopped"
            if state.get("denied"):
                return f"REFUSED: this tool is read-only and SQLite refused {state['denied']}; nothing was changed."
            if read_only and getattr(exc, "sqlite_errorcode", None) in _SQLITE_REFUSALS:
                return f"REFUSED: this tool is read-only; SQLite refused the statement ({exc}); nothing was changed."
            return _error(exc)
        finally:
            conn.close()

    def query(self, sql: str) -> str:
        return self._run(sql, read_only=True)

    def execute(self, sql: str) -> str:
        return self._run(sql, read_only=False)

    def schema(self) -> str:
        return self.query("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type, name")


# --- Postgres -------------------------------------------------------------------------


class PostgresToolSession:
    """A fresh session per tool call: read-only, one statement, statement_timeout.

    Statements are checked with PostgreSQL's grammar first (`tool_guard`); the role is
    checked once, when the tool starts (`check_role`).
    """

    def __init__(self, node: PostgresNode, caps: Caps, schemas: tuple[str, ...] = ("public",)):
        self.node, self.caps, self.schemas = node, caps, schemas

    def check_role(self, allow_privileged_role: bool = False) -> None:
        """Refuse a superuser or a role with server file/program rights (PrivilegedRoleError)."""
        from chia_prefect.tool_guard import check_role

        with self.node.connect(read_only=True, connect_opts={"application_name": "chia-query-tool"}) as conn:
            check_role(conn, self.node.label, allow_privileged_role)

    def _run(self, sql: str, read_only: bool, params: Any = None, checked: bool = False) -> str:
        import psycopg

        from chia_prefect.errors import ChiaPrefectError
        from chia_prefect.tool_guard import refusal, returns_rows

        if not checked:
            refused = refusal(sql, read_only)
            if refused:
                return refused
        opts = {"statement_timeout_ms": int(self.caps.time_limit_s * 1000), "application_name": "chia-query-tool"}
        try:
            with self.node.connect(read_only=read_only, connect_opts=opts) as conn:
                cur = conn.cursor()
                if not checked and not returns_rows(sql):
                    # Extended protocol: the server runs exactly one statement.
                    cur.execute(sql, params, prepare=True)
                    return f"OK: {cur.statusmessage} ({max(cur.rowcount, 0)} rows changed)"
                rows = cur.stream(sql, params, size=100)
                try:
                    return self._render(cur, rows)
                finally:
                    rows.close()
        except psycopg.Error as exc:
            reason = _PG_REFUSALS.get(getattr(exc, "sqlstate", None) or "")
            if reason:
                return f"REFUSED: {reason}; the server refused the statement ({self.node.scrub(str(exc)).strip()})."
            return _error(exc, self.node.scrub)
        except ChiaPrefectError as exc:
            return _error(exc, self.node.scrub)

    def _render(self, cur: Any, rows: Any) -> str:
        iterator = iter(rows)
        first = next(iterator, None)
        pending = [] if first is None else [first]

        def fetchmany(n: int) -> list[Any]:
            out = [pending.pop()] if pending else []
            for row in iterator:
                out.append(row)
                if len(out) >= n:
                    break
            return out

        return render_table([c.name for c in cur.description], fetchmany, self.caps)

    def query(self, sql: str) -> str:
        return self._run(sql, read_only=True)

    def execute(self, sql: str) -> str:
        return self._run(sql, read_only=False)

    def schema(self) -> str:
        return self._run(
            "SELECT table_schema, table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = ANY(%s) ORDER BY table_schema, table_name, ordinal_position",
            read_only=True, params=(list(self.schemas),), checked=True,
        )


# SQLSTATEs that mean "refused" rather than "failed".
_PG_REFUSALS = {
    "25006": "this tool is read-only",  # read_only_sql_transaction
    "42501": "the tool's role lacks the privilege",  # insufficient_privilege
}


# --- MCP server -----------------------------------------------------------------------


def build_server(session: Any, name: str, read_write: bool) -> Any:
    """An `MCPServer` exposing the session's query/schema (and execute if read_write).

    Every call is logged (tool, statement, outcome, duration) on the
    `chia_prefect.query_tool` logger.
    """
    import anyio
    from mcp.server.mcpserver import MCPServer

    server = MCPServer(name, instructions="SQL over one database. Results are capped; a NOTE line says when.")

    async def logged(tool: str, call: Any, *args: str) -> str:
        started = time.monotonic()
        answer: str = await anyio.to_thread.run_sync(call, *args)
        log_call(name, tool, args[0] if args else None, answer, time.monotonic() - started)
        return answer

    @server.tool(description="Run ONE read-only SQL statement and return a pipe-delimited table.")
    async def query(sql: str) -> str:
        return await logged("query", session.query, sql)

    @server.tool(description="List the tables, columns and indexes of the database.")
    async def schema() -> str:
        return await logged("schema", session.schema)

    if read_write:
        @server.tool(description="Run ONE SQL statement that may change the database.")
        async def execute(sql: str) -> str:
            return await logged("execute", session.execute, sql)

    return server


def log_call(name: str, tool: str, sql: str | None, answer: str, seconds: float) -> None:
    """One INFO line per tool call: what the agent asked and what it got."""
    from prefect.logging import get_logger

    first = answer.split("\n", 1)[0]
    if first.startswith(("REFUSED", "ERROR", "OK")):
        outcome = first[:300]
    else:
        lines = answer.split("\n")
        rows = len([line for line in lines[1:] if not line.startswith("NOTE: ") and line != "(no rows)"])
        outcome = f"{rows} rows" + (" (capped)" if lines[-1].startswith("NOTE: ") else "")
    statement = "" if sql is None else f" {sql[:500]!r}"
    get_logger("chia_prefect.query_tool").info(
        "query tool %r: %s%s -> %s in %.0f ms", name, tool, statement, outcome, seconds * 1000)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class HttpToolServer:
    """An MCP server on streamable HTTP in a background thread of this process.

    Every request must carry `Authorization: Bearer <token>` (else 401), and a Host (and,
    when sent, an Origin) naming this server's address (else 421/403): DNS rebinding.
    """

    def __init__(self, server: Any, token: str, host: str = "127.0.0.1"):
        import uvicorn
        from mcp.server.transport_security import TransportSecuritySettings

        self.host, self.port = host, _free_port(host)
        names = sorted({host, "127.0.0.1", "localhost"} if host in ("127.0.0.1", "localhost") else {host})
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[f"{n}:{self.port}" for n in names],
            allowed_origins=[f"http://{n}:{self.port}" for n in names],
        )
        app = BearerTokenMiddleware(server.streamable_http_app(host=host, transport_security=security), token)
        self._uvicorn = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._uvicorn.run, name=f"mcp-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/mcp"

    def start(self, timeout: float = 30) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the MCP server on port {self.port} did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=10)


class BearerTokenMiddleware:
    """ASGI: answer 401 to any HTTP request without the tool's bearer token."""

    def __init__(self, app: Any, token: str):
        self.app, self._expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"www-authenticate", b'Bearer realm="chia-prefect"')]})
                await send({"type": "http.response.body",
                            "body": b'{"error": "unauthorized: send Authorization: Bearer <tool.token>"}'})
                return
        await self.app(scope, receive, send)


class _ToolActor:
    """Ray actor hosting the MCP server on the node's machine."""

    def __init__(self, session: Any, name: str, read_write: bool, token: str):
        import ray

        host = ray.util.get_node_ip_address()
        self._server = HttpToolServer(build_server(session, name, read_write), token, host=host)
        self._server.start()

    def url(self) -> str:
        return self._server.url

    def stop(self) -> None:
        self._server.stop()


class QueryTool:
    """Handle of a running query tool: its `url`, its bearer `token` (`headers` for a
    client), and `stop()` (idempotent). The token never appears in `repr()`."""

    def __init__(self, name: str, url: str, stopper: Any, token: str):
        self.name, self.url, self._stopper, self.token = name, url, stopper, token

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers an MCP client must send: `{"Authorization": "Bearer <token>"}`."""
        return {"Authorization": f"Bearer {self.token}"}

    def stop(self) -> None:
        stopper, self._stopper = self._stopper, None
        if stopper is not None:
            stopper()

    def __repr__(self) -> str:
        return f"QueryTool({self.name!r}, url={self.url!r}, running={self._stopper is not None})"


def spawn(node: DatabaseNode, session: Any, name: str, read_write: bool) -> QueryTool:
    """Serve `session` over MCP: as a Ray actor placed like the node's members when Ray is
    initialised, else in a thread of this process."""
    import ray

    token = secrets.token_urlsafe(32)
    if not ray.is_initialized():  # in this process, on loopback only
        server = HttpToolServer(build_server(session, name, read_write), token)
        return QueryTool(name, server.start(), server.stop, token)
    options = {k: v for k, v in node.member_ray_options().items() if k in ("num_cpus", "resources", "scheduling_strategy")}
    actor: Any = ray.remote(_ToolActor).options(max_restarts=0, **options).remote(session, name, read_write, token)
    timeout = node.placement.schedule_timeout_s
    try:
        url = ray.get(actor.url.remote(), timeout=120 if timeout is None else timeout + 60)
    except ray.exceptions.GetTimeoutError:
        ray.kill(actor)
        from chia_prefect.members.scheduling import describe_unscheduled

        # No gate needed to say why: an actor is not a member.
        raise SchedulingTimeoutError(
            describe_unscheduled(f"the query tool {name!r} of {node.label}", options, timeout or 120)
        ) from None

    def stop() -> None:
        try:
            ray.get(actor.stop.remote(), timeout=30)
        finally:
            ray.kill(actor)

    return QueryTool(name, url, stop, token)


def serve_block_stdio(args: Any) -> int:
    """`chia-prefect mcp --block ...`: serve a saved node's tool over stdio.

    Logs go to stderr; stdout carries the protocol. When the block cannot be served (no API,
    no such block, a privileged role), the reason reaches the client as the JSON-RPC error
    of its `initialize` request, not as a closed connection.
    """
    from chia_prefect.cli import _block
    from chia_prefect.ops import load_node

    try:
        block = _block(args.block)
        node = load_node(block)
        caps = Caps(args.row_limit, args.cell_char_limit, args.total_char_limit, args.time_limit_s)
        options = {"allow_privileged_role": args.allow_privileged_role}
        session = node._query_tool_session(
            caps, **{key: value for key, value in options.items() if key in node.query_tool_options})
    except Exception as exc:  # noqa: BLE001 - every reason goes to the client
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"chia-prefect mcp: error: {reason}", file=sys.stderr)
        _refuse_stdio(f"chia-prefect cannot serve {args.block!r}: {reason}")
        return 1
    build_server(session, args.name or block.split("/")[-1], args.read_write).run("stdio")
    return 0


def _refuse_stdio(reason: str, wait_s: float = 30.0) -> None:
    """Answer the client's requests on stdin with a JSON-RPC error carrying `reason`, until
    it closes stdin (or `wait_s` passes without a request)."""
    import json
    import select

    deadline = time.monotonic() + wait_s
    buffer = b""
    stdin = sys.stdin.buffer
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stdin], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return
        chunk = os.read(stdin.fileno(), 65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and "id" in message and "method" in message:
                error = {"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32603, "message": reason}}
                sys.stdout.write(json.dumps(error) + "\n")
                sys.stdout.flush()
                if message["method"] == "initialize":
                    return
