#!/usr/bin/env python3
"""Benchmark blockvault side by side with restic and borg on one VM-like volume.

Run by ``make bench`` as::

    .venv/bin/python tests/bench/compare_peers.py [--size-gib 2] [--workdir DIR] [--keep] [--json-out FILE]

What it does, in one run and on a warm page cache:

1. builds a raw volume (about 30 % holes, 40 % compressible, 30 % random data, in MiB-aligned
   regions of varied sizes, deterministic from ``--seed``) and a qcow2 copy of it;
2. full backup with each tool (restic, borg, blockvault on the raw file, blockvault on the qcow2
   copy with ``--bitmap``);
3. rewrites 2 % of the volume's 4 MiB-aligned regions with new random bytes, identically in the raw
   file and (through ``qemu-io``, so the dirty bitmap sees it) in the qcow2 copy;
4. incremental backup with each tool (blockvault: by rehash on raw, by dirty bitmap on qcow2);
5. restores each tool's latest backup into a new file, flushes it to disk (fsync, timed as part
   of the restore: blockvault syncs before it reports success, restic and Borg do not), checks it
   byte for byte against the volume and checks its holes are the volume's (restic 0.14 has no
   sparse restore; Borg extracts with ``--sparse``);
6. restores each tool's latest backup onto a block device (a loop device over a file, direct I/O,
   unless ``--no-device`` or losetup fails), flushed and checked the same way (restic ``dump``,
   ``borg extract --stdout``, ``blockvault repo restore --in-place``); the device is scribbled on
   before each restore, so a tool that leaves a region (hole or data) unwritten is caught.

For every step it measures wall time, the peak RSS of the command's process tree, and at the end
each repository's size on disk; it prints a table, blockvault's ratios to the faster peer and
whether each target is met. Exit status: 0 when every command worked and every restore matched
(targets missed do not change it), 1 otherwise. Stdlib only, plus psutil.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shlex
import shutil
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
CHANGE_UNIT = 4 * MiB  # the rewrite touches 4 MiB-aligned regions
CHANGE_FRACTION = 0.02
COMPARE_PIECE = 4 * MiB
PASSPHRASE = "bench"
BITMAP_NAME = "bench"
RSS_POLL_SECONDS = 0.02
DEFAULT_SEED = 20240501

# Volume make-up: kinds and their target share of the volume.
SHARES = {"hole": 0.30, "compressible": 0.40, "random": 0.30}
REGION_MIB = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
REGION_WEIGHTS = (8, 8, 6, 6, 5, 5, 4, 3, 2, 2, 1, 1)

# Targets blockvault should meet against the faster (or smaller) of restic and borg.
TARGET_FULL = 3.0
TARGET_RESTORE = 3.0
TARGET_INCR = 3.0
TARGET_BITMAP_SMALL = 5.0  # below 8 GiB
TARGET_BITMAP_LARGE = 20.0  # from 8 GiB
TARGET_REPO_RATIO = 1.02
TARGET_RSS_MIB = 128.0

TIME_BIN = "/usr/bin/time"


class BenchError(Exception):
    """A step of the benchmark failed; the message says which command and why."""


# --------------------------------------------------------------------------------------------
# Running commands: wall time and peak RSS of the process tree
# --------------------------------------------------------------------------------------------


@dataclass
class Measured:
    seconds: float
    peak_rss: int  # bytes
    stdout: str
    stderr: str


class _RssSampler(threading.Thread):
    """Polls the summed RSS of a process tree every RSS_POLL_SECONDS; keeps the maximum."""

    def __init__(self, pid: int, *, skip_root: bool) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self._skip_root = skip_root
        self._stop_event = threading.Event()
        try:
            self._root: psutil.Process | None = psutil.Process(pid)
        except psutil.Error:
            self._root = None

    def _sample(self) -> int:
        if self._root is None:
            return 0
        try:
            procs = self._root.children(recursive=True)
        except psutil.Error:
            return 0
        if not self._skip_root:
            procs.append(self._root)
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop_event.wait(RSS_POLL_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _time_maxrss(path: Path) -> int:
    """The %M (max RSS, KiB) /usr/bin/time wrote to ``path``, in bytes; 0 when unreadable."""
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return int(lines[-1]) * KiB if lines else 0
    except (OSError, ValueError):
        return 0


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def settle(warm: Sequence[Path]) -> None:
    """The same starting point for every command: nothing dirty, the page cache emptied (as
    root) so that each tool writes into recycled rather than never-touched memory, then the
    tool's inputs (volume, repository) read back in, so the cache is warm for what it reads."""
    os.sync()
    with contextlib.suppress(OSError):
        DROP_CACHES.write_text("1\n")
    for path in warm:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            read_through(file)


