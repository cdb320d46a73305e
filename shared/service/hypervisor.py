"""Starting a VM from the volumes an instant restore made: the one place that drives the
hypervisor for it.

Without a hypervisor driver (plain QEMU) blockvault does not start VMs: :func:`start_vm` says
so, and the instant restore job waits for the VM's QEMU (its ``qmpSocket``) to open the
overlays, which the operator starts from the paths the job published. A driver (libvirt:
define the domain from the backup's metadata with these disks and start it) plugs in here and
returns True once the domain runs; the job then streams in that domain's QEMU.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from shared.catalog.models import VmInstance, Volume


def start_vm(session: Session, vm: VmInstance, volumes: Sequence[Volume]) -> bool:
    """Define and start ``vm`` on this host with ``volumes`` (qcow2 overlays, root first) as
    its disks; whether it was started (False: no driver on this host, the operator starts it)."""
    del session, vm, volumes  # plain QEMU: nothing to drive
    return False
