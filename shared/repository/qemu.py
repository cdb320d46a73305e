"""Thin wrappers around ``qemu-img`` and ``qemu-nbd``.

Every failure of a qemu tool becomes a :class:`QemuError` whose message is one line naming the
image and what qemu said (the first line of its stderr). :class:`QemuNbdServer` runs
``qemu-nbd`` on a private UNIX socket for the lifetime of a ``with`` block and hands out
:class:`~shared.repository.nbd.NBDClient` connections to it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from shared.repository.nbd import NBDClient, NBDError, probe_unix

logger = logging.getLogger(__name__)

__all__ = [
    "QCOW2_MAGIC",
    "QemuError",
    "QemuNbdServer",
    "QemuStorageDaemon",
    "backing_of",
    "bitmap_add",
    "bitmap_clear",
    "bitmap_remove",
    "create_overlay",
    "create_qcow2",
    "detect_format",
    "image_info",
    "list_bitmaps",
    "nbd_uri",
    "virtual_size",
]

QCOW2_MAGIC = b"QFI\xfb"

QEMU_IMG = "qemu-img"
QEMU_NBD = "qemu-nbd"
QEMU_STORAGE_DAEMON = "qemu-storage-daemon"

_START_TIMEOUT = 10.0
_STOP_TIMEOUT_READ_ONLY = 10.0
_STOP_TIMEOUT_WRITABLE = 60.0  # a writable qemu-nbd flushes qcow2 metadata on SIGTERM
_KILL_TIMEOUT = 5.0


class QemuError(Exception):
    """A qemu-img / qemu-nbd operation failed. The message is one line naming the image and
    what qemu said; ``path`` is the image and ``stderr`` qemu's full error output."""

    def __init__(self, message: str, *, path: str | None = None, stderr: str = "") -> None:
        super().__init__(" ".join(message.split()) if "\n" in message else message)
        self.path = path
        self.stderr = stderr


def _first_line(stderr: str, returncode: int | None) -> str:
    for raw in stderr.splitlines():
        line = raw.strip()
        if line:
            for prefix in (f"{QEMU_IMG}: ", f"{QEMU_NBD}: ", f"{QEMU_STORAGE_DAEMON}: "):
                line = line.removeprefix(prefix)
            if line.startswith("--blockdev {") and "}: " in line:  # the option it failed on
                line = line.split("}: ", 1)[1]
            return line
    return f"exit status {returncode}" if returncode is not None else "no error output"


def _run_qemu_img(path: str, what: str, args: Sequence[str]) -> str:
    """Run ``qemu-img args...``; return its stdout or raise QemuError naming ``path``."""
    cmd = [QEMU_IMG, *args]
    logger.debug("running %s", cmd)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    except OSError as exc:
        raise QemuError(f"{path}: {what} failed: cannot run {QEMU_IMG}: {exc}", path=path) from exc
    if proc.returncode != 0:
        raise QemuError(
            f"{path}: {what} failed: {_first_line(proc.stderr, proc.returncode)}",
            path=path,
            stderr=proc.stderr,
        )
    return proc.stdout


def detect_format(path: str) -> str:
    """Return ``"qcow2"`` if the file at ``path`` starts with :data:`QCOW2_MAGIC`, else ``"raw"``.

    Raises QemuError if the file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(QCOW2_MAGIC))
    except OSError as exc:
        raise QemuError(f"{path}: cannot read image: {exc.strerror or exc}", path=path) from exc
    return "qcow2" if head == QCOW2_MAGIC else "raw"


def image_info(path: str, *, fmt: str = "qcow2") -> dict[str, Any]:
    """``qemu-img info --output=json -U -f FMT path`` as a dict (FMT is ``qcow2`` unless given).

    ``-U`` lets this run while another process (qemu, qemu-nbd) has the image open. Raises
    QemuError when qemu-img fails, e.g. on a corrupt header.
    """
    out = _run_qemu_img(path, "qemu-img info", ["info", "--output=json", "-U", "-f", fmt, os.path.abspath(path)])
    try:
        info = json.loads(out)
    except ValueError as exc:
        raise QemuError(f"{path}: qemu-img info printed invalid JSON: {exc}", path=path) from exc
    if not isinstance(info, dict):
        raise QemuError(f"{path}: qemu-img info printed unexpected JSON", path=path)
    return info


def virtual_size(path: str, *, fmt: str = "qcow2") -> int:
    """The image's virtual (guest-visible) size in bytes."""
    return int(image_info(path, fmt=fmt)["virtual-size"])


