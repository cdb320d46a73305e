"""SQLAlchemy 2 models: one class per inventory of docs/api.md (and the rows behind accounts and API jobs)."""

from __future__ import annotations

import uuid as uuidlib
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from shared.catalog.clock import catalog_now


def new_uuid() -> str:
    """A ZStack-style uuid: 32 lowercase hex digits, no dashes."""
    return uuidlib.uuid4().hex


def now() -> datetime:
    """Now on the catalog's clock (:mod:`shared.catalog.clock`): what every row's times use."""
    return catalog_now()


def aware(value: datetime) -> datetime:
    """``value`` in UTC when a database (SQLite) returned it without a time zone."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Every catalog row. ``resource_type`` names it for tags and errors; ``secret_fields`` are
    write-only (never returned, never logged)."""

    resource_type: ClassVar[str] = ""
    secret_fields: ClassVar[frozenset[str]] = frozenset()
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Stamped:
    createDate: Mapped[datetime] = mapped_column(default=now)
    lastOpDate: Mapped[datetime] = mapped_column(default=now, onupdate=now)


class Resource(Stamped):
    uuid: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    name: Mapped[str] = mapped_column(String(255), default="")
    description: Mapped[str | None] = mapped_column(Text, default=None)


# -- resources backups are taken of -------------------------------------------------------------
class Host(Resource, Base):
    __tablename__ = "host"
    resource_type = "HostVO"
    managementIp: Mapped[str | None] = mapped_column(String(255))
    hostname: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    status: Mapped[str] = mapped_column(String(32), default="Connected")
    lastHeartbeat: Mapped[datetime | None] = mapped_column()
    # what its worker reported (real paths): where volumes may be, where VM sockets are
    volumeRoots: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    vmSocketDir: Mapped[str | None] = mapped_column(Text, default=None)
    # its worker's libvirt connection (docs/libvirt.md): the URI, Connected/Disconnected and why
    libvirtUri: Mapped[str | None] = mapped_column(Text, default=None)
    libvirtStatus: Mapped[str | None] = mapped_column(String(32), default=None)
    libvirtReason: Mapped[str | None] = mapped_column(Text, default=None)


class VmInstance(Resource, Base):
    __tablename__ = "vm_instance"
    resource_type = "VmInstanceVO"
    hostUuid: Mapped[str | None] = mapped_column(ForeignKey("host.uuid"), index=True)
    platform: Mapped[str] = mapped_column(String(64), default="Linux")
    cpuNum: Mapped[int] = mapped_column(Integer, default=1)
    memorySize: Mapped[int] = mapped_column(BigInteger, default=0)
    projectUuid: Mapped[str | None] = mapped_column(String(32), index=True)
    state: Mapped[str] = mapped_column(String(32), default="Stopped")
    qmpSocket: Mapped[str | None] = mapped_column(Text)  # QMP socket on its host: live backups
    guestAgentSocket: Mapped[str | None] = mapped_column(Text)  # guest agent: fsfreeze around them
    # a libvirt domain on its host (uuid = the domain's without dashes): backed up through libvirt
    libvirtDomain: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    managedBy: Mapped[str | None] = mapped_column(String(16), default=None)  # "libvirt": discovered
    # a libvirt domain's disks that are not volumes: [{"deviceName", "source", "reason"}]
    skippedDisks: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)


class Volume(Resource, Base):
    __tablename__ = "volume"
    resource_type = "VolumeVO"
    vmInstanceUuid: Mapped[str | None] = mapped_column(ForeignKey("vm_instance.uuid"), index=True)
    hostUuid: Mapped[str] = mapped_column(ForeignKey("host.uuid"), index=True)
    projectUuid: Mapped[str | None] = mapped_column(String(32), index=True)
    type: Mapped[str] = mapped_column(String(16), default="Data")
    format: Mapped[str] = mapped_column(String(16), default="raw")
    installPath: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    status: Mapped[str] = mapped_column(String(32), default="Ready")
    managedBy: Mapped[str | None] = mapped_column(String(16), default=None)  # "libvirt": discovered
    deviceName: Mapped[str | None] = mapped_column(String(64), default=None)  # its target in the domain


