"""Scheduled backups with real beat and worker processes on PostgreSQL and Redis."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.catalog.models import new_uuid
from shared.repository.repo import Repository
from shared.repository.restore import restore_backup
from tests.conftest import MiB, vm_like_regions, write_regions
from tests.service.conftest import Stack

pytestmark = pytest.mark.shared_api  # an API lent per test, not started (tests/service/conftest.py)


def volume(stack: Stack, host: str, name: str, size: int = 12 * MiB) -> dict:
    path = stack.tmp / f"{name}.raw"
    write_regions(path, size, vm_like_regions(size, seed=len(name)))
    return stack.client.register_volume(host, str(path), name=name)


def touch(vol: dict, offset: int) -> None:
    with open(vol["installPath"], "r+b") as handle:
        handle.seek(offset)
        handle.write(f"write at {time.time()}".encode() * 100)


def histories(stack: Stack, group: str) -> list[dict]:
    return stack.client.histories(f"schedulerJobGroupUuid={group}", sort="+executeTime")


def test_simple_trigger_full_every_n_copies_and_retention(stack: Stack) -> None:
    host = new_uuid()
    stack.start_worker(host)
    s1 = stack.client.add_backup_storage("first", f"file://{stack.tmp / 's1'}")
    s2 = stack.client.add_backup_storage("second", f"file://{stack.tmp / 's2'}", role="standby")
    vol = volume(stack, host, "sched")
    group = stack.client.create_job_group(
        "nightly",
        "volumeBackup",
        backupStorageUuids=[s1["uuid"], s2["uuid"]],
        fullBackupInterval=2,
        retention={"keepLast": 2},
    )
    stack.client.add_targets(group["uuid"], [vol["uuid"]])
    stack.start_beat()
    # The first fire a moment after the group is attached: a trigger whose first fire time passed
    # before the beat saw the group would (by the misfire rule) skip it and fire 3 times, not 4.
    start = int(time.time() + 2)
    trigger = stack.client.create_trigger(
        "every-2s", schedulerType="simple", schedulerInterval=2, repeatCount=4, startTime=start
    )
    attached = stack.client.attach_trigger(trigger["uuid"], group["uuid"])
    assert attached["triggersUuid"] == [trigger["uuid"]]
    seen = 0
    while seen < 4:  # the VM writes between fires
        stack.wait_for("a history row", lambda n=seen: len(histories(stack, group["uuid"])) > n)
        seen = len(histories(stack, group["uuid"]))
        if seen < 4:
            touch(vol, seen * MiB)
    time.sleep(5)  # repeatCount=4: no fifth fire
    rows = histories(stack, group["uuid"])
    assert len(rows) == 4 and all(r["success"] for r in rows), rows
    assert {r["triggerUuid"] for r in rows} == {trigger["uuid"]}
    assert {r["targetResourceUuid"] for r in rows} == {vol["uuid"]}
    results = [json.loads(r["resultDump"]) for r in rows]
    assert [r["mode"] for r in results] == [["full"], ["incremental"], ["full"], ["incremental"]]
    assert all(r["synced"][0]["success"] and r["synced"][0]["backupStorageUuid"] == s2["uuid"] for r in results)
    assert "jobData" in json.loads(rows[0]["requestDump"])
    kept = stack.client.query("volume-backups", f"volumeUuid={vol['uuid']}", sort="+createDate")["inventories"]
    assert len(kept) == 2  # retention keepLast=2, on every storage
    assert [b["uuid"] for b in kept] == [uid for r in results[2:] for uid in r["volumeBackupUuids"]]
    for backup in kept:
        assert sorted((r["backupStorageUuid"], r["status"]) for r in backup["backupStorageRefs"]) == sorted(
            [(s1["uuid"], "Ready"), (s2["uuid"], "Ready")]
        )
    for folder in ("s1", "s2"):
        repo = Repository.open(str(stack.tmp / folder))
        assert len(repo.manifest_ids()) == 2
    newest = kept[-1]["backupStorageRefs"]
    copy = next(r for r in newest if r["backupStorageUuid"] == s2["uuid"])
    out = stack.tmp / "from-second.raw"
    restore_backup(Repository.open(str(stack.tmp / "s2")), copy["installPath"].rsplit("/", 1)[1], str(out))
    assert out.read_bytes() == Path(vol["installPath"]).read_bytes()


def test_two_beats_and_a_killed_beat_never_double_or_lose_a_fire(stack: Stack) -> None:
    host = new_uuid()
    stack.start_worker(host)
    stack.client.add_backup_storage("local", f"file://{stack.tmp / 'store'}")
    vols = [volume(stack, host, f"v{i}", 4 * MiB) for i in range(3)]
    group = stack.client.create_job_group("g", "volumeBackup")
    stack.client.add_targets(group["uuid"], [v["uuid"] for v in vols])
    stack.start_beat("beat-1")
    stack.start_beat("beat-2")
    start = int(time.time() + 2)  # the first fire after the attach (see the test above)
    trigger = stack.client.create_trigger(
        "t", schedulerType="simple", schedulerInterval=4, repeatCount=6, startTime=start
    )
    stack.client.attach_trigger(trigger["uuid"], group["uuid"])
    fires = lambda: len({r["executeTime"] for r in histories(stack, group["uuid"])})  # noqa: E731
    stack.wait_for("two fires", lambda: fires() >= 2)
    stack.kill("beat-1")  # SIGKILL, possibly in the middle of a fire; beat-2 goes on alone
    stack.wait_for("four fires", lambda: fires() >= 4)
    stack.kill("beat-2")  # no beat for a moment (less than one interval): the fire due is late, not lost
    stack.start_beat("beat-3")
    stack.wait_for("six fires", lambda: len(histories(stack, group["uuid"])) >= 18, timeout=120)
    time.sleep(9)
    rows = histories(stack, group["uuid"])
    assert len(rows) == 18, [(r["executeTime"], r["targetResourceUuid"]) for r in rows]
    pairs = {(r["executeTime"], r["targetResourceUuid"]) for r in rows}
    assert len(pairs) == 18  # every target once per fire
    assert len({r["executeTime"] for r in rows}) == 6
    assert stack.client.query("volume-backups", count=True)["total"] == 18
    assert all(r["success"] for r in rows)


def test_misfires_collapse_into_one_fire_on_return(stack: Stack) -> None:
    host = new_uuid()
    stack.start_worker(host)
    stack.client.add_backup_storage("local", f"file://{stack.tmp / 'store'}")
    vol = volume(stack, host, "m", 4 * MiB)
    group = stack.client.create_job_group("g", "volumeBackup")
    stack.client.add_targets(group["uuid"], [vol["uuid"]])
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    # three fire times, start+0, +5 and +10 s, all passed before any beat runs: however late the
    # beat comes up on a busy machine, the newest missed one is +10 s
    trigger = stack.client.create_trigger(
        "t", schedulerType="simple", schedulerInterval=5, repeatCount=3, startTime=int(start.timestamp())
    )
    stack.client.attach_trigger(trigger["uuid"], group["uuid"])
    time.sleep(max(0.0, (start + timedelta(seconds=11) - datetime.now(UTC)).total_seconds()))
    stack.start_beat()
    stack.wait_for("the catch-up fire", lambda: len(histories(stack, group["uuid"])) >= 1)
    time.sleep(2)  # nothing more may come: no older missed time, and the repeats are spent
    fired = [datetime.fromisoformat(r["executeTime"].replace("Z", "+00:00")) for r in histories(stack, group["uuid"])]
    assert fired == [start + timedelta(seconds=10)]  # once, for the newest missed time


def test_failed_targets_get_failed_rows_and_the_others_still_run(stack: Stack) -> None:
    alive, dead = new_uuid(), new_uuid()
    stack.start_worker(alive)
    stack.start_worker(dead)
    stack.client.add_backup_storage("local", f"file://{stack.tmp / 'store'}")
    good, on_dead, deleted = volume(stack, alive, "good"), volume(stack, dead, "ondead"), volume(stack, alive, "gone")
    group = stack.client.create_job_group("g", "volumeBackup")
    stack.client.add_targets(group["uuid"], [good["uuid"], on_dead["uuid"], deleted["uuid"]])
    stack.kill(f"worker-{dead[:8]}")
    stack.wait_host(dead, "Disconnected")
    stack.client.request("DELETE", f"/v1/volumes/{deleted['uuid']}")
    started = stack.client.run_job_group(group["uuid"])
    assert started["jobsStarted"] == 3
    stack.wait_for("three rows", lambda: len(histories(stack, group["uuid"])) == 3)
    rows = {r["targetResourceUuid"]: r for r in histories(stack, group["uuid"])}
    assert rows[good["uuid"]]["success"] is True
    assert rows[on_dead["uuid"]]["success"] is False
    assert "Disconnected" in rows[on_dead["uuid"]]["resultDump"]
    assert rows[deleted["uuid"]]["success"] is False
    assert f"no volume {deleted['uuid']}" in rows[deleted["uuid"]]["resultDump"]
    assert all(r["triggerUuid"] is None for r in rows.values())  # run by hand, not by a trigger
    # bad input on the scheduling routes
    for params, word in (
        ({"name": "x", "type": "nope"}, "type"),
        ({"name": "x", "type": "volumeBackup", "parameters": {"fullBackupInterval": -1}}, "fullBackupInterval"),
        ({"name": "x", "type": "volumeBackup", "parameters": {"retention": {"keepForever": 1}}}, "retention"),
        ({"name": "x", "type": "volumeBackup", "parameters": {"surprise": 1}}, "surprise"),
    ):
        status, body = _raw(stack, "POST", "/v1/scheduler/jobgroups", {"params": params})
        assert status == 400 and word in body["error"]["description"], body
    for params, word in (
        ({"name": "t", "schedulerType": "simple"}, "schedulerInterval"),
        ({"name": "t", "schedulerType": "cron", "cron": "every day"}, "cron"),
        ({"name": "t", "schedulerType": "cron", "cron": "0 3 * * *", "timeZone": "Mars/Olympus"}, "timeZone"),
        ({"name": "t", "schedulerType": "simple", "schedulerInterval": 5, "startTime": 10, "stopTime": 5}, "stopTime"),
    ):
        status, body = _raw(stack, "POST", "/v1/scheduler/triggers", {"params": params})
        assert status == 400 and word in body["error"]["description"], body
    status, body = _raw(
        stack,
        "POST",
        f"/v1/scheduler/jobgroups/{group['uuid']}/jobs",
        {"params": {"targetResourceUuids": [new_uuid()]}},
    )
    assert status == 404


def _raw(stack: Stack, method: str, path: str, body: object) -> tuple[int, dict]:
    import httpx

    response = httpx.request(
        method, f"http://127.0.0.1:{stack.port}{path}", json=body, headers={"Authorization": f"Bearer {stack.key}"}
    )
    return response.status_code, response.json()
