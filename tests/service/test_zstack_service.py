"""ZStack's wire protocol against the real service (API + Celery worker on PostgreSQL/Redis):
an async backup through to Done, and ZStack's scheduler steps through to job history rows."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import httpx
import pytest

from tests.service.conftest import Stack
from tests.service.test_storage_topologies import raw_volume, start_host

pytestmark = pytest.mark.shared_api  # an API lent per test, not started (tests/service/conftest.py)

VB = "org.zstack.header.storage.volume.backup."
SC = "org.zstack.scheduler."


class Wire:
    def __init__(self, stack: Stack, session: str) -> None:
        self.url, self.session = f"http://127.0.0.1:{stack.port}", session

    def send(self, java_class: str, **params: Any) -> dict[str, Any]:
        params["session"] = {"uuid": self.session}
        response = httpx.post(f"{self.url}/zstack/api/", json={java_class: params}, timeout=30)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def run(self, java_class: str, **params: Any) -> dict[str, Any]:
        started = self.send(java_class, **params)
        assert started["state"] == "Processing", started
        deadline = time.monotonic() + 90
        while True:
            result: dict[str, Any] = httpx.get(started["location"], timeout=30).json()
            if result["state"] != "Processing" or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert result["state"] == "Done", result
        event_class = java_class.removesuffix("Msg") + "Event"
        event: dict[str, Any] = json.loads(result["result"])[event_class]
        assert event["success"] is True
        return event


def test_backup_and_schedule_over_the_wire(stack: Stack) -> None:
    host = start_host(stack)
    volume, _path = raw_volume(stack, host, "wired")
    storage = stack.client.add_backup_storage("local", f"file://{stack.tmp / 'bs'}")
    stack.client.create("accounts", {"name": "operator", "password": "pw-operator"})
    login = httpx.post(
        f"http://127.0.0.1:{stack.port}/zstack/api/",
        json={
            "org.zstack.header.identity.APILogInByAccountMsg": {
                "accountName": "operator",
                "password": hashlib.sha512(b"pw-operator").hexdigest(),
            }
        },
        timeout=30,
    ).json()
    member_session = login["org.zstack.header.identity.APILogInReply"]["inventory"]["uuid"]
    # the operator is in no project: the volume is not there for it (REST's isolation)
    response = httpx.post(
        f"http://127.0.0.1:{stack.port}/zstack/api/",
        json={
            f"{VB}APICreateVolumeBackupMsg": {
                "volumeUuid": volume["uuid"],
                "backupStorageUuid": storage["uuid"],
                "name": "nope",
                "session": {"uuid": member_session},
            }
        },
        timeout=30,
    )
    assert response.status_code == 404 and response.json()["error"]["code"] == "NOT_FOUND"

    wire = Wire(stack, stack.key)  # an API key works as a session
    backup = wire.run(
        f"{VB}APICreateVolumeBackupMsg",
        volumeUuid=volume["uuid"],
        backupStorageUuid=storage["uuid"],
        name="b1",
        volumeReadBandwidth=1048576,
    )["inventory"]
    assert backup["volumeUuid"] == volume["uuid"] and backup["status"] == "Ready"
    assert backup["createDate"].endswith(("AM", "PM"))
    found = wire.send(f"{VB}APIQueryVolumeBackupMsg", conditions=[{"name": "size", "op": ">", "value": "0"}])
    reply = found[f"{VB}APIQueryVolumeBackupReply"]
    assert [b["uuid"] for b in reply["inventories"]] == [backup["uuid"]]
    nested = wire.send(
        f"{VB}APIQueryVolumeBackupMsg",
        conditions=[{"name": "backupStorageRefs.status", "op": "=", "value": "Ready"}],
        replyWithCount=True,
    )[f"{VB}APIQueryVolumeBackupReply"]
    assert nested["total"] == 1

    group = wire.run(
        f"{SC}APICreateSchedulerJobGroupMsg",
        name="g",
        type="volumeBackup",
        parameters={"backupStorageUuids": [storage["uuid"]]},
    )["inventory"]
    job = wire.run(f"{SC}APICreateSchedulerJobMsg", name="j", targetResourceUuid=volume["uuid"], type="volumeBackup")
    wire.run(
        f"{SC}APIAddSchedulerJobsToSchedulerJobGroupMsg",
        schedulerJobGroupUuid=group["uuid"],
        schedulerJobUuids=[job["inventory"]["uuid"]],
    )
    trigger = wire.run(
        f"{SC}APICreateSchedulerTriggerMsg", name="t", schedulerType="simple", schedulerInterval=86400, repeatCount=1
    )["inventory"]
    wire.run(
        f"{SC}APIAddSchedulerJobGroupToSchedulerTriggerMsg",
        schedulerJobGroupUuid=group["uuid"],
        schedulerTriggerUuid=trigger["uuid"],
        triggerNow=True,
    )
    wire.run(f"{SC}APIRunSchedulerTriggerMsg", uuid=trigger["uuid"])

    def history() -> list[dict[str, Any]]:
        reply = wire.send(
            f"{SC}APIQuerySchedulerJobHistoryMsg",
            conditions=[{"name": "schedulerJobGroupUuid", "op": "=", "value": group["uuid"]}],
        )
        rows: list[dict[str, Any]] = reply[f"{SC}APIQuerySchedulerJobHistoryReply"]["inventories"]
        return rows

    stack.wait_for("two history rows", lambda: len(history()) >= 2)
    rows = history()
    assert all(r["success"] for r in rows), rows
    assert {(r["schedulerJobUuid"], r["targetResourceUuid"], r["triggerUuid"]) for r in rows} == {
        (job["inventory"]["uuid"], volume["uuid"], trigger["uuid"])
    }
    assert all(isinstance(r["executeTime"], int) and r["startTime"].endswith(("AM", "PM")) for r in rows)
