"""`PostgresNode`: a PostgreSQL database reached by DSN or by its parts.

psycopg 3 is imported inside the functions that connect, so importing chia_prefect and
building a block from a string DSN work without it (`pip install 'chia-prefect[postgres]'`).
Each call opens a fresh connection in autocommit mode; writes run in an explicit
`conn.transaction()`, reads in a session with `default_transaction_read_only=on`.
Single statements go through the extended protocol, where the server itself refuses a
second statement smuggled after a `;`.

The read-only session is a guard against mistakes, not a wall: the real boundary for an
untrusted reader is a role granted SELECT only.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from chia_prefect._sql import (
    ExecResult,
    check_rows,
    check_single_params,
    fetch_dicts,
    validate_identifier,
    validate_type_decl,
)
from chia_prefect._ui import optional_field
from chia_prefect.base import LOGO_BASE_URL, DatabaseNode
from chia_prefect.dialects import POSTGRES, Dialect
from chia_prefect.errors import (
    CommitOutcomeUnknownError,
    ConfigurationError,
    ConnectionLostError,
    InvalidIdentifierError,
    InvalidOperationError,
    NodeConnectionError,
)
from chia_prefect.limits import run_logger
from chia_prefect.members import read, write
from chia_prefect.placement import Placement

# Connecting again after the server turned the connection away: first pause, longest pause.
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 2.0
# What libpq says when the server turns a connection away before any statement was sent,
# and why (the connect-time errors carry no SQLSTATE in psycopg).
_TURNED_AWAY = (
    ("too many connections", "too many connections"),  # for a role or a database (53300)
    ("too many clients already", "too many connections"),  # max_connections (53300)
    ("remaining connection slots are reserved", "too many connections"),
    ("the database system is starting up", "the server is starting up"),  # 57P03
    ("not yet accepting connections", "the server is starting up"),
    ("the database system is in recovery mode", "the server is starting up"),
    ("the database system is shutting down", "the server is shutting down"),
    ("terminating connection due to administrator command", "the server is shutting down"),
    ("connection refused", "the connection was refused"),
    ('" failed: no such file or directory', "the connection was refused"),  # no server on the socket
)


def _turned_away(text: str) -> str | None:
    lowered = text.lower()
    return next((why for needle, why in _TURNED_AWAY if needle in lowered), None)


def _server_words(text: str) -> str:
    """What the server said, from libpq's first line ('connection to server ... failed: X')."""
    first = text.splitlines()[0] if text else ""
    return " ".join(first.rsplit("failed: ", 1)[-1].split())


