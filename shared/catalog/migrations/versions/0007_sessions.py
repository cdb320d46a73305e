"""ZStack wire compatibility: accounts' optional password, login sessions, the project of a
scheduler job created on its own (ZStack's CreateSchedulerJob) before it joins a group, and the
ZStack message class an API job was started by (its result's event class).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    with op.batch_alter_table("account") as batch:
        batch.add_column(sa.Column("passwordHash", sa.String(length=255), nullable=True))
    with op.batch_alter_table("scheduler_job") as batch:
        batch.add_column(sa.Column("projectUuid", sa.String(length=32), nullable=True))
        batch.create_index("ix_scheduler_job_projectUuid", ["projectUuid"])
    with op.batch_alter_table("api_job") as batch:
        batch.add_column(sa.Column("zstackClass", sa.String(length=255), nullable=True))
    op.create_table(
        "session",
        sa.Column("uuid", sa.String(length=32), primary_key=True),
        sa.Column(
            "accountUuid", sa.String(length=32), sa.ForeignKey("account.uuid", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("createDate", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expiredDate", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_session_accountUuid", "session", ["accountUuid"])
    op.create_index("ix_session_expiredDate", "session", ["expiredDate"])


def downgrade() -> None:
    op.drop_index("ix_session_expiredDate", table_name="session")
    op.drop_index("ix_session_accountUuid", table_name="session")
    op.drop_table("session")
    with op.batch_alter_table("api_job") as batch:
        batch.drop_column("zstackClass")
    with op.batch_alter_table("scheduler_job") as batch:
        batch.drop_index("ix_scheduler_job_projectUuid")
        batch.drop_column("projectUuid")
    with op.batch_alter_table("account") as batch:
        batch.drop_column("passwordHash")
