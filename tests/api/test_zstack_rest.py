"""``/zstack/v1``: ZStack's REST dialect (docs/zstack-rest.md), through the real app on
PostgreSQL, with the request shapes ZStack's Go SDK sends (``zstack-sdk-go-v2``: ``pkg/param``
bodies, ``pkg/client/*_actions.go`` paths) and its reply types (``pkg/view``) checked by type:
dates as ZStack writes them, ``metadata``/``jobData`` JSON strings, integer ``executeTime``,
ZStack's error body. Trigger times are Unix seconds on ``/v1`` and ``/zstack/v1`` alike."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from shared.catalog import db, models
from shared.schedule import MAX_SECONDS
from tests.api.conftest import app_client

# ZStack's dates as its Gson writes them and the SDK's jsonutils (ZStackTimeFormat) reads them
ZSTACK_DATE = re.compile(r"^[A-Z][a-z]{2} \d{1,2}, \d{4} \d{1,2}:\d\d:\d\d (AM|PM)$")


def zstack_moment(text: str) -> datetime:
    """A ZStack date back as an aware datetime (the server's local time)."""
    return datetime.strptime(text, "%b %d, %Y %I:%M:%S %p").astimezone()


class Sdk:
    """What ZStack's Go SDK sends: ``Authorization: OAuth <session>``, bodies ``{"params": ...}``
    or ``{"<action>": ...}``, async answers polled at their ``location``."""

    def __init__(self, client: TestClient, key: str) -> None:
        self.client, self.key = client, key

    def call(self, method: str, path: str, body: Any = None, **query: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"OAuth {self.key}"}
        url = path if path.startswith("/") else f"/zstack/v1/{path}"
        answer = self.client.request(method, url, headers=headers, json=body, params=query or None)
        return answer.status_code, answer.json()

    def ok(self, method: str, path: str, body: Any = None, **query: Any) -> dict[str, Any]:
        status, answer = self.call(method, path, body, **query)
        assert status == 200, (method, path, status, answer)
        assert isinstance(answer, dict)
        return answer

    def error(self, method: str, path: str, body: Any, status: int) -> dict[str, Any]:
        """ZStack's error body, exactly: ``{"error": {"code", "description", "details"}}``."""
        got, answer = self.call(method, path, body)
        assert got == status, (method, path, got, answer)
        assert set(answer) == {"error"} and set(answer["error"]) == {"code", "description", "details"}, answer
        assert all(isinstance(v, str) for v in answer["error"].values()), answer
        return dict(answer["error"])


@pytest.fixture
def sdk(pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sdk]:
    key = "test-admin-" + secrets.token_hex(12)
    settings = {"DATABASE_URL": pg_database, "DATA_DIR": str(tmp_path / "data"), "ADMIN_API_KEY": key}
    with app_client(monkeypatch, settings) as client:
        yield Sdk(client, key)


def assert_dates(row: dict[str, Any], *fields: str) -> None:
    for field in fields:
        assert isinstance(row[field], str) and ZSTACK_DATE.fullmatch(row[field]), (field, row[field])


# -- trigger times: Unix seconds everywhere ---------------------------------------------------------
def test_create_scheduler_trigger_takes_seconds_and_answers_dates(sdk: Sdk) -> None:
    """CreateSchedulerTrigger as the SDK sends it (param.CreateSchedulerTriggerDetailParam:
    startTime int64 seconds); SchedulerTriggerInventoryView has time.Time start/stop dates."""
    start = int(time.time()) + 3600
    body = {"params": {"name": "t", "schedulerType": "simple", "schedulerInterval": 600, "startTime": start}}
    trigger = sdk.ok("POST", "scheduler/triggers", body)["inventory"]
    assert_dates(trigger, "startTime", "createDate", "lastOpDate")
    assert zstack_moment(trigger["startTime"]) == datetime.fromtimestamp(start, UTC)
    with db.session() as session:
        row = session.get(models.SchedulerTrigger, trigger["uuid"])
        assert row is not None and row.startTime == start  # stored as Unix seconds
    # /v1 keeps its own types: the same trigger's startTime an integer, in seconds
    v1 = sdk.ok("GET", f"/v1/scheduler/triggers/{trigger['uuid']}")["inventories"][0]
    assert v1["startTime"] == start and isinstance(v1["startTime"], int)
    # the first fire is at startTime, not in 1970 nor 1000 times later
    fires = sdk.ok("GET", f"/v1/scheduler/triggers/{trigger['uuid']}/fire-times", count="2")["fireTimes"]
    first = datetime.fromisoformat(fires[0].replace("Z", "+00:00"))
    assert first == datetime.fromtimestamp(start, UTC)


@pytest.mark.parametrize("start", [0, None])
def test_a_start_time_of_zero_or_none_is_now_and_stored_as_now(sdk: Sdk, start: int | None) -> None:
    params: dict[str, Any] = {"name": "t", "schedulerType": "simple", "schedulerInterval": 60}
    if start is not None:
        params["startTime"] = start
    before = int(time.time())
    trigger = sdk.ok("POST", "/v1/scheduler/triggers", {"params": params})["inventory"]
    assert before <= trigger["startTime"] <= int(time.time()) + 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("startTime", -1),
        ("startTime", MAX_SECONDS + 1),
        ("startTime", 1_796_600_000_000),  # Dec 2026 in milliseconds, sent by mistake: year 50000+
        ("stopTime", -5),
        ("stopTime", 2**63 - 1),
        ("startTime", "1700000000"),
        ("startTime", 1.5),
    ],
)
def test_bad_trigger_times_are_400_with_a_stable_code(sdk: Sdk, field: str, value: Any) -> None:
    body = {"params": {"name": "t", "schedulerType": "simple", "schedulerInterval": 60, field: value}}
    error = sdk.error("POST", "scheduler/triggers", body, 400)
    assert error["code"] == "INVALID_ARGUMENT" and field in error["description"], error
    status, answer = sdk.call("POST", "/v1/scheduler/triggers", body)
    assert status == 400 and answer["error"]["code"] == "INVALID_ARGUMENT" and answer["success"] is False


