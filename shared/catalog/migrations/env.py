"""Alembic environment for the catalog.

The database URL is the Config's ``sqlalchemy.url`` main option (see
:func:`shared.catalog.db.alembic_config`); a caller may instead hand over an open connection
as ``config.attributes["connection"]``. Upgrades are serialised between processes: a
transaction-scoped advisory lock on PostgreSQL, an exclusive ``flock`` on the database file
for SQLite (SQLite's own locks are POSIX record locks, which ``flock`` does not touch).
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator

from alembic import context
from sqlalchemy import Connection, create_engine, pool, text
from sqlalchemy.engine import make_url

from shared.catalog.db import private_sqlite, sqlite_path
from shared.catalog.models import Base

config = context.config
target_metadata = Base.metadata

# Any constant; ASCII "bvcatalo" — shared by every process migrating the same PostgreSQL database.
_PG_LOCK_KEY = 0x6276636174616C6F


@contextlib.contextmanager
def _sqlite_file_lock(url: str) -> Iterator[None]:
    path = sqlite_path(url)
    if path is None:
        yield
        return
    private_sqlite(path)
    with open(path, "ab") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Held until this transaction ends; the current revision is read after it is taken.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        context.run_migrations()


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url is not set"
    context.configure(
        url=url,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=make_url(url).get_backend_name() == "sqlite",
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        _run(given)
        return
    url = config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url is not set"
    is_sqlite = make_url(url).get_backend_name() == "sqlite"
    with _sqlite_file_lock(url) if is_sqlite else contextlib.nullcontext():
        connectable = create_engine(url, poolclass=pool.NullPool)
        try:
            with connectable.connect() as connection:
                _run(connection)
        finally:
            connectable.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
