"""Volumes: ``POST /v1/volumes`` (admins register them, inside the host's volume roots),
``DELETE /v1/volumes/{uuid}`` (unregister), and backing them up: ``POST
/v1/volumes/{uuid}/volume-backups`` and ``POST /v1/volumes/{rootVolumeUuid}/vm-backups``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

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
from api.schemas import Done, one_answer, query_answer
from shared import access, hostpaths
from shared.catalog.models import Host, VmInstance, Volume, new_uuid
from shared.errors import BlockvaultError, Conflict, InvalidArgument, ManagedByLibvirt, NotFound, require
from shared.inventory import inventories
from shared.libvirt import MANAGED
from shared.service import volume_backups

router = APIRouter(dependencies=[Depends(get_caller)])


BULK_LIMIT = 5000  # volumes one request may register


@router.post("/volumes", response_model=one_answer(Volume) | query_answer(Volume))
def create_volume(body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """Register one volume (``params``: hostUuid, installPath, format, type, vmInstanceUuid,
    size, name, description, projectUuid), or many at once with ``params.volumes``, a list of
    those (at most :data:`BULK_LIMIT`): all or none, errors naming the item."""
    access.require_admin(caller, "registering volumes")
    items = body.params.get("volumes")
    if items is None:
        [volume] = _register(session, [body.params], bulk=False)
        add_tags(session, volume, body)
        return one(session, volume)
    if not isinstance(items, list) or not items or not all(isinstance(item, dict) for item in items):
        raise InvalidArgument(detail="volumes must be a non-empty list of objects")
    if len(items) > BULK_LIMIT:
        raise InvalidArgument(detail=f"at most {BULK_LIMIT} volumes in one request")
    made = _register(session, items, bulk=True)
    for volume in made:
        add_tags(session, volume, body)
    return JSONResponse({"inventories": inventories(session, made), "success": True})


def _register(session: Session, items: list[dict[str, Any]], *, bulk: bool) -> list[Volume]:
    """Check every item, then add them all; a few queries for the whole list."""
    hosts: dict[str, Host | None] = {}
    vms: dict[str, VmInstance | None] = {}
    made: list[Volume] = []
    for number, p in enumerate(items):
        try:
            made.append(_volume_of(session, p, hosts, vms))
        except BlockvaultError as exc:
            if not bulk:
                raise
            raise exc.at(f"volumes[{number}]") from None
    taken = {}
    for host in {v.hostUuid for v in made}:
        paths = [v.installPath for v in made if v.hostUuid == host]
        for start in range(0, len(paths), 1000):
            query = select(Volume.installPath).where(
                Volume.hostUuid == host, Volume.installPath.in_(paths[start : start + 1000])
            )
            taken.update(dict.fromkeys(session.scalars(query), host))
    seen: set[tuple[str, str]] = set()
    roots = {v.vmInstanceUuid for v in made if v.type == "Root" and v.vmInstanceUuid}
    with_root = (
        set(
            session.scalars(
                select(Volume.vmInstanceUuid).where(Volume.vmInstanceUuid.in_(roots), Volume.type == "Root")
            )
        )
        if roots
        else set()
    )
    for number, volume in enumerate(made):
        where = f"volumes[{number}]: " if bulk else ""
        key = (volume.hostUuid, volume.installPath)
        if (volume.installPath in taken and taken[volume.installPath] == volume.hostUuid) or key in seen:
            raise Conflict(
                detail=f"{where}a volume at {volume.installPath} on host {volume.hostUuid} is registered already"
            )
        seen.add(key)
        if volume.type == "Root":
            if volume.vmInstanceUuid in with_root:
                raise Conflict(detail=f"{where}VM {volume.vmInstanceUuid} has a root volume already")
            with_root.add(volume.vmInstanceUuid)
    session.add_all(made)
    session.flush()
    return made


def _volume_of(
    session: Session, p: dict[str, Any], hosts: dict[str, Host | None], vms: dict[str, VmInstance | None]
) -> Volume:
    """The volume one item describes, checked against its host's roots and its VM."""
    require(p, "hostUuid", "installPath")
    host_uuid = check_uuid(p["hostUuid"], "hostUuid")
    if host_uuid not in hosts:
        hosts[host_uuid] = session.get(Host, host_uuid)
    host = hosts[host_uuid]
    if host is None:
        raise NotFound(resource="host", uuid=host_uuid)
    path = hostpaths.require_under(p["installPath"], host.volumeRoots, "installPath", host.uuid)
    fmt = p.get("format") or ("qcow2" if path.endswith(".qcow2") else "raw")
    if fmt not in ("raw", "qcow2"):
        raise InvalidArgument(detail="format must be raw or qcow2")
    kind = p.get("type") or "Data"
    if kind not in ("Root", "Data"):
        raise InvalidArgument(detail="type must be Root or Data")
    vm_uuid = p.get("vmInstanceUuid")
    if vm_uuid:
        check_uuid(vm_uuid, "vmInstanceUuid")
        if vm_uuid not in vms:
            vms[vm_uuid] = session.get(VmInstance, vm_uuid)
        if vms[vm_uuid] is None:
            raise NotFound(resource="VM instance", uuid=vm_uuid)
        if vms[vm_uuid].managedBy == MANAGED:  # type: ignore[union-attr]
            raise ManagedByLibvirt(what=f"VM {vm_uuid}", detail="its disks are attached in libvirt, not registered")
    elif kind == "Root":
        raise InvalidArgument(detail="a Root volume needs vmInstanceUuid")
    for key in ("name", "description", "projectUuid"):
        if not isinstance(p.get(key), str | None):
            raise InvalidArgument(detail=f"{key} must be a string")
    return Volume(
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


@router.delete("/volumes/{uuid}", response_model=Done)
def delete_volume(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """Unregister a volume (its file and its backups stay)."""
    access.require_admin(caller, "unregistering volumes")
    volume = session.get(Volume, check_uuid(uuid, "uuid"))
    if volume is None:
        raise NotFound(resource="volume", uuid=uuid)
    if volume.managedBy == MANAGED and volume.status != "Detached":
        raise ManagedByLibvirt(what=f"volume {volume.uuid}", detail="detach the disk in libvirt; its row follows")
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
