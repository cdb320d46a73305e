#!/usr/bin/env python3
"""Scale benchmark of scheduled backups: one trigger firing one job group of many volumes.

Run as::

    .venv/bin/python tests/bench/scheduler_scale.py [--targets 10000] [--workers 2] [--beats 2] [--keep]

What it does:

1. creates a fresh PostgreSQL database ``bv_sched_<random>`` (migrated here, before any process
   starts) and claims a Redis database index (``--redis-index``, 14 by default; the claim key is the
   one tests/services.py uses, so the test fixtures never hand out the same index meanwhile), flushed
   before and after; starts the API (``blockvault api``) and ``--workers`` workers (``blockvault
   worker --host-uuid U``, each its own host) as subprocesses, logs in the work dir under /var/tmp;
2. makes ``--targets`` small sparse raw volumes (``--volume-mib`` each, ``--data-kib`` of random
   bytes at a random offset), registers one ImageStore backup storage and every volume (spread
   round-robin over the hosts, ``--register-batch`` in a request), creates one
   volumeBackup job group with all of them as targets (``add_targets`` in batches of
   ``--batch``), a simple trigger with ``startTime`` = now + ``--fire-delay`` s and
   ``repeatCount=1``, attaches it, and starts ``--beats`` beats before the fire time;
3. from the fire time on, polls the catalog directly (SQLAlchemy) until every target has its
   history row: when the last API job of the fire was created (= every task enqueued), when the
   last history row was written, how many succeeded, history rows/s, CPU of every process; then
   checks for duplicates (API jobs, history rows, volume backups, per target) and reads the logs
   (which beat fired, how many jobs each, resumed fires, requeued / skipped deliveries,
   disconnected hosts) and the Redis queues left over;
4. optionally (``--profile-beat``) samples every beat with ``py-spy record --idle`` from just before
   the fire until the last job is enqueued, and prints where a beat spends its time inside
   ``scheduled_runs.fire``; optionally (``--fire-profile K``) fires a second group of K of the volumes
   in this process with every SQL statement, commit and task sent (``send_many``) counted and timed (the tasks
   are not sent: the API job rows are deleted again afterwards);
5. prints a table of the figures with verdicts against the target (every task enqueued within
   ``--enqueue-target`` s of the fire, no duplicates, every run successful) and tears everything
   down. ``--keep`` keeps the database, the Redis index and the work dir; the processes are
   stopped in any case.

Which code runs (``--code``): by default a snapshot of the working tree taken at the start
(``git ls-files -co --exclude-standard`` copied to /var/tmp), so edits made to the tree during a
run do not mix versions; ``--code HEAD`` (or any commit: ``git archive``), or ``--code live``
(the tree itself). The script re-executes itself with ``PYTHONPATH`` at the snapshot, so the
processes, the migration and the in-process profile all import that code; the report names it
(commit, dirty or not, hash of shared/service/scheduled_runs.py and shared/apijobs.py).

Not a pytest test: it needs PostgreSQL (``--pg``) and Redis (``--redis``) and takes minutes at
full size. Exit status 0 when every verdict passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.pool import NullPool

from api.client import Client
from shared.catalog import db

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent / "blockvault"
KiB, MiB = 1 << 10, 1 << 20
REDIS_CLAIM = "blockvault:test:redis-db:{index}"  # as tests/services.py: who holds which index
REDIS_CLAIM_TTL = 3600
ACTION = "schedulerJob"
POLL_SECONDS = 0.25
FIRED_RE = re.compile(r"^(\S+ \S+) INFO \S+ scheduler\.fired group=(\w+) trigger=(\w+) time=(.+?) jobs=(\d+)")
RESUMED_RE = re.compile(r"^(\S+ \S+) WARNING \S+ scheduler\.resume_fire group=(\w+)")
SPY_FUNCS = (  # (label, frame substring) for the beat profile's inclusive shares
    ("scheduled_runs.fire (all)", "fire (shared/service/scheduled_runs.py"),
    ("  apijobs.enqueue (one job)", "enqueue (shared/apijobs.py"),
    ("  apijobs.enqueue_many (a batch)", "enqueue_many (shared/apijobs.py"),
    ("  _routes (a batch's volumes and hosts)", "_routes (shared/service/scheduled_runs.py"),
    ("  _failed_at_fire", "_failed_at_fire (shared/service/scheduled_runs.py"),
    ("    Session.flush (INSERT api_job)", "flush (sqlalchemy/orm/session.py"),
    ("    Session.scalars (SELECT existing, INSERT RETURNING)", "scalars (sqlalchemy/orm/session.py"),
    ("    Session.commit", "commit (sqlalchemy/orm/session.py"),
    ("    celery send_task", "send_task (celery/app/base.py"),
    ("    logging", "info (logging/__init__.py"),
    ("  Session.get (api_job exists? / volume / host)", "get (sqlalchemy/orm/session.py"),
    ("  _route", "_route (shared/service/scheduled_runs.py"),
    ("  begin_nested (SAVEPOINT)", "begin_nested (sqlalchemy/orm/session.py"),
    ("  pool checkout (pre-ping)", "_checkout (sqlalchemy/pool/base.py"),
    ("  hosts.reap", "reap (shared/hosts.py"),
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


# -- PostgreSQL and Redis --------------------------------------------------------------------------
def admin_engine(pg: str) -> Engine:
    return create_engine(make_url(pg).set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT")


def create_database(pg: str) -> tuple[str, str]:
    name = f"bv_sched_{secrets.token_hex(6)}"
    engine = admin_engine(pg)
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    url = make_url(pg).set(database=name).render_as_string(hide_password=False)
    return name, url


def drop_database(pg: str, name: str) -> None:
    engine = admin_engine(pg)
    try:
        with engine.connect() as conn:
            for attempt in range(10):
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": name},
                )
                try:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
                    return
                except Exception:
                    if attempt == 9:
                        raise
                    time.sleep(0.3)
    finally:
        engine.dispose()


class RedisIndex:
    """One Redis database index, claimed like the test fixtures claim theirs."""

    def __init__(self, base: str, preferred: int, *, claim: bool = True) -> None:
        self.base = base.rstrip("/")
        self.token = f"{socket.gethostname()}:{os.getpid()}:scheduler_scale:{secrets.token_hex(8)}"
        self.claimed = claim
        if not claim:  # a server of our own: nobody else to share it with
            self.index = preferred
            self.url = f"{self.base}/{self.index}"
            self.flush()
            return
        with redis.Redis.from_url(f"{self.base}/0") as control:
            try:
                databases = int(control.config_get("databases").get("databases") or 16)
            except redis.ResponseError:
                databases = 16
            order = [preferred, *[i for i in range(databases - 1, 0, -1) if i != preferred]]
            for index in order:
                if control.set(REDIS_CLAIM.format(index=index), self.token, nx=True, ex=REDIS_CLAIM_TTL):
                    self.index = index
                    break
            else:
                raise SystemExit("every Redis database index is claimed by a test")
        if self.index != preferred:
            log(f"Redis index {preferred} is claimed by another process: using {self.index}")
        self.url = f"{self.base}/{self.index}"
        self.flush()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def flush(self) -> None:
        with self.client() as client:
            client.flushdb()

    def refresh(self) -> None:
        if not self.claimed:
            return
        with redis.Redis.from_url(f"{self.base}/0") as control:
            control.set(REDIS_CLAIM.format(index=self.index), self.token, ex=REDIS_CLAIM_TTL)

    def release(self) -> None:
        if not self.claimed:
            return
        with redis.Redis.from_url(f"{self.base}/0") as control:
            key = REDIS_CLAIM.format(index=self.index)
            if control.get(key) == self.token.encode():
                control.delete(key)

    def queues(self) -> dict[str, int]:
        """Messages still waiting per Celery queue, plus those delivered but not acknowledged."""
        out: dict[str, int] = {}
        with self.client() as client:
            for key in client.scan_iter(count=1000):
                name = key.decode(errors="replace")
                kind = client.type(key).decode()
                if kind == "list" and not name.startswith("_kombu"):
                    out[name] = int(client.llen(key))
                elif name == "unacked" and kind == "hash":
                    out["(unacked)"] = int(client.hlen(key))
        return out


class AmqpVhost:
    """A RabbitMQ virtual host of this run's own (``--amqp``): the broker instead of Redis,
    with the same few methods the run uses."""

    def __init__(self, base: str) -> None:
        self.vhost = f"bv-sched-{secrets.token_hex(6)}"
        self._ctl("add_vhost", self.vhost)
        self._ctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        self.url = f"{base.rstrip('/')}/{self.vhost}"

    @staticmethod
    def _ctl(*args: str) -> str:
        return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=True).stdout

    def flush(self) -> None:
        """Nothing to flush: the virtual host is new, and deleted by :meth:`release`."""

    def refresh(self) -> None:
        """Nothing to refresh: a virtual host is not a lease."""

    def release(self) -> None:
        self._ctl("delete_vhost", self.vhost)

    def queues(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self._ctl("list_queues", "-p", self.vhost, "name", "messages").splitlines():
            name, _, count = line.partition("\t")
            if count.strip().isdigit() and int(count):
                out[name] = int(count)
        return out


def start_own_redis(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server (no persistence, like the shared one) on a free port: immune to
    other sessions' tests that restart the shared server (which loses every queued message)."""
    port = free_port()
    with open(work / "redis.log", "ab") as out:
        options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work), "--databases", "4"]
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), *options],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"redis://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with redis.Redis.from_url(f"{base}/0") as probe:
                probe.ping()
            return server, base
        except redis.RedisError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not start: {(work / 'redis.log').read_text()[-2000:]}") from None
            time.sleep(0.1)


