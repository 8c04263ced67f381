"""IbutsuTask: the base class of every task that touches the database.

It owns the transaction. Each run of a task gets one session scope: the Flask app context is
pushed, the session commits when the task returns and rolls back when it raises, and is always
removed. Domain code never commits; a task that must make work visible before it ends (an
import's "running", each pruning batch) calls :meth:`IbutsuTask.checkpoint`, by name, and one
that must drop its work but go on (a bad report, whose failure is recorded) calls
:meth:`IbutsuTask.abandon`; such code takes the task as a
:class:`~ibutsu_server.db.sessions.Transaction`, so a test or script can hand it a bare
session instead. Only transient failures (the database or the broker going away, timeouts,
deadlocks) are retried, with capped exponential backoff and jitter, for a span of time
(RETRY_BUDGET_SECONDS from the first failure) that outlasts a database failover; bad input is
never retried. Work that must happen when a task has failed for good (an import marked as
failed) goes in :meth:`on_final_failure`, which runs in a session scope of its own, tried a
few times.
"""

from __future__ import annotations

import inspect
import logging
import random
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any

import kombu.exceptions
import redis.exceptions
from billiard.common import terminate_handler_fired  # pants: no-infer-dep
from celery import Task
from celery.exceptions import Retry
from celery.platforms import EX_FAILURE
from sqlalchemy import exc as sa_exc

from ibutsu_server.db.sessions import after_commit
from ibutsu_server.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ibutsu_server.app_factory import FlaskCelery
    from ibutsu_server.db.sessions import Database

log = logging.getLogger(__name__)
FIRST_FAILURE_HEADER = "ibutsu_first_failure"
# From the OS on every call: a seeded generator would repeat itself in every forked child.
_JITTER = random.SystemRandom()

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # no pool connection in time
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
    ConnectionError,
    socket.timeout,
)
# The SQLSTATEs that pass on their own: a lost connection (class 08), the server shutting down
# or starting (57P01-57P03), a serialization failure or deadlock (40001, 40P01), too many
# connections (53300), a lock not granted in time (55P03). Anything else the server reports
# (an index row too big, a value out of range, ...) is about the data: retrying cannot help.
TRANSIENT_SQLSTATES = ("08", "57P01", "57P02", "57P03", "40001", "40P01", "53300", "55P03")
# Failures without a SQLSTATE that no retry mends: the configuration or the schema is wrong.
PERMANENT_MESSAGES = (
    "authentication failed",
    "does not exist",
    "no such table",
    "no such column",
    "no pg_hba.conf entry",
)


def is_transient(exc: BaseException) -> bool:
    """True for failures that may pass on their own: lost connections, a server restarting,
    deadlocks and serialization failures, timeouts. Never for bad input."""
    if not isinstance(exc, sa_exc.DBAPIError):
        return isinstance(exc, TRANSIENT_ERRORS)
    if exc.connection_invalidated or isinstance(exc, sa_exc.InterfaceError):
        return True  # the connection is gone (InterfaceError: "connection already closed")
    code = getattr(exc.orig, "pgcode", None)
    if code:
        return str(code).startswith(TRANSIENT_SQLSTATES)
    if not isinstance(exc, sa_exc.OperationalError):
        return False
    # No SQLSTATE: the connection failed before the server said anything, or SQLite's lock.
    message = str(exc.orig).lower()
    return not any(permanent in message for permanent in PERMANENT_MESSAGES)


class TransientFailure(Exception):
    """What a retry reports: the failure in one line, without SQL or traceback."""


