"""Volumes: ``POST /v1/volumes`` (admins register them, inside the host's volume roots),
``DELETE /v1/volumes/{uuid}`` (unregister), and backing them up: ``POST
/v1/volumes/{uuid}/volume-backups`` and ``POST /v1/volumes/{rootVolumeUuid}/vm-backups``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api.deps import CurrentCaller, DbSession, get_caller
from api.envelopes import (
    ACCEPTED,
    Accepted,
    Envelope,
    accepted,
    add_tags,
    check_storage,
    check_uuid,
    non_negative_int,
    ok,
    one,
)
from api.schemas import Done, one_answer
from shared import access, hostpaths
from shared.catalog.models import Host, VmInstance, Volume, new_uuid
from shared.errors import Conflict, InvalidArgument, NotFound, require
from shared.service import recovery, volume_backups

router = APIRouter(dependencies=[Depends(get_caller)])


@router.post("/volumes", response_model=one_answer(Volume))
def create_volume(body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    access.require_admin(caller, "registering volumes")
    p = body.params
    require(p, "hostUuid", "installPath")
    host = session.get(Host, check_uuid(p["hostUuid"], "hostUuid"))
    if host is None:
        raise NotFound(resource="host", uuid=p["hostUuid"])
    path = hostpaths.require_under(p["installPath"], host.volumeRoots, "installPath", host.uuid)
    fmt = p.get("format") or ("qcow2" if path.endswith(".qcow2") else "raw")
    if fmt not in ("raw", "qcow2"):
        raise InvalidArgument(detail="format must be raw or qcow2")
    kind = p.get("type") or "Data"
    if kind not in ("Root", "Data"):
        raise InvalidArgument(detail="type must be Root or Data")
    vm_uuid = p.get("vmInstanceUuid")
    if vm_uuid:
        vm = session.get(VmInstance, check_uuid(vm_uuid, "vmInstanceUuid"))
        if vm is None:
            raise NotFound(resource="VM instance", uuid=vm_uuid)
        if (
            kind == "Root"
            and session.scalars(select(Volume).where(Volume.vmInstanceUuid == vm_uuid, Volume.type == "Root")).first()
        ):
            raise Conflict(detail=f"VM {vm_uuid} has a root volume already")
    elif kind == "Root":
        raise InvalidArgument(detail="a Root volume needs vmInstanceUuid")
    recovery.ensure_path_free(session, host.uuid, path)
    volume = Volume(
        uuid=new_uuid(),
        name=str(p.get("name") or path.rsplit("/", 1)[-1]),
        description=p.get("description"),
        hostUuid=host.uuid,
        vmInstanceUuid=vm_uuid,
        projectUuid=p.get("projectUuid"),
        type=kind,
        format=fmt,
        installPath=path,
        size=non_negative_int(p, "size", 0),
    )
    session.add(volume)
    session.flush()
    add_tags(session, volume, body)
    return one(session, volume)


@router.delete("/volumes/{uuid}", response_model=Done)
def delete_volume(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """Unregister a volume (its file and its backups stay)."""
    access.require_admin(caller, "unregistering volumes")
    volume = session.get(Volume, check_uuid(uuid, "uuid"))
    if volume is None:
        raise NotFound(resource="volume", uuid=uuid)
    session.delete(volume)
    return ok()


@router.post("/volumes/{uuid}/volume-backups", status_code=202, response_model=Accepted, responses=ACCEPTED)
def create_volume_backup(
    uuid: str, body: Envelope, request: Request, session: DbSession, caller: CurrentCaller
) -> JSONResponse:
    access.visible(session, caller, Volume, check_uuid(uuid, "volume uuid"), "volume")
    check_storage(session, caller, body.params.get("backupStorageUuid"))
    job = volume_backups.request_volume_backup(session, uuid, body.params, caller.account_uuid)
    return accepted(request, job)


@router.post("/volumes/{uuid}/vm-backups", status_code=202, response_model=Accepted, responses=ACCEPTED)
def create_vm_backup(
    uuid: str, body: Envelope, request: Request, session: DbSession, caller: CurrentCaller
) -> JSONResponse:
    access.visible(session, caller, Volume, check_uuid(uuid, "root volume uuid"), "volume")
    check_storage(session, caller, body.params.get("backupStorageUuid"))
    job = volume_backups.request_vm_backup(session, uuid, body.params, caller.account_uuid)
    return accepted(request, job)
