"""Who sees what. An admin sees everything. A project member's key sees the VM instances and
volumes of its projects, their backups, the job groups, jobs, triggers and histories of its
projects, its own account, API keys, access keys and API jobs, the ImageStore backup storage
it may back up to, and the tags on all of those; every other row does not exist for it (404,
in queries too: counts, groups and nested conditions run on the visible rows only).

:func:`scope` gives the ``select(model)`` a caller's query starts from; :func:`visible` the
row behind a uuid or NotFound.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from sqlalchemy import Select, and_, false, or_, select, union
from sqlalchemy.orm import Session

from shared.catalog.models import (
    AccessKey,
    Account,
    ApiJob,
    ApiKey,
    BackupStorage,
    Base,
    Project,
    SchedulerJob,
    SchedulerJobGroup,
    SchedulerJobHistory,
    SchedulerTrigger,
    Tag,
    VmInstance,
    Volume,
    VolumeBackup,
)
from shared.errors import Forbidden, NotFound


class Viewer(Protocol):
    """What access checks need of a caller (api.auth.Caller is one)."""

    @property
    def account_uuid(self) -> str: ...

    @property
    def admin(self) -> bool: ...

    @property
    def projects(self) -> Collection[str]: ...


def _vms(viewer: Viewer) -> Select[Any]:
    return select(VmInstance.uuid).where(VmInstance.projectUuid.in_(list(viewer.projects)))


def _volumes(viewer: Viewer) -> Select[Any]:
    return select(Volume.uuid).where(
        or_(Volume.projectUuid.in_(list(viewer.projects)), Volume.vmInstanceUuid.in_(_vms(viewer)))
    )


def _groups(viewer: Viewer) -> Select[Any]:
    return select(SchedulerJobGroup.uuid).where(SchedulerJobGroup.projectUuid.in_(list(viewer.projects)))


def scope(viewer: Viewer, model: type[Base]) -> Select[Any]:
    """``select(model)`` restricted to what ``viewer`` may see."""
    base = select(model)
    if viewer.admin:
        return base
    projects = list(viewer.projects)
    if model is VmInstance:
        return base.where(VmInstance.projectUuid.in_(projects))
    if model is Volume:
        return base.where(Volume.uuid.in_(_volumes(viewer)))
    if model is VolumeBackup:
        return base.where(VolumeBackup.volumeUuid.in_(_volumes(viewer)))
    if model is SchedulerJobGroup:
        return base.where(SchedulerJobGroup.projectUuid.in_(projects))
    if model is SchedulerJob:  # in one of its groups, or in no group yet and in its project
        return base.where(
            or_(
                SchedulerJob.schedulerJobGroupUuid.in_(_groups(viewer)),
                and_(SchedulerJob.schedulerJobGroupUuid.is_(None), SchedulerJob.projectUuid.in_(projects)),
            )
        )
    if model is SchedulerTrigger:
        return base.where(SchedulerTrigger.projectUuid.in_(projects))
    if model is SchedulerJobHistory:
        return base.where(SchedulerJobHistory.schedulerJobGroupUuid.in_(_groups(viewer)))
    if model is ApiJob:
        return base.where(ApiJob.accountUuid == viewer.account_uuid)
    if model is BackupStorage:
        return base.where(BackupStorage.type == "ImageStore")
    if model is Project:
        return base.where(Project.uuid.in_(projects))
    if model is Account:
        return base.where(Account.uuid == viewer.account_uuid)
    if model is ApiKey:
        return base.where(ApiKey.accountUuid == viewer.account_uuid)
    if model is AccessKey:
        return base.where(AccessKey.accountUuid == viewer.account_uuid)
    if model is Tag:
        owned = union(
            _vms(viewer),
            _volumes(viewer),
            select(VolumeBackup.uuid).where(VolumeBackup.volumeUuid.in_(_volumes(viewer))),
            _groups(viewer),
        )
        return base.where(Tag.resourceUuid.in_(select(owned.subquery().c[0])))
    return base.where(false())  # hosts, database backups, ...: admins only


def visible(session: Session, viewer: Viewer, model: type[Base], uuid: str, what: str) -> Any:
    """The ``model`` row ``uuid`` when ``viewer`` may see it; NotFound otherwise (the same
    answer as for a row that does not exist, so existence does not leak)."""
    primary = model.__mapper__.primary_key[0]
    row = session.scalars(scope(viewer, model).where(primary == uuid)).first()
    if row is None:
        raise NotFound(resource=what, uuid=uuid)
    return row


def require_admin(viewer: Viewer, action: str) -> None:
    """Admin-only actions on collections (registering hosts' volumes, storage, accounts)."""
    if not viewer.admin:
        raise Forbidden(detail=f"{action} needs an admin key")


def project_for(viewer: Viewer, requested: str | None) -> str | None:
    """The project a member's new job group or trigger belongs to: the one named (it must be
    one of theirs), or their only one. Admins' are admin-only (None) unless they name one."""
    if viewer.admin:
        return requested
    if requested:
        if requested not in viewer.projects:
            raise NotFound(resource="project", uuid=requested)
        return requested
    if len(viewer.projects) != 1:
        from shared.errors import InvalidArgument

        raise InvalidArgument(detail="name projectUuid: the key belongs to several projects")
    return next(iter(viewer.projects))
