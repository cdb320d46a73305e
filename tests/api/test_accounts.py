"""Accounts, projects, members and API keys through the REST API (the app in process, on a
real PostgreSQL catalog); the lockout after bad keys and the request body limit."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.auth import HMAC_PREFIX, legacy_key_hash
from shared.catalog import db
from shared.catalog.models import Account, ApiKey
from shared.config import get_settings

MAX_FAILURES = 3
WINDOW = 1.5
MAX_BODY = 4096


class Api:
    def __init__(self, client: TestClient, admin_key: str, url: str, data: Path) -> None:
        self.client, self.admin_key, self.url, self.data = client, admin_key, url, data

    def call(self, method: str, path: str, key: str | None = None, **params: Any) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {key or self.admin_key}"}
        body, query = ({"params": params}, None) if method == "POST" else (None, params)
        response = self.client.request(method, f"/v1{path}", headers=headers, json=body, params=query)
        return response.status_code, response.json()

    def ok(self, method: str, path: str, key: str | None = None, **params: Any) -> dict[str, Any]:
        status, body = self.call(method, path, key, **params)
        assert status == 200 and body["success"], body
        return body

    def account_with_key(self, name: str) -> tuple[str, str]:
        account = self.ok("POST", "/accounts", name=name)["inventory"]["uuid"]
        key = self.ok("POST", "/api-keys", accountUuid=account)["inventory"]["key"]
        return account, key


@pytest.fixture
def api(pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    for name in list(os.environ):
        if name.startswith("BLOCKVAULT_"):
            monkeypatch.delenv(name)
    admin_key = "test-admin-" + secrets.token_hex(12)
    settings = {
        "DATABASE_URL": pg_database,
        "DATA_DIR": str(tmp_path / "data"),
        "ADMIN_API_KEY": admin_key,
        "AUTH_MAX_FAILURES": str(MAX_FAILURES),
        "AUTH_FAILURE_WINDOW_SECONDS": str(WINDOW),
        "MAX_BODY_BYTES": str(MAX_BODY),
    }
    for name, value in settings.items():
        monkeypatch.setenv("BLOCKVAULT_" + name, value)
    get_settings.cache_clear()
    db.reset()  # the default session factory follows the settings of this test
    try:
        with TestClient(create_app()) as client:
            yield Api(client, admin_key, pg_database, tmp_path / "data")
    finally:
        db.engine(pg_database).dispose()
        db.reset()
        get_settings.cache_clear()


def test_accounts_projects_members_and_keys(api: Api) -> None:
    alice, alice_key = api.account_with_key("alice")
    bob, bob_key = api.account_with_key("bob")
    project = api.ok("POST", "/projects", name="web", description="the web tier")["inventory"]
    assert project["name"] == "web" and project["description"] == "the web tier"
    member = api.ok("POST", f"/projects/{project['uuid']}/members", accountUuid=alice, role="projectAdmin")
    assert member["inventory"]["role"] == "projectAdmin"

    # alice's own key opens the API; as projectAdmin she manages the project's members
    added = api.ok("POST", f"/projects/{project['uuid']}/members", alice_key, accountUuid=bob)["inventory"]
    assert (added["accountUuid"], added["role"]) == (bob, "member")
    # bob is a plain member: the project's members are not his to manage (404: not visible)
    status, body = api.call("POST", f"/projects/{project['uuid']}/members", bob_key, accountUuid=alice)
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, _ = api.call("DELETE", f"/projects/{project['uuid']}/members/{bob}", bob_key)
    assert status == 404
    api.ok("DELETE", f"/projects/{project['uuid']}/members/{bob}", alice_key)
    status, _ = api.call("DELETE", f"/projects/{project['uuid']}/members/{bob}")
    assert status == 404  # gone already

    # members may not create accounts or projects
    for path in ("/accounts", "/projects"):
        status, body = api.call("POST", path, alice_key, name="mallory")
        assert status == 403 and body["error"]["code"] == "FORBIDDEN", body

    # keys: one's own, never another account's; the key is shown once, the hash never
    mine = api.ok("POST", "/api-keys", bob_key, name="laptop")["inventory"]
    assert mine["accountUuid"] == bob and mine["key"].startswith("bv_") and "keyHash" not in mine
    status, body = api.call("POST", "/api-keys", bob_key, accountUuid=alice)
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    listed = api.ok("GET", "/api-keys", bob_key)["inventories"]
    assert {row["uuid"] for row in listed} == {mine["uuid"], *_key_uuids(api, bob)} and len(listed) == 2
    assert all("key" not in row and "keyHash" not in row for row in listed)
    assert len(api.ok("GET", "/api-keys")["inventories"]) >= 4  # the admin sees every key
    alice_keys = _key_uuids(api, alice)
    status, _ = api.call("DELETE", f"/api-keys/{alice_keys[0]}", bob_key)
    assert status == 404
    status, _ = api.call("GET", f"/api-keys/{alice_keys[0]}", bob_key)
    assert status == 404
    status, body = api.call("GET", "/api-keys", bob_key, q="keyHash=x")
    assert status == 400  # the hash is not even a query field

    # a revoked key no longer opens anything
    api.ok("GET", "/projects", mine["key"])
    api.ok("DELETE", f"/api-keys/{mine['uuid']}", bob_key)
    status, body = api.call("GET", "/projects", mine["key"])
    assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
    api.ok("GET", "/projects", bob_key)  # his other key still works


def _key_uuids(api: Api, account: str) -> list[str]:
    return [row["uuid"] for row in api.ok("GET", "/api-keys", q=f"accountUuid={account}")["inventories"]]


def test_invalid_params(api: Api) -> None:
    for path, params in (
        ("/accounts", {"name": "x", "type": "Root"}),
        ("/accounts", {}),
        ("/projects", {"name": 5}),
        ("/api-keys", {"accountUuid": "not-a-uuid"}),
    ):
        status, body = api.call("POST", path, **params)
        assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT", (path, body)
    api.ok("POST", "/accounts", name="dup")
    status, body = api.call("POST", "/accounts", name="dup")
    assert status == 409 and body["error"]["code"] == "CONFLICT"
    project = api.ok("POST", "/projects", name="p")["inventory"]["uuid"]
    status, _ = api.call("POST", f"/projects/{project}/members", accountUuid=secrets.token_hex(16))
    assert status == 404
    status, body = api.call("POST", f"/projects/{project}/members", accountUuid=secrets.token_hex(16), role="owner")
    assert status in (400, 404)


def test_keys_are_hmac_hashed_and_legacy_keys_rehashed(api: Api) -> None:
    account, key = api.account_with_key("carol")
    secret_file = api.data / "secret.key"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    with db.session(api.url) as session:
        stored = session.scalars(select(ApiKey).where(ApiKey.accountUuid == account)).one().keyHash
        assert stored.startswith(HMAC_PREFIX) and hashlib.sha256(key.encode()).hexdigest() not in stored
        # a key stored by an earlier version: a plain SHA-256
        legacy = "bv_legacy_" + secrets.token_hex(16)
        session.add(ApiKey(accountUuid=account, keyHash=legacy_key_hash(legacy), name="old"))
    api.ok("GET", "/projects", legacy)
    with db.session(api.url) as session:
        row = session.scalars(select(ApiKey).where(ApiKey.name == "old")).one()
        assert row.keyHash.startswith(HMAC_PREFIX) and row.keyHash != legacy_key_hash(legacy)
    api.ok("GET", "/projects", legacy)  # and still opens after the re-hash
    with db.session(api.url) as session:  # the seeded admin key is HMAC-hashed too
        admin = session.scalars(select(Account).where(Account.name == "admin")).one()
        hashes = session.scalars(select(ApiKey.keyHash).where(ApiKey.accountUuid == admin.uuid)).all()
        assert hashes and all(h.startswith(HMAC_PREFIX) for h in hashes)


def test_lockout_after_bad_keys(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    bad = "bv_guess_" + secrets.token_hex(8)
    for _ in range(MAX_FAILURES):
        status, _ = api.call("GET", "/projects", bad)
        assert status == 401
    response = api.client.get("/v1/projects", headers={"Authorization": f"Bearer {api.admin_key}"})
    assert response.status_code == 429 and response.json()["error"]["code"] == "TOO_MANY_REQUESTS"
    assert 1 <= int(response.headers["Retry-After"]) <= 2
    assert api.client.get("/v1/health").status_code == 200  # no key needed: not locked
    assert bad not in caplog.text
    time.sleep(WINDOW + 0.1)
    api.ok("GET", "/projects")


def test_body_limit(api: Api) -> None:
    big = {"params": {"name": "x" * (MAX_BODY + 1)}}
    headers = {"Authorization": f"Bearer {api.admin_key}"}
    response = api.client.post("/v1/projects", json=big, headers=headers)
    assert response.status_code == 413 and response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"params": {"name": "'
        for _ in range(MAX_BODY // 100 + 1):
            yield b"y" * 100
        yield b'"}}'

    response = api.client.post(
        "/v1/projects", content=chunks(), headers={**headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    api.ok("POST", "/projects", name="small")
