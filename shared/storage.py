"""Backup storage: registering one, opening its repository, health checks and master/standby.

The types are the backend registry's (:mod:`shared.repository.backends.registry`: each type's
URL schemes, required and secret fields, encryption), built in: ``ImageStore`` (a local or
mounted folder, ``file://``; a ``master`` and optionally ``standby`` ones), ``Remote`` (a
``blockvault storage-server``, ``http(s)://``, with a token) and ``PublicCloud``
(``s3://bucket/prefix`` on any S3-compatible endpoint, always encrypted client-side). The
master/standby roles and failover are ImageStore's alone. Every repository of one deployment
names chunks alike (a new one is created like an existing one), so copies between any two
are made by sending only the chunks the target lacks, without re-hashing.

Credentials (tokens, keys, passphrases) are read and written only through
:mod:`shared.credentials`, which keeps the secrets sealed in the catalog;
:func:`update_credentials` re-enters them (``updateBackupStorage``), checked like registering.

Health: :func:`check_storages` (run by every worker's maintenance thread) probes each storage
and marks it Connected or Disconnected with its capacity; when the ImageStore master fails and
a standby answers, the standby is promoted (:func:`failover`). A backup that fails on the
master mid-way calls :func:`failover` itself and carries on on the new master.

Locks: the health pass and a failover commit each storage's probe on its own, so neither holds
one storage row while it waits for another (a job that holds its master's row while it probes
the standby cannot deadlock with them); :func:`promote` locks the ImageStore rows in one order
(:data:`IN_ORDER`), so two promotions at once queue instead of deadlocking.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.catalog.models import BackupStorage, new_uuid, now
from shared.config import get_settings
from shared.credentials import credentials_of, set_credentials
from shared.errors import BlockvaultError, Conflict, CredentialsUnreadable, InvalidArgument, RepositoryNotFound, require
from shared.repository.backends import Backend, open_backend, registry
from shared.repository.backends.registry import BackendType
from shared.repository.repo import Repository

log = logging.getLogger(__name__)
ROLES = ("master", "standby")
REGISTER_RETRY_SECONDS = 5.0
IN_ORDER = (BackupStorage.createDate, BackupStorage.uuid)  # the one order storage rows are locked in


def type_of_url(url: str) -> str | None:
    """The backup storage type whose URLs have ``url``'s scheme (None for another scheme, or
    none: a plain path is no storage URL)."""
    scheme = urlparse(url).scheme
    entry = registry.for_scheme(scheme) if scheme else None
    return entry.storage_type if entry is not None else None


def _entry(kind: str) -> BackendType:
    entry = registry.for_type(kind)
    if entry is None:
        raise InvalidArgument(detail=f"type must be one of {', '.join(t.storage_type for t in registry.types())}")
    return entry


def _check_url(kind: str, url: str) -> str:
    entry = _entry(kind)
    parsed = urlparse(url)
    if parsed.scheme not in entry.schemes:
        schemes = " or ".join(f"{s}://" for s in entry.schemes)
        raise InvalidArgument(detail=f"a {kind} backup storage url starts with {schemes}, got {url!r}")
    problem = entry.check_url(url)
    if problem:
        raise InvalidArgument(detail=problem)
    return url.rstrip("/") if parsed.path not in ("", "/") else url


def open_storage_backend(storage: BackupStorage, *, retry_seconds: float | None = -1.0) -> Backend:
    """The backend of ``storage`` with its credentials; retried for the configured
    ``BLOCKVAULT_STORAGE_RETRY_SECONDS`` unless ``retry_seconds`` says otherwise."""
    return _backend(storage, credentials_of(storage), retry_seconds)


def _backend(storage: BackupStorage, creds: dict[str, str], retry_seconds: float | None) -> Backend:
    """The backend of ``storage``: the options its type's fields name, from ``creds``, and
    what they lack from this process's settings (``BLOCKVAULT_S3_ENDPOINT``, ...)."""
    settings = get_settings()
    entry = registry.for_location(storage.url)
    options = entry.options(creds, settings.text) if entry is not None else {}
    if retry_seconds is not None and retry_seconds < 0:
        retry_seconds = settings.storage_retry_seconds
    return open_backend(storage.url, options, retry_seconds=retry_seconds)


def open_repository(
    storage: BackupStorage,
    *,
    create: bool = False,
    like: Repository | None = None,
    retry_seconds: float | None = -1.0,
) -> Repository:
    """The repository of ``storage`` (created, ``like`` another when given, when ``create``
    and it does not exist yet)."""
    creds = credentials_of(storage)
    passphrase = creds.get("encryptionPassphrase")
    backend = _backend(storage, creds, retry_seconds)
    try:
        return Repository.open(backend, passphrase)
    except RepositoryNotFound:
        if not create:
            raise
        return Repository.init(backend, encrypt=bool(passphrase), passphrase=passphrase, like=like)


