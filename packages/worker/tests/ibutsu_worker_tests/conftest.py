from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from ibutsu_server.app_factory import FlaskCelery
from ibutsu_server.db.migrate import upgrade
from ibutsu_testing.fixtures import service_environ
from ibutsu_testing.services import settings_for
from ibutsu_worker.process.factory import create_worker_app
from ibutsu_worker.submission import Outcome, Submitter, import_record, import_task_name
from ibutsu_worker_tests.builders import ImportRunner
from ibutsu_worker_tests.dbsession import migrated_session

__all__ = [
    "app_session",
    "postgresql_session",
    "run_import",
    "service_environ",
    "session",
    "submitter",
    "worker_app",
]


@pytest.fixture(params=["postgresql", "sqlite"])
def session(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    """A session on a freshly migrated database, once on PostgreSQL and once on SQLite."""
    with migrated_session(request.param, tmp_path) as session:
        yield session


@pytest.fixture
def postgresql_session(tmp_path: Path) -> Iterator[Session]:
    """A session on a freshly migrated PostgreSQL database, for what only PostgreSQL does."""
    with migrated_session("postgresql", tmp_path) as session:
        yield session


@pytest.fixture
def worker_app(service_environ: dict[str, str]) -> Iterator[FlaskCelery]:
    """The worker's Celery app on a fresh PostgreSQL database and Redis namespace: tasks are
    called in the test's process with ``apply()``; what they send goes to the real Redis."""
    app = create_worker_app(settings_for(service_environ))
    upgrade(app.database.engine)
    yield app
    app.database.engine.dispose()


@pytest.fixture
def app_session(worker_app: FlaskCelery) -> Iterator[Session]:
    """A session of its own on ``worker_app``'s database, to arrange and inspect rows."""
    with Session(worker_app.database.engine, expire_on_commit=False) as session:
        yield session


@pytest.fixture
def submitter(worker_app: FlaskCelery) -> Submitter:
    """Imports stored as the API stores them, on ``worker_app``'s database."""
    return Submitter(worker_app.settings, worker_app)


@pytest.fixture
def run_import(worker_app: FlaskCelery, submitter: Submitter) -> ImportRunner:
    """Store a report as the API does and run its import task here, as a worker would."""

    def run(path: Path, **upload: Any) -> Outcome:
        record = submitter.store(path, **upload)
        name = import_task_name(path.read_bytes()[:2])
        worker_app.tasks[name].apply(args=[import_record(record)]).get()
        return submitter.outcome(str(record.id))

    return run
