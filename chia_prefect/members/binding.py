"""Members: node operations declared once as read or write, bound as Prefect tasks.

    class AlignmentDBNode(SQLiteNode):
        @read
        def load_entry(self, entry_id: str, *, connect_opts=None) -> dict | None:
            with self.connect(read_only=True, connect_opts=connect_opts) as conn:
                ...

`db.load_entry` is then a `MemberTask`: a `prefect.Task` named `sqlite.load_entry` with
the node bound as its first argument. The declaration fixes the policy:

- write: Prefect `retries=0`, Ray `max_retries=0`, `cache_policy=NO_CACHE`. A worker that
  dies after COMMIT must not be replayed. `with_options(retries=N)` opts back in on both.
- read: `NO_CACHE`; Ray may replay it (reads are idempotent); opened read-only.

Inside a flow run on `RayTaskRunner`, a member's task engine runs in the flow's process and
its body goes to Ray, where the node's placement says (`chia_prefect.members.remote`).
"""

from __future__ import annotations

import functools
import inspect
import marshal
import pickle
from collections.abc import Callable, Iterator
from itertools import chain
from typing import TYPE_CHECKING, Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, cast, overload

from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext, TaskRunContext
from prefect.futures import PrefectFuture, PrefectFutureList
from prefect.utilities.annotations import quote, unmapped
from prefect.utilities.callables import get_call_parameters
from prefect_ray.task_runners import RayTaskRunner

from chia_prefect._sql import (
    ExecResult,
    FlatRows,
    ResultFields,
    RowTable,
    collector_held,
    exec_results_from_marshal,
    exec_results_of,
    result_fields,
)
from chia_prefect.errors import InvalidOperationError
from chia_prefect.idempotency import AUTO, KEY_PARAMETER, auto_key, check_key
from chia_prefect.members import remote
from chia_prefect.members.limits import ensure_limit, member_slot
from chia_prefect.members.limits import run_logger as member_run_logger
from chia_prefect.members.scheduling import NOTHING_EXECUTED, answer_before_commit
from chia_prefect.runner import member_client, result_leaves_pickled, unroute_events

if TYPE_CHECKING:
    from chia_prefect.members.host import MemberHost

Kind = Literal["read", "write"]
P = ParamSpec("P")
R = TypeVar("R")


# The marshal format of batches and results: 2, which writes no back-references. Formats 3
# and 4 (the default) enter every object that has other references in a table as they
# write it: 100k rows whose values were also held elsewhere (a list of names, a frame's
# column) took 44-55 ms to write in format 4 and 9-11 ms in format 2 (Python 3.11). For
# values held by the rows alone, format 4 wrote faster (6.5 ms against 10.3) and read
# slower (17.8 ms against 12.2). Format 2 takes 20% more bytes; shared objects travel once
# per use.
MARSHAL_FORMAT = 2


