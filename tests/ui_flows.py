"""A flow that uses a block made in the UI form (importable by Ray workers)."""

from __future__ import annotations

from prefect import flow

from chia_prefect import FastRayTaskRunner, SQLiteNode


@flow(task_runner=FastRayTaskRunner())
def use_the_form_block(block_name: str) -> list[dict]:
    with SQLiteNode.load(block_name) as db:
        db.init_schema("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, note TEXT)")
        db.execute("INSERT INTO notes (note) VALUES (?)", ("from the form",))
        return db.query("SELECT id, note FROM notes")
