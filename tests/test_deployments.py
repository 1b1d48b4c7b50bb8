"""prefect.yaml for real: a `prefect server` on a free port, `prefect deploy --all`, a process
worker, each deployment run, and the database checked afterwards."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
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


def end_flow_runs_of(api_url: str) -> None:
    """End the flow-run processes of the Prefect API at `api_url` that are still running.

    A process worker starts each flow run in a session of its own, so stopping the worker
    (or its process group) leaves a run it picked up just before; that run would then wait
    for an API the test stops, holding its local Ray, after the test has ended."""
    import psutil

    runs = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("PREFECT_API_URL") == api_url \
                    and "prefect.engine" in " ".join(proc.cmdline()):
                runs.append(proc)
        except psutil.Error:
            continue
    for proc in runs:
        proc.terminate()  # the run's local Ray stops with it
    _, alive = psutil.wait_procs(runs, timeout=20)
    for proc in alive:
        proc.kill()


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


# What Ray raises when its local node does not register within its fixed 30 s: seen in CI
# runs with a load average of 11 on 2 cores, never otherwise.
RAY_START_TIMED_OUT = "The current node timed out during startup"


def finished_run(server, run_filter: dict, worker_log, timeout: float) -> dict:
    """The first flow run matching `run_filter` (a /flow_runs/filter body) to end, asserted COMPLETED.

    A run that crashed because its local Ray did not start in time is scheduled again, once,
    as a user would retry it from the UI (it keeps its id and `auto_scheduled`)."""
    def ended() -> dict | None:
        runs = api(server, "/flow_runs/filter", run_filter)
        return next((r for r in runs if r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")), None)

    def wait() -> dict:
        return wait_until(ended, timeout, interval=1,
                          what=lambda: f"a flow run {run_filter} to end; worker log:\n{Path(worker_log).read_text()[-4000:]}")

    run = wait()
    log = Path(worker_log).read_text()
    if run["state"]["type"] == "CRASHED" and RAY_START_TIMED_OUT in log:
        print(f"flow run {run['id']} crashed: its local Ray did not start within Ray's 30 s; scheduling it again")
        set_state(server, run["id"], {"type": "SCHEDULED", "name": "Scheduled"})
        run = wait()
    assert run["state"]["type"] == "COMPLETED", (run["state"], Path(worker_log).read_text()[-4000:])
    return run


def set_state(server, flow_run_id: str, state: dict) -> None:
    request = urllib.request.Request(f"{server['url']}/flow_runs/{flow_run_id}/set_state", method="POST",
                                     data=json.dumps({"state": state, "force": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["status"] == "ACCEPT"


def run_deployment(server, name: str, params: dict, worker_log) -> dict:
    out = cli(server, str(BIN / "prefect"), "deployment", "run", name, "--params", json.dumps(params))
    run_id = next(line.split()[-1] for line in out.splitlines() if "UUID:" in line)
    return finished_run(server, {"flow_runs": {"id": {"any_": [run_id]}}}, worker_log, timeout=400)


def readme_deploy_block() -> str:
    section = (ROOT / "README.md").read_text().split("## Maintenance and deployments", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL).group(1)


def test_readme_deployment_block_as_written_then_every_deployment(tmp_path):
    """The README's shell block, run by bash from a copy of the project: a server and a worker
    in the background, `prefect deploy --all --no-prompt`, a run watched to its end. Only the
    port (4200, maybe taken here) and the virtualenv's path are substituted."""
    work, home = tmp_path / "project", tmp_path / "home"
    work.mkdir(), home.mkdir()
    shutil.copy(ROOT / "prefect.yaml", work)
    for folder in ("flows", "blocks", "chia_prefect"):
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    block = readme_deploy_block()
    assert "4200" in block and block.startswith("source .venv/bin/activate\n")
    port = free_port()
    script = block.replace("4200", str(port)).replace(
        "source .venv/bin/activate", f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}", 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PREFECT_HOME=str(home / ".prefect"), PWD=str(work), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="1", PATH=os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                                                       if ".venv" not in p))
    shell = subprocess.Popen(["bash", "-e", "-c", script], cwd=work, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = shell.communicate(timeout=600)
        worker_log = work / "prefect-worker.log"
        assert shell.returncode == 0, out[-4000:] + (worker_log.read_text()[-4000:] if worker_log.exists() else "")
        assert "Flow run finished successfully in 'Completed'" in out, out[-4000:]
        db_path = home / ".local" / "share" / "chia-prefect" / "local.db"
        assert _sqlite(db_path, "SELECT version FROM chia_schema_versions ORDER BY version") == [(1,), (2,)]

        server = {"url": f"http://127.0.0.1:{port}/api", "env": {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}}
        deployments = api(server, "/deployments/filter", {})
        by_name = {d["name"]: d for d in deployments}
        assert set(by_name) == {"nightly", "on-demand", "demo"}
        assert by_name["nightly"]["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        assert by_name["on-demand"]["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(work)}}]

        demo_db = tmp_path / "demo.db"
        run_deployment(server, "atomic-transaction-demo/demo",
                       {"db_path": str(demo_db), "entries": 2, "iterations": 2, "benchmarks": 5}, worker_log)
        assert _sqlite(demo_db, "SELECT COUNT(*) FROM benchmark_results") == [(20,)]

        run_deployment(server, "database-maintenance/nightly", {"keep": 1}, worker_log)
        backups = list((db_path.parent / "backups").glob("local-*.db"))
        assert len(backups) == 1
        assert _sqlite(backups[0], "SELECT COUNT(*) FROM chia_schema_versions") == [(2,)]
    finally:
        end_flow_runs_of(f"http://127.0.0.1:{port}/api")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(shell.pid, sig)  # the server and worker the block left running
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _group_alive(shell.pid):
                time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _sqlite(path: Path, sql: str) -> list[tuple]:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()
