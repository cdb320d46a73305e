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
import stat
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import hostpaths, hosts
from shared.apijobs import enqueue, progress_reporter
from shared.catalog.models import (
    ApiJob,
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
from shared.celery_app import STORAGE_QUEUE, host_queue
from shared.config import get_settings
from shared.errors import (
    BackendError,
    BackupNotFound,
    BlockvaultError,
    Conflict,
    InvalidArgument,
    NotFound,
    PathNotAllowed,
    RepositoryError,
    VolumeError,
    require,
)
from shared.inventory import inventory
from shared.repository.backup import BackupResult, backup_volume
from shared.repository.live import LiveDisk, LiveResult, backup_live
from shared.repository.maintenance import gc, verify
from shared.repository.repo import Repository
from shared.repository.restore import restore_backup
from shared.repository.sync import sync
from shared.storage import current_master, failover, open_repository, refresh_capacity, standbys

log = logging.getLogger(__name__)
MODES = ("auto", "full", "incremental")
AnyBackup = VolumeBackup | DatabaseBackup
AnyRef = VolumeBackupStorageRef | DatabaseBackupStorageRef
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


def _check_vm_stopped(session: Session, volume: Volume, action: str) -> None:
    if volume.vmInstanceUuid:
        vm = session.get(VmInstance, volume.vmInstanceUuid)
        if vm is not None and vm.state == "Running":
            raise Conflict(detail=f"VM {vm.uuid} is Running: {action} needs it Stopped")


def _running_vm(session: Session, volume: Volume) -> VmInstance | None:
    vm = session.get(VmInstance, volume.vmInstanceUuid) if volume.vmInstanceUuid else None
    return vm if vm is not None and vm.state == "Running" else None


def _check_backup_allowed(vm: VmInstance | None, force: bool) -> None:
    """A Running VM is backed up live through its QEMU monitor; without one, only when forced
    (the file is then read as it is: crash-consistent at best)."""
    if vm is not None and not vm.qmpSocket and not force:
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
    _connected_host(session, volume.hostUuid)
    backup = new_backup_row(session, volume, storage, str(name), None, params.get("description"))
    session.flush()
    return enqueue(
        session,
        "createVolumeBackup",
        task="blockvault.volume.backup",
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
            "force": force,
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
    done, _taken_on = take_backups(
        session, rows, storage, full=params.get("mode") == "full", job_uuid=job.uuid, force=bool(params.get("force"))
    )
    return (
        done[0] if job.action == "createVolumeBackup" else {"groupUuid": params.get("groupUuid"), "volumeBackups": done}
    )


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
    if vm is not None and vm.qmpSocket:
        done, storage = _take_live(session, rows, volumes, files, storage, vm, full=full, job_uuid=job_uuid)
    else:
        consistency = "crash" if vm is not None else "offline"
        done, storage = _take_offline(
            session, rows, volumes, files, storage, full=full, job_uuid=job_uuid, how=consistency
        )
    refresh_capacity(storage)
    session.commit()
    replicate(session, rows, storage)
    return done, storage


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
    new = failover(session, storage) if attempt < 2 else None
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
) -> tuple[list[dict[str, Any]], BackupStorage]:
    """Volumes read from their files (the VM is stopped, or forced): one after another."""
    report = progress_reporter(job_uuid)
    repo: Repository | None = None
    done = []
    for index, (backup, volume) in enumerate(zip(rows, volumes, strict=True)):
        metadata = {**_backup_metadata(session, backup, volume), "consistency": how, "live": False}

        def scaled(d: int, t: int, i: int = index) -> None:
            report(i * 1000 + (d * 1000 // t if t else 0), len(rows) * 1000)

        bitmap = BITMAP if volume.format == "qcow2" else None
        take_full = full
        for attempt in range(3):
            parent = None if take_full or bitmap else _newest_copy(session, volume.uuid, storage.uuid)
            try:
                repo = repo or open_repository(storage)
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
    dirty bitmaps rotate. A master that fails mid-way: the whole VM again on the standby."""
    monitor = hostpaths.resolve_socket(vm.qmpSocket, f"VM {vm.uuid}'s qmpSocket")
    agent = (
        hostpaths.resolve_socket(vm.guestAgentSocket, f"VM {vm.uuid}'s guestAgentSocket")
        if vm.guestAgentSocket
        else None
    )
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
            backup_live(
                open_repository(storage),
                monitor,
                disks,
                work_dir=get_settings().data_path / "live",
                full=full,
                agent_socket=agent,
                progress=progress_reporter(job_uuid),
                on_committed=committed,
            )
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


def replicate(session: Session, rows: Sequence[AnyBackup], storage: BackupStorage) -> None:
    """Backups just committed on the ImageStore master go to every standby that answers; a
    standby that does not is caught up by the maintenance pass once it answers again."""
    if storage.type != "ImageStore" or storage.role != "master":
        return
    for standby in standbys(session):
        if standby.status != "Connected":
            continue
        try:
            copy_backups(session, rows, storage, standby)
        except BlockvaultError as exc:
            log.warning("backup.replication_failed standby=%s: %s", standby.uuid, exc)


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
    return path.rsplit("/", 1)[-1] if path else None


def copy_on(session: Session, row: AnyBackup, storage_uuid: str) -> tuple[BackupStorage, AnyRef]:
    """The storage a job reads ``row`` from, and the ref of the copy there."""
    storage: BackupStorage = get(session, BackupStorage, storage_uuid, "backup storage")
    ref = _ref_on(row, storage.uuid)
    if ref is None:
        raise Conflict(detail=f"backup {row.uuid} has no copy on backup storage {storage.uuid}")
    return storage, ref


def _move_refs(session: Session, rows: list[VolumeBackup], old: BackupStorage, new: BackupStorage) -> None:
    """The not-yet-taken backups of a job now go to ``new`` (after a failover)."""
    for row in rows:
        for ref in row.backupStorageRefs:
            if ref.backupStorageUuid == old.uuid and ref.status == "Creating":
                ref.backupStorageUuid = new.uuid
    session.commit()


# -- copies between storages ----------------------------------------------------------------------
def _ref_on(row: AnyBackup, storage_uuid: str) -> AnyRef | None:
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


def copy_backups(
    session: Session,
    rows: Sequence[AnyBackup],
    source: BackupStorage,
    target: BackupStorage,
    *,
    bandwidth_limit: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Copy the backups ``rows`` from ``source`` to ``target``: only the chunks the target
    lacks, each manifest last. The target's refs are ``Creating`` while it runs, ``Ready``
    with their installPath after, ``Failed`` when it fails (a later copy resumes: it sends
    only what is still missing)."""
    if source.uuid == target.uuid:
        raise InvalidArgument(detail="source and destination backup storage are the same")
    sources = {row.uuid: _ref_on(row, source.uuid) for row in rows}
    lacking = [uuid for uuid, ref in sources.items() if ref is None or ref.status != "Ready"]
    if lacking:
        raise Conflict(detail=f"backup storage {source.uuid} holds no Ready copy of {', '.join(lacking)}")
    targets = {}
    for row in rows:
        ref = _ref_on(row, target.uuid)
        if ref is None:
            ref = add_ref(row, target.uuid)
        elif ref.status != "Ready":
            ref.status = "Creating"
        targets[row.uuid] = ref
    session.commit()
    ids = [_manifest_id(ref) for ref in sources.values() if ref is not None]
    try:
        src = open_repository(source)
        dst = open_repository(target)  # registered storage holds its repository: never re-create a vanished one
        report = sync(src, dst, ids, bandwidth_limit=bandwidth_limit, progress=progress)
    except BlockvaultError:
        session.rollback()
        for ref in targets.values():
            if ref.status == "Creating":
                ref.status = "Failed"
        session.commit()
        raise
    for row in rows:
        ref = targets[row.uuid]
        ref.installPath = dst.install_path(_manifest_id(sources[row.uuid]))  # type: ignore[arg-type]
        ref.status = "Ready"
    refresh_capacity(target)
    session.commit()
    log.info("copy.done from=%s to=%s backups=%d bytes=%d", source.uuid, target.uuid, len(rows), report.bytesCopied)
    return {
        "srcBackupStorageUuid": source.uuid,
        "dstBackupStorageUuid": target.uuid,
        "volumeBackupUuids": [row.uuid for row in rows],
        "chunksCopied": report.chunksCopied,
        "bytesCopied": report.bytesCopied,
        "seconds": report.seconds,
    }


SYNC_ACTIONS = (
    "syncDatabaseBackupFromImageStoreBackupStorage",
    "syncBackupFromImageStoreBackupStorage",
    "recoverBackupFromImageStoreBackupStorage",
    "syncVmBackupFromImageStoreBackupStorage",
    "recoverVmBackupFromImageStoreBackupStorage",
)


def request_sync(
    session: Session, action: str, rows: Sequence[AnyBackup], params: dict[str, Any], account: str | None
) -> ApiJob:
    """sync*/recover* actions: copy one backup (or a VM backup's) to another storage."""
    require(params, "dstBackupStorageUuid", *(["srcBackupStorageUuid"] if action.startswith("recover") else []))
    target = pick_storage(session, str(params["dstBackupStorageUuid"]))
    limit = params.get("bandwidthLimit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise InvalidArgument(detail="bandwidthLimit must be a whole number of bytes/s, at least 1")
    src_uuid = params.get("srcBackupStorageUuid")
    if src_uuid:
        get(session, BackupStorage, str(src_uuid), "backup storage")
    for row in rows:
        if row.status != "Ready":
            raise Conflict(detail=f"backup {row.uuid} is {row.status}")
    refs = [_ready_ref(row, src_uuid, session) for row in rows]
    sources = {ref.backupStorageUuid for ref in refs}
    if len(sources) != 1:
        raise Conflict(detail="the backups have no single storage holding every one: name srcBackupStorageUuid")
    source = sources.pop()
    if source == target.uuid:
        raise InvalidArgument(detail="source and destination backup storage are the same")
    first = rows[0]
    group = first.groupUuid if isinstance(first, VolumeBackup) and action.startswith(("syncVm", "recoverVm")) else None
    database = isinstance(first, DatabaseBackup)
    return enqueue(
        session,
        action,
        task="blockvault.storage.sync",
        queue=STORAGE_QUEUE,
        params={
            "backupUuids": [row.uuid for row in rows],
            "srcBackupStorageUuid": source,
            "dstBackupStorageUuid": target.uuid,
            "bandwidthLimit": limit,
            **({"database": True} if database else {}),
        },
        resource_uuid=group or first.uuid,
        resource_type="DatabaseBackupSync" if database else "VolumeBackupSync",
        account_uuid=account,
    )


def run_sync(session: Session, job: ApiJob) -> dict[str, Any]:
    params = job.params or {}
    source: BackupStorage = get(session, BackupStorage, params["srcBackupStorageUuid"], "backup storage")
    target: BackupStorage = get(session, BackupStorage, params["dstBackupStorageUuid"], "backup storage")
    model, what = (DatabaseBackup, "database backup") if params.get("database") else (VolumeBackup, "volume backup")
    rows = [get(session, model, uuid, what) for uuid in params["backupUuids"]]
    result = copy_backups(
        session,
        rows,
        source,
        target,
        bandwidth_limit=params.get("bandwidthLimit"),
        progress=progress_reporter(job.uuid),
    )
    return {**result, "inventories": [inventory(session, row) for row in rows]}


def catch_up(session: Session, limit: int = 200) -> list[str]:
    """Maintenance: copy what one member of the master/standby pair holds and the other
    lacks (the standby was down, or the old master rejoins), one job per direction at a time.
    Returns the uuids of the jobs it sent."""
    master = current_master(session)
    if master is None or master.type != "ImageStore" or master.status != "Connected":
        return []
    sent = []
    for standby in standbys(session):
        if standby.status != "Connected":
            continue
        for source, target in ((master, standby), (standby, master)):
            busy = session.scalars(
                select(ApiJob.uuid).where(
                    ApiJob.action == "replicateBackupStorage",
                    ApiJob.resourceUuid == target.uuid,
                    ApiJob.state.in_(("Pending", "Running")),
                )
            ).first()
            if busy:
                continue
            held = select(VolumeBackupStorageRef.volumeBackupUuid).where(
                VolumeBackupStorageRef.backupStorageUuid == target.uuid, VolumeBackupStorageRef.status == "Ready"
            )
            uuids = list(
                session.scalars(
                    select(VolumeBackupStorageRef.volumeBackupUuid)
                    .join(VolumeBackup, VolumeBackup.uuid == VolumeBackupStorageRef.volumeBackupUuid)
                    .where(
                        VolumeBackupStorageRef.backupStorageUuid == source.uuid,
                        VolumeBackupStorageRef.status == "Ready",
                        VolumeBackup.status == "Ready",
                        VolumeBackupStorageRef.volumeBackupUuid.not_in(held),
                    )
                    .limit(limit)
                )
            )
            if not uuids:
                continue
            job = enqueue(
                session,
                "replicateBackupStorage",
                task="blockvault.storage.sync",
                queue=STORAGE_QUEUE,
                params={"backupUuids": uuids, "srcBackupStorageUuid": source.uuid, "dstBackupStorageUuid": target.uuid},
                resource_uuid=target.uuid,
                resource_type=BackupStorage.resource_type,
            )
            log.info("storage.catch_up from=%s to=%s backups=%d job=%s", source.uuid, target.uuid, len(uuids), job.uuid)
            sent.append(job.uuid)
    return sent


# -- actions on existing backups ------------------------------------------------------------------
def _ready_ref(backup: AnyBackup, storage_uuid: str | None, session: Session) -> AnyRef:
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


def _backup_for_action(session: Session, uuid: str) -> VolumeBackup:
    backup: VolumeBackup = get(session, VolumeBackup, uuid, "volume backup")
    if backup.status != "Ready":
        raise Conflict(detail=f"volume backup {uuid} is {backup.status}")
    return backup


def request_revert(session: Session, uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    backup = _backup_for_action(session, uuid)
    if backup.state != "Enabled":
        raise Conflict(detail=f"volume backup {uuid} is Disabled")
    volume = ready_volume(session, backup.volumeUuid)
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
    volumes = [ready_volume(session, b.volumeUuid) for b in backups]
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


def _manifest_id(ref: AnyRef) -> str:
    return (ref.installPath or "").rsplit("/", 1)[-1]


def run_revert(session: Session, job: ApiJob) -> dict[str, Any]:
    """Revert each volume to its backup, on the volume's real file (a symlinked volume's
    target, checked inside the host's volume roots): a regular file is restored beside itself
    and renamed over itself with its owner and mode, so it is either untouched or wholly
    reverted; a block device is written in place."""
    params = job.params or {}
    uuids = params.get("backupUuids") or [params["backupUuid"]]
    report = progress_reporter(job.uuid)
    reverted = []
    for index, uuid in enumerate(uuids):
        backup: VolumeBackup = get(session, VolumeBackup, uuid, "volume backup")
        volume: Volume = get(session, Volume, backup.volumeUuid, "volume")
        _check_vm_stopped(session, volume, "revert")
        storage, ref = copy_on(session, backup, params["backupStorageUuid"])
        target = Path(volume_file(session, volume))

        def scaled(d: int, t: int, i: int = index) -> None:
            report(i * 1000 + (d * 1000 // t if t else 0), len(uuids) * 1000)

        repo, manifest_id = open_repository(storage), _manifest_id(ref)
        before = target.stat()
        if stat.S_ISBLK(before.st_mode):
            if volume.format != "raw":
                raise VolumeError(path=volume.installPath, detail="only raw volumes on block devices are reverted")
            restore_backup(repo, manifest_id, str(target), progress=scaled, in_place=True)
        else:
            suffix = ".qcow2" if volume.format == "qcow2" else ".raw"
            staging = target.with_name(f".{target.name}.revert-{job.uuid[:8]}{suffix}")
            staging.unlink(missing_ok=True)
            restore_backup(repo, manifest_id, str(staging), progress=scaled, fmt=volume.format)
            os.chown(staging, before.st_uid, before.st_gid)
            os.chmod(staging, stat.S_IMODE(before.st_mode))
            os.replace(staging, target)  # the volume switches to the backup's content in one step
        volume.size = backup.size
        session.commit()
        reverted.append(inventory(session, volume))
    return reverted[0] if len(reverted) == 1 and "backupUuid" in params else {"volumes": reverted}


def ensure_path_free(session: Session, host_uuid: str, path: str) -> None:
    """Conflict when a registered volume already lives at ``path`` on ``host_uuid``."""
    if session.scalars(select(Volume).where(Volume.hostUuid == host_uuid, Volume.installPath == path)).first():
        raise Conflict(detail=f"a volume at {path} on host {host_uuid} is registered already")


def _check_delete_mode(mode: str) -> None:
    if mode not in ("Permissive", "Enforcing"):
        raise InvalidArgument(detail="deleteMode must be Permissive or Enforcing")


def request_create_volume(session: Session, uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    """createDataVolumeFromVolumeBackup: a new volume, placed by the platform: on the host of
    the VM it joins, else of the backed-up volume (an admin may name ``hostUuid``), as
    ``<volume uuid>.<format>`` beside the backed-up volume's file when that lies in one of the
    host's volume roots, else in its first root (an admin may name an ``installPath`` inside a
    root). The row is ``Creating`` until the worker has written every byte; a failed create
    leaves no row."""
    backup = _backup_for_action(session, uuid)
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
    ref = _ready_ref(backup, params.get("backupStorageUuid"), session)
    _connected_host(session, host.uuid)
    volume = Volume(
        uuid=volume_uuid,
        name=str(params["name"]),
        description=params.get("description"),
        hostUuid=host.uuid,
        vmInstanceUuid=target_vm.uuid if target_vm else None,
        # the new volume belongs where its data came from (or to the VM it joins)
        projectUuid=(target_vm.projectUuid if target_vm else None) or _project_of(session, source),
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
        queue=host_queue(host.uuid),
        params={"backupUuid": uuid, "backupStorageUuid": ref.backupStorageUuid, "volumeUuid": volume.uuid},
        resource_uuid=volume.uuid,
        resource_type=Volume.resource_type,
        host_uuid=host.uuid,
        account_uuid=account,
    )


def _project_of(session: Session, volume: Volume | None) -> str | None:
    """A volume's project: its own, or its VM's."""
    if volume is None:
        return None
    vm = session.get(VmInstance, volume.vmInstanceUuid) if volume.vmInstanceUuid else None
    return volume.projectUuid or (vm.projectUuid if vm else None)


def run_create_volume(session: Session, job: ApiJob) -> dict[str, Any]:
    params = job.params or {}
    backup: VolumeBackup = get(session, VolumeBackup, params["backupUuid"], "volume backup")
    volume: Volume = get(session, Volume, params["volumeUuid"], "volume")
    storage, ref = copy_on(session, backup, params["backupStorageUuid"])
    if volume.status != "Creating":
        raise Conflict(detail=f"volume {volume.uuid} is {volume.status}, not being created")
    target = hostpaths.resolve_new_volume(volume.installPath)  # a failure fails the job: the row goes
    restore_backup(open_repository(storage), _manifest_id(ref), str(target), progress=progress_reporter(job.uuid))
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
    storage, ref = copy_on(session, backup, params["backupStorageUuid"])
    report = verify(open_repository(storage), _manifest_id(ref), read_data=bool(params.get("readData")))
    if not report.ok:
        ref.status = "Corrupted"
        session.commit()
        from shared.errors import IntegrityError

        raise IntegrityError(detail="; ".join(p.describe() for p in report.problems[:5]))
    return {**inventory(session, backup), "verified": {"chunks": report.chunks, "bytesRead": report.bytesRead}}


def request_delete(
    session: Session,
    uuid: str,
    storage_uuids: list[str] | None,
    mode: str,
    account: str | None,
    model: type[AnyBackup] = VolumeBackup,
) -> ApiJob:
    database = model is DatabaseBackup
    what = "database backup" if database else "volume backup"
    backup: AnyBackup = get(session, model, uuid, what)
    _check_delete_mode(mode)
    if backup.status in ("Deleting", "Creating"):
        raise Conflict(detail=f"{what} {uuid} is {backup.status}")
    held = {r.backupStorageUuid for r in backup.backupStorageRefs}
    targets = storage_uuids or sorted(held)
    unknown = [s for s in targets if s not in held]
    if unknown:
        raise InvalidArgument(detail=f"{what} {uuid} has no copy on backup storage {', '.join(unknown)}")
    backup.status = "Deleting"
    session.flush()
    return enqueue(
        session,
        "deleteDatabaseBackup" if database else "deleteVolumeBackup",
        task="blockvault.storage.delete",
        queue=STORAGE_QUEUE,
        params={"backupUuid": uuid, "backupStorageUuids": targets},
        resource_uuid=uuid,
        resource_type="DatabaseBackupDelete" if database else "VolumeBackupDelete",
        account_uuid=account,
    )


def request_vm_delete(
    session: Session, group_uuid: str, storage_uuids: list[str] | None, mode: str, account: str | None
) -> ApiJob:
    backups = group_backups(session, group_uuid)
    _check_delete_mode(mode)
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
    model = DatabaseBackup if job.resourceType == "DatabaseBackupDelete" else VolumeBackup
    results = []
    for index, uuid in enumerate(uuids):
        try:
            results.append(delete_backup_copies(session, uuid, params.get("backupStorageUuids"), model))
        except BlockvaultError:
            for rest in uuids[index + 1 :]:  # untouched: back to Ready, the job fails
                row: AnyBackup | None = session.get(model, rest)  # type: ignore[assignment]
                if row is not None and row.status == "Deleting":
                    row.status = "Ready"
            session.commit()
            raise
    return results[0] if "backupUuid" in params else {"volumeBackups": results}


def delete_backup_copies(
    session: Session, uuid: str, storage_uuids: list[str] | None, model: type[AnyBackup] = VolumeBackup
) -> dict[str, Any]:
    """Remove a backup's copies from ``storage_uuids`` (all when None), gc there when idle,
    and the row when no copy is left."""
    backup: AnyBackup | None = session.get(model, uuid)  # type: ignore[assignment]
    if backup is None:
        return {"uuid": uuid, "deleted": True}
    refs: list[AnyRef] = list(backup.backupStorageRefs)
    for ref in refs:
        if storage_uuids and ref.backupStorageUuid not in storage_uuids:
            continue
        storage: BackupStorage = get(session, BackupStorage, ref.backupStorageUuid, "backup storage")
        try:
            repo = open_repository(storage)
            if ref.installPath:
                repo.delete_manifest(_manifest_id(ref))
        except BlockvaultError:
            session.rollback()
            backup.status = "Ready"  # the copies not deleted are still good
            session.commit()
            raise
        backup.backupStorageRefs.remove(ref)  # type: ignore[arg-type]
        session.commit()  # each storage's copy is gone for good before the next one is touched
        try:
            gc(repo, wait=0)
        except Exception:  # noqa: BLE001 - busy or append-only storage: the next gc reclaims it
            log.info("delete.gc_deferred storage=%s", storage.uuid)
        refresh_capacity(storage)
    if not backup.backupStorageRefs:
        session.delete(backup)
        session.commit()
        return {"uuid": uuid, "deleted": True}
    backup.status = "Ready"
    session.commit()
    return inventory(session, backup)


# -- backup storage jobs ---------------------------------------------------------------------------
def request_storage_job(session: Session, storage: BackupStorage, action: str, account: str | None) -> ApiJob:
    """scanBackupStorage and reclaimSpaceFromImageStore run on the storage queue."""
    if storage.state != "Enabled":
        raise Conflict(detail=f"backup storage {storage.uuid} is {storage.state}")
    task = {"scanBackupStorage": "blockvault.storage.scan", "reclaimSpaceFromImageStore": "blockvault.storage.gc"}
    return enqueue(
        session,
        action,
        task=task[action],
        queue=STORAGE_QUEUE,
        params={"backupStorageUuid": storage.uuid},
        resource_uuid=storage.uuid,
        resource_type=BackupStorage.resource_type,
        account_uuid=account,
    )


def run_reclaim(session: Session, job: ApiJob) -> dict[str, Any]:
    """reclaimSpaceFromImageStore: garbage-collect chunks no backup references."""
    storage: BackupStorage = get(session, BackupStorage, (job.params or {})["backupStorageUuid"], "backup storage")
    report = gc(open_repository(storage), wait=get_settings().lock_wait_seconds)
    refresh_capacity(storage)
    session.commit()
    return {"backupStorageUuid": storage.uuid, **asdict(report)}
