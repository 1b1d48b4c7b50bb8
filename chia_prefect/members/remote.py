"""A member in a flow run on Ray: Prefect's task engine on the driver, its body on Ray.

A member called or submitted in a flow run whose task runner is prefect-ray's
`RayTaskRunner` (or a subclass) is a Prefect task run in the flow's process, as on the
thread runner: states, events, retries, results and logs are Prefect's own. Its body (the
member's SQL, on the node's connection) is one Ray call, placed where the node's placement
says. So a member costs Prefect's task engine plus one Ray round trip, not a whole task
engine started on a Ray worker.

- `.submit` and `.map` run their task engines in a thread pool of the flow run, closed (after
  its members finish) as the runner exits; a call runs it in the calling thread.
- The body's Ray options come from the node (placement group, node pin, CPUs); a write is
  never replayed by Ray (`max_retries=0`) and never retried by Prefect unless the task's
  `retries` says so.
- The node's `max_concurrency` slot is held on the driver around the Ray call.
- A member Ray cannot schedule within `schedule_timeout_s` is cancelled and fails with
  `SchedulingTimeoutError` (`scheduling`); a worker that dies under it leaves its task run
  Crashed and its future raising Ray's error.
- A member's future passed to a task that goes to Ray is resolved on the driver first.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.task_runners import ThreadPoolTaskRunner

    from chia_prefect.members.host import MemberHost


class Route:
    """How the member being run reaches Ray: its Ray options and its bound on the queue."""

    __slots__ = ("options", "timeout_s", "what")

    def __init__(self, options: dict[str, Any], timeout_s: float | None, what: str) -> None:
        self.options, self.timeout_s, self.what = options, timeout_s, what


# Set by the member around its task run on the driver; read by the task's function.
_ROUTE: ContextVar[Route | None] = ContextVar("chia_member_route", default=None)
# While a member's body runs on a Ray worker: the lines it logs for its task run. Its
# result then leaves the process pickled.
_BODY_LINES: ContextVar[list[tuple[int, str]] | None] = ContextVar("chia_member_body", default=None)


def current_route() -> Route | None:
    return _ROUTE.get()


def in_body() -> bool:
    """Whether a member's body runs here on Ray (its result then leaves pickled)."""
    return _BODY_LINES.get() is not None


class BodyLog:
    """The task run's logger for a body on Ray: its lines go back with the body's outcome
    and are logged on the task run by the driver (the worker has no task run context)."""

    def __init__(self, lines: list[tuple[int, str]]) -> None:
        self._lines = lines

    def log(self, level: int, message: str) -> None:
        self._lines.append((level, str(message)))

    def debug(self, message: str) -> None:
        self.log(logging.DEBUG, message)

    def info(self, message: str) -> None:
        self.log(logging.INFO, message)

    def warning(self, message: str) -> None:
        self.log(logging.WARNING, message)

    def error(self, message: str) -> None:
        self.log(logging.ERROR, message)


def body_logger() -> BodyLog | None:
    lines = _BODY_LINES.get()
    return None if lines is None else BodyLog(lines)


class _Logged:
    """A body's result with the lines it logged."""

    __slots__ = ("lines", "value")

    def __init__(self, value: Any, lines: list[tuple[int, str]]) -> None:
        self.value, self.lines = value, lines

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_Logged, (self.value, self.lines))


def _emit(lines: list[tuple[int, str]] | None) -> None:
    if not lines:
        return
    from chia_prefect.members.limits import run_logger

    logger = run_logger()
    for level, message in lines:
        logger.log(level, message)


@contextmanager
def routed(route: Route | None) -> Iterator[None]:
    token = _ROUTE.set(route)
    try:
        yield
    finally:
        _ROUTE.reset(token)


# ---------------------------------------------------------------- the flow run's pool

# By the runner's id (runners compare equal by their settings, and do not hash): its weak
# reference tells a live runner from a later one that got the same id.
_pools: dict[int, tuple[weakref.ref[Any], ThreadPoolTaskRunner[Any]]] = {}
_pools_lock = threading.Lock()


