"""Live backups of libvirt domains through libvirt's backup API (pull mode, checkpoints) on a
real libvirtd: one instant across a qcow2 and a raw disk, writes made during the backup kept
out of it, a stopped domain's backup continuing the checkpoint chain, leftovers of a killed
worker and of a libvirtd restart cleaned by the next backup, a network disk refused by name."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.errors import VolumeError
from shared.libvirt.backup import CHECKPOINT_KEY, PREFIX, backup_domain, backup_stopped_disk
from shared.repository.live import LiveDisk, LiveResult
from shared.repository.repo import Repository
from shared.repository.restore import restore_backup
from tests.conftest import ROOT
from tests.libvirt_fixtures import URI, Domain, MiB

SIZES = [("qcow2", 48 * MiB), ("raw", 24 * MiB)]


def restored(repo: Repository, backup_id: str, tmp_path: Path, name: str) -> bytes:
    target = tmp_path / f"{name}.raw"
    restore_backup(repo, backup_id, str(target))
    return target.read_bytes()


def specs(domain: Domain, name: str = "b") -> list[LiveDisk]:
    return [LiveDisk(str(p), fmt, name=name) for p, (fmt, _size) in zip(domain.paths, SIZES, strict=False)]


def backup(repo: Repository, domain: Domain, work: Path, **kw: object) -> LiveResult:
    return backup_domain(repo, domain.dom, specs(domain), work_dir=work, **kw)  # type: ignore[arg-type]


def assert_clean(domain: Domain, work: Path) -> None:
    """No backup job, no export socket or scratch file, no uncommitted checkpoint."""
    assert domain.dom.jobInfo()[0] == 0
    leftovers = [p.name for p in work.rglob("*") if not p.is_dir() and p.name not in ("lock",)]
    assert leftovers == []


@pytest.fixture
def domain(make_domain: Callable[..., Domain]) -> Domain:
    d = make_domain(SIZES)
    d.write(0, 0, 8 * MiB, 0x41)
    d.write(0, 20 * MiB, 3 * MiB, 0x42)
    d.write(1, 4 * MiB, 1 * MiB, 0x43)
    return d


def test_full_then_incremental_keep_writes_made_during_the_backup_out(
    repo: Repository, domain: Domain, libvirt_folder: Path, tmp_path: Path
) -> None:
    work = libvirt_folder / "work"
    instant = domain.snapshot()
    during = {"done": False}

    def write_while_reading(done: int, total: int) -> None:
        if not during["done"]:  # the first chunk of disk 0 is read: overwrite what is not yet
            during["done"] = True
            domain.write(0, 21 * MiB, 1 * MiB, 0x51)
            domain.write(1, 4 * MiB, 64 * 1024, 0x52)
            domain.write(1, 12 * MiB, 2 * MiB, 0x53)

    first = backup(repo, domain, work, progress=write_while_reading)
    assert during["done"] and first.consistency == "crash" and first.quiesceError is None  # no agent channel
    assert [b.mode for b in first.backups] == ["full", "full"]
    for i, result in enumerate(first.backups):
        assert restored(repo, result.id, tmp_path, f"full{i}") == instant[i], f"disk {i}"
    assert_clean(domain, work)
    [checkpoint] = domain.checkpoints()
    assert checkpoint.startswith(PREFIX)
    assert repo.load_manifest(first.backups[0].id).metadata[CHECKPOINT_KEY] == checkpoint
    assert CHECKPOINT_KEY not in repo.load_manifest(first.backups[1].id).metadata  # raw: no bitmap

    domain.write(0, 40 * MiB, 1 * MiB, 0x61)
    second_instant = domain.snapshot()
    second = backup(repo, domain, work)
    assert [b.mode for b in second.backups] == ["incremental", "incremental"]
    assert [b.parent for b in second.backups] == [b.id for b in first.backups]
    assert second.backups[0].bytesRead == 2 * 4 * MiB  # chunks 5 (21 MiB) and 10 (40 MiB)
    for i, result in enumerate(second.backups):
        assert restored(repo, result.id, tmp_path, f"incr{i}") == second_instant[i], f"disk {i}"
    assert_clean(domain, work)
    [newer] = domain.checkpoints()  # the first one went once the second backup was committed
    assert newer != checkpoint
    third = backup(repo, domain, work)
    assert third.backups[0].bytesRead == 0


def test_a_failed_backup_keeps_the_chain(
    repo: Repository, domain: Domain, libvirt_folder: Path, tmp_path: Path
) -> None:
    work = libvirt_folder / "work"
    first = backup(repo, domain, work)
    before = domain.checkpoints()
    domain.write(0, 30 * MiB, 1 * MiB, 0x71)

    def fail(done: int, total: int) -> None:
        domain.write(0, 8 * MiB, 1 * MiB, 0x72)  # after the failed backup's instant
        raise RuntimeError("the storage went away")

    with pytest.raises(RuntimeError):
        backup(repo, domain, work, progress=fail)
    assert domain.checkpoints() == before
    assert_clean(domain, work)

    def refuse(result: LiveResult) -> None:
        raise RuntimeError("the catalog went away")

    with pytest.raises(RuntimeError):  # committed on storage, not in the catalog: chain kept
        backup(repo, domain, work, on_committed=refuse)
    assert domain.checkpoints() == before
    now = domain.snapshot()
    again = backup(repo, domain, work)
    assert again.backups[0].mode == "incremental" and again.backups[0].parent == first.backups[0].id
    assert again.backups[0].bytesRead == 2 * 4 * MiB
    for i, result in enumerate(again.backups):
        assert restored(repo, result.id, tmp_path, f"again{i}") == now[i]


def test_a_stopped_domain_continues_the_checkpoint_chain(
    repo: Repository, domain: Domain, libvirt_folder: Path, tmp_path: Path
) -> None:
    work = libvirt_folder / "work"
    first = backup(repo, domain, work)
    [checkpoint] = domain.checkpoints()
    domain.write(0, 36 * MiB, 1 * MiB, 0x91)
    domain.stop()
    now = domain.snapshot()
    spec = specs(domain)[0]
    offline = backup_stopped_disk(repo, spec, volume_format="qcow2")
    assert offline.mode == "incremental" and offline.parent == first.backups[0].id
    assert offline.bytesRead == 4 * MiB  # only what the checkpoint's bitmap marks
    assert repo.load_manifest(offline.id).metadata[CHECKPOINT_KEY] == checkpoint
    assert restored(repo, offline.id, tmp_path, "offline") == now[0]
    # the raw disk of the stopped domain: read whole, stored against its newest backup
    raw = backup_stopped_disk(repo, specs(domain)[1], volume_format="raw")
    assert raw.mode == "incremental" and restored(repo, raw.id, tmp_path, "raw") == now[1]

    domain.start()  # live again: the chain goes on from the same checkpoint
    domain.write(0, 44 * MiB, 1 * MiB, 0x92)
    now = domain.snapshot()
    live = backup(repo, domain, work)
    assert live.backups[0].mode == "incremental" and live.backups[0].parent == offline.id
    assert live.backups[0].bytesRead == 2 * 4 * MiB  # since the checkpoint: 36 MiB and 44 MiB
    assert restored(repo, live.backups[0].id, tmp_path, "live") == now[0]
    assert domain.checkpoints() != [checkpoint]


WORKER = """
import json, sys
from pathlib import Path
import libvirt
from shared.libvirt.backup import backup_domain
from shared.repository.live import LiveDisk
from shared.repository.repo import Repository
repo = Repository.open(sys.argv[1])
dom = libvirt.open(sys.argv[2]).lookupByUUIDString(sys.argv[3])
disks = [LiveDisk(p, f) for p, f in json.loads(sys.argv[4])]
backup_domain(repo, dom, disks, work_dir=Path(sys.argv[5]))
"""


def test_worker_killed_and_libvirtd_restarted_mid_backup_then_a_correct_incremental(
    repo: Repository,
    domain: Domain,
    libvirt_folder: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    libvirtd_control: Callable[[], None],
) -> None:
    work = libvirt_folder / "work"
    first = backup(repo, domain, work)
    committed = domain.checkpoints()
    domain.write(0, 44 * MiB, 1 * MiB, 0x81)
    disks = json.dumps([[str(p), fmt] for p, (fmt, _) in zip(domain.paths, SIZES, strict=True)])
    args = [repo.location, URI, domain.uuid, disks, str(work)]
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    for point in ("libvirt.exported=1", "backup.chunk_stored=1"):
        env["BLOCKVAULT_FAILPOINTS"] = f"{point}:kill"
        proc = subprocess.run(
            [sys.executable, "-c", WORKER, *args], cwd=ROOT, env=env, capture_output=True, check=False
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
        # the killed run's job, export socket and checkpoint are still there
        assert domain.dom.jobInfo()[0] != 0
        assert list(work.rglob("nbd.sock"))
        assert len(domain.checkpoints()) == 2
        if point.startswith("backup."):
            libvirtd_control()  # and libvirtd goes away and comes back meanwhile
            domain.refresh()
        domain.write(1, 16 * MiB, 1 * MiB, 0x82)  # the second run removes the first's leftovers
    assert len(repo.backups()) == 2  # no manifest from the killed runs
    now = domain.snapshot()
    with caplog.at_level(logging.WARNING, logger="shared.libvirt.backup"):
        again = backup(repo, domain, work)
    assert "libvirt.leftovers_removed" in caplog.text
    assert_clean(domain, work)
    assert again.backups[0].mode == "incremental" and again.backups[0].parent == first.backups[0].id
    for i, result in enumerate(again.backups):
        assert restored(repo, result.id, tmp_path, f"after-kill{i}") == now[i]
    assert domain.checkpoints() != committed and len(domain.checkpoints()) == 1


def test_a_network_disk_fails_the_vm_backup_naming_it(
    repo: Repository, make_domain: Callable[..., Domain], libvirt_folder: Path
) -> None:
    network = (
        "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
        "<source protocol='nbd' name='export'><host name='127.0.0.1' port='10809'/></source>"
        "<target dev='vdc' bus='virtio'/></disk>"
    )
    domain = make_domain(SIZES, extra=network, start=False)
    with pytest.raises(VolumeError, match=r"/vdc: a network disk \(nbd:export \(127.0.0.1\)\) cannot be backed up"):
        backup(repo, domain, libvirt_folder / "work")
    assert domain.checkpoints() == [] and repo.backups() == []
    with pytest.raises(VolumeError, match="has no such disk"):
        backup_domain(repo, domain.dom, [LiveDisk("/nonexistent.qcow2")], work_dir=libvirt_folder / "w", whole_vm=False)


def test_an_agent_that_does_not_answer_gives_a_crash_consistent_backup_saying_why(
    repo: Repository, make_domain: Callable[..., Domain], libvirt_folder: Path
) -> None:
    channel = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    domain = make_domain(SIZES[:1], extra=channel)  # no guest OS: the agent never answers
    result = backup_domain(repo, domain.dom, specs(domain)[:1], work_dir=libvirt_folder / "work")
    assert result.consistency == "crash"
    assert result.quiesceError and "agent" in result.quiesceError.lower()
    assert domain.dom.jobInfo()[0] == 0
