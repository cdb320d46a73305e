"""Faults a long-running site meets at random points, each first as a deterministic test (the
soak runner, tests/bench/soak.py, then mixes them): messages delivered twice, a backup storage
that fills up, host clocks that disagree."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from celery import Celery

from api.client import ApiError
from shared.catalog.models import new_uuid
from shared.errors import RepositoryLocked
from shared.failpoints import reached, release
from shared.repository.maintenance import gc, verify
from shared.repository.repo import Repository
from tests.conftest import MiB
from tests.full_disk import fill
from tests.ports import free_port
from tests.service.conftest import Stack
from tests.service.test_service import assert_restores
from tests.service.test_storage_topologies import FAST_STORAGE, raw_volume, refs, start_host, storage


def wait_until(what: str, check: Callable[[], bool], stack: Stack, timeout: float = 120) -> None:
    stack.wait_for(what, check, timeout=timeout)


def test_a_job_runs_at_most_once_whatever_is_delivered_twice(stack: Stack, redis_url: str) -> None:
    """A Running job's message delivered again (Redis' visibility timeout, a requeue) to a second
    worker of the same host while the first still runs it, the same task sent twice, and sent once
    more after it finished: one run, one backup row, one ``job.started`` line."""
    host, gate = new_uuid(), stack.tmp / "gate"
    stack.start_worker(host, env={"BLOCKVAULT_FAILPOINTS": f"backup.chunk_stored=1:hold:{gate}"})
    stack.client.add_backup_storage("local", f"file://{stack.tmp / 'bs'}")
    volume, _path = raw_volume(stack, host, "v1")
    job = stack.client.backup_volume(volume["uuid"], name="once")
    wait_until("the backup Running, held after its first chunk", lambda: reached(gate), stack)

    # a second worker consuming the same host's queue, as a restarted or duplicated worker would
    other = stack.spawn("worker-b", ["worker", "--host-uuid", host, "--concurrency", "1"])
    wait_until("the second worker ready", lambda: "ready." in stack.log("worker-b"), stack)
    assert other.poll() is None, stack.log("worker-b")
    app = Celery(broker=redis_url)
    for _ in range(2):  # the Running job's message, delivered twice more
        app.send_task("blockvault.volume.backup", args=[job], task_id=job, queue=f"host.{host}")

    def logs() -> str:
        return stack.log(f"worker-{host[:8]}") + stack.log("worker-b")

    wait_until("the second worker to take a duplicate", lambda: f"uuid={job}" in stack.log("worker-b"), stack)
    assert f"job.started uuid={job}" not in stack.log("worker-b"), "a second run of a Running job"
    assert stack.client.job(job)["state"] == "Running"
    release(gate)
    done = stack.client.wait(job, timeout=180)
    assert done["status"] == "Ready"
    wait_until("both duplicates seen", lambda: logs().count(f"job.skipped uuid={job}") >= 2, stack)

    # and once more after it finished
    app.send_task("blockvault.volume.backup", args=[job], task_id=job, queue=f"host.{host}")
    wait_until("the late duplicate seen", lambda: logs().count(f"job.skipped uuid={job}") >= 3, stack)
    time.sleep(1)  # nothing else may start after it
    assert logs().count(f"job.started uuid={job}") == 1, logs()
    backups = stack.client.query("volume-backups", f"volumeUuid={volume['uuid']}")["inventories"]
    assert [b["status"] for b in backups] == ["Ready"]
    assert stack.client.job(job)["state"] == "Succeeded"


def test_a_job_whose_worker_was_killed_whole_and_restarted_at_once_fails_and_the_next_runs(stack: Stack) -> None:
    """The soak's finding: a worker's whole process group SIGKILLed mid-backup and restarted
    under the same host uuid before the host timed out. The host never turns Disconnected, the
    redelivered message finds the job Running and skips it; the job must still end (Failed,
    WORKER_LOST, once no worker has touched it for three host timeouts), never stay Running."""
    host, gate = new_uuid(), stack.tmp / "gate"
    first = stack.start_worker(host, env={"BLOCKVAULT_FAILPOINTS": f"backup.chunk_stored=1:hold:{gate}"})
    stack.client.add_backup_storage("local", f"file://{stack.tmp / 'bs'}")
    volume, path = raw_volume(stack, host, "v1")
    job = stack.client.backup_volume(volume["uuid"], name="orphaned")
    wait_until("the backup Running, held after its first chunk", lambda: reached(gate), stack)
    stack.kill(f"worker-{host[:8]}")  # the main process and its pool, at once
    assert first.poll() is not None
    stack.start_worker(host)  # back before the host timeout: the host never looks gone

    with pytest.raises(ApiError) as ended:  # within three host timeouts (45 s here) and a pass
        stack.client.wait(job, timeout=180)
    assert ended.value.code == "WORKER_LOST", ended.value
    assert stack.client.get("hosts", host)["status"] == "Connected"
    assert f"job.orphaned uuid={job}" in stack.log(f"worker-{host[:8]}")
    (failed,) = stack.client.query("volume-backups", f"volumeUuid={volume['uuid']}")["inventories"]
    assert failed["status"] == "Failed"

    done = stack.client.wait(stack.client.backup_volume(volume["uuid"], name="after"), timeout=180)
    assert done["status"] == "Ready"
    assert_restores(stack, host, done, path)


def scribble(path: Path, seed: int) -> None:
    """New data in a volume (incompressible, never seen before)."""
    with open(path, "r+b") as handle:
        handle.seek(seed * MiB % (12 * MiB))
        handle.write(random.Random(seed).randbytes(2 * MiB))


def verified(folder: Path) -> None:
    report = verify(Repository.open(str(folder), None), None, read_data=True)
    assert report.ok, [p.describe() for p in report.problems]


def test_a_full_storage_fails_the_backup_with_storage_full_then_the_standby_takes_over(
    stack: Stack, small_disk: Path
) -> None:
    host = start_host(stack)
    master_dir, standby_dir = small_disk / "bs", stack.tmp / "standby"
    master = stack.client.add_backup_storage("master", f"file://{master_dir}")
    volume, path = raw_volume(stack, host, "full")
    first = stack.client.wait(stack.client.backup_volume(volume["uuid"], name="first"), timeout=120)

    # the storage's disk filled to its last byte: the backup fails, says why, leaves nothing
    filler = fill(small_disk)
    scribble(path, 1)
    with pytest.raises(ApiError) as failed:
        stack.client.wait(stack.client.backup_volume(volume["uuid"], name="no-room"), timeout=120)
    assert failed.value.code == "STORAGE_FULL", failed.value
    assert "full" in failed.value.description
    rows = {b["name"]: b for b in stack.client.query("volume-backups", f"volumeUuid={volume['uuid']}")["inventories"]}
    assert (rows["first"]["status"], rows["no-room"]["status"]) == ("Ready", "Failed")
    assert not list((master_dir / "tmp").iterdir()), "a partial object was left behind"
    filler.unlink()
    verified(master_dir)

    # space back: the next backup works and restores
    scribble(path, 2)
    after = stack.client.wait(stack.client.backup_volume(volume["uuid"], name="after"), timeout=120)
    assert_restores(stack, host, after, path)
    assert first["status"] == "Ready"

    # with a standby: a full master fails over to it, as any failed master does
    standby = stack.client.add_backup_storage("standby", f"file://{standby_dir}", role="standby")
    stack.wait_for(
        "the standby caught up", lambda: refs(stack, after["uuid"]).get(standby["uuid"], {}).get("status") == "Ready"
    )
    filler = fill(small_disk)
    scribble(path, 3)
    moved = stack.client.wait(stack.client.backup_volume(volume["uuid"], name="moved"), timeout=120)
    assert moved["status"] == "Ready"
    assert refs(stack, moved["uuid"])[standby["uuid"]]["status"] == "Ready"
    assert (storage(stack, standby["uuid"])["role"], storage(stack, master["uuid"])["role"]) == ("master", "standby")
    assert_restores(stack, host, moved, path)
    filler.unlink()
    verified(master_dir)
    verified(standby_dir)


def skewed(seconds: int, *failpoints: str) -> dict[str, str]:
    """The environment of a process whose clock is ``seconds`` off (the ``clock`` failpoint:
    every wall-clock reading of blockvault's, catalog times and repository locks; Celery's own
    timers are left alone), with more ``failpoints``."""
    return {"BLOCKVAULT_FAILPOINTS": ",".join((f"clock=1:skew{seconds:+d}", *failpoints))}


def start_api(stack: Stack, name: str, env: dict[str, str]) -> str:
    """Another API process of the deployment (its own port and environment): its base URL."""
    port = free_port()
    proc = stack.spawn(name, ["api", "--port", str(port)], env)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.poll() is None, stack.log(name)
        try:
            return stack.client.http.get(f"{url}/v1/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    stack.wait_for(f"{name} to answer", answers)
    return url


def login(url: str, digest: str) -> str:
    response = httpx.put(
        f"{url}/v1/accounts/login",
        json={"logInByAccount": {"accountName": "ops", "password": digest}},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["inventory"]["uuid"])


def test_clocks_minutes_apart_break_no_heartbeat_lock_session_trigger_or_order(
    tmp_path: Path, pg_database: str, redis_url: str
) -> None:
    """A worker host whose clock is 7 minutes behind, an API and a beat 7 minutes ahead, the
    test and the rest on the true clock: the host stays Connected, its backup's repository lock
    is not taken from it by gc on the true clock, a session opened on one API lives on the
    other, a trigger starting in 5 minutes does not fire early, and rows are dated on one clock
    (retention orders backups by it)."""
    stack = Stack(tmp_path, pg_database, redis_url)
    stack.env.update(FAST_STORAGE, BLOCKVAULT_SESSION_TIMEOUT_SECONDS="300")
    try:
        stack.start_api()
        ahead_url = start_api(stack, "api-ahead", skewed(+420))
        true_host, behind = new_uuid(), new_uuid()
        gate = stack.tmp / "gate"
        stack.start_worker(true_host)
        stack.start_worker(behind, skewed(-420, f"backup.chunk_stored=1:hold:{gate}"))
        folder = stack.tmp / "bs"
        stack.client.add_backup_storage("local", f"file://{folder}")
        volume, _path = raw_volume(stack, behind, "skewed")
        job = stack.client.backup_volume(volume["uuid"], name="behind")
        wait_until("the backup holding its lock mid-way", lambda: reached(gate), stack)

        # heartbeats: a host 7 minutes behind is alive, not 7 minutes silent
        time.sleep(float(stack.env["BLOCKVAULT_HOST_TIMEOUT_SECONDS"]) + 3)  # past the host timeout
        hosts = {h["uuid"]: h for h in stack.client.query("hosts")["inventories"]}
        assert hosts[behind]["status"] == "Connected", hosts[behind]
        beat_at = datetime.fromisoformat(hosts[behind]["lastHeartbeat"].replace("Z", "+00:00"))
        assert abs(beat_at.timestamp() - time.time()) < 60, beat_at

        # locks: gc on the true clock finds the lock of the host 7 minutes behind live
        repository = Repository.open(str(folder), None)
        with pytest.raises(RepositoryLocked):
            gc(repository)
        release(gate)
        done = stack.client.wait(job, timeout=180)
        assert done["status"] == "Ready"
        verified(folder)
        created = datetime.fromisoformat(done["createDate"].replace("Z", "+00:00"))
        assert abs(created.timestamp() - time.time()) < 120, created  # dated on the catalog's clock

        # sessions: opened on the API 7 minutes ahead, used on the true one, and the other way
        stack.client.create("accounts", {"name": "ops", "password": "correct horse battery"})
        digest = hashlib.sha512(b"correct horse battery").hexdigest()
        for opened, used in ((ahead_url, stack.client.base_url), (stack.client.base_url, ahead_url)):
            token = login(opened, digest)
            answer = httpx.get(f"{used}/v1/projects", headers={"Authorization": f"OAuth {token}"}, timeout=30)
            assert answer.status_code == 200, answer.text

        # triggers: a beat 7 minutes ahead fires what is due now, not what starts in 5 minutes
        stack.spawn("beat", ["beat"], skewed(+420))
        groups = {}
        for name, start in (("now", 0), ("later", int(time.time()) + 300)):
            group = stack.client.create_job_group(name, "volumeBackup", fullBackupInterval=0)
            stack.client.add_targets(group["uuid"], [volume["uuid"]])
            trigger = stack.client.create_trigger(
                name, schedulerType="simple", schedulerInterval=3600, repeatCount=1, startTime=start
            )
            stack.client.attach_trigger(trigger["uuid"], group["uuid"])
            groups[name] = group["uuid"]
        wait_until(
            "the due trigger fired",
            lambda: bool(stack.client.histories(f"schedulerJobGroupUuid={groups['now']}")),
            stack,
        )
        assert stack.client.histories(f"schedulerJobGroupUuid={groups['later']}") == []
    finally:
        stack.stop_all()
