"""sync into a storage server's repository with keys (real server processes): the server cannot
check such objects against their names, so sync reads back every chunk the target claims to
hold that no manifest it trusts references; a garbage object planted on the server's disk
fails the sync, naming it, before any manifest is committed."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.errors import IntegrityError
from shared.repository.backup import backup_volume
from shared.repository.repo import Repository, chunk_key, manifest_key
from shared.repository.restore import restore_backup
from shared.repository.sync import sync
from tests.conftest import MiB
from tests.storage_server_fixtures import StorageServer

Start = Callable[..., StorageServer]
PASSPHRASE, SITE, ADMIN = "sync-passphrase", "site-a-token-1111", "admin-token-3333"
CHUNK = 256 * 1024


def encrypted_pair(start: Start, tmp_path: Path) -> tuple[Repository, StorageServer, Repository]:
    """An encrypted local source, a server with a site token, and the site's copy of the source."""
    src = Repository.init(str(tmp_path / "src"), encrypt=True, passphrase=PASSPHRASE, chunk_size=CHUNK)
    server = start(tmp_path / "root", site_tokens={"site-a": SITE}, admin_token=ADMIN, global_token=False)
    target = Repository.init(server.backend("site-a", token=SITE), like=src, passphrase=PASSPHRASE)
    return src, server, target


@dataclass
class Synced:
    """A first backup synced to the target, and a second one (changed bytes) not yet."""

    src: Repository
    server: StorageServer
    target: Repository
    volume: Path
    first: str
    second: str

    def coming(self) -> list[str]:
        """The chunks of the second backup that the first does not have."""
        referenced = self.src.load_manifest(self.first).referenced()
        return sorted(self.src.load_manifest(self.second).referenced() - referenced)

    def plant(self, key: str, data: bytes) -> None:
        """Put ``data`` under ``key`` on the server's disk, where no check sees it."""
        path = self.server.root / "site-a" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def synced_then_changed(start: Start, make_raw: Callable[..., Path], tmp_path: Path, changed: int) -> Synced:
    src, server, target = encrypted_pair(start, tmp_path)
    volume = make_raw(size=8 * MiB)
    first = backup_volume(src, str(volume))
    assert sync(src, target, [first.id]).chunksVerified == 0  # nothing was there to trust or doubt
    with volume.open("r+b") as handle:
        handle.seek(1 * MiB)
        handle.write(os.urandom(changed))
    second = backup_volume(src, str(volume), parent=first.id)
    return Synced(src, server, target, volume, first.id, second.id)


def test_a_planted_chunk_fails_the_sync_naming_it_and_nothing_is_committed(
    start_storage_server: Start, make_raw: Callable[..., Path], tmp_path: Path
) -> None:
    synced = synced_then_changed(start_storage_server, make_raw, tmp_path, 2 * MiB)
    src, server, target, second = synced.src, synced.server, synced.target, synced.second
    coming = synced.coming()
    assert len(coming) >= 8
    synced.plant(chunk_key(coming[3]), os.urandom(3000))  # garbage under the name the next sync needs

    before = server.stats()
    with pytest.raises(IntegrityError, match=coming[3]):
        sync(src, target, [second])
    after = server.stats()
    assert target.manifest_ids() == [synced.first]  # no Ready copy that would not restore
    # read back: the planted chunk and the parent manifest (from the target), never the parent's chunks
    assert after["bytesSent"] - before["bytesSent"] < 3000 + 16 * 1024

    # Once the admin removes it, the sync completes; a genuine copy put there by another writer
    # is read back (verified) instead of sent again.
    Repository.open(server.backend("site-a", token=ADMIN), PASSPHRASE).backend.delete(chunk_key(coming[3]))
    synced.plant(chunk_key(coming[5]), (tmp_path / "src" / chunk_key(coming[5])).read_bytes())
    received = server.stats()["bytesReceived"]
    report = sync(src, target, [second])
    wire = server.stats()["bytesReceived"] - received
    assert report.backups == [second]
    assert (report.chunksVerified, report.chunksCopied) == (1, len(coming) - 1)  # the failed sync copied nothing
    lacking = report.bytesCopied + src.backend.stat(manifest_key(second)).size
    assert lacking <= wire <= lacking * 1.05 + 32 * 1024  # locks and the batch questions
    restored = tmp_path / "restored.raw"
    restore_backup(target, second, str(restored))
    assert restored.read_bytes() == synced.volume.read_bytes()


def test_a_planted_manifest_under_an_asked_for_id_fails_the_sync(
    start_storage_server: Start, make_raw: Callable[..., Path], tmp_path: Path
) -> None:
    synced = synced_then_changed(start_storage_server, make_raw, tmp_path, 1 * MiB)
    synced.plant(manifest_key(synced.second), os.urandom(500))  # "already synced", says the listing
    with pytest.raises(IntegrityError, match=f"manifest {synced.second}"):
        sync(synced.src, synced.target, [synced.second])


def test_an_incremental_sync_reads_back_nothing_its_parent_covers(
    start_storage_server: Start, make_raw: Callable[..., Path], tmp_path: Path
) -> None:
    synced = synced_then_changed(start_storage_server, make_raw, tmp_path, 1 * MiB)
    sent = synced.server.stats()["bytesSent"]
    report = sync(synced.src, synced.target, [synced.second])
    assert report.chunksVerified == 0 and report.chunksCopied == len(synced.coming())
    assert synced.server.stats()["bytesSent"] - sent < 16 * 1024  # the parent manifest, the listings
