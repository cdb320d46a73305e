"""Prometheus metrics, read from the catalog when scraped.

Workers run as separate processes on many hosts, so no process holds the numbers: the catalog
(the one shared truth) does. :class:`CatalogCollector` answers each scrape with a few
aggregate queries (the same SQL on SQLite and PostgreSQL) and the broker's queue depths.

Backups can be deleted (by hand or by a job group's retention), so the numbers read from
``volume_backup`` rows are gauges: the backups the catalog holds now. API jobs are never
deleted, so :data:`JOB_DURATION`, a histogram of the finished ones, only grows: its ``_count``
is the counter to ``rate()`` (backup jobs succeeded and failed per second).

When the catalog does not answer, ``blockvault_catalog_up`` is 0 and only the broker's
metrics follow; when the broker does not, ``blockvault_broker_up`` is 0 and queue depths are
left out. A scrape never fails for either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import ColumnElement, and_, case, exists, func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, aliased

from shared.catalog import db
from shared.catalog.models import (
    ApiJob,
    BackupStorage,
    Host,
    NotificationEvent,
    SchedulerJob,
    SchedulerJobGroup,
    VerifyCursor,
    Volume,
    VolumeBackup,
    VolumeBackupStorageRef,
    aware,
    now,
)
from shared.celery_app import STORAGE_QUEUE, celery_app, host_queue
from shared.errors import BlockvaultError
from shared.notifications.conditions import schedule_intervals
from shared.notifications.events import KINDS

log = logging.getLogger(__name__)

PREFIX = "blockvault_"
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
MODES = ("full", "incremental")
BACKUP_STATUSES = ("Creating", "Ready", "Failed", "Deleting")
FINISHED = ("Succeeded", "Failed")
UNFINISHED = ("Pending", "Running")
BROKER_TIMEOUT = 3.0
STORAGE_LABELS = ["storage", "name", "type", "role"]

JOB_DURATION = PREFIX + "job_duration_seconds"
HELP = {
    "volume_backups": "Volume backups in the catalog now, by mode (the engine's, once Ready) and status.",
    "volume_backup_size_bytes": "Sum of the volume sizes of the Ready volume backups in the catalog.",
    "volume_backup_read_bytes": "Bytes the engine read for the Ready volume backups in the catalog "
    "(backups recorded before stats were kept count 0).",
    "volume_backup_written_bytes": "Bytes the engine stored (new chunks, compressed) for the Ready volume backups in "
    "the catalog.",
    "volume_backup_chunks": "Chunks of the Ready volume backups in the catalog: kind=new were stored by the backup, "
    "kind=deduplicated were already on the storage.",
    "job_duration_seconds": "Finished API jobs, from the request (createDate) to the end (lastOpDate), by action "
    "and final state. API jobs are never deleted: _count only grows.",
    "jobs_in_progress": "API jobs not finished yet, by action and state (Pending or Running).",
    "storage_sync_lag_backups": "For a storage that should hold copies (an ImageStore standby, or a job group's "
    "backupStorageUuids after the first): Ready volume backups that have a Ready copy elsewhere (on another "
    "ImageStore for a standby; anywhere for a job group's target, counting that group's backups) but no Ready "
    "copy on this storage.",
    "storage_sync_lag_seconds": "Age of the oldest backup counted by blockvault_storage_sync_lag_backups "
    "(0 when there is none).",
    "volume_last_backup_timestamp_seconds": "Unix time of the newest Ready backup of each registered volume (its "
    "createDate: when it was requested); 0 when it has none.",
    "volume_backup_interval_seconds": "Seconds between the scheduled backups of each volume an enabled job group "
    "covers (its most frequent enabled trigger); volumes on no schedule are left out.",
    "storage_fill_ratio": "Used share of each backup storage's capacity, 0 to 1 (0 when its capacity is unknown).",
    "notification_events": "Events recorded for notifications, by kind (jobFailed, backupOverdue, "
    "storageDisconnected, storageFull, verifyDamage, hostDisconnected); they are kept, so the counter only grows.",
    "queue_depth": "Messages waiting on the broker in each queue: storage and host.<hostUuid> of every registered "
    "host (0 for a queue the broker does not have yet).",
    "storage_total_bytes": "Capacity of each backup storage, as last probed.",
    "storage_available_bytes": "Available space on each backup storage, as last probed.",
    "storage_connected": "1 when the backup storage answered its last probe (status Connected), else 0.",
    "host_connected": "1 when the host's worker heartbeats (status Connected), else 0.",
    "host_last_heartbeat_timestamp_seconds": "Unix time of the host's last heartbeat (0: never).",
    "verify_damaged_chunks": "Chunks scheduled verify runs (verify job groups) found damaged or missing on each "
    "storage, ever: a counter (one damaged chunk found again in a later cycle counts again).",
    "verify_repaired_chunks": "Damaged chunks scheduled verify runs rewrote from a good copy on another storage, ever.",
    "verify_cycles": "Completed verify cycles (every chunk of the storage checked once) on each storage.",
    "catalog_up": "1 when the catalog answered this scrape, else 0.",
    "broker_up": "1 when the broker answered this scrape, else 0.",
    "scrape_duration_seconds": "How long this scrape took.",
}


def _gauge(name: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, HELP[name], labels=list(labels))


def _timestamp(value: datetime | None) -> float:
    return aware(value).timestamp() if value is not None else 0.0


def _seconds_between(session: Session, start: Any, end: Any) -> ColumnElement[Any]:
    """``end - start`` in seconds, in SQL (SQLite keeps datetimes as text)."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


