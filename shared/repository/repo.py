"""The chunk repository: config, keys, chunks and manifests on one backend.

Layout (see docs/repository-format.md)::

    config                  JSON: id, version, chunkSize, encryption, naming
    keys/repokey            the encryption and naming keys, sealed under the passphrase
    chunks/<2 hex>/<digest> one chunk each (see keys.py for the object format)
    manifests/<digest>      one backup each
    locks/<uuid>            who is using the repository
    tmp/<uuid>              objects being written (file backend)
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from shared.errors import (
    BackupNotFound,
    BackupProtected,
    BlockvaultError,
    IntegrityError,
    ObjectNotFound,
    PassphraseRequired,
    RepositoryError,
    RepositoryExists,
    RepositoryNotFound,
    UsageError,
    WrongPassphrase,
)

from .backends import Backend, open_backend
from .backends.base import Buffer
from .chunkindex import ChunkIndex
from .keys import KeyMaterial, ObjectCodec, dump_json
from .manifest import BackupEntry, Manifest, utcnow

log = logging.getLogger(__name__)
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
ID_HEX = 64  # a backup id: the manifest's digest in hex
CONFIG_VERSION = 1


def checkable_without_keys(config: Mapping[str, Any]) -> bool:
    """Whether anyone can check this repository's objects against their names without its
    keys: they are not encrypted, so each is named by the plain BLAKE3 of its content
    (:meth:`Repository.open` then names with plain BLAKE3 whatever ``naming`` says). A storage
    server checks such objects as they arrive; ``sync`` reads back, into a remote repository
    with keys, what nobody could check for it."""
    return config.get("encryption") == "none"


INSTALL_PATH = re.compile(r"^zstore://([0-9A-Za-z-]{1,64})/([0-9a-f]{64})$")


def install_path(repository_id: str, manifest_id: str) -> str:
    """Where a backup lives, as the catalog records it: ``zstore://<repository>/<manifest>``."""
    return f"zstore://{repository_id}/{manifest_id}"


def parse_install_path(path: str | None) -> tuple[str, str]:
    """(repository id, manifest id) of an install path: the inverse of :func:`install_path`.
    RepositoryError for anything that is not one."""
    found = INSTALL_PATH.fullmatch(path or "")
    if found is None:
        raise RepositoryError(location=str(path)[:200], detail="not an install path zstore://<repository>/<manifest>")
    return found[1], found[2]


def chunk_key(digest_hex: str) -> str:
    return f"chunks/{digest_hex[:2]}/{digest_hex}"


def manifest_key(manifest_id: str) -> str:
    return f"manifests/{manifest_id}"


def protected_key(manifest_id: str) -> str:
    """The marker that makes a backup protected: an empty object beside the manifests."""
    return f"protected/{manifest_id}"


