#!/usr/bin/env python3
"""Benchmark how well catalog database backups deduplicate, side by side with restic.

Run by ``make bench-db`` as::

    .venv/bin/python tests/bench/db_dedup.py [--rows 230000] [--change-percent 1]
        [--pg-url postgresql+psycopg2://postgres@127.0.0.1:5432] [--workdir DIR] [--keep]

Like with like: both tools run as processes reading the same ``pg_dump`` output through a
pipe (``pg_dump | blockvault repo backup-stream`` and ``pg_dump | restic backup --stdin``, with
the arguments blockvault's database backups give pg_dump), into encrypted local repositories;
each one's seconds include pg_dump and its own start-up (blockvault is this checkout's CLI,
``python -m api.cli``). What differs by design (chunkers, packing) is printed with the figures.

What it does, on one PostgreSQL server:

1. creates a database ``bv_bench_<random>``, migrates it to the catalog schema (``alembic
   upgrade head``) and fills it in bulk (``INSERT ... SELECT generate_series``) with a catalog
   of ``--rows`` volume backups: hosts, VM instances, volumes, backup storage, the backups and
   their storage refs, scheduler job groups, jobs, triggers, one job history per backup (JSON
   text in ``requestDump`` / ``resultDump``), API jobs and tags; rows in creation order;
2. first backup with both tools, into repositories made with ``blockvault repo init --encrypt``
   and ``restic init``;
3. three changes, each followed by a backup with both tools: (a) nothing; (b) catalog-like:
   the newest ``--change-percent`` of the backups move from Creating to Ready and as many new
   backups (with refs and histories) are appended; (c) scattered: ``--change-percent`` of the
   rows of every table, chosen at random, get a new ``lastOpDate``.

Per backup: the dump's size, blockvault's chunks / new chunks / bytes written / repository
growth / seconds, restic's ``data_added`` / repository growth / seconds and the ratio of the
two growths. Before each pair a ``pg_dump`` to nowhere warms the cache and times the dump
alone. The database is dropped at the end whatever happens, the work directory removed unless
``--keep``. Not a pytest test: it needs PostgreSQL, pg_dump and restic. Exit status 0 when
every step worked, 1 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make ``tests.bench.compare_peers`` importable
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from typing import Any  # noqa: E402

from sqlalchemy import Connection, create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.exc import DBAPIError  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from shared.catalog.db import migrate  # noqa: E402
from shared.dbdump import PG_DUMP_ARGS, libpq_url, source_name  # noqa: E402
from shared.errors import BlockvaultError  # noqa: E402
from tests.bench.compare_peers import PASSPHRASE, BenchError, MiB, disk_usage, run_plain  # noqa: E402

BLOCKVAULT = [sys.executable, "-m", "api.cli"]  # this checkout's CLI (run in ROOT)
DIFFERS = (
    "chunkers: blockvault FastCDC 2020 with 256 KiB / 1 MiB / 4 MiB (min / average / max) chunks, restic its "
    "Rabin chunker with 512 KiB / 1 MiB / 8 MiB;",
    "storage: blockvault one zstd-compressed object per chunk plus a manifest; restic packs compressed blobs into "
    "pack files with indexes and a snapshot (compression auto).",
)
DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432"
DEFAULT_ROWS = 230_000
SEED = 0.4242  # setseed(): the same catalog and the same random picks on every run
BASE_DATE = datetime(2024, 1, 1, tzinfo=UTC)
YEAR_SECONDS = 365 * 24 * 3600
STEPS = ("initial", "unchanged", "catalog-like", "scattered")
STEP_LABEL = {
    "initial": "initial (full)",
    "unchanged": "(a) nothing changed",
    "catalog-like": "(b) catalog-like",
    "scattered": "(c) scattered",
}
# Every table the fill writes; (c) touches a share of each one's rows.
TABLES = (
    "account",
    "host",
    "vm_instance",
    "volume",
    "backup_storage",
    "volume_backup",
    "volume_backup_storage_ref",
    "scheduler_job_group",
    "scheduler_trigger",
    "scheduler_job_group_trigger_ref",
    "scheduler_job",
    "scheduler_job_history",
    "api_job",
    "tag",
)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# The catalog database
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """How many rows each table gets for ``rows`` volume backups (uuids are md5(kind || i), so
    references are computed, never looked up)."""

    rows: int
    hosts: int
    vms: int
    volumes: int
    groups: int
    storages: int = 3

    @classmethod
    def for_rows(cls, rows: int) -> Shape:
        volumes = max(16, rows // 12)
        vms = max(8, volumes // 3)
        return cls(rows=rows, hosts=max(4, vms // 50), vms=vms, volumes=volumes, groups=max(2, volumes // 100))


def _exec(conn: Connection, sql: str, **params: Any) -> int:
    return conn.execute(text(sql), params).rowcount


def fill_static(conn: Connection, shape: Shape) -> None:
    """Everything but the backups: accounts, hosts, VMs, volumes, storage, scheduling."""
    p = {"base": BASE_DATE}
    _exec(
        conn,
        """INSERT INTO account (uuid, name, "createDate", "lastOpDate", type)
        SELECT md5('acct' || i), 'project-' || i, :base, :base,
               CASE WHEN i = 0 THEN 'SystemAdmin' ELSE 'Normal' END
        FROM generate_series(0, 19) AS i""",
        **p,
    )
    _exec(
        conn,
        """INSERT INTO host (uuid, name, "createDate", "lastOpDate", "managementIp", hostname, state, status,
                             "lastHeartbeat")
        SELECT md5('host' || i), 'kvm-' || lpad(i::text, 4, '0'), :base, :base,
               '10.' || (i / 250) || '.' || (i % 250) || '.10', 'kvm-' || lpad(i::text, 4, '0') || '.dc1.example',
               'Enabled', 'Connected', :base + interval '360 days'
        FROM generate_series(0, :n - 1) AS i""",
        n=shape.hosts,
        **p,
    )
    _exec(
        conn,
        """INSERT INTO vm_instance (uuid, name, "createDate", "lastOpDate", "hostUuid", platform, "cpuNum",
                                    "memorySize", "projectUuid", state, "qmpSocket")
        SELECT md5('vm' || i), 'vm-' || substr(md5('vmname' || i), 1, 10), :base,
               :base, md5('host' || (i % :hosts)), CASE WHEN i % 9 = 0 THEN 'Windows' ELSE 'Linux' END,
               (1 + i % 8) * 2, (2 + i % 16)::bigint * 1073741824, md5('acct' || (i % 20)),
               CASE WHEN i % 11 = 0 THEN 'Stopped' ELSE 'Running' END,
               '/var/lib/libvirt/qemu/domain-' || i || '/monitor.sock'
        FROM generate_series(0, :n - 1) AS i""",
        n=shape.vms,
        hosts=shape.hosts,
        **p,
    )
    _exec(
        conn,
        """INSERT INTO volume (uuid, name, "createDate", "lastOpDate", "vmInstanceUuid", "hostUuid", "projectUuid",
                               type, format, "installPath", size, state, status)
        SELECT md5('vol' || i),
               CASE WHEN i < :vms THEN 'ROOT-' ELSE 'DATA-' END || substr(md5('vmname' || (i % :vms)), 1, 10),
               :base, :base, md5('vm' || (i % :vms)), md5('host' || ((i % :vms) % :hosts)),
               md5('acct' || ((i % :vms) % 20)), CASE WHEN i < :vms THEN 'Root' ELSE 'Data' END,
               CASE WHEN i % 3 = 0 THEN 'raw' ELSE 'qcow2' END,
               '/var/lib/zstack/primary/' || md5('vol' || i) || '.qcow2', (20 + (i % 50) * 10)::bigint * 1073741824,
               'Enabled', 'Ready'
        FROM generate_series(0, :n - 1) AS i""",
        n=shape.volumes,
        vms=shape.vms,
        hosts=shape.hosts,
        **p,
    )
    _exec(
        conn,
        """INSERT INTO backup_storage (uuid, name, "createDate", "lastOpDate", type, url, role, state, status,
                                       "totalCapacity", "availableCapacity", "repositoryUuid")
        SELECT md5('bs' || i), 'bs-' || i, :base, :base, 'ImageStore',
               CASE WHEN i = 0 THEN 'file:///backup/main' ELSE 's3://bucket-' || i || '/bv' END,
               CASE WHEN i = 0 THEN 'master' ELSE 'replica' END, 'Enabled', 'Connected',
               200::bigint * 1099511627776, 80::bigint * 1099511627776, md5('repo' || i)
        FROM generate_series(0, :n - 1) AS i""",
        n=shape.storages,
        **p,
    )
    _exec(
        conn,
        """INSERT INTO scheduler_job_group (uuid, name, "createDate", "lastOpDate", "jobType", "jobData", state)
        SELECT md5('grp' || i), 'nightly-' || i, :base, :base, 'volumeBackup',
               json_build_object('backupStorageUuids', json_build_array(md5('bs0'), md5('bs' || (1 + i % 2))),
                                 'retention', json_build_object('keepDaily', 14, 'keepWeekly', 8), 'full', false),
               'Enabled'
        FROM generate_series(0, :n - 1) AS i""",
        n=shape.groups,
        **p,
    )
    _exec(
        conn,
        """INSERT INTO scheduler_trigger (uuid, name, "createDate", "lastOpDate", "schedulerType",
                                          "schedulerInterval", "repeatCount", "startTime", "stopTime", cron,
                                          "timeZone", state)
        SELECT md5('trg' || i), 'at-' || (i % 6) || 'h', :base, :base, 'cron', NULL, NULL,
               1704067200, NULL, '0 ' || (i % 6) || ' * * *', 'Europe/Berlin', 'Enabled'
        FROM generate_series(0, :n - 1) AS i""",
        n=shape.groups,
        **p,
    )
    _exec(
        conn,
        """INSERT INTO scheduler_job_group_trigger_ref ("createDate", "lastOpDate", "schedulerJobGroupUuid",
                                                        "schedulerTriggerUuid")
        SELECT :base, :base, md5('grp' || i), md5('trg' || i)
        FROM generate_series(0, :n - 1) AS i""",
        n=shape.groups,
        **p,
    )
    _exec(
        conn,
        """INSERT INTO scheduler_job (uuid, name, "createDate", "lastOpDate", "schedulerJobGroupUuid",
                                      "targetResourceUuid", "jobType", "jobData", state)
        SELECT md5('job' || i), 'backup-' || md5('vol' || i), :base, :base,
               md5('grp' || (i % :groups)), md5('vol' || i), 'volumeBackup',
               json_build_object('volumeUuid', md5('vol' || i), 'fullEvery', 7), 'Enabled'
        FROM generate_series(0, :n - 1) AS i""",
        n=shape.volumes,
        groups=shape.groups,
        **p,
    )
    _exec(
        conn,
        """INSERT INTO tag (uuid, "createDate", "lastOpDate", "resourceUuid", "resourceType", tag, type)
        SELECT md5('tag' || i), :base, :base, md5('vm' || i), 'VmInstanceVO',
               CASE WHEN i % 2 = 0 THEN 'backup::policy::gold' ELSE 'env::' || (i % 5) END,
               CASE WHEN i % 2 = 0 THEN 'system' ELSE 'user' END
        FROM generate_series(0, :n - 1) AS i""",
        n=shape.vms,
        **p,
    )


def insert_backups(conn: Connection, shape: Shape, first: int, count: int, creating: int) -> None:
    """Backups ``first`` .. ``first + count - 1`` (in creation order, the newest ``creating`` of
    them still Creating), each with its storage refs (a replica for every third), one job
    history and, for every second, an API job."""
    p = {
        "first": first,
        "last": first + count - 1,
        "ready_below": first + count - creating,
        "volumes": shape.volumes,
        "groups": shape.groups,
        "step": YEAR_SECONDS / shape.rows,
        "base": BASE_DATE,
    }
    when = ":base + make_interval(secs => i * :step)"
    status = "CASE WHEN i < :ready_below THEN 'Ready' ELSE 'Creating' END"
    _exec(
        conn,
        f"""INSERT INTO volume_backup (uuid, name, "createDate", "lastOpDate", "volumeUuid", type, mode, "parentUuid",
                                       "groupUuid", metadata, size, state, status, "schedulerJobUuid")
        SELECT md5('vb' || i), 'auto-' || to_char({when}, 'YYYYMMDD-HH24MISS'), {when}, {when} + interval '7 min',
               md5('vol' || (i % :volumes)), CASE WHEN i % :volumes < :volumes / 3 THEN 'Root' ELSE 'Data' END,
               CASE WHEN (i / :volumes) % 7 = 0 THEN 'full' ELSE 'incremental' END,
               CASE WHEN i >= :volumes AND (i / :volumes) % 7 <> 0 THEN md5('vb' || (i - :volumes)) END,
               md5('bg' || (i / 2)),
               json_build_object('chunkSize', 4194304, 'bytesRead', (i * 7919) % 21474836480,
                                 'chunks', 100 + (i * 31) % 5000, 'newChunks', (i * 13) % 400,
                                 'md5', md5('data' || i), 'format', 'qcow2', 'bitmap', 'bv-' || (i % :volumes)),
               (i::bigint * 104729) % 53687091200, 'Enabled', {status}, md5('job' || (i % :volumes))
        FROM generate_series(:first, :last) AS i""",
        **p,
    )
    _exec(
        conn,
        f"""INSERT INTO volume_backup_storage_ref ("createDate", "lastOpDate", "volumeBackupUuid", "backupStorageUuid",
                                                   "installPath", status)
        SELECT {when}, {when} + interval '7 min', md5('vb' || i), md5('bs' || k),
               'zstore://' || md5('repo' || k) || '/' || md5('manifest' || i), {status}
        FROM generate_series(:first, :last) AS i, generate_series(0, 1) AS k
        WHERE k = 0 OR i % 3 = 0
        ORDER BY i, k""",
        **p,
    )
    _exec(
        conn,
        f"""INSERT INTO scheduler_job_history ("createDate", "lastOpDate", "executeTime", "requestDump", "resultDump",
                                               success, "schedulerJobGroupUuid", "schedulerJobUuid",
                                               "targetResourceUuid", "triggerUuid")
        SELECT {when}, {when} + interval '7 min', {when},
               json_build_object('jobUuid', md5('job' || (i % :volumes)), 'volumeUuid', md5('vol' || (i % :volumes)),
                                 'backupStorageUuids', json_build_array(md5('bs0')), 'full', (i / :volumes) % 7 = 0,
                                 'retention', json_build_object('keepDaily', 14, 'keepWeekly', 8))::text,
               json_build_object('success', i % 97 <> 0, 'backupUuid', md5('vb' || i),
                                 'installPath', 'zstore://' || md5('repo0') || '/' || md5('manifest' || i),
                                 'bytesWritten', (i * 6271) % 1073741824, 'seconds', round((i % 900) / 7.0, 2),
                                 'error', CASE WHEN i % 97 = 0 THEN 'storage unreachable: timed out after 30 s' END
                                 )::text,
               i % 97 <> 0, md5('grp' || ((i % :volumes) % :groups)), md5('job' || (i % :volumes)),
               md5('vol' || (i % :volumes)), md5('trg' || ((i % :volumes) % :groups))
        FROM generate_series(:first, :last) AS i""",
        **p,
    )
    _exec(
        conn,
        f"""INSERT INTO api_job (uuid, "createDate", "lastOpDate", action, "resourceUuid", "resourceType", "hostUuid",
                                 state, progress, params, result, error, "accountUuid")
        SELECT md5('apijob' || i), {when}, {when} + interval '7 min', 'CreateVolumeBackup',
               md5('vol' || (i % :volumes)), 'VolumeVO', NULL,
               CASE WHEN i < :ready_below THEN 'Succeeded' ELSE 'Running' END,
               CASE WHEN i < :ready_below THEN 100 ELSE 40 END,
               json_build_object('volumeUuid', md5('vol' || (i % :volumes)), 'mode', 'auto'),
               CASE WHEN i < :ready_below THEN json_build_object('backupUuid', md5('vb' || i)) END, NULL,
               md5('acct' || (i % 20))
        FROM generate_series(:first, :last) AS i
        WHERE i % 2 = 0""",
        **p,
    )


class Catalog:
    """A throw-away catalog database on the server at ``server_url``."""

    def __init__(self, server_url: str, rows: int) -> None:
        self.name = f"bv_bench_{secrets.token_hex(4)}"
        server = make_url(server_url)
        self.admin_url = server.set(database="postgres")
        self.url = server.set(database=self.name).render_as_string(hide_password=False)
        self.shape = Shape.for_rows(rows)
        self.next_backup = rows
        self.created = False

    def _admin(self, sql: str) -> None:
        engine = create_engine(self.admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
        finally:
            engine.dispose()

    @contextlib.contextmanager
    def connect(self) -> Iterator[Connection]:
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            with engine.begin() as conn:
                yield conn
        finally:
            engine.dispose()

    def create(self, change_rows: int) -> None:
        self._admin(f'CREATE DATABASE "{self.name}"')
        self.created = True
        migrate(self.url)
        with self.connect() as conn:
            conn.execute(text("SELECT setseed(:seed)"), {"seed": SEED})
            fill_static(conn, self.shape)
            insert_backups(conn, self.shape, 0, self.shape.rows, change_rows)
        with self.connect() as conn:
            conn.execute(text("ANALYZE"))

    def drop(self) -> None:
        if not self.created:
            return
        try:
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        except DBAPIError:  # before PostgreSQL 13: no FORCE
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}"')
        self.created = False

    def counts(self) -> dict[str, int]:
        with self.connect() as conn:
            return {t: int(conn.execute(text(f'SELECT count(*) FROM "{t}"')).scalar_one()) for t in TABLES}

    def change_catalog_like(self, count: int) -> str:
        """The newest ``count`` backups become Ready; ``count`` new ones (Creating) appended."""
        with self.connect() as conn:
            newest = """(SELECT uuid FROM volume_backup ORDER BY "createDate" DESC LIMIT :n)"""
            done = '"lastOpDate" = "lastOpDate" + interval \'20 min\''
            updated = _exec(conn, f"UPDATE volume_backup SET status = 'Ready', {done} WHERE uuid IN {newest}", n=count)
            refs = _exec(
                conn,
                f"""UPDATE volume_backup_storage_ref SET status = 'Ready', {done}
                WHERE status = 'Creating' AND "volumeBackupUuid" IN (SELECT uuid FROM volume_backup
                WHERE status = 'Ready')""",
            )
            jobs = _exec(
                conn,
                f"""UPDATE api_job SET state = 'Succeeded', progress = 100, {done},
                       result = json_build_object('volumeUuid', "resourceUuid", 'state', 'Succeeded')
                WHERE state = 'Running'""",
            )
            insert_backups(conn, self.shape, self.next_backup, count, count)
        self.next_backup += count
        return f"{updated} backups, {refs} refs, {jobs} api jobs updated; {count} backups appended (with refs etc.)"

    def change_scattered(self, percent: float) -> str:
        """``percent`` of every table's rows, chosen at random, get a new lastOpDate."""
        total = 0
        with self.connect() as conn:
            conn.execute(text("SELECT setseed(:seed)"), {"seed": SEED / 2})
            for table in TABLES:
                total += _exec(
                    conn,
                    f"""UPDATE "{table}" SET "lastOpDate" = "lastOpDate" + interval '1 day'
                    WHERE random() < :share""",
                    share=percent / 100,
                )
        return f"{total} rows updated across {len(TABLES)} tables"


