"""The README's first example runs as written (on the session's Ray), and says what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_first_example_is_short_and_on_sqlite():
    first = python_blocks()[0]
    assert "SQLiteNode" in first and len(first.strip().splitlines()) <= 15


def test_two_setup_commands_and_ci_uses_the_test_one():
    setup = README.split("## Set up", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make \w+", setup, flags=re.MULTILINE)
    assert commands == ["make demo", "make test"]
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "make test" in ci


@pytest.mark.ray
def test_first_example_runs(ray_cluster, tmp_path, capsys):
    code = python_blocks()[0].replace('"/tmp/chia-example.db"', repr(str(tmp_path / "ex.db")))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert "[{'id': 2, 'score': 0.7}, {'id': 3, 'score': 0.9}]" in printed


def blocks_under(heading: str) -> list[str]:
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)


def test_every_python_block_is_run_by_a_test():
    """Each block belongs to a section a test below runs; nothing indented hides elsewhere."""
    run = [*blocks_under("First example"), *blocks_under("PostgreSQL"), *blocks_under("Members"),
           *blocks_under("Migrations"), *blocks_under("SQL for LLM agents (MCP)"),
           *blocks_under("A faster RayTaskRunner")]
    assert sorted(run) == sorted(re.findall(r"^```python\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE))
    assert len(python_blocks()) == len(run)  # no indented python block either


def run_blocks(blocks: list[str], substitutions: dict[str, str]) -> dict:
    """Run blocks in one namespace, as a reader pastes them into one session; only the
    placeholders named in `substitutions` change (each must be present)."""
    namespace: dict = {"__name__": "readme_example"}
    for code in blocks:
        for placeholder, value in substitutions.items():
            code = code.replace(placeholder, value)
        exec(compile(code, "README.md", "exec"), namespace)
    joined = "".join(blocks)
    assert all(p in joined for p in substitutions), substitutions
    return namespace


@pytest.mark.ray
@pytest.mark.postgres
def test_postgres_block_runs(ray_cluster, postgres_dsn, capsys):
    [block] = blocks_under("PostgreSQL")
    assert "# placeholder" in block
    run_blocks([block], {'"postgresql://app:secret@dbhost:5432/app"': repr(postgres_dsn),
                         '"ray://head:10001"': repr(ray_cluster["cluster"].address)})
    first = int(capsys.readouterr().out.strip().splitlines()[-1])
    run_blocks([block], {'"postgresql://app:secret@dbhost:5432/app"': repr(postgres_dsn),
                         '"ray://head:10001"': repr(ray_cluster["cluster"].address)})  # a rerun: overwrite=True
    assert int(capsys.readouterr().out.strip().splitlines()[-1]) == first + 1


def test_domain_member_block_runs(tmp_path):
    # In a fresh interpreter, as a reader runs it: this session already registered a test
    # class of the same name, and Prefect's block registry refuses a second one from exec().
    import subprocess
    import sys

    [block] = [b for b in blocks_under("Members") if "AlignmentDBNode" in b]
    script = tmp_path / "domain.py"
    script.write_text(block + "\nfrom chia_prefect.base import member_names\n"
                              "print(member_names(AlignmentDBNode))\n"
                              f"db = AlignmentDBNode(db_path={str(tmp_path / 'a.db')!r})\n"
                              "db.init_schema('CREATE TABLE iterations (entry_id TEXT, iteration INTEGER)')\n"
                              "db.add_iteration('e1', 3)\n"
                              "print('LOADED', db.load_entry('e1'), db.add_iteration.name)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'load_entry'" in done.stdout and "'add_iteration'" in done.stdout
    assert "LOADED {'entry_id': 'e1', 'iteration': 3} sqlite.add_iteration" in done.stdout


def test_retrying_writes_block_runs(tmp_path, capsys):
    [block] = [b for b in blocks_under("Members") if "idempotency_key" in b]
    path = str(tmp_path / "payments.db")
    run_blocks([block], {'"/tmp/chia-payments.db"': repr(path)})
    run_blocks([block], {'"/tmp/chia-payments.db"': repr(path)})  # run again: still one payment
    assert capsys.readouterr().out.split() == ["1", "1"]


@pytest.mark.ray
def test_migrations_block_runs(ray_cluster, tmp_path, capsys):
    migrations = Path(__file__).resolve().parent / "migrations_demo"
    subs = {'"migrations/"': repr(str(migrations) + "/"), '"/tmp/chia-example.db"': repr(str(tmp_path / "ex.db"))}
    run_blocks(blocks_under("Migrations"), subs)
    out = capsys.readouterr().out
    assert "current version 0, target 3; 3 pending:" in out and "create_tags" in out
    assert "'applied': [1, 2, 3]" in out


@pytest.mark.ray
def test_mcp_blocks_run(ray_cluster, tmp_path, capsys):
    path = tmp_path / "ex.db"
    import sqlite3

    sqlite3.connect(path).close()
    namespace = run_blocks(blocks_under("SQL for LLM agents (MCP)"), {'"/tmp/chia-example.db"': repr(str(path))})
    out = capsys.readouterr().out
    assert "/mcp" in out and "Bearer " in out and "one" in out and "1" in out.splitlines()[-1]
    assert namespace["db"]._tools == []  # close() stopped it


def test_fast_runner_block_runs():
    namespace = run_blocks(blocks_under("A faster RayTaskRunner"), {})
    assert namespace["nightly"].name == "nightly"