def test_update_scheduler_trigger_in_seconds(sdk: Sdk) -> None:
    """UpdateSchedulerTrigger (``{"updateSchedulerTrigger": {...}}``), startTime in seconds."""
    body = {"params": {"name": "t", "schedulerType": "simple", "schedulerInterval": 60}}
    trigger = sdk.ok("POST", "scheduler/triggers", body)["inventory"]
    start = int(time.time()) + 86400
    update = {"updateSchedulerTrigger": {"startTime": start, "schedulerInterval": 120}}
    changed = sdk.ok("PUT", f"scheduler/triggers/{trigger['uuid']}/actions", update)["inventory"]
    assert zstack_moment(changed["startTime"]) == datetime.fromtimestamp(start, UTC)
    assert changed["schedulerInterval"] == 120


# -- Quartz cron ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cron", ["0 0 2 * * ?", "0 30 1 ? * 2-6", "0 0 3 L * ?", "0 0 4 ? * 6#3", "0 0 0 1 1 ? 2030"])
def test_quartz_cron_triggers_are_taken(sdk: Sdk, cron: str) -> None:
    body = {"params": {"name": "q", "schedulerType": "cron", "cron": cron}}
    trigger = sdk.ok("POST", "scheduler/triggers", body)["inventory"]
    assert trigger["cron"] == cron
    fires = sdk.ok("GET", f"/v1/scheduler/triggers/{trigger['uuid']}/fire-times", count="3")["fireTimes"]
    assert len(fires) == (1 if cron.endswith("2030") else 3)


@pytest.mark.parametrize(
    "cron", ["0 0 2 * * MON", "0 0 12 LW * ?", "0 0 2 ? * 9", "every day", "0 0 2 * * ? * 1", "0 0 0 30 2 ?"]
)
def test_bad_cron_is_400(sdk: Sdk, cron: str) -> None:
    body = {"params": {"name": "q", "schedulerType": "cron", "cron": cron}}
    error = sdk.error("POST", "scheduler/triggers", body, 400)
    assert error["code"] == "INVALID_ARGUMENT" and "cron" in error["description"], error


# -- job groups: parameters as ZStack's map of strings, jobData a JSON string -----------------------
def _storage(tmp: Path) -> str:
    with db.session() as session:
        storage = models.BackupStorage(name="local", type="ImageStore", url=f"file://{tmp}/bs", status="Connected")
        session.add(storage)
        session.flush()
        return storage.uuid


