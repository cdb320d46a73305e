"""The restore writer: byte for byte and exactly as sparse as the source, O_DIRECT and its
fallback, block devices written in place, restores killed mid-way, bad targets."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import BackupNotFound, IntegrityError, TargetExists, UsageError, VolumeError
from shared.repository import allocation
from shared.repository.backup import backup_volume
from shared.repository.manifest import Manifest
from shared.repository.repo import Repository, chunk_key
from shared.repository.restore import restore_backup
from shared.repository.volume import ZERO_BLOCK, DeviceWriter, RawReader, RawWriter, nonzero_runs
from tests.conftest import Cli, MiB, qcow2_equal, vm_like_regions, write_regions


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def data_extents(path: Path) -> list[tuple[int, int]]:
    reader = RawReader(str(path))
    try:
        return reader.data_extents()
    finally:
        reader.close()


def digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def test_raw_restore_is_byte_for_byte_and_as_sparse_as_the_source(repo: Repository, tmp_path: Path) -> None:
    volume = tmp_path / "vol.raw"
    # MiB-aligned data regions and holes, some chunks all hole, data up to the last byte
    write_regions(volume, 40 * MiB, [*vm_like_regions(40 * MiB, seed=7), (40 * MiB - 4096, os.urandom(4096))])
    backup = backup_volume(repo, str(volume))
    target = tmp_path / "out.raw"
    writer = RawWriter(tmp_path / "probe.raw", MiB, allocate=[(0, MiB)])
    assert writer.direct  # ext4 under the test's folder takes O_DIRECT: the fast path is the one tested
    assert writer.preallocated  # and fallocate with hole punching: so is preallocation
    writer.abort()
    restore_backup(repo, backup.id, str(target))
    assert digest(target) == digest(volume)
    assert data_extents(target) == data_extents(volume)  # holes exactly where the source has them
    assert allocated(target) <= allocated(volume) + 64 * 1024  # give or take an extent-tree block
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.raw", "repo", "vol.raw"]  # no partial file left


def sparse_chunks(size: int) -> list[tuple[int, bytes]]:
    """1 MiB chunks (with their offsets) whose zero 64 KiB blocks lie at the start, in the
    middle, at the end, everywhere, nowhere; the last chunk ends at ``size`` (not on a 4 KiB
    block) in zeros."""
    block = ZERO_BLOCK
    zero, data = bytes(block), b"\x5a" * block
    shapes = [
        zero * 3 + data * 13,
        data * 5 + zero * 6 + data * 5,
        data * 15 + zero,
        zero * 16,
        data * 16,
        (data + zero) * 8,
    ]
    chunks = [(i * MiB, shape) for i, shape in enumerate(shapes)]
    last = len(shapes) * MiB
    chunks.append((last, data * 8 + bytes(size - last - 8 * block)))
    return chunks


def write_chunks(path: Path, size: int, chunks: list[tuple[int, bytes]], allocate: list[tuple[int, int]]) -> RawWriter:
    writer = RawWriter(path, size, allocate=allocate)
    for offset, data in chunks:
        writer.write(offset, data)
    writer.commit()
    return writer


@pytest.mark.parametrize("batch", [allocation.PUNCH_BATCH, 2], ids=["punched-at-commit", "punched-in-batches"])
def test_preallocated_writes_leave_exactly_the_holes_of_plain_writes(
    tmp_path: Path, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(allocation, "PUNCH_BATCH", batch)
    size = 7 * MiB - 5000
    chunks = sparse_chunks(size)
    plain = tmp_path / "plain.raw"
    assert not write_chunks(plain, size, chunks, allocate=[]).preallocated
    ahead = tmp_path / "ahead.raw"
    assert write_chunks(ahead, size, chunks, allocate=[(0, size)]).preallocated  # every chunk allocated first
    assert ahead.read_bytes() == plain.read_bytes()
    assert data_extents(ahead) == data_extents(plain)
    assert allocated(ahead) == allocated(plain)  # the zero blocks allocated ahead were punched out again
    expected = [(offset + start, length) for offset, data in chunks for start, length in nonzero_runs(data)]
    assert allocated(ahead) >= sum(length for _, length in expected)


def test_preallocation_gives_way_when_whole_chunks_do_not_fit(repo: Repository, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(small)], capture_output=True, text=True, check=False
    )
    assert made.returncode == 0, f"mount -t tmpfs (a small file system for this test) failed: {made.stderr}"
    try:
        volume = tmp_path / "vol.raw"
        # 1 MiB of data in each of five 4 MiB chunks, a chunk of holes between two: 20 MiB of chunks, 5 MiB of data
        write_regions(volume, 40 * MiB, [(i * 8 * MiB + MiB, os.urandom(MiB)) for i in range(5)])
        backup = backup_volume(repo, str(volume))
        runs = [(i * 8 * MiB, 4 * MiB) for i in range(5)]
        writer = RawWriter(small / "probe.raw", 40 * MiB, allocate=runs)
        assert not writer.preallocated  # the third chunk did not fit: nothing is left allocated
        assert allocated(writer.tmp) == 0
        writer.abort()
        target = small / "out.raw"
        restore_backup(repo, backup.id, str(target))  # what the writes allocate fits
        assert digest(target) == digest(volume)
        assert allocated(target) == 5 * MiB
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_manifest_data_runs_are_what_hole_runs_leave() -> None:
    chunks: list[str | None] = ["a", "b", None, "c", None, None, "d"]
    manifest = Manifest(volume="v", format="raw", size=6 * MiB + 100, chunkSize=MiB, chunks=chunks, mode="full")
    assert manifest.data_runs() == [(0, 2 * MiB), (3 * MiB, MiB), (6 * MiB, 100)]
    assert manifest.hole_runs() == [(2 * MiB, MiB), (4 * MiB, 2 * MiB)]


def test_restore_of_a_size_not_a_multiple_of_the_direct_block(repo: Repository, tmp_path: Path) -> None:
    volume = tmp_path / "odd.raw"
    size = 9 * MiB + 1000  # the last chunk ends in a short block written through the page cache
    write_regions(volume, size, [(0, os.urandom(MiB)), (9 * MiB - 10, os.urandom(1010))])
    backup = backup_volume(repo, str(volume))
    target = tmp_path / "out.raw"
    restore_backup(repo, backup.id, str(target))
    assert target.stat().st_size == size
    assert digest(target) == digest(volume)


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A ramfs mount: a file system that refuses O_DIRECT (EINVAL at open)."""
    mount = tmp_path / "ramfs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount)], capture_output=True, text=True, check=False)
    assert made.returncode == 0, f"mount -t ramfs (a file system without O_DIRECT for this test) failed: {made.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_restore_falls_back_to_the_page_cache_where_o_direct_is_refused(
    repo: Repository, tmp_path: Path, ramfs: Path
) -> None:
    writer = RawWriter(ramfs / "probe.raw", MiB, allocate=[(0, MiB)])
    assert not writer.direct  # refused at open: every write goes through the page cache
    assert not writer.preallocated  # ramfs has no fallocate either: the writes allocate
    writer.write(0, b"\1" * MiB)
    writer.commit()
    assert (ramfs / "probe.raw").read_bytes() == b"\1" * MiB
    volume = tmp_path / "vol.raw"
    write_regions(volume, 24 * MiB, vm_like_regions(24 * MiB, seed=3))
    backup = backup_volume(repo, str(volume))
    target = ramfs / "out.raw"
    restore_backup(repo, backup.id, str(target))
    assert digest(target) == digest(volume)  # (ramfs keeps no holes: nothing to compare there)
    assert sorted(p.name for p in ramfs.iterdir()) == ["out.raw", "probe.raw"]


