"""Finding the imports nobody will finish, for the periodic check the scheduler sends.

An import is judged abandoned only on evidence that holds for every importer sharing the
queue, ours and upstream 3.1.1's (a rolling update runs both for minutes or hours):

- **Its message is gone.** The broker holds no message for it: none waits in a queue (the
  shared one or ours) and no worker holds one taken and not acknowledged (ours while they
  run, upstream's while prefetched). A message still there will be run, or handed back after
  its worker's visibility timeout, by the broker's own rule.
- **No worker runs it.** Ours holds the import's row locked from start to end: a locked row
  is a live import. Upstream's importer holds no lock (it commits after every result) and
  acknowledges its message before it starts, so while upstream's workers are about
  (``ibutsu_server.fleet``: seen within its grace period) a running import without a lock may
  be one of theirs, and is left alone; once none has been seen for the grace period, it is
  judged like ours.

Then:

- **Running, its worker gone** (and started more than RUNNING_GRACE_SECONDS ago): back to
  ``pending`` and queued again, up to ``IBUTSU_IMPORT_MAX_DELIVERIES`` times; then it ends
  ``error`` with the reason.
- **Pending, its message gone** (lost where nothing acknowledges it: taken off the queue as
  the broker shut down, a producer that died between storing and sending), older than
  PENDING_GRACE_SECONDS: queued again.

An import is queued again exactly as the API queued it, under the name every worker
registers (``run_junit_import`` or ``run_archive_import``) with the import record as its
argument (:class:`Requeue`), so that whichever worker takes it runs it. The reason goes where
the API shows it: ``imports.data.recovered`` (or ``error``). Domain code: nothing here
commits; the caller sends the returned imports once its transaction commits.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Import, ImportFile, ImportStatus, utcnow
from ibutsu_server.settings import ImportLimits
from ibutsu_worker.importing.job import mark_error
from ibutsu_worker.submission import import_record, import_task_name

log = logging.getLogger(__name__)

RUNNING_GRACE_SECONDS = 60
PENDING_GRACE_SECONDS = 300


class Evidence(Protocol):
    """What the broker and the fleet say, asked only when an import needs judging."""

    def held_ids(self) -> set[str] | None:
        """Ids of the imports the broker holds a message for (queued, or taken and not
        acknowledged); None when it cannot be read (nothing is judged then)."""

    def upstream_present(self) -> bool | None:
        """Whether upstream's workers were seen within the grace period; None when the
        broker cannot tell (taken as yes)."""


@dataclass(frozen=True)
class Requeue:
    """An import to queue again: the API's task name and argument for it."""

    import_id: uuid.UUID
    task: str
    record: dict[str, Any]


@dataclass
class Recovery:
    """What the check found: imports to queue again, imports given up, and running imports
    left alone because upstream's workers are about."""

    requeue: list[Requeue] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    left_to_upstream: list[uuid.UUID] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "requeued": [str(item.import_id) for item in self.requeue],
            "failed": [str(key) for key in self.failed],
            "left_to_upstream": [str(key) for key in self.left_to_upstream],
        }


def _started(record: Import) -> datetime:
    started = (record.data or {}).get("started")
    try:
        return datetime.fromisoformat(started) if started else record.created
    except ValueError:
        return record.created


class _Asked:
    """The evidence, each part asked at most once per check."""

    def __init__(self, evidence: Evidence) -> None:
        self.evidence = evidence
        self._held: tuple[set[str] | None] | None = None
        self._upstream: tuple[bool | None] | None = None

    def held(self) -> set[str] | None:
        if self._held is None:
            self._held = (self.evidence.held_ids(),)
        return self._held[0]

    def upstream(self) -> bool:
        if self._upstream is None:
            self._upstream = (self.evidence.upstream_present(),)
        return self._upstream[0] is not False


def recover(
    session: Session, limits: ImportLimits, evidence: Evidence, now: datetime | None = None
) -> Recovery:
    """Find orphaned running imports and pending ones without a message (see the module)."""
    now = now or utcnow()
    found = Recovery()
    asked = _Asked(evidence)
    queued: list[Import] = []
    running = session.scalars(
        select(Import)
        .where(Import.status == ImportStatus.RUNNING)
        .with_for_update(skip_locked=True)  # a live import of ours has its row locked: skipped
    ).all()
    for record in running:
        if _started(record) > now - timedelta(seconds=RUNNING_GRACE_SECONDS):
            continue  # between its first commit and its lock: too young to judge
        held = asked.held()
        if held is None or str(record.id) in held:
            continue  # its message will be run, or handed back, by the broker's rule
        if asked.upstream():
            found.left_to_upstream.append(record.id)
            continue
        data = record.data or {}
        times_lost = int(data.get("requeues", 0)) + 1
        if times_lost > limits.max_deliveries:
            message = (
                f"its worker was lost {times_lost - 1} times while importing it; given up "
                "(IBUTSU_IMPORT_MAX_DELIVERIES)"
            )
            mark_error(session, record.id, message)
            found.failed.append(record.id)
            continue
        record.status = ImportStatus.PENDING
        record.data = {
            **data,
            "requeues": times_lost,
            "recovered": f"its worker was lost; queued again at {now.isoformat()}",
        }
        queued.append(record)
    stale = session.scalars(
        select(Import)
        .where(
            Import.status == ImportStatus.PENDING,
            Import.created < now - timedelta(seconds=PENDING_GRACE_SECONDS),
            Import.id.not_in([record.id for record in queued]),
        )
        .with_for_update(skip_locked=True)
    ).all()
    present = asked.held() if stale else set()
    for record in stale:
        if present is None or str(record.id) in present:
            continue
        record.data = {
            **(record.data or {}),
            "recovered": f"its message was lost; queued again at {now.isoformat()}",
        }
        queued.append(record)
    found.requeue = [_requeue(session, record) for record in queued]
    if found.requeue or found.failed:
        log.warning(
            "recover_imports: %d queued again, %d given up", len(found.requeue), len(found.failed)
        )
    if found.left_to_upstream:
        log.info(
            "recover_imports: %d running import(s) without a worker of ours left alone while "
            "upstream's workers are about (they hold no lock)",
            len(found.left_to_upstream),
        )
    return found


def _requeue(session: Session, record: Import) -> Requeue:
    """The message the API sent for ``record``, to send again."""
    session.flush()  # the record as it will be committed: pending, with its reason
    head = session.scalar(
        select(func.substr(ImportFile.content, 1, 2))
        .where(ImportFile.import_id == record.id, ImportFile.content.is_not(None))
        .limit(1)
    )
    task = import_task_name(bytes(head or b""), record.filename)
    return Requeue(record.id, task, import_record(record))
