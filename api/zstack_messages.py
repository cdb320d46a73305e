"""ZStack's messages (docs/zstack-messages.tsv) as one table, :data:`MESSAGES`: each message's
Java class, sync or async, its parameters (``*`` = required) with their types, and the REST
call that does it (an HTTP method, a ``/v1`` path and how the message's parameters become that
call's body or query string). The endpoint that answers them is :mod:`api.routes.zstack_wire`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, create_model

from shared.catalog.query import parse_zstack
from shared.errors import InvalidArgument

FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
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
    extension: bool = False  # blockvault's own message, named as ZStack would (not in zstack-messages.tsv)
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
    "attachTimeout": float,
    "bandwidthLimit": int,
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
    "startTime": int,  # Unix seconds (shared.schedule)
    "stopTime": int,
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
        "InstantRestoreVolumeFromVolumeBackup",
        VB,
        "async",
        ("*uuid", "name", "description", "vmInstanceUuid", "backupStorageUuid", "attachTimeout", "bandwidthLimit"),
        action(
            "/volume-backups/{uuid}",
            "instantRestoreVolumeFromVolumeBackup",
            "name",
            "description",
            "vmInstanceUuid",
            "backupStorageUuid",
            "attachTimeout",
            "bandwidthLimit",
            "hostUuid",
            "installPath",
        ),
        extras=("hostUuid", "installPath"),
        extension=True,
    ),
    _m(
        "InstantRestoreVmFromVmBackup",
        VB,
        "async",
        ("*groupUuid", "vmInstanceUuid", "backupStorageUuid", "attachTimeout"),
        action(
            "/vm-backups/{groupUuid}",
            "instantRestoreVmFromVmBackup",
            "vmInstanceUuid",
            "backupStorageUuid",
            "attachTimeout",
        ),
        extension=True,
    ),
    _m(
        "CreateVmInstanceFromVmBackup",
        VB,
        "async",
        ("*groupUuid", "name", "description", "hostUuid", "backupStorageUuid", "strategy", "keepMacs"),
        action(
            "/vm-backups/{groupUuid}",
            "createVmInstanceFromVmBackup",
            "name",
            "description",
            "hostUuid",
            "backupStorageUuid",
            "strategy",
            "keepMacs",
        ),
        extension=True,
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
