"""Dumping the catalog into the chunk repository and loading it back (real PostgreSQL, SQLite)."""

from __future__ import annotations

import io
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from shared import dbdump
from shared.catalog import db
from shared.catalog.models import (
    BackupStorage,
    DatabaseBackup,
    DatabaseBackupStorageRef,
    Host,
    SchedulerJobHistory,
    Volume,
    VolumeBackup,
    VolumeBackupStorageRef,
)
from shared.errors import Conflict, IntegrityError
from shared.repository.repo import Repository, chunk_key
from shared.repository.stream import backup_stream, restore_stream
from tests.services import MakePgDatabase


def fill(url: str, rows: int = 20) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with Session(engine) as session:
            host = Host(name="host-1", managementIp="10.0.0.1", hostname="kvm1")
            storage = BackupStorage(name="bs", url="file:///srv/bs", credentials={"token": "t"})
            session.add_all([host, storage])
            session.flush()
            for i in range(rows):
                volume = Volume(name=f"vol-{i}", hostUuid=host.uuid, installPath=f"/v/{i}.qcow2", size=i * 2**30)
                backup = VolumeBackup(
                    name=f"b-{i}",
                    volumeUuid=volume.uuid or f"{i:032x}",
                    metadata_={"i": i, "text": "quote ' and \\ and\nnewline ü"},
                    status="Ready",
                )
                session.add_all([volume, backup])
                session.flush()
                session.add(VolumeBackupStorageRef(volumeBackupUuid=backup.uuid, backupStorageUuid=storage.uuid))
            dbb = DatabaseBackup(name="db-1", metadata_={"md5": "x"})
            session.add(dbb)
            session.flush()
            session.add(DatabaseBackupStorageRef(databaseBackupUuid=dbb.uuid, backupStorageUuid=storage.uuid))
            session.add(SchedulerJobHistory(**_history()))
            session.commit()
    finally:
        engine.dispose()


def _history() -> dict[str, Any]:
    columns = {c.name for c in SchedulerJobHistory.__table__.columns}
    values: dict[str, Any] = {}
    for column in SchedulerJobHistory.__table__.columns:
        if column.primary_key or column.nullable or column.default is not None:
            continue
        values[column.name] = datetime.now(UTC) if "Date" in column.name or "Time" in column.name else "x"
    assert values.keys() <= columns
    return values


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows, ordered by primary key."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        tables: dict[str, list[tuple[Any, ...]]] = {}
        inspector = inspect(engine)
        with engine.connect() as conn:
            for name in sorted(inspector.get_table_names()):
                keys = inspector.get_pk_constraint(name)["constrained_columns"]
                order = ", ".join(f'"{k}"' for k in keys) or "1"
                tables[name] = [tuple(r) for r in conn.execute(text(f'SELECT * FROM "{name}" ORDER BY {order}'))]
        return tables
    finally:
        engine.dispose()


def dump_to_repo(repo: Repository, url: str) -> tuple[str, str]:
    with dbdump.dump(url) as stream:
        assert stream.server_version
        result = backup_stream(repo, stream.reader, source=dbdump.source_name(url), fmt=stream.format)
    return result.id, stream.format


def load_from_repo(repo: Repository, backup_id: str, url: str, fmt: str, *, force: bool = False) -> None:
    out = io.BytesIO()  # the tests' dumps are small; dbdump.restore_database streams through a pipe
    restore_stream(repo, backup_id, out)
    out.seek(0)
    dbdump.load(url, out, fmt=fmt, force=force)


