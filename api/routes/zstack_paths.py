"""The paths where ZStack's REST differs from ``/v1`` (docs/zstack-rest.md "Paths"), served under
``/zstack/v1`` only: each route is thin, it calls the ``/v1`` handler that does the same thing
(so the checks, authorization included, are that handler's) with the body ZStack's SDK sent
read into ``/v1``'s. Mounted before the shared routers, so ``backup-storage/capacities`` is
not read as a storage uuid.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api.deps import CurrentCaller, DbSession, get_caller
from api.envelopes import Envelope, check_uuid, ok, parse_action
from api.routes import backup_storage, queries, scheduler, tags, volume_backups
from shared import access
from shared.catalog.models import BackupStorage, DatabaseBackup, SchedulerJob, SchedulerJobHistory, Tag
from shared.errors import NotFound
from shared.inventory import inventory

router = APIRouter(dependencies=[Depends(get_caller)], include_in_schema=False)

query_history: Callable[..., JSONResponse] = queries.query_handler(SchedulerJobHistory, None)


# -- volume backups --------------------------------------------------------------------------------
@router.post("/volumes/data-volume/from/volume-template/{uuid}")
def create_data_volume_from_volume_backup(
    uuid: str, body: Envelope, request: Request, session: DbSession, caller: CurrentCaller
) -> JSONResponse:
    """CreateDataVolumeFromVolumeBackup: ``{"params": {name, vmInstanceUuid, backupStorageUuid,
    ...}}``, the backup in the path; the ``/v1`` action of that name."""
    action = {"createDataVolumeFromVolumeBackup": body.params}
    return volume_backups.volume_backup_action(uuid, action, request, session, caller)


# -- imports: what an ImageStore storage holds (SyncVolumeBackup, SyncVmBackup, SyncDatabaseBackup) --
SYNC_ACTIONS = {
    "volume-backups": "syncVolumeBackup",
    "vm-backups": "syncVmBackup",
    "database-backups": "syncDatabaseBackup",
}


def _sync(kind: str) -> Any:
    def handler(uuid: str, body: dict[str, Any], request: Request, session: DbSession, caller: CurrentCaller) -> Any:
        parse_action(body or {SYNC_ACTIONS[kind]: {}}, (SYNC_ACTIONS[kind],))  # {} from the SDK: the path names it
        return backup_storage.backup_storage_action(uuid, {"scanBackupStorage": {}}, request, session, caller)

    return handler


for _kind in SYNC_ACTIONS:
    router.add_api_route(f"/{_kind}/imageStore/{{uuid}}/actions", _sync(_kind), methods=["PUT"])


# -- database backups ------------------------------------------------------------------------------
@router.put("/database-backups/{uuid}/backup-storage/{backupStorageUuid}/actions")
def export_database_backup(
    uuid: str, backupStorageUuid: str, body: dict[str, Any], session: DbSession, caller: CurrentCaller
) -> JSONResponse:
    """ExportDatabaseBackupFromBackupStorage: the Ready copy's ``databaseBackupUrl`` (its
    ``zstore://`` installPath, as the wire answers it; no download)."""
    parse_action(body or {"exportDatabaseBackupFromBackupStorage": {}}, ("exportDatabaseBackupFromBackupStorage",))
    access.require_admin(caller, "exportDatabaseBackupFromBackupStorage")
    row: DatabaseBackup = access.visible(session, caller, DatabaseBackup, check_uuid(uuid, "uuid"), "database backup")
    storage = check_uuid(backupStorageUuid, "backupStorageUuid")
    for ref in row.backupStorageRefs:
        if ref.backupStorageUuid == storage and ref.status == "Ready":
            return JSONResponse({"databaseBackupUrl": ref.installPath, "success": True})
    raise NotFound(resource=f"Ready copy of database backup {row.uuid} on backup storage", uuid=storage)


# -- ImageStore backup storage ---------------------------------------------------------------------
IMAGE_STORE_ACTIONS = {
    "reconnectImageStoreBackupStorage": "reconnectBackupStorage",
    "reconnectBackupStorage": "reconnectBackupStorage",
    "reclaimSpaceFromImageStore": "reclaimSpaceFromImageStore",
    "updateImageStoreBackupStorage": "updateBackupStorage",
    "changeBackupStorageState": "changeBackupStorageState",
}


