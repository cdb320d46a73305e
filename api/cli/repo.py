"""``blockvault repo ...``: the engine on a repository path or URL, with no catalog and no
service (docs/api.md "The repository CLI")."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from shared.config import float_setting, setting
from shared.errors import RepositoryNotFound, UsageError

from . import Group


@click.group(cls=Group)
def repo() -> None:
    """Work on a repository directly (no catalog, no service)."""


def _passphrase() -> str | None:
    return setting("passphrase") or None


def _lock_wait() -> float:
    return float_setting("lock_wait_seconds", 60.0)


def _data_dir() -> Path:
    return Path(setting("data_dir") or ".blockvault").absolute()


def _open(location: str) -> Any:
    from shared.repository.repo import Repository

    return Repository.open(location, _passphrase())


def _open_early(location: str) -> Callable[[], Any]:
    """:func:`_open` started on a thread of its own; the call returned waits for it and gives
    the repository (or raises what opening raised). The key derivation (scrypt: 0.14 s of CPU)
    releases the GIL, so this thread imports the engine meanwhile."""
    from concurrent.futures import Future

    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(_open(location))
        except BaseException as exc:  # noqa: BLE001 - raised on the caller's thread
            future.set_exception(exc)

    threading.Thread(target=run, name="open-repository", daemon=True).start()
    return future.result


@contextlib.contextmanager
def _progress(label: str, unit: str = "bytes") -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    counter = (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else (MofNCompleteColumn(),)
    columns = (label, BarColumn(), *counter, TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _emit(data: dict[str, Any], as_json: bool, text: str) -> None:
    click.echo(json.dumps(data) if as_json else text)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@repo.command("init")
@click.argument("location", metavar="REPO")
@click.option("--encrypt", is_flag=True, help="AES-256-GCM; the passphrase comes from BLOCKVAULT_PASSPHRASE.")
@click.option("--json", "as_json", is_flag=True)
def repo_init(location: str, encrypt: bool, as_json: bool) -> None:
    """Create a new repository at REPO."""
    from shared.repository.repo import Repository

    if encrypt and not _passphrase():
        raise UsageError(detail="--encrypt needs a passphrase in BLOCKVAULT_PASSPHRASE")
    repository = Repository.init(location, encrypt=encrypt, passphrase=_passphrase())
    info = {
        "id": repository.id,
        "location": repository.location,
        "encryption": repository.config["encryption"],
    }
    _emit(info, as_json, f"created repository {repository.id} at {repository.location} ({info['encryption']})")


@repo.command("backup")
@click.argument("location", metavar="REPO")
@click.argument("volume")
@click.option("--full", is_flag=True, help="Read the whole volume, no parent.")
@click.option("--parent", "parent", metavar="ID", help="Incremental against this backup.")
@click.option("--bitmap", metavar="NAME", help="Read only extents dirty in this qcow2 persistent bitmap.")
@click.option("--name", default="", help="A name for the backup.")
@click.option("--json", "as_json", is_flag=True)
def repo_backup(
    location: str, volume: str, full: bool, parent: str | None, bitmap: str | None, name: str, as_json: bool
) -> None:
    """Back up VOLUME (a raw or qcow2 file) into REPO."""
    opened = _open_early(location)  # scrypt derives the key while the engine is imported
    from shared.repository.backup import backup_volume, early_bitmap_image

    # a bitmap backup's qemu-storage-daemon opens the image while scrypt derives the key
    with early_bitmap_image(volume, bitmap) as image:
        repository = opened()
        repository.use_index(_data_dir() / "chunk-index")  # this host's index of the repository's chunks
        with _progress("backup") as progress:
            result = backup_volume(
                repository,
                volume,
                full=full,
                parent=parent,
                bitmap=bitmap,
                name=name,
                progress=progress,
                lock_wait=_lock_wait(),
                image=image,
            )
    speed = result.bytesRead / result.seconds if result.seconds else 0.0
    _emit(
        result.to_json(),
        as_json,
        f"backup {result.id[:12]} ({result.mode}{', parent ' + result.parent[:12] if result.parent else ''}): "
        f"size {_size(result.size)}, read {_size(result.bytesRead)}, wrote {_size(result.bytesWritten)} "
        f"in {result.newChunks} new of {result.chunks} chunks, {result.seconds:.2f} s ({_size(speed)}/s)",
    )


@repo.command("backup-stream")
@click.argument("location", metavar="REPO")
@click.option("--source", required=True, help="What the stream is of (backups are kept and deduplicated per source).")
@click.option("--name", default="", help="A name for the backup.")
@click.option("--format", "fmt", default="stream", show_default=True, help="How to read it back (pg_dump, ...).")
@click.option("--json", "as_json", is_flag=True)
def repo_backup_stream(location: str, source: str, name: str, fmt: str, as_json: bool) -> None:
    """Back up standard input to its end into REPO, cut by content (a database dump:
    ``pg_dump ... | blockvault repo backup-stream REPO --source database:NAME``)."""
    from shared.repository.stream import backup_stream

    repository = _open(location)
    with _progress("backup") as progress:
        result = backup_stream(
            repository,
            sys.stdin.buffer,
            name=name,
            source=source,
            fmt=fmt,
            progress=progress,
            lock_wait=_lock_wait(),
        )
    _emit(
        result.to_json(),
        as_json,
        f"backup {result.id[:12]} of {source}: size {_size(result.size)}, wrote {_size(result.bytesWritten)} "
        f"in {result.newChunks} new of {result.chunks} chunks, {result.seconds:.2f} s",
    )


@repo.command("restore")
@click.argument("location", metavar="REPO")
@click.argument("backup_id", metavar="ID")
@click.argument("target")
@click.option(
    "--in-place",
    is_flag=True,
    help="TARGET is an existing block device: write the backup over it (raw; holes zeroed).",
)
@click.option("--json", "as_json", is_flag=True)
def repo_restore(location: str, backup_id: str, target: str, in_place: bool, as_json: bool) -> None:
    """Restore backup ID into the new file TARGET (qcow2 when it ends in .qcow2, else raw), or
    with --in-place over the existing block device TARGET."""
    from shared.repository.restore import restore_backup

    repository = _open(location)
    with _progress("restore") as progress:
        result = restore_backup(
            repository, backup_id, target, progress=progress, lock_wait=_lock_wait(), in_place=in_place
        )
    speed = result.bytesWritten / result.seconds if result.seconds else 0.0
    _emit(
        result.to_json(),
        as_json,
        f"restored {result.id[:12]} to {target}: {_size(result.bytesWritten)} in {result.seconds:.2f} s "
        f"({_size(speed)}/s)",
    )


@repo.command("ls")
@click.argument("location", metavar="REPO")
@click.option("--json", "as_json", is_flag=True)
def repo_ls(location: str, as_json: bool) -> None:
    """List the backups in REPO, oldest first."""
    repository = _open(location)
    protected = repository.protected_ids()
    rows = []
    for entry in repository.backups():
        m = entry.manifest
        rows.append(
            {
                "id": entry.id,
                "installPath": repository.install_path(entry.id),
                "name": m.name,
                "volume": m.volume,
                "format": m.format,
                "mode": m.mode,
                "parent": m.parent,
                "size": m.size,
                "storedSize": m.stored_size,
                "created": m.created,
                "protected": entry.id in protected,
            }
        )
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        click.echo(
            f"{row['id'][:12]}  {row['created'][:19]}  {row['mode']:<11}  {_size(row['size']):>10}  "
            f"{row['volume']}{'  ' + row['name'] if row['name'] else ''}{'  protected' if row['protected'] else ''}"
        )


@repo.command("serve-nbd")
@click.argument("location", metavar="REPO")
@click.argument("backup_id", metavar="ID")
@click.option(
    "--socket", "socket_path", required=True, type=click.Path(dir_okay=False), help="UNIX socket to serve on."
)
@click.option("--cache-mb", type=click.IntRange(0, 1 << 20), default=64, show_default=True, help="Chunk cache size.")
@click.option("--json", "as_json", is_flag=True)
def repo_serve_nbd(location: str, backup_id: str, socket_path: str, cache_mb: int, as_json: bool) -> None:
    """Serve backup ID read-only over NBD on a UNIX socket until interrupted (SIGINT/SIGTERM):
    e.g. qemu-img convert nbd+unix:///?socket=PATH out.raw."""
    import signal
    import threading

    from shared.repository.nbdserver import export_backup

    repository = _open(location)
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    with export_backup(repository, backup_id, socket_path, cache_bytes=cache_mb << 20, lock_wait=_lock_wait()) as (
        server,
        view,
    ):
        info = {"id": view.id, "socket": socket_path, "size": view.size, "uri": f"nbd+unix:///?socket={socket_path}"}
        _emit(info, as_json, f"serving {view.id[:12]} ({_size(view.size)}) on nbd+unix:///?socket={socket_path}")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    click.echo(f"stopped; {server.connections} connections, {_size(view.stats.bytes_fetched)} fetched", err=True)