# --------------------------------------------------------------------------------------------
# The two tools
# --------------------------------------------------------------------------------------------


def _pg_dump_cmd(url: str) -> tuple[list[str], dict[str, str]]:
    """pg_dump as blockvault runs it (same arguments, so the same bytes) and its environment."""
    target, env = libpq_url(url)
    return ["pg_dump", *PG_DUMP_ARGS, f"--dbname={target}"], {**os.environ, **env}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def time_dump(url: str) -> tuple[int, float]:
    """``pg_dump`` read to its end and thrown away: its size and seconds (warms the cache)."""
    cmd, env = _pg_dump_cmd(url)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    size = 0
    try:
        assert proc.stdout is not None
        while block := proc.stdout.read(MiB):
            size += len(block)
        err = proc.stderr.read() if proc.stderr else b""
        if proc.wait() != 0:
            raise BenchError(f"pg_dump exited {proc.returncode}: {err.decode(errors='replace').strip()}")
    finally:
        _stop(proc)
    return size, time.perf_counter() - started


@dataclass
class Figures:
    step: str
    change: str = ""
    dump_bytes: int = 0
    dump_seconds: float = 0.0
    bv_chunks: int = 0
    bv_new_chunks: int = 0
    bv_written: int = 0
    bv_grew: int = 0
    bv_seconds: float = 0.0
    restic_added: int = 0
    restic_processed: int = 0
    restic_grew: int = 0
    restic_seconds: float = 0.0


