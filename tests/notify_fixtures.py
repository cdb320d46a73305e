"""Real receivers for notifications: an SMTP server (aiosmtpd, with AUTH PLAIN/LOGIN and,
optionally, STARTTLS under a throw-away CA) and a webhook receiver (an HTTP server) that
checks each body's HMAC-SHA256 signature. Both listen on loopback ports of :func:`free_port`."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.ports import free_port

SMTP_USER = "mailer"
SMTP_PASSWORD = "smtp-Password-never-in-a-message-7f3a"
WEBHOOK_SECRET = "webhook-Secret-never-in-a-message-91c2"


@dataclass
class Mailbox:
    host: str
    port: int
    messages: list[Message] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    ca_file: str | None = None


class _Handler:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.box.raw.append(content)
        self.box.messages.append(message_from_bytes(content))
        return "250 OK"


def _authenticator(box: Mailbox) -> Any:
    def check(server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
            SMTP_USER.encode(),
            SMTP_PASSWORD.encode(),
        )
        if ok:
            box.logins.append(SMTP_USER)
        return AuthResult(success=ok)

    return check


def _tls_context(folder: Path) -> tuple[ssl.SSLContext, str]:
    """A server context for 127.0.0.1 under a self-signed CA, and the CA's file."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "smtp-cert.pem", folder / "smtp-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context, str(cert_file)


def start_smtp(folder: Path, *, starttls: bool = False) -> tuple[Controller, Mailbox]:
    box = Mailbox("127.0.0.1", free_port())
    options: dict[str, Any] = {"authenticator": _authenticator(box), "auth_require_tls": starttls}
    if starttls:
        context, box.ca_file = _tls_context(folder)
        options.update(tls_context=context, require_starttls=True)
    controller = Controller(_Handler(box), hostname=box.host, port=box.port, **options)
    controller.start()
    return controller, box


@pytest.fixture
def smtp_server(tmp_path: Path) -> Iterator[Mailbox]:
    controller, box = start_smtp(tmp_path)
    try:
        yield box
    finally:
        controller.stop()


@dataclass
class Receiver:
    """What the webhook receiver got: each request's JSON body, and whether its signature
    verified under :data:`WEBHOOK_SECRET`."""

    port: int
    bodies: list[dict[str, Any]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    signed: list[bool] = field(default_factory=list)
    status: int = 204
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
                given = self.headers.get("X-Blockvault-Signature", "")
                receiver.raw.append(body)
                receiver.signed.append(hmac.compare_digest(given, expected))
                receiver.bodies.append(json.loads(body))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def webhook() -> Iterator[Receiver]:
    receiver = Receiver(free_port())
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
