"""Volume and VM backups as service actions.

``request_*`` functions run in the API: they check everything that can be checked at once
(404/400/409), create the rows and send one API job. ``run_*`` functions run in a worker for
that job: they call the engine and record what it did. A backup row is ``Creating`` until its
manifest is committed on storage, then ``Ready``; a failed or abandoned job leaves it
``Failed``, never ``Ready`` with missing data.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import hosts
from shared.apijobs import enqueue, progress_reporter
from shared.catalog.models import (
    ApiJob,
    BackupStorage,
    Host,
    VmInstance,
    Volume,
    VolumeBackup,
    VolumeBackupStorageRef,
    new_uuid,
)
from shared.celery_app import STORAGE_QUEUE, host_queue
from shared.errors import Conflict, InvalidArgument, NotFound
from shared.inventory import inventory
from shared.repository.backup import backup_volume
from shared.repository.maintenance import gc, verify
from shared.repository.restore import restore_backup
from shared.storage import open_repository, refresh_capacity

log = logging.getLogger(__name__)
MODES = ("auto", "full", "incremental")
BITMAP = "blockvault"


def get(session: Session, model: type[Any], uuid: str, what: str) -> Any:
    row = session.get(model, uuid)
    if row is None:
        raise NotFound(resource=what, uuid=uuid)
    return row


def _connected_host(session: Session, host_uuid: str) -> Host:
    host: Host = get(session, Host, host_uuid, "host")
    hosts.reap(session)
    if host.status != "Connected":
        raise Conflict(detail=f"host {host_uuid} is {host.status}: no worker is running for it")
    return host


def _storage(session: Session, uuid: str | None, *, for_write: bool = True) -> BackupStorage:
    if uuid:
        storage: BackupStorage = get(session, BackupStorage, uuid, "backup storage")
    else:
        storage_or_none = session.scalars(
            select(BackupStorage)
            .where(BackupStorage.role == "master", BackupStorage.state == "Enabled")
            .order_by(BackupStorage.createDate)
        ).first()
        if storage_or_none is None:
            raise Conflict(detail="no enabled master backup storage is registered")
        storage = storage_or_none
    if for_write and storage.state != "Enabled":
        raise Conflict(detail=f"backup storage {storage.uuid} is {storage.state}")
    return storage


def _check_vm_stopped(session: Session, volume: Volume, action: str, force: bool = False) -> None:
    if volume.vmInstanceUuid:
        vm = session.get(VmInstance, volume.vmInstanceUuid)
        if vm is not None and vm.state == "Running" and not force:
            raise Conflict(detail=f"VM {vm.uuid} is Running: {action} needs it Stopped")


def _vm_metadata(session: Session, volume: Volume) -> dict[str, Any]:
    data: dict[str, Any] = {"volume": inventory(session, volume)}
    if volume.vmInstanceUuid:
        vm = session.get(VmInstance, volume.vmInstanceUuid)
        if vm is not None:
            data["vmInstance"] = inventory(session, vm)
            siblings = session.scalars(select(Volume).where(Volume.vmInstanceUuid == vm.uuid))
            data["volumes"] = [inventory(session, v) for v in siblings]
    return data


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


def _mode(params: dict[str, Any]) -> str:
    mode = params.get("mode") or "auto"
    if mode not in MODES:
        raise InvalidArgument(detail=f"mode must be one of {', '.join(MODES)}")
    return str(mode)


def request_volume_backup(session: Session, volume_uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    volume: Volume = get(session, Volume, volume_uuid, "volume")
    name = params.get("name") or f"backup-{volume.name or volume.uuid[:8]}"
    mode = _mode(params)
    storage = _storage(session, params.get("backupStorageUuid"))
    _check_vm_stopped(session, volume, "a backup without a QEMU monitor", bool(params.get("force")))
    _connected_host(session, volume.hostUuid)
    backup = new_backup_row(session, volume, storage, str(name), None, params.get("description"))
    session.flush()
    return enqueue(
        session,
        "createVolumeBackup",
        task="blockvault.volume.backup",
        queue=host_queue(volume.hostUuid),
        params={"backupUuids": [backup.uuid], "backupStorageUuid": storage.uuid, "mode": mode},
        resource_uuid=backup.uuid,
        resource_type=VolumeBackup.resource_type,
        host_uuid=volume.hostUuid,
        account_uuid=account,
    )


def request_vm_backup(session: Session, root_volume_uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    root: Volume = get(session, Volume, root_volume_uuid, "volume")
    if root.type != "Root" or not root.vmInstanceUuid:
        raise InvalidArgument(detail=f"volume {root_volume_uuid} is not the root volume of a VM")
    vm: VmInstance = get(session, VmInstance, root.vmInstanceUuid, "VM instance")
    mode = _mode(params)
    storage = _storage(session, params.get("backupStorageUuid"))
    if vm.state == "Running" and not params.get("force"):
        raise Conflict(detail=f"VM {vm.uuid} is Running: a backup without a QEMU monitor needs it Stopped")
    volumes = list(
        session.scalars(
            select(Volume).where(Volume.vmInstanceUuid == vm.uuid).order_by(Volume.type.desc(), Volume.createDate)
        )
    )
    if any(v.hostUuid != root.hostUuid for v in volumes):
        raise Conflict(detail=f"VM {vm.uuid} has volumes on several hosts")
    _connected_host(session, root.hostUuid)
    group = new_uuid()
    name = str(params.get("name") or f"backup-{vm.name or vm.uuid[:8]}")
    backups = [new_backup_row(session, v, storage, name, group, params.get("description")) for v in volumes]
    session.flush()
    return enqueue(
        session,
        "createVmBackup",
        task="blockvault.volume.backup",
        queue=host_queue(root.hostUuid),
        params={
            "backupUuids": [b.uuid for b in backups],
            "backupStorageUuid": storage.uuid,
            "mode": mode,
            "groupUuid": group,
        },
        resource_uuid=group,
        resource_type="VmBackup",
        host_uuid=root.hostUuid,
        account_uuid=account,
    )


def _parent_uuid(session: Session, storage: BackupStorage, manifest_id: str | None) -> str | None:
    if not manifest_id:
        return None
    ref = session.scalars(
        select(VolumeBackupStorageRef).where(
            VolumeBackupStorageRef.backupStorageUuid == storage.uuid,
            VolumeBackupStorageRef.installPath.like(f"%/{manifest_id}"),
        )
    ).first()
    return ref.volumeBackupUuid if ref else None


def run_volume_backups(session: Session, job: ApiJob) -> dict[str, Any]:
    """The worker side of createVolumeBackup / createVmBackup."""
    params = job.params or {}
    storage: BackupStorage = get(session, BackupStorage, params["backupStorageUuid"], "backup storage")
    rows = [get(session, VolumeBackup, uuid, "volume backup") for uuid in params["backupUuids"]]
    done = take_backups(session, rows, storage, full=params.get("mode") == "full", job_uuid=job.uuid)
    return (
        done[0] if job.action == "createVolumeBackup" else {"groupUuid": params.get("groupUuid"), "volumeBackups": done}
    )


def take_backups(
    session: Session, rows: list[VolumeBackup], storage: BackupStorage, *, full: bool, job_uuid: str
) -> list[dict[str, Any]]:
    """Back up the volume of each ``Creating`` row into ``storage``; each row is Ready (and
    committed) as soon as its manifest is. Returns the inventories with the engine's stats."""
    repo = open_repository(storage)
    report = progress_reporter(job_uuid)
    done = []
    for index, backup in enumerate(rows):
        volume: Volume = get(session, Volume, backup.volumeUuid, "volume")
        metadata = _vm_metadata(session, volume)
        metadata["backup"] = {"uuid": backup.uuid, "name": backup.name, "groupUuid": backup.groupUuid}

        def scaled(d: int, t: int, i: int = index) -> None:
            report(i * 1000 + (d * 1000 // t if t else 0), len(rows) * 1000)

        result = backup_volume(
            repo,
            volume.installPath,
            full=full,
            bitmap=BITMAP if volume.format == "qcow2" else None,
            name=backup.name,
            metadata=metadata,
            progress=scaled,
        )
        backup.mode = result.mode
        backup.size = result.size
        backup.parentUuid = _parent_uuid(session, storage, result.parent)
        backup.metadata_ = metadata
        backup.status = "Ready"
        for ref in backup.backupStorageRefs:
            if ref.backupStorageUuid == storage.uuid:
                ref.installPath = result.installPath
                ref.status = "Ready"
        volume.size = result.size
        session.commit()
        done.append({**inventory(session, backup), "stats": result.to_json()})
    refresh_capacity(storage)
    return done


# -- actions on existing backups ------------------------------------------------------------------
def _ready_ref(backup: VolumeBackup, storage_uuid: str | None, session: Session) -> VolumeBackupStorageRef:
    refs = [r for r in backup.backupStorageRefs if r.status == "Ready"]
    if storage_uuid:
        refs = [r for r in refs if r.backupStorageUuid == storage_uuid]
        if not refs:
            raise Conflict(detail=f"backup {backup.uuid} has no Ready copy on backup storage {storage_uuid}")
    if not refs:
        raise Conflict(detail=f"backup {backup.uuid} has no Ready copy")
    masters = [r for r in refs if (s := session.get(BackupStorage, r.backupStorageUuid)) and s.role == "master"]
    return (masters or refs)[0]


def _backup_for_action(session: Session, uuid: str) -> VolumeBackup:
    backup: VolumeBackup = get(session, VolumeBackup, uuid, "volume backup")
    if backup.status != "Ready":
        raise Conflict(detail=f"volume backup {uuid} is {backup.status}")
    return backup


def request_revert(session: Session, uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    backup = _backup_for_action(session, uuid)
    if backup.state != "Enabled":
        raise Conflict(detail=f"volume backup {uuid} is Disabled")
    volume: Volume = get(session, Volume, backup.volumeUuid, "volume")
    _check_vm_stopped(session, volume, "revert")
    ref = _ready_ref(backup, params.get("backupStorageUuid") or params.get("backupStrogeUuid"), session)
    _connected_host(session, volume.hostUuid)
    return enqueue(
        session,
        "revertVolumeFromVolumeBackup",
        task="blockvault.volume.revert",
        queue=host_queue(volume.hostUuid),
        params={"backupUuid": uuid, "backupStorageUuid": ref.backupStorageUuid},
        resource_uuid=volume.uuid,
        resource_type=Volume.resource_type,
        host_uuid=volume.hostUuid,
        account_uuid=account,
    )


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


def request_vm_revert(session: Session, group_uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    backups = group_backups(session, group_uuid)
    storage_uuid = params.get("backupStorageUuid") or params.get("backupStrogeUuid")
    refs = [_ready_ref(_backup_for_action(session, b.uuid), storage_uuid, session) for b in backups]
    storages = {r.backupStorageUuid for r in refs}
    if len(storages) != 1:
        raise Conflict(detail=f"VM backup {group_uuid} has no single storage with every volume: name backupStorageUuid")
    volumes = [get(session, Volume, b.volumeUuid, "volume") for b in backups]
    for volume in volumes:
        _check_vm_stopped(session, volume, "revert")
    host = volumes[0].hostUuid
    _connected_host(session, host)
    return enqueue(
        session,
        "revertVmFromVmBackup",
        task="blockvault.volume.revert",
        queue=host_queue(host),
        params={"backupUuids": [b.uuid for b in backups], "backupStorageUuid": storages.pop()},
        resource_uuid=volumes[0].vmInstanceUuid,
        resource_type=VmInstance.resource_type,
        host_uuid=host,
        account_uuid=account,
    )


def _manifest_id(ref: VolumeBackupStorageRef) -> str:
    return (ref.installPath or "").rsplit("/", 1)[-1]


def run_revert(session: Session, job: ApiJob) -> dict[str, Any]:
    """Revert each volume to its backup: restore beside the volume, then rename over it, so
    a volume is either untouched or wholly reverted."""
    params = job.params or {}
    uuids = params.get("backupUuids") or [params["backupUuid"]]
    report = progress_reporter(job.uuid)
    reverted = []
    for index, uuid in enumerate(uuids):
        backup: VolumeBackup = get(session, VolumeBackup, uuid, "volume backup")
        volume: Volume = get(session, Volume, backup.volumeUuid, "volume")
        _check_vm_stopped(session, volume, "revert")
        storage: BackupStorage = get(session, BackupStorage, params["backupStorageUuid"], "backup storage")
        ref = next(r for r in backup.backupStorageRefs if r.backupStorageUuid == storage.uuid)
        target = Path(volume.installPath)
        staging = target.with_name(f".{target.name}.revert-{job.uuid[:8]}{target.suffix}")
        staging.unlink(missing_ok=True)

        def scaled(d: int, t: int, i: int = index) -> None:
            report(i * 1000 + (d * 1000 // t if t else 0), len(uuids) * 1000)

        restore_backup(open_repository(storage), _manifest_id(ref), str(staging), progress=scaled)
        os.replace(staging, target)  # the volume switches to the backup's content in one step
        volume.size = backup.size
        session.commit()
        reverted.append(inventory(session, volume))
    return reverted[0] if len(reverted) == 1 and "backupUuid" in params else {"volumes": reverted}


def request_create_volume(session: Session, uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    backup = _backup_for_action(session, uuid)
    missing = [k for k in ("name", "hostUuid", "installPath") if not params.get(k)]
    if missing:
        raise InvalidArgument(detail=f"missing required params: {', '.join(missing)}")
    path = str(params["installPath"])
    if not path.startswith("/"):
        raise InvalidArgument(detail="installPath must be an absolute path on the host")
    fmt = params.get("format") or ("qcow2" if path.endswith(".qcow2") else "raw")
    if fmt not in ("raw", "qcow2") or (fmt == "qcow2") != path.endswith(".qcow2"):
        raise InvalidArgument(detail="format must be raw or qcow2, and qcow2 paths end in .qcow2")
    if params.get("vmInstanceUuid"):
        get(session, VmInstance, params["vmInstanceUuid"], "VM instance")
    if session.scalars(select(Volume).where(Volume.hostUuid == params["hostUuid"], Volume.installPath == path)).first():
        raise Conflict(detail=f"a volume at {path} on host {params['hostUuid']} is registered already")
    ref = _ready_ref(backup, params.get("backupStorageUuid"), session)
    _connected_host(session, params["hostUuid"])
    volume = Volume(
        uuid=new_uuid(),
        name=str(params["name"]),
        description=params.get("description"),
        hostUuid=params["hostUuid"],
        vmInstanceUuid=params.get("vmInstanceUuid"),
        type="Data",
        format=fmt,
        installPath=path,
        size=backup.size,
        status="Creating",
    )
    session.add(volume)
    session.flush()
    return enqueue(
        session,
        "createDataVolumeFromVolumeBackup",
        task="blockvault.volume.create_from_backup",
        queue=host_queue(params["hostUuid"]),
        params={"backupUuid": uuid, "backupStorageUuid": ref.backupStorageUuid, "volumeUuid": volume.uuid},
        resource_uuid=volume.uuid,
        resource_type=Volume.resource_type,
        host_uuid=params["hostUuid"],
        account_uuid=account,
    )


def run_create_volume(session: Session, job: ApiJob) -> dict[str, Any]:
    params = job.params or {}
    backup: VolumeBackup = get(session, VolumeBackup, params["backupUuid"], "volume backup")
    volume: Volume = get(session, Volume, params["volumeUuid"], "volume")
    storage: BackupStorage = get(session, BackupStorage, params["backupStorageUuid"], "backup storage")
    ref = next(r for r in backup.backupStorageRefs if r.backupStorageUuid == storage.uuid)
    try:
        restore_backup(
            open_repository(storage), _manifest_id(ref), volume.installPath, progress=progress_reporter(job.uuid)
        )
    except Exception:
        volume.status = "Failed"
        raise
    volume.status = "Ready"
    return inventory(session, volume)


def request_verify(session: Session, uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    backup = _backup_for_action(session, uuid)
    ref = _ready_ref(backup, params.get("backupStorageUuid"), session)
    return enqueue(
        session,
        "verifyVolumeBackup",
        task="blockvault.storage.verify",
        queue=STORAGE_QUEUE,
        params={
            "backupUuid": uuid,
            "backupStorageUuid": ref.backupStorageUuid,
            "readData": bool(params.get("readData")),
        },
        resource_uuid=uuid,
        resource_type="VolumeBackupVerify",
        account_uuid=account,
    )


def run_verify(session: Session, job: ApiJob) -> dict[str, Any]:
    params = job.params or {}
    backup: VolumeBackup = get(session, VolumeBackup, params["backupUuid"], "volume backup")
    storage: BackupStorage = get(session, BackupStorage, params["backupStorageUuid"], "backup storage")
    ref = next(r for r in backup.backupStorageRefs if r.backupStorageUuid == storage.uuid)
    report = verify(open_repository(storage), _manifest_id(ref), read_data=bool(params.get("readData")))
    if not report.ok:
        ref.status = "Corrupted"
        session.commit()
        from shared.errors import IntegrityError

        raise IntegrityError(detail="; ".join(p.describe() for p in report.problems[:5]))
    return {**inventory(session, backup), "verified": {"chunks": report.chunks, "bytesRead": report.bytesRead}}


def request_delete(
    session: Session, uuid: str, storage_uuids: list[str] | None, mode: str, account: str | None
) -> ApiJob:
    backup: VolumeBackup = get(session, VolumeBackup, uuid, "volume backup")
    if mode not in ("Permissive", "Enforcing"):
        raise InvalidArgument(detail="deleteMode must be Permissive or Enforcing")
    if backup.status in ("Deleting", "Creating"):
        raise Conflict(detail=f"volume backup {uuid} is {backup.status}")
    held = {r.backupStorageUuid for r in backup.backupStorageRefs}
    targets = storage_uuids or sorted(held)
    unknown = [s for s in targets if s not in held]
    if unknown:
        raise InvalidArgument(detail=f"volume backup {uuid} has no copy on backup storage {', '.join(unknown)}")
    backup.status = "Deleting"
    session.flush()
    return enqueue(
        session,
        "deleteVolumeBackup",
        task="blockvault.storage.delete",
        queue=STORAGE_QUEUE,
        params={"backupUuid": uuid, "backupStorageUuids": targets},
        resource_uuid=uuid,
        resource_type="VolumeBackupDelete",
        account_uuid=account,
    )


def request_vm_delete(
    session: Session, group_uuid: str, storage_uuids: list[str] | None, mode: str, account: str | None
) -> ApiJob:
    backups = group_backups(session, group_uuid)
    if mode not in ("Permissive", "Enforcing"):
        raise InvalidArgument(detail="deleteMode must be Permissive or Enforcing")
    busy = [b.uuid for b in backups if b.status in ("Deleting", "Creating")]
    if busy:
        raise Conflict(detail=f"VM backup {group_uuid} has backups being created or deleted: {', '.join(busy)}")
    for backup in backups:
        backup.status = "Deleting"
    session.flush()
    return enqueue(
        session,
        "deleteVmBackup",
        task="blockvault.storage.delete",
        queue=STORAGE_QUEUE,
        params={"backupUuids": [b.uuid for b in backups], "backupStorageUuids": storage_uuids},
        resource_uuid=group_uuid,
        resource_type="VmBackupDelete",
        account_uuid=account,
    )


def run_delete(session: Session, job: ApiJob) -> dict[str, Any]:
    params = job.params or {}
    uuids = params.get("backupUuids") or [params["backupUuid"]]
    results = [delete_backup_copies(session, uuid, params.get("backupStorageUuids")) for uuid in uuids]
    return results[0] if "backupUuid" in params else {"volumeBackups": results}


def delete_backup_copies(session: Session, uuid: str, storage_uuids: list[str] | None) -> dict[str, Any]:
    """Remove a backup's copies from ``storage_uuids`` (all when None), gc there when idle,
    and the row when no copy is left."""
    backup = session.get(VolumeBackup, uuid)
    if backup is None:
        return {"uuid": uuid, "deleted": True}
    for ref in list(backup.backupStorageRefs):
        if storage_uuids and ref.backupStorageUuid not in storage_uuids:
            continue
        storage: BackupStorage = get(session, BackupStorage, ref.backupStorageUuid, "backup storage")
        repo = open_repository(storage)
        if ref.installPath:
            repo.delete_manifest(_manifest_id(ref))
        backup.backupStorageRefs.remove(ref)
        session.flush()
        try:
            gc(repo, wait=0)
        except Exception:  # noqa: BLE001 - busy storage: space is reclaimed by the next gc
            log.info("delete.gc_deferred storage=%s", storage.uuid)
        refresh_capacity(storage)
    if not backup.backupStorageRefs:
        session.delete(backup)
        session.commit()
        return {"uuid": uuid, "deleted": True}
    backup.status = "Ready"
    session.commit()
    return inventory(session, backup)
