"""Save example node blocks to the Prefect API named by PREFECT_API_URL.

    prefect block register -m chia_prefect      # once: the block types
    python blocks/save_examples.py              # local-sqlite, and local-postgres if configured

`local-sqlite` points at an absolute file path (default ~/.local/share/chia-prefect/local.db).
`local-postgres` is saved when CHIA_POSTGRES_DSN, or PGHOST and PGDATABASE, are set; the
password comes from CHIA_POSTGRES_DSN or PGPASSWORD and is stored as a secret.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from chia_prefect import PostgresNode, SQLiteNode


def postgres_from_env() -> PostgresNode | None:
    if os.environ.get("CHIA_POSTGRES_DSN"):
        return PostgresNode(dsn=os.environ["CHIA_POSTGRES_DSN"])
    if os.environ.get("PGHOST") and os.environ.get("PGDATABASE"):
        return PostgresNode(
            host=os.environ["PGHOST"],
            port=int(os.environ.get("PGPORT", "5432")),
            dbname=os.environ["PGDATABASE"],
            user=os.environ.get("PGUSER"),
            password=os.environ.get("PGPASSWORD"),
        )
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description="Save example chia-prefect node blocks.")
    default = Path.home() / ".local" / "share" / "chia-prefect" / "local.db"
    parser.add_argument("--sqlite-path", default=str(default), help="absolute path of the SQLite file")
    args = parser.parse_args()
    SQLiteNode(db_path=os.path.abspath(args.sqlite_path)).save("local-sqlite", overwrite=True)
    print("saved sqlite-node/local-sqlite ->", os.path.abspath(args.sqlite_path))
    node = postgres_from_env()
    if node is not None:
        node.save("local-postgres", overwrite=True)
        print("saved postgres-node/local-postgres")
    else:
        print("skipped postgres-node/local-postgres: set CHIA_POSTGRES_DSN or PGHOST and PGDATABASE")


if __name__ == "__main__":
    main()
