"""File-level restore and instant recovery end to end: the API and a worker as processes, the
REST routes, the Python client, the ``blockvault backup`` CLI and a ZStack wire message; members
see only their project's backups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from api.client import ApiError, Client
from tests import disk_images
from tests.conftest import ROOT, MiB
from tests.service.conftest import Stack
from tests.service.test_storage_topologies import start_host

pytestmark = pytest.mark.shared_api  # an API lent per test, not started (tests/service/conftest.py)


def member(stack: Stack, name: str) -> tuple[str, Client]:
    """A new project and a member of it: (project uuid, the member's client)."""
    admin = stack.client
    project = admin.create("projects", {"name": f"project-{name}"})["uuid"]
    account = admin.create("accounts", {"name": f"member-{name}"})["uuid"]
    admin.request("POST", f"/v1/projects/{project}/members", json={"params": {"accountUuid": account}})
    key = admin.create("api-keys", {"accountUuid": account})["key"]
    return project, Client(stack.client.base_url, key)


def cli(stack: Stack, key: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**stack.env, "BLOCKVAULT_API_URL": stack.client.base_url, "BLOCKVAULT_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args], env=env, cwd=ROOT, capture_output=True, timeout=120, check=False
    )


def test_members_browse_and_download_their_backups_files(stack: Stack) -> None:
    host = start_host(stack)
    admin = stack.client
    admin.add_backup_storage("local", f"file://{stack.tmp}/bs")
    tree = disk_images.source_tree(stack.tmp / "src", many=30)
    image = disk_images.ext4(tree, stack.tmp / "disk.raw")
    project, own = member(stack, "own")
    _other_project, other = member(stack, "other")
    volume = admin.register_volume(host, str(image), name="disk", projectUuid=project)
    backup = admin.wait(own.backup_volume(volume["uuid"]), timeout=120)

    assert [p["filesystem"] for p in own.backup_partitions(backup["uuid"])] == ["ext"]
    listing = own.list_files(backup["uuid"], "/etc/many", start=10, limit=5)
    assert (listing["total"], listing["partition"], listing["filesystem"]) == (30, 0, "ext")
    assert [e["name"] for e in listing["inventories"]] == [f"f{i:04d}" for i in range(10, 15)]
    assert b"".join(own.read_file(backup["uuid"], "/big.bin")) == (tree.root / "big.bin").read_bytes()
    hosts = own.list_files(backup["uuid"], "/etc/hosts")["inventories"][0]
    assert (hosts["mode"], hosts["size"]) == ("0640", 20)
    assert hosts["mtimeNs"] == (tree.root / "etc/hosts").stat().st_mtime_ns

    for call in (
        lambda: other.backup_partitions(backup["uuid"]),
        lambda: other.list_files(backup["uuid"]),
        lambda: b"".join(other.read_file(backup["uuid"], "/etc/hosts")),
    ):
        with pytest.raises(ApiError) as caught:
            call()
        assert caught.value.status == 404  # another project's backup is not there for them
    with pytest.raises(ApiError) as caught:
        own.list_files(backup["uuid"], "/etc/../etc")
    assert (caught.value.status, caught.value.code) == (400, "INVALID_ARGUMENT")
    with pytest.raises(ApiError) as caught:
        b"".join(own.read_file(backup["uuid"], "/nope"))
    assert caught.value.status == 404

    noise = stack.tmp / "noise.raw"
    noise.write_bytes(os.urandom(2 * MiB))
    blank = admin.register_volume(host, str(noise), name="noise", projectUuid=project)
    unreadable = admin.wait(own.backup_volume(blank["uuid"]), timeout=120)
    with pytest.raises(ApiError) as caught:
        own.list_files(unreadable["uuid"])
    assert (caught.value.status, caught.value.code) == (422, "NO_FILESYSTEM")

    # the CLI: ls, cat, get
    key = own.http.headers["Authorization"].split()[1]
    listed = cli(stack, key, "backup", "ls", backup["uuid"], "/etc")
    assert listed.returncode == 0, listed.stderr
    assert "hosts" in listed.stdout.decode() and listed.stdout.decode().startswith(("-rw-r-----", "d"))
    shown = cli(stack, key, "backup", "cat", backup["uuid"], "/fïle ñame.txt")
    assert shown.returncode == 0 and shown.stdout == (tree.root / "fïle ñame.txt").read_bytes()
    got = cli(stack, key, "backup", "get", backup["uuid"], "/big.bin", "-o", str(stack.tmp / "got.bin"))
    assert got.returncode == 0, got.stderr
    assert (stack.tmp / "got.bin").read_bytes() == (tree.root / "big.bin").read_bytes()
    missing = cli(stack, key, "backup", "get", backup["uuid"], "/nope", "-o", str(stack.tmp / "nope.bin"))
    assert missing.returncode == 2 and not (stack.tmp / "nope.bin").exists()
    assert not list(stack.tmp.glob(".nope.bin*"))
    as_json = json.loads(cli(stack, key, "backup", "ls", backup["uuid"], "--json").stdout)
    assert {e["name"] for e in as_json["inventories"]} >= {"etc", "big.bin", "abs-link"}


def test_instant_restore_over_rest_and_the_zstack_wire(stack: Stack) -> None:
    host = start_host(stack)
    admin = stack.client
    admin.add_backup_storage("local", f"file://{stack.tmp}/bs")
    source = stack.tmp / "data.raw"
    source.write_bytes(os.urandom(3 * MiB) + bytes(MiB) + os.urandom(MiB))
    volume = admin.register_volume(host, str(source), name="data")
    backup = admin.wait(admin.backup_volume(volume["uuid"]), timeout=120)

    job = admin.instant_restore_volume(backup["uuid"], name="instant")
    restored = admin.wait(job, timeout=180)
    assert restored["status"] == "Ready" and restored["format"] == "qcow2"
    assert restored["instantRestore"]["mode"] == "storage-daemon"
    out = stack.tmp / "check.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", restored["installPath"], str(out)], check=True)
    assert out.read_bytes() == source.read_bytes()

    # the wire: blockvault's own message, as ZStack's tools send messages
    message = {
        "org.zstack.header.storage.volume.backup.APIInstantRestoreVolumeFromVolumeBackupMsg": {
            "uuid": backup["uuid"],
            "name": "over the wire",
            "session": {"uuid": stack.key},
        }
    }
    answer = admin.http.post("/zstack/api/", json=message).json()
    assert answer["state"] == "Processing"
    result = admin.http.get(answer["location"].replace(admin.base_url, "")).json()
    while result["state"] == "Processing":
        result = admin.http.get(answer["location"].replace(admin.base_url, "")).json()
    event = json.loads(result["result"])
    inventory = event["org.zstack.header.storage.volume.backup.APIInstantRestoreVolumeFromVolumeBackupEvent"]
    assert inventory["inventory"]["name"] == "over the wire" and inventory["inventory"]["status"] == "Ready"
    assert Path(inventory["inventory"]["installPath"]).exists()
