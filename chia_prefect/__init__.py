"""chia-prefect: SQLite and PostgreSQL database nodes for Prefect 3 flows on Ray.

    from chia_prefect import SQLiteNode

    db = SQLiteNode(db_path="/abs/path/app.db")
    db.init_schema("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
    db.execute("INSERT INTO t (v) VALUES (?)", ("x",))
"""

from chia_prefect._sql import ExecResult
from chia_prefect.base import DatabaseNode
from chia_prefect.cluster import install_address_check
from chia_prefect.engines import PostgresConnectOptions, SQLiteConnectOptions
from chia_prefect.errors import (
    BlockNotFoundError,
    ChecksumMismatchError,
    ChiaPrefectError,
    CommitOutcomeUnknownError,
    ConfigurationError,
    ConnectionLostError,
    DatabaseNotFoundError,
    IdempotencyKeyReusedError,
    IntegrityCheckError,
    InvalidIdentifierError,
    InvalidOperationError,
    MigrationError,
    MigrationLintError,
    MigrationLockError,
    NetworkFilesystemError,
    NodeConnectionError,
    PlacementError,
    PrivilegedRoleError,
    RayClusterError,
    SchedulingTimeoutError,
    SchemaAheadError,
    SchemaDriftError,
    StorageFullError,
    TransactionControlError,
    TransactionOpError,
)
from chia_prefect.idempotency import WriteOutcome
from chia_prefect.members import MemberTask, member_logger, read, write
from chia_prefect.members.placement import Placement
from chia_prefect.postgres import PostgresNode
from chia_prefect.runner import FastRayTaskRunner
from chia_prefect.sqlite import SQLiteNode

install_address_check()  # RayTaskRunner checks a cluster's address and token before ray.init

__all__ = [
    "BlockNotFoundError",
    "ChecksumMismatchError",
    "ChiaPrefectError",
    "CommitOutcomeUnknownError",
    "ConfigurationError",
    "ConnectionLostError",
    "DatabaseNode",
    "DatabaseNotFoundError",
    "ExecResult",
    "FastRayTaskRunner",
    "IdempotencyKeyReusedError",
    "IntegrityCheckError",
    "InvalidIdentifierError",
    "InvalidOperationError",
    "MemberTask",
    "MigrationError",
    "NetworkFilesystemError",
    "NodeConnectionError",
    "Placement",
    "PlacementError",
    "PostgresConnectOptions",
    "PostgresNode",
    "PrivilegedRoleError",
    "RayClusterError",
    "SQLiteConnectOptions",
    "SchedulingTimeoutError",
    "MigrationLintError",
    "MigrationLockError",
    "SchemaAheadError",
    "SchemaDriftError",
    "SQLiteNode",
    "StorageFullError",
    "TransactionControlError",
    "TransactionOpError",
    "WriteOutcome",
    "member_logger",
    "read",
    "write",
]
