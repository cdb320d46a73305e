"""Nobody reaches a host through the API: each way in that issue 15 found, through REST and
through ZStack's wire (``/zstack/api/``), on a real PostgreSQL catalog with the app in process
(no worker runs: what a worker does with a path is tested in tests/service/test_host_safety.py
and tests/shared/test_hostpaths.py)."""

from __future__ import annotations

import json
import posixpath
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.catalog import db
from shared.catalog.models import ApiJob, Volume
from tests.api.conftest import World

VB = "org.zstack.header.storage.volume.backup."
SC = "org.zstack.scheduler."


def wire(world: World, message: str, key: str | None, **params: Any) -> tuple[int, dict[str, Any]]:
    if key:
        params["session"] = {"uuid": key}
    response = world.client.post("/zstack/api/", json={message: params})
    return response.status_code, response.json()


def code(answer: Any) -> str:
    return str(answer["error"]["code"])


def test_members_never_place_volumes_and_admins_only_inside_the_roots(world: World) -> None:
    own = world.parties["own"]
    backup = own.rows["volume-backup"]
    outside = {"name": "x", "hostUuid": world.host, "installPath": "/etc/cron.d/owned.raw"}
    for params in (outside, {"name": "x", "hostUuid": world.host}, {"name": "x", "installPath": "/etc/cron.d/x"}):
        status, answer = world.call(
            "PUT", f"/v1/volume-backups/{backup}/actions", own.key, {"createDataVolumeFromVolumeBackup": params}
        )
        assert (status, code(answer)) == (403, "FORBIDDEN"), answer
        status, answer = wire(
            world, f"{VB}APICreateDataVolumeFromVolumeBackupMsg", own.key, backupUuid=backup, **params
        )
        assert (status, code(answer)) == (403, "FORBIDDEN"), answer
    for path in ("/etc/cron.d/owned.raw", f"{world.tmp}/./x.raw", f"{world.tmp}/sub/../../etc/x.raw", f"{world.tmp}"):
        params = {"name": "x", "hostUuid": world.host, "installPath": path}
        status, answer = world.call(
            "PUT", f"/v1/volume-backups/{backup}/actions", world.admin_key, {"createDataVolumeFromVolumeBackup": params}
        )
        assert (status, code(answer)) == (400, "PATH_NOT_ALLOWED"), (path, answer)
    # a member's new volume is placed by the platform: beside its source, named by its uuid
    status, answer = world.call(
        "PUT", f"/v1/volume-backups/{backup}/actions", own.key, {"createDataVolumeFromVolumeBackup": {"name": "mine"}}
    )
    assert status == 202, answer
    with db.session() as session:
        job = session.get(ApiJob, answer["jobUuid"])
        assert job is not None and job.resourceUuid
        volume = session.get(Volume, job.resourceUuid)
        assert volume is not None and volume.status == "Creating" and volume.projectUuid == own.project
        assert volume.installPath == f"{world.tmp}/{volume.uuid}.raw"
    assert not (world.tmp / f"{volume.uuid}.raw").exists()  # nothing written by the API
    # a Creating volume is acted on by nobody
    for method, path, body in (("POST", f"/v1/volumes/{volume.uuid}/volume-backups", {"params": {}}),):
        status, answer = world.call(method, path, world.admin_key, body)
        assert (status, code(answer)) == (409, "CONFLICT") and "Creating" in answer["error"]["description"]


def test_sockets_are_set_by_admins_inside_the_socket_folder(world: World) -> None:
    own = world.parties["own"]
    vm = own.rows["vm"]
    for key in ("qmpSocket", "guestAgentSocket"):
        status, answer = world.call(
            "PUT", f"/v1/vm-instances/{vm}/actions", own.key, {"updateVmInstance": {key: f"{world.tmp}/vm.sock"}}
        )
        assert (status, code(answer)) == (403, "FORBIDDEN"), answer
        for bad in ("/run/libvirt/qemu/other.monitor", f"{world.tmp}/../x.sock", "sock"):
            status, answer = world.call(
                "PUT", f"/v1/vm-instances/{vm}/actions", world.admin_key, {"updateVmInstance": {key: bad}}
            )
            assert (status, code(answer)) == (400, "PATH_NOT_ALLOWED"), (bad, answer)
        world.admin("PUT", f"/vm-instances/{vm}/actions", {"updateVmInstance": {key: f"{world.tmp}/vm.sock"}})
    # a member still renames its VM and reports its state
    assert (
        world.call(
            "PUT", f"/v1/vm-instances/{vm}/actions", own.key, {"updateVmInstance": {"name": "n", "state": "Stopped"}}
        )[0]
        == 200
    )


