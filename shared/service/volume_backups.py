"""Volume and VM backups: ``request_volume_backup`` / ``request_vm_backup`` run in the API
(checks, Creating rows, one API job on the host's queue), ``run_volume_backups`` in that
host's worker (:func:`take_backups`: offline from the volume files, or live through the VM's
QEMU monitor; failover to the standby mid-way; replication after). A backup row is
``Creating`` until its manifest is committed on storage, then ``Ready``; a failed or
abandoned job leaves it ``Failed``, never ``Ready`` with missing data."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import celery_app as tasks
from shared import hostpaths
from shared.apijobs import enqueue, progress_reporter
from shared.catalog.models import (
    ApiJob,
    BackupStorage,
    VmInstance,
    Volume,
    VolumeBackup,
    VolumeBackupStorageRef,
    new_uuid,
)
from shared.celery_app import host_queue
from shared.config import get_settings
from shared.errors import (
    BackendError,
    BackupNotFound,
    Conflict,
    InvalidArgument,
    RepositoryError,
    StorageFull,
)
from shared.inventory import inventory
from shared.libvirt import connection, domains
from shared.repository.backup import BackupResult, backup_volume
from shared.repository.live import LiveDisk, LiveResult, backup_live
from shared.repository.repo import Repository, install_path, parse_install_path
from shared.service import quotas
from shared.service.copies import replicate
from shared.service.rows import (
    backup_repository,
    connected_host,
    get,
    new_backup_row,
    pick_storage,
    ready_volume,
    volume_file,
)
from shared.storage import failover, refresh_capacity

log = logging.getLogger(__name__)


MODES = ("auto", "full", "incremental")


BITMAP = "blockvault"
DEFAULT_LIBVIRT_URI = "qemu:///system"
Progress = Callable[[int, int], None]


def _running_vm(session: Session, volume: Volume) -> VmInstance | None:
    vm = session.get(VmInstance, volume.vmInstanceUuid) if volume.vmInstanceUuid else None
    return vm if vm is not None and vm.state == "Running" else None


def _check_backup_allowed(vm: VmInstance | None, force: bool) -> None:
    """A Running VM is backed up live through libvirt (a libvirt domain) or its QEMU monitor;
    without either, only when forced (the file is then read as it is: crash-consistent at best)."""
    if vm is not None and not vm.libvirtDomain and not vm.qmpSocket and not force:
        raise Conflict(
            detail=f"VM {vm.uuid} is Running and has no qmpSocket: a live backup needs its QEMU monitor "
            "(or force, for a crash-consistent read of the file)"
        )


def _vm_metadata(session: Session, volume: Volume) -> dict[str, Any]:
    data: dict[str, Any] = {"volume": inventory(session, volume)}
    if volume.vmInstanceUuid:
        vm = session.get(VmInstance, volume.vmInstanceUuid)
        if vm is not None:
            data["vmInstance"] = inventory(session, vm)
            data["vmDefinition"] = domains.definition_of(vm)  # what createVmInstanceFromVmBackup defines
            siblings = session.scalars(select(Volume).where(Volume.vmInstanceUuid == vm.uuid))
            data["volumes"] = [inventory(session, v) for v in siblings]
    return data


def _mode(params: dict[str, Any]) -> str:
    mode = params.get("mode") or "auto"
    if mode not in MODES:
        raise InvalidArgument(detail=f"mode must be one of {', '.join(MODES)}")
    return str(mode)


def _force(params: dict[str, Any]) -> bool:
    force = params.get("force", False)
    if not isinstance(force, bool):
        raise InvalidArgument(detail="force must be true or false")
    return force


def request_volume_backup(session: Session, volume_uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    volume = ready_volume(session, volume_uuid)
    name = params.get("name") or f"backup-{volume.name or volume.uuid[:8]}"
    mode = _mode(params)
    storage = pick_storage(session, params.get("backupStorageUuid"))
    force = _force(params)
    _check_backup_allowed(_running_vm(session, volume), force)
    quotas.check(session, volume.projectUuid, "backup")
    connected_host(session, volume.hostUuid)
    backup = new_backup_row(session, volume, storage, str(name), None, params.get("description"))
    session.flush()
    return enqueue(
        session,
        "createVolumeBackup",
        task=tasks.VOLUME_BACKUP,
        queue=host_queue(volume.hostUuid),
        params={"backupUuids": [backup.uuid], "backupStorageUuid": storage.uuid, "mode": mode, "force": force},
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
    storage = pick_storage(session, params.get("backupStorageUuid"))
    force = _force(params)
    _check_backup_allowed(vm if vm.state == "Running" else None, force)
    volumes = list(
        session.scalars(
            select(Volume).where(Volume.vmInstanceUuid == vm.uuid).order_by(Volume.type.desc(), Volume.createDate)
        )
    )
    if any(v.hostUuid != root.hostUuid for v in volumes):
        raise Conflict(detail=f"VM {vm.uuid} has volumes on several hosts")
    for volume in volumes:
        ready_volume(session, volume.uuid)
    quotas.check(session, vm.projectUuid or root.projectUuid, "backup")
    connected_host(session, root.hostUuid)
    group = new_uuid()
    name = str(params.get("name") or f"backup-{vm.name or vm.uuid[:8]}")
    backups = [new_backup_row(session, v, storage, name, group, params.get("description")) for v in volumes]
    session.flush()
    return enqueue(
        session,
        "createVmBackup",
        task=tasks.VOLUME_BACKUP,
        queue=host_queue(root.hostUuid),
        params={
            "backupUuids": [b.uuid for b in backups],
            "backupStorageUuid": storage.uuid,
            "mode": mode,
            "groupUuid": group,
            "force": force,
        },
        resource_uuid=group,
        resource_type="VmBackup",
        host_uuid=root.hostUuid,
        account_uuid=account,
    )


def _parent_uuid(session: Session, storage: BackupStorage, backup_id: str | None) -> str | None:
    """The backup row of the manifest ``backup_id`` on ``storage`` (the engine's parent)."""
    if not backup_id or not storage.repositoryUuid:
        return None
    ref = session.scalars(
        select(VolumeBackupStorageRef).where(
            VolumeBackupStorageRef.backupStorageUuid == storage.uuid,
            VolumeBackupStorageRef.installPath == install_path(storage.repositoryUuid, backup_id),
        )
    ).first()
    return ref.volumeBackupUuid if ref else None


def run_volume_backups(session: Session, job: ApiJob) -> dict[str, Any]:
    """The worker side of createVolumeBackup / createVmBackup."""
    params = job.params or {}
    storage: BackupStorage = get(session, BackupStorage, params["backupStorageUuid"], "backup storage")
    rows = [get(session, VolumeBackup, uuid, "volume backup") for uuid in params["backupUuids"]]
    done, _taken_on = take_backups(
        session, rows, storage, full=params.get("mode") == "full", job_uuid=job.uuid, force=bool(params.get("force"))
    )
    return (
        done[0] if job.action == "createVolumeBackup" else {"groupUuid": params.get("groupUuid"), "volumeBackups": done}
    )


def take_backups(
    session: Session,
    rows: list[VolumeBackup],
    storage: BackupStorage,
    *,
    full: bool,
    job_uuid: str,
    force: bool = False,
) -> tuple[list[dict[str, Any]], BackupStorage]:
    """Back up the volume of each ``Creating`` row into ``storage``; each row is Ready (and
    committed) as soon as its manifest is. The volumes of a Running VM are backed up live, all
    at one instant, through its QEMU monitor (a Running VM without one only when ``force``).
    When ``storage`` is the ImageStore master and stops answering mid-way, the standby is
    promoted and the backups go on there (the job is not failed); afterwards they are
    replicated to every standby that answers. Returns the inventories with the engine's
    stats, and the storage that took them."""
    volumes: list[Volume] = [get(session, Volume, backup.volumeUuid, "volume") for backup in rows]
    files = {volume.uuid: volume_file(session, volume) for volume in volumes}  # checked before anything opens
    vm = _running_vm(session, volumes[0]) if volumes else None
    _check_backup_allowed(vm, force)
    domain = _libvirt_vm(session, volumes[0]) if volumes else None
    if vm is not None and (vm.libvirtDomain or vm.qmpSocket):
        done, storage = _take_live(session, rows, volumes, files, storage, vm, full=full, job_uuid=job_uuid)
    elif domain is not None:
        done, storage = _take_offline(
            session, rows, volumes, files, storage, full=full, job_uuid=job_uuid, how="offline", domain=domain
        )
    else:
        consistency = "crash" if vm is not None else "offline"
        done, storage = _take_offline(
            session, rows, volumes, files, storage, full=full, job_uuid=job_uuid, how=consistency
        )
    refresh_capacity(storage)
    session.commit()
    replicate(session, rows, storage)
    return done, storage


def _libvirt_vm(session: Session, volume: Volume) -> VmInstance | None:
    vm = session.get(VmInstance, volume.vmInstanceUuid) if volume.vmInstanceUuid else None
    return vm if vm is not None and vm.libvirtDomain else None


def _backup_metadata(session: Session, backup: VolumeBackup, volume: Volume) -> dict[str, Any]:
    metadata = _vm_metadata(session, volume)
    metadata["backup"] = {"uuid": backup.uuid, "name": backup.name, "groupUuid": backup.groupUuid}
    return metadata


def _record(
    session: Session,
    backup: VolumeBackup,
    volume: Volume,
    storage: BackupStorage,
    result: BackupResult,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """A backup whose manifest is on ``storage``: Ready, with what the engine did."""
    backup.mode = result.mode
    backup.size = result.size
    backup.parentUuid = _parent_uuid(session, storage, result.parent)
    backup.metadata_ = metadata
    backup.bytesRead = result.bytesRead
    backup.bytesWritten = result.bytesWritten
    backup.chunks = result.chunks
    backup.newChunks = result.newChunks
    backup.status = "Ready"
    for ref in backup.backupStorageRefs:
        if ref.backupStorageUuid == storage.uuid:
            ref.installPath = result.installPath
            ref.status = "Ready"
    volume.size = result.size
    return {**inventory(session, backup), "stats": result.to_json()}


def _fail_over(
    session: Session, rows: list[VolumeBackup], storage: BackupStorage, attempt: int, exc: Exception
) -> BackupStorage:
    """The master ``storage`` failed a backup: the standby that takes over (the rows' refs
    move there), or the error again when there is none."""
    session.rollback()
    new = failover(session, storage, full=isinstance(exc, StorageFull)) if attempt < 2 else None
    if new is None or new.uuid == storage.uuid:
        raise exc
    log.warning("backup.failover from=%s to=%s after: %s", storage.uuid, new.uuid, exc)
    _move_refs(session, rows, storage, new)
    return new


def _take_offline(
    session: Session,
    rows: list[VolumeBackup],
    volumes: list[Volume],
    files: dict[str, str],
    storage: BackupStorage,
    *,
    full: bool,
    job_uuid: str,
    how: str,
    domain: VmInstance | None = None,
) -> tuple[list[dict[str, Any]], BackupStorage]:
    """Volumes read from their files (the VM is stopped, or forced): one after another. The
    disks of a stopped libvirt ``domain`` go on from its checkpoints' bitmaps."""
    report = progress_reporter(job_uuid)
    repo: Repository | None = None
    done = []
    for index, (backup, volume) in enumerate(zip(rows, volumes, strict=True)):
        metadata = {**_backup_metadata(session, backup, volume), "consistency": how, "live": False}

        def scaled(d: int, t: int, i: int = index) -> None:
            report(i * 1000 + (d * 1000 // t if t else 0), len(rows) * 1000)

        bitmap = BITMAP if volume.format == "qcow2" and domain is None else None
        take_full = full
        for attempt in range(3):
            parent = None if take_full or bitmap else _newest_copy(session, volume.uuid, storage.uuid)
            try:
                repo = repo or backup_repository(storage)
                if domain is not None:
                    spec = LiveDisk(files[volume.uuid], volume.format, backup.name, metadata, parent)
                    from shared.libvirt.backup import backup_stopped_disk  # libvirt-python: the libvirt extra

                    result = backup_stopped_disk(repo, spec, full=take_full, progress=scaled)
                    break
                result = backup_volume(
                    repo,
                    files[volume.uuid],
                    full=take_full or (not bitmap and parent is None),
                    parent=parent,
                    bitmap=bitmap,
                    name=backup.name,
                    metadata=metadata,
                    progress=scaled,
                    volume_format=volume.format,
                )
                break
            except BackupNotFound:
                if parent is None:
                    raise
                log.warning("backup.parent_missing volume=%s parent=%s: taking a full one", volume.uuid, parent)
                take_full = True
            except (BackendError, RepositoryError) as exc:
                storage, repo = _fail_over(session, rows[index:], storage, attempt, exc), None
        done.append(_record(session, backup, volume, storage, result, metadata))
        session.commit()
    return done, storage


def _take_live(
    session: Session,
    rows: list[VolumeBackup],
    volumes: list[Volume],
    files: dict[str, str],
    storage: BackupStorage,
    vm: VmInstance,
    *,
    full: bool,
    job_uuid: str,
) -> tuple[list[dict[str, Any]], BackupStorage]:
    """The volumes of a Running VM, read from its QEMU at one instant (one transaction across
    its disks). The rows turn Ready together once every manifest is on storage, before the
    dirty bitmaps rotate (libvirt: before older checkpoints go). A master that fails mid-way:
    the whole VM again on the standby."""
    take = _libvirt_taker(vm, whole_vm=bool(rows[0].groupUuid)) if vm.libvirtDomain else _qmp_taker(vm)
    done: list[dict[str, Any]] = []
    use_parents = not full
    for attempt in range(3):
        metadata = [_backup_metadata(session, backup, volume) for backup, volume in zip(rows, volumes, strict=True)]
        disks = [
            LiveDisk(
                path=files[volume.uuid],
                format=volume.format,
                name=backup.name,
                metadata=meta,
                parent=_newest_copy(session, volume.uuid, storage.uuid) if use_parents else None,
            )
            for backup, volume, meta in zip(rows, volumes, metadata, strict=True)
        ]

        def committed(live: LiveResult, on: BackupStorage = storage, meta: list[dict[str, Any]] = metadata) -> None:
            extra = {"consistency": live.consistency, "live": True}
            if live.quiesceError:
                extra["quiesceError"] = live.quiesceError
            done[:] = [
                _record(session, backup, volume, on, result, {**m, **extra})
                for backup, volume, result, m in zip(rows, volumes, live.backups, meta, strict=True)
            ]
            session.commit()

        try:
            take(backup_repository(storage), disks, full, progress_reporter(job_uuid), committed)
            return done, storage
        except BackupNotFound:
            if not use_parents:
                raise
            log.warning("backup.parent_missing vm=%s: reading every disk whole", vm.uuid)
            session.rollback()
            use_parents = False
        except (BackendError, RepositoryError) as exc:
            storage = _fail_over(session, rows, storage, attempt, exc)
    raise Conflict(detail=f"VM {vm.uuid}: the live backup did not succeed in 3 attempts")


Taker = Callable[[Repository, list[LiveDisk], bool, Progress, Callable[[LiveResult], None]], LiveResult]


def _qmp_taker(vm: VmInstance) -> Taker:
    """Plain QEMU: through the VM's own QMP socket (and guest agent socket)."""
    monitor = hostpaths.resolve_socket(vm.qmpSocket, f"VM {vm.uuid}'s qmpSocket")
    agent = (
        hostpaths.resolve_socket(vm.guestAgentSocket, f"VM {vm.uuid}'s guestAgentSocket")
        if vm.guestAgentSocket
        else None
    )

    def take(
        repo: Repository, disks: list[LiveDisk], full: bool, progress: Progress, committed: Callable[[LiveResult], None]
    ) -> LiveResult:
        work = get_settings().data_path / "live"
        return backup_live(repo, monitor, disks, work_dir=work, full=full, agent_socket=agent, progress=progress,
                           on_committed=committed)  # fmt: skip

    return take


def _libvirt_taker(vm: VmInstance, *, whole_vm: bool) -> Taker:
    """A libvirt domain: libvirt's backup API in pull mode (shared.libvirt.backup), at the
    worker's BLOCKVAULT_LIBVIRT_URI (default qemu:///system)."""
    from shared.libvirt import backup as libvirt_backup  # libvirt-python: the libvirt extra

    uri = connection.configured_uri() or DEFAULT_LIBVIRT_URI

    def take(
        repo: Repository, disks: list[LiveDisk], full: bool, progress: Progress, committed: Callable[[LiveResult], None]
    ) -> LiveResult:
        conn, dom = libvirt_backup.open_domain(uri, vm.uuid)
        try:
            work = get_settings().data_path / "libvirt-live"
            return libvirt_backup.backup_domain(repo, dom, disks, work_dir=work, full=full, whole_vm=whole_vm,
                                                progress=progress, on_committed=committed)  # fmt: skip
        finally:
            connection.close(conn)

    return take


def _newest_copy(session: Session, volume_uuid: str, storage_uuid: str) -> str | None:
    """The manifest id of the volume's newest Ready backup on the storage, from the catalog:
    the parent of a raw volume's next backup (the engine then reads one manifest instead of
    listing and decoding every backup on the storage)."""
    path = session.scalars(
        select(VolumeBackupStorageRef.installPath)
        .join(VolumeBackup, VolumeBackup.uuid == VolumeBackupStorageRef.volumeBackupUuid)
        .where(
            VolumeBackup.volumeUuid == volume_uuid,
            VolumeBackup.status == "Ready",
            VolumeBackupStorageRef.backupStorageUuid == storage_uuid,
            VolumeBackupStorageRef.status == "Ready",
        )
        .order_by(VolumeBackup.createDate.desc())
        .limit(1)
    ).first()
    return parse_install_path(path)[1] if path else None


def _move_refs(session: Session, rows: list[VolumeBackup], old: BackupStorage, new: BackupStorage) -> None:
    """The not-yet-taken backups of a job now go to ``new`` (after a failover)."""
    for row in rows:
        for ref in row.backupStorageRefs:
            if ref.backupStorageUuid == old.uuid and ref.status == "Creating":
                ref.backupStorageUuid = new.uuid
    session.commit()
