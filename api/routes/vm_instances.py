"""VM instances: ``POST /v1/vm-instances`` (admins register them), ``DELETE`` (unregister),
``PUT /v1/vm-instances/{uuid}/actions`` ``updateVmInstance``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import Caller
from api.deps import CurrentCaller, DbSession, get_caller
from api.envelopes import Envelope, add_tags, check_uuid, non_negative_int, ok, one, parse_action
from api.schemas import Done, one_answer
from shared import access, hostpaths
from shared.catalog.models import Host, Project, VmInstance, Volume, new_uuid
from shared.errors import InvalidArgument, ManagedByLibvirt, NotFound
from shared.libvirt import MANAGED
from shared.service.rows import update_names

router = APIRouter(dependencies=[Depends(get_caller)])
VM_STATES = ("Running", "Stopped")
# what discovery takes from libvirt (docs/libvirt.md): never set through the API
LIBVIRT_OWNS = ("name", "state", "qmpSocket", "guestAgentSocket", "cpuNum", "memorySize", "platform")


def _set_project(session: Session, caller: Caller, vm: VmInstance, value: object) -> None:
    """An admin moves a VM and its volumes into a project (null: admins only), e.g. one that
    discovery registered."""
    access.require_admin(caller, "setting projectUuid")
    if value is not None:
        project = check_uuid(value, "projectUuid")
        if session.get(Project, project) is None:
            raise NotFound(resource="project", uuid=project)
    vm.projectUuid = value if isinstance(value, str) else None
    for volume in session.scalars(select(Volume).where(Volume.vmInstanceUuid == vm.uuid)):
        volume.projectUuid = vm.projectUuid


def _socket_path(session: Session, params: dict[str, Any], key: str, host_uuid: str | None) -> str | None:
    """A VM's QMP or guest agent socket: null, or a path inside its host's VM socket folder
    (admins only name one: the root worker connects to it)."""
    value = params.get(key)
    if value is None:
        return None
    if not host_uuid:
        raise InvalidArgument(detail=f"{key} needs the VM's hostUuid: sockets are inside its host's socket folder")
    host = session.get(Host, host_uuid)
    folder = [host.vmSocketDir] if host is not None and host.vmSocketDir else None
    return hostpaths.require_under(value, folder, key, host_uuid)


@router.post("/vm-instances", response_model=one_answer(VmInstance))
def create_vm(body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    access.require_admin(caller, "registering vm-instances")
    p = body.params
    if p.get("hostUuid") and session.get(Host, check_uuid(p["hostUuid"], "hostUuid")) is None:
        raise NotFound(resource="host", uuid=p["hostUuid"])
    state = p.get("state") or "Stopped"
    if state not in VM_STATES:
        raise InvalidArgument(detail="state must be Running or Stopped")
    libvirt_domain = p.get("libvirtDomain", False)
    if not isinstance(libvirt_domain, bool):
        raise InvalidArgument(detail="libvirtDomain must be true or false")
    uuid = new_uuid()
    if libvirt_domain:  # a libvirt domain's row carries the domain's uuid (without dashes)
        uuid = check_uuid(str(p.get("resourceUuid") or "").replace("-", "").lower(), "resourceUuid")
        if session.get(VmInstance, uuid) is not None:
            raise InvalidArgument(detail=f"VM instance {uuid} is registered already")
    vm = VmInstance(
        uuid=uuid,
        libvirtDomain=libvirt_domain,
        name=str(p.get("name") or ""),
        description=p.get("description"),
        hostUuid=p.get("hostUuid"),
        platform=str(p.get("platform") or "Linux"),
        cpuNum=non_negative_int(p, "cpuNum", 1),
        memorySize=non_negative_int(p, "memorySize", 0),
        projectUuid=p.get("projectUuid"),
        state=state,
        qmpSocket=_socket_path(session, p, "qmpSocket", p.get("hostUuid")),
        guestAgentSocket=_socket_path(session, p, "guestAgentSocket", p.get("hostUuid")),
    )
    if not vm.name:
        raise InvalidArgument(detail="name is required")
    session.add(vm)
    session.flush()
    add_tags(session, vm, body)
    return one(session, vm)


@router.delete("/vm-instances/{uuid}", response_model=Done)
def delete_vm(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """Unregister a VM and its volumes (files and backups stay)."""
    access.require_admin(caller, "unregistering vm-instances")
    vm = session.get(VmInstance, check_uuid(uuid, "uuid"))
    if vm is None:
        raise NotFound(resource="VM instance", uuid=uuid)
    if vm.managedBy == MANAGED and vm.state != "Destroyed":
        raise ManagedByLibvirt(what=f"VM {vm.uuid}", detail="undefine the domain in libvirt; its row follows")
    for volume in session.scalars(select(Volume).where(Volume.vmInstanceUuid == vm.uuid)):
        session.delete(volume)
    session.flush()
    session.delete(vm)
    return ok()


@router.put("/vm-instances/{uuid}/actions", response_model=one_answer(VmInstance))
def vm_action(uuid: str, body: dict[str, Any], session: DbSession, caller: CurrentCaller) -> JSONResponse:
    _name, params = parse_action(body, ("updateVmInstance",))
    vm = access.visible(session, caller, VmInstance, check_uuid(uuid, "uuid"), "VM instance")
    if vm.managedBy == MANAGED:
        owned = [key for key in LIBVIRT_OWNS if key in params]
        if owned:
            raise ManagedByLibvirt(
                what=f"VM {vm.uuid}", detail=f"libvirt owns its {', '.join(owned)}: change them in libvirt"
            )
    if "projectUuid" in params:
        _set_project(session, caller, vm, params["projectUuid"])
    if "state" in params:
        if params["state"] not in VM_STATES:
            raise InvalidArgument(detail="state must be Running or Stopped")
        vm.state = params["state"]
    for key in ("qmpSocket", "guestAgentSocket"):
        if key in params:
            access.require_admin(caller, f"setting {key}")
            setattr(vm, key, _socket_path(session, params, key, vm.hostUuid))
    update_names(vm, params)
    session.flush()
    return one(session, vm)
