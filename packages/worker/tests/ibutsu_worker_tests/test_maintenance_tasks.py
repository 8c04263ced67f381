"""Maintenance tasks by their wire names, through a real worker, Redis and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from celery import Celery
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ibutsu_server.celery_utils import create_celery
from ibutsu_server.db.engine import make_engine
from ibutsu_server.db.migrate import upgrade
from ibutsu_server.db.models import Project, Result, Run, utcnow
from ibutsu_testing.services import (
    clear_redis_prefix,
    postgres_database,
    running_worker,
    service_env,
    settings_for,
    wait_for,
)

TASKS = "ibutsu_server.tasks."


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    prefix = f"ibutsu-test-{uuid.uuid4().hex[:8]}:"
    with postgres_database() as name:
        environ = service_env(name, prefix)
        log = tmp_path_factory.mktemp("worker") / "worker.log"
        settings = settings_for(environ)
        assert settings.database is not None
        engine = make_engine(settings.database)
        upgrade(engine)
        engine.dispose()
        with running_worker("ibutsu_server:worker_app", environ, log):
            yield environ
    clear_redis_prefix(prefix)


@pytest.fixture(scope="module")
def producer(env: dict[str, str]) -> Celery:
    return create_celery(settings_for(env))


@pytest.fixture
def session(env: dict[str, str]) -> Iterator[Session]:
    settings = settings_for(env)
    assert settings.database is not None
    engine = make_engine(settings.database)
    with Session(engine) as session:
        yield session
    engine.dispose()


def _run(session: Session, age: timedelta, results: int, **fields: object) -> uuid.UUID:
    start = utcnow() - age
    run = Run(start_time=start, created=start, **fields)
    session.add(run)
    session.flush()
    session.add_all(
        Result(run_id=run.id, test_id=f"t{n}", result="passed", start_time=start)
        for n in range(results)
    )
    session.commit()
    return run.id


def _wait_for_summary(session: Session, run_id: uuid.UUID, counter: str, expected: int) -> None:
    """Wait until the worker has stored ``expected`` as the run's ``counter``."""

    def stored() -> bool:
        session.expire_all()
        run = session.get(Run, run_id)
        return run is not None and run.summary is not None and run.summary[counter] == expected

    wait_for(stored, timeout=60)


def test_prune_old_runs_reports_what_went(producer: Celery, session: Session) -> None:
    old = _run(session, timedelta(days=500), results=3)
    kept = _run(session, timedelta(days=2), results=1)
    report = producer.send_task(f"{TASKS}db.prune_old_runs", args=[12]).get(timeout=60)
    assert report["deleted"]["runs"] >= 1
    assert report["deleted"]["results"] >= 3
    assert session.get(Run, old) is None
    assert session.get(Run, kept) is not None


def test_dangerous_retention_fails_loudly_without_retry(producer: Celery, session: Session) -> None:
    _run(session, timedelta(days=90), results=2)
    before = session.scalar(select(func.count()).select_from(Result))
    outcome = producer.send_task(f"{TASKS}db.prune_old_results", args=[0])
    with pytest.raises(Exception, match="refusing to prune results"):
        outcome.get(timeout=60)
    assert outcome.state == "FAILURE"
    assert session.scalar(select(func.count()).select_from(Result)) == before


def test_sync_aborted_runs_repairs_summaries(producer: Celery, session: Session) -> None:
    run_id = _run(session, timedelta(hours=1), results=4, summary={"tests": 1, "passes": 1})
    enqueued = producer.send_task(f"{TASKS}runs.sync_aborted_runs").get(timeout=60)
    assert enqueued >= 1
    _wait_for_summary(session, run_id, "tests", 4)


def test_update_run_by_name(producer: Celery, session: Session) -> None:
    run_id = _run(session, timedelta(hours=1), results=3)
    producer.send_task(f"{TASKS}runs.update_run", args=[str(run_id)])
    _wait_for_summary(session, run_id, "passes", 3)


def test_add_result_start_time(producer: Celery, session: Session) -> None:
    run_id = _run(session, timedelta(hours=3), results=0)
    session.add_all(Result(run_id=run_id, test_id=f"u{n}", result="passed") for n in range(2))
    session.commit()
    filled = producer.send_task(f"{TASKS}results.add_result_start_time", args=[str(run_id)])
    assert filled.get(timeout=60) == 2
    session.expire_all()
    starts = session.scalars(select(Result.start_time).where(Result.run_id == run_id)).all()
    assert all(start is not None for start in starts)


def test_query_by_name_is_scoped_and_refuses_bad_filters(
    producer: Celery, session: Session
) -> None:
    project = Project(name=f"q-{uuid.uuid4().hex[:6]}")
    session.add(project)
    session.commit()
    _run(session, timedelta(hours=1), results=3, project_id=project.id)
    session.execute(
        update(Result)
        .where(Result.run_id.in_(select(Run.id).where(Run.project_id == project.id)))
        .values(project_id=project.id)
    )
    session.commit()
    page = producer.send_task(
        f"{TASKS}query.query", args=["results", project.name, [["result", "eq", "passed"]]]
    ).get(timeout=60)
    assert page["total"] == 3 and len(page["items"]) == 3
    refused = producer.send_task(
        f"{TASKS}query.query", args=["results", project.name, [["x", "eq", 1]]]
    )
    with pytest.raises(Exception, match="cannot be filtered on 'x'"):
        refused.get(timeout=60)
