"""Backing up and restoring a byte stream (a database dump) rather than a block volume.

A stream is cut into content-defined chunks (FastCDC 2020, ``pyfastcdc``): a cut depends only
on the bytes just before it, so a dump with a few rows inserted near its start still shares
every chunk but one or two with the previous dump. Chunks are named, compressed, sealed and
stored like a volume's; the manifest (``kind: "stream"``) lists every chunk's digest and
length in order and the stream's MD5, and is written last, under the repository's shared
lock: a stream cut off (the producer killed, an exception) leaves no manifest, only orphan
chunks that gc frees.

Memory stays bounded whatever the stream's length: the stream is read in ``BLOCK``-byte
blocks (the unfinished tail carried into the next), and at most the parallel map's window of
chunks is in flight.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from pyfastcdc import FastCDC

from shared.errors import IntegrityError, UsageError
from shared.failpoints import failpoint

from .locks import repository_lock
from .manifest import Manifest
from .pipeline import default_workers, parallel_map, tune_allocator
from .repo import Repository

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
BLOCK = 16 * 1024 * 1024
MAX_CHUNK = 4 * 1024 * 1024
PREFETCH = 4


@dataclass(frozen=True)
class ChunkSizes:
    min: int
    avg: int
    max: int


def chunk_sizes(repo_chunk_size: int) -> ChunkSizes:
    """The chunker's sizes for a repository: 256 KiB / 1 MiB / 4 MiB for the default 4 MiB
    chunk size, scaled down (max never above the repository's chunk size) for smaller ones.
    They must stay the same for a repository, or consecutive dumps stop sharing chunks."""
    top = min(MAX_CHUNK, repo_chunk_size)
    return ChunkSizes(min=top // 16, avg=top // 4, max=top)


@dataclass
class StreamResult:
    id: str
    installPath: str
    size: int
    md5: str
    chunks: int
    newChunks: int
    bytesWritten: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _read_full(reader: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``reader`` (pipes return short reads); fewer bytes only at EOF."""
    filled = 0
    readinto = getattr(reader, "readinto", None)
    while filled < len(view):
        if readinto is not None:
            count = readinto(view[filled:])
        else:
            data = reader.read(len(view) - filled)
            count = len(data)
            view[filled : filled + count] = data
        if not count:
            break
        filled += count
    return filled


def cut_stream(reader: BinaryIO, sizes: ChunkSizes, block: int = BLOCK) -> Iterator[memoryview]:
    """The stream's content-defined chunks in order. Each is a view into its own block (a
    fresh bytearray per block, so a chunk stays valid while a worker holds it); only the tail
    after the last final cut is copied into the next block. A cut is final once the chunker
    saw ``max`` bytes after the chunk's start (or the stream ended): more data cannot move it."""
    block = max(block, 2 * sizes.max)
    cdc = FastCDC(sizes.avg, min_size=sizes.min, max_size=sizes.max)
    tail = b""
    eof = False
    while not eof:
        buf = bytearray(block)
        buf[: len(tail)] = tail
        length = len(tail) + _read_full(reader, memoryview(buf)[len(tail) :])
        eof = length < block
        data = memoryview(buf)[:length]
        consumed = 0
        for chunk in cdc.cut_buf(data):
            if not eof and length - chunk.offset < sizes.max:
                break
            yield chunk.data
            consumed = chunk.offset + chunk.length
        tail = bytes(data[consumed:])
        if eof and tail:  # cannot happen (at EOF every chunk is final); never drop bytes
            raise AssertionError("stream chunker left bytes behind")


def backup_stream(
    repo: Repository,
    reader: BinaryIO,
    *,
    name: str = "",
    source: str = "",
    fmt: str = "stream",
    metadata: dict[str, Any] | None = None,
    progress: Progress | None = None,
    lock_wait: float = 60.0,
) -> StreamResult:
    """Back the byte stream ``reader`` up into ``repo`` (read to EOF) and return what was done.

    ``source`` names what the stream is of (``"database:blockvault"``): prune keeps backups
    per source, and the source's newest backup tells which chunks are surely stored already.
    ``fmt`` says how to read the stream back (``"pg_dump"``, ``"sqlite-dump"``).
    ``progress(bytes_read, 0)``: a stream's length is not known in advance.

    Which chunks to store: a chunk the source's previous backup lists is present (manifests
    are written after their chunks and gc holds the exclusive lock); any other is asked about
    with ``missing_chunks`` on a worker thread, one small request, which is far cheaper than
    compressing, sealing and uploading it only for ``put(overwrite=False)`` to drop it, as
    unchanged dumps would otherwise do for every chunk."""
    started = time.monotonic()
    sizes = chunk_sizes(repo.chunk_size)
    source = source or "stream"
    with repository_lock(repo.backend, "shared", f"backup of {source}", wait=lock_wait):
        repo.refresh_index()
        previous = repo.newest(source, stream=True)
        known: set[str] = previous.manifest.referenced() if previous else set()
        claimed: set[str] = set()  # digests this run stores (or found present)
        claim_lock = threading.Lock()
        digests: list[str] = []
        lengths: list[int] = []
        md5 = hashlib.md5(usedforsecurity=False)
        read = 0

        def pieces() -> Iterator[tuple[int, memoryview]]:
            nonlocal read
            for index, view in enumerate(cut_stream(reader, sizes)):
                md5.update(view)
                read += len(view)
                digests.append("")
                lengths.append(len(view))
                yield index, view

        def work(item: tuple[int, memoryview]) -> tuple[int, str, int]:
            index, view = item
            digest = repo.codec.digest(view)
            hexd = digest.hex()
            with claim_lock:
                if hexd in known or hexd in claimed:
                    return index, hexd, 0
                claimed.add(hexd)
            if repo.has_chunk(hexd):
                return index, hexd, 0
            return index, hexd, repo.store_chunk(digest, view)

        bytes_written = new_chunks = done = 0
        for index, hexd, stored in parallel_map(work, pieces()):
            digests[index] = hexd
            done += lengths[index]
            if stored:
                bytes_written += stored
                new_chunks += 1
                failpoint("stream.chunk_stored")
            if progress:
                progress(done, 0)
        manifest = Manifest(
            volume=source,
            format=fmt,
            size=read,
            chunkSize=sizes.max,
            chunks=list(digests),
            mode="full",
            name=name,
            hostname=socket.gethostname(),
            metadata=metadata or {},
            kind="stream",
            sizes=lengths,
            md5=md5.hexdigest(),
        )
        manifest.stats = {
            "bytesRead": read,
            "bytesWritten": bytes_written,
            "newChunks": new_chunks,
            "chunker": {"algorithm": "fastcdc2020", "min": sizes.min, "avg": sizes.avg, "max": sizes.max},
        }
        failpoint("stream.before_manifest")
        manifest_id = repo.save_manifest(manifest)
        repo.record_newest(source, manifest_id)
    log.info("stream.committed id=%s source=%s size=%d new=%d", manifest_id[:12], source, read, new_chunks)
    return StreamResult(
        id=manifest_id,
        installPath=repo.install_path(manifest_id),
        size=read,
        md5=manifest.md5,
        chunks=len(digests),
        newChunks=new_chunks,
        bytesWritten=bytes_written,
        seconds=round(time.monotonic() - started, 3),
    )


def load_stream_manifest(repo: Repository, backup_id: str) -> tuple[str, Manifest]:
    """The full id and manifest of stream backup ``backup_id``; UsageError for a volume."""
    manifest_id = repo.resolve(backup_id)
    manifest = repo.load_manifest(manifest_id)
    if not manifest.is_stream:
        raise UsageError(detail=f"backup {manifest_id[:12]} is a volume backup of {manifest.volume}, not a stream")
    if len(manifest.sizes) != len(manifest.chunks) or sum(manifest.sizes) != manifest.size:
        raise IntegrityError(detail=f"stream manifest {manifest_id[:12]}: chunk sizes do not add up to its size")
    return manifest_id, manifest


def _prefetched(repo: Repository, digests: list[str], ahead: int) -> Iterator[bytes | bytearray]:
    """Every chunk's plain bytes in order, the next ``ahead`` loading on threads meanwhile."""
    tune_allocator()
    with ThreadPoolExecutor(max_workers=min(ahead, default_workers()), thread_name_prefix="prefetch") as pool:
        queue: deque[Future[bytes | bytearray]] = deque()
        todo = iter(digests)
        try:
            for digest in todo:
                queue.append(pool.submit(repo.load_chunk, digest))
                if len(queue) >= ahead:
                    break
            while queue:
                data = queue.popleft().result()
                for digest in todo:
                    queue.append(pool.submit(repo.load_chunk, digest))
                    break
                yield data
        finally:
            for future in queue:
                future.cancel()


def restore_stream(
    repo: Repository,
    backup_id: str,
    writer: BinaryIO,
    *,
    progress: Progress | None = None,
    lock_wait: float = 60.0,
) -> int:
    """Write stream backup ``backup_id`` to ``writer`` in order and return the bytes written.
    Every chunk is checked against its digest and length, the whole against the manifest's
    size and MD5; IntegrityError on any mismatch (the writer has then received part of the
    stream: callers load into something they can throw away, see dbdump.load)."""
    with repository_lock(repo.backend, "shared", "restore of a stream", wait=lock_wait):
        manifest_id, manifest = load_stream_manifest(repo, backup_id)
        md5 = hashlib.md5(usedforsecurity=False)
        done = 0
        digests = [digest or "" for digest in manifest.chunks]
        for index, data in enumerate(_prefetched(repo, digests, PREFETCH)):
            if len(data) != manifest.sizes[index]:
                raise IntegrityError(
                    detail=f"chunk {digests[index]} has {len(data)} bytes, expected {manifest.sizes[index]}"
                )
            md5.update(data)
            writer.write(data)
            done += len(data)
            failpoint("stream.chunk_written")
            if progress:
                progress(done, manifest.size)
        if done != manifest.size:
            raise IntegrityError(detail=f"stream {manifest_id[:12]} gave {done} bytes, expected {manifest.size}")
        if md5.hexdigest() != manifest.md5:
            raise IntegrityError(detail=f"stream {manifest_id[:12]}: MD5 {md5.hexdigest()} != {manifest.md5}")
    log.info("stream.restored id=%s bytes=%d", manifest_id[:12], done)
    return done
