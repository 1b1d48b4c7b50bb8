"""Errors raised by chia-prefect.

Every error the package raises on its own account derives from `ChiaPrefectError`.
Driver errors (`sqlite3.Error`, `psycopg.Error`) pass through unchanged, except that a
failing `transaction` op is re-raised as `TransactionOpError` (which is also the driver's
error class), a failed or lost Postgres connection as `NodeConnectionError` without the DSN
or password, and a full SQLite database or disk as `StorageFullError`.

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
    │   ├── TransactionControlError          BEGIN/COMMIT/... inside a member's SQL
    │   └── IdempotencyKeyReusedError        a write's key was recorded for another write
    ├── DatabaseNotFoundError                a read on a SQLite file that does not exist
    ├── NodeConnectionError (ConnectionError) the database could not be reached
    │   └── ConnectionLostError              the connection dropped mid-call; rolled back
    │       └── CommitOutcomeUnknownError    it dropped while COMMIT was in flight
    ├── StorageFullError (OSError)           SQLite: the database or disk is full
    ├── IntegrityCheckError                  PRAGMA integrity_check found damage
    ├── TransactionOpError (+ driver class)  a `transaction` op failed; all ops rolled back
    └── MigrationError                       migrations cannot be loaded or applied as asked
        ├── SchemaAheadError                 the database has versions the code lacks
        ├── ChecksumMismatchError            an applied migration's file was edited
        ├── SchemaDriftError                 the schema changed outside the migrations
        ├── MigrationLintError               --strict: the lint warned about a migration
        └── MigrationLockError               another migrator kept the lock too long
"""

from __future__ import annotations

from typing import Any, ClassVar


class ChiaPrefectError(Exception):
    """Base class of every error chia-prefect raises itself."""


class ConfigurationError(ChiaPrefectError, ValueError):
    """A block or a call's options are configured wrongly."""


class PlacementError(ConfigurationError):
    """Placement options conflict, or cannot be honoured on this Ray cluster."""


class SchedulingTimeoutError(PlacementError):
    """Ray could not schedule a member, a placement group or a query tool within the
    node's timeout. The message says what was asked for, what the cluster has free and
    which placement groups hold the rest; nothing was executed, or, for a write that started
    its statements while it waited to hear it was given up on, all of them rolled back."""


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
    have been applied. Check the data before running it again.

    On a write given an idempotency key, `idempotency_key` names it: `db.write_outcome(key)`
    says whether it committed, and calling again with the same key applies it at most once."""

    def __init__(self, message: str = "", *, detail: str = "", idempotency_key: str | None = None) -> None:
        super().__init__(message, detail=detail)
        self.idempotency_key = idempotency_key


class IdempotencyKeyReusedError(InvalidOperationError):
    """A write was given an idempotency key already recorded for a different write (another
    member, or other arguments). Nothing was executed. `key` and `member` (the member that
    recorded it) say which."""

    def __init__(self, message: str = "", *, key: str = "", member: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.member = member


class StorageFullError(ChiaPrefectError, OSError):
    """SQLite could not write: the database reached its page limit or the disk is full.
    The transaction was rolled back; earlier data is intact."""


class MigrationError(ChiaPrefectError):
    """Migrations cannot be loaded or applied as asked; nothing was changed."""


class SchemaAheadError(MigrationError):
    """The database has versions the code does not know: it is ahead of the code."""


class ChecksumMismatchError(MigrationError):
    """An applied migration's file changed since it was applied."""


class SchemaDriftError(MigrationError):
    """The live schema differs from the fingerprint recorded after the last migration:
    someone changed it outside the migrations. `differences` lists what differs."""

    def __init__(self, message: str, differences: list[str] | None = None) -> None:
        super().__init__(message)
        self.differences = list(differences or [])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.differences))


class MigrationLintError(MigrationError):
    """With `strict`, the lint warned about a pending migration; nothing was applied.
    `warnings` lists them."""

    def __init__(self, message: str, warnings: list[str] | None = None) -> None:
        super().__init__(message)
        self.warnings = list(warnings or [])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.warnings))


class MigrationLockError(MigrationError):
    """Another migrator held the database's migration lock longer than this run waits
    for it (or a Postgres migration kept failing on its lock_timeout); nothing was applied."""


class IntegrityCheckError(ChiaPrefectError):
    """`PRAGMA integrity_check` found damage in a SQLite database."""


class TransactionOpError(ChiaPrefectError):
    """An op of a `transaction` failed and every op was rolled back.

    What is raised is a subclass of this class AND of the driver's error class (e.g.
    `sqlite3.IntegrityError`, `psycopg.errors.UniqueViolation`), so `except` on either
    catches it and the driver's attributes (`sqlite_errorcode`, `sqlstate`, `diag`) still
    answer. `op_index` is the failing op (0-based), `op_total` the number of ops, `driver`
    the driver's error class; the driver's own exception is `__cause__`. All of it survives
    pickling (Ray)."""

    driver: ClassVar[type[BaseException]] = Exception

    def __init__(self, message: str, *, op_index: int, op_total: int,
                 driver_state: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.__dict__.update(driver_state or {})  # the driver's own data: sqlite_errorcode, psycopg's _info
        self.op_index = op_index
        self.op_total = op_total

    @classmethod
    def of(cls, exc: BaseException, *, op_index: int, op_total: int) -> TransactionOpError:
        """The error to raise for `exc`, the driver's error on op `op_index` of `op_total`."""
        message = str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else str(exc)
        return transaction_op_error_class(type(exc))(
            f"transaction op {op_index} of {op_total} failed, all ops rolled back: {message}",
            op_index=op_index, op_total=op_total, driver_state=dict(vars(exc)))

    def __reduce__(self) -> tuple[Any, ...]:
        state = super().__reduce__()  # the driver's reduce: psycopg makes its diagnostics picklable
        return (_rebuild_transaction_op_error, (self.driver, str(self.args[0]), self.op_index, self.op_total),
                state[2] if len(state) > 2 else None)


_OP_ERROR_CLASSES: dict[type[BaseException], type[TransactionOpError]] = {}


def transaction_op_error_class(driver: type[BaseException]) -> type[TransactionOpError]:
    """`TransactionOpError` joined with one driver error class (one class per driver class)."""
    if issubclass(driver, TransactionOpError):
        return driver
    if driver not in _OP_ERROR_CLASSES:  # a race creates two equal classes; either is right
        _OP_ERROR_CLASSES[driver] = type(
            f"TransactionOpError[{driver.__module__}.{driver.__qualname__}]", (TransactionOpError, driver),
            {"driver": driver, "__module__": __name__, "__doc__": TransactionOpError.__doc__})
    return _OP_ERROR_CLASSES[driver]


def _rebuild_transaction_op_error(driver: type[BaseException], message: str, op_index: int,
                                  op_total: int) -> TransactionOpError:
    return transaction_op_error_class(driver)(message, op_index=op_index, op_total=op_total)
