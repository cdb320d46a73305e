"""Manifests: one complete description of one backup.

A manifest lists the volume's size, the chunk size and the digest of every chunk in order
(``None`` for a chunk that is all zeros or a hole), so a backup restores, verifies and deletes
on its own. Its id is the digest of its canonical JSON, and it is stored last, after every
chunk it names: a listed backup is always restorable.
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})

    @property
    def created_at(self) -> datetime:
        return parse_time(self.created)

    def referenced(self) -> set[str]:
        """The distinct chunk digests this backup needs."""
        return {digest for digest in self.chunks if digest}

    @property
    def stored_size(self) -> int:
        """Bytes of the volume held in chunks (the rest are zeros or holes)."""
        full = sum(1 for digest in self.chunks if digest) * self.chunkSize
        if self.chunks and self.chunks[-1] and self.size % self.chunkSize:
            full -= self.chunkSize - self.size % self.chunkSize
        return full


@dataclass
class BackupEntry:
    """A manifest with its id, as listings return it."""

    id: str
    manifest: Manifest
