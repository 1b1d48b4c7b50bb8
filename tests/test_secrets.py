"""The password never shows: repr, str, errors, logs (local and through the API), documents."""

from __future__ import annotations

import logging
import traceback

import pytest
from helpers import wait_until
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect_ray import RayTaskRunner
from pydantic import ValidationError

from chia_prefect import ConfigurationError, NodeConnectionError, PostgresNode
from chia_prefect.migrations import Migration, migrate

PASSWORD = "Zs3cr3t-Pw-4242"



def assert_clean(text: str) -> None:
    assert PASSWORD not in text


def closed_port_node() -> PostgresNode:
    return PostgresNode(host="127.0.0.1", port=1, dbname="db", user="u", password=PASSWORD,
                        connect_opts={"connect_timeout_s": 2})


def test_repr_and_str_hide_password():
    for node in (closed_port_node(), PostgresNode(dsn=f"postgresql://u:{PASSWORD}@h/db")):
        assert_clean(repr(node))
        assert_clean(str(node))
        assert_clean(repr(node.model_dump()))
        assert_clean(node.model_dump_json())


def test_validation_errors_hide_dsn():
    with pytest.raises(ValidationError) as info:
        PostgresNode(dsn=f"postgresql://u:{PASSWORD}@h/db", host="h")
    assert_clean(str(info.value))


def test_libpq_echo_of_the_dsn_is_scrubbed():
    # libpq quotes this whole URI, password included, in its error message.
    node = PostgresNode(dsn=f"postgresql://u:{PASSWORD}@[bad/db")
    with pytest.raises(ConfigurationError) as info:
        node.query("SELECT 1")
    assert "not valid" in str(info.value)
    assert_clean(str(info.value))
    assert info.value.__suppress_context__  # the driver error, which quotes the DSN, is dropped


def test_connection_error_names_target_not_password(caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(NodeConnectionError) as info:
        closed_port_node().query("SELECT 1")
    text = str(info.value)
    assert "127.0.0.1:1" in text and "Postgres Node" in text
    assert_clean(text)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert_clean(caplog.text)


@flow(task_runner=RayTaskRunner())
def failing_flow(block_name: str) -> None:
    PostgresNode.load(block_name).query("SELECT 1")


@flow(task_runner=RayTaskRunner())
def failing_migration_flow(block_name: str) -> None:
    node = PostgresNode.load(block_name)
    migrate(node, [Migration(1, "ok", "CREATE TABLE kept (x INTEGER)"),
                   Migration(2, "broken", "CREATE TABLE oops (x NO_SUCH_TYPE)")])


@flow(task_runner=RayTaskRunner())
def succeeding_flow(block_name: str) -> int:
    node = PostgresNode.load(block_name)
    migrate(node, [Migration(1, "ok", "CREATE TABLE kept (x INTEGER)"),
                   Migration(2, "more", "ALTER TABLE kept ADD COLUMN y TEXT")])
    node.execute("INSERT INTO kept (x, y) VALUES (%s, %s)", (1, "one"))
    # What a user might publish about the node: its repr goes into an artifact.
    create_markdown_artifact(f"# Node\n\n`{node!r}`\n\n{node}", key="node-summary")
    return node.query_value("SELECT COUNT(*) FROM kept")


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_flow_runs_leave_no_password(caplog, postgres_dsn):
    """Everything a failing and a succeeding flow leave behind, scanned for the password."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    caplog.set_level(logging.DEBUG)
    closed_port_node().save("secret-bad", overwrite=True)
    # A role with a password on the real server (the embedded one trusts local sockets).
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS pw_user; CREATE ROLE pw_user LOGIN PASSWORD '{PASSWORD}'")
        conn.execute("GRANT ALL ON SCHEMA public TO pw_user")
    parts = {**conninfo_to_dict(postgres_dsn), "user": "pw_user", "password": PASSWORD}
    PostgresNode(dsn=make_conninfo(**parts)).save("secret-good", overwrite=True)

    bad = failing_flow("secret-bad", return_state=True)
    assert bad.is_failed()
    bad_migration = failing_migration_flow("secret-good", return_state=True)
    assert bad_migration.is_failed()
    good = succeeding_flow("secret-good", return_state=True)
    assert good.is_completed() and good.result() == 1
    states = (bad, bad_migration, good)

    async def everything_recorded() -> tuple[str, dict]:
        # Read by id: the session's API holds thousands of runs by now, and an unfiltered
        # read returns only the API's default page of them.
        async with get_client() as client:
            texts, counts = [], {"flow_runs": 0, "logs": 0, "task_runs": 0, "artifacts": 0, "documents": 0}
            ids = [state.state_details.flow_run_id for state in states]
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            runs += await client.read_flow_runs(  # the migrate subflows
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=ids)))
            run_ids = [run.id for run in runs]
            for run in runs:
                texts += [run.model_dump_json()]
                logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
                texts += [log.message for log in logs]
                counts["logs"] += len(logs)
            counts["flow_runs"] = len(runs)
            texts += [state.message or "" for state in states]
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
            texts += [t.model_dump_json() for t in tasks]
            counts["task_runs"] = len(tasks)
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids)))
            texts += [a.model_dump_json() for a in artifacts]
            counts["artifacts"] = len(artifacts)
            for name in ("secret-bad", "secret-good"):
                doc = await client.read_block_document_by_name(name, "postgres-node", include_secrets=False)
                texts.append(doc.model_dump_json())
                counts["documents"] += 1
            return "\n".join(texts), counts

    def all_recorded() -> tuple[str, dict] | None:
        recorded, counts = run_coro_as_sync(everything_recorded())
        expected = ("127.0.0.1:1", "NO_SUCH_TYPE", "Migration outcome", "node-summary")
        return (recorded, counts) if all(text in recorded for text in expected) else None

    # Logs reach the API in batches: wait for the last of them.
    found = wait_until(all_recorded, timeout=30, interval=1, what="the failures and artifacts recorded")
    recorded, counts = found
    print(f"scanned: {counts}, {len(recorded)} characters")
    assert "127.0.0.1:1" in recorded  # the failure is there, named by its target
    assert "NO_SUCH_TYPE" in recorded and "Migration outcome" in recorded and "node-summary" in recorded
    assert counts["artifacts"] >= 4 and counts["logs"] > 0
    assert recorded.count(PASSWORD) == 0
    assert_clean(caplog.text)
    for state in (bad, bad_migration):
        with pytest.raises(Exception) as info:
            state.result()
        assert_clean(str(info.value))
        assert_clean("".join(traceback.format_exception(info.value)))
