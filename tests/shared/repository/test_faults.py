"""Faults: backups killed with SIGKILL at exact points and at random moments, damaged chunks,
maintenance while a backup runs. The repository stays consistent and nothing is lost."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.failpoints import reached, release
from shared.repository import qemu
from shared.repository.maintenance import TMP_GRACE_SECONDS
from tests.conftest import Cli, MiB, qcow2_equal, qemu_write

KILL_POINTS = [
    "backup.chunk_stored=1",
    "backup.chunk_stored=3",
    "backup.before_manifest=1",
    "backup.after_manifest=1",
]


def killed(cli: Cli, point: str, *args: str) -> None:
    proc = cli.run(*args, env={"BLOCKVAULT_FAILPOINTS": f"{point}:kill"})
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr)


def held(gate: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Wait until ``proc`` is held at its ``hold:<gate>`` failpoint (it must not exit first)."""
    deadline = time.monotonic() + timeout
    while not reached(gate):
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before the failpoint: {proc.communicate()}")
        assert time.monotonic() < deadline, f"not at the failpoint after {timeout} s"
        time.sleep(0.05)


def assert_consistent(cli: Cli, repo: str) -> list[dict[str, object]]:
    """verify --read-data passes, and every listed backup restores."""
    proc = cli.run("repo", "verify", repo, "--read-data")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed: list[dict[str, object]] = cli.json("repo", "ls", repo)
    return listed


@pytest.mark.parametrize("point", KILL_POINTS)
def test_raw_backup_killed_at_each_point(cli: Cli, make_raw: Callable[..., Path], tmp_path: Path, point: str) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, check=True)
    volume = make_raw(size=32 * MiB)
    first = cli.json("repo", "backup", repo, str(volume))
    with open(volume, "r+b") as handle:
        for offset in (1, 9, 17, 25):
            handle.seek(offset * MiB)
            handle.write(os.urandom(MiB))
    killed(cli, point, "repo", "backup", repo, str(volume))
    listed = assert_consistent(cli, repo)
    assert listed[0]["id"] == first["id"]
    assert len(listed) == (2 if point.startswith("backup.after_manifest") else 1)
    after = cli.json("repo", "backup", repo, str(volume))
    out = tmp_path / "out.raw"
    cli.run("repo", "restore", repo, after["id"], str(out), check=True)
    assert out.read_bytes() == volume.read_bytes()
    # what the killed writer left in tmp/ is younger than a minute: gc keeps it (a live lock
    # refresh may be writing it, docs/repository-format.md), then deletes it once it is older
    leftovers = sorted((tmp_path / "repo" / "tmp").iterdir()) if (tmp_path / "repo" / "tmp").exists() else []
    gc = cli.json("repo", "gc", repo)
    assert gc["tmpDeleted"] == 0
    assert all(path.exists() for path in leftovers)
    old = time.time() - TMP_GRACE_SECONDS - 1
    for path in leftovers:
        os.utime(path, (old, old))
    assert cli.json("repo", "gc", repo)["tmpDeleted"] == len(leftovers)
    assert not any(path.exists() for path in leftovers)
    assert_consistent(cli, repo)


def next_incremental_restores(cli: Cli, repo: str, volume: Path, out: Path, point: str) -> None:
    """The next ``--bitmap bv`` backup is an incremental that restores to the image as it is
    now, and the image keeps exactly ``bv`` and one marker (no ``bv.next`` left)."""
    after = cli.json("repo", "backup", repo, str(volume), "--bitmap", "bv")
    assert after["mode"] == "incremental"
    cli.run("repo", "restore", repo, after["id"], str(out), check=True)
    assert qcow2_equal(out, volume), point
    names = [b["name"] for b in qemu.list_bitmaps(str(volume))]
    assert sorted(n for n in names if not n.startswith("bv@")) == ["bv"], names
    assert len([n for n in names if n.startswith("bv@")]) == 1, names


