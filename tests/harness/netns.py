"""Several hosts on one machine: Linux network namespaces, each linked to the root namespace.

Used by the multi-host suite (``tests/multihost``) and ``tests/bench/multihost_throughput.py``;
needs root and iproute2. What one :class:`Network` builds::

    root namespace                                   namespace bv<pid>h<n>
    127.0.0.1:5432 PostgreSQL, 127.0.0.1:6379 Redis
    tcp-proxy.py on 10.K.O.1:5432 -> 127.0.0.1:5432
    tcp-proxy.py on 10.K.O.1:6379 -> 127.0.0.1:6379
    bv<pid>h<n>r 10.K.O.1/24  <==== veth ====>  bv<pid>h<n>p 10.K.O.2/24, lo up,
                                                 10.0.0.0/8 via 10.K.O.1 (no default route)

* Names carry the pid of the process that made them (``bv<pid>h<n>``, ``n`` counts up in that
  process), so leftovers of a killed run are recognised: :func:`cleanup_leftovers` removes
  every namespace and link whose pid is dead, kills the processes still inside those
  namespaces (``ip netns pids``) and the processes its state file
  (``$TMPDIR/blockvault-netns/bv<pid>.json``) lists: forwarders, relays, and what the caller
  started in the root namespace and recorded with :func:`track` (the suite's API and Flower).
* ``K`` is one second octet per process, held with a lock file and checked unused (no address
  or route in ``10.K.0.0/16``); ``O`` is ``n`` folded into 1..250.
* PostgreSQL and Redis listen on 127.0.0.1 only: :meth:`Namespace.reach` rewrites such a URL to
  a forwarder (``tests/harness/tcp-proxy.py``, one per link and service, counting bytes) bound
  to the link's root-side address, so each host's traffic to them crosses its own link.
* The root-side end of each link forwards IP (``net.ipv4.conf.<link>.forwarding=1``, on our
  links only: the global ``ip_forward`` is left alone), so namespaces reach each other through
  the root namespace: a worker in one reaches a storage-server in another directly.
* :meth:`Namespace.cut` sets the root-side end down (the namespace keeps its address and its
  processes run on, unreachable); :meth:`Namespace.restore` sets it up again.
* A ``shaped`` link is a veth shaped with ``tc qdisc ... netem`` on both ends when the kernel
  has netem (:func:`netem_available`); where it has not (``CONFIG_NET_SCH_NETEM`` unset and no
  module), the link is two TUN devices with ``tests/harness/netem_relay.py`` between them,
  which delays, jitters and drops the packets in user space: a lost packet is really lost.
* A process runs inside with ``ip netns exec <ns> ...``: :attr:`Namespace.python` is a wrapper
  script (``exec ip netns exec <ns> <python> "$@"``) that code spawning ``sys.executable`` is
  given in its place (:meth:`Namespace.running_python`, one thread at a time); the pid stays
  the same throughout (``sh`` and ``ip netns exec`` exec), so signals and ``killpg`` reach it.
  No DNS inside: a namespace has no route to a resolver (lookups fail at once), so use
  addresses.
* :meth:`Network.close` kills whatever still runs inside, the forwarders and relays, deletes
  every link (its qdiscs go with it) and namespace, and checks that none is left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from unittest import mock
from urllib.parse import urlsplit, urlunsplit

from tests.ports import bindable, free_port

HERE = Path(__file__).resolve().parent
TCP_PROXY = HERE / "tcp-proxy.py"
RELAY = HERE / "netem_relay.py"
STATE_DIR = Path(tempfile.gettempdir()) / "blockvault-netns"
NAME = re.compile(r"^bv(\d+)h(\d+)([rp]?)$")
LOCAL = frozenset({"127.0.0.1", "localhost"})
START_SECONDS = 20.0
# The interpreter of the root namespace. ``Namespace.running_python`` points ``sys.executable``
# at a namespace's wrapper, process-wide, while one thread spawns into that namespace: helpers
# this module starts (forwarders, relays) and the wrappers it writes use this one instead, or a
# forwarder started by another thread meanwhile would run inside the wrong namespace, where its
# address does not exist ("cannot assign requested address").
PYTHON = sys.executable
# A namespace's one route out: to the other links and the forwarders, never off the machine
# (no default route: the root namespace would forward it out of its own uplink).
INSIDE_ROUTE = "10.0.0.0/8"


class NetnsError(RuntimeError):
    """The harness cannot build (or remove) what it was asked to."""


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise NetnsError(f"`{name}` is missing: the multi-host harness needs iproute2 ({name})")
    return found


def sh(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``args`` (``ip``/``tc``/...), inside namespace ``ns`` when given; a failure raises
    :class:`NetnsError` with the command and its stderr."""
    command = [_tool(args[0]), *args[1:]]
    if ns:
        command = [_tool("ip"), "netns", "exec", ns, *command]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise NetnsError(f"`{' '.join(command)}` exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_and_reap(pid: int, proc: subprocess.Popen[Any] | None = None) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


# -- what this machine allows --------------------------------------------------------------------------
SPAWN_LOCK = threading.RLock()  # held while sys.executable names a namespace's wrapper


class _Held:
    """What this process found out or holds: netem's probe, its subnet, its name counter."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.netem: tuple[bool, str] | None = None
        self.subnet: tuple[int, TextIO] | None = None
        self.counter = 0


_HELD = _Held()


def preflight() -> None:
    """Raise :class:`NetnsError` saying why when namespaces and veth links cannot be made here."""
    if os.geteuid() != 0:
        raise NetnsError(f"the multi-host harness needs root (euid is {os.geteuid()}): it runs `ip netns add`")
    _tool("ip")
    _tool("tc")
    probe = f"bv{os.getpid()}h0"
    try:
        made = sh("ip", "netns", "add", probe, check=False)
        if made.returncode != 0:
            raise NetnsError(
                f"`ip netns add` is not permitted here ({made.stderr.strip()}): the multi-host suite needs "
                "root with CAP_SYS_ADMIN and CAP_NET_ADMIN (a privileged container or a VM)"
            )
        veth = sh("ip", "link", "add", f"{probe}r", "type", "veth", "peer", "name", f"{probe}p", check=False)
        if veth.returncode != 0:
            raise NetnsError(f"cannot create a veth pair ({veth.stderr.strip()}): the kernel needs CONFIG_VETH")
    finally:
        sh("ip", "link", "del", f"{probe}r", check=False)
        sh("ip", "netns", "del", probe, check=False)


def netem_available() -> tuple[bool, str]:
    """(True, "") when ``tc qdisc add ... netem`` works on a veth here, else (False, why)."""
    with _HELD.lock:
        if _HELD.netem is None:
            probe = f"bv{os.getpid()}h0"
            try:
                sh("ip", "link", "add", f"{probe}r", "type", "veth", "peer", "name", f"{probe}p")
                added = sh("tc", "qdisc", "add", "dev", f"{probe}r", "root", "netem", "delay", "1ms", check=False)
                why = "" if added.returncode == 0 else added.stderr.strip() or f"tc exited {added.returncode}"
                _HELD.netem = (added.returncode == 0, why)
            finally:
                sh("ip", "link", "del", f"{probe}r", check=False)
        return _HELD.netem


# -- state of this process, for the cleanup of a killed run ---------------------------------------------
class _State:
    """``$TMPDIR/blockvault-netns/bv<pid>.json``: the helper processes this process started."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pids: dict[int, str] = {}

    @property
    def path(self) -> Path:
        return STATE_DIR / f"bv{os.getpid()}.json"

    def _write(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        if self.pids:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"owner": os.getpid(), "pids": self.pids}))
            tmp.replace(self.path)
        else:
            self.path.unlink(missing_ok=True)

    def add(self, pid: int, marker: str) -> None:
        with self.lock:
            self.pids[pid] = marker
            self._write()

    def remove(self, pid: int) -> None:
        with self.lock:
            self.pids.pop(pid, None)
            self._write()


