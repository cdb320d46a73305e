"""prune, gc and sync."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.errors import RepositoryError, UsageError
from shared.repository.backup import backup_volume
from shared.repository.maintenance import Policy, check_chunks, select_keep, verify
from shared.repository.manifest import BackupEntry, Manifest
from shared.repository.repo import Repository, chunk_key
from shared.repository.restore import restore_backup
from shared.repository.sync import RateLimiter, repair_chunks, sync
from tests.conftest import Cli, MiB


def entry(i: int, when: datetime) -> BackupEntry:
    manifest = Manifest(volume="/v", format="raw", size=0, chunkSize=4096, chunks=[], mode="full")
    manifest.created = when.isoformat()
    return BackupEntry(f"{i:064x}", manifest)


def test_retention_policy_selection() -> None:
    start = datetime(2026, 1, 1, 12, tzinfo=UTC)
    # two backups a day for 90 days
    backups = [entry(i, start + timedelta(hours=12 * i)) for i in range(180)]
    entries = [(e.id, e.manifest.created_at) for e in backups]
    newest = backups[-1].id
    assert select_keep(entries, Policy(keep_last=1)) == {newest}
    keep = select_keep(entries, Policy(keep_last=2, keep_daily=7))
    assert len(keep) == 7  # the 2 newest fall on the 2 newest of the 7 days
    keep = select_keep(entries, Policy(keep_last=1, keep_weekly=4, keep_monthly=3))
    months = {e.manifest.created_at.astimezone().strftime("%Y-%m") for e in backups if e.id in keep}
    assert len(months) == 3 and newest in keep
    assert len(keep) <= 1 + 4 + 3


def test_policy_refuses_removing_everything() -> None:
    with pytest.raises(UsageError):
        Policy(keep_last=0, keep_daily=5).check()
    with pytest.raises(UsageError):
        Policy(keep_last=1, keep_weekly=-1).check()


def test_prune_and_gc_keep_the_kept_restorable(cli: Cli, make_raw: Callable[..., Path], tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, check=True)
    a, b = make_raw("a.raw", 8 * MiB, seed=1), make_raw("b.raw", 8 * MiB, seed=2)
    ids = []
    for _round in range(3):
        for volume in (a, b):
            with open(volume, "r+b") as handle:
                handle.write(os.urandom(MiB))
            ids.append(cli.json("repo", "backup", repo, str(volume))["id"])
    dry = cli.json("repo", "prune", repo, "--keep-last", "1", "--dry-run")
    assert sorted(dry["removed"]) == sorted(ids[:4]) and len(cli.json("repo", "ls", repo)) == 6
    done = cli.json("repo", "prune", repo, "--keep-last", "1")
    assert sorted(done["kept"]) == sorted(ids[4:])  # the newest of each volume
    freed = cli.json("repo", "gc", repo)
    assert freed["chunksDeleted"] >= 4 and freed["bytesFreed"] > 0
    assert cli.run("repo", "verify", repo, "--read-data").returncode == 0
    for backup_id, volume in zip(ids[4:], (a, b), strict=True):
        out = tmp_path / f"{volume.name}.out"
        cli.run("repo", "restore", repo, backup_id, str(out), check=True)
        assert out.read_bytes() == volume.read_bytes()


def test_sync_copies_only_what_is_missing(tmp_path: Path, make_raw: Callable[..., Path]) -> None:
    src = Repository.init(str(tmp_path / "src"))
    volume = make_raw(size=24 * MiB)
    first = backup_volume(src, str(volume))
    dst = Repository.init(str(tmp_path / "dst"), like=src)
    report = sync(src, dst)
    assert report.backups == [first.id] and report.chunksCopied == first.chunks
    with open(volume, "r+b") as handle:
        handle.write(os.urandom(MiB))
    second = backup_volume(src, str(volume))
    again = sync(src, dst)
    assert again.backups == [second.id] and again.chunksCopied == 1
    assert sync(src, dst).chunksCopied == 0
    out = tmp_path / "out.raw"
    restore_backup(dst, second.id, str(out))
    assert out.read_bytes() == volume.read_bytes()


def test_repair_rewrites_bad_chunks_from_a_good_copy_and_never_spreads_a_bad_one(
    tmp_path: Path, make_raw: Callable[..., Path]
) -> None:
    src = Repository.init(str(tmp_path / "src"), encrypt=True, passphrase="pw")
    volume = make_raw(size=24 * MiB)
    result = backup_volume(src, str(volume))
    dst = Repository.init(str(tmp_path / "dst"), like=src, passphrase="pw")
    sync(src, dst)
    flipped, gone, bad_in_both = sorted(dst.load_manifest(result.id).referenced())[:3]
    for where, digest, at in (("dst", flipped, -1), ("dst", bad_in_both, -1), ("src", bad_in_both, -2)):
        path = tmp_path / where / chunk_key(digest)
        data = bytearray(path.read_bytes())
        data[at] ^= 0x01  # the source's copy damaged elsewhere: it differs from the target's
        path.write_bytes(bytes(data))
    (tmp_path / "dst" / chunk_key(gone)).unlink()
    found = {d: e for d, _size, e in check_chunks(dst, sorted(dst.load_manifest(result.id).referenced()))}
    assert {d for d, e in found.items() if e} == {flipped, gone, bad_in_both}
    assert found[gone] == "chunk is missing"

    assert sorted(repair_chunks(src, dst, [flipped, gone, bad_in_both])) == sorted([flipped, gone])
    src_path = tmp_path / "src" / chunk_key(bad_in_both)
    assert (tmp_path / "dst" / chunk_key(bad_in_both)).read_bytes() != src_path.read_bytes()  # not copied over
    assert {p.chunk for p in verify(dst, result.id, read_data=True).problems} == {bad_in_both}  # it stays bad


def test_sync_into_an_encrypted_target_reseals(tmp_path: Path, make_raw: Callable[..., Path]) -> None:
    src = Repository.init(str(tmp_path / "src"), encrypt=True, passphrase="pw")
    result = backup_volume(src, str(make_raw(size=8 * MiB)))
    dst = Repository.init(str(tmp_path / "dst"), like=src, passphrase="pw")
    sync(src, dst)
    assert Repository.open(str(tmp_path / "dst"), "pw").load_manifest(result.id).size == 8 * MiB
    other = Repository.init(str(tmp_path / "other"), encrypt=True, passphrase="pw")
    with pytest.raises(RepositoryError, match="names chunks differently"):
        sync(src, other)


def test_sync_killed_midway_resumes(cli: Cli, make_raw: Callable[..., Path], tmp_path: Path) -> None:
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    cli.run("repo", "init", src, check=True)
    volume = make_raw(size=40 * MiB, seed=5)
    backup = cli.json("repo", "backup", src, str(volume))
    proc = cli.run("repo", "sync", src, dst, env={"BLOCKVAULT_FAILPOINTS": "sync.chunk_copied=3:kill"})
    assert proc.returncode == -signal.SIGKILL
    assert cli.json("repo", "ls", dst) == []  # never lists a backup it cannot restore
    assert cli.run("repo", "verify", dst).returncode == 0
    copied_before = sum(1 for p in (tmp_path / "dst" / "chunks").rglob("*") if p.is_file())
    resumed = cli.json("repo", "sync", src, dst)
    assert resumed["chunksCopied"] == backup["chunks"] - copied_before
    assert resumed["backups"] == [backup["id"]]
    out = tmp_path / "o.raw"
    cli.run("repo", "restore", dst, backup["id"], str(out), check=True)
    assert out.read_bytes() == volume.read_bytes()


def test_rate_limiter_spaces_transfers() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(1000.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        limiter.take(500)
    assert now[0] == pytest.approx(2.0)  # 2500 bytes at 1000 B/s: the first goes at once
    assert RateLimiter(None).take(10**9) is None


def test_sync_bandwidth_flag_is_validated(cli: Cli, tmp_path: Path) -> None:
    cli.run("repo", "init", str(tmp_path / "s"), check=True)
    proc = cli.run("repo", "sync", str(tmp_path / "s"), str(tmp_path / "d"), "--bandwidth-limit", "0")
    assert proc.returncode == 2
