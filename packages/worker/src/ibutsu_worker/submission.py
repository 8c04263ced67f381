"""Submitting reports the way Ibutsu's API does, and following them to the end.

``submit`` stores an ``imports`` row (status ``pending``, format ``""``, ``data`` holding
``project_id``, ``metadata`` and ``source``) and its ``import_files`` row, commits, and only then
enqueues ``run_junit_import`` or ``run_archive_import`` with the import record as the API
serialises it: the command line, the demo and the benchmarks use the path a real deployment
uses. Used by ``ibutsu-tasks`` and by the tests and benchmarks. Each import also records the
SHA-256 of its content (``data.sha256``), so the same file is never imported twice by
running a command again (``previous``).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from ibutsu_server import redis_connections, task_names
from ibutsu_server.app_factory import FlaskCelery, create_flask_celery_app
from ibutsu_server.db.models import Import, ImportFile, ImportStatus, Project, Run, utcnow
from ibutsu_server.db.sessions import Database
from ibutsu_server.settings import Role, Settings, redact_url
from ibutsu_worker.importing.formats import ImportFormat
from ibutsu_worker.importing.job import mark_error
from ibutsu_worker.projects import Created, create_project

POLL_SECONDS = 0.2
# Queuing waits out a broker restart (README, "Pointing at real Redis and PostgreSQL"): the
# connection is tried again with backoff for this long before the import is given up.
PUBLISH_PATIENCE_SECONDS = 60.0
CONNECT_BACKOFF = {"interval_start": 0.5, "interval_step": 1.0, "interval_max": 5.0}
# A connection lost while publishing: tried again, with backoff, about as long.
PUBLISH_RETRY = {
    "max_retries": 12,
    "interval_start": 0.5,
    "interval_step": 1.0,
    "interval_max": 8.0,
}
# How often a broker that stays unreachable is reported again while it is waited for.
UNREACHABLE_REPORT_SECONDS = 10.0
# How long workers get to answer "which queues do you consume?" (a broadcast on the broker).
CONSUMER_QUESTION_SECONDS = 1.0


class SubmissionError(Exception):
    """A submission that cannot be made or followed; the message says why, in one line."""


class NotQueued(SubmissionError):
    """A report stored as an import that could not be queued: the import was marked
    ``error`` (no worker would ever hear of it) and is named here."""

    def __init__(self, message: str, *, file: str, import_id: str, reason: str) -> None:
        super().__init__(message)
        self.file = file
        self.import_id = import_id
        self.reason = reason


@dataclass(frozen=True)
class Outcome:
    """What one import came to."""

    file: str
    import_id: str
    status: str
    message: str | None
    run_id: str | None
    summary: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        return ImportStatus.finished(self.status)

    def as_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "import_id": self.import_id,
            "status": self.status,
            "message": self.message,
            "run_id": self.run_id,
            "summary": self.summary,
        }


def _reason(exc: BaseException) -> str:
    """The first line of what went wrong, without a password: Kombu and redis-py name the
    host and port they tried, never the credentials, and a URL is masked all the same."""
    text = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
    return redact_url(text) if "://" in text else text


def import_task_name(content_head: bytes, filename: str | None = None) -> str:
    """The task the API sends for an upload: by the file's name where the API chooses by it
    (``.xml``, ``.tar.gz``), else for content starting with ``content_head``. Our workers read
    the format from the content whatever the name; upstream's go by the name."""
    name = filename or ""
    if name.endswith(".tar.gz"):
        return task_names.RUN_ARCHIVE_IMPORT
    if name.endswith(".xml"):
        return task_names.RUN_JUNIT_IMPORT
    if ImportFormat.detect(content_head) is ImportFormat.ARCHIVE:
        return task_names.RUN_ARCHIVE_IMPORT
    return task_names.RUN_JUNIT_IMPORT


def import_record(record: Import) -> dict[str, Any]:
    """An import as the API serialises it (``to_dict``: ``data`` shown as ``metadata``);
    Kombu's JSON encodes ``created`` as a datetime."""
    return {
        "id": str(record.id),
        "filename": record.filename,
        "format": record.format,
        "status": record.status,
        "created": record.created,
        "metadata": record.data,
    }


