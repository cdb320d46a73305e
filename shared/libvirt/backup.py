"""Live backups of libvirt domains: libvirt's backup API in pull mode, checkpoints as the chain.

A Running domain is backed up the way virtnbdbackup does it, with nothing added to the domain:

1. ``virDomainBackupBegin`` with a ``<domainbackup mode='pull'>``: libvirt has QEMU export every
   backed-up disk over NBD, all at one instant, on a UNIX socket in this host's run folder for
   the domain (``<work_dir>/<key>/nbd.sock``; the per-disk scratch files beside it hold the old
   contents of what the guest overwrites meanwhile). With the same call a
   ``<domaincheckpoint>`` named ``blockvault-<run>`` starts a persistent qcow2 bitmap on each
   qcow2 disk at that instant. The guest's filesystems are frozen around the call
   (``virDomainFSFreeze``/``Thaw``) when its agent answers.
2. Each export is read with the engine's NBD client: ``base:allocation`` for a full read, and
   for an incremental the meta context ``qemu:dirty-bitmap:backup-<target>`` that libvirt
   builds from the base checkpoint (every write since it, up to the instant).
3. The job is ended (``virDomainAbortJob``: libvirt removes the exports and scratch files).
   Once the manifests are committed (``on_committed``), the checkpoints this backup supersedes
   are deleted; never before.

Checkpoint ↔ backup: a manifest's metadata names the checkpoint whose bitmap tracks every
write since (a point no later than) that backup's instant (:data:`CHECKPOINT_KEY`). The next
backup of the disk takes its base manifest (the catalog's newest copy, else the repository's
newest for the path) and, when that checkpoint still exists, reads only what it marks dirty.
A stopped domain's disk is backed up from the file with the same bitmap
(:func:`backup_stopped_disk`, qemu-nbd): libvirt cannot create checkpoints of an inactive
domain, so that backup names the same checkpoint, and the chain goes on from it.

Faults: the checkpoint a run creates is written to ``pending`` in the run folder before the
call; a run that fails deletes its checkpoint, a run killed mid-way leaves ``pending``, a
backup job whose export socket is ours, and sockets or scratch files; the next backup of the
domain aborts that job, deletes that checkpoint and those files first (backups of one domain
on a host take a file lock). Deleting a checkpoint never loses a write: libvirt keeps every
checkpoint's bitmap recording, so the base's own bitmap still covers everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import libvirt

from shared.errors import BlockvaultError, LibvirtError, MonitorError, VolumeError
from shared.failpoints import failpoint
from shared.libvirt import connection
from shared.repository import qemu
from shared.repository.backup import BackupResult, choose_plan, run_plan
from shared.repository.live import LiveDisk, LiveResult, run_lock
from shared.repository.locks import repository_lock
from shared.repository.manifest import BackupEntry
from shared.repository.nbd import NBDClient, NBDError
from shared.repository.repo import Repository
from shared.repository.volume import NbdReader, open_reader, probe_volume

log = logging.getLogger(__name__)

PREFIX = "blockvault-"
CHECKPOINT_KEY = "libvirtCheckpoint"
"""Manifest metadata key: the checkpoint whose bitmap covers every write since the backup."""
_JOB_GONE_TIMEOUT = 30.0
_MAX_SOCKET_PATH = 100  # sun_path holds 107 bytes

Progress = Callable[[int, int], None]


connection.module()  # libvirt's errors are raised, not also printed on stderr (its quiet handler)


def domain_uuid(vm_uuid: str) -> str:
    """The libvirt domain uuid of a VM row (a ZStack uuid is the domain's without dashes)."""
    return str(uuid.UUID(vm_uuid))


class DomainError(MonitorError):
    """libvirt domain {socket}: {detail}"""


@dataclass
class _Disk:
    spec: LiveDisk
    index: int
    target: str
    format: str
    size: int = 0
    base: BackupEntry | None = None  # the manifest whose checkpoint this disk reads from
    since: str | None = None  # that checkpoint, when the disk is read incrementally
    checkpointed: bool = False  # qcow2: the new checkpoint has a bitmap on it


@dataclass
class DomainDisk:
    """One ``<disk device='disk'>`` of a domain's XML."""

    target: str
    type: str  # file, block, network, volume...
    source: str  # the path, or a description of a source that is not one
    format: str


def domain_disks(xml: str) -> list[DomainDisk]:
    """The disks (not CD-ROMs, floppies or LUNs) of a domain, from its XML."""
    disks = []
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        kind = disk.get("type", "file")
        target = disk.find("target")
        driver = disk.find("driver")
        source = disk.find("source")
        where = ""
        if source is not None:
            where = source.get("file") or source.get("dev") or ""
            if kind not in ("file", "block"):
                host = source.find("host")
                where = f"{source.get('protocol', kind)}:{source.get('name', '')}" + (
                    f" ({host.get('socket') or host.get('name')})" if host is not None else ""
                )
        disks.append(
            DomainDisk(
                target=target.get("dev", "") if target is not None else "",
                type=kind,
                source=where,
                format=driver.get("type", "raw") if driver is not None else "raw",
            )
        )
    return disks


def open_domain(uri: str, vm_uuid: str) -> tuple[libvirt.virConnect, libvirt.virDomain]:
    """A connection to ``uri`` and the domain of the VM row ``vm_uuid``; DomainError if either
    is missing."""
    try:
        conn = connection.open_connection(uri)
    except LibvirtError as exc:
        raise DomainError(socket=f"{vm_uuid} at {uri}", detail=f"cannot connect: {exc.fields['detail']}") from None
    try:
        return conn, conn.lookupByUUIDString(domain_uuid(vm_uuid))
    except (libvirt.libvirtError, ValueError) as exc:
        connection.close(conn)
        raise DomainError(socket=f"{vm_uuid} at {uri}", detail=f"no such domain ({exc})") from None


def is_domain(uri: str | None, vm_uuid: str) -> bool:
    """Whether ``vm_uuid`` is a domain of the libvirt at ``uri`` (False when unreachable)."""
    if not uri:
        return False
    try:
        conn, _dom = open_domain(uri, vm_uuid)
    except DomainError:
        return False
    connection.close(conn)
    return True


def _fail(dom: libvirt.virDomain, detail: str) -> DomainError:
    return DomainError(socket=dom.name(), detail=" ".join(detail.split()))


# -- the run folder: lock, export socket, scratch files, pending checkpoint ----------------------


def _run_dir(work_dir: Path, dom: libvirt.virDomain) -> Path:
    key = hashlib.sha256(dom.UUIDString().encode()).hexdigest()[:16]
    run_dir = work_dir / key
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return run_dir


def _qemu_owner(xml: str) -> tuple[int, int] | None:
    """The uid and gid the domain's QEMU runs as (its DAC label), when libvirt says."""
    for label in ET.fromstring(xml).findall("./seclabel[@model='dac']/label"):
        user, _, group = (label.text or "").partition(":")
        with contextlib.suppress(ValueError):
            return int(user.lstrip("+")), int(group.lstrip("+"))
    return None


def _reachable(folder: Path, owner: tuple[int, int] | None) -> bool:
    """Whether QEMU running as ``owner`` may walk down to ``folder`` (root may go anywhere)."""
    if owner is None or owner[0] == 0:
        return True
    uid, gid = owner
    for part in [folder, *folder.parents]:
        st = part.stat()
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return False
    return True


def _export_dir(run_dir: Path, xml: str) -> Path:
    """The folder of the export socket and scratch files, owned by the domain's QEMU user
    (QEMU creates them): ``<run folder>/export`` when QEMU may reach the run folder and the
    socket path fits, else a private folder under the system's temporary folder."""
    owner = _qemu_owner(xml)
    if run_dir.stat().st_mode & 0o011 != 0o011 and owner is not None and owner[0] != 0:
        run_dir.chmod(0o711)  # walking through only: nothing in it can be listed
    exports = run_dir / "export"
    if len(str(exports / "nbd.sock")) > _MAX_SOCKET_PATH or not _reachable(run_dir, owner):
        exports = Path(tempfile.mkdtemp(prefix="bv-lv-"))
        (run_dir / "export-dir").write_text(f"{exports}\n")  # so that the next run cleans it
    exports.mkdir(mode=0o700, exist_ok=True)
    if owner is not None:
        os.chown(exports, *owner)
    return exports


def _backup_job(dom: libvirt.virDomain) -> str | None:
    """The XML of the domain's running backup job, if any."""
    try:
        return str(dom.backupGetXMLDesc())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_BACKUP, libvirt.VIR_ERR_OPERATION_INVALID):
            return None
        raise


