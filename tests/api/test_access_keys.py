"""ZStack access keys through the REST API (the app in process, a real PostgreSQL catalog):
requests signed exactly as ZStack's official Go SDK signs them act as the key's account; bad
signatures, stale dates, unknown, disabled and deleted keys are 401 and count towards the
limit on failed authentications, while valid signatures are never limited."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from shared.catalog import db
from shared.catalog.models import AccessKey
from tests.api.conftest import admin_settings, app_client

MAX_FAILURES = 4
SKEW = 300
BASE = "http://testserver"


def go_date(moment: datetime) -> str:
    """Go's ``t.Format("Mon, 02 Jan 2006 15:04:05 MST")`` (the SDK's ``formatDateForZStack``):
    English day and month names, the zone's abbreviation, or ``+08``-style where Go's zone
    data has no abbreviation."""
    days = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    name = moment.tzname() or "UTC"
    return (
        f"{days[moment.weekday()]}, {moment.day:02d} {months[moment.month - 1]} {moment.year} "
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} {name}"
    )


def sdk_headers(
    key_id: str, secret: str, method: str, url: str, *, moment: datetime | None = None, context_path: str = "zstack"
) -> dict[str, str]:
    """The headers ZStack's Go SDK sends with an access key, re-implemented from its source:
    ``getAccessKeyHeader`` in ``pkg/client/http_client.go`` of ``zstackio/zstack-sdk-go-v2``.
    The URI signed is what follows ``/<contextPath>`` in the URL, cut at ``?``; the string
    signed is ``method + "\\n" + date + "\\n" + uri``, HMAC-SHA1 under the secret, base64."""
    date = go_date(moment or datetime.now(UTC))
    context = f"/{context_path}"
    uri = url[url.index(context) + len(context) :]
    if "?" in url:
        uri = uri[: uri.index("?")]
    mac = hmac.new(secret.encode(), f"{method}\n{date}\n{uri}".encode(), hashlib.sha1)
    signature = base64.b64encode(mac.digest()).decode()
    return {"Authorization": f"ZStack {key_id}:{signature}", "Date": date}


class Api:
    def __init__(self, client: TestClient, admin_key: str, url: str, tmp: Path) -> None:
        self.client, self.admin_key, self.url, self.tmp = client, admin_key, url, tmp

    def admin(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        response = self.client.request(method, path, headers={"Authorization": f"Bearer {self.admin_key}"}, json=body)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def signed(
        self, key: dict[str, Any], method: str, path: str, body: Any = None, **options: Any
    ) -> tuple[int, dict[str, Any]]:
        headers = sdk_headers(key["AccessKeyID"], key["AccessKeySecret"], method, BASE + path, **options)
        response = self.client.request(method, path, headers=headers, json=body)
        return response.status_code, response.json()

    def account(self, name: str, *, admin: bool = False) -> str:
        params = {"name": name, "type": "SystemAdmin" if admin else "Normal"}
        return str(self.admin("POST", "/v1/accounts", {"params": params})["inventory"]["uuid"])

    def key_for(self, account: str) -> dict[str, Any]:
        """An access key made as the SDK's CreateAccessKey sends it (accountUuid and userUuid)."""
        body = {"params": {"accountUuid": account, "userUuid": account, "description": "sdk"}}
        return dict(self.admin("POST", "/zstack/v1/accesskeys", body)["inventory"])


