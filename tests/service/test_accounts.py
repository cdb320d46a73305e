"""Abuse limits of the API as it runs (uvicorn, PostgreSQL): a streamed oversized body, and
the 429s after bad keys (good keys served all along); access keys made by the CLI and used by
the client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.client import ApiError, Client
from tests.conftest import ROOT
from tests.service.conftest import Stack

MAX_BODY = 4096


@pytest.fixture
def limited(tmp_path: Path, pg_database: str, redis_url: str) -> Iterator[Stack]:
    deployment = Stack(tmp_path, pg_database, redis_url)
    deployment.env.update(
        BLOCKVAULT_MAX_BODY_BYTES=str(MAX_BODY),
        BLOCKVAULT_AUTH_MAX_FAILURES="2",
        BLOCKVAULT_AUTH_FAILURE_WINDOW_SECONDS="2",
    )
    try:
        deployment.start_api()
        yield deployment
    finally:
        deployment.stop_all()


def test_streamed_body_over_the_limit_is_refused(limited: Stack) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"params": {"name": "'
        for _ in range(100):  # 100 KiB, far past the limit, without a Content-Length
            yield b"z" * 1024
        yield b'"}}'

    url = f"http://127.0.0.1:{limited.port}/v1/projects"
    headers = {"Authorization": f"Bearer {limited.key}", "Content-Type": "application/json"}
    response = httpx.post(url, content=chunks(), headers=headers, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    response = httpx.post(url, json={"params": {"name": "fine"}}, headers=headers, timeout=30)
    assert response.status_code == 200, response.text


def test_bad_keys_get_429_good_keys_are_served_then_recovery(limited: Stack) -> None:
    url = f"http://127.0.0.1:{limited.port}/v1/accounts"
    for _ in range(2):
        assert httpx.get(url, headers={"Authorization": "Bearer bv_wrong"}).status_code == 401
    locked = httpx.get(url, headers={"Authorization": "Bearer bv_wrong"})
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) >= 1
    assert httpx.get(url, headers={"Authorization": f"Bearer {limited.key}"}).status_code == 200
    time.sleep(2.1)
    assert httpx.get(url, headers={"Authorization": "Bearer bv_wrong"}).status_code == 401
    assert "bv_wrong" not in limited.log("api")


def test_access_keys_by_the_cli_and_requests_signed_by_the_client(limited: Stack) -> None:
    """``blockvault accesskey`` makes, lists, disables and deletes keys; ``Client(access_key=...)``
    signs its requests (over a real socket: uvicorn, a real Date header), acting as the key's
    account until the key is disabled or deleted."""
    base = f"http://127.0.0.1:{limited.port}"
    account = limited.client.create("accounts", {"name": "signer"})["uuid"]
    env = {**limited.env, "BLOCKVAULT_API_URL": base, "BLOCKVAULT_API_KEY": limited.key}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "api.cli", "accesskey", *args]
        return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)

    made = cli("create", "--account", account, "--description", "for scripts", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    signed = Client(base, access_key=(key["AccessKeyID"], key["AccessKeySecret"]))
    assert [row["uuid"] for row in signed.query("accounts")["inventories"]] == [account]
    assert [row["AccessKeyID"] for row in signed.access_keys()] == [key["AccessKeyID"]]
    refused = signed.request  # the key is a member's: admin calls are 403
    with pytest.raises(ApiError) as caught:
        refused("POST", "/zstack/v1/accounts", json={"params": {"name": "x"}})
    assert caught.value.status == 403
    listed = cli("list")
    assert (
        listed.returncode == 0 and key["AccessKeyID"] in listed.stdout and key["AccessKeySecret"] not in listed.stdout
    )
    assert cli("disable", key["uuid"]).returncode == 0
    with pytest.raises(ApiError) as caught:
        signed.access_keys()
    assert caught.value.status == 401 and "access key id" in caught.value.description
    assert cli("enable", key["uuid"]).returncode == 0
    assert signed.access_keys()
    assert cli("delete", key["uuid"]).returncode == 0
    with pytest.raises(ApiError) as caught:
        signed.access_keys()
    assert caught.value.status == 401
    gone = cli("delete", key["uuid"])
    assert gone.returncode == 2 and gone.stderr.startswith("blockvault: error: NOT_FOUND")
    bad = cli("create", "--account", "not-a-uuid")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert key["AccessKeySecret"] not in limited.log("api")
