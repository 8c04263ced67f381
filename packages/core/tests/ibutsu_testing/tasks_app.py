"""A worker app with tasks that exercise IbutsuTask against the real services.

Started as ``celery -A ibutsu_testing.tasks_app:app worker``; attempts and follow-ups are
recorded in Redis, outside the database transaction under test.
"""

from __future__ import annotations

import time
import uuid

import redis
from sqlalchemy import select, text

from ibutsu_server.app_factory import create_flask_celery_app
from ibutsu_server.db.models import User
from ibutsu_server.ibutsu_task import IbutsuTask
from ibutsu_server.settings import Role

app = create_flask_celery_app(Role.WORKER)
BACKOFF_BASE = 0.5
BACKOFF_CAP = 2.0


def recorder() -> redis.Redis:
    """The Redis client the test tasks record into."""
    return redis.Redis.from_url(app.conf.broker_url)


def record_attempt(key: str) -> int:
    """Append the current time to ``key:attempts``; returns the attempt number."""
    return int(recorder().rpush(f"{key}:attempts", repr(time.time())))


def user(key: str) -> User:
    """A user row named after ``key`` (users.email is unique)."""
    return User(id=uuid.uuid4(), email=f"{key}@example.com", is_active=True, is_superadmin=False)


class FastRetryTask(IbutsuTask):
    abstract = True
    retry_backoff_base = BACKOFF_BASE
    retry_backoff_cap = BACKOFF_CAP


@app.task(bind=True, base=FastRetryTask, name="tests.lose_connection")
def lose_connection(self: IbutsuTask, key: str, failures: int) -> str:
    """Kill its own database connection on the first ``failures`` attempts."""
    attempt = record_attempt(key)
    self.session.add(user(f"{key}-{attempt}"))
    self.session.flush()
    if attempt <= failures:
        self.session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    return "ok"


@app.task(bind=True, base=FastRetryTask, name="tests.duplicate_key")
def duplicate_key(self: IbutsuTask, key: str) -> None:
    """Bad input: violates a unique constraint, which no retry can fix."""
    record_attempt(key)
    self.session.add(user(key))
    self.session.flush()
    self.session.add(user(key))
    self.session.flush()


@app.task(bind=True, name="tests.insert_then")
def insert_then(self: IbutsuTask, key: str, fail: bool) -> None:
    """Insert a project and enqueue a follow-up after commit; raise afterwards if ``fail``."""
    self.session.add(user(key))
    self.send_after_commit("tests.follow_up", key)
    if fail:
        raise ValueError("bad input")


@app.task(bind=True, name="tests.follow_up")
def follow_up(self: IbutsuTask, key: str) -> None:
    """Record whether the row of the task that enqueued this one is visible."""
    found = self.session.scalar(select(User.id).where(User.email == f"{key}@example.com"))
    recorder().set(f"{key}:follow_up", "visible" if found else "missing")