@router.post("/backup-storage/image-store")
def add_image_store(body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """AddImageStoreBackupStorage: ``/v1``'s registration, of type ImageStore."""
    body.params = {**body.params, "type": "ImageStore"}
    return backup_storage.create_backup_storage(body, session, caller)


# QueryImageStoreBackupStorage: the storage query, ImageStore ones only
router.add_api_route(
    "/backup-storage/image-store", queries.query_handler(BackupStorage, None, ("type=ImageStore",)), methods=["GET"]
)


@router.get("/backup-storage/image-store/{uuid}")
def get_image_store(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """One ImageStore storage, as ``GET /v1/backup-storage/{uuid}`` answers it (404: not one)."""
    row = access.visible(session, caller, BackupStorage, check_uuid(uuid, "uuid"), "ImageStore backup storage")
    if row.type != "ImageStore":
        raise NotFound(resource="ImageStore backup storage", uuid=uuid)
    return JSONResponse({"inventories": [inventory(session, row)], "success": True})


@router.put("/backup-storage/image-store/{uuid}/actions")
def image_store_action(
    uuid: str, body: dict[str, Any], request: Request, session: DbSession, caller: CurrentCaller
) -> JSONResponse:
    """ZStack's ImageStore actions as ``/v1``'s storage actions (an empty body reconnects)."""
    name, params = parse_action(body or {"reconnectImageStoreBackupStorage": {}}, tuple(IMAGE_STORE_ACTIONS))
    return backup_storage.backup_storage_action(uuid, {IMAGE_STORE_ACTIONS[name]: params}, request, session, caller)


@router.get("/backup-storage/capacities")
def backup_storage_capacities(
    session: DbSession, caller: CurrentCaller, backupStorageUuids: list[str] = Query(default=[])
) -> JSONResponse:
    """GetBackupStorageCapacity: the sums over the storage the caller sees (``backupStorageUuids``
    narrows it; ``zoneUuids``/``all`` mean nothing here)."""
    wanted = [check_uuid(u, "backupStorageUuids") for item in backupStorageUuids for u in item.split(",") if u]
    rows = session.scalars(access.scope(caller, BackupStorage)).all()
    rows = [r for r in rows if not wanted or r.uuid in wanted]
    total = sum(int(r.totalCapacity or 0) for r in rows)
    available = sum(int(r.availableCapacity or 0) for r in rows)
    return JSONResponse({"totalCapacity": total, "availableCapacity": available, "success": True})


# -- scheduling ------------------------------------------------------------------------------------
@router.post("/scheduler/jobgroups/{uuid}/job")
def add_jobs_to_group(uuid: str, body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """AddSchedulerJobsToSchedulerJobGroup ``{"params": {"schedulerJobUuids": [...]}}``: answers
    the group's job refs as ``inventories`` (the SDK's response key) beside the group."""
    answer = scheduler.add_jobs(uuid, body, session, caller)
    jobs = session.scalars(select(SchedulerJob).where(SchedulerJob.schedulerJobGroupUuid == uuid)).all()
    refs = [{"schedulerJobGroupUuid": uuid, "schedulerJobUuid": job.uuid} for job in jobs]
    return JSONResponse({**_json(answer), "inventories": refs})


@router.delete("/scheduler/jobgroups/{uuid}/job")
def remove_jobs_from_group(
    uuid: str, session: DbSession, caller: CurrentCaller, schedulerJobUuids: list[str] = Query(default=[])
) -> JSONResponse:
    """RemoveSchedulerJobsFromSchedulerJobGroup: ``schedulerJobUuids`` repeated or comma-separated."""
    joined = ",".join(schedulerJobUuids)
    return scheduler.remove_jobs(uuid, session, caller, targetResourceUuids="", schedulerJobUuids=joined)


@router.post("/scheduler/jobgroups/{group_uuid}/scheduler/triggers/{trigger_uuid}")
def add_group_to_trigger(
    group_uuid: str, trigger_uuid: str, session: DbSession, caller: CurrentCaller, body: Envelope | None = None
) -> JSONResponse:
    """AddSchedulerJobGroupToSchedulerTrigger (``triggerNow``)."""
    return scheduler.attach(trigger_uuid, group_uuid, session, caller, body)


@router.delete("/scheduler/jobgroups/{group_uuid}/scheduler/triggers/{trigger_uuid}")
def remove_group_from_trigger(
    group_uuid: str, trigger_uuid: str, session: DbSession, caller: CurrentCaller
) -> JSONResponse:
    """RemoveSchedulerJobGroupFromSchedulerTrigger."""
    return scheduler.detach(trigger_uuid, group_uuid, session, caller)


router.add_api_route("/scheduler/job/history", query_history, methods=["GET"])


@router.get("/scheduler/job/history/{uuid}")
def get_job_history(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """One history row by its (integer) id, as a query answer (the SDK's Get): none matching,
    or an id that is no number, is an empty answer, which the SDK reports as not found."""
    if not uuid.isdigit() or len(uuid) > 18:
        return JSONResponse({"inventories": [], "success": True})
    return query_history(session, caller, [f"id={uuid}"], None, None, None, None, None, None, None)


# -- tags ------------------------------------------------------------------------------------------
@router.delete("/tags/{uuid}")
def delete_tag(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """DeleteTag: a user tag as ``DELETE /v1/user-tags/{uuid}``; a system tag (admins only)."""
    tag = session.scalars(access.scope(caller, Tag).where(Tag.uuid == check_uuid(uuid, "uuid"))).first()
    if tag is not None and tag.type == "system":
        access.require_admin(caller, "deleting a system tag")
        session.delete(tag)
        return ok()
    return tags.delete_user_tag(uuid, session, caller)


def _json(answer: JSONResponse) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(bytes(answer.body))
    return data
