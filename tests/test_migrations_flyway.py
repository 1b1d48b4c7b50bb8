"""Migrations beyond versions: repeatables, Python migrations, down migrations, callbacks,
Postgres lock_timeout with retries, the lock on no-transaction migrations, a crashed
migrator, drift and lint. Both engines, real servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import ray_tmpdir_left_clean

from chia_prefect.errors import MigrationError, MigrationLintError, MigrationLockError, SchemaDriftError
from chia_prefect.migrations import VERSION_TABLE, live_schema, load_migrations, migrate, plan

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

ROOT = Path(__file__).resolve().parent.parent


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip())
    return folder


def versions(db) -> list[int]:
    rows = db.query(f"SELECT version FROM {VERSION_TABLE} WHERE version IS NOT NULL ORDER BY version")
    return [r["version"] for r in rows]


BASE = {
    "0001_create_items.sql": "CREATE TABLE items (id INTEGER PRIMARY KEY, label TEXT NOT NULL, price REAL);\n",
    "0002_seed.sql": "INSERT INTO items (id, label, price) VALUES (1, 'a', 1.5), (2, 'b', 2.5);\n",
}


def test_load_reads_every_kind_and_refuses_what_it_cannot_run(tmp_path):
    folder = write(tmp_path / "ok", {
        **BASE,
        "0002_seed.down.sql": "DELETE FROM items WHERE id IN (1, 2);\n",
        "0003_backfill.py": "def migrate(tx):\n    pass\n\ndef down(tx):\n    pass\n",
        "R__cheap.sql": "CREATE VIEW cheap AS SELECT * FROM items WHERE price < 2;\n",
        "before_migrate.sql": "SELECT 1;\n",
        "after_each_migrate.py": "def callback(tx):\n    pass\n",
        "README.md": "not a migration",
    })
    found = load_migrations(folder)
    assert [(m.kind, m.label, m.language) for m in found] == [
        ("versioned", "0001_create_items", "sql"), ("versioned", "0002_seed", "sql"),
        ("versioned", "0003_backfill", "python"), ("repeatable", "R__cheap", "sql"),
        ("callback", "after_each_migrate", "python"), ("callback", "before_migrate", "sql"),
    ]
    assert [m.has_down for m in found[:3]] == [False, True, True]
    for files, message in [
        ({"0001_a.py": "x = 1\n"}, "defines `def migrate\\(tx\\)`"),
        ({"0001_a.sql": "", "0002_b.down.sql": ""}, "no migration 0002_b.sql or .py to undo"),
        ({"0001_a.sql": "", "after_everything.sql": ""}, "R__name.sql for a repeatable one"),
        ({"R__v.sql": "", "R__v.py": "def migrate(tx):\n    pass\n"}, "R__v given both"),
    ]:
        bad = write(tmp_path / f"bad{len(message)}", files)
        with pytest.raises(MigrationError, match=message):
            load_migrations(bad)


def test_repeatable_view_is_applied_after_the_versions_and_again_only_when_changed(any_db, tmp_path):
    folder = write(tmp_path / "m", {**BASE, "R__cheap_items.sql": "CREATE VIEW cheap_items AS SELECT id, label FROM items WHERE price < 2;\n"})
    first = migrate(any_db, load_migrations(folder))
    assert first["applied"] == [1, 2] and first["repeatables"] == ["R__cheap_items"]
    assert [r["label"] for r in any_db.query("SELECT label FROM cheap_items")] == ["a"]
    assert migrate(any_db, load_migrations(folder))["repeatables"] == []  # unchanged: not again

    # A new version adds a column and the view uses it: the view runs after the version.
    write(folder, {
        "0003_add_stock.sql": "ALTER TABLE items ADD COLUMN stock INTEGER DEFAULT 0;\n",
        "R__cheap_items.sql": """
            DROP VIEW IF EXISTS cheap_items;
            CREATE VIEW cheap_items AS SELECT id, label, stock FROM items WHERE price < 3;
        """,
    })
    second = migrate(any_db, load_migrations(folder))
    assert second["applied"] == [3] and second["repeatables"] == ["R__cheap_items"]
    assert [r["stock"] for r in any_db.query("SELECT stock FROM cheap_items ORDER BY id")] == [0, 0]
    assert migrate(any_db, load_migrations(folder))["repeatables"] == []
    rows = any_db.query(f"SELECT name, kind, version FROM {VERSION_TABLE} WHERE kind = 'repeatable'")
    assert rows == [{"name": "cheap_items", "kind": "repeatable", "version": None}] * 2  # applied twice in all


def test_python_migration_runs_in_the_version_transaction_and_a_failing_one_changes_nothing(any_db, tmp_path):
    folder = write(tmp_path / "m", {**BASE, "0003_uppercase.py": """
        def migrate(tx):
            for row in tx.query("SELECT id, label FROM items ORDER BY id"):
                tx.execute(tx.render("UPDATE items SET label = ? WHERE id = ?"), (row["label"].upper(), row["id"]))
            tx.executemany(tx.render("INSERT INTO items (id, label, price) VALUES (?, ?, ?)"), [(3, "C", 9.0)])
    """})
    out = migrate(any_db, load_migrations(folder))
    assert out["applied"] == [1, 2, 3]
    assert [r["label"] for r in any_db.query("SELECT label FROM items ORDER BY id")] == ["A", "B", "C"]

    write(folder, {"0004_half.py": """
        def migrate(tx):
            tx.execute("DELETE FROM items")
            tx.execute(tx.render("INSERT INTO items (id, label) VALUES (?, ?)"), (10, "ten"))
            raise ValueError("the data is not what this migration expects")
    """})
    with pytest.raises(MigrationError) as info:
        migrate(any_db, load_migrations(folder))
    message = str(info.value)
    assert "migration 0004_half raised ValueError and was rolled back" in message
    assert "the data is not what this migration expects" in message
    assert versions(any_db) == [1, 2, 3]
    assert [r["label"] for r in any_db.query("SELECT label FROM items ORDER BY id")] == ["A", "B", "C"]


def test_down_to_an_earlier_version_and_up_again_gives_the_same_schema(any_db, tmp_path):
    folder = write(tmp_path / "m", {
        **BASE,
        "0002_seed.down.sql": "DELETE FROM items WHERE id IN (1, 2);\n",
        "0003_tags.sql": "CREATE TABLE tags (item_id INTEGER NOT NULL, tag TEXT NOT NULL);\n"
                         "CREATE INDEX ix_tags_item ON tags (item_id);\n",
        "0003_tags.down.sql": "DROP TABLE tags;\n",
        "0004_discount.py": """
            def migrate(tx):
                tx.execute("ALTER TABLE items ADD COLUMN discount REAL")
                tx.execute("UPDATE items SET discount = 0.1")

            def down(tx):
                tx.execute("ALTER TABLE items DROP COLUMN discount")
        """,
    })
    migrations = load_migrations(folder)
    migrate(any_db, migrations)
    at_head = live_schema(any_db)
    assert "column items.discount" in at_head or "column public.items.discount" in at_head

    the_plan = plan(any_db, migrations, target=1)
    assert the_plan.direction == "down" and [m.version for m in the_plan.pending] == [4, 3, 2]
    text = the_plan.text()
    assert "current version 4, target 1; 3 to undo, newest first:" in text
    assert "(down: 0003_tags.down.sql)" in text and "(down: 0004_discount.py)" in text
    assert migrate(any_db, migrations, target=1, dry_run=True)["reverted"] == [] and versions(any_db) == [1, 2, 3, 4]

    down = migrate(any_db, migrations, target=1)
    assert down["direction"] == "down" and down["reverted"] == [4, 3, 2] and down["to"] == 1
    assert versions(any_db) == [1] and any_db.query_value("SELECT COUNT(*) FROM items") == 0
    assert not any(key.endswith("tags") or "discount" in key for key in live_schema(any_db))
    kinds = [r["kind"] for r in any_db.query(f"SELECT kind FROM {VERSION_TABLE} ORDER BY applied_rank")]
    assert kinds == ["versioned", "down", "down", "down"]

    up = migrate(any_db, migrations)
    assert up["applied"] == [2, 3, 4] and live_schema(any_db) == at_head
    assert plan(any_db, migrations).drift == []

    # 0001 has no down file: going to 0 is refused before anything runs.
    with pytest.raises(MigrationError, match="0001_create_items has no down migration. Write "
                                             "0001_create_items.down.sql, or choose a target of 1 or more"):
        migrate(any_db, migrations, target=0)
    assert versions(any_db) == [1, 2, 3, 4]


def test_callbacks_run_in_the_steps_transactions(any_db, tmp_path):
    folder = write(tmp_path / "m", {
        "0001_create_items.sql": BASE["0001_create_items.sql"],
        "0002_create_log.sql": "CREATE TABLE step_log (what TEXT NOT NULL);\n",
        "before_migrate.sql": "CREATE TABLE IF NOT EXISTS run_log (what TEXT NOT NULL);\n",
        "after_each_migrate.py": """
            def callback(tx):
                tx.execute(tx.render("INSERT INTO run_log (what) VALUES (?)"), ("step",))
        """,
        "after_migrate.sql": "INSERT INTO run_log (what) VALUES ('done');\n",
    })
    migrate(any_db, load_migrations(folder))
    assert [r["what"] for r in any_db.query("SELECT what FROM run_log")] == ["step", "step", "done"]

    # after_migrate runs in the last step's transaction: when it fails, that step rolls back.
    write(folder, {"0003_more.sql": "CREATE TABLE more_items (id INTEGER);\n",
                   "after_migrate.sql": "INSERT INTO no_such_table VALUES (1);\n"})
    with pytest.raises(MigrationError, match="callback after_migrate.sql of migration 0003_more failed at its "
                                             "statement 1 and was rolled back"):
        migrate(any_db, load_migrations(folder))
    assert versions(any_db) == [1, 2]
    assert "more_items" not in str(live_schema(any_db))
    assert [r["what"] for r in any_db.query("SELECT what FROM run_log")] == ["step", "step", "done"]


def test_a_column_added_by_hand_is_drift_refused_unless_allowed(any_db, tmp_path):
    folder = write(tmp_path / "m", dict(BASE))
    migrate(any_db, load_migrations(folder))
    any_db.execute("ALTER TABLE items ADD COLUMN note TEXT")
    write(folder, {"0003_index.sql": "CREATE TABLE audit (at TEXT);\n"})

    the_plan = plan(any_db, load_migrations(folder))
    assert len(the_plan.drift) == 1 and the_plan.drift[0].startswith("+ column ")
    assert "items.note: TEXT" in the_plan.drift[0] or "items.note: text" in the_plan.drift[0]
    assert "drift: the schema changed outside the migrations" in the_plan.text()
    with pytest.raises(SchemaDriftError, match="items.note") as info:
        migrate(any_db, load_migrations(folder))
    assert info.value.differences == the_plan.drift and versions(any_db) == [1, 2]

    out = migrate(any_db, load_migrations(folder), allow_drift=True)
    assert out["applied"] == [3] and out["drift"] == the_plan.drift
    assert plan(any_db, load_migrations(folder)).drift == []  # the new fingerprint includes the column


def _lint_rules(any_db, folder) -> list[tuple[str, int, str]]:
    return [(w.migration, w.statement, w.rule) for w in plan(any_db, load_migrations(folder)).lint]


def test_lint_flags_each_listed_statement_and_nothing_in_a_clean_set(any_db, tmp_path):
    clean = {
        **BASE,
        "0003_tags.sql": "CREATE TABLE tags (item_id INTEGER NOT NULL, tag TEXT NOT NULL);\n"
                         "CREATE INDEX ix_tags_item ON tags (item_id);\n"
                         "DELETE FROM items WHERE price > 100;\n",
        "0004_stock.sql": "ALTER TABLE items ADD COLUMN stock INTEGER NOT NULL DEFAULT 0;\n",
        "R__cheap.sql": "DROP VIEW IF EXISTS cheap;\nCREATE VIEW cheap AS SELECT id FROM items WHERE price < 2;\n",
    }
    if any_db.engine == "postgres":
        clean["0005_ix_label.sql"] = "-- chia: no-transaction\nCREATE INDEX CONCURRENTLY ix_items_label ON items (label);\n"
    folder = write(tmp_path / "clean", clean)
    assert _lint_rules(any_db, folder) == []
    migrate(any_db, load_migrations(folder), strict=True)
    write(folder, {"R__cheap.sql": clean["R__cheap.sql"].replace("< 2", "< 3")})  # a changed view
    assert _lint_rules(any_db, folder) == []
    migrate(any_db, load_migrations(folder), strict=True)

    head = len([n for n in clean if n[:4].isdigit()])
    risky = {
        f"{head + 1:04d}_drop_table.sql": "DROP TABLE tags;\n",
        f"{head + 2:04d}_drop_column.sql": "ALTER TABLE items DROP COLUMN stock;\n",
    }
    expected = [(f"{head + 1:04d}_drop_table", 1, "drop-table"), (f"{head + 2:04d}_drop_column", 1, "drop-column")]
    if any_db.engine == "postgres":
        risky.update({
            f"{head + 3:04d}_truncate.sql": "TRUNCATE items;\n",
            f"{head + 4:04d}_index.sql": "SELECT 1;\nCREATE INDEX ix_items_stock ON items (stock);\n",
            f"{head + 5:04d}_retype.sql": "ALTER TABLE items ALTER COLUMN stock TYPE BIGINT;\n",
            f"{head + 6:04d}_required.sql": "ALTER TABLE items ADD COLUMN sku TEXT NOT NULL;\n",
        })
        expected += [(f"{head + 3:04d}_truncate", 1, "truncate"), (f"{head + 4:04d}_index", 2, "index-without-concurrently"),
                     (f"{head + 5:04d}_retype", 1, "alter-column-type"), (f"{head + 6:04d}_required", 1, "not-null-without-default")]
    else:
        risky[f"{head + 3:04d}_empty.sql"] = "DELETE FROM items;\n"
        expected.append((f"{head + 3:04d}_empty", 1, "truncate"))
    write(folder, risky)
    assert _lint_rules(any_db, folder) == expected
    text = plan(any_db, load_migrations(folder)).text()
    assert f"lint: {len(expected)} warnings (--strict refuses):" in text and "DROP TABLE tags destroys" in text
    with pytest.raises(MigrationLintError, match="strict: the lint warned") as info:
        migrate(any_db, load_migrations(folder), strict=True)
    assert len(info.value.warnings) == len(expected) and versions(any_db) == list(range(1, head + 1))


def test_four_concurrent_runs_with_a_no_transaction_migration_apply_each_version_once(any_db, tmp_path):
    # The no-transaction migration's statements run one by one outside a transaction; only the
    # migration lock keeps a second run from running them again (the INSERT would then count 2).
    index = ("CREATE INDEX CONCURRENTLY ix_items_label ON items (label)" if any_db.engine == "postgres"
             else "CREATE INDEX ix_items_label ON items (label)")
    folder = write(tmp_path / "m", {
        **BASE,
        "0003_marks.sql": "CREATE TABLE marks (n INTEGER NOT NULL);\n",
        "0004_index.sql": f"-- chia: no-transaction\n{index};\nINSERT INTO marks (n) VALUES (1);\n",
        "0005_after.sql": "INSERT INTO marks (n) VALUES (5);\n",
    })
    migrations = load_migrations(folder)
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda _: migrate(any_db, migrations), range(4)))
    assert sorted(v for out in outcomes for v in out["applied"]) == [1, 2, 3, 4, 5], outcomes
    assert versions(any_db) == [1, 2, 3, 4, 5]
    assert [r["n"] for r in any_db.query("SELECT n FROM marks ORDER BY n")] == [1, 5]


CRASHER = """
import sys
from chia_prefect import SQLiteNode, PostgresNode
from chia_prefect.migrations import load_migrations
from chia_prefect.migrations.apply import Step, apply_step

