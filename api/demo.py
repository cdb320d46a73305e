"""``blockvault demo``: the main job, end to end, on the embedded default.

Makes a VM-like raw volume and a qcow2 volume, backs each up full, changes a few percent,
backs up incrementally (the qcow2 through its dirty bitmap), syncs to a second storage,
restores both from there, verifies byte for byte and prints what it did.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import click

from shared.config import get_settings
from shared.repository.backup import BackupResult, backup_volume
from shared.repository.maintenance import verify
from shared.repository.repo import Repository
from shared.repository.restore import restore_backup
from shared.repository.sync import sync

MiB = 1024 * 1024
VOLUME_SIZE = 256 * MiB


def make_vm_volume(path: Path, size: int, seed: int) -> None:
    """A sparse raw file that looks like a VM disk: holes, text-like data, random data."""
    rng = random.Random(seed)
    with open(path, "wb") as handle:
        handle.truncate(size)
        offset = 0
        while offset < size:
            length = min(rng.choice((1, 2, 4, 8)) * MiB, size - offset)
            kind = rng.random()
            if kind < 0.3:
                pass  # hole
            elif kind < 0.7:
                words = [f"line {offset + i} of a log file, level=INFO\n".encode() for i in range(64)]
                block = b"".join(words)
                handle.seek(offset)
                handle.write((block * (length // len(block) + 1))[:length])
            else:
                handle.seek(offset)
                handle.write(rng.randbytes(length))
            offset += length


def change_raw(path: Path, fraction: float, seed: int) -> int:
    rng = random.Random(seed)
    regions = VOLUME_SIZE // (4 * MiB)
    picked = rng.sample(range(regions), max(1, int(regions * fraction)))
    with open(path, "r+b") as handle:
        for region in picked:
            handle.seek(region * 4 * MiB + rng.randrange(0, 3 * MiB))
            handle.write(rng.randbytes(MiB))
    return len(picked) * MiB


def change_qcow2(path: Path, fraction: float, seed: int) -> int:
    rng = random.Random(seed)
    regions = VOLUME_SIZE // (4 * MiB)
    picked = rng.sample(range(regions), max(1, int(regions * fraction)))
    commands = []
    for region in picked:
        commands += ["-c", f"write -P {rng.randrange(1, 255)} {region * 4 * MiB} {MiB}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(path)], check=True, capture_output=True)
    return len(picked) * MiB


def same_content(a: Path, b: Path) -> bool:
    result = subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)], capture_output=True, check=False)
    return result.returncode == 0


def _line(step: str, result: BackupResult) -> None:
    speed = result.bytesRead / result.seconds / MiB if result.seconds else 0.0
    click.echo(
        f"  {step:<34} {result.mode:<11} read {result.bytesRead / MiB:7.1f} MiB  "
        f"stored {result.bytesWritten / MiB:6.1f} MiB  {result.seconds:6.2f} s  {speed:8.0f} MiB/s"
    )


def run_demo(workdir: str | None) -> None:
    """Back up a raw and a qcow2 volume full and incrementally, sync, restore, verify."""
    work = (Path(workdir) if workdir else get_settings().data_dir / "demo").absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw, qcow = work / "vm1-root.raw", work / "vm1-data.qcow2"
    click.echo(f"blockvault demo in {work}")
    make_vm_volume(raw, VOLUME_SIZE, seed=1)
    seed_raw = work / "seed.raw"
    make_vm_volume(seed_raw, VOLUME_SIZE, seed=2)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(seed_raw), str(qcow)], check=True)
    seed_raw.unlink()
    click.echo(f"volumes: {raw.name} (raw, {VOLUME_SIZE // MiB} MiB, sparse), {qcow.name} (qcow2)")

    local = Repository.init(str(work / "local-storage"))
    click.echo(f"\nlocal backup storage {local.id} at {local.location}")
    _line("full backup of raw volume", backup_volume(local, str(raw), name="root-full"))
    _line(
        "full backup of qcow2 (bitmap added)",
        backup_volume(local, str(qcow), bitmap="blockvault", name="data-full"),
    )

    changed = change_raw(raw, 0.04, seed=3) + change_qcow2(qcow, 0.04, seed=4)
    click.echo(f"\nthe VM wrote {changed / MiB:.0f} MiB into 4 % of each volume's 4 MiB regions")
    inc_raw = backup_volume(local, str(raw), name="root-incr")
    inc_qcow = backup_volume(local, str(qcow), bitmap="blockvault", name="data-incr")
    _line("incremental of raw (rehash)", inc_raw)
    _line("incremental of qcow2 (dirty bitmap)", inc_qcow)

    remote = Repository.init(str(work / "remote-storage"), like=local)
    report = sync(local, remote)
    click.echo(
        f"\nsynced {len(report.backups)} backups to {remote.location}: {report.chunksCopied} chunks, "
        f"{report.bytesCopied / MiB:.1f} MiB in {report.seconds:.2f} s"
    )
    report = sync(local, remote)
    click.echo(f"synced again: {report.chunksCopied} chunks sent (nothing was missing)")

    click.echo("\nrestoring the incremental backups from the synced copy:")
    for result, source in ((inc_raw, raw), (inc_qcow, qcow)):
        target = work / f"restored-{source.name}"
        restored = restore_backup(remote, result.id, str(target))
        ok = same_content(source, target) if source.suffix == ".qcow2" else _equal_files(source, target)
        if not ok:
            raise click.ClickException(f"{target} differs from {source}")
        used = target.stat().st_blocks * 512 / MiB
        click.echo(
            f"  {target.name:<30} {restored.bytesWritten / MiB:7.1f} MiB in {restored.seconds:.2f} s, "
            f"{used:.0f} MiB allocated: identical to {source.name}"
        )
    for repo in (local, remote):
        checked = verify(repo, read_data=True)
        if not checked.ok:
            raise click.ClickException(f"verify failed: {checked.problems[0].describe()}")
        click.echo(
            f"verify --read-data {Path(repo.location).name}: {checked.backups} backups, {checked.chunks} chunks ok"
        )
    click.echo("\nbackups on the remote storage:")
    for entry in remote.backups():
        m = entry.manifest
        click.echo(
            f"  {entry.id[:12]}  {m.created[:19]}  {m.mode:<11}  {m.name:<10}  "
            f"{m.stored_size / MiB:6.1f} MiB of {m.size / MiB:.0f} MiB  {remote.install_path(entry.id)[:48]}..."
        )
    click.echo("\ndemo finished: every restore is byte for byte identical.")


def _equal_files(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


__all__ = ["make_vm_volume", "run_demo"]
