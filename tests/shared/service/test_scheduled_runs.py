"""shared.service.scheduled_runs: fires (one job per target, once), ticks at explicit times,
the run of one target in a worker (copies, full every n, retention) and its history row."""

from __future__ import annotations

import json
import uuid as uuidlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from shared.catalog.models import (
    ApiJob,
    DatabaseBackup,
    Host,
    SchedulerFire,
    SchedulerJob,
    SchedulerJobGroup,
    SchedulerJobHistory,
    SchedulerTrigger,
    VmInstance,
    Volume,
    VolumeBackup,
    now,
)
from shared.celery_app import SCHEDULER_RUN, STORAGE_QUEUE
from shared.errors import PathNotAllowed
from shared.schedule import to_seconds
from shared.service import jobgroups
from shared.service.rows import manifest_id
from shared.service.scheduled_runs import ID_NAMESPACE, MANUAL, fire, run_id, run_now, run_scheduled, tick
from tests.shared.service.conftest import Site, content

T0 = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _group(site: Site, kind: str, targets: list[str], **data: Any) -> SchedulerJobGroup:
    group = jobgroups.create_group(site.session, {"name": "nightly", "type": kind, "parameters": data})
    if targets:
        jobgroups.add_targets(site.session, group, targets)
    site.session.commit()
    return group


def _trigger(site: Site, group: SchedulerJobGroup, **spec: Any) -> SchedulerTrigger:
    trigger = jobgroups.create_trigger(site.session, {"name": "hourly", **spec})
    jobgroups.attach(site.session, trigger, group)
    site.session.commit()
    return trigger


def _jobs(site: Site) -> list[ApiJob]:
    return list(site.session.scalars(select(ApiJob).where(ApiJob.action == "schedulerJob").order_by(ApiJob.createDate)))


def _job_of(site: Site, group: SchedulerJobGroup, target: str) -> SchedulerJob:
    return site.session.scalars(
        select(SchedulerJob).where(
            SchedulerJob.schedulerJobGroupUuid == group.uuid, SchedulerJob.targetResourceUuid == target
        )
    ).one()


def _run(site: Site, job: ApiJob) -> dict[str, Any]:
    """One scheduled run to its end, history row included."""
    result = site.run(run_scheduled, job)
    site.finish(job, result)
    return result


def test_a_fire_makes_one_job_per_target_once(site: Site) -> None:
    volumes = [site.volume(f"v{i}.raw") for i in range(2)]
    group = _group(site, "volumeBackup", [v.uuid for v in volumes], retention={"keepLast": 2})
    trigger = _trigger(site, group, schedulerInterval=3600)

    created = fire(site.session, group, trigger.uuid, T0)
    again = fire(site.session, group, trigger.uuid, T0)

    jobs = {job.resourceUuid: job for job in _jobs(site)}
    assert (created, again, len(jobs)) == (2, 0, 2)
    for volume in volumes:
        job = jobs[volume.uuid]
        assert (job.uuid, job.state, job.hostUuid) == (
            run_id(group.uuid, trigger.uuid, T0, volume.uuid),
            "Pending",
            site.host,
        )
        assert job.params == {
            "schedulerJobGroupUuid": group.uuid,
            "schedulerJobUuid": _job_of(site, group, volume.uuid).uuid,
            "triggerUuid": trigger.uuid,
            "targetResourceUuid": volume.uuid,
            "jobType": "volumeBackup",
            "jobData": {"retention": {"keepLast": 2}},
            "fireTime": T0.isoformat(),
            "_task": SCHEDULER_RUN,
            "_queue": f"host.{site.host}",
        }
    assert sorted(m.id for m in site.messages()) == sorted(j.uuid for j in jobs.values())
    record = site.session.scalars(select(SchedulerFire)).one()
    assert (record.done, record.manual) == (True, False)
    assert fire(site.session, group, trigger.uuid, T0 + HOUR) == 2


def test_a_fire_fails_at_once_the_targets_that_cannot_run(site: Site) -> None:
    other = Host(name="other", status="Disconnected")
    site.session.add(other)
    site.session.commit()
    fine, gone, elsewhere, disabled = (site.volume(f"v{i}.raw") for i in range(4))
    elsewhere.hostUuid = other.uuid
    group = _group(site, "volumeBackup", [v.uuid for v in (fine, gone, elsewhere, disabled)])
    _job_of(site, group, disabled.uuid).state = "Disabled"
    site.session.delete(gone)
    site.session.commit()

    assert fire(site.session, group, MANUAL, T0) == 3

    states = {j.resourceUuid: (j.state, (j.error or {}).get("code")) for j in _jobs(site)}
    assert states == {
        fine.uuid: ("Pending", None),
        gone.uuid: ("Failed", "NOT_FOUND"),
        elsewhere.uuid: ("Failed", "CONFLICT"),
    }
    histories = site.session.scalars(select(SchedulerJobHistory)).all()
    assert sorted((h.targetResourceUuid, h.success) for h in histories) == sorted(
        [(gone.uuid, False), (elsewhere.uuid, False)]
    )
    assert [m.id for m in site.messages()] == [run_id(group.uuid, MANUAL, T0, fine.uuid)]


