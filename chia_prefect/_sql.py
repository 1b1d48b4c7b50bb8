"""Engine-agnostic SQL helpers: argument checks, op dispatch, statement scanning, rows.

Everything here runs before a connection is opened or on a DB-API cursor, so both
engines share one definition of what a member accepts.
"""

from __future__ import annotations

import functools
import gc
import itertools
import marshal
import operator
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast, overload

from chia_prefect.errors import (
    InvalidIdentifierError,
    InvalidOperationError,
    TransactionControlError,
    TransactionOpError,
)

# SQLite result codes (the C API's stable values). The sqlite3 module names them only from
# Python 3.11, and this package supports 3.10.
SQLITE_PERM = 3
SQLITE_READONLY = 8
SQLITE_FULL = 13
SQLITE_AUTH = 23


@dataclass(frozen=True, slots=True)
class ExecResult:
    """Outcome of one write statement, the same shape on every engine.

    Attributes:
        rowcount: The DB-API `cursor.rowcount` (the total for `executemany`).
        lastrowid: SQLite only, for a single `INSERT`/`REPLACE`; `None` otherwise.
            On Postgres use `RETURNING` and read `rows`.
        rows: Rows the statement returned (e.g. `INSERT ... RETURNING id`), else `None`.
    """

    rowcount: int
    lastrowid: int | None = None
    rows: list[dict[str, Any]] | None = field(default=None)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # The dataclass's own pickling of slots reads its fields() per instance: 3.7 ms for
        # a thousand results.
        return (ExecResult, (self.rowcount, self.lastrowid, self.rows))

    def __setstate__(self, state: Any) -> None:
        # Results pickled before ExecResult had slots (stored with an idempotency key) have
        # their fields as a dict.
        values = (state.get("rowcount"), state.get("lastrowid"), state.get("rows")) if isinstance(state, dict) \
            else tuple(state)
        for name, value in zip(("rowcount", "lastrowid", "rows"), values):
            object.__setattr__(self, name, value)


_new = object.__new__
_slots: dict[str, Any] = dict(vars(ExecResult))  # the slots' descriptors
_set_rowcount, _set_lastrowid, _set_rows = (_slots[name].__set__ for name in ("rowcount", "lastrowid", "rows"))


def exec_result(rowcount: int, lastrowid: int | None = None, rows: list[dict[str, Any]] | None = None) -> ExecResult:
    """`ExecResult(rowcount, lastrowid, rows)`, the same object at a third of the cost: a
    frozen dataclass's `__init__` sets each field through `object.__setattr__`, and in a
    1,000-op `transaction` that cost more than our own per-op work. (Its slots also halve
    the objects a thousand results add for the garbage collector.)"""
    result = _new(ExecResult)
    _set_rowcount(result, rowcount)
    _set_lastrowid(result, lastrowid)
    _set_rows(result, rows)
    return result


ResultFields = tuple[int, "int | None", "list[dict[str, Any]] | None"]
"""An `ExecResult`'s fields as a tuple: what an op loop collects and what travels."""

result_fields: Callable[[ExecResult], ResultFields] = operator.attrgetter("rowcount", "lastrowid", "rows")


def exec_results_of(fields: list[ResultFields]) -> list[ExecResult]:
    return list(itertools.starmap(exec_result, fields))


def exec_results_from_marshal(payload: Any) -> list[ExecResult]:
    """`ExecResult`s from their fields, marshalled: how a `transaction`'s results travel
    from the worker and how a keyed one's are recorded with its idempotency key (keep this
    name: recorded results refer to it)."""
    with collector_held():  # a thousand new results, none of them garbage yet
        return exec_results_of(marshal.loads(payload))


