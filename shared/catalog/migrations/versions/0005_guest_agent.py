"""The VM's guest agent socket, for application-consistent live backups.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    with op.batch_alter_table("vm_instance") as batch:
        batch.add_column(sa.Column("guestAgentSocket", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vm_instance") as batch:
        batch.drop_column("guestAgentSocket")
