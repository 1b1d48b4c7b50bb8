"""`pip install .` builds a clean wheel: no setuptools warnings, the data files inside."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_builds_without_warnings_and_ships_its_data(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    ours = [line for line in (build.stdout + build.stderr).splitlines()
            if "warning" in line.lower() and "is ignored: it is neither a file nor a directory" not in line]
    assert ours == [], ours  # (the other kind is this machine's pip index configuration)
    [wheel] = tmp_path.glob("chia_prefect-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("chia_prefect/demo_migrations/0001_iterations.sql", "chia_prefect/static/sqlite-node.png",
                     "chia_prefect/py.typed"):
        assert expected in names
    # Every module of the source tree, the subpackages included.
    source = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "chia_prefect").rglob("*.py") if "__pycache__" not in p.parts)
    assert [name for name in source if name not in names] == []
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "chia-prefect = chia_prefect.cli:main" in zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()


def test_every_public_error_is_exported_from_the_package():
    import inspect

    import chia_prefect
    from chia_prefect import errors

    defined = {name for name, value in vars(errors).items()
               if inspect.isclass(value) and issubclass(value, Exception) and value.__module__ == errors.__name__}
    assert len(defined) >= 19
    assert defined <= set(chia_prefect.__all__)
    assert all(getattr(chia_prefect, name) is getattr(errors, name) for name in defined)


def test_every_error_keeps_its_type_message_and_data_through_pickling():
    """Errors cross Ray as pickles: data given to the constructor must come back whole."""
    import inspect
    import pickle

    from chia_prefect import errors

    classes = [value for value in vars(errors).values()
               if inspect.isclass(value) and issubclass(value, Exception) and value.__module__ == errors.__name__]
    for cls in classes:
        if cls is errors.TransactionOpError:
            continue  # its data is keyword-only and required: checked below
        back = pickle.loads(pickle.dumps(cls(f"{cls.__name__}: what happened")))
        assert type(back) is cls and str(back) == f"{cls.__name__}: what happened"
    lost = errors.ConnectionLostError("db: lost", detail="the connection to db was lost")
    back = pickle.loads(pickle.dumps(lost))
    assert (str(back), back.detail) == ("db: lost", "the connection to db was lost")
    drift = pickle.loads(pickle.dumps(errors.SchemaDriftError("db: drift", ["+ column t.x: TEXT"])))
    lint = pickle.loads(pickle.dumps(errors.MigrationLintError("db: lint", ["0002 statement 1: DROP TABLE t"])))
    assert (drift.differences, lint.warnings) == (["+ column t.x: TEXT"], ["0002 statement 1: DROP TABLE t"])

    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (x UNIQUE)")
    conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.IntegrityError) as driver:
        conn.execute("INSERT INTO t VALUES (1)")
    failed = errors.TransactionOpError.of(driver.value, op_index=2, op_total=5)
    assert "op_index" not in vars(driver.value)  # the driver's exception is not touched
    back = pickle.loads(pickle.dumps(failed))
    assert type(back) is type(failed) and isinstance(back, sqlite3.IntegrityError)
    assert (back.op_index, back.op_total, back.driver) == (2, 5, sqlite3.IntegrityError)
    assert vars(back) == {**vars(driver.value), "op_index": 2, "op_total": 5}  # sqlite_errorcode (3.11+) kept
    assert str(back) == "transaction op 2 of 5 failed, all ops rolled back: UNIQUE constraint failed: t.x"


def test_the_fast_runner_imports_nothing_else_of_the_package():
    """FastRayTaskRunner stands alone: the package's parts register with it, not the reverse."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parent.parent / "chia_prefect" / "runner.py").read_text())
    ours = [ast.unparse(node) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chia_prefect")
            or isinstance(node, ast.Import) and any(a.name.startswith("chia_prefect") for a in node.names)]
    assert ours == []


def test_engine_blind_code_asks_the_dialect_not_the_engine_name():
    """No `engine ==` branches outside the engines: migrations, the flows, the CLI and the
    tool read `node.dialect` or call the node."""
    import re

    package = Path(__file__).resolve().parent.parent / "chia_prefect"
    files = [*package.glob("*.py"), *package.glob("migrations/*.py"), *package.glob("members/*.py")]
    branches = [f"{path.name}:{number}" for path in sorted(files)
                for number, line in enumerate(path.read_text().splitlines(), 1)
                if re.search(r"\bengine\s*(==|!=|\bin\b)", line) and not line.lstrip().startswith(("#", '"'))]
    assert branches == []


def test_the_member_machinery_reads_nodes_only_through_their_public_interface():
    """members/ sees a node as a MemberHost: no `node._private` anywhere in the package."""
    import re

    package = Path(__file__).resolve().parent.parent / "chia_prefect" / "members"
    private = [f"{path.name}:{number}: {line.strip()}" for path in sorted(package.glob("*.py"))
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if re.search(r"\bnode\._[a-z]", line)]
    assert private == []
