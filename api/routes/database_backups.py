"""Database backups of the catalog (admins only): ``POST /v1/database-backups``, ``PUT
/v1/database-backups/{uuid}/actions`` (copy, recover) and ``DELETE``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api.deps import CurrentCaller, DbSession, get_caller
from api.envelopes import (
    ACCEPTED,
    Accepted,
    Envelope,
    accepted,
    check_storage,
    check_uuid,
    delete_targets,
    parse_action,
)
from shared import access
from shared.catalog.models import DatabaseBackup
from shared.service import copies, database_backups, deletion

router = APIRouter(dependencies=[Depends(get_caller)])
ACTIONS = ("syncDatabaseBackupFromImageStoreBackupStorage", "recoverDatabaseBackup")


@router.post("/database-backups", status_code=202, response_model=Accepted, responses=ACCEPTED)
def create_database_backup(body: Envelope, request: Request, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    access.require_admin(caller, "backing up the catalog database")
    check_storage(session, caller, body.params.get("backupStorageUuid"))
    return accepted(request, database_backups.request_database_backup(session, body.params, caller.account_uuid))


@router.put("/database-backups/{uuid}/actions", status_code=202, response_model=Accepted, responses=ACCEPTED)
def database_backup_action(
    uuid: str, body: dict[str, Any], request: Request, session: DbSession, caller: CurrentCaller
) -> JSONResponse:
    name, params = parse_action(body, ACTIONS)
    access.require_admin(caller, name)
    row = access.visible(session, caller, DatabaseBackup, check_uuid(uuid, "uuid"), "database backup")
    if name == "recoverDatabaseBackup":
        return accepted(request, database_backups.request_recover(session, row.uuid, params, caller.account_uuid))
    return accepted(request, copies.request_sync(session, name, [row], params, caller.account_uuid))


@router.delete("/database-backups/{uuid}", status_code=202, response_model=Accepted, responses=ACCEPTED)
def delete_database_backup(
    uuid: str,
    request: Request,
    session: DbSession,
    caller: CurrentCaller,
    backupStorageUuids: str | None = None,
    deleteMode: str = "Permissive",
) -> JSONResponse:
    access.require_admin(caller, "deleting database backups")
    row = access.visible(session, caller, DatabaseBackup, check_uuid(uuid, "uuid"), "database backup")
    targets = delete_targets(session, caller, backupStorageUuids, row.backupStorageRefs)
    job = deletion.request_delete(session, uuid, targets, deleteMode, caller.account_uuid, model=DatabaseBackup)
    return accepted(request, job)
