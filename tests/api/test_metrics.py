"""``GET /metrics`` (the app in process, on SQLite and on PostgreSQL): exact values from known
catalog rows, who may scrape, a broker or catalog that does not answer, and the Grafana
dashboard naming only metrics the collector exports."""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from api.app import create_app
from shared import celery_app as tasks
from shared.catalog import db
from shared.catalog.models import (
    Account,
    ApiJob,
    BackupStorage,
    Host,
    SchedulerJob,
    SchedulerJobGroup,
    SchedulerJobGroupTriggerRef,
    SchedulerTrigger,
    VerifyCursor,
    Volume,
    VolumeBackup,
    VolumeBackupStorageRef,
)
from shared.celery_app import celery_app, host_queue
from shared.config import get_settings
from shared.metrics import CatalogCollector, registry
from tests.api.test_accounts import Api
from tests.service.conftest import free_port
from tests.services import MakePgDatabase

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "blockvault-dashboard.json"
T = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)  # the collector's "now" in the exact-value test
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _reset() -> None:
    get_settings.cache_clear()
    celery_app.cache_clear()  # the broker follows this test's settings
    db.reset()


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    for name in list(os.environ):
        if name.startswith("BLOCKVAULT_"):
            monkeypatch.delenv(name)
    if request.param == "postgresql":
        url = cast(MakePgDatabase, request.getfixturevalue("make_pg_database"))()
        monkeypatch.setenv("BLOCKVAULT_DATABASE_URL", url)
    else:
        url = f"sqlite:///{tmp_path / 'data' / 'catalog.db'}"
    admin_key = "test-admin-" + secrets.token_hex(12)
    monkeypatch.setenv("BLOCKVAULT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BLOCKVAULT_ADMIN_API_KEY", admin_key)
    monkeypatch.setenv("BLOCKVAULT_AUTH_MAX_FAILURES", "5")
    _reset()
    try:
        with TestClient(create_app()) as client:
            yield Api(client, admin_key, url, tmp_path / "data")
    finally:
        db.engine(url).dispose()
        _reset()


def scrape(api: Api, key: str | None = "admin") -> tuple[int, Samples, dict[str, str]]:
    """Status, every sample by (name, labels), and each family's type."""
    headers = {"Authorization": f"Bearer {api.admin_key if key == 'admin' else key}"} if key else {}
    response = api.client.get("/metrics", headers=headers)
    if response.status_code != 200:
        return response.status_code, {}, {}
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return 200, samples, types


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


# -- the catalog of the exact-value test -------------------------------------------------------------
def backup(
    volume: str, mode: str, status: str, size: int, age: timedelta, refs: dict[str, str], **fields: Any
) -> VolumeBackup:
    row = VolumeBackup(
        volumeUuid=volume, mode=mode, status=status, size=size, createDate=T - age, lastOpDate=T - age, **fields
    )
    row.backupStorageRefs = [VolumeBackupStorageRef(backupStorageUuid=s, status=st) for s, st in refs.items()]
    return row


def stats(read: int, written: int, chunks: int, new: int) -> dict[str, int]:
    return {"bytesRead": read, "bytesWritten": written, "chunks": chunks, "newChunks": new}


def job(action: str, state: str, seconds: float) -> ApiJob:
    start = T - timedelta(hours=5)
    return ApiJob(action=action, state=state, createDate=start, lastOpDate=start + timedelta(seconds=seconds))


def storage(uuid: str, name: str, kind: str, role: str, **fields: Any) -> BackupStorage:
    fields.setdefault("totalCapacity", 1000 if kind == "ImageStore" else 0)
    return BackupStorage(uuid=uuid, name=name, type=kind, role=role, url=f"file:///{name}", **fields)


