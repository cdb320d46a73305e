"""Backup storage topologies end to end: master/standby failover while a job group fires,
copies to a remote storage-server and to S3, recovery from any copy, scanning a storage into
a fresh catalog, and the bad inputs of registration and sync."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from api.client import ApiError, JobFailed
from shared.catalog.models import new_uuid
from shared.failpoints import reached, release
from tests.conftest import MiB, vm_like_regions, write_regions
from tests.service.conftest import Stack

pytestmark = pytest.mark.shared_api  # an API lent per test, not started (tests/service/conftest.py)

FAST_STORAGE = {"BLOCKVAULT_STORAGE_CHECK_SECONDS": "1", "BLOCKVAULT_STORAGE_RETRY_SECONDS": "2"}


def start_host(stack: Stack, env: dict[str, str] | None = None) -> str:
    """A worker for a new host, probing storage every second and giving up on it after 2 s."""
    host = new_uuid()
    stack.env.update(FAST_STORAGE)
    stack.start_worker(host, env)
    return host


def raw_volume(stack: Stack, host: str, name: str, size: int = 16 * MiB, seed: int = 3) -> tuple[dict, Path]:
    path = stack.tmp / f"{name}.raw"
    write_regions(path, size, vm_like_regions(size, seed=seed))
    return stack.client.register_volume(host, str(path), name=name), path


def storage(stack: Stack, uuid: str) -> dict[str, Any]:
    return stack.client.get("backup-storage", uuid)


def refs(stack: Stack, backup_uuid: str) -> dict[str, dict[str, Any]]:
    row = stack.client.get("volume-backups", backup_uuid)
    return {ref["backupStorageUuid"]: ref for ref in row["backupStorageRefs"]}


def ready_on(stack: Stack, storage_uuid: str) -> set[str]:
    rows = stack.client.query("volume-backups", "status=Ready", limit=1000)["inventories"]
    return {
        row["uuid"]
        for row in rows
        if any(r["backupStorageUuid"] == storage_uuid and r["status"] == "Ready" for r in row["backupStorageRefs"])
    }


def test_master_fails_while_a_job_group_fires_standby_takes_over_and_old_master_catches_up(stack: Stack) -> None:
    # the third backup holds before committing its manifest: the master fails under it
    gate = stack.tmp / "gate"
    host = start_host(stack, {"BLOCKVAULT_FAILPOINTS": f"backup.before_manifest=3:hold:{gate}"})
    stack.start_beat()
    master_dir, standby_dir = stack.tmp / "master", stack.tmp / "standby"
    master = stack.client.add_backup_storage("master", f"file://{master_dir}")
    standby = stack.client.add_backup_storage("standby", f"file://{standby_dir}", role="standby")
    assert (master["role"], standby["role"]) == ("master", "standby")
    assert standby["status"] == "Connected" and standby["totalCapacity"] > 0
    volume, path = raw_volume(stack, host, "vol")
    group = stack.client.create_job_group("every-2s", "volumeBackup", fullBackupInterval=0)
    stack.client.add_targets(group["uuid"], [volume["uuid"]])
    trigger = stack.client.create_trigger("t", schedulerType="simple", schedulerInterval=2, repeatCount=1000)
    stack.client.attach_trigger(trigger["uuid"], group["uuid"])

    def good_runs() -> int:
        rows = stack.client.histories(f"schedulerJobGroupUuid={group['uuid']}")
        assert all(r["success"] for r in rows), [r["resultDump"] for r in rows if not r["success"]]
        return len(rows)

    stack.wait_for("two scheduled backups", lambda: good_runs() >= 2, timeout=120)
    stack.wait_for(
        "replicated to the standby", lambda: ready_on(stack, master["uuid"]) <= ready_on(stack, standby["uuid"])
    )

    # the master's folder disappears (a failed disk or mount) while the group keeps firing
    with open(path, "r+b") as handle:
        handle.seek(3 * MiB)
        handle.write(b"after the failover" * 1000)
    stack.wait_for("the third backup holding before its manifest", lambda: reached(gate), timeout=120)
    assert stack.client.query("volume-backups", "status=Creating", count=True)["total"] > 0
    away = stack.tmp / "master-away"
    master_dir.rename(away)
    release(gate)
    stack.wait_for("the standby promoted", lambda: storage(stack, standby["uuid"])["role"] == "master", timeout=60)
    old = storage(stack, master["uuid"])
    assert (old["role"], old["status"]) == ("standby", "Disconnected")
    before = good_runs()
    stack.wait_for("three more scheduled backups", lambda: good_runs() >= before + 3, timeout=120)
    on_new_master = ready_on(stack, standby["uuid"]) - ready_on(stack, master["uuid"])
    assert len(on_new_master) >= 3, "later backups land on the promoted standby"

    # the old master comes back: it rejoins as standby and catches up
    away.rename(master_dir)
    stack.wait_for(
        "the old master Connected as standby",
        lambda: storage(stack, master["uuid"])["status"] == "Connected",
        timeout=60,
    )
    assert storage(stack, master["uuid"])["role"] == "standby"
    stack.client.detach_trigger(trigger["uuid"], group["uuid"])
    stack.wait_for(
        "the old master holding every backup",
        lambda: ready_on(stack, standby["uuid"]) <= ready_on(stack, master["uuid"]),
        timeout=120,
    )
    good_runs()  # not one failed history row in the whole run
    assert "backup.failover" in stack.log(f"worker-{host[:8]}"), "the backup in flight went on on the new master"
    newest = max(on_new_master, key=lambda u: stack.client.get("volume-backups", u)["createDate"])
    restored = stack.tmp / "from-old-master.raw"
    stack.client.wait(
        stack.client.create_volume_from_backup(
            newest, name="r", hostUuid=host, installPath=str(restored), backupStorageUuid=master["uuid"]
        ),
        timeout=120,
    )
    # the volume has not changed since "after the failover" was written: the newest backup is it
    assert restored.read_bytes() == path.read_bytes()


def test_switch_role_by_hand_and_its_bad_inputs(stack: Stack) -> None:
    host = start_host(stack)
    master = stack.client.add_backup_storage("m", f"file://{stack.tmp / 'm'}")
    standby = stack.client.add_backup_storage("s", f"file://{stack.tmp / 's'}", role="standby")
    volume, _path = raw_volume(stack, host, "v")
    first = stack.client.wait(stack.client.backup_volume(volume["uuid"]), timeout=120)
    assert {r["status"] for r in refs(stack, first["uuid"]).values()} == {"Ready"}
    assert set(refs(stack, first["uuid"])) == {master["uuid"], standby["uuid"]}
    with pytest.raises(ApiError) as not_standby:
        stack.client.switch_storage_role(master["uuid"])
    assert not_standby.value.status == 409
    switched = stack.client.switch_storage_role(standby["uuid"])
    assert switched["role"] == "master"
    assert storage(stack, master["uuid"])["role"] == "standby"
    second = stack.client.wait(stack.client.backup_volume(volume["uuid"]), timeout=120)
    assert second["mode"] == "incremental" and second["parentUuid"] == first["uuid"]
    assert set(refs(stack, second["uuid"])) == {master["uuid"], standby["uuid"]}
    # bad inputs of registration and sync: clear 4xx, nothing registered or changed
    bad: list[tuple[dict[str, Any], int, str]] = [
        ({"type": "ImageStore", "url": f"file://{stack.tmp / 'm'}"}, 409, "CONFLICT"),  # same URL twice
        ({"type": "ImageStore", "url": "relative/path"}, 400, "INVALID_ARGUMENT"),
        ({"type": "Remote", "url": "http://127.0.0.1:1"}, 400, "INVALID_ARGUMENT"),  # no token
        ({"type": "PublicCloud", "url": "s3://b/p", "endpoint": "http://127.0.0.1:1"}, 400, "INVALID_ARGUMENT"),
        ({"type": "Tape", "url": "file:///x"}, 400, "INVALID_ARGUMENT"),
        ({"type": "Remote", "url": "file:///x", "token": "t"}, 400, "INVALID_ARGUMENT"),
    ]
    for params, status, code in bad:
        with pytest.raises(ApiError) as error:
            stack.client.create("backup-storage", {"name": "bad", **params})
        assert (error.value.status, error.value.code) == (status, code), params
    assert stack.client.query("backup-storage", count=True)["total"] == 2
    for params, status in [
        ({}, 400),  # dstBackupStorageUuid missing
        ({"dstBackupStorageUuid": standby["uuid"], "srcBackupStorageUuid": standby["uuid"]}, 400),
        ({"dstBackupStorageUuid": new_uuid()}, 404),
        ({"dstBackupStorageUuid": master["uuid"], "bandwidthLimit": -1}, 400),
    ]:
        with pytest.raises(ApiError) as error:
            stack.client.action("volume-backups", second["uuid"], "syncBackupFromImageStoreBackupStorage", params)
        assert error.value.status == status, params


def test_sync_is_idempotent_and_a_failed_copy_is_never_ready(stack: Stack) -> None:
    host = start_host(stack)
    stack.client.add_backup_storage("m", f"file://{stack.tmp / 'm'}")
    other_dir = stack.tmp / "other-site"
    other = stack.client.add_backup_storage("other", f"file://{other_dir}")  # a second master: no replication
    stack.client.request(
        "PUT",
        f"/v1/backup-storage/{other['uuid']}/actions",
        json={"changeBackupStorageState": {"stateEvent": "disable"}},
    )
    volume, _ = raw_volume(stack, host, "v")
    backup = stack.client.wait(stack.client.backup_volume(volume["uuid"]), timeout=120)
    with pytest.raises(ApiError) as disabled:
        stack.client.sync_backup(backup["uuid"], other["uuid"])
    assert disabled.value.status == 409
    stack.client.request(
        "PUT",
        f"/v1/backup-storage/{other['uuid']}/actions",
        json={"changeBackupStorageState": {"stateEvent": "enable"}},
    )
    # the destination vanishes: the copy fails clearly and is recorded Failed, not Ready
    moved = stack.tmp / "other-away"
    other_dir.rename(moved)
    other_dir.write_text("not a folder")
    with pytest.raises(JobFailed):
        stack.client.wait(stack.client.sync_backup(backup["uuid"], other["uuid"]), timeout=120)
    assert refs(stack, backup["uuid"])[other["uuid"]]["status"] == "Failed"
    other_dir.unlink()
    moved.rename(other_dir)
    done = stack.client.wait(
        stack.client.sync_backup(backup["uuid"], other["uuid"], bandwidthLimit=64 * MiB), timeout=120
    )
    assert done["chunksCopied"] > 0
    ref = refs(stack, backup["uuid"])[other["uuid"]]
    assert ref["status"] == "Ready" and ref["installPath"].startswith("zstore://")
    again = stack.client.wait(stack.client.sync_backup(backup["uuid"], other["uuid"]), timeout=120)
    assert (again["chunksCopied"], again["bytesCopied"]) == (0, 0)


def vm_with_volumes(stack: Stack, host: str, name: str) -> tuple[dict, list[tuple[dict, Path]]]:
    vm = stack.client.register_vm(name, hostUuid=host)
    volumes = []
    for kind, size, seed in (("Root", 24 * MiB, 11), ("Data", 16 * MiB, 12)):
        path = stack.tmp / f"{name}-{kind}.raw"
        write_regions(path, size, vm_like_regions(size, seed=seed))
        volume = stack.client.register_volume(host, str(path), type=kind, vmInstanceUuid=vm["uuid"])
        volumes.append((volume, path))
    return vm, volumes


def remote_params(server: Any, token: str | None = None) -> dict[str, Any]:
    return {"type": "Remote", "url": server.url, "token": token or server.token}


def cloud_params(s3: Any, bucket: str, prefix: str, passphrase: str = "cloud secret passphrase") -> dict[str, Any]:
    return {
        "type": "PublicCloud",
        "url": f"s3://{bucket}/{prefix}",
        **s3.options(bucket),
        "encryptionPassphrase": passphrase,
    }


def api_error(call: Any) -> ApiError:
    with pytest.raises(ApiError) as error:
        call()
    return error.value


def test_remote_and_cloud_copies_recovery_and_scan_into_a_fresh_catalog(
    stack: Stack, start_storage_server: Any, s3_server: Any, make_pg_database: Any
) -> None:
    host = start_host(stack)
    client = stack.client
    client.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    server = start_storage_server(stack.tmp / "remote-root")
    # bad registrations: clear 4xx, nothing recorded
    wrong = api_error(lambda: client.create("backup-storage", {"name": "r", **remote_params(server, "wrong-token")}))
    assert (wrong.status, wrong.code) == (400, "STORAGE_AUTH_FAILED") and "wrong-token" not in wrong.description
    missing = api_error(
        lambda: client.create("backup-storage", {"name": "c", **cloud_params(s3_server, "no-such-bucket", "p")})
    )
    assert (missing.status, missing.code) == (400, "STORAGE_BUCKET_MISSING")
    bucket = s3_server.make_bucket()
    no_pass = {k: v for k, v in cloud_params(s3_server, bucket, "site1").items() if k != "encryptionPassphrase"}
    assert api_error(lambda: client.create("backup-storage", {"name": "c", **no_pass})).status == 400
    assert client.query("backup-storage", count=True)["total"] == 1
    remote = client.create("backup-storage", {"name": "remote", **remote_params(server)})
    cloud = client.create("backup-storage", {"name": "cloud", **cloud_params(s3_server, bucket, "site1")})
    assert (remote["type"], remote["status"], cloud["type"], cloud["status"]) == (
        "Remote",
        "Connected",
        "PublicCloud",
        "Connected",
    )
    for row in (remote, cloud):
        assert not {"token", "secretKey", "accessKey", "encryptionPassphrase", "credentials"} & set(row)
    assert api_error(lambda: client.create("backup-storage", {"name": "again", **remote_params(server)})).status == 409

    _vm, volumes = vm_with_volumes(stack, host, "web")
    (root, root_path), (_data, data_path) = volumes
    client.wait(client.backup_vm(root["uuid"], name="full"), timeout=120)
    with open(root_path, "r+b") as handle:
        handle.seek(2 * MiB)
        handle.write(b"second day" * 5000)
    incr = client.wait(client.backup_vm(root["uuid"], name="incr"), timeout=120)
    expected = {"Root": root_path.read_bytes(), "Data": data_path.read_bytes()}
    group = incr["groupUuid"]
    synced = client.wait(client.sync_vm_backup(group, remote["uuid"], bandwidthLimit=256 * MiB), timeout=120)
    assert synced["chunksCopied"] > 0 and synced["dstBackupStorageUuid"] == remote["uuid"]
    for backup in incr["volumeBackups"]:
        to_cloud = client.wait(client.sync_backup(backup["uuid"], cloud["uuid"]), timeout=120)
        assert to_cloud["bytesCopied"] > 0
        copies = refs(stack, backup["uuid"])
        assert {copies[s["uuid"]]["status"] for s in (remote, cloud)} == {"Ready"}
        assert copies[remote["uuid"]]["installPath"].startswith("zstore://")
    # the cloud copy is encrypted client-side: no plaintext in the bucket
    s3 = s3_server.client()
    for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        assert b"second day" not in s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    # recover from any copy: a new volume from the remote one, revert from the cloud one
    by_type = {b["type"]: b for b in incr["volumeBackups"]}
    target = stack.tmp / "from-remote.raw"
    client.wait(
        client.create_volume_from_backup(
            by_type["Data"]["uuid"], name="d2", hostUuid=host, installPath=str(target), backupStorageUuid=remote["uuid"]
        ),
        timeout=120,
    )
    assert target.read_bytes() == expected["Data"]
    root_path.write_bytes(b"\0" * (24 * MiB))
    client.wait(client.revert_volume(by_type["Root"]["uuid"], backupStorageUuid=cloud["uuid"]), timeout=120)
    assert root_path.read_bytes() == expected["Root"]
    # scanning a storage the catalog knows changes nothing
    again = client.wait(client.scan_storage(remote["uuid"]), timeout=120)
    assert (again["backups"], again["imported"], again["attached"]) == (2, [], [])

    # a fresh catalog (another site) attaches the remote storage and the cloud bucket and imports their backups
    client_stack = Stack(stack.tmp / "site2", make_pg_database(), "")
    (stack.tmp / "site2").mkdir()
    try:
        client_stack.start_api()
        host2 = new_uuid()
        client_stack.env.update(FAST_STORAGE)
        client_stack.start_worker(host2)
        c2 = client_stack.client
        c2.add_backup_storage("local2", f"file://{stack.tmp / 'local2'}")
        wrong_pass = cloud_params(s3_server, bucket, "site1", passphrase="not the passphrase")
        assert api_error(lambda: c2.create("backup-storage", {"name": "c", **wrong_pass})).code == "WRONG_PASSPHRASE"
        remote2 = c2.create("backup-storage", {"name": "remote", **remote_params(server)})
        scanned = c2.wait(c2.scan_storage(remote2["uuid"]), timeout=120)
        assert sorted(scanned["imported"]) == sorted(b["uuid"] for b in incr["volumeBackups"])
        imported = c2.get("volume-backups", by_type["Root"]["uuid"])
        assert (imported["status"], imported["groupUuid"], imported["name"]) == ("Ready", group, "incr")
        assert c2.wait(c2.scan_storage(remote2["uuid"]), timeout=120)["imported"] == []
        restored = stack.tmp / "site2" / "root.raw"  # inside that site host's volume roots
        c2.wait(
            c2.create_volume_from_backup(imported["uuid"], name="r", hostUuid=host2, installPath=str(restored)),
            timeout=120,
        )
        assert restored.read_bytes() == expected["Root"]
    finally:
        client_stack.stop_all()


@pytest.mark.parametrize("kind", ["Remote", "PublicCloud"])
def test_target_killed_mid_sync_never_lists_a_partial_backup_and_the_resumed_sync_sends_only_what_is_missing(
    stack: Stack, start_storage_server: Any, s3_server: Any, kind: str
) -> None:
    host = start_host(stack)
    client = stack.client
    client.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    volume, path = raw_volume(stack, host, "big", 48 * MiB, seed=21)
    backup = client.wait(client.backup_volume(volume["uuid"]), timeout=120)
    needed = sum(p.stat().st_size for p in (stack.tmp / "local" / "chunks").rglob("*") if p.is_file())
    if kind == "Remote":
        server = start_storage_server(stack.tmp / "remote-root")
        target = client.create("backup-storage", {"name": "remote", **remote_params(server)})
        wire, down, up = (lambda: int(server.stats()["bytesReceived"])), server.kill, server.start

        def manifests() -> list[str]:
            return [p.name for p in (stack.tmp / "remote-root").rglob("manifests/*")]

        def stored() -> int:
            return sum(p.stat().st_size for p in (stack.tmp / "remote-root").rglob("chunks/*/*") if p.is_file())
    else:
        bucket = s3_server.make_bucket()
        target = client.create("backup-storage", {"name": "cloud", **cloud_params(s3_server, bucket, "site")})
        wire, down, up = s3_server.bytes_in, s3_server.down, s3_server.up

        def manifests() -> list[str]:
            listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="site/manifests/")
            return [item["Key"] for item in listed.get("Contents", [])]

        def stored() -> int:
            listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="site/chunks/")
            return sum(int(item["Size"]) for item in listed.get("Contents", []))

    job = client.sync_backup(backup["uuid"], target["uuid"], bandwidthLimit=8 * MiB)
    # a quarter stored on the target (not only received: a chunk whose bytes arrived may still
    # be on its way to the disk when the server dies, and is then sent again, rightly)
    stack.wait_for("a quarter stored", lambda: stored() > needed // 4, timeout=60)
    down()
    with pytest.raises(JobFailed) as failed:
        client.wait(job, timeout=120)
    assert failed.value.code == "STORAGE_UNAVAILABLE", failed.value.description
    assert refs(stack, backup["uuid"])[target["uuid"]]["status"] == "Failed"
    up()
    assert manifests() == [], "the target lists no backup it cannot restore"
    before = wire()
    resumed = client.wait(client.sync_backup(backup["uuid"], target["uuid"]), timeout=120)
    sent = wire() - before
    assert 0 < resumed["bytesCopied"] < needed * 0.9, (resumed, needed)
    assert sent <= resumed["bytesCopied"] * 1.05 + 256 * 1024, (sent, resumed)
    assert len(manifests()) == 1
    copy = refs(stack, backup["uuid"])[target["uuid"]]
    assert copy["status"] == "Ready"
    restored = stack.tmp / "restored.raw"
    client.wait(
        client.create_volume_from_backup(
            backup["uuid"], name="r", hostUuid=host, installPath=str(restored), backupStorageUuid=target["uuid"]
        ),
        timeout=120,
    )
    assert restored.read_bytes() == path.read_bytes()


def test_append_only_remote_keeps_its_copies_when_asked_to_delete(stack: Stack, start_storage_server: Any) -> None:
    host = start_host(stack)
    client = stack.client
    local = client.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    server = start_storage_server(stack.tmp / "vault", append_only=True, admin_token="admin-" + new_uuid())
    remote = client.create("backup-storage", {"name": "vault", **remote_params(server)})
    volume, path = raw_volume(stack, host, "v")
    backup = client.wait(client.backup_volume(volume["uuid"]), timeout=120)
    client.wait(client.sync_backup(backup["uuid"], remote["uuid"]), timeout=120)
    with pytest.raises(JobFailed) as refused:
        client.wait(client.delete_backup(backup["uuid"], [remote["uuid"]]), timeout=120)
    assert refused.value.code == "STORAGE_FORBIDDEN", refused.value.description
    row = client.get("volume-backups", backup["uuid"])
    assert row["status"] == "Ready"
    assert {r["backupStorageUuid"]: r["status"] for r in row["backupStorageRefs"]} == {
        local["uuid"]: "Ready",
        remote["uuid"]: "Ready",
    }
    assert list((stack.tmp / "vault").rglob("manifests/*")), "the copy is still on the remote"
    # deleting the local copy works, and the remote one still restores
    client.wait(client.delete_backup(backup["uuid"], [local["uuid"]]), timeout=120)
    target = stack.tmp / "from-vault.raw"
    client.wait(
        client.create_volume_from_backup(backup["uuid"], name="r", hostUuid=host, installPath=str(target)), timeout=120
    )
    assert target.read_bytes() == path.read_bytes()


def test_a_copy_whose_worker_dies_fails_and_leaves_its_ref_failed(stack: Stack, start_storage_server: Any) -> None:
    host = start_host(stack)
    client = stack.client
    client.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    volume, _ = raw_volume(stack, host, "v", 48 * MiB, seed=5)
    backup = client.wait(client.backup_volume(volume["uuid"]), timeout=120)
    server = start_storage_server(stack.tmp / "remote-root")
    remote = client.create("backup-storage", {"name": "remote", **remote_params(server)})
    job = client.sync_backup(backup["uuid"], remote["uuid"], bandwidthLimit=2 * MiB)
    stack.wait_for("the copy under way", lambda: server.stats()["bytesReceived"] > MiB)
    stack.kill(f"worker-{host[:8]}")  # the whole worker: no process is left to record the end
    with pytest.raises(JobFailed) as failed:
        client.wait(job, timeout=120)
    assert failed.value.code == "HOST_DISCONNECTED", failed.value.description
    assert refs(stack, backup["uuid"])[remote["uuid"]]["status"] == "Failed"
    assert client.get("volume-backups", backup["uuid"])["status"] == "Ready"
