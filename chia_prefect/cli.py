"""`chia-prefect`: the operator's front door.

    chia-prefect demo                                   the atomic transaction demo
    chia-prefect plan     --block sqlite-node/app-db --dir migrations/
    chia-prefect migrate  --block sqlite-node/app-db --dir migrations/ [--target N] [--dry-run]
                          [--allow-drift] [--strict] [--lock-timeout S] [--lock-retries N]
    chia-prefect maintain --block sqlite-node/app-db [--backup-dir DIR] [--keep N]
    chia-prefect mcp      --block sqlite-node/app-db    serve the SQL tool over MCP stdio
    chia-prefect blocks register | list

Arguments are checked before Ray or a Prefect server starts. A failure prints one line
(what failed, on which node, the fix); `--debug` adds the traceback and the Ray workers'
output. Blocks live in the Prefect API named by PREFECT_API_URL.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

BLOCK_HELP = ('a saved node: "slug/name" (e.g. sqlite-node/app-db) or a bare name when only one '
              "node type has it; `chia-prefect blocks list` shows them")


class CommandError(Exception):
    """A wrong input the command reports in one line, with the fix."""


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="chia-prefect", formatter_class=formatter,
        description="Database nodes for Prefect flows on Ray: demo, migrations, maintenance, the MCP SQL tool.",
        epilog="example:\n  chia-prefect demo\n  chia-prefect migrate --block sqlite-node/app-db --dir migrations/",
    )
    parser.add_argument("--debug", action="store_true",
                        help="on failure print the full traceback; show the Ray workers' output")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                  epilog=f"example:\n  {example}", formatter_class=formatter)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="on failure print the full traceback; show the Ray workers' output")
        return sub

    demo = command("demo", "run the atomic transaction demo (embedded SQLite, or a saved node)",
                   "chia-prefect demo --keep-ui")
    demo.add_argument("--block", help=BLOCK_HELP + "; default: the embedded SQLite file")
    demo.add_argument("--db-path", help="the embedded SQLite file (default: .demo-data/demo.db here)")
    demo.add_argument("--entries", type=int, default=3, help="entries to record (default 3)")
    demo.add_argument("--iterations", type=int, default=4, help="iterations per entry (default 4)")
    demo.add_argument("--benchmarks", type=int, default=200, help="benchmark rows per iteration (default 200)")
    demo.add_argument("--keep-ui", action="store_true",
                      help="start a Prefect server with its UI for the demo and leave it running, "
                           "so the runs' 'View at' links keep working (without PREFECT_API_URL)")

    plan = command("plan", "print the migration plan of a saved node; writes nothing",
                   "chia-prefect plan --block sqlite-node/app-db --dir migrations/")
    plan.add_argument("--block", required=True, help=BLOCK_HELP)
    plan.add_argument("--dir", required=True, help=DIR_HELP)
    plan.add_argument("--target", type=int, help="plan up to this version (default: the newest); "
                      "below the current version, the down plan")
    _lock_options(plan)

    migrate = command("migrate", "apply pending migrations to a saved node, each atomically with its version row",
                      "chia-prefect migrate --block sqlite-node/app-db --dir migrations/ --target 2")
    migrate.add_argument("--block", required=True, help=BLOCK_HELP)
    migrate.add_argument("--dir", required=True, help=DIR_HELP)
    migrate.add_argument("--target", type=int, help="stop at this version (default: the newest); below the "
                         "current version, undo down to it with the NNNN_name.down.sql files")
    migrate.add_argument("--dry-run", action="store_true", help="print the plan and write nothing (= plan)")
    migrate.add_argument("--allow-drift", action="store_true",
                         help="migrate although the schema changed outside the migrations (the plan shows how)")
    migrate.add_argument("--strict", action="store_true", help="refuse to migrate when the plan's lint warns")
    _lock_options(migrate)

    maintain = command("maintain", "maintain a saved node: SQLite checkpoint, optimize, integrity check, "
                       "backup; Postgres ANALYZE", "chia-prefect maintain --block sqlite-node/app-db --keep 3")
    maintain.add_argument("--block", required=True, help=BLOCK_HELP)
    maintain.add_argument("--backup-dir", help="SQLite: absolute directory for backups on the node's machine "
                          "(default: backups/ beside the database)")
    maintain.add_argument("--keep", type=int, default=7, help="SQLite: how many backups to keep (default 7)")

    mcp = command("mcp", "serve a saved node's read-only SQL tool over MCP stdio (for desktop clients)",
                  "chia-prefect mcp --block sqlite-node/app-db")
    mcp.add_argument("--block", required=True, help=BLOCK_HELP)
    mcp.add_argument("--name", help="tool server name (default: the block name)")
    mcp.add_argument("--read-write", action="store_true", help="also expose execute(sql)")
    mcp.add_argument("--row-limit", type=int, default=100, help="rows per result (default 100)")
    mcp.add_argument("--cell-char-limit", type=int, default=4096, help="characters per cell (default 4096)")
    mcp.add_argument("--total-char-limit", type=int, default=32768, help="characters per result (default 32768)")
    mcp.add_argument("--time-limit-s", type=float, default=10.0, help="seconds per query (default 10)")
    mcp.add_argument("--allow-privileged-role", action="store_true",
                     help="DANGEROUS: serve a Postgres superuser or server file/program role anyway")
    mcp.add_argument("--print-config", action="store_true",
                     help="print the mcpServers entry for a desktop client (absolute command, "
                          "PREFECT_API_URL) and exit")

    blocks = command("blocks", "register the node block types with Prefect, or list saved nodes",
                     "chia-prefect blocks register && chia-prefect blocks list")
    blocks.add_argument("action", choices=["register", "list"], help="register: add the types to the UI's "
                        "catalog; list: the saved nodes as slug/name")
    return parser


# --- checks before anything starts ----------------------------------------------------


def _need_api(what: str) -> str:
    from prefect.settings import PREFECT_API_URL

    url: str | None = PREFECT_API_URL.value()
    if not url:
        raise CommandError(
            f"{what} needs the Prefect API that holds your blocks: set PREFECT_API_URL "
            "(e.g. `prefect server start`, then export PREFECT_API_URL=http://127.0.0.1:4200/api)."
        )
    return url


def _check_api(url: str) -> None:
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=3).raise_for_status()
    except Exception as exc:  # noqa: BLE001 - any failure means the same to the user
        raise CommandError(f"the Prefect API at {url} does not answer ({type(exc).__name__}); "
                           "start it (`prefect server start`) or fix PREFECT_API_URL.") from None


def _block(ref: str) -> str:
    from chia_prefect.ops import check_block_ref, resolve_block

    check_block_ref(ref)  # a malformed name is wrong whatever the API holds
    _check_api(_need_api(f"--block {ref}"))
    return resolve_block(ref)


def _positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise CommandError(f"{option} must be 1 or more, got {value}.")


def _absolute(path: str | None, option: str) -> None:
    if path is not None and not os.path.isabs(path):
        raise CommandError(f"{option} {path!r} is relative: give an absolute path "
                           "(the work runs on Ray workers, maybe on another machine).")


# --- output ---------------------------------------------------------------------------


class _NoFailureEcho(logging.Filter):
    """Drops the console lines in which Prefect reports a run's failure (with its traceback):
    the command ends with the error once. The Prefect API and UI still get them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            return False
        message = record.getMessage()
        return not (message.startswith("Finished in state ") and not message.startswith("Finished in state Completed"))


