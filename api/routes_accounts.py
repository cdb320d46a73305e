"""Accounts, projects, their members, and API keys (API.md "Auth").

Only admins create accounts and projects (403 ``FORBIDDEN`` for anyone else); a project's
members are managed by admins and its projectAdmins. A caller that may not see a resource
(another account's key, a project it does not administer) gets 404, as if it did not exist.
An API key is in the answer that creates it and nowhere else; the catalog keeps its hash.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import access
from shared.catalog.models import Account, ApiKey, Project, ProjectMember, new_uuid
from shared.errors import Conflict, InvalidArgument, NotFound, require
from shared.inventory import inventory

from .app import get_caller, get_session
from .auth import Caller, key_hash, new_key
from .routes import Envelope, add_tags, check_uuid, one

router = APIRouter(dependencies=[Depends(get_caller)])

ACCOUNT_TYPES = ("Normal", "SystemAdmin")
ROLES = ("projectAdmin", "member")


def _text(params: dict[str, Any], key: str, default: str | None = "") -> str | None:
    value = params.get(key, default)
    if value is not None and not isinstance(value, str):
        raise InvalidArgument(detail=f"{key} must be a string")
    return value


def _choice(params: dict[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = params.get(key) or default
    if value not in allowed:
        raise InvalidArgument(detail=f"{key} must be one of: {', '.join(allowed)}")
    return str(value)


def _unique_name(session: Session, model: type[Account] | type[Project], name: str, what: str) -> None:
    if session.scalars(select(model).where(model.name == name)).first() is not None:
        raise Conflict(detail=f"an {what} named {name!r} exists already")


# -- accounts and projects -------------------------------------------------------------------------
@router.post("/accounts")
def create_account(
    body: Envelope, session: Session = Depends(get_session, scope="function"), caller: Caller = Depends(get_caller)
) -> JSONResponse:
    access.require_admin(caller, "creating accounts")
    p = body.params
    require(p, "name")
    name = str(_text(p, "name"))
    _unique_name(session, Account, name, "account")
    account = Account(
        uuid=new_uuid(),
        name=name,
        description=_text(p, "description", None),
        type=_choice(p, "type", ACCOUNT_TYPES, "Normal"),
    )
    session.add(account)
    session.flush()
    add_tags(session, account, body)
    return one(session, account)


@router.post("/projects")
def create_project(
    body: Envelope, session: Session = Depends(get_session, scope="function"), caller: Caller = Depends(get_caller)
) -> JSONResponse:
    access.require_admin(caller, "creating projects")
    p = body.params
    require(p, "name")
    name = str(_text(p, "name"))
    _unique_name(session, Project, name, "project")
    project = Project(uuid=new_uuid(), name=name, description=_text(p, "description", None))
    session.add(project)
    session.flush()
    add_tags(session, project, body)
    return one(session, project)


def _managed_project(session: Session, caller: Caller, uuid: str) -> Project:
    """The project ``uuid`` if the caller may manage its members (an admin or its projectAdmin)."""
    project = session.get(Project, check_uuid(uuid, "uuid"))
    if project is None or not (caller.admin or project.uuid in caller.project_admin):
        raise NotFound(resource="project", uuid=uuid)
    return project


@router.post("/projects/{uuid}/members")
def add_member(
    uuid: str,
    body: Envelope,
    session: Session = Depends(get_session, scope="function"),
    caller: Caller = Depends(get_caller),
) -> JSONResponse:
    """Make an account a member of the project, or change its role if it is one already."""
    project = _managed_project(session, caller, uuid)
    p = body.params
    require(p, "accountUuid")
    account_uuid = check_uuid(str(p["accountUuid"]), "accountUuid")
    if session.get(Account, account_uuid) is None:
        raise NotFound(resource="account", uuid=account_uuid)
    role = _choice(p, "role", ROLES, "member")
    member = session.scalars(
        select(ProjectMember).where(
            ProjectMember.projectUuid == project.uuid, ProjectMember.accountUuid == account_uuid
        )
    ).first()
    if member is None:
        member = ProjectMember(uuid=new_uuid(), projectUuid=project.uuid, accountUuid=account_uuid, role=role)
        session.add(member)
    else:
        member.role = role
    session.flush()
    return one(session, member)


@router.delete("/projects/{uuid}/members/{accountUuid}")
def remove_member(
    uuid: str,
    accountUuid: str,
    session: Session = Depends(get_session, scope="function"),
    caller: Caller = Depends(get_caller),
) -> JSONResponse:
    project = _managed_project(session, caller, uuid)
    member = session.scalars(
        select(ProjectMember).where(
            ProjectMember.projectUuid == project.uuid,
            ProjectMember.accountUuid == check_uuid(accountUuid, "accountUuid"),
        )
    ).first()
    if member is None:
        raise NotFound(resource="member of the project", uuid=accountUuid)
    session.delete(member)
    return JSONResponse({"success": True})


# -- API keys --------------------------------------------------------------------------------------
@router.post("/api-keys")
def create_api_key(
    body: Envelope, session: Session = Depends(get_session, scope="function"), caller: Caller = Depends(get_caller)
) -> JSONResponse:
    """A new key for ``accountUuid`` (default: the caller's account); its ``key`` is in this
    answer only."""
    p = body.params
    account_uuid = check_uuid(str(p.get("accountUuid") or caller.account_uuid), "accountUuid")
    access.visible(session, caller, Account, account_uuid, "account")  # own account, or any for an admin
    key = new_key()
    row = ApiKey(uuid=new_uuid(), accountUuid=account_uuid, keyHash=key_hash(key), name=_text(p, "name") or "")
    session.add(row)
    session.flush()
    return JSONResponse({"inventory": {**inventory(session, row), "key": key}, "success": True})


@router.delete("/api-keys/{uuid}")
def revoke_api_key(
    uuid: str, session: Session = Depends(get_session, scope="function"), caller: Caller = Depends(get_caller)
) -> JSONResponse:
    session.delete(access.visible(session, caller, ApiKey, check_uuid(uuid, "uuid"), "API key"))
    return JSONResponse({"success": True})
