"""What engine-blind code asks of an engine's SQL, as data rather than `engine ==` branches.

Migrations, the maintenance flow, the query tool's command and `render()` read a node's
`dialect`; each engine module declares its one instance. Nothing here connects: it
describes the SQL an engine speaks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Dialect:
    name: str
    # DB-API paramstyle: "qmark" (`?`, `:name`) or "format" (`%s`, `%(name)s`).
    paramstyle: Literal["qmark", "format"]
    # Whether one call may carry several statements (Postgres's simple protocol does;
    # sqlite3's execute refuses a second one).
    multi_statement: bool
    # Splits a script into statements as the engine's own parser does.
    split: Callable[[str], list[str]]
    # One-parameter query (the table name, in this paramstyle) counting tables of that name
    # visible to the connection.
    table_exists_sql: str
    # A statement, run first inside a migration's transaction, that makes concurrent
    # migrators of one database take turns; None when the engine's write lock already does
    # (SQLite's BEGIN IMMEDIATE).
    migration_lock_sql: str | None
    # True when a database may not exist until its first write (a SQLite file): readers
    # then treat it as empty instead of failing.
    created_on_first_write: bool
    # The column type of raw bytes.
    blob_type: str


def _split_sqlite(script: str) -> list[str]:
    from chia_prefect._sql import split_sqlite_script

    return split_sqlite_script(script)


def _split_postgres(script: str) -> list[str]:
    from chia_prefect._sql import split_postgres_script

    return split_postgres_script(script)


SQLITE = Dialect(
    name="sqlite",
    paramstyle="qmark",
    multi_statement=False,
    split=_split_sqlite,
    table_exists_sql="SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
    migration_lock_sql=None,
    created_on_first_write=True,
    blob_type="BLOB",
)

POSTGRES = Dialect(
    name="postgres",
    paramstyle="format",
    multi_statement=True,
    split=_split_postgres,
    table_exists_sql=(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = %s"
    ),
    # A transaction-scoped advisory lock: released at COMMIT/ROLLBACK, and with the session
    # if the migrator dies.
    migration_lock_sql="SELECT pg_advisory_xact_lock(1667786081)",
    created_on_first_write=False,
    blob_type="BYTEA",
)
