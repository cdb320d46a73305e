"""A read-only NBD server for a :class:`~shared.repository.blockview.BackupView` (or anything
with ``size``, ``read`` and ``extents``), on a UNIX socket.

It speaks the fixed newstyle handshake (``NBD_OPT_GO``/``INFO``/``EXPORT_NAME``/``LIST``/
``ABORT``, structured replies, ``NBD_OPT_SET``/``LIST_META_CONTEXT`` for
``base:allocation``) and in the transmission phase ``NBD_CMD_READ`` (holes sent as
``NBD_REPLY_TYPE_OFFSET_HOLE`` without data), ``NBD_CMD_BLOCK_STATUS`` (holes reported, so
``qemu-img convert`` and ``block-stream`` stay sparse), ``NBD_CMD_FLUSH`` (nothing to do) and
``NBD_CMD_DISC``; writes are refused with ``EPERM``. Every client gets a thread; requests of
one client are answered in order. The constants are the client's (nbdproto.py).

Why not nbdkit with a Python plugin: it would run this same view inside another daemon that
every host then needs installed and supervised, with the repository's keys handed over to it;
the read-only subset of the protocol is small, and qemu's own client tests it (tests/).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from typing import Protocol

from shared.errors import BlockvaultError, UsageError

from .blockview import DEFAULT_CACHE_BYTES, BackupView
from .locks import repository_lock
from .nbdproto import (
    BASE_ALLOCATION,
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    EINVAL,
    EIO,
    EPERM,
    EXTENT,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_BLOCK_SIZE_S,
    INFO_EXPORT,
    INFO_EXPORT_S,
    INFO_NAME,
    MAX_BLOCK_SIZE,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    OPTION,
    OPTION_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    REPLY_FLAG_DONE,
    REPLY_MAGIC,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_REPLY_MAGIC,
    TFLAG_CAN_MULTI_CONN,
    TFLAG_HAS_FLAGS,
    TFLAG_READ_ONLY,
    TFLAG_SEND_FLUSH,
    U16,
    U32,
    U64,
)
from .repo import Repository

log = logging.getLogger(__name__)

__all__ = ["BlockSource", "NBDServer", "export_backup"]

MAX_OPTION_DATA = 64 * 1024
MAX_CLIENTS = 64
MAX_EXTENT = 1 << 31  # one block-status extent's length (a u32 on the wire), kept aligned
META_CONTEXT_ID = 1
_STRUCTURED = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_OFFSET_HOLE = struct.Struct(">QI")
_ERROR = struct.Struct(">IH")


class BlockSource(Protocol):
    """What the server exports: ``size`` bytes, read by range, with holes known."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]: ...


class _Hangup(Exception):
    """The client went away or broke the protocol: drop the connection."""


