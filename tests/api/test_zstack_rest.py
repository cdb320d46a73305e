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
        ("startTime", int(time.time() * 1000)),  # milliseconds sent by mistake: year 50000+
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
            name="db", status="Ready", size=1, metadata_={"name": "zstack", "version": "16", "md5": "0" * 32}
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
    assert isinstance(row["metadata"], str) and json.loads(row["metadata"])["name"] == "zstack"
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
    # InputGuard's refusals too
    error = sdk.error("POST", "scheduler/triggers", {"params": {"name": "a\u0000b"}}, 400)
    assert error["code"] == "INVALID_ARGUMENT"