class Batch:
    """An opaque box for a large argument (rows, ops).

    Prefect walks every list, tuple and dict in task parameters looking for futures (40-100x
    the cost of the insert for 100k rows). It does not look inside an arbitrary object, so
    boxing the argument hands it to the worker in one piece.
    """

    __slots__ = ("_value", "flat", "packed", "stream", "width")

    def __init__(self, value: Any, packed: Any = None, stream: bool = False, flat: bool = False,
                 width: int = 0) -> None:
        self._value, self.packed, self.stream, self.flat, self.width = value, packed, stream, flat, width

    @property
    def value(self) -> Any:
        """The boxed argument (unpacked on first use if it arrived marshalled)."""
        if self.packed is not None:
            self._value, self.packed = materialized(self.unpacked()), None
        return self._value

    def __reduce_ex__(self, protocol: int) -> tuple[Any, tuple[Any, ...]]:  # type: ignore[override]
        # Rows of plain values (int, float, str, bytes, None, tuples, lists, dicts) travel as
        # marshal bytes: 8x faster to write than pickle for 1M rows. With pickle protocol 5
        # they go out of band, so Ray hands the worker its object-store copy without another.
        # Anything else (dates, Decimal, namedtuples) makes marshal refuse, and then pickle
        # keeps the exact types.
        if self.packed is not None:  # passed on again as it arrived (an object-store buffer below protocol 5: bytes)
            packed = self.packed if protocol >= 5 or type(self.packed) is not pickle.PickleBuffer else bytes(self.packed)
            if self.width:
                return (_batch_from_flat, (packed, self.width))
            return (_batch_from_marshal, (packed,))
        value = self._value
        width = _flat_width(value) if self.flat else 0
        try:
            if width:  # rows of one width: their values in one flat list (`FlatRows`)
                flat = marshal.dumps([*chain.from_iterable(value)], MARSHAL_FORMAT)
                return (_batch_from_flat, (pickle.PickleBuffer(flat) if protocol >= 5 else flat, width))
            if self.stream and len(value) > STREAM_CHUNK_ROWS:
                chunks = [marshal.dumps(value[start:start + STREAM_CHUNK_ROWS], MARSHAL_FORMAT)
                          for start in range(0, len(value), STREAM_CHUNK_ROWS)]
                return (_stream_from_marshal, (tuple(map(pickle.PickleBuffer, chunks)) if protocol >= 5
                                               else tuple(chunks), len(value)))
            payload = marshal.dumps(value, MARSHAL_FORMAT)
        except ValueError:
            return (Batch, (value,))
        return (_batch_from_marshal, (pickle.PickleBuffer(payload) if protocol >= 5 else payload,))

    def unpacked(self) -> Any:
        """The value; a batch that arrived marshalled is unpacked here, in the member's body
        (`Member.run_body`), and not kept. A streamed one stays a `RowStream`, unpacked a
        chunk at a time as the body reads it."""
        if self.packed is None:
            return self._value
        if self.width:
            return FlatRows(marshal.loads(self.packed), self.width)
        return self.packed if isinstance(self.packed, RowStream) else marshal.loads(self.packed)

    def __repr__(self) -> str:
        size = len(self._value) if hasattr(self._value, "__len__") else "?"
        return f"Batch(<{size} items>)"


def _batch_from_marshal(payload: Any) -> Batch:
    # Kept marshalled (the object store's buffer) until the body unpacks it.
    return Batch(None, payload)


def _batch_from_flat(payload: Any, width: int) -> Batch:
    return Batch(None, payload, width=width)


# A batch of fewer rows goes as tuples: flattening pays off on large ones.
FLAT_MIN_ROWS = 1_000


def _flat_width(value: Any) -> int:
    """The width of `value`'s rows if it may go flat: a list of at least FLAT_MIN_ROWS rows,
    every one a plain tuple (not a namedtuple, which keeps its type by pickle) of the same
    non-zero width; 0 otherwise. Two passes in C (100k rows: 3 ms). The driver checks and
    flattens (100k rows: 6 ms more than marshalling the tuples); the worker then unpacks,
    checks, slices and frees less (14 ms less)."""
    if type(value) is not list or len(value) < FLAT_MIN_ROWS or set(map(type, value)) != {tuple}:
        return 0
    widths = set(map(len, value))
    return widths.pop() if len(widths) == 1 else 0


# Rows per marshalled chunk of a streamed batch: the body starts on the first chunk after
# unpacking 10k rows (about 1.5 ms), not all of them.
STREAM_CHUNK_ROWS = 10_000


class RowStream:
    """A streamed batch's rows on the worker (`write(stream=...)`): marshalled chunks,
    unpacked one at a time as they are read, so unpacking the next overlaps what the server
    does with the last (`copy_rows` of 100k rows unpacked them for 18 ms before the COPY
    started). `len()` is the number of rows."""

    __slots__ = ("chunks", "total")

    def __init__(self, chunks: tuple[Any, ...], total: int) -> None:
        self.chunks, self.total = chunks, total

    def __len__(self) -> int:
        return self.total

    def lists(self) -> Iterator[list[Any]]:
        """The rows, a chunk's list at a time."""
        for chunk in self.chunks:
            yield marshal.loads(chunk)

    def __iter__(self) -> Iterator[Any]:
        for rows in self.lists():
            yield from rows

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (RowStream, (tuple(bytes(chunk) for chunk in self.chunks), self.total))


