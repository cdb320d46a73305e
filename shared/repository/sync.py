"""Sync: copy backups from one repository to another, sending only what the target lacks.

Target repositories name chunks like their source (``Repository.init(like=...)``), so a
backup keeps its id everywhere and the target is asked in batches which chunks it lacks.
Chunks go first, each manifest last, so the target never lists a backup it cannot restore;
a sync cut off anywhere resumes by sending only what is still missing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.errors import BackupNotFound, RepositoryError
from shared.failpoints import failpoint

from .locks import repository_lock
from .pipeline import parallel_map
from .repo import Repository, chunk_key, manifest_key

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
    seconds: float = 0.0


def sync(
    src: Repository,
    dst: Repository,
    ids: list[str] | None = None,
    *,
    bandwidth_limit: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SyncReport:
    """Copy the backups ``ids`` (all when None) from ``src`` to ``dst``."""
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
        manifests = {mid: src.load_manifest(mid) for mid in todo}
        # A manifest on the target guarantees its chunks are there (manifests go last, gc keeps
        # what a manifest references): the chunks of a parent the target holds are not asked
        # about, so an incremental sync asks about its changed chunks, not the whole volume.
        held: set[str] = set()
        for parent in {m.parent for m in manifests.values() if m.parent and m.parent in present}:
            try:
                held |= src.load_manifest(parent).referenced()
            except BackupNotFound:  # pruned at the source since: ask about every chunk
                continue
        needed = sorted(set().union(*(m.referenced() for m in manifests.values())) - held)
        missing: list[str] = []
        for start in range(0, len(needed), BATCH):
            missing.extend(sorted(dst.missing_chunks(needed[start : start + BATCH])))

        def copy(digest: str) -> int:
            key = chunk_key(digest)
            blob = dst.codec.recode(bytes.fromhex(digest), src.backend.get(key), src.codec, f"chunk {digest}")
            limiter.take(len(blob))
            dst.backend.put(key, blob, overwrite=False)
            return len(blob)

        for count, size in enumerate(parallel_map(copy, missing), 1):
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
