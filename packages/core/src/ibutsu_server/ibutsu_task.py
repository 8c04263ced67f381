"""IbutsuTask: the base class of every task that touches the database.

It owns the transaction: the Flask app context is pushed, the session commits when the task
returns and rolls back when it raises, and is always removed. Only transient failures (the
database or the broker going away, timeouts) are retried, with capped exponential backoff and
jitter; bad input is never retried.
"""

from __future__ import annotations

import logging
import random
import socket
from typing import Any

import kombu.exceptions
import redis.exceptions
from celery import Task
from celery.exceptions import Retry
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from ibutsu_server.db.engine import Database, after_commit, database

log = logging.getLogger(__name__)
# From the OS on every call: a seeded generator would repeat itself in every forked child.
_JITTER = random.SystemRandom()

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,  # server gone, deadlock, serialization failure
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # no pool connection in time
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
    ConnectionError,
    socket.timeout,
)


def is_transient(exc: BaseException) -> bool:
    """True for failures that may pass on their own: lost connections and timeouts."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, TRANSIENT_ERRORS)


def backoff_delay(
    retries: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds before retry number ``retries + 1``: base·2^retries capped at ``cap``, the
    upper half jittered so that workers that failed together do not retry together."""
    ceiling = min(cap, base * 2.0**retries)
    return ceiling / 2 + (rng or _JITTER).uniform(0, ceiling / 2)


class IbutsuTask(Task):  # type: ignore[misc]
    """Base task: app context, one transaction per run, retries for transient failures only."""

    abstract = True
    max_retries = 5
    retry_backoff_base = 2.0
    retry_backoff_cap = 300.0

    @property
    def db(self) -> Database:
        return database(self.app.flask_app)

    @property
    def session(self) -> Session:
        """The session of the running task (one per worker thread)."""
        return self.db.session()

    def send_after_commit(self, task_name: str, *args: Any, **kwargs: Any) -> None:
        """Enqueue ``task_name`` once this task's transaction commits; never if it rolls back."""
        after_commit(self.session, lambda: self.app.send_task(task_name, args=args, kwargs=kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.app.flask_app.app_context():
            session = self.session
            try:
                result = super().__call__(*args, **kwargs)
                session.commit()
                return result
            except Retry:
                session.rollback()
                raise
            except Exception as exc:
                session.rollback()
                if is_transient(exc):
                    delay = backoff_delay(
                        self.request.retries,
                        base=self.retry_backoff_base,
                        cap=self.retry_backoff_cap,
                    )
                    log.warning(
                        "%s[%s]: transient %s, retry %d/%d in %.1fs",
                        self.name,
                        self.request.id,
                        type(exc).__name__,
                        self.request.retries + 1,
                        self.max_retries,
                        delay,
                    )
                    raise self.retry(exc=exc, countdown=delay) from exc
                raise
            finally:
                self.db.session.remove()
