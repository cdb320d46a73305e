"""libvirt hosts (docs/libvirt.md): the worker as a libvirt client.

Vocabulary:

- *connection* (:mod:`.connection`): the worker's libvirt, opened by URI with a timeout
  (``BLOCKVAULT_LIBVIRT_URI``; ``qemu:///system`` by default when libvirt-python imports and
  libvirtd's socket exists). ``libvirt`` itself is imported lazily: a host without it runs
  with hand-registered VMs as before.
- *domain* (:mod:`.domainxml`): a libvirt VM as its XML says: name, CPUs, memory, platform,
  disks (file, block, pool volume or network sources) and NICs with their MACs; and the XML of
  a new domain made from a backed-up one.
- *discovery* (:mod:`.discovery`): the host's domains mirrored into the catalog as VM
  instances (uuid = the domain's uuid without dashes) and their disks as volumes, both
  ``managedBy = "libvirt"``: libvirt owns their paths and state, the API does not change them.
- *backup* (:mod:`.backup`): live backups through libvirt's backup API (another module).
"""

from __future__ import annotations

MANAGED = "libvirt"  # managedBy of what discovery registers
