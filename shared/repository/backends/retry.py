"""One retry policy for every backend (restic ``internal/backend/retry``), with tenacity.

Only errors that say they are retryable are retried, with exponential backoff and jitter;
permanent ones (a missing object, bad credentials, an integrity failure) pass straight through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from shared.errors import BlockvaultError

from .base import Backend, Buffer, ObjectInfo

log = logging.getLogger(__name__)
T = TypeVar("T")


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, BlockvaultError) and exc.retryable


class RetryingBackend(Backend):
    """Wraps a backend so each call is retried on transient failures."""

    def __init__(self, inner: Backend, *, attempts: int = 6, max_seconds: float = 120.0) -> None:
        self.inner = inner
        self.location = inner.location
        self.foreign_writers = inner.foreign_writers
        self.lock_seconds = inner.lock_seconds
        self.attempts = attempts
        self.max_seconds = max_seconds

    def _retrying(self) -> Any:
        """tenacity's policy, built (and tenacity imported) only when a call is retried:
        importing tenacity pulls in tornado and asyncio, 0.1-0.25 s of every CLI's start-up."""
        from tenacity import (
            Retrying,
            before_sleep_log,
            retry_if_exception,
            stop_after_attempt,
            stop_after_delay,
            wait_random_exponential,
        )

        return Retrying(
            retry=retry_if_exception(_retryable),
            # the first attempt runs bare (see _call): at most ``attempts`` in all
            stop=stop_after_attempt(max(1, self.attempts - 1)) | stop_after_delay(self.max_seconds),
            wait=wait_random_exponential(multiplier=0.2, max=10),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )

    def _call(self, fn: Callable[[], T]) -> T:
        # The first attempt runs bare: building a tenacity Retrying per call cost 11-16 % of a
        # worker's CPU at 10k backups, and nearly every call succeeds the first time.
        try:
            return fn()
        except BlockvaultError as exc:
            if not exc.retryable or self.attempts < 2:
                raise
            log.warning("%s: %s; retrying", self.location, exc)
        for attempt in self._retrying():
            with attempt:
                return fn()
        raise AssertionError("unreachable")  # pragma: no cover

    def put(self, key: str, data: Buffer, *, overwrite: bool = True) -> None:
        self._call(lambda: self.inner.put(key, data, overwrite=overwrite))

    def begin_put(self, key: str, data: Buffer, *, overwrite: bool = True) -> Callable[[], object]:
        """The write is retried like a put; the call that completes it is not (it closes what
        the write opened, and writes a lent buffer, :meth:`Backend.lend_buffer`): its error
        reaches the caller."""
        return self._call(lambda: self.inner.begin_put(key, data, overwrite=overwrite))

    def lend_buffer(self, size: int) -> memoryview | None:
        return self.inner.lend_buffer(size)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call(lambda: self.inner.get(key, offset, length))

    def stat(self, key: str) -> ObjectInfo:
        return self._call(lambda: self.inner.stat(key))

    def delete(self, key: str) -> None:
        self._call(lambda: self.inner.delete(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return iter(self._call(lambda: list(self.inner.list(prefix))))

    def missing(self, keys: Iterable[str]) -> set[str]:
        wanted = list(keys)
        return self._call(lambda: self.inner.missing(wanted))

    def locked_until(self, key: str) -> float | None:
        return self._call(lambda: self.inner.locked_until(key))

    def extend_lock(self, key: str, until: float) -> None:
        self._call(lambda: self.inner.extend_lock(key, until))

    def flush(self) -> None:
        self._call(self.inner.flush)

    def create(self) -> None:
        self._call(self.inner.create)

    def capacity(self) -> tuple[int, int] | None:
        return self.inner.capacity()  # a health check: report at once, never wait

    def close(self) -> None:
        self.inner.close()
