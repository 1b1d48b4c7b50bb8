"""What an operator runs: the demo, migrations and maintenance, as Prefect flows.

One implementation for the `chia-prefect` command and the deployable entrypoints in
`flows/` (which import these flows). Flows take a saved node as `block`: "slug/name", or a
bare name when exactly one node type has a block by that name.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from chia_prefect.base import DatabaseNode
from chia_prefect.errors import BlockNotFoundError, ConfigurationError
from chia_prefect.local import ray_task_runner
from chia_prefect.migrations import load_migrations, migrate

NODE_SLUGS = ("sqlite-node", "postgres-node")
DEMO_MIGRATIONS = Path(__file__).resolve().parent / "demo_migrations"
DEFAULT_DEMO_DB = Path.cwd() / ".demo-data" / "demo.db"

HOW_TO_LIST = (
    "List saved nodes with `chia-prefect blocks list`; create one in the Prefect UI (Blocks) or "
    "from code, e.g. SQLiteNode(db_path='/abs/app.db').save('app-db')."
)


# --- blocks ---------------------------------------------------------------------------


def node_slugs() -> list[str]:
    """Block type slugs of every node type: the built-ins and registered subclasses."""
    from prefect.blocks.core import Block  # noqa: F401 - registers the block registry
    from prefect.utilities.dispatch import get_registry_for_type

    slugs = set(NODE_SLUGS)
    for cls in (get_registry_for_type(Block) or {}).values():
        if isinstance(cls, type) and issubclass(cls, DatabaseNode) and not getattr(cls, "__abstractmethods__", None):
            slugs.add(cls.get_block_type_slug())
    return sorted(slugs)


def check_block_ref(ref: str) -> str:
    """`ref` stripped, if it has the shape of "slug/name" or a bare name; checked before any
    Prefect API is asked (or needed)."""
    ref = ref.strip()
    if not ref or ref.count("/") > 1 or ref.startswith("/") or ref.endswith("/"):
        raise BlockNotFoundError(f"block {ref!r}: give a saved node as slug/name (e.g. sqlite-node/app-db) or a bare name.")
    return ref


def resolve_block(ref: str) -> str:
    """`ref` as "slug/name": checked against the Prefect API, a bare name looked up.

    Raises `BlockNotFoundError` naming the candidates, or how to list and create nodes.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    ref = check_block_ref(ref)
    slug, _, name = ref.rpartition("/")
    with get_client(sync_client=True) as client:
        if slug:
            try:
                client.read_block_document_by_name(name, slug, include_secrets=False)
            except ObjectNotFound:
                raise BlockNotFoundError(f"No block {ref!r} is saved in the Prefect API. {HOW_TO_LIST}") from None
            return ref
        found = []
        for candidate in node_slugs():
            try:
                client.read_block_document_by_name(name, candidate, include_secrets=False)
            except ObjectNotFound:
                continue
            found.append(f"{candidate}/{name}")
    if not found:
        raise BlockNotFoundError(f"No node block named {name!r} is saved in the Prefect API. {HOW_TO_LIST}")
    if len(found) > 1:
        raise BlockNotFoundError(f"Block name {name!r} is ambiguous: {', '.join(found)}. Give one as slug/name.")
    return found[0]


def load_node(ref: str) -> DatabaseNode:
    """The saved node `ref` ("slug/name" or a bare name), loaded."""
    from prefect.blocks.core import Block

    node = Block.load(resolve_block(ref))
    if not isinstance(node, DatabaseNode):
        raise BlockNotFoundError(f"block {ref!r} is a {type(node).__name__}, not a database node.")
    return node


def migrations_dir(path: str) -> str:
    """An existing directory of migrations, made absolute (relative to the working directory)."""
    absolute = os.path.abspath(path)
    if not os.path.isdir(absolute):
        raise ConfigurationError(f"migrations directory {path!r} does not exist (looked in {absolute}).")
    return absolute


# --- migrations -----------------------------------------------------------------------


@flow(name="migrate-database", task_runner=ray_task_runner())
def migrate_database(
    block: str,
    migrations_dir: str,
    target: int | None = None,
    dry_run: bool = False,
    allow_drift: bool = False,
    strict: bool = False,
    lock_timeout_s: float = 5.0,
    lock_retries: int = 4,
) -> dict[str, Any]:
    """Plan and apply the migrations in `migrations_dir` to the node `block`.

    Args:
        block: The saved node, e.g. "postgres-node/app-db".
        migrations_dir: Directory of migration files; relative to the working directory.
        target: Stop at this version (default: the newest); below the current version,
            undo down to it with the down migrations.
        dry_run: Publish the plan as an artifact and write nothing.
        allow_drift: Migrate although the schema changed outside the migrations.
        strict: Refuse to migrate when the lint warns.
        lock_timeout_s: Postgres: how long a migration's statement waits for a lock before
            the migration rolls back and is tried again.
        lock_retries: Postgres: how many times it is tried again.
    """
    node = load_node(block)
    with node:
        return migrate(node, load_migrations(os.path.abspath(migrations_dir)), target=target, dry_run=dry_run,
                       allow_drift=allow_drift, strict=strict, lock_timeout_s=lock_timeout_s,
                       lock_retries=lock_retries)


@flow(name="migration-plan")
def migration_plan(
    block: str, migrations_dir: str, target: int | None = None, lock_timeout_s: float = 5.0, lock_retries: int = 4
) -> str:
    """The plan of `block` against `migrations_dir` (pending steps, drift, lint), as text
    and as a `migration-plan` artifact. Writes nothing. On Prefect's default task runner:
    the members run in this process."""
    from prefect.artifacts import create_markdown_artifact

    from chia_prefect.migrations import plan

    node = load_node(block)
    with node:
        the_plan = plan(node, load_migrations(os.path.abspath(migrations_dir)), target=target,
                        lock_timeout_s=lock_timeout_s, lock_retries=lock_retries)
    create_markdown_artifact(the_plan.markdown(), key="migration-plan", description="Pending migrations")
    return the_plan.text()


