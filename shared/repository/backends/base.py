"""The backend interface every storage backend implements (borgstore / restic style: small)."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a backend knows of one stored object."""

    key: str
    size: int
    mtime: float


def _done() -> None:
    """A put that is already complete."""


class Backend(abc.ABC):
    """A flat store of immutable-by-convention objects named by ``/``-separated keys.

    Errors are translated at this boundary into :mod:`shared.errors`: a missing object is
    :class:`~shared.errors.ObjectNotFound`, a failure worth retrying is
    :class:`~shared.errors.BackendUnavailable`, anything else a permanent
    :class:`~shared.errors.BackendError`.
    """

    location: str
    # Others may add objects here that this client never saw: a storage server's repository
    # takes objects from append-only and site tokens, and can check one against its name only
    # where the repository has no keys. ``sync`` reads back what it relies on in the others.
    foreign_writers: bool = False
    # Object lock (a PublicCloud storage registered with one): chunks and manifests are written
    # locked for this many seconds, and the store refuses to delete them before. 0: no lock.
    lock_seconds: float = 0.0

    @abc.abstractmethod
    def put(self, key: str, data: Buffer, *, overwrite: bool = True) -> None:
        """Store ``data`` under ``key`` atomically: readers see the old object or the whole new
        one, never part of it, and after a crash an object under ``key`` is whole or absent.
        It is durable once :meth:`flush` returns. With ``overwrite=False`` an existing object
        is left alone and ``put`` still succeeds."""

    def begin_put(self, key: str, data: Buffer, *, overwrite: bool = True) -> Callable[[], object]:
        """:meth:`put` in two steps: write ``data`` now and return the call that completes the
        put (a file's flush to disk and its name); until that call returns, ``key`` may be
        absent. The caller makes that call exactly once, on any thread, and need not keep
        ``data`` for it, except a buffer :meth:`lend_buffer` lent: that one goes with the call,
        which may write it (the file backend does), so the caller leaves its bytes alone. By
        default the whole put is done now and the call does nothing."""
        self.put(key, data, overwrite=overwrite)
        return _done

    def lend_buffer(self, size: int) -> memoryview | None:
        """A writable buffer of exactly ``size`` bytes, lent to the calling thread until its
        next call here or until it hands the buffer to :meth:`begin_put`, that ``begin_put``
        writes without copying it first (the file backend's page-aligned ``O_DIRECT`` buffer,
        mostly written by the call ``begin_put`` returns): a chunk is sealed straight into it. None
        (the default) when this backend has no use for one: any buffer does as well. It never
        waits for a buffer."""
        return None

    @abc.abstractmethod
    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """The object's bytes from ``offset`` (``length`` bytes, or to the end). Raises
        ObjectNotFound when there is no such object."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and modification time of an object; ObjectNotFound when there is none."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object. Deleting a missing object is not an error (idempotent)."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a folder such as ``"chunks/"``), in
        no particular order. Objects still being written are never listed."""

    @abc.abstractmethod
    def missing(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` the store does not hold, in one round trip where the backend
        can (the http backend's batch call)."""

    def flush(self) -> None:  # noqa: B027 - stores that are durable on put need nothing
        """Make every object ``put`` so far durable (the repository calls it before and after
        writing a manifest)."""

    def create(self) -> None:  # noqa: B027 - stores that need no preparing
        """Make the store exist (a new repository's folder); ``Repository.init`` calls it.
        Nothing else ever creates the store, so a store that vanished fails loudly."""

    def capacity(self) -> tuple[int, int] | None:
        """``(total, available)`` bytes of the store, or None when it has no such limit (S3).
        Raises like any call when the store cannot be reached: it doubles as a health check."""
        return None

    def locked_until(self, key: str) -> float | None:
        """The Unix time until which the store refuses to delete ``key`` (its object lock), or
        None when it is not locked (a store without locks: always None)."""
        return None

    def extend_lock(self, key: str, until: float) -> None:  # noqa: B027 - stores without locks
        """Keep ``key`` locked until at least ``until`` (a lock is only ever lengthened); a store
        without locks has nothing to do."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        return not self.missing([key])

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has nothing to release."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