def test_job_groups_have_one_spelling_checked_before_permissions(world: World) -> None:
    own = world.parties["own"]
    remote = world.shared["remote"]
    for params in (
        {"name": "g", "jobType": "databaseBackup"},
        {"name": "g", "type": "databaseBackup"},
    ):
        status, answer = world.call("POST", "/v1/scheduler/jobgroups", own.key, {"params": params})
        assert (status, code(answer)) == (403, "FORBIDDEN"), answer
    status, answer = wire(world, f"{SC}APICreateSchedulerJobGroupMsg", own.key, name="g", type="databaseBackup")
    assert (status, code(answer)) == (403, "FORBIDDEN"), answer
    for params in (
        {"name": "g", "jobType": "volumeBackup", "jobData": {"backupStorageUuids": [remote]}},
        {"name": "g", "type": "volumeBackup", "parameters": {"backupStorageUuids": [world.shared["local"], remote]}},
    ):
        status, answer = world.call("POST", "/v1/scheduler/jobgroups", own.key, {"params": params})
        assert (status, code(answer)) == (404, "NOT_FOUND"), answer
    both = {"name": "g", "type": "volumeBackup", "jobType": "vmBackup"}
    status, answer = world.call("POST", "/v1/scheduler/jobgroups", own.key, {"params": both})
    assert (status, code(answer)) == (400, "INVALID_ARGUMENT")
    group = own.rows["jobgroup"]
    status, answer = world.call(
        "PUT",
        f"/v1/scheduler/jobgroups/{group}/actions",
        own.key,
        {"updateSchedulerJobGroup": {"jobData": {"backupStorageUuids": [remote]}}},
    )
    assert (status, code(answer)) == (404, "NOT_FOUND"), answer
    status, answer = world.call(
        "POST",
        "/v1/scheduler/jobs",
        own.key,
        {"params": {"name": "j", "jobType": "databaseBackup", "targetResourceUuid": own.rows["volume"]}},
    )
    assert (status, code(answer)) == (403, "FORBIDDEN"), answer
    # the inventory's spelling works for what a member may do
    made = world.call(
        "POST",
        "/v1/scheduler/jobgroups",
        own.key,
        {
            "params": {
                "name": "g",
                "jobType": "volumeBackup",
                "jobData": {"backupStorageUuids": [world.shared["local"]]},
            }
        },
    )
    assert made[0] == 200 and made[1]["inventory"]["jobData"] == {"backupStorageUuids": [world.shared["local"]]}


def test_a_members_delete_removes_only_the_copies_it_may_act_on(world: World) -> None:
    own = world.parties["own"]
    backup = world.fresh("volume-backup", "own")
    remote = world.fresh("remote", "other")
    with db.session() as session:
        from shared.catalog.models import VolumeBackup, VolumeBackupStorageRef

        row = session.get(VolumeBackup, backup)
        assert row is not None
        row.backupStorageRefs.append(
            VolumeBackupStorageRef(backupStorageUuid=remote, status="Ready", installPath="zstore://r/1")
        )
    status, answer = world.call("DELETE", f"/v1/volume-backups/{backup}", own.key)
    assert status == 202
    with db.session() as session:
        job = session.get(ApiJob, answer["jobUuid"])
        assert job is not None and (job.params or {})["backupStorageUuids"] == [world.shared["local"]]
    status, answer = world.call("DELETE", f"/v1/volume-backups/{backup}?backupStorageUuids={remote}", own.key)
    assert (status, code(answer)) == (404, "NOT_FOUND")


