"""IbutsuTask on the real PostgreSQL and Redis: tasks called with apply() in the test's
process. One transaction per task, retries for transient failures only, follow-ups only after
commit, named checkpoints, and a failure recorded in a transaction of its own."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator

import billiard.common  # pants: no-infer-dep
import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError

from ibutsu_server.app_factory import FlaskCelery, create_flask_celery_app
from ibutsu_server.db.migrate import upgrade
from ibutsu_server.db.models import User
from ibutsu_server.ibutsu_task import FIRST_FAILURE_HEADER, backoff_delay, is_transient
from ibutsu_testing.broker import queued
from ibutsu_testing.services import settings_for
from ibutsu_testing.tasks_app import BACKOFF_BASE, BACKOFF_CAP, RECORDED, register


@pytest.fixture
def app(service_environ: dict[str, str]) -> Iterator[FlaskCelery]:
    app = create_flask_celery_app(settings=settings_for(service_environ))
    register(app)
    upgrade(app.database.engine)
    yield app
    app.database.engine.dispose()


def _users(app: FlaskCelery, pattern: str) -> int:
    with app.database.engine.connect() as connection:
        query = select(func.count()).select_from(User).where(User.email.like(f"{pattern}@%"))
        return int(connection.scalar(query) or 0)


def _queued(app: FlaskCelery) -> list[tuple[str | None, list[object]]]:
    """(task, args) of each message waiting in the app's queue in Redis."""
    return [(message.task, message.args) for message in queued(app, "celery")]


def test_transient_database_error_is_retried_with_backoff(app: FlaskCelery) -> None:
    key = f"retry-{uuid.uuid4().hex}"
    assert app.tasks["tests.lose_connection"].apply(args=[key, 2]).get() == "ok"
    assert RECORDED[f"{key}:attempts"] == [0, 1, 2]
    for retry, countdown in enumerate(RECORDED[f"{key}:countdowns"]):
        ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2**retry)
        assert ceiling / 2 <= countdown <= ceiling
    # The two failed attempts rolled back; only the third attempt's row is there.
    assert _users(app, f"{key}-%") == 1


def test_retries_stop_when_the_time_budget_is_spent(app: FlaskCelery) -> None:
    key = f"budget-{uuid.uuid4().hex}"
    task = app.tasks["tests.lose_connection"]
    # As if the first failure had been eleven minutes ago: this one is final.
    spent = {FIRST_FAILURE_HEADER: time.time() - task.retry_budget_seconds - 60}
    outcome = task.apply(args=[key, 5], headers=spent)
    assert outcome.state == "FAILURE" and isinstance(outcome.result, OperationalError)
    assert RECORDED[f"{key}:attempts"] == [0]
    assert _users(app, f"{key}-%") == 0


def test_bad_input_is_not_retried(app: FlaskCelery) -> None:
    key = f"dup-{uuid.uuid4().hex}"
    outcome = app.tasks["tests.duplicate_key"].apply(args=[key])
    assert outcome.state == "FAILURE" and isinstance(outcome.result, IntegrityError)
    assert RECORDED[f"{key}:attempts"] == [0]
    assert _users(app, key) == 0


def test_follow_up_is_sent_after_commit_and_sees_the_row(app: FlaskCelery) -> None:
    key = f"commit-{uuid.uuid4().hex}"
    app.tasks["tests.insert_then"].apply(args=[key, False]).get()
    assert RECORDED[f"{key}:seen"] == [True]  # the callback ran after the commit
    assert ("tests.follow_up", [key]) in _queued(app)


def test_rollback_leaves_no_rows_sends_nothing_and_records_the_failure(app: FlaskCelery) -> None:
    key = f"rollback-{uuid.uuid4().hex}"
    outcome = app.tasks["tests.insert_then"].apply(args=[key, True])
    assert outcome.state == "FAILURE" and isinstance(outcome.result, ValueError)
    assert RECORDED[f"{key}:seen"] == []
    assert ("tests.follow_up", [key]) not in _queued(app)
    assert _users(app, key) == 0
    assert _users(app, f"{key}-failed") == 1  # on_final_failure, in a transaction of its own


