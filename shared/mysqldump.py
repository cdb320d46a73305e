"""Dumping and loading a registered MySQL/MariaDB database as a byte stream (ZStack's own
management database runs on MariaDB).

``mariadb-dump --single-transaction`` (or ``mysqldump``) writes plain SQL of one consistent
snapshot (InnoDB) to its stdout pipe, which :func:`shared.repository.stream.backup_stream`
cuts into the same content-defined chunks as every other backup; ``mariadb`` (or ``mysql``)
loads it back, fed from the repository through its stdin. The login never appears on a
command line or in the environment: it is in a defaults file (mode 0600, removed when done)
named by ``--defaults-extra-file``, and every connection is TCP (``protocol=TCP``): a
registered database is a host and port, never a socket of the worker's host.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from shared.dbdump import BLOCK, DumpStream, StderrTail, kill_child
from shared.errors import Conflict, DatabaseDumpError, InvalidArgument

MYSQL_DUMP = "mysqldump"  # the format name of a backup's stream
DUMP_TOOLS = ("mariadb-dump", "mysqldump")
CLIENT_TOOLS = ("mariadb", "mysql")
DUMP_ARGS = ["--single-transaction", "--routines", "--triggers", "--hex-blob", "--skip-dump-date", "--add-drop-table"]
NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
TIMEOUT = 600.0  # a query of the client (not a dump or a load) that takes longer has failed


@dataclass(frozen=True)
class Target:
    """A MySQL/MariaDB server reached over TCP, the login, and one of its databases."""

    host: str
    port: int
    user: str
    password: str
    database: str

    def __post_init__(self) -> None:
        if not NAME.match(self.database):
            raise InvalidArgument(detail=f"database name {self.database!r}: letters, digits and _ only (64 at most)")
        for what, value in (("host", self.host), ("user", self.user), ("password", self.password)):
            if any(c in value for c in "\n\r\0"):
                raise InvalidArgument(detail=f"the {what} may not hold a line break or NUL")

    def on(self, database: str) -> Target:
        """The same server and login, another database."""
        return Target(self.host, self.port, self.user, self.password, database)


def _tool(names: tuple[str, ...], database: str) -> str:
    for name in names:
        if shutil.which(name):
            return name
    raise DatabaseDumpError(database=database, detail=f"{' or '.join(names)} is not installed")


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@contextlib.contextmanager
def _defaults(target: Target) -> Iterator[str]:
    """A defaults file with the login (0600, in a private temporary folder), removed after."""
    with tempfile.TemporaryDirectory(prefix="bv-mysql-") as folder:
        path = Path(folder) / "login.cnf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(
                "[client]\n"
                f"host={_quoted(target.host)}\nport={target.port}\nprotocol=TCP\n"
                f"user={_quoted(target.user)}\npassword={_quoted(target.password)}\n"
            )
        yield str(path)


def _run(target: Target, defaults: str, sql: str, *, database: str | None = None) -> str:
    """One statement through the client; its output (tab-separated, no headers)."""
    client = _tool(CLIENT_TOOLS, target.database)
    command = [
        client,
        f"--defaults-extra-file={defaults}",
        "--connect-timeout=10",
        "--batch",
        "--skip-column-names",
        "-e",
        sql,
    ]
    if database:
        command.append(database)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise DatabaseDumpError(database=target.database, detail=f"{client} took over {TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise DatabaseDumpError(database=target.database, detail=lines[-1] if lines else f"{client} failed")
    return done.stdout


def server_version(target: Target) -> str:
    """The server's version; DatabaseDumpError (the client's message) when it cannot log in."""
    with _defaults(target) as defaults:
        return _run(target, defaults, "SELECT VERSION()").strip()


def _start(command: list[str], *, dump: bool) -> tuple[subprocess.Popen[bytes], StderrTail]:
    """A dump writing to our pipe (``dump``), or a load reading from it; its stderr drained."""
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL if dump else subprocess.PIPE,
        stdout=subprocess.PIPE if dump else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    tail = StderrTail(proc.stderr)
    tail.start()
    return proc, tail


@contextlib.contextmanager
def dump(target: Target) -> Iterator[DumpStream]:
    """A dump of ``target``'s database as a stream (``.reader``): one consistent snapshot
    (``--single-transaction``), nothing written to disk. Leaving the block waits for the dump
    and raises DatabaseDumpError with its last error line if it failed; a block left early
    kills it."""
    tool = _tool(DUMP_TOOLS, target.database)
    with _defaults(target) as defaults:
        version = _run(target, defaults, "SELECT VERSION()").strip()
        proc, tail = _start([tool, f"--defaults-extra-file={defaults}", *DUMP_ARGS, "--", target.database], dump=True)
        assert proc.stdout is not None
        try:
            yield DumpStream(
                reader=cast(BinaryIO, proc.stdout), format=MYSQL_DUMP, server_version=version, database=target.database
            )
        except BaseException:
            kill_child(proc)
            raise
        finally:
            if proc.returncode is None and proc.stdout.read(1):  # the consumer stopped early
                kill_child(proc)
            proc.stdout.close()
        code = proc.wait()
    if code not in (0, -9):
        raise DatabaseDumpError(database=target.database, detail=f"{tool} exited {code}: {tail.last()}")


def is_empty(target: Target) -> bool:
    """Whether ``target``'s database holds no table (or does not exist yet)."""
    with _defaults(target) as defaults:
        count = _run(
            target,
            defaults,
            f"SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = '{target.database}'",
        )
    return int(count.strip() or 0) == 0


def load(target: Target, reader: BinaryIO, *, force: bool = False) -> None:
    """Load a dump into ``target``'s database, created when missing. Refused (Conflict) when it
    holds tables, unless ``force`` (the dump drops and recreates each of its tables). A load
    that fails raises DatabaseDumpError with the client's last error line."""
    client = _tool(CLIENT_TOOLS, target.database)
    with _defaults(target) as defaults:
        if not force and not is_empty(target):
            raise Conflict(detail=f"database {target.database} is not empty: load into an empty one, or pass force")
        _run(target, defaults, f"CREATE DATABASE IF NOT EXISTS `{target.database}`")
        command = [client, f"--defaults-extra-file={defaults}", "--connect-timeout=10", "--binary-mode", "--batch"]
        proc, tail = _start([*command, target.database], dump=False)
        assert proc.stdin is not None
        try:
            while block := reader.read(BLOCK):
                proc.stdin.write(block)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the client stopped: its exit code and message say why
        except BaseException:
            kill_child(proc)
            raise
        code = proc.wait()
    if code != 0:
        raise DatabaseDumpError(
            database=target.database, detail=f"loading failed ({client} exited {code}): {tail.last()}"
        )