def _stream_from_marshal(chunks: tuple[Any, ...], total: int) -> Batch:
    return Batch(None, RowStream(chunks, total))


def materialized(value: Any) -> Any:
    """A `RowStream` or `FlatRows` as its list of rows; anything else as it is."""
    return list(value) if isinstance(value, (RowStream, FlatRows)) else value


def _unbox(value: Any) -> Any:
    return value.unpacked() if isinstance(value, Batch) else value


# A member's result on its way from a Ray worker to the driver.
#
# After a task returns, Prefect's task engine links the result and each of its elements to
# the task run (`link_state_to_result`), so that passing one to another task records the
# dependency. On a Ray worker that record lives in a copy of the flow run's context that is
# dropped when the task ends, and for 100k rows it cost more than the query (0.3 s of 0.7).
# The engine does not look inside these boxes, and they unpickle as the plain result: only
# a result that leaves the process pickled (`result_leaves_pickled`) is boxed.


class Shipped:
    """A list result: pickled as the list itself."""

    __slots__ = ("value",)

    def __init__(self, value: list[Any]) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_as_is, (self.value,))


class ShippedRows:
    """`query`'s rows: the column names once and the rows as tuples, marshalled (out of
    band) when their values allow; unpickled as the list of dicts. Building the dicts on the
    worker and pickling each one's keys cost more than the driver building them."""

    __slots__ = ("table",)

    def __init__(self, table: RowTable) -> None:
        self.table = table

    def __reduce_ex__(self, protocol: int) -> tuple[Any, tuple[Any, ...]]:  # type: ignore[override]
        try:
            payload = marshal.dumps(self.table.rows, MARSHAL_FORMAT)
        except ValueError:  # Decimal, datetime, ...: pickle keeps the exact types
            return (_dicts, (self.table.names, self.table.rows))
        return (_dicts_from_marshal, (self.table.names, pickle.PickleBuffer(payload) if protocol >= 5 else payload))


class ShippedResults:
    """A `transaction`'s results as their fields (`ResultFields`), marshalled: unpickled as
    the list of `ExecResult`s, on the driver or from a keyed write's record. Pickling a
    thousand dataclass instances cost more than the ops took, and building them on the
    worker as well as on the driver cost a third of it."""

    __slots__ = ("fields",)

    def __init__(self, fields: list[ResultFields]) -> None:
        self.fields = fields

    def __reduce_ex__(self, protocol: int) -> tuple[Any, tuple[Any, ...]]:  # type: ignore[override]
        try:
            payload = marshal.dumps(self.fields, MARSHAL_FORMAT)
        except ValueError:  # rows holding values marshal cannot take: pickle keeps their types
            return (exec_results_of, (self.fields,))
        return (exec_results_from_marshal, (payload,))


def exec_results(fields: list[ResultFields]) -> list[ExecResult]:
    """`transaction`'s result from its ops' fields: `ExecResult`s built where they are
    unpickled if they leave this process pickled (a keyed write's record included), here
    otherwise."""
    if len(fields) > 1 and _may_box():
        return cast("list[ExecResult]", ShippedResults(fields))
    return exec_results_of(fields)


def _as_is(value: Any) -> Any:
    return value


def _dicts(names: list[str], rows: list[Any]) -> list[dict[str, Any]]:
    return RowTable(names, rows).dicts()


def _dicts_from_marshal(names: list[str], payload: Any) -> list[dict[str, Any]]:
    with collector_held():  # 100k new dicts, none of them garbage yet
        return RowTable(names, marshal.loads(payload)).dicts()


def _may_box() -> bool:
    """Whether this member's result may leave in a box: it leaves the process pickled, and
    so does the copy Prefect persists if the task run keeps one (a JSON result serializer
    could not write the box). A body on Ray returns to the driver, which persists nothing
    of it."""
    if remote.in_body():
        return True
    if not result_leaves_pickled():
        return False
    ctx = TaskRunContext.get()
    return ctx is None or not ctx.persist_result or _pickles(ctx.result_store.serializer)


