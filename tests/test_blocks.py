"""The blocks as blocks: contract, validation, Prefect's standard suite, save/load, pickling."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import ValidationError

import chia_prefect
from chia_prefect import (
    DatabaseNode,
    Placement,
    PostgresNode,
    SQLiteConnectOptions,
    SQLiteNode,
    read,
    write,
)
from chia_prefect.base import LOGO_BASE_URL, STATIC_DIR, member_names


def packaged_logo(url: str) -> Path:
    """The file in the package that a block's logo URL serves (the tests have no internet)."""
    assert url.startswith(LOGO_BASE_URL + "/"), url
    return STATIC_DIR / url.rsplit("/", 1)[1]


class LogoFromThePackage:
    def test_has_a_valid_image(self, block) -> None:
        """Prefect's own check (square, 46-999 px), on the file the URL serves."""
        from PIL import Image

        with Image.open(packaged_logo(str(block._logo_url))) as img:
            assert img.format == "PNG"
            assert img.width == img.height, "Logo should be a square image"
            assert 1000 > img.width > 45


class TestSQLiteNodeStandard(LogoFromThePackage, BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return SQLiteNode


class TestPostgresNodeStandard(LogoFromThePackage, BlockStandardTestSuite):
    @pytest.fixture
    def block(self):
        return PostgresNode


def test_the_block_schema_carries_the_absolute_path_rule():
    """Prefect's schema validation (POST /ui/schemas/validate) refuses a relative path.

    Prefect 3.8's block form does not apply `pattern` (tests/test_ui.py shows it saving one);
    loading such a block raises the validator's message instead.
    """
    from prefect.utilities.schema_tools.validation import validate

    schema = SQLiteNode.model_json_schema()
    assert validate({"db_path": "/srv/data/app.db"}, schema) == []
    errors = validate({"db_path": "data/app.db"}, schema)
    assert [e.message for e in errors] == ["'data/app.db' does not match '^/'"]


def test_public_api_and_paramstyles():
    assert SQLiteNode.paramstyle == "qmark" and PostgresNode.paramstyle == "format"
    assert SQLiteNode.get_block_type_slug() == "sqlite-node"
    assert PostgresNode.get_block_type_slug() == "postgres-node"
    for name in chia_prefect.__all__:
        assert getattr(chia_prefect, name) is not None


def test_database_node_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        DatabaseNode(placement=Placement(), connect_opts=SQLiteConnectOptions())


def test_engine_missing_a_member_cannot_be_constructed(tmp_path):
    class Incomplete(DatabaseNode):
        engine = "x"

        @write
        def execute(self, sql, params=(), *, connect_opts=None):
            return None

    with pytest.raises(TypeError, match="abstract methods.*add_column_if_missing"):
        Incomplete(placement=Placement(), connect_opts=SQLiteConnectOptions())


def test_member_kind_cannot_change_in_a_subclass():
    with pytest.raises(TypeError, match="declared read, but DatabaseNode declares it write"):

        class Sneaky(SQLiteNode):
            @read
            def execute(self, sql, params=(), *, connect_opts=None):
                return None


def test_every_member_is_listed():
    assert member_names(SQLiteNode) == sorted([
        "init_schema", "executescript", "add_column_if_missing", "schema", "execute", "executemany",
        "transaction", "query", "query_arrow", "query_one", "query_value", "exists", "wal_checkpoint", "backup",
        "apply_migration",
        "write_outcome", "prune_idempotency_keys",
    ])
    assert "wal_checkpoint" not in member_names(PostgresNode)


def test_relative_sqlite_path_refused():
    with pytest.raises(ValidationError, match="relative; give an absolute path"):
        SQLiteNode(db_path="data/app.db")


def test_sqlite_path_normalised(tmp_path):
    assert SQLiteNode(db_path=tmp_path / "a" / ".." / "b.db").db_path == str(tmp_path / "b.db")


def test_postgres_needs_dsn_or_parts():
    with pytest.raises(ValidationError, match="give dsn, or host"):
        PostgresNode()
    with pytest.raises(ValidationError, match="not both"):
        PostgresNode(dsn="postgresql://localhost/x", host="localhost")
    assert PostgresNode(host="localhost", dbname="x").dsn is None


def test_postgres_builds_without_psycopg_import():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from chia_prefect import PostgresNode\n"
        "PostgresNode(dsn='postgresql://u:p@h/db')\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_pickled_node_carries_configuration_only(sqlite_path):
    db = SQLiteNode(db_path=sqlite_path)
    db.use_placement_group("pretend-group")
    clone = pickle.loads(pickle.dumps(db))
    assert clone.db_path == db.db_path and clone.reserved_placement_group is None
    assert clone._placement_state.handed_in is None
    assert clone._placement_state.token != db._placement_state.token  # holds are the driver's


def test_save_and_load_round_trip(sqlite_path):
    placement = Placement(pin_to_current_node=True)
    SQLiteNode(db_path=sqlite_path, placement=placement, connect_opts={"busy_timeout_s": 5}).save(
        "round-trip", overwrite=True
    )
    loaded = SQLiteNode.load("round-trip")
    assert loaded.db_path == sqlite_path and loaded.placement == placement
    assert loaded.connect_opts.busy_timeout_s == 5
    assert "round-trip" in loaded.label


def test_register_types_from_module():
    from prefect.cli.block import _register_blocks_in_module
    from prefect.utilities.asyncutils import run_coro_as_sync

    registered = run_coro_as_sync(_register_blocks_in_module(chia_prefect))
    assert {b.__name__ for b in registered} == {"SQLiteNode", "PostgresNode"}


def test_entry_point_declared():
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="prefect.collections")}
    assert "chia_prefect" in names


def test_subclass_gets_its_own_block_type():
    from nodes import AlignmentDBNode
    from prefect.blocks.core import Block
    from prefect.utilities.dispatch import lookup_type

    class Broken(SQLiteNode):  # refused: must not replace sqlite-node either
        pass

    assert AlignmentDBNode.get_block_type_slug() == "alignmentdbnode"
    assert Broken.get_block_type_slug() == "broken"
    assert lookup_type(Block, "sqlite-node") is SQLiteNode
    assert lookup_type(Block, "postgres-node") is PostgresNode


def test_subclass_saves_and_loads_as_itself(sqlite_path):
    from nodes import AlignmentDBNode
    from prefect.blocks.core import Block

    AlignmentDBNode(db_path=sqlite_path).save("align-sub", overwrite=True)
    assert type(Block.load("alignmentdbnode/align-sub")) is AlignmentDBNode


def test_a_saved_block_that_fails_validation_names_itself_and_the_fix(tmp_path):
    from prefect.blocks.core import Block
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentUpdate

    from chia_prefect import ConfigurationError

    SQLiteNode(db_path=str(tmp_path / "ok.db")).save("gone-wrong", overwrite=True)
    with get_client(sync_client=True) as client:  # as the UI's form saves it: unchecked
        document = client.read_block_document_by_name("gone-wrong", "sqlite-node")
        client.update_block_document(document.id, BlockDocumentUpdate(data={**document.data, "db_path": "data/app.db"}))
    for load, ref in ((Block.load, "sqlite-node/gone-wrong"), (SQLiteNode.load, "gone-wrong")):
        with pytest.raises(ConfigurationError) as refused:
            load(ref)
        text = str(refused.value)
        assert "The saved SQLite Node block 'gone-wrong' is not valid" in text
        assert "db_path 'data/app.db' is relative" in text and "Fix it in the Prefect UI" in text
        assert "validate=False" not in text
