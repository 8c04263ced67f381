"""Finding the imports nobody will finish, for the periodic check the scheduler sends.

- **Running, its worker gone.** A live import holds its row locked from start to end, so a
  running import that can be locked (and started more than RUNNING_GRACE_SECONDS ago) has no
  worker: a killed pod, a lost node, a task that died with the database away. It goes back to
  ``pending`` and is queued again, up to ``IBUTSU_IMPORT_MAX_DELIVERIES`` times; then it ends
  ``error`` with the reason.
- **Pending, its message gone.** A message can be lost where nothing acknowledges it (taken off
  the queue as the broker shut down, a producer that died between storing and sending). A
  pending import older than PENDING_GRACE_SECONDS that no message in the broker names is queued
  again.

The reason goes where the API shows it: ``imports.data.recovered`` (or ``error``). Domain code:
nothing here commits; the caller sends the returned imports once its transaction commits.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Import, ImportStatus, utcnow
from ibutsu_server.settings import ImportLimits
from ibutsu_worker.importing.job import mark_error

log = logging.getLogger(__name__)

RUNNING_GRACE_SECONDS = 60
PENDING_GRACE_SECONDS = 300


@dataclass
class Recovery:
    """What the check found: imports to queue again, imports given up."""

    requeue: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "requeued": [str(key) for key in self.requeue],
            "failed": [str(key) for key in self.failed],
        }


def _started(record: Import) -> datetime:
    started = (record.data or {}).get("started")
    try:
        return datetime.fromisoformat(started) if started else record.created
    except ValueError:
        return record.created


def recover(
    session: Session,
    limits: ImportLimits,
    queued_ids: Callable[[], set[str] | None],
    now: datetime | None = None,
) -> Recovery:
    """Find orphaned running imports and pending ones without a message (see the module)."""
    now = now or utcnow()
    found = Recovery()
    running = session.scalars(
        select(Import)
        .where(Import.status == ImportStatus.RUNNING)
        .with_for_update(skip_locked=True)  # a live import's row is locked: skipped
    ).all()
    for record in running:
        if _started(record) > now - timedelta(seconds=RUNNING_GRACE_SECONDS):
            continue  # between its first commit and its lock: too young to judge
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
        found.requeue.append(record.id)
    stale = session.scalars(
        select(Import)
        .where(
            Import.status == ImportStatus.PENDING,
            Import.created < now - timedelta(seconds=PENDING_GRACE_SECONDS),
            Import.id.not_in(found.requeue),
        )
        .with_for_update(skip_locked=True)
    ).all()
    # None: the broker cannot be read so, and nothing is sent again on a guess.
    present = queued_ids() if stale else set()
    unsent = [r for r in stale if present is not None and str(r.id) not in present]
    for record in unsent:
        record.data = {
            **(record.data or {}),
            "recovered": f"its message was lost; queued again at {now.isoformat()}",
        }
        found.requeue.append(record.id)
    if found.requeue or found.failed:
        log.warning(
            "recover_imports: %d queued again, %d given up", len(found.requeue), len(found.failed)
        )
    return found
