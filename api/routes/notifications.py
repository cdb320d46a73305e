"""Notifications (docs/notifications.md), admins only (a member's key gets 403 on every route):
targets (``/v1/notification-targets``), rules (``/v1/notification-rules``), the events recorded
(``GET /v1/notification-events``) and the history of what was sent
(``GET /v1/notification-histories``). A target's secrets are write-only: never in an answer.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import select

from api.auth import Caller
from api.deps import CurrentCaller, DbSession
from api.envelopes import Envelope, check_uuid, ok, one, parse_action, state_event
from api.routes.queries import query_handler
from api.schemas import Done, one_answer, query_answer
from shared import access
from shared.catalog.models import (
    Base,
    NotificationDelivery,
    NotificationEvent,
    NotificationRule,
    NotificationTarget,
)
from shared.errors import InvalidArgument, NotFound, require
from shared.inventory import inventory
from shared.notifications import delivery, targets
from shared.notifications.events import KINDS
from shared.service.rows import update_names


def admin_only(caller: CurrentCaller) -> Caller:
    access.require_admin(caller, "notifications")
    return caller


router = APIRouter(dependencies=[Depends(admin_only)])
COLLECTIONS: dict[str, type[Base]] = {
    "notification-targets": NotificationTarget,
    "notification-rules": NotificationRule,
    "notification-events": NotificationEvent,
    "notification-histories": NotificationDelivery,
}
RULE_PARAMETERS = {"storageFull": {"fillRatio": (0.0, 1.0)}, "backupOverdue": {"tolerance": (0.0, 100.0)}}

for _path, _model in COLLECTIONS.items():
    router.add_api_route(
        f"/{_path}",
        query_handler(_model, None),
        methods=["GET"],
        name=f"query {_path}",
        response_model=query_answer(_model),
    )


def _get(session: DbSession, model: type[Base], uuid: str, what: str) -> Any:
    row = session.get(model, check_uuid(uuid, "uuid"))
    if row is None:
        raise NotFound(resource=what, uuid=uuid)
    return row


def _get_one(model: type[Base], what: str) -> Any:
    def handler(uuid: str, session: DbSession) -> JSONResponse:
        return JSONResponse({"inventories": [inventory(session, _get(session, model, uuid, what))], "success": True})

    return handler


for _path, _model, _what in (
    ("notification-targets", NotificationTarget, "notification target"),
    ("notification-rules", NotificationRule, "notification rule"),
):
    router.add_api_route(
        f"/{_path}/{{uuid}}",
        _get_one(_model, _what),
        methods=["GET"],
        name=f"get {_path}",
        response_model=query_answer(_model),
    )


# -- targets --------------------------------------------------------------------------------------
@router.post("/notification-targets", response_model=one_answer(NotificationTarget))
def create_notification_target(body: Envelope, session: DbSession) -> JSONResponse:
    """createNotificationTarget: ``name``, ``type`` (webhook|smtp) and the type's options and
    secrets (docs/notifications.md), ``throttleSeconds`` (default 3600)."""
    p = body.params
    require(p, "name", "type")
    target = NotificationTarget(type=p["type"] if isinstance(p["type"], str) else "")
    update_names(target, p)
    targets.configure(target, p)
    session.add(target)
    session.flush()
    return one(session, target)


@router.put("/notification-targets/{uuid}/actions", response_model=one_answer(NotificationTarget))
def notification_target_action(uuid: str, body: dict[str, Any], session: DbSession) -> JSONResponse:
    """``updateNotificationTarget`` (name, description, options, secrets, throttleSeconds; what is
    not given stays), ``changeNotificationTargetState {stateEvent}``, ``testNotificationTarget``
    (sends a test message now and answers the history row: ``status`` Sent or Failed with
    ``lastError``)."""
    name, params = parse_action(
        body, ("updateNotificationTarget", "changeNotificationTargetState", "testNotificationTarget")
    )
    target: NotificationTarget = _get(session, NotificationTarget, uuid, "notification target")
    if name == "changeNotificationTargetState":
        target.state = state_event(params)
    elif name == "updateNotificationTarget":
        update_names(target, params)
        targets.configure(target, {**targets.current_params(target), **params})
    else:
        return one(session, delivery.test_target(session, target))
    session.flush()
    return one(session, target)


@router.delete("/notification-targets/{uuid}", response_model=Done)
def delete_notification_target(uuid: str, session: DbSession) -> JSONResponse:
    """Delete a target; the rules that named it no longer do; its history stays, an unsent
    digest marked Failed (``the target was deleted``)."""
    target = _get(session, NotificationTarget, uuid, "notification target")
    delivery.abandon(session, target)
    for rule in session.scalars(select(NotificationRule)):
        if target.uuid in rule.targetUuids:
            rule.targetUuids = [t for t in rule.targetUuids if t != target.uuid]
    session.delete(target)
    return ok()


# -- rules ----------------------------------------------------------------------------------------
def _rule_fields(session: DbSession, rule: NotificationRule, p: dict[str, Any]) -> None:
    if "eventType" in p:
        if p["eventType"] not in KINDS:
            raise InvalidArgument(detail=f"eventType must be one of: {', '.join(KINDS)}")
        rule.eventType = p["eventType"]
    if "targetUuids" in p:
        uuids = p["targetUuids"]
        if not isinstance(uuids, list) or not uuids:
            raise InvalidArgument(detail="targetUuids must be a non-empty list of notification target uuids")
        for uuid in uuids:
            _get(session, NotificationTarget, uuid, "notification target")
        rule.targetUuids = sorted(set(uuids))
    if "parameters" in p or "eventType" in p:  # a new eventType checks the parameters kept too
        given = p.get("parameters", rule.parameters) or {}
        allowed = RULE_PARAMETERS.get(rule.eventType, {})
        if not isinstance(given, dict):
            raise InvalidArgument(detail="parameters must be an object")
        for key, value in given.items():
            if key not in allowed:
                raise InvalidArgument(detail=f"{rule.eventType} rules take no parameter {key!r}")
            low, high = allowed[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not low < value <= high:
                raise InvalidArgument(detail=f"{key} must be a number above {low} and at most {high}")
        rule.parameters = given or None


@router.post("/notification-rules", response_model=one_answer(NotificationRule))
def create_notification_rule(body: Envelope, session: DbSession) -> JSONResponse:
    """createNotificationRule: ``name``, ``eventType``, ``targetUuids``, ``parameters``."""
    p = body.params
    require(p, "name", "eventType", "targetUuids")
    rule = NotificationRule()
    update_names(rule, p)
    _rule_fields(session, rule, p)
    session.add(rule)
    session.flush()
    return one(session, rule)


@router.put("/notification-rules/{uuid}/actions", response_model=one_answer(NotificationRule))
def notification_rule_action(uuid: str, body: dict[str, Any], session: DbSession) -> JSONResponse:
    """``updateNotificationRule`` (name, description, eventType, targetUuids, parameters),
    ``changeNotificationRuleState {stateEvent}``."""
    name, params = parse_action(body, ("updateNotificationRule", "changeNotificationRuleState"))
    rule: NotificationRule = _get(session, NotificationRule, uuid, "notification rule")
    if name == "changeNotificationRuleState":
        rule.state = state_event(params)
    else:
        update_names(rule, params)
        _rule_fields(session, rule, params)
    session.flush()
    return one(session, rule)


@router.delete("/notification-rules/{uuid}", response_model=Done)
def delete_notification_rule(uuid: str, session: DbSession) -> JSONResponse:
    session.delete(_get(session, NotificationRule, uuid, "notification rule"))
    return ok()
