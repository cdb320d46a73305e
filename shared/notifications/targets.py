"""Notification targets: what each type takes, its secrets sealed to the row, and sending.

``webhook``: ``url`` (http or https); the JSON body is POSTed with the header
``X-Blockvault-Signature: sha256=<hex HMAC-SHA256 of the body under the target's secret>``
(the ``secret`` is optional: without one, no signature header). ``smtp``: ``host``, ``port``
(default 25, or 587 with ``starttls``), ``starttls``, ``username`` and ``password`` (optional,
both or neither), ``sender``, ``recipients`` (a list, or a comma-separated string), ``caFile``
(a CA bundle for STARTTLS to a server with a private CA). The secrets (``secret``,
``password``) are sealed to the row under the server secret (:func:`shared.secret.seal`, the
same scheme as storage credentials) and never returned, logged or put in a message; an error
text that quotes one has it replaced by ``***``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import smtplib
import ssl
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlparse

import httpx

from shared.catalog.models import NotificationTarget, new_uuid
from shared.errors import CredentialsUnreadable, DeliveryFailed, InvalidArgument
from shared.secret import seal, unseal

log = logging.getLogger(__name__)

LABEL = b"blockvault notification target v1"
TYPES = ("webhook", "smtp")
OPTIONS = {"webhook": ("url",), "smtp": ("host", "port", "starttls", "username", "sender", "recipients", "caFile")}
SECRETS = {"webhook": ("secret",), "smtp": ("password",)}
SIGNATURE_HEADER = "X-Blockvault-Signature"
TIMEOUT = 10.0
MAX_THROTTLE = 7 * 86400
DEFAULT_THROTTLE = 3600


# -- configuration ------------------------------------------------------------------------------
def _text(params: dict[str, Any], key: str, *, limit: int = 2048) -> str | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise InvalidArgument(detail=f"{key} must be a printable string of at most {limit} characters")
    return value


def _webhook_options(params: dict[str, Any]) -> dict[str, Any]:
    url = _text(params, "url")
    parsed = urlparse(url or "")
    if url is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidArgument(detail="a webhook target needs url: an http:// or https:// URL")
    if parsed.password:
        raise InvalidArgument(detail="url must not carry a password: give the signing secret as secret")
    return {"url": url}


def _recipients(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and "@" in v for v in value):
        raise InvalidArgument(detail="recipients must be a non-empty list of mail addresses")
    return list(value)


def _smtp_options(params: dict[str, Any]) -> dict[str, Any]:
    host = _text(params, "host", limit=255)
    if host is None:
        raise InvalidArgument(detail="an smtp target needs host")
    starttls = params.get("starttls", False)
    if not isinstance(starttls, bool):
        raise InvalidArgument(detail="starttls must be true or false")
    port = params.get("port", 587 if starttls else 25)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidArgument(detail="port must be an integer from 1 to 65535")
    sender = _text(params, "sender", limit=255)
    if sender is None or "@" not in sender:
        raise InvalidArgument(detail="an smtp target needs sender: a mail address")
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "starttls": starttls,
        "sender": sender,
        "recipients": _recipients(params.get("recipients")),
    }
    for key in ("username", "caFile"):
        value = _text(params, key)
        if value is not None:
            options[key] = value
    return options


def throttle(params: dict[str, Any], default: int) -> int:
    value = params.get("throttleSeconds", default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_THROTTLE:
        raise InvalidArgument(detail=f"throttleSeconds must be an integer from 0 to {MAX_THROTTLE}")
    return value


def configure(target: NotificationTarget, params: dict[str, Any]) -> None:
    """Set ``target``'s type-specific options, secrets and throttle from ``params`` (a new
    target's, or an update's merged over the current ones); InvalidArgument naming what is wrong."""
    if target.type not in TYPES:
        raise InvalidArgument(detail=f"type must be one of: {', '.join(TYPES)}")
    if not target.uuid:
        target.uuid = new_uuid()
    target.options = _webhook_options(params) if target.type == "webhook" else _smtp_options(params)
    secrets = {key: params[key] for key in SECRETS[target.type] if params.get(key) not in (None, "")}
    for key, value in secrets.items():
        if not isinstance(value, str) or len(value) > 1024:
            raise InvalidArgument(detail=f"{key} must be a string of at most 1024 characters")
    if target.type == "smtp" and bool(target.options.get("username")) != bool(secrets.get("password")):
        raise InvalidArgument(detail="username and password go together: give both or neither")
    target.sealedSecrets = seal(LABEL, target.uuid, json.dumps(secrets).encode()) if secrets else None
    target.throttleSeconds = throttle(params, target.throttleSeconds or DEFAULT_THROTTLE)


def secrets_of(target: NotificationTarget) -> dict[str, str]:
    """The target's secrets; CredentialsUnreadable when sealed under another server secret."""
    if not target.sealedSecrets:
        return {}
    try:
        return {str(k): str(v) for k, v in json.loads(unseal(LABEL, target.uuid, target.sealedSecrets)).items()}
    except ValueError:
        raise CredentialsUnreadable(name=target.name, uuid=target.uuid) from None


def current_params(target: NotificationTarget) -> dict[str, Any]:
    """What :func:`configure` needs to rebuild ``target`` as it is (an update merges over it)."""
    return {**(target.options or {}), **secrets_of(target), "throttleSeconds": target.throttleSeconds}


# -- sending ------------------------------------------------------------------------------------
def signature(secret: str, body: bytes) -> str:
    """The value of :data:`SIGNATURE_HEADER` for ``body``: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _redacted(text: str, secrets: dict[str, str]) -> str:
    for value in secrets.values():
        if value:
            text = text.replace(value, "***")
    return text


def _post(target: NotificationTarget, secrets: dict[str, str], payload: dict[str, Any]) -> None:
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "blockvault"}
    if secrets.get("secret"):
        headers[SIGNATURE_HEADER] = signature(secrets["secret"], body)
    response = httpx.post(str((target.options or {})["url"]), content=body, headers=headers, timeout=TIMEOUT)
    if response.status_code >= 300:
        raise OSError(f"the webhook answered HTTP {response.status_code}")


def _mail(target: NotificationTarget, secrets: dict[str, str], subject: str, text: str) -> None:
    options = target.options or {}
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = options["sender"]
    message["To"] = ", ".join(options["recipients"])
    message.set_content(text)
    with smtplib.SMTP(options["host"], int(options["port"]), timeout=TIMEOUT) as smtp:
        if options.get("starttls"):
            smtp.starttls(context=ssl.create_default_context(cafile=options.get("caFile")))
        if options.get("username"):
            smtp.login(options["username"], secrets.get("password", ""))
        smtp.send_message(message)


def send(target: NotificationTarget, subject: str, text: str, payload: dict[str, Any]) -> None:
    """Deliver one message: ``payload`` as the webhook's JSON body, ``subject`` and ``text`` as
    the mail. DeliveryFailed (its text free of the target's secrets) when it did not arrive."""
    secrets = secrets_of(target)
    try:
        if target.type == "webhook":
            _post(target, secrets, payload)
        else:
            _mail(target, secrets, subject, text)
    except (OSError, httpx.HTTPError, smtplib.SMTPException, ssl.SSLError) as exc:
        detail = _redacted(f"{type(exc).__name__}: {exc}", secrets)
        raise DeliveryFailed(target=target.name or target.uuid, detail=detail) from None
