"""ZStack's RPC protocol (``POST /zstack/api/``) against the real service: backups, restores,
queries and sessions; scheduling compared with the REST shortcut; bad input in ZStack's shape.

Written from docs/api.md ("ZStack wire compatibility") and zstack-messages.tsv only. Readings of the
contract where it is silent or ambiguous:

- Passwords. docs/api.md's "Accounts" does not say how a password is set. Assumed, as in ZStack:
  ``POST /v1/accounts {"params": {"name", "password"}}`` creates an account with one, and the
  seeded ``admin`` account (type SystemAdmin) gets one through ZStack's UpdateAccount action,
  ``PUT /v1/accounts/{uuid}/actions {"updateAccount": {"password": ...}}``. LogInByAccount sends
  the SHA-512 hex of it.
- Two ImageStore storages both registered as ``master`` (allowed by REST): a backup taken with
  ``backupStorageUuid=A`` lands on A only, so SyncBackupFromImageStoreBackupStorage A -> B is what
  puts a copy on B (a standby would get copies by itself and make the sync moot).
- The Event of CreateDataVolumeFromVolumeBackup carries the new volume's inventory (ZStack's
  VolumeInventory); the wire message has no hostUuid/installPath, so the new volume is placed
  by the server, on the host of ``vmInstanceUuid``, and its ``installPath`` is read back.
- CreateVmBackup's Event carries one ``inventory``, as every async message's event does
  (docs/zstack-wire.md), naming the VM backup's ``groupUuid``.
- ``parameters`` of CreateSchedulerJobGroup is sent as an object (the REST ``parameters``, the
  group's jobData), not as ZStack's JSON string.
- A missing or mistyped parameter is reported the way the message's kind reports failures (a
  failed Reply, a 4xx error envelope, or an async job ending in Error): the test requires an
  error that names the parameter, with a 4xx status, never a 500.
- A project member querying another project's VM gets an empty result, as a REST query does
  (docs/security.md: queries run on the visible rows only); reading one row it may not see is a 404.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MiB
from tests.service.conftest import Stack
from tests.service.test_storage_topologies import raw_volume, start_host, vm_with_volumes
from tests.zstack.client import ZStackClient, ZStackError, load_messages

pytestmark = pytest.mark.shared_api  # an API lent per test, not started (tests/service/conftest.py)

ZSTACK_DATE = re.compile(r"^[A-Z][a-z]{2} \d{1,2}, \d{4} \d{1,2}:\d{2}:\d{2} (AM|PM)$")
QUERY = "QueryVolumeBackup"


# -- helpers -----------------------------------------------------------------------------------------
def wire(stack: Stack, session: str | None = None) -> ZStackClient:
    return ZStackClient(f"http://127.0.0.1:{stack.port}", session=session)


def set_admin_password(stack: Stack, password: str) -> dict[str, Any]:
    admins = stack.client.query("accounts", "name=admin")["inventories"]
    assert admins and admins[0]["type"] == "SystemAdmin", admins
    stack.client.action("accounts", admins[0]["uuid"], "updateAccount", {"password": password})
    return dict(admins[0])


def wire_error(call: Callable[[], Any]) -> ZStackError:
    with pytest.raises(ZStackError) as caught:
        call()
    error = caught.value
    assert error.status < 500, f"HTTP {error.status} for bad input: {error} {error.body}"
    assert error.code and error.description, f"an error without code or description: {error.body}"
    return error


def names(error: ZStackError, *words: str) -> bool:
    text = f"{error.description} {error.details}"
    return any(word in text for word in words)


def assert_error_envelope(status: int, body: Any) -> None:
    assert status == 400, (status, body)
    assert isinstance(body, dict) and body.get("success") is False, body
    error = body.get("error")
    assert isinstance(error, dict), body
    assert isinstance(error.get("code"), str) and error["code"], body
    assert isinstance(error.get("description"), str) and error["description"], body
    assert isinstance(error.get("details", ""), str), body


def assert_zstack_dates(row: dict[str, Any], *fields: str) -> None:
    for field in fields:
        assert ZSTACK_DATE.match(str(row.get(field))), f"{field}={row.get(field)!r} is not ZStack's date format"


def wait_until(what: str, check: Callable[[], bool], stack: Stack, timeout: float = 120) -> None:
    stack.wait_for(what, check, timeout=timeout)


def uuids(rows: list[dict[str, Any]]) -> list[str]:
    return [row["uuid"] for row in rows]


# -- (a) sessions, backups, restores and queries ---------------------------------------------------
def test_login_backups_sync_revert_new_volume_queries_and_logout(stack: Stack) -> None:
    host = start_host(stack)
    first = stack.client.add_backup_storage("zs-first", f"file://{stack.tmp / 'zs-first'}")["uuid"]
    second = stack.client.add_backup_storage("zs-second", f"file://{stack.tmp / 'zs-second'}")["uuid"]
    vm, [(root, _root_path), (data, data_path)] = vm_with_volumes(stack, host, "zvm")
    original = data_path.read_bytes()
    password = "zstack " + secrets.token_hex(8)
    admin = set_admin_password(stack, password)

    zs = wire(stack)
    session = zs.login("admin", password)
    assert {"uuid", "accountUuid", "userUuid", "expiredDate"} <= set(session), session
    assert session["accountUuid"] == admin["uuid"]
    assert_zstack_dates(session, "expiredDate")
    with pytest.raises(ZStackError):
        wire(stack).login("admin", password + "-wrong")

    # backups: one of the data volume, then the whole VM (root + data, one group)
    event = zs.call("CreateVolumeBackup", volumeUuid=data["uuid"], backupStorageUuid=first, name="zs-b1", mode="full")
    b1 = event["inventory"]
    assert (b1["volumeUuid"], b1["name"], b1["mode"]) == (data["uuid"], "zs-b1", "full"), b1
    assert {r["backupStorageUuid"]: r["status"] for r in b1["backupStorageRefs"]} == {first: "Ready"}, b1
    event = zs.call("CreateVmBackup", rootVolumeUuid=root["uuid"], backupStorageUuid=first, name="zs-vm")
    # as ZStack's APICreateVmBackupEvent: the volume backups made, one inventory each (docs/zstack-rest.md)
    assert "inventory" not in event, event
    groups = {r["groupUuid"] for r in event["inventories"]}
    assert len(groups) == 1 and None not in groups, f"not one groupUuid in the CreateVmBackup event: {event}"
    group = groups.pop()
    assert sorted(r["volumeUuid"] for r in event["inventories"]) == sorted([root["uuid"], data["uuid"]]), event
    in_group = zs.inventories(QUERY, ("groupUuid", "=", group))
    assert sorted(r["volumeUuid"] for r in in_group) == sorted([root["uuid"], data["uuid"]]), in_group
    everything = [b1["uuid"], *uuids(in_group)]

    # the query language through conditions
    of_data = zs.inventories(QUERY, ("volumeUuid", "=", data["uuid"]))
    assert sorted(uuids(of_data)) == sorted(
        [b1["uuid"], *(r["uuid"] for r in in_group if r["volumeUuid"] == data["uuid"])]
    )
    ready = zs.inventories(
        QUERY, ("backupStorageRefs.status", "=", "Ready"), ("backupStorageRefs.backupStorageUuid", "=", first)
    )
    assert sorted(uuids(ready)) == sorted(everything)
    assert sorted(
        uuids(zs.inventories(QUERY, ("size", ">", 0), ("volumeUuid", "?=", f"{root['uuid']},{data['uuid']}")))
    ) == sorted(everything)
    assert uuids(zs.inventories(QUERY, ("name", "~=", "zs-b%"))) == [b1["uuid"]]
    counted = zs.query(QUERY, ("volumeUuid", "!=", "no-such-volume"), count=True)
    assert counted["total"] == 3 and not counted.get("inventories"), counted
    with_count = zs.query(QUERY, replyWithCount=True, limit=1)
    assert with_count["total"] == 3 and len(with_count["inventories"]) == 1, with_count
    ascending = uuids(zs.inventories(QUERY, sortBy="uuid", sortDirection="asc"))
    assert ascending == sorted(everything)
    assert uuids(zs.inventories(QUERY, sortBy="uuid", sortDirection="desc")) == ascending[::-1]
    assert uuids(zs.inventories(QUERY, sortBy="uuid", sortDirection="asc", limit=1, start=1)) == ascending[1:2]
    slim = zs.inventories(QUERY, ("uuid", "=", b1["uuid"]), fields=["uuid", "volumeUuid"])
    assert slim == [{"uuid": b1["uuid"], "volumeUuid": data["uuid"]}], slim
    for row in zs.inventories(QUERY):
        assert_zstack_dates(row, "createDate", "lastOpDate")
        for ref in row["backupStorageRefs"]:
            assert_zstack_dates(ref, "createDate", "lastOpDate")

    # a copy on the second storage
    assert not zs.inventories(QUERY, ("backupStorageRefs.backupStorageUuid", "=", second))
    zs.call(
        "SyncBackupFromImageStoreBackupStorage",
        uuid=b1["uuid"],
        srcBackupStorageUuid=first,
        dstBackupStorageUuid=second,
    )
    on_second = zs.inventories(QUERY, ("backupStorageRefs.backupStorageUuid", "=", second))
    assert uuids(on_second) == [b1["uuid"]], on_second
    assert {r["backupStorageUuid"]: r["status"] for r in on_second[0]["backupStorageRefs"]} == {
        first: "Ready",
        second: "Ready",
    }

    # revert the data volume from the copy on the second storage: refused while the VM runs
    with open(data_path, "r+b") as handle:
        handle.seek(2 * MiB)
        handle.write(b"changed after the backup" * 4096)
    assert data_path.read_bytes() != original
    stack.client.action("vm-instances", vm["uuid"], "updateVmInstance", {"state": "Running"})
    wire_error(lambda: zs.call("RevertVolumeFromVolumeBackup", uuid=b1["uuid"], backupStorageUuid=second))
    stack.client.action("vm-instances", vm["uuid"], "updateVmInstance", {"state": "Stopped"})
    zs.call("RevertVolumeFromVolumeBackup", uuid=b1["uuid"], backupStorageUuid=second)
    assert data_path.read_bytes() == original

    # a new data volume from the backup
    created = zs.call(
        "CreateDataVolumeFromVolumeBackup", name="zs-restored", backupUuid=b1["uuid"], vmInstanceUuid=vm["uuid"]
    )
    volume = created["inventory"]
    assert volume["name"] == "zs-restored" and volume["uuid"] != data["uuid"], volume
    assert Path(volume["installPath"]) != data_path
    assert Path(volume["installPath"]).read_bytes() == original
    listed = zs.inventories("QueryVolume", ("uuid", "=", volume["uuid"]))
    assert len(listed) == 1 and listed[0]["vmInstanceUuid"] == vm["uuid"], listed
    assert_zstack_dates(listed[0], "createDate", "lastOpDate")

    # an API key is a session too
    assert uuids(wire(stack, session=stack.key).inventories(QUERY, ("uuid", "=", b1["uuid"]))) == [b1["uuid"]]

    # log out: the old session is gone, for sync and async messages alike
    old = zs.session
    zs.logout()
    assert wire_error(lambda: zs.call(QUERY, session=old, conditions=[])).code == "ID.1001"
    late = wire_error(
        lambda: zs.call(
            "CreateVolumeBackup", session=old, volumeUuid=data["uuid"], backupStorageUuid=first, name="late"
        )
    )
    assert late.code == "ID.1001"
    assert len(wire(stack, session=stack.key).inventories(QUERY)) == 3, "nothing was backed up with the old session"


# -- (b) scheduling: ZStack's messages and the REST shortcut make the same rows --------------------
def test_scheduler_over_the_wire_matches_the_rest_shortcut(stack: Stack) -> None:
    host = start_host(stack)
    stack.start_beat()
    storage = stack.client.add_backup_storage("zs-sched", f"file://{stack.tmp / 'zs-sched'}")["uuid"]
    wire_volume, _ = raw_volume(stack, host, "wire-vol", seed=5)
    rest_volume, _ = raw_volume(stack, host, "rest-vol", seed=6)
    zs = wire(stack, session=stack.key)

    # over the wire
    w_group = zs.call(
        "CreateSchedulerJobGroup", name="wire-group", type="volumeBackup", parameters={"backupStorageUuids": [storage]}
    )["inventory"]
    w_job = zs.call("CreateSchedulerJob", name="wire-job", targetResourceUuid=wire_volume["uuid"], type="volumeBackup")[
        "inventory"
    ]
    zs.call(
        "AddSchedulerJobsToSchedulerJobGroup", schedulerJobGroupUuid=w_group["uuid"], schedulerJobUuids=[w_job["uuid"]]
    )
    # first fire an hour away: only triggerNow and RunSchedulerTrigger run the groups here, so
    # no fire of the beat's can land after the waits below
    later = int(time.time()) + 3600
    w_trigger = zs.call(
        "CreateSchedulerTrigger",
        name="wire-trigger",
        schedulerType="simple",
        schedulerInterval=3600,
        repeatCount=2,
        startTime=later,
    )["inventory"]
    assert (w_trigger["schedulerType"], w_trigger["schedulerInterval"], w_trigger["repeatCount"]) == ("simple", 3600, 2)
    zs.call(
        "AddSchedulerJobGroupToSchedulerTrigger",
        schedulerJobGroupUuid=w_group["uuid"],
        schedulerTriggerUuid=w_trigger["uuid"],
        triggerNow=True,
    )

    # through the REST shortcut
    r_group = stack.client.create_job_group("rest-group", "volumeBackup", backupStorageUuids=[storage])
    stack.client.add_targets(r_group["uuid"], [rest_volume["uuid"]])
    r_trigger = stack.client.create_trigger(
        "rest-trigger", schedulerType="simple", schedulerInterval=3600, repeatCount=2, startTime=later
    )
    stack.client.attach_trigger(r_trigger["uuid"], r_group["uuid"], trigger_now=True)

    def history(group: str) -> list[dict[str, Any]]:
        return zs.inventories(
            "QuerySchedulerJobHistory", ("schedulerJobGroupUuid", "=", group), sortBy="executeTime", sortDirection="asc"
        )

    def backups(volume: str) -> list[dict[str, Any]]:
        return zs.inventories(QUERY, ("volumeUuid", "=", volume), sortBy="createDate", sortDirection="asc")

    for group in (w_group["uuid"], r_group["uuid"]):
        wait_until(f"the triggerNow run of {group}", lambda g=group: len(history(g)) >= 1, stack)
    fired = {g: len(history(g)) for g in (w_group["uuid"], r_group["uuid"])}
    zs.call("RunSchedulerTrigger", uuid=w_trigger["uuid"])
    stack.client.action("scheduler/triggers", r_trigger["uuid"], "runSchedulerTrigger", {})
    for group, volume in ((w_group["uuid"], wire_volume["uuid"]), (r_group["uuid"], rest_volume["uuid"])):
        wait_until(f"the RunSchedulerTrigger run of {group}", lambda g=group: len(history(g)) > fired[g], stack)
        wait_until(
            f"every run of {group} ended, one Ready backup of {volume} per history row",
            lambda g=group, v=volume: (
                len(history(g)) == len(made := backups(v)) and all(b["status"] == "Ready" for b in made)
            ),
            stack,
        )

    # the jobs: ZStack's CreateSchedulerJob row and the shortcut's row look alike
    [w_row] = zs.inventories("QuerySchedulerJob", ("targetResourceUuid", "=", wire_volume["uuid"]))
    [r_row] = zs.inventories("QuerySchedulerJob", ("targetResourceUuid", "=", rest_volume["uuid"]))
    assert w_row["uuid"] == w_job["uuid"] and set(w_row) == set(r_row), (w_row, r_row)
    [w_group_row] = zs.inventories("QuerySchedulerJobGroup", ("uuid", "=", w_group["uuid"]))
    [r_group_row] = zs.inventories("QuerySchedulerJobGroup", ("uuid", "=", r_group["uuid"]))
    assert w_group_row["jobType"] == r_group_row["jobType"] == "volumeBackup"
    assert set(w_group_row) == set(r_group_row)
    assert uuids(
        zs.inventories(
            "QuerySchedulerTrigger",
            ("uuid", "?=", f"{w_trigger['uuid']},{r_trigger['uuid']}"),
            sortBy="name",
            sortDirection="asc",
        )
    ) == [r_trigger["uuid"], w_trigger["uuid"]]

    # the history rows and the backups: the same kind on both sides
    summaries = {}
    for side, group, trigger, volume, job in (
        ("wire", w_group["uuid"], w_trigger["uuid"], wire_volume["uuid"], w_row["uuid"]),
        ("rest", r_group["uuid"], r_trigger["uuid"], rest_volume["uuid"], r_row["uuid"]),
    ):
        rows = history(group)
        assert len(rows) == 2, (side, rows)
        for row in rows:
            assert row["success"] is True, (side, row.get("resultDump"))
            assert (row["targetResourceUuid"], row["schedulerJobUuid"], row["triggerUuid"]) == (volume, job, trigger), (
                side,
                row,
            )
            assert isinstance(row["executeTime"], int) and not isinstance(row["executeTime"], bool), row
            assert_zstack_dates(row, "startTime")
        made = backups(volume)
        assert len(made) == len(rows), (side, made)
        assert [b["mode"] for b in made] == ["full"] + ["incremental"] * (len(made) - 1), (side, made)
        for backup in made:
            assert {r["backupStorageUuid"]: r["status"] for r in backup["backupStorageRefs"]} == {storage: "Ready"}
            assert_zstack_dates(backup, "createDate")
        summaries[side] = (sorted(rows[0]), {b["type"] for b in made}, sorted(made[0]))
    assert summaries["wire"] == summaries["rest"]


# -- (c) bad input: ZStack's error shapes, never a 500 ----------------------------------------------
def test_bad_input_is_a_clear_error_in_zstacks_shape(stack: Stack) -> None:
    zs = wire(stack, session=stack.key)
    key = {"session": {"uuid": stack.key}}
    query_class = zs.message(QUERY).java_class

    # bodies the server cannot dispatch: 400 with the error envelope
    for body in (
        {"org.zstack.header.nothing.APINoSuchThingMsg": dict(key)},
        {"org.zstack.header.vm.APICreateVmInstanceMsg": {"name": "vm", **key}},  # real ZStack, not served
        {query_class: {"conditions": [], **key}, zs.message("QueryVolume").java_class: {"conditions": [], **key}},
        {},
        [],
        "just a string",
    ):
        assert_error_envelope(*zs.post_raw(body if not isinstance(body, (list, str)) else _json_bytes(body)))
    for raw in (b'{"' + query_class.encode() + b'": {"conditions": [', b"", b"\xff\xfe not json", b"null"):
        assert_error_envelope(*zs.post_raw(raw))
    status, body = zs.post_raw({query_class: "not an object"})
    assert 400 <= status < 500 and "error" in str(body), (status, body)

    # every message without its required parameters (the * marks of zstack-messages.tsv)
    seen = set()
    for message in load_messages().values():
        if message.name in seen or not message.required:
            continue
        seen.add(message.name)
        session = None if message.name == "LogInByAccount" else stack.key
        error = wire_error(lambda m=message, s=session: zs.call(m.name, session=s, timeout=60))
        assert names(error, *message.required), f"{message.name}: {error} does not name {sorted(message.required)}"
    # one missing among parameters that are there
    error = wire_error(lambda: zs.call("CreateSchedulerTrigger", name="t", schedulerInterval=60))
    assert names(error, "schedulerType"), error
    error = wire_error(lambda: zs.call("CreateSchedulerJob", name="j", type="volumeBackup"))
    assert names(error, "targetResourceUuid"), error
    error = wire_error(
        lambda: zs.call(
            "SyncBackupFromImageStoreBackupStorage", uuid=uuid.uuid4().hex, srcBackupStorageUuid=uuid.uuid4().hex
        )
    )
    assert names(error, "dstBackupStorageUuid"), error

    # wrong types
    assert names(wire_error(lambda: zs.call(QUERY, conditions=[], limit="ten")), "limit")
    assert names(wire_error(lambda: zs.call(QUERY, conditions=[], start="first")), "start")
    assert names(wire_error(lambda: zs.call(QUERY, conditions="volumeUuid=x")), "conditions")
    assert names(
        wire_error(lambda: zs.call(QUERY, conditions=[], sortDirection="sideways")), "sortDirection", "sideways"
    )
    assert names(
        wire_error(
            lambda: zs.call("CreateSchedulerTrigger", name="t", schedulerType="simple", schedulerInterval="often")
        ),
        "schedulerInterval",
    )

    # conditions on what does not exist
    assert names(wire_error(lambda: zs.query(QUERY, ("noSuchField", "=", "1"))), "noSuchField")
    assert names(wire_error(lambda: zs.query(QUERY, ("backupStorageRefs.noSuchField", "=", "1"))), "noSuchField")
    wire_error(lambda: zs.query(QUERY, ("size", "<>", "1")))
    wire_error(lambda: zs.call(QUERY, conditions=[{"name": "size", "value": "1"}]))
    assert names(wire_error(lambda: zs.call(QUERY, conditions=[], sortBy="noSuchField")), "noSuchField")
    assert names(wire_error(lambda: zs.call(QUERY, conditions=[], fields=["uuid", "noSuchField"])), "noSuchField")

    # sessions: unknown is ID.1001, for a sync and an async message; none at all is refused
    unknown = uuid.uuid4().hex
    assert wire_error(lambda: zs.call(QUERY, session=unknown, conditions=[])).code == "ID.1001"
    assert (
        wire_error(lambda: zs.call("CreateSchedulerTrigger", session=unknown, name="t", schedulerType="simple")).code
        == "ID.1001"
    )
    wire_error(lambda: zs.call(QUERY, session=None, conditions=[]))
    assert not zs.inventories("QuerySchedulerTrigger"), "nothing was created by a refused message"

    # project isolation exactly as on REST
    mine = stack.client.create("projects", {"name": "zs-mine"})["uuid"]
    theirs = stack.client.create("projects", {"name": "zs-theirs"})["uuid"]
    password = "member " + secrets.token_hex(8)
    member = stack.client.create("accounts", {"name": "zs-member", "password": password})["uuid"]
    stack.client.request(
        "POST", f"/v1/projects/{mine}/members", json={"params": {"accountUuid": member, "role": "member"}}
    )
    my_vm = stack.client.register_vm("zs-my-vm", projectUuid=mine)["uuid"]
    their_vm = stack.client.register_vm("zs-their-vm", projectUuid=theirs)["uuid"]
    as_member = wire(stack)
    as_member.login("zs-member", password)
    assert uuids(as_member.inventories("QueryVmInstance", ("uuid", "=", my_vm))) == [my_vm]
    assert their_vm not in uuids(as_member.inventories("QueryVmInstance"))
    # a query runs on the rows the caller may see (docs/security.md): no error, no row
    assert as_member.inventories("QueryVmInstance", ("uuid", "=", their_vm)) == []
    assert as_member.query("QueryVmInstance", ("projectUuid", "=", theirs), count=True)["total"] == 0
    as_member.logout()


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()