@contextmanager
def collector_held() -> Iterator[None]:
    """The garbage collector held off while many new objects that cannot be garbage are
    made (fetched rows, unpacked batches, results): each collection it would set off walks
    them all. 100k fetched rows took 45 ms longer in a worker whose last call had built an
    Arrow table, and a 1M-row batch's unpacking set off 84 ms of collections."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


# --- statement scanning -------------------------------------------------------------

_TRANSACTION_CONTROL = frozenset(
    {"BEGIN", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE", "START"}
)
_WORD = re.compile(r"[A-Za-z_]+")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def _skip_quoted(sql: str, i: int) -> int:
    """Index just past the string, identifier, comment or dollar-quote starting at i."""
    ch = sql[i]
    if ch in "'\"":
        j = i + 1
        while j < len(sql):
            if sql[j] == ch:
                if sql.startswith(ch, j + 1):  # doubled quote is an escaped quote
                    j += 2
                    continue
                return j + 1
            j += 1
        return len(sql)
    if sql.startswith("--", i):
        end = sql.find("\n", i)
        return len(sql) if end < 0 else end + 1
    if sql.startswith("/*", i):
        end = sql.find("*/", i + 2)
        return len(sql) if end < 0 else end + 2
    tag = _DOLLAR_TAG.match(sql, i)
    if tag:
        end = sql.find(tag.group(0), tag.end())
        return len(sql) if end < 0 else end + len(tag.group(0))
    return i


def _heads(sql: str) -> Iterator[str]:
    """First keyword (upper-cased) of each statement in `sql`, outside quotes and comments,
    found as the scan reaches it."""
    at_start, i = True, 0
    while i < len(sql):
        skipped = _skip_quoted(sql, i)
        if skipped != i:
            i = skipped
            continue
        ch = sql[i]
        if ch == ";":
            at_start = True
        elif at_start and not ch.isspace():
            word = _WORD.match(sql, i)
            yield word.group(0).upper() if word else ch
            at_start = False
        i += 1


def statement_heads(sql: str) -> list[str]:
    """First keyword (upper-cased) of every statement in `sql`, outside quotes and comments."""
    return list(_heads(sql))


@functools.lru_cache(maxsize=1024)  # a transaction repeats its ops' SQL: scan each text once
def first_statement_head(sql: str) -> str | None:
    """First keyword of `sql` (the scan stops there); None if it has no statement."""
    return next(_heads(sql), None)


def split_sqlite_script(script: str) -> list[str]:
    """Split a SQLite script where SQLite itself would: a statement ends at the first `;`
    after which `sqlite3.complete_statement` calls it complete. That is SQLite's own
    tokenizer, so a trigger body (`BEGIN ... CASE ... END; ... END;`), strings and comments
    holding `;` or keywords stay whole."""
    import sqlite3

    statements: list[str] = []
    pending = ""
    pieces = script.split(";")
    for piece in pieces[:-1]:
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            statements.append(pending[:-1])
            pending = ""
    statements.append(pending + pieces[-1])
    return [s.strip() for s in statements if _strip_comments(s).strip()]


def split_postgres_script(script: str) -> list[str]:
    """Split a PostgreSQL script with the server's own parser (libpg_query, via pglast):
    dollar-quoted bodies, `BEGIN ATOMIC ... END` functions and procedures stay whole. A
    script the parser rejects comes back whole, so the server reports the syntax error."""
    from pglast import split
    from pglast.parser import ParseError

    try:
        return [s.strip() for s in split(script, with_parser=True) if s.strip()]
    except ParseError:
        return [script.strip()] if _strip_comments(script).strip() else []


@functools.lru_cache(maxsize=1024)  # members repeat their SQL: parse each text once
def postgres_transaction_control(sql: str) -> str | None:
    """The first statement of `sql` that begins or ends a transaction (`COMMIT`, `BEGIN`,
    `SAVEPOINT` ...), as written, by the server's own parser; None if there is none or
    the parser rejects `sql` (the server then parses it whole and runs nothing)."""
    from pglast import ast, parse_sql
    from pglast.parser import ParseError

    try:
        statements = parse_sql(sql)
    except ParseError:
        return None
    for raw in statements:
        if isinstance(raw.stmt, ast.TransactionStmt):
            # stmt_location counts bytes of the UTF-8 text.
            at = sql.encode()[raw.stmt_location or 0:].decode(errors="ignore")
            words = _WORD.findall(_strip_comments(at))
            return words[0].upper() if words else "BEGIN"
    return None


def _strip_comments(sql: str) -> str:
    out, i = [], 0
    while i < len(sql):
        skipped = _skip_quoted(sql, i)
        if skipped != i:
            if not sql.startswith(("--", "/*"), i):
                out.append(sql[i:skipped])
            i = skipped
            continue
        out.append(sql[i])
        i += 1
    return "".join(out)


def refuse_transaction_control(sql: str, *, all_statements: bool, where: str) -> None:
    """Raise if `sql` would begin or end a transaction the member owns.

    SQLite's driver runs one statement per call, so only its first keyword matters there.
    psycopg sends several statements at once (`all_statements`): PostgreSQL's own parser
    finds a transaction-control statement among them, wherever it is.
    """
    if not isinstance(sql, str):
        raise InvalidOperationError(f"{where}: SQL must be a str, got {type(sql).__name__}")
    if all_statements:
        head = postgres_transaction_control(sql)
    else:
        first = first_statement_head(sql)
        head = first if first in _TRANSACTION_CONTROL else None
    if head is not None:
        raise TransactionControlError(
            f"{where}: {head} is not allowed here; the member runs the statement in a "
            "transaction of its own. Pass several statements to transaction([...]) "
            "to make them atomic."
        )


def render_qmark(sql: str, paramstyle: str) -> str:
    """Rewrite `?` placeholders (outside quotes and comments) for `paramstyle`.

    Only placeholders change. As psycopg requires, a statement run with parameters on
    Postgres must write a literal `%` as `%%`.
    """
    if paramstyle == "qmark":
        return sql
    if paramstyle != "format":
        raise ValueError(f"cannot render SQL for paramstyle {paramstyle!r}")
    if type(sql) is str and len(sql) <= _RENDER_CACHED_LENGTH:
        return _render_format(sql)
    return _render_format.__wrapped__(sql)


# Statements up to this length are rendered once per process (a keyed write renders its
# key's two statements on every call; scanning each cost 0.1 ms).
_RENDER_CACHED_LENGTH = 2048


@functools.lru_cache(maxsize=512)
def _render_format(sql: str) -> str:
    out, i = [], 0
    while i < len(sql):
        skipped = _skip_quoted(sql, i)
        if skipped != i:
            out.append(sql[i:skipped])
            i = skipped
            continue
        out.append("%s" if sql[i] == "?" else sql[i])
        i += 1
    return "".join(out)


# --- identifiers --------------------------------------------------------------------

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_TYPE_DECL = re.compile(
    r"[A-Za-z][A-Za-z0-9_]*"  # type name
    r"(\s*\(\s*\d+\s*(,\s*\d+\s*)?\))?"  # (n) or (p, s)
    r"(\[\])*"  # array suffixes (Postgres)
    r"(\s+(-?\d+(\.\d+)?|[A-Za-z_][A-Za-z0-9_]*))*"  # NOT NULL, DEFAULT 0, ...
)


def validate_identifier(name: object, what: str) -> str:
    """Return `name` if it is a plain SQL identifier, else raise before any SQL is built."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise InvalidIdentifierError(
            f"{what} {name!r} is not a plain identifier (letters, digits and _, "
            "starting with a letter or _, at most 63 characters); nothing was executed."
        )
    return name


