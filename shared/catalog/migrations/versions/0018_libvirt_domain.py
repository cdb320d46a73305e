"""A VM that is a libvirt domain on its host (live backups through libvirt's backup API).

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    with op.batch_alter_table("vm_instance") as batch:
        batch.add_column(sa.Column("libvirtDomain", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("vm_instance") as batch:
        batch.drop_column("libvirtDomain")