class NBDServer:
    """Serve ``source`` read-only as export ``export_name`` on the UNIX socket ``socket_path``
    (created, mode ``mode``; removed on stop). ``with NBDServer(...) as server:`` serves in
    background threads for the block; :meth:`serve_forever` blocks instead."""

    def __init__(
        self,
        source: BlockSource,
        socket_path: str,
        *,
        export_name: str = "",
        mode: int = 0o600,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.source = source
        self.socket_path = socket_path
        self.export_name = export_name
        self.mode = mode
        self.max_clients = max_clients
        self.error: BaseException | None = None  # the last read error a client got (EIO)
        self._listener: socket.socket | None = None
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._accepter: threading.Thread | None = None
        self.connections = 0  # ever accepted

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> NBDServer:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                    os.unlink(self.socket_path)  # a socket left by a killed server (nothing else)
            listener.bind(self.socket_path)
            os.chmod(self.socket_path, self.mode)
            listener.listen(16)
        except OSError as exc:
            listener.close()
            raise UsageError(detail=f"cannot serve NBD on {self.socket_path}: {exc.strerror or exc}") from None
        self._listener = listener
        self._accepter = threading.Thread(target=self._accept, name="nbd-accept", daemon=True)
        self._accepter.start()
        log.info("nbd.serving socket=%s size=%d", self.socket_path, self.source.size)
        return self

    def serve_forever(self) -> None:
        if self._listener is None:
            self.start()
        self._stopped.wait()

    def stop(self) -> None:
        """Stop listening, hang up on every client, remove the socket."""
        self._stopped.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        with self._lock:
            clients = list(self._clients)
        for sock in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._accepter is not None and self._accepter is not threading.current_thread():
            self._accepter.join(5)
        log.info("nbd.stopped socket=%s", self.socket_path)

    def __enter__(self) -> NBDServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no client is connected; whether none is."""
        deadline = time.monotonic() + timeout
        while self.client_count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.client_count == 0

    def _accept(self) -> None:
        while not self._stopped.is_set():
            listener = self._listener
            if listener is None:
                return
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                if len(self._clients) >= self.max_clients:
                    log.warning("nbd.too_many_clients socket=%s", self.socket_path)
                    sock.close()
                    continue
                self._clients.add(sock)
                self.connections += 1
            threading.Thread(target=self._serve, args=(sock,), name="nbd-client", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            _Connection(self, sock).run()
        except _Hangup as exc:
            log.debug("nbd.client_gone socket=%s reason=%s", self.socket_path, exc)
        except OSError as exc:
            log.debug("nbd.client_error socket=%s error=%s", self.socket_path, exc)
        finally:
            with self._lock:
                self._clients.discard(sock)
            sock.close()


class _Connection:
    """One client: the handshake, then requests until it disconnects."""

    def __init__(self, server: NBDServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.source = server.source
        self.structured = False
        self.no_zeroes = False
        self.allocation = False  # base:allocation selected

    # -- I/O ---------------------------------------------------------------------------------------
    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        while view:
            got = self.sock.recv_into(view)
            if got == 0:
                raise _Hangup("closed")
            view = view[got:]
        return bytes(buf)

    def send(self, *parts: bytes) -> None:
        if len(parts) > 1 and sum(map(len, parts)) < 65536:
            self.sock.sendall(b"".join(parts))
            return
        for part in parts:
            self.sock.sendall(part)

    # -- handshake ---------------------------------------------------------------------------------
    def run(self) -> None:
        self.send(GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (flags,) = U32.unpack(self.recv(4))
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise _Hangup(f"unknown client flags {flags:#x}")
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        if self.options():
            self.transmission()

    @property
    def tflags(self) -> int:
        return TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN

    def reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self.send(OPTION_REPLY.pack(REPLY_MAGIC, option, kind, len(data)), data)

    def options(self) -> bool:
        """The option haggling; True when the client moves to transmission."""
        while True:
            magic, option, length = OPTION.unpack(self.recv(OPTION.size))
            if magic != IHAVEOPT:
                raise _Hangup(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                raise _Hangup(f"option {option} with {length} bytes")
            data = self.recv(length)
            if option == OPT_EXPORT_NAME:
                if data.decode("utf-8", "replace") != self.server.export_name:
                    raise _Hangup("unknown export")
                tail = b"" if self.no_zeroes else bytes(124)
                self.send(U64.pack(self.source.size), U16.pack(self.tflags), tail)
                return True
            if option == OPT_ABORT:
                with contextlib.suppress(OSError):
                    self.reply(option, REP_ACK)
                return False
            if option == OPT_LIST:
                name = self.server.export_name.encode()
                self.reply(option, REP_SERVER, U32.pack(len(name)) + name)
                self.reply(option, REP_ACK)
            elif option == OPT_STRUCTURED_REPLY:
                if data:
                    self.reply(option, REP_ERR_INVALID)
                    continue
                self.structured = True
                self.reply(option, REP_ACK)
            elif option in (OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT):
                self.meta_context(option, data)
            elif option in (OPT_GO, OPT_INFO):
                if self.info(option, data) and option == OPT_GO:
                    return True
            else:
                self.reply(option, REP_ERR_UNSUP)

    def _name_and_rest(self, data: bytes) -> tuple[str, bytes] | None:
        if len(data) < 4:
            return None
        (length,) = U32.unpack_from(data)
        if len(data) < 4 + length:
            return None
        return data[4 : 4 + length].decode("utf-8", "replace"), data[4 + length :]

    def meta_context(self, option: int, data: bytes) -> None:
        parsed = self._name_and_rest(data)
        if parsed is None or len(parsed[1]) < 4 or (option == OPT_SET_META_CONTEXT and not self.structured):
            self.reply(option, REP_ERR_INVALID)
            return
        name, rest = parsed
        if name != self.server.export_name:
            self.reply(option, REP_ERR_UNKNOWN)
            return
        (count,) = U32.unpack_from(rest)
        queries: list[str] = []
        pos = 4
        for _ in range(count):
            if len(rest) < pos + 4:
                self.reply(option, REP_ERR_INVALID)
                return
            (n,) = U32.unpack_from(rest, pos)
            queries.append(rest[pos + 4 : pos + 4 + n].decode("utf-8", "replace"))
            pos += 4 + n
        wanted = any(q == BASE_ALLOCATION or (option == OPT_LIST_META_CONTEXT and q == "base:") for q in queries)
        if option == OPT_LIST_META_CONTEXT and not queries:
            wanted = True
        if option == OPT_SET_META_CONTEXT:
            self.allocation = wanted
        if wanted:
            context = BASE_ALLOCATION.encode()
            self.reply(option, REP_META_CONTEXT, U32.pack(META_CONTEXT_ID) + context)
        self.reply(option, REP_ACK)

    def info(self, option: int, data: bytes) -> bool:
        parsed = self._name_and_rest(data)
        if parsed is None or len(parsed[1]) < 2:
            self.reply(option, REP_ERR_INVALID)
            return False
        name, rest = parsed
        if name != self.server.export_name:
            self.reply(option, REP_ERR_UNKNOWN, f"no export {name!r}".encode())
            return False
        (count,) = U16.unpack_from(rest)
        if len(rest) < 2 + 2 * count:
            self.reply(option, REP_ERR_INVALID)
            return False
        requested = {U16.unpack_from(rest, 2 + 2 * i)[0] for i in range(count)}
        self.reply(option, REP_INFO, U16.pack(INFO_EXPORT) + INFO_EXPORT_S.pack(self.source.size, self.tflags))
        if INFO_NAME in requested:
            self.reply(option, REP_INFO, U16.pack(INFO_NAME) + self.server.export_name.encode())
        self.reply(option, REP_INFO, U16.pack(INFO_BLOCK_SIZE) + INFO_BLOCK_SIZE_S.pack(1, 4096, MAX_BLOCK_SIZE))
        self.reply(option, REP_ACK)
        return True

    # -- transmission ------------------------------------------------------------------------------
    def transmission(self) -> None:
        while True:
            magic, flags, kind, cookie, offset, length = REQUEST.unpack(self.recv(REQUEST.size))
            if magic != REQUEST_MAGIC:
                raise _Hangup(f"bad request magic {magic:#x}")
            if kind == CMD_DISC:
                return
            if kind == CMD_READ:
                self.read(cookie, offset, length)
            elif kind == CMD_BLOCK_STATUS:
                self.block_status(cookie, flags, offset, length)
            elif kind == CMD_FLUSH:
                self.done(cookie)
            elif kind == 1:  # NBD_CMD_WRITE carries its payload: read it off before refusing
                if length > MAX_BLOCK_SIZE:
                    raise _Hangup(f"write of {length} bytes")
                self.recv(length)
                self.error(cookie, EPERM, "the export is read-only")
            else:  # trim, write-zeroes, cache, resize...: a read-only export does none of them
                self.error(cookie, EPERM if kind in (4, 5, 6) else EINVAL, f"command {kind} is not supported")

    def _in_range(self, offset: int, length: int) -> bool:
        return offset >= 0 and offset + length <= self.source.size

    def done(self, cookie: int) -> None:
        if self.structured:
            self.send(_STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, 0, cookie, 0))
        else:
            self.send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))

    def error(self, cookie: int, code: int, message: str) -> None:
        if self.structured:
            text = message.encode()[:4096]
            body = _ERROR.pack(code, len(text)) + text
            head = _STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len(body))
            self.send(head, body)
        else:
            self.send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, code, cookie))

    def read(self, cookie: int, offset: int, length: int) -> None:
        if length > MAX_BLOCK_SIZE or not self._in_range(offset, length):
            self.error(cookie, EINVAL, f"read {offset}+{length} is outside the export or too large")
            return
        try:
            runs = self.source.extents(offset, length) if self.structured else [(offset, length, False)]
            pieces = [(start, size, None if hole else self.source.read(start, size)) for start, size, hole in runs]
        except (BlockvaultError, OSError) as exc:
            self.server.error = exc
            log.error(
                "nbd.read_failed socket=%s offset=%d length=%d error=%s", self.server.socket_path, offset, length, exc
            )
            self.error(cookie, EIO, str(exc)[:500])
            return
        if not self.structured:
            data = pieces[0][2]
            assert data is not None
            self.send(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data)
            return
        for number, (start, size, data) in enumerate(pieces):
            flags = REPLY_FLAG_DONE if number == len(pieces) - 1 else 0
            if data is None:
                body = _OFFSET_HOLE.pack(start, size)
                self.send(
                    _STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_HOLE, cookie, len(body)), body
                )
            else:
                head = _STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + size)
                self.send(head + U64.pack(start), data)
        if not pieces:
            self.done(cookie)

    def block_status(self, cookie: int, flags: int, offset: int, length: int) -> None:
        if not (self.structured and self.allocation):
            self.error(cookie, EINVAL, "no meta context was negotiated")
            return
        if length == 0 or not self._in_range(offset, length):
            self.error(cookie, EINVAL, f"block status {offset}+{length} is outside the export")
            return
        extents: list[bytes] = []
        for start, size, hole in self.source.extents(offset, length):
            state = STATE_HOLE | STATE_ZERO if hole else 0
            pos, end = start, start + size
            while pos < end:
                step = min(end - pos, MAX_EXTENT)
                extents.append(EXTENT.pack(step, state))
                pos += step
            if flags & CMD_FLAG_REQ_ONE:
                break
        if flags & CMD_FLAG_REQ_ONE:
            extents = extents[:1]
        body = U32.pack(META_CONTEXT_ID) + b"".join(extents)
        head = _STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len(body))
        self.send(head, body)


@contextlib.contextmanager
def export_backup(
    repo: Repository,
    backup_id: str,
    socket_path: str,
    *,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    mode: int = 0o600,
    lock_wait: float = 60.0,
) -> Iterator[tuple[NBDServer, BackupView]]:
    """Serve backup ``backup_id`` (an id or a prefix of one) of ``repo`` on ``socket_path`` for
    a ``with`` block, under a shared repository lock (garbage collection waits, so no chunk the
    export may still read is deleted)."""
    manifest_id = repo.resolve(backup_id)
    with (
        repository_lock(repo.backend, "shared", f"export over NBD at {socket_path}", wait=lock_wait),
        BackupView(repo, manifest_id, cache_bytes=cache_bytes) as view,
        NBDServer(view, socket_path, mode=mode) as server,
    ):
        yield server, view
