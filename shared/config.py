"""Settings: the one place that reads the environment (``BLOCKVAULT_*``, or a ``.env`` file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every blockvault process's settings; see API.md "Processes, settings, ports"."""

    model_config = SettingsConfigDict(env_prefix="BLOCKVAULT_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path(".blockvault"))
    passphrase: SecretStr | None = None
    lock_wait_seconds: float = Field(default=60.0, ge=0)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
