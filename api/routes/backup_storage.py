"""Backup storage (admins): ``POST /v1/backup-storage`` (register ImageStore, Remote,
PublicCloud), ``PUT /v1/backup-storage/{uuid}/actions`` and ``DELETE`` (unregister)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api.deps import CurrentCaller, DbSession, get_caller
from api.envelopes import (
    ACCEPTED,
    Envelope,
    accepted,
    add_tags,
    check_uuid,
    ok,
    one,
    parse_action,
    state_event,
)
from api.schemas import Done, one_answer
from shared import access, storage
from shared.catalog.models import (
    BackupStorage,
    DatabaseBackupStorageRef,
    SchedulerJobGroup,
    Tag,
    VolumeBackupStorageRef,
)
from shared.errors import Conflict, InvalidArgument, NotFound
from shared.service import deletion
from shared.service.rows import update_names

router = APIRouter(dependencies=[Depends(get_caller)])
ACTIONS = (
    "changeBackupStorageState",
    "updateBackupStorage",
    "reconnectBackupStorage",
    "switchBackupStorageRole",
    "scanBackupStorage",
    "reclaimSpaceFromImageStore",
)
JOBS = ("scanBackupStorage", "reclaimSpaceFromImageStore")


@router.post("/backup-storage", response_model=one_answer(BackupStorage))
def create_backup_storage(body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    access.require_admin(caller, "registering backup-storage")
    row = storage.register_storage(session, body.params)
    add_tags(session, row, body)
    return one(session, row)


@router.put("/backup-storage/{uuid}/actions", response_model=one_answer(BackupStorage), responses=ACCEPTED)
def backup_storage_action(
    uuid: str, body: dict[str, Any], request: Request, session: DbSession, caller: CurrentCaller
) -> JSONResponse:
    name, params = parse_action(body, ACTIONS)
    access.require_admin(caller, name)
    row = access.visible(session, caller, BackupStorage, check_uuid(uuid, "uuid"), "backup storage")
    if name in JOBS:
        return accepted(request, deletion.request_storage_job(session, row, name, caller.account_uuid))
    if name == "changeBackupStorageState":
        row.state = state_event(params)
    elif name == "updateBackupStorage":
        update_names(row, params)
        storage.update_credentials(row, params)  # token, keys, passphrase re-entered: checked, then sealed
    elif name == "switchBackupStorageRole":
        storage.switch_role(session, row)
    else:
        storage.probe(row)
    session.flush()
    return one(session, row)


@router.delete("/backup-storage/{uuid}", response_model=Done)
def delete_backup_storage(
    uuid: str, session: DbSession, caller: CurrentCaller, deleteMode: str = "Permissive"
) -> JSONResponse:
    """Unregister a backup storage (ZStack's DeleteBackupStorage; what it holds stays there):
    409 while a backup has a copy on it or a job group copies to it (``deleteMode`` is accepted
    and changes nothing: blockvault never drops catalog copies silently)."""
    access.require_admin(caller, "unregistering backup-storage")
    if deleteMode not in ("Permissive", "Enforcing"):
        raise InvalidArgument(detail="deleteMode must be Permissive or Enforcing")
    row = session.get(BackupStorage, check_uuid(uuid, "uuid"))
    if row is None:
        raise NotFound(resource="backup storage", uuid=uuid)
    for ref_model in (VolumeBackupStorageRef, DatabaseBackupStorageRef):
        if session.scalars(select(ref_model.id).where(ref_model.backupStorageUuid == row.uuid).limit(1)).first():
            raise Conflict(detail=f"backup storage {row.uuid} holds backups: delete them (or their copies there) first")
    for group in session.scalars(select(SchedulerJobGroup)):
        if row.uuid in ((group.jobData or {}).get("backupStorageUuids") or []):
            raise Conflict(detail=f"job group {group.uuid} copies to backup storage {row.uuid}")
    for tag in session.scalars(select(Tag).where(Tag.resourceUuid == row.uuid)):
        session.delete(tag)
    session.delete(row)
    return ok()
