"""`SQLiteNode`: one SQLite database file, its members pinned to the machine that holds it.

The block holds where the file is, its placement and connection options; every member
call builds a `SQLiteEngine` (chia_prefect.engines.sqlite) for the file with the call's
options and runs on it: a fresh connection per call, since a call may land in any worker
process on the node.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator

from chia_prefect._sql import RowTable, validate_identifier, validate_type_decl
from chia_prefect._ui import optional_field
from chia_prefect.base import LOGO_BASE_URL, DatabaseNode, idempotency_retention_field
from chia_prefect.engines.dialect import SQLITE, Dialect
from chia_prefect.engines.sqlite import SQLiteConnectOptions, SQLiteEngine
from chia_prefect.errors import IntegrityCheckError
from chia_prefect.members import read, write
from chia_prefect.members.placement import Placement


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
    idempotency_retention_days: float = idempotency_retention_field()

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

    def limit_identity(self) -> str:
        return self.db_path

    # --- the engine -------------------------------------------------------------------

    def engine_for(self, connect_opts: dict[str, Any] | BaseModel | None = None) -> SQLiteEngine:
        """The driver for this file with the block's options and a call's overrides applied."""
        return SQLiteEngine(self.db_path, self.resolve_connect_opts(connect_opts), self.label)

    def _fetch_table(self, sql: str, params: Any, limit: int | None, connect_opts: dict[str, Any] | None) -> RowTable:
        return self.engine_for(connect_opts).fetch_table(sql, params, limit)

    def _run_script(self, script: str, connect_opts: dict[str, Any] | None) -> None:
        self.engine_for(connect_opts).run_script(script)

    def _ensure_database(self) -> None:
        SQLiteEngine(self.db_path, self.connect_opts, self.label).ensure_database()

    # The engine's own function, not a method calling it: a transaction calls it once per op.
    _run_one = staticmethod(SQLiteEngine.run_one)
    _run_ops = staticmethod(SQLiteEngine.run_ops)
    _run_many = staticmethod(SQLiteEngine.run_many)

    def _query_tool_session(self, caps: Any) -> Any:  # type: ignore[override]  # options checked by the caller
        """Reads open the file `mode=ro` under a read-only authorizer."""
        from chia_prefect.query_tool import SQLiteToolSession

        return SQLiteToolSession(self.db_path, caps)

    # --- members ------------------------------------------------------------------------

    @write
    def add_column_if_missing(
        self, table: str, column: str, type_decl: str, *, connect_opts: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
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
        return self.engine_for(connect_opts).checkpoint(mode)

    @read
    def backup(self, directory: str, *, keep: int | None = 7, connect_opts: dict[str, Any] | None = None) -> str:
        """Online backup into `directory`/<name>-<UTC time>.db; keep the newest `keep` backups.

        Uses SQLite's backup API in one step: a consistent snapshot while writers go on.
        The copy is written under a temporary name and renamed, so a listed backup is whole.
        """
        return self.engine_for(connect_opts).backup(directory, keep=keep)