def run_measured(
    cmd: Sequence[str], *, env: dict[str, str], cwd: Path, scratch: Path, warm: Sequence[Path] = ()
) -> Measured:
    """Run ``cmd``; its wall time, and its peak RSS as the larger of /usr/bin/time's %M (exact for
    the largest single process) and the summed RSS of its process tree polled every 20 ms (counts
    helpers such as qemu-nbd running beside it). Raises BenchError when it fails."""
    use_time = os.access(TIME_BIN, os.X_OK)
    fd, name = tempfile.mkstemp(prefix="time-", suffix=".txt", dir=scratch)
    os.close(fd)
    time_file = Path(name)
    full = [TIME_BIN, "-f", "%M", "-o", str(time_file), *cmd] if use_time else list(cmd)
    try:
        settle(warm)
        started = time.perf_counter()
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            text=True,
        )
        sampler = _RssSampler(proc.pid, skip_root=use_time)
        sampler.start()
        out, err = proc.communicate()
        seconds = time.perf_counter() - started
        sampler.stop()
        peak = max(sampler.peak, _time_maxrss(time_file) if use_time else 0)
    finally:
        time_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = "\n".join((err or out).strip().splitlines()[-15:])
        raise BenchError(f"command failed (exit {proc.returncode}): {shlex.join(cmd)}\n  cwd={cwd}\n{tail}")
    return Measured(seconds, peak, out, err)