def one_line(exc: BaseException) -> str:
    """``exc`` as one short line: its type and the first line of its message."""
    cause = getattr(exc, "orig", None) or exc
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


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
    # Retries are bounded by time, not by count: RETRY_BUDGET_SECONDS after the first failure.
    max_retries = None
    retry_budget_seconds = 600.0
    retry_backoff_base = 2.0
    retry_backoff_cap = 60.0
    # Attempts at recording a final failure (the database may still be away), and the pause
    # before the first retry of it, doubled each time.
    final_failure_attempts = 4
    final_failure_pause = 1.0

    app: FlaskCelery

    @property
    def settings(self) -> Settings:
        """The settings the app was built with."""
        return self.app.settings

    @property
    def db(self) -> Database:
        """The app's engine and session registry."""
        return self.app.database

    @property
    def session(self) -> Session:
        """The session of the running task (one per worker thread)."""
        return self.db.session()

    @contextmanager
    def session_scope(self) -> Iterator[Session]:
        """The app context and a session: committed if the block returns, rolled back if it
        raises (even on a connection that is already gone), always removed."""
        with self.app.flask_app.app_context(), self.db.transaction() as session:
            yield session

    def checkpoint(self, reason: str) -> None:
        """Commit now, on purpose, so others see the work so far (``reason`` says why);
        follow-ups queued with send_after_commit until now are sent."""
        log.debug("%s[%s]: checkpoint: %s", self.name, self.request.id, reason)
        self.session.commit()

    def abandon(self, reason: str) -> None:
        """Roll back now, on purpose, dropping the work since the last checkpoint (``reason``
        says why); the task goes on in a new transaction."""
        log.debug("%s[%s]: abandon: %s", self.name, self.request.id, reason)
        self.session.rollback()

    def after_commit(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` once this task's transaction commits; never if it rolls back."""
        after_commit(self.session, callback)

    def send_after_commit(self, task_name: str, *args: Any, **options: Any) -> None:
        """Enqueue ``task_name`` with ``args`` once this task's transaction commits; never if
        it rolls back. ``options`` go to send_task (``countdown=5``, ``kwargs={...}``)."""
        self.after_commit(lambda: self.app.send_task(task_name, args=list(args), **options))

    @cached_property
    def _signature(self) -> inspect.Signature:
        # Worked out once per task: inspecting the function costs more than a small task.
        return inspect.signature(self.run)

    def argument_problem(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """Why ``args`` and ``kwargs`` do not fit this task's signature, in one line; None
        when they do."""
        try:
            self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            return " ".join(f"bad arguments for {self.name}: {exc}".split())[:300]
        return None

    def _first_failure(self) -> float:
        """When this task first failed (carried from retry to retry in a message header)."""
        headers = self.request.headers or {}
        first = headers.get(FIRST_FAILURE_HEADER) or getattr(
            self.request, FIRST_FAILURE_HEADER, None
        )
        return float(first) if first else time.time()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        problem = self.argument_problem(args, kwargs)
        if problem is not None:
            # Bad input from whoever sent the message: one line, stored as the task's answer,
            # never Celery's TypeError with its traceback.
            log.warning("%s[%s]: %s", self.name, self.request.id, problem)
            return {"error": problem}
        try:
            with self.session_scope():
                return super().__call__(*args, **kwargs)
        except Retry:
            raise
        except Exception as exc:
            if terminate_handler_fired():
                # This pool process is being stopped (SIGTERM past the soft shutdown timeout)
                # and the error is the stop's doing: its SystemExit, raised where the task was,
                # can reach us as another error (a COPY whose reader it interrupted). Recording a
                # final failure or sending a retry would end the work here, and Celery would
                # acknowledge a plain error; a SystemExit loses the job with the process, so its
                # message goes back to the queue for another worker.
                raise SystemExit(EX_FAILURE) from exc
            first = self._first_failure()
            if is_transient(exc) and time.time() - first < self.retry_budget_seconds:
                delay = backoff_delay(
                    self.request.retries, base=self.retry_backoff_base, cap=self.retry_backoff_cap
                )
                log.warning(
                    "%s[%s]: %s; retry %d in %.1fs (retried until %.0fs after the first failure)",
                    self.name,
                    self.request.id,
                    one_line(exc),
                    self.request.retries + 1,
                    delay,
                    self.retry_budget_seconds,
                )
                headers = {**(self.request.headers or {}), FIRST_FAILURE_HEADER: first}
                raise self.retry(
                    exc=TransientFailure(one_line(exc)), countdown=delay, headers=headers
                ) from None
            self._final_failure(exc, args, kwargs)
            raise

    def _final_failure(self, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        pause = self.final_failure_pause
        for attempt in range(1, self.final_failure_attempts + 1):
            try:
                with self.session_scope() as session:
                    self.on_final_failure(session, exc, args, kwargs)
                return
            except Exception as problem:
                if not is_transient(problem) or attempt == self.final_failure_attempts:
                    log.error(
                        "%s[%s]: could not record the failure (%s)",
                        self.name,
                        self.request.id,
                        one_line(problem),
                    )
                    return
                time.sleep(pause)
                pause *= 2

    def on_final_failure(
        self, session: Session, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Record that the task failed for good (no retry left); runs in a transaction of its
        own after the task's was rolled back. Nothing by default."""