def test_create_scheduler_job_group_with_string_parameters(sdk: Sdk, tmp_path: Path) -> None:
    """CreateSchedulerJobGroup: param.CreateSchedulerJobGroupParamDetail has
    ``Parameters map[string]string``; SchedulerJobGroupInventoryView has ``JobData string``."""
    storage = _storage(tmp_path)
    parameters = {
        "backupStorageUuids": storage,
        "fullBackupInterval": "3",
        "retention": json.dumps({"keepLast": 5}),
        "bandwidthLimit": "1048576",
    }
    body = {"params": {"name": "nightly", "type": "volumeBackup", "parameters": parameters}}
    group = sdk.ok("POST", "scheduler/jobgroups", body)["inventory"]
    assert isinstance(group["jobData"], str)
    assert json.loads(group["jobData"]) == {
        "backupStorageUuids": [storage],
        "fullBackupInterval": 3,
        "retention": {"keepLast": 5},
        "bandwidthLimit": 1048576,
    }
    assert_dates(group, "createDate", "lastOpDate")
    # /v1 answers the same group's jobData as an object
    v1 = sdk.ok("GET", f"/v1/scheduler/jobgroups/{group['uuid']}")["inventories"][0]
    assert v1["jobData"]["fullBackupInterval"] == 3
    # UpdateSchedulerJobGroup: {"updateSchedulerJobGroup": {"parameters": map[string]string}}
    update = {"updateSchedulerJobGroup": {"parameters": {"backupStorageUuids": f'["{storage}"]'}}}
    changed = sdk.ok("PUT", f"scheduler/jobgroups/{group['uuid']}/actions", update)["inventory"]
    assert json.loads(changed["jobData"]) == {"backupStorageUuids": [storage]}


@pytest.mark.parametrize(
    ("parameters", "word"),
    [
        ({"fullBackupInterval": 3}, "fullBackupInterval"),  # a number, not a string
        ({"retention": {"keepLast": 2}}, "retention"),  # an object, not a JSON string
        ({"fullBackupInterval": "three"}, "fullBackupInterval"),
        ({"fullBackupInterval": "-1"}, "fullBackupInterval"),
        ({"retention": "{not json"}, "retention"),
        ({"retention": "[1]"}, "retention"),
        ({"backupStorageUuids": "[oops"}, "backupStorageUuids"),
        ({"backupStorageUuids": models.new_uuid()}, "backup storage"),  # parses, names no storage: 404
        ({"surprise": "1"}, "surprise"),
        ("a string", "map of strings"),
    ],
)
def test_parameters_that_are_not_a_map_of_strings_or_do_not_parse_are_refused(
    sdk: Sdk, parameters: Any, word: str
) -> None:
    body = {"params": {"name": "g", "type": "volumeBackup", "parameters": parameters}}
    status = 404 if word == "backup storage" else 400
    error = sdk.error("POST", "scheduler/jobgroups", body, status)
    assert word in error["description"], error


def test_a_verify_group_takes_its_parameters_as_strings(sdk: Sdk) -> None:
    parameters = {"chunksPerRun": "500", "readData": "false", "repair": "TRUE"}
    body = {"params": {"name": "weekly-verify", "type": "verify", "parameters": parameters}}
    group = sdk.ok("POST", "scheduler/jobgroups", body)["inventory"]
    assert json.loads(group["jobData"]) == {"chunksPerRun": 500, "readData": False, "repair": True}
    bad = {"params": {"name": "v", "type": "verify", "parameters": {"readData": "maybe"}}}
    assert "readData" in sdk.error("POST", "scheduler/jobgroups", bad, 400)["description"]


