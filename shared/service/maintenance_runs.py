"""Scheduled maintenance of backup storages: the runs of ``verify``, ``reclaim`` and
``storageSync`` job groups, whose targets are backup storages (fired, routed to the storage
queue and recorded in the job history like backup groups, :mod:`~shared.service.scheduled_runs`).

- **verify** walks every chunk the storage's backups use in digest order, a batch at a time,
  re-reading and checking each (:func:`~shared.repository.maintenance.check_chunks`); a
  :class:`~shared.catalog.models.VerifyCursor` keeps the last digest checked, committed after
  each batch, so each run (``chunksPerRun`` of them, or the rest of the cycle) goes on where
  the last stopped, a run killed mid-way included, and every chunk is checked once a cycle. A
  bad or missing chunk marks the copies on that storage of the backups using it ``Corrupted``;
  where another storage holds a good copy of the chunk it is rewritten from there and read
  back (:func:`~shared.repository.sync.repair_chunks`), and those copies are ``Ready`` again.
- **reclaim** applies ``retention`` to the backups the storage holds (restic's rules, per
  volume, VM or database; the newest always stays; protected backups are never touched,
  :func:`shared.service.protection.why_kept`: protected, or under object lock on that
  storage), then garbage-collects the storage.
- **storageSync** copies to the target storage every Ready volume and database backup its source
  (``srcBackupStorageUuid``, default the current master) holds and it lacks.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.catalog.models import (
    ApiJob,
    BackupStorage,
    DatabaseBackup,
    DatabaseBackupStorageRef,
    SchedulerJobGroup,
    VerifyCursor,
    VolumeBackup,
    VolumeBackupStorageRef,
    aware,
    now,
)
from shared.errors import BlockvaultError, Conflict, InvalidArgument, NotFound
from shared.failpoints import failpoint
from shared.notifications.events import notify_event
from shared.repository.locks import repository_lock
from shared.repository.maintenance import Policy, check_chunks, chunk_users, select_keep
from shared.repository.repo import Repository
from shared.repository.sync import repair_chunks
from shared.service.copies import copy_backups, lacking
from shared.service.deletion import delete_backup_copies, reclaim_storage
from shared.service.protection import why_kept
from shared.service.rows import AnyBackup, AnyRef, get, manifest_id
from shared.storage import current_master, open_repository

log = logging.getLogger(__name__)
VERIFY_BATCH = 256  # chunks checked between two cursor commits: what a killed run reads again at most
SYNC_BATCH = 200  # backups per copy


def retention_policy(retention: dict[str, int]) -> Policy:
    """jobData retention as the engine's policy; the newest backup always stays."""
    return Policy(
        keep_last=max(1, retention.get("keepLast", 0)),
        keep_daily=retention.get("keepDaily", 0),
        keep_weekly=retention.get("keepWeekly", 0),
        keep_monthly=retention.get("keepMonthly", 0),
    )


def run_maintenance(session: Session, job: ApiJob, group: SchedulerJobGroup) -> dict[str, Any]:
    """The worker side of one scheduled maintenance run (its target is a backup storage)."""
    params = job.params or {}
    data = params.get("jobData") or {}
    storage: BackupStorage = get(session, BackupStorage, params["targetResourceUuid"], "backup storage")
    if storage.state != "Enabled":
        raise Conflict(detail=f"backup storage {storage.uuid} is {storage.state}")
    if group.jobType == "verify":
        return verify_storage(session, storage, params.get("schedulerJobUuid") or group.uuid, data)
    if group.jobType == "reclaim":
        return reclaim(session, storage, data.get("retention"))
    return sync_storage(session, storage, data)


# -- verify ----------------------------------------------------------------------------------------
def _cursor(session: Session, job_uuid: str, storage: BackupStorage) -> VerifyCursor:
    cursor = session.get(VerifyCursor, job_uuid)
    if cursor is None:
        cursor = VerifyCursor(schedulerJobUuid=job_uuid, backupStorageUuid=storage.uuid)
        session.add(cursor)
        session.flush()
    if cursor.backupStorageUuid != storage.uuid:  # the job was pointed elsewhere: a new cycle there
        cursor.backupStorageUuid, cursor.position, cursor.chunksChecked = storage.uuid, "", 0
    return cursor


