"""Settings: the one place that reads the environment (``BLOCKVAULT_*``, or a ``.env`` file).

:class:`~shared.settings_model.Settings` (from :func:`get_settings`) is what every process
reads. :func:`setting` reads one value from the same sources without importing pydantic
(about 150 ms), for the repository CLI, whose every run on a host should start in
milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .envnames import ENV_FILE, ENV_PREFIX, env_names

if TYPE_CHECKING:
    from .settings_model import Settings


@lru_cache(maxsize=1)
def _env_file() -> dict[str, str | None]:
    if not Path(ENV_FILE).is_file():
        return {}
    from dotenv import dotenv_values

    return dict(dotenv_values(ENV_FILE))


def setting(name: str) -> str | None:
    """The raw value of setting ``name`` (``BLOCKVAULT_<NAME>`` or an alias): the environment
    first, then ``.env``; None when neither has one. Reads as the settings model does."""
    names = env_names(name)
    sources: tuple[Mapping[str, str | None], ...] = (os.environ, _env_file())
    for source in sources:
        value = next((source[key] for key in names if source.get(key) is not None), None)
        if value is not None:
            return value
    return None


def float_setting(name: str, default: float) -> float:
    """A non-negative number setting; UsageError naming the variable when it is not one."""
    raw = setting(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        from .errors import UsageError

        raise UsageError(detail=f"{ENV_PREFIX}{name.upper()}={raw!r} is not a non-negative number")
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    from .settings_model import Settings

    return Settings()
