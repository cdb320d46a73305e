"""Live backups: the disks of a running VM, read from its QEMU at one instant.

A file that a running QEMU writes cannot be read consistently from outside, so a live backup
asks QEMU itself (over QMP, :class:`~shared.repository.qmp.Monitor`), the way Proxmox Backup
Server and virtnbdbackup do:

1. Every disk gets a *fleecing* overlay: a temporary qcow2 node whose backing is the disk's
   node, filled by a ``blockdev-backup sync=none`` job with the old contents of every block
   the guest overwrites from then on. Reading the overlay gives the disk as it was when the
   job started, while the guest keeps running.
2. One QMP ``transaction`` starts the jobs of all disks together (the instant), and for each
   qcow2 disk adds the persistent bitmap ``NAME.next`` (it tracks writes from the instant on)
   and disables ``NAME`` (frozen: the writes since the last backup, up to the instant). With
   a guest agent, the guest's filesystems are frozen around that transaction.
3. QEMU's NBD server exports each overlay, with the frozen bitmap; the engine reads only the
   dirty extents (incremental) or the allocated ones (full) and writes the manifest.
4. Every node, job, export and temporary file is removed; after the backups are committed
   the bitmaps rotate in one transaction (``NAME`` := ``NAME.next``, markers as in
   :mod:`shared.repository.backup`). A backup that fails merges ``NAME.next`` back into
   ``NAME``, so the bitmap still covers every write since the last good backup.

A worker killed mid-way leaves QEMU with nodes, jobs and an export named ``blockvault-*``;
the next live backup of that VM removes them first (backups of one VM take a file lock, so
it never removes another run's). A QEMU killed mid-way loses its unsaved persistent bitmaps
(QEMU writes them to the image on a clean shutdown and marks loaded ones in use while it
runs); the next backup finds none it can trust and reads every allocated block, storing only
the chunks that changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import BlockvaultError, GuestAgentError, MonitorError, VolumeError
from shared.failpoints import failpoint

from . import qemu
from .backup import (
    NEXT,
    BackupResult,
    bitmap_base,
    choose_plan,
    promote_next,
    rotate_bitmap,
    run_plan,
    settle_bitmaps,
)
from .locks import repository_lock
from .manifest import BackupEntry
from .nbd import NBDClient, NBDError
from .qmp import GuestAgent, Monitor
from .repo import Repository
from .volume import NbdReader

log = logging.getLogger(__name__)

PREFIX = "blockvault-"
_GONE_TIMEOUT = 20.0

Progress = Callable[[int, int], None]


@dataclass
class LiveDisk:
    """One disk of the running VM: the image file its QEMU has open."""

    path: str
    format: str = "qcow2"
    name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None  # this disk's newest backup in the repository, when not by bitmap


@dataclass
class LiveResult:
    backups: list[BackupResult]
    consistency: str  # "application" (guest filesystems frozen) or "crash"
    quiesceError: str | None = None


@dataclass
class _Disk:
    spec: LiveDisk
    index: int
    node: str
    size: int
    bitmap: str | None  # the tracking bitmap's name; None for raw disks
    base: BackupEntry | None = None
    has_bitmap: bool = False
    fleece_file: str = ""
    fleece_node: str = ""
    job: str = ""
    export: str = ""


def _run_dir(work_dir: Path, qmp_socket: str) -> Path:
    key = hashlib.sha256(os.path.realpath(qmp_socket).encode()).hexdigest()[:16]
    run_dir = work_dir / key
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@contextlib.contextmanager
def run_lock(run_dir: Path, wait: float, busy: BlockvaultError) -> Iterator[None]:
    """One live backup of a VM at a time on this host (``busy`` after ``wait`` seconds);
    released when the process dies."""
    fd = os.open(run_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise busy from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def _vm_lock(run_dir: Path, qmp_socket: str, wait: float) -> contextlib.AbstractContextManager[None]:
    return run_lock(run_dir, wait, MonitorError(socket=qmp_socket, detail="another live backup of this VM is running"))


def _wait_gone(mon: Monitor, what: Callable[[Monitor], list[str]], names: set[str]) -> None:
    deadline = time.monotonic() + _GONE_TIMEOUT
    while names & set(what(mon)):
        if time.monotonic() >= deadline:
            raise MonitorError(socket=mon.socket_path, detail=f"QEMU still holds {sorted(names & set(what(mon)))}")
        time.sleep(0.05)


def _jobs(mon: Monitor) -> list[str]:
    return [str(job["device"]) for job in mon.cmd("query-block-jobs")]


def _exports(mon: Monitor) -> list[str]:
    return [str(export["id"]) for export in mon.cmd("query-block-exports")]


def _nodes(mon: Monitor) -> list[str]:
    return [str(node.get("node-name", "")) for node in mon.block_nodes()]


def clean_up(mon: Monitor, run_dir: Path, *, hard: bool = True) -> list[str]:
    """Remove every export, job and node a live backup made in this QEMU, stop the NBD server
    when a live backup started it, and delete the overlays' files. Returns what it removed."""
    removed: list[str] = []
    exports = {e for e in _exports(mon) if e.startswith(PREFIX)}
    for export in sorted(exports):
        with contextlib.suppress(MonitorError):
            mon.cmd("block-export-del", id=export, mode="hard" if hard else "safe")
    _wait_gone(mon, _exports, exports)
    jobs = {j for j in _jobs(mon) if j.startswith(PREFIX)}
    for job in sorted(jobs):
        with contextlib.suppress(MonitorError):
            mon.cmd("block-job-cancel", device=job, force=True)
    _wait_gone(mon, _jobs, jobs)
    nodes = {n for n in _nodes(mon) if n.startswith(PREFIX)}
    for node in sorted(nodes):
        mon.cmd("blockdev-del", **{"node-name": node})
    if (run_dir / "nbd-server").exists():
        with contextlib.suppress(MonitorError):  # not running any more: fine
            mon.cmd("nbd-server-stop")
        _forget_nbd_server(run_dir)
        removed.append("nbd-server")
    removed += _remove_overlays(run_dir)
    return [*sorted(exports), *sorted(jobs), *sorted(nodes), *removed]


