"""Queries: heavy, paged queries answered by the workers.

A query that cannot be answered stores ``{"error": "<why>"}`` as its result instead of failing:
the result backend never holds a traceback or SQL text, and upstream's ``GET /api/task/{id}``
shows the reason. Transient failures are retried as for every task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import shared_task

from ibutsu_server import task_names
from ibutsu_server.ibutsu_task import IbutsuTask, is_transient
from ibutsu_worker.querying import Page, QueryError, run_query, task_query

log = logging.getLogger(__name__)


def _answer(task: IbutsuTask, page: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return page()
    except QueryError as exc:
        return {"error": str(exc)}
    except Exception as exc:
        if is_transient(exc):
            raise
        log.exception("%s[%s]: the query failed", task.name, task.request.id)
        return {
            "error": f"the query failed ({type(exc).__name__}); the worker log has the details "
            f"under task {task.request.id}"
        }


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

    def page_of() -> dict[str, Any]:
        found: Page = task_query(self.session, filter_, page, page_size, estimate, tablename)
        return found.as_task_result()

    return _answer(self, page_of)


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

    def page_of() -> dict[str, Any]:
        return run_query(
            self.session,
            kind=kind,
            project=project,
            filters=filters or [],
            page=page,
            page_size=page_size,
            estimate=estimate,
        ).as_dict()

    return _answer(self, page_of)
