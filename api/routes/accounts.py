"""Accounts, projects, their members, and API keys (docs/api.md "Auth").

Only admins create accounts and projects (403 ``FORBIDDEN`` for anyone else); a project's
members are managed by admins and its projectAdmins. A caller that may not see a resource
(another account's key, a project it does not administer) gets 404, as if it did not exist.
An API key is in the answer that creates it and nowhere else; the catalog keeps its hash.

Passwords (optional, for ZStack's ``LogInByAccount``): ``password`` on ``POST /v1/accounts`` or
``updateAccount``, plaintext over TLS, stored only as an scrypt hash of its SHA-512 hex; a new
password ends the account's sessions. ``PUT /v1/accounts/login`` ``{"logInByAccount":
{"accountName", "password": <SHA-512 hex>}}`` opens a session (as ZStack's REST API does) and
``DELETE /v1/accounts/sessions/{uuid}`` ends it (an unknown session too, as in ZStack); both
need no key, nor does ``GET .../sessions/{uuid}/valid``. ``PUT .../sessions/{uuid}/renew``
(or ``/actions``) ``{"renewSession": {"duration"}}`` extends it. Failed logins are counted per
client address and account name: past the limit that pair gets 429 until the window passes.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import (
    SHA512_HEX,
    Caller,
    end_sessions,
    key_hash,
    live_session,
    log_in,
    log_out,
    new_key,
    password_digest,
    password_hash,
    refuse_while_locked,
)
from api.deps import CurrentCaller, DbSession, client_address, get_caller
from api.envelopes import Envelope, add_tags, check_uuid, ok, one, parse_action
from api.schemas import Done, SessionAnswer, SessionValid, one_answer
from shared import access
from shared.catalog.models import Account, ApiKey, LoginSession, Project, ProjectMember, new_uuid, now
from shared.config import get_settings
from shared.errors import Conflict, InvalidArgument, NotFound, Unauthorized, require
from shared.inventory import inventory, iso
from shared.ratelimit import FailureWindow
from shared.service import quotas
from shared.service.rows import update_names

log = logging.getLogger(__name__)
router = APIRouter(dependencies=[Depends(get_caller)])
sessions = APIRouter()  # log in and out: no key needed

ACCOUNT_TYPES = ("Normal", "SystemAdmin")
ROLES = ("projectAdmin", "member")
MIN_RENEW, MAX_RENEW = 60, 365 * 24 * 3600  # ZStack's RenewSession duration range


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
@router.post("/accounts", response_model=one_answer(Account))
def create_account(body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
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
        passwordHash=_password(p),
    )
    session.add(account)
    session.flush()
    add_tags(session, account, body)
    return one(session, account)


def _password(params: dict[str, Any]) -> str | None:
    """The stored hash of ``password`` (plaintext), None when absent; never logged."""
    value = params.get("password")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidArgument(detail="password must be a non-empty string")
    return password_hash(password_digest(value))


@router.put("/accounts/{uuid}/actions", response_model=one_answer(Account))
def account_action(
    uuid: str,
    body: dict[str, Any],
    session: DbSession,
    caller: CurrentCaller,
) -> JSONResponse:
    """``updateAccount {name, description, password}``: an admin for any account, others for their own."""
    _name, params = parse_action(body, ("updateAccount",))
    account: Account = access.visible(session, caller, Account, check_uuid(uuid, "uuid"), "account")
    if "name" in params and params["name"] != account.name:
        _unique_name(session, Account, str(params["name"]), "account")
    update_names(account, params)
    if "password" in params:
        account.passwordHash = _password(params)
        end_sessions(session, account.uuid)  # whoever logged in with the old one is out
    session.flush()
    return one(session, account)


@sessions.put("/accounts/login", response_model=SessionAnswer)
def log_in_by_account(body: dict[str, Any], request: Request, session: DbSession) -> JSONResponse:
    """ZStack's ``logInByAccount {accountName, password}``, the password as its SHA-512 hex: a
    session uuid that opens the API as ``OAuth <uuid>`` until ``expiredDate``."""
    _name, params = parse_action(body, ("logInByAccount",))
    name, digest = params.get("accountName"), params.get("password")
    if not isinstance(name, str) or not name:
        raise InvalidArgument(detail="accountName is required")
    if not isinstance(digest, str) or len(digest) != SHA512_HEX or digest.lower().strip("0123456789abcdef"):
        raise InvalidArgument(detail="password must be the SHA-512 of the password in hex (128 digits)")
    failures: FailureWindow = request.app.state.login_failures
    client = client_address(request)
    pair = f"{client}\n{name}"
    refuse_while_locked(failures, pair, f"{client} for account {name!r}")  # even a right password: no guessing
    try:
        row, token = log_in(session, name, digest)
    except Unauthorized:
        failures.failed(pair)
        log.info("api.login_failed client=%s", client)  # never the name's password
        raise
    return JSONResponse({"inventory": session_inventory(row, token), "success": True})


def session_inventory(row: LoginSession, token: str) -> dict[str, Any]:
    """ZStack's SessionInventory of the session ``token`` (its uuid: the row keeps its hash)."""
    return {
        "uuid": token,
        "accountUuid": row.accountUuid,
        "userUuid": row.accountUuid,
        "createDate": iso(row.createDate),
        "expiredDate": iso(row.expiredDate),
    }


