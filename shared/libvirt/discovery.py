"""A libvirt host's domains mirrored into the catalog (docs/libvirt.md).

:func:`sync_host` (the worker, at start and every heartbeat interval, in a thread of its own)
lists the host's domains and makes the catalog say the same: each domain a VM instance (uuid =
the domain's uuid without dashes; name, CPUs, memory, platform and state from libvirt, the
description from it when the row is made), each of its disks a volume (a file or block device,
a pool volume resolved to its path; ``Root`` for the boot disk), all ``managedBy = "libvirt"``.
A domain that is gone is ``Destroyed``; a disk no longer attached is ``Detached`` (its row and
backups stay). A disk that blockvault will not read (outside the host's volume roots, a network
source, a format it does not read) is not a volume: it is listed in the VM's ``skippedDisks``
with the reason.

A libvirt that does not answer leaves the rows as they were and the host's ``libvirtStatus``
``Disconnected`` with the reason; the worker keeps running.
"""

from __future__ import annotations

import logging
import os
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import hostpaths
from shared.catalog.models import Host, VmInstance, Volume
from shared.errors import BlockvaultError, LibvirtError, NotFound
from shared.libvirt import MANAGED, connection, domainxml
from shared.libvirt.domainxml import Disk, Domain

log = logging.getLogger(__name__)

# virDomainState -> ZStack's VM states
STATES = {0: "Stopped", 1: "Running", 2: "Running", 3: "Paused", 4: "Running", 5: "Stopped", 6: "Stopped", 7: "Paused"}
XML_INACTIVE = 2  # VIR_DOMAIN_XML_INACTIVE: the persistent definition


@dataclass
class Found:
    """One domain as the host has it now."""

    domain: Domain
    state: str
    volumes: list[tuple[Disk, str, int]] = field(default_factory=list)  # disk, real path, size
    skipped: list[dict[str, Any]] = field(default_factory=list)


def volume_uuid(host_uuid: str, path: str) -> str:
    """A discovered volume's uuid: one per file on a host, the same from every sync."""
    return uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"blockvault-libvirt:{host_uuid}:{path}").hex


def state_of(dom: Any) -> str:
    return STATES.get(int(dom.state()[0]), "Stopped")


def definition_xml(dom: Any) -> str:
    """The domain's XML as libvirt would define it again: the persistent definition, or the
    live one of a transient domain."""
    return str(dom.XMLDesc(XML_INACTIVE if dom.isPersistent() else 0))


def _source_path(conn: Any, disk: Disk) -> str | None:
    if disk.kind == "volume" and disk.pool and disk.volume:
        return str(conn.storagePoolLookupByName(disk.pool).storageVolLookupByName(disk.volume).path())
    return disk.path


def _size(dom: Any, disk: Disk, real: str) -> int:
    try:
        return int(dom.blockInfo(disk.target)[0])
    except connection.error_types():
        pass
    try:
        with open(real, "rb") as handle:
            return handle.seek(0, os.SEEK_END)
    except OSError:
        return 0


def _check_disk(conn: Any, dom: Any, disk: Disk) -> tuple[str, int] | str:
    """(real path, size) of a disk blockvault backs up, or why it does not."""
    if disk.kind == "network":
        return f"a network disk ({disk.protocol or '?'}: {disk.path or '?'}) is not read by blockvault"
    if disk.kind not in ("file", "block", "volume"):
        return f"a disk of type {disk.kind} is not read by blockvault"
    if disk.format not in domainxml.FORMATS:
        return f"format {disk.format} is not read by blockvault (raw and qcow2 are)"
    try:
        path = _source_path(conn, disk)
    except connection.error_types() as exc:
        return f"its pool volume {disk.pool}/{disk.volume} is not found: {exc}"
    if not path:
        return "it has no source (an empty drive)"
    try:
        real = str(hostpaths.resolve_volume(path, f"disk {disk.target}"))
    except BlockvaultError as exc:
        return str(exc.fields.get("detail") or exc)
    return real, _size(dom, disk, real)


def read_domain(conn: Any, dom: Any) -> Found:
    """What the host has of ``dom``: its definition, state, volumes and skipped disks (a
    running domain's disks as they are now, hot-plugged ones included)."""
    live = dom.isActive()
    domain = domainxml.parse(str(dom.XMLDesc(0)) if live else definition_xml(dom))
    found = Found(domain=domain, state=state_of(dom))
    for disk in domain.volume_disks():
        checked = _check_disk(conn, dom, disk)
        if isinstance(checked, str):
            source = disk.path or (f"{disk.pool}/{disk.volume}" if disk.pool else None)
            found.skipped.append({"deviceName": disk.target, "source": source, "reason": checked})
        else:
            found.volumes.append((disk, checked[0], checked[1]))
    return found


def _upsert_vm(session: Session, host_uuid: str, found: Found) -> VmInstance:
    domain = found.domain
    vm = session.get(VmInstance, domain.uuid)
    if vm is None:
        vm = VmInstance(uuid=domain.uuid, description=domain.description)  # then the catalog's own
        session.add(vm)
        log.info("libvirt.domain_added host=%s vm=%s name=%s", host_uuid, domain.uuid, domain.name)
    elif vm.state != found.state:
        log.info("libvirt.domain_state vm=%s %s->%s", vm.uuid, vm.state, found.state)
    vm.hostUuid = host_uuid
    vm.managedBy = MANAGED
    vm.libvirtDomain = True  # backed up through libvirt's backup API (shared.libvirt.backup)
    vm.name = domain.name
    vm.cpuNum = domain.cpuNum
    vm.memorySize = domain.memorySize
    vm.platform = domain.platform
    vm.state = found.state
    vm.qmpSocket = None
    vm.skippedDisks = found.skipped or None
    return vm