def _forget_nbd_server(run_dir: Path) -> None:
    """Remove the record that a live backup started QEMU's NBD server, and its socket folder."""
    server = run_dir / "nbd-server"
    shutil.rmtree(server.read_text().strip() or "/nonexistent", ignore_errors=True)
    server.unlink()


def _remove_overlays(run_dir: Path) -> list[str]:
    """Delete the fleecing overlays' files; their names."""
    removed = []
    for leftover in run_dir.glob("fleece-*.qcow2"):
        leftover.unlink(missing_ok=True)
        removed.append(leftover.name)
    return removed


def _promote_next(mon: Monitor, disk: _Disk, *, clear: bool) -> None:
    assert disk.bitmap
    promote_next(mon, disk.node, disk.bitmap, clear=clear)


def _usable_bitmaps(mon: Monitor, disk: _Disk, repo: Repository, full: bool) -> None:
    """Decide the disk's base: the backup its tracking bitmap covers every write since
    (:func:`~shared.repository.backup.settle_bitmaps` first). Restarting, every marker goes."""
    assert disk.bitmap
    name = disk.bitmap
    names = settle_bitmaps(mon, disk.node, name, disk.spec.path)
    disk.has_bitmap = name in names
    disk.base = None if full else bitmap_base(repo, names, name, None)
    if disk.base is not None and disk.base.manifest.size != disk.size:
        disk.base = None
    if disk.base is None:  # restarting: no marker may survive to vouch for a bitmap we reset
        for marker in (n for n in names if n.startswith(f"{name}@")):
            mon.cmd("block-dirty-bitmap-remove", node=disk.node, name=marker)


def _rotate(mon: Monitor, disk: _Disk, repo: Repository, manifest_id: str) -> None:
    assert disk.bitmap
    rotate_bitmap(mon, disk.node, disk.bitmap, repo, manifest_id, "live.bitmap_marked")


def _quiesce(agent_socket: str | None) -> tuple[GuestAgent | None, str | None]:
    """Freeze the guest's filesystems when an agent is given; (agent to thaw, why not)."""
    if not agent_socket:
        return None, None
    agent = GuestAgent(agent_socket)
    try:
        agent.__enter__()
        agent.freeze()
    except GuestAgentError as exc:
        agent.__exit__(None, None, None)
        log.warning("live.quiesce_failed agent=%s error=%s", agent_socket, exc)
        return None, str(exc)
    return agent, None


def _thaw(agent: GuestAgent | None) -> None:
    if agent is None:
        return
    try:
        agent.thaw()
    except GuestAgentError as exc:
        log.error("live.thaw_failed agent=%s error=%s", agent.socket_path, exc)
    finally:
        agent.__exit__(None, None, None)


