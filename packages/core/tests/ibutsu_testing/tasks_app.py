"""Tasks that exercise IbutsuTask against the real services, registered on a test's app and
called in the test's process with ``apply()``. What they record outside the transaction under
test goes into ``RECORDED``."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

from flask import current_app
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from ibutsu_server.app_factory import FlaskCelery
from ibutsu_server.db.models import User
from ibutsu_server.ibutsu_task import IbutsuTask

BACKOFF_BASE = 0.5
BACKOFF_CAP = 2.0
#: key -> what the tasks recorded: attempts, retry countdowns, what a callback saw.
RECORDED: dict[str, list[Any]] = defaultdict(list)


def user(key: str) -> User:
    """A user row named after ``key`` (users.email is unique)."""
    return User(id=uuid.uuid4(), email=f"{key}@example.com", is_active=True, is_superadmin=False)


def visible(app: FlaskCelery, key: str) -> bool:
    """Whether ``key``'s user is visible to another connection (committed)."""
    engine = create_engine(app.database.engine.url)
    try:
        with Session(engine) as session:
            found = session.scalar(select(User.id).where(User.email == f"{key}@example.com"))
    finally:
        engine.dispose()
    return found is not None


class FastRetryTask(IbutsuTask):
    """Backs off by half a second, doubling to two; records each retry's countdown."""

    abstract = True
    retry_backoff_base = BACKOFF_BASE
    retry_backoff_cap = BACKOFF_CAP

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        RECORDED[f"{self.request.args[0]}:countdowns"].append(kwargs["countdown"])
        return super().retry(*args, **kwargs)


class RecordingFailureTask(IbutsuTask):
    """Records a final failure in a transaction of its own, as ImportTask does."""

    abstract = True

    def on_final_failure(
        self, session: Session, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        session.add(user(f"{args[0]}-failed"))


def register(app: FlaskCelery) -> None:
    """Add the test tasks to ``app``."""

    @app.task(shared=False, bind=True, base=FastRetryTask, name="tests.lose_connection")
    def lose_connection(self: IbutsuTask, key: str, failures: int) -> str:
        """Kill its own database connection on the first ``failures`` attempts."""
        RECORDED[f"{key}:attempts"].append(self.request.retries)
        attempt = len(RECORDED[f"{key}:attempts"])
        self.session.add(user(f"{key}-{attempt}"))
        self.session.flush()
        if attempt <= failures:
            self.session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return "ok"

    @app.task(shared=False, bind=True, base=FastRetryTask, name="tests.duplicate_key")
    def duplicate_key(self: IbutsuTask, key: str) -> None:
        """Bad input: violates a unique constraint, which no retry can fix."""
        RECORDED[f"{key}:attempts"].append(self.request.retries)
        self.session.add(user(key))
        self.session.flush()
        self.session.add(user(key))
        self.session.flush()

    @app.task(shared=False, bind=True, base=RecordingFailureTask, name="tests.insert_then")
    def insert_then(self: IbutsuTask, key: str, fail: bool) -> None:
        """Insert a user, queue a follow-up and a check after commit; raise if ``fail``."""
        self.session.add(user(key))
        self.send_after_commit("tests.follow_up", key)
        self.after_commit(lambda: RECORDED[f"{key}:seen"].append(visible(app, key)))
        if fail:
            raise ValueError("bad input")

    @app.task(shared=False, bind=True, base=RecordingFailureTask, name="tests.checkpoint_then_fail")
    def checkpoint_then_fail(self: IbutsuTask, key: str) -> None:
        """Commit one user at a named checkpoint, then fail with a second pending."""
        self.session.add(user(f"{key}-kept"))
        self.send_after_commit("tests.follow_up", key)
        self.checkpoint("the first user is made visible")
        self.session.add(user(f"{key}-lost"))
        raise ValueError("bad input")

    @app.task(shared=False, bind=True, name="tests.checkpoint_then_follow_up")
    def checkpoint_then_follow_up(self: IbutsuTask, key: str) -> None:
        """Commit a user at a checkpoint, then queue a follow-up and touch the database no
        more: no transaction is open when the task ends, but the follow-up still waits."""
        self.session.add(user(key))
        self.checkpoint("the user is made visible")
        self.send_after_commit("tests.follow_up", key)

    @app.task(shared=False, bind=True, name="tests.through_the_app_context")
    def through_the_app_context(self: IbutsuTask, key: str) -> bool:
        """Adds a user through the Flask app context, as upstream's tasks reach the database;
        whether that is the task's own session and settings."""
        celery_app = current_app.extensions["celery"]
        celery_app.database.session().add(user(key))
        return bool(celery_app.database.session() is self.session)

    @app.task(shared=False, bind=True, name="tests.fail_on_a_dead_connection")
    def fail_on_a_dead_connection(self: IbutsuTask, key: str) -> None:
        """Bad input found after the connection died: the rollback must not hide it."""
        self.session.add(user(key))
        self.session.flush()
        pid = self.session.scalar(text("SELECT pg_backend_pid()"))
        # Killed from outside, as a failover would: the task only learns of it on rollback.
        engine = create_engine(app.database.engine.url)
        with engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        engine.dispose()
        raise ValueError("bad input")
