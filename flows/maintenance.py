"""Nightly maintenance of a database node, each step a task visible in the Prefect UI.

SQLite: WAL checkpoint (TRUNCATE), PRAGMA optimize, PRAGMA integrity_check (a damaged
database fails the run), and an online backup into a timestamped file, keeping the newest
`keep`. Postgres: ANALYZE.

    python flows/maintenance.py sqlite-node/local-sqlite --backup-dir /srv/backups
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.blocks.core import Block

from chia_prefect import DatabaseNode
from chia_prefect.errors import IntegrityCheckError
from chia_prefect.local import ray_task_runner, ship_by_value

ship_by_value(__name__)  # Ray workers need not import this file


def _sqlite(db: Any, backup_dir: str | None, keep: int) -> dict:
    out: dict[str, Any] = {"checkpoint": db.wal_checkpoint("TRUNCATE")}
    db.execute("PRAGMA optimize")
    problems = [row["integrity_check"] for row in db.query("PRAGMA integrity_check", limit=20)]
    if problems != ["ok"]:
        raise IntegrityCheckError(f"{db.label}: integrity_check reported {problems}; restore from a backup.")
    out["integrity"] = "ok"
    directory = backup_dir or os.path.join(os.path.dirname(db.db_path), "backups")
    out["backup"] = db.backup(directory, keep=keep)
    return out


@flow(name="database-maintenance", task_runner=ray_task_runner())
def maintenance(block: str, backup_dir: str | None = None, keep: int = 7) -> dict:
    """Maintain the node saved as `block` ("slug/name").

    Args:
        block: The saved node, e.g. "sqlite-node/local-sqlite".
        backup_dir: SQLite only: absolute directory for backups on the node's machine
            (default: `backups/` beside the database file).
        keep: SQLite only: how many backups to keep.
    """
    db: DatabaseNode = Block.load(block)
    with db:
        if db.engine == "sqlite":
            out = _sqlite(db, backup_dir, keep)
        else:
            db.execute("ANALYZE")
            out = {"analyze": "done"}
    get_run_logger().info("maintenance of %s: %s", db.label, out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run database maintenance once.")
    parser.add_argument("block")
    parser.add_argument("--backup-dir")
    parser.add_argument("--keep", type=int, default=7)
    args = parser.parse_args()
    print(maintenance(args.block, args.backup_dir, args.keep))
