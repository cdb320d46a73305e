"""Volume backups: ``PUT /v1/volume-backups/{uuid}/actions`` (revert, new volume, verify,
copies, state, names) and ``DELETE /v1/volume-backups/{uuid}``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from api.auth import Caller
from api.deps import CurrentCaller, DbSession, get_caller
from api.envelopes import (
    ACCEPTED,
    Accepted,
    accepted,
    check_named_storages,
    check_uuid,
    delete_targets,
    one,
    parse_action,
    state_event,
)
from api.schemas import one_answer
from shared import access
from shared.catalog.models import VmInstance, VolumeBackup
from shared.errors import Forbidden
from shared.service import copies, deletion, instant, protection, recovery
from shared.service.rows import update_names

router = APIRouter(dependencies=[Depends(get_caller)])
ACTIONS = (
    "revertVolumeFromVolumeBackup",
    "createDataVolumeFromVolumeBackup",
    "verifyVolumeBackup",
    "changeVolumeBackupState",
    "changeVolumeBackupProtection",
    "updateVolumeBackup",
    "syncBackupFromImageStoreBackupStorage",
    "recoverBackupFromImageStoreBackupStorage",
    "instantRestoreVolumeFromVolumeBackup",
)
JOBS = {
    "revertVolumeFromVolumeBackup": recovery.request_revert,
    "createDataVolumeFromVolumeBackup": recovery.request_create_volume,
    "verifyVolumeBackup": recovery.request_verify,
    "instantRestoreVolumeFromVolumeBackup": instant.request_instant_volume,
}


def check_placement(caller: Caller, params: dict[str, Any]) -> None:
    """The platform places new volumes: only an admin may name their host or file (inside
    the host's volume roots)."""
    named = [key for key in ("hostUuid", "installPath") if params.get(key) is not None]
    if named and not caller.admin:
        raise Forbidden(detail=f"{' and '.join(named)}: new volumes are placed by the platform (admins may name them)")
    if params.get("hostUuid") is not None:
        check_uuid(params["hostUuid"], "hostUuid")


@router.put(
    "/volume-backups/{uuid}/actions",
    response_model=one_answer(VolumeBackup),
    responses=ACCEPTED,
    description="One action of: " + ", ".join(ACTIONS),  # what the console looks for
)
def volume_backup_action(
    uuid: str, body: dict[str, Any], request: Request, session: DbSession, caller: CurrentCaller
) -> JSONResponse:
    name, params = parse_action(body, ACTIONS)
    backup = access.visible(session, caller, VolumeBackup, check_uuid(uuid, "uuid"), "volume backup")
    check_named_storages(session, caller, params)
    if name in ("createDataVolumeFromVolumeBackup", "instantRestoreVolumeFromVolumeBackup"):
        check_placement(caller, params)
    if params.get("vmInstanceUuid") and not caller.admin:
        access.visible(session, caller, VmInstance, check_uuid(str(params["vmInstanceUuid"]), "vmInstanceUuid"), "VM")
    if name == "changeVolumeBackupState":
        backup.state = state_event(params)
        return one(session, backup)
    if name == "changeVolumeBackupProtection":
        protection.change_protection(session, [backup], protection.parse_protected(params), admin=caller.admin)
        return one(session, backup)
    if name == "updateVolumeBackup":
        update_names(backup, params)
        session.flush()
        return one(session, backup)
    if name in copies.SYNC_ACTIONS:
        return accepted(request, copies.request_sync(session, name, [backup], params, caller.account_uuid))
    return accepted(request, JOBS[name](session, uuid, params, caller.account_uuid))


@router.delete("/volume-backups/{uuid}", status_code=202, response_model=Accepted, responses=ACCEPTED)
def delete_volume_backup(
    uuid: str,
    request: Request,
    session: DbSession,
    caller: CurrentCaller,
    backupStorageUuids: str | None = None,
    deleteMode: str = "Permissive",
) -> JSONResponse:
    backup = access.visible(session, caller, VolumeBackup, check_uuid(uuid, "uuid"), "volume backup")
    targets = delete_targets(session, caller, backupStorageUuids, backup.backupStorageRefs)
    return accepted(request, deletion.request_delete(session, uuid, targets, deleteMode, caller.account_uuid))
