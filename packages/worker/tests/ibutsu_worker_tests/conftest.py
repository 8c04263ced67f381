from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from ibutsu_testing.fixtures import service_environ
from ibutsu_testing.services import running_worker, settings_for
from ibutsu_worker.cli import Operator
from ibutsu_worker_tests.dbsession import migrated_session

__all__ = ["operator", "service_environ", "session"]


@pytest.fixture(params=["postgresql", "sqlite"])
def session(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    """A session on a freshly migrated database, once on PostgreSQL and once on SQLite."""
    with migrated_session(request.param, tmp_path) as session:
        yield session


@pytest.fixture
def operator(service_environ: dict[str, str], tmp_path: Path) -> Iterator[Operator]:
    """The command line's Operator on a fresh database, with a real worker running."""
    operator = Operator(settings_for(service_environ))
    operator.upgrade()
    with running_worker("ibutsu_server:worker_app", service_environ, tmp_path / "worker.log"):
        yield operator
    operator.db.engine.dispose()
