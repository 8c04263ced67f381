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

from ibutsu_server import task_names
from ibutsu_server.app_factory import FlaskCelery, create_flask_celery_app
from ibutsu_server.db.models import Import, ImportFile, ImportStatus, Project, Run, utcnow
from ibutsu_server.db.sessions import Database
from ibutsu_server.settings import Role, Settings
from ibutsu_worker.importing.formats import ImportFormat
from ibutsu_worker.importing.job import mark_error

POLL_SECONDS = 0.2
# Sending waits out a broker restart: about a minute in all before it gives up.
PUBLISH_RETRY = {
    "max_retries": 12,
    "interval_start": 0.5,
    "interval_step": 1.0,
    "interval_max": 8.0,
}


class SubmissionError(Exception):
    """A submission that cannot be made or followed; the message says why, in one line."""


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


def import_task_name(content_head: bytes) -> str:
    """The task the API sends for content starting with ``content_head``."""
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

    def __init__(self, settings: Settings, celery: FlaskCelery | None = None) -> None:
        self.settings = settings
        self.celery = celery or create_flask_celery_app(Role.WORKER, settings=settings)
        self.db: Database = self.celery.database

    def close(self) -> None:
        self.db.engine.dispose()

    @property
    def where(self) -> str:
        """The database, safe to print (no password)."""
        assert self.settings.database is not None  # the worker role always has one
        return self.settings.database.display

    def project_id(self, project: str) -> uuid.UUID:
        """The id of an existing project, named by id or by name."""
        session = self.db.session()
        try:
            found = session.scalar(select(Project.id).where(Project.named(project)).limit(1))
        finally:
            self.db.session.remove()
        if found is None:
            raise SubmissionError(f"no project {project!r}: create it in Ibutsu first")
        return found

    def ensure_project(self, name: str) -> uuid.UUID:
        """The project named ``name``, created if missing (the demo's own database only)."""
        try:
            return self.project_id(name)
        except SubmissionError:
            session = self.db.session()
            try:
                project = Project(id=uuid.uuid4(), name=name, title=name)
                session.add(project)
                session.commit()
                return project.id
            finally:
                self.db.session.remove()

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
        session = self.db.session()
        try:
            session.add(record)
            session.add(ImportFile(id=uuid.uuid4(), import_id=record.id, content=content))
            session.commit()
        finally:
            self.db.session.remove()
        return record

    def previous(self, path: Path, project_id: uuid.UUID | None) -> Outcome | None:
        """An import of the same content for the same project that did not fail, if any: a
        command run again after an interruption must not import a file twice."""
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise SubmissionError(f"cannot read {path}: {exc.strerror}") from None
        project = str(project_id) if project_id else None
        session = self.db.session()
        try:
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
        finally:
            self.db.session.remove()
        return self.outcome(str(found.id)) if found is not None else None

    def enqueue(self, record: Import, content_head: bytes) -> None:
        """Send the import's task, by name, with the import record as its argument; a broker
        that is away for a moment (a restart) is waited for, with backoff."""
        self.celery.send_task(
            import_task_name(content_head),
            args=[import_record(record)],
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
        """Store ``path`` as an import and enqueue it once stored; returns the import id."""
        record = self.store(path, project_id=project_id, metadata=metadata, source=source)
        try:
            with path.open("rb") as head:
                self.enqueue(record, head.read(2))
        except Exception as exc:
            # Never leave an import pending that no worker will ever hear of.
            session = self.db.session()
            try:
                mark_error(session, record.id, "could not be queued: the broker is unreachable")
                session.commit()
            finally:
                self.db.session.remove()
            raise SubmissionError(
                f"cannot queue {path.name}: the broker is unreachable ({type(exc).__name__})"
            ) from None
        return str(record.id)

    def outcome(self, import_id: str) -> Outcome:
        """The import's current state, with its run's summary once it is done."""
        session = self.db.session()
        try:
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
        finally:
            self.db.session.remove()

    def wait(
        self,
        import_ids: Sequence[str],
        timeout: float,
        progress: Callable[[int, Outcome], None] | None = None,
    ) -> list[Outcome]:
        """Poll until every import is finished; SubmissionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        finished: dict[str, Outcome] = {}
        while len(finished) < len(import_ids):
            for import_id in import_ids:
                if import_id not in finished:
                    outcome = self.outcome(import_id)
                    if outcome.finished:
                        finished[import_id] = outcome
                        if progress is not None:
                            progress(len(finished), outcome)
            if len(finished) < len(import_ids):
                if time.monotonic() > deadline:
                    raise SubmissionError(
                        f"{len(import_ids) - len(finished)} import(s) still unfinished after "
                        f"{timeout:.0f}s: is a worker running?"
                    )
                time.sleep(POLL_SECONDS)
        return [finished[import_id] for import_id in import_ids]
