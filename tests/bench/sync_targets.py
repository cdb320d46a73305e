#!/usr/bin/env python3
"""Benchmark copying backups to remote targets: blockvault's ``repo sync`` side by side with ``restic copy``.

Run by ``make bench-sync`` as::

    .venv/bin/python tests/bench/sync_targets.py [--size-gib 2] [--change-percent 2] [--workdir DIR] [--keep]
        [--json FILE]

Like with like: both tools run as processes, each timed from start to exit (blockvault is this
checkout's CLI, ``python -m api.cli``, Python start-up included), on encrypted repositories
with the same passphrase, from a local source to the same kinds of target. What a tool does
differently by design is printed with the figures ("What differs").

What it does, in one run and on the same data (the volume and helpers of ``compare_peers.py``):

1. builds a VM-like raw volume (about 30 % holes, 40 % compressible, 30 % random data);
2. full backup: ``blockvault repo backup`` into an encrypted local repository (``repo init
   --encrypt``), ``restic backup`` into a local repository A;
3. full copy to each target, timed: ``blockvault repo sync SRC DST`` into (a) a local folder,
   (b) a ``blockvault storage-server`` on loopback and (c) moto's S3 server on loopback behind
   the byte-counting ``tests/harness/tcp-proxy.py``, each target made beforehand like the
   source (as ``repo sync`` makes one); ``restic copy --from-repo A`` into (a) a local
   repository B and (c) the same S3 server and proxy, each made beforehand with ``init
   --from-repo A --copy-chunker-params``. restic has no client for the storage-server (b);
4. rewrites ``--change-percent`` of the volume's 4 MiB-aligned regions with new random bytes
   (what ``compare_peers.apply_change`` does to the raw file), incremental backup with each tool
   and the same copies again.

For each copy: wall seconds and peak RSS of the process; bytes on the wire towards the target,
counters read before and after (storage-server: ``GET /v1/stats`` bytesReceived, request bodies
only; S3: the proxy's client-to-server bytes, HTTP headers included); for blockvault the bytes
the target lacked (the sync's ``bytesCopied`` plus the stored manifest) and the ratio of the two
(target <= 1.05x); how much the target grew (``du -sb`` of a folder, summed object sizes under
the tool's prefix in the bucket); and restic's seconds over blockvault's on the same target.
Before every timed step the page cache is settled as in compare_peers (sync, drop caches, read
the source repository back in). Not a pytest test: it needs restic, qemu-img and moto, and
takes minutes at full size. Exit status 0 when every step worked (targets missed do not change
it), 1 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make ``tests.bench.compare_peers`` importable
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
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
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402

from shared.errors import BlockvaultError  # noqa: E402
from shared.repository.backends import Backend, open_backend  # noqa: E402
from shared.repository.repo import Repository, manifest_key  # noqa: E402
from tests.bench.compare_peers import (  # noqa: E402
    CHANGE_UNIT,
    DEFAULT_SEED,
    PASSPHRASE,
    BenchError,
    GiB,
    Measured,
    MiB,
    VolumeInfo,
    blockvault_json,
    build_volume,
    disk_usage,
    prefault_memory,
    read_through,
    run_measured,
    run_plain,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PROXY = ROOT / "tests" / "harness" / "tcp-proxy.py"
BLOCKVAULT = [sys.executable, "-m", "api.cli"]  # this checkout's CLI (every process runs in ROOT)
TARGET_WIRE_RATIO = 1.05
START_SECONDS = 30.0
S3_KEYS = {"AWS_ACCESS_KEY_ID": "blockvault-bench-access", "AWS_SECRET_ACCESS_KEY": "blockvault-bench-secret"}
S3_REGION = "us-east-1"
S3_BUCKET = "blockvault-bench"
SERVER_REPO = "bench"
STEPS = ("full", "incremental")
STEP_LABEL = {"full": "full copy", "incremental": "incremental copy"}
TARGET_LABEL = {
    "local": "local folder",
    "storage-server": "storage-server (http)",
    "s3": "s3 (moto via proxy)",
}
ROWS = (
    ("local", "blockvault"),
    ("local", "restic"),
    ("s3", "blockvault"),
    ("s3", "restic"),
    ("storage-server", "blockvault"),
)


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
# The tools: each command a measured process
# --------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """One copy of one step to one target by one tool."""

    step: str
    target: str
    tool: str
    seconds: float
    peak_rss: int
    wire: int | None  # bytes towards the target (None: a local folder, nothing on a wire)
    lacked: int | None  # stored bytes the target lacked (chunks + manifest; blockvault only)
    grew: int  # bytes the target's store grew by (apparent size)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.wire / self.lacked if self.wire is not None and self.lacked else None


@dataclass
class BackupFigures:
    step: str
    tool: str
    seconds: float
    detail: dict[str, Any]


class Tool:
    """A tool's commands, each run as a measured process in ``workdir`` with ``env``."""

    name = ""

    def __init__(self, workdir: Path, volume: Path, scratch: Path, env: dict[str, str]) -> None:
        self.workdir, self.volume, self.scratch, self.env = workdir, volume, scratch, env
        self.source = workdir / f"{self.name}-src"

    def run(self, cmd: Sequence[str], warm: Sequence[Path], env: dict[str, str] | None = None) -> Measured:
        return run_measured(cmd, env={**self.env, **(env or {})}, cwd=ROOT, scratch=self.scratch, warm=warm)


