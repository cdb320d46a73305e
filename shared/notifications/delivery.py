"""Deliveries: events into one digest per target, sent at most once per throttle window.

:func:`dispatch` puts every new event into the open delivery (Pending or Failed) of each
target an enabled rule of its kind names; an event is claimed with a conditional UPDATE, so
with several beats each event lands once (and the open delivery is locked while an event is
added, so none is lost between two beats). :func:`send_due` sends an open delivery when its
target's last message is ``throttleSeconds`` old (or there is none) and its retry time has
come; the delivery is claimed the same way (Pending/Failed -> Sending), so it goes out once.
A failed send leaves the delivery Failed, its error and attempt count in the history, and
retries it after :func:`backoff`; events arriving meanwhile join it: nothing is lost. A beat
killed mid-send leaves a delivery Sending: after :data:`STUCK` it is retried (so a message
may, in that one case, arrive twice rather than never).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from shared.catalog.models import (
    NotificationDelivery,
    NotificationEvent,
    NotificationRule,
    NotificationTarget,
    aware,
    now,
)
from shared.errors import BlockvaultError
from shared.inventory import iso

from . import conditions, targets

log = logging.getLogger(__name__)

PASS_SECONDS = 30.0
OPEN = ("Pending", "Failed")
STUCK = timedelta(minutes=5)
FIRST_RETRY = 60
MAX_RETRY = 3600
DISPATCH_BATCH = 1000
MAX_LISTED = 100


def backoff(attempts: int) -> timedelta:
    """How long after its ``attempts``-th failure a delivery is tried again."""
    return timedelta(seconds=min(MAX_RETRY, FIRST_RETRY * 2 ** max(0, attempts - 1)))


def matches(rule: NotificationRule, event: NotificationEvent) -> bool:
    if event.kind == "storageFull":
        wanted = float((rule.parameters or {}).get("fillRatio", conditions.DEFAULT_FILL_RATIO))
        return float((event.details or {}).get("fillRatio", 1.0)) >= wanted
    return True


def _open_delivery(session: Session, target: NotificationTarget) -> NotificationDelivery:
    found = session.scalars(
        select(NotificationDelivery)
        .where(
            NotificationDelivery.targetUuid == target.uuid,
            NotificationDelivery.status.in_(OPEN),
            NotificationDelivery.test.is_(False),
        )
        .order_by(NotificationDelivery.createDate)
        .with_for_update()  # two beats appending to one digest: one after the other, none lost
        .execution_options(populate_existing=True)
    ).first()
    if found is None:
        found = NotificationDelivery(targetUuid=target.uuid, targetName=target.name, status="Pending", eventIds=[])
        session.add(found)
    return found


def dispatch(session: Session) -> int:
    """Put each undispatched event into its targets' open deliveries; how many events."""
    rules = list(session.scalars(select(NotificationRule).where(NotificationRule.state == "Enabled")))
    enabled = {
        t.uuid: t for t in session.scalars(select(NotificationTarget).where(NotificationTarget.state == "Enabled"))
    }
    events = session.scalars(
        select(NotificationEvent)
        .where(NotificationEvent.dispatched.is_(False))
        .order_by(NotificationEvent.id)
        .limit(DISPATCH_BATCH)
    ).all()
    done = 0
    for event in events:
        claimed = session.execute(
            update(NotificationEvent)
            .where(NotificationEvent.id == event.id, NotificationEvent.dispatched.is_(False))
            .values(dispatched=True)
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            continue  # another beat has it
        wanted = {
            uuid for rule in rules if rule.eventType == event.kind and matches(rule, event) for uuid in rule.targetUuids
        }
        for uuid in sorted(wanted & set(enabled)):
            delivery = _open_delivery(session, enabled[uuid])
            delivery.eventIds = [*delivery.eventIds, event.id]
            delivery.eventCount = len(delivery.eventIds)
        session.commit()
        done += 1
    return done


def _compose(session: Session, delivery: NotificationDelivery) -> tuple[str, str, dict[str, Any]]:
    events = session.scalars(
        select(NotificationEvent).where(NotificationEvent.id.in_(delivery.eventIds)).order_by(NotificationEvent.id)
    ).all()
    kinds = sorted({e.kind for e in events})
    subject = f"blockvault: {len(events)} event{'s' if len(events) != 1 else ''} ({', '.join(kinds)})"
    lines = [f"{iso(e.createDate)} {e.kind}: {e.summary}" for e in events[:MAX_LISTED]]
    if len(events) > MAX_LISTED:
        lines.append(f"... and {len(events) - MAX_LISTED} more (GET /v1/notification-events)")
    items = [
        {
            "id": e.id,
            "kind": e.kind,
            "resourceUuid": e.resourceUuid,
            "summary": e.summary,
            "details": e.details,
            "createDate": iso(e.createDate),
        }
        for e in events
    ]
    return (
        subject,
        "\n".join(lines) + "\n",
        {"subject": subject, "deliveryUuid": delivery.uuid, "test": False, "events": items},
    )


def attempt(
    session: Session,
    target: NotificationTarget,
    delivery: NotificationDelivery,
    message: tuple[str, str, dict[str, Any]],
) -> None:
    """Send ``message`` for ``delivery`` (claimed by the caller) and record how it went."""
    subject, text, payload = message
    delivery.subject, delivery.body = subject, text
    delivery.attempts += 1
    moment = now()
    try:
        targets.send(target, subject, text, payload)
    except BlockvaultError as exc:
        delivery.status, delivery.lastError = "Failed", str(exc)
        delivery.nextAttemptDate = None if delivery.test else moment + backoff(delivery.attempts)
        log.warning("notification.failed target=%s delivery=%s %s", target.uuid, delivery.uuid, exc)
    else:
        delivery.status, delivery.sentDate, delivery.nextAttemptDate = "Sent", moment, None
        log.info("notification.sent target=%s delivery=%s events=%d", target.uuid, delivery.uuid, delivery.eventCount)
    session.commit()


def _last_sent(session: Session, target_uuid: str) -> datetime | None:
    value = session.scalar(
        select(func.max(NotificationDelivery.sentDate)).where(
            NotificationDelivery.targetUuid == target_uuid, NotificationDelivery.test.is_(False)
        )
    )
    return aware(value) if value is not None else None


def send_due(session: Session, moment: datetime) -> int:
    """Send every open delivery whose target's throttle window and retry time have passed."""
    session.execute(
        update(NotificationDelivery)
        .where(NotificationDelivery.status == "Sending", NotificationDelivery.lastOpDate < moment - STUCK)
        .values(status="Failed", lastError="interrupted while sending", nextAttemptDate=moment)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    candidates = session.execute(
        select(NotificationDelivery, NotificationTarget)
        .join(NotificationTarget, NotificationTarget.uuid == NotificationDelivery.targetUuid)
        .where(
            NotificationDelivery.status.in_(OPEN),
            NotificationDelivery.test.is_(False),
            NotificationTarget.state == "Enabled",
            or_(NotificationDelivery.nextAttemptDate.is_(None), NotificationDelivery.nextAttemptDate <= moment),
        )
        .order_by(NotificationDelivery.createDate)
        .execution_options(populate_existing=True)  # the rows as they are now, not as this session last saw them
    ).all()
    sent = 0
    for delivery, target in candidates:
        last = _last_sent(session, target.uuid)
        if last is not None and moment < last + timedelta(seconds=target.throttleSeconds):
            continue
        claimed = session.execute(
            update(NotificationDelivery)
            .where(NotificationDelivery.uuid == delivery.uuid, NotificationDelivery.status == delivery.status)
            .values(status="Sending", lastOpDate=now())
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            continue
        session.refresh(delivery)
        attempt(session, target, delivery, _compose(session, delivery))
        sent += delivery.status == "Sent"
    return sent


def abandon(session: Session, target: NotificationTarget) -> None:
    """Close the unsent digests of ``target`` (being deleted): Failed, never retried."""
    session.execute(
        update(NotificationDelivery)
        .where(NotificationDelivery.targetUuid == target.uuid, NotificationDelivery.status.in_(OPEN))
        .values(status="Failed", lastError="the target was deleted", nextAttemptDate=None)
        .execution_options(synchronize_session=False)
    )


def test_target(session: Session, target: NotificationTarget) -> NotificationDelivery:
    """Send a test message to ``target`` now (throttle aside) and record it in the history."""
    delivery = NotificationDelivery(
        targetUuid=target.uuid, targetName=target.name, status="Sending", test=True, eventIds=[]
    )
    session.add(delivery)
    session.flush()
    subject = f"blockvault: test message to {target.name or target.uuid}"
    text = "This is a test message from blockvault: notifications to this target arrive.\n"
    attempt(
        session,
        target,
        delivery,
        (subject, text, {"subject": subject, "deliveryUuid": delivery.uuid, "test": True, "events": []}),
    )
    return delivery


def run_pass(session: Session, moment: datetime | None = None) -> int:
    """The whole cycle: record new events, put them into digests, send what is due; how many
    messages went out."""
    moment = moment or now()
    conditions.evaluate(session, moment)
    session.commit()
    dispatch(session)
    return send_due(session, moment)