def _end_job(dom: libvirt.virDomain) -> None:
    """End the domain's backup job and wait until libvirt has let it go."""
    with contextlib.suppress(libvirt.libvirtError):  # finished or gone already
        dom.abortJob()
    deadline = time.monotonic() + _JOB_GONE_TIMEOUT
    while _backup_job(dom) is not None:
        if time.monotonic() >= deadline:
            raise _fail(dom, "the backup job does not end")
        time.sleep(0.1)


def _checkpoints(dom: libvirt.virDomain) -> dict[str, libvirt.virDomainCheckpoint]:
    return {cp.getName(): cp for cp in dom.listAllCheckpoints()}


def _checkpoint_disks(cp: libvirt.virDomainCheckpoint) -> set[str]:
    """The disks a checkpoint has a bitmap on."""
    root = ET.fromstring(cp.getXMLDesc())
    return {d.get("name", "") for d in root.findall("./disks/disk") if d.get("checkpoint") == "bitmap"}


def _delete_checkpoint(dom: libvirt.virDomain, name: str) -> bool:
    try:
        dom.checkpointLookupByName(name).delete()
        return True
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return False
        raise


def clean_up(dom: libvirt.virDomain, run_dir: Path) -> list[str]:
    """Remove what an earlier run left: its backup job (when its export socket is in our run
    folder), the checkpoint it created without a committed backup, its sockets and scratch
    files. Returns what it removed."""
    removed: list[str] = []
    job = _backup_job(dom)
    if job is not None:
        server = ET.fromstring(job).find("server")
        socket_path = server.get("socket", "") if server is not None else ""
        ours = [run_dir / "export", *[Path(p) for p in _read_lines(run_dir / "export-dir")]]
        if not any(socket_path.startswith(f"{folder}/") for folder in ours):
            raise _fail(dom, f"another backup job runs on the domain (export {socket_path or 'not ours'})")
        _end_job(dom)
        removed.append("backup job")
    pending = run_dir / "pending"
    for name in _read_lines(pending):
        if _delete_checkpoint(dom, name):
            removed.append(name)
    pending.unlink(missing_ok=True)
    for leftover in (run_dir / "export").glob("*"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover.name)
    for folder in _read_lines(run_dir / "export-dir"):
        if Path(folder).is_dir():
            removed += [p.name for p in Path(folder).iterdir()]
            shutil.rmtree(folder, ignore_errors=True)
    (run_dir / "export-dir").unlink(missing_ok=True)
    return removed


