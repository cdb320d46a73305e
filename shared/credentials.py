"""Backup storage credentials at rest: secrets sealed, options readable.

A storage row's ``credentials`` column keeps its options (``endpoint``, ``region``, ``caFile``)
as they are, for the checks that compare storages, and its secrets (``token``, ``accessKey``,
``secretKey``, ``encryptionPassphrase``) as one ``sealed`` value (which fields are secret, the
backend registry says: :func:`~shared.repository.backends.registry.secret_names`): AES-256-GCM
under a key derived from the server secret (:func:`shared.secret.derived_key`), with the row's
uuid as associated data, so that the blob opens on that row only and a catalog (or a dump of
it, which is what database backups hold) reveals none of them on its own.

:func:`credentials_of` is how everything reads a storage's credentials, :func:`set_credentials`
how everything writes them. Rows of earlier versions hold their secrets in the clear: they
still read, and :func:`seal_plaintext` (run when the API starts) seals them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.catalog.models import BackupStorage, new_uuid
from shared.errors import CredentialsUnreadable
from shared.repository.backends.registry import option_names, secret_names
from shared.secret import seal, unseal

log = logging.getLogger(__name__)

SEALED = "sealed"
LABEL = b"blockvault credentials v1"


def _seal(storage_uuid: str, secrets: dict[str, str]) -> str:
    return seal(LABEL, storage_uuid, json.dumps(secrets, sort_keys=True).encode())


def _unseal(storage: BackupStorage, value: object) -> dict[str, str]:
    try:
        secrets = json.loads(unseal(LABEL, storage.uuid, value))
    except ValueError:
        raise CredentialsUnreadable(name=storage.name, uuid=storage.uuid) from None
    return {str(key): str(secret) for key, secret in secrets.items()}


def credentials_of(storage: BackupStorage, *, secrets: bool = True) -> dict[str, str]:
    """The storage's credentials: its options and (unless ``secrets`` is False) its secrets;
    CredentialsUnreadable when they were sealed under another server secret."""
    stored = dict(storage.credentials or {})
    sealed = stored.pop(SEALED, None)
    if not secrets:
        options = option_names()
        return {key: value for key, value in stored.items() if key in options}
    if sealed is not None:
        stored.update(_unseal(storage, sealed))
    return stored


def set_credentials(storage: BackupStorage, credentials: dict[str, Any]) -> None:
    """Record ``credentials`` on the row (given a uuid now if it has none): the options as they
    are, the secrets sealed to this row. Empty values are left out."""
    if not storage.uuid:
        storage.uuid = new_uuid()
    stored: dict[str, Any] = {key: credentials[key] for key in option_names() if credentials.get(key)}
    secrets = {key: str(credentials[key]) for key in secret_names() if credentials.get(key)}
    if secrets:
        stored[SEALED] = _seal(storage.uuid, secrets)
    storage.credentials = stored or None


def in_the_clear(storage: BackupStorage) -> bool:
    """Whether the row holds a secret unsealed (an earlier version's row)."""
    return any(key in (storage.credentials or {}) for key in secret_names())


def seal_plaintext(session: Session) -> int:
    """Seal the secrets of every row an earlier version stored in the clear; how many."""
    sealed = 0
    for row in session.scalars(select(BackupStorage)):
        if not in_the_clear(row):
            continue
        try:
            set_credentials(row, credentials_of(row))
        except CredentialsUnreadable as exc:  # part sealed under another secret: re-entering fixes it
            log.warning("credentials.unreadable storage=%s %s", row.uuid, exc)
            continue
        sealed += 1
        log.info("credentials.sealed storage=%s", row.uuid)
    return sealed