class BackupStorage(Resource, Base):
    __tablename__ = "backup_storage"
    resource_type = "BackupStorageVO"
    secret_fields = frozenset({"credentials"})
    type: Mapped[str] = mapped_column(String(32), default="ImageStore")
    url: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16), default="master")
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    status: Mapped[str] = mapped_column(String(32), default="Connected")
    totalCapacity: Mapped[int] = mapped_column(BigInteger, default=0)
    availableCapacity: Mapped[int] = mapped_column(BigInteger, default=0)
    repositoryUuid: Mapped[str | None] = mapped_column(String(64))
    credentials: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # retention deleted backups here whose chunks no reclaim has freed yet (one reclaim job
    # frees them later: shared.service.deletion.reclaim_due)
    reclaimDue: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    lastReclaim: Mapped[datetime | None] = mapped_column(default=None)


# -- backups -----------------------------------------------------------------------------------
class VolumeBackup(Resource, Base):
    __tablename__ = "volume_backup"
    __table_args__ = (
        Index("ix_volume_backup_createDate", "createDate"),
        Index("ix_volume_backup_status", "status"),
        Index("ix_volume_backup_mode", "mode"),
        Index("ix_volume_backup_volume_status_date", "volumeUuid", "status", "createDate"),
    )
    resource_type = "VolumeBackupVO"
    volumeUuid: Mapped[str] = mapped_column(String(32), index=True)
    type: Mapped[str] = mapped_column(String(16), default="Data")
    mode: Mapped[str] = mapped_column(String(16), default="full")
    parentUuid: Mapped[str | None] = mapped_column(String(32))
    groupUuid: Mapped[str | None] = mapped_column(String(32), index=True)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", default=None)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    status: Mapped[str] = mapped_column(String(32), default="Creating")
    schedulerJobUuid: Mapped[str | None] = mapped_column(String(32), index=True, default=None)
    # no delete, retention or prune until an admin unprotects it (docs/protection.md)
    protected: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # what the engine did, recorded when the backup turns Ready (None: older rows, imports)
    bytesRead: Mapped[int | None] = mapped_column(BigInteger, default=None)
    bytesWritten: Mapped[int | None] = mapped_column(BigInteger, default=None)
    chunks: Mapped[int | None] = mapped_column(BigInteger, default=None)
    newChunks: Mapped[int | None] = mapped_column(BigInteger, default=None)
    backupStorageRefs: Mapped[list[VolumeBackupStorageRef]] = relationship(
        back_populates="backup", cascade="all, delete-orphan", lazy="selectin", order_by="VolumeBackupStorageRef.id"
    )


class VolumeBackupSummary(Base):
    """Each volume's newest Ready and newest Failed volume backup (by createDate, then uuid), so
    the overview reads one row a volume instead of probing its backups. Written by the catalog
    itself (triggers of migration 0014 on every insert, delete and change of status, date or
    volume of a volume backup, whichever code or SQL makes it); no row: neither exists."""

    __tablename__ = "volume_backup_summary"
    volumeUuid: Mapped[str] = mapped_column(String(32), primary_key=True)
    readyUuid: Mapped[str | None] = mapped_column(String(32))
    readyDate: Mapped[datetime | None] = mapped_column()
    failedUuid: Mapped[str | None] = mapped_column(String(32))
    failedDate: Mapped[datetime | None] = mapped_column()


class VolumeBackupStorageRef(Stamped, Base):
    __tablename__ = "volume_backup_storage_ref"
    __table_args__ = (
        UniqueConstraint("volumeBackupUuid", "backupStorageUuid"),
        Index("ix_vb_ref_storage_backup", "backupStorageUuid", "volumeBackupUuid"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    volumeBackupUuid: Mapped[str] = mapped_column(ForeignKey("volume_backup.uuid", ondelete="CASCADE"), index=True)
    backupStorageUuid: Mapped[str] = mapped_column(ForeignKey("backup_storage.uuid"), index=True)
    installPath: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(32), default="Creating")
    backup: Mapped[VolumeBackup] = relationship(back_populates="backupStorageRefs")


class ManagedDatabase(Resource, Base):
    """A MySQL/MariaDB database an admin registered for database backups (ZStack's management
    database): a TCP host and port, a login whose password is sealed to the row
    (shared.secret.seal), and the database's name."""

    __tablename__ = "managed_database"
    resource_type = "DatabaseVO"
    secret_fields = frozenset({"sealedPassword"})
    engine: Mapped[str] = mapped_column(String(32), default="MySQL")
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer, default=3306)
    username: Mapped[str] = mapped_column(String(255))
    databaseName: Mapped[str] = mapped_column(String(64))
    sealedPassword: Mapped[str | None] = mapped_column(Text, default=None)


