"""``blockvault worker``: one Celery worker for this host's queue and the shared queues.

On start it migrates the catalog, registers its host and then heartbeats from a thread; a
second thread reaps hosts whose workers stopped and re-sends lost messages, a third checks
the backup storages and fails the master over (any live worker does these jobs). On a libvirt
host a fourth mirrors the host's domains into the catalog (shared.libvirt.discovery).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from typing import Any

from celery import bootsteps
from celery.concurrency import get_implementation
from celery.utils.nodenames import default_nodename, host_format
from celery.worker import state as worker_state

from shared import hosts, storage
from shared.apijobs import requeue_stale
from shared.catalog import db
from shared.celery_app import STORAGE_QUEUE, celery_app, host_queue
from shared.config import get_settings
from shared.libvirt import connection as libvirt_connection
from shared.repository.backends import registry
from shared.secret import check_at_start
from shared.service import copies, deletion

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Marks this host alive every ``every`` seconds; nothing else, so that no slow
    maintenance ever delays a heartbeat."""

    def __init__(self, host_uuid: str, every: float) -> None:
        super().__init__(daemon=True, name="heartbeat")
        self.host_uuid, self.every = host_uuid, every
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                with db.session() as session:
                    hosts.heartbeat(session, self.host_uuid)
                    # the tasks this worker's pool runs (task id = job uuid): their jobs are alive
                    hosts.touch_jobs(session, {request.id for request in list(worker_state.active_requests)})
            except Exception:
                log.warning("host.heartbeat_failed uuid=%s", self.host_uuid, exc_info=True)


class Maintenance(threading.Thread):
    """Reaps hosts whose workers stopped and re-sends jobs whose message was lost (any live
    worker does this; the work is idempotent)."""

    def __init__(self, every: float, requeue_after: float) -> None:
        super().__init__(daemon=True, name="maintenance")
        self.every, self.requeue_after = every, requeue_after
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                with db.session() as session:
                    hosts.reap(session)
                    hosts.reap_orphans(session)
                with db.session() as session:
                    requeue_stale(session, self.requeue_after)
            except Exception:
                log.warning("worker.maintenance_failed", exc_info=True)


class StorageHealth(threading.Thread):
    """Probes every backup storage (status, capacity), fails the ImageStore master over to a
    standby when it stops answering, and sends catch-up copies between master and standby.
    A thread of its own: a storage that hangs never delays reaping or requeueing."""

    def __init__(self, every: float) -> None:
        super().__init__(daemon=True, name="storage-health")
        self.every = every
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                with db.session() as session:
                    storage.check_storages(session)
                with db.session() as session:
                    copies.catch_up(session)
                with db.session() as session:
                    deletion.reclaim_due(session, get_settings().reclaim_interval_seconds)
            except Exception:
                log.warning("worker.storage_check_failed", exc_info=True)


class LibvirtSync(threading.Thread):
    """Discovers this host's libvirt domains at start and then every ``every`` seconds (their
    state, added and removed domains, changed disks); a libvirt that does not answer is the
    host's ``libvirtStatus``, never the worker's end. With ``BLOCKVAULT_LIBVIRT_URI=off`` only
    the sync at start runs (it clears the host's libvirt columns)."""

    def __init__(self, host_uuid: str, every: float) -> None:
        super().__init__(daemon=True, name="libvirt-sync")
        self.host_uuid, self.every = host_uuid, every
        self.stopped = threading.Event()

    def sync(self) -> None:
        from shared.libvirt import discovery

        try:
            with db.session() as session:
                discovery.sync_host(session, self.host_uuid)
        except Exception:
            log.warning("libvirt.sync_failed host=%s", self.host_uuid, exc_info=True)

    def run(self) -> None:
        if libvirt_connection.switched_off():
            return  # the sync at start recorded "no libvirt"; nothing changes until a restart
        while not self.stopped.wait(self.every):
            self.sync()


def import_before_threads() -> None:
    """Import now, in the main thread, what the background threads would import lazily: a pool
    child forked while a thread held a module's import lock inherits it held and waits for it
    forever (a soak found a child hung in the backends' lazy import, its job Running for good,
    kept alive by the heartbeat)."""
    registry.types()  # every built-in backend module (s3 pulls boto3 in)


