"""The catalog's Alembic migrations against empty SQLite and PostgreSQL databases."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from shared.catalog import db
from shared.catalog.models import Base
from tests.services import MakePgDatabase

ROOT = Path(__file__).resolve().parents[3]


def config(url: str) -> Config:
    return cast(Config, db.alembic_config(url))


def head() -> str | None:
    return ScriptDirectory.from_config(config("sqlite://")).get_current_head()


def inspect_catalog(url: str) -> tuple[str | None, list[str], list[tuple[Any, ...]]]:
    """The current revision, the table names, and how the schema differs from the models."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            tables = sorted(inspect(conn).get_table_names())
            return context.get_current_revision(), tables, compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


MIGRATED_TABLES = sorted([*Base.metadata.tables, "alembic_version"])


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty catalog database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
    else:
        make_pg_database = cast(MakePgDatabase, request.getfixturevalue("make_pg_database"))
        yield make_pg_database(migrate=False)


def test_migrate_creates_the_models_schema_idempotently(empty_url: str) -> None:
    assert inspect_catalog(empty_url)[:2] == (None, [])
    for _ in range(2):  # the second run is a no-op
        db.migrate(empty_url)
        assert inspect_catalog(empty_url) == (head(), MIGRATED_TABLES, [])
    assert head() is not None  # one linear chain of revisions (head() insists on a single head)


def test_downgrade_to_base_then_upgrade_again(empty_url: str) -> None:
    db.migrate(empty_url)
    command.downgrade(config(empty_url), "base")
    assert inspect_catalog(empty_url)[:2] == (None, ["alembic_version"])
    db.migrate(empty_url)
    assert inspect_catalog(empty_url) == (head(), MIGRATED_TABLES, [])


def test_processes_starting_together_migrate_once(empty_url: str) -> None:
    """Every process migrates at start: several at once on an empty catalog must all succeed."""
    code = "import sys; from shared.catalog.db import migrate; migrate(sys.argv[1])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, empty_url], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], errors
    assert inspect_catalog(empty_url) == (head(), MIGRATED_TABLES, [])


def test_0011_converts_trigger_times_from_milliseconds_to_seconds(empty_url: str) -> None:
    """Triggers stored in Unix ms before 0011 fire at the same moments after it (Unix s)."""
    command.upgrade(config(empty_url), "0010")
    engine = create_engine(empty_url, poolclass=NullPool)
    insert = text(
        'INSERT INTO scheduler_trigger (uuid, name, "schedulerType", "schedulerInterval", "startTime", "stopTime",'
        " state, \"createDate\", \"lastOpDate\") VALUES (:uuid, :name, 'simple', 60, :start, :stop, 'Enabled',"
        " CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
    )
    try:
        with engine.begin() as conn:
            conn.execute(
                insert, {"uuid": "a" * 32, "name": "ms", "start": 1_767_225_600_999, "stop": 1_767_312_000_000}
            )
            conn.execute(insert, {"uuid": "b" * 32, "name": "open", "start": None, "stop": None})
        db.migrate(empty_url)
        select_times = text('SELECT uuid, "startTime", "stopTime" FROM scheduler_trigger ORDER BY uuid')
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(select_times)]
        assert rows == [("a" * 32, 1_767_225_600, 1_767_312_000), ("b" * 32, None, None)]
        command.downgrade(config(empty_url), "0010")
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(select_times)]
        assert rows == [("a" * 32, 1_767_225_600_000, 1_767_312_000_000), ("b" * 32, None, None)]
    finally:
        engine.dispose()


def test_the_newest_revision_is_read_from_the_file_names() -> None:
    # db.head_revision() lists versions/ instead of loading every script: each one is named
    # for its revision, and the newest file is Alembic's one head
    scripts = ScriptDirectory.from_config(config("sqlite://"))
    named = {Path(script.path).name.partition("_")[0]: script.revision for script in scripts.walk_revisions()}
    assert named and all(prefix == revision for prefix, revision in named.items()), named
    assert db.head_revision() == head()


def test_a_catalog_at_the_newest_revision_is_checked_without_alembic(empty_url: str) -> None:
    # every process calls migrate() at start; loading Alembic and every migration script to
    # learn there is nothing to do cost a worker 0.1 CPU s of its start
    db.migrate(empty_url)
    code = (
        "import sys; from shared.catalog.db import migrate; migrate(sys.argv[1]);"
        " print(sorted(name for name in sys.modules if name.split('.')[0] == 'alembic'))"
    )
    out = subprocess.run([sys.executable, "-c", code, empty_url], check=False, cwd=ROOT, capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr
    assert inspect_catalog(empty_url) == (head(), MIGRATED_TABLES, [])


def test_a_catalog_newer_than_this_blockvault_is_refused(empty_url: str) -> None:
    # a revision it has no script for (written by a newer blockvault): the process does not start
    db.migrate(empty_url)
    engine = create_engine(empty_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    with pytest.raises(CommandError, match="9999"):
        db.migrate(empty_url)
