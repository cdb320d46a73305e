"""Catalog connections and migrations.

``engine()`` and ``session()`` serve every process; ``migrate()`` brings the schema to the
newest Alembic revision (each process calls it at start: when the catalog is already there it
reads the revision and returns, without loading Alembic and its migration scripts).
Errors reaching the database are translated to :class:`~shared.errors.CatalogUnavailable`.
An SQLite catalog is private to blockvault's user (:func:`private_sqlite`): the file is made
mode 0600 before SQLite first opens it (SQLite gives its ``-wal`` and ``-shm`` the database's
mode), and an earlier version's readable files are tightened.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError as SAInterfaceError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.config import get_settings
from shared.errors import CatalogUnavailable
from shared.forksafe import ForkSafeLock
from shared.private import private_file, tighten

MIGRATIONS = Path(__file__).with_name("migrations")
_lock = ForkSafeLock(threading.RLock)


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


_engines: dict[str, Engine] = {}


def engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: the settings' catalog), one per process."""
    url = url or get_settings().catalog_url
    with _lock:
        if url not in _engines:
            _engines[url] = _make_engine(url)
        return _engines[url]


SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def private_sqlite(path: Path) -> None:
    """Make the SQLite database ``path`` (and its companion files) readable by this user only,
    creating it empty, mode 0600, when missing (an empty file is an empty database)."""
    private_file(path)
    for suffix in SQLITE_COMPANIONS:
        tighten(Path(f"{path}{suffix}"))


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL (None for another database, or one in memory)."""
    if not url.startswith("sqlite"):
        return None
    path = make_url(url).database
    return Path(path) if path and path != ":memory:" and not path.startswith("file:") else None


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None:
            private_sqlite(path)
        eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(eng, "connect", _sqlite_pragmas)
        return eng
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, pool_recycle=1800)


@functools.cache
def _factory(url: str | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=engine(url), expire_on_commit=False)


@contextlib.contextmanager
def session(url: str | None = None) -> Iterator[Session]:
    """A session committed when the block ends without error, rolled back otherwise."""
    db = _factory(url)()
    try:
        yield db
        db.commit()
    except (OperationalError, SAInterfaceError) as exc:
        db.rollback()
        raise CatalogUnavailable(detail=str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)) from None
    except BaseException:
        db.rollback()
        raise
    finally:
        db.close()


def reset() -> None:
    """Forget every engine and pool (in a forked worker process: the parent's connections
    must not be shared)."""
    with _lock:
        for eng in _engines.values():
            eng.dispose(close=False)
        _engines.clear()
    _factory.cache_clear()


def alembic_config(url: str | None = None) -> object:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", (url or get_settings().catalog_url).replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest migration's revision, from the file names alone: each migration is
    ``versions/NNNN_<what>.py`` with revision ``"NNNN"``, one chain (tests/shared/catalog/
    test_migrations.py holds every script to it)."""
    return max(path.name.partition("_")[0] for path in (MIGRATIONS / "versions").glob("[0-9]*_*.py"))


def current_revisions(url: str | None = None) -> list[str]:
    """The revisions the catalog records (none for an empty database)."""
    with engine(url).connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return []
        return sorted(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())


def migrate(url: str | None = None) -> None:
    """Upgrade the catalog to the newest revision (idempotent; serialised in this process). A
    catalog at the newest revision costs one read; any other goes to Alembic, which upgrades an
    older one and refuses one it has no script for (a newer blockvault's)."""
    with _lock:
        try:
            if current_revisions(url) == [head_revision()]:
                return
            from alembic import command

            command.upgrade(alembic_config(url), "head")  # type: ignore[arg-type]
        except (OperationalError, SAInterfaceError) as exc:
            raise CatalogUnavailable(detail=str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)) from None
