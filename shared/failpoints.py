"""Failpoints: named places where tests make a real process die or fail on purpose.

``BLOCKVAULT_FAILPOINTS="backup.chunk_stored=5:kill,backup.before_manifest=1:raise"`` makes
the 5th pass through ``failpoint("backup.chunk_stored")`` SIGKILL the process, and the first
pass through ``backup.before_manifest`` raise; ``pause2.5`` sleeps 2.5 s there. Unset
(always, outside tests) it costs one dict lookup. This is how the fault tests kill a backup
at exact points (like TiKV's fail-rs).

``clock=1:skew-420`` moves this process's wall clock 420 s back (``skew+420`` ahead) wherever
blockvault reads it (:func:`wall_clock`: catalog times through :mod:`shared.catalog.clock`,
repository locks): a host whose clock is off, without touching the machine's clock.

``hold:/some/file`` makes the process wait there for the test, not for a time: it creates
``/some/file.reached`` and goes on once ``/some/file`` exists (or after ``HOLD_SECONDS``), so
a test waits until the process is at the point, does what it tests, then lets it go
(:func:`reached` and :func:`release` are the test's side).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from shared.config import setting
from shared.forksafe import ForkSafeLock

HOLD_SECONDS = 600.0  # a held process goes on by itself after this (a test that died never releases it)
_counts: dict[str, int] = {}
_lock = ForkSafeLock()


class FailpointError(RuntimeError):
    """Raised by a failpoint set to ``raise``."""


def _parse(spec: str) -> dict[str, tuple[int, str]]:
    points: dict[str, tuple[int, str]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, rest = item.partition("=")
        count, _, action = rest.partition(":")
        points[name] = (int(count or 1), action or "kill")
    return points


_points = _parse(setting("failpoints") or "")
_skew = float(_points["clock"][1][4:]) if _points.get("clock", (0, ""))[1].startswith("skew") else 0.0


def wall_clock() -> float:
    """Seconds since the epoch on this host's clock (``time.time()``, moved by ``clock=1:skewS``
    in a test)."""
    return time.time() + _skew


def failpoint(name: str) -> None:
    """Die or raise here if the environment asks for it at this pass."""
    if not _points or name not in _points:
        return
    at, action = _points[name]
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] == at
    if not hit:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action.startswith("hold:"):
        _hold(Path(action[5:]))
        return
    if action.startswith("pause"):
        time.sleep(float(action[5:] or 1))
        return
    raise FailpointError(f"failpoint {name}")


def _hold(gate: Path) -> None:
    Path(f"{gate}.reached").touch()
    deadline = time.monotonic() + HOLD_SECONDS
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def reached(gate: Path) -> bool:
    """Whether a process held at ``hold:<gate>`` got there (the test's side)."""
    return Path(f"{gate}.reached").exists()


def release(gate: Path) -> None:
    """Let every process held at ``hold:<gate>`` go on (the test's side)."""
    gate.touch()
