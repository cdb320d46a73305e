"""Dumping and loading the catalog database as a byte stream, never a whole file on disk.

PostgreSQL: ``pg_dump`` in plain SQL format, read from its stdout pipe; loaded by ``psql`` in
one transaction, fed from the stream. SQLite (embedded mode): the live database is copied
with the online backup API into memory and its SQL text (``iterdump``) streamed; it is loaded
into a new file beside the target, renamed over it once complete.

The stream is what :func:`shared.repository.stream.backup_stream` stores; :func:`backup_database`
and :func:`restore_database` join the two. A URL is SQLAlchemy's:
``postgresql+psycopg2://user:password@host:port/db`` or ``sqlite:////abs/path.db``.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import logging
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import quote, urlencode

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from shared.errors import Conflict, DatabaseDumpError, UsageError
from shared.private import private_file

if TYPE_CHECKING:
    from shared.repository.repo import Repository
    from shared.repository.stream import StreamResult

log = logging.getLogger(__name__)

PG_DUMP = "pg_dump"
SQLITE_DUMP = "sqlite-dump"
BLOCK = 1024 * 1024
# Plain SQL that psql loads into an empty database; no owners or grants (the target's roles
# may differ), every identifier quoted (a later reserved word cannot break the load).
PG_DUMP_ARGS = ["--format=plain", "--no-owner", "--no-privileges", "--quote-all-identifiers", "--encoding=UTF8"]
PG_RESET = b'DROP SCHEMA IF EXISTS "public" CASCADE;\nCREATE SCHEMA "public";\n'
_SYSTEM_SCHEMAS = "('pg_catalog', 'information_schema', 'pg_toast')"


# -- URLs ---------------------------------------------------------------------------------------
def _kind(url: URL) -> str:
    backend = url.get_backend_name()
    if backend in ("postgresql", "sqlite"):
        return backend
    raise UsageError(detail=f"cannot dump a {backend} database: only PostgreSQL and SQLite")


def libpq_url(url: str | URL, database: str | None = None) -> tuple[str, dict[str, str]]:
    """``url`` as a libpq connection URI (no password) and the environment that carries the
    password (``PGPASSWORD``), so that it never appears on a command line."""
    parsed = make_url(url) if isinstance(url, str) else url
    netloc = quote(parsed.username or "", safe="")
    netloc = (netloc + "@") if netloc else ""
    host = parsed.host or ""
    netloc += f"[{host}]" if ":" in host else host
    if parsed.port:
        netloc += f":{parsed.port}"
    query = {key: value for key, value in parsed.query.items() if isinstance(value, str)}
    tail = f"?{urlencode(query)}" if query else ""
    env = {"PGCONNECT_TIMEOUT": "10"}
    if parsed.password:
        env["PGPASSWORD"] = str(parsed.password)
    return f"postgresql://{netloc}/{quote(database or parsed.database or '', safe='')}{tail}", env


def _sqlite_path(url: URL) -> Path:
    if not url.database or url.database == ":memory:":
        raise UsageError(detail="a SQLite catalog must be a file: sqlite:////abs/path.db")
    return Path(url.database)


def first_line(exc: BaseException) -> str:
    message = str(getattr(exc, "orig", None) or exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


# -- dump ---------------------------------------------------------------------------------------
@dataclass
class DumpStream:
    """A database dump being produced: read ``reader`` to its end inside the ``with`` block."""

    reader: BinaryIO
    format: str
    server_version: str
    database: str
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


class StderrTail(threading.Thread):
    """Drains a child's stderr (so it never blocks on a full pipe), keeping its last lines."""

    def __init__(self, pipe: IO[bytes]) -> None:
        super().__init__(daemon=True, name="stderr-tail")
        self.pipe = pipe
        self.lines: deque[str] = deque(maxlen=20)

    def run(self) -> None:
        for line in self.pipe:
            self.lines.append(line.decode(errors="replace").rstrip())

    def last(self) -> str:
        self.join(timeout=5)
        lines = [line for line in self.lines if line]
        return lines[-1] if lines else "no message"


def _pg_server_version(url: URL) -> str:
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("SHOW server_version")).scalar_one())
    except DBAPIError as exc:
        raise DatabaseDumpError(database=url.database, detail=first_line(exc)) from None
    finally:
        engine.dispose()


