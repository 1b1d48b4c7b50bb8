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
def test_demo_command_prints_summary_is_idempotent_and_keeps_its_ui(tmp_path):
    """`chia-prefect demo` twice on one database, as a newcomer runs it: the first run on a
    temporary Prefect server, the second with `--keep-ui`, which leaves a server with its UI
    and the runs it just made (each run of the command starts a Ray and a Prefect server, so
    one test covers both rather than three runs)."""
    import json
    import signal
    import urllib.request

    db_path = tmp_path / "demo.db"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    outputs, errors, server = [], [], {}
    try:
        for extra in ([], ["--keep-ui"]):
            run = subprocess.run(
                [str(Path(sys.executable).parent / "chia-prefect"), "demo", *extra, "--db-path", str(db_path),
                 "--entries", "2", "--iterations", "3"],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
            )
            kept = re.search(r"The Prefect UI stays up at (http://127\.0\.0\.1:\d+) .*\(server pid (\d+)", run.stdout)
            if kept:
                server = {"ui": kept.group(1), "pid": int(kept.group(2))}
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            outputs.append(run.stdout)
            errors.append(run.stderr)
        assert server, outputs[1][-3000:]
        ui = server["ui"]
        with urllib.request.urlopen(ui, timeout=10) as page:  # the UI itself
            assert page.status == 200 and "<html" in page.read().decode().lower()
        # The "View at" links the second run printed point at this server, and its runs (the
        # demo's flow run and its migration subflow) are there, completed.
        shown = set(re.findall(rf"View at {re.escape(ui)}/runs/flow-run/([0-9a-f-]{{36}})", errors[1]))
        assert len(shown) == 2, errors[1][-3000:]
        body = json.dumps({"flow_runs": {"id": {"any_": sorted(shown)}}}).encode()
        request = urllib.request.Request(f"{ui}/api/flow_runs/filter", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            runs = json.loads(response.read())
        assert sorted(r["state"]["type"] for r in runs) == ["COMPLETED", "COMPLETED"], runs
    finally:
        if server:
            os.kill(server["pid"], signal.SIGTERM)
    assert "schema version: 2   migrations applied now: [1, 2]" in outputs[0]
    assert "schema version: 2   migrations applied now: none" in outputs[1]
    # The second run replaces each iteration's 200 stale rows: deleted, then inserted again.
    assert "engine: sqlite   transactions: 6   rows changed: 1206" in outputs[0]
    assert "engine: sqlite   transactions: 6   rows changed: 2406" in outputs[1]
    for out in outputs:
        assert "iterations stored: 6   benchmark rows stored: 1200" in out
        assert re.search(r"entry-1\s+iteration\s+2\s+score", out)
        assert "bench-000" in out and "over 6 runs" in out
    # Same rows, same summary (the last paragraph says where the UI went).
    stored = [out.split("iterations stored:", 1)[1].rsplit("\n\n", 1)[0] for out in outputs]
    assert stored[0] == stored[1]
    # One Prefect API per run: a temporary server, then the one --keep-ui leaves running.
    assert [e.count("Starting temporary server") for e in errors] == [1, 0]
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