def run_plain(cmd: Sequence[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a helper command (not measured); raise BenchError when it fails."""
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"command failed (exit {proc.returncode}): {shlex.join(cmd)}\n{proc.stderr.strip()}")
    return proc


# --------------------------------------------------------------------------------------------
# Disk usage and file comparison
# --------------------------------------------------------------------------------------------


@dataclass
class Usage:
    allocated: int  # sum of st_blocks * 512 (what ``du -s`` counts)
    apparent: int  # sum of st_size (what ``du -sb`` counts)


def disk_usage(path: Path) -> Usage:
    """Allocated and apparent size of a file or of a directory tree (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    allocated = apparent = 0

    def add(st: os.stat_result) -> None:
        nonlocal allocated, apparent
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return
        seen.add(key)
        allocated += st.st_blocks * 512
        apparent += st.st_size

    add(path.lstat())
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for entry in (*dirs, *files):
                add(os.lstat(os.path.join(root, entry)))
    return Usage(allocated, apparent)


def first_difference(a: Path, b: Path) -> str | None:
    """None when ``a`` and ``b`` hold the same bytes, else where they first differ."""
    size_a, size_b = a.stat().st_size, b.stat().st_size
    if size_a != size_b:
        return f"sizes differ: {size_a} vs {size_b} bytes"
    with a.open("rb", buffering=0) as fa, b.open("rb", buffering=0) as fb:
        offset = 0
        while True:
            da, db = fa.read(COMPARE_PIECE), fb.read(COMPARE_PIECE)
            if da != db:
                at = next((i for i, (x, y) in enumerate(zip(da, db, strict=False)) if x != y), min(len(da), len(db)))
                return f"first difference at byte {offset + at}"
            if not da:
                return None
            offset += len(da)


def flush_seconds(path: Path) -> float:
    """Flush a restored file or device to disk (fsync); the seconds it took. Added to every
    tool's restore time, so that each is timed to the same point: data on the disk."""
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def data_map(path: Path) -> list[tuple[int, int]]:
    """The (offset, length) data extents of a file (SEEK_DATA/SEEK_HOLE): where its holes are."""
    extents: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, end - start))
            offset = end
    finally:
        os.close(fd)
    return extents


def first_difference_device(device: Path, raw: Path) -> str | None:
    """None when the first ``raw``-size bytes of ``device`` are ``raw``'s, else where they differ."""
    size = raw.stat().st_size
    with device.open("rb", buffering=0) as fd, raw.open("rb", buffering=0) as fr:
        offset = 0
        while offset < size:
            want = min(COMPARE_PIECE, size - offset)
            dd, dr = fd.read(want), fr.read(want)
            if dd != dr:
                return f"first difference in the {COMPARE_PIECE} bytes at {offset}"
            offset += want
    return None


@contextlib.contextmanager
def loop_device(backing: Path, size: int) -> Iterator[Path | None]:
    """A loop device (direct I/O to its backing file, like a disk) of ``size`` bytes, or None
    when losetup does not work here (not root, no loop support)."""
    with backing.open("wb") as handle:
        handle.truncate(size)
    made = subprocess.run(
        ["losetup", "--find", "--show", "--direct-io=on", str(backing)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        _say(f"no block device restore: losetup failed ({made.stderr.strip()})")
        yield None
        return
    device = Path(made.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=False)


SCRIBBLE = b"\xee" * 4096


def scribble(device: Path, size: int) -> None:
    """Write 4 KiB of garbage at the start of every MiB of ``device`` (the volume's regions are
    MiB-aligned), so that a restore which leaves any region unwritten shows as a mismatch."""
    fd = os.open(device, os.O_WRONLY)
    try:
        for offset in range(0, size, MiB):
            os.pwrite(fd, SCRIBBLE, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_through(path: Path) -> None:
    """Read a file once so that it is in the page cache."""
    with path.open("rb", buffering=0) as f:
        while f.read(16 * MiB):
            pass


def only_file_under(directory: Path) -> Path:
    """The single regular file a peer tool restored somewhere under ``directory``."""
    found = [Path(root, name) for root, _, files in os.walk(directory) for name in files]
    if len(found) != 1:
        raise BenchError(f"expected exactly one restored file under {directory}, found {len(found)}")
    return found[0]


# --------------------------------------------------------------------------------------------
# The volume
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    offset: int
    length: int
    kind: str  # "hole", "text", "pages" or "random"


def plan_layout(size: int, rng: random.Random) -> list[Region]:
    """MiB-aligned regions of varied sizes covering ``size`` bytes; kinds drawn with weights
    equal to each kind's remaining quota, so the shares land close to SHARES."""
    total_mib = size // MiB
    cap = max(1, total_mib // 8)
    sizes: list[int] = []
    left = total_mib
    while left > 0:
        mib = min(rng.choices(REGION_MIB, REGION_WEIGHTS)[0], cap, left)
        sizes.append(mib)
        left -= mib
    remaining = {kind: share * total_mib for kind, share in SHARES.items()}
    kinds = list(SHARES)
    regions: list[Region] = []
    offset_mib = 0
    for mib in sizes:
        kind = rng.choices(kinds, [max(remaining[k], 0.0) + 1e-6 for k in kinds])[0]
        remaining[kind] -= mib
        if kind == "compressible":
            kind = rng.choice(("text", "pages"))
        regions.append(Region(offset_mib * MiB, mib * MiB, kind))
        offset_mib += mib
    return regions


class ContentMaker:
    """Deterministic region content: log-like text and database-page-like records (both
    compressible, yet unique at every 256 bytes so that nothing dedups), and random bytes."""

    TOKEN_STRIDE = 256

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        letters = string.ascii_lowercase
        vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(3000)]
        weights = [1.0 / (rank + 1) for rank in range(len(vocab))]  # Zipf-like
        services = ["sshd", "kernel", "nginx", "postgres", "cron", "systemd", "dockerd", "app"]
        lines: list[str] = []
        length = 0
        while length < 4 * MiB:
            line = (
                f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:"
                f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} host{rng.randint(1, 40):02d} "
                f"{rng.choice(services)}[{rng.randint(100, 65000)}]: "
                + " ".join(rng.choices(vocab, weights, k=rng.randint(4, 16)))
                + "\n"
            )
            lines.append(line)
            length += len(line)
        corpus = "".join(lines).encode()
        self._corpus = corpus + corpus  # so a slice may wrap around
        self._corpus_len = len(corpus)

    def text(self, n: int) -> bytes:
        start = self.rng.randrange(self._corpus_len)
        buf = bytearray(self._corpus[start : start + n])
        stride = self.TOKEN_STRIDE
        positions = range(self.rng.randrange(stride - 8), n - 8, stride)
        tokens = self.rng.randbytes(4 * len(positions)).hex().encode()
        for i, pos in enumerate(positions):
            buf[pos : pos + 8] = tokens[8 * i : 8 * i + 8]
        return bytes(buf)

    def pages(self, n: int) -> bytes:
        page = 4096
        out = bytearray()
        base = self.rng.randrange(1 << 30)
        for p in range(n // page):
            header = struct.pack("<QI", base + p, self.rng.getrandbits(32)) + self.rng.randbytes(20)
            records = bytearray()
            count = self.rng.randint(20, 56)
            for r in range(count):
                key = base * 64 + p * 64 + r
                records += b"%010d|cust-%07d|ACTIVE|EUR|%012d|2024-05-01|" % (
                    key,
                    self.rng.randrange(10**7),
                    self.rng.randrange(10**12),
                )
            body = (header + records)[:page]
            out += body + bytes(page - len(body))
        return bytes(out)

    def random(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def make(self, kind: str, n: int) -> bytes:
        if kind == "text":
            return self.text(n)
        if kind == "pages":
            return self.pages(n)
        return self.random(n)


@dataclass
class VolumeInfo:
    size: int
    seed: int
    regions: int
    hole_bytes: int
    compressible_bytes: int
    random_bytes: int
    raw_allocated: int = 0
    qcow2_allocated: int = 0
    raw_allocated_after_change: int = 0
    changed_regions: list[int] = field(default_factory=list)
    changed_bytes: int = 0


def build_volume(raw: Path, qcow2: Path, size: int, seed: int) -> VolumeInfo:
    rng = random.Random(seed)
    regions = plan_layout(size, rng)
    maker = ContentMaker(rng)
    with raw.open("wb") as f:
        f.truncate(size)
        fd = f.fileno()
        for region in regions:
            if region.kind == "hole":
                continue
            for offset in range(region.offset, region.offset + region.length, MiB):
                os.pwrite(fd, maker.make(region.kind, MiB), offset)
        os.fsync(fd)
    run_plain(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])
    os.sync()

    def share(*kinds: str) -> int:
        return sum(r.length for r in regions if r.kind in kinds)

    return VolumeInfo(
        size=size,
        seed=seed,
        regions=len(regions),
        hole_bytes=share("hole"),
        compressible_bytes=share("text", "pages"),
        random_bytes=share("random"),
        raw_allocated=disk_usage(raw).allocated,
        qcow2_allocated=disk_usage(qcow2).allocated,
    )


def apply_change(raw: Path, qcow2: Path, info: VolumeInfo, scratch: Path) -> None:
    """Rewrite CHANGE_FRACTION of the 4 MiB-aligned regions with the same new random bytes in
    the raw file (directly) and in the qcow2 copy (through qemu-io, so its enabled persistent
    dirty bitmap records the writes); then check both still hold the same guest content."""
    rng = random.Random(info.seed ^ 0x5EED)
    units = info.size // CHANGE_UNIT
    count = max(1, round(units * CHANGE_FRACTION))
    chosen = sorted(rng.sample(range(units), count))
    commands: list[str] = []
    sources: list[Path] = []
    with raw.open("r+b") as f:
        for i, unit in enumerate(chosen):
            data = rng.randbytes(CHANGE_UNIT)
            os.pwrite(f.fileno(), data, unit * CHANGE_UNIT)
            source = scratch / f"change-{i}.bin"
            source.write_bytes(data)
            sources.append(source)
            commands += ["-c", f"write -q -s {source.name} {unit * CHANGE_UNIT} {CHANGE_UNIT}"]
        os.fsync(f.fileno())
    try:
        run_plain(["qemu-io", "-f", "qcow2", *commands, str(qcow2.resolve())], cwd=scratch)
    finally:
        for source in sources:
            source.unlink(missing_ok=True)
    os.sync()
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(qcow2)],
        capture_output=True,
        text=True,
        check=False,
    )
    if compare.returncode != 0:
        raise BenchError(f"raw and qcow2 differ after the change: {compare.stdout.strip()} {compare.stderr.strip()}")
    info.changed_regions = chosen
    info.changed_bytes = count * CHANGE_UNIT
    info.raw_allocated_after_change = disk_usage(raw).allocated


# --------------------------------------------------------------------------------------------
# The tools
# --------------------------------------------------------------------------------------------


@dataclass
class Step:
    seconds: float
    peak_rss: int
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    name: str
    full: Step | None = None
    incr: Step | None = None
    restore: Step | None = None
    repo: Usage | None = None
    restored_allocated: int | None = None
    restore_ok: bool | None = None
    sparse_ok: bool | None = None
    device: Step | None = None
    device_ok: bool | None = None
    error: str | None = None

    def peak_rss(self) -> int | None:
        steps = [s for s in (self.full, self.incr, self.restore, self.device) if s]
        return max(s.peak_rss for s in steps) if steps else None


class Tool:
    """One backup tool working on one volume file with its own repository."""

    name = ""
    notes = ""

    def __init__(self, workdir: Path, volume: Path, scratch: Path) -> None:
        self.workdir = workdir
        self.volume = volume
        self.scratch = scratch
        self.repo = workdir / f"repo-{self.slug}"
        self.env = dict(os.environ)

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "-").replace("(", "").replace(")", "")

    def run(self, cmd: Sequence[str], cwd: Path | None = None) -> Measured:
        warm = [self.volume] + ([self.repo] if self.repo.exists() else [])
        return run_measured(cmd, env=self.env, cwd=cwd or self.workdir, scratch=self.scratch, warm=warm)

    def init(self) -> None:
        raise NotImplementedError

    def backup(self, label: str) -> Step:
        raise NotImplementedError

    def restore(self, target_dir: Path) -> tuple[Step, Path]:
        raise NotImplementedError

    def restore_device(self, device: Path) -> Step:
        """Restore the latest backup onto the block device ``device`` (every byte written)."""
        raise NotImplementedError

    def run_to_device(self, cmd: Sequence[str], device: Path, cwd: Path | None = None) -> Measured:
        """Run ``cmd`` with its standard output written to ``device``."""
        return self.run(["sh", "-c", 'exec "$@" > "$0"', str(device), *cmd], cwd=cwd)


class Restic(Tool):
    name = "restic"

    def __init__(self, workdir: Path, volume: Path, scratch: Path) -> None:
        super().__init__(workdir, volume, scratch)
        self.env.update(
            RESTIC_REPOSITORY=str(self.repo),
            RESTIC_PASSWORD=PASSPHRASE,
            RESTIC_CACHE_DIR=str(workdir / "restic-cache"),
        )

    def init(self) -> None:
        self.run(["restic", "init"])
        version = run_plain(["restic", "version"]).stdout.split()[1]
        self.notes = f"restic {version}: repo format 'stable' (v2), compression auto (zstd), AES-256-CTR/Poly1305"

    def backup(self, label: str) -> Step:
        m = self.run(["restic", "backup", "--json", "--tag", label, str(self.volume)])
        detail: dict[str, Any] = {}
        for line in m.stdout.splitlines():
            if '"summary"' in line:
                summary = json.loads(line)
                detail = {k: summary.get(k) for k in ("data_added", "total_bytes_processed")}
        return Step(m.seconds, m.peak_rss, detail)

    def restore(self, target_dir: Path) -> tuple[Step, Path]:
        m = self.run(["restic", "restore", "latest", "--target", str(target_dir)])
        return Step(m.seconds, m.peak_rss), only_file_under(target_dir)

    def restore_device(self, device: Path) -> Step:
        m = self.run_to_device(["restic", "dump", "latest", str(self.volume.resolve())], device)
        return Step(m.seconds, m.peak_rss)


class Borg(Tool):
    name = "borg"

    def __init__(self, workdir: Path, volume: Path, scratch: Path) -> None:
        super().__init__(workdir, volume, scratch)
        self.env.update(
            BORG_PASSPHRASE=PASSPHRASE,
            BORG_BASE_DIR=str(workdir / "borg-base"),
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
            BORG_DISPLAY_PASSPHRASE="no",
        )
        self.archive = ""

    def init(self) -> None:
        self.run(["borg", "init", "-e", "repokey", str(self.repo)])
        version = run_plain(["borg", "--version"]).stdout.split()[-1]
        self.notes = f"borg {version}: -e repokey (AES-256-CTR + HMAC-SHA256), default compression lz4"

    def backup(self, label: str) -> Step:
        m = self.run(["borg", "create", "--json", f"{self.repo}::{label}", self.volume.name], cwd=self.volume.parent)
        self.archive = label
        stats = json.loads(m.stdout).get("archive", {}).get("stats", {})
        detail = {k: stats.get(k) for k in ("deduplicated_size", "compressed_size", "original_size")}
        return Step(m.seconds, m.peak_rss, detail)

    def restore(self, target_dir: Path) -> tuple[Step, Path]:
        m = self.run(["borg", "extract", "--sparse", f"{self.repo}::{self.archive}"], cwd=target_dir)
        return Step(m.seconds, m.peak_rss), only_file_under(target_dir)

    def restore_device(self, device: Path) -> Step:
        cmd = ["borg", "extract", "--stdout", f"{self.repo}::{self.archive}", self.volume.name]
        m = self.run_to_device(cmd, device, cwd=self.volume.parent)
        return Step(m.seconds, m.peak_rss)


def blockvault_json(m: Measured, cmd: str) -> dict[str, Any]:
    """The JSON a ``blockvault ... --json`` command printed last (BenchError when none)."""
    for line in reversed(m.stdout.splitlines()):
        if line.startswith("{"):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    raise BenchError(f"no JSON from blockvault {cmd}: stdout={m.stdout!r} stderr={m.stderr[-500:]!r}")


class Blockvault(Tool):
    def __init__(self, workdir: Path, volume: Path, scratch: Path, binary: str, *, bitmap: bool) -> None:
        self.name = "blockvault (bitmap)" if bitmap else "blockvault (rehash)"
        super().__init__(workdir, volume, scratch)
        self.binary = binary
        self.bitmap = bitmap
        self.env.update(BLOCKVAULT_PASSPHRASE=PASSPHRASE, BLOCKVAULT_DATA_DIR=str(workdir / "blockvault-data"))
        self.last_id = ""

    def init(self) -> None:
        self.run([self.binary, "repo", "init", str(self.repo), "--encrypt", "--json"])
        source = "qcow2 copy, --bitmap" if self.bitmap else "raw file, rehash"
        self.notes = f"{self.name}: --encrypt (AES-256-GCM), zstd, {source}"

    def backup(self, label: str) -> Step:
        cmd = [self.binary, "repo", "backup", str(self.repo), str(self.volume), "--json"]
        if self.bitmap:
            cmd += ["--bitmap", BITMAP_NAME]
        m = self.run(cmd)
        out = blockvault_json(m, "backup")
        self.last_id = str(out["id"])
        keys = ("mode", "bytesRead", "bytesWritten", "chunks", "newChunks", "seconds")
        return Step(m.seconds, m.peak_rss, {k: out.get(k) for k in keys})

    def restore(self, target_dir: Path) -> tuple[Step, Path]:
        target = target_dir / "restored.raw"
        m = self.run([self.binary, "repo", "restore", str(self.repo), self.last_id, str(target), "--json"])
        out = blockvault_json(m, "restore")
        return Step(m.seconds, m.peak_rss, {k: out.get(k) for k in ("bytesWritten", "seconds")}), target

    def restore_device(self, device: Path) -> Step:
        m = self.run(
            [self.binary, "repo", "restore", str(self.repo), self.last_id, str(device), "--in-place", "--json"]
        )
        out = blockvault_json(m, "restore")
        return Step(m.seconds, m.peak_rss, {k: out.get(k) for k in ("bytesWritten", "seconds")})


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _each_live(tools: list[Tool], rows: dict[str, Row]) -> Iterator[tuple[Tool, Row]]:
    for tool in tools:
        row = rows[tool.name]
        if row.error is None:
            yield tool, row


def _fail(row: Row, exc: BenchError) -> None:
    row.error = str(exc)
    print(f"\n!!! {row.name} FAILED: {exc}\n", file=sys.stderr, flush=True)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_benchmark(
    workdir: Path, size: int, seed: int, blockvault: str, *, device_restores: bool = True
) -> tuple[VolumeInfo, list[Tool], dict[str, Row]]:
    scratch = workdir / "scratch"
    scratch.mkdir()
    raw = workdir / "volume.raw"
    qcow2 = workdir / "volume.qcow2"
    _say(f"building a {size / GiB:g} GiB volume (seed {seed}) in {workdir}")
    info = build_volume(raw, qcow2, size, seed)
    _say(
        f"volume: {info.regions} regions; holes {info.hole_bytes / size:.0%}, compressible "
        f"{info.compressible_bytes / size:.0%}, random {info.random_bytes / size:.0%}; allocated raw "
        f"{info.raw_allocated / MiB:.0f} MiB, qcow2 {info.qcow2_allocated / MiB:.0f} MiB"
    )
    tools: list[Tool] = [
        Restic(workdir, raw, scratch),
        Borg(workdir, raw, scratch),
        Blockvault(workdir, raw, scratch, blockvault, bitmap=False),
        Blockvault(workdir, qcow2, scratch, blockvault, bitmap=True),
    ]
    rows = {tool.name: Row(tool.name) for tool in tools}
    for tool, row in _each_live(tools, rows):
        try:
            tool.init()
        except BenchError as exc:
            _fail(row, exc)

    read_through(raw)
    read_through(qcow2)
    for tool, row in _each_live(tools, rows):
        _say(f"full backup: {tool.name}")
        try:
            row.full = tool.backup("full")
        except BenchError as exc:
            _fail(row, exc)

    _say(f"rewriting {CHANGE_FRACTION:.0%} of the 4 MiB regions (raw and qcow2 alike)")
    apply_change(raw, qcow2, info, scratch)
    read_through(raw)
    read_through(qcow2)
    for tool, row in _each_live(tools, rows):
        _say(f"incremental backup: {tool.name}")
        try:
            row.incr = tool.backup("incr")
        except BenchError as exc:
            _fail(row, exc)

    for tool, row in _each_live(tools, rows):
        row.repo = disk_usage(tool.repo)

    source_map = data_map(raw)
    for tool, row in _each_live(tools, rows):
        _say(f"restore: {tool.name}")
        target_dir = workdir / f"restore-{tool.slug}"
        target_dir.mkdir()
        try:
            step, restored = tool.restore(target_dir)
            step.detail["flush_s"] = round(flush_seconds(restored), 3)
            step.seconds += step.detail["flush_s"]
            row.restore = step
            row.restored_allocated = disk_usage(restored).allocated
            row.sparse_ok = data_map(restored) == source_map
            problem = first_difference(restored, raw)
            row.restore_ok = problem is None
            if problem:
                print(
                    f"\n!!!!!!!! RESTORE MISMATCH: {tool.name} restored {restored} != {raw}: {problem}\n",
                    file=sys.stderr,
                    flush=True,
                )
        except BenchError as exc:
            _fail(row, exc)
        finally:
            shutil.rmtree(target_dir, ignore_errors=True)

    if device_restores:
        with loop_device(workdir / "device-backing.img", size) as device:
            for tool, row in _each_live(tools, rows) if device else ():
                assert device is not None
                _say(f"restore to the block device {device}: {tool.name}")
                scribble(device, size)
                try:
                    step = tool.restore_device(device)
                    step.detail["flush_s"] = round(flush_seconds(device), 3)
                    step.seconds += step.detail["flush_s"]
                    row.device = step
                    problem = first_difference_device(device, raw)
                    row.device_ok = problem is None
                    if problem:
                        print(
                            f"\n!!!!!!!! DEVICE RESTORE MISMATCH: {tool.name}: {problem}\n", file=sys.stderr, flush=True
                        )
                except BenchError as exc:
                    _fail(row, exc)
    return info, tools, rows


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    metric: str
    value: float | None
    target: str
    met: bool | None
    text: str


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _speedup(peers: list[float | None], ours: float | None) -> float | None:
    known = [p for p in peers if p is not None]
    if not known or ours is None or ours <= 0:
        return None
    return min(known) / ours


def _speed_text(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _secs(step: Step | None) -> float | None:
    return step.seconds if step else None


def verdicts(size: int, rows: dict[str, Row]) -> list[Verdict]:
    peers = [rows["restic"], rows["borg"]]
    rehash, bitmap = rows["blockvault (rehash)"], rows["blockvault (bitmap)"]
    bitmap_target = TARGET_BITMAP_LARGE if size >= 8 * GiB else TARGET_BITMAP_SMALL
    out: list[Verdict] = []

    def speed(metric: str, ratio: float | None, target: float, extra: str = "") -> None:
        met = None if ratio is None else ratio >= target
        text = _speed_text(ratio)
        out.append(Verdict(metric, ratio, f">= {target:g}x", met, text + extra))

    full_qcow2 = _speedup([_secs(p.full) for p in peers], _secs(bitmap.full))
    speed(
        "full backup (raw)",
        _speedup([_secs(p.full) for p in peers], _secs(rehash.full)),
        TARGET_FULL,
        f"  [qcow2 full for the bitmap path: {_fmt(full_qcow2)}x]",
    )
    speed("incremental by rehash", _speedup([_secs(p.incr) for p in peers], _secs(rehash.incr)), TARGET_INCR)
    speed(
        f"incremental by bitmap ({size / GiB:g} GiB)",
        _speedup([_secs(p.incr) for p in peers], _secs(bitmap.incr)),
        bitmap_target,
    )
    restore_bitmap = _speedup([_secs(p.restore) for p in peers], _secs(bitmap.restore))
    speed(
        "restore",
        _speedup([_secs(p.restore) for p in peers], _secs(rehash.restore)),
        TARGET_RESTORE,
        f"  [bitmap repo's restore: {_fmt(restore_bitmap)}x]",
    )
    if any(row.device for row in rows.values()):
        speed(
            "restore to a block device",
            _speedup([_secs(p.device) for p in peers], _secs(rehash.device)),
            TARGET_RESTORE,
        )

    peer_repos = [p.repo.allocated for p in peers if p.repo]
    for row in (rehash, bitmap):
        ratio = row.repo.allocated / min(peer_repos) if row.repo and peer_repos else None
        met = None if ratio is None else ratio <= TARGET_REPO_RATIO
        out.append(
            Verdict(
                f"repository size ({row.name})",
                ratio,
                f"<= {TARGET_REPO_RATIO:g}x smaller peer",
                met,
                "-" if ratio is None else f"{ratio:.3f}x the smaller peer's",
            )
        )
    rss = [r.peak_rss() for r in (rehash, bitmap)]
    known_rss = [r for r in rss if r is not None]
    peak = max(known_rss) / MiB if known_rss else None
    out.append(
        Verdict(
            "blockvault peak RSS",
            peak,
            f"<= {TARGET_RSS_MIB:g} MiB",
            None if peak is None else peak <= TARGET_RSS_MIB,
            "-" if peak is None else f"{peak:.1f} MiB",
        )
    )
    return out


def print_report(info: VolumeInfo, tools: list[Tool], rows: dict[str, Row], checks: list[Verdict]) -> None:
    size = info.size
    print()
    print(
        f"Volume: {size / GiB:g} GiB raw, {info.regions} MiB-aligned regions (seed {info.seed}): holes "
        f"{info.hole_bytes / MiB:.0f} MiB, compressible {info.compressible_bytes / MiB:.0f} MiB, random "
        f"{info.random_bytes / MiB:.0f} MiB; allocated raw {info.raw_allocated / MiB:.0f} MiB, "
        f"qcow2 {info.qcow2_allocated / MiB:.0f} MiB"
    )
    print(
        f"Change: {len(info.changed_regions)} of {size // CHANGE_UNIT} 4 MiB regions rewritten with random "
        f"data ({info.changed_bytes / MiB:.0f} MiB), raw == qcow2 checked with qemu-img compare"
    )
    print(
        "Warm cache (before each command: sync, drop caches, read the volume and the tool's repository); "
        "times are wall seconds of the whole command; a restore's time includes flushing what it "
        "restored to disk (fsync).  device s: the same restore onto a loop device (direct I/O)."
    )
    for tool in tools:
        if tool.notes:
            print(f"  {tool.notes}")
    print()
    headers = [
        "tool",
        "full s",
        "incr s",
        "restore s",
        "device s",
        "repo MiB",
        "repo app MiB",
        "restore alloc MiB",
        "peak RSS MiB",
    ]
    table: list[list[str]] = []
    for tool in tools:
        row = rows[tool.name]
        peak = row.peak_rss()
        table.append(
            [
                row.name,
                _fmt(_secs(row.full)),
                _fmt(_secs(row.incr)),
                _fmt(_secs(row.restore)),
                _fmt(_secs(row.device)),
                _fmt(row.repo.allocated / MiB if row.repo else None, ".1f"),
                _fmt(row.repo.apparent / MiB if row.repo else None, ".1f"),
                _fmt(row.restored_allocated / MiB if row.restored_allocated is not None else None, ".1f"),
                _fmt(peak / MiB if peak is not None else None, ".1f"),
            ]
        )
    source = info.raw_allocated_after_change / MiB
    table.append(["(source volume, after change)", "", "", "", "", "", "", f"{source:.1f}", ""])
    widths = [max(len(headers[i]), *(len(r[i]) for r in table)) for i in range(len(headers))]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))
    print(line)
    print("-" * len(line))
    for r in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    print()
    print("Per step:")
    for tool in tools:
        row = rows[tool.name]
        for label, step in (("full", row.full), ("incr", row.incr), ("restore", row.restore), ("device", row.device)):
            if step:
                detail = ", ".join(f"{k}={v}" for k, v in step.detail.items())
                print(
                    f"  {row.name:<20} {label:<8} {step.seconds:8.2f} s  RSS {step.peak_rss / MiB:7.1f} MiB  {detail}"
                )
        if row.restore_ok is not None:
            print(f"  {row.name:<20} restore verified byte for byte: {'OK' if row.restore_ok else 'MISMATCH'}")
        if row.sparse_ok is not None:
            sparse = "yes" if row.sparse_ok else "NO (holes differ from the source's)"
            print(f"  {row.name:<20} restore exactly as sparse as the source: {sparse}")
        if row.device_ok is not None:
            print(f"  {row.name:<20} device restore verified byte for byte: {'OK' if row.device_ok else 'MISMATCH'}")
        if row.error:
            print(f"  {row.name:<20} ERROR: {row.error.splitlines()[0]}")
    print()
    print("blockvault vs the faster (smaller) peer:")
    for check in checks:
        mark = "n/a" if check.met is None else ("MET" if check.met else "NOT MET")
        print(f"  {check.metric:<40} {check.text:<60} target {check.target:<26} {mark}")
    print()


