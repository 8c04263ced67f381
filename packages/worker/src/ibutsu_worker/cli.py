"""``ibutsu-tasks``: the operator's command line for the task tier.

demo            the main job end to end on the embedded default, through a real worker
db upgrade      create upstream's schema on an empty database, or check a backend-managed one
project create  create a project in Ibutsu's schema, with the rules Ibutsu's API applies
import          store reports and enqueue their import, as Ibutsu's API does
status          show an import
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import uuid
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from ibutsu_server.db.migrate import SchemaError, require_ready, upgrade
from ibutsu_server.db.models import SUMMARY_COUNTERS, ImportStatus
from ibutsu_server.settings import DEFAULT_EMBEDDED_DIR, LIMITS, ConfigError, Role, load_settings
from ibutsu_worker.demo import DEMO_PROJECT, DemoError, DemoWorker
from ibutsu_worker.process.metrics_dir import MULTIPROC_VAR
from ibutsu_worker.projects import ProjectError
from ibutsu_worker.submission import (
    CONSUMER_QUESTION_SECONDS,
    PUBLISH_PATIENCE_SECONDS,
    NotQueued,
    Outcome,
    SubmissionError,
    Submitter,
)

SAMPLE = "sample-junit.xml"
DEFAULT_TIMEOUT = 600.0
# While --wait waits: a line of progress at least this often...
PROGRESS_SECONDS = 5.0
# ...and, once imports are unfinished this long, whether any worker consumes their queue
# (asked again this often until one does): said well within 10 s of queuing.
CONSUMERS_FIRST_ASKED = 3.0
CONSUMERS_ASKED_AGAIN = 10.0
HELP_WIDTH = 88
WORKER_COMMAND = "celery -A ibutsu_server:worker_app worker"
MAX_UPLOAD = LIMITS["max_upload_bytes"]

ENVIRONMENT = f"""\
environment variables (the worker's; README.md, "Configuration", says what each means):
  POSTGRESQL_HOST, POSTGRESQL_PORT (default 5432), POSTGRESQL_USER,
  POSTGRESQL_PASSWORD (default empty), POSTGRESQL_DATABASE
      Ibutsu's database: every command
  CELERY_BROKER_URL, CELERY_RESULT_BACKEND (redis://, rediss:// or sentinel:// URLs),
  IBUTSU_REDIS_KEY_PREFIX (default none), IBUTSU_REDIS_SENTINEL_MASTER,
  IBUTSU_REDIS_SENTINEL_PASSWORD, IBUTSU_REDIS_TLS_CA_FILE, IBUTSU_REDIS_TLS_CERT_FILE,
  IBUTSU_REDIS_TLS_KEY_FILE
      the Redis that imports are queued on: import, demo
  IBUTSU_EMBEDDED_DIR (default {DEFAULT_EMBEDDED_DIR})
      with none of CELERY_BROKER_URL, CELERY_RESULT_BACKEND and POSTGRESQL_* set: an SQLite
      database and a filesystem broker in this folder (the embedded default)
  {MAX_UPLOAD.variable} (default {MAX_UPLOAD.default} bytes, {MAX_UPLOAD.default // 2**20} MiB)
      larger reports are refused: import, demo
  CELERY_WORKER_CONCURRENCY, CELERY_TASK_TIME_LIMIT, CELERY_VISIBILITY_TIMEOUT,
  CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT, CELERY_RESULT_EXPIRES, CELERY_TIMEZONE,
  CELERY_WORKER_LOGLEVEL, IBUTSU_IMPORT_MAX_RESULTS, IBUTSU_IMPORT_MAX_ARCHIVE_MEMBERS,
  IBUTSU_IMPORT_MAX_ARCHIVE_BYTES, IBUTSU_IMPORT_MAX_ARTIFACT_BYTES,
  IBUTSU_IMPORT_MAX_FOOTPRINT_RATIO, IBUTSU_IMPORT_MAX_DELIVERIES, IBUTSU_METRICS_PORT,
  IBUTSU_METRICS_BASIC_AUTH, IBUTSU_LIVENESS_TIMEOUT, {MULTIPROC_VAR}
      the worker's own: checked by every command (a bad value stops it, one line per
      problem, exit status 2), used by demo's worker
"""
# The counters a summary line shows, in the order the summary defines them.
SUMMARY_FIELDS = ("tests", "passes", *SUMMARY_COUNTERS.values())


class CommandError(Exception):
    """A failure to report in one line, without a traceback."""


def _text(outcome: Outcome) -> str:
    head = f"{outcome.file}: {outcome.status}"
    if outcome.message:
        head += f": {outcome.message}"
    if outcome.summary is None:
        return head
    counts = "  ".join(f"{key} {outcome.summary.get(key, 0)}" for key in SUMMARY_FIELDS)
    return f"{head} (run {outcome.run_id})\n    {counts}"


def _print_outcomes(outcomes: Sequence[Outcome], as_json: bool) -> None:
    for outcome in outcomes:
        print(json.dumps(outcome.as_json()) if as_json else _text(outcome), flush=True)


class WaitReport:
    """What waiting for imports shows on standard error: a line as each import finishes, a
    line of progress at least every PROGRESS_SECONDS, and, with ``ask_consumers``, whether
    any worker consumes the imports' queue once they have been unfinished for
    CONSUMERS_FIRST_ASKED seconds (asked again every CONSUMERS_ASKED_AGAIN until one does)."""

    def __init__(self, submitter: Submitter, *, ask_consumers: bool) -> None:
        self.submitter = submitter
        self.ask_consumers = ask_consumers
        self.finished: set[str] = set()
        self.shown = 0.0
        self.asked: float | None = None
        self.consumed = False
        self.said_none = False

    def __call__(self, outcomes: Sequence[Outcome], elapsed: float) -> None:
        for outcome in outcomes:
            if outcome.finished and outcome.import_id not in self.finished:
                self.finished.add(outcome.import_id)
                _say(f"[{len(self.finished)}/{len(outcomes)}] {outcome.file}: {outcome.status}")
        if len(self.finished) == len(outcomes):
            return
        if elapsed - self.shown >= PROGRESS_SECONDS:
            self.shown = elapsed
            counts = Counter(outcome.status for outcome in outcomes)
            states = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
            _say(f"waiting {elapsed:.0f} s: {states}")
        if self.ask_consumers and not self.consumed and self._ask_due(elapsed):
            self._ask_consumers(elapsed)

    def _ask_due(self, elapsed: float) -> bool:
        if self.asked is None:
            return elapsed >= CONSUMERS_FIRST_ASKED
        return elapsed - self.asked >= CONSUMERS_ASKED_AGAIN

    def _ask_consumers(self, elapsed: float) -> None:
        self.asked = elapsed
        nodes = self.submitter.consumers()
        if nodes is None:  # the broker cannot be asked (the embedded default)
            self.consumed = True
        elif nodes:
            self.consumed = True
            if self.said_none:
                _say(f"worker {', '.join(nodes)} consumes the queue now")
        elif not self.said_none:
            self.said_none = True
            queue = self.submitter.celery.conf.task_default_queue
            _say(
                f"no worker consumes queue {queue!r} on {self.submitter.broker} (none "
                f"answered within {CONSUMER_QUESTION_SECONDS:.0f} s): the imports wait until "
                f"one starts (`{WORKER_COMMAND}` with this environment)"
            )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _metadata(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise CommandError(f"--metadata is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CommandError("--metadata must be a JSON object")
    return value


def _demo(args: argparse.Namespace, submitter: Submitter) -> int:
    settings = submitter.settings
    upgrade(submitter.db.engine)
    if args.reports:
        reports = [Path(report) for report in args.reports]
    else:
        sample = resources.files("ibutsu_worker.samples") / SAMPLE
        target = (settings.embedded_dir or Path.cwd()) / SAMPLE
        target.write_bytes(sample.read_bytes())
        reports = [target]
    where = "embedded (SQLite + filesystem broker)" if settings.embedded else "configured services"
    print(f"demo: {len(reports)} report(s), {where}, starting a worker", file=sys.stderr)
    project_id = submitter.ensure_project(args.project)
    with DemoWorker(settings) as worker:
        import_ids = [submitter.submit(path, project_id=project_id) for path in reports]
        worker.check_alive()
        outcomes = submitter.wait(
            import_ids, args.timeout, WaitReport(submitter, ask_consumers=False)
        )
    _print_outcomes(outcomes, args.json)
    done = sum(outcome.status == ImportStatus.DONE for outcome in outcomes)
    print(
        f"demo: {done} done, {len(outcomes) - done} failed; worker log: {worker.log_path}",
        file=sys.stderr,
    )
    return 0


def _import(args: argparse.Namespace, submitter: Submitter) -> int:
    require_ready(submitter.db.engine)
    project_id = submitter.project_id(args.project) if args.project else None
    metadata = _metadata(args.metadata)
    import_ids = []
    for path in args.files:
        earlier = None if args.again else submitter.previous(Path(path), project_id)
        if earlier is not None:
            import_id, said = earlier.import_id, f"already imported as {earlier.import_id}"
            said += f" ({earlier.status})"
        else:
            try:
                import_id = submitter.submit(
                    Path(path), project_id=project_id, metadata=metadata, source=args.source
                )
            except NotQueued as exc:
                # The import exists, marked error: say which, where queued ones are said.
                print(
                    json.dumps(
                        {"file": path, "import_id": exc.import_id, "new": True, "status": "error"}
                    )
                    if args.json
                    else f"{path}: import {exc.import_id} marked error: not queued",
                    flush=True,
                )
                raise
            said = f"queued as import {import_id}"
        import_ids.append(import_id)
        # Printed as soon as it is queued: a failure later never hides what was queued.
        print(
            json.dumps({"file": path, "import_id": import_id, "new": earlier is None})
            if args.json
            else f"{path}: {said}",
            flush=True,
        )
    if not args.wait:
        return 0
    outcomes = submitter.wait(import_ids, args.timeout, WaitReport(submitter, ask_consumers=True))
    _print_outcomes(outcomes, args.json)
    return 0 if all(o.status == ImportStatus.DONE for o in outcomes) else 1


def _status(args: argparse.Namespace, submitter: Submitter) -> int:
    require_ready(submitter.db.engine)
    try:
        uuid.UUID(args.import_id)
    except ValueError:
        raise CommandError(f"{args.import_id!r} is not an import id") from None
    _print_outcomes([submitter.outcome(args.import_id)], args.json)
    return 0


def _project_create(args: argparse.Namespace, submitter: Submitter) -> int:
    require_ready(submitter.db.engine)
    created = submitter.create_project(args.name, args.title, args.owner)
    # The id alone on standard output, for `id=$(ibutsu-tasks project create ...)`.
    print(created.id, flush=True)
    said = "created" if created.new else "exists"
    print(
        f"ibutsu-tasks: project {created.name!r} ({created.title!r}) {said}: {created.id}",
        file=sys.stderr,
    )
    return 0


def _db(args: argparse.Namespace, submitter: Submitter) -> int:
    state = upgrade(submitter.db.engine)
    print(f"{submitter.where}: {state.describe()}; every table the tasks use is there")
    return 0


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and the environment list keep their lines; options wrap."""


def _command(
    commands: Any, name: str, summary: str, description: str, uses: str
) -> argparse.ArgumentParser:
    reads = (
        f"Reads {uses}; checks every other variable of the worker (`ibutsu-tasks --help` "
        "lists them)."
    )
    paragraphs = (textwrap.fill(text, HELP_WIDTH) for text in (description, reads))
    return commands.add_parser(  # type: ignore[no-any-return]
        name, help=summary, description="\n\n".join(paragraphs), formatter_class=_Formatter
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ibutsu-tasks``: every option says what it does, its default
    and its unit; ``--help`` lists the environment variables the commands read."""
    parser = argparse.ArgumentParser(
        prog="ibutsu-tasks",
        description="The operator's command line for the Ibutsu task tier.",
        epilog=ENVIRONMENT,
        formatter_class=_Formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _command(
        commands,
        "demo",
        "import reports end to end through a real worker",
        "Create the schema if needed, start a worker of its own, import the reports through "
        "it and stop it; prints each report's outcome and summary.",
        "POSTGRESQL_*, CELERY_BROKER_URL, CELERY_RESULT_BACKEND and IBUTSU_REDIS_* (none set: "
        "IBUTSU_EMBEDDED_DIR, the embedded default), and its worker all of the worker's",
    )
    demo.add_argument(
        "reports", nargs="*", help="JUnit XML reports or archives (default: a bundled sample)"
    )
    demo.add_argument(
        "--json", action="store_true", help="one JSON object per report (default: text lines)"
    )
    demo.add_argument(
        "--project",
        default=DEMO_PROJECT,
        help=f"the project the reports go to, created if missing (default: {DEMO_PROJECT})",
    )
    demo.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up waiting after this many seconds (default: {DEFAULT_TIMEOUT:.0f})",
    )
    demo.set_defaults(handler=_demo)

    db = _command(
        commands,
        "db",
        "schema management",
        "Schema management.",
        "POSTGRESQL_* (or IBUTSU_EMBEDDED_DIR)",
    )
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    _command(
        db_commands,
        "upgrade",
        "create the schema on an empty database, or check a managed one",
        "Create upstream's schema on an empty database; on a database Ibutsu's backend "
        "manages, change nothing and check that every table the tasks use is there.",
        "POSTGRESQL_* (or IBUTSU_EMBEDDED_DIR)",
    ).set_defaults(handler=_db)

    project = _command(
        commands,
        "project",
        "projects in Ibutsu's schema",
        "Projects in Ibutsu's schema.",
        "POSTGRESQL_* (or IBUTSU_EMBEDDED_DIR)",
    )
    project_commands = project.add_subparsers(
        dest="project_command", required=True, metavar="COMMAND"
    )
    create = _command(
        project_commands,
        "create",
        "create a project (or find it, if it exists as asked) and print its id",
        "Create a project as Ibutsu's API does and print its id; a project of that name "
        "with that title (and owner) is found instead. A name must not be empty nor a UUID "
        "(Ibutsu looks those up as ids), and names one project only.",
        "POSTGRESQL_* (or IBUTSU_EMBEDDED_DIR)",
    )
    create.add_argument("name", help="the project's name, as uploads name it")
    create.add_argument("--title", help="the title Ibutsu shows (default: the name)")
    create.add_argument(
        "--owner",
        metavar="EMAIL",
        help="an existing user who becomes the project's owner and one of its users, as the "
        "API makes the user who creates it (default: none; Ibutsu then shows the project to "
        "superadmins only)",
    )
    create.set_defaults(handler=_project_create)

    imp = _command(
        commands,
        "import",
        "store reports and enqueue their import",
        "Store each report as Ibutsu's API stores an upload and queue its import; prints "
        "each import's id as soon as it is queued. A broker that does not answer is tried "
        f"again for up to {PUBLISH_PATIENCE_SECONDS:.0f} s; then the import is marked error "
        "and named.",
        "POSTGRESQL_*, CELERY_BROKER_URL, CELERY_RESULT_BACKEND, IBUTSU_REDIS_* and "
        "IBUTSU_IMPORT_MAX_UPLOAD_BYTES (none set: IBUTSU_EMBEDDED_DIR)",
    )
    imp.add_argument("files", nargs="+", help="JUnit XML reports or pytest-ibutsu archives")
    imp.add_argument(
        "--project",
        help="an existing project's name or id (default: none, as an upload without one)",
    )
    imp.add_argument(
        "--metadata",
        help="a JSON object added to the run and its results (default: none)",
    )
    imp.add_argument("--source", help="where the results come from (default: none)")
    imp.add_argument(
        "--wait",
        action="store_true",
        help="wait for the imports to finish, showing progress on standard error and saying "
        "when no worker consumes the queue (default: return once queued)",
    )
    imp.add_argument(
        "--again",
        action="store_true",
        help="import a file even when the same content was imported before for the project "
        "(default: say which import it was)",
    )
    imp.add_argument(
        "--json", action="store_true", help="one JSON object per line (default: text lines)"
    )
    imp.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"with --wait, give up after this many seconds (default: {DEFAULT_TIMEOUT:.0f})",
    )
    imp.set_defaults(handler=_import)

    status = _command(commands, "status", "show an import", "Show an import.", "POSTGRESQL_*")
    status.add_argument("import_id", help="the import's id, as import printed it")
    status.add_argument("--json", action="store_true", help="one JSON object (default: text lines)")
    status.set_defaults(handler=_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors are printed in one line and exit non-zero."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(Role.WORKER)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    submitter = Submitter(settings, notify=lambda message: _say(f"ibutsu-tasks: {message}"))
    try:
        return int(args.handler(args, submitter))
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        print(f"ibutsu-tasks: cannot use {submitter.where}: {reason}", file=sys.stderr)
        return 1
    except (CommandError, SubmissionError, SchemaError, DemoError, ProjectError) as exc:
        print(f"ibutsu-tasks: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        submitter.close()


if __name__ == "__main__":
    raise SystemExit(main())
