"""Backing up a volume: full, incremental by rehash, incremental by qcow2 dirty bitmap.

Every mode writes a complete manifest. A chunk that is all zeros or lies in a hole is not
stored; a chunk whose digest the parent already lists is not stored again; any other chunk is
stored once per repository. The manifest is written after every chunk it names, and the dirty
bitmap is rotated only after that, so a backup killed at any point loses no change.

Bitmap bookkeeping lives in the image itself: beside the tracking bitmap ``NAME`` a tiny
disabled marker bitmap ``NAME@<repo8>.<backup32>`` names the backup since which ``NAME``
has tracked writes, for that repository. Before the image is read a second tracking bitmap
``NAME.next`` starts; the rotation after commit makes ``NAME`` exactly ``NAME.next`` (one
qemu-img run: cleared, then merged) and drops ``NAME.next``. A write that comes after the read
and before the rotation (the image is free again: a VM started meanwhile) is in ``NAME.next``,
so the rotation never clears it away; a ``NAME.next`` a killed run left is merged back into
``NAME`` first, as the live path does (:mod:`shared.repository.live`).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.errors import UsageError, VolumeError
from shared.failpoints import failpoint

from . import qemu
from .locks import repository_lock
from .manifest import BackupEntry, Manifest
from .pipeline import CHUNK_COPIES, Finisher, parallel_map
from .repo import Repository
from .volume import NbdReader, RawReader, chunk_indexes, open_reader, probe_volume, zeros

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
MARKER_GRANULARITY = 2**31


@dataclass
class BackupResult:
    id: str
    installPath: str
    mode: str
    parent: str | None
    size: int
    bytesRead: int
    bytesWritten: int
    chunks: int
    newChunks: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Plan:
    mode: str
    parent: BackupEntry | None
    read: list[int]  # chunk indexes to read
    reuse_from_parent: bool  # chunks not read keep the parent's digest (bitmap) or are zero
    cleared: frozenset[int] = frozenset()  # dirty chunks that are holes now


def _marker_prefix(name: str, repo: Repository) -> str:
    return f"{name}@{repo.id[:8]}."


def bitmap_base(repo: Repository, names: list[str], name: str, parent_id: str | None) -> BackupEntry | None:
    """The backup since which bitmap ``name`` has tracked every write, when it can serve as
    this backup's parent; None when the bitmap must be (re)started. ``names`` are the
    image's (usable) bitmaps."""
    prefix = _marker_prefix(name, repo)
    bases = [n[len(prefix) :] for n in names if n.startswith(prefix)]
    if name not in names or not bases:
        return None
    ids = {mid for base in set(bases) for mid in repo.manifest_ids(base)}  # one listing a marker
    entries = sorted((BackupEntry(mid, repo.load_manifest(mid)) for mid in ids), key=lambda e: e.manifest.created)
    if not entries:
        return None
    base = entries[-1]  # the newest marker is always covered (see _rotate_bitmap's order)
    if base.manifest.is_stream:  # a marker's id prefix can only name a volume backup; be sure
        return None
    if parent_id and not base.id.startswith(parent_id.lower()):
        return None
    if base.manifest.chunkSize != repo.chunk_size:
        return None
    return base


def marker_name(name: str, repo: Repository, manifest_id: str) -> str:
    """The disabled bitmap that says "``name`` tracks writes since backup ``manifest_id``"."""
    return f"{_marker_prefix(name, repo)}{manifest_id[:32]}"