def populate() -> dict[str, str]:
    ids = {name: secrets.token_hex(16) for name in ("h1", "h2", "v1", "v2", "v3", "M", "S", "R", "G", "J")}
    m, s, r, j, v1, v2 = ids["M"], ids["S"], ids["R"], ids["J"], ids["v1"], ids["v2"]
    hour, everywhere = timedelta(hours=1), dict.fromkeys((m, r, s), "Ready")
    with db.session() as session:
        session.add_all(
            [
                Host(uuid=ids["h1"], name="host-1", status="Connected", lastHeartbeat=T - timedelta(seconds=5)),
                Host(uuid=ids["h2"], name="host-2", status="Disconnected", lastHeartbeat=None),
            ]
        )
        session.flush()
        session.add_all(
            [
                Volume(uuid=v1, name="vol-1", hostUuid=ids["h1"], installPath="/v1"),
                Volume(uuid=v2, name="vol-2", hostUuid=ids["h1"], installPath="/v2"),
                Volume(uuid=ids["v3"], name='vol "3"\\', hostUuid=ids["h2"], installPath="/v3"),  # escaped labels
                storage(m, "master", "ImageStore", "master", availableCapacity=400),
                storage(s, "standby", "ImageStore", "standby", status="Disconnected", availableCapacity=900),
                storage(r, "remote", "Remote", "master"),
                SchedulerJobGroup(
                    uuid=ids["G"], name="g", jobType="volumeBackup", jobData={"backupStorageUuids": [m, r]}
                ),
            ]
        )
        session.flush()
        session.add(SchedulerJob(uuid=j, schedulerJobGroupUuid=ids["G"], targetResourceUuid=v2))
        daily = SchedulerTrigger(name="daily", schedulerType="simple", schedulerInterval=86400)
        session.add(daily)
        session.flush()
        session.add(SchedulerJobGroupTriggerRef(schedulerJobGroupUuid=ids["G"], schedulerTriggerUuid=daily.uuid))
        session.add_all(
            [
                backup(v1, "full", "Ready", 100, 3 * hour, {m: "Ready", s: "Ready"}, **stats(80, 50, 10, 6)),
                backup(v1, "incremental", "Ready", 100, 2 * hour, {m: "Ready"}, **stats(20, 10, 10, 2)),
                backup(v2, "full", "Ready", 200, hour, {m: "Ready"}, schedulerJobUuid=j),  # no stats: an older row
                backup(v2, "full", "Failed", 200, hour / 2, {m: "Failed"}),
                backup(v1, "full", "Creating", 100, hour / 60, {m: "Creating"}),
                backup(v2, "incremental", "Ready", 300, hour / 6, everywhere, schedulerJobUuid=j, **stats(5, 3, 20, 1)),
                job("createVolumeBackup", "Succeeded", 3),
                job("createVolumeBackup", "Succeeded", 100),
                job("createVolumeBackup", "Failed", 0.5),
                job("schedulerJob", "Succeeded", 4000),
                job("createVolumeBackup", "Running", 10),
                job("createVmBackup", "Pending", 1),
                # two verify jobs' cursors on the master: their counters add up per storage
                VerifyCursor(
                    schedulerJobUuid=ids["J"], backupStorageUuid=m, cycle=3, damagedChunks=5, repairedChunks=4
                ),
                VerifyCursor(
                    schedulerJobUuid=ids["G"], backupStorageUuid=m, cycle=1, damagedChunks=2, repairedChunks=0
                ),
            ]
        )
    return ids


