"""What an import keeps aside in temporary files until it can be written: results that came
before their run, and artifacts, which are written once every result exists. Each spool keeps
SPOOL_MEMORY in memory, the rest on disk; artifact contents go from the reader to the spool (and
from it to the database) in slices of SLICE_BYTES, never whole in memory, each slice charged to
the upload's budget before it is written.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Iterator
from datetime import datetime
from types import TracebackType
from typing import IO, Self

from ibutsu_worker.importing.budget import Budget
from ibutsu_worker.importing.errors import ReportError
from ibutsu_worker.importing.records import ArtifactRecord, FileContent, ResultRecord

# Each spool keeps this much in memory, the rest in a temporary file.
SPOOL_MEMORY = 2 * 1024 * 1024
# Spooled artifacts are due to be written once they add up to this much (see ArtifactSpool.full).
SPOOL_FLUSH_BYTES = 32 * 1024 * 1024
# Artifact contents are copied and sent in slices of this many bytes.
SLICE_BYTES = 1024 * 1024
# An artifact row's ids, metadata and date, besides its name and content.
ARTIFACT_ROW_BYTES = 200


def slices(content: FileContent) -> Iterator[bytes]:
    """``content`` read in slices of at most SLICE_BYTES; ReportError if it ends early."""
    left = content.size
    while left > 0:
        piece = content.file.read(min(left, SLICE_BYTES))
        if not piece:
            raise ReportError("an artifact ended before its stated size (a cut-off upload?)")
        left -= len(piece)
        yield piece


class _Spool:
    """A temporary file, in memory up to SPOOL_MEMORY; closed on leaving ``with``."""

    def __init__(self) -> None:
        self.file: IO[bytes] = tempfile.SpooledTemporaryFile(SPOOL_MEMORY)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.file.close()

    def _clear(self) -> None:
        self.file.seek(0)
        self.file.truncate()


class EarlyResults(_Spool):
    """Results that came before their run (an archive may hold its run.json last), one JSON
    line each, replayed once the run is open."""

    def add(self, record: ResultRecord) -> None:
        """Keep ``record`` until :meth:`replay`, but for its ``artifacts``: a report whose
        results may come first (an archive) sends its artifacts as records of their own."""
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
        self.file.write(json.dumps(fields).encode() + b"\n")

    def replay(self) -> Iterator[ResultRecord]:
        """The results kept, in the order they came; the spool is empty once they are all
        read."""
        self.file.seek(0)
        for line in self.file:
            fields = json.loads(line)
            start = fields.pop("start_time")
            yield ResultRecord(
                **{**fields, "id": uuid.UUID(fields["id"])},
                start_time=datetime.fromisoformat(start) if start else None,
            )
        self._clear()


class ArtifactSpool(_Spool):
    """Artifacts as they come, each a JSON header line and its content, charged to ``budget``
    as they are written here (this is where an artifact's bytes are first stored)."""

    def __init__(self, budget: Budget) -> None:
        super().__init__()
        self.budget = budget
        # Results whose artifacts are spooled but which the report has not reached yet.
        self.awaited: set[uuid.UUID] = set()

    def add(self, record: ArtifactRecord) -> None:
        """Write the artifact, its content in slices, each charged before it is written; its
        content's file is closed."""
        charge = self.budget.charge
        charge(len(record.filename) + ARTIFACT_ROW_BYTES)
        header = {
            "result_id": str(record.result_id) if record.result_id else None,
            "filename": record.filename,
            "content_type": record.content_type,
            "size": record.size,
        }
        self.file.write(json.dumps(header).encode() + b"\n")
        content = record.content
        if isinstance(content, bytes):
            charge(len(content), rows=0)
            self.file.write(content)
        else:
            with content.file:
                for piece in slices(content):
                    charge(len(piece), rows=0)
                    self.file.write(piece)
        if record.before_result and record.result_id is not None:
            self.awaited.add(record.result_id)

    def arrived(self, result_id: uuid.UUID) -> None:
        """The result ``result_id`` was reached: its spooled artifacts no longer wait for it."""
        self.awaited.discard(result_id)

    @property
    def empty(self) -> bool:
        """Nothing spooled since the spool was last emptied."""
        return not self.file.tell()

    @property
    def full(self) -> bool:
        """Past SPOOL_FLUSH_BYTES, with no artifact waiting for a result still to come: a
        writer that can may write the spool out now, so it stays small."""
        return not self.awaited and self.file.tell() >= SPOOL_FLUSH_BYTES

    def drain(self) -> Iterator[ArtifactRecord]:
        """Every spooled artifact, in the order it came, its content the spool itself (to be
        read before the next one); the spool is empty once they are all read."""
        self.file.seek(0)
        while line := self.file.readline():
            header = json.loads(line)
            yield ArtifactRecord(
                filename=header["filename"],
                content=FileContent(self.file, header["size"]),
                result_id=uuid.UUID(header["result_id"]) if header["result_id"] else None,
                content_type=header["content_type"],
            )
        self._clear()
