"""File-level restore in the service: the files of a Ready volume backup, read from one of its
copies on any storage (shared.files does the reading). Callers name the backup and a path
inside it; the API checks the caller may see the backup."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy.orm import Session

from shared.catalog.models import BackupStorage
from shared.config import get_settings
from shared.errors import BackupNotFound, Conflict
from shared.files.browse import Browser, Limits
from shared.service.rows import get, manifest_id, ready_backup, ready_ref
from shared.storage import open_repository


def limits() -> Limits:
    settings = get_settings()
    return Limits(
        timeout=settings.files_timeout_seconds,
        memory=settings.files_memory_mb << 20,
        max_entries=settings.files_max_entries,
        cache_bytes=settings.export_cache_mb << 20,
    )


def browser(session: Session, backup_uuid: str, storage_uuid: str | None = None) -> Browser:
    """A :class:`Browser` of backup ``backup_uuid``'s copy on ``storage_uuid`` (by default the
    master's, else a copy on a storage that answers); enter it to read."""
    backup = ready_backup(session, backup_uuid)
    ref = ready_ref(backup, storage_uuid, session)
    storage: BackupStorage = get(session, BackupStorage, ref.backupStorageUuid, "backup storage")
    return Browser(open_repository(storage), manifest_id(ref), f"volume backup {backup_uuid}", limits())


@contextlib.contextmanager
def opened(session: Session, backup_uuid: str, storage_uuid: str | None = None) -> Iterator[Browser]:
    """:func:`browser`, entered; a copy the catalog calls Ready that its storage does not hold
    is a Conflict (scan or verify the storage), not a missing backup."""
    found = browser(session, backup_uuid, storage_uuid)
    session.commit()  # nothing is written; the catalog connection is not held while reading
    try:
        entered = found.__enter__()
    except BackupNotFound as exc:
        raise Conflict(detail=f"volume backup {backup_uuid}: its copy is missing from its storage ({exc})") from None
    try:
        yield entered
    finally:
        found.__exit__(None, None, None)
