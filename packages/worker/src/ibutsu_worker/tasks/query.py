"""``ibutsu_server.tasks.query``: heavy, paged queries answered by the workers."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from ibutsu_server.ibutsu_task import IbutsuTask
from ibutsu_worker.querying import run_query


@shared_task(bind=True)
def query(
    self: IbutsuTask,
    kind: str,
    project: str,
    filters: list[list[Any]] | None = None,
    page: int = 1,
    page_size: int = 100,
    estimate: bool = False,
) -> dict[str, Any]:
    """A page of results or runs of one project matching structured filters
    ``[[field, operator, value], ...]``; the stored payload is capped in size."""
    return run_query(
        self.session,
        kind=kind,
        project=project,
        filters=filters or [],
        page=page,
        page_size=page_size,
        estimate=estimate,
    ).as_dict()