def _copies(session: Session, storage: BackupStorage) -> dict[str, list[AnyRef]]:
    """The storage's copies (refs) of every backup, by manifest id."""
    found: dict[str, list[AnyRef]] = defaultdict(list)
    refs: list[AnyRef] = [
        *session.scalars(
            select(VolumeBackupStorageRef).where(
                VolumeBackupStorageRef.backupStorageUuid == storage.uuid,
                VolumeBackupStorageRef.installPath.is_not(None),
            )
        ),
        *session.scalars(
            select(DatabaseBackupStorageRef).where(
                DatabaseBackupStorageRef.backupStorageUuid == storage.uuid,
                DatabaseBackupStorageRef.installPath.is_not(None),
            )
        ),
    ]
    for ref in refs:
        found[manifest_id(ref)].append(ref)
    return found


def verify_storage(session: Session, storage: BackupStorage, job_uuid: str, data: dict[str, Any]) -> dict[str, Any]:
    """One run of a verify job over ``storage``: the next ``chunksPerRun`` chunks after the
    cursor (all the cycle's remaining ones by default), checked, damage marked and repaired."""
    read_data, repair = bool(data.get("readData", True)), bool(data.get("repair", True))
    cursor = _cursor(session, job_uuid, storage)
    repo = open_repository(storage)
    started = now()
    result: dict[str, Any] = {"backupStorageUuid": storage.uuid, "cycle": cursor.cycle, "from": cursor.position}
    totals = {"chunksChecked": 0, "bytesRead": 0, "damaged": 0, "repaired": 0}
    corrupted: set[str] = set()
    with repository_lock(repo.backend, "shared", "scheduled verify"):
        users, lengths, manifests = chunk_users(repo)
        copies = _copies(session, storage)
        for problem in manifests.problems:  # an unreadable manifest: its copy here is Corrupted
            _mark(copies.get(problem.backup, ()), "Corrupted", corrupted)
        order = sorted(users)
        start = bisect.bisect_right(order, cursor.position) if cursor.position else 0
        if start == 0:
            cursor.cycleStarted, cursor.chunksChecked = started, 0
        todo = order[start : start + data["chunksPerRun"]] if data.get("chunksPerRun") else order[start:]
        for first in range(0, len(todo), VERIFY_BATCH):
            batch = todo[first : first + VERIFY_BATCH]
            bad: dict[str, str] = {}
            for digest, size, error in check_chunks(repo, batch, lengths, read_data=read_data):
                totals["bytesRead"] += size
                if error:
                    bad[digest] = error
            if bad:
                fixed = _damage(session, storage, repo, bad, users, copies, corrupted, repair)
                totals["damaged"] += len(bad)
                totals["repaired"] += len(fixed)
                cursor.damagedChunks += len(bad)
                cursor.repairedChunks += len(fixed)
            totals["chunksChecked"] += len(batch)
            cursor.position = batch[-1]
            cursor.chunksChecked += len(batch)
            session.commit()
            failpoint("verify.batch_checked")
        done = start + len(todo) >= len(order)
        result.update(totals, to=cursor.position, chunks=len(order), cycleDone=done)
        if done:
            cursor.cycle += 1
            cursor.position, cursor.chunksChecked = "", 0
        session.commit()
    result["corrupted"] = sorted(corrupted)
    result["seconds"] = round((now() - started).total_seconds(), 3)
    log.info(
        "verify.run storage=%s cycle=%d checked=%d damaged=%d repaired=%d cycle_done=%s",
        storage.uuid,
        result["cycle"],
        totals["chunksChecked"],
        totals["damaged"],
        totals["repaired"],
        done,
    )
    return result


