"""pytest plugin: blockvault storage-server processes on loopback (see the fixtures below).

Every server is the real command, ``python -m api.cli storage-server``, on a free port, its
log in a temporary file; a server that does not answer ``/v1/health`` in time FAILS the test
with the end of its log.

``storage_server`` (session)
    One server (token in ``.token``) for the backend contract suite; give each test its own
    repository with ``storage_server.backend(prefix=...)``.
``start_storage_server`` (function)
    Factory: ``start_storage_server(root, token=..., append_only=False, admin_token=None,
    site_tokens=None, global_token=True, tls=False, failpoints=None) -> StorageServer``, started
    and answering. ``site_tokens`` (``{name: token}``) reach the server as
    ``BLOCKVAULT_STORAGE_SITE_TOKENS``; ``global_token=False`` starts it without ``--token``
    (``.token`` is then ""). ``tls=True`` makes a self-signed certificate for 127.0.0.1
    (``.cafile``). Every server it started is stopped when the test ends.

A :class:`StorageServer` has ``.url``, ``.token``, ``.stats()`` (the server's counters, read
with ``.token`` or else ``.admin_token``),
``.kill()`` (SIGKILL), ``.stop()`` (SIGTERM), ``.start(failpoints=...)`` (again, same port and
root) and ``.backend(prefix="", token=None)`` (an :class:`HttpBackend` on it).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.repository.backends.http import HttpBackend
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
START_SECONDS = 30.0


def make_self_signed(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (and localhost) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "blockvault test storage")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class StorageServer:
    """One storage-server process (restartable on the same port and root)."""

    def __init__(
        self,
        root: Path,
        log: Path,
        *,
        token: str | None,
        append_only: bool = False,
        admin_token: str | None = None,
        site_tokens: dict[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
        failpoints: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.root, self.log = root, log
        self.token: str = token or ""  # "": no global token (site or admin tokens only)
        self.append_only, self.admin_token, self.tls = append_only, admin_token, tls
        self.site_tokens = dict(site_tokens or {})
        self.failpoints, self.extra_args = failpoints, extra_args
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def cafile(self) -> str | None:
        return str(self.tls[0]) if self.tls else None

    def _verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=self.cafile) if self.cafile else True

    def start(self, *, failpoints: str | None = None) -> None:
        """Start (again): same port, root and tokens; ``failpoints`` for this run only."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        args = [sys.executable, "-m", "api.cli", "-v", "storage-server", "--root", str(self.root)]
        args += ["--port", str(self.port), *self.extra_args]
        if self.append_only:
            args.append("--append-only")
        if self.tls:
            args += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
        if self.token:  # not on the command line: ps shows that
            env["BLOCKVAULT_STORAGE_TOKEN"] = self.token
        if self.admin_token:
            env["BLOCKVAULT_STORAGE_ADMIN_TOKEN"] = self.admin_token
        if self.site_tokens:
            env["BLOCKVAULT_STORAGE_SITE_TOKENS"] = ",".join(f"{n}={t}" for n, t in self.site_tokens.items())
        if failpoints or self.failpoints:
            env["BLOCKVAULT_FAILPOINTS"] = failpoints or self.failpoints or ""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.failpoints = None  # a restart runs without them unless asked again
        deadline = time.monotonic() + START_SECONDS
        with httpx.Client(verify=self._verify(), timeout=2) as http:  # one CA bundle load, not one per poll
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"storage-server exited {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{self.url}/v1/health").status_code == 200:
                        return
                time.sleep(0.05)
        self.kill()
        pytest.fail(f"storage-server did not answer /v1/health in {START_SECONDS} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_dead(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def stats(self) -> dict[str, Any]:
        token = self.token or self.admin_token
        assert token, "stats need the global or the admin token"
        response = httpx.get(
            f"{self.url}/v1/stats", headers={"authorization": f"Bearer {token}"}, verify=self._verify()
        )
        response.raise_for_status()
        counters: dict[str, Any] = response.json()
        return counters

    def backend(self, prefix: str = "", token: str | None = None, **kwargs: Any) -> HttpBackend:
        url = f"{self.url}/{prefix}" if prefix else self.url
        token = token or self.token
        assert token, "this server has no global token: give one"
        return HttpBackend(url, token, cafile=self.cafile, **kwargs)


@pytest.fixture(scope="session")
def storage_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageServer]:
    folder = tmp_path_factory.mktemp("storage-server")
    (folder / "root").mkdir()
    server = StorageServer(folder / "root", folder / "server.log", token=secrets.token_urlsafe(24))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_storage_server(tmp_path: Path) -> Iterator[Callable[..., StorageServer]]:
    started: list[StorageServer] = []

    def start(
        root: Path,
        token: str | None = None,
        append_only: bool = False,
        admin_token: str | None = None,
        tls: bool = False,
        failpoints: str | None = None,
        extra_args: tuple[str, ...] = (),
        site_tokens: dict[str, str] | None = None,
        global_token: bool = True,
    ) -> StorageServer:
        root.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex[:8]
        server = StorageServer(
            root,
            tmp_path / f"storage-server-{name}.log",
            token=(token or secrets.token_urlsafe(24)) if global_token else None,
            append_only=append_only,
            admin_token=admin_token,
            site_tokens=site_tokens,
            tls=make_self_signed(tmp_path / f"tls-{name}") if tls else None,
            failpoints=failpoints,
            extra_args=extra_args,
        )
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