def piped(url: str, cmd: Sequence[str], env: dict[str, str], log: Path) -> tuple[float, str]:
    """``pg_dump | cmd``, timed from the start of both to the end of both: seconds and ``cmd``'s
    standard output. BenchError when either fails (pg_dump's messages go to ``log``)."""
    dump_cmd, dump_env = _pg_dump_cmd(url)
    started = time.perf_counter()
    with log.open("ab") as err:
        dumper = subprocess.Popen(dump_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=dump_env)
        try:
            consumer = subprocess.Popen(
                cmd, stdin=dumper.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT
            )
        except OSError:
            _stop(dumper)
            raise
        assert dumper.stdout is not None
        dumper.stdout.close()  # the consumer holds the read end now
        try:
            out, consumer_err = consumer.communicate()
            dump_code = dumper.wait()
        finally:
            _stop(consumer)
            _stop(dumper)
    seconds = time.perf_counter() - started
    if dump_code != 0 or consumer.returncode != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise BenchError(
            f"pg_dump | {shlex.join(cmd)} failed (pg_dump {dump_code}, {cmd[0]} {consumer.returncode}): "
            f"{consumer_err.decode(errors='replace').strip()[-500:]}; pg_dump: {' | '.join(lines[-3:]) or 'no message'}"
        )
    return seconds, out.decode(errors="replace")