def test_run_now_fires_at_once_and_only_the_jobs_named(site: Site) -> None:
    volumes = [site.volume(f"v{i}.raw") for i in range(2)]
    group = _group(site, "volumeBackup", [v.uuid for v in volumes])
    chosen = _job_of(site, group, volumes[1].uuid)

    assert run_now(site.session, group, only_jobs=[chosen.uuid]) == 1

    (job,) = _jobs(site)
    record = site.session.scalars(select(SchedulerFire)).one()
    assert (job.resourceUuid, (job.params or {})["triggerUuid"]) == (volumes[1].uuid, None)
    assert (record.schedulerTriggerUuid, record.manual) == (MANUAL, True)


def test_a_database_backup_group_fires_one_catalog_job(site: Site) -> None:
    group = _group(site, "databaseBackup", [])
    assert fire(site.session, group, MANUAL, T0) == 1
    (job,) = _jobs(site)
    assert (job.resourceUuid, job.hostUuid, (job.params or {})["_queue"]) == (group.uuid, None, STORAGE_QUEUE)


def test_tick_fires_each_due_time_once_and_missed_ones_as_one(site: Site) -> None:
    volume = site.volume()
    group = _group(site, "volumeBackup", [volume.uuid])
    trigger = _trigger(site, group, schedulerInterval=3600, startTime=to_seconds(T0))

    tick(site.session, T0 + timedelta(seconds=10))
    tick(site.session, T0 + timedelta(seconds=20))
    tick(site.session, T0 + 3 * HOUR + timedelta(seconds=5))  # the beat was down over two fire times
    wait = tick(site.session, T0 + 4 * HOUR - timedelta(seconds=2))
    trigger.state = "Disabled"
    site.session.commit()
    tick(site.session, T0 + 5 * HOUR)

    assert [(j.params or {})["fireTime"] for j in _jobs(site)] == [T0.isoformat(), (T0 + 3 * HOUR).isoformat()]
    assert wait == 2.0


def test_tick_finishes_a_fire_a_dead_beat_left_half_done(site: Site) -> None:
    volume = site.volume()
    group = _group(site, "volumeBackup", [volume.uuid])
    record = SchedulerFire(
        schedulerTriggerUuid=MANUAL,
        schedulerJobGroupUuid=group.uuid,
        fireTime=T0,
        createDate=now() - timedelta(minutes=2),
    )
    site.session.add(record)
    site.session.commit()

    tick(site.session)

    site.session.refresh(record)
    assert [j.uuid for j in _jobs(site)] == [run_id(group.uuid, MANUAL, T0, volume.uuid)]
    assert record.done is True


def test_a_scheduled_backup_run_takes_the_backup_and_writes_its_history(site: Site) -> None:
    storage = site.storage()
    volume = site.volume()
    group = _group(site, "volumeBackup", [volume.uuid])
    fire(site.session, group, MANUAL, T0)
    (job,) = _jobs(site)

    result = _run(site, job)

    (backup,) = site.session.scalars(select(VolumeBackup)).all()
    assert result["volumeBackupUuids"] == [backup.uuid]
    assert (backup.status, backup.schedulerJobUuid, backup.name) == (
        "Ready",
        _job_of(site, group, volume.uuid).uuid,
        "nightly-2026-01-01T03:00:00",
    )
    assert site.restored(storage, backup) == content(volume)
    history = site.session.scalars(select(SchedulerJobHistory)).one()
    assert (history.success, history.executeTime, history.triggerUuid) == (True, T0, None)
    assert json.loads(history.requestDump or "") == {
        "fireTime": T0.isoformat(),
        "jobData": {},
        "jobType": "volumeBackup",
        "targetResourceUuid": volume.uuid,
    }
    assert json.loads(history.resultDump or "") == json.loads(json.dumps(result, default=str))


