"""One migration step, applied on the node's machine by the `apply_migration` member.

No Prefect and no Ray: `apply_step` runs inside the member, where the database is. A step
takes the database's migration lock (the engine's `migration_lock`: a session advisory lock
on Postgres, a flock beside the file on SQLite), then, in ONE transaction: creates or
upgrades the version table, reads it again (a concurrent run may have applied the step:
then nothing runs), runs the callbacks and the body, records the schema's fingerprint and
the step's row. On Postgres the body runs with `SET LOCAL lock_timeout`; a statement that
waits longer fails, the transaction rolls back, and the whole step is tried again after a
backoff, up to `lock_retries` times. A no-transaction step runs its statements one by one
outside any transaction, under the same lock, and is recorded afterwards.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from chia_prefect._sql import (
    ExecResult,
    check_rows,
    check_single_params,
    fetch_dicts,
    refuse_transaction_control,
    run_many,
)
from chia_prefect.errors import MigrationError, MigrationLockError, SchemaDriftError

if TYPE_CHECKING:
    from chia_prefect.base import DatabaseNode

VERSION_TABLE = "chia_schema_versions"
# version is NULL on the rows of repeatable and down steps; applied_rank orders every row;
# fingerprint is the schema (JSON of object -> definition) right after the row's step.
VERSION_DDL = f"""CREATE TABLE {VERSION_TABLE} (
    version INTEGER UNIQUE,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    checksum TEXT NOT NULL,
    applied_at TEXT NOT NULL,
    applied_rank INTEGER NOT NULL,
    fingerprint TEXT
)"""
# The first layout (version, name, checksum, applied_at), upgraded in place on first use.
_UPGRADE = [
    VERSION_DDL.replace(f"TABLE {VERSION_TABLE} ", f"TABLE {VERSION_TABLE}_next ", 1),
    f"INSERT INTO {VERSION_TABLE}_next (version, name, kind, checksum, applied_at, applied_rank) "
    f"SELECT version, name, 'versioned', checksum, applied_at, version FROM {VERSION_TABLE}",
    f"DROP TABLE {VERSION_TABLE}",
    f"ALTER TABLE {VERSION_TABLE}_next RENAME TO {VERSION_TABLE}",
]
_RECORD = (f"INSERT INTO {VERSION_TABLE} (version, name, kind, checksum, applied_at, applied_rank, fingerprint) "
           "VALUES (?, ?, ?, ?, ?, ?, ?)")
_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's lock_timeout


@dataclass(frozen=True)
class Body:
    """SQL or Python source to run in a step; `where` names it in errors ("0004_backfill.py")."""

    where: str
    text: str
    language: str = "sql"  # "sql", or "python": `text` defines `entry(tx)`
    entry: str = "migrate"
    transactional: bool = True


@dataclass(frozen=True)
class Step:
    """What `apply_migration` applies: one migration up or down, a repeatable, or a baseline."""

    action: str  # "up", "down", "repeatable" or "baseline"
    version: int | None
    name: str
    label: str
    checksum: str
    body: Body
    before: tuple[Body, ...] = ()
    after: tuple[Body, ...] = ()
    # baseline: (version, name, checksum) of every migration it stamps as applied
    stamps: tuple[tuple[int, str, str], ...] = ()
    lock_timeout_ms: int = 5000
    lock_retries: int = 4
    lock_wait_s: float = 600.0
    # Refuse drift, checked under the lock: a no-transaction migration of a concurrent run
    # shows half-done to a plan read outside it, never to a step.
    check_drift: bool = True


class MigrationTransaction:
    """What a Python migration's `migrate(tx)` (or `down(tx)`, or a Python callback's
    `callback(tx)`) is given: the step's transaction, on the node's machine.

    Statements run in the same transaction as the version row; SQL is in the node's
    paramstyle (`tx.render("... ?")` converts). They may not BEGIN, COMMIT or ROLLBACK.
    """

    def __init__(self, node: DatabaseNode, cursor: Any) -> None:
        self._node = node
        self.cursor = cursor  # the DB-API cursor, for what the methods below do not cover
        self.engine = node.engine
        self.paramstyle = node.paramstyle
        self.statements = 0

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> ExecResult:
        """Run one statement; its rowcount and the rows it returns."""
        check_single_params(params, "tx.execute")
        self._check(sql, params, "tx.execute")
        return self._node._run_one(self.cursor, sql, params)

    def executemany(self, sql: str, seq_of_params: list[Any]) -> ExecResult:
        """Run `sql` once per parameter set; rowcount is the total."""
        check_rows(seq_of_params, "tx.executemany")
        self._check(sql, seq_of_params, "tx.executemany")
        return run_many(self.cursor, sql, seq_of_params)

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts (reading what this transaction wrote so far)."""
        check_single_params(params, "tx.query")
        self._check(sql, params, "tx.query")
        return self._node._run_one(self.cursor, sql, params).rows or []

    def query_value(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = (), default: Any = None) -> Any:
        """First column of the first row, `default` when there is no row."""
        rows = self.query(sql, params)
        return next(iter(rows[0].values())) if rows else default

    def render(self, sql: str) -> str:
        """`sql` written with `?` placeholders, in the node's paramstyle."""
        return self._node.render(sql)

    def _check(self, sql: str, params: object, where: str) -> None:
        self.statements += 1
        self._node._check_paramstyle(sql, params, where)
        refuse_transaction_control(sql, all_statements=self._node.multi_statement,
                                   where=f"{where} in a migration (it runs in the migration's transaction)")