class Submitter:
    """The database and broker of one worker configuration, for submitting imports."""

    def __init__(
        self,
        settings: Settings,
        celery: FlaskCelery | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.celery = celery or create_flask_celery_app(Role.WORKER, settings=settings)
        self.db: Database = self.celery.database
        # Where messages for the operator go while something is waited for (the CLI: stderr).
        self.notify: Callable[[str], None] = notify or (lambda _message: None)

    def close(self) -> None:
        self.db.engine.dispose()

    @property
    def where(self) -> str:
        """The database, safe to print (no password)."""
        assert self.settings.database is not None  # the worker role always has one
        return self.settings.database.display

    def project_id(self, project: str) -> uuid.UUID:
        """The id of an existing project, named by id or by name."""
        with self.db.transaction() as session:
            found = session.scalar(select(Project.id).where(Project.named(project)).limit(1))
        if found is None:
            raise SubmissionError(
                f"no project {project!r}: create it with `ibutsu-tasks project create` "
                "or in Ibutsu"
            )
        return found

    def create_project(
        self, name: str, title: str | None = None, owner_email: str | None = None
    ) -> Created:
        """Create the project ``name``, or find it if it exists as asked (``create_project``)."""
        with self.db.transaction() as session:
            return create_project(session, name, title, owner_email)

    def ensure_project(self, name: str) -> uuid.UUID:
        """The project named ``name``, created if missing (the demo's own database only)."""
        return self.create_project(name).id

    def store(
        self,
        path: Path,
        *,
        project_id: uuid.UUID | None = None,
        metadata: dict[str, Any] | None = None,
        source: str | None = None,
    ) -> Import:
        """Store ``path`` as a pending import, as the API stores an upload."""
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise SubmissionError(f"cannot read {path}: {exc.strerror}") from None
        limits = self.settings.import_limits
        if len(content) > limits.max_upload_bytes:
            raise SubmissionError(f"{path}: {limits.refusal('max_upload_bytes', len(content))}")
        data: dict[str, Any] = {"metadata": metadata, "sha256": hashlib.sha256(content).hexdigest()}
        if project_id is not None:
            data["project_id"] = str(project_id)
        if source:
            data["source"] = source
        record = Import(
            id=uuid.uuid4(),
            filename=path.name,
            format="",
            data=data,
            status=ImportStatus.PENDING,
            created=utcnow(),
        )
        with self.db.transaction() as session:
            session.add(record)
            session.add(ImportFile(id=uuid.uuid4(), import_id=record.id, content=content))
        return record

    def previous(self, path: Path, project_id: uuid.UUID | None) -> Outcome | None:
        """An import of the same content for the same project that did not fail, if any: a
        command run again after an interruption must not import a file twice."""
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise SubmissionError(f"cannot read {path}: {exc.strerror}") from None
        project = str(project_id) if project_id else None
        with self.db.transaction() as session:
            candidates = session.scalars(
                select(Import)
                .where(
                    Import.data["sha256"].as_string() == digest,
                    Import.status != ImportStatus.ERROR,
                )
                .order_by(Import.created.desc())
            ).all()
            found = next(
                (r for r in candidates if (r.data or {}).get("project_id") == project), None
            )
        return self.outcome(str(found.id)) if found is not None else None

    @property
    def broker(self) -> str:
        """The broker's servers, safe to print (no password)."""
        if self.settings.embedded:
            return f"the filesystem broker in {self.settings.embedded_dir}"
        return redis_connections.addresses(self.settings.broker_url)

    def _connect(self, connection: Any) -> None:
        """Connect to the broker, waiting out an outage for PUBLISH_PATIENCE_SECONDS; each
        failure is reported to ``self.notify`` (the first at once, then every
        UNREACHABLE_REPORT_SECONDS), naming the servers, never the password."""
        started = time.monotonic()
        reported = -UNREACHABLE_REPORT_SECONDS

        def failed(exc: BaseException, interval: float) -> None:
            nonlocal reported
            elapsed = time.monotonic() - started
            if elapsed - reported < UNREACHABLE_REPORT_SECONDS:
                return
            first = reported < 0
            reported = elapsed
            self.notify(
                f"the broker at {self.broker} does not answer ({_reason(exc)}): trying again "
                f"for up to {PUBLISH_PATIENCE_SECONDS:.0f} s"
                if first
                else f"the broker at {self.broker} still does not answer after {elapsed:.0f} s"
            )

        connection.ensure_connection(
            errback=failed, max_retries=None, timeout=PUBLISH_PATIENCE_SECONDS, **CONNECT_BACKOFF
        )

    def enqueue(self, record: Import, content_head: bytes) -> None:
        """Send the import's task, by name, with the import record as its argument; a broker
        that is away (a restart) is waited for, with backoff, up to PUBLISH_PATIENCE_SECONDS."""
        with self.celery.producer_or_acquire() as producer:
            self._connect(producer.connection)
            self.celery.send_task(
                import_task_name(content_head, record.filename),
                args=[import_record(record)],
                producer=producer,
                retry=True,
                retry_policy=PUBLISH_RETRY,
            )

    def submit(
        self,
        path: Path,
        *,
        project_id: uuid.UUID | None = None,
        metadata: dict[str, Any] | None = None,
        source: str | None = None,
    ) -> str:
        """Store ``path`` as an import and enqueue it once stored; returns the import id.
        NotQueued, naming the import (marked ``error``), when the broker stays away."""
        record = self.store(path, project_id=project_id, metadata=metadata, source=source)
        try:
            with path.open("rb") as head:
                self.enqueue(record, head.read(2))
        except Exception as exc:
            # Never leave an import pending that no worker will ever hear of.
            with self.db.transaction() as session:
                mark_error(session, record.id, "could not be queued: the broker is unreachable")
            reason = _reason(exc)
            raise NotQueued(
                f"cannot queue {path.name}: the broker at {self.broker} is unreachable "
                f"({reason}); import {record.id} marked error",
                file=path.name,
                import_id=str(record.id),
                reason=reason,
            ) from None
        return str(record.id)

    def outcome(self, import_id: str) -> Outcome:
        """The import's current state, with its run's summary once it is done."""
        with self.db.transaction() as session:
            record = session.get(Import, uuid.UUID(import_id))
            if record is None:
                raise SubmissionError(f"no import {import_id}")
            data = record.data or {}
            run_ids = data.get("run_id") or []
            run_id = str(run_ids[0]) if run_ids else None
            summary = None
            if run_id is not None:
                run = session.get(Run, uuid.UUID(run_id))
                summary = run.summary if run is not None else None
            return Outcome(
                file=record.filename or "",
                import_id=import_id,
                status=record.status or "",
                message=data.get("error") or "; ".join(data.get("warnings") or []) or None,
                run_id=run_id,
                summary=summary,
            )

    def consumers(self) -> list[str] | None:
        """The node names of the workers that consume the imports' queue, as they answer a
        broadcast within CONSUMER_QUESTION_SECONDS; None where no broadcast can ask (the
        embedded default's filesystem broker)."""
        if self.settings.embedded:
            return None
        queue = self.celery.conf.task_default_queue
        inspect = self.celery.control.inspect(timeout=CONSUMER_QUESTION_SECONDS)
        answers = inspect.active_queues() or {}
        return sorted(
            str(node)
            for node, queues in answers.items()
            if any(entry.get("name") == queue for entry in queues or [])
        )

    def wait(
        self,
        import_ids: Sequence[str],
        timeout: float,
        watch: Callable[[Sequence[Outcome], float], None] | None = None,
    ) -> list[Outcome]:
        """Poll until every import is finished; SubmissionError after ``timeout`` seconds.
        ``watch`` sees every import's state and the seconds waited, at every poll."""
        started = time.monotonic()
        current: dict[str, Outcome] = {}
        while True:
            for import_id in import_ids:
                if import_id not in current or not current[import_id].finished:
                    current[import_id] = self.outcome(import_id)
            outcomes = [current[import_id] for import_id in import_ids]
            elapsed = time.monotonic() - started
            if watch is not None:
                watch(outcomes, elapsed)
            unfinished = sum(not outcome.finished for outcome in outcomes)
            if not unfinished:
                return outcomes
            if elapsed > timeout:
                raise SubmissionError(
                    f"{unfinished} import(s) still unfinished after {timeout:.0f} s: is a "
                    "worker running?"
                )
            time.sleep(POLL_SECONDS)
