"""Idempotency keys: a write given a key applies once, however often it is retried.

A keyed write runs as one transaction on the node's connection:

1. the key's row is claimed first (`INSERT ... ON CONFLICT (key) DO NOTHING`), so a
   concurrent duplicate waits on it (Postgres: the unique index; SQLite: `BEGIN IMMEDIATE`)
   instead of running alongside;
2. if the key was already recorded, nothing runs: the recorded result is returned, or
   `IdempotencyKeyReusedError` is raised when the recorded arguments differ;
3. otherwise the member runs inside that same transaction (`node.atomic()` hands it the
   keyed cursor), and its pickled result is stored in the key's row before COMMIT.

So the write, the key and the result commit together or not at all: a retry after a crash
before COMMIT runs it again, one after COMMIT finds the key. Nothing here imports Prefect
or Ray; the member machinery resolves `"auto"` and calls `node.run_keyed`.
"""

from __future__ import annotations

import contextvars
import hashlib
import io
import marshal
import pickle
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from chia_prefect.errors import (
    CommitOutcomeUnknownError,
    DatabaseNotFoundError,
    IdempotencyKeyReusedError,
    InvalidOperationError,
)

# A `DatabaseNode` (this module sits below it): its `atomic()`, `_run_one`, `_run_last`, `_fetch`,
# `render()`, `dialect`, `engine`, `label` and `limit_identity()` are what is used.
DatabaseNode = Any

TABLE = "chia_idempotency"
# The keyword every write member takes.
KEY_PARAMETER = "idempotency_key"
AUTO = "auto"
MAX_KEY_LENGTH = 512
DEFAULT_RETENTION_DAYS = 7.0

R = TypeVar("R")


@dataclass(frozen=True)
class WriteOutcome:
    """What the database recorded for an idempotency key: whether a write with that key
    committed, which member wrote it, when, and the result it returned."""

    key: str
    committed: bool
    member: str | None = None
    result: Any = None
    recorded_at: float | None = None  # Unix time at which the keyed write claimed its key


@dataclass(frozen=True)
class _Keyed:
    node: Any
    cursor: Any
    key: str


_CURRENT: contextvars.ContextVar[_Keyed | None] = contextvars.ContextVar("chia_keyed_write", default=None)
# Databases whose key table this process created or found: (engine, database identity).
_READY: set[tuple[str, str]] = set()


def keyed_cursor(node: Any) -> Any | None:
    """The cursor of the keyed write `node` is running in this context, if any."""
    keyed = _CURRENT.get()
    return keyed.cursor if keyed is not None and keyed.node is node else None


def check_key(key: object, member: str) -> str:
    if not isinstance(key, str) or not key.strip() or len(key) > MAX_KEY_LENGTH:
        raise InvalidOperationError(
            f"{member}: idempotency_key must be a non-empty str of at most {MAX_KEY_LENGTH} characters "
            f"(your own key, or \"auto\"), got {_describe(key)}; nothing was executed.")
    return key


def auto_key(task_run_id: object, member: str) -> str:
    """The key `"auto"` stands for: the task run (the same across Prefect retries of that run
    and Ray replays of its task) and the member."""
    return f"auto:{task_run_id}:{member}"


def digest(member: str, arguments: Any) -> str:
    """A digest of a call's arguments (without its key and connection options).

    Equal arguments give equal bytes whichever objects they share: marshal format 2 writes no
    back-references, and pickle's fast mode keeps no memo (dates, Decimal, ...)."""
    try:
        payload = marshal.dumps(arguments, 2)
    except ValueError:
        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer, protocol=5)
        pickler.fast = True
        pickler.dump(arguments)
        payload = buffer.getvalue()
    return hashlib.sha256(member.encode() + b"\0" + payload).hexdigest()


def run_keyed(node: DatabaseNode, member: str, key: str, call: Callable[[], R], arguments: Any,
              connect_opts: Any = None) -> R:
    """Run `call` (the member's body) once for `key`; see the module's docstring."""
    fingerprint = digest(member, arguments)
    for attempt in (1, 2):
        _ensure_table(node, connect_opts, again=attempt > 1)
        try:
            return _run_once(node, member, key, fingerprint, call, connect_opts)
        except CommitOutcomeUnknownError as exc:
            raise CommitOutcomeUnknownError(
                f"{exc} Its idempotency key {key!r} answers: db.write_outcome({key!r}) says whether it "
                "committed, and calling again with the same key applies it at most once.",
                detail=exc.detail, idempotency_key=key,
            ) from None
        except _KeyTableMissing as missing:
            if attempt == 2 and missing.__cause__ is not None:
                raise missing.__cause__ from None
            # dropped since this process created it: create it again
    raise AssertionError("unreachable")


class _KeyTableMissing(Exception):
    """The key's claim found no key table: it was dropped since this process created it."""


