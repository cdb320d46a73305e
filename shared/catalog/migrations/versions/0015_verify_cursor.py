"""Scheduled verify: where each verify job's cycle over its storage's chunks stands.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    op.create_table(
        "verify_cursor",
        sa.Column("schedulerJobUuid", sa.String(length=32), primary_key=True),
        sa.Column("backupStorageUuid", sa.String(length=32), nullable=False),
        sa.Column("position", sa.String(length=128), nullable=False),
        sa.Column("cycle", sa.Integer(), nullable=False),
        sa.Column("cycleStarted", sa.DateTime(timezone=True), nullable=True),
        sa.Column("chunksChecked", sa.BigInteger(), nullable=False),
        sa.Column("damagedChunks", sa.BigInteger(), nullable=False),
        sa.Column("repairedChunks", sa.BigInteger(), nullable=False),
        sa.Column("createDate", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lastOpDate", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_verify_cursor_backupStorageUuid", "verify_cursor", ["backupStorageUuid"])


def downgrade() -> None:
    op.drop_index("ix_verify_cursor_backupStorageUuid", "verify_cursor")
    op.drop_table("verify_cursor")
