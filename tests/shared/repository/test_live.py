"""Live backups from a real, running QEMU (no guest OS): one instant across disks, writes
made during the backup kept out of it, dirty bitmaps that survive failures, cleanup after a
killed worker or a killed QEMU, the guest agent's freeze, and the monitor's bad inputs."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.errors import MonitorError
from shared.repository.live import LiveDisk, LiveResult, backup_live
from shared.repository.repo import Repository
from shared.repository.restore import restore_backup
from tests.conftest import ROOT, MiB
from tests.qemu_fixtures import GuestAgent, QemuVm, make_qcow2

SIZES = (48 * MiB, 24 * MiB)


class Disks:
    """The VM's disks and a model of what the guest wrote, to compare restores with."""

    def __init__(self, vm: QemuVm, paths: list[Path]) -> None:
        self.vm = vm
        self.paths = paths
        self.model = [bytearray(vm_size) for vm_size in SIZES[: len(paths)]]

    def write(self, index: int, offset: int, length: int, pattern: int) -> None:
        self.vm.write(index, offset, length, pattern)
        self.model[index][offset : offset + length] = bytes([pattern]) * length

    def snapshot(self) -> list[bytes]:
        return [bytes(m) for m in self.model]

    def specs(self, name: str = "b") -> list[LiveDisk]:
        return [LiveDisk(str(p), "qcow2", name=name) for p in self.paths]


@pytest.fixture
def disks(tmp_path: Path, qemu_vm: Callable[..., QemuVm]) -> Disks:
    paths = [make_qcow2(tmp_path / f"disk{i}.qcow2", size) for i, size in enumerate(SIZES)]
    vm = qemu_vm(paths)
    d = Disks(vm, paths)
    d.write(0, 0, 8 * MiB, 0x41)
    d.write(0, 20 * MiB, 3 * MiB, 0x42)
    d.write(1, 4 * MiB, 1 * MiB, 0x43)
    return d


def restored(repo: Repository, backup_id: str, tmp_path: Path, name: str) -> bytes:
    target = tmp_path / f"{name}.raw"
    restore_backup(repo, backup_id, str(target))
    return target.read_bytes()


def assert_clean(vm: QemuVm, work: Path) -> None:
    """Nothing of a live backup is left in QEMU or on disk."""
    assert not [n for n in vm.node_names() if n.startswith("blockvault-")]
    assert vm.block_jobs() == [] and vm.exports() == []
    leftovers = [p.name for p in work.rglob("*") if p.is_file() and p.name != "lock"]
    assert leftovers == []
    for index in range(len(SIZES)):
        names = {b["name"]: b for b in vm.bitmaps(index)}
        assert "blockvault.next" not in names
        if "blockvault" in names:
            assert names["blockvault"]["recording"] and names["blockvault"]["persistent"]


def live(repo: Repository, d: Disks, work: Path, **kw: object) -> LiveResult:
    return backup_live(repo, d.vm.qmp_socket, d.specs(), work_dir=work, **kw)  # type: ignore[arg-type]


