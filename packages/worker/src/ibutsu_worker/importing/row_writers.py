"""How one run's rows reach the database, in the caller's transaction: chosen once per import
by :func:`writer_for`, from whether the run keeps its ids and the database's dialect.

- :class:`CopyWriter`, a run with fresh ids (JUnit): nobody else sees it before the import
  commits, so it is inserted through the ORM and its summary tallied from the rows as they are
  written. On PostgreSQL its results stream through one ``COPY``, so the server stores rows
  while the reader reads on; elsewhere (SQLite) they are INSERTed in batches.
- :class:`UpsertWriter`, a run that keeps its ids (an archive): the run and its results are
  upserted in batches, so importing it again updates rows instead of duplicating them; its old
  artifacts are replaced, and its spool is written whenever it is full, so it stays small.

Artifacts are written once every result they need exists, by ``COPY`` on PostgreSQL, their
contents streamed from the spool in slices; by batched INSERTs elsewhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain

from sqlalchemy import delete, insert, or_, select
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Artifact, Result, Run, utcnow
from ibutsu_worker.importing.artifact_spool import ArtifactSpool, slices
from ibutsu_worker.importing.copy import copy_line_streaming, copy_rows, dialect_insert
from ibutsu_worker.importing.errors import ReportError
from ibutsu_worker.importing.records import FileContent
from ibutsu_worker.importing.rows import (
    ARTIFACT_COLUMNS,
    RESULT_COLUMNS,
    OpenRun,
    Row,
    artifact_row,
)
from ibutsu_worker.summaries import FirstResult, Tally, summarise, update_summary

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

#: A result's row and its COPY line (whose length it was charged).
ResultRow = tuple[Row, str]


def writer_for(session: Session, run: OpenRun, spool: ArtifactSpool) -> RowWriter:
    """The writer for ``run``, chosen from whether it keeps its ids and the database's
    dialect: an upsert if it does, else a COPY (batched INSERTs where there is no COPY)."""
    postgres = session.get_bind().dialect.name == "postgresql"
    artifacts = _copy_artifacts if postgres else _insert_artifacts
    if run.keeps_ids:
        return UpsertWriter(session, run, spool, artifacts)
    return (CopyWriter if postgres else InsertWriter)(session, run, spool, artifacts)


#: Writes artifact rows, each with its content apart, to the session's database.
ArtifactsWriter = Callable[[Session, Iterator[tuple[Row, FileContent]]], None]


@dataclass
class RowWriter(ABC):
    """Writes one run, its results, and the artifacts ``spool`` holds (by ``artifacts``)."""

    session: Session
    run: OpenRun
    spool: ArtifactSpool
    artifacts: ArtifactsWriter
    #: The run's object while this import creates it: later metadata is merged into it.
    #: None when the run is upserted, its metadata final.
    new_run: Run | None = field(default=None, init=False)

    @abstractmethod
    def open_run(self, row: Row) -> None:
        """Store the run's ``row`` (when is the writer's choice: before its first result)."""

    @abstractmethod
    def write_results(self, rows: Iterator[ResultRow]) -> None:
        """Write every row ``rows`` yields, pulled one at a time (the import reads on as it
        is pulled, and may call :meth:`spool_full` meanwhile). Some may be held back until
        :meth:`finish`."""

    def spool_full(self) -> None:  # noqa: B027 (not abstract: most writers keep the default)
        """The spool is full (``ArtifactSpool.full``). By default its artifacts wait for
        :meth:`finish`."""

    @abstractmethod
    def finish(
        self, tally: Tally, first: FirstResult | None, duration: float | None = None
    ) -> dict[str, int]:
        """Write what is left, then the run's summary, which is returned. ``tally`` counts
        every result written, ``first`` is the one that started first; ``duration`` is the
        report's own total time, if it states one (else the results' sum)."""

    def _write_artifacts(self) -> None:
        """Write the spooled artifacts, emptying the spool."""
        if not self.spool.empty:
            self.artifacts(self.session, self._artifact_rows())

    def _artifact_rows(self) -> Iterator[tuple[Row, FileContent]]:
        """Each spooled artifact's row but its content, and its content (the spool itself,
        to be read before the next one)."""
        uploaded = utcnow()
        for record in self.spool.drain():
            assert isinstance(record.content, FileContent)  # spooled, not in memory
            yield artifact_row(record, self.run, uploaded), record.content


class _Batch:
    """Result rows gathered to be written together: BATCH_SIZE of them, or fewer holding
    BATCH_BYTES of COPY text."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.size = 0

    def add(self, row: Row, size: int) -> bool:
        """Add ``row``, ``size`` bytes as COPY text; True when the batch is due."""
        self.rows.append(row)
        self.size += size
        return len(self.rows) >= BATCH_SIZE or self.size >= BATCH_BYTES

    def take(self) -> list[Row]:
        """The rows gathered, leaving the batch empty."""
        rows, self.rows, self.size = self.rows, [], 0
        return rows


