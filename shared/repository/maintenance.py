"""Keeping a repository healthy: verify, prune (retention) and gc (free unreferenced chunks)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from shared.errors import BlockvaultError, IntegrityError, ObjectLocked, UsageError

from .chunkindex import announce_deletion
from .locks import read_locks, repository_lock
from .manifest import BackupEntry
from .pipeline import parallel_map
from .repo import Repository, chunk_key

log = logging.getLogger(__name__)
TMP_GRACE_SECONDS = 60.0


@dataclass
class Problem:
    backup: str
    chunk: str | None
    detail: str

    def describe(self) -> str:
        where = f"backup {self.backup[:12]}" + (f" chunk {self.chunk}" if self.chunk else "")
        return f"{where}: {self.detail}"


@dataclass
class VerifyReport:
    backups: int = 0
    chunks: int = 0
    bytesRead: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    repo: Repository,
    backup_id: str | None = None,
    *,
    read_data: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check manifests and chunk presence; with ``read_data`` re-read and re-hash every chunk.
    Every problem names the backups it affects."""
    report = VerifyReport()
    with repository_lock(repo.backend, "shared", "verify"):
        ids = [repo.resolve(backup_id)] if backup_id else repo.manifest_ids()
        users, lengths, newest = _read_manifests(repo, ids, report)
        report.chunks = len(users)
        if backup_id is None:
            _rewrite_heads(repo, newest)
        bad: dict[str, str] = {}
        for count, (digest, size, error) in enumerate(check_chunks(repo, list(users), lengths, read_data=read_data), 1):
            report.bytesRead += size
            if error:
                bad[digest] = error
            if progress and read_data:
                progress(count, len(users))
        for digest, detail in sorted(bad.items()):
            for mid in users[digest]:
                report.problems.append(Problem(mid, digest, detail))
    return report


def _read_manifests(
    repo: Repository, ids: Sequence[str], report: VerifyReport
) -> tuple[dict[str, list[str]], dict[str, int], dict[tuple[str, bool], tuple[str, str]]]:
    """Load the manifests ``ids`` (a damaged one is a problem in ``report``): which manifests
    use each chunk, the length stream manifests give their chunks, and the newest backup of each
    (volume, stream)."""
    users: dict[str, list[str]] = defaultdict(list)
    lengths: dict[str, int] = {}
    newest: dict[tuple[str, bool], tuple[str, str]] = {}
    for mid in ids:
        try:
            manifest = repo.load_manifest(mid)
        except IntegrityError as exc:
            report.problems.append(Problem(mid, None, str(exc)))
            continue
        report.backups += 1
        key = (manifest.volume, manifest.is_stream)
        newest[key] = max(newest.get(key, ("", "")), (manifest.created, mid))
        if manifest.is_stream:
            if len(manifest.sizes) != len(manifest.chunks) or sum(manifest.sizes) != manifest.size:
                report.problems.append(Problem(mid, None, "stream manifest: chunk sizes do not add up"))
            lengths.update(zip((d for d in manifest.chunks if d), manifest.sizes, strict=False))
        for digest in manifest.referenced():
            users[digest].append(mid)
    return users, lengths, newest


def chunk_users(repo: Repository) -> tuple[dict[str, list[str]], dict[str, int], VerifyReport]:
    """Every chunk the repository's manifests use, with the manifests using it, and the lengths
    stream manifests give; the report lists manifests that could not be read (the scheduled
    verify walks the sorted digests with a cursor, :func:`check_chunks` a batch at a time)."""
    report = VerifyReport()
    users, lengths, _newest = _read_manifests(repo, repo.manifest_ids(), report)
    report.chunks = len(users)
    return users, lengths, report


def check_chunks(
    repo: Repository,
    digests: Sequence[str],
    lengths: dict[str, int] | None = None,
    *,
    read_data: bool = True,
) -> Iterator[tuple[str, int, str | None]]:
    """``(digest, bytes read, problem or None)`` for each of ``digests`` (the missing first, then
    in the order their reads finish; without ``read_data`` only the missing ones): a chunk
    the repository lacks is "chunk is missing"; with ``read_data`` every present one is read
    and decoded (its digest and authentication checked) and, where ``lengths`` gives the
    length its stream manifest says, measured. Each chunk is read once. Verify and the
    scheduled verify of a storage (a cursor over the sorted digests) both check with this."""
    missing = repo.missing_chunks(digests)
    present = [digest for digest in digests if digest not in missing]
    lengths = lengths or {}

    def check(digest: str) -> tuple[str, int, str | None]:
        try:
            size = len(repo.load_chunk(digest))
        except IntegrityError as exc:
            return digest, 0, str(exc)
        if digest in lengths and size != lengths[digest]:
            return digest, size, f"chunk has {size} bytes, its stream manifest says {lengths[digest]}"
        return digest, size, None

    for digest in sorted(missing):
        yield digest, 0, "chunk is missing"
    if read_data:
        yield from parallel_map(check, present)


def _rewrite_heads(repo: Repository, newest: dict[tuple[str, bool], tuple[str, str]]) -> None:
    """After reading every manifest: each volume's head names its newest backup (a head that
    was missing or behind is written again)."""
    for (volume, stream), (_created, manifest_id) in newest.items():
        head = repo.head(volume, stream=stream)
        if head is None or head.id != manifest_id:
            repo.record_newest(volume, manifest_id)


# -- prune --------------------------------------------------------------------------------
@dataclass
class Policy:
    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    def check(self) -> None:
        values = (self.keep_last, self.keep_daily, self.keep_weekly, self.keep_monthly)
        if any(value < 0 for value in values):
            raise UsageError(detail="keep counts must not be negative")
        if self.keep_last < 1:
            raise UsageError(detail="--keep-last must be at least 1: prune never removes the newest backup")


