"""ix_runs_age: prune runs by coalesce(start_time, created)

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Runs whose reports carried no timestamps have no start time; they age from `created`.
    op.create_index("ix_runs_age", "runs", [sa.text("coalesce(start_time, created)")])


def downgrade() -> None:
    op.drop_index("ix_runs_age", table_name="runs")
