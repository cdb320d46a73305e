"""``GET /v1/overview`` and ``GET /v1/scheduler/triggers/{uuid}/fire-times`` on a real
PostgreSQL catalog, rows written straight into it: each VM's status (ok, overdue by its group's
trigger, failed after its last good backup, none), which copies are current, the failures of the
last hours with their reason, the storage's sync lag, a member's view, and bad input."""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from shared import schedule
from shared.catalog import db
from shared.catalog.models import (
    ApiJob,
    BackupStorage,
    Host,
    Project,
    SchedulerJob,
    SchedulerJobGroup,
    SchedulerJobGroupTriggerRef,
    SchedulerJobHistory,
    SchedulerTrigger,
    VmInstance,
    Volume,
    VolumeBackup,
    VolumeBackupStorageRef,
    aware,
    new_uuid,
    now,
)
from shared.inventory import iso
from shared.schedule import TriggerSpec, fire_times_after, from_seconds, to_seconds
from shared.service import overview
from shared.service.jobgroups import trigger_spec
from tests.api.conftest import app_client

Row = dict[str, Any]


@pytest.fixture
def api(pg_database: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, str]]:
    key = "test-admin-" + secrets.token_hex(12)
    with app_client(monkeypatch, {"DATABASE_URL": pg_database, "ADMIN_API_KEY": key}) as client:
        yield client, key


