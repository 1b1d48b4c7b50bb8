"""Engines: each database as a driver, apart from Prefect and Ray.

An engine owns connecting (options, PRAGMAs or session settings, timeouts, the SQLite
writer queue, the Postgres connect retry), one write transaction (`atomic()`), fetching,
running one statement and scripts, and its engine-only operations (SQLite backup and
checkpoint, Postgres COPY). Its `dialect` says what engine-blind code may ask of its SQL.
The node blocks (chia_prefect.sqlite, chia_prefect.postgres) build one per member call
with the call's options; nothing here imports Prefect or Ray.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

from chia_prefect._sql import ExecResult, RowTable
from chia_prefect.engines.dialect import POSTGRES, SQLITE, Dialect
from chia_prefect.engines.postgres import PostgresConnectOptions, PostgresEngine, PostgresTarget
from chia_prefect.engines.sqlite import SQLiteConnectOptions, SQLiteEngine


class Engine(Protocol):
    """What the node blocks ask of an engine."""

    dialect: Dialect
    label: str

    def connect(self, *, read_only: bool = False) -> AbstractContextManager[Any]: ...

    def atomic(self) -> AbstractContextManager[Any]: ...

    def fetch(self, sql: str, params: Any, limit: int | None) -> list[dict[str, Any]]: ...

    def fetch_table(self, sql: str, params: Any, limit: int | None) -> RowTable: ...

    def run_one(self, cur: Any, sql: str, params: tuple[Any, ...] | dict[str, Any] | None) -> ExecResult: ...

    def run_script(self, script: str) -> None: ...

    def migration_lock(self, wait_s: float) -> AbstractContextManager[None]: ...


__all__ = [
    "POSTGRES", "SQLITE", "Dialect", "Engine", "PostgresConnectOptions", "PostgresEngine", "PostgresTarget",
    "SQLiteConnectOptions", "SQLiteEngine",
]
