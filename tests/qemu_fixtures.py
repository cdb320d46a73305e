"""pytest plugin: real QEMU processes and a real, host-safe qemu-ga, for tests (no mocks).

:class:`QemuVm`
    ``qemu-system-x86_64 -machine none -nodefaults -display none -accel tcg``: no guest OS, just
    the block layer. Disk ``i`` is ``-drive file=<abs>,format=<fmt>,if=none,id=drive<i>,
    node-name=disk<i>,discard=unmap`` (``discard=unmap`` so that :meth:`QemuVm.discard` really
    discards; with QEMU's default ``discard=ignore`` a discard is silently a no-op). Two QMP
    monitors: ``<folder>/qmp.sock`` (``.qmp_socket``, the product's: QMP serves one client per
    monitor) and ``<folder>/test.sock`` (the test's own, behind :meth:`QemuVm.cmd`). QEMU's
    stdout and stderr go to ``<folder>/qemu.log``.
``qemu_vm`` (function)
    Factory: ``qemu_vm(disks, formats=None) -> QemuVm``, started; every VM it made is stopped
    when the test ends, passed or not.
:func:`make_qcow2`
    ``make_qcow2(path, size) -> path``: an empty qcow2 (``qemu-img create``). Not the
    ``make_qcow2`` fixture of ``tests/conftest.py``, which makes a qcow2 full of data.
:class:`GuestAgent`
    A real ``qemu-ga`` (Debian's qemu-guest-agent) that cannot freeze anything of this host: see
    the class. ``guest_agent`` (function) yields a started one.

Guest writes go through QEMU's block layer (HMP ``qemu-io drive<i> "..."``), so they reach
dirty bitmaps, copy-before-write filters and backup jobs exactly like a guest's writes would.
``qemu-io`` prints its results and errors on QEMU's stdout (into ``qemu.log``), not into the
HMP reply, so :meth:`QemuVm.write` checks the log for qemu-io's ``wrote N/N bytes at offset O``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, cast

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

__all__ = [
    "HOST_UNSAFE_RPCS",
    "GuestAgent",
    "QemuError",
    "QemuVm",
    "UnsafeAgentError",
    "VmFactory",
    "check_agent_mounts",
    "make_qcow2",
]

START_SECONDS = 20.0
STOP_SECONDS = 10.0
QMP_TIMEOUT = 60.0
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, NUL included
ENSURE = "run tests/harness/ensure-system"


class QemuError(RuntimeError):
    """QEMU (or qemu-io inside it) failed; the message carries the relevant log text."""


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _check_socket_path(path: Path) -> str:
    text = str(path)
    if len(text.encode()) > SUN_PATH_MAX:
        raise ValueError(f"unix socket path longer than {SUN_PATH_MAX} bytes: {text}")
    return text


def _probe_qmp(path: str) -> bool:
    """True when ``path`` accepts a connection and greets with QMP (then hangs up)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(path)
            greeting = sock.recv(4096)
        except OSError:
            return False
    return b'"QMP"' in greeting


def make_qcow2(path: Path, size: int) -> Path:
    """An empty qcow2 image of ``size`` bytes at ``path``."""
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-q", str(path), str(size)], check=True)
    return path