def test_metrics_are_exact_aggregates_of_the_catalog(api: Api) -> None:
    ids = populate()
    for _ in range(2):  # two messages wait for host 1's worker
        celery_app().send_task(tasks.VOLUME_BACKUP, args=["x"], queue=host_queue(ids["h1"]))
    api.client.app.state.metrics_registry = registry(CatalogCollector(clock=lambda: T))  # type: ignore[attr-defined]
    status, samples, types = scrape(api)
    assert status == 200

    counts = series(samples, "blockvault_volume_backups")
    assert {k: v for k, v in counts.items() if v} == {
        frozenset({("mode", "full"), ("status", "Ready")}): 2,
        frozenset({("mode", "incremental"), ("status", "Ready")}): 2,
        frozenset({("mode", "full"), ("status", "Failed")}): 1,
        frozenset({("mode", "full"), ("status", "Creating")}): 1,
    }
    assert len(counts) == 8  # every mode and status, 0 when none
    for name, full, incremental in (
        ("blockvault_volume_backup_size_bytes", 300, 400),
        ("blockvault_volume_backup_read_bytes", 80, 25),
        ("blockvault_volume_backup_written_bytes", 50, 13),
    ):
        assert (value(samples, name, mode="full"), value(samples, name, mode="incremental")) == (full, incremental)
    chunks = "blockvault_volume_backup_chunks"
    assert value(samples, chunks, mode="full", kind="new") == 6
    assert value(samples, chunks, mode="full", kind="deduplicated") == 4
    assert value(samples, chunks, mode="incremental", kind="new") == 3
    assert value(samples, chunks, mode="incremental", kind="deduplicated") == 8 + 19

    last = "blockvault_volume_last_backup_timestamp_seconds"
    hours_ago = [(T - timedelta(hours=h)).timestamp() for h in (2, 1 / 6)]
    assert value(samples, last, volume=ids["v1"], name="vol-1", host=ids["h1"]) == hours_ago[0]
    assert value(samples, last, volume=ids["v2"], name="vol-2", host=ids["h1"]) == hours_ago[1]
    assert value(samples, last, volume=ids["v3"], name='vol "3"\\', host=ids["h2"]) == 0
    # only v2 is on a schedule (the group's daily trigger)
    interval = "blockvault_volume_backup_interval_seconds"
    assert series(samples, interval) == {
        frozenset({("volume", ids["v2"]), ("name", "vol-2"), ("host", ids["h1"])}): 86400
    }

    # the standby lacks b2 and b3 (copies on the master); the group's remote target lacks b3
    described = {"M": ("master", "ImageStore", "master"), "S": ("standby", "ImageStore", "standby")}
    described["R"] = ("remote", "Remote", "master")

    def labels(key: str) -> dict[str, str]:
        name, kind, role = described[key]
        return {"storage": ids[key], "name": name, "type": kind, "role": role}

    assert value(samples, "blockvault_storage_sync_lag_backups", **labels("S")) == 2
    assert value(samples, "blockvault_storage_sync_lag_seconds", **labels("S")) == pytest.approx(7200)
    assert value(samples, "blockvault_storage_sync_lag_backups", **labels("R")) == 1
    assert value(samples, "blockvault_storage_sync_lag_seconds", **labels("R")) == pytest.approx(3600)
    assert len(series(samples, "blockvault_storage_sync_lag_backups")) == 2  # the master is no sync target
    assert value(samples, "blockvault_storage_total_bytes", **labels("M")) == 1000
    assert value(samples, "blockvault_verify_damaged_chunks_total", storage=ids["M"]) == 7
    assert value(samples, "blockvault_verify_repaired_chunks_total", storage=ids["M"]) == 4
    assert value(samples, "blockvault_verify_cycles_total", storage=ids["M"]) == 4
    assert len(series(samples, "blockvault_verify_damaged_chunks_total")) == 1  # storages never verified: none
    assert value(samples, "blockvault_storage_available_bytes", **labels("M")) == 400
    assert value(samples, "blockvault_storage_available_bytes", **labels("S")) == 900
    assert value(samples, "blockvault_storage_connected", **labels("M")) == 1
    assert value(samples, "blockvault_storage_connected", **labels("S")) == 0

    assert value(samples, "blockvault_host_connected", host=ids["h1"], name="host-1") == 1
    assert value(samples, "blockvault_host_connected", host=ids["h2"], name="host-2") == 0
    heartbeat = "blockvault_host_last_heartbeat_timestamp_seconds"
    assert value(samples, heartbeat, host=ids["h1"], name="host-1") == (T - timedelta(seconds=5)).timestamp()
    assert value(samples, heartbeat, host=ids["h2"], name="host-2") == 0

    assert types["blockvault_job_duration_seconds"] == "histogram"
    ok = {"action": "createVolumeBackup", "state": "Succeeded"}
    buckets = {le: value(samples, "blockvault_job_duration_seconds_bucket", **ok, le=le) for le in ("1.0", "5.0")}
    assert buckets == {"1.0": 0, "5.0": 1}
    assert value(samples, "blockvault_job_duration_seconds_bucket", **ok, le="300.0") == 2
    assert value(samples, "blockvault_job_duration_seconds_bucket", **ok, le="+Inf") == 2
    assert value(samples, "blockvault_job_duration_seconds_count", **ok) == 2
    assert value(samples, "blockvault_job_duration_seconds_sum", **ok) == pytest.approx(103, abs=1e-3)
    failed = {"action": "createVolumeBackup", "state": "Failed"}
    assert value(samples, "blockvault_job_duration_seconds_bucket", **failed, le="1.0") == 1
    assert value(samples, "blockvault_job_duration_seconds_sum", **failed) == pytest.approx(0.5, abs=1e-3)
    scheduled = {"action": "schedulerJob", "state": "Succeeded"}
    assert value(samples, "blockvault_job_duration_seconds_bucket", **scheduled, le="3600.0") == 0
    assert value(samples, "blockvault_job_duration_seconds_bucket", **scheduled, le="+Inf") == 1
    states = {dict(k)["state"] for k in series(samples, "blockvault_job_duration_seconds_count")}
    assert states == {"Succeeded", "Failed"}
    in_progress = series(samples, "blockvault_jobs_in_progress")
    assert in_progress == {
        frozenset({("action", "createVolumeBackup"), ("state", "Running")}): 1,
        frozenset({("action", "createVmBackup"), ("state", "Pending")}): 1,
    }

    assert series(samples, "blockvault_queue_depth") == {
        frozenset({("queue", "storage")}): 0,
        frozenset({("queue", host_queue(ids["h1"]))}): 2,
        frozenset({("queue", host_queue(ids["h2"]))}): 0,
    }
    assert value(samples, "blockvault_catalog_up") == 1 and value(samples, "blockvault_broker_up") == 1
    assert 0 < value(samples, "blockvault_scrape_duration_seconds") < 30

    # the dashboard plots only what a scrape shows, and every metric a scrape shows
    exported = {name for name, _labels in samples}
    used = dashboard_metric_names()
    assert used and not used - exported, sorted(used - exported)
    family = {name: re.sub(r"_(bucket|count|sum|total)$", "", name) for name in used}  # a sample's family
    plotted = {family[name] for name in used if family[name] in types} | used
    assert not set(types) - plotted, sorted(set(types) - plotted)


