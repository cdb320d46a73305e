"""The REST API (API.md): envelopes, errors, auth, and the app every route joins.

Routes live in :mod:`api.routes`; this module maps every error to its status and stable code
in exception handlers (never in routes), and serves everything under ``/v1`` and, for ZStack's
SDKs, ``/zstack/v1``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.catalog import db
from shared.config import get_settings
from shared.errors import BlockvaultError

from .auth import Caller, authenticate, seed_admin

log = logging.getLogger(__name__)


def error_body(code: str, description: str, details: str = "") -> dict[str, Any]:
    return {"success": False, "error": {"code": code, "description": description, "details": details}}


def get_session() -> Iterator[Session]:
    with db.session() as session:
        yield session


def get_caller(request: Request, session: Session = Depends(get_session)) -> Caller:
    caller = authenticate(session, request.headers.get("authorization"))
    session.commit()
    return caller


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    db.migrate()
    key = get_settings().admin_api_key
    if key:
        with db.session() as session:
            seed_admin(session, key.get_secret_value())
    yield


def create_app() -> FastAPI:
    app = FastAPI(title="blockvault", version="1", lifespan=lifespan, openapi_url="/openapi.json")

    @app.exception_handler(BlockvaultError)
    async def _blockvault_error(_request: Request, exc: BlockvaultError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("api.error code=%s %s", exc.code, exc)
        return JSONResponse(error_body(exc.code, str(exc), type(exc).__name__), status_code=exc.http_status)

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

    from .routes import public, router
    from .routes_scheduler import router as scheduler_router

    app.include_router(public)
    for routes in (router, scheduler_router):
        app.include_router(routes, prefix="/v1")
        app.include_router(routes, prefix="/zstack/v1", include_in_schema=False)
    return app
