"""Storage backends: where a repository's objects live.

An object is a ``key`` (a ``/``-separated relative name such as ``chunks/ab/ab12...``) and
its bytes. Every backend implements the small interface of :class:`~.base.Backend`;
:func:`open_backend` picks one from a URL and wraps it in the retry policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from shared.errors import UsageError

from .base import Backend, ObjectInfo
from .file import FileBackend
from .retry import RetryingBackend

__all__ = ["Backend", "FileBackend", "ObjectInfo", "RetryingBackend", "open_backend"]


def open_backend(
    location: str, options: Mapping[str, str | None] | None = None, *, retry_seconds: float | None = 120.0
) -> Backend:
    """The backend for ``location``: a path, ``file://``, ``http(s)://`` or ``s3://`` URL.

    ``options`` carries what a URL cannot: for ``http(s)`` a ``token`` and a ``cafile``; for
    ``s3`` an ``endpoint``, ``region``, ``accessKey`` and ``secretKey``. What is not given is
    taken from the environment (``BLOCKVAULT_STORAGE_TOKEN``, ``AWS_*``), as the repository
    CLI does. Transient failures are retried for up to ``retry_seconds`` (None: not at all,
    for health checks that must answer at once).
    """

    def wrap(inner: Backend) -> Backend:
        return inner if retry_seconds is None else RetryingBackend(inner, max_seconds=retry_seconds)

    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else location
        if not path:
            raise UsageError(detail=f"repository location {location!r} names no folder")
        return wrap(FileBackend(Path(path)))
    if parsed.scheme in ("http", "https"):
        from .http import HttpBackend

        return wrap(HttpBackend.from_url(location, options or {}))
    if parsed.scheme == "s3":
        from .s3 import S3Backend

        return wrap(S3Backend.from_url(location, options or {}))
    raise UsageError(detail=f"unknown repository scheme {parsed.scheme!r} in {location!r}")
