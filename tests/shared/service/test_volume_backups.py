"""shared.service.volume_backups: createVolumeBackup and createVmBackup, requested in the API
and run as the host's worker runs them (offline from the files, live through QEMU, failing
over to the standby mid-way)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.catalog.models import ApiJob, Host, VolumeBackup, new_uuid, now
from shared.celery_app import VOLUME_BACKUP
from shared.errors import BlockvaultError, Conflict, InvalidArgument, NotFound, PathNotAllowed, RepositoryNotFound
from shared.service import volume_backups
from shared.service.volume_backups import request_vm_backup, request_volume_backup, run_volume_backups
from tests.conftest import qemu_write
from tests.qemu_fixtures import VmFactory
from tests.shared.service.conftest import CHUNK, Message, Site, content, overwrite


def test_a_volume_backup_is_one_job_on_the_host_queue_and_restores_byte_for_byte(site: Site) -> None:
    storage = site.storage()
    volume = site.volume()
    before = content(volume)
    job = request_volume_backup(site.session, volume.uuid, {"name": "b1"}, "account-1")
    backup = site.session.get_one(VolumeBackup, job.resourceUuid)
    assert (job.action, job.state, job.hostUuid, job.accountUuid) == (
        "createVolumeBackup",
        "Pending",
        site.host,
        "account-1",
    )
    assert job.params == {
        "backupUuids": [backup.uuid],
        "backupStorageUuid": storage.uuid,
        "mode": "auto",
        "force": False,
        "_task": VOLUME_BACKUP,
        "_queue": f"host.{site.host}",
    }
    assert site.messages() == [Message(VOLUME_BACKUP, job.uuid, f"host.{site.host}", [job.uuid])]
    assert (backup.name, backup.status, backup.size) == ("b1", "Creating", volume.size)
    assert [(r.backupStorageUuid, r.status, r.installPath) for r in backup.backupStorageRefs] == [
        (storage.uuid, "Creating", None)
    ]

    result = site.run(run_volume_backups, job)

    site.session.refresh(backup)
    assert (backup.status, backup.mode, backup.parentUuid) == ("Ready", "full", None)
    assert site.ref(backup, storage).status == "Ready"
    assert (result["uuid"], result["status"], result["metadata"]["consistency"]) == (backup.uuid, "Ready", "offline")
    assert site.restored(storage, backup) == before


def test_the_next_backup_is_incremental_on_the_last_and_stores_only_the_changed_chunk(site: Site) -> None:
    storage = site.storage()
    volume = site.volume()
    first = site.backup(volume)
    first_content = content(volume)
    overwrite(volume, 3)
    second = site.backup(volume)
    again = site.backup(volume, mode="full")

    assert (second.mode, second.parentUuid, second.newChunks) == ("incremental", first.uuid, 1)
    assert (again.mode, again.parentUuid, again.newChunks) == ("full", None, 0)
    assert site.restored(storage, first) == first_content
    assert site.restored(storage, second) == content(volume)


def test_a_qcow2_volume_is_read_incrementally_through_its_dirty_bitmap(site: Site) -> None:
    storage = site.storage()
    volume = site.volume("disk.qcow2")
    site.backup(volume)
    qemu_write(Path(volume.installPath), 5 * CHUNK + 100, 4096, 0x5A)
    second = site.backup(volume)

    assert (second.mode, second.bytesRead, second.newChunks) == ("incremental", CHUNK, 1)
    assert site.restored(storage, second) == content(volume)


def test_a_vm_backup_takes_every_volume_root_first_in_one_group(site: Site) -> None:
    storage = site.storage()
    vm = site.vm()
    data = site.volume("data.raw", vm=vm, seed=2)
    root = site.volume("root.raw", vm=vm, kind="Root", seed=3)
    job = request_vm_backup(site.session, root.uuid, {}, None)
    group = job.resourceUuid
    rows = [site.session.get_one(VolumeBackup, uuid) for uuid in (job.params or {})["backupUuids"]]
    assert (job.action, job.resourceType, (job.params or {})["groupUuid"]) == ("createVmBackup", "VmBackup", group)
    assert [(r.volumeUuid, r.groupUuid, r.status) for r in rows] == [
        (root.uuid, group, "Creating"),
        (data.uuid, group, "Creating"),
    ]

    result = site.run(run_volume_backups, job)

    assert result["groupUuid"] == group
    assert [b["uuid"] for b in result["volumeBackups"]] == [r.uuid for r in rows]
    for row, volume in zip(rows, (root, data), strict=True):
        site.session.refresh(row)
        assert row.status == "Ready"
        assert site.restored(storage, row) == content(volume)


def test_forcing_reads_a_running_vm_without_monitor_crash_consistent(site: Site) -> None:
    storage = site.storage()
    volume = site.volume(vm=site.vm(state="Running"))
    job = request_volume_backup(site.session, volume.uuid, {"force": True}, None)
    assert (job.params or {})["force"] is True

    result = site.run(run_volume_backups, job)

    assert (result["metadata"]["consistency"], result["metadata"]["live"]) == ("crash", False)
    assert site.restored(storage, site.session.get_one(VolumeBackup, result["uuid"])) == content(volume)


def test_a_running_vm_is_backed_up_live_through_its_monitor(site: Site, qemu_vm: VmFactory) -> None:
    storage = site.storage()
    path = site.volume_file("live.qcow2", fmt="qcow2")
    qemu = qemu_vm([path])
    volume = site.volume("live.qcow2", path=path, vm=site.vm(state="Running", qmp_socket=qemu.qmp_socket))
    qemu.write(0, 2 * CHUNK, CHUNK, 0x11)
    job = request_volume_backup(site.session, volume.uuid, {}, None)

    result = site.run(run_volume_backups, job)

    backup = site.session.get_one(VolumeBackup, result["uuid"])
    assert (backup.status, result["metadata"]["live"], result["metadata"]["consistency"]) == ("Ready", True, "crash")
    assert site.restored(storage, backup) == qemu.read_disk(0)


def test_request_volume_backup_refuses_what_cannot_be_backed_up_now(site: Site) -> None:
    storage = site.storage()
    volume = site.volume()

    def refused(error: type[BlockvaultError], params: dict[str, Any] | None = None, uuid: str = volume.uuid) -> None:
        site.refused(error, lambda: request_volume_backup(site.session, uuid, params or {}, None))

    refused(NotFound, uuid=new_uuid())
    refused(InvalidArgument, {"mode": "weekly"})
    refused(InvalidArgument, {"force": "yes"})
    refused(NotFound, {"backupStorageUuid": new_uuid()})
    storage.state = "Disabled"
    site.session.commit()
    refused(Conflict)  # no enabled master
    refused(Conflict, {"backupStorageUuid": storage.uuid})
    storage.state = "Enabled"
    volume.status = "Creating"
    site.session.commit()
    refused(Conflict)
    volume.status = "Ready"
    volume.vmInstanceUuid = site.vm(state="Running").uuid  # and no qmpSocket
    site.session.commit()
    refused(Conflict)
    volume.vmInstanceUuid = None
    site.session.get_one(Host, site.host).lastHeartbeat = now() - timedelta(hours=1)
    site.session.commit()
    refused(Conflict)  # the host's worker stopped heartbeating

    assert (site.count(VolumeBackup), site.count(ApiJob)) == (0, 0)


def test_request_vm_backup_refuses_what_is_not_a_whole_vm_on_one_host(site: Site) -> None:
    site.storage()
    vm = site.vm()
    root = site.volume("root.raw", vm=vm, kind="Root")
    data = site.volume("data.raw", vm=vm)
    loose_root = site.volume("loose.raw", kind="Root")
    site.refused(InvalidArgument, lambda: request_vm_backup(site.session, data.uuid, {}, None))
    site.refused(InvalidArgument, lambda: request_vm_backup(site.session, loose_root.uuid, {}, None))

    data.status = "Creating"
    site.session.commit()
    site.refused(Conflict, lambda: request_vm_backup(site.session, root.uuid, {}, None))

    data.status = "Ready"
    other = Host(name="other", status="Connected", lastHeartbeat=now())
    site.session.add(other)
    site.session.flush()
    data.hostUuid = other.uuid
    site.session.commit()
    site.refused(Conflict, lambda: request_vm_backup(site.session, root.uuid, {}, None))
    assert site.count(VolumeBackup) == 0


@pytest.mark.parametrize("escape", ["outside the roots", "symlink out of the roots"])
def test_a_volume_file_outside_the_roots_is_not_opened(site: Site, outside: Path, escape: str) -> None:
    site.storage()
    secret = outside / "secret.raw"
    secret.write_bytes(b"not a volume of this host" * 100)
    path = secret
    if escape == "symlink out of the roots":
        path = site.tmp / "innocent.raw"
        path.symlink_to(secret)
    volume = site.volume(path=path)
    job = request_volume_backup(site.session, volume.uuid, {}, None)

    failed = site.fail(run_volume_backups, job, PathNotAllowed)

    backup = site.session.get_one(VolumeBackup, job.resourceUuid)
    assert (failed.state, (failed.error or {})["code"]) == ("Failed", "PATH_NOT_ALLOWED")
    assert (backup.status, [r.status for r in backup.backupStorageRefs]) == ("Failed", ["Failed"])


def test_a_storage_gone_before_the_run_fails_the_backup(site: Site) -> None:
    storage = site.storage()
    volume = site.volume()
    job = request_volume_backup(site.session, volume.uuid, {}, None)
    site.vanish(storage)

    failed = site.fail(run_volume_backups, job, RepositoryNotFound)

    backup = site.session.get_one(VolumeBackup, job.resourceUuid)
    assert (failed.state, backup.status, [r.status for r in backup.backupStorageRefs]) == (
        "Failed",
        "Failed",
        ["Failed"],
    )


def test_a_master_gone_mid_way_hands_the_rest_of_the_vm_to_the_standby(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    master = site.storage("master")
    standby = site.storage("standby", role="standby")
    vm = site.vm()
    root = site.volume("root.raw", vm=vm, kind="Root", seed=4)
    data = site.volume("data.raw", vm=vm, seed=5)
    job = request_vm_backup(site.session, root.uuid, {}, None)

    def reporter(job_uuid: str) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            if done > total // 2 and (site.tmp / "master").exists():  # the second volume has begun
                site.vanish(master)

        return report

    monkeypatch.setattr(volume_backups, "progress_reporter", reporter)
    result = site.run(run_volume_backups, job)

    first, second = (site.session.get_one(VolumeBackup, b["uuid"]) for b in result["volumeBackups"])
    site.session.refresh(master)
    site.session.refresh(standby)
    assert (standby.role, master.role, master.status) == ("master", "standby", "Disconnected")
    assert [r.backupStorageUuid for r in first.backupStorageRefs] == [master.uuid]
    assert [(r.backupStorageUuid, r.status) for r in second.backupStorageRefs] == [(standby.uuid, "Ready")]
    assert (first.status, second.status) == ("Ready", "Ready")
    assert site.restored(standby, second) == content(data)
