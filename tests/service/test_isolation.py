"""Project isolation, table-driven: two projects, a member of each, every route and query form.
A member sees its project's VMs, volumes, backups, job groups, histories and tags, and
nothing else: every other row is a 404 (never a 403: existence does not leak), in queries too
(counts, groupBy, nested conditions, tags), and no response ever names another project's row."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.client import ApiError, Client
from tests.service.conftest import Stack
from tests.service.test_storage_topologies import raw_volume, remote_params, start_host

pytestmark = pytest.mark.shared_api  # an API lent per test, not started (tests/service/conftest.py)


class Member:
    """An account's client that records every successful response body it received."""

    def __init__(self, stack: Stack, key: str) -> None:
        self.client = Client(f"http://127.0.0.1:{stack.port}", key, timeout=30)
        self.seen: list[str] = []

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        try:
            status, body = self.client.request(method, path, **kwargs)
        except ApiError as exc:
            return exc.status, None
        self.seen.append(json.dumps(body))
        return status, body


def make_member(stack: Stack, name: str, project: str, role: str = "member") -> Member:
    admin = stack.client
    account = admin.create("accounts", {"name": name})
    admin.request(
        "POST", f"/v1/projects/{project}/members", json={"params": {"accountUuid": account["uuid"], "role": role}}
    )
    key = admin.create("api-keys", {"accountUuid": account["uuid"], "name": name})["key"]
    return Member(stack, key)


def test_members_see_and_touch_only_their_project(stack: Stack, start_storage_server: Any) -> None:
    host = start_host(stack)
    admin = stack.client
    local = admin.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    remote = admin.create("backup-storage", {"name": "remote", **remote_params(start_storage_server(stack.tmp / "r"))})
    projects = {p: admin.create("projects", {"name": p})["uuid"] for p in ("a", "b")}
    world: dict[str, dict[str, Any]] = {}
    for p in ("a", "b"):
        vm = admin.register_vm(f"vm-{p}", hostUuid=host, projectUuid=projects[p])
        volume, _ = raw_volume(stack, host, f"vol-{p}")
        admin.request("DELETE", f"/v1/volumes/{volume['uuid']}")
        path = stack.tmp / f"vol-{p}.raw"
        volume = admin.register_volume(host, str(path), type="Root", vmInstanceUuid=vm["uuid"], name=f"vol-{p}")
        backup = admin.wait(admin.backup_volume(volume["uuid"], name=f"b-{p}"), timeout=120)
        tag = admin.create("user-tags", {"resourceUuid": vm["uuid"], "resourceType": "VmInstanceVO", "tag": f"t-{p}"})
        world[p] = {"vm": vm, "volume": volume, "backup": backup, "tag": tag}
    members = {p: make_member(stack, f"member-{p}", projects[p]) for p in ("a", "b")}
    for p, member in members.items():
        group = member.client.create_job_group(f"g-{p}", "volumeBackup")
        member.client.add_targets(group["uuid"], [world[p]["volume"]["uuid"]])
        world[p]["group"] = group
        history = member.client.run_job_group(group["uuid"])
        assert history["jobsStarted"] == 1
    stack.wait_for("both histories", lambda: admin.query("scheduler/jobhistories", count=True)["total"] == 2)

    padmin = make_member(stack, "padmin-a", projects["a"], "projectAdmin")
    for role, member in (("member", members["a"]), ("projectAdmin", padmin)):
        check_isolation(stack, member, members["b"], role, world, projects, local, remote)