class DatabaseBackup(Resource, Base):
    __tablename__ = "database_backup"
    resource_type = "DatabaseBackupVO"
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", default=None)
    # the registered database it is a backup of; None: the catalog itself
    databaseUuid: Mapped[str | None] = mapped_column(String(32), index=True, default=None)
    protected: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    status: Mapped[str] = mapped_column(String(32), default="Creating")
    backupStorageRefs: Mapped[list[DatabaseBackupStorageRef]] = relationship(
        back_populates="backup", cascade="all, delete-orphan", lazy="selectin", order_by="DatabaseBackupStorageRef.id"
    )


class DatabaseBackupStorageRef(Stamped, Base):
    __tablename__ = "database_backup_storage_ref"
    __table_args__ = (UniqueConstraint("databaseBackupUuid", "backupStorageUuid"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    databaseBackupUuid: Mapped[str] = mapped_column(ForeignKey("database_backup.uuid", ondelete="CASCADE"), index=True)
    backupStorageUuid: Mapped[str] = mapped_column(ForeignKey("backup_storage.uuid"), index=True)
    installPath: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(32), default="Creating")
    backup: Mapped[DatabaseBackup] = relationship(back_populates="backupStorageRefs")


# -- scheduling --------------------------------------------------------------------------------
class SchedulerJobGroup(Resource, Base):
    __tablename__ = "scheduler_job_group"
    resource_type = "SchedulerJobGroupVO"
    jobType: Mapped[str] = mapped_column(String(32))
    jobData: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    projectUuid: Mapped[str | None] = mapped_column(String(32), index=True, default=None)  # None: admin only


class SchedulerJob(Resource, Base):
    __tablename__ = "scheduler_job"
    resource_type = "SchedulerJobVO"
    schedulerJobGroupUuid: Mapped[str | None] = mapped_column(
        ForeignKey("scheduler_job_group.uuid", ondelete="SET NULL"), index=True
    )
    targetResourceUuid: Mapped[str] = mapped_column(String(32), index=True)
    jobType: Mapped[str | None] = mapped_column(String(32))
    jobData: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    # a job not in a group yet (ZStack's CreateSchedulerJob) belongs to this project (None: admin only)
    projectUuid: Mapped[str | None] = mapped_column(String(32), index=True, default=None)


class SchedulerTrigger(Resource, Base):
    __tablename__ = "scheduler_trigger"
    resource_type = "SchedulerTriggerVO"
    schedulerType: Mapped[str] = mapped_column(String(16), default="simple")
    schedulerInterval: Mapped[int | None] = mapped_column(Integer)
    repeatCount: Mapped[int | None] = mapped_column(Integer)
    startTime: Mapped[int | None] = mapped_column(BigInteger)  # Unix seconds, as ZStack's (migration 0011)
    stopTime: Mapped[int | None] = mapped_column(BigInteger)  # Unix seconds
    cron: Mapped[str | None] = mapped_column(String(255))
    timeZone: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32), default="Enabled")
    projectUuid: Mapped[str | None] = mapped_column(String(32), index=True, default=None)  # None: admin only