def validate_type_decl(type_decl: object) -> str:
    """Return `type_decl` if it is a benign column type expression, else raise."""
    if not isinstance(type_decl, str) or not _TYPE_DECL.fullmatch(type_decl.strip()):
        raise InvalidIdentifierError(
            f"column type {type_decl!r} is refused: use a type name with optional "
            "(n[, m]), [] and plain keywords or numbers such as NOT NULL DEFAULT 0; "
            "nothing was executed."
        )
    return type_decl.strip()


# --- parameters and ops -------------------------------------------------------------


def check_single_params(params: object, where: str) -> tuple[Any, ...] | dict[str, Any] | None:
    """Parameters of one statement: a tuple or dict (or None for no parameters)."""
    if params is None or isinstance(params, (tuple, dict)):
        return params
    hint = " (a list means several rows: use executemany)" if isinstance(params, list) else ""
    raise InvalidOperationError(
        f"{where}: parameters of a single statement must be a tuple or a dict, "
        f"got {type(params).__name__}{hint}."
    )


class FlatRows(Sequence[tuple[Any, ...]]):
    """Rows of one width held as one flat list of their values: how a large `executemany`
    batch of tuples reaches a Ray worker (`write(flat=...)`). It reads as the sequence of
    tuples; SQLite's multi-row INSERT takes slices of `flat` as they are. Unpacking 100k
    rows of 3 values took 6.6 ms flat against 11.1 as tuples, and freeing them 1.9 ms
    against 4.1."""

    __slots__ = ("flat", "width")

    def __init__(self, flat: list[Any], width: int) -> None:
        self.flat, self.width = flat, width

    def __len__(self) -> int:
        return len(self.flat) // self.width

    @overload
    def __getitem__(self, index: int) -> tuple[Any, ...]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[Any, ...]]: ...

    def __getitem__(self, index: int | slice) -> tuple[Any, ...] | list[tuple[Any, ...]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        count = len(self)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError("row index out of range")
        return tuple(self.flat[index * self.width:(index + 1) * self.width])

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return zip(*[iter(self.flat)] * self.width, strict=False)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (FlatRows, (self.flat, self.width))

    def __repr__(self) -> str:
        return f"FlatRows(<{len(self)} rows of {self.width}>)"


def check_rows(seq_of_params: object, where: str) -> list[Any] | tuple[Any, ...] | FlatRows:
    """Parameter sets of `executemany`: a list or tuple of tuples/dicts."""
    if not isinstance(seq_of_params, (list, tuple, FlatRows)):
        raise InvalidOperationError(
            f"{where}: seq_of_params must be a list of tuples or dicts, "
            f"got {type(seq_of_params).__name__}."
        )
    return seq_of_params


def rows_of_width(rows: list[Any] | tuple[Any, ...], width: int) -> bool:
    """Whether every row is a tuple (or every row a list) of `width` values. One pass in C,
    as `tuple.__len__` refuses any other type: 100k rows 4 ms, against 12 ms for a loop
    asking each row. False sends the caller to its own loop (or path) for such rows."""
    kind = type(rows[0]) if rows else tuple
    if kind is not tuple and kind is not list:
        return False
    try:
        return set(map(kind.__len__, rows)) <= {width}
    except TypeError:
        return False


def normalize_ops(
    ops: object, *, all_statements: bool, check_paramstyle: Callable[[object, object, str], None] | None = None
) -> list[tuple[str, Any]]:
    """Check a `transaction` op list completely before anything runs; the ops as
    `(sql, params)` tuples, in order (params a list: executemany).

    An SQL text is scanned for transaction control once, however many ops repeat it, and
    `check_paramstyle` (the engine's) runs once per text and whether its params are empty."""
    if not isinstance(ops, (list, tuple)) or not ops:
        raise InvalidOperationError(
            "transaction: ops must be a non-empty list of (sql, params) pairs, "
            f"got {_describe(ops)}."
        )
    checked = _well_formed_ops(ops, all_statements, check_paramstyle)
    if checked is not None:
        return checked
    # Something is wrong (or unusual) about these ops: check them one by one, in order, so
    # the error names the first op at fault.
    normalized: list[tuple[str, Any]] = []
    append = normalized.append
    scanned: set[str] = set()
    styled: tuple[set[str], set[str]] = (set(), set())  # texts checked with params, without
    for i, op in enumerate(ops):
        if not isinstance(op, (tuple, list)) or len(op) != 2:
            raise InvalidOperationError(
                f"transaction op {i}: each op must be a (sql, params) pair, got {_describe(op)}."
            )
        sql, params = op
        if type(sql) is not str or sql not in scanned:
            refuse_transaction_control(sql, all_statements=all_statements, where=f"transaction op {i}")
            scanned.add(sql)
        if params is not None and not isinstance(params, (tuple, dict, list)):
            raise InvalidOperationError(
                f"transaction op {i}: params must be a tuple or dict (one statement), a list "
                f"(executemany) or None, got {type(params).__name__}."
            )
        if check_paramstyle is not None:
            seen = styled[not params]
            if sql not in seen:
                check_paramstyle(sql, params, f"transaction op {i}")
                seen.add(sql)
        append(op if type(op) is tuple else (sql, params))
    return normalized


_PARAMS_TYPES = frozenset({tuple, dict, list, type(None)})
_first, _second = operator.itemgetter(0), operator.itemgetter(1)


def _well_formed_ops(
    ops: list[Any] | tuple[Any, ...], all_statements: bool, check_paramstyle: Callable[[object, object, str], None] | None
) -> list[tuple[str, Any]] | None:
    """`normalize_ops`' result for the usual op list, checked a whole column at a time:
    every op a `(str, tuple | dict | list | None)` tuple, each distinct SQL text scanned once,
    the paramstyle checked once per text and whether its params are empty. None when any
    check would fail (or an op is a list, or a subclass): the caller then checks op by op,
    and its error names the first op at fault. 0.1 ms for 1,000 ops, a third of the loop."""
    if set(map(type, ops)) != {tuple} or set(map(len, ops)) != {2}:
        return None
    try:
        texts = set(map(_first, ops))
    except TypeError:  # a text that cannot be hashed is not a str either
        return None
    if set(map(type, texts)) != {str} or not set(map(type, map(_second, ops))) <= _PARAMS_TYPES:
        return None
    try:
        for sql in texts:
            refuse_transaction_control(sql, all_statements=all_statements, where="transaction")
        if check_paramstyle is not None:
            # The first op of each text, with params and without: what the op-by-op check sees.
            for (sql, _), params in {(sql, not params): params for sql, params in reversed(ops)}.items():
                check_paramstyle(sql, params, "transaction")
    except InvalidOperationError:
        return None
    return ops if type(ops) is list else list(ops)


def _describe(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    return type(value).__name__


# --- running on a cursor ------------------------------------------------------------


def run_many(cursor: Any, sql: str, seq_of_params: Any) -> ExecResult:
    cursor.executemany(sql, seq_of_params)
    return exec_result(cursor.rowcount)


def run_ops(cursor: Any, ops: list[tuple[str, Any]], run_one: Any) -> list[ExecResult]:
    """Run `normalize_ops`' ops in order on a cursor inside the caller's transaction."""
    results: list[ExecResult] = []
    append = results.append
    position = 0
    try:
        for position, (sql, params) in enumerate(ops):  # noqa: B007  # the failing op, in the except
            append(run_many(cursor, sql, params) if isinstance(params, list) else run_one(cursor, sql, params))
    except Exception as exc:
        raise TransactionOpError.of(exc, op_index=position, op_total=len(ops)) from exc
    return results


def first_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return rows[0] if rows else None


def first_value(rows: list[dict[str, Any]], default: Any) -> Any:
    """First column of the first row; `default` only when there is no row at all."""
    return next(iter(rows[0].values())) if rows else default


# --- results ------------------------------------------------------------------------


@functools.lru_cache(maxsize=128)
def _dict_builder(names: tuple[str, ...]) -> Callable[[list[Any]], list[dict[str, Any]]]:
    """A function making each row a dict of `names`: a dict display per row, compiled once
    per distinct column list, builds them twice as fast as `dict(zip(names, row))`. The
    names enter the code only as `repr()` literals; a later duplicate name wins, as in
    `dict(zip(...))`."""
    if not names or len(names) > 250:
        return lambda rows: [dict(zip(names, row)) for row in rows]
    values = [f"v{i}" for i in range(len(names))]
    pairs = ", ".join(f"{name!r}: {value}" for name, value in zip(names, values))
    source = f"lambda rows: [{{{pairs}}} for ({', '.join(values)},) in rows]"
    return cast("Callable[[list[Any]], list[dict[str, Any]]]", eval(source, {"__builtins__": {}}))  # noqa: S307


@dataclass(frozen=True)
class RowTable:
    """A result as the driver gave it: the column names once, the rows as tuples."""

    names: list[str]
    rows: list[Any]

    def dicts(self) -> list[dict[str, Any]]:
        return _dict_builder(tuple(self.names))(self.rows)

    def arrow(self, where: str) -> Any:
        """The rows as a `pyarrow.Table`, one column per name, each column's type inferred
        from its values (SQLite's dynamic types included: a column that mixes kinds is refused
        by name)."""
        try:
            import pyarrow as pa
        except ImportError:
            raise InvalidOperationError(
                f"{where}: query_arrow needs pyarrow on the node's machine; install the extra "
                "`pip install 'chia-prefect[arrow]'` (or pyarrow) where the flow and its Ray workers run."
            ) from None
        columns = list(zip(*self.rows)) if self.rows else [() for _ in self.names]
        arrays = []
        for name, values in zip(self.names, columns):
            try:
                arrays.append(pa.array(values))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise InvalidOperationError(
                    f"{where}: column {name!r} holds values Arrow cannot put in one typed column ({exc}); "
                    "CAST it in the SQL, or read it with query()."
                ) from None
        return pa.Table.from_arrays(arrays, names=list(self.names))


def fetch_table(cursor: Any, limit: int | None = None) -> RowTable:
    """The cursor's current result; at most `limit` rows are fetched."""
    if cursor.description is None:
        return RowTable([], [])
    names = [column[0] for column in cursor.description]
    if limit == 0:  # fetchmany(0) means "arraysize" to some drivers
        return RowTable(names, [])
    with collector_held():
        return RowTable(names, cursor.fetchall() if limit is None else cursor.fetchmany(limit))


def fetch_dicts(cursor: Any, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of the cursor's current result as dicts; at most `limit` are fetched."""
    return fetch_table(cursor, limit).dicts()


def check_limit(limit: object) -> int | None:
    if limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0):
        return limit
    raise InvalidOperationError(f"query: limit must be a non-negative int or None, got {limit!r}.")

