"""Disk images with filesystems, built without mounting anything: ``mkfs.ext4 -d``,
``mkfs.xfs -p`` (a protofile), ``mkfs.vfat`` + ``mcopy``, ``mkntfs`` + ``ntfscp``, ``sfdisk``
partition tables and LVM made by the real LVM tools on a loop device (metadata only: nothing is
activated, device-mapper is never used; each test has its own LVM configuration folder, so the
host's LVM never sees these volume groups).

:func:`source_tree` is what goes into them: modes, times, a file spanning many chunks, a sparse
file, names with spaces and non-ASCII letters, symbolic links (absolute and relative), a big
directory. The Debian packages: tests/harness/ensure-system.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
TIMES = (981173106, 1234567890)  # 2001-02-03 04:05:06 and 2009-02-13 23:31:30 UTC
ENV = {**os.environ, "TZ": "UTC", "LC_ALL": "C.UTF-8", "MTOOLS_SKIP_CHECK": "1"}


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, env=env or ENV, check=False, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return done.stdout


@dataclass
class Tree:
    """A source tree on disk and what is in it."""

    root: Path
    files: list[str]  # relative paths of regular files
    dirs: list[str]
    links: dict[str, str]  # relative path -> target


def source_tree(root: Path, *, spaces: bool = True, links: bool = True, subdirs: bool = True, many: int = 40) -> Tree:
    """The files to put into an image. ``spaces`` False: names without spaces (XFS protofiles
    cannot say them); ``subdirs`` False: everything in the top folder (ntfscp makes no folder)."""
    rng = random.Random(11)
    root.mkdir(parents=True)
    files: dict[str, bytes] = {
        "hosts": b"127.0.0.1 localhost\n",
        "big.bin": rng.randbytes(3 * MiB + 4321),  # spans many chunks of the test repositories
        ("fïle ñame.txt" if spaces else "fïle_ñame.txt"): "ünïcødé ✓\n".encode(),
        "empty": b"",
    }
    dirs = []
    if subdirs:
        dirs = ["etc", "etc/many", "dír" + (" with space" if spaces else "_x")]
        files = {f"etc/{k}" if k == "hosts" else k: v for k, v in files.items()}
        files[f"{dirs[2]}/nested.txt"] = b"nested\n"
        for i in range(many):
            files[f"etc/many/f{i:04d}"] = f"{i}\n".encode()
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    sparse = root / "sparse.bin"
    with open(sparse, "wb") as handle:
        handle.truncate(6 * MiB)
        handle.seek(4 * MiB + 100)
        handle.write(b"in the middle of nothing")
    names = [*files, "sparse.bin"]
    os.chmod(root / names[0], 0o640)
    for index, name in enumerate(names):
        os.utime(root / name, (TIMES[index % 2], TIMES[(index + 1) % 2]))
    found_links: dict[str, str] = {}
    if links:
        found_links = {"abs-link": "/etc/hosts", "rel-link": "etc/hosts" if subdirs else "hosts"}
        if subdirs:
            found_links["etc/up-link"] = "../../../../big.bin"  # climbs above the root: stays inside
        for name, target in found_links.items():
            os.symlink(target, root / name)
    return Tree(root, sorted(names), dirs, found_links)


def ext4(tree: Tree, image: Path, size: int = 64 * MiB, kind: str = "ext4") -> Path:
    with open(image, "wb") as handle:
        handle.truncate(size)
    run(f"mkfs.{kind}", "-q", "-F", "-I", "256", "-d", str(tree.root), str(image))
    return image


def xfs(tree: Tree, image: Path, size: int = 320 * MiB) -> Path:
    """XFS from a protofile (mkfs.xfs wants at least 300 MiB; the image is sparse)."""
    lines = ["proto", "0 0", "d--755 0 0"]

    def walk(folder: Path, depth: int) -> None:
        for entry in sorted(folder.iterdir()):
            mode = entry.lstat().st_mode
            if entry.is_symlink():
                lines.append(f"{entry.name} l--777 0 0 {os.readlink(entry)}")
            elif entry.is_dir():
                lines.append(f"{entry.name} d--{mode & 0o777:o} 0 0")
                walk(entry, depth + 1)
                lines.append("$")
            else:
                lines.append(f"{entry.name} ---{mode & 0o777:o} 1000 100 {entry}")

    walk(tree.root, 0)
    lines.append("$")
    proto = image.with_suffix(".proto")
    proto.write_text("\n".join(lines) + "\n")
    with open(image, "wb") as handle:
        handle.truncate(size)
    run("mkfs.xfs", "-q", "-f", "-p", str(proto), str(image))
    return image


def vfat(tree: Tree, image: Path, size: int = 64 * MiB) -> Path:
    with open(image, "wb") as handle:
        handle.truncate(size)
    run("mkfs.vfat", "-F", "32", str(image))
    for d in tree.dirs:
        run("mmd", "-i", str(image), f"::/{d}")
    for name in tree.files:
        run("mcopy", "-m", "-i", str(image), str(tree.root / name), f"::/{name}")
    return image


def ntfs(tree: Tree, image: Path, size: int = 64 * MiB) -> Path:
    with open(image, "wb") as handle:
        handle.truncate(size)
    run("mkntfs", "-q", "-F", "-f", str(image))
    for name in tree.files:
        run("ntfscp", "-q", "-f", "-t", str(image), str(tree.root / name), name)
    return image


def partitioned(image: Path, label: str, parts: list[tuple[Path | None, int, str]]) -> list[int]:
    """A disk at ``image`` with an MBR (``dos``) or GPT table of ``parts`` (filesystem image or
    None, size, sfdisk type), each image copied in (holes kept); the partitions' offsets."""
    offset, script, offsets = MiB, [f"label: {label}"], []
    for _fs, size, kind in parts:
        script.append(f"start={offset // 512}, size={size // 512}, type={kind}")
        offsets.append(offset)
        offset += size
    with open(image, "wb") as handle:
        handle.truncate(offset + MiB)
    run("sfdisk", "-q", str(image), stdin="\n".join(script) + "\n")
    for (fs, _size, _kind), start in zip(parts, offsets, strict=True):
        if fs is not None:
            run("dd", f"if={fs}", f"of={image}", "bs=1M", f"seek={start // MiB}", "conv=notrunc,sparse", "status=none")
    return offsets