class _LockTimedOut(Exception):
    def __init__(self, where: str, statement: int, error: BaseException) -> None:
        super().__init__(f"{where} statement {statement}: {error}")
        self.where, self.statement, self.error = where, statement, error


def apply_step(node: DatabaseNode, step: Step, connect_opts: Any = None,
               log: Any = None) -> dict[str, Any]:
    """Apply `step` under the migration lock; `{"status": "applied" | "elsewhere", ...}`."""
    from chia_prefect import idempotency

    if idempotency.keyed_cursor(node) is not None:
        raise MigrationError(
            f"{node.label}: apply_migration takes no idempotency key: its version row already makes a "
            "retried migration apply once. Call it without one."
        )
    say = log or (lambda line: None)
    node._ensure_database()
    engine = node.engine_for(connect_opts)
    with engine.migration_lock(step.lock_wait_s):
        if not step.body.transactional:
            return _outside_transaction(node, step, connect_opts)
        attempts = step.lock_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                with node.atomic(connect_opts) as cur:
                    return {**_in_transaction(node, cur, step), "attempts": attempt}
            except _LockTimedOut as timed_out:
                if attempt == attempts:
                    raise MigrationLockError(
                        f"{node.label}: migration {step.label} waited longer than lock_timeout "
                        f"({step.lock_timeout_ms} ms) for a lock at {timed_out.where} statement "
                        f"{timed_out.statement} on each of {attempts} attempts, and was rolled back each "
                        "time; the schema and version are as before. A long transaction holds a lock on "
                        "the table: let it end, or raise lock_timeout_s / lock_retries."
                    ) from None
                pause = random.uniform(0.5, 1.0) * min(8.0, 0.5 * 2 ** (attempt - 1))
                say(f"{node.label}: migration {step.label} waited longer than lock_timeout "
                    f"({step.lock_timeout_ms} ms) at {timed_out.where} statement {timed_out.statement} "
                    f"and was rolled back; retry {attempt} of {step.lock_retries} in {pause:.1f} s")
                time.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover


def _in_transaction(node: DatabaseNode, cur: Any, step: Step) -> dict[str, Any]:
    _ensure_version_table(node, cur)
    rows = _rows(cur)
    if _done_already(node, step, rows):
        return {"status": "elsewhere", "label": step.label}
    _refuse_drift(node, cur, step, rows)
    if node.dialect.lock_timeout_sql and step.lock_timeout_ms:
        cur.execute(node.dialect.lock_timeout_sql.format(ms=int(step.lock_timeout_ms)))
    for body in (*step.before, step.body, *step.after):
        _run_body(node, cur, body, step)
    _record(node, cur, step, rows, _fingerprint(node, cur))
    return {"status": "applied", "label": step.label}


