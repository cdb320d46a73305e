"""Private files: what only blockvault's own user may read.

The data dir is made mode 0700 when blockvault creates it; the files that hold the catalog and
the server secret are made 0600 (:func:`private_file` creates them so before anything writes
to them, and tightens ones an earlier version left readable). A folder that exists already is
left as the operator made it (systemd's ``StateDirectoryMode``, a shared mount).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """``path``, created mode 0700 (its missing parents with the default mode) unless it exists."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=DIR_MODE)  # the mode is masked by the umask, never widened by it
    return path


def tighten(path: Path) -> None:
    """Take group and other permissions away from ``path`` if it exists; a file this user may
    not change is reported, not fatal."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        try:
            os.chmod(path, mode & ~0o077)
        except OSError as exc:
            log.warning("private.chmod_failed path=%s mode=%o: %s", path, mode, exc.strerror)
            return
        log.info("private.tightened path=%s mode=%o", path, mode & ~0o077)


def private_file(path: Path) -> Path:
    """``path`` as a file only this user may read: created empty, mode 0600, when missing (in a
    0700 folder when that is missing too), else tightened."""
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
    except FileExistsError:
        tighten(path)
    return path
