"""``ibutsu-tasks``: the operator's command line for the task tier.

demo       the main job end to end on the embedded default, through a real worker
db upgrade create or upgrade the schema
import     store reports and enqueue their import
status     show an import
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from celery import Celery
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ibutsu_server.db.engine import database
from ibutsu_server.db.migrate import is_current, upgrade
from ibutsu_server.db.models import Import, ImportFile, ImportStatus, Run
from ibutsu_server.settings import EMBEDDED_DIR_VAR, ConfigError, Role, Settings, load_settings
from ibutsu_worker.factory import create_worker_app
from ibutsu_worker.importing.importer import mark_failed

IMPORT_TASK = "ibutsu_server.tasks.importers.import_results"
SAMPLE = "sample-junit.xml"
POLL_SECONDS = 0.2
DEFAULT_TIMEOUT = 600.0
SUMMARY_FIELDS = ("tests", "passes", "failures", "errors", "skips", "xfailures", "xpasses")


class CommandError(Exception):
    """A failure to report in one line, without a traceback."""


@dataclass
class Outcome:
    """What one import came to, as the demo and ``import --wait`` report it."""

    file: str
    import_id: str
    status: str
    message: str | None
    run_id: str | None
    summary: dict[str, int] | None

    def as_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "import_id": self.import_id,
            "status": self.status,
            "message": self.message,
            "run_id": self.run_id,
            "summary": self.summary,
        }

    def as_text(self) -> str:
        head = f"{self.file}: {self.status}"
        if self.message:
            head += f": {self.message}"
        if self.summary is None:
            return head
        counts = "  ".join(f"{key} {self.summary.get(key, 0)}" for key in SUMMARY_FIELDS)
        return f"{head} (run {self.run_id})\n    {counts}"


class Operator:
    """The worker's app and database, opened once for one command."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery: Celery = create_worker_app(settings)
        self.db = database(self.celery.flask_app)

    def upgrade(self) -> None:
        upgrade(self.db.engine)

    def require_schema(self) -> None:
        """CommandError unless the database is reachable and at the newest schema."""
        if not is_current(self.db.engine):
            raise CommandError(
                f"the database schema in {self.where} is missing or out of date: "
                "run `ibutsu-tasks db upgrade`"
            )

    @property
    def where(self) -> str:
        assert self.settings.database is not None  # the worker role always has one
        return self.settings.database.display

    def submit(self, path: Path, project: str | None) -> str:
        """Store ``path`` as a pending import and enqueue its task once that is committed."""
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}") from None
        limit = self.settings.import_limits.max_upload_bytes
        if len(content) > limit:
            raise CommandError(
                f"{path} is {len(content)} bytes, over the upload limit of {limit} bytes "
                "(IBUTSU_IMPORT_MAX_UPLOAD_BYTES)"
            )
        import_id = uuid.uuid4()
        session = self.db.session()
        try:
            session.add(Import(id=import_id, filename=path.name, data={"project": project}))
            session.add(ImportFile(import_id=import_id, content=content))
            session.commit()
            # Sent only once the rows are committed, so the worker always finds them.
            try:
                self.celery.send_task(IMPORT_TASK, args=[str(import_id)])
            except Exception as exc:
                # Never leave an import pending that no worker will ever hear of.
                mark_failed(session, import_id, "could not be queued: the broker is unreachable")
                session.commit()
                raise CommandError(
                    f"cannot queue {path.name}: the broker is unreachable ({type(exc).__name__})"
                ) from None
        finally:
            self.db.session.remove()
        return str(import_id)

    def outcome(self, import_id: str) -> Outcome:
        """The import's current state, with its run's summary once it is done."""
        session: Session = self.db.session()
        try:
            record = session.get(Import, uuid.UUID(import_id))
            if record is None:
                raise CommandError(f"no import {import_id}")
            summary = None
            if record.run_id is not None:
                run = session.get(Run, record.run_id)
                if run is not None and run.summary:
                    summary = {key: int(run.summary.get(key, 0)) for key in SUMMARY_FIELDS}
            return Outcome(
                file=record.filename,
                import_id=import_id,
                status=record.status,
                message=record.message,
                run_id=str(record.run_id) if record.run_id else None,
                summary=summary,
            )
        finally:
            self.db.session.remove()

    def wait(
        self, import_ids: Sequence[str], timeout: float, progress: TextIO | None
    ) -> list[Outcome]:
        """Poll until every import is done or failed; CommandError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        finished: dict[str, Outcome] = {}
        while len(finished) < len(import_ids):
            for import_id in import_ids:
                if import_id not in finished:
                    outcome = self.outcome(import_id)
                    if outcome.status in (ImportStatus.DONE, ImportStatus.FAILED):
                        finished[import_id] = outcome
                        if progress is not None:
                            print(
                                f"[{len(finished)}/{len(import_ids)}] {outcome.file}: "
                                f"{outcome.status}",
                                file=progress,
                            )
            if len(finished) < len(import_ids):
                if time.monotonic() > deadline:
                    raise CommandError(
                        f"{len(import_ids) - len(finished)} import(s) still pending after "
                        f"{timeout:.0f}s: is a worker running?"
                    )
                time.sleep(POLL_SECONDS)
        return [finished[import_id] for import_id in import_ids]


def _print_outcomes(outcomes: Sequence[Outcome], as_json: bool) -> None:
    for outcome in outcomes:
        print(json.dumps(outcome.as_json()) if as_json else outcome.as_text(), flush=True)


class DemoWorker:
    """A real ``celery worker`` process for the demo, stopped gracefully on exit."""

    def __init__(self, log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DemoWorker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "ibutsu_server:worker_app",
                    "worker",
                    "--concurrency=1",
                    "--loglevel=INFO",
                    "--without-mingle",
                    "--without-gossip",
                    f"--hostname=demo-{os.getpid()}@%h",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
        return self

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            raise CommandError("the demo worker exited early:\n" + "\n".join(tail))

    def __exit__(self, *_exc: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _demo(args: argparse.Namespace, operator: Operator) -> int:
    progress = sys.stderr
    operator.upgrade()
    if args.reports:
        reports = [Path(report) for report in args.reports]
    else:
        sample = resources.files("ibutsu_worker.samples") / SAMPLE
        target = (operator.settings.embedded_dir or Path.cwd()) / SAMPLE
        target.write_bytes(sample.read_bytes())
        reports = [target]
    where = (
        "embedded (SQLite + filesystem broker)"
        if operator.settings.embedded
        else "configured services"
    )
    print(f"demo: {len(reports)} report(s), {where}, starting a worker", file=progress)
    embedded_dir = operator.settings.embedded_dir
    log_path = (embedded_dir or Path("var")) / "demo-worker.log"
    env = {EMBEDDED_DIR_VAR: str(embedded_dir)} if embedded_dir else {}
    with DemoWorker(log_path, env) as worker:
        import_ids = [operator.submit(path, args.project) for path in reports]
        worker.check_alive()
        outcomes = operator.wait(import_ids, args.timeout, progress)
    _print_outcomes(outcomes, args.json)
    done = sum(outcome.status == ImportStatus.DONE for outcome in outcomes)
    print(
        f"demo: {done} done, {len(outcomes) - done} failed; worker log: {log_path}", file=progress
    )
    return 0


def _import(args: argparse.Namespace, operator: Operator) -> int:
    import_ids = [operator.submit(Path(path), args.project) for path in args.files]
    if not args.wait:
        for path, import_id in zip(args.files, import_ids, strict=True):
            print(
                json.dumps({"file": path, "import_id": import_id})
                if args.json
                else f"{path}: queued as import {import_id}"
            )
        return 0
    outcomes = operator.wait(import_ids, args.timeout, None if args.json else sys.stderr)
    _print_outcomes(outcomes, args.json)
    return 0 if all(o.status == ImportStatus.DONE for o in outcomes) else 1


def _status(args: argparse.Namespace, operator: Operator) -> int:
    try:
        uuid.UUID(args.import_id)
    except ValueError:
        raise CommandError(f"{args.import_id!r} is not an import id") from None
    _print_outcomes([operator.outcome(args.import_id)], args.json)
    return 0


def _db(args: argparse.Namespace, operator: Operator) -> int:
    operator.upgrade()
    print(f"schema is up to date in {operator.where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ibutsu-tasks``."""
    parser = argparse.ArgumentParser(prog="ibutsu-tasks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="import reports end to end through a real worker")
    demo.add_argument("reports", nargs="*", help="JUnit XML reports (default: a bundled sample)")
    demo.add_argument("--json", action="store_true", help="one JSON object per report")
    demo.add_argument("--project", default="demo")
    demo.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    demo.set_defaults(handler=_demo, creates_schema=True)

    db = commands.add_parser("db", help="schema management")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="create or upgrade the schema").set_defaults(
        handler=_db, creates_schema=True
    )

    imp = commands.add_parser("import", help="store reports and enqueue their import")
    imp.add_argument("files", nargs="+")
    imp.add_argument("--project")
    imp.add_argument("--wait", action="store_true", help="wait for the imports to finish")
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
    operator: Operator | None = None
    try:
        operator = Operator(load_settings(Role.WORKER))
        if not getattr(args, "creates_schema", False):
            operator.require_schema()
        return int(args.handler(args, operator))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except OperationalError as exc:
        where = operator.where if operator else "the database"
        reason = str(exc.orig or exc).strip().splitlines()[0]
        print(f"ibutsu-tasks: cannot use {where}: {reason}", file=sys.stderr)
        return 1
    except CommandError as exc:
        print(f"ibutsu-tasks: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
