"""The catalog's ``volume_backup_summary`` (migration 0014) against a recomputation from the
``volume_backup`` table: what every test that changes backups can assert at its end."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from shared.catalog.models import VolumeBackup, VolumeBackupSummary, aware

Summary = dict[str, tuple[Any, ...]]


def recomputed(bind: Connection | Session) -> Summary:
    """Each volume's newest Ready and newest Failed backup (createDate, then uuid), from the backups."""
    newest: dict[tuple[str, str], tuple[Any, str]] = {}
    rows = bind.execute(
        select(VolumeBackup.volumeUuid, VolumeBackup.status, VolumeBackup.createDate, VolumeBackup.uuid)
    )
    for volume, status, created, uuid in rows:
        if status not in ("Ready", "Failed"):
            continue
        key = (volume, status)
        if key not in newest or (aware(created), uuid) > newest[key]:
            newest[key] = (aware(created), uuid)
    out: Summary = {}
    for volume in {volume for volume, _status in newest}:
        ready, failed = newest.get((volume, "Ready")), newest.get((volume, "Failed"))
        out[volume] = (
            ready[1] if ready else None,
            ready[0] if ready else None,
            failed[1] if failed else None,
            failed[0] if failed else None,
        )
    return out


def stored(bind: Connection | Session) -> Summary:
    """The summary rows as the triggers wrote them."""
    s = VolumeBackupSummary
    rows = bind.execute(select(s.volumeUuid, s.readyUuid, s.readyDate, s.failedUuid, s.failedDate))
    return {
        volume: (ready, aware(ready_at) if ready_at else None, failed, aware(failed_at) if failed_at else None)
        for volume, ready, ready_at, failed, failed_at in rows
    }


def assert_summary_right(bind: Connection | Session) -> None:
    expected, found = recomputed(bind), stored(bind)
    wrong = {v: (found.get(v), expected.get(v)) for v in set(expected) | set(found) if found.get(v) != expected.get(v)}
    assert not wrong, f"volume_backup_summary differs from the backups (stored, recomputed): {wrong}"
