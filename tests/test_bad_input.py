"""Bad input: property-based checks that nothing partial happens and errors name the problem,
and the network-filesystem refusal."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chia_prefect import (
    ConfigurationError,
    InvalidOperationError,
    NetworkFilesystemError,
    SQLiteNode,
)
from chia_prefect.engines import sqlite as sqlite_module
from chia_prefect.errors import InvalidIdentifierError, TransactionControlError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def raw(member):
    """The member's function itself: the semantics without a Prefect task run per example."""
    return member._member.fn


@pytest.fixture
def db(tmp_path):
    node = SQLiteNode(db_path=str(tmp_path / "p.db"))
    raw(node.init_schema)(node, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE)")
    raw(node.execute)(node, "INSERT INTO t (id, v) VALUES (1, 'keep')")
    return node


def snapshot(node) -> list[tuple]:
    conn = sqlite3.connect(node.db_path)
    try:
        return conn.execute("SELECT id, v FROM t ORDER BY id").fetchall()
    finally:
        conn.close()


GOOD = ("INSERT INTO t (v) VALUES (?)", ("fresh",))
params = st.one_of(st.none(), st.tuples(st.text(max_size=5)), st.lists(st.tuples(st.text(max_size=5)), max_size=3),
                   st.integers(), st.text(max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
ops = st.lists(st.tuples(st.sampled_from([
    "INSERT INTO t (v) VALUES (?)", "UPDATE t SET v = ? WHERE id = 1", "DELETE FROM t WHERE v = ?",
    "BEGIN", "COMMIT", "INSERT INTO nope VALUES (?)", "INSERT INTO t (id, v) VALUES (1, ?)",
]), params), max_size=5)


@SETTINGS
@given(op_list=ops)
def test_transaction_all_or_nothing_for_any_op_list(db, op_list):
    before = snapshot(db)
    try:
        results = raw(db.transaction)(db, op_list)
    except (InvalidOperationError, sqlite3.Error) as exc:
        assert snapshot(db) == before  # never a partial transaction
        if isinstance(exc, sqlite3.Error):
            assert "transaction op" in str(exc) and isinstance(exc.op_index, int)
        else:
            assert str(exc)  # names the problem
    else:
        assert len(results) == len(op_list) > 0


@SETTINGS
@given(value=st.one_of(st.lists(st.text(max_size=3), max_size=3), st.integers(), st.text(max_size=3), st.sets(st.integers(), max_size=2)))
def test_single_statement_params_type_is_checked(db, value):
    before = snapshot(db)
    with pytest.raises(InvalidOperationError, match="must be a tuple or a dict"):
        raw(db.execute)(db, "INSERT INTO t (v) VALUES (?)", value)
    assert snapshot(db) == before


@SETTINGS
@given(name=st.text(max_size=70))
def test_identifiers_validated_before_sql(db, name):
    schema_before = raw(db.schema)(db)
    try:
        added = raw(db.add_column_if_missing)(db, "t", name, "TEXT")
    except InvalidIdentifierError:
        assert raw(db.schema)(db) == schema_before
    else:
        assert added in (True, False) and name.isidentifier() and name.isascii()


@SETTINGS
@given(keyword=st.sampled_from(["BEGIN", "COMMIT", "ROLLBACK", "END", "SAVEPOINT x", "RELEASE x", "begin transaction"]),
       position=st.integers(0, 2))
def test_transaction_control_anywhere_in_ops_is_refused(db, keyword, position):
    op_list = [GOOD, GOOD]
    op_list.insert(position, (keyword, None))
    with pytest.raises(TransactionControlError, match=f"transaction op {position}"):
        raw(db.transaction)(db, op_list)
    assert snapshot(db) == [(1, "keep")]


BAD_OPS = [("COMMIT", None), ("INSERT INTO t (v) VALUES (?)", 5), ["INSERT INTO t (v) VALUES (?)"], 7,
           (["not", "sql"], ("x",)), ({"sql": 1}, None), ("INSERT INTO t (v) VALUES (?)", ("a",), "extra")]


@SETTINGS
@given(bad=st.sampled_from(BAD_OPS), position=st.integers(0, 299), size=st.integers(1, 300))
def test_the_first_bad_op_among_many_is_named(db, bad, position, size):
    """Most op lists are checked a column at a time; a bad one is then checked op by op, so
    its error names the op at fault, wherever it is in a long list."""
    position = min(position, size)
    op_list = [("INSERT INTO t (v) VALUES (?)", (f"v{i}",)) for i in range(size)]
    op_list.insert(position, bad)
    with pytest.raises(InvalidOperationError, match=f"transaction op {position}[:,]"):
        raw(db.transaction)(db, op_list)
    assert snapshot(db) == [(1, "keep")]


@SETTINGS
@given(position=st.integers(0, 50), size=st.integers(1, 50), listed=st.booleans())
def test_postgres_placeholders_checked_per_op_position(position, size, listed):
    """The Postgres paramstyle check in a long op list names the first op whose SQL has `?`
    with params; the same SQL without params (a bare statement) passes."""
    from chia_prefect._sql import normalize_ops
    from chia_prefect.engines.postgres import check_paramstyle

    good = [("INSERT INTO t (v) VALUES (%s)", ("a",)), ("SELECT '?'", None)] * size
    bad = ("UPDATE t SET v = ? WHERE id = 1", [("b",)] if listed else ("b",))
    assert normalize_ops(good + [("UPDATE t SET v = ? WHERE id = 1", None)], all_statements=True,
                         check_paramstyle=check_paramstyle)
    op_list = list(good)
    op_list.insert(min(position, len(op_list)), bad)
    with pytest.raises(InvalidOperationError, match=f"transaction op {min(position, len(good))}: the SQL has \\? placeholders"):
        normalize_ops(op_list, all_statements=True, check_paramstyle=check_paramstyle)


def test_unknown_connect_opts_key_named(db):
    with pytest.raises(ConfigurationError, match="bogus"):
        raw(db.query)(db, "SELECT 1", connect_opts={"bogus": True})


def test_network_filesystem_refused(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    share = tmp_path / "share"
    share.mkdir()
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\nserver:/export {share} nfs4 rw,vers=4.2 0 0\n")
    monkeypatch.setattr(sqlite_module, "MOUNTS_FILE", str(mounts))
    sqlite_module._filesystem_type.cache_clear()
    node = SQLiteNode(db_path=str(share / "app.db"))
    with pytest.raises(NetworkFilesystemError, match="nfs4 filesystem.*allow_network_fs"):
        raw(node.init_schema)(node, "CREATE TABLE x (a)")
    assert not (share / "app.db").exists()
    raw(node.init_schema)(node, "CREATE TABLE x (a)", connect_opts={"allow_network_fs": True, "wal": False})
    assert (share / "app.db").exists()
    local = SQLiteNode(db_path=str(tmp_path / "local.db"))
    raw(local.init_schema)(local, "CREATE TABLE x (a)")  # ext4 is fine
    sqlite_module._filesystem_type.cache_clear()


@pytest.mark.postgres
def test_qmark_placeholders_on_postgres_are_refused_with_the_fix(postgres_db):
    postgres_db.execute("CREATE TABLE IF NOT EXISTS qm (v TEXT)")
    calls = [
        lambda: postgres_db.execute("INSERT INTO qm (v) VALUES (?)", ("x",)),
        lambda: postgres_db.executemany("INSERT INTO qm (v) VALUES (?)", [("x",), ("y",)]),
        lambda: postgres_db.transaction([("INSERT INTO qm (v) VALUES (%s)", ("ok",)),
                                         ("INSERT INTO qm (v) VALUES (?)", ("x",))]),
        lambda: postgres_db.query("SELECT v FROM qm WHERE v = ?", ("x",)),
    ]
    for call in calls:
        with pytest.raises(InvalidOperationError, match=r"\? placeholders.*%s.*db\.render\(sql\)"):
            call()
    assert postgres_db.query_value("SELECT COUNT(*) FROM qm") == 0  # nothing ran
    rendered = postgres_db.render("INSERT INTO qm (v) VALUES (?)")
    assert postgres_db.execute(rendered, ("x",)).rowcount == 1
    # A `?` that is not a placeholder (jsonb's key-exists operator beside %s) is left alone.
    assert postgres_db.query_value("SELECT '{\"a\": 1}'::jsonb ? %s", ("a",)) is True