@pytest.mark.parametrize(
    "point",
    [
        "backup.chunk_stored=1",
        "backup.before_manifest=1",
        "backup.after_manifest=1",
        "backup.image_released=1",
        "backup.bitmap_marked=1",
        "backup.bitmap_rotated=1",
    ],
)
def test_bitmap_backup_killed_never_loses_a_change(
    cli: Cli, make_qcow2: Callable[..., Path], tmp_path: Path, point: str
) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, check=True)
    volume = make_qcow2(size=32 * MiB)
    cli.json("repo", "backup", repo, str(volume), "--bitmap", "bv")
    qemu_write(volume, 3 * MiB, MiB, 0x61)
    qemu_write(volume, 21 * MiB, 4096, 0x62)
    killed(cli, point, "repo", "backup", repo, str(volume), "--bitmap", "bv")
    assert_consistent(cli, repo)
    qemu_write(volume, 13 * MiB, 8192, 0x63)
    next_incremental_restores(cli, repo, volume, tmp_path / "out.qcow2", point)


def held_bitmap_backup(
    cli: Cli, make_qcow2: Callable[..., Path], tmp_path: Path, point: str
) -> tuple[str, Path, dict[str, Any], Path, subprocess.Popen[str]]:
    """A repository, a 32 MiB image backed up once with ``--bitmap bv``, 1 MiB written at
    5 MiB, and a second such backup started that holds at failpoint ``point``: (repository,
    image, the first backup, the gate that releases it, the held process)."""
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, check=True)
    volume = make_qcow2(size=32 * MiB)
    first: dict[str, Any] = cli.json("repo", "backup", repo, str(volume), "--bitmap", "bv")
    qemu_write(volume, 5 * MiB, MiB, 0x71)
    gate = tmp_path / "gate"
    slow = cli.popen(
        "repo", "backup", repo, str(volume), "--bitmap", "bv", "--json",
        env={"BLOCKVAULT_FAILPOINTS": f"{point}:hold:{gate}"},
    )  # fmt: skip
    return repo, volume, first, gate, slow


@pytest.mark.parametrize("point", ["backup.image_released=1"])
def test_a_write_while_the_bitmap_rotates_is_in_the_next_incremental(
    cli: Cli, make_qcow2: Callable[..., Path], tmp_path: Path, point: str
) -> None:
    """The backup has read the image and let it go; a writer (a VM started meanwhile, the
    soak's qemu-io) writes before the bitmap is rotated. That write is not in this backup, so
    the rotation must not clear it away: the next incremental has it (the soak found a restore
    with a block older than a write made before its backup began). The rotation itself holds
    the image in one daemon (no write can come between its steps); before it, the image is
    free."""
    repo, volume, _first, gate, slow = held_bitmap_backup(cli, make_qcow2, tmp_path, point)
    try:
        held(gate, slow)
        qemu_write(volume, 19 * MiB, 64 * 1024, 0x72)  # after the read, before the rotation ends
    finally:
        release(gate)
    _out, err = slow.communicate(timeout=120)
    assert slow.returncode == 0, err
    next_incremental_restores(cli, repo, volume, tmp_path / "out.qcow2", point)


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for task in tasks.iterdir() for c in (task / "children").read_text().split()]