def _read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().split() if line]
    except FileNotFoundError:
        return []


# -- choosing each disk's base ------------------------------------------------------------------


def _base(repo: Repository, spec: LiveDisk, checkpoints: set[str] | None = None) -> BackupEntry | None:
    """The disk's newest backup: the catalog's (``spec.parent``). Without one, the
    repository's newest for the path that names one of ``checkpoints`` (a backup committed
    on storage but refused by its caller has lost its checkpoint), else its newest."""
    if spec.parent:
        mid = repo.resolve(spec.parent)
        return BackupEntry(mid, repo.load_manifest(mid))
    if checkpoints:
        ours = [e for e in repo.backups() if e.manifest.volume == spec.path and not e.manifest.is_stream]
        for entry in sorted(ours, key=lambda e: e.manifest.created, reverse=True):
            if entry.manifest.metadata.get(CHECKPOINT_KEY) in checkpoints:
                return entry
    return repo.newest(spec.path)


def _match(
    dom: libvirt.virDomain, xml: str, disks: list[LiveDisk], whole_vm: bool
) -> list[tuple[LiveDisk, DomainDisk]]:
    """Each requested disk's place in the domain. A disk the engine cannot read (a network
    source) fails a VM backup with its name."""
    found = domain_disks(xml)
    for disk in found:
        if disk.type not in ("file", "block") and whole_vm:
            raise VolumeError(
                path=f"{dom.name()}/{disk.target}",
                detail=f"a {disk.type} disk ({disk.source}) cannot be backed up: blockvault reads file and block disks",
            )
    by_path = {os.path.realpath(d.source): d for d in found if d.type in ("file", "block")}
    matched = []
    for spec in disks:
        domain_disk = by_path.get(os.path.realpath(spec.path))
        if domain_disk is None:
            raise VolumeError(path=spec.path, detail=f"domain {dom.name()} has no such disk")
        matched.append((spec, domain_disk))
    return matched