class BlockvaultCli(Tool):
    """This checkout's ``blockvault`` CLI on an encrypted local source repository."""

    name = "blockvault"

    def init(self) -> None:
        self.run([*BLOCKVAULT, "repo", "init", str(self.source), "--encrypt", "--json"], [])

    def backup(self, step: str) -> tuple[str, BackupFigures]:
        cmd = [*BLOCKVAULT, "repo", "backup", str(self.source), str(self.volume), "--json"]
        m = self.run([*cmd, "--full"] if step == "full" else cmd, [self.volume, self.source])
        out = blockvault_json(m, "repo backup")
        keys = ("mode", "bytesRead", "bytesWritten", "chunks", "newChunks")
        return str(out["id"]), BackupFigures(step, self.name, m.seconds, {k: out.get(k) for k in keys})

    def copy(self, target: Target, step: str, backup_id: str) -> Figures:
        """``repo sync`` of the source into ``target`` (made beforehand like the source)."""
        before, stored_before = target.wire(), target.stored()
        m = self.run(
            [*BLOCKVAULT, "repo", "sync", str(self.source), target.location, "--json"], [self.source], target.env
        )
        report = blockvault_json(m, "repo sync")
        manifest = target.backend.stat(manifest_key(backup_id)).size if report["backups"] else 0
        keys = ("chunksCopied", "bytesCopied")
        detail: dict[str, Any] = {"manifestBytes": manifest, **{k: report[k] for k in keys}}
        wire = _delta(before, target.wire(), detail)
        grew = target.stored() - stored_before
        return Figures(
            step, target.name, self.name, m.seconds, m.peak_rss, wire, report["bytesCopied"] + manifest, grew, detail
        )


class ResticCli(Tool):
    """restic: backups into a local repository A, copies into repositories made from A."""

    name = "restic"

    def __init__(self, workdir: Path, volume: Path, scratch: Path, env: dict[str, str]) -> None:
        super().__init__(workdir, volume, scratch, env)
        self.env.update(RESTIC_PASSWORD=PASSPHRASE, RESTIC_FROM_PASSWORD=PASSPHRASE)
        self.env.update(RESTIC_CACHE_DIR=str(workdir / "restic-cache"))
        self.version = ""

    def init(self) -> None:
        self.version = run_plain(["restic", "version"]).stdout.split()[1]
        self.run(["restic", "-r", str(self.source), "init"], [])

    def backup(self, step: str) -> BackupFigures:
        m = self.run(
            ["restic", "-r", str(self.source), "backup", "--json", "--tag", step, str(self.volume)], [self.volume]
        )
        detail: dict[str, Any] = {}
        for line in m.stdout.splitlines():
            if '"summary"' in line:
                summary = json.loads(line)
                detail = {k: summary.get(k) for k in ("data_added", "total_bytes_processed", "snapshot_id")}
        return BackupFigures(step, self.name, m.seconds, detail)

    def make_target(self, target: Target) -> None:
        self.run(
            ["restic", *target.restic_args, "init", "--from-repo", str(self.source), "--copy-chunker-params"],
            [],
            target.env,
        )

    def copy(self, target: Target, step: str) -> Figures:
        before, stored_before = target.wire(), target.stored()
        m = self.run(
            ["restic", *target.restic_args, "copy", "--from-repo", str(self.source)], [self.source], target.env
        )
        detail: dict[str, Any] = {}
        wire = _delta(before, target.wire(), detail)
        return Figures(
            step, target.name, self.name, m.seconds, m.peak_rss, wire, None, target.stored() - stored_before, detail
        )


