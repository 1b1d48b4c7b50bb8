"""`FastRayTaskRunner`: prefect-ray's `RayTaskRunner` without the per-task rebuilds.

    from chia_prefect.runner import FastRayTaskRunner

    @flow(task_runner=FastRayTaskRunner())
    def nightly(): ...

The stock runner, per submitted task, re-serialises every Prefect setting on the driver,
makes (and Ray exports) a new remote function, and on the worker rebuilds the settings
model and two API clients, each loading the CA bundle. None of that changes between tasks
of a flow run. This runner keeps:

- on the driver, the serialised settings per settings object (a new object, e.g. from
  `temporary_settings`, gets a new entry) and the flow run's serialised context per flow
  run, each put once in Ray's object store;
- one remote function for all tasks (Ray options are applied per call);
- on each worker, the hydrated settings and the serialised flow run context per driver
  entry (each task still hydrates its own context from it), and one API client per
  (API URL, key, auth) it has talked to.

With no `PREFECT_API_URL` the driver runs a temporary Prefect server; workers on the same
host are handed its URL instead of starting one each. Task runs, states, logs and results
go through Prefect's own task engine as with the stock runner. If a Prefect internal this
relies on is missing (a Prefect outside the tested range), it logs a warning once and
submits through the stock path. Tested with prefect 3.8.x and 3.9.x (`TESTED_PREFECT`) and
prefect-ray 0.6.x; on each, tests/test_runner.py asserts that the fast path is the one taken.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, cast

from prefect.context import (
    AssetContext,
    EngineContext,
    SettingsContext,
    SyncClientContext,
    TagsContext,
    TaskRunContext,
    serialize_context,
)
from prefect.futures import PrefectConcurrentFuture, PrefectFuture
from prefect.logging.loggers import get_logger
from prefect.task_engine import run_task_async, run_task_sync
from prefect.utilities.collections import visit_collection
from prefect.utilities.engine import collect_task_run_inputs_sync
from prefect_ray.context import RemoteOptionsContext
from prefect_ray.task_runners import PrefectRayFuture, RayTaskRunner

logger = get_logger("chia_prefect.runner")

# The Prefect release lines CI tests on (pyproject.toml allows these).
TESTED_PREFECT: tuple[str, ...] = ("3.8", "3.9")

# Everything the fast path touches beyond prefect-ray's public runner. Checked once per
# process; a missing one sends every submit down the stock path.
REQUIRED_INTERNALS: tuple[tuple[str, str], ...] = (
    ("prefect.context", "serialize_context"),
    ("prefect.context", "hydrated_context"),
    ("prefect.context", "_deployment_id"),
    ("prefect.context", "_deployment_parameters"),
    ("prefect.context", "SettingsContext.__var__"),
    ("prefect.context", "SyncClientContext.__var__"),
    ("prefect.context", "AssetContext.from_task_and_inputs"),
    ("prefect.task_engine", "run_task_sync"),
    ("prefect.task_engine", "run_task_async"),
    ("prefect_ray.task_runners", "RayTaskRunner._exchange_prefect_for_ray_futures"),
    ("prefect.server.api.server", "SubprocessASGIServer._instances"),
    ("prefect.events.worker", "EventsWorker._client_override"),
    ("prefect.events.clients", "PrefectEventsClient"),
)
CONTEXT_KEYS = frozenset({
    "flow_run_context", "task_run_context", "tags_context", "settings_context",
    "asset_context", "deployment_id", "deployment_parameters",
})
_SETTINGS_CACHE_SIZE = 16


def _recall(cache: OrderedDict[Any, Any], key: Any) -> Any:
    """The cached value (now the most recent), or None. Call under the cache's lock."""
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    """Cache `value`, dropping the least recent beyond _SETTINGS_CACHE_SIZE. Under the lock."""
    cache[key] = value
    while len(cache) > _SETTINGS_CACHE_SIZE:
        cache.popitem(last=False)

_fast_path_ok: bool | None = None
_fast_path_lock = threading.Lock()

# The task run a Ray task of this runner runs at its top level, while it runs.
_top_task_run: ContextVar[uuid.UUID | None] = ContextVar("chia_top_task_run", default=None)


def result_leaves_pickled() -> bool:
    """Whether the current task run's return value leaves this process pickled: it runs at
    the top of a `FastRayTaskRunner` task on a Ray worker (not nested in another task there),
    so its result may travel as an object that unpickles as the value."""
    top = _top_task_run.get()
    if top is None:
        return False
    ctx = TaskRunContext.get()
    return ctx is not None and ctx.task_run.id == top


