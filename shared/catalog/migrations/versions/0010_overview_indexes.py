"""Indexes for the protection overview (GET /v1/overview, tests/bench/console_overview.py at
1,000 VMs and 100,000 backups): each volume's newest Ready and Failed backup, and each
target's newest failed scheduled run, as one index probe each.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

INDEXES = [
    ("ix_volume_backup_volume_status_date", "volume_backup", ["volumeUuid", "status", "createDate"]),
    ("ix_history_target_success_time", "scheduler_job_history", ["targetResourceUuid", "success", "executeTime"]),
]


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table)
