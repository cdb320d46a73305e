"""``GET /v1/api-jobs/{uuid}``: an API job's state while it runs, its result when it is done."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.deps import CurrentCaller, DbSession, get_caller
from api.envelopes import JobRunning
from api.schemas import JobResult
from shared import hosts
from shared.catalog.models import ApiJob
from shared.errors import NotFound

router = APIRouter(dependencies=[Depends(get_caller)])
JOB_RUNNING: dict[int | str, dict[str, Any]] = {202: {"model": JobRunning, "description": "The job is still running"}}


@router.get("/api-jobs/{uuid}", response_model=JobResult, responses=JOB_RUNNING)
def get_job(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    job = session.get(ApiJob, uuid)
    if job is None or not (caller.admin or job.accountUuid == caller.account_uuid):
        raise NotFound(resource="API job", uuid=uuid)
    status, body = job_answer(session, job)
    return JSONResponse(body, status_code=status)


def job_answer(session: Session, job: ApiJob) -> tuple[int, dict[str, Any]]:
    """An API job's status and answer: 202 while it runs, 200 with its result, or its error's."""
    if job.state in ("Pending", "Running") and job.hostUuid:
        hosts.reap(session)  # a job on a host whose worker is gone fails now, not never
        session.refresh(job)
    if job.state in ("Pending", "Running"):
        return 202, {
            "state": "Running",
            "progress": job.progress,
            "jobUuid": job.uuid,
            "resourceUuid": job.resourceUuid,
        }
    if job.state == "Succeeded":
        return 200, {"inventory": job.result or {}, "success": True}
    error = job.error or {"code": "INTERNAL_ERROR", "description": "failed", "details": ""}
    status = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400, "PATH_NOT_ALLOWED": 400, "DATABASE_UNAVAILABLE": 503}.get(
        error["code"], 500
    )
    if error["code"] in ("CONFLICT", "HOST_DISCONNECTED", "VOLUME_ERROR", "TARGET_EXISTS", "STORAGE_BUSY"):
        status = 409
    return status, {"success": False, "error": error}
