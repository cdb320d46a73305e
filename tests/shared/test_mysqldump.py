"""A MariaDB database dumped into the chunk repository and loaded back (the real server on
127.0.0.1:3306, user blockvault, that tests/harness/ensure-services sets up): written to
during its backup, recovered into a new database and compared table by table; a second
backup after small changes stores only the chunks around them."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import mysqldump
from shared.dbdump import stream_into
from shared.errors import Conflict, DatabaseDumpError, InvalidArgument
from shared.mysqldump import Target
from shared.repository.repo import Repository
from shared.repository.stream import backup_stream

SERVER = Target(host="127.0.0.1", port=3306, user="blockvault", password="blockvault", database="mysql")
ROWS = 20_000


def sql(statement: str, database: str | None = None) -> str:
    """``statement`` run by the client as the tests' user (its output, tab-separated)."""
    command = ["mariadb", "--protocol=TCP", "-h", SERVER.host, "-P", str(SERVER.port), "-u", SERVER.user]
    command += [f"-p{SERVER.password}", "--batch", "--skip-column-names", "-e", statement]
    done = subprocess.run(
        [*command, *([database] if database else [])],
        capture_output=True,
        encoding="utf-8",
        errors="surrogateescape",
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            f"MariaDB at 127.0.0.1:3306 as blockvault: {done.stderr.strip()} (run tests/harness/ensure-services)"
        )
    return done.stdout


@pytest.fixture
def databases() -> Iterator[list[str]]:
    """Names for fresh databases (``bv_test_<pid>_<hex>``), dropped at the end."""
    names = [f"bv_test_{os.getpid()}_{secrets.token_hex(4)}_{i}" for i in range(3)]
    yield names
    for name in names:
        sql(f"DROP DATABASE IF EXISTS `{name}`")


def fill(database: str) -> None:
    sql(f"CREATE DATABASE `{database}`")
    sql(
        "CREATE TABLE vm (id INT PRIMARY KEY, name VARCHAR(64), note TEXT, blob_ VARBINARY(64)) ENGINE=InnoDB;"
        "CREATE TABLE event (id INT AUTO_INCREMENT PRIMARY KEY, vm INT, what VARCHAR(255)) ENGINE=InnoDB;"
        "INSERT INTO vm SELECT seq, CONCAT('vm-', seq), CONCAT('quote '' and \\\\ and ü ', seq), UNHEX(MD5(seq))"
        f" FROM seq_1_to_{ROWS};"
        f"INSERT INTO event (vm, what) SELECT seq, REPEAT('x', seq % 200) FROM seq_1_to_{ROWS};",
        database,
    )


def tables(database: str) -> dict[str, str]:
    """Each table's rows, in order: what 'the same database' means here."""
    names = sql("SHOW TABLES", database).split()
    return {name: sql(f"SELECT * FROM `{name}` ORDER BY id", database) for name in names}


def test_a_database_written_during_its_backup_is_recovered_table_by_table(databases: list[str], tmp_path: Path) -> None:
    source, copy, _ = databases
    fill(source)
    repo = Repository.init(str(tmp_path / "r"), chunk_size=64 * 1024)
    target = SERVER.on(source)
    assert mysqldump.server_version(target).split(".")[0].isdigit()

    stop = threading.Event()
    written: list[int] = []

    def write() -> None:  # rows committed while the dump runs: the snapshot has none of them, or all
        while not stop.is_set():
            sql("INSERT INTO event (vm, what) VALUES (1, 'during')", source)
            written.append(1)

    writer = threading.Thread(target=write)
    with mysqldump.dump(target) as dumped:
        writer.start()
        first = backup_stream(repo, dumped.reader, name="b1", source=f"database:{source}", fmt=dumped.format)
    stop.set()
    writer.join()
    assert dumped.format == "mysqldump" and written

    # recovered into a new database: the snapshot, table by table (no half-written row)
    stream_into(repo, first.id, lambda reader: mysqldump.load(SERVER.on(copy), reader))
    recovered, now = tables(copy), tables(source)
    assert recovered["vm"] == now["vm"]
    during = recovered["event"].count("\tduring")
    assert recovered["event"].splitlines()[:ROWS] == now["event"].splitlines()[:ROWS]
    assert len(recovered["event"].splitlines()) == ROWS + during <= len(now["event"].splitlines())

    # a second backup after a small change stores only the chunks around it
    sql("UPDATE vm SET name = 'renamed' WHERE id = 7777", source)
    with mysqldump.dump(target) as dumped:
        second = backup_stream(repo, dumped.reader, name="b2", source=f"database:{source}", fmt=dumped.format)
    assert second.chunks > 20 and second.newChunks <= 4, second

    # a database with tables is not loaded over, unless forced (the dump drops and recreates its tables)
    with pytest.raises(Conflict):
        stream_into(repo, second.id, lambda reader: mysqldump.load(SERVER.on(copy), reader))
    stream_into(repo, second.id, lambda reader: mysqldump.load(SERVER.on(copy), reader, force=True))
    assert tables(copy)["vm"] == tables(source)["vm"]


def test_bad_logins_and_names_fail_clearly_and_the_login_stays_off_the_command_line(
    databases: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DatabaseDumpError, match="Access denied"):
        mysqldump.server_version(Target("127.0.0.1", 3306, "blockvault", "wrong", "mysql"))
    with pytest.raises(DatabaseDumpError, match="Unknown database"), mysqldump.dump(SERVER.on(databases[0])) as d:
        d.reader.read()
    for name in ("a;b", "x" * 65, "", "../etc"):
        with pytest.raises(InvalidArgument):
            SERVER.on(name)
    with pytest.raises(InvalidArgument):
        Target("127.0.0.1", 3306, "u", "pass\nword", "db")

    seen: list[tuple[list[str], str]] = []
    real = subprocess.Popen

    def spy(args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        defaults = next(a.split("=", 1)[1] for a in args if a.startswith("--defaults-extra-file="))
        seen.append((list(args), oct(stat.S_IMODE(os.stat(defaults).st_mode))))
        return real(args, **kwargs)  # type: ignore[call-overload, no-any-return]

    fill(databases[1])
    monkeypatch.setattr(subprocess, "Popen", spy)
    with mysqldump.dump(SERVER.on(databases[1])) as dumped:
        assert b"CREATE TABLE" in dumped.reader.read()
    assert [args[0] for args, _mode in seen] == ["mariadb", "mariadb-dump"]  # the version, then the dump
    for args, mode in seen:
        assert mode == "0o600" and not any(SERVER.password in a for a in args), args
    assert "--single-transaction" in seen[-1][0]
