"""Starting a VM on given volumes: the one place that drives the hypervisor for it (an
instant restore's overlays; a VM created from a VM backup).

Without a hypervisor driver (plain QEMU) blockvault does not start VMs: :func:`start_vm` says
so, and the instant restore job waits for the VM's QEMU (its ``qmpSocket``) to open the
overlays, which the operator starts from the paths the job published. A VM that libvirt owns
(``managedBy = "libvirt"``, docs/libvirt.md) has its domain's disks pointed at the volumes
and is started through libvirt; the function returns True once the domain runs
(createVmInstanceFromVmBackup starts its new domain this way; instant restore does not take
libvirt domains yet: streaming would have to run in libvirt's QEMU, docs/libvirt.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from shared.catalog.models import VmInstance, Volume
from shared.libvirt import MANAGED


def start_vm(session: Session, vm: VmInstance, volumes: Sequence[Volume]) -> bool:
    """Define and start ``vm`` on this host with ``volumes`` (root first) as its disks;
    whether it was started (False: no driver for this VM, the operator starts it)."""
    if vm.managedBy != MANAGED:
        return False  # plain QEMU: nothing to drive
    from shared.libvirt import domains

    started = domains.start_on(vm, volumes)
    if started:
        vm.state = "Running"
        session.flush()
    return started
