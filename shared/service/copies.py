"""Copies between backup storages: the sync/recover actions (``request_sync`` in the API,
``run_sync`` in a worker), standby replication after each backup (:func:`replicate`) and the
maintenance catch-up between a master and its standbys (:func:`catch_up`). Only the chunks a
target lacks are sent, the manifest last; a target's copy is ``Creating`` until it is whole."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import celery_app as tasks
from shared.apijobs import enqueue, progress_reporter
from shared.catalog.models import (
    ApiJob,
    BackupStorage,
    DatabaseBackup,
    DatabaseBackupStorageRef,
    VolumeBackup,
    VolumeBackupStorageRef,
)
from shared.celery_app import STORAGE_QUEUE
from shared.errors import (
    BlockvaultError,
    Conflict,
    InvalidArgument,
    require,
)
from shared.inventory import inventory
from shared.repository.sync import sync
from shared.service.rows import AnyBackup, add_ref, get, manifest_id, pick_storage, ready_ref, ref_on
from shared.storage import current_master, open_repository, refresh_capacity, standbys

log = logging.getLogger(__name__)


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
    sources = {row.uuid: ref_on(row, source.uuid) for row in rows}
    lacking = [uuid for uuid, ref in sources.items() if ref is None or ref.status != "Ready"]
    if lacking:
        raise Conflict(detail=f"backup storage {source.uuid} holds no Ready copy of {', '.join(lacking)}")
    targets = {}
    for row in rows:
        ref = ref_on(row, target.uuid)
        if ref is None:
            ref = add_ref(row, target.uuid)
        elif ref.status != "Ready":
            ref.status = "Creating"
        targets[row.uuid] = ref
    session.commit()
    ids = [manifest_id(ref) for ref in sources.values() if ref is not None]
    try:
        src = open_repository(source)
        dst = open_repository(target)  # registered storage holds its repository: never re-create a vanished one
        report = sync(src, dst, ids, bandwidth_limit=bandwidth_limit, progress=progress)
        for row in rows:  # a protected backup is protected on every storage that holds it
            if row.protected:
                dst.protect(manifest_id(sources[row.uuid]))  # type: ignore[arg-type]
    except BlockvaultError:
        session.rollback()
        for ref in targets.values():
            if ref.status == "Creating":
                ref.status = "Failed"
        session.commit()
        raise
    for row in rows:
        ref = targets[row.uuid]
        ref.installPath = dst.install_path(manifest_id(sources[row.uuid]))  # type: ignore[arg-type]
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
    refs = [ready_ref(row, src_uuid, session) for row in rows]
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
        task=tasks.STORAGE_SYNC,
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


def lacking(
    session: Session,
    source: BackupStorage,
    target: BackupStorage,
    limit: int | None = None,
    *,
    model: type[VolumeBackup] | type[DatabaseBackup] = VolumeBackup,
) -> list[str]:
    """The Ready backups (volume backups, or database backups with ``model=DatabaseBackup``)
    ``source`` holds a Ready copy of and ``target`` does not (at most ``limit``, oldest
    first): what a copy from one to the other has to send."""
    ref: Any = VolumeBackupStorageRef if model is VolumeBackup else DatabaseBackupStorageRef
    link = ref.volumeBackupUuid if model is VolumeBackup else ref.databaseBackupUuid
    held = select(link).where(ref.backupStorageUuid == target.uuid, ref.status == "Ready")
    return list(
        session.scalars(
            select(link)
            .join(model, model.uuid == link)
            .where(
                ref.backupStorageUuid == source.uuid,
                ref.status == "Ready",
                model.status == "Ready",
                link.not_in(held),
            )
            .order_by(model.createDate, model.uuid)
            .limit(limit)
        )
    )


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
            uuids = lacking(session, source, target, limit)
            if not uuids:
                continue
            job = enqueue(
                session,
                "replicateBackupStorage",
                task=tasks.STORAGE_SYNC,
                queue=STORAGE_QUEUE,
                params={"backupUuids": uuids, "srcBackupStorageUuid": source.uuid, "dstBackupStorageUuid": target.uuid},
                resource_uuid=target.uuid,
                resource_type=BackupStorage.resource_type,
            )
            log.info("storage.catch_up from=%s to=%s backups=%d job=%s", source.uuid, target.uuid, len(uuids), job.uuid)
            sent.append(job.uuid)
    return sent
