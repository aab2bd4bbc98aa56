"""Webhook endpoints a user registers once; deliveries name the endpoint they are for.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("secret", sa.String(length=128), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("description", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_webhook_endpoints_user_id", "webhook_endpoints", ["user_id"])
    with op.batch_alter_table("webhook_deliveries") as b:
        b.alter_column("task_id", existing_type=sa.String(length=32), nullable=True)
        b.add_column(sa.Column("endpoint_id", sa.String(length=32), nullable=True))
        b.create_foreign_key("fk_webhook_deliveries_endpoint_id", "webhook_endpoints",
                             ["endpoint_id"], ["id"], ondelete="CASCADE")
        b.create_index("ix_webhook_deliveries_endpoint", ["endpoint_id", "id"])


def downgrade() -> None:
    op.execute("DELETE FROM webhook_deliveries WHERE task_id IS NULL")
    with op.batch_alter_table("webhook_deliveries") as b:
        b.drop_index("ix_webhook_deliveries_endpoint")
        b.drop_constraint("fk_webhook_deliveries_endpoint_id", type_="foreignkey")
        b.drop_column("endpoint_id")
        b.alter_column("task_id", existing_type=sa.String(length=32), nullable=False)
    op.drop_index("ix_webhook_endpoints_user_id", table_name="webhook_endpoints")
    op.drop_table("webhook_endpoints")
