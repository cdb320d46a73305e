"""API keys: ``Authorization: Bearer <key>`` (or ZStack's ``OAuth <key>``).

Keys are random 32-byte tokens, so a SHA-256 of the key is a safe lookup hash (GitHub-token
style); the key itself is shown once and never stored. ``BLOCKVAULT_ADMIN_API_KEY`` seeds an
admin account's key at start.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.catalog.models import Account, ApiKey, now
from shared.errors import Unauthorized

LAST_USED_GRANULARITY = timedelta(minutes=1)


@dataclass(frozen=True)
class Caller:
    account_uuid: str
    admin: bool


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "bv_" + secrets.token_urlsafe(32)


def seed_admin(session: Session, key: str) -> None:
    """Make sure ``key`` opens an admin account (idempotent)."""
    digest = key_hash(key)
    if session.scalars(select(ApiKey).where(ApiKey.keyHash == digest)).first():
        return
    admin = session.scalars(select(Account).where(Account.name == "admin")).first()
    if admin is None:
        admin = Account(name="admin", type="SystemAdmin")
        session.add(admin)
        session.flush()
    session.add(ApiKey(accountUuid=admin.uuid, keyHash=digest, name="BLOCKVAULT_ADMIN_API_KEY"))


def authenticate(session: Session, header: str | None) -> Caller:
    if not header:
        raise Unauthorized(detail="missing Authorization header (Bearer <api key>)")
    scheme, _, key = header.partition(" ")
    if scheme.lower() not in ("bearer", "oauth") or not key.strip():
        raise Unauthorized(detail="Authorization must be 'Bearer <api key>' or 'OAuth <api key>'")
    found = session.scalars(select(ApiKey).where(ApiKey.keyHash == key_hash(key.strip()))).first()
    if found is None:
        raise Unauthorized(detail="invalid API key")
    account = session.get(Account, found.accountUuid)
    if account is None:
        raise Unauthorized(detail="invalid API key")
    moment = now()
    last = found.lastUsedDate
    if last is None or moment - (last if last.tzinfo else last.replace(tzinfo=moment.tzinfo)) > LAST_USED_GRANULARITY:
        found.lastUsedDate = moment  # a write per minute per key, not one per request
    return Caller(account_uuid=account.uuid, admin=account.type == "SystemAdmin")
