"""Storage credentials at rest: secrets sealed to their row under the server secret, options
readable, plaintext rows of earlier versions still read and sealed on request."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from shared.catalog import db
from shared.catalog.models import BackupStorage, new_uuid
from shared.config import get_settings
from shared.credentials import SEALED, credentials_of, in_the_clear, seal_plaintext, set_credentials
from shared.errors import CredentialsUnreadable

CLOUD = {
    "endpoint": "https://s3.example:9000",
    "region": "eu-1",
    "accessKey": "AKIA-test-access",
    "secretKey": "test-secret-key-value",
    "encryptionPassphrase": "a passphrase",
}
SECRET_VALUES = ("AKIA-test-access", "test-secret-key-value", "a passphrase")


@pytest.fixture
def use_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Switch the server secret (and put the embedded catalog in ``tmp_path``)."""
    monkeypatch.delenv("BLOCKVAULT_DATABASE_URL", raising=False)
    monkeypatch.setenv("BLOCKVAULT_DATA_DIR", str(tmp_path / "data"))

    def use(secret: str) -> None:
        monkeypatch.setenv("BLOCKVAULT_SECRET_KEY", secret)
        get_settings.cache_clear()

    use("the-first-server-secret")
    db.reset()
    yield use
    db.reset()
    get_settings.cache_clear()


def cloud(uuid: str | None = None) -> BackupStorage:
    row = BackupStorage(uuid=uuid, name="cloud", type="PublicCloud", url="s3://b/p")
    set_credentials(row, {**CLOUD, "type": "PublicCloud", "ignored": "x"})
    return row


def test_secrets_are_sealed_options_stay_readable(use_secret: Callable[[str], None]) -> None:
    row = cloud()
    assert row.uuid and len(row.uuid) == 32  # given one: the seal is bound to it
    assert row.credentials is not None and set(row.credentials) == {"endpoint", "region", SEALED}
    assert not any(value in json.dumps(row.credentials) for value in SECRET_VALUES)
    assert not in_the_clear(row)
    assert credentials_of(row) == CLOUD
    assert credentials_of(row, secrets=False) == {"endpoint": "https://s3.example:9000", "region": "eu-1"}
    again = cloud(row.uuid)
    assert again.credentials is not None and again.credentials[SEALED] != row.credentials[SEALED]  # fresh nonce
    empty = BackupStorage(uuid=new_uuid(), name="local", url="file:///x")
    set_credentials(empty, {"token": "", "caFile": None})
    assert empty.credentials is None and credentials_of(empty) == {}


def test_a_seal_opens_on_its_row_under_its_secret_only(use_secret: Callable[[str], None]) -> None:
    row = cloud()
    moved = BackupStorage(uuid=new_uuid(), name="other", credentials=dict(row.credentials or {}))
    with pytest.raises(CredentialsUnreadable) as error:
        credentials_of(moved)
    assert "other" in str(error.value) and moved.uuid in str(error.value) and "re-enter" in str(error.value)
    sealed = str((row.credentials or {})[SEALED])
    for broken in (sealed[:-4] + "AAAA", "v1:not base64!", "v2:" + sealed[3:], 17):
        tampered = BackupStorage(uuid=row.uuid, name="cloud", credentials={**(row.credentials or {}), SEALED: broken})
        with pytest.raises(CredentialsUnreadable):
            credentials_of(tampered)
    use_secret("another-server-secret")
    with pytest.raises(CredentialsUnreadable) as error:
        credentials_of(row)
    assert error.value.code == "CREDENTIALS_UNREADABLE" and not any(v in str(error.value) for v in SECRET_VALUES)
    assert credentials_of(row, secrets=False)["endpoint"] == CLOUD["endpoint"]  # options need no secret
    use_secret("the-first-server-secret")
    assert credentials_of(row) == CLOUD


def test_plaintext_rows_read_and_are_sealed_once(use_secret: Callable[[str], None]) -> None:
    db.migrate()
    plain = {"token": "plain-token-value", "caFile": "/etc/ca.pem"}
    with db.session() as session:
        old = BackupStorage(uuid=new_uuid(), name="old", type="Remote", url="https://dc2:8081", credentials=plain)
        unreadable = cloud()
        unreadable.credentials = {**(unreadable.credentials or {}), "token": "half-sealed"}
        none = BackupStorage(uuid=new_uuid(), name="none", url="file:///srv/bs")
        session.add_all([old, unreadable, none])
        session.flush()
        assert in_the_clear(old) and credentials_of(old) == plain
        use_secret("another-server-secret")  # the mixed row cannot be read now: left as it is
        assert seal_plaintext(session) == 1
        assert seal_plaintext(session) == 0
    with db.session() as session:
        rows = {row.name: row for row in session.scalars(select(BackupStorage))}
        assert set(rows["old"].credentials or {}) == {"caFile", SEALED}
        assert credentials_of(rows["old"]) == plain and rows["none"].credentials is None
        assert "plain-token-value" not in json.dumps(rows["old"].credentials)
        assert in_the_clear(rows["cloud"])
