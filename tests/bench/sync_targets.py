#!/usr/bin/env python3
"""Benchmark syncing blockvault backups to remote targets, side by side with ``restic copy``.

Run by ``make bench-sync`` as::

    .venv/bin/python tests/bench/sync_targets.py [--size-gib 2] [--change-percent 2] [--workdir DIR] [--keep]
        [--json FILE]

What it does, in one run and on the same data (the volume and helpers of ``compare_peers.py``):

1. builds a VM-like raw volume (about 30 % holes, 40 % compressible, 30 % random data);
2. full backup: blockvault's ``backup_volume`` into a plain local repository, ``restic backup``
   into a local repository A;
3. full sync: blockvault's ``sync`` of that backup into (a) a ``blockvault storage-server`` on
   loopback (a copy ``like`` the source: objects travel as stored) and (b) moto's S3 server on
   loopback behind the byte-counting ``tests/harness/tcp-proxy.py`` (a client-side encrypted
   copy, as public cloud always is: every chunk is decoded and sealed again); ``restic copy``
   from A into a local repository B made with ``--copy-chunker-params``;
4. rewrites ``--change-percent`` of the volume's 4 MiB-aligned regions with new random bytes
   (what ``compare_peers.apply_change`` does to the raw file), incremental backup with each tool
   and the same three syncs again.

For each sync: wall seconds; bytes on the wire towards the target, counters read before and
after (storage-server: ``GET /v1/stats`` bytesReceived, request bodies only; S3: the proxy's
client-to-server bytes, HTTP headers included); the bytes the target lacked (``SyncReport
.bytesCopied`` plus the stored manifest) and the ratio of the two (target <= 1.05x); how much
the target grew (``du -sb`` of the server's folder, summed object sizes in the bucket, ``du
-sb`` of restic's B); and restic copy's seconds over blockvault's. Before every timed step the
page cache is settled as in compare_peers (sync, drop caches, read the source repository back
in). Not a pytest test: it needs restic, qemu-img and moto, and takes minutes at full size.
Exit status 0 when every step worked (targets missed do not change it), 1 otherwise.
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
import random  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402

from shared.errors import BlockvaultError  # noqa: E402
from shared.repository.backends import open_backend  # noqa: E402
from shared.repository.backup import BackupResult, backup_volume  # noqa: E402
from shared.repository.repo import Repository, manifest_key  # noqa: E402
from shared.repository.sync import sync  # noqa: E402
from tests.bench.compare_peers import (  # noqa: E402
    CHANGE_UNIT,
    DEFAULT_SEED,
    PASSPHRASE,
    BenchError,
    GiB,
    Measured,
    MiB,
    VolumeInfo,
    build_volume,
    disk_usage,
    prefault_memory,
    read_through,
    run_measured,
    run_plain,
    settle,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PROXY = ROOT / "tests" / "harness" / "tcp-proxy.py"
TARGET_WIRE_RATIO = 1.05
START_SECONDS = 30.0
S3_ACCESS_KEY = "blockvault-bench-access"
S3_SECRET_KEY = "blockvault-bench-secret"
S3_REGION = "us-east-1"
S3_BUCKET = "blockvault-bench"
SERVER_REPO = "bench"
STEPS = ("full", "incremental")
STEP_LABEL = {"full": "full sync", "incremental": "incremental sync"}
TARGET_LABEL = {
    "storage-server": "storage-server (http, plain)",
    "s3": "s3 (moto via proxy, encrypted)",
    "restic": "restic copy local->local",
}


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# The volume change (apply_change on the raw file only: no qcow2 copy here)
# --------------------------------------------------------------------------------------------


def change_volume(raw: Path, info: VolumeInfo, percent: float) -> None:
    """Rewrite ``percent`` % of the 4 MiB-aligned regions of ``raw`` with new random bytes,
    drawn as ``compare_peers.apply_change`` draws them (the same bytes at 2 %)."""
    rng = random.Random(info.seed ^ 0x5EED)
    units = info.size // CHANGE_UNIT
    count = min(units, max(1, round(units * percent / 100)))
    chosen = sorted(rng.sample(range(units), count))
    with raw.open("r+b") as f:
        for unit in chosen:
            os.pwrite(f.fileno(), rng.randbytes(CHANGE_UNIT), unit * CHANGE_UNIT)
        os.fsync(f.fileno())
    info.changed_regions = chosen
    info.changed_bytes = count * CHANGE_UNIT
    info.raw_allocated_after_change = disk_usage(raw).allocated


# --------------------------------------------------------------------------------------------
# Processes: the storage server, moto and the proxy
# --------------------------------------------------------------------------------------------


class Processes:
    """Every process the benchmark starts; ``stop_all`` ends each of them (by its own handle)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        self.started.append((name, proc, log))
        return proc

    def wait_answers(self, name: str, url: str, headers: dict[str, str] | None = None) -> None:
        """Until ``url`` answers (any HTTP status); BenchError with the log's end if the process
        exits or does not answer within START_SECONDS."""
        _, proc, log = next(entry for entry in self.started if entry[0] == name)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # it answered, if with an error
            except OSError:
                time.sleep(0.05)
        raise BenchError(f"{name} did not answer {url} within {START_SECONDS:.0f} s:\n{_tail(log)}")

    def stop_all(self) -> None:
        for name, proc, _ in reversed(self.started):
            if proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                print(f"{name} (pid {proc.pid}) ignored SIGTERM: killing it", file=sys.stderr)
                proc.kill()
                proc.wait(15)
        self.started.clear()


