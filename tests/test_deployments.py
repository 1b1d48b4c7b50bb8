"""prefect.yaml for real: a `prefect server` on a free port, `prefect deploy --all`, a process
worker, each deployment run, and the database checked afterwards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"prefect server at {url} did not become healthy")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="false")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(url)
        env.update(PREFECT_API_URL=url, PREFECT_WORKER_QUERY_SECONDS="1")
        yield {"url": url, "env": env}
    finally:
        proc.terminate()
        proc.wait(30)


def stop(process: subprocess.Popen) -> None:
    """Stop a worker; one still draining its flow-run subprocess is killed after 60 s."""
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)


def cli(server, *args: str, timeout: float = 300) -> str:
    run = subprocess.run(args, cwd=ROOT, env=server["env"], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{args}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


def api(server, path: str, body: dict | None = None, attempts: int = 4) -> object:
    """Read from the server's API (GET, or POST for the read-only /filter endpoints).

    A server sharing 2 cores with a worker that is starting Ray can take longer than the 30 s
    timeout to answer one request; the read is repeated instead of failing the test on it."""
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(f"{server['url']}{path}", data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except (TimeoutError, ConnectionError, urllib.error.URLError) as exc:
            transient = not isinstance(exc, urllib.error.URLError) or isinstance(exc.reason, (TimeoutError, ConnectionError))
            if not transient or isinstance(exc, urllib.error.HTTPError):
                raise
            if attempt == attempts:
                raise AssertionError(f"{path}: no answer from {server['url']} in {attempts} tries of 30 s") from exc
            time.sleep(2)


def finished_run(server, run_filter: dict, worker_log, timeout: float) -> dict:
    """The first flow run matching `run_filter` (a /flow_runs/filter body) to end, asserted COMPLETED."""
    def ended() -> dict | None:
        runs = api(server, "/flow_runs/filter", run_filter)
        return next((r for r in runs if r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")), None)

    run = wait_until(ended, timeout, interval=1,
                     what=lambda: f"a flow run {run_filter} to end; worker log:\n{Path(worker_log).read_text()[-4000:]}")
    assert run["state"]["type"] == "COMPLETED", (run["state"], Path(worker_log).read_text()[-4000:])
    return run


def run_deployment(server, name: str, params: dict, worker_log) -> dict:
    out = cli(server, str(BIN / "prefect"), "deployment", "run", name, "--params", json.dumps(params))
    run_id = next(line.split()[-1] for line in out.splitlines() if "UUID:" in line)
    return finished_run(server, {"flow_runs": {"id": {"any_": [run_id]}}}, worker_log, timeout=400)


def test_deploy_and_run_every_deployment(server, tmp_path):
    db_path = tmp_path / "ops" / "local.db"
    prefect = str(BIN / "prefect")
    cli(server, prefect, "work-pool", "create", "chia-local", "--type", "process")
    cli(server, prefect, "block", "register", "-m", "chia_prefect")
    cli(server, sys.executable, "blocks/save_examples.py", "--sqlite-path", str(db_path))
    cli(server, prefect, "--no-prompt", "deploy", "--all")

    deployments = api(server, "/deployments/filter", {})
    by_name = {d["name"]: d for d in deployments}
    assert set(by_name) == {"nightly", "on-demand", "demo"}
    assert by_name["nightly"]["schedules"][0]["schedule"]["cron"] == "0 3 * * *"

    worker_log = tmp_path / "worker.log"
    with open(worker_log, "w") as log:
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "chia-local"], cwd=ROOT,
                                  env=server["env"], stdout=log, stderr=subprocess.STDOUT)
    try:
        run_deployment(server, "migrate-database/on-demand", {}, worker_log)
        conn_rows = _sqlite(db_path, "SELECT version FROM chia_schema_versions ORDER BY version")
        assert conn_rows == [(1,), (2,)]

        demo_db = tmp_path / "demo.db"
        run_deployment(server, "atomic-transaction-demo/demo",
                       {"db_path": str(demo_db), "entries": 2, "iterations": 2, "benchmarks": 5}, worker_log)
        assert _sqlite(demo_db, "SELECT COUNT(*) FROM benchmark_results") == [(20,)]

        run_deployment(server, "database-maintenance/nightly", {"keep": 1}, worker_log)
        backups = list((db_path.parent / "backups").glob("local-*.db"))
        assert len(backups) == 1
        assert _sqlite(backups[0], "SELECT COUNT(*) FROM chia_schema_versions") == [(2,)]
    finally:
        stop(worker)


def _sqlite(path: Path, sql: str) -> list[tuple]:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()