class SchedulerJobGroupTriggerRef(Stamped, Base):
    __tablename__ = "scheduler_job_group_trigger_ref"
    __table_args__ = (UniqueConstraint("schedulerJobGroupUuid", "schedulerTriggerUuid"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    schedulerJobGroupUuid: Mapped[str] = mapped_column(ForeignKey("scheduler_job_group.uuid", ondelete="CASCADE"))
    schedulerTriggerUuid: Mapped[str] = mapped_column(ForeignKey("scheduler_trigger.uuid", ondelete="CASCADE"))


class SchedulerFire(Stamped, Base):
    """One fire of a trigger for one job group: written by the beat that fires it (the unique
    key makes a second beat skip it), ``done`` once every target's job is enqueued."""

    __tablename__ = "scheduler_fire"
    __table_args__ = (UniqueConstraint("schedulerTriggerUuid", "schedulerJobGroupUuid", "fireTime"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    schedulerTriggerUuid: Mapped[str] = mapped_column(String(32), index=True)
    schedulerJobGroupUuid: Mapped[str] = mapped_column(String(32))
    fireTime: Mapped[datetime] = mapped_column()
    manual: Mapped[bool] = mapped_column(Boolean, default=False)
    done: Mapped[bool] = mapped_column(Boolean, default=False)


class VerifyCursor(Stamped, Base):
    """Where the scheduled verify of one storage (one verify job: a group's target) stands: the
    last chunk digest checked this cycle (chunks are checked in digest order, so each run goes on
    after it and every chunk is checked once a cycle), the cycle's number, and running totals
    of chunks found damaged and repaired (the ``blockvault_verify_*_total`` counters)."""

    __tablename__ = "verify_cursor"
    schedulerJobUuid: Mapped[str] = mapped_column(String(32), primary_key=True)
    backupStorageUuid: Mapped[str] = mapped_column(String(32), index=True)
    position: Mapped[str] = mapped_column(String(128), default="")  # "" = the cycle starts
    cycle: Mapped[int] = mapped_column(Integer, default=0)  # completed cycles
    cycleStarted: Mapped[datetime | None] = mapped_column(default=None)
    chunksChecked: Mapped[int] = mapped_column(BigInteger, default=0)  # this cycle
    damagedChunks: Mapped[int] = mapped_column(BigInteger, default=0)  # ever (a counter)
    repairedChunks: Mapped[int] = mapped_column(BigInteger, default=0)  # ever (a counter)


class SchedulerJobHistory(Stamped, Base):
    __tablename__ = "scheduler_job_history"
    __table_args__ = (
        Index("ix_history_group_time", "schedulerJobGroupUuid", "executeTime"),
        Index("ix_history_group_success", "schedulerJobGroupUuid", "success"),
        Index("ix_scheduler_job_history_createDate", "createDate"),
        Index("ix_scheduler_job_history_success", "success"),
        Index("ix_history_target_success_time", "targetResourceUuid", "success", "executeTime"),
    )
    resource_type = "SchedulerJobHistoryVO"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    executeTime: Mapped[datetime] = mapped_column(default=now, index=True)
    requestDump: Mapped[str | None] = mapped_column(Text)
    resultDump: Mapped[str | None] = mapped_column(Text)
    success: Mapped[bool] = mapped_column(Boolean, default=False)
    schedulerJobGroupUuid: Mapped[str | None] = mapped_column(String(32))
    schedulerJobUuid: Mapped[str | None] = mapped_column(String(32), index=True)
    targetResourceUuid: Mapped[str | None] = mapped_column(String(32), index=True)
    triggerUuid: Mapped[str | None] = mapped_column(String(32))


# -- tags, accounts, API jobs ------------------------------------------------------------------
class Tag(Stamped, Base):
    __tablename__ = "tag"
    __table_args__ = (Index("ix_tag_resource", "resourceUuid", "type"),)
    resource_type = "TagVO"
    uuid: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    resourceUuid: Mapped[str] = mapped_column(String(32))
    resourceType: Mapped[str] = mapped_column(String(64))
    tag: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16), default="user")  # user | system


class Account(Resource, Base):
    __tablename__ = "account"
    resource_type = "AccountVO"
    secret_fields = frozenset({"passwordHash"})
    type: Mapped[str] = mapped_column(String(16), default="Normal")  # SystemAdmin | Normal
    # scrypt of the password's SHA-512 hex (api.auth.password_hash); None: no password login
    passwordHash: Mapped[str | None] = mapped_column(String(255), default=None)


class LoginSession(Base):
    """A ZStack-style session (``LogInByAccount``): its uuid opens the API as ``OAuth <uuid>``
    until ``expiredDate``."""

    __tablename__ = "session"
    resource_type = "SessionVO"
    uuid: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    accountUuid: Mapped[str] = mapped_column(ForeignKey("account.uuid", ondelete="CASCADE"), index=True)
    createDate: Mapped[datetime] = mapped_column(default=now)
    expiredDate: Mapped[datetime] = mapped_column(index=True)


class ApiKey(Stamped, Base):
    __tablename__ = "api_key"
    resource_type = "ApiKeyVO"
    secret_fields = frozenset({"keyHash"})
    uuid: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    accountUuid: Mapped[str] = mapped_column(ForeignKey("account.uuid", ondelete="CASCADE"), index=True)
    keyHash: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    lastUsedDate: Mapped[datetime | None] = mapped_column()


class AccessKey(Stamped, Base):
    """A ZStack access key: requests signed with its secret (``Authorization: ZStack
    <AccessKeyID>:<signature>``, shared.accesskeys) act as its account. The secret is sealed
    to the row (shared.secret.seal), shown once when the key is made; a Disabled key opens
    nothing."""

    __tablename__ = "access_key"
    resource_type = "AccessKeyVO"
    secret_fields = frozenset({"sealedSecret"})
    uuid: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    accountUuid: Mapped[str] = mapped_column(ForeignKey("account.uuid", ondelete="CASCADE"), index=True)
    userUuid: Mapped[str] = mapped_column(String(32))  # ZStack's user; blockvault's accounts have none: the account
    AccessKeyID: Mapped[str] = mapped_column(String(64), unique=True)
    sealedSecret: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text, default=None)
    state: Mapped[str] = mapped_column(String(16), default="Enabled")
    lastUsedDate: Mapped[datetime | None] = mapped_column()


class ApiJob(Stamped, Base):
    """An asynchronous action; its uuid is the Celery task id."""

    __tablename__ = "api_job"
    __table_args__ = (Index("ix_api_job_state_lastOpDate", "state", "lastOpDate"),)
    resource_type = "ApiJobVO"
    uuid: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_uuid)
    action: Mapped[str] = mapped_column(String(128))
    resourceUuid: Mapped[str | None] = mapped_column(String(32), index=True)
    resourceType: Mapped[str | None] = mapped_column(String(64))
    hostUuid: Mapped[str | None] = mapped_column(String(32), index=True)
    state: Mapped[str] = mapped_column(String(16), default="Pending")  # Pending|Running|Succeeded|Failed
    progress: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    accountUuid: Mapped[str | None] = mapped_column(String(32))
    zstackClass: Mapped[str | None] = mapped_column(String(255), default=None)  # the ZStack message that started it