@repo.command("verify")
@click.argument("location", metavar="REPO")
@click.argument("backup_id", metavar="ID", required=False)
@click.option("--read-data", is_flag=True, help="Re-read and re-hash every chunk.")
@click.option("--json", "as_json", is_flag=True)
def repo_verify(location: str, backup_id: str | None, read_data: bool, as_json: bool) -> None:
    """Check REPO (or one backup): manifests and chunk presence; --read-data re-hashes all."""
    from shared.repository.maintenance import verify

    repository = _open(location)
    with _progress("verify", unit="chunks") as progress:
        report = verify(repository, backup_id, read_data=read_data, progress=progress)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "backups": report.backups,
                    "chunks": report.chunks,
                    "bytesRead": report.bytesRead,
                    "problems": [p.__dict__ for p in report.problems],
                }
            )
        )
    else:
        for problem in report.problems:
            click.echo(f"BAD {problem.describe()}")
        click.echo(
            f"{'ok' if report.ok else 'FAILED'}: {report.backups} backups, {report.chunks} chunks"
            f"{', data re-hashed' if read_data else ''}, {len(report.problems)} problems"
        )
    if not report.ok:
        sys.exit(1)


@repo.command("prune")
@click.argument("location", metavar="REPO")
@click.option("--keep-last", type=int, required=True)
@click.option("--keep-daily", type=int, default=0)
@click.option("--keep-weekly", type=int, default=0)
@click.option("--keep-monthly", type=int, default=0)
@click.option("--dry-run", is_flag=True, help="Say what would be removed, remove nothing.")
@click.option("--json", "as_json", is_flag=True)
def repo_prune(
    location: str,
    keep_last: int,
    keep_daily: int,
    keep_weekly: int,
    keep_monthly: int,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Remove the backups the retention policy does not keep (per volume); gc frees space."""
    from shared.repository.maintenance import Policy, prune

    policy = Policy(keep_last, keep_daily, keep_weekly, keep_monthly)
    policy.check()
    report = prune(_open(location), policy, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    _emit(
        {
            "kept": report.kept,
            "removed": report.removed,
            "protected": report.protected,
            "locked": report.locked,
            "dryRun": dry_run,
        },
        as_json,
        f"kept {len(report.kept)}, {verb} {len(report.removed)} backups"
        + (f", left {len(report.protected)} protected" if report.protected else "")
        + (f", {len(report.locked)} under object lock" if report.locked else "")
        + "".join(f"\n  {verb} {mid[:12]}" for mid in report.removed),
    )


@repo.command("forget")
@click.argument("location", metavar="REPO")
@click.argument("backup_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True)
def repo_forget(location: str, backup_id: str, as_json: bool) -> None:
    """Remove one backup (gc frees its chunks); refused while it is protected."""
    repository = _open(location)
    manifest_id = repository.resolve(backup_id)
    repository.load_manifest(manifest_id)  # BackupNotFound for an id it does not hold
    repository.delete_manifest(manifest_id)
    _emit({"removed": manifest_id}, as_json, f"removed {manifest_id[:12]}")


@repo.command("protect")
@click.argument("location", metavar="REPO")
@click.argument("backup_id", metavar="ID")
@click.option("--off", is_flag=True, help="Lift the protection instead.")
@click.option("--json", "as_json", is_flag=True)
def repo_protect(location: str, backup_id: str, off: bool, as_json: bool) -> None:
    """Protect a backup: forget and prune leave it until `protect --off`."""
    repository = _open(location)
    manifest_id = repository.resolve(backup_id)
    if off:
        repository.unprotect(manifest_id)
    else:
        repository.protect(manifest_id)
    _emit({"id": manifest_id, "protected": not off}, as_json, f"{manifest_id[:12]} {'un' if off else ''}protected")


@repo.command("gc")
@click.argument("location", metavar="REPO")
@click.option("--wait", type=float, default=0.0, help="Seconds to wait for running backups.")
@click.option("--json", "as_json", is_flag=True)
def repo_gc(location: str, wait: float, as_json: bool) -> None:
    """Delete chunks no backup references (waits for, never races, running backups)."""
    from shared.repository.maintenance import gc

    report = gc(_open(location), wait=wait)
    _emit(
        report.__dict__,
        as_json,
        f"deleted {report.chunksDeleted} chunks ({_size(report.bytesFreed)}), kept {report.chunksKept}, "
        f"removed {report.tmpDeleted} leftover temporary files in {report.seconds:.2f} s",
    )


@repo.command("sync")
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@click.option("--bandwidth-limit", type=click.IntRange(min=1), metavar="BYTES_PER_S")
@click.option("--json", "as_json", is_flag=True)
def repo_sync(src: str, dst: str, bandwidth_limit: int | None, as_json: bool) -> None:
    """Copy every backup of SRC that DST lacks, sending only missing chunks. DST is created
    (naming chunks like SRC) when it does not exist."""
    from shared.repository.repo import Repository
    from shared.repository.sync import sync

    source = _open(src)
    try:
        target = _open(dst)
    except RepositoryNotFound:
        target = Repository.init(dst, like=source, passphrase=_passphrase())
    with _progress("sync", unit="chunks") as progress:
        report = sync(source, target, bandwidth_limit=bandwidth_limit, progress=progress)
    _emit(
        {**report.__dict__, "backups": report.backups},
        as_json,
        f"copied {len(report.backups)} backups, {report.chunksCopied} chunks ({_size(report.bytesCopied)}) "
        f"in {report.seconds:.2f} s",
    )
