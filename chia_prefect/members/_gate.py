"""The gate actor of `chia_prefect.members.scheduling`, alone in a module that imports only the
standard library: the driver ships it to Ray by value (`ray.cloudpickle.register_pickle_by_value`),
so the actor's worker process starts without importing chia_prefect or Prefect."""

from __future__ import annotations

import time

# A started member is remembered at least this long (and twice the longest timeout asked).
_REMEMBER_S = 600.0
# How much longer than its timeout a member whose resources are ready may wait for a worker.
WORKER_START_S = 30.0


class Gate:
    """Ray actor (one per driver job, no CPU): which members started, which were abandoned."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.abandoned: dict[str, float] = {}
        self.last_start: dict[str, float] = {}
        self.remember_s = _REMEMBER_S
        self.calls = 0

    def start(self, task_run_id: str, shape: str) -> bool:
        now = time.time()
        if task_run_id in self.abandoned:
            return False
        self.started[task_run_id] = now
        self.last_start[shape] = now
        self._forget(now)
        return True

    def abandon(self, task_run_id: str, shape: str, window_s: float, warming: bool = False) -> str:
        """'started', 'moving' (others of its shape started lately, or its resources are ready
        and a worker is starting: `warming`) or 'abandoned'."""
        now = time.time()
        self.remember_s = max(self.remember_s, 2 * window_s + WORKER_START_S)
        if task_run_id in self.started:
            return "started"
        if warming or self.last_start.get(shape, 0.0) > now - window_s:
            return "moving"
        self.abandoned[task_run_id] = now
        return "abandoned"

    def ping(self) -> bool:
        return True

    def _forget(self, now: float) -> None:
        self.calls += 1
        if self.calls % 1024:
            return
        horizon = now - self.remember_s
        for table in (self.started, self.abandoned):
            for key in [k for k, t in table.items() if t < horizon]:
                del table[key]
