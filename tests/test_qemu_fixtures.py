"""The QEMU and qemu-ga fixtures themselves (tests/qemu_fixtures.py), against the real programs."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from tests.qemu_fixtures import (
    GuestAgent,
    QemuError,
    UnsafeAgentError,
    VmFactory,
    check_agent_mounts,
    make_qcow2,
)

MiB = 1024 * 1024
KiB = 1024


def test_vm_starts_with_its_nodes_and_monitors(qemu_vm: VmFactory, tmp_path: Path) -> None:
    vm = qemu_vm([make_qcow2(tmp_path / "a.qcow2", 4 * MiB), make_qcow2(tmp_path / "b.qcow2", 2 * MiB)])
    assert vm.running and vm.pid
    assert {"disk0", "disk1"} <= set(vm.node_names())
    assert vm.block_jobs() == [] and vm.exports() == [] and vm.bitmaps(0) == []
    # the product's monitor is free for the product
    assert os.path.exists(vm.qmp_socket)
    from qemu.qmp.legacy import QEMUMonitorProtocol

    product = QEMUMonitorProtocol(vm.qmp_socket)
    product.connect()
    assert product.cmd("query-status") == {"status": "running", "singlestep": False, "running": True}
    product.close()


def test_write_then_read_disk(qemu_vm: VmFactory, tmp_path: Path) -> None:
    vm = qemu_vm([make_qcow2(tmp_path / "a.qcow2", 4 * MiB), make_qcow2(tmp_path / "b.qcow2", 1 * MiB)])
    vm.write(0, MiB + 512, 3 * KiB, 0xAB)
    vm.write(1, 0, 64 * KiB, 7)
    data = vm.read_disk(0)
    assert len(data) == 4 * MiB
    assert data[MiB + 512 : MiB + 512 + 3 * KiB] == b"\xab" * (3 * KiB)
    assert data.count(0) == len(data) - 3 * KiB
    assert vm.read_disk(1) == b"\x07" * (64 * KiB) + bytes(MiB - 64 * KiB)
    vm.discard(1, 0, 64 * KiB)
    assert vm.read_disk(1) == bytes(MiB)


def test_failed_write_raises(qemu_vm: VmFactory, tmp_path: Path) -> None:
    vm = qemu_vm([make_qcow2(tmp_path / "a.qcow2", MiB)])
    with pytest.raises(QemuError, match="write failed"):
        vm.write(0, 2 * MiB, 4 * KiB, 1)  # past the end
    with pytest.raises(IndexError):
        vm.write(1, 0, 4 * KiB, 1)


def test_writes_reach_dirty_bitmaps(qemu_vm: VmFactory, tmp_path: Path) -> None:
    vm = qemu_vm([make_qcow2(tmp_path / "a.qcow2", 4 * MiB)])
    vm.cmd("block-dirty-bitmap-add", node="disk0", name="b0", persistent=True)
    vm.write(0, 0, 64 * KiB, 1)
    vm.write(0, 2 * MiB, 1, 2)
    [bitmap] = vm.bitmaps(0)
    assert (bitmap["name"], bitmap["recording"], bitmap["persistent"], bitmap["count"]) == ("b0", True, True, 128 * KiB)


def test_kill_restart_and_quit(qemu_vm: VmFactory, tmp_path: Path) -> None:
    disk = make_qcow2(tmp_path / "a.qcow2", 2 * MiB)
    vm = qemu_vm([disk])
    vm.write(0, 0, 4 * KiB, 9)
    vm.flush(0)  # a SIGKILL loses what qcow2 still caches, as a host crash would
    vm.cmd("block-dirty-bitmap-add", node="disk0", name="lost", persistent=True)
    first = vm.pid
    vm.kill()
    assert not vm.running
    vm.restart()
    assert vm.running and vm.pid != first
    assert vm.read_disk(0)[: 4 * KiB] == b"\x09" * (4 * KiB)
    assert vm.bitmaps(0) == []  # never stored: SIGKILL
    vm.cmd("block-dirty-bitmap-add", node="disk0", name="kept", persistent=True)
    vm.quit()
    assert not vm.running
    info = subprocess.run(["qemu-img", "info", "--output=json", str(disk)], capture_output=True, text=True, check=True)
    assert '"kept"' in info.stdout and '"lost"' not in info.stdout
    vm.restart()
    assert [b["name"] for b in vm.bitmaps(0)] == ["kept"]


def test_agent_freeze_thaw_round_trip(guest_agent: GuestAgent, tmp_path: Path) -> None:
    assert stat.S_ISSOCK(os.stat(guest_agent.socket_path).st_mode)  # a real socket: the relay
    assert os.path.realpath(guest_agent.socket_path) == guest_agent.socket_path
    assert os.path.exists(guest_agent.proc_socket_path)
    assert guest_agent.execute("guest-ping") == {"return": {}}
    assert guest_agent.execute("guest-fsfreeze-status") == {"return": "thawed"}
    assert guest_agent.execute("guest-fsfreeze-freeze") == {"return": 0}
    try:
        # the host stays writable: a write + fsync on the host's disk finishes
        done = threading.Event()

        def write_on_host() -> None:
            path = tmp_path / "during-freeze"
            with open(path, "wb") as handle:
                handle.write(b"still writable")
                handle.flush()
                os.fsync(handle.fileno())
            done.set()

        writer = threading.Thread(target=write_on_host, daemon=True)
        writer.start()
        assert done.wait(10), "a host write hung while the agent was frozen"
        # nothing was frozen, so qemu-ga 7.2 reports thawed straight away
        assert guest_agent.execute("guest-fsfreeze-status") == {"return": "thawed"}
    finally:
        assert guest_agent.execute("guest-fsfreeze-thaw") == {"return": 0}
    assert guest_agent.execute("guest-fsfreeze-status") == {"return": "thawed"}


def test_agent_mount_guard(guest_agent: GuestAgent) -> None:
    assert guest_agent.pid
    mountinfo = Path(f"/proc/{guest_agent.pid}/mountinfo").read_text()
    check_agent_mounts(mountinfo)
    assert {line.split()[4] for line in mountinfo.splitlines()} == {"/", "/proc"}
    # the guard rejects this test's own view (a block-backed root), and btrfs (major 0 too)
    with pytest.raises(UnsafeAgentError):
        check_agent_mounts(Path("/proc/self/mountinfo").read_text())
    with pytest.raises(UnsafeAgentError):
        check_agent_mounts("40 1 0:45 / /data rw,relatime - btrfs /dev/vdb rw\n")
    with pytest.raises(UnsafeAgentError):
        check_agent_mounts("")


def test_agent_blocks_host_reaching_rpcs(guest_agent: GuestAgent) -> None:
    reply = guest_agent.execute("guest-file-open", {"path": "/proc/1/root/etc/hostname"})
    assert reply["error"]["class"] == "CommandNotFound"
    assert guest_agent.execute("guest-set-time", {"time": 0})["error"]["class"] == "CommandNotFound"


def test_agent_refusing_to_freeze(tmp_path: Path) -> None:
    with GuestAgent(tmp_path / "agent", block_freeze=True) as agent:
        reply = agent.execute("guest-fsfreeze-freeze")
        assert reply["error"] == {
            "class": "CommandNotFound",
            "desc": "Command guest-fsfreeze-freeze has been disabled",
        }
        assert agent.execute("guest-fsfreeze-status") == {"return": "thawed"}
        assert agent.execute("guest-fsfreeze-thaw") == {"return": 0}


def test_agent_stop_and_start_again(tmp_path: Path) -> None:
    agent = GuestAgent(tmp_path / "agent").start()
    try:
        first, path = agent.pid, agent.socket_path
        agent.kill()
        assert not agent.running and not os.path.lexists(path)
        with pytest.raises(QemuError):
            _ = agent.socket_path
        agent.start()
        assert agent.pid != first and agent.socket_path == path
        assert agent.execute("guest-ping") == {"return": {}}
    finally:
        agent.stop()
    assert agent.proc is not None and agent.proc.returncode is not None
