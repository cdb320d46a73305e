"""Scheduled backups, defined: job groups (a job type and its jobData), their targets
(SchedulerJob rows, one per volume or VM), standalone jobs (ZStack's CreateSchedulerJob) and
triggers, and which triggers fire which groups. The runs themselves are
:mod:`~shared.service.scheduled_runs`'.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.catalog.models import (
    BackupStorage,
    ManagedDatabase,
    SchedulerJob,
    SchedulerJobGroup,
    SchedulerJobGroupTriggerRef,
    SchedulerTrigger,
    VmInstance,
    Volume,
    now,
)
from shared.errors import Conflict, InvalidArgument, NotFound
from shared.schedule import TriggerSpec, to_seconds, validate
from shared.service.rows import get, ready_volume, update_names

log = logging.getLogger(__name__)
BACKUP_TYPES = ("volumeBackup", "vmBackup", "databaseBackup")
MAINTENANCE_TYPES = ("verify", "reclaim", "storageSync")  # their targets are backup storages
JOB_TYPES = BACKUP_TYPES + MAINTENANCE_TYPES
ADMIN_JOB_TYPES = ("databaseBackup", "reclaim", "storageSync")  # they touch every project's rows: admins' only
BACKUP_KEYS = {
    "backupStorageUuids",
    "fullBackupInterval",
    "retention",
    "bandwidthLimit",
    "databaseUuid",
    "protectBackups",
}
JOB_DATA_KEYS: dict[str | None, set[str]] = {
    None: BACKUP_KEYS,  # a job made before its type is known (validated as a backup job's)
    **{kind: BACKUP_KEYS for kind in BACKUP_TYPES},
    "verify": {"readData", "repair", "chunksPerRun"},
    "reclaim": {"retention"},
    "storageSync": {"srcBackupStorageUuid", "bandwidthLimit"},
}
RETENTION_KEYS = {"keepLast", "keepDaily", "keepWeekly", "keepMonthly"}


# -- validation ----------------------------------------------------------------------------------
def _nonneg_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(detail=f"{name} must be a non-negative integer")
    return value


def check_job_data(session: Session, data: Any, kind: str | None = None) -> dict[str, Any]:
    """jobData as stored: validated for a group of type ``kind``, every storage known."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgument(detail="parameters (jobData) must be an object")
    unknown = set(data) - JOB_DATA_KEYS[kind]
    if unknown:
        where = f" for a {kind} group" if kind else ""
        raise InvalidArgument(detail=f"unknown jobData keys{where}: {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for flag in ("readData", "repair"):
        if flag in data:
            if not isinstance(data[flag], bool):
                raise InvalidArgument(detail=f"{flag} must be true or false")
            out[flag] = data[flag]
    if data.get("chunksPerRun") is not None:
        if _nonneg_int(data["chunksPerRun"], "chunksPerRun") == 0:
            raise InvalidArgument(detail="chunksPerRun must be at least 1 (leave it out: every chunk each run)")
        out["chunksPerRun"] = data["chunksPerRun"]
    if data.get("srcBackupStorageUuid") is not None:
        source = data["srcBackupStorageUuid"]
        if not isinstance(source, str) or session.get(BackupStorage, source) is None:
            raise NotFound(resource="backup storage", uuid=str(source))
        out["srcBackupStorageUuid"] = source
    storages = data.get("backupStorageUuids")
    if storages is not None:
        if not isinstance(storages, list) or not all(isinstance(s, str) for s in storages) or not storages:
            raise InvalidArgument(detail="backupStorageUuids must be a non-empty list of uuids")
        if len(set(storages)) != len(storages):
            raise InvalidArgument(detail="backupStorageUuids lists a storage twice")
        for uuid in storages:
            if session.get(BackupStorage, uuid) is None:
                raise NotFound(resource="backup storage", uuid=uuid)
        out["backupStorageUuids"] = storages
    if data.get("databaseUuid") is not None:  # databaseBackup groups: a registered database, not the catalog
        database = data["databaseUuid"]
        if not isinstance(database, str) or session.get(ManagedDatabase, database) is None:
            raise NotFound(resource="database", uuid=str(database))
        out["databaseUuid"] = database
    if "fullBackupInterval" in data:
        out["fullBackupInterval"] = _nonneg_int(data["fullBackupInterval"], "fullBackupInterval")
    if "bandwidthLimit" in data and data["bandwidthLimit"] is not None:
        limit = _nonneg_int(data["bandwidthLimit"], "bandwidthLimit")
        if limit == 0:
            raise InvalidArgument(detail="bandwidthLimit must be at least 1 byte/s")
        out["bandwidthLimit"] = limit
    if data.get("protectBackups") is not None:  # every backup of the group is created protected
        protect = {"true": True, "false": False}.get(str(data["protectBackups"]).lower())
        if protect is None or not isinstance(data["protectBackups"], (bool, str)):
            raise InvalidArgument(detail="protectBackups must be true or false")
        out["protectBackups"] = protect
    retention = data.get("retention")
    if retention is not None:
        if not isinstance(retention, dict) or set(retention) - RETENTION_KEYS:
            raise InvalidArgument(detail=f"retention takes {', '.join(sorted(RETENTION_KEYS))}")
        out["retention"] = {k: _nonneg_int(v, f"retention.{k}") for k, v in retention.items()}
    return out


WRONG_TARGETS = ((Volume, "a volume"), (VmInstance, "a VM instance"))
ALIASES = {"jobType": "type", "jobData": "parameters"}  # the inventory's names for ZStack's


def group_params(params: dict[str, Any]) -> dict[str, Any]:
    """A job group's (or scheduler job's) request parameters in one spelling, ZStack's
    ``type`` and ``parameters``: the inventory's ``jobType``/``jobData`` are read as those, and
    both spellings of one key at once are a 400. Every check (permissions included) runs on
    what this returns, so no spelling slips past one."""
    out = dict(params)
    for alias, key in ALIASES.items():
        if alias in out:
            if key in out:
                raise InvalidArgument(detail=f"give {key} or {alias}, not both")
            out[key] = out.pop(alias)
    return out


# -- groups, targets, triggers ------------------------------------------------------------------
def create_group(session: Session, params: dict[str, Any]) -> SchedulerJobGroup:
    """A job group from :func:`group_params`' parameters."""
    name, kind = params.get("name"), params.get("type")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(detail="name is required")
    if kind not in JOB_TYPES:
        raise InvalidArgument(detail=f"type must be one of {', '.join(JOB_TYPES)}")
    group = SchedulerJobGroup(
        name=name,
        description=params.get("description"),
        jobType=kind,
        jobData=check_job_data(session, params.get("parameters"), kind),
    )
    session.add(group)
    session.flush()
    return group


def update_group(session: Session, group: SchedulerJobGroup, params: dict[str, Any]) -> None:
    update_names(group, params)
    if "state" in params:
        if params["state"] not in ("Enabled", "Disabled", "enable", "disable"):
            raise InvalidArgument(detail="state must be Enabled or Disabled")
        group.state = "Enabled" if params["state"] in ("Enabled", "enable") else "Disabled"
    if "parameters" in params:
        group.jobData = check_job_data(session, params["parameters"], group.jobType)


def _check_target(session: Session, group: SchedulerJobGroup, uuid: str) -> str:
    if group.jobType in MAINTENANCE_TYPES:
        storage = session.get(BackupStorage, uuid)
        if storage is None:
            other = next((what for model, what in WRONG_TARGETS if session.get(model, uuid) is not None), None)
            if other:
                kind = group.jobType
                raise InvalidArgument(detail=f"{kind} groups take backup storages as targets; {uuid} is {other}")
            raise NotFound(resource="backup storage", uuid=uuid)
        source = (group.jobData or {}).get("srcBackupStorageUuid")
        if group.jobType == "storageSync" and source == uuid:
            raise InvalidArgument(detail=f"backup storage {uuid} is the group's srcBackupStorageUuid: its own source")
        return storage.name
    if group.jobType == "volumeBackup":
        return ready_volume(session, uuid).name
    if group.jobType == "vmBackup":
        vm: VmInstance = get(session, VmInstance, uuid, "VM instance")
        return vm.name
    raise InvalidArgument(detail="databaseBackup groups back up the catalog: they take no targets")


def add_targets(session: Session, group: SchedulerJobGroup, uuids: list[str]) -> list[SchedulerJob]:
    if not isinstance(uuids, list) or not uuids or not all(isinstance(u, str) for u in uuids):
        raise InvalidArgument(detail="targetResourceUuids must be a non-empty list of uuids")
    present = set(
        session.scalars(select(SchedulerJob.targetResourceUuid).where(SchedulerJob.schedulerJobGroupUuid == group.uuid))
    )
    jobs = []
    for uuid in dict.fromkeys(uuids):
        name = _check_target(session, group, uuid)
        if uuid in present:
            continue
        job = SchedulerJob(
            name=f"{group.name}/{name}",
            schedulerJobGroupUuid=group.uuid,
            targetResourceUuid=uuid,
            jobType=group.jobType,
        )
        session.add(job)
        jobs.append(job)
    session.flush()
    return jobs


def create_job(session: Session, params: dict[str, Any]) -> SchedulerJob:
    """A SchedulerJob of its own, in no group yet (ZStack's CreateSchedulerJob): ``name``,
    ``description``, ``targetResourceUuid``, ``type`` (volumeBackup|vmBackup), ``parameters``
    (jobData, kept on the job: the runs use its group's). :func:`add_jobs` puts it in a group."""
    name, kind, target = params.get("name"), params.get("type"), params.get("targetResourceUuid")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(detail="name is required")
    if kind not in JOB_TYPES:
        raise InvalidArgument(detail=f"type must be one of {', '.join(JOB_TYPES)}")
    if not isinstance(target, str) or not target:
        raise InvalidArgument(detail="targetResourceUuid is required")
    _check_target(session, SchedulerJobGroup(jobType=kind), target)
    job = SchedulerJob(
        name=name,
        description=params.get("description"),
        targetResourceUuid=target,
        jobType=kind,
        jobData=check_job_data(session, params.get("parameters"), kind),
    )
    session.add(job)
    session.flush()
    return job


def update_job(session: Session, job: SchedulerJob, params: dict[str, Any]) -> None:
    update_names(job, params)
    if "parameters" in params:
        job.jobData = check_job_data(session, params["parameters"], job.jobType)


def add_jobs(session: Session, group: SchedulerJobGroup, jobs: Sequence[SchedulerJob]) -> None:
    """Put jobs made by :func:`create_job` in ``group``: the same rows ``add_targets`` makes.
    A job of another type (400), in another group, or for a target the group has already (409)
    is refused, and then none is added."""
    present = set(
        session.scalars(select(SchedulerJob.targetResourceUuid).where(SchedulerJob.schedulerJobGroupUuid == group.uuid))
    )
    for job in jobs:
        if job.schedulerJobGroupUuid == group.uuid:
            continue
        if job.schedulerJobGroupUuid is not None:
            raise Conflict(detail=f"scheduler job {job.uuid} is in job group {job.schedulerJobGroupUuid} already")
        if job.jobType != group.jobType:
            raise InvalidArgument(detail=f"scheduler job {job.uuid} is a {job.jobType} job, the group {group.jobType}")
        if job.targetResourceUuid in present:
            raise Conflict(detail=f"job group {group.uuid} has a job for {job.targetResourceUuid} already")
        present.add(job.targetResourceUuid)
    for job in jobs:
        job.schedulerJobGroupUuid = group.uuid
        job.projectUuid = group.projectUuid
    session.flush()


def remove_jobs(session: Session, group: SchedulerJobGroup, jobs: Sequence[SchedulerJob]) -> None:
    """Take jobs out of ``group`` (ZStack's RemoveSchedulerJobsFromSchedulerJobGroup): they
    remain, in no group, in the group's project."""
    for job in jobs:
        if job.schedulerJobGroupUuid != group.uuid:
            raise NotFound(resource=f"scheduler job in job group {group.uuid}", uuid=job.uuid)
    for job in jobs:
        job.schedulerJobGroupUuid = None
        job.projectUuid = group.projectUuid
    session.flush()


def remove_targets(session: Session, group: SchedulerJobGroup, uuids: list[str]) -> int:
    jobs = list(
        session.scalars(
            select(SchedulerJob).where(
                SchedulerJob.schedulerJobGroupUuid == group.uuid, SchedulerJob.targetResourceUuid.in_(uuids)
            )
        )
    )
    for job in jobs:
        session.delete(job)
    return len(jobs)


def trigger_spec(trigger: SchedulerTrigger) -> TriggerSpec:
    return TriggerSpec(
        schedulerType=trigger.schedulerType,
        schedulerInterval=trigger.schedulerInterval,
        repeatCount=trigger.repeatCount,
        startTime=trigger.startTime,
        stopTime=trigger.stopTime,
        cron=trigger.cron,
        timeZone=trigger.timeZone,
    )


TRIGGER_FIELDS = ("schedulerType", "schedulerInterval", "repeatCount", "startTime", "stopTime", "cron", "timeZone")


def _start_now(values: dict[str, Any]) -> dict[str, Any]:
    """ZStack's rule: a ``startTime`` of 0 (or none, on create) is now, stored as now (Unix s)."""
    if values.get("startTime") in (None, 0) and not isinstance(values.get("startTime"), bool):
        values["startTime"] = to_seconds(now())
    return values


def create_trigger(session: Session, params: dict[str, Any]) -> SchedulerTrigger:
    if not isinstance(params.get("name"), str) or not params["name"]:
        raise InvalidArgument(detail="name is required")
    values: dict[str, Any] = {k: params.get(k) for k in TRIGGER_FIELDS}
    values["schedulerType"] = values["schedulerType"] or "simple"
    validate(TriggerSpec(**_start_now(values)))
    trigger = SchedulerTrigger(name=params["name"], description=params.get("description"), **values)
    session.add(trigger)
    session.flush()
    return trigger


def update_trigger(session: Session, trigger: SchedulerTrigger, params: dict[str, Any]) -> None:
    values: dict[str, Any] = {k: params.get(k, getattr(trigger, k)) for k in TRIGGER_FIELDS}
    if params.get("startTime", 1) in (None, 0):
        _start_now(values)
    validate(TriggerSpec(**values))
    update_names(trigger, params)
    for key, value in values.items():
        setattr(trigger, key, value)
    if "state" in params:
        trigger.state = "Enabled" if params["state"] in ("Enabled", "enable") else "Disabled"


def attach(session: Session, trigger: SchedulerTrigger, group: SchedulerJobGroup) -> None:
    exists = session.scalars(
        select(SchedulerJobGroupTriggerRef).where(
            SchedulerJobGroupTriggerRef.schedulerTriggerUuid == trigger.uuid,
            SchedulerJobGroupTriggerRef.schedulerJobGroupUuid == group.uuid,
        )
    ).first()
    if exists is not None:
        raise Conflict(detail=f"trigger {trigger.uuid} is attached to job group {group.uuid} already")
    session.add(SchedulerJobGroupTriggerRef(schedulerTriggerUuid=trigger.uuid, schedulerJobGroupUuid=group.uuid))
    session.flush()


def detach(session: Session, trigger: SchedulerTrigger, group: SchedulerJobGroup) -> None:
    ref = session.scalars(
        select(SchedulerJobGroupTriggerRef).where(
            SchedulerJobGroupTriggerRef.schedulerTriggerUuid == trigger.uuid,
            SchedulerJobGroupTriggerRef.schedulerJobGroupUuid == group.uuid,
        )
    ).first()
    if ref is None:
        raise NotFound(resource="trigger attachment", uuid=f"{trigger.uuid}/{group.uuid}")
    session.delete(ref)