def _mark(refs: Iterable[AnyRef], status: str, seen: set[str]) -> None:
    for ref in refs:
        ref.status = status
        seen.add(ref.volumeBackupUuid if isinstance(ref, VolumeBackupStorageRef) else ref.databaseBackupUuid)


def _damage(
    session: Session,
    storage: BackupStorage,
    repo: Repository,
    bad: dict[str, str],
    users: dict[str, list[str]],
    copies: dict[str, list[AnyRef]],
    corrupted: set[str],
    repair: bool,
) -> list[str]:
    """Bad chunks found: the copies here of the backups using them are Corrupted (committed
    before anything else), then each chunk another storage holds good is rewritten from there;
    copies whose every bad chunk was repaired are Ready again. The chunks repaired."""
    manifests = {mid for digest in bad for mid in users[digest]}
    hit = [ref for mid in manifests for ref in copies.get(mid, ())]
    _mark(hit, "Corrupted", corrupted)
    notify_event(  # one event per set of damaged chunks: the same damage found again is not news
        session,
        "verifyDamage",
        key=f"{storage.uuid}/" + hashlib.sha256("\n".join(sorted(bad)).encode()).hexdigest()[:32],
        summary=f"verify found {len(bad)} damaged chunk(s) used by {len(hit)} backup copies on storage {storage.name}",
        resource_uuid=storage.uuid,
        details={"chunks": sorted(bad)[:20]},
    )
    session.commit()
    log.warning(
        "verify.damage_found storage=%s chunks=%d backups=%d first=%s: %s",
        storage.uuid,
        len(bad),
        len(hit),
        min(bad)[:12],
        bad[min(bad)],
    )
    fixed: list[str] = []
    for source in _repair_sources(session, storage, hit) if repair else []:
        left = sorted(set(bad) - set(fixed))
        if not left:
            break
        try:
            with open_repository(source) as other:
                fixed += repair_chunks(other, repo, left)
        except BlockvaultError as exc:
            log.warning("verify.repair_source_failed storage=%s source=%s: %s", storage.uuid, source.uuid, exc)
    still_bad = set(bad) - set(fixed)
    whole = [mid for mid in manifests if not any(digest in still_bad for digest in _bad_of(mid, bad, users))]
    healed: set[str] = set()
    _mark((ref for mid in whole for ref in copies.get(mid, ())), "Ready", healed)
    corrupted -= healed
    if fixed:
        log.info("verify.repaired storage=%s chunks=%d backups=%d", storage.uuid, len(fixed), len(healed))
    return fixed


def _bad_of(mid: str, bad: dict[str, str], users: dict[str, list[str]]) -> list[str]:
    return [digest for digest in bad if mid in users[digest]]


def _repair_sources(session: Session, storage: BackupStorage, refs: Sequence[AnyRef]) -> list[BackupStorage]:
    """The other enabled storages holding a Ready copy of a damaged backup, the ImageStore
    ones (local, the cheapest to read) first."""
    uuids: set[str] = set()
    for ref in refs:
        uuids |= {other.backupStorageUuid for other in ref.backup.backupStorageRefs if other.status == "Ready"}
    uuids.discard(storage.uuid)
    rows = [row for row in (session.get(BackupStorage, uuid) for uuid in uuids) if row and row.state == "Enabled"]
    return sorted(rows, key=lambda row: (row.type != "ImageStore", row.uuid))


# -- reclaim ---------------------------------------------------------------------------------------
def _units(session: Session, storage: BackupStorage) -> dict[str, list[AnyBackup]]:
    """The backups with a Ready copy on ``storage``, as units retention keeps or drops whole
    (a VM backup's volumes together)."""
    units: dict[str, list[AnyBackup]] = defaultdict(list)
    kinds: tuple[tuple[Any, Any, Any], ...] = (
        (VolumeBackup, VolumeBackupStorageRef, VolumeBackupStorageRef.volumeBackupUuid),
        (DatabaseBackup, DatabaseBackupStorageRef, DatabaseBackupStorageRef.databaseBackupUuid),
    )
    for model, ref, link in kinds:
        query = select(model).join(ref, link == model.uuid)
        for row in session.scalars(
            query.where(ref.backupStorageUuid == storage.uuid, ref.status == "Ready", model.status == "Ready")
        ):
            units[getattr(row, "groupUuid", None) or row.uuid].append(row)
    return units