def _tail(log: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def _get_json(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
        parsed: dict[str, Any] = json.loads(response.read())
        return parsed


# --------------------------------------------------------------------------------------------
# Sync targets
# --------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """One sync (or restic copy) of one step to one target."""

    step: str
    target: str
    seconds: float
    wire: int | None  # bytes towards the target
    lacked: int | None  # stored bytes the target lacked (chunks + manifest)
    grew: int  # bytes the target's store grew by (apparent size)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.wire / self.lacked if self.wire is not None and self.lacked else None


class Target:
    """A blockvault repository on a server this benchmark runs, with the server's counters."""

    name = ""
    repo: Repository

    def wire(self) -> dict[str, int]:
        """The server's byte counters; ``"in"`` is what went towards it."""
        raise NotImplementedError

    def stored(self) -> int:
        """Bytes the target holds (sum of object sizes)."""
        raise NotImplementedError


class ServerTarget(Target):
    """``blockvault storage-server`` on loopback; a copy of the source with the same keys."""

    name = "storage-server"

    def __init__(self, procs: Processes, workdir: Path, src: Repository) -> None:
        self.root = workdir / "server-root"
        self.root.mkdir()
        self.token = secrets.token_urlsafe(24)
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKVAULT_")}
        env["BLOCKVAULT_STORAGE_TOKEN"] = self.token  # not on the command line: ps shows that
        port = self.url.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "api.cli", "storage-server", "--root", str(self.root), "--port", port]
        procs.start(self.name, cmd, env)
        procs.wait_answers(self.name, f"{self.url}/v1/health")
        backend = open_backend(f"{self.url}/{SERVER_REPO}", {"token": self.token})
        self.repo = Repository.init(backend, like=src)

    def wire(self) -> dict[str, int]:
        stats = _get_json(f"{self.url}/v1/stats", {"authorization": f"Bearer {self.token}"})
        return {
            "in": stats["bytesReceived"],
            "out": stats["bytesSent"],
            "requests": stats["requests"],
            "objectsWritten": stats["objectsWritten"],
        }

    def stored(self) -> int:
        return disk_usage(self.root / SERVER_REPO).apparent


class S3Target(Target):
    """moto's S3 server behind the byte-counting proxy; an encrypted copy of the source."""

    name = "s3"

    def __init__(self, procs: Processes, src: Repository) -> None:
        moto_port, proxy_port, self.control_port = free_port(), free_port(), free_port()
        moto = Path(sys.executable).with_name("moto_server")
        if not moto.exists():
            raise BenchError(f"{moto} is missing: pip install 'moto[server]' (the dev extra)")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
        procs.start("moto", [str(moto), "-H", "127.0.0.1", "-p", str(moto_port)], env)
        procs.wait_answers("moto", f"http://127.0.0.1:{moto_port}/moto-api/data.json")
        proxy_cmd = [
            sys.executable,
            str(PROXY),
            "--listen",
            f"127.0.0.1:{proxy_port}",
            "--target",
            f"127.0.0.1:{moto_port}",
            "--control",
            f"127.0.0.1:{self.control_port}",
        ]
        procs.start("tcp-proxy", proxy_cmd)
        procs.wait_answers("tcp-proxy", f"http://127.0.0.1:{self.control_port}/stats")
        self.client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{moto_port}",  # straight to moto: not counted
            region_name=S3_REGION,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}),
        )
        self.client.create_bucket(Bucket=S3_BUCKET)
        options: dict[str, str | None] = {
            "endpoint": f"http://127.0.0.1:{proxy_port}",
            "region": S3_REGION,
            "accessKey": S3_ACCESS_KEY,
            "secretKey": S3_SECRET_KEY,
        }
        backend = open_backend(f"s3://{S3_BUCKET}/copy", options)
        self.repo = Repository.init(backend, like=src, encrypt=True, passphrase=PASSPHRASE)

    def wire(self) -> dict[str, int]:
        stats = _get_json(f"http://127.0.0.1:{self.control_port}/stats")
        return {"in": stats["in"], "out": stats["out"], "connections": stats["connections"]}

    def stored(self) -> int:
        total = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET):
            total += sum(item.get("Size", 0) for item in page.get("Contents", ()))
        return total


