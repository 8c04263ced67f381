"""The life of one import, owned here: pending → running → done, or error with the reason.

Where upstream's API and frontend read it: ``imports.status`` (``pending``, ``running``,
``done``, ``error``) and ``imports.data``, which the API shows as the import's ``metadata``.
Besides what the API put there (``project_id``, ``source``, the uploader's ``metadata``), the
workers record ``run_id`` (a list, as upstream), ``error`` (why it failed), ``started`` and
``finished`` (ISO 8601, UTC), ``result_count``, ``stored_bytes`` (what the import wrote, as its
budget counted it), ``warnings`` (values of the report it could not use), and ``deliveries``
(how many times in a row the same message was started: a worker that dies mid-import gets the
same message again);
``format`` (``junit``, ``archive``) goes in its own column. No table or column of our own is needed.

An import lands whole or not at all: the import's row is locked for the whole import, the run
and its results are written in the task's transaction, and the import becomes ``done`` in that
same transaction, or, if the report is bad, that transaction is rolled back and only ``error``
and its reason are recorded, in a new one. A redelivered task finds the import finished, or
waits for the row and then does.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import closing, suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BindParameter, Engine, Update, and_, bindparam, func, select, text, update
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Import, ImportFile, ImportStatus, Project, utcnow
from ibutsu_server.db.schema import import_files, imports
from ibutsu_server.db.sessions import Transaction
from ibutsu_server.settings import ImportLimits
from ibutsu_worker.importing.archive import archive_records
from ibutsu_worker.importing.budget import Budget
from ibutsu_worker.importing.errors import ReportError, quoted
from ibutsu_worker.importing.formats import ImportFormat
from ibutsu_worker.importing.junit import NOT_A_REPORT, JUnitReader
from ibutsu_worker.importing.landing import Landed, Upload, land
from ibutsu_worker.importing.records import Record
from ibutsu_worker.importing.tar_reader import unpacked_size

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024

Reader = Callable[[Iterator[bytes], ImportLimits], Iterable[Record]]


def _junit(chunks: Iterator[bytes], limits: ImportLimits) -> Iterable[Record]:
    return JUnitReader(limits).records(chunks)


READERS: dict[ImportFormat, Reader] = {
    ImportFormat.JUNIT: _junit,
    ImportFormat.ARCHIVE: archive_records,
}


def import_id_of(value: Any) -> uuid.UUID | None:
    """The import id in a task's argument: the API's import record (a dict with ``id``) or
    the id itself. None when there is none."""
    if isinstance(value, Mapping):
        value = value.get("id")
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


@dataclass(frozen=True)
class Outcome:
    """What an import came to, for the log and the metrics."""

    import_id: uuid.UUID
    status: ImportStatus
    format: ImportFormat
    results: int = 0
    run_id: uuid.UUID | None = None
    error: str | None = None


def run(
    transaction: Transaction, import_id: uuid.UUID, limits: ImportLimits, delivery: str
) -> Outcome | None:
    """Run the import ``import_id`` in ``transaction``; None when there is nothing to do (no
    such import, or already finished). ``delivery`` names the message being run (the same
    for a redelivery of it, new for a retry)."""
    session = transaction.session
    claimed = _locked(session, import_id)
    if claimed is None:
        return None
    record = claimed[0]
    data = record.data
    # The same message again (same task, same retry) means the worker died while importing it
    # (Celery redelivers after a kill): a report that kills workers must stop, not loop.
    last = data.get("deliveries") or {}
    count = last.get("count", 0) + 1 if last.get("delivery") == delivery else 1
    if count > limits.max_deliveries:
        message = limits.refusal("max_deliveries", count - 1)
        mark_error(session, import_id, message)
        return Outcome(import_id, ImportStatus.ERROR, ImportFormat.UNKNOWN, error=message)
    running = {**data, "started": utcnow().isoformat()}
    running["deliveries"] = {"delivery": delivery, "count": count}
    session.connection().execute(_MARK_RUNNING, {"claimed_import": import_id, "running": running})
    transaction.checkpoint("the import shows as running")
    # Locked again, for the rest of the import: a second delivery waits here, then finds it done.
    claimed = _locked(session, import_id, with_file=True)
    if claimed is None:
        return None
    record, stored = claimed
    fmt = ImportFormat.UNKNOWN
    chunks: Generator[bytes] | None = None
    try:
        if stored is None:
            raise ReportError("the uploaded file is missing: nothing was stored for this import")
        if stored.length > limits.max_upload_bytes:
            raise ReportError(limits.refusal("max_upload_bytes", stored.length))
        engine = session.get_bind().engine
        fmt = ImportFormat.detect(stored.head)
        if fmt is ImportFormat.UNKNOWN:
            raise ReportError(NOT_A_REPORT)
        upload = _upload(session, record)
        size = stored.length
        if fmt is ImportFormat.ARCHIVE:
            # Read once first, keeping nothing: a gzip bomb (or a link, a path outside...) is
            # refused having spooled and written nothing; the budget knows its real size.
            with closing(content_chunks(engine, stored.id, stored.length, stored.head)) as whole:
                size = unpacked_size(whole, limits)
        budget = Budget(limits, size + len(json.dumps(upload.metadata)))
        chunks = content_chunks(engine, stored.id, stored.length, stored.head)
        landed = land(session, upload, READERS[fmt](chunks, limits), budget)
    except ReportError as exc:
        transaction.abandon("the report cannot be imported")
        mark_error(session, import_id, str(exc), fmt)
        return Outcome(import_id, ImportStatus.ERROR, fmt, error=str(exc))
    finally:
        if chunks is not None:
            chunks.close()  # its connection back now, not whenever the generator is collected
    _mark_done(session, record, fmt, landed)
    return Outcome(import_id, ImportStatus.DONE, fmt, landed.results, landed.run_id)


@dataclass(frozen=True)
class _StoredFile:
    id: uuid.UUID
    length: int
    head: bytes  # its first CHUNK_SIZE bytes: most reports whole


@dataclass(frozen=True)
class _Claimed:
    """The import's row as read under its lock."""

    id: uuid.UUID
    data: dict[str, Any]
    created: datetime


