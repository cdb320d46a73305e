"""libvirt hosts against the real libvirtd (docs/libvirt.md): discovery and state changes
(start, pause, stop, a disk attached live, undefine), a libvirt that does not answer, the VM's
definition kept with every VM backup, a new VM defined (and started by libvirt) from it with
its disks' bytes checked, a stopped domain reverted in place, and what is refused."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from shared import hosts
from shared.catalog.models import Host, VmInstance, Volume, VolumeBackup
from shared.config import get_settings
from shared.errors import Conflict, InvalidArgument, LibvirtError
from shared.libvirt import connection, discovery, domainxml
from shared.service import instant, recovery, vm_from_backup, volume_backups
from tests.conftest import write_regions
from tests.libvirt_fixtures import MEMORY_MIB, VCPUS, DomainFactory, disk_xml, forget_domain
from tests.shared.service.conftest import Site, raw_bytes, volume_regions

MiB = 1024 * 1024
SIZE = 2 * MiB


@dataclass
class Lv:
    """A site whose host is a libvirt host: its volume root ``folder`` is one libvirt's QEMU
    can open; ``domains`` defines test domains on the real libvirtd."""

    site: Site
    folder: Path
    domains: DomainFactory
    uri: str

    def disk(self, name: str, seed: int, fmt: str = "raw", folder: Path | None = None) -> str:
        path = (folder or self.folder) / name
        source = path.with_suffix(".src") if fmt == "qcow2" else path
        write_regions(source, SIZE, volume_regions(SIZE, seed))
        if fmt == "qcow2":
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(source), str(path)], check=True)
            source.unlink()
        return str(path)

    def sync(self) -> None:
        """One discovery round, as the worker's (with its heartbeat: the host stays Connected)."""
        session = self.site.session
        hosts.heartbeat(session, self.site.host)
        for _attempt in range(3):  # the shared libvirtd may be restarted by a neighbour's test
            if discovery.sync_host(session, self.site.host, self.uri) == "Connected":
                break
            time.sleep(2)
        session.commit()
        assert session.get_one(Host, self.site.host).libvirtStatus == "Connected"

    def vm(self, dom: Any) -> VmInstance:
        vm = self.site.session.get(VmInstance, dom.UUIDString().replace("-", ""))
        assert vm is not None
        self.site.session.refresh(vm)
        return vm

    def volumes(self, vm: VmInstance) -> dict[str, Volume]:
        rows = self.site.session.scalars(select(Volume).where(Volume.vmInstanceUuid == vm.uuid)).all()
        return {str(v.deviceName): v for v in rows}


@pytest.fixture
def lv(site: Site, libvirt_uri: str, libvirt_folder: Path, libvirt_domains: DomainFactory, monkeypatch: Any) -> Lv:
    monkeypatch.setenv("BLOCKVAULT_VOLUME_ROOTS", f"{libvirt_folder}:{site.tmp}")
    monkeypatch.setenv("BLOCKVAULT_LIBVIRT_URI", libvirt_uri)
    get_settings.cache_clear()
    hosts.register(site.session, site.host)  # its roots as its worker reports them now
    site.session.commit()
    return Lv(site, libvirt_folder, libvirt_domains, libvirt_uri)


@pytest.fixture
def outside_folder(libvirt_folder: Path) -> Iterator[Path]:
    folder = libvirt_folder.parent / f"outside-{uuidlib.uuid4().hex[:8]}"
    folder.mkdir(mode=0o755)
    try:
        yield folder
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=True)