# -- backups -----------------------------------------------------------------------------------
def backup_metrics(session: Session) -> Iterator[Metric]:
    counts = _gauge("volume_backups", ["mode", "status"])
    found: dict[tuple[str, str], int] = {(mode, status): 0 for mode in MODES for status in BACKUP_STATUSES}
    rows = session.execute(
        select(VolumeBackup.mode, VolumeBackup.status, func.count()).group_by(VolumeBackup.mode, VolumeBackup.status)
    )
    for mode, status, count in rows:
        found[(mode, status)] = int(count)
    for (mode, status), count in sorted(found.items()):
        counts.add_metric([mode, status], count)
    yield counts

    size, read, written = (
        _gauge("volume_backup_size_bytes", ["mode"]),
        _gauge("volume_backup_read_bytes", ["mode"]),
        _gauge("volume_backup_written_bytes", ["mode"]),
    )
    chunks = _gauge("volume_backup_chunks", ["mode", "kind"])
    totals: dict[str, tuple[int, ...]] = {mode: (0, 0, 0, 0, 0) for mode in MODES}
    rows = session.execute(
        select(
            VolumeBackup.mode,
            func.sum(VolumeBackup.size),
            func.sum(VolumeBackup.bytesRead),
            func.sum(VolumeBackup.bytesWritten),
            func.sum(VolumeBackup.newChunks),
            func.sum(VolumeBackup.chunks - VolumeBackup.newChunks),
        )
        .where(VolumeBackup.status == "Ready")
        .group_by(VolumeBackup.mode)
    )
    for row in rows:
        totals[row[0]] = tuple(int(value or 0) for value in row[1:])
    for mode, (total_size, total_read, total_written, new, deduplicated) in sorted(totals.items()):
        size.add_metric([mode], total_size)
        read.add_metric([mode], total_read)
        written.add_metric([mode], total_written)
        chunks.add_metric([mode, "new"], new)
        chunks.add_metric([mode, "deduplicated"], deduplicated)
    yield from (size, read, written, chunks)