def check_isolation(
    stack: Stack,
    a: Member,
    b_member: Member,
    role: str,
    world: dict[str, dict[str, Any]],
    projects: dict[str, str],
    local: dict[str, Any],
    remote: dict[str, Any],
) -> None:
    """Everything project a's ``role`` may and may not see or do."""
    admin = stack.client
    b, mine = world["b"], world["a"]
    a.seen.clear()
    # queries: only project a's rows, in every form
    expected_rows = {
        "vm-instances": {mine["vm"]["uuid"]},
        "volumes": {mine["volume"]["uuid"]},
        "volume-backups": {
            r["uuid"] for r in admin.query("volume-backups", f"volumeUuid={mine['volume']['uuid']}")["inventories"]
        },
        "scheduler/jobgroups": {mine["group"]["uuid"]},
        "user-tags": {mine["tag"]["uuid"]},
        "hosts": set(),
        "database-backups": set(),
        "backup-storage": {local["uuid"]},
        "accounts": None,  # its own account only: checked below
    }
    for collection, rows in expected_rows.items():
        status, body = a.request("GET", f"/v1/{collection}")
        assert status == 200, collection
        found = {row["uuid"] for row in body["inventories"]}
        if rows is not None:
            assert found == rows, collection
        status, body = a.request("GET", f"/v1/{collection}", params={"count": "true"})
        assert body["total"] == len(found), collection
    histories = a.request("GET", "/v1/scheduler/jobhistories")[1]["inventories"]
    assert {h["schedulerJobGroupUuid"] for h in histories} == {mine["group"]["uuid"]}
    for query in (
        {"q": f"uuid={b['vm']['uuid']}"},
        {"q": f"volumeUuid={b['volume']['uuid']}"},
        {"q": f"vmInstanceUuid={b['vm']['uuid']}"},
        {"q": f"backupStorageRefs.backupStorageUuid={local['uuid']}", "count": "true"},
        {"groupBy": "status"},
        {"q": "name=vol-b"},
    ):
        for collection in ("vm-instances", "volumes", "volume-backups"):
            a.request("GET", f"/v1/{collection}", params=query)
    grouped = a.request("GET", "/v1/volume-backups", params={"groupBy": "status"})[1]["inventories"]
    assert grouped == [{"status": "Ready", "count": len(expected_rows["volume-backups"] or ())}]
    nested = a.request(
        "GET",
        "/v1/volume-backups",
        params={"q": f"backupStorageRefs.backupStorageUuid={local['uuid']}", "count": "true"},
    )
    assert nested[1]["total"] == len(expected_rows["volume-backups"] or ())

    # another project's rows are 404 everywhere, never 403
    forbidden_calls = [
        ("GET", f"/v1/vm-instances/{b['vm']['uuid']}", None),
        ("GET", f"/v1/volumes/{b['volume']['uuid']}", None),
        ("GET", f"/v1/volume-backups/{b['backup']['uuid']}", None),
        ("GET", f"/v1/scheduler/jobgroups/{b['group']['uuid']}", None),
        ("POST", f"/v1/volumes/{b['volume']['uuid']}/volume-backups", {"params": {}}),
        ("PUT", f"/v1/volume-backups/{b['backup']['uuid']}/actions", {"revertVolumeFromVolumeBackup": {}}),
        ("PUT", f"/v1/volume-backups/{b['backup']['uuid']}/actions", {"verifyVolumeBackup": {}}),
        ("DELETE", f"/v1/volume-backups/{b['backup']['uuid']}", None),
        ("PUT", f"/v1/vm-instances/{b['vm']['uuid']}/actions", {"updateVmInstance": {"name": "x"}}),
        ("PUT", f"/v1/scheduler/jobgroups/{b['group']['uuid']}/actions", {"runSchedulerJobGroup": {}}),
        (
            "POST",
            f"/v1/scheduler/jobgroups/{mine['group']['uuid']}/jobs",
            {"params": {"targetResourceUuids": [b["volume"]["uuid"]]}},
        ),
        (
            "POST",
            "/v1/user-tags",
            {"params": {"resourceUuid": b["vm"]["uuid"], "resourceType": "VmInstanceVO", "tag": "x"}},
        ),
        ("DELETE", f"/v1/user-tags/{b['tag']['uuid']}", None),
        ("GET", f"/v1/backup-storage/{remote['uuid']}", None),
        (
            "POST",
            f"/v1/volumes/{mine['volume']['uuid']}/volume-backups",
            {"params": {"backupStorageUuid": remote["uuid"]}},
        ),
        (
            "PUT",
            f"/v1/volume-backups/{mine['backup']['uuid']}/actions",
            {"syncBackupFromImageStoreBackupStorage": {"dstBackupStorageUuid": remote["uuid"]}},
        ),
    ]
    for method, path, body in forbidden_calls:
        status, _ = a.request(method, path, **({"json": body} if body is not None else {}))
        assert status == 404, (method, path, status)
    # admin-only collections: 403 for a member
    for path, body in [
        ("/v1/vm-instances", {"params": {"name": "x"}}),
        ("/v1/backup-storage", {"params": {"type": "ImageStore", "url": f"file://{stack.tmp / 'x'}"}}),
        ("/v1/database-backups", {"params": {}}),
        ("/v1/accounts", {"params": {"name": "x"}}),
        ("/v1/projects", {"params": {"name": "x"}}),
    ]:
        assert a.request("POST", path, json=body)[0] == 403, path
    # what a member may do in its own project works
    status, accepted = a.request("POST", f"/v1/volumes/{mine['volume']['uuid']}/volume-backups", json={"params": {}})
    assert status == 202
    assert a.client.wait(accepted["jobUuid"], timeout=120)["status"] == "Ready"
    assert b_member.request("GET", f"/v1/api-jobs/{accepted['jobUuid']}")[0] == 404
    # project membership: a projectAdmin manages its own project's members, nobody else's
    newcomer = admin.create("accounts", {"name": f"newcomer-{role}"})
    add = {"params": {"accountUuid": newcomer["uuid"], "role": "member"}}
    assert a.request("POST", f"/v1/projects/{projects['b']}/members", json=add)[0] == 404
    expected = 200 if role == "projectAdmin" else 404
    assert a.request("POST", f"/v1/projects/{projects['a']}/members", json=add)[0] == expected
    # not one answer member a got names a row of project b (or the remote storage)
    others = {b[k]["uuid"] for k in ("vm", "volume", "backup", "group", "tag")} | {remote["uuid"]}
    everything = "\n".join(a.seen)
    assert len(a.seen) > 30
    assert [uuid for uuid in others if uuid in everything] == []
