"""A libvirt domain as its XML says, and the XML of a new domain made from a backed-up one.

:func:`parse` reads what blockvault needs (name, description, CPUs, memory, platform, disks
and NICs); :func:`new_domain_xml` rewrites a backed-up domain's XML for a new domain: a new
name and uuid, each disk pointing at its restored file, fresh MAC addresses unless the old ones
are kept, and the disks that were not backed up left out. Nothing here talks to libvirt.
"""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.errors import InvalidArgument

UNITS = {
    "b": 1,
    "bytes": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}
FORMATS = ("raw", "qcow2")


@dataclass
class Disk:
    """One ``<disk>`` of a domain: ``kind`` is its source type (file, block, volume, network),
    ``path`` the file or device (a pool volume's path once resolved), ``boot`` its boot order."""

    target: str
    device: str = "disk"
    kind: str = "file"
    path: str | None = None
    format: str = "raw"
    bus: str | None = None
    boot: int | None = None
    readonly: bool = False
    pool: str | None = None
    volume: str | None = None
    protocol: str | None = None


@dataclass
class Nic:
    mac: str | None
    kind: str
    source: str | None = None
    model: str | None = None


@dataclass
class Domain:
    uuid: str
    name: str
    description: str | None
    cpuNum: int
    memorySize: int
    platform: str
    disks: list[Disk] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    bootDevices: list[str] = field(default_factory=list)

    def volume_disks(self) -> list[Disk]:
        """The disks that may be volumes (not cdroms, floppies or LUN passthrough)."""
        return [d for d in self.disks if d.device == "disk"]

    def root_target(self) -> str | None:
        """The boot disk's target: the lowest per-disk boot order, else the first disk when
        the domain boots from ``hd`` (or says nothing), else None (it boots from elsewhere)."""
        disks = self.volume_disks()
        ordered = sorted((d for d in disks if d.boot is not None), key=lambda d: d.boot or 0)
        if ordered:
            return ordered[0].target
        if disks and (not self.bootDevices or "hd" in self.bootDevices):
            return disks[0].target
        return None

    def summary(self) -> dict[str, Any]:
        """What a VM backup keeps beside the XML (the seed's VM metadata)."""
        return {
            "uuid": self.uuid,
            "name": self.name,
            "description": self.description,
            "platform": self.platform,
            "cpuNum": self.cpuNum,
            "memorySize": self.memorySize,
            "nics": [asdict(n) for n in self.nics],
            "disks": [{"deviceName": d.target, "kind": d.kind, "format": d.format} for d in self.volume_disks()],
        }


def _bytes(element: ET.Element | None) -> int:
    if element is None or not (element.text or "").strip():
        return 0
    unit = (element.get("unit") or "KiB").lower()
    return int(element.text or "0") * UNITS.get(unit, 1024)


def _platform(root: ET.Element) -> str:
    """ZStack's platform: Windows or Linux from libosinfo's metadata, else Linux (as ZStack)."""
    for element in root.iter():
        if element.tag.endswith("}os") and "microsoft.com/win" in (element.get("id") or ""):
            return "Windows"
    return "Linux"


def _disk(element: ET.Element) -> Disk:
    target = element.find("target")
    source = element.find("source")
    driver = element.find("driver")
    boot = element.find("boot")
    kind = element.get("type") or "file"
    disk = Disk(
        target=(target.get("dev") if target is not None else None) or "?",
        device=element.get("device") or "disk",
        kind=kind,
        format=(driver.get("type") if driver is not None else None) or "raw",
        bus=target.get("bus") if target is not None else None,
        boot=int(boot.get("order") or 0) if boot is not None else None,
        readonly=element.find("readonly") is not None,
    )
    if source is not None:
        if kind == "file":
            disk.path = source.get("file")
        elif kind == "block":
            disk.path = source.get("dev")
        elif kind == "volume":
            disk.pool, disk.volume = source.get("pool"), source.get("volume")
        elif kind == "network":
            disk.protocol = source.get("protocol")
            disk.path = source.get("name")
    return disk


