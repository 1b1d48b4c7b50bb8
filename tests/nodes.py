"""Domain subclasses used by the tests; importable by Ray workers (tests/ is on PYTHONPATH)."""

from __future__ import annotations

import os
from pathlib import Path

from chia_prefect import PostgresNode, SQLiteNode, read, write


def _where() -> dict:
    import ray

    context = ray.get_runtime_context() if ray.is_initialized() else None
    node = context.get_node_id() if context else None
    group = context.get_placement_group_id() if context else None
    return {"node": node, "pid": os.getpid(), "group": group}


class AlignmentDBNode(SQLiteNode):
    """The seed's AlignmentDB: a composite read declared once as a member."""


    @read
    def load_entry(self, entry_id: str, *, connect_opts: dict | None = None) -> dict | None:
        with self.connect(read_only=True, connect_opts=connect_opts) as conn:
            row = conn.execute(
                "SELECT entry_id, iteration, score FROM iterations WHERE entry_id = ?", (entry_id,)
            ).fetchone()
            if row is None:
                return None
            bench = conn.execute(
                "SELECT bench, value FROM benchmark_results WHERE entry_id = ? ORDER BY bench", (entry_id,)
            ).fetchall()
        return {"entry_id": row[0], "iteration": row[1], "score": row[2], "benchmarks": dict(bench)}

    @write
    def bump(self, entry_id: str, *, connect_opts: dict | None = None) -> int:
        """A domain write: same placement and no-replay policy as execute."""
        with self.connect(connect_opts=connect_opts) as conn:
            conn.execute("UPDATE iterations SET score = score + 1 WHERE entry_id = ?", (entry_id,))
            return conn.total_changes


class ProbeSQLiteNode(SQLiteNode):
    """Reports where its members run."""


    @read
    def where(self, *, connect_opts: dict | None = None) -> dict:
        return _where()

    @write
    def where_write(self, *, connect_opts: dict | None = None) -> dict:
        return _where()


class ProbePostgresNode(PostgresNode):

    @read
    def where(self, *, connect_opts: dict | None = None) -> dict:
        return _where()


class LoadSQLiteNode(SQLiteNode):
    """A writer that commits `n` separate transactions, each on a fresh connection."""

    @write
    def write_many(self, writer: int, n: int, *, connect_opts: dict | None = None) -> int:
        for seq in range(n):
            with self.atomic(connect_opts) as cur:
                cur.execute("INSERT INTO load (writer, seq) VALUES (?, ?)", (writer, seq))
        return n


class LoadPostgresNode(PostgresNode):
    @write
    def bump_many(self, n: int, *, connect_opts: dict | None = None) -> int:
        for _ in range(n):
            with self.atomic(connect_opts) as cur:
                cur.execute("UPDATE counter SET value = value + 1 WHERE id = 1")
        return n


def _signal_and_wait(marker: str) -> None:
    import time

    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)  # killed here: committed, not yet returned


class CommitThenHangSQLiteNode(SQLiteNode):
    @write
    def insert_then_hang(self, value: int, marker: str, *, connect_opts: dict | None = None) -> None:
        with self.atomic(connect_opts) as cur:
            cur.execute("INSERT INTO t (x) VALUES (?)", (value,))
        _signal_and_wait(marker)


class CommitThenHangPostgresNode(PostgresNode):
    @write
    def insert_then_hang(self, value: int, marker: str, *, connect_opts: dict | None = None) -> None:
        with self.atomic(connect_opts) as cur:
            cur.execute("INSERT INTO t (x) VALUES (%s)", (value,))
        _signal_and_wait(marker)


