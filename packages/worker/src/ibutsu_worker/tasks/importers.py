"""``ibutsu_server.tasks.importers``: turn uploaded reports into runs and results."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import shared_task

from ibutsu_server.db.engine import after_commit
from ibutsu_server.ibutsu_task import IbutsuTask
from ibutsu_worker import metrics
from ibutsu_worker.importing.errors import ReportError
from ibutsu_worker.importing.importer import claim, mark_failed, run_import

log = logging.getLogger(__name__)


class ImportTask(IbutsuTask):
    """Records a final failure on the import, so no import is ever stuck at 'running'."""

    abstract = True

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        import_id = kwargs.get("import_id") or (args[0] if args else None)
        if import_id is None:
            return
        with self.app.flask_app.app_context():
            session = self.session
            try:
                mark_failed(
                    session,
                    uuid.UUID(str(import_id)),
                    f"internal error ({type(exc).__name__}); the worker log has the details "
                    f"under task {task_id}",
                )
                session.commit()
            finally:
                self.db.session.remove()


@shared_task(bind=True, base=ImportTask, ignore_result=True)
def import_results(self: ImportTask, import_id: str) -> None:
    """Import the report stored for ``import_id``: the whole run lands, or only a failed status."""
    try:
        key = uuid.UUID(str(import_id))
    except ValueError:
        log.error("import_results: %r is not an import id", import_id)
        return
    session = self.session
    if not claim(session, key):
        return
    # 'running' is committed on its own, so people see it while the import works.
    session.commit()
    limits = self.app.flask_app.config["IBUTSU_SETTINGS"].import_limits
    try:
        outcome = run_import(session, key, limits)
    except ReportError as exc:
        session.rollback()
        log.info("import %s failed: %s", key, exc)
        mark_failed(session, key, str(exc))
        failed = metrics.IMPORTS.labels(exc.format, "failed")
        after_commit(session, failed.inc)
        return
    if outcome:
        log.info("import %s done: run %s, %d results", key, outcome["run_id"], outcome["results"])

        def count() -> None:
            metrics.IMPORTS.labels(outcome["format"], "done").inc()
            metrics.RESULTS_IMPORTED.inc(outcome["results"])

        after_commit(session, count)