engine, where, folder = sys.argv[1:4]
node = SQLiteNode(db_path=where) if engine == "sqlite" else PostgresNode(dsn=where)
m = [m for m in load_migrations(folder) if m.version == 2][0]
apply_step(node, Step("up", 2, m.name, m.label, m.checksum, m.body()))
"""


def test_a_migrator_killed_while_holding_the_lock_does_not_block_the_next_run(any_db, tmp_path):
    marker = tmp_path / "inside"
    folder = write(tmp_path / "m", {
        "0001_create_items.sql": BASE["0001_create_items.sql"],
        "0002_slow.py": f"""
            import time

            def migrate(tx):
                tx.execute("CREATE TABLE half_done (x INTEGER)")
                open({str(marker)!r}, "w").close()
                time.sleep(120)
        """,
    })
    migrate(any_db, load_migrations(folder), target=1)
    where = any_db.db_path if any_db.engine == "sqlite" else any_db.dsn.get_secret_value()
    crasher = subprocess.Popen([sys.executable, "-c", CRASHER, any_db.engine, where, str(folder)],
                               cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert crasher.poll() is None, crasher.stderr.read() if crasher.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(crasher.pid, signal.SIGKILL)  # mid-transaction, holding the migration lock
        crasher.wait(10)
    finally:
        if crasher.poll() is None:
            os.killpg(crasher.pid, signal.SIGKILL)
    assert versions(any_db) == [1] and "half_done" not in str(live_schema(any_db))

    write(folder, {"0002_slow.py": "def migrate(tx):\n    tx.execute('CREATE TABLE half_done (x INTEGER)')\n"})
    started = time.monotonic()
    out = migrate(any_db, load_migrations(folder), lock_wait_s=30)
    assert out["applied"] == [2] and versions(any_db) == [1, 2]
    assert time.monotonic() - started < 20


@pytest.mark.postgres
def test_postgres_migration_behind_a_reader_retries_and_never_blocks_readers_long(postgres_db, postgres_dsn, tmp_path):
    import psycopg

    folder = write(tmp_path / "m", dict(BASE))
    migrate(postgres_db, load_migrations(folder))
    write(folder, {"0003_stock.sql": "ALTER TABLE items ADD COLUMN stock INTEGER;\n"})
    the_plan = plan(postgres_db, load_migrations(folder), lock_timeout_s=0.5, lock_retries=8)
    assert "each step runs with lock_timeout 0.5 s and is retried up to 8 times with backoff" in the_plan.text()

    # A long reader holds ACCESS SHARE on items for 4 s; the ALTER queues behind it.
    holding = threading.Event()

    def long_reader() -> None:
        with psycopg.connect(postgres_dsn) as conn:
            conn.execute("SELECT COUNT(*) FROM items").fetchone()
            holding.set()
            time.sleep(4)

    waits: list[float] = []
    stop = threading.Event()

    def short_readers() -> None:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            while not stop.is_set():
                began = time.monotonic()
                conn.execute("SELECT COUNT(*) FROM items").fetchone()
                waits.append(time.monotonic() - began)
                time.sleep(0.02)

    reader = threading.Thread(target=long_reader)
    reader.start()
    assert holding.wait(10)
    others = threading.Thread(target=short_readers)
    others.start()
    try:
        out = migrate(postgres_db, load_migrations(folder), lock_timeout_s=0.5, lock_retries=8)
    finally:
        stop.set()
        others.join(10)
        reader.join(10)
    assert out["applied"] == [3] and out["retried"].get("0003_stock", 0) >= 1, out
    assert "column public.items.stock" in live_schema(postgres_db)
    assert waits and max(waits) < 0.5 + 0.75, sorted(waits)[-5:]  # never longer than the lock timeout

    # A reader that outlasts every retry: the migration gives up, nothing changed.
    write(folder, {"0004_price.sql": "ALTER TABLE items ALTER COLUMN price SET DEFAULT 0;\n"})
    holding.clear()
    reader = threading.Thread(target=long_reader)
    reader.start()
    assert holding.wait(10)
    try:
        with pytest.raises(MigrationLockError, match="0004_price waited longer than lock_timeout \\(200 ms\\)"):
            migrate(postgres_db, load_migrations(folder), lock_timeout_s=0.2, lock_retries=1)
    finally:
        reader.join(10)
    assert versions(postgres_db) == [1, 2, 3]


def test_an_old_version_table_is_upgraded_in_place(sqlite_db, tmp_path):
    import sqlite3

    folder = write(tmp_path / "m", dict(BASE))
    old = load_migrations(folder)
    os.makedirs(os.path.dirname(sqlite_db.db_path), exist_ok=True)
    with sqlite3.connect(sqlite_db.db_path) as conn:  # as chia-prefect before repeatables wrote it
        conn.execute(old[0].sql)
        conn.execute(f"CREATE TABLE {VERSION_TABLE} (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                     "checksum TEXT NOT NULL, applied_at TEXT NOT NULL)")
        conn.execute(f"INSERT INTO {VERSION_TABLE} VALUES (1, ?, ?, '2026-01-01T00:00:00+00:00')",
                     (old[0].name, old[0].checksum))
    conn.close()
    assert plan(sqlite_db, old).current == 1
    out = migrate(sqlite_db, old)
    assert out["applied"] == [2] and versions(sqlite_db) == [1, 2]
    rows = sqlite_db.query(f"SELECT version, kind, applied_rank FROM {VERSION_TABLE} ORDER BY applied_rank")
    assert rows == [{"version": 1, "kind": "versioned", "applied_rank": 1},
                    {"version": 2, "kind": "versioned", "applied_rank": 2}]


TWICE = """
import sys
from chia_prefect import SQLiteNode
from chia_prefect.migrations import Migration, migrate

with SQLiteNode(db_path=sys.argv[1]) as db:
    first = migrate(db, [Migration(1, "a", "CREATE TABLE a (x INTEGER)")])
    second = migrate(db, [Migration(1, "a", "CREATE TABLE a (x INTEGER)"), Migration(2, "b", "CREATE TABLE b (x INTEGER)")])
    print("OUTCOMES", first["applied"], second["applied"])
"""


def test_a_script_without_ray_migrates_twice_on_one_local_ray(tmp_path):
    # The first flow run starts the process's local Ray, the second reuses it; Ray stops at
    # exit, and its session folder (logs, under RAY_TMPDIR here) is deleted then.
    with ray_tmpdir_left_clean() as ray_tmp:
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
        done = subprocess.run([sys.executable, "-c", TWICE, str(tmp_path / "twice.db")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-3000:]
        assert "OUTCOMES [1] [2]" in out
        assert out.count("Started a local Ray instance") == 1 and "core worker has already been shutdown" not in out
