"""Volumes: reading a raw or qcow2 volume for backup, writing one on restore.

Raw files are read with ``pread`` and their holes found with SEEK_DATA/SEEK_HOLE; qcow2 images
are read through ``qemu-nbd`` (one NBD connection per thread) with their allocation map and
dirty bitmaps from NBD block status, never converted to a temporary raw file. Writers create
the target under a temporary name and link it into place only when every byte is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import mmap
import os
import stat
import struct
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from shared.errors import TargetExists, VolumeError

from . import qemu
from .allocation import Preallocation, libc
from .backends.base import Buffer
from .nbd import STATE_ZERO, NBDClient
from .pipeline import default_workers

Extent = tuple[int, int]
log = logging.getLogger(__name__)
# one NBD connection per thread that touches a volume: the pipeline's workers and the caller
NBD_CONNECTIONS = default_workers() + 4


class VolumeReader(Protocol):
    path: str
    format: str
    size: int

    def data_extents(self) -> list[Extent]:
        """Regions that may hold non-zero data; everything else reads as zeros."""

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at ``offset``; thread-safe."""

    def close(self) -> None: ...


def check_volume_path(path: str) -> Path:
    """``path`` as an absolute path to a readable regular file or block device."""
    volume = Path(path)
    try:
        st = volume.stat()
    except FileNotFoundError:
        raise VolumeError(path=path, detail="no such file") from None
    except OSError as exc:
        raise VolumeError(path=path, detail=exc.strerror or str(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        raise VolumeError(path=path, detail="is a folder, not a volume file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise VolumeError(path=path, detail="is not a regular file or block device")
    if not os.access(volume, os.R_OK):
        raise VolumeError(path=path, detail="is not readable")
    return volume.absolute()


def check_block_device(path: str) -> Path:
    """``path`` as an existing block device (an in-place restore's target)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise VolumeError(path=path, detail=exc.strerror or str(exc)) from None
    if not stat.S_ISBLK(mode):
        raise VolumeError(path=path, detail="an in-place restore needs a block device")
    return Path(path)


class RawReader:
    """A raw image or block device."""

    format = "raw"
    served_copies = 0  # chunk-sized buffers a read holds in another process (see NbdReader)

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.lseek(self._fd, 0, os.SEEK_END)
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def data_extents(self) -> list[Extent]:
        extents: list[Extent] = []
        offset = 0
        while offset < self.size:
            try:
                start = os.lseek(self._fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    break
                if exc.errno == errno.EINVAL:  # no SEEK_DATA support: all data
                    return [(0, self.size)] if self.size else []
                raise
            end = os.lseek(self._fd, start, os.SEEK_HOLE)
            extents.append((start, min(end, self.size) - start))
            offset = end
        return extents

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise VolumeError(path=self.path, detail=f"short read at {offset} (file shrank while read)")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class NbdReader:
    """A volume read through an NBD export (one connection per thread): its allocation map
    from ``base:allocation`` and, with ``bitmap``, its dirty extents from
    ``qemu:dirty-bitmap:BITMAP``. ``connect`` opens a connection negotiating the contexts."""

    # a read in flight also holds its bytes in qemu-nbd's request buffer (measured: 8 MiB idle,
    # 25 MiB with four 4 MiB reads in flight): counted in the pipeline's memory budget
    served_copies = 1

    def __init__(
        self,
        path: str,
        size: int,
        bitmap: str | None,
        connect: Callable[[list[str]], NBDClient],
        fmt: str = "qcow2",
    ) -> None:
        self.path = path
        self.format = fmt
        self.size = size
        self.bitmap = bitmap
        self._connect = connect
        self._local = threading.local()
        self._clients: list[NBDClient] = []
        self._lock = threading.Lock()

    def _client(self) -> NBDClient:
        client: NBDClient | None = getattr(self._local, "client", None)
        if client is None:
            contexts = ["base:allocation"]
            if self.bitmap:
                contexts.append(f"qemu:dirty-bitmap:{self.bitmap}")
            client = self._connect(contexts)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def data_extents(self) -> list[Extent]:
        return _merge(
            (offset, length)
            for offset, length, flags in self._client().block_status("base:allocation")
            if not flags & STATE_ZERO
        )

    def dirty_extents(self) -> list[Extent]:
        assert self.bitmap
        context = f"qemu:dirty-bitmap:{self.bitmap}"
        return _merge((off, length) for off, length, flags in self._client().block_status(context) if flags & 1)

    def read(self, offset: int, length: int) -> bytes:
        return self._client().read(offset, length)

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()


class Qcow2Reader(NbdReader):
    """A qcow2 image exported by a private read-only qemu-nbd."""

    def __init__(self, path: str, bitmap: str | None = None) -> None:
        self._server = qemu.QemuNbdServer(path, read_only=True, bitmap=bitmap, shared=NBD_CONNECTIONS)
        self._server.__enter__()
        super().__init__(path, 0, bitmap, self._server.connect)
        try:  # the export's size is the image's virtual size: no qemu-img info needed
            self.size = self._client().size
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        super().close()
        self._server.__exit__(None, None, None)


def _merge(extents: Iterable[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for offset, length in extents:
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        elif length:
            merged.append((offset, length))
    return merged


@functools.lru_cache(maxsize=4)
def zeros(length: int) -> bytes:
    """``length`` zero bytes, cached: comparing against it is one memcmp."""
    return bytes(length)


def probe_volume(path: str, fmt: str | None = None) -> tuple[str, str]:
    """The absolute path and format ("raw" or "qcow2") of the volume at ``path``: ``fmt``
    when the caller knows it (the service does: a guest that writes a qcow2 header into its
    raw disk must not make the backup open it as an image with a backing file), else
    detected from the header (the repository CLI)."""
    volume = str(check_volume_path(path))
    if fmt is not None:
        if fmt not in ("raw", "qcow2"):
            raise VolumeError(path=path, detail=f"format must be raw or qcow2, not {fmt!r}")
        return volume, fmt
    try:
        return volume, qemu.detect_format(volume)
    except OSError as exc:
        raise VolumeError(path=path, detail=exc.strerror or str(exc)) from None


def open_reader(path: str, bitmap: str | None = None, fmt: str | None = None) -> RawReader | Qcow2Reader:
    """A reader for the volume at ``path`` in format ``fmt`` (detected from its header when
    not given)."""
    volume, fmt = probe_volume(path, fmt)
    if fmt == "qcow2":
        try:
            return Qcow2Reader(volume, bitmap)
        except qemu.QemuError as exc:
            raise VolumeError(path=path, detail=str(exc)) from None
    if bitmap:
        raise VolumeError(path=path, detail="dirty bitmaps need a qcow2 image; this one is raw")
    return RawReader(volume)


def chunk_indexes(extents: Sequence[Extent], chunk_size: int) -> set[int]:
    """The chunk numbers that ``extents`` touch."""
    touched: set[int] = set()
    for offset, length in extents:
        if length > 0:
            touched.update(range(offset // chunk_size, (offset + length - 1) // chunk_size + 1))
    return touched


# -- writers ------------------------------------------------------------------------------
class VolumeWriter(Protocol):
    def buffer(self, size: int) -> contextlib.AbstractContextManager[memoryview]:
        """A writable buffer of ``size`` bytes to decode a chunk into and then pass to
        :meth:`write` with ``lent=True`` (for a raw file or device: page-aligned, written
        with O_DIRECT as it is, no copy); reused once the block ends."""

    def write(self, offset: int, data: Buffer, *, lent: bool = False) -> None:
        """Write ``data`` at ``offset``; ``lent``: ``data`` is (the start of) a view that
        :meth:`buffer` gave."""

    def commit(self) -> None: ...
    def abort(self) -> None: ...


def _temporary_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")


def _check_target(target: Path) -> None:
    if target.exists() or target.is_symlink():
        raise TargetExists(path=str(target))
    if not target.parent.is_dir():
        raise VolumeError(path=str(target), detail="its folder does not exist")


def _link_into_place(tmp: Path, target: Path) -> None:
    try:
        os.link(tmp, target)  # fails if the target appeared meanwhile: never clobber
    except FileExistsError:
        raise TargetExists(path=str(target)) from None
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


ZERO_BLOCK = 64 * 1024
_ZEROS = bytes(ZERO_BLOCK)


def nonzero_runs(data: Buffer) -> list[Extent]:
    """(offset, length) of the runs of ``data`` that are not all-zero 64 KiB blocks.

    Each block is tested with ``startswith`` (one memcmp, no copy): zero bytes start with the
    block exactly when it is all zeros. (Comparing a memoryview with bytes goes byte by byte
    in CPython, 12 ms for an all-zero 4 MiB chunk against 0.1 ms.)"""
    view = memoryview(data)
    runs: list[Extent] = []
    start = -1
    size = len(view)
    for pos in range(0, size, ZERO_BLOCK):
        end = min(pos + ZERO_BLOCK, size)
        zero = _ZEROS.startswith(view[pos:end])
        if not zero and start < 0:
            start = pos
        elif zero and start >= 0:
            runs.append((start, pos - start))
            start = -1
    if start >= 0:
        runs.append((start, size - start))
    return runs


_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a just-written range to disk in the background (sync_file_range), so the
    final fsync finds little left to do and the disk works while chunks are still decoded."""
    if libc is not None:
        libc.sync_file_range(fd, ctypes.c_longlong(offset), ctypes.c_longlong(length), _SYNC_FILE_RANGE_WRITE)


DIRECT_ALIGN = 4096  # offsets, lengths and buffer addresses of O_DIRECT writes (any logical block size up to 4 KiB)


class _AlignedBuffers:
    """Page-aligned buffers (anonymous mmaps) that O_DIRECT can write from, lent to one thread
    at a time and reused: at most one per writing thread exists, so memory stays bounded."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[mmap.mmap] = []
        self._all: list[mmap.mmap] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lend(self) -> Iterator[mmap.mmap]:
        with self._lock:
            buffer = self._free.pop() if self._free else None
        if buffer is None:
            buffer = mmap.mmap(-1, self.size)
            with self._lock:
                self._all.append(buffer)
        try:
            yield buffer
        finally:
            with self._lock:
                self._free.append(buffer)

    def close(self) -> None:
        with self._lock:
            for buffer in self._all:
                with contextlib.suppress(BufferError):  # a view still held by a failing thread
                    buffer.close()
            self._all.clear()
            self._free.clear()


class _PositionedWrites:
    """Positioned writes of chunks into one file or device, from any thread.

    Chunks are written with ``O_DIRECT`` from page-aligned buffers where the file system takes
    it: the data goes from the buffer to the disk without passing through the page cache, whose
    first touch of every page costs more on this kind of machine than the disk write itself
    (2.8 s of system time a GiB against 0.76 s for the whole direct write), and the final fsync
    has only metadata and the disk's cache left to flush. Where ``O_DIRECT`` is refused
    (tmpfs, some network file systems: ``EINVAL`` at open or on a write), and for a last block
    shorter than ``DIRECT_ALIGN``, the bytes go through the page cache with writeback started
    at once. ``fd`` stays the caller's; a second, direct descriptor is opened on ``path``."""

    def __init__(self, fd: int, path: Path, *, direct: bool) -> None:
        self.fd = fd
        self.path = path
        self._lock = threading.Lock()
        self._buffers: _AlignedBuffers | None = None
        self._direct_fd = _open_direct(path) if direct else -1
        self.direct = self._direct_fd >= 0

    @contextlib.contextmanager
    def lend(self, size: int) -> Iterator[memoryview]:
        """A page-aligned buffer of ``size`` bytes for this thread until the block ends: what
        is decoded into it is written by :meth:`write` with ``lent=True`` without a copy."""
        buffers = self._aligned(size)
        with buffers.lend() as buffer:
            view = memoryview(buffer)[:size]
            try:
                yield view
            finally:
                view.release()

    def _aligned(self, size: int) -> _AlignedBuffers:
        with self._lock:
            if self._buffers is None or self._buffers.size < size:
                self._buffers = _AlignedBuffers(max(size, 4 * 1024 * 1024))
            return self._buffers

    def write(self, offset: int, data: Buffer, runs: list[Extent], *, lent: bool = False) -> None:
        """Write the ``runs`` (offset, length within ``data``) of ``data`` at ``offset``;
        ``lent``: ``data`` starts a buffer from :meth:`lend` (page-aligned: written as it is)."""
        if not runs:
            return
        if self.direct and offset % DIRECT_ALIGN == 0:
            if lent:
                if self._write_runs_direct(offset, memoryview(data), runs):
                    return
            elif self._write_direct(offset, data, runs):
                return
        view = memoryview(data)
        for start, length in runs:
            _pwrite_all(self.fd, view[start : start + length], offset + start)
        _start_writeback(self.fd, offset, len(data))

    def _write_direct(self, offset: int, data: Buffer, runs: list[Extent]) -> bool:
        """Write ``runs`` with O_DIRECT (an unaligned tail buffered); False when the file system
        refuses O_DIRECT: the caller then writes the whole chunk again, buffered."""
        with self._aligned(len(data)).lend() as buffer:
            buffer[: len(data)] = data
            view = memoryview(buffer)
            try:
                return self._write_runs_direct(offset, view, runs)
            finally:
                view.release()

    def _write_runs_direct(self, offset: int, view: memoryview, runs: list[Extent]) -> bool:
        """Write ``runs`` of the page-aligned ``view`` with O_DIRECT (an unaligned tail
        buffered); False when the file system refuses O_DIRECT."""
        for start, length in runs:
            aligned = length // DIRECT_ALIGN * DIRECT_ALIGN
            if aligned:
                try:
                    _pwrite_all(self._direct_fd, view[start : start + aligned], offset + start)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._stop_direct()
                    return False
            if aligned < length:  # the volume's last, short block
                tail = start + aligned
                _pwrite_all(self.fd, view[tail : start + length], offset + tail)
        return True

    def _stop_direct(self) -> None:
        """Write through the page cache from now on (the descriptor stays open until the end:
        another thread may be writing with it)."""
        with self._lock:
            if self.direct:
                self.direct = False
                log.info("restore.direct_io_refused target=%s (writing through the page cache)", self.path)

    def close(self) -> None:
        """Close the direct descriptor and free the buffers (``fd`` is the caller's to close)."""
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        if self._buffers is not None:
            self._buffers.close()


class _DescriptorWriter:
    """What the raw file and block device writers share: a descriptor and its positioned writes."""

    _fd = -1
    _writes: _PositionedWrites | None = None

    @property
    def direct(self) -> bool:
        """Whether chunks are written with O_DIRECT (False after a fallback)."""
        return self._writes is not None and self._writes.direct

    def _close(self) -> None:
        if self._writes is not None:
            self._writes.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RawWriter(_DescriptorWriter):
    """A sparse raw file: only non-zero blocks are written, by positioned writes from the
    pipeline's threads side by side (O_DIRECT where the file system takes it, see
    :class:`_PositionedWrites`). The file's size is set first, so what is not written stays a
    hole: the output is exactly as sparse as the backup's data. ``allocate``: the runs the
    chunks will be written to (the backup's data runs), allocated before the writes so they
    go side by side (see :mod:`.allocation`); their blocks of zeros are holes again at
    :meth:`commit`."""

    def __init__(self, target: Path, size: int, *, direct: bool = True, allocate: Sequence[Extent] = ()) -> None:
        _check_target(target)
        self.target = target
        self.tmp = _temporary_name(target)
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(self._fd, size)
            self._allocation = Preallocation(self._fd, size)
            if allocate:
                self._allocation.allocate(allocate)
            self._writes = _PositionedWrites(self._fd, self.tmp, direct=direct)
        except BaseException:
            self.abort()
            raise

    @property
    def preallocated(self) -> bool:
        """Whether the data runs were allocated ahead of the writes."""
        return self._allocation.active

    def buffer(self, size: int) -> contextlib.AbstractContextManager[memoryview]:
        assert self._writes is not None
        return self._writes.lend(size)

    def write(self, offset: int, data: Buffer, *, lent: bool = False) -> None:
        assert self._writes is not None
        runs = nonzero_runs(data)
        self._writes.write(offset, data, runs, lent=lent)
        self._allocation.written(offset, len(memoryview(data)), runs)

    def commit(self) -> None:
        self._allocation.finish()
        os.fsync(self._fd)  # what went O_DIRECT is on the disk: this flushes metadata and the disk's cache
        self._close()
        _link_into_place(self.tmp, self.target)

    def abort(self) -> None:
        self._close()
        self.tmp.unlink(missing_ok=True)


def _open_direct(path: Path) -> int:
    """A second descriptor on ``path`` opened O_DIRECT, or -1 where the file system refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | flag)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        log.info("restore.direct_io_refused target=%s (writing through the page cache)", path)
        return -1


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class Qcow2Writer:
    """A new qcow2 image written through a private writable qemu-nbd."""

    def __init__(self, target: Path, size: int) -> None:
        _check_target(target)
        self.target = target
        self.tmp = _temporary_name(target)
        try:
            qemu.create_qcow2(str(self.tmp), size)
            self._server = qemu.QemuNbdServer(str(self.tmp), read_only=False, shared=NBD_CONNECTIONS)
            self._server.__enter__()
        except qemu.QemuError as exc:
            self.tmp.unlink(missing_ok=True)
            raise VolumeError(path=str(target), detail=str(exc)) from None
        self._local = threading.local()
        self._clients: list[NBDClient] = []
        self._lock = threading.Lock()
        self._open = True

    def _client(self) -> NBDClient:
        client: NBDClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._server.connect()
            with self._lock:
                self._clients.append(client)
        return client

    @contextlib.contextmanager
    def buffer(self, size: int) -> Iterator[memoryview]:
        """A buffer of this thread's, reused from chunk to chunk (its bytes go to qemu-nbd)."""
        held: bytearray | None = getattr(self._local, "buffer", None)
        if held is None or len(held) < size:
            held = self._local.buffer = bytearray(size)
        view = memoryview(held)[:size]
        try:
            yield view
        finally:
            view.release()

    def write(self, offset: int, data: Buffer, *, lent: bool = False) -> None:
        client = self._client()
        view = memoryview(data)
        for start, length in nonzero_runs(data):
            client.write(offset + start, view[start : start + length])

    def _stop(self) -> None:
        if self._open:
            self._open = False
            with self._lock:
                for client in self._clients:
                    client.flush()
                    client.close()
            self._server.__exit__(None, None, None)

    def commit(self) -> None:
        self._stop()
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _link_into_place(self.tmp, self.target)

    def abort(self) -> None:
        try:
            self._stop()
        finally:
            self.tmp.unlink(missing_ok=True)


_BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range of a block device
_ZERO_PIECE = 1024 * 1024


class DeviceWriter(_DescriptorWriter):
    """An existing block device written in place (a revert of a volume that is a device): every
    byte of the backup is written, zeros included, and :meth:`zero` clears what the backup
    holds no data for; nothing past the backup's size is touched. Opened ``O_EXCL``, so a
    device that is mounted or held open exclusively is refused. There is no temporary copy:
    a failure leaves the device partly written (the caller reports it)."""

    def __init__(self, target: Path, size: int, *, direct: bool = True) -> None:
        try:
            self._fd = os.open(target, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            raise VolumeError(path=str(target), detail=f"cannot open it for writing: {exc.strerror or exc}") from None
        self.target = target
        try:
            capacity = os.lseek(self._fd, 0, os.SEEK_END)
            if capacity < size:
                raise VolumeError(path=str(target), detail=f"the device has {capacity} bytes, the backup {size}")
            self._writes = _PositionedWrites(self._fd, target, direct=direct)
        except BaseException:
            self.abort()
            raise

    def buffer(self, size: int) -> contextlib.AbstractContextManager[memoryview]:
        assert self._writes is not None
        return self._writes.lend(size)

    def write(self, offset: int, data: Buffer, *, lent: bool = False) -> None:
        assert self._writes is not None
        self._writes.write(offset, data, [(0, len(data))], lent=lent)

    def zero(self, offset: int, length: int) -> None:
        """Zero ``length`` bytes at ``offset`` (the device's own zeroing when it has one)."""
        try:
            fcntl.ioctl(self._fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError:
            pass
        end = offset + length
        while offset < end:
            piece = min(_ZERO_PIECE, end - offset)
            self.write(offset, bytes(piece))
            offset += piece

    def commit(self) -> None:
        os.fsync(self._fd)
        self.abort()

    def abort(self) -> None:
        self._close()


def open_writer(
    target: str, size: int, fmt: str | None = None, *, allocate: Sequence[Extent] = ()
) -> RawWriter | Qcow2Writer:
    """A writer for a new volume at ``target`` in format ``fmt``; without one, qcow2 when the
    name ends in ``.qcow2``. ``allocate``: the runs that will be written (a raw file allocates
    them first, see :class:`RawWriter`)."""
    path = Path(target).absolute()
    if fmt == "qcow2" or (fmt is None and path.suffix == ".qcow2"):
        return Qcow2Writer(path, size)
    return RawWriter(path, size, allocate=allocate)
