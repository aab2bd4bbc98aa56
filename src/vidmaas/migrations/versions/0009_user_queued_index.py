"""An index of each user's queued tasks: a create's two counts of them (the quota and
the guarded insert) read only what the user has waiting.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_QUEUED = sa.text("status = 'queued'")


def upgrade() -> None:
    op.create_index("ix_tasks_user_queued", "tasks", ["user_id"], postgresql_where=_QUEUED,
                    sqlite_where=_QUEUED)


def downgrade() -> None:
    op.drop_index("ix_tasks_user_queued", table_name="tasks")
