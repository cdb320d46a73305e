"""Live backups of running VMs end to end: a real QEMU (no guest OS) with qcow2 disks and a
QMP socket, its guest agent, the API and a worker as separate processes. Writes made while
the backup runs stay out of it; restores happen while the VM runs; a worker or a QEMU killed
mid-backup leaves no Ready backup and nothing behind, and the next backup is right."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from api.client import ApiError, JobFailed
from shared.failpoints import reached, release
from tests.conftest import MiB
from tests.qemu_fixtures import GuestAgent, QemuVm, make_qcow2
from tests.service.conftest import Stack
from tests.service.test_storage_topologies import start_host

pytestmark = pytest.mark.shared_api  # an API lent per test, not started (tests/service/conftest.py)

SIZES = {"Root": 48 * MiB, "Data": 24 * MiB}


class RunningVm:
    """A QEMU with a Root and a Data disk, registered as a Running VM, and a model of what
    the guest wrote."""

    def __init__(self, stack: Stack, qemu_vm: Callable[..., QemuVm], host: str, agent: GuestAgent | None) -> None:
        self.stack = stack
        self.paths = [make_qcow2(stack.tmp / f"{kind.lower()}.qcow2", size) for kind, size in SIZES.items()]
        self.qemu = qemu_vm(self.paths)
        self.model = [bytearray(size) for size in SIZES.values()]
        params: dict[str, Any] = {"hostUuid": host, "state": "Running", "qmpSocket": self.qemu.qmp_socket}
        if agent is not None:
            params["guestAgentSocket"] = agent.socket_path
        self.vm = stack.client.register_vm("live-vm", **params)
        self.volumes = [
            stack.client.register_volume(
                host, str(path), type=kind, format="qcow2", vmInstanceUuid=self.vm["uuid"], size=size
            )
            for path, (kind, size) in zip(self.paths, SIZES.items(), strict=True)
        ]
        self.root = self.volumes[0]

    def write(self, index: int, offset: int, length: int, pattern: int) -> None:
        self.qemu.write(index, offset, length, pattern)
        self.model[index][offset : offset + length] = bytes([pattern]) * length

    def snapshot(self) -> list[bytes]:
        return [bytes(m) for m in self.model]

    def restore(self, backup: dict[str, Any], name: str) -> bytes:
        """createDataVolumeFromVolumeBackup while the VM runs; the new volume's bytes."""
        target = self.stack.tmp / f"{name}.raw"
        client = self.stack.client
        client.wait(
            client.create_volume_from_backup(
                backup["uuid"], name=name, hostUuid=self.root["hostUuid"], installPath=str(target)
            ),
            timeout=120,
        )
        return target.read_bytes()

    def clean(self) -> bool:
        return (
            not [n for n in self.qemu.node_names() if n.startswith("blockvault-")]
            and not self.qemu.block_jobs()
            and not self.qemu.exports()
        )


def group_backups(stack: Stack, result: dict[str, Any]) -> list[dict[str, Any]]:
    by_volume = {b["volumeUuid"]: b for b in result["volumeBackups"]}
    return [stack.client.get("volume-backups", by_volume[v]["uuid"]) for v in by_volume]


