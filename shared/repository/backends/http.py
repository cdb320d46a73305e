"""The ``http`` backend: a repository on a ``blockvault storage-server`` (another data center).

``http(s)://host:port[/name]``: the server stores the objects of repository ``name`` under
``ROOT/name`` (the bare URL is ``ROOT`` itself). One thread-safe :class:`httpx.Client` per
backend keeps a pool of keep-alive connections for the engine's parallel threads.

The wire protocol (borgstore ``backends/rest.py`` and ``server/rest.py`` share theirs the same
way) is defined here once: the routes (:data:`ROUTES`), which keys are valid
(:func:`invalid_key`) and the status table (:class:`Status`) that the server
(:mod:`api.storage_server`) answers with and this client translates back into
:mod:`shared.errors`. The token is sent as ``Authorization: Bearer``; it appears in no message
and no log.
"""

from __future__ import annotations

import functools
import json
import os
import ssl
from collections.abc import Iterable, Iterator, Mapping
from enum import IntEnum
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from shared.errors import (
    BackendAuthFailed,
    BackendError,
    BackendForbidden,
    BackendUnavailable,
    ObjectNotFound,
    StorageFull,
    UsageError,
)

from .base import Backend, Buffer, ObjectInfo
from .registry import BackendType, Field, register

API = "v1"
# Routes below ``[/<repository>]/v1/``; every one but ``health`` needs the token.
ROUTES = {
    "objects/{key}": "GET (Range: bytes=a-b | bytes=a-) / HEAD / PUT ?overwrite=0|1 / DELETE one object",
    "list?prefix=P": "GET: newline-delimited JSON {key, size, mtime} per object, then {end, count}",
    "missing": 'POST {"keys": [...]} -> {"missing": [...]}: which of these the server lacks',
    "create": "POST: make the repository's folder (ROOT/<name>); every other route needs it to exist",
    "flush": "POST: make every object stored so far durable (folder fsync)",
    "capacity": "GET -> {total, available} bytes of the server's disk",
    "stats": "GET -> counters {requests, bytesReceived, bytesSent, objectsWritten}",
    "health": "GET, no token: {status: ok}",
}
MISSING_BATCH = 1000  # keys per ``missing`` request; the server accepts up to MISSING_LIMIT
MISSING_LIMIT = 10_000
MAX_KEY_LENGTH = 1024


class Status(IntEnum):
    """The statuses of the protocol; :data:`STATUS_TABLE` says what each means and which
    error the client raises for it. The server answers with :meth:`for_error`; the client
    raises :meth:`error_for`."""

    OK = 200
    CREATED = 201
    NO_CONTENT = 204
    PARTIAL = 206
    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    GONE = 410
    TOO_LARGE = 413
    RANGE_PAST_END = 416
    TOO_MANY_REQUESTS = 429
    SERVER_ERROR = 500
    UNAVAILABLE = 503
    INSUFFICIENT_STORAGE = 507

    @property
    def meaning(self) -> str:
        return STATUS_TABLE[self][0]

    @property
    def error(self) -> type[BackendError] | None:
        """What the client raises (None: a success, or handled by the call)."""
        return STATUS_TABLE[self][1]

    @classmethod
    def for_error(cls, exc: BackendError) -> Status:
        """The status the server answers a storage error with."""
        if isinstance(exc, ObjectNotFound):
            return cls.NOT_FOUND
        if isinstance(exc, StorageFull):
            return cls.INSUFFICIENT_STORAGE
        if isinstance(exc, BackendUnavailable):
            return cls.UNAVAILABLE
        if isinstance(exc, BackendForbidden):
            return cls.FORBIDDEN
        if isinstance(exc, BackendAuthFailed):
            return cls.UNAUTHORIZED
        return cls.SERVER_ERROR

    @classmethod
    def error_for(cls, code: int) -> type[BackendError]:
        """The error class the client raises for a status that is not a success."""
        try:
            error = cls(code).error
        except ValueError:  # a status the table does not name: 502/504 from a proxy, 405 ...
            return BackendUnavailable if code >= 500 else BackendError
        return error or BackendError


