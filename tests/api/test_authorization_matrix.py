"""Who may do what, for EVERY route of the API and every ZStack message, generated from the
route table (the app's OpenAPI document) and the wire's message table: a route or a message
that nobody classified below fails the test, so a new one is covered the day it is added.

Each operation is called by an admin, a plain member of the project that owns the target, a
member of another project and a caller without credentials, on the owner project's resource,
on the other project's, and on shared ones (the ImageStore storage members back up to, the
remote storage they may not see); the status must be the one :class:`Rule` says, and no
answer a member gets may name a row of the other project. The app runs in process on a real
PostgreSQL catalog; the rows are written straight into it (no worker runs: jobs stay queued).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from api.auth import password_digest
from api.routes import ZSTACK_ONLY
from api.zstack_messages import MESSAGES
from shared.catalog.models import (
    new_uuid,
)
from tests.api.conftest import World

Side = Literal["own", "other", "local", "remote"]
PASSWORD = "a password"
# who may act on a route's target: "scoped" (the owner project's members; another project's
# rows are 404), "self" (the caller's own account, keys and jobs), "projectAdmin" (that
# project's projectAdmin; a plain member gets 404), "admin" (admins only: 403 for a member,
# whatever the uuid), "hidden" (admins' rows: a member never sees them, 404), "read" (a
# shared row members may read when they can see it), "public" (no credentials needed)
Who = Literal["scoped", "self", "projectAdmin", "admin", "hidden", "read", "public"]
DENIED = {401, 403, 404}


@dataclass(frozen=True)
class Rule:
    """The policy of one operation: what its path's ``{uuid}`` names (None: a collection), who
    may act, and the sides it is tried on."""

    kind: str | None
    who: Who
    sides: tuple[Side, ...] = ("own", "other")


# -- the policy: every operation of the route table, classified --------------------------------------
RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/v1/health"): Rule(None, "public", ()),
    ("PUT", "/v1/accounts/login"): Rule(None, "public", ()),
    ("DELETE", "/v1/accounts/sessions/{uuid}"): Rule("session", "public", ("own",)),
    ("GET", "/v1/accounts/sessions/{uuid}/valid"): Rule("session", "public", ("own",)),
    ("PUT", "/v1/accounts/sessions/{uuid}/renew"): Rule("session", "self"),
    ("PUT", "/v1/accounts/sessions/{uuid}/actions"): Rule("session", "self"),
    ("GET", "/v1/hosts"): Rule(None, "scoped", ()),
    ("GET", "/v1/hosts/{uuid}"): Rule("host", "hidden", ("other",)),
    ("GET", "/v1/vm-instances"): Rule(None, "scoped", ()),
    ("POST", "/v1/vm-instances"): Rule(None, "admin", ()),
    ("GET", "/v1/vm-instances/{uuid}"): Rule("vm", "scoped"),
    ("DELETE", "/v1/vm-instances/{uuid}"): Rule("vm", "admin"),
    ("PUT", "/v1/vm-instances/{uuid}/actions"): Rule("vm", "scoped"),
    ("GET", "/v1/volumes"): Rule(None, "scoped", ()),
    ("POST", "/v1/volumes"): Rule(None, "admin", ()),
    ("GET", "/v1/volumes/{uuid}"): Rule("volume", "scoped"),
    ("DELETE", "/v1/volumes/{uuid}"): Rule("volume", "admin"),
    ("POST", "/v1/volumes/{uuid}/volume-backups"): Rule("volume", "scoped"),
    ("POST", "/v1/volumes/{uuid}/vm-backups"): Rule("root-volume", "scoped"),
    ("GET", "/v1/backup-storage"): Rule(None, "scoped", ()),
    ("POST", "/v1/backup-storage"): Rule(None, "admin", ()),
    ("GET", "/v1/backup-storage/{uuid}"): Rule("storage", "read", ("local", "remote")),
    ("DELETE", "/v1/backup-storage/{uuid}"): Rule("storage", "admin", ("local", "remote")),
    ("PUT", "/v1/backup-storage/{uuid}/actions"): Rule("storage", "admin", ("local", "remote")),
    ("GET", "/v1/volume-backups"): Rule(None, "scoped", ()),
    ("GET", "/v1/volume-backups/{uuid}"): Rule("volume-backup", "scoped"),
    ("DELETE", "/v1/volume-backups/{uuid}"): Rule("volume-backup", "scoped"),
    ("PUT", "/v1/volume-backups/{uuid}/actions"): Rule("volume-backup", "scoped"),
    ("GET", "/v1/volume-backups/{uuid}/partitions"): Rule("volume-backup", "scoped"),
    ("GET", "/v1/volume-backups/{uuid}/files"): Rule("volume-backup", "scoped"),
    ("GET", "/v1/volume-backups/{uuid}/files/content"): Rule("volume-backup", "scoped"),
    ("GET", "/v1/vm-backups/{uuid}"): Rule("vm-backup", "scoped"),
    ("DELETE", "/v1/vm-backups/{uuid}"): Rule("vm-backup", "scoped"),
    ("PUT", "/v1/vm-backups/{uuid}/actions"): Rule("vm-backup", "scoped"),
    ("GET", "/v1/database-backups"): Rule(None, "scoped", ()),
    ("POST", "/v1/database-backups"): Rule(None, "admin", ()),
    ("GET", "/v1/database-backups/{uuid}"): Rule("database-backup", "hidden", ("other",)),
    ("DELETE", "/v1/database-backups/{uuid}"): Rule("database-backup", "admin", ("other",)),
    ("PUT", "/v1/database-backups/{uuid}/actions"): Rule("database-backup", "admin", ("other",)),
    ("GET", "/v1/databases"): Rule(None, "scoped", ()),
    ("POST", "/v1/databases"): Rule(None, "admin", ()),
    ("GET", "/v1/databases/{uuid}"): Rule("database", "hidden", ("other",)),
    ("DELETE", "/v1/databases/{uuid}"): Rule("database", "admin", ("other",)),
    ("GET", "/v1/scheduler/jobgroups"): Rule(None, "scoped", ()),
    ("POST", "/v1/scheduler/jobgroups"): Rule(None, "scoped", ()),
    ("GET", "/v1/scheduler/jobgroups/{uuid}"): Rule("jobgroup", "scoped"),
    ("DELETE", "/v1/scheduler/jobgroups/{uuid}"): Rule("jobgroup", "scoped"),
    ("PUT", "/v1/scheduler/jobgroups/{uuid}/actions"): Rule("jobgroup", "scoped"),
    ("POST", "/v1/scheduler/jobgroups/{uuid}/jobs"): Rule("jobgroup", "scoped"),
    ("DELETE", "/v1/scheduler/jobgroups/{uuid}/jobs"): Rule("jobgroup", "scoped"),
    ("GET", "/v1/scheduler/jobs"): Rule(None, "scoped", ()),
    ("POST", "/v1/scheduler/jobs"): Rule(None, "scoped", ()),
    ("GET", "/v1/scheduler/jobs/{uuid}"): Rule("job", "scoped"),
    ("DELETE", "/v1/scheduler/jobs/{uuid}"): Rule("job", "scoped"),
    ("PUT", "/v1/scheduler/jobs/{uuid}/actions"): Rule("job", "scoped"),
    ("GET", "/v1/scheduler/triggers"): Rule(None, "scoped", ()),
    ("POST", "/v1/scheduler/triggers"): Rule(None, "scoped", ()),
    ("GET", "/v1/scheduler/triggers/{uuid}"): Rule("trigger", "scoped"),
    ("GET", "/v1/scheduler/triggers/{uuid}/fire-times"): Rule("trigger", "scoped"),
    ("DELETE", "/v1/scheduler/triggers/{uuid}"): Rule("trigger", "scoped"),
    ("PUT", "/v1/scheduler/triggers/{uuid}/actions"): Rule("trigger", "scoped"),
    ("POST", "/v1/scheduler/triggers/{trigger_uuid}/jobgroups/{group_uuid}"): Rule("trigger+jobgroup", "scoped"),
    ("DELETE", "/v1/scheduler/triggers/{trigger_uuid}/jobgroups/{group_uuid}"): Rule("attachment", "scoped"),
    ("GET", "/v1/scheduler/jobhistories"): Rule(None, "scoped", ()),
    ("GET", "/v1/user-tags"): Rule(None, "scoped", ()),
    ("POST", "/v1/user-tags"): Rule(None, "scoped", ()),
    ("GET", "/v1/user-tags/{uuid}"): Rule("user-tag", "scoped"),
    ("DELETE", "/v1/user-tags/{uuid}"): Rule("user-tag", "scoped"),
    ("GET", "/v1/system-tags"): Rule(None, "scoped", ()),
    ("GET", "/v1/system-tags/{uuid}"): Rule("system-tag", "scoped"),
    ("GET", "/v1/projects"): Rule(None, "scoped", ()),
    ("POST", "/v1/projects"): Rule(None, "admin", ()),
    ("GET", "/v1/projects/{uuid}"): Rule("project", "scoped"),
    ("POST", "/v1/projects/{uuid}/members"): Rule("project", "projectAdmin"),
    ("PUT", "/v1/projects/{uuid}/actions"): Rule("project", "admin"),
    ("DELETE", "/v1/projects/{uuid}/members/{accountUuid}"): Rule("membership", "projectAdmin"),
    ("GET", "/v1/accounts"): Rule(None, "scoped", ()),
    ("POST", "/v1/accounts"): Rule(None, "admin", ()),
    ("GET", "/v1/accounts/{uuid}"): Rule("account", "self"),
    ("PUT", "/v1/accounts/{uuid}/actions"): Rule("account", "self"),
    ("GET", "/v1/api-keys"): Rule(None, "scoped", ()),
    ("POST", "/v1/api-keys"): Rule(None, "self", ()),
    ("GET", "/v1/api-keys/{uuid}"): Rule("api-key", "self"),
    ("DELETE", "/v1/api-keys/{uuid}"): Rule("api-key", "self"),
    ("GET", "/v1/accesskeys"): Rule(None, "scoped", ()),
    ("POST", "/v1/accesskeys"): Rule(None, "admin", ()),
    ("GET", "/v1/accesskeys/{uuid}"): Rule("access-key", "self"),
    ("DELETE", "/v1/accesskeys/{uuid}"): Rule("access-key", "self"),
    ("PUT", "/v1/accesskeys/{uuid}/actions"): Rule("access-key", "admin"),
    ("GET", "/v1/api-jobs/{uuid}"): Rule("api-job", "self"),
    ("GET", "/v1/overview"): Rule(None, "scoped", ()),
    ("GET", "/v1/notification-targets"): Rule(None, "admin", ()),
    ("POST", "/v1/notification-targets"): Rule(None, "admin", ()),
    ("GET", "/v1/notification-targets/{uuid}"): Rule("notification-target", "admin", ("other",)),
    ("PUT", "/v1/notification-targets/{uuid}/actions"): Rule("notification-target", "admin", ("other",)),
    ("DELETE", "/v1/notification-targets/{uuid}"): Rule("notification-target", "admin", ("other",)),
    ("GET", "/v1/notification-rules"): Rule(None, "admin", ()),
    ("POST", "/v1/notification-rules"): Rule(None, "admin", ()),
    ("GET", "/v1/notification-rules/{uuid}"): Rule("notification-rule", "admin", ("other",)),
    ("PUT", "/v1/notification-rules/{uuid}/actions"): Rule("notification-rule", "admin", ("other",)),
    ("DELETE", "/v1/notification-rules/{uuid}"): Rule("notification-rule", "admin", ("other",)),
    ("GET", "/v1/notification-events"): Rule(None, "admin", ()),
    ("GET", "/v1/notification-histories"): Rule(None, "admin", ()),
    # ZStack's own paths, under /zstack/v1 only (api/routes/zstack_paths.py): the rule of the /v1
    # handler each delegates to
    ("POST", "/zstack/v1/volumes/data-volume/from/volume-template/{uuid}"): Rule("volume-backup", "scoped"),
    ("PUT", "/zstack/v1/volume-backups/imageStore/{uuid}/actions"): Rule("storage", "admin", ("local", "remote")),
    ("PUT", "/zstack/v1/vm-backups/imageStore/{uuid}/actions"): Rule("storage", "admin", ("local", "remote")),
    ("PUT", "/zstack/v1/database-backups/imageStore/{uuid}/actions"): Rule("storage", "admin", ("local", "remote")),
    ("PUT", "/zstack/v1/database-backups/{uuid}/backup-storage/{backupStorageUuid}/actions"): Rule(
        "database-backup", "admin", ("other",)
    ),
    ("POST", "/zstack/v1/backup-storage/image-store"): Rule(None, "admin", ()),
    ("GET", "/zstack/v1/backup-storage/image-store"): Rule(None, "scoped", ()),
    ("GET", "/zstack/v1/backup-storage/image-store/{uuid}"): Rule("storage", "read", ("local",)),  # ImageStore only
    ("PUT", "/zstack/v1/backup-storage/image-store/{uuid}/actions"): Rule("storage", "admin", ("local", "remote")),
    ("GET", "/zstack/v1/backup-storage/capacities"): Rule(None, "scoped", ()),
    ("POST", "/zstack/v1/scheduler/jobgroups/{uuid}/job"): Rule("jobgroup", "scoped"),
    ("DELETE", "/zstack/v1/scheduler/jobgroups/{uuid}/job"): Rule("jobgroup", "scoped"),
    ("POST", "/zstack/v1/scheduler/jobgroups/{group_uuid}/scheduler/triggers/{trigger_uuid}"): Rule(
        "trigger+jobgroup", "scoped"
    ),
    ("DELETE", "/zstack/v1/scheduler/jobgroups/{group_uuid}/scheduler/triggers/{trigger_uuid}"): Rule(
        "attachment", "scoped"
    ),
    ("GET", "/zstack/v1/scheduler/job/history"): Rule(None, "scoped", ()),
    ("GET", "/zstack/v1/scheduler/job/history/{uuid}"): Rule(None, "scoped", ()),
    ("DELETE", "/zstack/v1/tags/{uuid}"): Rule("user-tag", "scoped"),
}
# the routes above under /zstack/v1 only (not in the OpenAPI document: ZStack's SDKs have their own)
ZSTACK_OPERATIONS = [
    (method, f"/zstack/v1{route.path}") for route in ZSTACK_ONLY.routes for method in getattr(route, "methods", ())
]


# -- bodies: a valid request of each operation for a side -------------------------------------------
def action_params(world: World, side: str) -> dict[str, dict[str, Any]]:
    """Parameters of each action that make it valid for ``side``'s caller (its own project's
    rows, storage it may use); actions not named get ``{}``."""
    rows = world.parties["own" if side in ("own", "local", "remote") else "other"].rows
    local, second = world.shared["local"], world.shared["local-2"]
    return {
        "revertVolumeFromVolumeBackup": {"backupStorageUuid": local},
        "createDataVolumeFromVolumeBackup": {"name": "restored"},
        "verifyVolumeBackup": {"backupStorageUuid": local},
        "changeVolumeBackupState": {"stateEvent": "disable"},
        "changeVolumeBackupProtection": {"protected": True},
        "changeVmBackupProtection": {"protected": True},
        "changeDatabaseBackupProtection": {"protected": True},
        "updateProjectQuota": {"quotaBackupCount": 100},
        "updateVolumeBackup": {"name": "renamed"},
        "syncBackupFromImageStoreBackupStorage": {"dstBackupStorageUuid": second},
        "recoverBackupFromImageStoreBackupStorage": {"srcBackupStorageUuid": local, "dstBackupStorageUuid": second},
        "revertVmFromVmBackup": {"backupStorageUuid": local},
        "syncVmBackupFromImageStoreBackupStorage": {"dstBackupStorageUuid": second},
        "recoverVmBackupFromImageStoreBackupStorage": {"srcBackupStorageUuid": local, "dstBackupStorageUuid": second},
        "syncDatabaseBackupFromImageStoreBackupStorage": {"dstBackupStorageUuid": second},
        "recoverDatabaseBackup": {"backupStorageUuid": local, "databaseUrl": "postgresql://x/none", "force": False},
        "changeBackupStorageState": {"stateEvent": "enable"},
        "updateBackupStorage": {"name": "renamed"},
        "updateVmInstance": {"name": "renamed"},
        "updateSchedulerJobGroup": {"name": "renamed"},
        "changeSchedulerJobGroupState": {"stateEvent": "disable"},
        "updateSchedulerJob": {"name": "renamed"},
        "updateSchedulerTrigger": {"name": "renamed"},
        "runSchedulerTrigger": {},
        "updateAccount": {"description": "changed"},
        "updateNotificationTarget": {"name": "renamed"},
        "changeNotificationTargetState": {"stateEvent": "disable"},
        "updateNotificationRule": {"name": "renamed"},
        "changeNotificationRuleState": {"stateEvent": "disable"},
        "renewSession": {"duration": 600},
        "changeAccessKeyState": {"stateEvent": "disable"},
        "_jobs": {"targetResourceUuids": [rows["volume"]]},
        "_tag": {"resourceUuid": rows["vm"], "resourceType": "VmInstanceVO", "tag": "x"},
    }


def collection_body(world: World, path: str, key: str | None, side: str) -> dict[str, Any]:
    rows = world.parties[side].rows
    party = world.parties[side]
    local = world.shared["local"]
    return {
        "/v1/vm-instances": {"params": {"name": "vm", "hostUuid": world.host}},
        "/v1/volumes": {"params": {"hostUuid": world.host, "installPath": f"{world.tmp}/{new_uuid()}.raw"}},
        "/v1/backup-storage": {"params": {"name": "x", "url": f"file://{world.tmp}/bs-{new_uuid()}"}},
        "/zstack/v1/backup-storage/image-store": {
            "params": {"name": "x", "url": f"file://{world.tmp}/is-{new_uuid()}"}
        },
        "/v1/database-backups": {"params": {}},
        "/v1/scheduler/jobgroups": {
            "params": {
                "name": "g",
                "type": "volumeBackup",
                "parameters": {"backupStorageUuids": [local]},
            }
        },
        "/v1/scheduler/jobs": {"params": {"name": "j", "type": "volumeBackup", "targetResourceUuid": rows["volume"]}},
        "/v1/scheduler/triggers": {"params": {"name": "t", "schedulerType": "simple", "schedulerInterval": 60}},
        "/v1/user-tags": {"params": {"resourceUuid": rows["vm"], "resourceType": "VmInstanceVO", "tag": "x"}},
        "/v1/projects": {"params": {"name": f"p-{new_uuid()[:8]}"}},
        "/v1/accounts": {"params": {"name": f"a-{new_uuid()[:8]}"}},
        "/v1/api-keys": {"params": {"accountUuid": party.account}},
        "/v1/accesskeys": {"params": {"accountUuid": party.account}},
        "/v1/databases": {"params": {"name": "db", "url": "mysql://u:p@127.0.0.1:9/db"}},
        "/v1/notification-targets": {"params": {"name": "t", "type": "webhook", "url": "http://127.0.0.1:9/hook"}},
        "/v1/notification-rules": {
            "params": {"name": "r", "eventType": "jobFailed", "targetUuids": [world.fresh("notification-target", side)]}
        },
    }[path]


def probe_actions(world: World, path: str) -> list[str]:
    """The actions an ``/actions`` route takes, as it names them when asked for an unknown one."""
    status, body = world.call("PUT", path, world.admin_key, {"__probe__": {}})
    assert status == 400, body
    found = re.search(r"expected one of: (.*)$", body["error"]["description"])
    assert found, body
    return [name.strip() for name in found.group(1).split(",")]


@dataclass
class Case:
    method: str
    template: str
    rule: Rule
    side: str  # whose target: own / other / local / remote, or "" for a collection
    action: str | None = None


def expected(rule: Rule, caller: str, side: str) -> str:
    """ "allowed" (any answer but 401/403/404/5xx), or the one status the caller gets."""
    if caller == "nokey":
        return "allowed" if rule.who == "public" else "401"
    if caller == "admin" or rule.who == "public":
        return "allowed"
    # a member of the owner project ("own") or of the other one ("other")
    if rule.who == "admin":
        return "403"
    if rule.who == "read":  # members see the ImageStore storage they back up to, nothing else
        return "allowed" if side == "local" else "404"
    if rule.kind is None:  # a collection: each member sees its own rows in it
        return "allowed"
    if rule.who in ("hidden", "projectAdmin") or side != caller:
        return "404"
    return "allowed"


def test_every_route_answers_each_caller_as_its_rule_says(world: World) -> None:
    operations = [
        (method.upper(), path)
        for path, ops in world.client.app.openapi()["paths"].items()
        for method in ops  # type: ignore[attr-defined]
    ] + ZSTACK_OPERATIONS
    unclassified = sorted(set(operations) - set(RULES))
    assert not unclassified, f"routes with no rule in RULES (add one): {unclassified}"
    assert not set(RULES) - set(operations), f"rules of routes that are gone: {set(RULES) - set(operations)}"

    cases: list[Case] = []
    for method, template in operations:
        rule = RULES[(method, template)]
        for side in rule.sides or ("",):
            if template.endswith("/actions"):
                sample = template.replace("{uuid}", world.fresh(kind_of(rule, side), side))
                cases += [Case(method, template, rule, side, name) for name in probe_actions(world, sample)]
            else:
                cases.append(Case(method, template, rule, side))
    failures: list[str] = []
    tried = 0
    for case in cases:
        for caller in ("nokey", "other", "own", "admin"):
            if case.rule.who == "public" and caller != "nokey":
                continue
            status, body = send(world, case, caller)
            tried += 1
            want = expected(case.rule, caller, case.side or "own")
            ok = (status not in DENIED and status < 500) if want == "allowed" else str(status) == want
            if not ok:
                failures.append(
                    f"{case.method} {case.template} [{case.action or ''}] {case.side} as {caller}: "
                    f"{status} (want {want}) {json.dumps(body)[:300]}"
                )
    assert tried > 400
    assert not failures, "\n".join(failures)
    # not one answer the owner project's member got names a row of the other project
    others = world.other_rows | {world.parties["other"].project, world.parties["other"].account, world.shared["remote"]}
    leaks = [
        (uuid, answer[:400])
        for asked, answer in world.seen
        for uuid in sorted(others)
        if uuid in answer and uuid not in asked  # (an error may quote what the caller sent)
    ]
    assert leaks == []


def kind_of(rule: Rule, side: str) -> str:
    assert rule.kind is not None
    return side if rule.kind == "storage" else rule.kind


def send(world: World, case: Case, caller: str) -> tuple[int, Any]:
    key = world.admin_key if caller == "admin" else None if caller == "nokey" else world.parties[caller].key
    path = case.template
    # a fresh target for every call that may change it (the same row for every caller)
    target_side = case.side if case.side in ("own", "other", "local", "remote") else "own"
    if case.rule.kind is not None:
        target = world.fresh(kind_of(case.rule, target_side), target_side)
        if case.rule.kind in ("trigger+jobgroup", "attachment"):
            trigger, group = target.split("/")
            path = path.replace("{trigger_uuid}", trigger).replace("{group_uuid}", group)
        elif case.rule.kind == "membership":
            project, account = target.split("/")
            path = path.replace("{uuid}", project).replace("{accountUuid}", account)
        else:
            path = path.replace("{uuid}", target)
    path = path.replace("{backupStorageUuid}", world.shared["local"])
    body: Any = None
    query: dict[str, Any] = {}
    # the caller's own rows in request bodies (an admin acts for the target's side)
    body_side = caller if caller in ("own", "other") else ("own" if target_side in ("local", "remote") else target_side)
    if case.template == "/v1/accounts/login":
        body = {"logInByAccount": {"accountName": "member-own", "password": password_digest(PASSWORD)}}
    elif case.action is not None:
        body = {case.action: action_params(world, body_side).get(case.action, {})}
    elif case.method in ("POST", "PUT") and case.rule.kind is None:
        body = collection_body(world, case.template, key, body_side)
    elif case.template.endswith(("-backups", "/members")) and case.method == "POST":
        body = {"params": {}}
    elif case.template.endswith("/jobs") and case.method == "POST":
        body = {"params": action_params(world, body_side)["_jobs"]}
    elif case.template.endswith("/jobs") and case.method == "DELETE":
        query = {"targetResourceUuids": world.parties[body_side].rows["volume"]}
    elif case.template.endswith("/job") and case.rule.kind is not None:  # ZStack's: the group's own job
        jobs = [world.group_jobs.get(path.split("/")[-2], new_uuid())]
        body, query = (
            ({"params": {"schedulerJobUuids": jobs}}, {})
            if case.method == "POST"
            else (None, {"schedulerJobUuids": jobs[0]})
        )
    elif "/volume-template/" in case.template:
        body = {"params": {"name": "restored"}}
    elif case.template.endswith("/members") and case.method == "POST":
        body = {"params": {"accountUuid": world.parties[body_side].account}}
    status, answer = world.call(case.method, path, key, body, **query)
    if caller == "own":
        world.seen.append((f"{path} {json.dumps(body)} {query}", json.dumps(answer)))
    return status, answer


# -- the ZStack wire: every message of its table, through the same policy ----------------------------
def _sentinel(index: int) -> str:
    return f"{index:032x}"


def wire_target(message: Any) -> tuple[list[str], tuple[str, str]]:
    """Which parameters of ``message`` name the target of the REST call it makes (in the
    path's order), and that call's (method, template): found by building the call with a
    distinct stand-in for each parameter and matching the path against the route table."""
    params: dict[str, Any] = {}
    for index, param in enumerate(message.params, 1):
        name = param.lstrip("*")
        if name == "uuid" or name.endswith("Uuid"):
            params[name] = _sentinel(index)
        elif name.endswith("Uuids"):
            params[name] = [_sentinel(index)]
        elif name == "conditions":
            params[name] = []
        elif param.startswith("*"):
            params[name] = "x"
    rest = message.rest(params)
    for (method, template), _rule in RULES.items():
        pattern = "^" + re.sub(r"\{\w+\}", "([^/]+)", template) + "$"
        found = re.match(pattern, rest.path)
        if method == rest.method and found:
            named = {value: name for name, value in params.items() if isinstance(value, str)}
            return [named[value] for value in found.groups() if value in named], (method, template)
    raise AssertionError(f"{message.name}: {rest.method} {rest.path} is no route of the table")


def wire_params(world: World, message: Any, side: str) -> dict[str, Any]:
    """Values for every parameter a message takes, from ``side``'s project and the storage its
    member may use."""
    rows = world.parties[side].rows
    local, second = world.shared["local"], world.shared["local-2"]
    values: dict[str, Any] = {
        "volumeUuid": rows["volume"],
        "rootVolumeUuid": rows["root-volume"],
        "backupStorageUuid": local,
        "srcBackupStorageUuid": local,
        "dstBackupStorageUuid": second,
        "name": "x",
        "type": "volumeBackup",
        "targetResourceUuid": rows["volume"],
        "schedulerJobUuids": [world.fresh("job", side)],
        "schedulerJobGroupUuid": world.fresh("jobgroup", side),
        "schedulerTriggerUuid": world.fresh("trigger", side),
        "schedulerInterval": 60,
        "schedulerType": "simple",
        "conditions": [],
        "stateEvent": "enable",
        "resourceUuid": rows["vm"],
        "resourceType": "VmInstanceVO",
        "tag": "x",
    }
    out: dict[str, Any] = {}
    for param in message.params:
        name = param.lstrip("*")
        if name in values:
            out[name] = values[name]
        elif param.startswith("*"):
            out[name] = "x"
    return out


def test_every_wire_message_answers_each_caller_as_its_route_does(world: World) -> None:
    failures: list[str] = []
    tried = 0
    for message in MESSAGES.values():
        if not message.session:  # LogInByAccount, LogOut: they take no session
            continue
        targets, operation = wire_target(message)
        rule = RULES[operation]
        for side in (rule.sides or ("",)) if targets else ("",):
            for caller in ("nokey", "other", "own", "admin"):
                body_side = caller if caller in ("own", "other") else ("other" if side == "other" else "own")
                params = wire_params(world, message, body_side)
                if targets:
                    params.update(zip(targets, world.fresh(kind_of(rule, side), side).split("/"), strict=True))
                    if "schedulerJobUuids" in params and params[targets[0]] in world.group_jobs:
                        params["schedulerJobUuids"] = [world.group_jobs[params[targets[0]]]]
                key = world.admin_key if caller == "admin" else None if caller == "nokey" else world.parties[caller].key
                if key:
                    params["session"] = {"uuid": key}
                response = world.client.post("/zstack/api/", json={message.java_class: params})
                tried += 1
                want = expected(rule, caller, side or "own")
                status = response.status_code
                ok = (status not in DENIED and status < 500) if want == "allowed" else str(status) == want
                if not ok:
                    failures.append(f"{message.name} {side} as {caller}: {status} (want {want}) {response.text[:300]}")
    assert tried > 150
    assert not failures, "\n".join(failures)
