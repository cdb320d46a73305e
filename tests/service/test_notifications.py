"""Notifications as the service runs them: two ``blockvault beat`` processes on one PostgreSQL
catalog, the API as a process, a real webhook receiver. Both beats run the notification pass;
each failed job still reaches the receiver once, signed; a beat killed with SIGKILL leaves the
other one delivering, and no secret is in any process's log."""

from __future__ import annotations

import signal
from collections import Counter

from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from shared.catalog.models import ApiJob
from tests import notify_fixtures
from tests.notify_fixtures import WEBHOOK_SECRET, Receiver
from tests.service.conftest import Stack

webhook = notify_fixtures.webhook  # fixture


def fail_a_job(url: str, action: str) -> str:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with Session(engine) as session:
            job = ApiJob(action=action, state="Failed", error={"code": "STORAGE_ERROR", "description": "disk gone"})
            session.add(job)
            session.commit()
            return job.uuid
    finally:
        engine.dispose()


def delivered(receiver: Receiver) -> Counter[str]:
    return Counter(e["details"]["jobUuid"] for body in receiver.bodies for e in body["events"])


def test_two_beats_deliver_each_event_once_and_one_survives_the_others_death(
    stack: Stack, webhook: Receiver, pg_database: str
) -> None:
    client = stack.client
    target = client.create_notification_target(
        "hook", "webhook", url=webhook.url, secret=WEBHOOK_SECRET, throttleSeconds=0
    )
    client.create_notification_rule("failures", "jobFailed", [target["uuid"]])
    first = fail_a_job(pg_database, "createVolumeBackup")

    stack.start_beat("beat-1")
    stack.start_beat("beat-2")
    stack.wait_for("the first failure delivered", lambda: first in delivered(webhook))
    # (each beat runs a pass at its first tick, seconds after it starts: both raced for that one)
    stack.kill("beat-1", signal.SIGKILL)
    second = fail_a_job(pg_database, "syncBackupFromImageStoreBackupStorage")
    stack.wait_for(
        "the second failure delivered by the surviving beat", lambda: second in delivered(webhook), timeout=120
    )

    assert delivered(webhook) == Counter({first: 1, second: 1})
    assert all(webhook.signed)
    rows = client.notification_histories()
    assert [r["status"] for r in rows] == ["Sent", "Sent"] and sum(r["eventCount"] for r in rows) == 2
    for name in ("api", "beat-1", "beat-2"):
        assert WEBHOOK_SECRET not in stack.log(name)
