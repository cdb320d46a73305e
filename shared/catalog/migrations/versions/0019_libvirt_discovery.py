"""libvirt hosts (docs/libvirt.md): a host's libvirt connection as its worker last saw it,
which VM instances and volumes libvirt owns (discovered, not registered by hand), a volume's
device name in its domain, and the disks of a domain that are not backed up, with why.

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    with op.batch_alter_table("host") as batch:
        batch.add_column(sa.Column("libvirtUri", sa.Text(), nullable=True))
        batch.add_column(sa.Column("libvirtStatus", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("libvirtReason", sa.Text(), nullable=True))
    with op.batch_alter_table("vm_instance") as batch:
        batch.add_column(sa.Column("managedBy", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("skippedDisks", sa.JSON(), nullable=True))
    with op.batch_alter_table("volume") as batch:
        batch.add_column(sa.Column("managedBy", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("deviceName", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("volume") as batch:
        batch.drop_column("deviceName")
        batch.drop_column("managedBy")
    with op.batch_alter_table("vm_instance") as batch:
        batch.drop_column("skippedDisks")
        batch.drop_column("managedBy")
    with op.batch_alter_table("host") as batch:
        batch.drop_column("libvirtReason")
        batch.drop_column("libvirtStatus")
        batch.drop_column("libvirtUri")