class Repository:
    """An opened repository. Thread-safe for chunk and manifest I/O."""

    def __init__(self, backend: Backend, config: dict[str, Any], codec: ObjectCodec) -> None:
        self.backend = backend
        self.config = config
        self.codec = codec
        self.id: str = config["id"]
        self.chunk_size: int = config["chunkSize"]
        self.index: ChunkIndex | None = None

    def use_index(self, folder: Path | None) -> None:
        """Keep this host's index of the repository's chunks in ``folder`` (None: none, every
        chunk not known from the parent is asked for). It is trusted only after
        :meth:`refresh_index`, which writers call under their lock."""
        if self.index is not None:
            self.index.close()
        self.index = ChunkIndex(folder / f"{self.id}.sqlite") if folder is not None else None

    def refresh_index(self) -> None:
        """Bring the chunk index up to the repository's gc generation (under a lock that keeps
        gc out); filled by one listing when it is new or too far behind."""
        if self.index is not None:
            self.index.bring_up_to_date(self.backend, self)

    def chunk_names(self) -> Iterator[str]:
        """Every chunk the repository holds, by name (one listing)."""
        for info in self.backend.list("chunks/"):
            yield info.key.rsplit("/", 1)[1]

    @property
    def location(self) -> str:
        return self.backend.location

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        location: str | Backend,
        *,
        encrypt: bool = False,
        passphrase: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        like: Repository | None = None,
    ) -> Repository:
        """Create a repository. ``like`` copies another repository's chunk size and keys, so
        that the two name chunks alike and ``sync`` copies objects without re-hashing; with
        ``encrypt`` a copy of a plain repository gets its own encryption key."""
        backend = open_backend(location) if isinstance(location, str) else location
        backend.create()
        if backend.exists("config"):
            raise RepositoryExists(location=backend.location)
        if chunk_size < 4096 or chunk_size & (chunk_size - 1):
            raise UsageError(detail=f"chunk size {chunk_size} must be a power of two of at least 4096")
        if like is not None:
            keys, chunk_size = like.codec.keys, like.chunk_size
            if encrypt and not like.codec.encrypted:
                # Encrypted copy of a plain repository (public cloud): its own encryption key,
                # the source's (unkeyed) chunk names, so sync still copies without re-hashing.
                keys = KeyMaterial(os.urandom(32), keys.naming_key)
            encrypt = encrypt or like.codec.encrypted
        else:
            keys = KeyMaterial.generate(encrypt=encrypt)
        if encrypt and not passphrase:
            raise PassphraseRequired(location=backend.location)
        config = {
            "version": CONFIG_VERSION,
            "id": str(uuid.uuid4()),
            "chunkSize": chunk_size,
            "encryption": "aes-256-gcm" if encrypt else "none",
            "naming": "blake3-keyed" if keys.naming_key else "blake3",
            "compression": "zstd",
            "created": utcnow(),
        }
        if encrypt:
            assert passphrase
            backend.put("keys/repokey", json.dumps(keys.wrap(passphrase), indent=1).encode())
        backend.put("config", json.dumps(config, indent=1).encode(), overwrite=False)
        return cls(backend, config, ObjectCodec(keys))

    @classmethod
    def open(cls, location: str | Backend, passphrase: str | None = None) -> Repository:
        backend = open_backend(location) if isinstance(location, str) else location
        try:
            config = json.loads(backend.get("config"))
        except ObjectNotFound:
            raise RepositoryNotFound(location=backend.location) from None
        except ValueError:
            raise RepositoryError(location=backend.location, detail="config is not valid JSON") from None
        if config.get("version") != CONFIG_VERSION:
            raise RepositoryError(location=backend.location, detail=f"unsupported version {config.get('version')}")
        if config["encryption"] == "none":
            return cls(backend, config, ObjectCodec(KeyMaterial(None, None)))
        if not passphrase:
            raise PassphraseRequired(location=backend.location)
        try:
            keyfile = json.loads(backend.get("keys/repokey"))
        except ObjectNotFound:
            raise RepositoryError(location=backend.location, detail="keys/repokey is missing") from None
        keys = KeyMaterial.unwrap(keyfile, passphrase)
        if keys is None:
            raise WrongPassphrase(location=backend.location)
        return cls(backend, config, ObjectCodec(keys))

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- chunks -----------------------------------------------------------------------------
    def install_path(self, manifest_id: str) -> str:
        return install_path(self.id, manifest_id)

    def store_chunk(self, digest: bytes, data: Buffer) -> int:
        """Seal and store a chunk (unless it is there already); returns the stored size."""
        size, finish = self.begin_store_chunk(digest, data)
        finish()
        return size

    def begin_store_chunk(self, digest: bytes, data: Buffer) -> tuple[int, Callable[[], None]]:
        """:meth:`store_chunk` in two steps (:meth:`Backend.begin_put`): seal the chunk and
        start its write now (sealed in a buffer the backend lent, the write itself may be left
        to the call); the call returned completes the store (written, flushed, under its name,
        in the index) and needs neither ``data`` nor anything of the caller's. Its stored size."""
        digest_hex = digest.hex()
        blob = self.codec.encode_lent(digest, data, self.backend.lend_buffer)  # sealed where it is written from
        finish_put = self.backend.begin_put(chunk_key(digest_hex), blob, overwrite=False)

        def finish() -> None:
            finish_put()
            if self.index is not None:
                self.index.add(digest_hex)

        return len(blob), finish

    def has_chunk(self, digest_hex: str) -> bool:
        """Whether the repository holds the chunk: this host's index when it has a usable one
        (no request: what it does not name was never stored or seen here, and a store of it
        is a no-op when another host stored it meanwhile), else one existence request."""
        if self.index is not None and self.index.usable:
            return self.index.has(digest_hex)
        return not self.missing_chunks([digest_hex])

    def load_chunk(self, digest_hex: str) -> bytes | bytearray:
        """A chunk's plain bytes, checked; IntegrityError when damaged or missing."""
        return self.codec.decode(bytes.fromhex(digest_hex), self._chunk_blob(digest_hex), f"chunk {digest_hex}")

    def load_chunk_into(self, digest_hex: str, out: memoryview) -> int:
        """A chunk's plain bytes written into ``out`` (a writable buffer at least as long as
        the chunk), checked as :meth:`load_chunk` checks them; their length. Decoded straight
        into ``out`` (a restore's aligned write buffer, see :meth:`ObjectCodec.decode_into`)."""
        # the stored object is passed, not kept here: the codec drops it once it is decrypted
        return self.codec.decode_into(
            bytes.fromhex(digest_hex), self._chunk_blob(digest_hex), out, f"chunk {digest_hex}"
        )

    def _chunk_blob(self, digest_hex: str) -> bytes | bytearray:
        try:
            return self.backend.get(chunk_key(digest_hex))
        except ObjectNotFound:
            raise IntegrityError(detail=f"chunk {digest_hex} is missing from {self.location}") from None

    def missing_chunks(self, digests: Iterable[str]) -> set[str]:
        keys = {chunk_key(digest): digest for digest in digests}
        return {keys[key] for key in self.backend.missing(keys)}

    # -- manifests --------------------------------------------------------------------------
    def save_manifest(self, manifest: Manifest) -> str:
        plain = dump_json(manifest.to_json())
        digest = self.codec.digest(plain)
        manifest_id = digest.hex()
        self.commit_manifest(manifest_id, self.codec.encode(digest, plain))
        return manifest_id

    def commit_manifest(self, manifest_id: str, blob: bytes | bytearray) -> None:
        """Store a sealed manifest, after making every chunk stored so far durable, and
        durably: the one step that makes a backup exist."""
        self.backend.flush()
        self.backend.put(manifest_key(manifest_id), blob, overwrite=False)
        self.backend.flush()

    def load_manifest(self, manifest_id: str) -> Manifest:
        try:
            blob = self.backend.get(manifest_key(manifest_id))
        except ObjectNotFound:
            raise BackupNotFound(location=self.location, backup=manifest_id) from None
        plain = self.codec.decode(bytes.fromhex(manifest_id), blob, f"manifest {manifest_id}")
        return Manifest.from_json(json.loads(plain))

    def manifest_ids(self, prefix: str = "") -> list[str]:
        """The ids of the backups (whose id starts with ``prefix``): one listing."""
        return [info.key.rsplit("/", 1)[1] for info in self.backend.list(f"manifests/{prefix}")]

    def backups(self) -> list[BackupEntry]:
        """Every backup, oldest first."""
        entries = [BackupEntry(mid, self.load_manifest(mid)) for mid in self.manifest_ids()]
        entries.sort(key=lambda entry: (entry.manifest.created, entry.id))
        return entries

    def resolve(self, prefix: str) -> str:
        """The full id of the backup whose id starts with ``prefix`` (at least 6 hex digits)."""
        prefix = prefix.lower()
        if len(prefix) < 6 or any(c not in "0123456789abcdef" for c in prefix):
            raise UsageError(detail=f"backup id {prefix!r} must be at least 6 hex digits")
        if len(prefix) == ID_HEX:
            return prefix  # a whole id: no listing (loading it says whether it exists)
        matches = [mid for mid in self.manifest_ids(prefix) if mid.startswith(prefix)]
        if not matches:
            raise BackupNotFound(location=self.location, backup=prefix)
        if len(matches) > 1:
            raise UsageError(detail=f"backup id {prefix!r} is ambiguous ({len(matches)} backups match)")
        return matches[0]

    def delete_manifest(self, manifest_id: str) -> None:
        """Delete a backup's manifest (gc frees its chunks); BackupProtected while it is
        protected (:meth:`protect`)."""
        if self.is_protected(manifest_id):
            raise BackupProtected(what="backup", uuid=manifest_id[:12], action="delete")
        self.backend.delete(manifest_key(manifest_id))

    # -- protection: backups no delete or prune removes ------------------------------------
    def protect(self, manifest_id: str) -> None:
        """Mark a backup protected: :meth:`delete_manifest` and prune refuse it until
        :meth:`unprotect`. BackupNotFound for a backup the repository does not hold."""
        if not self.backend.exists(manifest_key(manifest_id)):
            raise BackupNotFound(location=self.location, backup=manifest_id)
        self.backend.put(protected_key(manifest_id), b"")

    def unprotect(self, manifest_id: str) -> None:
        """Lift the protection of a backup (idempotent)."""
        self.backend.delete(protected_key(manifest_id))

    def is_protected(self, manifest_id: str) -> bool:
        return self.backend.exists(protected_key(manifest_id))

    def protected_ids(self) -> set[str]:
        """The ids of every protected backup: one listing."""
        return {info.key.rsplit("/", 1)[1] for info in self.backend.list("protected/")}

    # -- heads: the newest backup of each volume --------------------------------------------
    def head_key(self, volume: str) -> str:
        """Where the newest backup of ``volume`` (a path) is named: by the (keyed) hash of the
        path, so an encrypted repository does not show its volumes' paths."""
        return f"heads/{self.codec.digest(volume.encode()).hex()[:32]}"

    def write_head(self, volume: str, manifest_id: str) -> None:
        """Record ``manifest_id`` as the newest backup of ``volume`` (after its commit)."""
        self.backend.put(self.head_key(volume), json.dumps({"id": manifest_id}).encode())

    def head(self, volume: str, *, stream: bool = False) -> BackupEntry | None:
        """The newest backup of ``volume`` (a volume path, or a stream's source) as its head
        records it, checked: the manifest exists and is of that volume and kind. None when
        there is no head or it does not hold."""
        try:
            manifest_id = str(json.loads(self.backend.get(self.head_key(volume)))["id"])
            manifest = self.load_manifest(manifest_id)
        except (ObjectNotFound, BackupNotFound, ValueError, KeyError, TypeError):
            return None
        if manifest.volume != volume or manifest.is_stream != stream:
            return None
        return BackupEntry(manifest_id, manifest)

    def newest(self, volume: str, *, stream: bool = False) -> BackupEntry | None:
        """The newest backup of ``volume``: its head (one read) when that holds, else found by
        reading every manifest (a repository of an earlier version, a head whose backup was
        pruned), and the head written for next time."""
        head = self.head(volume, stream=stream)
        if head is not None:
            return head
        same = [e for e in self.backups() if e.manifest.volume == volume and e.manifest.is_stream == stream]
        if not same:
            return None
        self.record_newest(volume, same[-1].id)
        return same[-1]

    def record_newest(self, volume: str, manifest_id: str) -> None:
        """Write the head of ``volume`` after a commit; best effort: a head that is missing or
        behind only costs the next backup a listing or a less recent parent."""
        try:
            self.write_head(volume, manifest_id)
        except BlockvaultError as exc:
            log.warning("repo.head_not_written volume=%s error=%s", volume, exc)