def _missing_internals() -> list[str]:
    missing = []
    for module_name, dotted in REQUIRED_INTERNALS:
        try:
            obj: Any = importlib.import_module(module_name)
            for part in dotted.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{dotted}")
    return missing


def fast_path_available() -> bool:
    """Whether this process can use the fast path (checked once, then remembered)."""
    global _fast_path_ok
    if _fast_path_ok is None:
        with _fast_path_lock:
            if _fast_path_ok is None:
                missing = _missing_internals()
                if not missing and set(serialize_context()) != CONTEXT_KEYS:
                    missing.append("prefect.context.serialize_context (its keys changed)")
                if missing:
                    logger.warning(
                        "FastRayTaskRunner: this Prefect lacks %s; submitting through the stock "
                        "RayTaskRunner path (slower, equally correct). Tested with prefect %s.",
                        ", ".join(missing), " and ".join(f"{line}.x" for line in TESTED_PREFECT),
                    )
                _fast_path_ok = not missing
    return _fast_path_ok


def _reset_fast_path_check() -> None:
    """Forget the check (tests change `REQUIRED_INTERNALS`)."""
    global _fast_path_ok
    _fast_path_ok = None


# ---------------------------------------------------------------- driver side

class _SettingsEntry:
    __slots__ = ("context", "key", "ref")

    def __init__(self, context: SettingsContext, key: str, ref: Any) -> None:
        self.context, self.key, self.ref = context, key, ref


_driver_settings: OrderedDict[tuple[int, str], _SettingsEntry] = OrderedDict()
_driver_lock = threading.Lock()


def _ephemeral_api_url() -> str | None:
    """The URL of the temporary Prefect server this process runs, if it runs one."""
    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:
        return None
    for server in list(server_module.SubprocessASGIServer._instances.values()):
        process = getattr(server, "server_process", None)
        if getattr(server, "running", False) and process is not None and process.poll() is None:
            return str(server.api_url)
    return None


def _settings_entry(ray: Any) -> _SettingsEntry:
    """The driver's serialised settings, once per settings object and Ray job."""
    # Prefect enters a root settings context on import: there is always one.
    settings_ctx = cast(SettingsContext, SettingsContext.get())
    job = ray.get_runtime_context().get_job_id()
    cache_key = (id(settings_ctx), job)
    with _driver_lock:
        entry: _SettingsEntry | None = _recall(_driver_settings, cache_key)
        if entry is not None and entry.context is settings_ctx:
            return entry
        payload = settings_ctx.serialize()
        ephemeral = None
        if not settings_ctx.settings.api.url:
            ephemeral = (socket.gethostname(), _ephemeral_api_url())
        key = uuid.uuid4().hex
        # The reference keeps the object alive, so `id` is not reused while cached.
        entry = _SettingsEntry(settings_ctx, key, ray.put((payload, ephemeral)))
        _remember(_driver_settings, cache_key, entry)
        return entry


class _FlowContextEntry:
    __slots__ = ("context", "flow_run", "key", "parameters", "ref", "result_store")

    def __init__(self, context: EngineContext, key: str, ref: Any) -> None:
        self.context, self.key, self.ref = context, key, ref
        self.flow_run = getattr(context, "flow_run", None)
        self.parameters = getattr(context, "parameters", None)
        self.result_store = getattr(context, "result_store", None)

    def matches(self, context: EngineContext) -> bool:
        return (self.context is context and self.flow_run is getattr(context, "flow_run", None)
                and self.parameters is getattr(context, "parameters", None)
                and self.result_store is getattr(context, "result_store", None))


_driver_flow_contexts: OrderedDict[tuple[int, str], _FlowContextEntry] = OrderedDict()


def _flow_context_entry(ray: Any, flow_run_context: EngineContext | None) -> tuple[str, Any] | None:
    """The flow run's serialised context, put in Ray's object store once per flow run (and
    Ray job). Serialising it per task cost ~2 ms: the result store's storage block renders
    its JSON schema each time, and the flow travels pickled with every task."""
    if flow_run_context is None:
        return None
    job = ray.get_runtime_context().get_job_id()
    cache_key = (id(flow_run_context), job)
    with _driver_lock:
        entry: _FlowContextEntry | None = _recall(_driver_flow_contexts, cache_key)
        if entry is not None and entry.matches(flow_run_context):
            return entry.key, entry.ref
        # The entry keeps the context alive, so `id` is not reused while cached.
        entry = _FlowContextEntry(flow_run_context, uuid.uuid4().hex, ray.put(flow_run_context.serialize()))
        _remember(_driver_flow_contexts, cache_key, entry)
        return entry.key, entry.ref


