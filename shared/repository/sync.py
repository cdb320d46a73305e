"""Sync: copy backups from one repository to another, sending only what the target lacks.

Target repositories name chunks like their source (``Repository.init(like=...)``), so a
backup keeps its id everywhere and the target is asked in batches which chunks it lacks.
Chunks go first, each manifest last, so the target never lists a backup it cannot restore;
a sync cut off anywhere resumes by sending only what is still missing.

A target that others write to as well (a storage server's repository: ``foreign_writers``)
vouches for an object it reports present only where it could check it against its name (a
repository without keys). Into one with keys, sync trusts only what it checked itself: the
manifests it builds on (the parents the target holds, and the backups asked for by id that
it holds already) are read from the target, decoding checks them; every chunk reported
present that none of those parents references is read back and decoded before any manifest
is committed. A planted object fails the sync with an IntegrityError naming it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.errors import BackupNotFound, IntegrityError, RepositoryError
from shared.failpoints import failpoint

from .locks import repository_lock
from .manifest import Manifest
from .pipeline import CHUNK_COPIES, parallel_map
from .repo import Repository, checkable_without_keys, chunk_key, manifest_key

log = logging.getLogger(__name__)
BATCH = 256


class RateLimiter:
    """A token bucket: ``take(n)`` sleeps so that on average at most ``rate`` bytes/s pass."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._next = clock()

    def take(self, amount: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + amount / self.rate
        if start > now:
            self._sleep(start - now)


@dataclass
class SyncReport:
    backups: list[str] = field(default_factory=list)
    chunksCopied: int = 0
    bytesCopied: int = 0
    chunksVerified: int = 0  # read back from a target that could not check them (see above)
    seconds: float = 0.0


def sync(
    src: Repository,
    dst: Repository,
    ids: list[str] | None = None,
    *,
    bandwidth_limit: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SyncReport:
    """Copy the backups ``ids`` (all when None) from ``src`` to ``dst``; IntegrityError when an
    object ``dst`` holds already is not what its name says (see the module's docstring), and
    then no manifest is committed."""
    if not src.codec.same_naming(dst.codec) or src.chunk_size != dst.chunk_size:
        raise RepositoryError(
            location=dst.location,
            detail="names chunks differently from the source; create it by syncing into it",
        )
    started = time.monotonic()
    limiter = RateLimiter(bandwidth_limit)
    report = SyncReport()
    with (
        repository_lock(src.backend, "shared", f"sync to {dst.location}"),
        repository_lock(dst.backend, "shared", f"sync from {src.location}"),
    ):
        wanted = [src.resolve(i) for i in ids] if ids else src.manifest_ids()
        present = set(dst.manifest_ids())
        todo = [mid for mid in wanted if mid not in present]
        verify = dst.backend.foreign_writers and not checkable_without_keys(dst.config)
        for mid in wanted if verify and ids else []:  # asked for by id: the caller calls them synced
            if mid in present:
                dst.load_manifest(mid)
        manifests = {mid: src.load_manifest(mid) for mid in todo}
        held = _held(dst if verify else src, manifests, present)
        needed = sorted(set().union(*(m.referenced() for m in manifests.values())) - held)
        missing: list[str] = []
        for start in range(0, len(needed), BATCH):
            missing.extend(sorted(dst.missing_chunks(needed[start : start + BATCH])))
        if verify:
            absent = set(missing)
            report.chunksVerified = _verify([digest for digest in needed if digest not in absent], dst)

        def copy(digest: str) -> int:
            key = chunk_key(digest)
            blob = dst.codec.recode(bytes.fromhex(digest), src.backend.get(key), src.codec, f"chunk {digest}")
            limiter.take(len(blob))
            dst.backend.put(key, blob, overwrite=False)
            return len(blob)

        for count, size in enumerate(parallel_map(copy, missing, item_bytes=CHUNK_COPIES * src.chunk_size), 1):
            report.chunksCopied += 1
            failpoint("sync.chunk_copied")
            report.bytesCopied += size
            if progress:
                progress(count, len(missing))
        for mid in todo:  # manifests last
            blob = dst.codec.recode(
                bytes.fromhex(mid), src.backend.get(manifest_key(mid)), src.codec, f"manifest {mid}"
            )
            dst.commit_manifest(mid, blob)
            report.backups.append(mid)
            log.info("sync.copied id=%s to=%s", mid[:12], dst.location)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _held(repo: Repository, manifests: dict[str, Manifest], present: set[str]) -> set[str]:
    """The chunks of the parents of ``manifests`` that the target holds (``present``), read
    from ``repo``. A manifest on the target guarantees its chunks are there (manifests go last,
    gc keeps what a manifest references): they are not asked about, so an incremental sync
    asks about its changed chunks, not the whole volume."""
    held: set[str] = set()
    for parent in {m.parent for m in manifests.values() if m.parent and m.parent in present}:
        try:
            held |= repo.load_manifest(parent).referenced()
        except BackupNotFound:  # pruned since: ask about every chunk
            continue
    return held


def _verify(digests: list[str], dst: Repository) -> int:
    """Read back and decode (digest and authentication) each of ``digests`` from ``dst``;
    IntegrityError naming the first that is not what its name says. How many were read."""
    for _ in parallel_map(
        lambda digest: len(dst.load_chunk(digest)), digests, item_bytes=CHUNK_COPIES * dst.chunk_size
    ):
        pass
    if digests:
        log.info("sync.verified chunks=%d at=%s", len(digests), dst.location)
    return len(digests)


def repair_chunks(src: Repository, dst: Repository, digests: list[str]) -> list[str]:
    """Rewrite in ``dst`` each of ``digests`` (found bad or missing there) from ``src``'s copy,
    then read it back from ``dst``: which of them are whole again. A chunk ``src`` lacks or holds
    bad as well is left as it is (not in the answer); an IntegrityError reading it back is not
    swallowed, it means ``dst`` still damages what it stores."""
    if not src.codec.same_naming(dst.codec) or src.chunk_size != dst.chunk_size:
        return []
    repaired: list[str] = []
    with repository_lock(dst.backend, "shared", f"repair from {src.location}"):
        for digest in sorted(set(digests) - src.missing_chunks(digests)):
            key = chunk_key(digest)
            try:  # recode checks the source's copy: a damaged one is never spread
                blob = dst.codec.recode(bytes.fromhex(digest), src.backend.get(key), src.codec, f"chunk {digest}")
            except IntegrityError:
                continue
            dst.backend.put(key, blob, overwrite=True)
            dst.load_chunk(digest)
            repaired.append(digest)
            log.info("sync.repaired chunk=%s from=%s at=%s", digest[:12], src.location, dst.location)
    return repaired
