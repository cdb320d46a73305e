"""The pydantic-settings model behind :func:`shared.config.get_settings`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .config import ENV_FILE, ENV_PREFIX


class Settings(BaseSettings):
    """Every blockvault process's settings; see API.md "Processes, settings, ports"."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=ENV_FILE, extra="ignore")

    data_dir: Path = Field(default=Path(".blockvault"))
    passphrase: SecretStr | None = None
    lock_wait_seconds: float = Field(default=60.0, ge=0)
