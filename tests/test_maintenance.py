"""Maintenance and the deployable migrate flow, on Ray, against saved blocks."""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.maintenance import maintenance  # noqa: E402
from flows.migrate import migrate_database  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


def rows_of(path: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT id, payload FROM t ORDER BY id").fetchall()
    finally:
        conn.close()


def test_backup_is_a_consistent_snapshot_while_a_writer_runs(sqlite_db, tmp_path):
    sqlite_db.init_schema("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
    sqlite_db.save("maint-sqlite", overwrite=True)
    stop = threading.Event()

    def writer() -> None:
        conn = sqlite3.connect(sqlite_db.db_path, timeout=30, isolation_level=None)
        i = 0
        while not stop.is_set():
            conn.execute("BEGIN IMMEDIATE")
            for _ in range(50):
                i += 1
                conn.execute("INSERT INTO t (id, payload) VALUES (?, ?)", (i, "x" * 200))
            conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.5)
        outs = [maintenance("sqlite-node/maint-sqlite", backup_dir=str(tmp_path / "bk"), keep=2) for _ in range(3)]
    finally:
        stop.set()
        thread.join()
    assert all(o["integrity"] == "ok" and o["checkpoint"]["busy"] in (0, 1) for o in outs)
    kept = sorted((tmp_path / "bk").glob("*.db"))
    assert [p.name for p in kept] == sorted(Path(o["backup"]).name for o in outs[1:])  # newest 2 kept
    source = rows_of(sqlite_db.db_path)
    for path in kept:
        backup = rows_of(str(path))
        assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert backup and len(backup) % 50 == 0  # whole transactions only
        assert backup == source[: len(backup)]  # identical to the source as it was
    assert not list((tmp_path / "bk").glob("*.partial"))


def test_damaged_database_fails_maintenance(sqlite_db, tmp_path):
    sqlite_db.init_schema("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
    sqlite_db.executemany("INSERT INTO t VALUES (?, ?)", [(i, "y" * 500) for i in range(2000)])
    sqlite_db.wal_checkpoint("TRUNCATE")
    sqlite_db.save("maint-damaged", overwrite=True)
    with open(sqlite_db.db_path, "r+b") as f:  # scribble over a b-tree page in the middle
        f.seek(4096 * 20)
        f.write(b"\xff" * 4096)
    state = maintenance("sqlite-node/maint-damaged", backup_dir=str(tmp_path / "bk"), return_state=True)
    assert state.is_failed()
    assert "integrity_check reported" in state.message or "malformed" in state.message
    assert not (tmp_path / "bk").exists()  # no backup of a damaged database


@pytest.mark.postgres
def test_postgres_maintenance_analyzes(postgres_db):
    postgres_db.init_schema("CREATE TABLE t (x INTEGER); INSERT INTO t SELECT generate_series(1, 1000)")
    postgres_db.save("maint-pg", overwrite=True)
    assert maintenance("postgres-node/maint-pg") == {"analyze": "done", "idempotency_keys_pruned": 0}
    analyzed = postgres_db.query_value("SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 't'")
    assert analyzed is True


def test_migrate_database_flow(sqlite_db):
    sqlite_db.save("migrate-sqlite", overwrite=True)
    migrations = str(ROOT / "tests" / "migrations_demo")
    planned = migrate_database("sqlite-node/migrate-sqlite", migrations, dry_run=True)
    assert planned["applied"] == [] and not Path(sqlite_db.db_path).exists()
    assert migrate_database("sqlite-node/migrate-sqlite", migrations, target=2)["applied"] == [1, 2]
    assert migrate_database("sqlite-node/migrate-sqlite", migrations)["applied"] == [3]
