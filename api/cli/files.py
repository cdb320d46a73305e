"""``blockvault backup ls|cat|get|partitions``: the files inside a volume backup, read where it is
stored (docs/file-restore.md). Client calls like :mod:`api.cli.resources` (same exit codes)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import click

from api.client import ApiError, Client

from .resources import ClientGroup

PARTITION = click.option("--partition", "-P", type=int, help="Partition index (see `backup partitions`).")
KINDS = {"directory": "d", "symlink": "l", "file": "-", "other": "?"}


@click.group(cls=ClientGroup)
def backup() -> None:
    """Browse and download files inside a volume backup, without restoring it."""


@backup.command("partitions")
@click.argument("uuid")
@click.option("--json", "as_json", is_flag=True)
def partitions(uuid: str, as_json: bool) -> None:
    """Where filesystems may be in the backup (partitions, LVM volumes, the whole volume)."""
    found = Client().backup_partitions(uuid)
    if as_json:
        click.echo(json.dumps(found))
        return
    for row in found:
        click.echo(f"{row['index']:>3}  {row['name']:<24} {row['filesystem'] or '-':<6} {row['size']:>14}")


@backup.command("ls")
@click.argument("uuid")
@click.argument("path", default="/")
@PARTITION
@click.option("--start", type=int, default=0, show_default=True)
@click.option("--limit", type=int, default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def ls(uuid: str, path: str, partition: int | None, start: int, limit: int, as_json: bool) -> None:
    """List directory PATH in backup UUID (like ls -l; symbolic links shown, not followed)."""
    answer = Client().list_files(uuid, path, partition=partition, start=start, limit=limit)
    if as_json:
        click.echo(json.dumps(answer))
        return
    for entry in answer["inventories"]:
        kind = KINDS.get(entry["type"], "?")
        mode = stat.filemode(int(entry["mode"], 8))[1:]
        target = f" -> {entry['target']}" if entry.get("target") is not None else ""
        when = (entry.get("mtime") or "")[:19].replace("T", " ")
        owner = f"{entry.get('uid')}:{entry.get('gid')}"
        click.echo(f"{kind}{mode} {owner:>11} {entry['size']:>12} {when:19} {entry['name']}{target}")
    shown = start + len(answer["inventories"])
    if shown < answer["total"]:
        click.echo(f"... {answer['total'] - shown} more (--start {shown})", err=True)


@backup.command("cat")
@click.argument("uuid")
@click.argument("path")
@PARTITION
def cat(uuid: str, path: str, partition: int | None) -> None:
    """Write file PATH of backup UUID to stdout."""
    out = sys.stdout.buffer
    for piece in Client().read_file(uuid, path, partition=partition):
        out.write(piece)
    out.flush()


@backup.command("get")
@click.argument("uuid")
@click.argument("path")
@PARTITION
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Default: the file's name, here.")
def get(uuid: str, path: str, partition: int | None, output: str | None) -> None:
    """Download file PATH of backup UUID (to a new file; nothing is left of a failed one)."""
    target = Path(output or os.path.basename(path.rstrip("/")) or "download")
    if target.exists():
        raise click.UsageError(f"{target} exists: choose another --output")
    partial = target.with_name(f".{target.name}.part")
    try:
        with open(partial, "xb") as out:
            for piece in Client().read_file(uuid, path, partition=partition):
                out.write(piece)
        partial.rename(target)
    except (ApiError, OSError, KeyboardInterrupt):
        partial.unlink(missing_ok=True)
        raise
    click.echo(f"{target}: {target.stat().st_size} bytes", err=True)