def test_discovery_follows_domains_states_and_disks(lv: Lv, outside_folder: Path) -> None:
    root = lv.disk("root.qcow2", 1, "qcow2")
    data = lv.disk("data.raw", 2)
    stray = lv.disk("stray.raw", 3, folder=outside_folder)
    dom = lv.domains([(root, "qcow2"), (data, "raw"), (stray, "raw")], nics=2)
    lv.sync()
    vm = lv.vm(dom)
    assert (vm.managedBy, vm.state, vm.hostUuid, vm.cpuNum, vm.memorySize) == (
        "libvirt",
        "Stopped",
        lv.site.host,
        VCPUS,
        MEMORY_MIB * MiB,
    )
    assert vm.name == dom.name() and vm.description == "a test domain"
    volumes = lv.volumes(vm)
    assert sorted(volumes) == ["vda", "vdb"]
    assert (volumes["vda"].type, volumes["vda"].format, volumes["vda"].installPath) == ("Root", "qcow2", root)
    assert (volumes["vdb"].type, volumes["vdb"].format, volumes["vdb"].size) == ("Data", "raw", SIZE)
    assert volumes["vda"].uuid == discovery.volume_uuid(lv.site.host, root)
    (skipped,) = vm.skippedDisks or []
    assert (skipped["deviceName"], skipped["source"]) == ("vdc", stray)
    assert "not inside" in skipped["reason"]
    host = lv.site.session.get_one(Host, lv.site.host)
    assert (host.libvirtStatus, host.libvirtUri, host.libvirtReason) == ("Connected", lv.uri, None)

    vm.description = "the catalog's own"  # taken from libvirt once, then the caller's
    lv.site.session.commit()
    dom.create()
    lv.sync()
    assert (lv.vm(dom).state, lv.vm(dom).description) == ("Running", "the catalog's own")
    dom.suspend()
    lv.sync()
    assert lv.vm(dom).state == "Paused"
    dom.resume()
    extra = lv.disk("extra.raw", 4)
    dom.attachDeviceFlags(disk_xml("vdd", extra, "raw"), 3)  # VIR_DOMAIN_AFFECT_LIVE | _CONFIG
    lv.sync()
    vm = lv.vm(dom)
    assert vm.state == "Running"
    assert sorted(lv.volumes(vm)) == ["vda", "vdb", "vdd"]
    assert lv.volumes(vm)["vdd"].installPath == extra

    dom.detachDeviceFlags(disk_xml("vdb", data, "raw"), 3)
    dom.destroy()
    lv.sync()
    vm = lv.vm(dom)
    assert vm.state == "Stopped"
    assert sorted(lv.volumes(vm)) == ["vda", "vdd"]
    gone = lv.site.session.get_one(Volume, volumes["vdb"].uuid)
    lv.site.session.refresh(gone)
    assert (gone.status, gone.vmInstanceUuid) == ("Detached", None)

    dom.undefine()
    lv.sync()
    vm = lv.vm(dom)
    assert vm.state == "Destroyed"
    assert lv.volumes(vm) == {}
    # a Detached volume is never backed up
    lv.site.refused(Conflict, lambda: volume_backups.request_volume_backup(lv.site.session, gone.uuid, {}, None))


def test_a_libvirt_that_does_not_answer_is_the_hosts_status(lv: Lv) -> None:
    dom = lv.domains([(lv.disk("root.raw", 1), "raw")])
    lv.sync()
    session = lv.site.session
    for uri, reason in (
        ("qemu+tcp://127.0.0.1:1/system", "unable to connect"),
        ("test+unix:///default?socket=/nonexistent/libvirt-sock", "no such file"),
    ):
        assert discovery.sync_host(session, lv.site.host, uri) == "Disconnected"
        session.commit()
        host = session.get_one(Host, lv.site.host)
        session.refresh(host)
        assert (host.libvirtStatus, host.libvirtUri) == ("Disconnected", uri)
        assert reason in (host.libvirtReason or "").lower(), host.libvirtReason
        assert lv.vm(dom).state == "Stopped"  # the rows stay as they were
    with socket.socket() as silent:  # a server that takes the connection and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        uri = f"qemu+tcp://127.0.0.1:{silent.getsockname()[1]}/system"
        with pytest.raises(LibvirtError, match=r"no answer within 0\.5 s"):
            connection.open_connection(uri, timeout=0.5)
        assert discovery.sync_host(session, lv.site.host, uri) == "Disconnected"  # the first one still waits
        session.commit()
        assert "still waits" in (session.get_one(Host, lv.site.host).libvirtReason or "")
    lv.sync()
    assert session.get_one(Host, lv.site.host).libvirtStatus == "Connected"


def _vm_backup(lv: Lv, vm: VmInstance) -> list[VolumeBackup]:
    root = lv.volumes(vm)["vda"]
    hosts.heartbeat(lv.site.session, lv.site.host)
    job = volume_backups.request_vm_backup(lv.site.session, root.uuid, {"name": "vmb"}, None)
    lv.site.run(volume_backups.run_volume_backups, job)
    return list(lv.site.session.scalars(select(VolumeBackup).where(VolumeBackup.groupUuid == job.resourceUuid)))