# -- PostgreSQL ---------------------------------------------------------------------------------
def test_postgres_roundtrip_through_the_repository(make_pg_database: MakePgDatabase, tmp_path: Path) -> None:
    source = make_pg_database(migrate=True)
    fill(source)
    repo = Repository.init(str(tmp_path / "r"), chunk_size=64 * 1024)
    mid, fmt = dump_to_repo(repo, source)
    assert fmt == "pg_dump"
    manifest = repo.load_manifest(mid)
    assert manifest.is_stream and manifest.format == "pg_dump" and manifest.volume.startswith("database:bv_test_")
    target = make_pg_database(migrate=False)
    assert dbdump.is_empty(target) and not dbdump.is_empty(source)
    load_from_repo(repo, mid, target, fmt)
    before = snapshot(source)
    assert before["alembic_version"] and len(before["volume"]) == 20
    assert snapshot(target) == before
    # sequences came along: a new row gets the next id
    engine = create_engine(target, poolclass=NullPool)
    with engine.begin() as conn:
        storage = conn.execute(text("SELECT uuid FROM backup_storage")).scalar_one()
        dbb = conn.execute(text("SELECT uuid FROM database_backup")).scalar_one()
        conn.execute(text("DELETE FROM database_backup_storage_ref"))
        new_id = conn.execute(
            text(
                'INSERT INTO database_backup_storage_ref ("databaseBackupUuid", "backupStorageUuid", status, '
                '"createDate", "lastOpDate") VALUES (:d, :s, \'Ready\', now(), now()) RETURNING id'
            ),
            {"d": dbb, "s": storage},
        ).scalar_one()
    engine.dispose()
    assert new_id == 2
    # a second dump of the unchanged catalog differs only in pg_dump's random \restrict key
    # (first and last line): at most the first and last chunk are new
    with dbdump.dump(source) as stream:
        again = backup_stream(repo, stream.reader, source=dbdump.source_name(source), fmt=stream.format)
    assert again.size == manifest.size and again.newChunks <= 2


def test_postgres_load_refuses_a_database_with_data(make_pg_database: MakePgDatabase, tmp_path: Path) -> None:
    source = make_pg_database(migrate=True)
    fill(source, rows=3)
    repo = Repository.init(str(tmp_path / "r"), chunk_size=64 * 1024)
    mid, fmt = dump_to_repo(repo, source)
    target = make_pg_database(migrate=True)
    fill(target, rows=7)
    with pytest.raises(Conflict, match="not empty"):
        load_from_repo(repo, mid, target, fmt)
    assert len(snapshot(target)["volume"]) == 7
    load_from_repo(repo, mid, target, fmt, force=True)
    assert snapshot(target) == snapshot(source)
    # and the forced copy dumps and loads again (its recreated public schema included)
    mid2, _ = dump_to_repo(repo, target)
    third = make_pg_database(migrate=False)
    load_from_repo(repo, mid2, third, fmt)
    assert snapshot(third) == snapshot(source)