def _delta(before: dict[str, int] | None, after: dict[str, int] | None, detail: dict[str, Any]) -> int | None:
    """Bytes towards the target between two counter readings (None for a local folder); the
    other counters' differences go into ``detail``."""
    if before is None or after is None:
        return None
    delta = {key: after[key] - before[key] for key in after}
    detail["bytesBack"] = delta.pop("out")
    wire = delta.pop("in")
    detail.update(delta)
    return wire


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


class Target:
    """Where a tool copies to: ``location`` for blockvault, ``restic_args`` (``-r ... -o ...``)
    for restic, ``env`` for either; ``backend`` opens it in this process to read what a copy
    stored (never timed)."""

    name = ""
    location = ""
    restic_args: list[str]
    env: dict[str, str]
    backend: Backend

    def wire(self) -> dict[str, int] | None:
        """The server's byte counters (``"in"``: towards it, ``"out"``), None for a folder."""
        return None

    def stored(self) -> int:
        """Bytes the target holds (sum of object sizes)."""
        raise NotImplementedError


class FolderTarget(Target):
    def __init__(self, path: Path, name: str = "local") -> None:
        self.path, self.name = path, name
        self.location, self.restic_args, self.env = str(path), ["-r", str(path)], {}

    def make_like(self, src: Repository) -> None:
        self.backend = open_backend(self.location, {})
        Repository.init(self.backend, like=src, passphrase=PASSPHRASE)

    def stored(self) -> int:
        return disk_usage(self.path).apparent if self.path.exists() else 0


class ServerTarget(Target):
    """``blockvault storage-server`` on loopback (blockvault only)."""

    name = "storage-server"

    def __init__(self, procs: Processes, workdir: Path, src: Repository) -> None:
        self.root = workdir / "server-root"
        self.root.mkdir()
        self.token = secrets.token_urlsafe(24)
        url = f"http://127.0.0.1:{free_port()}"
        self.url, self.location = url, f"{url}/{SERVER_REPO}"
        self.env = {"BLOCKVAULT_STORAGE_TOKEN": self.token}  # not on a command line: ps shows that
        port = url.rsplit(":", 1)[1]
        cmd = [*BLOCKVAULT, "storage-server", "--root", str(self.root), "--port", port]
        procs.start(self.name, cmd, {**blockvault_env(), **self.env})
        procs.wait_answers(self.name, f"{url}/v1/health")
        self.backend = open_backend(self.location, {"token": self.token})
        Repository.init(self.backend, like=src, passphrase=PASSPHRASE)

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


class S3Server:
    """moto's S3 server behind the byte-counting proxy: one bucket, a prefix per tool."""

    def __init__(self, procs: Processes) -> None:
        moto_port, self.proxy_port, self.control_port = free_port(), free_port(), free_port()
        moto = Path(sys.executable).with_name("moto_server")
        if not moto.exists():
            raise BenchError(f"{moto} is missing: pip install 'moto[server]' (the dev extra)")
        procs.start("moto", [str(moto), "-H", "127.0.0.1", "-p", str(moto_port)], {**os.environ, **S3_KEYS})
        procs.wait_answers("moto", f"http://127.0.0.1:{moto_port}/blockvault-probe-no-such-bucket")
        proxy_cmd = [sys.executable, str(PROXY), "--listen", f"127.0.0.1:{self.proxy_port}"]
        proxy_cmd += ["--target", f"127.0.0.1:{moto_port}", "--control", f"127.0.0.1:{self.control_port}"]
        procs.start("tcp-proxy", proxy_cmd)
        procs.wait_answers("tcp-proxy", f"http://127.0.0.1:{self.control_port}/stats")
        self.endpoint = f"http://127.0.0.1:{self.proxy_port}"
        self.client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{moto_port}",  # straight to moto: not counted
            region_name=S3_REGION,
            aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}),
        )
        self.client.create_bucket(Bucket=S3_BUCKET)

    def wire(self) -> dict[str, int]:
        stats = _get_json(f"http://127.0.0.1:{self.control_port}/stats")
        return {"in": stats["in"], "out": stats["out"], "connections": stats["connections"]}

    def stored(self, prefix: str) -> int:
        total = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix):
            total += sum(item.get("Size", 0) for item in page.get("Contents", ()))
        return total