def timed_sync(src: Repository, src_dir: Path, target: Target, backup_id: str, step: str) -> Figures:
    settle([src_dir])
    before, stored_before = target.wire(), target.stored()
    started = time.perf_counter()
    report = sync(src, target.repo, [backup_id])
    seconds = time.perf_counter() - started
    after = target.wire()
    manifest = target.repo.backend.stat(manifest_key(backup_id)).size if report.backups else 0
    delta = {key: after[key] - before[key] for key in after}
    detail: dict[str, Any] = {
        "chunksCopied": report.chunksCopied,
        "bytesCopied": report.bytesCopied,
        "manifestBytes": manifest,
        "bytesBack": delta.pop("out"),
    }
    wire = delta.pop("in")
    detail.update(delta)
    return Figures(
        step, target.name, seconds, wire, report.bytesCopied + manifest, target.stored() - stored_before, detail
    )


# --------------------------------------------------------------------------------------------
# restic: backup into A, copy A -> B
# --------------------------------------------------------------------------------------------


class ResticPair:
    def __init__(self, workdir: Path, volume: Path, scratch: Path) -> None:
        self.workdir, self.volume, self.scratch = workdir, volume, scratch
        self.a, self.b = workdir / "restic-a", workdir / "restic-b"
        self.env = dict(os.environ)
        self.env.update(
            RESTIC_PASSWORD=PASSPHRASE,
            RESTIC_FROM_PASSWORD=PASSPHRASE,
            RESTIC_CACHE_DIR=str(workdir / "restic-cache"),
        )
        self.version = ""

    def run(self, cmd: Sequence[str], warm: Sequence[Path]) -> Measured:
        return run_measured(cmd, env=self.env, cwd=self.workdir, scratch=self.scratch, warm=warm)

    def init(self) -> None:
        self.version = run_plain(["restic", "version"]).stdout.split()[1]
        self.run(["restic", "-r", str(self.a), "init"], [])
        self.run(["restic", "-r", str(self.b), "init", "--from-repo", str(self.a), "--copy-chunker-params"], [])

    def backup(self, label: str) -> tuple[float, dict[str, Any]]:
        m = self.run(["restic", "-r", str(self.a), "backup", "--json", "--tag", label, str(self.volume)], [self.volume])
        detail: dict[str, Any] = {}
        for line in m.stdout.splitlines():
            if '"summary"' in line:
                summary = json.loads(line)
                detail = {k: summary.get(k) for k in ("data_added", "total_bytes_processed", "snapshot_id")}
        return m.seconds, detail

    def copy(self, step: str) -> Figures:
        before = disk_usage(self.b)
        m = self.run(["restic", "-r", str(self.b), "copy", "--from-repo", str(self.a)], [self.a])
        after = disk_usage(self.b)
        detail = {"grewAllocated": after.allocated - before.allocated, "peakRss": m.peak_rss}
        return Figures(step, "restic", m.seconds, None, None, after.apparent - before.apparent, detail)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class BackupFigures:
    step: str
    tool: str
    seconds: float
    detail: dict[str, Any]


@dataclass
class Results:
    volume: VolumeInfo
    change_percent: float
    restic_version: str = ""
    backups: list[BackupFigures] = field(default_factory=list)
    syncs: list[Figures] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def find(self, step: str, target: str) -> Figures | None:
        return next((f for f in self.syncs if f.step == step and f.target == target), None)


def _blockvault_backup(repo: Repository, raw: Path, repo_dir: Path, step: str) -> tuple[BackupResult, BackupFigures]:
    settle([raw, repo_dir])
    started = time.perf_counter()
    result = backup_volume(repo, str(raw), full=step == "full")
    seconds = time.perf_counter() - started
    keys = ("mode", "bytesRead", "bytesWritten", "chunks", "newChunks")
    detail = {k: v for k, v in result.to_json().items() if k in keys}
    return result, BackupFigures(step, "blockvault", seconds, detail)


