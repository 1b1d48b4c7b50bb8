"""Errors raised by chia-prefect.

Every error the package raises on its own account derives from `ChiaPrefectError`.
Driver errors (`sqlite3.Error`, `psycopg.Error`) pass through unchanged, except that a
failing `transaction` op gets its index added, a failed or lost Postgres connection is
re-raised as `NodeConnectionError` without the DSN or password, and a full SQLite database
or disk as `StorageFullError`.

    ChiaPrefectError
    ├── ConfigurationError (ValueError)      a block or call is configured wrongly
    │   ├── PlacementError                   conflicting or unusable placement options
    │   │   └── SchedulingTimeoutError       Ray could not place the work in bounded time
    │   ├── NetworkFilesystemError           SQLite file on NFS/SMB/...: WAL would corrupt it
    │   ├── RayClusterError                  a Ray cluster address is down, or its token is missing
    │   ├── BlockNotFoundError               no saved node by that name (or several match)
    │   └── PrivilegedRoleError              a query tool's Postgres role can reach server files
    ├── InvalidOperationError (ValueError)   a member was called with input it refuses
    │   ├── InvalidIdentifierError           table/column/type rejected before any SQL
    │   └── TransactionControlError          BEGIN/COMMIT/... inside a member's SQL
    ├── DatabaseNotFoundError                a read on a SQLite file that does not exist
    ├── NodeConnectionError (ConnectionError) the database could not be reached
    │   └── ConnectionLostError              the connection dropped mid-call; rolled back
    │       └── CommitOutcomeUnknownError    it dropped while COMMIT was in flight
    ├── StorageFullError (OSError)           SQLite: the database or disk is full
    ├── IntegrityCheckError                  PRAGMA integrity_check found damage
    └── MigrationError                       migrations cannot be loaded or applied as asked
        ├── SchemaAheadError                 the database has versions the code lacks
        └── ChecksumMismatchError            an applied migration's file was edited
"""

from __future__ import annotations


class ChiaPrefectError(Exception):
    """Base class of every error chia-prefect raises itself."""


class ConfigurationError(ChiaPrefectError, ValueError):
    """A block or a call's options are configured wrongly."""


class PlacementError(ConfigurationError):
    """Placement options conflict, or cannot be honoured on this Ray cluster."""


class SchedulingTimeoutError(PlacementError):
    """Ray could not schedule a member, a placement group or a query tool within the
    node's timeout. The message says what was asked for, what the cluster has free and
    which placement groups hold the rest; nothing was executed."""


class NetworkFilesystemError(ConfigurationError):
    """A SQLite database path lies on a network filesystem."""


class RayClusterError(ConfigurationError):
    """The Ray cluster at an address cannot be joined: nothing answers, or it requires a
    token this process does not send."""


class BlockNotFoundError(ConfigurationError, LookupError):
    """No saved node goes by the name given, or a bare name matches several node types."""


class PrivilegedRoleError(ConfigurationError):
    """A Postgres query tool's role is a superuser or may run server programs or touch
    server files; `allow_privileged_role=True` overrides (dangerous)."""


class InvalidOperationError(ChiaPrefectError, ValueError):
    """A member was called with arguments it refuses; nothing was executed."""


class InvalidIdentifierError(InvalidOperationError):
    """An identifier or type declaration is not safe to interpolate into SQL."""


class TransactionControlError(InvalidOperationError):
    """SQL passed to a member tried to begin or end a transaction itself."""


class DatabaseNotFoundError(ChiaPrefectError, FileNotFoundError):
    """A read member was called on a SQLite database that does not exist yet."""


class NodeConnectionError(ChiaPrefectError, ConnectionError):
    """The database could not be reached. The message never contains credentials."""


class ConnectionLostError(NodeConnectionError):
    """The connection dropped during a call (server restart, network). The server rolled
    back whatever was not committed; the next call opens a new connection.

    `detail` says what was lost and why, without the node's label or credentials."""

    def __init__(self, message: str = "", *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail  # kept through pickling (Ray) with the instance's __dict__


class CommitOutcomeUnknownError(ConnectionLostError):
    """The connection dropped while COMMIT was in flight: the transaction may or may not
    have been applied. Check the data before running it again."""


class StorageFullError(ChiaPrefectError, OSError):
    """SQLite could not write: the database reached its page limit or the disk is full.
    The transaction was rolled back; earlier data is intact."""


class MigrationError(ChiaPrefectError):
    """Migrations cannot be loaded or applied as asked; nothing was changed."""


class SchemaAheadError(MigrationError):
    """The database has versions the code does not know: it is ahead of the code."""


class ChecksumMismatchError(MigrationError):
    """An applied migration's file changed since it was applied."""


class IntegrityCheckError(ChiaPrefectError):
    """`PRAGMA integrity_check` found damage in a SQLite database."""
