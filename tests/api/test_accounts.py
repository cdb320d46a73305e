"""Accounts, projects, members, API keys and sessions through the REST API (the app in process,
on a real PostgreSQL catalog); the limits on bad keys and failed logins, and the request body
limit."""

from __future__ import annotations

import hashlib
import secrets
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select

from api.auth import HMAC_PREFIX, legacy_key_hash, session_hash
from shared.catalog import db
from shared.catalog.models import Account, ApiKey, LoginSession, aware, now
from tests.api.conftest import app_client

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
    admin_key = "test-admin-" + secrets.token_hex(12)
    settings = {
        "DATABASE_URL": pg_database,
        "DATA_DIR": str(tmp_path / "data"),
        "ADMIN_API_KEY": admin_key,
        "AUTH_MAX_FAILURES": str(MAX_FAILURES),
        "AUTH_FAILURE_WINDOW_SECONDS": str(WINDOW),
        "MAX_BODY_BYTES": str(MAX_BODY),
    }
    with app_client(monkeypatch, settings) as client:
        yield Api(client, admin_key, pg_database, tmp_path / "data")


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
    status, body = api.call("POST", f"/projects/{project}/members", accountUuid=secrets.token_hex(16))
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    # an account that exists with a role that does not: the role is the bad input
    account = api.ok("POST", "/accounts", name="would-be-owner")["inventory"]["uuid"]
    status, body = api.call("POST", f"/projects/{project}/members", accountUuid=account, role="owner")
    assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT" and "role" in body["error"]["description"]


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


def test_a_request_is_one_transaction_and_a_keys_last_use_outlives_its_failing_route(api: Api) -> None:
    """A request checks one connection out of the pool (and pings it once): its key is looked
    up in the route's transaction. What authenticating writes (a key's ``lastUsedDate``, at
    most once a minute) is committed on its own, and kept when the route then fails; a revoked
    key fails on its very next request."""
    account, key = api.account_with_key("ivy")
    api.ok("GET", "/projects", key)  # its first use writes its lastUsedDate
    checkouts: list[object] = []
    engine = db.engine(api.url)

    def checked_out(*args: object) -> None:
        checkouts.append(args)

    event.listen(engine, "checkout", checked_out)
    try:
        api.ok("GET", "/projects", key)
        assert len(checkouts) == 1
        with db.session(api.url) as session:
            row = session.scalars(select(ApiKey).where(ApiKey.accountUuid == account)).one()
            row.lastUsedDate = now() - timedelta(hours=1)
            uuid = row.uuid
        checkouts.clear()
        status, body = api.call("GET", "/volumes/" + "0" * 32, key)  # the route's 404 rolls back its work
        assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    finally:
        event.remove(engine, "checkout", checked_out)
    with db.session(api.url) as session:
        used = session.get(ApiKey, uuid)
        assert used is not None and used.lastUsedDate is not None
        assert now() - aware(used.lastUsedDate) < timedelta(minutes=1)
    api.ok("DELETE", f"/api-keys/{uuid}")
    status, body = api.call("GET", "/projects", key)
    assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"


