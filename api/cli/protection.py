"""``blockvault volume-backup protect|unprotect|protect-vm|unprotect-vm``, ``blockvault
database-backup protect|unprotect`` and ``blockvault project list|set-quota``: protected
backups and per-project quotas (docs/protection.md). The groups are those of
:mod:`api.cli.resources`, with these commands added."""

from __future__ import annotations

import click

from api.cli.resources import JSON, ClientGroup, _client, _list_command, _print, database_backup, volume_backup

__all__ = ["database_backup", "project", "volume_backup"]

PROTECTION_COLUMNS = ("uuid", "name", "status", "protected")
PROJECT_COLUMNS = ("uuid", "name", "quotaBackupBytes", "usedBackupBytes", "quotaBackupCount", "usedBackupCount")


def _protection(group: click.Group, command: str, kind: str, protected: bool, what: str) -> None:
    verb = "Protect" if protected else "Unprotect (admins)"

    @group.command(command, help=f"{verb} {what}: no delete, retention or prune while protected.")
    @click.argument("uuid")
    @JSON
    def change(uuid: str, as_json: bool) -> None:
        _print(_client().change_protection(kind, uuid, protected), as_json, PROTECTION_COLUMNS)


for _protected, _verb in ((True, "protect"), (False, "unprotect")):
    _protection(volume_backup, _verb, "volume", _protected, "a volume backup")
    _protection(volume_backup, f"{_verb}-vm", "vm", _protected, "a VM backup (by its groupUuid)")
    _protection(database_backup, _verb, "database", _protected, "a database backup")

project = ClientGroup("project", help="Projects and their quotas.")
project.add_command(_list_command("projects", PROJECT_COLUMNS))


def _limit(value: str | None) -> int | None:
    return None if value is None or value == "none" else int(value)


@project.command("set-quota")
@click.argument("uuid")
@click.option("--backup-bytes", metavar="BYTES|none", help="Stored bytes of the project's backups ('none': no limit).")
@click.option("--backup-count", metavar="N|none", help="Number of the project's backups ('none': no limit).")
@JSON
def project_set_quota(uuid: str, backup_bytes: str | None, backup_count: str | None, as_json: bool) -> None:
    """Set a project's quotas (admins); a backup of the project starts only while under both."""
    params: dict[str, int | None] = {}
    try:
        if backup_bytes is not None:
            params["quotaBackupBytes"] = _limit(backup_bytes)
        if backup_count is not None:
            params["quotaBackupCount"] = _limit(backup_count)
    except ValueError:
        raise click.UsageError("--backup-bytes and --backup-count take a whole number or 'none'") from None
    if not params:
        raise click.UsageError("give --backup-bytes and/or --backup-count")
    _print(_client().set_project_quota(uuid, **params), as_json, PROJECT_COLUMNS)
