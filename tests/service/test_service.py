"""End to end on PostgreSQL and Redis with real Celery workers, one per host."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from api.client import ApiError
from shared.catalog.models import new_uuid
from shared.celery_app import VOLUME_BACKUP
from shared.failpoints import reached, release
from tests.conftest import MiB, qcow2_equal, qemu_write, vm_like_regions, write_regions
from tests.service.conftest import Stack, free_port
from tests.services import PgControl, RedisControl

pytestmark = pytest.mark.shared_api  # an API lent per test, not started (tests/service/conftest.py)


def make_vm(stack: Stack, host: str, folder: Path, name: str) -> tuple[dict, dict, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    root, data = folder / f"{name}-root.raw", folder / f"{name}-data.qcow2"
    write_regions(root, 24 * MiB, vm_like_regions(24 * MiB, seed=hash(name) % 1000))
    src = folder / "src.raw"
    write_regions(src, 16 * MiB, vm_like_regions(16 * MiB, seed=7))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(src), str(data)], check=True)
    src.unlink()
    client = stack.client
    vm = client.register_vm(name, hostUuid=host)
    root_vol = client.register_volume(host, str(root), type="Root", vmInstanceUuid=vm["uuid"])
    data_vol = client.register_volume(host, str(data), type="Data", vmInstanceUuid=vm["uuid"])
    return vm, root_vol, data_vol


def add_storage(stack: Stack) -> dict:
    return stack.client.add_backup_storage("local", f"file://{stack.tmp / 'store'}")


def assert_restores(stack: Stack, host: str, backup: dict, source: Path) -> None:
    """Create a volume from ``backup`` and compare it with ``source`` (the volume as it was
    when the backup was taken) with qemu-img compare: the same guest bytes."""
    target = stack.tmp / f"restored-{backup['uuid'][:8]}"
    created = stack.client.wait(
        stack.client.create_volume_from_backup(backup["uuid"], name="check", hostUuid=host, installPath=str(target)),
        timeout=180,
    )
    assert created["status"] == "Ready"
    assert qcow2_equal(target, source), f"{target} differs from {source}"


def snapshot(stack: Stack, volume: dict) -> Path:
    """A copy of ``volume``'s file as it is now, to compare a restore with."""
    copy = stack.tmp / f"at-backup-{Path(volume['installPath']).name}"
    shutil.copyfile(volume["installPath"], copy)
    return copy


