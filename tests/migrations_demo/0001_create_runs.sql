-- The runs of an optimisation, one row each.
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    label TEXT NOT NULL
);
