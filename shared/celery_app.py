"""The Celery app and its routing, shared by the API (which sends), workers and beat.

Messages carry ids only (an API job uuid); everything else is read from the catalog. Volume
work goes to the queue of the host that holds the volume, ``host.<hostUuid>``; storage work
(sync, verify, delete, gc) to the shared queue ``storage``. Tasks are ``acks_late`` and
idempotent: a redelivered message finds its API job finished and does nothing.
"""

from __future__ import annotations

import functools
from typing import Any

from celery import Celery

from shared.config import get_settings
from shared.private import private_dir

STORAGE_QUEUE = "storage"
# the Celery task names, one constant each (workers/tasks.py registers them, the service sends them)
VOLUME_BACKUP = "blockvault.volume.backup"
VOLUME_REVERT = "blockvault.volume.revert"
VOLUME_CREATE = "blockvault.volume.create_from_backup"
INSTANT_RESTORE = "blockvault.volume.instant_restore"
VM_CREATE = "blockvault.vm.create_from_backup"
STORAGE_VERIFY = "blockvault.storage.verify"
STORAGE_DELETE = "blockvault.storage.delete"
STORAGE_SYNC = "blockvault.storage.sync"
STORAGE_SCAN = "blockvault.storage.scan"
STORAGE_GC = "blockvault.storage.gc"
SCHEDULER_RUN = "blockvault.scheduler.run"
DATABASE_BACKUP = "blockvault.database.backup"
DATABASE_RECOVER = "blockvault.database.recover"
TASK_MODULES = ["workers.tasks"]
# longer than the longest backup, so Redis never redelivers a message a worker still runs
VISIBILITY_TIMEOUT = 24 * 3600


def host_queue(host_uuid: str) -> str:
    return f"host.{host_uuid}"


def celery_config() -> dict[str, Any]:
    settings = get_settings()
    config: dict[str, Any] = {
        "broker_url": settings.broker,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": STORAGE_QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT},
        "imports": TASK_MODULES,
    }
    if settings.broker == "filesystem://":
        folder = settings.broker_folder
        private_dir(settings.data_path)
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        config["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    return config


@functools.cache
def celery_app() -> Celery:
    app = Celery("blockvault")
    app.conf.update(celery_config())
    return app
