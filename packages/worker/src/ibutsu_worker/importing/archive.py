"""pytest-ibutsu archives (.tar.gz): ``<run-uuid>/run.json``,
``<run-uuid>/<result-uuid>/result.json`` and artifacts beside them (``<run-uuid>/<file>`` for the
run, ``<run-uuid>/<result-uuid>/<file>`` for a result).

The archive is inflated and read member by member as the chunks arrive, so it is never whole in
memory. The run and its results keep their archive ids and are upserted, so importing the same
archive again updates rows instead of duplicating them; the run's artifacts are replaced.
Members may come in any order: results read before run.json wait in a spool file, and artifacts
are spooled and written last, once every result they may belong to exists.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tarfile
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from datetime import datetime
from typing import IO, Any, Self

from sqlalchemy import delete, insert, or_, select
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Artifact, Project, Result, ResultOutcome, Run
from ibutsu_worker.importing.context import ImportContext, Landed
from ibutsu_worker.importing.errors import ReportError
from ibutsu_worker.importing.junit import parse_timestamp
from ibutsu_worker.importing.records import ParsedResult
from ibutsu_worker.importing.store import BULK_OPTIONS, ResultWriter, upsert

COPY_CHUNK = 1024 * 1024
# tarfile reads an extended (pax or GNU long name) header whole; real ones hold a path and a
# few fields, so anything bigger is an attempt to make the worker allocate.
MAX_EXTENDED_HEADER = 1024 * 1024
# Each spool keeps this much in memory, the rest in a temporary file.
SPOOL_MEMORY = 8 * 1024 * 1024
# Parsed result.json documents are written once this much JSON is buffered, even before the
# writer's BATCH_SIZE rows, so large documents cannot pile up in memory.
RESULT_BATCH_BYTES = 16 * 1024 * 1024
# Artifacts are inserted in groups of at most this many bytes (or one bigger artifact) and rows.
ARTIFACT_BATCH_BYTES = 8 * 1024 * 1024
ARTIFACT_BATCH_ROWS = 500
# The width of artifacts.filename and of the component, env and source columns.
MAX_NAME = 255

_GZIP_WBITS = 16 + zlib.MAX_WBITS
_OUTCOMES = frozenset(outcome.value for outcome in ResultOutcome)
_EXTENDED_TYPES = {
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
}
_ALLOWED_TYPES = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, *_EXTENDED_TYPES}
_REFUSED_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}


def import_archive(context: ImportContext, chunks: Iterator[bytes]) -> Landed:
    """Import a pytest-ibutsu archive into ``context.session``'s transaction.

    Raises ReportError, naming the limit and its variable where one applies, for anything that
    is not a safe, well-formed archive; the caller's rollback then leaves nothing behind.
    """
    with (
        tempfile.SpooledTemporaryFile(SPOOL_MEMORY) as early_results,
        tempfile.SpooledTemporaryFile(SPOOL_MEMORY) as artifacts,
    ):
        archive = _Archive(context, early_results, artifacts)
        archive.read(chunks)
        return archive.land()


class _Inflater(io.RawIOBase):
    """The archive's tar stream, gunzipped as tarfile reads it and pulled from the chunks on
    demand. Every byte it produces (headers, padding and skipped data included) counts against
    the limit, so the headers' sizes are never taken on trust."""

    def __init__(self, chunks: Iterator[bytes], limit: int) -> None:
        super().__init__()
        self._chunks = chunks
        self._zlib = zlib.decompressobj(_GZIP_WBITS)
        self._input = b""
        self._limit = limit
        self._total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not len(view):
            return 0
        while True:
            try:
                # max_length bounds what one call can inflate, however well the input packs.
                data = self._zlib.decompress(self._input, len(view))
            except zlib.error as exc:
                raise ReportError(f"corrupt archive: the gzip data is damaged ({exc})") from None
            self._input = self._zlib.unconsumed_tail
            if data:
                self._total += len(data)
                if self._total > self._limit:
                    raise ReportError(
                        f"the archive unpacks to more than {self._limit} bytes "
                        "(IBUTSU_IMPORT_MAX_ARCHIVE_BYTES)"
                    )
                view[: len(data)] = data
                return len(data)
            if self._zlib.eof:
                # As with tarfile's own "r|gz", anything after the first gzip member is ignored.
                return 0
            chunk = next(self._chunks, None)
            if chunk is None:
                raise ReportError("corrupt archive: the gzip data ends early (a cut-off upload?)")
            self._input = chunk

    def drain(self) -> None:
        """Inflate to the end of the gzip data, so its checksum and length are verified."""
        sink = bytearray(COPY_CHUNK)
        while self.readinto(sink):
            pass


