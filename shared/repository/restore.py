"""Restoring a backup into a new volume file, sparse, every chunk checked on the way."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.errors import BlockvaultError, IntegrityError, UsageError
from shared.failpoints import failpoint

from .locks import repository_lock
from .pipeline import CHUNK_COPIES, parallel_map
from .repo import Repository
from .volume import DeviceWriter, VolumeWriter, check_block_device, open_writer

log = logging.getLogger(__name__)


@dataclass
class RestoreResult:
    id: str
    bytesWritten: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def restore_backup(
    repo: Repository,
    backup_id: str,
    target: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    lock_wait: float = 60.0,
    fmt: str | None = None,
    in_place: bool = False,
) -> RestoreResult:
    """Write backup ``backup_id`` to the new file ``target`` in format ``fmt`` (by default
    qcow2 when the name ends in .qcow2, else raw). On any failure nothing is left at
    ``target``. With ``in_place``, ``target`` is an existing block device written over
    (raw only): every byte of the backup, holes zeroed; a failure leaves it partly written."""
    started = time.monotonic()
    with repository_lock(repo.backend, "shared", f"restore to {target}", wait=lock_wait):
        manifest_id = repo.resolve(backup_id)
        manifest = repo.load_manifest(manifest_id)
        if manifest.is_stream:
            raise UsageError(
                detail=f"backup {manifest_id[:12]} is a {manifest.format} stream of {manifest.volume}, "
                "not a volume: restore it with restore_stream (a database restore)"
            )
        writer: VolumeWriter
        if in_place:
            if fmt not in (None, "raw"):
                raise UsageError(detail=f"an in-place restore writes raw data to a block device, not {fmt}")
            writer = DeviceWriter(check_block_device(target), manifest.size)
        else:
            writer = open_writer(target, manifest.size, fmt, allocate=manifest.data_runs())
        chunk_size = manifest.chunkSize
        todo = [(i, digest) for i, digest in enumerate(manifest.chunks) if digest]
        total = manifest.stored_size
        done = 0

        def work(item: tuple[int, str]) -> int:
            index, digest = item
            expected = min(chunk_size, manifest.size - index * chunk_size)
            # decoded straight into the writer's (aligned) buffer and written from there
            with writer.buffer(chunk_size) as buffer:
                size = repo.load_chunk_into(digest, buffer)
                if size != expected:
                    raise IntegrityError(detail=f"chunk {digest} has {size} bytes, expected {expected}")
                writer.write(index * chunk_size, buffer[:size], lent=True)
            return size

        try:
            for written in parallel_map(work, todo, item_bytes=CHUNK_COPIES * chunk_size):
                done += written
                failpoint("restore.chunk_written")
                if progress:
                    progress(done, total)
            if isinstance(writer, DeviceWriter):
                for offset, length in manifest.hole_runs():
                    writer.zero(offset, length)
            writer.commit()
        except BlockvaultError as exc:
            writer.abort()
            log.error("restore.failed id=%s target=%s error=%s", manifest_id[:12], target, exc)
            raise
        except BaseException:
            writer.abort()
            raise
    return RestoreResult(id=manifest_id, bytesWritten=done, seconds=round(time.monotonic() - started, 3))
