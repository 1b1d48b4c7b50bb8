"""SQLite as a driver: connecting, one write transaction, fetching, scripts, backup.

No Prefect and no Ray: `SQLiteEngine` runs where it is called and is tested alone. Every
call opens a fresh connection: WAL journal, a busy timeout, `BEGIN IMMEDIATE` for writes
after this machine's writer queue, `synchronous=NORMAL`, foreign keys on. Reads set
`PRAGMA query_only=ON`, so an accidental write raises and changes nothing.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from chia_prefect._sql import (
    SQLITE_FULL,
    ExecResult,
    FlatRows,
    ResultFields,
    RowTable,
    check_single_params,
    exec_result,
    fetch_dicts,
    fetch_table,
    rows_of_width,
)
from chia_prefect._ui import optional_field
from chia_prefect.engines.dialect import SQLITE
from chia_prefect.errors import (
    DatabaseNotFoundError,
    MigrationLockError,
    NetworkFilesystemError,
    StorageFullError,
    TransactionControlError,
    TransactionOpError,
)

_INSERT = re.compile(r"\s*(INSERT|REPLACE)\b", re.IGNORECASE)


@functools.lru_cache(maxsize=512)
def _inserts(sql: str) -> bool:
    """Whether `sql` is an INSERT or REPLACE (whose lastrowid a result reports); once per text."""
    return _INSERT.match(sql) is not None

# `INSERT [OR ...] INTO name [(columns)] VALUES (?, ..., ?)` and nothing else: the one shape
# `executemany` runs as multi-row INSERTs (`run_many`). Names are plain or quoted; a comment,
# a CTE, an upsert, RETURNING or a numbered placeholder keep the statement row by row.
_IDENT = r'(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")*"|\[[^\]]*\]|`(?:[^`]|``)*`)'
_VALUES_INSERT = re.compile(
    rf"\s*((?:INSERT(?:\s+OR\s+(?:ROLLBACK|ABORT|REPLACE|FAIL|IGNORE))?|REPLACE)\s+INTO\s+"
    rf"{_IDENT}(?:\s*\.\s*{_IDENT})?(?:\s+AS\s+{_IDENT})?\s*(?:\(\s*{_IDENT}(?:\s*,\s*{_IDENT})*\s*\))?"
    r"\s*VALUES)\s*\(\s*\?((?:\s*,\s*\?)*)\s*\)\s*;?\s*",
    re.IGNORECASE,
)
# Parameters per multi-row statement: far below SQLite's limit (999 before 3.32), and past
# a few hundred rows a longer statement inserts no faster.
_PARAMS_PER_STATEMENT = 1500


@functools.lru_cache(maxsize=512)
def _values_insert(sql: str) -> tuple[str, int] | None:
    """`(head up to VALUES, placeholders per row)` if `sql` inserts one row of `?`s."""
    match = _VALUES_INSERT.fullmatch(sql)
    if match is None:
        return None
    return match.group(1), 1 + match.group(2).count("?")


@functools.lru_cache(maxsize=64)
def _rows_statement(head: str, width: int, rows: int) -> str:
    group = "(" + ", ".join("?" * width) + ")"
    return f"{head} {', '.join([group] * rows)}"


MOUNTS_FILE = "/proc/self/mounts"
_NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre",
     "gpfs", "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs", "fuse.gcsfuse"}
)


class SQLiteConnectOptions(BaseModel):
    """How each SQLite connection is opened."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Connection options")

    busy_timeout_s: float = Field(
        default=30.0, ge=0, title="Busy timeout (s)",
        description="How long a connection waits for a lock before failing.",
    )
    wal: bool = Field(
        default=True, title="WAL journal",
        description="Switch the file to write-ahead logging on write; off leaves its journal mode as is.",
    )
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = Field(
        default="NORMAL", title="Synchronous", description="PRAGMA synchronous for every connection.",
    )
    foreign_keys: bool = Field(
        default=True, title="Foreign keys", description="Enforce foreign key constraints.",
    )
    max_page_count: int | None = optional_field(
        ge=1, title="Page limit",
        description="Cap the file at this many pages (PRAGMA max_page_count); a write past it "
        "fails with StorageFullError and is rolled back. Empty: SQLite's own limit.",
    )
    writer_queue: bool = Field(
        default=True, title="Queue writers",
        description="Writers on this machine take turns on a lock file beside the database "
        "(DB_PATH-writers.lock) before BEGIN IMMEDIATE, waking as soon as the previous one "
        "commits; SQLite's own busy wait polls with sleeps of up to 100 ms.",
    )
    allow_network_fs: bool = Field(
        default=False, title="Allow a network filesystem",
        description="Open a file on NFS/SMB anyway. WAL there can corrupt the database.",
    )