# The status table, the one both sides follow: status -> (meaning, the client's error).
STATUS_TABLE: dict[Status, tuple[str, type[BackendError] | None]] = {
    Status.OK: ("the object, listing or answer", None),
    Status.CREATED: ("put stored a new object; create made the repository's folder", None),
    Status.NO_CONTENT: (
        "done: delete, flush, create of a folder that exists, put ?overwrite=0 of an existing object",
        None,
    ),
    Status.PARTIAL: ("a ranged get (Content-Range says which bytes)", None),
    Status.BAD_REQUEST: ("invalid key, range, repository name or body", BackendError),
    Status.UNAUTHORIZED: ("no token, or the server rejected it", BackendAuthFailed),
    Status.FORBIDDEN: ("not allowed for this token (append-only: no overwrite, no delete)", BackendForbidden),
    Status.NOT_FOUND: ("no such object", ObjectNotFound),
    Status.GONE: ("the repository's folder does not exist: never created, or its disk vanished", BackendError),
    Status.TOO_LARGE: ("body over the server's object size limit", BackendError),
    Status.RANGE_PAST_END: ("range starts at or past the end: the client reads b''", None),
    Status.TOO_MANY_REQUESTS: (
        "a wrong or missing token from an address that sent too many: Retry-After says for how long",
        BackendAuthFailed,
    ),
    Status.SERVER_ERROR: ("the server's disk failed (I/O error): retried", BackendUnavailable),
    Status.UNAVAILABLE: ("the server is starting, stopping or overloaded: retried", BackendUnavailable),
    Status.INSUFFICIENT_STORAGE: ("the server's disk is full or over its quota: not retried", StorageFull),
}


def invalid_key(key: str) -> str | None:
    """Why ``key`` is no valid object key (a relative ``/``-separated name without empty,
    ``.`` or ``..`` parts), or None when it is one. Client and server check alike."""
    if not key:
        return "empty key"
    if len(key) > MAX_KEY_LENGTH:
        return "key too long"
    if key.startswith("/"):
        return "absolute key"
    if "\x00" in key:
        return "NUL in key"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "empty, . or .. part in key"
    return None


def _file_stamp(path: str | None) -> tuple[int, int] | None:
    """What tells a changed CA file from the one read before (its mtime and size)."""
    if not path:
        return None
    info = os.stat(path)
    return info.st_mtime_ns, info.st_size


@functools.lru_cache(maxsize=16)
def tls_context(cafile: str | None, _stamp: tuple[int, int] | None) -> ssl.SSLContext:
    """The client TLS context trusting ``cafile`` (else the system's CAs), made once per process
    and CA file version: making one loads and parses the whole CA bundle (30-60 ms of CPU), and
    a backend is opened for every job and every health probe of every storage. A context is
    only read once made, so the backends' clients share it."""
    return ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()


