"""pytest plugin: the host's real libvirtd, and domains made on it for a test (no mocks). The one
place for both test trees (``tests/shared/...`` and ``tests/service/...``).

``libvirt_uri`` (session)
    ``qemu:///system`` once libvirtd answers: ``tests/harness/ensure-services libvirt`` runs
    once (it starts ``virtlogd -d``/``libvirtd -d`` as root when libvirtd does not answer, and
    lets libvirt's QEMU user open /dev/kvm so that libvirtd keeps its capabilities cache). A
    machine without libvirt-python or libvirtd fails the test, it does not skip.
``libvirtd_control`` (function)
    :func:`restart_libvirtd` (its domains keep running); asking for it makes the test the only
    libvirt test running on this machine meanwhile (``tests/services.py``, ``LIBVIRT_LOCK``).
``libvirt_folder`` (function)
    A folder for domains' disks (and the engine's run folder) that libvirt's QEMU (user
    ``libvirt-qemu``) can reach: under ``/var/tmp/blockvault-libvirt-tests``, mode 0755 (pytest's
    own folders are 0700); removed after the test.
``libvirt_domains`` (function)
    Factory: ``libvirt_domains(disks, start=False, nics=1, extra="") -> virDomain``, a persistent
    domain named ``bvt-<random>`` (:func:`domain_xml`); ``disks`` are ``(path, format)`` or
    ``(path, format, kind)`` with kind ``file``, ``block`` or ``network``. Every domain it made
    is destroyed and undefined (with its checkpoints' metadata) when the test ends. The host's
    libvirtd is shared (a neighbour's test may restart it): a define that loses its connection
    is tried again.
``make_domain`` (function)
    Factory: ``make_domain([(format, size), ...], extra="", start=True) -> Domain``: new disk
    files in ``libvirt_folder`` and a :class:`Domain` over them (writes through QEMU's monitor
    and a model of what was written).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.errors import LibvirtError
from shared.libvirt import connection

URI = "qemu:///system"
FOLDER = Path("/var/tmp/blockvault-libvirt-tests")
ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
MEMORY_MIB = 16  # what SeaBIOS needs; the guest never boots
VCPUS = 2
DomainFactory = Callable[..., Any]


def _libvirt() -> Any:
    libvirt = connection.module()  # with the quiet error handler
    if libvirt is None:
        pytest.fail("libvirt-python is not installed: pip install -e '.[libvirt]' (make test does)")
    return libvirt


def open_uri() -> Any:
    """A connection to the host's libvirtd, waiting (0.2 s polls, 60 s at most) while it starts."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return connection.open_connection(URI, timeout=60)
        except LibvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def libvirtd_pid() -> int | None:
    out = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True, check=False).stdout.split()
    return int(out[0]) if out else None


def ensure_libvirtd() -> None:
    """What ``tests/harness/ensure-services libvirt`` does (libvirtd started when it does not
    answer), then wait until it answers."""
    subprocess.run([str(ROOT / "tests/harness/ensure-services"), "libvirt"], check=True, cwd=ROOT)
    connection.close(open_uri())


def restart_libvirtd() -> None:
    """Stop libvirtd (its domains keep running) and start it again."""
    pid = libvirtd_pid()
    if pid is not None:
        os.kill(pid, 15)
        deadline = time.monotonic() + 30
        while libvirtd_pid() == pid and time.monotonic() < deadline:
            time.sleep(0.1)
    ensure_libvirtd()


@pytest.fixture(scope="session")
def libvirt_uri() -> str:
    _libvirt()
    if shutil.which("libvirtd") is None and not os.path.exists("/usr/sbin/libvirtd"):
        pytest.fail("libvirtd is not installed: tests/harness/ensure-system test")
    try:
        ensure_libvirtd()
    except LibvirtError as exc:
        pytest.fail(f"libvirtd does not answer on {URI}: {exc}")
    return URI


@pytest.fixture
def libvirtd_control(libvirt_uri: str) -> Callable[[], None]:
    """restart_libvirtd for a test; asking for it makes the test the only libvirt test running
    on this machine while it runs (tests/services.py, LIBVIRT_LOCK)."""
    return restart_libvirtd


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


