"""The protection overview (``GET /v1/overview``): every VM the caller sees with its last good
backup and whether each kind of copy is current, the API jobs running now, the failures of the
last hours, the hosts and the backup storage with its sync lag: what an operator asks first,
answered in a handful of indexed queries whatever the catalog's size.

Everything is read through :func:`shared.access.scope`, so a member gets exactly the rows the
API shows it elsewhere (its projects' VMs and backups, its own API jobs, the ImageStore
storage; no hosts).

A VM's *status*: ``none`` (no Ready backup), ``failed`` (a backup or a scheduled run of it or
one of its volumes failed after its last Ready backup), ``overdue`` (a trigger of a job group
that targets it fired at least ``grace`` ago, and no Ready backup was taken since), else
``ok``. A copy kind (``standby``: an ImageStore standby, ``remote``: Remote, ``cloud``:
PublicCloud) is *current* when every backup of the VM's last good backup has a Ready copy on
a storage of that kind; kinds the caller has no storage of are left out.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, and_, any_, bindparam, case, cast, desc, func, literal, null, or_, select, text
from sqlalchemy.orm import Session
from sqlalchemy.sql.sqltypes import NullType

from shared import access, schedule
from shared.access import Viewer
from shared.catalog.models import (
    ApiJob,
    BackupStorage,
    Host,
    SchedulerJob,
    SchedulerJobGroup,
    SchedulerJobGroupTriggerRef,
    SchedulerJobHistory,
    SchedulerTrigger,
    VmInstance,
    Volume,
    VolumeBackup,
    VolumeBackupStorageRef,
    VolumeBackupSummary,
    aware,
)
from shared.inventory import iso
from shared.service.jobgroups import trigger_spec

LAG_WINDOW = 500  # newest Ready backups a storage's sync lag is measured over
FAILURE_ROWS = 200  # failures listed at most, per source
RUNNING_ROWS = 100


STATUSES = ("ok", "overdue", "failed", "none")


@dataclass(frozen=True)
class Options:
    grace: timedelta = timedelta(hours=1)  # a scheduled fire this old must have its backup
    failures_since: timedelta = timedelta(hours=24)
    # the VM list: only VMs of this status, whose name holds ``find`` (any case) or whose uuid
    # starts with it, ``limit`` of them (None: all) from the ``start``-th
    status: str | None = None
    find: str = ""
    limit: int | None = None
    start: int = 0


def storage_kind(storage: BackupStorage) -> str:
    """master, standby, remote or cloud."""
    if storage.type == "Remote":
        return "remote"
    if storage.type == "PublicCloud":
        return "cloud"
    return "standby" if storage.role == "standby" else "master"


def overview(session: Session, viewer: Viewer, moment: datetime, options: Options = Options()) -> dict[str, Any]:
    if session.get_bind().dialect.name == "postgresql":
        # The lookups below fetch a few thousand rows by key out of 100,000s: PostgreSQL's default
        # cost of a random read (4, a disk seek) makes it scan whole tables instead; the catalog's
        # hot rows are in memory, where an index probe costs about what a sequential read does.
        # For this transaction only.
        session.execute(text("SET LOCAL random_page_cost = 1.1"))
    storages = list(session.scalars(access.scope(viewer, BackupStorage).order_by(BackupStorage.createDate)))
    vms, total, counts = _vms(session, viewer, moment, options, storages)
    return {
        "generatedAt": iso(moment),
        "vmInstances": vms,
        "vmTotal": total,
        "vmCounts": counts,
        "runningJobs": _running(session, viewer),
        "failures": _failures(session, viewer, moment - options.failures_since),
        "hosts": _hosts(session, viewer),
        "backupStorage": _storage(session, viewer, moment, storages),
    }


# -- VMs ------------------------------------------------------------------------------------------
def _vms(
    session: Session, viewer: Viewer, moment: datetime, options: Options, storages: list[BackupStorage]
) -> tuple[list[dict[str, Any]], int, dict[str, int]]:
    """The VMs ``options`` select (a page), how many it selects, and how many the caller has of
    each status. The database decides every VM's status (:func:`_vm_statuses`: its volumes'
    summary rows, its failed runs and its job groups' due fires, each group's computed here once
    and passed in), counts them and returns the page, so Python sees the page's rows only (the
    three 1,000-row results and the loop over them it replaces: docs/benchmarks.md); a VM
    backup's members and their copies are read for the page only. With ``find`` the matching is
    Python's (its ``lower``), over the VMs of the status asked."""
    counts = dict.fromkeys(STATUSES, 0)
    statuses = _vm_statuses(viewer, _due_groups(session, viewer, moment - options.grace))
    # one statement: each row carries the counts of every status (windows over all the VMs,
    # before the status filter) and, on PostgreSQL and SQLite alike, the database computes the
    # statuses once; a second statement only when the page is empty
    counted = select(
        statuses,
        *(func.sum(case((statuses.c.status == s, 1), else_=0)).over().label(f"n_{s}") for s in STATUSES),
    ).subquery()
    query = select(*counted.c, func.count().over().label("total"))
    query = query.order_by(counted.c.name, counted.c.uuid)
    if options.status:
        query = query.where(counted.c.status == options.status)
    end = None if options.limit is None else options.start + options.limit
    width = len(statuses.c)
    if options.find:
        find = options.find.lower()
        rows = _rows(session, query)
        selected = [row for row in rows if find in (row[1] or "").lower() or row[0].startswith(options.find)]
        total = len(selected)
        page = selected[options.start : end]
    else:
        if options.limit is not None:
            query = query.limit(options.limit)
        if options.start:
            query = query.offset(options.start)
        rows = _rows(session, query)
        page = list(rows)
        total = page[0][-1] if page else 0
    if rows:
        counts = dict(zip(STATUSES, (int(n) for n in rows[0][width : width + len(STATUSES)]), strict=True))
    else:
        for status, count in _rows(session, select(statuses.c.status, func.count()).group_by(statuses.c.status)):
            counts[status] = count
        if not options.find:  # a page past the end: the total is the list's
            total = counts[options.status] if options.status else sum(counts.values())
    page = [row[:width] for row in page]

    # the page's VM backups: every Ready member of the newest one's group, with its copies
    newest = _newest_ready(session, [row[0] for row in page if row[7] is not None])
    groups = sorted({b["groupUuid"] for b in newest.values() if b["groupUuid"]})
    alone = [b["uuid"] for b in newest.values() if not b["groupUuid"]]
    members: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for backup in _backups(session, VolumeBackup.groupUuid, groups):
        members[backup["groupUuid"]].append(backup)
    held_alone = {b["uuid"]: b["held"] for b in _backups(session, VolumeBackup.uuid, alone)}
    kinds = {s.uuid: storage_kind(s) for s in storages}
    present = sorted({k for k in kinds.values() if k != "master"})
    out = []
    for (
        vm_uuid,
        name,
        project,
        host,
        state,
        volumes,
        failed_backup,
        _ready,
        failed_run,
        status,
        overdue,
        scheduled,
    ) in page:
        failures = [aware(when) for when in (failed_run, failed_backup) if when is not None]
        failed_at = max(failures, default=None)
        backups: list[dict[str, Any]] = []
        chosen = newest.get(vm_uuid)
        if chosen is not None:
            backups = members.get(chosen["groupUuid"]) or [{**chosen, "held": held_alone.get(chosen["uuid"], set())}]
        last = max((b["createDate"] for b in backups), default=None)
        held = [{kinds.get(s) for s in b["held"]} for b in backups]
        out.append(
            {
                "uuid": vm_uuid,
                "name": name,
                "projectUuid": project,
                "hostUuid": host,
                "state": state,
                "volumes": volumes,
                "status": status,
                "overdue": bool(overdue),
                "scheduled": bool(scheduled),
                "lastFailure": iso(failed_at),
                "lastBackup": (
                    {
                        "uuid": backups[0]["uuid"],
                        "groupUuid": backups[0]["groupUuid"],
                        "name": backups[0]["name"],
                        "createDate": iso(last),
                        "ageSeconds": int((moment - last).total_seconds()),
                        "size": sum(b["size"] for b in backups),
                        "mode": sorted({b["mode"] for b in backups}),
                        "volumeBackups": len(backups),
                    }
                    if backups and last
                    else None
                ),
                "copies": {kind: bool(held) and all(kind in h for h in held) for kind in present},
            }
        )
    return out, total, counts


