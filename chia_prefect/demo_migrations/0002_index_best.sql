-- Serves "best value per benchmark".
CREATE INDEX IF NOT EXISTS ix_benchmark_results_bench ON benchmark_results (bench, value);
