"""shared.service.deletion: deleting backups' copies (the row goes with the last one), and the
storage jobs scan and reclaim."""

from __future__ import annotations

from pathlib import Path

from shared.catalog.models import ApiJob, BackupStorage, DatabaseBackup, VolumeBackup, new_uuid
from shared.celery_app import STORAGE_DELETE, STORAGE_GC, STORAGE_QUEUE, STORAGE_SCAN
from shared.errors import Conflict, InvalidArgument, NotFound, RepositoryNotFound
from shared.repository.repo import Repository
from shared.service.database_backups import request_database_backup, run_database_backup
from shared.service.deletion import request_delete, request_storage_job, request_vm_delete, run_delete, run_reclaim
from shared.service.rows import manifest_id
from shared.service.volume_backups import request_vm_backup, run_volume_backups
from tests.shared.service.conftest import Message, Site, content


def _chunks(repo: Repository) -> int:
    return sum(1 for _ in repo.backend.list("chunks/"))


def test_deleting_the_last_copy_removes_manifest_chunks_and_row(site: Site) -> None:
    storage = site.storage()
    backup = site.backup(site.volume())
    uuid, manifest = backup.uuid, manifest_id(site.ref(backup, storage))

    job = request_delete(site.session, backup.uuid, None, "Permissive", "account-1")
    assert (job.action, job.resourceType, backup.status) == ("deleteVolumeBackup", "VolumeBackupDelete", "Deleting")
    assert job.params == {
        "backupUuid": backup.uuid,
        "backupStorageUuids": [storage.uuid],
        "_task": STORAGE_DELETE,
        "_queue": STORAGE_QUEUE,
    }
    assert site.sent(job) == Message(STORAGE_DELETE, job.uuid, STORAGE_QUEUE, [job.uuid])
    result = site.run(run_delete, job)

    assert result == {"uuid": uuid, "deleted": True}
    assert site.session.get(VolumeBackup, uuid) is None
    with site.repository(storage) as repo:
        assert (manifest in repo.manifest_ids(), _chunks(repo)) == (False, 0)


def test_deleting_a_parent_keeps_its_incremental_child_whole(site: Site) -> None:
    storage = site.storage()
    volume = site.volume()
    parent, child = site.parent_and_child(volume)

    site.run(run_delete, request_delete(site.session, parent.uuid, None, "Permissive", None))

    assert site.restored(storage, child) == content(volume)
    with site.repository(storage) as repo:
        assert _chunks(repo) == child.chunks


def test_deleting_one_copy_keeps_the_other_and_the_row(site: Site) -> None:
    master = site.storage("master")
    standby = site.storage("standby", role="standby")
    volume = site.volume()
    backup = site.backup(volume)

    job = request_delete(site.session, backup.uuid, [master.uuid], "Enforcing", None)
    result = site.run(run_delete, job)

    site.session.refresh(backup)
    assert (backup.status, [r.backupStorageUuid for r in backup.backupStorageRefs]) == ("Ready", [standby.uuid])
    assert [r["backupStorageUuid"] for r in result["backupStorageRefs"]] == [standby.uuid]
    with site.repository(master) as repo:
        assert repo.manifest_ids() == []
    assert site.restored(standby, backup) == content(volume)


def test_request_delete_refuses_bad_modes_places_and_states(site: Site) -> None:
    master = site.storage()
    backup = site.backup(site.volume())
    jobs = site.count(ApiJob)
    site.refused(NotFound, lambda: request_delete(site.session, new_uuid(), None, "Permissive", None))
    site.refused(InvalidArgument, lambda: request_delete(site.session, backup.uuid, None, "Now", None))
    site.refused(InvalidArgument, lambda: request_delete(site.session, backup.uuid, [new_uuid()], "Permissive", None))
    for status in ("Creating", "Deleting"):
        backup.status = status
        site.session.commit()
        site.refused(Conflict, lambda: request_delete(site.session, backup.uuid, None, "Permissive", None))
    assert (site.count(ApiJob), site.ref(backup, master).status) == (jobs, "Ready")