def _vm_statuses(viewer: Viewer, due_groups: dict[str, datetime | None]) -> Any:
    """Every VM the caller sees with its status, decided by the database (a subquery): uuid,
    name, project, host, state, how many volumes it has, the newest Failed backup date over its
    volumes, the newest Ready one, its newest failed run (of it or a volume), status, overdue
    (0/1), scheduled (0/1). A VM is scheduled when a job group of ``due_groups`` targets it, and
    overdue when one of those groups' due fires is after its newest Ready backup (or it has
    none): the newest of its groups' due fires is compared, each group's passed in as a bound
    parameter (``CASE group WHEN ...``), so PostgreSQL and SQLite read the same statement."""
    summary = _vm_summary(viewer).subquery()
    runs = _failed_runs_query(viewer).subquery()
    pairs = _scheduled_groups(viewer).subquery()
    vm, group = pairs.c
    scheduled: Any = literal(0)
    due: Any = cast(null(), DateTime(timezone=True))  # typed: PostgreSQL compares it with dates
    if due_groups:
        # one expanding parameter a due time (the groups of one schedule share theirs), not two
        # parameters a group: building 100 bound parameters cost more of the API's CPU than the rest
        scheduled = func.max(case((group.in_(bindparam("scheduled", sorted(due_groups), expanding=True)), 1), else_=0))
        by_due: dict[datetime, list[str]] = defaultdict(list)
        for g, when in sorted(due_groups.items()):
            if when is not None:
                by_due[when].append(g)
        if by_due:
            due = func.max(
                case(
                    *(
                        (
                            group.in_(bindparam(f"due{i}", groups, expanding=True)),
                            literal(when, DateTime(timezone=True)),
                        )
                        for i, (when, groups) in enumerate(sorted(by_due.items()))
                    )
                )
            )
    per_vm = select(vm.label("vm"), scheduled.label("scheduled"), due.label("due")).group_by(vm).subquery()
    uuid, _name, _project, _host, _state, _volumes, failed, ready = summary.c
    failed_run = runs.c.failed
    failed_after = or_(failed > ready, failed_run > ready)
    status = case(
        (ready.is_(None), case((or_(failed.is_not(None), failed_run.is_not(None)), "failed"), else_="none")),
        (failed_after, "failed"),
        (and_(per_vm.c.due.is_not(None), per_vm.c.due > ready), "overdue"),
        else_="ok",
    )
    overdue = case((and_(per_vm.c.due.is_not(None), or_(ready.is_(None), per_vm.c.due > ready)), 1), else_=0)
    return (
        select(
            *summary.c,
            failed_run.label("failed_run"),
            status.label("status"),
            overdue.label("overdue"),
            func.coalesce(per_vm.c.scheduled, 0).label("scheduled"),
        )
        .outerjoin(runs, runs.c.vm == uuid)
        .outerjoin(per_vm, per_vm.c.vm == uuid)
        .subquery()
    )


