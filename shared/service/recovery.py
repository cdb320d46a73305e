"""Getting data back: revert a volume or a VM in place, create a new volume from a backup,
verify a backup (``request_*`` in the API, ``run_*`` in the worker of the volume's host or on
the storage queue)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import celery_app as tasks
from shared import hostpaths
from shared.apijobs import enqueue, progress_reporter
from shared.catalog.models import (
    ApiJob,
    Host,
    VmInstance,
    Volume,
    VolumeBackup,
    new_uuid,
)
from shared.celery_app import STORAGE_QUEUE, host_queue
from shared.errors import (
    Conflict,
    IntegrityError,
    InvalidArgument,
    VolumeError,
    require,
)
from shared.inventory import inventory
from shared.libvirt import MANAGED
from shared.repository.maintenance import verify
from shared.repository.restore import restore_backup
from shared.service.rows import (
    check_vm_stopped,
    connected_host,
    copy_on,
    get,
    group_backups,
    group_storage,
    manifest_id,
    project_of,
    ready_backup,
    ready_ref,
    ready_volume,
    volume_file,
)
from shared.storage import open_repository

log = logging.getLogger(__name__)


def request_revert(session: Session, uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    backup = ready_backup(session, uuid)
    if backup.state != "Enabled":
        raise Conflict(detail=f"volume backup {uuid} is Disabled")
    volume = ready_volume(session, backup.volumeUuid)
    check_vm_stopped(session, volume, "revert")
    ref = ready_ref(backup, params.get("backupStorageUuid") or params.get("backupStrogeUuid"), session)
    connected_host(session, volume.hostUuid)
    return enqueue(
        session,
        "revertVolumeFromVolumeBackup",
        task=tasks.VOLUME_REVERT,
        queue=host_queue(volume.hostUuid),
        params={"backupUuid": uuid, "backupStorageUuid": ref.backupStorageUuid},
        resource_uuid=volume.uuid,
        resource_type=Volume.resource_type,
        host_uuid=volume.hostUuid,
        account_uuid=account,
    )


def request_vm_revert(session: Session, group_uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    backups = group_backups(session, group_uuid)
    for backup in backups:
        ready_backup(session, backup.uuid)
    storage = group_storage(
        session, group_uuid, backups, params.get("backupStorageUuid") or params.get("backupStrogeUuid")
    )
    volumes = [ready_volume(session, b.volumeUuid) for b in backups]
    for volume in volumes:
        check_vm_stopped(session, volume, "revert")
    host = volumes[0].hostUuid
    connected_host(session, host)
    return enqueue(
        session,
        "revertVmFromVmBackup",
        task=tasks.VOLUME_REVERT,
        queue=host_queue(host),
        params={"backupUuids": [b.uuid for b in backups], "backupStorageUuid": storage},
        resource_uuid=volumes[0].vmInstanceUuid,
        resource_type=VmInstance.resource_type,
        host_uuid=host,
        account_uuid=account,
    )


def run_revert(session: Session, job: ApiJob) -> dict[str, Any]:
    """Revert each volume to its backup, on the volume's real file (a symlinked volume's
    target, checked inside the host's volume roots): a regular file is restored beside itself
    and renamed over itself with its owner and mode, so it is either untouched or wholly
    reverted; a block device is written in place."""
    params = job.params or {}
    uuids = params.get("backupUuids") or [params["backupUuid"]]
    report = progress_reporter(job.uuid)
    reverted = []
    checked: set[str] = set()
    for index, uuid in enumerate(uuids):
        backup: VolumeBackup = get(session, VolumeBackup, uuid, "volume backup")
        volume: Volume = get(session, Volume, backup.volumeUuid, "volume")
        check_vm_stopped(session, volume, "revert")
        check_domain_shut_off(session, volume, checked)
        storage, ref = copy_on(session, backup, params["backupStorageUuid"])
        target = Path(volume_file(session, volume))

        def scaled(d: int, t: int, i: int = index) -> None:
            report(i * 1000 + (d * 1000 // t if t else 0), len(uuids) * 1000)

        repo, backup_id = open_repository(storage), manifest_id(ref)
        before = target.stat()
        if stat.S_ISBLK(before.st_mode):
            if volume.format != "raw":
                raise VolumeError(path=volume.installPath, detail="only raw volumes on block devices are reverted")
            restore_backup(repo, backup_id, str(target), progress=scaled, in_place=True)
        else:
            suffix = ".qcow2" if volume.format == "qcow2" else ".raw"
            staging = target.with_name(f".{target.name}.revert-{job.uuid[:8]}{suffix}")
            staging.unlink(missing_ok=True)
            restore_backup(repo, backup_id, str(staging), progress=scaled, fmt=volume.format)
            os.chown(staging, before.st_uid, before.st_gid)
            os.chmod(staging, stat.S_IMODE(before.st_mode))
            os.replace(staging, target)  # the volume switches to the backup's content in one step
        volume.size = backup.size
        session.commit()
        reverted.append(inventory(session, volume))
    return reverted[0] if len(reverted) == 1 and "backupUuid" in params else {"volumes": reverted}


def check_domain_shut_off(session: Session, volume: Volume, checked: set[str]) -> None:
    """A libvirt domain's disk is written only while libvirt says the domain is shut off (the
    catalog's state may be a heartbeat old); asked once per VM of a job."""
    vm = session.get(VmInstance, volume.vmInstanceUuid) if volume.vmInstanceUuid else None
    if vm is None or vm.managedBy != MANAGED or vm.uuid in checked:
        return
    from shared.libvirt import domains

    domains.require_shut_off(vm, "revert")
    checked.add(vm.uuid)