class SQLiteEngine:
    """One SQLite file opened with one set of options. `label` names it in errors."""

    dialect = SQLITE

    def __init__(self, db_path: str, options: SQLiteConnectOptions | None = None, label: str | None = None):
        self.db_path = db_path
        self.options = options or SQLiteConnectOptions()
        self.label = label or f"SQLite database {db_path}"

    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[sqlite3.Connection]:
        """A fresh connection with the options applied, closed on exit; a full database or
        disk raises `StorageFullError`."""
        conn = self._open(read_only)
        try:
            with self._full_storage_named():
                yield conn
        finally:
            conn.close()

    @contextmanager
    def _full_storage_named(self) -> Iterator[None]:
        """A full database or disk raised as `StorageFullError`."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) != SQLITE_FULL:
                raise
            raise StorageFullError(
                f"{self.label}: {exc}; the transaction was rolled back and earlier data is intact. "
                "Free disk space on the node's machine, or raise connect_opts max_page_count."
            ) from None

    def _open(self, read_only: bool) -> sqlite3.Connection:
        opts = self.options
        if not opts.allow_network_fs:
            _refuse_network_fs(self.db_path, self.label)
        if read_only and not os.path.exists(self.db_path):
            raise DatabaseNotFoundError(
                f"{self.label}: the database file does not exist on this machine; "
                "create it with init_schema() (or check the placement)."
            )
        if not read_only and not os.path.isdir(os.path.dirname(self.db_path)):
            raise DatabaseNotFoundError(
                f"{self.label}: the directory of the database does not exist on this machine; "
                "init_schema() creates it."
            )
        mode = "rw" if read_only else "rwc"
        conn = sqlite3.connect(
            f"file:{quote(self.db_path)}?mode={mode}", uri=True,
            timeout=opts.busy_timeout_s, isolation_level=None, check_same_thread=False,
        )
        conn.execute(f"PRAGMA busy_timeout = {int(opts.busy_timeout_s * 1000)}")
        if opts.wal and not read_only:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {opts.synchronous}")
        conn.execute(f"PRAGMA foreign_keys = {'ON' if opts.foreign_keys else 'OFF'}")
        if opts.max_page_count is not None:
            conn.execute(f"PRAGMA max_page_count = {int(opts.max_page_count)}")
        if read_only:
            conn.execute("PRAGMA query_only = ON")
        return conn

    @contextmanager
    def atomic(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction: the writer queue, BEGIN IMMEDIATE, COMMIT on success,
        ROLLBACK on error.

        After COMMIT the connection is closed in a thread of its own: the last connection
        to close checkpoints the WAL into the database file (11 ms after 100k rows), and
        the commit is durable without it, so the caller does not wait for it."""
        conn = self._open(False)
        committed = False
        try:
            with self._full_storage_named(), self._writer_turn():
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn.cursor()
                    if not conn.in_transaction:
                        raise TransactionControlError(f"{self.label}: a statement ended the transaction early.")
                    conn.execute("COMMIT")
                    committed = True
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        finally:
            if not (committed and _close_in_a_thread(conn)):
                conn.close()

    @contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """Wait for this machine's other writers of the file, in the kernel, not in sleeps.

        Entered with the connection open: `_open` has refused a network filesystem and a
        missing directory, so the lock file lands beside a database that can be written.
        """
        if not self.options.writer_queue:
            yield
            return
        fd = os.open(f"{self.db_path}-writers.lock", os.O_RDWR | os.O_CREAT, 0o644)
        owned = True
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Past the timeout the waiter thread owns the descriptor; BEGIN IMMEDIATE and
                # the busy timeout then decide, as without the queue.
                owned = _wait_for_flock(fd, self.options.busy_timeout_s)
            yield
        finally:
            if owned:
                os.close(fd)  # releases the lock

    @contextmanager
    def migration_lock(self, wait_s: float) -> Iterator[None]:
        """Held by one migrator of this file at a time, for a whole migration, a
        no-transaction one included: an exclusive flock on DB_PATH-migrations.lock beside
        the database. The kernel drops it when the holder's process dies, so a crashed
        migrator never blocks the next run; its unfinished transaction is rolled back by
        SQLite when the file is next opened. Waits at most `wait_s`."""
        self.ensure_database()
        fd = os.open(f"{self.db_path}-migrations.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + wait_s
            pause = 0.02
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() + pause > deadline:
                        raise MigrationLockError(
                            f"{self.label}: another migration of this database held its migration lock "
                            f"({self.db_path}-migrations.lock) for over {wait_s:g} s; nothing was applied. "
                            "Let it finish, or raise lock_wait_s."
                        ) from None
                    time.sleep(pause)
                    pause = min(0.5, pause * 2)
            yield
        finally:
            os.close(fd)  # releases the lock

    def fetch(self, sql: str, params: Any, limit: int | None) -> list[dict[str, Any]]:
        """Rows of one statement on a read-only connection, as dicts, at most `limit`."""
        return self.fetch_table(sql, params, limit).dicts()

    def fetch_table(self, sql: str, params: Any, limit: int | None) -> RowTable:
        """As `fetch`, the rows as tuples under their column names."""
        check_single_params(params, "query")
        with self.connect(read_only=True) as conn:
            return fetch_table(conn.execute(sql, params or ()), limit)

    def run_script(self, script: str) -> None:
        """A parameterless multi-statement script, after the writer queue; it may BEGIN/COMMIT."""
        if not isinstance(script, str):
            raise TypeError(f"script must be a str, got {type(script).__name__}")
        with self.connect() as conn, self._writer_turn():
            conn.executescript(script)

    def ensure_database(self) -> None:
        """Create the file's directories (the file itself comes with the first write)."""
        Path(self.db_path).parent.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def run_one(cur: sqlite3.Cursor, sql: str, params: tuple[Any, ...] | dict[str, Any] | None) -> ExecResult:
        """One statement on `cur`: rowcount, lastrowid of an INSERT, rows it returns."""
        cur.execute(sql, params or ())
        rows = None if cur.description is None else fetch_dicts(cur)
        return exec_result(cur.rowcount, cur.lastrowid if _inserts(sql) else None, rows)

    @staticmethod
    def run_many(cursor: Any, sql: str, seq_of_params: Any) -> ExecResult:
        """`sql` once per parameter set on `cur`, inside the caller's transaction.

        A plain `INSERT ... VALUES (?, ...)` given rows of positional values runs as
        multi-row INSERTs of a few hundred rows each: SQLite then parses one statement per
        batch of rows and Python steps it once, where `executemany` binds, steps and resets
        per row (1M rows: 0.53 s against 0.87 s). The rows, the rowcount and the triggers
        fired are the same. Any other statement or row shape runs as `executemany`; so does
        a batch that fails, from a savepoint, so the error it raises is the one
        `executemany` gives (naming the row's parameter)."""
        return exec_result(_run_many(cursor, sql, seq_of_params))

    @staticmethod
    def run_ops(cur: sqlite3.Cursor, ops: list[tuple[str, Any]]) -> list[ResultFields]:
        """`normalize_ops`' ops in order on `cur`, each as `run_one` (a list of params as
        `executemany`), in one loop; each op's result as its fields (`exec_results` makes
        them `ExecResult`s where they are used). A 1,000-op transaction spent as long calling
        per op and building results as SQLite spent running the statements. A failing op
        raises `TransactionOpError`."""
        results: list[ResultFields] = []
        append = results.append
        execute = cur.execute
        position = 0
        try:
            for position, (sql, params) in enumerate(ops):  # noqa: B007  # the failing op, in the except
                if isinstance(params, list):
                    append((_run_many(cur, sql, params), None, None))
                    continue
                execute(sql, params or ())
                rows = None if cur.description is None else fetch_dicts(cur)
                append((cur.rowcount, cur.lastrowid if _inserts(sql) else None, rows))
        except Exception as exc:
            raise TransactionOpError.of(exc, op_index=position, op_total=len(ops)) from exc
        return results

    def checkpoint(self, mode: Literal["PASSIVE", "FULL", "RESTART", "TRUNCATE"] = "PASSIVE") -> dict[str, Any]:
        """`PRAGMA wal_checkpoint(mode)`: busy, log and checkpointed frame counts."""
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"wal_checkpoint mode must be PASSIVE, FULL, RESTART or TRUNCATE, got {mode!r}")
        with self.connect() as conn:
            busy, log, checkpointed = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return {"busy": busy, "log": log, "checkpointed": checkpointed}

    def backup(self, directory: str, *, keep: int | None = 7) -> str:
        """Online backup into `directory`/<name>-<UTC time>.db; keep the newest `keep` backups.

        Uses SQLite's backup API in one step: a consistent snapshot while writers go on.
        The copy is written under a temporary name and renamed, so a listed backup is whole.
        """
        if not os.path.isabs(directory):
            raise ValueError(f"backup directory {directory!r} must be absolute (it is on the node's machine)")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1 or None, got {keep}")
        os.makedirs(directory, exist_ok=True)
        stem = Path(self.db_path).stem
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        final = os.path.join(directory, f"{stem}-{stamp}.db")
        partial = final + ".partial"
        with self.connect(read_only=True) as source:
            target = sqlite3.connect(partial)
            try:
                source.backup(target)
            finally:
                target.close()
        os.replace(partial, final)
        if keep is not None:
            for old in sorted(Path(directory).glob(f"{stem}-*.db"))[:-keep]:
                old.unlink()
        return final