def _pickles(serializer: Any) -> bool:
    from prefect.serializers import PickleSerializer

    inner = getattr(serializer, "serializer", None)  # a CompressedSerializer wraps another
    return isinstance(serializer, PickleSerializer) or (inner is not None and _pickles(inner))


def _ship(result: Any) -> Any:
    """A member's result as it leaves: a list goes boxed if it may."""
    if type(result) is list and len(result) > 1 and _may_box():
        if all(type(item) is ExecResult for item in result):
            return ShippedResults(list(map(result_fields, result)))
        return Shipped(result)
    return result


def dict_rows(table: RowTable) -> list[dict[str, Any]]:
    """`query`'s result: the rows as dicts, built on the driver if they may leave boxed."""
    if len(table.rows) > 1 and _may_box():
        return cast("list[dict[str, Any]]", ShippedRows(table))
    return table.dicts()


class Member(Generic[P, R]):
    """A node operation, declared with `@read` or `@write`.

    Typed as the method it wraps: on an instance, `db.execute` is a `MemberTask[P, R]` whose
    call returns `R` and whose `.submit` returns a `PrefectFuture[R]`.
    """

    def __init__(self, fn: Callable[Concatenate[Any, P], R], kind: Kind, batch: tuple[str, ...] = (),
                 abstract: bool = False, stream: tuple[str, ...] = (), flat: tuple[str, ...] = (),
                 atomic_only: bool = False):
        if kind not in ("read", "write"):
            raise ValueError(f"member kind must be 'read' or 'write', got {kind!r}")
        self.fn, self.kind, self.batch, self.stream, self.flat = fn, kind, (*batch, *stream, *flat), stream, flat
        self.atomic_only = atomic_only
        self.name = fn.__name__
        self.signature = _with_key(inspect.signature(fn)) if kind == "write" else inspect.signature(fn)
        self.__doc__ = fn.__doc__
        self.__isabstractmethod__ = abstract
        self.declares_key = KEY_PARAMETER in inspect.signature(fn).parameters
        self.runner = _make_runner(self)
        self.runner.__signature__ = self.signature  # type: ignore[attr-defined]  # what Prefect binds

    def run_body(self, node: Any, args: tuple[Any, ...], kwargs: dict[str, Any], key: str | None,
                 started: Callable[[str], None] | None = None) -> Any:
        """The member's own work where it runs (`args` without the node): its boxed
        arguments opened, and with an idempotency key (already resolved) run once for it.
        `started` (a write's answer from the gate, on Ray) is called once the arguments are
        open and before the body runs, or for an `atomic_only` write before its COMMIT; it
        raises if the write must not run."""
        if any(isinstance(v, Batch) and v.packed is not None for v in (*args, *kwargs.values())):
            # The collector is held off while the unpacked rows live (a 1M-row `executemany`
            # set off 84 ms of collections walking them); they are freed by their reference
            # counts when the body's frame ends, inside the block, so nothing is left to catch.
            with collector_held():
                return self._run_unboxed(node, args, kwargs, key, started)
        return self._run_unboxed(node, args, kwargs, key, started)

    def _run_unboxed(self, node: Any, args: tuple[Any, ...], kwargs: dict[str, Any], key: str | None,
                     started: Callable[[str], None] | None) -> Any:
        args = tuple(map(_unbox, args))
        kwargs = {k: _unbox(v) for k, v in kwargs.items()}
        if started is not None and self.atomic_only:
            with answer_before_commit(started):
                return self._run_opened(node, args, kwargs, key)
        if started is not None:
            started(NOTHING_EXECUTED)
        return self._run_opened(node, args, kwargs, key)

    def _run_opened(self, node: Any, args: tuple[Any, ...], kwargs: dict[str, Any], key: str | None) -> Any:
        if key is None:
            return _ship(self.fn(node, *args, **kwargs))
        # A keyed write records its arguments' digest first: a streamed batch is read whole.
        args = tuple(map(materialized, args))
        kwargs = {k: materialized(v) for k, v in kwargs.items()}
        if self.declares_key:
            kwargs[KEY_PARAMETER] = key
        arguments = (args, {k: v for k, v in kwargs.items() if k not in ("connect_opts", KEY_PARAMETER)})
        return _ship(node.run_keyed(f"{node.engine}.{self.fn.__name__}", key, lambda: self.fn(node, *args, **kwargs),
                                    arguments, kwargs.get("connect_opts")))

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, node: None, owner: type | None = None) -> Member[P, R]: ...

    @overload
    def __get__(self, node: MemberHost, owner: type | None = None) -> MemberTask[P, R]: ...

    def __get__(self, node: MemberHost | None, owner: type | None = None) -> Any:
        if node is None:
            return self
        # Building a Prefect task costs ~0.3 ms (it reads the function's source): once per
        # node. A copy of the node (model_copy) shares the dict but not the binding.
        cache = node.bound_members
        task = cache.get(self.name)
        if task is None or task._node is not node or task._member is not self:
            task = cache[self.name] = MemberTask.bind(node, self)
        return task

    def __repr__(self) -> str:
        return f"<{self.kind} member {self.name}>"


