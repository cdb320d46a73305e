#!/usr/bin/env python3
"""Benchmark instant recovery and file-level restore (issue 22), with restic and borg beside
the file-level figures.

    PYTHONPATH=$PWD .venv/bin/python tests/bench/instant_files.py [--size 256] [--file-mib 100]
        [--rounds 5] [--workdir DIR] [--json FILE] [--no-peers]

Everything runs on this machine in one process with the embedded catalog (SQLite in a temporary
data dir): the service's own request and worker functions, a real QEMU, real qemu-img, a moto
S3 server for the PublicCloud storage.

1. **Instant recovery.** A VM-like raw volume of ``--size`` MiB (about half data) is backed up to
   a local ImageStore storage and copied to an S3 (moto) storage. For each storage:
   ``instantRestoreVolumeFromVolumeBackup`` for a registered VM with a QMP socket (the request
   is t=0), the job run by the worker function in a thread; as soon as the volume is
   ``Streaming`` a ``qemu-system-x86_64 -machine none`` starts from the overlay and reads its
   first 4 KiB through the guest's block layer (HMP ``qemu-io read``): **request to first block
   read by the VM** (goal < 2 s local, < 5 s S3). The stream then runs without a limit: its
   throughput is the volume's size over the stream's seconds (as the job reports them).
2. **File-level restore.** An ext4 image (mkfs.ext4 -d, nothing mounted) with a ``/etc`` of
   200 files and a ``--file-mib`` MiB random file, backed up to a local repository:
   ``Browser.listdir("/etc")`` (**goal < 1 s**, the sandboxed child's start included) and the
   whole file streamed out (**goal >= 150 MiB/s**), medians of ``--rounds``. Beside them, the same
   tree backed up by restic and borg (files, not a block image): ``restic ls``/``borg list`` of
   etc and ``restic dump``/``borg extract --stdout`` of the big file.

Figures only; no thresholds. The machine is shared (2 cores): medians, and the load average is
printed with them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def settings(work: Path) -> None:
    for name in list(os.environ):
        if name.startswith("BLOCKVAULT_"):
            del os.environ[name]
    os.environ.update(
        BLOCKVAULT_DATA_DIR=str(work / "data"),
        BLOCKVAULT_VOLUME_ROOTS=str(work),
        BLOCKVAULT_VM_SOCKET_DIR=str(work),
        BLOCKVAULT_SECRET_KEY="bench-server-secret-0123456789abcdef",
    )


def vm_like(path: Path, size: int, seed: int = 5) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset in range(0, size, 4 * MiB):
            if rng.random() < 0.5:
                handle.seek(offset)
                handle.write(rng.randbytes(4 * MiB))


def run_job(runner: Any, job_uuid: str) -> dict[str, Any]:
    from shared.apijobs import start_job
    from shared.catalog import db

    with db.session() as session:
        job = start_job(session, job_uuid)
        assert job is not None
        result: dict[str, Any] = runner(session, job)
        return result


def instant_round(work: Path, backup_uuid: str, storage_uuid: str, vm_uuid: str, label: str) -> dict[str, Any]:
    from shared.catalog import db
    from shared.catalog.models import Volume
    from shared.service import instant
    from tests.qemu_fixtures import QemuVm

    with db.session() as session:
        started = time.monotonic()
        params = {"vmInstanceUuid": vm_uuid, "backupStorageUuid": storage_uuid, "attachTimeout": 120}
        job = instant.request_instant_volume(session, backup_uuid, params, None)
        job_uuid, volume_uuid = job.uuid, str(job.resourceUuid)
    outcome: dict[str, Any] = {}

    def worker() -> None:
        try:
            outcome["result"] = run_job(instant.run_instant, job_uuid)
        except BaseException as exc:  # noqa: BLE001 - reported
            outcome["error"] = exc

    thread = threading.Thread(target=worker)
    thread.start()
    while True:
        with db.session() as session:
            volume = session.get(Volume, volume_uuid)
            assert volume is not None
            if volume.status == "Streaming":
                path = volume.installPath
                break
        if "error" in outcome:
            raise outcome["error"]
        time.sleep(0.01)
    overlay_seconds = time.monotonic() - started
    vm = QemuVm(work / "vm0", [Path(path)], ["qcow2"]).start()
    try:
        vm.hmp('qemu-io drive0 "read 0 4096"')
        first_read = time.monotonic() - started
        thread.join()
    finally:
        vm.stop()
    if "error" in outcome:
        raise outcome["error"]
    report = outcome["result"]["instantRestore"]
    size = outcome["result"]["size"]
    figures = {
        "storage": label,
        "overlaySeconds": round(overlay_seconds, 3),
        "firstReadSeconds": round(first_read, 3),
        "streamSeconds": report["streamSeconds"],
        "streamMiBps": round(size / MiB / report["streamSeconds"], 1) if report["streamSeconds"] else None,
        "mode": report["mode"],
    }
    Path(path).unlink()
    return figures


def bench_instant(work: Path, size_mib: int) -> list[dict[str, Any]]:
    from shared import hosts
    from shared.catalog import db
    from shared.catalog.models import VmInstance, Volume, new_uuid
    from shared.config import get_settings
    from shared.repository.repo import Repository
    from shared.service import copies, volume_backups
    from shared.storage import register_storage

    moto_port = free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import boto3

        endpoint = f"http://127.0.0.1:{moto_port}"
        for _ in range(100):
            try:
                s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="a", aws_secret_access_key="b")
                s3.create_bucket(Bucket="bench")
                break
            except Exception:  # noqa: BLE001 - moto still starting
                time.sleep(0.1)
        get_settings.cache_clear()
        db.migrate(get_settings().catalog_url)
        source = work / "vol.raw"
        vm_like(source, size_mib * MiB)
        with db.session() as session:
            host = hosts.register(session, new_uuid())
            Repository.init(str(work / "local")).close()
            local = register_storage(session, {"name": "local", "url": f"file://{work}/local"})
            cloud = register_storage(
                session,
                {
                    "name": "s3",
                    "type": "PublicCloud",
                    "url": "s3://bench/repo",
                    "endpoint": endpoint,
                    "region": "us-east-1",
                    "accessKey": "a",
                    "secretKey": "b",
                    "encryptionPassphrase": "bench passphrase",
                },
            )
            volume = Volume(name="vol", hostUuid=host.uuid, installPath=str(source), size=size_mib * MiB)
            vm = VmInstance(name="vm", hostUuid=host.uuid, qmpSocket=str(work / "vm0" / "qmp.sock"))
            session.add_all([volume, vm])
            session.commit()
            ids = {"host": host.uuid, "local": local.uuid, "cloud": cloud.uuid, "volume": volume.uuid, "vm": vm.uuid}
        with db.session() as session:
            job = volume_backups.request_volume_backup(session, ids["volume"], {}, None)
            backup_uuid, job_uuid = str(job.resourceUuid), job.uuid
        run_job(volume_backups.run_volume_backups, job_uuid)
        with db.session() as session:
            from shared.catalog.models import VolumeBackup

            backup = session.get_one(VolumeBackup, backup_uuid)
            sync = copies.request_sync(
                session, "syncBackupFromImageStoreBackupStorage", [backup], {"dstBackupStorageUuid": ids["cloud"]}, None
            )
            sync_uuid = sync.uuid
        run_job(copies.run_sync, sync_uuid)
        return [
            instant_round(work, backup_uuid, ids["local"], ids["vm"], "local (ImageStore)"),
            instant_round(work, backup_uuid, ids["cloud"], ids["vm"], "S3 (moto, encrypted)"),
        ]
    finally:
        moto.kill()
        moto.wait()


def timed(command: list[str], env: dict[str, str] | None = None, stdout: Any = subprocess.DEVNULL) -> float:
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=stdout, stderr=subprocess.DEVNULL, env=env)
    return time.monotonic() - started


def bench_files(work: Path, file_mib: int, rounds: int, peers: bool) -> dict[str, Any]:
    from shared.files.browse import Browser
    from shared.repository.backup import backup_volume
    from shared.repository.repo import Repository

    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    for i in range(200):
        (tree / "etc" / f"conf{i:03d}").write_text(f"setting {i}\n" * 20)
    big = tree / "big.bin"
    with open(big, "wb") as handle:
        for _ in range(file_mib):
            handle.write(os.urandom(MiB))
    image = work / "fs.raw"
    with open(image, "wb") as handle:
        handle.truncate((file_mib + 64) * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image)], check=True)
    repo = Repository.init(str(work / "files-repo"))
    backup_id = backup_volume(repo, str(image), full=True).id
    listing, extract = [], []
    for _ in range(rounds):
        with Browser(repo, backup_id, "bench") as browser:
            started = time.monotonic()
            assert browser.listdir("/etc", None)["total"] == 200
            listing.append(time.monotonic() - started)
        with Browser(repo, backup_id, "bench") as browser:
            started = time.monotonic()
            entry, pieces = browser.open("/big.bin", None)
            got = sum(len(piece) for piece in pieces)
            extract.append(time.monotonic() - started)
            assert got == entry["size"] == file_mib * MiB
    figures: dict[str, Any] = {
        "listEtcSeconds": round(statistics.median(listing), 3),
        "extractSeconds": round(statistics.median(extract), 3),
        "extractMiBps": round(file_mib / statistics.median(extract), 1),
    }
    if peers and shutil.which("restic") and shutil.which("borg"):
        env = {
            **os.environ,
            "RESTIC_PASSWORD": "bench",
            "BORG_PASSPHRASE": "bench",
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        }
        restic, borg = str(work / "restic"), str(work / "borg")
        subprocess.run(["restic", "init", "-q", "-r", restic], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["restic", "backup", "-q", "-r", restic, "."], check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL
        )
        subprocess.run(["borg", "init", "-e", "none", borg], check=True, env=env)
        subprocess.run(["borg", "create", f"{borg}::a", "."], check=True, env=env, cwd=tree)
        figures["restic"] = {
            "listEtcSeconds": round(
                statistics.median(timed(["restic", "ls", "-r", restic, "latest", "/etc"], env) for _ in range(rounds)),
                3,
            ),
            "extractSeconds": round(
                statistics.median(
                    timed(["restic", "dump", "-r", restic, "latest", "/big.bin"], env) for _ in range(rounds)
                ),
                3,
            ),
        }
        figures["borg"] = {
            "listEtcSeconds": round(
                statistics.median(timed(["borg", "list", f"{borg}::a", "etc"], env) for _ in range(rounds)), 3
            ),
            "extractSeconds": round(
                statistics.median(
                    timed(["borg", "extract", "--stdout", f"{borg}::a", "big.bin"], env) for _ in range(rounds)
                ),
                3,
            ),
        }
        for peer in ("restic", "borg"):
            figures[peer]["extractMiBps"] = round(file_mib / figures[peer]["extractSeconds"], 1)
        figures["ratios"] = {
            f"list vs {peer}": round(figures["listEtcSeconds"] / figures[peer]["listEtcSeconds"], 2)
            for peer in ("restic", "borg")
        } | {
            f"extract vs {peer}": round(figures["extractSeconds"] / figures[peer]["extractSeconds"], 2)
            for peer in ("restic", "borg")
        }
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="instant recovery volume, MiB")
    parser.add_argument("--file-mib", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir")
    parser.add_argument("--json")
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bv-bench-instant-"))
    work.mkdir(parents=True, exist_ok=True)
    settings(work)
    try:
        report = {
            "loadAverage": os.getloadavg(),
            "instant": bench_instant(work, args.size),
            "files": bench_files(work, args.file_mib, args.rounds, not args.no_peers),
            "loadAverageAfter": os.getloadavg(),
        }
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