class PostgresConnectOptions(BaseModel):
    """How each PostgreSQL connection is opened."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Connection options")

    connect_timeout_s: int = Field(
        default=30, ge=1, title="Connect timeout (s)", description="How long to wait for the server.",
    )
    lock_timeout_ms: int = Field(
        default=30000, ge=0, title="Lock timeout (ms)",
        description="How long a statement waits for a lock before failing; 0 waits forever.",
    )
    statement_timeout_ms: int | None = optional_field(
        ge=0, title="Statement timeout (ms)",
        description="Cancel a statement running longer than this; empty for no limit.",
    )
    application_name: str | None = Field(
        default="chia-prefect", title="Application name",
        description="Shown in pg_stat_activity for this node's connections.",
    )


class PostgresNode(DatabaseNode):
    """A PostgreSQL database whose operations run as Prefect tasks on Ray.

    Give either `dsn` (a libpq URI or `key=value` string) or the parts (`host`, `port`,
    `dbname`, `user`, `password`, ...). Placeholders are `%s` and `%(name)s`.

    Example:
        ```python
        from chia_prefect import PostgresNode

        db = PostgresNode.load("BLOCK_NAME")
        res = db.execute("INSERT INTO t (v) VALUES (%s) RETURNING id", ("x",))
        new_id = res.rows[0]["id"]
        ```
    """

    _block_type_name = "Postgres Node"
    _block_type_slug = "postgres-node"
    _logo_url = f"{LOGO_BASE_URL}/postgres-node.png"  # type: ignore[assignment]
    _description = (
        "A PostgreSQL database whose operations run as Prefect tasks on Ray. Writes are "
        "never retried or replayed; reads run in a read-only session."
    )
    _documentation_url = "https://github.com/chia-prefect/chia-prefect#readme"  # type: ignore[assignment]

    dialect: ClassVar[Dialect] = POSTGRES
    engine: ClassVar[str] = POSTGRES.name
    paramstyle: ClassVar[str] = POSTGRES.paramstyle
    multi_statement: ClassVar[bool] = POSTGRES.multi_statement
    query_tool_options: ClassVar[frozenset[str]] = frozenset({"dsn", "schemas", "allow_privileged_role"})

    dsn: SecretStr | None = optional_field(
        title="DSN",
        description="A libpq URI or key=value string with credentials. Leave empty to use the fields below.",
    )
    host: str | None = optional_field(title="Host", description="Server host name, IP or socket directory.")
    port: int | None = optional_field(title="Port", description="Server port; empty for 5432.")
    dbname: str | None = optional_field(title="Database", description="Database name.")
    user: str | None = optional_field(title="User", description="Role to connect as.")
    password: SecretStr | None = optional_field(title="Password", description="Password of the role.")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = optional_field(
        title="SSL mode", description="libpq sslmode; empty for the libpq default."
    )
    options: str | None = optional_field(title="Server options", description="libpq options, e.g. -c search_path=app.")
    placement: Placement = Field(
        default_factory=lambda: Placement(require_colocated=False),
        title="Placement on Ray",
        description="Where the members run; any worker can reach the server by default.",
    )
    max_concurrency: int | None = optional_field(
        ge=1, title="Max concurrent members",
        description=(
            "At most this many members (so connections) run at once, across every flow run and "
            "machine: a Prefect global concurrency limit named after the node. Empty for no cap."
        ),
    )
    connect_opts: PostgresConnectOptions = Field(
        default_factory=PostgresConnectOptions,
        title="Connection options",
        description="Timeouts and application name; members accept connect_opts= to override.",
    )

    @model_validator(mode="after")
    def _dsn_or_parts(self) -> PostgresNode:
        parts = [name for name in ("host", "port", "dbname", "user", "password", "sslmode", "options")
                 if getattr(self, name) is not None]
        if self.dsn is not None and parts:
            raise ConfigurationError(
                f"give either dsn or connection fields, not both (also set: {', '.join(parts)})"
            )
        if self.dsn is None and not parts:
            raise ConfigurationError("give dsn, or host/dbname/user/password to connect to PostgreSQL")
        return self

    # --- connections --------------------------------------------------------------------

    def _secrets(self) -> list[str]:
        values = [s.get_secret_value() for s in (self.dsn, self.password) if s is not None]
        return [v for v in values if v]

    def scrub(self, text: str) -> str:
        """`text` with the DSN, the password and anything shaped like a credential removed."""
        for secret in sorted(self._secrets(), key=len, reverse=True):
            text = text.replace(secret, "***")
        text = re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", text, flags=re.IGNORECASE)
        return re.sub(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)

    def _conninfo(self, read_only: bool, opts: PostgresConnectOptions) -> dict[str, Any]:
        """libpq parameters: the block's target plus the session settings for this call."""
        from psycopg.conninfo import conninfo_to_dict

        if self.dsn is not None:
            try:
                params = conninfo_to_dict(self.dsn.get_secret_value())
            except Exception as exc:
                raise ConfigurationError(f"{self.label}: the DSN is not valid: {self.scrub(str(exc))}") from None
        else:
            params = {k: getattr(self, k) for k in ("host", "port", "dbname", "user", "sslmode")
                      if getattr(self, k) is not None}
            if self.password is not None:
                params["password"] = self.password.get_secret_value()
        settings = [f"-c lock_timeout={opts.lock_timeout_ms}"]
        if opts.statement_timeout_ms is not None:
            settings.append(f"-c statement_timeout={opts.statement_timeout_ms}")
        if read_only:
            settings.append("-c default_transaction_read_only=on")
        user_options = str(params.pop("options", None) or self.options or "")
        params["options"] = " ".join([user_options, *settings] if user_options else settings)
        params["connect_timeout"] = opts.connect_timeout_s
        if opts.application_name:
            params["application_name"] = opts.application_name
        return params

    def _limit_identity(self) -> str:
        params = self._conninfo(False, self.connect_opts)
        where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"
        return f"{params.get('user') or ''}@{where}/{params.get('dbname') or ''}"

    @contextmanager
    def connect(
        self, *, read_only: bool = False, connect_opts: dict[str, Any] | BaseModel | None = None
    ) -> Iterator[Any]:
        import psycopg

        opts = self.resolve_connect_opts(connect_opts)
        params = self._conninfo(read_only, opts)
        conn = self._open(params, opts.connect_timeout_s)
        try:
            yield conn
        except psycopg.OperationalError as exc:
            if not conn.broken:
                raise
            lost = f"the connection to {self._where(params)} was lost ({self.scrub(str(exc)).strip()})"
            raise ConnectionLostError(
                f"{self.label}: {lost}; the server rolled back whatever this call had not "
                "committed. The next call opens a new connection.",
                detail=lost,
            ) from None
        finally:
            conn.close()

    def _open(self, params: dict[str, Any], timeout_s: float) -> Any:
        """Connect; retried with jittered backoff until `timeout_s` runs out while the server
        turns the connection away before any statement was sent (too many connections, starting
        up or shutting down, refused), which is safe for any member, a write included."""
        import psycopg

        deadline = time.monotonic() + timeout_s
        attempt = 0
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            try:
                # libpq's own timeout is per attempt and at least 2 s.
                return psycopg.connect(autocommit=True, **{**params, "connect_timeout": max(2, math.ceil(left))})
            except psycopg.Error as exc:
                # libpq messages can echo the conninfo; never let the password through.
                text = self.scrub(str(exc)).strip()
                reason = _turned_away(text)
                pause = random.uniform(0.5, 1.0) * min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** (attempt - 1))
                left = deadline - time.monotonic()
                if reason is None or left <= pause:
                    tried = f" after {attempt} attempts in {timeout_s:g} s" if attempt > 1 else ""
                    hint = ""
                    if reason == "too many connections":
                        hint = (" Cap the node's members with max_concurrency, or raise "
                                "connect_opts.connect_timeout_s.")
                    elif reason is not None:
                        hint = " Raise connect_opts.connect_timeout_s to wait longer."
                    raise NodeConnectionError(
                        f"{self.label}: could not connect to {self._where(params)}{tried}: {text}{hint}"
                    ) from None
                run_logger().info(
                    f"{self.label}: connecting to {self._where(params)} failed ({reason}: "
                    f"{_server_words(text)}); retry {attempt} in {pause:.2f} s, "
                    f"{left:.1f} s left of connect_timeout_s"
                )
                time.sleep(pause)

    def _where(self, params: dict[str, Any]) -> str:
        host = params.get("host") or "the default host"
        port = params.get("port") or 5432
        return self.scrub(f"database {params.get('dbname') or '(default)'} at {host}:{port}")

    @contextmanager
    def atomic(self, connect_opts: dict[str, Any] | BaseModel | None = None) -> Iterator[Any]:
        """One transaction; a connection lost before COMMIT was sent means nothing applied."""
        committing = False
        try:
            with self.connect(connect_opts=connect_opts) as conn, conn.transaction():
                yield conn.cursor()
                committing = True  # leaving the block sends COMMIT
        except ConnectionLostError as exc:
            if not committing:
                raise
            raise CommitOutcomeUnknownError(
                f"{self.label}: {exc.detail} while COMMIT was in flight, so the transaction may "
                "or may not have been applied: check the data before running it again."
            ) from None

    def _fetch(self, sql: str, params: Any, limit: int | None, connect_opts: dict[str, Any] | None) -> list[dict[str, Any]]:
        check_single_params(params, "query")
        self._check_paramstyle(sql, params, "query")
        with self.connect(read_only=True, connect_opts=connect_opts) as conn:
            cur = conn.cursor()
            if limit is None:
                cur.execute(sql, params or None, prepare=True)
                return fetch_dicts(cur)
            return _stream_dicts(cur, sql, params or None, limit)

    def _check_paramstyle(self, sql: object, params: object, where: str) -> None:
        _check_paramstyle(sql, params, where)

    def _run_one(self, cur: Any, sql: str, params: tuple[Any, ...] | dict[str, Any] | None) -> ExecResult:
        # prepare=True: extended protocol, so the server refuses a second statement.
        cur.execute(sql, params or None, prepare=True)
        rows = fetch_dicts(cur) if cur.description else None
        return ExecResult(rowcount=cur.rowcount, rows=rows)

    def _run_script(self, script: str, connect_opts: dict[str, Any] | None) -> None:
        if not isinstance(script, str):
            raise TypeError(f"script must be a str, got {type(script).__name__}")
        with self.connect(connect_opts=connect_opts) as conn:
            # No parameters: one simple-protocol message, which the server runs as one
            # implicit transaction unless the script says BEGIN/COMMIT itself.
            conn.execute(script)

    def _query_tool_session(  # type: ignore[override]  # options checked against query_tool_options by the caller
        self, caps: Any, dsn: str | SecretStr | None = None, schemas: tuple[str, ...] = ("public",),
        allow_privileged_role: bool = False,
    ) -> Any:
        """Read-only sessions under a statement guard. `dsn=` gives the tool other
        credentials: a role granted SELECT only is the real boundary. A superuser or a role
        with server file/program rights is refused unless `allow_privileged_role=True`."""
        from chia_prefect.query_tool import PostgresToolSession

        node = self if dsn is None else PostgresNode(dsn=dsn, placement=self.placement, connect_opts=self.connect_opts)
        session = PostgresToolSession(node, caps, schemas)
        session.check_role(allow_privileged_role)
        return session

    # --- members ------------------------------------------------------------------------

    def run_maintenance(self, *, backup_dir: str | None = None, keep: int = 7) -> dict[str, Any]:
        """`ANALYZE` (backups of a server are the server's business: `backup_dir` and `keep`
        do not apply)."""
        self.execute("ANALYZE")
        return {"analyze": "done"}

    @write
    def add_column_if_missing(
        self, table: str, column: str, type_decl: str, *, connect_opts: dict[str, Any] | None = None
    ) -> bool:
        """Add `column` to `table` (`schema.table` allowed, default public); True iff added."""
        schema_name, table_name = _split_table(table)
        validate_identifier(column, "column")
        type_decl = validate_type_decl(type_decl)
        from psycopg import sql as pgsql

        target = pgsql.Identifier(schema_name.lower(), table_name.lower())
        with self.atomic(connect_opts) as cur:
            # Self-conflicting lock: concurrent callers agree on who added the column.
            cur.execute(pgsql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(target))
            cur.execute(
                "SELECT 1 FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s AND column_name = %s",
                (schema_name.lower(), table_name.lower(), column.lower()),
            )
            if cur.fetchone():
                return False
            cur.execute(pgsql.SQL("ALTER TABLE {} ADD COLUMN {} " + type_decl).format(
                target, pgsql.Identifier(column.lower())))
            return True

    @read
    def schema(  # type: ignore[override]  # pydantic's deprecated BaseModel.schema() classmethod
        self, *, schemas: tuple[str, ...] = ("public",), connect_opts: dict[str, Any] | None = None
    ) -> str:
        """Tables with their columns, then indexes, for the given schemas."""
        names = list(schemas)
        columns = self._fetch(
            "SELECT table_schema, table_name, column_name, data_type, is_nullable "
            "FROM information_schema.columns WHERE table_schema = ANY(%s) "
            "ORDER BY table_schema, table_name, ordinal_position", (names,), None, connect_opts)
        indexes = self._fetch(
            "SELECT schemaname, indexname, indexdef FROM pg_indexes WHERE schemaname = ANY(%s) "
            "ORDER BY schemaname, tablename, indexname", (names,), None, connect_opts)
        return _render_schema(columns, indexes)

    @write(batch=("rows",))
    def copy_rows(
        self, table: str, columns: list[str] | tuple[str, ...], rows: list[Any], *, connect_opts: dict[str, Any] | None = None
    ) -> ExecResult:
        """Bulk insert `rows` into `table (columns)` with `COPY ... FROM STDIN`, all or nothing.

        Several times faster than `executemany` of an INSERT for large batches. Each row is a
        tuple or list with one value per column; a value the column refuses rolls it all back.
        """
        schema_name, table_name = _split_table(table)
        if not isinstance(columns, (list, tuple)) or not columns:
            raise InvalidOperationError(
                f"copy_rows: columns must be a non-empty list of column names, got {columns!r}; nothing was executed.")
        names = [validate_identifier(column, "column").lower() for column in columns]
        check_rows(rows, "copy_rows")
        width = len(names)
        for index, row in enumerate(rows):
            if not isinstance(row, (tuple, list)) or len(row) != width:
                raise InvalidOperationError(
                    f"copy_rows: row {index} must be a tuple of {width} values ({', '.join(names)}), "
                    f"got {_describe_row(row)}; nothing was executed.")
        from psycopg import sql as pgsql

        statement = pgsql.SQL("COPY {} ({}) FROM STDIN").format(
            pgsql.Identifier(schema_name.lower(), table_name.lower()),
            pgsql.SQL(", ").join(pgsql.Identifier(name) for name in names))
        with self.atomic(connect_opts) as cur:
            with cur.copy(statement) as copy:
                for row in rows:
                    copy.write_row(row)
            return ExecResult(rowcount=len(rows))

