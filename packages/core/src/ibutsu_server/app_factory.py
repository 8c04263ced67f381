"""The Flask-integrated factory used by the worker and the scheduler."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from flask import Flask

from ibutsu_server.celery_utils import create_celery, settings_or_exit
from ibutsu_server.db.engine import EXTENSION, Database, database, make_engine
from ibutsu_server.ibutsu_task import IbutsuTask
from ibutsu_server.settings import Role, Settings


def create_flask_app(settings: Settings) -> Flask:
    """A Flask app holding the database for ``settings``; its context is pushed per task."""
    if settings.database is None:
        raise ValueError(f"the {settings.role.value} role has no database settings")
    app = Flask("ibutsu_server")
    app.config["IBUTSU_SETTINGS"] = settings
    app.extensions[EXTENSION] = Database(make_engine(settings.database))
    return app


def create_flask_celery_app(
    role: Role = Role.WORKER,
    *,
    settings: Settings | None = None,
    include: Iterable[str] = (),
    **celery_kwargs: Any,
) -> Celery:
    """A Celery app whose every task runs inside a Flask app context with a database session."""
    settings = settings or settings_or_exit(role)
    flask_app = create_flask_app(settings)
    celery_app = create_celery(settings, include=include, task_cls=IbutsuTask, **celery_kwargs)
    celery_app.flask_app = flask_app

    def _dispose_inherited_pool(**_kwargs: Any) -> None:
        # A forked pool child must not share the parent's sockets: drop them, don't close them.
        database(flask_app).engine.dispose(close=False)

    worker_process_init.connect(_dispose_inherited_pool, weak=False)
    return celery_app
