"""IbutsuTask against a real worker process, real Redis and the real PostgreSQL."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import func, select

from ibutsu_server.celery_utils import create_celery
from ibutsu_server.db.engine import make_engine
from ibutsu_server.db.migrate import upgrade
from ibutsu_server.db.models import User
from ibutsu_server.ibutsu_task import backoff_delay, is_transient
from ibutsu_testing.services import REDIS_URL, running_worker, settings_for, wait_for
from ibutsu_testing.tasks_app import BACKOFF_BASE, BACKOFF_CAP

APP = "ibutsu_testing.tasks_app:app"
# Scheduling slack: the delay is measured between two attempts in a real worker.
SLACK = 1.0


@pytest.fixture()
def worker_env(service_environ: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    settings = settings_for(service_environ)
    assert settings.database is not None
    engine = make_engine(settings.database)
    upgrade(engine)
    engine.dispose()
    with running_worker(APP, service_environ, tmp_path / "worker.log"):
        yield service_environ


@pytest.fixture()
def producer(worker_env: dict[str, str]) -> Celery:
    return create_celery(settings_for(worker_env))


@pytest.fixture()
def store() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def _projects(env: dict[str, str], pattern: str) -> int:
    settings = settings_for(env)
    assert settings.database is not None
    engine = make_engine(settings.database)
    with engine.connect() as connection:
        count = connection.scalar(
            select(func.count()).select_from(User).where(User.email.like(f"{pattern}@example.com"))
        )
    engine.dispose()
    return int(count or 0)


def _attempt_times(store: redis.Redis, key: str) -> list[float]:
    return [float(value) for value in store.lrange(f"{key}:attempts", 0, -1)]


def test_transient_database_error_is_retried_with_backoff(
    producer: Celery, worker_env: dict[str, str], store: redis.Redis
) -> None:
    key = f"retry-{uuid.uuid4().hex}"
    result = producer.send_task("tests.lose_connection", args=[key, 2])
    assert result.get(timeout=60) == "ok"

    times = _attempt_times(store, key)
    assert len(times) == 3
    for retry, (before, after) in enumerate(itertools.pairwise(times)):
        ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2**retry)
        assert ceiling / 2 <= after - before <= ceiling + SLACK
    # The two failed attempts rolled back; only the third attempt's row is there.
    assert _projects(worker_env, f"{key}-%") == 1


def test_bad_input_is_not_retried(
    producer: Celery, worker_env: dict[str, str], store: redis.Redis
) -> None:
    key = f"dup-{uuid.uuid4().hex}"
    result = producer.send_task("tests.duplicate_key", args=[key])
    with pytest.raises(Exception, match="duplicate key|IntegrityError|UniqueViolation"):
        result.get(timeout=60)
    assert len(_attempt_times(store, key)) == 1
    assert _projects(worker_env, key) == 0


def test_follow_up_is_sent_after_commit_and_sees_the_row(
    producer: Celery, store: redis.Redis
) -> None:
    key = f"commit-{uuid.uuid4().hex}"
    producer.send_task("tests.insert_then", args=[key, False]).get(timeout=60)
    assert wait_for(lambda: store.get(f"{key}:follow_up")) == b"visible"


def test_rollback_leaves_no_rows_and_sends_no_follow_up(
    producer: Celery, worker_env: dict[str, str], store: redis.Redis
) -> None:
    failing = f"rollback-{uuid.uuid4().hex}"
    with pytest.raises(ValueError, match="bad input"):
        producer.send_task("tests.insert_then", args=[failing, True]).get(timeout=60)
    # A later task through the same single worker proves the queue was drained meanwhile.
    marker = f"marker-{uuid.uuid4().hex}"
    producer.send_task("tests.insert_then", args=[marker, False]).get(timeout=60)
    wait_for(lambda: store.get(f"{marker}:follow_up"))
    assert store.get(f"{failing}:follow_up") is None
    assert _projects(worker_env, failing) == 0


def test_backoff_is_exponential_capped_and_jittered() -> None:
    import random

    rng = random.Random(7)
    delays = [backoff_delay(n, base=2, cap=60, rng=rng) for n in range(8)]
    for n, delay in enumerate(delays):
        ceiling = min(60, 2 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(d, 6) for d in delays[5:]}) == 3  # capped, yet not identical


def test_transient_classification() -> None:
    from sqlalchemy.exc import IntegrityError, OperationalError

    assert is_transient(OperationalError("SELECT 1", {}, Exception("server closed")))
    assert is_transient(redis.exceptions.ConnectionError("reset"))
    assert not is_transient(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not is_transient(ValueError("bad input"))