_FORMAT_PLACEHOLDER = re.compile(r"%(\([^)]*\))?[sbt]")


def _check_paramstyle(sql: object, params: object, where: str) -> None:
    """Refuse `?` placeholders before anything runs: psycopg takes `%s` (paramstyle format)
    and would only say the counts differ."""
    if not params or not isinstance(sql, str) or "?" not in sql or _FORMAT_PLACEHOLDER.search(sql):
        return
    raise InvalidOperationError(
        f"{where}: the SQL has ? placeholders, but PostgreSQL takes %s (or %(name)s); write %s, or "
        "write ? and pass the SQL through db.render(sql), which renders it for the node's "
        "paramstyle. Nothing was executed."
    )


def _stream_dicts(cur: Any, sql: str, params: Any, limit: int) -> list[dict[str, Any]]:
    """At most `limit` rows, fetched in chunks; the rest never leaves the server."""
    if limit == 0:
        cur.execute(sql, params, prepare=True)
        return []
    rows = []
    stream = cur.stream(sql, params, size=min(limit, 1000))
    for row in stream:
        rows.append(row)
        if len(rows) >= limit:
            break
    stream.close()  # cancels the rest of the result
    names = [c.name for c in cur.description] if cur.description else []
    return [dict(zip(names, row)) for row in rows]


