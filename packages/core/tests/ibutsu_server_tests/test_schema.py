"""The schema belongs to Ibutsu's backend: our migration creates exactly upstream's, and a
database upstream's migrations created is used as it is, never migrated."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.orm import Session

from ibutsu_server.db.engine import make_engine
from ibutsu_server.db.migrate import (
    BACKEND_VERSION_TABLE,
    VERSION_TABLE,
    Owner,
    SchemaError,
    inspect_schema,
    require_ready,
    upgrade,
)
from ibutsu_server.db.models import Result, Run, utcnow
from ibutsu_server.db.schema import UPSTREAM_REVISION, metadata
from ibutsu_server.settings import DatabaseSettings
from ibutsu_testing.services import PG_HOST, PG_PORT, PG_USER, postgres_database, psql

# Upstream's schema dump, in the test's sandbox at its repository path (see BUILD).
UPSTREAM = Path("testdata/ibutsu-upstream")


@pytest.fixture
def postgres() -> Iterator[tuple[str, Engine]]:
    with postgres_database() as name:
        engine = make_engine(
            DatabaseSettings(host=PG_HOST, port=int(PG_PORT), user=PG_USER, database=name)
        )
        yield name, engine
        engine.dispose()


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(DatabaseSettings(sqlite_path=tmp_path / "ibutsu.sqlite3"))
    yield engine
    engine.dispose()


def _dump(database: str) -> str:
    done = subprocess.run(
        [
            "pg_dump",
            "--schema-only",
            "--no-owner",
            "-h",
            PG_HOST,
            "-p",
            PG_PORT,
            "-U",
            PG_USER,
            database,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def _statements(dump: str) -> list[str]:
    """A pg_dump's SQL statements, one line each; comments and psql commands left out."""
    lines = [
        line.strip()
        for line in dump.splitlines()
        if line.strip() and not line.startswith(("--", "\\"))
    ]
    return [statement.strip() for statement in " ".join(lines).split(";")]


def _schema(dump: str) -> tuple[dict[str, list[str]], set[str]]:
    """A pg_dump as {table: its column lines} and the set of every other statement (keys,
    indexes, foreign keys), each version table left out."""
    statements = _statements(dump)
    tables: dict[str, list[str]] = {}
    others: set[str] = set()
    for statement in statements:
        if not statement or statement.startswith(("SET ", "SELECT pg_catalog", "\\")):
            continue
        if any(name in statement for name in (BACKEND_VERSION_TABLE, VERSION_TABLE)):
            continue
        created = re.match(r"CREATE TABLE public\.(\w+) \((.*)\)$", statement)
        if created:
            tables[created.group(1)] = [c.strip() for c in created.group(2).split(",")]
        else:
            others.add(statement)
    return tables, others


def test_our_migration_creates_upstreams_schema_table_by_table(
    postgres: tuple[str, Engine],
) -> None:
    name, engine = postgres
    assert inspect_schema(engine).owner is Owner.NOBODY
    upgrade(engine)
    upgrade(engine)  # idempotent
    ours_tables, ours_others = _schema(_dump(name))
    upstream_tables, upstream_others = _schema((UPSTREAM / "schema.sql").read_text())
    assert sorted(ours_tables) == sorted(upstream_tables)
    for table, columns in upstream_tables.items():
        assert ours_tables[table] == columns, table  # column by column, in order
    assert ours_others == upstream_others  # primary keys, indexes, foreign keys
    state = inspect_schema(engine)
    assert (state.owner, state.revision, state.ready) == (Owner.TASKS, "0001", True)
    assert BACKEND_VERSION_TABLE not in inspect(engine).get_table_names()


def test_a_database_upstream_created_is_used_as_it_is(postgres: tuple[str, Engine]) -> None:
    name, engine = postgres
    psql(name, "-f", str(UPSTREAM / "schema.sql"))
    psql(name, "-c", f"INSERT INTO alembic_version VALUES ('{UPSTREAM_REVISION}')")
    before = _statements(_dump(name))
    state = upgrade(engine)
    assert (state.owner, state.revision, state.ready) == (Owner.BACKEND, UPSTREAM_REVISION, True)
    assert _statements(_dump(name)) == before  # nothing changed, no version table of ours
    assert require_ready(engine) == state
    # The models read and write it.
    with Session(engine) as session, session.begin():
        start = utcnow()
        run = Run(id=uuid.uuid4(), start_time=start, created=start, summary={"tests": 0})
        session.add(run)
        session.flush()
        session.add(
            Result(id=uuid.uuid4(), run_id=run.id, test_id="t", result="passed", start_time=start)
        )
    with engine.connect() as connection:
        assert connection.scalar(select(Result.test_id)) == "t"


def test_a_backend_schema_missing_what_the_tasks_need_is_named(
    postgres: tuple[str, Engine],
) -> None:
    name, engine = postgres
    psql(name, "-f", str(UPSTREAM / "schema.sql"))
    psql(
        name,
        "-c",
        "INSERT INTO alembic_version VALUES ('cacecc4f1237'); ALTER TABLE runs DROP COLUMN summary",
    )
    with pytest.raises(SchemaError, match=r"revision cacecc4f1237.*lacks: runs\.summary"):
        upgrade(engine)
    with pytest.raises(SchemaError, match="upgrade Ibutsu's backend"):
        require_ready(engine)
    assert VERSION_TABLE not in inspect(engine).get_table_names()


def test_an_empty_database_says_to_upgrade(sqlite: Engine) -> None:
    with pytest.raises(SchemaError, match="run `ibutsu-tasks db upgrade`"):
        require_ready(sqlite)


# SQLite cannot reflect expression indexes: those are PostgreSQL-only anyway.
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression")
@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_the_models_match_what_the_migration_creates(
    dialect: str, postgres: tuple[str, Engine], sqlite: Engine
) -> None:
    engine = postgres[1] if dialect == "postgresql" else sqlite
    upgrade(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        diff = compare_metadata(context, metadata)
    if dialect == "sqlite":
        # SQLite cannot add a foreign key to an existing table, and this one closes a cycle.
        diff = [d for d in diff if d[0] != "add_fk" or d[1].name != "fk_project_default_dashboard"]
    assert diff == []
    if dialect == "postgresql":
        with engine.connect() as connection:
            found = connection.scalar(
                text(
                    "SELECT data_type FROM information_schema.columns "
                    "WHERE table_name = 'results' AND column_name = 'data'"
                )
            )
        assert found == "jsonb"