# -- processes ---------------------------------------------------------------------------------
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Stack:
    work: Path
    database_url: str
    broker_url: str
    key: str = field(default_factory=lambda: "bench-admin-" + secrets.token_hex(12))
    secret: str = field(default_factory=lambda: secrets.token_hex(32))  # BLOCKVAULT_SECRET_KEY of every process
    port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
        env.update(
            BLOCKVAULT_DATABASE_URL=self.database_url,
            BLOCKVAULT_BROKER_URL=self.broker_url,
            BLOCKVAULT_DATA_DIR=str(self.work / "data"),
            BLOCKVAULT_VOLUME_ROOTS=str(self.work / "volumes"),
            BLOCKVAULT_SECRET_KEY=self.secret,
            BLOCKVAULT_ADMIN_API_KEY=self.key,
            **(extra or {}),
        )
        return env

    def spawn(self, name: str, args: list[str], extra: dict[str, str] | None = None) -> Proc:
        path = self.work / f"{name}.log"
        with open(path, "ab") as out:
            popen = subprocess.Popen(
                [str(BIN), *args],
                env=self.env(extra),
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc = Proc(name, popen, path)
        return proc

    def wait_for(self, what: str, proc: Proc, check: Callable[[], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if not proc.alive():
                raise SystemExit(f"{proc.name} exited while waiting for {what}:\n{proc.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}:\n{proc.text()[-3000:]}")
            time.sleep(0.2)

    def start_api(self) -> None:
        proc = self.spawn("api", ["api", "--port", str(self.port)])

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/v1/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        self.wait_for("the API", proc, healthy)

    def start_workers(self, hosts: list[str], concurrency: int, catalog: Engine) -> None:
        started = [
            self.spawn(
                f"worker-{i + 1}",
                ["-v", "worker", "--host-uuid", host, "--concurrency", str(concurrency)],
                {"BLOCKVAULT_HOST_UUID": host},
            )
            for i, host in enumerate(hosts)
        ]
        for proc, host in zip(started, hosts, strict=True):
            self.wait_for(f"{proc.name} ready", proc, lambda p=proc: "ready." in p.text())
            self.wait_for(f"host {host} Connected", proc, lambda h=host: host_status(catalog, h) == "Connected")

    def start_beats(self, count: int) -> list[Proc]:
        beats = [self.spawn(f"beat-{i + 1}", ["-v", "beat"]) for i in range(count)]
        for proc in beats:
            self.wait_for(f"{proc.name} started", proc, lambda p=proc: "beat: Starting" in p.text())
        return beats

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(timeout=10)

    def client(self) -> Client:
        return Client(f"http://127.0.0.1:{self.port}", self.key, timeout=120)


def host_status(catalog: Engine, host: str) -> str | None:
    with catalog.connect() as conn:
        return conn.execute(text("SELECT status FROM host WHERE uuid = :h"), {"h": host}).scalar()


# -- CPU accounting ----------------------------------------------------------------------------------
def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants."""
    try:
        root = psutil.Process(pid)
        members = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = member.cpu_times()
            total += times.user + times.system
    return total


def postgres_cpu() -> dict[int, float]:
    out = {}
    for proc in psutil.process_iter(["name", "username", "cpu_times"]):
        info = proc.info
        if info.get("username") == "postgres" and info.get("cpu_times") is not None:
            out[proc.pid] = info["cpu_times"].user + info["cpu_times"].system
    return out


def busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


@dataclass
class CpuSnapshot:
    at: float
    procs: dict[str, float]
    postgres: dict[int, float]
    busy: float

    @classmethod
    def take(cls, stack: Stack) -> CpuSnapshot:
        procs = {name: tree_cpu(p.popen.pid) for name, p in stack.procs.items()}
        return cls(time.monotonic(), procs, postgres_cpu(), busy_seconds())


def cpu_rows(start: CpuSnapshot, end: CpuSnapshot) -> list[tuple[str, float, float]]:
    """(who, CPU seconds, average % of one core) between two snapshots."""
    wall = max(1e-6, end.at - start.at)
    rows = []
    ours = 0.0
    groups: dict[str, float] = collections.defaultdict(float)
    for name, after in end.procs.items():
        used = max(0.0, after - start.procs.get(name, 0.0))
        groups[re.sub(r"-\d+$", "s", name) if name != "api" else "api"] += used
        rows.append((name, used, 100 * used / wall))
        ours += used
    for group, used in sorted(groups.items()):
        if group.endswith("s"):
            rows.append((f"all {group}", used, 100 * used / wall))
    pg = sum(max(0.0, v - start.postgres.get(pid, 0.0)) for pid, v in end.postgres.items())
    rows.append(("PostgreSQL (every database)", pg, 100 * pg / wall))
    busy = end.busy - start.busy
    rows.append(("machine busy (all cores)", busy, 100 * busy / wall))
    other = max(0.0, busy - ours - pg)
    rows.append(("other processes (noise, est.)", other, 100 * other / wall))
    return rows


# -- setup -------------------------------------------------------------------------------------------
def make_volumes(folder: Path, count: int, size: int, data: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        path = folder / f"vol-{i:05d}.raw"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            offset = rng.randrange(0, max(1, (size - data) // (4 * KiB))) * 4 * KiB
            os.pwrite(fd, rng.randbytes(data), offset)
        finally:
            os.close(fd)
        paths.append(path)
    return paths


def register_volumes(stack: Stack, hosts: list[str], paths: list[Path], batch: int) -> list[str]:
    """Every volume, ``batch`` in a request (POST /v1/volumes with params.volumes)."""
    items = [
        {"hostUuid": hosts[i % len(hosts)], "installPath": str(path), "name": path.stem, "size": MiB}
        for i, path in enumerate(paths)
    ]
    client = stack.client()
    try:
        return [
            str(v["uuid"])
            for start in range(0, len(items), batch)
            for v in client.register_volumes(items[start : start + batch])
        ]
    finally:
        client.close()


# -- measuring -------------------------------------------------------------------------------------
class Rows(list[Any]):
    """Fetched rows, with the few Result methods the checks use."""

    def all(self) -> Rows:
        return self

    def one(self) -> Any:
        if len(self) != 1:
            raise RuntimeError(f"expected one row, got {len(self)}")
        return self[0]

    def scalar_one(self) -> Any:
        return self.one()[0]


class Catalog:
    """Statements on the benchmark's database, each on a fresh connection, retried while the
    server is unreachable (another session's tests may restart PostgreSQL): the outages are
    recorded for the report."""

    def __init__(self, engine: Engine, fire_epoch: float) -> None:
        self.engine, self.fire_epoch = engine, fire_epoch
        self.outages: list[tuple[float, float]] = []  # (t after the fire, seconds)

    def execute(self, statement: Any, params: dict[str, Any] | None = None, *, patience: float = 600) -> Rows:
        down: float | None = None
        while True:
            try:
                with self.engine.connect() as conn:
                    rows = Rows(conn.execute(statement, params or {}).all())
            except (OperationalError, InterfaceError) as exc:
                if down is None:
                    down = time.time()
                    first = str(exc.orig or exc).strip().splitlines()[0]
                    log(f"PostgreSQL unreachable ({first}); retrying")
                if time.time() - down > patience:
                    raise
                time.sleep(1)
                continue
            if down is not None:
                self.outages.append((down - self.fire_epoch, time.time() - down))
                log(f"PostgreSQL answers again after {time.time() - down:.1f} s")
            return rows


@dataclass
class Sample:
    t: float  # seconds since the fire time
    jobs: dict[str, int]
    histories: int

    @property
    def enqueued(self) -> int:
        return sum(self.jobs.values())


def sample(conn: Catalog, group: str, fire_epoch: float) -> Sample:
    jobs = dict(
        conn.execute(text("SELECT state, count(*) FROM api_job WHERE action = :a GROUP BY state"), {"a": ACTION}).all()
    )
    histories = conn.execute(
        text('SELECT count(*) FROM scheduler_job_history WHERE "schedulerJobGroupUuid" = :g'), {"g": group}
    ).scalar_one()
    return Sample(time.time() - fire_epoch, {str(k): int(v) for k, v in jobs.items()}, int(histories))


def pg_stats(conn: Catalog, name: str) -> dict[str, int]:
    row = conn.execute(
        text(
            "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_fetched"
            " FROM pg_stat_database WHERE datname = :d"
        ),
        {"d": name},
    ).one()
    return dict(row._mapping)


@dataclass
class Spy:
    """``py-spy record --idle`` on one beat, stopped (SIGINT) once the fire is enqueued."""

    beat: str
    popen: subprocess.Popen[bytes]
    out: Path

    @classmethod
    def start(cls, py_spy: str, proc: Proc, work: Path, *, idle: bool = True, extra: tuple[str, ...] = ()) -> Spy:
        out = work / f"{proc.name}.pyspy.txt"
        command = [py_spy, "record", "--pid", str(proc.popen.pid), "--rate", "200", "--format", "raw", *extra]
        command += ["--idle"] if idle else []
        with open(work / f"{proc.name}.pyspy.log", "ab") as spy_log:
            popen = subprocess.Popen(
                [*command, "--output", str(out), "--nonblocking"], stdout=spy_log, stderr=subprocess.STDOUT
            )
        return cls(proc.name, popen, out)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
        try:
            self.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.popen.kill()

    def summary(self) -> list[str]:
        if not self.out.exists():
            return [f"{self.beat}: no py-spy output (see {self.beat}.pyspy.log)"]
        stacks: list[tuple[str, int]] = []
        for line in self.out.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if count.isdigit():
                stacks.append((stack, int(count)))
        in_fire = [(s, c) for s, c in stacks if "fire (shared/service/scheduled_runs.py" in s]
        total = sum(c for _, c in in_fire)
        if not total:
            return [f"{self.beat}: no samples inside scheduled_runs.fire (it did not fire)"]
        lines = [f"{self.beat}: {total} samples inside scheduled_runs.fire (200/s, idle included):"]
        for label, needle in SPY_FUNCS:
            share = sum(c for s, c in in_fire if needle in s)
            lines.append(f"    {label:<48} {100 * share / total:5.1f} %")
        leaves: collections.Counter[str] = collections.Counter()
        for stack, count in in_fire:
            leaves[stack.split(";")[-1]] += count
        lines.append("    top leaf frames (where the thread was when sampled):")
        lines += [f"      {100 * c / total:5.1f} %  {frame}" for frame, c in leaves.most_common(12)]
        return lines

    def cpu_summary(self, top: int = 14) -> list[str]:
        """Where a process spent its CPU (no idle samples): the project's own functions and the
        libraries' frames, inclusive, and the leaf frames."""
        if not self.out.exists():
            return [f"{self.beat}: no py-spy output"]
        inclusive: collections.Counter[str] = collections.Counter()
        leaves: collections.Counter[str] = collections.Counter()
        total = 0
        for line in self.out.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            frames = stack.split(";")
            total += int(count)
            leaves[frames[-1]] += int(count)
            for frame in {re.sub(r":\d+\)$", ")", f) for f in frames}:
                if PROJECT_FRAME_RE.search(frame) or any(needle in frame for needle in HOT_LIBRARY_FRAMES):
                    inclusive[frame] += int(count)
        if not total:
            return [f"{self.beat}: no CPU samples"]
        lines = [f"{self.beat}: {total} CPU samples (200/s); the project's functions and SQL/Redis calls, inclusive:"]
        lines += [f"      {100 * c / total:5.1f} %  {frame}" for frame, c in inclusive.most_common(top * 2)]
        lines.append("    top leaf frames:")
        lines += [f"      {100 * c / total:5.1f} %  {frame}" for frame, c in leaves.most_common(top)]
        return lines


def fire_profile(url: str, broker: str, group_name: str, volumes: list[str], storage: str) -> list[str]:
    """Fire a group of ``volumes`` in this process, counting statements, commits and sent tasks
    (counted, not sent), then delete its API jobs again so nothing runs."""
    os.environ["BLOCKVAULT_DATABASE_URL"] = url
    os.environ["BLOCKVAULT_BROKER_URL"] = broker
    from sqlalchemy import event, select

    from shared import apijobs
    from shared.catalog.models import SchedulerJobGroup
    from shared.celery_app import celery_app
    from shared.config import get_settings
    from shared.service import jobgroups, scheduled_runs

    get_settings.cache_clear()
    celery_app.cache_clear()

    kinds: collections.Counter[str] = collections.Counter()
    sql_seconds = [0.0]
    started: dict[int, float] = {}

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        started[threading.get_ident()] = time.perf_counter()
        kinds[statement.split(None, 1)[0].upper() + _table(statement)] += 1

    def after(*_: Any) -> None:
        sql_seconds[0] += time.perf_counter() - started.pop(threading.get_ident(), time.perf_counter())

    commits = [0]
    engine = db.engine(url)
    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    event.listen(engine, "commit", lambda *_: commits.__setitem__(0, commits[0] + 1))
    sends = [0, 0.0]
    real_send_many = apijobs.send_many

    def counting_send_many(tasks: list[tuple[str, str, str]]) -> None:
        sends[0] += len(tasks)

    with db.session(url) as session:
        group = jobgroups.create_group(
            session, {"name": group_name, "type": "volumeBackup", "parameters": {"backupStorageUuids": [storage]}}
        )
        jobgroups.add_targets(session, group, volumes)
        group_uuid = group.uuid
    # the real cost of sending a task (send_many, as a fire sends a batch), to a queue nobody
    # reads (the key is deleted afterwards)
    begin = time.perf_counter()
    real_send_many([(secrets.token_hex(16), "blockvault.bench.sink", "bench.sink") for _ in range(500)])
    sends[1] = (time.perf_counter() - begin) / 500
    kinds.clear()
    commits[0] = 0
    sql_seconds[0] = 0.0
    apijobs.send_many = counting_send_many
    try:
        with db.session(url) as session:
            group = session.scalars(select(SchedulerJobGroup).where(SchedulerJobGroup.uuid == group_uuid)).one()
            begin = time.perf_counter()
            created = scheduled_runs.run_now(session, group)
            wall = time.perf_counter() - begin
    finally:
        apijobs.send_many = real_send_many
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)
    with db.session(url) as session:
        session.execute(
            text("DELETE FROM api_job WHERE action = :a AND params::jsonb ->> 'schedulerJobGroupUuid' = :g"),
            {"a": ACTION, "g": group_uuid},
        )
        session.execute(text('DELETE FROM scheduler_fire WHERE "schedulerJobGroupUuid" = :g'), {"g": group_uuid})
        session.execute(text('DELETE FROM scheduler_job WHERE "schedulerJobGroupUuid" = :g'), {"g": group_uuid})
        session.execute(text("DELETE FROM scheduler_job_group WHERE uuid = :g"), {"g": group_uuid})
    n = max(1, created)
    statements = sum(kinds.values())
    lines = [
        f"in-process fire of {created} targets (tasks counted, not sent): {wall:.2f} s,"
        f" {1000 * wall / n:.2f} ms per target",
        f"  SQL statements: {statements} ({statements / n:.2f} per target), {1000 * sql_seconds[0] / n:.2f} ms"
        f" per target in the driver; commits: {commits[0]} ({commits[0] / n:.2f} per target)",
    ]
    lines += [f"    {kind:<36} {count:6d}  {count / n:5.2f}/target" for kind, count in kinds.most_common()]
    lines.append(
        f"  tasks sent: {sends[0]}; a real send (send_many of 500) costs {1000 * sends[1]:.2f} ms a task"
        f" -> {sends[0] * sends[1]:.2f} s for these {created} targets"
    )
    with redis.Redis.from_url(broker) as client:
        client.delete("bench.sink")
    return lines


TABLE_RE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+\"?(\w+)", re.IGNORECASE)


def _table(statement: str) -> str:
    found = TABLE_RE.search(statement)
    return f" {found.group(1)}" if found else ""


# -- which code runs ---------------------------------------------------------------------------
CODE_ENV = "BV_SCHED_CODE"  # set in the re-executed process: the tree it runs
CODE_TEMP_ENV = "BV_SCHED_CODE_TEMP"  # "1" when that tree is a snapshot to remove at the end
CODE_LABEL_ENV = "BV_SCHED_CODE_LABEL"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def snapshot(code: str) -> tuple[Path, str]:
    """A copy of the working tree ("worktree") or of a commit, and a label saying which."""
    head = git("rev-parse", "--short", "HEAD").strip()
    target = Path(tempfile.mkdtemp(prefix="bv_sched_code_", dir="/var/tmp"))
    if code == "worktree":
        files = [f for f in git("ls-files", "-co", "--exclude-standard", "-z").split("\0") if f]
        for name in files:
            source = ROOT / name
            if source.is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
        label = f"working tree at {time.strftime('%H:%M:%S')} (HEAD {head}{', modified' if dirty else ''})"
    else:
        rev = git("rev-parse", "--short", code).strip()
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        label = f"commit {rev}"
    return target, label


def reexec_in(args: argparse.Namespace) -> None:
    """Run this script again with PYTHONPATH at the code to benchmark (unless it is so already)."""
    if os.environ.get(CODE_ENV) or args.code == "live":
        return
    tree, label = snapshot(args.code)
    env = {**os.environ, CODE_ENV: str(tree), CODE_TEMP_ENV: "1", CODE_LABEL_ENV: label}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env)


def code_label() -> str:
    import shared.apijobs
    import shared.service.scheduled_runs

    digest = "/".join(
        hashlib.sha256(Path(m.__file__ or "").read_bytes()).hexdigest()[:10]
        for m in (shared.service.scheduled_runs, shared.apijobs)
    )
    where = Path(shared.service.scheduled_runs.__file__ or "").parents[2]
    return f"{os.environ.get(CODE_LABEL_ENV, 'live tree')} in {where}; sha256 jobgroups/apijobs {digest}"


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # figure, value, verdict
    notes: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    failed: bool = False

    def add(self, figure: str, value: object, verdict: bool | None = None) -> None:
        mark = "" if verdict is None else ("PASS" if verdict else "FAIL")
        self.failed |= verdict is False
        self.rows.append((figure, str(value), mark))

    def print(self) -> None:
        width = max((len(r[0]) for r in self.rows), default=6)
        vwidth = max((len(r[1]) for r in self.rows), default=5)
        print()
        for line in self.header:
            print(line)
        print(f"{'figure':<{width}}  {'value':>{vwidth}}  verdict")
        print(f"{'-' * width}  {'-' * vwidth}  -------")
        for figure, value, mark in self.rows:
            print(f"{figure:<{width}}  {value:>{vwidth}}  {mark}")
        for note in self.notes:
            print(note)


PROJECT_FRAME_RE = re.compile(r"\((?:api|shared|workers|beat)/")
HOT_LIBRARY_FRAMES = (
    "do_execute (sqlalchemy",
    "do_commit (sqlalchemy",
    "do_ping (sqlalchemy",
    "send_task (celery",
    "Session.flush (sqlalchemy",
    "_read_from_socket (redis",
    "_emit_update_statements (sqlalchemy",
)
LOG_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def timeline(conn: Catalog, group: str, fire_at: datetime, stack: Stack, bucket: int = 30) -> list[str]:
    """History rows written, and tasks re-sent by requeue_stale, per ``bucket`` seconds after
    the fire."""
    rows = conn.execute(
        text(
            'SELECT floor(extract(epoch FROM "createDate" - :f) / :b)::int, count(*) FROM scheduler_job_history'
            ' WHERE "schedulerJobGroupUuid" = :g GROUP BY 1 ORDER BY 1'
        ),
        {"f": fire_at, "b": bucket, "g": group},
    ).all()
    written = {int(k): int(v) for k, v in rows}
    requeued: collections.Counter[int] = collections.Counter()
    skipped: collections.Counter[int] = collections.Counter()
    for name, proc in stack.procs.items():
        if not name.startswith("worker"):
            continue
        for line in proc.text().splitlines():
            kind = requeued if "job.requeued" in line else skipped if "job.skipped" in line else None
            found = LOG_TIME_RE.match(line) if kind is not None else None
            if kind is not None and found:
                stamp = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S").astimezone(UTC)
                kind[int((stamp - fire_at).total_seconds() // bucket)] += 1
    keys = sorted(set(written) | set(requeued) | set(skipped))
    lines = [f"per {bucket} s after the fire: history rows written / tasks re-sent (job.requeued) / skipped deliveries"]
    lines += [
        f"    t={k * bucket:5d}..{(k + 1) * bucket:<5d} {written.get(k, 0):6d} rows"
        f" ({written.get(k, 0) / bucket:5.1f}/s)  {requeued.get(k, 0):6d} re-sent  {skipped.get(k, 0):6d} skipped"
        for k in keys
    ]
    return lines


def window(value: str) -> tuple[float, float]:
    start, _, duration = value.partition(":")
    return float(start), float(duration or 30)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--beats", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2, help="per worker")
    parser.add_argument("--keep", action="store_true", help="keep database, Redis index and work dir")
    parser.add_argument("--pg", default="postgresql+psycopg2://postgres@127.0.0.1:5432")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    parser.add_argument("--redis-index", type=int, default=14)
    parser.add_argument(
        "--amqp", metavar="URL", help="RabbitMQ instead of Redis, e.g. amqp://guest:guest@127.0.0.1:5672"
    )
    parser.add_argument(
        "--own-redis", action="store_true", help="run a private redis-server (other sessions restart the shared one)"
    )
    parser.add_argument("--volume-mib", type=int, default=1)
    parser.add_argument("--data-kib", type=int, default=8)
    parser.add_argument("--register-batch", type=int, default=2000, help="volumes per registration request")
    parser.add_argument("--batch", type=int, default=1000, help="targets per add_targets call")
    parser.add_argument("--fire-delay", type=float, default=20.0, help="s from trigger creation to its fire")
    parser.add_argument("--enqueue-target", type=float, default=20.0, help="s after the fire")
    parser.add_argument("--total-target", type=float, default=600.0, help="s from the fire to the last history row")
    parser.add_argument("--register-target", type=float, default=10.0, help="s to register every volume")
    parser.add_argument("--stall", type=float, default=180.0, help="give up after this long without progress")
    parser.add_argument("--timeout", type=float, default=7200.0, help="give up this long after the fire")
    parser.add_argument("--settle", type=float, default=5.0, help="s to watch for late duplicates at the end")
    parser.add_argument("--profile-beat", action="store_true", help="py-spy record every beat during the fire")
    parser.add_argument(
        "--profile-workers", type=window, metavar="START:SECONDS", help="py-spy the workers from START s after the fire"
    )
    parser.add_argument("--profile-api", action="store_true", help="py-spy record the API while registering")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "/tmp/pyspy/bin/py-spy")
    parser.add_argument("--fire-profile", type=int, default=0, metavar="K", help="in-process fire of K targets")
    parser.add_argument("--seed", type=int, default=20240501)
    parser.add_argument("--code", default="worktree", help="worktree (a snapshot, default), live, HEAD or a commit")
    return parser.parse_args()


STOP = threading.Event()  # SIGINT/SIGTERM while polling: stop polling, check, report, tear down
POLLING = threading.Event()


def on_signal(_signum: int, _frame: object) -> None:
    if POLLING.is_set() and not STOP.is_set():
        STOP.set()
        return
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    reexec_in(args)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    work = Path(tempfile.mkdtemp(prefix="bv_sched_", dir="/var/tmp"))
    log(f"work dir {work}")
    report = Report()
    report.header.append(f"code: {code_label()}")
    db_name, url = create_database(args.pg)
    log(f"database {db_name}")
    own_redis = None
    rindex: RedisIndex | AmqpVhost
    if args.amqp:
        rindex = AmqpVhost(args.amqp)
        log(f"RabbitMQ {rindex.url} (a virtual host of this run)")
    elif args.own_redis:
        own_redis, base = start_own_redis(work)
        rindex = RedisIndex(base, 1, claim=False)
    else:
        rindex = RedisIndex(args.redis, args.redis_index)
    if not args.amqp:
        log(f"Redis {rindex.url} (flushed){' (a server of our own)' if own_redis else ''}")
    stack = Stack(work, url, rindex.url)
    catalog = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    spies: list[Spy] = []
    try:
        run(args, stack, catalog, db_name, rindex, report, spies)
    except KeyboardInterrupt:
        report.failed = True
        log("interrupted")
    except Exception:  # noqa: BLE001 - reported, then the teardown and the partial report
        report.failed = True
        traceback.print_exc()
    finally:
        for spy in spies:
            spy.stop()
        log("stopping the processes")
        stack.stop_all()
        if own_redis is not None and not args.keep:
            os.killpg(own_redis.pid, signal.SIGTERM)
            own_redis.wait(timeout=30)
        catalog.dispose()
        db.reset()
        if args.keep:
            log(f"kept: database {db_name} ({url}), Redis {rindex.url}, work dir {work}")
            if own_redis is not None:
                log(f"the Redis server of our own is still running: pid {own_redis.pid}")
            log(f"code: {os.environ.get(CODE_ENV, ROOT)}")
        else:
            for attempt in range(30):  # the server may be restarting (other sessions' fault tests)
                try:
                    drop_database(args.pg, db_name)
                    break
                except OperationalError:
                    if attempt == 29:
                        raise
                    time.sleep(2)
            if own_redis is None:
                rindex.flush()
                rindex.release()
            shutil.rmtree(work, ignore_errors=True)
            if os.environ.get(CODE_TEMP_ENV) == "1":
                shutil.rmtree(os.environ[CODE_ENV], ignore_errors=True)
            log("database dropped, Redis index flushed, work dir and code snapshot removed")
    report.print()
    return 1 if report.failed else 0


def run(
    args: argparse.Namespace,
    stack: Stack,
    catalog: Engine,
    db_name: str,
    rindex: RedisIndex | AmqpVhost,
    report: Report,
    spies: list[Spy],
) -> None:
    n = args.targets
    begin = time.monotonic()
    db.migrate(stack.database_url)
    log(f"migrated in {time.monotonic() - begin:.1f} s; starting the API and {args.workers} workers")
    from shared.catalog.models import new_uuid

    hosts = [new_uuid() for _ in range(args.workers)]
    (stack.work / "volumes").mkdir(exist_ok=True)  # the workers' volume root
    stack.start_api()
    stack.start_workers(hosts, args.concurrency, catalog)
    log("API and workers up")

    begin = time.monotonic()
    paths = make_volumes(stack.work / "volumes", n, args.volume_mib * MiB, args.data_kib * KiB, args.seed)
    made = time.monotonic() - begin
    log(f"{n} volumes made in {made:.1f} s")
    client = stack.client()
    storage = client.add_backup_storage("bench", f"file://{stack.work / 'store'}")
    api_spy = Spy.start(args.py_spy, stack.procs["api"], stack.work, idle=False) if args.profile_api else None
    before = CpuSnapshot.take(stack)
    begin = time.monotonic()
    volumes = register_volumes(stack, hosts, paths, args.register_batch)
    registered = time.monotonic() - begin
    after = CpuSnapshot.take(stack)
    log(f"{n} volumes registered in {registered:.1f} s ({n / registered:.0f}/s)")
    report.add(
        f"{n} volumes registered (bulk, goal {args.register_target:.0f} s)",
        fmt_s(registered),
        registered <= args.register_target,
    )
    report.notes.append("CPU while registering the volumes:")
    report.notes += [
        f"    {who:<32} {used:8.1f} s  {pct:6.1f} %  {1000 * used / n:6.2f} ms/volume"
        for who, used, pct in cpu_rows(before, after)
        if not who.startswith(("worker", "all worker", "beat", "all beat"))
    ]
    if api_spy is not None:
        api_spy.stop()
        report.notes += ["API profile while registering (py-spy, CPU only):", *api_spy.cpu_summary()]
    group = client.create_job_group("scale", "volumeBackup", backupStorageUuids=[storage["uuid"]])
    begin = time.monotonic()
    for start in range(0, n, args.batch):
        client.add_targets(group["uuid"], volumes[start : start + args.batch])
    targeted = time.monotonic() - begin
    log(f"{n} targets added in {targeted:.1f} s (batches of {args.batch})")
    fire_epoch = int(time.time() + args.fire_delay)  # trigger times are Unix seconds
    trigger = client.create_trigger(
        "scale", schedulerType="simple", schedulerInterval=3600, repeatCount=1, startTime=fire_epoch
    )
    client.attach_trigger(trigger["uuid"], group["uuid"])
    beats = stack.start_beats(args.beats)
    lead = fire_epoch - time.time()
    log(f"{args.beats} beats up, {lead:.1f} s before the fire time")
    if lead < 0:
        report.notes.append(f"NOTE: the beats were up only {-lead:.1f} s after the fire time")
    client.close()

    if args.profile_beat:
        if not Path(args.py_spy).exists():
            raise SystemExit(f"--profile-beat: no py-spy at {args.py_spy}")
        spies += [Spy.start(args.py_spy, beat, stack.work) for beat in beats]

    time.sleep(max(0.0, fire_epoch - time.time()))
    cpu0 = CpuSnapshot.take(stack)
    conn = Catalog(catalog, fire_epoch)
    stats0 = pg_stats(conn, db_name)
    log(f"fire time reached: polling ({n} targets)")
    samples: list[Sample] = []
    enqueued_at: float | None = None
    cpu_enq: CpuSnapshot | None = None
    stats_enq: dict[str, int] | None = None
    last_change, last_key, last_print = time.time(), (-1, -1), 0.0
    finished_at: float | None = None
    worker_spies: list[Spy] = []
    POLLING.set()
    while True:
        if STOP.is_set():
            report.notes.append("NOTE: stopped by a signal before the end: the figures are partial")
            log("signal: stop polling, checking what there is")
            break
        now_s = sample(conn, group["uuid"], fire_epoch)
        samples.append(now_s)
        if args.profile_workers and not worker_spies and now_s.t >= args.profile_workers[0]:
            extra = ("--subprocesses", "--duration", str(int(args.profile_workers[1])))
            worker_spies = [
                Spy.start(args.py_spy, proc, stack.work, idle=False, extra=extra)
                for name, proc in stack.procs.items()
                if name.startswith("worker")
            ]
            spies += worker_spies
            log(f"py-spy on the workers for {args.profile_workers[1]:.0f} s")
        key = (now_s.enqueued, now_s.histories)
        if key != last_key:
            last_key, last_change = key, time.time()
        if enqueued_at is None and now_s.enqueued >= n:
            enqueued_at = now_s.t
            cpu_enq = CpuSnapshot.take(stack)
            stats_enq = pg_stats(conn, db_name)
            for spy in spies:
                spy.stop()
            log(f"all {n} jobs enqueued (poll: {now_s.t:.1f} s after the fire)")
        open_jobs = now_s.jobs.get("Pending", 0) + now_s.jobs.get("Running", 0)
        if now_s.enqueued >= n and now_s.histories >= n and not open_jobs:
            finished_at = finished_at or time.time()
            if time.time() - finished_at >= args.settle:
                break
        if now_s.t - last_print >= 10:
            last_print = now_s.t
            states = " ".join(f"{k}={v}" for k, v in sorted(now_s.jobs.items()))
            log(f"t={now_s.t:6.1f} s  enqueued={now_s.enqueued} ({states})  histories={now_s.histories}")
            rindex.refresh()
        if time.time() - last_change > args.stall:
            report.notes.append(f"NOTE: gave up: no progress for {args.stall:.0f} s")
            break
        if now_s.t > args.timeout:
            report.notes.append(f"NOTE: gave up after {args.timeout:.0f} s")
            break
        dead = [p.name for p in stack.procs.values() if not p.alive()]
        if dead:
            report.notes.append(f"NOTE: process(es) exited during the run: {', '.join(dead)}")
            break
        time.sleep(POLL_SECONDS)
    POLLING.clear()
    cpu_end = CpuSnapshot.take(stack)
    stats_end = pg_stats(conn, db_name)
    final = samples[-1]
    log(f"done at t={final.t:.1f} s; checking")

    # -- precise times from the rows' own timestamps -----------------------------------------------
    def one(sql: str, **params: Any) -> Any:
        return conn.execute(text(sql), {"a": ACTION, "g": group["uuid"], **params}).one()

    fire_row = conn.execute(
        text('SELECT "fireTime", "createDate", done FROM scheduler_fire WHERE "schedulerJobGroupUuid" = :g'),
        {"g": group["uuid"]},
    ).all()
    jobs = one(
        'SELECT count(*), count(DISTINCT "resourceUuid"), min("createDate"), max("createDate"),'
        " count(*) FILTER (WHERE state = 'Succeeded'), count(*) FILTER (WHERE state = 'Failed')"
        " FROM api_job WHERE action = :a"
    )
    hist = one(
        'SELECT count(*), count(DISTINCT "targetResourceUuid"), count(*) FILTER (WHERE success),'
        ' min("createDate"), max("createDate"), count(DISTINCT "executeTime")'
        ' FROM scheduler_job_history WHERE "schedulerJobGroupUuid" = :g'
    )
    twice = one(
        'SELECT count(*) FROM (SELECT "targetResourceUuid" FROM scheduler_job_history'
        ' WHERE "schedulerJobGroupUuid" = :g GROUP BY 1 HAVING count(*) > 1) t'
    )[0]
    backups = one(
        "SELECT count(*), count(DISTINCT \"volumeUuid\"), count(*) FILTER (WHERE status = 'Ready') FROM volume_backup"
    )
    fire_at = datetime.fromtimestamp(fire_epoch, UTC)

    def since(value: datetime | None) -> float | None:
        return None if value is None else (aware(value) - fire_at).total_seconds()

    enq_last = since(jobs[3])
    hist_first, hist_last = since(hist[3]), since(hist[4])
    report.add("targets", n)
    report.add("workers x concurrency / beats", f"{args.workers} x {args.concurrency} / {args.beats}")
    report.add("volume files made", fmt_s(made))
    report.add("volumes registered (API, threads)", f"{registered:.1f} s, {n / registered:.0f}/s")
    report.add("targets added (add_targets)", f"{targeted:.1f} s, {n / targeted:.0f}/s")
    report.add("fire rows (scheduler_fire)", len(fire_row), len(fire_row) == 1)
    if fire_row:
        report.add("  fire row written after fire time", fmt_s(since(fire_row[0][1])))
        report.add("  fire row done", fire_row[0][2])
    report.add("first API job created after fire", fmt_s(since(jobs[2])))
    report.add("last API job's createDate after fire", fmt_s(enq_last))
    if jobs[2] and jobs[3] and jobs[0] > 1:
        span = (aware(jobs[3]) - aware(jobs[2])).total_seconds()
        report.add("  createDate first..last", f"{span:.1f} s")
    report.add(
        f"all {n} API job rows visible (poll, target {args.enqueue_target:.0f} s)",
        fmt_s(enqueued_at),
        enqueued_at is not None and enqueued_at <= args.enqueue_target,
    )
    if enqueued_at:
        report.add("  enqueue rate (fire..all visible)", f"{n / enqueued_at:.0f} jobs/s")
    report.add("first history row after fire", fmt_s(hist_first))
    report.add("last history row after fire", fmt_s(hist_last), hist[0] >= n)
    if hist_last and hist_first is not None and hist[0] > 1:
        report.add("history throughput (fire..last)", f"{hist[0] / max(hist_last, 1e-6):.1f} rows/s")
        report.add("history throughput (first..last)", f"{hist[0] / max(hist_last - hist_first, 1e-6):.1f} rows/s")
        report.add(
            f"all {n} backups done (history, goal {args.total_target:.0f} s)",
            fmt_s(hist_last),
            hist_last <= args.total_target,
        )
        stamps = [
            aware(row[0])
            for row in conn.execute(
                text('SELECT "createDate" FROM scheduler_job_history WHERE "schedulerJobGroupUuid" = :g ORDER BY 1'),
                {"g": group["uuid"]},
            ).all()
        ]
        window = min(1000, len(stamps) // 2)
        if window > 1:
            first = window / max((stamps[window - 1] - stamps[0]).total_seconds(), 1e-6)
            last = window / max((stamps[-1] - stamps[-window]).total_seconds(), 1e-6)
            report.add(f"rate of the first / last {window} backups", f"{first:.1f} / {last:.1f} per s")
            report.add("  last / first (goal >= 0.8)", f"{last / first:.2f}", last / first >= 0.8)
    report.add("API jobs (action=schedulerJob) == targets", jobs[0], jobs[0] == n)
    report.add("distinct API job targets == targets", jobs[1], jobs[1] == n)
    report.add("API jobs Succeeded / Failed", f"{jobs[4]} / {jobs[5]}", jobs[4] == n)
    report.add("history rows == targets", hist[0], hist[0] == n)
    report.add("distinct history targets == targets", hist[1], hist[1] == n)
    report.add("targets with >1 history row", twice, twice == 0)
    report.add("history rows success=true", hist[2], hist[2] == n)
    report.add("distinct executeTime in history", hist[5], hist[5] == 1)
    report.add("volume_backup rows == targets", backups[0], backups[0] == n)
    report.add("distinct backed-up volumes / Ready", f"{backups[1]} / {backups[2]}", backups[1] == n == backups[2])

    # -- logs --------------------------------------------------------------------------------------
    for beat in beats:
        body = beat.text()
        fired = [m.groups() for line in body.splitlines() if (m := FIRED_RE.match(line))]
        resumed = sum(1 for line in body.splitlines() if RESUMED_RE.match(line))
        jobs_by = sum(int(f[4]) for f in fired if f[1] == group["uuid"])
        when = ", ".join(f"{f[0][11:]} jobs={f[4]}" for f in fired if f[1] == group["uuid"]) or "-"
        report.add(f"{beat.name}: scheduler.fired (log time, jobs)", when)
        report.add(f"{beat.name}: jobs it created / resume_fire lines", f"{jobs_by} / {resumed}")
        errors = body.count("Traceback") + body.count("beat.tick_failed")
        if errors:
            report.add(f"{beat.name}: tracebacks / tick_failed", errors, False)
    counts: collections.Counter[str] = collections.Counter()
    for name, proc in stack.procs.items():
        if name.startswith("worker"):
            body = proc.text()
            for word in ("job.requeued", "job.skipped", "host.disconnected", "job.failed", "job.crashed"):
                counts[word] += body.count(word)
            counts["Traceback"] += body.count("Traceback")
    report.add("worker logs: job.requeued (re-sent tasks)", counts["job.requeued"])
    report.add("worker logs: job.skipped (duplicate deliveries)", counts["job.skipped"])
    report.add("worker logs: host.disconnected", counts["host.disconnected"], counts["host.disconnected"] == 0)
    report.add(
        "worker logs: job.failed / crashed / Traceback",
        f"{counts['job.failed']} / {counts['job.crashed']} / {counts['Traceback']}",
    )
    leftovers = rindex.queues()
    report.add("broker messages left (queue: n)", ", ".join(f"{k[:13]}: {v}" for k, v in leftovers.items()) or "none")
    deltas = {k: stats_end[k] - stats0[k] for k in stats0}
    report.add(
        "PostgreSQL commits / inserts (fire..end)",
        f"{deltas['xact_commit']} / {deltas['tup_inserted']}" if not conn.outages else "n/a (server restarted)",
    )
    if stats_enq is not None:
        enq = {k: stats_enq[k] - stats0[k] for k in stats0}
        report.add(
            "  during enqueue (all processes): commits", f"{enq['xact_commit']} ({enq['xact_commit'] / n:.1f}/target)"
        )
    report.notes.append("")
    report.notes.append("CPU (user+system s, average % of one core):")
    windows = [("fire..end", cpu0, cpu_end)]
    if cpu_enq is not None:
        windows.insert(0, ("fire..enqueued", cpu0, cpu_enq))
    for label, start, end in windows:
        report.notes.append(f"  {label} ({end.at - start.at:.1f} s wall, {psutil.cpu_count()} cores):")
        report.notes += [f"    {who:<32} {used:8.1f} s  {pct:6.1f} %" for who, used, pct in cpu_rows(start, end)]
    beat_spies = [spy for spy in spies if spy not in worker_spies]
    if beat_spies:
        report.notes.append("")
        report.notes.append("beat profile (py-spy, inside scheduled_runs.fire, inclusive):")
        for spy in beat_spies:
            report.notes += spy.summary()
    for spy in worker_spies:
        spy.stop()
        report.notes.append("")
        report.notes.append(
            f"worker profile from t={args.profile_workers[0]:.0f} s for {args.profile_workers[1]:.0f} s"
            " (py-spy --subprocesses, CPU only):"
        )
        report.notes += spy.cpu_summary()
    report.notes.append("")
    report.notes += timeline(conn, group["uuid"], fire_at, stack)
    for at, lasted in conn.outages:
        report.notes.append(
            f"NOTE: PostgreSQL was unreachable at t={at:.0f} s for {lasted:.0f} s (restarted by others?)"
        )
    if args.fire_profile:
        log(f"in-process fire profile of {args.fire_profile} targets")
        report.notes.append("")
        report.notes += fire_profile(
            stack.database_url, rindex.url, "profile", volumes[: args.fire_profile], storage["uuid"]
        )


if __name__ == "__main__":
    sys.exit(main())
