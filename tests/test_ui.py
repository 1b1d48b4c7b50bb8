"""The Prefect UI in a real browser: the block form, and a scheduled deployment's run page.

A `prefect server` (UI on) runs on a free port; headless Chromium (Debian's `chromium`)
drives it through Playwright. The catalog's logo URLs are answered from the files in the
package, as the machine has no internet. On failure, a screenshot of the page is saved in
`test-artifacts/`. Outside CI the tests skip when Chromium or Playwright is missing; in CI
(`CI` set) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import wait_until
from prefect.blocks.core import Block
from test_deployments import BIN, ROOT, end_flow_runs_of, finished_run, free_port, stop, wait_healthy
from test_deployments import api as deployments_api

from chia_prefect import ConfigurationError, SQLiteNode
from chia_prefect.base import LOGO_BASE_URL, STATIC_DIR

pytestmark = [pytest.mark.ui, pytest.mark.slow]

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("CHIA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SQLITE_BLOCK = "ui-made-node"
RELATIVE_BLOCK = "ui-relative-path"


def _require_browser() -> None:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install 'chia-prefect[test]')")
    if not CHROMIUM:
        missing.append("chromium (apt-get install chromium)")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests need {', '.join(missing)}")
        pytest.skip(f"needs {', '.join(missing)}")


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    _require_browser()
    home = tmp_path_factory.mktemp("prefect-ui-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_API_URL=f"{url}/api", PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"{url}/api")
        env.update(PREFECT_API_URL=f"{url}/api", PREFECT_WORKER_QUERY_SECONDS="1")
        register = subprocess.run([str(BIN / "prefect"), "block", "register", "-m", "chia_prefect"],
                                  env=env, capture_output=True, text=True, timeout=120)
        assert register.returncode == 0, register.stderr[-2000:]
        yield {"url": url, "api": f"{url}/api", "env": env, "home": home}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def browser(ui_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    logos: list[str] = []

    def packaged_logo(route) -> None:
        name = route.request.url.rsplit("/", 1)[1]
        logos.append(name)
        route.fulfill(path=str(STATIC_DIR / name), content_type="image/png")

    page.route(f"{LOGO_BASE_URL}/*", packaged_logo)
    page.logos = logos
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()


def api(server, path: str, body: dict | None = None) -> object:
    return deployments_api({"url": server["api"]}, path, body)


def in_python(server, fn, *args):
    """Call `fn` against the UI's server, in a thread: Playwright's sync API keeps an event
    loop running in this one, where Prefect's sync-or-async calls would return coroutines."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def call():
        with temporary_settings({PREFECT_API_URL: server["api"]}):
            return fn(*args)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result()


def blocks_named(server, name: str) -> list:
    return api(server, "/block_documents/filter", {"block_documents": {"name": {"any_": [name]}}})