def last_backup_metrics(session: Session, moment: datetime) -> Iterator[Metric]:
    last = _gauge("volume_last_backup_timestamp_seconds", ["volume", "name", "host"])
    interval = _gauge("volume_backup_interval_seconds", ["volume", "name", "host"])
    scheduled = schedule_intervals(session, moment)
    newest = (
        select(VolumeBackup.volumeUuid, func.max(VolumeBackup.createDate).label("newest"))
        .where(VolumeBackup.status == "Ready")
        .group_by(VolumeBackup.volumeUuid)
        .subquery()
    )
    rows = session.execute(
        select(Volume.uuid, Volume.name, Volume.hostUuid, newest.c.newest)
        .outerjoin(newest, newest.c.volumeUuid == Volume.uuid)
        .order_by(Volume.uuid)
    )
    for uuid, name, host, newest_date in rows:
        last.add_metric([uuid, name or "", host or ""], _timestamp(newest_date))
        if uuid in scheduled:
            interval.add_metric([uuid, name or "", host or ""], scheduled[uuid][0])
    yield from (last, interval)


def event_metrics(session: Session) -> Iterator[Metric]:
    found = dict.fromkeys(KINDS, 0)
    for kind, count in session.execute(select(NotificationEvent.kind, func.count()).group_by(NotificationEvent.kind)):
        found[kind] = int(count)
    counter = CounterMetricFamily(PREFIX + "notification_events", HELP["notification_events"], labels=["kind"])
    for kind, count in found.items():
        counter.add_metric([kind], count)
    yield counter


# -- jobs --------------------------------------------------------------------------------------
def job_metrics(session: Session) -> Iterator[Metric]:
    duration = _seconds_between(session, ApiJob.createDate, ApiJob.lastOpDate)
    finished = (
        select(
            ApiJob.action.label("action"),
            ApiJob.state.label("state"),
            case((duration < 0, 0.0), else_=duration).label("seconds"),  # clocks of two hosts
        )
        .where(ApiJob.state.in_(FINISHED))
        .subquery()
    )
    seconds = finished.c.seconds
    buckets = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS]
    rows = session.execute(
        select(finished.c.action, finished.c.state, func.count(), func.sum(seconds), *buckets)
        .group_by(finished.c.action, finished.c.state)
        .order_by(finished.c.action, finished.c.state)
    )
    histogram = HistogramMetricFamily(JOB_DURATION, HELP["job_duration_seconds"], labels=["action", "state"])
    for action, state, count, total, *within in rows:
        points = [(str(bound), float(n or 0)) for bound, n in zip(DURATION_BUCKETS, within, strict=True)]
        histogram.add_metric([action, state], [*points, ("+Inf", float(count))], float(total or 0.0))
    yield histogram

    active = _gauge("jobs_in_progress", ["action", "state"])
    rows = session.execute(
        select(ApiJob.action, ApiJob.state, func.count())
        .where(ApiJob.state.in_(UNFINISHED))
        .group_by(ApiJob.action, ApiJob.state)
        .order_by(ApiJob.action, ApiJob.state)
    )
    for action, state, count in rows:
        active.add_metric([action, state], int(count))
    yield active


# -- storages and hosts ------------------------------------------------------------------------
def _labels(storage: BackupStorage) -> list[str]:
    return [storage.uuid, storage.name or "", storage.type, storage.role]


def sync_targets(session: Session, storages: Iterable[BackupStorage]) -> dict[str, tuple[bool, set[str]]]:
    """The storages that should hold copies: uuid -> (is an ImageStore standby, the job groups
    whose later ``backupStorageUuids`` name it)."""
    targets: dict[str, tuple[bool, set[str]]] = {}
    for storage in storages:
        if storage.type == "ImageStore" and storage.role == "standby" and storage.state == "Enabled":
            targets[storage.uuid] = (True, set())
    groups = session.execute(select(SchedulerJobGroup.uuid, SchedulerJobGroup.jobData)).all()
    for group, data in groups:
        uuids = (data or {}).get("backupStorageUuids") or []
        for uuid in uuids[1:] if isinstance(uuids, list) else []:
            if isinstance(uuid, str):
                targets.setdefault(uuid, (False, set()))[1].add(group)
    return targets