class _CheckedInfo(tarfile.TarInfo):
    """Refuses links, devices and oversized extended headers as each header is decoded,
    before tarfile acts on it."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        info = super().frombuf(buf, encoding, errors)
        if info.type not in _ALLOWED_TYPES:
            kind = _REFUSED_KINDS.get(info.type, f"of tar type {info.type!r}")
            raise ReportError(
                f"refused {info.name!r}: it is {kind}; an Ibutsu archive holds only files "
                "and folders"
            )
        if info.type in _EXTENDED_TYPES and info.size > MAX_EXTENDED_HEADER:
            raise ReportError(
                f"refused {info.name!r}: an extended tar header of {info.size} bytes "
                f"(at most {MAX_EXTENDED_HEADER})"
            )
        return info


class _Archive:
    """The state of one archive import while its members stream past."""

    def __init__(
        self, context: ImportContext, early_results: IO[bytes], artifacts: IO[bytes]
    ) -> None:
        self.context = context
        self.session: Session = context.session
        self.limits = context.limits
        self.run_id: uuid.UUID | None = None  # the run folder's name, from the first member
        self.writer: ResultWriter | None = None  # exists once run.json has been written
        self.results = 0
        self.unflushed_bytes = 0
        self.early_results = early_results
        self.artifacts = artifacts

    def read(self, chunks: Iterator[bytes]) -> None:
        """Read every member in archive order, writing the run and results as they come."""
        stream = _Inflater(chunks, self.limits.max_archive_bytes)
        members = 0
        try:
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_CheckedInfo) as tar:
                while (member := tar.next()) is not None:
                    # tarfile keeps every member it has read (in an attribute typeshed leaves
                    # out); this import never looks back, so memory stays flat.
                    tar.members.clear()  # type: ignore[attr-defined]
                    members += 1
                    if members > self.limits.max_archive_members:
                        raise ReportError(
                            f"the archive has more than {self.limits.max_archive_members} "
                            "members (IBUTSU_IMPORT_MAX_ARCHIVE_MEMBERS)"
                        )
                    self._member(tar, member)
            stream.drain()
        except tarfile.TarError as exc:
            raise ReportError(f"corrupt archive: not a readable tar.gz ({exc})") from None
        except RecursionError:
            # tarfile follows each extended header into the next header by recursion.
            raise ReportError("refused: the archive chains too many extended tar headers") from None

    def land(self) -> Landed:
        """Write what is still buffered, then replace the run's artifacts."""
        if self.run_id is None or self.writer is None:
            raise ReportError("not an Ibutsu archive: there is no <run-uuid>/run.json")
        self.writer.flush()
        self._replace_artifacts(self.run_id)
        return Landed(run_id=self.run_id, results=self.writer.written)

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        if name.startswith("/"):
            raise ReportError(f"refused {name!r}: absolute paths are not allowed in an archive")
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise ReportError(f"refused {name!r}: '..' would leave the run folder")
        if parts:
            self._check_run_folder(name, parts[0])
        if member.isdir():
            return
        if len(parts) < 2:
            raise ReportError(
                f"refused {name!r}: a file outside the run folder (expected <run-uuid>/run.json, "
                "<run-uuid>/<result-uuid>/result.json and artifacts beside them)"
            )
        if member.size > self.limits.max_artifact_bytes:
            raise ReportError(
                f"{name} is {member.size} bytes, over the limit of "
                f"{self.limits.max_artifact_bytes} bytes per file "
                "(IBUTSU_IMPORT_MAX_ARTIFACT_BYTES)"
            )
        source = tar.extractfile(member)
        assert source is not None  # a regular file: links and devices were refused
        if len(parts) == 2 and parts[1] == "run.json":
            self._run(name, _load_json(source.read(), name))
            return
        if len(parts) == 2:
            self._spool_artifact(None, parts[1], member, source)
            return
        result_id = _parse_uuid(parts[1])
        if result_id is None:
            raise ReportError(
                f"refused {name!r}: {parts[1]!r} is not a result folder (named after the "
                "result's UUID)"
            )
        filename = "/".join(parts[2:])
        if filename == "result.json":
            self._result(result_id, name, source.read())
        else:
            self._spool_artifact(result_id, filename, member, source)

    def _check_run_folder(self, name: str, folder: str) -> None:
        run_id = _parse_uuid(folder)
        if run_id is None:
            raise ReportError(
                f"refused {name!r}: the archive's top folder must be named after its run's UUID"
            )
        if self.run_id is None:
            self.run_id = run_id
        elif run_id != self.run_id:
            raise ReportError(
                f"refused {name!r}: a second run folder; an Ibutsu archive holds exactly one "
                f"run ({self.run_id})"
            )

    def _run(self, where: str, doc: dict[str, Any]) -> None:
        assert self.run_id is not None  # set from this member's own folder
        if self.writer is not None:
            raise ReportError(f"{where}: the archive holds run.json twice")
        _check_id(doc, "id", self.run_id, where)
        info = self.context.info
        values: dict[str, Any] = {
            "id": self.run_id,
            "project_id": _archive_project(self.session, doc, where) or self.context.project_id,
            "start_time": _timestamp(doc, "start_time", where),
            "duration": _seconds(doc, "duration", where),
            "component": _name(doc, "component", where) or info.get("component"),
            "env": _name(doc, "env", where) or info.get("env"),
            "source": _name(doc, "source", where) or info.get("source"),
            "data": {
                **(info.get("metadata") or {}),
                **_mapping(doc, "metadata", where),
                "import_id": str(self.context.import_id),
            },
        }
        upsert(self.session, Run, [values], owner="project_id")
        self.writer = ResultWriter(
            self.session,
            run_id=self.run_id,
            project_id=values["project_id"],
            component=info.get("component"),
            env=info.get("env"),
            source=info.get("source"),
            upsert=True,
        )
        self.early_results.seek(0)
        for line in self.early_results:
            result_id, result_where, result_doc = json.loads(line)
            self._add_result(uuid.UUID(result_id), result_where, result_doc, len(line))

    def _result(self, result_id: uuid.UUID, where: str, content: bytes) -> None:
        self.results += 1
        if self.results > self.limits.max_results:
            raise ReportError(
                f"too many results: the limit is {self.limits.max_results} per import "
                "(IBUTSU_IMPORT_MAX_RESULTS)"
            )
        doc = _load_json(content, where)
        if self.writer is None:
            # The run's row must exist first; json.dumps writes no raw newline.
            line = json.dumps([str(result_id), where, doc]).encode() + b"\n"
            self.early_results.write(line)
        else:
            self._add_result(result_id, where, doc, len(content))

    def _add_result(self, result_id: uuid.UUID, where: str, doc: dict[str, Any], size: int) -> None:
        assert self.writer is not None
        assert self.run_id is not None
        _check_id(doc, "id", result_id, where)
        _check_id(doc, "run_id", self.run_id, where)
        outcome = doc.get("result")
        if not isinstance(outcome, str) or outcome not in _OUTCOMES:
            raise ReportError(
                f"{where}: result is {outcome!r}, expected one of {', '.join(ResultOutcome)}"
            )
        test_id = doc.get("test_id")
        if not isinstance(test_id, str) or not test_id:
            raise ReportError(f"{where}: test_id is missing or not a string")
        parsed = ParsedResult(
            id=result_id,
            test_id=test_id,
            result=outcome,
            start_time=_timestamp(doc, "start_time", where),
            duration=_seconds(doc, "duration", where),
            params=_mapping(doc, "params", where),
            metadata=_mapping(doc, "metadata", where),
        )
        # The result's own component, env and source win over the uploader's.
        own = {
            key: value
            for key in ("component", "env", "source")
            if (value := _name(doc, key, where))
        }
        self.writer.add(parsed, **own)
        self.unflushed_bytes += size
        if self.unflushed_bytes >= RESULT_BATCH_BYTES:
            self.writer.flush()
            self.unflushed_bytes = 0

    def _spool_artifact(
        self, result_id: uuid.UUID | None, filename: str, member: tarfile.TarInfo, source: IO[bytes]
    ) -> None:
        if len(filename) > MAX_NAME:
            raise ReportError(f"refused {member.name!r}: file names are at most {MAX_NAME} long")
        try:
            filename.encode()
        except UnicodeEncodeError:
            raise ReportError(f"refused {member.name!r}: the name is not valid UTF-8") from None
        header = {
            "result_id": str(result_id) if result_id else None,
            "filename": filename,
            "member": member.name,
            "size": member.size,
        }
        self.artifacts.write(json.dumps(header).encode() + b"\n")
        shutil.copyfileobj(source, self.artifacts, COPY_CHUNK)

    def _replace_artifacts(self, run_id: uuid.UUID) -> None:
        self.session.execute(
            delete(Artifact)
            .where(
                or_(
                    Artifact.run_id == run_id,
                    Artifact.result_id.in_(select(Result.id).where(Result.run_id == run_id)),
                )
            )
            # No Artifact objects are loaded, so there is nothing to synchronize (or to fetch).
            .execution_options(synchronize_session=False)
        )
        self.artifacts.seek(0)
        batch: list[tuple[str, dict[str, Any]]] = []
        batch_bytes = 0
        while line := self.artifacts.readline():
            header = json.loads(line)
            result_id = uuid.UUID(header["result_id"]) if header["result_id"] else None
            row = {
                "run_id": None if result_id else run_id,
                "result_id": result_id,
                "filename": header["filename"],
                "content": self.artifacts.read(header["size"]),
            }
            batch.append((header["member"], row))
            batch_bytes += header["size"]
            if batch_bytes >= ARTIFACT_BATCH_BYTES or len(batch) >= ARTIFACT_BATCH_ROWS:
                self._insert_artifacts(run_id, batch)
                batch, batch_bytes = [], 0
        self._insert_artifacts(run_id, batch)

    def _insert_artifacts(self, run_id: uuid.UUID, batch: list[tuple[str, dict[str, Any]]]) -> None:
        if not batch:
            return
        owners = {row["result_id"] for _, row in batch if row["result_id"] is not None}
        if owners:
            known = set(
                self.session.scalars(
                    select(Result.id).where(Result.run_id == run_id, Result.id.in_(owners))
                )
            )
            for member, row in batch:
                if row["result_id"] is not None and row["result_id"] not in known:
                    raise ReportError(
                        f"{member}: its folder has no result.json, so the artifact belongs to "
                        "no result"
                    )
        self.session.execute(
            insert(Artifact), [row for _, row in batch], execution_options=BULK_OPTIONS
        )