def test_qcow2_restore_is_identical(repo: Repository, tmp_path: Path, make_qcow2: Callable[..., Path]) -> None:
    volume = make_qcow2(size=24 * MiB)
    backup = backup_volume(repo, str(volume))
    target = tmp_path / "out.qcow2"
    restore_backup(repo, backup.id, str(target))
    assert qcow2_equal(target, volume)
    raw = tmp_path / "out.raw"
    restore_backup(repo, backup.id, str(raw))  # the same backup as a raw file
    assert qcow2_equal(raw, volume)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB loop device full of 0xEE bytes (the old content a restore writes over)."""
    backing = tmp_path / "loop-backing.img"
    backing.write_bytes(b"\xee" * 32 * MiB)
    made = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=False)
    assert made.returncode == 0, f"losetup (a loop device for this test) failed: {made.stderr}"
    device = Path(made.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=False)


def read_device(device: Path, length: int) -> bytes:
    with device.open("rb") as handle:
        return handle.read(length)


def test_restore_in_place_to_a_block_device(repo: Repository, tmp_path: Path, loop_device: Path) -> None:
    volume = tmp_path / "vol.raw"
    write_regions(volume, 24 * MiB, vm_like_regions(24 * MiB, seed=5))
    backup = backup_volume(repo, str(volume))
    writer = DeviceWriter(loop_device, 24 * MiB)
    assert writer.direct
    writer.abort()
    restore_backup(repo, backup.id, str(loop_device), in_place=True)
    assert read_device(loop_device, 24 * MiB) == volume.read_bytes()  # holes zeroed
    assert read_device(loop_device, 32 * MiB)[24 * MiB :] == b"\xee" * 8 * MiB  # nothing past the backup touched


def test_restore_in_place_refuses_bad_targets(repo: Repository, tmp_path: Path, loop_device: Path) -> None:
    volume = tmp_path / "vol.raw"
    write_regions(volume, 40 * MiB, [(0, os.urandom(MiB))])
    backup = backup_volume(repo, str(volume))
    with pytest.raises(VolumeError, match="the device has 33554432 bytes"):
        restore_backup(repo, backup.id, str(loop_device), in_place=True)
    with pytest.raises(VolumeError, match="needs a block device"):
        restore_backup(repo, backup.id, str(volume), in_place=True)
    with pytest.raises(UsageError, match="raw data"):
        restore_backup(repo, backup.id, str(loop_device), in_place=True, fmt="qcow2")
    assert read_device(loop_device, MiB) == b"\xee" * MiB


def test_restore_refuses_bad_inputs(repo: Repository, tmp_path: Path) -> None:
    volume = tmp_path / "vol.raw"
    write_regions(volume, 8 * MiB, [(0, os.urandom(MiB))])
    backup = backup_volume(repo, str(volume))
    with pytest.raises(BackupNotFound):
        restore_backup(repo, "f" * 64, str(tmp_path / "a.raw"))
    with pytest.raises(TargetExists):
        restore_backup(repo, backup.id, str(volume))
    with pytest.raises(VolumeError, match="folder does not exist"):
        restore_backup(repo, backup.id, str(tmp_path / "absent" / "a.raw"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "vol.raw"]


@pytest.mark.parametrize("at", [1, 3])
def test_a_killed_restore_leaves_no_file_that_looks_complete(cli: Cli, tmp_path: Path, at: int) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, check=True)
    volume = tmp_path / "vol.raw"
    write_regions(volume, 24 * MiB, [(i * 4 * MiB, os.urandom(3 * MiB)) for i in range(6)])
    backup = cli.json("repo", "backup", repo, str(volume))
    target = tmp_path / "out" / "restored.raw"
    target.parent.mkdir()
    env = {"BLOCKVAULT_FAILPOINTS": f"restore.chunk_written={at}:kill"}
    proc = cli.run("repo", "restore", repo, backup["id"], str(target), "--json", env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout == ""  # no success reported
    assert not target.exists()
    leftovers = list(target.parent.iterdir())  # at most the hidden partial file, never the target's name
    assert all(p.name.startswith(".restored.raw.partial-") for p in leftovers)
    again = cli.json("repo", "restore", repo, backup["id"], str(target))
    assert again["bytesWritten"] == 24 * MiB  # whole chunks, holes inside them included
    assert digest(target) == digest(volume)


def test_cli_restores_in_place_to_a_block_device(cli: Cli, tmp_path: Path, loop_device: Path) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, check=True)
    volume = tmp_path / "vol.raw"
    write_regions(volume, 16 * MiB, vm_like_regions(16 * MiB, seed=9))
    backup = cli.json("repo", "backup", repo, str(volume))
    assert stat.S_ISBLK(loop_device.stat().st_mode)
    done = cli.json("repo", "restore", repo, backup["id"], str(loop_device), "--in-place")
    assert done["id"] == backup["id"]
    assert read_device(loop_device, 16 * MiB) == volume.read_bytes()
    refused = cli.run("repo", "restore", repo, backup["id"], str(volume), "--in-place")
    assert refused.returncode != 0 and "needs a block device" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.booleans()), max_size=12), st.integers(0, 70000))
def test_nonzero_runs_finds_every_nonzero_block(blocks: list[tuple[int, bool]], tail: int) -> None:
    data = bytearray()
    for count, zero in blocks:
        data += bytes(count * ZERO_BLOCK) if zero else b"\1" * (count * ZERO_BLOCK)
    data += b"\0" * (tail // 2) + b"\2" * (tail - tail // 2)
    expected = [i for i in range(0, len(data), ZERO_BLOCK) if any(data[i : i + ZERO_BLOCK])]
    runs = nonzero_runs(bytes(data))
    assert [i for start, length in runs for i in range(start, start + length, ZERO_BLOCK)] == expected
    assert runs == nonzero_runs(bytearray(data)) == nonzero_runs(memoryview(data))
    assert all(length > 0 and start + length <= len(data) for start, length in runs)


@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
def test_load_chunk_into_gives_what_load_chunk_gives(tmp_path: Path, encrypt: bool) -> None:
    repo = Repository.init(str(tmp_path / "repo"), encrypt=encrypt, passphrase="pw" if encrypt else None)
    text = b"".join(b"line %d of a log\n" % i for i in range(300_000))[: 4 * MiB]
    chunks = {"compressible": text, "random (stored)": os.urandom(4 * MiB), "short": text[:5000]}
    out = memoryview(bytearray(4 * MiB))
    for name, data in chunks.items():
        digest_hex = repo.codec.digest(data).hex()
        repo.store_chunk(bytes.fromhex(digest_hex), data)
        out[:] = b"\xee" * len(out)
        size = repo.load_chunk_into(digest_hex, out)
        assert (size, bytes(out[:size])) == (len(data), repo.load_chunk(digest_hex)), name
        assert bytes(out[size : size + 16]) in (b"", b"\xee" * 16)  # nothing written past the chunk
        with pytest.raises(IntegrityError, match="more than"):  # a chunk larger than the buffer
            repo.load_chunk_into(digest_hex, memoryview(bytearray(len(data) - 1)))


def _put_object(repo: Repository, data: bytes, blob: bytes) -> str:
    digest_hex = repo.codec.digest(data).hex()
    repo.backend.put(chunk_key(digest_hex), blob)
    return digest_hex


def test_load_chunk_into_checks_every_chunk(repo: Repository) -> None:
    data = b"".join(b"record %d\n" % i for i in range(100_000))
    out = memoryview(bytearray(4 * MiB))
    frame = zstandard.ZstdCompressor().compress(data)
    assert repo.load_chunk_into(_put_object(repo, data, b"\0" + frame), out) == len(data)
    assert bytes(out[: len(data)]) == data
    damaged = {
        "frame without its size": b"\0" + zstandard.ZstdCompressor(write_content_size=False).compress(data),
        "truncated frame": b"\0" + frame[: len(frame) // 2],
        "another chunk's bytes": b"\0" + zstandard.ZstdCompressor().compress(data[::-1]),
        "not zstd": b"\0" + b"\x28\xb5\x2f\xfd" + os.urandom(64),
        "unknown type byte": b"\7" + frame,
        "stored, altered": b"\2" + data[:-1] + b"?",
    }
    for name, blob in damaged.items():
        with pytest.raises(IntegrityError):
            repo.load_chunk_into(_put_object(repo, data, blob), out)
        with pytest.raises(IntegrityError):  # load_chunk refuses it too: no laxer than it
            repo.load_chunk(repo.codec.digest(data).hex())
        assert name
    with pytest.raises(IntegrityError, match="missing"):
        repo.load_chunk_into("00" * 32, out)
