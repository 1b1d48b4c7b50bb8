"""The README's main job: the atomic transaction demo, as a user runs it and as a flow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_command_prints_summary_and_is_idempotent(tmp_path):
    db_path = tmp_path / "demo.db"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    outputs, errors = [], []
    for _ in range(2):
        run = subprocess.run(
            [str(Path(sys.executable).parent / "chia-prefect"), "demo", "--db-path", str(db_path),
             "--entries", "2", "--iterations", "3"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        outputs.append(run.stdout)
        errors.append(run.stderr)
    assert "schema version: 2   migrations applied now: [1, 2]" in outputs[0]
    assert "schema version: 2   migrations applied now: none" in outputs[1]
    # The second run replaces each iteration's 200 stale rows: deleted, then inserted again.
    assert "engine: sqlite   transactions: 6   rows changed: 1206" in outputs[0]
    assert "engine: sqlite   transactions: 6   rows changed: 2406" in outputs[1]
    for out in outputs:
        assert "iterations stored: 6   benchmark rows stored: 1200" in out
        assert re.search(r"entry-1\s+iteration\s+2\s+score", out)
        assert "bench-000" in out and "over 6 runs" in out
    stored = [out.split("iterations stored:", 1)[1] for out in outputs]
    assert stored[0] == stored[1]  # same rows, same summary
    # One Prefect API per run.
    assert [e.count("Starting temporary server") for e in errors] == [1, 1]
    # Clean output: no failed probe, no traceback, no Ray notices meant for someone else.
    for text in (*outputs, *errors):
        for noise in ("ERROR", "Traceback", "Failed", "Connecting to an existing Ray instance",
                      "Token authentication", "RAY_DEDUP_LOGS", "UserWarning"):
            assert noise not in text, (noise, text[-3000:])
    assert "chia-prefect demo --keep-ui" in outputs[0]


@pytest.mark.ray
@pytest.mark.postgres
def test_demo_flow_on_postgres_block(ray_cluster, postgres_db):
    sys.path.insert(0, str(ROOT))
    from flows.atomic_demo import atomic_demo, format_summary

    postgres_db.save("demo-pg", overwrite=True)
    summary = atomic_demo(block="postgres-node/demo-pg", entries=2, iterations=2, benchmarks=10)
    assert summary["engine"] == "postgres"
    assert (summary["transactions"], summary["iterations"], summary["benchmark_rows"]) == (4, 4, 40)
    assert [r["iteration"] for r in summary["latest"]] == [1, 1]
    assert "engine: postgres" in format_summary(summary)


@pytest.mark.slow
def test_demo_keep_ui_leaves_a_server_with_the_runs(tmp_path):
    import json
    import signal
    import urllib.request

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    run = subprocess.run(
        [str(Path(sys.executable).parent / "chia-prefect"), "demo", "--keep-ui", "--db-path", str(tmp_path / "demo.db"),
         "--entries", "1", "--iterations", "2", "--benchmarks", "5"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )
    match = re.search(r"The Prefect UI stays up at (http://127\.0\.0\.1:\d+) .*\(server pid (\d+)", run.stdout)
    assert run.returncode == 0 and match, run.stdout[-3000:] + run.stderr[-3000:]
    url, pid = match.group(1), int(match.group(2))
    try:
        with urllib.request.urlopen(url, timeout=10) as page:  # the UI itself
            assert page.status == 200 and "<html" in page.read().decode().lower()
        body = json.dumps({"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}).encode()
        request = urllib.request.Request(f"{url}/api/flow_runs/filter", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            runs = json.loads(response.read())
        assert len(runs) == 2, runs  # the demo's flow run and its migration subflow
        # The "View at" links the demo printed point at this server.
        assert f"View at {url}/runs/flow-run/" in run.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
