"""Small helpers shared by the test modules (importable by Ray workers too)."""

from __future__ import annotations


def sql_for(db, text: str) -> str:
    """Render `?` placeholders for the node's paramstyle; tests write qmark SQL."""
    return text.replace("?", "%s") if db.paramstyle == "format" else text


def id_column(db) -> str:
    return "INTEGER PRIMARY KEY" if db.engine == "sqlite" else "SERIAL PRIMARY KEY"
