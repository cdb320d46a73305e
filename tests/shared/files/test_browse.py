"""File-level restore from backups of real disk images (tests/disk_images.py: built by mkfs
tools, nothing mounted): every filesystem and partition layout the issue names, each tree
listed and compared with its source (names, types, sizes, bytes, modes and times as precise
as the filesystem keeps them, link targets); paths that escape, do not exist or hide in no
filesystem; big directories paged; the sandbox's limits."""

from __future__ import annotations

import os
import posixpath
import random
from pathlib import Path
from typing import Any

import pytest

from shared.errors import FileNotInBackup, FilesTimeout, InvalidArgument, NoFilesystem
from shared.files.browse import Browser, Limits
from shared.repository.backup import backup_volume
from shared.repository.repo import Repository
from tests import disk_images
from tests.disk_images import MiB, Tree

CHUNK = 64 * 1024  # big.bin spans ~50 chunks


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), chunk_size=CHUNK)


def backed_up(repo: Repository, image: Path) -> str:
    return backup_volume(repo, str(image), full=True).id


def walk(browser: Browser, partition: int | None, path: str = "/") -> dict[str, dict[str, Any]]:
    """Every entry under ``path``, by path (directories listed a page of 7 at a time)."""
    found: dict[str, dict[str, Any]] = {}
    start = 0
    while True:
        page = browser.listdir(path, partition, start, 7)
        for entry in page["entries"]:
            found[entry["path"]] = entry
            if entry["type"] == "directory" and entry["name"] not in ("lost+found",):
                found.update(walk(browser, partition, entry["path"]))
        start += len(page["entries"])
        if start >= page["total"]:
            return found


def content(browser: Browser, path: str, partition: int | None) -> bytes:
    entry, pieces = browser.open(path, partition)
    data = b"".join(pieces)
    assert len(data) == entry["size"]
    return data


def compare(
    browser: Browser, tree: Tree, partition: int | None, *, modes: bool, time_unit: int, ignore: tuple[str, ...] = ()
) -> None:
    """The filesystem in ``partition`` holds exactly ``tree``: names, kinds, sizes, bytes, and
    (``modes``) permissions and mtimes to the ``time_unit`` (ns) the filesystem keeps."""
    found = {p: e for p, e in walk(browser, partition).items() if posixpath.basename(p) not in ignore}
    want = {"/" + f for f in tree.files} | {"/" + d for d in tree.dirs} | {"/" + link for link in tree.links}
    assert set(found) == want
    for name in tree.files:
        entry, source = found["/" + name], tree.root / name
        info = source.stat()
        assert entry["type"] == "file" and entry["size"] == info.st_size, name
        assert content(browser, "/" + name, partition) == source.read_bytes(), name
        if time_unit:
            assert entry["mtimeNs"] // time_unit == info.st_mtime_ns // time_unit, (name, entry["mtime"])
        if modes:
            assert int(entry["mode"], 8) == info.st_mode & 0o7777, name
    for name in tree.dirs:
        assert found["/" + name]["type"] == "directory"
    for name, target in tree.links.items():
        assert found["/" + name]["type"] == "symlink" and found["/" + name]["target"] == target


def test_ext4_ext3_and_ext2_trees_read_back_whole(repo: Repository, tmp_path: Path) -> None:
    tree = disk_images.source_tree(tmp_path / "src")
    for kind in ("ext4", "ext3", "ext2"):
        image = disk_images.ext4(tree, tmp_path / f"{kind}.img", kind=kind)
        with Browser(repo, backed_up(repo, image), kind) as browser:
            (whole,) = browser.partitions()
            assert (whole["index"], whole["name"], whole["filesystem"]) == (0, "disk", "ext")
            compare(browser, tree, None, modes=True, time_unit=10**9, ignore=("lost+found",))
            # symbolic links are shown, and followed only inside the filesystem
            assert browser.stat("/abs-link", None)["entry"]["target"] == "/etc/hosts"
            assert content(browser, "/abs-link", None) == (tree.root / "etc/hosts").read_bytes()
            assert content(browser, "/etc/up-link", None) == (tree.root / "big.bin").read_bytes()
            assert [e["name"] for e in browser.listdir("/etc/hosts", None)["entries"]] == ["hosts"]


