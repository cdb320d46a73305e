"""Deleting backups' copies (``request_delete`` / ``request_vm_delete`` in the API,
``run_delete`` in a worker; a backup's row goes with its last copy) and the storage jobs that
free space or import what a storage holds (``request_storage_job``, ``run_reclaim``)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import celery_app as tasks
from shared.apijobs import enqueue
from shared.catalog.models import (
    ApiJob,
    BackupStorage,
    DatabaseBackup,
    VolumeBackup,
    aware,
    now,
)
from shared.celery_app import STORAGE_QUEUE
from shared.config import get_settings
from shared.errors import (
    BackupProtected,
    BlockvaultError,
    Conflict,
    InvalidArgument,
)
from shared.inventory import inventory
from shared.repository.maintenance import gc
from shared.service import protection
from shared.service.rows import AnyBackup, AnyRef, check_delete_mode, get, group_backups, manifest_id
from shared.storage import open_repository, refresh_capacity

log = logging.getLogger(__name__)


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
    check_delete_mode(mode)
    if backup.status in ("Deleting", "Creating"):
        raise Conflict(detail=f"{what} {uuid} is {backup.status}")
    held = {r.backupStorageUuid for r in backup.backupStorageRefs}
    targets = storage_uuids or sorted(held)
    unknown = [s for s in targets if s not in held]
    if unknown:
        raise InvalidArgument(detail=f"{what} {uuid} has no copy on backup storage {', '.join(unknown)}")
    protection.check_removable(session, [backup], targets, "delete")
    backup.status = "Deleting"
    session.flush()
    return enqueue(
        session,
        "deleteDatabaseBackup" if database else "deleteVolumeBackup",
        task=tasks.STORAGE_DELETE,
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
    check_delete_mode(mode)
    busy = [b.uuid for b in backups if b.status in ("Deleting", "Creating")]
    if busy:
        raise Conflict(detail=f"VM backup {group_uuid} has backups being created or deleted: {', '.join(busy)}")
    held = {ref.backupStorageUuid for backup in backups for ref in backup.backupStorageRefs}
    unknown = [s for s in storage_uuids or [] if s not in held]
    if unknown:  # as for one volume backup
        raise InvalidArgument(detail=f"VM backup {group_uuid} has no copy on backup storage {', '.join(unknown)}")
    protection.check_removable(session, backups, storage_uuids, "delete")
    for backup in backups:
        backup.status = "Deleting"
    session.flush()
    return enqueue(
        session,
        "deleteVmBackup",
        task=tasks.STORAGE_DELETE,
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
    session: Session,
    uuid: str,
    storage_uuids: list[str] | None,
    model: type[AnyBackup] = VolumeBackup,
    *,
    reclaim: bool = True,
) -> dict[str, Any]:
    """Remove a backup's copies from ``storage_uuids`` (all when None), and the row when no
    copy is left. With ``reclaim`` the space is freed at once (gc, when the storage is idle);
    without (retention, many at a time) the storage is marked reclaimDue and one reclaim job
    frees it later (:func:`reclaim_due`): a gc reads every manifest, far too much per backup."""
    backup: AnyBackup | None = session.get(model, uuid)  # type: ignore[assignment]
    if backup is None:
        return {"uuid": uuid, "deleted": True}
    if backup.protected:  # protected after the delete was asked for
        backup.status = "Ready"
        session.commit()
        raise BackupProtected(what=protection.what(backup), uuid=uuid, action="delete")
    refs: list[AnyRef] = list(backup.backupStorageRefs)
    for ref in refs:
        if storage_uuids and ref.backupStorageUuid not in storage_uuids:
            continue
        storage: BackupStorage = get(session, BackupStorage, ref.backupStorageUuid, "backup storage")
        try:
            repo = open_repository(storage)
            if ref.installPath:
                repo.delete_manifest(manifest_id(ref))
        except BlockvaultError:
            session.rollback()
            backup.status = "Ready"  # the copies not deleted are still good
            session.commit()
            raise
        backup.backupStorageRefs.remove(ref)  # type: ignore[arg-type]
        if not reclaim:
            storage.reclaimDue = True
        session.commit()  # each storage's copy is gone for good before the next one is touched
        if reclaim:
            try:
                gc(repo, wait=0)
            except Exception:  # noqa: BLE001 - busy or append-only storage: the next gc reclaims it
                log.info("delete.gc_deferred storage=%s", storage.uuid)
                storage.reclaimDue = True
            refresh_capacity(storage, force=True)
    if not backup.backupStorageRefs:
        session.delete(backup)
        session.commit()
        return {"uuid": uuid, "deleted": True}
    backup.status = "Ready"
    session.commit()
    return inventory(session, backup)


def request_storage_job(session: Session, storage: BackupStorage, action: str, account: str | None) -> ApiJob:
    """scanBackupStorage and reclaimSpaceFromImageStore run on the storage queue."""
    if storage.state != "Enabled":
        raise Conflict(detail=f"backup storage {storage.uuid} is {storage.state}")
    task = {"scanBackupStorage": tasks.STORAGE_SCAN, "reclaimSpaceFromImageStore": tasks.STORAGE_GC}
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
    return reclaim_storage(session, storage)


def reclaim_storage(session: Session, storage: BackupStorage) -> dict[str, Any]:
    """Garbage-collect ``storage`` (waiting for running backups as the settings say), note when,
    and refresh its capacity; the gc report."""
    started = now()
    report = gc(open_repository(storage), wait=get_settings().lock_wait_seconds)
    storage.lastReclaim = started
    if storage.lastOpDate is None or aware(storage.lastOpDate) <= started:  # nothing deleted meanwhile
        storage.reclaimDue = False
    refresh_capacity(storage, force=True)
    session.commit()
    return {"backupStorageUuid": storage.uuid, **asdict(report)}


def reclaim_due(session: Session, every: float) -> list[str]:
    """Maintenance: one reclaim job for each storage whose retention deleted backups and
    whose last reclaim is older than ``every`` seconds (none while one is queued or
    running). Returns the jobs sent."""
    sent = []
    cutoff = now() - timedelta(seconds=every)
    for storage in session.scalars(
        select(BackupStorage).where(BackupStorage.reclaimDue.is_(True), BackupStorage.state == "Enabled")
    ):
        if storage.lastReclaim is not None and aware(storage.lastReclaim) > cutoff:
            continue
        busy = session.scalars(
            select(ApiJob.uuid).where(
                ApiJob.action == "reclaimSpaceFromImageStore",
                ApiJob.resourceUuid == storage.uuid,
                ApiJob.state.in_(("Pending", "Running")),
            )
        ).first()
        if busy is None:
            sent.append(request_storage_job(session, storage, "reclaimSpaceFromImageStore", None).uuid)
            log.info("storage.reclaim_queued uuid=%s", storage.uuid)
    return sent
