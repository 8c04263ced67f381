"""What readers produce: plain records, independent of the database.

A reader turns a report into a stream of these; the landing (``importing.landing``) writes
them. Values are already checked and normalised: timestamps naive UTC, durations finite and
non-negative, names within their limits.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any


@dataclass
class RunRecord:
    """The run a report describes. ``id`` is None when the report keeps no run id (JUnit).
    ``duration`` is the report's own total, if it states one (a JUnit root's ``time``, an
    archive's ``run.json``)."""

    id: uuid.UUID | None = None
    start_time: datetime | None = None
    duration: float | None = None
    component: str | None = None
    env: str | None = None
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: How many tests the client collected (pytest-ibutsu's summary.collected), if it says.
    collected: int | None = None
    #: The project the report names (an id or a name), checked against the import's.
    project: str | None = None


@dataclass
class RunUpdate:
    """What a reader learned about the run after it was opened, sent after the last result:
    more metadata (a later suite's properties; keys the run already has keep their value),
    warnings about values it could not use, for the import to show, and the run's total time
    when only its parts state it (the sum of a JUnit report's top suites' ``time``)."""

    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    duration: float | None = None


@dataclass
class FileContent:
    """Content too big to hold in memory: the first ``size`` bytes of ``file`` from where it
    stands (a temporary file, or an archive member), read once by whoever writes it, who then
    closes it."""

    file: IO[bytes]
    size: int


@dataclass
class ArtifactRecord:
    """A file belonging to a result (``result_id``) or, without one, to the run."""

    filename: str
    content: bytes | FileContent
    result_id: uuid.UUID | None = None
    content_type: str = "text/plain"
    #: Its result comes later in the report (an archive may hold a result's files first).
    before_result: bool = False

    @property
    def size(self) -> int:
        """The content's length in bytes."""
        return len(self.content) if isinstance(self.content, bytes) else self.content.size


@dataclass
class ResultRecord:
    """One test result as read from a report."""

    test_id: str
    result: str
    start_time: datetime | None = None
    duration: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    #: The suite (JUnit) a result came from: its source unless the upload names one.
    source: str | None = None
    component: str | None = None
    env: str | None = None
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    #: Written after the result (traceback, system-out, system-err of a JUnit case).
    artifacts: list[ArtifactRecord] = field(default_factory=list)


Record = RunRecord | ResultRecord | ArtifactRecord | RunUpdate