class _NoTraceback(logging.Formatter):
    """Formats a record as its formatter would, without the traceback."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        bare = copy.copy(record)
        bare.exc_info, bare.exc_text, bare.stack_info = None, None, None
        return self.inner.format(bare)


def _quiet(debug: bool) -> None:
    """Console output for an operator: no tracebacks (they stay in the Prefect logs), no Ray
    token or log-dedup notices."""
    from ray.util.debug import log_once

    log_once("log_dedup_warning")  # marks Ray's one-time dedup notice as shown
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if debug:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    seen: set[int] = set()
    for logger in [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and id(handler) not in seen:
                seen.add(id(handler))
                handler.setFormatter(_NoTraceback(handler.formatter))
                handler.addFilter(_NoFailureEcho())


def _runner(debug: bool) -> Any:
    """The flows' task runner for this command: RAY_ADDRESS, else a temporary local Ray.
    Without --debug the Ray workers' output stays in their logs and the Prefect UI."""
    from prefect_ray.task_runners import RayTaskRunner

    quiet = {} if debug else {"log_to_driver": False}
    if os.environ.get("RAY_ADDRESS"):
        return RayTaskRunner(address=os.environ["RAY_ADDRESS"], init_kwargs=quiet)
    from chia_prefect.local import OneRunRayTaskRunner

    return OneRunRayTaskRunner(init_kwargs={"address": "local", "num_cpus": 2, "include_dashboard": False, **quiet})


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


