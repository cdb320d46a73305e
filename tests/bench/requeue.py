#!/usr/bin/env python3
"""Broker restart: how long until every queued job's lost message is sent again.

Run as::

    .venv/bin/python tests/bench/requeue.py [--jobs 5000] [--broker redis://127.0.0.1:6379/13 | amqp://.../vhost]

Makes a fresh PostgreSQL database with ``--jobs`` Pending API jobs whose messages a restarted
broker lost (their queue is empty), then runs the workers' maintenance pass (``requeue_stale``)
until every one is sent again, and prints the time and the rate. Goal: 5,000 within 60 s.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--pg", default="postgresql+psycopg2://postgres@127.0.0.1:5432")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    name = f"bv_requeue_{secrets.token_hex(4)}"
    admin = create_engine(f"{args.pg}/postgres", poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    os.environ["BLOCKVAULT_DATABASE_URL"] = f"{args.pg}/{name}"
    os.environ["BLOCKVAULT_BROKER_URL"] = args.broker
    try:
        from shared import apijobs
        from shared.catalog import db
        from tests.shared.test_apijobs import pending

        db.migrate()
        pending(args.jobs, "host.bench-requeue")
        started = time.monotonic()
        sent = passes = 0
        while sent < args.jobs:
            with db.session() as session:
                sent += apijobs.requeue_stale(session, older_than=60)
            passes += 1
        seconds = time.monotonic() - started
        print(f"{args.jobs} lost jobs sent again in {seconds:.1f} s ({args.jobs / seconds:.0f}/s, {passes} pass(es))")
        print(f"goal: within 60 s: {'PASS' if seconds <= 60 else 'FAIL'}")
        from shared.celery_app import celery_app

        with celery_app().connection_for_write() as connection:
            connection.default_channel.queue_purge("host.bench-requeue")
        db.engine().dispose()
        return 0 if seconds <= 60 else 1
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