_STATE = _State()


def track(pid: int, marker: str) -> None:
    """Record a process this run started outside any namespace (``marker``: a piece of its
    command line), so that :func:`cleanup_leftovers` kills it if this run is killed."""
    _STATE.add(pid, marker)


def untrack(pid: int) -> None:
    _STATE.remove(pid)


def _owner_gone(pid: int) -> bool:
    # At the start of a session nothing of this process exists yet: names with its own pid are
    # leftovers of an earlier process that had the same pid.
    return not _alive(pid) or (pid == os.getpid() and not _CREATED)


_CREATED: set[str] = set()  # names this process made and has not removed


def cleanup_leftovers() -> list[str]:
    """Remove what killed runs left: namespaces and links named ``bv<pid>h<n>[r|p]`` whose
    process is gone (and the processes still running inside those namespaces), and the helper
    processes in their state files. Returns what it removed."""
    removed: list[str] = []
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    for state in STATE_DIR.glob("bv*.json"):
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        if not _owner_gone(int(data.get("owner", 0))):
            continue
        for pid_text, marker in data.get("pids", {}).items():
            pid = int(pid_text)
            if _alive(pid) and marker in _cmdline(pid):  # the same process, not a reused pid
                _kill_and_reap(pid)
                removed.append(f"process {pid} ({marker})")
        state.unlink(missing_ok=True)
    for line in sh("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = NAME.match(name)
        if match and not match.group(3) and _owner_gone(int(match.group(1))):
            pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
            for inside in pids:
                _kill_and_reap(int(inside))
            sh("ip", "netns", "del", name, check=False)
            removed.append(f"namespace {name}" + (f" (killed {len(pids)} processes inside)" if pids else ""))
    for line in sh("ip", "-o", "link", "show").stdout.splitlines():
        parts = line.split(":", 2)
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        match = NAME.match(name)
        if match and match.group(3) and _owner_gone(int(match.group(1))):
            sh("ip", "link", "del", name, check=False)
            removed.append(f"link {name}")
    return removed


# -- one second octet per process ----------------------------------------------------------------------
def _octet() -> int:
    """The second octet K of this process's 10.K.0.0/16, held (lock file) until it exits."""
    with _HELD.lock:
        if _HELD.subnet is None:
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            used = sh("ip", "-4", "-o", "addr", "show").stdout + sh("ip", "-4", "route", "show", "table", "all").stdout
            start = 100 + os.getpid() % 100
            for k in [*range(start, 200), *range(100, start)]:
                if re.search(rf"\b10\.{k}\.", used):
                    continue
                handle = open(STATE_DIR / f"subnet-10.{k}.lock", "w")  # noqa: SIM115 - held for the process
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    handle.close()
                    continue
                _HELD.subnet = (k, handle)
                break
            else:
                raise NetnsError("no free 10.K.0.0/16 (K in 100..199) for the namespaces' links")
        return _HELD.subnet[0]


def _next_index() -> int:
    with _HELD.lock:
        _HELD.counter += 1
        return _HELD.counter


# -- the pieces ----------------------------------------------------------------------------------------
@dataclass
class Forwarder:
    """One ``tcp-proxy.py`` in the root namespace: ``listen`` -> ``target``, counting bytes."""

    listen: tuple[str, int]
    target: tuple[str, int]
    control_port: int
    proc: subprocess.Popen[bytes]

    def stats(self) -> dict[str, int]:
        """``{"in": client->server bytes, "out": server->client bytes, "connections": n}``."""
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=10) as conn:
            conn.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        counters: dict[str, int] = json.loads(data.split(b"\r\n\r\n", 1)[1])
        return counters

    def stop(self) -> None:
        _kill_and_reap(self.proc.pid, self.proc)
        _STATE.remove(self.proc.pid)


