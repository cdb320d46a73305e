"""The API app in process (FastAPI's TestClient) with the settings a test gives."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from shared.catalog import db
from shared.config import get_settings


@contextlib.contextmanager
def app_client(monkeypatch: pytest.MonkeyPatch, settings: dict[str, str]) -> Iterator[TestClient]:
    """The app started (its lifespan run) with exactly ``settings`` (``NAME`` for
    ``BLOCKVAULT_NAME``) in the environment, on the catalog ``DATABASE_URL`` names."""
    for name in list(os.environ):
        if name.startswith("BLOCKVAULT_"):
            monkeypatch.delenv(name)
    for name, value in settings.items():
        monkeypatch.setenv("BLOCKVAULT_" + name, value)
    get_settings.cache_clear()
    db.reset()  # the default session factory follows the settings of this test
    try:
        with TestClient(create_app()) as client:
            yield client
    finally:
        db.engine(get_settings().catalog_url).dispose()
        db.reset()
        get_settings.cache_clear()
