"""The rows every service action works on: the one row behind a uuid (404), the volume a
worker may act on (Ready, its real file inside the host's volume roots), the storage a backup
goes to, the copies (``backupStorageRefs``) of a backup and which one to read."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import hostpaths, hosts
from shared.catalog.models import (
    BackupStorage,
    DatabaseBackup,
    DatabaseBackupStorageRef,
    Host,
    VmInstance,
    Volume,
    VolumeBackup,
    VolumeBackupStorageRef,
    new_uuid,
)
from shared.config import get_settings
from shared.errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    PathNotAllowed,
)
from shared.repository.repo import Repository, parse_install_path
from shared.storage import current_master, open_repository

log = logging.getLogger(__name__)

AnyBackup = VolumeBackup | DatabaseBackup
AnyRef = VolumeBackupStorageRef | DatabaseBackupStorageRef


def get(session: Session, model: type[Any], uuid: str, what: str) -> Any:
    row = session.get(model, uuid)
    if row is None:
        raise NotFound(resource=what, uuid=uuid)
    return row


def connected_host(session: Session, host_uuid: str) -> Host:
    host: Host = get(session, Host, host_uuid, "host")
    hosts.reap(session)
    if host.status != "Connected":
        raise Conflict(detail=f"host {host_uuid} is {host.status}: no worker is running for it")
    return host


def pick_storage(session: Session, uuid: str | None, *, for_write: bool = True) -> BackupStorage:
    if uuid:
        storage: BackupStorage = get(session, BackupStorage, uuid, "backup storage")
    else:
        storage_or_none = current_master(session)
        if storage_or_none is None:
            raise Conflict(detail="no enabled master backup storage is registered")
        storage = storage_or_none
    if for_write and storage.state != "Enabled":
        raise Conflict(detail=f"backup storage {storage.uuid} is {storage.state}")
    return storage


def ready_volume(session: Session, uuid: str) -> Volume:
    """The volume ``uuid``, which must be Ready: a volume being created (or left Failed) is
    never backed up, reverted or used."""
    volume: Volume = get(session, Volume, uuid, "volume")
    if volume.status != "Ready":
        raise Conflict(detail=f"volume {uuid} is {volume.status}")
    return volume


def check_vm_stopped(session: Session, volume: Volume, action: str) -> None:
    if volume.vmInstanceUuid:
        vm = session.get(VmInstance, volume.vmInstanceUuid)
        if vm is not None and vm.state in ("Running", "Paused"):
            raise Conflict(detail=f"VM {vm.uuid} is {vm.state}: {action} needs it Stopped")


def backup_repository(storage: BackupStorage) -> Repository:
    """The repository a backup on this host writes into, with this host's index of what it
    holds (``<data dir>/chunk-index``: no existence request per chunk)."""
    repo = open_repository(storage)
    repo.use_index(get_settings().data_path / "chunk-index")
    return repo


def new_backup_row(
    session: Session, volume: Volume, storage: BackupStorage, name: str, group: str | None, description: str | None
) -> VolumeBackup:
    backup = VolumeBackup(
        uuid=new_uuid(),
        name=name,
        description=description,
        volumeUuid=volume.uuid,
        type=volume.type,
        groupUuid=group,
        size=volume.size,
        status="Creating",
    )
    backup.backupStorageRefs.append(VolumeBackupStorageRef(backupStorageUuid=storage.uuid, status="Creating"))
    session.add(backup)
    return backup


def volume_file(session: Session, volume: Volume) -> str:
    """The real path of ``volume``'s file on this host, checked (shared.hostpaths: inside a
    volume root, a regular file or block device), and not the file of another registered
    volume (a symlinked path naming it); the volume must be Ready. What a worker opens."""
    if volume.status != "Ready":
        raise Conflict(detail=f"volume {volume.uuid} is {volume.status}")
    real = str(hostpaths.resolve_volume(volume.installPath, f"volume {volume.uuid}"))
    if real != volume.installPath:
        other = session.scalars(
            select(Volume.uuid).where(
                Volume.hostUuid == volume.hostUuid, Volume.installPath == real, Volume.uuid != volume.uuid
            )
        ).first()
        if other:
            raise PathNotAllowed(
                what=f"volume {volume.uuid}", path=volume.installPath, detail=f"it is the file of volume {other}"
            )
    return real


def ref_on(row: AnyBackup, storage_uuid: str) -> AnyRef | None:
    refs: list[AnyRef] = list(row.backupStorageRefs)
    return next((r for r in refs if r.backupStorageUuid == storage_uuid), None)


def add_ref(row: AnyBackup, storage_uuid: str, status: str = "Creating") -> AnyRef:
    """A new copy of ``row`` on a storage, of the ref type that goes with the row."""
    if isinstance(row, DatabaseBackup):
        db_ref = DatabaseBackupStorageRef(backupStorageUuid=storage_uuid, status=status)
        row.backupStorageRefs.append(db_ref)
        return db_ref
    ref = VolumeBackupStorageRef(backupStorageUuid=storage_uuid, status=status)
    row.backupStorageRefs.append(ref)
    return ref


def copy_on(session: Session, row: AnyBackup, storage_uuid: str) -> tuple[BackupStorage, AnyRef]:
    """The storage a job reads ``row`` from, and the ref of the copy there."""
    storage: BackupStorage = get(session, BackupStorage, storage_uuid, "backup storage")
    ref = ref_on(row, storage.uuid)
    if ref is None:
        raise Conflict(detail=f"backup {row.uuid} has no copy on backup storage {storage.uuid}")
    return storage, ref


def ready_ref(backup: AnyBackup, storage_uuid: str | None, session: Session) -> AnyRef:
    """The copy to read: the one on ``storage_uuid``; by default the master's, then a copy on
    a storage that answers, then any Ready one."""
    refs: list[AnyRef] = [r for r in backup.backupStorageRefs if r.status == "Ready"]
    if storage_uuid:
        get(session, BackupStorage, storage_uuid, "backup storage")
        refs = [r for r in refs if r.backupStorageUuid == storage_uuid]
        if not refs:
            raise Conflict(detail=f"backup {backup.uuid} has no Ready copy on backup storage {storage_uuid}")
    if not refs:
        raise Conflict(detail=f"backup {backup.uuid} has no Ready copy")

    def rank(ref: AnyRef) -> int:
        storage = session.get(BackupStorage, ref.backupStorageUuid)
        if storage is None or storage.state != "Enabled":
            return 3
        connected = storage.status == "Connected"
        return 0 if connected and storage.role == "master" and storage.type == "ImageStore" else 1 if connected else 2

    return min(refs, key=rank)


def ready_backup(session: Session, uuid: str) -> VolumeBackup:
    backup: VolumeBackup = get(session, VolumeBackup, uuid, "volume backup")
    if backup.status != "Ready":
        raise Conflict(detail=f"volume backup {uuid} is {backup.status}")
    return backup


def group_backups(session: Session, group_uuid: str) -> list[VolumeBackup]:
    """The volume backups of one VM backup, root first."""
    rows = list(
        session.scalars(
            select(VolumeBackup)
            .where(VolumeBackup.groupUuid == group_uuid)
            .order_by(VolumeBackup.type.desc(), VolumeBackup.createDate)
        )
    )
    if not rows:
        raise NotFound(resource="VM backup", uuid=group_uuid)
    return rows


def group_storage(session: Session, group_uuid: str, backups: list[VolumeBackup], storage_uuid: str | None) -> str:
    """The one backup storage that holds a Ready copy of every volume backup of a VM backup
    (``storage_uuid`` when named); Conflict when no single one does."""
    refs = [ready_ref(backup, storage_uuid, session) for backup in backups]
    storages = {ref.backupStorageUuid for ref in refs}
    if len(storages) != 1:
        raise Conflict(detail=f"VM backup {group_uuid} has no single storage with every volume: name backupStorageUuid")
    return storages.pop()


def manifest_id(ref: AnyRef) -> str:
    return parse_install_path(ref.installPath)[1]


def check_delete_mode(mode: str) -> None:
    if mode not in ("Permissive", "Enforcing"):
        raise InvalidArgument(detail="deleteMode must be Permissive or Enforcing")


def project_of(session: Session, volume: Volume | None) -> str | None:
    """A volume's project: its own, or its VM's."""
    if volume is None:
        return None
    vm = session.get(VmInstance, volume.vmInstanceUuid) if volume.vmInstanceUuid else None
    return volume.projectUuid or (vm.projectUuid if vm else None)


def update_names(row: Any, params: dict[str, Any]) -> None:
    """Set ``name`` (text, not empty) and ``description`` (text or null) when ``params`` give
    them; anything else is a 400, not a database error (the catalog's columns are text)."""
    for key in ("name", "description"):
        if key in params:
            if not isinstance(params[key], str | None) or (key == "name" and not params[key]):
                raise InvalidArgument(detail=f"{key} must be a string" + (" and not empty" if key == "name" else ""))
            setattr(row, key, params[key])
