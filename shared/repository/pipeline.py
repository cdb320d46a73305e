"""A bounded, ordered parallel map: the engine's only concurrency primitive.

Chunk work (read, hash, compress, encrypt, store) runs on a few threads; BLAKE3, zstd, AES
and file I/O release the GIL, so two cores are busy. At most ``window`` items are in flight,
so memory is bounded by ``window`` chunks whatever the volume's size.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(2, min(8, (os.cpu_count() or 2) + 1))


def parallel_map(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int | None = None, window: int | None = None
) -> Iterator[R]:
    """``fn`` over ``items`` on ``workers`` threads, results in input order. The first error
    cancels what has not started and is raised to the caller."""
    workers = workers or default_workers()
    window = window or workers * 2
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chunk") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