# --- maintenance ----------------------------------------------------------------------


@flow(name="database-maintenance", task_runner=ray_task_runner())
def maintenance(block: str, backup_dir: str | None = None, keep: int = 7) -> dict[str, Any]:
    """Maintain the node saved as `block` ("slug/name").

    SQLite: WAL checkpoint (TRUNCATE), PRAGMA optimize, PRAGMA integrity_check (a damaged
    database fails the run), and an online backup, keeping the newest `keep`. Postgres: ANALYZE.
    Both: idempotency keys older than the block's `idempotency_retention_days` are forgotten.

    Args:
        block: The saved node, e.g. "sqlite-node/local-sqlite".
        backup_dir: SQLite only: absolute directory for backups on the node's machine
            (default: `backups/` beside the database file).
        keep: SQLite only: how many backups to keep.
    """
    db = load_node(block)
    with db:
        out = db.run_maintenance(backup_dir=backup_dir, keep=keep)
        out["idempotency_keys_pruned"] = db.prune_idempotency_keys()
    get_run_logger().info("maintenance of %s: %s", db.label, out)
    return out


# --- the demo -------------------------------------------------------------------------

UPSERT_ITERATION = (
    "INSERT INTO iterations (entry_id, iteration, score) VALUES (?, ?, ?) "
    "ON CONFLICT (entry_id, iteration) DO UPDATE SET score = excluded.score"
)
DELETE_STALE = "DELETE FROM benchmark_results WHERE entry_id = ? AND iteration = ?"
INSERT_RESULT = "INSERT INTO benchmark_results (entry_id, iteration, bench, value) VALUES (?, ?, ?, ?)"
BEST_PER_BENCHMARK = """
SELECT bench, MIN(value) AS best, COUNT(*) AS runs
FROM benchmark_results GROUP BY bench ORDER BY bench LIMIT 5
"""
LATEST_PER_ENTRY = """
SELECT i.entry_id, i.iteration, i.score
FROM iterations i
WHERE i.iteration = (SELECT MAX(iteration) FROM iterations j WHERE j.entry_id = i.entry_id)
ORDER BY i.entry_id
"""


def iteration_ops(db: DatabaseNode, entry_id: str, iteration: int, benchmarks: int) -> list[Any]:
    """The three ops that record one iteration; deterministic, so re-runs rewrite the same rows."""
    rng = random.Random(f"{entry_id}/{iteration}")
    results = [(entry_id, iteration, f"bench-{b:03d}", round(rng.uniform(1, 100), 3)) for b in range(benchmarks)]
    score = round(sum(r[3] for r in results) / benchmarks, 3)
    return [
        (db.render(UPSERT_ITERATION), (entry_id, iteration, score)),
        (db.render(DELETE_STALE), (entry_id, iteration)),
        (db.render(INSERT_RESULT), results),
    ]


def demo_node(block: str | None, db_path: str | None) -> DatabaseNode:
    from chia_prefect.sqlite import SQLiteNode

    if block:
        return load_node(block)
    return SQLiteNode(db_path=os.path.abspath(db_path or str(DEFAULT_DEMO_DB)))


@flow(name="atomic-transaction-demo", task_runner=ray_task_runner())
def atomic_demo(
    block: str | None = None,
    entries: int = 3,
    iterations: int = 4,
    benchmarks: int = 200,
    db_path: str | None = None,
) -> dict[str, Any]:
    """Record `entries` x `iterations` iterations atomically and concurrently, then summarise.

    It first applies the demo's migrations. Each iteration is ONE transaction of three ops:
    upsert the iteration row, delete its stale benchmark rows, bulk-insert the new ones.
    The SQL is written once with `?` and rendered for the node's paramstyle.

    Args:
        block: A saved node as "slug/name" (e.g. "postgres-node/my-pg"); empty for the
            embedded SQLite file (`db_path`, default .demo-data/demo.db in the working directory).
    """
    with demo_node(block, db_path) as db:
        schema = migrate(db, load_migrations(DEMO_MIGRATIONS))
        futures = [
            db.transaction.submit(iteration_ops(db, f"entry-{e}", i, benchmarks))
            for e in range(entries)
            for i in range(iterations)
        ]
        changed = sum(sum(r.rowcount for r in f.result()) for f in futures)
        return {
            "engine": db.engine,
            "schema_version": schema["to"],
            "migrations_applied": schema["applied"],
            "transactions": len(futures),
            "rows_changed": changed,
            "iterations": db.query_value("SELECT COUNT(*) FROM iterations"),
            "benchmark_rows": db.query_value("SELECT COUNT(*) FROM benchmark_results"),
            "latest": db.query(LATEST_PER_ENTRY),
            "best": db.query(BEST_PER_BENCHMARK),
        }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"schema version: {summary['schema_version']}   migrations applied now: "
        f"{summary['migrations_applied'] or 'none'}",
        f"engine: {summary['engine']}   transactions: {summary['transactions']}   "
        f"rows changed: {summary['rows_changed']}",
        f"iterations stored: {summary['iterations']}   benchmark rows stored: {summary['benchmark_rows']}",
        "",
        "latest iteration per entry:",
        *(f"  {r['entry_id']:<10} iteration {r['iteration']:>3}   score {r['score']:>8.3f}" for r in summary["latest"]),
        "",
        "best value per benchmark (first 5):",
        *(f"  {r['bench']:<10} best {r['best']:>8.3f}   over {r['runs']} runs" for r in summary["best"]),
    ]
    return "\n".join(lines)