def test_bad_keys_from_an_address_get_429_and_good_keys_behind_it_are_still_served(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    _account, member_key = api.account_with_key("dave")
    bad = "bv_guess_" + secrets.token_hex(8)
    for _ in range(MAX_FAILURES):
        status, body = api.call("GET", "/projects", bad)
        assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
    # the address is over the limit: its bad keys get 429 with Retry-After, unknown sessions too
    for wrong in (bad, "bv_another_" + secrets.token_hex(8), secrets.token_hex(16)):
        response = api.client.get("/v1/projects", headers={"Authorization": f"Bearer {wrong}"})
        assert response.status_code == 429 and response.json()["error"]["code"] == "TOO_MANY_REQUESTS"
        assert 1 <= int(response.headers["Retry-After"]) <= 2
    # ...while every valid key behind the same address is served
    api.ok("GET", "/projects")
    api.ok("GET", "/projects", member_key)
    assert api.client.get("/v1/health").status_code == 200
    assert bad not in caplog.text
    time.sleep(WINDOW + 0.1)
    status, _ = api.call("GET", "/projects", bad)
    assert status == 401  # the window passed: a bad key is a plain 401 again


LOGIN = "/v1/accounts/login"


def log_in(api: Api, name: str, password: str) -> Any:
    body = {"logInByAccount": {"accountName": name, "password": hashlib.sha512(password.encode()).hexdigest()}}
    return api.client.put(LOGIN, json=body)


def test_password_logins_are_limited_per_address_and_account(api: Api) -> None:
    for name in ("erin", "frank"):
        api.ok("POST", "/accounts", name=name, password=f"{name}-password")
    for _ in range(MAX_FAILURES):
        response = log_in(api, "erin", "a guess")
        assert response.status_code == 401 and response.json()["error"]["code"] == "UNAUTHORIZED"
    # this address may not try erin any more, not even with her password...
    response = log_in(api, "erin", "erin-password")
    assert response.status_code == 429 and response.json()["error"]["code"] == "TOO_MANY_REQUESTS"
    assert 1 <= int(response.headers["Retry-After"]) <= 2 and "erin" in response.json()["error"]["description"]
    # ...but another account logs in from it, and keys are served as ever
    assert log_in(api, "frank", "frank-password").status_code == 200
    api.ok("GET", "/projects")
    status, _ = api.call("GET", "/projects", "bv_wrong")
    assert status == 401  # failed logins are not failed keys
    time.sleep(WINDOW + 0.1)
    assert log_in(api, "erin", "erin-password").status_code == 200


def test_sessions_are_stored_hashed_end_with_a_new_password_and_log_out_by_token(api: Api) -> None:
    account = api.ok("POST", "/accounts", name="grace", password="first")["inventory"]["uuid"]
    tokens = []
    for _ in range(2):
        response = log_in(api, "grace", "first")
        assert response.status_code == 200, response.text
        tokens.append(response.json()["inventory"]["uuid"])
    assert all(len(token) == 32 and not token.strip("0123456789abcdef") for token in tokens)
    with db.session(api.url) as session:
        stored = set(session.scalars(select(LoginSession.uuid).where(LoginSession.accountUuid == account)))
    assert stored == {session_hash(token) for token in tokens} and not stored & set(tokens)
    for token in tokens:
        api.ok("GET", "/projects", token)
    # a stored hash is no session: a copy of the catalog opens nothing
    status, _ = api.call("GET", "/projects", next(iter(stored)))
    assert status == 401
    response = api.client.delete(f"/v1/accounts/sessions/{next(iter(stored))}")
    assert response.status_code == 200  # no such session: logged out all the same, as in ZStack...
    api.ok("GET", "/projects", tokens[0])  # ...and the hash ended nothing
    # logging out takes the token the login answered
    assert api.client.delete(f"/v1/accounts/sessions/{tokens[0]}").status_code == 200
    assert api.call("GET", "/projects", tokens[0])[0] == 401
    assert api.client.delete(f"/v1/accounts/sessions/{tokens[0]}").status_code == 200
    api.ok("GET", "/projects", tokens[1])
    # a new password ends every session of the account (the old password opens none either)
    response = api.client.put(
        f"/v1/accounts/{account}/actions",
        json={"updateAccount": {"password": "second"}},
        headers={"Authorization": f"Bearer {api.admin_key}"},
    )
    assert response.status_code == 200, response.text
    assert api.call("GET", "/projects", tokens[1])[0] == 401
    assert log_in(api, "grace", "first").status_code == 401
    fresh = log_in(api, "grace", "second").json()["inventory"]["uuid"]
    api.ok("GET", "/projects", fresh)
    # a name change leaves the sessions alone
    response = api.client.put(
        f"/v1/accounts/{account}/actions",
        json={"updateAccount": {"name": "grace2"}},
        headers={"Authorization": f"Bearer {api.admin_key}"},
    )
    assert response.status_code == 200
    api.ok("GET", "/projects", fresh)


def test_sessions_stored_in_the_clear_by_an_earlier_version_open_nothing(api: Api) -> None:
    account = api.ok("POST", "/accounts", name="heidi", password="pw")["inventory"]["uuid"]
    old = secrets.token_hex(16)
    with db.session(api.url) as session:
        session.add(LoginSession(uuid=old, accountUuid=account, expiredDate=datetime.now(UTC) + timedelta(hours=1)))
    status, body = api.call("GET", "/projects", old)
    assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"


def test_bad_login_input(api: Api) -> None:
    for body in (
        {"logInByAccount": {"accountName": "x", "password": "not-hex"}},
        {"logInByAccount": {"accountName": "", "password": "0" * 128}},
        {"logInByAccount": {"password": "0" * 128}},
        {"logInByAccount": {"accountName": 5, "password": "0" * 128}},
        {"somethingElse": {}},
    ):
        response = api.client.put(LOGIN, json=body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_ARGUMENT", body
    for bad in ("nonsense", "0" * 31, "Z" * 32):  # not a uuid: bad input
        response = api.client.delete(f"/v1/accounts/sessions/{bad}")
        assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_ARGUMENT", bad
        assert api.client.get(f"/zstack/v1/accounts/sessions/{bad}/valid").json() == {"valid": False, "success": True}
    unknown = api.client.delete(f"/v1/accounts/sessions/{secrets.token_hex(16)}")  # a uuid, no such session
    assert unknown.status_code == 200 and unknown.json() == {"success": True}  # logged out all the same, as ZStack


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


def test_sessions_are_validated_and_renewed_as_zstack_does(api: Api) -> None:
    """ZStack's ValidateSession (``GET .../sessions/{uuid}/valid``, no credentials, read by the Go
    SDK as a map of booleans) and RenewSession (``PUT .../sessions/{uuid}/renew``)."""
    api.ok("POST", "/accounts", name="ivan", password="pw")
    api.ok("POST", "/accounts", name="judy", password="pw")
    token = log_in(api, "ivan", "pw").json()["inventory"]["uuid"]
    other = log_in(api, "judy", "pw").json()["inventory"]["uuid"]
    valid = f"/zstack/v1/accounts/sessions/{token}/valid"
    response = api.client.get(valid)
    assert response.status_code == 200 and response.json() == {"valid": True, "success": True}
    assert all(isinstance(value, bool) for value in response.json().values())  # the SDK's map[string]bool
    assert api.client.get(f"/v1/accounts/sessions/{secrets.token_hex(16)}/valid").json() == {
        "valid": False,
        "success": True,
    }

    renew = f"/v1/accounts/sessions/{token}/renew"
    oauth = {"Authorization": f"OAuth {token}"}
    response = api.client.put(renew, json={"renewSession": {"duration": 86400}}, headers=oauth)
    assert response.status_code == 200, response.text
    renewed = response.json()["inventory"]
    assert renewed["uuid"] == token
    # on the catalog's clock, as the route's: this host's is a measured offset (a few ms off under load) away
    left = datetime.fromisoformat(renewed["expiredDate"].replace("Z", "+00:00")) - now()
    assert timedelta(hours=23) < left <= timedelta(hours=24)
    with db.session(api.url) as session:
        assert session.get(LoginSession, session_hash(token)).expiredDate > datetime.now(UTC) + timedelta(hours=23)
    # as ZStack's SDK calls it (its dates as ZStack writes them)
    response = api.client.put(f"/zstack/v1{renew[3:]}", json={"renewSession": {"duration": 86400}}, headers=oauth)
    assert response.status_code == 200 and response.json()["inventory"]["uuid"] == token, response.text
    # an empty body (the path names the action) renews for the session timeout; /actions too
    response = api.client.put(f"/v1/accounts/sessions/{token}/actions", json={}, headers=oauth)
    assert response.status_code == 200, response.text
    # another account's session is not the caller's to renew (an admin's is)
    response = api.client.put(f"/v1/accounts/sessions/{other}/renew", json={}, headers=oauth)
    assert response.status_code == 404
    response = api.client.put(
        f"/v1/accounts/sessions/{other}/renew", json={}, headers={"Authorization": f"Bearer {api.admin_key}"}
    )
    assert response.status_code == 200
    for duration in (59, 365 * 24 * 3600 + 1, "600", True):
        response = api.client.put(renew, json={"renewSession": {"duration": duration}}, headers=oauth)
        assert response.status_code == 400 and response.json()["error"]["code"] == "INVALID_ARGUMENT", duration
    assert api.client.put(renew, json={"renewSession": {}}).status_code == 401  # credentials needed

    # an expired session: not valid, not renewable, and it opens nothing
    with db.session(api.url) as session:
        session.get(LoginSession, session_hash(token)).expiredDate = datetime.now(UTC) - timedelta(seconds=1)
    assert api.client.get(valid).json() == {"valid": False, "success": True}
    response = api.client.put(renew, json={}, headers={"Authorization": f"Bearer {api.admin_key}"})
    assert response.status_code == 404
    # logging out ends it: no longer valid
    assert api.client.get(f"/v1/accounts/sessions/{other}/valid").json() == {"valid": True, "success": True}
    assert api.client.delete(f"/zstack/v1/accounts/sessions/{other}?deleteMode=Permissive").status_code == 200
    assert api.client.get(f"/v1/accounts/sessions/{other}/valid").json() == {"valid": False, "success": True}
