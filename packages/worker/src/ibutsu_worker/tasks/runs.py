"""``ibutsu_server.tasks.runs``: keep run summaries true."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from celery import shared_task

from ibutsu_server.db.engine import after_commit
from ibutsu_server.db.models import utcnow
from ibutsu_server.ibutsu_task import IbutsuTask
from ibutsu_worker import metrics
from ibutsu_worker.summaries import UpdateOutcome, coalesced_update, stale_runs, update_requested

log = logging.getLogger(__name__)

UPDATE_RUN = "ibutsu_server.tasks.runs.update_run"


@shared_task(bind=True, ignore_result=True)
def update_run(self: IbutsuTask, run_id: str) -> None:
    """Recompute a run's summary with SQL aggregates; requests that arrive meanwhile are
    coalesced into exactly one more update."""
    key = uuid.UUID(str(run_id))
    outcome = coalesced_update(self.session, key)
    after_commit(self.session, lambda: metrics.SUMMARY_UPDATES.labels(outcome.value).inc())
    if outcome is UpdateOutcome.MISSING:
        log.info("update_run: run %s does not exist", key)
        return
    if outcome is UpdateOutcome.UPDATED:
        self.session.commit()
        # Asked for while we held the run: one more update covers every such request.
        if update_requested(self.session, key):
            self.send_after_commit(UPDATE_RUN, str(key))


@shared_task(bind=True)
def sync_aborted_runs(self: IbutsuTask, hours: int = 24) -> int:
    """Enqueue ``update_run`` for each recent run whose summary disagrees with its results
    (an import or a client that stopped half-way). Returns how many were enqueued."""
    stale = stale_runs(self.session, utcnow() - timedelta(hours=hours))
    for run_id in stale:
        self.send_after_commit(UPDATE_RUN, str(run_id))
    log.info("sync_aborted_runs: %d run(s) to update", len(stale))
    return len(stale)
