"""Backing up a volume: full, incremental by rehash, incremental by qcow2 dirty bitmap.

Every mode writes a complete manifest. A chunk that is all zeros or lies in a hole is not
stored; a chunk whose digest the parent already lists is not stored again; any other chunk is
stored once per repository. The manifest is written after every chunk it names, and the dirty
bitmap is rotated only after that, so a backup killed at any point loses no change.

Bitmap bookkeeping lives in the image itself: beside the tracking bitmap ``NAME`` a tiny
disabled marker bitmap ``NAME@<repo8>.<backup32>`` names the backup since which ``NAME``
has tracked writes, for that repository. Before the image is read a second tracking bitmap
``NAME.next`` starts; the rotation after commit makes ``NAME`` exactly ``NAME.next`` (one
transaction: cleared, then merged) and drops ``NAME.next``. A write that comes after the read
and before the rotation (the image is free again: a VM started meanwhile) is in ``NAME.next``,
so the rotation never clears it away; a ``NAME.next`` a killed run left is merged back into
``NAME`` first, as the live path does (:mod:`shared.repository.live`).

The offline bitmap path does all of it over QMP, with the same functions as the live path:
a private ``qemu-storage-daemon`` opens the image, settles its bitmaps in one transaction and
exports it over NBD for the read (with a frozen copy of ``NAME``); after commit a second one
rotates them. Two short-lived processes where ``qemu-img`` took seven runs and ``qemu-nbd``
one, each ``qemu-img bitmap`` flushing the image several times over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from shared.errors import MonitorError, UsageError, VolumeError
from shared.failpoints import failpoint

from . import qemu
from .locks import repository_lock
from .manifest import BackupEntry, Manifest
from .nbd import NBDClient, NBDError
from .pipeline import CHUNK_COPIES, Finisher, parallel_map
from .qmp import Monitor
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
FROZEN = "blockvault-read"  # the offline read's copy of NAME (read-only exports take no enabled bitmap)


def promote_next(mon: Monitor, node: str, name: str, *, clear: bool) -> None:
    """``NAME`` := (``NAME`` unless ``clear``) + ``NAME.next``, recording; ``NAME.next`` gone,
    in one transaction. After a committed backup ``clear`` makes ``NAME`` track from its read;
    after a failed one, the merge keeps every write since the last good backup."""
    nxt = name + NEXT
    names = {b["name"] for b in mon.bitmaps(node)}
    if nxt not in names:
        return
    actions: list[tuple[str, dict[str, Any]]] = []
    if name in names:
        if clear:
            actions.append(("block-dirty-bitmap-clear", {"node": node, "name": name}))
    else:
        actions.append(("block-dirty-bitmap-add", {"node": node, "name": name, "persistent": True}))
    actions += [
        ("block-dirty-bitmap-merge", {"node": node, "target": name, "bitmaps": [nxt]}),
        ("block-dirty-bitmap-enable", {"node": node, "name": name}),
        ("block-dirty-bitmap-remove", {"node": node, "name": nxt}),
    ]
    mon.transaction(actions)


def settle_bitmaps(mon: Monitor, node: str, name: str, source: str) -> list[str]:
    """Before a backup: a ``NAME.next`` an interrupted run left is merged back into ``NAME``;
    inconsistent bitmaps (their QEMU died with them open) and a disabled ``NAME`` are dropped
    with every marker, so the backup reads all data. The names of ``NAME``, ``NAME.next`` and
    the markers left on ``node`` (``source`` names the volume in the log)."""

    def ours() -> list[dict[str, Any]]:
        return [b for b in mon.bitmaps(node) if b["name"] == name or b["name"].startswith((f"{name}@", name + NEXT))]

    def drop(bitmaps: list[dict[str, Any]], reason: str) -> None:
        log.warning("backup.bitmap_dropped volume=%s reason=%s", source, reason)
        for bitmap in bitmaps:
            mon.cmd("block-dirty-bitmap-remove", node=node, name=bitmap["name"])

    if any(b.get("inconsistent") for b in ours()):
        drop(ours(), "inconsistent")
    promote_next(mon, node, name, clear=False)
    if any(b["name"] == name and not b.get("recording", True) for b in ours()):
        drop(ours(), "disabled")
    return [b["name"] for b in ours()]


def rotate_bitmap(mon: Monitor, node: str, name: str, repo: Repository, manifest_id: str, point: str) -> None:
    """After commit: mark the new base, drop every other marker (of any repository: the
    rotation invalidates them all), then ``NAME`` := ``NAME.next`` (the writes since this
    backup's read) and ``NAME.next`` goes. A crash between steps leaves only markers whose
    base ``NAME`` (with ``NAME.next`` merged back) still covers. The bitmaps are listed here,
    not earlier: a backup of the image into another repository may have run since the read.
    ``point``: the failpoint once the marker is there."""
    new = marker_name(name, repo, manifest_id)
    names = {b["name"] for b in mon.bitmaps(node)}
    if new not in names:
        mon.cmd(
            "block-dirty-bitmap-add",
            node=node,
            name=new,
            persistent=True,
            disabled=True,
            granularity=MARKER_GRANULARITY,
        )
    failpoint(point)
    for marker in sorted(n for n in names if n.startswith(f"{name}@") and n != new):
        mon.cmd("block-dirty-bitmap-remove", node=node, name=marker)
    promote_next(mon, node, name, clear=True)


class BitmapImage:
    """The qcow2 image held by a private ``qemu-storage-daemon`` for a backup's read: its
    bitmaps settled and ``NAME.next`` started in one transaction, then exported read-only
    over NBD, with a frozen copy of ``NAME`` when an incremental reads it. Stopping the daemon
    (SIGTERM, also when this process dies) writes the persistent bitmaps back to the image.
    :func:`early_bitmap_image` starts one before the backup needs it."""

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name
        self.daemon = qemu.QemuStorageDaemon(path)
        self.mon: Monitor | None = None
        self.size = 0
        self.socket = ""
        self._started = False

    def start(self) -> BitmapImage:
        """Start the daemon without waiting for it."""
        self.daemon.start()
        self._started = True
        return self

    def open(self) -> BitmapImage:
        """The daemon up (started now unless it was) and its monitor connected."""
        if not self._started:
            self.start()
        self.daemon.wait()
        try:
            self.mon = Monitor(self.daemon.qmp_socket).connect()
        except BaseException:
            self.close()
            raise
        return self

    def release(self) -> None:
        """Tell the daemon to stop (it writes the bitmaps back and exits) without waiting."""
        if self.mon is not None:
            self.mon.close()
        self.daemon.terminate()

    def close(self) -> None:
        """Stop the daemon and wait for it (the image is free again); a second call does
        nothing."""
        if self.mon is not None:
            self.mon.close()
        self.daemon.__exit__(None, None, None)

    def prepare(self, repo: Repository, *, full: bool, parent: str | None) -> BackupEntry | None:
        """Settle the bitmaps, choose the base (None: read everything, ``NAME`` restarts),
        start ``NAME.next`` and export the image; the base."""
        mon, node, name = self.mon, self.daemon.node, self.name
        assert mon is not None
        names = settle_bitmaps(mon, node, name, self.path)
        base = None if full else bitmap_base(repo, names, name, parent)
        info = next(n for n in mon.block_nodes() if n.get("node-name") == node)
        self.size = int(info["image"]["virtual-size"])
        if base is not None and base.manifest.size != self.size:
            log.info("backup.bitmap_unusable volume=%s reason=resized", self.path)
            base = None
        granularity = next((b["granularity"] for b in info.get("dirty-bitmaps", []) if b.get("name") == name), None)
        same = {"granularity": granularity} if granularity is not None else {}  # as NAME's, for the merges
        actions: list[tuple[str, dict[str, Any]]] = []
        if base is None:  # restart: no marker may vouch for a bitmap cleared behind its back
            actions += [
                ("block-dirty-bitmap-remove", {"node": node, "name": n}) for n in names if n.startswith(f"{name}@")
            ]
            if name in names:
                actions.append(("block-dirty-bitmap-clear", {"node": node, "name": name}))
            else:
                actions.append(("block-dirty-bitmap-add", {"node": node, "name": name, "persistent": True}))
        actions.append(("block-dirty-bitmap-add", {"node": node, "name": name + NEXT, "persistent": True, **same}))
        if base is not None:
            actions += [
                ("block-dirty-bitmap-add", {"node": node, "name": FROZEN, "disabled": True, **same}),
                ("block-dirty-bitmap-merge", {"node": node, "target": FROZEN, "bitmaps": [name]}),
            ]
        mon.transaction(actions)
        assert self.daemon.qmp_socket
        self.socket = os.path.join(os.path.dirname(self.daemon.qmp_socket), "nbd.sock")
        mon.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": self.socket}})
        export: dict[str, Any] = {"type": "nbd", "id": "vol", "node-name": node, "name": "vol", "writable": False}
        if base is not None:
            export["bitmaps"] = [FROZEN]
        mon.cmd("block-export-add", **export)
        return base

    def reader(self, base: BackupEntry | None) -> NbdReader:
        def connect(contexts: list[str]) -> NBDClient:
            return NBDClient.connect_unix(self.socket, "vol", contexts)

        return NbdReader(self.path, self.size, FROZEN if base is not None else None, connect)


def _read_by_bitmap(
    repo: Repository,
    path: str,
    bitmap: str,
    *,
    full: bool,
    parent: str | None,
    run: Callable[[NbdReader, BackupEntry | None, Callable[[], None]], BackupResult],
    image: BitmapImage | None,
) -> BackupResult:
    """Hold the image in a private daemon (``image`` when the caller started it early),
    settle its bitmaps, and ``run`` the read on it (with a callback for when every chunk is
    read: the daemon is told to stop then); the image is free again on return."""
    if image is None or image.path != path or image.name != bitmap:
        if image is not None:
            image.close()
        image = BitmapImage(path, bitmap)
    try:
        image.open()
    except (qemu.QemuError, MonitorError) as exc:
        raise VolumeError(path=path, detail=str(exc)) from None
    try:
        try:
            base = image.prepare(repo, full=full, parent=parent)
            reader = image.reader(base)
        except (qemu.QemuError, MonitorError) as exc:
            raise VolumeError(path=path, detail=str(exc)) from None
        failpoint("backup.exported")

        def done() -> None:  # every chunk read: the daemon writes the bitmaps back meanwhile
            reader.close()
            image.release()

        try:
            return run(reader, base, done)
        except NBDError as exc:
            gone = "" if image.daemon.running() else " (qemu-storage-daemon died)"
            raise VolumeError(path=path, detail=f"reading the image failed{gone}: {exc}") from None
        finally:
            reader.close()
    finally:
        image.close()


@contextlib.contextmanager
def early_bitmap_image(
    volume_path: str, bitmap: str | None, volume_format: str | None = None
) -> Iterator[BitmapImage | None]:
    """For a ``--bitmap`` backup of a qcow2 volume: its daemon, started now and not waited
    for, so that it opens the image while the caller does other work (the CLI derives the
    repository's key meanwhile: scrypt releases the GIL); give it to :func:`backup_volume`.
    None without a bitmap, for a raw volume, or when the daemon cannot start (backup_volume
    then says why). Stopped on leaving, if the backup has not."""
    if not bitmap:
        yield None
        return
    path, fmt = probe_volume(volume_path, volume_format)
    image = BitmapImage(path, bitmap) if fmt == "qcow2" else None
    try:
        if image is not None:
            image.start()
    except qemu.QemuError:
        image = None
    try:
        yield image
    finally:
        if image is not None:
            image.close()


def _rotate_offline(path: str, name: str, repo: Repository, manifest_id: str) -> None:
    """The rotation after commit, in a second private daemon (the image was free since the read)."""
    with qemu.QemuStorageDaemon(path) as daemon, Monitor(daemon.qmp_socket) as mon:
        rotate_bitmap(mon, daemon.node, name, repo, manifest_id, "backup.bitmap_marked")
        failpoint("backup.bitmap_rotated")


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
    image: BitmapImage | None = None,
) -> BackupResult:
    """Back ``volume_path`` up into ``repo`` and return what was done; ``volume_format``
    (raw or qcow2) when known, else detected from the volume's header; ``image``: the
    daemon :func:`early_bitmap_image` started for it."""
    if full and parent:
        raise UsageError(detail="--full and --parent exclude each other")
    started = time.monotonic()
    with repository_lock(repo.backend, "shared", f"backup of {volume_path}", wait=lock_wait):
        repo.refresh_index()
        path, fmt = probe_volume(volume_path, volume_format)
        if bitmap:
            if fmt != "qcow2":
                raise VolumeError(path=volume_path, detail="dirty bitmaps need a qcow2 image; this one is raw")

            def read(reader: NbdReader, base: BackupEntry | None, done: Callable[[], None]) -> BackupResult:
                plan = choose_plan(repo, reader, full=full, parent_id=parent, bitmap_base=base)
                return run_plan(repo, reader, plan, name, metadata or {}, bitmap, started, progress, done)

            result = _read_by_bitmap(repo, path, bitmap, full=full, parent=parent, run=read, image=image)
        else:
            reader = open_reader(path, None, fmt)
            try:
                plan = choose_plan(repo, reader, full=full, parent_id=parent, bitmap_base=None)
                result = run_plan(repo, reader, plan, name, metadata or {}, bitmap, started, progress)
            finally:
                reader.close()
    if bitmap:
        failpoint("backup.image_released")
        try:
            _rotate_offline(path, bitmap, repo, result.id)
        except (qemu.QemuError, MonitorError) as exc:  # the next backup merges NAME.next back
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
    read_done: Callable[[], None] | None = None,
) -> BackupResult:
    """Read ``plan``'s chunks, store the new ones, write the manifest. ``read_done`` runs once
    every chunk is read, while the last ones are still being stored."""
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
        if read_done is not None:
            read_done()
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
