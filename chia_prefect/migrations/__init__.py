"""Schema migrations, as Flyway and Atlas keep them, applied by a Prefect flow.

    from chia_prefect.migrations import load_migrations, migrate, plan

    migrations = load_migrations("migrations/")      # the folder's files, checked
    print(plan(db, migrations).text())                # current, target, pending, drift, lint
    migrate(db, migrations)                           # a Prefect flow

A migrations folder holds:
- `NNNN_name.sql`, numbered 1..N: versioned migrations. `NNNN_name.py` defining
  `def migrate(tx)` is a Python one: what it issues through `tx` runs in the same
  transaction as its version row, on the node's machine.
- `NNNN_name.down.sql` (or `def down(tx)` in the `.py`): how to undo version NNNN;
  `target=` below the current version runs them newest first.
- `R__name.sql` / `R__name.py`: repeatable migrations (views, functions, triggers),
  re-applied after the versioned ones whenever their text changes.
- `before_migrate`, `after_migrate`, `before_each_migrate`, `after_each_migrate` (`.sql`,
  or `.py` defining `def callback(tx)`): callbacks. `before_migrate` runs in the first
  applied step's transaction, before it; `after_migrate` in the last one's, after it; the
  `_each_` ones in every step's.

Every step is applied by the node's `apply_migration` member under the database's
migration lock, in ONE transaction with its row in `chia_schema_versions` and the schema's
fingerprint after it (see `chia_prefect.migrations.apply`); a `-- chia: no-transaction`
file runs alone, under the same lock, and is NOT atomic. Before migrating, the live schema
is compared with the last fingerprint: a change nobody migrated is drift, refused unless
`allow_drift`. The plan lints what would run (`chia_prefect.engines.lint`); `strict`
refuses on a warning. Refused, with errors that name the versions: a database ahead of the
code (`SchemaAheadError`), an applied migration whose text changed (`ChecksumMismatchError`),
an unapplied migration older than the newest applied one, a down step that has no down file.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from chia_prefect.base import DatabaseNode
from chia_prefect.engines.lint import LintWarning
from chia_prefect.errors import (
    ChecksumMismatchError,
    DatabaseNotFoundError,
    MigrationError,
    MigrationLintError,
    SchemaAheadError,
)
from chia_prefect.local import ray_task_runner
from chia_prefect.migrations.apply import (
    VERSION_TABLE,
    Body,
    MigrationTransaction,
    Step,
    drift_error,
    fingerprint_rows,
    schema_diff,
)

_VERSIONED = re.compile(r"(\d{4})_([A-Za-z0-9][A-Za-z0-9_\-]*)(\.down)?\.(sql|py)")
_REPEATABLE = re.compile(r"R__([A-Za-z0-9][A-Za-z0-9_\-]*)\.(sql|py)")
CALLBACKS = ("before_migrate", "before_each_migrate", "after_each_migrate", "after_migrate")
_NO_TRANSACTION = re.compile(r"\s*--\s*chia:\s*no-transaction\b", re.IGNORECASE)
NAMING = ("migration files are named NNNN_name.sql (or .py, or NNNN_name.down.sql), R__name.sql for a "
          f"repeatable one, or {', '.join(CALLBACKS)} (.sql or .py) for callbacks")


@dataclass(frozen=True)
class Migration:
    """One migration: a versioned one (`version` 1..N), a repeatable one (`kind`
    "repeatable", version 0) or a callback (`kind` "callback", `name` its event).

    `sql` is its text: SQL, or with `language="python"` the source that defines
    `def migrate(tx)` (`def callback(tx)` for a callback; optionally `def down(tx)`).
    `down_sql` is the text of its `NNNN_name.down.sql`, if any.
    """

    version: int
    name: str
    sql: str
    transactional: bool = True
    kind: str = "versioned"
    language: str = "sql"
    down_sql: str | None = None

    @property
    def checksum(self) -> str:
        return _checksum(self.sql)

    @property
    def label(self) -> str:
        if self.kind == "repeatable":
            return f"R__{self.name}"
        if self.kind == "callback":
            return self.name
        return f"{self.version:04d}_{self.name}"

    @property
    def filename(self) -> str:
        return f"{self.label}.{'py' if self.language == 'python' else 'sql'}"

    @property
    def has_down(self) -> bool:
        return self.down_sql is not None or (self.language == "python" and "down" in _python_functions(self.sql))

    def body(self) -> Body:
        entry = "callback" if self.kind == "callback" else "migrate"
        return Body(self.filename, self.sql, self.language, entry, self.transactional)

    def down_body(self) -> Body | None:
        if self.down_sql is not None:
            return Body(f"{self.label}.down.sql", self.down_sql, "sql", "migrate",
                        not _NO_TRANSACTION.match(self.down_sql))
        if self.has_down:
            return Body(self.filename, self.sql, "python", "down")
        return None


def _checksum(text: str) -> str:
    return hashlib.sha256(text.replace("\r\n", "\n").strip().encode()).hexdigest()


def _python_functions(source: str) -> set[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


@dataclass(frozen=True)
class MigrationPlan:
    """Where the database is, where it is going, and what would run.

    `pending` are the versioned migrations to apply (`direction` "up"), or to undo, newest
    first ("down"); `repeatables` the repeatable ones whose text changed; `drift` the
    differences between the live schema and the fingerprint recorded after the last
    migration; `lint` what the lint found in what would run.
    """

    current: int
    target: int
    pending: list[Migration] = field(default_factory=list)
    applied: list[dict[str, Any]] = field(default_factory=list)
    direction: str = "up"
    repeatables: list[Migration] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    lint: list[LintWarning] = field(default_factory=list)
    not_linted: list[str] = field(default_factory=list)
    lock_note: str = ""

    @property
    def steps(self) -> int:
        return len(self.pending) + len(self.repeatables)

    def text(self) -> str:
        """The plan for a terminal: current, target, each pending step by name, drift, lint."""
        head = f"current version {self.current}, target {self.target}"
        lines: list[str] = []
        if not self.steps:
            lines.append(f"{head}: nothing to apply.")
        elif self.direction == "down":
            lines.append(f"{head}; {len(self.pending)} to undo, newest first:")
            lines += [f"  {m.version:>4}  {m.name}   (down: {m.down_body().where})"  # type: ignore[union-attr]
                      for m in self.pending]
        else:
            lines.append(f"{head}; {self.steps} pending:")
            lines += [f"  {m.version:>4}  {m.name}{_marks(m)}" for m in self.pending]
            lines += [f"     R  {m.name}{_marks(m)}   (repeatable: new or changed)" for m in self.repeatables]
        if self.drift:
            lines.append(f"drift: the schema changed outside the migrations ({len(self.drift)} "
                         f"difference{'s' if len(self.drift) > 1 else ''} "
                         "from the fingerprint recorded after the last migration); migrate refuses it "
                         "unless --allow-drift:")
            lines += [f"  {d}" for d in self.drift]
        if self.lint:
            lines.append(f"lint: {len(self.lint)} warning{'s' if len(self.lint) > 1 else ''} "
                         "(--strict refuses):")
            lines += [f"  {w}" for w in self.lint]
        if self.not_linted:
            lines.append(f"not linted (Python): {', '.join(self.not_linted)}")
        if self.steps and self.lock_note:
            lines.append(self.lock_note)
        return "\n".join(lines)

    def markdown(self, title: str = "Migration plan") -> str:
        arrow = "↓" if self.direction == "down" else "→"
        lines = [f"# {title}", "", f"current version **{self.current}** {arrow} target **{self.target}**", ""]
        if not self.steps:
            lines.append("Nothing to apply: the database is at the target.")
        else:
            lines += ["| version | name | step | atomic | checksum |", "| --- | --- | --- | --- | --- |"]
            for m in self.pending:
                body = m.down_body() if self.direction == "down" else m.body()
                step = f"down ({body.where})" if self.direction == "down" and body else "up"
                atomic = "yes" if body is None or body.transactional else "NO (runs alone)"
                lines.append(f"| {m.version} | {m.name} | {step} | {atomic} | `{m.checksum[:12]}` |")
            lines += [f"| R | {m.name} | repeatable | yes | `{m.checksum[:12]}` |" for m in self.repeatables]
        if self.drift:
            lines += ["", "## Drift", "", "The schema changed outside the migrations:", "", "```",
                      *self.drift, "```"]
        if self.lint:
            lines += ["", "## Lint", "", *[f"- {w}" for w in self.lint]]
        if self.steps and self.lock_note:
            lines += ["", self.lock_note]
        return "\n".join(lines)


def _marks(m: Migration) -> str:
    marks = "   (Python)" if m.language == "python" else ""
    if not m.transactional:
        marks += "   (no-transaction: not atomic)"
    return marks


# --- loading --------------------------------------------------------------------------


def load_migrations(directory: str | Path) -> list[Migration]:
    """Read a migrations folder (see the module's docstring): versioned migrations ordered
    by NNNN, with their down files, then repeatables and callbacks. Gaps, duplicates,
    unknown names and Python files without their function are errors."""
    folder = Path(directory)
    if not folder.is_dir():
        raise MigrationError(f"migrations directory {str(folder)!r} does not exist")
    found: list[Migration] = []
    downs: dict[int, tuple[str, str]] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".sql", ".py")):
        if path.name == "__init__.py":
            continue
        text = path.read_text(encoding="utf-8")
        language = "python" if path.suffix == ".py" else "sql"
        transactional = language == "python" or not _NO_TRANSACTION.match(text)
        versioned, repeatable = _VERSIONED.fullmatch(path.name), _REPEATABLE.fullmatch(path.name)
        if versioned and versioned.group(3):
            if language == "python":
                raise MigrationError(f"{path.name}: a Python migration's down step is `def down(tx)` in its own file")
            downs[int(versioned.group(1))] = (path.name, text)
            continue
        if versioned:
            kind, version, name = "versioned", int(versioned.group(1)), versioned.group(2)
        elif repeatable:
            kind, version, name = "repeatable", 0, repeatable.group(1)
        elif path.stem in CALLBACKS:
            kind, version, name = "callback", 0, path.stem
        else:
            raise MigrationError(f"{path.name}: {NAMING}, e.g. 0001_create_tables.sql")
        if language == "python":
            entry = "callback" if kind == "callback" else "migrate"
            if entry not in _python_functions(text):
                raise MigrationError(f"{path.name}: a Python {kind} migration defines `def {entry}(tx)` at top level")
        found.append(Migration(version, name, text, transactional, kind, language))
    versioned_ones = check_sequence([m for m in found if m.kind == "versioned"], where=str(folder))
    by_version = {m.version: m for m in versioned_ones}
    for version, (name, text) in downs.items():
        owner = by_version.get(version)
        if owner is None or f"{owner.label}.down.sql" != name:
            raise MigrationError(f"{name}: no migration {name.removesuffix('.down.sql')}.sql or .py to undo")
        if owner.language == "python":
            raise MigrationError(f"{name}: {owner.filename} is Python; give its down step as `def down(tx)` in it")
        by_version[version] = Migration(owner.version, owner.name, owner.sql, owner.transactional, "versioned",
                                        owner.language, text)
    names = [m.label for m in found if m.kind != "versioned"]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MigrationError(f"{folder}: {', '.join(twice)} given both as .sql and .py; keep one")
    return [*[by_version[v] for v in sorted(by_version)], *[m for m in found if m.kind != "versioned"]]


def check_sequence(migrations: list[Migration], where: str = "migrations") -> list[Migration]:
    """Versioned migrations sorted by version, which must run 1, 2, 3, ... without gaps or repeats."""
    ordered = sorted(migrations, key=lambda m: m.version)
    seen: dict[int, Migration] = {}
    for m in ordered:
        if m.version in seen:
            raise MigrationError(f"{where}: version {m.version} appears twice ({seen[m.version].label}, {m.label})")
        seen[m.version] = m
    missing = sorted(set(range(1, len(ordered) + 1)) - set(seen))
    if missing:
        raise MigrationError(f"{where}: versions must run 1..N without gaps; missing {missing}")
    return ordered


def _split(migrations: list[Migration]) -> tuple[list[Migration], list[Migration], dict[str, Migration]]:
    versioned = check_sequence([m for m in migrations if m.kind == "versioned"])
    repeatables = sorted((m for m in migrations if m.kind == "repeatable"), key=lambda m: m.name)
    callbacks = {m.name: m for m in migrations if m.kind == "callback"}
    unknown = sorted(set(callbacks) - set(CALLBACKS))
    if unknown:
        raise MigrationError(f"callbacks {unknown} are unknown; callbacks are {', '.join(CALLBACKS)}")
    return versioned, repeatables, callbacks


# --- reading the database -------------------------------------------------------------


def _exists(node: DatabaseNode) -> bool:
    # A SQLite file not created yet has no schema: asked first, so no read fails a task
    # run (a Failed run and a traceback in the first migration's output). Such an engine's
    # node has the `exists` member (SQLite's).
    return not (node.dialect.created_on_first_write and not node.exists())  # type: ignore[attr-defined]


def _history(node: DatabaseNode) -> list[dict[str, Any]]:
    """Every row of the version table of a database that exists, in the order applied;
    old layouts filled in."""
    try:
        exists = node.query_value(node.dialect.table_exists_sql, (VERSION_TABLE,))
    except DatabaseNotFoundError:
        return []
    if not exists:
        return []
    rows = node.query(f"SELECT * FROM {VERSION_TABLE}")
    for row in rows:
        row.setdefault("kind", "versioned")
        row.setdefault("fingerprint", None)
        row.setdefault("applied_rank", row["version"])
    return sorted(rows, key=lambda row: row["applied_rank"])


def live_schema(node: DatabaseNode) -> dict[str, str]:
    """The node's schema now, as {object: definition} read from the catalog (tables,
    columns and their types, indexes, triggers, views); chia-prefect's tables left out."""
    if not _exists(node):
        return {}
    return fingerprint_rows(node.query(node.dialect.fingerprint_sql))