# -- inventories: dates, JSON-string metadata, integer executeTime ----------------------------------
def _rows(tmp: Path) -> dict[str, Any]:
    with db.session() as session:
        host = models.Host(
            name="h", status="Connected", lastHeartbeat=models.now() + timedelta(days=1), volumeRoots=[str(tmp)]
        )
        session.add(host)
        session.flush()
        storage = models.BackupStorage(name="local", type="ImageStore", url=f"file://{tmp}/bs", status="Connected")
        vm = models.VmInstance(name="vm", hostUuid=host.uuid)
        session.add_all([storage, vm])
        session.flush()
        volume = models.Volume(hostUuid=host.uuid, vmInstanceUuid=vm.uuid, type="Root", installPath=str(tmp / "r.raw"))
        session.add(volume)
        session.flush()
        metadata = {"type": "Root", "name": "vm-root", "vmInstanceUuid": vm.uuid}
        backup = models.VolumeBackup(
            volumeUuid=volume.uuid,
            type="Root",
            status="Ready",
            size=4096,
            metadata_=metadata,
            groupUuid=models.new_uuid(),
        )
        where = {"backupStorageUuid": storage.uuid, "status": "Ready", "installPath": "zstore://r/d"}
        backup.backupStorageRefs.append(models.VolumeBackupStorageRef(**where))
        database = models.DatabaseBackup(
            name="db",
            status="Ready",
            size=1,
            metadata_={"name": "zstack", "version": "16", "md5": "0" * 32, "createdTime": "2026-03-01T02:00:05+00:00"},
        )
        database.backupStorageRefs.append(models.DatabaseBackupStorageRef(**where))
        executed = datetime(2026, 3, 1, 2, 0, 5, 250000, tzinfo=UTC)
        history = models.SchedulerJobHistory(
            executeTime=executed, success=True, targetResourceUuid=volume.uuid, requestDump="{}", resultDump="{}"
        )
        session.add_all([backup, database, history])
        session.flush()
        return {"backup": backup.uuid, "database": database.uuid, "history": history.id, "executed": executed}


def test_query_volume_backup_answers_zstack_types(sdk: Sdk, tmp_path: Path) -> None:
    """QueryVolumeBackup (GET volume-backups): VolumeBackupInventoryView has Metadata string,
    dates; backupStorageRefs' dates too."""
    rows = _rows(tmp_path)
    backup = sdk.ok("GET", "volume-backups", q=f"uuid={rows['backup']}")["inventories"][0]
    assert isinstance(backup["metadata"], str) and json.loads(backup["metadata"])["type"] == "Root"
    assert_dates(backup, "createDate", "lastOpDate")
    assert isinstance(backup["size"], int)
    assert_dates(backup["backupStorageRefs"][0], "createDate", "lastOpDate")
    # GET volume-backups/{uuid} (the SDK's GetVolumeBackup) the same
    one = sdk.ok("GET", f"volume-backups/{rows['backup']}")["inventories"][0]
    assert one["metadata"] == backup["metadata"]
    # /v1 unchanged: an object and ISO dates
    v1 = sdk.ok("GET", f"/v1/volume-backups/{rows['backup']}")["inventories"][0]
    assert v1["metadata"]["type"] == "Root" and v1["createDate"].endswith("Z")