class BackgroundThreads(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
    """Starts the worker's threads (heartbeat, maintenance, storage health, libvirt sync) once
    its pool has forked its children. :func:`run_worker` stops them once the worker has ended:
    not when this step stops, which comes before the pool's stop, while a warm shutdown still
    waits for the running jobs that the heartbeat keeps alive.

    A child forked while one of these threads is inside a lock the child needs later inherits
    that lock held, and waits for it for ever: a module's import lock (see
    :func:`import_before_threads`), or a lock of OpenSSL's that a storage probe holds while it
    builds a TLS context or an S3 client (a soak's verify hung so, its job Running for good,
    kept alive by the heartbeat). Python's at-fork hooks cannot free locks of a C library, so
    the children are forked before any of these threads runs. A child forked later (the pool
    replaces one that died) still forks beside them; :func:`_fork_census` logs it."""

    requires = ("celery.worker.components:Pool",)  # the Consumer step is last: this runs before it
    label = "BackgroundThreads"

    def start(self, parent: Any) -> None:
        for thread in parent.blockvault_threads:
            thread.start()


def _fork_census() -> None:
    """Log which other threads run while this process forks (a pool child): ``none`` for the
    children the pool starts with; and how many objects :func:`run_worker` froze."""
    others = sorted(t.name for t in threading.enumerate() if t is not threading.current_thread() and t.is_alive())
    log.info("worker.fork pid=%s threads=%s frozen=%d", os.getpid(), ",".join(others) or "none", gc.get_freeze_count())


def run_worker(host_uuid: str | None = None, concurrency: int = 2, loglevel: str = "INFO") -> int:
    """Run until shut down; the worker's exit code."""
    settings = get_settings()
    import_before_threads()
    host = (host_uuid or hosts.local_host_uuid()).replace("-", "").lower()
    db.migrate()
    check_at_start("worker")  # it opens storage with the credentials the API sealed
    with db.session() as session:
        hosts.register(session, host)
    libvirt_sync = LibvirtSync(host, settings.heartbeat_seconds)
    libvirt_sync.sync()  # once now, in this thread: the threads below start after the pool forks
    threads: list[Heartbeat | Maintenance | StorageHealth | LibvirtSync] = [
        Heartbeat(host, settings.heartbeat_seconds),
        Maintenance(settings.heartbeat_seconds, settings.requeue_seconds),
        StorageHealth(settings.storage_check_seconds),
        libvirt_sync,
    ]
    from workers import tasks

    tasks.RUNNING_ON = host  # before the pool forks: every child binds the jobs it starts here
    log.info("worker.start host=%s queues=%s,%s", host, host_queue(host), STORAGE_QUEUE)
    app = celery_app()
    app.steps["worker"].add(BackgroundThreads)
    os.register_at_fork(before=_fork_census)
    try:
        # the worker itself, as `celery worker` builds it (celery/bin/worker.py), without the
        # celery command line: parsing it imported every click plugin installed (Flower with
        # tornado, click-repl with prompt_toolkit): about 0.45 of a worker's 1.9 CPU s start
        worker = app.Worker(
            hostname=host_format(default_nodename(f"blockvault-{host}@%h")),
            queues=[host_queue(host), STORAGE_QUEUE],
            concurrency=concurrency,
            loglevel=loglevel,
            pool_cls=get_implementation("prefork"),
            without_mingle=True,
            without_gossip=True,
        )
        worker.blockvault_threads = threads
        # What the start made (modules, ORM classes, settings, Celery's steps: ~130,000
        # objects) lives as long as the process. Frozen, the cyclic collector no longer walks
        # it: not in Celery's gc.collect() before each fork (0.06-0.07 CPU s a child), not in
        # the children's collections (which would also copy the pages they share with this
        # process, see the gc.freeze docs), not in the interpreter's teardown at exit (0.33 ->
        # 0.04 CPU s). A collection here finds nothing unreachable: no garbage is kept.
        gc.freeze()
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        for thread in threads:
            thread.stopped.set()
