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
