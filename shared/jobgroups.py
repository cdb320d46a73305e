"""Scheduled backups: job groups, their targets (SchedulerJob), triggers, fires and history.

A *fire* is one trigger firing one group at one time. Whoever fires (a beat, or
``runSchedulerJobGroup``) records a SchedulerFire row (unique per trigger, group and time, so a
second beat skips it) and then one API job per target whose uuid is derived from (group,
trigger, fire time, target): a target can never run twice for one fire, whichever beats race
or restart. A fire left unfinished by a killed beat is completed by the next tick. Every run
ends as one SchedulerJobHistory row, written when its API job finishes or fails.
"""

from __future__ import annotations

import json
import logging
import uuid as uuidlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared import apijobs, backups, dbbackups, hosts
from shared.catalog.models import (
    ApiJob,
    BackupStorage,
    DatabaseBackup,
    Host,
    SchedulerFire,
    SchedulerJob,
    SchedulerJobGroup,
    SchedulerJobGroupTriggerRef,
    SchedulerJobHistory,
    SchedulerTrigger,
    VmInstance,
    Volume,
    VolumeBackup,
    aware,
    now,
)
from shared.celery_app import STORAGE_QUEUE, host_queue
from shared.errors import BlockvaultError, Conflict, InvalidArgument, NotFound
from shared.repository.maintenance import Policy, select_keep
from shared.schedule import TriggerSpec, due_fire, fire_times_after, validate
from shared.secret import keyed_hash
from shared.storage import current_master

log = logging.getLogger(__name__)
JOB_TYPES = ("volumeBackup", "vmBackup", "databaseBackup")
ADMIN_JOB_TYPES = ("databaseBackup",)  # they touch every project's rows: admins' groups only
JOB_DATA_KEYS = {"backupStorageUuids", "fullBackupInterval", "retention", "bandwidthLimit"}
RETENTION_KEYS = {"keepLast", "keepDaily", "keepWeekly", "keepMonthly"}
ID_NAMESPACE = uuidlib.UUID("6b1f0f7e-8d5c-4c43-9a57-0c0de5b10c4b")
MANUAL = "manual"
ACTION = "schedulerJob"
TASK = "blockvault.scheduler.run"
RESUME_AFTER = timedelta(seconds=60)
FIRE_BATCH = 500


# -- validation ----------------------------------------------------------------------------------
def _nonneg_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(detail=f"{name} must be a non-negative integer")
    return value


