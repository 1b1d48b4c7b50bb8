ALTER TABLE runs ADD COLUMN score REAL;
CREATE INDEX ix_runs_score ON runs (score);
