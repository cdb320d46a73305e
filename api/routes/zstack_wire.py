"""ZStack's RPC wire protocol (docs/api.md "ZStack wire compatibility"): ``POST /zstack/api/``.

One table, :data:`api.zstack_messages.MESSAGES`, maps each ZStack message to the REST call that
does it. The endpoint checks the message against its parameter model,
then calls the REST route in process (an ASGI sub-request into this same app, authorised as
``OAuth <session uuid>``), so every action has one implementation and project isolation is the
REST API's. The REST answer is translated into ZStack's shapes: a sync reply, or for an async
message a job whose result ``GET /zstack/api/result/{uuid}`` returns; inventories have ZStack's
types, as ``/zstack/v1``'s (:mod:`api.zstack_rest`: dates as ``Jul 25, 2018 4:55:41 PM``,
JSON-string ``metadata``/``jobData``, ...).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.deps import get_caller
from api.envelopes import error_body
from api.routes.api_jobs import job_answer
from api.zstack_messages import MESSAGES, Message, Rest
from api.zstack_rest import job_parameters, zstack_answer, zstack_types
from shared.catalog import db
from shared.catalog.models import ApiJob, new_uuid
from shared.errors import BlockvaultError, InvalidArgument, Unauthorized

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

SESSION_ERROR = "ID.1001"  # ZStack's IdentityErrors.INVALID_SESSION: no, unknown or expired session
LOGIN_ERROR = "ID.1000"  # ZStack's IdentityErrors.AUTHENTICATION_ERROR: wrong account name or password
JOB_UUID = re.compile(r"^[0-9a-f]{32}$")


# -- answers ---------------------------------------------------------------------------------------
class WireError(Exception):
    def __init__(self, status: int, code: str, description: str, details: str = "") -> None:
        super().__init__(description)
        self.status, self.error = status, {"code": code, "description": description, "details": details}


def _failed(message: Message | None, status: int, error: dict[str, Any]) -> JSONResponse:
    """An error: the error envelope, and for a known message its reply (or event) class too."""
    body: dict[str, Any] = {"success": False, "error": error}
    if message is not None:
        body[message.answer_class] = {"success": False, "error": error}
        if message.call == "async":
            body["state"] = "Error"
    return JSONResponse(body, status_code=status)


def _rest_error(message: Message, status: int, body: Any) -> WireError:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"code": "INTERNAL_ERROR" if status >= 500 else "HTTP_ERROR", "description": f"HTTP {status}"}
    code = str(error.get("code", ""))
    if status == 401:
        code = LOGIN_ERROR if message.name == "LogInByAccount" else SESSION_ERROR
    return WireError(status, code, str(error.get("description", "")), str(error.get("details", "")))


def _parse(raw: bytes) -> tuple[Message, dict[str, Any]]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(400, "INVALID_ARGUMENT", f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict) or len(body) != 1:
        raise WireError(400, "INVALID_ARGUMENT", 'the body is one message: {"<ZStack message class>": {...}}')
    java_class, params = next(iter(body.items()))
    message = MESSAGES.get(java_class)
    if message is None:
        raise WireError(400, "INVALID_ARGUMENT", f"unknown message {java_class[:200]!r}")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise WireError(400, "INVALID_ARGUMENT", f"{message.java_class} takes an object of parameters")
    return message, params


def check(message: Message, params: dict[str, Any]) -> dict[str, Any]:
    """The message's parameters, checked against its model (required, types): InvalidArgument
    naming each problem. Parameters blockvault does not use are accepted."""
    try:
        checked = message.model.model_validate(params)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise InvalidArgument(detail=f"invalid {message.name}: {problems}") from None
    values = {k: v for k, v in checked.model_dump().items() if k in message.names or k in message.extras}
    return {k: v for k, v in values.items() if v is not None}


def _string_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """A job group's or job's ``parameters`` sent as ZStack's ``Map<String, String>`` read into
    the typed jobData (as on ``/zstack/v1``); an object of typed values passes as it is."""
    data = params.get("parameters")
    if isinstance(data, dict) and data and all(isinstance(v, str) for v in data.values()):
        return {**params, "parameters": job_parameters(data)}
    return params


def _session_token(params: dict[str, Any]) -> str:
    session = params.get("session")
    token = session.get("uuid") if isinstance(session, dict) else None
    if not isinstance(token, str) or not token.strip():
        raise WireError(401, SESSION_ERROR, 'missing session: {"session": {"uuid": "<session uuid or API key>"}}')
    return token.strip()


def _authenticate(request: Request, token: str) -> str:
    """The account of a session (or API key): the same checks, lockout and logging as REST's."""

    def run() -> str:
        with db.session() as session:
            scope = {"type": "http", "headers": [(b"authorization", f"OAuth {token}".encode())]}
            probe = Request({**request.scope, **scope}, request.receive)
            return get_caller(probe, session).account_uuid

    try:
        return run()
    except Unauthorized as exc:
        raise WireError(401, SESSION_ERROR, str(exc)) from None