@pytest.fixture(params=["sqlite", "postgresql"])
def any_api(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, str]]:
    """The API on SQLite (the embedded default) and on PostgreSQL: the VM statuses are decided in
    SQL, which both must read alike."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.db'}"
        db.migrate(url)
    else:
        url = request.getfixturevalue("pg_database")
    key = "test-admin-" + secrets.token_hex(12)
    with app_client(monkeypatch, {"DATABASE_URL": url, "ADMIN_API_KEY": key}) as client:
        yield client, key


def get(client: TestClient, key: str, path: str, **query: Any) -> tuple[int, Row]:
    response = client.get(path, headers={"Authorization": f"Bearer {key}"}, params=query)
    return response.status_code, response.json()


def build(tmp: Path) -> Row:
    """Four VMs in two projects on one host; a master, a standby and a remote storage."""
    moment = now()
    ids: Row = {}
    with db.session() as session:
        host = Host(name="h1", status="Connected", lastHeartbeat=moment, volumeRoots=[str(tmp)])
        master = BackupStorage(name="master", url="file:///m", role="master")
        standby = BackupStorage(name="standby", url="file:///s", role="standby")
        remote = BackupStorage(name="remote", type="Remote", url="http://127.0.0.1:9/r")
        projects = [Project(name="a"), Project(name="b")]
        session.add_all([host, master, standby, remote, *projects])
        session.flush()
        ids.update(host=host.uuid, master=master.uuid, standby=standby.uuid, remote=remote.uuid)
        ids["projects"] = [p.uuid for p in projects]

        def vm(name: str, project: str) -> tuple[str, str]:
            row = VmInstance(name=name, hostUuid=host.uuid, projectUuid=project)
            session.add(row)
            session.flush()
            volume = Volume(
                name=f"{name}-root", hostUuid=host.uuid, vmInstanceUuid=row.uuid, type="Root", installPath=f"/{name}"
            )
            session.add(volume)
            session.flush()
            return row.uuid, volume.uuid

        def backup(volume: str, age: timedelta, status: str = "Ready", copies: tuple[str, ...] = ()) -> str:
            row = VolumeBackup(
                name="b", volumeUuid=volume, status=status, size=100, mode="full", createDate=moment - age
            )
            session.add(row)
            session.flush()
            for storage in copies:
                session.add(
                    VolumeBackupStorageRef(volumeBackupUuid=row.uuid, backupStorageUuid=storage, status="Ready")
                )
            return row.uuid

        a_project, b_project = ids["projects"]
        ids["ok"] = vm("ok-vm", a_project)
        ids["old"] = backup(ids["ok"][1], timedelta(days=2), copies=(master.uuid, standby.uuid, remote.uuid))
        ids["new"] = backup(ids["ok"][1], timedelta(minutes=5), copies=(master.uuid, standby.uuid))
        ids["overdue"] = vm("overdue-vm", a_project)
        backup(ids["overdue"][1], timedelta(hours=5), copies=(master.uuid,))
        ids["failed"] = vm("failed-vm", b_project)
        backup(ids["failed"][1], timedelta(hours=3), copies=(master.uuid,))
        backup(ids["failed"][1], timedelta(hours=1), status="Failed")
        ids["none"] = vm("none-vm", b_project)

        # the overdue VM's group fires hourly since yesterday: its 5-hour-old backup is overdue
        group = SchedulerJobGroup(name="g", jobType="vmBackup", projectUuid=a_project)
        trigger = SchedulerTrigger(
            name="hourly", schedulerType="simple", schedulerInterval=3600, createDate=moment - timedelta(days=1)
        )
        session.add_all([group, trigger])
        session.flush()
        session.add(SchedulerJob(schedulerJobGroupUuid=group.uuid, targetResourceUuid=ids["overdue"][0]))
        session.add(SchedulerJobGroupTriggerRef(schedulerJobGroupUuid=group.uuid, schedulerTriggerUuid=trigger.uuid))
        ids["trigger"] = trigger.uuid
        session.add(
            SchedulerJobHistory(
                executeTime=moment - timedelta(hours=2),
                success=False,
                resultDump='{"error": {"code": "HOST_DISCONNECTED", "description": "host h1 is gone"}}',
                schedulerJobGroupUuid=group.uuid,
                targetResourceUuid=ids["overdue"][0],
            )
        )
        session.add(
            ApiJob(
                action="createVmBackup",
                state="Failed",
                error={"code": "VOLUME_ERROR", "description": "cannot read /failed-vm"},
                lastOpDate=moment - timedelta(hours=1),
            )
        )
        session.add(ApiJob(action="createVmBackup", state="Running", progress=42))
        session.add(ApiJob(action="old failure", state="Failed", lastOpDate=moment - timedelta(days=2)))
    return ids


def by_name(body: Row) -> dict[str, Row]:
    return {vm["name"]: vm for vm in body["vmInstances"]}


def test_overview_statuses_copies_failures_and_lag(api: tuple[TestClient, str], tmp_path: Path) -> None:
    client, key = api
    ids = build(tmp_path)
    status, body = get(client, key, "/v1/overview")
    assert status == 200, body
    vms = by_name(body)
    assert {name: vm["status"] for name, vm in vms.items()} == {
        "failed-vm": "failed",
        "none-vm": "none",
        "ok-vm": "ok",
        "overdue-vm": "failed",  # its last scheduled run failed after its last good backup
    }
    ok = vms["ok-vm"]
    assert ok["lastBackup"]["uuid"] == ids["new"] and ok["lastBackup"]["size"] == 100
    assert 290 <= ok["lastBackup"]["ageSeconds"] <= 400
    assert ok["copies"] == {"standby": True, "remote": False}  # only the older backup went to the remote
    assert vms["overdue-vm"]["overdue"] and vms["overdue-vm"]["scheduled"]
    assert not ok["overdue"] and not ok["scheduled"]
    assert vms["none-vm"]["lastBackup"] is None
    # a grace longer than the backup's age: not overdue any more
    assert by_name(get(client, key, "/v1/overview", graceSeconds=6 * 3600)[1])["overdue-vm"]["overdue"] is False

    reasons = {(f["source"], f["code"], f["reason"]) for f in body["failures"]}
    assert reasons == {
        ("jobHistory", "HOST_DISCONNECTED", "host h1 is gone"),
        ("apiJob", "VOLUME_ERROR", "cannot read /failed-vm"),
    }  # the failure of two days ago is past the 24 hours
    assert [(j["action"], j["progress"]) for j in body["runningJobs"]] == [("createVmBackup", 42)]
    assert [h["status"] for h in body["hosts"]] == ["Connected"]
    lag = {s["name"]: s["syncLag"] for s in body["backupStorage"]}
    assert lag["master"] is None
    assert lag["standby"] == {"missingBackups": 0, "atLeast": False, "seconds": 0}  # it holds the newest
    # the remote holds the two-day-old backup only: the three newer ones wait, the oldest for 5 h
    assert lag["remote"]["missingBackups"] == 3 and 5 * 3600 - 60 <= lag["remote"]["seconds"] <= 5 * 3600 + 60


def test_overdue_without_failure_and_the_members_view(api: tuple[TestClient, str], tmp_path: Path) -> None:
    client, key = api
    ids = build(tmp_path)
    with db.session() as session:
        session.query(SchedulerJobHistory).delete()
    assert by_name(get(client, key, "/v1/overview")[1])["overdue-vm"]["status"] == "overdue"

    member = client.post(
        "/v1/accounts", headers={"Authorization": f"Bearer {key}"}, json={"params": {"name": "m"}}
    ).json()["inventory"]
    headers = {"Authorization": f"Bearer {key}"}
    client.post(
        f"/v1/projects/{ids['projects'][0]}/members", headers=headers, json={"params": {"accountUuid": member["uuid"]}}
    )
    member_key = client.post("/v1/api-keys", headers=headers, json={"params": {"accountUuid": member["uuid"]}}).json()[
        "inventory"
    ]["key"]
    status, body = get(client, member_key, "/v1/overview")
    assert status == 200
    assert sorted(by_name(body)) == ["ok-vm", "overdue-vm"]
    assert body["hosts"] == [] and body["runningJobs"] == [] and body["failures"] == []
    assert {s["name"] for s in body["backupStorage"]} == {"master", "standby"}  # ImageStore only
    assert by_name(body)["ok-vm"]["copies"] == {"standby": True}
    text = str(body)
    assert ids["failed"][0] not in text and ids["remote"] not in text


def test_a_failed_run_of_a_volume_fails_its_vm_in_the_vm_row(api: tuple[TestClient, str], tmp_path: Path) -> None:
    """The failed runs are read folded into each VM's row: a run of a VM's volume counts for the
    VM (its time is the VM's last failure), a run of a detached volume for no VM."""
    client, key = api
    ids = build(tmp_path)
    moment = now()
    with db.session() as session:
        group = SchedulerJobGroup(name="volumes", jobType="volumeBackup", projectUuid=ids["projects"][0])
        detached = Volume(name="loose", hostUuid=ids["host"], type="Data", installPath="/loose")
        session.add_all([group, detached])
        session.flush()
        for target, age in ((ids["ok"][1], timedelta(minutes=2)), (detached.uuid, timedelta(minutes=1))):
            session.add(
                SchedulerJobHistory(
                    executeTime=moment - age,
                    success=False,
                    resultDump='{"error": {"code": "VOLUME_ERROR", "description": "cannot read"}}',
                    schedulerJobGroupUuid=group.uuid,
                    targetResourceUuid=target,
                )
            )
    status, body = get(client, key, "/v1/overview")
    assert status == 200, body
    ok = by_name(body)["ok-vm"]
    assert ok["status"] == "failed"  # its root volume's run failed after its 5-minute-old backup
    assert abs(datetime.fromisoformat(ok["lastFailure"]) - (moment - timedelta(minutes=2))) < timedelta(seconds=1)
    assert body["vmCounts"] == {"ok": 0, "overdue": 0, "failed": 3, "none": 1}
    assert {row["uuid"] for row in body["vmInstances"]} == {ids[n][0] for n in ("ok", "overdue", "failed", "none")}


def _aged(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of two requests compared: a backup's age is taken when each answer is made, so it
    may differ by the seconds between them; the rows without it, and the ages apart."""
    bare, ages = [], []
    for row in rows:
        last = row.get("lastBackup")
        ages.append(last["ageSeconds"] if last else -1)
        bare.append({**row, "lastBackup": {**last, "ageSeconds": None}} if last else row)
    return bare, ages


def test_the_vm_list_in_pages_with_filters_and_counts(api: tuple[TestClient, str], tmp_path: Path) -> None:
    """limit/start page the VM list (by name), status and q select from it; vmCounts count every
    VM the caller sees whatever the selection, vmTotal the VMs selected; a page holds the same
    rows as the whole list; a member's counts are its projects' VMs only."""
    client, key = api
    ids = build(tmp_path)
    whole = get(client, key, "/v1/overview")[1]
    assert whole["vmTotal"] == 4 and whole["vmCounts"] == {"ok": 1, "overdue": 0, "failed": 2, "none": 1}
    names = [vm["name"] for vm in whole["vmInstances"]]
    assert names == sorted(names)
    pages = [get(client, key, "/v1/overview", limit=3, start=start)[1] for start in (0, 3, 6)]
    assert [[vm["name"] for vm in page["vmInstances"]] for page in pages] == [names[:3], names[3:], []]
    assert all(page["vmTotal"] == 4 and page["vmCounts"] == whole["vmCounts"] for page in pages)
    (page_rows, page_ages), (whole_rows, whole_ages) = _aged(pages[0]["vmInstances"]), _aged(whole["vmInstances"][:3])
    assert page_rows == whole_rows  # the same rows, details and all
    assert all(0 <= later - earlier <= 60 for earlier, later in zip(whole_ages, page_ages, strict=True))

    failed = get(client, key, "/v1/overview", status="failed")[1]
    assert sorted(by_name(failed)) == ["failed-vm", "overdue-vm"] and failed["vmTotal"] == 2
    assert failed["vmCounts"] == whole["vmCounts"]
    assert sorted(by_name(get(client, key, "/v1/overview", q="OVER")[1])) == ["overdue-vm"]  # any case
    assert sorted(by_name(get(client, key, "/v1/overview", q=ids["ok"][0][:8])[1])) == ["ok-vm"]  # a uuid's start
    nothing = get(client, key, "/v1/overview", q="ok", status="none")[1]
    assert nothing["vmInstances"] == [] and nothing["vmTotal"] == 0

    for name, bad in (("limit", "0"), ("limit", "1001"), ("limit", "x"), ("start", "-1"), ("status", "good")):
        status, body = get(client, key, "/v1/overview", **{name: bad})
        assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT" and name in body["error"]["description"]
    assert get(client, key, "/v1/overview", q="x" * 256)[0] == 400

    headers = {"Authorization": f"Bearer {key}"}
    member = client.post("/v1/accounts", headers=headers, json={"params": {"name": "m"}}).json()["inventory"]
    client.post(
        f"/v1/projects/{ids['projects'][1]}/members", headers=headers, json={"params": {"accountUuid": member["uuid"]}}
    )
    member_key = client.post("/v1/api-keys", headers=headers, json={"params": {"accountUuid": member["uuid"]}}).json()[
        "inventory"
    ]["key"]
    seen = get(client, member_key, "/v1/overview", limit=1)[1]
    assert seen["vmTotal"] == 2 and seen["vmCounts"] == {"ok": 0, "overdue": 0, "failed": 1, "none": 1}
    assert [vm["name"] for vm in seen["vmInstances"]] == ["failed-vm"]
    assert get(client, member_key, "/v1/overview", q="ok-vm")[1]["vmInstances"] == []


def random_catalog(seed: int) -> None:
    """30 VMs of 0-3 volumes (and detached volumes) with Ready, Failed and Creating backups, VM
    backups (one group, one date a VM) and lone ones (each its own date), copies on a standby and
    a remote, job groups (one disabled) on triggers (one disabled) with jobs (some disabled) on
    VMs and volumes, failed and good runs of VMs, volumes and detached volumes."""
    rng = random.Random(seed)
    moment = now()
    minutes = iter(rng.sample(range(10, 20_000), 2_000))  # every date distinct but a VM backup's
    with db.session() as session:
        host = Host(name="h1", status="Connected", lastHeartbeat=moment)
        master = BackupStorage(name="master", url="file:///m", role="master")
        standby = BackupStorage(name="standby", url="file:///s", role="standby")
        remote = BackupStorage(name="remote", type="Remote", url="http://127.0.0.1:9/r")
        session.add_all([host, master, standby, remote])
        session.flush()
        targets: list[str] = []
        for i in range(30):
            vm = VmInstance(name=f"vm-{rng.randrange(10)}", hostUuid=host.uuid)  # names repeat: uuid orders them
            session.add(vm)
            session.flush()
            volumes = []
            for k in range(rng.choice((0, 1, 1, 2, 3))):
                volume = Volume(name=f"{i}-{k}", hostUuid=host.uuid, vmInstanceUuid=vm.uuid, installPath=f"/{i}/{k}")
                session.add(volume)
                volumes.append(volume)
            session.flush()
            targets += [vm.uuid, *(v.uuid for v in volumes)]
            for _ in range(rng.randrange(4)):
                group = new_uuid() if len(volumes) > 1 and rng.random() < 0.5 else None
                shared_date = moment - timedelta(minutes=next(minutes))
                for volume in volumes if group else rng.sample(volumes, min(1, len(volumes))):
                    status = rng.choice(("Ready", "Ready", "Ready", "Failed", "Creating"))
                    row = VolumeBackup(
                        name=f"b{i}",
                        volumeUuid=volume.uuid,
                        status=status,
                        groupUuid=group,
                        size=rng.randrange(1, 1000),
                        mode=rng.choice(("full", "incremental")),
                        createDate=shared_date if group else moment - timedelta(minutes=next(minutes)),
                    )
                    session.add(row)
                    session.flush()
                    for storage in (master, standby, remote):
                        if status == "Ready" and rng.random() < 0.7:
                            session.add(
                                VolumeBackupStorageRef(volumeBackupUuid=row.uuid, backupStorageUuid=storage.uuid)
                            )
        detached = Volume(name="detached", hostUuid=host.uuid, installPath="/d")
        session.add(detached)
        session.flush()
        targets.append(detached.uuid)
        for g in range(3):
            group = SchedulerJobGroup(name=f"g{g}", jobType="vmBackup", state="Disabled" if g == 2 else "Enabled")
            session.add(group)
            session.flush()
            for t in range(2):
                trigger = SchedulerTrigger(
                    name=f"t{g}{t}",
                    schedulerType="simple",
                    schedulerInterval=rng.choice((600, 3600, 86400)),
                    state="Disabled" if (g, t) == (1, 1) else "Enabled",
                    createDate=moment - timedelta(minutes=rng.randrange(1, 3000)),
                )
                session.add(trigger)
                session.flush()
                session.add(
                    SchedulerJobGroupTriggerRef(schedulerJobGroupUuid=group.uuid, schedulerTriggerUuid=trigger.uuid)
                )
            for target in rng.sample(targets, 12):
                state = "Disabled" if rng.random() < 0.2 else "Enabled"
                session.add(SchedulerJob(schedulerJobGroupUuid=group.uuid, targetResourceUuid=target, state=state))
                for _ in range(rng.randrange(3)):
                    session.add(
                        SchedulerJobHistory(
                            executeTime=moment - timedelta(minutes=next(minutes)),
                            success=rng.random() < 0.5,
                            schedulerJobGroupUuid=group.uuid,
                            targetResourceUuid=target,
                        )
                    )


def expected_vms(moment: datetime, grace: timedelta) -> list[Row]:
    """Each VM's row of the overview computed the plain way, one VM at a time from whole ORM
    rows: the reference the set-wise queries of shared.service.overview must agree with."""
    with db.session() as session:
        kinds = {s.uuid: overview.storage_kind(s) for s in session.scalars(select(BackupStorage))}
        present = sorted({k for k in kinds.values() if k != "master"})
        due: dict[str, datetime | None] = {}  # by enabled group with an enabled trigger
        for group in session.scalars(select(SchedulerJobGroup).where(SchedulerJobGroup.state == "Enabled")):
            fires = [
                schedule.due_fire(trigger_spec(t), aware(t.createDate), None, moment - grace)
                for t in session.scalars(
                    select(SchedulerTrigger)
                    .join(
                        SchedulerJobGroupTriggerRef,
                        SchedulerJobGroupTriggerRef.schedulerTriggerUuid == SchedulerTrigger.uuid,
                    )
                    .where(
                        SchedulerJobGroupTriggerRef.schedulerJobGroupUuid == group.uuid,
                        SchedulerTrigger.state == "Enabled",
                    )
                )
            ]
            if fires:
                due[group.uuid] = max((f for f in fires if f), default=None)
        out = []
        for vm in session.scalars(select(VmInstance).order_by(VmInstance.name, VmInstance.uuid)):
            volumes = [v.uuid for v in session.scalars(select(Volume).where(Volume.vmInstanceUuid == vm.uuid))]
            backups = list(session.scalars(select(VolumeBackup).where(VolumeBackup.volumeUuid.in_(volumes))))
            ready = [b for b in backups if b.status == "Ready"]
            newest = max(ready, key=lambda b: (b.createDate, b.uuid), default=None)
            failed = [aware(b.createDate) for b in backups if b.status == "Failed"]
            failed += [
                aware(h.executeTime)
                for h in session.scalars(select(SchedulerJobHistory).where(SchedulerJobHistory.success.is_(False)))
                if h.targetResourceUuid in (vm.uuid, *volumes)
            ]
            jobs = session.scalars(
                select(SchedulerJob).where(
                    SchedulerJob.targetResourceUuid.in_((vm.uuid, *volumes)), SchedulerJob.state == "Enabled"
                )
            )
            whens = [due[j.schedulerJobGroupUuid] for j in jobs if j.schedulerJobGroupUuid in due]
            last = aware(newest.createDate) if newest else None
            failed_at = max(failed, default=None)
            overdue = any(w is not None and (last is None or last < w) for w in whens)
            if last is None:
                status = "failed" if failed_at else "none"
            elif failed_at is not None and failed_at > last:
                status = "failed"
            else:
                status = "overdue" if overdue else "ok"
            members = [b for b in ready if newest and b.groupUuid and b.groupUuid == newest.groupUuid] or (
                [newest] if newest else []
            )
            held = [
                {
                    kinds[r.backupStorageUuid]
                    for r in session.scalars(
                        select(VolumeBackupStorageRef).where(
                            VolumeBackupStorageRef.volumeBackupUuid == b.uuid, VolumeBackupStorageRef.status == "Ready"
                        )
                    )
                }
                for b in members
            ]
            out.append(
                {
                    "uuid": vm.uuid,
                    "volumes": len(volumes),
                    "status": status,
                    "overdue": overdue,
                    "scheduled": bool(whens),
                    "lastFailure": iso(failed_at),
                    "lastBackup": newest
                    and {
                        "groupUuid": newest.groupUuid,
                        "createDate": iso(last),
                        "size": sum(b.size or 0 for b in members),
                        "mode": sorted({b.mode for b in members}),
                        "volumeBackups": len(members),
                    },
                    "copies": {kind: bool(held) and all(kind in h for h in held) for kind in present},
                }
            )
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_vm_rows_agree_with_a_vm_by_vm_computation(any_api: tuple[TestClient, str], seed: int) -> None:
    """The overview decides each VM's status, counts and pages in the database (each job
    group's due fire passed in; no per-VM rows in Python but the page's); on random catalogs,
    on SQLite and PostgreSQL, every row, count, status filter, find and page must be what
    computing each VM alone from its rows gives."""
    client, key = any_api
    random_catalog(seed)

    def rows(body: Row) -> list[Row]:
        return [
            {
                **{k: vm[k] for k in ("uuid", "volumes", "status", "overdue", "scheduled", "lastFailure", "copies")},
                "lastBackup": vm["lastBackup"]
                and {k: vm["lastBackup"][k] for k in ("groupUuid", "createDate", "size", "mode", "volumeBackups")},
            }
            for vm in body["vmInstances"]
        ]

    for grace in (0, 3600, 86400):
        status, body = get(client, key, "/v1/overview", graceSeconds=grace)
        assert status == 200, body
        moment = datetime.fromisoformat(body["generatedAt"])
        want = expected_vms(moment, timedelta(seconds=grace))
        assert rows(body) == want
        assert body["vmTotal"] == len(want)
        assert body["vmCounts"] == {s: sum(v["status"] == s for v in want) for s in overview.STATUSES}
        assert {vm["status"] for vm in want} >= {"ok", "failed", "none"}  # the catalog has each kind
        every = body["vmInstances"]
        for wanted in (None, *overview.STATUSES):
            chosen = [vm for vm in every if wanted in (None, vm["status"])]
            for start, limit in ((0, 5), (5, 5), (len(chosen) - 2, 10), (len(chosen) + 3, 5)):
                query: Row = {"graceSeconds": grace, "start": max(start, 0), "limit": limit}
                if wanted:
                    query["status"] = wanted
                page = get(client, key, "/v1/overview", **query)[1]
                got = _aged(page["vmInstances"])[0]
                assert got == _aged(chosen[max(start, 0) : max(start, 0) + limit])[0], (wanted, start)
                assert page["vmTotal"] == len(chosen) and page["vmCounts"] == body["vmCounts"]
        # find: a name's part in any case, or a uuid's start; with a status and a page
        for find, wanted in (("VM-3", None), ("m-1", "failed"), (every[4]["uuid"][:6], None)):
            chosen = [
                vm
                for vm in every
                if wanted in (None, vm["status"])
                and (find.lower() in vm["name"].lower() or vm["uuid"].startswith(find))
            ]
            query = {"graceSeconds": grace, "q": find, "limit": 3, "start": 1}
            if wanted:
                query["status"] = wanted
            page = get(client, key, "/v1/overview", **query)[1]
            assert _aged(page["vmInstances"])[0] == _aged(chosen[1:4])[0] and page["vmTotal"] == len(chosen), find


def test_fire_times_follow_the_scheduler_and_bad_input(api: tuple[TestClient, str], tmp_path: Path) -> None:
    client, key = api
    ids = build(tmp_path)
    # its first fire half an hour away: every listed time is ahead of the request, whenever in its
    # second the request is answered
    start = to_seconds(now()) + 1800
    with db.session() as session:
        trigger = session.get(SchedulerTrigger, ids["trigger"])
        assert trigger is not None
        trigger.startTime = start
        spec = TriggerSpec(schedulerType="simple", schedulerInterval=3600, startTime=start)
        created = trigger.createDate
    status, body = get(client, key, f"/v1/scheduler/triggers/{ids['trigger']}/fire-times")
    assert status == 200 and len(body["fireTimes"]) == 5
    expected = []
    after = None
    for _ in range(5):
        upcoming = fire_times_after(spec, created, after)
        assert upcoming is not None
        expected.append(upcoming)
        after = upcoming
    assert expected[0] == from_seconds(start)
    got = [t.replace("Z", "+00:00") for t in body["fireTimes"]]
    assert [e.isoformat(timespec="milliseconds") for e in expected] == got
    # a cron trigger with a stop time: only the fires before it
    with db.session() as session:
        cron = SchedulerTrigger(
            name="c",
            schedulerType="cron",
            cron="0 3 * * *",
            timeZone="Europe/Berlin",
            stopTime=to_seconds(now()) + 3 * 86400,
        )
        session.add(cron)
        session.flush()
        cron_uuid = cron.uuid
    status, body = get(client, key, f"/v1/scheduler/triggers/{cron_uuid}/fire-times", count=10)
    assert status == 200 and 2 <= len(body["fireTimes"]) <= 3
    assert all(t.endswith(("01:00:00.000Z", "02:00:00.000Z")) for t in body["fireTimes"])  # 03:00 in Berlin

    for bad in ("0", "101", "x", "-1"):
        status, body = get(client, key, f"/v1/scheduler/triggers/{ids['trigger']}/fire-times", count=bad)
        assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT", bad
    assert get(client, key, f"/v1/scheduler/triggers/{new_uuid()}/fire-times")[0] == 404
    for name, bad in (("graceSeconds", "-5"), ("graceSeconds", "abc"), ("failureHours", "0"), ("failureHours", "9999")):
        status, body = get(client, key, "/v1/overview", **{name: bad})
        assert status == 400 and name in body["error"]["description"], (name, bad)
    assert client.get("/v1/overview").status_code == 401


def test_the_console_is_served_with_its_files_and_a_strict_policy(api: tuple[TestClient, str]) -> None:
    client, _key = api
    page = client.get("/")
    assert page.status_code == 200 and '<script type="module" src="/console/app.js">' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for name in ("app.js", "api.js", "ui.js", "overview.js", "resources.js", "scheduling.js", "admin.js", "style.css"):
        found = client.get(f"/console/{name}")
        assert found.status_code == 200 and found.headers["content-security-policy"], name
        assert "http://" not in found.text and "https://" not in found.text, name  # nothing from elsewhere
    assert client.get("/console/vendor/preact-htm.js").status_code == 200
    assert client.get("/console/../app.py").status_code == 404
    assert client.get("/console/nothing.js").status_code == 404
