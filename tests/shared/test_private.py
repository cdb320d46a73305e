"""Private files and folders: created so, and tightened when an earlier version left them open."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from shared.private import private_dir, private_file, tighten


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_folder_blockvault_creates_is_0700_one_that_exists_stays(tmp_path: Path) -> None:
    created = private_dir(tmp_path / "a" / "data")
    assert mode(created) == 0o700
    existing = tmp_path / "mine"
    existing.mkdir(mode=0o750)
    existing.chmod(0o750)
    private_dir(existing)
    assert mode(existing) == 0o750


def test_a_private_file_is_created_0600_whatever_the_umask_and_tightened_when_open(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = private_file(tmp_path / "new" / "catalog.db")
    finally:
        os.umask(old)
    assert mode(path) == 0o600 and path.read_bytes() == b"" and mode(path.parent) == 0o700
    path.write_bytes(b"kept")
    path.chmod(0o664)
    private_file(path)
    assert mode(path) == 0o600 and path.read_bytes() == b"kept"
    tighten(tmp_path / "missing")  # nothing to do
