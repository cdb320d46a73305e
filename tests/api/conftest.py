"""API tests' fixtures: the app in process (FastAPI's TestClient) with the settings a test
gives (:func:`app_client`), and a world (:class:`World`): two projects, each with a member
and every kind of row, shared storage, on a real PostgreSQL catalog (rows written straight
into it; no worker runs, so jobs stay queued)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import password_digest
from shared.catalog import db
from shared.catalog.models import (
    ApiJob,
    BackupStorage,
    DatabaseBackup,
    DatabaseBackupStorageRef,
    Host,
    ManagedDatabase,
    NotificationRule,
    NotificationTarget,
    SchedulerJob,
    SchedulerJobGroup,
    SchedulerJobGroupTriggerRef,
    SchedulerTrigger,
    Tag,
    VmInstance,
    Volume,
    VolumeBackup,
    VolumeBackupStorageRef,
    new_uuid,
    now,
)
from shared.config import get_settings
from shared.notifications.targets import configure


@contextlib.contextmanager
def app_client(monkeypatch: pytest.MonkeyPatch, settings: dict[str, str]) -> Iterator[TestClient]:
    """The app started (its lifespan run) with exactly ``settings`` (``NAME`` for
    ``BLOCKVAULT_NAME``) in the environment, on the catalog ``DATABASE_URL`` names."""
    for name in list(os.environ):
        if name.startswith("BLOCKVAULT_"):
            monkeypatch.delenv(name)
    for name, value in settings.items():
        monkeypatch.setenv("BLOCKVAULT_" + name, value)
    get_settings.cache_clear()
    db.reset()  # the default session factory follows the settings of this test
    try:
        with TestClient(create_app()) as client:
            yield client
    finally:
        db.engine(get_settings().catalog_url).dispose()
        db.reset()
        get_settings.cache_clear()


def admin_settings(catalog_url: str, tmp: Path, **more: str) -> tuple[str, dict[str, str]]:
    """A fresh admin key and the settings of an app on ``catalog_url`` that seeds it (``more``
    added, ``NAME`` for ``BLOCKVAULT_NAME``)."""
    admin_key = "test-admin-" + secrets.token_hex(12)
    return admin_key, {"DATABASE_URL": catalog_url, "DATA_DIR": str(tmp / "data"), "ADMIN_API_KEY": admin_key, **more}


PASSWORD = "a password"


@dataclass
class Party:
    """One project's member and rows."""

    key: str = ""
    account: str = ""
    project: str = ""
    rows: dict[str, str] = field(default_factory=dict)


