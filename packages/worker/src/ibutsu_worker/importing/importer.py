"""One import, exactly once: lock it, parse its stored report, land the run whole or not at all."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Import, ImportFile, ImportStatus, Project, Run, utcnow
from ibutsu_server.settings import ImportLimits
from ibutsu_worker.importing.archive import import_archive
from ibutsu_worker.importing.context import ImportContext, Landed
from ibutsu_worker.importing.errors import ReportError
from ibutsu_worker.importing.junit import NOT_A_REPORT, JUnitParser
from ibutsu_worker.importing.store import ResultWriter, dialect_insert
from ibutsu_worker.summaries import update_run_summary

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"


def detect_format(head: bytes) -> str:
    """'junit' or 'archive' from the first bytes of the content, never from the file name."""
    if head.startswith(GZIP_MAGIC):
        return "archive"
    if head.removeprefix(_UTF8_BOM).lstrip().startswith(b"<"):
        return "junit"
    raise ReportError(NOT_A_REPORT)


def content_chunks(engine: Engine, import_file_id: uuid.UUID, length: int) -> Iterator[bytes]:
    """The stored report in CHUNK_SIZE slices, so the whole file is never in memory at once.

    Read on a connection of its own: the import's connection is busy streaming a COPY while
    the parser asks for the next slice. The stored bytes never change, so no snapshot is shared.
    """
    with engine.connect() as connection:
        for offset in range(0, length, CHUNK_SIZE):
            chunk = connection.scalar(
                select(func.substr(ImportFile.content, offset + 1, CHUNK_SIZE)).where(
                    ImportFile.id == import_file_id
                )
            )
            yield bytes(chunk or b"")


def _project_id(session: Session, name: str | None) -> uuid.UUID | None:
    if not name:
        return None
    # Imports running at once may create the same project: the second one uses the first's row.
    session.execute(
        dialect_insert(session, Project)
        .values(id=uuid.uuid4(), name=name, title=name)
        .on_conflict_do_nothing(index_elements=["name"])
    )
    return session.scalar(select(Project.id).where(Project.name == name))


def claim(session: Session, import_id: uuid.UUID) -> bool:
    """Mark a pending (or interrupted) import as running; False when there is nothing to do."""
    record = session.get(Import, import_id, with_for_update=True)
    if record is None:
        log.warning("import %s does not exist; nothing to do", import_id)
        return False
    if record.status in (ImportStatus.DONE, ImportStatus.FAILED):
        log.info("import %s is already %s; nothing to do", import_id, record.status)
        return False
    record.status = ImportStatus.RUNNING
    record.started = utcnow()
    return True


def run_import(
    session: Session, import_id: uuid.UUID, limits: ImportLimits
) -> dict[str, Any] | None:
    """Import the report of ``import_id`` inside the session's transaction.

    The import row stays locked until the caller commits, so a second delivery of the same
    task waits and then finds the import done. Raises ReportError for bad input.
    """
    record = session.get(Import, import_id, with_for_update=True, populate_existing=True)
    if record is None or record.status in (ImportStatus.DONE, ImportStatus.FAILED):
        return None
    stored = session.execute(
        select(ImportFile.id, func.length(ImportFile.content)).where(
            ImportFile.import_id == import_id
        )
    ).first()
    if stored is None or stored[1] is None:
        raise ReportError("the uploaded file is missing: nothing was stored for this import")
    file_id: uuid.UUID = stored[0]
    length = int(stored[1])
    if length > limits.max_upload_bytes:
        raise ReportError(
            f"the report is {length} bytes, over the upload limit of {limits.max_upload_bytes} "
            "bytes (IBUTSU_IMPORT_MAX_UPLOAD_BYTES)"
        )
    chunks = content_chunks(session.get_bind().engine, file_id, length)
    head = next(chunks, b"")
    fmt = detect_format(head)
    info = record.data or {}
    context = ImportContext(
        session=session,
        import_id=import_id,
        project_id=_project_id(session, info.get("project")),
        info=info,
        limits=limits,
    )
    try:
        landed = IMPORTERS[fmt](context, _prepend(head, chunks))
    except ReportError as exc:
        exc.format = fmt
        raise
    session.flush()
    summary = update_run_summary(session, landed.run_id)

    record.format = fmt
    record.status = ImportStatus.DONE
    record.run_id = landed.run_id
    record.result_count = landed.results
    record.message = None
    record.finished = utcnow()
    # The report has served its purpose; keep the row, drop the bytes.
    session.execute(update(ImportFile).where(ImportFile.id == file_id).values(content=None))
    return {
        "run_id": str(landed.run_id),
        "format": fmt,
        "results": landed.results,
        "summary": summary,
    }


def import_junit(context: ImportContext, chunks: Iterator[bytes]) -> Landed:
    """A JUnit report becomes one new run; results are streamed into it in batches."""
    info = context.info
    run = Run(
        project_id=context.project_id,
        component=info.get("component"),
        env=info.get("env"),
        source=info.get("source"),
        data={"import_id": str(context.import_id), **(info.get("metadata") or {})},
    )
    context.session.add(run)
    context.session.flush()
    writer = ResultWriter(
        context.session,
        run_id=run.id,
        project_id=context.project_id,
        component=run.component,
        env=run.env,
        source=run.source,
    )
    parser = JUnitParser(max_results=context.limits.max_results)
    writer.add_all(parser.parse(chunks))
    run.data = {**(run.data or {}), "suites": parser.suite_names[:100]}
    if parser.suite_properties:
        run.data["properties"] = parser.suite_properties
    return Landed(run_id=run.id, results=writer.written)


IMPORTERS: dict[str, Callable[[ImportContext, Iterator[bytes]], Landed]] = {
    "junit": import_junit,
    "archive": import_archive,
}


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def mark_failed(session: Session, import_id: uuid.UUID, message: str) -> None:
    """Record a failed import with a message the uploader can act on."""
    session.execute(
        update(Import)
        .where(Import.id == import_id, Import.status != ImportStatus.DONE)
        .values(status=ImportStatus.FAILED, message=message, finished=utcnow(), result_count=0)
    )
