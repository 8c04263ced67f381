"""Migrations build exactly the models' schema, on PostgreSQL and on SQLite."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, delete, select, text
from sqlalchemy.orm import Session

from ibutsu_server.db.engine import make_engine
from ibutsu_server.db.migrate import is_current, upgrade
from ibutsu_server.db.models import Artifact, Base, Result, Run, utcnow
from ibutsu_server.settings import DatabaseSettings
from ibutsu_testing.services import PG_HOST, PG_PORT, PG_USER, postgres_database


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = make_engine(DatabaseSettings(sqlite_path=tmp_path / "ibutsu.sqlite3"))
        yield engine
        engine.dispose()
        return
    with postgres_database() as name:
        engine = make_engine(
            DatabaseSettings(host=PG_HOST, port=int(PG_PORT), user=PG_USER, database=name)
        )
        yield engine
        engine.dispose()


# SQLite cannot reflect expression indexes (ix_runs_age); PostgreSQL compares them.
@pytest.mark.filterwarnings("ignore:.*expression-based index")
def test_upgrade_is_idempotent_and_matches_the_models(engine: Engine) -> None:
    assert not is_current(engine)
    upgrade(engine)
    upgrade(engine)
    assert is_current(engine)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_newer_artifact_never_blocks_deleting_an_old_run(engine: Engine) -> None:
    upgrade(engine)
    old, new = utcnow() - timedelta(days=400), utcnow()
    with Session(engine) as session, session.begin():
        run = Run(created=old, start_time=old)
        session.add(run)
        session.flush()
        result = Result(run_id=run.id, test_id="t", result="passed", start_time=old)
        session.add(result)
        session.flush()
        session.add(
            Artifact(
                result_id=result.id, run_id=run.id, filename="log", content=b"x", upload_date=new
            )
        )
        run_id = run.id
    with Session(engine) as session, session.begin():
        session.execute(delete(Run).where(Run.id == run_id))
    with Session(engine) as session:
        assert session.scalar(select(Result.id).where(Result.run_id == run_id)) is None
        assert session.scalar(select(Artifact.id)) is None


def test_json_and_uuid_round_trip(engine: Engine) -> None:
    upgrade(engine)
    data = {"classname": "tests.test_x", "properties": {"a": "1"}, "nested": [1, 2]}
    with Session(engine) as session, session.begin():
        result = Result(test_id="t", result="failed", data=data, params={"p": 1})
        session.add(result)
        session.flush()
        key = result.id
    with Session(engine) as session:
        loaded = session.get(Result, key)
        assert loaded is not None and isinstance(loaded.id, uuid.UUID)
        assert loaded.data == data and loaded.params == {"p": 1}
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            kind = connection.scalar(
                text(
                    "SELECT data_type FROM information_schema.columns "
                    "WHERE table_name = 'results' AND column_name = 'data'"
                )
            )
        assert kind == "jsonb"
