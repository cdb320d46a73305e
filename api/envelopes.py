"""ZStack's envelopes and what every router checks in a request (docs/api.md "Envelopes").

A request body is ``{"params": {...}, "userTags": [...], "systemTags": [...]}``
(:class:`Envelope`) or, for an action, ``{"<actionName>": {...}}`` (:func:`parse_action`); an
answer is ``{"inventory": ...}`` (:func:`one`), ``{"inventories": [...]}``, a 202 with the
API job to poll (:func:`accepted`), or the error envelope (:func:`error_body`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator
from sqlalchemy.orm import Session

from shared import access
from shared.catalog.models import ApiJob, BackupStorage, Base, Tag
from shared.errors import Forbidden, InvalidArgument
from shared.inventory import inventory

from .auth import Caller

UUID = re.compile(r"^[0-9a-f]{32}$")


# -- errors ----------------------------------------------------------------------------------------
def error_body(code: str, description: str, details: str = "") -> dict[str, Any]:
    return {"success": False, "error": {"code": code, "description": description, "details": details}}


class ErrorDetail(BaseModel):
    code: str
    description: str
    details: str


class ErrorEnvelope(BaseModel):
    """Every error answer: ``{"success": false, "error": {"code", "description", "details"}}``."""

    success: Literal[False]
    error: ErrorDetail


ERROR_STATUSES = {
    400: "Invalid argument (INVALID_ARGUMENT, PATH_NOT_ALLOWED, ...)",
    401: "Missing or unknown API key (UNAUTHORIZED)",
    403: "Not allowed for this caller (FORBIDDEN)",
    404: "No such resource, or not visible to this caller (NOT_FOUND)",
    409: "Conflict with the resource's state (CONFLICT, ...)",
    413: "Request body too large (PAYLOAD_TOO_LARGE)",
    429: "Too many failed authentications from this client (TOO_MANY_REQUESTS)",
    503: "The catalog database or a storage is unavailable",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": text} for status, text in ERROR_STATUSES.items()
}


# -- requests --------------------------------------------------------------------------------------
class Envelope(BaseModel):
    """ZStack's request body: ``params`` plus optional tags."""

    params: dict[str, Any] = Field(default_factory=dict)
    systemTags: list[str] = Field(default_factory=list)
    userTags: list[str] = Field(default_factory=list)

    @field_validator("params")
    @classmethod
    def _text_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """These are text wherever they appear: anything else is a 400, not a database error or a 500."""
        for key in ("name", "description", "type", "projectUuid"):
            if not isinstance(params.get(key), str | None):
                raise ValueError(f"{key} must be a string")
        return params


def check_uuid(value: object, what: str) -> str:
    if not isinstance(value, str) or not UUID.match(value):
        raise InvalidArgument(detail=f"{what} {value!r} is not a uuid (32 lowercase hex digits)")
    return value


def parse_action(body: dict[str, Any], allowed: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """``{"<action>": {params}}``: the action (one of ``allowed``) and its parameters."""
    if len(body) != 1:
        raise InvalidArgument(detail=f"the body names exactly one action, one of: {', '.join(allowed)}")
    name, params = next(iter(body.items()))
    if name not in allowed:
        raise InvalidArgument(detail=f"unknown action {name!r}; expected one of: {', '.join(allowed)}")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidArgument(detail=f"{name} takes an object of parameters")
    return name, params


def state_event(params: dict[str, Any]) -> str:
    """``stateEvent`` enable|disable as the state it sets."""
    event = params.get("stateEvent")
    if event not in ("enable", "disable"):
        raise InvalidArgument(detail="stateEvent must be enable or disable")
    return "Enabled" if event == "enable" else "Disabled"


def non_negative_int(params: dict[str, Any], key: str, default: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(detail=f"{key} must be a non-negative integer")
    return value


def add_tags(session: Session, row: Base, body: Envelope) -> None:
    """The tags a create body carries, on the new row."""
    for kind, tags in (("user", body.userTags), ("system", body.systemTags)):
        for tag in tags:
            session.add(Tag(resourceUuid=row.uuid, resourceType=row.resource_type, tag=tag, type=kind))  # type: ignore[attr-defined]


# -- storage a request names -----------------------------------------------------------------------
def check_storage(session: Session, caller: Caller, uuid: Any) -> None:
    """A backup storage named in a request is a uuid; in a member's, one it may use (ImageStore)."""
    if uuid:
        checked = check_uuid(uuid, "backupStorageUuid")
        if not caller.admin:
            access.visible(session, caller, BackupStorage, checked, "backup storage")


def check_named_storages(session: Session, caller: Caller, params: dict[str, Any]) -> None:
    """Every storage an action's params name (ZStack's misspelt key too) must be usable."""
    for key in ("backupStorageUuid", "backupStrogeUuid", "srcBackupStorageUuid", "dstBackupStorageUuid"):
        check_storage(session, caller, params.get(key))


def delete_targets(session: Session, caller: Caller, value: str | None, refs: list[Any]) -> list[str] | None:
    """The storages a DELETE removes copies from: those named (``backupStorageUuids=a,b``,
    each one the caller may use), else all (None) for an admin; a member's delete removes only
    the copies on storage it may act on (offsite copies are deleted by admins)."""
    if value:
        targets = [check_uuid(s, "backupStorageUuid") for s in value.split(",")]
        for target in targets:
            check_storage(session, caller, target)
        return targets
    if caller.admin:
        return None
    usable = {row.uuid for row in session.scalars(access.scope(caller, BackupStorage))}
    mine = sorted({ref.backupStorageUuid for ref in refs} & usable)
    if not mine:
        raise Forbidden(detail="every copy of this backup is on storage only an admin may delete from")
    return mine


# -- answers ---------------------------------------------------------------------------------------
class Accepted(BaseModel):
    """202: the request is an API job; poll ``location`` (``GET /v1/api-jobs/{jobUuid}``)."""

    location: str
    jobUuid: str


class JobRunning(BaseModel):
    """202 from ``GET /v1/api-jobs/{uuid}``: the job has not ended yet."""

    state: str
    progress: int | None
    jobUuid: str
    resourceUuid: str | None = None  # what the job works on (an instant restore's new volume, usable meanwhile)


ACCEPTED: dict[int | str, dict[str, Any]] = {202: {"model": Accepted, "description": "An API job was started"}}


def one(session: Session, row: Base, status: int = 200) -> JSONResponse:
    return JSONResponse({"inventory": inventory(session, row), "success": True}, status_code=status)


def accepted(request: Request, job: ApiJob) -> JSONResponse:
    base = str(request.base_url).rstrip("/")
    prefix = "/zstack/v1" if request.url.path.startswith("/zstack/") else "/v1"
    return JSONResponse({"location": f"{base}{prefix}/api-jobs/{job.uuid}", "jobUuid": job.uuid}, status_code=202)


def ok() -> JSONResponse:
    """A change with nothing to show (a delete, an unregistration)."""
    return JSONResponse({"success": True})
