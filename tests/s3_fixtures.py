"""pytest plugin: a real S3-protocol server (moto server mode) on loopback behind a fault proxy.

Fixtures (a server that does not start FAILS the test, it never skips):

``s3_server`` (session)
    moto's S3 server in its own process, reached through ``tests/harness/tcp-proxy.py``, also
    its own process. ``.endpoint`` is the proxy's URL; ``.access_key`` / ``.secret_key`` fixed
    test credentials (this moto accepts any); ``.make_bucket(name)``; ``.options(bucket)``,
    the options ``open_backend`` takes; ``.down()`` SIGKILLs the proxy (moto, and the data,
    live on) and ``.up()`` starts it again on the same port once it answers; ``.bytes_in()`` /
    ``.bytes_out()`` are the bytes that went to / came from the server through the running
    proxy (they restart from 0 with it); ``.client()`` a boto3 client to look at the bucket.
    A test that leaves the proxy down gets it back up before the next test.
``s3_auth_server`` (session, started on first use)
    A second moto that checks credentials (IAM authentication on). ``.endpoint``,
    ``.bucket``; ``.access_key`` / ``.secret_key`` of an IAM user allowed ``s3:*``,
    ``.denied_access_key`` / ``.denied_secret_key`` of one allowed nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config

from tests.ports import free_port

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ROOT = Path(__file__).resolve().parent.parent
PROXY = ROOT / "tests" / "harness" / "tcp-proxy.py"
ACCESS_KEY = "blockvault-test-access"
SECRET_KEY = "blockvault-test-SECRET-do-not-print"
REGION = "us-east-1"
WAIT_SECONDS = 30.0
# What the start-up polls ask for: a bucket never made, answered 404 at once however much the
# server holds (moto's /moto-api/data.json serialises every object: seconds once a suite has
# stored thousands, past the poll's timeout, and each timed-out poll left moto computing it).
PROBE = "/blockvault-probe-no-such-bucket"
_RUNNING: list[S3Server] = []


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, if with an error
    except OSError:
        return False


def _wait_for(url: str, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        if _answers(url):
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"{what} did not answer {url} within {WAIT_SECONDS:.0f} s: {log.read_text(errors='replace')[-2000:]}")


def _start_moto(port: int, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    _wait_for(f"http://127.0.0.1:{port}{PROBE}", proc, "moto_server", log)
    return proc


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def _client(endpoint: str, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> S3Client:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"}),
    )


@dataclass
class S3Server:
    """moto behind the fault proxy (see the module docstring)."""

    moto_port: int
    workdir: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    proxy_port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    moto: subprocess.Popen[bytes] | None = None
    proxy: subprocess.Popen[bytes] | None = None
    _client: S3Client | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def moto_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.moto_port}"

    def client(self) -> S3Client:
        """A boto3 client straight to moto (not through the proxy, so it works when down)."""
        if self._client is None:
            self._client = _client(self.moto_endpoint)
        return self._client

    def make_bucket(self, name: str | None = None) -> str:
        bucket = name or f"bv-{uuid.uuid4().hex[:16]}"
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        return bucket

    def options(self, bucket: str | None = None) -> dict[str, str | None]:
        """What ``open_backend("s3://<bucket>/...", options)`` needs to reach this server."""
        return {
            "endpoint": self.endpoint,
            "region": self.region,
            "accessKey": self.access_key,
            "secretKey": self.secret_key,
        }

    def down(self) -> None:
        """SIGKILL the proxy: new connections are refused, open ones reset."""
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.send_signal(signal.SIGKILL)
            self.proxy.wait(timeout=10)
        self.proxy = None

    def up(self) -> None:
        """Start the proxy on the same ports and wait until it forwards."""
        if self.proxy is not None and self.proxy.poll() is None:
            return
        log = self.workdir / "proxy.log"
        with open(log, "ab") as out:
            self.proxy = subprocess.Popen(
                [
                    sys.executable,
                    str(PROXY),
                    "--listen",
                    f"127.0.0.1:{self.proxy_port}",
                    "--target",
                    f"127.0.0.1:{self.moto_port}",
                    "--control",
                    f"127.0.0.1:{self.control_port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _wait_for(f"{self.endpoint}{PROBE}", self.proxy, "tcp-proxy", log)

    @property
    def is_up(self) -> bool:
        return self.proxy is not None and self.proxy.poll() is None

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.control_port}/stats", timeout=5) as response:
            stats: dict[str, int] = json.loads(response.read())
            return stats

    def bytes_in(self) -> int:
        """Bytes sent to the S3 server (requests, uploads) through the running proxy."""
        return self.stats()["in"]

    def bytes_out(self) -> int:
        """Bytes the S3 server sent back (responses, downloads) through the running proxy."""
        return self.stats()["out"]

    def start(self) -> None:
        self.moto = _start_moto(self.moto_port, self.workdir / "moto.log")
        self.up()

    def stop(self) -> None:
        _stop(self.proxy)
        _stop(self.moto)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(moto_port=free_port(), workdir=tmp_path_factory.mktemp("s3-server"))
    try:
        server.start()
        _RUNNING.append(server)
        yield server
    finally:
        _RUNNING.clear()
        server.stop()


@pytest.fixture(autouse=True)
def _s3_proxy_back_up() -> Iterator[None]:
    """A test that took the proxy down leaves it up for the next one."""
    yield
    for server in _RUNNING:
        server.up()


@dataclass
class S3AuthServer:
    """A moto that checks credentials (see the module docstring)."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    denied_access_key: str
    denied_secret_key: str
    region: str = REGION

    def options(self, access_key: str | None = None, secret_key: str | None = None) -> dict[str, str | None]:
        return {
            "endpoint": self.endpoint,
            "region": self.region,
            "accessKey": access_key or self.access_key,
            "secretKey": secret_key or self.secret_key,
        }


def _iam_user(iam: Any, name: str, policy: dict[str, Any] | None) -> tuple[str, str]:
    iam.create_user(UserName=name)
    if policy is not None:
        iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="session")
def s3_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3AuthServer]:
    """moto checks signatures and keys only once IAM authentication is switched on (its
    ``INITIAL_NO_AUTH_ACTION_COUNT``, set at run time through ``/moto-api/reset-auth``): the
    users are made while it is off, then it is switched on for good."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("s3-auth-server")
    proc = _start_moto(port, workdir / "moto.log")
    try:
        endpoint = f"http://127.0.0.1:{port}"
        session = boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
        )
        iam = session.client("iam", endpoint_url=endpoint)
        allowed = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        access_key, secret_key = _iam_user(iam, "blockvault", allowed)
        denied_key, denied_secret = _iam_user(iam, "nobody", None)
        bucket = "bv-auth"
        _client(endpoint).create_bucket(Bucket=bucket)
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=5):
            pass
        yield S3AuthServer(endpoint, bucket, access_key, secret_key, denied_key, denied_secret)
    finally:
        _stop(proc)
