"""Celery tasks: thin wrappers that load an API job by id, call the core, record the result.

``job_task`` gives every task the same life cycle (Running, progress, Succeeded/Failed with an
error envelope), logging and retry policy, so no task repeats it. Every line logged while a
job runs, the engine's included, names its API job and Celery task (``job=... task=...``, see
:mod:`shared.logcontext`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Task
from celery.signals import after_setup_logger, after_setup_task_logger, task_failure, worker_process_init
from sqlalchemy.orm import Session

from shared import celery_app as tasks
from shared.apijobs import fail_job, finish_job, start_job
from shared.catalog import db
from shared.catalog.models import ApiJob
from shared.celery_app import celery_app
from shared.config import get_settings
from shared.errors import BlockvaultError, CatalogUnavailable
from shared.logcontext import install, job_context
from shared.service import (
    copies,
    database_backups,
    deletion,
    instant,
    recovery,
    scan,
    scheduled_runs,
    vm_from_backup,
    volume_backups,
)

log = logging.getLogger(__name__)
app = celery_app()
# The host this worker process runs for (set by run_worker before the pool forks): jobs from the
# shared queues are bound to it when they start, so they fail when its worker dies.
RUNNING_ON: str | None = None

Runner = Callable[[Session, ApiJob], dict[str, Any]]


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    db.reset()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _job_context_in_logs(logger: logging.Logger | None = None, **_: object) -> None:
    """The worker's handlers (set up before the pool forks) add the job and task to each line."""
    if logger is not None:
        install(logger, get_settings().log_format)


@task_failure.connect
def _worker_lost(task_id: str | None = None, exception: BaseException | None = None, **_: object) -> None:
    """A pool process that died mid-job (SIGKILL, out of memory) never records the job's end;
    the worker's main process does it here, so the job fails instead of staying Running (and a
    scheduled run gets its history row)."""
    if not task_id or not isinstance(exception, WorkerLostError):
        return
    try:
        with job_context(task_id, task_id), db.session() as session:
            job = session.get(ApiJob, task_id)
            if job is not None and job.state == "Running":
                fail_job(
                    session,
                    job,
                    code="WORKER_LOST",
                    description=f"the worker process running this job died ({exception})",
                )
    except Exception:  # the catalog is down: say so; the job stays Running
        log.warning("job.worker_lost_unrecorded uuid=%s", task_id, exc_info=True)


def job_task(name: str) -> Callable[[Runner], Task]:
    def register(run: Runner) -> Task:
        @app.task(
            name=name,
            bind=True,
            acks_late=True,
            autoretry_for=(CatalogUnavailable,),
            retry_backoff=2,
            retry_backoff_max=60,
            max_retries=20,
        )
        def task(self: Task, job_uuid: str) -> None:
            with job_context(job_uuid, self.request.id), db.session() as session:
                job = start_job(session, job_uuid)
                if job is None:
                    log.info("job.skipped uuid=%s (unknown or finished)", job_uuid)
                    return
                if job.hostUuid is None and RUNNING_ON:
                    job.hostUuid = RUNNING_ON  # a storage-queue job: bound to the worker running it
                    session.commit()
                log.info("job.started uuid=%s action=%s", job_uuid, job.action)
                try:
                    result = run(session, job)
                except BlockvaultError as exc:
                    session.rollback()
                    job = session.get(ApiJob, job_uuid)
                    assert job is not None
                    if isinstance(exc, CatalogUnavailable):
                        raise
                    fail_job(session, job, code=exc.code, description=str(exc), details=type(exc).__name__)
                    return
                except Exception as exc:
                    session.rollback()
                    job = session.get(ApiJob, job_uuid)
                    assert job is not None
                    log.exception("job.crashed uuid=%s", job_uuid)  # the traceback: in the log only
                    fail_job(
                        session,
                        job,
                        code="INTERNAL_ERROR",
                        description=f"{type(exc).__name__}: {exc}"[:2000],
                        details=type(exc).__name__,
                    )
                    return
                finish_job(session, job, result)
                log.info("job.succeeded uuid=%s action=%s", job_uuid, job.action)

        return task

    return register


volume_backup = job_task(tasks.VOLUME_BACKUP)(volume_backups.run_volume_backups)
volume_revert = job_task(tasks.VOLUME_REVERT)(recovery.run_revert)
volume_create_from_backup = job_task(tasks.VOLUME_CREATE)(recovery.run_create_volume)
instant_restore = job_task(tasks.INSTANT_RESTORE)(instant.run_instant)
vm_create_from_backup = job_task(tasks.VM_CREATE)(vm_from_backup.run_create_vm)
storage_verify = job_task(tasks.STORAGE_VERIFY)(recovery.run_verify)
storage_delete = job_task(tasks.STORAGE_DELETE)(deletion.run_delete)
scheduler_run = job_task(tasks.SCHEDULER_RUN)(scheduled_runs.run_scheduled)
storage_sync = job_task(tasks.STORAGE_SYNC)(copies.run_sync)
storage_scan = job_task(tasks.STORAGE_SCAN)(scan.run_scan)
storage_gc = job_task(tasks.STORAGE_GC)(deletion.run_reclaim)
database_backup = job_task(tasks.DATABASE_BACKUP)(database_backups.run_database_backup)
database_recover = job_task(tasks.DATABASE_RECOVER)(database_backups.run_recover)
