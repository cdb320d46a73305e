"""pytest plugin: the real PostgreSQL and Redis servers that tests/harness/ensure-services keeps up.

Fixtures (a server that does not answer FAILS the test, it never skips):

``pg_server_url`` (session)
    Base URL of the server, no database: ``postgresql+psycopg2://postgres@127.0.0.1:5432``, or
    ``BLOCKVAULT_TEST_PG_URL`` (its database part, if any, is dropped).
``make_pg_database`` (function)
    Factory: ``make_pg_database(migrate=True) -> url`` gives a database ``bv_test_...`` of its
    own to the test, at the newest revision unless ``migrate=False``; when the test ends its
    connections are terminated and it is dropped. A migrated one is a copy (``CREATE DATABASE
    ... TEMPLATE``) of ``pg_template`` (0.25 s where running the migrations costs 1 to 4 s), or
    one an earlier test of this process gave back (:class:`SpareDatabases`): emptied back to
    what the migrations left in it, its sequences restarted, and only when its schema is still
    the template's. Dropping a database makes PostgreSQL checkpoint (flush every dirty page of
    the cluster): about 0.5 CPU s of the server's and 1 to 4 s of wall per test on a loaded
    machine, against 0.04 CPU s to empty one.
``pg_template`` (session)
    The name of a database of this process brought to the newest revision by
    ``shared.catalog.db.migrate`` once, never connected to afterwards (a template must not be),
    dropped at the end of the session.
``pg_database`` (function)
    The URL of one fresh, migrated database (``make_pg_database()``).
``redis_url`` (function)
    ``redis://127.0.0.1:6379/<n>`` (or ``BLOCKVAULT_TEST_REDIS_URL``'s server): a database index
    no other test (in any process) holds, flushed before and after the test. Index 0 is never
    handed out: it holds the claims.
A test that stops or restarts PostgreSQL or Redis (a fault test, the soak) does it to servers of
its own, never to these: :func:`private_servers` (a cluster and a Redis on free ports, removed
after). So no test waits for another, and no neighbour run's test is disturbed. The one
machine-wide server a test may restart is libvirtd: a test using ``libvirtd_control`` holds an
exclusive lock on ``$TMPDIR/blockvault-test-libvirtd.lock`` while the other libvirt tests hold it
shared (a test waiting for the exclusive lock goes first: see :func:`servers_turn`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import pytest
import redis
from sqlalchemy import Connection, MetaData, Table, create_engine, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

PG_URL_ENV = "BLOCKVAULT_TEST_PG_URL"
REDIS_URL_ENV = "BLOCKVAULT_TEST_REDIS_URL"
DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"
DB_PREFIX = "bv_test_"
WAIT_SECONDS = 60.0
HINT = "run tests/harness/ensure-services (or `make pytest`), or point {env} at a running server"
_REDIS_CLAIM = "blockvault:test:redis-db:{index}"
_REDIS_CLAIM_TTL = 3600
_TAKE_OVER = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3]) else return false end"
)
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _first_line(exc: BaseException) -> str:
    text_ = str(getattr(exc, "orig", None) or exc).strip()
    return text_.splitlines()[0] if text_ else type(exc).__name__


def _wait(what: str, ready: Callable[[], bool], timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: still not so after {timeout:.0f}s")
        time.sleep(0.1)


# -- PostgreSQL ----------------------------------------------------------------------------------
def _pg_engine(base: URL, database: str = "postgres") -> Engine:
    return create_engine(
        base.set(database=database),
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 5},
    )


def _pg_answers(base: URL) -> bool:
    engine = _pg_engine(base)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001 - any failure means "not (yet) answering"
        return False
    finally:
        engine.dispose()


def _pg_base_url() -> URL:
    # (URL.set() ignores None: it cannot remove the database part.)
    return make_url(os.environ.get(PG_URL_ENV) or DEFAULT_PG_URL)._replace(database=None)


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    base = _pg_base_url()
    engine = _pg_engine(base)
    problem = None
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - reported as the failure
        problem = _first_line(exc)
    finally:
        engine.dispose()
    if problem is not None:  # failed out here: no chain of exceptions in the report
        where = base.render_as_string()
        pytest.fail(f"PostgreSQL at {where} is unreachable: {problem}\n{HINT.format(env=PG_URL_ENV)}", pytrace=False)
    _drop_orphans(base)
    return _render(base)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TERMINATE = text(
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()"
)


def _drop_database(base: URL, name: str) -> None:
    """Terminate the database's connections, then drop it (again, if a connection raced in)."""
    engine = _pg_engine(base)
    try:
        with engine.connect() as conn:
            for attempt in range(5):
                conn.execute(_TERMINATE, {"db": name})
                try:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
                    return
                except DBAPIError:  # "being accessed by other users": retried
                    if attempt == 4:
                        raise
                    time.sleep(0.2)
    finally:
        engine.dispose()


