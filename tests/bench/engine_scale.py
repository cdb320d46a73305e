#!/usr/bin/env python3
"""Engine at fleet scale: an incremental backup of an unchanged small volume with 10, 1,000,
10,000 and 100,000 other backups (manifests) in the repository, on the file backend and on
S3 (a moto server): time and backend requests per backup.

Run as::

    .venv/bin/python tests/bench/engine_scale.py [--sizes 10,1000,10000,100000] [--s3-sizes 10,1000,10000]

The other manifests are written straight into the store (a file each, or a PUT each to moto),
as many volumes backed up there before would leave them. Every backup runs with the host's
chunk index (``<work>/index``); each figure is the median of ``--runs`` backups. Goal: the
time at the largest size within 1.2x the time at 10, the requests the same at every size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shared.repository.backends import FileBackend, open_backend  # noqa: E402
from shared.repository.backup import backup_volume  # noqa: E402
from shared.repository.repo import Repository  # noqa: E402
from tests.shared.repository.test_scale import CHUNK, Counting, synthetic_manifests, volume_file  # noqa: E402


def measure(repo: Repository, counting: Counting, volume: Path, runs: int) -> tuple[float, int]:
    times, requests = [], set()
    for _ in range(runs):
        counting.calls.clear()
        started = time.perf_counter()
        result = backup_volume(repo, str(volume))
        times.append(time.perf_counter() - started)
        assert result.mode == "incremental" and result.newChunks == 0
        requests.add(counting.total())
    assert len(requests) == 1, requests
    return statistics.median(times), requests.pop()


def run_backend(name: str, make: object, sizes: list[int], runs: int, work: Path) -> list[tuple[str, int, float, int]]:
    counting, writer = make()  # type: ignore[operator]
    repo = Repository.init(counting, chunk_size=CHUNK)
    repo.use_index(work / f"index-{name}")
    volume = volume_file(work / f"{name}.raw", size=4 * CHUNK * 16)
    backup_volume(repo, str(volume))
    rows, written = [], 0
    for size in sizes:
        synthetic_manifests(repo, size - written, writer)
        written = size
        # The other backups were written long before this one: on disk, not dirty in the page
        # cache (else the first fsync of the next backup pays for writing them back).
        os.sync()
        seconds, requests = measure(repo, counting, volume, runs)
        rows.append((name, size, seconds, requests))
        print(f"  {name:<5} {size:>7} manifests: {seconds * 1000:8.1f} ms, {requests} requests", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,1000,10000,100000")
    parser.add_argument("--s3-sizes", default="10,1000,10000")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows: list[tuple[str, int, float, int]] = []
    with tempfile.TemporaryDirectory(prefix="bv-engine-scale-") as folder:
        work = Path(folder)

        def file_store() -> tuple[Counting, object]:
            def write(key: str, blob: bytes) -> None:
                target = work / "repo" / key
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(blob)

            return Counting(FileBackend(work / "repo")), write

        rows += run_backend("file", file_store, [int(s) for s in args.sizes.split(",")], args.runs, work)
        if args.s3_sizes:
            from tests.s3_fixtures import S3Server, free_port

            (work / "moto").mkdir()
            s3 = S3Server(moto_port=free_port(), workdir=work / "moto")
            s3.start()
            try:
                bucket = s3.make_bucket("bv-scale")

                def s3_store() -> tuple[Counting, object]:
                    inner = open_backend(f"s3://{bucket}/{uuid.uuid4().hex}", s3.options(bucket))
                    return Counting(inner), inner.put

                rows += run_backend("s3", s3_store, [int(s) for s in args.s3_sizes.split(",")], args.runs, work)
            finally:
                s3.stop()
    print("\nbackend  manifests   ms/backup  requests  vs. smallest")
    for name in ("file", "s3"):
        mine = [row for row in rows if row[0] == name]
        for backend, size, seconds, requests in mine:
            print(f"{backend:<8} {size:>9} {seconds * 1000:11.1f} {requests:9d}  {seconds / mine[0][2]:5.2f}x")
    verdicts = []
    for name in ("file", "s3"):
        mine = [row for row in rows if row[0] == name]
        if mine:
            ratio = mine[-1][2] / mine[0][2]
            same = len({row[3] for row in mine}) == 1
            verdicts.append(ratio <= 1.2 and same)
            print(
                f"{name}: time at {mine[-1][1]} manifests {ratio:.2f}x the time at {mine[0][1]} (goal <= 1.2x); "
                f"requests {'constant' if same else 'NOT constant'}"
            )
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