# --- commands -------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from chia_prefect.ops import atomic_demo, format_summary

    _positive(args.entries, "--entries")
    _positive(args.iterations, "--iterations")
    _positive(args.benchmarks, "--benchmarks")
    block = _block(args.block) if args.block else None
    from contextlib import nullcontext

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from chia_prefect.local import shared_prefect_api

    server = _start_ui_server() if args.keep_ui and not PREFECT_API_URL.value() else None
    with temporary_settings({PREFECT_API_URL: server["api"]}) if server else nullcontext(), shared_prefect_api():
        _quiet(args.debug)
        summary = atomic_demo.with_options(task_runner=_runner(args.debug))(
            block, args.entries, args.iterations, args.benchmarks, args.db_path)
    print("\n" + format_summary(summary))
    if server is not None:
        print(f"\nThe Prefect UI stays up at {server['ui']} with this demo's runs "
              f"(server pid {server['pid']}, log {server['log']}); stop it with `kill {server['pid']}`.")
    elif not PREFECT_API_URL.value():
        print("\nThe runs' 'View at' links pointed at a temporary Prefect server, now stopped; "
              "`chia-prefect demo --keep-ui` leaves one with its UI running.")
    return 0


def _start_ui_server() -> dict[str, Any]:
    """A `prefect server start` with its UI, detached, so it outlives the demo."""
    import socket
    import subprocess

    import httpx

    with socket.socket() as s:
        port = 4200
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    log = os.path.abspath(os.path.join(".demo-data", "prefect-server.log"))
    os.makedirs(os.path.dirname(log), exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    with open(log, "ab") as out:
        proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CommandError(f"the Prefect server for --keep-ui exited at start; see {log}.")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return {"api": api, "ui": f"http://127.0.0.1:{port}", "pid": proc.pid, "log": log}
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise CommandError(f"the Prefect server for --keep-ui did not start within 120 s; see {log}.")


DIR_HELP = ("directory of migrations: NNNN_name.sql or .py (def migrate(tx)), NNNN_name.down.sql, "
            "R__name.sql (repeatable), before_migrate.sql / after_migrate.sql (callbacks)")


def _lock_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lock-timeout", type=float, default=5.0, metavar="S",
                        help="Postgres: how long a migration's statement waits for a lock before the "
                        "migration rolls back and is tried again (default 5)")
    parser.add_argument("--lock-retries", type=int, default=4, metavar="N",
                        help="Postgres: how many times such a migration is tried again, with backoff (default 4)")


def _migrations(directory: str) -> list[Any]:
    from chia_prefect.migrations import load_migrations
    from chia_prefect.ops import migrations_dir

    return load_migrations(migrations_dir(directory))


def _plan(args: argparse.Namespace) -> int:
    from chia_prefect.ops import migration_plan

    _migrations(args.dir)
    _migration_numbers(args)
    block = _block(args.block)
    _quiet(args.debug)
    # A flow on Prefect's default runner: the members run in this process, no Ray starts.
    print(f"{block}: {migration_plan(block, os.path.abspath(args.dir), args.target, args.lock_timeout, args.lock_retries)}")
    return 0


def _migration_numbers(args: argparse.Namespace) -> None:
    if args.target is not None and args.target < 0:
        raise CommandError(f"--target must be 0 or more, got {args.target}.")
    if args.lock_timeout <= 0:
        raise CommandError(f"--lock-timeout must be more than 0 seconds, got {args.lock_timeout:g}.")
    if args.lock_retries < 0:
        raise CommandError(f"--lock-retries must be 0 or more, got {args.lock_retries}.")


