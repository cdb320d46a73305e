"""``blockvault rebuild``: a data center back from one backup storage alone.

On a fresh machine with an empty catalog (``BLOCKVAULT_DATABASE_URL``, or the embedded SQLite
file): recover the newest database backup the storage holds into the catalog, bring its
schema to this version, register the storage (or refresh its credentials when the recovered
catalog knows it), import every backup taken after that database backup by scanning the
storage, and with ``--restore-volumes DIR`` restore the newest backup of every volume. Works
from a local folder, a remote storage-server or an S3 bucket.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from sqlalchemy import func, select

from api.cli.storage_flags import StorageCommand, credential_params, url_prefixes
from shared import storage
from shared.catalog import db
from shared.catalog.models import BackupStorage, DatabaseBackup, VmInstance, Volume, VolumeBackup
from shared.config import get_settings
from shared.credentials import credentials_of, seal_plaintext, set_credentials
from shared.errors import NotFound, UsageError
from shared.repository.manifest import BackupEntry
from shared.repository.repo import Repository, parse_install_path
from shared.repository.restore import restore_backup
from shared.service import scan
from shared.service.database_backups import recover_into


def _storage_params(url: str, options: dict[str, str | None]) -> dict[str, Any]:
    kind = storage.type_of_url(url)
    if kind is None:
        raise UsageError(detail=f"--backup-storage-url must be {url_prefixes()}, got {url!r}")
    return {"type": kind, "url": url, **credential_params(kind, options)}


def _newest_database_backup(repo: Repository) -> BackupEntry:
    dumps = [e for e in repo.backups() if e.manifest.kind == "stream" and e.manifest.volume.startswith("database:")]
    if not dumps:
        raise NotFound(resource="database backup", uuid=f"any on {repo.location}")
    return dumps[-1]


def rebuild(url: str, options: dict[str, str | None], *, restore_dir: Path | None, force: bool) -> dict[str, Any]:
    """Do the whole rebuild; a report of what came back."""
    started = time.monotonic()
    params = _storage_params(url, options)
    probe = BackupStorage(uuid="rebuild", name="rebuild", type=params["type"], url=params["url"])
    set_credentials(probe, params)
    repo = storage.open_repository(probe)
    newest = _newest_database_backup(repo)
    catalog = get_settings().catalog_url
    loaded = recover_into(repo, newest.id, catalog, force=force)
    db.reset()
    db.migrate()
    report: dict[str, Any] = {
        "databaseBackup": {"id": newest.id, "name": newest.manifest.name, "created": newest.manifest.created},
        "databaseBytes": loaded,
    }
    with db.session() as session:
        seal_plaintext(session)  # a catalog of an earlier version held them in the clear
        row = session.scalars(select(BackupStorage).where(BackupStorage.url == params["url"])).first()
        if row is None:
            row = storage.register_storage(session, params)
        else:  # the recovered catalog knows it: take the credentials given now, sealed to this deployment
            set_credentials(row, credentials_of(probe))
            row.state = "Enabled"
            storage.probe(row)
        session.commit()
        report["backupStorageUuid"] = row.uuid
        report["scan"] = scan.scan_storage(session, row)
        report["vmInstances"] = [v.uuid for v in session.scalars(select(VmInstance))]
        report["volumes"] = [v.uuid for v in session.scalars(select(Volume))]
        report["volumeBackups"] = session.scalar(
            select(func.count()).select_from(VolumeBackup).where(VolumeBackup.status == "Ready")
        )
        report["databaseBackups"] = session.scalar(
            select(func.count()).select_from(DatabaseBackup).where(DatabaseBackup.status == "Ready")
        )
        if restore_dir is not None:
            report["restored"] = _restore_volumes(session, repo, row, restore_dir)
    report["seconds"] = round(time.monotonic() - started, 2)
    return report


def _restore_volumes(session: Any, repo: Repository, row: BackupStorage, folder: Path) -> list[dict[str, Any]]:
    """The newest Ready backup on this storage of every volume, restored into ``folder`` as
    ``<volume uuid>.<raw|qcow2>``: named by the platform, never by a name a catalog row holds."""
    folder.mkdir(parents=True, exist_ok=True)
    restored = []
    for volume in session.scalars(select(Volume).order_by(Volume.createDate)):
        newest = None
        for backup in session.scalars(
            select(VolumeBackup)
            .where(VolumeBackup.volumeUuid == volume.uuid, VolumeBackup.status == "Ready")
            .order_by(VolumeBackup.createDate.desc())
        ):
            ref = next(
                (r for r in backup.backupStorageRefs if r.backupStorageUuid == row.uuid and r.status == "Ready"), None
            )
            if ref is not None and ref.installPath:
                newest = (backup, parse_install_path(ref.installPath)[1])
                break
        if newest is None:
            continue
        backup, manifest_id = newest
        fmt = "qcow2" if volume.format == "qcow2" else "raw"
        target = folder / f"{volume.uuid}.{fmt}"
        result = restore_backup(repo, manifest_id, str(target), fmt=fmt)
        restored.append(
            {
                "volumeUuid": volume.uuid,
                "volumeBackupUuid": backup.uuid,
                "path": str(target),
                "bytesWritten": result.bytesWritten,
            }
        )
    return restored


@click.command("rebuild", cls=StorageCommand, url_flag="--backup-storage-url")
@click.option("--restore-volumes", "restore_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Load over a catalog that is not empty.")
@click.option("--json", "as_json", is_flag=True)
def rebuild_command(url: str, restore_dir: Path | None, force: bool, as_json: bool, **flags: str | None) -> None:
    """Rebuild the catalog (and the volumes) from one backup storage alone."""
    report = rebuild(url, flags, restore_dir=restore_dir, force=force)
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    click.echo(
        f"recovered database backup {report['databaseBackup']['name']} ({report['databaseBackup']['created']}, "
        f"{report['databaseBytes']} bytes) into {dbdump_name()}"
    )
    scanned = report["scan"]
    click.echo(
        f"backup storage {report['backupStorageUuid']}: {scanned['backups']} backups, "
        f"{len(scanned['imported'])} volume backups and {len(scanned['importedDatabaseBackups'])} database "
        f"backups newer than the database backup imported"
    )
    click.echo(
        f"catalog: {len(report['vmInstances'])} VM instances, {len(report['volumes'])} volumes, "
        f"{report['volumeBackups']} volume backups, {report['databaseBackups']} database backups"
    )
    for item in report.get("restored", []):
        click.echo(f"restored volume {item['volumeUuid']} from {item['volumeBackupUuid']} to {item['path']}")
    click.echo(f"done in {report['seconds']} s")


def dbdump_name() -> str:
    from sqlalchemy.engine import make_url

    return make_url(get_settings().catalog_url).render_as_string(hide_password=True)
