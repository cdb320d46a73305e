#!/usr/bin/env python3
"""Benchmark the REST query routes (``GET /v1/<collection>``) on a catalog of realistic size.

Run as::

    .venv/bin/python tests/bench/api_query.py [--histories 1000000] [--backups 100000] [--keep-db]
        [--runs 200] [--warmup 20] [--explain-all] [--what-if-all] [--no-what-if] [--target-ms 50]

What it does:

1. creates a fresh PostgreSQL database ``bv_bench_<random>``, runs ``migrate(url)`` and bulk-loads
   (``COPY``) hosts, volumes, backup storages, volume backups with their storage references,
   scheduler job groups / jobs / triggers, job histories and tags; the secondary indexes of the
   big tables are dropped during the load and recreated exactly as the migrations made them,
   then ``VACUUM (ANALYZE)``;
2. starts the API (``uvicorn api.app:create_app --factory``) as a subprocess on that database and
   times typical queries through it with a keep-alive ``httpx`` client, alternating each HTTP
   request with the same kind of query run in this process through ``parse_rest`` + ``run_query``
   on a Session ("direct": no HTTP, no auth, no serialisation) — every run draws fresh uuids,
   tags and time windows from the loaded data;
3. prints p50 / p95 / p99 (ms) of both, the rows returned, whether the HTTP p95 meets the target
   and how much CPU other processes used meanwhile ("others", in CPUs: noise); a breakdown of a
   request's time; for every query that misses (every query with ``--explain-all``)
   ``EXPLAIN (ANALYZE, BUFFERS)`` of each statement ``run_query`` emitted (captured with
   ``before_cursor_execute``); then a what-if for every miss (every query with
   ``--what-if-all``) that has candidate indexes: they are created, the query re-measured and
   explained, and the indexes dropped again;
4. drops the database unless ``--keep-db``.

A query measured while PostgreSQL went away or restarted (other tests on the same server may
restart it) is measured again from its warm-up. Not a pytest test: it needs a PostgreSQL server
(``--pg``, default ``postgresql://postgres@127.0.0.1:5432``) and takes minutes at full size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg2
from sqlalchemy import event, select
from sqlalchemy.exc import DBAPIError
from starlette.responses import JSONResponse

from api.auth import authenticate
from shared.catalog import db
from shared.catalog.models import QUERYABLE
from shared.catalog.query import parse_rest, run_query
from shared.errors import CatalogUnavailable
from shared.inventory import inventories

ROOT = Path(__file__).resolve().parents[2]
TARGET_MS = 50.0
YEAR = 365 * 86400
ADMIN_KEY = "bv_bench_" + secrets.token_urlsafe(24)
BIG_TABLES = ("volume_backup", "volume_backup_storage_ref", "scheduler_job_history", "tag")

TAG_WORDS = (
    "prod",
    "staging",
    "dev",
    "keep",
    "legal-hold",
    "weekly",
    "monthly",
    "quarterly",
    "pre-upgrade",
    "post-upgrade",
    "db",
    "web",
    "cache",
    "analytics",
    "team-alpha",
    "team-beta",
    "team-gamma",
    "finance",
    "hr",
    "crm",
    "erp",
    "gold",
    "silver",
    "bronze",
    "verified",
    "offsite",
    "encrypted",
    "golden-image",
    "migration",
    "audit-2025",
)


# -- helpers -------------------------------------------------------------------------------------
def uid(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def ts(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def iso_z(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (``values`` need not be sorted)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def copy_value(value: object) -> str:
    if value is None:
        return r"\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value)


def copy_rows(
    cur: Any, table: str, columns: Sequence[str], rows: Iterable[Sequence[object]], chunk: int = 50_000
) -> int:
    """``COPY table (columns) FROM STDIN`` in chunks; values must hold no tab, newline or backslash."""
    quoted = ", ".join(f'"{column}"' for column in columns)
    sql = f"COPY {table} ({quoted}) FROM STDIN"
    buffer = io.StringIO()
    pending = total = 0
    for row in rows:
        buffer.write("\t".join(copy_value(v) for v in row))
        buffer.write("\n")
        pending += 1
        if pending >= chunk:
            buffer.seek(0)
            cur.copy_expert(sql, buffer)
            total += pending
            buffer, pending = io.StringIO(), 0
    if pending:
        buffer.seek(0)
        cur.copy_expert(sql, buffer)
        total += pending
    return total


def sql_at(dsn: str, sql: str, params: Sequence[object] = (), retry_seconds: float = 0.0) -> list[Any]:
    """Run ``sql`` in autocommit on a fresh connection to ``dsn``, retrying connection failures
    for ``retry_seconds`` (the server may be restarting)."""
    deadline = time.monotonic() + retry_seconds
    while True:
        try:
            conn = psycopg2.connect(dsn)
            try:
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(sql, params or None)
                    return cur.fetchall() if cur.description else []
            finally:
                conn.close()
        except psycopg2.OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- data ----------------------------------------------------------------------------------------
@dataclass
class Pools:
    """What the loaded data offers the queries to pick from."""

    volumes: list[str] = field(default_factory=list)  # volumes with at least one backup
    storages: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    backup_tags: list[str] = field(default_factory=list)  # user-tag values present on volume backups
    start: float = 0.0
    end: float = 0.0


def load(dsn: str, args: argparse.Namespace) -> Pools:
    rng = random.Random(args.seed)
    end = time.time()
    start = end - YEAR
    pools = Pools(start=start, end=end)
    conn = psycopg2.connect(dsn)
    conn.autocommit = False
    cur = conn.cursor()

    # Secondary indexes of the big tables: dropped for the load, recreated as the migration made them.
    cur.execute(
        """SELECT indexname, indexdef FROM pg_indexes i
           WHERE schemaname = 'public' AND tablename = ANY(%s)
             AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)""",
        (list(BIG_TABLES),),
    )
    saved_indexes = cur.fetchall()
    for name, _definition in saved_indexes:
        cur.execute(f'DROP INDEX "{name}"')

    def stamp(epoch: float) -> tuple[str, str]:
        return ts(epoch), ts(epoch)

    t0 = time.perf_counter()
    # hosts
    hosts = [uid(rng) for _ in range(args.hosts)]
    copy_rows(
        cur,
        "host",
        (
            "uuid",
            "name",
            "managementIp",
            "hostname",
            "state",
            "status",
            "lastHeartbeat",
            "createDate",
            "lastOpDate",
        ),
        (
            (
                h,
                f"kvm-{i:03d}",
                f"10.0.{i // 250}.{i % 250 + 1}",
                f"kvm-{i:03d}.dc1",
                "Enabled",
                "Connected",
                ts(end),
                *stamp(start - 86400 * rng.uniform(30, 400)),
            )
            for i, h in enumerate(hosts)
        ),
    )
    # volumes (no VM rows: vmInstanceUuid stays null, which its foreign key allows)
    volumes = [uid(rng) for _ in range(args.volumes)]
    copy_rows(
        cur,
        "volume",
        (
            "uuid",
            "name",
            "hostUuid",
            "projectUuid",
            "type",
            "format",
            "installPath",
            "size",
            "state",
            "status",
            "createDate",
            "lastOpDate",
        ),
        (
            (
                v,
                f"vol-{i:05d}",
                rng.choice(hosts),
                None,
                "Root" if rng.random() < 0.4 else "Data",
                "qcow2" if rng.random() < 0.7 else "raw",
                f"/var/lib/zstack/volumes/{v}.qcow2",
                rng.choice((20, 40, 100, 200, 500)) << 30,
                "Enabled",
                "Ready",
                *stamp(start - 86400 * rng.uniform(1, 300)),
            )
            for i, v in enumerate(volumes)
        ),
    )
    # backup storages
    storages = [uid(rng) for _ in range(args.storages)]
    copy_rows(
        cur,
        "backup_storage",
        (
            "uuid",
            "name",
            "type",
            "url",
            "role",
            "state",
            "status",
            "totalCapacity",
            "availableCapacity",
            "createDate",
            "lastOpDate",
        ),
        (
            (
                s,
                f"bs-{i}",
                "ImageStore",
                f"sftp://backup-{i}.dc1/bv",
                "master" if i == 0 else "slave",
                "Enabled",
                "Connected",
                200 << 40,
                80 << 40,
                *stamp(start - 86400 * 400),
            )
            for i, s in enumerate(storages)
        ),
    )
    pools.storages = storages
    print(f"  hosts/volumes/storages: {time.perf_counter() - t0:.1f}s", flush=True)

    # volume backups: per-volume chains (a full every 7th, else incremental on the previous one),
    # frequency skewed per volume (lognormal), spread over the year; inserted in time order.
    t0 = time.perf_counter()
    weights = [rng.lognormvariate(0, 0.8) for _ in volumes]
    per_volume = Counter(rng.choices(range(len(volumes)), weights=weights, k=args.backups))
    storage_weights = [5, 3, 2, 1, 1][: len(storages)] + [1] * max(0, len(storages) - 5)
    backups: list[tuple[float, str, int, str, str | None]] = []  # (time, uuid, volume index, mode, parent)
    for index, n in per_volume.items():
        times = sorted(rng.uniform(start, end) for _ in range(n))
        previous: str | None = None
        for position, when in enumerate(times):
            backup = uid(rng)
            mode = "full" if position % 7 == 0 else "incremental"
            backups.append((when, backup, index, mode, None if mode == "full" else previous))
            previous = backup
    backups.sort()
    statuses = ("Ready", "Failed", "Creating", "Deleting")
    status_weights = (95, 3, 1, 1)
    group_of_volume = {i: (uid(rng) if rng.random() < 0.3 else None) for i in range(len(volumes))}
    # One scheduler job per target volume (made below); newer schemas record the job that made a backup.
    job_rng = random.Random(args.seed + 1)
    job_uuids = [uid(job_rng) for _ in range(args.targets)]
    job_of_volume = {i % len(volumes): job for i, job in enumerate(job_uuids)}
    cur.execute(
        "SELECT 1 FROM information_schema.columns"
        " WHERE table_name = 'volume_backup' AND column_name = 'schedulerJobUuid'"
    )
    with_job = cur.fetchone() is not None

    def backup_rows() -> Iterator[tuple[object, ...]]:
        for when, backup, index, mode, parent in backups:
            volume = volumes[index]
            group = group_of_volume[index]
            yield (
                backup,
                f"auto-{volume[:8]}-{iso_z(when)}",
                volume,
                "Data",
                mode,
                parent,
                (f"{group[:24]}{int(when) // 86400:08x}" if group else None),
                json.dumps({"chunks": rng.randint(100, 50000), "compression": "zstd"}),
                rng.randint(1 << 20, 200 << 30),
                "Enabled" if rng.random() < 0.98 else "Disabled",
                rng.choices(statuses, status_weights)[0],
                *stamp(when),
                *((job_of_volume.get(index) if rng.random() < 0.9 else None,) if with_job else ()),
            )

    count = copy_rows(
        cur,
        "volume_backup",
        (
            "uuid",
            "name",
            "volumeUuid",
            "type",
            "mode",
            "parentUuid",
            "groupUuid",
            "metadata",
            "size",
            "state",
            "status",
            "createDate",
            "lastOpDate",
            *(("schedulerJobUuid",) if with_job else ()),
        ),
        backup_rows(),
    )

    def ref_rows() -> Iterator[tuple[object, ...]]:
        for when, backup, _index, _mode, _parent in backups:
            copies = rng.choices((1, 2, 3), (6, 3, 1))[0]
            first = rng.choices(storages, storage_weights)[0]
            chosen = [first, *rng.sample([s for s in storages if s != first], min(copies, len(storages)) - 1)]
            for storage in chosen:
                yield (
                    backup,
                    storage,
                    f"sftp://bs/{storage[:8]}/{backup}",
                    "Ready" if rng.random() < 0.97 else "Failed",
                    *stamp(when + rng.uniform(1, 3600)),
                )

    refs = copy_rows(
        cur,
        "volume_backup_storage_ref",
        ("volumeBackupUuid", "backupStorageUuid", "installPath", "status", "createDate", "lastOpDate"),
        ref_rows(),
    )
    pools.volumes = [volumes[i] for i in per_volume]
    print(f"  volume backups: {count} rows, {refs} storage refs: {time.perf_counter() - t0:.1f}s", flush=True)

    # scheduling: groups (one trigger each), one job per target volume, histories in time order.
    t0 = time.perf_counter()
    groups = [uid(rng) for _ in range(args.groups)]
    triggers = [uid(rng) for _ in groups]
    copy_rows(
        cur,
        "scheduler_job_group",
        ("uuid", "name", "jobType", "jobData", "state", "createDate", "lastOpDate"),
        (
            (g, f"policy-{i}", "volumeBackup", json.dumps({"retention": 30}), "Enabled", *stamp(start - 86400))
            for i, g in enumerate(groups)
        ),
    )
    copy_rows(
        cur,
        "scheduler_trigger",
        ("uuid", "name", "schedulerType", "schedulerInterval", "cron", "timeZone", "state", "createDate", "lastOpDate"),
        (
            (t, f"trigger-{i}", "cron", None, f"0 {i % 24} * * *", "UTC", "Enabled", *stamp(start - 86400))
            for i, t in enumerate(triggers)
        ),
    )
    copy_rows(
        cur,
        "scheduler_job_group_trigger_ref",
        ("schedulerJobGroupUuid", "schedulerTriggerUuid", "createDate", "lastOpDate"),
        ((g, t, *stamp(start - 86400)) for g, t in zip(groups, triggers, strict=True)),
    )
    targets = [volumes[i % len(volumes)] for i in range(args.targets)]
    jobs = [(job_uuids[i], i % len(groups), targets[i]) for i in range(args.targets)]
    copy_rows(
        cur,
        "scheduler_job",
        (
            "uuid",
            "name",
            "schedulerJobGroupUuid",
            "targetResourceUuid",
            "jobType",
            "state",
            "createDate",
            "lastOpDate",
        ),
        (
            (job, f"job-{i}", groups[g], target, "volumeBackup", "Enabled", *stamp(start - 86400))
            for i, (job, g, target) in enumerate(jobs)
        ),
    )
    failure_rate = [min(0.6, rng.betavariate(1, 19)) for _ in jobs]
    times = sorted(rng.uniform(start, end) for _ in range(args.histories))

    def history_rows() -> Iterator[tuple[object, ...]]:
        for when in times:
            j = rng.randrange(len(jobs))
            job, g, target = jobs[j]
            ok = rng.random() >= failure_rate[j]
            done = when + rng.uniform(2, 900)
            yield (
                ts(when),
                f'{{"jobUuid":"{job}","volumeUuid":"{target}","mode":"auto"}}',
                (
                    f'{{"backupUuid":"{uid(rng)}","size":{rng.randint(1, 1 << 34)}}}'
                    if ok
                    else '{"error":{"code":"HOST_DISCONNECTED","description":"host did not answer"}}'
                ),
                ok,
                groups[g],
                job,
                target,
                triggers[g],
                ts(done),
                ts(done),
            )

    count = copy_rows(
        cur,
        "scheduler_job_history",
        (
            "executeTime",
            "requestDump",
            "resultDump",
            "success",
            "schedulerJobGroupUuid",
            "schedulerJobUuid",
            "targetResourceUuid",
            "triggerUuid",
            "createDate",
            "lastOpDate",
        ),
        history_rows(),
    )
    pools.groups = groups
    pools.targets = sorted(set(targets))
    print(f"  scheduler + histories: {count} rows: {time.perf_counter() - t0:.1f}s", flush=True)

    # tags: user tags on volume backups (zipf-ish vocabulary) and volumes, some system tags.
    t0 = time.perf_counter()
    word_weights = [1 / (i + 1) for i in range(len(TAG_WORDS))]
    tagged: set[tuple[str, str]] = set()
    tag_rows: list[tuple[object, ...]] = []
    backup_tag_values: set[str] = set()
    while len(tag_rows) < args.tags:
        on_backup = rng.random() < 0.85
        resource = rng.choice(backups)[1] if on_backup else rng.choice(volumes)
        word = rng.choices(TAG_WORDS, word_weights)[0]
        if (resource, word) in tagged:
            continue
        tagged.add((resource, word))
        if on_backup:
            backup_tag_values.add(word)
        kind = "VolumeBackupVO" if on_backup else "VolumeVO"
        tag_rows.append((uid(rng), resource, kind, word, "user", *stamp(rng.uniform(start, end))))
    for _ in range(args.tags // 3):
        resource = rng.choice(backups)[1]
        tag_rows.append(
            (uid(rng), resource, "VolumeBackupVO", "retention::30d", "system", *stamp(rng.uniform(start, end)))
        )
    copy_rows(cur, "tag", ("uuid", "resourceUuid", "resourceType", "tag", "type", "createDate", "lastOpDate"), tag_rows)
    pools.backup_tags = sorted(backup_tag_values)
    print(f"  tags: {len(tag_rows)} rows: {time.perf_counter() - t0:.1f}s", flush=True)

    t0 = time.perf_counter()
    for _name, definition in saved_indexes:
        cur.execute(definition)
    conn.commit()
    print(f"  recreated {len(saved_indexes)} indexes: {time.perf_counter() - t0:.1f}s", flush=True)
    t0 = time.perf_counter()
    conn.autocommit = True
    cur.execute("VACUUM (ANALYZE)")
    print(f"  VACUUM (ANALYZE): {time.perf_counter() - t0:.1f}s", flush=True)
    cur.execute(
        """SELECT relname, n_live_tup, pg_size_pretty(pg_total_relation_size(relid))
           FROM pg_stat_user_tables WHERE relname = ANY(%s) ORDER BY relname""",
        (list(BIG_TABLES),),
    )
    for name, rows, size in cur.fetchall():
        print(f"    {name:<28} {rows:>10} rows {size:>10}")
    conn.close()
    return pools


# -- queries -------------------------------------------------------------------------------------
Params = list[tuple[str, str]]


@dataclass(frozen=True)
class QueryDef:
    name: str
    path: str
    make: Callable[[random.Random, Pools], Params]
    candidates: tuple[str, ...] = ()
    """Index DDL that should fix the query if it misses (tried in the what-if phase)."""


def _window(rng: random.Random, pools: Pools, days: int) -> tuple[str, str]:
    lo = rng.uniform(pools.start, pools.end - days * 86400)
    return iso_z(lo), iso_z(lo + days * 86400)


QUERIES: tuple[QueryDef, ...] = (
    QueryDef(
        "vb: one volume, -createDate, limit 20",
        "volume-backups",
        lambda r, p: [("q", f"volumeUuid={r.choice(p.volumes)}"), ("sort", "-createDate"), ("limit", "20")],
        ('CREATE INDEX bench_vb_volume_created ON volume_backup ("volumeUuid", "createDate")',),
    ),
    QueryDef(
        "vb: storage ref, limit 50",
        "volume-backups",
        lambda r, p: [("q", f"backupStorageRefs.backupStorageUuid={r.choice(p.storages)}"), ("limit", "50")],
        ('CREATE INDEX bench_vb_created ON volume_backup ("createDate")',),
    ),
    QueryDef(
        "vb: storage ref, limit 50, replyWithCount",
        "volume-backups",
        lambda r, p: [
            ("q", f"backupStorageRefs.backupStorageUuid={r.choice(p.storages)}"),
            ("limit", "50"),
            ("replyWithCount", "true"),
        ],
        (
            'CREATE INDEX bench_vb_created ON volume_backup ("createDate")',
            "CREATE INDEX bench_vbref_storage_backup"
            ' ON volume_backup_storage_ref ("backupStorageUuid", "volumeBackupUuid")',
        ),
    ),
    QueryDef(
        "vb: groupBy=mode",
        "volume-backups",
        lambda r, p: [("groupBy", "mode")],
        ("CREATE INDEX bench_vb_mode ON volume_backup (mode)",),
    ),
    QueryDef(
        "vb: count status=Ready",
        "volume-backups",
        lambda r, p: [("q", "status=Ready"), ("count", "true")],
        ("CREATE INDEX bench_vb_status ON volume_backup (status)",),
    ),
    QueryDef(
        "vb: all, default sort, limit 50 (extra)",
        "volume-backups",
        lambda r, p: [("limit", "50")],
        ('CREATE INDEX bench_vb_created ON volume_backup ("createDate")',),
    ),
    QueryDef(
        "vb: __userTag__=<tag>",
        "volume-backups",
        lambda r, p: [("q", f"__userTag__={r.choice(p.backup_tags)}")],
        ("CREATE INDEX bench_tag_value ON tag (tag, type)",),
    ),
    QueryDef(
        "hist: group, 7-day window, -executeTime, limit 50",
        "scheduler/jobhistories",
        lambda r, p: [
            ("q", f"schedulerJobGroupUuid={r.choice(p.groups)}"),
            *(("q", op + when) for op, when in zip(("executeTime>=", "executeTime<"), _window(r, p, 7), strict=True)),
            ("sort", "-executeTime"),
            ("limit", "50"),
        ],
    ),
    QueryDef(
        "hist: group, since 30 days, -executeTime, limit 50",
        "scheduler/jobhistories",
        lambda r, p: [
            ("q", f"schedulerJobGroupUuid={r.choice(p.groups)}"),
            ("q", f"executeTime>{iso_z(p.end - 30 * 86400)}"),
            ("sort", "-executeTime"),
            ("limit", "50"),
        ],
    ),
    QueryDef(
        "hist: target, -executeTime, limit 50",
        "scheduler/jobhistories",
        lambda r, p: [("q", f"targetResourceUuid={r.choice(p.targets)}"), ("sort", "-executeTime"), ("limit", "50")],
        ('CREATE INDEX bench_hist_target_time ON scheduler_job_history ("targetResourceUuid", "executeTime")',),
    ),
    QueryDef(
        "hist: target, default sort, limit 50",
        "scheduler/jobhistories",
        lambda r, p: [("q", f"targetResourceUuid={r.choice(p.targets)}"), ("limit", "50")],
        ('CREATE INDEX bench_hist_target_created ON scheduler_job_history ("targetResourceUuid", "createDate")',),
    ),
    QueryDef(
        "hist: all, default sort, limit 50 (extra)",
        "scheduler/jobhistories",
        lambda r, p: [("limit", "50")],
        ('CREATE INDEX bench_hist_created ON scheduler_job_history ("createDate")',),
    ),
    QueryDef(
        "hist: all, -executeTime, limit 50 (extra)",
        "scheduler/jobhistories",
        lambda r, p: [("sort", "-executeTime"), ("limit", "50")],
    ),
    QueryDef(
        "hist: count success=false",
        "scheduler/jobhistories",
        lambda r, p: [("q", "success=false"), ("count", "true")],
        ("CREATE INDEX bench_hist_failed ON scheduler_job_history (id) WHERE NOT success",),
    ),
    QueryDef(
        "hist: group, groupBy=success",
        "scheduler/jobhistories",
        lambda r, p: [("q", f"schedulerJobGroupUuid={r.choice(p.groups)}"), ("groupBy", "success")],
        ('CREATE INDEX bench_hist_group_success ON scheduler_job_history ("schedulerJobGroupUuid", success)',),
    ),
)
FLOOR = QueryDef("floor: backup-storage (5 rows)", "backup-storage", lambda r, p: [("fields", "name"), ("limit", "5")])


def split_params(params: Params) -> tuple[list[str], dict[str, str]]:
    return [v for k, v in params if k == "q"], {k: v for k, v in params if k != "q"}


# -- measuring -----------------------------------------------------------------------------------
@dataclass
class Sample:
    http_ms: list[float] = field(default_factory=list)
    direct_ms: list[float] = field(default_factory=list)
    inventory_ms: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    totals: list[int] = field(default_factory=list)
    others_cpu: float = 0.0
    """CPUs used on average by other processes while this was measured (see :class:`CpuWatch`)."""


class Capture:
    """Collects the statements an engine sends while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.statements: list[tuple[str, Any]] = []

    def __call__(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if self.active:
            self.statements.append((statement, parameters))


def http_call(client: httpx.Client, query: QueryDef, params: Params) -> tuple[float, int, int | None]:
    began = time.perf_counter()
    response = client.get(f"/v1/{query.path}", params=params)
    elapsed = (time.perf_counter() - began) * 1000
    if response.status_code == 503:
        raise ServerUnavailable(f"{query.name}: HTTP 503: {response.text[:300]}")
    if response.status_code != 200:
        raise RuntimeError(f"{query.name}: HTTP {response.status_code}: {response.text[:500]}")
    body = response.json()
    return elapsed, len(body.get("inventories", [])), body.get("total")


def direct_call(url: str, query: QueryDef, params: Params) -> tuple[float, float, int, int | None]:
    """(run_query ms, inventories + JSON ms, rows, total), as the route does it minus HTTP and auth."""
    model = QUERYABLE[query.path]
    q, knobs = split_params(params)
    began = time.perf_counter()
    with db.session(url) as session:
        spec = parse_rest(
            q,
            knobs.get("sort"),
            knobs.get("limit"),
            knobs.get("start"),
            knobs.get("count"),
            knobs.get("replyWithCount"),
            knobs.get("fields"),
            knobs.get("groupBy"),
        )
        result = run_query(session, model, spec, base=select(model))
        middle = time.perf_counter()
        if result.groups is not None:
            items: list[Any] = result.groups
        elif spec.count or result.fields:
            items = result.rows
        else:
            items = inventories(session, result.rows)
        JSONResponse({"success": True, "inventories": items, "total": result.total})
    done = time.perf_counter()
    rows = len(result.groups) if result.groups is not None else len(result.rows)
    return (middle - began) * 1000, (done - middle) * 1000, rows, result.total


def measure(client: httpx.Client, url: str, query: QueryDef, pools: Pools, runs: int, warmup: int, seed: int) -> Sample:
    """Alternate one HTTP request and one direct run_query, each with its own random draws."""
    http_rng = random.Random(f"{seed}/{query.name}/http")
    direct_rng = random.Random(f"{seed}/{query.name}/direct")
    sample = Sample()
    for i in range(warmup + runs):
        elapsed, rows, total = http_call(client, query, query.make(http_rng, pools))
        run_ms, inv_ms, _rows, _total = direct_call(url, query, query.make(direct_rng, pools))
        if i >= warmup:
            sample.http_ms.append(elapsed)
            sample.direct_ms.append(run_ms)
            sample.inventory_ms.append(inv_ms)
            sample.rows.append(rows)
            if total is not None:
                sample.totals.append(total)
    return sample


class ServerUnavailable(Exception):
    """The API answered 503 or could not be reached (PostgreSQL restarting, say)."""


def postmaster_start(server: str) -> object:
    return sql_at(f"{server}/postgres", "SELECT pg_postmaster_start_time()", retry_seconds=180)[0][0]


def measure_stable(
    client: httpx.Client, url: str, server: str, query: QueryDef, pools: Pools, args: argparse.Namespace
) -> Sample:
    """:func:`measure`, started again from its warm-up when PostgreSQL went away or restarted
    meanwhile (someone else's tests may restart it: a restart also empties its cache)."""
    for _attempt in range(4):
        started = postmaster_start(server)
        watch = CpuWatch()
        try:
            sample = measure(client, url, query, pools, args.runs, args.warmup, args.seed)
        except (ServerUnavailable, CatalogUnavailable, DBAPIError, httpx.TransportError) as exc:
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            print(f"  ! {detail}; waiting for PostgreSQL, then measuring {query.name} again", flush=True)
            postmaster_start(server)
            continue
        if postmaster_start(server) != started:
            print(f"  ! PostgreSQL restarted while measuring {query.name}; measuring again", flush=True)
            continue
        sample.others_cpu = watch.others()[0]
        return sample
    raise RuntimeError(f"{query.name}: PostgreSQL kept going away; giving up")


def explain(url: str, capture: Capture, query: QueryDef, pools: Pools, seed: int) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of every statement run_query emits for one draw of ``query``."""
    params = query.make(random.Random(f"{seed}/{query.name}/explain"), pools)
    model = QUERYABLE[query.path]
    q, knobs = split_params(params)
    spec = parse_rest(
        q,
        knobs.get("sort"),
        knobs.get("limit"),
        knobs.get("start"),
        knobs.get("count"),
        knobs.get("replyWithCount"),
        knobs.get("fields"),
        knobs.get("groupBy"),
    )
    capture.statements.clear()
    with db.session(url) as session:
        capture.active = True
        try:
            run_query(session, model, spec, base=select(model))
        finally:
            capture.active = False
    out = [f"  params: {params}"]
    statements = [(s, p) for s, p in capture.statements if s.lstrip().upper().startswith("SELECT")]
    with db.engine(url).connect() as conn:
        for number, (statement, parameters) in enumerate(statements, 1):
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
            plan = [row[0] for row in cursor.fetchall()]
            cursor.close()
            one_line = " ".join(statement.split())
            out.append(f"  statement {number}: {one_line[:400]}{'...' if len(one_line) > 400 else ''}")
            out.extend(f"    {line[:240]}{'...' if len(line) > 240 else ''}" for line in plan[:40])
            if len(plan) > 40:
                out.append(f"    ... ({len(plan) - 40} more lines)")
        conn.rollback()
    return out


def auth_floor(url: str, args: argparse.Namespace) -> list[str]:
    """In-process cost of what every request does besides its query: a session whose connection is
    pre-pinged, and ``authenticate`` (2 SELECTs, an UPDATE of ``lastUsedDate``) plus its COMMIT."""
    timings: dict[str, list[float]] = {"session + SELECT 1": [], "session + authenticate() + commit": []}
    for i in range(args.warmup + args.runs):
        began = time.perf_counter()
        with db.session(url) as session:
            session.execute(select(1))
        middle = time.perf_counter()
        with db.session(url) as session:
            authenticate(session, f"Bearer {ADMIN_KEY}")
        done = time.perf_counter()
        if i >= args.warmup:
            timings["session + SELECT 1"].append((middle - began) * 1000)
            timings["session + authenticate() + commit"].append((done - middle) * 1000)
    return [
        f"in-process floor, {name}: p50 {percentile(values, 50):.2f} ms, p95 {percentile(values, 95):.2f} ms"
        for name, values in timings.items()
    ]


def safe_explain(url: str, capture: Capture, query: QueryDef, pools: Pools, seed: int) -> list[str]:
    """:func:`explain`, or a line saying why it failed (the server restarting, say)."""
    try:
        return explain(url, capture, query, pools, seed)
    except (CatalogUnavailable, DBAPIError, psycopg2.Error) as exc:
        return [f"  EXPLAIN failed: {str(exc).strip().splitlines()[0][:200]}"]


# -- the server ----------------------------------------------------------------------------------
@contextlib.contextmanager
def api_server(url: str) -> Iterator[str]:
    port = free_port()
    env = dict(os.environ, BLOCKVAULT_DATABASE_URL=url, BLOCKVAULT_ADMIN_API_KEY=ADMIN_KEY)
    with tempfile.NamedTemporaryFile("w+", prefix="bv_bench_api_", suffix=".log", delete=False) as log:
        log_path = log.name
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the API exited ({process.returncode}):\n{Path(log_path).read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{Path(log_path).read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        errors = Path(log_path).read_text()
        if "Traceback" in errors or "ERROR" in errors:
            print(f"API log ({log_path}) has errors:\n{errors[-3000:]}")
        else:
            Path(log_path).unlink(missing_ok=True)


# -- report --------------------------------------------------------------------------------------
def fmt_rows(sample: Sample) -> str:
    rows = f"{percentile(sample.rows, 50):.0f}"
    if min(sample.rows) != max(sample.rows):
        rows += f" ({min(sample.rows)}-{max(sample.rows)})"
    if sample.totals:
        rows += f" / total ~{percentile(sample.totals, 50):.0f}"
    return rows


def table(results: list[tuple[QueryDef, Sample]], target_ms: float) -> list[str]:
    head = (
        f"{'query':<50} {'HTTP p50':>8} {'p95':>7} {'p99':>7} | {'direct p50':>10} {'p95':>7} {'p99':>7} | "
        f"{f'p95<{target_ms:.0f}ms':>8} | {'others':>6} | rows"
    )
    lines = [head, "-" * len(head)]
    for query, s in results:
        hit = percentile(s.http_ms, 95) < target_ms
        lines.append(
            f"{query.name:<50} {percentile(s.http_ms, 50):>8.1f} {percentile(s.http_ms, 95):>7.1f} "
            f"{percentile(s.http_ms, 99):>7.1f} | {percentile(s.direct_ms, 50):>10.1f} "
            f"{percentile(s.direct_ms, 95):>7.1f} {percentile(s.direct_ms, 99):>7.1f} | "
            f"{'yes' if hit else 'NO':>8} | {s.others_cpu:>6.2f} | {fmt_rows(s)}"
        )
    return lines


def overhead(results: list[tuple[QueryDef, Sample]]) -> list[str]:
    head = f"{'query':<50} {'HTTP':>7} {'run_query':>9} {'inv+JSON':>8} {'rest (auth, HTTP, pool)':>24}"
    lines = ["p50 ms per part of a request:", head, "-" * len(head)]
    for query, s in results:
        http, run, inv = (percentile(x, 50) for x in (s.http_ms, s.direct_ms, s.inventory_ms))
        lines.append(f"{query.name:<50} {http:>7.1f} {run:>9.1f} {inv:>8.1f} {http - run - inv:>24.1f}")
    return lines


class CpuWatch:
    """CPU used by processes other than this benchmark and its API subprocess. PostgreSQL
    backends count when, at the end, they serve another database than ``database`` (backends
    that came and went meanwhile are missed)."""

    server = ""
    database = ""

    def __init__(self) -> None:
        self.load = os.getloadavg()
        self.began = time.monotonic()
        self.before = self._snapshot()

    @staticmethod
    def _snapshot() -> dict[int, tuple[str, float]]:
        found: dict[int, tuple[str, float]] = {}
        for proc in psutil.process_iter(["pid", "name", "cpu_times"]):
            times = proc.info["cpu_times"]
            if times is not None:
                found[proc.info["pid"]] = (proc.info["name"] or "?", times.user + times.system)
        return found

    def others(self) -> tuple[float, list[tuple[float, str]]]:
        """(CPUs used on average by other processes since the start, the busiest of them)."""
        elapsed = max(1e-3, time.monotonic() - self.began)
        me = os.getpid()
        ours = {me, *(child.pid for child in psutil.Process(me).children(recursive=True))}
        foreign: set[int] = set()
        if self.server:
            with contextlib.suppress(psycopg2.Error):
                activity = sql_at(f"{self.server}/postgres", "SELECT pid, datname FROM pg_stat_activity")
                foreign = {pid for pid, datname in activity if datname not in (None, self.database, "postgres")}
        shares: dict[str, float] = defaultdict(float)
        for pid, (name, used) in self._snapshot().items():
            if pid not in ours and (name != "postgres" or pid in foreign):
                label = "postgres (other databases)" if name == "postgres" else name
                shares[label] += (used - self.before.get(pid, (name, 0.0))[1]) / elapsed
        busy = sorted(((share, name) for name, share in shares.items() if share >= 0.05), reverse=True)
        return sum(shares.values()), busy

    def report(self) -> list[str]:
        total, busy = self.others()
        load = os.getloadavg()
        return [
            f"load average (1/5/15 min): before {self.load[0]:.2f}/{self.load[1]:.2f}/{self.load[2]:.2f}, "
            f"after {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} on {os.cpu_count()} CPUs "
            "(the benchmark keeps about 1 CPU busy, more when PostgreSQL runs parallel workers)",
            "CPU used by other processes (and PostgreSQL backends of other databases) while measuring: "
            f"{total:.2f} CPUs on average"
            + (": " + ", ".join(f"{name} {share:.2f}" for share, name in busy[:6]) if busy else "")
            + (" -> timings are likely noisy" if total >= 0.3 else ""),
        ]


# -- main ----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--histories", type=int, default=1_000_000)
    parser.add_argument("--backups", type=int, default=100_000)
    parser.add_argument("--volumes", type=int, default=2000)
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--storages", type=int, default=5)
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--targets", type=int, default=2000)
    parser.add_argument("--tags", type=int, default=3000, help="user tags (plus a third as many system tags)")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=20240501)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432", help="server DSN (no database)")
    parser.add_argument("--keep-db", action="store_true", help="keep the bench database at the end")
    parser.add_argument("--no-what-if", action="store_true", help="do not try candidate indexes on misses")
    parser.add_argument("--what-if-all", action="store_true", help="try candidate indexes on every query")
    parser.add_argument("--explain-all", action="store_true", help="print the plans of every query, not only misses")
    parser.add_argument("--target-ms", type=float, default=TARGET_MS, help="the p95 target (HTTP)")
    args = parser.parse_args(argv)

    name = f"bv_bench_{secrets.token_hex(4)}"
    server = args.pg.rstrip("/")
    dsn = f"{server}/{name}"
    url = dsn.replace("postgresql://", "postgresql+psycopg2://", 1)
    sql_at(f"{server}/postgres", f'CREATE DATABASE "{name}"')
    print(f"database {name}", flush=True)
    try:
        began = time.perf_counter()
        db.migrate(url)
        print(f"migrated: {time.perf_counter() - began:.1f}s; loading ...", flush=True)
        began = time.perf_counter()
        pools = load(dsn, args)
        print(f"loaded in {time.perf_counter() - began:.1f}s", flush=True)

        capture = Capture()
        event.listen(db.engine(url), "before_cursor_execute", capture)
        CpuWatch.server, CpuWatch.database = server, name
        watch = CpuWatch()
        results: list[tuple[QueryDef, Sample]] = []
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with (
            api_server(url) as base,
            httpx.Client(base_url=base, headers=headers, timeout=60) as client,
        ):
            health = []
            for i in range(args.warmup + args.runs):
                t = time.perf_counter()
                client.get("/v1/health").raise_for_status()
                if i >= args.warmup:
                    health.append((time.perf_counter() - t) * 1000)
            print(
                f"HTTP floor, GET /v1/health (no auth, no database): p50 {percentile(health, 50):.2f} ms, "
                f"p95 {percentile(health, 95):.2f} ms",
                flush=True,
            )
            print("\n".join(auth_floor(url, args)), flush=True)
            for query in (FLOOR, *QUERIES):
                t = time.perf_counter()
                sample = measure_stable(client, url, server, query, pools, args)
                results.append((query, sample))
                print(
                    f"  {query.name}: HTTP p95 {percentile(sample.http_ms, 95):.1f} ms, "
                    f"direct p95 {percentile(sample.direct_ms, 95):.1f} ms ({time.perf_counter() - t:.0f}s)",
                    flush=True,
                )

            print()
            print(f"Results: {args.runs} runs each after {args.warmup} warm-up; target p95 < {args.target_ms:g} ms")
            print(f"({args.backups} volume backups, {args.histories} job histories, seed {args.seed})")
            print("\n".join(table(results, args.target_ms)))
            print()
            print("\n".join(overhead(results)))
            print()
            print("\n".join(watch.report()))

            misses = [(q, s) for q, s in results if percentile(s.http_ms, 95) >= args.target_ms]
            missed = {query.name for query, _sample in misses}
            for query, _sample in results if args.explain_all else misses:
                print(f"\nEXPLAIN ({'miss' if query.name in missed else 'meets the target'}): {query.name}")
                print("\n".join(safe_explain(url, capture, query, pools, args.seed)))
                if query.candidates:
                    print("  candidate index(es): " + "; ".join(query.candidates))

            tried = [(q, s) for q, s in (results if args.what_if_all else misses) if q.candidates]
            if tried and not args.no_what_if:
                what_if(client, url, server, capture, tried, pools, args)
        return 0
    finally:
        db.reset()
        if args.keep_db:
            print(f"kept database {name}: {dsn}")
        else:
            try:  # the server may be restarting (someone else's tests): retry for a while
                sql_at(f"{server}/postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', retry_seconds=180)
                print(f"dropped database {name}")
            except psycopg2.Error as exc:
                print(f"could not drop database {name}: {exc}; drop it by hand", file=sys.stderr)


def what_if(
    client: httpx.Client,
    url: str,
    server: str,
    capture: Capture,
    tried: list[tuple[QueryDef, Sample]],
    pools: Pools,
    args: argparse.Namespace,
) -> None:
    """For each query in turn: create its candidate indexes, re-measure it, EXPLAIN it, drop them."""
    dsn = url.replace("postgresql+psycopg2://", "postgresql://", 1)
    summary: list[str] = []
    after: list[tuple[QueryDef, Sample]] = []
    for query, before in tried:
        print(f"\nWhat-if for {query.name}: " + "; ".join(query.candidates), flush=True)
        try:
            for stmt in query.candidates:
                sql_at(dsn, stmt.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS", 1), retry_seconds=180)
            for table_name in sorted({stmt.split(" ON ", 1)[1].split()[0] for stmt in query.candidates}):
                sql_at(dsn, f"VACUUM (ANALYZE) {table_name}", retry_seconds=180)
            sample = measure_stable(client, url, server, query, pools, args)
            after.append((query, sample))
            print("\n".join(safe_explain(url, capture, query, pools, args.seed)))
        finally:
            for stmt in query.candidates:
                sql_at(dsn, f'DROP INDEX IF EXISTS "{stmt.split()[2]}"', retry_seconds=180)
        summary.append(
            f"  {query.name}: HTTP p95 {percentile(before.http_ms, 95):.1f} -> "
            f"{percentile(sample.http_ms, 95):.1f} ms, direct p95 {percentile(before.direct_ms, 95):.1f} -> "
            f"{percentile(sample.direct_ms, 95):.1f} ms  with " + "; ".join(query.candidates)
        )
    print("\nWhat-if results (each query with only its own candidate indexes, same draws as before):")
    print("\n".join(table(after, args.target_ms)))
    print("\n".join(summary))


if __name__ == "__main__":
    sys.exit(main())