QUERYABLE: dict[str, type[Base]] = {
    "hosts": Host,
    "vm-instances": VmInstance,
    "volumes": Volume,
    "backup-storage": BackupStorage,
    "volume-backups": VolumeBackup,
    "database-backups": DatabaseBackup,
    "scheduler/jobgroups": SchedulerJobGroup,
    "scheduler/jobs": SchedulerJob,
    "scheduler/triggers": SchedulerTrigger,
    "scheduler/jobhistories": SchedulerJobHistory,
    "user-tags": Tag,
    "system-tags": Tag,
    "api-jobs": ApiJob,
}


# -- projects ----------------------------------------------------------------------------------
class Project(Resource, Base):
    """A set of accounts (its members) sharing VM instances, volumes and schedules."""

    __tablename__ = "project"
    resource_type = "ProjectVO"
    # quotas on its backups (None: no limit), checked when a backup starts (shared.service.quotas)
    quotaBackupBytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    quotaBackupCount: Mapped[int | None] = mapped_column(BigInteger, default=None)


class ProjectMember(Stamped, Base):
    """An account's membership of a project; ``role`` is ``projectAdmin`` (may manage the
    members) or ``member``."""

    __tablename__ = "project_member"
    __table_args__ = (UniqueConstraint("projectUuid", "accountUuid"),)
    resource_type = "ProjectMemberVO"
    uuid: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    projectUuid: Mapped[str] = mapped_column(ForeignKey("project.uuid", ondelete="CASCADE"))
    accountUuid: Mapped[str] = mapped_column(ForeignKey("account.uuid", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16), default="member")  # projectAdmin | member


