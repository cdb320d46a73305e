"""The REST routes, one router per resource (docs/api.md "Resources and calls").

Each module is thin: it parses the request, checks who may do it (:mod:`shared.access`), calls
the service (:mod:`shared.service`) and wraps the answer in ZStack's envelopes
(:mod:`api.envelopes`). :data:`VERSIONED` are served under ``/v1`` and, for ZStack's SDKs,
``/zstack/v1``; :data:`ZSTACK_ONLY` (the paths where ZStack's REST differs) under ``/zstack/v1``
only; :data:`ROOT` at their own paths (health, metrics, the ZStack RPC endpoint).
"""

from __future__ import annotations

from fastapi import APIRouter

from . import (
    access_keys,
    accounts,
    api_jobs,
    backup_storage,
    database_backups,
    files,
    health,
    metrics,
    notifications,
    overview,
    queries,
    scheduler,
    tags,
    vm_backups,
    vm_instances,
    volume_backups,
    volumes,
    zstack_paths,
    zstack_wire,
)

VERSIONED: tuple[APIRouter, ...] = (
    accounts.sessions,
    queries.router,
    api_jobs.router,
    vm_instances.router,
    volumes.router,
    backup_storage.router,
    volume_backups.router,
    files.router,
    vm_backups.router,
    database_backups.router,
    tags.router,
    scheduler.router,
    accounts.router,
    access_keys.router,
    notifications.router,
    overview.router,
)
ROOT: tuple[APIRouter, ...] = (health.router, metrics.router, zstack_wire.router)
ZSTACK_ONLY: APIRouter = zstack_paths.router  # ZStack's own paths, under /zstack/v1 only, before VERSIONED
