"""Abuse limits of the API as it runs (uvicorn, PostgreSQL): a streamed oversized body, and
the 429s after bad keys (good keys served all along)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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
