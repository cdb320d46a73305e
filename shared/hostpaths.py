"""Host paths: the folders of a host the platform may open, and nothing else.

A worker runs as root on its hypervisor host, so every path it opens for a caller is one the
platform allows, never one the caller chose. Each host has *volume roots*
(``BLOCKVAULT_VOLUME_ROOTS``, folders separated by ``:``; default ``<data dir>/volumes``) and
a *VM socket folder* (``BLOCKVAULT_VM_SOCKET_DIR``; default ``<data dir>/vm-sockets``) for
the QEMU monitor and guest agent sockets; its worker reports both (real paths) when it
registers the host.

Two checks, one per side:

- :func:`require_under` (the API, which may run on another machine): an admin-given path is
  text without NUL or broken Unicode, absolute, already normal (no ``.``, ``..``, ``//`` or
  trailing ``/``) and lexically under one of the host's reported folders; else a 400.
- :func:`resolve_volume`, :func:`resolve_new_volume` and :func:`resolve_socket` (the worker,
  right before it opens anything): the real path on the host (symlinks followed) must lie
  under one of this host's folders, never inside the data folder (catalog, keys, broker)
  unless that folder is itself a root, and be the kind of file expected. The worker opens the
  real path it checked, never the one it was given.

Callers never name hosts' files: the platform names new volumes (:func:`new_volume_path`).
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.config import get_settings
from shared.errors import PathNotAllowed, TargetExists, UsageError

MAX_PATH = 4096
SOCKET_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, NUL included
VOLUME_KINDS = ("regular file", "block device")


# -- configuration (the worker's own host) ---------------------------------------------------------
def _folders(value: str, setting: str) -> list[str]:
    folders = []
    for raw in value.split(":"):
        if not raw:
            continue
        if not raw.startswith("/"):
            raise UsageError(detail=f"BLOCKVAULT_{setting}: {raw!r} is not an absolute path")
        real = os.path.realpath(raw)
        if not os.path.isdir(real):
            raise UsageError(detail=f"BLOCKVAULT_{setting}: {raw} is not a folder")
        if real == "/":
            raise UsageError(detail=f"BLOCKVAULT_{setting}: / would give callers the whole host")
        if real not in folders:
            folders.append(real)
    return folders


def _data_dir() -> str:
    return os.path.realpath(get_settings().data_path)


def volume_roots() -> list[str]:
    """This host's volume roots as real paths (the default one is created). UsageError when
    the setting names no folder, a relative path, ``/``, or a folder holding the data folder."""
    settings = get_settings()
    if settings.volume_roots is None:
        default = settings.data_path / "volumes"
        default.mkdir(parents=True, exist_ok=True, mode=0o700)
        return [os.path.realpath(default)]
    roots = _folders(settings.volume_roots, "VOLUME_ROOTS")
    if not roots:
        raise UsageError(detail="BLOCKVAULT_VOLUME_ROOTS names no folder")
    return roots


def socket_dir() -> str:
    """This host's VM socket folder as a real path (the default one is created)."""
    configured = get_settings().vm_socket_dir
    if configured is None:
        default = get_settings().data_path / "vm-sockets"
        default.mkdir(parents=True, exist_ok=True, mode=0o700)
        return os.path.realpath(default)
    folders = _folders(str(configured), "VM_SOCKET_DIR")
    if len(folders) != 1:
        raise UsageError(detail="BLOCKVAULT_VM_SOCKET_DIR names one folder")
    return folders[0]


