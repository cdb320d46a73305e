"""The ``repo backup --bitmap`` incremental of two source trees, run alternately (issue 20).

Each tree gets its own copy of one qcow2 volume (``compare_peers.build_volume``: the peers
benchmark's layout) and its own encrypted repository, backed up once with ``--bitmap``. Then,
``--rounds`` times, for each tree in turn (the order alternates): ``qemu-io`` rewrites
``--dirty`` random 4 MiB regions of its copy with random bytes, and the incremental runs as
``/usr/bin/time nice -n 5 env PYTHONPATH=<tree> python -m api.cli repo backup ... --bitmap``
(from the tree's folder), timed wall and CPU (user+sys, children included). Prints every run
with the load average, and the medians. On a shared machine only the alternation makes the
two trees comparable.

    python tests/bench/bitmap_incremental.py --tree main=/work/main --tree new=. \\
        --size-gib 8 --rounds 10 --dirty 41
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.compare_peers import build_volume

MiB = 1 << 20
UNIT = 4 * MiB
PASSPHRASE = "bench"


def cli(tree: Path, workdir: Path, label: str, *args: str, timed: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        PYTHONPATH=str(tree),
        BLOCKVAULT_PASSPHRASE=PASSPHRASE,
        BLOCKVAULT_DATA_DIR=str(workdir / f"data-{label}"),
    )
    cmd = [sys.executable, "-m", "api.cli", *args]
    if timed:
        cmd = ["/usr/bin/time", "-f", "TIME %e %U %S %M", "nice", "-n", "5", *cmd]
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{label}: {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return proc


def dirty(volume: Path, units: int, rng: random.Random, scratch: Path) -> None:
    """Rewrite ``units`` random 4 MiB regions of the qcow2 through qemu-io (the bitmap sees it)."""
    size = int(
        json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(volume)], capture_output=True, text=True, check=True
            ).stdout
        )["virtual-size"]
    )
    commands: list[str] = []
    for i, unit in enumerate(sorted(rng.sample(range(size // UNIT), units))):
        source = scratch / f"change-{i}.bin"
        source.write_bytes(rng.randbytes(UNIT))
        commands += ["-c", f"write -q -s {source} {unit * UNIT} {UNIT}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(volume)], check=True)
    for source in scratch.glob("change-*.bin"):
        source.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="LABEL=PATH of a source tree (give two)")
    parser.add_argument("--size-gib", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--dirty", type=int, default=41, help="4 MiB regions rewritten before each incremental")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    trees = {label: Path(path).resolve() for label, _, path in (t.partition("=") for t in args.tree)}
    work = Path(tempfile.mkdtemp(prefix="bitmap-incremental-", dir=args.workdir))
    try:
        raw, source = work / "v.raw", work / "v.qcow2"
        build_volume(raw, source, int(args.size_gib * (1 << 30)), seed=1)
        raw.unlink()
        for label, tree in trees.items():
            shutil.copyfile(source, work / f"{label}.qcow2")
            cli(tree, work, label, "repo", "init", str(work / f"repo-{label}"), "--encrypt", "--json")
            cli(
                tree,
                work,
                label,
                "repo",
                "backup",
                str(work / f"repo-{label}"),
                str(work / f"{label}.qcow2"),
                "--bitmap",
                "bench",
                "--json",
            )
        source.unlink()
        rng = random.Random(args.seed)
        runs: dict[str, list[tuple[float, float]]] = {label: [] for label in trees}
        for round_ in range(args.rounds):
            order = list(trees) if round_ % 2 == 0 else list(trees)[::-1]
            for label in order:
                volume = work / f"{label}.qcow2"
                dirty(volume, args.dirty, rng, work)
                os.sync()
                load = os.getloadavg()[0]
                proc = cli(
                    trees[label],
                    work,
                    label,
                    "repo",
                    "backup",
                    str(work / f"repo-{label}"),
                    str(volume),
                    "--bitmap",
                    "bench",
                    "--json",
                    timed=True,
                )
                out = json.loads(proc.stdout)
                fields = [line for line in proc.stderr.splitlines() if line.startswith("TIME ")][-1].split()
                wall, cpu = float(fields[1]), float(fields[2]) + float(fields[3])
                runs[label].append((wall, cpu))
                print(
                    f"{label:10} wall {wall:.2f} s  cpu {cpu:.2f} s  rss {int(fields[4]) // 1024} MiB  "
                    f"{out['mode']} read {out['bytesRead'] // MiB} MiB  load {load:.2f}",
                    flush=True,
                )
        for label, values in runs.items():
            print(
                f"median {label}: wall {statistics.median(w for w, _ in values):.3f} s  "
                f"cpu {statistics.median(c for _, c in values):.3f} s  n={len(values)}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