def _upsert_volumes(session: Session, host_uuid: str, vm: VmInstance, found: Found) -> set[str]:
    root = found.domain.root_target()
    kept = set()
    for disk, path, size in found.volumes:
        volume = session.scalars(select(Volume).where(Volume.hostUuid == host_uuid, Volume.installPath == path)).first()
        if volume is None:
            volume = Volume(uuid=volume_uuid(host_uuid, path), hostUuid=host_uuid, installPath=path)
            session.add(volume)
            log.info("libvirt.disk_added vm=%s volume=%s path=%s", vm.uuid, volume.uuid, path)
        if volume.status not in ("Ready", "Detached") and volume.managedBy == MANAGED:
            kept.add(volume.uuid)
            continue  # a volume being written (a restore) keeps its status
        volume.managedBy = MANAGED
        volume.vmInstanceUuid = vm.uuid
        volume.projectUuid = vm.projectUuid
        volume.deviceName = disk.target
        volume.name = volume.name or f"{vm.name}-{disk.target}"
        volume.type = "Root" if disk.target == root else "Data"
        volume.format = disk.format
        volume.size = size
        volume.status = "Ready"
        kept.add(volume.uuid)
    return kept


def _detach(session: Session, volumes: list[Volume]) -> None:
    for volume in volumes:
        if volume.status == "Ready":
            log.info("libvirt.disk_detached vm=%s volume=%s", volume.vmInstanceUuid, volume.uuid)
            volume.status = "Detached"
            volume.vmInstanceUuid = None


def sync(session: Session, host_uuid: str, conn: Any) -> list[str]:
    """Make the catalog's rows of ``host_uuid`` say what ``conn`` has; the uuids of the VM
    instances found."""
    seen = []
    for dom in conn.listAllDomains(0):
        try:
            found = read_domain(conn, dom)
        except connection.error_types() as exc:  # undefined between the list and the read
            log.info("libvirt.domain_vanished host=%s: %s", host_uuid, exc)
            continue
        vm = _upsert_vm(session, host_uuid, found)
        session.flush()
        kept = _upsert_volumes(session, host_uuid, vm, found)
        session.flush()
        attached = session.scalars(
            select(Volume).where(Volume.vmInstanceUuid == vm.uuid, Volume.managedBy == MANAGED)
        ).all()
        _detach(session, [v for v in attached if v.uuid not in kept])
        seen.append(vm.uuid)
    gone = session.scalars(
        select(VmInstance).where(
            VmInstance.hostUuid == host_uuid,
            VmInstance.managedBy == MANAGED,
            VmInstance.state != "Destroyed",
            VmInstance.uuid.not_in(seen) if seen else VmInstance.uuid.is_not(None),
        )
    ).all()
    for vm in gone:
        log.info("libvirt.domain_removed host=%s vm=%s", host_uuid, vm.uuid)
        vm.state = "Destroyed"
        _detach(session, list(session.scalars(select(Volume).where(Volume.vmInstanceUuid == vm.uuid))))
    session.flush()
    return seen


def sync_host(session: Session, host_uuid: str, uri: str | None = None) -> str | None:
    """One discovery round for this worker's host: the host's ``libvirtStatus`` (None: no
    libvirt configured), its rows synced when libvirt answers."""
    host = session.get(Host, host_uuid)
    if host is None:
        raise NotFound(resource="host", uuid=host_uuid)
    chosen = uri or connection.configured_uri()
    host.libvirtUri = chosen
    if chosen is None:
        host.libvirtStatus = host.libvirtReason = None
        return None
    try:
        with connection.connect(chosen) as conn:
            sync(session, host_uuid, conn)
    except LibvirtError as exc:
        return _disconnected(session, host_uuid, chosen, str(exc.fields.get("detail")))
    except connection.error_types() as exc:
        return _disconnected(session, host_uuid, chosen, str(connection.libvirt_error(exc, chosen).fields["detail"]))
    if host.libvirtStatus != "Connected":
        log.info("libvirt.connected host=%s uri=%s", host_uuid, chosen)
    host.libvirtStatus, host.libvirtReason = "Connected", None
    return "Connected"


def _disconnected(session: Session, host_uuid: str, uri: str, reason: str) -> str:
    session.rollback()
    host = session.get(Host, host_uuid)
    assert host is not None
    if host.libvirtStatus != "Disconnected" or host.libvirtReason != reason:
        log.warning("libvirt.disconnected host=%s uri=%s reason=%s", host_uuid, uri, reason)
    host.libvirtUri, host.libvirtStatus, host.libvirtReason = uri, "Disconnected", reason
    return "Disconnected"


def lookup(conn: Any, vm_uuid: str) -> Any:
    """The domain of VM instance ``vm_uuid`` (32 hex digits) on ``conn``; NotFound when gone."""
    dashed = str(uuidlib.UUID(hex=vm_uuid))
    try:
        return conn.lookupByUUIDString(dashed)
    except connection.error_types():
        raise NotFound(resource="libvirt domain", uuid=vm_uuid) from None
