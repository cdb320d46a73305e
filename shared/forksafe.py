"""Module locks that a forked child gets free.

A worker's prefork pool forks children while the worker's background threads (heartbeat,
storage health, libvirt sync) run; a child forked while one of them held a module's lock
inherits it held and waits for it forever (the soak found a pool child hung so, its job Running
for good). A :class:`ForkSafeLock` is replaced by a new lock in every forked child.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any


class ForkSafeLock:
    """A ``threading.Lock`` (or ``RLock``, by ``factory``) that is free again in a forked child."""

    def __init__(self, factory: Callable[[], Any] = threading.Lock) -> None:
        self._factory = factory
        self._lock = factory()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self._lock = self._factory()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return bool(self._lock.acquire(blocking, timeout))

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
