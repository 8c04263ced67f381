"""The worker's Celery app factory: every task module loaded, each task under its wire name."""

from __future__ import annotations

from typing import Any

from ibutsu_server.app_factory import FlaskCelery, create_flask_celery_app
from ibutsu_server.settings import Role, Settings

# Modules are named for what they do; each task's wire name comes from ibutsu_server.task_names.
TASK_MODULES = (
    "ibutsu_worker.tasks.imports",
    "ibutsu_worker.tasks.queries",
    "ibutsu_worker.tasks.result_metadata",
    "ibutsu_worker.tasks.retention",
    "ibutsu_worker.tasks.run_summaries",
    "ibutsu_worker.tasks.users",
)


def create_worker_app(settings: Settings | None = None, **kwargs: Any) -> FlaskCelery:
    """The worker's Celery app, with every task module loaded, its Flask app and session
    registry made: before the pool forks, so every child shares them instead of loading Flask
    on its first task."""
    app = create_flask_celery_app(Role.WORKER, settings=settings, include=TASK_MODULES, **kwargs)
    app.loader.import_default_modules()
    _made_before_fork = (app.flask_app, app.database)
    return app