def _lag(session: Session, storage_uuid: str, standby: bool, groups: set[str]) -> tuple[int, datetime | None]:
    """How many Ready volume backups should be on ``storage_uuid`` and are not, and the
    oldest one's createDate (one aggregate query)."""
    ref, source = aliased(VolumeBackupStorageRef), aliased(BackupStorage)
    here = exists().where(
        ref.volumeBackupUuid == VolumeBackup.uuid, ref.backupStorageUuid == storage_uuid, ref.status == "Ready"
    )

    def copy_elsewhere(image_store_only: bool) -> ColumnElement[bool]:
        other = aliased(VolumeBackupStorageRef)
        condition = exists().where(
            other.volumeBackupUuid == VolumeBackup.uuid,
            other.backupStorageUuid != storage_uuid,
            other.status == "Ready",
        )
        if image_store_only:
            condition = condition.where(source.uuid == other.backupStorageUuid, source.type == "ImageStore")
        return condition

    wanted: list[ColumnElement[bool]] = []
    if standby:
        wanted.append(copy_elsewhere(True))
    if groups:
        of_groups = select(SchedulerJob.uuid).where(SchedulerJob.schedulerJobGroupUuid.in_(sorted(groups)))
        wanted.append(and_(VolumeBackup.schedulerJobUuid.in_(of_groups), copy_elsewhere(False)))
    row = session.execute(
        select(func.count(), func.min(VolumeBackup.createDate)).where(
            VolumeBackup.status == "Ready", ~here, or_(*wanted)
        )
    ).one()
    return int(row[0]), row[1]


def storage_metrics(session: Session, moment: datetime) -> Iterator[Metric]:
    storages = list(session.scalars(select(BackupStorage).order_by(BackupStorage.createDate, BackupStorage.uuid)))
    total = _gauge("storage_total_bytes", STORAGE_LABELS)
    available = _gauge("storage_available_bytes", STORAGE_LABELS)
    connected = _gauge("storage_connected", STORAGE_LABELS)
    fill = _gauge("storage_fill_ratio", STORAGE_LABELS)
    for storage in storages:
        labels = _labels(storage)
        total.add_metric(labels, storage.totalCapacity or 0)
        available.add_metric(labels, storage.availableCapacity or 0)
        connected.add_metric(labels, 1 if storage.status == "Connected" else 0)
        capacity = storage.totalCapacity or 0
        fill.add_metric(labels, max(0.0, 1.0 - (storage.availableCapacity or 0) / capacity) if capacity else 0.0)
    yield from (total, available, connected, fill)

    lag_backups = _gauge("storage_sync_lag_backups", STORAGE_LABELS)
    lag_seconds = _gauge("storage_sync_lag_seconds", STORAGE_LABELS)
    targets = sync_targets(session, storages)
    for storage in storages:
        if storage.uuid not in targets:
            continue
        standby, groups = targets[storage.uuid]
        count, oldest = _lag(session, storage.uuid, standby, groups)
        lag_backups.add_metric(_labels(storage), count)
        age = (moment - aware(oldest)).total_seconds() if count and oldest is not None else 0.0
        lag_seconds.add_metric(_labels(storage), max(0.0, age))
    yield from (lag_backups, lag_seconds)


def verify_metrics(session: Session) -> Iterator[Metric]:
    """``blockvault_verify_{damaged,repaired}_chunks_total`` and ``_cycles_total`` per storage,
    summed over the verify jobs' cursors (rows are never deleted: the sums only grow). The
    notification rule "verify found damage" is ``increase(blockvault_verify_damaged_chunks_total[1h]) > 0``."""
    families = {
        name: CounterMetricFamily(PREFIX + name, HELP[name], labels=["storage"])
        for name in ("verify_damaged_chunks", "verify_repaired_chunks", "verify_cycles")
    }
    rows = session.execute(
        select(
            VerifyCursor.backupStorageUuid,
            func.sum(VerifyCursor.damagedChunks),
            func.sum(VerifyCursor.repairedChunks),
            func.sum(VerifyCursor.cycle),
        ).group_by(VerifyCursor.backupStorageUuid)
    )
    for storage, damaged, repaired, cycles in rows:
        families["verify_damaged_chunks"].add_metric([storage], int(damaged or 0))
        families["verify_repaired_chunks"].add_metric([storage], int(repaired or 0))
        families["verify_cycles"].add_metric([storage], int(cycles or 0))
    yield from families.values()


