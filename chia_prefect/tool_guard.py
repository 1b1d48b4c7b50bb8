"""What the Postgres query tool refuses before a statement reaches the server.

`default_transaction_read_only` stops writes to tables, not what a privileged role can do
on the server's machine: `COPY ... TO PROGRAM`, `COPY ... TO/FROM 'file'`, large objects
(`lo_import`, `lo_export`), file functions (`pg_read_file`, `pg_ls_dir`), functions that
run SQL given as text (`query_to_xml`, `dblink`) or steer the server (`set_config`,
`pg_terminate_backend`). The statement is parsed with PostgreSQL's own grammar
(`pglast`, libpg_query) and refused on its syntax tree, never by matching text:

- always: more than one statement, COPY, and calls of those functions;
- read-only tools: anything but SELECT / VALUES / TABLE, EXPLAIN and SHOW, a SELECT INTO,
  and a data-modifying WITH.

The real wall stays a role that can only read: `check_role` refuses a superuser and the
members of the server file and program roles when the tool starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

READ_STATEMENTS = frozenset({"SelectStmt", "ExplainStmt", "VariableShowStmt"})
WRITE_NODES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
PRIVILEGED_ROLES = ("pg_execute_server_program", "pg_write_server_files", "pg_read_server_files")

_FUNCTION_CLASSES = (
    ("large-object function", ("lo_", "loread", "lowrite")),
    ("server file function", ("pg_read_file", "pg_read_binary_file", "pg_stat_file", "pg_ls_", "pg_file_",
                              "pg_logdir_ls")),
    ("function that runs SQL given as text", ("query_to_xml", "cursor_to_xml", "dblink")),
    ("server control function", ("set_config", "pg_reload_conf", "pg_rotate_logfile", "pg_terminate_backend",
                                 "pg_cancel_backend", "pg_promote", "pg_switch_wal", "pg_create_restore_point",
                                 "pg_backup_")),
)

ROLE_RECIPE = """CREATE ROLE agent_reader LOGIN PASSWORD '...';
GRANT CONNECT ON DATABASE app TO agent_reader;
GRANT USAGE ON SCHEMA public TO agent_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO agent_reader;"""


def refusal(sql: str, read_only: bool) -> str | None:
    """Why the tool refuses `sql` ('REFUSED: ...'), an 'ERROR: ...' if it does not parse,
    or None when it may run."""
    from pglast.parser import ParseError, parse_sql_json

    try:
        statements = json.loads(parse_sql_json(sql))["stmts"]
    except ParseError as exc:
        return f"ERROR: syntax error: {exc}; nothing was run."
    if len(statements) != 1:
        return f"REFUSED: send exactly one statement per call (got {len(statements)}); nothing was run."
    (kind, body), = statements[0]["stmt"].items()
    nodes = list(_walk(statements[0]["stmt"]))
    for node, value in nodes:
        if node == "CopyStmt":
            return ("REFUSED: COPY is not allowed through this tool: it reads and writes files and runs "
                    "programs on the database server; nothing was run.")
        if node == "FuncCall":
            name = ".".join(part["String"]["sval"] for part in value["funcname"])
            why = _function_class(name.rsplit(".", 1)[-1].lower())
            if why:
                return f"REFUSED: {name}() is a {why}, not allowed through this tool; nothing was run."
    if not read_only:
        return None
    if kind not in READ_STATEMENTS:
        return (f"REFUSED: {_verb(kind)} is not a query; this tool is read-only and runs SELECT, VALUES, "
                "TABLE, EXPLAIN and SHOW only; nothing was run.")
    if body.get("intoClause"):
        return "REFUSED: SELECT INTO creates a table; this tool is read-only; nothing was run."
    nested = next((node for node, _ in nodes if node in WRITE_NODES), None)
    if nested:
        return f"REFUSED: {_verb(nested)} inside a query changes data; this tool is read-only; nothing was run."
    return None


def returns_rows(sql: str) -> bool:
    """Whether the (already accepted) statement is one that returns rows."""
    from pglast.parser import parse_sql_json

    (kind, body), = json.loads(parse_sql_json(sql))["stmts"][0]["stmt"].items()
    return kind in READ_STATEMENTS or bool(body.get("returningList"))


def check_role(conn: Any, label: str, allow_privileged_role: bool) -> None:
    """Refuse a role that can reach the server's files or programs (see ROLE_RECIPE)."""
    from chia_prefect.errors import PrivilegedRoleError

    checks = ", ".join(f"pg_has_role(current_user, '{role}', 'MEMBER')" for role in PRIVILEGED_ROLES)
    row = conn.execute(f"SELECT current_user, rolsuper, {checks} FROM pg_roles WHERE rolname = current_user").fetchone()
    user, superuser, *members = row
    reasons = (["a superuser"] if superuser else []) + [
        f"a member of {role}" for role, member in zip(PRIVILEGED_ROLES, members) if member]
    if not reasons or allow_privileged_role:
        return
    raise PrivilegedRoleError(
        f"{label}: the query tool's role {user!r} is {' and '.join(reasons)}: through it an agent could run "
        "programs and read or write files on the database server, which a read-only session does not stop. "
        f"Give the tool a role that can only read, e.g.\n{ROLE_RECIPE}\nand spawn it with "
        "dsn='postgresql://agent_reader:...@HOST/DB'; or pass allow_privileged_role=True (dangerous: "
        "only the statement guard then stands between the agent and the server)."
    )


def _function_class(name: str) -> str | None:
    for why, prefixes in _FUNCTION_CLASSES:
        if name.startswith(prefixes):
            return why
    return None


def _verb(node: str) -> str:
    return node.removesuffix("Stmt").upper()


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (node type, node) pair in a libpg_query JSON tree."""
    if isinstance(value, dict):
        for key, child in value.items():
            if key[:1].isupper():
                yield key, child
            yield from _walk(child)
    elif isinstance(value, list):
        for child in value:
            yield from _walk(child)