class LosesConnectionAtCommitPostgresNode(PostgresNode):
    """Its server connection is terminated just before COMMIT goes out."""

    @write
    def insert_then_lose(self, value: int, *, connect_opts: dict | None = None) -> None:
        import psycopg

        with self.atomic(connect_opts) as cur:
            cur.execute("INSERT INTO t (x) VALUES (%s)", (value,))
            pid = cur.connection.info.backend_pid
            with psycopg.connect(self.dsn.get_secret_value(), autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(%s)", (pid,))


# --- idempotency keys -----------------------------------------------------------------


class KeyedSQLiteNode(SQLiteNode):
    """Domain writes for the idempotency tests."""

    @write
    def add_entries(self, names: list, *, connect_opts: dict | None = None) -> list:
        ids = []
        with self.atomic(connect_opts) as cur:
            for name in names:
                cur.execute("INSERT INTO entry (name) VALUES (?)", (name,))
                ids.append(cur.lastrowid)
        return ids

    @write
    def add_entry_by_connect(self, name: str, *, connect_opts: dict | None = None) -> None:
        with self.connect(connect_opts=connect_opts) as conn:
            conn.execute("INSERT INTO entry (name) VALUES (?)", (name,))
            conn.commit()


class KeyedPostgresNode(PostgresNode):
    @write
    def add_entries(self, names: list, *, connect_opts: dict | None = None) -> list:
        ids = []
        with self.atomic(connect_opts) as cur:
            for name in names:
                cur.execute("INSERT INTO entry (name) VALUES (%s) RETURNING id", (name,))
                ids.append(cur.fetchone()[0])
        return ids


def _hang_once_after_commit(marker_dir: str, key: str) -> None:
    """Write this worker's pid to a marker for `key` and hang, the first time only."""
    import time

    marker = os.path.join(marker_dir, key.replace("/", "_").replace(":", "_"))
    if os.path.exists(marker):
        return
    with open(marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(marker + ".tmp", marker)
    time.sleep(120)  # killed here: the key, the write and the result committed; nothing returned


class _HangAfterKeyedCommit:
    """After a keyed write commits, its first worker signals and hangs until killed."""

    marker_dir: str

    def run_keyed(self, member, key, call, arguments, connect_opts=None):
        result = super().run_keyed(member, key, call, arguments, connect_opts)
        _hang_once_after_commit(self.marker_dir, key)
        return result


class HangAfterKeyedCommitSQLiteNode(_HangAfterKeyedCommit, SQLiteNode):
    marker_dir: str = ""


class HangAfterKeyedCommitPostgresNode(_HangAfterKeyedCommit, PostgresNode):
    marker_dir: str = ""


class LosesConnectionAtKeyedCommitPostgresNode(PostgresNode):
    """Every transaction's server connection is terminated just before COMMIT goes out."""

    def engine_for(self, connect_opts=None):
        from contextlib import contextmanager

        import psycopg

        from chia_prefect.engines import PostgresEngine

        dsn = self.dsn.get_secret_value()

        class LosingEngine(PostgresEngine):
            @contextmanager
            def atomic(self):
                with super().atomic() as cur:
                    yield cur
                    with psycopg.connect(dsn, autocommit=True) as other:
                        other.execute("SELECT pg_terminate_backend(%s)", (cur.connection.info.backend_pid,))

        return LosingEngine(self.target(), self.resolve_connect_opts(connect_opts), self.label)


class RemoteProbeNode(SQLiteNode):
    """Reports where its body runs and whether it has a Prefect task run context there."""

    @read
    def inside(self, tag: str = "", *, connect_opts: dict | None = None) -> dict:
        from prefect.context import TaskRunContext

        from chia_prefect import member_logger

        member_logger().info(f"body of {tag} on pid {os.getpid()}")
        return {"pid": os.getpid(), "task_run_context": TaskRunContext.get() is not None, "tag": tag}

    @write(batch=("rows",))
    def collector_in_body(self, rows: list, *, connect_opts: dict | None = None) -> dict:
        """Whether the garbage collector runs while this body holds its rows."""
        import gc

        return {"collecting": gc.isenabled(), "rows": len(rows)}

    @write
    def exit_worker(self, *, connect_opts: dict | None = None) -> int:
        """Ends the process it runs in: on Ray, its worker dies under the body."""
        os._exit(1)

    @write(atomic_only=True)
    def insert_noted(self, note: str, *, connect_opts: dict | None = None) -> int:
        """Inserts a row into `bulk`; first writes "ran" to the file `note` (a test's window on
        when the body runs: a member declared `atomic_only` must not do this)."""
        Path(note).write_text("ran")
        with self.atomic(connect_opts) as cur:
            cur.execute("INSERT INTO bulk (name) VALUES ('noted')")
            return cur.rowcount

    @write
    def touch(self, path: str, *, connect_opts: dict | None = None) -> None:
        """Writes "touched" to the file `path`: an effect outside any transaction."""
        Path(path).write_text("touched")

    @write(flat=("rows",))
    def flattened(self, rows: list, *, connect_opts: dict | None = None) -> dict:
        """What a flat batch reaches the body as, and its rows."""
        return {"type": type(rows).__name__, "len": len(rows), "rows": list(rows)}

    @write(stream=("rows",))
    def streamed(self, rows: list, *, connect_opts: dict | None = None) -> dict:
        """What a streamed batch reaches the body as, and its rows read once, in order."""
        return {"type": type(rows).__name__, "len": len(rows), "firsts": [row[0] for row in rows]}
