"""Whose schema a database has, and creating upstream's schema where nobody has yet.

Ibutsu's backend owns the schema and records its Alembic history in ``alembic_version``. The
workers never write there: on an empty database (embedded default, tests, benchmarks,
standalone use) ``upgrade`` creates the same tables upstream's head has and records that in a
version table of its own; on a database the backend manages it checks that every table and
column the tasks use is there, and changes nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from ibutsu_server.db import schema

SCRIPT_LOCATION = "ibutsu_server.db:migrations"
#: Our own Alembic version table; upstream's is BACKEND_VERSION_TABLE.
VERSION_TABLE = "ibutsu_tasks_version"
BACKEND_VERSION_TABLE = "alembic_version"
#: The tables the tasks read and write (the rest of upstream's schema is the API's alone).
TASK_TABLES = (
    "projects",
    "runs",
    "results",
    "artifacts",
    "imports",
    "import_files",
    "users",
    "users_projects",
)


class SchemaError(Exception):
    """The database cannot serve the tasks; the message says what is missing and what to do."""


class Owner(enum.Enum):
    """Who manages a database's schema."""

    NOBODY = "nobody"  # an empty database
    TASKS = "ibutsu-tasks"  # created by `ibutsu-tasks db upgrade`
    BACKEND = "Ibutsu's backend"  # created by upstream's own migrations


@dataclass(frozen=True)
class SchemaState:
    """Whose schema a database has, at which revision, and what the tasks would miss in it."""

    owner: Owner
    revision: str | None
    missing: tuple[str, ...]

    @property
    def ready(self) -> bool:
        """True when every task can run on this database as it is."""
        if self.owner is Owner.NOBODY or self.missing:
            return False
        return self.owner is Owner.BACKEND or self.revision == _head()

    def describe(self) -> str:
        """One line for the operator."""
        if self.owner is Owner.NOBODY:
            return "no Ibutsu schema yet"
        text = f"managed by {self.owner.value} (revision {self.revision})"
        if self.missing:
            text += "; the tasks need what it lacks: " + ", ".join(self.missing)
        return text


def alembic_config(engine: Engine) -> Config:
    """An Alembic config bound to ``engine``; no alembic.ini is needed."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.attributes["engine"] = engine
    return config


def _head() -> str | None:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    return ScriptDirectory.from_config(config).get_current_head()


def _missing(engine: Engine) -> tuple[str, ...]:
    """The tables and columns of TASK_TABLES that the database lacks."""
    inspector = inspect(engine)
    present = set(inspector.get_table_names())
    missing: list[str] = []
    for name in TASK_TABLES:
        if name not in present:
            missing.append(name)
            continue
        columns = {column["name"] for column in inspector.get_columns(name)}
        missing += [
            f"{name}.{c.name}" for c in schema.metadata.tables[name].c if c.name not in columns
        ]
    return tuple(missing)


def inspect_schema(engine: Engine) -> SchemaState:
    """Who manages ``engine``'s schema, at which revision, and what the tasks would miss."""
    tables = set(inspect(engine).get_table_names())
    for owner, version_table in (
        (Owner.BACKEND, BACKEND_VERSION_TABLE),
        (Owner.TASKS, VERSION_TABLE),
    ):
        if version_table in tables:
            with engine.connect() as connection:
                context = MigrationContext.configure(
                    connection, opts={"version_table": version_table}
                )
                revision = context.get_current_revision()
            return SchemaState(owner, revision, _missing(engine))
    if tables & set(TASK_TABLES):
        # Tables without any version table: created by hand, or half by something else.
        return SchemaState(Owner.BACKEND, None, _missing(engine))
    return SchemaState(Owner.NOBODY, None, ())


def upgrade(engine: Engine) -> SchemaState:
    """Create upstream's schema on an empty database (or bring ours to the newest revision);
    leave a backend-managed one alone. Raises SchemaError when the tasks cannot use it."""
    state = inspect_schema(engine)
    if state.owner is not Owner.BACKEND:
        command.upgrade(alembic_config(engine), "head")
        state = inspect_schema(engine)
    if not state.ready:
        raise SchemaError(f"the database cannot serve the tasks: it is {state.describe()}")
    return state


def require_ready(engine: Engine) -> SchemaState:
    """The database's state, or SchemaError saying what to do when the tasks cannot use it."""
    state = inspect_schema(engine)
    if state.ready:
        return state
    if state.owner is Owner.BACKEND:
        raise SchemaError(
            f"the database is {state.describe()}: upgrade Ibutsu's backend, whose migrations own "
            "this schema"
        )
    raise SchemaError(f"the database has {state.describe()}: run `ibutsu-tasks db upgrade`")
