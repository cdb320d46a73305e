"""What every route depends on: the request's catalog session and its authenticated caller.

Routes take them as ``session: DbSession`` and ``caller: CurrentCaller``. The session is
committed BEFORE the response is sent (``scope="function"``), so a client that reads back what
it just created never races the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from shared.catalog import db
from shared.errors import Unauthorized
from shared.ratelimit import FailureWindow

from .auth import Caller, authenticate, refuse_while_locked

log = logging.getLogger(__name__)


def get_session() -> Iterator[Session]:
    """The request's catalog session, committed when the route returns (see the module)."""
    with db.session() as session:
        yield session


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


BEARER = HTTPBearer(auto_error=False, description="An API key or a session uuid (``OAuth <...>`` works too)")


def get_caller(
    request: Request,
    session: Session = Depends(get_session, scope="function"),
    _scheme: HTTPAuthorizationCredentials | None = Security(BEARER),  # documents the scheme in OpenAPI
) -> Caller:
    """The authenticated caller (an API key, a session, or a signed access-key request). A valid
    key, session or signature is always served, whoever shares its client address; a bad one
    is a 401, or a 429 once its address has had too many failures in the window (one client's
    guessing never locks out the good keys behind its address)."""
    failures: FailureWindow = request.app.state.auth_failures
    client = client_address(request)
    try:
        caller = authenticate(
            session,
            request.headers.get("authorization"),
            method=request.method,
            path=request.url.path,
            date=request.headers.get("date"),
        )
    except Unauthorized:
        refuse_while_locked(failures, client, client)
        failures.failed(client)
        log.info("api.auth_failed client=%s path=%s", client, request.url.path)  # never the key
        raise
    session.commit()
    return caller


DbSession = Annotated[Session, Depends(get_session, scope="function")]
CurrentCaller = Annotated[Caller, Depends(get_caller)]