def list_bitmaps(path: str) -> list[dict[str, Any]]:
    """The qcow2 image's persistent dirty bitmaps, each ``{"name", "granularity", "flags"}``.

    ``flags`` is qemu's list, e.g. ``["auto"]`` for an enabled bitmap, ``[]`` for a disabled
    one, and it contains ``"in-use"`` while a process has the bitmap open (or after a crash).
    """
    info = image_info(path)
    data = info.get("format-specific", {}).get("data", {})
    return [
        {"name": b["name"], "granularity": int(b["granularity"]), "flags": list(b.get("flags", []))}
        for b in data.get("bitmaps", [])
    ]


def bitmap_add(path: str, name: str, *, disabled: bool = False, granularity: int | None = None) -> None:
    """Add persistent dirty bitmap ``name`` (enabled unless ``disabled``) to a qcow2 image."""
    args = ["bitmap", "--add"]
    if granularity is not None:
        args += ["-g", str(granularity)]
    if disabled:
        args.append("--disable")
    _run_qemu_img(path, f"adding bitmap {name!r}", [*args, "-f", "qcow2", os.path.abspath(path), name])


def bitmap_clear(path: str, name: str) -> None:
    """Clear (mark all clean) persistent dirty bitmap ``name``."""
    _run_qemu_img(path, f"clearing bitmap {name!r}", ["bitmap", "--clear", "-f", "qcow2", os.path.abspath(path), name])


def bitmap_remove(path: str, name: str) -> None:
    """Delete persistent dirty bitmap ``name``."""
    _run_qemu_img(path, f"removing bitmap {name!r}", ["bitmap", "--remove", "-f", "qcow2", os.path.abspath(path), name])


def create_qcow2(path: str, size: int) -> None:
    """Create an empty qcow2 image of ``size`` bytes (``qemu-img create -f qcow2 -q``)."""
    _run_qemu_img(path, "qemu-img create", ["create", "-f", "qcow2", "-q", os.path.abspath(path), str(size)])


