"""shared.service.maintenance_runs: verify, reclaim and storageSync job groups, fired and run as
their worker runs them, with their history rows; the bad inputs of such groups."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client.core import Metric
from sqlalchemy import select

from shared.catalog.models import (
    ApiJob,
    BackupStorage,
    DatabaseBackup,
    NotificationEvent,
    SchedulerJobGroup,
    SchedulerJobHistory,
    VerifyCursor,
    VolumeBackup,
)
from shared.errors import InvalidArgument, NotFound
from shared.metrics import verify_metrics
from shared.repository.backends.file import FileBackend
from shared.repository.repo import chunk_key
from shared.service import jobgroups
from shared.service.database_backups import request_database_backup, run_database_backup
from shared.service.protection import change_protection
from shared.service.rows import manifest_id
from shared.service.scheduled_runs import MANUAL, fire, run_scheduled
from tests.shared.service.conftest import Site, content, overwrite

T0 = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


@contextmanager
def chunk_reads_counted() -> Iterator[Counter[str]]:
    """Every chunk read from a file storage meanwhile, by its key: a counting wrapper around the
    real backend's ``get`` (the verify bench counts with it too)."""
    reads: Counter[str] = Counter()
    real = FileBackend.get

    def counting(self: FileBackend, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if key.startswith("chunks/"):
            reads[key] += 1
        return real(self, key, offset, length)

    FileBackend.get = counting  # type: ignore[method-assign]
    try:
        yield reads
    finally:
        FileBackend.get = real  # type: ignore[method-assign]


@pytest.fixture
def chunk_reads() -> Iterator[Counter[str]]:
    with chunk_reads_counted() as reads:
        yield reads


def _group(site: Site, kind: str, targets: list[str], **data: Any) -> SchedulerJobGroup:
    group = jobgroups.create_group(site.session, {"name": kind, "type": kind, "parameters": data})
    if targets:
        jobgroups.add_targets(site.session, group, targets)
    site.session.commit()
    return group


def _fire_and_run(site: Site, group: SchedulerJobGroup, at: datetime) -> dict[str, Any]:
    """Fire ``group`` (one target) at ``at`` and run its job to its end, history row included."""
    fire(site.session, group, MANUAL, at)
    job = site.session.scalars(
        select(ApiJob).where(ApiJob.action == "schedulerJob", ApiJob.state == "Pending").order_by(ApiJob.createDate)
    ).one()
    result = site.run(run_scheduled, job)
    site.finish(job, result)
    return result


def _referenced(site: Site, storage: BackupStorage) -> set[str]:
    with site.repository(storage) as repo:
        return {digest for mid in repo.manifest_ids() for digest in repo.load_manifest(mid).referenced()}


def _flip(site: Site, storage: BackupStorage, digest: str) -> None:
    """One byte of a chunk file on ``storage`` flipped, as a failing disk does."""
    path = site.tmp / storage.name / chunk_key(digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _samples(metrics: list[Metric]) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels["storage"]): s.value for m in metrics for s in m.samples if s.name.endswith("_total")}


