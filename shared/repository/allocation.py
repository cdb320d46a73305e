"""Allocating a new sparse file's data ahead of its writes, its holes kept exactly.

A direct write into a hole of an ext4 file allocates blocks, and ext4 takes the file's inode
lock exclusively for it: a restore's writers then queue behind one another, each waiting for
the write before it to reach the disk (and, on a busy machine, for its thread to be scheduled
again). Into blocks allocated beforehand (unwritten extents) aligned direct writes go side by
side under a shared lock. So a raw restore allocates, before any write, the runs of chunks
the backup holds; each chunk's 64 KiB blocks of zeros (which the writer leaves unwritten) are
punched out again once the writes are done, so the file ends exactly as sparse as it would
without preallocation. Where the file system has no ``fallocate`` or cannot punch holes
(ramfs, some network file systems), or the disk has no room for whole chunks, nothing is
preallocated and the writes allocate as they go.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
from collections.abc import Iterable

Extent = tuple[int, int]
log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLOCK = 4096  # punches reaching the end of the file are rounded up to this (the file system's block, up to 4 KiB)
PUNCH_BATCH = 1024  # zero runs held before they are punched (memory stays bounded whatever the size)

libc = None  # the C library with errno kept (its calls Python's os module lacks; volume.py's sync_file_range too)
with contextlib.suppress(OSError):
    libc = ctypes.CDLL("libc.so.6", use_errno=True)

_fallocate = None
with contextlib.suppress(AttributeError):
    if libc is not None:
        _fallocate = libc.fallocate
        _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        _fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) (Python's os module has only posix_fallocate, which glibc emulates by
    writing zeros where the file system lacks it); OSError when it fails or is missing."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class Preallocation:
    """The data runs of a new file ``fd`` of ``size`` bytes allocated ahead of its writes.

    :meth:`allocate` allocates the runs (False: nothing is preallocated, see the module);
    :meth:`written` is told, for every chunk, which runs of it were written, and remembers
    the rest of the chunk for :meth:`finish` to punch out, when every write is done."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.active = False
        self._zeros: list[Extent] = []
        self._lock = threading.Lock()

    def allocate(self, extents: Iterable[Extent]) -> bool:
        """Allocate ``extents``; True when they are allocated (and holes can be punched)."""
        try:
            # a punch into the new, empty file changes nothing: it says whether holes can be made again
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, BLOCK)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            return False
        try:
            for offset, length in extents:
                fallocate(self.fd, 0, offset, length)
        except OSError as exc:
            if exc.errno not in (*_UNSUPPORTED, errno.ENOSPC, errno.EDQUOT):
                raise
            # no room for whole chunks (their zeros included) or no fallocate: free what was
            # allocated and let the writes allocate what they need
            self._punch(0, self.size)
            log.info("restore.preallocation_skipped size=%d reason=%s", self.size, os.strerror(exc.errno or 0))
            return False
        self.active = True
        return True

    def written(self, offset: int, length: int, runs: list[Extent]) -> None:
        """The chunk of ``length`` bytes at ``offset`` had ``runs`` (offset, length within it)
        written; the rest of it is to be a hole again."""
        if not self.active:
            return
        zeros: list[Extent] = []
        at = 0
        for start, run in (*runs, (length, 0)):
            if start > at:
                zeros.append((offset + at, start - at))
            at = start + run
        if not zeros:
            return
        with self._lock:
            self._zeros.extend(zeros)
            batch = self._zeros if len(self._zeros) >= PUNCH_BATCH else []
            if batch:
                self._zeros = []
        for start, run in batch:  # rare: a volume of many small zero runs
            self._punch(start, run)

    def finish(self) -> None:
        """Punch out every zero run still held (call once every write is done)."""
        with self._lock:
            batch, self._zeros = self._zeros, []
        for start, run in batch:
            self._punch(start, run)

    def _punch(self, offset: int, length: int) -> None:
        end = offset + length
        if end >= self.size:  # the file's last block goes too, however short its last part
            end = -(-self.size // BLOCK) * BLOCK
        if end > offset:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, end - offset)