def host_metrics(session: Session) -> tuple[list[Metric], list[str]]:
    connected = _gauge("host_connected", ["host", "name"])
    heartbeat = _gauge("host_last_heartbeat_timestamp_seconds", ["host", "name"])
    uuids = []
    for uuid, name, status, last in session.execute(
        select(Host.uuid, Host.name, Host.status, Host.lastHeartbeat).order_by(Host.uuid)
    ):
        connected.add_metric([uuid, name or ""], 1 if status == "Connected" else 0)
        heartbeat.add_metric([uuid, name or ""], _timestamp(last))
        uuids.append(uuid)
    return [connected, heartbeat], uuids


# -- the broker --------------------------------------------------------------------------------
def queue_depths(queues: Sequence[str], timeout: float = BROKER_TIMEOUT) -> dict[str, int] | None:
    """Messages waiting in each of ``queues`` (0 for one the broker does not have), or None
    when the broker does not answer within about ``timeout`` seconds."""
    try:
        # a scrape does not wait for the broker to come back (socket_*: Redis; other transports ignore them)
        options = {"max_retries": 0, "socket_connect_timeout": timeout, "socket_timeout": timeout}
        with celery_app().connection_for_read(connect_timeout=timeout, transport_options=options) as connection:
            channel = connection.default_channel
            depths: dict[str, int] = {}
            for queue in queues:
                try:
                    depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
                except connection.channel_errors:  # no such queue (yet): nothing waits there
                    depths[queue] = 0
                    if getattr(channel, "is_open", True) is False:  # AMQP closes a channel on an error
                        channel = connection.channel()
            return depths
    except Exception as exc:  # noqa: BLE001 - any broker failure: say so in broker_up, never fail the scrape
        log.warning("metrics.broker_unavailable %s: %s", type(exc).__name__, exc)
        return None


# -- the collector -----------------------------------------------------------------------------
class CatalogCollector(Collector):
    """Every blockvault metric, from the catalog at ``url`` (default: the settings') and the
    broker; ``depths`` (default :func:`queue_depths`) is replaceable for tests."""

    def __init__(
        self,
        url: str | None = None,
        depths: Callable[[Sequence[str]], dict[str, int] | None] = queue_depths,
        clock: Callable[[], datetime] = now,
    ) -> None:
        self.url, self.depths, self.clock = url, depths, clock

    def _catalog(self) -> tuple[list[Metric], list[str]]:
        with db.session(self.url) as session:
            families: list[Metric] = []
            families += backup_metrics(session)
            families += last_backup_metrics(session, self.clock())
            families += job_metrics(session)
            families += event_metrics(session)
            families += storage_metrics(session, self.clock())
            families += verify_metrics(session)
            hosts, uuids = host_metrics(session)
            session.rollback()  # read only
            return families + hosts, uuids

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        families: list[Metric] = []
        hosts: list[str] = []
        try:
            families, hosts = self._catalog()
            catalog_up = 1
        except (BlockvaultError, SQLAlchemyError) as exc:
            log.warning("metrics.catalog_unavailable %s: %s", type(exc).__name__, exc)
            catalog_up = 0
        yield from families
        up = _gauge("catalog_up")
        up.add_metric([], catalog_up)
        yield up

        depths = self.depths([STORAGE_QUEUE, *(host_queue(uuid) for uuid in hosts)])
        broker = _gauge("broker_up")
        broker.add_metric([], 0 if depths is None else 1)
        yield broker
        if depths is not None:
            queue = _gauge("queue_depth", ["queue"])
            for name, depth in depths.items():
                queue.add_metric([name], depth)
            yield queue

        took = _gauge("scrape_duration_seconds")
        took.add_metric([], time.perf_counter() - started)
        yield took


def registry(collector: Collector | None = None) -> CollectorRegistry:
    """A registry holding only the catalog collector (no process metrics: the API may run as
    several processes; these numbers are the same whichever one answers)."""
    found = CollectorRegistry(auto_describe=False)
    found.register(collector or CatalogCollector())
    return found