async def _sub_request(request: Request, rest: Rest, token: str | None) -> tuple[int, Any]:
    """The REST call in process: this app, through its middleware and exception handlers."""
    client = (request.client.host, request.client.port) if request.client else ("127.0.0.1", 0)
    transport = httpx.ASGITransport(app=request.app, raise_app_exceptions=False, client=client)
    headers = {"Authorization": f"OAuth {token}"} if token else {}
    async with httpx.AsyncClient(transport=transport, base_url=str(request.base_url).rstrip("/")) as http:
        answer = await http.request(rest.method, rest.path, json=rest.body, params=rest.query, headers=headers)
    try:
        return answer.status_code, answer.json()
    except ValueError:
        return answer.status_code, None


def _record(message: Message, job_uuid: str | None, account: str, result: dict[str, Any] | None, event: Any) -> str:
    """The wire job of an async message: the REST API job (its class noted), or for a REST
    answer that was immediate, a finished job holding it."""
    with db.session() as session:
        if job_uuid is not None:
            job = session.get(ApiJob, job_uuid)
            if job is not None:
                job.zstackClass = message.java_class
            return job_uuid
        job = ApiJob(
            uuid=new_uuid(),
            action=message.name,
            state="Succeeded",
            progress=100,
            result=result,
            params={"zstackEvent": event} if event else None,
            accountUuid=account,
            zstackClass=message.java_class,
        )
        session.add(job)
        return job.uuid


def _location(request: Request, job: str) -> str:
    return f"{str(request.base_url).rstrip('/')}/zstack/api/result/{job}"


