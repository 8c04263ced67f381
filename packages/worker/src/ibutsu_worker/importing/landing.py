"""Writing an import's records into the caller's transaction: the run, its results, their
artifacts, then the run's start time and summary. Both formats land here.

A report with fresh ids (JUnit) streams its results through one ``COPY`` on PostgreSQL, so the
server stores rows while the reader reads on; artifacts are spooled and copied after them. A
report that keeps its ids (an archive) is upserted in batches, so importing it again updates
rows instead of duplicating them, and its run's artifacts are replaced; its spooled artifacts
are written whenever they pass SPOOL_FLUSH_BYTES, so the spool stays small. Artifact contents
are streamed from the reader to the spool to the COPY in slices, never whole in memory. Every
row is charged to the upload's budget (``importing.budget``) as it is written.

Either way everything belongs to the import's project: a report that names another project,
or ids that belong to another project's run, is refused, and the caller's rollback leaves
nothing behind. In metadata, ``run`` and ``project`` are what the API and frontend read as a
result's run and a row's project (the run link, the project filter): ``run`` is always the
row's own run, and a ``project`` that is not the import's is kept as ``reported_project``
(likewise a report's own ``run`` as ``reported_run``), so no row reads as another's.
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
from ibutsu_worker.importing.budget import Budget
from ibutsu_worker.importing.copy import copy_line, copy_line_streaming, copy_rows, dialect_insert
from ibutsu_worker.importing.errors import ReportError, quoted
from ibutsu_worker.importing.records import (
    ArtifactRecord,
    FileContent,
    Record,
    ResultRecord,
    RunRecord,
    RunUpdate,
)
from ibutsu_worker.summaries import COLUMNS_TO_COPY, FirstResult, Tally, summarise, update_summary

BATCH_SIZE = 5000
# Results waiting to be written are flushed once this much text is buffered, so large
# documents cannot pile up in memory (parsed, a document takes several times its size).
BATCH_BYTES = 4 * 1024 * 1024
ARTIFACT_BATCH_BYTES = 8 * 1024 * 1024
ARTIFACT_BATCH_ROWS = 500
# A new run's first result rows are held back, up to this many: a report that ends within them
# (most do) has its run inserted once, summary and all, then its rows copied; a longer one has
# its run inserted at once and its rows streamed, and the summary updated at the end.
HELD_ROWS = 2000
HELD_BYTES = 2 * 1024 * 1024
# Each spool keeps this much in memory, the rest in a temporary file.
SPOOL_MEMORY = 2 * 1024 * 1024
# An archive's spooled artifacts are written once they add up to this much.
SPOOL_FLUSH_BYTES = 32 * 1024 * 1024
# Artifact contents are copied and sent in slices of this many bytes.
SLICE_BYTES = 1024 * 1024
# An artifact row's ids, metadata and date, besides its name and content.
ARTIFACT_ROW_BYTES = 200
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
    """The run an import wrote (in the caller's transaction), its results and summary, what
    it stored in bytes, and the reader's warnings about values it could not use."""

    run_id: uuid.UUID
    results: int
    summary: dict[str, int]
    stored_bytes: int = 0
    warnings: tuple[str, ...] = ()


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


def land(session: Session, upload: Upload, records: Iterable[Record], budget: Budget) -> Landed:
    """Write ``records`` (one RunRecord, results and artifacts, as a reader yields them) and
    the run's summary, charging each row to ``budget``. Raises ReportError for what cannot be
    stored or is over budget; the caller rolls back."""
    with (
        tempfile.SpooledTemporaryFile(SPOOL_MEMORY) as early,
        tempfile.SpooledTemporaryFile(SPOOL_MEMORY) as artifacts,
    ):
        landing = _Landing(session, upload, budget, early, artifacts)
        landing.write(iter(records))
        return landing.finish()


@dataclass
class _Run:
    id: uuid.UUID
    id_text: str
    keeps_ids: bool
    start_time: datetime
    env: str | None
    component: str | None
    source: str | None
    collected: int | None


class _Landing:
    """The state of one import while its records stream past."""

    def __init__(
        self,
        session: Session,
        upload: Upload,
        budget: Budget,
        early: IO[bytes],
        artifacts: IO[bytes],
    ) -> None:
        self.session = session
        self.upload = upload
        self.budget = budget
        self.early = early  # results that came before their run (archives), as JSON lines
        self.artifacts = artifacts  # artifacts, written once every result exists
        # Results whose artifacts are spooled but which the archive has not reached yet.
        self.awaited: set[uuid.UUID] = set()
        self.artifacts_replaced = False  # a re-import's old artifacts deleted
        self.project_names: frozenset[str] | None = None
        self.warnings: list[str] = []
        self.postgres = session.get_bind().dialect.name == "postgresql"
        self.run: _Run | None = None
        # A run this import creates is seen by nobody else before the import commits, so its
        # summary is tallied from the rows as they are written: no query reads them back.
        self.new_run: Run | None = None
        # The report's own total time (its root's, or its top suites' summed), if it says.
        self.reported_duration: float | None = None
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
        if "project" in metadata or "run" in metadata:
            self._own(metadata, None)
        self.budget.charge(len(_JSON.encode(metadata)))
        self.reported_duration = record.duration
        run_id = record.id or uuid.uuid4()
        self.run = _Run(
            id=run_id,
            id_text=str(run_id),
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

    def _own(self, metadata: dict[str, Any], run_id: str | None) -> None:
        """Make ``metadata`` name no other run or project where the API reads them: a
        ``project`` that is not the import's becomes ``reported_project``; a result's ``run``
        is its own run, another one kept as ``reported_run``."""
        project = metadata.get("project")
        if project is not None and str(project) not in self._project_names():
            metadata["reported_project"] = metadata.pop("project")
        reported = metadata.get("run")
        if run_id is not None and reported is not None and reported != run_id:
            metadata["reported_run"] = reported

    def _project_names(self) -> frozenset[str]:
        """The import's project as metadata may name it: its id or its name."""
        if self.project_names is None:
            project_id = self.upload.project_id
            name = project_id and self.session.scalar(
                select(Project.name).where(Project.id == project_id)
            )
            self.project_names = frozenset(str(v) for v in (project_id, name) if v)
        return self.project_names

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
        elif isinstance(record, ArtifactRecord):
            self._spool_artifact(record)
        else:
            self._update_run(record)

    def _update_run(self, update: RunUpdate) -> None:
        """More of the run's metadata (keys it has keep their value), warnings, and the
        run's total time when only its parts state it."""
        self.warnings += update.warnings
        if update.duration is not None and not self.reported_duration:
            self.reported_duration = update.duration
        run = self.new_run
        if run is None or not update.metadata:
            return
        stored = run.data or {}
        added = {key: value for key, value in update.metadata.items() if key not in stored}
        self._own(added, None)
        self.budget.charge(len(_JSON.encode(added)), rows=0)
        run.data = {**added, **stored}

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
        charge = self.budget.charge
        for record in stream:
            if isinstance(record, ResultRecord):
                row = self._result_row(record)
                self.written += 1
                line = copy_line(row[column] for column in RESULT_COLUMNS)
                charge(len(line))
                yield line
            elif isinstance(record, ArtifactRecord):
                self._spool_artifact(record)
            elif isinstance(record, RunUpdate):
                self._update_run(record)
            else:
                raise ReportError("the report describes more than one run")

    # --- results -----------------------------------------------------------------------------

    def _result_row(self, record: ResultRecord) -> dict[str, Any]:
        run = self.run
        assert run is not None
        for artifact in record.artifacts:
            artifact.result_id = record.id
            self._spool_artifact(artifact)
        data = {**record.metadata, **self.upload.metadata}
        if "project" in data or "run" in data:
            self._own(data, run.id_text)
        data["run"] = run.id_text
        row: dict[str, Any] = {
            "id": record.id,
            "project_id": self.upload.project_id,
            "run_id": run.id,
            "test_id": stored_test_id(record.test_id),
            "result": record.result,
            "data": data,
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
        self.awaited.discard(record.id)
        row = self._result_row(record)
        size = len(copy_line(row[column] for column in RESULT_COLUMNS))
        self.budget.charge(size)
        self.buffer.append(row)
        self.buffered_bytes += size
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
        """Write the artifact to the spool, its content in slices, each charged before it is
        written; an archive's spool is written out once it is big and every result it needs
        is there."""
        charge = self.budget.charge
        charge(len(record.filename) + ARTIFACT_ROW_BYTES)
        header = {
            "result_id": str(record.result_id) if record.result_id else None,
            "filename": record.filename,
            "content_type": record.content_type,
            "size": record.size,
        }
        self.artifacts.write(json.dumps(header).encode() + b"\n")
        content = record.content
        if isinstance(content, bytes):
            charge(len(content), rows=0)
            self.artifacts.write(content)
        else:
            with content.file:
                for piece in _slices(content):
                    charge(len(piece), rows=0)
                    self.artifacts.write(piece)
        if record.before_result and record.result_id is not None:
            self.awaited.add(record.result_id)
        run = self.run
        if (
            run is not None
            and run.keeps_ids
            and not self.awaited
            and self.artifacts.tell() >= SPOOL_FLUSH_BYTES
        ):
            self._flush()
            self._write_artifacts()

    def _spooled_artifacts(self) -> Iterator[tuple[dict[str, Any], FileContent]]:
        """Each spooled artifact's row but its content, and its content: the spool itself,
        to be read before the next one."""
        run = self.run
        assert run is not None
        uploaded = utcnow()
        self.artifacts.seek(0)
        while line := self.artifacts.readline():
            header = json.loads(line)
            result_id = uuid.UUID(header["result_id"]) if header["result_id"] else None
            owner = {"resultId": str(result_id)} if result_id else {"runId": run.id_text}
            row = {
                "id": uuid.uuid4(),
                "content": None,
                "result_id": result_id,
                "run_id": None if result_id else run.id,
                "filename": header["filename"],
                "data": {"contentType": header["content_type"], **owner},
                "upload_date": uploaded,
            }
            yield row, FileContent(self.artifacts, header["size"])

    def _write_artifacts(self) -> None:
        """Write the spooled artifacts (a re-import first drops the run's old ones), and
        empty the spool."""
        run = self.run
        assert run is not None
        if run.keeps_ids and not self.artifacts_replaced:
            # A re-import replaces the run's artifacts instead of adding a second copy.
            self.artifacts_replaced = True
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
            at = ARTIFACT_COLUMNS.index("content")
            copy_rows(
                self.session,
                "artifacts",
                ARTIFACT_COLUMNS,
                (
                    piece
                    for row, content in rows
                    for piece in copy_line_streaming(
                        [row[column] for column in ARTIFACT_COLUMNS], at, _slices(content)
                    )
                ),
            )
        else:
            self._insert_artifacts(rows)
        self.artifacts.seek(0)
        self.artifacts.truncate()

    def _insert_artifacts(self, rows: Iterator[tuple[dict[str, Any], FileContent]]) -> None:
        """Bulk INSERTs of the spooled artifacts, for databases without COPY (SQLite)."""
        batch: list[dict[str, Any]] = []
        size = 0
        for row, content in rows:
            batch.append({**row, "content": content.file.read(content.size)})
            size += content.size
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
                self.session,
                run.id,
                collected=run.collected,
                start_at_first=True,
                reported_duration=self.reported_duration,
            )
            assert summary is not None
        else:
            summary = summarise(
                self.new_run,
                self.tally,
                self.first_result,
                collected=self.written,
                start_at_first=True,
                reported_duration=self.reported_duration,
            )
            self.session.flush()  # the run inserted complete if its results were held
            if self.held:
                copy_rows(self.session, "results", RESULT_COLUMNS, self.held)
            self._write_artifacts()
        return Landed(
            run_id=run.id,
            results=self.written,
            summary=summary,
            stored_bytes=self.budget.stored,
            warnings=tuple(self.warnings),
        )


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


def _slices(content: FileContent) -> Iterator[bytes]:
    """``content`` read in slices of at most SLICE_BYTES; ReportError if it ends early."""
    left = content.size
    while left > 0:
        piece = content.file.read(min(left, SLICE_BYTES))
        if not piece:
            raise ReportError("an artifact ended before its stated size (a cut-off upload?)")
        left -= len(piece)
        yield piece


_JSON = json.JSONEncoder(separators=(",", ":"), default=str)


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
