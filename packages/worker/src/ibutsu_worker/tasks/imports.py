"""Imports: turn uploaded reports into runs and results.

The API sends ``run_junit_import`` / ``run_archive_import`` with the whole import record (a
dict, ``created`` in Kombu's datetime encoding); the architecture document's
``import_results`` takes the id. All three run the same import (importing.job): the format is
recognised from the content, never from the task name or the file name.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import shared_task
from sqlalchemy.orm import Session

from ibutsu_server import task_names
from ibutsu_server.db.models import ImportStatus
from ibutsu_server.fleet import RedisSightings
from ibutsu_server.ibutsu_task import IbutsuTask
from ibutsu_worker.importing import job, recovery
from ibutsu_worker.importing.broker_scan import held_import_ids
from ibutsu_worker.importing.formats import ImportFormat
from ibutsu_worker.process import metrics

log = logging.getLogger(__name__)


class ImportTask(IbutsuTask):
    """Records a final failure on the import, so no import is ever stuck at 'running'."""

    abstract = True

    def on_final_failure(
        self, session: Session, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        given = args[0] if args else next(iter(kwargs.values()), None)
        key = job.import_id_of(given)
        import_id = key and job.find_import(session, key)
        if import_id is not None and job.mark_error(
            session,
            import_id,
            f"internal error ({type(exc).__name__}); the worker log has the details under "
            f"task {self.request.id}",
        ):
            self.after_commit(metrics.IMPORTS.labels(ImportFormat.UNKNOWN, ImportStatus.ERROR).inc)


def _run(task: IbutsuTask, import_id: uuid.UUID | None, given: Any) -> None:
    if import_id is None:
        log.error("%s: %.100r names no import; nothing to do", task.name, given)
        return
    delivery = f"{task.request.id}:{task.request.retries}"
    outcome = job.run(task, import_id, task.settings.import_limits, delivery)
    if outcome is None:
        return
    if outcome.error is not None:
        log.info("import %s failed: %s", import_id, outcome.error)
    else:
        log.info("import %s done: run %s, %d results", import_id, outcome.run_id, outcome.results)

    def count() -> None:
        metrics.IMPORTS.labels(outcome.format, outcome.status.value).inc()
        metrics.RESULTS_IMPORTED.inc(outcome.results)

    task.after_commit(count)


@shared_task(bind=True, base=ImportTask, name=task_names.RUN_JUNIT_IMPORT, ignore_result=True)
def run_junit_import(self: ImportTask, import_: Any) -> None:
    """Import an uploaded report (the API sends .xml files here) given its import record."""
    _run(self, job.import_id_of(import_), import_)


@shared_task(bind=True, base=ImportTask, name=task_names.RUN_ARCHIVE_IMPORT, ignore_result=True)
def run_archive_import(self: ImportTask, import_: Any) -> None:
    """Import an uploaded report (the API sends .tar.gz files here) given its import record."""
    _run(self, job.import_id_of(import_), import_)


@shared_task(bind=True, base=ImportTask, name=task_names.IMPORT_RESULTS, ignore_result=True)
def import_results(self: ImportTask, file_id: str) -> None:
    """Import the report of an import, by the import's id (or one of its files' ids)."""
    key = job.import_id_of(file_id)
    _run(self, key and job.find_import(self.session, key), file_id)


class BrokerEvidence:
    """What the broker says about an app's imports and its fleet (importing.recovery)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def held_ids(self) -> set[str] | None:
        return held_import_ids(self.app)

    def upstream_present(self) -> bool | None:
        return RedisSightings(self.app).upstream_present()


@shared_task(bind=True, name=task_names.RECOVER_IMPORTS)
def recover_imports(self: IbutsuTask) -> dict[str, list[str]]:
    """Queue again the imports nobody will finish (their worker or their message is gone), or
    give them up with the reason; the scheduler sends this every two minutes. Each goes out
    as the API sent it (its task name, the import record), for any worker to take."""
    found = recovery.recover(self.session, self.settings.import_limits, BrokerEvidence(self.app))
    for item in found.requeue:
        self.send_after_commit(item.task, item.record)
    return found.as_dict()
