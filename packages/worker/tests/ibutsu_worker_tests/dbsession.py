"""Sessions on a migrated PostgreSQL database of the test's own, or on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session

from ibutsu_server.db.engine import make_engine
from ibutsu_server.db.migrate import upgrade
from ibutsu_server.settings import DatabaseSettings
from ibutsu_testing.services import PG_HOST, PG_PORT, PG_USER, postgres_database


@contextmanager
def migrated_session(dialect: str, tmp_path: Path) -> Iterator[Session]:
    """A session on a freshly migrated database of ``dialect`` ('postgresql' or 'sqlite')."""
    with _database(dialect, tmp_path) as settings:
        engine = make_engine(settings)
        upgrade(engine)
        session = Session(engine, expire_on_commit=False)
        try:
            yield session
        finally:
            session.close()
            engine.dispose()


@contextmanager
def _database(dialect: str, tmp_path: Path) -> Iterator[DatabaseSettings]:
    if dialect == "sqlite":
        yield DatabaseSettings(sqlite_path=tmp_path / "ibutsu.sqlite3")
        return
    with postgres_database() as name:
        yield DatabaseSettings(host=PG_HOST, port=int(PG_PORT), user=PG_USER, database=name)