def _drop_orphans(base: URL) -> None:
    """Drop databases left by test processes of this machine that died before their teardown."""
    if base.host not in LOCAL_HOSTS:
        return
    engine = _pg_engine(base)
    try:
        with engine.connect() as conn:
            names = conn.execute(
                text("SELECT datname FROM pg_database WHERE datname LIKE :prefix"), {"prefix": DB_PREFIX + "%"}
            ).scalars()
            orphans = []
            for name in names:
                pid = name.removeprefix(DB_PREFIX).split("_", 1)[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    orphans.append(name)
    finally:
        engine.dispose()
    for name in orphans:
        with contextlib.suppress(Exception):
            _drop_database(base, name)


class MakePgDatabase(Protocol):
    def __call__(self, *, migrate: bool = True) -> str: ...


def _create_database(base: URL, template: str | None = None) -> str:
    """A new database ``bv_test_<pid>_...`` (empty, or a copy of ``template``); its name."""
    name = f"{DB_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}"
    engine = _pg_engine(base)
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    finally:
        engine.dispose()
    return name


@pytest.fixture(scope="session")
def pg_template(pg_server_url: str) -> Iterator[str]:
    from shared.catalog import db

    base = make_url(pg_server_url)
    name = _create_database(base)
    try:
        url = _render(base.set(database=name))
        db.migrate(url)
        db.engine(url).dispose()  # a template has no connection, or copying it fails
        yield name
    finally:
        with contextlib.suppress(Exception):
            _drop_database(base, name)


# what a database's schema is: its columns, indexes, constraints, triggers and functions
_SCHEMA_FINGERPRINT = text(
    """SELECT md5(concat_ws('|',
        (SELECT string_agg(table_schema || '.' || table_name || '.' || column_name || ':' || data_type || ':'
                           || is_nullable || ':' || coalesce(column_default, ''), ','
                           ORDER BY table_schema, table_name, column_name)
           FROM information_schema.columns WHERE table_schema NOT IN ('pg_catalog', 'information_schema')),
        (SELECT string_agg(schemaname || '.' || indexname || ':' || indexdef, ',' ORDER BY schemaname, indexname)
           FROM pg_indexes WHERE schemaname NOT IN ('pg_catalog', 'information_schema')),
        (SELECT string_agg(conname || ':' || pg_get_constraintdef(oid), ',' ORDER BY conname)
           FROM pg_constraint
          WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)),
        (SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal),
        (SELECT count(*) FROM pg_proc WHERE pronamespace NOT IN ('pg_catalog'::regnamespace,
                                                                 'information_schema'::regnamespace))))"""
)
_SEQUENCES = text(
    "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename) FROM pg_sequences "
    "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
)


def delete_every_row(conn: Connection, tables: list[Table], then: list[str] | None = None) -> None:
    """Delete every row of ``tables`` (given in dependency order: deleted children first), then
    run the statements ``then``, in one round trip to the server. A ``DELETE`` sent on its own per
    table cost 7-10 ms of the test process's CPU for the catalog's 30 tables (one statement
    each through SQLAlchemy and back), against under 1 ms as one string (docs/testing.md)."""
    table_name = conn.dialect.identifier_preparer.format_table
    statements = [f"DELETE FROM {table_name(table)}" for table in reversed(tables)] + (then or [])
    conn.exec_driver_sql("; ".join(statements))


class SpareDatabases:
    """Migrated databases this pytest process's tests gave back, emptied for the next test.

    A database given back is taken again only when it is exactly what a fresh copy of the
    template is, but for dead rows: its connections terminated, its schema's fingerprint (columns,
    indexes, constraints, triggers, functions) the template's, every row deleted and the rows
    the migrations made put back, every sequence restarted. Anything else (a test that
    downgraded it, added a table, or left it unreadable) and it is dropped, as it always was."""

    def __init__(self, base: URL, template: str) -> None:
        self.base, self.template = base, template
        self.free: list[str] = []
        first = _create_database(base, template)
        engine = _pg_engine(base, first)
        try:
            with engine.connect() as conn:
                self.fingerprint = conn.execute(_SCHEMA_FINGERPRINT).scalar_one()
                self.restarts = [f"ALTER SEQUENCE {name} RESTART" for name in conn.execute(_SEQUENCES).scalars()]
            self.tables = MetaData()
            self.tables.reflect(engine)
            with engine.connect() as conn:  # what the migrations made (alembic_version's row too)
                self.seeded = {
                    table.name: [dict(row._mapping) for row in conn.execute(table.select())]
                    for table in self.tables.sorted_tables
                }
        finally:
            engine.dispose()
        self.free.append(first)

    def take(self) -> str:
        """A migrated database's name: a spare one, else a new copy of the template."""
        return self.free.pop() if self.free else _create_database(self.base, self.template)

    def give_back(self, name: str) -> None:
        """Empty ``name`` for the next test, or drop it when it is no longer the template's."""
        admin = _pg_engine(self.base)
        try:
            with admin.connect() as conn:
                conn.execute(_TERMINATE, {"db": name})
        finally:
            admin.dispose()
        engine = create_engine(self.base.set(database=name), poolclass=NullPool, connect_args={"connect_timeout": 5})
        try:
            with engine.begin() as conn:  # one transaction: emptied and seeded, or untouched
                conn.execute(text("SET LOCAL lock_timeout = '10s'"))
                if conn.execute(_SCHEMA_FINGERPRINT).scalar_one() != self.fingerprint:
                    raise LookupError("its schema is not the template's")
                delete_every_row(conn, self.tables.sorted_tables, self.restarts)
                for table in self.tables.sorted_tables:
                    if self.seeded[table.name]:
                        conn.execute(table.insert(), self.seeded[table.name])
        except Exception:  # noqa: BLE001 - not reusable, whatever the test did to it: dropped
            engine.dispose()
            _drop_database(self.base, name)
            return
        engine.dispose()
        self.free.append(name)

    def drop_all(self) -> None:
        while self.free:
            with contextlib.suppress(Exception):
                _drop_database(self.base, self.free.pop())


@pytest.fixture(scope="session")
def pg_spares(pg_server_url: str, pg_template: str) -> Iterator[SpareDatabases]:
    spares = SpareDatabases(make_url(pg_server_url), pg_template)
    try:
        yield spares
    finally:
        spares.drop_all()


@pytest.fixture
def make_pg_database(pg_server_url: str, pg_template: str, pg_spares: SpareDatabases) -> Iterator[MakePgDatabase]:
    with _pg_databases(pg_server_url, pg_template, pg_spares) as make:
        yield make


@pytest.fixture(scope="session")
def make_pg_database_once(pg_server_url: str, pg_template: str) -> Iterator[MakePgDatabase]:
    """:func:`make_pg_database` for a session fixture: its databases are dropped at the end of
    this pytest process (tests/service/conftest.py ``SharedApi``)."""
    with _pg_databases(pg_server_url, pg_template) as make:
        yield make


@contextlib.contextmanager
def _pg_databases(
    pg_server_url: str, pg_template: str, spares: SpareDatabases | None = None
) -> Iterator[MakePgDatabase]:
    from shared.catalog import db

    base = make_url(pg_server_url)
    made: list[tuple[str, bool]] = []

    def make(*, migrate: bool = True) -> str:
        if migrate and spares is not None:
            name = spares.take()
        else:
            name = _create_database(base, pg_template if migrate else None)
        made.append((name, migrate))
        return _render(base.set(database=name))

    yield make
    errors = []
    for name, migrated in made:
        url = _render(base.set(database=name))
        db.engine(url).dispose()  # this process's pooled connections first
        try:
            if migrated and spares is not None:
                spares.give_back(name)
            else:
                _drop_database(base, name)
        except Exception as exc:  # noqa: BLE001 - reported below, after trying every database
            errors.append(f"{name}: {_first_line(exc)}")
    if errors:
        pytest.fail("could not drop test databases: " + "; ".join(errors), pytrace=False)


@pytest.fixture
def pg_database(make_pg_database: MakePgDatabase) -> str:
    return make_pg_database()


@dataclass
class PgControl:
    """Stops and starts the local PostgreSQL cluster behind ``url`` (Debian's pg_ctlcluster)."""

    url: str
    version: str
    cluster: str
    log_file: Path

    @classmethod
    def find(cls, url: str) -> PgControl:
        """The cluster of /etc/postgresql/<version>/<cluster> that listens on ``url``'s port."""
        base = make_url(url)
        port = base.port or 5432
        if base.host not in LOCAL_HOSTS:
            raise RuntimeError(f"pg_control: PostgreSQL at {base.host} is not on this machine")
        if shutil.which("pg_ctlcluster") is None or shutil.which("pg_lsclusters") is None:
            raise RuntimeError("pg_control: pg_ctlcluster is missing (Debian's postgresql-common)")
        listing = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, timeout=30, check=True)
        for line in listing.stdout.splitlines():
            # version, cluster, port, status, owner, data directory, log file
            fields = line.split()
            if len(fields) >= 7 and fields[2] == str(port):
                return cls(url=url, version=fields[0], cluster=fields[1], log_file=Path(fields[6]))
        raise RuntimeError(f"pg_control: no cluster under /etc/postgresql listens on port {port}")

    def _ctl(self, action: str, *extra: str) -> subprocess.CompletedProcess[str]:
        command = ["pg_ctlcluster", "--skip-systemctl-redirect", *extra, self.version, self.cluster, action]
        return subprocess.run(command, capture_output=True, text=True, timeout=WAIT_SECONDS + 30, check=False)

    def _failed(self, what: str, proc: subprocess.CompletedProcess[str]) -> RuntimeError:
        detail = f"pg_control: {what} ({' '.join(proc.args)} exited {proc.returncode}: {proc.stderr.strip()})"
        with contextlib.suppress(OSError):
            detail += (
                "\nlast lines of "
                + str(self.log_file)
                + ":\n"
                + "\n".join(self.log_file.read_text().splitlines()[-10:])
            )
        return RuntimeError(detail)

    def is_running(self) -> bool:
        return _pg_answers(make_url(self.url))

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``mode`` is pg_ctl's: smart, fast, or immediate (as if it crashed)."""
        proc = self._ctl("stop", "--mode", mode)
        if proc.returncode not in (0, 2) and self.is_running():  # 2: it was not running
            raise self._failed("the server is still up", proc)
        try:
            _wait("PostgreSQL stopped", lambda: not self.is_running())
        except TimeoutError:
            raise self._failed("the server is still up", proc) from None

    def start(self) -> None:
        proc = self._ctl("start")
        if proc.returncode not in (0, 2) and not self.is_running():  # 2: it was running already
            raise self._failed("the server did not start", proc)
        try:
            _wait("PostgreSQL answers", self.is_running)
        except TimeoutError:
            raise self._failed(f"the server did not answer within {WAIT_SECONDS:.0f}s", proc) from None

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    @contextlib.contextmanager
    def stopped(self, mode: str = "fast") -> Iterator[None]:
        """The server is down inside the block and up again after it, whatever happens."""
        self.stop(mode)
        try:
            yield
        finally:
            self.start()


