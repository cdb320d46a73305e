"""Where settings come from: variables named ``BLOCKVAULT_<NAME>`` (or an alias), and a ``.env``
file in the working folder. Read by :mod:`shared.config` (one value, fast) and
:mod:`shared.settings_model` (all of them, typed)."""

from __future__ import annotations

ENV_PREFIX = "BLOCKVAULT_"
ENV_FILE = ".env"
# Settings also read under another name when ``BLOCKVAULT_<NAME>`` is not set: the AWS SDKs'
# own variables, so that an S3 endpoint or region configured for them applies here too.
ALIASES: dict[str, tuple[str, ...]] = {
    "s3_endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "s3_region": ("AWS_DEFAULT_REGION", "AWS_REGION"),
}


def env_names(name: str) -> tuple[str, ...]:
    """The variables setting ``name`` is read from, in order: ``BLOCKVAULT_<NAME>``, then its
    :data:`ALIASES`."""
    return (ENV_PREFIX + name.upper(), *ALIASES.get(name, ()))
