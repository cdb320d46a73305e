"""shared.service.scan: the catalog rebuilt from what a storage holds."""

from __future__ import annotations

from typing import Any

from shared.catalog.models import DatabaseBackup, VmInstance, Volume, VolumeBackup
from shared.service.copies import copy_backups
from shared.service.database_backups import request_database_backup, run_database_backup
from shared.service.deletion import request_storage_job
from shared.service.scan import run_scan, scan_storage
from shared.service.volume_backups import request_vm_backup, run_volume_backups
from tests.shared.service.conftest import Site


def _columns(row: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(getattr(row, name) for name in names)


BACKUP_COLUMNS = ("uuid", "name", "volumeUuid", "type", "mode", "groupUuid", "size", "status", "parentUuid")
VOLUME_COLUMNS = ("uuid", "name", "vmInstanceUuid", "hostUuid", "type", "format", "installPath", "size")


def test_a_scan_imports_the_backups_vm_and_volumes_the_catalog_lost_and_a_second_changes_nothing(
    site: Site,
) -> None:
    storage = site.storage()
    vm = site.vm()
    root = site.volume("root.raw", vm=vm, kind="Root", seed=1)
    site.volume("data.raw", vm=vm, seed=2)
    made = request_vm_backup(site.session, root.uuid, {}, None)
    site.run(run_volume_backups, made)
    backups = [site.session.get_one(VolumeBackup, u) for u in (made.params or {})["backupUuids"]]
    volumes = [site.session.get_one(Volume, b.volumeUuid) for b in backups]
    before = [_columns(b, BACKUP_COLUMNS) for b in backups]
    paths = [site.ref(b, storage).installPath for b in backups]
    volumes_before = [_columns(v, VOLUME_COLUMNS) for v in volumes]
    vm_uuid = vm.uuid
    for row in (*backups, *volumes):
        site.session.delete(row)
    site.session.flush()
    site.session.delete(vm)
    site.session.commit()

    result = site.run(run_scan, request_storage_job(site.session, storage, "scanBackupStorage", None))

    uuids = [b[0] for b in before]
    assert (result["backups"], sorted(result["imported"]), result["importedVmInstances"]) == (
        2,
        sorted(uuids),
        [vm_uuid],
    )
    assert sorted(result["importedVolumes"]) == sorted(v[0] for v in volumes_before)
    again = [site.session.get_one(VolumeBackup, u) for u in uuids]
    assert [_columns(b, BACKUP_COLUMNS) for b in again] == before
    assert [site.ref(b, storage).installPath for b in again] == paths
    assert [_columns(site.session.get_one(Volume, v[0]), VOLUME_COLUMNS) for v in volumes_before] == volumes_before
    assert site.session.get_one(VmInstance, vm_uuid).state == "Stopped"
    second = scan_storage(site.session, storage)
    assert (second["imported"], second["importedVolumes"], second["attached"]) == ([], [], [])


def test_a_scan_links_an_incremental_backup_to_its_parent(site: Site) -> None:
    storage = site.storage()
    first, second = site.parent_and_child(site.volume())
    uuids = (first.uuid, second.uuid)
    site.session.delete(first)
    site.session.delete(second)
    site.session.commit()

    scan_storage(site.session, storage)

    parent, child = (site.session.get_one(VolumeBackup, u) for u in uuids)
    assert (parent.parentUuid, child.parentUuid, child.mode) == (None, parent.uuid, "incremental")


def test_a_backup_whose_job_died_after_its_manifest_becomes_ready(site: Site) -> None:
    storage = site.storage()
    backup = site.backup(site.volume())
    backup.status = "Failed"
    site.ref(backup, storage).status = "Failed"
    site.session.commit()

    result = scan_storage(site.session, storage)

    site.session.refresh(backup)
    assert (result["imported"], result["attached"]) == ([], [backup.uuid])
    assert (backup.status, site.ref(backup, storage).status) == ("Ready", "Ready")


def test_a_scan_of_another_storage_attaches_its_copies_and_imports_database_backups(site: Site) -> None:
    master = site.storage("master")
    backup = site.backup(site.volume())
    job = request_database_backup(site.session, {"name": "catalog"}, None)
    site.run(run_database_backup, job)
    database = site.session.get_one(DatabaseBackup, job.resourceUuid)
    metadata = dict(database.metadata_ or {})
    other = site.storage("other", role="standby")
    copy_backups(site.session, [backup], master, other)
    forgotten = next(r for r in backup.backupStorageRefs if r.backupStorageUuid == other.uuid)
    backup.backupStorageRefs.remove(forgotten)  # the catalog lost this copy
    site.session.delete(database)
    site.session.commit()

    result = scan_storage(site.session, other)  # it holds the volume backup only
    assert (result["attached"], result["importedDatabaseBackups"]) == ([backup.uuid], [])
    result = scan_storage(site.session, master)

    imported = site.session.get_one(DatabaseBackup, database.uuid)
    assert (result["importedDatabaseBackups"], imported.name, imported.status) == ([database.uuid], "catalog", "Ready")
    assert (imported.metadata_ or {})["md5"] == metadata["md5"]
    assert site.ref(backup, other).status == "Ready"


def test_a_scan_leaves_a_corrupted_copy_corrupted(site: Site) -> None:
    storage = site.storage()
    backup = site.backup(site.volume())
    site.ref(backup, storage).status = "Corrupted"  # verify found it damaged
    site.session.commit()
    scan_storage(site.session, storage)
    assert site.ref(backup, storage).status == "Corrupted"  # listing it is no proof it is whole