def test_a_storage_gone_before_the_delete_leaves_the_backup_ready(site: Site) -> None:
    storage = site.storage()
    backup = site.backup(site.volume())
    job = request_delete(site.session, backup.uuid, None, "Permissive", None)
    site.vanish(storage)

    failed = site.fail(run_delete, job, RepositoryNotFound)

    site.session.refresh(backup)
    assert (failed.state, backup.status, [r.backupStorageUuid for r in backup.backupStorageRefs]) == (
        "Failed",
        "Ready",
        [storage.uuid],
    )


def test_a_vm_backup_is_deleted_whole(site: Site) -> None:
    site.storage()
    vm = site.vm()
    root = site.volume("root.raw", vm=vm, kind="Root")
    site.volume("data.raw", vm=vm, seed=2)
    made = request_vm_backup(site.session, root.uuid, {}, None)
    site.run(run_volume_backups, made)
    group = str(made.resourceUuid)
    uuids = (made.params or {})["backupUuids"]
    elsewhere = site.storage("elsewhere", role="standby")  # holds none of its copies: refused, as for one volume backup
    site.refused(InvalidArgument, lambda: request_vm_delete(site.session, group, [elsewhere.uuid], "Permissive", None))

    job = request_vm_delete(site.session, group, None, "Permissive", None)
    assert (job.action, job.resourceUuid, (job.params or {})["backupUuids"]) == ("deleteVmBackup", group, uuids)
    assert [site.session.get_one(VolumeBackup, u).status for u in uuids] == ["Deleting", "Deleting"]
    site.refused(Conflict, lambda: request_vm_delete(site.session, group, None, "Permissive", None))
    result = site.run(run_delete, job)

    assert result == {"volumeBackups": [{"uuid": u, "deleted": True} for u in uuids]}
    assert site.count(VolumeBackup) == 0
    site.refused(NotFound, lambda: request_vm_delete(site.session, group, None, "Permissive", None))


def test_a_database_backup_is_deleted_by_the_same_job(site: Site) -> None:
    storage = site.storage()
    made = request_database_backup(site.session, {}, None)
    site.run(run_database_backup, made)
    uuid = str(made.resourceUuid)

    job = request_delete(site.session, uuid, None, "Permissive", None, DatabaseBackup)
    assert (job.action, job.resourceType) == ("deleteDatabaseBackup", "DatabaseBackupDelete")
    site.run(run_delete, job)

    assert site.session.get(DatabaseBackup, uuid) is None
    with site.repository(storage) as repo:
        assert (repo.manifest_ids(), _chunks(repo)) == ([], 0)


def test_storage_jobs_run_on_the_storage_queue_of_an_enabled_storage(site: Site) -> None:
    storage = site.storage()
    scan = request_storage_job(site.session, storage, "scanBackupStorage", None)
    reclaim = request_storage_job(site.session, storage, "reclaimSpaceFromImageStore", None)
    assert (site.sent(scan).task, site.sent(reclaim).task) == (STORAGE_SCAN, STORAGE_GC)
    assert site.sent(scan).queue == site.sent(reclaim).queue == STORAGE_QUEUE
    assert scan.params == {"backupStorageUuid": storage.uuid, "_task": STORAGE_SCAN, "_queue": STORAGE_QUEUE}
    assert (reclaim.resourceUuid, reclaim.resourceType) == (storage.uuid, BackupStorage.resource_type)
    storage.state = "Disabled"
    site.session.commit()
    site.refused(Conflict, lambda: request_storage_job(site.session, storage, "scanBackupStorage", None))


def test_reclaim_deletes_exactly_the_chunks_no_backup_references(site: Site) -> None:
    storage = site.storage()
    kept = site.backup(site.volume("kept.raw", seed=1))
    dropped = site.backup(site.volume("dropped.raw", seed=2))
    with site.repository(storage) as repo:
        repo.delete_manifest(manifest_id(site.ref(dropped, storage)))

    result = site.run(run_reclaim, request_storage_job(site.session, storage, "reclaimSpaceFromImageStore", None))

    assert (result["backupStorageUuid"], result["chunksDeleted"], result["chunksKept"]) == (
        storage.uuid,
        dropped.chunks,
        kept.chunks,
    )
    assert site.restored(storage, kept) == Path(site.tmp / "kept.raw").read_bytes()
