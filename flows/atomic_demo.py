"""The main demo: atomic multi-op transactions on a database node, on Ray.

It first applies the demo's migrations (flows/demo_migrations/). Each "iteration" of an
optimisation run is recorded as ONE transaction of three ops:
upsert the iteration row, delete that iteration's stale benchmark rows, bulk-insert the
new ones. Several run concurrently on Ray; then reads summarise the run. Running it again
rewrites the same rows, so counts stay the same.

    python flows/atomic_demo.py                        # embedded SQLite, temporary Ray
    python flows/atomic_demo.py --block postgres-node/my-pg

The SQL is written once with `?` placeholders and rendered for the node's paramstyle.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

from prefect import flow
from prefect.blocks.core import Block

from chia_prefect import DatabaseNode, SQLiteNode
from chia_prefect.local import ray_task_runner, ship_by_value
from chia_prefect.migrations import load_migrations, migrate

DEFAULT_DB = Path(__file__).resolve().parent.parent / ".demo-data" / "demo.db"

MIGRATIONS = Path(__file__).resolve().parent / "demo_migrations"

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

ship_by_value(__name__)  # Ray workers need not import this file


def iteration_ops(db: DatabaseNode, entry_id: str, iteration: int, benchmarks: int) -> list:
    """The three ops that record one iteration; deterministic, so re-runs rewrite the same rows."""
    rng = random.Random(f"{entry_id}/{iteration}")
    results = [(entry_id, iteration, f"bench-{b:03d}", round(rng.uniform(1, 100), 3)) for b in range(benchmarks)]
    score = round(sum(r[3] for r in results) / benchmarks, 3)
    return [
        (db.render(UPSERT_ITERATION), (entry_id, iteration, score)),
        (db.render(DELETE_STALE), (entry_id, iteration)),
        (db.render(INSERT_RESULT), results),
    ]


def load_node(block: str | None, db_path: str | None) -> DatabaseNode:
    if block:
        return Block.load(block)
    return SQLiteNode(db_path=db_path or str(DEFAULT_DB))


@flow(name="atomic-transaction-demo", task_runner=ray_task_runner())
def atomic_demo(
    block: str | None = None,
    entries: int = 3,
    iterations: int = 4,
    benchmarks: int = 200,
    db_path: str | None = None,
) -> dict:
    """Record `entries` x `iterations` iterations atomically and concurrently, then summarise.

    Args:
        block: A saved node as "slug/name" (e.g. "postgres-node/my-pg"); empty for the
            embedded SQLite file (`db_path`, default .demo-data/demo.db in the project).
    """
    with load_node(block, db_path) as db:
        schema = migrate(db, load_migrations(MIGRATIONS))
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


def format_summary(summary: dict) -> str:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", help='a saved node, "slug/name"; default: embedded SQLite')
    parser.add_argument("--entries", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--benchmarks", type=int, default=200)
    parser.add_argument("--db-path", help=f"embedded SQLite file (default {DEFAULT_DB})")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from chia_prefect.local import shared_prefect_api

    with shared_prefect_api():
        summary = atomic_demo(args.block, args.entries, args.iterations, args.benchmarks, args.db_path)
    print("\n" + format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