def _buckets(created: datetime) -> dict[str, str]:
    local = created.astimezone()
    year, week, _ = local.isocalendar()
    return {
        "daily": local.strftime("%Y-%m-%d"),
        "weekly": f"{year}-W{week:02d}",
        "monthly": local.strftime("%Y-%m"),
    }


def select_keep(entries: Sequence[tuple[str, datetime]], policy: Policy) -> set[str]:
    """Which of ``(id, created)`` (the backups of one volume) ``policy`` keeps (restic's
    forget rules): the newest ``keep_last``, and the newest of each of the last N days, ISO
    weeks and months. The service's retention uses the same rules."""
    newest_first = sorted(entries, key=lambda e: (e[1], e[0]), reverse=True)
    keep = {entry_id for entry_id, _created in newest_first[: policy.keep_last]}
    for period, limit in (
        ("daily", policy.keep_daily),
        ("weekly", policy.keep_weekly),
        ("monthly", policy.keep_monthly),
    ):
        seen: set[str] = set()
        for entry_id, created in newest_first:
            if len(seen) >= limit:
                break
            bucket = _buckets(created)[period]
            if bucket not in seen:
                seen.add(bucket)
                keep.add(entry_id)
    return keep


@dataclass
class PruneReport:
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    protected: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)  # under object lock: not removed yet


def prune(repo: Repository, policy: Policy, *, dry_run: bool = False) -> PruneReport:
    """Delete the manifests ``policy`` does not keep, per volume (stream backups: per
    source). Chunks are freed by gc. Protected backups are never removed and do not count
    against the policy (Proxmox Backup Server's rule): they are listed apart."""
    policy.check()
    report = PruneReport()
    with repository_lock(repo.backend, "shared", "prune"):
        protected = repo.protected_ids()
        groups: dict[tuple[str, str], list[BackupEntry]] = defaultdict(list)
        for entry in repo.backups():
            if entry.id in protected:
                report.protected.append(entry.id)
                continue
            groups[(entry.manifest.kind, entry.manifest.volume)].append(entry)
        for entries in groups.values():
            keep = select_keep([(e.id, e.manifest.created_at) for e in entries], policy)
            for entry in entries:
                if entry.id in keep:
                    report.kept.append(entry.id)
                elif dry_run:
                    report.removed.append(entry.id)
                else:
                    try:
                        repo.delete_manifest(entry.id)
                    except ObjectLocked:  # object lock: it goes in a prune after its date
                        report.locked.append(entry.id)
                        continue
                    report.removed.append(entry.id)
                    log.info("prune.removed id=%s volume=%s", entry.id[:12], entry.manifest.volume)
    return report


# -- gc -----------------------------------------------------------------------------------
@dataclass
class GcReport:
    chunksDeleted: int = 0
    bytesFreed: int = 0
    chunksKept: int = 0
    tmpDeleted: int = 0
    chunksLocked: int = 0  # unreferenced, but under object lock: deleted by a later gc
    locksExtended: int = 0  # chunks whose lock was lengthened to a newer backup's
    seconds: float = 0.0


def gc(repo: Repository, *, wait: float = 0.0) -> GcReport:
    """Delete every chunk no manifest references, and what killed writers left in tmp/.

    Holds the exclusive lock, so no backup runs meanwhile: a backup that starts waits for
    gc, and gc waits up to ``wait`` seconds for running backups before refusing. A manifest
    that cannot be read stops gc before anything is deleted.

    On a store with object lock (``backend.lock_seconds``) a chunk still locked is kept, and a
    chunk a newer backup uses (written before it, so locked for less) is locked as long as that
    backup: until its creation plus the lock period."""
    started = time.monotonic()
    report = GcReport()
    backend = repo.backend
    with repository_lock(backend, "exclusive", "gc", wait=wait):
        referenced: dict[str, float] = {}  # digest -> until when the backups using it are locked
        for mid in repo.manifest_ids():
            try:
                manifest = repo.load_manifest(mid)
            except BlockvaultError as exc:
                raise IntegrityError(detail=f"gc stopped, nothing deleted: manifest {mid[:12]}: {exc}") from None
            until = manifest.created_at.timestamp() + backend.lock_seconds
            for digest in manifest.referenced():
                referenced[digest] = max(referenced.get(digest, 0.0), until)
        doomed = []
        moment = time.time()
        for info in list(backend.list("chunks/")):
            digest = info.key.rsplit("/", 1)[1]
            if digest in referenced:
                report.chunksKept += 1
                if backend.lock_seconds and info.mtime + backend.lock_seconds < referenced[digest]:
                    backend.extend_lock(info.key, referenced[digest])
                    report.locksExtended += 1
            elif backend.lock_seconds and (
                info.mtime + backend.lock_seconds > moment or backend.locked_until(info.key) is not None
            ):
                report.chunksLocked += 1
            else:
                doomed.append((digest, info.size))
        if doomed:  # every host's chunk index forgets them before they go (chunkindex.py)
            announce_deletion(repo.backend, (digest for digest, _size in doomed))
        for digest, size in doomed:
            repo.backend.delete(chunk_key(digest))
            report.chunksDeleted += 1
            report.bytesFreed += size
        for info in list(repo.backend.list("tmp/")):
            if info.mtime > time.time() - TMP_GRACE_SECONDS:
                continue  # our own lock refresh may be writing it
            repo.backend.delete(info.key)
            report.tmpDeleted += 1
        read_locks(repo.backend)  # drops stale locks
    report.seconds = round(time.monotonic() - started, 3)
    log.info("gc.done deleted=%d freed=%d", report.chunksDeleted, report.bytesFreed)
    return report
