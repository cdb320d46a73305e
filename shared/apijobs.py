"""API jobs: every asynchronous action is an ApiJob row whose uuid is the Celery task id.

The API creates the row and sends the task in the same step; the worker moves it Pending ->
Running -> Succeeded/Failed and reports progress; ``GET /v1/api-jobs/<uuid>`` reads it. A
job never finishes twice: a redelivered task finds it finished and returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from amqp.exceptions import NotFound  # type: ignore[import-untyped]
from kombu.exceptions import ChannelError
from sqlalchemy import Table, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from shared.catalog import db
from shared.catalog.models import ApiJob, DatabaseBackup, Volume, VolumeBackup, new_uuid, now
from shared.celery_app import celery_app

log = logging.getLogger(__name__)
FINISHED = ("Succeeded", "Failed")
REQUEUE_BATCH = 1000  # stale jobs read (and sent) at a time
REQUEUE_BUDGET_SECONDS = 20.0  # one maintenance pass's share of re-sending
SEND_BATCH = 1000  # broker commands buffered per pipeline by send_many
_end_hooks: dict[str, Callable[[Session, ApiJob], None]] = {}


def on_end(action: str, hook: Callable[[Session, ApiJob], None]) -> None:
    """Call ``hook(session, job)`` in the same transaction whenever a job of ``action`` ends
    (succeeds, fails, or is failed by the reaper): e.g. the scheduler's history rows."""
    _end_hooks[action] = hook


def enqueue(
    session: Session,
    action: str,
    *,
    task: str,
    queue: str,
    params: dict[str, Any],
    resource_uuid: str | None = None,
    resource_type: str | None = None,
    host_uuid: str | None = None,
    account_uuid: str | None = None,
) -> ApiJob:
    """Record an API job and send its task (ids only in the message). The row is committed
    before the message is sent, so a worker always finds it."""
    job = ApiJob(
        uuid=new_uuid(),
        action=action,
        params={**params, "_task": task, "_queue": queue},
        resourceUuid=resource_uuid,
        resourceType=resource_type,
        hostUuid=host_uuid,
        accountUuid=account_uuid,
    )
    session.add(job)
    session.flush()
    session.commit()
    celery_app().send_task(task, args=[job.uuid], task_id=job.uuid, queue=queue)
    log.info("job.enqueued uuid=%s action=%s queue=%s", job.uuid, action, queue)
    return job


@dataclass(frozen=True)
class NewJob:
    """One job for :func:`enqueue_many`."""

    uuid: str
    action: str
    task: str
    queue: str
    params: dict[str, Any]
    resource_uuid: str | None = None
    resource_type: str | None = None
    host_uuid: str | None = None


def enqueue_many(session: Session, jobs: list[NewJob]) -> list[str]:
    """Record many jobs in one statement, skipping uuids that exist already (another beat
    made them), commit, then send the tasks of the ones recorded here. Returns their uuids."""
    if not jobs:
        return []
    moment = now()
    rows = [
        {
            "uuid": job.uuid,
            "action": job.action,
            "params": {**job.params, "_task": job.task, "_queue": job.queue},
            "resourceUuid": job.resource_uuid,
            "resourceType": job.resource_type,
            "hostUuid": job.host_uuid,
            "state": "Pending",
            "progress": 0,
            "createDate": moment,
            "lastOpDate": moment,
        }
        for job in jobs
    ]
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    # one statement compiled once (and cached) and sent as executemany: SQLAlchemy batches the
    # rows into multi-row INSERTs itself ("insertmanyvalues"); a .values(rows) statement instead
    # is compiled afresh with a bind parameter per column per row (~0.3 ms a job)
    statement = (
        insert(cast(Table, ApiJob.__table__)).on_conflict_do_nothing(index_elements=["uuid"]).returning(ApiJob.uuid)
    )
    recorded = set(session.connection().execute(statement, rows).scalars())
    session.commit()
    todo = [(job.uuid, job.task, job.queue) for job in jobs if job.uuid in recorded]
    send_many(todo)
    return [uuid for uuid, _task, _queue in todo]


