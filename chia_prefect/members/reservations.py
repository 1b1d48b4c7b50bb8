"""Placement groups reserved for nodes: shared per database, released when their use ends.

A node in placement-group mode reserves a bundle on first placed use. The reservation is
shared: every node of this process for the same database with the same placement (a
block loaded twice, a node per subflow) uses one group. Each use takes a *hold*:

- inside a flow run, a hold for (node, that flow run): released when the run ends, even
  if nobody calls `close()`, on any task runner;
- outside any flow run, a hold for the node alone: released by `close()` or at exit.

`close()` drops the node's holds at once. A group is removed when its last hold goes, after
the members submitted into it have finished and nothing else holds resources in it
(bounded waits). Query tools spawned inside a
flow run are stopped when it ends, the same way. Groups are named after the node, so
`ray list placement-groups` shows whose they are.
"""

from __future__ import annotations

import atexit
import itertools
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chia_prefect import runner as _runner

_LOCK = threading.RLock()
_COUNTER = itertools.count(1)
# How long a released group waits for members still running in it before it is removed.
_INFLIGHT_GRACE_S = 30.0
# Then how long it waits for anything else still holding resources in it (`_wait_until_idle`).
_IDLE_GRACE_S = 5.0


@dataclass
class Reservation:
    """One placement group and who holds it."""

    key: tuple[Any, ...]
    cluster: str
    group: Any
    name: str
    bundle_index: int
    holds: set[tuple[str, int | None]] = field(default_factory=set)
    inflight: list[Any] = field(default_factory=list)
    # Set once the group is removed; the nodes that held it last, whose close() waits for that.
    removed: threading.Event = field(default_factory=threading.Event)
    last_holders: frozenset[str] = frozenset()


_RESERVATIONS: dict[tuple[Any, ...], Reservation] = {}
# Reservations whose last hold went and whose group is being removed (by any thread).
_REMOVING: list[Reservation] = []
# Flow-run contexts that hold something, by id(context): the context is kept alive here
# until its run ends, so the id stays unique.
_RUNS: dict[int, Any] = {}
# Finalizers (query tools) to call when a run ends, by run token.
_RUN_FINALIZERS: dict[int, list[Callable[[], None]]] = {}


def new_token() -> str:
    """A token naming one node's holds (not its id(): an id can be reused)."""
    return uuid.uuid4().hex


def acquire(key: tuple[Any, ...], node_token: str, reserve: Callable[[str], tuple[Any, int]], label: str) -> Reservation:
    """The shared reservation for `key`, reserved with `reserve(name)` if there is none.

    Takes a hold for (node, current flow run) or, outside a run, for the node alone.
    """
    run = _current_run()
    with _LOCK:
        _reap_ended_runs()
        cluster = _cluster_id()
        found = _RESERVATIONS.get(key)
        if found is not None and found.cluster != cluster:
            # Ray was shut down and started again: the old group went with it.
            del _RESERVATIONS[key]
            found = None
        if found is None:
            name = f"chia-prefect: {label} (pid {os.getpid()}, #{next(_COUNTER)})"
            group, bundle_index = reserve(name)
            found = _RESERVATIONS[key] = Reservation(key, cluster, group, name, bundle_index)
        found.holds.add((node_token, _watch(run)))
        return found


def held_by(node_token: str) -> Reservation | None:
    """The reservation a node holds now, if any."""
    with _LOCK:
        _reap_ended_runs()
        return _held(node_token)


def _held(node_token: str) -> Reservation | None:
    return next((r for r in _RESERVATIONS.values() if any(t == node_token for t, _ in r.holds)), None)


def track_node(node_token: str, object_ref: Any) -> None:
    """Remember a member submitted into the node's group, so its removal waits for it."""
    with _LOCK:
        reservation = _held(node_token)
        if reservation is None:
            return
        if len(reservation.inflight) >= 64:
            import ray

            _, pending = ray.wait(reservation.inflight, num_returns=len(reservation.inflight), timeout=0)
            reservation.inflight = list(pending)
        reservation.inflight.append(object_ref)


def on_run_end(finalizer: Callable[[], None]) -> bool:
    """Call `finalizer` when the current flow run ends; False outside a flow run."""
    run = _current_run()
    if run is None:
        return False
    with _LOCK:
        token = _watch(run)
        if token is None:
            return False
        _RUN_FINALIZERS.setdefault(token, []).append(finalizer)
    return True


def release_node(node_token: str) -> None:
    """Drop every hold of one node (its `close()`); returns once its group is removed.

    The group may be being removed by another thread already (the reaper, as the flow run
    that held it ended): `close()` waits for that too, so a closed node's group is gone.
    """
    _release(lambda hold: hold[0] == node_token)
    with _LOCK:
        pending = [r for r in _REMOVING if node_token in r.last_holders]
    for reservation in pending:
        reservation.removed.wait(_INFLIGHT_GRACE_S + 10)


def release_all() -> None:
    """Drop every hold of this process (at exit)."""
    with _LOCK:
        tokens = list(_RUNS)
    for token in tokens:
        _end_run(token)
    _release(lambda hold: True)


# --- flow runs ------------------------------------------------------------------------


