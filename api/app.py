"""The REST API (API.md): envelopes, errors, auth, and the app every route joins.

Routes live in :mod:`api.routes` (and ``routes_*``); this module maps every error to its status
and stable code in exception handlers (never in routes), and serves everything under ``/v1``
and, for ZStack's SDKs, ``/zstack/v1``; Prometheus text at ``/metrics``. Abuse limits: a client
IP presenting too many bad keys gets 429 for its bad keys for a while (a valid key is always
served), password logins are limited per client IP and account, and request bodies are capped
(413).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, Literal
from urllib.parse import unquote

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.catalog import db
from shared.config import get_settings
from shared.credentials import seal_plaintext
from shared.errors import BlockvaultError, Unauthorized
from shared.ratelimit import FailureWindow
from shared.secret import check_at_start

from .auth import Caller, TooManyFailures, authenticate, refuse_while_locked, seed_admin

log = logging.getLogger(__name__)


def error_body(code: str, description: str, details: str = "") -> dict[str, Any]:
    return {"success": False, "error": {"code": code, "description": description, "details": details}}


class ErrorDetail(BaseModel):
    code: str
    description: str
    details: str


class ErrorEnvelope(BaseModel):
    """Every error answer: ``{"success": false, "error": {"code", "description", "details"}}``."""

    success: Literal[False]
    error: ErrorDetail


ERROR_STATUSES = {
    400: "Invalid argument (INVALID_ARGUMENT, ...)",
    401: "Missing or unknown API key (UNAUTHORIZED)",
    403: "Not allowed for this caller (FORBIDDEN)",
    404: "No such resource, or not visible to this caller (NOT_FOUND)",
    409: "Conflict with the resource's state (CONFLICT, ...)",
    413: "Request body too large (PAYLOAD_TOO_LARGE)",
    429: "Too many failed authentications from this client (TOO_MANY_REQUESTS)",
    503: "The catalog database or a storage is unavailable",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": text} for status, text in ERROR_STATUSES.items()
}


def get_session() -> Iterator[Session]:
    """The request's catalog session, committed when the route returns. Routes depend on it
    with ``scope="function"``: FastAPI then commits BEFORE the response is sent, so a client
    that reads back what it just created never races the commit (the default scope ends the
    dependency after the response is sent)."""
    with db.session() as session:
        yield session


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def get_caller(request: Request, session: Session = Depends(get_session, scope="function")) -> Caller:
    """The authenticated caller. A valid key or session is always served, whoever shares its
    client address; a bad one is a 401, or a 429 once its address has had too many failures
    in the window (one client's guessing never locks out the good keys behind its address)."""
    failures: FailureWindow = request.app.state.auth_failures
    client = client_address(request)
    try:
        caller = authenticate(session, request.headers.get("authorization"))
    except Unauthorized:
        refuse_while_locked(failures, client, client)
        failures.failed(client)
        log.info("api.auth_failed client=%s path=%s", client, request.url.path)  # never the key
        raise
    session.commit()
    return caller


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 ``PAYLOAD_TOO_LARGE`` for a request body over ``limit`` bytes: before the app runs
    when Content-Length says so, else as soon as the bytes read pass it (the rest is not read,
    and whatever the app answered is replaced)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body("PAYLOAD_TOO_LARGE", f"the request body exceeds {self.limit} bytes")
        await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        total = 0
        exceeded = started = False

        async def limited() -> Message:
            nonlocal total, exceeded
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def replacing(message: Message) -> None:
            nonlocal started
            if exceeded:  # the app's answer to a body it could not read: 413 instead
                if not started:
                    started = True
                    await self._refuse(scope, receive, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, replacing)
        except _BodyTooLarge:
            if not started:
                started = True
                await self._refuse(scope, receive, send)


MAX_JSON_DEPTH = 64


def _bad_text(text: str) -> str | None:
    """Why ``text`` cannot be stored or answered: a NUL or a lone surrogate; None when fine."""
    if "\0" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    return None


def json_problem(value: Any) -> str | None:
    """What makes a parsed JSON value unacceptable anywhere in the API (nesting deeper than
    ``MAX_JSON_DEPTH``, a string or key with NUL or a lone surrogate); None when fine. Walks
    with its own stack, so no input can exhaust the interpreter's."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(item, str):
            reason = _bad_text(item)
            if reason:
                return f"a string {reason}"
        elif isinstance(item, dict):
            for key, child in item.items():
                reason = _bad_text(key)
                if reason:
                    return f"a key {reason}"
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return None


class InputGuard:
    """400 ``INVALID_ARGUMENT`` before any route runs for input no route can store or answer:
    a path or query string with NUL, or a JSON body nested too deeply or with NUL / broken
    Unicode in a string. A body that is not JSON is passed on (the route says what it wants)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reason = _bad_text(scope.get("path", "")) or _bad_text(
            unquote(scope.get("query_string", b"").decode("latin-1"))
        )
        if reason:
            await self._refuse(scope, receive, send, f"the URL {reason}")
            return
        messages: list[Message] = []
        body = b""
        if scope.get("method") in ("POST", "PUT", "PATCH", "DELETE"):
            while True:
                message = await receive()
                messages.append(message)
                body += message.get("body", b"")
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
        if body.lstrip()[:1] in (b"{", b"["):
            try:
                problem = json_problem(json.loads(body))
            except RecursionError:
                problem = f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels"
            except ValueError:
                problem = None  # not JSON after all: the route answers that
            if problem:
                await self._refuse(scope, receive, send, problem)
                return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, reason: str) -> None:
        await JSONResponse(error_body("INVALID_ARGUMENT", f"invalid request: {reason}"), status_code=400)(
            scope, receive, send
        )


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    db.migrate()
    check_at_start("api")
    with db.session() as session:
        seal_plaintext(session)  # storage credentials an earlier version stored in the clear
    key = get_settings().admin_api_key
    if key:
        with db.session() as session:
            seed_admin(session, key.get_secret_value())
    yield


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="blockvault", version="1", lifespan=lifespan, openapi_url="/openapi.json", responses=ERROR_RESPONSES
    )
    app.state.auth_failures = FailureWindow(settings.auth_max_failures, settings.auth_failure_window_seconds)
    # password logins, per client address and account name
    app.state.login_failures = FailureWindow(settings.auth_max_failures, settings.auth_failure_window_seconds)
    app.add_middleware(InputGuard)  # inside BodyLimit: it reads at most the limit
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(BlockvaultError)
    async def _blockvault_error(_request: Request, exc: BlockvaultError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("api.error code=%s %s", exc.code, exc)
        headers = exc.headers if isinstance(exc, TooManyFailures) else None
        return JSONResponse(
            error_body(exc.code, str(exc), type(exc).__name__), status_code=exc.http_status, headers=headers
        )

    @app.exception_handler(DBAPIError)
    async def _database_error(_request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
            detail = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            return JSONResponse(
                error_body("DATABASE_UNAVAILABLE", f"the catalog database is unavailable: {detail}"), status_code=503
            )
        log.exception("api.database_error")
        return JSONResponse(error_body("INTERNAL_ERROR", "database error"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}" for e in exc.errors()
        )
        return JSONResponse(error_body("INVALID_ARGUMENT", f"invalid request: {problems}"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 401: "UNAUTHORIZED"}.get(exc.status_code, "HTTP_ERROR")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("api.unexpected")
        return JSONResponse(error_body("INTERNAL_ERROR", f"{type(exc).__name__}: {exc}"), status_code=500)

    from shared.metrics import registry

    from .routes import public, router
    from .routes_accounts import router as accounts_router
    from .routes_accounts import sessions as sessions_router
    from .routes_metrics import router as metrics_router
    from .routes_scheduler import router as scheduler_router
    from .zstack_wire import router as wire_router

    app.state.metrics_registry = registry()
    app.include_router(public)
    app.include_router(metrics_router)
    app.include_router(wire_router)  # ZStack's RPC protocol, over the same routes
    for routes in (sessions_router, router, scheduler_router, accounts_router):
        app.include_router(routes, prefix="/v1")
        app.include_router(routes, prefix="/zstack/v1", include_in_schema=False)
    return app