def results_json(info: VolumeInfo, tools: list[Tool], rows: dict[str, Row], checks: list[Verdict]) -> dict[str, Any]:
    return {
        "volume": asdict(info),
        "tools": {tool.name: tool.notes for tool in tools},
        "rows": {name: {**asdict(row), "peak_rss": row.peak_rss()} for name, row in rows.items()},
        "targets": [asdict(check) for check in checks],
        "ok": all(
            row.error is None
            and row.restore_ok
            and row.device_ok is not False
            and (row.sparse_ok or not row.name.startswith("blockvault"))  # restic 0.14 cannot restore sparse
            for row in rows.values()
        ),
    }


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _find_blockvault(explicit: str | None) -> str:
    if explicit:
        return explicit
    beside = Path(sys.executable).with_name("blockvault")
    if beside.exists():
        return str(beside)
    found = shutil.which("blockvault")
    if not found:
        raise BenchError("blockvault not found beside this Python nor on PATH (use --blockvault)")
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-gib", type=float, default=2.0, help="volume size in GiB (default 2; 0.25 is quick)")
    parser.add_argument("--workdir", type=Path, help="where to make the run's directory (default /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (volume, repositories)")
    parser.add_argument("--json-out", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the volume's layout and content")
    parser.add_argument("--no-prefault", action="store_true", help="skip touching free memory first")
    parser.add_argument("--no-device", action="store_true", help="skip the restores to a block device (loop device)")
    parser.add_argument("--blockvault", help="the blockvault executable (default: beside this Python)")
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="run N CPU-bound processes beside every tool for the whole run (issue 20: figures under load)",
    )
    return parser.parse_args(argv)


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """``count`` processes spinning on the CPU for as long as the block runs (the same load
    for every tool, started before the first and stopped after the last)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    if hogs:
        print(f"{count} CPU-bound process(es) running beside the tools")
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


_PREFAULT_CHILD = """
import mmap, sys
size = int(sys.argv[1])
area = mmap.mmap(-1, size)
for offset in range(0, size, 4096):
    area[offset] = 1
