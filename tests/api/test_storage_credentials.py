"""Backup storage credentials at rest, through the API in process on a real PostgreSQL catalog
and a real storage-server: sealed in the catalog, earlier versions' plaintext rows sealed when
the API starts, and re-entered with updateBackupStorage after the server secret changed."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from shared.catalog import db
from shared.catalog.models import new_uuid
from shared.storage import check_storages
from tests.api.conftest import app_client

PASSPHRASE = "local-passphrase-" + secrets.token_hex(8)


class Deployment:
    """One catalog and data dir; :meth:`start` runs the API on them with a given server secret."""

    def __init__(self, url: str, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.url, self.tmp, self.monkeypatch = url, tmp, monkeypatch
        self.admin_key = "test-admin-" + secrets.token_hex(12)
        self.secret = "first-server-secret-" + secrets.token_hex(8)
        self.responses: list[str] = []

    def start(self, secret: str | None = None) -> AbstractContextManager[TestClient]:
        """The API on this catalog, with ``secret`` (default: the one it was first started with)."""
        settings = {"DATABASE_URL": self.url, "DATA_DIR": str(self.tmp / "data"), "ADMIN_API_KEY": self.admin_key}
        return app_client(self.monkeypatch, {**settings, "SECRET_KEY": secret or self.secret})

    def call(self, client: TestClient, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {self.admin_key}"}
        response = client.request(method, f"/v1{path}", json=body, headers=headers)
        self.responses.append(response.text)
        return response.status_code, response.json()

    def register(self, client: TestClient, **params: Any) -> dict[str, Any]:
        status, body = self.call(client, "POST", "/backup-storage", {"params": params})
        assert status == 200, body
        return dict(body["inventory"])

    def action(self, client: TestClient, uuid: str, action: str, **params: Any) -> tuple[int, dict[str, Any]]:
        return self.call(client, "PUT", f"/backup-storage/{uuid}/actions", {action: params})

    def stored(self) -> dict[str, Any]:
        """Every backup storage row's credentials column, by uuid, as the catalog holds it."""
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT uuid, credentials FROM backup_storage")).all()
        finally:
            engine.dispose()
        return {uuid: json.loads(c) if isinstance(c, str) else c for uuid, c in rows}


