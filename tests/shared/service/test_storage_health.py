"""The health pass (:func:`shared.storage.check_storages`) beside a job that holds a storage row.

A backup job's transaction holds its master's row (its capacity and status were updated) while
it probes the standby during a failover. The health pass of another worker once probed every
storage and wrote all their statuses in one transaction at its end: it held the row it wrote
first while it waited for the job's, and the job then waited for that one: PostgreSQL broke
the deadlock by failing the job (seen once in the storage-topology suite, a scheduled backup
failing with "raised as a result of Query-invoked autoflush"). Each probe is now committed
on its own.
"""

from __future__ import annotations

import threading
import time

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from shared import storage as storages
from shared.catalog import db
from shared.catalog.models import BackupStorage
from tests.shared.service.conftest import Site

WAIT_SECONDS = 60.0


def _waiting_on_a_lock(session: Session) -> int:
    """How many other sessions of this database wait for a row lock now. The transaction ends
    with the read: PostgreSQL keeps a transaction's first view of pg_stat_activity until it
    ends, so a watcher that looked before the health pass waited never saw it wait."""
    found = session.scalar(
        text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
    )
    session.rollback()
    return int(found or 0)


def _health_pass_beside(site: Site, held: BackupStorage, other: BackupStorage) -> None:
    """Run a health pass that changes both storages' status while a job's transaction holds
    ``held``'s row; once the pass waits for it, the job takes ``other``'s row as well (as a
    failing-over job takes the standby's) and commits."""
    failures: list[BaseException] = []

    def health_pass() -> None:
        try:
            with db.session() as session:
                storages.check_storages(session)
        except Exception as exc:  # noqa: BLE001 (the test reports it)
            failures.append(exc)

    with db.session() as job:
        job.execute(text("SET LOCAL lock_timeout = '30s'"))
        job.execute(select(BackupStorage).where(BackupStorage.uuid == held.uuid).with_for_update())
        thread = threading.Thread(target=health_pass, name="health-pass")
        thread.start()
        deadline = time.monotonic() + WAIT_SECONDS
        with db.session() as watcher:
            while _waiting_on_a_lock(watcher) == 0:
                assert thread.is_alive(), f"the health pass ended without waiting for the held row: {failures}"
                assert time.monotonic() < deadline, "the health pass never reached the held row"
                time.sleep(0.05)
        # the pass waits for the held row: it must not hold the other one meanwhile
        job.execute(select(BackupStorage).where(BackupStorage.uuid == other.uuid).with_for_update())
    thread.join(WAIT_SECONDS)
    assert not thread.is_alive(), "the health pass did not end once the job committed"
    assert failures == []


def test_a_health_pass_never_holds_one_storage_row_while_it_waits_for_another(site: Site) -> None:
    master, standby = site.storage("master"), site.storage("standby", role="standby")
    first, second = site.session.scalars(select(BackupStorage).order_by(*storages.IN_ORDER)).all()
    # both storages change status in each pass (gone, then back), so the pass writes both rows;
    # the held row is the one it reaches second, then the one it reaches first
    for held, other, expected in ((second, first, "Disconnected"), (first, second, "Connected")):
        moved = {row.uuid: (site.tmp / row.name, site.tmp / f"away-{row.name}") for row in (master, standby)}
        for here, away in moved.values():
            if expected == "Disconnected":
                here.rename(away)
            else:
                away.rename(here)
        _health_pass_beside(site, held, other)
        site.session.expire_all()
        assert {row.name: row.status for row in (master, standby)} == {"master": expected, "standby": expected}
    # nothing answered while both were gone, so the master stayed where it was
    assert (site.session.get_one(BackupStorage, master.uuid).role, standby.role) == ("master", "standby")