# -- Redis ---------------------------------------------------------------------------------------
def _redis_base_url() -> str:
    """scheme://[credentials@]host:port of the server: no database index."""
    parts = urlsplit(os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL)
    return f"{parts.scheme}://{parts.netloc}"


def _redis_client(base: str, index: int = 0) -> redis.Redis:
    return redis.Redis.from_url(f"{base}/{index}", socket_connect_timeout=3, socket_timeout=10)


def _redis_answers(base: str) -> bool:
    try:
        with _redis_client(base) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


@dataclass
class _RedisClaims:
    """Database indexes this process holds, so that they can be claimed again after a restart."""

    token: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}")
    held: dict[tuple[str, int], str] = field(default_factory=dict)

    def claim(self, base: str) -> int:
        with _redis_client(base) as client:
            databases = _redis_databases(client)
            for index in range(1, databases):
                key = _REDIS_CLAIM.format(index=index)
                if client.set(key, self.token, nx=True, ex=_REDIS_CLAIM_TTL) or self._take_over(client, key):
                    self.held[(base, index)] = self.token
                    return index
        raise RuntimeError(f"Redis at {base}: all {databases - 1} test databases are held by other tests")

    def _take_over(self, client: redis.Redis, key: str) -> bool:
        """Take ``key``'s claim when it is held by a process of this machine that is dead (a test
        run killed with SIGKILL leaves its claims for their whole hour otherwise)."""
        holder = client.get(key)
        if holder is None:
            return False
        held = holder.decode(errors="replace") if isinstance(holder, bytes) else str(holder)
        host, _, rest = held.partition(":")
        pid = rest.partition(":")[0]
        if host != socket.gethostname() or not pid.isdigit() or _pid_alive(int(pid)):
            return False
        # compare-and-set: only if the dead holder still holds it (another process may have just taken it)
        taken = client.eval(_TAKE_OVER, 1, key, holder, self.token, _REDIS_CLAIM_TTL)
        return bool(taken)

    def release(self, base: str, index: int) -> None:
        self.held.pop((base, index), None)
        key = _REDIS_CLAIM.format(index=index)
        with _redis_client(base) as client:
            if client.get(key) == self.token.encode():
                client.delete(key)

    def reclaim(self, base: str) -> None:
        with _redis_client(base) as client:
            for (held_base, index), token in self.held.items():
                if held_base == base:
                    client.set(_REDIS_CLAIM.format(index=index), token, ex=_REDIS_CLAIM_TTL)


