"""A bounded, ordered parallel map: the engine's only concurrency primitive.

Chunk work (read, hash, compress, encrypt, store) runs on a few threads; BLAKE3, zstd, AES
and file I/O release the GIL, so two cores are busy. At most ``window`` items are in flight (and only ``workers`` hold
chunk data at once), so memory is bounded whatever the volume's size; a caller that says what
one item holds (``item_bytes``) also gets its threads capped to :data:`MEMORY_BUDGET`, so the
bound does not grow with the machine's core count either. Threads are counted from the CPUs the
process may use (its affinity), and a stored chunk's write and flush to disk are handed to a
:class:`Finisher`, so the few pipeline threads compute while the disk catches up. A finishing
thread holds no chunk data of its own: only the buffer the backend lent for the chunk it
writes, of which the backend keeps a few to spare (the file backend's ``SPARE_BUFFERS``: two
chunks beyond the budget, 8 MiB at the default chunk size); with none to spare, a pipeline
thread writes its chunk itself.
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


MEMORY_BUDGET = 64 * 1024 * 1024
"""Chunk data one pipeline may hold at once: with the interpreter, its modules and the
manifest (40-50 MiB) a backup or restore stays under 128 MiB on any machine (threads x what
each holds; see :func:`parallel_map`)."""

CHUNK_COPIES = 4
"""What one thread of a backup or restore holds at once, in chunks: the plain bytes (read,
or the restore's write buffer), the stored object, its compressed or decrypted form, and the
codec's contexts (zstd's, with glibc's arena of the thread: about one more)."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def tune_allocator() -> None:
    """Keep chunk-sized buffers on the heap instead of one mmap/munmap each.

    glibc serves allocations above its mmap threshold with fresh mappings that the kernel
    zeroes and faults in page by page, then unmaps on free: for 4 MiB chunks that was half of a
    backup's CPU time here (sys 1.8 s of 2.8 s on 2 GiB). Raising the threshold and the trim
    threshold lets freed chunks be reused; peak memory stays bounded by the in-flight window.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024 * 1024)
    libc.mallopt(_M_TRIM_THRESHOLD, 256 * 1024 * 1024)


FINISH_THREADS = 16
"""Threads of a :class:`Finisher`: they hold a file to write and flush and at most the
backend's spare lent buffers (see the module doc), not a share of the memory budget; several
flushes in flight share one journal commit. 16 rather than 8: a chunk's write waited behind
other chunks' flushes for a free thread, keeping its buffer from the next chunk (a 1 GiB
backup at load 5-6: chunk threads waited 8 % of their time on a buffer instead of 10-16 %)."""

FINISH_PENDING = 32
"""Calls a :class:`Finisher` holds before ``submit`` waits (each an open temporary file)."""


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's or ``taskset``'s share,
    not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Two threads a CPU this process may use: while one waits on a write or the network,
    the other computes."""
    return max(2, min(8, 2 * available_cpus()))


def _inherit(context: contextvars.Context) -> None:
    """A pool thread starts with the submitting thread's context variables (the job a log
    line belongs to, see :mod:`shared.logcontext`): threads do not inherit them otherwise."""
    for var, value in context.items():
        var.set(value)


def budget_workers(item_bytes: int, workers: int | None = None) -> int:
    """How many threads may each hold ``item_bytes`` (0: not said) within
    :data:`MEMORY_BUDGET`: ``workers`` (by default :func:`default_workers`) or fewer, at least
    one."""
    workers = workers or default_workers()
    if item_bytes > 0:
        workers = min(workers, MEMORY_BUDGET // item_bytes)
    return max(1, workers)


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int | None = None,
    window: int | None = None,
    item_bytes: int = 0,
) -> Iterator[R]:
    """``fn`` over ``items`` on ``workers`` threads, results in completion order (callers
    carry an index in the result when order matters), at most ``window`` items in flight. The
    first error cancels what has not started and is raised to the caller.

    ``item_bytes``: the most one call of ``fn`` holds while it runs (a chunk's copies and the
    codec's context): the threads are capped so that together they hold at most
    :data:`MEMORY_BUDGET`, whatever the core count. The cap is on threads, not a semaphore on
    items: a thread's own state (its codec contexts, its malloc arena) lives as long as the
    thread, and an item waiting on I/O holds its buffers anyway."""
    tune_allocator()
    workers = budget_workers(item_bytes, workers)
    window = window or workers * 2
    pending: set[Future[R]] = set()
    with ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="chunk", initializer=_inherit, initargs=(contextvars.copy_context(),)
    ) as pool:
        try:
            for item in items:
                pending.add(pool.submit(fn, item))
                if len(pending) >= window:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


class Finisher:
    """Completes started work on threads of its own: a pipeline thread hands over the call that
    finishes a stored chunk (its write from a lent buffer, its flush to disk and its name,
    :meth:`Backend.begin_put`) and takes its next item instead of waiting on the disk.

    The pipeline's threads are few (:func:`budget_workers`: each holds chunk data); a
    finishing call holds at most a lent buffer, of which the backend has only a few to spare.
    Waiting on writes and flushes there left the CPUs idle while the disk or the file system's
    journal (a kernel thread that competes for the same CPUs) was slow, which is exactly when
    the machine is busy (issue 20: 45 % of a chunk thread's time went to its O_DIRECT write).
    At most ``pending`` calls wait: beyond, :meth:`submit` waits for one to finish (the disk
    sets the pace). Leaving the ``with`` block waits for every call handed over, and raises
    the first error of one (unless the block raised); :meth:`submit` raises it too, so a
    failing store stops the work early.
    """

    def __init__(self, threads: int = FINISH_THREADS, pending: int = FINISH_PENDING) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=threads,
            thread_name_prefix="finish",
            initializer=_inherit,
            initargs=(contextvars.copy_context(),),
        )
        self._slots = threading.BoundedSemaphore(pending)
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def __enter__(self) -> Finisher:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._pool.shutdown(wait=True)
        if exc_type is None:
            self._raise()

    def _raise(self) -> None:
        with self._lock:
            error = self._error
        if error is not None:
            raise error

    def submit(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on a finishing thread; waits while ``pending`` calls wait already. Every
        call handed over runs (it closes what its work opened), even when this then raises
        an earlier call's error."""
        self._slots.acquire()
        try:
            self._pool.submit(self._run, fn)
        except BaseException:
            self._slots.release()
            raise
        self._raise()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - kept for the caller: raised by submit or on leaving
            with self._lock:
                if self._error is None:
                    self._error = exc
        finally:
            self._slots.release()
