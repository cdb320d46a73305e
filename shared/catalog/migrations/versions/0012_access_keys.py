"""ZStack access keys (``Authorization: ZStack <AccessKeyID>:<signature>``): each key's id in
the clear, its secret sealed to its row under the server secret.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    op.create_table(
        "access_key",
        sa.Column("uuid", sa.String(length=32), primary_key=True),
        sa.Column(
            "accountUuid", sa.String(length=32), sa.ForeignKey("account.uuid", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("userUuid", sa.String(length=32), nullable=False),
        sa.Column("AccessKeyID", sa.String(length=64), nullable=False, unique=True),
        sa.Column("sealedSecret", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("lastUsedDate", sa.DateTime(timezone=True), nullable=True),
        sa.Column("createDate", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lastOpDate", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_access_key_accountUuid", "access_key", ["accountUuid"])


def downgrade() -> None:
    op.drop_index("ix_access_key_accountUuid", table_name="access_key")
    op.drop_table("access_key")
