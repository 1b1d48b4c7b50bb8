"""Nothing waits forever: a member Ray cannot schedule fails in bounded time, and says why.

Ray keeps a task whose resources are not free in its queue for as long as it takes (a
cluster whose CPUs are all reserved by placement groups: forever). The driver cannot ask
Ray whether a queued task has started without the dashboard, so members tell a small
actor of the driver's job, the *gate*, when they start:

- a read announces itself and runs (fire and forget);
- a write asks the gate as it starts and waits for the answer once its arguments are
  unpacked, before its body runs: if the driver already gave up on it, it runs nothing. A
  write declared `atomic_only` (its only effects are in `DatabaseNode.atomic`) runs its
  statements meanwhile and waits just before its COMMIT: if the driver gave up on it, its
  transaction is rolled back. So a write is either reported as not scheduled or it runs
  (commits), never both.

The driver waits for a member's result; once `schedule_timeout_s` has passed since the
submit and the member has not started, it asks the gate to abandon it. The gate refuses
while members of the same placement started within the last timeout (a long queue that is
moving is not stuck), and the driver gives a member whose resources are ready (its placement
group is reserved, or the CPUs it asks for are free) up to `WORKER_START_S` more: it waits
for Ray to start a worker process, which takes seconds on a loaded machine. An abandoned member is cancelled, its task run set Failed, and
`SchedulingTimeoutError` says what the member asked for, what the cluster has free and
which placement groups hold the rest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar, cast

from chia_prefect.errors import SchedulingTimeoutError
from chia_prefect.members import _gate
from chia_prefect.members._gate import WORKER_START_S

GATE_NAMESPACE = "chia-prefect"
_driver_gates: dict[str, Any] = {}
_worker_gates: dict[str, Any] = {}
_gates_lock = threading.Lock()


def _gate_name(job_id: str) -> str:
    return f"chia-prefect-gate-{job_id}"


def driver_gate() -> Any:
    """The gate of this driver's Ray job, created on first use (it needs no CPU)."""
    import ray

    job_id = ray.get_runtime_context().get_job_id()
    with _gates_lock:
        gate: Any = _driver_gates.get(job_id)
        if gate is None:
            # Shipped by value: the actor's process then imports only Ray, not chia_prefect
            # and Prefect (a gate per flow run's job took 1.7 s of CPU to start, 0.6 s now).
            import ray.cloudpickle

            ray.cloudpickle.register_pickle_by_value(_gate)
            gate = ray.remote(_gate.Gate).options(
                name=_gate_name(job_id), namespace=GATE_NAMESPACE, get_if_exists=True,
                num_cpus=0, max_restarts=0,
            ).remote()
            ray.get(gate.ping.remote(), timeout=60)
            _driver_gates.clear()  # an earlier Ray session's gate went with it
            _driver_gates[job_id] = gate
        return gate


NOTHING_EXECUTED = "nothing was executed"
ROLLED_BACK = "its transaction was rolled back; nothing was written"

_Cursor = TypeVar("_Cursor")
# A write's answer still to await before its first COMMIT, while an `atomic_only` body runs.
_BEFORE_COMMIT: ContextVar[list[Callable[[str], None]] | None] = ContextVar("chia_gate_before_commit", default=None)


def announce_start(kind: str, run_id: str, what: str) -> Callable[[str], None] | None:
    """Called by a member's body as it starts on a Ray worker (`run_id` its task run). A
    read's notice is fire and forget. A write's question is sent here, and the answer is
    awaited by the returned call (given what was left undone, for its error), which raises
    if the driver abandoned the write: the body makes it once its arguments are unpacked
    (pure work, which so overlaps the round trip) and before anything else, or, for an
    `atomic_only` write, just before its COMMIT (`answer_before_commit`)."""
    if not run_id:
        return None
    gate = _worker_gate()
    if gate is None:
        return None
    import ray

    shape = _shape_here()
    if kind != "write":
        gate.start.remote(run_id, shape)
        return None
    answer = gate.start.remote(run_id, shape)

    def confirm(outcome: str) -> None:
        if not ray.get(answer, timeout=60):
            raise SchedulingTimeoutError(
                f"{what}: the flow gave up waiting for this write to be scheduled "
                f"before it started; {outcome}."
            )

    return confirm