def fingerprint_of(schema: dict[str, str]) -> str:
    """A short digest of a schema, as the plan shows it."""
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:12]


# --- the plan -------------------------------------------------------------------------


def plan(
    node: DatabaseNode,
    migrations: list[Migration],
    *,
    target: int | None = None,
    lint: bool = True,
    lock_timeout_s: float = 5.0,
    lock_retries: int = 4,
) -> MigrationPlan:
    """Compare the database with `migrations`; refuse what cannot be applied; find drift
    and lint what would run. Writes nothing."""
    versioned, repeatables, _ = _split(list(migrations))
    there = _exists(node)  # asked once: each member call is a task run
    history = _history(node) if there else []
    live = fingerprint_rows(node.query(node.dialect.fingerprint_sql)) if there else {}
    the_plan = _plan(history, versioned, repeatables, target)
    recorded = next((row["fingerprint"] for row in reversed(history) if row.get("fingerprint")), None)
    warnings: list[LintWarning] = []
    skipped: list[str] = []
    if lint and the_plan.steps:
        warnings, skipped = _lint(node, the_plan, live, there)
    note = ""
    if node.dialect.lock_timeout_sql:
        note = (f"Postgres: each step runs with lock_timeout {lock_timeout_s:g} s and is retried up to "
                f"{lock_retries} times with backoff when a lock does not come in time.")
    return replace(the_plan, applied=history, drift=schema_diff(json.loads(recorded), live) if recorded else [],
                   lint=warnings, not_linted=skipped, lock_note=note)