def _parse_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _check_id(doc: dict[str, Any], key: str, expected: uuid.UUID, where: str) -> None:
    """An id in a document may be left out, but must otherwise name its own folder."""
    value = doc.get(key)
    if value in (None, ""):
        return
    if not isinstance(value, str) or _parse_uuid(value) != expected:
        raise ReportError(f"{where}: {key} is {value!r}, but its folder says {expected}")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _load_json(content: bytes, where: str) -> dict[str, Any]:
    """A JSON object the database can store: no NaN or infinities, no NUL characters."""
    try:
        text = content.decode("utf-8-sig")
        doc = json.loads(text, parse_float=_finite, parse_constant=_finite)
    except RecursionError:
        raise ReportError(f"{where}: the JSON is nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError among them
        raise ReportError(f"{where}: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ReportError(f"{where}: expected a JSON object")
    # PostgreSQL refuses NUL in text and JSONB; look closer only if the escape appears at all.
    if "\\u0000" in text and _has_nul(doc):
        raise ReportError(f"{where}: contains a NUL character (\\u0000), which cannot be stored")
    return doc


def _has_nul(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _mapping(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ReportError(f"{where}: {key} must be a JSON object")
    return value


def _name(doc: dict[str, Any], key: str, where: str) -> str | None:
    value = doc.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise ReportError(f"{where}: {key} must be a string of at most {MAX_NAME} characters")
    return value


def _timestamp(doc: dict[str, Any], key: str, where: str) -> datetime | None:
    """An ISO 8601 date in UTC; one without a timezone is taken as UTC."""
    value = doc.get(key)
    if value is None or value == "":
        return None
    parsed = parse_timestamp(value) if isinstance(value, str) else None
    if parsed is None:
        raise ReportError(f"{where}: {key} {value!r} is not an ISO 8601 date")
    return parsed  # parse_timestamp gives UTC: SQLite drops offsets


def _seconds(doc: dict[str, Any], key: str, where: str) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):
            seconds = float(value)
            if math.isfinite(seconds) and seconds >= 0:
                return seconds
    raise ReportError(f"{where}: {key} must be a number of seconds, not {value!r}")


def _archive_project(session: Session, doc: dict[str, Any], where: str) -> uuid.UUID | None:
    """The project the archive's run names, if this server has it: the API's ``project_id``,
    or pytest-ibutsu's ``metadata.project`` (an id or a name)."""
    for value in (doc.get("project_id"), _mapping(doc, "metadata", where).get("project")):
        if not isinstance(value, str) or not value:
            continue
        project_id = _parse_uuid(value)
        condition = Project.id == project_id if project_id else Project.name == value
        found = session.scalar(select(Project.id).where(condition))
        if found is not None:
            return found
    return None
