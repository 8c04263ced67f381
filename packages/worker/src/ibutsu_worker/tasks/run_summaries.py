"""Run summaries: keep them true."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from celery import shared_task

from ibutsu_server import task_names
from ibutsu_server.db.models import utcnow
from ibutsu_server.ibutsu_task import IbutsuTask
from ibutsu_worker import slots
from ibutsu_worker.process import metrics
from ibutsu_worker.summaries import UpdateOutcome, coalesced_update, stale_runs

log = logging.getLogger(__name__)
# As upstream: the update waits a little, for results still being posted.
SYNC_COUNTDOWN = 5


@shared_task(bind=True, name=task_names.UPDATE_RUN, ignore_result=True)
def update_run(self: IbutsuTask, run_id: str) -> None:
    """Recompute a run's summary with SQL aggregates; requests that arrive meanwhile are
    coalesced, never dropped."""
    try:
        key = uuid.UUID(str(run_id))
    except ValueError:
        log.error("update_run: %.100r is not a run id", run_id)
        return
    outcome = coalesced_update(self.session, key)
    self.after_commit(metrics.SUMMARY_UPDATES.labels(outcome.value).inc)
    if outcome is UpdateOutcome.MISSING:
        log.info("update_run: run %s does not exist", key)


@shared_task(bind=True, name=task_names.SYNC_ABORTED_RUNS)
def sync_aborted_runs(self: IbutsuTask, hours: int = 24) -> dict[str, int]:
    """Enqueue ``update_run`` (in 5 s, as upstream) for each run started in the last ``hours``
    whose summary disagrees with its results. Returns ``{"enqueued": n}``: a dict, which the
    API's ``GET /api/task/{id}`` merges into its answer (it cannot take a bare number). A
    beat's send whose half hour another one already ran does nothing (``slots``)."""
    if not slots.claim(self):
        return {"enqueued": 0}
    stale = stale_runs(self.session, utcnow() - timedelta(hours=hours))
    for run_id in stale:
        self.send_after_commit(task_names.UPDATE_RUN, str(run_id), countdown=SYNC_COUNTDOWN)
    log.info("sync_aborted_runs: %d run(s) to update", len(stale))
    return {"enqueued": len(stale)}