def _series(members: list[AnyBackup]) -> str:
    """What a unit is a backup of: its volumes, or its database (None: the catalog)."""
    first = members[0]
    if isinstance(first, DatabaseBackup):
        return f"database/{first.databaseUuid or 'catalog'}"
    return "volumes/" + ",".join(sorted({row.volumeUuid for row in members if isinstance(row, VolumeBackup)}))


def reclaim(session: Session, storage: BackupStorage, retention: dict[str, int] | None) -> dict[str, Any]:
    """Prune ``storage`` by ``retention`` (its copies only: other storages keep theirs), then
    garbage-collect it."""
    removed: list[str] = []
    protected: list[str] = []
    kept = 0
    if retention:
        policy = retention_policy(retention)
        series: dict[str, list[tuple[str, datetime]]] = defaultdict(list)
        units = _units(session, storage)
        for key, members in units.items():
            if why_kept(session, members, [storage.uuid]):  # protected, or under object lock there
                protected.append(key)
                continue
            series[_series(members)].append((key, max(aware(row.createDate) for row in members)))
        for entries in series.values():
            keep = select_keep(entries, policy)
            kept += len(keep)
            for key, _created in entries:
                if key in keep:
                    continue
                for row in units[key]:
                    delete_backup_copies(session, row.uuid, [storage.uuid], type(row), reclaim=False)
                    removed.append(row.uuid)
        session.commit()
        log.info("reclaim.pruned storage=%s kept=%d removed=%d", storage.uuid, kept, len(removed))
    gc = reclaim_storage(session, storage)
    return {
        "backupStorageUuid": storage.uuid,
        "retention": {"kept": kept, "removed": removed, "protected": protected} if retention else {},
        "gc": {k: v for k, v in gc.items() if k != "backupStorageUuid"},
    }


# -- storageSync -----------------------------------------------------------------------------------
def sync_source(session: Session, target: BackupStorage, data: dict[str, Any]) -> BackupStorage:
    """Where a storageSync run copies from: jobData's ``srcBackupStorageUuid``, else the master."""
    uuid = data.get("srcBackupStorageUuid")
    source = get(session, BackupStorage, uuid, "backup storage") if uuid else current_master(session)
    if source is None:
        raise NotFound(resource="backup storage", uuid="(master)")
    if source.uuid == target.uuid:
        raise InvalidArgument(detail=f"storageSync: backup storage {target.uuid} is its own source")
    return source


def sync_storage(session: Session, target: BackupStorage, data: dict[str, Any]) -> dict[str, Any]:
    """Copy to ``target`` every Ready backup (volume and database backups) the source holds
    and ``target`` lacks."""
    source = sync_source(session, target, data)
    copied = {"chunksCopied": 0, "bytesCopied": 0}
    synced: dict[str, list[str]] = {}
    for key, model in (("volumeBackupUuids", VolumeBackup), ("databaseBackupUuids", DatabaseBackup)):
        uuids = synced[key] = lacking(session, source, target, model=model)
        for first in range(0, len(uuids), SYNC_BATCH):
            rows = [get(session, model, uuid, "backup") for uuid in uuids[first : first + SYNC_BATCH]]
            report = copy_backups(session, rows, source, target, bandwidth_limit=data.get("bandwidthLimit"))
            copied["chunksCopied"] += report["chunksCopied"]
            copied["bytesCopied"] += report["bytesCopied"]
    log.info(
        "storage_sync.done from=%s to=%s backups=%d databaseBackups=%d",
        source.uuid,
        target.uuid,
        len(synced["volumeBackupUuids"]),
        len(synced["databaseBackupUuids"]),
    )
    return {"srcBackupStorageUuid": source.uuid, "dstBackupStorageUuid": target.uuid, **synced, **copied}
