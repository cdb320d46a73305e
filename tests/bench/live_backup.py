#!/usr/bin/env python3
"""Benchmark live backups of a running VM through QEMU: an incremental by dirty bitmap after 2 %
of the disk changed, against a full re-read of the same state, with restic and borg beside them.

Run by ``make bench-live`` as::

    .venv/bin/python tests/bench/live_backup.py [--size 2GiB] [--change-percent 2] [--seed N]
        [--workdir DIR] [--keep] [--json FILE] [--no-prefault]

What it does, in one run (issue 8: "a live incremental backup after 2 % of a 2 GiB disk changed:
seconds and bytes read, compared with a full re-read"):

1. builds a VM-like qcow2 of ``--size``: the layout and bytes of ``tests/conftest.py``'s
   ``vm_like_regions`` (1-3 MiB regions: about 35 % holes, 35 % text-like, 30 % random),
   written region by region into a sparse raw file and converted with ``qemu-img convert``;
2. starts ``qemu-system-x86_64 -machine none`` with the qcow2 as ``drive0`` and two QMP
   monitors: ``qmp.sock`` for blockvault, ``bench.sock`` for this benchmark (one client each);
3. first backups: blockvault ``backup_live`` into a plain local repository A (full; starts the
   persistent dirty bitmap ``blockvault`` in QEMU); A is then copied to B, so that the re-read
   of step 5 stores into a repository that lacks the change just as A does; after an HMP
   ``qemu-io drive0 "flush"``, ``restic backup`` and ``borg create`` of the image file;
4. the change, written through the running QEMU (HMP ``qemu-io drive0 "write -s FILE OFF LEN"``,
   so the dirty bitmap sees it as a guest's writes): ``--change-percent`` of the disk as writes of
   64 KiB..1 MiB at random 4 KiB-aligned offsets (seeded), half random bytes, half text-like;
5. blockvault live incremental into A by the dirty bitmap (reads the dirty 4 MiB chunks only),
   then blockvault live full re-read into B of the same state (``bitmap=None``, ``parent`` = the
   full backup: reads every allocated block, hashes it, stores what changed); both manifests
   are compared (the same chunk list: both backed up the same disk state);
6. after a flush, the second ``restic backup`` and ``borg create`` of the image file.

Per run: wall seconds; bytes read (blockvault: ``BackupResult.bytesRead`` over NBD; restic:
``total_bytes_processed``; borg: ``original_size``); bytes stored (``bytesWritten``,
``data_added``, ``deduplicated_size``); repository growth (``du -sb``); peak RSS (blockvault:
this process and, apart, QEMU, each reset before the run through ``/proc/PID/clear_refs``;
peers: their process tree); and seconds and bytes read as fractions of the full re-read's.
Before every run the page cache is settled as in ``compare_peers`` (sync, drop caches, the disk
and the repository read back in). restic and borg cannot read a running VM at one instant: they
read the qcow2 file QEMU has open and writes (flushed just before, nothing writes meanwhile here,
yet not point-in-time consistent in general), in full whenever its mtime changed.

``--libvirt`` runs only a side-by-side instead: the same disk and change, the live incremental
through direct QMP and through libvirt's backup API (a domain of type ``qemu`` on the local
libvirtd), seconds and bytes read of each and the load average.

Not a pytest test: it needs QEMU, qemu-img, restic and borg, and takes minutes at 2 GiB. Nothing
here is a target or a threshold: it reports figures. Exit status 0 when every step worked, 1
otherwise.
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
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402

from shared.errors import BlockvaultError  # noqa: E402
from shared.repository.backup import BackupResult  # noqa: E402
from shared.repository.live import LiveDisk, backup_live  # noqa: E402
from shared.repository.repo import DEFAULT_CHUNK_SIZE, Repository  # noqa: E402
from tests.bench.compare_peers import (  # noqa: E402
    DEFAULT_SEED,
    PASSPHRASE,
    BenchError,
    GiB,
    KiB,
    MiB,
    disk_usage,
    prefault_memory,
    run_measured,
    run_plain,
    settle,
)

CHUNK = DEFAULT_CHUNK_SIZE  # the engine's chunk: an incremental reads every dirty one whole
WRITE_MIN, WRITE_MAX, WRITE_ALIGN = 64 * KiB, MiB, 4 * KiB
BITMAP = "blockvault"
DISK_NAME = "disk0"
START_SECONDS = 20.0
STOP_SECONDS = 30.0
QMP_TIMEOUT = 300.0
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, NUL included
UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}
ORDER = ("bv-full", "restic-1", "borg-1", "bv-incremental", "bv-reread", "restic-2", "borg-2")
LABEL = {
    "bv-full": "blockvault live full (first backup)",
    "restic-1": "restic backup of the image file",
    "borg-1": "borg create of the image file",
    "bv-incremental": "blockvault live incremental (dirty bitmap)",
    "bv-reread": "blockvault live full re-read (no bitmap)",
    "restic-2": "restic backup of the image file",
    "borg-2": "borg create of the image file",
}


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_size(text: str) -> int:
    """``2GiB``, ``256MiB``, ``1.5G``, ``512M``, ``1073741824``: bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GiB, 256MiB)")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:.1f}"


