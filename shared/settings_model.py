"""The pydantic-settings model behind :func:`shared.config.get_settings`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .envnames import ENV_FILE, ENV_PREFIX


class Settings(BaseSettings):
    """Every blockvault process's settings; see API.md "Processes, settings, ports".

    With none set everything is embedded under ``data_dir``: a SQLite catalog, Celery's
    filesystem broker and an ImageStore folder.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=ENV_FILE, extra="ignore")

    data_dir: Path = Field(default=Path(".blockvault"))
    database_url: str | None = None
    broker_url: str | None = None
    admin_api_key: SecretStr | None = None
    secret_key: SecretStr | None = None  # the server secret (shared.secret); default: <data dir>/secret.key
    auth_max_failures: int = Field(default=10, ge=1)  # bad keys from one client IP (logins: IP and account)...
    auth_failure_window_seconds: float = Field(default=60.0, gt=0)  # ...per window before bad ones get 429s
    session_timeout_seconds: int = Field(default=7200, ge=1)  # a LogInByAccount session's life
    max_body_bytes: int = Field(default=1024 * 1024, ge=1)  # larger request bodies get 413
    host_uuid: str | None = None
    # the folders a worker may open volumes in, ``:``-separated (default <data dir>/volumes),
    # and the folder of its VMs' QEMU monitor and guest agent sockets (shared.hostpaths)
    volume_roots: str | None = None
    vm_socket_dir: Path | None = None
    api_url: str = "http://127.0.0.1:8080"
    api_key: SecretStr | None = None
    passphrase: SecretStr | None = None
    lock_wait_seconds: float = Field(default=60.0, ge=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    host_timeout_seconds: float = Field(default=45.0, gt=0)
    requeue_seconds: float = Field(default=60.0, gt=0)
    storage_check_seconds: float = Field(default=30.0, gt=0)
    storage_retry_seconds: float = Field(default=120.0, ge=0)
    reclaim_interval_seconds: float = Field(
        default=3600.0, gt=0
    )  # retention's space: one gc a storage at most this often
    environment: str = "development"
    metrics_public: bool = False  # GET /metrics without an API key (for a scraper on a trusted network)
    log_format: Literal["text", "json"] = "text"  # the worker's log lines
    # file-level restore (docs/file-restore.md): each listing or read runs in a sandboxed child
    files_timeout_seconds: float = Field(default=30.0, gt=0)  # a listing, stat or a read's silence
    files_memory_mb: int = Field(default=1024, ge=128)  # the child's address space
    files_max_entries: int = Field(default=1_000_000, ge=1)  # a directory with more is refused
    export_cache_mb: int = Field(default=64, ge=0)  # an NBD export's chunk cache
    # instant recovery (docs/instant-recovery.md)
    instant_attach_timeout_seconds: float = Field(default=600.0, ge=0)  # wait for the VM to open its overlay

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
