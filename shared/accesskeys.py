"""ZStack access keys: ``Authorization: ZStack <AccessKeyID>:<signature>`` with a ``Date`` header.

How ZStack's SDKs sign (the Go SDK's ``getAccessKeyHeader`` in ``pkg/client/http_client.go``,
checked by ZStack's server in its ``AccessKeyManagerImpl.doAuth``): the base64 HMAC-SHA1,
under the key's secret, of ``"<METHOD>\\n<Date header, as sent>\\n<path>"``, where the path is
the request's path after the ``/zstack`` context path (``/v1/volumes/...``) and without its
query string. ZStack checks no clock; blockvault also refuses a ``Date`` more than
``BLOCKVAULT_ACCESS_KEY_SKEW_SECONDS`` from its own (a captured request replays for that long
at most).

A key's id is in the clear (it names the key); its secret is sealed to its row under the
server secret (:func:`shared.secret.seal`), since checking a signature needs the secret
itself, and is shown once, in the answer that creates it.
"""

from __future__ import annotations

import hmac
import re
import secrets
import string
from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.accesskey_signature import signature, signed_path
from shared.catalog.models import AccessKey, Account, aware, new_uuid, now
from shared.config import get_settings
from shared.errors import Unauthorized
from shared.secret import seal, unseal

LABEL = b"blockvault access key v1"
ID_CHARS = 20  # ZStack's AccessKeyID: 20 characters
SECRET_CHARS = 40  # and its AccessKeySecret: 40
LAST_USED_GRANULARITY = timedelta(minutes=1)

# Go formats ``Mon, 02 Jan 2006 15:04:05 MST`` with the zone's abbreviation. Abbreviations are
# not unique: the ones read here are those of the zones ZStack is deployed in (CST is China
# Standard Time, as on ZStack's management nodes); a client elsewhere runs in UTC, or in a zone
# Go names by its offset (``+08``, ``-0330``).
ZONES = {
    "UTC": 0,
    "GMT": 0,
    "UT": 0,
    "Z": 0,
    "CST": 8 * 60,
    "HKT": 8 * 60,
    "SGT": 8 * 60,
    "AWST": 8 * 60,
    "JST": 9 * 60,
    "KST": 9 * 60,
    "IST": 5 * 60 + 30,
    "MMT": 6 * 60 + 30,
    "ICT": 7 * 60,
    "WIB": 7 * 60,
    "AEST": 10 * 60,
    "AEDT": 11 * 60,
    "CET": 60,
    "CEST": 2 * 60,
    "BST": 60,
    "EET": 2 * 60,
    "EEST": 3 * 60,
    "MSK": 3 * 60,
    "EST": -5 * 60,
    "EDT": -4 * 60,
    "MST": -7 * 60,
    "MDT": -6 * 60,
    "PST": -8 * 60,
    "PDT": -7 * 60,
}
DATE = re.compile(
    r"^(?:[A-Za-z]{3}, )?(\d{1,2}) ([A-Za-z]{3}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) ([A-Za-z]{1,5}|[+-]\d{2}(?::?\d{2})?)$"
)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


# -- making keys -----------------------------------------------------------------------------------
def _random(length: int, alphabet: str) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def create_key(session: Session, account: Account, description: str | None) -> tuple[AccessKey, str]:
    """A new Enabled key of ``account`` and its secret (to show once; the row keeps it sealed)."""
    secret = _random(SECRET_CHARS, string.ascii_letters + string.digits)
    row = AccessKey(
        uuid=new_uuid(),
        accountUuid=account.uuid,
        userUuid=account.uuid,
        AccessKeyID=_random(ID_CHARS, string.ascii_uppercase + string.digits),
        description=description,
        state="Enabled",
    )
    row.sealedSecret = seal(LABEL, row.uuid, secret.encode())
    session.add(row)
    session.flush()
    return row, secret


# -- checking requests -----------------------------------------------------------------------------
def parse_date(text: str) -> datetime | None:
    """A ``Date`` header as the SDK writes it (RFC 1123 with the zone's abbreviation or
    offset); None when it is not one, or its zone is not known."""
    found = DATE.match(text.strip())
    if not found:
        return None
    day, month, year, hour, minute, second, zone = found.groups()
    if month.title() not in MONTHS:
        return None
    if zone[0] in "+-":
        digits = zone[1:].replace(":", "")
        offset = int(digits[:2]) * 60 + (int(digits[2:]) if len(digits) > 2 else 0)
        offset = -offset if zone[0] == "-" else offset
    elif zone.upper() in ZONES:
        offset = ZONES[zone.upper()]
    else:
        return None
    try:
        local = datetime(int(year), MONTHS.index(month.title()) + 1, int(day), int(hour), int(minute), int(second))
    except ValueError:
        return None
    return local.replace(tzinfo=timezone(timedelta(minutes=offset))).astimezone(UTC)


def verify(
    session: Session, credentials: str, method: str, path: str, date: str | None, *, job_poll: bool = False
) -> AccessKey:
    """The Enabled key that signed this request (``credentials``: what follows ``ZStack ``),
    its last use recorded; Unauthorized otherwise, in the words ZStack's SDKs look for
    ("access key id", "wrong accessKey signature") and never quoting the secret.

    ``job_poll``: the request polls an API job (``GET .../api-jobs/{uuid}``). The Go SDK polls
    with the headers it signed for the call that started the job (``httpWait`` reuses them:
    another method and path, a Date that ages while the job runs), and ZStack's server asks
    no credentials there at all; so here an Enabled key is enough, and the job must still be
    its account's (the route's own check)."""
    key_id, colon, sent = credentials.strip().partition(":")
    if not colon or not key_id or not sent:
        raise Unauthorized(detail="Authorization must be 'ZStack <AccessKeyID>:<signature>'")
    if not date:
        raise Unauthorized(detail="an access-key request needs a Date header (the one it signed)")
    row = session.scalars(select(AccessKey).where(AccessKey.AccessKeyID == key_id)).first()
    if row is None or row.state != "Enabled":
        raise Unauthorized(detail=f"access key id: {key_id[: ID_CHARS * 2]} does not exist or is disabled")
    if job_poll:
        return row
    try:
        secret = unseal(LABEL, row.uuid, row.sealedSecret).decode()
    except ValueError:
        raise Unauthorized(
            detail=f"access key id: {key_id}: its secret was sealed under another server secret; make a new key"
        ) from None
    if not hmac.compare_digest(signature(secret, method.upper(), date, signed_path(path)), sent):
        raise Unauthorized(detail="wrong accessKey signature")
    moment = now()
    when = parse_date(date)
    skew = get_settings().access_key_skew_seconds
    if when is None:
        raise Unauthorized(detail=f"the Date header {date[:64]!r} is not an RFC 1123 date with a known zone")
    if abs((when - moment).total_seconds()) > skew:
        clock = moment.isoformat(timespec="seconds")
        raise Unauthorized(detail=f"the Date header is more than {skew} s from the server's clock ({clock})")
    if row.lastUsedDate is None or moment - aware(row.lastUsedDate) > LAST_USED_GRANULARITY:
        row.lastUsedDate = moment  # a write per minute per key, not one per request
    return row