class S3Target(Target):
    """A prefix of the S3 server's bucket, reached through the proxy."""

    name = "s3"

    def __init__(self, server: S3Server, prefix: str) -> None:
        self.server, self.prefix = server, prefix
        self.location = f"s3://{S3_BUCKET}/{prefix}"
        self.restic_args = ["-r", f"s3:{server.endpoint}/{S3_BUCKET}/{prefix}"]
        self.restic_args += ["-o", "s3.bucket-lookup=path", "-o", f"s3.region={S3_REGION}"]
        self.env = {**S3_KEYS, "BLOCKVAULT_S3_ENDPOINT": server.endpoint, "BLOCKVAULT_S3_REGION": S3_REGION}

    def make_like(self, src: Repository) -> None:
        options: dict[str, str | None] = {"endpoint": self.server.endpoint, "region": S3_REGION}
        options |= {"accessKey": S3_KEYS["AWS_ACCESS_KEY_ID"], "secretKey": S3_KEYS["AWS_SECRET_ACCESS_KEY"]}
        self.backend = open_backend(self.location, options)
        Repository.init(self.backend, like=src, passphrase=PASSPHRASE)

    def wire(self) -> dict[str, int]:
        return self.server.wire()

    def stored(self) -> int:
        return self.server.stored(self.prefix + "/")


