"""The test databases themselves (tests/services.py): a migrated PostgreSQL database a test gave
back is lent again only as a fresh copy of the template would be, else dropped; a Redis
database index claimed by a process that died is taken over, one held by a live one is not."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid

import redis
from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.pool import NullPool

from shared.catalog.models import Account, SchedulerJobHistory
from tests.services import _REDIS_CLAIM, SpareDatabases, _redis_base_url, _RedisClaims


def _exists(spares: SpareDatabases, name: str) -> bool:
    engine = create_engine(spares.base.set(database="postgres"), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return bool(conn.scalar(text("SELECT count(*) FROM pg_database WHERE datname = :n"), {"n": name}))
    finally:
        engine.dispose()


def test_a_database_given_back_is_lent_again_as_the_template_made_it(pg_spares: SpareDatabases) -> None:
    name = pg_spares.take()
    engine = create_engine(pg_spares.base.set(database=name), poolclass=NullPool)
    with engine.begin() as conn:
        seeded = conn.scalar(select(func.count()).select_from(Account))
        conn.execute(insert(Account).values(name="left-behind"))
        first = conn.execute(insert(SchedulerJobHistory).values(success=True).returning(SchedulerJobHistory.id))
        first_id = first.scalar_one()
    held = engine.connect()  # a connection the test left open: terminated, not waited for
    held.execute(text("SELECT 1"))
    pg_spares.give_back(name)
    held.invalidate()  # its server side is gone: no rollback to send
    assert pg_spares.take() == name  # the same database, lent again
    with engine.begin() as conn:
        assert conn.scalar(select(func.count()).select_from(Account)) == seeded
        assert conn.scalar(select(func.count()).select_from(SchedulerJobHistory)) == 0
        again = conn.execute(insert(SchedulerJobHistory).values(success=True).returning(SchedulerJobHistory.id))
        assert again.scalar_one() == first_id  # sequences restarted
    # a test that changed the schema: the database is dropped, never lent again
    with engine.begin() as conn:
        conn.execute(text('ALTER TABLE "account" ADD COLUMN "extra" integer'))
    engine.dispose()
    pg_spares.give_back(name)
    assert name not in pg_spares.free and not _exists(pg_spares, name)


def test_a_redis_claim_of_a_dead_process_is_taken_over_and_only_that(redis_url: str) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    key = _REDIS_CLAIM.format(index=f"selftest-{uuid.uuid4().hex[:8]}")
    claims = _RedisClaims()
    with redis.Redis.from_url(f"{_redis_base_url()}/0") as client:
        try:
            for holder, taken in (
                (f"{socket.gethostname()}:{dead.pid}:x", True),  # a test run killed with SIGKILL
                (f"{socket.gethostname()}:{os.getpid()}:x", False),  # alive
                (f"another-machine:{dead.pid}:x", False),  # cannot tell: left to its TTL
            ):
                client.set(key, holder, ex=60)
                assert claims._take_over(client, key) is taken
                assert client.get(key) == (claims.token if taken else holder).encode()
        finally:
            client.delete(key)
