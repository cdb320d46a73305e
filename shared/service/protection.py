"""Backups nothing removes: protection and object lock.

A *protected* backup (``protected`` in its inventory; ``changeVolumeBackupProtection``,
``changeVmBackupProtection``, ``changeDatabaseBackupProtection``, or a job group whose jobData
says ``protectBackups``) is refused by delete (409 ``BACKUP_PROTECTED``), skipped by retention
and by the repository's prune. Project members may protect the backups they see; only an admin
unprotects. The catalog's flag is the service's word; every storage holding a copy also keeps a
marker (``protected/<manifest>``, :meth:`~shared.repository.repo.Repository.protect`) so that the
repository CLI refuses as well.

A copy on a PublicCloud storage registered with object lock (``objectLockMode``,
``objectLockDays``) is *locked* until its retain-until date: delete is refused before it (409
``BACKUP_LOCKED``), retention leaves it for a later run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from shared.catalog.models import BackupStorage, DatabaseBackup, aware, now
from shared.credentials import credentials_of
from shared.errors import BackupLocked, BackupNotFound, BackupProtected, Conflict, Forbidden, InvalidArgument
from shared.service.rows import AnyBackup, AnyRef, get, manifest_id
from shared.storage import open_repository

log = logging.getLogger(__name__)


def what(row: AnyBackup) -> str:
    return "database backup" if isinstance(row, DatabaseBackup) else "volume backup"


def parse_protected(params: dict[str, Any]) -> bool:
    value = params.get("protected")
    if not isinstance(value, bool):
        raise InvalidArgument(detail="protected must be true or false")
    return value


def change_protection(session: Session, rows: Sequence[AnyBackup], protected: bool, *, admin: bool) -> None:
    """Protect or unprotect ``rows`` (one backup, or every volume backup of a VM backup), in the
    catalog and on every storage holding a copy. Forbidden for a non-admin unprotecting;
    Conflict for a backup that is not Ready (being created or deleted)."""
    if not protected and not admin and any(row.protected for row in rows):
        raise Forbidden(detail="only an admin may unprotect a backup")
    busy = [row.uuid for row in rows if row.status != "Ready"]
    if busy:
        raise Conflict(detail=f"{what(rows[0])} {', '.join(busy)} is not Ready: its protection cannot change now")
    for row in rows:
        row.protected = protected
        mark_copies(session, row)
    session.flush()
    log.info("backup.protection uuids=%s protected=%s", ",".join(r.uuid for r in rows), protected)


def mark_copies(session: Session, row: AnyBackup) -> None:
    """Write (or remove) the protection marker of ``row`` on every storage holding a copy."""
    for ref in row.backupStorageRefs:
        if not ref.installPath or ref.status != "Ready":
            continue
        storage: BackupStorage = get(session, BackupStorage, ref.backupStorageUuid, "backup storage")
        repo = open_repository(storage)
        try:
            if row.protected:
                repo.protect(manifest_id(ref))
            else:
                repo.unprotect(manifest_id(ref))
        except BackupNotFound:  # a copy gone from its storage: the catalog's flag still holds
            log.warning("backup.protect_copy_missing uuid=%s storage=%s", row.uuid, storage.uuid)
        finally:
            repo.close()


def lock_days(storage: BackupStorage) -> float:
    """The object-lock period of ``storage`` in days (0: none)."""
    try:
        return float(credentials_of(storage, secrets=False).get("objectLockDays") or 0)
    except ValueError:
        return 0.0


def locked_until(session: Session, ref: AnyRef) -> datetime | None:
    """Until when the copy ``ref`` is under object lock, if it still is: from when it was
    written (its ref's last change, when it turned Ready) plus the storage's period."""
    storage = session.get(BackupStorage, ref.backupStorageUuid)
    days = lock_days(storage) if storage is not None else 0.0
    if not days:
        return None
    written = max(aware(ref.createDate), aware(ref.lastOpDate or ref.createDate))
    until = written + timedelta(days=days)
    return until if until > now() else None


def check_removable(
    session: Session, rows: Sequence[AnyBackup], storage_uuids: Sequence[str] | None, action: str
) -> None:
    """BackupProtected for a protected backup among ``rows``; BackupLocked for a copy on one of
    ``storage_uuids`` (all when None) still under object lock."""
    for row in rows:
        if row.protected:
            raise BackupProtected(what=what(row), uuid=row.uuid, action=action)
    for row in rows:
        for ref in row.backupStorageRefs:
            if storage_uuids and ref.backupStorageUuid not in storage_uuids:
                continue
            until = locked_until(session, ref)
            if until is not None:
                raise BackupLocked(
                    what=what(row),
                    uuid=row.uuid,
                    location=f"backup storage {ref.backupStorageUuid}",
                    until=until.isoformat(timespec="seconds").replace("+00:00", "Z"),
                    action=action,
                )


def why_kept(session: Session, rows: Sequence[AnyBackup], storage_uuids: Sequence[str] | None = None) -> str | None:
    """Why retention must leave ``rows`` (one unit: a backup, or a VM backup's volume
    backups) on ``storage_uuids`` (all when None): ``"protected"``, ``"locked"``, or None when
    it may delete them."""
    try:
        check_removable(session, rows, storage_uuids, "retention")
    except BackupProtected:
        return "protected"
    except BackupLocked:
        return "locked"
    return None
