"""``GET /v1/<collection>`` with the query language and ``GET /v1/<collection>/{uuid}``, for
every queryable collection (``QUERYABLE``): rows the caller may see only (shared.access)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from api.deps import CurrentCaller, DbSession, get_caller
from api.envelopes import check_uuid
from api.schemas import query_answer
from shared import access
from shared.catalog.models import QUERYABLE, Base, Tag
from shared.catalog.query import parse_rest, run_query
from shared.inventory import inventories, inventory

router = APIRouter(dependencies=[Depends(get_caller)])
TAG_TYPES = {"user-tags": "user", "system-tags": "system"}
NO_SINGLE_GET = ("scheduler/jobhistories", "api-jobs")  # histories have integer ids; jobs: api_jobs.py


def query_handler(model: type[Base], tag_type: str | None, always: tuple[str, ...] = ()) -> Any:
    """The handler of ``GET /v1/<collection>`` for ``model``, ``always`` ANDed to every query
    (``/zstack/v1``'s own paths reuse it: ``backup-storage/image-store`` is ``type=ImageStore``)."""

    def handler(
        session: DbSession,
        caller: CurrentCaller,
        q: list[str] = Query(default=[]),
        sort: str | None = None,
        limit: str | None = None,
        start: str | None = None,
        count: str | None = None,
        replyWithCount: str | None = None,
        fields: str | None = None,
        groupBy: str | None = None,
    ) -> JSONResponse:
        spec = parse_rest([*q, *always], sort, limit, start, count, replyWithCount, fields, groupBy)
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
    def handler(uuid: str, session: DbSession, caller: CurrentCaller) -> JSONResponse:
        row = access.visible(session, caller, model, check_uuid(uuid, "uuid"), what)
        return JSONResponse({"inventories": [inventory(session, row)], "success": True})

    return handler


for _path, _model in QUERYABLE.items():
    if _path == "api-jobs":
        continue
    _answer = query_answer(_model)
    router.add_api_route(
        f"/{_path}",
        query_handler(_model, TAG_TYPES.get(_path)),
        methods=["GET"],
        name=f"query {_path}",
        response_model=_answer,
    )
    if _path not in NO_SINGLE_GET:
        router.add_api_route(
            f"/{_path}/{{uuid}}", _get_one(_model, _path), methods=["GET"], name=f"get {_path}", response_model=_answer
        )
