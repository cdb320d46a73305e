"""What the storage server checks of an object before it stores it (:mod:`shared.repository.backends.http_server`).

An object's place in the layout of docs/repository-format.md comes from its path below
``ROOT`` (:func:`classify`): below the repository's folder, a lock is ``locks/...``, a chunk
``chunks/<aa>/<name>`` and a manifest ``manifests/<name>``.

- A lock must be what ``repository_lock`` writes, with times at most ``CLOCK_SKEW_SECONDS``
  ahead of this server's clock (:func:`shared.repository.locks.accept_lock`): 400 otherwise.
  An appender (an append-only or site token) may write only shared locks: 403 for an
  exclusive one (that is gc's, which needs a token that may delete anyway).
- In a repository with a config, a chunk's or manifest's name must have the layout's shape
  (64 hex digits; ``<aa>`` their first two): 400 otherwise, before the body is read.
- Where the config says the objects have no keys (encryption "none": plain BLAKE3 names), the
  body is decoded with the engine's codec and its BLAKE3 must be its name: 400 ``integrity``
  otherwise, and nothing is stored. Objects of encrypted repositories are sealed and named
  with a keyed BLAKE3: only a client with the keys can check those (``sync`` does).

Every check applies to every token; only the lock's kind depends on it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.errors import IntegrityError, MalformedLock
from shared.repository.backends.http import Status
from shared.repository.keys import KeyMaterial, ObjectCodec
from shared.repository.locks import LOCK_MAX_BYTES, accept_lock
from shared.repository.repo import checkable_without_keys

GiB = 1024**3
# The plain size a manifest may decode to: one of a 64 TiB volume in 4 MiB chunks is ~1.1 GB.
MAX_MANIFEST_PLAIN = 4 * GiB
CONFIG_MAX_BYTES = 64 * 1024
MIN_CHUNK_SIZE = 4096
LAYOUT = ("locks", "chunks", "manifests")
_DIGEST = re.compile(r"[0-9a-f]{64}")

Check = Callable[[Path], None]
"""Reads a received body (the file at the path) and raises :class:`Refused` when it may not be stored."""


class Refused(Exception):
    """A request the server answers with ``status``, the error name ``error`` (the status's
    name unless given), ``detail`` and ``headers``."""

    def __init__(
        self, status: Status, detail: str, error: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.error = error or status.name.lower()
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class Place:
    """Where an object sits in a repository: ``kind`` (one of :data:`LAYOUT`) and the parts of
    its key after that, in the repository whose folder is ``folder``."""

    folder: Path
    kind: str
    rest: tuple[str, ...]

    @property
    def key(self) -> str:
        return "/".join((self.kind, *self.rest))


def classify(root: Path, repository: str, key: str) -> Place | None:
    """The place of ``key`` of the repository URL ``repository`` (``""``: the bare root, whose
    keys begin with the folders of a repository): the first ``locks``, ``chunks`` or
    ``manifests`` part of the key that something follows. None for any other object."""
    prefix = repository.split("/") if repository else []
    parts = [*prefix, *key.split("/")]
    for index in range(len(prefix), len(parts) - 1):
        if parts[index] in LAYOUT:
            return Place(root.joinpath(*parts[:index]), parts[index], tuple(parts[index + 1 :]))
    return None


@dataclass(frozen=True)
class Rules:
    """What a repository's config lets the server check: names always; content with
    ``codec`` (set when the objects have no keys), chunks up to ``chunk_size`` plain bytes."""

    chunk_size: int
    codec: ObjectCodec | None


def read_rules(path: Path) -> Rules | None:
    """The rules of the config file ``path``; None when it is missing or no engine could open
    it (not a JSON object, no valid chunk size): then there is nothing to check against."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(CONFIG_MAX_BYTES + 1)
        config = json.loads(data)
    except (OSError, ValueError, RecursionError):
        return None
    if len(data) > CONFIG_MAX_BYTES or not isinstance(config, dict):
        return None
    size = config.get("chunkSize")
    if type(size) is not int or size < MIN_CHUNK_SIZE:
        return None
    return Rules(size, ObjectCodec(KeyMaterial(None, None)) if checkable_without_keys(config) else None)


class ObjectChecks:
    """Chooses the check of each object put, reading each repository's config once and again
    only when the file changes (another inode, modification time or size). Used from the event
    loop only."""

    def __init__(self) -> None:
        self._rules: dict[Path, tuple[tuple[int, int, int], Rules | None]] = {}

    def rules(self, folder: Path) -> Rules | None:
        """The rules of the repository in ``folder`` (None: no usable config there)."""
        try:
            st = os.stat(folder / "config")
        except OSError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._rules.get(folder)
        if cached is None or cached[0] != stamp:
            cached = self._rules[folder] = (stamp, read_rules(folder / "config"))
        return cached[1]

    def check_for(self, place: Place | None, *, appender: bool) -> Check | None:
        """The check of a body to be stored at ``place`` (None: none needed). Raises
        :class:`Refused` at once for a chunk or manifest name of the wrong shape."""
        if place is None:
            return None
        if place.kind == "locks":
            return functools.partial(_check_lock, place.key, appender)
        rules = self.rules(place.folder)
        if rules is None:
            return None
        name = _object_name(place)
        if rules.codec is None:
            return None
        limit = rules.chunk_size if place.kind == "chunks" else MAX_MANIFEST_PLAIN
        return functools.partial(_check_object, rules.codec, name, f"{place.kind[:-1]} {name}", limit)


def _object_name(place: Place) -> str:
    """The digest a chunk or manifest is named by; Refused unless its key has the shape
    ``chunks/<aa>/<64 hex>`` (``<aa>`` their first two) or ``manifests/<64 hex>``."""
    name = place.rest[-1]
    if place.kind == "chunks":
        valid = len(place.rest) == 2 and _DIGEST.fullmatch(name) is not None and place.rest[0] == name[:2]
        shape = "chunks/<first two hex digits>/<64 hex digits>"
    else:
        valid = len(place.rest) == 1 and _DIGEST.fullmatch(name) is not None
        shape = "manifests/<64 hex digits>"
    if not valid:
        raise Refused(Status.BAD_REQUEST, f"{place.key} is no {place.kind[:-1]} name: {shape}")
    return name


def _check_lock(key: str, appender: bool, path: Path) -> None:
    with open(path, "rb") as handle:
        data = handle.read(LOCK_MAX_BYTES + 1)
    try:
        record = accept_lock(key, data, time.time())
    except MalformedLock as exc:
        raise Refused(Status.BAD_REQUEST, str(exc)) from None
    if appender and record.kind != "shared":
        raise Refused(
            Status.FORBIDDEN,
            f"append-only: {key} is an exclusive lock; only gc takes those, with a token that may delete",
        )


def _check_object(codec: ObjectCodec, name: str, what: str, limit: int, path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            codec.check(bytes.fromhex(name), handle, what, limit)
    except IntegrityError as exc:
        raise Refused(Status.BAD_REQUEST, str(exc), "integrity") from None
