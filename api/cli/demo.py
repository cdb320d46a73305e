"""``blockvault demo``: the main job, end to end, through the service on the embedded default.

Starts ``blockvault up`` (API + a worker, SQLite catalog, filesystem broker), registers a VM
with a raw root volume and a qcow2 data volume, backs the VM up full, lets it write a few
percent, backs it up again (incremental; the qcow2 through its dirty bitmap), reverts one
volume, creates a new volume from the other's backup, verifies, syncs both backups to a remote
site (a ``blockvault storage-server`` on loopback), restores from there, replicates every
backup to a standby ImageStore, schedules a job group that copies to the remote site, checks
every result byte for byte and prints the job history and the inventories.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx

from api.client import ApiError, Client
from shared.config import get_settings

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


def _start_service(work: Path, port: int) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """``blockvault up`` in the background on a fresh embedded data dir (SQLite catalog,
    filesystem broker), with an admin key for this run."""
    key = "demo-" + secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
    env.update(
        BLOCKVAULT_DATA_DIR=str(work / "data"),
        BLOCKVAULT_VOLUME_ROOTS=str(work),  # the demo's disks live here (its data folder stays out of reach)
        BLOCKVAULT_ADMIN_API_KEY=key,
        BLOCKVAULT_API_KEY=key,
        BLOCKVAULT_API_URL=f"http://127.0.0.1:{port}",
        BLOCKVAULT_HEARTBEAT_SECONDS="2",
    )
    log = open(work / "service.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "up", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    return proc, env


def _start_storage_server(work: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """A ``blockvault storage-server`` standing in for the remote data center."""
    token = secrets.token_urlsafe(24)
    port = _free_port()
    (work / "remote-site").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
    env["BLOCKVAULT_STORAGE_TOKEN"] = token
    log = open(work / "storage-server.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "storage-server", "--root", str(work / "remote-site"), "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    with httpx.Client(timeout=2) as http:  # one client for the polls (each new one loads the CA bundle)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise click.ClickException(f"the storage-server stopped: see {work / 'storage-server.log'}")
            try:
                if http.get(f"{url}/v1/health").status_code == 200:
                    return proc, f"{url}/dc1", token
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise click.ClickException(f"the storage-server did not answer in 30 s: see {work / 'storage-server.log'}")


def _on(client: Client, storage_uuid: str) -> bool:
    rows = client.query("volume-backups", "status=Ready")["inventories"]
    return all(any(r["backupStorageUuid"] == storage_uuid for r in row["backupStorageRefs"]) for row in rows)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(client: Client, proc: subprocess.Popen[bytes], work: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"blockvault up stopped: see {work / 'service.log'}")
        try:
            hosts = client.query("hosts", "status=Connected")["inventories"]
            if hosts:
                return str(hosts[0]["uuid"])
        except ApiError:
            pass
        time.sleep(0.3)
    raise click.ClickException(f"the service did not come up in 60 s: see {work / 'service.log'}")


def _stats(result: dict[str, Any]) -> str:
    stats = result.get("stats", {})
    seconds = stats.get("seconds") or 0
    speed = stats.get("bytesRead", 0) / seconds / MiB if seconds else 0.0
    return (
        f"{result['type']:<4} {result['mode']:<11} read {stats.get('bytesRead', 0) / MiB:6.1f} MiB  "
        f"stored {stats.get('bytesWritten', 0) / MiB:5.1f} MiB  {seconds:5.2f} s  {speed:6.0f} MiB/s"
    )


def run_demo(workdir: str | None) -> None:
    """Through the service: register a VM with a root and a data volume, back the VM up full
    and incrementally, revert one volume, create a new volume from the other's backup, sync
    the storage to a second site, verify byte for byte, print the inventories."""
    work = (Path(workdir) if workdir else get_settings().data_dir / "demo").absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    click.echo(f"blockvault demo in {work}")
    root, data = work / "vm1-root.raw", work / "vm1-data.qcow2"
    make_vm_volume(root, VOLUME_SIZE, seed=1)
    seed_raw = work / "seed.raw"
    make_vm_volume(seed_raw, VOLUME_SIZE, seed=2)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(seed_raw), str(data)], check=True)
    seed_raw.unlink()
    port = _free_port()
    proc, env = _start_service(work, port)
    client = Client(env["BLOCKVAULT_API_URL"], env["BLOCKVAULT_API_KEY"])
    servers: list[subprocess.Popen[bytes]] = []
    try:
        host = _wait_ready(client, proc, work)
        click.echo(f"service up on {client.base_url} (api + worker, SQLite catalog, filesystem broker); host {host}")
        store = client.add_backup_storage("local", f"file://{work / 'local-storage'}")
        standby = client.add_backup_storage("local-standby", f"file://{work / 'local-standby'}", role="standby")
        click.echo(f"backup storage: ImageStore master {store['name']} and standby {standby['name']} (replicated)")
        vm = client.register_vm("vm1", hostUuid=host, cpuNum=2, memorySize=2 * 1024**3)
        root_vol = client.register_volume(host, str(root), type="Root", vmInstanceUuid=vm["uuid"], name="vm1-root")
        data_vol = client.register_volume(host, str(data), type="Data", vmInstanceUuid=vm["uuid"], name="vm1-data")
        click.echo(f"registered VM {vm['uuid']} with {root_vol['name']} (raw) and {data_vol['name']} (qcow2)")

        full = client.wait(client.backup_vm(root_vol["uuid"], name="vm1-full"))
        click.echo(f"\nVM backup {full['groupUuid']} (full):")
        for backup in full["volumeBackups"]:
            click.echo(f"  {backup['uuid']}  {_stats(backup)}")
        snapshot_root, snapshot_data = work / "root-at-full.raw", work / "data-at-full.raw"
        shutil.copyfile(root, snapshot_root)
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(data), str(snapshot_data)], check=True)

        changed = change_raw(root, 0.05, seed=3) + change_qcow2(data, 0.05, seed=4)
        click.echo(f"\nthe VM wrote {changed / MiB:.0f} MiB into both volumes")
        incr = client.wait(client.backup_vm(root_vol["uuid"], name="vm1-incr"))
        click.echo(f"VM backup {incr['groupUuid']} (incremental; the qcow2 read through its dirty bitmap):")
        for backup in incr["volumeBackups"]:
            click.echo(f"  {backup['uuid']}  {_stats(backup)}")

        by_type = {b["type"]: b for b in full["volumeBackups"]}
        client.wait(client.revert_volume(by_type["Root"]["uuid"]))
        if not _equal_files(root, snapshot_root):
            raise click.ClickException("the reverted root volume differs from its full backup")
        click.echo(f"\nreverted {root_vol['name']} to the full backup: identical to the volume at that time")
        target = work / "vm1-data-restored.qcow2"
        new_vol = client.wait(
            client.create_volume_from_backup(
                by_type["Data"]["uuid"], name="vm1-data-restored", hostUuid=host, installPath=str(target)
            )
        )
        if not same_content(target, snapshot_data):
            raise click.ClickException("the volume created from the data backup differs from the volume at that time")
        click.echo(f"created volume {new_vol['uuid']} from the data backup: identical to the volume at that time")
        for backup in incr["volumeBackups"]:
            verified = client.wait(client.verify_backup(backup["uuid"], readData=True))
            click.echo(f"verified {backup['uuid']} (read and re-hashed {verified['verified']['chunks']} chunks)")

        remote_proc, remote_url, token = _start_storage_server(work)
        servers.append(remote_proc)
        remote_store = client.create(
            "backup-storage", {"name": "remote-site", "type": "Remote", "url": remote_url, "token": token}
        )
        report = client.wait(client.sync_vm_backup(full["groupUuid"], remote_store["uuid"]))
        report_incr = client.wait(client.sync_vm_backup(incr["groupUuid"], remote_store["uuid"]))
        again = client.wait(client.sync_vm_backup(incr["groupUuid"], remote_store["uuid"]))
        click.echo(
            f"\nsynced both VM backups to the remote site {remote_url} (a blockvault storage-server): "
            f"{(report['bytesCopied'] + report_incr['bytesCopied']) / MiB:.1f} MiB in "
            f"{report['chunksCopied'] + report_incr['chunksCopied']} chunks (the incremental sent "
            f"{report_incr['chunksCopied']}); again: {again['chunksCopied']} chunks"
        )
        check = work / "root-from-remote.raw"
        client.wait(
            client.create_volume_from_backup(
                by_type["Root"]["uuid"],
                name="vm1-root-from-remote",
                hostUuid=host,
                installPath=str(check),
                backupStorageUuid=remote_store["uuid"],
            )
        )
        if not _equal_files(check, snapshot_root):
            raise click.ClickException("the restore from the remote site differs")
        click.echo("created a volume from the root volume's full backup on the remote site: identical")
        if not _on(client, standby["uuid"]):
            raise click.ClickException("the standby lacks a replica of a backup")
        click.echo(f"the standby {standby['name']} holds a replica of every backup")

        group = client.create_job_group(
            "vm1-every-3s",
            "vmBackup",
            backupStorageUuids=[store["uuid"], remote_store["uuid"]],
            fullBackupInterval=3,
            retention={"keepLast": 2},
        )
        client.add_targets(group["uuid"], [vm["uuid"]])
        trigger = client.create_trigger("every-3s", schedulerType="simple", schedulerInterval=3, repeatCount=3)
        client.attach_trigger(trigger["uuid"], group["uuid"])
        click.echo(
            f"\njob group {group['name']} (vmBackup, copies to the remote site, full every 3rd run, keep 2) "
            f"on trigger {trigger['name']} (3 fires); the beat fires it:"
        )
        deadline = time.monotonic() + 120
        while len(client.histories(f"schedulerJobGroupUuid={group['uuid']}")) < 3:
            if time.monotonic() > deadline:
                raise click.ClickException(f"the scheduled runs did not finish: see {work / 'service.log'}")
            time.sleep(0.5)
        click.echo("job history (GET /v1/scheduler/jobhistories):")
        for row in client.histories(f"schedulerJobGroupUuid={group['uuid']}", sort="+executeTime"):
            result = json.loads(row["resultDump"] or "{}")
            if row["success"]:
                copies = ", ".join("copied" if c["success"] else f"copy failed: {c['error']}" for c in result["synced"])
                what = (
                    f"{'/'.join(result['mode'])}, read {result['bytesRead'] / MiB:.1f} MiB, {copies}, "
                    f"retention removed {len(result['retention'].get('removed', []))}"
                )
            else:
                what = f"failed: {result.get('error', {}).get('description')}"
            click.echo(f"  #{row['id']}  {row['executeTime']}  success={row['success']}  {what}")

        click.echo("\nvolume backups (GET /v1/volume-backups?sort=+createDate):")
        for row in client.query("volume-backups", sort="+createDate")["inventories"]:
            refs = ", ".join(f"{r['status']} on {r['backupStorageUuid'][:8]}" for r in row["backupStorageRefs"])
            click.echo(
                f"  {row['uuid']}  {row['name']:<9} {row['type']:<4} {row['mode']:<11} {row['status']}  ({refs})"
            )
        click.echo("volumes (GET /v1/volumes):")
        for row in client.query("volumes", sort="+createDate")["inventories"]:
            click.echo(f"  {row['uuid']}  {row['name']:<18} {row['type']:<4} {row['format']:<5} {row['installPath']}")
        grouped = client.query("volume-backups", group_by="mode")["inventories"]
        click.echo("backups by mode: " + ", ".join(f"{g['mode']} {g['count']}" for g in grouped))
        click.echo(f"storage {store['name']}: {store['uuid']}")

        dump = client.wait(client.backup_database(name="catalog"))
        client.wait(client.sync_database_backup(dump["uuid"], remote_store["uuid"]))
        click.echo(
            f"\ndatabase backup {dump['uuid']} of the catalog ({dump['metadata']['engine']}, {dump['size']} bytes, "
            f"md5 {dump['metadata']['md5']}), copied to the remote site"
        )
        kept = {v["uuid"]: v for v in client.query("volumes")["inventories"] if v["name"] in ("vm1-root", "vm1-data")}
        _stop(proc)
        _disaster_drill(work, remote_url, token, kept)
    finally:
        client.close()
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
        _stop(proc)
    click.echo("\ndemo finished: every restore is byte for byte identical.")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _disaster_drill(work: Path, remote_url: str, token: str, volumes: dict[str, dict[str, Any]]) -> None:
    """Lose the site (catalog, broker, local storage and standby, the VM's disks) but the
    remote storage, rebuild from the remote alone, compare every volume byte for byte."""
    expected = work / "disks-before-the-disaster"
    expected.mkdir()
    for volume in volumes.values():
        shutil.move(volume["installPath"], expected / Path(volume["installPath"]).name)
    for gone in ("data", "local-storage", "local-standby"):
        shutil.rmtree(work / gone)
    click.echo(
        "\ndisaster drill: the service is stopped, the catalog, broker, local storage, standby and the VM's "
        "disks are gone; only the remote site is left"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
    env |= {"BLOCKVAULT_DATA_DIR": str(work / "data"), "BLOCKVAULT_STORAGE_TOKEN": token}
    command = [sys.executable, "-m", "api.cli", "rebuild", "--backup-storage-url", remote_url]
    command += ["--restore-volumes", str(work / "rebuilt"), "--json"]
    click.echo(f"$ blockvault rebuild --backup-storage-url {remote_url} --restore-volumes {work / 'rebuilt'}")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise click.ClickException(f"rebuild failed: {done.stderr.strip()}")
    report = json.loads(done.stdout)
    scanned = report["scan"]
    click.echo(
        f"recovered database backup {report['databaseBackup']['name']} into a new catalog, scanned the remote site "
        f"({scanned['backups']} backups, {len(scanned['imported'])} newer than the database backup imported): "
        f"{len(report['vmInstances'])} VM, {len(report['volumes'])} volumes, {report['volumeBackups']} volume backups"
    )
    restored = {item["volumeUuid"]: Path(item["path"]) for item in report["restored"]}
    for uuid, volume in volumes.items():
        before = expected / Path(volume["installPath"]).name
        after = restored.get(uuid)
        same = after is not None and (
            same_content(after, before) if volume["format"] == "qcow2" else _equal_files(after, before)
        )
        if not same:
            raise click.ClickException(f"volume {volume['name']} rebuilt from the remote site differs")
        click.echo(f"  {volume['name']:<9} rebuilt at {after}: identical to the disk before the disaster")


def _equal_files(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


__all__ = ["make_vm_volume", "run_demo"]
