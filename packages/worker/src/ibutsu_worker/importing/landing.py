"""Writing an import's records into the caller's transaction: the run, its results, their
artifacts, then the run's start time and summary. Both formats land here, and this module
conducts; each of its parts has a home of its own:

- ``importing.rows``: what each record becomes as a row, without a session: names cut to fit,
  long test ids hashed, the ``run`` and ``project`` in metadata made the row's own.
- ``importing.artifact_spool``: what waits in temporary files, artifacts (contents in slices)
  and results that came before their run.
- ``importing.row_writers``: how the rows reach the database, chosen once when the run opens:
  one streaming ``COPY`` for a run with fresh ids (JUnit), batched upserts for one that keeps
  its ids (an archive), so importing it again updates rows instead of duplicating them.
- here: the run opened once, each result mapped, charged to the upload's budget
  (``importing.budget``) as it is written, and tallied for the run's summary.

Everything belongs to the import's project: a report that names another project, or ids that
belong to another project's run, is refused, and the caller's rollback leaves nothing behind.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import chain
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Project
from ibutsu_worker.importing.artifact_spool import ArtifactSpool, EarlyResults
from ibutsu_worker.importing.budget import Budget
from ibutsu_worker.importing.errors import ReportError, quoted
from ibutsu_worker.importing.records import (
    ArtifactRecord,
    Record,
    ResultRecord,
    RunRecord,
    RunUpdate,
)
from ibutsu_worker.importing.row_writers import ResultRow, RowWriter, writer_for
from ibutsu_worker.importing.rows import RowMapper, result_line
from ibutsu_worker.summaries import COLUMNS_TO_COPY, FirstResult, Tally


@dataclass(frozen=True)
class Upload:
    """What the import record says: whose upload it is, and what the uploader added."""

    import_id: uuid.UUID
    project_id: uuid.UUID | None
    source: str | None
    metadata: dict[str, Any]
    created: datetime


@dataclass(frozen=True)
class Landed:
    """The run an import wrote (in the caller's transaction), its results and summary, what
    it stored in bytes, and the reader's warnings about values it could not use."""

    run_id: uuid.UUID
    results: int
    summary: dict[str, int]
    stored_bytes: int = 0
    warnings: tuple[str, ...] = ()


def land(session: Session, upload: Upload, records: Iterable[Record], budget: Budget) -> Landed:
    """Write ``records`` (one RunRecord, results and artifacts, as a reader yields them) and
    the run's summary, charging each row to ``budget``. Raises ReportError for what cannot be
    stored or is over budget; the caller rolls back."""
    with EarlyResults() as early, ArtifactSpool(budget) as spool:
        landing = _Landing(session, upload, budget, early, spool)
        landing.write(iter(records))
        return landing.finish()


class _Landing:
    """One import's records on their way: mapped to rows, charged, tallied, and handed to the
    run's writer, chosen when the run opens."""

    def __init__(
        self,
        session: Session,
        upload: Upload,
        budget: Budget,
        early: EarlyResults,
        spool: ArtifactSpool,
    ) -> None:
        self.session = session
        self.upload = upload
        self.budget = budget
        self.early = early
        self.spool = spool
        project_names = functools.cache(lambda: _project_names(session, upload.project_id))
        self.rows = RowMapper(
            upload.project_id, upload.source, upload.metadata, upload.created, project_names
        )
        self.writer: RowWriter | None = None
        # The run's summary, tallied from the rows as they are written; used by a writer
        # that creates the run, which nobody else sees before the import commits.
        self.tally = Tally()
        self.first_result: FirstResult | None = None
        self.warnings: list[str] = []
        # The report's own total time (its root's, or its top suites' summed), if it says.
        self.reported_duration: float | None = None

    def write(self, records: Iterator[Record]) -> None:
        """Write every record: those before the run are spooled; once it is open, its results
        (the spooled ones first) are pulled by the writer as rows."""
        for record in records:
            if isinstance(record, RunRecord):
                writer = self._open_run(record)
                writer.write_results(self._rows(chain(self.early.replay(), records)))
                return
            if isinstance(record, ResultRecord):
                self.early.add(record)
            else:
                self._take(record)

    def finish(self) -> Landed:
        """Write what the writer holds, and the run's summary."""
        writer = self.writer
        if writer is None:
            raise ReportError("the report describes no run")
        summary = writer.finish(self.tally, self.first_result, self.reported_duration)
        return Landed(
            run_id=writer.run.id,
            results=self.tally.tests,
            summary=summary,
            stored_bytes=self.budget.stored,
            warnings=tuple(self.warnings),
        )

    def _open_run(self, record: RunRecord) -> RowWriter:
        _check_project(self.session, self.upload.project_id, record.project)
        run, row = self.rows.run(record)
        self.reported_duration = record.duration
        self.budget.charge(len(_JSON.encode(row["data"])))
        self.writer = writer_for(self.session, run, self.spool)
        self.writer.open_run(row)
        return self.writer

    def _rows(self, records: Iterator[Record]) -> Iterator[ResultRow]:
        """The results' rows, each charged and tallied; artifacts and run updates taken as
        they come."""
        for record in records:
            if isinstance(record, ResultRecord):
                yield self._result(record)
            elif isinstance(record, RunRecord):
                raise ReportError("the report describes more than one run")
            else:
                self._take(record)

    def _result(self, record: ResultRecord) -> ResultRow:
        writer = self.writer
        assert writer is not None
        self.spool.arrived(record.id)
        for artifact in record.artifacts:
            artifact.result_id = record.id
            self._spool_artifact(artifact)
        row = self.rows.result(record, writer.run)
        if self.tally.add(row["result"], 1, row["duration"], row["start_time"]):
            lent = {column: row[column] for column in COLUMNS_TO_COPY}
            self.first_result = FirstResult(row["data"], lent)
        line = result_line(row)
        self.budget.charge(len(line))
        return row, line

    def _take(self, record: ArtifactRecord | RunUpdate) -> None:
        if isinstance(record, ArtifactRecord):
            self._spool_artifact(record)
        else:
            self._update_run(record)

    def _spool_artifact(self, record: ArtifactRecord) -> None:
        """Spool the artifact; a writer that can writes the spool out once it is full."""
        self.spool.add(record)
        if self.writer is not None and self.spool.full:
            self.writer.spool_full()

    def _update_run(self, update: RunUpdate) -> None:
        """More of the run's metadata (keys it has keep their value), warnings, and the
        run's total time when only its parts state it."""
        self.warnings += update.warnings
        if update.duration is not None and not self.reported_duration:
            self.reported_duration = update.duration
        run = self.writer.new_run if self.writer is not None else None
        if run is None or not update.metadata:
            return
        stored = run.data or {}
        added = self.rows.added_metadata(stored, update.metadata)
        self.budget.charge(len(_JSON.encode(added)), rows=0)
        run.data = {**added, **stored}


def _check_project(session: Session, project_id: uuid.UUID | None, named: str | None) -> None:
    """The run's project is the import's; a report naming another one is refused."""
    if not named:
        return
    if project_id is not None:
        row = session.execute(
            select(Project.id, Project.name).where(Project.id == project_id)
        ).first()
        if row is not None and named in (str(row.id), row.name):
            return
    target = f"project {project_id}" if project_id else "no project"
    raise ReportError(
        f"the report names project {quoted(named)}, but the import was submitted for "
        f"{target}; upload it to that project instead"
    )


def _project_names(session: Session, project_id: uuid.UUID | None) -> frozenset[str]:
    """The import's project as metadata may name it: its id or its name."""
    name = project_id and session.scalar(select(Project.name).where(Project.id == project_id))
    return frozenset(str(v) for v in (project_id, name) if v)


# What the run's metadata is charged.
_JSON = json.JSONEncoder(separators=(",", ":"), default=str)