def driver_pool(runner: Any) -> ThreadPoolTaskRunner[Any]:
    """The thread pool that runs the task engines of `runner`'s submitted members."""
    from prefect.task_runners import ThreadPoolTaskRunner

    stale = None
    with _pools_lock:
        entry = _pools.get(id(runner))
        if entry is not None and entry[0]() is runner:
            return entry[1]
        if entry is not None:
            stale = entry[1]
        # Unbounded, as Prefect's own: a member waiting on another must not starve it.
        pool: ThreadPoolTaskRunner[Any] = ThreadPoolTaskRunner().__enter__()
        key = id(runner)
        _pools[key] = (weakref.ref(runner, functools.partial(_forget, key)), pool)
    if stale is not None:
        _shut(stale, wait=False)
    return pool


def _forget(key: int, ref: weakref.ref[Any]) -> None:
    """A runner that was never exited is gone: so are its pool's idle threads."""
    with _pools_lock:
        entry = _pools.get(key)
        if entry is None or entry[0] is not ref:
            return
        del _pools[key]
    _shut(entry[1], wait=False)


def close_pool(runner: Any) -> None:
    """Let `runner`'s submitted members finish, then stop the pool's threads."""
    with _pools_lock:
        entry = _pools.get(id(runner))
        if entry is None or entry[0]() is not runner:
            return
        del _pools[id(runner)]
    _shut(entry[1], wait=True)


def _shut(pool: ThreadPoolTaskRunner[Any], wait: bool) -> None:
    executor = getattr(pool, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=wait)  # a submitted write is finished, not dropped
    if wait:
        pool.__exit__(None, None, None)


def open_pools() -> int:
    """How many flow runs' pools are open in this process (for tests)."""
    with _pools_lock:
        return len(_pools)


def route_events() -> str | None:
    """Send this process's task run events to the current settings' API while a member's
    task run is on (`runner.route_events`): a flow process that served another API before
    would otherwise send them there."""
    from prefect.context import SettingsContext

    from chia_prefect.runner import route_events as route
    from chia_prefect.runner import settings_api

    return route(*settings_api(SettingsContext.get()))


def submitted_with_events(submit: Callable[[], Any]) -> Any:
    """`submit()`'s future (or list of futures), the events of each of its task runs routed
    (`route_events`) from before the submit until that run ends."""
    from chia_prefect.runner import unroute_events

    key = route_events()
    try:
        submitted = submit()
        if key is not None:
            for future in (submitted if isinstance(submitted, list) else [submitted]):
                each = route_events()
                future.wrapped_future.add_done_callback(lambda _done, each=each: unroute_events(each))
    finally:
        unroute_events(key)
    return submitted


# ---------------------------------------------------------------- the driver's half

_body_function: Any = None


def _remote_body(ray: Any) -> Any:
    global _body_function
    if _body_function is None:
        _body_function = ray.remote(_run_body)
    return _body_function


def run_on_ray(route: Route, node: MemberHost, name: str, kind: str, args: tuple[Any, ...],
               kwargs: dict[str, Any], key: str | None) -> Any:
    """Send the member's body to Ray and wait for it, in the member's task run."""
    import ray
    from prefect.context import TaskRunContext
    from prefect.states import Crashed

    from chia_prefect.members import reservations
    from chia_prefect.members.limits import member_slot
    from chia_prefect.members.scheduling import Watch

    task_ctx = TaskRunContext.get()
    run_id = str(task_ctx.task_run.id) if task_ctx is not None else ""
    with member_slot(node, name):
        watch = Watch(route.options, route.timeout_s, route.what)
        # One argument: Ray serialises each separately (about 0.1 ms apiece).
        ref = _remote_body(ray).options(**route.options).remote((node, name, kind, run_id, route.what, args,
                                                                  kwargs, key))
        reservations.track_node(node.placement_token, ref)
        try:
            watch.wait(ref, run_id, None)
            outcome = ray.get(ref)
        except _worker_death_errors() as exc:
            message = f"The Ray worker running this task died ({type(exc).__name__}); the run was not retried."
            return Crashed(message=message, data=exc)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if not isinstance(cause, Exception):
                raise
            _emit(getattr(cause, "_chia_log_lines", None))
            raise cause from None  # the member's own error, without Ray's wrapping
    if type(outcome) is _Logged:
        _emit(outcome.lines)
        return outcome.value
    return outcome


