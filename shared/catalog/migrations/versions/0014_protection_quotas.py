"""Protected backups (no delete, retention or prune until an admin unprotects them) and
per-project quotas on backups (stored bytes, count).

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

COLUMNS: dict[str, list[tuple[str, sa.types.TypeEngine[Any], bool]]] = {  # table -> its new columns
    "volume_backup": [("protected", sa.Boolean(), False)],
    "database_backup": [("protected", sa.Boolean(), False)],
    "project": [("quotaBackupBytes", sa.BigInteger(), True), ("quotaBackupCount", sa.BigInteger(), True)],
}


def upgrade() -> None:
    for table, columns in COLUMNS.items():
        with op.batch_alter_table(table) as batch:
            for name, kind, nullable in columns:
                default = None if nullable else sa.false()
                batch.add_column(sa.Column(name, kind, nullable=nullable, server_default=default))


def downgrade() -> None:
    for table, columns in reversed(COLUMNS.items()):
        with op.batch_alter_table(table) as batch:
            for name, _kind, _nullable in reversed(columns):
                batch.drop_column(name)
