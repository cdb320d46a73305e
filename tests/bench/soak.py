#!/usr/bin/env python3
"""A soak: a whole site under scheduled work for N minutes while random faults hit it, then
checks of what it left, made independently of the service's own view.

Run as::

    .venv/bin/python tests/bench/soak.py --minutes 20 [--seed 7] [--keep] [--data DIR]
    make soak SOAK_MINUTES=20

The site: the API, a beat and two hosts' workers (each with its own host uuid, in a network
namespace of its own where they can be made: tests/bench/soak_site.py) on a PostgreSQL database
and a Redis database of their own; on each host a raw and a qcow2 volume that a thread keeps
writing, and on the first a Running VM's qcow2 attached to a QEMU (written through QMP, backed
up live); an ImageStore master on a small tmpfs (so it can be filled and made read-only) and a
standby folder; a remote storage-server and an S3 bucket (moto) that the newest backups are
copied to; a job group backing every volume up every few seconds with retention. Faults at
random times (the seed is printed first): SIGKILL and restart of a worker, the beat, the API or
the storage-server; Redis and PostgreSQL restarts (each with the machine-wide lock of
tests/services.py held exclusively, so no other test runs meanwhile); the master made read-only;
the master's disk filled to its last byte; a worker restarted with its clock minutes off; a
host's or the storage-server's link cut (namespaces only); a Running VM's QEMU (soak_site.py)
SIGKILLed and restarted. Each fault is healed a few seconds later.

At the end, with every fault healed and the triggers detached: no job left Pending or Running;
every Ready backup's copy on each ImageStore is in a repository that verifies with its data
re-read, and every Ready copy on the remote and S3 verifies with ``readData`` through the API;
no job ran twice (one ``job.started`` per job in the workers' logs) and no fire ran a target
twice; every finished scheduled run has its history row; and tests/bench/soak_check.py's
checks: the volumes are written with self-describing blocks, Ready backups are restored from each
Ready copy and judged byte for byte, and the catalog's newest Ready database backup (a
databaseBackup group every 20 s) is recovered into a scratch database and checked. One JSON line
sums it up; exit 1 on any violation. The data folder is removed unless ``--keep``. Run as root (tmpfs).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from sqlalchemy import create_engine, select  # noqa: E402

from api.client import ApiError  # noqa: E402
from shared.catalog.models import ApiJob, SchedulerJobHistory, VolumeBackup, new_uuid  # noqa: E402
from shared.repository.backends import open_backend  # noqa: E402
from shared.repository.maintenance import verify  # noqa: E402
from shared.repository.repo import Repository  # noqa: E402
from tests.bench.soak_check import BlockWriter, CatalogWatch, EndCheck  # noqa: E402
from tests.bench.soak_site import Site  # noqa: E402
from tests.conftest import MiB  # noqa: E402
from tests.full_disk import fill, mount_small, unmount  # noqa: E402
from tests.ports import free_port  # noqa: E402
from tests.s3_fixtures import S3Server  # noqa: E402
from tests.storage_server_fixtures import StorageServer  # noqa: E402

FAULTS = (
    "kill_worker",
    "kill_beat",
    "kill_api",
    "kill_storage_server",
    "restart_redis",
    "restart_postgres",
    "master_read_only",
    "master_full",
    "clock_skew",
)
VOLUME_SIZE = 16 * MiB
PASSPHRASE = "soak cloud passphrase"
SETTLE_SECONDS = 240.0  # for the jobs under way to end once the faults stop


@dataclass
class Report:
    seed: int
    minutes: float
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    jobs: int = 0
    backups_ready: int = 0
    backups_failed: int = 0
    copies_verified: int = 0
    bytes_verified: int = 0
    checks: dict[str, int] = field(default_factory=dict)  # the end check's counts (soak_check)
    violations: list[str] = field(default_factory=list)
    site: dict[str, Any] = field(default_factory=dict)  # where the hosts ran, the Running VM (soak_site.py)

    def line(self) -> str:
        return json.dumps(
            {
                "seed": self.seed,
                "minutes": self.minutes,
                "faults": dict(sorted(self.faults.items())),
                "jobsRun": self.jobs,
                "backupsReady": self.backups_ready,
                "backupsFailed": self.backups_failed,
                "copiesVerified": self.copies_verified,
                "bytesVerified": self.bytes_verified,
                **self.checks,
                "violations": self.violations,
                "site": self.site,
            },
            sort_keys=True,
        )


class Soak:
    """One run: the site, its faults and its checks."""

    def __init__(
        self,
        data: Path,
        database_url: str,
        redis_url: str,
        *,
        seed: int,
        minutes: float,
        pg_control: Any,
        redis_control: Any,
    ) -> None:
        data.mkdir(parents=True, exist_ok=True)
        self.data, self.rng = data, random.Random(seed)
        self.report = Report(seed=seed, minutes=minutes)
        self.minutes = minutes
        self.database_url, self.redis_url = database_url, redis_url
        self.pg_control, self.redis_control = pg_control, redis_control
        self.hosts = [new_uuid(), new_uuid()]
        self.site = Site(data)
        self.faults = FAULTS + self.site.faults()
        self.stack = self.site.stack(data, database_url, redis_url, self.hosts)
        self.stack.env.update(BLOCKVAULT_STORAGE_CHECK_SECONDS="2", BLOCKVAULT_STORAGE_RETRY_SECONDS="4")
        self.volumes: list[tuple[dict[str, Any], Path]] = []
        self.master_disk = data / "master-disk"
        self.stopping = threading.Event()
        self.blocks = BlockWriter(data / "check", seed)
        self.watch = CatalogWatch(database_url)
        self.log = open(data / "soak.log", "a")  # noqa: SIM115 - open for the run

    def say(self, text: str) -> None:
        self.log.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.log.flush()

    # -- the site ---------------------------------------------------------------------------
    def build(self) -> None:
        stack, client = self.stack, self.stack.client
        mount_small(self.master_disk, "512m")
        stack.start_api()
        for host in self.hosts:
            stack.start_worker(host)
        stack.start_beat()
        self.master = client.add_backup_storage("master", f"file://{self.master_disk / 'bs'}")
        self.standby = client.add_backup_storage("standby", f"file://{self.data / 'standby'}", role="standby")
        (self.data / "remote").mkdir(exist_ok=True)
        self.server = self.site.storage_server(self.data / "remote", self.data / "storage-server.log", "soak-token")
        self.server.start()
        self.remote = client.create(
            "backup-storage", {"name": "remote", "type": "Remote", "url": self.server.url, "token": "soak-token"}
        )
        self.s3 = S3Server(moto_port=free_port(), workdir=self.data)
        self.s3.start()
        bucket = self.s3.make_bucket("soak")
        self.cloud = client.create(
            "backup-storage",
            {
                "name": "cloud",
                "type": "PublicCloud",
                "url": f"s3://{bucket}/soak",
                **self.site.s3_options(self.s3, bucket),
                "encryptionPassphrase": PASSPHRASE,
            },
        )
        for number, host in enumerate(self.hosts):
            raw = self.data / f"h{number}-root.raw"
            with open(raw, "wb") as handle:
                handle.truncate(VOLUME_SIZE)
            qcow2 = self.data / f"h{number}-data.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(VOLUME_SIZE)], check=True)
            for path in (raw, qcow2):
                volume = client.register_volume(host, str(path), name=path.stem)
                self.volumes.append((volume, path))
                self.blocks.add(volume["uuid"], path, VOLUME_SIZE)
        group = client.create_job_group("soak", "volumeBackup", fullBackupInterval=5, retention={"keepLast": 3})
        vm_volume = self.site.start_vm(client, self.hosts[0])  # a Running VM: its volume backed up live
        client.add_targets(group["uuid"], [v["uuid"] for v, _ in self.volumes] + [vm_volume["uuid"]])
        self.trigger = client.create_trigger("soak", schedulerType="simple", schedulerInterval=6, repeatCount=100000)
        client.attach_trigger(self.trigger["uuid"], group["uuid"])
        self.group = group
        self.database_backups()

    def database_backups(self) -> None:
        """The catalog backed up every 20 s by a databaseBackup group (kept: the last 3)."""
        client = self.stack.client
        self.db_group = client.create_job_group("soak-db", "databaseBackup", retention={"keepLast": 3})
        self.db_trigger = client.create_trigger(
            "soak-db", schedulerType="simple", schedulerInterval=20, repeatCount=100000
        )
        client.attach_trigger(self.db_trigger["uuid"], self.db_group["uuid"])

    def write_volumes(self) -> None:
        """Keep writing the volumes with self-describing blocks (soak_check.BlockWriter: raw in
        place, qcow2 through qemu-io, refused while a backup holds qemu's image lock)."""
        while not self.stopping.wait(0.5):
            self.blocks.write_once()

    def write_vm(self) -> None:
        """Keep writing the Running VM's disk through QEMU."""
        rng = random.Random(self.report.seed)
        while not self.stopping.wait(1.0):
            self.site.write_vm(rng)

    def copy_newest(self) -> None:
        """Every ~15 s: the newest Ready backup copied to the remote and to S3."""
        while not self.stopping.wait(15):
            with contextlib.suppress(ApiError):
                rows = self.stack.client.query("volume-backups", "status=Ready", limit=1, sort="-createDate")
                for row in rows["inventories"]:
                    for target in (self.remote, self.cloud):
                        self.stack.client.sync_backup(row["uuid"], target["uuid"])

    # -- faults -----------------------------------------------------------------------------
    def restart_worker(self, host: str, env: dict[str, str] | None = None) -> None:
        name = f"worker-{host[:8]}"
        self.stack.kill(name)
        self.stack.start_worker(host, env)

    def inject(self, kind: str) -> None:
        stack = self.stack
        self.say(f"fault {kind}")
        self.report.faults[kind] += 1
        if kind == "kill_worker":
            self.restart_worker(self.rng.choice(self.hosts))
        elif kind == "kill_beat":
            stack.kill("beat")
            stack.start_beat()
        elif kind == "kill_api":
            stack.kill("api")
            stack.start_api()
        elif kind == "kill_storage_server":
            self.server.kill()
            time.sleep(self.rng.uniform(1, 5))
            self.server.start()
        elif kind in ("restart_redis", "restart_postgres"):
            control = self.redis_control if kind == "restart_redis" else self.pg_control
            control.restart()  # the soak's own servers (tests/services.py private_servers)
        elif kind == "master_read_only":
            subprocess.run(["mount", "-o", "remount,ro", str(self.master_disk)], check=True)
            time.sleep(self.rng.uniform(5, 15))
            subprocess.run(["mount", "-o", "remount,rw", str(self.master_disk)], check=True)
        elif kind == "master_full":
            filler = fill(self.master_disk)
            time.sleep(self.rng.uniform(5, 15))
            filler.unlink()
        elif kind == "clock_skew":
            host = self.rng.choice(self.hosts)
            skew = self.rng.choice((-1, 1)) * self.rng.randrange(120, 600)
            self.restart_worker(host, {"BLOCKVAULT_FAILPOINTS": f"clock=1:skew{skew:+d}"})
            time.sleep(self.rng.uniform(10, 30))
            self.restart_worker(host)
        elif kind == "link_cut":
            self.site.cut_link(self.rng, self.say)
        elif kind == "kill_qemu":
            self.site.kill_qemu(self.rng, self.say)

    def run(self) -> Report:
        self.build()
        self.watch.start()
        loops = (self.write_volumes, self.write_vm, self.copy_newest)
        threads = [threading.Thread(target=loop, daemon=True) for loop in loops]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + self.minutes * 60
        while time.monotonic() < deadline:
            time.sleep(min(self.rng.uniform(5, 20), max(0.0, deadline - time.monotonic())))
            if time.monotonic() < deadline:
                self.inject(self.rng.choice(self.faults))
        self.stopping.set()
        for thread in threads:
            thread.join(timeout=120)
        self.check()
        return self.report

    # -- checks -----------------------------------------------------------------------------
    def violation(self, text: str) -> None:
        self.say(f"VIOLATION {text}")
        self.report.violations.append(text)

    def check(self) -> None:
        client = self.stack.client
        client.detach_trigger(self.trigger["uuid"], self.group["uuid"])
        client.detach_trigger(self.db_trigger["uuid"], self.db_group["uuid"])
        engine = create_engine(self.database_url)
        deadline = time.monotonic() + SETTLE_SECONDS
        with engine.connect() as connection:
            while True:
                busy = connection.execute(
                    select(ApiJob.uuid, ApiJob.state, ApiJob.action).where(ApiJob.state.in_(("Pending", "Running")))
                ).all()
                connection.rollback()
                if not busy or time.monotonic() > deadline:
                    break
                time.sleep(2)
            for uuid, state, action in busy:
                self.violation(f"job {uuid} ({action}) left {state}")
            jobs = connection.execute(select(ApiJob.uuid, ApiJob.action, ApiJob.state, ApiJob.params)).all()
            backups = connection.execute(select(VolumeBackup.uuid, VolumeBackup.status)).all()
            histories = connection.execute(
                select(
                    SchedulerJobHistory.schedulerJobGroupUuid,
                    SchedulerJobHistory.schedulerJobUuid,
                    SchedulerJobHistory.executeTime,
                )
            ).all()
        engine.dispose()
        self.report.jobs = len(jobs)
        self.report.backups_ready = sum(1 for _u, status in backups if status == "Ready")
        self.report.backups_failed = sum(1 for _u, status in backups if status == "Failed")
        self.watch.stop()
        self.check_once(jobs, histories)
        self.check_copies()
        self.check_site()
        self.check_restores()

    def check_site(self) -> None:
        """The Running VM's backups: some Ready, every Ready one taken live."""
        client = self.stack.client
        ready, failed = self.site.live_backups(client)
        self.report.site = {
            "hosts": self.site.hosts_in,
            "vmBackupsReady": ready,
            "vmBackupsFailed": failed,
            "vmWrites": self.site.vm_writes,
        }
        for uuid in self.site.not_live(client):
            self.violation(f"backup {uuid} of the Running VM's volume was not taken live")
        if ready == 0:
            self.violation("the Running VM's volume has no Ready backup")

    def check_restores(self) -> None:
        """soak_check.EndCheck: Ready backups restored byte for byte from each Ready copy and
        judged block by block; the newest database backup recovered and checked."""
        storages = {s["uuid"]: s for s in self.stack.client.query("backup-storage", limit=100)["inventories"]}
        opened: dict[str, Repository] = {}

        def repository(uuid: str) -> Repository:
            if uuid not in opened:
                if uuid == self.master["uuid"]:
                    opened[uuid] = Repository.open(str(self.master_disk / "bs"), None)
                elif uuid == self.standby["uuid"]:
                    opened[uuid] = Repository.open(str(self.data / "standby"), None)
                elif uuid == self.remote["uuid"]:
                    opened[uuid] = Repository.open(open_backend(self.server.url, {"token": "soak-token"}), None)
                else:
                    backend = open_backend(storages[uuid]["url"], self.s3.options())
                    opened[uuid] = Repository.open(backend, PASSPHRASE)
            return opened[uuid]

        end = EndCheck(
            self.stack.client,
            self.blocks,
            self.watch,
            self.data / "check",
            repository,
            {uuid: s["name"] for uuid, s in storages.items()},
            self.violation,
            random.Random(self.report.seed),
        )
        try:
            end.restore_volumes()
            end.restore_database(self.database_url, self.site.reach_from_hosts)
        finally:
            for repo in opened.values():
                with contextlib.suppress(Exception):
                    repo.close()
            self.report.checks = end.checked.summary()

    def check_once(self, jobs: list[Any], histories: list[Any]) -> None:
        logs = "".join(self.stack.log(name) for name in self.stack.procs if name.startswith("worker-"))
        started = collections.Counter(re.findall(r"job\.started uuid=([0-9a-f]+)", logs))
        for uuid, count in started.items():
            if count > 1:
                self.violation(f"job {uuid} started {count} times")
        fires: collections.Counter[tuple[str, str]] = collections.Counter()
        # a run is named by its job (target) or, for groups without targets (databaseBackup), its group
        recorded = {(job or f"group {group}", when.astimezone(UTC)) for group, job, when in histories if when}
        for uuid, action, state, params in jobs:
            if action != "schedulerJob":
                continue
            job = params.get("schedulerJobUuid") or f"group {params.get('schedulerJobGroupUuid')}"
            key = (str(job), str(params.get("fireTime")))
            fires[key] += 1
            fired_at = datetime.fromisoformat(key[1]).astimezone(UTC) if params.get("fireTime") else None
            if state in ("Succeeded", "Failed") and (key[0], fired_at) not in recorded:
                self.violation(f"scheduled run {uuid} ({key[1]}) has no history row")
        for (job, when), count in fires.items():
            if count > 1:
                self.violation(f"fire {when} ran target job {job} {count} times")

    def check_copies(self) -> None:
        client = self.stack.client
        storages = {s["uuid"]: s for s in client.query("backup-storage", limit=100)["inventories"]}
        rows = client.query("volume-backups", "status=Ready", limit=10000)["inventories"]
        folders = {self.master["uuid"]: self.master_disk / "bs", self.standby["uuid"]: self.data / "standby"}
        manifests: dict[str, set[str]] = {}
        for uuid, folder in folders.items():
            repository = Repository.open(str(folder), None)
            report = verify(repository, None, read_data=True)
            self.report.bytes_verified += report.bytesRead
            if not report.ok:
                self.violation(f"repository of {storages[uuid]['name']}: {[p.describe() for p in report.problems]}")
            manifests[uuid] = set(repository.manifest_ids())
        for row in rows:
            for ref in row["backupStorageRefs"]:
                if ref["status"] != "Ready":
                    continue
                where = ref["backupStorageUuid"]
                manifest = str(ref["installPath"]).rsplit("/", 1)[-1]
                if where in manifests:
                    if manifest not in manifests[where]:
                        self.violation(f"backup {row['uuid']} Ready on {storages[where]['name']} without its manifest")
                    else:
                        self.report.copies_verified += 1
                    continue
                job = ""
                try:
                    job = client.verify_backup(row["uuid"], backupStorageUuid=where, readData=True)
                    client.wait(job, timeout=300)
                    self.report.copies_verified += 1
                except ApiError as exc:
                    why = f"\n{self.explain(job)}" if exc.code == "TIMEOUT" else ""
                    self.violation(f"backup {row['uuid']} on {storages[where]['name']} does not verify: {exc}{why}")

    def explain(self, job: str) -> str:
        """What a job that does not end is doing: its row, the broker's queues, the workers'
        log lines about it and every process's stacks (a hang is diagnosed from one run)."""
        engine = create_engine(self.database_url)
        row: object
        try:
            with engine.connect() as connection:
                columns = (ApiJob.state, ApiJob.hostUuid, ApiJob.createDate, ApiJob.lastOpDate)
                row = connection.execute(select(*columns).where(ApiJob.uuid == job)).first()
        except Exception as exc:  # noqa: BLE001 - a diagnosis says what it could not read
            row = exc
        finally:
            engine.dispose()
        queues: dict[str, object]
        try:
            broker = redis.Redis.from_url(self.redis_url)
            queues = {key.decode(): broker.llen(key) for key in broker.scan_iter("storage*")}
            queues["unacked"] = broker.hlen("unacked")
            broker.close()
        except Exception as exc:  # noqa: BLE001
            queues = {"error": str(exc)}
        mentions = [
            f"{name}: {line}"
            for name in self.stack.procs
            for line in self.stack.log(name).splitlines()
            if job and job in line
        ]
        return "\n".join([f"job {job}: row {row}; broker {queues}", *mentions[-20:], self.stack.stacks()[-30000:]])

    def close(self) -> None:
        self.stopping.set()
        self.stack.stop_all()
        for stop in (getattr(self, "server", None), getattr(self, "s3", None)):
            if stop is not None:
                with contextlib.suppress(Exception):
                    (stop.kill if isinstance(stop, StorageServer) else stop.stop)()
        self.site.close(self.say)
        subprocess.run(["mount", "-o", "remount,rw", str(self.master_disk)], capture_output=True, check=False)
        unmount(self.master_disk)
        self.log.close()


def soak(data: Path, database_url: str, redis_url: str, **options: Any) -> Report:
    """One soak in ``data`` on the given catalog and broker (``options``: those of
    :class:`Soak`); its report. Everything it started is stopped, whatever happens."""
    run = Soak(data, database_url, redis_url, **options)
    try:
        return run.run()
    finally:
        run.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--data", type=Path, default=None, help="the data folder (default: a new one in $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the data folder for inspection")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    data = args.data or Path(tempfile.mkdtemp(prefix="blockvault-soak-"))
    data.mkdir(parents=True, exist_ok=True)
    print(f"soak: seed {seed}, {args.minutes} minutes, data in {data}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        from tests.services import private_servers  # restarted at random: the soak's own servers

        with private_servers(data / "servers") as (database, broker, pg, redis_control):
            report = soak(
                data,
                database,
                broker,
                seed=seed,
                minutes=args.minutes,
                pg_control=pg,
                redis_control=redis_control,
            )
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(data)], check=False)
    print(report.line(), flush=True)
    if report.violations:
        print(f"soak: {len(report.violations)} violations; reproduce with --seed {seed}", file=sys.stderr)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
