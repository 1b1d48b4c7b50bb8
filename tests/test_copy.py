"""PostgresNode.copy_rows: COPY ... FROM STDIN, all or nothing, identifiers checked first."""

from __future__ import annotations

import psycopg
import pytest
from prefect import flow

from chia_prefect import FastRayTaskRunner, InvalidIdentifierError, InvalidOperationError, PostgresNode

pytestmark = [pytest.mark.postgres]

SCHEMA = "CREATE TABLE IF NOT EXISTS points (id INTEGER PRIMARY KEY, name TEXT, value DOUBLE PRECISION)"


@flow(task_runner=FastRayTaskRunner())
def copy_flow(block: str, n: int) -> tuple[int, int]:
    db = PostgresNode.load(block)
    result = db.copy_rows("points", ["id", "name", "value"], [(i, f"p{i}", i / 2) for i in range(n)])
    return result.rowcount, db.query_value("SELECT count(*) FROM points")


@flow(task_runner=FastRayTaskRunner())
def copy_with_a_late_bad_row(block: str, n: int, bad: int) -> None:
    rows = [(i, f"p{i}", i / 2) for i in range(n)]
    rows[bad] = (bad, "no value")
    PostgresNode.load(block).copy_rows("points", ["id", "name", "value"], rows)


def _count(db) -> int:
    return db.query_value("SELECT count(*) FROM points")


def test_copy_in_process(postgres_db):
    postgres_db.init_schema(SCHEMA)
    rows = [(i, None if i % 7 == 0 else f"name {i}\twith tab", i * 0.25) for i in range(5000)]
    assert postgres_db.copy_rows("public.points", ("id", "name", "value"), rows).rowcount == 5000
    stored = postgres_db.query("SELECT id, name, value FROM points ORDER BY id")
    assert [(r["id"], r["name"], r["value"]) for r in stored] == rows


@pytest.mark.ray
def test_copy_on_ray(postgres_db, ray_cluster):
    postgres_db.init_schema(SCHEMA)
    postgres_db.save("copy-target", overwrite=True)
    assert copy_flow("copy-target", 20_000) == (20_000, 20_000)
    stored = postgres_db.query("SELECT id, name FROM points WHERE id IN (0, 9999, 10000, 19999) ORDER BY id")
    assert stored == [{"id": i, "name": f"p{i}"} for i in (0, 9999, 10000, 19999)]  # across the chunks


@pytest.mark.ray
def test_copy_on_ray_of_a_bad_row_in_a_late_chunk_writes_nothing(postgres_db, ray_cluster):
    """On Ray the rows stream in chunks, each checked as it is unpacked while the server
    takes the last: a bad row in the third chunk aborts the COPY, naming the row."""
    postgres_db.init_schema(SCHEMA)
    postgres_db.save("copy-late-bad", overwrite=True)
    with pytest.raises(InvalidOperationError, match=r"row 25000 must be a tuple of 3 values \(id, name, value\), "
                       r"got a tuple of 2; the COPY was rolled back; nothing was written"):
        copy_with_a_late_bad_row("copy-late-bad", 30_000, 25_000)
    assert _count(postgres_db) == 0


def test_a_bad_value_rolls_back_everything(postgres_db):
    postgres_db.init_schema(SCHEMA)
    postgres_db.copy_rows("points", ["id", "name", "value"], [(0, "kept", 0.0)])
    rows = [(i, "x", 1.0) for i in range(1, 100)] + [(100, "x", "not a number")]
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        postgres_db.copy_rows("points", ["id", "name", "value"], rows)
    with pytest.raises(psycopg.errors.UniqueViolation):
        postgres_db.copy_rows("points", ["id", "name", "value"], [(5, "a", 1.0), (5, "b", 2.0)])
    assert _count(postgres_db) == 1


@pytest.mark.parametrize("table, columns, rows, error, fragment", [
    ("points; DROP TABLE points", ["id"], [(1,)], InvalidIdentifierError, "not a plain identifier"),
    ("points", ["id", 'name" text); --'], [(1, "a")], InvalidIdentifierError, "not a plain identifier"),
    ("points", [], [(1,)], InvalidOperationError, "non-empty list of column names"),
    ("points", "id", [(1,)], InvalidOperationError, "non-empty list of column names"),
    ("points", ["id", "name"], [(1, "a"), (2,)], InvalidOperationError, "row 1 must be a tuple of 2 values"),
    ("points", ["id"], [{"id": 1}], InvalidOperationError, "row 0 must be a tuple of 1 values"),
    ("points", ["id"], "1,2,3", InvalidOperationError, "seq_of_params must be a list"),
])
def test_bad_input_is_refused_before_any_sql(postgres_db, table, columns, rows, error, fragment):
    postgres_db.init_schema(SCHEMA)
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        postgres_db.copy_rows(table, columns, rows)
    assert _count(postgres_db) == 0
