"""ZStack's RPC wire protocol (docs/api.md "ZStack wire compatibility"): ``POST /zstack/api/``.

One table, :data:`MESSAGES`, maps each ZStack message (``docs/zstack-messages.tsv``) to the
REST call that does it: an HTTP method, a ``/v1`` path and how the message's parameters become
that call's body or query string. The endpoint checks the message against its parameter model,
then calls the REST route in process (an ASGI sub-request into this same app, authorised as
``OAuth <session uuid>``), so every action has one implementation and project isolation is the
REST API's. The REST answer is translated into ZStack's shapes: a sync reply, or for an async
message a job whose result ``GET /zstack/api/result/{uuid}`` returns; dates in inventories are
written as ZStack writes them (``Jul 25, 2018 4:55:41 PM``, the server's local time).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import httpx
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from sqlalchemy.orm import Session

from api.deps import get_caller
from api.envelopes import error_body
from api.routes.api_jobs import job_answer
from shared.catalog import db
from shared.catalog.models import ApiJob, new_uuid
from shared.catalog.query import parse_zstack
from shared.errors import BlockvaultError, InvalidArgument, Unauthorized

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

SESSION_ERROR = "ID.1001"  # ZStack's IdentityErrors.INVALID_SESSION: no, unknown or expired session
LOGIN_ERROR = "ID.1000"  # ZStack's IdentityErrors.AUTHENTICATION_ERROR: wrong account name or password
JOB_UUID = re.compile(r"^[0-9a-f]{32}$")
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
ISO_DATE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:?\d\d)?$")
QUERY_PARAMS = ("limit", "start", "count", "groupBy", "replyWithCount", "filterName", "sortBy", "sortDirection")
Reply = Literal["query", "inventory", "none", "capacity", "login", "logout", "export"]


# -- the REST call of a message --------------------------------------------------------------------
@dataclass(frozen=True)
class Rest:
    method: str
    path: str
    body: dict[str, Any] | None = None
    query: dict[str, Any] | None = None


Build = Callable[[dict[str, Any]], Rest]


PATH_VALUE = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def _path(template: str, p: Mapping[str, Any]) -> str:
    """``/v1`` + ``template`` with ``{x}`` filled from the parameter x, which must be uuid-like:
    a parameter never steers the call to another route."""
    names = re.findall(r"{(\w+)}", template)
    for name in names:
        if not isinstance(p.get(name), str) or not PATH_VALUE.fullmatch(p[name]):
            raise InvalidArgument(detail=f"{name} must be a uuid, got {str(p.get(name))[:64]!r}")
    return "/v1" + template.format(**{name: p[name] for name in names})


def _pick(p: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: p[k] for k in keys if p.get(k) is not None}


def _csv(value: Any) -> str | None:
    return ",".join(value) if value else None


def post(path: str, *keys: str) -> Build:
    """``POST /v1/<path>`` (``{x}`` filled from the parameter x) with ``{"params": <keys>}``."""
    return lambda p: Rest("POST", _path(path, p), body={"params": _pick(p, *keys)})


def action(path: str, name: str, *keys: str) -> Build:
    """``PUT /v1/<path>/actions`` with ``{name: <keys>}``."""
    return lambda p: Rest("PUT", _path(path + "/actions", p), body={name: _pick(p, *keys)})


def delete(path: str) -> Build:
    """``DELETE /v1/<path>?backupStorageUuids=a,b&deleteMode=...`` (ZStack's ``handleDependency``
    means ``Enforcing`` when no ``deleteMode`` is given)."""

    def build(p: dict[str, Any]) -> Rest:
        mode = p.get("deleteMode") or ("Enforcing" if p.get("handleDependency") else None)
        query = {"backupStorageUuids": _csv(p.get("backupStorageUuids")), "deleteMode": mode}
        return Rest("DELETE", _path(path, p), query={k: v for k, v in query.items() if v})

    return build


def simple(method: str, path: str, **query_keys: str) -> Build:
    """A call with no body: ``query_keys`` maps query parameters to message parameters (lists joined)."""

    def build(p: dict[str, Any]) -> Rest:
        query = {k: _csv(p[v]) if isinstance(p.get(v), list) else p.get(v) for k, v in query_keys.items()}
        return Rest(method, _path(path, p), query={k: v for k, v in query.items() if v is not None})

    return build


def query(collection: str, *fixed: str) -> Build:
    """``GET /v1/<collection>`` with the query message's conditions (:func:`parse_zstack`) in the
    REST query language; ``fixed`` conditions are added (``type=ImageStore``)."""

    def build(p: dict[str, Any]) -> Rest:
        spec = parse_zstack(p)
        q = list(fixed)
        for condition in spec.conditions:
            if not FIELD_NAME.fullmatch(condition.name) and condition.name not in ("__userTag__", "__systemTag__"):
                raise InvalidArgument(detail=f"unknown field {condition.name!r} in conditions")
            if condition.op in ("is null", "not null"):
                q.append(f"{condition.name} {condition.op}")
            else:
                q.append(f"{condition.name}{condition.op}{condition.value or ''}")
        params: dict[str, Any] = {"q": q, "limit": spec.limit, "start": spec.start}
        if spec.sort:
            params["sort"] = ",".join(("+" if ascending else "-") + name for name, ascending in spec.sort)
        if spec.count:
            params["count"] = "true"
        if spec.reply_with_count:
            params["replyWithCount"] = "true"
        if spec.fields:
            params["fields"] = ",".join(spec.fields)
        if spec.group_by:
            params["groupBy"] = spec.group_by
        return Rest("GET", f"/v1/{collection}", query=params)

    return build


def capacity(p: dict[str, Any]) -> Rest:
    uuids = p.get("backupStorageUuids")
    return Rest("GET", "/v1/backup-storage", query={"q": [f"uuid?={','.join(uuids)}"]} if uuids else {})


def log_out(p: dict[str, Any]) -> Rest:
    """LogOut ``sessionUuid``, else the session the message carries."""
    session = p.get("session")
    uuid = p.get("sessionUuid") or (session.get("uuid") if isinstance(session, dict) else None)
    if not uuid:
        raise InvalidArgument(detail="sessionUuid is required")
    return Rest("DELETE", _path("/accounts/sessions/{uuid}", {"uuid": uuid}))


# -- the table -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    """One ZStack message: its class, sync or async, its parameters as in the TSV (``*`` =
    required), the REST call it is, how the REST answer becomes the reply, and the parameters
    beyond ZStack's that blockvault's route also takes (``extras``)."""

    name: str
    java_class: str
    call: Literal["sync", "async"]
    params: tuple[str, ...]
    rest: Build
    reply: Reply = "inventory"
    extras: tuple[str, ...] = ()
    reply_class: str | None = None
    session: bool = True  # needs a session (all but LogInByAccount and LogOut)
    model: type[BaseModel] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", _model(self))

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(p[1:] for p in self.params if p.startswith("*"))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.lstrip("*") for p in self.params)

    @property
    def answer_class(self) -> str:
        """The class of the reply (sync) or event (async)."""
        if self.reply_class:
            return self.reply_class
        return re.sub(r"Msg$", "Reply" if self.call == "sync" else "Event", self.java_class)


PARAM_TYPES: dict[str, Any] = {
    "conditions": list[dict[str, Any]],
    "fields": list[str] | str,
    "limit": int,
    "start": int,
    "count": bool,
    "replyWithCount": bool,
    "triggerNow": bool,
    "all": bool,
    "handleDependency": bool,
    "schedulerInterval": int,
    "repeatCount": int,
    "startTime": int,
    "parameters": dict[str, Any],
    "clientInfo": dict[str, Any],
    "jobUuids": list[str],
    "zoneUuids": list[str],
}


def _type(name: str) -> Any:
    if name in PARAM_TYPES:
        return PARAM_TYPES[name]
    if name.endswith("Uuids"):
        return list[str]
    if name.endswith("Bandwidth"):
        return int
    return str


def _model(message: Message) -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for param in message.params:
        name = param.lstrip("*")
        kind = _type(name)
        fields[name] = (kind, ...) if param.startswith("*") else (kind | None, None)
    config = ConfigDict(extra="allow")
    model: type[BaseModel] = create_model(message.name, __config__=config, **fields)
    return model


QUERY: tuple[str, ...] = ("*conditions", "limit", "start", "count", "groupBy", "replyWithCount", "filterName")
QUERY += ("sortBy", "sortDirection", "fields")
BANDWIDTH = ("volumeReadBandwidth", "volumeWriteBandwidth", "networkReadBandwidth", "networkWriteBandwidth")
SYNC_COPY = ("*srcBackupStorageUuid", "*dstBackupStorageUuid")
VB = "org.zstack.header.storage.volume.backup."
DB = "org.zstack.header.storage.database.backup."
BS = "org.zstack.header.storage.backup."
IS = "org.zstack.storage.backup.imagestore."
SC = "org.zstack.scheduler."
TRIGGER = ("schedulerInterval", "repeatCount", "startTime", "schedulerType", "cron")


def _m(
    name: str, package: str, call: Literal["sync", "async"], params: tuple[str, ...], rest: Build, **kw: Any
) -> Message:
    return Message(name, f"{package}API{name}Msg", call, params, rest, **kw)


MESSAGE_LIST: tuple[Message, ...] = (
    _m(
        "CreateVolumeBackup",
        VB,
        "async",
        ("*volumeUuid", "*backupStorageUuid", "*name", "description", "mode", *BANDWIDTH),
        post("/volumes/{volumeUuid}/volume-backups", "name", "description", "backupStorageUuid", "mode", "force"),
        extras=("force",),
    ),
    _m(
        "CreateVmBackup",
        VB,
        "async",
        ("*rootVolumeUuid", "*backupStorageUuid", "*name", "description", "mode", *BANDWIDTH),
        post("/volumes/{rootVolumeUuid}/vm-backups", "name", "description", "backupStorageUuid", "mode", "force"),
        extras=("force",),
    ),
    _m(
        "CreateDatabaseBackup",
        DB,
        "async",
        ("*name", "description", "*backupStorageUuid"),
        post("/database-backups", "name", "description", "backupStorageUuid"),
    ),
    _m(
        "DeleteVolumeBackup",
        VB,
        "async",
        ("*uuid", "backupStorageUuids", "handleDependency", "deleteMode"),
        delete("/volume-backups/{uuid}"),
    ),
    _m(
        "DeleteVmBackup",
        VB,
        "async",
        ("*groupUuid", "backupStorageUuids", "handleDependency", "deleteMode"),
        delete("/vm-backups/{groupUuid}"),
    ),
    _m("DeleteDatabaseBackup", DB, "async", ("*uuid", "backupStorageUuids"), delete("/database-backups/{uuid}")),
    _m("QueryVolumeBackup", VB, "sync", QUERY, query("volume-backups"), reply="query"),
    _m("QueryDatabaseBackup", DB, "sync", QUERY, query("database-backups"), reply="query"),
    _m(
        "RevertVolumeFromVolumeBackup",
        VB,
        "async",
        ("*uuid", "backupStorageUuid"),
        action("/volume-backups/{uuid}", "revertVolumeFromVolumeBackup", "backupStorageUuid"),
    ),
    _m(
        "RevertVmFromVmBackup",
        VB,
        "async",
        ("*groupUuid", "backupStorageUuid"),
        action("/vm-backups/{groupUuid}", "revertVmFromVmBackup", "backupStorageUuid"),
    ),
    _m(
        "CreateDataVolumeFromVolumeBackup",
        VB,
        "async",
        ("*name", "vmInstanceUuid", "*backupUuid", "backupStorageUuid", "primaryStorageUuid", "description"),
        action(
            "/volume-backups/{backupUuid}",
            "createDataVolumeFromVolumeBackup",
            "name",
            "description",
            "vmInstanceUuid",
            "backupStorageUuid",
            "hostUuid",
            "installPath",
            "format",
        ),
        extras=("hostUuid", "installPath", "format"),
    ),
    _m(
        "SyncBackupFromImageStoreBackupStorage",
        VB,
        "async",
        ("*uuid", *SYNC_COPY),
        action("/volume-backups/{uuid}", "syncBackupFromImageStoreBackupStorage", *(s[1:] for s in SYNC_COPY)),
    ),
    _m(
        "RecoverBackupFromImageStoreBackupStorage",
        VB,
        "async",
        ("*uuid", *SYNC_COPY),
        action("/volume-backups/{uuid}", "recoverBackupFromImageStoreBackupStorage", *(s[1:] for s in SYNC_COPY)),
    ),
    _m(
        "SyncVmBackupFromImageStoreBackupStorage",
        VB,
        "async",
        ("*groupUuid", *SYNC_COPY),
        action("/vm-backups/{groupUuid}", "syncVmBackupFromImageStoreBackupStorage", *(s[1:] for s in SYNC_COPY)),
    ),
    _m(
        "RecoverVmBackupFromImageStoreBackupStorage",
        VB,
        "async",
        ("*groupUuid", *SYNC_COPY),
        action("/vm-backups/{groupUuid}", "recoverVmBackupFromImageStoreBackupStorage", *(s[1:] for s in SYNC_COPY)),
    ),
    _m(
        "SyncDatabaseBackupFromImageStoreBackupStorage",
        DB,
        "async",
        ("*uuid", *SYNC_COPY),
        action(
            "/database-backups/{uuid}", "syncDatabaseBackupFromImageStoreBackupStorage", *(s[1:] for s in SYNC_COPY)
        ),
    ),
    _m(
        "SyncVolumeBackup",
        VB,
        "async",
        ("*imageStoreUuid",),
        action("/backup-storage/{imageStoreUuid}", "scanBackupStorage"),
    ),
    _m(
        "SyncVmBackup",
        VB,
        "async",
        ("*imageStoreUuid",),
        action("/backup-storage/{imageStoreUuid}", "scanBackupStorage"),
    ),
    _m(
        "SyncDatabaseBackup",
        DB,
        "async",
        ("*imageStoreUuid",),
        action("/backup-storage/{imageStoreUuid}", "scanBackupStorage"),
    ),
    _m(
        "ExportDatabaseBackupFromBackupStorage",
        DB,
        "async",
        ("*backupStorageUuid", "*databaseBackupUuid"),
        simple("GET", "/database-backups/{databaseBackupUuid}"),
        reply="export",
    ),
    _m(
        "CreateSchedulerJob",
        SC,
        "async",
        ("*name", "description", "*targetResourceUuid", "*type", "parameters"),
        post("/scheduler/jobs", "name", "description", "targetResourceUuid", "type", "parameters", "projectUuid"),
        extras=("projectUuid",),
    ),
    _m(
        "CreateSchedulerJobGroup",
        SC,
        "async",
        ("*name", "description", "*type", "parameters"),
        post("/scheduler/jobgroups", "name", "description", "type", "parameters", "projectUuid"),
        extras=("projectUuid",),
    ),
    _m(
        "AddSchedulerJobsToSchedulerJobGroup",
        SC,
        "async",
        ("*schedulerJobGroupUuid", "*schedulerJobUuids"),
        post("/scheduler/jobgroups/{schedulerJobGroupUuid}/jobs", "schedulerJobUuids"),
    ),
    _m(
        "RemoveSchedulerJobsFromSchedulerJobGroup",
        SC,
        "async",
        ("*schedulerJobGroupUuid", "*schedulerJobUuids"),
        simple("DELETE", "/scheduler/jobgroups/{schedulerJobGroupUuid}/jobs", schedulerJobUuids="schedulerJobUuids"),
    ),
    _m(
        "CreateSchedulerTrigger",
        SC,
        "async",
        ("*name", "description", "schedulerInterval", "repeatCount", "startTime", "*schedulerType", "cron"),
        post("/scheduler/triggers", "name", "description", *TRIGGER, "stopTime", "timeZone", "projectUuid"),
        extras=("stopTime", "timeZone", "projectUuid"),
    ),
    _m(
        "AddSchedulerJobGroupToSchedulerTrigger",
        SC,
        "async",
        ("*schedulerJobGroupUuid", "*schedulerTriggerUuid", "triggerNow"),
        post("/scheduler/triggers/{schedulerTriggerUuid}/jobgroups/{schedulerJobGroupUuid}", "triggerNow"),
    ),
    _m(
        "RemoveSchedulerJobGroupFromSchedulerTrigger",
        SC,
        "async",
        ("*schedulerJobGroupUuid", "*schedulerTriggerUuid"),
        simple("DELETE", "/scheduler/triggers/{schedulerTriggerUuid}/jobgroups/{schedulerJobGroupUuid}"),
        reply="none",
    ),
    _m(
        "RunSchedulerTrigger",
        SC,
        "async",
        ("*uuid", "jobUuids"),
        action("/scheduler/triggers/{uuid}", "runSchedulerTrigger", "jobUuids"),
    ),
    _m(
        "UpdateSchedulerJob",
        SC,
        "async",
        ("*uuid", "name", "description", "parameters"),
        action("/scheduler/jobs/{uuid}", "updateSchedulerJob", "name", "description", "parameters"),
    ),
    _m(
        "UpdateSchedulerJobGroup",
        SC,
        "async",
        ("*uuid", "name", "description", "state", "parameters"),
        action("/scheduler/jobgroups/{uuid}", "updateSchedulerJobGroup", "name", "description", "state", "parameters"),
    ),
    _m(
        "UpdateSchedulerTrigger",
        SC,
        "async",
        ("*uuid", "name", "description", "schedulerInterval", "repeatCount", "startTime", "cron", "schedulerType"),
        action("/scheduler/triggers/{uuid}", "updateSchedulerTrigger", "name", "description", *TRIGGER, "stopTime"),
        extras=("stopTime",),
    ),
    _m(
        "DeleteSchedulerJob",
        SC,
        "async",
        ("*uuid", "deleteMode"),
        simple("DELETE", "/scheduler/jobs/{uuid}"),
        reply="none",
    ),
    _m(
        "DeleteSchedulerJobGroup",
        SC,
        "async",
        ("*uuid", "deleteMode"),
        simple("DELETE", "/scheduler/jobgroups/{uuid}"),
        reply="none",
    ),
    _m(
        "DeleteSchedulerTrigger",
        SC,
        "async",
        ("*uuid", "deleteMode"),
        simple("DELETE", "/scheduler/triggers/{uuid}"),
        reply="none",
    ),
    _m("QuerySchedulerJob", SC, "sync", QUERY, query("scheduler/jobs"), reply="query"),
    _m("QuerySchedulerJobGroup", SC, "sync", QUERY, query("scheduler/jobgroups"), reply="query"),
    _m("QuerySchedulerTrigger", SC, "sync", QUERY, query("scheduler/triggers"), reply="query"),
    _m("QuerySchedulerJobHistory", SC, "sync", QUERY, query("scheduler/jobhistories"), reply="query"),
    _m("QueryBackupStorage", BS, "sync", QUERY, query("backup-storage"), reply="query"),
    _m("QueryImageStoreBackupStorage", IS, "sync", QUERY, query("backup-storage", "type=ImageStore"), reply="query"),
    _m(
        "ChangeBackupStorageState",
        BS,
        "async",
        ("*uuid", "*stateEvent"),
        action("/backup-storage/{uuid}", "changeBackupStorageState", "stateEvent"),
    ),
    _m("ReconnectBackupStorage", BS, "async", ("*uuid",), action("/backup-storage/{uuid}", "reconnectBackupStorage")),
    _m(
        "UpdateBackupStorage",
        BS,
        "async",
        ("*uuid", "name", "description"),
        action("/backup-storage/{uuid}", "updateBackupStorage", "name", "description"),
    ),
    _m(
        "DeleteBackupStorage",
        BS,
        "async",
        ("*uuid", "deleteMode"),
        simple("DELETE", "/backup-storage/{uuid}", deleteMode="deleteMode"),
        reply="none",
    ),
    _m(
        "GetBackupStorageCapacity",
        BS,
        "sync",
        ("zoneUuids", "backupStorageUuids", "all"),
        capacity,
        reply="capacity",
    ),
    _m(
        "ReclaimSpaceFromImageStore",
        IS,
        "async",
        ("*uuid",),
        action("/backup-storage/{uuid}", "reclaimSpaceFromImageStore"),
    ),
    _m("QueryVmInstance", "org.zstack.header.vm.", "sync", QUERY, query("vm-instances"), reply="query"),
    _m("QueryVolume", "org.zstack.header.volume.", "sync", QUERY, query("volumes"), reply="query"),
    _m(
        "LogOut",
        "org.zstack.header.identity.",
        "sync",
        ("sessionUuid", "clientInfo"),
        log_out,
        reply="logout",
        session=False,
    ),
    _m(
        "LogInByAccount",
        "org.zstack.header.identity.",
        "sync",
        ("*accountName", "*password"),
        lambda p: Rest("PUT", "/v1/accounts/login", body={"logInByAccount": _pick(p, "accountName", "password")}),
        reply="login",
        reply_class="org.zstack.header.identity.APILogInReply",
        session=False,
    ),
)
MESSAGES: dict[str, Message] = {m.java_class: m for m in MESSAGE_LIST}


# -- dates -----------------------------------------------------------------------------------------
def zstack_date(text: str) -> str:
    """An ISO timestamp as ZStack writes dates: ``Jul 25, 2018 4:55:41 PM`` (server local time)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone()
    hour = moment.hour % 12 or 12
    return f"{moment:%b} {moment.day}, {moment.year} {hour}:{moment:%M:%S} {'AM' if moment.hour < 12 else 'PM'}"


def zstack_dates(value: Any) -> Any:
    """``value`` with every ISO timestamp in it (at any depth) written as ZStack's dates."""
    if isinstance(value, dict):
        return {k: zstack_dates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [zstack_dates(v) for v in value]
    if isinstance(value, str) and ISO_DATE.fullmatch(value):
        try:
            return zstack_date(value)
        except ValueError:
            return value
    return value


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
        reply: dict[str, Any] = {"inventories": zstack_dates(data.get("inventories", []))}
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
        reply = {"inventory": zstack_dates(data.get("inventory", {}))}
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
        if body.get("inventory"):
            event["inventory"] = zstack_dates(body["inventory"])
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
