#!/usr/bin/env python3
"""cProfile one scheduler fire of N volume targets in this process, against PostgreSQL and Redis.

Run as::

    PYTHONPATH=$PWD .venv/bin/python tests/bench/fire_cprofile.py [N]   # N = 10000 by default

Makes a fresh database (``bv_i17prof_<random>``, dropped at the end), N volumes spread over two
Connected hosts, one volumeBackup job group holding them all, claims a Redis database index as
scheduler_scale.py does (flushed and released at the end), and fires the group once
(``scheduled_runs.run_now``) under cProfile: the tasks are really sent. Prints the wall and CPU
time of the fire (``time.process_time``, cProfile's own cost included) and the top functions by
cumulative and by own time. Not a pytest test.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import secrets
import sys
import time

from sqlalchemy import create_engine, select, text

from tests.bench.scheduler_scale import RedisIndex

PG = "postgresql+psycopg2://postgres@127.0.0.1:5432"


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    name = "bv_i17prof_" + secrets.token_hex(4)
    admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = f"{PG}/{name}"
    broker = RedisIndex("redis://127.0.0.1:6379", 13)
    os.environ["BLOCKVAULT_DATABASE_URL"] = url
    os.environ["BLOCKVAULT_BROKER_URL"] = broker.url
    from shared.catalog import db
    from shared.catalog.models import BackupStorage, Host, SchedulerJobGroup, Volume, new_uuid, now
    from shared.service import jobgroups, scheduled_runs

    try:
        db.migrate()
        with db.session() as session:
            hosts = [Host(uuid=new_uuid(), name=f"h{i}", status="Connected", lastHeartbeat=now()) for i in range(2)]
            storage = BackupStorage(uuid=new_uuid(), name="st", url="file:///nonexistent")
            session.add_all([*hosts, storage])
            session.flush()
            volumes = [
                Volume(uuid=new_uuid(), name=f"v{i}", hostUuid=hosts[i % 2].uuid, installPath=f"/nonexistent/v{i}")
                for i in range(count)
            ]
            session.add_all(volumes)
            session.commit()
            parameters = {"backupStorageUuids": [storage.uuid]}
            group = jobgroups.create_group(session, {"name": "g", "type": "volumeBackup", "parameters": parameters})
            jobgroups.add_targets(session, group, [v.uuid for v in volumes])
            group_uuid = group.uuid
        with db.session() as session:
            group = session.scalars(select(SchedulerJobGroup).where(SchedulerJobGroup.uuid == group_uuid)).one()
            profile = cProfile.Profile()
            wall, cpu = time.perf_counter(), time.process_time()
            profile.enable()
            fired = scheduled_runs.run_now(session, group)
            profile.disable()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"fired {fired} in {wall:.2f} s wall, {cpu:.2f} s CPU (cProfile included); load average {load}")
        stats = pstats.Stats(profile)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(20)
    finally:
        broker.flush()
        broker.release()
        db.engine(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


if __name__ == "__main__":
    main()
