"""PostgreSQL as a driver: connecting (with the connect retry), one transaction, fetching,
one statement, scripts, COPY.

No Prefect and no Ray: `PostgresEngine` runs where it is called and is tested alone. psycopg
3 is imported inside the methods that connect. Each call opens a fresh connection in
autocommit mode; writes run in an explicit `conn.transaction()`, reads in a session with
`default_transaction_read_only=on`. Single statements go through the extended protocol,
where the server itself refuses a second statement smuggled after a `;`.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from chia_prefect._sql import ExecResult, RowTable, check_single_params, exec_result, fetch_dicts, fetch_table
from chia_prefect._ui import optional_field
from chia_prefect.engines.dialect import POSTGRES
from chia_prefect.errors import (
    CommitOutcomeUnknownError,
    ConfigurationError,
    ConnectionLostError,
    InvalidOperationError,
    MigrationLockError,
    NodeConnectionError,
)

# Connecting again after the server turned the connection away: first pause, longest pause.
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 2.0
# The advisory lock every migrator of a database takes.
MIGRATION_LOCK_KEY = 1667786081
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


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with the given secrets and anything shaped like a credential removed."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    text = re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", text, flags=re.IGNORECASE)
    return re.sub(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


SSLMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


class PostgresTarget(BaseModel):
    """Where a PostgreSQL database is and who connects to it: a libpq DSN (URI or
    `key=value`), or its parts. The one place that knows the DSN-or-parts rule, turns either
    into libpq parameters, lists the secrets to scrub and names the database in messages (as
    prefect-sqlalchemy's `ConnectionComponents`). `repr()` shows no secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    PARTS: ClassVar[tuple[str, ...]] = ("host", "port", "dbname", "user", "password", "sslmode", "options")

    dsn: SecretStr | None = None
    host: str | None = None
    port: int | None = None
    dbname: str | None = None
    user: str | None = None
    password: SecretStr | None = None
    sslmode: SSLMode | None = None
    options: str | None = None

    @model_validator(mode="after")
    def _dsn_or_parts(self) -> PostgresTarget:
        check_dsn_or_parts(self)
        return self

    @classmethod
    def from_dsn(cls, dsn: str | SecretStr) -> PostgresTarget:
        return cls(dsn=dsn if isinstance(dsn, SecretStr) else SecretStr(dsn))

    def params(self) -> dict[str, Any]:
        """libpq parameters: the DSN parsed, or the parts set. A DSN libpq cannot parse
        raises `ConfigurationError` without the DSN in it."""
        if self.dsn is None:
            params: dict[str, Any] = {name: getattr(self, name) for name in self.PARTS if getattr(self, name) is not None}
            if self.password is not None:
                params["password"] = self.password.get_secret_value()
            return params
        from psycopg.conninfo import conninfo_to_dict

        try:
            return dict(conninfo_to_dict(self.dsn.get_secret_value()))
        except Exception as exc:
            # Not self.scrub: listing the secrets parses the DSN again.
            raise ConfigurationError(f"the DSN is not valid: {scrub(str(exc), [self.dsn.get_secret_value()])}") from None

    def secrets(self) -> list[str]:
        """Strings no message may show: the DSN, the password, the DSN's own password."""
        values = [s.get_secret_value() for s in (self.dsn, self.password) if s is not None]
        if self.dsn is not None:
            try:
                values.append(str(self.params().get("password") or ""))
            except ConfigurationError:
                pass  # an unparsable DSN is scrubbed whole
        return [v for v in values if v]

    def scrub(self, text: str) -> str:
        """`text` with the secrets and anything shaped like a credential removed."""
        return scrub(text, self.secrets())

    def identity(self) -> str:
        """`user@host:port/dbname`, without the password: names the database in limits."""
        params = self.params()
        where = f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"
        return f"{params.get('user') or ''}@{where}/{params.get('dbname') or ''}"


def check_dsn_or_parts(model: Any) -> None:
    """Either `dsn` or the parts of a target (a `PostgresTarget`, or a block with the same
    fields): `ConfigurationError` naming what is wrong otherwise."""
    parts = [name for name in PostgresTarget.PARTS if getattr(model, name) is not None]
    if model.dsn is not None and parts:
        raise ConfigurationError(f"give either dsn or connection fields, not both (also set: {', '.join(parts)})")
    if model.dsn is None and not parts:
        raise ConfigurationError("give dsn, or host/dbname/user/password to connect to PostgreSQL")


class PostgresEngine:
    """One PostgreSQL database, `target` (a `PostgresTarget`, or a DSN string), reached with
    one set of connection options. `label` names it in errors; the target's secrets are
    scrubbed from every message; `log` receives one line per connect retry."""

    dialect = POSTGRES

    def __init__(
        self,
        target: PostgresTarget | str,
        options: PostgresConnectOptions | None = None,
        label: str | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.target = PostgresTarget.from_dsn(target) if isinstance(target, str) else target
        self.params = self.target.params()
        self.options = options or PostgresConnectOptions()
        self.label = label or self.scrub(f"PostgreSQL database {self.params.get('dbname') or ''}")
        self.log = log

    def scrub(self, text: str) -> str:
        return self.target.scrub(text)

    def conninfo(self, read_only: bool = False) -> dict[str, Any]:
        """libpq parameters: the target's plus this engine's session settings."""
        opts = self.options
        params = dict(self.params)
        settings = [f"-c lock_timeout={opts.lock_timeout_ms}"]
        if opts.statement_timeout_ms is not None:
            settings.append(f"-c statement_timeout={opts.statement_timeout_ms}")
        if read_only:
            settings.append("-c default_transaction_read_only=on")
        user_options = str(params.pop("options", None) or "")
        params["options"] = " ".join([user_options, *settings] if user_options else settings)
        params["connect_timeout"] = opts.connect_timeout_s
        if opts.application_name:
            params["application_name"] = opts.application_name
        return params

    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[Any]:
        """A fresh autocommit connection, closed on exit; a connection that breaks inside
        raises `ConnectionLostError`."""
        import psycopg

        params = self.conninfo(read_only)
        conn = self._open(params, self.options.connect_timeout_s)
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
                (self.log or _no_log)(
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
    def atomic(self) -> Iterator[Any]:
        """One transaction; a connection lost before COMMIT was sent means nothing applied,
        one lost while COMMIT was in flight raises `CommitOutcomeUnknownError`. A statement
        run by `run_last` goes to the server with the COMMIT."""
        committing = False
        try:
            with self.connect() as conn, ExitStack() as after_commit:
                token = _LAST.set((conn, after_commit))
                try:
                    with conn.transaction():
                        yield conn.cursor()
                        committing = True  # leaving the block sends COMMIT (or queues it after run_last's statement)
                finally:
                    _LAST.reset(token)
        except ConnectionLostError as exc:
            if not committing:
                raise
            raise CommitOutcomeUnknownError(
                f"{self.label}: {exc.detail} while COMMIT was in flight, so the transaction may "
                "or may not have been applied: check the data before running it again."
            ) from None

    @contextmanager
    def migration_lock(self, wait_s: float) -> Iterator[None]:
        """Held by one migrator of this database at a time, for a whole migration, a
        no-transaction one included: a session advisory lock on a connection of its own.
        It is asked for with pg_try_advisory_lock between pauses, never in an open
        transaction, so a waiting migrator holds no snapshot that a `CREATE INDEX
        CONCURRENTLY` of the holder would wait for. It dies with the holder's session, so a
        crashed migrator never blocks the next run. Waits at most `wait_s`."""
        with self.connect() as conn:
            deadline = time.monotonic() + wait_s
            pause = 0.02
            while not conn.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATION_LOCK_KEY,)).fetchone()[0]:
                if time.monotonic() + pause > deadline:
                    raise MigrationLockError(
                        f"{self.label}: another migration of this database held its migration lock "
                        f"(advisory lock {MIGRATION_LOCK_KEY}) for over {wait_s:g} s; nothing was applied. "
                        "Let it finish, or raise lock_wait_s."
                    )
                time.sleep(pause)
                pause = min(0.5, pause * 2)
            try:
                yield
            finally:
                if not conn.broken:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))

    def fetch(self, sql: str, params: Any, limit: int | None) -> list[dict[str, Any]]:
        """Rows of one statement in a read-only session, as dicts; at most `limit` leave the server."""
        return self.fetch_table(sql, params, limit).dicts()

    def fetch_table(self, sql: str, params: Any, limit: int | None) -> RowTable:
        """As `fetch`, the rows as tuples under their column names."""
        check_single_params(params, "query")
        check_paramstyle(sql, params, "query")
        with self.connect(read_only=True) as conn:
            cur = conn.cursor()
            if limit is None:
                cur.execute(sql, params or None, prepare=one_statement(params))
                return fetch_table(cur)
            return _stream_table(cur, sql, params or None, limit)

    @staticmethod
    def run_last(cur: Any, sql: str, params: tuple[Any, ...] | dict[str, Any]) -> None:
        """The last statement of `atomic()`'s transaction on `cur`, whose result nobody reads:
        sent in pipeline mode, so that it and the COMMIT cost one round trip to the server,
        not two (a keyed write's recorded result, 0.3-0.5 ms of a 15 ms member). Its error,
        if any, is raised as the transaction ends, and nothing is committed."""
        import psycopg

        last = _LAST.get()
        if last is not None and last[0] is cur.connection and psycopg.Pipeline.is_supported():
            last[1].enter_context(cur.connection.pipeline())  # left after the COMMIT is queued
        cur.execute(sql, params)

    @staticmethod
    def run_one(cur: Any, sql: str, params: tuple[Any, ...] | dict[str, Any] | None) -> ExecResult:
        """One statement on `cur`: rowcount and the rows it returns (`RETURNING`)."""
        cur.execute(sql, params or None, prepare=one_statement(params))
        rows = fetch_dicts(cur) if cur.description else None
        return exec_result(cur.rowcount, None, rows)

    def run_script(self, script: str) -> None:
        """A parameterless multi-statement script as one implicit transaction (unless it
        says BEGIN/COMMIT itself)."""
        if not isinstance(script, str):
            raise TypeError(f"script must be a str, got {type(script).__name__}")
        with self.connect() as conn:
            # No parameters: one simple-protocol message.
            conn.execute(script)

    def copy_rows(self, schema_name: str, table_name: str, columns: list[str], rows: Iterable[Any]) -> int:
        """`COPY schema.table (columns) FROM STDIN` of `rows` in one transaction; how many.
        Identifiers are quoted here; validate them before."""
        with self.atomic() as cur:
            return self.copy_into(cur, schema_name, table_name, columns, rows)

    @staticmethod
    def copy_into(cur: Any, schema_name: str, table_name: str, columns: list[str], rows: Iterable[Any]) -> int:
        """`copy_rows` on `cur`, inside the caller's transaction."""
        from psycopg import sql as pgsql

        statement = pgsql.SQL("COPY {} ({}) FROM STDIN").format(
            pgsql.Identifier(schema_name, table_name),
            pgsql.SQL(", ").join(pgsql.Identifier(name) for name in columns))
        count = 0
        with cur.copy(statement) as copy:
            write_row = copy.write_row
            for count, row in enumerate(rows, 1):  # noqa: B007  # the count is the result
                write_row(row)
        return count


