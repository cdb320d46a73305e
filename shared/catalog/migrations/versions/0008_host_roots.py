"""Host roots: the folders a host's worker may open volumes in and its VM socket folder, as
the worker reports them when it registers its host (shared.hostpaths).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    with op.batch_alter_table("host") as batch:
        batch.add_column(sa.Column("volumeRoots", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("vmSocketDir", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("host") as batch:
        batch.drop_column("vmSocketDir")
        batch.drop_column("volumeRoots")
