"""User tags: ``POST /v1/user-tags`` (on a row the caller may tag) and ``DELETE
/v1/user-tags/{uuid}``. Queries are in :mod:`api.routes.queries`."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from api.auth import Caller
from api.deps import CurrentCaller, DbSession, get_caller
from api.envelopes import Envelope, check_uuid, ok, one
from api.schemas import Done, one_answer
from shared import access
from shared.catalog.models import BackupStorage, Base, SchedulerJobGroup, Tag, VmInstance, Volume, VolumeBackup
from shared.errors import Forbidden, NotFound, require

router = APIRouter(dependencies=[Depends(get_caller)])
# what a project member may tag: its projects' own rows (shared ones, storage, are admins')
MEMBER_TAGGABLE: tuple[type[Base], ...] = (VmInstance, Volume, VolumeBackup, SchedulerJobGroup)


def check_taggable(session: Session, caller: Caller, uuid: str) -> None:
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


@router.post("/user-tags", response_model=one_answer(Tag))
def create_user_tag(body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    p = body.params
    require(p, "resourceUuid", "resourceType", "tag")
    resource = check_uuid(p["resourceUuid"], "resourceUuid")
    check_taggable(session, caller, resource)
    tag = Tag(resourceUuid=resource, resourceType=p["resourceType"], tag=str(p["tag"]))
    session.add(tag)
    session.flush()
    return one(session, tag)


@router.delete("/user-tags/{uuid}", response_model=Done)
def delete_user_tag(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    tag = session.scalars(access.scope(caller, Tag).where(Tag.uuid == check_uuid(uuid, "uuid"))).first()
    if tag is None or tag.type != "user":
        raise NotFound(resource="user tag", uuid=uuid)
    session.delete(tag)
    return ok()