def check_job_data(session: Session, data: Any) -> dict[str, Any]:
    """jobData as stored: validated, every storage known."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgument(detail="parameters (jobData) must be an object")
    unknown = set(data) - JOB_DATA_KEYS
    if unknown:
        raise InvalidArgument(detail=f"unknown jobData keys: {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
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
    if "fullBackupInterval" in data:
        out["fullBackupInterval"] = _nonneg_int(data["fullBackupInterval"], "fullBackupInterval")
    if "bandwidthLimit" in data and data["bandwidthLimit"] is not None:
        limit = _nonneg_int(data["bandwidthLimit"], "bandwidthLimit")
        if limit == 0:
            raise InvalidArgument(detail="bandwidthLimit must be at least 1 byte/s")
        out["bandwidthLimit"] = limit
    retention = data.get("retention")
    if retention is not None:
        if not isinstance(retention, dict) or set(retention) - RETENTION_KEYS:
            raise InvalidArgument(detail=f"retention takes {', '.join(sorted(RETENTION_KEYS))}")
        out["retention"] = {k: _nonneg_int(v, f"retention.{k}") for k, v in retention.items()}
    return out


get = backups.get
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
        jobData=check_job_data(session, params.get("parameters")),
    )
    session.add(group)
    session.flush()
    return group


def update_group(session: Session, group: SchedulerJobGroup, params: dict[str, Any]) -> None:
    for key in ("name", "description"):
        if key in params:
            setattr(group, key, params[key])
    if "state" in params:
        if params["state"] not in ("Enabled", "Disabled", "enable", "disable"):
            raise InvalidArgument(detail="state must be Enabled or Disabled")
        group.state = "Enabled" if params["state"] in ("Enabled", "enable") else "Disabled"
    if "parameters" in params:
        group.jobData = check_job_data(session, params["parameters"])


def _check_target(session: Session, group: SchedulerJobGroup, uuid: str) -> str:
    if group.jobType == "volumeBackup":
        return backups.ready_volume(session, uuid).name
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
        jobData=check_job_data(session, params.get("parameters")),
    )
    session.add(job)
    session.flush()
    return job


def update_job(session: Session, job: SchedulerJob, params: dict[str, Any]) -> None:
    for key in ("name", "description"):
        if key in params:
            if not isinstance(params[key], str | None) or (key == "name" and not params[key]):
                raise InvalidArgument(detail=f"{key} must be a string" + (" and not empty" if key == "name" else ""))
            setattr(job, key, params[key])
    if "parameters" in params:
        job.jobData = check_job_data(session, params["parameters"])


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


def _spec(trigger: SchedulerTrigger) -> TriggerSpec:
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


def create_trigger(session: Session, params: dict[str, Any]) -> SchedulerTrigger:
    if not isinstance(params.get("name"), str) or not params["name"]:
        raise InvalidArgument(detail="name is required")
    values: dict[str, Any] = {k: params.get(k) for k in TRIGGER_FIELDS}
    values["schedulerType"] = values["schedulerType"] or "simple"
    validate(TriggerSpec(**values))
    trigger = SchedulerTrigger(name=params["name"], description=params.get("description"), **values)
    session.add(trigger)
    session.flush()
    return trigger


def update_trigger(session: Session, trigger: SchedulerTrigger, params: dict[str, Any]) -> None:
    values: dict[str, Any] = {k: params.get(k, getattr(trigger, k)) for k in TRIGGER_FIELDS}
    validate(TriggerSpec(**values))
    for key, value in values.items():
        setattr(trigger, key, value)
    for key in ("name", "description"):
        if key in params:
            setattr(trigger, key, params[key])
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


# -- firing --------------------------------------------------------------------------------------
def run_id(group_uuid: str, trigger_uuid: str, fire_time: datetime, target: str) -> str:
    """The API job uuid (= Celery task id) of one target's run in one fire: the same for
    every beat that computes it (they share the server secret), and not derivable by anyone
    who knows only the group, trigger and target (a job's uuid opens its wire result)."""
    return keyed_hash(f"scheduler-run/{group_uuid}/{trigger_uuid}/{fire_time.isoformat()}/{target}")[:32]


def fire(
    session: Session,
    group: SchedulerJobGroup,
    trigger_uuid: str,
    fire_time: datetime,
    *,
    manual: bool = False,
    only_jobs: list[str] | None = None,
) -> int:
    """Fire ``group`` for ``trigger_uuid`` at ``fire_time``: one job per enabled target.
    Returns how many jobs this call created (0 when another beat did it already)."""
    record = session.scalars(
        select(SchedulerFire).where(
            SchedulerFire.schedulerTriggerUuid == trigger_uuid,
            SchedulerFire.schedulerJobGroupUuid == group.uuid,
            SchedulerFire.fireTime == fire_time,
        )
    ).first()
    if record is None:
        record = SchedulerFire(
            schedulerTriggerUuid=trigger_uuid, schedulerJobGroupUuid=group.uuid, fireTime=fire_time, manual=manual
        )
        try:
            with session.begin_nested():
                session.add(record)
        except IntegrityError:
            return 0  # another beat has this fire
        session.commit()
    elif record.done:
        return 0
    hosts.reap(session)
    session.commit()
    jobs = session.scalars(
        select(SchedulerJob).where(SchedulerJob.schedulerJobGroupUuid == group.uuid, SchedulerJob.state == "Enabled")
    ).all()
    targets: list[tuple[str | None, str]] = [
        (j.uuid, j.targetResourceUuid) for j in jobs if only_jobs is None or j.uuid in only_jobs
    ]
    if group.jobType == "databaseBackup" and not targets and only_jobs is None:
        targets = [(None, group.uuid)]
    created = 0
    for start in range(0, len(targets), FIRE_BATCH):
        created += _fire_batch(session, group, trigger_uuid, fire_time, targets[start : start + FIRE_BATCH])
    record.done = True
    session.commit()
    log.info("scheduler.fired group=%s trigger=%s time=%s jobs=%d", group.uuid, trigger_uuid, fire_time, created)
    return created


def _routes(
    session: Session, group: SchedulerJobGroup, targets: list[str]
) -> dict[str, tuple[str, str | None] | BlockvaultError]:
    """(queue, host) for each target, or the error that keeps it from running now; a few
    queries for the whole batch."""
    if group.jobType == "databaseBackup":
        return {t: (STORAGE_QUEUE, None) for t in targets}
    out: dict[str, tuple[str, str | None] | BlockvaultError] = {}
    if group.jobType == "volumeBackup":
        rows = session.execute(select(Volume.uuid, Volume.hostUuid).where(Volume.uuid.in_(targets))).tuples()
        found = {uuid: host for uuid, host in rows}
        for target in targets:
            if target not in found:
                out[target] = NotFound(resource="volume", uuid=target)
    else:
        vms = set(session.scalars(select(VmInstance.uuid).where(VmInstance.uuid.in_(targets))))
        roots = select(Volume.vmInstanceUuid, Volume.hostUuid).where(
            Volume.vmInstanceUuid.in_(targets), Volume.type == "Root"
        )
        found = {str(vm): host for vm, host in session.execute(roots).tuples()}
        for target in targets:
            if target not in vms:
                out[target] = NotFound(resource="VM instance", uuid=target)
            elif target not in found:
                out[target] = Conflict(detail=f"VM {target} has no root volume")
    hosts_rows = session.execute(select(Host.uuid, Host.status).where(Host.uuid.in_(set(found.values())))).tuples()
    status = {uuid: state for uuid, state in hosts_rows}
    for target, host in found.items():
        if target in out:
            continue
        if status.get(host) != "Connected":
            out[target] = Conflict(detail=f"host {host} is {status.get(host, 'unknown')}: no worker is running for it")
        else:
            out[target] = (host_queue(host), host)
    return out


def _fire_batch(
    session: Session,
    group: SchedulerJobGroup,
    trigger_uuid: str,
    fire_time: datetime,
    targets: list[tuple[str | None, str]],
) -> int:
    ids = {target: run_id(group.uuid, trigger_uuid, fire_time, target) for _job, target in targets}
    existing = set(session.scalars(select(ApiJob.uuid).where(ApiJob.uuid.in_(list(ids.values())))))
    todo = [(job, target) for job, target in targets if ids[target] not in existing]
    routes = _routes(session, group, [target for _job, target in todo])
    created = 0
    new_jobs = []
    for job_uuid, target in todo:
        params = {
            "schedulerJobGroupUuid": group.uuid,
            "schedulerJobUuid": job_uuid,
            "triggerUuid": None if trigger_uuid == MANUAL else trigger_uuid,
            "targetResourceUuid": target,
            "jobType": group.jobType,
            "jobData": group.jobData or {},
            "fireTime": fire_time.isoformat(),
        }
        route = routes[target]
        if isinstance(route, BlockvaultError):
            _failed_at_fire(session, ids[target], params, route)
            created += 1
            continue
        queue, host = route
        new_jobs.append(
            apijobs.NewJob(
                uuid=ids[target],
                action=ACTION,
                task=TASK,
                queue=queue,
                params=params,
                resource_uuid=target,
                resource_type=group.jobType,
                host_uuid=host,
            )
        )
    return created + len(apijobs.enqueue_many(session, new_jobs))


def _failed_at_fire(session: Session, job_id: str, params: dict[str, Any], exc: BlockvaultError) -> None:
    job = ApiJob(
        uuid=job_id,
        action=ACTION,
        params=params,
        resourceUuid=params["targetResourceUuid"],
        resourceType=params["jobType"],
        state="Pending",
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
            apijobs.fail_job(session, job, code=exc.code, description=str(exc))
    except IntegrityError:
        return
    session.commit()


def tick(session: Session, moment: datetime | None = None) -> float:
    """Fire everything due at ``moment`` (default now); finish fires a dead beat left
    half-done. Returns how many seconds may pass before the next call."""
    moment = moment or now()
    wait = 5.0
    pairs = session.execute(
        select(SchedulerTrigger, SchedulerJobGroup)
        .join(SchedulerJobGroupTriggerRef, SchedulerJobGroupTriggerRef.schedulerTriggerUuid == SchedulerTrigger.uuid)
        .join(SchedulerJobGroup, SchedulerJobGroup.uuid == SchedulerJobGroupTriggerRef.schedulerJobGroupUuid)
        .where(SchedulerTrigger.state == "Enabled", SchedulerJobGroup.state == "Enabled")
    ).all()
    for trigger, group in pairs:
        try:
            wait = min(wait, _tick_one(session, trigger, group, moment))
        except Exception:  # one broken trigger must not stop the others
            session.rollback()
            log.exception("scheduler.trigger_failed trigger=%s group=%s", trigger.uuid, group.uuid)
    stale = session.scalars(
        select(SchedulerFire).where(SchedulerFire.done.is_(False), SchedulerFire.createDate < moment - RESUME_AFTER)
    ).all()
    for record in stale:
        group_row = session.get(SchedulerJobGroup, record.schedulerJobGroupUuid)
        if group_row is None:
            record.done = True
            continue
        log.warning("scheduler.resume_fire group=%s time=%s", group_row.uuid, record.fireTime)
        fire(session, group_row, record.schedulerTriggerUuid, aware(record.fireTime), manual=record.manual)
    session.commit()
    return wait


def _tick_one(session: Session, trigger: SchedulerTrigger, group: SchedulerJobGroup, moment: datetime) -> float:
    """Fire one trigger for one group if due; seconds until its next fire time."""
    spec = _spec(trigger)
    created = aware(trigger.createDate)
    last = session.scalar(
        select(func.max(SchedulerFire.fireTime)).where(
            SchedulerFire.schedulerTriggerUuid == trigger.uuid,
            SchedulerFire.schedulerJobGroupUuid == group.uuid,
            SchedulerFire.manual.is_(False),
        )
    )
    last = aware(last) if last else None
    due = due_fire(spec, created, last, moment)
    if due is not None:
        fire(session, group, trigger.uuid, due)
        last = due
    following = fire_times_after(spec, created, last)
    return 5.0 if following is None else max(0.05, (following - moment).total_seconds())


def run_now(
    session: Session, group: SchedulerJobGroup, trigger_uuid: str = MANUAL, only_jobs: list[str] | None = None
) -> int:
    """runSchedulerJobGroup / runSchedulerTrigger: fire now, outside the schedule."""
    return fire(session, group, trigger_uuid, now(), manual=True, only_jobs=only_jobs)


# -- running one target (worker side) ------------------------------------------------------------
def _storages(session: Session, data: dict[str, Any]) -> list[BackupStorage]:
    """Where this run's copies go: the first takes the backup. A first storage that is an
    ImageStore demoted to standby (its master failed over) is replaced by the new master."""
    uuids = data.get("backupStorageUuids")
    if not uuids:
        return [backups.pick_storage(session, None)]
    rows: list[BackupStorage] = [get(session, BackupStorage, uuid, "backup storage") for uuid in uuids]
    first = rows[0]
    if first.type == "ImageStore" and first.role == "standby":
        master = current_master(session)
        if master is not None:
            rows = [master, *(row for row in rows if row.uuid != master.uuid)]
    return rows


def _run_index(session: Session, job_uuid: str | None, group_uuid: str) -> int:
    """How many successful runs this target had in this group before."""
    query = select(func.count()).select_from(SchedulerJobHistory).where(SchedulerJobHistory.success.is_(True))
    if job_uuid:
        query = query.where(SchedulerJobHistory.schedulerJobUuid == job_uuid)
    else:
        query = query.where(SchedulerJobHistory.schedulerJobGroupUuid == group_uuid)
    return int(session.scalar(query) or 0)


def run_scheduled(session: Session, job: ApiJob) -> dict[str, Any]:
    """The worker side of one scheduled run: back up the target, copy to the other storages,
    apply retention. The history row is written when the job ends (see record_history)."""
    params = job.params or {}
    group = session.get(SchedulerJobGroup, params["schedulerJobGroupUuid"])
    if group is None:
        raise NotFound(resource="job group", uuid=params["schedulerJobGroupUuid"])
    kind, target, data = params["jobType"], params["targetResourceUuid"], params.get("jobData") or {}
    storages = _storages(session, data)
    first = storages[0]
    if kind == "databaseBackup":
        return _run_database_backup(session, job, group, storages)
    interval = int(data.get("fullBackupInterval") or 0)
    index = _run_index(session, params.get("schedulerJobUuid"), group.uuid)
    full = interval > 0 and index % interval == 0
    if kind == "volumeBackup":
        volume = session.get(Volume, target)
        if volume is None:
            raise NotFound(resource="volume", uuid=target)
        volumes, group_uuid = [volume], None
    else:
        if session.get(VmInstance, target) is None:
            raise NotFound(resource="VM instance", uuid=target)
        volumes = list(
            session.scalars(
                select(Volume).where(Volume.vmInstanceUuid == target).order_by(Volume.type.desc(), Volume.createDate)
            )
        )
        group_uuid = uuidlib.uuid5(ID_NAMESPACE, job.uuid).hex
    name = f"{group.name}-{params['fireTime'][:19]}"
    rows = []
    for volume in volumes:
        row = backups.new_backup_row(session, volume, first, name, group_uuid, None)
        row.schedulerJobUuid = params.get("schedulerJobUuid")
        rows.append(row)
    session.flush()
    job.params = {**params, "backupUuids": [r.uuid for r in rows]}  # so a failure marks them Failed
    session.commit()
    done, first = backups.take_backups(session, rows, first, full=full, job_uuid=job.uuid)
    synced = [
        _sync_copy(session, rows, first, extra, data.get("bandwidthLimit"))
        for extra in storages[1:]
        if extra.uuid != first.uuid
    ]
    retention = _apply_retention(session, params.get("schedulerJobUuid"), kind, data.get("retention"))
    return {
        "volumeBackupUuids": [r.uuid for r in rows],
        "groupUuid": group_uuid,
        "mode": [d["mode"] for d in done],
        "size": sum(d["size"] for d in done),
        "bytesRead": sum(d["stats"]["bytesRead"] for d in done),
        "bytesWritten": sum(d["stats"]["bytesWritten"] for d in done),
        "seconds": round(sum(d["stats"]["seconds"] for d in done), 3),
        "backupStorageUuid": first.uuid,
        "synced": synced,
        "retention": retention,
    }


def _run_database_backup(
    session: Session, job: ApiJob, group: SchedulerJobGroup, storages: list[BackupStorage]
) -> dict[str, Any]:
    """One scheduled run of a databaseBackup group: dump the catalog, copy it to the other
    storages, keep what ``retention`` says of this group's database backups."""
    params, data = job.params or {}, (job.params or {}).get("jobData") or {}
    name = f"{group.name}-{params['fireTime'][:19]}"
    row = dbbackups.new_database_backup_row(session, storages[0], name)
    row.metadata_ = {"schedulerJobGroupUuid": group.uuid}
    session.flush()
    job.params = {**params, "databaseBackupUuids": [row.uuid]}  # so a failure marks it Failed
    session.commit()
    done, first = dbbackups.take_database_backup(session, row, storages[0], job.uuid)
    limit = data.get("bandwidthLimit")
    synced = [_sync_copy(session, [row], first, extra, limit) for extra in storages[1:] if extra.uuid != first.uuid]
    removed: list[str] = []
    retention = data.get("retention")
    if retention:
        policy = _policy(retention)
        rows = [
            r
            for r in session.scalars(select(DatabaseBackup).where(DatabaseBackup.status == "Ready"))
            if (r.metadata_ or {}).get("schedulerJobGroupUuid") == group.uuid
        ]
        keep = select_keep([(r.uuid, aware(r.createDate)) for r in rows], policy)
        for old in rows:
            if old.uuid not in keep:
                backups.delete_backup_copies(session, old.uuid, None, DatabaseBackup)
                removed.append(old.uuid)
        session.commit()
    return {
        "databaseBackupUuid": row.uuid,
        "size": done["size"],
        "md5": (done.get("metadata") or {}).get("md5"),
        "bytesWritten": done["stats"]["bytesWritten"],
        "seconds": done["stats"]["seconds"],
        "backupStorageUuid": first.uuid,
        "synced": synced,
        "retention": {"removed": removed} if retention else {},
    }


def _sync_copy(
    session: Session,
    rows: Sequence[VolumeBackup | DatabaseBackup],
    source: BackupStorage,
    target: BackupStorage,
    limit: int | None,
) -> dict[str, Any]:
    """Copy the run's backups to one more storage; what happened, for the history (a failed
    copy does not fail the run: the backup itself is good)."""
    try:
        report = backups.copy_backups(session, rows, source, target, bandwidth_limit=limit)
    except BlockvaultError as exc:
        return {"backupStorageUuid": target.uuid, "success": False, "error": str(exc)}
    return {
        "backupStorageUuid": target.uuid,
        "success": True,
        "chunks": report["chunksCopied"],
        "bytes": report["bytesCopied"],
    }


def _policy(retention: dict[str, int]) -> Policy:
    """jobData retention as the engine's policy; the newest backup always stays."""
    return Policy(
        keep_last=max(1, retention.get("keepLast", 0)),
        keep_daily=retention.get("keepDaily", 0),
        keep_weekly=retention.get("keepWeekly", 0),
        keep_monthly=retention.get("keepMonthly", 0),
    )


def _apply_retention(
    session: Session, job_uuid: str | None, kind: str, retention: dict[str, int] | None
) -> dict[str, Any]:
    """Delete this target's scheduled backups that ``retention`` does not keep; the newest
    good one always stays."""
    if not retention or not job_uuid:
        return {}
    policy = _policy(retention)
    rows = session.scalars(
        select(VolumeBackup).where(VolumeBackup.schedulerJobUuid == job_uuid, VolumeBackup.status == "Ready")
    ).all()
    units: dict[str, list[VolumeBackup]] = {}
    for row in rows:
        units.setdefault(row.groupUuid or row.uuid, []).append(row)
    keep = select_keep([(key, max(aware(r.createDate) for r in members)) for key, members in units.items()], policy)
    removed = []
    for key, members in units.items():
        if key in keep:
            continue
        for row in members:
            backups.delete_backup_copies(session, row.uuid, None)
            removed.append(row.uuid)
    session.commit()
    return {"kept": len(keep), "removed": removed}


# -- history -------------------------------------------------------------------------------------
def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def record_history(session: Session, job: ApiJob) -> None:
    """The history row of a finished scheduled run (called by apijobs when any such job ends)."""
    params = {k: v for k, v in (job.params or {}).items() if not k.startswith("_")}
    request = {k: params.get(k) for k in ("jobType", "targetResourceUuid", "jobData", "fireTime")}
    result = job.result if job.state == "Succeeded" else {"error": job.error}
    fire_time = params.get("fireTime")
    session.add(
        SchedulerJobHistory(
            executeTime=datetime.fromisoformat(fire_time) if fire_time else now(),
            requestDump=_dump(request),
            resultDump=_dump(result),
            success=job.state == "Succeeded",
            schedulerJobGroupUuid=params.get("schedulerJobGroupUuid"),
            schedulerJobUuid=params.get("schedulerJobUuid"),
            targetResourceUuid=params.get("targetResourceUuid"),
            triggerUuid=params.get("triggerUuid"),
        )
    )


apijobs.on_end(ACTION, record_history)
