"""The settings model: every setting documented in docs/settings.md, read alike by the model and
by the CLI's fast ``setting()``, secrets as secret types, the storage fields' fallbacks real."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from shared import config
from shared.config import get_settings, setting
from shared.envnames import ALIASES, ENV_PREFIX, env_names
from shared.repository.backends import registry
from shared.settings_model import Settings
from tests.conftest import ROOT, Cli

DOCS = ROOT / "docs" / "settings.md"


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(("BLOCKVAULT_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env but the one a test writes
    config._env_file.cache_clear()  # the fast path keeps the .env it read first
    get_settings.cache_clear()
    yield
    config._env_file.cache_clear()
    get_settings.cache_clear()


def documented() -> dict[str, str]:
    """The rows of the "Every setting" table: variable -> default cell."""
    table = DOCS.read_text().split("## Every setting", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(BLOCKVAULT_[A-Z0-9_]+)` \| ([^|]+) \|", table, re.M))


def test_every_setting_is_documented_with_its_default_and_nothing_else_is() -> None:
    rows = documented()
    assert set(rows) == {env_names(name)[0] for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name} has no description"
        default = field.default
        if default not in (None, "", False) and not isinstance(default, Path):
            shown = rows[env_names(name)[0]]
            assert str(default).removesuffix(".0").lower() in shown.lower(), (name, shown)


def test_secrets_are_secret_types() -> None:
    for name in ("admin_api_key", "secret_key", "api_key", "passphrase"):
        assert Settings.model_fields[name].annotation == SecretStr | None
    for name in ("storage_token", "storage_admin_token", "storage_site_tokens"):
        assert Settings.model_fields[name].annotation == SecretStr | None
    hidden = Settings(_env_file=None, storage_token=SecretStr("tok-value"), admin_api_key=SecretStr("admin-value"))  # type: ignore[call-arg]
    assert "tok-value" not in repr(hidden) and "admin-value" not in repr(hidden)
    assert hidden.text("storage_token") == "tok-value" and hidden.text("storage_cafile") is None


def test_the_model_and_the_fast_path_read_alike(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "BLOCKVAULT_STORAGE_TOKEN=from-the-file\nAWS_ENDPOINT_URL=http://file:1\nAWS_REGION=file-region\n"
    )
    monkeypatch.setenv("AWS_DEFAULT_REGION", "env-region")
    names = ("storage_token", "s3_endpoint", "s3_region")

    def both() -> list[tuple[str | None, str | None]]:
        get_settings.cache_clear()
        return [(setting(name), get_settings().text(name)) for name in names]

    assert both() == [("from-the-file",) * 2, ("http://file:1",) * 2, ("env-region",) * 2]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:2")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://env-s3:3")
    monkeypatch.setenv("BLOCKVAULT_S3_REGION", "ours")
    monkeypatch.setenv("BLOCKVAULT_STORAGE_TOKEN", "from-the-env")
    assert both() == [("from-the-env",) * 2, ("http://env-s3:3",) * 2, ("ours",) * 2]
    monkeypatch.setenv("BLOCKVAULT_S3_ENDPOINT", "http://ours:4")
    assert both()[1] == ("http://ours:4",) * 2
    assert set(ALIASES) <= set(Settings.model_fields) and env_names("s3_region")[0] == ENV_PREFIX + "S3_REGION"


def test_every_storage_field_falls_back_on_a_real_setting() -> None:
    fallbacks = {one.setting for one in registry.fields() if one.setting}
    assert fallbacks == {"storage_token", "storage_cafile", "s3_endpoint", "s3_region"}
    assert fallbacks <= set(Settings.model_fields)


def test_a_setting_that_does_not_parse_stops_a_process_in_one_line_each(cli: Cli) -> None:
    env = {"BLOCKVAULT_ENVIRONMENT": "prod", "BLOCKVAULT_HEARTBEAT_SECONDS": "-1"}
    done = cli.run("beat", env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "blockvault: error: BLOCKVAULT_ENVIRONMENT: Input should be 'development' or 'production'",
        "blockvault: error: BLOCKVAULT_HEARTBEAT_SECONDS: Input should be greater than 0",
    ]
