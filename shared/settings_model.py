"""The pydantic-settings model behind :func:`shared.config.get_settings`.

Every setting of every process is a field here, read from ``BLOCKVAULT_<NAME>`` (or an alias
of :data:`shared.envnames.ALIASES`) or ``.env``; each field's description is its meaning, and
docs/settings.md lists them all. Secrets are ``SecretStr``. With ``environment=production``
a process refuses to start on unsafe ones (:mod:`shared.production`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .envnames import ENV_FILE, ENV_PREFIX, env_names


def _aliased(name: str) -> AliasChoices:
    return AliasChoices(*env_names(name))


class Settings(BaseSettings):
    """Every blockvault process's settings; see docs/settings.md.

    With none set everything is embedded under ``data_dir``: a SQLite catalog, Celery's
    filesystem broker and an ImageStore folder.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=ENV_FILE, extra="ignore", populate_by_name=True)

    environment: Literal["development", "production"] = Field(
        default="development", description="production: refuse to start on unsafe settings"
    )
    data_dir: Path = Field(default=Path(".blockvault"), description="embedded catalog, broker folder, host identity")
    database_url: str | None = Field(default=None, description="the catalog (default: SQLite in the data dir)")
    broker_url: str | None = Field(default=None, description="Celery's broker (default: a folder in the data dir)")
    admin_api_key: SecretStr | None = Field(default=None, description="seeds an admin API key when the API starts")
    secret_key: SecretStr | None = Field(
        default=None, description="the server secret (shared.secret); default: <data dir>/secret.key"
    )
    auth_max_failures: int = Field(
        default=10, ge=1, description="bad keys from one client IP (logins: IP and account) per window before 429s"
    )
    auth_failure_window_seconds: float = Field(default=60.0, gt=0, description="the window of auth_max_failures")
    session_timeout_seconds: int = Field(default=7200, ge=1, description="a LogInByAccount session's life")
    access_key_skew_seconds: int = Field(
        default=900, ge=1, description="an access-key request's Date may be this far from the API's clock"
    )
    max_body_bytes: int = Field(default=1024 * 1024, ge=1, description="larger request bodies get 413")
    host_uuid: str | None = Field(default=None, description="a worker's host identity (default: kept in the data dir)")
    volume_roots: str | None = Field(
        default=None, description="the folders a worker may open volumes in, ':'-separated (shared.hostpaths)"
    )
    vm_socket_dir: Path | None = Field(
        default=None, description="the folder of a worker's VMs' QEMU monitor and guest agent sockets"
    )
    libvirt_uri: str | None = Field(
        default=None,
        description="the libvirt a worker discovers its VMs from (docs/libvirt.md); default qemu:///system when "
        "libvirt-python is installed and libvirtd's socket exists; 'off' for none",
    )
    libvirt_timeout_seconds: float = Field(
        default=10.0, gt=0, description="how long a worker waits for its libvirt to answer a connection"
    )
    api_url: str = Field(default="http://127.0.0.1:8080", description="the API the client and CLI call")
    api_key: SecretStr | None = Field(default=None, description="the API key the client and CLI send")
    passphrase: SecretStr | None = Field(default=None, description="repository CLI: encrypted repositories")
    lock_wait_seconds: float = Field(default=60.0, ge=0, description="how long a backup waits for a running gc")
    heartbeat_seconds: float = Field(default=10.0, gt=0, description="how often a worker heartbeats")
    host_timeout_seconds: float = Field(default=45.0, gt=0, description="a host silent this long is Disconnected")
    requeue_seconds: float = Field(default=60.0, gt=0, description="queued messages older than this are sent again")
    storage_check_seconds: float = Field(default=30.0, gt=0, description="how often workers probe backup storage")
    storage_retry_seconds: float = Field(
        default=120.0, ge=0, description="how long a storage call is retried before a job gives up (or fails over)"
    )
    reclaim_interval_seconds: float = Field(
        default=3600.0, gt=0, description="retention's space: one gc of a storage at most this often"
    )
    metrics_public: bool = Field(
        default=False, description="GET /metrics without an API key (for a scraper on a trusted network)"
    )
    behind_tls_proxy: bool = Field(
        default=False,
        description="the API and storage-server are reached only through a TLS-terminating proxy (production: "
        "what allows public metrics, and a storage-server without --tls-cert)",
    )
    log_format: Literal["text", "json"] = Field(default="text", description="the worker's log lines")
    files_timeout_seconds: float = Field(
        default=30.0, gt=0, description="file-level restore: a listing's answer, or a download's silence, at most"
    )
    files_memory_mb: int = Field(default=1024, ge=128, description="file-level restore: the sandboxed reader's memory")
    files_max_entries: int = Field(
        default=1_000_000, ge=1, description="file-level restore: a directory with more entries is refused"
    )
    export_cache_mb: int = Field(default=64, ge=0, description="an NBD export's chunk cache (files, instant recovery)")
    instant_attach_timeout_seconds: float = Field(
        default=600.0,
        ge=0,
        description="instant recovery: how long to wait for the VM to run from its overlays before "
        "qemu-storage-daemon streams them instead",
    )
    storage_token: SecretStr | None = Field(
        default=None,
        description="the storage-server's --token; the http backend's token when a repository URL is given "
        "without one (repository CLI)",
    )
    storage_admin_token: SecretStr | None = Field(default=None, description="the storage-server's --admin-token")
    storage_site_tokens: SecretStr | None = Field(
        default=None, description="the storage-server's site tokens: name=token,name2=token2"
    )
    storage_cafile: str | None = Field(
        default=None, description="the CA (or certificate) an http backend trusts when its storage names none"
    )
    s3_endpoint: str | None = Field(
        default=None,
        validation_alias=_aliased("s3_endpoint"),
        description="the S3 endpoint when a storage names none (also AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL; "
        "default AWS)",
    )
    s3_region: str | None = Field(
        default=None,
        validation_alias=_aliased("s3_region"),
        description="the S3 region when a storage names none (also AWS_DEFAULT_REGION, AWS_REGION; default us-east-1)",
    )
    failpoints: str = Field(default="", description="tests only: where a process dies, fails or waits on purpose")

    @property
    def data_path(self) -> Path:
        return self.data_dir.absolute()

    @property
    def catalog_url(self) -> str:
        """The catalog's SQLAlchemy URL: ``database_url`` or the embedded SQLite file."""
        return self.database_url or f"sqlite:///{self.data_path / 'catalog.db'}"

    @property
    def broker(self) -> str:
        """The Celery broker URL: ``broker_url`` or the embedded filesystem broker."""
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return self.data_path / "broker"

    def text(self, name: str) -> str | None:
        """Setting ``name`` as the text a backend option takes (a secret revealed, a path as a
        string), or None when it is not set; AttributeError for no such setting."""
        value = getattr(self, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return None if value is None or value == "" else str(value)
