"""Bulk ingest through a node member on Ray, as ratios against baselines from the same run.

    .venv/bin/python bench/bulk_ingest.py [--rows 100000] [--repeat 3]

Baselines: raw sqlite3 `executemany` in this process; a bare Prefect task on the same
RayTaskRunner that receives the rows as a plain list parameter (Prefect walks it); a no-op
Prefect task on the same runner (the fixed cost of one task). Prints a table and writes
bench/results/bulk_ingest.json. Medians of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect_ray import RayTaskRunner  # noqa: E402

from chia_prefect import SQLiteNode  # noqa: E402
from chia_prefect.local import shared_prefect_api  # noqa: E402

SCHEMA = "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, name TEXT, value REAL)"
INSERT = "INSERT INTO t (id, name, value) VALUES (?, ?, ?)"


def make_rows(n: int) -> list[tuple]:
    return [(i, f"name-{i}", i * 0.5) for i in range(n)]


def raw_ingest(path: str, rows: list[tuple]) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(SCHEMA)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    start = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(INSERT, rows)
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


@task(cache_policy=NO_CACHE)
def plain_ingest(path: str, rows: list) -> int:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(INSERT, rows)
    conn.execute("COMMIT")
    conn.close()
    return len(rows)


@task(cache_policy=NO_CACHE)
def noop() -> None:
    return None


@flow(task_runner=RayTaskRunner())
def measure(workdir: str, n_rows: int, repeat: int) -> dict:
    rows = make_rows(n_rows)  # built here: a flow parameter of 100k rows is refused by the API
    times: dict[str, list[float]] = {"member": [], "plain_task": [], "noop_task": []}
    noop.submit().result()  # warm a worker
    for r in range(repeat):
        with SQLiteNode(db_path=f"{workdir}/member-{r}.db") as db:
            db.init_schema(SCHEMA)
            start = time.perf_counter()
            assert db.executemany(INSERT, rows).rowcount == len(rows)
            times["member"].append(time.perf_counter() - start)
        path = f"{workdir}/plain-{r}.db"
        sqlite3.connect(path).executescript(SCHEMA)
        start = time.perf_counter()
        plain_ingest.submit(path, rows).result()
        times["plain_task"].append(time.perf_counter() - start)
        start = time.perf_counter()
        noop.submit().result()
        times["noop_task"].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = make_rows(args.rows)
    workdir = tempfile.mkdtemp(prefix="chia-bench-")
    raw = statistics.median(raw_ingest(f"{workdir}/raw-{r}.db", rows) for r in range(args.repeat))
    import ray

    with shared_prefect_api():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            measured = measure(workdir, args.rows, args.repeat)
        finally:
            ray.shutdown()
    medians = {"raw_sqlite3": raw, **{k: statistics.median(v) for k, v in measured.items()}}
    report = {
        "rows": args.rows,
        "repeat": args.repeat,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "seconds": medians,
        "ratio_vs_raw": {k: v / raw for k, v in medians.items()},
    }
    print(f"\nbulk ingest of {args.rows} rows, median of {args.repeat} ({report['machine']})")
    print(f"{'path':<14}{'seconds':>10}{'x raw':>9}")
    for name, seconds in medians.items():
        print(f"{name:<14}{seconds:>10.3f}{seconds / raw:>9.1f}")
    out = Path(__file__).resolve().parent / "results" / "bulk_ingest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