def test_verify_runs_check_every_chunk_once_a_cycle_from_the_cursor(site: Site, chunk_reads: Counter[str]) -> None:
    storage = site.storage()
    for seed in (1, 2):
        volume = site.volume(f"v{seed}.raw", seed=seed)
        site.backup(volume)
        overwrite(volume, 3)
        site.backup(volume)  # incremental: shares all but one chunk with its parent
    chunks = _referenced(site, storage)
    per_run = 7
    runs_a_cycle = -(-len(chunks) // per_run)
    assert runs_a_cycle >= 3
    group = _group(site, "verify", [storage.uuid], chunksPerRun=per_run)
    results = []
    for cycle in range(2):
        chunk_reads.clear()
        for index in range(runs_a_cycle):
            results.append(_fire_and_run(site, group, T0 + (cycle * runs_a_cycle + index) * HOUR))
        assert set(chunk_reads) == {chunk_key(d) for d in chunks}, f"cycle {cycle}: every chunk read"
        assert set(chunk_reads.values()) == {1}, f"cycle {cycle}: no chunk read twice"
    first_cycle = results[:runs_a_cycle]
    assert [r["cycle"] for r in results] == [0] * runs_a_cycle + [1] * runs_a_cycle
    assert [r["cycleDone"] for r in first_cycle] == [False] * (runs_a_cycle - 1) + [True]
    assert [r["from"] for r in first_cycle[1:]] == [r["to"] for r in first_cycle[:-1]]  # each goes on from the last
    assert sum(r["chunksChecked"] for r in first_cycle) == len(chunks)
    assert all(r["damaged"] == 0 and r["corrupted"] == [] for r in results)
    cursor = site.session.scalars(select(VerifyCursor)).one()
    assert (cursor.cycle, cursor.position, cursor.damagedChunks) == (2, "", 0)
    history = site.session.scalars(select(SchedulerJobHistory)).all()
    assert len(history) == 2 * runs_a_cycle and all(h.success for h in history)
    assert {h.targetResourceUuid for h in history} == {storage.uuid}
    assert json.loads(history[0].requestDump or "")["jobType"] == "verify"


def test_a_flipped_byte_marks_the_backups_corrupted_and_the_standby_repairs_it(site: Site) -> None:
    master = site.storage()
    standby = site.storage("standby", role="standby")
    volume = site.volume()
    parent, child = site.parent_and_child(volume)  # replicated to the standby as they are taken
    assert site.ref(child, standby).status == "Ready"
    with site.repository(master) as repo:
        shared = sorted(
            set(repo.load_manifest(manifest_id(site.ref(parent, master))).referenced())
            & set(repo.load_manifest(manifest_id(site.ref(child, master))).referenced())
        )
    damaged = shared[0]  # a chunk both backups use
    _flip(site, master, damaged)
    group = _group(site, "verify", [master.uuid])
    standby.state = "Disabled"  # no good copy to repair from yet
    site.session.commit()

    found = _fire_and_run(site, group, T0)

    assert (found["damaged"], found["repaired"], found["corrupted"]) == (1, 0, sorted([parent.uuid, child.uuid]))
    site.session.refresh(parent)
    site.session.refresh(child)
    assert [site.ref(b, master).status for b in (parent, child)] == ["Corrupted", "Corrupted"]
    assert [site.ref(b, standby).status for b in (parent, child)] == ["Ready", "Ready"]
    (history,) = site.session.scalars(select(SchedulerJobHistory)).all()
    assert history.success and json.loads(history.resultDump or "")["damaged"] == 1
    (event,) = site.session.scalars(select(NotificationEvent)).all()  # what a verifyDamage rule sends
    assert (event.kind, event.resourceUuid, event.details) == ("verifyDamage", master.uuid, {"chunks": [damaged]})

    standby.state = "Enabled"
    site.session.commit()
    repaired = _fire_and_run(site, group, T0 + HOUR)  # the next cycle finds it again, and repairs it

    assert (repaired["damaged"], repaired["repaired"], repaired["corrupted"]) == (1, 1, [])
    assert len(site.session.scalars(select(NotificationEvent)).all()) == 1  # the same damage is not news twice
    site.session.refresh(parent)
    site.session.refresh(child)
    assert [site.ref(b, master).status for b in (parent, child)] == ["Ready", "Ready"]
    assert site.restored(master, child) == content(volume)
    clean = _fire_and_run(site, group, T0 + 2 * HOUR)
    assert (clean["damaged"], clean["corrupted"]) == (0, [])
    assert _samples(list(verify_metrics(site.session))) == {
        ("blockvault_verify_damaged_chunks_total", master.uuid): 2.0,
        ("blockvault_verify_repaired_chunks_total", master.uuid): 1.0,
        ("blockvault_verify_cycles_total", master.uuid): 3.0,
    }


def test_a_chunk_missing_everywhere_stays_corrupted(site: Site) -> None:
    master = site.storage()
    site.storage("standby", role="standby")
    backup = site.backup(site.volume())
    with site.repository(master) as repo:
        digest = sorted(repo.load_manifest(manifest_id(site.ref(backup, master))).referenced())[0]
    for name in ("master", "standby"):
        (site.tmp / name / chunk_key(digest)).unlink()
    group = _group(site, "verify", [master.uuid], readData=False)

    result = _fire_and_run(site, group, T0)

    assert (result["damaged"], result["repaired"], result["corrupted"], result["bytesRead"]) == (1, 0, [backup.uuid], 0)
    site.session.refresh(backup)
    assert site.ref(backup, master).status == "Corrupted"


def test_reclaim_prunes_what_retention_says_on_that_storage_only_then_collects(site: Site) -> None:
    master = site.storage()
    standby = site.storage("standby", role="standby")
    kept_volume, other = site.volume("a.raw", seed=1), site.volume("b.raw", seed=2)
    a = [site.backup(kept_volume)]
    for index in (1, 2):
        overwrite(kept_volume, index)
        a.append(site.backup(kept_volume, mode="full"))
    b = site.backup(other)
    with site.repository(master) as repo:
        only_oldest = repo.load_manifest(manifest_id(site.ref(a[0], master))).referenced() - set().union(
            *(repo.load_manifest(manifest_id(site.ref(r, master))).referenced() for r in (*a[1:], b))
        )
    assert only_oldest  # the chunk the newer backups rewrote
    group = _group(site, "reclaim", [master.uuid], retention={"keepLast": 2})

    result = _fire_and_run(site, group, T0)

    assert result["retention"] == {"kept": 3, "removed": [a[0].uuid], "protected": []}
    assert result["gc"]["chunksDeleted"] == len(only_oldest)
    oldest = site.session.get_one(VolumeBackup, a[0].uuid)
    site.session.refresh(oldest)
    assert [r.backupStorageUuid for r in oldest.backupStorageRefs] == [standby.uuid]  # the standby keeps its copy
    with site.repository(master) as repo:
        assert sorted(repo.manifest_ids()) == sorted(manifest_id(site.ref(r, master)) for r in (*a[1:], b))
        assert not (repo.missing_chunks(_referenced(site, master)))
    assert site.restored(master, a[2]) == content(kept_volume)
    assert site.restored(standby, oldest) != content(kept_volume)  # an older state, still whole
    again = _fire_and_run(site, group, T0 + HOUR)
    assert (again["retention"]["removed"], again["gc"]["chunksDeleted"]) == ([], 0)


def test_reclaim_never_prunes_a_protected_backup(site: Site) -> None:
    master = site.storage()
    volume = site.volume("a.raw", seed=1)
    backups = [site.backup(volume)]
    for index in (1, 2):
        overwrite(volume, index)
        backups.append(site.backup(volume, mode="full"))
    oldest = site.session.get_one(VolumeBackup, backups[0].uuid)
    change_protection(site.session, [oldest], True, admin=False)  # the catalog's flag and the repository's marker
    group = _group(site, "reclaim", [master.uuid], retention={"keepLast": 1})
    uuids = [row.uuid for row in backups]
    survivors = sorted(manifest_id(site.ref(row, master)) for row in (oldest, backups[2]))

    result = _fire_and_run(site, group, T0)

    assert result["retention"] == {"kept": 1, "removed": [uuids[1]], "protected": [uuids[0]]}
    with site.repository(master) as repo:
        assert sorted(repo.manifest_ids()) == survivors
    assert site.restored(master, backups[2]) == content(volume)


def test_storage_sync_brings_a_standby_up_to_date(site: Site) -> None:
    master = site.storage()
    standby = site.storage("standby", role="standby")
    standby.state = "Disabled"  # down while the backups are taken: nothing replicated
    site.session.commit()
    volume = site.volume()
    parent, child = site.parent_and_child(volume)
    catalog = request_database_backup(site.session, {}, None)  # the catalog's dump: a site's recovery needs it
    site.run(run_database_backup, catalog)
    dump = site.session.get_one(DatabaseBackup, catalog.resourceUuid)
    standby.state = "Enabled"
    site.session.commit()
    group = _group(site, "storageSync", [standby.uuid])

    result = _fire_and_run(site, group, T0)

    assert (result["srcBackupStorageUuid"], result["volumeBackupUuids"]) == (master.uuid, [parent.uuid, child.uuid])
    assert result["databaseBackupUuids"] == [dump.uuid]
    site.session.refresh(dump)
    assert site.ref(dump, standby).status == "Ready"
    with site.repository(master) as src, site.repository(standby) as dst:
        assert dst.load_manifest(manifest_id(site.ref(dump, standby))).chunks == (
            src.load_manifest(manifest_id(site.ref(dump, master))).chunks
        )
    assert result["chunksCopied"] == len(_referenced(site, master))
    for backup in (parent, child):
        site.session.refresh(backup)
        assert site.ref(backup, standby).status == "Ready"
    assert site.restored(standby, child) == content(volume)
    again = _fire_and_run(site, group, T0 + HOUR)
    assert (again["volumeBackupUuids"], again["databaseBackupUuids"], again["chunksCopied"]) == ([], [], 0)


def test_maintenance_groups_refuse_bad_inputs(site: Site) -> None:
    storage = site.storage()
    volume = site.volume()

    def create(kind: Any, **data: Any) -> SchedulerJobGroup:
        return jobgroups.create_group(site.session, {"name": "g", "type": kind, "parameters": data})

    assert "type must be one of" in str(site.refused(InvalidArgument, lambda: create("scrub")))
    assert "for a verify group: fullBackupInterval" in str(
        site.refused(InvalidArgument, lambda: create("verify", fullBackupInterval=2))
    )
    assert "readData" in str(site.refused(InvalidArgument, lambda: create("verify", readData="yes")))
    assert "chunksPerRun" in str(site.refused(InvalidArgument, lambda: create("verify", chunksPerRun=0)))
    site.refused(NotFound, lambda: create("storageSync", srcBackupStorageUuid="0" * 32))
    verify = create("verify")
    site.session.commit()
    refused = site.refused(InvalidArgument, lambda: jobgroups.add_targets(site.session, verify, [volume.uuid]))
    assert f"{volume.uuid} is a volume" in str(refused)
    site.refused(NotFound, lambda: jobgroups.add_targets(site.session, verify, ["f" * 32]))
    sync = create("storageSync", srcBackupStorageUuid=storage.uuid)
    site.session.commit()
    refused = site.refused(InvalidArgument, lambda: jobgroups.add_targets(site.session, sync, [storage.uuid]))
    assert "its own source" in str(refused)
    site.refused(InvalidArgument, lambda: jobgroups.update_group(site.session, verify, {"parameters": {"x": 1}}))


def test_a_verify_fire_whose_storage_is_gone_fails_at_once(site: Site) -> None:
    storage = site.storage()
    gone = site.storage("gone", role="standby")
    group = _group(site, "verify", [storage.uuid, gone.uuid])
    site.session.delete(gone)
    site.session.commit()

    assert fire(site.session, group, MANUAL, T0) == 2

    jobs = {j.resourceUuid: j for j in site.session.scalars(select(ApiJob).where(ApiJob.action == "schedulerJob"))}
    assert (jobs[storage.uuid].state, jobs[storage.uuid].params["_queue"]) == ("Pending", "storage")
    assert (jobs[gone.uuid].state, jobs[gone.uuid].error["code"]) == ("Failed", "NOT_FOUND")
    (failed,) = site.session.scalars(select(SchedulerJobHistory)).all()
    assert (failed.success, failed.targetResourceUuid) == (False, gone.uuid)
