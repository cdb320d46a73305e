"""The server secret: the one key of a deployment that is not in its catalog.

``BLOCKVAULT_SECRET_KEY`` (at least 16 characters), else 32 random bytes kept in
``<data dir>/secret.key`` (mode 0600, created on first use). Whatever a copy of the catalog must
not reveal on its own is keyed by it: API key and session hashes (:func:`keyed_hash`,
HMAC-SHA256) and what must be read back, backup storage credentials and access-key secrets
(AES-256-GCM under :func:`derived_key`, one HKDF label per use: :func:`seal`). So every
process of a deployment, the API, every worker and beat, must hold the same secret: the
embedded default shares one data dir; a shared (PostgreSQL) catalog needs
``BLOCKVAULT_SECRET_KEY`` set on all of them, and :func:`check_at_start` warns when it is not
(with ``BLOCKVAULT_ENVIRONMENT=production`` the process refuses to start: :mod:`shared.production`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.config import get_settings
from shared.errors import UsageError
from shared.private import FILE_MODE, private_dir, tighten

log = logging.getLogger(__name__)

SECRET_FILE = "secret.key"
SEALED_VERSION = "v1:"
NONCE_BYTES = 12
MIN_SECRET_CHARS = 16


def server_secret() -> bytes:
    """``BLOCKVAULT_SECRET_KEY``, else the key in ``<data dir>/secret.key`` (created on first use)."""
    settings = get_settings()
    configured = settings.secret_key.get_secret_value() if settings.secret_key else None
    return _secret(configured, settings.data_path / SECRET_FILE)


@functools.cache
def _secret(configured: str | None, path: Path) -> bytes:
    if configured is not None:
        if len(configured) < MIN_SECRET_CHARS:
            raise UsageError(detail=f"BLOCKVAULT_SECRET_KEY must have at least {MIN_SECRET_CHARS} characters")
        return configured.encode()
    if not path.exists():
        _create_secret(path)
    tighten(path)
    text = path.read_text().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < 32:
        raise UsageError(detail=f"{path} is not a secret key (64 hex digits); set BLOCKVAULT_SECRET_KEY or restore it")
    return secret


def _create_secret(path: Path) -> None:
    """Write a random key to ``path`` mode 0600, atomically: written in full to a temporary
    file, then linked in place; when another process got there first, its key stays."""
    private_dir(path.parent)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_bytes(32).hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)  # never replaces a key another process created meanwhile
    finally:
        temp.unlink(missing_ok=True)
    log.info("secret.created path=%s", path)


def keyed_hash(value: str) -> str:
    """HMAC-SHA256 of ``value`` under the server secret, in hex: what the catalog keeps of a
    token it must recognise but never reveal."""
    return hmac.new(server_secret(), value.encode(), hashlib.sha256).hexdigest()


def derived_key(label: bytes) -> bytes:
    """A 32-byte key for one use of the server secret, named by ``label`` (HKDF-SHA256)."""
    return _derive(server_secret(), label)


@functools.cache
def _derive(secret: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(secret)


def _aad(label: bytes, row_uuid: str) -> bytes:
    return label + b"\x00" + row_uuid.encode()


def seal(label: bytes, row_uuid: str, plain: bytes) -> str:
    """``plain`` sealed for the catalog row ``row_uuid``: AES-256-GCM under the key of ``label``,
    the row's uuid as associated data (so the value opens on that row only), as text
    ``v1:<base64 of nonce and ciphertext>``."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(derived_key(label)).encrypt(nonce, plain, _aad(label, row_uuid))
    return SEALED_VERSION + base64.b64encode(nonce + sealed).decode()


def unseal(label: bytes, row_uuid: str, value: object) -> bytes:
    """What :func:`seal` sealed; ValueError when ``value`` is no sealed value, or was sealed
    under another secret, label or row."""
    try:
        if not isinstance(value, str) or not value.startswith(SEALED_VERSION):
            raise ValueError("not a sealed value")
        blob = base64.b64decode(value[len(SEALED_VERSION) :], validate=True)
        return AESGCM(derived_key(label)).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(label, row_uuid))
    except (InvalidTag, binascii.Error):
        raise ValueError("the sealed value does not open here") from None


def check_at_start(process: str) -> None:
    """Read (or create) the secret now, so that a bad ``BLOCKVAULT_SECRET_KEY`` stops the start;
    warn when a process of a shared catalog keeps its own secret in its data dir."""
    server_secret()
    settings = get_settings()
    if settings.secret_key is None and not settings.catalog_url.startswith("sqlite"):
        log.warning(
            "secret.not_shared process=%s path=%s: set the same BLOCKVAULT_SECRET_KEY on the API, every worker and "
            "beat of a shared catalog, or they cannot read each other's storage credentials, keys and sessions",
            process,
            settings.data_path / SECRET_FILE,
        )