def blockvault_env(workdir: Path | None = None) -> dict[str, str]:
    """The environment of a blockvault process: none of the caller's BLOCKVAULT_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLOCKVAULT_", "AWS_"))}
    if workdir is not None:
        env.update(BLOCKVAULT_PASSPHRASE=PASSPHRASE, BLOCKVAULT_DATA_DIR=str(workdir / "blockvault-data"))
    return env


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class Results:
    volume: VolumeInfo
    change_percent: float
    restic_version: str = ""
    backups: list[BackupFigures] = field(default_factory=list)
    syncs: list[Figures] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def find(self, step: str, target: str, tool: str) -> Figures | None:
        return next((f for f in self.syncs if (f.step, f.target, f.tool) == (step, target, tool)), None)


def _attempt(results: Results, what: str, copy: Callable[[], Figures]) -> None:
    _say(what)
    try:
        results.syncs.append(copy())
    except (BenchError, BlockvaultError) as exc:
        results.errors.append(f"{what}: {exc}")
        print(f"\n!!! {what} FAILED: {exc}\n", file=sys.stderr, flush=True)


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
    procs = Processes(logs)
    blockvault = BlockvaultCli(workdir, raw, scratch, blockvault_env(workdir))
    restic = ResticCli(workdir, raw, scratch, dict(os.environ))
    try:
        blockvault.init()
        restic.init()
        results.restic_version = restic.version
        _say("starting the storage server, moto and the proxy; making each target like its source")
        with Repository.open(str(blockvault.source), PASSPHRASE) as src:
            bv_local, bv_s3 = FolderTarget(workdir / "blockvault-dst"), S3Target(S3Server(procs), "blockvault")
            bv_local.make_like(src)
            bv_s3.make_like(src)
            bv_targets: list[Target] = [bv_local, ServerTarget(procs, workdir, src), bv_s3]
        restic_targets: list[Target] = [FolderTarget(workdir / "restic-dst"), S3Target(bv_s3.server, "restic")]
        for target in restic_targets:
            restic.make_target(target)
        read_through(raw)
        for step in STEPS:
            if step == "incremental":
                _say(f"rewriting {percent:g} % of the 4 MiB regions")
                change_volume(raw, info, percent)
            _say(f"{step} backup: blockvault repo backup")
            backup_id, figures = blockvault.backup(step)
            results.backups.append(figures)
            _say(f"{step} backup: restic backup")
            results.backups.append(restic.backup(step))
            for target in bv_targets:
                _attempt(
                    results,
                    f"{step} copy: blockvault repo sync -> {target.name}",
                    functools.partial(blockvault.copy, target, step, backup_id),
                )
            for target in restic_targets:
                _attempt(
                    results, f"{step} copy: restic copy -> {target.name}", functools.partial(restic.copy, target, step)
                )
    finally:
        procs.stop_all()
    return results


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------

COMPARED = (
    "Both tools run as processes, timed from start to exit (blockvault: python -m api.cli, start-up and imports "
    "included), on encrypted repositories with one passphrase, from a local source; before each copy the page "
    "cache is settled and the source read back in.",
)
DIFFERS = (
    "blockvault makes a copy like its source (the same chunk names and encryption key, as `repo sync` creates "
    "one), so encrypted chunks travel as stored: read, checked against their names, written; restic's copy has "
    "its own master key (init --copy-chunker-params copies only the chunker), so `restic copy` decrypts and "
    "re-encrypts every blob it sends (its help says so).",
    "blockvault stores one object per chunk (4 MiB, compressed); restic packs blobs into pack files (about "
    "16 MiB) with indexes: fewer, larger requests.",
    "restic has no client for blockvault's storage-server (restic's rest-server speaks another protocol): that "
    "row is blockvault's alone.",
)


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
    print(f"Compared: blockvault repo sync and restic {results.restic_version} copy. " + " ".join(COMPARED))
    print("What differs:")
    for difference in DIFFERS:
        print(f"  - {difference}")
    print("Backups (context, not in the table; processes, encrypted):")
    for b in results.backups:
        detail = ", ".join(f"{k}={v}" for k, v in b.detail.items())
        print(f"  {b.tool:<10} {b.step:<12} {b.seconds:8.2f} s  {detail}")
    print()
    headers = ["step", "target", "tool", "seconds", "RSS MiB", "wire MiB", "lacked MiB", "wire/lacked", "grew MiB"]
    headers.append("restic s / bv s")
    table: list[list[str]] = []
    for step in STEPS:
        for target, tool in ROWS:
            fig = results.find(step, target, tool)
            if fig is None:
                table.append([STEP_LABEL[step], TARGET_LABEL[target], tool, "FAILED", *[""] * 6])
                continue
            ratio = fig.ratio
            mark = "" if ratio is None else (" ok" if ratio <= TARGET_WIRE_RATIO else " MISS")
            peer = results.find(step, target, "restic") if tool == "blockvault" else None
            speed = f"{peer.seconds / fig.seconds:.2f}" if peer is not None and fig.seconds > 0 else "-"
            table.append(
                [
                    STEP_LABEL[step],
                    TARGET_LABEL[target],
                    tool,
                    f"{fig.seconds:.2f}",
                    _mib(fig.peak_rss),
                    _mib(fig.wire),
                    _mib(fig.lacked),
                    _fmt(ratio, ".3f") + mark,
                    _mib(fig.grew),
                    speed,
                ]
            )
    widths = [max(len(headers[i]), *(len(r[i]) for r in table)) for i in range(len(headers))]
    left = 3  # step, target and tool columns are left-aligned

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
        f"moto (HTTP headers included). lacked: the sync's bytesCopied + the stored manifest. Target wire/lacked <= "
        f"{TARGET_WIRE_RATIO:g}. restic s / bv s > 1: blockvault faster on the same target."
    )
    print()
    print("Per copy:")
    for fig in results.syncs:
        detail = ", ".join(f"{k}={v}" for k, v in fig.detail.items())
        print(f"  {fig.step:<12} {fig.target:<15} {fig.tool:<10} {fig.seconds:8.2f} s  wire={fig.wire}  {detail}")
    for error in results.errors:
        print(f"  ERROR: {error.splitlines()[0]}")
    print()
    print("README:", summary_line(results))
    print()


def summary_line(results: Results) -> str:
    def secs(target: str, tool: str) -> str:
        parts = [results.find(step, target, tool) for step in STEPS]
        return " / ".join(_fmt(p.seconds if p else None, ".1f") for p in parts) + " s"

    def ratios(target: str) -> str:
        parts = [results.find(step, target, "blockvault") for step in STEPS]
        return " / ".join(_fmt(p.ratio if p else None, ".3f") for p in parts)

    info = results.volume
    return (
        f"Copy of a {info.size / GiB:g} GiB VM volume's backup, full / incremental after a "
        f"{results.change_percent:g} % change, both tools as processes on encrypted repositories, on loopback: "
        f"local folder blockvault repo sync {secs('local', 'blockvault')}, restic copy {secs('local', 'restic')}; "
        f"S3 (moto) blockvault {secs('s3', 'blockvault')} (wire/lacked {ratios('s3')}), restic "
        f"{secs('s3', 'restic')}; storage-server blockvault {secs('storage-server', 'blockvault')} (wire/lacked "
        f"{ratios('storage-server')})."
    )


def results_json(results: Results) -> dict[str, Any]:
    return {
        "volume": asdict(results.volume),
        "changePercent": results.change_percent,
        "resticVersion": results.restic_version,
        "compared": list(COMPARED),
        "differs": list(DIFFERS),
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