def test_the_image_daemon_killed_mid_read_fails_the_backup_and_the_next_reads_everything(
    cli: Cli, make_qcow2: Callable[..., Path], tmp_path: Path
) -> None:
    """The qemu-storage-daemon holding the image dies (SIGKILL) before the backup reads it: the
    backup fails, and the bitmaps it left marked in use are not trusted: the next backup reads
    every allocated block, the one after is a bitmap incremental again, both restore."""
    repo, volume, first, gate, slow = held_bitmap_backup(cli, make_qcow2, tmp_path, "backup.exported=1")
    try:
        held(gate, slow)
        daemons = [
            pid for pid in _children(slow.pid) if "qemu-storage-daemon" in Path(f"/proc/{pid}/cmdline").read_text()
        ]
        assert len(daemons) == 1, daemons
        os.kill(daemons[0], signal.SIGKILL)
    finally:
        release(gate)
    _out, err = slow.communicate(timeout=120)
    assert slow.returncode != 0 and "error" in err, err
    flags = {b["name"]: b["flags"] for b in qemu.list_bitmaps(str(volume))}
    assert "in-use" in flags["bv"], flags  # what a daemon killed with the image open leaves
    qemu_write(volume, 13 * MiB, 8192, 0x42)
    again = cli.json("repo", "backup", repo, str(volume), "--bitmap", "bv")
    assert again["bytesRead"] == first["bytesRead"]  # every allocated block, not the dirty ones
    out = tmp_path / "out.qcow2"
    cli.run("repo", "restore", repo, again["id"], str(out), check=True)
    assert qcow2_equal(out, volume)
    qemu_write(volume, 29 * MiB, 4096, 0x43)
    next_incremental_restores(cli, repo, volume, tmp_path / "next.qcow2", "daemon killed")


def test_a_rotation_that_cannot_open_the_image_keeps_every_write_for_the_next_backup(
    cli: Cli, make_qcow2: Callable[..., Path], tmp_path: Path
) -> None:
    """Another process holds the image when the backup rotates its bitmaps: the backup still
    succeeds (it is committed), ``NAME.next`` stays, and the next incremental covers the
    writes of both the rotation's window and after."""
    repo, volume, _first, gate, slow = held_bitmap_backup(cli, make_qcow2, tmp_path, "backup.image_released=1")
    try:
        held(gate, slow)
        with qemu.QemuStorageDaemon(str(volume)):  # holds the image's write lock
            release(gate)
            _out, err = slow.communicate(timeout=120)
    finally:
        release(gate)
    assert slow.returncode == 0, err
    assert "backup.bitmap_rotate_failed" in err, err
    assert "bv.next" in [b["name"] for b in qemu.list_bitmaps(str(volume))]
    qemu_write(volume, 17 * MiB, 65536, 0x52)
    next_incremental_restores(cli, repo, volume, tmp_path / "out.qcow2", "rotation failed")


def test_backup_killed_at_random_moments(cli: Cli, make_raw: Callable[..., Path], tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, "--encrypt", env={"BLOCKVAULT_PASSPHRASE": "pw"}, check=True)
    env = {"BLOCKVAULT_PASSPHRASE": "pw"}
    volume = make_raw(size=96 * MiB, seed=7)
    rng = random.Random(11)
    for _ in range(4):
        proc = cli.popen("repo", "backup", repo, str(volume), "--full", env=env)
        time.sleep(rng.uniform(0.3, 1.2))
        proc.kill()
        proc.communicate()
    assert cli.run("repo", "verify", repo, "--read-data", env=env).returncode == 0
    done = json.loads(cli.run("repo", "backup", repo, str(volume), "--json", env=env, check=True).stdout)
    out = tmp_path / "out.raw"
    cli.run("repo", "restore", repo, done["id"], str(out), env=env, check=True)
    assert out.read_bytes() == volume.read_bytes()


