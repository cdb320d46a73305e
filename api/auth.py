"""API keys: ``Authorization: Bearer <key>`` (or ZStack's ``OAuth <key>``), sessions, and
ZStack's access keys (``Authorization: ZStack <AccessKeyID>:<signature>``, :mod:`shared.accesskeys`).

Keys are random 32-byte tokens shown once and never stored: the catalog keeps an HMAC-SHA256
of each under the server secret (:mod:`shared.secret`), so a copy of the catalog alone cannot
check guessed keys. Rows of earlier versions, a plain SHA-256, still open and are re-hashed on
first use. ``BLOCKVAULT_ADMIN_API_KEY`` seeds an admin account's key at start.
The routes lock out a client that keeps presenting bad keys
(:class:`shared.ratelimit.FailureWindow`) and answer it with :class:`TooManyFailures`.

Sessions (ZStack's ``LogInByAccount``): an account with a password (only an scrypt hash of its
SHA-512 hex is stored, :func:`password_hash`) logs in for a session uuid that opens the API as
``OAuth <session uuid>`` (or Bearer) until it expires (``BLOCKVAULT_SESSION_TIMEOUT_SECONDS``),
it is logged out, or the account's password changes. The uuid is shown once, in the login's
answer; the catalog keeps its keyed hash (:func:`session_hash`), as for keys.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, select
from sqlalchemy.orm import Session

from shared import accesskeys
from shared.catalog.models import Account, ApiKey, LoginSession, ProjectMember, aware, new_uuid, now
from shared.config import get_settings
from shared.errors import BlockvaultError, Unauthorized
from shared.ratelimit import FailureWindow
from shared.secret import keyed_hash

log = logging.getLogger(__name__)

LAST_USED_GRANULARITY = timedelta(minutes=1)
HMAC_PREFIX = "hmac-sha256:"  # stored hashes without it are an earlier version's plain SHA-256


class TooManyFailures(BlockvaultError):
    """too many failed authentications from {client}: retry in {retry_after} s"""

    code = "TOO_MANY_REQUESTS"
    http_status = 429

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.fields["retry_after"])}


def refuse_while_locked(failures: FailureWindow, key: str, client: str) -> None:
    """TooManyFailures (429 with Retry-After) while ``key`` has too many failures in ``failures``."""
    wait = failures.retry_after(key)
    if wait is not None:
        raise TooManyFailures(client=client, retry_after=max(1, math.ceil(wait)))


@dataclass(frozen=True)
class Caller:
    account_uuid: str
    admin: bool
    projects: frozenset[str] = frozenset()  # the projects the account is a member of (any role)
    project_admin: frozenset[str] = frozenset()  # those where it is projectAdmin


# -- hashing ---------------------------------------------------------------------------------------
def key_hash(key: str) -> str:
    return HMAC_PREFIX + keyed_hash(key)


def legacy_key_hash(key: str) -> str:
    """How versions before the server secret stored a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "bv_" + secrets.token_urlsafe(32)


def seed_admin(session: Session, key: str) -> None:
    """Make sure ``key`` opens an admin account (idempotent)."""
    digest = key_hash(key)
    found = session.scalars(select(ApiKey).where(ApiKey.keyHash.in_((digest, legacy_key_hash(key))))).first()
    if found is not None:
        found.keyHash = digest
        return
    admin = session.scalars(select(Account).where(Account.name == "admin")).first()
    if admin is None:
        admin = Account(name="admin", type="SystemAdmin")
        session.add(admin)
        session.flush()
    session.add(ApiKey(accountUuid=admin.uuid, keyHash=digest, name="BLOCKVAULT_ADMIN_API_KEY"))


# -- passwords and sessions ------------------------------------------------------------------------
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SCRYPT_PREFIX = "scrypt:"
SHA512_HEX = 128
SESSION_UUID_CHARS = 32


def password_digest(password: str) -> str:
    """What ZStack's clients send for a password: its SHA-512, in hex."""
    return hashlib.sha512(password.encode()).hexdigest()


def password_hash(digest: str) -> str:
    """The stored form of a password's SHA-512 hex: scrypt with a random salt."""
    salt = secrets.token_bytes(16)
    derived = hashlib.scrypt(digest.lower().encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"{SCRYPT_PREFIX}{SCRYPT_N}:{SCRYPT_R}:{SCRYPT_P}:{salt.hex()}:{derived.hex()}"


def password_matches(stored: str | None, digest: str) -> bool:
    if not stored or not stored.startswith(SCRYPT_PREFIX):
        return False
    try:
        n, r, p, salt, expected = stored[len(SCRYPT_PREFIX) :].split(":")
        derived = hashlib.scrypt(
            digest.lower().encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected) // 2
        )
    except ValueError:
        return False
    return hmac.compare_digest(derived.hex(), expected)


def session_hash(token: str) -> str:
    """What the catalog keeps of a session uuid: the first 32 hex digits (128 bits) of its
    HMAC-SHA256 under the server secret, the width of the session table's key."""
    return keyed_hash(token)[:SESSION_UUID_CHARS]