def test_postgres_load_creates_a_missing_database_and_is_all_or_nothing(
    make_pg_database: MakePgDatabase, tmp_path: Path
) -> None:
    source = make_pg_database(migrate=True)
    fill(source, rows=2)
    repo = Repository.init(str(tmp_path / "r"), chunk_size=64 * 1024)
    mid, _fmt = dump_to_repo(repo, source)
    # a missing database: created by load (dropped again by the fixture's owner below)
    holder = make_pg_database(migrate=False)
    missing = make_url(holder).set(database=f"{make_url(holder).database}_new")
    missing_url = missing.render_as_string(hide_password=False)
    try:
        assert dbdump.is_empty(missing_url)
        written = dbdump.restore_database(repo, mid, missing_url)
        assert written == repo.load_manifest(mid).size
        assert snapshot(missing_url) == snapshot(source)
    finally:
        engine = create_engine(make_url(holder).set(database="postgres"), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{missing.database}" WITH (FORCE)'))
        engine.dispose()
    # a damaged chunk: the load is rolled back, the target stays empty
    victim = repo.load_manifest(mid).chunks[-1]
    assert victim
    path = tmp_path / "r" / chunk_key(victim)
    path.write_bytes(path.read_bytes()[:-2] + b"!!")
    target = make_pg_database(migrate=False)
    with pytest.raises(IntegrityError):
        dbdump.restore_database(repo, mid, target)
    assert snapshot(target) == {}
    # SQL that fails half-way: nothing of it stays
    with pytest.raises(dbdump.DatabaseDumpError, match="psql exited"):
        dbdump.load(target, io.BytesIO(b"CREATE TABLE a (x int);\nINSERT INTO a VALUES (1);\nBROKEN;\n"), fmt="pg_dump")
    assert snapshot(target) == {}


def test_pg_dump_of_a_missing_database_fails_clearly(make_pg_database: MakePgDatabase) -> None:
    url = make_url(make_pg_database(migrate=False)).set(database="bv_test_does_not_exist")
    with pytest.raises(dbdump.DatabaseDumpError, match="does not exist"), dbdump.dump(url.render_as_string(False)):
        pass


def test_pg_dump_stopped_early_is_killed(make_pg_database: MakePgDatabase) -> None:
    source = make_pg_database(migrate=True)
    fill(source, rows=200)
    with dbdump.dump(source) as stream:
        assert stream.reader.read(100).startswith(b"--")
    with pytest.raises(RuntimeError, match="consumer"), dbdump.dump(source) as stream:
        stream.reader.read(10)
        raise RuntimeError("consumer failed")


def test_libpq_url_keeps_the_password_off_the_command_line() -> None:
    target, env = dbdump.libpq_url("postgresql+psycopg2://bv:s3cr%40t@db.example:5433/cat alog?sslmode=require")
    assert target == "postgresql://bv@db.example:5433/cat%20alog?sslmode=require"
    assert env["PGPASSWORD"] == "s3cr@t"


# -- SQLite -------------------------------------------------------------------------------------
def sqlite_catalog(path: Path, rows: int) -> str:
    url = f"sqlite:///{path}"
    db.migrate(url)
    if rows:
        fill(url, rows)
    db.engine(url).dispose()
    return url


def test_sqlite_roundtrip_and_emptiness(tmp_path: Path) -> None:
    source = sqlite_catalog(tmp_path / "catalog.db", rows=15)
    repo = Repository.init(str(tmp_path / "r"), chunk_size=64 * 1024)
    assert not dbdump.is_empty(source)
    assert dbdump.is_empty(f"sqlite:///{tmp_path / 'nothing.db'}")
    empty_tables = tmp_path / "tables.db"
    engine = create_engine(f"sqlite:///{empty_tables}", poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x int)"))
    engine.dispose()
    assert dbdump.is_empty(f"sqlite:///{empty_tables}")
    mid, fmt = dump_to_repo(repo, source)
    assert fmt == "sqlite-dump" and repo.load_manifest(mid).volume == "database:catalog"
    target = f"sqlite:///{tmp_path / 'restored' / 'catalog.db'}"
    dbdump.restore_database(repo, mid, target)
    assert snapshot(target) == snapshot(source)
    assert len(snapshot(target)["volume"]) == 15
    with pytest.raises(Conflict):
        dbdump.restore_database(repo, mid, target)
    dbdump.restore_database(repo, mid, target, force=True)
    assert snapshot(target) == snapshot(source)


def test_sqlite_load_failing_midway_leaves_the_target_untouched(tmp_path: Path) -> None:
    target_path = tmp_path / "catalog.db"
    target = sqlite_catalog(target_path, rows=4)
    before = snapshot(target)
    script = b"BEGIN TRANSACTION;\nCREATE TABLE a (x int);\n" + b"INSERT INTO a VALUES (1);\n" * 50000 + b"NOT SQL;\n"
    with pytest.raises(dbdump.DatabaseDumpError, match="loading failed"):
        dbdump.load(target, io.BytesIO(script), fmt="sqlite-dump", force=True)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(dbdump.DatabaseDumpError, match="incomplete"):
        dbdump.load(target, io.BytesIO(b"CREATE TABLE a (x int"), fmt="sqlite-dump", force=True)
    assert snapshot(target) == before
    assert os.path.getsize(target_path) > 0
