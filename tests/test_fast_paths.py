"""The speed paths stay correct: batch transport types, the SQLite writer queue."""

from __future__ import annotations

import collections
import datetime
import decimal
import fcntl
import gc
import multiprocessing
import os
import pickle
import sqlite3
import time

import pytest

from chia_prefect import SQLiteNode
from chia_prefect.members import Batch

Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize("rows", [
    [(1, "a", 2.5, None, b"\x00", True, -(2**70))],
    [{"id": 1, "tags": ["a", "b"]}],
    ((1, 2), (3, 4)),
    [(datetime.date(2020, 1, 2), datetime.datetime(2020, 1, 2, 3, 4, 5))],
    [(decimal.Decimal("1.50"),)],
    [Point(1, 2)],
])
@pytest.mark.parametrize("how", ["protocol 4", "protocol 5", "out of band (as Ray sends it)"])
def test_batches_arrive_with_the_types_they_left_with(rows, how):
    if how == "out of band (as Ray sends it)":
        buffers: list = []
        payload = pickle.dumps(Batch(rows), protocol=5, buffer_callback=buffers.append)
        out = pickle.loads(payload, buffers=buffers).value
    else:
        out = pickle.loads(pickle.dumps(Batch(rows), protocol=int(how[-1]))).value
    assert out == rows and type(out) is type(rows)
    assert [type(v) for row in out for v in (row.values() if isinstance(row, dict) else row)] == \
        [type(v) for row in rows for v in (row.values() if isinstance(row, dict) else row)]
    assert [type(row) for row in out] == [type(row) for row in rows]


def test_batches_and_results_travel_in_marshal_format_2_without_back_references():
    """Format 4 (marshal's default) enters every object that has other references in a
    table: 5x slower to write 100k rows whose values are held elsewhere too. Shared objects
    travel once per use, and arrive equal."""
    import marshal

    from chia_prefect._sql import RowTable
    from chia_prefect.members.binding import ShippedResults, ShippedRows

    shared = (1, "shared", 2.5)
    rows = [shared, shared, (2, "b", None)]
    buffers: list = []
    pickle.dumps(Batch(rows), protocol=5, buffer_callback=buffers.append)
    assert [bytes(b) for b in buffers] == [marshal.dumps(rows, 2)]
    assert marshal.dumps(rows, 2) != marshal.dumps(rows)  # the default writes a reference
    assert pickle.loads(pickle.dumps(Batch(rows), protocol=5)).value == rows
    buffers.clear()
    pickle.dumps(ShippedRows(RowTable(["id", "name", "v"], rows)), protocol=5, buffer_callback=buffers.append)
    assert [bytes(b) for b in buffers] == [marshal.dumps(rows, 2)]
    fields = [(1, 7, None), (1, 8, None)]
    assert marshal.dumps(fields, 2) in pickle.dumps(ShippedResults(fields), protocol=5)


def test_unpacking_a_batch_leaves_garbage_collection_as_it_found_it():
    payload = pickle.dumps(Batch([(1, "a")] * 10))
    assert gc.isenabled()
    pickle.loads(payload)
    assert gc.isenabled()
    gc.disable()
    try:
        pickle.loads(payload)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_body_unpacks_a_marshalled_batch_with_the_collector_held_until_its_rows_are_gone(tmp_path):
    """A batch that arrived marshalled (on a Ray worker) is unpacked in the body, with the
    garbage collector off while the rows live; a batch passed in-process changes nothing."""
    from nodes import RemoteProbeNode

    node = RemoteProbeNode(db_path=str(tmp_path / "gc.db"))
    body = type(node).collector_in_body
    rows = [(i, f"r{i}") for i in range(1000)]
    arrived = pickle.loads(pickle.dumps(Batch(rows), protocol=5))
    assert arrived.packed is not None  # still marshalled: nothing unpacked on arrival
    assert body.run_body(node, (arrived,), {}, None) == {"collecting": False, "rows": 1000}
    assert gc.isenabled()
    assert arrived.packed is not None  # not kept unpacked in the box
    assert body.run_body(node, (Batch(rows),), {}, None) == {"collecting": True, "rows": 1000}
    gc.disable()
    try:  # a collector someone else turned off stays off
        assert body.run_body(node, (pickle.loads(pickle.dumps(Batch(rows))),), {}, None)["collecting"] is False
        assert not gc.isenabled()
    finally:
        gc.enable()