def test_full_then_incremental_live_keep_writes_made_during_the_backup_out(
    repo: Repository, disks: Disks, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    instant = disks.snapshot()
    during = {"done": False}

    def write_while_reading(done: int, total: int) -> None:
        # the first chunk of disk 0 is read: now overwrite blocks of both disks that are
        # not read yet (disk 1 entirely); the backup must still see the old contents
        if not during["done"]:
            during["done"] = True
            disks.write(0, 21 * MiB, 1 * MiB, 0x51)
            disks.write(1, 4 * MiB, 64 * 1024, 0x52)
            disks.write(1, 12 * MiB, 2 * MiB, 0x53)

    first = live(repo, disks, work, progress=write_while_reading)
    assert during["done"] and first.consistency == "crash"
    assert [b.mode for b in first.backups] == ["full", "full"]
    for i, backup in enumerate(first.backups):
        assert restored(repo, backup.id, tmp_path, f"full{i}") == instant[i], f"disk {i}"
    assert_clean(disks.vm, work)
    # the guest's view has the writes made during the backup
    assert disks.vm.read_disk(1) == bytes(disks.model[1])

    disks.write(0, 40 * MiB, 1 * MiB, 0x61)
    second_instant = disks.snapshot()
    second = live(repo, disks, work)
    assert [b.mode for b in second.backups] == ["incremental", "incremental"]
    assert [b.parent for b in second.backups] == [b.id for b in first.backups]
    # disk 0: chunks 5 (21 MiB) and 10 (40 MiB); disk 1: chunks 1 and 3 (4 MiB chunks)
    assert second.backups[0].bytesRead == 2 * 4 * MiB
    assert second.backups[1].bytesRead == 2 * 4 * MiB
    for i, backup in enumerate(second.backups):
        assert restored(repo, backup.id, tmp_path, f"incr{i}") == second_instant[i], f"disk {i}"
        assert backup.id in {e.id for e in repo.backups()}
    assert_clean(disks.vm, work)
    marker = [b for b in disks.vm.bitmaps(0) if b["name"].startswith("blockvault@")]
    assert [b["name"].rsplit(".", 1)[1] for b in marker] == [second.backups[0].id[:32]]
    # nothing written since: an incremental reads nothing
    third = live(repo, disks, work)
    assert [b.bytesRead for b in third.backups] == [0, 0]


def test_a_failed_backup_keeps_every_write_in_the_bitmap(repo: Repository, disks: Disks, tmp_path: Path) -> None:
    work = tmp_path / "work"
    first = live(repo, disks, work)
    disks.write(0, 30 * MiB, 1 * MiB, 0x71)  # before the failed backup's instant

    def fail(done: int, total: int) -> None:
        disks.write(1, 8 * MiB, 1 * MiB, 0x72)  # after it
        raise RuntimeError("the storage went away")

    with pytest.raises(RuntimeError):
        live(repo, disks, work, progress=fail)
    assert_clean(disks.vm, work)
    assert len(repo.backups()) == 2
    now = disks.snapshot()
    again = live(repo, disks, work)
    assert [b.mode for b in again.backups] == ["incremental", "incremental"]
    assert [b.parent for b in again.backups] == [b.id for b in first.backups]
    for i, backup in enumerate(again.backups):
        assert restored(repo, backup.id, tmp_path, f"again{i}") == now[i]


WORKER = """
import json, sys
from pathlib import Path
from shared.repository.live import LiveDisk, backup_live
from shared.repository.repo import Repository
repo = Repository.open(sys.argv[1])
paths = json.loads(sys.argv[3])
backup_live(repo, sys.argv[2], [LiveDisk(p) for p in paths], work_dir=Path(sys.argv[4]))
"""


def test_worker_killed_mid_backup_leaves_nothing_the_next_backup_does_not_remove(
    repo: Repository, disks: Disks, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    work = tmp_path / "work"
    first = live(repo, disks, work)
    disks.write(0, 44 * MiB, 1 * MiB, 0x81)
    args = [repo.location, disks.vm.qmp_socket, json.dumps([str(p) for p in disks.paths]), str(work)]
    for point in ("live.exported=1", "backup.chunk_stored=1"):
        proc = subprocess.run(
            [sys.executable, "-c", WORKER, *args],
            cwd=ROOT,
            env={"BLOCKVAULT_FAILPOINTS": f"{point}:kill", "PATH": "/usr/bin:/bin"},
            capture_output=True,
            check=False,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
        # the killed run's overlay, job and export are still in QEMU
        assert [n for n in disks.vm.node_names() if n.startswith("blockvault-")]
        assert disks.vm.block_jobs() and disks.vm.exports()
        assert list(work.rglob("fleece-*.qcow2"))
        disks.write(1, 16 * MiB, 1 * MiB, 0x82)  # while the leftovers hold the bitmaps
    assert len(repo.backups()) == 2  # no manifest from the killed runs
    now = disks.snapshot()
    with caplog.at_level(logging.WARNING, logger="shared.repository.live"):
        again = live(repo, disks, work)
    assert "live.leftovers_removed" in caplog.text
    assert_clean(disks.vm, work)
    assert [b.mode for b in again.backups] == ["incremental", "incremental"]
    assert [b.parent for b in again.backups] == [b.id for b in first.backups]
    for i, backup in enumerate(again.backups):
        assert restored(repo, backup.id, tmp_path, f"after-kill{i}") == now[i]


def test_qemu_killed_mid_backup_then_restarted_the_next_backup_reads_everything(
    repo: Repository, disks: Disks, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    live(repo, disks, work)
    disks.write(0, 10 * MiB, 1 * MiB, 0x91)
    for index in range(len(SIZES)):  # what a guest flushed survives its QEMU's death
        disks.vm.flush(index)

    def kill_qemu(done: int, total: int) -> None:
        disks.vm.kill()

    with pytest.raises(MonitorError, match="QEMU went away"):
        live(repo, disks, work, progress=kill_qemu)
    assert len(repo.backups()) == 2
    assert not list(work.rglob("fleece-*.qcow2"))
    disks.vm.restart()
    # a killed QEMU never saved the bitmaps it kept (qcow2 stores persistent bitmaps when the
    # image is closed; this QEMU made them and was killed before any close): none is left, so
    # the next backup reads every allocated block and stores only what changed
    for index in range(len(SIZES)):
        assert [b for b in disks.vm.bitmaps(index) if b["name"].startswith("blockvault")] == []
    now = disks.snapshot()
    again = live(repo, disks, work)
    assert again.backups[0].bytesRead >= 12 * MiB  # every allocated chunk of disk 0
    assert again.backups[0].newChunks <= 1  # only the changed one (the killed run may have stored it)
    for i, backup in enumerate(again.backups):
        assert restored(repo, backup.id, tmp_path, f"after-qemu{i}") == now[i]
    assert_clean(disks.vm, work)
    disks.write(1, 0, 1 * MiB, 0x92)
    last = live(repo, disks, work)
    assert [b.mode for b in last.backups] == ["incremental", "incremental"]
    assert last.backups[1].bytesRead == 4 * MiB and last.backups[0].bytesRead == 0


def test_raw_disk_of_a_running_vm(tmp_path: Path, qemu_vm: Callable[..., QemuVm], repo: Repository) -> None:
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"")
    with open(raw, "r+b") as handle:
        handle.truncate(16 * MiB)
    vm = qemu_vm([raw], ["raw"])
    vm.write(0, 2 * MiB, 1 * MiB, 0x11)
    spec = [LiveDisk(str(raw), "raw")]
    first = backup_live(repo, vm.qmp_socket, spec, work_dir=tmp_path / "work")
    vm.write(0, 9 * MiB, 1 * MiB, 0x12)
    expect = vm.read_disk(0)
    spec[0].parent = first.backups[0].id
    second = backup_live(repo, vm.qmp_socket, spec, work_dir=tmp_path / "work")
    assert second.backups[0].mode == "incremental" and second.backups[0].newChunks == 1
    assert restored(repo, second.backups[0].id, tmp_path, "raw2") == expect


def test_guest_agent_freezes_around_the_instant(
    repo: Repository, disks: Disks, tmp_path: Path, guest_agent: GuestAgent
) -> None:
    result = live(repo, disks, tmp_path / "work", agent_socket=guest_agent.socket_path)
    assert result.consistency == "application" and result.quiesceError is None
    assert all(b.mode == "full" for b in result.backups)


def test_an_agent_that_cannot_freeze_gives_a_crash_consistent_backup(
    repo: Repository, disks: Disks, tmp_path: Path
) -> None:
    with GuestAgent(tmp_path / "agent", block_freeze=True) as agent:
        refused = live(repo, disks, tmp_path / "work", agent_socket=agent.socket_path)
    assert refused.consistency == "crash" and "guest-fsfreeze-freeze" in (refused.quiesceError or "")
    missing = live(repo, disks, tmp_path / "work", agent_socket=str(tmp_path / "no-agent.sock"))
    assert missing.consistency == "crash" and "cannot connect" in (missing.quiesceError or "")


def test_bad_monitor_inputs_are_clear_and_leave_nothing(repo: Repository, disks: Disks, tmp_path: Path) -> None:
    work = tmp_path / "work"
    with pytest.raises(MonitorError, match="no such socket"):
        backup_live(repo, str(tmp_path / "nothing.sock"), disks.specs(), work_dir=work)
    with pytest.raises(MonitorError, match="absolute path"):
        backup_live(repo, "relative.sock", disks.specs(), work_dir=work)
    with pytest.raises(MonitorError, match="has no disk"):
        backup_live(repo, disks.vm.qmp_socket, [LiveDisk(str(tmp_path / "other.qcow2"))], work_dir=work)
    # someone else's NBD server runs in this QEMU (a migration, say): refused, nothing left
    live(repo, disks, work)
    disks.write(0, 30 * MiB, 1 * MiB, 0x33)
    disks.vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "theirs.sock")}})
    with pytest.raises(MonitorError, match="already running"):
        live(repo, disks, work)
    assert_clean(disks.vm, work)
    disks.vm.cmd("nbd-server-stop")
    now = disks.snapshot()
    again = live(repo, disks, work)
    assert again.backups[0].mode == "incremental" and again.backups[0].bytesRead == 4 * MiB
    assert restored(repo, again.backups[0].id, tmp_path, "after-refusal") == now[0]
    assert len(repo.backups()) == 4
