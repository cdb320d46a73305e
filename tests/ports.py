"""TCP ports for the servers tests start, safe when several test processes run side by side.

The usual ``bind(("127.0.0.1", 0))`` probe hands out a port from the kernel's ephemeral range
and gives it back at once: until the test's server binds it (a second or more for a child
process on a loaded machine), another process may be given the same port, by the same probe
(a pytest-xdist worker, a neighbour run) or as the local end of any outgoing connection.
:func:`free_port` avoids both:

* it hands out ports below the ephemeral range (``net.ipv4.ip_local_port_range``), which the
  kernel never picks by itself;
* each process walks that range from a starting point of its own (spread by its pytest-xdist
  worker number and its pid) and takes a port only when it can lock the port's file in
  ``$TMPDIR/blockvault-ports`` (``flock``, so other processes of any run skip it) and bind it;
* it keeps its last :data:`HELD` ports locked (a closed lock file is released at once, and all
  of them when the process exits), long enough for the server to bind; the walk moves on, so
  a port is handed out again only after the whole range has been walked.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import TextIO

LOCK_DIR = Path(tempfile.gettempdir()) / "blockvault-ports"
FIRST = 20000  # the range ends where the kernel's ephemeral range begins
HELD = 64


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def worker_number() -> int:
    """The pytest-xdist worker's number (``gw3`` -> 3), 0 outside xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    digits = name.removeprefix("gw")
    return int(digits) if digits.isdigit() else 0


class _Ports:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: deque[TextIO] = deque()
        self.cursor: int | None = None
        self.last = max(FIRST + 1000, _ephemeral_start()) - 1

    def take(self, host: str) -> int:
        with self.lock:
            span = self.last - FIRST + 1
            if self.cursor is None:  # workers 1 span/8 apart; the pid separates neighbour runs
                self.cursor = (worker_number() * (span // 8) + os.getpid() % 97 * 7) % span
            LOCK_DIR.mkdir(parents=True, exist_ok=True)
            for _ in range(span):
                port = FIRST + self.cursor
                self.cursor = (self.cursor + 1) % span
                handle = open(LOCK_DIR / f"{port}.lock", "w")  # noqa: SIM115 - held after return
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    handle.close()
                    continue
                if not bindable(host, port):
                    handle.close()
                    continue
                self.held.append(handle)
                while len(self.held) > HELD:
                    self.held.popleft().close()
                return port
        raise RuntimeError(f"no free TCP port on {host} in {FIRST}..{self.last}")


_PORTS = _Ports()


def bindable(host: str, port: int) -> bool:
    """Whether a listening socket could bind ``host:port`` now."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that nothing listens on and no other test process is handed."""
    return _PORTS.take(host)
