"""Load on Ray: concurrent writers on one SQLite file, conflicting updates on Postgres."""

from __future__ import annotations

import pytest
from nodes import LoadPostgresNode, LoadSQLiteNode
from prefect import flow
from prefect_ray import RayTaskRunner

from chia_prefect import Placement

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

WRITERS = 16


@flow(task_runner=RayTaskRunner())
def sqlite_writers(db: LoadSQLiteNode, per_writer: int) -> list[int]:
    futures = [db.write_many.submit(w, per_writer) for w in range(WRITERS)]
    return [f.result() for f in futures]


@flow(task_runner=RayTaskRunner())
def postgres_bumpers(db: LoadPostgresNode, per_writer: int) -> list[int]:
    futures = [db.bump_many.submit(per_writer) for _ in range(WRITERS)]
    return [f.result() for f in futures]


def test_sixteen_sqlite_writers_lose_nothing(sqlite_path):
    # All 16 fit in the bundle at once, so they really contend for the write lock.
    placement = Placement(reserve_bundle={"CPU": 0.8}, num_cpus=0.05)
    with LoadSQLiteNode(db_path=sqlite_path, placement=placement) as db:
        db.init_schema("CREATE TABLE load (writer INTEGER, seq INTEGER, PRIMARY KEY (writer, seq))")
        assert sqlite_writers(db, 500) == [500] * WRITERS  # a locked error would fail a task
        assert db.query_value("SELECT COUNT(*) FROM load") == WRITERS * 500
        per_writer = db.query("SELECT writer, COUNT(*) AS n, MIN(seq) AS lo, MAX(seq) AS hi FROM load GROUP BY writer")
        assert per_writer == [{"writer": w, "n": 500, "lo": 0, "hi": 499} for w in range(WRITERS)]


@pytest.mark.postgres
def test_sixteen_postgres_writers_on_one_row_exact(postgres_dsn):
    db = LoadPostgresNode(dsn=postgres_dsn, placement=Placement(require_colocated=False, num_cpus=0.05))
    db.init_schema("CREATE TABLE counter (id INTEGER PRIMARY KEY, value INTEGER NOT NULL); INSERT INTO counter VALUES (1, 0)")
    assert postgres_bumpers(db, 500) == [500] * WRITERS
    assert db.query_value("SELECT value FROM counter WHERE id = 1") == WRITERS * 500
