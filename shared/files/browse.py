"""The parent's side of file-level restore: export a backup on a private NBD socket, run the
sandboxed child (child.py) against it with a deadline, and turn its answers into entries or a
stream of a file's bytes, and its failures into blockvault errors."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import (
    BlockvaultError,
    FileNotInBackup,
    FilesTimeout,
    InvalidArgument,
    NoFilesystem,
)
from shared.repository.nbdserver import export_backup
from shared.repository.repo import Repository

log = logging.getLogger(__name__)
ROOT = str(Path(__file__).resolve().parents[2])  # where ``shared`` is imported from
MAX_PAGE = 10_000
MAX_PATH = 4096
PIPE_PIECE = 1024 * 1024
F_SETPIPE_SZ = 1031


@dataclass
class Limits:
    timeout: float = 30.0  # seconds for an answer (a read: between two pieces)
    memory: int = 1024 << 20  # the child's address space
    max_entries: int = 1_000_000
    cache_bytes: int = 64 << 20


def check_path(path: str | None) -> str:
    """An absolute path inside the filesystem, without ``.`` or ``..``: 400 otherwise."""
    path = path or "/"
    if not isinstance(path, str) or len(path) > MAX_PATH or "\0" in path or not path.startswith("/"):
        raise InvalidArgument(detail=f"path must be absolute, at most {MAX_PATH} characters, got {str(path)[:80]!r}")
    if any(part in (".", "..") for part in path.split("/")):
        raise InvalidArgument(detail=f"path {path[:200]!r} has a '.' or '..' component")
    return path if path == "/" else path.rstrip("/")


def check_page(start: int, limit: int) -> None:
    if start < 0 or not 1 <= limit <= MAX_PAGE:
        raise InvalidArgument(detail=f"start must be 0 or more and limit 1 to {MAX_PAGE}")


class Browser:
    """A backup opened for reading its files: its NBD export lives for the ``with`` block."""

    def __init__(self, repo: Repository, backup_id: str, what: str, limits: Limits | None = None) -> None:
        self.repo, self.backup_id, self.what = repo, backup_id, what
        self.limits = limits or Limits()
        self._stack = contextlib.ExitStack()
        self.socket_path = ""

    def __enter__(self) -> Browser:
        folder = tempfile.mkdtemp(prefix="blockvault-files-")
        self._stack.callback(shutil.rmtree, folder, True)
        self.socket_path = os.path.join(folder, "nbd.sock")
        try:
            self._stack.enter_context(
                export_backup(
                    self.repo, self.backup_id, self.socket_path, cache_bytes=self.limits.cache_bytes, lock_wait=10
                )
            )
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    # -- the child ----------------------------------------------------------------------------------
    def _spawn(self, request: dict[str, Any]) -> subprocess.Popen[bytes]:
        body = {
            **request,
            "socket": self.socket_path,
            "memory": self.limits.memory,
            "cpu": int(self.limits.timeout) + 5,
            "maxEntries": self.limits.max_entries,
        }
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": ROOT, "PYTHONDONTWRITEBYTECODE": "1"}
        child = subprocess.Popen(
            [
                sys.executable,
                "-I",
                "-c",
                "import sys; sys.path.insert(0, sys.argv[1]); from shared.files.child import main; sys.exit(main())",
                ROOT,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd="/",
            start_new_session=True,
        )
        assert child.stdin is not None and child.stdout is not None
        with contextlib.suppress(OSError):  # a larger pipe: fewer wake-ups per MiB streamed
            fcntl.fcntl(child.stdout.fileno(), F_SETPIPE_SZ, PIPE_PIECE)
        child.stdin.write(json.dumps(body).encode() + b"\n")
        child.stdin.close()
        return child

    def _line(self, child: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
        """The child's JSON line (or an error for its death or silence)."""
        assert child.stdout is not None
        buffer = b""
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([child.stdout], [], [], max(0.0, left))
            if not ready:
                self._kill(child)
                raise FilesTimeout(what=self.what, detail=f"no answer within {self.limits.timeout:g} s")
            piece = os.read(child.stdout.fileno(), 65536)
            if not piece:
                self._kill(child)
                raise self._died(child)
            buffer += piece
        line, _, rest = buffer.partition(b"\n")
        self._rest = rest
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            self._kill(child)
            raise self._error(answer)
        return answer

    def _died(self, child: subprocess.Popen[bytes]) -> BlockvaultError:
        code = child.wait()
        err = (child.stderr.read() if child.stderr else b"").decode(errors="replace").strip().splitlines()
        reason = f"signal {-code}" if code < 0 else f"status {code}"
        if code in (-signal.SIGXCPU, -signal.SIGKILL) or "MemoryError" in " ".join(err[-3:]):
            return FilesTimeout(what=self.what, detail=f"reading the filesystem exceeded its limits ({reason})")
        log.warning("files.child_died what=%s %s %s", self.what, reason, err[-1:] if err else "")
        return NoFilesystem(what=self.what, detail=f"the filesystem could not be read (the reader ended with {reason})")

    def _error(self, answer: dict[str, Any]) -> BlockvaultError:
        kind, detail = answer.get("kind"), str(answer.get("detail"))
        if kind == "missing":
            return FileNotInBackup(path=detail.rsplit(":", 1)[0], what=self.what)
        if kind in ("nofs", "unreadable"):
            return NoFilesystem(what=self.what, detail=detail)
        if kind == "nopartition":
            return InvalidArgument(detail=f"{self.what}: {detail}")
        if kind == "toobig":
            return InvalidArgument(detail=f"{self.what}: {detail}")
        return InvalidArgument(detail=f"{self.what}: {detail}")

    @staticmethod
    def _kill(child: subprocess.Popen[bytes]) -> None:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request that answers with one JSON line."""
        child = self._spawn(request)
        try:
            return self._line(child, time.monotonic() + self.limits.timeout)
        finally:
            self._kill(child)

    # -- the calls ----------------------------------------------------------------------------------
    def partitions(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.ask({"op": "partitions"})["partitions"]
        return found

    def listdir(self, path: str, partition: int | None, start: int = 0, limit: int = 1000) -> dict[str, Any]:
        check_page(start, limit)
        request = {"op": "list", "path": check_path(path), "partition": partition, "start": start, "limit": limit}
        return self.ask(request)

    def stat(self, path: str, partition: int | None) -> dict[str, Any]:
        return self.ask({"op": "stat", "path": check_path(path), "partition": partition})

    def open(self, path: str, partition: int | None) -> tuple[dict[str, Any], Iterator[bytes]]:
        """A regular file's entry, and its bytes as they come (a generator that owns the child:
        close it, or read it to the end). A reader that falls silent for the timeout, or a
        stream shorter than the file, raises mid-stream."""
        child = self._spawn({"op": "read", "path": check_path(path), "partition": partition})
        try:
            answer = self._line(child, time.monotonic() + self.limits.timeout)
        except BaseException:
            self._kill(child)
            raise
        entry = {**answer["entry"], "partition": answer["partition"], "filesystem": answer["filesystem"]}
        return entry, self._stream(child, int(entry["size"]))

    def _stream(self, child: subprocess.Popen[bytes], size: int) -> Iterator[bytes]:
        assert child.stdout is not None
        try:
            sent = 0
            if self._rest:
                sent += len(self._rest)
                yield self._rest
            while sent < size:
                ready, _, _ = select.select([child.stdout], [], [], self.limits.timeout)
                if not ready:
                    raise FilesTimeout(what=self.what, detail=f"the file stopped coming for {self.limits.timeout:g} s")
                piece = os.read(child.stdout.fileno(), min(PIPE_PIECE, size - sent))
                if not piece:
                    raise self._died(child)
                sent += len(piece)
                yield piece
        finally:
            self._kill(child)
