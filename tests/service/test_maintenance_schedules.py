"""Scheduled verify with real API and worker processes on PostgreSQL and Redis: a worker killed
mid-verify, and the next run goes on from the cursor its last batch committed; a flipped byte
found, the backup Corrupted on that storage, repaired from the standby and Ready again."""

from __future__ import annotations

import json
import os

from sqlalchemy import create_engine, select
from sqlalchemy.pool import NullPool

from shared.catalog.models import VerifyCursor, new_uuid
from shared.failpoints import reached
from shared.repository.repo import Repository
from shared.repository.restore import restore_backup
from shared.service.maintenance_runs import VERIFY_BATCH
from tests.conftest import MiB
from tests.service.conftest import Stack
from tests.service.test_cli import bv

KiB = 1024


def _cursor(stack: Stack) -> VerifyCursor:
    engine = create_engine(stack.env["BLOCKVAULT_DATABASE_URL"], poolclass=NullPool)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(VerifyCursor)).one()
            return VerifyCursor(**row._asdict())
    finally:
        engine.dispose()


def _done(stack: Stack, group: str) -> list[dict]:
    rows: list[dict] = stack.client.histories(f"schedulerJobGroupUuid={group}", sort="+executeTime")
    return rows


def test_a_worker_killed_mid_verify_and_the_next_run_goes_on_from_the_cursor(stack: Stack) -> None:
    host, rescuer = new_uuid(), new_uuid()
    gate = stack.tmp / "gate"
    stack.start_worker(host, env={"BLOCKVAULT_FAILPOINTS": f"verify.batch_checked=1:hold:{gate}"})
    folder = stack.tmp / "bs"
    Repository.init(str(folder), chunk_size=64 * KiB).close()  # small chunks: several batches in 40 MiB
    storage = stack.client.add_backup_storage("local", f"file://{folder}")
    path = stack.tmp / "disk.raw"
    path.write_bytes(os.urandom(40 * MiB))
    volume = stack.client.register_volume(host, str(path), name="disk")
    assert stack.client.wait(stack.client.backup_volume(volume["uuid"]), timeout=180)["status"] == "Ready"
    repo = Repository.open(str(folder))
    chunks = sorted({d for mid in repo.manifest_ids() for d in repo.load_manifest(mid).referenced()})
    assert len(chunks) > 2 * VERIFY_BATCH
    made = bv(stack, "job-group", "create", "--name", "verify-local", "--type", "verify", "--json")
    assert made.returncode == 0, made.stderr
    group = json.loads(made.stdout)
    wrong = bv(stack, "job-group", "add-target", group["uuid"], volume["uuid"])  # a volume is no storage
    assert wrong.returncode == 2 and wrong.stderr.startswith("blockvault: error: INVALID_ARGUMENT"), wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    mixed = bv(stack, "job-group", "create", "--name", "x", "--type", "verify", "--keep-last", "2")
    assert mixed.returncode == 2 and "retention" in mixed.stderr and len(mixed.stderr.strip().splitlines()) == 1
    added = bv(stack, "job-group", "add-target", group["uuid"], storage["uuid"])
    assert added.returncode == 0, added.stderr

    stack.client.run_job_group(group["uuid"])
    stack.wait_for("the verify holding after its first batch", lambda: reached(gate), timeout=120)
    stack.kill(f"worker-{host[:8]}")
    cursor = _cursor(stack)
    assert (cursor.position, cursor.chunksChecked, cursor.cycle) == (chunks[VERIFY_BATCH - 1], VERIFY_BATCH, 0)

    stack.start_worker(rescuer)  # reaps the dead host: its run fails (or is run again here)
    stack.wait_for("the killed run's history row", lambda: len(_done(stack, group["uuid"])) >= 1, timeout=120)
    if not any(row["success"] for row in _done(stack, group["uuid"])):
        stack.client.run_job_group(group["uuid"])  # the next run
    stack.wait_for("a run to succeed", lambda: any(r["success"] for r in _done(stack, group["uuid"])), timeout=120)

    rows = _done(stack, group["uuid"])
    failed = [row for row in rows if not row["success"]]
    (resumed,) = [json.loads(row["resultDump"]) for row in rows if row["success"]]
    assert all(json.loads(row["resultDump"])["error"]["code"] in ("HOST_DISCONNECTED", "WORKER_LOST") for row in failed)
    assert (resumed["from"], resumed["chunksChecked"]) == (chunks[VERIFY_BATCH - 1], len(chunks) - VERIFY_BATCH)
    assert (resumed["cycle"], resumed["cycleDone"], resumed["damaged"]) == (0, True, 0)
    after = _cursor(stack)
    assert (after.position, after.cycle, after.chunksChecked) == ("", 1, 0)