@contextmanager
def answer_before_commit(confirm: Callable[[str], None]) -> Iterator[None]:
    """Around an `atomic_only` write's body: its gate answer (`confirm`) is awaited inside
    its first transaction, just before the COMMIT (`before_commit`), so the round trip
    overlaps the connect and the statements; a body that committed nothing awaits it as it
    returns. A body that raises does not wait: it wrote nothing."""
    pending = [confirm]
    token = _BEFORE_COMMIT.set(pending)
    try:
        yield
    finally:
        _BEFORE_COMMIT.reset(token)
    if pending:
        pending.pop()(NOTHING_EXECUTED)


def before_commit(transaction: AbstractContextManager[_Cursor]) -> AbstractContextManager[_Cursor]:
    """`transaction` (an engine's `atomic()`), which awaits a pending gate answer after its
    block and before it commits: raising there rolls it back. Itself when none is pending."""
    pending = _BEFORE_COMMIT.get()
    if not pending:
        return transaction
    return _answered_then_committed(transaction, pending)


@contextmanager
def _answered_then_committed(transaction: AbstractContextManager[_Cursor],
                             pending: list[Callable[[str], None]]) -> Iterator[_Cursor]:
    with transaction as cursor:
        yield cursor
        if pending:
            pending.pop()(ROLLED_BACK)


def _worker_gate() -> Any:
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None  # in the flow's own process: nobody waits on a queue
    job_id = ray.get_runtime_context().get_job_id()
    with _gates_lock:
        gate = _worker_gates.get(job_id)
    if gate is None:
        try:
            gate = ray.get_actor(_gate_name(job_id), namespace=GATE_NAMESPACE)
        except ValueError:
            return None  # submitted by something other than a member on the driver
        with _gates_lock:
            _worker_gates[job_id] = gate
    return gate


def _shape_here() -> str:
    import ray

    group = ray.get_runtime_context().get_placement_group_id()
    return group or "none"


def shape_of(options: dict[str, Any]) -> str:
    """The queue a member waits in, as the gate keys it: its placement group or none."""
    strategy = options.get("scheduling_strategy")
    group = getattr(strategy, "placement_group", None)
    return group.id.hex() if group is not None else "none"


class Watch:
    """Driver side of one submitted member: abandons it once it cannot be scheduled."""

    def __init__(self, options: dict[str, Any], timeout_s: float | None, what: str):
        self.options, self.timeout_s, self.what = options, timeout_s, what
        self.deadline: float | None = None if timeout_s is None else time.monotonic() + timeout_s
        self.warm_until: float | None = None if self.deadline is None else self.deadline + WORKER_START_S
        self.shape = shape_of(options)
        self.gate: Any = driver_gate() if timeout_s is not None else None

    def wait(self, object_ref: Any, task_run_id: Any, timeout: float | None) -> float | None:
        """Wait for `object_ref` up to `timeout` while it may be stuck in Ray's queue; raise
        SchedulingTimeoutError if it is abandoned. Returns what is left of `timeout`."""
        import ray

        end = None if timeout is None else time.monotonic() + timeout
        while self.deadline is not None:
            # All set together when timeout_s is not None, and deadline only then.
            timeout_s, warm_until = cast(float, self.timeout_s), cast(float, self.warm_until)
            until = self.deadline if end is None else min(end, self.deadline)
            ready, _ = ray.wait([object_ref], timeout=max(0.0, until - time.monotonic()), fetch_local=False)
            now = time.monotonic()
            if ready or (end is not None and end <= now < self.deadline):
                break  # done, or the caller's own timeout ran out first
            if now < self.deadline:
                continue  # woke a little early
            warming = now < warm_until and self.resources_ready()
            verdict: Any = ray.get(
                self.gate.abandon.remote(str(task_run_id), self.shape, timeout_s, warming), timeout=60
            )
            if verdict == "started":
                self.deadline = None
            elif warming:
                self.deadline = min(warm_until, time.monotonic() + timeout_s)
            elif verdict == "moving":
                self.deadline = time.monotonic() + timeout_s
            else:
                ray.cancel(object_ref)
                raise SchedulingTimeoutError(self.describe())
        return None if end is None else max(0.0, end - time.monotonic())

    def resources_ready(self) -> bool:
        """Whether nothing but a worker process stands between the member and its start:
        its placement group is reserved, or the cluster has free what it asks for."""
        import ray
        from ray.util.placement_group import placement_group_table

        group = getattr(self.options.get("scheduling_strategy"), "placement_group", None)
        if group is not None:
            return (placement_group_table(group) or {}).get("state") == "CREATED"
        asked = {"CPU": self.options.get("num_cpus", 1), **(self.options.get("resources") or {})}
        available = ray.available_resources()
        return all(available.get(name, 0.0) >= amount for name, amount in asked.items() if amount)

    def describe(self) -> str:
        return describe_unscheduled(self.what, self.options, self.timeout_s)