@dataclass
class Namespace:
    """A host: a network namespace, its link to the root namespace and its forwarders."""

    network: Network
    name: str
    root_ip: str
    ip: str
    shaped: bool = False
    shaper: str = ""  # "netem" or "relay" for a shaped link
    python: Path = field(default_factory=Path)
    forwarders: dict[tuple[str, int], Forwarder] = field(default_factory=dict)
    relay: subprocess.Popen[bytes] | None = None
    relay_control: Path | None = None

    @property
    def root_end(self) -> str:
        return f"{self.name}r"

    @property
    def ns_end(self) -> str:
        return f"{self.name}p"

    def exec_prefix(self) -> list[str]:
        return [_tool("ip"), "netns", "exec", self.name]

    @contextlib.contextmanager
    def running_python(self) -> Iterator[None]:
        """Inside the block, ``sys.executable`` is :attr:`python`: code that spawns
        ``[sys.executable, ...]`` (``Stack.spawn``, ``StorageServer.start``) starts it in here.
        The change is process-wide: blocks of all threads take turns (:data:`SPAWN_LOCK`), and
        code spawning in the root namespace meanwhile should hold that lock too."""
        with SPAWN_LOCK, mock.patch.object(sys, "executable", str(self.python)):
            yield

    # -- reaching the root namespace's loopback services --------------------------------------
    def forward(self, host: str, port: int) -> Forwarder:
        """The forwarder from this link's root-side address to ``host:port`` (started once)."""
        key = (host, port)
        if key not in self.forwarders:
            self.forwarders[key] = self.network._start_forwarder(self, host, port)
        return self.forwarders[key]

    def reach(self, url: str) -> str:
        """``url`` as seen from inside: a 127.0.0.1 host:port becomes a forwarder's."""
        parts = urlsplit(url)
        if parts.hostname not in LOCAL:
            return url
        default = {"postgresql": 5432, "redis": 6379, "http": 80}
        port = parts.port or default.get(parts.scheme.split("+")[0], 0)
        forwarder = self.forward("127.0.0.1", port)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"{forwarder.listen[0]}:{forwarder.listen[1]}"
        return urlunsplit(parts._replace(netloc=netloc))

    # -- faults ---------------------------------------------------------------------------------
    def cut(self) -> None:
        """The link goes down on the root side: nothing reaches this host, nor leaves it."""
        sh("ip", "link", "set", self.root_end, "down")

    def restore(self) -> None:
        sh("ip", "link", "set", self.root_end, "up")  # its routes come back with it

    def shape(self, delay_ms: float, jitter_ms: float, loss_percent: float) -> None:
        """Both directions: ``netem delay <delay_ms>ms <jitter_ms>ms loss <loss_percent>%``."""
        assert self.shaped, f"{self.name}: only a link made with shaped=True can be shaped"
        if self.shaper == "netem":
            spec = ["netem", "delay", f"{delay_ms}ms", f"{jitter_ms}ms", "loss", f"{loss_percent}%"]
            sh("tc", "qdisc", "replace", "dev", self.root_end, "root", *spec)
            sh("tc", "qdisc", "replace", "dev", self.ns_end, "root", *spec, ns=self.name)
        else:
            one = {"delay_ms": delay_ms, "jitter_ms": jitter_ms, "loss": loss_percent / 100}
            self._relay({"set": {"out": one, "in": one}})

    def unshape(self) -> None:
        if self.shaper == "netem":
            sh("tc", "qdisc", "del", "dev", self.root_end, "root", check=False)
            sh("tc", "qdisc", "del", "dev", self.ns_end, "root", ns=self.name, check=False)
        elif self.shaper == "relay":
            self._relay({"set": {"out": {}, "in": {}}})

    def shaping_stats(self) -> dict[str, dict[str, int]]:
        """Per direction (``out``: root -> namespace, ``in``: back), ``packets`` and ``dropped``
        by the shaping (netem's counters, or the relay's)."""
        if self.shaper == "relay":
            return {k: {"packets": v["packets"], "dropped": v["dropped"]} for k, v in self._relay({}).items()}
        stats: dict[str, dict[str, int]] = {}
        for key, dev, ns in (("out", self.root_end, None), ("in", self.ns_end, self.name)):
            shown = json.loads(sh("tc", "-s", "-j", "qdisc", "show", "dev", dev, ns=ns).stdout or "[]")
            netem: dict[str, Any] = next((q for q in shown if q.get("kind") == "netem"), {})
            stats[key] = {"packets": int(netem.get("packets", 0)), "dropped": int(netem.get("drops", 0))}
        return stats

    def _relay(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.relay_control is not None
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(10)
            conn.connect(str(self.relay_control))
            conn.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        answer: dict[str, Any] = json.loads(data)
        return answer


class Network:
    """The namespaces of one test (or benchmark run); :meth:`close` removes all of them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.k = _octet()
        self.namespaces: list[Namespace] = []

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, *, shaped: bool = False) -> Namespace:
        """A new namespace linked to the root namespace (a link :meth:`Namespace.shape` can
        shape when ``shaped``)."""
        n = _next_index()
        name = f"bv{os.getpid()}h{n}"
        octet = (n - 1) % 250 + 1
        ns = Namespace(self, name, f"10.{self.k}.{octet}.1", f"10.{self.k}.{octet}.2", shaped=shaped)
        self.namespaces.append(ns)
        _CREATED.add(name)
        sh("ip", "netns", "add", name)
        if shaped and not netem_available()[0]:
            ns.shaper = "relay"
            self._relay_link(ns)
        else:
            ns.shaper = "netem" if shaped else ""
            sh("ip", "link", "add", ns.root_end, "type", "veth", "peer", "name", ns.ns_end, "netns", name)
            sh("ip", "addr", "add", f"{ns.root_ip}/24", "dev", ns.root_end)
            sh("ip", "addr", "add", f"{ns.ip}/24", "dev", ns.ns_end, ns=name)
            sh("ip", "link", "set", ns.root_end, "up")
            sh("ip", "link", "set", ns.ns_end, "up", ns=name)
            sh("ip", "route", "add", INSIDE_ROUTE, "via", ns.root_ip, ns=name)
        sh("ip", "link", "set", "lo", "up", ns=name)
        Path(f"/proc/sys/net/ipv4/conf/{ns.root_end}/forwarding").write_text("1\n")
        ns.python = self.workdir / f"{name}-python"
        ns.python.write_text(f'#!/bin/sh\nexec {_tool("ip")} netns exec {name} {PYTHON} "$@"\n')
        ns.python.chmod(0o755)
        return ns

    def _relay_link(self, ns: Namespace) -> None:
        ns.relay_control = self.workdir / f"{ns.name}-relay.sock"
        ns.relay_control.unlink(missing_ok=True)
        args = [PYTHON, str(RELAY), "--outer", ns.root_end, "--inner", ns.ns_end]
        log = open(self.workdir / f"{ns.name}-relay.log", "ab")  # noqa: SIM115 - the child holds it
        with log:
            ns.relay = subprocess.Popen(
                [*args, "--control", str(ns.relay_control)],
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        _STATE.add(ns.relay.pid, f"--outer {ns.root_end} ")
        assert ns.relay.stdout is not None
        if ns.relay.stdout.readline().strip() != b"ready":
            raise NetnsError(
                f"netem_relay.py for {ns.name} did not start: "
                + (self.workdir / f"{ns.name}-relay.log").read_text(errors="replace")[-2000:]
            )
        ns.relay.stdout.close()
        sh("ip", "link", "set", ns.ns_end, "netns", ns.name)
        sh("ip", "addr", "add", ns.root_ip, "peer", ns.ip, "dev", ns.root_end)
        sh("ip", "addr", "add", ns.ip, "peer", ns.root_ip, "dev", ns.ns_end, ns=ns.name)
        sh("ip", "link", "set", ns.root_end, "up")
        sh("ip", "link", "set", ns.ns_end, "up", ns=ns.name)
        sh("ip", "route", "add", INSIDE_ROUTE, "dev", ns.ns_end, ns=ns.name)

    def _start_forwarder(self, ns: Namespace, host: str, port: int) -> Forwarder:
        listen_port = port if bindable(ns.root_ip, port) else free_port(ns.root_ip)
        control = free_port("127.0.0.1")
        listen = f"{ns.root_ip}:{listen_port}"
        command = [PYTHON, str(TCP_PROXY), "--listen", listen, "--target", f"{host}:{port}"]
        log = open(self.workdir / f"{ns.name}-proxy-{port}.log", "ab")  # noqa: SIM115 - the child holds it
        with log:
            proc = subprocess.Popen(
                [*command, "--control", f"127.0.0.1:{control}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _STATE.add(proc.pid, f"--listen {listen} ")
        forwarder = Forwarder((ns.root_ip, listen_port), (host, port), control, proc)
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                forwarder.stats()
                with socket.create_connection(forwarder.listen, timeout=2):
                    pass
                return forwarder
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    forwarder.stop()
                    raise NetnsError(
                        f"tcp-proxy.py {listen} -> {host}:{port} did not start: "
                        + (self.workdir / f"{ns.name}-proxy-{port}.log").read_text(errors="replace")[-2000:]
                    ) from None
                time.sleep(0.05)

    def close(self) -> None:
        """Remove every namespace of this network, whatever state it is in; raise at the end
        if anything could not be removed."""
        errors: list[str] = []
        for ns in reversed(self.namespaces):
            try:
                for pid in sh("ip", "netns", "pids", ns.name, check=False).stdout.split():
                    _kill_and_reap(int(pid))  # started in there by this run (Stack stops its own first)
                for forwarder in ns.forwarders.values():
                    forwarder.stop()
                if ns.relay is not None:
                    _kill_and_reap(ns.relay.pid, ns.relay)
                    _STATE.remove(ns.relay.pid)
                sh("ip", "link", "del", ns.root_end, check=False)  # the peer and both qdiscs go with it
                sh("ip", "netns", "del", ns.name, check=False)
                ns.python.unlink(missing_ok=True)
                _CREATED.discard(ns.name)
            except Exception as exc:  # noqa: BLE001 - reported below, after trying every namespace
                errors.append(f"{ns.name}: {exc}")
        names = {ns.name for ns in self.namespaces}
        self.namespaces.clear()
        deadline = time.monotonic() + 10
        while True:  # a namespace's links go asynchronously once its last process is gone
            left = [n for n in _our_names() if _base(n) in names]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if left:
            errors.append("still present: " + ", ".join(sorted(left)))
        if errors:
            raise NetnsError("could not remove the test namespaces: " + "; ".join(errors))


def _base(name: str) -> str:
    match = NAME.match(name)
    return f"bv{match.group(1)}h{match.group(2)}" if match else name


def _our_names() -> list[str]:
    names = [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.split()]
    for line in sh("ip", "-o", "link", "show").stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1:
            names.append(parts[1].strip().split("@")[0])
    return [n for n in names if NAME.match(n)]