def _run_once(node: DatabaseNode, member: str, key: str, fingerprint: str, call: Callable[[], R],
              connect_opts: Any) -> R:
    render = node.render
    with node.atomic(connect_opts) as cur:
        try:
            claimed = node._run_one(cur, render(
                f"INSERT INTO {TABLE} (key, member, digest, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key) DO NOTHING"), (key, member, fingerprint, time.time()))
        except Exception as exc:
            if getattr(exc, "sqlstate", None) == "42P01" or f"no such table: {TABLE}" in str(exc):
                raise _KeyTableMissing() from exc
            raise
        if claimed.rowcount == 0:
            cur.execute(render(f"SELECT member, digest, result FROM {TABLE} WHERE key = ?"), (key,))
            recorded_member, recorded_digest, result = cur.fetchone()
            if (recorded_member, recorded_digest) != (member, fingerprint):
                raise IdempotencyKeyReusedError(
                    f"{node.label}: idempotency key {key!r} was recorded for "
                    + ("other arguments of " if recorded_member == member else "")
                    + f"{recorded_member}; a different write needs its own key. Nothing was executed.",
                    key=key, member=recorded_member)
            value: R = pickle.loads(bytes(result))
            return value
        with _keyed(node, cur, key):
            result = call()
        try:
            payload = pickle.dumps(result, protocol=5)
        except Exception as exc:
            raise InvalidOperationError(
                f"{node.label}: {member} with idempotency key {key!r} returned a {type(result).__name__}, "
                f"which cannot be recorded ({exc}); the write was rolled back. Return picklable values."
            ) from None
        node._run_last(cur, render(f"UPDATE {TABLE} SET result = ? WHERE key = ?"), (payload, key))
    return result


@contextmanager
def _keyed(node: Any, cursor: Any, key: str) -> Iterator[None]:
    token = _CURRENT.set(_Keyed(node, cursor, key))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _ensure_table(node: DatabaseNode, connect_opts: Any, *, again: bool = False) -> None:
    """Create the key table once per database and process. Concurrent creators on Postgres
    can collide in the catalog (on the table's name, 42P07, on its row type's, 42710, or on a
    catalog index, 23505): the loser tries again and finds the table made."""
    where = (node.engine, node.limit_identity())
    if where in _READY and not again:
        return
    # Looked up first: CREATE INDEX IF NOT EXISTS would take a share lock on the table, and
    # wait behind every keyed write in progress, before finding the index there.
    if _has_table(node, connect_opts):
        _READY.add(where)
        return
    statements = [
        f"CREATE TABLE IF NOT EXISTS {TABLE} (key TEXT PRIMARY KEY, member TEXT NOT NULL, digest TEXT NOT NULL, "
        f"result {node.dialect.blob_type}, created_at DOUBLE PRECISION NOT NULL)",
        f"CREATE INDEX IF NOT EXISTS {TABLE}_created_at ON {TABLE} (created_at)",
    ]
    for attempt in (1, 2, 3):
        try:
            with node.atomic(connect_opts) as cur:
                for statement in statements:
                    cur.execute(statement)
            break
        except Exception as exc:  # noqa: BLE001 - the catalog race is retried, the rest raised
            if attempt == 3 or getattr(exc, "sqlstate", None) not in ("23505", "42P07", "42710"):
                raise
    _READY.add(where)


def outcome(node: DatabaseNode, key: str, connect_opts: Any = None) -> WriteOutcome:
    """What the database recorded for `key` (read-only)."""
    check_key(key, "write_outcome")
    if key == AUTO:
        raise InvalidOperationError(
            'write_outcome: "auto" stands for a key derived from a task run; give the key itself '
            "(CommitOutcomeUnknownError.idempotency_key names it).")
    if not _has_table(node, connect_opts):
        return WriteOutcome(key, committed=False)
    rows = node._fetch(node.render(f"SELECT member, result, created_at FROM {TABLE} WHERE key = ?"), (key,), 1,
                       connect_opts)
    if not rows:
        return WriteOutcome(key, committed=False)
    row = rows[0]
    return WriteOutcome(key, committed=True, member=row["member"], result=pickle.loads(bytes(row["result"])),
                        recorded_at=row["created_at"])


def prune(node: DatabaseNode, older_than_days: float, connect_opts: Any = None) -> int:
    """Delete keys recorded more than `older_than_days` ago; how many."""
    if not _has_table(node, connect_opts):
        return 0
    cutoff = time.time() - older_than_days * 86400
    with node.atomic(connect_opts) as cur:
        return int(node._run_one(cur, node.render(f"DELETE FROM {TABLE} WHERE created_at < ?"), (cutoff,)).rowcount)


def _has_table(node: DatabaseNode, connect_opts: Any) -> bool:
    try:
        rows = node._fetch(node.dialect.table_exists_sql, (TABLE,), 1, connect_opts)
    except DatabaseNotFoundError:  # a SQLite file not created yet
        return False
    return bool(rows and next(iter(rows[0].values())))


def _describe(value: object) -> str:
    if isinstance(value, str):
        return "an empty str" if not value.strip() else f"a str of {len(value)} characters"
    return f"a {type(value).__name__}"