def test_xfs_tree_reads_back_whole(repo: Repository, tmp_path: Path) -> None:
    tree = disk_images.source_tree(tmp_path / "src", spaces=False)
    image = disk_images.xfs(tree, tmp_path / "xfs.img")
    with Browser(repo, backed_up(repo, image), "xfs") as browser:
        assert browser.partitions()[0]["filesystem"] == "xfs"
        compare(browser, tree, None, modes=True, time_unit=0)  # a protofile sets no times...
        entry = browser.stat("/big.bin", None)["entry"]
        assert (entry["uid"], entry["gid"]) == (1000, 100)  # ...but owners
        assert abs(entry["mtimeNs"] - os.stat(image).st_mtime_ns) < 600 * 10**9


def test_fat_tree_reads_back_whole(repo: Repository, tmp_path: Path) -> None:
    tree = disk_images.source_tree(tmp_path / "src", links=False)
    image = disk_images.vfat(tree, tmp_path / "fat.img")
    with Browser(repo, backed_up(repo, image), "fat") as browser:
        assert browser.partitions()[0]["filesystem"] == "fat"
        compare(browser, tree, None, modes=False, time_unit=2 * 10**9)  # FAT keeps even seconds
        assert content(browser, "/ETC/HOSTS", None) == (tree.root / "etc/hosts").read_bytes()  # case-blind


def test_ntfs_tree_reads_back_whole(repo: Repository, tmp_path: Path) -> None:
    tree = disk_images.source_tree(tmp_path / "src", links=False, subdirs=False)
    image = disk_images.ntfs(tree, tmp_path / "ntfs.img")
    with Browser(repo, backed_up(repo, image), "ntfs") as browser:
        assert browser.partitions()[0]["filesystem"] == "ntfs"
        compare(browser, tree, None, modes=False, time_unit=100)  # NTFS: 100 ns


def test_mbr_partitions_each_filesystem_by_index(repo: Repository, tmp_path: Path) -> None:
    tree = disk_images.source_tree(tmp_path / "src")
    fat_tree = disk_images.source_tree(tmp_path / "fat-src", links=False, many=3)
    ext = disk_images.ext4(tree, tmp_path / "ext.img")
    fat = disk_images.vfat(fat_tree, tmp_path / "fat.img")
    disk = tmp_path / "mbr.img"
    offsets = disk_images.partitioned(disk, "dos", [(ext, 64 * MiB, "83"), (fat, 64 * MiB, "c")])
    with Browser(repo, backed_up(repo, disk), "mbr") as browser:
        parts = browser.partitions()
        assert [(p["name"], p["offset"], p["filesystem"]) for p in parts] == [
            ("mbr1", offsets[0], "ext"),
            ("mbr2", offsets[1], "fat"),
        ]
        assert browser.listdir("/", None)["partition"] == 0  # by default the first filesystem
        compare(browser, tree, 0, modes=True, time_unit=10**9, ignore=("lost+found",))
        compare(browser, fat_tree, 1, modes=False, time_unit=2 * 10**9)
        with pytest.raises(InvalidArgument, match="no partition 5"):
            browser.listdir("/", 5)


def test_gpt_with_lvm_logical_volumes(repo: Repository, tmp_path: Path) -> None:
    ntfs_tree = disk_images.source_tree(tmp_path / "ntfs-src", links=False, subdirs=False)
    xfs_tree = disk_images.source_tree(tmp_path / "xfs-src", spaces=False)
    ext_tree = disk_images.source_tree(tmp_path / "ext-src")
    ntfs = disk_images.ntfs(ntfs_tree, tmp_path / "ntfs.img")
    xfs = disk_images.xfs(xfs_tree, tmp_path / "xfs.img")
    ext = disk_images.ext4(ext_tree, tmp_path / "ext.img")
    disk = tmp_path / "gpt.img"
    linux_lvm, basic_data = "E6D6D379-F507-44C2-A23C-238F2A3DF928", "EBD0A0A2-B9E5-4433-87C0-68B6B97199C7"
    offsets = disk_images.partitioned(disk, "gpt", [(ntfs, 64 * MiB, basic_data), (None, 400 * MiB, linux_lvm)])
    group = disk_images.lvm(disk, offsets[1], 400 * MiB, [("root", 320 * MiB, xfs), ("home", 64 * MiB, ext)], tmp_path)
    with Browser(repo, backed_up(repo, disk), "gpt") as browser:
        parts = browser.partitions()
        assert [(p["index"], p["name"], p["filesystem"]) for p in parts] == [
            (0, "gpt1", "ntfs"),
            (1, "gpt2", "lvm"),
            (2, f"{group}/root", "xfs"),
            (3, f"{group}/home", "ext"),
        ]
        assert parts[2]["size"] == 320 * MiB
        compare(browser, ntfs_tree, 0, modes=False, time_unit=100)
        compare(browser, xfs_tree, 2, modes=True, time_unit=0)
        compare(browser, ext_tree, 3, modes=True, time_unit=10**9, ignore=("lost+found",))
        with pytest.raises(NoFilesystem, match="no filesystem"):
            browser.listdir("/", 1)  # the physical volume itself


