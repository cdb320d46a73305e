"""A backup as a random-access block device: any byte range of a backed-up volume, read from
the repository on demand.

:class:`BackupView` answers ``read(offset, length)`` and ``extents(offset, length)`` (data or
hole) from the backup's manifest: each chunk a read touches is fetched once, checked against
its digest (:meth:`Repository.load_chunk`, keyed BLAKE3 when the repository is encrypted) and
its length, and kept in a :class:`ChunkCache` bounded in bytes. Chunks the manifest has no
digest for are holes and read as zeros without a request. A run of reads that walks forward
through the volume makes the view fetch the next chunks ahead, in parallel, so a sequential
reader (``qemu-img convert``, a block-stream job, a file copied out of a filesystem) is not
bound by one round trip per chunk on a remote or S3 storage.

The NBD server (nbdserver.py) and file-level restore read backups through this view; restore
(restore.py) writes whole volumes and does not need it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from shared.errors import IntegrityError, UsageError

from .manifest import Manifest
from .repo import Repository

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
DEFAULT_READAHEAD = 4  # chunks fetched ahead of a sequential reader
FETCH_THREADS = 4


class ChunkCache:
    """Decoded chunks by index, least recently used dropped first once over ``capacity``
    bytes. Two readers wanting the same chunk share one fetch (the second waits for the
    first); a failed fetch is not cached, so the next reader tries again."""

    def __init__(self, capacity: int = DEFAULT_CACHE_BYTES) -> None:
        self.capacity = max(0, capacity)
        self.size = 0
        self._items: OrderedDict[int, bytes] = OrderedDict()
        self._loading: dict[int, Future[bytes]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __contains__(self, index: int) -> bool:
        with self._lock:
            return index in self._items or index in self._loading

    def get(self, index: int, load: Callable[[], bytes]) -> bytes:
        with self._lock:
            data = self._items.get(index)
            if data is not None:
                self._items.move_to_end(index)
                self.hits += 1
                return data
            pending = self._loading.get(index)
            owner = pending is None
            if owner:
                self.misses += 1
                pending = self._loading[index] = Future()
        assert pending is not None
        if not owner:
            return pending.result()
        try:
            data = load()
        except BaseException as exc:
            with self._lock:
                del self._loading[index]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._loading[index]
            self._put(index, data)
        pending.set_result(data)
        return data

    def _put(self, index: int, data: bytes) -> None:
        if len(data) > self.capacity:
            return
        self._items[index] = data
        self.size += len(data)
        while self.size > self.capacity:
            _, dropped = self._items.popitem(last=False)
            self.size -= len(dropped)


@dataclass
class ViewStats:
    """What a view fetched, for progress, logs and benchmarks."""

    opened: float = field(default_factory=time.monotonic)
    first_read: float | None = None
    reads: int = 0
    bytes_served: int = 0
    chunks_fetched: int = 0
    bytes_fetched: int = 0


class BackupView:
    """Backup ``manifest_id`` of ``repo`` as a read-only block device of ``size`` bytes.
    Thread-safe: every NBD client and every file reader shares one view."""

    def __init__(
        self,
        repo: Repository,
        manifest_id: str,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        readahead: int = DEFAULT_READAHEAD,
        manifest: Manifest | None = None,
    ) -> None:
        self.repo = repo
        self.id = manifest_id
        self.manifest = manifest if manifest is not None else repo.load_manifest(manifest_id)
        if self.manifest.is_stream:
            raise UsageError(detail=f"backup {manifest_id[:12]} is a {self.manifest.format} stream, not a volume")
        self.size = self.manifest.size
        self.chunk_size = self.manifest.chunkSize
        self.readahead = max(0, readahead) if cache_bytes >= 2 * self.chunk_size else 0
        self.cache = ChunkCache(cache_bytes)
        self.stats = ViewStats()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._last_chunk = -2
        self._closed = False

    # -- chunks ---------------------------------------------------------------------------------
    def _expected(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def _fetch(self, index: int) -> bytes:
        digest = self.manifest.chunks[index]
        assert digest is not None
        data = self.repo.load_chunk(digest)
        expected = self._expected(index)
        if len(data) != expected:
            raise IntegrityError(detail=f"chunk {digest} has {len(data)} bytes, expected {expected}")
        self.stats.chunks_fetched += 1
        self.stats.bytes_fetched += len(data)
        return bytes(data)

    def chunk(self, index: int) -> bytes | None:
        """Chunk ``index``'s bytes, checked; None for a hole (zeros)."""
        if self.manifest.chunks[index] is None:
            return None
        return self.cache.get(index, lambda: self._fetch(index))

    def _prefetch(self, first: int) -> None:
        """Fetch chunks ``first``.. ``first + readahead`` in the background (cache only)."""
        if self._closed:
            return
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="blockview")
            pool = self._pool
        for index in range(first, min(first + self.readahead, len(self.manifest.chunks))):
            if self.manifest.chunks[index] is not None and index not in self.cache:
                pool.submit(self._quiet_chunk, index)

    def _quiet_chunk(self, index: int) -> None:
        try:
            self.chunk(index)
        except Exception as exc:  # noqa: BLE001 - the reader that needs it will meet the error itself
            log.debug("blockview.prefetch_failed chunk=%d error=%s", index, exc)

    # -- the block device ------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (holes as zeros). IntegrityError for a damaged or
        missing chunk; the backend's error when the storage does not answer."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(detail=f"range {offset}+{length} is outside the backup's {self.size} bytes")
        if self.stats.first_read is None:
            self.stats.first_read = time.monotonic()
        self.stats.reads += 1
        self.stats.bytes_served += length
        if length == 0:
            return b""
        first, last = offset // self.chunk_size, (offset + length - 1) // self.chunk_size
        if self.readahead and (first in (self._last_chunk, self._last_chunk + 1) or last > first):
            self._prefetch(last + 1)
        self._last_chunk = last
        if first == last:  # the common case: one chunk, one slice
            data = self.chunk(first)
            start = offset - first * self.chunk_size
            return bytes(length) if data is None else data[start : start + length]
        out = bytearray(length)
        for index in range(first, last + 1):
            base = index * self.chunk_size
            lo, hi = max(offset, base), min(offset + length, base + self._expected(index))
            data = self.chunk(index)
            if data is not None:
                out[lo - offset : hi - offset] = data[lo - base : hi - base]
        return bytes(out)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, is_hole)`` runs covering ``[offset, offset + length)``, merged."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(detail=f"range {offset}+{length} is outside the backup's {self.size} bytes")
        runs: list[tuple[int, int, bool]] = []
        end = offset + length
        pos = offset
        while pos < end:
            index = pos // self.chunk_size
            stop = min(end, (index + 1) * self.chunk_size)
            hole = self.manifest.chunks[index] is None
            if runs and runs[-1][2] == hole:
                runs[-1] = (runs[-1][0], runs[-1][1] + stop - pos, hole)
            else:
                runs.append((pos, stop - pos, hole))
            pos = stop
        return runs

    def close(self) -> None:
        self._closed = True
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BackupView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
