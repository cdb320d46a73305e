"""``volume_backup_summary`` (migration 0014's triggers) stays what a recomputation from the
backups gives, on SQLite and PostgreSQL: through inserts, status and date changes, moves between
volumes, deletes, plain SQL bulk statements and rolled-back transactions; and on PostgreSQL when
two transactions change one volume's backups at once."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import Engine, create_engine, delete, insert, select, text, update
from sqlalchemy.pool import NullPool

from shared.catalog import db
from shared.catalog.models import VolumeBackup, new_uuid, now
from tests.services import MakePgDatabase
from tests.summaries import assert_summary_right, recomputed, stored

STATUSES = ["Creating", "Ready", "Failed", "Deleting", "Ready", "Failed"]
START = now().replace(microsecond=0)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.db'}"
        db.migrate(url)
    else:
        url = cast(MakePgDatabase, request.getfixturevalue("make_pg_database"))()
    made = create_engine(url, poolclass=NullPool)
    try:
        yield made
    finally:
        made.dispose()
        db.engine(url).dispose()


def row(volume: str, status: str, minutes: int) -> dict[str, object]:
    # few distinct dates: ties on createDate are decided by uuid
    return {
        "uuid": new_uuid(),
        "name": "b",
        "volumeUuid": volume,
        "status": status,
        "createDate": START + timedelta(minutes=minutes),
    }


def test_the_summary_follows_every_kind_of_change(engine: Engine) -> None:
    rng = random.Random(20261207)
    volumes = [new_uuid() for _ in range(6)]
    with engine.begin() as conn:
        conn.execute(
            insert(VolumeBackup), [row(rng.choice(volumes), rng.choice(STATUSES), rng.randrange(20)) for _ in range(60)]
        )
        assert_summary_right(conn)
        assert stored(conn)  # something to compare
    for step in range(150):
        with engine.connect() as conn:
            uuids = list(conn.scalars(select(VolumeBackup.uuid)))
            before = stored(conn)
            target = rng.choice(uuids)
            kind = step % 8
            if kind == 0:
                conn.execute(insert(VolumeBackup), [row(rng.choice(volumes), rng.choice(STATUSES), rng.randrange(20))])
            elif kind == 1:
                conn.execute(
                    update(VolumeBackup).where(VolumeBackup.uuid == target).values(status=rng.choice(STATUSES))
                )
            elif kind == 2:
                when = START + timedelta(minutes=rng.randrange(20))
                conn.execute(update(VolumeBackup).where(VolumeBackup.uuid == target).values(createDate=when))
            elif kind == 3:  # a backup moved to another volume (an import fixing its volume)
                conn.execute(
                    update(VolumeBackup).where(VolumeBackup.uuid == target).values(volumeUuid=rng.choice(volumes))
                )
            elif kind == 4:
                conn.execute(delete(VolumeBackup).where(VolumeBackup.uuid == target))
            elif kind == 5:  # plain SQL over many rows at once (a bulk retention or a reaper)
                volume = rng.choice(volumes)
                conn.execute(
                    text("UPDATE volume_backup SET status = :s WHERE \"volumeUuid\" = :v AND status = 'Ready'"),
                    {"s": rng.choice(["Deleting", "Failed"]), "v": volume},
                )
            elif kind == 6:
                conn.execute(
                    delete(VolumeBackup).where(
                        VolumeBackup.volumeUuid == rng.choice(volumes), VolumeBackup.status == "Failed"
                    )
                )
            else:  # a change that does not move the summary (the size) must leave it as it is
                conn.execute(
                    update(VolumeBackup).where(VolumeBackup.uuid == target).values(size=rng.randrange(1 << 20))
                )
            if rng.random() < 0.2:  # a transaction that dies before its commit changes nothing
                conn.rollback()
                assert stored(conn) == before
            else:
                conn.commit()
            assert_summary_right(conn)
    with engine.begin() as conn:
        conn.execute(delete(VolumeBackup))
        assert stored(conn) == {} == recomputed(conn)


def test_two_transactions_changing_one_volume_at_once_leave_it_right(make_pg_database: MakePgDatabase) -> None:
    """T1 deletes the volume's newest Ready backup while T2 adds a newer one; whichever reaches
    the volume first, the second waits for it and computes from what it committed."""
    engine = create_engine(make_pg_database(), poolclass=NullPool)
    try:
        for first in ("delete", "insert"):
            volume = new_uuid()
            with engine.begin() as conn:
                old = row(volume, "Ready", 1)
                newest = row(volume, "Ready", 5)
                conn.execute(insert(VolumeBackup), [old, newest])
            newer = row(volume, "Ready", 9)
            errors: list[BaseException] = []
            started = threading.Event()

            def change(
                kind: str, holds: bool, gone: str = str(newest["uuid"]), added: dict[str, object] = newer
            ) -> None:
                try:
                    with engine.begin() as conn:
                        if kind == "delete":
                            conn.execute(delete(VolumeBackup).where(VolumeBackup.uuid == gone))
                        else:
                            conn.execute(insert(VolumeBackup), [added])
                        if holds:
                            started.set()  # noqa: B023 - both threads end before the next round
                            threading.Event().wait(0.5)  # hold the volume while the other one comes
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)  # noqa: B023

            second = "insert" if first == "delete" else "delete"
            one = threading.Thread(target=change, args=(first, True))
            one.start()
            assert started.wait(30)
            two = threading.Thread(target=change, args=(second, False))
            two.start()
            one.join(60)
            two.join(60)
            assert not errors
            with engine.connect() as conn:
                assert_summary_right(conn)
                assert stored(conn)[volume][0] == newer["uuid"]
    finally:
        engine.dispose()