@sessions.delete("/accounts/sessions/{uuid}", response_model=Done)
def log_out_session(uuid: str, session: DbSession) -> JSONResponse:
    """End the session ``uuid`` (knowing it is the capability, as in ZStack; the catalog holds
    its hash only). A session that is not there (ended, expired, never was) answers success,
    as ZStack's LogOut does: logged out all the same."""
    log_out(session, check_uuid(uuid, "sessionUuid"))
    return ok()


@sessions.get("/accounts/sessions/{uuid}/valid", response_model=SessionValid)
def validate_session(uuid: str, session: DbSession) -> JSONResponse:
    """ZStack's ValidateSession (no key or session needed, as in ZStack): ``{"valid": true}`` while the
    session lasts, false for an ended, expired or unknown one, with ``success`` as every answer
    here (the Go SDK reads the answer as a map of booleans: both are)."""
    return JSONResponse({"valid": live_session(session, uuid) is not None, "success": True})


@router.put("/accounts/sessions/{uuid}/renew", response_model=SessionAnswer)
def renew_session(
    uuid: str, session: DbSession, caller: CurrentCaller, body: Annotated[dict[str, Any] | None, Body()] = None
) -> JSONResponse:
    """ZStack's RenewSession ``{"renewSession": {"duration": seconds}}`` (the body may be empty:
    the path names the action): the session lasts ``duration`` (60 s to 365 days; default
    BLOCKVAULT_SESSION_TIMEOUT_SECONDS) from now. Its own account's key or session, or an admin's;
    anyone else, and an ended or expired session, 404."""
    _name, params = parse_action(body, ("renewSession",)) if body else ("renewSession", {})
    duration = params.get("duration", get_settings().session_timeout_seconds)
    if isinstance(duration, bool) or not isinstance(duration, int) or not MIN_RENEW <= duration <= MAX_RENEW:
        raise InvalidArgument(detail=f"duration must be whole seconds from {MIN_RENEW} to {MAX_RENEW}")
    row = live_session(session, uuid)
    if row is None or not (caller.admin or row.accountUuid == caller.account_uuid):
        raise NotFound(resource="session", uuid=uuid)
    row.expiredDate = now() + timedelta(seconds=duration)
    session.flush()
    return JSONResponse({"inventory": session_inventory(row, uuid), "success": True})


router.add_api_route(  # ZStack's isAction paths: the same call under /actions
    "/accounts/sessions/{uuid}/actions",
    renew_session,
    methods=["PUT"],
    name="renew_session_action",
    response_model=SessionAnswer,
)


@router.post("/projects", response_model=one_answer(Project))
def create_project(body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
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


PROJECT_ACTIONS = ("updateProjectQuota",)


@router.put("/projects/{uuid}/actions", response_model=one_answer(Project))
def project_action(uuid: str, body: dict[str, Any], session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """``updateProjectQuota {quotaBackupBytes, quotaBackupCount}`` (admins; null: no limit):
    the quotas checked when a backup of the project starts (docs/protection.md)."""
    _name, params = parse_action(body, PROJECT_ACTIONS)
    access.require_admin(caller, "setting project quotas")
    project = session.get(Project, check_uuid(uuid, "uuid"))
    if project is None:
        raise NotFound(resource="project", uuid=uuid)
    quotas.set_quotas(project, params)
    session.flush()
    return one(session, project)


def _managed_project(session: Session, caller: Caller, uuid: str) -> Project:
    """The project ``uuid`` if the caller may manage its members (an admin or its projectAdmin)."""
    project = session.get(Project, check_uuid(uuid, "uuid"))
    if project is None or not (caller.admin or project.uuid in caller.project_admin):
        raise NotFound(resource="project", uuid=uuid)
    return project


@router.post("/projects/{uuid}/members", response_model=one_answer(ProjectMember))
def add_member(
    uuid: str,
    body: Envelope,
    session: DbSession,
    caller: CurrentCaller,
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


@router.delete("/projects/{uuid}/members/{accountUuid}", response_model=Done)
def remove_member(
    uuid: str,
    accountUuid: str,
    session: DbSession,
    caller: CurrentCaller,
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
    return ok()


# -- API keys --------------------------------------------------------------------------------------
@router.post("/api-keys", response_model=one_answer(ApiKey))
def create_api_key(body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
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


@router.delete("/api-keys/{uuid}", response_model=Done)
def revoke_api_key(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    session.delete(access.visible(session, caller, ApiKey, check_uuid(uuid, "uuid"), "API key"))
    return ok()
