"""Repository locks: shared for writers and readers, exclusive for garbage collection.

A lock is an object ``locks/<uuid>`` holding who took it and when it was last refreshed.
Backups, restores, syncs, verify and prune take shared locks and run side by side; ``gc``
takes an exclusive one, so it never deletes a chunk a running backup is about to reference.
A lock whose process is gone (same host) or whose refresh is older than ``STALE_SECONDS``
(any host) is stale and removed by whoever finds it: a killed backup never wedges the
repository.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from shared.errors import ObjectNotFound, RepositoryLocked

from .backends.base import Backend

log = logging.getLogger(__name__)

LockKind = Literal["shared", "exclusive"]
REFRESH_SECONDS = 30.0
STALE_SECONDS = 300.0
HOSTNAME = socket.gethostname()


def _process_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


@dataclass
class LockRecord:
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

    def stale(self, now: float) -> bool:
        if self.host == HOSTNAME:
            return _process_start(self.pid) != self.pstart
        return now - self.refreshed > STALE_SECONDS


def read_locks(backend: Backend) -> list[LockRecord]:
    """Every lock in the repository, stale ones removed."""
    records = []
    now = time.time()
    for info in backend.list("locks/"):
        try:
            data = json.loads(backend.get(info.key))
            record = LockRecord(key=info.key, **data)
        except (ObjectNotFound, ValueError, TypeError):
            continue
        if record.stale(now):
            log.info("lock.stale_removed %s", record.describe())
            backend.delete(record.key)
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
            self.body["refreshed"] = time.time()
            try:
                self.backend.put(self.key, json.dumps(self.body).encode())
            except Exception:
                log.warning("lock.refresh_failed %s", self.key, exc_info=True)


@contextlib.contextmanager
def repository_lock(backend: Backend, kind: LockKind, purpose: str, wait: float = 0.0) -> Iterator[None]:
    """Hold a ``kind`` lock for the body; wait up to ``wait`` seconds for conflicting locks
    to go, then raise RepositoryLocked naming who holds them."""
    key = f"locks/{uuid.uuid4().hex}"
    now = time.time()
    pid = os.getpid()
    body: dict[str, object] = {
        "kind": kind,
        "purpose": purpose,
        "host": HOSTNAME,
        "pid": pid,
        "pstart": _process_start(pid),
        "created": now,
        "refreshed": now,
    }
    deadline = time.monotonic() + wait
    while True:
        backend.put(key, json.dumps(body).encode())
        conflicts = [
            record
            for record in read_locks(backend)
            if record.key != key and (kind == "exclusive" or record.kind == "exclusive")
        ]
        if not conflicts:
            break
        backend.delete(key)
        if time.monotonic() >= deadline:
            who = "; ".join(record.describe() for record in conflicts)
            need = "needs the repository idle" if kind == "exclusive" else "waits for exclusive maintenance"
            raise RepositoryLocked(location=backend.location, detail=f"{purpose} {need}, held by {who}")
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())) * random.uniform(0.5, 1.0) + 0.05)
    refresher = _Refresher(backend, key, body)
    refresher.start()
    try:
        yield
    finally:
        refresher.stopped.set()
        refresher.join()
        backend.delete(key)