# While `atomic()`'s transaction is open: its connection, and what closes after its COMMIT.
_LAST: ContextVar[tuple[Any, ExitStack] | None] = ContextVar("chia_postgres_atomic", default=None)


def one_statement(params: Any) -> bool | None:
    """`prepare=` for psycopg's `execute` so that the server refuses a second statement in
    the SQL: only the extended protocol does. With parameters psycopg uses it anyway (one
    round trip); without, it would send a simple query, and preparing first makes it
    extended at the cost of a second round trip (Parse, then the execution)."""
    return None if params else True


def _no_log(message: str) -> None:
    pass


_FORMAT_PLACEHOLDER = re.compile(r"%(\([^)]*\))?[sbt]")


def check_paramstyle(sql: object, params: object, where: str) -> None:
    """Refuse `?` placeholders before anything runs: psycopg takes `%s` (paramstyle format)
    and would only say the counts differ."""
    if not params or not isinstance(sql, str) or "?" not in sql or _FORMAT_PLACEHOLDER.search(sql):
        return
    raise InvalidOperationError(
        f"{where}: the SQL has ? placeholders, but PostgreSQL takes %s (or %(name)s); write %s, or "
        "write ? and pass the SQL through db.render(sql), which renders it for the node's "
        "paramstyle. Nothing was executed."
    )


def _stream_table(cur: Any, sql: str, params: Any, limit: int) -> RowTable:
    """At most `limit` rows, fetched in chunks; the rest never leaves the server."""
    if limit == 0:
        cur.execute(sql, params, prepare=one_statement(params))
        return RowTable([c.name for c in cur.description] if cur.description else [], [])
    rows = []
    stream = cur.stream(sql, params, size=min(limit, 1000))
    for row in stream:
        rows.append(row)
        if len(rows) >= limit:
            break
    stream.close()  # cancels the rest of the result
    return RowTable([c.name for c in cur.description] if cur.description else [], rows)


