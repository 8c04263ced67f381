"""Keeping the database small: prune old data in short batches (refusing dangerous
retentions), and drop the stored report of a finished import."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from celery import shared_task
from sqlalchemy import func, select

from ibutsu_server import task_names
from ibutsu_server.db.models import Import, ImportFile, ImportStatus
from ibutsu_server.ibutsu_task import IbutsuTask
from ibutsu_worker import pruning, slots
from ibutsu_worker.importing import job
from ibutsu_worker.process import metrics

#: What a prune returns when its slot already ran (both beats sent it).
SKIPPED = {"skipped": "this slot already ran"}


def _prune(
    task: IbutsuTask, prune: Callable[..., pruning.PruneReport], retention: object
) -> dict[str, Any]:
    if not slots.claim(task):
        return SKIPPED
    report = prune(task, retention)

    def count() -> None:
        for table, rows in report.deleted.items():
            metrics.ROWS_PRUNED.labels(table).inc(rows)

    # Batches are committed as they go; the count is published with the task's last commit.
    task.after_commit(count)
    return report.as_dict()


@shared_task(bind=True, name=task_names.PRUNE_OLD_FILES)
def prune_old_files(self: IbutsuTask, months: int = 3) -> dict[str, Any]:
    """Delete artifact files uploaded more than ``months`` months ago."""
    return _prune(self, pruning.prune_artifacts, months)


@shared_task(bind=True, name=task_names.PRUNE_OLD_RESULTS)
def prune_old_results(self: IbutsuTask, months: int = 5) -> dict[str, Any]:
    """Delete results (and their artifacts) that started more than ``months`` months ago."""
    return _prune(self, pruning.prune_results, months)


@shared_task(bind=True, name=task_names.PRUNE_OLD_RUNS)
def prune_old_runs(self: IbutsuTask, months: int = 12) -> dict[str, Any]:
    """Delete runs (with their results and artifacts) that started ``months`` months ago."""
    return _prune(self, pruning.prune_runs, months)


@shared_task(bind=True, name=task_names.PRUNE_OLD_IMPORT_FILES)
def prune_old_import_files(self: IbutsuTask, days: int = 7) -> dict[str, Any]:
    """Delete imports (with their stored files) created more than ``days`` days ago."""
    return _prune(self, pruning.prune_imports, days)


@shared_task(bind=True, name=task_names.CLEAR_IMPORT_FILE_CONTENT)
def clear_import_file_content(self: IbutsuTask, import_id: str) -> str:
    """Drop the stored report of a finished (done or error) import; keep the records."""
    try:
        key = uuid.UUID(str(import_id))
    except ValueError:
        return f"Import {import_id!r:.100} is not an import id"
    record = self.session.get(Import, key)
    if record is None:
        return f"Import {key} not found"
    if not ImportStatus.finished(record.status):
        return f"Import {key} status is {record.status}, not clearing content"
    size = self.session.scalar(
        select(func.sum(func.length(ImportFile.content))).where(ImportFile.import_id == key)
    )
    if not size:
        return f"No content to clear for import {key}"
    self.session.execute(job.drop_stored_report(key))
    return f"Cleared {size} bytes from import_file for import {key}"