def _with_key(signature: inspect.Signature) -> inspect.Signature:
    """A write member's signature with the `idempotency_key` keyword every write takes."""
    if KEY_PARAMETER in signature.parameters:
        return signature
    parameters = list(signature.parameters.values())
    at = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
    parameters.insert(at, inspect.Parameter(KEY_PARAMETER, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation="str | None"))
    return signature.replace(parameters=parameters)


def _make_runner(member: Member[Any, Any]) -> Callable[..., Any]:
    """The task's function: the member's body here, or on Ray when its task run was routed
    there (`remote`). The idempotency key is resolved here, in the task run."""
    fn, kind = member.fn, member.kind

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        key = kwargs.pop(KEY_PARAMETER, None) if kind == "write" else None
        node, args = args[0], args[1:]
        if key is not None:
            key = _resolve_key(key, f"{node.engine}.{fn.__name__}")
        route = remote.current_route()
        if route is not None:
            return remote.run_on_ray(route, node, member.name, kind, args, kwargs, key)
        with member_slot(node, fn.__name__):
            return member.run_body(node, args, kwargs, key)

    return run


def member_logger() -> Any:
    """The logger of the member being run, for your own members' bodies: its lines show on
    the member's task run. A body on Ray has no Prefect run context (Prefect's
    `get_run_logger()` fails there); its lines go back with its outcome and the driver logs
    them on the task run. Outside any run, the `chia_prefect` logger."""
    return member_run_logger()


def _resolve_key(key: object, member: str) -> str:
    """The key itself; "auto": one derived from the task run and the member."""
    key = check_key(key, member)
    if key != AUTO:
        return key
    task_ctx = TaskRunContext.get()
    if task_ctx is None:
        raise InvalidOperationError(
            f'{member}: idempotency_key="auto" derives the key from the Prefect task run, and this call runs '
            "outside one; give your own key.")
    return auto_key(task_ctx.task_run.id, member)


def _declare(kind: Kind, fn: Callable[..., Any] | None, batch: tuple[str, ...], abstract: bool,
             stream: tuple[str, ...] = (), flat: tuple[str, ...] = (), atomic_only: bool = False) -> Any:
    if fn is None:
        return lambda f: Member(f, kind, batch, abstract, stream, flat, atomic_only)
    return Member(fn, kind, batch, abstract, stream, flat, atomic_only)


@overload
def read(fn: Callable[Concatenate[Any, P], R], *, batch: tuple[str, ...] = ()) -> Member[P, R]: ...


@overload
def read(
    fn: None = None, *, batch: tuple[str, ...] = ()
) -> Callable[[Callable[Concatenate[Any, P], R]], Member[P, R]]: ...


def read(fn: Callable[..., Any] | None = None, *, batch: tuple[str, ...] = ()) -> Any:
    """Declare a read member: read-only connection, may be retried, never cached."""
    return _declare("read", fn, batch, abstract=False)


