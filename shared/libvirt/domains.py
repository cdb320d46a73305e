"""Driving a libvirt domain for the service: its definition for a VM backup, a new domain
defined (and started) from a backed-up one, a domain started on given disks, and the check
that a domain is shut off before its disks are written."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from shared.catalog.models import VmInstance, Volume
from shared.errors import Conflict
from shared.libvirt import MANAGED, connection, discovery, domainxml

log = logging.getLogger(__name__)


def definition_of(vm: VmInstance) -> dict[str, Any]:
    """What a VM backup keeps of ``vm`` to define it again (``vmDefinition``): for a libvirt
    domain its XML and what it says (name, description, platform, CPUs, memory, NICs with
    MACs, disks); for a hand-registered VM the catalog's fields. A libvirt that does not
    answer: the catalog's fields and ``definitionError`` (the backup itself goes on)."""
    summary: dict[str, Any] = {
        "uuid": vm.uuid,
        "name": vm.name,
        "description": vm.description,
        "platform": vm.platform,
        "cpuNum": vm.cpuNum,
        "memorySize": vm.memorySize,
        "nics": [],
        "domainXml": None,
    }
    if vm.managedBy != MANAGED:
        return summary
    try:
        with connection.connect() as conn:
            xml = discovery.definition_xml(discovery.lookup(conn, vm.uuid))
    except Exception as exc:  # noqa: BLE001 - a backup never fails for its definition
        log.warning("libvirt.definition_unread vm=%s: %s", vm.uuid, exc)
        return {**summary, "definitionError": str(exc)}
    return {**summary, **domainxml.parse(xml).summary(), "uuid": vm.uuid, "domainXml": xml}


def define(conn: Any, xml: str, *, start: bool) -> str:
    """Define the domain ``xml`` (persistent) and start it when ``start``; its state."""
    try:
        dom = conn.defineXML(xml)
    except connection.error_types() as exc:
        raise connection.libvirt_error(exc, conn.getURI()) from None
    if start:
        try:
            dom.create()
        except connection.error_types() as exc:
            raise connection.libvirt_error(exc, conn.getURI()) from None
    return discovery.state_of(dom)


def undefine(conn: Any, vm_uuid: str) -> None:
    """Stop and undefine the domain of ``vm_uuid`` when it exists (a failed restore's)."""
    try:
        dom = discovery.lookup(conn, vm_uuid)
    except Exception:  # noqa: BLE001 - nothing to undo
        return
    for step in (dom.destroy, dom.undefine):
        try:
            step()
        except connection.error_types():
            pass


def require_shut_off(vm: VmInstance, action: str) -> None:
    """Conflict unless ``vm``'s domain is shut off now (libvirt asked, not the catalog): its
    disks are about to be written."""
    with connection.connect() as conn:
        state = discovery.state_of(discovery.lookup(conn, vm.uuid))
    if state != "Stopped":
        raise Conflict(detail=f"VM {vm.uuid} is {state} in libvirt: {action} needs it shut off")


def start_on(vm: VmInstance, volumes: Sequence[Volume]) -> bool:
    """Point ``vm``'s domain disks at ``volumes`` (root first, by device name, else in order)
    and start it; whether it runs."""
    with connection.connect() as conn:
        dom = discovery.lookup(conn, vm.uuid)
        domain = domainxml.parse(discovery.definition_xml(dom))
        targets = [d.target for d in domain.volume_disks()]
        disks = {}
        for index, volume in enumerate(volumes):
            target = volume.deviceName or (targets[index] if index < len(targets) else f"vd{chr(ord('a') + index)}")
            disks[target] = (volume.installPath, volume.format)
        xml = domainxml.new_domain_xml(
            discovery.definition_xml(dom), name=domain.name, uuid=vm.uuid, disks=disks, keep_macs=True
        )
        return define(conn, xml, start=True) == "Running"
