"""shared.service.quotas: per-project quotas on stored bytes and backup count, checked when a
backup starts (by the API and by a scheduled run, whose history row says why), and shown with
the usage in the project's inventory."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sqlalchemy import select

from shared.catalog.models import ApiJob, Project, SchedulerJobHistory, Volume, VolumeBackup
from shared.errors import InvalidArgument, QuotaExceeded
from shared.inventory import inventory
from shared.service import jobgroups, quotas
from shared.service.scheduled_runs import MANUAL, fire, run_scheduled
from shared.service.volume_backups import request_vm_backup, request_volume_backup
from tests.shared.service.conftest import Site


def _project(site: Site, *volumes: Volume) -> Project:
    project = Project(name=f"p-{len(volumes)}")
    site.session.add(project)
    site.session.flush()
    for volume in volumes:
        volume.projectUuid = project.uuid
    site.session.commit()
    return project


def test_the_backup_count_quota_admits_up_to_its_limit(site: Site) -> None:
    site.storage()
    volume = site.volume()
    project = _project(site, volume)
    quotas.set_quotas(project, {"quotaBackupCount": 2})
    site.session.commit()
    site.backup(volume)
    assert inventory(site.session, project)["usedBackupCount"] == 1
    site.backup(volume)  # one under the limit: it starts

    jobs = site.count(ApiJob)
    error = site.refused(QuotaExceeded, lambda: request_volume_backup(site.session, volume.uuid, {}, None))
    assert (error.code, error.http_status) == ("QUOTA_EXCEEDED", 409)
    assert str(error) == f"project {project.uuid}: quota quotaBackupCount is 2, 2 used: backup refused"
    assert (site.count(ApiJob), site.count(VolumeBackup)) == (jobs, 2)

    quotas.set_quotas(site.session.get_one(Project, project.uuid), {"quotaBackupCount": 3})
    site.session.commit()
    site.backup(volume)
    assert site.count(VolumeBackup) == 3


def test_the_stored_bytes_quota_counts_what_backups_wrote(site: Site) -> None:
    site.storage()
    volume = site.volume()
    project = _project(site, volume)
    first = site.backup(volume)
    stored = int(first.bytesWritten or 0)
    assert stored > 0
    assert inventory(site.session, project)["usedBackupBytes"] == stored

    quotas.set_quotas(project, {"quotaBackupBytes": stored + 1})  # just under it: a backup starts
    site.session.commit()
    quotas.check(site.session, project.uuid, "backup")
    quotas.set_quotas(site.session.get_one(Project, project.uuid), {"quotaBackupBytes": stored})  # at it: refused
    site.session.commit()
    error = site.refused(QuotaExceeded, lambda: request_volume_backup(site.session, volume.uuid, {}, None))
    assert str(error) == f"project {project.uuid}: quota quotaBackupBytes is {stored}, {stored} used: backup refused"
    assert inventory(site.session, site.session.get_one(Project, project.uuid))["quotaBackupBytes"] == stored


def test_a_vm_backup_counts_once_and_is_refused_over_the_quota(site: Site) -> None:
    site.storage()
    vm = site.vm()
    root = site.volume("root.raw", vm=vm, kind="Root")
    data = site.volume("data.raw", vm=vm, seed=2)
    project = _project(site, root, data)
    vm.projectUuid = project.uuid
    quotas.set_quotas(project, {"quotaBackupCount": 1})
    site.session.commit()
    job = request_vm_backup(site.session, root.uuid, {}, None)
    assert inventory(site.session, site.session.get_one(Project, project.uuid))["usedBackupCount"] == 1
    assert job.resourceType == "VmBackup"
    site.refused(QuotaExceeded, lambda: request_vm_backup(site.session, root.uuid, {}, None))


def test_a_scheduled_backup_over_quota_fails_with_a_history_row_saying_why(site: Site) -> None:
    site.storage()
    volume = site.volume()
    project = _project(site, volume)
    quotas.set_quotas(project, {"quotaBackupCount": 0})
    group = jobgroups.create_group(site.session, {"name": "quota", "type": "volumeBackup", "parameters": {}})
    jobgroups.add_targets(site.session, group, [volume.uuid])
    site.session.commit()
    fire(site.session, group, MANUAL, datetime(2026, 1, 1, 3, 0, tzinfo=UTC))
    (job,) = site.session.scalars(select(ApiJob).where(ApiJob.action == "schedulerJob")).all()

    failed = site.fail(run_scheduled, job, QuotaExceeded)

    history = site.session.scalars(select(SchedulerJobHistory)).one()
    error = json.loads(history.resultDump or "")["error"]
    assert (failed.state, history.success, error["code"]) == ("Failed", False, "QUOTA_EXCEEDED")
    assert "quota quotaBackupCount is 0, 0 used: scheduled backup refused" in error["description"]
    assert site.count(VolumeBackup) == 0


def test_quotas_take_whole_numbers_or_null(site: Site) -> None:
    project = _project(site)
    for bad in (
        {},
        {"quotaBackupCount": -1},
        {"quotaBackupBytes": 1.5},
        {"quotaBackupBytes": "10"},
        {"quotaBackupCount": True},
        {"quotaBackupBytes": 2**63},
        {"quota": 3},
    ):
        site.refused(InvalidArgument, lambda bad=bad: quotas.set_quotas(project, bad))
    quotas.set_quotas(project, {"quotaBackupBytes": 10, "quotaBackupCount": None})
    assert (project.quotaBackupBytes, project.quotaBackupCount) == (10, None)
    quotas.check(site.session, None, "backup")  # no project: no quota
