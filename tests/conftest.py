"""Shared fixtures: volumes that look like VM disks, repositories, and the real CLI."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.repository.repo import Repository

pytest_plugins = [
    "tests.services",
    "tests.storage_server_fixtures",
    "tests.s3_fixtures",
    "tests.qemu_fixtures",
    "tests.libvirt_fixtures",
    "tests.rabbitmq_fixtures",
    "tests.full_disk",
]

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


# The suite's layers (docs/testing.md). The system layer starts the service as processes (the
# API, Celery workers, browsers, network namespaces): its folders are marked slow, as are the
# long tests of the other layers listed here; `make test` runs them, `make test-fast` does not.
SLOW_SUITES = ("service", "multihost", "console", "zstack")
SLOW_MODULES = (  # each over a minute in the first parallel run (load 10 to 20), most start processes
    "api/test_authorization_matrix.py",
    "api/test_host_safety.py",
    "api/test_metrics.py",
    "api/test_openapi_client.py",
    "api/test_repo_cli.py",
    "api/test_storage_credentials.py",
    "shared/files/test_browse.py",
    "shared/libvirt/test_backup.py",
    "shared/repository/test_faults.py",
    "shared/repository/test_http_backend.py",
    "shared/repository/test_http_server.py",
    "shared/repository/test_live.py",
    "shared/repository/test_maintenance.py",
    "shared/repository/test_nbdserver.py",
    "shared/repository/test_s3_backend.py",
    "shared/repository/test_scale.py",
    "shared/repository/test_sync_remote.py",
    "shared/service/test_libvirt.py",
    "shared/service/test_libvirt_backups.py",
    "shared/test_dbdump.py",
    "shared/test_production.py",
    "test_qemu_fixtures.py",
)


# The longest tests (minutes each on the loaded machine), longest first: under xdist they start
# first, in this order. The soak (3 minutes of faults, then its checks: 585 s in CI's loaded run)
# was not listed and started late, so the run ended with it.
LONGEST = (
    "service/test_soak.py",
    "service/test_schemathesis.py",
    "service/test_scheduler.py",
    "service/test_database_backups.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow: list[pytest.Item] = []
    for item in items:
        where = item.path.relative_to(ROOT / "tests").as_posix()
        if where.split("/", 1)[0] in SLOW_SUITES or where in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
            slow.append(item)
    workers = int(getattr(config, "workerinput", {}).get("workercount", 0))
    if workers > 1:
        items[:] = spread_slow_first(items, slow, workers)


def _longest_rank(nodeid: str) -> int:
    """Where a test stands in LONGEST (``len(LONGEST)`` when it is not there)."""
    return next((i for i, module in enumerate(LONGEST) if nodeid.startswith(f"tests/{module}")), len(LONGEST))


def spread_slow_first(items: list[pytest.Item], slow: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """The order that starts the slow tests first on every worker under ``--dist worksteal``,
    which hands worker i the i-th of ``workers`` consecutive chunks (each ``remaining //
    workers left``) and lets an idle worker steal from the end of a busy one's queue: the slow
    tests, the LONGEST first (in its order), dealt in turn to the chunks' heads, the others after them. In
    collection order the longest test (schemathesis, 9 minutes) started half-way and decided
    the end of the run. Every worker computes the same order from the same collection."""
    slow_ids = {id(item) for item in slow}
    first = sorted(slow, key=lambda item: _longest_rank(item.nodeid))
    rest = [item for item in items if id(item) not in slow_ids]
    heads: list[list[pytest.Item]] = [first[i::workers] for i in range(workers)]
    ordered: list[pytest.Item] = []
    remaining = len(items)
    for i, head in enumerate(heads):
        size = remaining // (workers - i)
        fill = max(size - len(head), 0)
        ordered += head + rest[:fill]
        rest = rest[fill:]
        remaining -= len(head) + fill
    return ordered + rest


SHORT_BASETEMP = "bvt"


@pytest.hookimpl(tryfirst=True)  # before pytest's tmp_path factory reads the option
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("numprocesses", None) and not hasattr(config, "workerinput") and not config.option.basetemp:
        # pytest-xdist puts each worker's folders in <basetemp>/popen-gw<n>: under pytest's own
        # /tmp/pytest-of-<user>/pytest-<n> that leaves a socket in a test's folder (QMP, NBD
        # exports) past AF_UNIX's 108 bytes. $TMPDIR/bvt<pid> is shorter than the serial run's.
        tmp = Path(tempfile.gettempdir())
        for old in tmp.glob(SHORT_BASETEMP + "*"):
            pid = old.name.removeprefix(SHORT_BASETEMP)
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(old, ignore_errors=True)  # a finished run's
        config.option.basetemp = str(tmp / f"{SHORT_BASETEMP}{os.getpid()}")
    # A test that needs a tool the harness could not install fails; it never skips quietly.
    missing = [tool for tool in ("qemu-img", "qemu-nbd", "qemu-io", "qemu-system-x86_64") if shutil.which(tool) is None]
    if missing:
        raise pytest.UsageError(f"missing {', '.join(missing)}: run tests/harness/ensure-system")


def write_regions(path: Path, size: int, regions: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset, data in regions:
            handle.seek(offset)
            handle.write(data)


def vm_like_regions(size: int, seed: int, unit: int = MiB) -> list[tuple[int, bytes]]:
    """Holes, text-like and random regions, unit-aligned, deterministic."""
    rng = random.Random(seed)
    regions = []
    offset = 0
    while offset < size:
        length = min(rng.choice((1, 2, 3)) * unit, size - offset)
        kind = rng.random()
        if kind < 0.35:
            pass
        elif kind < 0.7:
            text = b"".join(f"{offset}:{i} some log text\n".encode() for i in range(200))
            regions.append((offset, (text * (length // len(text) + 1))[:length]))
        else:
            regions.append((offset, rng.randbytes(length)))
        offset += length
    return regions


@pytest.fixture
def make_raw(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "vol.raw", size: int = 24 * MiB, seed: int = 1) -> Path:
        path = tmp_path / name
        write_regions(path, size, vm_like_regions(size, seed))
        return path

    return make


@pytest.fixture
def make_qcow2(tmp_path: Path, make_raw: Callable[..., Path]) -> Callable[..., Path]:
    def make(name: str = "vol.qcow2", size: int = 24 * MiB, seed: int = 2) -> Path:
        raw = make_raw(name + ".src", size, seed)
        path = tmp_path / name
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(path)], check=True)
        raw.unlink()
        return path

    return make


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    repository = Repository.init(str(tmp_path / "repo"))
    yield repository
    repository.close()


def qemu_write(path: Path, offset: int, length: int, pattern: int) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", str(path)],
        check=True,
        capture_output=True,
    )


def qcow2_equal(a: Path, b: Path) -> bool:
    return (
        subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)], capture_output=True, check=False).returncode == 0
    )


def raw_content(path: Path) -> bytes:
    return path.read_bytes()


class Cli:
    """Runs the real ``blockvault`` command in a child process."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(
        self, *args: str, check: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "api.cli", *args],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            cwd=ROOT,
            timeout=300,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"blockvault {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def json(self, *args: str, env: dict[str, str] | None = None) -> Any:
        return json.loads(self.run(*args, "--json", check=True, env=env).stdout)

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "api.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**self.env, **(env or {})},
            cwd=ROOT,
        )


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
    env["BLOCKVAULT_DATA_DIR"] = str(tmp_path / "data")
    return Cli(env)
