"""Ibutsu's tables, portable between PostgreSQL (UUID, JSONB) and SQLite (CHAR, JSON).

Every foreign key that points at a row which pruning may delete cascades or nulls on delete,
so a newer row can never block the deletion of an older one.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# JSONB on PostgreSQL (indexable, compact), plain JSON elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SUMMARY_KEYS = (
    "tests",
    "failures",
    "errors",
    "skips",
    "xfailures",
    "xpasses",
    "passes",
    "collected",
    "not_run",
)


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def empty_summary() -> dict[str, int]:
    """A run summary with every counter at zero."""
    return dict.fromkeys(SUMMARY_KEYS, 0)


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


class ImportStatus(enum.StrEnum):
    """The life of an import: pending, running, then done or failed."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSONType, uuid.UUID: Uuid()}


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(primary_key=True, default=uuid.uuid4)


def _created() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[uuid.UUID] = _uuid_pk()
    name: Mapped[str] = mapped_column(String(255), unique=True)
    title: Mapped[str | None] = mapped_column(String(255))
    data: Mapped[dict[str, Any] | None]


class _TestRecord:
    """Columns that runs and results share."""

    start_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration: Mapped[float | None] = mapped_column(Float)
    component: Mapped[str | None] = mapped_column(String(255))
    env: Mapped[str | None] = mapped_column(String(255))
    source: Mapped[str | None] = mapped_column(String(255))
    # The API's "metadata": the name is reserved by SQLAlchemy's declarative base.
    data: Mapped[dict[str, Any] | None]


# A run's age for pruning: when it started, or when it was stored if nobody said.
RUN_AGE_SQL = "coalesce(start_time, created)"


class Run(_TestRecord, Base):
    __tablename__ = "runs"
    __table_args__ = (
        Index(None, "project_id", "start_time"),
        Index(None, "created"),
        Index(None, "start_time"),
        Index("ix_runs_age", text(RUN_AGE_SQL)),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    project_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("projects.id", ondelete="SET NULL")
    )
    created: Mapped[datetime] = _created()
    summary: Mapped[dict[str, Any] | None]


class Result(_TestRecord, Base):
    __tablename__ = "results"
    __table_args__ = (
        Index(None, "run_id", "result"),
        Index(None, "project_id", "start_time"),
        Index(None, "start_time"),
        Index(None, "test_id"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    run_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    project_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("projects.id", ondelete="SET NULL")
    )
    test_id: Mapped[str] = mapped_column(Text)
    result: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any] | None]


class RunUpdateRequest(Base):
    """A summary update asked for while another was running: the running one enqueues
    exactly one more when it finishes (see ibutsu_worker.summaries)."""

    __tablename__ = "run_update_requests"

    run_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    requested: Mapped[datetime] = _created()


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (Index(None, "upload_date"), Index(None, "result_id"), Index(None, "run_id"))

    id: Mapped[uuid.UUID] = _uuid_pk()
    result_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("results.id", ondelete="CASCADE")
    )
    run_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    content: Mapped[bytes] = mapped_column(LargeBinary)
    upload_date: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, nullable=False
    )
    data: Mapped[dict[str, Any] | None]


class Import(Base):
    __tablename__ = "imports"
    __table_args__ = (Index(None, "status", "created"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=ImportStatus.PENDING)
    message: Mapped[str | None] = mapped_column(Text)
    # No foreign key: the run may be pruned long before the import record.
    run_id: Mapped[uuid.UUID | None]
    result_count: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[datetime] = _created()
    started: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # What the uploader said about the run: project, source, env, component, metadata.
    data: Mapped[dict[str, Any] | None]


class ImportFile(Base):
    __tablename__ = "import_files"

    id: Mapped[uuid.UUID] = _uuid_pk()
    import_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("imports.id", ondelete="CASCADE"), unique=True
    )
    content: Mapped[bytes | None] = mapped_column(LargeBinary)
    created: Mapped[datetime] = _created()