def _close_in_a_thread(conn: sqlite3.Connection) -> bool:
    """Close `conn` in a thread of its own; False if no thread could start (the caller then
    closes it). Not a daemon: an exiting interpreter waits the few ms for it."""
    try:
        threading.Thread(target=conn.close, name="chia-sqlite-close").start()
    except RuntimeError:  # no thread to be had (a process at its limit, or shutting down)
        return False
    return True


def _run_many(cur: sqlite3.Cursor, sql: str, rows: list[Any] | tuple[Any, ...] | FlatRows) -> int:
    """`SQLiteEngine.run_many`'s rowcount."""
    shape = _values_insert(sql) if len(rows) > 1 and isinstance(sql, str) else None
    if shape is not None:
        head, width = shape
        # Each row a tuple (or each a list) of exactly `width` values: flattened, a short
        # row would shift every later value into the wrong column (and a dict or str row
        # must not be flattened at all).
        if rows.width == width if isinstance(rows, FlatRows) else rows_of_width(rows, width):
            return _run_as_multi_row(cur, sql, rows, head, width)
    cur.executemany(sql, rows)
    return cur.rowcount


def _run_as_multi_row(cur: sqlite3.Cursor, sql: str, rows: list[Any] | tuple[Any, ...] | FlatRows, head: str,
                      width: int) -> int:
    per = max(1, _PARAMS_PER_STATEMENT // width)
    whole = len(rows) - len(rows) % per
    flat = rows.flat if isinstance(rows, FlatRows) else None

    def values(start: int, stop: int) -> list[Any]:
        if flat is not None:  # already one list of values: a slice of it
            return flat[start * width:stop * width]
        return [*chain.from_iterable(rows[start:stop])]

    execute = cur.execute
    execute("SAVEPOINT chia_run_many")
    try:
        total = 0
        if whole:
            statement = _rows_statement(head, width, per)
            for start in range(0, whole, per):
                execute(statement, values(start, start + per))
                total += cur.rowcount
        if whole < len(rows):
            execute(_rows_statement(head, width, len(rows) - whole), values(whole, len(rows)))
            total += cur.rowcount
    except Exception:
        if not cur.connection.in_transaction:  # INSERT OR ROLLBACK, RAISE(ROLLBACK), a full disk
            raise
        # Undo the batches and let `executemany` run the rows: its error names the row's
        # parameter (or, for a failure of the multi-row form itself, the rows go in).
        execute("ROLLBACK TO chia_run_many")
        execute("RELEASE chia_run_many")
        cur.executemany(sql, rows)
        return cur.rowcount
    execute("RELEASE chia_run_many")
    return total


def _wait_for_flock(fd: int, timeout: float) -> bool:
    """Block on an exclusive flock for at most `timeout`; False hands `fd` to the waiter."""
    acquired, abandoned = threading.Event(), threading.Event()
    guard = threading.Lock()

    def wait() -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with guard:
            if abandoned.is_set():
                os.close(fd)
            else:
                acquired.set()

    threading.Thread(target=wait, name="sqlite-writer-queue", daemon=True).start()
    if acquired.wait(timeout):
        return True
    with guard:
        if acquired.is_set():
            return True
        abandoned.set()
    return False


def _refuse_network_fs(db_path: str, label: str) -> None:
    fstype = _filesystem_type(os.path.dirname(db_path), MOUNTS_FILE)
    if fstype in _NETWORK_FILESYSTEMS:
        raise NetworkFilesystemError(
            f"{label}: the database lies on a {fstype} filesystem. SQLite's WAL needs one "
            "machine's shared memory and can corrupt the file there. Move it to a local disk, "
            "or pass connect_opts={'allow_network_fs': True, 'wal': False} at your own risk."
        )


@lru_cache(maxsize=256)
def _filesystem_type(directory: str, mounts_file: str = MOUNTS_FILE) -> str | None:
    """The type of the filesystem mounted at the longest prefix of `directory` (Linux)."""
    try:
        with open(mounts_file, encoding="utf-8") as mounts:
            entries = [line.split()[1:3] for line in mounts if len(line.split()) >= 3]
    except OSError:
        return None
    path = os.path.realpath(directory) if os.path.exists(directory) else directory
    best, fstype = "", None
    for mount_point, kind in entries:
        mount_point = mount_point.replace("\\040", " ")
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, fstype = mount_point, kind
    return fstype