# The statements every import runs, built once, with its values bound at each run: built anew
# for every import, a statement costs more to build and look up in the compiled cache than to
# run, and an import is mostly these when its report is small. Core rows, not ORM objects, for
# the same reason. The import's id is named unlike any column: in an UPDATE, a value named as a
# column is taken as that column's.
_IMPORT_ID = bindparam("claimed_import", type_=imports.c.id.type)
_LOCK = (
    select(imports.c.id, imports.c.data, imports.c.status, imports.c.created)
    .where(imports.c.id == _IMPORT_ID)
    .limit(1)
)
_LOCK_ALONE = _LOCK.with_for_update()
_LOCK_WITH_FILE = (
    _LOCK.add_columns(
        import_files.c.id,
        func.length(import_files.c.content),
        func.substr(import_files.c.content, 1, CHUNK_SIZE),
    )
    .outerjoin(
        import_files,
        and_(import_files.c.import_id == imports.c.id, import_files.c.content.is_not(None)),
    )
    .with_for_update(of=imports)
)
_MARK_RUNNING = (
    update(imports)
    .where(imports.c.id == _IMPORT_ID)
    .values(status=ImportStatus.RUNNING, data=bindparam("running"))
)
_MARK_DONE = (
    update(imports)
    .where(imports.c.id == _IMPORT_ID)
    .values(status=ImportStatus.DONE, format=bindparam("done_format"), data=bindparam("done"))
)


def _locked(
    session: Session, import_id: uuid.UUID, *, with_file: bool = False
) -> tuple[_Claimed, _StoredFile | None] | None:
    """The import's row, locked until the transaction ends, and (``with_file``) its stored
    file, None if nothing is stored; None if the import is missing or finished."""
    query = _LOCK_WITH_FILE if with_file else _LOCK_ALONE
    row = session.connection().execute(query, {"claimed_import": import_id}).first()
    if row is None:
        log.warning("import %s does not exist; nothing to do", import_id)
        return None
    if ImportStatus.finished(row.status):
        log.info("import %s is already %s; nothing to do", import_id, row.status)
        return None
    record = _Claimed(row.id, row.data or {}, row.created)
    if not with_file or row[4] is None:
        return record, None
    return record, _StoredFile(row[4], int(row[5]), bytes(row[6] or b""))


def find_import(session: Session, file_id: uuid.UUID) -> uuid.UUID | None:
    """The import that ``file_id`` names: an import's id, or one of its import_files' ids."""
    if session.get(Import, file_id) is not None:
        return file_id
    return session.scalar(select(ImportFile.import_id).where(ImportFile.id == file_id))