def _init(cmd: Sequence[str], env: dict[str, str]) -> None:
    proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(cmd)} failed: {proc.stderr.strip()}")


class Blockvault:
    """This checkout's CLI: ``repo backup-stream`` into an encrypted local repository."""

    def __init__(self, workdir: Path) -> None:
        self.repo = workdir / "blockvault"
        self.log = workdir / "pg_dump-blockvault.err"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
        self.env.update(BLOCKVAULT_PASSPHRASE=PASSPHRASE, BLOCKVAULT_DATA_DIR=str(workdir / "blockvault-data"))

    def init(self) -> None:
        _init([*BLOCKVAULT, "repo", "init", str(self.repo), "--encrypt"], self.env)

    def backup(self, url: str, step: str) -> tuple[float, dict[str, Any]]:
        """``pg_dump | blockvault repo backup-stream``: seconds and the backup's JSON."""
        args = ["repo", "backup-stream", str(self.repo), "--source", source_name(url), "--format", "pg_dump"]
        seconds, out = piped(url, [*BLOCKVAULT, *args, "--name", step, "--json"], self.env, self.log)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines:
            raise BenchError(f"no JSON from blockvault repo backup-stream: {out[-500:]!r}")
        result: dict[str, Any] = json.loads(lines[-1])
        return seconds, result


