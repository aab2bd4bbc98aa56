"""Users' weights, priorities and quotas; named, expiring keys; task priority and usage.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as b:
        b.add_column(sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("weight", sa.Float(), server_default="1.0", nullable=False))
        b.add_column(sa.Column("max_priority", sa.String(length=8), server_default="normal",
                               nullable=False))
        b.add_column(sa.Column("quota_queued_tasks", sa.Integer(), nullable=True))
        b.add_column(sa.Column("quota_gpus_at_once", sa.Integer(), nullable=True))
        b.add_column(sa.Column("quota_gpu_seconds_day", sa.Float(), nullable=True))
        b.add_column(sa.Column("quota_gpu_seconds_month", sa.Float(), nullable=True))
    with op.batch_alter_table("api_keys") as b:
        b.add_column(sa.Column("name", sa.String(length=64), nullable=True))
        b.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
        b.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("tasks") as b:
        b.add_column(sa.Column("priority", sa.String(length=8), server_default="normal",
                               nullable=False))
        b.add_column(sa.Column("gpu_seconds", sa.Float(), nullable=True))
        b.add_column(sa.Column("queue_wait_s", sa.Float(), nullable=True))
    op.create_table(
        "usage_daily",
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("tasks", sa.Integer(), nullable=False),
        sa.Column("gpu_seconds", sa.Float(), nullable=False),
        sa.Column("queue_wait_s", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", "day", "model"),
    )


def downgrade() -> None:
    op.drop_table("usage_daily")
    with op.batch_alter_table("tasks") as b:
        for c in ("queue_wait_s", "gpu_seconds", "priority"):
            b.drop_column(c)
    with op.batch_alter_table("api_keys") as b:
        for c in ("expires_at", "last_used_at", "name"):
            b.drop_column(c)
    with op.batch_alter_table("users") as b:
        for c in ("quota_gpu_seconds_month", "quota_gpu_seconds_day", "quota_gpus_at_once",
                  "quota_queued_tasks", "max_priority", "weight", "disabled_at"):
            b.drop_column(c)