def test_running_vm_is_backed_up_live_at_one_instant_and_restored_while_it_runs(
    stack: Stack, qemu_vm: Callable[..., QemuVm], guest_agent: GuestAgent
) -> None:
    # the first live backup holds once QEMU exports its point-in-time view, until the guest wrote
    gate = stack.tmp / "gate"
    host = start_host(stack, {"BLOCKVAULT_FAILPOINTS": f"live.exported=1:hold:{gate}"})
    client = stack.client
    client.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    vm = RunningVm(stack, qemu_vm, host, guest_agent)
    vm.write(0, 0, 8 * MiB, 0x41)
    vm.write(0, 30 * MiB, 2 * MiB, 0x42)
    vm.write(1, 4 * MiB, 1 * MiB, 0x43)
    instant = vm.snapshot()
    job = client.backup_vm(vm.root["uuid"], name="live-1")
    stack.wait_for("the backup holding at its point-in-time export", lambda: reached(gate), timeout=120)
    assert vm.qemu.exports()
    vm.write(0, 1 * MiB, 1 * MiB, 0x51)  # while the backup reads: must not leak into it
    vm.write(1, 4 * MiB, 1 * MiB, 0x52)
    release(gate)
    first = group_backups(stack, client.wait(job, timeout=120))
    assert [b["status"] for b in first] == ["Ready", "Ready"]
    assert [b["mode"] for b in first] == ["full", "full"]
    assert len({b["groupUuid"] for b in first}) == 1
    for backup in first:
        assert backup["metadata"]["consistency"] == "application" and backup["metadata"]["live"] is True
    assert vm.clean()
    for i, backup in enumerate(first):
        assert vm.restore(backup, f"first-{i}") == instant[i], f"disk {i}"

    # revert is refused while the VM runs; restoring to a new volume worked above
    with pytest.raises(ApiError) as refused:
        client.revert_volume(first[0]["uuid"])
    assert refused.value.status == 409 and refused.value.code == "CONFLICT"

    vm.write(0, 40 * MiB, 1 * MiB, 0x61)
    second_instant = vm.snapshot()
    second = group_backups(stack, client.wait(client.backup_vm(vm.root["uuid"], name="live-2"), timeout=120))
    assert [b["mode"] for b in second] == ["incremental", "incremental"]
    assert [b["parentUuid"] for b in second] == [b["uuid"] for b in first]
    for i, backup in enumerate(second):
        assert vm.restore(backup, f"second-{i}") == second_instant[i], f"disk {i}"
    # a single volume of the running VM, live too
    vm.write(1, 20 * MiB, 1 * MiB, 0x62)
    one = client.wait(client.backup_volume(vm.volumes[1]["uuid"], name="data-only"), timeout=120)
    assert one["mode"] == "incremental" and one["stats"]["bytesRead"] == 4 * MiB
    assert vm.restore(one, "data-only") == vm.snapshot()[1]
    assert vm.clean()
    # a scheduled vmBackup of the running VM is live as well
    vm.write(0, 44 * MiB, 1 * MiB, 0x63)
    group = client.create_job_group("live-group", "vmBackup")
    client.add_targets(group["uuid"], [vm.vm["uuid"]])
    client.run_job_group(group["uuid"])
    stack.wait_for("the scheduled run", lambda: bool(client.histories(f"schedulerJobGroupUuid={group['uuid']}")))
    [history] = client.histories(f"schedulerJobGroupUuid={group['uuid']}")
    assert history["success"] is True, history["resultDump"]
    scheduled = [client.get("volume-backups", u) for u in json.loads(history["resultDump"])["volumeBackupUuids"]]
    assert [b["mode"] for b in scheduled] == ["incremental", "incremental"]
    assert all(b["metadata"]["live"] and b["metadata"]["consistency"] == "application" for b in scheduled)
    assert vm.restore(scheduled[0], "scheduled-root") == vm.snapshot()[0]


def test_a_running_vm_without_a_monitor_needs_force_and_bad_sockets_are_refused(
    stack: Stack, qemu_vm: Callable[..., QemuVm]
) -> None:
    host = start_host(stack)
    client = stack.client
    client.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    path = make_qcow2(stack.tmp / "plain.qcow2", 8 * MiB)
    vm = client.register_vm("no-monitor", hostUuid=host, state="Running")
    root = client.register_volume(host, str(path), type="Root", format="qcow2", vmInstanceUuid=vm["uuid"])
    for call in (lambda: client.backup_vm(root["uuid"]), lambda: client.backup_volume(root["uuid"])):
        with pytest.raises(ApiError) as refused:
            call()
        assert refused.value.status == 409 and "qmpSocket" in refused.value.description
    forced = client.wait(client.backup_vm(root["uuid"], force=True), timeout=120)
    backup = client.get("volume-backups", forced["volumeBackups"][0]["uuid"])
    assert backup["metadata"]["consistency"] == "crash" and backup["metadata"]["live"] is False
    # a scheduled run of it fails clearly instead of reading a file QEMU writes
    group = client.create_job_group("no-monitor-group", "vmBackup")
    client.add_targets(group["uuid"], [vm["uuid"]])
    client.run_job_group(group["uuid"])
    stack.wait_for("the scheduled run", lambda: bool(client.histories(f"schedulerJobGroupUuid={group['uuid']}")))
    [history] = client.histories(f"schedulerJobGroupUuid={group['uuid']}")
    assert history["success"] is False and "qmpSocket" in history["resultDump"]
    with pytest.raises(ApiError) as bad_force:
        client.backup_volume(root["uuid"], force="yes")
    assert bad_force.value.status == 400
    paths = ("relative/qmp.sock", 7, "/run/other-tenant.sock", f"{stack.tmp}/../x.sock", f"{stack.tmp}/./q.sock")
    for bad, code in [*((p, "PATH_NOT_ALLOWED") for p in paths), ("/nul\0byte", "INVALID_ARGUMENT")]:
        with pytest.raises(ApiError) as bad_socket:
            client.register_vm("bad", hostUuid=host, state="Running", qmpSocket=bad)
        assert bad_socket.value.status == 400 and bad_socket.value.code == code, bad
    with pytest.raises(ApiError) as bad_update:
        client.action("vm-instances", vm["uuid"], "updateVmInstance", {"guestAgentSocket": "agent.sock"})
    assert bad_update.value.status == 400
    # a monitor socket that is not there: the job fails clearly, nothing turns Ready
    client.action("vm-instances", vm["uuid"], "updateVmInstance", {"qmpSocket": str(stack.tmp / "gone.sock")})
    with pytest.raises(JobFailed) as failed:
        client.wait(client.backup_vm(root["uuid"]), timeout=120)
    assert failed.value.code == "VM_MONITOR_ERROR" and "no such socket" in failed.value.description
    statuses = {b["status"] for b in client.query("volume-backups", f"volumeUuid={root['uuid']}")["inventories"]}
    assert statuses == {"Ready", "Failed"}
    # a VM the monitor does not run those disks in
    other = qemu_vm([make_qcow2(stack.tmp / "other.qcow2", 8 * MiB)])
    client.action("vm-instances", vm["uuid"], "updateVmInstance", {"qmpSocket": other.qmp_socket})
    with pytest.raises(JobFailed) as wrong_vm:
        client.wait(client.backup_volume(root["uuid"]), timeout=120)
    assert wrong_vm.value.code == "VM_MONITOR_ERROR" and "has no disk" in wrong_vm.value.description


