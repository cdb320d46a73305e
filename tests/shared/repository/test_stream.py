"""Stream backups: content-defined chunks of a byte stream (database dumps) in the repository."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.errors import IntegrityError, UsageError
from shared.repository.backup import backup_volume
from shared.repository.maintenance import Policy, gc, prune, verify
from shared.repository.manifest import Manifest
from shared.repository.repo import Repository, chunk_key, manifest_key
from shared.repository.restore import restore_backup
from shared.repository.stream import backup_stream, chunk_sizes, cut_stream, restore_stream
from shared.repository.sync import sync
from tests.conftest import ROOT, Cli, MiB


def sql_text(lines: int, seed: int = 7) -> list[str]:
    """Lines that look like a plain pg_dump: COPY rows of a few tables."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        if i % 5000 == 0:
            out.append(f'COPY "public"."t{i // 5000}" ("uuid", "name", "size", "created") FROM stdin;\n')
        out.append(f"{rng.getrandbits(128):032x}\tvolume-{i}\t{rng.randint(0, 10**12)}\t2026-11-{1 + i % 28:02d}\n")
    return out


def roundtrip(repo: Repository, data: bytes, **kwargs: str) -> str:
    result = backup_stream(repo, io.BytesIO(data), source=kwargs.get("source", "database:test"))
    assert result.size == len(data) and result.md5 == hashlib.md5(data).hexdigest()
    out = io.BytesIO()
    assert restore_stream(repo, result.id, out) == len(data)
    assert out.getvalue() == data
    return result.id


@pytest.mark.parametrize("encrypt", [False, True])
def test_roundtrip_sizes_and_kinds(tmp_path: Path, encrypt: bool) -> None:
    repo = Repository.init(str(tmp_path / "r"), encrypt=encrypt, passphrase="pw", chunk_size=64 * 1024)
    rng = random.Random(1)
    text = "".join(sql_text(30000)).encode()
    for data in (b"", b"x", rng.randbytes(1000), rng.randbytes(3 * MiB + 17), text, text[: 64 * 1024]):
        mid = roundtrip(repo, data)
        manifest = repo.load_manifest(mid)
        assert manifest.is_stream and manifest.kind == "stream" and manifest.mode == "full"
        assert sum(manifest.sizes) == len(data) == manifest.size == manifest.stored_size
        assert all(manifest.chunks) and len(manifest.chunks) == len(manifest.sizes)
        assert max(manifest.sizes, default=0) <= repo.chunk_size
    assert verify(repo, read_data=True).ok


def test_chunks_are_bounded_and_content_defined() -> None:
    sizes = chunk_sizes(4 * MiB)
    assert (sizes.min, sizes.avg, sizes.max) == (256 * 1024, MiB, 4 * MiB)
    small = chunk_sizes(4096)
    assert small.max == 4096
    data = random.Random(3).randbytes(5 * MiB)
    # block boundaries never change the cuts
    cuts_a = [len(c) for c in cut_stream(io.BytesIO(data), chunk_sizes(256 * 1024), block=512 * 1024)]
    cuts_b = [len(c) for c in cut_stream(io.BytesIO(data), chunk_sizes(256 * 1024), block=3 * MiB + 5)]
    assert cuts_a == cuts_b and sum(cuts_a) == len(data) and max(cuts_a) <= 256 * 1024


def test_dump_with_small_changes_deduplicates(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"))
    lines = sql_text(300_000)
    first_data = "".join(lines).encode()
    assert len(first_data) > 20 * MiB
    first = backup_stream(repo, io.BytesIO(first_data), source="database:catalog")
    lines[50:50] = [f"inserted row {i}\n" for i in range(5)]
    for i in range(150_000, 150_020, 4):
        lines[i] = lines[i].replace("volume-", "renamed-")
    second_data = "".join(lines).encode()
    second = backup_stream(repo, io.BytesIO(second_data), source="database:catalog")
    assert first.newChunks == first.chunks
    assert second.newChunks <= 5, second
    assert second.bytesWritten < second.size // 5
    out = io.BytesIO()
    restore_stream(repo, second.id, out)
    assert out.getvalue() == second_data
    again = backup_stream(repo, io.BytesIO(second_data), source="database:catalog")
    assert again.newChunks == 0 and again.bytesWritten == 0


KILLED = """
import io, random, sys
from shared.repository.repo import Repository
from shared.repository.stream import backup_stream
repo = Repository.open(sys.argv[1])
data = random.Random(5).randbytes(2 * 1024 * 1024)
backup_stream(repo, io.BytesIO(data), source="database:test")
"""


def test_stream_killed_midway_leaves_no_manifest(tmp_path: Path) -> None:
    location = str(tmp_path / "r")
    repo = Repository.init(location, chunk_size=64 * 1024)
    kept = roundtrip(repo, b"an earlier dump\n" * 1000)
    env = {**os.environ, "BLOCKVAULT_FAILPOINTS": "stream.chunk_stored=3:kill"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED), location], env=env, cwd=ROOT, capture_output=True, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert repo.manifest_ids() == [kept]
    assert verify(repo, read_data=True).ok
    report = gc(repo)
    assert report.chunksDeleted >= 3
    assert verify(repo, read_data=True).ok