_CLAIMS = _RedisClaims()


def _redis_databases(client: redis.Redis) -> int:
    try:
        answer: Any = client.config_get("databases")
        return int(answer.get("databases") or answer.get(b"databases") or 16)
    except redis.ResponseError:  # CONFIG renamed away
        return 16


@pytest.fixture
def redis_url() -> Iterator[str]:
    with _redis_database() as url:
        yield url


@pytest.fixture(scope="session")
def redis_url_once() -> Iterator[str]:
    """:func:`redis_url` for a session fixture, held until the end of this pytest process."""
    with _redis_database() as url:
        yield url


@contextlib.contextmanager
def _redis_database() -> Iterator[str]:
    base = _redis_base_url()
    index, problem = 0, None
    try:
        index = _CLAIMS.claim(base)
    except redis.RedisError as exc:
        problem = f"Redis at {base} is unreachable: {_first_line(exc)}\n{HINT.format(env=REDIS_URL_ENV)}"
    except RuntimeError as exc:
        problem = str(exc)
    if problem is not None:  # failed out here: no chain of exceptions in the report
        pytest.fail(problem, pytrace=False)
    with _redis_client(base, index) as client:
        client.flushdb()
    try:
        yield f"{base}/{index}"
    finally:
        try:
            with _redis_client(base, index) as client:
                client.flushdb()
        finally:
            _CLAIMS.release(base, index)