def start_job(session: Session, job_uuid: str) -> ApiJob | None:
    """The job to run, now Running; None when it is unknown, running elsewhere or finished.
    Only one delivery of a message moves a job from Pending to Running (one atomic UPDATE),
    so a duplicate message never runs a job twice."""
    claimed = session.execute(
        update(ApiJob)
        .where(ApiJob.uuid == job_uuid, ApiJob.state == "Pending")
        .values(state="Running", progress=0, lastOpDate=now())
    )
    session.commit()
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return session.get(ApiJob, job_uuid)


def queue_depth(queue: str) -> int | None:
    """Messages waiting in ``queue`` on the broker: 0 when the broker has no such queue (Redis
    keeps no key for an empty list; RabbitMQ lost a queue it did not keep over a restart), None
    when it cannot tell (a broker hiccup, an error answer)."""
    try:
        with celery_app().connection_for_write() as connection:
            try:
                return int(connection.default_channel.queue_declare(queue=queue, passive=True).message_count)
            except (ChannelError, NotFound):  # "no such queue" (virtual transports; AMQP 404): nothing waits
                return 0
    except Exception:  # noqa: BLE001 - no answer: nothing is concluded from it
        return None


def requeue_stale(
    session: Session, older_than: float, *, batch: int = REQUEUE_BATCH, budget_seconds: float = REQUEUE_BUDGET_SECONDS
) -> int:
    """Send again the tasks of jobs still Pending after ``older_than`` seconds whose queue
    was empty on the broker when this pass began: their message was lost (a broker that
    keeps nothing on disk was restarted). Jobs waiting behind others in a non-empty queue are
    left alone, and so are those of a queue whose depth the broker did not tell (before, no
    answer counted as empty and re-sent every stale job of the queue). Duplicates are harmless
    (see start_job). Reads the stale jobs ``batch`` at a time (oldest first, by keyset) and
    sends each batch with one producer, for at most ``budget_seconds``; other workers' passes
    skip the rows this one holds (PostgreSQL). Returns how many were sent."""
    cutoff = now() - timedelta(seconds=older_than)
    deadline = time.monotonic() + budget_seconds
    depths: dict[str, int | None] = {}
    cursor: tuple[Any, str] | None = None
    sent = 0
    while time.monotonic() < deadline:
        query = select(ApiJob.uuid, ApiJob.lastOpDate, ApiJob.params).where(
            ApiJob.state == "Pending", ApiJob.lastOpDate < cutoff
        )
        if cursor is not None:
            query = query.where(tuple_(ApiJob.lastOpDate, ApiJob.uuid) > tuple_(*cursor))
        rows = session.execute(
            query.order_by(ApiJob.lastOpDate, ApiJob.uuid).limit(batch).with_for_update(skip_locked=True)
        ).all()
        if not rows:
            break
        cursor = (rows[-1].lastOpDate, rows[-1].uuid)
        chosen: list[tuple[str, str, str]] = []
        for uuid, _last, params in rows:
            task, queue = (params or {}).get("_task"), (params or {}).get("_queue")
            if not task or not queue:
                continue
            if queue not in depths:
                depths[queue] = queue_depth(queue)
            if depths[queue] == 0:  # messages waiting there, or no answer: nothing is known lost
                chosen.append((uuid, task, queue))
        if chosen:
            session.execute(update(ApiJob).where(ApiJob.uuid.in_([c[0] for c in chosen])).values(lastOpDate=now()))
        session.commit()
        send_many(chosen)
        for uuid, _task, queue in chosen:
            log.warning("job.requeued uuid=%s queue=%s", uuid, queue)
        sent += len(chosen)
    return sent


