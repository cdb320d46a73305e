"""Scheduler fires (one row per trigger fire and group) and the job that made a backup.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    op.create_table(
        "scheduler_fire",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("schedulerTriggerUuid", sa.String(length=32), nullable=False),
        sa.Column("schedulerJobGroupUuid", sa.String(length=32), nullable=False),
        sa.Column("fireTime", sa.DateTime(timezone=True), nullable=False),
        sa.Column("manual", sa.Boolean(), nullable=False),
        sa.Column("done", sa.Boolean(), nullable=False),
        sa.Column("createDate", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lastOpDate", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("schedulerTriggerUuid", "schedulerJobGroupUuid", "fireTime"),
    )
    op.create_index("ix_scheduler_fire_schedulerTriggerUuid", "scheduler_fire", ["schedulerTriggerUuid"])
    with op.batch_alter_table("volume_backup") as batch:
        batch.add_column(sa.Column("schedulerJobUuid", sa.String(length=32), nullable=True))
        batch.create_index("ix_volume_backup_schedulerJobUuid", ["schedulerJobUuid"])


def downgrade() -> None:
    with op.batch_alter_table("volume_backup") as batch:
        batch.drop_index("ix_volume_backup_schedulerJobUuid")
        batch.drop_column("schedulerJobUuid")
    op.drop_index("ix_scheduler_fire_schedulerTriggerUuid", table_name="scheduler_fire")
    op.drop_table("scheduler_fire")