@overload
def write(
    fn: Callable[Concatenate[Any, P], R], *, batch: tuple[str, ...] = (), stream: tuple[str, ...] = (),
    flat: tuple[str, ...] = (), atomic_only: bool = False,
) -> Member[P, R]: ...


@overload
def write(
    fn: None = None, *, batch: tuple[str, ...] = (), stream: tuple[str, ...] = (), flat: tuple[str, ...] = (),
    atomic_only: bool = False,
) -> Callable[[Callable[Concatenate[Any, P], R]], Member[P, R]]: ...


def write(fn: Callable[..., Any] | None = None, *, batch: tuple[str, ...] = (), stream: tuple[str, ...] = (),
          flat: tuple[str, ...] = (), atomic_only: bool = False) -> Any:
    """Declare a write member: never retried or replayed by Prefect or Ray, never cached.

    `batch` names parameters that may be large (rows, ops); they travel to the worker
    boxed, unseen by Prefect's parameter walk. A future passed there is not resolved.
    `stream` names batch parameters the body reads once, in order: on a Ray worker a large
    one arrives as a `RowStream`, unpacked a chunk at a time as the body iterates it (a
    keyed call, and a call in the caller's process, get the list).
    `flat` names batch parameters the body takes as a sequence of rows: on a Ray worker a
    list of 1,000 or more plain tuples of one width arrives as `FlatRows` (the same rows over one
    flat list of their values), cheaper to unpack and free (a keyed call, and a call in the
    caller's process, get the list).
    `atomic_only` says the body changes nothing outside `self.atomic(...)` blocks (no
    files, no other systems, no statements on a connection of its own): on a Ray worker it
    then runs its statements while the answer to "did the flow give up on this write?" is
    on its way, and waits for it just before COMMIT (a write given up on rolls back). Without
    it, the body waits for the answer before it starts.
    """
    return _declare("write", fn, batch, abstract=False, stream=stream, flat=flat, atomic_only=atomic_only)


def abstract_member(
    kind: Kind, batch: tuple[str, ...] = ()
) -> Callable[[Callable[Concatenate[Any, P], R]], Member[P, R]]:
    """Declare a member every engine must implement (used by `DatabaseNode`)."""
    return lambda fn: Member(fn, kind, batch, abstract=True)


def on_ray_runner() -> bool:
    """True in a flow run (not inside a task) whose task runner is `RayTaskRunner`."""
    flow_ctx = FlowRunContext.get()
    if flow_ctx is None or TaskRunContext.get() is not None:
        return False
    return isinstance(flow_ctx.task_runner, RayTaskRunner)


