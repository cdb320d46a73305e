"""createVmInstanceFromVmBackup: a new libvirt domain from a VM backup (docs/libvirt.md).

``request_create_vm`` (the API) checks the backup and the host, and registers the new VM
instance (``Creating``) and its volumes (``Creating``, each ``<volume uuid>.<format>`` in the
host's volume roots, beside the backed-up disk when that is on the same host; named by the
platform). ``run_create_vm`` (that host's worker) restores
every disk, defines a domain from the backed-up domain XML (a new uuid and name, each disk on
its restored file, new MAC addresses unless ``keepMacs``) and starts it unless the strategy is
``CreateStopped``. A failure undefines what it defined and removes the files and rows it made.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import apijobs, hostpaths
from shared import celery_app as tasks
from shared.apijobs import enqueue, progress_reporter
from shared.catalog.models import ApiJob, Host, VmInstance, Volume, VolumeBackup, new_uuid
from shared.celery_app import host_queue
from shared.errors import Conflict, InvalidArgument
from shared.inventory import inventory
from shared.libvirt import MANAGED, connection, domains, domainxml
from shared.repository.restore import restore_backup
from shared.service import hypervisor, rows
from shared.service.recovery import ensure_path_free
from shared.storage import open_repository

log = logging.getLogger(__name__)
ACTION = "createVmInstanceFromVmBackup"
STRATEGIES = ("InstantStart", "CreateStopped")  # ZStack's CreateVmInstance strategies


def definition(backup: VolumeBackup) -> dict[str, Any]:
    """The VM definition a VM backup kept (its root volume's backup's ``vmDefinition``)."""
    found = (backup.metadata_ or {}).get("vmDefinition")
    if not isinstance(found, dict) or not found.get("domainXml"):
        reason = (found or {}).get("definitionError") if isinstance(found, dict) else None
        raise Conflict(
            detail=f"VM backup {backup.groupUuid} keeps no libvirt domain definition"
            + (
                f" ({reason})"
                if reason
                else " (its VM was not a libvirt domain, or it was taken before blockvault kept one)"
            )
        )
    return found


def _flag(params: dict[str, Any], key: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(detail=f"{key} must be true or false")
    return value


def _device(backup: VolumeBackup, index: int) -> str:
    volume = (backup.metadata_ or {}).get("volume") or {}
    return str(volume.get("deviceName") or f"vd{chr(ord('a') + index)}")


def _host(session: Session, params: dict[str, Any], source: VmInstance | None, backups: list[VolumeBackup]) -> Host:
    host_uuid = params.get("hostUuid") or (source.hostUuid if source else None)
    if not host_uuid:
        volume = session.get(Volume, backups[0].volumeUuid)
        host_uuid = volume.hostUuid if volume else None
    if not host_uuid:
        raise InvalidArgument(detail="hostUuid is required: the backed-up VM is no longer registered")
    if not isinstance(host_uuid, str):
        raise InvalidArgument(detail="hostUuid must be a host's uuid")
    host: Host = rows.get(session, Host, host_uuid, "host")
    if host.libvirtStatus != "Connected":
        why = (
            f"its libvirt is {host.libvirtStatus}: {host.libvirtReason}" if host.libvirtStatus else "it has no libvirt"
        )
        raise Conflict(detail=f"host {host.uuid} cannot define a VM: {why}")
    return host


def request_create_vm(session: Session, group_uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    backups = rows.group_backups(session, group_uuid)
    for backup in backups:
        rows.ready_backup(session, backup.uuid)
    found = definition(backups[0])
    storage_uuid = rows.group_storage(session, group_uuid, backups, params.get("backupStorageUuid"))
    strategy = params.get("strategy") or "InstantStart"
    if strategy not in STRATEGIES:
        raise InvalidArgument(detail=f"strategy must be one of {', '.join(STRATEGIES)}")
    keep_macs = _flag(params, "keepMacs")
    name = params.get("name") or f"{found.get('name') or 'vm'}-{new_uuid()[:8]}"
    if not isinstance(name, str) or len(name) > 255 or "/" in name:
        raise InvalidArgument(detail="name must be a string of at most 255 characters, without '/'")
    source = session.get(VmInstance, str(found.get("uuid") or ""))
    host = _host(session, params, source, backups)
    taken = session.scalars(
        select(VmInstance.uuid).where(
            VmInstance.hostUuid == host.uuid, VmInstance.name == name, VmInstance.state != "Destroyed"
        )
    ).first()
    if taken:
        raise Conflict(detail=f"VM {taken} on host {host.uuid} is named {name} already (libvirt names are unique)")
    rows.connected_host(session, host.uuid)
    project = (source.projectUuid if source else None) or rows.project_of(
        session, session.get(Volume, backups[0].volumeUuid)
    )
    vm = VmInstance(
        uuid=new_uuid(),
        name=name,
        description=params.get("description")
        if isinstance(params.get("description"), str)
        else found.get("description"),
        hostUuid=host.uuid,
        platform=str(found.get("platform") or "Linux"),
        cpuNum=int(found.get("cpuNum") or 1),
        memorySize=int(found.get("memorySize") or 0),
        projectUuid=project,
        state="Creating",
    )
    session.add(vm)
    roots = hostpaths.reported_roots(host)
    volumes = []
    for index, backup in enumerate(backups):
        fmt = str(((backup.metadata_ or {}).get("volume") or {}).get("format") or "raw")
        volume_uuid = new_uuid()
        source_volume = session.get(Volume, backup.volumeUuid)
        near = source_volume.installPath if source_volume and source_volume.hostUuid == host.uuid else None
        path = hostpaths.new_volume_path(roots, volume_uuid, fmt, near)
        ensure_path_free(session, host.uuid, path)
        volume = Volume(
            uuid=volume_uuid,
            name=f"{name}-{_device(backup, index)}",
            hostUuid=host.uuid,
            projectUuid=project,
            type=backup.type,
            format="qcow2" if fmt == "qcow2" else "raw",
            installPath=path,
            size=backup.size,
            deviceName=_device(backup, index),
            status="Creating",
        )
        session.add(volume)
        volumes.append(volume)
    session.flush()
    job_params = {
        "backupUuids": [b.uuid for b in backups],
        "volumeUuids": [v.uuid for v in volumes],
        "vmInstanceUuid": vm.uuid,
        "backupStorageUuid": storage_uuid,
        "strategy": strategy,
        "keepMacs": keep_macs,
    }
    owner = {"resource_uuid": vm.uuid, "resource_type": VmInstance.resource_type, "account_uuid": account}
    return enqueue(
        session,
        ACTION,
        task=tasks.VM_CREATE,
        queue=host_queue(host.uuid),
        params=job_params,
        host_uuid=host.uuid,
        **owner,
    )


def run_create_vm(session: Session, job: ApiJob) -> dict[str, Any]:
    """The worker side: restore, define, start; the VM's inventory with its volumes."""
    params = job.params or {}
    vm: VmInstance = rows.get(session, VmInstance, params["vmInstanceUuid"], "VM instance")
    backups: list[VolumeBackup] = [rows.get(session, VolumeBackup, u, "volume backup") for u in params["backupUuids"]]
    volumes: list[Volume] = [rows.get(session, Volume, u, "volume") for u in params["volumeUuids"]]
    if vm.state != "Creating" or any(v.status != "Creating" for v in volumes):
        raise Conflict(detail=f"VM {vm.uuid} is {vm.state}, not being created")
    found = definition(backups[0])
    report = progress_reporter(job.uuid)
    total = sum(b.size for b in backups) or 1
    made: list[Path] = []
    defined = False
    uri = connection.configured_uri() or "(none)"
    try:
        done = 0
        for backup, volume in zip(backups, volumes, strict=True):
            storage, ref = rows.copy_on(session, backup, params["backupStorageUuid"])
            target = hostpaths.resolve_new_volume(volume.installPath, f"volume {volume.uuid}")

            def scaled(d: int, _t: int, before: int = done) -> None:
                report(before + d, total)

            with open_repository(storage) as repo:
                restore_backup(repo, rows.manifest_id(ref), str(target), progress=scaled, fmt=volume.format)
            made.append(target)
            done += backup.size
        xml = domainxml.new_domain_xml(
            str(found["domainXml"]),
            name=vm.name,
            uuid=vm.uuid,
            disks={str(v.deviceName): (str(p), v.format) for v, p in zip(volumes, made, strict=True)},
            keep_macs=bool(params.get("keepMacs")),
        )
        with connection.connect(uri) as conn:
            defined = True
            state = domains.define(conn, xml, start=False)
        vm.managedBy = MANAGED
        if params.get("strategy") != "CreateStopped" and hypervisor.start_vm(session, vm, volumes):
            state = "Running"
    except BaseException:
        if defined:
            try:
                with connection.connect(uri) as conn:
                    domains.undefine(conn, vm.uuid)
            except Exception:
                log.warning("vmcreate.undefine_failed vm=%s", vm.uuid, exc_info=True)
        for path in made:
            path.unlink(missing_ok=True)
        raise
    vm.state, vm.managedBy = state, MANAGED
    for volume in volumes:
        volume.status, volume.managedBy, volume.vmInstanceUuid = "Ready", MANAGED, vm.uuid
    session.commit()
    log.info("vmcreate.done vm=%s state=%s volumes=%s", vm.uuid, state, len(volumes))
    return {**inventory(session, vm), "volumes": [inventory(session, v) for v in volumes]}


def _ended(session: Session, job: ApiJob) -> None:
    """A failed create leaves no VM row (its Creating volumes are removed by fail_job)."""
    if job.state != "Failed":
        return
    vm = session.get(VmInstance, (job.params or {}).get("vmInstanceUuid") or "")
    if vm is not None and vm.state == "Creating":
        session.flush()  # the volumes' deletes first
        session.delete(vm)


apijobs.on_end(ACTION, _ended)
