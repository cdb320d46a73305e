#!/usr/bin/env python3
"""What an access-key signature costs per request, against an API key: the app in process on
a fresh PostgreSQL database, ``GET /zstack/v1/accesskeys`` signed as the Go SDK signs it
(HMAC-SHA1 of method, Date and path; the server unseals the key's secret and checks it) and
with ``Bearer <api key>``, alternately.

Run as::

    PYTHONPATH=. .venv/bin/python tests/bench/access_key_auth.py [--calls 300]
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.api.conftest import admin_settings, app_client
from tests.api.test_access_keys import BASE, sdk_headers

SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"
PATH = "/zstack/v1/accesskeys"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    calls = parser.parse_args().calls
    name = f"bv_bench_{secrets.token_hex(4)}"
    admin = create_engine(f"{SERVER}/postgres", poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    monkeypatch = pytest.MonkeyPatch()
    try:
        key, settings = admin_settings(f"{SERVER}/{name}", Path(tempfile.mkdtemp()))
        with app_client(monkeypatch, settings) as client:
            bearer = {"Authorization": f"Bearer {key}"}
            body = {"params": {"name": "bench", "type": "SystemAdmin"}}
            account = client.post("/v1/accounts", headers=bearer, json=body).json()["inventory"]["uuid"]
            made = client.post("/v1/accesskeys", headers=bearer, json={"params": {"accountUuid": account}})
            access = made.json()["inventory"]

            def signed() -> dict[str, str]:
                return sdk_headers(access["AccessKeyID"], access["AccessKeySecret"], "GET", BASE + PATH)

            ways: list[tuple[str, Callable[[], dict[str, str]]]] = [("signed", signed), ("bearer", lambda: bearer)]
            for label, headers in ways * 2:
                for _ in range(20):  # warm up
                    assert client.get(PATH, headers=headers()).status_code == 200
                started = time.perf_counter()
                for _ in range(calls):
                    assert client.get(PATH, headers=headers()).status_code == 200
                each = (time.perf_counter() - started) / calls * 1000
                print(f"{label}: {each:.2f} ms per GET {PATH} ({calls} calls)")
    finally:
        monkeypatch.undo()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