def _die_with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` run so that it gets SIGTERM when the process that started it dies, so a killed
    backup never leaves a qemu-nbd holding the image's lock. util-linux's ``setpriv`` sets
    the parent-death signal before exec (no preexec_fn, which is unsafe with threads); Linux
    ties it to the starting thread, so servers are started by the thread that runs the job."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *cmd] if setpriv else cmd


class QemuNbdServer:
    """Run ``qemu-nbd`` exporting one image on a private UNIX socket for a ``with`` block.

    The socket lives in a fresh temporary directory; the server runs with ``--persistent`` so
    that connections can come and go, and accepts up to ``shared`` clients at once. Writable
    exports use ``--discard=unmap --detect-zeroes=unmap`` so zeros stay sparse. On exit the
    process is stopped (SIGTERM, then SIGKILL if it does not exit) and the directory removed,
    whether or not the body raised.
    """

    def __init__(
        self,
        path: str,
        *,
        fmt: str = "qcow2",
        read_only: bool = True,
        bitmap: str | None = None,
        shared: int = 4,
        export_name: str = "vol",
    ) -> None:
        """Describe the export; nothing starts until ``__enter__``."""
        self.path = path
        self.fmt = fmt
        self.read_only = read_only
        self.bitmap = bitmap
        self.shared = shared
        self.export_name = export_name
        self.socket_path = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: str | None = None
        self._stderr_path = ""

    @property
    def pid(self) -> int | None:
        """The qemu-nbd process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The qemu-nbd command line used to serve the image."""
        cmd = [
            QEMU_NBD,
            f"--socket={self.socket_path}",
            f"--format={self.fmt}",
            f"--export-name={self.export_name}",
            f"--shared={self.shared}",
            "--persistent",
            "--cache=writeback",
            "--aio=threads",
        ]
        if self.read_only:
            cmd.append("--read-only")
        else:
            cmd += ["--discard=unmap", "--detect-zeroes=unmap"]
        if self.bitmap is not None:
            cmd.append(f"--bitmap={self.bitmap}")
        cmd.append(os.path.abspath(self.path))
        return cmd

    def __enter__(self) -> QemuNbdServer:
        """Start qemu-nbd and wait (up to 10 s) until it accepts connections."""
        if self._proc is not None:
            raise RuntimeError("QemuNbdServer is already running")
        self._tmpdir = tempfile.mkdtemp(prefix="blockvault-nbd-")
        self.socket_path = os.path.join(self._tmpdir, "nbd.sock")
        self._stderr_path = os.path.join(self._tmpdir, "qemu-nbd.err")
        cmd = self.command()
        logger.debug("starting %s", cmd)
        try:
            # stderr goes to a file, never an undrained pipe that could block qemu-nbd.
            with open(self._stderr_path, "wb") as err:
                self._proc = subprocess.Popen(
                    _die_with_parent(cmd),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    close_fds=True,
                )
            self._wait_ready()
        except OSError as exc:
            self._stop()
            raise QemuError(f"{self.path}: cannot start {QEMU_NBD}: {exc}", path=self.path) from exc
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop qemu-nbd (SIGTERM, wait, SIGKILL fallback) and remove the temporary directory."""
        self._stop()

    def connect(self, meta_contexts: Sequence[str] = ()) -> NBDClient:
        """Open a new NBD connection to the export, negotiating ``meta_contexts``."""
        if self._proc is None:
            raise RuntimeError("QemuNbdServer is not running")
        return NBDClient.connect_unix(self.socket_path, self.export_name, meta_contexts)

    def _stderr(self) -> str:
        try:
            with open(self._stderr_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        delay = 0.005
        while True:
            rc = proc.poll()
            if rc is not None:
                stderr = self._stderr()
                raise QemuError(
                    f"{self.path}: qemu-nbd exited with status {rc}: {_first_line(stderr, rc)}",
                    path=self.path,
                    stderr=stderr,
                )
            if os.path.exists(self.socket_path):
                try:
                    probe_unix(self.socket_path)
                    return
                except (OSError, NBDError):
                    pass
            if time.monotonic() >= deadline:
                stderr = self._stderr()
                detail = _first_line(stderr, None) if stderr.strip() else "no output"
                raise QemuError(
                    f"{self.path}: qemu-nbd did not start listening within {_START_TIMEOUT:g} s ({detail})",
                    path=self.path,
                    stderr=stderr,
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    grace = _STOP_TIMEOUT_READ_ONLY if self.read_only else _STOP_TIMEOUT_WRITABLE
                    try:
                        proc.wait(timeout=grace)
                    except subprocess.TimeoutExpired:
                        logger.warning("qemu-nbd (pid %d) ignored SIGTERM for %g s; killing it", proc.pid, grace)
                        proc.kill()
                        proc.wait(timeout=_KILL_TIMEOUT)
                elif proc.returncode not in (0, -signal.SIGTERM):
                    logger.debug("qemu-nbd exited with status %s", proc.returncode)
            finally:
                if proc.poll() is None:  # interrupted while waiting: never leave it behind
                    proc.kill()
                    proc.wait()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


def nbd_uri(socket_path: str, export: str = "") -> str:
    """The URI qemu opens an NBD export on a UNIX socket by."""
    return f"nbd+unix:///{export}?socket={socket_path}"


def create_overlay(path: str, backing: str, size: int) -> None:
    """A new qcow2 image at ``path`` of ``size`` bytes whose backing is the raw image
    ``backing`` (a file or an NBD URI), which is not opened (``-u``)."""
    args = ["create", "-q", "-f", "qcow2", "-F", "raw", "-b", backing, "-u", os.path.abspath(path), str(size)]
    _run_qemu_img(path, "qemu-img create (overlay)", args)


def backing_of(path: str) -> str | None:
    """The backing file a qcow2 image's header names (None when it stands alone)."""
    backing = image_info(path).get("backing-filename")
    return str(backing) if backing else None


class QemuStorageDaemon:
    """``qemu-storage-daemon`` holding one qcow2 image (and its backing chain) open, with a QMP
    monitor on a private socket, for a ``with`` block: block jobs on an image no VM runs from.

    The image's node is ``node`` (its format node; ``<node>-file`` below it). The daemon locks
    the image as QEMU does, so a VM cannot start on it meanwhile. Stopped with ``quit``, then
    SIGTERM/SIGKILL; it also dies with the thread that started it (see ``_die_with_parent``)."""

    def __init__(self, path: str, node: str = "vol0") -> None:
        self.path = os.path.abspath(path)
        self.node = node
        self.qmp_socket = ""
        self._tmpdir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = self._started = ""
        self._terminated = False

    def running(self) -> bool:
        """Whether the daemon started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> QemuStorageDaemon:
        """Start the daemon and wait until it has started up (:meth:`start`, :meth:`wait`)."""
        self.start()
        return self.wait()

    def start(self) -> QemuStorageDaemon:
        """Start the daemon and return at once: the caller can do other work while it opens
        the image. Stopped by ``__exit__``, like a daemon entered with ``with``."""
        if shutil.which(QEMU_STORAGE_DAEMON) is None:
            raise QemuError(
                f"{self.path}: {QEMU_STORAGE_DAEMON} is not installed (Debian: qemu-system-common)", path=self.path
            )
        self._terminated = False
        self._tmpdir = tempfile.mkdtemp(prefix="blockvault-qsd-")
        self.qmp_socket = os.path.join(self._tmpdir, "qmp.sock")
        self._log_path = os.path.join(self._tmpdir, "qsd.log")
        self._started = os.path.join(self._tmpdir, "pid")  # written once every option is in effect
        file_node = {"driver": "file", "filename": self.path, "node-name": f"{self.node}-file"}
        cmd = [
            QEMU_STORAGE_DAEMON,
            "--blockdev",
            json.dumps(file_node),  # JSON: a comma in the path needs no escaping
            "--blockdev",
            json.dumps({"driver": "qcow2", "file": f"{self.node}-file", "node-name": self.node}),
            "--chardev",
            f"socket,id=m0,path={self.qmp_socket},server=on,wait=off",
            "--monitor",
            "chardev=m0",
            "--pidfile",
            self._started,
        ]
        try:
            with open(self._log_path, "wb") as log:
                self._proc = subprocess.Popen(
                    _die_with_parent(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
        except OSError as exc:
            self._stop()
            raise QemuError(f"{self.path}: cannot start qemu-storage-daemon: {exc}", path=self.path) from exc
        return self

    def wait(self) -> QemuStorageDaemon:
        """Return once the started daemon is up: the image open and the monitor listening (its
        pid file is written after every option is in effect; the socket's file alone exists
        from ``bind``, before ``listen``). QemuError, the daemon stopped, when it is not."""
        proc = self._proc
        if proc is None:
            raise RuntimeError("qemu-storage-daemon is not started")
        try:
            deadline = time.monotonic() + _START_TIMEOUT
            delay = 0.002
            while not os.path.exists(self._started):
                if proc.poll() is not None or time.monotonic() > deadline:
                    with open(self._log_path, encoding="utf-8", errors="replace") as handle:
                        said = handle.read()
                    raise QemuError(
                        f"{self.path}: qemu-storage-daemon did not start: {_first_line(said, proc.poll())}",
                        path=self.path,
                        stderr=said,
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        except BaseException:
            self._stop()
            raise
        return self

    def terminate(self) -> None:
        """SIGTERM: the daemon flushes the image and exits; ``__exit__`` waits for it."""
        if self._proc is not None and self._proc.poll() is None and not self._terminated:
            self._proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            if not self._terminated:
                proc.send_signal(signal.SIGTERM)  # qemu-storage-daemon flushes and exits on SIGTERM
            try:
                proc.wait(timeout=_STOP_TIMEOUT_WRITABLE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
