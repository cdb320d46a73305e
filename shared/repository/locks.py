"""Repository locks: shared for writers and readers, exclusive for garbage collection.

A lock is an object ``locks/<uuid>`` holding who took it and when it was last refreshed.
Backups, restores, syncs, verify and prune take shared locks and run side by side; ``gc``
takes an exclusive one, so it never deletes a chunk a running backup is about to reference.
A lock that was not rewritten for ``STALE_SECONDS``, or whose process is gone (same host), is
stale and removed by whoever finds it, as is a malformed one (:func:`parse_lock`): neither a
killed backup nor a planted lock object wedges the repository. How long ago a lock was last
written is read on one clock, the storage's: its objects' modification times (a file's mtime,
a storage-server's file, S3's LastModified), the reader's own lock just written giving the
storage's "now". Hosts' clocks never meet: a holder whose clock is minutes off keeps its lock
(the times inside a lock are for people). A storage server accepts only well-formed locks
whose times are at most ``CLOCK_SKEW_SECONDS`` ahead of its clock (:func:`accept_lock`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from shared.errors import BackendForbidden, MalformedLock, ObjectNotFound, RepositoryLocked
from shared.failpoints import failpoint, wall_clock

from .backends.base import Backend

log = logging.getLogger(__name__)

LockKind = Literal["shared", "exclusive"]
REFRESH_SECONDS = 30.0
STALE_SECONDS = 300.0
# How far ahead of a storage server's clock a lock's times may be: hosts' clocks should differ
# by milliseconds (NTP) but can be minutes off; staleness does not read these times (see
# above), so this only refuses nonsense.
CLOCK_SKEW_SECONDS = 3600.0
MAX_PURPOSE = 1024  # characters; a longer purpose is cut when the lock is written
MAX_HOST = 255
MAX_PSTART = 32
LOCK_MAX_BYTES = 16 * 1024  # a lock of the longest fields, every character escaped, fits
LAST_SECOND = 253402300799.0  # 9999-12-31 23:59:59 UTC: times past it cannot be shown
HOSTNAME = socket.gethostname()


def _process_start(pid: int) -> str | None:
    """Process ``pid``'s start time (``/proc/<pid>/stat`` field 22, clock ticks since boot);
    "" when there is no such process; None when this system cannot tell (no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[19].decode()
    except (FileNotFoundError, ProcessLookupError):
        return "" if os.path.isdir("/proc/self") else None
    except (OSError, IndexError):
        return None


def _seconds(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and 0 <= value <= LAST_SECOND


# Every field repository_lock writes: whether a value is acceptable, and what is expected.
_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "kind": (lambda v: v in ("shared", "exclusive"), '"shared" or "exclusive"'),
    "purpose": (lambda v: isinstance(v, str) and len(v) <= MAX_PURPOSE, f"a string of <= {MAX_PURPOSE} characters"),
    "host": (lambda v: isinstance(v, str) and 0 < len(v) <= MAX_HOST, f"a string of 1-{MAX_HOST} characters"),
    "pid": (lambda v: type(v) is int and 0 < v < 2**31, "a process id"),
    "pstart": (
        lambda v: isinstance(v, str) and len(v) <= MAX_PSTART and (v == "" or (v.isascii() and v.isdigit())),
        "a process start time (digits, or empty)",
    ),
    "created": (_seconds, "seconds since the epoch"),
    "refreshed": (_seconds, "seconds since the epoch"),
}


@dataclass
class LockRecord:
    """One well-formed lock (:func:`parse_lock` makes them)."""

    key: str
    kind: str
    purpose: str
    host: str
    pid: int
    pstart: str
    created: float
    refreshed: float

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.created, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{self.purpose} (host {self.host}, pid {self.pid}, since {since})"

    def stale(self, age: float, now: float) -> bool:
        """Whether nobody holds this lock any more: not rewritten for ``STALE_SECONDS``
        (``age``: seconds since the storage last wrote it, on the storage's clock), or its
        times further from ``now`` (this host's clock) than any clock can be off (planted), or
        taken on this host by a process that is gone (or whose pid another process now has)."""
        if age > STALE_SECONDS or abs(now - self.refreshed) > CLOCK_SKEW_SECONDS + STALE_SECONDS:
            return True
        if self.host != HOSTNAME:
            return False
        current = _process_start(self.pid)
        return current is not None and (current == "" or current != self.pstart)


def parse_lock(key: str, data: bytes) -> LockRecord:
    """The lock stored under ``key``; MalformedLock unless ``data`` is a JSON object of at most
    ``LOCK_MAX_BYTES`` with exactly the fields :func:`repository_lock` writes, each of its type
    and within its bounds, and ``refreshed >= created``. No clock is consulted."""
    if len(data) > LOCK_MAX_BYTES:
        raise MalformedLock(key=key, detail=f"over {LOCK_MAX_BYTES} bytes")
    try:
        fields = json.loads(data)
    except (ValueError, RecursionError):
        raise MalformedLock(key=key, detail="not JSON") from None
    if not isinstance(fields, dict):
        raise MalformedLock(key=key, detail="not a JSON object")
    if set(fields) != set(_FIELDS):
        raise MalformedLock(key=key, detail=f"the fields must be exactly {', '.join(_FIELDS)}")
    for name, (valid, expected) in _FIELDS.items():
        if not valid(fields[name]):
            raise MalformedLock(key=key, detail=f"{name} must be {expected}")
    if fields["refreshed"] < fields["created"]:
        raise MalformedLock(key=key, detail="refreshed is before created")
    return LockRecord(key=key, **fields)


def accept_lock(key: str, data: bytes, now: float) -> LockRecord:
    """What a storage server checks of a lock it is asked to store: :func:`parse_lock`, and
    MalformedLock when ``created`` or ``refreshed`` is more than ``CLOCK_SKEW_SECONDS`` ahead
    of ``now`` (its clock)."""
    record = parse_lock(key, data)
    ahead = record.refreshed - now  # refreshed >= created: the later of the two
    if ahead > CLOCK_SKEW_SECONDS:
        raise MalformedLock(
            key=key, detail=f"refreshed {ahead:.0f} s in the future (clocks may differ by {CLOCK_SKEW_SECONDS:.0f} s)"
        )
    return record


def _drop(backend: Backend, key: str, what: str, level: int, detail: str) -> None:
    """Delete a lock nobody holds, logging ``lock.<what>_removed``; a store that refuses this
    token the delete keeps it, logged as ``lock.<what>_ignored`` (it is ignored all the same)."""
    outcome = "removed"
    try:
        backend.delete(key)
    except BackendForbidden:
        outcome = "ignored"
    log.log(level, "lock.%s_%s %s", what, outcome, detail)


def read_locks(backend: Backend, mine: str | None = None) -> list[LockRecord]:
    """Every live lock in the repository. Stale and malformed ones are left out, and removed
    where the store allows; none of them ever raises or blocks. ``mine``: the key of the lock
    this process just wrote, whose modification time is the storage's "now" (without it, this
    host's clock stands in)."""
    records = []
    listed = list(backend.list("locks/"))
    here = wall_clock()
    storage_now = next((info.mtime for info in listed if info.key == mine), here)
    for info in listed:
        if info.key == mine:
            continue
        try:
            if info.size > LOCK_MAX_BYTES:  # not read at all
                raise MalformedLock(key=info.key, detail=f"over {LOCK_MAX_BYTES} bytes")
            record = parse_lock(info.key, backend.get(info.key))
        except ObjectNotFound:
            continue
        except MalformedLock as exc:
            _drop(backend, info.key, "malformed", logging.WARNING, str(exc))
            continue
        if record.stale(storage_now - info.mtime, here):
            _drop(backend, record.key, "stale", logging.INFO, record.describe())
            continue
        records.append(record)
    return records


class _Refresher(threading.Thread):
    def __init__(self, backend: Backend, key: str, body: dict[str, object]) -> None:
        super().__init__(daemon=True, name="lock-refresh")
        self.backend, self.key, self.body = backend, key, body
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(REFRESH_SECONDS):
            self.body["refreshed"] = wall_clock()
            try:
                self.backend.put(self.key, json.dumps(self.body).encode())
            except Exception:
                log.warning("lock.refresh_failed %s", self.key, exc_info=True)


@contextlib.contextmanager
def repository_lock(backend: Backend, kind: LockKind, purpose: str, wait: float = 0.0) -> Iterator[None]:
    """Hold a ``kind`` lock for the body; wait up to ``wait`` seconds for conflicting locks
    to go, then raise RepositoryLocked naming who holds them."""
    key = f"locks/{uuid.uuid4().hex}"
    now = wall_clock()
    pid = os.getpid()
    body: dict[str, object] = {
        "kind": kind,
        "purpose": purpose[:MAX_PURPOSE],
        "host": HOSTNAME,
        "pid": pid,
        "pstart": _process_start(pid) or "",
        "created": now,
        "refreshed": now,
    }
    deadline = time.monotonic() + wait
    while True:
        backend.put(key, json.dumps(body).encode())
        conflicts = [record for record in read_locks(backend, key) if kind == "exclusive" or record.kind == "exclusive"]
        if not conflicts:
            break
        backend.delete(key)
        if time.monotonic() >= deadline:
            who = "; ".join(record.describe() for record in conflicts)
            need = "needs the repository idle" if kind == "exclusive" else "waits for exclusive maintenance"
            raise RepositoryLocked(location=backend.location, detail=f"{purpose} {need}, held by {who}")
        failpoint("lock.waiting")  # a test's sign that this process waits for another's lock
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())) * random.uniform(0.5, 1.0) + 0.05)
    refresher = _Refresher(backend, key, body)
    refresher.start()
    try:
        yield
    finally:
        refresher.stopped.set()
        refresher.join()
        backend.delete(key)