def test_flipped_byte_is_named_by_verify_and_stops_restore(
    cli: Cli, make_raw: Callable[..., Path], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    cli.run("repo", "init", str(repo), check=True)
    volume = make_raw(size=24 * MiB)
    backup = cli.json("repo", "backup", str(repo), str(volume))
    manifest = json.loads(cli.run("repo", "ls", str(repo), "--json", check=True).stdout)[0]
    assert manifest["id"] == backup["id"]
    victim = sorted((repo / "chunks").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x20
    victim.write_bytes(bytes(data))
    quick = cli.run("repo", "verify", str(repo))
    assert quick.returncode == 0  # presence only: the chunk is there
    deep = cli.run("repo", "verify", str(repo), "--read-data")
    assert deep.returncode == 1
    assert backup["id"][:12] in deep.stdout and victim.name in deep.stdout
    target = tmp_path / "restored.raw"
    restore = cli.run("repo", "restore", str(repo), backup["id"], str(target))
    assert restore.returncode == 1
    assert "integrity error" in restore.stderr and victim.name in restore.stderr
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if "restored" in p.name] == []


def test_missing_chunk_is_reported(cli: Cli, make_raw: Callable[..., Path], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cli.run("repo", "init", str(repo), check=True)
    backup = cli.json("repo", "backup", str(repo), str(make_raw(size=8 * MiB)))
    victim = next(p for p in (repo / "chunks").rglob("*") if p.is_file())
    victim.unlink()
    proc = cli.run("repo", "verify", str(repo), backup["id"])
    assert proc.returncode == 1 and "missing" in proc.stdout and victim.name in proc.stdout


def test_gc_while_a_backup_runs_waits_and_loses_nothing(
    cli: Cli, make_raw: Callable[..., Path], tmp_path: Path
) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, check=True)
    volume = make_raw(size=32 * MiB)
    old = cli.json("repo", "backup", repo, str(volume))
    with open(volume, "r+b") as handle:
        handle.write(os.urandom(8 * MiB))
    gate = tmp_path / "gate"
    slow = cli.popen(
        "repo",
        "backup",
        repo,
        str(volume),
        "--json",
        env={"BLOCKVAULT_FAILPOINTS": f"backup.chunk_stored=1:hold:{gate}"},
    )
    held(gate, slow)  # the backup holds its lock and has stored a chunk no manifest names yet
    busy = cli.run("repo", "gc", repo)
    assert busy.returncode == 1 and "busy" in busy.stderr and "backup of" in busy.stderr
    prune = cli.json("repo", "prune", repo, "--keep-last", "1")  # prune runs beside a backup
    assert prune["removed"] == []
    assert slow.poll() is None, "the backup was still running for all of it"
    release(gate)
    out, err = slow.communicate(timeout=120)
    assert slow.returncode == 0, err
    new = json.loads(out)
    pruned = cli.json("repo", "prune", repo, "--keep-last", "1")
    assert pruned["removed"] == [old["id"]]
    freed = cli.json("repo", "gc", repo)
    assert freed["chunksDeleted"] >= 1
    assert_consistent(cli, repo)
    restored = tmp_path / "r.raw"
    cli.run("repo", "restore", repo, new["id"], str(restored), check=True)
    assert restored.read_bytes() == volume.read_bytes()


def test_gc_waits_for_a_backup_with_wait(cli: Cli, make_raw: Callable[..., Path], tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    cli.run("repo", "init", repo, check=True)
    volume = make_raw(size=16 * MiB)
    gate, waiting = tmp_path / "gate", tmp_path / "gc-waits"
    slow = cli.popen(
        "repo", "backup", repo, str(volume), env={"BLOCKVAULT_FAILPOINTS": f"backup.chunk_stored=1:hold:{gate}"}
    )
    held(gate, slow)
    release(waiting)  # gc's failpoint only marks that it found the backup's lock and waits
    gc = cli.popen(
        "repo", "gc", repo, "--wait", "300", "--json", env={"BLOCKVAULT_FAILPOINTS": f"lock.waiting=1:hold:{waiting}"}
    )
    held(waiting, gc)
    assert slow.poll() is None and gc.poll() is None, "gc waits while the backup runs"
    release(gate)
    slow.communicate(timeout=120)
    out, err = gc.communicate(timeout=300)
    assert slow.returncode == 0 and gc.returncode == 0, err
    assert json.loads(out)["chunksDeleted"] == 0
    assert_consistent(cli, repo)


def test_stale_lock_of_a_killed_backup_does_not_block_gc(
    cli: Cli, make_raw: Callable[..., Path], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    cli.run("repo", "init", str(repo), check=True)
    killed(cli, "backup.chunk_stored=1", "repo", "backup", str(repo), str(make_raw(size=16 * MiB)))
    assert list((repo / "locks").iterdir())  # the killed backup's lock is left behind
    report = cli.json("repo", "gc", str(repo))
    assert report["chunksDeleted"] >= 1  # its orphan chunk is freed
    assert list((repo / "locks").iterdir()) == []
