"""The worker's Celery app factory: every task module, under the names producers use."""

from __future__ import annotations

from typing import Any

from celery import Celery

from ibutsu_server.app_factory import create_flask_celery_app
from ibutsu_server.settings import Role, Settings

TASK_MODULES = (
    "ibutsu_worker.tasks.db",
    "ibutsu_worker.tasks.importers",
    "ibutsu_worker.tasks.query",
    "ibutsu_worker.tasks.results",
    "ibutsu_worker.tasks.runs",
)
# Producers enqueue by these names (ibutsu_server.tasks.importers.import_results, ...).
WIRE_PREFIX = "ibutsu_server.tasks."
_MODULE_PREFIX = "ibutsu_worker.tasks."


class WorkerCelery(Celery):  # type: ignore[misc]
    """Names each task ``ibutsu_server.tasks.<module>.<function>``, the names producers use."""

    def gen_task_name(self, name: str, module: str) -> str:
        if module.startswith(_MODULE_PREFIX):
            return f"{WIRE_PREFIX}{module.removeprefix(_MODULE_PREFIX)}.{name}"
        return str(super().gen_task_name(name, module))


def create_worker_app(settings: Settings | None = None, **kwargs: Any) -> Celery:
    """The worker's Celery app, with every task module loaded."""
    app = create_flask_celery_app(
        Role.WORKER, settings=settings, include=TASK_MODULES, celery_cls=WorkerCelery, **kwargs
    )
    app.loader.import_default_modules()
    return app
