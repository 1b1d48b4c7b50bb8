"""Run flows on a laptop: one temporary Prefect API shared by the flow and every Ray worker.

Without `PREFECT_API_URL`, Prefect starts a temporary server in the flow's process, and
every Ray worker that runs a task starts another one of its own (about 5 s each). Start
one before Ray does and export its URL; Ray workers inherit the environment.

    from chia_prefect.local import shared_prefect_api

    with shared_prefect_api():
        my_flow()
"""

from __future__ import annotations

import atexit
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect_ray.task_runners import RayTaskRunner

# Ray keeps at most `num_workers_soft_limit` idle worker processes (by default one per CPU)
# and kills the rest after a second. A node's members run in its placement group, other
# tasks outside it: each shape needs its own workers, so on 2 CPUs a flow that alternates
# between them started new workers every time (each imports Prefect: 100 members at once
# took 11.8 s after 100 plain tasks, 2.0 s with warm workers). Eight stay warm.
WORKERS_KEPT_WARM = 8
LOCAL_RAY: dict[str, Any] = {
    "address": "local", "num_cpus": 2, "include_dashboard": False,
    "_system_config": {"num_workers_soft_limit": WORKERS_KEPT_WARM},
}
_start_lock = threading.Lock()


def ship_by_value(module_name: str) -> None:
    """Let Ray workers run flows from `module_name` without importing it.

    Prefect loads a deployment's entrypoint file as a top-level module (`atomic_demo`), and
    the flow-run context it pickles into every Ray task names that module; a worker whose
    sys.path lacks the file's folder cannot import it. Pickled by value, it travels along.
    Call it at the top of a flow file: `ship_by_value(__name__)`.
    """
    import sys

    from ray import cloudpickle

    module = sys.modules[module_name]
    if module_name != "__main__":
        cloudpickle.register_pickle_by_value(module)


def ray_session_dir() -> str | None:
    """The session folder (logs, sockets) of the Ray this process is connected to, if any."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_session_dir_path() if node is not None else None


def remove_ray_session(session: str | None) -> None:
    """Delete a local Ray's session folder once that Ray has stopped.

    Ray keeps every session's folder (`/tmp/ray/session_*`, 0.3-1 MB of logs each), so a
    command that starts a local Ray on a schedule would fill `/tmp` over months. A Ray this
    package started in-process is removed with its folder; `CHIA_KEEP_RAY_SESSION=1` keeps
    the folders (to read the workers' logs).
    """
    if not session or os.environ.get("CHIA_KEEP_RAY_SESSION"):
        return
    shutil.rmtree(session, ignore_errors=True)
    latest = os.path.join(os.path.dirname(session), "session_latest")
    try:
        if os.path.islink(latest) and os.readlink(latest) == session:
            os.unlink(latest)
    except OSError:
        pass  # another process moved the link meanwhile


def _stop_local_ray(session: str | None) -> None:
    import ray

    if ray.is_initialized() and ray_session_dir() == session:
        ray.shutdown()
    remove_ray_session(session)


class OneRunRayTaskRunner(RayTaskRunner[Any]):
    """The stock runner, on a Ray it starts for one flow run (the `chia-prefect` command's
    without RAY_ADDRESS): that Ray's session folder is deleted once it stopped
    (`remove_ray_session`)."""

    def __exit__(self, *exc_info: Any) -> None:
        session = ray_session_dir() if self._owns_ray else None
        super().__exit__(*exc_info)
        remove_ray_session(session)


class ProcessRayTaskRunner(RayTaskRunner[Any]):
    """`RayTaskRunner` on this process's local Ray (`LOCAL_RAY`: 2 CPUs, eight idle workers
    kept warm): the first flow run that needs it starts it, later flow runs of the process
    reuse it, and it stops when the process exits, its session folder deleted
    (`remove_ray_session`). A script that calls `migrate` twice pays Ray's start once, and
    no flow run shuts Ray down under another one's feet."""

    def __enter__(self) -> Any:
        import ray

        with _start_lock:
            if not ray.is_initialized():
                ray.init(**self.init_kwargs)
                # Runs before the shutdown ray.init registered (atexit is last in, first out):
                # stop Ray, then delete its session folder.
                atexit.register(_stop_local_ray, ray_session_dir())
        return super().__enter__()


def ray_task_runner() -> Any:
    """`RayTaskRunner` for RAY_ADDRESS when set (other than "local"), else this process's
    local Ray (2 CPUs), started by the first flow run and kept until the process exits.

    Ray already running in this process is used as it is.
    """
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        return RayTaskRunner(address=address)
    # address="local" in init_kwargs, not as the runner's address: the runner would log
    # "Connecting to an existing Ray instance at local" just before it starts a new one.
    return ProcessRayTaskRunner(init_kwargs=dict(LOCAL_RAY))


@contextmanager
def shared_prefect_api() -> Iterator[str]:
    """Yield an API URL every process of this machine's flows will use.

    Uses `PREFECT_API_URL` when it is set; otherwise starts a temporary server for the
    duration of the block. Enter it before Ray starts, so the workers see the URL.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        os.environ.setdefault("PREFECT_API_URL", configured)
        yield configured
        return
    from prefect.server.api.server import SubprocessASGIServer

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    server = SubprocessASGIServer()
    server.start(timeout=120)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        from prefect.logging.handlers import APILogWorker

        # Send the last logs while the server still answers; at exit the log worker
        # would otherwise retry against a stopped server for a minute.
        APILogWorker.drain_all(timeout=10)
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
