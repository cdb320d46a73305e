"""The service as it runs: the API and Celery workers as separate processes on PostgreSQL
and Redis (from tests/services.py), each worker with its own host identity."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from api.client import ApiError, Client
from tests.conftest import ROOT
from tests.ports import free_port


class Stack:
    """One blockvault deployment for a test: its settings, its processes and their logs."""

    def __init__(self, tmp: Path, database_url: str, broker_url: str) -> None:
        self.tmp = tmp
        self.key = "test-admin-" + secrets.token_hex(12)
        self.secret_key = "test-server-secret-" + secrets.token_hex(16)  # one per deployment, as in production
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
        self.env.update(
            BLOCKVAULT_DATABASE_URL=database_url,
            BLOCKVAULT_BROKER_URL=broker_url,
            BLOCKVAULT_DATA_DIR=str(tmp / "data"),
            # the test's folder holds its volumes and VM sockets (tmp/data stays out of reach)
            BLOCKVAULT_VOLUME_ROOTS=str(tmp),
            BLOCKVAULT_VM_SOCKET_DIR=str(tmp),
            BLOCKVAULT_ADMIN_API_KEY=self.key,
            BLOCKVAULT_SECRET_KEY=self.secret_key,  # every process, on every host: they share the catalog
            BLOCKVAULT_HEARTBEAT_SECONDS="1",
            BLOCKVAULT_HOST_TIMEOUT_SECONDS="15",
            BLOCKVAULT_REQUEUE_SECONDS="5",
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.client = Client(f"http://127.0.0.1:{self.port}", self.key, timeout=30)

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "api.cli", *args],
                env={**self.env, **(env or {})},
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def start_api(self) -> None:
        self.spawn("api", ["api", "--port", str(self.port)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.procs["api"].poll() is None, self.log("api")
            time.sleep(0.2)
        raise AssertionError("the API did not start:\n" + self.log("api"))

    def start_worker(self, host_uuid: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        name = f"worker-{host_uuid[:8]}"
        proc = self.spawn(name, ["worker", "--host-uuid", host_uuid, "--concurrency", "1"], env)
        self.wait_host(host_uuid, "Connected", proc=proc, name=name)
        deadline = time.monotonic() + 60
        while "ready." not in self.log(name):  # Celery consumes only once it says so
            assert proc.poll() is None, self.log(name)
            assert time.monotonic() < deadline, self.log(name)
            time.sleep(0.2)
        return proc

    def start_beat(self, name: str = "beat") -> subprocess.Popen[bytes]:
        proc = self.spawn(name, ["beat"])
        deadline = time.monotonic() + 60
        while "beat: Starting" not in self.log(name):
            assert proc.poll() is None, self.log(name)
            assert time.monotonic() < deadline, self.log(name)
            time.sleep(0.2)
        return proc

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.stacks()}")
            time.sleep(0.3)

    def stacks(self) -> str:
        """Every live process's stacks (SIGUSR1 -> faulthandler) and log tail, for a hang."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGUSR1)  # the group: Celery's pool children too
        time.sleep(1)
        return "\n".join(f"==== {name}\n{self.log(name)[-6000:]}" for name in self.procs)

    def wait_host(
        self,
        host_uuid: str,
        status: str,
        proc: subprocess.Popen[bytes] | None = None,
        name: str = "",
        timeout: float = 60,
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                found = self.client.query("hosts", f"uuid={host_uuid}")["inventories"]
                if found and found[0]["status"] == status:
                    return
            except ApiError:
                pass
            if proc is not None:
                assert proc.poll() is None, self.log(name)
            time.sleep(0.3)
        raise AssertionError(f"host {host_uuid} never became {status}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=60)

    def stop_all(self) -> None:
        for _name, proc in self.procs.items():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _name, proc in self.procs.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.client.close()


@pytest.fixture
def stack(tmp_path: Path, pg_database: str, redis_url: str) -> Iterator[Stack]:
    deployment = Stack(tmp_path, pg_database, redis_url)
    try:
        deployment.start_api()
        yield deployment
    finally:
        deployment.stop_all()