def test_each_host_backs_up_its_own_volumes(stack: Stack) -> None:
    host_a, host_b = new_uuid(), new_uuid()
    stack.start_worker(host_a)
    stack.start_worker(host_b)
    add_storage(stack)
    vms = {h: make_vm(stack, h, stack.tmp / h[:8], f"vm-{h[:6]}") for h in (host_a, host_b)}
    jobs = {h: stack.client.backup_vm(vms[h][1]["uuid"], name="full") for h in (host_a, host_b)}
    results = {h: stack.client.wait(job, timeout=180) for h, job in jobs.items()}
    for host, job in jobs.items():
        other = host_b if host == host_a else host_a
        assert job in stack.log(f"worker-{host[:8]}"), "the job ran on its own host's worker"
        assert job not in stack.log(f"worker-{other[:8]}"), "and never on another host's"
        backups = results[host]["volumeBackups"]
        assert {b["type"] for b in backups} == {"Root", "Data"}
        assert len({b["groupUuid"] for b in backups}) == 1
        assert all(b["status"] == "Ready" and b["backupStorageRefs"][0]["status"] == "Ready" for b in backups)
        assert backups[0]["metadata"]["vmInstance"]["uuid"] == vms[host][0]["uuid"]
    # incremental, then revert one volume and create a new one from the other backup
    host = host_a
    _vm, root_vol, data_vol = vms[host]
    root_path, data_path = Path(root_vol["installPath"]), Path(data_vol["installPath"])
    before_root = root_path.read_bytes()
    before_data = stack.tmp / "data-before.qcow2"
    shutil.copyfile(data_path, before_data)
    with open(root_path, "r+b") as handle:
        handle.seek(5 * MiB)
        handle.write(b"changed" * 10000)
    qemu_write(data_path, 2 * MiB, MiB, 0x33)
    incr = stack.client.wait(stack.client.backup_vm(root_vol["uuid"], name="incr"), timeout=180)
    assert {b["mode"] for b in incr["volumeBackups"]} == {"incremental"}
    by_type = {b["type"]: b for b in results[host]["volumeBackups"]}
    assert {b["parentUuid"] for b in incr["volumeBackups"]} == {b["uuid"] for b in by_type.values()}
    stack.client.wait(stack.client.revert_volume(by_type["Root"]["uuid"]), timeout=180)
    assert root_path.read_bytes() == before_root
    target = stack.tmp / "new-data.qcow2"
    created = stack.client.wait(
        stack.client.create_volume_from_backup(
            by_type["Data"]["uuid"], name="copy", hostUuid=host, installPath=str(target)
        ),
        timeout=180,
    )
    assert created["status"] == "Ready" and qcow2_equal(target, before_data)
    verified = stack.client.wait(
        stack.client.verify_backup(incr["volumeBackups"][0]["uuid"], readData=True), timeout=180
    )
    assert verified["verified"]["chunks"] > 0
    # the query language over the result
    q = stack.client.query
    assert q("volume-backups", count=True)["total"] == 6
    assert (
        q("volume-backups", "mode=incremental", f"volumeUuid?={root_vol['uuid']},{data_vol['uuid']}", count=True)[
            "total"
        ]
        == 2
    )
    groups = {g["mode"]: g["count"] for g in q("volume-backups", group_by="mode")["inventories"]}
    assert groups == {"full": 4, "incremental": 2}
    store = q("backup-storage")["inventories"][0]
    assert q("volume-backups", f"backupStorageRefs.backupStorageUuid={store['uuid']}", count=True)["total"] == 6
    assert "credentials" not in store


def test_vm_backup_revert_and_delete_as_a_group(stack: Stack) -> None:
    host = new_uuid()
    stack.start_worker(host)
    add_storage(stack)
    _vm, root, data = make_vm(stack, host, stack.tmp / "g", "vm-g")
    root_path, data_path = Path(root["installPath"]), Path(data["installPath"])
    group = stack.client.wait(stack.client.backup_vm(root["uuid"], name="g"), timeout=120)["groupUuid"]
    members = stack.client.request("GET", f"/v1/vm-backups/{group}")[1]["inventories"]
    assert [m["type"] for m in members] == ["Root", "Data"]
    before_root, before_data = root_path.read_bytes(), stack.tmp / "data-before.qcow2"
    shutil.copyfile(data_path, before_data)
    with open(root_path, "r+b") as handle:
        handle.write(b"x" * 100000)
    qemu_write(data_path, 0, 65536, 0x44)
    reverted = stack.client.wait(stack.client.revert_vm(group), timeout=120)
    assert len(reverted["volumes"]) == 2
    assert root_path.read_bytes() == before_root and qcow2_equal(data_path, before_data)
    deleted = stack.client.wait(stack.client.delete_vm_backup(group), timeout=120)
    assert [d["deleted"] for d in deleted["volumeBackups"]] == [True, True]
    with pytest.raises(ApiError) as gone:
        stack.client.request("GET", f"/v1/vm-backups/{group}")
    assert gone.value.status == 404
    assert stack.client.query("volume-backups", count=True)["total"] == 0