def _export(params: dict[str, Any], body: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    backup = (body.get("inventories") or [{}])[0] if isinstance(body, dict) else {}
    for ref in backup.get("backupStorageRefs") or []:
        if ref.get("backupStorageUuid") == params["backupStorageUuid"] and ref.get("status") == "Ready":
            return backup, {"databaseBackupUrl": ref.get("installPath")}
    raise WireError(
        404,
        "NOT_FOUND",
        f"database backup {params['databaseBackupUuid']} has no Ready copy on backup storage "
        f"{params['backupStorageUuid']}",
    )


def _sync_reply(message: Message, body: Any) -> dict[str, Any]:
    data = body if isinstance(body, dict) else {}
    if message.reply == "query":
        reply: dict[str, Any] = {"inventories": zstack_types(data.get("inventories", []))}
        if "total" in data:
            reply["total"] = data["total"]
    elif message.reply == "capacity":
        rows = data.get("inventories", [])
        reply = {
            "totalCapacity": sum(int(r.get("totalCapacity") or 0) for r in rows),
            "availableCapacity": sum(int(r.get("availableCapacity") or 0) for r in rows),
        }
    elif message.reply == "logout":
        reply = {}
    else:
        reply = {"inventory": zstack_types(data.get("inventory", {}))}
    return {message.answer_class: {**reply, "success": True}}


@router.post("/zstack/api", include_in_schema=False)
@router.post("/zstack/api/", include_in_schema=False)
async def zstack_api(request: Request) -> JSONResponse:
    """One ZStack message: ``{"<javaClass>": {...parameters, "session": {"uuid": "..."}}}``."""
    message: Message | None = None
    try:
        message, raw = _parse(await request.body())
        try:
            params = check(message, raw)
            params = _string_parameters(params)
            rest = message.rest({**params, "session": raw.get("session")} if message.name == "LogOut" else params)
        except (InvalidArgument, KeyError) as exc:
            raise WireError(400, "INVALID_ARGUMENT", str(exc)) from None
        token = _session_token(raw) if message.session else None
        account = await run_in_threadpool(_authenticate, request, token) if token else ""
        status, body = await _sub_request(request, rest, token)
        if message.name == "LogOut" and status in (400, 404):
            status, body = 200, {"success": True}  # an unknown or ended session: logged out all the same
        if status >= 400:
            raise _rest_error(message, status, body)
        if message.call == "sync":
            return JSONResponse(_sync_reply(message, body))
        if status == 202:
            job = await run_in_threadpool(_record, message, str(body["jobUuid"]), account, None, None)
        elif message.reply == "export":
            backup, event = _export(params, body)
            job = await run_in_threadpool(_record, message, None, account, backup, event)
        else:
            result = body.get("inventory") if isinstance(body, dict) else None
            job = await run_in_threadpool(_record, message, None, account, result, None)
        return JSONResponse({"uuid": job, "state": "Processing", "location": _location(request, job)})
    except WireError as exc:
        return _failed(message, exc.status, exc.error)
    except BlockvaultError as exc:
        return _failed(message, exc.http_status, {"code": exc.code, "description": str(exc), "details": ""})


def _result(request: Request, uuid: str) -> JSONResponse:
    with db.session() as session:
        job = session.get(ApiJob, uuid) if JOB_UUID.fullmatch(uuid) else None
        if job is not None and not _may_see(request, session, job):
            job = None
        if job is None:
            return JSONResponse(error_body("NOT_FOUND", f"no API job {uuid[:64]}"), status_code=404)
        status, body = job_answer(session, job)
        event_class = re.sub(r"Msg$", "Event", job.zstackClass or "org.zstack.header.message.APIMsg")
        extra = (job.params or {}).get("zstackEvent")
    if status == 202:
        return JSONResponse({"uuid": uuid, "state": "Processing", "location": _location(request, uuid)})
    if status == 200:
        event: dict[str, Any] = {"success": True}
        if body.get("inventory"):  # ZStack's types and shapes (a VM backup's inventories), as /zstack/v1's
            answer = zstack_answer(200, body)
            event.update({k: answer[k] for k in ("inventory", "inventories") if k in answer})
        if isinstance(extra, dict):
            event.update(extra)
        return JSONResponse({"uuid": uuid, "state": "Done", "result": json.dumps({event_class: event})})
    return JSONResponse({"uuid": uuid, "state": "Error", "error": body["error"]})


def _may_see(request: Request, session: Session, job: ApiJob) -> bool:
    """Who may read a job's result here: with a session (``Authorization: OAuth <session>``,
    as ZStack's SDKs send it) the job's owner or an admin; without one, only a job started by
    a wire message, whose random uuid its caller alone was told (REST and scheduled jobs need
    a session)."""
    if request.headers.get("authorization"):
        caller = get_caller(request, session)
        return caller.admin or job.accountUuid == caller.account_uuid
    return job.zstackClass is not None


@router.get("/zstack/api/result/{uuid}", include_in_schema=False)
async def zstack_result(uuid: str, request: Request) -> JSONResponse:
    """An async message's job: Processing, Done with its event as a JSON string, or Error.
    The job uuid is the capability (ZStack's clients send no session here)."""
    return await run_in_threadpool(_result, request, uuid)
