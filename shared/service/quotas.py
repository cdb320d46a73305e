"""Per-project quotas on backups: stored bytes (``quotaBackupBytes``) and backup count
(``quotaBackupCount``), None for no limit; an admin sets them (``updateProjectQuota``).

A backup starts only while its project is under both: at or over one, it is refused with 409
``QUOTA_EXCEEDED`` naming the quota and the figures (a scheduled run fails, and its history row
says why). What a project uses is counted over the backups of its volumes that are not Failed:
stored bytes are the bytes each backup wrote to its storage (after deduplication and
compression; its logical size for a backup without that figure: one still running, or an
imported one), and
a VM backup counts once. Both figures are in the project's inventory (``usedBackupBytes``,
``usedBackupCount``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from shared.catalog.models import Project, Volume, VolumeBackup
from shared.errors import InvalidArgument, QuotaExceeded

QUOTAS = ("quotaBackupBytes", "quotaBackupCount")
MAX_QUOTA = 2**63 - 1  # the catalog's BIGINT


def usage(session: Session, project_uuids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``(stored bytes, backups)`` of each project (every one asked about, zeros included)."""
    found = dict.fromkeys(project_uuids, (0, 0))
    if not project_uuids:
        return found
    query = (
        select(
            Volume.projectUuid,
            func.coalesce(func.sum(func.coalesce(VolumeBackup.bytesWritten, VolumeBackup.size)), 0),
            func.count(distinct(func.coalesce(VolumeBackup.groupUuid, VolumeBackup.uuid))),
        )
        .join(Volume, Volume.uuid == VolumeBackup.volumeUuid)
        .where(Volume.projectUuid.in_(list(project_uuids)), VolumeBackup.status != "Failed")
        .group_by(Volume.projectUuid)
    )
    for project, stored, count in session.execute(query):
        found[str(project)] = (int(stored), int(count))
    return found


def check(session: Session, project_uuid: str | None, action: str) -> None:
    """QuotaExceeded when the project ``project_uuid`` (None: no project, no quota) is at or
    over one of its quotas."""
    if not project_uuid:
        return
    project = session.get(Project, project_uuid)
    if project is None or (project.quotaBackupBytes is None and project.quotaBackupCount is None):
        return
    stored, count = usage(session, [project_uuid])[project_uuid]
    for quota, limit, used in (
        ("quotaBackupCount", project.quotaBackupCount, count),
        ("quotaBackupBytes", project.quotaBackupBytes, stored),
    ):
        if limit is not None and used >= limit:
            raise QuotaExceeded(project=project_uuid, quota=quota, limit=limit, used=used, action=action)


def set_quotas(project: Project, params: dict[str, Any]) -> None:
    """updateProjectQuota: ``quotaBackupBytes`` and/or ``quotaBackupCount``, each a whole
    number of at least 0, or null for no limit."""
    given = [name for name in QUOTAS if name in params]
    unknown = set(params) - set(QUOTAS)
    if unknown or not given:
        raise InvalidArgument(detail=f"updateProjectQuota takes {' and/or '.join(QUOTAS)} (null: no limit)")
    for name in given:
        value = params[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_QUOTA):
            raise InvalidArgument(detail=f"{name} must be a whole number of at least 0, or null for no limit")
    for name in given:
        setattr(project, name, params[name])