def test_flower_lists_both_workers_and_the_backup_tasks(stack: Stack) -> None:
    host_a, host_b = new_uuid(), new_uuid()
    port = free_port()
    stack.spawn("flower", ["flower", "--port", str(port)], env={"FLOWER_UNAUTHENTICATED_API": "true"})
    stack.start_worker(host_a)
    stack.start_worker(host_b)
    add_storage(stack)
    _vm, root, _data = make_vm(stack, host_a, stack.tmp / "a", "vm-a")
    deadline = time.monotonic() + 60
    workers: dict = {}
    while time.monotonic() < deadline:
        try:
            workers = httpx.get(f"http://127.0.0.1:{port}/api/workers?refresh=1", timeout=20).json()
        except (httpx.HTTPError, ValueError):
            workers = {}
        if len([w for w in workers if w.startswith("blockvault-")]) == 2:
            break
        time.sleep(1)
    names = sorted(workers)
    assert any(host_a in n for n in names) and any(host_b in n for n in names), (names, stack.log("flower"))
    job = stack.client.backup_volume(root["uuid"], name="seen-by-flower")
    stack.client.wait(job, timeout=120)
    deadline = time.monotonic() + 30
    seen: dict = {}
    while time.monotonic() < deadline and job not in seen:
        seen = httpx.get(f"http://127.0.0.1:{port}/api/tasks", timeout=10).json()
        time.sleep(1)
    assert job in seen, stack.log("flower")
    assert seen[job]["name"] == VOLUME_BACKUP
    assert seen[job]["state"] == "SUCCESS"


def test_worker_killed_mid_backup_fails_the_job_never_a_ready_backup(stack: Stack) -> None:
    host, helper = new_uuid(), new_uuid()
    gate = stack.tmp / "gate"
    stack.start_worker(host, env={"BLOCKVAULT_FAILPOINTS": f"backup.chunk_stored=1:hold:{gate}"})
    stack.start_worker(helper)  # a live worker reaps the dead host
    add_storage(stack)
    _vm, root, _data = make_vm(stack, host, stack.tmp / "v", "vm-k")
    job = stack.client.backup_volume(root["uuid"], name="doomed")
    stack.wait_for("the backup holding after its first chunk", lambda: reached(gate), timeout=120)
    stack.kill(f"worker-{host[:8]}")
    with pytest.raises(ApiError) as failed:
        stack.client.wait(job, timeout=60)
    assert failed.value.code == "HOST_DISCONNECTED"
    backups = stack.client.query("volume-backups", f"volumeUuid={root['uuid']}")["inventories"]
    assert [b["status"] for b in backups] == ["Failed"]
    stack.wait_host(host, "Disconnected")
    with pytest.raises(ApiError) as refused:
        stack.client.backup_volume(root["uuid"])
    assert refused.value.status == 409 and "Disconnected" in refused.value.description
    stack.start_worker(host)  # the host comes back (no failpoint): backups work again
    source = snapshot(stack, root)
    done = stack.client.wait(stack.client.backup_volume(root["uuid"], name="after"), timeout=120)
    assert done["status"] == "Ready"
    assert_restores(stack, host, done, source)


def test_a_workers_pool_forks_before_its_background_threads_run(stack: Stack) -> None:
    # A pool child forked while a background thread held a lock it needs later inherits the
    # lock held and waits for ever (the soak: a verify Running for good; before, an import's
    # lock and an S3 client's). The storage probes run every 0.1 s here, as busy as they get.
    host = new_uuid()
    storage = add_storage(stack)
    stack.start_worker(host, env={"BLOCKVAULT_STORAGE_CHECK_SECONDS": "0.1"})
    name = f"worker-{host[:8]}"  # its host turns Connected before its pool starts: wait for the fork
    stack.wait_for("the pool's fork", lambda: "worker.fork" in stack.log(name), timeout=120)
    log = stack.log(name)
    forks = re.findall(r"worker\.fork pid=\d+ threads=(\S+)(?: frozen=(\d+))?", log)
    threads = [others for others, _frozen in forks]
    assert threads == ["none"], f"the pool's child forked beside threads {threads}:\n{log[-3000:]}"
    # and what the start made is frozen by then: Celery's gc.collect() before the fork, the
    # child's collections and the teardown at exit do not walk it (docs/testing.md)
    frozen = int(forks[0][1] or 0)
    assert frozen > 10_000, f"the start's objects were not frozen before the fork: {frozen}"
    beat = stack.client.query("hosts", f"uuid={host}")["inventories"][0]["lastHeartbeat"]
    stack.wait_for(  # the threads run once the pool is up: the heartbeat moves on
        "a heartbeat after the start",
        lambda: stack.client.query("hosts", f"uuid={host}")["inventories"][0]["lastHeartbeat"] != beat,
        timeout=60,
    )
    _vm, root, _data = make_vm(stack, host, stack.tmp / "v", "vm-f")
    source = snapshot(stack, root)
    done = stack.client.wait(stack.client.backup_volume(root["uuid"], name="forked"), timeout=120)
    stack.client.wait(stack.client.verify_backup(done["uuid"], backupStorageUuid=storage["uuid"], readData=True))
    assert_restores(stack, host, done, source)


