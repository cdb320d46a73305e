"""A real libvirtd (started here when none runs) and throw-away domains of type ``qemu`` (no
KVM, no guest OS: the disks only have to be attached). Disk files live in a folder of their
own under /tmp that the domain's QEMU user may walk (pytest's tmp_path is mode 0700)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest

from shared.libvirt.backup import domain_disks

URI = "qemu:///system"
MiB = 1024 * 1024


def libvirtd_pid() -> int | None:
    out = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True, check=False).stdout.split()
    return int(out[0]) if out else None


def ensure_libvirtd() -> None:
    """Start virtlogd and libvirtd (no systemd here) unless they run; wait until it answers."""
    if subprocess.run(["pgrep", "-x", "virtlogd"], capture_output=True, check=False).returncode != 0:
        subprocess.run(["virtlogd", "-d"], check=True)
    if libvirtd_pid() is None:
        subprocess.run(["libvirtd", "-d"], check=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            libvirt.open(URI).close()
            return
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def restart_libvirtd() -> None:
    """Stop libvirtd (its domains keep running) and start it again."""
    pid = libvirtd_pid()
    if pid is not None:
        os.kill(pid, 15)
        deadline = time.monotonic() + 30
        while libvirtd_pid() == pid and time.monotonic() < deadline:
            time.sleep(0.1)
    ensure_libvirtd()


@pytest.fixture
def libvirtd_control() -> Callable[[], None]:
    """restart_libvirtd for a test; asking for it makes the test the only libvirt test running
    on this machine while it runs (tests/services.py, LIBVIRT_LOCK)."""
    return restart_libvirtd


class Domain:
    """A persistent test domain, its disk files and a model of what the guest wrote."""

    def __init__(self, folder: Path, disks: list[tuple[str, int]], extra: str = "") -> None:
        self.folder = folder
        self.name = f"bvtest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.uuid = str(uuid.uuid4())
        self.paths: list[Path] = []
        self.model: list[bytearray] = []
        xml_disks = []
        for index, (fmt, size) in enumerate(disks):
            path = folder / f"disk{index}.{fmt}"
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
            self.paths.append(path)
            self.model.append(bytearray(size))
            xml_disks.append(
                f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
                f"<source file='{path}'/><target dev='vd{chr(ord('a') + index)}' bus='virtio'/></disk>"
            )
        self.xml = (
            f"<domain type='qemu'><name>{self.name}</name><uuid>{self.uuid}</uuid>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
            f"<devices>{''.join(xml_disks)}{extra}</devices></domain>"
        )
        self.conn = libvirt.open(URI)
        self.dom = self.conn.defineXML(self.xml)

    @property
    def vm_uuid(self) -> str:
        return self.uuid.replace("-", "")

    def refresh(self) -> libvirt.virDomain:
        """After a libvirtd restart: a new connection and domain handle."""
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()
        self.conn = libvirt.open(URI)
        self.dom = self.conn.lookupByUUIDString(self.uuid)
        return self.dom

    def start(self) -> None:
        self.dom.create()

    def stop(self) -> None:
        """A clean shutdown is impossible without a guest: destroy, which still lets QEMU
        write its persistent bitmaps (it exits on SIGTERM)."""
        self.dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)

    def write(self, index: int, offset: int, length: int, pattern: int) -> None:
        """Through the domain's monitor, as the guest would."""
        qom = f"/machine/peripheral/virtio-disk{index}/virtio-backend"
        out = libvirt_qemu.qemuMonitorCommand(
            self.dom,
            f'qemu-io -d {qom} "write -P {pattern} {offset} {length}"',
            libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
        )
        assert "error" not in out.lower() and "conflict" not in out.lower(), out
        self.model[index][offset : offset + length] = bytes([pattern]) * length

    def snapshot(self) -> list[bytes]:
        return [bytes(m) for m in self.model]

    def checkpoints(self) -> list[str]:
        return sorted(cp.getName() for cp in self.dom.listAllCheckpoints())

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.refresh()
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.abortJob()
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()


def disk_targets(dom: libvirt.virDomain) -> list[str]:
    return [d.target for d in domain_disks(dom.XMLDesc(0))]


@pytest.fixture
def world_folder() -> Iterator[Path]:
    """A folder QEMU (the domain's user) can reach: disks, and the engine's run folder."""
    folder = Path(tempfile.mkdtemp(prefix="bvlv-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def make_domain(world_folder: Path) -> Iterator[Callable[..., Domain]]:
    ensure_libvirtd()
    made: list[Domain] = []

    def make(disks: list[tuple[str, int]], extra: str = "", start: bool = True) -> Domain:
        folder = world_folder / f"d{len(made)}"
        folder.mkdir(mode=0o755)
        domain = Domain(folder, disks, extra)
        made.append(domain)
        if start:
            domain.start()
        return domain

    yield make
    for domain in made:
        domain.close()
