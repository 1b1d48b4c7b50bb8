"""Small helpers shared by the test modules (importable by Ray workers too)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any


def soak_count(full: int, minimum: int) -> int:
    """A slow reliability test's trial count: `full`, times `CHIA_SOAK_SCALE` (default 1; CI runs
    0.25 to fit its time budget), never below `minimum`."""
    return max(minimum, round(full * float(os.environ.get("CHIA_SOAK_SCALE", "1"))))


def sql_for(db, text: str) -> str:
    """Render `?` placeholders for the node's paramstyle; tests write qmark SQL."""
    return text.replace("?", "%s") if db.paramstyle == "format" else text


def id_column(db) -> str:
    return "INTEGER PRIMARY KEY" if db.engine == "sqlite" else "SERIAL PRIMARY KEY"


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.02,
               what: str | Callable[[], str] | None = None) -> Any:
    """Poll `predicate` until it returns something truthy, and return that.

    `what` names the wait in the timeout's message; a callable is asked only then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what or predicate}")


# Objects of this test process that a flow reads by name: a flow function travels to Ray
# workers by value, with the globals it uses, and these (a Ray cluster) do not pickle.
SHARED: dict[str, Any] = {}
