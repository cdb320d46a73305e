"""The REST API (docs/api.md): the app every router joins, and its errors.

Routers live in :mod:`api.routes` (one per resource); this module maps every error to its
status and stable code in exception handlers (never in routes), and serves everything under
``/v1`` and, for ZStack's SDKs, ``/zstack/v1``; Prometheus text at ``/metrics``; the web
console at ``/`` (:mod:`api.console`). Abuse limits: a client IP presenting too many bad keys
gets 429 for its bad keys for a while (a valid key is always served), password logins are
limited per client IP and account, and request bodies are capped (413).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute

from shared.catalog import db
from shared.config import get_settings
from shared.credentials import seal_plaintext
from shared.errors import BlockvaultError
from shared.metrics import registry
from shared.ratelimit import FailureWindow
from shared.secret import check_at_start

from . import console
from .auth import TooManyFailures, seed_admin
from .envelopes import ERROR_RESPONSES, error_body
from .middleware import BodyLimit, InputGuard
from .routes import ROOT, VERSIONED, ZSTACK_ONLY
from .zstack_rest import ZStackDialect

log = logging.getLogger(__name__)


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


def operation_id(route: APIRoute) -> str:
    """A route's OpenAPI operationId: its name (``create_volume``, ``query volume-backups``
    as ``query_volume_backups``), what a generated client calls the method."""
    return re.sub(r"[^0-9A-Za-z]+", "_", route.name).strip("_")


@functools.cache
def route_table() -> tuple[BaseRoute, ...]:
    """Every router of :mod:`api.routes` as the app serves it: ``ROOT`` at the root,
    ``ZSTACK_ONLY`` under ``/zstack/v1`` (first: ``capacities`` is no storage uuid), each of
    ``VERSIONED`` under ``/v1`` and then each again, out of the schema, under ``/zstack/v1``.
    A request is matched against the routes in this order, router by router, route by route
    (and the router that matches, once more): a ``/v1`` path meets none of the ``/zstack/v1``
    copies, which cannot match it, before its own (the order within each prefix, and so what
    matches, is the same as when they alternated; the schema's too).

    Built once per process and shared by every app :func:`create_app` makes. FastAPI builds an
    included route's handler (its dependencies, its parameter and response fields) on the first
    request that reaches its router, once per inclusion: 1.2-1.5 CPU s for these 227 routes,
    which every app made anew paid again (each test of tests/api makes one). The table is a
    router with the app's own defaults (error responses, operation ids), so its routes are
    those ``app.include_router`` makes, but for ``app.dependency_overrides``, which nothing
    here uses."""
    table = APIRouter(responses=ERROR_RESPONSES, generate_unique_id_function=operation_id)
    for routes in ROOT:
        table.include_router(routes)
    table.include_router(ZSTACK_ONLY, prefix="/zstack/v1")
    for routes in VERSIONED:
        table.include_router(routes, prefix="/v1")
    for routes in VERSIONED:
        table.include_router(routes, prefix="/zstack/v1", include_in_schema=False)
    return tuple(table.routes)


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="blockvault",
        version="1",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        responses=ERROR_RESPONSES,
        generate_unique_id_function=operation_id,
    )
    app.state.auth_failures = FailureWindow(settings.auth_max_failures, settings.auth_failure_window_seconds)
    # password logins, per client address and account name
    app.state.login_failures = FailureWindow(settings.auth_max_failures, settings.auth_failure_window_seconds)
    app.add_middleware(InputGuard)  # inside BodyLimit: it reads at most the limit
    app.add_middleware(ZStackDialect)  # ZStack's types under /zstack/v1 (InputGuard's 400s too)
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

    app.state.metrics_registry = registry()
    app.router.routes.extend(route_table())
    console.install(app)
    return app