def choose_plan(
    repo: Repository,
    reader: RawReader | NbdReader,
    *,
    full: bool,
    parent_id: str | None,
    bitmap_base: BackupEntry | None,
) -> _Plan:
    chunk_size = repo.chunk_size
    data = sorted(chunk_indexes(reader.data_extents(), chunk_size))
    if bitmap_base is not None and isinstance(reader, NbdReader) and reader.bitmap:
        if bitmap_base.manifest.size == reader.size:
            dirty = chunk_indexes(reader.dirty_extents(), chunk_size)
            readable = dirty.intersection(data)
            return _Plan("incremental", bitmap_base, sorted(readable), True, frozenset(dirty - readable))
        log.info("backup.bitmap_unusable volume=%s reason=resized", reader.path)
    parent: BackupEntry | None = None
    if parent_id:
        mid = repo.resolve(parent_id)
        parent = BackupEntry(mid, repo.load_manifest(mid))
        if parent.manifest.is_stream:
            raise UsageError(detail=f"parent {mid[:12]} is a stream backup ({parent.manifest.volume}), not a volume")
        if parent.manifest.chunkSize != chunk_size:
            raise UsageError(detail=f"parent {mid[:12]} has another chunk size")
    elif not full:
        parent = repo.newest(reader.path)
    if parent is None:
        return _Plan("full", None, data, False)
    return _Plan("incremental", parent, data, False)


NEXT = ".next"  # the bitmap that tracks writes from a backup's read on (see the module's doc)


def _merge_next_back(path: str, name: str, names: list[str]) -> list[str]:
    """A ``NAME.next`` that a killed run left: merged into ``NAME`` (which then covers every
    write since its base again) and removed. The image's bitmaps after."""
    nxt = name + NEXT
    if nxt not in names:
        return names
    if name in names:
        qemu.bitmap_merge(path, name, nxt)
    qemu.bitmap_remove(path, nxt)
    return [n for n in names if n != nxt]


def _start_next(path: str, name: str, granularity: int | None) -> None:
    """Start ``NAME.next`` (enabled, with ``NAME``'s granularity when known) before the image
    is read."""
    qemu.bitmap_add(path, name + NEXT, granularity=granularity)


def _restart_bitmap(path: str, name: str, names: list[str]) -> None:
    """Before a backup that reads everything: start tracking now, so the bitmap covers every
    write after this backup's read. Every repository's marker goes first: none of them may
    trust a bitmap that was cleared behind its back. ``names``: the image's bitmaps, just
    listed."""
    for marker in sorted(n for n in names if n.startswith(f"{name}@")):
        qemu.bitmap_remove(path, marker)
    if name in names:
        qemu.bitmap_clear(path, name)
    else:
        qemu.bitmap_add(path, name)


def _rotate_bitmap(path: str, name: str, repo: Repository, manifest_id: str) -> None:
    """After commit: mark the new base, drop every other marker (of any repository: the
    rotation invalidates them all), then ``NAME`` := ``NAME.next`` (the writes since this
    backup's read) and ``NAME.next`` goes. A crash between steps leaves only markers whose
    base ``NAME`` (with ``NAME.next`` merged back) still covers."""
    old = [b["name"] for b in qemu.list_bitmaps(path) if b["name"].startswith(f"{name}@")]
    new = marker_name(name, repo, manifest_id)
    if new not in old:
        qemu.bitmap_add(path, new, disabled=True, granularity=MARKER_GRANULARITY)
    failpoint("backup.bitmap_marked")
    for marker in old:
        if marker != new:
            qemu.bitmap_remove(path, marker)
    qemu.bitmap_merge(path, name, name + NEXT, clear=True)
    failpoint("backup.bitmap_cleared")
    qemu.bitmap_remove(path, name + NEXT)


