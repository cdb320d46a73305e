"""A full disk under the file backend and under a storage-server: StorageFull (STORAGE_FULL),
never retried, nothing half-written left behind, and the repository still verifies."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.errors import StorageFull
from shared.repository.backends.file import FileBackend
from shared.repository.backends.http import Status
from shared.repository.backup import backup_volume
from shared.repository.maintenance import verify
from shared.repository.repo import Repository
from tests.conftest import MiB
from tests.full_disk import fill
from tests.storage_server_fixtures import StorageServer


def test_the_file_backend_says_storage_full_and_keeps_no_partial_object(small_disk: Path) -> None:
    backend = FileBackend(small_disk / "repo")
    backend.create()
    backend.put("data/one", b"x" * 4096)
    filler = fill(small_disk)
    with pytest.raises(StorageFull) as full:
        backend.put("data/two", os.urandom(MiB))
    assert full.value.code == "STORAGE_FULL" and not full.value.retryable
    assert "full" in str(full.value) and "No space left" in str(full.value)
    assert list((small_disk / "repo" / "tmp").iterdir()) == []
    filler.unlink()
    backend.put("data/two", b"y")
    assert backend.get("data/two") == b"y"


def test_a_backup_to_a_full_storage_server_fails_with_storage_full_and_the_repository_verifies(
    start_storage_server: Callable[..., StorageServer], small_disk: Path, tmp_path: Path
) -> None:
    server = start_storage_server(small_disk / "root", token="full-disk-token")
    repository = Repository.init(server.backend("site"))
    volume = tmp_path / "volume.raw"
    volume.write_bytes(os.urandom(4 * MiB))
    first = backup_volume(repository, str(volume), full=True, name="first")
    filler = fill(small_disk)
    with open(volume, "r+b") as handle:
        handle.write(os.urandom(2 * MiB))
    with pytest.raises(StorageFull) as full:
        backup_volume(repository, str(volume), full=True, name="no-room")
    assert "full" in str(full.value)
    assert Status.for_error(full.value) == Status.INSUFFICIENT_STORAGE
    assert list((small_disk / "root" / "site" / "tmp").iterdir()) == []
    filler.unlink()
    report = verify(repository, None, read_data=True)
    assert report.ok and report.backups == 1, [p.describe() for p in report.problems]
    second = backup_volume(repository, str(volume), full=True, name="after")
    assert set(repository.manifest_ids()) == {first.id, second.id}
