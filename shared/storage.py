"""Backup storage: registering one, and opening its repository."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sqlalchemy.orm import Session

from shared.catalog.models import BackupStorage
from shared.errors import InvalidArgument, RepositoryNotFound
from shared.repository.repo import Repository

TYPES = ("ImageStore", "Remote", "PublicCloud")
ROLES = ("master", "standby")


def _folder(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme != "file" or not parsed.path.startswith("/"):
        raise InvalidArgument(detail=f"ImageStore url must be file:///absolute/path, got {url!r}")
    return Path(parsed.path)


def open_repository(storage: BackupStorage, *, create: bool = False) -> Repository:
    """The repository of ``storage`` (created when ``create`` and it does not exist yet)."""
    passphrase = (storage.credentials or {}).get("encryptionPassphrase")
    location = str(_folder(storage.url)) if storage.type == "ImageStore" else storage.url
    try:
        return Repository.open(location, passphrase)
    except RepositoryNotFound:
        if not create:
            raise
        return Repository.init(location, encrypt=bool(passphrase), passphrase=passphrase)


def refresh_capacity(storage: BackupStorage) -> None:
    if storage.type != "ImageStore":
        return
    try:
        usage = shutil.disk_usage(_folder(storage.url))
    except OSError:
        storage.status = "Disconnected"
        return
    storage.totalCapacity, storage.availableCapacity = usage.total, usage.free
    storage.status = "Connected"


def register_storage(session: Session, params: dict[str, Any]) -> BackupStorage:
    """Validate, create the repository if the folder has none, and record the storage."""
    kind = params.get("type") or "ImageStore"
    if kind not in TYPES:
        raise InvalidArgument(detail=f"type must be one of {', '.join(TYPES)}")
    if kind != "ImageStore":
        raise InvalidArgument(detail=f"{kind} backup storage is not supported by this build yet")
    url = params.get("url")
    if not isinstance(url, str) or not url:
        raise InvalidArgument(detail="url is required")
    role = params.get("role") or "master"
    if role not in ROLES:
        raise InvalidArgument(detail="role must be master or standby")
    folder = _folder(url)
    if folder.exists() and not folder.is_dir():
        raise InvalidArgument(detail=f"{folder} exists and is not a folder")
    storage = BackupStorage(
        name=str(params.get("name") or folder.name),
        description=params.get("description"),
        type=kind,
        url=url,
        role=role,
    )
    secrets = {k: params[k] for k in ("encryptionPassphrase",) if params.get(k)}
    storage.credentials = secrets or None
    repo = open_repository(storage, create=True)
    storage.repositoryUuid = repo.id
    refresh_capacity(storage)
    session.add(storage)
    session.flush()
    return storage
