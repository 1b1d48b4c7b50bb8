"""Apply a directory of migrations to a saved node: the deployable migration flow.

    python flows/migrate.py sqlite-node/local-sqlite migrations/ --dry-run
"""

from __future__ import annotations

import argparse
import os

from prefect import flow
from prefect.blocks.core import Block

from chia_prefect import DatabaseNode
from chia_prefect.local import ray_task_runner, ship_by_value
from chia_prefect.migrations import load_migrations, migrate

ship_by_value(__name__)  # Ray workers need not import this file


@flow(name="migrate-database", task_runner=ray_task_runner())
def migrate_database(block: str, migrations_dir: str, target: int | None = None, dry_run: bool = False) -> dict:
    """Plan and apply the `NNNN_name.sql` files in `migrations_dir` to the node `block`.

    Args:
        block: The saved node, e.g. "postgres-node/app-db".
        migrations_dir: Directory of migration files; relative to the working directory.
        target: Stop at this version (default: the newest).
        dry_run: Publish the plan as an artifact and write nothing.
    """
    node: DatabaseNode = Block.load(block)
    with node:
        return migrate(node, load_migrations(os.path.abspath(migrations_dir)), target=target, dry_run=dry_run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Apply migrations to a saved database node.")
    parser.add_argument("block")
    parser.add_argument("migrations_dir")
    parser.add_argument("--target", type=int)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    print(migrate_database(args.block, args.migrations_dir, args.target, args.dry_run))