def _serialize_context_without_settings(asset_ctx_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`prefect.context.serialize_context` minus the settings and the flow run's context,
    which travel cached (the caller fills in neither)."""
    from prefect.context import _deployment_id, _deployment_parameters

    task_run_context = TaskRunContext.get()
    tags_context = TagsContext.get()
    deployment_id = _deployment_id.get()
    return {
        "flow_run_context": {},
        "task_run_context": task_run_context.serialize() if task_run_context else {},
        "tags_context": tags_context.serialize() if tags_context else {},
        "settings_context": {},
        "asset_context": AssetContext.from_task_and_inputs(**asset_ctx_kwargs).serialize(),
        "deployment_id": str(deployment_id) if deployment_id else None,
        "deployment_parameters": _deployment_parameters.get(),
    }


_remote_function: Any = None


def _remote(ray: Any) -> Any:
    """One Ray remote function for every task; options are given per call."""
    global _remote_function
    if _remote_function is None:
        _remote_function = ray.remote(_run_prefect_task_fast)
    return _remote_function


class FastRayTaskRunner(RayTaskRunner[Any]):
    """prefect-ray's `RayTaskRunner`, caching what does not change between tasks.

    Takes the same arguments (`address`, `init_kwargs`). Futures, states and Ray options
    (`prefect_ray.context.remote_options`) behave as with the stock runner.
    """

    def submit(  # type: ignore[override,unused-ignore]
        self,
        task: Any,
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectFuture[Any]] | None = None,
        dependencies: dict[str, set[Any]] | None = None,
    ) -> PrefectRayFuture[Any]:
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        if not fast_path_available():
            return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)
        import ray

        task_run_id = uuid.uuid4()
        task_inputs = {
            k: collect_task_run_inputs_sync(v, future_cls=PrefectRayFuture) for k, v in parameters.items()
        }
        context = _serialize_context_without_settings({
            "task": task, "task_run_id": task_run_id, "task_inputs": task_inputs, "copy_to_child_ctx": True,
        })
        settings = _settings_entry(ray)
        flow_context = _flow_context_entry(ray, EngineContext.get())
        parameters, upstream_refs = self._exchange_prefect_for_ray_futures(parameters)
        options = dict(RemoteOptionsContext.get().current_remote_options or {})
        options["name"] = task.name
        object_ref = _remote(ray).options(**options).remote(
            *upstream_refs,
            task=task,
            task_run_id=task_run_id,
            parameters=parameters,
            wait_for=wait_for,
            dependencies=dependencies,
            context=context,
            # Nested in a tuple, the reference is not resolved by Ray: a worker fetches it
            # only the first time it sees the key.
            settings=(settings.key, settings.ref),
            flow_context=flow_context,
        )
        return PrefectRayFuture(task_run_id=task_run_id, wrapped_future=object_ref)

    def __exit__(self, *exc_info: Any) -> None:
        # The flow run's cached context (and its copy in Ray's object store) goes with it.
        with _driver_lock:
            for cache_key in [k for k, e in _driver_flow_contexts.items()
                              if getattr(e.context, "task_runner", None) is self]:
                del _driver_flow_contexts[cache_key]
        # The run's context is already reset: hooks release what the run reserved now
        # (chia-prefect's nodes register one), before the stock runner may shut down a Ray
        # it started.
        try:
            for hook in list(_exit_hooks):
                hook(self)
        finally:
            super().__exit__(*exc_info)


_exit_hooks: list[Callable[[Any], None]] = []


def add_exit_hook(hook: Callable[[Any], None], first: bool = False) -> None:
    """Call `hook(runner)` as every `FastRayTaskRunner` exits, once per hook (`first`: before
    the others). The runner imports nothing else of chia-prefect: the package's parts
    register what they need."""
    if hook not in _exit_hooks:
        _exit_hooks.insert(0, hook) if first else _exit_hooks.append(hook)


def _driver_futures_to_ray(ray: Any, value: Any) -> Any:
    """A future of a task run in a thread of this process (a chia-prefect member's task
    engine runs on the driver) cannot travel to a Ray worker: wait for it here and pass its
    final state through Ray's object store, as a Ray future the worker resolves."""
    def swap(expr: Any) -> Any:
        if isinstance(expr, PrefectConcurrentFuture):
            expr.wait()
            return PrefectRayFuture(task_run_id=expr.task_run_id, wrapped_future=ray.put(expr.state))
        return expr

    return visit_collection(value, visit_fn=swap, return_data=True)


def _exchange_driver_futures(submit: Callable[..., Any]) -> Callable[..., Any]:
    def exchanging_submit(self: Any, task: Any, parameters: dict[str, Any], wait_for: Any = None,
                          dependencies: Any = None) -> Any:
        import ray

        parameters = _driver_futures_to_ray(ray, parameters)
        if wait_for:
            wait_for = _driver_futures_to_ray(ray, list(wait_for))
        return submit(self, task, parameters, wait_for=wait_for, dependencies=dependencies)

    exchanging_submit.__wrapped__ = submit  # type: ignore[attr-defined]
    return exchanging_submit


if not hasattr(RayTaskRunner.submit, "__wrapped__"):
    RayTaskRunner.submit = _exchange_driver_futures(RayTaskRunner.submit)  # type: ignore[method-assign]
FastRayTaskRunner.submit = _exchange_driver_futures(FastRayTaskRunner.submit)  # type: ignore[method-assign]


# ---------------------------------------------------------------- worker side

_worker_settings: OrderedDict[str, SettingsContext] = OrderedDict()
_worker_flow_contexts: OrderedDict[str, dict[str, Any]] = OrderedDict()
_clients: dict[tuple[Any, ...], SyncClientContext] = {}
_worker_lock = threading.Lock()


def _worker_settings_context(key: str, ref: Any) -> SettingsContext:
    with _worker_lock:
        cached: SettingsContext | None = _recall(_worker_settings, key)
        if cached is not None:
            return cached
    import ray

    payload, ephemeral = ray.get(ref)
    settings_ctx = SettingsContext(**payload)
    if ephemeral is not None:
        host, url = ephemeral
        if url and host == socket.gethostname():
            # The driver's temporary server listens on 127.0.0.1: reachable from here only.
            from prefect.settings import PREFECT_API_URL

            settings_ctx = SettingsContext(
                profile=settings_ctx.profile,
                settings=settings_ctx.settings.copy_with_update(updates={PREFECT_API_URL: url}),
            )
    with _worker_lock:
        _remember(_worker_settings, key, settings_ctx)
    return settings_ctx


def _worker_flow_context(key: str, ref: Any) -> dict[str, Any]:
    """The flow run's serialised context, fetched the first time this worker sees its key.
    Each task hydrates a new context from it, as from the stock runner's copy."""
    with _worker_lock:
        cached: dict[str, Any] | None = _recall(_worker_flow_contexts, key)
        if cached is not None:
            return cached
    import ray

    serialized: dict[str, Any] = ray.get(ref)
    with _worker_lock:
        _remember(_worker_flow_contexts, key, serialized)
    return serialized


def process_client(settings_ctx: SettingsContext) -> SyncClientContext | None:
    """One started sync client per API this process talks to (None: no API URL set): a Ray
    worker's tasks share it, and so do members called outside a flow run (`member_client`)."""
    api = settings_ctx.settings.api
    if not api.url:
        return None
    secret = api.key.get_secret_value() if api.key else None
    auth = api.auth_string.get_secret_value() if api.auth_string else None
    client_key = (api.url, secret, auth)
    with _worker_lock:
        client_ctx = _clients.get(client_key)
        if client_ctx is None:
            token = SettingsContext.__var__.set(settings_ctx)
            try:
                client_ctx = SyncClientContext()
                client_ctx.client.__enter__()
                if settings_ctx.settings.client.server_version_check_enabled:
                    client_ctx.client.raise_for_api_version_mismatch_once()
            finally:
                SettingsContext.__var__.reset(token)
            _clients[client_key] = client_ctx
    return client_ctx


@contextmanager
def member_client() -> Iterator[None]:
    """For a member called outside a flow run: Prefect opens a new API client for every task
    run it finds no client for, most of the cost building a TLS context; share this process's
    client for the current settings instead."""
    settings_ctx = SettingsContext.get()
    client_ctx = None
    if SyncClientContext.get() is None and settings_ctx is not None:
        client_ctx = process_client(settings_ctx)
    token = SyncClientContext.__var__.set(client_ctx) if client_ctx else None
    try:
        yield
    finally:
        if token is not None:
            SyncClientContext.__var__.reset(token)


def _run_prefect_task_fast(
    *upstream_refs: Any,
    task: Any,
    task_run_id: uuid.UUID,
    context: dict[str, Any],
    settings: tuple[str, Any],
    parameters: dict[str, Any],
    flow_context: tuple[str, Any] | None = None,
    wait_for: Iterable[PrefectFuture[Any]] | None = None,
    dependencies: dict[str, set[Any]] | None = None,
) -> Any:
    """The worker's half: the stock `_run_prefect_task` with cached settings and client."""
    import ray

    settings_ctx = _worker_settings_context(*settings)
    if flow_context is not None:
        context = {**context, "flow_run_context": _worker_flow_context(*flow_context)}
    parameters = visit_collection(
        parameters, visit_fn=lambda x: ray.get(x) if isinstance(x, ray.ObjectRef) else x, return_data=True
    )
    run_kwargs: dict[str, Any] = {
        "task": task, "task_run_id": task_run_id, "parameters": parameters, "wait_for": wait_for,
        "dependencies": dependencies, "context": context, "return_type": "state",
    }
    settings_token = SettingsContext.__var__.set(settings_ctx)
    top_token = _top_task_run.set(task_run_id)
    try:
        with _events_sent_to(settings_ctx):
            client_ctx = process_client(settings_ctx)
            client_token = SyncClientContext.__var__.set(client_ctx) if client_ctx else None
            try:
                if task.isasync:
                    return asyncio.run(run_task_async(**run_kwargs))
                return run_task_sync(**run_kwargs)
            finally:
                if client_token is not None:
                    SyncClientContext.__var__.reset(client_token)
    finally:
        _top_task_run.reset(top_token)
        SettingsContext.__var__.reset(settings_token)


_events_lock = threading.Lock()
_events_routes: dict[str, int] = {}  # API URL -> how many task runs now send their events there
_events_before: list[Any] = []  # the override in place before the first of them


def route_events(url: str | None, cloud: str | None) -> str | None:
    """Send this process's task run events to `url` from now until `unroute_events(url)`.

    Prefect keeps one events worker per process for every non-Cloud API, bound to the URL
    it saw first, so a process that served another API before would send them there. Keyed
    by URL they go where the task's settings say. Counted: task runs for the same API may
    overlap (a flow run's members in its threads); the previous routing comes back when the
    last one ends. Returns the key to pass to `unroute_events` (None: nothing to undo).
    """
    from prefect.events.clients import PrefectEventsClient
    from prefect.events.worker import EventsWorker

    if not url or (cloud and url.startswith(cloud)):
        return None  # Cloud's events worker is already keyed by URL and key
    with _events_lock:
        if not _events_routes:
            _events_before[:] = [EventsWorker._client_override]
        _events_routes[url] = _events_routes.get(url, 0) + 1
        EventsWorker._client_override = (PrefectEventsClient, (("api_url", url),))
    return url


def unroute_events(url: str | None) -> None:
    from prefect.events.clients import PrefectEventsClient
    from prefect.events.worker import EventsWorker

    if url is None:
        return
    with _events_lock:
        left = _events_routes.get(url, 0) - 1
        if left > 0:
            _events_routes[url] = left
        else:
            _events_routes.pop(url, None)
        if _events_routes:  # others still run: route to one of theirs
            EventsWorker._client_override = (PrefectEventsClient, (("api_url", next(iter(_events_routes))),))
        else:
            EventsWorker._client_override = _events_before[0] if _events_before else None


def settings_api(settings_ctx: SettingsContext | None) -> tuple[str | None, str | None]:
    """The API URL and the Cloud API URL of these settings."""
    if settings_ctx is None:
        return None, None
    settings = settings_ctx.settings
    url, cloud = settings.api.url, settings.cloud.api_url
    return (str(url) if url else None), (str(cloud) if cloud else None)


@contextmanager
def _events_sent_to(settings_ctx: SettingsContext) -> Iterator[None]:
    """Route this task's events to the settings' API (`route_events`)."""
    key = route_events(*settings_api(settings_ctx))
    try:
        yield
    finally:
        unroute_events(key)
