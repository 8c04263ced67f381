"""Queries: heavy, paged queries answered by the workers."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from ibutsu_server import task_names
from ibutsu_server.ibutsu_task import IbutsuTask
from ibutsu_worker.querying import run_query, task_query


@shared_task(bind=True, name=task_names.QUERY_TASK)
def query_task(
    self: IbutsuTask,
    filter_: list[str] | None = None,
    page: int = 1,
    page_size: int = 25,
    estimate: bool = False,
    tablename: str = "results",
) -> dict[str, Any]:
    """A page of ``tablename`` matching upstream's filter strings, in the shape the API's
    ``GET /api/task/{id}`` returns; the stored payload is capped in size."""
    return task_query(self.session, filter_, page, page_size, estimate, tablename).as_task_result()


@shared_task(bind=True, name=task_names.QUERY)
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