def _plan(history: list[dict[str, Any]], migrations: list[Migration], repeatables: list[Migration],
          target: int | None) -> MigrationPlan:
    known = {m.version: m for m in migrations}
    applied = [row for row in history if row["kind"] == "versioned"]
    head = len(migrations)
    ahead = [row["version"] for row in applied if row["version"] not in known]
    if ahead:
        raise SchemaAheadError(
            f"the database has versions {ahead} that the code does not know (code head is {head}); "
            "deploy the newer code instead of migrating with this one."
        )
    for row in applied:
        if known[row["version"]].checksum != row["checksum"]:
            raise ChecksumMismatchError(
                f"migration {known[row['version']].label} was edited after it was applied "
                f"(checksum {row['checksum'][:12]} in the database, {known[row['version']].checksum[:12]} now); "
                "restore the applied text and put the change in a new migration."
            )
    current = max((row["version"] for row in applied), default=0)
    skipped = sorted(set(range(1, current)) - {row["version"] for row in applied})
    if skipped:
        raise MigrationError(f"migrations {skipped} are unapplied but older than applied version {current}.")
    target = head if target is None else target
    if not 0 <= target <= head:
        raise MigrationError(f"target {target} is outside 0..{head}.")
    if target < current:
        undo = [known[v] for v in range(current, target, -1)]
        missing = [m for m in undo if not m.has_down]
        if missing:
            raise MigrationError(
                f"the database is at {current}; going down to {target} undoes {', '.join(m.label for m in undo)}, "
                f"but {', '.join(m.label for m in missing)} {'has' if len(missing) == 1 else 'have'} no down "
                f"migration. Write {', '.join(f'{m.label}.down.sql' for m in missing)}, or choose a target of "
                f"{max(m.version for m in missing)} or more."
            )
        return MigrationPlan(current, target, undo, direction="down")
    latest: dict[str, str] = {}
    for row in history:
        if row["kind"] == "repeatable":
            latest[row["name"]] = row["checksum"]
    changed = [m for m in repeatables if latest.get(m.name) != m.checksum]
    return MigrationPlan(current, target, [m for m in migrations if current < m.version <= target],
                         repeatables=changed)