def _outside_transaction(node: DatabaseNode, step: Step, connect_opts: Any) -> dict[str, Any]:
    with node.atomic(connect_opts) as cur:
        _ensure_version_table(node, cur)
        rows = _rows(cur)
        if _done_already(node, step, rows):
            return {"status": "elsewhere", "label": step.label}
        _refuse_drift(node, cur, step, rows)
    statements = node.split_script(step.body.text)
    with node.engine_for(connect_opts).connect() as conn:
        for index, statement in enumerate(statements, 1):
            try:
                conn.execute(statement)
            except Exception as exc:
                done = f"statements 1..{index - 1} stayed applied" if index > 1 else "nothing was applied"
                raise MigrationError(
                    f"{node.label}: migration {step.label} (no-transaction: not atomic) failed at its "
                    f"statement {index}; {done} and the version is as before. {type(exc).__name__}: {exc}"
                ) from exc
    with node.atomic(connect_opts) as cur:
        _record(node, cur, step, _rows(cur), _fingerprint(node, cur))
    return {"status": "applied", "label": step.label, "attempts": 1}


def _ensure_version_table(node: DatabaseNode, cur: Any) -> None:
    cur.execute(node.dialect.table_exists_sql, (VERSION_TABLE,))
    if not cur.fetchone()[0]:
        cur.execute(VERSION_DDL)
        return
    cur.execute(f"SELECT * FROM {VERSION_TABLE} WHERE 1 = 0")
    if "kind" not in {column[0] for column in cur.description}:
        for statement in _UPGRADE:
            cur.execute(statement)


def _rows(cur: Any) -> list[dict[str, Any]]:
    cur.execute(f"SELECT version, name, kind, checksum, applied_rank, fingerprint FROM {VERSION_TABLE} "
                "ORDER BY applied_rank")
    return fetch_dicts(cur)


def _refuse_drift(node: DatabaseNode, cur: Any, step: Step, rows: list[dict[str, Any]]) -> None:
    recorded = next((row["fingerprint"] for row in reversed(rows) if row["fingerprint"]), None)
    if not step.check_drift or recorded is None:
        return
    differences = schema_diff(json.loads(recorded), _fingerprint(node, cur))
    if differences:
        raise drift_error(node.label, differences)


def schema_diff(recorded: dict[str, str], live: dict[str, str]) -> list[str]:
    """What differs, one line per object: `+` only live, `-` only recorded, `~` changed."""
    out = []
    for key in sorted(set(recorded) | set(live)):
        before, now = recorded.get(key), live.get(key)
        if before == now:
            continue
        if before is None:
            out.append(f"+ {key}" + (f": {now}" if now else ""))
        elif now is None:
            out.append(f"- {key}" + (f": {before}" if before else ""))
        else:
            out.append(f"~ {key}: {before} -> {now}")
    return out


def drift_error(label: str, differences: list[str]) -> SchemaDriftError:
    return SchemaDriftError(
        f"{label}: the schema changed outside the migrations since the last one was applied: "
        f"{'; '.join(differences)}. Migrate that change in a new migration (or undo it), or pass "
        "allow_drift=True (--allow-drift) to migrate anyway and record the schema as it is; nothing was applied.",
        differences,
    )


