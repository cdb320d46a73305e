"""REST routes: thin — parse, call the core in ``shared``, wrap in ZStack's envelopes."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import access, backups, dbbackups, hostpaths, hosts, storage
from shared.catalog.models import (
    QUERYABLE,
    ApiJob,
    BackupStorage,
    Base,
    DatabaseBackup,
    DatabaseBackupStorageRef,
    Host,
    SchedulerJobGroup,
    Tag,
    VmInstance,
    Volume,
    VolumeBackup,
    VolumeBackupStorageRef,
    new_uuid,
)
from shared.catalog.query import parse_rest, run_query
from shared.errors import Conflict, Forbidden, InvalidArgument, NotFound, require
from shared.inventory import inventories, inventory

from .app import get_caller, get_session
from .auth import Caller

public = APIRouter()
router = APIRouter(dependencies=[Depends(get_caller)])
UUID = re.compile(r"^[0-9a-f]{32}$")


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


class Accepted(BaseModel):
    """202: the request is an API job; poll ``location`` (``GET /v1/api-jobs/{jobUuid}``)."""

    location: str
    jobUuid: str


class JobRunning(BaseModel):
    """202 from ``GET /v1/api-jobs/{uuid}``: the job has not ended yet."""

    state: str
    progress: int | None
    jobUuid: str


ACCEPTED: dict[int | str, dict[str, Any]] = {202: {"model": Accepted, "description": "An API job was started"}}


def check_uuid(value: object, what: str) -> str:
    if not isinstance(value, str) or not UUID.match(value):
        raise InvalidArgument(detail=f"{what} {value!r} is not a uuid (32 lowercase hex digits)")
    return value


def one(session: Session, row: Base, status: int = 200) -> JSONResponse:
    return JSONResponse({"inventory": inventory(session, row), "success": True}, status_code=status)


def accepted(request: Request, job: ApiJob) -> JSONResponse:
    base = str(request.base_url).rstrip("/")
    prefix = "/zstack/v1" if request.url.path.startswith("/zstack/") else "/v1"
    return JSONResponse({"location": f"{base}{prefix}/api-jobs/{job.uuid}", "jobUuid": job.uuid}, status_code=202)


def add_tags(session: Session, row: Base, body: Envelope) -> None:
    for kind, tags in (("user", body.userTags), ("system", body.systemTags)):
        for tag in tags:
            session.add(Tag(resourceUuid=row.uuid, resourceType=row.resource_type, tag=tag, type=kind))  # type: ignore[attr-defined]


@public.get("/v1/health")
@public.get("/zstack/v1/health", include_in_schema=False)
def health() -> dict[str, Any]:
    return {"success": True, "status": "ok"}


# -- queries ---------------------------------------------------------------------------------------
def _query(model: type[Base], tag_type: str | None) -> Any:
    def handler(
        session: Session = Depends(get_session, scope="function"),
        caller: Caller = Depends(get_caller),
        q: list[str] = Query(default=[]),
        sort: str | None = None,
        limit: str | None = None,
        start: str | None = None,
        count: str | None = None,
        replyWithCount: str | None = None,
        fields: str | None = None,
        groupBy: str | None = None,
    ) -> JSONResponse:
        spec = parse_rest(q, sort, limit, start, count, replyWithCount, fields, groupBy)
        base = access.scope(caller, model)
        if tag_type:
            base = base.where(Tag.type == tag_type)
        result = run_query(session, model, spec, base=base)
        body: dict[str, Any] = {"success": True}
        if result.groups is not None:
            body["inventories"] = result.groups
        elif spec.count:
            body["inventories"] = []
        elif result.fields:
            body["inventories"] = result.rows
        else:
            body["inventories"] = inventories(session, result.rows)
        if result.total is not None:
            body["total"] = result.total
        return JSONResponse(body)

    return handler


def _get_one(model: type[Base], what: str) -> Any:
    def handler(
        uuid: str, session: Session = Depends(get_session, scope="function"), caller: Caller = Depends(get_caller)
    ) -> JSONResponse:
        row = access.visible(session, caller, model, check_uuid(uuid, "uuid"), what)
        return JSONResponse({"inventories": [inventory(session, row)], "success": True})

    return handler


for _path, _model in QUERYABLE.items():
    if _path == "api-jobs":
        continue
    _tag = {"user-tags": "user", "system-tags": "system"}.get(_path)
    router.add_api_route(f"/{_path}", _query(_model, _tag), methods=["GET"], name=f"query {_path}")
    if _path not in ("scheduler/jobhistories",):
        router.add_api_route(f"/{_path}/{{uuid}}", _get_one(_model, _path), methods=["GET"], name=f"get {_path}")


# -- API jobs --------------------------------------------------------------------------------------
@router.get("/api-jobs/{uuid}", responses={202: {"model": JobRunning, "description": "The job is still running"}})
def get_job(
    uuid: str, session: Session = Depends(get_session, scope="function"), caller: Caller = Depends(get_caller)
) -> JSONResponse:
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
        return 202, {"state": "Running", "progress": job.progress, "jobUuid": job.uuid}
    if job.state == "Succeeded":
        return 200, {"inventory": job.result or {}, "success": True}
    error = job.error or {"code": "INTERNAL_ERROR", "description": "failed", "details": ""}
    status = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400, "DATABASE_UNAVAILABLE": 503}.get(error["code"], 500)
    if error["code"] in ("CONFLICT", "HOST_DISCONNECTED", "VOLUME_ERROR", "TARGET_EXISTS", "STORAGE_BUSY"):
        status = 409
    return status, {"success": False, "error": error}


# -- registration ----------------------------------------------------------------------------------
def _int(params: dict[str, Any], key: str, default: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(detail=f"{key} must be a non-negative integer")
    return value


def _socket_path(session: Session, params: dict[str, Any], key: str, host_uuid: str | None) -> str | None:
    """A VM's QMP or guest agent socket: null, or a path inside its host's VM socket folder
    (admins only name one: the root worker connects to it)."""
    value = params.get(key)
    if value is None:
        return None
    if not host_uuid:
        raise InvalidArgument(detail=f"{key} needs the VM's hostUuid: sockets are inside its host's socket folder")
    host = session.get(Host, host_uuid)
    folder = [host.vmSocketDir] if host is not None and host.vmSocketDir else None
    return hostpaths.require_under(value, folder, key, host_uuid)


@router.post("/vm-instances")
def create_vm(
    body: Envelope, session: Session = Depends(get_session, scope="function"), caller: Caller = Depends(get_caller)
) -> JSONResponse:
    access.require_admin(caller, "registering vm-instances")
    p = body.params
    if p.get("hostUuid") and session.get(Host, check_uuid(p["hostUuid"], "hostUuid")) is None:
        raise NotFound(resource="host", uuid=p["hostUuid"])
    state = p.get("state") or "Stopped"
    if state not in ("Running", "Stopped"):
        raise InvalidArgument(detail="state must be Running or Stopped")
    vm = VmInstance(
        uuid=new_uuid(),
        name=str(p.get("name") or ""),
        description=p.get("description"),
        hostUuid=p.get("hostUuid"),
        platform=str(p.get("platform") or "Linux"),
        cpuNum=_int(p, "cpuNum", 1),
        memorySize=_int(p, "memorySize", 0),
        projectUuid=p.get("projectUuid"),
        state=state,
        qmpSocket=_socket_path(session, p, "qmpSocket", p.get("hostUuid")),
        guestAgentSocket=_socket_path(session, p, "guestAgentSocket", p.get("hostUuid")),
    )
    if not vm.name:
        raise InvalidArgument(detail="name is required")
    session.add(vm)
    session.flush()
    add_tags(session, vm, body)
    return one(session, vm)


@router.post("/volumes")
def create_volume(
    body: Envelope, session: Session = Depends(get_session, scope="function"), caller: Caller = Depends(get_caller)
) -> JSONResponse:
    access.require_admin(caller, "registering volumes")
    p = body.params
    require(p, "hostUuid", "installPath")
    if session.get(Host, check_uuid(p["hostUuid"], "hostUuid")) is None:
        raise NotFound(resource="host", uuid=p["hostUuid"])
    host: Host = session.get(Host, p["hostUuid"])  # type: ignore[assignment]
    path = hostpaths.require_under(p["installPath"], host.volumeRoots, "installPath", host.uuid)
    fmt = p.get("format") or ("qcow2" if path.endswith(".qcow2") else "raw")
    if fmt not in ("raw", "qcow2"):
        raise InvalidArgument(detail="format must be raw or qcow2")
    kind = p.get("type") or "Data"
    if kind not in ("Root", "Data"):
        raise InvalidArgument(detail="type must be Root or Data")
    vm_uuid = p.get("vmInstanceUuid")
    if vm_uuid:
        vm = session.get(VmInstance, check_uuid(vm_uuid, "vmInstanceUuid"))
        if vm is None:
            raise NotFound(resource="VM instance", uuid=vm_uuid)
        if (
            kind == "Root"
            and session.scalars(select(Volume).where(Volume.vmInstanceUuid == vm_uuid, Volume.type == "Root")).first()
        ):
            raise Conflict(detail=f"VM {vm_uuid} has a root volume already")
    elif kind == "Root":
        raise InvalidArgument(detail="a Root volume needs vmInstanceUuid")
    backups.ensure_path_free(session, p["hostUuid"], path)
    volume = Volume(
        uuid=new_uuid(),
        name=str(p.get("name") or path.rsplit("/", 1)[-1]),
        description=p.get("description"),
        hostUuid=p["hostUuid"],
        vmInstanceUuid=vm_uuid,
        projectUuid=p.get("projectUuid"),
        type=kind,
        format=fmt,
        installPath=path,
        size=_int(p, "size", 0),
    )
    session.add(volume)
    session.flush()
    add_tags(session, volume, body)
    return one(session, volume)


@router.delete("/volumes/{uuid}")
def delete_volume(
    uuid: str, session: Session = Depends(get_session, scope="function"), caller: Caller = Depends(get_caller)
) -> JSONResponse:
    """Unregister a volume (its file and its backups stay)."""
    access.require_admin(caller, "unregistering volumes")
    volume = session.get(Volume, check_uuid(uuid, "uuid"))
    if volume is None:
        raise NotFound(resource="volume", uuid=uuid)
    session.delete(volume)
    return JSONResponse({"success": True})


@router.delete("/vm-instances/{uuid}")
def delete_vm(
    uuid: str, session: Session = Depends(get_session, scope="function"), caller: Caller = Depends(get_caller)
) -> JSONResponse:
    """Unregister a VM and its volumes (files and backups stay)."""
    access.require_admin(caller, "unregistering vm-instances")
    vm = session.get(VmInstance, check_uuid(uuid, "uuid"))
    if vm is None:
        raise NotFound(resource="VM instance", uuid=uuid)
    for volume in session.scalars(select(Volume).where(Volume.vmInstanceUuid == vm.uuid)):
        session.delete(volume)
    session.flush()
    session.delete(vm)
    return JSONResponse({"success": True})


@router.post("/backup-storage")
def create_backup_storage(
    body: Envelope, session: Session = Depends(get_session, scope="function"), caller: Caller = Depends(get_caller)
) -> JSONResponse:
    access.require_admin(caller, "registering backup-storage")
    row = storage.register_storage(session, body.params)
    add_tags(session, row, body)
    return one(session, row)


# -- backups ---------------------------------------------------------------------------------------
@router.post("/volumes/{uuid}/volume-backups", status_code=202)
def create_volume_backup(
    uuid: str,
    body: Envelope,
    request: Request,
    session: Session = Depends(get_session, scope="function"),
    caller: Caller = Depends(get_caller),
) -> JSONResponse:
    access.visible(session, caller, Volume, check_uuid(uuid, "volume uuid"), "volume")
    _check_storage(session, caller, body.params.get("backupStorageUuid"))
    job = backups.request_volume_backup(session, uuid, body.params, caller.account_uuid)
    return accepted(request, job)


@router.post("/volumes/{uuid}/vm-backups", status_code=202)
def create_vm_backup(
    uuid: str,
    body: Envelope,
    request: Request,
    session: Session = Depends(get_session, scope="function"),
    caller: Caller = Depends(get_caller),
) -> JSONResponse:
    access.visible(session, caller, Volume, check_uuid(uuid, "root volume uuid"), "volume")
    _check_storage(session, caller, body.params.get("backupStorageUuid"))
    job = backups.request_vm_backup(session, uuid, body.params, caller.account_uuid)
    return accepted(request, job)


def _action(body: dict[str, Any], allowed: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
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


def _state_event(params: dict[str, Any]) -> str:
    event = params.get("stateEvent")
    if event not in ("enable", "disable"):
        raise InvalidArgument(detail="stateEvent must be enable or disable")
    return "Enabled" if event == "enable" else "Disabled"


def _update(row: Any, params: dict[str, Any]) -> None:
    for key in ("name", "description"):
        if key in params:
            if not isinstance(params[key], str | None) or (key == "name" and not params[key]):
                raise InvalidArgument(detail=f"{key} must be a string" + (" and not empty" if key == "name" else ""))
            setattr(row, key, params[key])


VOLUME_BACKUP_ACTIONS = (
    "revertVolumeFromVolumeBackup",
    "createDataVolumeFromVolumeBackup",
    "verifyVolumeBackup",
    "changeVolumeBackupState",
    "updateVolumeBackup",
    "syncBackupFromImageStoreBackupStorage",
    "recoverBackupFromImageStoreBackupStorage",
)


@router.put("/volume-backups/{uuid}/actions", responses=ACCEPTED)
def volume_backup_action(
    uuid: str,
    body: dict[str, Any],
    request: Request,
    session: Session = Depends(get_session, scope="function"),
    caller: Caller = Depends(get_caller),
) -> Response:
    name, params = _action(body, VOLUME_BACKUP_ACTIONS)
    backup = access.visible(session, caller, VolumeBackup, check_uuid(uuid, "uuid"), "volume backup")
    _check_named_storages(session, caller, params)
    if name == "createDataVolumeFromVolumeBackup":
        _check_placement(caller, params)
    if params.get("vmInstanceUuid") and not caller.admin:
        access.visible(session, caller, VmInstance, check_uuid(str(params["vmInstanceUuid"]), "vmInstanceUuid"), "VM")
    if name == "changeVolumeBackupState":
        backup.state = _state_event(params)
        return one(session, backup)
    if name == "updateVolumeBackup":
        _update(backup, params)
        session.flush()
        return one(session, backup)
    if name in backups.SYNC_ACTIONS:
        return accepted(request, backups.request_sync(session, name, [backup], params, caller.account_uuid))
    request_fn = {
        "revertVolumeFromVolumeBackup": backups.request_revert,
        "createDataVolumeFromVolumeBackup": backups.request_create_volume,
        "verifyVolumeBackup": backups.request_verify,
    }[name]
    return accepted(request, request_fn(session, uuid, params, caller.account_uuid))


def _check_placement(caller: Caller, params: dict[str, Any]) -> None:
    """The platform places new volumes: only an admin may name their host or file (inside
    the host's volume roots)."""
    named = [key for key in ("hostUuid", "installPath") if params.get(key) is not None]
    if named and not caller.admin:
        raise Forbidden(detail=f"{' and '.join(named)}: new volumes are placed by the platform (admins may name them)")
    if params.get("hostUuid") is not None:
        check_uuid(params["hostUuid"], "hostUuid")


def _delete_targets(session: Session, caller: Caller, value: str | None, refs: list[Any]) -> list[str] | None:
    """The storages a DELETE removes copies from: those named (``backupStorageUuids=a,b``,
    each one the caller may use), else all (None) for an admin; a member's delete removes only
    the copies on storage it may act on (offsite copies are deleted by admins)."""
    if value:
        targets = [check_uuid(s, "backupStorageUuid") for s in value.split(",")]
        for target in targets:
            _check_storage(session, caller, target)
        return targets
    if caller.admin:
        return None
    usable = {row.uuid for row in session.scalars(access.scope(caller, BackupStorage))}
    mine = sorted({ref.backupStorageUuid for ref in refs} & usable)
    if not mine:
        raise Conflict(detail="every copy of this backup is on storage only an admin may delete from")
    return mine


@router.delete("/volume-backups/{uuid}", status_code=202)
def delete_volume_backup(
    uuid: str,
    request: Request,
    backupStorageUuids: str | None = None,
    deleteMode: str = "Permissive",
    session: Session = Depends(get_session, scope="function"),
    caller: Caller = Depends(get_caller),
) -> JSONResponse:
    backup = access.visible(session, caller, VolumeBackup, check_uuid(uuid, "uuid"), "volume backup")
    targets = _delete_targets(session, caller, backupStorageUuids, backup.backupStorageRefs)
    job = backups.request_delete(session, uuid, targets, deleteMode, caller.account_uuid)
    return accepted(request, job)


@router.get("/vm-backups/{uuid}")
def get_vm_backup(
    uuid: str, session: Session = Depends(get_session, scope="function"), caller: Caller = Depends(get_caller)
) -> JSONResponse:
    rows = _vm_backup(session, caller, uuid)
    return JSONResponse({"inventories": inventories(session, rows), "success": True})


@router.put("/vm-backups/{uuid}/actions", responses=ACCEPTED)
def vm_backup_action(
    uuid: str,
    body: dict[str, Any],
    request: Request,
    session: Session = Depends(get_session, scope="function"),
    caller: Caller = Depends(get_caller),
) -> Response:
    name, params = _action(
        body,
        (
            "revertVmFromVmBackup",
            "syncVmBackupFromImageStoreBackupStorage",
            "recoverVmBackupFromImageStoreBackupStorage",
        ),
    )
    rows = _vm_backup(session, caller, uuid)
    group = rows[0].groupUuid or uuid
    _check_named_storages(session, caller, params)
    if name in backups.SYNC_ACTIONS:
        return accepted(request, backups.request_sync(session, name, rows, params, caller.account_uuid))
    job = backups.request_vm_revert(session, group, params, caller.account_uuid)
    return accepted(request, job)


@router.delete("/vm-backups/{uuid}", status_code=202)
def delete_vm_backup(
    uuid: str,
    request: Request,
    backupStorageUuids: str | None = None,
    deleteMode: str = "Permissive",
    session: Session = Depends(get_session, scope="function"),
    caller: Caller = Depends(get_caller),
) -> JSONResponse:
    rows = _vm_backup(session, caller, uuid)
    targets = _delete_targets(session, caller, backupStorageUuids, [r for row in rows for r in row.backupStorageRefs])
    job = backups.request_vm_delete(session, uuid, targets, deleteMode, caller.account_uuid)
    return accepted(request, job)


@router.post("/database-backups", status_code=202)
def create_database_backup(
    body: Envelope,
    request: Request,
    session: Session = Depends(get_session, scope="function"),
    caller: Caller = Depends(get_caller),
) -> JSONResponse:
    access.require_admin(caller, "backing up the catalog database")
    _check_storage(session, caller, body.params.get("backupStorageUuid"))
    return accepted(request, dbbackups.request_database_backup(session, body.params, caller.account_uuid))


@router.put("/database-backups/{uuid}/actions", responses=ACCEPTED)
def database_backup_action(
    uuid: str,
    body: dict[str, Any],
    request: Request,
    session: Session = Depends(get_session, scope="function"),
    caller: Caller = Depends(get_caller),
) -> Response:
    name, params = _action(body, ("syncDatabaseBackupFromImageStoreBackupStorage", "recoverDatabaseBackup"))
    access.require_admin(caller, name)
    row = access.visible(session, caller, DatabaseBackup, check_uuid(uuid, "uuid"), "database backup")
    if name == "recoverDatabaseBackup":
        return accepted(request, dbbackups.request_recover(session, row.uuid, params, caller.account_uuid))
    return accepted(request, backups.request_sync(session, name, [row], params, caller.account_uuid))


@router.delete("/database-backups/{uuid}", status_code=202)
def delete_database_backup(
    uuid: str,
    request: Request,
    backupStorageUuids: str | None = None,
    deleteMode: str = "Permissive",
    session: Session = Depends(get_session, scope="function"),
    caller: Caller = Depends(get_caller),
) -> JSONResponse:
    access.require_admin(caller, "deleting database backups")
    row = access.visible(session, caller, DatabaseBackup, check_uuid(uuid, "uuid"), "database backup")
    targets = _delete_targets(session, caller, backupStorageUuids, row.backupStorageRefs)
    job = backups.request_delete(session, uuid, targets, deleteMode, caller.account_uuid, model=DatabaseBackup)
    return accepted(request, job)


STORAGE_ACTIONS = (
    "changeBackupStorageState",
    "updateBackupStorage",
    "reconnectBackupStorage",
    "switchBackupStorageRole",
    "scanBackupStorage",
    "reclaimSpaceFromImageStore",
)


@router.put("/backup-storage/{uuid}/actions", responses=ACCEPTED)
def backup_storage_action(
    uuid: str,
    body: dict[str, Any],
    request: Request,
    session: Session = Depends(get_session, scope="function"),
    caller: Caller = Depends(get_caller),
) -> Response:
    name, params = _action(body, STORAGE_ACTIONS)
    access.require_admin(caller, name)
    row = access.visible(session, caller, BackupStorage, check_uuid(uuid, "uuid"), "backup storage")
    if name in ("scanBackupStorage", "reclaimSpaceFromImageStore"):
        return accepted(request, backups.request_storage_job(session, row, name, caller.account_uuid))
    if name == "changeBackupStorageState":
        row.state = _state_event(params)
    elif name == "updateBackupStorage":
        _update(row, params)
        storage.update_credentials(row, params)  # token, keys, passphrase re-entered: checked, then sealed
    elif name == "switchBackupStorageRole":
        storage.switch_role(session, row)
    else:
        storage.probe(row)
    session.flush()
    return one(session, row)


@router.delete("/backup-storage/{uuid}")
def delete_backup_storage(
    uuid: str,
    deleteMode: str = "Permissive",
    session: Session = Depends(get_session, scope="function"),
    caller: Caller = Depends(get_caller),
) -> JSONResponse:
    """Unregister a backup storage (ZStack's DeleteBackupStorage; what it holds stays there):
    409 while a backup has a copy on it or a job group copies to it (``deleteMode`` is accepted
    and changes nothing: blockvault never drops catalog copies silently)."""
    access.require_admin(caller, "unregistering backup-storage")
    if deleteMode not in ("Permissive", "Enforcing"):
        raise InvalidArgument(detail="deleteMode must be Permissive or Enforcing")
    row = session.get(BackupStorage, check_uuid(uuid, "uuid"))
    if row is None:
        raise NotFound(resource="backup storage", uuid=uuid)
    for ref_model in (VolumeBackupStorageRef, DatabaseBackupStorageRef):
        if session.scalars(select(ref_model.id).where(ref_model.backupStorageUuid == row.uuid).limit(1)).first():
            raise Conflict(detail=f"backup storage {row.uuid} holds backups: delete them (or their copies there) first")
    for group in session.scalars(select(SchedulerJobGroup)):
        if row.uuid in ((group.jobData or {}).get("backupStorageUuids") or []):
            raise Conflict(detail=f"job group {group.uuid} copies to backup storage {row.uuid}")
    for tag in session.scalars(select(Tag).where(Tag.resourceUuid == row.uuid)):
        session.delete(tag)
    session.delete(row)
    return JSONResponse({"success": True})


@router.put("/vm-instances/{uuid}/actions")
def vm_action(
    uuid: str,
    body: dict[str, Any],
    session: Session = Depends(get_session, scope="function"),
    caller: Caller = Depends(get_caller),
) -> Response:
    _name, params = _action(body, ("updateVmInstance",))
    vm = access.visible(session, caller, VmInstance, check_uuid(uuid, "uuid"), "VM instance")
    if "state" in params:
        if params["state"] not in ("Running", "Stopped"):
            raise InvalidArgument(detail="state must be Running or Stopped")
        vm.state = params["state"]
    for key in ("qmpSocket", "guestAgentSocket"):
        if key in params:
            access.require_admin(caller, f"setting {key}")
            setattr(vm, key, _socket_path(session, params, key, vm.hostUuid))
    _update(vm, params)
    session.flush()
    return one(session, vm)


# -- tags ------------------------------------------------------------------------------------------
@router.post("/user-tags")
def create_user_tag(
    body: Envelope, session: Session = Depends(get_session, scope="function"), caller: Caller = Depends(get_caller)
) -> JSONResponse:
    p = body.params
    require(p, "resourceUuid", "resourceType", "tag")
    _check_taggable(session, caller, check_uuid(p["resourceUuid"], "resourceUuid"))
    tag = Tag(
        resourceUuid=check_uuid(p["resourceUuid"], "resourceUuid"), resourceType=p["resourceType"], tag=str(p["tag"])
    )
    session.add(tag)
    session.flush()
    return one(session, tag)


@router.delete("/user-tags/{uuid}")
def delete_user_tag(
    uuid: str, session: Session = Depends(get_session, scope="function"), caller: Caller = Depends(get_caller)
) -> JSONResponse:
    tag = session.scalars(access.scope(caller, Tag).where(Tag.uuid == check_uuid(uuid, "uuid"))).first()
    if tag is None or tag.type != "user":
        raise NotFound(resource="user tag", uuid=uuid)
    session.delete(tag)
    return JSONResponse({"success": True})


# -- access helpers --------------------------------------------------------------------------------
def _check_storage(session: Session, caller: Caller, uuid: Any) -> None:
    """A backup storage named in a request is a uuid; in a member's, one it may use (ImageStore)."""
    if uuid:
        checked = check_uuid(uuid, "backupStorageUuid")
        if not caller.admin:
            access.visible(session, caller, BackupStorage, checked, "backup storage")


def _check_named_storages(session: Session, caller: Caller, params: dict[str, Any]) -> None:
    """Every storage an action's params name (ZStack's misspelt key too) must be usable."""
    for key in ("backupStorageUuid", "backupStrogeUuid", "srcBackupStorageUuid", "dstBackupStorageUuid"):
        _check_storage(session, caller, params.get(key))


def _vm_backup(session: Session, caller: Caller, uuid: str) -> list[VolumeBackup]:
    """The volume backups of a VM backup, when the caller may see every one of them."""
    rows = backups.group_backups(session, check_uuid(uuid, "groupUuid"))
    for row in rows:
        access.visible(session, caller, VolumeBackup, row.uuid, "VM backup")
    return rows


# what a project member may tag: its projects' own rows (shared ones, storage, are admins')
MEMBER_TAGGABLE: tuple[type[Base], ...] = (VmInstance, Volume, VolumeBackup, SchedulerJobGroup)


def _check_taggable(session: Session, caller: Caller, uuid: str) -> None:
    """An admin may tag any uuid (ZStack does not check either); a member only its projects'
    VMs, volumes, backups and job groups: a shared resource it can see is 403, anything else 404."""
    if caller.admin:
        return
    for model in MEMBER_TAGGABLE:
        if session.scalars(access.scope(caller, model).where(model.__mapper__.primary_key[0] == uuid)).first():
            return
    if session.scalars(access.scope(caller, BackupStorage).where(BackupStorage.uuid == uuid)).first():
        raise Forbidden(detail=f"backup storage {uuid} is shared: only admins tag it")
    raise NotFound(resource="resource", uuid=uuid)
