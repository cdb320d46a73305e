"""qemu-img / qemu-nbd wrappers against the real tools."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from shared.errors import MonitorError
from shared.repository import qemu
from shared.repository.nbd import NBDClient
from shared.repository.qmp import Monitor

MiB = 1024 * 1024


def qemu_nbd_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.name() == "qemu-nbd"]


def assert_gone(pid: int | None) -> None:
    assert pid is not None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert not os.path.exists(f"/proc/{pid}") or psutil.Process(pid).name() != "qemu-nbd"
    assert qemu_nbd_children() == []


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "vol.qcow2"
    qemu.create_qcow2(str(path), 8 * MiB)
    return path


def test_create_detect_and_info(image: Path, tmp_path: Path) -> None:
    assert qemu.detect_format(str(image)) == "qcow2"
    assert image.read_bytes()[:4] == qemu.QCOW2_MAGIC
    raw = tmp_path / "vol.raw"
    raw.write_bytes(b"\0" * 4096)
    assert qemu.detect_format(str(raw)) == "raw"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert qemu.detect_format(str(empty)) == "raw"
    with pytest.raises(qemu.QemuError, match="missing"):
        qemu.detect_format(str(tmp_path / "missing"))

    info = qemu.image_info(str(image))
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 8 * MiB
    assert qemu.virtual_size(str(image)) == 8 * MiB
    assert qemu.virtual_size(str(raw), fmt="raw") == 4096
    assert qemu.list_bitmaps(str(image)) == []


def test_bitmaps(image: Path) -> None:
    qemu.bitmap_add(str(image), "a")
    qemu.bitmap_add(str(image), "b", disabled=True, granularity=1 * MiB)
    bitmaps = {b["name"]: b for b in qemu.list_bitmaps(str(image))}
    assert set(bitmaps) == {"a", "b"}
    assert bitmaps["a"]["flags"] == ["auto"]
    assert bitmaps["a"]["granularity"] == 64 * 1024
    assert bitmaps["b"]["flags"] == []
    assert bitmaps["b"]["granularity"] == MiB
    qemu.bitmap_clear(str(image), "a")
    qemu.bitmap_remove(str(image), "b")
    assert [b["name"] for b in qemu.list_bitmaps(str(image))] == ["a"]
    with pytest.raises(qemu.QemuError) as info:
        qemu.bitmap_add(str(image), "a")
    assert str(image) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(qemu.QemuError, match="nope"):
        qemu.bitmap_remove(str(image), "nope")


@pytest.mark.parametrize(
    ("offset", "data", "said"),
    [
        (0, b"XXXX", "not in qcow2 format"),
        (4, (99).to_bytes(4, "big"), "version"),  # qcow2 version 99
        (20, (40).to_bytes(4, "big"), "cluster size"),  # cluster_bits 40
    ],
)
def test_corrupt_header_raises_one_line_error(image: Path, offset: int, data: bytes, said: str) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(data)
    with pytest.raises(qemu.QemuError) as info:
        qemu.image_info(str(image))
    message = str(info.value)
    assert "\n" not in message
    assert str(image) in message
    assert said in message.lower()
    assert info.value.path == str(image)
    assert info.value.stderr


def test_missing_image_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.qcow2")
    with pytest.raises(qemu.QemuError, match="No such file"):
        qemu.virtual_size(missing)
    with pytest.raises(qemu.QemuError) as info, qemu.QemuNbdServer(missing):
        pass
    assert "exited with status" in str(info.value)
    assert missing in str(info.value) and "\n" not in str(info.value)
    assert qemu_nbd_children() == []
    with pytest.raises(qemu.QemuError):
        qemu.create_qcow2(str(tmp_path / "no-such-dir" / "x.qcow2"), MiB)


def test_server_leaves_no_process_or_socket(image: Path) -> None:
    with qemu.QemuNbdServer(str(image), read_only=False) as srv:
        pid = srv.pid
        sock_dir = os.path.dirname(srv.socket_path)
        assert os.path.exists(srv.socket_path)
        assert [p.pid for p in qemu_nbd_children()] == [pid]
        clients = [srv.connect() for _ in range(3)]  # several clients at once, then more later
        for n, client in enumerate(clients):
            client.write(n * MiB, bytes([n + 1]) * 4096)
            client.flush()
            client.close()
        with srv.connect() as client:
            assert client.read(2 * MiB, 2) == b"\x03\x03"
    assert_gone(pid)
    assert not os.path.exists(sock_dir)
    assert srv.pid is None


def test_server_cleanup_when_body_raises(image: Path) -> None:
    srv = qemu.QemuNbdServer(str(image))
    with pytest.raises(RuntimeError, match="boom"), srv:
        pid = srv.pid
        sock_dir = os.path.dirname(srv.socket_path)
        client = srv.connect()
        assert client.read(0, 10) == bytes(10)
        raise RuntimeError("boom")  # the client is left open on purpose
    assert_gone(pid)
    assert not os.path.exists(sock_dir)


def test_server_with_bitmap_and_options(image: Path) -> None:
    qemu.bitmap_add(str(image), "inc")
    srv = qemu.QemuNbdServer(str(image), bitmap="inc", export_name="disk0", shared=2)
    cmd = srv.command()
    assert "--read-only" in cmd and "--bitmap=inc" in cmd and "--export-name=disk0" in cmd
    assert "--detect-zeroes=unmap" not in cmd
    with srv:
        with srv.connect(["qemu:dirty-bitmap:inc"]) as client:
            assert client.meta_contexts.keys() == {"qemu:dirty-bitmap:inc"}
            assert client.block_status("qemu:dirty-bitmap:inc") == [(0, 8 * MiB, 0)]
        with NBDClient.connect_unix(srv.socket_path, "disk0") as client:
            assert client.read_only
    writable = qemu.QemuNbdServer(str(image), read_only=False).command()
    assert "--discard=unmap" in writable and "--detect-zeroes=unmap" in writable
    assert "--read-only" not in writable

    # a bitmap the image does not have makes qemu-nbd exit early with its message
    with pytest.raises(qemu.QemuError, match="nope") as info, qemu.QemuNbdServer(str(image), bitmap="nope"):
        pass
    assert "\n" not in str(info.value)
    assert qemu_nbd_children() == []


def test_image_in_use_by_writable_server(image: Path) -> None:
    with qemu.QemuNbdServer(str(image), read_only=False):
        # -U lets info read an image another process holds open for writing
        assert qemu.virtual_size(str(image)) == 8 * MiB
        with pytest.raises(qemu.QemuError, match="lock"):
            qemu.bitmap_add(str(image), "x")
    qemu.bitmap_add(str(image), "x")


def test_monitor_on_a_storage_daemon(tmp_path: Path) -> None:
    """The synchronous QMP client against a real qemu-storage-daemon: answers, an error reply
    as one line naming the command, and a daemon gone as a lost connection."""
    image = tmp_path / "a,b.qcow2"  # a comma: the daemon's options are JSON
    qemu.create_qcow2(str(image), 16 * MiB)
    with qemu.QemuStorageDaemon(str(image)) as daemon, Monitor(daemon.qmp_socket) as mon:
        node = next(n for n in mon.block_nodes() if n["node-name"] == daemon.node)
        assert node["image"]["virtual-size"] == 16 * MiB
        mon.transaction([("block-dirty-bitmap-add", {"node": daemon.node, "name": "a", "persistent": True})])
        assert [b["name"] for b in mon.bitmaps(daemon.node)] == ["a"]
        with pytest.raises(MonitorError, match=r"block-dirty-bitmap-remove: .*'nope'"):
            mon.cmd("block-dirty-bitmap-remove", node=daemon.node, name="nope")
        mon.cmd("quit")
        with pytest.raises(MonitorError, match="query-status: connection lost"):
            for _ in range(100):  # until the daemon has gone
                mon.cmd("query-status")
    assert [b["name"] for b in qemu.list_bitmaps(str(image))] == ["a"]  # stored when it quit
