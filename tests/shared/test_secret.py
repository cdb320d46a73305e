"""The server secret: from the environment or the data dir (private files), keys derived from
it, and the warning for a shared catalog whose processes keep their own."""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.config import get_settings
from shared.errors import UsageError
from shared.secret import SECRET_FILE, check_at_start, derived_key, keyed_hash, server_secret

Configure = Callable[..., Path]


@pytest.fixture
def configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """Set the settings a test names (``secret_key=...``, ``database_url=...``) on a fresh
    data dir; returns the data dir."""

    def apply(**settings: str) -> Path:
        for name in ("SECRET_KEY", "DATABASE_URL"):
            monkeypatch.delenv("BLOCKVAULT_" + name, raising=False)
        data = tmp_path / "data"
        monkeypatch.setenv("BLOCKVAULT_DATA_DIR", str(data))
        for name, value in settings.items():
            monkeypatch.setenv("BLOCKVAULT_" + name.upper(), value)
        get_settings.cache_clear()
        return data

    yield apply
    get_settings.cache_clear()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_secret_from_the_data_dir_is_made_private_and_kept(configure: Configure) -> None:
    data = configure()
    assert not data.exists()
    first = server_secret()
    assert len(first) == 32 and mode(data) == 0o700 and mode(data / SECRET_FILE) == 0o600
    assert server_secret() == first and bytes.fromhex((data / SECRET_FILE).read_text()) == first


def test_a_readable_secret_file_of_an_earlier_version_is_tightened(configure: Configure) -> None:
    data = configure()
    data.mkdir(mode=0o755)
    (data / SECRET_FILE).write_text("ab" * 32 + "\n")
    (data / SECRET_FILE).chmod(0o644)
    assert server_secret() == bytes.fromhex("ab" * 32)
    assert mode(data / SECRET_FILE) == 0o600 and mode(data) == 0o755  # a folder it did not make stays


def test_bad_secrets_stop_the_start(configure: Configure) -> None:
    configure(secret_key="short")
    with pytest.raises(UsageError, match="at least 16 characters"):
        check_at_start("api")
    data = configure()
    data.mkdir()
    (data / SECRET_FILE).write_text("not hex\n")
    with pytest.raises(UsageError, match="is not a secret key"):
        server_secret()


def test_derived_keys_and_hashes_belong_to_one_secret_and_one_use(configure: Configure) -> None:
    configure(secret_key="one-server-secret-of-length")
    key, other_use, digest = derived_key(b"use a"), derived_key(b"use b"), keyed_hash("token")
    assert len(key) == 32 and key != other_use and key == derived_key(b"use a")
    assert len(digest) == 64 and digest == keyed_hash("token") != keyed_hash("token2")
    configure(secret_key="another-server-secret-of-length")
    assert derived_key(b"use a") != key and keyed_hash("token") != digest


def test_a_shared_catalog_without_the_secret_key_is_warned_about(
    configure: Configure, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shared.secret")
    configure(database_url="postgresql+psycopg2://u@127.0.0.1/db")
    check_at_start("worker")
    (record,) = caplog.records
    assert record.getMessage().startswith("secret.not_shared process=worker")
    assert "BLOCKVAULT_SECRET_KEY" in record.getMessage()
    caplog.clear()
    configure(database_url="postgresql+psycopg2://u@127.0.0.1/db", secret_key="a-shared-secret-of-length")
    check_at_start("beat")
    configure()  # the embedded default: every process shares the data dir
    check_at_start("api")
    assert caplog.records == []
    assert "a-shared-secret" not in caplog.text