def _upload(session: Session, record: _Claimed) -> Upload:
    """What the import record (as the API stored it) says about its upload."""
    data = record.data
    project_id = None
    if data.get("project_id"):
        try:
            project_id = uuid.UUID(str(data["project_id"]))
        except ValueError:
            raise ReportError(
                f"the import's project_id {quoted(data['project_id'])} is not a UUID"
            ) from None
        if session.get(Project, project_id) is None:
            raise ReportError(f"the import's project {project_id} does not exist")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ReportError("the import's metadata must be a JSON object")
    source = data.get("source")
    return Upload(
        import_id=record.id,
        project_id=project_id,
        source=source if isinstance(source, str) and source else None,
        metadata=metadata,
        created=record.created,
    )


# The stored report in slices, from a server-side cursor. PostgreSQL keeps a large bytea
# compressed, and a slice of a compressed value costs decompressing everything before it: read
# slice by slice, a report would cost the square of its size (34 GB decompressed for 250 MB).
# Here it is decompressed once (substr from 1, in a subquery kept apart by OFFSET 0) and each
# slice cut from it, in order.
_SLICES = text(
    "SELECT substr(report.content, slice, :size) FROM ("
    "SELECT substr(content, 1) AS content FROM import_files WHERE id = :id OFFSET 0"
    ") AS report CROSS JOIN LATERAL generate_series(:start, :length, :size) AS slice"
)


def content_chunks(
    engine: Engine, import_file_id: uuid.UUID, length: int, head: bytes = b""
) -> Generator[bytes]:
    """The stored report in CHUNK_SIZE slices, so the whole file is never in memory at once;
    ``head``, its first bytes as already read, first.

    The rest is read on a connection of its own (none when ``head`` is the whole report): the
    import's connection is busy streaming a COPY while the reader asks for the next slice. The
    stored bytes never change, so no snapshot is shared.
    """
    if head:
        yield head
    if len(head) >= length:
        return
    connection = engine.connect()
    try:
        if engine.dialect.name == "postgresql":
            # One row at a time from a server-side cursor: one slice in memory, not all.
            rows = connection.execution_options(yield_per=1).execute(
                _SLICES,
                {
                    "id": import_file_id,
                    "start": len(head) + 1,
                    "length": length,
                    "size": CHUNK_SIZE,
                },
            )
            slices: Iterator[Any] = (chunk for (chunk,) in rows)
        else:  # SQLite stores it as it is: a slice costs its own size
            slices = (
                connection.scalar(
                    select(func.substr(ImportFile.content, offset + 1, CHUNK_SIZE)).where(
                        ImportFile.id == import_file_id
                    )
                )
                for offset in range(len(head), length, CHUNK_SIZE)
            )
        for chunk in slices:
            yield bytes(chunk or b"")
    finally:
        # The database may have gone away meanwhile: closing must not raise over that.
        with suppress(Exception):
            connection.close()


def _mark_done(session: Session, record: _Claimed, fmt: ImportFormat, landed: Landed) -> None:
    data = {key: value for key, value in record.data.items() if key != "error"}
    data.update(run_id=[str(landed.run_id)], result_count=landed.results)
    data["stored_bytes"] = landed.stored_bytes
    data["finished"] = utcnow().isoformat()
    if landed.warnings:
        data["warnings"] = list(landed.warnings)
    values = {"claimed_import": record.id, "done_format": fmt, "done": data}
    connection = session.connection()
    if connection.dialect.name == "postgresql":  # both in one statement, one round trip
        connection.execute(_MARK_DONE_AND_DROP, values)
    else:
        connection.execute(_MARK_DONE, values)
        connection.execute(_DROP_STORED, values)


def drop_stored_report(import_id: uuid.UUID | BindParameter[uuid.UUID]) -> Update:
    """The statement that drops an import's stored report: the report has served its purpose
    once the import is finished; the rows stay, the bytes go."""
    return update(import_files).where(import_files.c.import_id == import_id).values(content=None)


_DROP_STORED = drop_stored_report(_IMPORT_ID)
_MARK_DONE_AND_DROP = _MARK_DONE.add_cte(_DROP_STORED.returning(import_files.c.id).cte("cleared"))


def mark_error(
    session: Session,
    import_id: uuid.UUID,
    message: str,
    fmt: ImportFormat = ImportFormat.UNKNOWN,
) -> bool:
    """Record that an import failed, with a reason the uploader can act on; an import that is
    done stays done. True when the import was marked."""
    record = session.get(Import, import_id, with_for_update=True, populate_existing=True)
    if record is None or record.status == ImportStatus.DONE:
        return False
    record.status = ImportStatus.ERROR
    if fmt is not ImportFormat.UNKNOWN:
        record.format = fmt
    record.data = {**(record.data or {}), "error": message, "finished": utcnow().isoformat()}
    return True
