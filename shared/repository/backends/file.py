"""The ``file`` backend: a local or mounted folder.

Objects are files below the root; ``put`` writes ``tmp/<random>``, fdatasyncs it and renames
it into place (borgstore ``posixfs``; with ``overwrite=False`` it hard-links instead, which
fails when the name exists, so two writers never replace each other's object), so a crash never
leaves a half object under a real key;
``flush`` fsyncs the folders that gained names, once per folder instead of once per object,
several folders at once.
Objects of ``DIRECT_MIN`` bytes or more (chunks) are written with ``O_DIRECT`` from reused
page-aligned buffers where the file system takes it: a buffered write first-touches fresh
page-cache pages, ~3 ms of system time a MiB on the VM this was measured on (a fifth of a full
backup's CPU), and the data is synced at once anyway.
A chunk sealed in a buffer :meth:`FileBackend.lend_buffer` lent is not written by ``begin_put``:
the buffer goes with the call it returns, which makes the temporary file, writes it, gives the
buffer back to the backend's pool, then flushes and names the file (on a
:class:`~shared.repository.pipeline.Finisher` thread), so a chunk thread does not wait on the
device (it did 45 % of its time, issue 20); the thread gets a spare buffer in its place. The
pool holds one buffer a borrowing thread plus at most ``SPARE_BUFFERS``; when every spare is
out, ``begin_put`` writes the chunk at once from the thread's own buffer, as it lies, and
nothing waits for a buffer.
``tmp/`` is listed like any prefix so that garbage collection can remove what a killed
writer left there.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

from shared.errors import BackendError, BackendUnavailable, ObjectNotFound, StorageFull, UsageError

from .base import Backend, Buffer, ObjectInfo
from .registry import BackendType, register

_TRANSIENT = {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE}
FULL = {errno.ENOSPC, errno.EDQUOT}  # out of space or over a quota: StorageFull
DIRECT_MIN = 256 * 1024  # objects at least this large are written with O_DIRECT (see above)
DIRECT_PIECE = 1024 * 1024  # written at a time through a thread's aligned buffer
DIRECT_ALIGN = 4096  # O_DIRECT's buffer address and length alignment (any block size up to 4 KiB)
FLUSH_THREADS = 8  # folders fsynced at once by flush (see FileBackend.flush)
SPARE_BUFFERS = 2
"""Lent buffers beyond one a borrowing thread (see the module doc): the writes in flight
without a chunk thread waiting on them. Each is chunk-sized (4 MiB + 4 KiB by default), so a
backup holds at most 8 MiB more than when every chunk thread wrote its own buffer (4 spares,
16 MiB, took the bitmap path's 2 GiB full backup to 128.4 MiB, over the 128 MiB bound)."""


def os_error(location: str, exc: OSError, what: str) -> BackendError:
    """Our error for an OSError on ``what`` that is not a missing file: StorageFull for a full
    disk or quota, BackendUnavailable for a transient one, else BackendError."""
    detail = f"{what}: {exc.strerror or exc}"
    if exc.errno in FULL:
        return StorageFull(location=location, detail=detail)
    if exc.errno in _TRANSIENT:
        return BackendUnavailable(location=location, detail=detail)
    return BackendError(location=location, detail=detail)


def _address(view: memoryview) -> int:
    """The address of a writable, non-empty buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _sync_folder(folder: Path) -> None:
    """fsync a folder: the names linked into it are durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exists() -> bool:
    """A put with ``overwrite=False`` of a key that is there already."""
    return False


def _aligned_size(size: int) -> int:
    return -(-size // DIRECT_ALIGN) * DIRECT_ALIGN


class _Loan:
    """The buffer one thread was lent (see :class:`_BufferPool`), given back when the thread
    ends."""

    __slots__ = ("buffer", "pool")

    def __init__(self, pool: _BufferPool) -> None:
        self.pool = pool
        self.buffer: mmap.mmap | None = None

    def __del__(self) -> None:
        self.pool.leave(self.buffer)


class _BufferPool:
    """The page-aligned buffers (anonymous mmaps, all as large as the largest size asked for)
    that :meth:`FileBackend.lend_buffer` lends: one to each borrowing thread, which keeps it,
    and at most ``spares`` more, being written from or free here. :meth:`hand_over` gives the
    thread one of those for the buffer it filled, so that the filled one can be written while
    the thread goes on; with none to spare it says no at once, and the thread writes its own
    buffer as it lies, then reuses it. Nothing ever waits for a buffer, so a write that is
    never completed (a call dropped on an error path) costs a spare, never a thread."""

    def __init__(self, spares: int) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._free: list[mmap.mmap] = []
        self._count = 0  # buffers that exist: a thread's, being written from, or free
        self._borrowers = 0  # threads with a loan (alive)
        self._size = 0  # every buffer's size from now on
        self._spares = spares

    def _loan(self) -> _Loan:
        loan: _Loan | None = getattr(self._local, "loan", None)
        if loan is None:
            loan = self._local.loan = _Loan(self)
            with self._lock:
                self._borrowers += 1
        return loan

    def lend(self, size: int) -> memoryview:
        """A view of ``size`` bytes of this thread's buffer (made, or replaced by a larger
        one, as needed)."""
        loan = self._loan()
        buffer = loan.buffer
        if buffer is None or len(buffer) < size:
            with self._lock:
                if buffer is not None:  # too small: it goes with its last view
                    self._count -= 1
                self._size = max(self._size, _aligned_size(size))
                buffer = loan.buffer = self._take()
        return memoryview(buffer)[:size]

    def _take(self) -> mmap.mmap:
        """A free buffer of the current size, else a new one (under the lock)."""
        while self._free:
            buffer = self._free.pop()
            if len(buffer) >= self._size:
                return buffer
            self._count -= 1  # smaller than what is asked for now
        buffer = mmap.mmap(-1, self._size)  # anonymous: page-aligned
        self._count += 1
        return buffer

    def lent(self, view: memoryview) -> mmap.mmap | None:
        """This thread's buffer when ``view`` is a view of it from its first byte (as
        :meth:`lend` lends it), else None."""
        loan: _Loan | None = getattr(self._local, "loan", None)
        lent = loan.buffer if loan is not None else None
        if lent is None or view.obj is not lent or not view or view.readonly:
            return None
        with memoryview(lent) as whole:
            return lent if _address(whole) == _address(view) else None

    def hand_over(self) -> bool:
        """Whether this thread's buffer (as :meth:`lent` found it) is the caller's now, to write
        from and then :meth:`give_back`: True when a spare took its place as the thread's
        buffer, False (at once) when every spare is out."""
        loan = self._loan()
        with self._lock:
            if not self._free and self._count >= self._borrowers + self._spares:
                return False
            loan.buffer = self._take()
        return True

    def give_back(self, buffer: mmap.mmap) -> None:
        """A handed-over buffer whose write is over: free for the next :meth:`hand_over`, or
        gone when fewer threads borrow now (or it is smaller than what is asked for now)."""
        with self._lock:
            if self._borrowers and self._count <= self._borrowers + self._spares and len(buffer) >= self._size:
                self._free.append(buffer)
            else:
                self._count -= 1

    def leave(self, buffer: mmap.mmap | None) -> None:
        """A borrowing thread ended, holding ``buffer``."""
        with self._lock:
            self._borrowers -= 1
            if not self._borrowers:  # nobody borrows: the free buffers go
                self._count -= len(self._free)
                self._free.clear()
        if buffer is not None:
            self.give_back(buffer)


class FileBackend(Backend):
    """Objects as files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.location = str(self.root)
        self._made: set[Path] = set()
        self._unsynced: set[Path] = set()
        self._lock = threading.Lock()
        self._direct = True  # until the file system refuses O_DIRECT once
        self._aligned = threading.local()  # each writing thread's piece buffer for O_DIRECT
        self._buffers = _BufferPool(SPARE_BUFFERS)  # what lend_buffer lends

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise BackendError(location=self.location, detail=f"invalid key {key!r}")
        return self.root / key

    def _error(self, exc: OSError, key: str) -> BackendError:
        if exc.errno == errno.ENOENT:
            return ObjectNotFound(location=self.location, key=key)
        return os_error(self.location, exc, key)

    def _mkdir(self, folder: Path) -> None:
        """Make ``folder`` below the root, never the root itself: a storage whose folder
        vanished (a failed disk, an unmounted share) fails instead of quietly growing a new
        one on whatever is mounted there now."""
        if folder in self._made:
            return
        path = self.root
        os.stat(path)  # FileNotFoundError when the root is gone
        for part in folder.relative_to(self.root).parts:
            path = path / part
            path.mkdir(exist_ok=True)
        self._made.add(folder)

    def create(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(exc, "(create)") from None

    def put(self, key: str, data: Buffer, *, overwrite: bool = True) -> None:
        self.begin_put(key, data, overwrite=overwrite)()

    def begin_put(self, key: str, data: Buffer, *, overwrite: bool = True) -> Callable[[], object]:
        """Write ``data`` into a new temporary file; the call returned flushes it
        (:meth:`install_tmp`: fdatasync, the slow part on a busy disk) and links it as ``key``.
        ``data`` in this thread's lent buffer (:meth:`lend_buffer`) is not written now when a
        spare buffer can take its place: it goes with the call returned, which makes the
        temporary file and writes it first (:meth:`_write_lent`); with every spare out it is
        written now, as it lies."""
        path = self._path(key)
        if not overwrite and path.exists():
            return _exists
        view = memoryview(data).cast("B")
        lent = self._buffers.lent(view) if len(view) >= DIRECT_MIN else None
        if lent is not None and self._buffers.hand_over():
            return functools.partial(self._write_lent, key, view, lent, overwrite)
        fd, tmp = self._written_tmp(key, view, lent)
        return functools.partial(self.install_tmp, fd, tmp, key, overwrite=overwrite)

    def _write_lent(self, key: str, view: memoryview, lent: mmap.mmap, overwrite: bool) -> bool:
        """Write ``view`` (a view of ``lent`` from its first byte) into a new temporary file,
        give ``lent`` back to the pool once nothing writes from it any more (written or
        failed: before the flush, which needs no buffer), then install the file
        (:meth:`install_tmp`)."""
        try:
            fd, tmp = self._written_tmp(key, view, lent)
        finally:
            self._buffers.give_back(lent)
        return self.install_tmp(fd, tmp, key, overwrite=overwrite)

    def _written_tmp(self, key: str, view: memoryview, lent: mmap.mmap | None) -> tuple[int, Path]:
        """A new temporary file for ``key`` (:meth:`open_tmp`) holding ``view``'s bytes, not
        yet flushed; removed again when the write fails."""
        fd, tmp = self.open_tmp(key)
        try:
            self._write(fd, view, lent)
        except OSError as exc:
            self.discard_tmp(fd, tmp)
            raise self._error(exc, key) from None
        return fd, tmp

    def _write(self, fd: int, view: memoryview, lent: mmap.mmap | None) -> None:
        """Write ``view`` into the new, empty file ``fd``: with O_DIRECT when it is large
        enough and the file system takes it, else through the page cache."""
        if len(view) >= DIRECT_MIN and self._direct and self._write_direct(fd, view, lent):
            return
        while view:
            view = view[os.write(fd, view) :]

    def lend_buffer(self, size: int) -> memoryview | None:
        """A view of ``size`` bytes of this thread's page-aligned buffer from the backend's
        pool (an anonymous mmap) for objects :meth:`begin_put` writes with O_DIRECT: written
        from where it lies, with no copy into the piece buffer, by the call ``begin_put``
        returns (or by ``begin_put`` itself when no spare buffer is free, see
        :class:`_BufferPool`). None for smaller objects or where O_DIRECT was refused. Never
        waits."""
        if size < DIRECT_MIN or not self._direct:
            return None
        return self._buffers.lend(size)

    def _write_direct(self, fd: int, view: memoryview, lent: mmap.mmap | None) -> bool:
        """Write ``view`` into the new, empty file ``fd`` with O_DIRECT, from page-aligned
        buffers (:meth:`_aligned_pieces`), the last piece zero-padded to the alignment, then
        the file cut back to its size. False (nothing written) when the file system refuses
        O_DIRECT; this backend then writes through the page cache from now on."""
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct = False
            return False
        try:
            for start, source, padded in self._aligned_pieces(view, lent):
                with memoryview(source) as whole:
                    out = whole[:padded]
                    try:
                        while out:
                            out = out[os.write(fd, out) :]
                    except OSError as exc:
                        if exc.errno != errno.EINVAL or start or len(out) != padded:
                            raise
                        self._direct = False  # refused before anything was written
                        return False
                    finally:
                        out.release()
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        os.ftruncate(fd, len(view))
        return True

    def _aligned_pieces(self, view: memoryview, lent: mmap.mmap | None) -> Iterator[tuple[int, mmap.mmap, int]]:
        """``view``'s bytes in page-aligned buffers, in order: each piece's offset, its buffer
        and the length to write from it (zero-padded to ``DIRECT_ALIGN``). The whole object
        as it lies when ``view`` is a view of the lent buffer ``lent`` from its first byte
        (:meth:`lend_buffer`), else a ``DIRECT_PIECE`` at a time copied into this thread's
        piece buffer: memory grows by one piece a writing thread, not by an object."""
        if lent is not None:
            padded = _aligned_size(len(view))
            lent[len(view) : padded] = bytes(padded - len(view))
            yield 0, lent, padded
            return
        buffer: mmap.mmap | None = getattr(self._aligned, "buffer", None)
        if buffer is None:
            buffer = self._aligned.buffer = mmap.mmap(-1, DIRECT_PIECE)  # anonymous: page-aligned
        for start in range(0, len(view), DIRECT_PIECE):
            piece = view[start : start + DIRECT_PIECE]
            padded = _aligned_size(len(piece))
            buffer[: len(piece)] = piece
            buffer[len(piece) : padded] = bytes(padded - len(piece))
            yield start, buffer, padded

    def open_tmp(self, key: str) -> tuple[int, Path]:
        """A new temporary file (descriptor and path) to write ``key``'s bytes into before
        :meth:`install_tmp`; what the storage server streams a request body into."""
        path = self._path(key)
        tmp = self.root / "tmp" / uuid.uuid4().hex
        try:
            self._mkdir(tmp.parent)
            self._mkdir(path.parent)
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640), tmp
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # the root itself vanished
                raise BackendError(location=self.location, detail=f"{key}: folder missing") from None
            raise self._error(exc, key) from None

    def discard_tmp(self, fd: int, tmp: Path) -> None:
        """Close and remove a temporary file that will not be installed."""
        with contextlib.suppress(OSError):
            os.close(fd)
        tmp.unlink(missing_ok=True)

    def install_tmp(self, fd: int, tmp: Path, key: str, *, overwrite: bool = True) -> bool:
        """fdatasync and close ``fd``, then move ``tmp`` to ``key``: a rename, or with
        ``overwrite=False`` a hard link that fails when ``key`` exists, so two writers never
        replace each other's object. False (and ``tmp`` removed) when ``key`` existed."""
        path = self._path(key)
        try:
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if overwrite:
                os.rename(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    tmp.unlink(missing_ok=True)
                    return False
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                        raise
                    if path.exists():  # a store without hard links: check, then rename
                        tmp.unlink(missing_ok=True)
                        return False
                    os.rename(tmp, path)
                else:
                    tmp.unlink()
            with self._lock:
                self._unsynced.add(path.parent)
            return True
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOENT:  # the root itself vanished
                raise BackendError(location=self.location, detail=f"{key}: folder missing") from None
            raise self._error(exc, key) from None

    def flush(self) -> None:
        """fsync every folder that gained names since the last flush, several at once
        (``FLUSH_THREADS``): each folder's fsync waited on a journal commit of its own
        (2.2 ms on the 2-core VM measured), so a full backup's 200-odd chunk folders took
        0.15-0.5 s one after the other at its end, 0.06-0.08 s at once (concurrent fsyncs
        share commits). On an error every folder stays to be synced by the next flush."""
        with self._lock:
            folders, self._unsynced = self._unsynced, set()
        try:
            if len(folders) <= 1:
                for folder in folders:
                    _sync_folder(folder)
            else:
                threads = min(FLUSH_THREADS, len(folders))
                with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flush") as pool:
                    for _ in pool.map(_sync_folder, folders):
                        pass
        except OSError as exc:
            with self._lock:
                self._unsynced |= folders
            if exc.errno == errno.ENOENT:
                raise BackendError(location=self.location, detail="folder missing") from None
            raise self._error(exc, "(flush)") from None

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as handle:
                if offset:
                    handle.seek(offset)
                return handle.read() if length is None else handle.read(length)
        except OSError as exc:
            raise self._error(exc, key) from None

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except OSError as exc:
            raise self._error(exc, key) from None
        return ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise self._error(exc, key) from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # "" lists everything: the root itself, never its parent
        base = self.root / prefix if not prefix or prefix.endswith("/") else (self.root / prefix).parent
        if not base.is_dir():
            return
        root_len = len(str(self.root)) + 1
        for folder, _dirs, files in os.walk(base):
            for name in files:
                full = os.path.join(folder, name)
                key = full[root_len:]
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime)

    def capacity(self) -> tuple[int, int] | None:
        try:
            usage = shutil.disk_usage(self.root)
        except OSError as exc:
            raise self._error(exc, "(capacity)") from None
        return usage.total, usage.free

    def missing(self, keys: Iterable[str]) -> set[str]:
        return {key for key in keys if not os.path.exists(self._path(key))}


def open_file(location: str, options: Mapping[str, str | None]) -> FileBackend:
    """The backend of a folder: a plain path or ``file:///path`` (it takes no options)."""
    parsed = urlparse(location)
    path = parsed.path if parsed.scheme == "file" else location
    if not path:
        raise UsageError(detail=f"repository location {location!r} names no folder")
    return FileBackend(Path(path))


def check_image_store_url(url: str) -> str | None:
    """Why ``url`` is no ImageStore URL (it must name an absolute folder), or None."""
    return None if urlparse(url).path.startswith("/") else f"ImageStore url must be file:///absolute/path, got {url!r}"


ENTRY = register(
    BackendType(
        "ImageStore",
        ("file",),
        open_file,
        url_form="file:///abs/path",
        plain_paths=True,
        check_url=check_image_store_url,
    )
)
