"""What a worker (root on its host) opens: only the platform's paths, whatever a catalog row
says. The API and a worker as separate processes on PostgreSQL and Redis; the host's volume
roots and socket folder are the test's folder (tests/service/conftest.py)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.client import ApiError, JobFailed
from tests.conftest import MiB, vm_like_regions, write_regions
from tests.service.conftest import Stack
from tests.service.test_storage_topologies import raw_volume, start_host

pytestmark = pytest.mark.shared_api  # an API lent per test, not started (tests/service/conftest.py)


def untouched(path: Path) -> None:
    """Mark ``path`` so that a read shows: atime at the epoch, mtime now; the filesystem is
    relatime, so any read moves atime forward."""
    os.utime(path, (0, time.time()))


def was_read(path: Path) -> bool:
    return os.stat(path).st_atime > 0


@pytest.fixture
def outside() -> Iterator[Path]:
    """A folder outside the host's volume roots and socket folder (another tenant's disks)."""
    with tempfile.TemporaryDirectory(prefix="bv-outside-") as folder:
        yield Path(folder)


def test_create_on_an_existing_file_fails_and_leaves_no_row(stack: Stack) -> None:
    host = start_host(stack)
    client = stack.client
    client.add_backup_storage("local", f"file://{stack.tmp / 'bs'}")
    volume, _ = raw_volume(stack, host, "v1")
    _, other_path = raw_volume(stack, host, "tenant-b", seed=9)
    before = other_path.read_bytes()
    backup = client.wait(client.backup_volume(volume["uuid"]), timeout=120)
    # the admin names an existing file, or a symlink to another tenant's disk: the job fails,
    # nothing is written and no row is left
    for target in (stack.tmp / "exists.raw", stack.tmp / "dangling.raw"):
        if target.name == "exists.raw":
            target.write_bytes(b"precious")
        else:
            target.symlink_to(other_path)
        with pytest.raises(JobFailed) as exists:
            client.wait(
                client.create_volume_from_backup(backup["uuid"], name="x", hostUuid=host, installPath=str(target)),
                timeout=120,
            )
        assert exists.value.code == "TARGET_EXISTS", target
        assert client.query("volumes", f"installPath={target}")["inventories"] == []  # nothing left to use
    assert (stack.tmp / "exists.raw").read_bytes() == b"precious"
    assert other_path.read_bytes() == before
    assert {v["status"] for v in client.query("volumes")["inventories"]} == {"Ready"}


def test_a_symlink_out_of_the_roots_is_never_read_nor_written(stack: Stack, outside: Path) -> None:
    host = start_host(stack)
    client = stack.client
    client.add_backup_storage("local", f"file://{stack.tmp / 'bs'}")
    secret = outside / "tenant-b.raw"
    write_regions(secret, 4 * MiB, vm_like_regions(4 * MiB, seed=5))
    content = secret.read_bytes()
    untouched(secret)
    link = stack.tmp / "innocent.raw"
    link.symlink_to(secret)
    volume = client.register_volume(host, str(link), name="innocent")  # lexically inside: the API can't tell
    with pytest.raises(JobFailed) as backup:
        client.wait(client.backup_volume(volume["uuid"]), timeout=120)
    assert backup.value.code == "PATH_NOT_ALLOWED" and "not inside" in backup.value.description
    assert not was_read(secret)
    assert client.query("volume-backups", f"volumeUuid={volume['uuid']}")["inventories"][0]["status"] == "Failed"
    # the link swapped in after a good backup: a revert writes nothing through it
    real, path = raw_volume(stack, host, "real")
    good = client.wait(client.backup_volume(real["uuid"]), timeout=120)
    path.unlink()
    path.symlink_to(secret)
    with pytest.raises(JobFailed) as revert:
        client.wait(client.revert_volume(good["uuid"]), timeout=120)
    assert revert.value.code == "PATH_NOT_ALLOWED"
    assert secret.read_bytes() == content
    # the data folder stays out of reach even inside the roots
    catalog_like = stack.tmp / "data" / "catalog-like.db"  # (a catalog, a key: what the data folder holds)
    catalog_like.parent.mkdir(exist_ok=True)
    catalog_like.write_bytes(b"\1" * 8192)
    leaked = client.register_volume(host, str(catalog_like), name="data")
    with pytest.raises(JobFailed) as data:
        client.wait(client.backup_volume(leaked["uuid"]), timeout=120)
    assert data.value.code == "PATH_NOT_ALLOWED" and "data folder" in data.value.description


def test_a_foreign_monitor_socket_is_never_connected_to(stack: Stack, outside: Path) -> None:
    host = start_host(stack)
    client = stack.client
    client.add_backup_storage("local", f"file://{stack.tmp / 'bs'}")
    foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    foreign.bind(str(outside / "qmp.sock"))
    foreign.listen(4)
    foreign.settimeout(0.5)
    (stack.tmp / "vm1.qmp").symlink_to(outside / "qmp.sock")
    try:
        vm = client.register_vm("vm1", hostUuid=host, state="Running", qmpSocket=str(stack.tmp / "vm1.qmp"))
        path = stack.tmp / "vm1-root.raw"
        write_regions(path, 4 * MiB, vm_like_regions(4 * MiB, seed=2))
        volume = client.register_volume(host, str(path), type="Root", vmInstanceUuid=vm["uuid"])
        with pytest.raises(JobFailed) as failed:
            client.wait(client.backup_volume(volume["uuid"]), timeout=120)
        assert failed.value.code == "PATH_NOT_ALLOWED" and "qmpSocket" in failed.value.description
        with pytest.raises(TimeoutError):
            foreign.accept()  # nobody ever connected
    finally:
        foreign.close()


def test_revert_keeps_a_symlinked_volume_its_owner_and_mode(stack: Stack) -> None:
    host = start_host(stack)
    client = stack.client
    client.add_backup_storage("local", f"file://{stack.tmp / 'bs'}")
    (stack.tmp / "pool").mkdir()
    real = stack.tmp / "pool" / "disk.raw"
    write_regions(real, 8 * MiB, vm_like_regions(8 * MiB, seed=4))
    expected = real.read_bytes()
    link = stack.tmp / "vm-disk.raw"
    link.symlink_to(real)
    volume = client.register_volume(host, str(link), name="linked")
    backup = client.wait(client.backup_volume(volume["uuid"]), timeout=120)
    with open(real, "r+b") as handle:
        handle.write(b"\xff" * MiB)
    os.chown(real, 1234, 5678)
    os.chmod(real, 0o640)
    client.wait(client.revert_volume(backup["uuid"]), timeout=120)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() == expected
    info = os.stat(real)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (1234, 5678, 0o640)
    assert [p.name for p in real.parent.iterdir()] == ["disk.raw"]  # no staging file left


@pytest.fixture
def loop_device(stack: Stack) -> Iterator[Path]:
    """A block device node inside the test's folder, backed by a loop device."""
    backing = stack.tmp / "loop-backing.img"
    with open(backing, "wb") as handle:
        handle.truncate(16 * MiB)
    made = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=False)
    assert made.returncode == 0, f"losetup (a loop device for this test) failed: {made.stderr}"
    device = made.stdout.strip()
    node = stack.tmp / "lv0"
    rdev = os.stat(device).st_rdev
    os.mknod(node, 0o600 | stat.S_IFBLK, rdev)
    try:
        yield node
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def test_revert_writes_a_block_device_in_place(stack: Stack, loop_device: Path) -> None:
    host = start_host(stack)
    client = stack.client
    client.add_backup_storage("local", f"file://{stack.tmp / 'bs'}")
    size = 16 * MiB
    regions = vm_like_regions(size, seed=6)
    with open(loop_device, "r+b") as handle:
        for offset, data in regions:
            handle.seek(offset)
            handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    expected = loop_device.read_bytes()
    volume = client.register_volume(host, str(loop_device), name="lv0")
    backup = client.wait(client.backup_volume(volume["uuid"]), timeout=120)
    holes = [offset for offset in range(0, size, MiB) if expected[offset : offset + MiB] == bytes(MiB)]
    assert holes, "the volume has zero regions (holes in the backup)"
    with open(loop_device, "r+b") as handle:
        handle.write(b"\xee" * size)  # every byte changed, holes included
        os.fsync(handle.fileno())
    client.wait(client.revert_volume(backup["uuid"]), timeout=120)
    assert stat.S_ISBLK(os.stat(loop_device).st_mode)  # the same device, not a file put in its place
    assert loop_device.read_bytes() == expected


def test_bad_volume_paths_are_refused_at_registration(stack: Stack) -> None:
    host = start_host(stack)
    client = stack.client
    for bad in ("/etc/shadow", f"{stack.tmp}/../escape.raw", f"{stack.tmp}/./x.raw", "relative.raw", str(stack.tmp)):
        with pytest.raises(ApiError) as refused:
            client.register_volume(host, bad)
        assert (refused.value.status, refused.value.code) == (400, "PATH_NOT_ALLOWED"), bad
    host_row = client.get("hosts", host)
    assert host_row["volumeRoots"] == [str(stack.tmp)] and host_row["vmSocketDir"] == str(stack.tmp)
