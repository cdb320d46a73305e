"""shared.service.copies: sync/recover between storages, standby replication, the catch-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.catalog.models import ApiJob, VolumeBackup, new_uuid
from shared.celery_app import STORAGE_QUEUE, STORAGE_SYNC
from shared.errors import BackendError, BlockvaultError, Conflict, InvalidArgument, NotFound
from shared.repository.repo import parse_install_path
from shared.service.copies import catch_up, copy_backups, replicate, request_sync, run_sync
from shared.service.rows import ref_on
from shared.service.volume_backups import request_vm_backup, run_volume_backups
from tests.shared.service.conftest import Message, Site, content, overwrite

SYNC = "syncBackupFromImageStoreBackupStorage"
RECOVER = "recoverBackupFromImageStoreBackupStorage"


def test_a_sync_is_one_storage_job_and_copies_the_backup_byte_for_byte(site: Site) -> None:
    master = site.storage("master")
    volume = site.volume()
    backup = site.backup(volume)
    other = site.storage("other", role="standby")  # registered after the backup: it holds nothing

    job = request_sync(
        site.session, SYNC, [backup], {"dstBackupStorageUuid": other.uuid, "bandwidthLimit": 10**9}, None
    )

    assert (job.action, job.resourceUuid, job.resourceType) == (SYNC, backup.uuid, "VolumeBackupSync")
    assert job.params == {
        "backupUuids": [backup.uuid],
        "srcBackupStorageUuid": master.uuid,
        "dstBackupStorageUuid": other.uuid,
        "bandwidthLimit": 10**9,
        "_task": STORAGE_SYNC,
        "_queue": STORAGE_QUEUE,
    }
    assert site.sent(job) == Message(STORAGE_SYNC, job.uuid, STORAGE_QUEUE, [job.uuid])
    result = site.run(run_sync, job)

    site.session.refresh(backup)
    copy = site.ref(backup, other)
    assert copy.status == "Ready"
    assert parse_install_path(copy.installPath) == (
        other.repositoryUuid,
        parse_install_path(site.ref(backup, master).installPath)[1],
    )
    assert (result["chunksCopied"], result["volumeBackupUuids"]) == (backup.chunks, [backup.uuid])
    assert site.restored(other, backup) == content(volume)


def test_a_copy_sends_only_the_chunks_the_target_lacks(site: Site) -> None:
    master = site.storage("master")
    volume = site.volume()
    first = site.backup(volume)
    target = site.storage("target", role="standby")
    copied = copy_backups(site.session, [first], master, target)
    again = copy_backups(site.session, [first], master, target)
    overwrite(volume, 7)
    target.state = "Disabled"  # (no replication: the copy below does it)
    site.session.commit()
    second = site.backup(volume)
    incremental = copy_backups(site.session, [second], master, target)

    assert (copied["chunksCopied"], again["chunksCopied"], incremental["chunksCopied"]) == (first.chunks, 0, 1)
    assert site.restored(target, second) == content(volume)


def test_a_vm_backup_is_synced_as_one_job_named_by_its_group(site: Site) -> None:
    master = site.storage("master")
    vm = site.vm()
    root = site.volume("root.raw", vm=vm, kind="Root", seed=7)
    data = site.volume("data.raw", vm=vm, seed=8)
    made = request_vm_backup(site.session, root.uuid, {}, None)
    site.run(run_volume_backups, made)
    rows = [site.session.get_one(VolumeBackup, uuid) for uuid in (made.params or {})["backupUuids"]]
    target = site.storage("target", role="standby")

    action = "recoverVmBackupFromImageStoreBackupStorage"
    params = {"dstBackupStorageUuid": target.uuid, "srcBackupStorageUuid": master.uuid}
    job = request_sync(site.session, action, rows, params, None)
    site.run(run_sync, job)

    assert job.resourceUuid == made.resourceUuid
    for row, volume in zip(rows, (root, data), strict=True):
        site.session.refresh(row)
        assert site.restored(target, row) == content(volume)


def test_request_sync_refuses_bad_parameters_and_states(site: Site) -> None:
    master = site.storage("master")
    backup = site.backup(site.volume())
    target = site.storage("target", role="standby")  # registered after the backup: it holds nothing
    jobs = site.count(ApiJob)

    def refused(error: type[BlockvaultError], params: dict[str, Any], action: str = SYNC) -> None:
        site.refused(error, lambda: request_sync(site.session, action, [backup], params, None))

    dst = {"dstBackupStorageUuid": target.uuid}
    refused(InvalidArgument, {})
    refused(InvalidArgument, dst, RECOVER)  # a recover names its source
    for limit in (0, -5, "100", True, 1.5):
        refused(InvalidArgument, {**dst, "bandwidthLimit": limit})
    refused(NotFound, {"dstBackupStorageUuid": new_uuid()})
    refused(NotFound, {**dst, "srcBackupStorageUuid": new_uuid()})
    refused(InvalidArgument, {"dstBackupStorageUuid": master.uuid})  # where it is already
    refused(Conflict, {**dst, "srcBackupStorageUuid": target.uuid})  # no Ready copy there
    target.state = "Disabled"
    site.session.commit()
    refused(Conflict, dst)
    target.state = "Enabled"
    backup.status = "Deleting"
    site.session.commit()
    refused(Conflict, dst)
    backup.status = "Ready"
    site.ref(backup, master).status = "Failed"
    site.session.commit()
    refused(Conflict, dst)

    assert site.count(ApiJob) == jobs


def test_a_target_gone_mid_way_leaves_its_copy_failed_and_a_later_copy_resumes(site: Site) -> None:
    master = site.storage("master")
    volume = site.volume()
    backup = site.backup(volume)
    target = site.storage("target", role="standby")
    gone: list[Path] = []

    def progress(done: int, total: int) -> None:
        if not gone:
            gone.append(site.vanish(target))

    with pytest.raises(BackendError, match="folder missing") as caught:
        copy_backups(site.session, [backup], master, target, progress=progress)
    assert caught.type is BackendError
    site.session.expire_all()
    assert (site.ref(backup, target).status, site.ref(backup, master).status) == ("Failed", "Ready")

    gone[0].rename(site.tmp / "target")  # the share is back
    with site.repository(target) as repo:
        held = sum(1 for _ in repo.backend.list("chunks/"))
    resumed = copy_backups(site.session, [backup], master, target)

    assert (held > 0, resumed["chunksCopied"]) == (True, (backup.chunks or 0) - held)
    assert site.ref(backup, target).status == "Ready"
    assert site.restored(target, backup) == content(volume)


def test_replicate_copies_to_every_standby_that_answers(site: Site) -> None:
    master = site.storage("master")
    backup = site.backup(site.volume())
    answering = site.storage("answering", role="standby")
    silent = site.storage("silent", role="standby")
    silent.status = "Disconnected"
    site.session.commit()

    replicate(site.session, [backup], answering)  # a standby is no source
    assert ref_on(backup, answering.uuid) is None
    replicate(site.session, [backup], master)

    assert site.ref(backup, answering).status == "Ready"
    assert ref_on(backup, silent.uuid) is None


def test_catch_up_sends_one_job_per_direction_for_what_the_other_lacks(site: Site) -> None:
    master = site.storage("master")
    standby = site.storage("standby", role="standby")
    standby.state = "Disabled"  # down while the master takes a backup
    site.session.commit()
    on_master = site.backup(site.volume("a.raw", seed=1))
    standby.state = "Enabled"
    site.session.commit()
    on_standby = site.backup(site.volume("b.raw", seed=2), backupStorageUuid=standby.uuid)

    sent = catch_up(site.session)
    assert catch_up(site.session) == []  # the jobs are still pending: not sent twice

    jobs = [site.session.get_one(ApiJob, uuid) for uuid in sent]
    assert [(j.action, j.resourceUuid, (j.params or {})["backupUuids"]) for j in jobs] == [
        ("replicateBackupStorage", standby.uuid, [on_master.uuid]),
        ("replicateBackupStorage", master.uuid, [on_standby.uuid]),
    ]
    assert [(j.params or {})["srcBackupStorageUuid"] for j in jobs] == [master.uuid, standby.uuid]
    for job in jobs:
        site.run(run_sync, job)
        site.finish(job, {})
    assert catch_up(site.session) == []
    for backup in (on_master, on_standby):
        site.session.refresh(backup)
        assert [site.ref(backup, s).status for s in (master, standby)] == ["Ready", "Ready"]
