"""A node's cap on concurrent members, kept by a Prefect global concurrency limit.

`max_concurrency` on a node block caps how many of its members run at once across every
process and machine of every flow run that uses the block. The cap is a Prefect global
concurrency limit named after the node (`concurrency_limit_name`), created or updated to
the block's value on first use, so it shows on the UI's Concurrency page and an operator
can see who holds its slots. A member's task run takes one slot before its body starts and
gives it back when the body returns (in the flow's process on `RayTaskRunner`, where the
task engine runs); the slot is leased, so a process that dies frees it when the lease runs
out instead of never.

A member that finds every slot taken logs that it waits, and its task run shows the
`AwaitingConcurrencySlot` state until it gets one.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chia_prefect.members.host import MemberHost

# How long a slot is leased; the holder renews it while the member runs.
LEASE_S = 60.0
# A member that found every slot taken asks again after this long, doubling up to the max.
_POLL_FIRST_S = 0.05
_POLL_MAX_S = 1.0
_ensured: dict[str, int] = {}
_asking: dict[str, threading.Lock] = {}  # per limit: one request for a slot at a time
_asking_lock = threading.Lock()
_ensured_lock = threading.Lock()
_log = logging.getLogger("chia_prefect")


def ensure_limit(name: str, limit: int, refresh: bool = False) -> None:
    """Create the limit `name` with `limit` slots, or set it to `limit` (once per process)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with _ensured_lock:
        if not refresh and _ensured.get(name) == limit:
            return
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            except ObjectAlreadyExists:
                existing = client.read_global_concurrency_limit_by_name(name)
            else:
                existing = None
        if existing is not None and (existing.limit != limit or not existing.active):
            client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=limit, active=True)
            )
    with _ensured_lock:
        _ensured[name] = limit


@contextmanager
def member_slot(node: MemberHost | None, member: str) -> Iterator[None]:
    """Hold one slot of `node`'s limit around a member (nothing when it has no cap)."""
    cap = getattr(node, "max_concurrency", None)
    if not cap or node is None:
        yield
        return
    from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
    from prefect.concurrency._events import emit_concurrency_acquisition_events, emit_concurrency_release_events
    from prefect.concurrency._leases import maintain_concurrency_lease

    what = f"{node.engine}.{member}"
    name = node.concurrency_limit_name
    ensure_limit(name, cap)
    with _api_client() as client:
        granted = ConcurrencyLimitWithLeaseResponse.model_validate(_acquire(client, name, cap, what).json())
        events = emit_concurrency_acquisition_events(granted.limits, 1)
        try:
            # A lease renewal that fails must not interrupt a member mid-write: the slot then
            # frees when the lease runs out, at worst letting one more member in.
            with maintain_concurrency_lease(granted.lease_id, LEASE_S, raise_on_lease_renewal_failure=False):
                yield
        finally:
            try:
                client.release_concurrency_slots_with_lease(lease_id=granted.lease_id)
            except Exception:  # noqa: BLE001 - the lease runs out instead
                _log.warning("%s: could not give back its slot of '%s'; it frees when its lease runs out "
                             "(%.0f s)", what, name, LEASE_S, exc_info=True)
            emit_concurrency_release_events(granted.limits, 1, events)


def _acquire(client: Any, name: str, cap: int, what: str) -> Any:
    """Take one slot of the limit `name`, asking again at our own pace while every slot is
    taken: the server's answer. A process asks for one slot of a limit at a time (dozens of
    members asking at once kept the server's database busy for a minute), but nobody waits
    out another member's pause. Prefect's `concurrency()` queued every attempt of the
    process, each refusal logged as an ERROR with its traceback: the members of a flow,
    whose task engines all run in the flow's process, took 123 s for 60 writes of 0.1 s
    under a cap of 3."""
    import httpx

    waited, pause = False, _POLL_FIRST_S
    with _asking_lock:
        asking = _asking.setdefault(name, threading.Lock())
    while True:
        try:
            with asking:
                response = client.increment_concurrency_slots_with_lease(
                    names=[name], slots=1, mode="concurrency", lease_duration=LEASE_S)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 423:  # 423 Locked: every slot is taken
                raise
        else:
            if response.json().get("limits"):
                break
            ensure_limit(name, cap, refresh=True)  # deleted since: put it back
            continue
        if not waited:
            waited = True
            message = (f"{what} waits for a slot of concurrency limit '{name}' "
                       f"(max_concurrency={cap}: that many members of this node run at once)")
            run_logger().info(message)
            _show_state("AwaitingConcurrencySlot", message)
        # Our own pace, not the server's Retry-After: that assumes slots held for seconds.
        time.sleep(random.uniform(0.5, 1.0) * pause)
        pause = min(_POLL_MAX_S, pause * 2)
    if waited:
        _show_state("Running", None)
        run_logger().info(f"{what} got a slot of concurrency limit '{name}'")
    return response


@contextmanager
def _api_client() -> Iterator[Any]:
    """This process's shared client for the current API (`runner.process_client`), or a
    client of its own when there is no API URL (Prefect's temporary server)."""
    from prefect.client.orchestration import get_client
    from prefect.context import SettingsContext

    from chia_prefect.runner import process_client

    settings_ctx = SettingsContext.get()
    shared = process_client(settings_ctx) if settings_ctx is not None else None
    if shared is not None:
        yield shared.client
        return
    with get_client(sync_client=True) as client:
        yield client


def run_logger() -> Any:
    """The task or flow run's logger; the package's own outside a run. In a member's body
    on Ray, lines go to its task run through the driver (`remote.body_logger`)."""
    from prefect.logging.loggers import get_run_logger

    from chia_prefect.members import remote

    body_log = remote.body_logger()
    if body_log is not None:
        return body_log

    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run
        return _log


def _show_state(name: str, message: str | None) -> None:
    """Show in the task run's state that the member waits (or runs again), through the
    same event stream the task engine reports its states on."""
    from prefect.context import TaskRunContext
    from prefect.states import AwaitingConcurrencySlot, Running
    from prefect.utilities.engine import emit_task_run_state_change_event

    ctx = TaskRunContext.get()
    if ctx is None:
        return
    task_run = ctx.task_run
    state: Any = AwaitingConcurrencySlot(message=message) if name == "AwaitingConcurrencySlot" else Running()
    state.state_details.task_run_id = task_run.id
    state.state_details.flow_run_id = task_run.flow_run_id
    previous = task_run.state
    try:
        emit_task_run_state_change_event(task_run=task_run, initial_state=previous, validated_state=state)
    except Exception:  # noqa: BLE001 - showing the wait must not fail the member
        _log.debug("could not report the task run's state", exc_info=True)