def _done_already(node: DatabaseNode, step: Step, rows: list[dict[str, Any]]) -> bool:
    """True when a concurrent run applied `step` first; raises when the database moved
    somewhere this step does not apply to."""
    versions = {row["version"] for row in rows if row["version"] is not None}
    current = max(versions, default=0)
    if step.action == "repeatable":
        latest = [row["checksum"] for row in rows if row["kind"] == "repeatable" and row["name"] == step.name]
        return bool(latest) and latest[-1] == step.checksum
    if step.action == "baseline":
        return bool(versions)
    if step.action == "up":
        if step.version in versions:
            return True
        expected = (step.version or 0) - 1
    else:  # down
        if step.version not in versions:
            return True
        expected = step.version or 0
    if current != expected:
        raise MigrationError(
            f"{node.label}: migration {step.label} ({step.action}) expected the database at version "
            f"{expected}, but it is at {current} now (another run moved it); nothing was applied. "
            "Plan again and run migrate again."
        )
    return False


def _run_body(node: DatabaseNode, cur: Any, body: Body, step: Step) -> None:
    if body.language == "python":
        tx = MigrationTransaction(node, cur)
        try:
            namespace: dict[str, Any] = {"__name__": f"chia_migration_{step.name}", "__file__": body.where}
            exec(compile(body.text, body.where, "exec"), namespace)  # noqa: S102 - the operator's own migration
            entry = namespace.get(body.entry)
            if not callable(entry):
                raise MigrationError(f"{body.where} defines no `def {body.entry}(tx)`.")
            entry(tx)
        except MigrationError:
            raise
        except Exception as exc:
            _fail(node, step, body, tx.statements, exc, python=True)
        return
    for index, statement in enumerate(node.split_script(body.text), 1):
        try:
            refuse_transaction_control(statement, all_statements=node.multi_statement,
                                       where=f"migration {body.where} (it runs in one transaction)")
            cur.execute(statement)
        except Exception as exc:
            _fail(node, step, body, index, exc, python=False)


def _fail(node: DatabaseNode, step: Step, body: Body, statement: int, exc: BaseException, python: bool) -> None:
    if getattr(exc, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
        raise _LockTimedOut(body.where, statement, exc) from None
    what = "migration" if body.where.startswith(step.label) else f"callback {body.where} of migration"
    if step.action == "down":
        what = f"down {what}"
    at = f"failed at its statement {statement}"
    if python:
        at = (f"raised {type(exc).__name__}" if not _is_driver_error(exc)
              else f"failed at its statement {statement} (issued through tx)")
    raise MigrationError(
        f"{node.label}: {what} {step.label} {at} and was rolled back; the schema and version are as "
        f"before. {type(exc).__name__}: {exc}"
    ) from exc


def _is_driver_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith(("sqlite3", "psycopg"))


def fingerprint_rows(rows: Any) -> dict[str, str]:
    """The schema as {object: definition} from the dialect's fingerprint query's rows."""
    out: dict[str, str] = {}
    for row in rows:
        key, definition = (row["object"], row["definition"]) if isinstance(row, dict) else (row[0], row[1])
        out[str(key)] = " ".join(str(definition or "").split())
    return out


def _fingerprint(node: DatabaseNode, cur: Any) -> dict[str, str]:
    cur.execute(node.dialect.fingerprint_sql)
    return fingerprint_rows(cur.fetchall())


def _record(node: DatabaseNode, cur: Any, step: Step, rows: list[dict[str, Any]], schema: dict[str, str]) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    rank = max((row["applied_rank"] for row in rows), default=0) + 1
    snapshot = json.dumps(schema, sort_keys=True)
    insert = node.render(_RECORD)
    if step.action == "baseline":
        for offset, (stamped, name, checksum) in enumerate(step.stamps):
            last = offset == len(step.stamps) - 1
            cur.execute(insert, (stamped, name, "versioned", checksum, now, rank + offset, snapshot if last else None))
        return
    if step.action == "down":
        cur.execute(node.render(f"DELETE FROM {VERSION_TABLE} WHERE version = ?"), (step.version,))
        cur.execute(insert, (None, step.label, "down", step.checksum, now, rank, snapshot))
        return
    kind = "repeatable" if step.action == "repeatable" else "versioned"
    version: int | None = step.version if step.action == "up" else None
    cur.execute(insert, (version, step.name, kind, step.checksum, now, rank, snapshot))
