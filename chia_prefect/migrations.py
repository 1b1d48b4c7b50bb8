"""Versioned schema migrations applied through a node's `transaction` member.

    from chia_prefect.migrations import load_migrations, migrate, plan

    migrations = load_migrations("migrations/")      # 0001_create.sql, 0002_index.sql, ...
    print(plan(db, migrations))                       # current, target, pending; writes nothing
    migrate(db, migrations)                           # a Prefect flow

Each migration runs in ONE transaction together with the row that records it in
`chia_schema_versions` (version, name, checksum, applied_at). The row is inserted first,
so a concurrent run that reaches the same version fails on its primary key before any of
its DDL runs, rolls back, and carries on from the new state; on Postgres an advisory lock
also serialises migrating transactions. A file whose first line is
`-- chia: no-transaction` (e.g. `CREATE INDEX CONCURRENTLY`) runs on its own, outside a
transaction, then is recorded: it is NOT atomic.

Refused, with errors that name the versions: a database ahead of the code
(`SchemaAheadError`), an applied migration whose text changed (`ChecksumMismatchError`),
an unapplied migration older than the newest applied one, a downgrade.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from chia_prefect.base import DatabaseNode
from chia_prefect.errors import (
    ChecksumMismatchError,
    DatabaseNotFoundError,
    MigrationError,
    SchemaAheadError,
    TransactionOpError,
)
from chia_prefect.local import ray_task_runner

VERSION_TABLE = "chia_schema_versions"
VERSION_DDL = f"""
CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    applied_at TEXT NOT NULL
)"""
_RECORD = f"INSERT INTO {VERSION_TABLE} (version, name, checksum, applied_at) VALUES (?, ?, ?, ?)"
_FILE = re.compile(r"(\d{4})_([A-Za-z0-9][A-Za-z0-9_\-]*)\.sql")
_NO_TRANSACTION = re.compile(r"\s*--\s*chia:\s*no-transaction\b", re.IGNORECASE)


@dataclass(frozen=True)
class Migration:
    """One schema change: a version, a name and its SQL (one or more statements)."""

    version: int
    name: str
    sql: str
    transactional: bool = True

    @property
    def checksum(self) -> str:
        text = self.sql.replace("\r\n", "\n").strip()
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True)
class MigrationPlan:
    """Where the database is, where it is going, and what would run."""

    current: int
    target: int
    pending: list[Migration] = field(default_factory=list)
    applied: list[dict[str, Any]] = field(default_factory=list)

    def text(self) -> str:
        """The plan for a terminal: current, target and each pending version by name."""
        head = f"current version {self.current}, target {self.target}"
        if not self.pending:
            return f"{head}: nothing to apply."
        rows = [f"  {m.version:>4}  {m.name}{'' if m.transactional else '   (no-transaction: not atomic)'}"
                for m in self.pending]
        return "\n".join([f"{head}; {len(self.pending)} pending:", *rows])

    def markdown(self, title: str = "Migration plan") -> str:
        lines = [f"# {title}", "", f"current version **{self.current}** → target **{self.target}**", ""]
        if not self.pending:
            return "\n".join([*lines, "Nothing to apply: the database is at the target."])
        lines += ["| version | name | atomic | checksum |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {m.version} | {m.name} | {'yes' if m.transactional else 'NO (runs alone)'} | `{m.checksum[:12]}` |"
            for m in self.pending
        ]
        return "\n".join(lines)


def load_migrations(directory: str | Path) -> list[Migration]:
    """Read `NNNN_name.sql` files, ordered by NNNN; gaps and duplicates are errors."""
    folder = Path(directory)
    if not folder.is_dir():
        raise MigrationError(f"migrations directory {str(folder)!r} does not exist")
    migrations = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE.fullmatch(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql, e.g. 0001_create_tables.sql")
        sql = path.read_text(encoding="utf-8")
        migrations.append(Migration(int(match.group(1)), match.group(2), sql, not _NO_TRANSACTION.match(sql)))
    return check_sequence(migrations, where=str(folder))


def check_sequence(migrations: list[Migration], where: str = "migrations") -> list[Migration]:
    """Migrations sorted by version, which must run 1, 2, 3, ... without gaps or repeats."""
    ordered = sorted(migrations, key=lambda m: m.version)
    seen: dict[int, Migration] = {}
    for m in ordered:
        if m.version in seen:
            raise MigrationError(f"{where}: version {m.version} appears twice ({seen[m.version].label}, {m.label})")
        seen[m.version] = m
    missing = sorted(set(range(1, len(ordered) + 1)) - set(seen))
    if missing:
        raise MigrationError(f"{where}: versions must run 1..N without gaps; missing {missing}")
    return ordered


def _applied(node: DatabaseNode) -> list[dict[str, Any]]:
    # A SQLite file not created yet is version 0: asked first, so the probe below does not
    # fail a task run (a Failed run and a traceback in the first migration's output).
    # Such an engine's node has the `exists` member (SQLite's).
    if node.dialect.created_on_first_write and not node.exists():  # type: ignore[attr-defined]
        return []
    try:
        exists = node.query_value(node.dialect.table_exists_sql, (VERSION_TABLE,))
    except DatabaseNotFoundError:  # a SQLite file not created yet: version 0
        return []
    if not exists:
        return []
    return node.query(f"SELECT version, name, checksum, applied_at FROM {VERSION_TABLE} ORDER BY version")


def plan(node: DatabaseNode, migrations: list[Migration], *, target: int | None = None) -> MigrationPlan:
    """Compare the database with `migrations`; refuse what cannot be applied. Writes nothing."""
    migrations = check_sequence(list(migrations))
    return _plan(_applied(node), migrations, target)


def _plan(applied: list[dict[str, Any]], migrations: list[Migration], target: int | None) -> MigrationPlan:
    known = {m.version: m for m in migrations}
    head = len(migrations)
    ahead = [row["version"] for row in applied if row["version"] not in known]
    if ahead:
        raise SchemaAheadError(
            f"the database has versions {ahead} that the code does not know (code head is {head}); "
            "deploy the newer code instead of migrating with this one."
        )
    for row in applied:
        if known[row["version"]].checksum != row["checksum"]:
            raise ChecksumMismatchError(
                f"migration {known[row['version']].label} was edited after it was applied "
                f"(checksum {row['checksum'][:12]} in the database, {known[row['version']].checksum[:12]} now); "
                "restore the applied text and put the change in a new migration."
            )
    current = max((row["version"] for row in applied), default=0)
    skipped = sorted(set(range(1, current)) - {row["version"] for row in applied})
    if skipped:
        raise MigrationError(f"migrations {skipped} are unapplied but older than applied version {current}.")
    target = head if target is None else target
    if not 0 <= target <= head:
        raise MigrationError(f"target {target} is outside 0..{head}.")
    if target < current:
        raise MigrationError(f"the database is at {current}; migrating down to {target} is not supported.")
    return MigrationPlan(current, target, [m for m in migrations if current < m.version <= target], applied)


def _record(node: DatabaseNode, migrations: list[Migration]) -> tuple[str, list[tuple[Any, ...]]]:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return node.render(_RECORD), [(m.version, m.name, m.checksum, now) for m in migrations]


def _lock_ops(node: DatabaseNode) -> list[tuple[Any, ...]]:
    lock = node.dialect.migration_lock_sql
    return [(lock, None)] if lock else []


def _apply(node: DatabaseNode, migration: Migration) -> bool:
    """Apply one migration; False when a concurrent run applied it first."""
    sql, rows = _record(node, [migration])
    if not migration.transactional:
        node.executescript(migration.sql)
        node.execute(sql, rows[0])
        return True
    lock = _lock_ops(node)
    ops = [*lock, (sql, rows[0]), *((stmt, None) for stmt in node.split_script(migration.sql))]
    try:
        node.transaction(ops)
    except TransactionOpError as exc:
        index = exc.op_index
        if index == len(lock):  # the version row's insert: another run got there first
            return False
        if index < len(lock):
            raise
        statement = index - len(lock)  # 1-based among the migration's statements
        raise MigrationError(
            f"{node.label}: migration {migration.label} failed at its statement {statement} and was "
            f"rolled back; the schema and version are as before. {type(exc).__name__}: {exc}"
        ) from exc
    return True


def _baseline(node: DatabaseNode, migrations: list[Migration], schema_sql: str) -> None:
    sql, rows = _record(node, migrations)
    statements = [(stmt, None) for stmt in node.split_script(schema_sql)]
    node.transaction([*_lock_ops(node), (sql, rows), *statements])


@flow(name="chia-migrate", task_runner=ray_task_runner())
def migrate(
    node: DatabaseNode,
    migrations: list[Migration],
    *,
    target: int | None = None,
    dry_run: bool = False,
    baseline_sql: str | None = None,
) -> dict[str, Any]:
    """Apply pending migrations, each with its version row in one transaction.

    Runs on `RayTaskRunner` (the Ray already running in this process, RAY_ADDRESS, or a
    temporary local one), so the node's members run where its placement says, also when
    `migrate` is called inside another flow. `migrate.with_options(task_runner=...)` changes it.

    Args:
        node: The database node.
        migrations: From `load_migrations` or built in code.
        target: Stop at this version (default: the newest).
        dry_run: Plan, publish the plan as an artifact, write nothing.
        baseline_sql: For a fresh database only: create the schema at head with this
            script and record every migration as applied, instead of replaying history.

    Returns:
        `{"from", "to", "target", "pending", "applied", "applied_elsewhere", "dry_run"}`:
        `pending` names what the plan found to apply (with `dry_run`, what would run).
    """
    logger = get_run_logger()
    migrations = check_sequence(list(migrations))
    the_plan = plan(node, migrations, target=target)
    create_markdown_artifact(the_plan.markdown(), key="migration-plan", description="Pending migrations")
    outcome: dict[str, Any] = {"from": the_plan.current, "to": the_plan.current, "target": the_plan.target,
                               "pending": [m.label for m in the_plan.pending], "applied": [],
                               "applied_elsewhere": [], "dry_run": dry_run}
    if dry_run or not the_plan.pending:
        return outcome
    # Under the lock: concurrent CREATE TABLE IF NOT EXISTS can collide on Postgres. A
    # script runs as one transaction there; on SQLite init_schema also creates the file.
    node.init_schema(";\n".join([*[sql for sql, _ in _lock_ops(node)], VERSION_DDL]))
    if baseline_sql is not None and the_plan.current == 0:
        _baseline(node, [m for m in migrations if m.version <= the_plan.target], baseline_sql)
        outcome.update(to=the_plan.target, baseline=True)
    else:
        for migration in the_plan.pending:
            applied_here = _apply(node, migration)
            outcome["applied" if applied_here else "applied_elsewhere"].append(migration.version)
            logger.info("migration %s %s", migration.label, "applied" if applied_here else "was applied by a concurrent run")
        outcome["to"] = the_plan.target
    final = plan(node, migrations, target=the_plan.target)  # verifies what is now recorded
    create_markdown_artifact(
        f"# Migration outcome\n\nversion **{outcome['from']}** → **{final.current}**; "
        f"applied here: {outcome['applied'] or 'none'}; by a concurrent run: {outcome['applied_elsewhere'] or 'none'}",
        key="migration-outcome", description="What this run applied",
    )
    return outcome