def describe_unscheduled(what: str, options: dict[str, Any], timeout_s: float | None) -> str:
    """Why `what` (submitted with Ray `options`) was given up after `timeout_s`."""
    asked = {"CPU": options.get("num_cpus", 1), **(options.get("resources") or {})}
    strategy: Any = options.get("scheduling_strategy")
    where = ""
    if getattr(strategy, "placement_group", None) is not None:
        where = f" in bundle {strategy.placement_group_bundle_index} of placement group " \
                f"{_group_label(strategy.placement_group.id.hex())}"
    elif getattr(strategy, "node_id", None):
        where = f" on node {strategy.node_id}"
    return (
        f"{what} was not scheduled on Ray within {timeout_s:g} s and was cancelled "
        f"before it started; nothing was executed. It asked for {_fmt(asked)}{where}. "
        f"{cluster_report()} Free resources (close() unused nodes, end the flows or actors "
        "that hold them) or raise placement.schedule_timeout_s."
    )


def cluster_report() -> str:
    """What the cluster has free, and which placement groups hold resources, by name."""
    import ray
    from ray.util.placement_group import placement_group_table

    total = _plain(ray.cluster_resources())
    available = ray.available_resources()  # leaves out what is all taken
    free = {name: available.get(name, 0.0) for name in total}
    holders = []
    for info in placement_group_table().values():
        if info["state"] not in ("CREATED", "PENDING", "RESCHEDULING", "PREPARED"):
            continue
        summed: dict[str, float] = {}
        for bundle in info["bundles"].values():
            for name, amount in bundle.items():
                summed[name] = summed.get(name, 0) + amount
        name = info["name"] or f"(unnamed {info['placement_group_id'][:12]})"
        state = "" if info["state"] == "CREATED" else f", {info['state'].lower()}"
        holders.append(f"'{name}' {_fmt(_plain(summed))}{state}")
    held = "; ".join(holders) if holders else "none"
    return f"The cluster has {_fmt(free)} free of {_fmt(total)}. Placement groups holding resources: {held}."


def _group_label(group_hex: str) -> str:
    from ray.util.placement_group import placement_group_table

    info = placement_group_table().get(group_hex) or {}
    return f"'{info.get('name')}'" if info.get("name") else group_hex[:12]


def _plain(resources: dict[str, float]) -> dict[str, float]:
    """Resources a person asks for: not Ray's per-group and per-node bookkeeping keys."""
    return {k: v for k, v in resources.items()
            if "_group_" not in k and not k.startswith(("node:", "bundle_group", "memory", "object_store"))}


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {round(v, 3):g}" for k, v in sorted(resources.items())) + "}"