@dataclass
class CopyWriter(RowWriter):
    """A run this import creates, its ids fresh, on PostgreSQL: its results by one ``COPY``,
    the first HELD_ROWS held back so that a short report's run is inserted once, complete. Its
    summary is tallied: no query reads the rows back."""

    held: list[str] = field(default_factory=list, init=False)

    def open_run(self, row: Row) -> None:
        # Inserted before its first results are written, which may be at the end.
        self.new_run = Run(**row)
        self.session.add(self.new_run)

    def write_results(self, rows: Iterator[ResultRow]) -> None:
        lines = (line for _row, line in rows)
        self.held, ended = _hold(lines)
        if not ended:
            self.session.flush()  # the run, before its results (a COPY bypasses the ORM)
            copy_rows(self.session, "results", RESULT_COLUMNS, chain(self.held, lines))
            self.held = []

    def finish(
        self, tally: Tally, first: FirstResult | None, duration: float | None = None
    ) -> dict[str, int]:
        assert self.new_run is not None
        # A run starts when the report says, or when its first result started if earlier.
        summary = summarise(
            self.new_run,
            tally,
            first,
            collected=tally.tests,
            start_at_first=True,
            reported_duration=duration,
        )
        self.session.flush()  # the run inserted complete if its results were held
        if self.held:
            copy_rows(self.session, "results", RESULT_COLUMNS, self.held)
        self._write_artifacts()
        return summary


@dataclass
class InsertWriter(CopyWriter):
    """A :class:`CopyWriter` for databases without COPY (SQLite): results INSERTed in
    batches."""

    batch: _Batch = field(default_factory=_Batch, init=False)

    def write_results(self, rows: Iterator[ResultRow]) -> None:
        for row, line in rows:
            if self.batch.add(row, len(line)):
                self._insert()

    def finish(
        self, tally: Tally, first: FirstResult | None, duration: float | None = None
    ) -> dict[str, int]:
        self._insert()
        return super().finish(tally, first, duration)

    def _insert(self) -> None:
        if rows := self.batch.take():
            self.session.execute(insert(Result), rows, execution_options=_BULK)


@dataclass
class UpsertWriter(RowWriter):
    """A run that keeps its ids: it and its results upserted in batches, its artifacts
    replaced, its spool written whenever it is full. Its summary is recounted from the
    database, which may hold results of an earlier import of the same run."""

    batch: _Batch = field(default_factory=_Batch, init=False)
    artifacts_replaced: bool = field(default=False, init=False)  # the run's old ones deleted

    def open_run(self, row: Row) -> None:
        # A re-import keeps when the run was first stored.
        _upsert(self.session, Run, [row], owner="project_id", keep=("created",))

    def write_results(self, rows: Iterator[ResultRow]) -> None:
        for row, line in rows:
            if self.batch.add(row, len(line)):
                self._upsert()

    def spool_full(self) -> None:
        self._upsert()  # the results its artifacts belong to
        self._write_artifacts()

    def finish(
        self, tally: Tally, first: FirstResult | None, duration: float | None = None
    ) -> dict[str, int]:
        self._upsert()
        self._write_artifacts()
        # A run starts when the report says, or when its first result started if earlier.
        summary = update_summary(
            self.session,
            self.run.id,
            collected=self.run.collected,
            start_at_first=True,
            reported_duration=duration,
        )
        assert summary is not None
        return summary

    def _write_artifacts(self) -> None:
        if not self.artifacts_replaced:
            # A re-import replaces the run's artifacts instead of adding a second copy.
            self.artifacts_replaced = True
            run_id = self.run.id
            self.session.execute(
                delete(Artifact)
                .where(
                    or_(
                        Artifact.run_id == run_id,
                        Artifact.result_id.in_(select(Result.id).where(Result.run_id == run_id)),
                    )
                )
                .execution_options(synchronize_session=False)
            )
        super()._write_artifacts()

    def _upsert(self) -> None:
        if rows := self.batch.take():
            _upsert(self.session, Result, rows, owner="run_id")


def _copy_artifacts(session: Session, rows: Iterator[tuple[Row, FileContent]]) -> None:
    """One COPY of the artifact ``rows``, each content streamed in slices as hex."""
    at = ARTIFACT_COLUMNS.index("content")
    copy_rows(
        session,
        "artifacts",
        ARTIFACT_COLUMNS,
        (
            piece
            for row, content in rows
            for piece in copy_line_streaming(
                [row[column] for column in ARTIFACT_COLUMNS], at, slices(content)
            )
        ),
    )


def _insert_artifacts(session: Session, rows: Iterator[tuple[Row, FileContent]]) -> None:
    """Bulk INSERTs of the artifact ``rows``, for databases without COPY (SQLite)."""
    batch: list[Row] = []
    size = 0
    for row, content in rows:
        batch.append({**row, "content": content.file.read(content.size)})
        size += content.size
        if size >= ARTIFACT_BATCH_BYTES or len(batch) >= ARTIFACT_BATCH_ROWS:
            session.execute(insert(Artifact), batch, execution_options=_BULK)
            batch, size = [], 0
    if batch:
        session.execute(insert(Artifact), batch, execution_options=_BULK)


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


# ORM bulk INSERTs leave out None values unless asked, which splits a batch into one statement
# per pattern of missing values.
_BULK = {"render_nulls": True}


def _upsert(
    session: Session,
    model: type[Run] | type[Result],
    rows: list[Row],
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