class World:
    def __init__(self, client: TestClient, admin_key: str, tmp: Path) -> None:
        self.client, self.admin_key, self.tmp = client, admin_key, tmp
        self.host = new_uuid()
        self.parties = {"own": Party(), "other": Party()}
        self.shared: dict[str, str] = {}
        self.seen: list[tuple[str, str]] = []  # what the owner project's member asked, and was answered
        self.other_rows: set[str] = set()  # every row made in the other project
        self.group_jobs: dict[str, str] = {}  # a fresh job group's job

    def call(self, method: str, path: str, key: str | None, body: Any = None, **query: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = self.client.request(method, path, headers=headers, json=body, params=query or None)
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, response.text

    def admin(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        status, answer = self.call(method, f"/v1{path}", self.admin_key, body)
        assert status == 200, (path, answer)
        return dict(answer)

    def build(self) -> None:
        with db.session() as session:
            session.add(
                Host(
                    uuid=self.host,
                    name="h1",
                    status="Connected",
                    lastHeartbeat=now() + timedelta(days=1),  # never reaped while the test runs
                    volumeRoots=[str(self.tmp)],
                    vmSocketDir=str(self.tmp),
                )
            )
        local = self.admin("POST", "/backup-storage", {"params": {"name": "local", "url": f"file://{self.tmp}/bs"}})
        self.shared["local"] = local["inventory"]["uuid"]
        self.shared["repository"] = local["inventory"]["repositoryUuid"]
        second = {"params": {"name": "local-2", "url": f"file://{self.tmp}/bs2", "role": "standby"}}
        self.shared["local-2"] = self.admin("POST", "/backup-storage", second)["inventory"]["uuid"]
        self.shared["remote"] = self.fresh("remote", "other")
        for side, party in self.parties.items():
            party.project = self.admin("POST", "/projects", {"params": {"name": f"project-{side}"}})["inventory"][
                "uuid"
            ]
            party.account = self.admin("POST", "/accounts", {"params": {"name": f"member-{side}"}})["inventory"]["uuid"]
            self.admin("POST", f"/projects/{party.project}/members", {"params": {"accountUuid": party.account}})
            self.admin("PUT", f"/accounts/{party.account}/actions", {"updateAccount": {"password": PASSWORD}})
            party.key = self.admin("POST", "/api-keys", {"params": {"accountUuid": party.account}})["inventory"]["key"]
            for kind in KINDS:
                party.rows[kind] = self.fresh(kind, side)

    # one fresh row of a kind, in a side's project (operations that change rows get their own)
    def fresh(self, kind: str, side: str) -> str:
        if kind == "local":
            return self.shared[kind]
        if kind == "remote":  # (an admin may delete it: one each call)
            with db.session() as session:
                remote = BackupStorage(name="remote", type="Remote", url=f"http://127.0.0.1:9/{new_uuid()}")
                session.add(remote)
                session.flush()
                self.other_rows.add(remote.uuid)
                return remote.uuid
        party = self.parties.get(side) or self.parties["other"]
        if kind in ("account", "api-key", "access-key", "session", "membership"):
            made = self._identity(kind, party)
        else:
            with db.session() as session:
                made = self._row(session, kind, party)
        if party is self.parties["other"] and kind not in ("host", "session"):
            self.other_rows.update(made.split("/"))
        return made

    def _identity(self, kind: str, party: Party) -> str:
        if kind == "account":
            return party.account
        if kind == "membership":
            other = self.admin("POST", "/accounts", {"params": {"name": f"joiner-{new_uuid()[:8]}"}})["inventory"]
            body = {"params": {"accountUuid": other["uuid"]}}
            self.admin("POST", f"/projects/{party.project}/members", body)
            return f"{party.project}/{other['uuid']}"
        if kind == "api-key":
            body = {"params": {"accountUuid": party.account}}
            return str(self.admin("POST", "/api-keys", body)["inventory"]["uuid"])
        if kind == "access-key":
            body = {"params": {"accountUuid": party.account}}
            return str(self.admin("POST", "/accesskeys", body)["inventory"]["uuid"])
        login = {
            "logInByAccount": {"accountName": f"member-{side_of(self, party)}", "password": password_digest(PASSWORD)}
        }
        status, body = self.call("PUT", "/v1/accounts/login", None, login)
        assert status == 200, body
        return str(body["inventory"]["uuid"])

    def _volume(self, session: Any, party: Party, vm: str | None, kind: str = "Data") -> Volume:
        path = self.tmp / f"{new_uuid()}.raw"
        path.write_bytes(b"\1" * 4096)
        volume = Volume(
            hostUuid=self.host,
            vmInstanceUuid=vm,
            projectUuid=None if vm else party.project,
            type=kind,
            installPath=str(path),
            size=4096,
            name=path.name,
        )
        session.add(volume)
        session.flush()
        return volume

    def _on_local(self) -> dict[str, str]:
        """A Ready copy's fields on the shared ImageStore storage."""
        where = f"zstore://{self.shared['repository']}/{secrets.token_hex(32)}"
        return {"backupStorageUuid": self.shared["local"], "status": "Ready", "installPath": where}

    def _backup(self, session: Any, volume: Volume, group: str | None = None) -> VolumeBackup:
        backup = VolumeBackup(volumeUuid=volume.uuid, type=volume.type, status="Ready", groupUuid=group, size=4096)
        backup.backupStorageRefs.append(VolumeBackupStorageRef(**self._on_local()))
        session.add(backup)
        session.flush()
        return backup

    def _row(self, session: Any, kind: str, party: Party) -> str:
        if kind in ("vm", "root-volume", "vm-backup"):
            vm = VmInstance(name="vm", hostUuid=self.host, projectUuid=party.project)
            session.add(vm)
            session.flush()
            root = self._volume(session, party, vm.uuid, "Root")
            data = self._volume(session, party, vm.uuid)
            if kind == "vm":
                return vm.uuid
            if kind == "root-volume":
                return root.uuid
            group = new_uuid()
            self._backup(session, root, group)
            self._backup(session, data, group)
            return group
        if kind == "volume":
            return self._volume(session, party, None).uuid
        if kind == "volume-backup":
            return self._backup(session, self._volume(session, party, None)).uuid
        if kind == "database":
            database = ManagedDatabase(name="db", host="127.0.0.1", port=9, username="u", databaseName="db")
            session.add(database)
            session.flush()
            return database.uuid
        if kind == "database-backup":
            row = DatabaseBackup(name="db", status="Ready", size=1)
            row.backupStorageRefs.append(DatabaseBackupStorageRef(**self._on_local()))
            session.add(row)
            session.flush()
            return row.uuid
        if kind == "host":
            return self.host
        if kind in ("jobgroup", "job", "trigger", "trigger+jobgroup", "attachment"):
            group = SchedulerJobGroup(name="g", jobType="volumeBackup", jobData={}, projectUuid=party.project)
            trigger = SchedulerTrigger(
                name="t", schedulerType="simple", schedulerInterval=3600, projectUuid=party.project
            )
            session.add_all([group, trigger])
            session.flush()
            volume = self._volume(session, party, None)
            job = SchedulerJob(
                name="j", schedulerJobGroupUuid=group.uuid, targetResourceUuid=volume.uuid, jobType="volumeBackup"
            )
            session.add(job)
            if kind == "attachment":
                session.add(
                    SchedulerJobGroupTriggerRef(schedulerJobGroupUuid=group.uuid, schedulerTriggerUuid=trigger.uuid)
                )
            session.flush()
            self.group_jobs[group.uuid] = job.uuid
            return {"jobgroup": group.uuid, "job": job.uuid, "trigger": trigger.uuid}.get(
                kind, f"{trigger.uuid}/{group.uuid}"
            )
        if kind in ("user-tag", "system-tag"):
            vm = self._row(session, "vm", party)
            tag = Tag(
                resourceUuid=vm, resourceType="VmInstanceVO", tag=f"t-{kind}", type=kind.split("-", maxsplit=1)[0]
            )
            session.add(tag)
            session.flush()
            return tag.uuid
        if kind == "project":
            return party.project
        if kind in ("notification-target", "notification-rule"):
            target = NotificationTarget(name="hook", type="webhook")
            configure(target, {"url": "http://127.0.0.1:9/hook", "secret": "a-webhook-secret"})  # nothing listens
            session.add(target)
            if kind == "notification-target":
                return target.uuid
            rule = NotificationRule(name="r", eventType="jobFailed", targetUuids=[target.uuid])
            session.add(rule)
            session.flush()
            return rule.uuid
        if kind == "api-job":
            job = ApiJob(action="createVolumeBackup", accountUuid=party.account, state="Succeeded", result={})
            session.add(job)
            session.flush()
            return job.uuid
        raise AssertionError(f"no rows of kind {kind}")


def side_of(world: World, party: Party) -> str:
    return next(side for side, each in world.parties.items() if each is party)


KINDS = (
    "vm",
    "root-volume",
    "volume",
    "volume-backup",
    "vm-backup",
    "jobgroup",
    "job",
    "trigger",
    "user-tag",
    "system-tag",
    "api-job",
)


@pytest.fixture
def world(pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    admin_key, settings = admin_settings(pg_database, tmp_path, AUTH_MAX_FAILURES="100000")  # no-key calls: many
    with app_client(monkeypatch, settings) as client:
        built = World(client, admin_key, tmp_path)
        built.build()
        yield built
