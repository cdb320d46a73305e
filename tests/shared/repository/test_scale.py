"""A backup's cost does not grow with what the repository holds: its parent comes from the
volume's head (no listing of manifests), chunk existence from this host's index (no request
per chunk), and every shortcut falls back to a correct plan when what it relies on is stale,
missing or pruned; gc never lets an index name a chunk it removed."""

from __future__ import annotations

import collections
import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.repository.backends import Backend, FileBackend, open_backend
from shared.repository.backends.base import Buffer, ObjectInfo
from shared.repository.backup import backup_volume
from shared.repository.chunkindex import deleted_key
from shared.repository.keys import dump_json
from shared.repository.maintenance import Policy, gc, prune, verify
from shared.repository.manifest import Manifest
from shared.repository.repo import Repository, manifest_key
from shared.repository.restore import restore_backup
from tests.conftest import MiB

CHUNK = 64 * 1024


class Counting(Backend):
    """A backend that counts the calls made to it (each is a request on a remote store)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.location = inner.location
        self.calls: collections.Counter[str] = collections.Counter()

    def put(self, key: str, data: Buffer, *, overwrite: bool = True) -> None:
        self.calls["put"] += 1
        self.inner.put(key, data, overwrite=overwrite)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self.calls["get"] += 1
        return self.inner.get(key, offset, length)

    def stat(self, key: str) -> ObjectInfo:
        self.calls["stat"] += 1
        return self.inner.stat(key)

    def delete(self, key: str) -> None:
        self.calls["delete"] += 1
        self.inner.delete(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self.calls[f"list {prefix.split('/', maxsplit=1)[0]}"] += 1
        return self.inner.list(prefix)

    def missing(self, keys: Iterable[str]) -> set[str]:
        self.calls["missing"] += 1
        return self.inner.missing(keys)

    def flush(self) -> None:
        self.calls["flush"] += 1
        self.inner.flush()

    def create(self) -> None:
        self.inner.create()

    def total(self) -> int:
        return sum(self.calls.values())


def synthetic_manifests(repo: Repository, count: int, store: Callable[[str, bytes], None]) -> None:
    """``count`` backups of other volumes, written straight into the store (as if many
    volumes had been backed up here before)."""
    for number in range(count):
        manifest = Manifest(
            volume=f"/srv/other/{number}.raw",
            format="raw",
            size=CHUNK,
            chunkSize=repo.chunk_size,
            chunks=[None],
            mode="full",
            name=f"synthetic {number}",
            hostname="elsewhere",
        )
        plain = dump_json(manifest.to_json())
        digest = repo.codec.digest(plain)
        store(manifest_key(digest.hex()), bytes(repo.codec.encode(digest, plain)))


def volume_file(path: Path, size: int = 2 * MiB, seed: int = 7) -> Path:
    import random

    rng = random.Random(seed)
    with open(path, "wb") as handle:
        for _ in range(size // CHUNK):
            handle.write(rng.randbytes(CHUNK // 2) + bytes(CHUNK // 2))
    return path


def requests_of_an_unchanged_incremental(repo: Repository, counting: Counting, volume: Path) -> dict[str, int]:
    counting.calls.clear()
    result = backup_volume(repo, str(volume))
    assert result.mode == "incremental" and result.newChunks == 0
    return dict(counting.calls)


def test_requests_per_incremental_do_not_grow_with_the_manifests_file(tmp_path: Path) -> None:
    counting = Counting(FileBackend(tmp_path / "repo"))
    repo = Repository.init(counting, chunk_size=CHUNK)
    repo.use_index(tmp_path / "index")
    volume = volume_file(tmp_path / "vol.raw")
    assert backup_volume(repo, str(volume)).mode == "full"
    few = requests_of_an_unchanged_incremental(repo, counting, volume)

    def write(key: str, blob: bytes) -> None:  # straight into the folder: 20,000 fsyncs would be minutes
        target = tmp_path / "repo" / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob)

    synthetic_manifests(repo, 20_000, write)
    assert len(repo.manifest_ids()) > 20_000
    many = requests_of_an_unchanged_incremental(repo, counting, volume)
    assert many == few
    assert "list manifests" not in many and "missing" not in many, many


def test_requests_per_incremental_do_not_grow_with_the_manifests_s3(tmp_path: Path, s3_server: Any) -> None:
    bucket = s3_server.make_bucket("bv-scale")
    inner = open_backend(f"s3://{bucket}/{uuid.uuid4().hex}", s3_server.options(bucket))
    counting = Counting(inner)
    repo = Repository.init(counting, chunk_size=CHUNK)
    repo.use_index(tmp_path / "index")
    volume = volume_file(tmp_path / "vol.raw", size=1 * MiB)
    backup_volume(repo, str(volume))
    few = requests_of_an_unchanged_incremental(repo, counting, volume)
    synthetic_manifests(repo, 1_000, inner.put)
    many = requests_of_an_unchanged_incremental(repo, counting, volume)
    assert many == few
    assert "list manifests" not in many and "missing" not in many, many


def test_chunks_held_for_other_volumes_cost_no_request_each(tmp_path: Path) -> None:
    """A new volume whose data the repository holds already (a VM cloned from a template):
    no existence request per chunk, nothing stored again; without an index, one each."""
    counting = Counting(FileBackend(tmp_path / "repo"))
    repo = Repository.init(counting, chunk_size=CHUNK)
    template = volume_file(tmp_path / "template.raw")
    backup_volume(repo, str(template))
    clone = volume_file(tmp_path / "clone.raw")
    counting.calls.clear()
    assert backup_volume(repo, str(clone)).newChunks == 0
    without = counting.calls["missing"]
    assert without == 2 * MiB // CHUNK  # a request per chunk
    repo.use_index(tmp_path / "index")
    counting.calls.clear()
    assert backup_volume(repo, str(volume_file(tmp_path / "clone2.raw")), full=True).newChunks == 0
    assert counting.calls["missing"] == 0 and counting.calls["list chunks"] == 1  # filled once
    counting.calls.clear()
    assert backup_volume(repo, str(volume_file(tmp_path / "clone3.raw")), full=True).newChunks == 0
    assert counting.calls["missing"] == 0 and counting.calls["list chunks"] == 0  # warm


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    made = Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)
    made.use_index(tmp_path / "index")
    return made


def test_a_missing_stale_or_forged_head_falls_back_to_the_right_parent(repo: Repository, tmp_path: Path) -> None:
    volume = volume_file(tmp_path / "vol.raw")
    first = backup_volume(repo, str(volume))
    second = backup_volume(repo, str(volume))
    assert second.parent == first.id
    head = repo.head_key(str(volume))
    # missing: found by reading every manifest, and written again
    repo.backend.delete(head)
    third = backup_volume(repo, str(volume))
    assert third.parent == second.id and json.loads(repo.backend.get(head))["id"] == third.id
    # behind (a crash between commit and head): a parent that is older, still right
    repo.backend.put(head, json.dumps({"id": first.id}).encode())
    assert backup_volume(repo, str(volume)).parent == first.id
    # pointing to a pruned backup, or to another volume's, or garbage: the newest one again
    other = backup_volume(repo, str(volume_file(tmp_path / "other.raw", seed=3)))
    newest = repo.newest(str(volume))
    assert newest is not None
    for planted in ({"id": "0" * 64}, {"id": other.id}, {"no": "id"}):
        repo.backend.put(head, json.dumps(planted).encode())
        assert repo.head(str(volume)) is None
        assert backup_volume(repo, str(volume)).parent == newest.id
        newest = repo.newest(str(volume))
        assert newest is not None
    repo.backend.put(head, b"not json")
    assert backup_volume(repo, str(volume)).parent == newest.id
    # verify rewrites a head that is behind
    repo.backend.put(head, json.dumps({"id": first.id}).encode())
    assert verify(repo).ok
    assert json.loads(repo.backend.get(head))["id"] == repo.newest(str(volume)).id  # type: ignore[union-attr]


def test_gc_between_backups_never_lets_a_warm_index_reference_a_removed_chunk(repo: Repository, tmp_path: Path) -> None:
    volume = volume_file(tmp_path / "vol.raw")
    first = backup_volume(repo, str(volume))
    assert first.newChunks > 0
    # the only backup goes, gc removes its chunks; the index was warm with all of them
    repo.delete_manifest(first.id)
    repo.backend.delete(repo.head_key(str(volume)))
    assert gc(repo).chunksDeleted == first.newChunks
    again = backup_volume(repo, str(volume))
    assert again.mode == "full" and again.newChunks == first.newChunks  # stored again, not assumed
    report = verify(repo, read_data=True)
    assert report.ok, [p.describe() for p in report.problems]
    restore_backup(repo, again.id, str(tmp_path / "restored.raw"))
    assert (tmp_path / "restored.raw").read_bytes() == volume.read_bytes()


def test_another_hosts_gc_reaches_this_hosts_index(tmp_path: Path) -> None:
    location = str(tmp_path / "repo")
    here = Repository.init(location, chunk_size=CHUNK)
    here.use_index(tmp_path / "index-here")
    there = Repository.open(location)
    there.use_index(tmp_path / "index-there")
    shared_data = volume_file(tmp_path / "a.raw")
    first = backup_volume(here, str(shared_data))
    # the other host backs up the same data (its index fills from one listing: nothing is stored twice)
    copy = volume_file(tmp_path / "b.raw")
    assert backup_volume(there, str(copy)).newChunks == 0
    # the other host prunes and gcs: the deletion list reaches this host's index
    there.delete_manifest(first.id)
    for manifest_id in there.manifest_ids():
        there.delete_manifest(manifest_id)
    deleted = gc(there).chunksDeleted
    assert deleted == first.newChunks
    assert backup_volume(here, str(shared_data)).newChunks == deleted
    # a deletion list that is gone: the index starts over from a listing (and is right)
    for manifest_id in here.manifest_ids():
        here.delete_manifest(manifest_id)
    gc(there)
    here.backend.delete(deleted_key(2))
    assert backup_volume(here, str(shared_data)).newChunks == deleted
    assert verify(here, read_data=True).ok


def test_two_hosts_with_their_own_indexes_write_one_repository(tmp_path: Path) -> None:
    location = str(tmp_path / "repo")
    hosts = []
    for name in ("h1", "h2"):
        repo = Repository.init(location, chunk_size=CHUNK) if not hosts else Repository.open(location)
        repo.use_index(tmp_path / f"index-{name}")
        hosts.append(repo)
    volumes = [volume_file(tmp_path / f"v{i}.raw", seed=i % 2) for i in range(4)]  # pairs share chunks
    results = [backup_volume(hosts[i % 2], str(v)) for i, v in enumerate(volumes)]
    results += [backup_volume(hosts[i % 2], str(v)) for i, v in enumerate(volumes)]
    assert sum(r.newChunks for r in results[4:]) == 0
    prune(hosts[0], Policy(keep_last=1))
    gc(hosts[1])
    more = [backup_volume(hosts[(i + 1) % 2], str(v)) for i, v in enumerate(volumes)]
    assert verify(hosts[0], read_data=True).ok
    for result, volume in zip(more, volumes, strict=True):
        target = tmp_path / f"restored-{result.id[:8]}.raw"
        restore_backup(hosts[0], result.id, str(target))
        assert target.read_bytes() == volume.read_bytes()
