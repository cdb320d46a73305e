"""shared.service.database_backups: the catalog dumped into a storage, and recovered."""

from __future__ import annotations

import hashlib
import io
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from shared.catalog.models import ApiJob, BackupStorage, DatabaseBackup, new_uuid
from shared.celery_app import DATABASE_BACKUP, DATABASE_RECOVER, STORAGE_QUEUE
from shared.errors import BlockvaultError, Conflict, InvalidArgument, NotFound
from shared.repository.stream import restore_stream
from shared.service.copies import request_sync, run_sync
from shared.service.database_backups import (
    request_database_backup,
    request_recover,
    run_database_backup,
    run_recover,
)
from shared.service.rows import manifest_id
from tests.services import MakePgDatabase
from tests.shared.service.conftest import Message, Site


def _backup(site: Site, params: dict[str, Any] | None = None) -> DatabaseBackup:
    job = request_database_backup(site.session, params or {}, None)
    site.run(run_database_backup, job)
    return site.session.get_one(DatabaseBackup, job.resourceUuid)


def _dump(site: Site, row: DatabaseBackup, storage: BackupStorage) -> bytes:
    out = io.BytesIO()
    with site.repository(storage) as repo:
        restore_stream(repo, manifest_id(site.ref(row, storage)), out)
    return out.getvalue()


def test_a_database_backup_is_one_storage_job_and_holds_the_catalogs_dump(site: Site) -> None:
    storage = site.storage()
    job = request_database_backup(site.session, {"name": "nightly", "description": "d"}, "account-1")
    row = site.session.get_one(DatabaseBackup, job.resourceUuid)
    assert (row.name, row.description, row.status) == ("nightly", "d", "Creating")
    assert [(r.backupStorageUuid, r.status) for r in row.backupStorageRefs] == [(storage.uuid, "Creating")]
    assert (job.action, job.params) == (
        "createDatabaseBackup",
        {"backupStorageUuid": storage.uuid, "_task": DATABASE_BACKUP, "_queue": STORAGE_QUEUE},
    )
    assert site.messages() == [Message(DATABASE_BACKUP, job.uuid, STORAGE_QUEUE, [job.uuid])]

    result = site.run(run_database_backup, job)

    site.session.refresh(row)
    dump = _dump(site, row, storage)
    assert (row.status, site.ref(row, storage).status, result["uuid"]) == ("Ready", "Ready", row.uuid)
    assert (row.size, (row.metadata_ or {})["md5"]) == (len(dump), hashlib.md5(dump).hexdigest())
    assert ((row.metadata_ or {})["engine"], site.host.encode() in dump) == ("pg_dump", True)


def test_a_database_backup_goes_to_the_standby_too_and_there_when_the_master_is_gone(site: Site) -> None:
    master = site.storage("master")
    standby = site.storage("standby", role="standby")
    replicated = _backup(site)
    assert _dump(site, replicated, standby) == _dump(site, replicated, master)

    job = request_database_backup(site.session, {}, None)
    site.vanish(master)
    site.run(run_database_backup, job)

    row = site.session.get_one(DatabaseBackup, job.resourceUuid)
    site.session.refresh(standby)
    assert (row.status, standby.role) == ("Ready", "master")
    assert [(r.backupStorageUuid, r.status) for r in row.backupStorageRefs] == [(standby.uuid, "Ready")]


def test_a_database_backup_is_synced_like_a_volume_backup(site: Site) -> None:
    master = site.storage("master")
    row = _backup(site)
    target = site.storage("target", role="standby")
    job = request_sync(
        site.session,
        "syncDatabaseBackupFromImageStoreBackupStorage",
        [row],
        {"dstBackupStorageUuid": target.uuid},
        None,
    )
    assert (job.resourceType, (job.params or {})["database"]) == ("DatabaseBackupSync", True)
    site.run(run_sync, job)
    site.session.refresh(row)
    assert _dump(site, row, target) == _dump(site, row, master)


def test_request_database_backup_refuses_a_bad_name_or_storage(site: Site) -> None:
    site.refused(Conflict, lambda: request_database_backup(site.session, {}, None))  # no storage at all
    site.storage()
    site.refused(InvalidArgument, lambda: request_database_backup(site.session, {"name": 5}, None))
    site.refused(NotFound, lambda: request_database_backup(site.session, {"backupStorageUuid": new_uuid()}, None))
    assert (site.count(DatabaseBackup), site.count(ApiJob)) == (0, 0)


def test_recover_loads_the_backup_into_an_empty_database(site: Site, make_pg_database: MakePgDatabase) -> None:
    storage = site.storage()
    row = _backup(site)
    empty = make_pg_database(migrate=False)

    job = request_recover(site.session, row.uuid, {"databaseUrl": empty}, None)
    assert (job.action, job.params) == (
        "recoverDatabaseBackup",
        {
            "backupUuid": row.uuid,
            "backupStorageUuid": storage.uuid,
            "databaseUrl": empty,
            "force": False,
            "_task": DATABASE_RECOVER,
            "_queue": STORAGE_QUEUE,
        },
    )
    result = site.run(run_recover, job)

    engine = create_engine(empty, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            hosts = conn.execute(text('SELECT "uuid" FROM "host"')).scalars().all()
            storages = conn.execute(text('SELECT "uuid" FROM "backup_storage"')).scalars().all()
    finally:
        engine.dispose()
    assert (hosts, storages, result["databaseBackupUuid"]) == ([site.host], [storage.uuid], row.uuid)


def test_recover_into_a_database_that_is_not_empty_needs_force(site: Site) -> None:
    site.storage()
    row = _backup(site)
    job = request_recover(site.session, row.uuid, {}, None)  # this very catalog
    failed = site.fail(run_recover, job, Conflict)
    assert "not empty" in (failed.error or {})["description"]


def test_request_recover_refuses_bad_parameters_and_states(site: Site) -> None:
    storage = site.storage()
    row = _backup(site)
    jobs = site.count(ApiJob)

    def refused(error: type[BlockvaultError], params: dict[str, Any], uuid: str = row.uuid) -> None:
        site.refused(error, lambda: request_recover(site.session, uuid, params, None))

    refused(NotFound, {}, uuid=new_uuid())
    refused(InvalidArgument, {"databaseUrl": "mysql://db/catalog"})
    refused(InvalidArgument, {"databaseUrl": 5})
    refused(InvalidArgument, {"force": "yes"})
    refused(NotFound, {"backupStorageUuid": new_uuid()})
    site.ref(row, storage).status = "Failed"
    site.session.commit()
    refused(Conflict, {})
    row.status = "Creating"
    site.session.commit()
    refused(Conflict, {})
    assert site.count(ApiJob) == jobs
