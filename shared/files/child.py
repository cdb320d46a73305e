"""The sandboxed child that parses a backup's partitions and filesystems.

A guest controls every byte of its disks, so the parsers (C libraries) read hostile input:
they run here, in a process of their own started by browse.py with an empty environment, that
connects to the backup's NBD export, then limits itself (address space, CPU time, no files
written, no core dumps, few descriptors), drops root for ``nobody`` and sets no-new-privileges
before it reads a byte of the backup. It holds no setting, key or credential: the worst a
crafted filesystem can do is crash or stall it, and the parent then kills it.

Protocol: one JSON request on stdin (``socket``, ``op``: partitions|list|stat|read, and the
op's arguments); one JSON line on stdout, ``{"ok": true, ...}`` or ``{"ok": false, "kind",
"detail"}``; for ``read`` the file's bytes follow that line until the end of the stream.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
from typing import Any

PR_SET_NO_NEW_PRIVS = 38
NOBODY = 65534
READ_PIECE = 4 * 1024 * 1024


def confine(memory_bytes: int, cpu_seconds: int) -> None:
    """Limit this process, then give up root (when it has it)."""
    for limit, value in (
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_FSIZE, 0),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, 32),
    ):
        resource.setrlimit(limit, (value, value))
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def answer(data: dict[str, Any]) -> None:
    sys.stdout.buffer.write(json.dumps(data).encode() + b"\n")
    sys.stdout.buffer.flush()


def main() -> int:
    request = json.loads(sys.stdin.buffer.readline())
    # everything the parsers need is loaded before the limits: no file is opened after them
    from shared.repository.nbd import NBDClient

    from .devices import NbdDevice, partitions
    from .filesystems import FilesError, Filesystem, open_reader

    client = NBDClient.connect_unix(request["socket"])
    confine(int(request["memory"]), int(request["cpu"]))
    device = NbdDevice(client)
    try:
        found = partitions(device)
        if request["op"] == "partitions":
            answer({"ok": True, "partitions": [p.to_json() for p in found]})
            return 0
        readable = [p for p in found if p.filesystem in ("ext", "xfs", "fat", "ntfs")]
        index = request.get("partition")
        chosen = readable[0] if index is None and readable else next((p for p in found if p.index == index), None)
        if chosen is None:
            kinds = ", ".join(f"{p.index}: {p.name} {p.filesystem or 'unknown'}" for p in found) or "none"
            which = "no partition holds a filesystem blockvault can read" if index is None else f"no partition {index}"
            answer({"ok": False, "kind": "nofs" if index is None else "nopartition", "detail": f"{which} ({kinds})"})
            return 0
        fs = Filesystem(open_reader(chosen.filesystem, chosen.device))
        path = str(request.get("path") or "/")
        head = {"ok": True, "partition": chosen.index, "filesystem": chosen.filesystem}
        if request["op"] == "stat":
            answer({**head, "entry": fs.stat(path).to_json(path)})
        elif request["op"] == "list":
            try:
                entries, total = fs.listdir(
                    path, int(request["start"]), int(request["limit"]), int(request["maxEntries"])
                )
            except FilesError as exc:  # a file (or a link to one): listed as itself, as ls does
                if exc.kind != "notdir" or exc.path != path:
                    raise
                entries, total = [(path, fs.stat(path))], 1
            answer({**head, "entries": [e.to_json(p) for p, e in entries], "total": total})
        elif request["op"] == "read":
            entry, node = fs.open(path)
            answer({**head, "entry": entry.to_json(path)})
            offset = 0
            while offset < entry.size:
                piece = fs.read(node, offset, min(READ_PIECE, entry.size - offset))
                if not piece:
                    break
                sys.stdout.buffer.write(piece)
                offset += len(piece)
            sys.stdout.buffer.flush()
    except FilesError as exc:
        answer({"ok": False, "kind": exc.kind, "detail": str(exc)})
    except OSError as exc:  # the parsers' own errors: a damaged or unsupported filesystem
        answer({"ok": False, "kind": "unreadable", "detail": " ".join(str(exc).split())[:500]})
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
