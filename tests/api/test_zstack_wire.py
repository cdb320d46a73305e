"""ZStack's RPC protocol (``POST /zstack/api/``) with the app in process on a real PostgreSQL
catalog: the dispatch table against docs/zstack-messages.tsv, error shapes, sessions, queries
and ZStack's scheduler steps."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.zstack_messages import MESSAGES
from api.zstack_rest import zstack_date
from shared.catalog import db
from shared.catalog.models import Host, new_uuid
from shared.config import get_settings

ROOT = Path(__file__).resolve().parents[2]
SESSION_TIMEOUT = 2
VOLUME_BACKUP = "org.zstack.header.storage.volume.backup."
SCHEDULER = "org.zstack.scheduler."


class Wire:
    def __init__(self, client: TestClient, admin_key: str) -> None:
        self.client, self.admin_key = client, admin_key

    def rest(self, method: str, path: str, key: str | None = None, **params: Any) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        response = self.client.request(method, f"/v1{path}", headers=headers, json={"params": params})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def send(self, java_class: str, session: str | None = None, **params: Any) -> tuple[int, dict[str, Any]]:
        if session is not None:
            params["session"] = {"uuid": session}
        response = self.client.post("/zstack/api/", json={java_class: params})
        return response.status_code, response.json()

    def sync(self, java_class: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        status, body = self.send(java_class, session or self.admin_key, **params)
        reply = MESSAGES[java_class].answer_class
        assert status == 200 and body[reply]["success"], body
        return dict(body[reply])

    def run(self, java_class: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """An async message through to its result: the event."""
        status, body = self.send(java_class, session or self.admin_key, **params)
        assert status == 200 and body["state"] == "Processing", body
        assert body["location"].endswith(f"/zstack/api/result/{body['uuid']}")
        for _ in range(100):
            result = self.client.get(f"/zstack/api/result/{body['uuid']}").json()
            if result["state"] != "Processing":
                break
            time.sleep(0.1)
        assert result["state"] == "Done", result
        event: dict[str, Any] = json.loads(result["result"])[MESSAGES[java_class].answer_class]
        assert event["success"] is True
        return event


@pytest.fixture
def wire(pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Wire]:
    for name in list(os.environ):
        if name.startswith("BLOCKVAULT_"):
            monkeypatch.delenv(name)
    admin_key = "test-admin-" + secrets.token_hex(12)
    for name, value in {
        "DATABASE_URL": pg_database,
        "DATA_DIR": str(tmp_path / "data"),
        "ADMIN_API_KEY": admin_key,
        "SESSION_TIMEOUT_SECONDS": str(SESSION_TIMEOUT),
    }.items():
        monkeypatch.setenv("BLOCKVAULT_" + name, value)
    get_settings.cache_clear()
    db.reset()
    try:
        with TestClient(create_app()) as client:
            yield Wire(client, admin_key)
    finally:
        db.engine(pg_database).dispose()
        db.reset()
        get_settings.cache_clear()


def tsv() -> list[list[str]]:
    lines = (ROOT / "docs" / "zstack-messages.tsv").read_text().splitlines()
    return [line.split("\t") for line in lines if line and not line.startswith("#")]


def test_the_table_has_every_message_of_the_contract() -> None:
    handbook = ROOT.parent / "shared" / "zstack-messages.tsv"  # beside the checkout on a developer's machine
    if handbook.exists():
        assert (ROOT / "docs" / "zstack-messages.tsv").read_text() == handbook.read_text(), "the copy drifted"
    rows = tsv()
    contract = {java_class: m for java_class, m in MESSAGES.items() if not m.extension}
    assert len(rows) == len(contract) == 50
    assert {m.name for m in MESSAGES.values() if m.extension} == {
        "InstantRestoreVolumeFromVolumeBackup",
        "InstantRestoreVmFromVmBackup",
        "CreateVmInstanceFromVmBackup",
    }
    for name, java_class, call, params in rows:
        message = MESSAGES[java_class]
        assert (message.name, message.call) == (name, call)
        expected = [p.strip().split(" ")[0] for p in params.split(",") if p.strip()]
        assert list(message.params) == expected, name
        # every required parameter is enforced by the message's model, the others are optional
        for param in message.params:
            fields = message.model.model_fields[param.lstrip("*")]
            assert fields.is_required() == param.startswith("*"), (name, param)


def test_errors_are_400_in_zstack_shape(wire: Wire) -> None:
    def error(body: dict[str, Any], code: str = "INVALID_ARGUMENT") -> str:
        assert body["success"] is False and body["error"]["code"] == code, body
        return str(body["error"]["description"])

    response = wire.client.post("/zstack/api/", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error(response.json())
    status, body = wire.send("org.zstack.header.NoSuchMsg", wire.admin_key)
    assert status == 400 and "unknown message" in error(body)
    two = {
        f"{VOLUME_BACKUP}APIQueryVolumeBackupMsg": {"conditions": []},
        f"{SCHEDULER}APIQuerySchedulerJobMsg": {"conditions": []},
    }
    response = wire.client.post("/zstack/api/", json=two)
    assert response.status_code == 400
    error(response.json())
    create = f"{VOLUME_BACKUP}APICreateVolumeBackupMsg"
    status, body = wire.send(create, wire.admin_key, volumeUuid=new_uuid(), name="b")
    assert status == 400 and "backupStorageUuid" in error(body)
    assert body[f"{VOLUME_BACKUP}APICreateVolumeBackupEvent"]["success"] is False
    status, body = wire.send(create, wire.admin_key, volumeUuid=5, backupStorageUuid=new_uuid(), name="b")
    assert status == 400 and "volumeUuid" in error(body)
    query = f"{VOLUME_BACKUP}APIQueryVolumeBackupMsg"
    status, body = wire.send(query, wire.admin_key)
    assert status == 400 and "conditions" in error(body)
    status, body = wire.send(query, wire.admin_key, conditions=[{"name": "nope", "op": "=", "value": "1"}])
    assert status == 400 and "nope" in error(body)
    assert body[f"{VOLUME_BACKUP}APIQueryVolumeBackupReply"]["error"]["code"] == "INVALID_ARGUMENT"
    status, body = wire.send(query, wire.admin_key, conditions=[{"name": "size", "op": "<>", "value": "1"}])
    assert status == 400
    status, body = wire.send(query, wire.admin_key, conditions=[], limit="many")
    assert status == 400 and "limit" in error(body)
    # a path parameter never steers the call elsewhere
    status, body = wire.send(create, wire.admin_key, volumeUuid="../accounts", backupStorageUuid=new_uuid(), name="b")
    assert status == 400
    assert wire.client.get("/zstack/api/result/" + new_uuid()).status_code == 404


def test_sessions_log_in_out_expire(wire: Wire) -> None:
    account = wire.rest("POST", "/accounts", name="alice", password="s3cret")["inventory"]
    assert "password" not in json.dumps(account) and "passwordHash" not in account
    login = "org.zstack.header.identity.APILogInByAccountMsg"
    digest = hashlib.sha512(b"s3cret").hexdigest()
    status, body = wire.send(login, accountName="alice", password=hashlib.sha512(b"wrong").hexdigest())
    assert status == 401 and body["error"]["code"] == "ID.1000"
    status, body = wire.send(login, accountName="alice", password=digest)
    assert status == 200, body
    reply = body["org.zstack.header.identity.APILogInReply"]
    assert reply["success"] and reply["inventory"]["accountUuid"] == account["uuid"]
    assert reply["inventory"]["userUuid"] == account["uuid"] and reply["inventory"]["expiredDate"].endswith("M")
    session = reply["inventory"]["uuid"]

    query = f"{VOLUME_BACKUP}APIQueryVolumeBackupMsg"
    assert wire.sync(query, session, conditions=[])["inventories"] == []
    # the session opens REST too, as ZStack's OAuth
    response = wire.client.get("/v1/volume-backups", headers={"Authorization": f"OAuth {session}"})
    assert response.status_code == 200
    # a member sees no admin-only storage: the REST route's isolation
    assert wire.sync("org.zstack.header.storage.backup.APIGetBackupStorageCapacityMsg", session)["totalCapacity"] == 0
    # an API key works as a session
    assert wire.sync(query, wire.admin_key, conditions=[])["inventories"] == []
    for bad in (new_uuid(), "nonsense"):
        status, body = wire.send(query, bad, conditions=[])
        assert status == 401 and body["error"]["code"] == "ID.1001", body
    status, body = wire.send(query, None, conditions=[])
    assert status == 401 and body["error"]["code"] == "ID.1001"

    logout = "org.zstack.header.identity.APILogOutMsg"
    assert wire.sync(logout, None, sessionUuid=session) == {"success": True}
    status, body = wire.send(query, session, conditions=[])
    assert status == 401 and body["error"]["code"] == "ID.1001"

    # sessions expire
    status, body = wire.send(login, accountName="alice", password=digest)
    session = body["org.zstack.header.identity.APILogInReply"]["inventory"]["uuid"]
    assert wire.send(query, session, conditions=[])[0] == 200
    time.sleep(SESSION_TIMEOUT + 0.5)
    status, body = wire.send(query, session, conditions=[])
    assert status == 401 and body["error"]["code"] == "ID.1001" and "expired" in body["error"]["description"]

    # a password can change; the old one no longer opens a session
    _rest_put(wire, f"/accounts/{account['uuid']}/actions", {"updateAccount": {"password": "other"}})
    assert wire.send(login, accountName="alice", password=digest)[0] == 401
    assert wire.send(login, accountName="alice", password=hashlib.sha512(b"other").hexdigest())[0] == 200


def _rest_put(wire: Wire, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = wire.client.put(f"/v1{path}", json=body, headers={"Authorization": f"Bearer {wire.admin_key}"})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_scheduler_steps_make_the_rows_of_the_rest_shortcut(wire: Wire, tmp_path: Path) -> None:
    host = new_uuid()
    with db.session() as session:
        session.add(Host(uuid=host, name="h1", managementIp="127.0.0.1", volumeRoots=[str(tmp_path)]))
    volumes = [
        wire.rest("POST", "/volumes", hostUuid=host, installPath=str(tmp_path / f"v{i}.raw"), name=f"v{i}")[
            "inventory"
        ]["uuid"]
        for i in range(2)
    ]
    storage = wire.rest("POST", "/backup-storage", name="local", type="ImageStore", url=f"file://{tmp_path}/bs")
    storage_uuid = storage["inventory"]["uuid"]
    parameters = {"backupStorageUuids": [storage_uuid], "retention": {"keepLast": 3}}

    group = wire.run(
        f"{SCHEDULER}APICreateSchedulerJobGroupMsg", name="nightly", type="volumeBackup", parameters=parameters
    )["inventory"]
    assert group["jobType"] == "volumeBackup" and group["createDate"].endswith("M")
    job = wire.run(
        f"{SCHEDULER}APICreateSchedulerJobMsg", name="v0 nightly", targetResourceUuid=volumes[0], type="volumeBackup"
    )["inventory"]
    assert job["schedulerJobGroupUuid"] is None
    event = wire.run(
        f"{SCHEDULER}APIAddSchedulerJobsToSchedulerJobGroupMsg",
        schedulerJobGroupUuid=group["uuid"],
        schedulerJobUuids=[job["uuid"]],
    )
    assert event["inventory"]["jobsUuid"] == [job["uuid"]]

    # the REST shortcut makes the same row for the other volume
    shortcut = wire.rest("POST", f"/scheduler/jobgroups/{group['uuid']}/jobs", targetResourceUuids=[volumes[1]])
    assert len(shortcut["inventory"]["jobsUuid"]) == 2
    jobs = wire.sync(
        f"{SCHEDULER}APIQuerySchedulerJobMsg",
        conditions=[{"name": "schedulerJobGroupUuid", "op": "=", "value": group["uuid"]}],
        sortBy="targetResourceUuid",
        replyWithCount=True,
    )
    assert jobs["total"] == 2
    rows = {j["targetResourceUuid"]: j for j in jobs["inventories"]}
    assert set(rows) == set(volumes)
    assert {(r["jobType"], r["state"], r["schedulerJobGroupUuid"]) for r in rows.values()} == {
        ("volumeBackup", "Enabled", group["uuid"])
    }

    trigger = wire.run(
        f"{SCHEDULER}APICreateSchedulerTriggerMsg", name="hourly", schedulerType="simple", schedulerInterval=3600
    )["inventory"]
    wire.run(
        f"{SCHEDULER}APIAddSchedulerJobGroupToSchedulerTriggerMsg",
        schedulerJobGroupUuid=group["uuid"],
        schedulerTriggerUuid=trigger["uuid"],
    )
    found = wire.sync(
        f"{SCHEDULER}APIQuerySchedulerJobGroupMsg",
        conditions=[{"name": "uuid", "op": "=", "value": group["uuid"]}],
        fields=["uuid", "name"],
    )
    assert found["inventories"] == [{"uuid": group["uuid"], "name": "nightly"}]
    counted = wire.sync(f"{SCHEDULER}APIQuerySchedulerTriggerMsg", conditions=[], count=True)
    assert counted == {"inventories": [], "total": 1, "success": True}

    # take the job out again, then delete it
    wire.run(
        f"{SCHEDULER}APIRemoveSchedulerJobsFromSchedulerJobGroupMsg",
        schedulerJobGroupUuid=group["uuid"],
        schedulerJobUuids=[job["uuid"]],
    )
    wire.run(f"{SCHEDULER}APIUpdateSchedulerJobMsg", uuid=job["uuid"], name="renamed")
    left = wire.sync(
        f"{SCHEDULER}APIQuerySchedulerJobMsg", conditions=[{"name": "name", "op": "=", "value": "renamed"}]
    )
    assert [j["schedulerJobGroupUuid"] for j in left["inventories"]] == [None]
    wire.run(f"{SCHEDULER}APIDeleteSchedulerJobMsg", uuid=job["uuid"])
    assert wire.sync(f"{SCHEDULER}APIQuerySchedulerJobMsg", conditions=[], count=True)["total"] == 1

    # storage: update, capacity, and delete refused while a group copies to it
    storage_msgs = "org.zstack.header.storage.backup."
    wire.run(f"{storage_msgs}APIUpdateBackupStorageMsg", uuid=storage_uuid, name="renamed-bs")
    listed = wire.sync(
        "org.zstack.storage.backup.imagestore.APIQueryImageStoreBackupStorageMsg",
        conditions=[{"name": "name", "op": "~=", "value": "renamed%"}],
    )
    assert [s["uuid"] for s in listed["inventories"]] == [storage_uuid]
    status, body = wire.send(f"{storage_msgs}APIDeleteBackupStorageMsg", wire.admin_key, uuid=storage_uuid)
    assert status == 409 and body["state"] == "Error" and body["error"]["code"] == "CONFLICT"


def test_zstack_dates() -> None:
    text = zstack_date("2018-07-25T16:55:41.123Z")
    assert text.count(",") == 1 and text.endswith(("AM", "PM")) and ":41 " in text
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        assert zstack_date("2018-07-25T16:55:41.123Z") == "Jul 25, 2018 4:55:41 PM"
        assert zstack_date("2018-07-05T00:05:01Z") == "Jul 5, 2018 12:05:01 AM"
    finally:
        del os.environ["TZ"]
        time.tzset()