def _describe_row(row: object) -> str:
    if isinstance(row, (tuple, list)):
        return f"a {type(row).__name__} of {len(row)}"
    return f"a {type(row).__name__}"


def _split_table(table: object) -> tuple[str, str]:
    if not isinstance(table, str):
        raise InvalidIdentifierError(f"table {table!r} must be a str; nothing was executed.")
    parts = table.split(".")
    if len(parts) > 2:
        raise InvalidIdentifierError(f"table {table!r} has more than one '.'; use schema.table.")
    schema_name, table_name = parts if len(parts) == 2 else ("public", parts[0])
    return validate_identifier(schema_name, "schema"), validate_identifier(table_name, "table")


def _render_schema(columns: list[dict[str, Any]], indexes: list[dict[str, Any]]) -> str:
    tables: dict[str, list[str]] = {}
    for col in columns:
        null = "" if col["is_nullable"] == "YES" else " NOT NULL"
        tables.setdefault(f"{col['table_schema']}.{col['table_name']}", []).append(
            f"  {col['column_name']} {col['data_type']}{null}")
    parts = [f"TABLE {name} (\n" + ",\n".join(cols) + "\n)" for name, cols in tables.items()]
    parts += [f"{ix['indexdef']}" for ix in indexes]
    return ";\n".join(parts) + (";" if parts else "")
