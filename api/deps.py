"""What every route depends on: the request's catalog session and its authenticated caller.

Routes take them as ``session: DbSession`` and ``caller: CurrentCaller``. The session is
committed BEFORE the response is sent (``scope="function"``), so a client that reads back what
it just created never races the commit.

A request's catalog work is one transaction: the caller's key is looked up in the transaction
the route then goes on in (one connection checked out of the pool, and pinged, per request,
not two), and committed on its own only when authenticating wrote something (a key's
``lastUsedDate``, a re-hash), which a failing route must not roll back. Each sync dependency
costs a hand-over to a worker thread and back: the session is made on the event loop (a
``Session`` opens no connection before its first statement), and only its commit runs in a
thread.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from typing import Annotated, Any

import anyio
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from shared.catalog import db
from shared.errors import Unauthorized
from shared.ratelimit import FailureWindow

from .auth import Caller, authenticate, refuse_while_locked

log = logging.getLogger(__name__)


async def get_session() -> AsyncIterator[Session]:
    """The request's catalog session, committed when the route returns (see the module): made
    here on the event loop, committed or rolled back (:func:`shared.catalog.db.session`) in a
    worker thread. FastAPI's ``contextmanager_in_threadpool``, which it uses for a sync
    dependency, does the same but enters in a thread too: a hand-over per request for a
    ``Session`` that opens no connection before its first statement."""
    scope = db.session()
    session = scope.__enter__()
    try:
        yield session
    except BaseException as exc:
        if not await _exit_in_thread(scope, type(exc), exc, exc.__traceback__):
            raise
    else:
        await _exit_in_thread(scope, None, None, None)


async def _exit_in_thread(scope: AbstractContextManager[Session], *exc_info: Any) -> bool:
    """``scope.__exit__(*exc_info)`` in a worker thread, as FastAPI exits a sync dependency:
    outside the thread pool's limit (a full pool must not keep a connection from going back to
    the database pool) and shielded from cancellation."""
    with anyio.CancelScope(shield=True):
        handled = await anyio.to_thread.run_sync(scope.__exit__, *exc_info, limiter=anyio.CapacityLimiter(1))
    return bool(handled)


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
    if session.dirty or session.new or session.deleted:
        session.commit()  # a key's lastUsedDate or re-hash stays, whatever the route does
    return caller


DbSession = Annotated[Session, Depends(get_session, scope="function")]
CurrentCaller = Annotated[Caller, Depends(get_caller)]
