"""Instant recovery (shared.service.instant) with real QEMU: a VM runs from the overlay while
the backup streams in behind it; the guest reads the backup's bytes at once, its writes during
the stream survive, the finished volume is the backup plus those writes and stands alone, the
export is gone; a storage that vanishes mid-stream fails the job and pauses the VM; without a
VM the copy is made by qemu-storage-daemon; a whole VM; and what the API refuses."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.catalog.models import ApiJob, BackupStorage, VmInstance, Volume, VolumeBackup
from shared.errors import Conflict, InvalidArgument, PathNotAllowed, StreamFailed
from shared.repository.qemu import backing_of
from shared.service import instant, volume_backups
from shared.service.instant import export_socket
from tests.qemu_fixtures import QemuVm, VmFactory
from tests.shared.service.conftest import Site, raw_bytes

MiB = 1024 * 1024
SIZE = 8 * MiB
HELD = 1  # bytes/s the tests stream at: QEMU copies its first chunk (512 KiB) at once, then
# waits (days) for the next until the test lifts the limit: the test sees mid-stream, however slow


def patterned(path: Path, fmt: str) -> bytes:
    """A volume whose MiB ``i`` is all byte ``i + 1`` (the guest checks it with read -P), but
    the fourth, a hole."""
    data = bytearray()
    for index in range(SIZE // MiB):
        data += bytes(MiB) if index == 3 else bytes([index + 1]) * MiB
    raw = path.with_suffix(".src") if fmt == "qcow2" else path
    raw.write_bytes(bytes(data))
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
        raw.unlink()
    return bytes(data)


def wait_for(condition: Callable[[], Any], what: str, running: Running, timeout: float = 120.0) -> Any:
    """``condition()``'s first true value; fails at once, with the job's error or result, when
    the job ends first (the condition can no longer come true)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if running.error is not None:
            raise AssertionError(f"the job failed while waiting for {what}") from running.error
        if running.result is not None:
            raise AssertionError(f"the job finished while waiting for {what}: {running.result}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Running:
    """The job run by its worker in a thread of the test."""

    def __init__(self, site: Site, job: ApiJob) -> None:
        self.site, self.job = site, job
        self.error: BaseException | None = None
        self.result: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.site.run(instant.run_instant, self.job)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc

    def join(self) -> None:
        self.thread.join(300)
        assert not self.thread.is_alive()

    def status(self, volume_uuid: str) -> str:
        from shared.catalog import db

        with db.session() as session:
            row = session.get(Volume, volume_uuid)
            return row.status if row is not None else "gone"


def stream_job(vm: QemuVm) -> dict[str, Any] | None:
    jobs = [j for j in vm.cmd("query-jobs") if j["id"].startswith("blockvault-")]
    return jobs[0] if jobs else None


def held_mid_stream(vm: QemuVm, running: Running) -> dict[str, Any]:
    """The stream once its first chunk is in, held there by the HELD rate."""
    job: dict[str, Any] = wait_for(
        lambda: (j := stream_job(vm)) and 0 < j["current-progress"] < j["total-progress"] and j, "stream", running
    )
    assert job["status"] == "running"
    return job


def unhold(vm: QemuVm, job: dict[str, Any]) -> None:
    """Lift the HELD rate: the rest streams at full speed."""
    vm.cmd("block-job-set-speed", device=job["id"], speed=0)


def start_vm_on_overlay(site: Site, qemu_vm: VmFactory, fmt: str) -> tuple[bytes, VmInstance, Volume, Running, QemuVm]:
    source = site.tmp / f"source.{fmt}"
    content = patterned(source, fmt)
    site.storage()
    backup = site.backup(site.volume(source.name, size=SIZE, path=source))
    vm_row = site.vm(qmp_socket=str(site.tmp / "vm0" / "qmp.sock"))  # where the fixture's QEMU listens
    job = instant.request_instant_volume(
        site.session, backup.uuid, {"vmInstanceUuid": vm_row.uuid, "attachTimeout": 120, "bandwidthLimit": HELD}, None
    )
    volume = site.session.get_one(Volume, job.resourceUuid)
    assert (volume.status, volume.format, volume.vmInstanceUuid) == ("Creating", "qcow2", vm_row.uuid)
    running = Running(site, job)
    wait_for(lambda: running.status(volume.uuid) == "Streaming", "the overlay", running)
    assert backing_of(volume.installPath) is not None
    vm = qemu_vm([Path(volume.installPath)], ["qcow2"])  # the operator starts the VM from it
    return content, vm_row, volume, running, vm


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_running_vm_reads_the_backup_at_once_and_keeps_its_writes(site: Site, qemu_vm: VmFactory, fmt: str) -> None:
    content, _vm_row, volume, running, vm = start_vm_on_overlay(site, qemu_vm, fmt)
    # the guest reads the backup's bytes from its first read, the hole as zeros
    assert vm.reads(0, 0, 4096, 1)
    assert vm.reads(0, 3 * MiB, MiB, 0)
    assert vm.reads(0, SIZE - MiB, MiB, SIZE // MiB)
    job = held_mid_stream(vm, running)
    vm.write(0, 6 * MiB + 4096, 8192, 0xAB)  # mid-stream, where the stream has not been yet
    vm.write(0, 512, 1024, 0xCD)  # where it has (its first chunk): the guest's bytes win either way
    assert vm.reads(0, 6 * MiB + 4096, 8192, 0xAB)
    assert stream_job(vm) == job  # the writes were mid-stream: it has not moved
    unhold(vm, job)
    running.join()
    assert running.error is None, running.error
    assert running.result is not None and running.result["instantRestore"]["mode"] == "vm"
    assert running.status(volume.uuid) == "Ready"
    expected = bytearray(content)
    expected[6 * MiB + 4096 : 6 * MiB + 4096 + 8192] = b"\xab" * 8192
    expected[512 : 512 + 1024] = b"\xcd" * 1024
    vm.flush(0)
    assert backing_of(volume.installPath) is None  # it stands alone
    assert raw_bytes(Path(volume.installPath)) == bytes(expected)
    assert not os.path.exists(export_socket(volume))  # the export is gone...
    assert not [n for n in vm.cmd("query-named-block-nodes", flat=True) if n["drv"] == "nbd"]  # ...from QEMU too
    assert vm.reads(0, 5 * MiB, MiB, 6)
    first = running.result["instantRestore"]["exports"][0]["firstReadSeconds"]
    assert first is not None and first >= 0


def test_a_storage_that_vanishes_mid_stream_fails_the_job_and_pauses_the_vm(site: Site, qemu_vm: VmFactory) -> None:
    _content, _vm_row, volume, running, vm = start_vm_on_overlay(site, qemu_vm, "raw")
    job = held_mid_stream(vm, running)  # the stream cannot end before the storage goes
    vm.write(0, 7 * MiB, 4096, 0xEE)
    site.vanish(site.session.query(BackupStorage).one())
    unhold(vm, job)
    running.join()
    assert isinstance(running.error, StreamFailed), running.error
    assert "the VM is paused" in str(running.error)
    assert vm.cmd("query-status")["running"] is False  # paused, not crashed
    assert vm.running
    assert running.status(volume.uuid) == "Failed"  # the row and the file stay: the writes are there
    assert vm.reads(0, 7 * MiB, 4096, 0xEE)
    alone = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": volume.installPath}, "backing": None})
    check = subprocess.run(["qemu-img", "check", "-U", f"json:{alone}"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_without_a_vm_qemu_storage_daemon_copies_the_backup_in(site: Site) -> None:
    source = site.tmp / "source.raw"
    content = patterned(source, "raw")
    site.storage()
    backup = site.backup(site.volume(source.name, size=SIZE, path=source))
    job = instant.request_instant_volume(site.session, backup.uuid, {"name": "restored"}, None)
    result = site.run(instant.run_instant, job)
    volume = site.session.get_one(Volume, job.resourceUuid)
    assert (volume.status, volume.name) == ("Ready", "restored")
    assert result["instantRestore"]["mode"] == "storage-daemon"
    assert Path(volume.installPath).parent == site.tmp  # beside the backed-up volume, named by the platform
    assert backing_of(volume.installPath) is None
    assert raw_bytes(Path(volume.installPath)) == content
    assert not os.path.exists(export_socket(volume))


def test_a_whole_vm_is_restored_to_new_volumes_it_runs_from(site: Site) -> None:
    site.storage()
    vm = site.vm()
    root = site.volume("root.raw", size=2 * MiB, seed=4, vm=vm, kind="Root")
    data = site.volume("data.qcow2", size=2 * MiB, seed=5, vm=vm)
    group_job = volume_backups.request_vm_backup(site.session, root.uuid, {}, None)
    site.run(volume_backups.run_volume_backups, group_job)
    group = group_job.resourceUuid
    assert group and site.session.query(VolumeBackup).filter(VolumeBackup.groupUuid == group).count() == 2
    job = instant.request_instant_vm(site.session, group, {"attachTimeout": 0}, None)
    result = site.run(instant.run_instant, job)
    restored = result["volumes"]
    assert [v["type"] for v in restored] == ["Root", "Data"] and all(v["status"] == "Ready" for v in restored)
    site.session.expire_all()
    attached = {v.uuid for v in site.session.query(Volume).filter(Volume.vmInstanceUuid == vm.uuid)}
    assert attached == {v["uuid"] for v in restored}  # the VM runs from the new ones...
    assert site.session.get_one(Volume, root.uuid).vmInstanceUuid is None  # ...its former ones detached, kept
    for new, old in zip(restored, (root, data), strict=True):
        assert raw_bytes(Path(new["installPath"])) == raw_bytes(Path(old.installPath))


def test_what_the_request_refuses(site: Site) -> None:
    site.storage()
    vm = site.vm(state="Running")
    volume = site.volume("root.raw", size=MiB, vm=vm, kind="Root")
    backup = site.backup(volume, force=True)
    site.refused(
        InvalidArgument, lambda: instant.request_instant_volume(site.session, backup.uuid, {"attachTimeout": -1}, None)
    )
    site.refused(
        InvalidArgument,
        lambda: instant.request_instant_volume(site.session, backup.uuid, {"bandwidthLimit": "x"}, None),
    )
    site.refused(
        PathNotAllowed,
        lambda: instant.request_instant_volume(site.session, backup.uuid, {"installPath": "/etc/x.qcow2"}, None),
    )
    site.refused(
        InvalidArgument,
        lambda: instant.request_instant_volume(
            site.session, backup.uuid, {"installPath": str(site.tmp / "x.raw")}, None
        ),
    )
    group_backup = site.session.get_one(VolumeBackup, backup.uuid)
    group_backup.groupUuid = "g" * 32
    site.session.commit()
    site.refused(Conflict, lambda: instant.request_instant_vm(site.session, "g" * 32, {}, None))  # the VM runs
    assert site.count(Volume) == 1  # nothing was registered


def test_a_worker_that_dies_fails_streaming_volumes_and_forgets_unmade_ones(site: Site) -> None:
    from shared.apijobs import fail_job
    from shared.catalog import db

    site.storage()
    backup = site.backup(site.volume("data.raw", size=MiB))
    made = instant.request_instant_volume(site.session, backup.uuid, {}, None)
    unmade = instant.request_instant_volume(site.session, backup.uuid, {}, None)
    site.session.get_one(Volume, made.resourceUuid).status = "Streaming"  # its overlay was in use
    site.session.commit()
    with db.session() as worker:  # as the worker's main process records a pool process's death
        for job in (made, unmade):
            fail_job(worker, worker.get_one(ApiJob, job.uuid), code="WORKER_LOST", description="died")
    site.session.expire_all()
    assert site.session.get_one(Volume, made.resourceUuid).status == "Failed"
    assert site.session.get(Volume, unmade.resourceUuid) is None