@dataclass
class RedisControl:
    """Shuts down and starts the local Redis server behind ``url`` (as the machine starts it)."""

    url: str

    @classmethod
    def find(cls, url: str) -> RedisControl:
        host = urlsplit(url).hostname
        if host not in LOCAL_HOSTS:
            raise RuntimeError(f"redis_control: Redis at {host} is not on this machine")
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis_control: redis-server is missing (Debian's redis-server)")
        return cls(url=url)

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 6379

    def is_running(self) -> bool:
        return _redis_answers(self.url)

    def stop(self) -> None:
        """``SHUTDOWN NOSAVE``: every key is lost (the server keeps nothing on disk anyway)."""
        with contextlib.suppress(redis.ConnectionError), _redis_client(self.url) as client:
            client.shutdown(nosave=True)
        _wait("Redis stopped", lambda: not self.is_running())

    def start(self) -> None:
        if os.geteuid() == 0:
            folder, log = Path("/var/lib/redis"), Path("/var/log/redis/ci.log")
        else:
            folder = Path(os.environ.get("TMPDIR", "/tmp")) / "blockvault-redis"
            log = folder / "ci.log"
        folder.mkdir(parents=True, exist_ok=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        # The command this kind of machine starts Redis with (and tests/harness/ensure-services).
        command = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", str(self.port)]
        command += ["--save", "", "--appendonly", "no", "--dir", str(folder), "--logfile", str(log)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        try:
            _wait("Redis answers", self.is_running)
        except TimeoutError:
            raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: {proc.stderr.strip()}") from None
        _CLAIMS.reclaim(self.url)

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """The server is down inside the block and up again after it, whatever happens."""
        self.stop()
        try:
            yield
        finally:
            self.start()


# -- tests that restart libvirtd run alone ------------------------------------------------------------
# the machine's one libvirtd: a test that restarts it (fixture ``libvirtd_control``) runs while no
# other libvirt test does (a test is a libvirt test by its path: tests/shared/libvirt/, test_libvirt*)
LIBVIRT_LOCK = Path(tempfile.gettempdir()) / "blockvault-test-libvirtd.lock"
LIBVIRTD_STOPPING_FIXTURES = frozenset({"libvirtd_control"})


@contextlib.contextmanager
def servers_turn(exclusive: bool, lock: Path = LIBVIRT_LOCK) -> Iterator[None]:
    """A readers-writer lock across the processes of this machine, the writer first: every
    test takes the gate, then the lock shared, and gives the gate back at once; a test that
    stops a server keeps the gate while it waits for the lock and runs, so no test starts in
    the meantime and it waits only for those already running."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    gate_path = lock.with_name(lock.name + ".gate")
    with open(gate_path, "a") as gate, open(lock, "a") as held:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(held, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            if not exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # both released when the files close


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    if "libvirt" not in item.nodeid.split("::")[0]:
        return (yield)
    with servers_turn(not LIBVIRTD_STOPPING_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))):
        return (yield)


# -- for runners outside pytest (tests/bench/soak.py) ---------------------------------------------
def new_pg_database() -> str:
    """A new migrated catalog database on the test server (its URL); drop it with
    :func:`drop_pg_database`."""
    from shared.catalog import db

    base = make_url(pg_server_url_plain())
    url = _render(base.set(database=_create_database(base)))
    db.migrate(url)
    return url


def drop_pg_database(url: str) -> None:
    from shared.catalog import db

    db.engine(url).dispose()
    parsed = make_url(url)
    _drop_database(parsed._replace(database=None), str(parsed.database))


def pg_server_url_plain() -> str:
    """The test PostgreSQL server's URL (no database), failing with a hint when it is away."""
    base = _pg_base_url()
    if not _pg_answers(base):
        raise RuntimeError(f"PostgreSQL at {_render(base)} is unreachable\n" + HINT.format(env=PG_URL_ENV))
    return _render(base)


def claim_redis() -> str:
    """A Redis database index of this process's own, flushed (its URL); give it back with
    :func:`release_redis`."""
    base = _redis_base_url()
    index = _CLAIMS.claim(base)
    with _redis_client(base, index) as client:
        client.flushdb()
    return f"{base}/{index}"


def release_redis(url: str) -> None:
    base, _, index = url.rpartition("/")
    with contextlib.suppress(redis.RedisError):
        with _redis_client(base, int(index)) as client:
            client.flushdb()
        _CLAIMS.release(base, int(index))


@contextlib.contextmanager
def private_servers(folder: Path) -> Iterator[tuple[str, str, PgControl, RedisControl]]:
    """A PostgreSQL cluster and a Redis server of their own on free ports (Debian's
    pg_createcluster, redis-server), for a test that stops or restarts them (the soak, the
    service's Redis and PostgreSQL fault tests): no other test depends on them, so nobody
    waits for it. Yields a
    migrated catalog database's URL, a broker URL and the controls; everything is removed
    after. The cluster's role is the test server's (same name and password)."""
    from shared.catalog import db
    from tests.ports import free_port

    base = make_url(pg_server_url_plain())
    version = PgControl.find(_render(base)).version
    name, pg_port, redis_port = f"bv{os.getpid()}_{uuid.uuid4().hex[:6]}", free_port(), free_port()
    folder.mkdir(parents=True, exist_ok=True)

    def run(*command: str) -> None:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: {proc.stderr.strip()}")

    redis_url = f"redis://127.0.0.1:{redis_port}"
    try:
        run("pg_createcluster", version, name, "-p", str(pg_port))
        main_cluster = PgControl.find(_render(base)).cluster  # the same authentication as the test server's
        shutil.copy(f"/etc/postgresql/{version}/{main_cluster}/pg_hba.conf", f"/etc/postgresql/{version}/{name}/")
        run("pg_ctlcluster", "--skip-systemctl-redirect", version, name, "start")
        role, password = base.username or "postgres", (base.password or "").replace("'", "''")
        exists = f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'"
        sql = f'DO $$BEGIN IF NOT EXISTS ({exists}) THEN CREATE ROLE "{role}" LOGIN SUPERUSER; END IF; END$$;'
        run("runuser", "-u", "postgres", "--", "psql", "-q", "-p", str(pg_port), "-c", sql)
        if password:
            sql = f"ALTER ROLE \"{role}\" PASSWORD '{password}'"
            run("runuser", "-u", "postgres", "--", "psql", "-q", "-p", str(pg_port), "-c", sql)
        run("runuser", "-u", "postgres", "--", "psql", "-q", "-p", str(pg_port), "-c", 'CREATE DATABASE "soak"')
        own = base.set(port=pg_port)
        database = _render(own.set(database="soak"))
        db.migrate(database)
        command = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(redis_port)]
        run(*command, "--save", "", "--appendonly", "no", "--dir", str(folder), "--logfile", str(folder / "redis.log"))
        _wait("the private Redis answers", lambda: _redis_answers(redis_url))
        yield database, f"{redis_url}/0", PgControl.find(_render(own)), RedisControl.find(redis_url)
    finally:
        with contextlib.suppress(Exception):
            db.engine(_render(base.set(port=pg_port, database="soak"))).dispose()
        with contextlib.suppress(redis.RedisError), _redis_client(redis_url) as client:
            client.shutdown(nosave=True)
        subprocess.run(["pg_dropcluster", "--stop", version, name], capture_output=True, timeout=120, check=False)
