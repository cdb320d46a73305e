"""VM backups of libvirt domains through the service (``libvirtDomain`` VMs): live while the
domain runs, offline from the same checkpoint once it stops, a missing domain failing the job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from shared import hosts
from shared.catalog.models import VmInstance, Volume, VolumeBackup
from shared.config import get_settings
from shared.errors import Conflict
from shared.libvirt.backup import CHECKPOINT_KEY, DomainError
from shared.repository.repo import parse_install_path
from shared.service import volume_backups
from tests.libvirt_fixtures import Domain, MiB
from tests.shared.service.conftest import CHUNK, Site

SIZES = [("qcow2", 32 * MiB), ("raw", 16 * MiB)]


@pytest.fixture
def libvirt_site(site: Site, libvirt_folder: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    """The site's worker may open volumes in the folder the domains' disks are in."""
    monkeypatch.setenv("BLOCKVAULT_VOLUME_ROOTS", f"{site.tmp}:{libvirt_folder}")
    monkeypatch.setenv("BLOCKVAULT_LIBVIRT_URI", "qemu:///system")
    get_settings.cache_clear()
    return site


def register(site: Site, domain: Domain, state: str = "Running") -> tuple[VmInstance, list[Volume]]:
    vm = VmInstance(uuid=domain.vm_uuid, name=domain.name, hostUuid=site.host, state=state, libvirtDomain=True)
    site.session.add(vm)
    site.session.commit()
    volumes = [
        site.volume(f"{kind}.{fmt}", path=path, size=size, vm=vm, kind=kind)
        for path, (fmt, size), kind in zip(domain.paths, SIZES, ("Root", "Data"), strict=True)
    ]
    return vm, volumes


def vm_backup(site: Site, root: Volume) -> list[VolumeBackup]:
    hosts.heartbeat(site.session, site.host)  # the host's worker is alive (a domain start is slow)
    site.session.commit()
    job = volume_backups.request_vm_backup(site.session, root.uuid, {}, None)
    result = site.run(volume_backups.run_volume_backups, job)
    return [site.session.get_one(VolumeBackup, b["uuid"]) for b in result["volumeBackups"]]


def test_a_libvirt_domain_is_backed_up_live_then_offline_from_the_same_checkpoint(
    libvirt_site: Site,
    make_domain: Callable[..., Domain],
) -> None:
    site = libvirt_site
    storage = site.storage()
    domain = make_domain(SIZES)
    domain.write(0, 0, 6 * MiB, 0x21)
    domain.write(1, 2 * MiB, 1 * MiB, 0x22)
    vm, volumes = register(site, domain)

    first = vm_backup(site, volumes[0])
    assert [b.mode for b in first] == ["full", "full"]
    assert all(b.metadata_["live"] and b.metadata_["consistency"] == "crash" for b in first)
    assert [site.restored(storage, b) for b in first] == domain.snapshot()

    domain.write(0, 20 * MiB, 1 * MiB, 0x23)
    second = vm_backup(site, volumes[0])
    assert [b.mode for b in second] == ["incremental", "incremental"]
    assert [b.parentUuid for b in second] == [b.uuid for b in first]
    assert second[0].bytesRead == 16 * CHUNK  # the checkpoint's bitmap: the 1 MiB written
    assert [site.restored(storage, b) for b in second] == domain.snapshot()
    [checkpoint] = domain.checkpoints()

    domain.write(0, 28 * MiB, 1 * MiB, 0x24)
    domain.stop()
    vm.state = "Stopped"
    site.session.commit()
    third = vm_backup(site, volumes[0])
    assert [b.metadata_["consistency"] for b in third] == ["offline", "offline"]
    assert third[0].mode == "incremental" and third[0].parentUuid == second[0].uuid
    assert third[0].bytesRead == 16 * CHUNK  # every write since the checkpoint (the second backup)
    with site.repository(storage) as repo:
        manifest = repo.load_manifest(parse_install_path(site.ref(third[0], storage).installPath)[1])
    assert manifest.metadata[CHECKPOINT_KEY] == checkpoint
    assert [site.restored(storage, b) for b in third] == domain.snapshot()
    assert domain.checkpoints() == [checkpoint]


def test_a_libvirt_vm_whose_domain_is_gone_fails_the_job_and_a_plain_vm_is_still_refused(
    libvirt_site: Site,
    make_domain: Callable[..., Domain],
) -> None:
    site = libvirt_site
    site.storage()
    domain = make_domain(SIZES, start=False)
    _vm, volumes = register(site, domain)
    domain.close()  # undefined behind the catalog's back
    hosts.heartbeat(site.session, site.host)
    site.session.commit()
    job = volume_backups.request_vm_backup(site.session, volumes[0].uuid, {}, None)
    failed = site.fail(volume_backups.run_volume_backups, job, DomainError)
    assert failed.state == "Failed" and failed.error is not None
    assert failed.error["code"] == "VM_MONITOR_ERROR" and "no such domain" in str(failed.error), failed.error
    plain = site.vm(state="Running")
    volume = site.volume("plain.raw", vm=plain)
    site.refused(Conflict, lambda: volume_backups.request_volume_backup(site.session, volume.uuid, {}, None))