def ensure_path_free(session: Session, host_uuid: str, path: str) -> None:
    """Conflict when a registered volume already lives at ``path`` on ``host_uuid``."""
    if session.scalars(select(Volume).where(Volume.hostUuid == host_uuid, Volume.installPath == path)).first():
        raise Conflict(detail=f"a volume at {path} on host {host_uuid} is registered already")


def request_create_volume(session: Session, uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    """createDataVolumeFromVolumeBackup: a new volume, placed by the platform: on the host of
    the VM it joins, else of the backed-up volume (an admin may name ``hostUuid``), as
    ``<volume uuid>.<format>`` beside the backed-up volume's file when that lies in one of the
    host's volume roots, else in its first root (an admin may name an ``installPath`` inside a
    root). The row is ``Creating`` until the worker has written every byte; a failed create
    leaves no row."""
    backup = ready_backup(session, uuid)
    require(params, "name")
    source: Volume | None = session.get(Volume, backup.volumeUuid)
    vm_uuid = params.get("vmInstanceUuid")
    target_vm: VmInstance | None = get(session, VmInstance, vm_uuid, "VM instance") if vm_uuid else None
    host_uuid = params.get("hostUuid") or (target_vm.hostUuid if target_vm else None) or (source and source.hostUuid)
    if not host_uuid:
        raise InvalidArgument(detail="hostUuid is required: the backup's volume is no longer registered")
    host: Host = get(session, Host, str(host_uuid), "host")
    if target_vm is not None and target_vm.hostUuid and target_vm.hostUuid != host.uuid:
        raise Conflict(detail=f"VM {target_vm.uuid} runs on host {target_vm.hostUuid}, not on {host.uuid}")
    volume_uuid = new_uuid()
    if params.get("installPath") is not None:
        path = hostpaths.require_under(params["installPath"], host.volumeRoots, "installPath", host.uuid)
        fmt = params.get("format") or ("qcow2" if path.endswith(".qcow2") else "raw")
    else:
        fmt = params.get("format") or (source.format if source else "raw")
        near = source.installPath if source is not None and source.hostUuid == host.uuid else None
        path = hostpaths.new_volume_path(hostpaths.reported_roots(host), volume_uuid, str(fmt), near)
    if fmt not in ("raw", "qcow2") or (fmt == "qcow2") != path.endswith(".qcow2"):
        raise InvalidArgument(detail="format must be raw or qcow2, and qcow2 paths end in .qcow2")
    ensure_path_free(session, host.uuid, path)
    ref = ready_ref(backup, params.get("backupStorageUuid"), session)
    connected_host(session, host.uuid)
    volume = Volume(
        uuid=volume_uuid,
        name=str(params["name"]),
        description=params.get("description"),
        hostUuid=host.uuid,
        vmInstanceUuid=target_vm.uuid if target_vm else None,
        # the new volume belongs where its data came from (or to the VM it joins)
        projectUuid=(target_vm.projectUuid if target_vm else None) or project_of(session, source),
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
        task=tasks.VOLUME_CREATE,
        queue=host_queue(host.uuid),
        params={"backupUuid": uuid, "backupStorageUuid": ref.backupStorageUuid, "volumeUuid": volume.uuid},
        resource_uuid=volume.uuid,
        resource_type=Volume.resource_type,
        host_uuid=host.uuid,
        account_uuid=account,
    )


def run_create_volume(session: Session, job: ApiJob) -> dict[str, Any]:
    params = job.params or {}
    backup: VolumeBackup = get(session, VolumeBackup, params["backupUuid"], "volume backup")
    volume: Volume = get(session, Volume, params["volumeUuid"], "volume")
    storage, ref = copy_on(session, backup, params["backupStorageUuid"])
    if volume.status != "Creating":
        raise Conflict(detail=f"volume {volume.uuid} is {volume.status}, not being created")
    target = hostpaths.resolve_new_volume(volume.installPath)  # a failure fails the job: the row goes
    restore_backup(open_repository(storage), manifest_id(ref), str(target), progress=progress_reporter(job.uuid))
    volume.status = "Ready"
    return inventory(session, volume)


def request_verify(session: Session, uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    backup = ready_backup(session, uuid)
    named = params.get("backupStorageUuid")
    corrupted = next(
        (r for r in backup.backupStorageRefs if r.backupStorageUuid == named and r.status == "Corrupted"), None
    )
    ref = corrupted or ready_ref(backup, named, session)  # a Corrupted copy may be checked again, by name
    return enqueue(
        session,
        "verifyVolumeBackup",
        task=tasks.STORAGE_VERIFY,
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
    storage, ref = copy_on(session, backup, params["backupStorageUuid"])
    report = verify(open_repository(storage), manifest_id(ref), read_data=bool(params.get("readData")))
    if not report.ok:
        ref.status = "Corrupted"
        session.commit()
        raise IntegrityError(detail="; ".join(p.describe() for p in report.problems[:5]))
    if ref.status == "Corrupted" and params.get("readData"):
        ref.status = "Ready"  # every chunk re-read and checked: whole again (repaired, or a false alarm)
    return {**inventory(session, backup), "verified": {"chunks": report.chunks, "bytesRead": report.bytesRead}}
