#!/usr/bin/env python3
# ruff: noqa: E501 - the bulk load's column lists and rows read best one to a line
"""Benchmark the console's Overview on a large catalog: 1,000 VMs (2,000 volumes) and 100,000
volume backups in PostgreSQL, with copies on a standby and a remote, job groups on hourly
triggers, job histories, failed and running API jobs.

Run as::

    PYTHONPATH=$PWD .venv/bin/python tests/bench/console_overview.py [--vms 1000] [--backups 100000]
        [--renders 10] [--runs 100] [--pg postgresql://postgres@127.0.0.1:5432] [--keep-db]
        [--database NAME]

It bulk-loads a fresh database ``bv_bench_console_<random>`` (migrated first), starts the API
(``blockvault api``) on it (``--database`` reuses a database a ``--keep-db`` run left, migrated
to head, without loading it again), then:

1. opens the Overview in headless chromium (Debian's, through Playwright) signed in with the
   admin key, ``--renders`` times, and measures the first render: from navigation to the VM
   table's first page (:data:`PAGE_ROWS` rows; the pager says it holds all ``--vms`` VMs) and
   the summary tiles in the page;
2. lists every API call the page made (the browser's network log) and times each of them
   ``--runs`` times with a keep-alive HTTP client: p50 / p95 / max in ms.

Goals (issue 23): first render < 1 s; each call < 100 ms at p95. Not a pytest test.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg2
from playwright.sync_api import sync_playwright

from shared.catalog import db
from shared.catalog.models import new_uuid

ROOT = Path(__file__).resolve().parents[2]
PAGE_ROWS = 100  # the VM table's rows a page, PAGE_ROWS in api/console/static/overview.js


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def copy(cursor: Any, table: str, columns: list[str], rows: list[tuple[Any, ...]]) -> None:
    buffer = io.StringIO()
    for row in rows:
        buffer.write("\t".join("\\N" if v is None else str(v) for v in row) + "\n")
    buffer.seek(0)
    cursor.copy_expert(f"COPY {table} ({','.join(chr(34) + c + chr(34) for c in columns)}) FROM STDIN", buffer)


def load(url: str, vms: int, backups: int) -> None:
    """The catalog: a host, master + standby + remote, ``vms`` VMs of 2 volumes in 10 projects,
    ``backups`` volume backups as VM backups (two a time), histories and API jobs."""
    rng = random.Random(7)
    moment = datetime.now(UTC)
    iso = lambda d: d.isoformat()  # noqa: E731
    parts = urlsplit(url.replace("postgresql+psycopg2", "postgresql"))
    conn = psycopg2.connect(
        host=parts.hostname, port=parts.port or 5432, user=parts.username, dbname=parts.path.lstrip("/")
    )
    cur = conn.cursor()
    host = new_uuid()
    now = iso(moment)
    copy(cur, "host", ["uuid", "name", "state", "status", "lastHeartbeat", "createDate", "lastOpDate"],
         [(host, "h1", "Enabled", "Connected", now, now, now)])  # fmt: skip
    storages = {"master": new_uuid(), "standby": new_uuid(), "remote": new_uuid()}
    copy(
        cur,
        "backup_storage",
        ["uuid", "name", "type", "url", "role", "state", "status", "totalCapacity", "availableCapacity",
         "reclaimDue", "createDate", "lastOpDate"],
        [
            (storages["master"], "master", "ImageStore", "file:///m", "master", "Enabled", "Connected", 10**13, 6 * 10**12, False, now, now),
            (storages["standby"], "standby", "ImageStore", "file:///s", "standby", "Enabled", "Connected", 10**13, 6 * 10**12, False, now, now),
            (storages["remote"], "remote", "Remote", "http://127.0.0.1:9/r", "master", "Enabled", "Connected", 10**13, 8 * 10**12, False, now, now),
        ],
    )  # fmt: skip
    projects = [new_uuid() for _ in range(10)]
    copy(cur, "project", ["uuid", "name", "createDate", "lastOpDate"],
         [(p, f"project-{i}", now, now) for i, p in enumerate(projects)])  # fmt: skip
    vm_rows, volume_rows, volumes_of = [], [], {}
    for i in range(vms):
        vm = new_uuid()
        project = projects[i % len(projects)]
        vm_rows.append((vm, f"vm-{i:04d}", host, "Linux", 1, 0, project, "Stopped", now, now))
        pair = (new_uuid(), new_uuid())
        volumes_of[vm] = pair
        for kind, volume in zip(("Root", "Data"), pair, strict=True):
            volume_rows.append((volume, f"vm-{i:04d}-{kind.lower()}", vm, host, project, kind, "raw",
                                f"/v/{volume}.raw", 10 * 2**30, "Enabled", "Ready", now, now))  # fmt: skip
    copy(cur, "vm_instance", ["uuid", "name", "hostUuid", "platform", "cpuNum", "memorySize", "projectUuid", "state",
                              "createDate", "lastOpDate"], vm_rows)  # fmt: skip
    copy(cur, "volume", ["uuid", "name", "vmInstanceUuid", "hostUuid", "projectUuid", "type", "format", "installPath",
                         "size", "state", "status", "createDate", "lastOpDate"], volume_rows)  # fmt: skip
    per_vm = max(1, backups // (2 * vms))
    backup_rows, ref_rows = [], []
    for pair in volumes_of.values():
        for k in range(per_vm):
            created = moment - timedelta(hours=(per_vm - k) * 24 / per_vm * 7, minutes=rng.randrange(60))
            group = new_uuid()
            status = "Failed" if rng.random() < 0.01 and k == per_vm - 1 else "Ready"
            for volume in pair:
                backup = new_uuid()
                backup_rows.append((backup, "nightly", volume, "Data", "incremental" if k else "full", group,
                                    rng.randrange(2**28, 2**31), "Enabled", status, iso(created), iso(created)))  # fmt: skip
                if status != "Ready":
                    continue
                held = [storages["master"]]
                if k < per_vm - 1 or rng.random() < 0.9:
                    held.append(storages["standby"])
                if k % 5 == 0:
                    held.append(storages["remote"])
                ref_rows += [(backup, s, f"zstore://r/{backup}", "Ready", iso(created), iso(created)) for s in held]
    copy(cur, "volume_backup", ["uuid", "name", "volumeUuid", "type", "mode", "groupUuid", "size", "state", "status",
                                "createDate", "lastOpDate"], backup_rows)  # fmt: skip
    copy(cur, "volume_backup_storage_ref", ["volumeBackupUuid", "backupStorageUuid", "installPath", "status",
                                            "createDate", "lastOpDate"], ref_rows)  # fmt: skip
    groups, jobs, triggers, trefs, histories = [], [], [], [], []
    vm_list = list(volumes_of)
    for g in range(50):
        group, trigger = new_uuid(), new_uuid()
        groups.append((group, f"group-{g}", "vmBackup", "Enabled", projects[g % 10], now, now))
        triggers.append(
            (trigger, f"hourly-{g}", "simple", 3600, "Enabled", projects[g % 10], iso(moment - timedelta(days=7)), now)
        )
        trefs.append((group, trigger, now, now))
        for vm in vm_list[g * 20 : g * 20 + 20]:
            job = new_uuid()
            jobs.append((job, f"job-{vm[:6]}", group, vm, "vmBackup", "Enabled", now, now))
            for h in range(48):
                when = moment - timedelta(hours=h)
                failed = rng.random() < 0.02
                histories.append((iso(when), "{}", '{"error": {"code": "X", "description": "boom"}}' if failed else "{}",
                                  not failed, group, job, vm, trigger, iso(when), iso(when)))  # fmt: skip
    copy(
        cur,
        "scheduler_job_group",
        ["uuid", "name", "jobType", "state", "projectUuid", "createDate", "lastOpDate"],
        groups,
    )
    copy(cur, "scheduler_trigger", ["uuid", "name", "schedulerType", "schedulerInterval", "state", "projectUuid",
                                    "createDate", "lastOpDate"], triggers)  # fmt: skip
    copy(cur, "scheduler_job_group_trigger_ref", ["schedulerJobGroupUuid", "schedulerTriggerUuid", "createDate",
                                                  "lastOpDate"], trefs)  # fmt: skip
    copy(cur, "scheduler_job", ["uuid", "name", "schedulerJobGroupUuid", "targetResourceUuid", "jobType", "state",
                                "createDate", "lastOpDate"], jobs)  # fmt: skip
    copy(cur, "scheduler_job_history", ["executeTime", "requestDump", "resultDump", "success", "schedulerJobGroupUuid",
                                        "schedulerJobUuid", "targetResourceUuid", "triggerUuid", "createDate",
                                        "lastOpDate"], histories)  # fmt: skip
    api_jobs = [(new_uuid(), "createVmBackup", "Running", 40, now, now) for _ in range(5)]
    api_jobs += [
        (new_uuid(), "createVmBackup", "Failed", 0, iso(moment - timedelta(hours=i % 20)), now) for i in range(100)
    ]
    copy(cur, "api_job", ["uuid", "action", "state", "progress", "lastOpDate", "createDate"], api_jobs)
    conn.commit()
    conn.autocommit = True
    cur.execute("VACUUM ANALYZE")
    conn.close()
    print(f"loaded {len(vm_rows)} VMs, {len(volume_rows)} volumes, {len(backup_rows)} volume backups, "
          f"{len(ref_rows)} copies, {len(histories)} job histories")  # fmt: skip


def cpu_ms(pids: list[int]) -> float:
    """CPU time (user + system) the processes ``pids`` have used so far, in ms (/proc)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total * 1000 / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--backups", type=int, default=100_000)
    parser.add_argument("--renders", type=int, default=10)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--pg", default="postgresql+psycopg2://postgres@127.0.0.1:5432")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument("--database", help="a database a --keep-db run loaded (kept afterwards)")
    args = parser.parse_args()
    print(f"load average (1, 5, 15 min) at the start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")  # fmt: skip
    name = args.database or f"bv_bench_console_{secrets.token_hex(4)}"
    admin = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    admin.autocommit = True
    if not args.database:
        admin.cursor().execute(f'CREATE DATABASE "{name}"')
    url = f"{args.pg}/{name}"
    api = None
    try:
        db.migrate(url)
        if not args.database:
            started = time.monotonic()
            load(url, args.vms, args.backups)
            print(f"load: {time.monotonic() - started:.0f} s")
        key = "bench-" + secrets.token_hex(12)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
        env.update(BLOCKVAULT_DATABASE_URL=url, BLOCKVAULT_ADMIN_API_KEY=key, BLOCKVAULT_SECRET_KEY="bench-" + "x" * 32)
        api = subprocess.Popen([sys.executable, "-m", "api.cli", "api", "--port", str(port)], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        auth = json.dumps({"token": key, "kind": "key", "admin": True, "accountUuid": None, "name": "admin"})
        renders: list[float] = []
        answered: list[float] = []  # navigation to the overview's answer in the browser
        calls: set[str] = set()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.add_init_script(f"sessionStorage.setItem('blockvault.console.auth', {json.dumps(auth)});")
            page = context.new_page()
            page.on(
                "request", lambda r: calls.add(r.url[len(base) :]) if "/v1/" in r.url or "openapi" in r.url else None
            )
            for i in range(args.renders + 1):
                start = time.perf_counter()
                with page.expect_response(lambda r: urlsplit(r.url).path == "/v1/overview", timeout=60_000) as answer:
                    page.goto(f"{base}/#/overview")
                answer.value.finished()
                arrived = time.perf_counter()
                page.locator(f"#vm-table tbody tr:nth-child({min(args.vms, PAGE_ROWS)})").wait_for(timeout=60_000)
                page.locator(".tiles").wait_for(timeout=60_000)
                if i:  # the first warms the API's caches and the browser's
                    renders.append((time.perf_counter() - start) * 1000)
                    answered.append((arrived - start) * 1000)
                if args.vms > PAGE_ROWS:
                    pager = page.locator(".pager").first.inner_text()
                    assert f"of {args.vms}" in pager, pager
                page.goto("about:blank")
            browser.close()
        print(f"\nOverview first render ({args.vms} VMs, the table's first {min(args.vms, PAGE_ROWS)} rows, {args.renders} renders): "
              f"p50 {percentile(renders, 0.5):.0f} ms, p95 {percentile(renders, 0.95):.0f} ms, max {max(renders):.0f} ms (goal < 1000 ms: "
              f"{'met' if max(renders) < 1000 else 'NOT met'}); of which waiting for GET /v1/overview: "
              f"p50 {percentile(answered, 0.5):.0f} ms")  # fmt: skip
        print(f"\nthe API calls the page made, each timed {args.runs} times (goal p95 < 100 ms); CPU a call: "
              "the API process's and its PostgreSQL backends' (a loaded machine stretches the wall time, "
              "much less the CPU time):")  # fmt: skip
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            for call in sorted(calls):
                times = []
                client.get(call)  # the pool's connections open before the CPU is counted
                cur = admin.cursor()
                cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,))
                backends = [row[0] for row in cur.fetchall()]
                api_cpu, pg_cpu = cpu_ms([api.pid]), cpu_ms(backends)
                for _ in range(args.runs):
                    start = time.perf_counter()
                    response = client.get(call)
                    times.append((time.perf_counter() - start) * 1000)
                api_cpu = (cpu_ms([api.pid]) - api_cpu) / args.runs
                pg_cpu = (cpu_ms(backends) - pg_cpu) / args.runs
                p95 = percentile(times, 0.95)
                print(f"  {call[:70]:<70} {response.status_code}  p50 {percentile(times, 0.5):6.1f}  "
                      f"p95 {p95:6.1f}  max {max(times):6.1f} ms  ({len(response.content)} bytes)  "
                      f"{'met' if p95 < 100 else 'NOT met'}; CPU {api_cpu:.1f} + {pg_cpu:.1f} ms")  # fmt: skip
        print(f"\nload average (1, 5, 15 min) at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
              f"on {os.cpu_count()} CPUs")  # fmt: skip
    finally:
        if api is not None:
            api.terminate()
            api.wait(timeout=30)
        db.engine(url).dispose()
        if not args.keep_db and not args.database:
            cur = admin.cursor()
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


if __name__ == "__main__":
    main()
