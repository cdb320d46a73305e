"""Fleet scale: stale Pending jobs found by an index (state, lastOpDate), and storages whose
space is reclaimed later (retention deletes manifests; one reclaim job frees the chunks).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    op.create_index("ix_api_job_state_lastOpDate", "api_job", ["state", "lastOpDate"])
    with op.batch_alter_table("backup_storage") as batch:
        batch.add_column(sa.Column("reclaimDue", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("lastReclaim", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("backup_storage") as batch:
        batch.drop_column("lastReclaim")
        batch.drop_column("reclaimDue")
    op.drop_index("ix_api_job_state_lastOpDate", table_name="api_job")
