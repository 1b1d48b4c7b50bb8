"""Type checkers see members as the methods they are: `db.execute(...)` is an `ExecResult`,
`db.execute.submit(...)` a future of one, and a wrong argument is a type error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

USER_FILE = textwrap.dedent("""
    from chia_prefect import PostgresNode, SQLiteNode, read, write


    class Mine(SQLiteNode):
        @write
        def add(self, name: str, *, connect_opts: dict | None = None) -> int:
            with self.atomic(connect_opts) as cur:
                cur.execute("INSERT INTO t VALUES (?)", (name,))
                return 1

        @read
        def names(self, *, connect_opts: dict | None = None) -> list[str]:
            return []


    db = SQLiteNode(db_path="/tmp/x.db")
    pg = PostgresNode(dsn="postgresql://app@dbhost/app")
    mine = Mine(db_path="/tmp/x.db")
    reveal_type(db.execute("INSERT INTO t VALUES (1)"))
    reveal_type(db.query("SELECT 1"))
    reveal_type(db.query_one("SELECT 1"))
    reveal_type(db.execute.submit("INSERT INTO t VALUES (1)"))
    reveal_type(db.transaction([("SELECT 1", None)]))
    reveal_type(pg.copy_rows("t", ["a"], [(1,)]))
    reveal_type(mine.add("x"))
    reveal_type(mine.names.submit())
    reveal_type(db.execute.with_options(retries=2)("DELETE FROM t"))
    db.execute(42)
""")

EXPECTED = [
    "chia_prefect._sql.ExecResult",
    "builtins.list[builtins.dict[builtins.str, Any]]",
    "Union[builtins.dict[builtins.str, Any], None]",
    "prefect.futures.PrefectFuture[chia_prefect._sql.ExecResult]",
    "builtins.list[chia_prefect._sql.ExecResult]",
    "chia_prefect._sql.ExecResult",
    "builtins.int",
    "prefect.futures.PrefectFuture[builtins.list[builtins.str]]",
    "chia_prefect._sql.ExecResult",
]


def _normalise(revealed: str) -> str:
    """mypy prints `list[...]` or `builtins.list[...]`, `X | None` or `Union[X, None]`,
    depending on its version; compare one spelling."""
    revealed = re.sub(r"\b(list|dict|str|int)\[", r"builtins.\1[", revealed)
    revealed = re.sub(r"(?<![\w.])(str|int)\b", r"builtins.\1", revealed)
    revealed = revealed.replace("builtins.builtins.", "builtins.")
    match = re.fullmatch(r"(.+) \| None", revealed)
    return f"Union[{match.group(1)}, None]" if match else revealed


def test_members_are_typed_for_the_callers_type_checker(tmp_path):
    (tmp_path / "user.py").write_text(USER_FILE)
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--follow-imports=silent",
         "--cache-dir", str(tmp_path / "cache"), "user.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    revealed = [_normalise(m) for m in re.findall(r'Revealed type is "(.+)"', done.stdout)]
    assert revealed == [_normalise(e) for e in EXPECTED], done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, done.stdout
    assert 'Argument 1 to "__call__" of "MemberTask" has incompatible type "int"; expected "str"' in errors[0]