# -- the API side: text and lexical checks ----------------------------------------------------------
def check_text(value: object, what: str) -> str:
    """``value`` as an absolute, normal path text; InvalidArgument-style 400 otherwise."""
    if not isinstance(value, str):
        raise PathNotAllowed(what=what, path=repr(value)[:80], detail="a path is a string")
    shown = value[:200].encode("utf-8", "backslashreplace").decode()
    if not value or len(value) > MAX_PATH:
        raise PathNotAllowed(what=what, path=shown, detail=f"a path has 1 to {MAX_PATH} characters")
    if "\0" in value:
        raise PathNotAllowed(what=what, path=shown, detail="a path has no NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PathNotAllowed(what=what, path=shown, detail="a path is valid Unicode") from None
    if not value.startswith("/"):
        raise PathNotAllowed(what=what, path=shown, detail="a path is absolute")
    if posixpath.normpath(value) != value or value.startswith("//"):
        detail = "a path is written normally (no '.', '..', '//' or '/' at the end)"
        raise PathNotAllowed(what=what, path=shown, detail=detail)
    return value


def root_of(path: str, folders: Sequence[str]) -> str | None:
    """The folder of ``folders`` that ``path`` lies (strictly) inside, lexically; None if none."""
    return next((folder for folder in folders if path.startswith(folder.rstrip("/") + "/")), None)


def require_under(value: object, folders: Sequence[str] | None, what: str, host: str) -> str:
    """``value`` as a path lexically inside one of a host's reported ``folders``."""
    path = check_text(value, what)
    if not folders:
        raise PathNotAllowed(what=what, path=path, detail=f"host {host}'s worker reported no such folder")
    if root_of(path, folders) is None:
        raise PathNotAllowed(what=what, path=path, detail=f"it is not inside {', '.join(folders)} on host {host}")
    return path


def reported_roots(host: Any) -> list[str]:
    """The volume roots a host's worker reported; PathNotAllowed when it reported none."""
    roots: list[str] = list(host.volumeRoots or [])
    if not roots:
        raise PathNotAllowed(what="a volume", path=f"on host {host.uuid}", detail="its worker reported no volume roots")
    return roots


def new_volume_path(roots: Sequence[str], volume_uuid: str, fmt: str, near: str | None = None) -> str:
    """Where the platform puts a new volume: ``<folder>/<volume uuid>.<raw|qcow2>``, the folder
    being that of ``near`` (the volume it was made from, on the same host) when that folder is
    a root or inside one, else the first root."""
    folder = posixpath.dirname(near) if near else None
    if folder is None or (folder not in roots and root_of(folder, roots) is None):
        folder = roots[0]
    return f"{folder.rstrip('/')}/{volume_uuid}.{'qcow2' if fmt == 'qcow2' else 'raw'}"


# -- the worker side: real paths on this host -------------------------------------------------------
def _real_under(value: object, folders: Sequence[str], what: str, setting: str) -> str:
    path = check_text(value, what)
    real = os.path.realpath(path)
    root = root_of(real, folders)
    if root is None:
        detail = f"its real path {real} is not inside {', '.join(folders)} (BLOCKVAULT_{setting})"
        raise PathNotAllowed(what=what, path=path, detail=detail)
    data = _data_dir()
    if (real == data or real.startswith(data + "/")) and not (root == data or root.startswith(data + "/")):
        raise PathNotAllowed(what=what, path=path, detail="it lies inside blockvault's data folder")
    return real


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISDIR(mode):
        return "folder"
    return "special file"


def resolve_volume(value: object, what: str = "volume") -> Path:
    """The real path of an existing volume on this host: a regular file or block device
    inside a volume root."""
    real = _real_under(value, volume_roots(), what, "VOLUME_ROOTS")
    try:
        kind = _kind(os.stat(real).st_mode)
    except FileNotFoundError:
        raise PathNotAllowed(what=what, path=str(value), detail="no such file") from None
    except OSError as exc:
        raise PathNotAllowed(what=what, path=str(value), detail=exc.strerror or str(exc)) from None
    if kind not in VOLUME_KINDS:
        raise PathNotAllowed(what=what, path=str(value), detail=f"it is a {kind}, not a volume file or block device")
    return Path(real)


def resolve_new_volume(value: object, what: str = "new volume") -> Path:
    """Where a new volume may be created on this host: its folder's real path is a volume root
    or inside one, and nothing is at the path yet (TargetExists). Returns the real folder plus
    the file's name."""
    path = check_text(value, what)
    folder, name = posixpath.split(path)
    roots = volume_roots()
    real_folder = os.path.realpath(folder)
    if real_folder not in roots:
        real_folder = _real_under(folder, roots, what, "VOLUME_ROOTS")
    if not os.path.isdir(real_folder):
        raise PathNotAllowed(what=what, path=path, detail="its folder does not exist")
    target = Path(real_folder) / name
    if os.path.lexists(target):
        raise TargetExists(path=path)
    return target


def resolve_socket(value: object, what: str) -> str:
    """The real path of a VM's monitor or agent socket on this host, inside its socket folder.
    A path with nothing there is returned as checked (connecting to it then fails as a missing
    monitor or agent does); something there must be a socket."""
    real = _real_under(value, [socket_dir()], what, "VM_SOCKET_DIR")
    try:
        kind = _kind(os.stat(real).st_mode)
    except FileNotFoundError:
        return real
    except OSError as exc:
        raise PathNotAllowed(what=what, path=str(value), detail=exc.strerror or str(exc)) from None
    if kind != "socket":
        raise PathNotAllowed(what=what, path=str(value), detail=f"it is a {kind}, not a UNIX socket")
    if len(real.encode()) > SOCKET_PATH_MAX:
        raise PathNotAllowed(what=what, path=str(value), detail=f"its real path is over {SOCKET_PATH_MAX} bytes")
    return real
