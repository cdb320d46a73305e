"""Notifications end to end in the service layer, on a real PostgreSQL catalog, to a real SMTP
server (aiosmtpd) and a real webhook receiver that checks each body's HMAC signature: what
goes wrong becomes one event, a night of events one digest per target and throttle window, a
target that is down keeps its digest (Failed in the history) until it answers, and no secret
of a target is in any message, history row or error."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.catalog import db
from shared.catalog.models import (
    ApiJob,
    Host,
    NotificationDelivery,
    NotificationEvent,
    NotificationRule,
    NotificationTarget,
    SchedulerJob,
    SchedulerJobGroup,
    SchedulerJobGroupTriggerRef,
    SchedulerTrigger,
    aware,
    now,
)
from shared.notifications import conditions, delivery, targets
from shared.notifications.events import notify_event
from tests.notify_fixtures import (
    SMTP_PASSWORD,
    SMTP_USER,
    WEBHOOK_SECRET,
    Mailbox,
    Receiver,
    smtp_server,
    start_smtp,
    webhook,
)
from tests.ports import free_port
from tests.shared.service.conftest import Site

__all__ = ["smtp_server", "webhook"]  # fixtures


def hook_target(session: Session, url: str, throttle: int = 3600) -> NotificationTarget:
    target = NotificationTarget(name="hook", type="webhook")
    targets.configure(target, {"url": url, "secret": WEBHOOK_SECRET, "throttleSeconds": throttle})
    session.add(target)
    session.commit()
    return target


def mail_target(session: Session, box: Mailbox, **more: Any) -> NotificationTarget:
    target = NotificationTarget(name="mail", type="smtp")
    params = {"host": box.host, "port": box.port, "sender": "bv@example.org", "recipients": ["ops@example.org"]}
    targets.configure(target, {**params, "username": SMTP_USER, "password": SMTP_PASSWORD, **more})
    session.add(target)
    session.commit()
    return target


def rule(session: Session, kind: str, *sent_to: NotificationTarget, **parameters: Any) -> None:
    session.add(
        NotificationRule(
            name=kind, eventType=kind, targetUuids=[t.uuid for t in sent_to], parameters=parameters or None
        )
    )
    session.commit()


def failed_jobs(session: Session, count: int, action: str = "createVolumeBackup") -> list[ApiJob]:
    jobs = [
        ApiJob(action=action, state="Failed", error={"code": "STORAGE_ERROR", "description": f"disk {i} gone"})
        for i in range(count)
    ]
    session.add_all(jobs)
    session.commit()
    return jobs


def history(session: Session) -> list[NotificationDelivery]:
    session.expire_all()
    return list(session.scalars(select(NotificationDelivery).order_by(NotificationDelivery.createDate)))


def assert_no_secret(*texts: str | bytes | None) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else (text or b"")
        for secret in (SMTP_PASSWORD, WEBHOOK_SECRET):
            assert secret.encode() not in data


def test_a_night_of_failures_is_one_signed_digest_and_one_mail_per_target(
    site: Site, smtp_server: Mailbox, webhook: Receiver
) -> None:
    session = site.session
    hook, mail = hook_target(session, webhook.url), mail_target(session, smtp_server)
    rule(session, "jobFailed", hook, mail)
    jobs = failed_jobs(session, 5)

    assert delivery.run_pass(session) == 2
    assert len(webhook.bodies) == 1 and webhook.signed == [True]
    assert sorted(e["details"]["jobUuid"] for e in webhook.bodies[0]["events"]) == sorted(j.uuid for j in jobs)
    assert len(smtp_server.messages) == 1 and smtp_server.logins == [SMTP_USER]
    text = smtp_server.messages[0].get_payload()
    assert all(f"disk {i} gone" in str(text) for i in range(5))
    assert smtp_server.messages[0]["Subject"] == "blockvault: 5 events (jobFailed)"
    rows = history(session)
    assert [(r.status, r.eventCount, r.attempts) for r in rows] == [("Sent", 5, 1), ("Sent", 5, 1)]
    assert_no_secret(*webhook.raw, *smtp_server.raw, *(r.body for r in rows))

    assert delivery.run_pass(session) == 0  # the same failures: nothing new
    assert len(webhook.bodies) == 1 and len(smtp_server.messages) == 1
    assert session.scalar(select(NotificationEvent.id).where(NotificationEvent.dispatched.is_(False))) is None


def test_throttling_collects_later_events_into_the_next_window(site: Site, webhook: Receiver) -> None:
    session = site.session
    hook = hook_target(session, webhook.url, throttle=3600)
    rule(session, "jobFailed", hook)
    failed_jobs(session, 1)
    assert delivery.run_pass(session, now()) == 1
    sent = aware(history(session)[0].sentDate)  # the window runs from the send, however slow this machine is

    later = failed_jobs(session, 3)
    assert delivery.run_pass(session, sent + timedelta(minutes=30)) == 0  # inside the window
    assert len(webhook.bodies) == 1
    pending = [r for r in history(session) if r.status == "Pending"]
    assert len(pending) == 1 and pending[0].eventCount == 3

    assert delivery.run_pass(session, sent + timedelta(seconds=3599)) == 0  # one second before it ends
    assert delivery.run_pass(session, sent + timedelta(seconds=3601)) == 1
    assert len(webhook.bodies) == 2 and webhook.signed == [True, True]
    assert sorted(e["details"]["jobUuid"] for e in webhook.bodies[1]["events"]) == sorted(j.uuid for j in later)


def test_a_target_that_is_down_is_failed_in_the_history_and_retried_with_nothing_lost(site: Site) -> None:
    session = site.session
    receiver = Receiver(free_port())  # nothing listens there yet: connection refused
    hook = hook_target(session, receiver.url, throttle=0)
    rule(session, "jobFailed", hook)
    first = failed_jobs(session, 2)
    start = now()
    assert delivery.run_pass(session, start) == 0
    [row] = history(session)
    assert row.status == "Failed" and row.attempts == 1 and row.nextAttemptDate is not None
    retry = aware(row.nextAttemptDate)  # backoff(1) after the attempt, however slow this machine is
    assert "ConnectError" in (row.lastError or "") and "refused" in (row.lastError or "").lower()
    assert_no_secret(row.lastError, row.body)

    more = failed_jobs(session, 1)  # arrives while the target is down: joins the same digest
    assert delivery.run_pass(session, retry - timedelta(seconds=1)) == 0  # not before its retry time
    assert history(session)[0].attempts == 1

    receiver.start()
    try:
        assert delivery.run_pass(session, retry) == 1
    finally:
        receiver.stop()
    [row] = history(session)
    assert (row.status, row.attempts, row.eventCount) == ("Sent", 2, 3)
    assert receiver.signed == [True]
    assert sorted(e["details"]["jobUuid"] for e in receiver.bodies[0]["events"]) == sorted(
        j.uuid for j in [*first, *more]
    )


def test_smtp_with_starttls_and_a_private_ca(site: Site, tmp_path: Path) -> None:
    controller, box = start_smtp(tmp_path, starttls=True)
    try:
        mail = mail_target(site.session, box, starttls=True, caFile=box.ca_file)
        sent = delivery.test_target(site.session, mail)
        assert sent.status == "Sent", sent.lastError
        assert len(box.messages) == 1 and box.logins == [SMTP_USER]
        plain = mail_target(site.session, box)  # no STARTTLS: the server refuses to go on
        refused = delivery.test_target(site.session, plain)
        assert refused.status == "Failed" and refused.nextAttemptDate is None
        assert_no_secret(refused.lastError, *box.raw)
    finally:
        controller.stop()
    assert delivery.run_pass(site.session) == 0  # a failed test is not retried by the pass


def test_conditions_become_one_event_per_episode(site: Site, webhook: Receiver) -> None:
    session = site.session
    hook = hook_target(session, webhook.url, throttle=0)
    for kind in conditions_kinds():
        rule(session, kind, hook)
    storage = site.storage()
    storage.status, storage.totalCapacity, storage.availableCapacity = "Disconnected", 1000, 50
    host = session.get(Host, site.host)
    assert host is not None
    host.lastHeartbeat = now() - timedelta(hours=1)
    volume = site.volume("overdue.raw")
    group = SchedulerJobGroup(name="nightly", jobType="volumeBackup", jobData={})
    trigger = SchedulerTrigger(name="hourly", schedulerType="simple", schedulerInterval=3600)
    session.add_all([group, trigger])
    session.flush()
    session.add(SchedulerJob(name="j", schedulerJobGroupUuid=group.uuid, targetResourceUuid=volume.uuid))
    session.add(SchedulerJobGroupTriggerRef(schedulerJobGroupUuid=group.uuid, schedulerTriggerUuid=trigger.uuid))
    session.commit()
    assert notify_event(session, "verifyDamage", key="scan-1", summary="2 bad chunks", resource_uuid=storage.uuid)
    assert not notify_event(session, "verifyDamage", key="scan-1", summary="2 bad chunks", resource_uuid=storage.uuid)
    session.commit()

    moment = now() + timedelta(hours=2)  # two hours without a backup of an hourly schedule
    assert conditions.schedule_intervals(session, moment) == {volume.uuid: (3600.0, volume.uuid)}
    assert delivery.run_pass(session, moment) == 1
    kinds = sorted(e["kind"] for e in webhook.bodies[0]["events"])
    assert kinds == sorted(conditions_kinds())
    assert delivery.run_pass(session, moment + timedelta(seconds=1)) == 0  # still holding: no new event

    host = session.get(Host, site.host)
    assert host is not None
    host.status, host.lastHeartbeat = "Connected", now() + timedelta(days=1)
    session.commit()
    delivery.run_pass(session, moment + timedelta(seconds=2))  # the host is back: its episode ends
    host.lastHeartbeat, host.status = now() - timedelta(hours=1), "Connected"
    session.commit()
    assert delivery.run_pass(session, moment + timedelta(seconds=3)) == 1  # a new episode
    assert [e["kind"] for e in webhook.bodies[-1]["events"]] == ["hostDisconnected"]


def conditions_kinds() -> list[str]:
    return ["backupOverdue", "hostDisconnected", "storageDisconnected", "storageFull", "verifyDamage"]


def test_a_rule_sends_storage_full_from_its_own_fill_ratio(site: Site, webhook: Receiver) -> None:
    session = site.session
    hook = hook_target(session, webhook.url, throttle=0)
    rule(session, "storageFull", hook, fillRatio=0.99)
    storage = site.storage()
    storage.totalCapacity, storage.availableCapacity = 1000, 50  # 95 %: under this rule's 99 %
    session.commit()
    assert delivery.run_pass(session) == 0 and not webhook.bodies


def test_two_beats_at_once_send_each_event_once(site: Site, webhook: Receiver) -> None:
    session = site.session
    hook = hook_target(session, webhook.url)
    rule(session, "jobFailed", hook)
    jobs = failed_jobs(session, 20)
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def beat() -> None:
        try:
            with db.session() as own:
                barrier.wait()
                delivery.run_pass(own)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=beat) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(webhook.bodies) == 1  # one message in the throttle window, whoever sent it
    rows = history(session)
    listed = [event for row in rows for event in row.eventIds]
    assert len(listed) == len(set(listed)) == len(jobs)  # every event in exactly one digest
    assert session.query(NotificationEvent).count() == len(jobs)


def test_a_digest_left_sending_by_a_killed_beat_is_sent_by_the_next_pass(site: Site, webhook: Receiver) -> None:
    session = site.session
    hook = hook_target(session, webhook.url, throttle=0)
    rule(session, "jobFailed", hook)
    jobs = failed_jobs(session, 2)
    start = now()
    conditions.evaluate(session, start)
    delivery.dispatch(session)
    [row] = history(session)
    row.status = "Sending"  # claimed by a beat that died before it recorded anything
    session.commit()
    claimed = aware(history(session)[0].lastOpDate)  # STUCK runs from the claim, however slow this machine is
    assert delivery.run_pass(session, claimed + delivery.STUCK - timedelta(seconds=1)) == 0  # a beat may still send it
    assert not webhook.bodies
    assert delivery.run_pass(session, claimed + delivery.STUCK + timedelta(seconds=1)) == 1
    [row] = history(session)
    assert (row.status, row.attempts) == ("Sent", 1)
    assert sorted(e["details"]["jobUuid"] for e in webhook.bodies[0]["events"]) == sorted(j.uuid for j in jobs)
