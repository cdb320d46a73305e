"""A backup as a block device: the NBD server (shared.repository.nbdserver) over a backup view
(blockview.py), read by qemu's own NBD client (qemu-img) and by ours, from a local folder, a
storage-server over HTTP and S3 (moto); holes reported, many clients, a bounded cache, damaged
chunks and storages that go away answered with errors, never with wrong bytes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.errors import IntegrityError
from shared.repository.backup import backup_volume
from shared.repository.blockview import BackupView, ChunkCache
from shared.repository.nbd import STATE_HOLE, STATE_ZERO, NBDClient, NBDError
from shared.repository.nbdserver import NBDServer, export_backup
from shared.repository.qemu import nbd_uri
from shared.repository.repo import Repository, chunk_key
from tests.conftest import Cli, MiB
from tests.s3_fixtures import S3Server
from tests.storage_server_fixtures import StorageServer

CHUNK = 256 * 1024


def volume(path: Path, size: int = 12 * MiB, seed: int = 7) -> Path:
    """Data, a run of zeros, holes and an odd-sized tail: every kind of chunk."""
    rng = random.Random(seed)
    with open(path, "wb") as handle:
        handle.truncate(size)
        handle.write(rng.randbytes(3 * MiB + 1234))
        handle.seek(5 * MiB)
        handle.write(bytes(MiB))  # written zeros: no chunk either
        handle.seek(8 * MiB - 4096)
        handle.write(rng.randbytes(2 * MiB))
        handle.seek(size - 777)
        handle.write(rng.randbytes(777))
    return path


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False, timeout=120)


def served(repo: Repository, source: Path, tmp_path: Path) -> tuple[str, str]:
    """(backup id, socket path) of a new backup of ``source``."""
    result = backup_volume(repo, str(source), full=True)
    return result.id, str(tmp_path / "export.sock")


def check_read_back(repo: Repository, source: Path, tmp_path: Path) -> None:
    backup_id, sock = served(repo, source, tmp_path)
    with export_backup(repo, backup_id, sock):
        compare = qemu_img("compare", "-f", "raw", "-F", "raw", str(source), nbd_uri(sock))
        assert compare.returncode == 0, compare.stdout + compare.stderr
        out = tmp_path / "converted.raw"
        convert = qemu_img("convert", "-f", "raw", "-O", "raw", nbd_uri(sock), str(out))
        assert convert.returncode == 0, convert.stderr
    assert out.read_bytes() == source.read_bytes()
    assert out.stat().st_blocks * 512 < source.stat().st_size - 4 * MiB  # holes stayed holes


def test_qemu_reads_a_local_backup_byte_for_byte_and_sees_its_holes(tmp_path: Path) -> None:
    source = volume(tmp_path / "vol.raw")
    repo = Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)
    backup_id, sock = served(repo, source, tmp_path)
    with export_backup(repo, backup_id, sock) as (server, view):
        assert qemu_img("compare", "-f", "raw", "-F", "raw", str(source), nbd_uri(sock)).returncode == 0
        extents = json.loads(qemu_img("map", "--output=json", "-f", "raw", nbd_uri(sock)).stdout)
        holes = [(e["start"], e["length"]) for e in extents if e["zero"] and not e["data"]]
        # from the chunk after the data to the one holding 8 MiB - 4096: holes and written zeros alike
        assert holes == [(3 * MiB + CHUNK, 8 * MiB - CHUNK - (3 * MiB + CHUNK)), (10 * MiB, 2 * MiB - CHUNK)]
        out = tmp_path / "out.raw"
        assert qemu_img("convert", "-f", "raw", "-O", "raw", nbd_uri(sock), str(out)).returncode == 0
        assert server.connections >= 3
        assert view.stats.chunks_fetched <= 2 * len([c for c in view.manifest.chunks if c])
    assert out.read_bytes() == source.read_bytes()
    assert not os.path.exists(sock)  # the export is gone with the block


def test_our_client_reads_block_status_and_is_refused_writes(tmp_path: Path) -> None:
    source = volume(tmp_path / "vol.raw", size=4 * MiB + 777)
    repo = Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)
    backup_id, sock = served(repo, source, tmp_path)
    data = source.read_bytes()
    with export_backup(repo, backup_id, sock), NBDClient.connect_unix(sock, "", ["base:allocation"]) as client:
        assert client.size == len(data) and client.read_only
        assert client.read(0, len(data)) == data
        assert client.read(3 * MiB, 2 * CHUNK) == data[3 * MiB : 3 * MiB + 2 * CHUNK]  # a hole, as zeros
        status = client.block_status("base:allocation")
        assert sum(length for _, length, _ in status) == len(data)
        for offset, length, flags in status:
            hole = bool(flags & STATE_HOLE)
            assert hole == (flags & STATE_ZERO != 0)
            assert (data[offset : offset + length].count(0) == length) or not hole
        assert any(flags & STATE_HOLE for _, _, flags in status)
        with pytest.raises(NBDError):
            client.write(0, b"x" * 512)
        with pytest.raises(NBDError, match=r"EINVAL|outside"):
            client._read_chunk(len(data) - 10, 20, None)  # past the end: refused, the connection lives
        assert client.read(0, 16) == data[:16]
    with export_backup(repo, backup_id, sock), pytest.raises(NBDError, match="does not exist"):
        NBDClient.connect_unix(sock, "another-export")


def test_many_clients_at_once_read_the_right_bytes_through_a_bounded_cache(tmp_path: Path) -> None:
    source = volume(tmp_path / "vol.raw", size=16 * MiB)
    repo = Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)
    backup_id = backup_volume(repo, str(source), full=True).id
    data = source.read_bytes()
    sock = str(tmp_path / "s.sock")
    view = BackupView(repo, backup_id, cache_bytes=4 * CHUNK)
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        with NBDClient.connect_unix(sock) as client:
            for _ in range(60):
                offset = rng.randrange(len(data) - 1)
                length = rng.randrange(1, min(3 * CHUNK, len(data) - offset) + 1)
                if client.read(offset, length) != data[offset : offset + length]:
                    errors.append(f"{seed}: {offset}+{length}")

    with view, NBDServer(view, sock) as server:
        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert server.connections == 8
    assert errors == []
    assert view.cache.size <= 4 * CHUNK
    assert view.cache.misses > len(view.cache._items)  # chunks were dropped and fetched again


def test_a_shared_fetch_and_a_failed_one_are_not_cached() -> None:
    cache = ChunkCache(1024)
    calls: list[int] = []

    def failing() -> bytes:
        calls.append(1)
        raise IntegrityError(detail="damaged")

    for _ in range(2):
        with pytest.raises(IntegrityError):
            cache.get(1, failing)
    assert len(calls) == 2
    assert cache.get(1, lambda: b"a" * 600) == b"a" * 600
    assert cache.get(1, lambda: b"never") == b"a" * 600
    cache.get(2, lambda: b"b" * 600)  # over the capacity: the least recent goes
    assert 1 not in cache and 2 in cache and cache.size == 600


def test_a_damaged_chunk_is_an_error_for_the_reader_never_wrong_bytes(tmp_path: Path) -> None:
    source = volume(tmp_path / "vol.raw", size=2 * MiB)
    repo = Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)
    backup_id, sock = served(repo, source, tmp_path)
    digest = repo.load_manifest(backup_id).chunks[1]
    assert digest is not None
    stored = tmp_path / "repo" / chunk_key(digest)
    blob = bytearray(stored.read_bytes())
    blob[-1] ^= 0xFF
    stored.write_bytes(bytes(blob))
    with export_backup(repo, backup_id, sock) as (server, _view):
        convert = qemu_img("convert", "-f", "raw", "-O", "raw", nbd_uri(sock), str(tmp_path / "out.raw"))
        assert convert.returncode != 0
        assert "Input/output error" in convert.stderr
        assert isinstance(server.error, IntegrityError)
        with NBDClient.connect_unix(sock) as client:  # the rest still reads
            assert client.read(0, CHUNK) == source.read_bytes()[:CHUNK]


def test_a_storage_server_backup_served_over_nbd(
    start_storage_server: Callable[..., StorageServer], tmp_path: Path
) -> None:
    server = start_storage_server(tmp_path / "root")
    repo = Repository.init(server.backend("repo"), chunk_size=CHUNK)
    check_read_back(repo, volume(tmp_path / "vol.raw"), tmp_path)


def test_an_encrypted_s3_backup_served_over_nbd(s3_server: S3Server, tmp_path: Path) -> None:
    from shared.repository.backends import open_backend

    bucket = s3_server.make_bucket()
    backend = open_backend(f"s3://{bucket}/repo", s3_server.options())
    repo = Repository.init(backend, encrypt=True, passphrase="a passphrase", chunk_size=CHUNK)
    check_read_back(repo, volume(tmp_path / "vol.raw"), tmp_path)


def test_a_storage_that_goes_away_fails_reads_and_they_work_again_when_it_is_back(
    start_storage_server: Callable[..., StorageServer], tmp_path: Path
) -> None:
    server = start_storage_server(tmp_path / "root")
    repo = Repository.init(server.backend("repo"), chunk_size=CHUNK)
    source = volume(tmp_path / "vol.raw", size=4 * MiB)
    backup_id, sock = served(repo, source, tmp_path)
    data = source.read_bytes()
    with export_backup(repo, backup_id, sock, cache_bytes=0), NBDClient.connect_unix(sock) as client:
        assert client.read(0, CHUNK) == data[:CHUNK]
        server.kill()
        with pytest.raises(NBDError, match=r"EIO|Input/output"):
            client.read(CHUNK, CHUNK)
        server.start()
        assert client.read(CHUNK, CHUNK) == data[CHUNK : 2 * CHUNK]


def test_repo_serve_nbd_serves_until_terminated(cli: Cli, tmp_path: Path) -> None:
    source = volume(tmp_path / "vol.raw", size=3 * MiB)
    repo_path = str(tmp_path / "repo")
    cli.run("repo", "init", repo_path, check=True)
    backup = cli.json("repo", "backup", repo_path, str(source))
    sock = str(tmp_path / "cli.sock")
    proc = cli.popen("repo", "serve-nbd", repo_path, backup["id"][:8], "--socket", sock, "--json")
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())  # printed once the export listens
        assert info["id"] == backup["id"] and info["size"] == source.stat().st_size
        assert qemu_img("compare", "-f", "raw", "-F", "raw", str(source), info["uri"]).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not os.path.exists(sock)
    bad = cli.run("repo", "serve-nbd", repo_path, "ffffffffff", "--socket", sock)
    assert bad.returncode == 2 and "no backup" in bad.stderr
    occupied = tmp_path / "a-file"
    occupied.write_text("mine")
    refused = cli.run("repo", "serve-nbd", repo_path, backup["id"], "--socket", str(occupied))
    assert refused.returncode == 2 and "cannot serve NBD" in refused.stderr
    assert occupied.read_text() == "mine"  # never removed to make room