@pytest.fixture
def deployment(pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    yield Deployment(pg_database, tmp_path, monkeypatch)


def register_two(deployment: Deployment, start_storage_server: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """A storage-server, and a Remote storage on it and an encrypted ImageStore registered
    under the deployment's first secret (the API stopped again)."""
    server = start_storage_server(deployment.tmp / "remote")
    with deployment.start() as client:
        remote = deployment.register(client, name="dc2", type="Remote", url=server.url, token=server.token)
        local = deployment.register(
            client, name="local", url=f"file://{deployment.tmp / 'local'}", encryptionPassphrase=PASSPHRASE
        )
    return server, remote, local


def test_credentials_are_sealed_in_the_catalog_and_open_the_storage(
    deployment: Deployment, start_storage_server: Any
) -> None:
    server, remote, local = register_two(deployment, start_storage_server)
    with deployment.start() as client:
        stored = deployment.stored()
        assert set(stored[remote["uuid"]]) == {"sealed"} and set(stored[local["uuid"]]) == {"sealed"}
        text_ = json.dumps(stored)
        assert server.token not in text_ and PASSPHRASE not in text_
        for storage in (remote, local):
            status, body = deployment.action(client, storage["uuid"], "reconnectBackupStorage")
            assert status == 200 and body["inventory"]["status"] == "Connected", body
        # a sealed blob opens on its own row only
        engine = create_engine(deployment.url, poolclass=NullPool)
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE backup_storage SET credentials = :c WHERE uuid = :u"),
                {"c": json.dumps(stored[remote["uuid"]]), "u": local["uuid"]},
            )
        engine.dispose()
        status, body = deployment.action(client, local["uuid"], "reconnectBackupStorage")
        assert status == 409 and body["error"]["code"] == "CREDENTIALS_UNREADABLE", body
    assert not any(server.token in r or PASSPHRASE in r for r in deployment.responses)


def test_an_earlier_versions_plaintext_credentials_still_open_and_are_sealed_at_start(
    deployment: Deployment, start_storage_server: Any
) -> None:
    server, remote, _local = register_two(deployment, start_storage_server)
    plain = {"token": server.token}
    engine = create_engine(deployment.url, poolclass=NullPool)
    with engine.begin() as conn:  # as an earlier version stored it
        conn.execute(
            text("UPDATE backup_storage SET credentials = :c WHERE uuid = :u"),
            {"c": json.dumps(plain), "u": remote["uuid"]},
        )
    engine.dispose()
    assert deployment.stored()[remote["uuid"]] == plain
    with deployment.start() as client:
        assert set(deployment.stored()[remote["uuid"]]) == {"sealed"}
        status, body = deployment.action(client, remote["uuid"], "reconnectBackupStorage")
        assert status == 200 and body["inventory"]["status"] == "Connected", body


def test_after_the_secret_changed_the_credentials_are_re_entered_with_update(
    deployment: Deployment, start_storage_server: Any
) -> None:
    server, remote, local = register_two(deployment, start_storage_server)
    # the catalog restored onto a deployment with another secret
    with deployment.start("another-server-secret-" + secrets.token_hex(8)) as client:
        for storage in (remote, local):
            status, body = deployment.action(client, storage["uuid"], "reconnectBackupStorage")
            assert status == 409 and body["error"]["code"] == "CREDENTIALS_UNREADABLE", body
            description = body["error"]["description"]
            assert storage["name"] in description and storage["uuid"] in description
            assert "re-enter" in description and "updateBackupStorage" in description
        # a worker's health pass cannot tell: it passes them over and leaves their status alone
        with db.session() as session:
            check_storages(session)
        statuses = deployment.call(client, "GET", "/backup-storage")[1]["inventories"]
        assert {row["uuid"]: row["status"] for row in statuses} == {
            remote["uuid"]: "Connected",
            local["uuid"]: "Connected",
        }
        # re-entered credentials are checked like a registration's; nothing changes when they fail
        before = deployment.stored()
        for params, code in (
            ({"token": "wrong-" + server.token}, "STORAGE_AUTH_FAILED"),
            ({"token": 5}, "INVALID_ARGUMENT"),
            ({"token": ""}, "INVALID_ARGUMENT"),
            ({"encryptionPassphrase": PASSPHRASE}, "INVALID_ARGUMENT"),  # a Remote needs its token
        ):
            status, body = deployment.action(client, remote["uuid"], "updateBackupStorage", **params)
            assert (status, body["error"]["code"]) == (400, code), (params, body)  # bad input, not a conflict
        status, body = deployment.action(client, local["uuid"], "updateBackupStorage", encryptionPassphrase="nope")
        assert (status, body["error"]["code"]) == (409, "WRONG_PASSPHRASE"), body
        assert deployment.stored() == before
        # the right ones: sealed again under this deployment's secret, and the storage opens
        status, body = deployment.action(client, remote["uuid"], "updateBackupStorage", token=server.token)
        assert status == 200 and body["inventory"]["status"] == "Connected", body
        status, body = deployment.action(
            client, local["uuid"], "updateBackupStorage", encryptionPassphrase=PASSPHRASE, name="local-2"
        )
        assert status == 200 and body["inventory"]["name"] == "local-2", body
        for storage in (remote, local):
            status, body = deployment.action(client, storage["uuid"], "reconnectBackupStorage")
            assert status == 200 and body["inventory"]["status"] == "Connected", body
        assert set(deployment.stored()[remote["uuid"]]) == {"sealed"}
        # an update without credentials leaves them as they are
        status, _ = deployment.action(client, remote["uuid"], "updateBackupStorage", description="dc2 copy")
        assert status == 200
        assert deployment.action(client, remote["uuid"], "reconnectBackupStorage")[0] == 200
    assert not any(server.token in r or PASSPHRASE in r for r in deployment.responses)


def test_update_with_an_unknown_storage_or_a_bad_body(deployment: Deployment) -> None:
    with deployment.start() as client:
        status, body = deployment.action(client, new_uuid(), "updateBackupStorage", token="x")
        assert status == 404, body
        storage = deployment.register(client, name="plain", url=f"file://{deployment.tmp / 'plain'}")
        status, body = deployment.action(client, storage["uuid"], "updateBackupStorage", accessKey=["x"])
        assert (status, body["error"]["code"]) == (400, "INVALID_ARGUMENT"), body
