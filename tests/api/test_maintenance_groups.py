"""Maintenance job groups (verify, reclaim, storageSync) through the REST API: their bad inputs
answer 4xx with stable codes, a member's only on storage the member may use."""

from __future__ import annotations

from typing import Any

from tests.api.conftest import World


def _group(world: World, key: str | None, kind: str, **data: Any) -> tuple[int, Any]:
    body = {"params": {"name": f"{kind}-group", "type": kind, "parameters": data}}
    return world.call("POST", "/v1/scheduler/jobgroups", key, body)


def _targets(world: World, key: str | None, group: str, targets: list[str]) -> tuple[int, Any]:
    body = {"params": {"targetResourceUuids": targets}}
    return world.call("POST", f"/v1/scheduler/jobgroups/{group}/jobs", key, body)


def _error(answer: tuple[int, Any]) -> tuple[int, str]:
    status, body = answer
    return status, body["error"]["code"]


def test_maintenance_groups_take_storages_and_refuse_the_rest(world: World) -> None:
    admin, member = world.admin_key, world.parties["own"].key
    local, remote = world.shared["local"], world.shared["remote"]
    volume = world.parties["own"].rows["volume"]

    assert _error(_group(world, admin, "scrub")) == (400, "INVALID_ARGUMENT")
    assert _error(_group(world, admin, "verify", fullBackupInterval=2)) == (400, "INVALID_ARGUMENT")
    assert _error(_group(world, admin, "verify", chunksPerRun=-1)) == (400, "INVALID_ARGUMENT")
    assert _error(_group(world, admin, "storageSync", srcBackupStorageUuid="0" * 32)) == (404, "NOT_FOUND")
    status, body = _group(world, admin, "verify", chunksPerRun=1000, readData=True)
    assert status == 200, body
    verify = body["inventory"]
    assert (verify["jobType"], verify["jobData"]) == ("verify", {"chunksPerRun": 1000, "readData": True})
    assert _error(_targets(world, admin, verify["uuid"], [volume])) == (400, "INVALID_ARGUMENT")
    status, body = _targets(world, admin, verify["uuid"], [local, remote])
    assert status == 200, body

    # a member: verify on storage the member may use (the ImageStore), nothing else
    status, body = _group(world, member, "verify")
    assert status == 200, body
    mine = body["inventory"]["uuid"]
    assert _error(_targets(world, member, mine, [remote])) == (404, "NOT_FOUND")
    assert _error(_targets(world, member, mine, [volume])) == (404, "NOT_FOUND")  # not a storage it sees
    status, body = _targets(world, member, mine, [local])
    assert status == 200, body
    assert _error(_group(world, member, "reclaim", retention={"keepLast": 1})) == (403, "FORBIDDEN")
    assert _error(_group(world, member, "storageSync")) == (403, "FORBIDDEN")
    assert _group(world, None, "verify")[0] == 401

    # ZStack's steps: a job of its own first, on a storage the member may use
    def job(target: str) -> tuple[int, Any]:
        body = {"params": {"name": "v", "type": "verify", "targetResourceUuid": target}}
        return world.call("POST", "/v1/scheduler/jobs", member, body)

    assert _error(job(remote)) == (404, "NOT_FOUND")
    status, body = job(local)
    assert status == 200 and body["inventory"]["targetResourceUuid"] == local, body
