"""Schema migrations on both engines: plan, apply, refuse, concurrency, baseline, artifacts."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.utilities.asyncutils import run_coro_as_sync

from chia_prefect.errors import ChecksumMismatchError, MigrationError, SchemaAheadError
from chia_prefect.migrations import (
    VERSION_TABLE,
    Migration,
    load_migrations,
    migrate,
    plan,
)

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

DEMO = Path(__file__).resolve().parent / "migrations_demo"


@pytest.fixture
def migrations():
    return load_migrations(DEMO)


def versions(db) -> list[int]:
    return [r["version"] for r in db.query(f"SELECT version FROM {VERSION_TABLE} ORDER BY version")]


def tables(db) -> set[str]:
    sql = {
        "sqlite": "SELECT name FROM sqlite_master WHERE type = 'table'",
        "postgres": "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = 'public'",
    }[db.engine]
    return {r["name"] for r in db.query(sql)}


def test_load_orders_and_marks(migrations):
    assert [m.label for m in migrations] == ["0001_create_runs", "0002_add_score", "0003_create_tags"]
    assert all(m.transactional for m in migrations) and len({m.checksum for m in migrations}) == 3


@pytest.mark.parametrize(
    "files, message",
    [
        ({"0001_a.sql": "", "0003_c.sql": ""}, "missing \\[2\\]"),
        ({"0001_a.sql": "", "0001_b.sql": ""}, "version 1 appears twice"),
        ({"1_a.sql": ""}, "NNNN_name.sql"),
    ],
)
def test_load_refuses_gaps_duplicates_and_bad_names(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(MigrationError, match=message):
        load_migrations(tmp_path)


def test_fresh_to_head(any_db, migrations):
    out = migrate(any_db, migrations)
    assert out == {"from": 0, "to": 3, "target": 3, "pending": ["0001_create_runs", "0002_add_score", "0003_create_tags"],
                   "applied": [1, 2, 3], "applied_elsewhere": [], "dry_run": False, "direction": "up",
                   "reverted": [], "repeatables": [], "drift": [], "lint": [], "retried": {}}
    assert versions(any_db) == [1, 2, 3]
    assert {"runs", "tags", VERSION_TABLE} <= tables(any_db)
    rows = any_db.query(f"SELECT version, name, checksum FROM {VERSION_TABLE} ORDER BY version")
    assert [(r["name"], r["checksum"]) for r in rows] == [(m.name, m.checksum) for m in migrations]
    assert migrate(any_db, migrations)["applied"] == []  # idempotent


def test_partial_then_head_and_target(any_db, migrations):
    assert migrate(any_db, migrations, target=1)["applied"] == [1]
    assert plan(any_db, migrations).pending == migrations[1:]
    assert migrate(any_db, migrations, target=2)["applied"] == [2]
    assert migrate(any_db, migrations)["applied"] == [3]
    with pytest.raises(MigrationError, match="0003_create_tags, 0002_add_score have no down migration. Write 0003_create_tags.down.sql"):
        plan(any_db, migrations, target=1)


def test_dry_run_writes_nothing(any_db, migrations):
    out = migrate(any_db, migrations, dry_run=True)
    assert out["dry_run"] and out["applied"] == []
    if any_db.engine == "sqlite":
        assert not Path(any_db.db_path).exists()  # not even created
    else:
        assert tables(any_db) == set()


def test_edited_migration_refused(any_db, migrations):
    migrate(any_db, migrations)
    edited = [*migrations[:1], Migration(2, "add_score", migrations[1].sql + "\n-- edited"), migrations[2]]
    with pytest.raises(ChecksumMismatchError, match="0002_add_score was edited"):
        migrate(any_db, edited)


def test_database_ahead_refused(any_db, migrations):
    migrate(any_db, migrations)
    with pytest.raises(SchemaAheadError, match=r"versions \[3\].*code head is 2"):
        plan(any_db, migrations[:2])


def test_unapplied_older_migration_refused(any_db, migrations):
    migrate(any_db, migrations)
    any_db.execute(any_db.render(f"DELETE FROM {VERSION_TABLE} WHERE version = ?"), (2,))
    with pytest.raises(MigrationError, match=r"migrations \[2\] are unapplied but older than applied version 3"):
        plan(any_db, migrations)


def test_failing_migration_changes_nothing(any_db, migrations):
    migrate(any_db, migrations)
    before_schema, before = any_db.schema(), versions(any_db)
    bad = Migration(4, "half_broken", "CREATE TABLE extra (x INTEGER);\nALTER TABLE no_such_table ADD COLUMN y INTEGER;")
    with pytest.raises(MigrationError, match="no_such_table|no such table") as info:
        migrate(any_db, [*migrations, bad])
    assert "migration 0004_half_broken failed at its statement 2 and was rolled back" in str(info.value)
    assert versions(any_db) == before and any_db.schema() == before_schema
    assert "extra" not in tables(any_db)


def test_four_concurrent_runs_apply_each_version_once(any_db, migrations):
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda _: migrate(any_db, migrations), range(4)))
    applied = sorted(v for out in outcomes for v in out["applied"])
    assert applied == [1, 2, 3], outcomes
    assert all(out["to"] == 3 for out in outcomes)
    assert versions(any_db) == [1, 2, 3]
    assert any_db.query_value("SELECT COUNT(*) FROM runs") == 1  # 0003's seed row, inserted once


def test_fresh_database_initialised_at_head(any_db, migrations):
    baseline = "\n".join(m.sql.rstrip().rstrip(";") + ";" for m in migrations)
    out = migrate(any_db, migrations, baseline_sql=baseline)
    assert out["baseline"] and out["to"] == 3 and versions(any_db) == [1, 2, 3]
    assert plan(any_db, migrations).pending == []


def test_postgres_non_transactional_migration(postgres_db, migrations):
    concurrently = Migration(4, "index_labels", "-- chia: no-transaction\nCREATE INDEX CONCURRENTLY ix_runs_label ON runs (label);", transactional=False)
    out = migrate(postgres_db, [*migrations, concurrently])
    assert out["applied"] == [1, 2, 3, 4]
    assert postgres_db.query_value("SELECT COUNT(*) FROM pg_indexes WHERE indexname = 'ix_runs_label'") == 1


def test_no_transaction_marker_read_from_file(tmp_path):
    shutil.copy(DEMO / "0001_create_runs.sql", tmp_path)
    (tmp_path / "0002_ix.sql").write_text("-- chia: no-transaction\nCREATE INDEX CONCURRENTLY ix ON runs (label);\n")
    assert [m.transactional for m in load_migrations(tmp_path)] == [True, False]


def test_plan_and_outcome_are_artifacts(sqlite_db, migrations):
    state = migrate(sqlite_db, migrations, return_state=True)
    flow_run_id = state.state_details.flow_run_id

    async def artifacts():
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
        )

        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    found = {a.key: a.data for a in run_coro_as_sync(artifacts())}
    assert "0001_create_runs" not in found["migration-plan"]  # names and versions are columns
    assert "| 1 | create_runs | up | yes |" in found["migration-plan"]
    assert "version **0** → **3**" in found["migration-outcome"]


# Bodies whose `;`, `END;` and `COMMIT` are not statement ends: each engine's own parser
# splits the migration (SQLite's tokenizer, PostgreSQL's via pglast), not a lexer of ours.
TRICKY = {
    "sqlite": """
