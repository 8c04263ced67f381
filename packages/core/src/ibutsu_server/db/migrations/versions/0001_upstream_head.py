"""upstream's schema at its head d18de2b3253f, on an empty database

Revision ID: 0001
Revises:
Create Date: 2026-12-01

Creates exactly the tables, constraints and indexes upstream's own migrations create (see
ibutsu_server.db.schema). A database that upstream's backend manages is never migrated here:
ibutsu_server.db.migrate recognises it and leaves it alone.
"""

from alembic import op

from ibutsu_server.db import schema

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema.metadata.create_all(op.get_bind())


def downgrade() -> None:
    schema.metadata.drop_all(op.get_bind())