# -- the backup ---------------------------------------------------------------------------------


AGENT_CHANNEL = "org.qemu.guest_agent.0"


def _freeze(dom: libvirt.virDomain, quiesce: bool) -> tuple[bool, str | None]:
    """Freeze the guest's filesystems through libvirt; (frozen, why not). A domain without a
    guest agent channel is not asked (nothing to report)."""
    if not quiesce or AGENT_CHANNEL not in dom.XMLDesc(0):
        return False, None
    try:
        dom.fsFreeze()
        return True, None
    except libvirt.libvirtError as exc:
        log.info("libvirt.quiesce_failed domain=%s error=%s", dom.name(), exc)
        return False, str(exc)


def _thaw(dom: libvirt.virDomain, frozen: bool) -> None:
    if frozen:
        try:
            dom.fsThaw()
        except libvirt.libvirtError as exc:
            log.error("libvirt.thaw_failed domain=%s error=%s", dom.name(), exc)


def _backup_xml(disks: list[_Disk], all_targets: list[str], socket_path: Path, exports: Path) -> str:
    parts = []
    wanted = {d.target: d for d in disks}
    for target in all_targets:
        disk = wanted.get(target)
        if disk is None:
            parts.append(f"<disk name={quoteattr(target)} backup='no'/>")
            continue
        mode = f"backupmode='incremental' incremental={quoteattr(disk.since)}" if disk.since else "backupmode='full'"
        scratch = quoteattr(str(exports / f"scratch-{target}.qcow2"))
        parts.append(f"<disk name={quoteattr(target)} backup='yes' type='file' {mode}><scratch file={scratch}/></disk>")
    server = f"<server transport='unix' socket={quoteattr(str(socket_path))}/>"
    return f"<domainbackup mode='pull'>{server}<disks>{''.join(parts)}</disks></domainbackup>"


def _checkpoint_xml(name: str, disks: list[_Disk], all_targets: list[str]) -> str:
    bitmap = {d.target for d in disks if d.checkpointed}
    parts = [
        f"<disk name={quoteattr(t)} checkpoint={quoteattr('bitmap' if t in bitmap else 'no')}/>" for t in all_targets
    ]
    return (
        f"<domaincheckpoint><name>{name}</name><description>blockvault backup</description>"
        f"<disks>{''.join(parts)}</disks></domaincheckpoint>"
    )


def backup_domain(
    repo: Repository,
    dom: libvirt.virDomain,
    disks: list[LiveDisk],
    *,
    work_dir: Path,
    full: bool = False,
    whole_vm: bool = True,
    quiesce: bool = True,
    progress: Progress | None = None,
    lock_wait: float = 60.0,
    on_committed: Callable[[LiveResult], None] | None = None,
) -> LiveResult:
    """Back up ``disks`` (paths of the running domain ``dom``'s disks) at one instant.

    ``whole_vm``: every disk of the domain must be readable (a VM backup). ``on_committed``
    runs once every manifest is on storage and before older checkpoints are deleted; if it
    raises, the new checkpoint goes and the old ones stay, so the next backup still covers
    everything."""
    if not disks:
        raise VolumeError(path=dom.name(), detail="no disks to back up")
    started = time.monotonic()
    xml = dom.XMLDesc(0)
    matched = _match(dom, xml, disks, whole_vm)
    run_dir = _run_dir(work_dir, dom)
    with (
        run_lock(run_dir, lock_wait, _fail(dom, "another backup of this domain is running")),
        repository_lock(repo.backend, "shared", f"live backup of domain {dom.name()}", wait=lock_wait),
    ):
        repo.refresh_index()
        leftovers = clean_up(dom, run_dir)
        if leftovers:
            log.warning("libvirt.leftovers_removed domain=%s removed=%s", dom.name(), leftovers)
        checkpoints = _checkpoints(dom)
        prepared = []
        for index, (spec, found) in enumerate(matched):
            disk = _Disk(spec=spec, index=index, target=found.target, format=found.format)
            disk.size = int(dom.blockInfo(found.target)[0])
            disk.checkpointed = found.format == "qcow2"
            base = None if full else _base(repo, spec, set(checkpoints))
            since = str(base.manifest.metadata.get(CHECKPOINT_KEY) or "") if base else ""
            if (
                base is not None
                and disk.checkpointed
                and since in checkpoints
                and found.target in _checkpoint_disks(checkpoints[since])
                and base.manifest.size == disk.size
                and base.manifest.chunkSize == repo.chunk_size
            ):
                disk.since = since
            disk.base = base
            prepared.append(disk)
        targets = [d.target for d in domain_disks(xml)]
        return _backup(repo, dom, prepared, targets, run_dir, _export_dir(run_dir, xml), full, quiesce, progress,
                       on_committed, started)  # fmt: skip


