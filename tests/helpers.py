"""Small helpers shared by the test modules (importable by Ray workers too)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
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


FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def final_task_runs(flow_run_id: Any, count: int | None = None, timeout: float = 60.0) -> list[Any]:
    """The flow run's task runs once each has a final state recorded (and, given `count`,
    that many exist). Workers and members report their states as events, which the server
    records a moment after the flow run returned: a read right then can see RUNNING, or no
    state at all."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def final() -> list[Any] | None:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(str(flow_run_id))])))
        done = all(r.state is not None and r.state.type.value in FINAL_STATES for r in runs)
        return runs if done and (count is None or len(runs) >= count) else None

    return wait_until(final, timeout=timeout, interval=0.25, what=f"every task run of flow run {flow_run_id} final")


def session_ray_processes() -> dict[int, str]:
    """This session's Ray processes, by PID with the name each runs under: the connected
    cluster's GCS and raylets (found by its session directory in their command lines) and the
    raylets' children (workers and actors, `ray::<task>`; agents). Other clusters on the
    machine (a second pytest worker's, a `ray start` test's) are not included."""
    from chia_prefect.local import ray_session_dir

    session = ray_session_dir()
    assert session, "not connected to Ray"
    daemons: dict[int, str] = {}
    children: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            argv0 = argv[0].decode(errors="replace")
            if argv0.endswith(("/raylet", "/gcs_server")):
                if any(session.encode() in arg for arg in argv):
                    daemons[int(entry.name)] = argv0.rsplit("/", 1)[-1]
            elif argv0.startswith("ray::"):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children[int(entry.name)] = (ppid, argv0.strip())
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    raylets = {pid for pid, name in daemons.items() if name == "raylet"}
    return {**daemons, **{pid: name for pid, (ppid, name) in children.items() if ppid in raylets}}


@contextmanager
def ray_tmpdir_left_clean() -> Iterator[str]:
    """A RAY_TMPDIR for commands that start a local Ray; when the block ends, each of those
    Rays must have deleted its session folder there (Ray keeps them; chia-prefect removes
    the ones it started)."""
    folder = Path(tempfile.mkdtemp(prefix="cr-"))  # AF_UNIX paths in it must stay under 107 bytes
    try:
        yield str(folder)
        assert (folder / "ray").is_dir() and not list((folder / "ray").glob("session_*")), \
            sorted(p.name for p in (folder / "ray").iterdir())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