def probe(storage: BackupStorage) -> bool:
    """Ask the storage at once (no retries) whether it answers and holds its repository;
    record status and capacity. Returns whether it is healthy. CredentialsUnreadable passes
    through and changes nothing: a process that cannot read the credentials knows nothing of
    the storage's health."""
    try:
        backend = open_storage_backend(storage, retry_seconds=None)
        try:
            capacity = backend.capacity()
            healthy = backend.exists("config")
        finally:
            backend.close()
    except CredentialsUnreadable:
        raise
    except BlockvaultError as exc:
        log.info("storage.unhealthy uuid=%s %s", storage.uuid, exc)
        healthy, capacity = False, None
    if healthy and capacity is not None:
        storage.totalCapacity, storage.availableCapacity = capacity
    status = "Connected" if healthy else "Disconnected"
    if storage.status != status:
        log.warning("storage.status uuid=%s %s -> %s", storage.uuid, storage.status, status)
        storage.status = status
        storage.lastOpDate = now()
    return healthy


def _answers(storage: BackupStorage) -> bool:
    """:func:`probe` for the health pass and the choice of a new master: a storage whose
    credentials this process cannot read is passed over, its status left as it is."""
    try:
        return probe(storage)
    except CredentialsUnreadable as exc:
        log.warning("storage.credentials_unreadable uuid=%s %s", storage.uuid, exc)
        return False


CAPACITY_EVERY = 10.0  # seconds between two capacity refreshes of one storage by one process
_refreshed: dict[str, float] = {}


def refresh_capacity(storage: BackupStorage, *, force: bool = False) -> None:
    """Status and capacity after a job wrote to or deleted from ``storage``: at most every
    :data:`CAPACITY_EVERY` seconds per process (thousands of small backups a minute would
    otherwise probe the storage as often), at once with ``force``."""
    moment = time.monotonic()
    if not force and moment - _refreshed.get(storage.uuid, -CAPACITY_EVERY) < CAPACITY_EVERY:
        return
    _refreshed[storage.uuid] = moment
    probe(storage)


def _reference(session: Session) -> Repository | None:
    """The repository new ones are created like: the oldest storage that opens."""
    for other in session.scalars(select(BackupStorage).order_by(BackupStorage.createDate)):
        if other.status != "Connected" or not other.repositoryUuid:
            continue
        try:
            return open_repository(other, retry_seconds=REGISTER_RETRY_SECONDS)
        except BlockvaultError as exc:
            log.info("storage.reference_skipped uuid=%s %s", other.uuid, exc)
    return None


def register_storage(session: Session, params: dict[str, Any]) -> BackupStorage:
    """Validate, open the repository at the url or create one like the others, and record
    the storage. A storage holding a repository already is attached as it is (its backups
    are imported by ``scanBackupStorage``)."""
    kind = params.get("type") or "ImageStore"
    entry = _entry(str(kind))
    require(params, "url")
    if not isinstance(params["url"], str):
        raise InvalidArgument(detail="url must be a string")
    url = _check_url(kind, params["url"])
    role = params.get("role") or "master"
    if role not in ROLES:
        raise InvalidArgument(detail="role must be master or standby")
    if kind != "ImageStore" and params.get("role") not in (None, "master"):
        raise InvalidArgument(detail="only ImageStore backup storage has a standby role")
    days = params.get("objectLockDays")
    if isinstance(days, (int, float)) and not isinstance(days, bool):  # a number, as JSON gives it
        params = {**params, "objectLockDays": str(days)}
    _check_credentials(entry, params, tuple(f.name for f in registry.fields()))
    where = {f.name: params.get(f.name) for f in entry.fields if f.identity}
    for other in session.scalars(select(BackupStorage).where(BackupStorage.url == url)):
        theirs = credentials_of(other, secrets=False)
        if all(theirs.get(name) == value for name, value in where.items()):
            raise Conflict(detail=f"backup storage {other.uuid} is registered with {url} already")
    if kind == "ImageStore":
        folder = urlparse(url).path
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise InvalidArgument(detail=f"{folder} exists and is not a folder")
    storage = BackupStorage(
        uuid=new_uuid(),  # before the credentials: they are sealed to it
        name=str(params.get("name") or urlparse(url).path.rstrip("/").rsplit("/", 1)[-1] or url),
        description=params.get("description"),
        type=kind,
        url=url,
        role=role,
        status="Connected",
    )
    set_credentials(storage, params)
    like = _reference(session)
    repo = open_repository(storage, create=True, like=like, retry_seconds=REGISTER_RETRY_SECONDS)
    if like is not None and not repo.codec.same_naming(like.codec):
        log.warning("storage.naming_differs url=%s: copies to or from it are refused", url)
    storage.repositoryUuid = repo.id
    probe(storage)
    session.add(storage)
    session.flush()
    if role == "standby" and current_master(session) is None:
        storage.role = "master"  # a standby with no master would take no backups
    return storage


def _check_credentials(entry: BackendType, params: dict[str, Any], keys: tuple[str, ...]) -> None:
    """InvalidArgument unless ``params`` has the fields ``entry``'s type requires and ``keys``
    are strings."""
    require(params, *entry.required)
    for key in keys:
        if params.get(key) is not None and not isinstance(params[key], str):
            raise InvalidArgument(detail=f"{key} must be a string")