def _begin(
    dom: libvirt.virDomain, disks: list[_Disk], targets: list[str], name: str, exports: Path, quiesce: bool
) -> tuple[bool, str | None]:
    """Start the pull-mode backup and the new checkpoint at one instant; (frozen, why not).
    A base checkpoint whose bitmap libvirt cannot use (QEMU died with it open) makes that
    call fail: then every disk is read whole."""
    socket_path = exports / "nbd.sock"

    def begin() -> None:
        dom.backupBegin(_backup_xml(disks, targets, socket_path, exports), _checkpoint_xml(name, disks, targets))

    frozen, why = _freeze(dom, quiesce)
    try:
        try:
            begin()
        except libvirt.libvirtError as exc:
            if not any(d.since for d in disks):
                raise _fail(dom, f"backup begin: {exc}") from None
            log.warning("libvirt.incremental_refused domain=%s error=%s: reading every disk", dom.name(), exc)
            for disk in disks:
                disk.since = None
            try:
                begin()
            except libvirt.libvirtError as again:
                raise _fail(dom, f"backup begin: {again}") from None
    finally:
        _thaw(dom, frozen)
    return frozen, why


def _backup(
    repo: Repository,
    dom: libvirt.virDomain,
    disks: list[_Disk],
    targets: list[str],
    run_dir: Path,
    exports: Path,
    full: bool,
    quiesce: bool,
    progress: Progress | None,
    on_committed: Callable[[LiveResult], None] | None,
    started: float,
) -> LiveResult:
    name = f"{PREFIX}{uuid.uuid4().hex[:12]}"
    pending = run_dir / "pending"
    pending.write_text(name + "\n")  # first: a run killed right after the begin still loses it
    try:
        frozen, why = _begin(dom, disks, targets, name, exports, quiesce)
        consistency = "application" if frozen else "crash"
        log.info("libvirt.instant domain=%s disks=%d consistency=%s checkpoint=%s", dom.name(), len(disks),
                 consistency, name)  # fmt: skip
        failpoint("libvirt.exported")
        results = _read_disks(repo, dom, disks, exports / "nbd.sock", full, consistency, name, progress, started)
        _end_job(dom)
        result = LiveResult(results, consistency, why)
        if on_committed is not None:
            on_committed(result)
        pending.unlink()
    except BaseException:
        _undo(dom, name, pending)
        raise
    finally:
        if exports != run_dir / "export":
            shutil.rmtree(exports, ignore_errors=True)
            (run_dir / "export-dir").unlink(missing_ok=True)
    failpoint("libvirt.committed")
    _drop_superseded(dom, name)
    return result


