"""Operating blockvault across hosts: each host's worker in its own network namespace, linked
to the root namespace where the API, PostgreSQL, Redis and Flower run (see conftest.py and
tests/harness/netns.py). Volume work goes to its host's queue only; a host cut off from the
network turns Disconnected without holding the others up and comes back; a copy to a remote
storage-server crosses a delayed, lossy link intact; Flower sees every host's worker."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.client import ApiError
from tests.conftest import MiB, vm_like_regions, write_regions
from tests.harness.netns import Network, sh
from tests.multihost.conftest import HostsStack, worker_name
from tests.service.conftest import free_port
from tests.service.test_storage_topologies import refs, remote_params

JOB_TIMEOUT = 240


def volume_in(stack: HostsStack, host: str, folder: Path, size: int, seed: int) -> tuple[dict[str, Any], Path]:
    """A raw VM-like volume in ``folder`` (one folder per host), registered on ``host``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "disk.raw"
    write_regions(path, size, vm_like_regions(size, seed=seed))
    return stack.client.register_volume(host, str(path), name=f"{folder.name}-disk"), path


def wait_all(stack: HostsStack, jobs: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Wait for every job of ``{key: job uuid}`` (they run meanwhile): ``{key: inventory}``."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {key: pool.submit(stack.client.wait, job, timeout=JOB_TIMEOUT) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def started_by(stack: HostsStack, hosts: list[str], job: str) -> list[str]:
    """The hosts whose worker log says it started ``job``."""
    return [host for host in hosts if f"job.started uuid={job}" in stack.log(worker_name(host))]


def test_each_host_backs_up_only_its_own_volumes(hosts_stack: HostsStack, network: Network) -> None:
    stack = hosts_stack
    namespaces = [network.add() for _ in range(3)]
    hosts = stack.start_hosts(namespaces)
    for host, ns in zip(hosts, namespaces, strict=True):
        row = stack.client.get("hosts", host)
        # the worker registered from inside its namespace: its address is the namespace's
        assert (row["status"], row["managementIp"]) == ("Connected", ns.ip), row
    stack.client.add_backup_storage("local", f"file://{stack.tmp / 'store'}")
    volumes = {
        host: volume_in(stack, host, stack.tmp / f"host-{i}", 16 * MiB, seed=20 + i) for i, host in enumerate(hosts)
    }

    # all three at once
    jobs = {host: stack.client.backup_volume(volume["uuid"], name=f"b-{host}") for host, (volume, _) in volumes.items()}
    backups = wait_all(stack, jobs)
    for host, backup in backups.items():
        assert (backup["status"], backup["volumeUuid"]) == ("Ready", volumes[host][0]["uuid"]), backup

    # each job was routed to its volume's host and ran there, and nowhere else
    assert stack.job_hosts(list(jobs.values())) == {job: host for host, job in jobs.items()}
    for host, job in jobs.items():
        assert started_by(stack, hosts, job) == [host], {h: stack.log(worker_name(h))[-2000:] for h in hosts}
        for other in hosts:
            if other != host:
                assert str(volumes[host][1].parent) not in stack.log(worker_name(other))
    # each worker's catalog and broker traffic crossed its own link (its forwarders carried it)
    for ns in namespaces:
        for (_, port), forwarder in ns.forwarders.items():
            counted = forwarder.stats()
            assert counted["connections"] > 0 and counted["in"] > 0 and counted["out"] > 0, (ns.name, port, counted)

    # restore every backup on its own host, at once: byte for byte
    restores = {
        host: stack.client.create_volume_from_backup(
            backups[host]["uuid"], name="restored", hostUuid=host, installPath=str(path.parent / "restored.raw")
        )
        for host, (_, path) in volumes.items()
    }
    wait_all(stack, restores)
    for host, (_, path) in volumes.items():
        assert started_by(stack, hosts, restores[host]) == [host]
        assert (path.parent / "restored.raw").read_bytes() == path.read_bytes(), f"host {host}"


def test_a_host_cut_off_turns_disconnected_while_the_others_go_on_and_it_comes_back(
    hosts_stack: HostsStack, network: Network
) -> None:
    stack = hosts_stack
    namespaces = [network.add() for _ in range(3)]
    cut_ns = namespaces[0]
    cut, *others = stack.start_hosts(namespaces)
    stack.client.add_backup_storage("local", f"file://{stack.tmp / 'store'}")
    volumes = {
        host: volume_in(stack, host, stack.tmp / f"host-{i}", 8 * MiB, seed=30 + i)
        for i, host in enumerate([cut, *others])
    }

    cut_ns.cut()  # `ip link set <root-side veth> down`: its worker runs on, unreachable
    stack.wait_host(cut, "Disconnected", timeout=90)  # heartbeat 1 s, host timeout 6 s
    with pytest.raises(ApiError) as refused:
        stack.client.backup_volume(volumes[cut][0]["uuid"], name="while-cut")
    assert (refused.value.status, refused.value.code) == (409, "CONFLICT"), refused.value
    assert f"host {cut} is Disconnected" in refused.value.description, refused.value.description
    assert stack.client.query("volume-backups", f"volumeUuid={volumes[cut][0]['uuid']}", count=True)["total"] == 0

    # meanwhile the other hosts back up as usual
    jobs = {host: stack.client.backup_volume(volumes[host][0]["uuid"], name="meanwhile") for host in others}
    for host, backup in wait_all(stack, jobs).items():
        assert backup["status"] == "Ready", backup
        assert started_by(stack, [cut, *others], jobs[host]) == [host]
    assert stack.client.get("hosts", cut)["status"] == "Disconnected"  # still cut off all along
    assert stack.procs[worker_name(cut)].poll() is None, "only its link was cut: the worker still runs"

    cut_ns.restore()  # the link comes back: heartbeats get through again
    stack.wait_host(cut, "Connected", timeout=120)
    assert "host.reconnected" in stack.log(worker_name(cut))
    job = stack.client.backup_volume(volumes[cut][0]["uuid"], name="after")
    backup = stack.client.wait(job, timeout=JOB_TIMEOUT)
    assert backup["status"] == "Ready"
    assert started_by(stack, [cut, *others], job) == [cut]
    restored = volumes[cut][1].parent / "restored.raw"
    stack.client.wait(
        stack.client.create_volume_from_backup(backup["uuid"], name="r", hostUuid=cut, installPath=str(restored)),
        timeout=JOB_TIMEOUT,
    )
    assert restored.read_bytes() == volumes[cut][1].read_bytes()


def test_a_sync_to_the_remote_storage_crosses_a_delayed_lossy_link(
    hosts_stack: HostsStack, network: Network, start_ns_storage_server: Any
) -> None:
    stack = hosts_stack
    host_ns, remote_ns = network.add(), network.add(shaped=True)
    (host,) = stack.start_hosts([host_ns])
    stack.client.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    server = start_ns_storage_server(remote_ns, stack.tmp / "remote-root")
    remote = stack.client.create("backup-storage", {"name": "dc2", **remote_params(server)})
    assert remote["status"] == "Connected", remote
    volume, path = volume_in(stack, host, stack.tmp / "host-0", 4 * MiB, seed=41)
    backup = stack.client.wait(stack.client.backup_volume(volume["uuid"], name="to-copy"), timeout=JOB_TIMEOUT)

    # both ends of the storage-server's link: netem delay 50ms 10ms loss 2% (or the relay's same)
    remote_ns.shape(delay_ms=50, jitter_ms=10, loss_percent=2)
    before = remote_ns.shaping_stats()
    job = stack.client.sync_backup(backup["uuid"], remote["uuid"])
    copied = stack.client.wait(job, timeout=JOB_TIMEOUT)
    assert copied["chunksCopied"] > 0 and copied["bytesCopied"] > 0, copied
    assert started_by(stack, [host], job) == [host], "the copy ran in the host's namespace, over the link"
    ref = refs(stack, backup["uuid"])[remote["uuid"]]
    assert ref["status"] == "Ready" and ref["installPath"].startswith("zstore://"), ref

    # the copy restores byte for byte, read back over the same link
    restored = path.parent / "from-remote.raw"
    stack.client.wait(
        stack.client.create_volume_from_backup(
            backup["uuid"], name="r", hostUuid=host, installPath=str(restored), backupStorageUuid=remote["uuid"]
        ),
        timeout=JOB_TIMEOUT,
    )
    assert restored.read_bytes() == path.read_bytes()
    after = remote_ns.shaping_stats()
    shaped = {way: {k: after[way][k] - before[way][k] for k in after[way]} for way in after}
    # the shaping was in force both ways: packets passed and some were lost (TCP resent them)
    assert all(shaped[way]["packets"] > 0 for way in shaped), (remote_ns.shaper, shaped)
    assert sum(shaped[way]["dropped"] for way in shaped) > 0, (remote_ns.shaper, shaped)
    print(f"shaping by {remote_ns.shaper}: {shaped}")


def test_flower_lists_every_hosts_worker(hosts_stack: HostsStack, network: Network) -> None:
    stack = hosts_stack
    port = free_port()
    stack.spawn("flower", ["flower", "--port", str(port)], env={"FLOWER_UNAUTHENTICATED_API": "true"})
    namespaces = [network.add() for _ in range(3)]
    hosts = stack.start_hosts(namespaces)
    wanted = {f"blockvault-{host}@" for host in hosts}
    workers: dict[str, Any] = {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            workers = httpx.get(f"http://127.0.0.1:{port}/api/workers?refresh=1", timeout=20).json()
        except (httpx.HTTPError, ValueError):
            workers = {}
        if all(any(name.startswith(prefix) for name in workers) for prefix in wanted):
            break
        time.sleep(1)
    names = sorted(workers)
    for host, ns in zip(hosts, namespaces, strict=True):
        matching = [name for name in names if name.startswith(f"blockvault-{host}@")]
        assert len(matching) == 1, (host, names, stack.log("flower")[-3000:])
        info = workers[matching[0]]
        queues = {queue["name"] for queue in info.get("active_queues") or []}
        assert queues == {f"host.{host}", "storage"}, (matching, queues)
        # the worker Flower reports is the process running inside that host's namespace
        inside = {int(pid) for pid in sh("ip", "netns", "pids", ns.name).stdout.split()}
        assert info["stats"]["pid"] == stack.procs[worker_name(host)].pid and info["stats"]["pid"] in inside