# --------------------------------------------------------------------------------------------
# Peak RSS of one process, reset before each run
# --------------------------------------------------------------------------------------------


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's high-water RSS mark (``/proc/PID/clear_refs`` ``5``; as its owner)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5\n")
        return True
    except OSError:
        return False


def peak_rss(pid: int) -> int | None:
    """``VmHWM`` of the process, in bytes: its peak RSS since the last reset."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    return None


# --------------------------------------------------------------------------------------------
# The disk
# --------------------------------------------------------------------------------------------


@dataclass
class DiskInfo:
    size: int
    seed: int
    allocated: int = 0
    random_bytes: int = 0
    text_bytes: int = 0
    image_bytes: int = 0  # the qcow2 file's size
    build_seconds: float = 0.0


def vm_like_pieces(size: int, seed: int, unit: int = MiB) -> Iterator[tuple[int, int, str, bytes | None]]:
    """``(offset, length, kind, data)`` region by region: the layout and bytes of
    ``tests/conftest.vm_like_regions(size, seed)`` (same random draws), without holding them all."""
    rng = random.Random(seed)
    offset = 0
    while offset < size:
        length = min(rng.choice((1, 2, 3)) * unit, size - offset)
        kind = rng.random()
        if kind < 0.35:
            yield offset, length, "hole", None
        elif kind < 0.7:
            text = b"".join(f"{offset}:{i} some log text\n".encode() for i in range(200))
            yield offset, length, "text", (text * (length // len(text) + 1))[:length]
        else:
            yield offset, length, "random", rng.randbytes(length)
        offset += length


def build_disk(raw: Path, qcow2: Path, size: int, seed: int) -> DiskInfo:
    info = DiskInfo(size, seed)
    started = time.perf_counter()
    with raw.open("wb") as handle:
        handle.truncate(size)
        for offset, _, kind, data in vm_like_pieces(size, seed):
            if data is None:
                continue
            os.pwrite(handle.fileno(), data, offset)
            info.allocated += len(data)
            if kind == "random":
                info.random_bytes += len(data)
            else:
                info.text_bytes += len(data)
    run_plain(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])
    raw.unlink()
    info.image_bytes = qcow2.stat().st_size
    info.build_seconds = time.perf_counter() - started
    return info


# --------------------------------------------------------------------------------------------
# QEMU: one drive, the product's monitor and the benchmark's
# --------------------------------------------------------------------------------------------


def _probe_qmp(path: Path) -> bool:
    """True when ``path`` accepts a connection and greets with QMP (then hangs up)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
            greeting = sock.recv(4096)
        except OSError:
            return False
    return b'"QMP"' in greeting