def backup_live(
    repo: Repository,
    qmp_socket: str,
    disks: list[LiveDisk],
    *,
    work_dir: Path,
    full: bool = False,
    bitmap: str | None = "blockvault",
    agent_socket: str | None = None,
    progress: Progress | None = None,
    lock_wait: float = 60.0,
    on_committed: Callable[[LiveResult], None] | None = None,
) -> LiveResult:
    """Back up ``disks`` of the VM whose QEMU monitor is ``qmp_socket``, all at one instant.

    ``on_committed`` runs once every manifest is on storage and before the bitmaps rotate
    (the service marks its rows Ready there); if it raises, the bitmaps are kept as they
    were, so the next backup still covers everything."""
    if not disks:
        raise VolumeError(path=qmp_socket, detail="no disks to back up")
    run_dir = _run_dir(work_dir, qmp_socket)
    started = time.monotonic()
    with (
        _vm_lock(run_dir, qmp_socket, lock_wait),
        repository_lock(repo.backend, "shared", f"live backup of {qmp_socket}", wait=lock_wait),
        Monitor(qmp_socket) as mon,
    ):
        repo.refresh_index()
        leftovers = clean_up(mon, run_dir)
        if leftovers:
            log.warning("live.leftovers_removed socket=%s removed=%s", qmp_socket, leftovers)
        run = uuid.uuid4().hex[:8]
        prepared: list[_Disk] = []
        for index, spec in enumerate(disks):
            node = mon.format_node(spec.path)
            fmt = str(node.get("drv"))
            disk = _Disk(
                spec=spec,
                index=index,
                node=str(node["node-name"]),
                size=int(node["image"]["virtual-size"]),
                bitmap=bitmap if fmt == "qcow2" and bitmap else None,
            )
            if disk.bitmap:
                _usable_bitmaps(mon, disk, repo, full)
            prepared.append(disk)
        return _backup(
            repo, mon, prepared, run, run_dir, full, agent_socket, progress, on_committed, started, qmp_socket
        )


def _backup(
    repo: Repository,
    mon: Monitor,
    disks: list[_Disk],
    run: str,
    run_dir: Path,
    full: bool,
    agent_socket: str | None,
    progress: Progress | None,
    on_committed: Callable[[LiveResult], None] | None,
    started: float,
    qmp_socket: str,
) -> LiveResult:
    nbd_dir = tempfile.mkdtemp(prefix="bv-nbd-")  # short: a UNIX socket path has 107 bytes
    nbd_socket = os.path.join(nbd_dir, "s")
    os.chmod(nbd_dir, 0o711)
    committed = False
    instant_taken = False
    try:
        marker = run_dir / "nbd-server"
        marker.write_text(nbd_dir)  # first: a run killed right after the start still stops it
        try:
            mon.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd_socket}})
        except MonitorError:
            marker.unlink()  # e.g. "NBD server already running": not ours to stop
            raise
        for disk in disks:
            disk.fleece_file = str(run_dir / f"fleece-{run}-{disk.index}.qcow2")
            disk.fleece_node = f"{PREFIX}fleece-{run}-{disk.index}"
            disk.job = f"{PREFIX}job-{run}-{disk.index}"
            disk.export = f"{PREFIX}export-{run}-{disk.index}"
            qemu.create_qcow2(disk.fleece_file, disk.size)
            mon.cmd(
                "blockdev-add",
                driver="qcow2",
                **{"node-name": disk.fleece_node},
                file={"driver": "file", "filename": disk.fleece_file},
                backing=disk.node,
            )
        actions: list[tuple[str, dict[str, Any]]] = []
        for disk in disks:
            if disk.bitmap:
                actions.append(
                    ("block-dirty-bitmap-add", {"node": disk.node, "name": disk.bitmap + NEXT, "persistent": True})
                )
                if disk.has_bitmap:
                    actions.append(("block-dirty-bitmap-disable", {"node": disk.node, "name": disk.bitmap}))
            actions.append(
                (
                    "blockdev-backup",
                    {"device": disk.node, "target": disk.fleece_node, "sync": "none", "job-id": disk.job},
                )
            )
        agent, quiesce_error = _quiesce(agent_socket)
        try:
            mon.transaction(actions)
            instant_taken = True
        finally:
            _thaw(agent)
        consistency = "application" if agent is not None else "crash"
        log.info("live.instant socket=%s disks=%d consistency=%s", qmp_socket, len(disks), consistency)
        for disk in disks:
            export: dict[str, Any] = {
                "type": "nbd",
                "id": disk.export,
                "node-name": disk.fleece_node,
                "name": disk.export,
                "writable": False,
            }
            if disk.base is not None:
                export["bitmaps"] = [{"node": disk.node, "name": disk.bitmap}]
            mon.cmd("block-export-add", **export)
        failpoint("live.exported")
        results = _read_disks(repo, mon, disks, nbd_socket, full, consistency, progress, started, qmp_socket)
        clean_up(mon, run_dir, hard=False)
        result = LiveResult(results, consistency, quiesce_error)
        if on_committed is not None:
            on_committed(result)
        committed = True
    except BaseException:
        _undo(mon, disks, run_dir, instant_taken)
        raise
    finally:
        shutil.rmtree(nbd_dir, ignore_errors=True)
    if committed:
        for disk, backup in zip(disks, result.backups, strict=True):
            if disk.bitmap:
                try:
                    _rotate(mon, disk, repo, backup.id)
                except MonitorError as exc:  # the next run merges NAME.next back: still covered
                    log.warning("live.bitmap_rotate_failed node=%s error=%s", disk.node, exc)
    return result


