"""The service as it runs: the API and Celery workers as separate processes on PostgreSQL
and Redis (from tests/services.py), each worker with its own host identity.

A module marked ``shared_api`` borrows one API process per pytest process (:class:`SharedApi`)
instead of starting its own: before each of its tests the catalog is emptied back to the rows
the API made at its start (the admin key) and the broker's database flushed, so the test meets
the same empty deployment; its workers and beat are its own, as in every other test. A test that
stops, restarts or reconfigures the API, or counts what the API process counted (metrics, rate
limits), keeps its own (no marker)."""

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
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import MetaData, create_engine, text
from sqlalchemy.pool import NullPool

from api.client import ApiError, Client
from tests.conftest import ROOT
from tests.ports import free_port
from tests.services import PgControl, RedisControl, private_servers


class Stack:
    """One blockvault deployment for a test: its settings, its processes and their logs."""

    def __init__(self, tmp: Path, database_url: str, broker_url: str, shared: SharedApi | None = None) -> None:
        self.tmp = tmp
        self.shared = shared  # the API is that one's (``start_api`` is then not called)
        self.key = shared.stack.key if shared else "test-admin-" + secrets.token_hex(12)
        # one per deployment, as in production
        self.secret_key = shared.stack.secret_key if shared else "test-server-secret-" + secrets.token_hex(16)
        self.port = shared.stack.port if shared else free_port()
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
            # no libvirt discovery unless the test asks for it (tests/service/test_libvirt_worker.py):
            # by default a worker syncs the machine's libvirtd every heartbeat, and with it every
            # other test's domains into its catalog
            BLOCKVAULT_LIBVIRT_URI="off",
        )
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.client = Client(f"http://127.0.0.1:{self.port}", self.key, timeout=30)

    @property
    def api_process(self) -> subprocess.Popen[bytes]:
        return (self.shared.stack if self.shared is not None else self).procs["api"]

    def log(self, name: str) -> str:
        if name == "api" and self.shared is not None:
            return self.shared.stack.log(name)
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
            try:  # the stack's client: an httpx.get per poll loads the CA bundle each time (~30-60 ms of CPU)
                if self.client.http.get("/v1/health", timeout=2).status_code == 200:
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
        names = [*self.procs, *(["api"] if self.shared is not None else [])]
        return "\n".join(f"==== {name}\n{self.log(name)[-6000:]}" for name in names)

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


class SharedApi:
    """One API process on one catalog and one Redis database, lent to the tests of modules
    marked ``shared_api`` in this pytest process (an API start costs 2-4 s of CPU: its imports
    and app; the suite is CPU-bound on 2 cores). :meth:`lend` empties the catalog back to the
    rows the API made at its start and flushes the broker's database: each test meets the
    deployment a fresh API would give it."""

    def __init__(self, tmp: Path, database_url: str, broker_url: str) -> None:
        self.stack = Stack(tmp, database_url, broker_url)
        try:
            self.stack.start_api()
        except BaseException:
            self.stack.stop_all()  # no API left running when it failed to answer
            raise
        self.database_url, self.broker_url = database_url, broker_url
        self.catalog = create_engine(database_url, poolclass=NullPool)
        self.tables = MetaData()
        self.tables.reflect(self.catalog)
        with self.catalog.connect() as conn:  # what the API made at start (the admin account and key)
            self.seeded = {
                table.name: [dict(row._mapping) for row in conn.execute(table.select())]
                for table in self.tables.sorted_tables
            }

    def lend(self, tmp: Path) -> Stack:
        names = ", ".join(f'"{table.name}"' for table in self.tables.sorted_tables if table.name != "alembic_version")
        with self.catalog.begin() as conn:
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
            for table in self.tables.sorted_tables:
                if self.seeded[table.name] and table.name != "alembic_version":
                    conn.execute(table.insert(), self.seeded[table.name])
        with redis.Redis.from_url(self.broker_url) as broker:
            broker.flushdb()
        return Stack(tmp, self.database_url, self.broker_url, shared=self)

    def stop(self) -> None:
        self.stack.stop_all()
        self.catalog.dispose()


@pytest.fixture(scope="session")
def shared_api(
    tmp_path_factory: pytest.TempPathFactory, make_pg_database_once: Any, redis_url_once: str
) -> Iterator[SharedApi]:
    api = SharedApi(tmp_path_factory.mktemp("shared-api"), make_pg_database_once(), redis_url_once)
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    if request.node.get_closest_marker("shared_api"):
        deployment = request.getfixturevalue("shared_api").lend(tmp_path)
    else:
        deployment = Stack(tmp_path, request.getfixturevalue("pg_database"), request.getfixturevalue("redis_url"))
    try:
        if deployment.shared is None:
            deployment.start_api()
        yield deployment
    finally:
        deployment.stop_all()


@pytest.fixture
def private_stack(tmp_path: Path) -> Iterator[tuple[Stack, PgControl, RedisControl]]:
    """A deployment on a PostgreSQL cluster and a Redis server of its own (tests/services.py
    ``private_servers``), with their controls: for a test that stops or restarts them, so that
    no other test of the machine waits for it or loses its server meanwhile."""
    with private_servers(tmp_path / "servers") as (database, broker, pg_control, redis_control):
        deployment = Stack(tmp_path, database, broker)
        try:
            deployment.start_api()
            yield deployment, pg_control, redis_control
        finally:
            deployment.stop_all()
