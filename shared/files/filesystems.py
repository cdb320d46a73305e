"""Reading one filesystem: its directories, its files' metadata and bytes.

Two readers behind one small interface, :class:`Reader` (nodes are the library's own objects):
:class:`TskReader` (The Sleuth Kit through pytsk3: ext2/3/4, FAT12/16/32, exFAT, NTFS) and
:class:`XfsReader` (libyal's libfsxfs). :class:`Filesystem` resolves paths on top of a reader
as in a chroot: ``..`` and absolute link targets never leave the filesystem's root, links are
followed at most ``MAX_LINKS`` times, and a path's last component is followed only when asked.
Deleted, virtual and NTFS metadata entries are not shown.
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

import pyfsxfs
import pytsk3

from .devices import Device, FileView, TskImage

MAX_LINKS = 40
MAX_LINK_TARGET = 4096
N = TypeVar("N")


class FilesError(Exception):
    """A path that is not there (``missing``), not a directory, or a loop of links."""

    def __init__(self, kind: str, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.kind, self.path, self.detail = kind, path, detail


@dataclass
class Entry:
    """One directory entry, as the API shows it."""

    name: str
    type: str  # file, directory, symlink, other
    size: int
    mode: int  # permission bits (and set-id, sticky)
    uid: int | None
    gid: int | None
    mtime: int | None  # nanoseconds since the epoch
    atime: int | None
    ctime: int | None
    crtime: int | None
    target: str | None = None  # a symlink's target, shown, never followed out of the filesystem

    def to_json(self, path: str) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "path": path, "type": self.type, "size": self.size}
        data["mode"] = f"{self.mode:04o}"
        data["uid"], data["gid"] = self.uid, self.gid
        for key in ("mtime", "atime", "ctime", "crtime"):
            value = getattr(self, key)
            data[key] = _iso(value) if value is not None else None
            data[f"{key}Ns"] = value
        if self.target is not None:
            data["target"] = self.target
        return data


def _iso(ns: int) -> str:
    moment = datetime.fromtimestamp(ns // 1_000_000_000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 1_000_000_000:09d}Z"


class Reader(Protocol, Generic[N]):
    def root(self) -> N: ...
    def child(self, directory: N, name: str) -> N | None: ...
    def children(self, directory: N) -> Iterator[tuple[str, N]]: ...
    def entry(self, name: str, node: N) -> Entry: ...
    def read(self, node: N, offset: int, length: int) -> bytes: ...


# -- The Sleuth Kit ------------------------------------------------------------------------------
_TSK_TYPES = {
    int(pytsk3.TSK_FS_META_TYPE_REG): "file",
    int(pytsk3.TSK_FS_META_TYPE_DIR): "directory",
    int(pytsk3.TSK_FS_META_TYPE_LNK): "symlink",
}
_VIRTUAL = (int(pytsk3.TSK_FS_META_TYPE_VIRT), int(pytsk3.TSK_FS_META_TYPE_VIRT_DIR))


def _ns(seconds: int, nanos: int) -> int | None:
    return int(seconds) * 1_000_000_000 + int(nanos) if seconds else None


class TskReader:
    """ext2/3/4, FAT and NTFS through The Sleuth Kit."""

    def __init__(self, device: Device) -> None:
        self.image = TskImage(device)
        self.fs = pytsk3.FS_Info(self.image)
        kind = int(self.fs.info.ftype)
        self.ntfs = bool(kind & int(pytsk3.TSK_FS_TYPE_NTFS_DETECT))
        self.fold_case = self.ntfs or bool(kind & (int(pytsk3.TSK_FS_TYPE_FAT_DETECT) | int(pytsk3.TSK_FS_TYPE_EXFAT)))

    def root(self) -> Any:
        return self.fs.open_meta(inode=int(self.fs.info.root_inum))

    def children(self, directory: Any) -> Iterator[tuple[str, Any]]:
        root = int(directory.info.meta.addr) == int(self.fs.info.root_inum)
        for item in directory.as_directory():
            name_info, meta = item.info.name, item.info.meta
            if meta is None or not int(name_info.flags) & int(pytsk3.TSK_FS_NAME_FLAG_ALLOC):
                continue  # deleted (its name survives in the directory), or no inode
            name = name_info.name.decode("utf-8", "surrogateescape")
            if name in (".", "..") or int(meta.type) in _VIRTUAL:
                continue
            if self.ntfs and root and name.startswith("$") and int(meta.addr) < 64:
                continue  # NTFS's own metadata files ($MFT, $Bitmap, ...)
            yield name, item

    def child(self, directory: Any, name: str) -> Any | None:
        folded = name.casefold()
        loose = None
        for found, node in self.children(directory):
            if found == name:
                return node
            if self.fold_case and loose is None and found.casefold() == folded:
                loose = node
        return loose

    def entry(self, name: str, node: Any) -> Entry:
        meta = node.info.meta
        kind = _TSK_TYPES.get(int(meta.type), "other")
        target = None
        if kind == "symlink":
            link = meta.link
            if link:
                target = bytes(link).decode("utf-8", "surrogateescape")
            else:  # a long link keeps its target in its data blocks
                target = self.read(node, 0, min(int(meta.size), MAX_LINK_TARGET)).decode("utf-8", "surrogateescape")
        mode = int(meta.mode) & 0o7777
        return Entry(
            name=name,
            type=kind,
            size=int(meta.size) if kind != "directory" else 0,
            mode=mode,
            uid=int(meta.uid),
            gid=int(meta.gid),
            mtime=_ns(meta.mtime, meta.mtime_nano),
            atime=_ns(meta.atime, meta.atime_nano),
            ctime=_ns(meta.ctime, meta.ctime_nano),
            crtime=_ns(meta.crtime, meta.crtime_nano),
            target=target,
        )

    def read(self, node: Any, offset: int, length: int) -> bytes:
        size = int(node.info.meta.size)
        length = max(0, min(length, size - offset))
        return bytes(node.read_random(offset, length)) if length else b""


# -- XFS (libyal) --------------------------------------------------------------------------------
class XfsReader:
    """XFS through libfsxfs."""

    def __init__(self, device: Device) -> None:
        self.volume = pyfsxfs.volume()
        self.volume.open_file_object(FileView(device))

    def root(self) -> Any:
        return self.volume.get_root_directory()

    def children(self, directory: Any) -> Iterator[tuple[str, Any]]:
        for node in directory.sub_file_entries:
            yield str(node.name), node

    def child(self, directory: Any, name: str) -> Any | None:
        return next((node for found, node in self.children(directory) if found == name), None)

    def entry(self, name: str, node: Any) -> Entry:
        mode = int(node.file_mode)
        kind = (
            "directory"
            if stat.S_ISDIR(mode)
            else "file"
            if stat.S_ISREG(mode)
            else "symlink"
            if stat.S_ISLNK(mode)
            else "other"
        )

        def ns(getter: str) -> int | None:
            value = getattr(node, getter)()
            return int(value) if value else None

        return Entry(
            name=name,
            type=kind,
            size=int(node.size) if kind != "directory" else 0,
            mode=stat.S_IMODE(mode),
            uid=int(node.owner_identifier),
            gid=int(node.group_identifier),
            mtime=ns("get_modification_time_as_integer"),
            atime=ns("get_access_time_as_integer"),
            ctime=ns("get_inode_change_time_as_integer"),
            crtime=ns("get_creation_time_as_integer"),
            target=str(node.symbolic_link_target) if kind == "symlink" else None,
        )

    def read(self, node: Any, offset: int, length: int) -> bytes:
        length = max(0, min(length, int(node.size) - offset))
        return bytes(node.read_buffer_at_offset(length, offset)) if length else b""


def open_reader(kind: str | None, device: Device) -> Reader[Any]:
    """The reader for a partition whose signature says ``kind``; FilesError when none reads it."""
    try:
        if kind in ("ext", "fat", "ntfs"):
            return TskReader(device)
        if kind == "xfs":
            return XfsReader(device)
    except OSError as exc:
        raise FilesError("unreadable", "/", f"the {kind} filesystem cannot be read: {exc}") from None
    raise FilesError("nofs", "/", "no filesystem blockvault can read")


# -- paths ---------------------------------------------------------------------------------------
def components(path: str) -> list[str]:
    """The names of an absolute path; FilesError for a relative one or one with ``.``/``..``."""
    if not path.startswith("/") or "\0" in path:
        raise FilesError("invalid", path, "a path is absolute")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise FilesError("invalid", path, "a path has no '.' or '..' component")
    return parts


class Filesystem:
    """Paths over a reader, resolved inside the filesystem (see the module docstring)."""

    def __init__(self, reader: Reader[Any]) -> None:
        self.reader = reader

    def _walk(self, path: str, follow_last: bool) -> tuple[str, Any]:
        """(the name, the node) at ``path``; FilesError when it is not there."""
        todo = components(path)
        stack: list[tuple[str, Any]] = [("/", self.reader.root())]
        hops = 0
        while todo:
            name = todo.pop(0)
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            if name == ".":
                continue
            directory = stack[-1][1]
            if self.reader.entry(stack[-1][0], directory).type != "directory":
                raise FilesError("missing", path, f"{stack[-1][0]} is not a directory")
            node = self.reader.child(directory, name)
            if node is None:
                raise FilesError("missing", path, "no such file or directory")
            entry = self.reader.entry(name, node)
            if entry.type == "symlink" and (todo or follow_last):
                hops += 1
                if hops > MAX_LINKS:
                    raise FilesError("loop", path, f"more than {MAX_LINKS} symbolic links")
                target = entry.target or ""
                if target.startswith("/"):
                    stack = stack[:1]  # absolute: from this filesystem's root, not the host's
                todo = [p for p in target.split("/") if p] + todo
                continue
            stack.append((name, node))
        return stack[-1]

    def stat(self, path: str) -> Entry:
        name, node = self._walk(path, follow_last=False)
        return self.reader.entry(posixpath.basename(path) or "/", node) if name != "/" else self._root_entry()

    def _root_entry(self) -> Entry:
        return self.reader.entry("/", self.reader.root())

    def listdir(
        self, path: str, start: int, limit: int, max_entries: int = 1_000_000
    ) -> tuple[list[tuple[str, Entry]], int]:
        """One page of the directory at ``path`` (links to directories followed), sorted by
        name, and how many entries it has."""
        _name, node = self._walk(path, follow_last=True)
        if self.reader.entry(_name, node).type != "directory":
            raise FilesError("notdir", path, "not a directory")
        names = []
        for item in self.reader.children(node):
            names.append(item)
            if len(names) > max_entries:
                raise FilesError("toobig", path, f"more than {max_entries} entries")
        names.sort(key=lambda item: item[0])
        page = names[start : start + limit]
        base = path.rstrip("/")
        return [(f"{base}/{name}", self.reader.entry(name, child)) for name, child in page], len(names)

    def open(self, path: str) -> tuple[Entry, Any]:
        """The regular file at ``path`` (links followed): its entry and node for :meth:`read`."""
        name, node = self._walk(path, follow_last=True)
        entry = self.reader.entry(name, node)
        if entry.type != "file":
            raise FilesError("notfile", path, f"a {entry.type}, not a regular file")
        return entry, node

    def read(self, node: Any, offset: int, length: int) -> bytes:
        return self.reader.read(node, offset, length)
