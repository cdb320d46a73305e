"""``blockvault beat``: a Celery beat scheduler whose schedule is the catalog.

There is no static beat schedule: every tick reads the enabled triggers and the job groups
attached to them (so changes apply without a restart), fires what is due and sleeps until the
next fire time (at most ``MAX_SLEEP`` seconds). Two beats may run at once: a fire is recorded
once and each target's job id is derived from the fire, so nothing runs twice.

A thread of the beat runs the notification pass (:func:`shared.notifications.delivery.run_pass`)
every ``PASS_SECONDS``: the one place notifications are evaluated and sent, beside the fires but
never in their way (a slow mail server does not delay a fire). Several beats may run it at
once: events, digests and sends are claimed in the catalog, so each goes out once.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

from celery.beat import Scheduler

from shared.catalog import db
from shared.notifications import delivery
from shared.secret import check_at_start
from shared.service import scheduled_runs

log = logging.getLogger(__name__)
MAX_SLEEP = 2.0


class CatalogScheduler(Scheduler):  # type: ignore[misc]
    """Celery's beat Scheduler with ``tick`` delegated to :func:`shared.service.scheduled_runs.tick`."""

    def setup_schedule(self) -> None:
        db.migrate()
        check_at_start("beat")
        threading.Thread(target=notification_loop, name="beat-notifications", daemon=True).start()

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            with db.session() as session:
                return min(MAX_SLEEP, scheduled_runs.tick(session))
        except Exception:
            log.warning("beat.tick_failed", exc_info=True)
            return MAX_SLEEP

    @property
    def info(self) -> str:
        return "catalog (job groups and triggers)"


def notification_loop() -> None:
    """Run the notification pass every ``PASS_SECONDS``, for the life of the beat."""
    while True:
        started = time.monotonic()
        try:
            with db.session() as session:
                delivery.run_pass(session)
        except Exception:
            log.warning("beat.notification_pass_failed", exc_info=True)
        time.sleep(max(0.0, delivery.PASS_SECONDS - (time.monotonic() - started)))


def run_beat(loglevel: str = "INFO") -> None:
    from shared.celery_app import celery_app

    app = celery_app()
    beat = app.Beat(scheduler=CatalogScheduler, max_interval=MAX_SLEEP, loglevel=loglevel)
    # Celery's beat, the catalog and the service modules are imported: frozen, the collector
    # no longer walks them, in the collections of a long run nor in the teardown at exit (a
    # short beat's life 1.37 -> 1.02 CPU s, as if it skipped the teardown; see
    # api.cli.freeze_start_heap). Garbage made after this is collected as before.
    gc.freeze()
    beat.run()
