"""Scheduled runs: fires, the run of one target in a worker, retention, and the history.

A *fire* is one trigger firing one group at one time. Whoever fires (a beat, or
``runSchedulerJobGroup``) records a SchedulerFire row (unique per trigger, group and time, so a
second beat skips it) and then one API job per target whose uuid is derived from (group,
trigger, fire time, target) under the server secret: a target can never run twice for one
fire, whichever beats race or restart. A fire left unfinished by a killed beat is completed by
the next tick. Every run ends as one SchedulerJobHistory row, written when its API job finishes
or fails.
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

from shared import apijobs, hosts
from shared import celery_app as tasks
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
from shared.errors import BlockvaultError, Conflict, NotFound
from shared.repository.maintenance import select_keep
from shared.schedule import due_fire, fire_times_after
from shared.secret import keyed_hash
from shared.service import database_backups, protection, quotas, volume_backups
from shared.service.copies import copy_backups
from shared.service.deletion import delete_backup_copies
from shared.service.jobgroups import MAINTENANCE_TYPES, trigger_spec
from shared.service.maintenance_runs import retention_policy, run_maintenance
from shared.service.rows import get, new_backup_row, pick_storage
from shared.storage import current_master

log = logging.getLogger(__name__)
ID_NAMESPACE = uuidlib.UUID("6b1f0f7e-8d5c-4c43-9a57-0c0de5b10c4b")
MANUAL = "manual"
ACTION = "schedulerJob"
RESUME_AFTER = timedelta(seconds=60)
FIRE_BATCH = 500


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
    if group.jobType in MAINTENANCE_TYPES:  # targets are storages: any worker runs them
        storages = set(session.scalars(select(BackupStorage.uuid).where(BackupStorage.uuid.in_(targets))))
        for target in targets:
            known = target in storages
            out[target] = (STORAGE_QUEUE, None) if known else NotFound(resource="backup storage", uuid=target)
        return out
    if group.jobType == "volumeBackup":
        rows = session.execute(select(Volume.uuid, Volume.hostUuid).where(Volume.uuid.in_(targets))).all()
        found = {uuid: host for uuid, host in rows}
        for target in targets:
            if target not in found:
                out[target] = NotFound(resource="volume", uuid=target)
    else:
        vms = set(session.scalars(select(VmInstance.uuid).where(VmInstance.uuid.in_(targets))))
        roots = select(Volume.vmInstanceUuid, Volume.hostUuid).where(
            Volume.vmInstanceUuid.in_(targets), Volume.type == "Root"
        )
        found = {str(vm): host for vm, host in session.execute(roots).all()}
        for target in targets:
            if target not in vms:
                out[target] = NotFound(resource="VM instance", uuid=target)
            elif target not in found:
                out[target] = Conflict(detail=f"VM {target} has no root volume")
    hosts_rows = session.execute(select(Host.uuid, Host.status).where(Host.uuid.in_(set(found.values())))).all()
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
                task=tasks.SCHEDULER_RUN,
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
    spec = trigger_spec(trigger)
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
        return [pick_storage(session, None)]
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
    apply retention (maintenance groups: :mod:`~shared.service.maintenance_runs`). The history
    row is written when the job ends (see record_history)."""
    params = job.params or {}
    group = session.get(SchedulerJobGroup, params["schedulerJobGroupUuid"])
    if group is None:
        raise NotFound(resource="job group", uuid=params["schedulerJobGroupUuid"])
    kind, target, data = params["jobType"], params["targetResourceUuid"], params.get("jobData") or {}
    if kind in MAINTENANCE_TYPES:
        return run_maintenance(session, job, group)
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
        quotas.check(session, volume.projectUuid, "scheduled backup")
    else:
        vm = session.get(VmInstance, target)
        if vm is None:
            raise NotFound(resource="VM instance", uuid=target)
        quotas.check(session, vm.projectUuid, "scheduled backup")
        volumes = list(
            session.scalars(
                select(Volume).where(Volume.vmInstanceUuid == target).order_by(Volume.type.desc(), Volume.createDate)
            )
        )
        group_uuid = uuidlib.uuid5(ID_NAMESPACE, job.uuid).hex
    name = f"{group.name}-{params['fireTime'][:19]}"
    rows = []
    for volume in volumes:
        row = new_backup_row(session, volume, first, name, group_uuid, None)
        row.schedulerJobUuid = params.get("schedulerJobUuid")
        rows.append(row)
    session.flush()
    job.params = {**params, "backupUuids": [r.uuid for r in rows]}  # so a failure marks them Failed
    session.commit()
    done, first = volume_backups.take_backups(session, rows, first, full=full, job_uuid=job.uuid)
    if data.get("protectBackups"):
        _protect(session, rows)
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
    """One scheduled run of a databaseBackup group: dump the catalog (or the registered database
    its jobData's ``databaseUuid`` names), copy it to the other
    storages, keep what ``retention`` says of this group's database backups."""
    params, data = job.params or {}, (job.params or {}).get("jobData") or {}
    name = f"{group.name}-{params['fireTime'][:19]}"
    row = database_backups.new_database_backup_row(session, storages[0], name)
    row.metadata_ = {"schedulerJobGroupUuid": group.uuid}
    row.databaseUuid = data.get("databaseUuid")  # a registered database; None: the catalog
    session.flush()
    job.params = {**params, "databaseBackupUuids": [row.uuid]}  # so a failure marks it Failed
    session.commit()
    done, first = database_backups.take_database_backup(session, row, storages[0], job.uuid)
    if data.get("protectBackups"):
        _protect(session, [row])
    limit = data.get("bandwidthLimit")
    synced = [_sync_copy(session, [row], first, extra, limit) for extra in storages[1:] if extra.uuid != first.uuid]
    removed: list[str] = []
    kept: dict[str, str] = {}
    retention = data.get("retention")
    if retention:
        policy = retention_policy(retention)
        rows = [
            r
            for r in session.scalars(select(DatabaseBackup).where(DatabaseBackup.status == "Ready"))
            if (r.metadata_ or {}).get("schedulerJobGroupUuid") == group.uuid
        ]
        kept = {r.uuid: reason for r in rows if (reason := protection.why_kept(session, [r]))}
        rows = [r for r in rows if r.uuid not in kept]  # protected or locked: not the policy's to count
        keep = select_keep([(r.uuid, aware(r.createDate)) for r in rows], policy)
        for old in rows:
            if old.uuid not in keep:
                delete_backup_copies(session, old.uuid, None, DatabaseBackup, reclaim=False)
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
        "retention": {"removed": removed, **_left(kept)} if retention else {},
    }


