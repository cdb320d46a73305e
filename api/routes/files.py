"""The files inside a volume backup (docs/file-restore.md): ``GET /v1/volume-backups/{uuid}/
partitions``, ``.../files?path=&partition=`` (a directory's entries, paged) and
``.../files/content?path=`` (a file's bytes, streamed). Nothing is restored or mounted: the
backup is read where it is stored; callers see only the backups they may see (404 otherwise)."""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Iterator

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import CurrentCaller, DbSession, get_caller
from api.envelopes import check_uuid
from shared import access
from shared.catalog.models import VolumeBackup
from shared.files.browse import Browser
from shared.service import files

router = APIRouter(dependencies=[Depends(get_caller)])


def _browser(
    session: DbSession, caller: CurrentCaller, uuid: str, storage: str | None
) -> contextlib.AbstractContextManager[Browser]:
    access.visible(session, caller, VolumeBackup, check_uuid(uuid, "uuid"), "volume backup")
    if storage is not None:
        check_uuid(storage, "backupStorageUuid")
    return files.opened(session, uuid, storage)


@router.get("/volume-backups/{uuid}/partitions")
def backup_partitions(
    uuid: str, session: DbSession, caller: CurrentCaller, backupStorageUuid: str | None = None
) -> JSONResponse:
    """Where filesystems may be in the backup: partitions, LVM logical volumes, or the whole
    volume (index 0), each with the filesystem found there."""
    with _browser(session, caller, uuid, backupStorageUuid) as browser:
        found = browser.partitions()
    return JSONResponse({"inventories": found, "total": len(found), "success": True})


@router.get("/volume-backups/{uuid}/files")
def backup_files(
    uuid: str,
    session: DbSession,
    caller: CurrentCaller,
    path: str = "/",
    partition: int | None = None,
    start: int = 0,
    limit: int = 1000,
    backupStorageUuid: str | None = None,
) -> JSONResponse:
    """The entries of directory ``path`` (``start``/``limit`` paging, by name), or the entry of
    a file; in ``partition`` (default: the first with a readable filesystem)."""
    with _browser(session, caller, uuid, backupStorageUuid) as browser:
        answer = browser.listdir(path, partition, start, limit)
    body = {
        "inventories": answer["entries"],
        "total": answer["total"],
        "partition": answer["partition"],
        "filesystem": answer["filesystem"],
        "success": True,
    }
    return JSONResponse(body)


@router.get("/volume-backups/{uuid}/files/content", response_class=StreamingResponse)
def backup_file_content(
    uuid: str,
    session: DbSession,
    caller: CurrentCaller,
    path: str = "/",
    partition: int | None = None,
    backupStorageUuid: str | None = None,
) -> StreamingResponse:
    """The bytes of the regular file ``path`` (symbolic links followed inside the filesystem)."""
    stack = contextlib.ExitStack()
    browser = stack.enter_context(_browser(session, caller, uuid, backupStorageUuid))
    try:
        entry, pieces = browser.open(path, partition)
    except BaseException:
        stack.close()
        raise

    def body() -> Iterator[bytes]:
        with stack:
            yield from pieces

    name = urllib.parse.quote(str(entry["name"]), safe="")
    headers = {
        "Content-Length": str(entry["size"]),
        "Content-Disposition": f"attachment; filename*=UTF-8''{name}",
        "X-Blockvault-Partition": str(entry.get("partition", "")),
    }
    return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)