def test_redis_restart_loses_no_job(private_stack: tuple[Stack, PgControl, RedisControl]) -> None:
    stack, _pg_control, redis_control = private_stack
    host = new_uuid()
    gate = stack.tmp / "gate"
    stack.start_worker(host, env={"BLOCKVAULT_FAILPOINTS": f"backup.chunk_stored=1:hold:{gate}"})
    add_storage(stack)
    _vm, root, data = make_vm(stack, host, stack.tmp / "r", "vm-r")
    sources = {root["uuid"]: snapshot(stack, root), data["uuid"]: snapshot(stack, data)}
    first = stack.client.backup_volume(root["uuid"], name="running")
    queued = stack.client.backup_volume(data["uuid"], name="queued")
    stack.wait_for("the first backup holding mid-way", lambda: reached(gate), timeout=120)
    log = stack.log(f"worker-{host[:8]}")
    assert f"job.started uuid={first}" in log and f"job.started uuid={queued}" not in log, "the second waits in Redis"
    redis_control.restart()
    release(gate)
    for job in (first, queued):
        done = stack.client.wait(job, timeout=180)
        assert done["status"] == "Ready"
        assert_restores(stack, host, done, sources[done["volumeUuid"]])


def test_postgres_down_answers_503_and_recovers(private_stack: tuple[Stack, PgControl, RedisControl]) -> None:
    stack, pg_control, _redis_control = private_stack
    stack.client.query("volumes")
    pg_control.stop()
    try:
        response = httpx.get(
            f"http://127.0.0.1:{stack.port}/v1/volumes", headers={"Authorization": f"Bearer {stack.key}"}, timeout=30
        )
        assert response.status_code == 503
        body = response.json()
        assert body["success"] is False and body["error"]["code"] == "DATABASE_UNAVAILABLE"
    finally:
        pg_control.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            assert stack.client.query("volumes")["success"] is True
            break
        except ApiError:
            assert time.monotonic() < deadline
            time.sleep(0.5)


