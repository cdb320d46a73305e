"""What ``BLOCKVAULT_ENVIRONMENT=production`` refuses when a process starts.

In development (the default) every process starts on anything: the embedded SQLite catalog and
filesystem broker, no keys, public metrics. In production :func:`unsafe_settings` lists what is
unsafe for the process about to start, one line per refusal that names the setting (or flag)
and says what to do; the CLI prints each and exits 2 before the process does anything
(:mod:`api.cli.processes`). Refused:

- api, worker, beat: the embedded SQLite catalog or filesystem broker (``BLOCKVAULT_DATABASE_URL``,
  ``BLOCKVAULT_BROKER_URL`` unset), no ``BLOCKVAULT_SECRET_KEY`` with a shared catalog (each
  process would keep its own key and not open what the others sealed), a placeholder secret;
- api: an admin API key that is unset, shorter than :data:`MIN_KEY_CHARS` or a placeholder;
  ``BLOCKVAULT_METRICS_PUBLIC=true`` unless ``BLOCKVAULT_BEHIND_TLS_PROXY=true`` says a
  TLS-terminating proxy is in front (the acknowledgement is the operator's: nothing here can
  see the proxy);
- storage-server: a token shorter than :data:`MIN_KEY_CHARS` or a placeholder; plain http
  (no ``--tls-cert``) unless ``BLOCKVAULT_BEHIND_TLS_PROXY=true``;
- every one of them: ``BLOCKVAULT_FAILPOINTS`` set (processes that die on purpose, for tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import SecretStr

from shared.settings_model import Settings

Process = Literal["api", "worker", "beat", "storage-server"]
MIN_KEY_CHARS = 32  # what `openssl rand -hex 16` gives; deploy/ suggests -hex 32 (64)
PLACEHOLDERS = ("change_me", "changeme", "change-me", "replace_me", "replaceme")
CATALOG_PROCESSES = ("api", "worker", "beat")
PLACEHOLDER_ADVICE = "set a random one (openssl rand -hex 32)"


def _placeholder(value: str) -> bool:
    return any(word in value.lower() for word in PLACEHOLDERS)


def _weak(value: str, name: str) -> str | None:
    """Why the secret ``value`` of ``name`` is too weak for production, or None."""
    if _placeholder(value):
        return f"{name} is a placeholder: {PLACEHOLDER_ADVICE}"
    if len(value) < MIN_KEY_CHARS:
        return f"{name} has {len(value)} characters: production needs at least {MIN_KEY_CHARS} (openssl rand -hex 32)"
    return None


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""


def _catalog(settings: Settings) -> list[str]:
    problems = []
    if settings.catalog_url.startswith("sqlite"):
        problems.append(
            "BLOCKVAULT_DATABASE_URL: the embedded SQLite catalog is for development; set the PostgreSQL "
            "catalog's URL (postgresql+psycopg2://user@host/db)"
        )
    elif settings.secret_key is None:
        problems.append(
            "BLOCKVAULT_SECRET_KEY is not set: every process of a shared catalog must hold the same server "
            "secret, or none reads the credentials, keys and sessions another sealed"
        )
    if settings.broker.startswith("filesystem"):
        problems.append(
            "BLOCKVAULT_BROKER_URL: the embedded filesystem broker is for development; set the Redis broker's "
            "URL (redis://host:6379/0)"
        )
    key = _secret(settings.secret_key)
    if key and _placeholder(key):
        problems.append(f"BLOCKVAULT_SECRET_KEY is a placeholder: {PLACEHOLDER_ADVICE}")
    return problems


def _api(settings: Settings) -> list[str]:
    problems = []
    key = _secret(settings.admin_api_key)
    if not key:
        problems.append(f"BLOCKVAULT_ADMIN_API_KEY is not set: production needs one of {MIN_KEY_CHARS}+ characters")
    elif problem := _weak(key, "BLOCKVAULT_ADMIN_API_KEY"):
        problems.append(problem)
    if settings.metrics_public and not settings.behind_tls_proxy:
        problems.append(
            "BLOCKVAULT_METRICS_PUBLIC=true: /metrics without a key needs TLS in front; serve the API behind a "
            "TLS-terminating proxy and set BLOCKVAULT_BEHIND_TLS_PROXY=true, or keep metrics behind an API key"
        )
    return problems


def _storage_server(settings: Settings, tokens: Mapping[str, str | None], tls: bool) -> list[str]:
    problems = [problem for name, value in tokens.items() if value and (problem := _weak(value, name))]
    if not tls and not settings.behind_tls_proxy:
        problems.append(
            "the storage-server would serve plain http, tokens and data in the clear: give --tls-cert and "
            "--tls-key, or set BLOCKVAULT_BEHIND_TLS_PROXY=true when a TLS-terminating proxy is in front"
        )
    return problems


def unsafe_settings(
    settings: Settings, process: Process, *, tokens: Mapping[str, str | None] | None = None, tls: bool = False
) -> list[str]:
    """Every reason ``process`` must not start on ``settings``, one line each naming the setting;
    empty outside production. For the storage-server, ``tokens`` are its tokens by the name to
    show (``--token (BLOCKVAULT_STORAGE_TOKEN)``) and ``tls`` whether it serves https itself."""
    if settings.environment != "production":
        return []
    problems = []
    if process in CATALOG_PROCESSES:
        problems += _catalog(settings)
    if process == "api":
        problems += _api(settings)
    if process == "storage-server":
        problems += _storage_server(settings, tokens or {}, tls)
    if settings.failpoints:
        problems.append("BLOCKVAULT_FAILPOINTS is set: failpoints make processes fail on purpose, for tests only")
    return problems
