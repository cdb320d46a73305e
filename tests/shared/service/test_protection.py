"""shared.service.protection: protected backups (volume, VM, database) refused by delete and
left by retention until an admin unprotects them, the marker each storage keeps, and job groups
whose backups are created protected."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from shared.catalog.models import ApiJob, DatabaseBackup, SchedulerJobGroup, SchedulerJobHistory, VolumeBackup
from shared.errors import (
    BackupLocked,
    BackupProtected,
    Conflict,
    Forbidden,
    InvalidArgument,
    RepositoryNotFound,
    UsageError,
)
from shared.repository.repo import manifest_key
from shared.service import jobgroups
from shared.service.copies import copy_backups
from shared.service.database_backups import request_database_backup, run_database_backup
from shared.service.deletion import request_delete, request_vm_delete, run_delete
from shared.service.protection import change_protection, parse_protected, why_kept
from shared.service.rows import group_backups, manifest_id
from shared.service.scan import scan_storage
from shared.service.scheduled_runs import MANUAL, fire, run_scheduled
from shared.service.volume_backups import request_vm_backup, run_volume_backups
from shared.storage import register_storage
from tests.s3_fixtures import S3Server
from tests.shared.service.conftest import Site

T0 = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)


def test_a_protected_backup_is_refused_by_delete_until_an_admin_unprotects_it(site: Site) -> None:
    master = site.storage("master")
    site.storage("standby", role="standby")
    backup = site.backup(site.volume())

    change_protection(site.session, [backup], True, admin=False)  # a member may protect
    site.session.commit()
    assert backup.protected is True
    assert _repo_marks(site, backup) == [True, True]  # the master and the standby's copy
    jobs = site.count(ApiJob)
    error = site.refused(BackupProtected, lambda: request_delete(site.session, backup.uuid, None, "Permissive", None))
    assert (error.code, error.http_status) == ("BACKUP_PROTECTED", 409)
    assert str(error) == f"volume backup {backup.uuid} is protected: delete refused until an admin unprotects it"
    site.refused(BackupProtected, lambda: request_delete(site.session, backup.uuid, [master.uuid], "Permissive", None))
    site.refused(Forbidden, lambda: change_protection(site.session, [backup], False, admin=False))
    assert (site.count(ApiJob), site.session.get_one(VolumeBackup, backup.uuid).status) == (jobs, "Ready")
    with site.repository(master) as repo:  # the repository refuses too
        refused = site.refused(BackupProtected, lambda: repo.delete_manifest(manifest_id(site.ref(backup, master))))
        assert refused.code == "BACKUP_PROTECTED"

    change_protection(site.session, [backup], False, admin=True)
    site.session.commit()
    assert _repo_marks(site, backup) == [False, False]
    uuid = backup.uuid
    site.run(run_delete, request_delete(site.session, uuid, None, "Permissive", None))
    assert site.session.get(VolumeBackup, uuid) is None


def _repo_marks(site: Site, row: VolumeBackup | DatabaseBackup) -> list[bool]:
    from shared.catalog.models import BackupStorage

    marks = []
    for ref in row.backupStorageRefs:
        with site.repository(site.session.get_one(BackupStorage, ref.backupStorageUuid)) as repo:
            marks.append(repo.is_protected(manifest_id(ref)))
    return marks


def test_protecting_takes_a_boolean_and_a_ready_backup(site: Site) -> None:
    site.storage()
    backup = site.backup(site.volume())
    for bad in ({}, {"protected": "yes"}, {"protected": 1}, {"protected": None}):
        site.refused(InvalidArgument, lambda bad=bad: parse_protected(bad))
    assert parse_protected({"protected": False}) is False
    backup.status = "Deleting"
    site.session.commit()
    site.refused(Conflict, lambda: change_protection(site.session, [backup], True, admin=True))
    assert site.session.get_one(VolumeBackup, backup.uuid).protected is False


def test_a_backup_protected_after_its_delete_was_asked_for_is_not_deleted(site: Site) -> None:
    storage = site.storage()
    backup = site.backup(site.volume())
    job = request_delete(site.session, backup.uuid, None, "Permissive", None)
    backup.protected = True  # as another API process could have, before the worker ran
    site.session.commit()

    failed = site.fail(run_delete, job, BackupProtected)

    site.session.refresh(backup)
    assert (failed.state, failed.error["code"] if failed.error else None, backup.status) == (
        "Failed",
        "BACKUP_PROTECTED",
        "Ready",
    )
    with site.repository(storage) as repo:
        assert repo.manifest_ids() == [manifest_id(site.ref(backup, storage))]


def test_a_protected_vm_backup_and_database_backup_are_refused_by_delete(site: Site) -> None:
    site.storage()
    vm = site.vm()
    volumes = [site.volume("root.raw", vm=vm, kind="Root"), site.volume("data.raw", vm=vm, seed=2)]
    group = str(site.run(run_volume_backups, request_vm_backup(site.session, volumes[0].uuid, {}, None))["groupUuid"])
    rows = group_backups(site.session, group)
    assert len(rows) == 2
    change_protection(site.session, rows, True, admin=False)
    site.session.commit()
    site.refused(BackupProtected, lambda: request_vm_delete(site.session, group, None, "Permissive", None))
    site.refused(BackupProtected, lambda: request_delete(site.session, rows[1].uuid, None, "Permissive", None))

    made = request_database_backup(site.session, {}, None)
    site.run(run_database_backup, made)
    database = site.session.get_one(DatabaseBackup, made.resourceUuid)
    change_protection(site.session, [database], True, admin=True)
    site.session.commit()
    assert _repo_marks(site, database) == [True]
    error = site.refused(
        BackupProtected,
        lambda: request_delete(site.session, database.uuid, None, "Permissive", None, model=DatabaseBackup),
    )
    assert str(error).startswith(f"database backup {database.uuid} is protected")


def _group(site: Site, kind: str, targets: list[str], **data: Any) -> SchedulerJobGroup:
    """A job group of ``kind`` on ``targets`` (its name: ``protected``)."""
    made = jobgroups.create_group(site.session, {"name": "protected", "type": kind, "parameters": data})
    jobgroups.add_targets(site.session, made, targets)
    site.session.commit()
    return made


def _runs(site: Site, group: SchedulerJobGroup, count: int, start: int = 0) -> list[dict[str, Any]]:
    results = []
    for index in range(start, start + count):
        fire(site.session, group, MANUAL, T0 + timedelta(hours=index))
        job = site.session.scalars(
            select(ApiJob).where(ApiJob.action == "schedulerJob", ApiJob.state == "Pending")
        ).one()
        result = site.run(run_scheduled, job)
        site.finish(job, result)
        results.append(result)
    return results


def test_retention_leaves_protected_backups_and_does_not_count_them(site: Site) -> None:
    site.storage()
    volume = site.volume()
    group = _group(site, "volumeBackup", [volume.uuid], retention={"keepLast": 1})
    (first,) = _runs(site, group, 1)
    oldest = site.session.get_one(VolumeBackup, first["volumeBackupUuids"][0])
    change_protection(site.session, [oldest], True, admin=False)
    site.session.commit()

    second, third = _runs(site, group, 2, start=1)

    assert second["retention"] == {"kept": 1, "removed": [], "protected": [oldest.uuid]}
    assert third["retention"] == {"kept": 1, "removed": second["volumeBackupUuids"], "protected": [oldest.uuid]}
    left = {b.uuid for b in site.session.scalars(select(VolumeBackup))}
    assert left == {oldest.uuid, *third["volumeBackupUuids"]}


def test_a_group_with_protect_backups_creates_protected_backups(site: Site) -> None:
    storage = site.storage()
    volume = site.volume()
    group = _group(site, "volumeBackup", [volume.uuid], protectBackups=True, retention={"keepLast": 1})
    results = _runs(site, group, 2)

    rows = list(site.session.scalars(select(VolumeBackup).order_by(VolumeBackup.createDate)))
    assert [(r.uuid, r.protected) for r in rows] == [(r["volumeBackupUuids"][0], True) for r in results]
    assert results[1]["retention"]["removed"] == []  # both protected: retention removes neither
    with site.repository(storage) as repo:
        assert repo.protected_ids() == {manifest_id(site.ref(r, storage)) for r in rows}
    for bad in ("maybe", 3):
        site.refused(
            InvalidArgument,
            lambda bad=bad: jobgroups.create_group(
                site.session, {"name": "x", "type": "volumeBackup", "parameters": {"protectBackups": bad}}
            ),
        )
    history = site.session.scalars(select(SchedulerJobHistory)).all()
    assert [h.success for h in history] == [True, True]
    assert json.loads(history[0].requestDump or "")["jobData"]["protectBackups"] is True


def test_a_copy_under_object_lock_is_refused_by_delete_and_left_by_retention(site: Site, s3_server: S3Server) -> None:
    local = site.storage()
    bucket = f"bv-lock-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    params = {"name": "cloud", "type": "PublicCloud", "url": f"s3://{bucket}/bv", "encryptionPassphrase": "pw"}
    plain = s3_server.make_bucket()
    refused = site.refused(
        UsageError,  # a bucket without Object Lock cannot keep the promise: refused at registration
        lambda: register_storage(
            site.session,
            {
                **params,
                **s3_server.options(),
                "url": f"s3://{plain}/bv",
                "objectLockMode": "COMPLIANCE",
                "objectLockDays": "1",
            },
        ),
    )
    assert "has no Object Lock enabled" in str(refused)
    cloud = register_storage(
        site.session, {**params, **s3_server.options(), "objectLockMode": "COMPLIANCE", "objectLockDays": 1}
    )
    site.session.commit()
    backup = site.backup(site.volume())
    copy_backups(site.session, [backup], local, cloud)

    jobs = site.count(ApiJob)
    for targets in (None, [cloud.uuid]):
        error = site.refused(
            BackupLocked, lambda t=targets: request_delete(site.session, backup.uuid, t, "Permissive", None)
        )
        assert (error.code, error.http_status) == ("BACKUP_LOCKED", 409)
        assert f"volume backup {backup.uuid} is locked on backup storage {cloud.uuid} until " in str(error)
    assert site.count(ApiJob) == jobs
    assert why_kept(site.session, [backup]) == "locked"
    site.run(
        run_delete, request_delete(site.session, backup.uuid, [local.uuid], "Permissive", None)
    )  # not locked there
    site.session.refresh(backup)
    assert [r.backupStorageUuid for r in backup.backupStorageRefs] == [cloud.uuid]
    with site.repository(cloud) as repo:
        assert repo.backend.lock_seconds == 86400.0
        assert repo.backend.locked_until(manifest_key(manifest_id(site.ref(backup, cloud)))) is not None


def test_a_scan_imports_a_protected_backup_protected(site: Site) -> None:
    storage = site.storage()
    volume = site.volume()
    kept, plain = site.backup(volume), site.backup(volume)
    change_protection(site.session, [kept], True, admin=True)
    uuids = (kept.uuid, plain.uuid)
    for row in (kept, plain):
        site.session.delete(row)
    site.session.commit()

    result = scan_storage(site.session, storage)

    assert sorted(result["imported"]) == sorted(uuids)
    assert [site.session.get_one(VolumeBackup, u).protected for u in uuids] == [True, False]
    site.refused(BackupProtected, lambda: request_delete(site.session, uuids[0], None, "Permissive", None))


def test_protecting_while_a_storage_is_gone_changes_nothing(site: Site) -> None:
    storage = site.storage()
    backup = site.backup(site.volume())
    where = site.vanish(storage)

    site.refused(RepositoryNotFound, lambda: change_protection(site.session, [backup], True, admin=False))

    assert site.session.get_one(VolumeBackup, backup.uuid).protected is False  # the API rolled back
    where.rename(site.tmp / storage.name)  # the storage is back: protecting works
    change_protection(site.session, [site.session.get_one(VolumeBackup, backup.uuid)], True, admin=False)
    site.session.commit()
    assert _repo_marks(site, site.session.get_one(VolumeBackup, backup.uuid)) == [True]
