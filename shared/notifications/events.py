"""Events: each recorded once, whoever notices it (two beats, a worker and a beat).

:func:`notify_event` is the one way in, for the notification pass and for any other part of
the service (a verify job that found damaged chunks calls
``notify_event(session, "verifyDamage", key=..., summary=..., resource_uuid=storage_uuid)``).
:func:`hold` and :func:`release` track the conditions that last (a host Disconnected): one
event when the condition starts, none while it holds, a new one if it starts again.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.catalog.models import NotificationCondition, NotificationEvent
from shared.errors import InvalidArgument

log = logging.getLogger(__name__)

KINDS = ("jobFailed", "backupOverdue", "storageDisconnected", "storageFull", "verifyDamage", "hostDisconnected")
MAX_KEY = 200


def notify_event(
    session: Session,
    kind: str,
    *,
    key: str,
    summary: str,
    resource_uuid: str | None = None,
    details: dict[str, Any] | None = None,
) -> bool:
    """Record the event ``kind``/``key`` unless it is recorded already; True when this call
    recorded it. ``summary`` (one line) and ``details`` go into messages as they are: never
    pass a secret. Commits nothing: the caller's transaction carries it (a savepoint keeps a
    duplicate from spoiling it)."""
    if kind not in KINDS:
        raise InvalidArgument(detail=f"event kind must be one of: {', '.join(KINDS)}")
    dedupe = f"{kind}/{key}"[:MAX_KEY]
    if session.scalars(select(NotificationEvent.id).where(NotificationEvent.dedupeKey == dedupe)).first() is not None:
        return False
    row = NotificationEvent(
        kind=kind, dedupeKey=dedupe, resourceUuid=resource_uuid, summary=summary, details=details, dispatched=False
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        return False  # another process recorded it meanwhile
    log.info("notification.event kind=%s key=%s", kind, key)
    return True


def hold(session: Session, key: str) -> int | None:
    """Note that condition ``key`` holds; its episode's number when it did not hold before (the
    caller records the event), else None."""
    if session.scalars(select(NotificationCondition.id).where(NotificationCondition.key == key)).first() is not None:
        return None
    row = NotificationCondition(key=key)
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        return None
    return row.id


def release(session: Session, prefix: str, holding: Collection[str]) -> None:
    """Forget the conditions under ``prefix`` that no longer hold (not in ``holding``)."""
    held = session.scalars(select(NotificationCondition.key).where(NotificationCondition.key.startswith(prefix)))
    gone = [key for key in held if key not in holding]
    if gone:
        session.execute(delete(NotificationCondition).where(NotificationCondition.key.in_(gone)))
