"""FastRayTaskRunner records what the stock RayTaskRunner records, only faster.

Side by side on the same Ray cluster and Prefect API: task runs, states, logs, results and
dependencies; settings changed between flow runs; two APIs; the fallback to the stock path;
a driver with a temporary Prefect server (workers use it instead of starting their own).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import runner_flows
from helpers import wait_until
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_TASK_DEFAULT_RETRY_DELAY_SECONDS,
    temporary_settings,
)

from chia_prefect import runner

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

ROOT = Path(__file__).resolve().parent.parent


def _recorded(flow_run_id, expected_tasks: int, expected_logs: int, timeout: float = 30.0) -> dict:
    """Task runs and task logs of a flow run, once the API has them all."""
    deadline = time.monotonic() + timeout
    seen = None
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        task_logs = [log for log in logs if log.task_run_id is not None]
        done = all(run.state and run.state.is_final() for run in runs)
        complete = len(runs) >= expected_tasks and len(task_logs) >= expected_logs and done
        # Workers ship logs in batches: "complete" once the count also holds still for 3 s.
        if (complete and seen == (len(runs), len(task_logs))) or time.monotonic() > deadline:
            break
        seen = (len(runs), len(task_logs)) if complete else None
        time.sleep(3 if complete else 0.5)
    by_id = {run.id: run for run in runs}
    return {
        "runs": sorted(
            (run.task_key.split("-")[0] if not run.task_key.startswith("sqlite.") else run.task_key,
             run.name.rsplit("-", 1)[0], run.state.type.value, run.state.name, tuple(sorted(run.tags)))
            for run in runs
        ),
        "upstream": sorted(
            (run.name.rsplit("-", 1)[0], name, by_id[inp.id].name.rsplit("-", 1)[0])
            for run in runs for name, inputs in run.task_inputs.items() for inp in inputs
            if getattr(inp, "input_type", None) == "task_run" and inp.id in by_id
        ),
        "logs": sorted((by_id[log.task_run_id].name.rsplit("-", 1)[0], log.level, log.message) for log in task_logs),
    }


def test_records_the_same_as_the_stock_runner(tmp_path):
    stock_state = runner_flows.stock_pipeline(str(tmp_path / "stock.db"), return_state=True)
    fast_state = runner_flows.fast_pipeline(str(tmp_path / "fast.db"), return_state=True)
    stock_result, fast_result = stock_state.result(), fast_state.result()
    assert fast_result == stock_result
    assert fast_result["second"] == 6 and fast_result["squared"] == 16 and fast_result["tagged"] == 30
    assert fast_result["failed"] == "State:FAILED" and "exploded: on purpose" in fast_result["failed_message"]
    assert fast_result["rows"] == [{"id": 1, "v": "x"}]

    # add x2, double, async_square, explode, init_schema, execute, query; logs: 2 adds + 1 square
    stock = _recorded(stock_state.state_details.flow_run_id, expected_tasks=8, expected_logs=3)
    fast = _recorded(fast_state.state_details.flow_run_id, expected_tasks=8, expected_logs=3)
    assert len(fast["runs"]) == 8, fast["runs"]
    assert fast == stock
    assert ("double", "x", "add") in fast["upstream"]
    assert any(run[1] == "explode" and run[2] == "FAILED" for run in fast["runs"])
    assert any(run[1] == "add" and run[4] == ("side-by-side",) for run in fast["runs"])
    assert {log[2] for log in fast["logs"]} >= {"adding 1 and 2", "squaring 4"}


def test_takes_the_fast_path_and_honours_settings_changed_between_flow_runs():
    with temporary_settings({PREFECT_TASK_DEFAULT_RETRY_DELAY_SECONDS: 7}):
        first = runner_flows.fast_views(2)
    with temporary_settings({PREFECT_TASK_DEFAULT_RETRY_DELAY_SECONDS: 11}):
        second = runner_flows.fast_views(2)
    third = runner_flows.fast_views(1)
    assert [view["retry_delay"] for view in first] == [7, 7]
    assert [view["retry_delay"] for view in second] == [11, 11]
    assert third[0]["retry_delay"] == 0
    assert all(view["fast_path"] and not view["stock_path"] for view in first + second + third)
    stock = runner_flows.stock_views(1)
    assert stock[0]["stock_path"] and not stock[0]["fast_path"]


def test_the_fast_path_is_taken_on_this_prefect():
    """On every Prefect line CI runs (3.8.x and 3.9.x, one job each), the fast path is available
    and taken: a Prefect that moved an internal would otherwise fall back to the stock path and
    every other test here would pass on the slow path unnoticed."""
    import prefect

    line = ".".join(prefect.__version__.split(".")[:2])
    assert line in runner.TESTED_PREFECT, f"prefect {prefect.__version__} is not a tested line {runner.TESTED_PREFECT}"
    runner._reset_fast_path_check()
    assert runner._missing_internals() == []
    assert runner.fast_path_available()
    views = runner_flows.fast_views(2)
    assert all(view["fast_path"] and not view["stock_path"] for view in views), views


def test_a_second_api_gets_its_own_client(tmp_path):
    """Flow runs against two Prefect servers: each worker talks to the one its flow used."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    other = SubprocessASGIServer(port=_free_port())
    # The server inherits the current settings: give it a database of its own.
    with temporary_settings({PREFECT_API_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{tmp_path}/other.db"}):
        other.start(timeout=120)
    try:
        first_api = PREFECT_API_URL.value()
        with temporary_settings({PREFECT_API_URL: other.api_url}):
            state = runner_flows.fast_views(2, return_state=True)
            on_other = state.result()
            with get_client(sync_client=True) as client:
                assert client.read_flow_run(state.state_details.flow_run_id).name
        back = runner_flows.fast_views(1, return_state=True)
        assert {view["api"].rstrip("/") for view in on_other} == {other.api_url.rstrip("/")}
        assert back.result()[0]["api"].rstrip("/") == first_api.rstrip("/")
        with get_client(sync_client=True) as client:
            from prefect.exceptions import ObjectNotFound

            with pytest.raises(ObjectNotFound):
                client.read_flow_run(state.state_details.flow_run_id)  # it lives on the other server
            assert client.read_flow_run(back.state_details.flow_run_id).state.is_completed()
            # Task runs are recorded from the workers' events: each server has its flow's.
            assert _task_run_count(client, back.state_details.flow_run_id, 1) == 1
        with temporary_settings({PREFECT_API_URL: other.api_url}), get_client(sync_client=True) as client:
            assert _task_run_count(client, state.state_details.flow_run_id, 2) == 2
    finally:
        other.stop()


def test_members_called_outside_a_flow_share_one_client(sqlite_db):
    """Prefect opens a new API client for each task run outside a flow run (mostly TLS
    setup); a member called there uses this process's client for the current API instead."""
    def ours() -> list:
        return [ctx for key, ctx in runner._clients.items() if key[0] == PREFECT_API_URL.value()]

    sqlite_db.init_schema("CREATE TABLE t (x INTEGER)")
    first = ours()
    assert len(first) == 1
    state = sqlite_db.execute("INSERT INTO t VALUES (1)", return_state=True)
    assert state.is_completed() and sqlite_db.query_value("SELECT count(*) FROM t") == 1
    assert len(ours()) == 1 and ours()[0] is first[0]
    with get_client(sync_client=True) as client:  # the calls are still recorded (from their events)
        task_run = wait_until(lambda: _read_or_none(client, state.state_details.task_run_id), timeout=30,
                              interval=0.5, what="the task run of a call outside a flow")
        assert task_run.name.startswith("sqlite.execute") and task_run.state.is_completed()


def _read_or_none(client, task_run_id):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_task_run(task_run_id)
    except ObjectNotFound:
        return None


def _task_run_count(client, flow_run_id, expected: int, timeout: float = 30) -> int:
    """How many task runs the client's server records for the flow run, once it has `expected`."""
    def count() -> int | None:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return len(runs) if len(runs) >= expected else None

    return wait_until(count, timeout, interval=0.5, what=f"{expected} task runs of flow run {flow_run_id}")


def test_falls_back_to_the_stock_path_when_an_internal_is_missing(monkeypatch, caplog):
    monkeypatch.setattr(runner, "REQUIRED_INTERNALS", (*runner.REQUIRED_INTERNALS, ("prefect.context", "NoSuchThing")))
    runner._reset_fast_path_check()
    try:
        views = runner_flows.fast_views(2)
        assert not runner.fast_path_available()
    finally:
        runner._reset_fast_path_check()
    assert all(view["stock_path"] and not view["fast_path"] for view in views)
    assert "prefect.context.NoSuchThing" in caplog.text and "stock" in caplog.text


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


EPHEMERAL_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import ray
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from chia_prefect.runner import FastRayTaskRunner

    @task(cache_policy=NO_CACHE)
    def seen():
        from prefect.settings import PREFECT_API_URL
        server = sys.modules.get("prefect.server.api.server")
        own = [s for s in server.SubprocessASGIServer._instances.values() if s.running] if server else []
        return {"api": PREFECT_API_URL.value(), "own_servers": len(own), "pid": os.getpid()}

    @flow(task_runner=FastRayTaskRunner())
    def probe():
        return [seen.submit().result() for _ in range(3)]

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    views = probe()
    server = sys.modules["prefect.server.api.server"]
    driver = [s.api_url for s in server.SubprocessASGIServer._instances.values() if s.running]
    print("RESULT " + json.dumps({"views": views, "driver": driver}))
""")


@pytest.mark.slow
def test_workers_use_the_drivers_temporary_server(tmp_path):
    """No PREFECT_API_URL: the driver starts a temporary server; workers must not start their own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=str(ROOT), PREFECT_LOGGING_LEVEL="WARNING")
    out = subprocess.run([sys.executable, "-c", EPHEMERAL_SCRIPT], check=False, env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=240)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-2000:] + out.stderr[-4000:]
    import json

    result = json.loads(lines[0][len("RESULT "):])
    assert len(result["driver"]) == 1
    assert [view["api"] for view in result["views"]] == result["driver"] * 3
    assert all(view["own_servers"] == 0 for view in result["views"])