def test_worker_or_qemu_killed_mid_backup_leaves_no_ready_backup_and_the_next_one_is_right(
    stack: Stack, qemu_vm: Callable[..., QemuVm]
) -> None:
    def fault(gate: Path) -> dict[str, str]:  # the worker's 2nd live backup holds at its export
        return {"BLOCKVAULT_FAILPOINTS": f"live.exported=2:hold:{gate}"}

    gates = stack.tmp / "worker-gate", stack.tmp / "qemu-gate"
    host = start_host(stack, fault(gates[0]))
    client = stack.client
    client.add_backup_storage("local", f"file://{stack.tmp / 'local'}")
    vm = RunningVm(stack, qemu_vm, host, None)
    vm.write(0, 0, 4 * MiB, 0x11)
    vm.write(1, 8 * MiB, 1 * MiB, 0x12)
    first = group_backups(stack, client.wait(client.backup_vm(vm.root["uuid"]), timeout=120))
    assert [b["metadata"]["consistency"] for b in first] == ["crash", "crash"]

    # 1. the worker dies (the whole process group) while QEMU exports the view
    vm.write(0, 12 * MiB, 1 * MiB, 0x21)
    job = client.backup_vm(vm.root["uuid"], name="killed-worker")
    stack.wait_for("the backup holding at its export", lambda: reached(gates[0]), timeout=120)
    assert vm.qemu.exports()
    stack.kill(f"worker-{host[:8]}")
    with pytest.raises(JobFailed) as lost:
        client.wait(job, timeout=120)
    assert lost.value.code == "HOST_DISCONNECTED", lost.value.description
    assert not vm.clean()  # its overlay, job and export are still in QEMU
    vm.write(1, 16 * MiB, 1 * MiB, 0x22)
    stack.start_worker(host, fault(gates[1]))
    now = vm.snapshot()
    after = group_backups(stack, client.wait(client.backup_vm(vm.root["uuid"], name="after-worker"), timeout=120))
    assert vm.clean()
    assert [b["mode"] for b in after] == ["incremental", "incremental"]
    assert [b["parentUuid"] for b in after] == [b["uuid"] for b in first]  # the bitmap kept every write
    for i, backup in enumerate(after):
        assert vm.restore(backup, f"after-worker-{i}") == now[i]

    # 2. QEMU dies while the backup reads it
    vm.write(0, 20 * MiB, 1 * MiB, 0x31)
    job = client.backup_vm(vm.root["uuid"], name="killed-qemu")
    stack.wait_for("the backup holding at its export", lambda: reached(gates[1]), timeout=120)
    assert vm.qemu.exports()
    for index in range(len(SIZES)):  # what the guest flushed survives its QEMU's death
        vm.qemu.flush(index)
    vm.qemu.kill()
    release(gates[1])  # it reads on from a QEMU that is gone
    with pytest.raises(JobFailed) as gone:
        client.wait(job, timeout=120)
    assert gone.value.code == "VM_MONITOR_ERROR", gone.value.description
    vm.qemu.restart()
    now = vm.snapshot()
    last = group_backups(stack, client.wait(client.backup_vm(vm.root["uuid"], name="after-qemu"), timeout=120))
    assert vm.clean()
    for i, backup in enumerate(last):
        assert vm.restore(backup, f"after-qemu-{i}") == now[i]
    rows = client.query("volume-backups", f"volumeUuid={vm.root['uuid']}", limit=100)["inventories"]
    by_name = {row["name"]: row["status"] for row in rows}
    assert by_name["killed-worker"] == "Failed" and by_name["killed-qemu"] == "Failed"
    work = stack.tmp / "data" / "live"
    assert not list(work.rglob("fleece-*")) and not list(work.rglob("nbd-server"))
