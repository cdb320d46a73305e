"""API jobs on a real PostgreSQL catalog and a real Redis broker: lost messages are sent
again in one pass, thousands at a time, and only where the queue lost them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import insert

from shared import apijobs
from shared.catalog import db
from shared.catalog.models import ApiJob, new_uuid, now
from shared.celery_app import celery_app
from shared.config import get_settings


@pytest.fixture
def broker(pg_database: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    for name in list(os.environ):
        if name.startswith("BLOCKVAULT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BLOCKVAULT_DATABASE_URL", pg_database)
    monkeypatch.setenv("BLOCKVAULT_BROKER_URL", redis_url)
    monkeypatch.setenv("BLOCKVAULT_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    celery_app.cache_clear()
    db.reset()
    try:
        yield redis.Redis.from_url(redis_url)
    finally:
        db.engine(pg_database).dispose()
        db.reset()
        celery_app.cache_clear()
        get_settings.cache_clear()


def pending(count: int, queue: str, age: float = 600) -> list[str]:
    moment = now() - timedelta(seconds=age)
    rows = [
        {
            "uuid": new_uuid(),
            "action": "createVolumeBackup",
            "state": "Pending",
            "progress": 0,
            "params": {"_task": "blockvault.volume.backup", "_queue": queue},
            "createDate": moment,
            "lastOpDate": moment,
        }
        for _ in range(count)
    ]
    with db.session() as session:
        session.execute(insert(ApiJob), rows)
    return [str(row["uuid"]) for row in rows]


def test_a_restarted_broker_gets_every_lost_job_again_in_one_pass(broker: redis.Redis) -> None:
    lost = pending(5000, "host.lost")
    with db.session() as session:
        # one pass: the time budget (20 s, for a production pass) is no part of what this tests;
        # on a loaded machine 5000 jobs take longer, and the pass would stop short of them
        assert apijobs.requeue_stale(session, older_than=60, budget_seconds=600) == 5000
    assert broker.llen("host.lost") == 5000
    with db.session() as session:  # sent just now: no longer stale
        assert apijobs.requeue_stale(session, older_than=60) == 0
    assert broker.llen("host.lost") == 5000
    assert len(set(lost)) == 5000


def test_jobs_waiting_behind_others_are_left_alone(broker: redis.Redis) -> None:
    pending(3, "host.busy")
    waiting = pending(2, "host.idle", age=5)  # not stale yet
    celery_app().send_task("blockvault.volume.backup", args=["x"], queue="host.busy")
    with db.session() as session:
        assert apijobs.requeue_stale(session, older_than=60) == 0
    assert broker.llen("host.busy") == 1 and broker.llen("host.idle") == 0
    with db.session() as session:
        assert apijobs.requeue_stale(session, older_than=1) == 2  # the idle queue's, now stale
    assert broker.llen("host.idle") == 2 and len(waiting) == 2


def test_a_queue_the_broker_cannot_measure_is_not_taken_for_an_empty_one(broker: redis.Redis) -> None:
    """No answer about a queue's depth (here Redis answers WRONGTYPE) says nothing about its
    messages: its stale jobs are not re-sent; an absent queue (no key) is an empty one."""
    broker.set("host.odd", "not a list")
    pending(2, "host.odd")
    lost = pending(1, "host.gone")
    assert apijobs.queue_depth("host.odd") is None
    assert apijobs.queue_depth("host.gone") == 0
    with db.session() as session:
        assert apijobs.requeue_stale(session, older_than=60) == 1
    assert broker.llen("host.gone") == 1 and broker.get("host.odd") == b"not a list"
    with db.session() as session:
        assert session.get_one(ApiJob, lost[0]).state == "Pending"