def test_a_task_its_pool_process_is_stopping_records_no_failure_and_sends_no_retry(
    app: FlaskCelery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What billiard's SIGTERM handler sets in a pool process before it raises SystemExit.
    monkeypatch.setattr(billiard.common, "_should_have_exited", [True])
    failing, transient = f"stopping-{uuid.uuid4().hex}", f"stopping-{uuid.uuid4().hex}"
    # A SystemExit, which Celery does not report as the task's failure: the job is lost with
    # the process and its message handed back.
    with pytest.raises(SystemExit):
        app.tasks["tests.insert_then"].apply(args=[failing, True])
    assert (_users(app, failing), _users(app, f"{failing}-failed")) == (0, 0)
    with pytest.raises(SystemExit):
        app.tasks["tests.lose_connection"].apply(args=[transient, 1])
    assert RECORDED[f"{transient}:attempts"] == [0]  # not retried
    assert _users(app, f"{transient}-%") == 0


def test_a_checkpoint_commits_on_purpose_and_sends_what_was_queued(app: FlaskCelery) -> None:
    key = f"checkpoint-{uuid.uuid4().hex}"
    outcome = app.tasks["tests.checkpoint_then_fail"].apply(args=[key])
    assert outcome.state == "FAILURE"
    assert (_users(app, f"{key}-kept"), _users(app, f"{key}-lost")) == (1, 0)
    assert ("tests.follow_up", [key]) in _queued(app)


def test_a_follow_up_queued_after_the_last_statement_is_still_sent(app: FlaskCelery) -> None:
    key = f"late-{uuid.uuid4().hex}"
    app.tasks["tests.checkpoint_then_follow_up"].apply(args=[key]).get()
    assert _users(app, key) == 1
    assert ("tests.follow_up", [key]) in _queued(app)


def test_a_task_reaches_its_transaction_through_the_flask_app_context(app: FlaskCelery) -> None:
    key = f"context-{uuid.uuid4().hex}"
    assert app.tasks["tests.through_the_app_context"].apply(args=[key]).get() is True
    assert _users(app, key) == 1  # committed with the task's transaction


def test_a_rollback_on_a_dead_connection_keeps_the_real_error(app: FlaskCelery) -> None:
    key = f"dead-{uuid.uuid4().hex}"
    outcome = app.tasks["tests.fail_on_a_dead_connection"].apply(args=[key])
    assert outcome.state == "FAILURE" and isinstance(outcome.result, ValueError)
    assert _users(app, key) == 0


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, base=2, cap=60, rng=rng) for n in range(8)]
    for n, delay in enumerate(delays):
        ceiling = min(60, 2 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(d, 6) for d in delays[5:]}) == 3  # capped, yet not identical


class _PgError(Exception):
    """What psycopg2 raises: a message and, when the server said it, a SQLSTATE."""

    def __init__(self, message: str, pgcode: str | None = None) -> None:
        super().__init__(message)
        self.pgcode = pgcode


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (OperationalError("SELECT 1", {}, _PgError("server closed the connection")), True),
        (OperationalError("SELECT 1", {}, _PgError("terminating connection", "57P01")), True),
        (OperationalError("UPDATE", {}, _PgError("deadlock detected", "40P01")), True),
        (OperationalError("UPDATE", {}, _PgError("could not serialize", "40001")), True),
        (OperationalError("COPY", {}, _PgError("connection failure", "08006")), True),
        (OperationalError("SELECT 1", {}, _PgError("database is locked")), True),  # SQLite
        # Bad input, however psycopg2 classes it: never retried.
        (OperationalError("INSERT", {}, _PgError("index row size exceeds", "54000")), False),
        (OperationalError("SELECT", {}, _PgError("canceling statement", "57014")), False),
        (
            OperationalError(
                "connect", {}, _PgError('password authentication failed for user "x"')
            ),
            False,
        ),
        (OperationalError("connect", {}, _PgError('database "x" does not exist')), False),
        (IntegrityError("INSERT", {}, _PgError("duplicate key", "23505")), False),
        (redis.exceptions.ConnectionError("reset"), True),
        (ValueError("bad input"), False),
    ],
)
def test_transient_classification(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient
