"""The Flask-integrated factory used by the worker and the scheduler."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery.signals import worker_process_init
from flask import Flask

from ibutsu_server.celery_utils import IbutsuCelery, create_celery, settings_or_exit
from ibutsu_server.db.engine import make_engine
from ibutsu_server.db.sessions import Database
from ibutsu_server.ibutsu_task import IbutsuTask
from ibutsu_server.settings import Role, Settings


class FlaskCelery(IbutsuCelery):
    """A Celery app whose tasks run in a Flask app context, with the database of its
    settings: what IbutsuTask reaches, typed."""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(settings, *args, **kwargs)
        if settings.database is None:
            raise ValueError(f"the {settings.role.value} role has no database settings")
        self.flask_app = Flask("ibutsu_server")
        self.database = Database(make_engine(settings.database))


def create_flask_celery_app(
    role: Role = Role.WORKER,
    *,
    settings: Settings | None = None,
    include: Iterable[str] = (),
    **celery_kwargs: Any,
) -> FlaskCelery:
    """A Celery app whose every task runs inside a Flask app context with a database session."""
    settings = settings or settings_or_exit(role)
    app = create_celery(
        settings, app_class=FlaskCelery, include=include, task_cls=IbutsuTask, **celery_kwargs
    )
    assert isinstance(app, FlaskCelery)
    engine = app.database.engine

    def _dispose_inherited_pool(**_kwargs: Any) -> None:
        # A forked pool child must not share the parent's sockets: drop them, don't close them.
        engine.dispose(close=False)

    worker_process_init.connect(_dispose_inherited_pool, weak=False)
    return app
