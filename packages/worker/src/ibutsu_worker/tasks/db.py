"""``ibutsu_server.tasks.db``: prune old data in short batches; refuse dangerous retentions."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from ibutsu_server.db.engine import after_commit
from ibutsu_server.ibutsu_task import IbutsuTask
from ibutsu_worker import metrics
from ibutsu_worker.pruning import (
    PruneReport,
    prune_artifacts,
    prune_import_files,
    prune_results,
    prune_runs,
)


@shared_task(bind=True)
def prune_old_files(self: IbutsuTask, months: int = 3) -> dict[str, Any]:
    """Delete artifact files uploaded more than ``months`` months ago."""
    return _counted(self, prune_artifacts(self.session, months))


@shared_task(bind=True)
def prune_old_results(self: IbutsuTask, months: int = 5) -> dict[str, Any]:
    """Delete results (and their artifacts) that started more than ``months`` months ago."""
    return _counted(self, prune_results(self.session, months))


@shared_task(bind=True)
def prune_old_runs(self: IbutsuTask, months: int = 12) -> dict[str, Any]:
    """Delete runs (with their results and artifacts) older than ``months`` months."""
    return _counted(self, prune_runs(self.session, months))


@shared_task(bind=True)
def prune_old_import_files(self: IbutsuTask, days: int = 7) -> dict[str, Any]:
    """Delete the stored report files of imports that finished more than ``days`` days ago."""
    return _counted(self, prune_import_files(self.session, days))


def _counted(task: IbutsuTask, report: PruneReport) -> dict[str, Any]:
    # Batches commit as they go; the count is published with the task's final commit.
    def count() -> None:
        for table, rows in report.deleted.items():
            metrics.ROWS_PRUNED.labels(table).inc(rows)

    after_commit(task.session, count)
    return report.as_dict()
