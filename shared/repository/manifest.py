"""Manifests: one complete description of one backup.

A manifest lists the volume's size, the chunk size and the digest of every chunk in order
(``None`` for a chunk that is all zeros or a hole), so a backup restores, verifies and deletes
on its own. A *stream* manifest (``kind == "stream"``, see stream.py) describes a byte stream
such as a database dump instead: content-defined chunks of varying length, every entry a
digest, ``sizes`` giving each chunk's length and ``md5`` the whole stream's. Its id is the
digest of its canonical JSON, and it is stored last, after every chunk it names: a listed
backup is always restorable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

FORMAT_VERSION = 1


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class Manifest:
    """A backup as stored in the repository (camelCase on disk, like the API)."""

    volume: str
    format: str
    size: int
    chunkSize: int
    chunks: list[str | None]
    mode: str
    parent: str | None = None
    name: str = ""
    created: str = field(default_factory=utcnow)
    hostname: str = ""
    bitmap: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    kind: str = "volume"  # or "stream"
    sizes: list[int] = field(default_factory=list)  # streams: each chunk's length
    md5: str = ""  # streams: hex MD5 of the whole stream

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        # Volume manifests keep the exact form (and so the ids) they had before streams.
        for key, empty in (("kind", "volume"), ("sizes", []), ("md5", "")):
            if data[key] == empty:
                del data[key]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})

    @property
    def created_at(self) -> datetime:
        return parse_time(self.created)

    @property
    def is_stream(self) -> bool:
        return self.kind == "stream"

    def referenced(self) -> set[str]:
        """The distinct chunk digests this backup needs."""
        return {digest for digest in self.chunks if digest}

    @property
    def stored_size(self) -> int:
        """Bytes of the volume held in chunks (the rest are zeros or holes)."""
        if self.is_stream:
            return sum(self.sizes)
        full = sum(1 for digest in self.chunks if digest) * self.chunkSize
        if self.chunks and self.chunks[-1] and self.size % self.chunkSize:
            full -= self.chunkSize - self.size % self.chunkSize
        return full

    def hole_runs(self) -> list[tuple[int, int]]:
        """(offset, length) of the runs of the volume that no chunk holds (zeros or holes)."""
        return self._runs(held=False)

    def data_runs(self) -> list[tuple[int, int]]:
        """(offset, length) of the runs of the volume that chunks hold (what a restore writes)."""
        return self._runs(held=True)

    def _runs(self, *, held: bool) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for index, digest in enumerate(self.chunks):
            if bool(digest) != held:
                continue
            offset = index * self.chunkSize
            length = min(self.chunkSize, self.size - offset)
            if runs and runs[-1][0] + runs[-1][1] == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + length)
            else:
                runs.append((offset, length))
        return runs


@dataclass
class BackupEntry:
    """A manifest with its id, as listings return it."""

    id: str
    manifest: Manifest