def test_new_vm_from_a_vm_backup_is_defined_and_started_by_libvirt(lv: Lv) -> None:
    lv.site.storage()
    root, data = lv.disk("root.qcow2", 11, "qcow2"), lv.disk("data.raw", 12)
    dom = lv.domains([(root, "qcow2"), (data, "raw")], nics=1)
    lv.sync()
    vm = lv.vm(dom)
    backups = _vm_backup(lv, vm)
    definition = backups[0].metadata_["vmDefinition"]
    assert definition["domainXml"] and domainxml.parse(definition["domainXml"]).uuid == vm.uuid
    assert (definition["name"], definition["cpuNum"], definition["memorySize"]) == (vm.name, VCPUS, MEMORY_MIB * MiB)
    assert [n["mac"] for n in definition["nics"]] == ["52:54:00:aa:00:00"]
    expected = {"vda": raw_bytes(Path(root)), "vdb": raw_bytes(Path(data))}
    Path(data).write_bytes(b"\xff" * SIZE)  # the source changes after the backup

    group = str(backups[0].groupUuid)
    job = vm_from_backup.request_create_vm(lv.site.session, group, {"name": f"{vm.name}-new"}, None)
    try:
        result = lv.site.run(vm_from_backup.run_create_vm, job)
        new = lv.site.session.get_one(VmInstance, result["uuid"])
        assert (new.state, new.managedBy, new.name) == ("Running", "libvirt", f"{vm.name}-new")
        with connection.connect(lv.uri) as conn:
            made = discovery.lookup(conn, new.uuid)
            assert discovery.state_of(made) == "Running"
            parsed = domainxml.parse(made.XMLDesc(0))
        assert parsed.uuid == new.uuid != vm.uuid
        assert [n.mac for n in parsed.nics] != ["52:54:00:aa:00:00"]
        restored = {d.target: d.path for d in parsed.volume_disks()}
        assert sorted(restored) == ["vda", "vdb"]
        for target, content in expected.items():
            path = restored[target]
            assert path is not None and path not in (root, data) and path.startswith(str(lv.folder))
            assert raw_bytes(Path(path)) == content
        lv.sync()  # discovery finds the same rows
        assert {
            v.deviceName: v.installPath for v in lv.volumes(lv.site.session.get_one(VmInstance, new.uuid)).values()
        } == restored
    finally:
        forget_domain(job.resourceUuid or "")

    job = vm_from_backup.request_create_vm(
        lv.site.session, group, {"strategy": "CreateStopped", "keepMacs": True}, None
    )
    try:
        result = lv.site.run(vm_from_backup.run_create_vm, job)
        assert result["state"] == "Stopped"
        with connection.connect(lv.uri) as conn:
            parsed = domainxml.parse(discovery.lookup(conn, result["uuid"]).XMLDesc(0))
        assert [n.mac for n in parsed.nics] == ["52:54:00:aa:00:00"]
    finally:
        forget_domain(job.resourceUuid or "")


def test_what_creating_a_vm_from_a_backup_refuses(lv: Lv) -> None:
    site = lv.site
    site.storage()
    dom = lv.domains([(lv.disk("root.raw", 21), "raw")])
    lv.sync()
    group = str(_vm_backup(lv, lv.vm(dom))[0].groupUuid)
    for params, error in (
        ({"strategy": "Later"}, InvalidArgument),
        ({"keepMacs": "yes"}, InvalidArgument),
        ({"name": "a/b"}, InvalidArgument),
        ({"name": lv.vm(dom).name}, Conflict),  # libvirt names are unique on a host
    ):
        site.refused(error, lambda p=params: vm_from_backup.request_create_vm(site.session, group, p, None))
    refused = site.refused(Conflict, lambda: instant.request_instant_vm(site.session, group, {}, None))
    assert "libvirt domain" in str(refused)  # instant restore streams in plain QEMU only, so far
    # a plain QEMU VM's backup keeps no domain XML
    hand = site.vm()
    volume = site.volume("hand.raw", vm=hand, kind="Root")
    job = volume_backups.request_vm_backup(site.session, volume.uuid, {}, None)
    site.run(volume_backups.run_volume_backups, job)
    refused = site.refused(Conflict, lambda: vm_from_backup.request_create_vm(site.session, job.resourceUuid, {}, None))
    assert "no libvirt domain definition" in str(refused)
    # a host whose libvirt is down
    discovery.sync_host(site.session, site.host, "qemu+tcp://127.0.0.1:1/system")
    site.session.commit()
    refused = site.refused(Conflict, lambda: vm_from_backup.request_create_vm(site.session, group, {}, None))
    assert "Disconnected" in str(refused)


def test_revert_a_stopped_domain_in_place(lv: Lv) -> None:
    site = lv.site
    site.storage()
    root = lv.disk("root.qcow2", 31, "qcow2")
    data = lv.disk("data.raw", 32)
    dom = lv.domains([(root, "qcow2"), (data, "raw")])
    lv.sync()
    vm = lv.vm(dom)
    before = {"root": raw_bytes(Path(root)), "data": Path(data).read_bytes()}
    xml = dom.XMLDesc(2)
    group = str(_vm_backup(lv, vm)[0].groupUuid)
    Path(data).write_bytes(b"\x07" * SIZE)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 64k", root], check=True, capture_output=True)

    dom.create()  # the catalog still says Stopped: the worker asks libvirt before writing
    job = recovery.request_vm_revert(site.session, group, {}, None)
    refused = site.fail(recovery.run_revert, job, Conflict)
    assert refused.error and "Running in libvirt" in refused.error["description"]
    assert Path(data).read_bytes() == b"\x07" * SIZE
    lv.sync()
    site.refused(Conflict, lambda: recovery.request_vm_revert(site.session, group, {}, None))

    dom.destroy()
    lv.sync()
    job = recovery.request_vm_revert(site.session, group, {}, None)
    site.run(recovery.run_revert, job)
    assert raw_bytes(Path(root)) == before["root"]
    assert Path(data).read_bytes() == before["data"]
    assert dom.XMLDesc(2) == xml  # nothing else redefined
    dom.create()  # and libvirt still starts it from the reverted disks
    assert discovery.state_of(dom) == "Running"