@pytest.fixture
def api(pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    admin_key, settings = admin_settings(
        pg_database,
        tmp_path,
        AUTH_MAX_FAILURES=str(MAX_FAILURES),
        AUTH_FAILURE_WINDOW_SECONDS="3600",
        ACCESS_KEY_SKEW_SECONDS=str(SKEW),
    )
    with app_client(monkeypatch, settings) as client:
        yield Api(client, admin_key, pg_database, tmp_path)


def test_a_key_signed_as_the_sdk_signs_acts_as_its_account(api: Api) -> None:
    member = api.account("member")
    project = api.admin("POST", "/v1/projects", {"params": {"name": "p"}})["inventory"]["uuid"]
    api.admin("POST", f"/v1/projects/{project}/members", {"params": {"accountUuid": member}})
    key = api.key_for(member)
    assert key["accountUuid"] == member and key["userUuid"] == member and key["state"] == "Enabled"
    assert len(key["AccessKeyID"]) == 20 and len(key["AccessKeySecret"]) == 40
    # the secret is shown once: never in a query, and sealed in the catalog
    listed = api.admin("GET", "/zstack/v1/accesskeys")["inventories"]
    assert [k["AccessKeyID"] for k in listed] == [key["AccessKeyID"]]
    assert all("AccessKeySecret" not in k and "sealedSecret" not in k for k in listed)
    with db.session(api.url) as session:
        stored = session.scalars(select(AccessKey)).one().sealedSecret
        assert key["AccessKeySecret"] not in stored and stored.startswith("v1:")

    # the member's key: its project, its own keys; as the SDK queries (the query string is not signed)
    status, body = api.signed(key, "GET", "/zstack/v1/projects?limit=50&start=0&replyWithCount=true")
    assert status == 200 and [p["uuid"] for p in body["inventories"]] == [project] and body["total"] == 1
    status, body = api.signed(key, "GET", f"/zstack/v1/accesskeys/{key['uuid']}")
    assert status == 200 and body["inventories"][0]["AccessKeyID"] == key["AccessKeyID"]
    # ...with the member's rights only: admin calls are 403
    for method, path, call in (
        ("POST", "/zstack/v1/accounts", {"params": {"name": "mallory"}}),
        ("POST", "/zstack/v1/accesskeys", {"params": {"accountUuid": member, "userUuid": member}}),
        ("PUT", f"/zstack/v1/accesskeys/{key['uuid']}/actions", {"changeAccessKeyState": {"stateEvent": "enable"}}),
    ):
        status, body = api.signed(key, method, path, call)
        assert status == 403 and body["error"]["code"] == "FORBIDDEN", (path, body)
    # another account's key does not exist for it
    other = api.key_for(api.account("other"))
    status, _ = api.signed(key, "GET", f"/zstack/v1/accesskeys/{other['uuid']}")
    assert status == 404
    status, _ = api.signed(key, "DELETE", f"/zstack/v1/accesskeys/{other['uuid']}?deleteMode=Permissive")
    assert status == 404

    # an admin's key does admin things, with a body, signed the same way, on /v1 as on /zstack/v1
    boss = api.key_for(api.account("boss", admin=True))
    status, body = api.signed(boss, "POST", "/zstack/v1/projects", {"params": {"name": "made-by-key"}})
    assert status == 200 and body["inventory"]["name"] == "made-by-key"
    # (on /v1, the path signed is the whole path: what follows the host, here "testserver")
    status, body = api.signed(boss, "GET", "/v1/accesskeys", context_path="testserver")
    assert status == 200 and len(body["inventories"]) == 3


def test_dates_in_the_zones_the_sdk_writes_and_outside_the_window(api: Api) -> None:
    key = api.key_for(api.account("dates"))
    path = "/zstack/v1/accesskeys"
    moment = datetime.now(UTC)
    china = moment.astimezone(timezone(timedelta(hours=8), "CST"))  # ZStack's management nodes
    plus = moment.astimezone(timezone(timedelta(hours=5, minutes=30), "+0530"))  # Go's numeric names
    for when in (moment, china, plus, moment - timedelta(seconds=SKEW - 30), moment + timedelta(seconds=SKEW - 30)):
        status, body = api.signed(key, "GET", path, moment=when)
        assert status == 200, (go_date(when), body)
    for when in (moment - timedelta(seconds=SKEW + 60), moment + timedelta(seconds=SKEW + 60)):
        status, body = api.signed(key, "GET", path, moment=when)
        assert status == 401 and "Date" in body["error"]["description"], body
    unknown_zone = moment.astimezone(timezone(timedelta(hours=3), "XYZT"))
    status, body = api.signed(key, "GET", path, moment=unknown_zone)
    assert status == 401 and "known zone" in body["error"]["description"]


def test_bad_signatures_unknown_and_revoked_keys_are_401_and_count_as_failures(api: Api) -> None:
    member = api.account("revoked")
    key = api.key_for(member)
    path = "/zstack/v1/accesskeys"
    headers = sdk_headers(key["AccessKeyID"], key["AccessKeySecret"], "GET", BASE + path)

    def attempt(changed: dict[str, str]) -> tuple[int, dict[str, Any]]:
        response = api.client.get(path, headers={**headers, **changed})
        return response.status_code, response.json()

    wrong = sdk_headers(key["AccessKeyID"], "not-the-secret", "GET", BASE + path)["Authorization"]
    for changed, words in (
        ({"Authorization": wrong}, "wrong accessKey signature"),  # the words the SDK looks for
        ({"Date": go_date(datetime.now(UTC) + timedelta(seconds=1))}, "wrong accessKey signature"),
        (sdk_headers("NOSUCHKEY0000000000X", key["AccessKeySecret"], "GET", BASE + path), "access key id"),
        ({"Authorization": f"ZStack {key['AccessKeyID']}"}, "ZStack <AccessKeyID>:<signature>"),
    ):
        status, body = attempt(changed)
        assert status == 401 and words in body["error"]["description"], body
        assert key["AccessKeySecret"] not in str(body)
    # a signature of another method or path does not open this one
    status, _ = api.signed(key, "GET", path)
    assert status == 200
    post = sdk_headers(key["AccessKeyID"], key["AccessKeySecret"], "POST", BASE + path)
    assert api.client.get(path, headers=post).status_code == 429  # the 5th failure from this address...
    # ...while valid signatures behind the same address are still served, as often as they come
    for _ in range(MAX_FAILURES * 2):
        status, _ = api.signed(key, "GET", path)
        assert status == 200


def test_revoked_and_disabled_keys_are_401(api: Api) -> None:
    key = api.key_for(api.account("short-lived"))
    path = "/zstack/v1/accesskeys"
    assert api.signed(key, "GET", path)[0] == 200
    api.admin("PUT", f"/v1/accesskeys/{key['uuid']}/actions", {"changeAccessKeyState": {"stateEvent": "disable"}})
    status, body = api.signed(key, "GET", path)
    assert status == 401 and "access key id" in body["error"]["description"]
    api.admin("PUT", f"/v1/accesskeys/{key['uuid']}/actions", {"changeAccessKeyState": {"stateEvent": "enable"}})
    assert api.signed(key, "GET", path)[0] == 200
    # the key's own account may revoke it; from then on it opens nothing
    status, _ = api.signed(key, "DELETE", f"/zstack/v1/accesskeys/{key['uuid']}?deleteMode=Permissive")
    assert status == 200
    status, body = api.signed(key, "GET", path)
    assert status == 401 and "access key id" in body["error"]["description"]
    with db.session(api.url) as session:
        assert session.scalars(select(AccessKey)).all() == []


def test_bad_create_input(api: Api) -> None:
    account = api.account("input")
    headers = {"Authorization": f"Bearer {api.admin_key}"}
    for params, code in (
        ({}, 400),
        ({"accountUuid": "not-a-uuid"}, 400),
        ({"accountUuid": "0" * 32}, 404),
        ({"accountUuid": account, "userUuid": "1" * 32}, 400),
        ({"accountUuid": account, "AccessKeyID": "short"}, 400),
        ({"accountUuid": account, "AccessKeySecret": "short"}, 400),
        ({"accountUuid": account, "description": 5}, 400),
    ):
        response = api.client.post("/v1/accesskeys", headers=headers, json={"params": params})
        assert response.status_code == code, (params, response.text)
    # a key carried over from ZStack: its id and secret as given
    given = {"accountUuid": account, "AccessKeyID": "ZSTACKKEY0123456789A", "AccessKeySecret": "s" * 40}
    made = api.admin("POST", "/v1/accesskeys", {"params": given})["inventory"]
    assert made["AccessKeyID"] == given["AccessKeyID"] and made["AccessKeySecret"] == given["AccessKeySecret"]
    assert api.signed(made, "GET", "/zstack/v1/accesskeys")[0] == 200
    response = api.client.post("/v1/accesskeys", headers=headers, json={"params": given})
    assert response.status_code == 409
    status = api.client.put(
        f"/v1/accesskeys/{made['uuid']}/actions", headers=headers, json={"changeAccessKeyState": {"stateEvent": "x"}}
    ).status_code
    assert status == 400


def test_the_sdk_polls_a_job_with_the_headers_it_signed_for_the_call_that_started_it(api: Api) -> None:
    """The Go SDK's ``httpWait`` polls ``location`` with the headers of the POST/PUT/DELETE that
    answered 202 (another method and path; a Date that ages while the job runs), and ZStack's
    server asks no credentials there: an Enabled key may poll its own account's jobs so."""
    boss = api.key_for(api.account("poller", admin=True))
    other = api.key_for(api.account("a-member"))
    storage = {"params": {"name": "local", "url": f"file://{api.tmp}/bs"}}
    api.admin("POST", "/v1/backup-storage", storage)
    path = "/zstack/v1/database-backups"
    started = sdk_headers(boss["AccessKeyID"], boss["AccessKeySecret"], "POST", BASE + path)
    response = api.client.post(path, headers=started, json={"params": {}})
    assert response.status_code == 202, response.text  # no worker runs here: the job stays queued
    location = response.json()["location"].removeprefix(BASE)
    assert location.startswith("/zstack/v1/api-jobs/")
    assert api.client.get(location, headers=started).status_code == 202
    stale = sdk_headers(
        boss["AccessKeyID"], boss["AccessKeySecret"], "POST", BASE + path, moment=datetime.now(UTC) - timedelta(hours=2)
    )
    assert api.client.get(location, headers=stale).status_code == 202
    # ...its own account's jobs only (an admin's: all, as ever); an unknown or disabled key is refused
    started_by_other = sdk_headers(other["AccessKeyID"], other["AccessKeySecret"], "POST", BASE + path)
    assert api.client.get(location, headers=started_by_other).status_code == 404
    unknown = sdk_headers("NOSUCHKEY0000000000X", "x" * 40, "POST", BASE + path)
    assert api.client.get(location, headers=unknown).status_code == 401
    api.admin("PUT", f"/v1/accesskeys/{boss['uuid']}/actions", {"changeAccessKeyState": {"stateEvent": "disable"}})
    assert api.client.get(location, headers=started).status_code == 401
    # anywhere else, a signature of another call opens nothing
    api.admin("PUT", f"/v1/accesskeys/{boss['uuid']}/actions", {"changeAccessKeyState": {"stateEvent": "enable"}})
    assert api.client.get("/zstack/v1/accesskeys", headers=started).status_code == 401
