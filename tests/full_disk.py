"""A backup storage's disk that fills up: a small tmpfs mounted for a test (the tests run as
root), filled to its last byte by one file that the test removes to give the space back."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def mount_small(mount: Path, size: str = "24m") -> None:
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)


def unmount(mount: Path) -> None:
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs, unmounted after the test."""
    mount = tmp_path / "small"
    mount_small(mount)
    try:
        yield mount
    finally:
        unmount(mount)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to its last byte with one file; returns it (remove it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for block in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\xff" * block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    assert shutil.disk_usage(disk).free == 0
    return filler
