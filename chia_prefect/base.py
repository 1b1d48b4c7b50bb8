"""`DatabaseNode`: the abstract block every engine implements.

It owns what is engine-blind: the members every engine shares, declared with their
read/write kind and implemented once here over the engine (`engine_for()`, which gives
`atomic()` and `connect()`) and a few engine methods (`_fetch`, `_run_one`, `_run_script`),
connection options merged per call, idempotency keys, placement on Ray, and `close()`. Engines subclass it, set `engine` and `paramstyle`, and
implement those methods plus the members declared abstract here (`schema`,
`add_column_if_missing`); a missing one makes the subclass impossible to construct.

SQL text stays dialect-specific: SQLite is `qmark` (`?`, `:name`), Postgres `format`
(`%s`, `%(name)s`). Engine-blind code renders SQL per `db.paramstyle`.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from prefect.blocks.core import Block
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError

from chia_prefect import idempotency
from chia_prefect._sql import (
    ExecResult,
    ResultFields,
    RowTable,
    check_limit,
    check_rows,
    check_single_params,
    first_row,
    first_value,
    normalize_ops,
    refuse_transaction_control,
    render_qmark,
    result_fields,
    run_many,
    run_ops,
)
from chia_prefect.engines import Engine
from chia_prefect.engines.dialect import Dialect
from chia_prefect.errors import ConfigurationError, InvalidOperationError
from chia_prefect.idempotency import WriteOutcome
from chia_prefect.members import Member, abstract_member, read, reservations, write
from chia_prefect.members.binding import dict_rows, exec_results
from chia_prefect.members.placement import Placement, PlacementState, ray_options
from chia_prefect.members.scheduling import before_commit

# The catalog logos ship in the package (chia_prefect/static) and are served from the repository.
LOGO_BASE_URL = "https://raw.githubusercontent.com/chia-prefect/chia-prefect/main/chia_prefect/static"
STATIC_DIR = Path(__file__).resolve().parent / "static"

R = TypeVar("R")


def idempotency_retention_field() -> Any:
    """The retention of idempotency keys, declared by each engine after its own fields."""
    return Field(
        default=idempotency.DEFAULT_RETENTION_DAYS, ge=0, title="Idempotency key retention (days)",
        description=(
            "The maintenance flow forgets idempotency keys older than this. A write retried after "
            "its key was forgotten applies again."
        ),
    )


class DatabaseNode(Block, ABC):
    """Abstract base of the database node blocks; type engine-blind code against it.

    Every member is a Prefect task bound to the block: `db.execute(sql, params)` runs it
    and returns its value, `db.execute.submit(...)` returns a future, and `.map` and
    `.with_options` work as on any task.
    """

    model_config = ConfigDict(ignored_types=(Member,), hide_input_in_errors=True)

    # What engine-blind code asks of the engine's SQL; `engine`, `paramstyle` and
    # `multi_statement` repeat its name, paramstyle and multi_statement for callers.
    dialect: ClassVar[Dialect]
    engine: ClassVar[str] = ""
    paramstyle: ClassVar[str] = ""
    # Postgres runs several statements per call; SQLite's driver refuses them.
    multi_statement: ClassVar[bool] = False
    # Which of spawn_query_tool's engine options (dsn, schemas, allow_privileged_role)
    # this engine's tool takes.
    query_tool_options: ClassVar[frozenset[str]] = frozenset()

    # Each engine declares these fields after its own, so the UI form opens with what
    # locates the database and leaves Ray placement and connection tuning below it.
    if TYPE_CHECKING:
        placement: Placement
        max_concurrency: int | None
        connect_opts: BaseModel
        idempotency_retention_days: float

    _placement_state: PlacementState = PrivateAttr(default_factory=PlacementState)
    _tools: list[Any] = PrivateAttr(default_factory=list)
    _member_tasks: dict[str, Any] = PrivateAttr(default_factory=dict)  # bound once per node, by name

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        # Both run before Block registers the class under its slug.
        _check_member_kinds(cls)
        if "_block_type_name" not in cls.__dict__ and "_block_type_slug" not in cls.__dict__:
            # An inherited slug would make Block.load("sqlite-node/...") return the subclass.
            cls._block_type_name = cls.__name__
            cls._block_type_slug = None
        super().__pydantic_init_subclass__(**kwargs)

    # --- the member contract ----------------------------------------------------------

    @write
    def init_schema(
        self, script: str, *, connect_opts: dict[str, Any] | None = None, idempotency_key: str | None = None
    ) -> None:
        """Create the database if this engine can (SQLite: its directories and file), then run
        the DDL `script` (Postgres: as one implicit transaction)."""
        self._ensure_database()
        self._script(script, connect_opts)

    @write
    def executescript(
        self, script: str, *, connect_opts: dict[str, Any] | None = None, idempotency_key: str | None = None
    ) -> None:
        """Run a multi-statement script without parameters; it may BEGIN/COMMIT itself
        (not with an idempotency key: the script then runs in the key's transaction)."""
        self._script(script, connect_opts)

    @abstract_member("write")
    def add_column_if_missing(
        self, table: str, column: str, type_decl: str, *, connect_opts: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> bool:
        """`ALTER TABLE ... ADD COLUMN` if absent; True iff added. Input validated first."""
        raise NotImplementedError

    @abstract_member("read")
    def schema(  # type: ignore[override]  # pydantic's deprecated BaseModel.schema() classmethod
        self, *, connect_opts: dict[str, Any] | None = None
    ) -> str:
        """A readable listing of the tables and indexes."""
        raise NotImplementedError

    @write(atomic_only=True)
    def execute(
        self, sql: str, params: tuple[Any, ...] | dict[str, Any] = (), *, connect_opts: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> ExecResult:
        """Run one statement in its own committed transaction; rows it returns attached."""
        check_single_params(params, "execute")
        self._check_paramstyle(sql, params, "execute")
        refuse_transaction_control(sql, all_statements=self.multi_statement, where="execute")
        with self.atomic(connect_opts) as cur:
            return self._run_one(cur, sql, params)

    @write(flat=("seq_of_params",), atomic_only=True)
    def executemany(
        self, sql: str, seq_of_params: list[Any], *, connect_opts: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> ExecResult:
        """Run `sql` once per parameter set, in one transaction; rowcount is the total."""
        check_rows(seq_of_params, "executemany")
        self._check_paramstyle(sql, seq_of_params, "executemany")
        refuse_transaction_control(sql, all_statements=self.multi_statement, where="executemany")
        with self.atomic(connect_opts) as cur:
            return self._run_many(cur, sql, seq_of_params)

    @write(batch=("ops",), atomic_only=True)
    def transaction(
        self, ops: list[Any], *, connect_opts: dict[str, Any] | None = None, idempotency_key: str | None = None
    ) -> list[ExecResult]:
        """Run ops all or nothing: tuple/dict params execute, a list executemany, None bare."""
        engine_checks = type(self)._check_paramstyle is not DatabaseNode._check_paramstyle
        checked = normalize_ops(ops, all_statements=self.multi_statement,
                                check_paramstyle=self._check_paramstyle if engine_checks else None)
        with self.atomic(connect_opts) as cur:
            fields = self._run_ops(cur, checked)
        return exec_results(fields)

    @read
    def query(
        self, sql: str, params: tuple[Any, ...] | dict[str, Any] = (), *, limit: int | None = None, connect_opts: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Rows as dicts, at most `limit` fetched; the connection refuses writes."""
        return dict_rows(self._fetch_table(sql, params, check_limit(limit), connect_opts))

    @read
    def query_arrow(
        self, sql: str, params: tuple[Any, ...] | dict[str, Any] = (), *, limit: int | None = None, connect_opts: dict[str, Any] | None = None
    ) -> Any:
        """Rows as a `pyarrow.Table` (the `arrow` extra), at most `limit`; built on the node's
        machine, its column buffers travel whole through Ray's object store, not row by row."""
        return self._fetch_table(sql, params, check_limit(limit), connect_opts).arrow("query_arrow")

    @read
    def query_one(
        self, sql: str, params: tuple[Any, ...] | dict[str, Any] = (), *, connect_opts: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """The first row as a dict, or None."""
        return first_row(self._fetch(sql, params, 1, connect_opts))

    @read
    def query_value(
        self, sql: str, params: tuple[Any, ...] | dict[str, Any] = (), *, default: Any = None, connect_opts: dict[str, Any] | None = None
    ) -> Any:
        """First column of the first row, `default` when no row (a NULL row gives None)."""
        return first_value(self._fetch(sql, params, 1, connect_opts), default)

    @write
    def apply_migration(
        self, step: Any, *, connect_opts: dict[str, Any] | None = None, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Apply one step of `chia_prefect.migrations.migrate` on the node's machine: under
        the database's migration lock, in one transaction with its row in
        `chia_schema_versions`; `{"status": "applied" | "elsewhere", ...}`. Takes no key."""
        from chia_prefect.members.limits import run_logger
        from chia_prefect.migrations.apply import apply_step

        return apply_step(self, step, connect_opts, log=lambda line: run_logger().warning(line))

    @read
    def write_outcome(self, idempotency_key: str, *, connect_opts: dict[str, Any] | None = None) -> WriteOutcome:
        """Whether a write given `idempotency_key` committed, and the result it returned:
        the answer to a `CommitOutcomeUnknownError` (whose `idempotency_key` names the key)."""
        return idempotency.outcome(self, idempotency_key, connect_opts)

    @write
    def prune_idempotency_keys(
        self, older_than_days: float | None = None, *, connect_opts: dict[str, Any] | None = None
    ) -> int:
        """Forget idempotency keys recorded more than `older_than_days` ago (default: the
        block's `idempotency_retention_days`); how many. Run by the maintenance flow."""
        days = self.idempotency_retention_days if older_than_days is None else older_than_days
        if not isinstance(days, (int, float)) or days < 0:
            raise InvalidOperationError(f"prune_idempotency_keys: older_than_days must be >= 0, got {days!r}.")
        return idempotency.prune(self, float(days), connect_opts)

    # --- what each engine implements --------------------------------------------------

    def atomic(self, connect_opts: dict[str, Any] | BaseModel | None = None) -> AbstractContextManager[Any]:
        """One write transaction on a fresh connection: a cursor, COMMIT on success, ROLLBACK
        on error. SQLite: `BEGIN IMMEDIATE` after the node's writer queue; Postgres: a lost
        connection during COMMIT raises `CommitOutcomeUnknownError`. Inside a write given an
        idempotency key, the key's transaction: its cursor, committed with the key.

        For the write members of a subclass (`atomic_only`: its only effects are in
        this block, so on Ray it need not wait for the gate's answer before it starts):

            @write(atomic_only=True)
            def add_entry(self, name: str, *, connect_opts=None) -> None:
                with self.atomic(connect_opts) as cur:
                    cur.execute(self.render("INSERT INTO entry (name) VALUES (?)"), (name,))
        """
        keyed = idempotency.keyed_cursor(self)
        if keyed is not None:
            return nullcontext(keyed)
        return before_commit(self.engine_for(connect_opts).atomic())

    def connect(
        self, *, read_only: bool = False, connect_opts: dict[str, Any] | BaseModel | None = None
    ) -> AbstractContextManager[Any]:
        """A fresh DB-API connection with the node's options, closed on exit.

        For domain members of a subclass. Reads pass `read_only=True` to get the guard.
        A write given an idempotency key must write through `atomic()` instead, so that its
        statements commit with the key.
        """
        if not read_only and idempotency.keyed_cursor(self) is not None:
            raise ConfigurationError(
                f"{self.label}: a write given an idempotency key runs in one transaction with its key, and "
                "a connection from connect() would commit apart from it. Write through "
                "`with self.atomic(connect_opts) as cur:` in this member, or call it without a key."
            )
        return self.engine_for(connect_opts).connect(read_only=read_only)

    @abstractmethod
    def engine_for(self, connect_opts: dict[str, Any] | BaseModel | None = None) -> Engine:
        """The engine (chia_prefect.engines) for this database with the block's connection
        options and a call's overrides applied."""

    def run_keyed(self, member: str, key: str, call: Callable[[], R], arguments: Any, connect_opts: Any = None) -> R:
        """Run a write member's body under an idempotency key (see chia_prefect.idempotency)."""
        if member.rsplit(".", 1)[-1] == "init_schema":
            self._ensure_database()  # the key's table lives in the database init_schema creates
        return idempotency.run_keyed(self, member, key, call, arguments, connect_opts)

    def _script(self, script: str, connect_opts: dict[str, Any] | None) -> None:
        keyed = idempotency.keyed_cursor(self)
        if keyed is None:
            self._run_script(script, connect_opts)
            return
        if not isinstance(script, str):
            raise TypeError(f"script must be a str, got {type(script).__name__}")
        for statement in self.split_script(script):
            refuse_transaction_control(statement, all_statements=self.multi_statement,
                                       where="a script given an idempotency key (it runs in the key's transaction)")
            keyed.execute(statement)

    def _fetch(self, sql: str, params: Any, limit: int | None, connect_opts: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Rows of one read-only statement as dicts, at most `limit` of them."""
        return self._fetch_table(sql, params, limit, connect_opts).dicts()

    @abstractmethod
    def _fetch_table(self, sql: str, params: Any, limit: int | None, connect_opts: dict[str, Any] | None) -> RowTable:
        """As `_fetch`, the rows as tuples under their column names."""

    @abstractmethod
    def _run_script(self, script: str, connect_opts: dict[str, Any] | None) -> None:
        """Run a parameterless multi-statement script as the engine runs scripts."""

    @abstractmethod
    def _run_one(self, cur: Any, sql: str, params: tuple[Any, ...] | dict[str, Any] | None) -> ExecResult:
        """Run one statement on `cur`; its result."""

    def _run_last(self, cur: Any, sql: str, params: tuple[Any, ...] | dict[str, Any]) -> None:
        """Run the last statement of an `atomic()` transaction, its result unread (engine
        hook: Postgres sends it with the COMMIT)."""
        cur.execute(sql, params)

    # Run `sql` once per parameter set on `cur` (engine hook); a function, not a method.
    _run_many = staticmethod(run_many)

    def _run_ops(self, cur: Any, ops: list[tuple[str, Any]]) -> list[ResultFields]:
        """Run a `transaction`'s checked ops in order on `cur`; each result's fields (engine
        hook: one `_run_one` per op, a list of params as `executemany`)."""
        return list(map(result_fields, run_ops(cur, ops, self._run_one)))

    def _check_paramstyle(self, sql: object, params: object, where: str) -> None:
        """Refuse placeholders of another paramstyle before anything runs (engine hook)."""

    def _ensure_database(self) -> None:
        """Create the database before `init_schema`'s script, where the engine can (hook)."""

    def split_script(self, script: str) -> list[str]:
        """The statements of `script`, split as this engine's own parser splits them
        (SQLite's tokenizer, `sqlite3.complete_statement`; PostgreSQL's parser, via pglast)."""
        return self.dialect.split(script)

    def run_maintenance(self, *, backup_dir: str | None = None, keep: int = 7) -> dict[str, Any]:
        """The engine's routine maintenance, run by the `database-maintenance` flow from the
        flow's process through the node's members; what was done, by step."""
        raise NotImplementedError(f"{type(self).__name__} has no maintenance routine")

    def render(self, sql: str) -> str:
        """`sql` written with `?` placeholders, rendered for this node's `paramstyle`.

        Lets engine-blind code hold one SQL text: `db.execute(db.render("... = ?"), (x,))`.
        """
        return render_qmark(sql, self.paramstyle)

    def spawn_query_tool(
        self,
        name: str,
        *,
        read_write: bool = False,
        row_limit: int = 100,
        cell_char_limit: int = 4096,
        total_char_limit: int = 32768,
        time_limit_s: float = 10.0,
        dsn: str | SecretStr | None = None,
        schemas: tuple[str, ...] | None = None,
        allow_privileged_role: bool = False,
    ) -> Any:
        """Serve `query(sql)` and `schema()` (and `execute(sql)` if `read_write`) over MCP.

        Returns a `QueryTool` with the server's `url` and the bearer `token` every request
        must carry (`tool.headers`); on Ray the server is an actor placed like the members,
        else a thread on loopback. `close()` stops it, and so does the end of the flow run
        that spawned it. One signature for every engine; the last three options are the
        ones an engine may not take (`query_tool_options` lists them; Postgres takes all:
        `dsn=` for a SELECT-only role, `schemas=`, `allow_privileged_role=`), and giving
        one to an engine that does not raises `ConfigurationError` before anything starts.
        """
        from chia_prefect.query_tool import Caps, spawn

        given = {key: value for key, value in (("dsn", dsn), ("schemas", schemas),
                                               ("allow_privileged_role", allow_privileged_role))
                 if value is not None and value is not False}
        refused = [key for key in given if key not in self.query_tool_options]
        if refused:
            takes = ", ".join(f"{key}=" for key in sorted(self.query_tool_options))
            raise ConfigurationError(
                f"spawn_query_tool on {self.label}: {', '.join(f'{key}=' for key in refused)} is not an "
                f"option of a {type(self).__name__}'s tool ("
                + (f"it takes {takes}" if takes else "dsn=, schemas= and allow_privileged_role= are PostgresNode's")
                + "). Leave it out; nothing was started."
            )
        caps = Caps(row_limit, cell_char_limit, total_char_limit, time_limit_s)
        tool = spawn(self, self._query_tool_session(caps, **given), name, read_write)
        self._tools.append(tool)
        # Inside a flow run the tool is stopped when the run ends, close() or not.
        reservations.on_run_end(tool.stop)
        return tool

    @abstractmethod
    def _query_tool_session(self, caps: Any, **engine_options: Any) -> Any:
        """The engine's query-tool session (`query`, `schema`, `execute` returning text)."""

    # --- options, placement, lifetime -------------------------------------------------

    def resolve_connect_opts(self, connect_opts: dict[str, Any] | BaseModel | None = None) -> Any:
        """The block's `connect_opts` with a call's overrides applied and validated."""
        if connect_opts is None:
            return self.connect_opts
        if isinstance(connect_opts, BaseModel):
            connect_opts = connect_opts.model_dump(exclude_unset=True)
        model = type(self.connect_opts)
        try:
            return model.model_validate({**self.connect_opts.model_dump(), **connect_opts})
        except ValidationError as exc:
            raise ConfigurationError(
                f"{self.label}: invalid connect_opts: {_first_error(exc)}. "
                f"Known keys: {', '.join(model.model_fields)}."
            ) from None

    def use_placement_group(self, placement_group: Any, bundle_index: int = 0) -> None:
        """Run members in a bundle of a placement group created elsewhere (not released by close)."""
        self._placement_state.use(placement_group, bundle_index)

    # --- what the member machinery reads (chia_prefect.members.MemberHost) --------------

    def member_ray_options(self) -> dict[str, Any]:
        """Ray options for a member of this node (reserving its placement group on first use)."""
        return ray_options(self.placement, self._placement_state, self.label, self._reservation_key())

    @property
    def placement_token(self) -> str:
        """Names this node's holds on reservations (placement groups) in this process."""
        return self._placement_state.token

    @property
    def bound_members(self) -> dict[str, Any]:
        """The node's members bound as tasks, by name (built once per node)."""
        return self._member_tasks

    def _reservation_key(self) -> tuple[Any, ...]:
        """What identifies the database: nodes with the same key and placement share one
        placement group. Engines narrow it (SQLite: the file)."""
        return (self.engine, self.label)

    def limit_identity(self) -> str:
        """What names an unsaved node's concurrency limit: its database, never a secret."""
        return self.label

    @property
    def concurrency_limit_name(self) -> str:
        """The Prefect global concurrency limit that keeps `max_concurrency`."""
        saved = self._block_document_name
        if saved:
            name = f"chia-prefect {self.get_block_type_slug()} {saved}"
        else:
            identity = self.limit_identity()
            digest = hashlib.sha1(identity.encode()).hexdigest()[:8]
            tail = identity.rstrip("/").rsplit("/", 1)[-1]
            name = f"chia-prefect {self.engine} {tail[-40:] or identity[:40]} {digest}"
        return re.sub(r"[/%&<>]", "_", name)  # characters Prefect refuses in names

    @property
    def reserved_placement_group(self) -> Any:
        """The placement group members run in, once one was reserved or handed in."""
        return self._placement_state.placement_group

    @property
    def label(self) -> str:
        """How errors name this node: its block name when saved."""
        name = getattr(self, "_block_document_name", None)
        return f"{self.get_block_type_name()} '{name}'" if name else self.get_block_type_name()

    def close(self) -> None:
        """Stop the query tools this node spawned, then release its hold on the placement
        group it reserved (removed once no node of this process holds it; a group handed
        in is never removed): a tool's actor may live in that group. Idempotent."""
        tools, self._tools = self._tools, []
        for tool in tools:
            tool.stop()
        self._placement_state.release()

    def __enter__(self) -> DatabaseNode:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Validate saved block data; a saved block that fails says what to fix.

        Prefect's `Block.load("slug/name")` builds the node through here; its own message
        would advise loading with `validate=False`, which gives a node that cannot work.
        """
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err.get('loc', ())) or 'value'}: "
                f"{str(err.get('msg', '')).removeprefix('Value error, ').rstrip('.')}"
                for err in exc.errors()
            )
            name = _loading_block_name()
            which = f"The saved {cls.get_block_type_name()} block {name!r}" if name else (
                f"A saved {cls.get_block_type_name()} block")
            raise ConfigurationError(
                f"{which} is not valid: {problems}. Fix it in the "
                f"Prefect UI (Blocks, {cls.get_block_type_slug()}) or save it again from code."
            ) from None

    def __getstate__(self) -> dict[Any, Any]:
        # Workers get configuration only: placement is the driver's business.
        state = super().__getstate__()
        private = dict(state.get("__pydantic_private__") or {})
        private["_placement_state"] = PlacementState()
        private["_tools"] = []
        private["_member_tasks"] = {}
        return {**state, "__pydantic_private__": private}


def _check_member_kinds(cls: type) -> None:
    declared = _members(DatabaseNode)
    for name, member in _members(cls).items():
        if name in declared and declared[name].kind != member.kind:
            raise TypeError(
                f"{cls.__name__}.{name} is declared {member.kind}, but DatabaseNode "
                f"declares it {declared[name].kind}; keep the kind, it fixes the retry policy."
            )


def _members(cls: type) -> dict[str, Member[Any, Any]]:
    found: dict[str, Member[Any, Any]] = {}
    for klass in reversed(cls.__mro__):
        found.update({k: v for k, v in vars(klass).items() if isinstance(v, Member)})
    return found


def _loading_block_name() -> str | None:
    """The name of the block document Prefect is loading, if a caller a few frames up holds
    it (`Block._from_block_document`): Prefect does not pass it to `model_validate`."""
    import sys

    frame: FrameType | None = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return None
        document = frame.f_locals.get("block_document")
        name = getattr(document, "name", None)
        if isinstance(name, str):
            return name
        frame = frame.f_back
    return None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "value"
    return f"{where}: {err.get('msg')}"


def member_names(node_type: type[DatabaseNode]) -> list[str]:
    """Names of every member of a node type, built-in and added by subclasses."""
    return sorted(_members(node_type))


__all__ = ["DatabaseNode", "ExecResult", "member_names"]
