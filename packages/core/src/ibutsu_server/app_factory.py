"""The Flask-integrated factory used by the worker and the scheduler."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property
from typing import TYPE_CHECKING, Any

from celery.signals import worker_process_init
from sqlalchemy import Engine

from ibutsu_server.celery_utils import IbutsuCelery, create_celery, settings_or_exit
from ibutsu_server.db.engine import make_engine
from ibutsu_server.settings import DatabaseSettings, Role, Settings

if TYPE_CHECKING:
    from flask import Flask

    from ibutsu_server.db.sessions import Database

# By name: Celery resolves it when a task is first made, so a process that runs no task (the
# scheduler) never imports the ORM it brings.
TASK_CLASS = "ibutsu_server.ibutsu_task:IbutsuTask"


class FlaskCelery(IbutsuCelery):
    """A Celery app whose tasks run in a Flask app context, with the database of its
    settings: what IbutsuTask reaches, typed.

    The Flask app and the ORM's session registry are made on first use: the scheduler, built
    by the same factory, runs no task and asks its database only whether it answers (through
    :attr:`engine`), so it starts without importing Flask or the ORM."""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(settings, *args, **kwargs)
        if settings.database is None:
            raise ValueError(f"the {settings.role.value} role has no database settings")
        self.database_settings: DatabaseSettings = settings.database

    @cached_property
    def flask_app(self) -> Flask:
        """The Flask app whose context every task runs in, as upstream's tasks run in theirs.

        What the context is for: code in a task (ours, or a task ported from upstream's, which
        reaches everything through ``flask.current_app``) finds this Celery app, and through
        it the role's settings and database, at ``current_app.extensions["celery"]`` (the key
        Flask's own Celery pattern uses): ``.settings``, ``.database.session()``, the same
        session the task's transaction commits."""
        from flask import Flask

        flask_app = Flask("ibutsu_server")
        flask_app.extensions["celery"] = self
        return flask_app

    @cached_property
    def engine(self) -> Engine:
        """The engine of the role's database."""
        return make_engine(self.database_settings)

    @cached_property
    def database(self) -> Database:
        """The engine and the thread-scoped session registry tasks use."""
        from ibutsu_server.db.sessions import Database

        return Database(self.engine)


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
        settings, app_class=FlaskCelery, include=include, task_cls=TASK_CLASS, **celery_kwargs
    )
    assert isinstance(app, FlaskCelery)

    def _dispose_inherited_pool(**_kwargs: Any) -> None:
        # A forked pool child must not share the parent's sockets: drop them, don't close them.
        if "engine" in vars(app):
            app.engine.dispose(close=False)

    worker_process_init.connect(_dispose_inherited_pool, weak=False)
    return app
