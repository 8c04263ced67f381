"""Readiness of a database role: can it reach its broker and its database right now?"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import text

from ibutsu_server.app_factory import FlaskCelery

PROBE_TIMEOUT_SECONDS = 3


def readiness_check(app: FlaskCelery) -> Callable[[], str | None]:
    """A probe for ``app`` (built by create_flask_celery_app): None when the broker and the
    database answer, else which one does not. Never names hosts or credentials."""

    def check() -> str | None:
        try:
            with app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=PROBE_TIMEOUT_SECONDS)
        except Exception:
            return "broker unreachable"
        try:
            with app.database.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception:
            return "database unreachable"
        return None

    return check
