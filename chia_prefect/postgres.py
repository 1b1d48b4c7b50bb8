"""`PostgresNode`: a PostgreSQL database reached by DSN or by its parts.

The block holds the target (DSN or fields), placement and connection options; every member
call builds a `PostgresEngine` (chia_prefect.engines.postgres) with the call's options and
runs on it. psycopg 3 is imported inside the functions that connect, so importing
chia_prefect and building a block from a string DSN work without it (`pip install
'chia-prefect[postgres]'`).

The read-only session is a guard against mistakes, not a wall: the real boundary for an
untrusted reader is a role granted SELECT only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from pydantic import BaseModel, Field, SecretStr, model_validator

from chia_prefect._sql import ExecResult, RowTable, check_rows, rows_of_width, validate_identifier, validate_type_decl
from chia_prefect._ui import optional_field
from chia_prefect.base import LOGO_BASE_URL, DatabaseNode, idempotency_retention_field
from chia_prefect.engines.dialect import POSTGRES, Dialect
from chia_prefect.engines.postgres import (
    PostgresConnectOptions,
    PostgresEngine,
    PostgresTarget,
    SSLMode,
    check_dsn_or_parts,
    check_paramstyle,
)
from chia_prefect.errors import ConfigurationError, InvalidIdentifierError, InvalidOperationError
from chia_prefect.members import RowStream, read, write
from chia_prefect.members.limits import run_logger
from chia_prefect.members.placement import Placement


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
    sslmode: SSLMode | None = optional_field(
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
    idempotency_retention_days: float = idempotency_retention_field()

    @model_validator(mode="after")
    def _dsn_or_parts(self) -> PostgresNode:
        check_dsn_or_parts(self)
        return self

    # --- the engine -------------------------------------------------------------------

    def target(self) -> PostgresTarget:
        """Where the database is and who connects: the DSN or the fields, as one model."""
        return PostgresTarget(**{name: getattr(self, name) for name in ("dsn", *PostgresTarget.PARTS)})

    def scrub(self, text: str) -> str:
        """`text` with the DSN, the password and anything shaped like a credential removed."""
        return self.target().scrub(text)

    @contextmanager
    def _named(self) -> Iterator[None]:
        """A target error (a DSN libpq cannot parse) names this node."""
        try:
            yield
        except ConfigurationError as exc:
            raise ConfigurationError(f"{self.label}: {exc}") from None

    def engine_for(self, connect_opts: dict[str, Any] | BaseModel | None = None) -> PostgresEngine:
        """The driver for this database with the block's options and a call's overrides
        applied; connect retries log on the task run."""
        with self._named():
            return PostgresEngine(self.target(), self.resolve_connect_opts(connect_opts), self.label,
                                  log=lambda line: run_logger().info(line))

    def limit_identity(self) -> str:
        with self._named():
            return self.target().identity()

    def _fetch_table(self, sql: str, params: Any, limit: int | None, connect_opts: dict[str, Any] | None) -> RowTable:
        return self.engine_for(connect_opts).fetch_table(sql, params, limit)

    def _check_paramstyle(self, sql: object, params: object, where: str) -> None:
        check_paramstyle(sql, params, where)

    def _run_one(self, cur: Any, sql: str, params: tuple[Any, ...] | dict[str, Any] | None) -> ExecResult:
        return PostgresEngine.run_one(cur, sql, params)

    _run_last = staticmethod(PostgresEngine.run_last)

    def _run_script(self, script: str, connect_opts: dict[str, Any] | None) -> None:
        self.engine_for(connect_opts).run_script(script)

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
        self, table: str, column: str, type_decl: str, *, connect_opts: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
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

    @write(stream=("rows",), atomic_only=True)
    def copy_rows(
        self, table: str, columns: list[str] | tuple[str, ...], rows: list[Any], *,
        connect_opts: dict[str, Any] | None = None, idempotency_key: str | None = None,
    ) -> ExecResult:
        """Bulk insert `rows` into `table (columns)` with `COPY ... FROM STDIN`, all or nothing.

        Several times faster than `executemany` of an INSERT for large batches. Each row is a
        tuple or list with one value per column; a value the column refuses rolls it all back.
        On a Ray worker a large batch arrives in chunks (`RowStream`): each chunk's rows are
        checked as it is unpacked, while the server takes the last, and a bad row aborts
        the COPY, so nothing is written.
        """
        schema_name, table_name = _split_table(table)
        if not isinstance(columns, (list, tuple)) or not columns:
            raise InvalidOperationError(
                f"copy_rows: columns must be a non-empty list of column names, got {columns!r}; nothing was executed.")
        names = [validate_identifier(column, "column").lower() for column in columns]
        if isinstance(rows, RowStream):
            stream: Iterable[Any] = _checked_stream(rows, names)
        else:
            check_rows(rows, "copy_rows")
            _check_chunk(rows, names, 0, "nothing was executed")
            stream = rows
        with self.atomic(connect_opts) as cur:
            return ExecResult(rowcount=PostgresEngine.copy_into(cur, schema_name.lower(), table_name.lower(), names, stream))


def _check_chunk(rows: list[Any] | tuple[Any, ...], names: list[str], start: int, outcome: str) -> None:
    """Raise, naming the row (counted from `start`), unless every row is a tuple or list of
    one value per column."""
    width = len(names)
    if rows_of_width(rows, width):
        return
    for index, row in enumerate(rows, start):
        if not isinstance(row, (tuple, list)) or len(row) != width:
            raise InvalidOperationError(
                f"copy_rows: row {index} must be a tuple of {width} values ({', '.join(names)}), "
                f"got {_describe_row(row)}; {outcome}.")


def _checked_stream(stream: RowStream, names: list[str]) -> Iterator[Any]:
    """A streamed batch's rows, each chunk checked before any of its rows is written (a bad
    row raises inside the COPY, which aborts it)."""
    start = 0
    for rows in stream.lists():
        _check_chunk(rows, names, start, "the COPY was rolled back; nothing was written")
        yield from rows
        start += len(rows)


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
