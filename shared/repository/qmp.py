"""Talking to a running VM: its QEMU monitor (QMP) and its guest agent.

:class:`Monitor` is a synchronous QMP connection whose failures all become
:class:`~shared.errors.MonitorError`, one line naming the socket. It speaks the wire protocol
itself (JSON messages, one a line, over the UNIX socket: greeting, ``qmp_capabilities``, then
one command at a time, events skipped): the ``qemu.qmp`` library's sync shim runs an asyncio
loop, 40 more modules to import before a backup's first qemu operation. QMP
serves one client per monitor socket, so blockvault needs a monitor of its own (a second
``-qmp`` of the VM's QEMU); a connection is held only for the length of one backup.

:class:`GuestAgent` speaks the QEMU guest agent's protocol (newline-delimited JSON over the
VM's virtio-serial socket, resynchronised with ``guest-sync-delimited``) for the
``guest-fsfreeze-*`` calls that make a backup application-consistent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import time
from types import TracebackType
from typing import Any

from shared.errors import GuestAgentError, MonitorError

log = logging.getLogger(__name__)

__all__ = ["GuestAgent", "Monitor"]

CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0


class _ExecuteFailed(Exception):
    """QEMU answered a command with an error (the message is its ``desc``)."""


class Monitor:
    """One QMP connection to a running QEMU (or qemu-storage-daemon), for a ``with`` block."""

    def __init__(self, socket_path: str, *, timeout: float = COMMAND_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._ids = 0

    def _fail(self, detail: str) -> MonitorError:
        return MonitorError(socket=self.socket_path, detail=" ".join(detail.split()))

    def connect(self) -> Monitor:
        if not os.path.isabs(self.socket_path):
            raise self._fail("must be an absolute path")
        if not os.path.exists(self.socket_path):
            raise self._fail("no such socket (is the VM's QEMU running with this -qmp?)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:  # a QEMU that is gone refuses at once
            sock.close()
            raise self._fail(f"cannot connect: {exc.strerror or exc} (is the VM's QEMU running?)") from None
        self._sock, self._buffer = sock, b""
        try:
            greeting = self._message()
            if "QMP" not in greeting:
                raise _ExecuteFailed(f"not a QMP greeting: {str(greeting)[:80]}")
            self._execute("qmp_capabilities", {})
        except (MonitorError, _ExecuteFailed) as exc:
            self.close()
            detail = exc.fields["detail"] if isinstance(exc, MonitorError) else str(exc)
            raise self._fail(f"cannot connect: {detail}") from None
        sock.settimeout(self.timeout)
        return self

    def __enter__(self) -> Monitor:
        return self.connect()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _message(self) -> dict[str, Any]:
        """The next message QEMU sends (one JSON object a line)."""
        assert self._sock is not None
        while b"\n" not in self._buffer:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise self._fail(f"no answer within {self._sock.gettimeout():g} s") from None
            except OSError as exc:
                raise self._fail(exc.strerror or str(exc)) from None
            if not data:
                raise self._fail("QEMU closed the connection")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            raise self._fail(f"unreadable message {line[:80]!r}") from None
        if not isinstance(message, dict):
            raise self._fail(f"unexpected message {line[:80]!r}")
        return message

    def _execute(self, command: str, args: dict[str, Any]) -> Any:
        """Send ``command`` and return its ``return``; an error reply raises _ExecuteFailed,
        anything else (no answer, a lost connection) MonitorError."""
        assert self._sock is not None
        self._ids += 1
        request: dict[str, Any] = {"execute": command, "id": self._ids}
        if args:
            request["arguments"] = args
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise self._fail(exc.strerror or str(exc)) from None
        while True:
            reply = self._message()
            if "event" in reply or ("id" in reply and reply["id"] != self._ids):
                continue  # an event, or the answer to a command whose caller gave up
            if "error" in reply:
                error = reply["error"]
                raise _ExecuteFailed(str(error.get("desc", error)) if isinstance(error, dict) else str(error))
            if "return" not in reply:
                raise self._fail(f"unexpected answer {str(reply)[:80]}")
            return reply["return"]

    def cmd(self, command: str, /, **args: Any) -> Any:
        """Run QMP ``command``; its ``return`` value. A QMP error reply, a lost connection or
        no answer within the timeout raise MonitorError."""
        if self._sock is None:
            raise self._fail("not connected")
        try:
            return self._execute(command, args)
        except _ExecuteFailed as exc:
            raise self._fail(f"{command}: {exc}") from None
        except MonitorError as exc:
            self.close()
            raise self._fail(f"{command}: connection lost ({exc.fields['detail']})") from None

    def transaction(self, actions: list[tuple[str, dict[str, Any]]]) -> None:
        """Run ``actions`` (QMP transaction action type, data) atomically: all or none."""
        if actions:
            self.cmd("transaction", actions=[{"type": kind, "data": data} for kind, data in actions])

    def block_nodes(self) -> list[dict[str, Any]]:
        """Every named block node (``query-named-block-nodes`` flat)."""
        nodes: list[dict[str, Any]] = self.cmd("query-named-block-nodes", flat=True)
        return nodes

    def format_node(self, path: str) -> dict[str, Any]:
        """The format node (qcow2/raw) that QEMU opened the image at ``path`` as: the node a
        backup reads and a dirty bitmap lives on."""
        want = os.path.realpath(path)
        nodes = [
            node
            for node in self.block_nodes()
            if node.get("drv") in ("qcow2", "raw") and os.path.realpath(str(node.get("file", ""))) == want
        ]
        # a raw format node sits on a "file" node with the same filename; so does a qcow2 one
        nodes = [node for node in nodes if node.get("drv") != "file"]
        if not nodes:
            raise self._fail(f"the VM has no disk {path} open")
        return nodes[0]

    def bitmaps(self, node_name: str) -> list[dict[str, Any]]:
        """The dirty bitmaps on node ``node_name``: name, recording, persistent, inconsistent..."""
        for node in self.block_nodes():
            if node.get("node-name") == node_name:
                return [b for b in node.get("dirty-bitmaps", []) if b.get("name")]
        raise self._fail(f"no block node {node_name}")


class GuestAgent:
    """A QEMU guest agent on the host end of the VM's virtio-serial socket."""

    def __init__(self, socket_path: str, *, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    def _fail(self, detail: str) -> GuestAgentError:
        return GuestAgentError(socket=self.socket_path, detail=" ".join(detail.split()))

    def __enter__(self) -> GuestAgent:
        if not os.path.isabs(self.socket_path):
            raise self._fail("must be an absolute path")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise self._fail(f"cannot connect: {exc.strerror or exc}") from None
        self._sock = sock
        self._sync()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _send(self, name: str, args: dict[str, Any] | None = None) -> None:
        assert self._sock is not None
        message: dict[str, Any] = {"execute": name}
        if args:
            message["arguments"] = args
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            raise self._fail(f"{name}: {exc.strerror or exc}") from None

    def _line(self, name: str, deadline: float) -> bytes:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            if time.monotonic() > deadline:
                raise self._fail(f"{name}: no answer within {self.timeout:g} s (is the agent running in the guest?)")
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise self._fail(f"{name}: {exc.strerror or exc}") from None
            if not data:
                raise self._fail(f"{name}: the agent closed the connection")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _sync(self) -> None:
        """Discard whatever an earlier client left unread: send guest-sync-delimited with a
        random id; the agent answers after a 0xFF byte, and only that answer counts."""
        token = random.randrange(1, 2**31)
        self._send("guest-sync-delimited", {"id": token})
        deadline = time.monotonic() + self.timeout
        while True:
            line = self._line("guest-sync-delimited", deadline)
            if b"\xff" in line:
                line = line.rsplit(b"\xff", 1)[1]
            with contextlib.suppress(ValueError):
                if json.loads(line).get("return") == token:
                    return

    def call(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Run agent command ``name``; its ``return`` value, or GuestAgentError."""
        if self._sock is None:
            raise self._fail("not connected")
        self._send(name, args)
        deadline = time.monotonic() + self.timeout
        line = self._line(name, deadline)
        try:
            reply = json.loads(line)
        except ValueError:
            raise self._fail(f"{name}: unreadable answer {line[:80]!r}") from None
        if "error" in reply:
            raise self._fail(f"{name}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def freeze(self) -> int:
        """Freeze the guest's filesystems; how many were frozen."""
        return int(self.call("guest-fsfreeze-freeze"))

    def thaw(self) -> int:
        return int(self.call("guest-fsfreeze-thaw"))

    def status(self) -> str:
        return str(self.call("guest-fsfreeze-status"))
