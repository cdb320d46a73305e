"""The API's answers as models, so that ``/openapi.json`` describes every success body as it
really is (docs/api.md "Envelopes"): an inventory model per catalog row type, made from the
row's columns (secret ones left out, as :mod:`shared.inventory` leaves them out), and the
envelopes around them.

Every field of an inventory is optional: a query with ``fields=`` answers only those, one with
``groupBy`` a field and ``count``; other keys an answer adds (``stats`` of a backup job,
``key`` of a new API key, ``jobsStarted`` of a run) are allowed.
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model
from sqlalchemy import inspect

from shared.catalog.models import Base, DatabaseBackup, Project, SchedulerJobGroup, Tag, VolumeBackup

OPEN = ConfigDict(extra="allow")


class Health(BaseModel):
    success: bool
    status: str


class Done(BaseModel):
    """A change with nothing to show: ``{"success": true}``."""

    success: bool


class JobResult(BaseModel):
    """A finished API job: what the job answers (the inventory of what it made or changed, or
    its report: copies, deletes, scans)."""

    inventory: dict[str, Any]
    success: bool


class SessionInventory(BaseModel):
    uuid: str
    accountUuid: str
    userUuid: str
    createDate: str | None = None
    expiredDate: str | None = None


class SessionAnswer(BaseModel):
    """``logInByAccount``: the session uuid, shown here only."""

    inventory: SessionInventory
    success: bool


class SessionValid(BaseModel):
    """ZStack's ValidateSession reply."""

    valid: bool
    success: bool


def _python_type(column: Any) -> Any:
    try:
        kind = column.type.python_type
    except NotImplementedError:
        return Any
    if kind is datetime:
        return str  # ISO 8601
    if kind in (dict, list):
        return Any
    return kind


@functools.cache
def inventory_model(model: type[Base]) -> type[BaseModel]:
    """The inventory of ``model`` rows, as :func:`shared.inventory.inventories` writes it."""
    fields: dict[str, Any] = {}
    for attr in inspect(model).column_attrs:
        name = "metadata" if attr.key == "metadata_" else attr.key
        if name in model.secret_fields:
            continue
        fields[name] = (_python_type(attr.columns[0]) | None, None)
    if model in (VolumeBackup, DatabaseBackup):
        ref = model.backupStorageRefs.property.mapper.class_
        fields["backupStorageRefs"] = (list[inventory_model(ref)] | None, None)  # type: ignore[misc]
    if model is Project:  # what its backups use of its quotas (shared.service.quotas)
        fields["usedBackupBytes"] = (int | None, None)
        fields["usedBackupCount"] = (int | None, None)
    if model is SchedulerJobGroup:
        fields["triggersUuid"] = (list[str] | None, None)
        fields["jobsUuid"] = (list[str] | None, None)
    if "uuid" in fields and model is not Tag:
        fields["userTags"] = (list[str] | None, None)
        fields["systemTags"] = (list[str] | None, None)
    made: type[BaseModel] = create_model(f"{model.__name__}Inventory", __config__=OPEN, **fields)
    return made


@functools.cache
def query_answer(model: type[Base]) -> type[BaseModel]:
    """``{"inventories": [...], "total": N, "success": true}`` of ``model`` rows."""
    made: type[BaseModel] = create_model(
        f"{model.__name__}Inventories",
        inventories=(list[inventory_model(model)], ...),  # type: ignore[arg-type, misc]
        total=(int | None, None),
        success=(bool, ...),
    )
    return made


@functools.cache
def one_answer(model: type[Base]) -> type[BaseModel]:
    """``{"inventory": {...}, "success": true}`` of one ``model`` row."""
    made: type[BaseModel] = create_model(
        f"{model.__name__}Answer", inventory=(inventory_model(model), ...), success=(bool, ...)
    )
    return made


class Overview(BaseModel):
    """``GET /v1/overview``: the protection of every VM the caller sees, the API jobs running,
    the failures of the last hours, the hosts and the backup storage (docs/api.md "Overview")."""

    model_config = OPEN
    success: bool
    generatedAt: str
    vmInstances: list[dict[str, Any]]
    vmTotal: int
    vmCounts: dict[str, int]
    runningJobs: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    hosts: list[dict[str, Any]]
    backupStorage: list[dict[str, Any]]


class FireTimes(BaseModel):
    """``GET /v1/scheduler/triggers/{uuid}/fire-times``: the trigger's next fire times (ISO 8601)."""

    success: bool
    fireTimes: list[str]
