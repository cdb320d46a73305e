"""What the notification pass looks for in the catalog, each finding one event (:mod:`.events`).

- ``jobFailed``: an API job Failed in the last :data:`LOOKBACK` (one event per job).
- ``hostDisconnected``, ``storageDisconnected``: an Enabled host or storage Disconnected (one
  event per episode).
- ``storageFull``: a storage's used share of its capacity at or above the lowest
  ``fillRatio`` of the enabled storageFull rules (default :data:`DEFAULT_FILL_RATIO`).
- ``backupOverdue``: a scheduled VM or volume whose newest Ready backup is older than its
  schedule's interval times ``1 + tolerance`` (the lowest of the enabled rules', default
  :data:`DEFAULT_TOLERANCE`). The interval of a target is that of the most frequent
  Enabled trigger of its Enabled job groups (:func:`schedule_intervals`, also the metric
  ``blockvault_volume_backup_interval_seconds``).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared import hosts
from shared.catalog.models import (
    ApiJob,
    BackupStorage,
    Host,
    NotificationRule,
    SchedulerJob,
    SchedulerJobGroup,
    SchedulerJobGroupTriggerRef,
    SchedulerTrigger,
    Volume,
    VolumeBackup,
    aware,
)
from shared.schedule import next_fire_times
from shared.service.jobgroups import trigger_spec

from .events import hold, notify_event, release

LOOKBACK = timedelta(days=1)
DEFAULT_FILL_RATIO = 0.9
DEFAULT_TOLERANCE = 0.5
BACKUP_TYPES = ("volumeBackup", "vmBackup")


def rule_parameter(session: Session, kind: str, name: str, default: float) -> float:
    """The lowest ``parameters[name]`` of the enabled rules of ``kind`` (``default`` where unset)."""
    values = [
        float((rule.parameters or {}).get(name, default))
        for rule in session.scalars(
            select(NotificationRule).where(NotificationRule.eventType == kind, NotificationRule.state == "Enabled")
        )
    ]
    return min(values, default=default)


def _trigger_interval(trigger: SchedulerTrigger, moment: datetime) -> float | None:
    times = next_fire_times(trigger_spec(trigger), aware(trigger.createDate), moment, 2)
    return (times[1] - times[0]).total_seconds() if len(times) == 2 else None


def schedule_intervals(session: Session, moment: datetime) -> dict[str, tuple[float, str]]:
    """volume uuid -> (the seconds between its scheduled backups, whom it is backed up for:
    its VM's uuid for a vmBackup group, else its own), for every volume an Enabled job of an
    Enabled backup group with an Enabled, still firing trigger covers."""
    intervals: dict[str, float] = {}
    triggers = select(SchedulerTrigger, SchedulerJobGroupTriggerRef.schedulerJobGroupUuid).join(
        SchedulerJobGroupTriggerRef, SchedulerJobGroupTriggerRef.schedulerTriggerUuid == SchedulerTrigger.uuid
    )
    for trigger, group_uuid in session.execute(triggers.where(SchedulerTrigger.state == "Enabled")):
        interval = _trigger_interval(trigger, moment)
        if interval is not None:
            intervals[group_uuid] = min(interval, intervals.get(group_uuid, interval))
    if not intervals:
        return {}
    jobs = session.execute(
        select(SchedulerJob.targetResourceUuid, SchedulerJobGroup.uuid, SchedulerJobGroup.jobType)
        .join(SchedulerJobGroup, SchedulerJob.schedulerJobGroupUuid == SchedulerJobGroup.uuid)
        .where(
            SchedulerJob.state == "Enabled",
            SchedulerJobGroup.state == "Enabled",
            SchedulerJobGroup.jobType.in_(BACKUP_TYPES),
            SchedulerJobGroup.uuid.in_(list(intervals)),
        )
    )
    found: dict[str, tuple[float, str]] = {}
    vm_targets: dict[str, float] = {}
    for target, group_uuid, job_type in jobs:
        interval = intervals[group_uuid]
        if job_type == "vmBackup":
            vm_targets[target] = min(interval, vm_targets.get(target, interval))
        elif target not in found or interval < found[target][0]:
            found[target] = (interval, target)
    if vm_targets:
        for volume, vm in session.execute(
            select(Volume.uuid, Volume.vmInstanceUuid).where(Volume.vmInstanceUuid.in_(list(vm_targets)))
        ):
            assert vm is not None
            found[volume] = (min(vm_targets[vm], found.get(volume, (vm_targets[vm], ""))[0]), vm)
    return found


def _newest_backups(session: Session, volumes: list[str]) -> dict[str, datetime]:
    rows = session.execute(
        select(VolumeBackup.volumeUuid, func.max(VolumeBackup.createDate))
        .where(VolumeBackup.status == "Ready", VolumeBackup.volumeUuid.in_(volumes))
        .group_by(VolumeBackup.volumeUuid)
    )
    return {uuid: aware(newest) for uuid, newest in rows}


def _episode(session: Session, key: str, kind: str, summary: str, uuid: str, details: dict[str, Any]) -> None:
    episode = hold(session, key)
    if episode is not None:
        notify_event(session, kind, key=f"{key}#{episode}", summary=summary, resource_uuid=uuid, details=details)


def failed_jobs(session: Session, moment: datetime) -> None:
    rows = session.scalars(
        select(ApiJob)
        .where(ApiJob.state == "Failed", ApiJob.lastOpDate >= moment - LOOKBACK)
        .order_by(ApiJob.lastOpDate)
    )
    for job in rows:
        error = job.error or {}
        what = f"{job.resourceType or 'resource'} {job.resourceUuid}" if job.resourceUuid else "no resource"
        notify_event(
            session,
            "jobFailed",
            key=job.uuid,
            summary=f"{job.action} failed ({what}): {error.get('description', 'no reason recorded')}",
            resource_uuid=job.resourceUuid,
            details={"jobUuid": job.uuid, "action": job.action, "code": error.get("code")},
        )


def disconnected(session: Session) -> None:
    hosts.reap(session)
    holding: set[str] = set()
    for host in session.scalars(select(Host).where(Host.status == "Disconnected", Host.state == "Enabled")):
        key = f"hostDisconnected/{host.uuid}"
        holding.add(key)
        last = host.lastHeartbeat.isoformat() if host.lastHeartbeat else "never"
        summary = f"host {host.name or host.uuid} is Disconnected (last heartbeat {last})"
        _episode(session, key, "hostDisconnected", summary, host.uuid, {"hostUuid": host.uuid})
    release(session, "hostDisconnected/", holding)
    holding = set()
    for storage in session.scalars(
        select(BackupStorage).where(BackupStorage.status == "Disconnected", BackupStorage.state == "Enabled")
    ):
        key = f"storageDisconnected/{storage.uuid}"
        holding.add(key)
        summary = f"backup storage {storage.name or storage.uuid} ({storage.type}) is Disconnected"
        _episode(session, key, "storageDisconnected", summary, storage.uuid, {"backupStorageUuid": storage.uuid})
    release(session, "storageDisconnected/", holding)


def full_storages(session: Session) -> None:
    threshold = rule_parameter(session, "storageFull", "fillRatio", DEFAULT_FILL_RATIO)
    holding: set[str] = set()
    for storage in session.scalars(select(BackupStorage).where(BackupStorage.totalCapacity > 0)):
        ratio = 1.0 - storage.availableCapacity / storage.totalCapacity
        if ratio < threshold:
            continue
        key = f"storageFull/{storage.uuid}"
        holding.add(key)
        summary = f"backup storage {storage.name or storage.uuid} is {ratio:.0%} full"
        details = {"backupStorageUuid": storage.uuid, "fillRatio": round(ratio, 4)}
        _episode(session, key, "storageFull", summary, storage.uuid, details)
    release(session, "storageFull/", holding)


def overdue_backups(session: Session, moment: datetime) -> None:
    tolerance = rule_parameter(session, "backupOverdue", "tolerance", DEFAULT_TOLERANCE)
    covered = schedule_intervals(session, moment)
    newest = _newest_backups(session, list(covered))
    created = dict(session.execute(select(Volume.uuid, Volume.createDate).where(Volume.uuid.in_(list(covered)))).all())
    owners: dict[str, list[tuple[float, datetime]]] = defaultdict(list)
    for volume, (interval, owner) in covered.items():
        since = newest.get(volume) or aware(created.get(volume) or moment)
        owners[owner].append((interval, since))
    holding: set[str] = set()
    for owner, seen in sorted(owners.items()):
        interval = min(i for i, _ in seen)
        oldest = min(since for _, since in seen)
        if (moment - oldest).total_seconds() <= interval * (1 + tolerance):
            continue
        key = f"backupOverdue/{owner}"
        holding.add(key)
        summary = (
            f"{owner} has no good backup since {oldest.isoformat(timespec='seconds')} "
            f"(scheduled every {interval:.0f} s)"
        )
        details = {"resourceUuid": owner, "intervalSeconds": interval, "lastGoodBackup": oldest.isoformat()}
        _episode(session, key, "backupOverdue", summary, owner, details)
    release(session, "backupOverdue/", holding)


def evaluate(session: Session, moment: datetime) -> None:
    """Record an event for everything that went wrong and is not recorded yet."""
    failed_jobs(session, moment)
    disconnected(session)
    full_storages(session)
    overdue_backups(session, moment)