def _current_run() -> Any:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx if ctx is not None and ctx.flow_run is not None else None


def _watch(run: Any) -> int | None:
    """Register a flow run's context so its holds go when it ends; its token."""
    if run is None:
        return None
    token = id(run)
    if token not in _RUNS:
        _RUNS[token] = run
        _start_reaper()
    return token


def end_runs_of(runner: Any) -> None:
    """Release what the runs on `runner` hold (a task runner calls it as it exits)."""
    with _LOCK:
        tokens = [token for token, ctx in _RUNS.items() if ctx.task_runner is runner]
    for token in tokens:
        _end_run(token)


_reaper: threading.Thread | None = None
# How often the reaper looks for ended runs (seconds).
_REAP_INTERVAL_S = 0.02


def _start_reaper() -> None:  # called with _LOCK held
    """A thread that releases a run's holds as soon as the run has ended.

    Prefect gives no callback at the end of a flow run that works for every task runner;
    the run's context is reset when the engine leaves it, which the thread sees within
    `_REAP_INTERVAL_S`. It stops when no run holds anything. (`FastRayTaskRunner`
    releases at once as it exits, and every new reservation reaps first.)
    """
    global _reaper
    if _reaper is not None:
        return
    _reaper = threading.Thread(target=_reap_until_idle, name="chia-prefect-reaper", daemon=True)
    _reaper.start()


def _reap_until_idle() -> None:
    global _reaper
    import time

    while True:
        time.sleep(_REAP_INTERVAL_S)
        try:
            _reap_ended_runs()
        except Exception:  # noqa: BLE001 - keep reaping; the next round may succeed
            _log_failure("releasing an ended flow run's placement groups failed")
        with _LOCK:
            if not _RUNS:
                _reaper = None
                return


def _reap_ended_runs() -> None:
    # A context's token is reset when the engine leaves it: the run is over.
    with _LOCK:
        ended = [token for token, ctx in _RUNS.items() if getattr(ctx, "_token", None) is None]
    for token in ended:
        _end_run(token)


def _end_run(token: int) -> None:
    with _LOCK:
        finalizers = _RUN_FINALIZERS.pop(token, [])
        _RUNS.pop(token, None)
    for finalizer in reversed(finalizers):  # tools first: one may live in a group below
        try:
            finalizer()
        except Exception:  # noqa: BLE001 - one failing stop must not keep the rest alive
            _log_failure("stopping a query tool at the end of a flow run failed")
    _release(lambda hold: hold[1] == token)


def _release(matches: Callable[[tuple[str, int | None]], bool]) -> None:
    emptied = []
    with _LOCK:
        for key, reservation in list(_RESERVATIONS.items()):
            holders = frozenset(token for token, _ in reservation.holds)
            reservation.holds = {hold for hold in reservation.holds if not matches(hold)}
            if not reservation.holds:
                reservation.last_holders = holders
                emptied.append(_RESERVATIONS.pop(key))
                _REMOVING.append(reservation)
    for reservation in emptied:
        try:
            _remove(reservation)
        finally:
            reservation.removed.set()
            with _LOCK:
                _REMOVING.remove(reservation)


def _remove(reservation: Reservation) -> None:
    import ray

    if not ray.is_initialized() or reservation.cluster != _cluster_id():
        return  # gone with its cluster
    from ray.util.placement_group import remove_placement_group

    try:
        if reservation.inflight:
            ray.wait(reservation.inflight, num_returns=len(reservation.inflight), timeout=_INFLIGHT_GRACE_S)
        _wait_until_idle(reservation.group, _IDLE_GRACE_S)
        remove_placement_group(reservation.group)
    except Exception:
        if ray.is_initialized():
            raise
        # The runner that started Ray shut it down meanwhile; the group went with it.


def _wait_until_idle(group: Any, timeout: float) -> None:
    """Wait, at most `timeout`, until Ray's resource view shows nothing holding resources in
    `group`'s bundles (the view trails the raylets by a report period, about 0.1 s). Ray may
    still be starting a worker for a lease in a bundle after our members there finished (a
    lease asked for ahead, a replay): removing the group 2 s after such a start killed the
    raylet in CI (Ray 2.60, "Check failed: ... ReturnBundle ... Bundle resources are still
    in use")."""
    import time

    import ray

    suffix = f"_{group.id.hex()}"
    deadline = time.monotonic() + timeout
    while True:
        total = {name: amount for name, amount in ray.cluster_resources().items() if name.endswith(suffix)}
        free = ray.available_resources()
        if all(free.get(name, 0.0) >= amount for name, amount in total.items()) or time.monotonic() >= deadline:
            return
        time.sleep(0.02)


def _log_failure(what: str) -> None:
    from prefect.logging import get_logger

    get_logger("chia_prefect").warning(what, exc_info=True)


def _cluster_id() -> str:
    import ray

    if not ray.is_initialized():
        return ""
    context = ray.get_runtime_context()
    return f"{context.gcs_address}/{context.get_job_id()}"


atexit.register(release_all)

# FastRayTaskRunner ends its runs' reservations as it exits (the stock runner's are ended
# by the reaper when the flow run's context goes away).
_runner.add_exit_hook(end_runs_of)