def test_exception_from_the_reader_leaves_no_manifest(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), chunk_size=64 * 1024)

    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self.sent = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
            if self.sent > MiB:
                raise OSError("producer died")
            buffer[:4096] = os.urandom(4096)
            self.sent += 4096
            return 4096

    with pytest.raises(OSError, match="producer died"):
        backup_stream(repo, Broken(), source="database:test")  # type: ignore[arg-type]
    assert repo.manifest_ids() == []


def test_damaged_chunk_and_wrong_md5_are_detected(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), chunk_size=64 * 1024)
    data = random.Random(2).randbytes(400 * 1024)
    mid = roundtrip(repo, data)
    manifest = repo.load_manifest(mid)
    victim = manifest.chunks[1]
    assert victim
    path = tmp_path / "r" / chunk_key(victim)
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(IntegrityError):
        restore_stream(repo, mid, io.BytesIO())
    assert not verify(repo, read_data=True).ok
    path.write_bytes(original)
    # a manifest whose MD5 does not match its chunks (as if written by a buggy producer)
    bad = Manifest.from_json({**manifest.to_json(), "md5": "0" * 32})
    bad_id = repo.save_manifest(bad)
    with pytest.raises(IntegrityError, match="MD5"):
        restore_stream(repo, bad_id, io.BytesIO())
    short = Manifest.from_json({**manifest.to_json(), "size": manifest.size + 1})
    with pytest.raises(IntegrityError, match="do not add up"):
        restore_stream(repo, repo.save_manifest(short), io.BytesIO())


def test_stream_manifests_live_beside_volume_backups(tmp_path: Path, make_raw: Callable[..., Path], cli: Cli) -> None:
    location = str(tmp_path / "r")
    repo = Repository.init(location, chunk_size=256 * 1024)
    volume = make_raw(size=4 * MiB)
    first_volume = backup_volume(repo, str(volume))
    data = "".join(sql_text(20000)).encode()
    streams = [
        backup_stream(repo, io.BytesIO(data + str(i).encode()), source="database:a", fmt="pg_dump") for i in range(3)
    ]
    other = backup_stream(repo, io.BytesIO(data), source="database:b", fmt="pg_dump")
    # a volume backup never takes a stream as its parent
    second_volume = backup_volume(repo, str(volume))
    assert second_volume.parent == first_volume.id and second_volume.mode == "incremental"
    with pytest.raises(UsageError, match="stream"):
        backup_volume(repo, str(volume), parent=streams[0].id)
    # restoring a stream as a volume is refused, nothing is created
    target = tmp_path / "out.raw"
    with pytest.raises(UsageError, match="not a volume"):
        restore_backup(repo, streams[0].id, str(target))
    assert not target.exists()
    with pytest.raises(UsageError, match="not a stream"):
        restore_stream(repo, first_volume.id, io.BytesIO())
    # repo ls lists them
    listed = {row["id"]: row for row in cli.json("repo", "ls", location)}
    assert listed[streams[0].id]["volume"] == "database:a" and listed[streams[0].id]["format"] == "pg_dump"
    assert listed[streams[0].id]["storedSize"] == len(data) + 1
    assert len(listed) == 6
    # the manifest on disk: kind, sizes, md5; volume manifests keep their old form
    blob = repo.backend.get(manifest_key(streams[0].id))
    plain = json.loads(repo.codec.decode(bytes.fromhex(streams[0].id), blob, "m"))
    assert plain["kind"] == "stream" and plain["md5"] == hashlib.md5(data + b"0").hexdigest()
    plain = json.loads(
        repo.codec.decode(bytes.fromhex(first_volume.id), repo.backend.get(manifest_key(first_volume.id)), "m")
    )
    assert "kind" not in plain and "sizes" not in plain
    # prune groups streams by source, volumes by path
    report = prune(repo, Policy(keep_last=1))
    assert sorted(report.kept) == sorted([streams[-1].id, other.id, second_volume.id])
    # gc keeps what the remaining streams reference
    gc(repo)
    assert verify(repo, read_data=True).ok
    out = io.BytesIO()
    restore_stream(repo, streams[-1].id, out)
    assert out.getvalue() == data + b"2"
    # sync copies a stream backup like any other
    dst = Repository.init(str(tmp_path / "dst"), like=repo)
    copied = sync(repo, dst, [other.id])
    assert copied.backups == [other.id]
    out = io.BytesIO()
    restore_stream(dst, other.id, out)
    assert out.getvalue() == data
    assert verify(dst, read_data=True).ok