def test_create_a_sqlite_node_in_the_block_form_then_use_it(ui_server, page, tmp_path, ray_cluster):
    from playwright.sync_api import expect

    page.goto(f"{ui_server['url']}/blocks/catalog")
    page.get_by_placeholder("Search blocks").fill("SQLite")
    card = page.locator(".block-type-card-preview", has_text="SQLite Node")
    expect(card).to_contain_text("Writes are never retried or replayed")
    logo = card.locator("img")
    expect(logo).to_have_attribute("src", f"{LOGO_BASE_URL}/sqlite-node.png")
    page.wait_for_function("img => img.complete && img.naturalWidth === 256", arg=logo.element_handle())
    assert "sqlite-node.png" in page.logos

    card.get_by_role("button", name="Create").click()
    page.wait_for_url("**/blocks/catalog/sqlite-node/create")
    path_field = page.locator(".schema-form-property", has_text="Database file").locator("textarea").first
    expect(path_field).to_have_attribute("placeholder", "/srv/data/app.db")
    for section in ("Placement on Ray (Optional)", "Connection options (Optional)", "Queue writers (Optional)"):
        expect(page.get_by_text(section, exact=True)).to_be_visible()
    page.locator(".p-form .p-text-input input").first.fill(RELATIVE_BLOCK)

    # A relative path. Prefect 3.8's block form does not check the schema's `pattern`, so it
    # saves; loading the block then fails, naming the block, the field and the fix.
    path_field.fill("data/app.db")
    page.get_by_role("button", name="Create", exact=True).click()
    page.wait_for_url("**/blocks/block/*")
    saved = blocks_named(ui_server, RELATIVE_BLOCK)
    assert [doc["data"]["db_path"] for doc in saved] == ["data/app.db"], saved
    for load, ref in ((SQLiteNode.load, RELATIVE_BLOCK), (Block.load, f"sqlite-node/{RELATIVE_BLOCK}")):
        with pytest.raises(ConfigurationError) as refused:
            in_python(ui_server, load, ref)
        assert f"The saved SQLite Node block '{RELATIVE_BLOCK}' is not valid" in str(refused.value)
        assert "db_path 'data/app.db' is relative; give an absolute path" in str(refused.value)
        assert "validate=False" not in str(refused.value)

    page.goto(f"{ui_server['url']}/blocks/catalog/sqlite-node/create")
    page.locator(".p-form .p-text-input input").first.fill(SQLITE_BLOCK)
    db_path = str(tmp_path / "ui" / "made-in-the-form.db")
    path_field.fill(db_path)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "sqlite-node-block-form.png"))
    page.get_by_role("button", name="Create", exact=True).click()
    page.wait_for_url("**/blocks/block/*")
    expect(page.get_by_text(db_path)).to_be_visible()
    expect(page.locator("body")).to_contain_text(f'SQLiteNode.load("{SQLITE_BLOCK}")')

    # Loaded by name in Python, against the same server, and used on Ray.
    from ui_flows import use_the_form_block

    node = in_python(ui_server, SQLiteNode.load, SQLITE_BLOCK)
    assert node.db_path == db_path and node.placement.require_colocated
    assert node.connect_opts.writer_queue and node.connect_opts.busy_timeout_s == 30
    assert in_python(ui_server, use_the_form_block, SQLITE_BLOCK) == [{"id": 1, "note": "from the form"}]
    flow_runs = api(ui_server, "/flow_runs/filter", {"flows": {"name": {"any_": ["use-the-form-block"]}}})
    assert [r["state"]["type"] for r in flow_runs] == ["COMPLETED"]
    # The Ray workers served the session's API before: their task runs still land here.
    assert _recorded_task_runs(ui_server, flow_runs[0]["id"], "sqlite.query") >= {
        "sqlite.init_schema", "sqlite.execute", "sqlite.query"}


def test_a_postgres_password_typed_in_the_form_is_masked_once_saved(ui_server, page):
    """Prefect 3.8's form shows the characters while typing (its text input for every
    string); once saved, the block page shows only asterisks and the page never holds it."""
    from playwright.sync_api import expect

    secret = "hunter2-typed-in-the-ui"
    page.goto(f"{ui_server['url']}/blocks/catalog/postgres-node/create")
    page.locator(".p-form .p-text-input input").first.fill("ui-postgres")
    field = lambda description: page.locator(".schema-form-property", has_text=description).locator("textarea").first  # noqa: E731
    expect(field("Password of the role.")).to_be_visible()
    field("Server host name, IP or socket directory.").fill("db.internal")
    field("Database name.").fill("app")
    field("Password of the role.").fill(secret)
    page.get_by_role("button", name="Create", exact=True).click()
    page.wait_for_url("**/blocks/block/*")
    expect(page.get_by_text("db.internal")).to_be_visible()
    expect(page.get_by_text("********").first).to_be_visible()
    assert secret not in page.content()
    page.goto(f"{ui_server['url']}/blocks/catalog/sqlite-node")
    expect(page.locator("body")).to_contain_text('db = SQLiteNode.load("block-name")')

    from chia_prefect import PostgresNode

    node = in_python(ui_server, PostgresNode.load, "ui-postgres")
    assert (node.host, node.dbname, node.port) == ("db.internal", "app", None)
    assert node.password.get_secret_value() == secret and secret not in repr(node)