def test_runs_take_a_full_backup_every_n_copy_it_and_keep_what_retention_says(site: Site) -> None:
    first = site.storage("first")
    second = site.storage("second", role="standby")
    second.state = "Disabled"  # no replication behind the run's back: the run copies
    volume = site.volume()
    group = _group(
        site,
        "volumeBackup",
        [volume.uuid],
        backupStorageUuids=[first.uuid, second.uuid],
        fullBackupInterval=2,
        retention={"keepLast": 2},
    )
    results = []
    for index in range(3):
        fire(site.session, group, MANUAL, T0 + index * HOUR)
        results.append(_run(site, _jobs(site)[-1]))

    oldest = results[0]["volumeBackupUuids"][0]
    assert [r["mode"] for r in results] == [["full"], ["incremental"], ["full"]]
    assert [[s["success"] for s in r["synced"]] for r in results] == [[True], [True], [True]]
    assert results[2]["retention"] == {"kept": 2, "removed": [oldest]}
    assert site.session.get(VolumeBackup, oldest) is None
    newest = site.session.get_one(VolumeBackup, results[2]["volumeBackupUuids"][0])
    kept = [site.session.get_one(VolumeBackup, r["volumeBackupUuids"][0]) for r in results[1:]]
    for storage in (first, second):
        with site.repository(storage) as repo:
            assert sorted(repo.manifest_ids()) == sorted(manifest_id(site.ref(b, storage)) for b in kept)
    assert site.restored(second, newest) == content(volume)


def test_a_copy_that_fails_does_not_fail_the_run(site: Site) -> None:
    first = site.storage("first")
    second = site.storage("second", role="standby")
    volume = site.volume()
    group = _group(site, "volumeBackup", [volume.uuid], backupStorageUuids=[first.uuid, second.uuid])
    fire(site.session, group, MANUAL, T0)
    site.vanish(second)

    result = _run(site, _jobs(site)[0])

    backup = site.session.get_one(VolumeBackup, result["volumeBackupUuids"][0])
    assert [(s["backupStorageUuid"], s["success"]) for s in result["synced"]] == [(second.uuid, False)]
    assert (backup.status, site.ref(backup, first).status) == ("Ready", "Ready")


def test_a_run_goes_to_the_new_master_when_its_first_storage_was_demoted(site: Site) -> None:
    old = site.storage("old")
    new = site.storage("new", role="standby")
    volume = site.volume()
    group = _group(site, "volumeBackup", [volume.uuid], backupStorageUuids=[old.uuid])
    old.role, new.role = "standby", "master"  # a failover happened since the group was made
    site.session.commit()
    fire(site.session, group, MANUAL, T0)

    result = _run(site, _jobs(site)[0])

    assert (result["backupStorageUuid"], [s["backupStorageUuid"] for s in result["synced"]]) == (
        new.uuid,
        [old.uuid],
    )


def test_a_vm_run_backs_up_every_volume_as_one_vm_backup(site: Site) -> None:
    site.storage()
    vm = site.vm()
    root = site.volume("root.raw", vm=vm, kind="Root")
    data = site.volume("data.raw", vm=vm, seed=2)
    group = _group(site, "vmBackup", [vm.uuid])
    fire(site.session, group, MANUAL, T0)
    (job,) = _jobs(site)

    result = _run(site, job)

    rows = [site.session.get_one(VolumeBackup, u) for u in result["volumeBackupUuids"]]
    expected = uuidlib.uuid5(ID_NAMESPACE, job.uuid).hex
    assert result["groupUuid"] == expected
    assert [(r.volumeUuid, r.groupUuid, r.status) for r in rows] == [
        (root.uuid, expected, "Ready"),
        (data.uuid, expected, "Ready"),
    ]
    assert site.session.get_one(VmInstance, vm.uuid).uuid == job.resourceUuid


def test_a_failed_run_leaves_its_backup_failed_and_a_failed_history(site: Site) -> None:
    site.storage()
    volume = site.volume()
    group = _group(site, "volumeBackup", [volume.uuid])
    fire(site.session, group, MANUAL, T0)
    Path(volume.installPath).unlink()
    (job,) = _jobs(site)

    failed = site.fail(run_scheduled, job, PathNotAllowed)

    (backup,) = site.session.scalars(select(VolumeBackup)).all()
    history = site.session.scalars(select(SchedulerJobHistory)).one()
    assert ((failed.params or {})["backupUuids"], backup.status) == ([backup.uuid], "Failed")
    assert (history.success, json.loads(history.resultDump or "")["error"]["code"]) == (False, "PATH_NOT_ALLOWED")
    assert site.session.get_one(Volume, volume.uuid).status == "Ready"


def test_a_scheduled_database_backup_keeps_what_retention_says(site: Site) -> None:
    site.storage()
    group = _group(site, "databaseBackup", [], retention={"keepLast": 1})
    results = []
    for index in range(2):
        fire(site.session, group, MANUAL, T0 + index * HOUR)
        results.append(_run(site, _jobs(site)[-1]))

    older, newer = (r["databaseBackupUuid"] for r in results)
    assert results[1]["retention"] == {"removed": [older]}
    (row,) = site.session.scalars(select(DatabaseBackup)).all()
    assert (row.uuid, row.status, (row.metadata_ or {})["schedulerJobGroupUuid"]) == (newer, "Ready", group.uuid)