class Restic:
    def __init__(self, workdir: Path) -> None:
        self.repo = workdir / "restic"
        self.log = workdir / "pg_dump-restic.err"
        self.env = dict(os.environ)
        self.env.update(RESTIC_PASSWORD=PASSPHRASE, RESTIC_CACHE_DIR=str(workdir / "restic-cache"))
        self.version = ""

    def _cmd(self, *args: str) -> list[str]:
        return ["restic", "-r", str(self.repo), *args]

    def init(self) -> None:
        self.version = run_plain(["restic", "version"]).stdout.split()[1]
        _init(self._cmd("init", "--repository-version", "2"), self.env)

    def backup(self, url: str, step: str) -> tuple[float, dict[str, Any]]:
        """``pg_dump | restic backup --stdin``: seconds and restic's JSON summary."""
        cmd = self._cmd("backup", "--json", "--stdin", "--stdin-filename", "catalog.sql", "--tag", step)
        seconds, out = piped(url, cmd, self.env, self.log)
        summary: dict[str, Any] = {}
        for line in out.splitlines():
            if '"summary"' in line:
                summary = json.loads(line)
        return seconds, summary

    def raw_data(self) -> int:
        proc = subprocess.run(
            self._cmd("stats", "--mode", "raw-data", "--json"),
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise BenchError(f"restic stats failed: {proc.stderr.strip()}")
        return int(json.loads(proc.stdout).get("total_size", 0))


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class Results:
    rows: int
    change_percent: float
    change_rows: int
    database: str = ""
    restic_version: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    fill_seconds: float = 0.0
    steps: list[Figures] = field(default_factory=list)
    bv_total: int = 0
    restic_total: int = 0
    restic_raw_data: int = 0
    errors: list[str] = field(default_factory=list)


def backup_both(catalog: Catalog, blockvault: Blockvault, restic: Restic, fig: Figures) -> None:
    _say(f"{fig.step}: pg_dump alone (warms the cache)")
    fig.dump_bytes, fig.dump_seconds = time_dump(catalog.url)
    _say(f"{fig.step}: pg_dump | blockvault repo backup-stream ({fig.dump_bytes / MiB:.1f} MiB dump)")
    before = disk_usage(blockvault.repo).apparent
    fig.bv_seconds, result = blockvault.backup(catalog.url, fig.step)
    fig.bv_grew = disk_usage(blockvault.repo).apparent - before
    fig.bv_chunks, fig.bv_new_chunks, fig.bv_written = result["chunks"], result["newChunks"], result["bytesWritten"]
    if result["size"] != fig.dump_bytes:
        print(f"  note: blockvault read {result['size']} bytes, pg_dump alone gave {fig.dump_bytes}", flush=True)
    _say(f"{fig.step}: pg_dump | restic backup --stdin")
    before = disk_usage(restic.repo).apparent
    fig.restic_seconds, summary = restic.backup(catalog.url, fig.step)
    fig.restic_grew = disk_usage(restic.repo).apparent - before
    fig.restic_added = int(summary.get("data_added", 0))
    fig.restic_processed = int(summary.get("total_bytes_processed", 0))
    if fig.restic_processed != result["size"]:
        print(f"  note: restic read {fig.restic_processed} bytes, blockvault {result['size']}", flush=True)


def run_benchmark(args: argparse.Namespace, workdir: Path, results: Results) -> None:
    catalog = Catalog(args.pg_url, args.rows)
    results.database = catalog.name
    blockvault = Blockvault(workdir)
    restic = Restic(workdir)
    try:
        _say(f"creating {catalog.name}, migrating it and filling it with {args.rows} volume backups")
        started = time.perf_counter()
        catalog.create(results.change_rows)
        results.fill_seconds = time.perf_counter() - started
        results.counts = catalog.counts()
        _say(f"filled in {results.fill_seconds:.1f} s: {sum(results.counts.values())} rows")
        blockvault.init()
        restic.init()
        results.restic_version = restic.version
        for step in STEPS:
            fig = Figures(step)
            if step == "unchanged":
                fig.change = "none"
            elif step == "catalog-like":
                fig.change = catalog.change_catalog_like(results.change_rows)
            elif step == "scattered":
                fig.change = catalog.change_scattered(args.change_percent)
            if fig.change:
                _say(f"{step}: {fig.change}")
            try:
                backup_both(catalog, blockvault, restic, fig)
            except (BenchError, BlockvaultError) as exc:
                results.errors.append(f"{step}: {exc}")
                print(f"\n!!! {step} FAILED: {exc}\n", file=sys.stderr, flush=True)
            results.steps.append(fig)
        results.bv_total = disk_usage(blockvault.repo).apparent
        results.restic_total = disk_usage(restic.repo).apparent
        results.restic_raw_data = restic.raw_data()
    finally:
        _say(f"dropping {catalog.name}")
        try:
            catalog.drop()
        except DBAPIError as exc:
            results.errors.append(f"dropping {catalog.name}: {exc}")
            print(f"!!! could not drop {catalog.name}: {exc}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _mib(value: int) -> str:
    return f"{value / MiB:.2f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


def print_report(results: Results) -> None:
    print()
    counts = ", ".join(f"{t} {n}" for t, n in results.counts.items())
    print(f"Catalog: {results.rows} volume backups (filled in {results.fill_seconds:.1f} s); rows: {counts}")
    print(
        f"Change: {results.change_percent:g} % ({results.change_rows} backups for catalog-like; a random "
        f"{results.change_percent:g} % of every table's rows for scattered)."
    )
    print(
        f"Compared: pg_dump | blockvault repo backup-stream and pg_dump | restic {results.restic_version} backup "
        "--stdin, both processes reading the same pg_dump output (plain SQL) through a pipe, into encrypted local "
        "repositories (blockvault repo init --encrypt: AES-256-GCM; restic repository v2: AES-256-CTR + "
        "Poly1305); each one's seconds include pg_dump and its own start-up."
    )
    print("What differs:")
    for difference in DIFFERS:
        print(f"  - {difference}")
    print()
    headers = [
        "step",
        "dump MiB",
        "pg_dump s",
        "bv chunks",
        "bv new",
        "bv written MiB",
        "bv grew MiB",
        "bv s",
        "restic added MiB",
        "restic grew MiB",
        "restic s",
        "restic/bv grew",
        "restic s / bv s",
    ]
    table = [
        [
            STEP_LABEL[f.step],
            _mib(f.dump_bytes),
            f"{f.dump_seconds:.2f}",
            str(f.bv_chunks),
            str(f.bv_new_chunks),
            _mib(f.bv_written),
            _mib(f.bv_grew),
            f"{f.bv_seconds:.2f}",
            _mib(f.restic_added),
            _mib(f.restic_grew),
            f"{f.restic_seconds:.2f}",
            _ratio(f.restic_grew, f.bv_grew),
            _ratio(f.restic_seconds, f.bv_seconds),
        ]
        for f in results.steps
    ]
    widths = [max(len(headers[i]), *(len(r[i]) for r in table)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(line(headers))
    print("-" * len(line(headers)))
    for row in table:
        print(line(row))
    print(
        "bv written: StreamResult.bytesWritten (stored chunks); grew: growth of the repository directory (du -sb, "
        "manifests, indexes and snapshots included); restic added: the summary's data_added. restic/bv grew > 1: "
        "blockvault stored less; restic s / bv s > 1: blockvault faster."
    )
    print(
        f"Repositories at the end: blockvault {_mib(results.bv_total)} MiB, restic {_mib(results.restic_total)} MiB "
        f"(restic stats --mode raw-data: {_mib(results.restic_raw_data)} MiB)."
    )
    for f in results.steps:
        if f.change and f.change != "none":
            print(f"  {f.step}: {f.change}")
    for error in results.errors:
        print(f"  ERROR: {error.splitlines()[0]}")
    print()
    print("README:", summary_line(results))
    print()


def summary_line(results: Results) -> str:
    by_step = {f.step: f for f in results.steps}
    first = by_step.get("initial")
    changed = [by_step[s] for s in STEPS[1:] if s in by_step]
    if first is None:
        return "no figures"

    def new(attr: str) -> str:
        return " / ".join(_mib(getattr(f, attr)) for f in changed) + " MiB"

    return (
        f"Catalog database of {results.rows} volume backups ({_mib(first.dump_bytes)} MiB pg_dump): first backup "
        f"blockvault {_mib(first.bv_grew)} MiB in {first.bv_seconds:.1f} s, restic {_mib(first.restic_grew)} MiB "
        f"in {first.restic_seconds:.1f} s; then after no change / {results.change_percent:g} % catalog-like / "
        f"{results.change_percent:g} % scattered changes blockvault added {new('bv_grew')}, "
        f"restic {new('restic_grew')}."
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help=f"volume backups (default {DEFAULT_ROWS})")
    parser.add_argument("--change-percent", type=float, default=1.0, help="%% of rows changed (default 1)")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help=f"the PostgreSQL server (default {DEFAULT_PG_URL})")
    parser.add_argument("--workdir", type=Path, help="where to make the run's directory (default /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (both repositories)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rows < 100:
        print("--rows must be at least 100", file=sys.stderr)
        return 2
    if not 0 < args.change_percent <= 100:
        print("--change-percent must be in (0, 100]", file=sys.stderr)
        return 2
    for tool in ("restic", "pg_dump"):
        if not shutil.which(tool):
            print(f"error: {tool} is not installed", file=sys.stderr)
            return 2
    parent = args.workdir or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="blockvault-bench-db-", dir=parent)).resolve()
    started = time.perf_counter()
    results = Results(args.rows, args.change_percent, max(1, math.ceil(args.rows * args.change_percent / 100)))
    try:
        run_benchmark(args, workdir, results)
    except (BenchError, BlockvaultError, DBAPIError) as exc:
        print(f"\n!!! benchmark aborted: {exc}", file=sys.stderr)
        if results.steps:
            print_report(results)
        return 1
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(results)
    print(f"benchmark took {math.ceil(time.perf_counter() - started)} s")
    if results.errors:
        print("FAILED: a step failed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
