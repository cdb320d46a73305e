"""ZStack access keys (docs/security.md "Access keys"): ``POST /v1/accesskeys`` (admins), its
state action (admins) and ``DELETE /v1/accesskeys/{uuid}`` (admins, or the key's own account).
Queries (``GET /v1/accesskeys``: an account sees its own keys) are in :mod:`api.routes.queries`.

The key's ``AccessKeySecret`` is in the answer that creates it and nowhere else: the catalog
keeps it sealed (:mod:`shared.accesskeys`). A deleted or Disabled key opens nothing from the
next request on.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api.deps import CurrentCaller, DbSession, get_caller
from api.envelopes import Envelope, check_uuid, ok, one, parse_action, state_event
from api.schemas import Done, one_answer
from shared import access, accesskeys
from shared.catalog.models import AccessKey, Account
from shared.errors import Conflict, InvalidArgument, NotFound, require
from shared.inventory import inventory
from shared.secret import seal

router = APIRouter(dependencies=[Depends(get_caller)])
GIVEN_ID = re.compile(r"^[A-Za-z0-9]{10,64}$")
MIN_GIVEN_SECRET = 20


@router.post("/accesskeys", response_model=one_answer(AccessKey))
def create_access_key(body: Envelope, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """A new key for ``accountUuid`` (``userUuid``, which ZStack's SDK requires, is that account
    too: blockvault has no users). ``AccessKeyID`` and ``AccessKeySecret`` may be given, to carry
    a key over from ZStack; otherwise they are made here. The secret is in this answer only."""
    access.require_admin(caller, "creating access keys")
    p = body.params
    require(p, "accountUuid")
    account_uuid = check_uuid(p["accountUuid"], "accountUuid")
    account = session.get(Account, account_uuid)
    if account is None:
        raise NotFound(resource="account", uuid=account_uuid)
    if p.get("userUuid") not in (None, "", account_uuid):
        raise InvalidArgument(detail="userUuid must be the account's uuid (blockvault's accounts have no users)")
    row, secret = accesskeys.create_key(session, account, p.get("description"))
    given_id, given_secret = p.get("AccessKeyID"), p.get("AccessKeySecret")
    if given_id is not None:
        if not isinstance(given_id, str) or not GIVEN_ID.match(given_id):
            raise InvalidArgument(detail="AccessKeyID must be 10 to 64 letters and digits")
        if session.scalars(select(AccessKey).where(AccessKey.AccessKeyID == given_id)).first() is not None:
            raise Conflict(detail=f"an access key {given_id} exists already")
        row.AccessKeyID = given_id
    if given_secret is not None:
        if not isinstance(given_secret, str) or len(given_secret) < MIN_GIVEN_SECRET or not given_secret.isprintable():
            raise InvalidArgument(detail=f"AccessKeySecret must be at least {MIN_GIVEN_SECRET} printable characters")
        secret = given_secret
        row.sealedSecret = seal(accesskeys.LABEL, row.uuid, secret.encode())
    session.flush()
    return JSONResponse({"inventory": {**inventory(session, row), "AccessKeySecret": secret}, "success": True})


@router.put("/accesskeys/{uuid}/actions", response_model=one_answer(AccessKey))
def access_key_action(uuid: str, body: dict[str, Any], session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """``changeAccessKeyState {stateEvent: enable|disable}`` (admins): a Disabled key opens nothing."""
    access.require_admin(caller, "changing access keys")
    _name, params = parse_action(body, ("changeAccessKeyState",))
    row: AccessKey = access.visible(session, caller, AccessKey, check_uuid(uuid, "uuid"), "access key")
    row.state = state_event(params)
    session.flush()
    return one(session, row)


@router.delete("/accesskeys/{uuid}", response_model=Done)
def delete_access_key(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
    """Revoke a key: an admin any, an account its own (``deleteMode`` is accepted and ignored)."""
    session.delete(access.visible(session, caller, AccessKey, check_uuid(uuid, "uuid"), "access key"))
    return ok()