class MemberTask(Task[P, R]):
    """A member bound to one node: a Prefect task whose first argument is the node.

    For type checkers it takes the member's own parameters (without `self`): calling it
    returns `R`, `.submit` a `PrefectFuture[R]`, `.map` a `PrefectFutureList[R]`.
    """

    _node: MemberHost
    # `_member` is set in _attach: declared in the class body, a type checker would read
    # the Member (a descriptor) as bound to this task.

    @classmethod
    def bind(cls, node: MemberHost, member: Member[P, R]) -> MemberTask[P, R]:
        task = cls(
            fn=member.runner,
            name=f"{node.engine}.{member.name}",
            description=inspect.cleandoc(member.fn.__doc__ or "").split("\n\n")[0] or None,
            retries=0,
            cache_policy=NO_CACHE,
        )
        task._attach(node, member)
        return task

    def _attach(self, node: MemberHost, member: Member[P, R]) -> None:
        self._node = node
        self._member: Member[P, R] = member
        # Task keys default to the wrapper's name and code, the same for every member.
        self.task_key = f"{node.engine}.{member.name}"

    @property
    def node(self) -> MemberHost:
        return self._node

    @property
    def kind(self) -> Kind:
        return self._member.kind

    def with_options(self, **options: Any) -> MemberTask[P, R]:
        """As `Task.with_options`; on a write, `retries=N` also allows N Ray replays."""
        task = cast("MemberTask[P, R]", super().with_options(**options))
        # Task.with_options builds a plain Task; keep the binding and the routing.
        task.__class__ = type(self)
        task._attach(self._node, self._member)
        return task

    if TYPE_CHECKING:
        # What a caller sees: the member's parameters; the runtime versions below take the
        # control keywords (return_state, wait_for, ...) as Task's do.
        def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...  # type: ignore[override]

        def submit(self, *args: P.args, **kwargs: P.kwargs) -> PrefectFuture[R]: ...  # type: ignore[override]

        def map(self, *args: Any, **kwargs: Any) -> PrefectFutureList[R]: ...  # type: ignore[override]

    else:
        def __call__(self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> Any:
            # The task engine runs here, in the caller's thread; on a Ray runner the body
            # goes to Ray where the node's placement says.
            args, kwargs = self._bind_args(args, kwargs)
            route = self._route()
            events = remote.route_events() if route is not None else None
            try:
                with member_client(), remote.routed(route):
                    value = super().__call__(*args, return_state=return_state, wait_for=wait_for, **kwargs)
            finally:
                unroute_events(events)
            if route is not None and not return_state and isinstance(value, State) and value.is_crashed():
                # The body's worker died (`remote.run_on_ray` returned the Crashed state, which
                # Prefect hands back as the call's value): raise what a future would.
                raise remote.crash_error(value)
            return value

        def submit(self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> Any:
            args, kwargs = self._bind_args(args, kwargs)
            route = self._route()
            if route is None:
                return super().submit(*args, return_state=return_state, wait_for=wait_for, **kwargs)
            pool = remote.driver_pool(_flow_runner())
            with remote.routed(route):  # the pool's thread runs in a copy of this context
                parameters = get_call_parameters(self.fn, args, kwargs)
                future = remote.submitted_with_events(lambda: pool.submit(self, parameters, wait_for))
            if return_state:
                future.wait()
                return future.state
            return future

        def map(self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any) -> Any:
            route = self._route()
            if route is None:
                return super().map(unmapped(self._node), *args, return_state=return_state, wait_for=wait_for,
                                   **kwargs)
            parameters = get_call_parameters(self.fn, (unmapped(self._node), *args), kwargs, apply_defaults=False)
            pool = remote.driver_pool(_flow_runner())
            with remote.routed(route):
                futures = remote.submitted_with_events(lambda: pool.map(self, parameters, wait_for))
            if return_state:
                states = []
                for future in futures:
                    future.wait()
                    states.append(future.state)
                return states
            return futures

    def _bind_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Prepend the node and box the member's batch arguments. The node goes quoted:
        Prefect's engine would otherwise walk each of its fields looking for futures, twice
        per task run (1.5 ms of a 15 ms member)."""
        try:
            bound = self._member.signature.bind(quote(self._node), *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}{self._member.signature}: {exc}") from None
        for name in self._member.batch:
            value = bound.arguments.get(name)
            if isinstance(value, (list, tuple)):
                bound.arguments[name] = Batch(value, stream=name in self._member.stream,
                                              flat=name in self._member.flat)
        return bound.args, bound.kwargs

    def _route(self) -> remote.Route | None:
        """How this member's body reaches Ray from a flow run on `RayTaskRunner` (None
        elsewhere: it runs in the calling process). The node's placement group is reserved,
        and its concurrency limit made, here, before the task run starts."""
        if not on_ray_runner():
            return None
        options = self._node.member_ray_options()
        if self._node.max_concurrency:
            ensure_limit(self._node.concurrency_limit_name, self._node.max_concurrency)
        if self._member.kind == "write":
            # Ray replays a task whose worker died; a committed write would apply twice.
            options["max_retries"] = self.retries or 0
        options["name"] = self.name
        return remote.Route(options, self._node.placement.schedule_timeout_s, f"{self.name} on {self._node.label}")


def _flow_runner() -> Any:
    flow_ctx = FlowRunContext.get()
    assert flow_ctx is not None  # on_ray_runner() said so
    return flow_ctx.task_runner


remote.install()