def run_benchmark(workdir: Path, size: int, seed: int, percent: float, results_out: list[Results]) -> Results:
    scratch = workdir / "scratch"
    logs = workdir / "logs"
    scratch.mkdir()
    logs.mkdir()
    raw = workdir / "volume.raw"
    qcow2 = workdir / "volume.qcow2"
    _say(f"building a {size / GiB:g} GiB volume (seed {seed}) in {workdir}")
    info = build_volume(raw, qcow2, size, seed)
    qcow2.unlink()  # build_volume makes a qcow2 copy for compare_peers; not used here
    results = Results(info, percent)
    results_out.append(results)
    src_dir = workdir / "repo-src"
    procs = Processes(logs)
    src = Repository.init(str(src_dir))
    targets: list[Target] = []
    try:
        _say("starting the storage server, moto and the proxy")
        targets.append(ServerTarget(procs, workdir, src))
        targets.append(S3Target(procs, src))
        restic = ResticPair(workdir, raw, scratch)
        restic.init()
        results.restic_version = restic.version
        read_through(raw)
        for step in STEPS:
            if step == "incremental":
                _say(f"rewriting {percent:g} % of the 4 MiB regions")
                change_volume(raw, info, percent)
            _say(f"{step} backup: blockvault")
            backup, figures = _blockvault_backup(src, raw, src_dir, step)
            results.backups.append(figures)
            _say(f"{step} backup: restic")
            seconds, detail = restic.backup(step)
            results.backups.append(BackupFigures(step, "restic", seconds, detail))
            for target in targets:
                _say(f"{step} sync: blockvault -> {target.name}")
                try:
                    results.syncs.append(timed_sync(src, src_dir, target, backup.id, step))
                except (BenchError, BlockvaultError) as exc:
                    results.errors.append(f"{step} sync to {target.name}: {exc}")
                    print(f"\n!!! {step} sync to {target.name} FAILED: {exc}\n", file=sys.stderr, flush=True)
            _say(f"{step} copy: restic A -> B")
            try:
                results.syncs.append(restic.copy(step))
            except BenchError as exc:
                results.errors.append(f"{step} restic copy: {exc}")
                print(f"\n!!! {step} restic copy FAILED: {exc}\n", file=sys.stderr, flush=True)
    finally:
        for target in targets:
            with contextlib.suppress(Exception):
                target.repo.close()
        src.close()
        procs.stop_all()
    return results


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mib(value: int | None) -> str:
    return _fmt(None if value is None else value / MiB, ".2f")


def print_report(results: Results) -> None:
    info = results.volume
    print()
    print(
        f"Volume: {info.size / GiB:g} GiB raw (seed {info.seed}): holes {info.hole_bytes / MiB:.0f} MiB, compressible "
        f"{info.compressible_bytes / MiB:.0f} MiB, random {info.random_bytes / MiB:.0f} MiB; change: "
        f"{len(info.changed_regions)} of {info.size // CHANGE_UNIT} 4 MiB regions rewritten with random data "
        f"({info.changed_bytes / MiB:.0f} MiB, {results.change_percent:g} %)"
    )
    print(
        f"Sources: blockvault plain local repository (zstd); restic {results.restic_version} local repository "
        "(encrypted, zstd auto). Warm cache: before each step sync, drop caches, read the source back in."
    )
    print("Backups (context, not in the table):")
    for b in results.backups:
        detail = ", ".join(f"{k}={v}" for k, v in b.detail.items())
        print(f"  {b.tool:<10} {b.step:<12} {b.seconds:8.2f} s  {detail}")
    print()
    headers = ["step", "target", "seconds", "wire MiB", "lacked MiB", "wire/lacked", "grew MiB", "restic s / bv s"]
    table: list[list[str]] = []
    for step in STEPS:
        restic = results.find(step, "restic")
        for name in ("storage-server", "s3", "restic"):
            fig = results.find(step, name)
            if fig is None:
                table.append([STEP_LABEL[step], TARGET_LABEL[name], "FAILED", "", "", "", "", ""])
                continue
            ratio = fig.ratio
            mark = "" if ratio is None else (" ok" if ratio <= TARGET_WIRE_RATIO else " MISS")
            speed = "(reference)" if name == "restic" else "-"
            if name != "restic" and restic is not None and fig.seconds > 0:
                speed = f"{restic.seconds / fig.seconds:.2f}"
            table.append(
                [
                    STEP_LABEL[step],
                    TARGET_LABEL[name],
                    f"{fig.seconds:.2f}",
                    _mib(fig.wire),
                    _mib(fig.lacked),
                    _fmt(ratio, ".3f") + mark,
                    _mib(fig.grew),
                    speed,
                ]
            )
    widths = [max(len(headers[i]), *(len(r[i]) for r in table)) for i in range(len(headers))]
    left = 2  # step and target columns are left-aligned

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(line(headers))
    print("-" * len(line(headers)))
    for row in table:
        print(line(row))
    print(
        f"wire: storage-server request bodies (GET /v1/stats bytesReceived); s3 every byte the proxy passed towards "
        f"moto (HTTP headers included). lacked: SyncReport.bytesCopied + the stored manifest. Target wire/lacked <= "
        f"{TARGET_WIRE_RATIO:g}. restic s / bv s > 1: blockvault faster."
    )
    print()
    print("Per sync:")
    for fig in results.syncs:
        detail = ", ".join(f"{k}={v}" for k, v in fig.detail.items())
        print(f"  {fig.step:<12} {fig.target:<15} {fig.seconds:8.2f} s  wire={fig.wire} lacked={fig.lacked}  {detail}")
    for error in results.errors:
        print(f"  ERROR: {error.splitlines()[0]}")
    print()
    print("README:", summary_line(results))
    print()