def _lint(node: DatabaseNode, the_plan: MigrationPlan, live: dict[str, str],
          there: bool) -> tuple[list[LintWarning], list[str]]:
    items: list[tuple[str, str]] = []
    skipped: list[str] = []
    bodies = [(m.label, m.down_body() if the_plan.direction == "down" else m.body()) for m in the_plan.pending]
    bodies += [(m.label, m.body()) for m in the_plan.repeatables]
    for label, body in bodies:
        if body is None:
            continue
        if body.language == "python":
            skipped.append(body.where)
        else:
            items.append((label if body.where.startswith(label + ".sql") else body.where, body.text))
    if not items:
        return [], skipped

    def read(sql: str) -> list[dict[str, Any]]:
        return node.query(sql) if there else []

    return node.dialect.lint(items, read, live), skipped


# --- the flow -------------------------------------------------------------------------


def _steps(node: DatabaseNode, the_plan: MigrationPlan, callbacks: dict[str, Migration],
           lock: dict[str, Any]) -> list[Step]:
    steps: list[Step] = []
    if the_plan.direction == "down":
        for m in the_plan.pending:
            body = m.down_body()
            assert body is not None  # the plan refused a missing one
            steps.append(Step("down", m.version, m.name, m.label, _checksum(body.text), body, **lock))
    else:
        steps += [Step("up", m.version, m.name, m.label, m.checksum, m.body(), **lock) for m in the_plan.pending]
        steps += [Step("repeatable", None, m.name, m.label, m.checksum, m.body(), **lock)
                  for m in the_plan.repeatables]

    def bodies(*names: str) -> tuple[Body, ...]:
        return tuple(callbacks[name].body() for name in names if name in callbacks)

    out = []
    for index, step in enumerate(steps):
        if not step.body.transactional:
            out.append(step)  # runs alone: callbacks need a transaction
            continue
        first = ("before_migrate",) if index == 0 else ()
        last = ("after_migrate",) if index == len(steps) - 1 else ()
        out.append(replace(step, before=bodies(*first, "before_each_migrate"),
                           after=bodies("after_each_migrate", *last)))
    return out


