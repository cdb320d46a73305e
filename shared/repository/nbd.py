"""A small, dependency-free NBD client over a UNIX socket.

It speaks the fixed newstyle handshake of the NBD protocol
(https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md): structured replies,
meta contexts (``base:allocation``, ``qemu:dirty-bitmap:NAME``, ...) and ``NBD_OPT_GO``, then
READ, WRITE, WRITE_ZEROES, FLUSH, BLOCK_STATUS and DISC in the transmission phase.

Requests are sent one at a time (no pipelining) and a client is not thread safe: open one
connection per thread. Reads go straight from the socket into the caller's buffer with
``recv_into`` so that large reads cost no Python-level copies beyond the one ``read`` makes to
return ``bytes``.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import socket
from collections.abc import Sequence
from types import TracebackType

from .nbdproto import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLUSH,
    CMD_NAMES,
    CMD_READ,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    DIRTY,
    ERROR_HEAD,
    EXPORT_NAME_REPLY,
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
    MAX_BLOCK_SIZE,
    MAX_STATUS_REQUEST,
    NBD_ERRNO,
    NBDMAGIC,
    OLDSTYLE_MAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_NAMES,
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    OPTION,
    OPTION_REPLY,
    REP_ACK,
    REP_ERR_NAMES,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_FLAG_ERROR,
    REP_INFO,
    REP_META_CONTEXT,
    REPLY_FLAG_DONE,
    REPLY_MAGIC,
    REPLY_PREFIX,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR_BIT,
    REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_REPLY_MAGIC,
    TFLAG_HAS_FLAGS,
    TFLAG_READ_ONLY,
    TFLAG_SEND_FLUSH,
    TFLAG_SEND_WRITE_ZEROES,
    U16,
    U32,
    U64,
    U64_U32,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DIRTY",
    "STATE_HOLE",
    "STATE_ZERO",
    "NBDClient",
    "NBDError",
    "probe_unix",
]

_MAX_ZEROES_REQUEST = 1 << 30  # WRITE_ZEROES carries no payload, but keep requests sane
_MAX_OPTION_REPLY = 16 * 1024 * 1024
_MAX_CHUNK_PAYLOAD = MAX_BLOCK_SIZE + 4096
_ZERO_FILL_CHUNK = 4 * 1024 * 1024


class NBDError(Exception):
    """An NBD protocol or server error; the message says which operation failed and why.

    ``code`` is the NBD error number the server sent (``errno`` values such as ``EIO`` = 5),
    or ``None`` when the failure was not a server-reported error.
    """

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def _errno_text(code: int) -> str:
    local = NBD_ERRNO.get(code)
    if local is None:
        return f"error {code}"
    return f"{errno.errorcode.get(local, str(local))} ({os.strerror(local)})"


def _decode(data: bytes | memoryview) -> str:
    return bytes(data).decode("utf-8", errors="replace")


class NBDClient:
    """One NBD connection to one export, negotiated and ready for transmission.

    Attributes set by the handshake:

    - ``size``: the export size in bytes;
    - ``read_only``: the server exports it read-only;
    - ``transmission_flags``: the raw NBD transmission flags;
    - ``structured_replies``: structured replies were negotiated;
    - ``meta_contexts``: the meta contexts the server granted, name -> context id (a name
      that was asked for but is missing here was refused by the server);
    - ``min_block_size``, ``preferred_block_size``, ``max_block_size``: the server's block
      size constraints (``max_block_size`` is capped at 32 MiB).

    Not thread safe; use one client per thread.
    """

    size: int
    read_only: bool

    def __init__(self, sock: socket.socket, export_name: str, meta_contexts: Sequence[str]) -> None:
        """Run the handshake on an already connected socket. Prefer :meth:`connect_unix`."""
        self._sock: socket.socket | None = sock
        self._cookies = itertools.count(1)
        self._header = bytearray(REPLY_PREFIX.size)
        self._header_view = memoryview(self._header)
        self.export_name = export_name
        self.size = 0
        self.read_only = True
        self.transmission_flags = 0
        self.structured_replies = False
        self.meta_contexts: dict[str, int] = {}
        self.min_block_size = 1
        self.preferred_block_size = 4096
        self.max_block_size = MAX_BLOCK_SIZE
        self._handshake(export_name, meta_contexts)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def connect_unix(cls, path: str, export_name: str = "", meta_contexts: Sequence[str] = ()) -> NBDClient:
        """Connect to the NBD server listening on the UNIX socket ``path``, negotiate the export
        ``export_name`` and the given meta contexts, and return the ready client.

        Raises :class:`NBDError` when the socket cannot be reached or the server refuses the
        export or the handshake.
        """
        if isinstance(meta_contexts, str):
            raise TypeError("meta_contexts must be a sequence of names, not a string")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise NBDError(f"cannot connect to NBD socket {path}: {exc}") from exc
        try:
            return cls(sock, export_name, meta_contexts)
        except BaseException:
            sock.close()
            raise

    # -- context manager / lifetime -------------------------------------------------------------

    def __enter__(self) -> NBDClient:
        """Return the client itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the connection (see :meth:`close`)."""
        self.close()

    @property
    def closed(self) -> bool:
        """True once the connection is closed (by :meth:`close` or after a protocol error)."""
        return self._sock is None

    def close(self) -> None:
        """Send ``NBD_CMD_DISC`` and close the socket. Safe to call more than once."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        try:
            sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, next(self._cookies), 0, 0))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            sock.close()

    # -- low-level I/O --------------------------------------------------------------------------

    def _live_sock(self) -> socket.socket:
        if self._sock is None:
            raise NBDError("NBD connection is closed")
        return self._sock

    def _abort(self, message: str, cause: BaseException | None = None) -> NBDError:
        """Drop the connection (its stream state is unknown now) and build the error."""
        sock = self._sock
        self._sock = None
        if sock is not None:
            sock.close()
        err = NBDError(message)
        if cause is not None:
            err.__cause__ = cause
        return err

    def _recv_into(self, view: memoryview) -> None:
        sock = self._live_sock()
        try:
            while len(view):
                n = sock.recv_into(view, len(view), socket.MSG_WAITALL)
                if n == 0:
                    raise self._abort("NBD server closed the connection unexpectedly")
                view = view[n:]
        except OSError as exc:
            raise self._abort(f"NBD connection failed while receiving: {exc}", exc) from exc
        except BaseException:  # e.g. KeyboardInterrupt part way through a reply
            self._abort("interrupted")
            raise

    def _recv(self, n: int) -> bytes:
        return self._recv_bytes(n) if n else b""

    def _skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 65536)))
        while n > 0:
            k = min(n, len(scratch))
            self._recv_into(scratch[:k])
            n -= k

    def _send(self, *parts: bytes | bytearray | memoryview) -> None:
        sock = self._live_sock()
        try:
            if len(parts) > 1 and sum(len(p) for p in parts) <= 65536:
                sock.sendall(b"".join(parts))
            else:
                for part in parts:
                    sock.sendall(part)
        except OSError as exc:
            raise self._abort(f"NBD connection failed while sending: {exc}", exc) from exc
        except BaseException:  # a request half sent leaves the stream unusable
            self._abort("interrupted")
            raise

    # -- handshake ------------------------------------------------------------------------------

    def _handshake(self, export_name: str, meta_contexts: Sequence[str]) -> None:
        magic, opt_magic, hflags = GREETING.unpack(self._recv(GREETING.size))
        if magic != NBDMAGIC:
            raise self._abort(f"not an NBD server (bad greeting magic {magic:#x})")
        if opt_magic == OLDSTYLE_MAGIC:
            raise self._abort("NBD server speaks the oldstyle protocol, which is not supported")
        if opt_magic != IHAVEOPT:
            raise self._abort(f"unexpected NBD handshake magic {opt_magic:#x}")
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise self._abort("NBD server does not support the fixed newstyle handshake")
        self._no_zeroes = bool(hflags & FLAG_NO_ZEROES)
        cflags = FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if self._no_zeroes else 0)
        self._send(U32.pack(cflags))

        self.structured_replies = self._negotiate_structured_replies()
        name = export_name.encode()
        if meta_contexts:
            if self.structured_replies:
                self._negotiate_meta_contexts(name, meta_contexts)
            else:
                logger.debug("NBD server lacks structured replies; meta contexts not negotiated")
        self._negotiate_go(name)
        logger.debug(
            "NBD export %r: size=%d flags=%#x structured=%s contexts=%s max_block=%d",
            export_name,
            self.size,
            self.transmission_flags,
            self.structured_replies,
            self.meta_contexts,
            self.max_block_size,
        )

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._send(OPTION.pack(IHAVEOPT, option, len(data)), data)

    def _recv_option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, reply_type, length = OPTION_REPLY.unpack(self._recv(OPTION_REPLY.size))
        if magic != REPLY_MAGIC:
            raise self._abort(f"bad NBD option reply magic {magic:#x}")
        if opt != option:
            raise self._abort(f"NBD option reply for option {opt}, expected {OPT_NAMES[option]}")
        if length > _MAX_OPTION_REPLY:
            raise self._abort(f"NBD option reply of {length} bytes is too large")
        return reply_type, self._recv(length)

    def _option_error(self, option: int, reply_type: int, payload: bytes, what: str) -> NBDError:
        name = REP_ERR_NAMES.get(reply_type, f"error {reply_type & ~REP_FLAG_ERROR}")
        detail = _decode(payload).strip()
        msg = f"{what}: {OPT_NAMES[option]} failed with {name}"
        if detail:
            msg += f": {detail}"
        return NBDError(msg, code=reply_type)

    def _negotiate_structured_replies(self) -> bool:
        self._send_option(OPT_STRUCTURED_REPLY)
        reply_type, payload = self._recv_option_reply(OPT_STRUCTURED_REPLY)
        if reply_type == REP_ACK:
            return True
        if reply_type == REP_ERR_UNSUP:
            return False
        if reply_type & REP_FLAG_ERROR:
            raise self._option_error(OPT_STRUCTURED_REPLY, reply_type, payload, "NBD handshake")
        raise self._abort(f"unexpected reply {reply_type} to NBD_OPT_STRUCTURED_REPLY")

    def _negotiate_meta_contexts(self, name: bytes, contexts: Sequence[str]) -> None:
        queries = [c.encode() for c in contexts]
        data = b"".join([U32.pack(len(name)), name, U32.pack(len(queries))] + [U32.pack(len(q)) + q for q in queries])
        self._send_option(OPT_SET_META_CONTEXT, data)
        granted: dict[str, int] = {}
        while True:
            reply_type, payload = self._recv_option_reply(OPT_SET_META_CONTEXT)
            if reply_type == REP_META_CONTEXT:
                if len(payload) < 4:
                    raise self._abort("short NBD_REP_META_CONTEXT reply")
                (context_id,) = U32.unpack_from(payload)
                granted[_decode(payload[4:])] = context_id
            elif reply_type == REP_ACK:
                break
            elif reply_type == REP_ERR_UNSUP:
                logger.debug("NBD server does not support meta contexts")
                granted = {}
                break
            elif reply_type & REP_FLAG_ERROR:
                raise self._option_error(OPT_SET_META_CONTEXT, reply_type, payload, f"NBD export {_decode(name)!r}")
            else:
                raise self._abort(f"unexpected reply {reply_type} to NBD_OPT_SET_META_CONTEXT")
        missing = [c for c in contexts if c not in granted]
        if missing:
            logger.debug("NBD server did not grant meta contexts %s", missing)
        self.meta_contexts = granted

    def _negotiate_go(self, name: bytes) -> None:
        data = U32.pack(len(name)) + name + U16.pack(1) + U16.pack(INFO_BLOCK_SIZE)
        self._send_option(OPT_GO, data)
        got_export = False
        while True:
            reply_type, payload = self._recv_option_reply(OPT_GO)
            if reply_type == REP_INFO:
                if len(payload) < 2:
                    raise self._abort("short NBD_REP_INFO reply")
                (info,) = U16.unpack_from(payload)
                if info == INFO_EXPORT and len(payload) >= 2 + INFO_EXPORT_S.size:
                    self.size, tflags = INFO_EXPORT_S.unpack_from(payload, 2)
                    self._set_transmission_flags(tflags)
                    got_export = True
                elif info == INFO_BLOCK_SIZE and len(payload) >= 2 + INFO_BLOCK_SIZE_S.size:
                    lo, pref, hi = INFO_BLOCK_SIZE_S.unpack_from(payload, 2)
                    self.min_block_size = max(1, lo)
                    self.preferred_block_size = max(1, pref)
                    self.max_block_size = max(1, min(hi, MAX_BLOCK_SIZE))
            elif reply_type == REP_ACK:
                break
            elif reply_type == REP_ERR_UNSUP:
                self._export_name_fallback(name)
                return
            elif reply_type & REP_FLAG_ERROR:
                what = f"NBD export {_decode(name)!r}"
                if reply_type == REP_ERR_UNKNOWN:
                    what += " does not exist"
                raise self._option_error(OPT_GO, reply_type, payload, what)
            else:
                raise self._abort(f"unexpected reply {reply_type} to NBD_OPT_GO")
        if not got_export:
            raise self._abort("NBD server finished NBD_OPT_GO without NBD_INFO_EXPORT")

    def _export_name_fallback(self, name: bytes) -> None:
        """Old servers without NBD_OPT_GO: NBD_OPT_EXPORT_NAME (no error reply possible)."""
        self._send_option(OPT_EXPORT_NAME, name)
        try:
            head = self._recv(EXPORT_NAME_REPLY.size)
        except NBDError as exc:
            raise NBDError(f"NBD export {_decode(name)!r} was refused by the server ({exc})") from exc
        self.size, tflags = EXPORT_NAME_REPLY.unpack(head)
        if not self._no_zeroes:
            self._skip(124)
        self._set_transmission_flags(tflags)

    def _set_transmission_flags(self, tflags: int) -> None:
        self.transmission_flags = tflags
        self.read_only = bool(tflags & TFLAG_READ_ONLY)

    # -- capabilities ----------------------------------------------------------------------------

    @property
    def can_flush(self) -> bool:
        """The server accepts NBD_CMD_FLUSH."""
        return bool(self.transmission_flags & TFLAG_HAS_FLAGS and self.transmission_flags & TFLAG_SEND_FLUSH)

    @property
    def can_write_zeroes(self) -> bool:
        """The server accepts NBD_CMD_WRITE_ZEROES."""
        return bool(self.transmission_flags & TFLAG_HAS_FLAGS and self.transmission_flags & TFLAG_SEND_WRITE_ZEROES)

    # -- transmission helpers ---------------------------------------------------------------------

    def _request(self, cmd: int, offset: int, length: int, payload: bytes | memoryview | None = None) -> int:
        cookie = next(self._cookies)
        header = REQUEST.pack(REQUEST_MAGIC, 0, cmd, cookie, offset, length)
        if payload is None:
            self._send(header)
        else:
            self._send(header, payload)
        return cookie

    def _recv_reply_prefix(self, cookie: int) -> tuple[int, int, int]:
        """Read the first 16 bytes of a reply. Returns (magic, word1, word2): for a simple reply
        word1 is the error; for a structured one word1 is flags and word2 the chunk type."""
        self._recv_into(self._header_view)
        magic, a, b, got_cookie = REPLY_PREFIX.unpack(self._header)
        if magic == SIMPLE_REPLY_MAGIC:
            error = (a << 16) | b
            if got_cookie != cookie:
                raise self._abort(f"NBD reply cookie {got_cookie} does not match request {cookie}")
            return magic, error, 0
        if magic == STRUCTURED_REPLY_MAGIC:
            if not self.structured_replies:
                raise self._abort("NBD server sent a structured reply that was not negotiated")
            if got_cookie != cookie:
                raise self._abort(f"NBD reply cookie {got_cookie} does not match request {cookie}")
            return magic, a, b
        raise self._abort(f"bad NBD reply magic {magic:#x}")

    def _recv_chunk_length(self) -> int:
        length = int(U32.unpack(self._recv(4))[0])
        if length > _MAX_CHUNK_PAYLOAD:
            raise self._abort(f"NBD reply chunk of {length} bytes is too large")
        return length

    def _parse_error_chunk(self, chunk_type: int, payload: bytes, cmd: int, offset: int, length: int) -> NBDError:
        if len(payload) < ERROR_HEAD.size:
            raise self._abort("short NBD error chunk")
        code, msg_len = ERROR_HEAD.unpack_from(payload)
        message = _decode(payload[ERROR_HEAD.size : ERROR_HEAD.size + msg_len]).strip()
        where = f"offset {offset} length {length}"
        if chunk_type == REPLY_TYPE_ERROR_OFFSET and len(payload) >= ERROR_HEAD.size + msg_len + 8:
            (bad,) = U64.unpack_from(payload, ERROR_HEAD.size + msg_len)
            where += f" (failed at offset {bad})"
        text = f"{CMD_NAMES[cmd]} {where} failed: {_errno_text(code)}"
        if message:
            text += f": {message}"
        return NBDError(text, code=code)

    def _server_error(self, cmd: int, offset: int, length: int, code: int) -> NBDError:
        return NBDError(f"{CMD_NAMES[cmd]} offset {offset} length {length} failed: {_errno_text(code)}", code=code)

    def _simple_command(self, cmd: int, offset: int, length: int, payload: bytes | memoryview | None = None) -> None:
        """A command whose successful reply carries no data (WRITE, WRITE_ZEROES, FLUSH)."""
        cookie = self._request(cmd, offset, length, payload)
        error: NBDError | None = None
        while True:
            magic, a, b = self._recv_reply_prefix(cookie)
            if magic == SIMPLE_REPLY_MAGIC:
                if a:
                    raise self._server_error(cmd, offset, length, a)
                return
            chunk_len = self._recv_chunk_length()
            if b & REPLY_TYPE_ERROR_BIT:
                err = self._parse_error_chunk(b, self._recv(chunk_len), cmd, offset, length)
                error = error or err
            elif b == REPLY_TYPE_NONE:
                self._skip(chunk_len)
            else:
                raise self._abort(f"unexpected NBD reply chunk type {b} to {CMD_NAMES[cmd]}")
            if a & REPLY_FLAG_DONE:
                break
        if error is not None:
            raise error

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NBDError(f"range offset {offset} length {length} is outside the export of {self.size} bytes")

    def _check_writable(self) -> None:
        if self.read_only:
            raise NBDError(f"NBD export {self.export_name!r} is read-only")

    # -- reads -------------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Return ``length`` bytes of the export starting at ``offset``.

        A read that fits in one request and comes back as a single data (or hole) chunk is
        received straight into the returned ``bytes``; anything else is assembled in a buffer.
        """
        self._check_range(offset, length)
        if length == 0:
            return b""
        if length <= self.max_block_size:
            data = self._read_chunk(offset, length, None)
            assert data is not None
            return data
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` (a writable, contiguous byte view) with ``len(buf)`` bytes from ``offset``.

        Requests larger than the server's maximum block size are split. Holes reported by the
        server are filled with zeros.
        """
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        if view.readonly:
            raise TypeError("read_into needs a writable buffer")
        total = len(view)
        self._check_range(offset, total)
        step = self.max_block_size
        pos = 0
        while pos < total:
            n = min(step, total - pos)
            self._read_chunk(offset + pos, n, view[pos : pos + n])
            pos += n

    def _recv_bytes(self, n: int) -> bytes:
        """Receive exactly ``n`` bytes into a new ``bytes`` object without an extra copy in the
        common case (one ``recv`` with MSG_WAITALL)."""
        sock = self._live_sock()
        try:
            data = sock.recv(n, socket.MSG_WAITALL)
        except OSError as exc:
            raise self._abort(f"NBD connection failed while receiving: {exc}", exc) from exc
        except BaseException:
            self._abort("interrupted")
            raise
        if len(data) == n:
            return data
        if not data:
            raise self._abort("NBD server closed the connection unexpectedly")
        buf = bytearray(n)  # interrupted part way: finish the slow way
        buf[: len(data)] = data
        self._recv_into(memoryview(buf)[len(data) :])
        return bytes(buf)

    def _read_chunk(self, offset: int, length: int, view: memoryview | None) -> bytes | None:
        """One NBD_CMD_READ of ``length`` bytes (at most the maximum block size). With a
        ``view`` (of that length) the data lands there and None is returned; without one the
        data is returned as ``bytes``."""
        cookie = self._request(CMD_READ, offset, length)
        covered = 0
        whole: bytes | None = None  # the fast path: one chunk described the whole request
        buf: bytearray | None = None
        error: NBDError | None = None
        while True:
            magic, a, b = self._recv_reply_prefix(cookie)
            if magic == SIMPLE_REPLY_MAGIC:
                if a:
                    raise self._server_error(CMD_READ, offset, length, a)
                if covered:
                    raise self._abort("NBD server mixed simple and structured replies to NBD_CMD_READ")
                if view is None:
                    return self._recv_bytes(length) if length else b""
                self._recv_into(view)
                return None
            flags, chunk_type = a, b
            chunk_len = self._recv_chunk_length()
            if chunk_type in (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE):
                if chunk_type == REPLY_TYPE_OFFSET_DATA:
                    if chunk_len < 8:
                        raise self._abort("short NBD_REPLY_TYPE_OFFSET_DATA chunk")
                    chunk_off = int(U64.unpack(self._recv(8))[0])
                    part = chunk_len - 8
                else:
                    if chunk_len != U64_U32.size:
                        raise self._abort("bad NBD_REPLY_TYPE_OFFSET_HOLE chunk")
                    chunk_off, part = U64_U32.unpack(self._recv(U64_U32.size))
                rel = chunk_off - offset
                if rel < 0 or rel + part > length or covered + part > length:
                    raise self._abort(
                        f"NBD read reply chunk at {chunk_off}+{part} outside or overlapping request {offset}+{length}"
                    )
                if view is None and part == length:
                    whole = self._recv_bytes(part) if chunk_type == REPLY_TYPE_OFFSET_DATA else bytes(part)
                else:
                    if view is None:
                        buf = bytearray(length)
                        view = memoryview(buf)
                    if chunk_type == REPLY_TYPE_OFFSET_DATA:
                        self._recv_into(view[rel : rel + part])
                    else:
                        _zero_fill(view[rel : rel + part])
                covered += part
            elif chunk_type == REPLY_TYPE_NONE:
                self._skip(chunk_len)
            elif chunk_type & REPLY_TYPE_ERROR_BIT:
                err = self._parse_error_chunk(chunk_type, self._recv(chunk_len), CMD_READ, offset, length)
                error = error or err
            else:
                raise self._abort(f"unexpected NBD reply chunk type {chunk_type} to NBD_CMD_READ")
            if flags & REPLY_FLAG_DONE:
                break
        if error is not None:
            raise error
        if covered != length:
            raise self._abort(f"NBD server described {covered} of {length} bytes read at offset {offset}")
        if whole is not None:
            return whole
        if buf is not None:
            return bytes(buf)
        return None if view is not None else b""

    # -- writes ------------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset``; large writes are split at the maximum block size."""
        self._check_writable()
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        total = len(view)
        self._check_range(offset, total)
        step = self.max_block_size
        pos = 0
        while pos < total:
            n = min(step, total - pos)
            self._simple_command(CMD_WRITE, offset + pos, n, view[pos : pos + n])
            pos += n

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros.

        Uses NBD_CMD_WRITE_ZEROES (which lets the server punch holes) when the server advertises
        it, and falls back to writing zero-filled buffers otherwise.
        """
        self._check_writable()
        self._check_range(offset, length)
        end = offset + length
        pos = offset
        if self.can_write_zeroes:
            while pos < end:
                n = min(_MAX_ZEROES_REQUEST, end - pos)
                self._simple_command(CMD_WRITE_ZEROES, pos, n)
                pos += n
            return
        zeros = bytes(min(length, _ZERO_FILL_CHUNK, self.max_block_size))
        while pos < end:
            n = min(len(zeros), end - pos)
            self._simple_command(CMD_WRITE, pos, n, memoryview(zeros)[:n])
            pos += n

    def flush(self) -> None:
        """Ask the server to persist completed writes (NBD_CMD_FLUSH); a no-op if the server
        does not advertise flush support."""
        if not self.can_flush:
            self._live_sock()
            return
        self._simple_command(CMD_FLUSH, 0, 0)

    # -- block status -------------------------------------------------------------------------------

    def block_status(self, context: str, offset: int = 0, length: int | None = None) -> list[tuple[int, int, int]]:
        """Return ``(offset, length, flags)`` extents of meta context ``context`` covering
        ``[offset, offset + length)`` (``length`` defaults to the rest of the export).

        Extents are concatenated in order as the server reports them (nothing is merged); the
        last one is clipped to the requested range. Servers may describe less than was asked,
        so requests are repeated until the whole range is covered. For ``base:allocation``
        flags are :data:`STATE_HOLE` / :data:`STATE_ZERO`; for ``qemu:dirty-bitmap:NAME`` flag
        value 1 (:data:`DIRTY`) means dirty.
        """
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        context_id = self.meta_contexts.get(context)
        if context_id is None:
            granted = ", ".join(sorted(self.meta_contexts)) or "none"
            raise NBDError(f"NBD meta context {context!r} was not negotiated (granted: {granted})")
        extents: list[tuple[int, int, int]] = []
        pos = offset
        end = offset + length
        while pos < end:
            want = min(end - pos, MAX_STATUS_REQUEST)
            got = self._block_status_once(context_id, pos, want, extents)
            pos += got
        return extents

    def _block_status_once(self, context_id: int, offset: int, length: int, out: list[tuple[int, int, int]]) -> int:
        """One BLOCK_STATUS request; appends extents of ``context_id`` to ``out`` and returns how
        many bytes from ``offset`` they cover (at most ``length``, at least 1)."""
        cookie = self._request(CMD_BLOCK_STATUS, offset, length)
        covered = 0
        seen = False
        error: NBDError | None = None
        while True:
            magic, a, b = self._recv_reply_prefix(cookie)
            if magic == SIMPLE_REPLY_MAGIC:
                if a:
                    raise self._server_error(CMD_BLOCK_STATUS, offset, length, a)
                raise self._abort("NBD server sent a simple reply without error to NBD_CMD_BLOCK_STATUS")
            flags, chunk_type = a, b
            chunk_len = self._recv_chunk_length()
            payload = self._recv(chunk_len)
            if chunk_type == REPLY_TYPE_BLOCK_STATUS:
                if chunk_len < 4 or (chunk_len - 4) % EXTENT.size:
                    raise self._abort("malformed NBD_REPLY_TYPE_BLOCK_STATUS chunk")
                (cid,) = U32.unpack_from(payload)
                if cid == context_id and not seen:
                    seen = True
                    pos = offset
                    end = offset + length
                    for ext_len, ext_flags in EXTENT.iter_unpack(memoryview(payload)[4:]):
                        if pos >= end:
                            break
                        if ext_len == 0:
                            continue
                        n = min(ext_len, end - pos)
                        out.append((pos, n, ext_flags))
                        pos += n
                    covered = pos - offset
            elif chunk_type & REPLY_TYPE_ERROR_BIT:
                err = self._parse_error_chunk(chunk_type, payload, CMD_BLOCK_STATUS, offset, length)
                error = error or err
            elif chunk_type != REPLY_TYPE_NONE:
                raise self._abort(f"unexpected NBD reply chunk type {chunk_type} to NBD_CMD_BLOCK_STATUS")
            if flags & REPLY_FLAG_DONE:
                break
        if error is not None:
            raise error
        if covered <= 0:
            raise self._abort(f"NBD server returned no extents for meta context id {context_id} at offset {offset}")
        return covered


def probe_unix(path: str, timeout: float = 2.0) -> None:
    """Check that an NBD server answers on UNIX socket ``path``: read its greeting, then end the
    handshake politely with NBD_OPT_ABORT (so the server logs nothing). Raises OSError when
    nothing listens there and NBDError when the peer does not greet like an NBD server."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        greeting = bytearray(GREETING.size)
        view = memoryview(greeting)
        while view:
            n = sock.recv_into(view)
            if n == 0:
                raise NBDError(f"NBD server at {path} closed the connection during the greeting")
            view = view[n:]
        magic, opt_magic, hflags = GREETING.unpack(greeting)
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NBDError(f"peer at {path} is not a newstyle NBD server")
        cflags = FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if hflags & FLAG_NO_ZEROES else 0)
        sock.sendall(U32.pack(cflags) + OPTION.pack(IHAVEOPT, OPT_ABORT, 0))
        with contextlib.suppress(OSError):  # the server may acknowledge the abort or hang up
            sock.recv(OPTION_REPLY.size)


def _zero_fill(view: memoryview) -> None:
    n = len(view)
    if n <= _ZERO_FILL_CHUNK:
        view[:] = bytes(n)
        return
    zeros = bytes(_ZERO_FILL_CHUNK)
    pos = 0
    while pos < n:
        k = min(_ZERO_FILL_CHUNK, n - pos)
        view[pos : pos + k] = zeros[:k] if k < _ZERO_FILL_CHUNK else zeros
        pos += k
