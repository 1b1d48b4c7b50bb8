"""`SQLiteNode`: one SQLite database file, its members pinned to the machine that holds it.

Every call opens a fresh connection (a call may land in any worker process on the node):
WAL journal, a busy timeout, `BEGIN IMMEDIATE` for writes (writers queue on the lock
instead of failing half-way), `synchronous=NORMAL`, foreign keys on. Reads set
`PRAGMA query_only=ON`, so an accidental write raises and changes nothing.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chia_prefect._sql import (
    SQLITE_FULL,
    ExecResult,
    check_single_params,
    fetch_dicts,
    validate_identifier,
    validate_type_decl,
)
from chia_prefect._ui import optional_field
from chia_prefect.base import LOGO_BASE_URL, DatabaseNode
from chia_prefect.dialects import SQLITE, Dialect
from chia_prefect.errors import (
    DatabaseNotFoundError,
    IntegrityCheckError,
    NetworkFilesystemError,
    StorageFullError,
    TransactionControlError,
)
from chia_prefect.members import read, write
from chia_prefect.placement import Placement

_INSERT = re.compile(r"\s*(INSERT|REPLACE)\b", re.IGNORECASE)
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


class SQLiteNode(DatabaseNode):
    """A SQLite database file whose operations run as Prefect tasks beside the file.

    Args:
        db_path: Absolute path of the database file on the machine that runs the members.
        placement: Where members run on Ray; by default a placement group keeps them on
            one machine.
        connect_opts: Connection defaults; any member accepts `connect_opts=` to override.

    Example:
        ```python
        from chia_prefect import SQLiteNode

        db = SQLiteNode.load("BLOCK_NAME")
        db.init_schema("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
        db.execute("INSERT INTO t (v) VALUES (?)", ("x",))
        rows = db.query("SELECT * FROM t")
        ```
    """

    _block_type_name = "SQLite Node"
    _block_type_slug = "sqlite-node"
    _logo_url = f"{LOGO_BASE_URL}/sqlite-node.png"  # type: ignore[assignment]
    _description = (
        "A SQLite database file whose operations run as Prefect tasks on Ray, on the machine "
        "that holds the file. Writes are never retried or replayed."
    )
    _documentation_url = "https://github.com/chia-prefect/chia-prefect#readme"  # type: ignore[assignment]

    dialect: ClassVar[Dialect] = SQLITE
    engine: ClassVar[str] = SQLITE.name
    paramstyle: ClassVar[str] = SQLITE.paramstyle
    multi_statement: ClassVar[bool] = SQLITE.multi_statement

    db_path: str = Field(
        title="Database file",
        description=(
            "Absolute path (starting with /) of the database file on the machine that runs the "
            "members, e.g. /srv/data/app.db. init_schema creates the file and its directory."
        ),
        # For schema validation (Prefect's /ui/schemas/validate); Prefect 3.8's block form
        # does not apply it, so the validator below is what refuses a relative path.
        json_schema_extra={"pattern": "^/", "examples": ["/srv/data/app.db"]},
    )
    placement: Placement = Field(
        default_factory=lambda: Placement(require_colocated=True),
        title="Placement on Ray",
        description="Where the members run on a Ray cluster.",
    )
    max_concurrency: int | None = optional_field(
        ge=1, title="Max concurrent members",
        description=(
            "At most this many members (readers and writers together) run at once, across every "
            "flow run and machine: a Prefect global concurrency limit named after the node. "
            "Empty for no cap."
        ),
    )
    connect_opts: SQLiteConnectOptions = Field(
        default_factory=SQLiteConnectOptions,
        title="Connection options",
        description="How each connection is opened; members accept connect_opts= to override.",
    )

    @field_validator("db_path", mode="before")
    @classmethod
    def _absolute(cls, value: Any) -> str:
        text = os.fspath(value) if isinstance(value, os.PathLike) else value
        if not isinstance(text, str) or not text:
            raise ValueError("db_path must be a non-empty absolute path")
        if not os.path.isabs(text):
            raise ValueError(
                f"db_path {text!r} is relative; give an absolute path. A relative path would "
                "resolve against the working directory of whichever Ray worker runs the member."
            )
        return os.path.normpath(text)

    @property
    def label(self) -> str:
        return f"{super().label} ({self.db_path})"

    def _reservation_key(self) -> tuple[Any, ...]:
        return (self.engine, self.db_path)

    def _limit_identity(self) -> str:
        return self.db_path

    # --- connections --------------------------------------------------------------------

    @contextmanager
    def connect(
        self, *, read_only: bool = False, connect_opts: dict[str, Any] | BaseModel | None = None
    ) -> Iterator[sqlite3.Connection]:
        opts: SQLiteConnectOptions = self.resolve_connect_opts(connect_opts)
        conn = self._open(opts, read_only)
        try:
            yield conn
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) != SQLITE_FULL:
                raise
            raise StorageFullError(
                f"{self.label}: {exc}; the transaction was rolled back and earlier data is intact. "
                "Free disk space on the node's machine, or raise connect_opts max_page_count."
            ) from None
        finally:
            conn.close()

    def _open(self, opts: SQLiteConnectOptions, read_only: bool) -> sqlite3.Connection:
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
    def atomic(self, connect_opts: dict[str, Any] | BaseModel | None = None) -> Iterator[sqlite3.Cursor]:
        """One write transaction: the writer queue, BEGIN IMMEDIATE, COMMIT on success,
        ROLLBACK on error."""
        opts: SQLiteConnectOptions = self.resolve_connect_opts(connect_opts)
        with self.connect(connect_opts=opts) as conn, self._writer_turn(opts):
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn.cursor()
                if not conn.in_transaction:
                    raise TransactionControlError(f"{self.label}: a statement ended the transaction early.")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _writer_turn(self, opts: SQLiteConnectOptions) -> Iterator[None]:
        """Wait for this machine's other writers of the file, in the kernel, not in sleeps.

        Entered with the connection open: `_open` has refused a network filesystem and a
        missing directory, so the lock file lands beside a database that can be written.
        """
        if not opts.writer_queue:
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
                owned = _wait_for_flock(fd, opts.busy_timeout_s)
            yield
        finally:
            if owned:
                os.close(fd)  # releases the lock

    def _fetch(self, sql: str, params: Any, limit: int | None, connect_opts: dict[str, Any] | None) -> list[dict[str, Any]]:
        check_single_params(params, "query")
        with self.connect(read_only=True, connect_opts=connect_opts) as conn:
            return fetch_dicts(conn.execute(sql, params or ()), limit)

    def _run_script(self, script: str, connect_opts: dict[str, Any] | None) -> None:
        if not isinstance(script, str):
            raise TypeError(f"script must be a str, got {type(script).__name__}")
        opts: SQLiteConnectOptions = self.resolve_connect_opts(connect_opts)
        with self.connect(connect_opts=opts) as conn, self._writer_turn(opts):
            conn.executescript(script)

    def _ensure_database(self) -> None:
        Path(self.db_path).parent.mkdir(parents=True, exist_ok=True)

    def _run_one(self, cur: sqlite3.Cursor, sql: str, params: tuple[Any, ...] | dict[str, Any] | None) -> ExecResult:
        cur.execute(sql, params or ())
        rows = fetch_dicts(cur) if cur.description else None
        lastrowid = cur.lastrowid if _INSERT.match(sql) else None
        return ExecResult(rowcount=cur.rowcount, lastrowid=lastrowid, rows=rows)

    def _query_tool_session(self, caps: Any) -> Any:  # type: ignore[override]  # options checked by the caller
        """Reads open the file `mode=ro` under a read-only authorizer."""
        from chia_prefect.query_tool import SQLiteToolSession

        return SQLiteToolSession(self.db_path, caps)

    # --- members ------------------------------------------------------------------------

    @write
    def add_column_if_missing(
        self, table: str, column: str, type_decl: str, *, connect_opts: dict[str, Any] | None = None
    ) -> bool:
        """Add `column` to `table` unless present; True iff added."""
        validate_identifier(table, "table")
        validate_identifier(column, "column")
        type_decl = validate_type_decl(type_decl)
        with self.atomic(connect_opts) as cur:
            existing = {row[1].lower() for row in cur.execute(f'PRAGMA table_info("{table}")')}
            if not existing:
                raise sqlite3.OperationalError(f"no such table: {table}")
            if column.lower() in existing:
                return False
            cur.execute(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {type_decl}')
            return True

    @read
    def exists(self, *, connect_opts: dict[str, Any] | None = None) -> bool:
        """Whether the database file exists on the machine the members run on."""
        return os.path.exists(self.db_path)

    @read
    def schema(self, *, connect_opts: dict[str, Any] | None = None) -> str:  # type: ignore[override]
        """The CREATE statements of every table, index, view and trigger."""
        rows = self._fetch(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' "
            "ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'view' THEN 1 ELSE 2 END, name",
            (), None, connect_opts,
        )
        return ";\n".join(row["sql"] for row in rows) + (";" if rows else "")

    def run_maintenance(self, *, backup_dir: str | None = None, keep: int = 7) -> dict[str, Any]:
        """WAL checkpoint (TRUNCATE), `PRAGMA optimize`, `PRAGMA integrity_check` (damage raises
        `IntegrityCheckError`), then an online backup into `backup_dir` (default `backups/`
        beside the file), keeping the newest `keep`."""
        out: dict[str, Any] = {"checkpoint": self.wal_checkpoint("TRUNCATE")}
        self.execute("PRAGMA optimize")
        problems = [row["integrity_check"] for row in self.query("PRAGMA integrity_check", limit=20)]
        if problems != ["ok"]:
            raise IntegrityCheckError(f"{self.label}: integrity_check reported {problems}; restore from a backup.")
        out["integrity"] = "ok"
        directory = backup_dir or os.path.join(os.path.dirname(self.db_path), "backups")
        out["backup"] = self.backup(directory, keep=keep)
        return out

    @write
    def wal_checkpoint(
        self, mode: Literal["PASSIVE", "FULL", "RESTART", "TRUNCATE"] = "PASSIVE", *, connect_opts: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """`PRAGMA wal_checkpoint(mode)`: returns busy, log and checkpointed frame counts."""
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"wal_checkpoint mode must be PASSIVE, FULL, RESTART or TRUNCATE, got {mode!r}")
        with self.connect(connect_opts=connect_opts) as conn:
            busy, log, checkpointed = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return {"busy": busy, "log": log, "checkpointed": checkpointed}


    @read
    def backup(self, directory: str, *, keep: int | None = 7, connect_opts: dict[str, Any] | None = None) -> str:
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
        with self.connect(read_only=True, connect_opts=connect_opts) as source:
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