class Vm:
    """``qemu-system-x86_64`` without a guest, the disk as ``drive0`` (node ``disk0``)."""

    def __init__(self, folder: Path, disk: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.disk = disk.resolve()
        self.qmp_socket = folder / "qmp.sock"  # blockvault's
        self.bench_socket = folder / "bench.sock"  # this benchmark's
        for path in (self.qmp_socket, self.bench_socket):
            if len(str(path).encode()) > SUN_PATH_MAX:
                raise BenchError(f"socket path longer than {SUN_PATH_MAX} bytes: {path} (use a shorter --workdir)")
        self.log = folder / "qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None

    def args(self) -> list[str]:
        return [
            "qemu-system-x86_64",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-accel",
            "tcg",
            "-drive",
            f"file={self.disk},format=qcow2,if=none,id=drive0,node-name=disk0",
            "-qmp",
            f"unix:{self.qmp_socket},server=on,wait=off",
            "-qmp",
            f"unix:{self.bench_socket},server=on,wait=off",
        ]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_SECONDS
        waiting = [self.qmp_socket, self.bench_socket]
        while waiting:
            if self.proc.poll() is not None:
                raise BenchError(f"QEMU exited {self.proc.returncode} while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"QEMU's monitors did not answer in {START_SECONDS:g} s:\n{self.log_tail()}")
            waiting = [path for path in waiting if not _probe_qmp(path)]
            if waiting:
                time.sleep(0.02)
        qmp = QEMUMonitorProtocol(str(self.bench_socket))
        qmp.settimeout(QMP_TIMEOUT)
        qmp.connect(negotiate=True)
        self._qmp = qmp

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def cmd(self, name: str, **args: Any) -> Any:
        if self._qmp is None:
            raise BenchError("QEMU's monitor is not connected")
        return self._qmp.cmd(name, **args)

    def qemu_io(self, command: str) -> str:
        """HMP ``qemu-io drive0 "<command>"``: the reply plus what qemu-io printed on QEMU's
        stdout (into the log) meanwhile; qemu-io prints there, not into the reply."""
        start = self.log.stat().st_size
        reply = str(self.cmd("human-monitor-command", **{"command-line": f'qemu-io drive0 "{command}"'}))
        with self.log.open("rb") as log:
            log.seek(start)
            printed = log.read().decode(errors="replace")
        return reply + printed

    def write(self, offset: int, length: int, source: Path) -> None:
        """A guest write: ``length`` bytes of ``source`` at ``offset``, through the block layer."""
        text = self.qemu_io(f"write -s {source} {offset} {length}")
        if f"wrote {length}/{length} bytes at offset {offset}" not in text:
            raise BenchError(f"qemu-io write on drive0 failed: {text.strip()}")

    def flush(self) -> None:
        text = self.qemu_io("flush")
        if text.strip():  # qemu-io's flush prints nothing on success
            raise BenchError(f"qemu-io flush on drive0 failed: {text.strip()}")

    def stop(self) -> None:
        """QMP ``quit`` (the clean shutdown, which stores the persistent bitmap); SIGKILL when
        that fails or QEMU has not exited after STOP_SECONDS."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(Exception):  # the reply races QEMU's exit
            self.cmd("quit")
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            with contextlib.suppress(Exception):
                qmp.close()
        try:
            self.proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            print(f"QEMU (pid {self.proc.pid}) did not quit: killing it", file=sys.stderr)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(STOP_SECONDS)


# --------------------------------------------------------------------------------------------
# The change: scattered guest writes through QEMU
# --------------------------------------------------------------------------------------------


@dataclass
class Write:
    offset: int
    length: int
    kind: str  # "random" or "text"


@dataclass
class ChangeInfo:
    percent: float
    writes: int = 0
    written: int = 0  # bytes, overlaps counted twice
    distinct: int = 0  # bytes of the disk changed at least once
    random_writes: int = 0
    chunks_touched: int = 0
    seconds: float = 0.0


def plan_change(size: int, percent: float, seed: int) -> list[Write]:
    """``percent`` % of ``size`` as writes of WRITE_MIN..WRITE_MAX bytes at random offsets, all
    WRITE_ALIGN-aligned (as a guest's filesystem writes), half random bytes, half text-like."""
    rng = random.Random(seed ^ 0x11FE)
    target = max(WRITE_ALIGN, round(size * percent / 100) // WRITE_ALIGN * WRITE_ALIGN)
    writes: list[Write] = []
    total = 0
    while total < target:
        length = min(rng.randrange(WRITE_MIN, WRITE_MAX + 1, WRITE_ALIGN), max(WRITE_MIN, target - total))
        length = min(length, size)
        offset = rng.randrange(0, size - length + 1, WRITE_ALIGN)
        writes.append(Write(offset, length, "random" if rng.random() < 0.5 else "text"))
        total += length
    return writes


def write_data(write: Write, rng: random.Random) -> bytes:
    if write.kind == "random":
        return rng.randbytes(write.length)
    line = f"{write.offset:#x} changed by the guest at tick {rng.randrange(1 << 30)}\n".encode()
    return (line * (write.length // len(line) + 1))[: write.length]


def apply_change(vm: Vm, writes: list[Write], scratch: Path, percent: float, seed: int) -> ChangeInfo:
    rng = random.Random(seed ^ 0xDA7A)
    info = ChangeInfo(percent)
    source = scratch / "write.bin"
    started = time.perf_counter()
    for write in writes:
        source.write_bytes(write_data(write, rng))
        vm.write(write.offset, write.length, source)
    vm.flush()
    info.seconds = time.perf_counter() - started
    source.unlink(missing_ok=True)
    info.writes = len(writes)
    info.written = sum(w.length for w in writes)
    info.random_writes = sum(w.kind == "random" for w in writes)
    chunks: set[int] = set()
    for w in writes:
        chunks.update(range(w.offset // CHUNK, (w.offset + w.length - 1) // CHUNK + 1))
    info.chunks_touched = len(chunks)
    end = 0
    for w in sorted(writes, key=lambda w: w.offset):  # union of the written ranges
        start, stop = max(w.offset, end), w.offset + w.length
        if stop > start:
            info.distinct += stop - start
            end = stop
    return info


# --------------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    seconds: float | None = None
    read: int | None = None  # bytes
    stored: int | None = None  # bytes the tool says it added
    grew: int | None = None  # bytes the repository directory grew by
    rss: int | None = None  # peak RSS of the process doing the backup
    qemu_rss: int | None = None  # blockvault only: QEMU's peak RSS meanwhile
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def live_backup(
    vm: Vm, disk: Path, repo_dir: Path, work: Path, row: Row, *, bitmap: str | None, parent: str | None
) -> BackupResult:
    """One ``backup_live`` of the running VM into ``repo_dir``; fills ``row``."""
    settle([disk, repo_dir])
    before = disk_usage(repo_dir).apparent
    me = os.getpid()
    reset = reset_peak_rss(me) and reset_peak_rss(vm.pid)
    spec = LiveDisk(path=str(disk), format="qcow2", name=DISK_NAME, parent=parent)
    started = time.perf_counter()
    with Repository.open(str(repo_dir)) as repo:
        result = backup_live(repo, str(vm.qmp_socket), [spec], work_dir=work, bitmap=bitmap)
    row.seconds = time.perf_counter() - started
    backup = result.backups[0]
    row.read, row.stored = backup.bytesRead, backup.bytesWritten
    row.grew = disk_usage(repo_dir).apparent - before
    if reset:
        row.rss, row.qemu_rss = peak_rss(me), peak_rss(vm.pid)
    row.detail = {
        "id": backup.id,
        "mode": backup.mode,
        "parent": backup.parent,
        "chunks": backup.chunks,
        "newChunks": backup.newChunks,
        "engineSeconds": backup.seconds,
        "consistency": result.consistency,
    }
    return backup


class Peers:
    """restic and borg, each with a repository in the work directory, backing up the image."""

    def __init__(self, workdir: Path, disk: Path, scratch: Path) -> None:
        self.workdir, self.disk, self.scratch = workdir, disk, scratch
        self.restic_repo, self.borg_repo = workdir / "restic", workdir / "borg"
        self.env = dict(os.environ)
        self.env.update(
            RESTIC_PASSWORD=PASSPHRASE,
            RESTIC_CACHE_DIR=str(workdir / "restic-cache"),
            BORG_PASSPHRASE=PASSPHRASE,
            BORG_BASE_DIR=str(workdir / "borg-base"),
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
            BORG_DISPLAY_PASSPHRASE="no",
        )
        self.restic_version = self.borg_version = ""

    def init(self) -> None:
        self.restic_version = run_plain(["restic", "version"]).stdout.split()[1]
        self.borg_version = run_plain(["borg", "--version"]).stdout.split()[-1]
        run_measured(
            ["restic", "-r", str(self.restic_repo), "init", "--repository-version", "2"],
            env=self.env,
            cwd=self.workdir,
            scratch=self.scratch,
        )
        run_measured(
            ["borg", "init", "-e", "none", str(self.borg_repo)], env=self.env, cwd=self.workdir, scratch=self.scratch
        )

    def restic(self, row: Row, tag: str) -> None:
        before = disk_usage(self.restic_repo).apparent
        cmd = ["restic", "-r", str(self.restic_repo), "backup", "--json", "--tag", tag, str(self.disk)]
        m = run_measured(cmd, env=self.env, cwd=self.workdir, scratch=self.scratch, warm=[self.disk, self.restic_repo])
        summary: dict[str, Any] = {}
        for line in m.stdout.splitlines():
            if '"summary"' in line:
                summary = json.loads(line)
        row.seconds, row.rss = m.seconds, m.peak_rss
        row.read = summary.get("total_bytes_processed")
        row.stored = summary.get("data_added")
        row.grew = disk_usage(self.restic_repo).apparent - before
        row.detail = {k: summary.get(k) for k in ("files_changed", "files_unmodified", "snapshot_id")}

    def borg(self, row: Row, archive: str) -> None:
        before = disk_usage(self.borg_repo).apparent
        cmd = ["borg", "create", "--stats", "--json", f"{self.borg_repo}::{archive}", self.disk.name]
        m = run_measured(
            cmd, env=self.env, cwd=self.disk.parent, scratch=self.scratch, warm=[self.disk, self.borg_repo]
        )
        stats = json.loads(m.stdout).get("archive", {}).get("stats", {})
        row.seconds, row.rss = m.seconds, m.peak_rss
        row.read = stats.get("original_size")
        row.stored = stats.get("deduplicated_size")
        row.grew = disk_usage(self.borg_repo).apparent - before
        row.detail = {k: stats.get(k) for k in ("compressed_size", "nfiles")}


@dataclass
class Results:
    disk: DiskInfo
    change: ChangeInfo
    rows: dict[str, Row] = field(default_factory=dict)
    same_state: bool | None = None
    restic_version: str = ""
    borg_version: str = ""
    qemu_version: str = ""
    errors: list[str] = field(default_factory=list)


def _attempt(results: Results, key: str, run: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one measured step into ``results.rows[key]``; a failure is recorded (with its
    traceback on stderr) and the benchmark goes on with what does not depend on it."""
    row = results.rows.setdefault(key, Row(key))
    try:
        return run(*args, row, **kwargs)
    except (BenchError, BlockvaultError, OSError, ValueError) as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        results.errors.append(f"{LABEL[key]}: {row.error}")
        print(f"\n!!! {LABEL[key]} FAILED:", file=sys.stderr)
        traceback.print_exc()
        print(file=sys.stderr, flush=True)
        return None


def run_benchmark(args: argparse.Namespace, workdir: Path, results: Results) -> None:
    disk = workdir / "disk.qcow2"
    scratch = workdir / "scratch"
    scratch.mkdir()
    live_work = workdir / "live"
    repo_a, repo_b = workdir / "blockvault-a", workdir / "blockvault-b"
    size, seed = args.size, args.seed

    _say(f"building a {size / MiB:.0f} MiB VM-like qcow2 (seed {seed})")
    results.disk = build_disk(workdir / "disk.raw", disk, size, seed)
    d = results.disk
    _say(
        f"built in {d.build_seconds:.1f} s: {_mib(d.allocated)} MiB allocated ({100 * d.allocated / size:.0f} %), "
        f"image file {_mib(d.image_bytes)} MiB"
    )
    writes = plan_change(size, args.change_percent, seed)
    peers = Peers(workdir, disk, scratch)
    peers.init()
    results.restic_version, results.borg_version = peers.restic_version, peers.borg_version
    results.qemu_version = run_plain(["qemu-system-x86_64", "--version"]).stdout.split("\n")[0].split()[3]
    Repository.init(str(repo_a)).close()

    vm = Vm(workdir / "vm", disk)
    try:
        _say("starting QEMU")
        vm.start()

        _say("blockvault live full backup (starts the dirty bitmap)")
        full = _attempt(
            results, "bv-full", lambda row: live_backup(vm, disk, repo_a, live_work, row, bitmap=BITMAP, parent=None)
        )
        if full is not None:
            shutil.copytree(repo_a, repo_b, symlinks=True)  # B: A as it was after the full backup
        vm.flush()
        _say("restic backup of the image file (first)")
        _attempt(results, "restic-1", peers.restic, tag="first")
        _say("borg create of the image file (first)")
        _attempt(results, "borg-1", peers.borg, archive="first")

        _say(f"changing {args.change_percent:g} % of the disk through QEMU: {len(writes)} writes")
        results.change = apply_change(vm, writes, scratch, args.change_percent, seed)
        c = results.change
        _say(
            f"wrote {_mib(c.written)} MiB in {c.seconds:.1f} s, touching {c.chunks_touched} chunks of "
            f"{CHUNK // MiB} MiB"
        )

        incremental = reread = None
        if full is not None:
            _say("blockvault live incremental by dirty bitmap")
            incremental = _attempt(
                results,
                "bv-incremental",
                lambda row: live_backup(vm, disk, repo_a, live_work, row, bitmap=BITMAP, parent=None),
            )
            _say("blockvault live full re-read (no bitmap, parent = the full backup) of the same state")
            reread = _attempt(
                results,
                "bv-reread",
                lambda row: live_backup(vm, disk, repo_b, live_work, row, bitmap=None, parent=full.id),
            )
        if incremental is not None and reread is not None:
            with Repository.open(str(repo_a)) as a, Repository.open(str(repo_b)) as b:
                results.same_state = a.load_manifest(incremental.id).chunks == b.load_manifest(reread.id).chunks
            if not results.same_state:
                results.errors.append("the incremental and the re-read stored different chunk lists")

        vm.flush()
        _say("restic backup of the image file (after the change)")
        _attempt(results, "restic-2", peers.restic, tag="changed")
        _say("borg create of the image file (after the change)")
        _attempt(results, "borg-2", peers.borg, archive="changed")
    finally:
        _say("stopping QEMU")
        vm.stop()


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _frac(value: float | None, base: float | None) -> str:
    return f"{value / base:.3f}" if value is not None and base else "-"


def print_report(results: Results, wall: float) -> None:
    d, c = results.disk, results.change
    size = d.size
    chunks = math.ceil(size / CHUNK)
    print()
    print(
        f"Disk: {size / MiB:.0f} MiB qcow2 (virtual), {_mib(d.allocated)} MiB allocated "
        f"({100 * d.allocated / size:.0f} %: {_mib(d.random_bytes)} MiB random, {_mib(d.text_bytes)} MiB text-like, "
        f"the rest holes), image file {_mib(d.image_bytes)} MiB; seed {d.seed}."
    )
    print(
        f"Change: {c.percent:g} % through the running QEMU (HMP qemu-io write): {c.writes} writes of "
        f"{WRITE_MIN // KiB} KiB..{WRITE_MAX // MiB} MiB at random {WRITE_ALIGN // KiB} KiB-aligned offsets "
        f"({c.random_writes} random, {c.writes - c.random_writes} text-like), {_mib(c.written)} MiB written "
        f"({_mib(c.distinct)} MiB distinct); they touch {c.chunks_touched} of {chunks} {CHUNK // MiB} MiB chunks "
        f"= {_mib(c.chunks_touched * CHUNK)} MiB that an incremental must read."
    )
    print(
        f"Tools: blockvault backup_live (QEMU {results.qemu_version}: fleecing overlay + NBD export) into a plain "
        f"local repository ({CHUNK // MiB} MiB chunks, zstd); restic {results.restic_version} (repository v2, "
        f"encrypted, compression auto); borg {results.borg_version} (-e none, lz4). restic and borg back up the "
        "qcow2 image file that QEMU has open and writes (flushed first through qemu-io; not point-in-time "
        "consistent), and re-read all of it whenever its mtime changed."
    )
    print()
    headers = [
        "phase",
        "run",
        "s",
        "read MiB",
        "stored MiB",
        "repo grew MiB",
        "peak RSS MiB",
        "QEMU RSS MiB",
        "s / re-read s",
        "read / re-read read",
    ]
    base = results.rows.get("bv-reread")
    base_s = base.seconds if base and not base.error else None
    base_read = base.read if base and not base.error else None
    table: list[list[str]] = []
    for key in ORDER:
        row = results.rows.get(key)
        if row is None:
            continue
        phase = "first" if key in ORDER[:3] else "after"
        if row.error:
            table.append([phase, LABEL[key], "FAILED", "", "", "", "", "", "", ""])
            continue
        table.append(
            [
                phase,
                LABEL[key],
                f"{row.seconds:.2f}" if row.seconds is not None else "-",
                _mib(row.read),
                _mib(row.stored),
                _mib(row.grew),
                _mib(row.rss),
                _mib(row.qemu_rss),
                _frac(row.seconds, base_s),
                _frac(row.read, base_read),
            ]
        )
    widths = [max(len(headers[i]), *(len(r[i]) for r in table)) for i in range(len(headers))] if table else []

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        )

    if table:
        print(line(headers))
        print("-" * len(line(headers)))
        for cells in table:
            print(line(cells))
    print(
        "first: before the change; after: after it, the same disk state for every run. read: blockvault's bytesRead "
        "(over NBD from QEMU: every 4 MiB chunk holding allocated data, or dirty), restic's total_bytes_processed, "
        "borg's original_size (the whole image file: its mtime changed). stored: bytesWritten (compressed chunks), "
        "restic's data_added (before compression), borg's deduplicated_size. repo grew: du -sb of the repository. "
        "peak RSS: this Python process for blockvault, the process tree for restic and borg; QEMU RSS: QEMU's peak "
        "during the blockvault run. Fractions < 1: less than the full re-read."
    )
    incr = results.rows.get("bv-incremental")
    if incr is not None and not incr.error and incr.read is not None:
        print(
            f"The incremental read {_mib(incr.read)} MiB; the chunks the writes touched: "
            f"{_mib(c.chunks_touched * CHUNK)} MiB."
        )
    if results.same_state is not None:
        print(
            "Incremental and full re-read stored "
            + ("the same chunk list (the same disk state)." if results.same_state else "DIFFERENT chunk lists.")
        )
    for error in results.errors:
        print(f"  ERROR: {error.splitlines()[0]}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KiB
    print(
        f"Peak RSS of this benchmark process over the whole run (getrusage): {_mib(peak)} MiB; wall time {wall:.0f} s."
    )
    print()
    print("README:", summary_line(results))
    print()


def summary_line(results: Results) -> str:
    rows, c, d = results.rows, results.change, results.disk

    def ok(key: str) -> Row | None:
        row = rows.get(key)
        return row if row is not None and not row.error and row.seconds is not None else None

    incr, reread = ok("bv-incremental"), ok("bv-reread")
    if incr is None or reread is None or not incr.seconds or not incr.read:
        return "no figures"
    assert reread.seconds is not None and reread.read is not None
    text = (
        f"Live backup of a running VM's {d.size / GiB:g} GiB qcow2 ({100 * d.allocated / d.size:.0f} % allocated) "
        f"after {c.percent:g} % changed through QEMU ({c.writes} scattered writes touching {c.chunks_touched} "
        f"{CHUNK // MiB} MiB chunks): incremental by dirty bitmap {incr.seconds:.1f} s, {_mib(incr.read)} MiB read; "
        f"full re-read {reread.seconds:.1f} s, {_mib(reread.read)} MiB read "
        f"({reread.seconds / incr.seconds:.1f}x the time, {reread.read / incr.read:.1f}x the bytes); "
        f"both stored {_mib(incr.stored)} / {_mib(reread.stored)} MiB"
    )
    peers = [(name, ok(key)) for name, key in (("restic", "restic-2"), ("borg", "borg-2"))]
    peer_text = [f"{name} {row.seconds:.1f} s" for name, row in peers if row is not None and row.seconds is not None]
    if peer_text:
        text += f"; restic and borg re-read the whole image file: {', '.join(peer_text)}"
    return text + "."


# --------------------------------------------------------------------------------------------
# --libvirt: the same incremental through libvirt's backup API, beside the direct-QMP path
# --------------------------------------------------------------------------------------------

LIBVIRT_URI = "qemu:///system"


class LibvirtVm:
    """A libvirt domain of type ``qemu`` (no KVM, no guest) with the disk as ``vda``; guest
    writes through its monitor (HMP ``qemu-io -d <virtio backend>``), as ``Vm`` does."""

    def __init__(self, name: str, disk: Path) -> None:
        import libvirt

        self.conn = libvirt.open(LIBVIRT_URI)
        xml = (
            f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>"
            "<target dev='vda' bus='virtio'/></disk></devices></domain>"
        )
        self.dom = self.conn.defineXML(xml)
        self.dom.create()

    def hmp(self, command: str) -> str:
        import libvirt_qemu

        return str(libvirt_qemu.qemuMonitorCommand(self.dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP))

    def write(self, offset: int, length: int, source: Path) -> None:
        qom = "/machine/peripheral/virtio-disk0/virtio-backend"
        reply = self.hmp(f'qemu-io -d {qom} "write -s {source} {offset} {length}"')
        if reply.strip():
            raise BenchError(f"qemu-io write on vda failed: {reply.strip()}")

    def flush(self) -> None:
        self.hmp('qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "flush"')

    def stop(self) -> None:
        import libvirt

        with contextlib.suppress(libvirt.libvirtError):
            self.dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        self.conn.close()


def run_libvirt_comparison(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One disk, copied twice: a live full then (after the same change) a live incremental of
    each copy, one through direct QMP (``backup_live``), one through libvirt
    (``shared.libvirt.backup.backup_domain``). Seconds and bytes read of the incrementals."""
    from shared.libvirt.backup import backup_domain

    workdir.chmod(0o755)  # the domain's QEMU user reads its disk and the write sources here
    out: dict[str, Any] = {"size": args.size, "changePercent": args.change_percent, "load": {}}
    _say(f"building a {args.size / GiB:.2f} GiB qcow2")
    base = workdir / "base.qcow2"
    build_disk(workdir / "base.raw", base, args.size, args.seed)
    (workdir / "base.raw").unlink(missing_ok=True)
    writes = plan_change(args.size, args.change_percent, args.seed)
    for kind in ("qmp", "libvirt"):
        disk = workdir / f"{kind}.qcow2"
        subprocess.run(["cp", "--sparse=always", str(base), str(disk)], check=True)
        repo_dir = workdir / f"repo-{kind}"
        Repository.init(str(repo_dir)).close()
        scratch = workdir / f"scratch-{kind}"
        scratch.mkdir(mode=0o755)
        work = workdir / f"work-{kind}"
        vm: Any = Vm(workdir / "vm", disk) if kind == "qmp" else LibvirtVm(f"bv-bench-{os.getpid()}", disk)
        try:
            if kind == "qmp":
                vm.start()

            def once(vm: Any = vm, kind: str = kind, disk: Path = disk, repo_dir: Path = repo_dir,
                     work: Path = work) -> BackupResult:  # fmt: skip
                spec = LiveDisk(path=str(disk), format="qcow2", name=DISK_NAME)
                with Repository.open(str(repo_dir)) as repo:
                    if kind == "qmp":
                        return backup_live(repo, str(vm.qmp_socket), [spec], work_dir=work).backups[0]
                    return backup_domain(repo, vm.dom, [spec], work_dir=work, quiesce=False).backups[0]

            _say(f"{kind}: live full")
            full = once()
            change = apply_change(vm, writes, scratch, args.change_percent, args.seed)
            settle([disk, repo_dir])
            load = os.getloadavg()
            _say(f"{kind}: live incremental after {change.distinct / MiB:.1f} MiB changed")
            started = time.perf_counter()
            incremental = once()
            seconds = time.perf_counter() - started
            out[kind] = {
                "fullSeconds": full.seconds,
                "fullRead": full.bytesRead,
                "seconds": round(seconds, 3),
                "read": incremental.bytesRead,
                "mode": incremental.mode,
                "chunks": incremental.chunks,
            }
            out["load"][kind] = [round(x, 2) for x in (*load, *os.getloadavg())]
        finally:
            vm.stop()
    out["ratio"] = round(out["libvirt"]["seconds"] / out["qmp"]["seconds"], 3)
    print(json.dumps(out, indent=2))
    print(
        f"live incremental, {args.change_percent:g} % of {args.size / GiB:.2f} GiB: "
        f"direct QMP {out['qmp']['seconds']:.2f} s ({_mib(out['qmp']['read'])} MiB read), "
        f"libvirt {out['libvirt']['seconds']:.2f} s ({_mib(out['libvirt']['read'])} MiB read): "
        f"libvirt/QMP = {out['ratio']:.2f}x; load average before/after "
        f"{out['load']['qmp']} / {out['load']['libvirt']}"
    )
    return out


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=parse_size, default=2 * GiB, help="virtual disk size (default 2GiB)")
    parser.add_argument("--change-percent", type=float, default=2.0, help="%% of the disk written (default 2)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the disk's content and the writes")
    parser.add_argument("--workdir", type=Path, help="where to make the run's directory (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (disk, repositories, logs)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--no-prefault", action="store_true", help="skip touching free memory first")
    parser.add_argument(
        "--libvirt", action="store_true", help="only the live incremental through libvirt beside direct QMP"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.size = args.size // MiB * MiB
    if args.size < 64 * MiB:
        print("--size must be at least 64MiB", file=sys.stderr)
        return 2
    if not 0 < args.change_percent <= 100:
        print("--change-percent must be in (0, 100]", file=sys.stderr)
        return 2
    if args.libvirt:
        workdir = Path(tempfile.mkdtemp(prefix="bv-lv-", dir=args.workdir or Path(tempfile.gettempdir())))
        try:
            out = run_libvirt_comparison(args, workdir)
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")
        return 0
    for tool in ("qemu-system-x86_64", "qemu-img", "restic", "borg"):
        if not shutil.which(tool):
            print(f"error: {tool} is not installed (tests/harness/ensure-system test)", file=sys.stderr)
            return 2
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    needed = 5 * args.size + GiB
    free = shutil.disk_usage(parent).free
    if free < needed:
        print(f"error: {parent} has {free / GiB:.1f} GiB free, the run needs about {needed / GiB:.1f}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    if not args.no_prefault:
        prefault_memory()
    workdir = Path(tempfile.mkdtemp(prefix="bv-live-", dir=parent)).resolve()
    results = Results(DiskInfo(args.size, args.seed), ChangeInfo(args.change_percent))
    try:
        run_benchmark(args, workdir, results)
    except (BenchError, BlockvaultError, OSError) as exc:
        print(f"\n!!! benchmark aborted: {exc}", file=sys.stderr)
        traceback.print_exc()
        results.errors.append(f"aborted: {exc}")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(results, time.perf_counter() - started)
    if args.json:
        args.json.write_text(json.dumps(asdict(results), indent=2) + "\n")
        print(f"results written to {args.json}")
    if results.errors:
        print("FAILED: a step failed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
