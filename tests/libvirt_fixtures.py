"""pytest plugin: the host's real libvirtd, and domains made on it for a test (no mocks).

``libvirt_uri`` (session)
    ``qemu:///system`` once libvirtd answers: started here (``virtlogd -d``, ``libvirtd -d``,
    as root) when its socket is missing, as ``tests/harness/ensure-services`` does. A machine
    without libvirt-python or libvirtd fails the test, it does not skip.
``libvirt_folder`` (function)
    A folder for domains' disks that libvirt's QEMU (user ``libvirt-qemu``) can reach: under
    ``/var/tmp/blockvault-libvirt-tests``, mode 0755 (pytest's own folders are 0700); removed
    after the test.
``libvirt_domains`` (function)
    Factory: ``libvirt_domains(disks, start=False, nics=1) -> virDomain``, a persistent domain of
    type ``qemu`` (TCG, no KVM needed; ``kvm`` is not used even where /dev/kvm exists, so tests
    behave alike everywhere) with no guest OS (ACPI on: disks hot-plug), named ``bvt-<random>``; ``disks`` are ``(path,
    format)`` or ``(path, format, kind)`` with kind ``file``, ``block`` or ``network``. Every
    domain it made is destroyed and undefined when the test ends. The host's libvirtd is shared
    (a neighbour's test may restart it): a define that loses its connection is tried again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

URI = "qemu:///system"
SOCKETS = ("/run/libvirt/libvirt-sock", "/var/run/libvirt/libvirt-sock")
FOLDER = Path("/var/tmp/blockvault-libvirt-tests")
DomainFactory = Callable[..., Any]


def _answers() -> bool:
    return subprocess.run(["virsh", "-c", URI, "version"], check=False, capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="session")
def libvirt_uri() -> str:
    try:
        import libvirt  # noqa: F401
    except ImportError:
        pytest.fail("libvirt-python is not installed: pip install -e '.[libvirt]' (make test does)")
    if shutil.which("libvirtd") is None and not os.path.exists("/usr/sbin/libvirtd"):
        pytest.fail("libvirtd is not installed: tests/harness/ensure-system test")
    if not any(os.path.exists(s) for s in SOCKETS) or not _answers():
        subprocess.run(["tests/harness/ensure-services", "libvirt"], check=True)
    deadline = time.monotonic() + 60
    while not _answers():
        if time.monotonic() > deadline:
            pytest.fail("libvirtd does not answer on qemu:///system")
        time.sleep(0.5)
    return URI


@pytest.fixture
def libvirt_folder() -> Iterator[Path]:
    FOLDER.mkdir(mode=0o755, exist_ok=True)
    os.chmod(FOLDER, 0o755)
    folder = FOLDER / uuid.uuid4().hex[:12]
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def disk_xml(target: str, path: str, fmt: str, kind: str = "file") -> str:
    if kind == "network":
        source = f"<source protocol='nbd' name='{path}'><host name='127.0.0.1' port='10809'/></source>"
    elif kind == "block":
        source = f"<source dev='{path}'/>"
    else:
        source = f"<source file='{path}'/>"
    return (
        f"<disk type='{kind}' device='disk'><driver name='qemu' type='{fmt}'/>{source}"
        f"<target dev='{target}' bus='virtio'/></disk>"
    )


def domain_xml(name: str, disks: list[tuple[str, ...]], nics: int = 1) -> str:
    devices = "".join(disk_xml(f"vd{chr(ord('a') + i)}", *disk) for i, disk in enumerate(disks))
    devices += "".join(
        f"<interface type='user'><mac address='52:54:00:aa:00:{i:02x}'/><model type='virtio'/></interface>"
        for i in range(nics)
    )
    return (
        f"<domain type='qemu'><name>{name}</name><description>a test domain</description>"
        "<memory unit='MiB'>64</memory><vcpu>2</vcpu>"
        "<os><type arch='x86_64'>hvm</type><boot dev='hd'/></os><features><acpi/></features>"
        f"<devices>{devices}</devices></domain>"
    )


@pytest.fixture
def libvirt_domains(libvirt_uri: str) -> Iterator[DomainFactory]:
    import libvirt

    conn = libvirt.open(libvirt_uri)
    made: list[str] = []

    def make(disks: list[tuple[str, ...]], start: bool = False, nics: int = 1) -> Any:
        nonlocal conn
        name = f"bvt-{uuid.uuid4().hex[:10]}"
        for attempt in range(3):  # the shared libvirtd may be restarted by a neighbour's test
            try:
                dom = conn.defineXML(domain_xml(name, disks, nics))
                break
            except libvirt.libvirtError:
                if attempt == 2 or conn.isAlive():
                    raise
                time.sleep(2)
                conn = libvirt.open(libvirt_uri)
        made.append(dom.UUIDString())
        if start:
            dom.create()
        return dom

    try:
        yield make
    finally:
        if not conn.isAlive():
            conn = libvirt.open(libvirt_uri)
        for dom_uuid in made:
            try:
                dom = conn.lookupByUUIDString(dom_uuid)
            except libvirt.libvirtError:
                continue
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        conn.close()


def forget_domain(uuid_hex: str) -> None:
    """Destroy and undefine a domain a test defined through blockvault (not the factory)."""
    import libvirt

    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByUUIDString(str(uuid.UUID(hex=uuid_hex)))
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()
