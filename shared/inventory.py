"""Rows as ZStack inventories: camelCase fields, ISO dates, user and system tags, no secrets."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, inspect, select
from sqlalchemy.orm import Session

from shared.catalog.models import Base, Project, SchedulerJob, SchedulerJobGroup, SchedulerJobGroupTriggerRef, Tag
from shared.service import quotas


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _plain(row: Base) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in inspect(type(row)).column_attrs:
        name = "metadata" if attr.key == "metadata_" else attr.key
        if name in row.secret_fields:
            continue
        value = getattr(row, attr.key)
        out[name] = iso(value) if isinstance(value, datetime) else value
    return out


# every inventory the API answers asks for its tags: the statement is built once, not per call
TAGS_OF = select(Tag).where(Tag.resourceUuid.in_(bindparam("uuids", expanding=True))).order_by(Tag.createDate)


def _tags(session: Session, uuids: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    found: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"user": [], "system": []})
    if uuids:
        for tag in session.scalars(TAGS_OF, {"uuids": list(uuids)}):
            found[tag.resourceUuid][tag.type].append(tag.tag)
    return found


def _group_links(session: Session, uuids: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """triggersUuid and jobsUuid of job groups (two queries for all of them)."""
    links: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"triggersUuid": [], "jobsUuid": []})
    if uuids:
        refs = select(SchedulerJobGroupTriggerRef).where(SchedulerJobGroupTriggerRef.schedulerJobGroupUuid.in_(uuids))
        for ref in session.scalars(refs.order_by(SchedulerJobGroupTriggerRef.id)):
            links[ref.schedulerJobGroupUuid]["triggersUuid"].append(ref.schedulerTriggerUuid)
        jobs = select(SchedulerJob).where(SchedulerJob.schedulerJobGroupUuid.in_(uuids))
        for job in session.scalars(jobs.order_by(SchedulerJob.createDate)):
            links[str(job.schedulerJobGroupUuid)]["jobsUuid"].append(job.uuid)
    return links


def inventories(session: Session, rows: Sequence[Base]) -> list[dict[str, Any]]:
    """Each row's inventory, with its tags (one query for all of them), its refs and, for job
    groups, the triggers and jobs attached."""
    uuids = [row.uuid for row in rows if hasattr(row, "uuid")]
    tags = _tags(session, uuids)
    links = _group_links(session, [r.uuid for r in rows if isinstance(r, SchedulerJobGroup)])
    used = quotas.usage(session, [r.uuid for r in rows if isinstance(r, Project)])
    out = []
    for row in rows:
        data = _plain(row)
        refs = getattr(row, "backupStorageRefs", None)
        if refs is not None:
            data["backupStorageRefs"] = [_plain(ref) for ref in refs]
        if isinstance(row, SchedulerJobGroup):
            data.update(links[row.uuid])
        if isinstance(row, Project):
            data["usedBackupBytes"], data["usedBackupCount"] = used[row.uuid]
        if "uuid" in data and not isinstance(row, Tag):
            data["userTags"] = tags[data["uuid"]]["user"]
            data["systemTags"] = tags[data["uuid"]]["system"]
        out.append(data)
    return out


def inventory(session: Session, row: Base) -> dict[str, Any]:
    return inventories(session, [row])[0]