def parse(xml: str) -> Domain:
    """The domain ``xml`` describes; InvalidArgument when it is not a domain's XML."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InvalidArgument(detail=f"not a libvirt domain XML: {exc}") from None
    if root.tag != "domain":
        raise InvalidArgument(detail=f"not a libvirt domain XML: its root is <{root.tag}>")
    nics = []
    for element in root.findall("devices/interface"):
        mac, source, model = element.find("mac"), element.find("source"), element.find("model")
        nics.append(
            Nic(
                mac=mac.get("address") if mac is not None else None,
                kind=element.get("type") or "?",
                source=None
                if source is None
                else (source.get("network") or source.get("bridge") or source.get("dev") or None),
                model=model.get("type") if model is not None else None,
            )
        )
    vcpu = root.find("vcpu")
    return Domain(
        uuid=(root.findtext("uuid") or "").replace("-", "").lower(),
        name=root.findtext("name") or "",
        description=root.findtext("description") or root.findtext("title"),
        cpuNum=int((vcpu.text or "1").strip()) if vcpu is not None else 1,
        memorySize=_bytes(root.find("memory")),
        platform=_platform(root),
        disks=[_disk(e) for e in root.findall("devices/disk")],
        nics=nics,
        bootDevices=[b.get("dev") or "" for b in root.findall("os/boot")],
    )


def random_mac() -> str:
    """A MAC address in QEMU's locally administered range 52:54:00 (as libvirt picks them)."""
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


def new_domain_xml(
    xml: str,
    *,
    name: str,
    uuid: str,
    disks: dict[str, tuple[str, str]],
    keep_macs: bool = False,
) -> str:
    """The XML of a new domain made from the backed-up ``xml``: ``name`` and ``uuid`` (32 hex
    digits), each disk of ``disks`` (target -> (restored file, raw|qcow2)) as a file disk on
    that file, the other disks (not backed up: network sources, outside the roots) left out,
    cdroms kept, fresh MACs unless ``keep_macs``; runtime-only elements removed."""
    root = ET.fromstring(xml)
    root.attrib.pop("id", None)
    for tag in ("name", "uuid"):
        element = root.find(tag)
        if element is None:
            element = ET.SubElement(root, tag)
        element.text = name if tag == "name" else f"{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:]}"
    for tag in ("seclabel", "resource"):
        for element in root.findall(tag):
            root.remove(element)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    placed = set()
    for element in list(devices):
        if element.tag in ("disk", "interface", "graphics", "channel", "console", "serial"):
            for alias in element.findall("alias"):
                element.remove(alias)
        if element.tag == "disk" and (element.get("device") or "disk") == "disk":
            target = element.find("target")
            dev = target.get("dev") if target is not None else None
            if dev not in disks:
                devices.remove(element)
                continue
            path, fmt = disks[dev]
            _point_at(element, path, fmt)
            placed.add(dev)
        if element.tag == "interface" and not keep_macs:
            mac = element.find("mac")
            if mac is None:
                mac = ET.SubElement(element, "mac")
            mac.set("address", random_mac())
    for dev, (path, fmt) in disks.items():
        if dev not in placed:  # a disk the XML did not have (attached live, or none at all)
            devices.append(ET.fromstring(add_disk_xml(dev, path, fmt)))
    return ET.tostring(root, encoding="unicode")


def _point_at(element: ET.Element, path: str, fmt: str) -> None:
    """A ``<disk>`` element made a file disk on ``path`` in format ``fmt``."""
    element.set("type", "file")
    for tag in ("source", "backingStore"):
        for old in element.findall(tag):
            element.remove(old)
    driver = element.find("driver")
    if driver is None:
        driver = ET.Element("driver", {"name": "qemu"})
        element.insert(0, driver)
    driver.set("type", fmt)
    source = ET.Element("source", {"file": path})
    element.insert(list(element).index(driver) + 1, source)


def add_disk_xml(target: str, path: str, fmt: str, bus: str | None = None) -> str:
    """A file ``<disk>`` for ``path`` at ``target`` (to attach, or to add to a new domain)."""
    disk = ET.Element("disk", {"type": "file", "device": "disk"})
    ET.SubElement(disk, "driver", {"name": "qemu", "type": fmt})
    ET.SubElement(disk, "source", {"file": path})
    ET.SubElement(disk, "target", {"dev": target, "bus": bus or ("virtio" if target.startswith("vd") else "scsi")})
    return ET.tostring(disk, encoding="unicode")
