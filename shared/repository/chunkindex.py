"""What one host knows a repository holds: a local index of chunk names, so that a backup needs
no existence request per chunk (restic's and Borg's local index, in spirit).

The index is a SQLite file per repository (``<folder>/<repository id>.sqlite``), filled once
by listing the repository's chunks and then by every chunk this host stores. It may only ever
say too little, never too much: a chunk it names must exist. Only garbage collection deletes
chunks, and gc (holding the exclusive lock) first writes the list of what it deletes to
``index/deleted/<n>`` and moves the repository's generation (``index/generation``) to ``n``.
A backup, holding a shared lock (so no gc runs until it ends), brings its index to the
repository's generation before it trusts it: it drops the chunks of every deletion list since
its own generation, or, when one is gone or its generation is ahead, starts over from a fresh
listing. An index that cannot be brought up to date is never used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from shared.errors import ObjectNotFound

from .backends.base import Backend

log = logging.getLogger(__name__)

GENERATION_KEY = "index/generation"
DELETED_PREFIX = "index/deleted/"
KEEP_DELETION_LISTS = 100  # older lists are removed by gc: hosts further behind list afresh
FILL_BATCH = 10_000


def deleted_key(generation: int) -> str:
    return f"{DELETED_PREFIX}{generation:012d}"


def read_generation(backend: Backend) -> int:
    """The repository's gc generation (0 before any gc of this version)."""
    try:
        return int(json.loads(backend.get(GENERATION_KEY))["generation"])
    except ObjectNotFound:
        return 0


def read_deleted(backend: Backend, generation: int) -> list[str] | None:
    """The chunks the gc of ``generation`` deleted, or None when its list is gone."""
    try:
        return list(json.loads(backend.get(deleted_key(generation)))["chunks"])
    except ObjectNotFound:
        return None


def announce_deletion(backend: Backend, digests: Iterable[str]) -> int:
    """gc, under the exclusive lock, before it deletes anything: record what it deletes and
    move the generation on. Returns the new generation. Old deletion lists are dropped."""
    generation = read_generation(backend) + 1
    backend.put(deleted_key(generation), json.dumps({"chunks": sorted(digests)}).encode())
    backend.put(GENERATION_KEY, json.dumps({"generation": generation}).encode())
    for info in list(backend.list(DELETED_PREFIX)):
        with contextlib.suppress(ValueError):
            if int(info.key.rsplit("/", 1)[1]) <= generation - KEEP_DELETION_LISTS:
                backend.delete(info.key)
    return generation


class Lister(Protocol):
    def chunk_names(self) -> Iterable[str]: ...


class ChunkIndex:
    """The chunk names a host knows its repository holds (thread-safe)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID")
        self._db.execute("CREATE TABLE IF NOT EXISTS chunks (digest BLOB PRIMARY KEY) WITHOUT ROWID")
        self._lock = threading.Lock()
        self.usable = False  # true once brought up to the repository's generation

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def bring_up_to_date(self, backend: Backend, lister: Lister) -> None:
        """Make the index trustworthy for the repository as it is now; call under a lock
        that keeps gc out (a backup's shared lock)."""
        current = read_generation(backend)
        stored = self._meta("generation")
        complete = self._meta("complete") == "yes"
        with self._lock:
            if stored is not None and complete and int(stored) <= current:
                dropped = 0
                for generation in range(int(stored) + 1, current + 1):
                    deleted = read_deleted(backend, generation)
                    if deleted is None:
                        complete = False
                        break
                    self._db.executemany("DELETE FROM chunks WHERE digest = ?", ((bytes.fromhex(d),) for d in deleted))
                    dropped += len(deleted)
                if complete:
                    self._set_meta("generation", str(current))
                    if dropped:
                        log.info("chunkindex.caught_up generation=%d dropped=%d", current, dropped)
                    self.usable = True
                    return
            self._fill(lister, current)
            self.usable = True

    def _fill(self, lister: Lister, generation: int) -> None:
        self._db.execute("BEGIN")
        self._db.execute("DELETE FROM chunks")
        self._set_meta("complete", "no")
        self._db.execute("COMMIT")
        batch: list[tuple[bytes]] = []
        count = 0
        for name in lister.chunk_names():
            batch.append((bytes.fromhex(name),))
            if len(batch) >= FILL_BATCH:
                self._db.executemany("INSERT OR IGNORE INTO chunks VALUES (?)", batch)
                count += len(batch)
                batch.clear()
        self._db.executemany("INSERT OR IGNORE INTO chunks VALUES (?)", batch)
        count += len(batch)
        self._db.execute("BEGIN")
        self._set_meta("generation", str(generation))
        self._set_meta("complete", "yes")
        self._db.execute("COMMIT")
        log.info("chunkindex.filled chunks=%d generation=%d path=%s", count, generation, self.path)

    def has(self, digest_hex: str) -> bool:
        if not self.usable:
            return False
        with self._lock:
            row = self._db.execute("SELECT 1 FROM chunks WHERE digest = ?", (bytes.fromhex(digest_hex),)).fetchone()
        return row is not None

    def add(self, digest_hex: str) -> None:
        """A chunk this host stored or saw in the repository."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO chunks VALUES (?)", (bytes.fromhex(digest_hex),))

    def close(self) -> None:
        self._db.close()
