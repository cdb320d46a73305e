"""Initial catalog: every table of shared.catalog.models.

Revision ID: 0001
Revises:
Create Date: 2026-11-25 16:19:05.300104
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | None = None
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def _resource() -> list[sa.Column[object]]:
    """uuid, name and description of every resource row (``Resource`` in the models)."""
    return [
        sa.Column("uuid", sa.String(length=32), primary_key=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
    ]


def _stamps() -> list[sa.Column[object]]:
    """createDate and lastOpDate of every row (``Stamped`` in the models)."""
    return [
        sa.Column("createDate", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lastOpDate", sa.DateTime(timezone=True), nullable=False),
    ]


def _index(table: str, *columns: str, name: str | None = None) -> None:
    """An index named as ``mapped_column(index=True)`` names it, unless ``name`` is given."""
    op.create_index(name or f"ix_{table}_{columns[0]}", table, list(columns), unique=False)


# Creation order respects foreign keys; downgrade drops in reverse.
TABLES = (
    "host",
    "vm_instance",
    "volume",
    "backup_storage",
    "volume_backup",
    "volume_backup_storage_ref",
    "database_backup",
    "database_backup_storage_ref",
    "scheduler_job_group",
    "scheduler_job",
    "scheduler_trigger",
    "scheduler_job_group_trigger_ref",
    "scheduler_job_history",
    "tag",
    "account",
    "api_key",
    "api_job",
)


def upgrade() -> None:
    # -- resources backups are taken of ---------------------------------------------------------
    op.create_table(
        "host",
        *_resource(),
        sa.Column("managementIp", sa.String(length=255), nullable=True),
        sa.Column("hostname", sa.String(length=255), nullable=True),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("lastHeartbeat", sa.DateTime(timezone=True), nullable=True),
        *_stamps(),
    )

    op.create_table(
        "vm_instance",
        *_resource(),
        sa.Column("hostUuid", sa.String(length=32), sa.ForeignKey("host.uuid"), nullable=True),
        sa.Column("platform", sa.String(length=64), nullable=False),
        sa.Column("cpuNum", sa.Integer(), nullable=False),
        sa.Column("memorySize", sa.BigInteger(), nullable=False),
        sa.Column("projectUuid", sa.String(length=32), nullable=True),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("qmpSocket", sa.Text(), nullable=True),
        *_stamps(),
    )
    _index("vm_instance", "hostUuid")
    _index("vm_instance", "projectUuid")

    op.create_table(
        "volume",
        *_resource(),
        sa.Column("vmInstanceUuid", sa.String(length=32), sa.ForeignKey("vm_instance.uuid"), nullable=True),
        sa.Column("hostUuid", sa.String(length=32), sa.ForeignKey("host.uuid"), nullable=False),
        sa.Column("projectUuid", sa.String(length=32), nullable=True),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("installPath", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        *_stamps(),
    )
    _index("volume", "vmInstanceUuid")
    _index("volume", "hostUuid")
    _index("volume", "projectUuid")

    op.create_table(
        "backup_storage",
        *_resource(),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("totalCapacity", sa.BigInteger(), nullable=False),
        sa.Column("availableCapacity", sa.BigInteger(), nullable=False),
        sa.Column("repositoryUuid", sa.String(length=64), nullable=True),
        sa.Column("credentials", sa.JSON(), nullable=True),
        *_stamps(),
    )

    # -- backups --------------------------------------------------------------------------------
    op.create_table(
        "volume_backup",
        *_resource(),
        sa.Column("volumeUuid", sa.String(length=32), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("parentUuid", sa.String(length=32), nullable=True),
        sa.Column("groupUuid", sa.String(length=32), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        *_stamps(),
    )
    _index("volume_backup", "volumeUuid")
    _index("volume_backup", "groupUuid")

    op.create_table(
        "volume_backup_storage_ref",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "volumeBackupUuid",
            sa.String(length=32),
            sa.ForeignKey("volume_backup.uuid", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("backupStorageUuid", sa.String(length=32), sa.ForeignKey("backup_storage.uuid"), nullable=False),
        sa.Column("installPath", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        *_stamps(),
        sa.UniqueConstraint("volumeBackupUuid", "backupStorageUuid"),
    )
    _index("volume_backup_storage_ref", "volumeBackupUuid")
    _index("volume_backup_storage_ref", "backupStorageUuid")

    op.create_table(
        "database_backup",
        *_resource(),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        *_stamps(),
    )

    op.create_table(
        "database_backup_storage_ref",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "databaseBackupUuid",
            sa.String(length=32),
            sa.ForeignKey("database_backup.uuid", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("backupStorageUuid", sa.String(length=32), sa.ForeignKey("backup_storage.uuid"), nullable=False),
        sa.Column("installPath", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        *_stamps(),
        sa.UniqueConstraint("databaseBackupUuid", "backupStorageUuid"),
    )
    _index("database_backup_storage_ref", "databaseBackupUuid")
    _index("database_backup_storage_ref", "backupStorageUuid")

    # -- scheduling -----------------------------------------------------------------------------
    op.create_table(
        "scheduler_job_group",
        *_resource(),
        sa.Column("jobType", sa.String(length=32), nullable=False),
        sa.Column("jobData", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(length=32), nullable=False),
        *_stamps(),
    )

    op.create_table(
        "scheduler_job",
        *_resource(),
        sa.Column(
            "schedulerJobGroupUuid",
            sa.String(length=32),
            sa.ForeignKey("scheduler_job_group.uuid", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("targetResourceUuid", sa.String(length=32), nullable=False),
        sa.Column("jobType", sa.String(length=32), nullable=True),
        sa.Column("jobData", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(length=32), nullable=False),
        *_stamps(),
    )
    _index("scheduler_job", "schedulerJobGroupUuid")
    _index("scheduler_job", "targetResourceUuid")

    op.create_table(
        "scheduler_trigger",
        *_resource(),
        sa.Column("schedulerType", sa.String(length=16), nullable=False),
        sa.Column("schedulerInterval", sa.Integer(), nullable=True),
        sa.Column("repeatCount", sa.Integer(), nullable=True),
        sa.Column("startTime", sa.BigInteger(), nullable=True),
        sa.Column("stopTime", sa.BigInteger(), nullable=True),
        sa.Column("cron", sa.String(length=255), nullable=True),
        sa.Column("timeZone", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=32), nullable=False),
        *_stamps(),
    )

    op.create_table(
        "scheduler_job_group_trigger_ref",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "schedulerJobGroupUuid",
            sa.String(length=32),
            sa.ForeignKey("scheduler_job_group.uuid", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "schedulerTriggerUuid",
            sa.String(length=32),
            sa.ForeignKey("scheduler_trigger.uuid", ondelete="CASCADE"),
            nullable=False,
        ),
        *_stamps(),
        sa.UniqueConstraint("schedulerJobGroupUuid", "schedulerTriggerUuid"),
    )

    op.create_table(
        "scheduler_job_history",
        # BIGINT on PostgreSQL; INTEGER on SQLite, where only INTEGER PRIMARY KEY autoincrements.
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("executeTime", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requestDump", sa.Text(), nullable=True),
        sa.Column("resultDump", sa.Text(), nullable=True),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("schedulerJobGroupUuid", sa.String(length=32), nullable=True),
        sa.Column("schedulerJobUuid", sa.String(length=32), nullable=True),
        sa.Column("targetResourceUuid", sa.String(length=32), nullable=True),
        sa.Column("triggerUuid", sa.String(length=32), nullable=True),
        *_stamps(),
    )
    _index("scheduler_job_history", "schedulerJobGroupUuid", "executeTime", name="ix_history_group_time")
    _index("scheduler_job_history", "executeTime")
    _index("scheduler_job_history", "schedulerJobUuid")
    _index("scheduler_job_history", "targetResourceUuid")

    # -- tags, accounts, API jobs ---------------------------------------------------------------
    op.create_table(
        "tag",
        sa.Column("uuid", sa.String(length=32), primary_key=True),
        sa.Column("resourceUuid", sa.String(length=32), nullable=False),
        sa.Column("resourceType", sa.String(length=64), nullable=False),
        sa.Column("tag", sa.Text(), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        *_stamps(),
    )
    _index("tag", "resourceUuid", "type", name="ix_tag_resource")

    op.create_table(
        "account",
        *_resource(),
        sa.Column("type", sa.String(length=16), nullable=False),
        *_stamps(),
    )

    op.create_table(
        "api_key",
        sa.Column("uuid", sa.String(length=32), primary_key=True),
        sa.Column(
            "accountUuid", sa.String(length=32), sa.ForeignKey("account.uuid", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("keyHash", sa.String(length=128), nullable=False, unique=True),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("lastUsedDate", sa.DateTime(timezone=True), nullable=True),
        *_stamps(),
    )
    _index("api_key", "accountUuid")

    op.create_table(
        "api_job",
        sa.Column("uuid", sa.String(length=64), primary_key=True),
        sa.Column("action", sa.String(length=128), nullable=False),
        sa.Column("resourceUuid", sa.String(length=32), nullable=True),
        sa.Column("resourceType", sa.String(length=64), nullable=True),
        sa.Column("hostUuid", sa.String(length=32), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("accountUuid", sa.String(length=32), nullable=True),
        *_stamps(),
    )
    _index("api_job", "resourceUuid")
    _index("api_job", "hostUuid")


def downgrade() -> None:
    # Dropping a table drops its indexes and constraints with it.
    for table in reversed(TABLES):
        op.drop_table(table)