def send_many(tasks: list[tuple[str, str, str]]) -> None:
    """Send ``(job uuid, task, queue)`` messages on one producer (one connection, no pool
    round trip per message), in one publish batch: on Redis the messages and their task-sent
    events go out in pipelines of ``SEND_BATCH`` commands instead of a round trip each (kombu's
    ``Producer.batch``; transports without batching publish at once). A batch that fails
    midway may have delivered some of its messages: the rows are committed before, so the
    maintenance pass re-sends what was lost, and a duplicate never runs a job twice."""
    if not tasks:
        return
    app = celery_app()
    with app.producer_or_acquire() as producer, producer.batch(max_size=SEND_BATCH):
        # each queue bound to the producer's channel once: given an unbound one, every send
        # copies it to bind it (kombu's maybe_declare), about a fifth of a send's cost
        bound: dict[str, Any] = {}
        for uuid, task, queue in tasks:
            if queue not in bound:
                bound[queue] = app.amqp.queues[queue].bind(producer.channel)
            app.send_task(task, args=[uuid], task_id=uuid, queue=queue, producer=producer, declare=[bound[queue]])


def finish_job(session: Session, job: ApiJob, result: dict[str, Any]) -> None:
    job.state = "Succeeded"
    job.progress = 100
    job.result = result
    _ended(session, job)
    session.commit()


def _ended(session: Session, job: ApiJob) -> None:
    hook = _end_hooks.get(job.action)
    if hook is not None:
        hook(session, job)


def fail_job(session: Session, job: ApiJob, *, code: str, description: str, details: str = "") -> None:
    """Mark ``job`` Failed with an error envelope, and the resource it was creating Failed."""
    if job.state in FINISHED:
        return
    job.state = "Failed"
    job.error = {"code": code, "description": description, "details": details}
    rows: list[VolumeBackup | DatabaseBackup] = []
    params = job.params or {}
    if job.resourceType in (VolumeBackup.resource_type, "VmBackup", "volumeBackup", "vmBackup"):
        uuids = params.get("backupUuids") or ([job.resourceUuid] if job.resourceType == "VolumeBackupVO" else [])
        rows += [b for uuid in uuids if uuid and (b := session.get(VolumeBackup, uuid)) is not None]
    elif job.resourceType in (DatabaseBackup.resource_type, "databaseBackup"):
        uuids = params.get("databaseBackupUuids") or (
            [job.resourceUuid] if job.resourceType == "DatabaseBackupVO" else []
        )
        rows += [d for uuid in uuids if uuid and (d := session.get(DatabaseBackup, uuid)) is not None]
    for row in rows:
        if row.status == "Creating":
            row.status = "Failed"
            for ref in row.backupStorageRefs:
                if ref.status == "Creating":
                    ref.status = "Failed"
    made = params.get("volumeUuids") or ([job.resourceUuid] if job.resourceType == Volume.resource_type else [])
    for volume_uuid in made:
        # a volume being created (from a backup) that will never be whole: no row is left that
        # could be backed up, reverted or used, whatever the file at its path is
        volume = session.get(Volume, volume_uuid) if volume_uuid else None
        if volume is not None and volume.status == "Creating":
            session.delete(volume)
        elif volume is not None and volume.status == "Streaming":
            volume.status = "Failed"  # an instant restore's overlay: it keeps the guest's writes
    target = params.get("dstBackupStorageUuid")
    if target and params.get("backupUuids"):  # a copy that died: its half-made refs are Failed
        for uuid in params["backupUuids"]:
            copied = session.get(DatabaseBackup, uuid) if params.get("database") else session.get(VolumeBackup, uuid)
            for ref in copied.backupStorageRefs if copied is not None else []:
                if ref.backupStorageUuid == target and ref.status == "Creating":
                    ref.status = "Failed"
    _ended(session, job)
    log.warning("job.failed uuid=%s action=%s code=%s %s", job.uuid, job.action, code, description)


def progress_reporter(job_uuid: str, every: float = 1.0) -> Callable[[int, int], None]:
    """A progress callback that writes the job's percentage at most every ``every`` seconds."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        moment = time.monotonic()
        if moment - last[0] < every or not total:
            return
        last[0] = moment
        with db.session() as session:
            job = session.get(ApiJob, job_uuid)
            if job is not None and job.state == "Running":
                job.progress = min(99, int(done * 100 / total))

    return report
