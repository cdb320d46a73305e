#!/usr/bin/env python3
"""What the API process spends in CPU per request, on a fixed mix of typical requests.

Run as::

    PYTHONPATH=. .venv/bin/python tests/bench/api_cpu.py [--requests 2000] [--runs 3]

Makes a fresh PostgreSQL database, starts the API as production runs it (``python -m api.cli
api --port N``: uvicorn, its defaults), puts a project with a member, a VM with two volumes
and a scheduler trigger in it through the API, then sends the mix below over one keep-alive
``httpx`` connection, ``--requests`` at a time, and reads the API process's user + system
CPU (``/proc``, through psutil) before and after each run: CPU per request, whatever the load
of the machine (wall time is not reported). The mix, in turn:

- ``GET /v1/volumes`` as the member (a list of two),
- ``GET /v1/volumes/{uuid}`` as the member,
- ``PUT /v1/scheduler/triggers/{uuid}/actions`` (``updateSchedulerTrigger``) as the admin,
- ``GET /zstack/v1/volumes/{uuid}`` as the member (ZStack's dialect),
- ``GET /v1/volumes`` with an unknown key (401; the failure limit is set out of reach),
- ``GET /v1/vm-instances`` as the admin.

Not a pytest test: it needs a PostgreSQL server (``--pg``). The database is dropped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def database(server: str) -> Iterator[str]:
    name = f"bv_bench_{secrets.token_hex(4)}"
    admin = create_engine(f"{server}/postgres", poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{server}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def api(url: str, tmp: Path, key: str, tree: Path, extra: str) -> Iterator[tuple[str, psutil.Process]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
    env.update(
        BLOCKVAULT_DATABASE_URL=url,
        BLOCKVAULT_DATA_DIR=str(tmp / "data"),
        BLOCKVAULT_VOLUME_ROOTS=str(tmp),
        BLOCKVAULT_VM_SOCKET_DIR=str(tmp),
        BLOCKVAULT_ADMIN_API_KEY=key,
        BLOCKVAULT_SECRET_KEY="bench-server-secret-" + secrets.token_hex(16),
        BLOCKVAULT_AUTH_MAX_FAILURES="1000000",
        PYTHONPATH=os.pathsep.join(filter(None, (str(tree), extra))),
    )
    log = (tmp / "api.log").open("wb")
    command = [sys.executable, "-m", "api.cli", "api", "--port", str(port)]
    proc = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=5) as poll:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, (tmp / "api.log").read_text()
                with contextlib.suppress(httpx.HTTPError):
                    if poll.get("/v1/health").status_code == 200:
                        break
                assert time.monotonic() < deadline, (tmp / "api.log").read_text()
                time.sleep(0.2)
        yield base, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def build(client: httpx.Client, admin: str, url: str, tmp: Path) -> dict[str, Any]:
    """A project with a member (its key), a VM with two volumes, a trigger: the mix's rows."""
    from shared.catalog import db
    from shared.catalog.models import Host, VmInstance, Volume, new_uuid, now

    def call(method: str, path: str, body: Any = None, key: str = admin) -> dict[str, Any]:
        answer = client.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    project = call("POST", "/v1/projects", {"params": {"name": "p"}})["inventory"]["uuid"]
    account = call("POST", "/v1/accounts", {"params": {"name": "member"}})["inventory"]["uuid"]
    call("POST", f"/v1/projects/{project}/members", {"params": {"accountUuid": account}})
    member = call("POST", "/v1/api-keys", {"params": {"accountUuid": account}})["inventory"]["key"]
    with db.session(url) as session:
        host = Host(name="h", status="Connected", lastHeartbeat=now(), volumeRoots=[str(tmp)], vmSocketDir=str(tmp))
        session.add(host)
        session.flush()
        vm = VmInstance(name="vm", hostUuid=host.uuid, projectUuid=project)
        session.add(vm)
        session.flush()
        volumes = [
            Volume(
                hostUuid=host.uuid,
                vmInstanceUuid=vm.uuid,
                projectUuid=project,
                type=kind,
                installPath=str(tmp / f"{new_uuid()}.raw"),
                size=4096,
                name=kind,
            )
            for kind in ("Root", "Data")
        ]
        session.add_all(volumes)
        session.flush()
        volume = volumes[0].uuid
    every_hour = {"name": "t", "schedulerType": "simple", "schedulerInterval": 3600}
    trigger = call("POST", "/v1/scheduler/triggers", {"params": every_hour})
    return {"member": member, "volume": volume, "trigger": trigger["inventory"]["uuid"]}


def mix(client: httpx.Client, admin: str, rows: dict[str, Any], count: int) -> None:
    member = {"Authorization": f"Bearer {rows['member']}"}
    boss = {"Authorization": f"Bearer {admin}"}
    calls: list[tuple[str, str, dict[str, str], Any, int]] = [
        ("GET", "/v1/volumes", member, None, 200),
        ("GET", f"/v1/volumes/{rows['volume']}", member, None, 200),
        ("PUT", f"/v1/scheduler/triggers/{rows['trigger']}/actions", boss, None, 200),
        ("GET", f"/zstack/v1/volumes/{rows['volume']}", member, None, 200),
        ("GET", "/v1/volumes", {"Authorization": "Bearer bv_not-a-key"}, None, 401),
        ("GET", "/v1/vm-instances", boss, None, 200),
    ]
    for number in range(count):
        method, path, headers, body, expected = calls[number % len(calls)]
        if method == "PUT":
            body = {"updateSchedulerTrigger": {"description": f"run {number}"}}
        answer = client.request(method, path, headers=headers, json=body)
        assert answer.status_code == expected, (path, answer.status_code, answer.text)


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--pg", default="postgresql+psycopg2://postgres@127.0.0.1:5432")
    parser.add_argument("--py-spy", metavar="FOLDED", help="sample the API with py-spy meanwhile, into FOLDED")
    parser.add_argument("--py-spy-bin", default="py-spy")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose API runs (default: this one)")
    parser.add_argument("--extra-path", default="", help="more import paths for the API (to try a package)")
    args = parser.parse_args()
    admin = "bench-admin-" + secrets.token_hex(12)
    with tempfile.TemporaryDirectory(prefix="apicpu-bench-") as folder, database(args.pg) as url:
        tmp = Path(folder)
        served = api(url, tmp, admin, args.tree, args.extra_path)
        with served as (base, process), httpx.Client(base_url=base, timeout=30) as client:
            rows = build(client, admin, url, tmp)
            mix(client, admin, rows, args.warmup)
            figures = []
            spy = None
            if args.py_spy:
                spy = subprocess.Popen(
                    [args.py_spy_bin, "record", "-p", str(process.pid), "-f", "raw", "-o", args.py_spy, "-r", "200"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1)
            for _run in range(args.runs):
                before = cpu(process)
                mix(client, admin, rows, args.requests)
                figures.append((cpu(process) - before) / args.requests * 1000)
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
            print(
                f"API CPU per request over {args.requests} requests, {args.runs} runs: "
                + ", ".join(f"{ms:.2f}" for ms in figures)
                + f" ms (best {min(figures):.2f})"
            )


if __name__ == "__main__":
    main()