def _vm_summary(viewer: Viewer) -> Any:
    """Every VM the caller sees, by name: uuid, name, project, host, state, how many volumes it
    has, the newest Failed and the newest Ready backup date over its volumes (their summary
    rows, grouped by the database)."""
    per_vm = (
        select(
            Volume.vmInstanceUuid.label("vm"),
            func.count(Volume.uuid).label("volumes"),
            func.max(VolumeBackupSummary.failedDate).label("failed"),
            func.max(VolumeBackupSummary.readyDate).label("ready"),
        )
        .outerjoin(VolumeBackupSummary, VolumeBackupSummary.volumeUuid == Volume.uuid)
        .where(Volume.vmInstanceUuid.is_not(None))
        .group_by(Volume.vmInstanceUuid)
        .subquery()
    )
    return (
        access.scope(viewer, VmInstance)
        .with_only_columns(
            VmInstance.uuid,
            VmInstance.name,
            VmInstance.projectUuid,
            VmInstance.hostUuid,
            VmInstance.state,
            func.coalesce(per_vm.c.volumes, 0),
            per_vm.c.failed,
            per_vm.c.ready,
        )
        .outerjoin(per_vm, per_vm.c.vm == VmInstance.uuid)
    )


_BACKUP_COLUMNS = (
    VolumeBackup.uuid,
    VolumeBackup.name,
    VolumeBackup.groupUuid,
    VolumeBackup.createDate,
    VolumeBackup.size,
    VolumeBackup.mode,
)


def _backup(uuid: str, name: str, group: str | None, created: datetime, size: int | None, mode: str) -> dict[str, Any]:
    return {
        "uuid": uuid,
        "name": name,
        "groupUuid": group,
        "createDate": aware(created),
        "size": size or 0,
        "mode": mode,
    }


