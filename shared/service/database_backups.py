"""Database backups: the catalog itself, or a registered MySQL/MariaDB database
(:mod:`shared.service.databases`, dumped by :mod:`shared.mysqldump`), dumped into a backup
storage's chunk repository.

PostgreSQL is dumped by ``pg_dump`` (plain SQL) straight from its pipe into the repository,
SQLite by its online backup API (see :mod:`shared.dbdump`); the stream is cut into
content-defined chunks (:mod:`shared.repository.stream`), so a dump of a catalog that changed
a little stores only the chunks around the changes. A database backup is ``Creating`` until
its manifest is committed, then ``Ready``; it is copied to standbys and synced like a volume
backup, and recovered into an empty database (a non-empty one only with ``force``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

from sqlalchemy.orm import Session

from shared import celery_app as tasks
from shared import dbdump, mysqldump
from shared.apijobs import enqueue, progress_reporter
from shared.catalog.models import (
    ApiJob,
    BackupStorage,
    DatabaseBackup,
    DatabaseBackupStorageRef,
    ManagedDatabase,
    new_uuid,
)
from shared.celery_app import STORAGE_QUEUE
from shared.config import get_settings
from shared.errors import BackendError, Conflict, InvalidArgument, RepositoryError
from shared.inventory import inventory
from shared.repository.repo import Repository
from shared.repository.stream import backup_stream
from shared.service.copies import replicate
from shared.service.databases import target_of
from shared.service.rows import backup_repository, copy_on, get, manifest_id, pick_storage, ready_ref
from shared.storage import failover, open_repository, refresh_capacity

log = logging.getLogger(__name__)
SOURCE = "database:catalog"


def blockvault_version() -> str:
    try:
        return version("blockvault")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "0+unknown"


def request_database_backup(session: Session, params: dict[str, Any], account: str | None) -> ApiJob:
    """POST /v1/database-backups: back the catalog, or the registered database
    ``databaseUuid``, up into one storage (the master's by default)."""
    storage = pick_storage(session, params.get("backupStorageUuid"))
    database: ManagedDatabase | None = None
    if params.get("databaseUuid") is not None:
        database = get(session, ManagedDatabase, str(params["databaseUuid"]), "database")
    prefix = database.name if database else "catalog"
    name = params.get("name") or f"{prefix}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    if not isinstance(name, str):
        raise InvalidArgument(detail="name must be a string")
    row = new_database_backup_row(session, storage, name, params.get("description"))
    row.databaseUuid = database.uuid if database else None
    session.flush()
    return enqueue(
        session,
        "createDatabaseBackup",
        task=tasks.DATABASE_BACKUP,
        queue=STORAGE_QUEUE,
        params={"backupStorageUuid": storage.uuid},
        resource_uuid=row.uuid,
        resource_type=DatabaseBackup.resource_type,
        account_uuid=account,
    )


def new_database_backup_row(
    session: Session, storage: BackupStorage, name: str, description: str | None = None
) -> DatabaseBackup:
    row = DatabaseBackup(uuid=new_uuid(), name=name, description=description, status="Creating")
    row.backupStorageRefs.append(DatabaseBackupStorageRef(backupStorageUuid=storage.uuid, status="Creating"))
    session.add(row)
    return row


def run_database_backup(session: Session, job: ApiJob) -> dict[str, Any]:
    params = job.params or {}
    storage: BackupStorage = get(session, BackupStorage, params["backupStorageUuid"], "backup storage")
    row: DatabaseBackup = get(session, DatabaseBackup, job.resourceUuid or "", "database backup")
    done, _storage = take_database_backup(session, row, storage, job.uuid)
    return done


def take_database_backup(
    session: Session, row: DatabaseBackup, storage: BackupStorage, job_uuid: str
) -> tuple[dict[str, Any], BackupStorage]:
    """Dump the catalog into ``storage`` as ``row`` (Ready once committed), fail over to the
    standby like a volume backup, then copy it to every standby that answers."""
    database = get(session, ManagedDatabase, row.databaseUuid, "database") if row.databaseUuid else None
    report = progress_reporter(job_uuid)
    for attempt in range(2):
        try:
            repo = backup_repository(storage)
            dumping = mysqldump.dump(target_of(database)) if database else dbdump.dump(get_settings().catalog_url)
            with dumping as dumped:
                created = datetime.now(UTC).isoformat(timespec="seconds")
                described = {
                    "databaseBackup": {
                        "uuid": row.uuid,
                        "name": row.name,
                        "description": row.description,
                        "schedulerJobGroupUuid": (row.metadata_ or {}).get("schedulerJobGroupUuid"),
                        "databaseUuid": row.databaseUuid,
                    },
                    "engine": dumped.format,
                    "serverVersion": dumped.server_version,
                    "version": blockvault_version(),
                    "createdTime": created,
                }
                result = backup_stream(
                    repo,
                    dumped.reader,
                    name=row.name,
                    source=f"database:{database.uuid}" if database else SOURCE,
                    fmt=dumped.format,
                    metadata=described,
                    progress=report,
                )
            break
        except (BackendError, RepositoryError) as exc:
            session.rollback()
            new = failover(session, storage) if attempt == 0 else None
            if new is None or new.uuid == storage.uuid:
                raise
            log.warning("dbbackup.failover from=%s to=%s after: %s", storage.uuid, new.uuid, exc)
            for ref in row.backupStorageRefs:
                if ref.backupStorageUuid == storage.uuid and ref.status == "Creating":
                    ref.backupStorageUuid = new.uuid
            session.commit()
            storage = new
    row.metadata_ = {
        **(row.metadata_ or {}),
        "name": row.name,
        "version": described["version"],
        "createdTime": described["createdTime"],
        "md5": result.md5,
        "engine": described["engine"],
        "serverVersion": described["serverVersion"],
    }
    row.size = result.size
    row.status = "Ready"
    for ref in row.backupStorageRefs:
        if ref.backupStorageUuid == storage.uuid:
            ref.installPath, ref.status = result.installPath, "Ready"
    refresh_capacity(storage)
    session.commit()
    replicate(session, [row], storage)
    return {**inventory(session, row), "stats": result.to_json()}, storage


# -- recovery -----------------------------------------------------------------------------------
def request_recover(session: Session, uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    """recoverDatabaseBackup {backupStorageUuid, databaseUrl, force}: load a database backup
    into ``databaseUrl`` (default: this catalog). An empty target only, unless ``force``."""
    row: DatabaseBackup = get(session, DatabaseBackup, uuid, "database backup")
    if row.status != "Ready":
        raise Conflict(detail=f"database backup {uuid} is {row.status}")
    ref = ready_ref(row, params.get("backupStorageUuid"), session)
    force = params.get("force", False)
    if not isinstance(force, bool):
        raise InvalidArgument(detail="force must be true or false")
    into: dict[str, Any]
    if row.databaseUuid or params.get("databaseUuid"):
        into = _registered_target(session, row, params)
    else:
        target = params.get("databaseUrl") or get_settings().catalog_url
        if not isinstance(target, str) or not target.startswith(("postgresql", "sqlite:///")):
            raise InvalidArgument(detail="databaseUrl must be a postgresql:// or sqlite:/// SQLAlchemy URL")
        into = {"databaseUrl": target}
    return enqueue(
        session,
        "recoverDatabaseBackup",
        task=tasks.DATABASE_RECOVER,
        queue=STORAGE_QUEUE,
        params={"backupUuid": uuid, "backupStorageUuid": ref.backupStorageUuid, **into, "force": force},
        resource_uuid=uuid,
        resource_type="DatabaseBackupRecover",
        account_uuid=account,
    )


def _registered_target(session: Session, row: DatabaseBackup, params: dict[str, Any]) -> dict[str, Any]:
    """Where a backup of a registered database is recovered: the server of ``databaseUuid``
    (default: the backup's own database), into ``databaseName`` there (default: the registered
    database itself; a new name makes a new database). Never a URL: a worker reaches only
    registered servers."""
    if params.get("databaseUrl"):
        raise InvalidArgument(detail="a backup of a registered database is recovered by databaseUuid, not databaseUrl")
    if row.databaseUuid is None:
        raise InvalidArgument(detail="a backup of the catalog is recovered by databaseUrl, not databaseUuid")
    database: ManagedDatabase = get(
        session, ManagedDatabase, str(params.get("databaseUuid") or row.databaseUuid), "database"
    )
    name = params.get("databaseName") or database.databaseName
    if not isinstance(name, str) or not mysqldump.NAME.match(name):
        raise InvalidArgument(detail="databaseName: letters, digits and _ only (64 at most)")
    return {"databaseUuid": database.uuid, "databaseName": name}


def run_recover(session: Session, job: ApiJob) -> dict[str, Any]:
    params = job.params or {}
    row: DatabaseBackup = get(session, DatabaseBackup, params["backupUuid"], "database backup")
    storage, ref = copy_on(session, row, params["backupStorageUuid"])
    repo = open_repository(storage)
    if params.get("databaseUuid"):
        database: ManagedDatabase = get(session, ManagedDatabase, params["databaseUuid"], "database")
        target = target_of(database, str(params["databaseName"]))
        session.commit()
        force = bool(params.get("force"))
        dbdump.stream_into(repo, manifest_id(ref), lambda reader: mysqldump.load(target, reader, force=force))
        return {"databaseBackupUuid": row.uuid, "databaseUuid": database.uuid, "databaseName": target.database}
    session.commit()  # hold no transaction on the catalog while it may be the target
    recover_into(repo, manifest_id(ref), str(params["databaseUrl"]), force=bool(params.get("force")))
    return {"databaseBackupUuid": row.uuid, "databaseUrl": _safe_url(str(params["databaseUrl"]))}


def recover_into(repo: Repository, manifest_id: str, url: str, *, force: bool = False) -> int:
    """Stream a database backup out of ``repo`` into the database at ``url`` (no dump file on
    disk; every chunk, the size and the MD5 are checked before the load commits, so a damaged
    backup loads nothing). An empty database only, unless ``force``. Returns the bytes loaded."""
    if not force and not dbdump.is_empty(url):
        raise Conflict(detail=f"{_safe_url(url)} is not empty: recover into an empty database, or pass force")
    return dbdump.restore_database(repo, manifest_id, url, force=force)


def _safe_url(url: str) -> str:
    """``url`` without a password, for messages and results."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL: say nothing of it
        return "(database)"
