"""The ORM view of upstream's tables (``ibutsu_server.db.schema``) that the tasks use, and the
vocabulary stored in them: result outcomes, import statuses and run summary keys."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement
from sqlalchemy.orm import DeclarativeBase, Mapped

from ibutsu_server.db import schema


def utcnow() -> datetime:
    """The current time in UTC, without a timezone: upstream's columns store naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


class ResultOutcome(enum.StrEnum):
    """The values of ``results.result``."""

    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    SKIPPED = "skipped"
    XFAILED = "xfailed"
    XPASSED = "xpassed"
    MANUAL = "manual"
    BLOCKED = "blocked"


#: The run summary counter each outcome adds to, as upstream's ``update_run`` defines it.
#: Every result counts in "tests"; "passes" is what is left (manual and blocked included).
SUMMARY_COUNTERS: dict[str, str] = {
    ResultOutcome.FAILED: "failures",
    ResultOutcome.ERROR: "errors",
    ResultOutcome.SKIPPED: "skips",
    ResultOutcome.XFAILED: "xfailures",
    ResultOutcome.XPASSED: "xpasses",
}
#: Every key of a run summary the workers write.
SUMMARY_KEYS = (
    "tests",
    *SUMMARY_COUNTERS.values(),
    "passes",
    "collected",
    "not_run",
    "pass_percent",
)


class ImportStatus(enum.StrEnum):
    """The life of an import as the API shows it: pending, running, then done or error."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"

    @classmethod
    def finished(cls, status: str | None) -> bool:
        """Whether an import's stored ``status`` is final (done or error)."""
        return status in (cls.DONE, cls.ERROR)


class Base(DeclarativeBase):
    metadata = schema.metadata


class Project(Base):
    __table__ = schema.projects

    id: Mapped[uuid.UUID]
    name: Mapped[str | None]
    title: Mapped[str | None]
    owner_id: Mapped[uuid.UUID | None]

    @classmethod
    def named(cls, project: str) -> ColumnElement[bool]:
        """The condition for the project ``project`` names: by id when it is one, else by name
        (as the API and its users name projects)."""
        try:
            return cls.id == uuid.UUID(project)
        except ValueError:
            return cls.name == project


class User(Base):
    __table__ = schema.users

    id: Mapped[uuid.UUID]
    email: Mapped[str]
    name: Mapped[str | None]
    is_superadmin: Mapped[bool]
    is_active: Mapped[bool]


class Run(Base):
    __table__ = schema.runs

    id: Mapped[uuid.UUID]
    project_id: Mapped[uuid.UUID | None]
    # The API's "metadata": the name is reserved by SQLAlchemy's declarative base.
    data: Mapped[dict[str, Any] | None]
    env: Mapped[str | None]
    component: Mapped[str | None]
    source: Mapped[str | None]
    start_time: Mapped[datetime]
    duration: Mapped[float | None]
    summary: Mapped[dict[str, Any] | None]
    created: Mapped[datetime]


class Result(Base):
    __table__ = schema.results

    id: Mapped[uuid.UUID]
    project_id: Mapped[uuid.UUID | None]
    run_id: Mapped[uuid.UUID | None]
    test_id: Mapped[str | None]
    result: Mapped[str | None]
    data: Mapped[dict[str, Any] | None]
    params: Mapped[dict[str, Any] | None]
    duration: Mapped[float | None]
    start_time: Mapped[datetime]
    source: Mapped[str | None]
    env: Mapped[str | None]
    component: Mapped[str | None]


class Artifact(Base):
    __table__ = schema.artifacts

    id: Mapped[uuid.UUID]
    content: Mapped[bytes | None]
    result_id: Mapped[uuid.UUID | None]
    run_id: Mapped[uuid.UUID | None]
    filename: Mapped[str | None]
    # The API's "additional_metadata".
    data: Mapped[dict[str, Any] | None]
    upload_date: Mapped[datetime]


class Import(Base):
    __table__ = schema.imports

    id: Mapped[uuid.UUID]
    filename: Mapped[str | None]
    format: Mapped[str | None]
    # The API's "metadata": project_id, source, the uploader's metadata, run_id, and what
    # the workers record (see ibutsu_worker.importing.job).
    data: Mapped[dict[str, Any] | None]
    status: Mapped[str | None]
    created: Mapped[datetime]


class ImportFile(Base):
    __table__ = schema.import_files

    id: Mapped[uuid.UUID]
    import_id: Mapped[uuid.UUID]
    content: Mapped[bytes | None]
