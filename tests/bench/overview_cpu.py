#!/usr/bin/env python3
"""The CPU a ``GET /v1/overview`` costs, in process: this tree's
:func:`shared.service.overview.overview` against another version of the module (``--old``, a
file, e.g. ``git show main:shared/service/overview.py > /tmp/overview_main.py``), alternated, on
one catalog (a ``tests/bench/console_overview.py --keep-db`` database).

    PYTHONPATH=$PWD .venv/bin/python tests/bench/overview_cpu.py --database NAME --old FILE
        [--rounds 3] [--calls 30] [--pg postgresql+psycopg2://postgres@127.0.0.1:5432]

First both versions' answers are compared (admin and a member; whole list, the console's page,
each status, a find, a later page, grace 0) and must be equal; then each round runs ``--calls``
calls of each version (an admin, the console's page of 100), old and new in turn, and prints
per call the API's CPU (``time.process_time`` around the service call) and the PostgreSQL
backend's (its ``/proc/<pid>/stat`` before and after), with the load average. Not a pytest test.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

from sqlalchemy import text

from shared.catalog import db
from shared.catalog.models import now
from shared.service import overview as new_overview


@dataclass(frozen=True)
class Viewer:
    account_uuid: str = "bench"
    admin: bool = True
    projects: frozenset[str] = field(default_factory=frozenset)


def backend_cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def load_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("overview_old", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def call(url: str, module: ModuleType, viewer: Viewer, options: Any) -> tuple[float, float]:
    """One overview: (API CPU ms, PostgreSQL CPU ms)."""
    with db.session(url) as session:
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        session.commit()
        pg = backend_cpu_ms(pid)
        api = time.process_time()
        module.overview(session, viewer, now(), options)
        api = time.process_time() - api
        pg = backend_cpu_ms(pid) - pg
    return api * 1000, pg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", required=True)
    parser.add_argument("--old", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--pg", default="postgresql+psycopg2://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    url = f"{args.pg}/{args.database}"
    old = load_module(args.old)
    with db.session(url) as session:
        projects = [p for (p,) in session.execute(text('SELECT DISTINCT "projectUuid" FROM vm_instance LIMIT 2')) if p]
    viewers = [Viewer(), Viewer(admin=False, projects=frozenset(projects[:1]))]
    choices: list[dict[str, Any]] = [{}, {"limit": 100}, {"limit": 100, "start": 300}, {"find": "vm-1", "limit": 50}]
    choices += [{"status": s, "limit": 100} for s in new_overview.STATUSES]
    choices += [{"grace": timedelta(0), "limit": 100}]
    moment = now()
    for viewer in viewers:
        for choice in choices:
            with db.session(url) as session:
                a = old.overview(session, viewer, moment, old.Options(**choice))
            with db.session(url) as session:
                b = new_overview.overview(session, viewer, moment, new_overview.Options(**choice))
            assert a == b, (viewer, choice)
    print(f"answers equal: {len(viewers) * len(choices)} (viewer, options) pairs")
    versions = {"old": old, "new": new_overview}
    for round_ in range(args.rounds):
        for name in ("old", "new") if round_ % 2 == 0 else ("new", "old"):
            module = versions[name]
            options = module.Options(limit=100)
            call(url, module, viewers[0], options)  # warm
            api = pg = 0.0
            for _ in range(args.calls):
                a, p = call(url, module, viewers[0], options)
                api += a
                pg += p
            load = os.getloadavg()[0]
            print(
                f"round {round_ + 1} {name}: API {api / args.calls:.1f} ms + PostgreSQL {pg / args.calls:.1f} ms"
                f" = {(api + pg) / args.calls:.1f} ms a call (load {load:.1f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