def _migrate(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _plan(args)
    from chia_prefect.ops import migrate_database

    _migrations(args.dir)
    _migration_numbers(args)
    block = _block(args.block)
    _quiet(args.debug)
    out = migrate_database.with_options(task_runner=_runner(args.debug))(
        block, os.path.abspath(args.dir), args.target, False, args.allow_drift, args.strict,
        args.lock_timeout, args.lock_retries)
    moved = out["applied"] or out["applied_elsewhere"] or out["reverted"]
    done = ", ".join(out["pending"]) if moved else "nothing to apply"
    verb = "undone" if out["direction"] == "down" else "applied"
    line = f"{block}: version {out['from']} -> {out['to']}; {verb}: {done}"
    if out["repeatables"]:
        line += f"; repeatables applied: {', '.join(out['repeatables'])}"
    if out["applied_elsewhere"]:
        line += f" (by a concurrent run: {out['applied_elsewhere']})"
    print(line)
    for warning in out["lint"]:
        print(f"lint: {warning}")
    if out["drift"]:
        print("drift allowed (--allow-drift): " + "; ".join(out["drift"]))
    return 0


def _maintain(args: argparse.Namespace) -> int:
    from chia_prefect.ops import maintenance

    _absolute(args.backup_dir, "--backup-dir")
    _positive(args.keep, "--keep")
    block = _block(args.block)
    _quiet(args.debug)
    out = maintenance.with_options(task_runner=_runner(args.debug))(block, args.backup_dir, args.keep)
    print(f"{block}: " + "; ".join(f"{k}: {v}" for k, v in out.items()))
    return 0


def _blocks(args: argparse.Namespace) -> int:
    url = _need_api(f"blocks {args.action}")
    _check_api(url)
    from prefect.client.orchestration import get_client

    from chia_prefect.ops import node_slugs

    if args.action == "register":
        from chia_prefect.postgres import PostgresNode
        from chia_prefect.sqlite import SQLiteNode

        for cls in (SQLiteNode, PostgresNode):
            cls.register_type_and_schema()
            print(f"registered {cls.get_block_type_slug()} ({cls.get_block_type_name()})")
        return 0
    from prefect.exceptions import ObjectNotFound

    named = []
    with get_client(sync_client=True) as client:
        for slug in node_slugs():
            try:
                documents = client.read_block_documents_by_type(slug, include_secrets=False)
            except ObjectNotFound:  # the type is not registered on this server
                continue
            named += [f"{slug}/{d.name}" for d in documents if d.name and not d.is_anonymous]
    named.sort()
    print("\n".join(named) if named else
          "no saved nodes; save one from code, e.g. SQLiteNode(db_path='/abs/app.db').save('app-db')")
    return 0


def _mcp(args: argparse.Namespace) -> int:
    from chia_prefect.query_tool import serve_block_stdio

    if args.print_config:
        import json
        import shutil

        block = _block(args.block)
        command = shutil.which("chia-prefect") or os.path.join(os.path.dirname(sys.executable), "chia-prefect")
        entry = {"command": os.path.abspath(command), "args": ["mcp", "--block", block, *argv_options(args)],
                 "env": {"PREFECT_API_URL": _need_api("--print-config")}}
        print(json.dumps({"mcpServers": {args.name or block.split("/")[-1]: entry}}, indent=2))
        return 0
    return serve_block_stdio(args)


def argv_options(args: argparse.Namespace) -> list[str]:
    """The mcp options given that differ from their defaults, as command-line arguments."""
    out: list[str] = []
    defaults = {"row_limit": 100, "cell_char_limit": 4096, "total_char_limit": 32768, "time_limit_s": 10.0}
    for key, default in defaults.items():
        if getattr(args, key) != default:
            out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for flag in ("read_write", "allow_privileged_role"):
        if getattr(args, flag):
            out.append(f"--{flag.replace('_', '-')}")
    if args.name:
        out += ["--name", args.name]
    return out


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _demo, "plan": _plan, "migrate": _migrate, "maintain": _maintain, "mcp": _mcp, "blocks": _blocks,
}


def main(argv: list[str] | None = None) -> int:
    from chia_prefect.errors import ConfigurationError

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("chia-prefect: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into one line
        if args.debug:
            raise
        if isinstance(exc, (CommandError, ConfigurationError)):
            print(f"chia-prefect {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        else:
            print(f"chia-prefect {args.command}: error: {_one_line(_root(exc))}\n"
                  "(--debug shows the traceback; the run's logs are in the Prefect UI)", file=sys.stderr)
        return 1


def _root(exc: BaseException) -> BaseException:
    """The error worth showing: ours when it is in the chain (a flow re-raises a task's)."""
    from chia_prefect.errors import ChiaPrefectError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ChiaPrefectError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


if __name__ == "__main__":
    sys.exit(main())