def test_bad_paths_missing_files_and_no_filesystem(repo: Repository, tmp_path: Path) -> None:
    tree = disk_images.source_tree(tmp_path / "src", many=3)
    image = disk_images.ext4(tree, tmp_path / "ext.img")
    with Browser(repo, backed_up(repo, image), "volume backup x") as browser:
        for bad in ("/etc/../etc/hosts", "etc/hosts", "/./etc", "/etc/\0"):
            with pytest.raises(InvalidArgument):
                browser.listdir(bad, None)
        with pytest.raises(FileNotInBackup, match="no file /nope in volume backup x"):
            browser.listdir("/nope", None)
        with pytest.raises(FileNotInBackup):
            browser.open("/etc/hosts/below", None)
        with pytest.raises(InvalidArgument, match="not a regular file"):
            browser.open("/etc", None)
        with pytest.raises(InvalidArgument):
            browser.listdir("/", None, 0, 10_001)
    noise = tmp_path / "noise.raw"
    noise.write_bytes(random.Random(3).randbytes(2 * MiB))
    with Browser(repo, backed_up(repo, noise), "volume backup y") as browser:
        assert browser.partitions() == [{"index": 0, "name": "disk", "offset": 0, "size": 2 * MiB, "filesystem": None}]
        with pytest.raises(NoFilesystem, match="no partition holds a filesystem"):
            browser.listdir("/", None)


def test_a_huge_directory_is_paged_and_limited(repo: Repository, tmp_path: Path) -> None:
    tree = disk_images.source_tree(tmp_path / "src", many=2500)
    image = disk_images.ext4(tree, tmp_path / "ext.img")
    backup = backed_up(repo, image)
    with Browser(repo, backup, "big") as browser:
        names: list[str] = []
        for start in range(0, 2500, 1000):
            page = browser.listdir("/etc/many", None, start, 1000)
            assert page["total"] == 2500
            names += [e["name"] for e in page["entries"]]
        assert names == [f"f{i:04d}" for i in range(2500)]
    with Browser(repo, backup, "big", Limits(max_entries=2000)) as browser:
        with pytest.raises(InvalidArgument, match="more than 2000 entries"):
            browser.listdir("/etc/many", None)
        assert browser.listdir("/etc", None)["total"] == 3  # small folders still list
    with Browser(repo, backup, "big", Limits(timeout=0.001)) as browser, pytest.raises(FilesTimeout):
        browser.listdir("/", None)


def test_logical_partitions_of_an_extended_mbr_partition(repo: Repository, tmp_path: Path) -> None:
    tree = disk_images.source_tree(tmp_path / "src", many=3)
    ext = disk_images.ext4(tree, tmp_path / "ext.img", size=32 * MiB)
    disk = tmp_path / "mbr.img"
    with open(disk, "wb") as handle:
        handle.truncate(100 * MiB)
    script = "label: dos\nstart=2048, size=8192, type=83\nstart=12288, size=180000, type=5\n"
    script += "start=14336, size=65536, type=83\nstart=81920, size=8192, type=83\n"
    disk_images.run("sfdisk", "-q", str(disk), stdin=script)
    disk_images.run("dd", f"if={ext}", f"of={disk}", "bs=512", "seek=14336", "conv=notrunc,sparse", "status=none")
    with Browser(repo, backed_up(repo, disk), "logical") as browser:
        parts = browser.partitions()
        assert [(p["name"], p["offset"], p["filesystem"]) for p in parts] == [
            ("mbr1", 2048 * 512, None),
            ("mbr5", 14336 * 512, "ext"),
            ("mbr6", 81920 * 512, None),
        ]
        assert browser.listdir("/", None)["partition"] == 1
        assert content(browser, "/etc/hosts", 1) == (tree.root / "etc/hosts").read_bytes()