@pytest.mark.timeout(900)
def test_a_scheduled_deployment_run_shows_member_tasks_and_the_migration_artifact(ui_server, page, tmp_path):
    from playwright.sync_api import expect

    env = ui_server["env"]
    db_path = tmp_path / "scheduled" / "app.db"
    deploy = subprocess.run([sys.executable, "-c", DEPLOY, str(ROOT), str(db_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    deployment_id = deploy.stdout.strip().splitlines()[-1]

    worker_log = tmp_path / "worker.log"
    with open(worker_log, "w") as log:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "ui-pool"], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        run = finished_run({"url": ui_server["api"]}, {"deployments": {"id": {"any_": [deployment_id]}}},
                           worker_log, timeout=420)
    finally:
        stop(worker)
        end_flow_runs_of(ui_server["api"])  # the next scheduled run, if the worker took it
    assert run["auto_scheduled"] and run["state"]["type"] == "COMPLETED"

    # The deployment's flow runs `migrate`, a subflow: the members and the artifact are its.
    subflows = api(ui_server, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}})
    assert [sub["name"] for sub in subflows] and len(subflows) == 1, subflows
    sub = subflows[0]
    members = _recorded_task_runs(ui_server, sub["id"])
    assert {"sqlite.apply_migration", "sqlite.query"} <= members, members

    page.goto(f"{ui_server['url']}/deployments/deployment/{deployment_id}")
    page.get_by_role("link", name=run["name"]).first.click()
    page.wait_for_url(f"**/runs/flow-run/{run['id']}**")
    expect(page.get_by_text("Completed").first).to_be_visible()
    page.get_by_text("Subflow Runs", exact=True).first.click()
    page.get_by_role("link", name=sub["name"]).first.click()
    page.wait_for_url(f"**/runs/flow-run/{sub['id']}**")

    page.get_by_text("Task Runs", exact=True).first.click()
    for member in ("sqlite.apply_migration", "sqlite.query"):
        expect(page.get_by_text(member).first).to_be_visible()
    page.get_by_text("Artifacts", exact=True).first.click()
    expect(page.get_by_text("migration-outcome").first).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "scheduled-run-artifacts.png"))


def _recorded_task_runs(server, flow_run_id: str, last: str = "sqlite.apply_migration") -> set[str]:
    """Names (without the run suffix) of the flow run's task runs, once the API has them all:
    workers report them as events, recorded a moment after the flow run completes."""
    def names() -> set[str] | None:
        runs = api(server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        done = {r["name"].rsplit("-", 1)[0] for r in runs if r["state"] and r["state"]["type"] == "COMPLETED"}
        return done if last in done else None

    return wait_until(names, 60, interval=1, what=f"task run {last} of flow run {flow_run_id} to be recorded")


# Runs in a subprocess against the UI server: a block, a process pool, and a deployment of
# the migration flow whose first scheduled run starts ~20 s from now.
DEPLOY = """
import sys
from datetime import datetime, timedelta, timezone
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.schedules import IntervalSchedule
from chia_prefect import SQLiteNode

root, db_path = sys.argv[1], sys.argv[2]
SQLiteNode(db_path=db_path).save("ui-scheduled", overwrite=True)
with get_client(sync_client=True) as client:
    client.create_work_pool(WorkPoolCreate(name="ui-pool", type="process"), overwrite=True)
anchor = datetime.now(timezone.utc) + timedelta(seconds=20)
deployment_id = flow.from_source(source=root, entrypoint="flows/migrate.py:migrate_database").deploy(
    name="scheduled-migrate", work_pool_name="ui-pool", build=False, push=False, print_next_steps=False,
    parameters={"block": "sqlite-node/ui-scheduled", "migrations_dir": f"{root}/chia_prefect/demo_migrations"},
    schedules=[IntervalSchedule(interval=timedelta(hours=1), anchor_date=anchor)],
)
print(deployment_id)
"""
