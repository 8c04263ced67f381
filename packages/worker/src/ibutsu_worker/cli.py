"""``ibutsu-tasks``: the operator's command line for the task tier.

demo       the main job end to end on the embedded default, through a real worker
db upgrade create upstream's schema on an empty database, or check a backend-managed one
project create  create a project in Ibutsu's schema, with the rules Ibutsu's API applies
import     store reports and enqueue their import, as Ibutsu's API does
status     show an import
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from ibutsu_server.db.migrate import SchemaError, require_ready, upgrade
from ibutsu_server.settings import ConfigError, Role, load_settings
from ibutsu_worker.demo import DEMO_PROJECT, DemoError, DemoWorker
from ibutsu_worker.projects import ProjectError
from ibutsu_worker.submission import Outcome, SubmissionError, Submitter

SAMPLE = "sample-junit.xml"
DEFAULT_TIMEOUT = 600.0
SUMMARY_FIELDS = ("tests", "passes", "failures", "errors", "skips", "xfailures", "xpasses")


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


def _progress(total: int) -> Any:
    def report(done: int, outcome: Outcome) -> None:
        print(f"[{done}/{total}] {outcome.file}: {outcome.status}", file=sys.stderr, flush=True)

    return report


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
        outcomes = submitter.wait(import_ids, args.timeout, _progress(len(import_ids)))
    _print_outcomes(outcomes, args.json)
    done = sum(outcome.status == "done" for outcome in outcomes)
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
            import_id = submitter.submit(
                Path(path), project_id=project_id, metadata=metadata, source=args.source
            )
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
    outcomes = submitter.wait(
        import_ids, args.timeout, None if args.json else _progress(len(import_ids))
    )
    _print_outcomes(outcomes, args.json)
    return 0 if all(o.status == "done" for o in outcomes) else 1


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ibutsu-tasks``."""
    parser = argparse.ArgumentParser(prog="ibutsu-tasks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="import reports end to end through a real worker")
    demo.add_argument("reports", nargs="*", help="JUnit XML reports (default: a bundled sample)")
    demo.add_argument("--json", action="store_true", help="one JSON object per report")
    demo.add_argument("--project", default=DEMO_PROJECT, help="created if missing")
    demo.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    demo.set_defaults(handler=_demo)

    db = commands.add_parser("db", help="schema management")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser(
        "upgrade", help="create the schema on an empty database, or check a managed one"
    ).set_defaults(handler=_db)

    project = commands.add_parser("project", help="projects in Ibutsu's schema")
    project_commands = project.add_subparsers(dest="project_command", required=True)
    create = project_commands.add_parser(
        "create",
        help="create a project (or find it, if it exists as asked) and print its id",
    )
    create.add_argument("name", help="the project's name, as uploads name it (not a UUID)")
    create.add_argument("--title", help="the title Ibutsu shows (default: the name)")
    create.add_argument(
        "--owner",
        metavar="EMAIL",
        help="an existing user who becomes the project's owner and one of its users",
    )
    create.set_defaults(handler=_project_create)

    imp = commands.add_parser("import", help="store reports and enqueue their import")
    imp.add_argument("files", nargs="+")
    imp.add_argument("--project", help="an existing project's name or id")
    imp.add_argument("--metadata", help="a JSON object added to the run and its results")
    imp.add_argument("--source", help="where the results come from")
    imp.add_argument("--wait", action="store_true", help="wait for the imports to finish")
    imp.add_argument(
        "--again",
        action="store_true",
        help="import files even when the same content was imported before for the project",
    )
    imp.add_argument("--json", action="store_true")
    imp.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    imp.set_defaults(handler=_import)

    status = commands.add_parser("status", help="show an import")
    status.add_argument("import_id")
    status.add_argument("--json", action="store_true")
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
    submitter = Submitter(settings)
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
