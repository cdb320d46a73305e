#!/usr/bin/env python3
"""A scheduled verify cycle over a 100 GiB-equivalent repository: how many times each chunk is
read (once), and the throughput.

Run as::

    .venv/bin/python tests/bench/verify_scale.py [--gib 100] [--volumes 25] [--runs 8]

The repository is synthetic, written straight into a file store (as engine_scale.py does):
``--volumes`` volumes of ``--gib / --volumes`` GiB each, every 4 MiB chunk distinct (an index and
random bytes at its start, the rest zeros, so it compresses to a few hundred bytes on disk;
``--random``: random bytes throughout, stored at full size),
each volume with a full backup and an incremental one that references the same chunks (twice
the bytes in backups, every chunk used by two manifests). The verify runs are the service's
(:func:`shared.service.maintenance_runs.verify_storage`, on an SQLite catalog), ``chunksPerRun``
set so that ``--runs`` runs make one cycle; a counting wrapper around the file backend's ``get``
counts every chunk read. What it measures is the verify path's own cost (reading, decompressing
and hashing 4 MiB per chunk, the cursor commits), with little disk I/O: on real data the disk's
read rate bounds it too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shared.repository.keys import dump_json  # noqa: E402
from shared.repository.manifest import Manifest  # noqa: E402
from shared.repository.repo import Repository, chunk_key, manifest_key  # noqa: E402
from tests.shared.service.test_maintenance_runs import chunk_reads_counted  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
CHUNK = 4 * MiB


def write(folder: Path, key: str, blob: bytes | bytearray) -> None:
    target = folder / key
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(blob)


def synthetic(folder: Path, gib: int, volumes: int, random: bool = False) -> int:
    """The repository at ``folder``; how many distinct chunks it holds (``random``: every chunk
    random bytes, stored as large as it is)."""
    repo = Repository.init(str(folder), chunk_size=CHUNK)
    per_volume = gib * GiB // volumes // CHUNK
    plain = bytearray(CHUNK)
    count = 0
    for volume in range(volumes):
        digests: list[str | None] = []
        for _ in range(per_volume):
            plain[:] = os.urandom(CHUNK) if random else count.to_bytes(8, "big") + os.urandom(24) + plain[32:]
            digest = repo.codec.digest(plain)
            write(folder, chunk_key(digest.hex()), repo.codec.encode(digest, plain))
            digests.append(digest.hex())
            count += 1
        for mode in ("full", "incremental"):
            manifest = Manifest(
                volume=f"/srv/vm/{volume}.raw",
                format="raw",
                size=per_volume * CHUNK,
                chunkSize=CHUNK,
                chunks=digests,
                mode=mode,
                name=f"synthetic {volume} {mode}",
                hostname="bench",
            )
            text = dump_json(manifest.to_json())
            digest = repo.codec.digest(text)
            write(folder, manifest_key(digest.hex()), repo.codec.encode(digest, text))
    repo.close()
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=int, default=100)
    parser.add_argument("--volumes", type=int, default=25)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--random", action="store_true", help="incompressible chunks (the disk's read rate counts)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bv-verify-scale-") as name:
        work = Path(name)
        os.environ.update(
            BLOCKVAULT_DATABASE_URL=f"sqlite:///{work / 'catalog.db'}",
            BLOCKVAULT_DATA_DIR=str(work / "data"),
            BLOCKVAULT_SECRET_KEY="bench-server-secret-0123456789abcdef",
        )
        from shared.catalog import db
        from shared.service.maintenance_runs import verify_storage
        from shared.storage import register_storage

        started = time.perf_counter()
        chunks = synthetic(work / "repo", args.gib, args.volumes, args.random)
        took = time.perf_counter() - started
        print(f"synthetic repository: {chunks} chunks ({chunks * CHUNK / GiB:.0f} GiB plain, "
              f"{2 * chunks * CHUNK / GiB:.0f} GiB in backups) in {took:.0f} s", flush=True)  # fmt: skip
        os.sync()
        db.migrate()
        with chunk_reads_counted() as reads, db.session() as session:
            storage = register_storage(session, {"name": "bench", "url": f"file://{work / 'repo'}"})
            session.commit()
            per_run = -(-chunks // args.runs)
            started, runs = time.perf_counter(), 0
            while True:
                result = verify_storage(session, storage, "bench-verify-job", {"chunksPerRun": per_run})
                runs += 1
                print(f"  run {runs}: {result['chunksChecked']} chunks in {result['seconds']:.1f} s", flush=True)
                if result["cycleDone"]:
                    break
            seconds = time.perf_counter() - started
        once = set(reads.values()) == {1} and len(reads) == chunks
        print(f"one cycle: {runs} runs, {seconds:.1f} s, {chunks * CHUNK / GiB / seconds:.2f} GiB/s "
              f"({chunks / seconds:.0f} chunks/s); every chunk read exactly once: {once}; "
              f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        return 0 if once else 1


if __name__ == "__main__":
    sys.exit(main())
