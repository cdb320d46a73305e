"""The soak's site pieces (``tests/bench/soak.py``): where its hosts run and its Running VM.

* Hosts in network namespaces (the multi-host harness, ``tests/harness/netns.py`` and
  ``tests/multihost/conftest.py``, reused as is): each host's worker in a namespace of its own,
  reaching PostgreSQL and Redis through forwarders on its link; the remote storage-server in a
  namespace of its own; the S3 endpoint (moto, on 127.0.0.1 in the root namespace) behind a
  forwarder on the root-side address of a namespace that is never cut, so every host reaches
  it. Where namespaces cannot be made (not root, no iproute2, no veth), everything runs in the
  root namespace and the summary says why (``hosts``: ``"root: <why>"``).
* The fault ``link_cut``: a host's or the storage-server's link taken down on the root side
  for 5-20 s, then up again (``Namespace.cut``/``restore``, as the multi-host test
  ``test_a_host_cut_off_turns_disconnected_while_the_others_go_on_and_it_comes_back`` does).
  Only where namespaces exist.
* A Running VM: a QEMU without a guest (``tests/qemu_fixtures.QemuVm``) with one qcow2 disk,
  registered as a Running VM of the first host with its QMP socket; its volume is a target of
  the soak's job group, so it is backed up live (shared/repository/live.py) on every fire.
  A thread writes to it through QMP (HMP ``qemu-io``). The fault ``kill_qemu``: SIGKILL of
  QEMU, restarted 1-5 s later (as ``test_worker_or_qemu_killed_mid_backup_leaves_no_ready_
  backup_and_the_next_one_is_right`` does at a chosen point); a live backup under way fails
  (``VM_MONITOR_ERROR``), the next ones work.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from pathlib import Path
from typing import Any

from api.client import Client
from tests.conftest import MiB
from tests.harness import netns
from tests.harness.netns import Namespace, Network
from tests.multihost.conftest import HostsStack, NsStorageServer, worker_name
from tests.qemu_fixtures import QemuError, QemuVm, make_qcow2
from tests.s3_fixtures import S3Server
from tests.service.conftest import Stack
from tests.storage_server_fixtures import StorageServer

VM_DISK_SIZE = 16 * MiB
WRITE = 64 * 1024


class Site:
    """Where the soak's processes run, its link cuts and its Running VM."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.network: Network | None = None
        self.why_root = ""
        self.links: dict[str, Namespace] = {}  # what a link_cut may cut: "host <uuid8>", "storage-server"
        self.storage_ns: Namespace | None = None
        self.services_ns: Namespace | None = None  # never cut: forwarders every host reaches
        self.vm: QemuVm | None = None
        self.vm_folder: Path | None = None
        self.vm_volume: dict[str, Any] | None = None
        self.vm_lock = threading.Lock()
        self.vm_writes = 0
        try:
            netns.cleanup_leftovers()
            netns.preflight()
            self.network = Network(data / "net")
        except netns.NetnsError as exc:
            self.why_root = str(exc)

    @property
    def hosts_in(self) -> str:
        return "netns" if self.network is not None else f"root: {self.why_root}"

    def faults(self) -> tuple[str, ...]:
        """The fault kinds this site adds to the soak's."""
        return ("link_cut", "kill_qemu") if self.network is not None else ("kill_qemu",)

    # -- processes ---------------------------------------------------------------------------------
    def stack(self, data: Path, database_url: str, redis_url: str, hosts: list[str]) -> Stack:
        """The soak's Stack: with namespaces, one whose workers of ``hosts`` run each in its own."""
        if self.network is None:
            return Stack(data, database_url, redis_url)
        stack = HostsStack(data, database_url, redis_url, self.network)
        for host in hosts:
            ns = self.network.add()
            stack.placed[worker_name(host)] = ns
            stack.hosts[host] = ns
            self.links[f"host {host[:8]}"] = ns
        return stack

    def storage_server(self, root: Path, log: Path, token: str) -> StorageServer:
        if self.network is None:
            return StorageServer(root, log, token=token)
        self.storage_ns = self.network.add()
        self.links["storage-server"] = self.storage_ns
        return NsStorageServer(self.storage_ns, root, log, token)

    def s3_options(self, s3: S3Server, bucket: str) -> dict[str, str | None]:
        """The S3 storage's options, its endpoint reachable from every host."""
        options = s3.options(bucket)
        if self.network is not None:
            forwarder = self.services().forward("127.0.0.1", s3.proxy_port)
            options["endpoint"] = f"http://{forwarder.listen[0]}:{forwarder.listen[1]}"
        return options

    def services(self) -> Namespace:
        """A namespace never cut: only its link's root-side address is used, by forwarders to
        the root namespace's loopback services that every host's namespace reaches."""
        assert self.network is not None
        if self.services_ns is None:
            self.services_ns = self.network.add()
        return self.services_ns

    def reach_from_hosts(self, url: str) -> str:
        """``url`` (a service on the root namespace's loopback) as every host's worker reaches
        it, whichever host runs the job given it (a database to recover into, say)."""
        return url if self.network is None else self.services().reach(url)

    def cut_link(self, rng: random.Random, say: Any) -> None:
        name = rng.choice(sorted(self.links))
        ns = self.links[name]
        seconds = rng.uniform(5, 20)
        say(f"link_cut {name} ({ns.name}) for {seconds:.1f} s")
        ns.cut()
        try:
            time.sleep(seconds)
        finally:
            ns.restore()

    # -- the Running VM ----------------------------------------------------------------------------
    def start_vm(self, client: Client, host: str) -> dict[str, Any]:
        """A QEMU with one qcow2 disk, registered as a Running VM of ``host``; its volume."""
        self.vm_folder = self.data / "vm"  # inside the hosts' allowed folder; sockets fit sun_path
        disk = make_qcow2(self.data / "vm-root.qcow2", VM_DISK_SIZE)
        self.vm = QemuVm(self.vm_folder, [disk]).start()
        vm = client.register_vm("soak-vm", hostUuid=host, state="Running", qmpSocket=self.vm.qmp_socket)
        self.vm_volume = client.register_volume(
            host, str(disk), name="vm-root", type="Root", format="qcow2", vmInstanceUuid=vm["uuid"], size=VM_DISK_SIZE
        )
        return self.vm_volume

    def write_vm(self, rng: random.Random) -> None:
        """One guest write of 64 KiB at a random place (nothing while QEMU is down)."""
        with self.vm_lock:
            if self.vm is None or not self.vm.running:
                return
            offset = rng.randrange(0, VM_DISK_SIZE // WRITE) * WRITE
            with contextlib.suppress(Exception):  # QEMU killed meanwhile: the next write goes through
                self.vm.write(0, offset, WRITE, rng.randrange(256))
                self.vm_writes += 1

    def kill_qemu(self, rng: random.Random, say: Any) -> None:
        assert self.vm is not None
        with self.vm_lock:
            self.vm.kill()
        seconds = rng.uniform(1, 5)
        say(f"kill_qemu: QEMU {self.vm.pid} killed, restarted in {seconds:.1f} s")
        time.sleep(seconds)
        with self.vm_lock:
            for attempt in range(3):  # a QEMU that cannot start again ends the soak, saying why
                try:
                    self.vm.restart()
                    break
                except QemuError:
                    if attempt == 2:
                        raise
                    time.sleep(2)

    def live_backups(self, client: Client) -> tuple[int, int]:
        """(Ready, Failed) backups of the VM's volume; of the Ready ones, every one is live."""
        if self.vm_volume is None:
            return 0, 0
        rows = client.query("volume-backups", f"volumeUuid={self.vm_volume['uuid']}", limit=10000)["inventories"]
        ready = [r for r in rows if r["status"] == "Ready"]
        return len(ready), sum(1 for r in rows if r["status"] == "Failed")

    def not_live(self, client: Client) -> list[str]:
        """The VM's Ready backups not taken live (its metadata says ``live``)."""
        if self.vm_volume is None:
            return []
        rows = client.query("volume-backups", f"volumeUuid={self.vm_volume['uuid']}", "status=Ready", limit=10000)
        return [r["uuid"] for r in rows["inventories"] if not (r.get("metadata") or {}).get("live")]

    def close(self, say: Any) -> None:
        """Stop QEMU and remove the namespaces (after the Stack stopped its processes); what
        cannot be removed is said, not raised (the report comes first)."""
        if self.vm is not None:
            with contextlib.suppress(Exception):
                self.vm.stop()
        if self.network is not None:
            for ns in self.links.values():
                with contextlib.suppress(netns.NetnsError):
                    ns.restore()
            try:
                self.network.close()
            except netns.NetnsError as exc:
                say(f"namespaces left: {exc}")
