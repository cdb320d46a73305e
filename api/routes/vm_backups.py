"""VM backups, addressed by their group uuid: ``GET /v1/vm-backups/{uuid}`` (every volume's
backup, root first), ``PUT .../actions`` (revert the VM, copies) and ``DELETE``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.auth import Caller
from api.deps import CurrentCaller, DbSession, get_caller
from api.envelopes import ACCEPTED, Accepted, accepted, check_named_storages, check_uuid, delete_targets, parse_action
from api.schemas import query_answer
from shared import access
from shared.catalog.models import VmInstance, VolumeBackup
from shared.inventory import inventories
from shared.service import copies, deletion, instant, protection, recovery, rows, vm_from_backup

router = APIRouter(dependencies=[Depends(get_caller)])
ACTIONS = (
    "revertVmFromVmBackup",
    "syncVmBackupFromImageStoreBackupStorage",
    "recoverVmBackupFromImageStoreBackupStorage",
    "instantRestoreVmFromVmBackup",
    "changeVmBackupProtection",
    "createVmInstanceFromVmBackup",
)


def vm_backup(session: Session, caller: Caller, uuid: str) -> list[VolumeBackup]:
    """The volume backups of a VM backup, when the caller may see every one of them."""
    found = rows.group_backups(session, check_uuid(uuid, "groupUuid"))
    for row in found:
        access.visible(session, caller, VolumeBackup, row.uuid, "VM backup")
    return found


@router.get("/vm-backups/{uuid}", response_model=query_answer(VolumeBackup))
def get_vm_backup(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    return JSONResponse({"inventories": inventories(session, vm_backup(session, caller, uuid)), "success": True})


@router.put(
    "/vm-backups/{uuid}/actions",
    response_model=query_answer(VolumeBackup),  # changeVmBackupProtection; the others are jobs
    responses=ACCEPTED,
    description="One action of: " + ", ".join(ACTIONS),  # what the console looks for
)
def vm_backup_action(
    uuid: str, body: dict[str, Any], request: Request, session: DbSession, caller: CurrentCaller
) -> JSONResponse:
    name, params = parse_action(body, ACTIONS)
    found = vm_backup(session, caller, uuid)
    group = found[0].groupUuid or uuid
    check_named_storages(session, caller, params)
    if name == "changeVmBackupProtection":  # synchronous: answers the VM backup's volume backups
        protection.change_protection(session, found, protection.parse_protected(params), admin=caller.admin)
        return JSONResponse({"inventories": inventories(session, found), "success": True})
    if name in copies.SYNC_ACTIONS:
        return accepted(request, copies.request_sync(session, name, found, params, caller.account_uuid))
    if name == "instantRestoreVmFromVmBackup":
        if params.get("vmInstanceUuid") and not caller.admin:
            access.visible(
                session, caller, VmInstance, check_uuid(str(params["vmInstanceUuid"]), "vmInstanceUuid"), "VM"
            )
        return accepted(request, instant.request_instant_vm(session, group, params, caller.account_uuid))
    if name == "createVmInstanceFromVmBackup":
        if params.get("hostUuid") is not None:
            access.require_admin(caller, "choosing the host of a new VM")
            params["hostUuid"] = check_uuid(params["hostUuid"], "hostUuid")
        return accepted(request, vm_from_backup.request_create_vm(session, group, params, caller.account_uuid))
    return accepted(request, recovery.request_vm_revert(session, group, params, caller.account_uuid))


@router.delete("/vm-backups/{uuid}", status_code=202, response_model=Accepted, responses=ACCEPTED)
def delete_vm_backup(
    uuid: str,
    request: Request,
    session: DbSession,
    caller: CurrentCaller,
    backupStorageUuids: str | None = None,
    deleteMode: str = "Permissive",
) -> JSONResponse:
    found = vm_backup(session, caller, uuid)
    targets = delete_targets(session, caller, backupStorageUuids, [r for row in found for r in row.backupStorageRefs])
    return accepted(request, deletion.request_vm_delete(session, uuid, targets, deleteMode, caller.account_uuid))
