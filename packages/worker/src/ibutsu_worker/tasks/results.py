"""``ibutsu_server.tasks.results``: result-level maintenance."""

from __future__ import annotations

import uuid
from typing import Any

from celery import shared_task
from sqlalchemy import CursorResult, select, update

from ibutsu_server.db.models import Result, Run
from ibutsu_server.ibutsu_task import IbutsuTask


@shared_task(bind=True)
def add_result_start_time(self: IbutsuTask, run_id: str) -> int:
    """Give the run's results that have no start time the run's start time (clients that
    only time the run). Returns how many results were filled."""
    key = uuid.UUID(str(run_id))
    run_start = select(Run.start_time).where(Run.id == key).scalar_subquery()
    done: CursorResult[Any] = self.session.execute(  # type: ignore[assignment]
        update(Result)
        .where(Result.run_id == key, Result.start_time.is_(None))
        .values(start_time=run_start)
        .execution_options(synchronize_session=False)
    )
    return int(done.rowcount)