def _read_disks(
    repo: Repository,
    mon: Monitor,
    disks: list[_Disk],
    nbd_socket: str,
    full: bool,
    consistency: str,
    progress: Progress | None,
    started: float,
    qmp_socket: str,
) -> list[BackupResult]:
    results = []
    for disk in disks:

        def connect(contexts: list[str], export: str = disk.export) -> NBDClient:
            return NBDClient.connect_unix(nbd_socket, export, contexts)

        def scaled(done: int, total: int, i: int = disk.index) -> None:
            if progress:
                progress(i * 1000 + (done * 1000 // total if total else 0), len(disks) * 1000)

        bitmap = disk.bitmap if disk.base is not None else None
        reader = NbdReader(disk.spec.path, disk.size, bitmap, connect, fmt=disk.spec.format)
        metadata = {**disk.spec.metadata, "consistency": consistency, "live": True}
        try:
            parent = disk.spec.parent if disk.base is None and not full else None
            plan = choose_plan(repo, reader, full=full, parent_id=parent, bitmap_base=disk.base)
            results.append(run_plan(repo, reader, plan, disk.spec.name, metadata, disk.bitmap, started, scaled))
        except BaseException as exc:
            _forget(repo, results)
            if isinstance(exc, NBDError | OSError):
                raise _read_failure(mon, disk, exc, qmp_socket) from None
            raise
        finally:
            reader.close()
    return results


def _forget(repo: Repository, results: list[BackupResult]) -> None:
    """The disks read before one failed: their manifests go too, so that the storage never
    holds part of a VM's backup as if it were a backup (their chunks are left to gc)."""
    for result in results:
        try:
            repo.delete_manifest(result.id)
        except BlockvaultError as exc:
            log.warning("live.partial_manifest_kept id=%s error=%s", result.id[:12], exc)


def _read_failure(mon: Monitor, disk: _Disk, exc: BaseException, qmp_socket: str) -> BlockvaultError:
    """What to tell when reading the export failed: QEMU gone, or the read itself."""
    try:
        mon.cmd("query-status")
    except MonitorError:
        return MonitorError(socket=qmp_socket, detail=f"QEMU went away while {disk.spec.path} was read ({exc})")
    return VolumeError(path=disk.spec.path, detail=f"reading it from the VM's QEMU failed: {exc}")


def _undo(mon: Monitor, disks: list[_Disk], run_dir: Path, instant_taken: bool) -> None:
    """After a failure: remove what this run made, merge each ``NAME.next`` back."""
    try:
        clean_up(mon, run_dir)
        if instant_taken:
            for disk in disks:
                if disk.bitmap:
                    _promote_next(mon, disk, clear=False)
    except MonitorError as exc:  # QEMU is gone: its bitmaps, nodes and NBD server went with it
        log.warning("live.undo_failed error=%s", exc)
        _remove_overlays(run_dir)
        if (run_dir / "nbd-server").exists() and not _answers(mon):  # else the next run stops it
            _forget_nbd_server(run_dir)


def _answers(mon: Monitor) -> bool:
    """Whether the VM's QEMU still runs (this connection, or a new one, gets an answer)."""
    try:
        mon.cmd("query-status")
        return True
    except MonitorError:
        pass
    try:
        with Monitor(mon.socket_path, timeout=5) as again:
            again.cmd("query-status")
            return True
    except MonitorError:
        return False