def crash_error(state: Any) -> BaseException:
    """The error a Crashed state from `run_on_ray` carries (Ray's, e.g. `WorkerCrashedError`),
    as a future's `result()` raises it; the task engine keeps it in a result record."""
    from prefect.exceptions import CrashedRun

    data = getattr(state, "data", None)
    error = data if isinstance(data, BaseException) else getattr(data, "result", None)
    if isinstance(error, BaseException):
        return error
    return CrashedRun(state.message or "The Ray worker running this member died.")


def _worker_death_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as errors

    names = ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "ObjectLostError")
    return tuple(getattr(errors, name) for name in names if hasattr(errors, name))


# ---------------------------------------------------------------- the worker's half

def _run_body(call: tuple[Any, ...]) -> Any:
    """On the Ray worker: the member's body, once. A write abandoned by the driver before
    it started runs nothing (`announce_start`; its answer is awaited once the arguments are
    unpacked)."""
    from chia_prefect.members.scheduling import announce_start

    node, name, kind, run_id, what, args, kwargs, key = call
    started = announce_start(kind, run_id, what)
    member = getattr(type(node), name)
    lines: list[tuple[int, str]] = []
    token = _BODY_LINES.set(lines)
    try:
        value = member.run_body(node, args, kwargs, key, started)
    except Exception as exc:
        if lines:
            exc._chia_log_lines = lines  # type: ignore[attr-defined]
        raise
    finally:
        _BODY_LINES.reset(token)
    return _Logged(value, lines) if lines else value



# ---------------------------------------------------------------- installed once

def _link_results(original: Any) -> Any:
    def link_state_to_task_run_result(state: Any, result: Any) -> None:
        """Prefect links a task's result and each of its elements to its task run, so that
        passing one to another task records the dependency: for 100k rows more than the
        query cost. A member's list of rows is linked no deeper than it was when its task
        engine ran on a Ray worker, where the links were dropped with the task."""
        from prefect.context import TaskRunContext

        ctx = TaskRunContext.get()
        if ctx is not None and getattr(ctx.task, "_member", None) is not None \
                and isinstance(result, (list, tuple, dict, set)) and len(result) > 1:
            return
        original(state, result)

    link_state_to_task_run_result.__wrapped__ = original  # type: ignore[attr-defined]
    return link_state_to_task_run_result


def _quick_state_iterable(original: Any) -> Any:
    from prefect.client.schemas.objects import State

    def is_state_iterable(obj: Any) -> bool:
        """Prefect's check, answered from the first element when that is not a State (all()
        of the rest could not make it True): Prefect checks every element of a task's list
        result, 26 ms for 100k rows."""
        if type(obj) in (list, tuple) and obj and not isinstance(obj[0], State):
            return False
        return bool(original(obj))

    is_state_iterable.__wrapped__ = original  # type: ignore[attr-defined]
    return is_state_iterable


_installed = False


def install() -> None:
    """Close each flow run's pool as its Ray runner exits; link member results shallowly;
    answer Prefect's is-it-a-list-of-states check from the first element. Idempotent."""
    global _installed
    if _installed:
        return
    import prefect.task_engine as engine
    from prefect_ray.task_runners import RayTaskRunner

    from chia_prefect import runner as _runner

    original_exit = RayTaskRunner.__exit__

    def __exit__(self: Any, *exc_info: Any) -> None:
        try:
            close_pool(self)
        finally:
            original_exit(self, *exc_info)

    __exit__.__wrapped__ = original_exit  # type: ignore[attr-defined]
    RayTaskRunner.__exit__ = __exit__  # type: ignore[method-assign]
    # FastRayTaskRunner runs its exit hooks (releasing reservations) before the stock exit:
    # its members finish first.
    _runner.add_exit_hook(close_pool, first=True)
    import prefect._internal.states as internal_states
    import prefect.states as states

    for module in (states, internal_states):  # the sync and async return_value_to_state
        check = getattr(module, "is_state_iterable", None)
        if check is not None and not hasattr(check, "__wrapped__"):
            module.is_state_iterable = _quick_state_iterable(check)  # type: ignore[attr-defined]
    link = getattr(engine, "link_state_to_task_run_result", None)
    if link is not None and not hasattr(link, "__wrapped__"):
        engine.link_state_to_task_run_result = _link_results(link)  # type: ignore[attr-defined]
    _installed = True
