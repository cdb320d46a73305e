"""Domain XML read and rewritten (shared.libvirt.domainxml): no libvirt needed."""

from __future__ import annotations

import pytest

from shared.errors import InvalidArgument
from shared.libvirt import domainxml

XML = """<domain type='kvm' id='7'>
  <name>web1</name><uuid>3d9c6a86-a18e-4b8b-afbc-e34f4a24fca7</uuid><title>the web server</title>
  <metadata><libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
    <libosinfo:os id="http://microsoft.com/win/10"/></libosinfo:libosinfo></metadata>
  <memory unit='GiB'>2</memory><vcpu placement='static'>4</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/iso/x.iso'/>
      <target dev='sda' bus='sata'/><readonly/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/data'/>
      <target dev='vdb' bus='virtio'/><alias name='virtio-disk1'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/images/root.qcow2' index='2'/>
      <backingStore/><target dev='vda' bus='virtio'/><boot order='1'/></disk>
    <disk type='network' device='disk'><driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/image'><host name='ceph1' port='6789'/></source>
      <target dev='vdc' bus='virtio'/></disk>
    <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='default' volume='d.qcow2'/>
      <target dev='vdd' bus='virtio'/></disk>
    <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/>
      <model type='virtio'/></interface>
    <interface type='bridge'><mac address='52:54:00:12:34:57'/><source bridge='br0'/></interface>
  </devices>
  <seclabel type='dynamic' model='dac'/>
</domain>"""


def test_a_domain_as_its_xml_says() -> None:
    domain = domainxml.parse(XML)
    assert (domain.uuid, domain.name, domain.description) == (
        "3d9c6a86a18e4b8bafbce34f4a24fca7",
        "web1",
        "the web server",
    )
    assert (domain.cpuNum, domain.memorySize, domain.platform) == (4, 2 * 1024**3, "Windows")
    disks = {d.target: d for d in domain.volume_disks()}
    assert sorted(disks) == ["vda", "vdb", "vdc", "vdd"]  # the cdrom is not a volume
    assert (disks["vdb"].kind, disks["vdb"].path) == ("block", "/dev/vg/data")
    assert (disks["vda"].format, disks["vda"].path, disks["vda"].boot) == ("qcow2", "/images/root.qcow2", 1)
    assert (disks["vdc"].kind, disks["vdc"].protocol, disks["vdc"].path) == ("network", "rbd", "pool/image")
    assert (disks["vdd"].pool, disks["vdd"].volume) == ("default", "d.qcow2")
    assert domain.root_target() == "vda"  # the boot order, not the first disk
    assert [(n.mac, n.kind, n.source) for n in domain.nics] == [
        ("52:54:00:12:34:56", "network", "default"),
        ("52:54:00:12:34:57", "bridge", "br0"),
    ]
    summary = domain.summary()
    assert summary["memorySize"] == 2 * 1024**3 and summary["nics"][0]["mac"] == "52:54:00:12:34:56"


def test_the_root_disk_without_boot_orders() -> None:
    plain = "<domain><name>a</name><os><boot dev='hd'/></os><devices>{}</devices></domain>"
    disks = "".join(
        f"<disk type='file' device='disk'><source file='/i/{d}'/><target dev='{d}'/></disk>" for d in ("vdb", "vdc")
    )
    assert domainxml.parse(plain.format(disks)).root_target() == "vdb"
    assert domainxml.parse(plain.replace("'hd'", "'network'").format(disks)).root_target() is None
    assert domainxml.parse(plain.format("")).root_target() is None
    assert domainxml.parse("<domain><memory unit='KiB'>1024</memory></domain>").memorySize == 1024 * 1024


@pytest.mark.parametrize(
    "bad", ["", "<domain>", "<network><name>x</name></network>", "<!DOCTYPE x [<!ENTITY a 'b'>]><x/>"]
)
def test_what_is_not_a_domain_xml(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="not a libvirt domain XML"):
        domainxml.parse(bad)


def test_a_new_domain_from_a_backed_up_one() -> None:
    new_uuid = "0123456789abcdef0123456789abcdef"
    disks = {"vda": ("/roots/a.qcow2", "qcow2"), "vdb": ("/roots/b.raw", "raw"), "vde": ("/roots/e.raw", "raw")}
    xml = domainxml.new_domain_xml(XML, name="web1-copy", uuid=new_uuid, disks=disks)
    assert "id=" not in xml.split(">", 1)[0] and "seclabel" not in xml and "alias" not in xml
    assert "backingStore" not in xml and "index=" not in xml
    domain = domainxml.parse(xml)
    assert (domain.uuid, domain.name) == (new_uuid, "web1-copy")
    found = {d.target: (d.kind, d.path, d.format) for d in domain.volume_disks()}
    assert found == {  # each backed-up disk on its restored file; the network and pool disks left out
        "vda": ("file", "/roots/a.qcow2", "qcow2"),
        "vdb": ("file", "/roots/b.raw", "raw"),
        "vde": ("file", "/roots/e.raw", "raw"),  # one the XML did not have, appended
    }
    assert [d.target for d in domain.disks if d.device == "cdrom"] == ["sda"]
    assert domain.root_target() == "vda"
    macs = [n.mac for n in domain.nics]
    assert len(macs) == 2 and not {"52:54:00:12:34:56", "52:54:00:12:34:57"} & set(macs)
    assert all(m and m.startswith("52:54:00:") for m in macs)
    kept = domainxml.parse(domainxml.new_domain_xml(XML, name="w", uuid=new_uuid, disks=disks, keep_macs=True))
    assert [n.mac for n in kept.nics] == ["52:54:00:12:34:56", "52:54:00:12:34:57"]
