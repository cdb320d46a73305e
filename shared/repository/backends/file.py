"""The ``file`` backend: a local or mounted folder.

Objects are files below the root; ``put`` writes ``tmp/<random>``, fdatasyncs it and renames
it into place (borgstore ``posixfs``), so a crash never leaves a half object under a real key;
``flush`` fsyncs the folders that gained names, once per folder instead of once per object.
``tmp/`` is listed like any prefix so that garbage collection can remove what a killed
writer left there.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from shared.errors import BackendError, BackendUnavailable, ObjectNotFound

from .base import Backend, Buffer, ObjectInfo

_TRANSIENT = {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE}


class FileBackend(Backend):
    """Objects as files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.location = str(self.root)
        self._made: set[Path] = set()
        self._unsynced: set[Path] = set()
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise BackendError(location=self.location, detail=f"invalid key {key!r}")
        return self.root / key

    def _error(self, exc: OSError, key: str) -> BackendError:
        if exc.errno == errno.ENOENT:
            return ObjectNotFound(location=self.location, key=key)
        detail = f"{key}: {exc.strerror or exc}"
        if exc.errno in _TRANSIENT:
            return BackendUnavailable(location=self.location, detail=detail)
        return BackendError(location=self.location, detail=detail)

    def _mkdir(self, folder: Path) -> None:
        if folder not in self._made:
            folder.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)

    def put(self, key: str, data: Buffer, *, overwrite: bool = True) -> None:
        path = self._path(key)
        if not overwrite and path.exists():
            return
        tmp_dir = self.root / "tmp"
        tmp = tmp_dir / uuid.uuid4().hex
        try:
            self._mkdir(tmp_dir)
            self._mkdir(path.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fdatasync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            with self._lock:
                self._unsynced.add(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOENT:  # the root itself vanished
                raise BackendError(location=self.location, detail=f"{key}: folder missing") from None
            raise self._error(exc, key) from None

    def flush(self) -> None:
        with self._lock:
            folders, self._unsynced = self._unsynced, set()
        try:
            for folder in folders:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            with self._lock:
                self._unsynced |= folders
            raise self._error(exc, "(flush)") from None

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as handle:
                if offset:
                    handle.seek(offset)
                return handle.read() if length is None else handle.read(length)
        except OSError as exc:
            raise self._error(exc, key) from None

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except OSError as exc:
            raise self._error(exc, key) from None
        return ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise self._error(exc, key) from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self.root / prefix if prefix.endswith("/") else (self.root / prefix).parent
        if not base.is_dir():
            return
        root_len = len(str(self.root)) + 1
        for folder, _dirs, files in os.walk(base):
            for name in files:
                full = os.path.join(folder, name)
                key = full[root_len:]
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime)

    def missing(self, keys: Iterable[str]) -> set[str]:
        return {key for key in keys if not os.path.exists(self._path(key))}