def test_a_flipped_byte_found_by_a_scheduled_verify_is_repaired_from_the_standby(stack: Stack) -> None:
    host = new_uuid()
    stack.start_worker(host)
    master = stack.client.add_backup_storage("master", f"file://{stack.tmp / 'm'}")
    standby = stack.client.add_backup_storage("standby", f"file://{stack.tmp / 's'}", role="standby")
    path = stack.tmp / "disk.raw"
    path.write_bytes(os.urandom(12 * MiB))
    volume = stack.client.register_volume(host, str(path), name="disk")
    backup = stack.client.wait(stack.client.backup_volume(volume["uuid"]), timeout=180)
    sync = stack.client.create_job_group("standby-sync", "storageSync")  # the standby up to date, whatever
    stack.client.add_targets(sync["uuid"], [standby["uuid"]])  # replication did meanwhile
    stack.client.run_job_group(sync["uuid"])
    stack.wait_for("the storageSync run", lambda: len(_done(stack, sync["uuid"])) == 1, timeout=120)
    synced = _done(stack, sync["uuid"])[0]
    assert synced["success"] and json.loads(synced["resultDump"])["srcBackupStorageUuid"] == master["uuid"]
    repo = Repository.open(str(stack.tmp / "m"))
    (manifest,) = repo.manifest_ids()
    digest = sorted(repo.load_manifest(manifest).referenced())[0]
    chunk = stack.tmp / "m" / "chunks" / digest[:2] / digest
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    group = stack.client.create_job_group("verify-master", "verify")
    stack.client.add_targets(group["uuid"], [master["uuid"]])

    stack.client.action("backup-storage", standby["uuid"], "changeBackupStorageState", {"stateEvent": "disable"})
    stack.client.run_job_group(group["uuid"])
    stack.wait_for("the first verify's history", lambda: len(_done(stack, group["uuid"])) == 1, timeout=120)

    def copies() -> dict[str, str]:
        row = stack.client.query("volume-backups", f"uuid={backup['uuid']}")["inventories"][0]
        return {r["backupStorageUuid"]: r["status"] for r in row["backupStorageRefs"]}

    first = json.loads(_done(stack, group["uuid"])[0]["resultDump"])
    assert (first["damaged"], first["repaired"], first["corrupted"]) == (1, 0, [backup["uuid"]])
    assert copies() == {master["uuid"]: "Corrupted", standby["uuid"]: "Ready"}

    stack.client.action("backup-storage", standby["uuid"], "changeBackupStorageState", {"stateEvent": "enable"})
    stack.client.run_job_group(group["uuid"])
    stack.wait_for("the second verify's history", lambda: len(_done(stack, group["uuid"])) == 2, timeout=120)

    second = json.loads(_done(stack, group["uuid"])[1]["resultDump"])
    assert (second["damaged"], second["repaired"], second["corrupted"]) == (1, 1, [])
    assert copies() == {master["uuid"]: "Ready", standby["uuid"]: "Ready"}
    out = stack.tmp / "restored.raw"
    restore_backup(Repository.open(str(stack.tmp / "m")), manifest, str(out))
    assert out.read_bytes() == path.read_bytes()
