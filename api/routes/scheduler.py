"""Scheduling routes (docs/api.md "Scheduling"): job groups, their targets, triggers, attachments.

Besides the shortcut ``POST /v1/scheduler/jobgroups/{uuid}/jobs {targetResourceUuids}``, ZStack's
own steps: ``POST /v1/scheduler/jobs`` (a job of its own, in no group yet), then
``POST /v1/scheduler/jobgroups/{uuid}/jobs {schedulerJobUuids}`` (the same rows either way);
``DELETE /v1/scheduler/jobgroups/{uuid}/jobs?schedulerJobUuids=`` takes jobs out again,
``PUT /v1/scheduler/jobs/{uuid}/actions {updateSchedulerJob}`` and ``DELETE /v1/scheduler/jobs/{uuid}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import Caller
from api.deps import CurrentCaller, DbSession, get_caller
from api.envelopes import Envelope, check_uuid, ok, parse_action
from api.schemas import Done, FireTimes, one_answer
from shared import access, schedule
from shared.catalog.models import (
    BackupStorage,
    SchedulerJob,
    SchedulerJobGroup,
    SchedulerTrigger,
    VmInstance,
    Volume,
    aware,
    now,
)
from shared.errors import InvalidArgument
from shared.inventory import inventory, iso
from shared.service import jobgroups, scheduled_runs

router = APIRouter(dependencies=[Depends(get_caller)])
MAX_FIRE_TIMES = 100


def _group(session: Session, uuid: str, caller: Caller) -> SchedulerJobGroup:
    group: SchedulerJobGroup = access.visible(session, caller, SchedulerJobGroup, check_uuid(uuid, "uuid"), "job group")
    return group


def _trigger(session: Session, uuid: str, caller: Caller) -> SchedulerTrigger:
    trigger: SchedulerTrigger = access.visible(session, caller, SchedulerTrigger, check_uuid(uuid, "uuid"), "trigger")
    return trigger


def _check_job_data(session: Session, caller: Caller, params: dict[str, Any]) -> None:
    """A member's group (or job) copies only to storage it may use, and never backs up the
    catalog; ``params`` in :func:`jobgroups.group_params`' spelling. A jobData that is not an
    object is left to the validation that follows (400)."""
    if caller.admin:
        return
    if params.get("type") in jobgroups.ADMIN_JOB_TYPES:
        access.require_admin(caller, f"a {params['type']} job group")
    data = params.get("parameters") or {}
    storages = data.get("backupStorageUuids") if isinstance(data, dict) else None
    for uuid in storages if isinstance(storages, list) else []:
        access.visible(session, caller, BackupStorage, check_uuid(uuid, "backupStorageUuid"), "backup storage")


def _target_model(kind: Any) -> type[Volume | VmInstance | BackupStorage]:
    """What a job of type ``kind`` targets: a VM, a backup storage (maintenance types), a volume."""
    if kind == "vmBackup":
        return VmInstance
    return BackupStorage if kind in jobgroups.MAINTENANCE_TYPES else Volume


def _check_targets(session: Session, caller: Caller, group: SchedulerJobGroup, targets: Any) -> None:
    if caller.admin or not isinstance(targets, list):
        return
    model = _target_model(group.jobType)
    for target in targets:
        access.visible(session, caller, model, check_uuid(str(target), "targetResourceUuid"), "target")


def group_inventory(session: Session, group: SchedulerJobGroup) -> dict[str, Any]:
    session.flush()
    return inventory(session, group)


def _ok(data: dict[str, Any]) -> JSONResponse:
    return JSONResponse({"inventory": data, "success": True})


@router.post("/scheduler/jobgroups", response_model=one_answer(SchedulerJobGroup))
def create_group(body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    params = jobgroups.group_params(body.params)
    _check_job_data(session, caller, params)
    project = access.project_for(caller, params.get("projectUuid"))
    group = jobgroups.create_group(session, {k: v for k, v in params.items() if k != "projectUuid"})
    group.projectUuid = project
    return _ok(group_inventory(session, group))


@router.put("/scheduler/jobgroups/{uuid}/actions", response_model=one_answer(SchedulerJobGroup))
def group_action(
    uuid: str,
    body: dict[str, Any],
    session: DbSession,
    caller: CurrentCaller,
) -> JSONResponse:
    name, params = parse_action(
        body, ("updateSchedulerJobGroup", "runSchedulerJobGroup", "changeSchedulerJobGroupState")
    )
    params = jobgroups.group_params(params)
    group = _group(session, uuid, caller)
    _check_job_data(session, caller, {"type": group.jobType, **params})
    if name == "runSchedulerJobGroup":
        created = scheduled_runs.run_now(session, group)
        return JSONResponse({"inventory": {**group_inventory(session, group), "jobsStarted": created}, "success": True})
    if name == "changeSchedulerJobGroupState":
        params = {"state": params.get("stateEvent")}
    jobgroups.update_group(session, group, params)
    session.flush()
    return _ok(group_inventory(session, group))


@router.delete("/scheduler/jobgroups/{uuid}", response_model=Done)
def delete_group(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    group = _group(session, uuid, caller)
    for job in session.scalars(select(SchedulerJob).where(SchedulerJob.schedulerJobGroupUuid == group.uuid)):
        session.delete(job)
    session.delete(group)
    return ok()


@router.post("/scheduler/jobgroups/{uuid}/jobs", response_model=one_answer(SchedulerJobGroup))
def add_jobs(
    uuid: str,
    body: Envelope,
    session: DbSession,
    caller: CurrentCaller,
) -> JSONResponse:
    group = _group(session, uuid, caller)
    job_uuids = body.params.get("schedulerJobUuids")
    if job_uuids is not None:
        if "targetResourceUuids" in body.params:
            raise InvalidArgument(detail="give targetResourceUuids or schedulerJobUuids, not both")
        jobgroups.add_jobs(session, group, _jobs(session, caller, job_uuids))
        return _ok(group_inventory(session, group))
    targets = body.params.get("targetResourceUuids")
    _check_targets(session, caller, group, targets)
    if isinstance(targets, list):
        for target in targets:
            check_uuid(str(target), "targetResourceUuid")
    jobgroups.add_targets(session, group, targets)  # type: ignore[arg-type]
    return _ok(group_inventory(session, group))


@router.delete("/scheduler/jobgroups/{uuid}/jobs", response_model=one_answer(SchedulerJobGroup))
def remove_jobs(
    uuid: str,
    session: DbSession,
    caller: CurrentCaller,
    targetResourceUuids: str = "",
    schedulerJobUuids: str = "",
) -> JSONResponse:
    """Delete the jobs of the targets named, or take the jobs named out of the group (they remain)."""
    group = _group(session, uuid, caller)
    if schedulerJobUuids:
        if targetResourceUuids:
            raise InvalidArgument(detail="give targetResourceUuids or schedulerJobUuids, not both")
        jobgroups.remove_jobs(session, group, _jobs(session, caller, [j for j in schedulerJobUuids.split(",") if j]))
        return _ok(group_inventory(session, group))
    targets = [check_uuid(t, "targetResourceUuid") for t in targetResourceUuids.split(",") if t]
    if not targets:
        raise InvalidArgument(detail="targetResourceUuids is required")
    jobgroups.remove_targets(session, group, targets)
    session.flush()
    return _ok(group_inventory(session, group))


def _jobs(session: Session, caller: Caller, uuids: Any) -> list[SchedulerJob]:
    if not isinstance(uuids, list) or not uuids or not all(isinstance(u, str) for u in uuids):
        raise InvalidArgument(detail="schedulerJobUuids must be a non-empty list of uuids")
    return [_job(session, uuid, caller) for uuid in dict.fromkeys(uuids)]


def _job(session: Session, uuid: str, caller: Caller) -> SchedulerJob:
    job: SchedulerJob = access.visible(session, caller, SchedulerJob, check_uuid(uuid, "uuid"), "scheduler job")
    return job


@router.post("/scheduler/jobs", response_model=one_answer(SchedulerJob))
def create_job(body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """ZStack's CreateSchedulerJob: ``name``, ``description``, ``targetResourceUuid``, ``type``
    (volumeBackup|vmBackup), ``parameters`` (jobData), ``projectUuid``; in no group until
    ``POST /v1/scheduler/jobgroups/{uuid}/jobs {schedulerJobUuids}``."""
    p = jobgroups.group_params(body.params)
    _check_job_data(session, caller, p)
    target = p.get("targetResourceUuid")
    if not caller.admin:
        model = _target_model(p.get("type"))
        access.visible(session, caller, model, check_uuid(target, "targetResourceUuid"), "target")
    elif target is not None:
        check_uuid(target, "targetResourceUuid")
    project = access.project_for(caller, p.get("projectUuid"))
    job = jobgroups.create_job(session, {k: v for k, v in p.items() if k != "projectUuid"})
    job.projectUuid = project
    session.flush()
    return _ok(inventory(session, job))


@router.put("/scheduler/jobs/{uuid}/actions", response_model=one_answer(SchedulerJob))
def job_action(
    uuid: str,
    body: dict[str, Any],
    session: DbSession,
    caller: CurrentCaller,
) -> JSONResponse:
    _name, params = parse_action(body, ("updateSchedulerJob",))
    params = jobgroups.group_params(params)
    job = _job(session, uuid, caller)
    _check_job_data(session, caller, {"type": job.jobType, **params})
    jobgroups.update_job(session, job, params)
    session.flush()
    return _ok(inventory(session, job))


@router.delete("/scheduler/jobs/{uuid}", response_model=Done)
def delete_job(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    session.delete(_job(session, uuid, caller))
    return ok()


@router.post("/scheduler/triggers", response_model=one_answer(SchedulerTrigger))
def create_trigger(body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    project = access.project_for(caller, body.params.get("projectUuid"))
    trigger = jobgroups.create_trigger(session, {k: v for k, v in body.params.items() if k != "projectUuid"})
    trigger.projectUuid = project
    session.flush()
    return _ok(inventory(session, trigger))


@router.put("/scheduler/triggers/{uuid}/actions", response_model=one_answer(SchedulerTrigger))
def trigger_action(
    uuid: str,
    body: dict[str, Any],
    session: DbSession,
    caller: CurrentCaller,
) -> JSONResponse:
    name, params = parse_action(body, ("updateSchedulerTrigger", "runSchedulerTrigger"))
    trigger = _trigger(session, uuid, caller)
    if name == "updateSchedulerTrigger":
        jobgroups.update_trigger(session, trigger, params)
        session.flush()
        return _ok(inventory(session, trigger))
    job_uuids = params.get("jobUuids")
    if job_uuids is not None and (not isinstance(job_uuids, list) or not all(isinstance(j, str) for j in job_uuids)):
        raise InvalidArgument(detail="jobUuids must be a list of scheduler job uuids")
    started = 0
    for group_uuid in _attached(session, trigger):
        group = session.scalars(
            access.scope(caller, SchedulerJobGroup).where(SchedulerJobGroup.uuid == group_uuid)
        ).first()  # a member runs only its own groups on a shared trigger
        if group is not None:
            started += scheduled_runs.run_now(session, group, trigger.uuid, job_uuids)
    return JSONResponse({"inventory": {**inventory(session, trigger), "jobsStarted": started}, "success": True})


@router.get("/scheduler/triggers/{uuid}/fire-times", response_model=FireTimes)
def fire_times(uuid: str, session: DbSession, caller: CurrentCaller, count: str | None = None) -> JSONResponse:
    """The trigger's next fire times from now, by the scheduler's own rules (shared.schedule)."""
    trigger = _trigger(session, uuid, caller)
    if count is not None and (not count.isdigit() or not 1 <= int(count) <= MAX_FIRE_TIMES):
        raise InvalidArgument(detail=f"count must be a whole number from 1 to {MAX_FIRE_TIMES}")
    times = schedule.next_fire_times(jobgroups.trigger_spec(trigger), aware(trigger.createDate), now(), int(count or 5))
    return JSONResponse({"success": True, "fireTimes": [iso(t) for t in times]})


def _attached(session: Session, trigger: SchedulerTrigger) -> list[str]:
    from shared.catalog.models import SchedulerJobGroupTriggerRef as Ref

    return list(session.scalars(select(Ref.schedulerJobGroupUuid).where(Ref.schedulerTriggerUuid == trigger.uuid)))


@router.delete("/scheduler/triggers/{uuid}", response_model=Done)
def delete_trigger(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    session.delete(_trigger(session, uuid, caller))
    return ok()


@router.post("/scheduler/triggers/{trigger_uuid}/jobgroups/{group_uuid}", response_model=one_answer(SchedulerJobGroup))
def attach(
    trigger_uuid: str,
    group_uuid: str,
    session: DbSession,
    caller: CurrentCaller,
    body: Envelope | None = None,
) -> JSONResponse:
    trigger, group = _trigger(session, trigger_uuid, caller), _group(session, group_uuid, caller)
    jobgroups.attach(session, trigger, group)
    started = 0
    if body is not None and body.params.get("triggerNow"):
        session.commit()
        started = scheduled_runs.run_now(session, group, trigger.uuid)
    return JSONResponse({"inventory": {**group_inventory(session, group), "jobsStarted": started}, "success": True})


@router.delete("/scheduler/triggers/{trigger_uuid}/jobgroups/{group_uuid}", response_model=Done)
def detach(
    trigger_uuid: str,
    group_uuid: str,
    session: DbSession,
    caller: CurrentCaller,
) -> JSONResponse:
    jobgroups.detach(session, _trigger(session, trigger_uuid, caller), _group(session, group_uuid, caller))
    return ok()