class QemuVm:
    """One ``qemu-system-x86_64`` without a guest: disks, two QMP monitors, restartable.

    ``read_disk`` flushes the drive through QEMU (HMP ``qemu-io drive<i> "flush"``: qcow2 writes
    its cached L2/refcount metadata, and the data is already in the file) and then reads the
    image file with ``qemu-img convert -U -O raw``. Checked: 40 rounds of random writes and
    discards compared byte for byte with a model, all equal (without the flush the file lags).
    It is consistent because only the test writes to the disks; the product's backup jobs read
    them and write their targets. It is preferred to a temporary NBD export of the live node
    because QEMU runs a single NBD server: ``nbd-server-start`` would fail while the product
    exports over NBD, and ``nbd-server-stop`` would tear the product's exports down.
    """

    def __init__(self, folder: Path, disks: list[Path], formats: list[str] | None = None) -> None:
        if formats is not None and len(formats) != len(disks):
            raise ValueError("give one format per disk")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.disks = [Path(disk).resolve() for disk in disks]
        self.formats = list(formats) if formats is not None else ["qcow2"] * len(disks)
        self.qmp_socket: str = _check_socket_path(self.folder / "qmp.sock")
        self.test_socket: str = _check_socket_path(self.folder / "test.sock")
        self.log = self.folder / "qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._lock = threading.RLock()

    # --- process ------------------------------------------------------------------------------

    def _args(self) -> list[str]:
        args = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg"]
        for i, (disk, fmt) in enumerate(zip(self.disks, self.formats, strict=True)):
            args += ["-drive", f"file={disk},format={fmt},if=none,id=drive{i},node-name=disk{i},discard=unmap"]
        args += ["-qmp", f"unix:{self.qmp_socket},server=on,wait=off"]
        args += ["-qmp", f"unix:{self.test_socket},server=on,wait=off"]
        return args

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> QemuVm:
        """Start QEMU; return once the test's monitor answers with a QMP greeting (or raise).

        The product's monitor is not probed: it serves one client, and a product already
        polling for this VM (an instant restore waiting to stream) may hold it, for as long as
        its job runs. QEMU listens on every monitor's socket before it serves any, so once
        the test's monitor greets, the product's socket takes connections too."""
        if self.running:
            raise QemuError("QEMU is already running")
        if shutil.which("qemu-system-x86_64") is None:
            raise QemuError(f"qemu-system-x86_64 is missing: {ENSURE}")
        self._close_monitor()
        for path in (self.qmp_socket, self.test_socket):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with open(self.log, "ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(self._args())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self._args(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_SECONDS
        while not _probe_qmp(self.test_socket):
            if self.proc.poll() is not None:
                raise QemuError(f"QEMU exited {self.proc.returncode} while starting:\n{_log_tail(self.log)}")
            if time.monotonic() > deadline:
                self.kill()
                raise QemuError(f"QEMU's monitor did not answer in {START_SECONDS:g} s:\n{_log_tail(self.log)}")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL and wait: like a host crash, persistent bitmaps are not stored and writes
        since the last flush may be lost (qcow2 keeps L2 updates in QEMU's cache until then)."""
        self._close_monitor()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def quit(self, timeout: float = STOP_SECONDS) -> None:
        """QMP ``quit`` on the test monitor, then wait: the clean shutdown, which stores
        persistent dirty bitmaps in the qcow2 images."""
        if not self.running:
            return
        assert self.proc is not None
        with self._lock, contextlib.suppress(Exception):  # the reply races QEMU's exit
            self._monitor().cmd("quit")
        self._close_monitor()
        self.proc.wait(timeout)

    def stop(self) -> None:
        """``quit`` when running; SIGKILL if it has not exited after 10 s (or ``quit`` failed)."""
        try:
            self.quit(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.kill()

    def restart(self) -> QemuVm:
        """Start again after ``kill`` or ``quit``: same disks, same sockets."""
        if self.running:
            raise QemuError("QEMU is still running: kill() or quit() it first")
        return self.start()

    def __enter__(self) -> QemuVm:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- QMP / HMP ----------------------------------------------------------------------------

    def _monitor(self) -> QEMUMonitorProtocol:
        if self._qmp is None:
            if not self.running:
                raise QemuError("QEMU is not running")
            qmp = QEMUMonitorProtocol(self.test_socket)
            qmp.settimeout(QMP_TIMEOUT)
            qmp.connect(negotiate=True)
            self._qmp = qmp
        return self._qmp

    def _close_monitor(self) -> None:
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            with contextlib.suppress(Exception):  # EOFError after quit, errors after a kill
                qmp.close()

    def cmd(self, name: str, /, **args: Any) -> Any:
        """Run QMP command ``name`` on the test monitor; its ``return`` value. A QMP error
        raises ``qemu.qmp.ExecuteError``. Arguments with dashes: ``**{"node-name": ...}``;
        ``name`` is positional-only, so QMP's own ``name=`` argument passes through."""
        with self._lock:
            return self._monitor().cmd(name, **args)

    def hmp(self, command_line: str) -> str:
        return str(self.cmd("human-monitor-command", **{"command-line": command_line}))

    def _qemu_io(self, index: int, command: str) -> str:
        """HMP ``qemu-io drive<index> "<command>"``; the HMP reply plus what qemu-io printed to
        QEMU's stdout meanwhile (it prints there, not into the reply)."""
        if not 0 <= index < len(self.disks):
            raise IndexError(f"no disk {index}")
        with self._lock:
            start = self.log.stat().st_size
            reply = self.hmp(f'qemu-io drive{index} "{command}"')
            with open(self.log, "rb") as log:
                log.seek(start)
                printed = log.read().decode(errors="replace")
        return reply + printed

    def write(self, index: int, offset: int, length: int, pattern: int) -> None:
        """Guest write: ``length`` bytes of ``pattern`` at ``offset`` of disk ``index``."""
        if not 0 <= pattern <= 0xFF:
            raise ValueError("pattern is one byte")
        text = self._qemu_io(index, f"write -P {pattern} {offset} {length}")
        if f"wrote {length}/{length} bytes at offset {offset}" not in text:
            raise QemuError(f"qemu-io write on drive{index} failed: {text.strip()}")

    def reads(self, index: int, offset: int, length: int, pattern: int) -> bool:
        """Guest read: whether ``length`` bytes at ``offset`` of disk ``index`` are all ``pattern``
        (qemu-io ``read -P``); QemuError when the read itself fails."""
        text = self._qemu_io(index, f"read -P {pattern} {offset} {length}")
        if "Pattern verification failed" in text:
            return False
        if f"read {length}/{length} bytes at offset {offset}" in text:
            return True
        raise QemuError(f"qemu-io read on drive{index} failed: {text.strip()}")

    def discard(self, index: int, offset: int, length: int) -> None:
        """Guest discard. qcow2 drops whole clusters only (64 KiB by default): the parts of
        the range that do not cover a whole cluster keep their data. Use aligned ranges."""
        text = self._qemu_io(index, f"discard {offset} {length}")
        if f"discard {length}/{length} bytes at offset {offset}" not in text:
            raise QemuError(f"qemu-io discard on drive{index} failed: {text.strip()}")

    def flush(self, index: int) -> None:
        text = self._qemu_io(index, "flush")
        if text.strip():  # qemu-io's flush prints nothing on success
            raise QemuError(f"qemu-io flush on drive{index} failed: {text.strip()}")

    def read_disk(self, index: int) -> bytes:
        """Disk ``index``'s guest-visible content now (see the class docstring for how)."""
        if not 0 <= index < len(self.disks):
            raise IndexError(f"no disk {index}")
        with self._lock:
            if self.running:
                self.flush(index)
            out = self.folder / f".read-disk{index}-{uuid.uuid4().hex}.raw"
            convert = ["qemu-img", "convert", "-U", "-f", self.formats[index], "-O", "raw"]
            try:
                subprocess.run([*convert, str(self.disks[index]), str(out)], check=True, capture_output=True)
                return out.read_bytes()
            finally:
                out.unlink(missing_ok=True)

    def node_names(self) -> list[str]:
        return [str(node["node-name"]) for node in self.cmd("query-named-block-nodes", flat=True)]

    def block_jobs(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.cmd("query-block-jobs"))

    def exports(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.cmd("query-block-exports"))

    def bitmaps(self, index: int) -> list[dict[str, Any]]:
        """The dirty bitmaps of node ``disk<index>`` (name, recording, persistent, busy,
        granularity, count), found by node name: a backup job's filter may sit above it."""
        for node in self.cmd("query-named-block-nodes", flat=True):
            if node["node-name"] == f"disk{index}":
                return cast(list[dict[str, Any]], node.get("dirty-bitmaps", []))
        raise QemuError(f"no block node disk{index}")


class VmFactory(Protocol):
    def __call__(self, disks: list[Path], formats: list[str] | None = None) -> QemuVm: ...


@pytest.fixture
def qemu_vm(tmp_path: Path) -> Iterator[VmFactory]:
    vms: list[QemuVm] = []

    def make(disks: list[Path], formats: list[str] | None = None) -> QemuVm:
        vm = QemuVm(tmp_path / f"vm{len(vms)}", disks, formats)
        vms.append(vm)
        return vm.start()

    yield make
    for vm in vms:
        try:
            vm.stop()
        except Exception:  # noqa: BLE001 - stop the others regardless
            vm.kill()


# --- guest agent ------------------------------------------------------------------------------

HOST_UNSAFE_RPCS = (
    # Would act on this host despite the chroot: the clock, and paths (/proc/<pid>/root/...).
    "guest-set-time",
    "guest-file-open",
    "guest-exec",
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
    "guest-set-user-password",
    "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys",
)
FREEZE_RPCS = ("guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list")
AGENT_MOUNT_TYPES = frozenset({"tmpfs", "proc"})

# Runs as: unshare --mount --propagation private sh -c SCRIPT sh ROOT FILE... -- QEMU-GA ARGS...
# In the new mount namespace: a tmpfs on ROOT, the files copied in at their own paths, /proc
# (pid directories only where the kernel can, read-only), then chroot and exec qemu-ga: the pid
# stays the same through unshare, sh, chroot and qemu-ga.
_AGENT_SCRIPT = r"""
set -eu
root=$1; shift
mount -t tmpfs -o size=64m,mode=0755 blockvault-qga "$root"
mkdir -p "$root/proc" "$root/run"
while [ "$1" != -- ]; do mkdir -p "$root${1%/*}"; cp -L "$1" "$root$1"; shift; done
shift
mount -t proc -o ro,nosuid,nodev,noexec,subset=pid proc "$root/proc" 2>/dev/null \
  || mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
exec chroot "$root" "$@"
"""


class UnsafeAgentError(AssertionError):
    """qemu-ga could see a filesystem it might freeze: it has been stopped; the test fails."""


def check_agent_mounts(mountinfo: str) -> None:
    """Raise :class:`UnsafeAgentError` unless every mount listed is device major 0 and a tmpfs
    or proc (qemu-ga freezes what is not major 0, and btrfs, which reports major 0)."""
    lines = [line for line in mountinfo.splitlines() if line.strip()]
    if not lines:
        raise UnsafeAgentError("qemu-ga's mountinfo lists no mounts")
    for line in lines:
        fields = line.split()
        major = fields[2].split(":")[0]
        fstype = fields[fields.index("-") + 1] if "-" in fields else "?"
        if major != "0" or fstype not in AGENT_MOUNT_TYPES:
            raise UnsafeAgentError(f"qemu-ga can see a mount it might freeze: {line}")


def _find_qemu_ga() -> str:
    for candidate in (shutil.which("qemu-ga"), "/usr/sbin/qemu-ga", "/usr/bin/qemu-ga"):
        if candidate and os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    raise QemuError(f"qemu-ga is missing: {ENSURE}")


def _shared_libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    if "not found" in out:
        raise QemuError(f"ldd {binary}: {out}")
    return sorted(set(re.findall(r"(/\S+) \(0x", out)))


class _Relay:
    """A UNIX socket at ``path`` whose every connection is joined, byte for byte both ways, to
    the socket ``target``: the chrooted agent's socket (only reachable as
    ``/proc/<pid>/root/qga.sock``) as a real socket file in the test's folder, where
    blockvault's socket-folder check finds it inside the folder (a symlink into ``/proc``
    resolves outside any folder, and blockvault refuses it)."""

    def __init__(self, path: Path, target: str) -> None:
        self.path, self.target = path, target
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        threading.Thread(target=self._serve, daemon=True, name="qga-relay").start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.target)
            except OSError:
                client.close()
                upstream.close()
                continue
            ends = [2]
            lock = threading.Lock()
            for source, sink in ((client, upstream), (upstream, client)):
                args = (source, sink, ends, lock, (client, upstream))
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    @staticmethod
    def _pump(
        source: socket.socket,
        sink: socket.socket,
        ends: list[int],
        lock: threading.Lock,
        both: tuple[socket.socket, socket.socket],
    ) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
            with lock:
                ends[0] -= 1
                last = ends[0] == 0
            if last:
                for sock in both:
                    sock.close()

    def close(self) -> None:
        self.server.close()
        self.path.unlink(missing_ok=True)


class GuestAgent:
    """A real ``qemu-ga`` listening on a unix socket, unable to freeze this host's filesystems.

    A qemu-ga on the host would freeze the host's own filesystems on ``guest-fsfreeze-freeze``.
    This one runs in a private mount namespace (``unshare --mount --propagation private``),
    chrooted into a fresh tmpfs holding only the qemu-ga binary, the libraries ``ldd`` lists and
    ``/proc``. Linux lists only the mounts under a process's root in its mountinfo, so qemu-ga
    sees the tmpfs and /proc (device major 0, which it skips): ``guest-fsfreeze-freeze``
    returns 0, and because nothing was frozen qemu-ga 7.2 resets its state at once:
    ``guest-fsfreeze-status`` stays ``"thawed"`` (never ``"frozen"``). Before anyone gets the
    socket path, ``/proc/<pid>/mountinfo`` is checked (:func:`check_agent_mounts`); a failed
    check kills qemu-ga and raises :class:`UnsafeAgentError`.

    The RPCs in :data:`HOST_UNSAFE_RPCS` are disabled (qemu-ga ``--block-rpcs``): as root,
    setting the clock or opening ``/proc/<pid>/root/...`` would reach the host. blockvault uses
    guest-sync-delimited and guest-fsfreeze-freeze/-thaw/-status. ``block_freeze=True`` also
    disables guest-fsfreeze-freeze and -freeze-list: they answer
    ``{"error": {"class": "CommandNotFound", "desc": "Command guest-fsfreeze-freeze has been
    disabled"}}``.

    ``socket_path`` is ``<folder>/qga.sock``, a socket relayed to ``/proc/<pid>/root/qga.sock``
    (``proc_socket_path``, see :class:`_Relay`); it is gone while the agent is stopped and back
    at the same path after ``start()``. qemu-ga serves one client at a time; others wait until
    it hangs up.
    """

    def __init__(self, folder: Path, *, block_freeze: bool = False) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.block_freeze = block_freeze
        self.root = self.folder / "chroot"
        self.log = self.folder / "qemu-ga.log"
        self.link = self.folder / "qga.sock"
        _check_socket_path(self.link)
        self.proc: subprocess.Popen[bytes] | None = None
        self._checked = False
        self._relay: _Relay | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def proc_socket_path(self) -> str:
        if not self._checked or self.proc is None:
            raise QemuError("the guest agent is not started")
        return f"/proc/{self.proc.pid}/root/qga.sock"

    @property
    def socket_path(self) -> str:
        if not self._checked:
            raise QemuError("the guest agent is not started")
        return str(self.link)

    def blocked_rpcs(self) -> list[str]:
        return [*HOST_UNSAFE_RPCS, *(FREEZE_RPCS if self.block_freeze else ())]

    def start(self) -> GuestAgent:
        if self.running:
            raise QemuError("qemu-ga is already running")
        if shutil.which("unshare") is None or shutil.which("chroot") is None:
            raise QemuError("unshare and chroot (util-linux, coreutils) are needed")
        binary = _find_qemu_ga()
        self._checked = False
        self.link.unlink(missing_ok=True)
        self.root.mkdir(exist_ok=True)
        qga = [binary, "-m", "unix-listen", "-p", "/qga.sock", "-t", "/run", "-f", "/run/qemu-ga.pid"]
        qga += ["--block-rpcs", ",".join(self.blocked_rpcs())]
        args = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _AGENT_SCRIPT, "sh", str(self.root)]
        args += [binary, *_shared_libraries(binary), "--", *qga]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_listening()
            mountinfo = Path(f"/proc/{self.proc.pid}/mountinfo").read_text()
            check_agent_mounts(mountinfo)
        except BaseException:
            self.kill()
            raise
        self._checked = True
        self._relay = _Relay(self.link, f"/proc/{self.proc.pid}/root/qga.sock")
        return self

    def _close_relay(self) -> None:
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        self.link.unlink(missing_ok=True)

    def _wait_listening(self) -> None:
        assert self.proc is not None
        pid = self.proc.pid
        host_root = os.stat("/").st_dev
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.proc.poll() is not None:
                raise QemuError(f"qemu-ga exited {self.proc.returncode} while starting:\n{_log_tail(self.log)}")
            if time.monotonic() > deadline:
                raise QemuError(f"qemu-ga did not listen in {START_SECONDS:g} s:\n{_log_tail(self.log)}")
            with contextlib.suppress(OSError):
                root_dev = os.stat(f"/proc/{pid}/root").st_dev
                # chrooted (its root is a major-0 fs, not ours) and qemu-ga, not sh or chroot
                if root_dev != host_root and os.major(root_dev) == 0 and self._is_qemu_ga(pid):
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                        sock.settimeout(2.0)
                        sock.connect(f"/proc/{pid}/root/qga.sock")
                    return
            time.sleep(0.02)

    @staticmethod
    def _is_qemu_ga(pid: int) -> bool:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "qemu-ga"

    def kill(self) -> None:
        self._checked = False
        self._close_relay()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM (qemu-ga thaws and exits), SIGKILL after 10 s."""
        self._checked = False
        self._close_relay()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> GuestAgent:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def execute(self, name: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """One agent command on a fresh connection (synchronised first with
        ``guest-sync-delimited``); the whole reply: ``{"return": ...}`` or ``{"error": ...}``."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
            reader = sock.makefile("rb")
            token = int.from_bytes(os.urandom(4), "big") >> 1
            sock.sendall(json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode() + b"\n")
            while True:  # the answer follows a 0xFF byte; anything before it is stale
                line = reader.readline()
                if not line:
                    raise QemuError("qemu-ga closed the connection")
                with contextlib.suppress(ValueError):
                    if json.loads(line.rsplit(b"\xff", 1)[-1]).get("return") == token:
                        break
            message: dict[str, Any] = {"execute": name}
            if arguments:
                message["arguments"] = arguments
            sock.sendall(json.dumps(message).encode() + b"\n")
            line = reader.readline()
            if not line:
                raise QemuError(f"qemu-ga closed the connection after {name}")
            return cast(dict[str, Any], json.loads(line))


@pytest.fixture
def guest_agent(tmp_path: Path) -> Iterator[GuestAgent]:
    with GuestAgent(tmp_path / "agent") as agent:
        yield agent
