"""The multi-host suite's deployment: the API (and Flower) in the root namespace, each host's
worker in a network namespace of its own (``tests/harness/netns.py``), reaching PostgreSQL
and Redis through forwarders on its link; a remote storage-server in a namespace too.

Fixtures:

``network`` (function)
    A :class:`tests.harness.netns.Network`: ``network.add()`` makes a namespace (a host),
    ``network.add(shaped=True)`` one whose link ``.shape()`` can delay and make lossy. Removed
    (processes inside, forwarders, links, qdiscs, namespaces) when the test ends, failed or not.
    The first use in a session removes what killed runs left and checks that this machine
    allows namespaces: a test FAILS saying why when it does not (needs root and iproute2).
``hosts_stack`` (function)
    A :class:`HostsStack` (a ``tests.service.conftest.Stack`` whose processes may run in a
    namespace) with its API up: ``start_hosts([ns, ...])`` starts one worker per namespace and
    returns the host uuids.
``start_ns_storage_server`` (function)
    ``start_ns_storage_server(ns, root) -> StorageServer``: ``blockvault storage-server`` inside
    ``ns``, listening on the namespace's address (``.url``), stopped when the test ends.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from shared.catalog.models import new_uuid
from tests.harness import netns
from tests.harness.netns import Namespace, Network
from tests.service.conftest import Stack
from tests.storage_server_fixtures import StorageServer

ROUTED_SETTINGS = ("BLOCKVAULT_DATABASE_URL", "BLOCKVAULT_BROKER_URL")


def worker_name(host_uuid: str) -> str:
    """The process (and log) name ``Stack.start_worker`` gives a host's worker."""
    return f"worker-{host_uuid[:8]}"


class HostsStack(Stack):
    """A Stack whose processes named in ``placed`` run inside their namespace: the catalog and
    broker URLs they get point at the forwarders on that namespace's link."""

    def __init__(self, tmp: Path, database_url: str, broker_url: str, network: Network) -> None:
        super().__init__(tmp, database_url, broker_url)
        self.network = network
        self.placed: dict[str, Namespace] = {}  # process name -> its namespace
        self.hosts: dict[str, Namespace] = {}  # host uuid -> its namespace

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        ns = self.placed.get(name)
        if ns is None:
            with netns.SPAWN_LOCK:  # not while another thread spawns into a namespace
                proc = super().spawn(name, args, env)
            netns.track(proc.pid, " ".join(args))  # killed by the next session if this one is
            return proc
        inside = {key: ns.reach(self.env[key]) for key in ROUTED_SETTINGS}
        with ns.running_python():
            return super().spawn(name, args, {**inside, **(env or {})})

    def stop_all(self) -> None:
        try:
            super().stop_all()
        finally:
            for proc in self.procs.values():
                netns.untrack(proc.pid)

    def start_host(self, ns: Namespace, env: dict[str, str] | None = None) -> str:
        host = new_uuid()
        self.placed[worker_name(host)] = ns
        self.hosts[host] = ns
        self.start_worker(host, env)
        return host

    def start_hosts(self, namespaces: Sequence[Namespace], env: dict[str, str] | None = None) -> list[str]:
        """One worker per namespace, started side by side; their host uuids in that order."""
        with ThreadPoolExecutor(len(namespaces)) as pool:
            return list(pool.map(lambda ns: self.start_host(ns, env), namespaces))

    def job_hosts(self, job_uuids: Sequence[str]) -> dict[str, str | None]:
        """The host each API job was bound to (``api_job.hostUuid``, read from the catalog)."""
        engine = create_engine(self.env["BLOCKVAULT_DATABASE_URL"], poolclass=NullPool)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text('SELECT uuid, "hostUuid" FROM api_job WHERE uuid = ANY(:uuids)'), {"uuids": list(job_uuids)}
                )
                return {str(uuid): host for uuid, host in rows}
        finally:
            engine.dispose()


class NsStorageServer(StorageServer):
    """A storage-server started inside ``ns`` and listening on its address."""

    def __init__(self, ns: Namespace, root: Path, log: Path, token: str) -> None:
        super().__init__(root, log, token=token, extra_args=("--host", ns.ip))
        self.ns = ns

    @property
    def url(self) -> str:
        return f"http://{self.ns.ip}:{self.port}"

    def start(self, *, failpoints: str | None = None) -> None:
        with self.ns.running_python():
            super().start(failpoints=failpoints)


@pytest.fixture(scope="session")
def netns_machine() -> list[str]:
    """Once per session: remove what killed runs left, then check that namespaces can be made
    here (every test using the harness fails with the reason when they cannot)."""
    try:
        removed = netns.cleanup_leftovers()
        netns.preflight()
    except netns.NetnsError as exc:
        pytest.fail(str(exc), pytrace=False)
    return removed


@pytest.fixture
def network(tmp_path: Path, netns_machine: list[str]) -> Iterator[Network]:
    try:
        net = Network(tmp_path / "net")
    except netns.NetnsError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def hosts_stack(tmp_path: Path, pg_database: str, redis_url: str, network: Network) -> Iterator[HostsStack]:
    stack = HostsStack(tmp_path, pg_database, redis_url, network)
    try:
        stack.start_api()
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture
def start_ns_storage_server(tmp_path: Path, network: Network) -> Iterator[Callable[..., StorageServer]]:
    started: list[StorageServer] = []

    def start(ns: Namespace, root: Path) -> StorageServer:
        root.mkdir(parents=True, exist_ok=True)
        server = NsStorageServer(ns, root, tmp_path / f"storage-server-{ns.name}.log", secrets.token_urlsafe(24))
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