def dashboard_metric_names() -> set[str]:
    board = json.loads(DASHBOARD.read_text())
    assert board["__inputs"][0]["pluginId"] == "prometheus" and board["schemaVersion"] >= 36
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
                exprs.append(target["expr"])

    walk(board["panels"])
    return {name for expr in exprs for name in re.findall(r"\bblockvault_[a-z_]+", expr)}


def test_who_may_scrape(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    status, body = api.client.get("/metrics").status_code, api.client.get("/metrics").json()
    assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
    assert scrape(api, "bv_wrong_" + secrets.token_hex(8))[0] == 401
    _account, member_key = api.account_with_key("viewer")
    response = api.client.get("/metrics", headers={"Authorization": f"Bearer {member_key}"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "FORBIDDEN"
    assert scrape(api)[0] == 200  # BLOCKVAULT_ADMIN_API_KEY
    with db.session() as session:  # another admin key, checked in the catalog
        admin = session.scalars(select(Account).where(Account.name == "admin")).one().uuid
    other = api.ok("POST", "/api-keys", accountUuid=admin, name="prometheus")["inventory"]["key"]
    assert scrape(api, other)[0] == 200
    assert "/metrics" not in api.client.get("/openapi.json").json()["paths"]  # never fuzzed, never documented

    monkeypatch.setenv("BLOCKVAULT_METRICS_PUBLIC", "true")
    get_settings.cache_clear()
    status, samples, _types = scrape(api, None)
    assert status == 200 and value(samples, "blockvault_catalog_up") == 1


def test_lockout_applies_to_metrics(api: Api) -> None:
    for _ in range(5):
        assert scrape(api, "bv_guess_" + secrets.token_hex(8))[0] == 401
    response = api.client.get("/metrics", headers={"Authorization": f"Bearer {api.admin_key}"})
    assert response.status_code == 429  # the right key too, while locked out


def test_broker_down_still_answers(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    populate()
    monkeypatch.setenv("BLOCKVAULT_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    get_settings.cache_clear()
    celery_app.cache_clear()
    status, samples, types = scrape(api)
    assert status == 200
    assert value(samples, "blockvault_broker_up") == 0 and value(samples, "blockvault_catalog_up") == 1
    assert "blockvault_queue_depth" not in types
    assert value(samples, "blockvault_volume_backups", mode="full", status="Ready") == 2


def test_catalog_down_still_answers() -> None:
    url = f"postgresql+psycopg2://nobody@127.0.0.1:{free_port()}/none"  # nothing listens
    collector = CatalogCollector(url=url, depths=lambda _queues: None)
    try:
        families = {family.name: family for family in collector.collect()}
    finally:
        db.engine(url).dispose()
    assert families["blockvault_catalog_up"].samples[0].value == 0
    assert families["blockvault_broker_up"].samples[0].value == 0
    assert "blockvault_volume_backups" not in families and "blockvault_scrape_duration_seconds" in families
