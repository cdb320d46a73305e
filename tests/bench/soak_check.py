"""The soak's byte-for-byte end check and its database backups (tests/bench/soak.py uses them).

Volumes written with self-describing blocks: every 4 KiB block the writer puts down carries a
magic, its volume's number, its own block index, a generation (one per write, increasing per
volume) and a BLAKE2b digest of the rest, so a restored image can be judged on its own. The
writer logs each write's generation with the soak clock (``time.monotonic``) before it began and
after it ended (``done``) or its outcome unknown (``maybe``: a qemu-io that timed out or failed
after opening the image).

A watcher polls the catalog every second and gives each backup row a window in the soak's own
clock, independent of the workers' (possibly skewed) clocks: ``lo``, the start of the last poll
that did not see the row yet (the worker commits the row before it reads a byte of the volume),
and ``hi``, the end of the first poll that saw it Ready.

What is strictly true of a crash-consistent copy read anywhere inside [lo, hi], block by block:
each block is all zeros or a valid block of that volume and index whose generation was really
written there (done or maybe) and began before ``hi``; and it is not older than the newest write
to that block that ended before ``lo`` (an incremental backup restores to the whole image, so
this holds for every mode). All Ready copies of one backup restore to identical bytes.

The catalog's database backups: a ``databaseBackup`` job group on a short trigger; at the end
every database backup is Ready or Failed (a PostgreSQL restart mid-dump fails it or it
succeeds), the newest Ready one is loaded from each of its Ready copies with
``recoverDatabaseBackup`` into a scratch database and checked: the same tables and alembic
version as the catalog, job history and backups not empty, no backup row from after the dump,
and every backup row the watcher saw before the dump began that is still in the catalog present.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.engine import make_url

from api.client import ApiError
from shared.catalog.models import DatabaseBackup, VolumeBackup
from shared.repository.repo import Repository
from shared.repository.restore import restore_backup

BLOCK = 4096
MAGIC = b"BVSOAK01"
HEAD = struct.Struct("<8sIIQ")  # magic, volume number, block index, generation
DIGEST = 32
NEWEST_PER_VOLUME = 3  # every Ready backup of a volume's newest ones is restored ...
SAMPLE = 4  # ... and this many older Ready backups drawn at random
ZERO = bytes(BLOCK)


def make_block(volume: int, index: int, generation: int) -> bytes:
    body = HEAD.pack(MAGIC, volume, index, generation) + os.urandom(BLOCK - HEAD.size - DIGEST)
    return body + hashlib.blake2b(body, digest_size=DIGEST).digest()


def read_block(block: bytes) -> tuple[int, int, int] | None:
    """(volume, index, generation) of a valid block, None for anything else."""
    body, digest = block[:-DIGEST], block[-DIGEST:]
    magic, volume, index, generation = HEAD.unpack_from(body)
    if magic != MAGIC or hashlib.blake2b(body, digest_size=DIGEST).digest() != digest:
        return None
    return volume, index, generation


@dataclass
class Write:
    generation: int
    began: float
    ended: float
    done: bool  # False: its outcome is unknown (it may or may not have reached the image)


@dataclass
class Volume:
    number: int
    uuid: str
    path: Path
    size: int
    generation: int = 0
    writes: dict[int, list[Write]] = field(default_factory=dict)  # block index -> its writes, in order


class BlockWriter:
    """Writes self-describing blocks into raw (in place) and qcow2 (qemu-io) volumes."""

    def __init__(self, scratch: Path, seed: int) -> None:
        self.scratch, self.rng = scratch, random.Random(seed)
        scratch.mkdir(parents=True, exist_ok=True)
        self.volumes: dict[str, Volume] = {}
        self.lock = threading.Lock()

    def add(self, uuid: str, path: Path, size: int) -> None:
        self.volumes[uuid] = Volume(len(self.volumes) + 1, uuid, path, size)

    def write_once(self) -> None:
        volume = self.rng.choice(list(self.volumes.values()))
        blocks = volume.size // BLOCK
        count = self.rng.randint(1, 16)
        first = self.rng.randrange(0, blocks - count + 1)
        volume.generation += 1
        generation = volume.generation
        data = b"".join(make_block(volume.number, first + i, generation) for i in range(count))
        began = time.monotonic()
        if volume.path.suffix == ".qcow2":
            done = self._qemu_write(volume.path, first * BLOCK, data)
        else:
            fd = os.open(volume.path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, first * BLOCK)
            finally:
                os.close(fd)
            done = True
        if done is None:
            return
        write = Write(generation, began, time.monotonic(), done)
        with self.lock:
            for index in range(first, first + count):
                volume.writes.setdefault(index, []).append(write)

    def _qemu_write(self, path: Path, offset: int, data: bytes) -> bool | None:
        """True: written; None: surely not (the image was locked by a backup); False: unknown."""
        source = self.scratch / "block-source"
        source.write_bytes(data)
        command = ["qemu-io", "-f", "qcow2", "-c", f"write -q -s {source} {offset} {len(data)}", str(path)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
        except subprocess.TimeoutExpired:
            return False
        if result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip():
            return True
        if "lock" in result.stderr and "write" not in result.stdout:  # refused at open
            return None
        return False

    def timeline(self, uuid: str) -> dict[int, list[Write]]:
        with self.lock:
            return {index: list(writes) for index, writes in self.volumes[uuid].writes.items()}


class CatalogWatch:
    """Each backup row's window [lo, hi] in the soak's clock, from polls of the catalog."""

    def __init__(self, database_url: str) -> None:
        self.engine = create_engine(database_url, pool_pre_ping=True)
        self.lo: dict[str, float | None] = {}
        self.hi: dict[str, float] = {}
        self.seen: dict[str, float] = {}  # end of the first poll that saw the row
        self.last_poll: float | None = None  # start of the last poll that answered
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(1.0):
            self.poll()

    def poll(self) -> None:
        began = time.monotonic()
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(select(VolumeBackup.uuid, VolumeBackup.status)).all()
                rows += connection.execute(select(DatabaseBackup.uuid, DatabaseBackup.status)).all()
        except Exception:  # noqa: BLE001 - PostgreSQL restarting: the next poll answers
            return
        ended = time.monotonic()
        for uuid, status in rows:
            if uuid not in self.lo:
                self.lo[uuid], self.seen[uuid] = self.last_poll, ended
            if status == "Ready" and uuid not in self.hi:
                self.hi[uuid] = ended
        self.last_poll = began

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)
        self.poll()
        self.engine.dispose()


@dataclass
class Checked:
    backups: int = 0
    restores: int = 0
    bytes_restored: int = 0
    bytes_compared: int = 0
    blocks_written: int = 0
    database_backups_ready: int = 0
    database_backups_failed: int = 0
    database_restores: int = 0

    def summary(self) -> dict[str, int]:
        return {
            "backupsRestored": self.backups,
            "restores": self.restores,
            "bytesRestored": self.bytes_restored,
            "bytesCompared": self.bytes_compared,
            "blocksWritten": self.blocks_written,
            "databaseBackupsReady": self.database_backups_ready,
            "databaseBackupsFailed": self.database_backups_failed,
            "databaseRestores": self.database_restores,
        }


def judge_image(
    image: Path, volume: Volume, timeline: dict[int, list[Write]], lo: float | None, hi: float | None
) -> list[str]:
    """What is wrong with ``image``, a restore of a backup of ``volume`` read inside [lo, hi]."""
    problems: list[str] = []
    if image.stat().st_size != volume.size:
        return [f"restored {image.stat().st_size} bytes, the volume has {volume.size}"]
    with open(image, "rb") as handle:
        for index in range(volume.size // BLOCK):
            block = handle.read(BLOCK)
            writes = timeline.get(index, [])
            if block == ZERO:
                generation = 0
            else:
                found = read_block(block)
                if found is None or found[:2] != (volume.number, index):
                    problems.append(f"block {index} is not a block of this volume and index ({found})")
                    continue
                generation = found[2]
                write = next((w for w in writes if w.generation == generation), None)
                if write is None:
                    problems.append(f"block {index} has generation {generation}, never written there")
                    continue
                if hi is not None and write.began >= hi:
                    problems.append(
                        f"block {index} has generation {generation}, "
                        f"written {write.began - hi:.1f} s after the backup was Ready"
                    )
            if lo is not None:
                before = [w.generation for w in writes if w.done and w.ended < lo]
                if before and generation < before[-1]:
                    problems.append(
                        f"block {index} has generation {generation}, older than generation {before[-1]} "
                        "written before the backup began"
                    )
            if len(problems) >= 5:
                problems.append("...")
                break
    return problems


def same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as first, open(b, "rb") as second:
        while True:
            x, y = first.read(1 << 20), second.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


class EndCheck:
    """The restores at the end. ``repositories`` opens the repository of a storage uuid."""

    def __init__(
        self,
        client: Any,
        writer: BlockWriter,
        watch: CatalogWatch,
        scratch: Path,
        repository: Callable[[str], Repository],
        storage_names: dict[str, str],
        violation: Callable[[str], None],
        rng: random.Random,
    ) -> None:
        self.client, self.writer, self.watch, self.scratch = client, writer, watch, scratch
        self.repository, self.names, self.violation, self.rng = repository, storage_names, violation, rng
        self.checked = Checked()

    def chosen(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """All Ready backups of the newest NEWEST_PER_VOLUME per written volume, and SAMPLE more."""
        ours = [r for r in rows if r["volumeUuid"] in self.writer.volumes]
        ours.sort(key=lambda r: str(r["createDate"]))
        newest: list[dict[str, Any]] = []
        for uuid in self.writer.volumes:
            newest += [r for r in ours if r["volumeUuid"] == uuid][-NEWEST_PER_VOLUME:]
        rest = [r for r in ours if r not in newest]
        return newest + self.rng.sample(rest, min(SAMPLE, len(rest)))

    def restore_volumes(self) -> None:
        rows = self.client.query("volume-backups", "status=Ready", limit=10000)["inventories"]
        for volume in self.writer.volumes.values():
            self.checked.blocks_written += sum(len(w) for w in self.writer.timeline(volume.uuid).values())
        for row in self.chosen(rows):
            self.checked.backups += 1
            self.restore_one(row)

    def restore_one(self, row: dict[str, Any]) -> None:
        volume = self.writer.volumes[row["volumeUuid"]]
        timeline = self.writer.timeline(volume.uuid)
        lo, hi = self.watch.lo.get(row["uuid"]), self.watch.hi.get(row["uuid"])
        folder = Path(tempfile.mkdtemp(prefix="restore-", dir=self.scratch))
        try:
            first: Path | None = None
            for ref in row["backupStorageRefs"]:
                if ref["status"] != "Ready":
                    continue
                where = self.names.get(ref["backupStorageUuid"], ref["backupStorageUuid"])
                manifest = str(ref["installPath"]).rsplit("/", 1)[-1]
                target = folder / f"{where}.raw"
                try:
                    restore_backup(self.repository(ref["backupStorageUuid"]), manifest, str(target), fmt="raw")
                except Exception as exc:  # noqa: BLE001 - any failure is the finding
                    self.violation(f"backup {row['uuid']} ({row['mode']}) does not restore from {where}: {exc}")
                    continue
                self.checked.restores += 1
                self.checked.bytes_restored += target.stat().st_size
                if first is None:
                    first = target
                    for problem in judge_image(target, volume, timeline, lo, hi):
                        self.violation(f"backup {row['uuid']} ({row['mode']}) from {where}: {problem}")
                else:
                    self.checked.bytes_compared += target.stat().st_size
                    if not same_bytes(first, target):
                        self.violation(f"backup {row['uuid']}: its copy on {where} differs from {first.stem}'s")
                    target.unlink()
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- database backups ---------------------------------------------------------------------
    def restore_database(self, database_url: str, reach: Callable[[str], str] = str) -> None:
        """The newest Ready catalog backup recovered from each Ready copy into a scratch
        database on ``database_url``'s server (given to the job as ``reach`` makes it: the
        workers may run in network namespaces) and judged against the catalog."""
        rows = self.client.query("database-backups", limit=10000)["inventories"]
        catalog = [r for r in rows if not r.get("databaseUuid")]
        for row in catalog:
            if row["status"] == "Ready":
                self.checked.database_backups_ready += 1
            elif row["status"] == "Failed":
                self.checked.database_backups_failed += 1
            else:
                self.violation(f"database backup {row['uuid']} left {row['status']}")
        ready = sorted((r for r in catalog if r["status"] == "Ready"), key=lambda r: str(r["createDate"]))
        if not ready:
            self.violation("no Ready database backup")
            return
        newest = ready[-1]
        live = create_engine(database_url, isolation_level="AUTOCOMMIT")
        try:
            for number, ref in enumerate(r for r in newest["backupStorageRefs"] if r["status"] == "Ready"):
                name = f"{make_url(database_url).database}_soakcheck{number}"
                scratch = make_url(database_url).set(database=name).render_as_string(hide_password=False)
                where = self.names.get(ref["backupStorageUuid"], ref["backupStorageUuid"])
                try:
                    job = self.client.recover_database(
                        newest["uuid"], backupStorageUuid=ref["backupStorageUuid"], databaseUrl=reach(scratch)
                    )
                    self.client.wait(job, timeout=300)
                except ApiError as exc:
                    self.violation(f"database backup {newest['uuid']} does not recover from {where}: {exc}")
                    continue
                self.checked.database_restores += 1
                try:
                    for problem in self.judge_database(live, scratch, newest["uuid"]):
                        self.violation(f"database backup {newest['uuid']} from {where}: {problem}")
                finally:
                    with live.connect() as connection:
                        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            live.dispose()

    def judge_database(self, live: Any, scratch_url: str, backup_uuid: str) -> list[str]:
        problems: list[str] = []
        scratch = create_engine(scratch_url)
        try:
            tables = set(inspect(live).get_table_names())
            restored = set(inspect(scratch).get_table_names())
            if tables != restored:
                missing = sorted(tables - restored)
                problems.append(f"tables differ: missing {missing}, extra {sorted(restored - tables)}")
            with live.connect() as a, scratch.connect() as b:
                version = "SELECT version_num FROM alembic_version"
                if a.execute(text(version)).all() != b.execute(text(version)).all():
                    problems.append("alembic version differs from the catalog's")
                for table in ("api_job", "scheduler_job_history", "volume_backup"):
                    if not b.execute(text(f"SELECT count(*) FROM {table}")).scalar():
                        problems.append(f"{table} is empty")
                dumped = set(b.execute(select(VolumeBackup.uuid)).scalars())
                now = set(a.execute(select(VolumeBackup.uuid)).scalars())
        finally:
            scratch.dispose()
        lo, hi = self.watch.lo.get(backup_uuid), self.watch.hi.get(backup_uuid)
        if hi is not None:
            late = [u for u in dumped if (self.watch.lo.get(u) or 0.0) >= hi]
            if late:
                problems.append(f"{len(late)} backup rows created after the dump was Ready, e.g. {late[0]}")
        if lo is not None:
            lost = [u for u in now if u not in dumped and self.watch.seen.get(u, lo + 1) <= lo]
            if lost:
                problems.append(f"{len(lost)} backup rows seen before the dump began are not in it, e.g. {lost[0]}")
        return problems