def _protect(session: Session, rows: Sequence[VolumeBackup | DatabaseBackup]) -> None:
    """A group with ``protectBackups``: its new backups are protected once they are Ready (a
    failed one stays deletable), before any copy is made (the copies are protected too)."""
    for row in rows:
        session.refresh(row)
        row.protected = True
        protection.mark_copies(session, row)
    session.commit()


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
        report = copy_backups(session, rows, source, target, bandwidth_limit=limit)
    except BlockvaultError as exc:
        return {"backupStorageUuid": target.uuid, "success": False, "error": str(exc)}
    return {
        "backupStorageUuid": target.uuid,
        "success": True,
        "chunks": report["chunksCopied"],
        "bytes": report["bytesCopied"],
    }


def _apply_retention(
    session: Session, job_uuid: str | None, kind: str, retention: dict[str, int] | None
) -> dict[str, Any]:
    """Delete this target's scheduled backups that ``retention`` does not keep; the newest
    good one always stays."""
    if not retention or not job_uuid:
        return {}
    policy = retention_policy(retention)
    rows = session.scalars(
        select(VolumeBackup).where(VolumeBackup.schedulerJobUuid == job_uuid, VolumeBackup.status == "Ready")
    ).all()
    units: dict[str, list[VolumeBackup]] = {}
    for row in rows:
        units.setdefault(row.groupUuid or row.uuid, []).append(row)
    kept = {key: reason for key, members in units.items() if (reason := protection.why_kept(session, members))}
    units = {key: members for key, members in units.items() if key not in kept}
    keep = select_keep([(key, max(aware(r.createDate) for r in members)) for key, members in units.items()], policy)
    removed = []
    for key, members in units.items():
        if key in keep:
            continue
        for row in members:
            delete_backup_copies(session, row.uuid, None, reclaim=False)
            removed.append(row.uuid)
    session.commit()
    return {"kept": len(keep), "removed": removed, **_left(kept)}


def _left(kept: dict[str, str]) -> dict[str, list[str]]:
    """What retention left alone and why, for the history: ``protected`` and ``locked``
    (under object lock: a later run removes it) backups (VM backups by their group)."""
    out: dict[str, list[str]] = {}
    for key, reason in sorted(kept.items()):
        out.setdefault(reason, []).append(key)
    return out


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
