"""What engine-blind code asks of an engine's SQL, as data rather than `engine ==` branches.

Migrations, the maintenance flow, the query tool's command and `render()` read a node's
`dialect`; each engine module declares its one instance. Nothing here connects: it
describes the SQL an engine speaks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


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
    # Run first in a migration's transaction with `{ms}` filled in: how long a statement
    # waits for a table lock before failing (so a migration queued behind a long reader
    # does not block every later reader); None where readers never wait for DDL (SQLite's WAL).
    lock_timeout_sql: str | None
    # One query of (object, definition) rows describing the schema from the catalog:
    # tables, columns with their types, indexes, triggers, views; chia-prefect's own tables
    # left out. Migrations record it as the schema's fingerprint.
    fingerprint_sql: str
    # Lints migrations' SQL with the engine's own parser (chia_prefect.engines.lint):
    # (items of (label, sql) in the order they run, a read of the live database returning
    # rows as dicts, the live schema from `fingerprint_sql`) -> warnings.
    lint: Callable[[list[tuple[str, str]], Callable[[str], list[dict[str, Any]]], dict[str, str]], list[Any]]
    # True when a database may not exist until its first write (a SQLite file): readers
    # then treat it as empty instead of failing.
    created_on_first_write: bool
    # The column type of raw bytes.
    blob_type: str


def _split_sqlite(script: str) -> list[str]:
    from chia_prefect._sql import split_sqlite_script

    return split_sqlite_script(script)


def _lint_sqlite(items: list[tuple[str, str]], read: Callable[[str], list[dict[str, Any]]],
                 live: dict[str, str]) -> list[Any]:
    from chia_prefect.engines.lint import lint_sqlite

    return lint_sqlite(items, read, live)


def _lint_postgres(items: list[tuple[str, str]], read: Callable[[str], list[dict[str, Any]]],
                   live: dict[str, str]) -> list[Any]:
    from chia_prefect.engines.lint import lint_postgres

    return lint_postgres(items, read, live)


def _split_postgres(script: str) -> list[str]:
    from chia_prefect._sql import split_postgres_script

    return split_postgres_script(script)


# chia-prefect's own tables are not part of a user's schema.
OWN_TABLES = ("chia_schema_versions", "chia_idempotency")
_OWN = ", ".join(f"'{name}'" for name in OWN_TABLES)

_SQLITE_USER_TABLE = f"m.type = 'table' AND m.name NOT LIKE 'sqlite!_%' ESCAPE '!' AND m.name NOT IN ({_OWN})"
_SQLITE_FINGERPRINT = f"""
SELECT 'table ' || m.name AS object, '' AS definition FROM sqlite_master m WHERE {_SQLITE_USER_TABLE}
UNION ALL
SELECT 'column ' || m.name || '.' || p.name,
       trim(p.type || CASE WHEN p."notnull" THEN ' NOT NULL' ELSE '' END
            || CASE WHEN p.dflt_value IS NOT NULL THEN ' DEFAULT ' || p.dflt_value ELSE '' END
            || CASE WHEN p.pk THEN ' PRIMARY KEY' ELSE '' END)
FROM sqlite_master m JOIN pragma_table_info(m.name) p WHERE {_SQLITE_USER_TABLE}
UNION ALL
SELECT m.type || ' ' || m.name, COALESCE(m.sql, '') FROM sqlite_master m
WHERE m.type IN ('index', 'trigger', 'view') AND m.name NOT LIKE 'sqlite!_%' ESCAPE '!' AND m.tbl_name NOT IN ({_OWN})
"""

_PG_USER_SCHEMA = "n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'"
_POSTGRES_FINGERPRINT = f"""
SELECT 'table ' || n.nspname || '.' || c.relname AS object, '' AS definition
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND {_PG_USER_SCHEMA} AND c.relname NOT IN ({_OWN})
UNION ALL
SELECT 'column ' || n.nspname || '.' || c.relname || '.' || a.attname,
       format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
       || COALESCE(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '')
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped AND {_PG_USER_SCHEMA}
  AND c.relname NOT IN ({_OWN})
UNION ALL
SELECT 'index ' || n.nspname || '.' || i.relname, pg_get_indexdef(i.oid)
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class c ON c.oid = x.indrelid
JOIN pg_namespace n ON n.oid = i.relnamespace
WHERE {_PG_USER_SCHEMA} AND c.relname NOT IN ({_OWN})
UNION ALL
SELECT 'trigger ' || n.nspname || '.' || c.relname || '.' || t.tgname, pg_get_triggerdef(t.oid)
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT t.tgisinternal AND {_PG_USER_SCHEMA}
UNION ALL
SELECT 'view ' || n.nspname || '.' || c.relname, pg_get_viewdef(c.oid)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm') AND {_PG_USER_SCHEMA}
"""

SQLITE = Dialect(
    name="sqlite",
    paramstyle="qmark",
    multi_statement=False,
    split=_split_sqlite,
    table_exists_sql="SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
    lock_timeout_sql=None,
    fingerprint_sql=_SQLITE_FINGERPRINT,
    lint=_lint_sqlite,
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
    lock_timeout_sql="SET LOCAL lock_timeout = '{ms}ms'",
    fingerprint_sql=_POSTGRES_FINGERPRINT,
    lint=_lint_postgres,
    created_on_first_write=False,
    blob_type="BYTEA",
)
