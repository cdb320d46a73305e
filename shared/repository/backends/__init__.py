"""Storage backends: where a repository's objects live.

An object is a ``key`` (a ``/``-separated relative name such as ``chunks/ab/ab12...``) and
its bytes. Every backend implements the small interface of :class:`~.base.Backend` and
declares its storage type in the registry (:mod:`.registry`); :func:`open_backend` picks one
from a URL by the registry and wraps it in the retry policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlparse

from shared.errors import UsageError

from . import registry
from .base import Backend, ObjectInfo
from .file import FileBackend
from .retry import RetryingBackend

__all__ = ["Backend", "FileBackend", "ObjectInfo", "RetryingBackend", "open_backend", "registry"]


def open_backend(
    location: str, options: Mapping[str, str | None] | None = None, *, retry_seconds: float | None = 120.0
) -> Backend:
    """The backend for ``location``: a path or a URL of a registered scheme (``file://``,
    ``http(s)://``, ``s3://``).

    ``options`` carries what a URL cannot, named as the backend's registry fields say (for
    ``http(s)`` a ``token`` and a ``cafile``; for ``s3`` an ``endpoint``, ``region``,
    ``accessKey`` and ``secretKey``), and is all the backend gets. With none (None), they are
    the settings' (:func:`shared.config.setting`: ``BLOCKVAULT_STORAGE_TOKEN``, ...), as the
    repository CLI and a location string given to ``Repository.open`` want. Transient failures
    are retried for up to ``retry_seconds`` (None: not at all, for health checks that must
    answer at once). UsageError for a scheme no backend registered.
    """
    entry = registry.for_location(location)
    if entry is None:
        raise UsageError(detail=f"unknown repository scheme {urlparse(location).scheme!r} in {location!r}")
    if options is None:
        from shared.config import setting

        options = entry.options({}, setting)
    inner = entry.open(location, options)
    return inner if retry_seconds is None else RetryingBackend(inner, max_seconds=retry_seconds)
