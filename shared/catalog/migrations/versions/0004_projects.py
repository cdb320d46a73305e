"""Projects and their members; the owner project of scheduler job groups and triggers.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

OWNED = ("scheduler_job_group", "scheduler_trigger")  # projectUuid NULL: admin only


def upgrade() -> None:
    op.create_table(
        "project",
        sa.Column("uuid", sa.String(length=32), primary_key=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("createDate", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lastOpDate", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "project_member",
        sa.Column("uuid", sa.String(length=32), primary_key=True),
        sa.Column(
            "projectUuid", sa.String(length=32), sa.ForeignKey("project.uuid", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "accountUuid", sa.String(length=32), sa.ForeignKey("account.uuid", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("createDate", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lastOpDate", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("projectUuid", "accountUuid"),
    )
    op.create_index("ix_project_member_accountUuid", "project_member", ["accountUuid"])
    for table in OWNED:
        op.add_column(table, sa.Column("projectUuid", sa.String(length=32), nullable=True))
        op.create_index(f"ix_{table}_projectUuid", table, ["projectUuid"])


def downgrade() -> None:
    for table in reversed(OWNED):
        with op.batch_alter_table(table) as batch:  # SQLite drops a column by copying the table
            batch.drop_index(f"ix_{table}_projectUuid")
            batch.drop_column("projectUuid")
    op.drop_index("ix_project_member_accountUuid", table_name="project_member")
    op.drop_table("project_member")
    op.drop_table("project")
