-- One row per iteration of an optimisation run, and its benchmark results.
CREATE TABLE IF NOT EXISTS iterations (
    entry_id TEXT NOT NULL,
    iteration INTEGER NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (entry_id, iteration)
);
CREATE TABLE IF NOT EXISTS benchmark_results (
    entry_id TEXT NOT NULL,
    iteration INTEGER NOT NULL,
    bench TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (entry_id, iteration, bench)
);