def kill_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@contextlib.contextmanager
def _pg_dump(url: URL) -> Iterator[DumpStream]:
    version = _pg_server_version(url)  # a missing database or refused login fails here, clearly
    if shutil.which("pg_dump") is None:
        raise DatabaseDumpError(database=url.database, detail="pg_dump is not installed")
    target, env = libpq_url(url)
    proc = subprocess.Popen(
        ["pg_dump", *PG_DUMP_ARGS, f"--dbname={target}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    )
    assert proc.stdout is not None and proc.stderr is not None
    tail = StderrTail(proc.stderr)
    tail.start()
    try:
        yield DumpStream(
            reader=cast(BinaryIO, proc.stdout), format=PG_DUMP, server_version=version, database=str(url.database)
        )
    except BaseException:
        kill_child(proc)
        raise
    finally:
        if proc.returncode is None and proc.stdout.read(1):  # the consumer stopped early
            log.info("dbdump.stopped_early database=%s", url.database)
            kill_child(proc)
        proc.stdout.close()
    code = proc.wait()
    if code not in (0, -9):
        raise DatabaseDumpError(database=url.database, detail=f"pg_dump exited {code}: {tail.last()}")


class _LinesReader(io.RawIOBase):
    """A read-only binary stream over an iterator of text lines (UTF-8, newline-joined)."""

    def __init__(self, lines: Iterable[str], on_close: list[Any] | None = None) -> None:
        self._lines = iter(lines)
        self._pending = memoryview(b"")
        self._on_close = on_close or []

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._pending:
            line = next(self._lines, None)
            if line is None:
                return 0
            self._pending = memoryview((line + "\n").encode())
        count = min(len(view), len(self._pending))
        view[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def close(self) -> None:
        for resource in self._on_close:
            resource.close()
        self._on_close = []
        super().close()


@contextlib.contextmanager
def _sqlite_dump(url: URL) -> Iterator[DumpStream]:
    path = _sqlite_path(url)
    try:
        source = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise DatabaseDumpError(database=str(path), detail=str(exc)) from None
    memory = sqlite3.connect(":memory:")
    try:
        source.backup(memory)  # a consistent copy of the live database, WAL included
    except sqlite3.Error as exc:
        memory.close()
        raise DatabaseDumpError(database=str(path), detail=str(exc)) from None
    finally:
        source.close()
    reader = _LinesReader(memory.iterdump(), on_close=[memory])
    try:
        yield DumpStream(
            reader=io.BufferedReader(reader, BLOCK),
            format=SQLITE_DUMP,
            server_version=sqlite3.sqlite_version,
            database=str(path),
        )
    finally:
        reader.close()


@contextlib.contextmanager
def dump(url: str) -> Iterator[DumpStream]:
    """A dump of the database at ``url`` as a stream (``.reader``), nothing written to disk.

    PostgreSQL: ``pg_dump`` in plain format (see ``PG_DUMP_ARGS``), its stdout being the
    reader; leaving the block waits for it and raises DatabaseDumpError with its last error
    line if it failed; if the block ended early (an exception, or the reader not read to its
    end) pg_dump is killed. SQLite: the online backup API copies the live database into
    memory, whose ``iterdump()`` SQL is the reader (memory: one copy of the database)."""
    parsed = make_url(url)
    manager = _pg_dump(parsed) if _kind(parsed) == "postgresql" else _sqlite_dump(parsed)
    with manager as stream:
        yield stream


# -- empty? -------------------------------------------------------------------------------------
def _pg_database_exists(url: URL) -> bool:
    engine = create_engine(url.set(database="postgres"), poolclass=NullPool, connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            query = text("SELECT 1 FROM pg_database WHERE datname = :name")
            return conn.execute(query, {"name": url.database}).first() is not None
    except DBAPIError as exc:
        raise DatabaseDumpError(database=url.database, detail=first_line(exc)) from None
    finally:
        engine.dispose()


def _pg_tables(url: URL) -> tuple[int, bool]:
    """(number of user tables, whether any holds a row)."""
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as conn:
            tables = conn.execute(
                text(
                    "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) FROM information_schema.tables "
                    f"WHERE table_type = 'BASE TABLE' AND table_schema NOT IN {_SYSTEM_SCHEMAS}"
                )
            ).scalars()
            names = list(tables)
            rows = any(conn.execute(text(f"SELECT EXISTS (SELECT 1 FROM {name})")).scalar_one() for name in names)
            return len(names), rows
    except DBAPIError as exc:
        raise DatabaseDumpError(database=url.database, detail=first_line(exc)) from None
    finally:
        engine.dispose()


def _sqlite_tables(path: Path) -> tuple[int, bool]:
    if not path.exists() or path.stat().st_size == 0:
        return 0, False
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            names = [
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                )
            ]
            rows = any(
                conn.execute(f'SELECT EXISTS (SELECT 1 FROM "{name.replace(chr(34), chr(34) * 2)}")').fetchone()[0]
                for name in names
            )
            return len(names), rows
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise DatabaseDumpError(database=str(path), detail=str(exc)) from None


def is_empty(url: str) -> bool:
    """Whether the database at ``url`` holds no data: it does not exist, has no user tables
    (PostgreSQL: none outside the system schemas; SQLite: none but ``sqlite_*``), or none
    of its tables holds a row. A migrated catalog is not empty (``alembic_version`` has a row)."""
    parsed = make_url(url)
    if _kind(parsed) == "postgresql":
        if not _pg_database_exists(parsed):
            return True
        return not _pg_tables(parsed)[1]
    return not _sqlite_tables(_sqlite_path(parsed))[1]


# -- load ---------------------------------------------------------------------------------------
def load(url: str, reader: BinaryIO, *, fmt: str, force: bool = False) -> None:
    """Load a dump (``fmt``, as :func:`dump` made it) read from ``reader`` into the database
    at ``url``, all or nothing. A database that holds data (see :func:`is_empty`) is refused
    with Conflict unless ``force``.

    PostgreSQL: a database that does not exist yet is created first (``CREATE DATABASE``
    through the ``postgres`` maintenance database, so the user needs CREATEDB); when it has
    tables (empty ones, or any with ``force``) the ``public`` schema is dropped and created
    again in the same transaction as the load; ``psql --single-transaction`` reads the SQL
    from a pipe, so a failure (or ``reader`` raising) leaves the database as it was.
    SQLite: the SQL is run statement by statement into a new file beside the target, which
    is renamed over it only when complete; stop every process using the catalog first."""
    parsed = make_url(url)
    kind = _kind(parsed)
    expected = PG_DUMP if kind == "postgresql" else SQLITE_DUMP
    if fmt != expected:
        raise UsageError(detail=f"a {fmt} dump cannot be loaded into a {kind} database")
    if kind == "postgresql":
        _pg_load(parsed, reader, force=force)
    else:
        _sqlite_load(_sqlite_path(parsed), reader, force=force)


def _refuse(database: str, tables: int, rows: bool, force: bool) -> None:
    if rows and not force:
        raise Conflict(detail=f"database {database} is not empty ({tables} tables hold data): load it with force")


def _pg_create(url: URL) -> None:
    engine = create_engine(
        url.set(database="postgres"),
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 10},
    )
    name = str(url.database).replace('"', '""')
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except DBAPIError as exc:
        raise DatabaseDumpError(database=url.database, detail=first_line(exc)) from None
    finally:
        engine.dispose()
    log.info("dbdump.created_database database=%s", url.database)


def _pg_load(url: URL, reader: BinaryIO, *, force: bool) -> None:
    if not url.database:
        raise UsageError(detail="the PostgreSQL URL names no database")
    if _pg_database_exists(url):
        tables, rows = _pg_tables(url)
        _refuse(str(url.database), tables, rows, force)
    else:
        _pg_create(url)
        tables = 0
    if shutil.which("psql") is None:
        raise DatabaseDumpError(database=url.database, detail="psql is not installed")
    target, env = libpq_url(url)
    proc = subprocess.Popen(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-d", target],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    )
    assert proc.stdin is not None and proc.stderr is not None
    tail = StderrTail(proc.stderr)
    tail.start()
    try:
        if tables or force:
            proc.stdin.write(PG_RESET)
        while block := reader.read(BLOCK):
            proc.stdin.write(block)
        proc.stdin.close()  # EOF: psql commits
    except BrokenPipeError:
        pass  # psql stopped reading: its exit code and message say why
    except BaseException:
        kill_child(proc)  # killed before EOF: the transaction is rolled back
        raise
    code = proc.wait()
    if code != 0:
        raise DatabaseDumpError(database=url.database, detail=f"psql exited {code}: {tail.last()}")
    log.info("dbdump.loaded database=%s", url.database)


def _statements(reader: BinaryIO) -> Iterator[str]:
    """The SQL read from ``reader`` in batches of complete statements (about BLOCK bytes)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending: list[str] = []
    size = 0
    carry = ""
    while True:
        block = reader.read(BLOCK)
        chunk = carry + decoder.decode(block, final=not block)
        lines = chunk.split("\n")
        carry = lines.pop() if block else ""
        if not block and lines[-1:] == [""]:
            lines.pop()
        for line in lines:
            pending.append(line)
            size += len(line) + 1
            if size >= BLOCK and sqlite3.complete_statement("\n".join(pending)):
                yield "\n".join(pending)
                pending, size = [], 0
        if not block:
            break
    if carry:
        pending.append(carry)
    if pending:
        script = "\n".join(pending)
        if script.strip() and not sqlite3.complete_statement(script):
            raise DatabaseDumpError(database="(dump)", detail="the SQL ends in an incomplete statement")
        yield script


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sqlite_load(path: Path, reader: BinaryIO, *, force: bool) -> None:
    tables, rows = _sqlite_tables(path)
    _refuse(str(path), tables, rows, force)
    tmp = path.with_name(f".{path.name}.load-{os.getpid()}-{time.monotonic_ns()}")
    private_file(tmp)  # mode 0600 before SQLite writes a byte: it becomes the catalog
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)  # the dump's BEGIN/COMMIT rule
        try:
            # No sync and no journal file while loading: the file is private until it is
            # fsynced whole and renamed over the catalog, and a failed load discards it.
            # (executescript commits before each batch, so without this every statement of a
            # dump past its first batch was a transaction with its own fsync: minutes for a
            # catalog of a few hundred thousand rows.)
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("PRAGMA journal_mode=MEMORY")
            for script in _statements(reader):
                conn.executescript(script)
            if conn.in_transaction:
                raise DatabaseDumpError(database=str(path), detail="the dump ends inside a transaction")
        finally:
            conn.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # The old database's WAL must not be replayed into the new file.
        for suffix in ("-wal", "-shm", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except sqlite3.Error as exc:
        raise DatabaseDumpError(database=str(path), detail=f"loading failed: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("dbdump.loaded database=%s", path)


# -- with the repository ------------------------------------------------------------------------
def source_name(url: str) -> str:
    """The stream source a database's backups are grouped under: ``database:<name>``."""
    parsed = make_url(url)
    name = parsed.database or ""
    return f"database:{Path(name).stem if _kind(parsed) == 'sqlite' else name}"


def backup_database(
    repo: Repository,
    url: str,
    *,
    name: str = "",
    metadata: dict[str, Any] | None = None,
    lock_wait: float = 60.0,
) -> StreamResult:
    """Dump the database at ``url`` straight into ``repo`` (:func:`backup_stream`). The
    manifest's ``metadata["database"]`` holds name, format, server version and the time the
    dump started; the manifest itself the dump's size and MD5."""
    from shared.repository.stream import backup_stream

    with dump(url) as stream:
        info = {
            "name": Path(stream.database).name if stream.format == SQLITE_DUMP else stream.database,
            "format": stream.format,
            "version": stream.server_version,
            "createdTime": stream.created,
        }
        return backup_stream(
            repo,
            stream.reader,
            name=name,
            source=source_name(url),
            fmt=stream.format,
            metadata={**(metadata or {}), "database": info},
            lock_wait=lock_wait,
        )


class _PipeReader(io.RawIOBase):
    """The read end of a pipe a producer thread writes into; at EOF the producer's error, if
    any, is raised instead of EOF, so a consumer never takes a cut-off stream as complete."""

    def __init__(self, fd: int, producer: threading.Thread, errors: list[BaseException]) -> None:
        self._file = os.fdopen(fd, "rb", buffering=0)
        self._producer, self._errors = producer, errors

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._file.readinto(buffer)
        if not count:
            self._producer.join()
            if self._errors:
                raise self._errors[0]
        return count or 0

    def close(self) -> None:
        self._file.close()
        super().close()


def restore_database(
    repo: Repository, backup_id: str, url: str, *, force: bool = False, lock_wait: float = 60.0
) -> int:
    """Load database backup ``backup_id`` into the database at ``url`` (:func:`load`: refused
    when it holds data unless ``force``), streamed from the repository through a pipe; every
    chunk, the size and the MD5 are checked before the load commits. Returns the dump's size."""
    from shared.repository.stream import load_stream_manifest

    _mid, manifest = load_stream_manifest(repo, backup_id)
    return stream_into(
        repo, backup_id, lambda reader: load(url, reader, fmt=manifest.format, force=force), lock_wait=lock_wait
    )


def stream_into(
    repo: Repository, backup_id: str, consume: Callable[[BinaryIO], None], *, lock_wait: float = 60.0
) -> int:
    """Feed the stream ``backup_id`` to ``consume`` (a loader reading to EOF) through a pipe,
    with no file on disk; a chunk that fails its check is raised from ``consume``'s read
    instead of EOF, so a loader never takes a cut-off stream as complete. Returns its size."""
    from shared.repository.stream import restore_stream

    read_fd, write_fd = os.pipe()
    errors: list[BaseException] = []
    written = 0

    def produce() -> None:
        nonlocal written
        try:
            with os.fdopen(write_fd, "wb") as writer:
                written = restore_stream(repo, backup_id, writer, lock_wait=lock_wait)
        except BrokenPipeError:
            pass  # the loader stopped reading: it reports why
        except BaseException as exc:  # noqa: BLE001 - raised by the consumer's read, then here
            errors.append(exc)

    producer = threading.Thread(target=produce, name="stream-restore", daemon=True)
    reader = _PipeReader(read_fd, producer, errors)
    producer.start()
    try:
        consume(io.BufferedReader(reader, BLOCK))
    finally:
        reader.close()  # a producer still writing gets EPIPE and stops
        producer.join()
    if errors:
        raise errors[0]
    return written
