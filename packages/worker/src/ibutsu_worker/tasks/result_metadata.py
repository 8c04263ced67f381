"""Result metadata: repair what old clients wrote."""

from __future__ import annotations

import uuid
from typing import Any

from celery import shared_task
from sqlalchemy import CursorResult, and_, func, not_, update

from ibutsu_server import task_names
from ibutsu_server.db.models import Result
from ibutsu_server.ibutsu_task import IbutsuTask


@shared_task(bind=True, name=task_names.ADD_RESULT_START_TIME)
def add_result_start_time(self: IbutsuTask, run_id: str) -> dict[str, int]:
    """Give the run's results whose metadata has an old-style ``starttime`` but no
    ``start_time`` a ``start_time`` copied from it, as upstream's task means to. Returns
    ``{"updated": n}`` (a dict, as the API's task view needs)."""
    key = uuid.UUID(str(run_id))
    data = Result.data
    if self.session.get_bind().dialect.name == "postgresql":
        has_key = data.bool_op("?")
        has_old = and_(has_key("starttime"), not_(has_key("start_time")))
        fixed = func.jsonb_set(data, "{start_time}", data["starttime"])
    else:
        has_old = and_(
            func.json_extract(data, "$.starttime").is_not(None),
            func.json_extract(data, "$.start_time").is_(None),
        )
        fixed = func.json_set(data, "$.start_time", func.json_extract(data, "$.starttime"))
    done: CursorResult[Any] = self.session.execute(  # type: ignore[assignment]
        update(Result)
        .where(Result.run_id == key, has_old)
        .values(data=fixed)
        .execution_options(synchronize_session=False)
    )
    return {"updated": int(done.rowcount)}