def domain_xml(name: str, disks: list[tuple[str, ...]], nics: int = 1, extra: str = "") -> str:
    """A domain of type ``qemu`` (TCG, no KVM needed; ``kvm`` is not used even where /dev/kvm
    exists, so tests behave alike everywhere) that runs without a guest OS: none of its disks
    boots, the NICs carry no boot ROM (no iPXE polling the network), and SeaBIOS, finding
    nothing to boot, halts instead of rebooting every 60 s. Its disks (``vda``, ``vdb``, ...)
    are all a test needs; ACPI is on so that disks hot-plug."""
    devices = "".join(disk_xml(f"vd{chr(ord('a') + i)}", *disk) for i, disk in enumerate(disks))
    devices += "".join(
        f"<interface type='user'><mac address='52:54:00:aa:00:{i:02x}'/><model type='virtio'/>"
        "<rom enabled='no'/></interface>"
        for i in range(nics)
    )
    return (
        f"<domain type='qemu'><name>{name}</name><description>a test domain</description>"
        f"<memory unit='MiB'>{MEMORY_MIB}</memory><vcpu>{VCPUS}</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/><bootmenu enable='no'/>"
        "<bios rebootTimeout='-1'/></os><features><acpi/></features>"
        f"<devices>{devices}{extra}</devices></domain>"
    )


def destroy_domain(conn: Any, dom_uuid: str) -> None:
    """Abort its job, stop it and undefine it with its checkpoints' metadata; gone already: nothing."""
    libvirt = _libvirt()
    try:
        dom = conn.lookupByUUIDString(dom_uuid)
    except libvirt.libvirtError:
        return
    with contextlib.suppress(libvirt.libvirtError):
        dom.abortJob()
    with contextlib.suppress(libvirt.libvirtError):
        dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)


@pytest.fixture
def libvirt_domains(libvirt_uri: str) -> Iterator[DomainFactory]:
    libvirt = _libvirt()
    conn = open_uri()
    made: list[str] = []

    def make(disks: list[tuple[str, ...]], start: bool = False, nics: int = 1, extra: str = "") -> Any:
        nonlocal conn
        name = f"bvt-{uuid.uuid4().hex[:10]}"
        for attempt in range(3):  # the shared libvirtd may be restarted by a neighbour's test
            try:
                dom = conn.defineXML(domain_xml(name, disks, nics, extra))
                break
            except libvirt.libvirtError:
                if attempt == 2 or conn.isAlive():
                    raise
                connection.close(conn)
                conn = open_uri()
        made.append(dom.UUIDString())
        if start:
            dom.create()
        return dom

    try:
        yield make
    finally:
        connection.close(conn)
        conn = open_uri()
        for dom_uuid in made:
            destroy_domain(conn, dom_uuid)
        connection.close(conn)


def forget_domain(uuid_hex: str) -> None:
    """Destroy and undefine a domain a test defined through blockvault (not the factory)."""
    conn = open_uri()
    try:
        destroy_domain(conn, str(uuid.UUID(hex=uuid_hex)))
    finally:
        connection.close(conn)


class Domain:
    """A test domain of :func:`libvirt_domains` over new disk files, and a model of what the
    guest wrote to them."""

    def __init__(self, dom: Any, paths: list[Path], sizes: list[int]) -> None:
        self.dom = dom
        self.conn = dom.connect()
        self.name = dom.name()
        self.uuid = dom.UUIDString()
        self.paths = paths
        self.model = [bytearray(size) for size in sizes]

    @property
    def vm_uuid(self) -> str:
        return self.uuid.replace("-", "")

    def refresh(self) -> Any:
        """After a libvirtd restart: a domain handle on a new connection."""
        self.conn = open_uri()
        self.dom = self.conn.lookupByUUIDString(self.uuid)
        return self.dom

    def start(self) -> None:
        self.dom.create()

    def stop(self) -> None:
        """A clean shutdown is impossible without a guest: destroy, which still lets QEMU
        write its persistent bitmaps (it exits on SIGTERM)."""
        self.dom.destroyFlags(_libvirt().VIR_DOMAIN_DESTROY_GRACEFUL)

    def write(self, index: int, offset: int, length: int, pattern: int) -> None:
        """Through the domain's monitor, as the guest would."""
        import libvirt_qemu

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
        """Destroyed and undefined now (behind a catalog's back)."""
        conn = open_uri()
        try:
            destroy_domain(conn, self.uuid)
        finally:
            connection.close(conn)


@pytest.fixture
def make_domain(libvirt_folder: Path, libvirt_domains: DomainFactory) -> Callable[..., Domain]:
    def make(disks: list[tuple[str, int]], extra: str = "", start: bool = True) -> Domain:
        folder = libvirt_folder / uuid.uuid4().hex[:6]
        folder.mkdir(mode=0o755)
        paths = []
        for index, (fmt, size) in enumerate(disks):
            path = folder / f"disk{index}.{fmt}"
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
            paths.append(path)
        dom = libvirt_domains([(str(p), fmt) for p, (fmt, _) in zip(paths, disks, strict=True)], start, 0, extra)
        return Domain(dom, paths, [size for _, size in disks])

    return make