def summary_line(results: Results) -> str:
    def secs(target: str) -> str:
        parts = [results.find(step, target) for step in STEPS]
        return " / ".join(_fmt(p.seconds if p else None, ".1f") for p in parts) + " s"

    def ratios(target: str) -> str:
        parts = [results.find(step, target) for step in STEPS]
        return " / ".join(_fmt(p.ratio if p else None, ".3f") for p in parts)

    info = results.volume
    return (
        f"Sync of a {info.size / GiB:g} GiB VM volume's backup, full / incremental after a "
        f"{results.change_percent:g} % change, on loopback: storage-server {secs('storage-server')} "
        f"(wire/lacked {ratios('storage-server')}), "
        f"S3 (moto, client-side encrypted) {secs('s3')} (wire/lacked {ratios('s3')}); restic copy local->local "
        f"{secs('restic')}."
    )


def results_json(results: Results) -> dict[str, Any]:
    return {
        "volume": asdict(results.volume),
        "changePercent": results.change_percent,
        "resticVersion": results.restic_version,
        "backups": [asdict(b) for b in results.backups],
        "syncs": [{**asdict(f), "ratio": f.ratio} for f in results.syncs],
        "summary": summary_line(results),
        "errors": results.errors,
        "ok": not results.errors,
    }


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-gib", type=float, default=2.0, help="volume size in GiB (default 2; 0.25 is quick)")
    parser.add_argument("--change-percent", type=float, default=2.0, help="%% of 4 MiB regions rewritten (default 2)")
    parser.add_argument("--workdir", type=Path, help="where to make the run's directory (default /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (volume, repositories, logs)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON ('-': stdout)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the volume's layout and content")
    parser.add_argument("--no-prefault", action="store_true", help="skip touching free memory first")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    size = int(args.size_gib * GiB) // CHANGE_UNIT * CHANGE_UNIT
    if size < 64 * MiB:
        print("--size-gib must give at least 64 MiB", file=sys.stderr)
        return 2
    if not 0 < args.change_percent <= 100:
        print("--change-percent must be in (0, 100]", file=sys.stderr)
        return 2
    for tool in ("restic", "qemu-img"):
        if not shutil.which(tool):
            print(f"error: {tool} is not installed", file=sys.stderr)
            return 2
    parent = args.workdir or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    needed = 5 * size + GiB
    free = shutil.disk_usage(parent).free
    if free < needed:
        print(f"error: {parent} has {free / GiB:.1f} GiB free, the run needs about {needed / GiB:.1f}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="blockvault-bench-sync-", dir=parent)).resolve()
    started = time.perf_counter()
    if not args.no_prefault:
        prefault_memory()
    holder: list[Results] = []
    try:
        results = run_benchmark(workdir, size, args.seed, args.change_percent, holder)
    except (BenchError, BlockvaultError) as exc:
        print(f"\n!!! benchmark aborted: {exc}", file=sys.stderr)
        if holder:
            print_report(holder[0])
        return 1
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(results)
    if args.json:
        text = json.dumps(results_json(results), indent=2) + "\n"
        if str(args.json) == "-":
            sys.stdout.write(text)
        else:
            args.json.write_text(text)
            print(f"figures written to {args.json}")
    print(f"benchmark took {math.ceil(time.perf_counter() - started)} s")
    if results.errors:
        print("FAILED: a step failed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
