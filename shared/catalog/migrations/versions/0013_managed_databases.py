"""Registered MySQL/MariaDB databases (ZStack's management database) and the database a
database backup is of (none: the catalog).

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    op.create_table(
        "managed_database",
        sa.Column("uuid", sa.String(length=32), primary_key=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("engine", sa.String(length=32), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=255), nullable=False),
        sa.Column("databaseName", sa.String(length=64), nullable=False),
        sa.Column("sealedPassword", sa.Text(), nullable=True),
        sa.Column("createDate", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lastOpDate", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("database_backup") as batch:
        batch.add_column(sa.Column("databaseUuid", sa.String(length=32), nullable=True))
        batch.create_index("ix_database_backup_databaseUuid", ["databaseUuid"])


def downgrade() -> None:
    with op.batch_alter_table("database_backup") as batch:
        batch.drop_index("ix_database_backup_databaseUuid")
        batch.drop_column("databaseUuid")
    op.drop_table("managed_database")