CREATE TABLE scores (id INTEGER PRIMARY KEY, v INTEGER, band TEXT DEFAULT 'none; END; COMMIT');
-- a comment; with END; and COMMIT;
CREATE TRIGGER band_it AFTER INSERT ON scores BEGIN
  UPDATE scores SET band = CASE WHEN NEW.v >= 10 THEN 'high;' ELSE 'low' END WHERE id = NEW.id;
  UPDATE scores SET v = CASE NEW.v WHEN -1 THEN 0 ELSE NEW.v END WHERE id = NEW.id;
END;
/* block comment; BEGIN; */ INSERT INTO scores (v) VALUES (12);
INSERT INTO scores (v) VALUES (-1)
""",
    "postgres": """
CREATE TABLE scores (id SERIAL PRIMARY KEY, v INTEGER, band TEXT DEFAULT 'none; END; COMMIT');
-- a comment; with END; and COMMIT;
CREATE FUNCTION band_of(v integer) RETURNS text LANGUAGE plpgsql AS $body$
BEGIN
  RETURN CASE WHEN v >= 10 THEN 'high;' ELSE 'low' END;  -- COMMIT; in a comment
END;
$body$;
CREATE FUNCTION band_it() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.band := band_of(NEW.v);
  NEW.v := CASE NEW.v WHEN -1 THEN 0 ELSE NEW.v END;
  RETURN NEW;
END $$;
CREATE TRIGGER band_it BEFORE INSERT ON scores FOR EACH ROW EXECUTE FUNCTION band_it();
CREATE FUNCTION doubled(x integer) RETURNS integer LANGUAGE sql BEGIN ATOMIC SELECT x * 2; END;
/* block comment; BEGIN; */ INSERT INTO scores (v) VALUES (12);
INSERT INTO scores (v) VALUES (-1)
""",
}


def test_triggers_case_dollar_quotes_and_literals_migrate(any_db, tmp_path):
    (tmp_path / "0001_scores.sql").write_text(TRICKY[any_db.engine])
    migrations = load_migrations(tmp_path)
    assert len(any_db.split_script(migrations[0].sql)) == (7 if any_db.engine == "postgres" else 4)
    assert migrate(any_db, migrations)["applied"] == [1]
    assert [(r["v"], r["band"]) for r in any_db.query("SELECT v, band FROM scores ORDER BY id")] == [
        (12, "high;"), (0, "low")]
    if any_db.engine == "postgres":
        assert any_db.query_value("SELECT doubled(21)") == 42
