"""Alembic environment: runs online against the engine passed in by ibutsu_server.db.migrate."""

from alembic import context

from ibutsu_server.db.migrate import VERSION_TABLE
from ibutsu_server.db.schema import metadata

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # Never upstream's alembic_version: the backend's history is not ours to write.
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    context.run_migrations()
