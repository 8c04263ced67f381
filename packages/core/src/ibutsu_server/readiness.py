"""Readiness of a database role: can it reach its broker and its database right now?"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, text

from ibutsu_server.celery_utils import IbutsuCelery

PROBE_TIMEOUT_SECONDS = 3


def readiness_check(app: IbutsuCelery, engine: Engine) -> Callable[[], str | None]:
    """A probe for ``app`` and its database's ``engine``: None when the broker and the
    database answer, else which one does not. Never names hosts or credentials."""

    def check() -> str | None:
        try:
            with app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=PROBE_TIMEOUT_SECONDS)
        except Exception:
            return "broker unreachable"
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception:
            return "database unreachable"
        return None

    return check