def test_bad_input_gets_4xx_envelopes_never_500(stack: Stack) -> None:
    host = new_uuid()
    stack.start_worker(host)
    store = add_storage(stack)
    vm, root, _data = make_vm(stack, host, stack.tmp / "b", "vm-b")
    base = f"http://127.0.0.1:{stack.port}"
    auth = {"Authorization": f"Bearer {stack.key}"}

    def call(method: str, path: str, **kw: object) -> httpx.Response:
        return httpx.request(method, base + path, headers=kw.pop("headers", auth), timeout=30, **kw)  # type: ignore[arg-type]

    cases = [
        (("GET", "/v1/volumes"), {"headers": {}}, 401, "UNAUTHORIZED"),
        (("GET", "/v1/volumes"), {"headers": {"Authorization": "Bearer wrong"}}, 401, "UNAUTHORIZED"),
        (("GET", "/v1/volumes"), {"headers": {"Authorization": "Basic abc"}}, 401, "UNAUTHORIZED"),
        (("GET", "/v1/volumes?q=nosuchfield=1"), {}, 400, "INVALID_ARGUMENT"),
        (("GET", "/v1/volumes?q=size%3E%3E1"), {}, 400, "INVALID_ARGUMENT"),
        (("GET", "/v1/volumes?q=size>abc"), {}, 400, "INVALID_ARGUMENT"),
        (("GET", "/v1/volumes?limit=-1"), {}, 400, "INVALID_ARGUMENT"),
        (("GET", "/v1/volumes/not-a-uuid"), {}, 400, "INVALID_ARGUMENT"),
        (("GET", f"/v1/volumes/{new_uuid()}"), {}, 404, "NOT_FOUND"),
        (("POST", "/v1/volumes"), {"json": {"params": {"hostUuid": host}}}, 400, "INVALID_ARGUMENT"),
        (
            ("POST", "/v1/volumes"),
            {"json": {"params": {"hostUuid": new_uuid(), "installPath": "/x"}}},
            404,
            "NOT_FOUND",
        ),
        (("POST", "/v1/volumes"), {"content": b"{not json"}, 400, "INVALID_ARGUMENT"),
        (("POST", "/v1/vm-instances"), {"json": {"params": {"name": "x", "cpuNum": "many"}}}, 400, "INVALID_ARGUMENT"),
        (
            ("POST", "/v1/backup-storage"),
            {"json": {"params": {"type": "Nope", "url": "file:///tmp/x"}}},
            400,
            "INVALID_ARGUMENT",
        ),
        (("POST", "/v1/backup-storage"), {"json": {"params": {"url": "relative/path"}}}, 400, "INVALID_ARGUMENT"),
        (("POST", f"/v1/volumes/{new_uuid()}/volume-backups"), {"json": {"params": {}}}, 404, "NOT_FOUND"),
        (
            ("POST", f"/v1/volumes/{root['uuid']}/volume-backups"),
            {"json": {"params": {"mode": "sideways"}}},
            400,
            "INVALID_ARGUMENT",
        ),
        (
            ("POST", f"/v1/volumes/{root['uuid']}/volume-backups"),
            {"json": {"params": {"backupStorageUuid": new_uuid()}}},
            404,
            "NOT_FOUND",
        ),
        (("PUT", f"/v1/volume-backups/{new_uuid()}/actions"), {"json": {"verifyVolumeBackup": {}}}, 404, "NOT_FOUND"),
        (("PUT", f"/v1/backup-storage/{store['uuid']}/actions"), {"json": {"explode": {}}}, 400, "INVALID_ARGUMENT"),
        (
            ("PUT", f"/v1/backup-storage/{store['uuid']}/actions"),
            {"json": {"changeBackupStorageState": {"stateEvent": "x"}}},
            400,
            "INVALID_ARGUMENT",
        ),
        (("DELETE", f"/v1/volume-backups/{new_uuid()}"), {}, 404, "NOT_FOUND"),
        (("GET", "/v1/nothing-here"), {}, 404, "NOT_FOUND"),
    ]
    for (method, path), kw, status, code in cases:
        response = call(method, path, **kw)
        assert response.status_code == status, (method, path, response.text)
        body = response.json()
        assert body["success"] is False and body["error"]["code"] == code, (method, path, body)
    # wrong state: revert and back up a running VM's volume; delete twice
    backup = stack.client.wait(stack.client.backup_volume(root["uuid"]), timeout=120)
    stack.client.action("vm-instances", vm["uuid"], "updateVmInstance", {"state": "Running"})
    for method, path, payload in (
        ("PUT", f"/v1/volume-backups/{backup['uuid']}/actions", {"revertVolumeFromVolumeBackup": {}}),
        ("POST", f"/v1/volumes/{root['uuid']}/volume-backups", {"params": {}}),
    ):
        response = call(method, path, json=payload)
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "CONFLICT"
    stack.client.action("vm-instances", vm["uuid"], "updateVmInstance", {"state": "Stopped"})
    stack.client.wait(stack.client.delete_backup(backup["uuid"]), timeout=60)
    again = call("DELETE", f"/v1/volume-backups/{backup['uuid']}")
    assert again.status_code == 404 and again.json()["error"]["code"] == "NOT_FOUND"
    # the OpenAPI document is served and names the routes (built on its first request: seconds
    # on a loaded machine)
    spec = httpx.get(base + "/openapi.json", timeout=120).json()
    assert "/v1/volumes/{uuid}/volume-backups" in spec["paths"]
    assert json.dumps(spec).count("credentials") == 0
