"""shared.service.jobgroups: job groups, their targets, standalone jobs and triggers."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from shared.catalog.models import SchedulerJob, SchedulerJobGroupTriggerRef, new_uuid
from shared.errors import BlockvaultError, Conflict, InvalidArgument, NotFound
from shared.schedule import TriggerSpec
from shared.service import jobgroups
from tests.shared.service.conftest import Site


def test_check_job_data_keeps_what_it_knows_checked(site: Site) -> None:
    storages = [site.storage("a").uuid, site.storage("b", role="standby").uuid]
    data = {
        "backupStorageUuids": storages,
        "fullBackupInterval": 7,
        "bandwidthLimit": 1024,
        "retention": {"keepLast": 3, "keepDaily": 0},
    }
    assert jobgroups.check_job_data(site.session, data) == data
    assert jobgroups.check_job_data(site.session, None) == {}
    assert jobgroups.check_job_data(site.session, {"bandwidthLimit": None}) == {}


BAD_JOB_DATA: list[tuple[Any, type[BlockvaultError]]] = [
    ([], InvalidArgument),
    ({"keepLast": 1}, InvalidArgument),  # retention belongs under "retention"
    ({"backupStorageUuids": "a"}, InvalidArgument),
    ({"backupStorageUuids": []}, InvalidArgument),
    ({"backupStorageUuids": [1]}, InvalidArgument),
    ({"backupStorageUuids": ["a", "a"]}, InvalidArgument),
    ({"backupStorageUuids": ["0" * 32]}, NotFound),
    ({"fullBackupInterval": -1}, InvalidArgument),
    ({"fullBackupInterval": True}, InvalidArgument),
    ({"fullBackupInterval": "2"}, InvalidArgument),
    ({"bandwidthLimit": 0}, InvalidArgument),
    ({"retention": 3}, InvalidArgument),
    ({"retention": {"keepYearly": 1}}, InvalidArgument),
    ({"retention": {"keepLast": -1}}, InvalidArgument),
]


def test_check_job_data_refuses_what_it_does_not_know(site: Site) -> None:
    for data, error in BAD_JOB_DATA:
        with pytest.raises(error) as caught:
            jobgroups.check_job_data(site.session, data)
        assert type(caught.value) is error, data


counts = st.integers(min_value=0, max_value=10**6)
job_data = st.fixed_dictionaries(
    {},
    optional={
        "fullBackupInterval": counts,
        "bandwidthLimit": st.one_of(st.none(), st.integers(min_value=1, max_value=10**9)),
        "retention": st.dictionaries(st.sampled_from(sorted(jobgroups.RETENTION_KEYS)), counts),
    },
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=job_data)
def test_check_job_data_accepts_what_it_returns(site: Site, data: dict[str, Any]) -> None:
    checked = jobgroups.check_job_data(site.session, data)
    assert jobgroups.check_job_data(site.session, checked) == checked


def test_group_params_reads_the_inventory_spelling_as_zstacks() -> None:
    assert jobgroups.group_params({"jobType": "vmBackup", "jobData": {}, "name": "n"}) == {
        "type": "vmBackup",
        "parameters": {},
        "name": "n",
    }
    with pytest.raises(InvalidArgument, match="give type or jobType"):
        jobgroups.group_params({"type": "vmBackup", "jobType": "volumeBackup"})


def test_create_and_update_group(site: Site) -> None:
    with pytest.raises(InvalidArgument, match="name"):
        jobgroups.create_group(site.session, {"type": "vmBackup"})
    with pytest.raises(InvalidArgument, match="type"):
        jobgroups.create_group(site.session, {"name": "g", "type": "fileBackup"})
    group = jobgroups.create_group(site.session, {"name": "g", "type": "vmBackup", "parameters": {"retention": {}}})
    assert (group.jobType, group.jobData, group.state) == ("vmBackup", {"retention": {}}, "Enabled")

    jobgroups.update_group(site.session, group, {"state": "disable", "name": "h", "parameters": {"bandwidthLimit": 5}})
    assert (group.state, group.name, group.jobData) == ("Disabled", "h", {"bandwidthLimit": 5})
    with pytest.raises(InvalidArgument, match="state"):
        jobgroups.update_group(site.session, group, {"state": "paused"})


def test_add_targets_makes_one_job_per_new_target(site: Site) -> None:
    group = jobgroups.create_group(site.session, {"name": "g", "type": "volumeBackup"})
    first, second = site.volume("one.raw"), site.volume("two.raw")

    made = jobgroups.add_targets(site.session, group, [first.uuid, first.uuid])
    again = jobgroups.add_targets(site.session, group, [first.uuid, second.uuid])

    assert [(j.name, j.targetResourceUuid, j.jobType) for j in made] == [("g/one.raw", first.uuid, "volumeBackup")]
    assert [j.targetResourceUuid for j in again] == [second.uuid]
    assert jobgroups.remove_targets(site.session, group, [first.uuid, new_uuid()]) == 1
    site.session.flush()
    remaining = site.session.scalars(select(SchedulerJob.targetResourceUuid)).all()
    assert remaining == [second.uuid]


def test_add_targets_refuses_targets_the_group_cannot_back_up(site: Site) -> None:
    volumes = jobgroups.create_group(site.session, {"name": "v", "type": "volumeBackup"})
    vms = jobgroups.create_group(site.session, {"name": "m", "type": "vmBackup"})
    catalog = jobgroups.create_group(site.session, {"name": "c", "type": "databaseBackup"})
    creating = site.volume(status="Creating")
    for group, targets, error in (
        (volumes, "not a list", InvalidArgument),
        (volumes, [], InvalidArgument),
        (volumes, [new_uuid()], NotFound),
        (volumes, [creating.uuid], Conflict),
        (vms, [new_uuid()], NotFound),
        (catalog, [site.vm().uuid], InvalidArgument),
    ):
        with pytest.raises(error) as caught:
            jobgroups.add_targets(site.session, group, targets)  # type: ignore[arg-type]
        assert type(caught.value) is error, (group.jobType, targets)
    assert site.count(SchedulerJob) == 0


def test_a_standalone_job_joins_and_leaves_a_group(site: Site) -> None:
    volume = site.volume()
    group = jobgroups.create_group(site.session, {"name": "g", "type": "volumeBackup"})
    group.projectUuid = "p1"
    params = {"name": "j", "type": "volumeBackup", "targetResourceUuid": volume.uuid, "parameters": {}}
    job = jobgroups.create_job(site.session, params)
    assert (job.schedulerJobGroupUuid, job.jobData) == (None, {})

    jobgroups.add_jobs(site.session, group, [job])
    assert (job.schedulerJobGroupUuid, job.projectUuid) == (group.uuid, "p1")
    jobgroups.remove_jobs(site.session, group, [job])
    assert (job.schedulerJobGroupUuid, job.projectUuid) == (None, "p1")
    with pytest.raises(NotFound):
        jobgroups.remove_jobs(site.session, group, [job])


def test_add_jobs_adds_none_when_one_is_refused(site: Site) -> None:
    group = jobgroups.create_group(site.session, {"name": "g", "type": "volumeBackup"})
    other = jobgroups.create_group(site.session, {"name": "o", "type": "volumeBackup"})
    vms = jobgroups.create_group(site.session, {"name": "m", "type": "vmBackup"})
    one, two = site.volume("one.raw"), site.volume("two.raw")
    (taken,) = jobgroups.add_targets(site.session, group, [one.uuid])

    def job(target: str) -> SchedulerJob:
        return jobgroups.create_job(site.session, {"name": "j", "type": "volumeBackup", "targetResourceUuid": target})

    fine, duplicate = job(two.uuid), job(one.uuid)
    with pytest.raises(Conflict, match="has a job for"):
        jobgroups.add_jobs(site.session, group, [fine, duplicate])
    with pytest.raises(Conflict, match="is in job group"):
        jobgroups.add_jobs(site.session, other, [fine, taken])
    with pytest.raises(InvalidArgument, match="is a volumeBackup job"):
        jobgroups.add_jobs(site.session, vms, [fine])
    assert (fine.schedulerJobGroupUuid, duplicate.schedulerJobGroupUuid) == (None, None)


def test_create_job_and_update_job_check_their_fields(site: Site) -> None:
    volume = site.volume()
    for params, error in (
        ({"type": "volumeBackup", "targetResourceUuid": volume.uuid}, InvalidArgument),
        ({"name": "j", "type": "x", "targetResourceUuid": volume.uuid}, InvalidArgument),
        ({"name": "j", "type": "volumeBackup"}, InvalidArgument),
        ({"name": "j", "type": "volumeBackup", "targetResourceUuid": new_uuid()}, NotFound),
    ):
        with pytest.raises(error) as caught:
            jobgroups.create_job(site.session, params)
        assert type(caught.value) is error, params
    job = jobgroups.create_job(site.session, {"name": "j", "type": "volumeBackup", "targetResourceUuid": volume.uuid})
    jobgroups.update_job(site.session, job, {"description": None, "parameters": {"fullBackupInterval": 2}})
    assert (job.description, job.jobData) == (None, {"fullBackupInterval": 2})
    with pytest.raises(InvalidArgument, match="not empty"):
        jobgroups.update_job(site.session, job, {"name": ""})


@pytest.mark.parametrize(
    "params",
    [{"name": [["a"], 1]}, {"name": None}, {"name": ""}, {"description": ["$", False]}, {"description": 3}],
)
def test_updates_take_names_and_descriptions_as_text_only(site: Site, params: dict[str, Any]) -> None:
    """A list in a text column was a database error (a 500), found by the schemathesis test."""
    volume = site.volume()
    group = jobgroups.create_group(site.session, {"name": "g", "type": "databaseBackup", "description": "d"})
    job = jobgroups.create_job(site.session, {"name": "j", "type": "volumeBackup", "targetResourceUuid": volume.uuid})
    trigger = jobgroups.create_trigger(site.session, {"name": "t", "schedulerInterval": 60, "description": "d"})
    with pytest.raises(InvalidArgument, match="must be a string"):
        jobgroups.update_group(site.session, group, params)
    with pytest.raises(InvalidArgument, match="must be a string"):
        jobgroups.update_job(site.session, job, params)
    with pytest.raises(InvalidArgument, match="must be a string"):
        jobgroups.update_trigger(site.session, trigger, params)
    assert [(row.name, row.description) for row in (group, job, trigger)] == [("g", "d"), ("j", None), ("t", "d")]
    site.session.flush()


def test_triggers_are_validated_and_attached_once(site: Site) -> None:
    with pytest.raises(InvalidArgument, match="name"):
        jobgroups.create_trigger(site.session, {"schedulerInterval": 60})
    with pytest.raises(InvalidArgument, match="schedulerInterval"):
        jobgroups.create_trigger(site.session, {"name": "t"})
    before = int(time.time())
    trigger = jobgroups.create_trigger(site.session, {"name": "t", "schedulerInterval": 60, "repeatCount": 3})
    after = int(time.time()) + 1
    spec = jobgroups.trigger_spec(trigger)
    assert spec.startTime is not None and before <= spec.startTime <= after  # no startTime: now, stored as now
    assert spec == TriggerSpec("simple", 60, 3, startTime=spec.startTime)

    jobgroups.update_trigger(
        site.session, trigger, {"schedulerType": "cron", "schedulerInterval": None, "cron": "0 3 * * *"}
    )
    assert jobgroups.trigger_spec(trigger) == TriggerSpec("cron", None, 3, startTime=spec.startTime, cron="0 3 * * *")
    with pytest.raises(InvalidArgument, match="cron"):
        jobgroups.update_trigger(site.session, trigger, {"cron": "every night"})
    assert trigger.cron == "0 3 * * *"

    group = jobgroups.create_group(site.session, {"name": "g", "type": "databaseBackup"})
    jobgroups.attach(site.session, trigger, group)
    with pytest.raises(Conflict):
        jobgroups.attach(site.session, trigger, group)
    jobgroups.detach(site.session, trigger, group)
    site.session.flush()
    with pytest.raises(NotFound):
        jobgroups.detach(site.session, trigger, group)
    assert site.count(SchedulerJobGroupTriggerRef) == 0