"""


def prefault_memory(reserve: int = 3 * GiB) -> None:
    """Touch the machine's never-used free memory once, in a child that then exits.

    On a virtual machine the first touch of a guest page is several times slower than later
    ones (measured here: 360 MiB/s for the first write into a new page-cache page, 4.9 GiB/s
    for a reused one), and every tool's writes land in new page-cache pages: whichever tool
    runs first would pay for the machine's memory. Touching it up front makes the order fair.
    """
    free = 0
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemFree:"):
                free = int(line.split()[1]) * 1024
    size = free - reserve
    if size <= GiB:
        return
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", _PREFAULT_CHILD, str(size)], check=True)
    print(f"prefaulted {size / GiB:.1f} GiB of free memory in {time.perf_counter() - started:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    size = int(args.size_gib * GiB) // CHANGE_UNIT * CHANGE_UNIT
    if size < 64 * MiB:
        print("--size-gib must give at least 64 MiB", file=sys.stderr)
        return 2
    try:
        blockvault = _find_blockvault(args.blockvault)
        for tool in ("restic", "borg", "qemu-img", "qemu-io"):
            if not shutil.which(tool):
                raise BenchError(f"{tool} is not installed")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parent = args.workdir or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    needed = 7 * size + GiB
    free = shutil.disk_usage(parent).free
    if free < needed:
        print(
            f"error: {parent} has {free / GiB:.1f} GiB free, the run needs about {needed / GiB:.1f}",
            file=sys.stderr,
        )
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="blockvault-bench-", dir=parent)).resolve()
    started = time.perf_counter()
    print(f"load average at the start {_load()}")
    if not args.no_prefault:
        prefault_memory()
    try:
        with cpu_hogs(args.busy):
            info, tools, rows = run_benchmark(workdir, size, args.seed, blockvault, device_restores=not args.no_device)
    except BenchError as exc:
        print(f"\n!!! benchmark aborted: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    checks = verdicts(size, rows)
    print_report(info, tools, rows, checks)
    results = results_json(info, tools, rows, checks)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.json_out}")
    print(f"benchmark took {math.ceil(time.perf_counter() - started)} s; load average at the end {_load()}")
    if not results["ok"]:
        print("FAILED: a command failed or a restore did not match (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
