"""The ``blockvault`` command: every process (:mod:`api.cli.processes`), the client calls
(:mod:`api.cli.resources`), the repository CLI (:mod:`api.cli.repo`), ``rebuild`` and the
demo. Subcommands are imported only when used, so ``blockvault repo ...`` starts fast.
Output: progress on stderr, results on stdout (one JSON object with ``--json``); exit 0
success, 1 failed check or integrity error, 2 bad usage; errors are one line on stderr."""

from __future__ import annotations

import faulthandler
import gc
import importlib
import logging
import signal
import sys
from typing import Any, ClassVar, NoReturn

import click

from shared.errors import BlockvaultError

log = logging.getLogger("blockvault")


def freeze_start_heap() -> None:
    """Move every object the process holds now to the collector's permanent generation: call
    it once the imports are done, before the work. What a process imported (modules, classes,
    pydantic's validators) lives until it exits, yet every full collection walked it again, the
    interpreter's teardown at exit included (0.12 of a REST command's 0.61 CPU s went after its
    main returned, docs/testing.md). Frozen, it is not walked. What is made after this is
    collected as before, and files, sessions and repository locks are flushed and released as
    before (by ``with``, ``atexit`` and the teardown). Freezing again later is harmless: the API
    freezes once it built its app, beat before it runs, a worker before its pool forks."""
    gc.freeze()


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"blockvault: error: {message}", err=True)
    sys.exit(code)


class Group(click.Group):
    """Turns blockvault errors into one line and the right exit code. Subcommands named in
    ``lazy`` are imported only when used, so ``blockvault repo ...`` starts fast."""

    lazy: ClassVar[dict[str, str]] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, _, attr = self.lazy[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attr)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BlockvaultError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)


class MainGroup(Group):
    lazy: ClassVar[dict[str, str]] = {
        "api": "api.cli.processes:api_command",
        "worker": "api.cli.processes:worker_command",
        "flower": "api.cli.processes:flower_command",
        "beat": "api.cli.processes:beat_command",
        "up": "api.cli.processes:up_command",
        "storage-server": "api.cli.processes:storage_server_command",
        "rebuild": "api.cli.rebuild:rebuild_command",
        "host": "api.cli.resources:host",
        "vm": "api.cli.resources:vm",
        "volume": "api.cli.resources:volume",
        "backup-storage": "api.cli.resources:storage",
        "volume-backup": "api.cli.protection:volume_backup",
        "backup": "api.cli.files:backup",
        "database-backup": "api.cli.protection:database_backup",
        "project": "api.cli.protection:project",
        "job": "api.cli.resources:job",
        "job-group": "api.cli.resources:job_group",
        "trigger": "api.cli.resources:trigger",
        "history": "api.cli.resources:history",
        "repo": "api.cli.repo:repo",
        "accesskey": "api.cli.accesskeys:accesskey",
        "database": "api.cli.databases:database",
        "notification-target": "api.cli.notifications:notification_target",
        "notification-rule": "api.cli.notifications:notification_rule",
        "notification-history": "api.cli.notifications:notification_history",
    }


@click.group(cls=MainGroup)
@click.option("-v", "--verbose", count=True, help="Log more (-vv for debug).")
def main(verbose: int) -> None:
    """blockvault: backups of VM volumes and of their management database."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` dumps every stack
    freeze_start_heap()  # click imported the subcommand's module before calling this
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    for chatty in ("httpx", "httpcore", "botocore", "boto3", "s3transfer"):  # a line per chunk request
        logging.getLogger(chatty).setLevel(max(level, logging.WARNING))


@main.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False), help="Default: <data dir>/demo.")
def demo(workdir: str | None) -> None:
    """Back up a raw and a qcow2 volume full and incrementally, sync, restore, verify."""
    from api.cli.demo import run_demo

    run_demo(workdir)
