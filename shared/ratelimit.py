"""Throttles for failed authentications, shared by the API and the storage server.

:class:`FailureWindow` counts each client's failed authentications in a sliding window; a
client with too many is refused until the oldest leaves the window. Callers decide what a
client is (an address) and what a refusal looks like (HTTP 429 with ``Retry-After``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class FailureWindow:
    """Failed authentications per client in a sliding window of ``seconds``: a client with
    ``limit`` of them is refused, good key or not, until the oldest leaves the window.

    In memory, thread-safe, per process: each API or storage-server process counts its own
    clients.
    """

    MAX_CLIENTS = 100_000  # past this many clients tracked, expired ones are swept

    def __init__(self, limit: int, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.seconds, self.clock = limit, seconds, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _live(self, client: str, moment: float) -> deque[float] | None:
        times = self._failures.get(client)
        if times is None:
            return None
        while times and times[0] <= moment - self.seconds:
            times.popleft()
        if not times:
            del self._failures[client]
            return None
        return times

    def retry_after(self, client: str) -> float | None:
        """Seconds until ``client`` may try again, or None when it may now."""
        with self._lock:
            moment = self.clock()
            times = self._live(client, moment)
            if times is None or len(times) < self.limit:
                return None
            return times[0] + self.seconds - moment

    def failed(self, client: str) -> None:
        """Count one failed authentication of ``client`` now."""
        with self._lock:
            moment = self.clock()
            if len(self._failures) >= self.MAX_CLIENTS:
                for other in list(self._failures):
                    self._live(other, moment)
            self._failures.setdefault(client, deque(maxlen=self.limit)).append(moment)
