"""Storage backends: where a repository's objects live.

An object is a ``key`` (a ``/``-separated relative name such as ``chunks/ab/ab12...``) and
its bytes. Every backend implements the small interface of :class:`~.base.Backend`;
:func:`open_backend` picks one from a URL and wraps it in the retry policy.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from shared.errors import UsageError

from .base import Backend, ObjectInfo
from .file import FileBackend
from .retry import RetryingBackend

__all__ = ["Backend", "FileBackend", "ObjectInfo", "RetryingBackend", "open_backend"]


def open_backend(location: str) -> Backend:
    """The backend for ``location``: a path, ``file://``, ``http(s)://`` or ``s3://`` URL."""
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else location
        if not path:
            raise UsageError(detail=f"repository location {location!r} names no folder")
        return RetryingBackend(FileBackend(Path(path)))
    if parsed.scheme in ("http", "https", "s3"):
        raise UsageError(detail=f"{parsed.scheme}:// repositories are not supported by this build yet")
    raise UsageError(detail=f"unknown repository scheme {parsed.scheme!r} in {location!r}")
