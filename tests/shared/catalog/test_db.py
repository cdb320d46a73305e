"""The embedded SQLite catalog is private: its file and its -wal and -shm are mode 0600 from
the first start, and an earlier version's readable files are tightened at the next."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from shared.catalog import db
from shared.config import get_settings


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("BLOCKVAULT_DATABASE_URL", raising=False)
    monkeypatch.setenv("BLOCKVAULT_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    db.reset()
    yield tmp_path / "data"
    db.reset()
    get_settings.cache_clear()


def files(data: Path) -> dict[str, int]:
    return {path.name: mode(path) for path in data.iterdir() if path.name.startswith("catalog.db")}


def test_the_catalog_and_its_wal_are_created_private(data: Path) -> None:
    db.migrate()
    with db.session() as session:
        session.execute(text("SELECT count(*) FROM host"))
        assert files(data) == {"catalog.db": 0o600, "catalog.db-wal": 0o600, "catalog.db-shm": 0o600}
    assert mode(data) == 0o700


def test_an_earlier_versions_readable_catalog_is_tightened_at_start(data: Path) -> None:
    db.migrate()
    with db.session() as session:
        session.execute(text("SELECT count(*) FROM host"))
        for path in data.glob("catalog.db*"):
            path.chmod(0o644)
    db.reset()
    db.migrate()
    with db.session() as session:
        session.execute(text("SELECT count(*) FROM host"))
        assert set(files(data).values()) == {0o600}
