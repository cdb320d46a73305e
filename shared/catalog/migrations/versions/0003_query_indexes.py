"""Indexes for the queries people run most (tests/bench/api_query.py at 1 M histories and
100 k backups): default createDate order, refs by storage, history counts by success.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

INDEXES = [
    ("ix_volume_backup_createDate", "volume_backup", ["createDate"]),
    ("ix_volume_backup_status", "volume_backup", ["status"]),
    ("ix_volume_backup_mode", "volume_backup", ["mode"]),
    ("ix_vb_ref_storage_backup", "volume_backup_storage_ref", ["backupStorageUuid", "volumeBackupUuid"]),
    ("ix_history_group_success", "scheduler_job_history", ["schedulerJobGroupUuid", "success"]),
    ("ix_scheduler_job_history_createDate", "scheduler_job_history", ["createDate"]),
    ("ix_scheduler_job_history_success", "scheduler_job_history", ["success"]),
]


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table)
