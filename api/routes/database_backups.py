"""Database backups (admins only) of the catalog or of a registered MySQL/MariaDB database:
``POST /v1/database-backups`` (``databaseUuid`` names a registered one), ``PUT
/v1/database-backups/{uuid}/actions`` (copy, recover) and ``DELETE``; the registered databases
themselves, ``POST /v1/databases`` and ``DELETE /v1/databases/{uuid}`` (queries in
:mod:`api.routes.queries`)."""

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
    ok,
    one,
    parse_action,
)
from api.schemas import Done, one_answer
from shared import access
from shared.catalog.models import DatabaseBackup, ManagedDatabase
from shared.service import copies, database_backups, databases, deletion, protection

router = APIRouter(dependencies=[Depends(get_caller)])
ACTIONS = ("syncDatabaseBackupFromImageStoreBackupStorage", "recoverDatabaseBackup", "changeDatabaseBackupProtection")


@router.post("/database-backups", status_code=202, response_model=Accepted, responses=ACCEPTED)
def create_database_backup(body: Envelope, request: Request, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    access.require_admin(caller, "backing up the catalog database")
    check_storage(session, caller, body.params.get("backupStorageUuid"))
    if body.params.get("databaseUuid") is not None:
        check_uuid(body.params["databaseUuid"], "databaseUuid")
    return accepted(request, database_backups.request_database_backup(session, body.params, caller.account_uuid))


@router.put("/database-backups/{uuid}/actions", response_model=one_answer(DatabaseBackup), responses=ACCEPTED)
def database_backup_action(
    uuid: str, body: dict[str, Any], request: Request, session: DbSession, caller: CurrentCaller
) -> JSONResponse:
    name, params = parse_action(body, ACTIONS)
    access.require_admin(caller, name)
    row = access.visible(session, caller, DatabaseBackup, check_uuid(uuid, "uuid"), "database backup")
    if name == "changeDatabaseBackupProtection":
        protection.change_protection(session, [row], protection.parse_protected(params), admin=caller.admin)
        return one(session, row)
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


@router.post("/databases", response_model=one_answer(ManagedDatabase))
def register_database(body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """A MySQL/MariaDB database to back up: ``name``, ``description``, ``url``
    (``mysql://user:password@host:port/database``, TCP only); the password is kept sealed and
    never shown."""
    access.require_admin(caller, "registering databases")
    return one(session, databases.register(session, body.params))


@router.delete("/databases/{uuid}", response_model=Done)
def unregister_database(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """Forget a registered database (its backups stay, and are recovered into another one)."""
    access.require_admin(caller, "unregistering databases")
    session.delete(access.visible(session, caller, ManagedDatabase, check_uuid(uuid, "uuid"), "database"))
    return ok()