def test_query_database_backup_answers_zstack_types(sdk: Sdk, tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    row = sdk.ok("GET", "database-backups", q=f"uuid={rows['database']}")["inventories"][0]
    assert isinstance(row["metadata"], str)
    metadata = json.loads(row["metadata"])  # the seed's keys, createdTime in Unix ms as ZStack's
    assert metadata["name"] == "zstack" and metadata["version"] == "16" and metadata["md5"] == "0" * 32
    assert metadata["createdTime"] == int(datetime(2026, 3, 1, 2, 0, 5, tzinfo=UTC).timestamp() * 1000)
    assert_dates(row, "createDate", "lastOpDate")


def test_query_scheduler_job_history_execute_time_is_integer_ms(sdk: Sdk, tmp_path: Path) -> None:
    """SchedulerJobHistoryInventoryView: ``ExecuteTime int64``, ``StartTime time.Time``, ``Id int64``."""
    rows = _rows(tmp_path)
    history = sdk.ok("GET", "scheduler/jobhistories", q=f"id={rows['history']}")["inventories"][0]
    assert history["executeTime"] == int(rows["executed"].timestamp() * 1000)
    assert isinstance(history["executeTime"], int) and isinstance(history["id"], int)
    assert_dates(history, "startTime", "createDate")
    assert zstack_moment(history["startTime"]) == rows["executed"].replace(microsecond=0)


# -- errors in ZStack's shape -----------------------------------------------------------------------
def test_errors_have_zstack_shape(sdk: Sdk) -> None:
    error = sdk.error("GET", f"volume-backups/{models.new_uuid()}", None, 404)
    assert error["code"] == "NOT_FOUND"
    error = sdk.error("GET", "no/such/path", None, 404)
    assert error["code"] == "NOT_FOUND"
    error = sdk.error("POST", "scheduler/triggers", {"params": {"name": "t", "schedulerType": "sometimes"}}, 400)
    assert "schedulerType" in error["description"]
    anonymous = sdk.client.get("/zstack/v1/volume-backups")
    assert anonymous.status_code == 401 and set(anonymous.json()) == {"error"}, anonymous.text
    # InputGuard's refusals too, also of a body too deep to parse (the dialect reads it first)
    error = sdk.error("POST", "scheduler/triggers", {"params": {"name": "a\u0000b"}}, 400)
    assert error["code"] == "INVALID_ARGUMENT"
    for path in ("/zstack/v1/scheduler/jobgroups", f"/zstack/v1/backup-storage/{models.new_uuid()}/actions"):
        deep = b'{"params": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        headers = {"Authorization": f"OAuth {sdk.key}", "Content-Type": "application/json"}
        answer = sdk.client.request("POST" if "jobgroups" in path else "PUT", path, content=deep, headers=headers)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "INVALID_ARGUMENT", answer.text[:300]


# -- ZStack's own paths (api/routes/zstack_paths.py), each delegating to /v1's handler ---------------
def _registered(sdk: Sdk, tmp: Path) -> dict[str, Any]:
    """An ImageStore storage registered through ZStack's path, and the catalog rows of _rows."""
    body = {"params": {"name": "is-1", "url": f"file://{tmp}/is-1"}}
    storage = sdk.ok("POST", "backup-storage/image-store", body)["inventory"]
    return {"storage": storage, **_rows(tmp)}


def _accepted(sdk: Sdk, method: str, path: str, body: Any, action: str) -> None:
    """An async call: 202 with ``location`` under /zstack/v1 (the SDK polls it), a job queued."""
    status, answer = sdk.call(method, path, body)
    assert status == 202, (path, answer)
    assert "/zstack/v1/api-jobs/" in answer["location"], answer
    with db.session() as session:
        job = session.get(models.ApiJob, answer["jobUuid"])
        assert job is not None and job.action == action, (job and job.action, action)


def test_add_image_store_backup_storage_query_get_and_actions(sdk: Sdk, tmp_path: Path) -> None:
    made = _registered(sdk, tmp_path)
    storage = made["storage"]
    assert storage["type"] == "ImageStore"
    assert_dates(storage, "createDate", "lastOpDate")
    listed = sdk.ok("GET", "backup-storage/image-store")["inventories"]
    assert {s["type"] for s in listed} == {"ImageStore"} and storage["uuid"] in {s["uuid"] for s in listed}
    with db.session() as session:
        session.add(models.BackupStorage(name="remote", type="Remote", url="http://127.0.0.1:9/x"))
    assert {s["type"] for s in sdk.ok("GET", "backup-storage/image-store")["inventories"]} == {"ImageStore"}
    assert sdk.ok("GET", f"backup-storage/image-store/{storage['uuid']}")["inventories"][0]["uuid"] == storage["uuid"]
    # ReconnectImageStoreBackupStorage, also with the empty body the SDK sends
    for body in ({"reconnectImageStoreBackupStorage": {}}, {}):
        again = sdk.ok("PUT", f"backup-storage/image-store/{storage['uuid']}/actions", body)["inventory"]
        assert again["status"] == "Connected", again
    update = {"updateImageStoreBackupStorage": {"name": "renamed"}}
    assert (
        sdk.ok("PUT", f"backup-storage/image-store/{storage['uuid']}/actions", update)["inventory"]["name"] == "renamed"
    )
    _accepted(
        sdk,
        "PUT",
        f"backup-storage/image-store/{storage['uuid']}/actions",
        {"reclaimSpaceFromImageStore": {}},
        "reclaimSpaceFromImageStore",
    )
    error = sdk.error("PUT", f"backup-storage/image-store/{storage['uuid']}/actions", {"explode": {}}, 400)
    assert "explode" in error["description"]


def test_get_backup_storage_capacities(sdk: Sdk, tmp_path: Path) -> None:
    made = _registered(sdk, tmp_path)
    with db.session() as session:
        for row in session.scalars(select(models.BackupStorage)):
            row.totalCapacity, row.availableCapacity = 1000, 400
    answer = sdk.ok("GET", "backup-storage/capacities")
    assert answer["totalCapacity"] == 2000 and answer["availableCapacity"] == 800  # two storages
    one = sdk.ok("GET", "backup-storage/capacities", backupStorageUuids=made["storage"]["uuid"])
    assert (one["totalCapacity"], one["availableCapacity"]) == (1000, 400)
    assert isinstance(one["totalCapacity"], int)


def test_create_data_volume_from_volume_backup(sdk: Sdk, tmp_path: Path) -> None:
    """POST volumes/data-volume/from/volume-template/{backupUuid} {"params": {"name", ...}}."""
    made = _registered(sdk, tmp_path)
    path = f"volumes/data-volume/from/volume-template/{made['backup']}"
    _accepted(sdk, "POST", path, {"params": {"name": "restored"}}, "createDataVolumeFromVolumeBackup")
    error = sdk.error("POST", f"volumes/data-volume/from/volume-template/{models.new_uuid()}", {"params": {}}, 404)
    assert error["code"] == "NOT_FOUND"


@pytest.mark.parametrize("kind", ["volume-backups", "vm-backups", "database-backups"])
def test_sync_backups_from_an_image_store(sdk: Sdk, tmp_path: Path, kind: str) -> None:
    """SyncVolumeBackup / SyncVmBackup / SyncDatabaseBackup: PUT <kind>/imageStore/{bs}/actions,
    the named body or the empty one the SDK may send: the storage is scanned (an API job)."""
    made = _registered(sdk, tmp_path)
    name = {"volume-backups": "syncVolumeBackup", "vm-backups": "syncVmBackup"}.get(kind, "syncDatabaseBackup")
    path = f"{kind}/imageStore/{made['storage']['uuid']}/actions"
    _accepted(sdk, "PUT", path, {name: {}}, "scanBackupStorage")
    _accepted(sdk, "PUT", path, {}, "scanBackupStorage")
    assert "syncNothing" in sdk.error("PUT", path, {"syncNothing": {}}, 400)["description"]
    sdk.error("PUT", f"{kind}/imageStore/{models.new_uuid()}/actions", {name: {}}, 404)


def test_export_database_backup_from_backup_storage(sdk: Sdk, tmp_path: Path) -> None:
    made = _rows(tmp_path)
    with db.session() as session:
        row = session.get(models.DatabaseBackup, made["database"])
        assert row is not None
        storage = row.backupStorageRefs[0].backupStorageUuid
    path = f"database-backups/{made['database']}/backup-storage/{storage}/actions"
    answer = sdk.ok("PUT", path, {"exportDatabaseBackupFromBackupStorage": {}})
    assert answer["databaseBackupUrl"] == "zstore://r/d"
    error = sdk.error("PUT", f"database-backups/{made['database']}/backup-storage/{models.new_uuid()}/actions", {}, 404)
    assert "Ready copy" in error["description"]


def _group_job_trigger(sdk: Sdk, tmp: Path) -> tuple[str, str, str, str]:
    with db.session() as session:
        host = models.Host(name="h", status="Connected", lastHeartbeat=models.now() + timedelta(days=1))
        session.add(host)
        session.flush()
        path = tmp / "d.raw"
        path.write_bytes(b"\0" * 4096)
        volume = models.Volume(hostUuid=host.uuid, type="Data", installPath=str(path), size=4096)
        session.add(volume)
        session.flush()
        volume_uuid = volume.uuid
    group = sdk.ok("POST", "scheduler/jobgroups", {"params": {"name": "g", "type": "volumeBackup"}})["inventory"]
    job_body = {"params": {"name": "j", "type": "volumeBackup", "targetResourceUuid": volume_uuid}}
    job = sdk.ok("POST", "scheduler/jobs", job_body)["inventory"]
    trigger_body = {"params": {"name": "t", "schedulerType": "cron", "cron": "0 0 3 ? * 2-6"}}
    trigger = sdk.ok("POST", "scheduler/triggers", trigger_body)["inventory"]
    return group["uuid"], job["uuid"], trigger["uuid"], volume_uuid


def test_add_and_remove_scheduler_jobs_of_a_group(sdk: Sdk, tmp_path: Path) -> None:
    """POST scheduler/jobgroups/{g}/job {"params": {"schedulerJobUuids"}} (response key
    inventories: the group's job refs); DELETE the same path takes them out."""
    group, job, _trigger, _volume = _group_job_trigger(sdk, tmp_path)
    answer = sdk.ok("POST", f"scheduler/jobgroups/{group}/job", {"params": {"schedulerJobUuids": [job]}})
    assert answer["inventories"] == [{"schedulerJobGroupUuid": group, "schedulerJobUuid": job}]
    assert answer["inventory"]["jobsUuid"] == [job]
    removed = sdk.ok("DELETE", f"scheduler/jobgroups/{group}/job", schedulerJobUuids=job)
    assert removed["inventory"]["jobsUuid"] == []
    error = sdk.error("POST", f"scheduler/jobgroups/{group}/job", {"params": {"schedulerJobUuids": "x"}}, 400)
    assert "schedulerJobUuids" in error["description"]


def test_add_and_remove_a_group_on_a_trigger(sdk: Sdk, tmp_path: Path) -> None:
    group, _job, trigger, _volume = _group_job_trigger(sdk, tmp_path)
    path = f"scheduler/jobgroups/{group}/scheduler/triggers/{trigger}"
    attached = sdk.ok("POST", path, {"params": {}})["inventory"]
    assert attached["triggersUuid"] == [trigger] and isinstance(attached["jobData"], str)
    assert sdk.error("POST", path, {"params": {}}, 409)["code"]  # attached already
    sdk.ok("DELETE", path)
    assert sdk.ok("GET", f"scheduler/jobgroups/{group}")["inventories"][0].get("triggersUuid") in ([], None)
    sdk.error("DELETE", path, None, 404)


def test_query_scheduler_job_history_on_zstack_path(sdk: Sdk, tmp_path: Path) -> None:
    """GET scheduler/job/history (QuerySchedulerJobHistory) and .../{id} (the SDK's Get)."""
    made = _rows(tmp_path)
    rows = sdk.ok("GET", "scheduler/job/history", q=f"targetResourceUuid=x{made['backup'][1:]}")["inventories"]
    assert rows == []
    listed = sdk.ok("GET", "scheduler/job/history", replyWithCount="true")
    assert listed["total"] == 1 and isinstance(listed["inventories"][0]["executeTime"], int)
    one = sdk.ok("GET", f"scheduler/job/history/{made['history']}")["inventories"]
    assert [r["id"] for r in one] == [made["history"]]
    assert sdk.ok("GET", "scheduler/job/history/999999")["inventories"] == []
    assert sdk.ok("GET", "scheduler/job/history/abc")["inventories"] == []


def test_delete_tag(sdk: Sdk, tmp_path: Path) -> None:
    """DELETE tags/{uuid} (ZStack's DeleteTag): a user tag, a system tag (admin)."""
    made = _rows(tmp_path)
    with db.session() as session:
        vm = session.scalars(select(models.VmInstance)).one()
        system = models.Tag(resourceUuid=vm.uuid, resourceType="VmInstanceVO", tag="sys", type="system")
        session.add(system)
        session.flush()
        system_uuid = system.uuid
    body = {"params": {"resourceUuid": vm.uuid, "resourceType": "VmInstanceVO", "tag": "mine"}}
    user = sdk.ok("POST", "/v1/user-tags", body)["inventory"]
    for uuid in (user["uuid"], system_uuid):
        sdk.ok("DELETE", f"tags/{uuid}")
        sdk.error("DELETE", f"tags/{uuid}", None, 404)
    assert made["backup"]


# -- replies ZStack shapes differently --------------------------------------------------------------
def test_create_vm_backup_result_answers_inventories(sdk: Sdk, tmp_path: Path) -> None:
    """CreateVmBackupEventView: ``Inventories []VolumeBackupInventoryView`` (not /v1's
    ``{groupUuid, volumeBackups}``); a sync's result answers inventory and inventories."""
    made = _rows(tmp_path)
    backup = sdk.ok("GET", f"/v1/volume-backups/{made['backup']}")["inventories"][0]
    results = {
        "createVmBackup": {"groupUuid": backup["groupUuid"], "volumeBackups": [backup]},
        "syncVmBackupFromImageStoreBackupStorage": {"copied": 1, "inventories": [backup]},
    }
    with db.session() as session:
        jobs = {}
        for action, result in results.items():
            row = models.ApiJob(action=action, state="Succeeded", result=result, accountUuid=None)
            session.add(row)
            session.flush()
            jobs[action] = row.uuid
    answer = sdk.ok("GET", f"api-jobs/{jobs['createVmBackup']}")
    assert "inventory" not in answer and [b["uuid"] for b in answer["inventories"]] == [made["backup"]]
    assert isinstance(answer["inventories"][0]["metadata"], str)
    assert_dates(answer["inventories"][0], "createDate")
    synced = sdk.ok("GET", f"api-jobs/{jobs['syncVmBackupFromImageStoreBackupStorage']}")
    assert synced["inventory"]["uuid"] == made["backup"] and synced["inventories"][0]["uuid"] == made["backup"]
    v1 = sdk.ok("GET", f"/v1/api-jobs/{jobs['createVmBackup']}")["inventory"]
    assert v1["groupUuid"] == backup["groupUuid"]  # /v1 keeps its shape


@pytest.mark.parametrize("body", [{}, None, {"reconnectBackupStorage": None}])
def test_reconnect_backup_storage_with_the_empty_body_the_sdk_sends(sdk: Sdk, tmp_path: Path, body: Any) -> None:
    """ReconnectBackupStorage: PUT backup-storage/{uuid}/actions, the body empty (or the
    action's parameters null): the path names the action."""
    storage = _registered(sdk, tmp_path)["storage"]
    answer = sdk.ok("PUT", f"backup-storage/{storage['uuid']}/actions", body)["inventory"]
    assert answer["uuid"] == storage["uuid"] and answer["status"] == "Connected"
    status, v1 = sdk.call("PUT", f"/v1/backup-storage/{storage['uuid']}/actions", {})
    assert status == 400 and v1["success"] is False  # /v1 still wants the action named


def test_the_wire_reads_string_parameters_and_answers_zstack_types(sdk: Sdk, tmp_path: Path) -> None:
    """CreateSchedulerJobGroup on the wire with ZStack's Map<String, String> parameters: the
    event's inventory has jobData as a JSON string; a bad value is the wire's 400."""
    storage = _storage(tmp_path)
    message = "org.zstack.scheduler.APICreateSchedulerJobGroupMsg"
    params = {
        "name": "g",
        "type": "volumeBackup",
        "parameters": {"backupStorageUuids": storage, "fullBackupInterval": "2"},
    }
    started = sdk.client.post("/zstack/api/", json={message: {**params, "session": {"uuid": sdk.key}}}).json()
    result = sdk.client.get(f"/zstack/api/result/{started['uuid']}").json()
    assert result["state"] == "Done", result
    event = json.loads(result["result"])["org.zstack.scheduler.APICreateSchedulerJobGroupEvent"]
    assert json.loads(event["inventory"]["jobData"]) == {"backupStorageUuids": [storage], "fullBackupInterval": 2}
    assert ZSTACK_DATE.fullmatch(event["inventory"]["createDate"])
    bad = {**params, "parameters": {"fullBackupInterval": "two"}, "session": {"uuid": sdk.key}}
    answer = sdk.client.post("/zstack/api/", json={message: bad})
    assert answer.status_code == 400 and "fullBackupInterval" in answer.json()["error"]["description"]


def test_the_cli_takes_trigger_times_in_seconds(sdk: Sdk, monkeypatch: pytest.MonkeyPatch) -> None:
    """``blockvault trigger create --start/--stop`` in Unix seconds; a time out of range (a
    negative one, one in milliseconds) is one line and exit 2, before any request."""
    from click.testing import CliRunner

    from api.cli import resources
    from api.client import Client

    def client() -> Client:
        made = Client("http://testserver", sdk.key)
        made.http = sdk.client
        sdk.client.headers["Authorization"] = f"Bearer {sdk.key}"
        return made

    monkeypatch.setattr(resources, "_client", client)
    start = int(time.time()) + 600
    args = ["create", "--name", "cli", "--interval", "60", "--start", str(start), "--stop", str(start + 60)]
    run = CliRunner().invoke(resources.trigger, [*args, "--json"])
    assert run.exit_code == 0, run.output
    made = json.loads(run.output)
    assert (made["startTime"], made["stopTime"]) == (start, start + 60)
    for bad in ("-1", str(start * 1000)):
        run = CliRunner().invoke(resources.trigger, ["create", "--name", "x", "--interval", "60", "--start", bad])
        assert run.exit_code == 2 and "--start" in run.output, run.output
    run = CliRunner().invoke(resources.trigger, ["create", "--name", "x", "--cron", "0 0 2 * * MON"])
    assert run.exit_code != 0 and len(run.output.strip().splitlines()) == 1 and "cron" in run.output, run.output