@flow(name="chia-migrate", task_runner=ray_task_runner())
def migrate(
    node: DatabaseNode,
    migrations: list[Migration],
    *,
    target: int | None = None,
    dry_run: bool = False,
    baseline_sql: str | None = None,
    allow_drift: bool = False,
    strict: bool = False,
    lock_timeout_s: float = 5.0,
    lock_retries: int = 4,
    lock_wait_s: float = 600.0,
) -> dict[str, Any]:
    """Apply pending migrations (or undo them down to `target`), then changed repeatables;
    each step with its version row and schema fingerprint in one transaction.

    Runs on `RayTaskRunner` (the Ray already running in this process, RAY_ADDRESS, or the
    process's local Ray, started by the first flow run and kept until exit), so the node's members run where its placement says, also when
    `migrate` is called inside another flow. `migrate.with_options(task_runner=...)` changes it.

    Args:
        node: The database node.
        migrations: From `load_migrations`, or built in code.
        target: Stop at this version (default: the newest); below the current version,
            undo down to it with the down migrations.
        dry_run: Plan, publish the plan as an artifact, write nothing.
        baseline_sql: For a fresh database only: create the schema at head with this
            script and record every migration as applied, instead of replaying history.
        allow_drift: Migrate although the schema changed outside the migrations (the new
            fingerprint then includes the change).
        strict: Refuse to migrate when the lint warns.
        lock_timeout_s: Postgres: how long a statement of a migration waits for a lock
            before the migration rolls back and is tried again.
        lock_retries: Postgres: how many times a migration is tried again after that.
        lock_wait_s: How long to wait for another migrator of the database to finish.

    Returns:
        `{"from", "to", "target", "direction", "pending", "applied", "applied_elsewhere",
        "reverted", "repeatables", "drift", "lint", "retried", "dry_run"}`: `pending` names
        what the plan found (with `dry_run`, what would run); `retried` how many times a
        step was tried again after its lock_timeout, by label.
    """
    logger = get_run_logger()
    versioned, _, callbacks = _split(list(migrations))
    the_plan = plan(node, migrations, target=target, lock_timeout_s=lock_timeout_s, lock_retries=lock_retries)
    create_markdown_artifact(the_plan.markdown(), key="migration-plan", description="Pending migrations")
    outcome: dict[str, Any] = {
        "from": the_plan.current, "to": the_plan.current, "target": the_plan.target,
        "direction": the_plan.direction, "pending": [m.label for m in the_plan.pending],
        "applied": [], "applied_elsewhere": [], "reverted": [],
        "repeatables": [m.label for m in the_plan.repeatables],
        "drift": the_plan.drift, "lint": [str(w) for w in the_plan.lint], "retried": {}, "dry_run": dry_run,
    }
    if the_plan.drift and not dry_run and not allow_drift and not the_plan.steps:
        raise drift_error(node.label, the_plan.drift)  # else each step refuses it, under the lock
    if the_plan.lint and strict and not dry_run:
        raise MigrationLintError(
            f"{node.label}: strict: the lint warned about what would run, so nothing was applied: "
            f"{'; '.join(str(w) for w in the_plan.lint)}.", [str(w) for w in the_plan.lint],
        )
    if dry_run or not (the_plan.steps or baseline_sql is not None and the_plan.current == 0 and versioned):
        return outcome
    lock: dict[str, Any] = {"lock_timeout_ms": int(lock_timeout_s * 1000), "lock_retries": lock_retries,
                            "lock_wait_s": lock_wait_s, "check_drift": not allow_drift}
    if baseline_sql is not None and the_plan.current == 0 and the_plan.direction == "up":
        stamps = tuple((m.version, m.name, m.checksum) for m in versioned if m.version <= the_plan.target)
        step = Step("baseline", None, "baseline", "baseline", _checksum(baseline_sql),
                    Body("baseline_sql", baseline_sql), stamps=stamps, **lock)
        done = node.apply_migration(step)
        outcome.update(to=the_plan.target, baseline=done["status"] == "applied")
        the_plan = MigrationPlan(the_plan.current, the_plan.target, [], repeatables=the_plan.repeatables)
    for step in _steps(node, the_plan, callbacks, lock):
        done = node.apply_migration(step)
        here = done["status"] == "applied"
        if done.get("attempts", 1) > 1:
            outcome["retried"][step.label] = done["attempts"] - 1
        if step.action == "down":
            outcome["reverted" if here else "applied_elsewhere"].append(step.version)
        elif step.action == "up":
            outcome["applied" if here else "applied_elsewhere"].append(step.version)
        verb = {"down": "undone", "up": "applied", "repeatable": "re-applied"}.get(step.action, "applied")
        logger.info("migration %s %s", step.label, verb if here else f"was {verb} by a concurrent run")
    final = plan(node, migrations, target=the_plan.target, lint=False)  # verifies what is now recorded
    outcome["to"] = final.current
    create_markdown_artifact(
        f"# Migration outcome\n\nversion **{outcome['from']}** → **{final.current}**; "
        f"applied here: {outcome['applied'] or 'none'}; undone here: {outcome['reverted'] or 'none'}; "
        f"repeatables: {outcome['repeatables'] or 'none'}; "
        f"by a concurrent run: {outcome['applied_elsewhere'] or 'none'}",
        key="migration-outcome", description="What this run applied",
    )
    return outcome


__all__ = [
    "CALLBACKS", "VERSION_TABLE", "LintWarning", "Migration", "MigrationPlan", "MigrationTransaction",
    "check_sequence", "live_schema", "load_migrations", "migrate", "plan", "schema_diff",
]
