"""``ibutsu_server.tasks.db``: prune old data in short batches; refuse dangerous retentions."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from ibutsu_server.ibutsu_task import IbutsuTask
from ibutsu_worker.pruning import (
    prune_artifacts,
    prune_import_files,
    prune_results,
    prune_runs,
)


@shared_task(bind=True)
def prune_old_files(self: IbutsuTask, months: int = 3) -> dict[str, Any]:
    """Delete artifact files uploaded more than ``months`` months ago."""
    return prune_artifacts(self.session, months).as_dict()


@shared_task(bind=True)
def prune_old_results(self: IbutsuTask, months: int = 5) -> dict[str, Any]:
    """Delete results (and their artifacts) that started more than ``months`` months ago."""
    return prune_results(self.session, months).as_dict()


@shared_task(bind=True)
def prune_old_runs(self: IbutsuTask, months: int = 12) -> dict[str, Any]:
    """Delete runs (with their results and artifacts) older than ``months`` months."""
    return prune_runs(self.session, months).as_dict()


@shared_task(bind=True)
def prune_old_import_files(self: IbutsuTask, days: int = 7) -> dict[str, Any]:
    """Delete the stored report files of imports that finished more than ``days`` days ago."""
    return prune_import_files(self.session, days).as_dict()