def update_credentials(storage: BackupStorage, params: dict[str, Any]) -> None:
    """updateBackupStorage's ``token``, ``accessKey``, ``secretKey`` and ``encryptionPassphrase``
    (nothing when none is given): merged with the ones the row holds (when it can read them:
    after a catalog came from another deployment, give them all), checked like registering (the
    storage's repository must open with them) and sealed."""
    given = {key: params[key] for key in registry.secret_names() if key in params}
    if not given:
        return
    for key, value in given.items():
        if not isinstance(value, str) or not value:
            raise InvalidArgument(detail=f"{key} must be a non-empty string")
    try:
        current = credentials_of(storage)
    except CredentialsUnreadable:
        current = credentials_of(storage, secrets=False)
    merged = {**current, **given}
    _check_credentials(_entry(storage.type), merged, ())
    trial = BackupStorage(uuid=storage.uuid, name=storage.name, type=storage.type, url=storage.url)
    set_credentials(trial, merged)
    repo = open_repository(trial, retry_seconds=REGISTER_RETRY_SECONDS)
    repo.close()
    if storage.repositoryUuid and repo.id != storage.repositoryUuid:
        raise Conflict(detail=f"{storage.url} holds repository {repo.id}, not {storage.repositoryUuid} any more")
    set_credentials(storage, merged)
    probe(storage)
    log.info("storage.credentials_updated uuid=%s", storage.uuid)


# -- master / standby -----------------------------------------------------------------------------
def current_master(session: Session) -> BackupStorage | None:
    """Where backups go by default: the enabled ImageStore master (the oldest, should there
    be several); with no ImageStore at all, the oldest enabled Remote or PublicCloud one."""
    masters = select(BackupStorage).where(BackupStorage.role == "master", BackupStorage.state == "Enabled")
    local = session.scalars(masters.where(BackupStorage.type == "ImageStore").order_by(BackupStorage.createDate))
    return local.first() or session.scalars(masters.order_by(BackupStorage.createDate)).first()


def standbys(session: Session) -> list[BackupStorage]:
    return list(
        session.scalars(
            select(BackupStorage)
            .where(BackupStorage.type == "ImageStore", BackupStorage.role == "standby")
            .where(BackupStorage.state == "Enabled")
            .order_by(BackupStorage.createDate)
        )
    )


def promote(session: Session, standby: BackupStorage) -> BackupStorage:
    """Make ``standby`` the master and every ImageStore master a standby, in one
    transaction that holds the storage rows (two workers promoting at once agree)."""
    ours = select(BackupStorage).where(BackupStorage.type == "ImageStore").order_by(*IN_ORDER)
    rows = session.scalars(ours.with_for_update()).all()
    for row in rows:
        if row.role == "master" and row.uuid != standby.uuid:
            row.role = "standby"
            row.lastOpDate = now()
    standby.role = "master"
    standby.lastOpDate = now()
    session.commit()
    log.warning("storage.promoted uuid=%s", standby.uuid)
    return standby


def failover(session: Session, failed: BackupStorage, *, full: bool = False) -> BackupStorage | None:
    """After ``failed`` stopped answering (or, with ``full``, ran out of space): the master to
    use now. When ``failed`` is (or was) the master and is unhealthy or full, the first healthy
    standby is promoted; when another worker promoted one already, that one. None when there
    is no healthy master to go on with."""
    session.refresh(failed)
    if failed.type != "ImageStore":
        return None
    if failed.role == "master":
        answers = probe(failed)
        session.commit()
        if answers and not full:
            return None  # it answers: the failure was something else
        for candidate in standbys(session):
            answers = _answers(candidate)
            session.commit()
            if answers:
                return promote(session, candidate)
        return None
    master = current_master(session)
    if master is not None and master.uuid != failed.uuid and probe(master):
        return master
    return None


def switch_role(session: Session, storage: BackupStorage) -> BackupStorage:
    """switchBackupStorageRole: promote this standby by hand."""
    if storage.type != "ImageStore" or storage.role != "standby":
        raise Conflict(detail=f"backup storage {storage.uuid} is not an ImageStore standby")
    if storage.state != "Enabled":
        raise Conflict(detail=f"backup storage {storage.uuid} is {storage.state}")
    if not probe(storage):
        raise Conflict(detail=f"backup storage {storage.uuid} is Disconnected: it cannot become the master")
    return promote(session, storage)


def check_storages(session: Session) -> None:
    """One health pass: probe every enabled storage, each probe committed on its own; fail over
    when the master is down."""
    rows = session.scalars(select(BackupStorage).where(BackupStorage.state == "Enabled").order_by(*IN_ORDER)).all()
    for row in rows:
        _answers(row)
        session.commit()
    master = current_master(session)
    if master is not None and master.type == "ImageStore" and master.status == "Disconnected":
        failover(session, master)
