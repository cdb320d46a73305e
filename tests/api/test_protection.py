"""Protected backups and project quotas through the REST API and the CLI (the app in process, on
a real PostgreSQL catalog): the actions, their errors (409 BACKUP_PROTECTED and QUOTA_EXCEEDED,
403 for a member unprotecting or setting quotas, 400 for bad input) and the CLI's one line and
exit status."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from api.cli import protection as protection_cli
from api.cli import resources
from api.client import Client
from tests.api.conftest import World


def _action(world: World, path: str, key: str, name: str, params: Any) -> tuple[int, Any]:
    return world.call("PUT", f"/v1/{path}/actions", key, {name: params})


def test_protection_through_the_rest_api(world: World) -> None:
    own = world.parties["own"]
    backup = world.fresh("volume-backup", "own")
    status, body = _action(
        world, f"volume-backups/{backup}", own.key, "changeVolumeBackupProtection", {"protected": True}
    )
    assert (status, body["inventory"]["protected"]) == (200, True)
    status, body = world.call("DELETE", f"/v1/volume-backups/{backup}", own.key)
    assert (status, body["error"]["code"]) == (409, "BACKUP_PROTECTED"), body
    assert body["error"]["description"].startswith(f"volume backup {backup} is protected: delete refused")
    status, body = world.call("DELETE", f"/v1/volume-backups/{backup}", world.admin_key)
    assert (status, body["error"]["code"]) == (409, "BACKUP_PROTECTED")  # admins too, until unprotected
    status, body = _action(
        world, f"volume-backups/{backup}", own.key, "changeVolumeBackupProtection", {"protected": False}
    )
    assert (status, body["error"]["code"]) == (403, "FORBIDDEN")
    for bad in ({}, {"protected": "no"}, {"protected": 0}):
        status, body = _action(world, f"volume-backups/{backup}", own.key, "changeVolumeBackupProtection", bad)
        assert (status, body["error"]["code"]) == (400, "INVALID_ARGUMENT"), bad
    other = world.parties["other"].rows["volume-backup"]  # another project's: not there for this member
    status, _ = _action(world, f"volume-backups/{other}", own.key, "changeVolumeBackupProtection", {"protected": True})
    assert status == 404
    admin = world.admin_key
    status, body = _action(
        world, f"volume-backups/{backup}", admin, "changeVolumeBackupProtection", {"protected": False}
    )
    assert (status, body["inventory"]["protected"]) == (200, False)
    assert world.call("DELETE", f"/v1/volume-backups/{backup}", own.key)[0] == 202

    group = world.fresh("vm-backup", "own")
    status, body = _action(world, f"vm-backups/{group}", own.key, "changeVmBackupProtection", {"protected": True})
    assert (status, [row["protected"] for row in body["inventories"]]) == (200, [True, True])
    status, body = world.call("DELETE", f"/v1/vm-backups/{group}", own.key)
    assert (status, body["error"]["code"]) == (409, "BACKUP_PROTECTED")


def test_database_backup_protection_is_for_admins(world: World) -> None:
    from shared.catalog import db

    with db.session() as session:
        row = world._row(session, "database-backup", world.parties["own"])
    name = "changeDatabaseBackupProtection"
    status, body = _action(world, f"database-backups/{row}", world.parties["own"].key, name, {"protected": True})
    assert status in (403, 404), body
    status, body = _action(world, f"database-backups/{row}", world.admin_key, name, {"protected": True})
    assert (status, body["inventory"]["protected"]) == (200, True)
    status, body = world.call("DELETE", f"/v1/database-backups/{row}", world.admin_key)
    assert (status, body["error"]["code"]) == (409, "BACKUP_PROTECTED")


def test_project_quotas_through_the_rest_api(world: World) -> None:
    own = world.parties["own"]
    path = f"projects/{own.project}"
    status, body = _action(world, path, own.key, "updateProjectQuota", {"quotaBackupCount": 5})
    assert (status, body["error"]["code"]) == (403, "FORBIDDEN")
    for bad in ({}, {"quotaBackupCount": -1}, {"quotaBackupBytes": "1G"}, {"other": 1}):
        status, body = _action(world, path, world.admin_key, "updateProjectQuota", bad)
        assert (status, body["error"]["code"]) == (400, "INVALID_ARGUMENT"), bad
    status, body = _action(world, f"projects/{own.project[::-1]}", world.admin_key, "updateProjectQuota", {})
    assert status == 404
    status, body = _action(world, path, world.admin_key, "updateProjectQuota", {"quotaBackupCount": 1})
    project = body["inventory"]
    assert status == 200, body
    assert (project["quotaBackupCount"], project["quotaBackupBytes"]) == (1, None)
    assert project["usedBackupCount"] >= 1  # the project's backups made by the world
    status, body = world.call("GET", f"/v1/projects/{own.project}", own.key)
    assert body["inventories"][0]["quotaBackupCount"] == 1  # members see their quotas
    volume = own.rows["volume"]
    status, body = world.call("POST", f"/v1/volumes/{volume}/volume-backups", own.key, {"params": {}})
    assert (status, body["error"]["code"]) == (409, "QUOTA_EXCEEDED"), body
    assert f"project {own.project}: quota quotaBackupCount is 1" in body["error"]["description"]


def _cli_as(world: World, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's client talks to the app in process, with ``key``."""

    def client() -> Client:
        made = Client("http://testserver", key)
        made.http = world.client
        world.client.headers["Authorization"] = f"Bearer {key}"
        return made

    monkeypatch.setattr(resources, "_client", client)
    monkeypatch.setattr(protection_cli, "_client", client)


def test_the_cli_protects_and_refuses_in_one_line(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    own = world.parties["own"]
    backup = world.fresh("volume-backup", "own")
    _cli_as(world, own.key, monkeypatch)
    runner = CliRunner()
    done = runner.invoke(protection_cli.volume_backup, ["protect", backup])
    assert done.exit_code == 0, (done.output, done.exception)
    assert done.output.split() == [backup, "Ready", "True"]  # uuid, name (none), status, protected
    refused = runner.invoke(protection_cli.volume_backup, ["delete", backup])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [
        f"blockvault: error: BACKUP_PROTECTED: volume backup {backup} is protected: delete refused until an admin"
        " unprotects it"
    ]
    refused = runner.invoke(protection_cli.volume_backup, ["unprotect", backup])
    assert (refused.exit_code, refused.output.count("\n")) == (2, 1)
    assert "FORBIDDEN" in refused.output
    refused = runner.invoke(protection_cli.project, ["set-quota", own.project, "--backup-count", "1"])
    assert (refused.exit_code, refused.output.count("\n")) == (2, 1)
    assert runner.invoke(protection_cli.project, ["set-quota", own.project]).exit_code == 2  # nothing to set

    _cli_as(world, world.admin_key, monkeypatch)
    assert runner.invoke(protection_cli.volume_backup, ["unprotect", backup]).exit_code == 0
    done = runner.invoke(
        protection_cli.project, ["set-quota", own.project, "--backup-count", "7", "--backup-bytes", "none"]
    )
    assert done.exit_code == 0, done.output
    assert done.output.split()[:5] == [own.project, "project-own", "None", done.output.split()[3], "7"]
    bad = runner.invoke(protection_cli.project, ["set-quota", own.project, "--backup-count", "many"])
    assert bad.exit_code == 2 and "whole number or 'none'" in bad.output