def _sent(box: Batch, how: str) -> Batch:
    """`box` as a worker receives it: pickled with protocol 4, or out of band as Ray sends it."""
    if how == "protocol 4":
        return pickle.loads(pickle.dumps(box, protocol=4))
    buffers: list = []
    payload = pickle.dumps(box, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(payload, buffers=buffers)


@pytest.mark.parametrize("how", ["protocol 4", "out of band (as Ray sends it)"])
def test_a_streamed_batch_reaches_the_body_in_chunks_read_once_in_order(tmp_path, how):
    """`write(stream=...)`: a large batch leaves marshalled in chunks of STREAM_CHUNK_ROWS and
    reaches the body as a `RowStream`, unpacked a chunk at a time as it is read; in-process,
    small or keyed, the body gets the list."""
    from nodes import RemoteProbeNode

    from chia_prefect.members import RowStream
    from chia_prefect.members.binding import STREAM_CHUNK_ROWS

    def arrived(value: list) -> Batch:
        return _sent(Batch(value, stream=True), how)

    node = RemoteProbeNode(db_path=str(tmp_path / "stream.db"))
    body = type(node).streamed
    n = 2 * STREAM_CHUNK_ROWS + 7
    rows = [(i, f"r{i}") for i in range(n)]
    box = arrived(rows)
    assert isinstance(box.packed, RowStream) and len(box.packed.chunks) == 3
    assert body.run_body(node, (box,), {}, None) == {"type": "RowStream", "len": n, "firsts": list(range(n))}
    assert body.run_body(node, (arrived(rows),), {}, "stream-key")["type"] == "list"  # a key's digest reads it whole
    assert body.run_body(node, (Batch(rows, stream=True),), {}, None)["type"] == "list"  # in-process
    assert body.run_body(node, (arrived(rows[:50]),), {}, None) == {"type": "list", "len": 50, "firsts": list(range(50))}
    assert arrived(rows).value == rows  # Batch.value reads a stream whole
    moved = pickle.loads(pickle.dumps(arrived(rows)))  # a stream passed on again
    assert body.run_body(node, (moved,), {}, None)["firsts"] == list(range(n))
    exact = [(decimal.Decimal(i), datetime.date(2020, 1, 1)) for i in range(n)]  # marshal refuses: pickled whole
    assert body.run_body(node, (arrived(exact),), {}, None) == {"type": "list", "len": n,
                                                                "firsts": [decimal.Decimal(i) for i in range(n)]}


@pytest.mark.parametrize("how", ["protocol 4", "out of band (as Ray sends it)"])
def test_a_flat_batch_reaches_the_body_as_flat_rows_of_the_same_tuples(tmp_path, how):
    """`write(flat=...)`: a list of FLAT_MIN_ROWS or more tuples of one width leaves as one
    flat list of values and reads on the worker as the same rows (`FlatRows`); any other
    shape, a keyed call and a call in the caller's process get what was passed."""
    from nodes import RemoteProbeNode

    from chia_prefect._sql import FlatRows
    from chia_prefect.members.binding import FLAT_MIN_ROWS

    def arrived(value: list) -> Batch:
        return _sent(Batch(value, flat=True), how)

    node = RemoteProbeNode(db_path=str(tmp_path / "flat.db"))
    body = type(node).flattened
    n = FLAT_MIN_ROWS + 3
    rows = [(i, f"r{i}", i * 0.5, None) for i in range(n)]
    box = arrived(rows)
    assert box.width == 4 and isinstance(box.unpacked(), FlatRows)
    assert body.run_body(node, (box,), {}, None) == {"type": "FlatRows", "len": n, "rows": rows}
    assert body.run_body(node, (arrived(rows),), {}, "flat-key")["type"] == "list"  # a key's digest reads the rows
    assert body.run_body(node, (Batch(rows, flat=True),), {}, None)["type"] == "list"  # in-process
    assert arrived(rows).value == rows
    moved = pickle.loads(pickle.dumps(arrived(rows)))  # passed on again: still flat
    assert moved.width == 4 and body.run_body(node, (moved,), {}, None)["rows"] == rows
    pairs = [(i, f"p{i}") for i in range(n)]
    for shape in (rows[:FLAT_MIN_ROWS - 1], [list(r) for r in rows], rows + [(1, 2)], [{"a": 1}] * n,
                  tuple(rows), [(datetime.date(2020, 1, 1), i) for i in range(n)], [()] * n,
                  [*pairs[:-1], Point(-1, "named")]):
        kept = arrived(shape)
        assert not kept.width and body.run_body(node, (kept,), {}, None) == {
            "type": type(shape).__name__, "len": len(shape), "rows": list(shape)}
    assert type(arrived([*pairs[:-1], Point(-1, "named")]).value[-1]) is Point  # pickled: its type kept

    flat = FlatRows([1, "a", 2, "b", 3, "c"], 2)
    assert len(flat) == 3 and list(flat) == [(1, "a"), (2, "b"), (3, "c")]
    assert flat[0] == (1, "a") and flat[-1] == (3, "c") and flat[1:] == [(2, "b"), (3, "c")]
    with pytest.raises(IndexError):
        flat[3]
    assert list(pickle.loads(pickle.dumps(flat))) == list(flat) and "3 rows of 2" in repr(flat)


def test_executemany_of_flat_rows_stores_the_same_rows_and_errors(tmp_path):
    """SQLite's multi-row INSERT takes slices of a `FlatRows`' values; any other statement,
    and a failing batch, run as `executemany` over its tuples."""
    from chia_prefect._sql import FlatRows

    db = SQLiteNode(db_path=str(tmp_path / "flat.db"))
    db.init_schema("CREATE TABLE f (id INTEGER PRIMARY KEY, name TEXT NOT NULL, v REAL)")
    n = 2_345
    rows = [(i, f"n{i}", i / 4) for i in range(n)]
    flat = FlatRows([value for row in rows for value in row], 3)
    assert SQLiteNode.executemany.fn(db, "INSERT INTO f (id, name, v) VALUES (?, ?, ?)", flat).rowcount == n
    assert [tuple(r.values()) for r in db.query("SELECT id, name, v FROM f ORDER BY id")] == rows
    changed = FlatRows([value for i in range(n) for value in (f"m{i}", i)], 2)
    assert SQLiteNode.executemany.fn(db, "UPDATE f SET name = ? WHERE id = ?", changed).rowcount == n
    assert db.query_value("SELECT name FROM f WHERE id = 2000") == "m2000"
    bad = FlatRows([value for i in range(n) for value in (n + i, None if i == 1500 else "x", 0.0)], 3)
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        SQLiteNode.executemany.fn(db, "INSERT INTO f (id, name, v) VALUES (?, ?, ?)", bad)
    assert db.query_value("SELECT count(*) FROM f") == n  # all or nothing


def test_a_member_is_bound_once_per_node_and_never_to_a_copy(tmp_path):
    db = SQLiteNode(db_path=str(tmp_path / "a.db"))
    assert db.execute is db.execute and db.query is not db.execute
    copy = db.model_copy(update={"db_path": str(tmp_path / "b.db")})
    assert copy.execute.node is copy and db.execute.node is db
    shipped = pickle.loads(pickle.dumps(db))
    assert shipped.execute.node is shipped


def _fds_on(prefix: str) -> list[str]:
    """This process's open descriptors whose file's path starts with `prefix` (the
    database, its WAL and lock files): other threads of the test process (Prefect's
    clients, Ray) open and close their own descriptors at any time."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith(prefix):
            targets.append(target)
    return sorted(targets)


def test_writers_queue_on_a_lock_file_and_fall_back_after_the_timeout(sqlite_db):
    sqlite_db.init_schema("CREATE TABLE IF NOT EXISTS q (id INTEGER PRIMARY KEY, v TEXT)")
    lock_path = f"{sqlite_db.db_path}-writers.lock"
    assert os.path.exists(lock_path)
    holder = os.open(lock_path, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another writer's turn that does not end
    try:
        start = time.monotonic()
        sqlite_db.execute("INSERT INTO q (v) VALUES (?)", ("after the wait",), connect_opts={"busy_timeout_s": 0.3})
        waited = time.monotonic() - start
    finally:
        os.close(holder)
    assert waited >= 0.3  # it waited for its turn, then went ahead under SQLite's own lock
    # The abandoned waiter closes its descriptor once the holder's lock is gone, and each
    # connection closes in its own thread: nothing on the database's files stays open.
    deadline = time.monotonic() + 10
    while _fds_on(sqlite_db.db_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fds_on(sqlite_db.db_path) == []
    sqlite_db.execute("INSERT INTO q (v) VALUES (?)", ("no wait",))
    assert sqlite_db.query_value("SELECT count(*) FROM q") == 2


def test_the_queue_can_be_turned_off(tmp_path):
    db = SQLiteNode(db_path=str(tmp_path / "off.db"), connect_opts={"writer_queue": False})
    db.init_schema("CREATE TABLE q (id INTEGER PRIMARY KEY)")
    db.execute("INSERT INTO q DEFAULT VALUES")
    assert not os.path.exists(f"{db.db_path}-writers.lock")


def _writer(path: str, writer: int, n: int) -> int:
    db = SQLiteNode(db_path=path)
    for i in range(n):
        db.execute("INSERT INTO w (writer, seq) VALUES (?, ?)", (writer, i))
    return n


def test_concurrent_processes_write_everything_with_no_lock_errors(tmp_path):
    db = SQLiteNode(db_path=str(tmp_path / "w.db"))
    db.init_schema("CREATE TABLE w (writer INTEGER, seq INTEGER, PRIMARY KEY (writer, seq))")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        done = pool.starmap(_writer, [(db.db_path, k, 150) for k in range(4)])
    assert done == [150] * 4
    assert db.query_value("SELECT count(*) FROM w") == 600
    assert db.query("SELECT writer, count(*) AS n, max(seq) AS top FROM w GROUP BY writer ORDER BY writer") == [
        {"writer": k, "n": 150, "top": 149} for k in range(4)]