class HttpBackend(Backend):
    """Objects on a storage server, over one pooled, thread-safe HTTP/1.1 client."""

    foreign_writers = True  # other sites' and hosts' tokens add objects there too

    def __init__(
        self,
        url: str,
        token: str,
        *,
        cafile: str | None = None,
        connections: int = 16,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(detail=f"{url!r} is not an http(s)://host:port[/name] URL")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise UsageError(detail="an http storage URL carries no credentials or query: give the token as an option")
        prefix = parts.path.rstrip("/")
        if prefix and (invalid_key(prefix[1:]) or API in prefix[1:].split("/")):
            raise UsageError(detail=f"invalid repository path {prefix!r} in the storage URL")
        self.location = urlunsplit((parts.scheme, parts.netloc, prefix, "", ""))
        self._base = f"{parts.scheme}://{parts.netloc}{prefix}/{API}/"
        try:
            verify = tls_context(cafile, _file_stamp(cafile))
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(detail=f"cannot use cafile {cafile}: {exc}") from None
        self._client = httpx.Client(
            headers={"authorization": f"Bearer {token}"},
            verify=verify,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(
                max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=60.0
            ),
        )

    @classmethod
    def from_url(cls, location: str, options: Mapping[str, str | None]) -> HttpBackend:
        """The backend for ``location`` with the ``token`` and ``cafile`` of ``options`` (the
        process's settings, ``BLOCKVAULT_STORAGE_TOKEN`` / ``BLOCKVAULT_STORAGE_CAFILE``, are
        given there by the caller: this reads no environment). UsageError without a token."""
        token = options.get("token")
        if not token:
            raise UsageError(detail=f"{location}: no token: set the token option or BLOCKVAULT_STORAGE_TOKEN")
        return cls(location, token, cafile=options.get("cafile") or None)

    # -- the wire ---------------------------------------------------------------------------
    def _url(self, key: str) -> str:
        reason = invalid_key(key)
        if reason:
            raise BackendError(location=self.location, detail=f"{reason}: {key!r}")
        return f"{self._base}objects/{quote(key, safe='/')}"

    def _transport_error(self, exc: httpx.HTTPError, what: str) -> BackendError:
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(cause):
                reason = getattr(cause, "verify_message", None) or "certificate verify failed"
                return BackendError(
                    location=self.location,
                    detail=f"TLS: the server's certificate is not trusted ({reason}); give its certificate or CA "
                    "as the cafile option (BLOCKVAULT_STORAGE_CAFILE)",
                )
            cause = cause.__cause__ or cause.__context__
        detail = f"{what}: {type(exc).__name__}: {exc}".rstrip(": ")
        if isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError):
            return BackendUnavailable(location=self.location, detail=detail)
        return BackendError(location=self.location, detail=detail)

    def _status_error(self, response: httpx.Response, what: str, key: str | None = None) -> BackendError:
        code = response.status_code
        error = Status.error_for(code)
        if error is ObjectNotFound or (code == Status.GONE and what.startswith(("get ", "stat "))):
            # a read in a repository folder that does not exist finds no object (Repository.open
            # then says there is no repository); a write there is the BackendError below
            return ObjectNotFound(location=self.location, key=key or what)
        if error is BackendAuthFailed:
            throttled = response.headers.get("retry-after") if code == Status.TOO_MANY_REQUESTS else None
            return BackendAuthFailed(
                location=self.location,
                detail="the token was rejected (check the token option or BLOCKVAULT_STORAGE_TOKEN)"
                + (f"; after too many, this address is refused for {throttled} s" if throttled else ""),
            )
        detail = ""
        try:
            detail = str(response.json().get("detail", ""))
        except (ValueError, AttributeError, httpx.ResponseNotRead):
            detail = response.reason_phrase
        return error(location=self.location, detail=f"{what}: HTTP {code} {detail}".rstrip())

    def _send(self, method: str, url: str, what: str, key: str | None = None, **kwargs: object) -> httpx.Response:
        try:
            response = self._client.request(method, url, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what) from None
        if response.status_code >= 300 and response.status_code != Status.RANGE_PAST_END:
            raise self._status_error(response, what, key)
        return response

    # -- the interface ----------------------------------------------------------------------
    def put(self, key: str, data: Buffer, *, overwrite: bool = True) -> None:
        body = data if isinstance(data, bytes) else bytes(data)
        self._send(
            "PUT", self._url(key), f"put {key}", key, params={"overwrite": "1" if overwrite else "0"}, content=body
        )

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        url = self._url(key)
        if length == 0:
            self.stat(key)
            return b""
        headers = {}
        if offset or length is not None:
            headers["range"] = f"bytes={offset}-{'' if length is None else offset + length - 1}"
        response = self._send("GET", url, f"get {key}", key, headers=headers)
        if response.status_code == Status.RANGE_PAST_END:
            return b""
        return response.content

    def stat(self, key: str) -> ObjectInfo:
        response = self._send("HEAD", self._url(key), f"stat {key}", key)
        try:
            return ObjectInfo(
                key=key, size=int(response.headers["x-object-size"]), mtime=float(response.headers["x-object-mtime"])
            )
        except (KeyError, ValueError):
            raise BackendError(location=self.location, detail=f"stat {key}: no size in the answer") from None

    def delete(self, key: str) -> None:
        self._send("DELETE", self._url(key), f"delete {key}", key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        what = f"list {prefix}"
        ended = False
        try:
            with self._client.stream("GET", f"{self._base}list", params={"prefix": prefix}) as response:
                if response.status_code >= 300:
                    response.read()
                    raise self._status_error(response, what)
                for line in response.iter_lines():
                    if not line:
                        continue
                    row = json.loads(line)
                    if "key" in row:
                        yield ObjectInfo(key=row["key"], size=row["size"], mtime=row["mtime"])
                    elif row.get("end"):
                        ended = True
                    else:
                        raise BackendUnavailable(location=self.location, detail=f"{what}: {row.get('detail', row)}")
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, what) from None
        except ValueError:
            raise BackendError(location=self.location, detail=f"{what}: the answer is not JSON lines") from None
        if not ended:
            raise BackendUnavailable(location=self.location, detail=f"{what}: the listing was cut off")

    def missing(self, keys: Iterable[str]) -> set[str]:
        wanted = list(keys)
        for key in wanted:
            self._url(key)  # validates
        absent: set[str] = set()
        for start in range(0, len(wanted), MISSING_BATCH):
            batch = wanted[start : start + MISSING_BATCH]
            response = self._send("POST", f"{self._base}missing", "missing", json={"keys": batch})
            absent.update(response.json()["missing"])
        return absent

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def create(self) -> None:
        self._send("POST", f"{self._base}create", "create")

    def flush(self) -> None:
        self._send("POST", f"{self._base}flush", "flush")

    def capacity(self) -> tuple[int, int] | None:
        answer = self._send("GET", f"{self._base}capacity", "capacity").json()
        return int(answer["total"]), int(answer["available"])

    def close(self) -> None:
        self._client.close()


ENTRY = register(
    BackendType(
        "Remote",
        ("http", "https"),
        HttpBackend.from_url,
        fields=(
            Field(
                "token",
                help="the storage-server's token.",
                secret=True,
                required=True,
                envvar="BLOCKVAULT_STORAGE_TOKEN",
                setting="storage_token",
            ),
            Field(
                "caFile",
                help="CA of its cert.",
                option="cafile",
                envvar="BLOCKVAULT_STORAGE_CAFILE",
                setting="storage_cafile",
            ),
        ),
        url_form="http(s)://host:port",
    )
)