def lvm(image: Path, offset: int, size: int, volumes: list[tuple[str, int, Path]], workdir: Path) -> str:
    """An LVM physical volume at ``offset`` of ``image`` (``size`` bytes) with one volume group
    and the logical volumes ``(name, size, filesystem image)``, each filesystem copied into its
    extents (read back from ``lvs``); the volume group's name. Needs a loop device."""
    system = workdir / f"lvm-{uuid.uuid4().hex[:8]}"
    system.mkdir()
    (system / "lvm.conf").write_text("")
    env = {**ENV, "LVM_SYSTEM_DIR": str(system)}
    group = f"bv{uuid.uuid4().hex[:10]}"
    loop = run("losetup", "-f", "--show", "-o", str(offset), "--sizelimit", str(size), str(image)).strip()
    try:
        run("pvcreate", "-q", "-ff", "-y", loop, env=env)
        run("vgcreate", "-q", "-s", "1M", group, loop, env=env)
        for name, lv_size, _fs in volumes:
            run(
                "lvcreate",
                "-q",
                "--driverloaded",
                "n",
                "-an",
                "-Zn",
                "-L",
                f"{lv_size // MiB}M",
                "-n",
                name,
                group,
                env=env,
            )
        start = int(run("pvs", "-q", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", loop, env=env))
        ranges = run("lvs", "-q", "--driverloaded", "n", "--noheadings", "-o", "lv_name,seg_pe_ranges", group, env=env)
    finally:
        run("losetup", "-d", loop)
        shutil.rmtree(system, ignore_errors=True)
    first_extent = {line.split()[0]: int(line.split()[1].split(":")[1].split("-")[0]) for line in ranges.splitlines()}
    for name, _lv_size, fs in volumes:
        at = offset + start + first_extent[name] * MiB
        run("dd", f"if={fs}", f"of={image}", "bs=1M", f"seek={at // MiB}", "conv=notrunc,sparse", "status=none")
    return group