def _read_disks(
    repo: Repository,
    dom: libvirt.virDomain,
    disks: list[_Disk],
    socket_path: Path,
    full: bool,
    consistency: str,
    checkpoint: str,
    progress: Progress | None,
    started: float,
) -> list[BackupResult]:
    results: list[BackupResult] = []
    for disk in disks:

        def connect(contexts: list[str], export: str = disk.target) -> NBDClient:
            return NBDClient.connect_unix(str(socket_path), export, contexts)

        def scaled(done: int, total: int, i: int = disk.index) -> None:
            if progress:
                progress(i * 1000 + (done * 1000 // total if total else 0), len(disks) * 1000)

        bitmap = f"backup-{disk.target}" if disk.since else None
        reader = NbdReader(disk.spec.path, disk.size, bitmap, connect, fmt=disk.spec.format)
        metadata: dict[str, Any] = {**disk.spec.metadata, "consistency": consistency, "live": True}
        if disk.checkpointed:
            metadata[CHECKPOINT_KEY] = checkpoint
        try:
            parent = disk.base.id if disk.base is not None and not disk.since and not full else None
            plan = choose_plan(repo, reader, full=full, parent_id=parent, bitmap_base=disk.base if disk.since else None)
            results.append(run_plan(repo, reader, plan, disk.spec.name, metadata, None, started, scaled))
        except BaseException as exc:
            _forget(repo, results)
            if isinstance(exc, NBDError | OSError):
                raise _read_failure(dom, disk, exc) from None
            raise
        finally:
            reader.close()
    return results


def _forget(repo: Repository, results: list[BackupResult]) -> None:
    """The disks read before one failed: their manifests go too (no part of a VM backup)."""
    for result in results:
        try:
            repo.delete_manifest(result.id)
        except BlockvaultError as exc:
            log.warning("libvirt.partial_manifest_kept id=%s error=%s", result.id[:12], exc)


def _read_failure(dom: libvirt.virDomain, disk: _Disk, exc: BaseException) -> BlockvaultError:
    try:
        running = dom.isActive() and _backup_job(dom) is not None
    except libvirt.libvirtError:
        running = False
    if not running:
        return _fail(dom, f"the backup job went away while {disk.target} ({disk.spec.path}) was read ({exc})")
    return VolumeError(path=disk.spec.path, detail=f"reading it from libvirt's export failed: {exc}")


def _undo(dom: libvirt.virDomain, name: str, pending: Path) -> None:
    """After a failure: end the job, delete this run's checkpoint (the base's bitmap still
    covers every write). What cannot be undone now (libvirtd away) the next run does."""
    try:
        _end_job(dom)
        _delete_checkpoint(dom, name)
        pending.unlink(missing_ok=True)
    except (libvirt.libvirtError, DomainError) as exc:
        log.warning("libvirt.undo_failed domain=%s error=%s", dom.name(), exc)


def _drop_superseded(dom: libvirt.virDomain, name: str) -> None:
    """After commit: the older blockvault checkpoints whose disks the new one all covers."""
    try:
        checkpoints = _checkpoints(dom)
        covered = _checkpoint_disks(checkpoints[name]) if name in checkpoints else set()
        for old, cp in sorted(checkpoints.items()):
            if old != name and old.startswith(PREFIX) and _checkpoint_disks(cp) <= covered:
                cp.delete()
    except libvirt.libvirtError as exc:  # the next commit deletes them
        log.warning("libvirt.checkpoint_cleanup_failed domain=%s error=%s", dom.name(), exc)


# -- a stopped domain's disk --------------------------------------------------------------------


def backup_stopped_disk(
    repo: Repository,
    spec: LiveDisk,
    *,
    full: bool = False,
    progress: Progress | None = None,
    lock_wait: float = 60.0,
    volume_format: str | None = None,
) -> BackupResult:
    """Back up the file of a stopped domain's disk, continuing its checkpoint chain: when the
    base backup's checkpoint has a usable bitmap in the qcow2 image, only what it marks dirty
    is read (through qemu-nbd), and the new backup names the same checkpoint (libvirt cannot
    create one for an inactive domain; the bitmap still covers every write since it)."""
    started = time.monotonic()
    with repository_lock(repo.backend, "shared", f"backup of {spec.path}", wait=lock_wait):
        repo.refresh_index()
        path, fmt = probe_volume(spec.path, volume_format)
        base = None if full else _base(repo, spec)
        since = str(base.manifest.metadata.get(CHECKPOINT_KEY) or "") if base else ""
        usable = False
        if since and fmt == "qcow2":
            try:
                usable = any(
                    b["name"] == since and "in-use" not in b["flags"] and "auto" in b["flags"]
                    for b in qemu.list_bitmaps(path)
                )
            except qemu.QemuError as exc:
                raise VolumeError(path=spec.path, detail=str(exc)) from None
        metadata = {**spec.metadata, **({CHECKPOINT_KEY: since} if usable else {})}
        reader = open_reader(path, since if usable else None, fmt)
        try:
            parent = base.id if base is not None and not usable else None
            plan = choose_plan(repo, reader, full=full, parent_id=parent, bitmap_base=base if usable else None)
            return run_plan(repo, reader, plan, spec.name, metadata, None, started, progress)
        finally:
            reader.close()