def backup_volume(
    repo: Repository,
    volume_path: str,
    *,
    full: bool = False,
    parent: str | None = None,
    bitmap: str | None = None,
    name: str = "",
    metadata: dict[str, Any] | None = None,
    progress: Progress | None = None,
    lock_wait: float = 60.0,
    volume_format: str | None = None,
) -> BackupResult:
    """Back ``volume_path`` up into ``repo`` and return what was done; ``volume_format``
    (raw or qcow2) when known, else detected from the volume's header."""
    if full and parent:
        raise UsageError(detail="--full and --parent exclude each other")
    started = time.monotonic()
    with repository_lock(repo.backend, "shared", f"backup of {volume_path}", wait=lock_wait):
        repo.refresh_index()
        path, fmt = probe_volume(volume_path, volume_format)
        base: BackupEntry | None = None
        if bitmap:
            if fmt != "qcow2":
                raise VolumeError(path=volume_path, detail="dirty bitmaps need a qcow2 image; this one is raw")
            try:
                found = qemu.list_bitmaps(path)
                names = _merge_next_back(path, bitmap, [b["name"] for b in found])
                base = None if full else bitmap_base(repo, names, bitmap, parent)
                if base is None:
                    _restart_bitmap(path, bitmap, names)
                _start_next(path, bitmap, next((b["granularity"] for b in found if b["name"] == bitmap), None))
            except qemu.QemuError as exc:
                raise VolumeError(path=volume_path, detail=str(exc)) from None
        reader = open_reader(path, bitmap if base else None, fmt)
        try:
            plan = choose_plan(repo, reader, full=full, parent_id=parent, bitmap_base=base)
            result = run_plan(repo, reader, plan, name, metadata or {}, bitmap, started, progress)
        finally:
            reader.close()
    if bitmap:
        try:
            _rotate_bitmap(path, bitmap, repo, result.id)
        except qemu.QemuError as exc:
            log.warning("backup.bitmap_rotate_failed volume=%s error=%s", volume_path, exc)
    return result


def run_plan(
    repo: Repository,
    reader: RawReader | NbdReader,
    plan: _Plan,
    name: str,
    metadata: dict[str, Any],
    bitmap: str | None,
    started: float,
    progress: Progress | None,
) -> BackupResult:
    chunk_size = repo.chunk_size
    count = (reader.size + chunk_size - 1) // chunk_size
    parent_chunks = plan.parent.manifest.chunks if plan.parent else []
    chunks: list[str | None] = [None] * count
    if plan.reuse_from_parent:
        chunks = [parent_chunks[i] if i < len(parent_chunks) and i not in plan.cleared else None for i in range(count)]
    known = set(parent_chunks) - {None}
    total = sum(min(chunk_size, reader.size - i * chunk_size) for i in plan.read)
    done = bytes_written = new_chunks = 0

    def work(index: int) -> tuple[int, str | None, int, int]:
        offset = index * chunk_size
        length = min(chunk_size, reader.size - offset)
        data = reader.read(offset, length)
        if data == zeros(length):
            return index, None, length, 0
        digest = repo.codec.digest(data)
        hexd = digest.hex()
        if hexd in known or repo.has_chunk(hexd):
            return index, hexd, length, 0
        stored, finish = repo.begin_store_chunk(digest, data)

        def complete() -> None:  # on a finishing thread: this one goes on to its next chunk
            finish()
            failpoint("backup.chunk_stored")

        finisher.submit(complete)
        return index, hexd, length, stored

    with Finisher() as finisher:
        for index, digest, length, stored in parallel_map(
            work, plan.read, item_bytes=(CHUNK_COPIES + reader.served_copies) * chunk_size
        ):
            chunks[index] = digest
            done += length
            if stored:
                bytes_written += stored
                new_chunks += 1
            if progress:
                progress(done, total)
    manifest = Manifest(
        volume=reader.path,
        format=reader.format,
        size=reader.size,
        chunkSize=chunk_size,
        chunks=chunks,
        mode=plan.mode,
        parent=plan.parent.id if plan.parent else None,
        name=name,
        hostname=socket.gethostname(),
        bitmap=bitmap,
        metadata=metadata,
    )
    seconds = time.monotonic() - started
    manifest.stats = {"bytesRead": done, "bytesWritten": bytes_written, "newChunks": new_chunks}
    failpoint("backup.before_manifest")
    manifest_id = repo.save_manifest(manifest)
    failpoint("backup.after_manifest")
    repo.record_newest(reader.path, manifest_id)
    log.info("backup.committed id=%s mode=%s volume=%s", manifest_id[:12], plan.mode, reader.path)
    result = BackupResult(
        id=manifest_id,
        installPath=repo.install_path(manifest_id),
        mode=plan.mode,
        parent=manifest.parent,
        size=reader.size,
        bytesRead=done,
        bytesWritten=bytes_written,
        chunks=sum(1 for digest in chunks if digest),
        newChunks=new_chunks,
        seconds=round(seconds, 3),
    )
    return result
