"""Rows as ZStack inventories: camelCase fields, ISO dates, user and system tags, no secrets."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from shared.catalog.models import Base, Tag


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


def _tags(session: Session, uuids: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    found: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"user": [], "system": []})
    if uuids:
        for tag in session.scalars(select(Tag).where(Tag.resourceUuid.in_(uuids)).order_by(Tag.createDate)):
            found[tag.resourceUuid][tag.type].append(tag.tag)
    return found


def inventories(session: Session, rows: Sequence[Base]) -> list[dict[str, Any]]:
    """Each row's inventory, with its tags (one query for all of them) and its refs."""
    uuids = [row.uuid for row in rows if hasattr(row, "uuid")]
    tags = _tags(session, uuids)
    out = []
    for row in rows:
        data = _plain(row)
        refs = getattr(row, "backupStorageRefs", None)
        if refs is not None:
            data["backupStorageRefs"] = [_plain(ref) for ref in refs]
        if "uuid" in data and not isinstance(row, Tag):
            data["userTags"] = tags[data["uuid"]]["user"]
            data["systemTags"] = tags[data["uuid"]]["system"]
        out.append(data)
    return out


def inventory(session: Session, row: Base) -> dict[str, Any]:
    return inventories(session, [row])[0]
