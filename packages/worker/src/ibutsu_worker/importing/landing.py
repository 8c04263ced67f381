"""Writing an import's records into the caller's transaction: the run, its results, their
artifacts, then the run's start time and summary. Both formats land here.

A report with fresh ids (JUnit) streams its results through one ``COPY`` on PostgreSQL, so the
server stores rows while the reader reads on; artifacts are spooled and copied after them. A
report that keeps its ids (an archive) is upserted in batches, so importing it again updates
rows instead of duplicating them, and its run's artifacts are replaced. Either way everything
belongs to the import's project: a report that names another project, or ids that belong to
another project's run, is refused, and the caller's rollback leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import chain
from typing import IO, Any

from sqlalchemy import delete, insert, or_, select
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Artifact, Project, Result, Run, utcnow
from ibutsu_server.db.schema import artifacts as artifacts_table
from ibutsu_server.db.schema import results as results_table
from ibutsu_worker.importing.copy import copy_line, copy_rows, dialect_insert
from ibutsu_worker.importing.errors import ReportError, quoted
from ibutsu_worker.importing.records import ArtifactRecord, Record, ResultRecord, RunRecord
from ibutsu_worker.summaries import COLUMNS_TO_COPY, FirstResult, Tally, summarise, update_summary

BATCH_SIZE = 5000
# Results waiting to be written are flushed once this much JSON is buffered, so large
# documents cannot pile up in memory.
BATCH_BYTES = 16 * 1024 * 1024
ARTIFACT_BATCH_BYTES = 8 * 1024 * 1024
ARTIFACT_BATCH_ROWS = 500
# A new run's first result rows are held back, up to this many: a report that ends within them
# (most do) has its run inserted once, summary and all, then its rows copied; a longer one has
# its run inserted at once and its rows streamed, and the summary updated at the end.
HELD_ROWS = 2000
HELD_BYTES = 2 * 1024 * 1024
# Each spool keeps this much in memory, the rest in a temporary file.
SPOOL_MEMORY = 2 * 1024 * 1024
# results.source, env and component are indexed, alone and together: names are cut to fit.
MAX_NAME = 255
# results.test_id is indexed; a B-tree entry holds about 2.7 kB. Longer ids are stored as a
# prefix, an ellipsis and a hash of the whole id, so distinct ids stay distinct.
MAX_TEST_ID_BYTES = 1000
_TEST_ID_HASH = 16
RESULT_COLUMNS = tuple(column.name for column in results_table.c)
ARTIFACT_COLUMNS = tuple(column.name for column in artifacts_table.c)


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
    """The run an import wrote (in the caller's transaction), its results and summary."""

    run_id: uuid.UUID
    results: int
    summary: dict[str, int]


def stored_test_id(test_id: str) -> str:
    """``test_id`` as stored: unchanged up to MAX_TEST_ID_BYTES of UTF-8, else cut there with
    "…" and the first 16 hex digits of its SHA-256."""
    encoded = test_id.encode()
    if len(encoded) <= MAX_TEST_ID_BYTES:
        return test_id
    digest = hashlib.sha256(encoded).hexdigest()[:_TEST_ID_HASH]
    keep = encoded[: MAX_TEST_ID_BYTES - _TEST_ID_HASH - 4].decode(errors="ignore")
    return f"{keep}…{digest}"


def _name(value: str | None) -> str | None:
    if value is None or len(value) <= MAX_NAME:
        return value
    return value[: MAX_NAME - 1] + "…"


def land(session: Session, upload: Upload, records: Iterable[Record]) -> Landed:
    """Write ``records`` (one RunRecord, results and artifacts, as a reader yields them) and
    the run's summary. Raises ReportError for what cannot be stored; the caller rolls back."""
    with (
        tempfile.SpooledTemporaryFile(SPOOL_MEMORY) as early,
        tempfile.SpooledTemporaryFile(SPOOL_MEMORY) as artifacts,
    ):
        landing = _Landing(session, upload, early, artifacts)
        landing.write(iter(records))
        return landing.finish()


@dataclass
class _Run:
    id: uuid.UUID
    keeps_ids: bool
    start_time: datetime
    env: str | None
    component: str | None
    source: str | None
    collected: int | None


class _Landing:
    """The state of one import while its records stream past."""

    def __init__(self, session: Session, upload: Upload, early: IO[bytes], artifacts: IO[bytes]):
        self.session = session
        self.upload = upload
        self.early = early  # results that came before their run (archives), as JSON lines
        self.artifacts = artifacts  # artifacts, written once every result exists
        self.postgres = session.get_bind().dialect.name == "postgresql"
        self.run: _Run | None = None
        # A run this import creates is seen by nobody else before the import commits, so its
        # summary is tallied from the rows as they are written: no query reads them back.
        self.new_run: Run | None = None
        self.tally = Tally()
        self.first_result: FirstResult | None = None
        self.held: list[str] = []
        self.buffer: list[dict[str, Any]] = []
        self.buffered_bytes = 0
        self.written = 0

    # --- the run -----------------------------------------------------------------------------

    def open_run(self, record: RunRecord) -> None:
        if self.run is not None:
            raise ReportError("the report describes more than one run")
        self._check_project(record.project)
        upload = self.upload
        metadata = {**record.metadata, **upload.metadata}
        self.run = _Run(
            id=record.id or uuid.uuid4(),
            keeps_ids=record.id is not None,
            start_time=record.start_time or upload.created,
            env=_name(_text(metadata.get("env")) or record.env),
            component=_name(_text(metadata.get("component")) or record.component),
            source=_name(upload.source or record.source or _text(metadata.get("source"))),
            collected=record.collected,
        )
        values = {
            "id": self.run.id,
            "project_id": upload.project_id,
            "data": metadata,
            "env": self.run.env,
            "component": self.run.component,
            "source": self.run.source,
            "start_time": self.run.start_time,
            "duration": record.duration,
            "created": utcnow(),
        }
        if record.collected is not None:
            values["summary"] = {"collected": record.collected}
        if self.run.keeps_ids:
            # A re-import keeps when the run was first stored.
            _upsert(self.session, Run, [values], owner="project_id", keep=("created",))
        else:
            # Inserted before its first results are written, which may be at the end.
            self.new_run = Run(**values)
            self.session.add(self.new_run)

    def _check_project(self, named: str | None) -> None:
        """The run's project is the import's; a report naming another one is refused."""
        if not named:
            return
        project_id = self.upload.project_id
        if project_id is not None:
            row = self.session.execute(
                select(Project.id, Project.name).where(Project.id == project_id)
            ).first()
            if row is not None and named in (str(row.id), row.name):
                return
        target = f"project {project_id}" if project_id else "no project"
        raise ReportError(
            f"the report names project {quoted(named)}, but the import was submitted for "
            f"{target}; upload it to that project instead"
        )

    # --- records as they come ----------------------------------------------------------------

    def push(self, record: Record) -> None:
        if isinstance(record, RunRecord):
            self.open_run(record)
            self._replay_early_results()
        elif isinstance(record, ResultRecord):
            if self.run is None:
                self._spool_early(record)
            else:
                self._add_result(record)
        else:
            self._spool_artifact(record)

    def write(self, stream: Iterator[Record]) -> None:
        """Write every record. On PostgreSQL, when the first record is a run with fresh ids
        (JUnit), the results after it go through one COPY: held back if they are few, else
        streamed."""
        first = next(stream, None)
        if first is None:
            return
        self.push(first)
        if self.postgres and self.new_run is not None:
            lines = self._copy_lines(stream)
            self.held, ended = _hold(lines)
            if not ended:
                self.session.flush()  # the run, before its results (a COPY bypasses the ORM)
                copy_rows(self.session, "results", RESULT_COLUMNS, chain(self.held, lines))
                self.held = []
            return
        for record in stream:
            self.push(record)

    def _copy_lines(self, stream: Iterator[Record]) -> Iterator[str]:
        for record in stream:
            if isinstance(record, ResultRecord):
                row = self._result_row(record)
                self.written += 1
                yield copy_line(row[column] for column in RESULT_COLUMNS)
            elif isinstance(record, ArtifactRecord):
                self._spool_artifact(record)
            else:
                raise ReportError("the report describes more than one run")

    # --- results -----------------------------------------------------------------------------

    def _result_row(self, record: ResultRecord) -> dict[str, Any]:
        run = self.run
        assert run is not None
        for artifact in record.artifacts:
            artifact.result_id = record.id
            self._spool_artifact(artifact)
        row: dict[str, Any] = {
            "id": record.id,
            "project_id": self.upload.project_id,
            "run_id": run.id,
            "test_id": stored_test_id(record.test_id),
            "result": record.result,
            "data": {"run": str(run.id), **record.metadata, **self.upload.metadata},
            "params": record.params,
            "duration": record.duration,
            "start_time": record.start_time or run.start_time,
            "source": _name(self.upload.source or record.source) or run.source,
            "env": _name(record.env) or run.env,
            "component": _name(record.component) or run.component,
        }
        if self.tally.add(row["result"], 1, row["duration"], row["start_time"]):
            lent = {column: row[column] for column in COLUMNS_TO_COPY}
            self.first_result = FirstResult(row["data"], lent)
        return row

    def _add_result(self, record: ResultRecord) -> None:
        row = self._result_row(record)
        self.buffer.append(row)
        self.buffered_bytes += len(json.dumps(row["data"], default=str))
        if len(self.buffer) >= BATCH_SIZE or self.buffered_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        run = self.run
        assert run is not None
        if run.keeps_ids:
            _upsert(self.session, Result, self.buffer, owner="run_id")
        else:
            self.session.execute(insert(Result), self.buffer, execution_options=_BULK)
        self.written += len(self.buffer)
        self.buffer, self.buffered_bytes = [], 0

    def _spool_early(self, record: ResultRecord) -> None:
        fields = {
            "id": str(record.id),
            "test_id": record.test_id,
            "result": record.result,
            "start_time": record.start_time.isoformat() if record.start_time else None,
            "duration": record.duration,
            "params": record.params,
            "metadata": record.metadata,
            "source": record.source,
            "component": record.component,
            "env": record.env,
        }
        # json.dumps writes no raw newline, so each result is one line.
        self.early.write(json.dumps(fields).encode() + b"\n")

    def _replay_early_results(self) -> None:
        self.early.seek(0)
        for line in self.early:
            fields = json.loads(line)
            start = fields.pop("start_time")
            self._add_result(
                ResultRecord(
                    **{**fields, "id": uuid.UUID(fields["id"])},
                    start_time=datetime.fromisoformat(start) if start else None,
                )
            )
        self.early.seek(0)
        self.early.truncate()

    # --- artifacts ---------------------------------------------------------------------------

    def _spool_artifact(self, record: ArtifactRecord) -> None:
        header = {
            "result_id": str(record.result_id) if record.result_id else None,
            "filename": record.filename,
            "content_type": record.content_type,
            "size": len(record.content),
        }
        self.artifacts.write(json.dumps(header).encode() + b"\n")
        self.artifacts.write(record.content)

    def _spooled_artifacts(self) -> Iterator[dict[str, Any]]:
        run = self.run
        assert run is not None
        uploaded = utcnow()
        self.artifacts.seek(0)
        while line := self.artifacts.readline():
            header = json.loads(line)
            result_id = uuid.UUID(header["result_id"]) if header["result_id"] else None
            owner = {"resultId": str(result_id)} if result_id else {"runId": str(run.id)}
            yield {
                "id": uuid.uuid4(),
                "content": self.artifacts.read(header["size"]),
                "result_id": result_id,
                "run_id": None if result_id else run.id,
                "filename": header["filename"],
                "data": {"contentType": header["content_type"], **owner},
                "upload_date": uploaded,
            }

    def _write_artifacts(self) -> None:
        run = self.run
        assert run is not None
        if run.keeps_ids:
            # A re-import replaces the run's artifacts instead of adding a second copy.
            self.session.execute(
                delete(Artifact)
                .where(
                    or_(
                        Artifact.run_id == run.id,
                        Artifact.result_id.in_(select(Result.id).where(Result.run_id == run.id)),
                    )
                )
                .execution_options(synchronize_session=False)
            )
        if not self.artifacts.tell():
            return  # none spooled
        rows = self._spooled_artifacts()
        if self.postgres:
            copy_rows(
                self.session,
                "artifacts",
                ARTIFACT_COLUMNS,
                (copy_line(row[column] for column in ARTIFACT_COLUMNS) for row in rows),
            )
            return
        batch: list[dict[str, Any]] = []
        size = 0
        for row in rows:
            batch.append(row)
            size += len(row["content"])
            if size >= ARTIFACT_BATCH_BYTES or len(batch) >= ARTIFACT_BATCH_ROWS:
                self.session.execute(insert(Artifact), batch, execution_options=_BULK)
                batch, size = [], 0
        if batch:
            self.session.execute(insert(Artifact), batch, execution_options=_BULK)

    # --- the end -----------------------------------------------------------------------------

    def finish(self) -> Landed:
        run = self.run
        if run is None:
            raise ReportError("the report describes no run")
        self._flush()
        # A run starts when the report says, or when its first result started if earlier.
        if self.new_run is None:  # results may already exist: count them all
            self._write_artifacts()
            summary = update_summary(
                self.session, run.id, collected=run.collected, start_at_first=True
            )
            assert summary is not None
            return Landed(run_id=run.id, results=self.written, summary=summary)
        summary = summarise(
            self.new_run, self.tally, self.first_result, collected=self.written, start_at_first=True
        )
        self.session.flush()  # the run inserted complete if its results were held, else updated
        if self.held:
            copy_rows(self.session, "results", RESULT_COLUMNS, self.held)
        self._write_artifacts()
        return Landed(run_id=run.id, results=self.written, summary=summary)


def _hold(lines: Iterator[str]) -> tuple[list[str], bool]:
    """The first lines, up to HELD_ROWS or HELD_BYTES, and whether that was all of them."""
    held: list[str] = []
    size = 0
    for line in lines:
        held.append(line)
        size += len(line)
        if len(held) >= HELD_ROWS or size >= HELD_BYTES:
            return held, False
    return held, True


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# ORM bulk INSERTs leave out None values unless asked, which splits a batch into one statement
# per pattern of missing values.
_BULK = {"render_nulls": True}


def _upsert(
    session: Session,
    model: type[Run] | type[Result],
    rows: list[dict[str, Any]],
    owner: str,
    keep: tuple[str, ...] = (),
) -> None:
    """Insert ``rows``, replacing rows whose id exists (but for the ``keep`` columns) only
    where the existing row has the same ``owner`` column (a result its run, a run its
    project): an upload can never take over somebody else's rows by naming their ids. Every
    row must have the same keys."""
    statement = dialect_insert(session, model)
    # With RETURNING, SQLAlchemy sends the rows as multi-row VALUES pages ("insertmanyvalues");
    # without it, it would send an upsert row by row.
    statement = statement.on_conflict_do_update(
        index_elements=["id"],
        set_={key: statement.excluded[key] for key in rows[0] if key not in ("id", *keep)},
        where=statement.table.c[owner].is_not_distinct_from(statement.excluded[owner]),
    ).returning(statement.table.c.id)
    # ON CONFLICT may touch a row only once per statement: the last copy of an id wins.
    unique = list({row["id"]: row for row in rows}.values())
    written = len(session.execute(statement, unique, execution_options=_BULK).all())
    if written < len(unique):
        raise ReportError(
            f"{len(unique) - written} {statement.table.name} id(s) of this upload already belong "
            f"to another {owner.removesuffix('_id')}; ids are kept, so they cannot be reused"
        )
