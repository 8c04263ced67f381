"""``ibutsu_server.tasks.runs``: keep run summaries true."""

from __future__ import annotations

import logging
import uuid

from celery import shared_task
from ibutsu_server.ibutsu_task import IbutsuTask

from ibutsu_worker.summaries import update_run_summary

log = logging.getLogger(__name__)


@shared_task(bind=True, ignore_result=True)
def update_run(self: IbutsuTask, run_id: str) -> None:
    """Recompute a run's summary from its results with SQL aggregates."""
    if update_run_summary(self.session, uuid.UUID(str(run_id))) is None:
        log.info("update_run: run %s does not exist", run_id)