QUERYABLE["projects"] = Project
QUERYABLE["accounts"] = Account
QUERYABLE["api-keys"] = ApiKey
QUERYABLE["accesskeys"] = AccessKey
QUERYABLE["databases"] = ManagedDatabase


# -- notifications (shared.notifications) --------------------------------------------------------
class NotificationTarget(Resource, Base):
    """Where notifications go: ``type`` webhook (``options.url``, body signed with HMAC-SHA256
    under its secret) or smtp (``options``: host, port, starttls, username, sender,
    recipients). Its secrets (the webhook's ``secret``, the SMTP ``password``) are sealed to
    the row like storage credentials; at most one message per ``throttleSeconds``."""

    __tablename__ = "notification_target"
    resource_type = "NotificationTargetVO"
    secret_fields = frozenset({"sealedSecrets"})
    type: Mapped[str] = mapped_column(String(16))
    options: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    sealedSecrets: Mapped[str | None] = mapped_column(Text, default=None)
    throttleSeconds: Mapped[int] = mapped_column(Integer, default=3600)
    state: Mapped[str] = mapped_column(String(16), default="Enabled")


class NotificationRule(Resource, Base):
    """Which events (``eventType``) go to which targets (``targetUuids``), with the rule's
    ``parameters`` (``fillRatio`` for storageFull, ``tolerance`` for backupOverdue)."""

    __tablename__ = "notification_rule"
    resource_type = "NotificationRuleVO"
    eventType: Mapped[str] = mapped_column(String(32), index=True)
    targetUuids: Mapped[list[str]] = mapped_column(JSON, default=list)
    parameters: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    state: Mapped[str] = mapped_column(String(16), default="Enabled")


class NotificationEvent(Stamped, Base):
    """Something that happened, recorded once: ``dedupeKey`` is unique, so two beats (or two
    callers of :func:`shared.notifications.events.notify_event`) record it once; ``dispatched``
    once it is in the digests of the targets its rules name."""

    __tablename__ = "notification_event"
    __table_args__ = (Index("ix_notification_event_dispatched", "dispatched"),)
    resource_type = "NotificationEventVO"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    dedupeKey: Mapped[str] = mapped_column(String(255), unique=True)
    resourceUuid: Mapped[str | None] = mapped_column(String(64), default=None)
    summary: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    dispatched: Mapped[bool] = mapped_column(Boolean, default=False)


class NotificationCondition(Stamped, Base):
    """A condition that holds now (a host Disconnected, a storage full): one row while it lasts,
    so its event is recorded once per episode; deleted when the condition clears."""

    __tablename__ = "notification_condition"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)


class NotificationDelivery(Stamped, Base):
    """One message to one target (a digest of ``eventIds``), and the history of what was sent:
    ``status`` Pending (collecting events), Sending (claimed by one beat), Sent, or Failed (the
    last attempt failed; retried from ``nextAttemptDate``, collecting events meanwhile)."""

    __tablename__ = "notification_delivery"
    __table_args__ = (Index("ix_notification_delivery_target_status", "targetUuid", "status"),)
    resource_type = "NotificationDeliveryVO"
    uuid: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_uuid)
    targetUuid: Mapped[str] = mapped_column(String(32), index=True)
    targetName: Mapped[str] = mapped_column(String(255), default="")
    status: Mapped[str] = mapped_column(String(16), default="Pending")
    test: Mapped[bool] = mapped_column(Boolean, default=False)
    eventIds: Mapped[list[int]] = mapped_column(JSON, default=list)
    eventCount: Mapped[int] = mapped_column(Integer, default=0)
    subject: Mapped[str | None] = mapped_column(Text, default=None)
    body: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lastError: Mapped[str | None] = mapped_column(Text, default=None)
    nextAttemptDate: Mapped[datetime | None] = mapped_column(default=None)
    sentDate: Mapped[datetime | None] = mapped_column(default=None)
