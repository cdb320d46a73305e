"""Instant recovery: run a volume or a whole VM from its backup at once, while the backup is
copied in behind it (docs/instant-recovery.md).

``request_*`` (the API) registers the new volumes, ``Creating``, each a qcow2 file the platform
names in the host's volume roots (as createDataVolumeFromVolumeBackup does). :func:`run_instant`
(the worker of that host) exports each backup over NBD on a socket in the host's VM socket
folder, creates each overlay with that export as its backing and marks the volumes
``Streaming``: from then on a VM can run from them (their paths are the volumes'
``installPath``). Then it streams the rest of each backup into its overlay: in the VM's QEMU
(``block-stream`` over its ``qmpSocket``) once the VM runs from the overlays, which
:mod:`shared.service.hypervisor` starts where a driver exists and the operator starts
elsewhere, or in a ``qemu-storage-daemon`` when no VM opens them within ``attachTimeout``
seconds. When every overlay stands alone the exports stop and the volumes are ``Ready``.

If the backup's storage goes away during the stream, the job fails with QEMU's reason, the
VM is paused (``stop``: not one more guest read that cannot be answered) and the volumes are
``Failed``: each still holds every byte the guest wrote, on top of a backing that is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import celery_app as tasks
from shared import hostpaths
from shared.apijobs import enqueue, progress_reporter
from shared.catalog import db
from shared.catalog.models import ApiJob, Host, VmInstance, Volume, VolumeBackup, new_uuid
from shared.celery_app import host_queue
from shared.config import get_settings
from shared.errors import BlockvaultError, Conflict, InvalidArgument, MonitorError, StreamFailed
from shared.inventory import inventory
from shared.repository.blockstream import stream
from shared.repository.nbdserver import export_backup
from shared.repository.qemu import QemuStorageDaemon, backing_of, create_overlay, nbd_uri
from shared.repository.qmp import Monitor
from shared.service import hypervisor
from shared.service.recovery import ensure_path_free
from shared.service.rows import (
    connected_host,
    copy_on,
    get,
    group_backups,
    manifest_id,
    project_of,
    ready_backup,
    ready_ref,
)
from shared.storage import open_repository

log = logging.getLogger(__name__)
VOLUME_ACTION = "instantRestoreVolumeFromVolumeBackup"
VM_ACTION = "instantRestoreVmFromVmBackup"
ATTACH_POLL_SECONDS = 0.2
IDLE_WAIT_SECONDS = 30.0


# -- the API side ----------------------------------------------------------------------------------
def _attach_timeout(params: dict[str, Any]) -> float:
    value = params.get("attachTimeout")
    if value is None:
        return get_settings().instant_attach_timeout_seconds
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 86400:
        raise InvalidArgument(detail="attachTimeout is a number of seconds from 0 to 86400")
    return float(value)


def _bandwidth(params: dict[str, Any]) -> int:
    value = params.get("bandwidthLimit") or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(detail="bandwidthLimit is a number of bytes per second (0: no limit)")
    return value


def _new_volume(session: Session, backup: VolumeBackup, host: Host, near: str | None, **fields: Any) -> Volume:
    volume_uuid = new_uuid()
    path = fields.pop("installPath", None) or hostpaths.new_volume_path(
        hostpaths.reported_roots(host), volume_uuid, "qcow2", near
    )
    ensure_path_free(session, host.uuid, path)
    volume = Volume(
        uuid=volume_uuid,
        hostUuid=host.uuid,
        format="qcow2",
        installPath=path,
        size=backup.size,
        status="Creating",
        **fields,
    )
    session.add(volume)
    session.flush()
    return volume


def request_instant_volume(session: Session, uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    """instantRestoreVolumeFromVolumeBackup: a new qcow2 volume (``name``; joining
    ``vmInstanceUuid`` when given, on its host) that runs from the backup at once."""
    backup = ready_backup(session, uuid)
    if backup.state != "Enabled":
        raise Conflict(detail=f"volume backup {uuid} is Disabled")
    source: Volume | None = session.get(Volume, backup.volumeUuid)
    vm_uuid = params.get("vmInstanceUuid")
    vm: VmInstance | None = get(session, VmInstance, str(vm_uuid), "VM instance") if vm_uuid else None
    host_uuid = params.get("hostUuid") or (vm.hostUuid if vm else None) or (source.hostUuid if source else None)
    if not host_uuid:
        raise InvalidArgument(detail="hostUuid is required: the backup's volume is no longer registered")
    host: Host = get(session, Host, str(host_uuid), "host")
    if vm is not None and vm.hostUuid and vm.hostUuid != host.uuid:
        raise Conflict(detail=f"VM {vm.uuid} runs on host {vm.hostUuid}, not on {host.uuid}")
    fields: dict[str, Any] = {}
    if params.get("installPath") is not None:
        path = hostpaths.require_under(params["installPath"], host.volumeRoots, "installPath", host.uuid)
        if not path.endswith(".qcow2"):
            raise InvalidArgument(detail="an instant restore's volume is a qcow2 overlay: its path ends in .qcow2")
        fields["installPath"] = path
    ref = ready_ref(backup, params.get("backupStorageUuid"), session)
    job_params = {"attachTimeout": _attach_timeout(params), "bandwidthLimit": _bandwidth(params)}
    connected_host(session, host.uuid)
    near = source.installPath if source is not None and source.hostUuid == host.uuid else None
    volume = _new_volume(
        session,
        backup,
        host,
        near,
        name=str(params.get("name") or f"instant restore of {backup.name or backup.uuid}"),
        description=params.get("description"),
        vmInstanceUuid=vm.uuid if vm else None,
        projectUuid=(vm.projectUuid if vm else None) or project_of(session, source),
        type=backup.type if vm is not None else "Data",
        **fields,
    )
    resource = (volume.uuid, Volume.resource_type)
    return _enqueue(
        session, VOLUME_ACTION, [backup], [volume], ref.backupStorageUuid, vm, host, job_params, resource, account
    )


def _enqueue(
    session: Session,
    action: str,
    backups: list[VolumeBackup],
    volumes: list[Volume],
    storage_uuid: str,
    vm: VmInstance | None,
    host: Host,
    params: dict[str, Any],
    resource: tuple[str, str],
    account: str | None,
) -> ApiJob:
    """The instant restore's API job, on the host's queue."""
    return enqueue(
        session,
        action,
        task=tasks.INSTANT_RESTORE,
        queue=host_queue(host.uuid),
        params={
            "backupUuids": [b.uuid for b in backups],
            "volumeUuids": [v.uuid for v in volumes],
            "backupStorageUuid": storage_uuid,
            "vmInstanceUuid": vm.uuid if vm else None,
            **params,
        },
        resource_uuid=resource[0],
        resource_type=resource[1],
        host_uuid=host.uuid,
        account_uuid=account,
    )


def request_instant_vm(session: Session, group_uuid: str, params: dict[str, Any], account: str | None) -> ApiJob:
    """instantRestoreVmFromVmBackup: every volume of the VM backup as a new overlay; the VM
    (the backed-up one, or ``vmInstanceUuid``; Stopped) runs from them at once, its former
    volumes detached (their files untouched) when the overlays are ready."""
    backups = group_backups(session, group_uuid)
    for backup in backups:
        ready_backup(session, backup.uuid)
    storage_uuid = params.get("backupStorageUuid")
    refs = [ready_ref(b, storage_uuid, session) for b in backups]
    storages = {r.backupStorageUuid for r in refs}
    if len(storages) != 1:
        raise Conflict(detail=f"VM backup {group_uuid} has no single storage with every volume: name backupStorageUuid")
    sources = [session.get(Volume, b.volumeUuid) for b in backups]
    vm_uuid = params.get("vmInstanceUuid") or next((v.vmInstanceUuid for v in sources if v and v.vmInstanceUuid), None)
    if not vm_uuid:
        raise InvalidArgument(detail=f"VM backup {group_uuid}'s VM is no longer registered: name vmInstanceUuid")
    vm: VmInstance = get(session, VmInstance, str(vm_uuid), "VM instance")
    if vm.managedBy is not None:  # streaming inside libvirt's QEMU (its block pull) is not done yet
        raise Conflict(
            detail=f"VM {vm.uuid} is a libvirt domain: instant restore runs plain QEMU VMs; use "
            "createVmInstanceFromVmBackup or revertVmFromVmBackup (docs/libvirt.md)"
        )
    if vm.state == "Running":
        raise Conflict(detail=f"VM {vm.uuid} is Running: instant restore starts it from the backup, stop it first")
    host_uuid = vm.hostUuid or next((v.hostUuid for v in sources if v), None)
    if not host_uuid:
        raise InvalidArgument(detail=f"VM {vm.uuid} has no host")
    host: Host = get(session, Host, host_uuid, "host")
    job_params = {"attachTimeout": _attach_timeout(params), "bandwidthLimit": _bandwidth(params)}
    connected_host(session, host.uuid)
    volumes = [
        _new_volume(
            session,
            backup,
            host,
            source.installPath if source is not None and source.hostUuid == host.uuid else None,
            name=f"{(source.name if source else '') or backup.type.lower()} (instant restore)",
            vmInstanceUuid=None,  # joins the VM once its overlay is ready
            projectUuid=vm.projectUuid or project_of(session, source),
            type=backup.type,
        )
        for backup, source in zip(backups, sources, strict=True)
    ]
    resource = (vm.uuid, VmInstance.resource_type)
    return _enqueue(session, VM_ACTION, backups, volumes, storages.pop(), vm, host, job_params, resource, account)


# -- the worker side -------------------------------------------------------------------------------
def export_socket(volume: Volume) -> str:
    """Where the backup behind ``volume`` is exported: the host's VM socket folder (the
    folder for sockets VMs connect to), a name the platform gives."""
    return os.path.join(hostpaths.socket_dir(), f"blockvault-export-{volume.uuid[:16]}.sock")


def _set_status(volumes: list[Volume], status: str) -> None:
    """Record ``status`` in a session of its own (the job's may be rolled back after)."""
    with db.session() as session:
        for volume in volumes:
            row = session.get(Volume, volume.uuid)
            if row is not None:
                row.status = status


def _open_in(monitor: Monitor, paths: list[Path]) -> list[str] | None:
    """The format nodes of ``paths`` in the VM's QEMU, when it has every one open."""
    nodes = []
    for path in paths:
        try:
            node = monitor.format_node(str(path))
        except MonitorError:
            return None
        nodes.append(str(node.get("node-name")))
    return nodes


def _wait_for_vm(vm: VmInstance | None, paths: list[Path], timeout: float) -> tuple[str, list[str]] | None:
    """(its QMP socket, the overlays' nodes) once the VM's QEMU runs from every overlay;
    None when it has no monitor or does not within ``timeout`` seconds."""
    if vm is None or not vm.qmpSocket:
        return None
    socket = hostpaths.resolve_socket(vm.qmpSocket, f"VM {vm.uuid}'s qmpSocket")
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(MonitorError), Monitor(socket) as monitor:
            nodes = _open_in(monitor, paths)
            if nodes is not None:
                return socket, nodes
        if time.monotonic() >= deadline:
            return None
        time.sleep(ATTACH_POLL_SECONDS)


def run_instant(session: Session, job: ApiJob) -> dict[str, Any]:
    params = job.params or {}
    backups: list[VolumeBackup] = [get(session, VolumeBackup, u, "volume backup") for u in params["backupUuids"]]
    volumes: list[Volume] = [get(session, Volume, u, "volume") for u in params["volumeUuids"]]
    vm: VmInstance | None = (
        get(session, VmInstance, params["vmInstanceUuid"], "VM instance") if params.get("vmInstanceUuid") else None
    )
    for volume in volumes:
        if volume.status != "Creating":
            raise Conflict(detail=f"volume {volume.uuid} is {volume.status}, not being created")
    storage = None
    manifests = []
    for backup in backups:
        storage, ref = copy_on(session, backup, params["backupStorageUuid"])
        manifests.append(manifest_id(ref))
    assert storage is not None
    repo = open_repository(storage)
    started = time.monotonic()
    made: list[Path] = []
    streaming = False
    with contextlib.ExitStack() as stack:
        views, servers = [], []
        try:
            targets = [hostpaths.resolve_new_volume(v.installPath, f"volume {v.uuid}") for v in volumes]
            for volume, manifest, target in zip(volumes, manifests, targets, strict=True):
                socket = export_socket(volume)
                server, view = stack.enter_context(
                    export_backup(repo, manifest, socket, mode=0o660, cache_bytes=get_settings().export_cache_mb << 20)
                )
                views.append(view)
                servers.append(server)
                create_overlay(str(target), nbd_uri(socket), view.size)
                made.append(target)
            _publish(session, volumes, vm, job)
            streaming = True
            log.info("instant.ready job=%s volumes=%s seconds=%.3f", job.uuid, len(volumes), time.monotonic() - started)
            attach, speed = float(params.get("attachTimeout") or 0), int(params.get("bandwidthLimit") or 0)
            result = _stream_all(session, job, vm, volumes, targets, attach, speed)
            for volume, target in zip(volumes, targets, strict=True):
                if backing_of(str(target)) is not None:
                    raise StreamFailed(what=f"volume {volume.uuid}", detail="the overlay still has its backing")
        except BaseException as exc:
            if not streaming:
                for path in made:  # nothing ran from them: no file is left behind
                    path.unlink(missing_ok=True)
            else:
                _set_status(volumes, "Failed")
                if isinstance(exc, BlockvaultError):
                    log.error("instant.failed job=%s error=%s", job.uuid, exc)
            raise
        for server in servers:  # QEMU lets go of a backing it no longer needs; then the export stops
            server.wait_idle(IDLE_WAIT_SECONDS)
        stats = [
            {
                "firstReadSeconds": round(v.stats.first_read - started, 3) if v.stats.first_read else None,
                "bytesFetched": v.stats.bytes_fetched,
            }
            for v in views
        ]
    for volume in volumes:
        volume.status = "Ready"
    session.commit()
    answer = {**result, "exports": stats, "seconds": round(time.monotonic() - started, 3)}
    if job.action == VOLUME_ACTION:
        return {**inventory(session, volumes[0]), "instantRestore": answer}
    return {"volumes": [inventory(session, v) for v in volumes], "instantRestore": answer}


def _publish(session: Session, volumes: list[Volume], vm: VmInstance | None, job: ApiJob) -> None:
    """The overlays exist: the volumes are usable (``Streaming``), and a VM restore's VM runs
    from them now (its former volumes detached)."""
    if job.action == VM_ACTION and vm is not None:
        session.refresh(vm)
        if vm.state == "Running":
            raise Conflict(detail=f"VM {vm.uuid} is Running: instant restore starts it from the backup")
        former = session.scalars(select(Volume).where(Volume.vmInstanceUuid == vm.uuid)).all()
        for volume in former:
            volume.vmInstanceUuid = None
        for volume in volumes:
            volume.vmInstanceUuid = vm.uuid
    for volume in volumes:
        volume.status = "Streaming"
    job.progress = 1
    session.commit()


def _stream_all(
    session: Session,
    job: ApiJob,
    vm: VmInstance | None,
    volumes: list[Volume],
    targets: list[Path],
    attach: float,
    speed: int,
) -> dict[str, Any]:
    report = progress_reporter(job.uuid)
    total = sum(v.size for v in volumes) or 1
    done_before = 0

    def scaled(offset: int, _length: int) -> None:
        report(done_before + offset, total)

    started_vm = vm is not None and hypervisor.start_vm(session, vm, volumes)
    running = _wait_for_vm(vm, targets, attach if not started_vm else max(attach, 60.0))
    mode = "vm" if running else "storage-daemon"
    started = time.monotonic()
    for index, (volume, target) in enumerate(zip(volumes, targets, strict=True)):
        what = f"volume {volume.uuid}"
        job_id = f"blockvault-{job.uuid[:8]}-{index}"
        if running is not None:
            socket, nodes = running
            try:
                with Monitor(socket) as monitor:
                    stream(monitor, nodes[index], job_id, what, progress=scaled, speed=speed)
            except (StreamFailed, MonitorError) as exc:
                _pause(socket, vm)
                reason = exc.fields.get("detail", str(exc))
                raise StreamFailed(what=what, detail=f"{reason}; the VM is paused, its writes kept") from None
        else:
            with QemuStorageDaemon(str(target)) as daemon, Monitor(daemon.qmp_socket) as monitor:
                stream(monitor, daemon.node, job_id, what, progress=scaled, speed=speed)
        done_before += volume.size
    return {"mode": mode, "streamSeconds": round(time.monotonic() - started, 3)}


def _pause(socket: str, vm: VmInstance | None) -> None:
    """Pause the VM whose backing went away (QMP ``stop``), so the guest waits instead of
    failing reads; best effort (a VM that is gone is not paused)."""
    try:
        with Monitor(socket) as monitor:
            monitor.cmd("stop")
        log.warning("instant.vm_paused vm=%s", vm.uuid if vm else None)
    except MonitorError as exc:
        log.error("instant.vm_not_paused vm=%s error=%s", vm.uuid if vm else None, exc)