def _newest_ready(session: Session, vms: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The newest Ready volume backup of each of ``vms`` over its volumes, by VM: its volumes'
    summary rows and the backups by their key (the newest date, then the highest uuid)."""
    found: dict[str, tuple[datetime, str, dict[str, Any]]] = {}
    for clause in _among(session, Volume.vmInstanceUuid, vms):
        query = (
            select(Volume.vmInstanceUuid, VolumeBackupSummary.readyDate, *_BACKUP_COLUMNS)
            .join(VolumeBackupSummary, VolumeBackupSummary.volumeUuid == Volume.uuid)
            .join(VolumeBackup, VolumeBackup.uuid == VolumeBackupSummary.readyUuid)
        )
        for vm, ready, *backup in _rows(session, query.where(clause)):
            key = (aware(ready), backup[0])
            if vm not in found or key > found[vm][:2]:
                found[vm] = (*key, _backup(*backup))
    return {vm: backup for vm, (_date, _uuid, backup) in found.items()}


def _rows(session: Session, query: Any) -> Sequence[Any]:
    """The rows of a plain (Core) select: many thousand rows are read here, and the ORM's result
    processing (entities, identity map) of a select of columns only costs time."""
    return session.connection().execute(query).all()


def _among(session: Session, column: Any, values: Sequence[str]) -> list[Any]:
    """``column IN values`` as few clauses as the database allows: on PostgreSQL one
    ``= ANY(array)`` with a single parameter (an expanded IN of 1,000 parameters cost more to
    compile in SQLAlchemy than to run), elsewhere IN lists of 1,000."""
    if not values:
        return []
    if session.get_bind().dialect.name == "postgresql":
        # no SQLAlchemy ARRAY type: its item processor walks the list in Python; psycopg2 sends
        # a list as an array as it is
        return [column == any_(bindparam(None, list(values), type_=NullType()))]
    return [column.in_(values[start : start + 1000]) for start in range(0, len(values), 1000)]


def _backups(session: Session, column: Any, keys: Sequence[str]) -> list[dict[str, Any]]:
    """The Ready backups whose ``column`` (uuid or groupUuid) is one of ``keys``, as plain dicts,
    each with ``held``: the storages that hold a Ready copy of it (one row per copy)."""
    found: dict[str, dict[str, Any]] = {}
    for clause in _among(session, column, keys):
        query = (
            select(*_BACKUP_COLUMNS, VolumeBackupStorageRef.backupStorageUuid)
            .outerjoin(
                VolumeBackupStorageRef,
                and_(
                    VolumeBackupStorageRef.volumeBackupUuid == VolumeBackup.uuid,
                    VolumeBackupStorageRef.status == "Ready",
                ),
            )
            .where(clause, VolumeBackup.status == "Ready")
        )
        for *backup, storage in _rows(session, query):
            row = found.get(backup[0])
            if row is None:
                row = found[backup[0]] = {**_backup(*backup), "held": set()}
            if storage:
                row["held"].add(storage)
    return list(found.values())


def _failed_runs_query(viewer: Viewer) -> Any:
    """The newest failed scheduled run the caller may see of each target, by VM (``vm``: the
    target's VM for a volume, else the target; ``failed``). Only joined to the VMs the caller
    sees: a run of a VM it does not see, or of a detached volume, joins no row, so the targets
    need no filter of their own (it cost PostgreSQL two hashed subplans a call)."""
    vm = _target_vm(SchedulerJobHistory.targetResourceUuid)
    return (
        access.scope(viewer, SchedulerJobHistory)
        .with_only_columns(vm.label("vm"), func.max(SchedulerJobHistory.executeTime).label("failed"))
        .outerjoin_from(SchedulerJobHistory, Volume, Volume.uuid == SchedulerJobHistory.targetResourceUuid)
        .where(SchedulerJobHistory.success.is_(False), SchedulerJobHistory.targetResourceUuid.is_not(None))
        .group_by(vm)
    )


def _target_vm(target: Any) -> Any:
    """A scheduled target's VM: the volume's VM when ``target`` is a volume (joined as
    ``Volume``), else ``target`` itself."""
    return func.coalesce(Volume.vmInstanceUuid, target)


def _enabled_groups(viewer: Viewer) -> Any:
    return (
        access.scope(viewer, SchedulerJobGroup)
        .where(SchedulerJobGroup.state == "Enabled")
        .with_only_columns(SchedulerJobGroup.uuid)
    )


def _scheduled_groups(viewer: Viewer) -> Any:
    """(VM, job group) of every enabled job of an enabled group the caller sees whose target is
    the VM or one of its volumes (a pair may repeat: it is aggregated by VM)."""
    vm = _target_vm(SchedulerJob.targetResourceUuid)
    return (
        select(vm, SchedulerJob.schedulerJobGroupUuid)
        .outerjoin_from(SchedulerJob, Volume, Volume.uuid == SchedulerJob.targetResourceUuid)
        .where(
            SchedulerJob.schedulerJobGroupUuid.in_(_enabled_groups(viewer)),
            SchedulerJob.state == "Enabled",
            SchedulerJob.targetResourceUuid.is_not(None),
        )
    )


def _due_groups(session: Session, viewer: Viewer, before: datetime) -> dict[str, datetime | None]:
    """For every enabled group the caller sees with an enabled trigger: the newest fire at or
    before ``before`` of its enabled triggers (None: scheduled, nothing due yet), computed once a
    trigger and once a group, not once a target."""
    triggers: dict[str, list[SchedulerTrigger]] = defaultdict(list)
    query = (
        select(SchedulerJobGroupTriggerRef.schedulerJobGroupUuid, SchedulerTrigger)
        .join(SchedulerTrigger, SchedulerTrigger.uuid == SchedulerJobGroupTriggerRef.schedulerTriggerUuid)
        .where(
            SchedulerJobGroupTriggerRef.schedulerJobGroupUuid.in_(_enabled_groups(viewer)),
            SchedulerTrigger.state == "Enabled",
        )
    )
    due: dict[str, datetime | None] = {}
    for group_uuid, attached in session.execute(query).all():
        triggers[group_uuid].append(attached)
    for trigger in {t.uuid: t for ts in triggers.values() for t in ts}.values():
        due[trigger.uuid] = schedule.due_fire(trigger_spec(trigger), aware(trigger.createDate), None, before)
    return {
        group_uuid: max((w for w in (due[t.uuid] for t in group_triggers) if w is not None), default=None)
        for group_uuid, group_triggers in triggers.items()
    }


# -- jobs and failures ----------------------------------------------------------------------------
def _running(session: Session, viewer: Viewer) -> list[dict[str, Any]]:
    query = (
        access.scope(viewer, ApiJob)
        .where(ApiJob.state.in_(("Pending", "Running")))
        .order_by(ApiJob.createDate)
        .limit(RUNNING_ROWS)
    )
    return [
        {
            "uuid": job.uuid,
            "action": job.action,
            "state": job.state,
            "progress": job.progress,
            "resourceUuid": job.resourceUuid,
            "resourceType": job.resourceType,
            "hostUuid": job.hostUuid,
            "createDate": iso(job.createDate),
        }
        for job in session.scalars(query)
    ]


def _failures(session: Session, viewer: Viewer, since: datetime) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    # the columns shown only, not whole rows (a run's request and a job's parameters stay behind)
    jobs = (
        access.scope(viewer, ApiJob)
        .with_only_columns(ApiJob.uuid, ApiJob.action, ApiJob.resourceUuid, ApiJob.lastOpDate, ApiJob.error)
        .where(ApiJob.state == "Failed", ApiJob.lastOpDate >= since)
        .order_by(desc(ApiJob.lastOpDate))
        .limit(FAILURE_ROWS)
    )
    for uuid, action, resource, when, job_error in _rows(session, jobs):
        error = job_error or {}
        out.append(
            {
                "source": "apiJob",
                "uuid": uuid,
                "action": action,
                "resourceUuid": resource,
                "date": iso(aware(when)),
                "code": error.get("code"),
                "reason": error.get("description"),
            }
        )
    runs = (
        access.scope(viewer, SchedulerJobHistory)
        .with_only_columns(
            SchedulerJobHistory.id,
            SchedulerJobHistory.schedulerJobGroupUuid,
            SchedulerJobHistory.targetResourceUuid,
            SchedulerJobHistory.executeTime,
            SchedulerJobHistory.resultDump,
        )
        .where(SchedulerJobHistory.success.is_(False), SchedulerJobHistory.executeTime >= since)
        .order_by(desc(SchedulerJobHistory.executeTime))
        .limit(FAILURE_ROWS)
    )
    for run_id, group, target, executed, result in _rows(session, runs):
        try:
            error = (json.loads(result or "{}") or {}).get("error") or {}
        except (ValueError, AttributeError):
            error = {}
        out.append(
            {
                "source": "jobHistory",
                "id": run_id,
                "schedulerJobGroupUuid": group,
                "resourceUuid": target,
                "date": iso(aware(executed)),
                "code": error.get("code") if isinstance(error, dict) else None,
                "reason": error.get("description") if isinstance(error, dict) else str(error),
            }
        )
    out.sort(key=lambda row: row["date"] or "", reverse=True)
    return out


# -- hosts and storage ----------------------------------------------------------------------------
def _hosts(session: Session, viewer: Viewer) -> list[dict[str, Any]]:
    query = access.scope(viewer, Host).order_by(Host.name, Host.uuid)
    return [
        {
            "uuid": host.uuid,
            "name": host.name,
            "hostname": host.hostname,
            "managementIp": host.managementIp,
            "status": host.status,
            "lastHeartbeat": iso(host.lastHeartbeat),
        }
        for host in session.scalars(query)
    ]


def _storage(session: Session, viewer: Viewer, moment: datetime, storages: list[BackupStorage]) -> list[dict[str, Any]]:
    """Each storage with its capacity and, for a copy (not a master), its sync lag over the
    newest :data:`LAG_WINDOW` Ready backups (the createDate index, newest first): how many of those newer than its
    newest copy it lacks, and how long the oldest of them has waited."""
    masters = [s.uuid for s in storages if storage_kind(s) == "master"]
    copies = [s for s in storages if storage_kind(s) != "master"]
    window: list[tuple[datetime, set[str]]] = []
    if masters and copies:
        window = _lag_window(session, viewer, [s.uuid for s in copies])
    out = []
    for storage in storages:
        row: dict[str, Any] = {
            "uuid": storage.uuid,
            "name": storage.name,
            "type": storage.type,
            "role": storage.role,
            "kind": storage_kind(storage),
            "url": storage.url,
            "state": storage.state,
            "status": storage.status,
            "totalCapacity": storage.totalCapacity,
            "availableCapacity": storage.availableCapacity,
            "syncLag": None,
        }
        if storage in copies:
            missing = []
            for created, holders in window:
                if storage.uuid in holders:
                    break
                missing.append(created)
            row["syncLag"] = {
                "missingBackups": len(missing),
                "atLeast": len(missing) == LAG_WINDOW,
                "seconds": int((moment - min(missing)).total_seconds()) if missing else 0,
            }
        out.append(row)
    return out


def _lag_window(session: Session, viewer: Viewer, copy_storages: list[str]) -> list[tuple[datetime, set[str]]]:
    """The newest :data:`LAG_WINDOW` Ready backups the caller sees, newest first, each with the
    copy storages holding a Ready copy of it: the window first (the createDate index, read
    backwards), then its copies through the (backup, storage) index, 500 probes; an EXISTS per
    storage in the select list made PostgreSQL hash every copy of the storage (~350 ms at 100,000
    backups)."""
    newest = (
        access.scope(viewer, VolumeBackup)
        .with_only_columns(VolumeBackup.uuid, VolumeBackup.createDate)
        .where(VolumeBackup.status == "Ready")
        .order_by(desc(VolumeBackup.createDate))
        .limit(LAG_WINDOW)
        .subquery()
    )
    query = (
        select(newest.c.uuid, newest.c.createDate, VolumeBackupStorageRef.backupStorageUuid)
        .outerjoin(
            VolumeBackupStorageRef,
            and_(
                VolumeBackupStorageRef.volumeBackupUuid == newest.c.uuid,
                VolumeBackupStorageRef.status == "Ready",
                VolumeBackupStorageRef.backupStorageUuid.in_(copy_storages),
            ),
        )
        .order_by(desc(newest.c.createDate), newest.c.uuid)
    )
    window: dict[str, tuple[datetime, set[str]]] = {}
    for uuid, created, storage in _rows(session, query):
        entry = window.get(uuid)
        if entry is None:
            entry = window[uuid] = (aware(created), set())
        if storage:
            entry[1].add(storage)
    return list(window.values())
