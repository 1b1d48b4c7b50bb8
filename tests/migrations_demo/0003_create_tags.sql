CREATE TABLE tags (run_id INTEGER NOT NULL REFERENCES runs (id), tag TEXT NOT NULL);
INSERT INTO runs (id, label, score) VALUES (0, 'baseline; seeded', 0.0);
