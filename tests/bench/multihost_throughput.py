#!/usr/bin/env python3
"""Benchmark concurrent backups with 1, 2 and 4 host workers, each in its own network namespace.

Run by ``make bench-hosts`` (as root: it makes network namespaces) as::

    .venv/bin/python tests/bench/multihost_throughput.py [--hosts 1,2,4] [--volumes-per-host 2]
        [--size-mib 256] [--repeat 3] [--wait-idle 120] [--workdir DIR] [--keep] [--json FILE]

What it does:

1. writes ``max(hosts) x volumes-per-host`` raw volumes of ``--size-mib`` with the layout and
   bytes of ``tests/conftest.py``'s ``vm_like_regions`` (1-3 MiB regions: about 35 % holes,
   35 % text-like, 30 % random; a different seed per volume);
2. for each host count N, one deployment: a fresh catalog database (named like the test
   fixtures', so a killed run's is dropped by the next test session) and Redis database index
   (claimed as the fixtures claim them), the API in the root namespace and N workers
   (``--concurrency 1``, as ``tests/service/conftest.py``'s ``Stack.start_worker``: one backup at
   a time per host; the engine itself hashes and compresses on two threads per core), each in a
   namespace of its own made by ``tests/harness/netns.py``, reaching PostgreSQL and Redis
   through forwarders on its veth; host i gets volumes 2i, 2i+1, ...;
3. ``--repeat`` times: a new, empty file ImageStore in the work folder (all namespaces share the
   filesystem, so workers write it directly; no storage traffic crosses a link), every volume
   read once (the page cache holds them all: the benchmark measures the backup pipeline and
   the CPUs, not the disk), then every backup requested at once (``mode=full`` into that
   storage, one API request each, back to back), each job polled every 0.1 s until Ready.

Per host count, of the median run (and the range of all runs): wall seconds from just before
the first request to the last Ready; total logical bytes (sum of the volume sizes) over that
time, and its ratio to the 1-host figure; per host, its bytes over the time to its own last
Ready; bytes stored (``bytesWritten``); how busy the machine's CPUs were meanwhile (all of
them, from ``/proc/stat``: other work on the machine counts too, so each run first waits up to
``--wait-idle`` seconds for the CPUs to be 90 % idle; the lowest idle share seen over the 2 s
before a run's requests is printed). Nothing here is a target or a threshold. Exit status 0
when every backup was Ready, 1 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make ``tests`` importable
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402
from sqlalchemy import text  # noqa: E402

from shared.catalog import db  # noqa: E402
from tests.conftest import MiB, vm_like_regions, write_regions  # noqa: E402
from tests.harness import netns  # noqa: E402
from tests.multihost.conftest import HostsStack  # noqa: E402
from tests.services import (  # noqa: E402
    _CLAIMS,
    DB_PREFIX,
    _drop_database,
    _pg_base_url,
    _pg_engine,
    _redis_base_url,
    _redis_client,
    _render,
)

POLL = 0.1
JOB_TIMEOUT = 1800.0


@dataclass
class Run:
    """One measurement: every backup requested at once, into a fresh storage."""

    wall_seconds: float = 0.0
    cpu_busy: float = 0.0  # share of all CPUs, 0..1, over the wall time
    idle_before: float = 0.0  # share of all CPUs idle over the 2 s before the requests
    stored_bytes: int = 0
    per_host: list[dict[str, Any]] = field(default_factory=list)  # host, bytes, seconds


@dataclass
class Round:
    """One deployment with ``hosts`` workers, measured ``len(runs)`` times."""

    hosts: int
    backups: int = 0
    logical_bytes: int = 0
    runs: list[Run] = field(default_factory=list)
    error: str = ""

    def rate(self, run: Run) -> float:
        return self.logical_bytes / run.wall_seconds if run.wall_seconds else 0.0

    @property
    def median(self) -> Run:
        ordered = sorted(self.runs, key=self.rate)
        return ordered[len(ordered) // 2]


def cpu_busy_since(before: Any) -> float:
    after = psutil.cpu_times()
    total = sum(after) - sum(before)
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0.0) - getattr(before, "iowait", 0.0))
    return max(0.0, 1 - idle / total) if total > 0 else 0.0


@contextlib.contextmanager
def catalog_and_broker() -> Iterator[tuple[str, str]]:
    """A fresh migrated PostgreSQL database and a claimed Redis database index, as the test
    fixtures of ``tests/services.py`` make them (same names and claims), removed afterwards."""
    base = _pg_base_url()
    name = f"{DB_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}"
    engine = _pg_engine(base)
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    url = _render(base.set(database=name))
    redis_base = _redis_base_url()
    index = _CLAIMS.claim(redis_base)
    try:
        db.migrate(url)
        with _redis_client(redis_base, index) as client:
            client.flushdb()
        yield url, f"{redis_base}/{index}"
    finally:
        db.engine(url).dispose()
        _drop_database(base, name)
        with contextlib.suppress(Exception), _redis_client(redis_base, index) as client:
            client.flushdb()
        _CLAIMS.release(redis_base, index)


def make_volumes(folder: Path, count: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"vol-{i}.raw"
        if not (path.exists() and path.stat().st_size == size):
            write_regions(path, size, vm_like_regions(size, seed=100 + i))
        paths.append(path)
    return paths


def warm(paths: Sequence[Path]) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(8 * MiB):
                pass


def idle_share(seconds: float = 2.0) -> float:
    before = psutil.cpu_times()
    time.sleep(seconds)
    return 1 - cpu_busy_since(before)


def wait_idle(limit: float, wanted: float = 0.9) -> float:
    """Up to ``limit`` seconds for the CPUs to be ``wanted`` idle (other work on the machine)."""
    deadline = time.monotonic() + limit
    idle = idle_share()
    while idle < wanted and time.monotonic() < deadline:
        idle = idle_share()
    return idle


def run_round(n: int, volumes: list[list[Path]], workdir: Path, args: argparse.Namespace) -> Round:
    result = Round(hosts=n)
    folder = workdir / f"hosts-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with catalog_and_broker() as (database_url, broker_url), netns.Network(folder / "net") as network:
        stack = HostsStack(folder, database_url, broker_url, network)
        try:
            stack.start_api()
            hosts = stack.start_hosts([network.add() for _ in range(n)])
            registered = [
                (host, path, stack.client.register_volume(host, str(path), name=path.stem)["uuid"])
                for host, paths in zip(hosts, volumes, strict=False)
                for path in paths
            ]
            result.backups = len(registered)
            result.logical_bytes = sum(path.stat().st_size for _, path, _ in registered)
            for repeat in range(args.repeat):
                # a fresh, empty storage each time: every backup is full and stores every chunk
                store = stack.client.add_backup_storage(f"store-{repeat}", f"file://{folder / f'store-{repeat}'}")
                result.runs.append(measure(stack, hosts, registered, store["uuid"], args.wait_idle))
        finally:
            stack.stop_all()
    return result


def measure(
    stack: HostsStack, hosts: list[str], registered: list[tuple[str, Path, str]], storage: str, idle_wait: float
) -> Run:
    run = Run()
    warm([path for _, path, _ in registered])
    run.idle_before = wait_idle(idle_wait)
    cpu = psutil.cpu_times()
    start = time.monotonic()
    jobs = [
        (host, path, stack.client.backup_volume(volume, mode="full", backupStorageUuid=storage))
        for host, path, volume in registered
    ]

    def wait(job: str) -> tuple[dict[str, Any], float]:
        backup = stack.client.wait(job, timeout=JOB_TIMEOUT, poll=POLL)
        return backup, time.monotonic() - start

    with ThreadPoolExecutor(len(jobs)) as pool:
        ended = list(pool.map(wait, [job for _, _, job in jobs]))
    run.wall_seconds = max(seconds for _, seconds in ended)
    run.cpu_busy = cpu_busy_since(cpu)
    not_ready = [backup for backup, _ in ended if backup.get("status") != "Ready"]
    if not_ready:
        raise RuntimeError(f"backups not Ready: {not_ready}")
    run.stored_bytes = sum(
        int((backup.get("stats") or {}).get("bytesWritten") or backup.get("bytesWritten") or 0) for backup, _ in ended
    )
    for host in hosts:
        mine = [(path, seconds) for (h, path, _), (_, seconds) in zip(jobs, ended, strict=True) if h == host]
        run.per_host.append(
            {
                "host": host,
                "bytes": sum(path.stat().st_size for path, _ in mine),
                "seconds": max(seconds for _, seconds in mine),
            }
        )
    return run


def table(rounds: list[Round], args: argparse.Namespace) -> str:
    good = [r for r in rounds if not r.error and r.runs]
    one = next((r for r in good if r.hosts == 1), None)
    base = one.rate(one.median) if one else 0.0
    lines = [
        f"multihost_throughput: {args.volumes_per_host} volumes x {args.size_mib} MiB per host (VM-like data, "
        f"page-cached), file ImageStore, one worker per host in its own netns (--concurrency 1), "
        f"{psutil.cpu_count()} CPUs, {args.repeat} runs per host count (median run shown, MiB/s range of all)",
        "",
        f"{'hosts':>5}  {'backups':>7}  {'MiB':>5}  {'stored MiB':>10}  {'wall s':>6}  {'MiB/s':>6}  "
        f"{'range MiB/s':>11}  {'x 1 host':>8}  {'idle before':>11}  {'CPU busy':>8}  per host MiB/s",
    ]
    for r in rounds:
        if r.error or not r.runs:
            lines.append(f"{r.hosts:>5}  failed: {r.error.strip().splitlines()[-1] if r.error else 'no run'}")
            continue
        run = r.median
        rates = [r.rate(x) / MiB for x in r.runs]
        per_host = "  ".join(f"{h['bytes'] / MiB / h['seconds']:.1f}" for h in run.per_host)
        ratio = f"{r.rate(run) / base:.2f}" if base else "-"
        lines.append(
            f"{r.hosts:>5}  {r.backups:>7}  {r.logical_bytes / MiB:>5.0f}  {run.stored_bytes / MiB:>10.1f}  "
            f"{run.wall_seconds:>6.2f}  {r.rate(run) / MiB:>6.1f}  {f'{min(rates):.0f}-{max(rates):.0f}':>11}  "
            f"{ratio:>8}  {min(x.idle_before for x in r.runs):>11.0%}  {run.cpu_busy:>8.0%}  {per_host}"
        )
    if len(good) >= 2 and base:
        best = max(good, key=lambda r: r.rate(r.median))
        lines.append("")
        lines.append(
            f"highest total: {best.rate(best.median) / MiB:.1f} MiB/s with {best.hosts} host(s); "
            + ", ".join(f"{r.hosts} -> {r.rate(r.median) / base:.2f}x" for r in good)
            + f" of 1 host, on {psutil.cpu_count()} CPUs"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hosts", default="1,2,4", help="host counts to run, comma-separated (default 1,2,4)")
    parser.add_argument("--volumes-per-host", type=int, default=2)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="measurements per host count (default 3)")
    parser.add_argument("--workdir", type=Path, help="default: a new folder under $TMPDIR")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=120.0,
        help="before each round, wait up to this many seconds for the CPUs to be 90%% idle (default 120)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (volumes, logs, stores)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(c) for c in args.hosts.split(",") if c.strip()]
    try:
        netns.cleanup_leftovers()
        netns.preflight()
    except netns.NetnsError as exc:
        print(f"multihost_throughput: {exc}", file=sys.stderr)
        return 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bv-bench-hosts-"))
    rounds: list[Round] = []
    try:
        paths = make_volumes(workdir / "volumes", max(counts) * args.volumes_per_host, args.size_mib * MiB)
        per_host = [paths[i * args.volumes_per_host : (i + 1) * args.volumes_per_host] for i in range(max(counts))]
        for n in counts:
            try:
                rounds.append(run_round(n, per_host[:n], workdir, args))
            except Exception:  # noqa: BLE001 - reported in the table, the other rounds still run
                rounds.append(Round(hosts=n, error=traceback.format_exc()))
                print(rounds[-1].error, file=sys.stderr)
        print(table(rounds, args))
        if args.json:
            figures = [{**asdict(r), "rates": [r.rate(x) for x in r.runs]} for r in rounds]
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work folder kept: {workdir}")
    return 0 if rounds and not any(r.error for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