def log_in(session: Session, account_name: str, digest: str) -> tuple[LoginSession, str]:
    """A new session for the account when ``digest`` is the SHA-512 hex of its password, and its
    uuid (shown to the caller once; the row keeps its hash); Unauthorized otherwise (the same
    answer for an unknown account, or one without a password)."""
    account = session.scalars(select(Account).where(Account.name == account_name)).first()
    if account is None or not password_matches(account.passwordHash, digest):
        if account is None:
            password_hash(digest)  # the same work either way: no timing oracle for account names
        raise Unauthorized(detail="wrong account name or password")
    moment = now()
    for stale in session.scalars(
        select(LoginSession).where(LoginSession.accountUuid == account.uuid, LoginSession.expiredDate <= moment)
    ):
        session.delete(stale)
    token = new_uuid()
    row = LoginSession(
        uuid=session_hash(token),
        accountUuid=account.uuid,
        createDate=moment,
        expiredDate=moment + timedelta(seconds=get_settings().session_timeout_seconds),
    )
    session.add(row)
    session.flush()
    return row, token


def log_out(session: Session, token: str) -> bool:
    """End the session ``token``; False when there was none."""
    row = session.get(LoginSession, session_hash(token))
    if row is None:
        return False
    session.delete(row)
    return True


def live_session(session: Session, token: str) -> LoginSession | None:
    """The session ``token`` names while it lasts; None for anything else (no session, an
    expired one, a string that is no session uuid)."""
    if len(token) != SESSION_UUID_CHARS or token.strip("0123456789abcdef"):
        return None
    row = session.get(LoginSession, session_hash(token))
    if row is None or aware(row.expiredDate) <= now():
        return None
    return row


def end_sessions(session: Session, account_uuid: str) -> None:
    """End every session of an account (its password changed)."""
    session.execute(delete(LoginSession).where(LoginSession.accountUuid == account_uuid))


def _caller(session: Session, account: Account) -> Caller:
    memberships = session.execute(
        select(ProjectMember.projectUuid, ProjectMember.role).where(ProjectMember.accountUuid == account.uuid)
    ).all()
    return Caller(
        account_uuid=account.uuid,
        admin=account.type == "SystemAdmin",
        projects=frozenset(project for project, _role in memberships),
        project_admin=frozenset(project for project, role in memberships if role == "projectAdmin"),
    )


def _session_caller(session: Session, token: str, moment: datetime) -> Caller | None:
    """The caller of a live session ``token``; None when it is no session; Unauthorized when expired."""
    if len(token) != SESSION_UUID_CHARS or token.strip("0123456789abcdef"):
        return None
    row = session.execute(
        select(LoginSession, Account)
        .join(Account, Account.uuid == LoginSession.accountUuid)
        .where(LoginSession.uuid == session_hash(token))
    ).first()
    if row is None:
        return None
    login, account = row
    if aware(login.expiredDate) <= moment:
        raise Unauthorized(detail="the session has expired: log in again")
    return _caller(session, account)


JOB_POLL = re.compile(r"^(/zstack)?/v1/api-jobs/[0-9a-f]{32}$")

# A key, its account and the account's memberships (one row each, or one with no project):
# built once, so that a request neither builds the statement nor computes its cache key again.
KEY_LOOKUP = (
    select(ApiKey, Account, ProjectMember.projectUuid, ProjectMember.role)
    .join(Account, Account.uuid == ApiKey.accountUuid)
    .outerjoin(ProjectMember, ProjectMember.accountUuid == Account.uuid)
    .where(ApiKey.keyHash.in_([bindparam("digest"), bindparam("legacy")]))
)


def authenticate(
    session: Session, header: str | None, *, method: str = "GET", path: str = "", date: str | None = None
) -> Caller:
    """The caller a request's Authorization header names (an API key, a session uuid, or an
    access key's signature of ``method``, ``path`` and the ``date`` header); Unauthorized
    (never quoting the key) when it names none. One query for a key: the key, its account and
    the account's memberships."""
    if not header:
        raise Unauthorized(detail="missing Authorization header (Bearer <api key>)")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() == "zstack":
        job_poll = method == "GET" and JOB_POLL.match(path) is not None  # see accesskeys.verify
        signed = accesskeys.verify(session, key, method, path, date, job_poll=job_poll)
        account = session.get(Account, signed.accountUuid)
        if account is None:  # (deleting an account deletes its keys: a race at most)
            raise Unauthorized(detail="the access key's account is gone")
        return _caller(session, account)
    if scheme.lower() not in ("bearer", "oauth") or not key:
        raise Unauthorized(
            detail="Authorization must be 'Bearer <api key>', 'OAuth <api key or session uuid>' "
            "or 'ZStack <AccessKeyID>:<signature>'"
        )
    from_session = _session_caller(session, key, now())
    if from_session is not None:
        return from_session
    digest = key_hash(key)
    rows = session.execute(KEY_LOOKUP, {"digest": digest, "legacy": legacy_key_hash(key)}).all()
    if not rows:
        raise Unauthorized(detail="invalid API key")
    found, account = rows[0][0], rows[0][1]
    if found.keyHash != digest:
        found.keyHash = digest  # an earlier version's plain SHA-256
        log.info("auth.key_rehashed key=%s", found.uuid)
    moment = now()
    last = found.lastUsedDate
    if last is None or moment - (last if last.tzinfo else last.replace(tzinfo=moment.tzinfo)) > LAST_USED_GRANULARITY:
        found.lastUsedDate = moment  # a write per minute per key, not one per request
    memberships = [(project, role) for _key, _account, project, role in rows if project is not None]
    return Caller(
        account_uuid=account.uuid,
        admin=account.type == "SystemAdmin",
        projects=frozenset(project for project, _role in memberships),
        project_admin=frozenset(project for project, role in memberships if role == "projectAdmin"),
    )