def test_wire_results_go_only_to_whoever_may_see_the_job(world: World) -> None:
    own, other = world.parties["own"], world.parties["other"]
    rest_job = own.rows["api-job"]
    assert world.client.get(f"/zstack/api/result/{rest_job}").status_code == 404  # no session: wire jobs only
    assert (
        world.client.get(f"/zstack/api/result/{rest_job}", headers={"Authorization": f"OAuth {other.key}"}).status_code
        == 404
    )
    mine = world.client.get(f"/zstack/api/result/{rest_job}", headers={"Authorization": f"OAuth {own.key}"})
    assert mine.status_code == 200 and mine.json()["state"] == "Done"
    status, started = wire(world, f"{VB}APIRevertVolumeFromVolumeBackupMsg", own.key, uuid=own.rows["volume-backup"])
    assert status == 200 and started["state"] == "Processing"
    assert world.client.get(f"/zstack/api/result/{started['uuid']}").json()["state"] == "Processing"
    assert (
        world.client.get(
            f"/zstack/api/result/{started['uuid']}", headers={"Authorization": f"OAuth {other.key}"}
        ).status_code
        == 404
    )
    # a crashed job's answer carries no traceback
    with db.session() as session:
        job = session.get(ApiJob, started["uuid"])
        assert job is not None
        from shared.apijobs import fail_job

        fail_job(session, job, code="INTERNAL_ERROR", description="OSError: boom", details="OSError")
    failed = world.client.get(f"/zstack/api/result/{started['uuid']}").json()
    assert failed["state"] == "Error" and "Traceback" not in json.dumps(failed) and 'File "' not in json.dumps(failed)


def test_no_input_answers_500(world: World) -> None:
    own = world.parties["own"]
    headers = {"Authorization": f"Bearer {own.key}", "Content-Type": "application/json"}
    deep = (
        b'{"org.zstack.header.storage.volume.backup.APIQueryVolumeBackupMsg": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    )
    for method, path, body in (
        (
            "POST",
            "/v1/scheduler/triggers",
            b'{"params": {"name": "\\ud800", "schedulerType": "simple", "schedulerInterval": 60}}',
        ),
        (
            "POST",
            "/v1/scheduler/triggers",
            b'{"params": {"name": "t", "description": "\\udfff tail", "schedulerInterval": 60}}',
        ),
        ("POST", "/v1/scheduler/triggers", b'{"params": {"name": "nul\\u0000byte", "schedulerInterval": 60}}'),
        ("POST", "/v1/scheduler/triggers", b'{"params": {"\\u0000": 1, "name": "t"}}'),
        ("POST", "/zstack/api/", deep),
        ("POST", "/v1/scheduler/triggers", b"[" * 100 + b"]" * 100),
        ("PUT", f"/v1/vm-instances/{own.rows['vm']}/actions", b'{"updateVmInstance": {"name": "\\ud83d"}}'),
    ):
        response = world.client.request(method, path, content=body, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_ARGUMENT", (
            body[:80],
            response.text[:200],
        )
    for query in ("q=name%3D%00", "q=name%3Dx%00y", "sort=%00"):
        response = world.client.get(f"/v1/volumes?{query}", headers=headers)
        assert response.status_code == 400, (query, response.text)
    assert world.client.get(f"/v1/volumes/{own.rows['volume']}%00", headers=headers).status_code == 400
    # a surrogate pair (a real emoji) is fine
    good = b'{"params": {"name": "backup \\ud83d\\ude00", "schedulerType": "simple", "schedulerInterval": 60}}'
    response = world.client.post("/v1/scheduler/triggers", content=good, headers=headers)
    assert response.status_code == 200 and response.json()["inventory"]["name"] == "backup \U0001f600"


def test_members_tag_only_their_own_rows(world: World) -> None:
    own = world.parties["own"]
    for resource, status_wanted in ((world.shared["local"], 403), (world.shared["remote"], 404), (world.host, 404)):
        status, _ = world.call(
            "POST",
            "/v1/user-tags",
            own.key,
            {"params": {"resourceUuid": resource, "resourceType": "BackupStorageVO", "tag": "x"}},
        )
        assert status == status_wanted, resource
    assert (
        world.call(
            "POST",
            "/v1/user-tags",
            own.key,
            {"params": {"resourceUuid": own.rows["vm"], "resourceType": "VmInstanceVO", "tag": "x"}},
        )[0]
        == 200
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.one_of(st.text(max_size=60), st.text(alphabet="/.ab\0\ud800 ", max_size=40).map(lambda t: "/" + t)))
def test_arbitrary_install_paths_are_refused_or_inside_a_root(world: World, path: str) -> None:
    for text in (path, f"{world.tmp}/{path}"):
        body = json.dumps({"params": {"hostUuid": world.host, "installPath": text}})
        response = world.client.post(
            "/v1/volumes",
            content=body,
            headers={"Authorization": f"Bearer {world.admin_key}", "Content-Type": "application/json"},
        )
        assert response.status_code in (200, 400, 409), (text, response.text)
        if response.status_code == 200:
            stored = response.json()["inventory"]["installPath"]
            assert stored == text and stored.startswith(f"{world.tmp}/") and posixpath.normpath(stored) == stored
