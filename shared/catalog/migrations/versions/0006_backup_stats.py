"""What the engine did for each volume backup (bytes read and written, chunks, new chunks),
for the metrics.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

COLUMNS = ("bytesRead", "bytesWritten", "chunks", "newChunks")


def upgrade() -> None:
    with op.batch_alter_table("volume_backup") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("volume_backup") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
