"""Lint of pending migrations, with each engine's own parser, never regular expressions.

Destructive statements on both engines: DROP TABLE, DROP COLUMN, TRUNCATE (on SQLite, a
DELETE of every row, which SQLite runs as its truncate). On Postgres, the statements that
hold a lock readers queue behind: CREATE INDEX without CONCURRENTLY on a table that exists
already, ALTER COLUMN ... TYPE, and ADD COLUMN ... NOT NULL without a default on a table
that has rows.

Postgres statements are read by PostgreSQL's own parser (pglast). SQLite has no parser
to import, so each statement is run by SQLite itself on an in-memory copy of the live
schema: its authorizer reports what the statement touches, `EXPLAIN` its bytecode, and the
copy's catalog before and after shows what it dropped. Python migrations are not linted.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LintWarning:
    """One finding: the migration, its statement (1-based), the rule and what it does."""

    migration: str
    statement: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.migration} statement {self.statement}: {self.message} [{self.rule}]"


def lint_postgres(
    items: Iterable[tuple[str, str]], read: Callable[[str], list[dict[str, Any]]], live: dict[str, str]
) -> list[LintWarning]:
    """Lint `(label, sql)` items in the order they run; `read` queries the database (whether
    a table has rows), `live` is its schema now (which tables exist)."""
    from pglast import parse_sql
    from pglast.enums.parsenodes import AlterTableType, ConstrType, ObjectType
    from pglast.parser import ParseError

    found: list[LintWarning] = []
    written: set[str] = set()  # tables an earlier pending statement inserted rows into
    created: set[str] = set()  # tables an earlier pending statement created
    live_tables = {key.split(" ", 1)[1] for key in live if key.startswith("table ")}

    def has_rows(schema: str | None, name: str) -> bool:
        where = ".".join(_quote(part) for part in ((schema,) if schema else ()) + (name,))
        rows = read(f"SELECT EXISTS (SELECT 1 FROM {where}) AS has_rows")
        return bool(rows and rows[0]["has_rows"])

    def exists(schema: str | None, name: str) -> bool:
        return (f"{schema}.{name}" in live_tables) if schema else any(t.split(".", 1)[1] == name for t in live_tables)

    def populated(schema: str | None, name: str) -> bool:
        return name in written or (exists(schema, name) and has_rows(schema, name))

    for label, sql in items:
        try:
            statements = parse_sql(sql)
        except ParseError as exc:
            found.append(LintWarning(label, 1, "syntax", f"PostgreSQL cannot parse it: {exc}"))
            continue
        for index, raw in enumerate(statements, 1):
            stmt: Any = raw.stmt
            kind = type(stmt).__name__

            def warn(rule: str, message: str) -> None:
                found.append(LintWarning(label, index, rule, message))  # noqa: B023 - used at once

            if kind == "CreateStmt":
                created.add(stmt.relation.relname)
            elif kind == "DropStmt" and stmt.removeType == ObjectType.OBJECT_TABLE:
                for names in stmt.objects:
                    parts = [n.sval for n in names]
                    there = exists(parts[-2] if len(parts) > 1 else None, parts[-1]) or parts[-1] in created
                    if stmt.missing_ok and not there:
                        continue  # DROP TABLE IF EXISTS of a table that is not there
                    warn("drop-table", f"DROP TABLE {'.'.join(parts)} destroys the table and its rows")
            elif kind == "TruncateStmt":
                for rel in stmt.relations:
                    warn("truncate", f"TRUNCATE {_name(rel)} deletes every row")
            elif kind == "AlterTableStmt" and stmt.objtype == ObjectType.OBJECT_TABLE:
                rel = stmt.relation
                for cmd in stmt.cmds:
                    if cmd.subtype == AlterTableType.AT_DropColumn:
                        warn("drop-column", f"ALTER TABLE {_name(rel)} DROP COLUMN {cmd.name} destroys the column's data")
                    elif cmd.subtype == AlterTableType.AT_AlterColumnType:
                        warn("alter-column-type",
                             f"ALTER TABLE {_name(rel)} ALTER COLUMN {cmd.name} TYPE rewrites the table under an "
                             "ACCESS EXCLUSIVE lock: every reader waits until it ends")
                    elif cmd.subtype == AlterTableType.AT_AddColumn and cmd.def_ is not None:
                        contypes = {c.contype for c in (cmd.def_.constraints or ())}
                        required = bool(cmd.def_.is_not_null) or bool(
                            contypes & {ConstrType.CONSTR_NOTNULL, ConstrType.CONSTR_PRIMARY})
                        valued = bool(contypes & {ConstrType.CONSTR_DEFAULT, ConstrType.CONSTR_IDENTITY,
                                                  ConstrType.CONSTR_GENERATED})
                        if required and not valued and populated(rel.schemaname, rel.relname):
                            warn("not-null-without-default",
                                 f"ALTER TABLE {_name(rel)} ADD COLUMN {cmd.def_.colname} NOT NULL without a DEFAULT "
                                 "on a table with rows fails on them; add a DEFAULT, or add it nullable, "
                                 "backfill, then SET NOT NULL")
            elif kind == "IndexStmt" and not stmt.concurrent and exists(stmt.relation.schemaname, stmt.relation.relname):
                warn("index-without-concurrently",
                     f"CREATE INDEX {stmt.idxname or ''} ON {_name(stmt.relation)} without CONCURRENTLY blocks "
                     "writes to an existing table while it builds; use CREATE INDEX CONCURRENTLY in a "
                     "`-- chia: no-transaction` migration")
            elif kind in ("InsertStmt", "CopyStmt") and getattr(stmt, "relation", None) is not None:
                written.add(stmt.relation.relname)
    return found


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _name(rel: Any) -> str:
    return f"{rel.schemaname}.{rel.relname}" if rel.schemaname else str(rel.relname)


def lint_sqlite(
    items: Iterable[tuple[str, str]], read: Callable[[str], list[dict[str, Any]]], live: dict[str, str]
) -> list[LintWarning]:
    """Lint `(label, sql)` items in the order they run, against an in-memory copy of the
    live schema, which `read` fetches from sqlite_master."""
    from chia_prefect._sql import split_sqlite_script

    schema_sql = [row["sql"] for row in read(
        "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite!_%' ESCAPE '!' ORDER BY rowid")]
    found: list[LintWarning] = []
    scratch = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for statement in schema_sql:
            try:
                scratch.execute(statement)
            except sqlite3.Error:
                pass  # e.g. a virtual table of an extension this process lacks
        for label, sql in items:
            for index, statement in enumerate(split_sqlite_script(sql), 1):
                found.extend(LintWarning(label, index, rule, message)
                             for rule, message in _sqlite_statement(scratch, statement))
    finally:
        scratch.close()
    return found


def _sqlite_statement(scratch: sqlite3.Connection, statement: str) -> list[tuple[str, str]]:
    touched: list[tuple[int, str | None]] = []

    def authorize(action: int, arg1: str | None, arg2: str | None, database: str | None, source: str | None) -> int:
        touched.append((action, arg1))
        return sqlite3.SQLITE_OK

    scratch.set_authorizer(authorize)
    try:
        opcodes = {row[1] for row in scratch.execute(f"EXPLAIN {statement}")}
    except sqlite3.Error:
        opcodes = set()
    finally:
        scratch.set_authorizer(None)
    before = _columns(scratch)
    try:
        scratch.execute(statement)
    except sqlite3.Error:
        return []  # it fails on an empty copy: applying it will say why
    after = _columns(scratch)
    out: list[tuple[str, str]] = []
    for table in sorted(set(before) - set(after)):
        out.append(("drop-table", f"DROP TABLE {table} destroys the table and its rows"))
    for table in sorted(set(before) & set(after)):
        for column in sorted(before[table] - after[table]):
            out.append(("drop-column", f"ALTER TABLE {table} DROP COLUMN {column} destroys the column's data"))
    dropping = any(action in _SQLITE_DROPS for action, _ in touched)
    if not out and not dropping:
        # A DELETE of a table (not of the catalog, as DROP VIEW's) that reads none of it.
        deleted = {name for action, name in touched if action == sqlite3.SQLITE_DELETE and name in before}
        read = {name for action, name in touched if action == sqlite3.SQLITE_READ}
        for table in sorted(deleted):
            if "Clear" in opcodes or table not in read:
                out.append(("truncate", f"DELETE FROM {table} without WHERE deletes every row (SQLite's TRUNCATE)"))
    return out


_SQLITE_DROPS = {getattr(sqlite3, name) for name in dir(sqlite3) if name.startswith("SQLITE_DROP_")}


def _columns(conn: sqlite3.Connection) -> dict[str, set[str]]:
    rows = conn.execute(
        "SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p "
        "WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite!_%' ESCAPE '!'"
    ).fetchall()
    out: dict[str, set[str]] = {}
    for table, column in rows:
        out.setdefault(table, set()).add(column)
    return out
